//! memory: the sim's global memory — separate allocations at 256-byte aligned device addresses with
//! unmapped gaps between them, so an access past the end of one buffer is caught instead of landing
//! in the next.
//!
//! Addresses start at `0x1_0000_0000` (a pointer truncated to 32 bits, or a null pointer, is never
//! valid). A fresh allocation holds a poison pattern, `0xFF` in every byte: read as f32 or bf16 it is
//! a NaN, as an integer −1, so a kernel that reads memory nobody wrote shows it in its results.
//!
//! During a launch the memory also remembers, for every 2-byte unit the kernel writes (the smallest
//! access kir has), which block, which barrier interval of that block and which thread wrote it last
//! (4 bytes of bookkeeping per byte of an allocation the kernel writes, dropped when the launch
//! ends). That catches global-memory races —
//! a byte written by one block and read or written by another (blocks run in any order and at the
//! same time on the GPU), or written and then read or written by another thread of the same block
//! with no barrier between — and `ld.global.nc` reads of data the kernel wrote. Atomics are checked
//! against plain writes but not recorded, so atomics never race with atomics.

use flashc_codegen::kir::Space;

use super::SimErrorKind;
use super::error::SimError;
use super::num::{bf16_to_f32, f32_to_bf16};

/// The first device address handed out.
const BASE: u64 = 0x1_0000_0000;
/// Allocation alignment.
const ALIGN: u64 = 256;
/// The smallest unmapped gap after an allocation (the gap is at least the allocation's own size).
const MIN_GAP: u64 = 64 * 1024;

/// Who accesses global memory: the packed form of (linear block + 1, barrier interval in the block,
/// linear thread), so one u64 per byte records the last writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Writer(pub u64);

impl Writer {
    pub fn new(block: u32, interval: u32, thread: u32) -> Writer {
        Writer((u64::from(block) + 1) << 32 | u64::from(interval & 0x3F_FFFF) << 10 | u64::from(thread & 0x3FF))
    }

    /// The linear block.
    pub fn block(self) -> u32 {
        ((self.0 >> 32) as u32).wrapping_sub(1)
    }

    pub fn thread(self) -> u32 {
        (self.0 & 0x3FF) as u32
    }

    fn interval(self) -> u32 {
        ((self.0 >> 10) & 0x3F_FFFF) as u32
    }

    /// Whether an access by `self` conflicts with the recorded writer `w`: another block, or another
    /// thread of the same block in the same barrier interval.
    fn conflicts(self, w: Writer) -> bool {
        w.0 != 0 && (w.block() != self.block() || (w.interval() == self.interval() && w.thread() != self.thread()))
    }
}

/// What went wrong with a checked global access.
#[derive(Debug)]
pub(crate) enum GlobalFault {
    Kind(SimErrorKind),
    /// The byte at `addr` was written by `other` in a way that conflicts with this access.
    Race {
        addr: u64,
        other: Writer,
    },
}

impl From<SimErrorKind> for GlobalFault {
    fn from(k: SimErrorKind) -> GlobalFault {
        GlobalFault::Kind(k)
    }
}

/// The 2-byte units covering `[off, off + len)`.
fn units(off: usize, len: usize) -> std::ops::Range<usize> {
    off / 2..(off + len).div_ceil(2)
}

#[derive(Clone, Debug)]
struct Allocation {
    base: u64,
    data: Vec<u8>,
    /// The last writer of each 2-byte unit during the running launch (`Writer` packed; 0 = not
    /// written), empty outside launches or until the first write.
    written: Vec<u64>,
}

/// Global memory of the sim device.
#[derive(Clone, Debug, Default)]
pub struct GlobalMemory {
    /// Sorted by base address (addresses only grow).
    allocs: Vec<Allocation>,
    next: u64,
    /// Whether a launch is tracking writes.
    tracking: bool,
}

fn host_error(kind: SimErrorKind) -> SimError {
    SimError { kernel: "(host)".into(), kind, block: [0; 3], thread: None, inst: String::new() }
}

impl GlobalMemory {
    pub fn new() -> GlobalMemory {
        GlobalMemory { allocs: Vec::new(), next: BASE, tracking: false }
    }

