//! exec: one block of threads running a kir body in lock-step.
//!
//! Every statement runs for a *mask* of active threads (ascending linear thread indices). An
//! instruction runs for each active thread in turn, so within one instruction thread 0 goes first;
//! `If` runs its then-branch with the threads whose condition holds and then its else-branch with the
//! others; `For` and `While` iterate while any active thread's condition holds, each thread leaving on
//! its own. Warp-collective instructions (`warp.rs`) run per warp and need every lane of it.
//!
//! Registers are per thread, 64-bit bit patterns, stored register-major (`regs[r * n + t]`) so an
//! instruction walks one contiguous row per operand. A register read before any write is an error.

use std::collections::VecDeque;

use flashc_codegen::kir::{AtomOp, BinOp, Cache, Inst, Kernel, Operand, Reg, Space, Special, Stmt, Ty};

use super::error::{Access, SimError};
use super::memory::{GlobalFault, GlobalMemory, Writer};
use super::num::{self, NumError};
use super::print;
use super::shared::Shared;
use super::{SimErrorKind, Stats};

/// An error before it is placed (kernel, block, instruction): what and which thread. Boxed, so the
/// `Ok` path of every per-thread step stays small.
#[derive(Debug)]
pub(crate) struct Fault(Box<FaultData>);

#[derive(Debug)]
pub(crate) struct FaultData {
    pub kind: SimErrorKind,
    /// Linear thread index in the block.
    pub thread: Option<u32>,
}

impl Fault {
    #[cold]
    pub fn new(kind: SimErrorKind, thread: Option<u32>) -> Fault {
        Fault(Box::new(FaultData { kind, thread }))
    }
}

#[cold]
pub(crate) fn fault(kind: SimErrorKind, t: usize) -> Fault {
    Fault::new(kind, Some(t as u32))
}

fn num_fault(e: NumError, t: usize) -> Fault {
    let kind = match e {
        NumError::DivisionByZero => SimErrorKind::DivisionByZero,
        NumError::Unsupported(m) => SimErrorKind::Unsupported(m),
    };
    fault(kind, t)
}

/// The active threads of a statement.
#[derive(Clone, Debug)]
pub(crate) struct Mask {
    pub threads: Vec<u32>,
    /// Warps with at least one active thread (for counting warp-instructions).
    pub warps: u64,
}

impl Mask {
    pub fn new(threads: Vec<u32>) -> Mask {
        let mut warps = 0;
        let mut last = u32::MAX;
        for &t in &threads {
            if t / 32 != last {
                last = t / 32;
                warps += 1;
            }
        }
        Mask { threads, warps }
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

/// One `cp.async` in flight: its destination and the bytes it will write (zero-fill included).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AsyncCopy {
    pub dst: u64,
    pub len: usize,
    pub data: [u8; 16],
}

/// A thread's `cp.async` groups.
#[derive(Clone, Debug, Default)]
pub(crate) struct AsyncQueue {
    /// Copies issued since the last commit.
    pub open: Vec<AsyncCopy>,
    /// Committed groups, oldest first.
    pub committed: VecDeque<Vec<AsyncCopy>>,
}

/// What stays fixed for every block of a launch.
pub(crate) struct LaunchCtx {
    pub params: Vec<u64>,
    /// Shared address of each static array.
    pub shared_base: Vec<u64>,
    pub dyn_base: u64,
    pub block: [u32; 3],
    pub grid: [u32; 3],
}

/// The state of the running block.
pub(crate) struct Block<'a, 'm> {
    pub ctx: &'a LaunchCtx,
    pub k: &'a Kernel,
    /// Threads in the block.
    pub n: usize,
    pub ctaid: [u32; 3],
    /// The linear block index (x fastest).
    pub linear: u32,
    /// Barriers this block has passed (the barrier interval, for global race checks).
    pub interval: u32,
    pub regs: Vec<u64>,
    pub init: Vec<bool>,
    pub shared: &'m mut Shared,
    pub global: &'m mut GlobalMemory,
    pub asyncs: Vec<AsyncQueue>,
    pub stats: &'m mut Stats,
}

impl<'a, 'm> Block<'a, 'm> {
    /// Linear thread index → `tid`.
    pub fn coords(&self, t: u32) -> [u32; 3] {
        let [x, y, _] = self.ctx.block;
        [t % x, (t / x) % y, t / (x * y)]
    }

