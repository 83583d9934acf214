//! shared: one block's shared memory with the sim's checks, byte by byte.
//!
//! - **Initialisation**: a byte is readable once some thread of the block has written it (a store, an
//!   atomic's result, a completed `cp.async`); reading it earlier is an error. Bytes do not carry over
//!   from the previous block.
//! - **Races**: between two barriers (an *epoch*), a byte written by one thread and read, written or
//!   atomically updated by another is a race; a byte read by one thread and written by another too.
//!   Atomics do not race with atomics. Both threads are named.
//! - **Asynchronous copies**: a `cp.async` marks its destination bytes *pending* until the wait that
//!   completes its group; any read or write of a pending byte is an error.
//!
//! Epoch and block counters only grow, so the metadata never needs clearing between blocks.

use flashc_codegen::kir::Space;

use super::SimErrorKind;
use super::error::Access;

const NONE: u32 = u32::MAX;

/// What the checks know about one byte.
#[derive(Clone, Copy, Debug)]
struct Meta {
    /// The block generation in which the byte was last written.
    init: u32,
    /// Epoch and thread of the last plain write.
    w_epoch: u32,
    writer: u32,
    /// Epoch and up to two distinct reading threads (the second `NONE` if only one read).
    r_epoch: u32,
    r1: u32,
    r2: u32,
    /// Epoch and up to two distinct threads that updated the byte atomically.
    a_epoch: u32,
    a1: u32,
    a2: u32,
    /// In-flight `cp.async` copies into the byte, valid in block generation `p_gen`.
    p_gen: u32,
    pending: u32,
    p_owner: u32,
}

impl Default for Meta {
    fn default() -> Meta {
        Meta {
            init: 0,
            w_epoch: 0,
            writer: NONE,
            r_epoch: 0,
            r1: NONE,
            r2: NONE,
            a_epoch: 0,
            a1: NONE,
            a2: NONE,
            p_gen: 0,
            pending: 0,
            p_owner: NONE,
        }
    }
}

/// Records thread `t` in a two-slot set for the current epoch.
fn note(epoch_field: &mut u32, s1: &mut u32, s2: &mut u32, epoch: u32, t: u32) {
    if *epoch_field != epoch {
        *epoch_field = epoch;
        *s1 = t;
        *s2 = NONE;
    } else if *s1 != t && *s2 == NONE {
        *s2 = t;
    }
}

/// A thread of the set other than `t`, if any (the set holds at most two distinct threads, and any
/// third would also be another thread than one of them).
fn other_than(s1: u32, s2: u32, t: u32) -> Option<u32> {
    if s1 != NONE && s1 != t {
        Some(s1)
    } else if s2 != NONE && s2 != t {
        Some(s2)
    } else {
        None
    }
}

/// Shared memory of the running block.
pub(crate) struct Shared {
    data: Vec<u8>,
    meta: Vec<Meta>,
    generation: u32,
    epoch: u32,
    /// Block dimensions, to name threads.
    dims: [u32; 3],
}

impl Shared {
    pub fn new(bytes: usize) -> Shared {
        Shared { data: vec![0; bytes], meta: vec![Meta::default(); bytes], generation: 0, epoch: 0, dims: [1; 3] }
    }

    /// Starts a block: nothing initialised, nothing pending, a fresh epoch.
    pub fn begin_block(&mut self, dims: [u32; 3]) {
        self.generation += 1;
        self.epoch += 1;
        self.dims = dims;
    }

    /// A barrier: a fresh epoch.
    pub fn barrier(&mut self) {
        self.epoch += 1;
    }