    /// Allocates `bytes` (filled with the poison byte `0xFF`) and returns its device address,
    /// 256-byte aligned, followed by an unmapped gap at least as large as the allocation.
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        let base = self.next;
        let size = bytes as u64;
        self.allocs.push(Allocation { base, data: vec![0xFF; bytes], written: Vec::new() });
        self.next = (base + size + size.max(MIN_GAP)).next_multiple_of(ALIGN);
        base
    }

    /// Total bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.allocs.iter().map(|a| a.data.len()).sum()
    }

    /// The allocation holding `[addr, addr + len)` and the offset of `addr` in it.
    fn find(&self, addr: u64, len: usize) -> Option<(usize, usize)> {
        let i = self.allocs.partition_point(|a| a.base <= addr).checked_sub(1)?;
        let a = &self.allocs[i];
        let off = addr - a.base;
        let end = off.checked_add(len as u64)?;
        if end <= a.data.len() as u64 { Some((i, off as usize)) } else { None }
    }

    fn oob(addr: u64, len: usize) -> SimErrorKind {
        SimErrorKind::OutOfBounds { space: Space::Global, addr, bytes: len as u32 }
    }

    /// Reads `len` bytes (unchecked: for the host and for atomics' old values).
    pub(crate) fn load(&self, addr: u64, len: usize) -> Result<&[u8], SimErrorKind> {
        let (i, off) = self.find(addr, len).ok_or_else(|| Self::oob(addr, len))?;
        Ok(&self.allocs[i].data[off..off + len])
    }

    /// Reads `len` bytes for thread `who` of the running kernel, checking for races with the bytes'
    /// writers and, for `ld.global.nc` (`nc`), that the kernel wrote none of them.
    pub(crate) fn load_checked(&self, addr: u64, len: usize, who: Writer, nc: bool) -> Result<&[u8], GlobalFault> {
        let (i, off) = self.find(addr, len).ok_or_else(|| Self::oob(addr, len))?;
        let a = &self.allocs[i];
        if !a.written.is_empty() {
            for u in units(off, len) {
                let w = Writer(a.written[u]);
                let addr = a.base + 2 * u as u64;
                if nc && w.0 != 0 {
                    return Err(SimErrorKind::NonCoherentRead { addr }.into());
                }
                if who.conflicts(w) {
                    return Err(GlobalFault::Race { addr, other: w });
                }
            }
        }
        Ok(&a.data[off..off + len])
    }

    /// Writes bytes for thread `who` of the running kernel, checking for races and recording the
    /// writer (`record` false for atomics, which do not race with each other).
    pub(crate) fn store_checked(
        &mut self,
        addr: u64,
        bytes: &[u8],
        who: Writer,
        record: bool,
    ) -> Result<(), GlobalFault> {
        let (i, off) = self.find(addr, bytes.len()).ok_or_else(|| Self::oob(addr, bytes.len()))?;
        let tracking = self.tracking;
        let a = &mut self.allocs[i];
        if !a.written.is_empty() {
            for u in units(off, bytes.len()) {
                let w = Writer(a.written[u]);
                if who.conflicts(w) {
                    return Err(GlobalFault::Race { addr: a.base + 2 * u as u64, other: w });
                }
            }
        }
        a.data[off..off + bytes.len()].copy_from_slice(bytes);
        if tracking && record {
            if a.written.is_empty() {
                a.written = vec![0; a.data.len().div_ceil(2)];
            }
            a.written[units(off, bytes.len())].fill(who.0);
        }
        Ok(())
    }

    /// Starts (or ends) remembering the bytes kernels write.
    pub(crate) fn track_writes(&mut self, on: bool) {
        self.tracking = on;
        if !on {
            for a in &mut self.allocs {
                a.written = Vec::new();
            }
        }
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), SimError> {
        let (i, off) = self.find(addr, bytes.len()).ok_or_else(|| host_error(Self::oob(addr, bytes.len())))?;
        self.allocs[i].data[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, SimError> {
        self.load(addr, len).map(<[u8]>::to_vec).map_err(host_error)
    }

    pub fn write_f32(&mut self, addr: u64, v: &[f32]) -> Result<(), SimError> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write(addr, &bytes)
    }

    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, SimError> {
        let b = self.read(addr, n.saturating_mul(4))?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Writes f32 values as bf16, rounded to nearest even.
    pub fn write_bf16(&mut self, addr: u64, v: &[f32]) -> Result<(), SimError> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| f32_to_bf16(*x).to_le_bytes()).collect();
        self.write(addr, &bytes)
    }

    /// Reads bf16 values widened (exactly) to f32.
    pub fn read_bf16(&self, addr: u64, n: usize) -> Result<Vec<f32>, SimError> {
        let b = self.read(addr, n.saturating_mul(2))?;
        Ok(b.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
    }

    pub fn write_i32(&mut self, addr: u64, v: &[i32]) -> Result<(), SimError> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write(addr, &bytes)
    }

    pub fn read_i32(&self, addr: u64, n: usize) -> Result<Vec<i32>, SimError> {
        let b = self.read(addr, n.saturating_mul(4))?;
        Ok(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}
