//! sim: the `sim` device — an interpreter that runs kir kernels on the CPU the way the GPU would, and
//! checks what the GPU would silently get wrong.
//!
//! [`run`] launches a kernel on a grid of blocks over a [`GlobalMemory`]. Blocks run one after another
//! (in linear block order, x fastest); the threads of a block run **in lock-step**, statement by
//! statement, with per-thread active masks (`exec.rs`): `If` runs its then-branch for the threads
//! whose condition holds and then its else-branch for the others, `For` and `While` iterate while any
//! active thread's condition holds. Warps are 32 consecutive threads of the linear index
//! `x + y·bx + z·bx·by`. Within one instruction the active threads take turns in ascending order,
//! which also orders atomics deterministically.
//!
//! Semantics are PTX's, instruction by instruction (`num.rs` for arithmetic and conversions,
//! `warp.rs` for `shfl`, `vote`, `mma.sync` and `ldmatrix`). Shared memory is laid out as the static
//! arrays in order, each at its alignment, then the dynamic shared memory (16-byte aligned) of
//! `Launch::dynamic_shared` bytes.
//!
//! Checks, each a [`SimErrorKind`] naming the kernel, block, thread and instruction:
//! - out-of-bounds global accesses (outside every allocation) and shared accesses (outside the
//!   block's shared memory); misaligned accesses (vectors aligned to their whole size);
//! - reads of shared memory no thread of the block wrote, and of registers the thread never wrote;
//! - shared-memory races: between two barriers, a byte written by one thread and read or written by
//!   another (atomics race only with plain accesses);
//! - global-memory races: a byte written by one block and read or written by another, or by another
//!   thread of the same block with no barrier between (read-then-write orders are not tracked);
//! - `cp.async`: the copy lands in shared memory when the `cp.async.wait_group` that completes its
//!   group runs; until then its destination is *pending* and any access to it is an error;
//! - `ld.global.nc` of bytes the kernel wrote;
//! - `bar.sync` reached by only part of the block (barrier divergence);
//! - warp-collective instructions with inactive lanes;
//! - `uniform` `If`/`For`/`While` whose condition differs across the active threads;
//! - integer division by zero; ops on types PTX does not define them for;
//! - launches: arguments that do not match the parameters, more than 1024 threads, a block other than
//!   the kernel's fixed `block`, static shared memory over 48 KB or total shared memory over 227 KB.
//!
//! Floating point: f32 ops round to nearest even without flushing subnormals; the `.approx` ops are
//! computed in f64 and rounded (real hardware is within about 2 ulp) and their `.ftz` forms flush
//! subnormals; see `num.rs`.

mod device;
mod error;
mod exec;
mod memory;
mod num;
mod print;
mod shared;
mod warp;

use flashc_codegen::kir::{Inst, Kernel, Operand, ParamTy, Reg, Stmt};

pub use device::{Sim, SimMemory};
pub(crate) use device::{decode, encode};
pub use error::{Access, SimError, SimErrorKind};
pub use memory::GlobalMemory;
pub use num::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

use exec::{AsyncQueue, Block, LaunchCtx, Mask};
use shared::Shared;

/// Total shared memory one block may use (sm_90 opt-in maximum).
pub const MAX_SHARED: u32 = 227 * 1024;
/// Static shared memory a kernel may declare (ptxas limit).
pub const MAX_STATIC_SHARED: u32 = 48 * 1024;
/// Threads per block.
pub const MAX_THREADS: u32 = 1024;

/// A kernel argument, matching a `kir::Param` of the same type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A global address (`ParamTy::Ptr`).
    Ptr(u64),
    U32(u32),
    S32(i32),
    U64(u64),
    F32(f32),
}