    /// Thread `t` as a global-memory accessor.
    fn who(&self, t: usize) -> Writer {
        Writer::new(self.linear, self.interval, t as u32)
    }

    /// A checked global access's fault, with the other thread named.
    #[cold]
    fn global_fault(&self, e: GlobalFault, t: usize, second: Access) -> Fault {
        match e {
            GlobalFault::Kind(k) => fault(k, t),
            GlobalFault::Race { addr, other } => {
                let [gx, gy, _] = self.ctx.grid;
                let b = other.block();
                let other_block = [b % gx, (b / gx) % gy, b / (gx * gy)];
                let kind =
                    SimErrorKind::GlobalRace { addr, other_block, other_thread: self.coords(other.thread()), second };
                fault(kind, t)
            }
        }
    }

    fn error(&self, f: Fault, inst: String) -> SimError {
        let FaultData { kind, thread } = *f.0;
        SimError { kernel: self.k.name.clone(), kind, block: self.ctaid, thread: thread.map(|t| self.coords(t)), inst }
    }

    // ------------------------------------------------------------------ registers and operands

    /// A register's bits for thread `t` (an error if never written).
    #[inline]
    pub fn reg(&self, r: Reg, t: usize) -> Result<u64, Fault> {
        let i = r.0 as usize * self.n + t;
        if !self.init[i] {
            return Err(self.uninit(r, t));
        }
        Ok(self.regs[i])
    }

    #[cold]
    fn uninit(&self, r: Reg, t: usize) -> Fault {
        fault(SimErrorKind::UninitializedRegister { reg: print::reg(self.k, r) }, t)
    }

    #[inline]
    pub fn set(&mut self, r: Reg, t: usize, v: u64) {
        let i = r.0 as usize * self.n + t;
        self.regs[i] = v;
        self.init[i] = true;
    }

    /// An operand read as a value of type `ty` for thread `t`.
    #[inline(always)]
    pub fn get(&self, o: &Operand, ty: Ty, t: usize) -> Result<u64, Fault> {
        if let Operand::Reg(r) = o {
            return Ok(self.reg(*r, t)? & num::mask(ty));
        }
        Ok(self.constant(o, ty))
    }

    /// A non-register operand's value.
    fn constant(&self, o: &Operand, ty: Ty) -> u64 {
        match o {
            Operand::Reg(_) => 0,
            Operand::Imm(i) => (*i as u64) & num::mask(ty),
            Operand::F32(x) => num::f32_imm(*x, ty),
            Operand::Shared(i) => self.ctx.shared_base[*i as usize],
            Operand::DynShared => self.ctx.dyn_base,
        }
    }

    // ------------------------------------------------------------------ statements

    pub fn exec(&mut self, stmts: &'a [Stmt], mask: &Mask) -> Result<(), SimError> {
        for s in stmts {
            match s {
                Stmt::Inst(i) => {
                    self.stats.instructions += mask.warps;
                    self.stats.thread_instructions += mask.threads.len() as u64;
                    self.inst(i, mask).map_err(|f| self.error(f, print::inst(self.k, i)))?;
                }
                Stmt::Comment(_) => {}
                Stmt::If { cond, negate, then, else_, uniform } => {
                    self.stats.instructions += mask.warps;
                    let (yes, no) = self
                        .split(mask, *cond, *negate, *uniform)
                        .map_err(|f| self.error(f, print::stmt_head(self.k, s)))?;
                    if !yes.is_empty() {
                        self.exec(then, &yes)?;
                    }
                    if !no.is_empty() {
                        self.exec(else_, &no)?;
                    }
                }
                Stmt::For { ty, var, start, end, step, body, uniform } => {
                    let head = || print::stmt_head(self.k, s);
                    for &t in &mask.threads {
                        let v = self.get(start, *ty, t as usize).map_err(|f| self.error(f, head()))?;
                        self.set(*var, t as usize, v);
                    }
                    let mut cur = mask.clone();
                    loop {
                        self.stats.instructions += cur.warps;
                        let mut go = Vec::with_capacity(cur.threads.len());
                        for &t in &cur.threads {
                            let tu = t as usize;
                            let v = self.reg(*var, tu).map_err(|f| self.error(f, head()))?;
                            let e = self.get(end, *ty, tu).map_err(|f| self.error(f, head()))?;
                            if num::int_value(*ty, v) < num::int_value(*ty, e) {
                                go.push(t);
                            }
                        }
                        if *uniform && !go.is_empty() && go.len() != cur.threads.len() {
                            // The first thread whose condition differs from the first active thread's.
                            let odd = if go[0] == cur.threads[0] { first_difference(&cur.threads, &go) } else { go[0] };
                            return Err(self.error(Fault::new(SimErrorKind::NonUniform, Some(odd)), head()));
                        }
                        if go.is_empty() {
                            break;
                        }
                        let go = Mask::new(go);
                        self.exec(body, &go)?;
                        for &t in &go.threads {
                            let tu = t as usize;
                            let v = self.reg(*var, tu).map_err(|f| self.error(f, head()))?;
                            let st = self.get(step, *ty, tu).map_err(|f| self.error(f, head()))?;
                            let nv =
                                num::bin(BinOp::Add, *ty, v, st).map_err(|e| self.error(num_fault(e, tu), head()))?;
                            self.set(*var, tu, nv);
                        }
                        cur = go;
                    }
                }
                Stmt::While { head, cond, body, uniform } => {
                    let mut cur = mask.clone();
                    loop {
                        self.exec(head, &cur)?;
                        self.stats.instructions += cur.warps;
                        let (go, _) = self
                            .split(&cur, *cond, false, *uniform)
                            .map_err(|f| self.error(f, print::stmt_head(self.k, s)))?;
                        if go.is_empty() {
                            break;
                        }
                        self.exec(body, &go)?;
                        cur = go;
                    }
                }
            }
        }
        Ok(())
    }