    fn coords(&self, t: u32) -> [u32; 3] {
        let [x, y, _] = self.dims;
        [t % x, (t / x) % y, t / (x * y)]
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, SimErrorKind> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.data.len() as u64 => Ok(addr as usize..end as usize),
            _ => Err(SimErrorKind::OutOfBounds { space: Space::Shared, addr, bytes: len as u32 }),
        }
    }

    fn race(&self, addr: usize, other: u32, first: Access, second: Access) -> SimErrorKind {
        SimErrorKind::Race { addr: addr as u32, other: self.coords(other), first, second }
    }

    fn check_pending(&self, b: usize) -> Result<(), SimErrorKind> {
        let m = &self.meta[b];
        if m.p_gen == self.generation && m.pending > 0 {
            return Err(SimErrorKind::PendingAsyncCopy { addr: b as u32, owner: self.coords(m.p_owner) });
        }
        Ok(())
    }

    /// Checks a read of `[addr, addr + len)` by thread `t` and records it; returns the bytes.
    pub fn read(&mut self, t: u32, addr: u64, len: usize) -> Result<&[u8], SimErrorKind> {
        let r = self.range(addr, len)?;
        let (generation, epoch) = (self.generation, self.epoch);
        for b in r.clone() {
            self.check_pending(b)?;
            let m = self.meta[b];
            if m.init != generation {
                return Err(SimErrorKind::UninitializedSharedRead { addr: b as u32 });
            }
            if m.w_epoch == epoch && m.writer != t {
                return Err(self.race(b, m.writer, Access::Write, Access::Read));
            }
            if m.a_epoch == epoch
                && let Some(o) = other_than(m.a1, m.a2, t)
            {
                return Err(self.race(b, o, Access::Atomic, Access::Read));
            }
            let m = &mut self.meta[b];
            note(&mut m.r_epoch, &mut m.r1, &mut m.r2, epoch, t);
        }
        Ok(&self.data[r])
    }

    /// Checks a plain write by thread `t` and performs it.
    pub fn write(&mut self, t: u32, addr: u64, bytes: &[u8]) -> Result<(), SimErrorKind> {
        let r = self.range(addr, bytes.len())?;
        for b in r.clone() {
            self.check_pending(b)?;
            self.check_write(t, b)?;
        }
        self.record_write(t, r.clone());
        self.data[r].copy_from_slice(bytes);
        Ok(())
    }

    fn check_write(&self, t: u32, b: usize) -> Result<(), SimErrorKind> {
        let m = self.meta[b];
        let epoch = self.epoch;
        if m.w_epoch == epoch && m.writer != t {
            return Err(self.race(b, m.writer, Access::Write, Access::Write));
        }
        if m.r_epoch == epoch
            && let Some(o) = other_than(m.r1, m.r2, t)
        {
            return Err(self.race(b, o, Access::Read, Access::Write));
        }
        if m.a_epoch == epoch
            && let Some(o) = other_than(m.a1, m.a2, t)
        {
            return Err(self.race(b, o, Access::Atomic, Access::Write));
        }
        Ok(())
    }

    fn record_write(&mut self, t: u32, r: std::ops::Range<usize>) {
        let (generation, epoch) = (self.generation, self.epoch);
        for m in &mut self.meta[r] {
            m.init = generation;
            m.w_epoch = epoch;
            m.writer = t;
        }
    }

    /// Checks an atomic read-modify-write by thread `t` and returns the bytes to update.
    pub fn atomic(&mut self, t: u32, addr: u64, len: usize) -> Result<&mut [u8], SimErrorKind> {
        let r = self.range(addr, len)?;
        let (generation, epoch) = (self.generation, self.epoch);
        for b in r.clone() {
            self.check_pending(b)?;
            let m = self.meta[b];
            if m.init != generation {
                return Err(SimErrorKind::UninitializedSharedRead { addr: b as u32 });
            }
            if m.w_epoch == epoch && m.writer != t {
                return Err(self.race(b, m.writer, Access::Write, Access::Atomic));
            }
            if m.r_epoch == epoch
                && let Some(o) = other_than(m.r1, m.r2, t)
            {
                return Err(self.race(b, o, Access::Read, Access::Atomic));
            }
        }
        for m in &mut self.meta[r.clone()] {
            note(&mut m.a_epoch, &mut m.a1, &mut m.a2, epoch, t);
        }
        Ok(&mut self.data[r])
    }

    /// Marks the destination of a `cp.async` issued by thread `t` as pending. The copy may land any
    /// time from now on, so it must not race with this epoch's accesses of other threads either.
    pub fn begin_async(&mut self, t: u32, addr: u64, len: usize) -> Result<(), SimErrorKind> {
        let r = self.range(addr, len)?;
        for b in r.clone() {
            self.check_write(t, b)?;
        }
        let generation = self.generation;
        for m in &mut self.meta[r] {
            if m.p_gen != generation {
                m.p_gen = generation;
                m.pending = 0;
            }
            m.pending += 1;
            m.p_owner = t;
        }
        Ok(())
    }

    /// Completes a `cp.async` of thread `t`: its bytes are written now, by `t`.
    pub fn complete_async(&mut self, t: u32, addr: u64, bytes: &[u8]) -> Result<(), SimErrorKind> {
        let r = self.range(addr, bytes.len())?;
        let generation = self.generation;
        for m in &mut self.meta[r.clone()] {
            if m.p_gen == generation && m.pending > 0 {
                m.pending -= 1;
            }
        }
        self.write(t, addr, bytes)
    }
}