impl Arg {
    fn matches(self, ty: ParamTy) -> bool {
        matches!(
            (self, ty),
            (Arg::Ptr(_), ParamTy::Ptr)
                | (Arg::U32(_), ParamTy::U32)
                | (Arg::S32(_), ParamTy::S32)
                | (Arg::U64(_), ParamTy::U64)
                | (Arg::F32(_), ParamTy::F32)
        )
    }

    fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::U32(x) => u64::from(x),
            Arg::S32(x) => u64::from(x as u32),
            Arg::F32(x) => u64::from(x.to_bits()),
        }
    }
}

/// Grid and block sizes of a launch, and the dynamic shared memory per block in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared: u32,
}

/// What a launch executed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub blocks: u64,
    /// Warp-instructions: each instruction counts once per warp with an active thread; each
    /// evaluation of an `If`, `For` or `While` condition counts like one instruction.
    pub instructions: u64,
    /// Instructions times active threads.
    pub thread_instructions: u64,
    /// `bar.sync` executed (per block).
    pub barriers: u64,
    /// Shared memory per block in bytes (static and dynamic).
    pub shared_bytes: u32,
}

fn launch_error(kernel: &Kernel, kind: SimErrorKind, inst: String) -> SimError {
    SimError { kernel: kernel.name.clone(), kind, block: [0; 3], thread: None, inst }
}

/// Runs `kernel` on `launch.grid` blocks of `launch.block` threads with `args` over `mem`, and returns
/// what it executed. On an error, `mem` holds whatever the kernel wrote before the failing
/// instruction (blocks run in linear order, so earlier blocks completed).
pub fn run(kernel: &Kernel, launch: &Launch, args: &[Arg], mem: &mut GlobalMemory) -> Result<Stats, SimError> {
    validate(kernel).map_err(|(m, inst)| launch_error(kernel, SimErrorKind::InvalidKernel(m), inst))?;
    let bad = |m: String| launch_error(kernel, SimErrorKind::Launch(m), String::new());

    // Sizes.
    let [bx, by, bz] = launch.block;
    let [gx, gy, gz] = launch.grid;
    if launch.block.contains(&0) || launch.grid.contains(&0) {
        return Err(bad(format!("empty grid {:?} or block {:?}", launch.grid, launch.block)));
    }
    let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
    if threads > u64::from(MAX_THREADS) || bz > 64 {
        return Err(bad(format!("block {:?} has {threads} threads (at most 1024, z at most 64)", launch.block)));
    }
    if gy > 65535 || gz > 65535 || gx > i32::MAX as u32 {
        return Err(bad(format!("grid {:?} exceeds the grid limits", launch.grid)));
    }
    if let Some(b) = kernel.block
        && b != launch.block
    {
        return Err(bad(format!("the kernel is written for blocks of {b:?}, launched with {:?}", launch.block)));
    }

    // Arguments.
    if args.len() != kernel.params.len() {
        return Err(bad(format!("{} arguments for {} parameters", args.len(), kernel.params.len())));
    }
    for (a, p) in args.iter().zip(&kernel.params) {
        if !a.matches(p.ty) {
            return Err(bad(format!("argument {a:?} for parameter {} of type {:?}", p.name, p.ty)));
        }
    }

    // Shared memory layout.
    let mut shared_base = Vec::with_capacity(kernel.shared.len());
    let mut end = 0u64;
    for s in &kernel.shared {
        let base = end.next_multiple_of(u64::from(s.align.max(1)));
        shared_base.push(base);
        end = base + u64::from(s.bytes);
    }
    if end > u64::from(MAX_STATIC_SHARED) {
        return Err(bad(format!("{end} bytes of static shared memory (at most {MAX_STATIC_SHARED})")));
    }
    let dyn_base = end.next_multiple_of(16);
    let total = dyn_base + u64::from(launch.dynamic_shared);
    if total > u64::from(MAX_SHARED) {
        return Err(bad(format!("{total} bytes of shared memory per block (at most {MAX_SHARED})")));
    }

    let ctx = LaunchCtx {
        params: args.iter().map(|a| a.bits()).collect(),
        shared_base,
        dyn_base,
        block: launch.block,
        grid: launch.grid,
    };
    let n = threads as usize;
    let mut shared = Shared::new(total as usize);
    let mut stats = Stats { shared_bytes: total as u32, ..Stats::default() };
    let all = Mask::new((0..n as u32).collect());
    let mut regs = vec![0u64; kernel.regs.len() * n];
    let mut init = vec![false; kernel.regs.len() * n];
    let mut asyncs = vec![AsyncQueue::default(); n];

    mem.track_writes(true);
    let mut result = Ok(());
    'grid: for z in 0..gz {
        for y in 0..gy {
            for x in 0..gx {
                init.fill(false);
                shared.begin_block(launch.block);
                let mut block = Block {
                    ctx: &ctx,
                    k: kernel,
                    n,
                    ctaid: [x, y, z],
                    linear: x + gx * (y + gy * z),
                    interval: 0,
                    regs: std::mem::take(&mut regs),
                    init: std::mem::take(&mut init),
                    shared: &mut shared,
                    global: mem,
                    asyncs: std::mem::take(&mut asyncs),
                    stats: &mut stats,
                };
                let r = block.exec(&kernel.body, &all);
                regs = block.regs;
                init = block.init;
                asyncs = block.asyncs;
                // Copies never waited for die with their block.
                for q in asyncs.iter_mut().filter(|q| !q.open.is_empty() || !q.committed.is_empty()) {
                    *q = AsyncQueue::default();
                }
                stats.blocks += 1;
                if let Err(e) = r {
                    result = Err(e);
                    break 'grid;
                }
            }
        }
    }
    mem.track_writes(false);
    result.map(|()| stats)
}