    /// Splits a mask by a predicate register (negated if `negate`); for a uniform statement, both
    /// sides non-empty is an error naming the first thread that differs from the first active one.
    fn split(&self, mask: &Mask, cond: Reg, negate: bool, uniform: bool) -> Result<(Mask, Mask), Fault> {
        let mut yes = Vec::new();
        let mut no = Vec::new();
        for &t in &mask.threads {
            let p = (self.reg(cond, t as usize)? & 1 == 1) != negate;
            if p { yes.push(t) } else { no.push(t) }
        }
        if uniform && !yes.is_empty() && !no.is_empty() {
            let first = mask.threads[0];
            let odd = if yes[0] == first { no[0] } else { yes[0] };
            return Err(Fault::new(SimErrorKind::NonUniform, Some(odd)));
        }
        Ok((Mask::new(yes), Mask::new(no)))
    }

    // ------------------------------------------------------------------ instructions

    fn inst(&mut self, i: &'a Inst, mask: &Mask) -> Result<(), Fault> {
        let threads = &mask.threads;
        match i {
            Inst::Mov { ty, dst, src } => {
                for &t in threads {
                    let v = self.get(src, *ty, t as usize)?;
                    self.set(*dst, t as usize, v);
                }
            }
            Inst::Special { dst, reg } => {
                for &t in threads {
                    let v = self.special(*reg, t);
                    self.set(*dst, t as usize, u64::from(v));
                }
            }
            Inst::LdParam { ty, dst, param } => {
                let v = self.ctx.params[*param as usize] & num::mask(*ty);
                for &t in threads {
                    self.set(*dst, t as usize, v);
                }
            }
            Inst::CvtaGlobal { dst, src } => {
                for &t in threads {
                    let v = self.reg(*src, t as usize)?;
                    self.set(*dst, t as usize, v);
                }
            }
            Inst::Bin { op, ty, dst, a, b } => {
                // Shift amounts are always `.u32`.
                let bty = if matches!(op, BinOp::Shl | BinOp::Shr) { Ty::U32 } else { *ty };
                for &t in threads {
                    let tu = t as usize;
                    let (x, y) = (self.get(a, *ty, tu)?, self.get(b, bty, tu)?);
                    let v = num::bin(*op, *ty, x, y).map_err(|e| num_fault(e, tu))?;
                    self.set(*dst, tu, v);
                }
            }
            Inst::Mad { ty, dst, a, b, c } => {
                for &t in threads {
                    let tu = t as usize;
                    let (x, y, z) = (self.get(a, *ty, tu)?, self.get(b, *ty, tu)?, self.get(c, *ty, tu)?);
                    let v = num::mad(*ty, x, y, z).map_err(|e| num_fault(e, tu))?;
                    self.set(*dst, tu, v);
                }
            }
            Inst::Un { op, ty, dst, a } => {
                for &t in threads {
                    let tu = t as usize;
                    let x = self.get(a, *ty, tu)?;
                    let v = num::un(*op, *ty, x).map_err(|e| num_fault(e, tu))?;
                    self.set(*dst, tu, v);
                }
            }
            Inst::Setp { cmp, ty, dst, a, b } => {
                for &t in threads {
                    let tu = t as usize;
                    let (x, y) = (self.get(a, *ty, tu)?, self.get(b, *ty, tu)?);
                    let v = num::setp(*cmp, *ty, x, y).map_err(|e| num_fault(e, tu))?;
                    self.set(*dst, tu, u64::from(v));
                }
            }
            Inst::Selp { ty, dst, a, b, p } => {
                for &t in threads {
                    let tu = t as usize;
                    let v = if self.reg(*p, tu)? & 1 == 1 { self.get(a, *ty, tu)? } else { self.get(b, *ty, tu)? };
                    self.set(*dst, tu, v);
                }
            }
            Inst::Cvt { dst_ty, src_ty, rnd, dst, src } => {
                for &t in threads {
                    let tu = t as usize;
                    let x = self.get(src, *src_ty, tu)?;
                    let v = num::cvt(*dst_ty, *src_ty, *rnd, x).map_err(|e| num_fault(e, tu))?;
                    self.set(*dst, tu, v);
                }
            }
            Inst::PackBf16x2 { dst, hi, lo } => {
                for &t in threads {
                    let tu = t as usize;
                    let h = f32::from_bits(self.get(hi, Ty::F32, tu)? as u32);
                    let l = f32::from_bits(self.get(lo, Ty::F32, tu)? as u32);
                    let v = (u64::from(num::f32_to_bf16(h)) << 16) | u64::from(num::f32_to_bf16(l));
                    self.set(*dst, tu, v);
                }
            }
            Inst::Pack16 { dst, lo, hi } => {
                for &t in threads {
                    let tu = t as usize;
                    let v = ((self.reg(*hi, tu)? & 0xFFFF) << 16) | (self.reg(*lo, tu)? & 0xFFFF);
                    self.set(*dst, tu, v);
                }
            }
            Inst::Unpack16 { lo, hi, src } => {
                for &t in threads {
                    let tu = t as usize;
                    let v = self.reg(*src, tu)?;
                    self.set(*lo, tu, v & 0xFFFF);
                    self.set(*hi, tu, (v >> 16) & 0xFFFF);
                }
            }
            Inst::Ld { space, ty, cache, dst, addr, offset } => {
                for &t in threads {
                    self.load(t as usize, *space, *ty, *cache, dst, addr, *offset)?;
                }
            }
            Inst::St { space, ty, src, addr, offset } => {
                for &t in threads {
                    self.store(t as usize, *space, *ty, src, addr, *offset)?;
                }
            }
            Inst::Atom { op, space, ty, dst, addr, val } => {
                for &t in threads {
                    self.atom(t as usize, *op, *space, *ty, *dst, addr, val)?;
                }
            }
            Inst::Bar => {
                self.stats.barriers += 1;
                if threads.len() != self.n {
                    let missing = first_missing(threads, self.n);
                    let kind =
                        SimErrorKind::BarrierDivergence { arrived: threads.len() as u32, expected: self.n as u32 };
                    return Err(Fault::new(kind, Some(missing)));
                }
                self.shared.barrier();
                self.interval += 1;
            }
            Inst::Shfl { mode, dst, src, lane, clamp } => self.shfl(mask, *mode, *dst, *src, lane, *clamp)?,
            Inst::Vote { mode, dst, src } => self.vote(mask, *mode, *dst, *src)?,
            Inst::Mma { d, a, b, c } => self.mma(mask, d, a, b, c)?,
            Inst::Ldmatrix { trans, dst, addr } => self.ldmatrix(mask, *trans, dst, addr)?,
            Inst::CpAsync { dst, src, bytes, src_bytes } => {
                for &t in threads {
                    self.cp_async(t as usize, dst, src, *bytes, src_bytes.as_ref())?;
                }
            }
            Inst::CpAsyncCommit => {
                for &t in threads {
                    let q = &mut self.asyncs[t as usize];
                    let group = std::mem::take(&mut q.open);
                    q.committed.push_back(group);
                }
            }
            Inst::CpAsyncWait { n } => {
                for &t in threads {
                    let tu = t as usize;
                    while self.asyncs[tu].committed.len() > *n as usize {
                        let group = self.asyncs[tu].committed.pop_front().unwrap_or_default();
                        for c in group {
                            self.shared.complete_async(t, c.dst, &c.data[..c.len]).map_err(|k| fault(k, tu))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn special(&self, s: Special, t: u32) -> u32 {
        let [bx, by, bz] = self.ctx.block;
        let tid = self.coords(t);
        match s {
            Special::TidX => tid[0],
            Special::TidY => tid[1],
            Special::TidZ => tid[2],
            Special::NtidX => bx,
            Special::NtidY => by,
            Special::NtidZ => bz,
            Special::CtaidX => self.ctaid[0],
            Special::CtaidY => self.ctaid[1],
            Special::CtaidZ => self.ctaid[2],
            Special::NctaidX => self.ctx.grid[0],
            Special::NctaidY => self.ctx.grid[1],
            Special::NctaidZ => self.ctx.grid[2],
            Special::LaneId => t % 32,
            Special::WarpInBlock => t / 32,
        }
    }

    // ------------------------------------------------------------------ memory

    /// The effective address `addr + offset` of a memory access, checked for alignment to `align`.
    pub fn address(&self, t: usize, space: Space, addr: &Operand, offset: i64, align: u32) -> Result<u64, Fault> {
        let base = self.get(addr, Ty::U64, t)?;
        let a = base.wrapping_add(offset as u64);
        let a = match space {
            Space::Global => a,
            // Shared addresses are 32-bit; a negative or wrapped one is out of bounds.
            Space::Shared if (base as i64).checked_add(offset).is_none_or(|x| x < 0) => {
                return Err(fault(SimErrorKind::OutOfBounds { space, addr: a, bytes: align }, t));
            }
            Space::Shared => a,
        };
        if !a.is_multiple_of(u64::from(align)) {
            return Err(fault(SimErrorKind::Misaligned { space, addr: a, align }, t));
        }
        Ok(a)
    }

    #[allow(clippy::too_many_arguments)]
    fn load(
        &mut self,
        t: usize,
        space: Space,
        ty: Ty,
        cache: Cache,
        dst: &[Reg],
        addr: &Operand,
        offset: i64,
    ) -> Result<(), Fault> {
        if ty == Ty::Pred {
            return Err(fault(SimErrorKind::Unsupported("ld of .pred".into()), t));
        }
        let size = ty.bytes() as usize;
        let total = size * dst.len();
        let a = self.address(t, space, addr, offset, total as u32)?;
        let mut buf = [0u8; 16];
        match space {
            Space::Global => {
                let nc = cache != Cache::None;
                let who = self.who(t);
                let bytes =
                    self.global.load_checked(a, total, who, nc).map_err(|e| self.global_fault(e, t, Access::Read))?;
                buf[..total].copy_from_slice(bytes);
            }
            Space::Shared => {
                let bytes = self.shared.read(t as u32, a, total).map_err(|k| fault(k, t))?;
                buf[..total].copy_from_slice(bytes);
            }
        }
        for (j, r) in dst.iter().enumerate() {
            let v = le(&buf[j * size..(j + 1) * size]);
            // A signed load into a wider register is sign-extended to the register's width.
            let rty = self.k.ty(*r);
            let v = if ty.is_signed() && rty.bytes() > ty.bytes() {
                let shift = 64 - 8 * ty.bytes();
                (((v << shift) as i64) >> shift) as u64 & num::mask(rty)
            } else {
                v
            };
            self.set(*r, t, v);
        }
        Ok(())
    }

    fn store(
        &mut self,
        t: usize,
        space: Space,
        ty: Ty,
        src: &[Operand],
        addr: &Operand,
        offset: i64,
    ) -> Result<(), Fault> {
        if ty == Ty::Pred {
            return Err(fault(SimErrorKind::Unsupported("st of .pred".into()), t));
        }
        let size = ty.bytes() as usize;
        let total = size * src.len();
        let a = self.address(t, space, addr, offset, total as u32)?;
        let mut buf = [0u8; 16];
        for (j, o) in src.iter().enumerate() {
            let v = self.get(o, ty, t)?;
            buf[j * size..(j + 1) * size].copy_from_slice(&v.to_le_bytes()[..size]);
        }
        match space {
            Space::Global => {
                let who = self.who(t);
                self.global
                    .store_checked(a, &buf[..total], who, true)
                    .map_err(|e| self.global_fault(e, t, Access::Write))
            }
            Space::Shared => self.shared.write(t as u32, a, &buf[..total]).map_err(|k| fault(k, t)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn atom(
        &mut self,
        t: usize,
        op: AtomOp,
        space: Space,
        ty: Ty,
        dst: Option<Reg>,
        addr: &Operand,
        val: &Operand,
    ) -> Result<(), Fault> {
        let size = ty.bytes() as usize;
        if ty == Ty::Pred {
            return Err(fault(SimErrorKind::Unsupported("atom on .pred".into()), t));
        }
        let a = self.address(t, space, addr, 0, size as u32)?;
        let v = self.get(val, ty, t)?;
        let update = |old: u64| -> Result<u64, Fault> {
            match (op, ty) {
                (AtomOp::Exch, _) => Ok(v),
                // atom.add.f32 rounds to nearest even and flushes subnormal inputs and results.
                (AtomOp::Add, Ty::F32) => {
                    let r = num::ftz(num::ftz(f32::from_bits(old as u32)) + num::ftz(f32::from_bits(v as u32)));
                    Ok(u64::from(r.to_bits()))
                }
                (AtomOp::Add, _) => num::bin(BinOp::Add, ty, old, v).map_err(|e| num_fault(e, t)),
                (AtomOp::Min, _) => num::bin(BinOp::Min, ty, old, v).map_err(|e| num_fault(e, t)),
                (AtomOp::Max, _) => num::bin(BinOp::Max, ty, old, v).map_err(|e| num_fault(e, t)),
            }
        };
        let old = match space {
            Space::Global => {
                let who = self.who(t);
                let old = le(self.global.load(a, size).map_err(|k| fault(k, t))?);
                let new = update(old)?;
                self.global
                    .store_checked(a, &new.to_le_bytes()[..size], who, false)
                    .map_err(|e| self.global_fault(e, t, Access::Atomic))?;
                old
            }
            Space::Shared => {
                let bytes = self.shared.atomic(t as u32, a, size).map_err(|k| fault(k, t))?;
                let old = le(bytes);
                let new = update(old)?;
                bytes.copy_from_slice(&new.to_le_bytes()[..size]);
                old
            }
        };
        if let Some(d) = dst {
            self.set(d, t, old);
        }
        Ok(())
    }

    fn cp_async(
        &mut self,
        t: usize,
        dst: &Operand,
        src: &Operand,
        bytes: u32,
        src_bytes: Option<&Operand>,
    ) -> Result<(), Fault> {
        let len = bytes as usize;
        let valid = match src_bytes {
            Some(o) => self.get(o, Ty::U32, t)? as usize,
            None => len,
        };
        if valid > len {
            let m = format!("cp.async src-size {valid} exceeds cp-size {len}");
            return Err(fault(SimErrorKind::Unsupported(m), t));
        }
        let d = self.address(t, Space::Shared, dst, 0, bytes)?;
        let s = self.address(t, Space::Global, src, 0, bytes)?;
        let mut data = [0u8; 16];
        if valid > 0 {
            let who = self.who(t);
            let b =
                self.global.load_checked(s, valid, who, false).map_err(|e| self.global_fault(e, t, Access::Read))?;
            data[..valid].copy_from_slice(b);
        }
        self.shared.begin_async(t as u32, d, len).map_err(|k| fault(k, t))?;
        self.asyncs[t].open.push(AsyncCopy { dst: d, len, data });
        Ok(())
    }
}

/// Little-endian bytes (at most 8) as a register value.
pub(crate) fn le(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(v)
}

/// The first thread of `all` that is not in `some` (both ascending, `some` ⊂ `all`).
fn first_difference(all: &[u32], some: &[u32]) -> u32 {
    let mut j = 0;
    for &t in all {
        if some.get(j) == Some(&t) {
            j += 1;
        } else {
            return t;
        }
    }
    all[0]
}

/// The first thread index below `n` missing from the ascending list.
fn first_missing(threads: &[u32], n: usize) -> u32 {
    for (i, &t) in threads.iter().enumerate() {
        if t != i as u32 {
            return i as u32;
        }
    }
    threads.len().min(n.saturating_sub(1)) as u32
}