/// Checks that every register, parameter and shared array a kernel names exists and that vector
/// widths are ones PTX has; returns the problem and the statement.
fn validate(k: &Kernel) -> Result<(), (String, String)> {
    let nregs = k.regs.len();
    let reg_ok = |r: &Reg| (r.0 as usize) < nregs;
    let op_ok = |o: &Operand| match o {
        Operand::Reg(r) => reg_ok(r),
        Operand::Shared(i) => (*i as usize) < k.shared.len(),
        Operand::DynShared => k.dynamic_shared,
        Operand::Imm(_) | Operand::F32(_) => true,
    };
    fn walk(
        k: &Kernel,
        stmts: &[Stmt],
        reg_ok: &dyn Fn(&Reg) -> bool,
        op_ok: &dyn Fn(&Operand) -> bool,
    ) -> Result<(), (String, String)> {
        for s in stmts {
            let head = || print::stmt_head(k, s);
            match s {
                Stmt::Inst(i) => check_inst(k, i, reg_ok, op_ok).map_err(|m| (m, head()))?,
                Stmt::Comment(_) => {}
                Stmt::If { cond, then, else_, .. } => {
                    if !reg_ok(cond) {
                        return Err(("the condition register does not exist".into(), head()));
                    }
                    walk(k, then, reg_ok, op_ok)?;
                    walk(k, else_, reg_ok, op_ok)?;
                }
                Stmt::For { ty, var, start, end, step, body, .. } => {
                    if !reg_ok(var) || ![start, end, step].iter().all(|o| op_ok(o)) {
                        return Err(("a loop operand does not exist".into(), head()));
                    }
                    if ty.is_float() || *ty == flashc_codegen::kir::Ty::Pred {
                        return Err((format!("a for loop over .{}", ty.name()), head()));
                    }
                    walk(k, body, reg_ok, op_ok)?;
                }
                Stmt::While { head: h, cond, body, .. } => {
                    if !reg_ok(cond) {
                        return Err(("the condition register does not exist".into(), head()));
                    }
                    walk(k, h, reg_ok, op_ok)?;
                    walk(k, body, reg_ok, op_ok)?;
                }
            }
        }
        Ok(())
    }
    walk(k, &k.body, &reg_ok, &op_ok)
}

fn check_inst(
    k: &Kernel,
    i: &Inst,
    reg_ok: &dyn Fn(&Reg) -> bool,
    op_ok: &dyn Fn(&Operand) -> bool,
) -> Result<(), String> {
    let regs = |rs: &[Reg]| rs.iter().all(reg_ok);
    let ops = |os: &[&Operand]| os.iter().all(|o| op_ok(o));
    let missing = || "a register, shared array or dynamic shared memory it names does not exist".to_string();
    let vector = |n: usize, ty: flashc_codegen::kir::Ty| {
        if ![1, 2, 4].contains(&n) {
            Err(format!("a vector of {n} elements (PTX has 1, 2 and 4)"))
        } else if n as u32 * ty.bytes() > 16 {
            Err(format!("a vector of {n} × .{} is wider than 16 bytes", ty.name()))
        } else {
            Ok(())
        }
    };
    let ok = match i {
        Inst::Mov { dst, src, .. } => regs(&[*dst]) && ops(&[src]),
        Inst::Special { dst, .. } => regs(&[*dst]),
        Inst::LdParam { dst, param, .. } => {
            if *param as usize >= k.params.len() {
                return Err(format!("parameter {param} does not exist"));
            }
            regs(&[*dst])
        }
        Inst::CvtaGlobal { dst, src } => regs(&[*dst, *src]),
        Inst::Bin { dst, a, b, .. } | Inst::Setp { dst, a, b, .. } => regs(&[*dst]) && ops(&[a, b]),
        Inst::Mad { dst, a, b, c, .. } => regs(&[*dst]) && ops(&[a, b, c]),
        Inst::Un { dst, a, .. } => regs(&[*dst]) && ops(&[a]),
        Inst::Selp { dst, a, b, p, .. } => regs(&[*dst, *p]) && ops(&[a, b]),
        Inst::Cvt { dst, src, .. } => regs(&[*dst]) && ops(&[src]),
        Inst::PackBf16x2 { dst, hi, lo } => regs(&[*dst]) && ops(&[hi, lo]),
        Inst::Pack16 { dst, lo, hi } => regs(&[*dst, *lo, *hi]),
        Inst::Unpack16 { lo, hi, src } => regs(&[*lo, *hi, *src]),
        Inst::Ld { ty, dst, addr, .. } => {
            vector(dst.len(), *ty)?;
            regs(dst) && ops(&[addr])
        }
        Inst::St { ty, src, addr, .. } => {
            vector(src.len(), *ty)?;
            src.iter().all(op_ok) && ops(&[addr])
        }
        Inst::Bar | Inst::CpAsyncCommit | Inst::CpAsyncWait { .. } => true,
        Inst::Shfl { dst, src, lane, .. } => regs(&[*dst, *src]) && ops(&[lane]),
        Inst::Vote { dst, src, .. } => regs(&[*dst, *src]),
        Inst::Atom { dst, addr, val, .. } => dst.iter().all(reg_ok) && ops(&[addr, val]),
        Inst::Mma { d, a, b, c } => regs(d) && regs(a) && regs(b) && regs(c),
        Inst::Ldmatrix { dst, addr, .. } => {
            if ![1, 2, 4].contains(&dst.len()) {
                return Err(format!("ldmatrix of {} matrices (PTX has x1, x2 and x4)", dst.len()));
            }
            regs(dst) && ops(&[addr])
        }
        Inst::CpAsync { dst, src, bytes, src_bytes } => {
            if ![4, 8, 16].contains(bytes) {
                return Err(format!("cp.async of {bytes} bytes (PTX copies 4, 8 or 16)"));
            }
            ops(&[dst, src]) && src_bytes.iter().all(op_ok)
        }
    };
    if ok { Ok(()) } else { Err(missing()) }
}
