//! error: what the sim reports when a kernel does something the GPU would not do correctly — every
//! error names the kernel, the block, the thread (when one thread is to blame) and the instruction.

use std::fmt;

use flashc_codegen::kir::Space;

/// How a shared-memory byte was accessed, for race reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Atomic,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Atomic => "atomic",
        }
    }
}

/// The kind of a sim error.
#[derive(Clone, Debug, PartialEq)]
pub enum SimErrorKind {
    /// The launch is invalid: wrong arguments, a block or grid size out of range, too much shared
    /// memory, a block size other than the kernel's fixed one.
    Launch(String),
    /// The kernel is malformed (a register, parameter or shared array that does not exist, a vector
    /// width PTX does not have).
    InvalidKernel(String),
    /// An instruction applied to a type it is not defined for (e.g. `rem.f32`).
    Unsupported(String),
    /// An access outside every global allocation, or outside the block's shared memory.
    OutOfBounds { space: Space, addr: u64, bytes: u32 },
    /// An access not aligned to its size (the whole vector for vector accesses).
    Misaligned { space: Space, addr: u64, align: u32 },
    /// A read of a shared-memory byte no thread of the block has written.
    UninitializedSharedRead { addr: u32 },
    /// A read of a register the thread has never written.
    UninitializedRegister { reg: String },
    /// A read or write of shared memory that an incomplete `cp.async` of `owner` will still write.
    PendingAsyncCopy { addr: u32, owner: [u32; 3] },
    /// Two threads touched the same shared-memory byte between two barriers, at least one of them
    /// writing (atomics only race with plain accesses).
    Race { addr: u32, other: [u32; 3], first: Access, second: Access },
    /// A global-memory race: the byte was written by `other_thread` of `other_block` (another block,
    /// or another thread of this block with no barrier between) and is now read or written.
    GlobalRace { addr: u64, other_block: [u32; 3], other_thread: [u32; 3], second: Access },
    /// An `ld.global.nc` of a byte this kernel wrote (the non-coherent cache may return stale data).
    NonCoherentRead { addr: u64 },
    /// A `bar.sync` reached by only part of the block; `thread` (the error's) is one that did not
    /// arrive.
    BarrierDivergence { arrived: u32, expected: u32 },
    /// A warp-collective instruction (`shfl`, `vote`, `mma`, `ldmatrix`) executed while lanes of the
    /// warp are inactive (or do not exist). `active` has bit l set for active lane l.
    InactiveLanes { warp: u32, active: u32 },
    /// A `uniform` `If`/`For`/`While` whose condition differs across the active threads.
    NonUniform,
    /// Integer division or remainder by zero.
    DivisionByZero,
}

impl fmt::Display for SimErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = |s: &Space| match s {
            Space::Global => "global",
            Space::Shared => "shared",
        };
        match self {
            SimErrorKind::Launch(m) => write!(f, "invalid launch: {m}"),
            SimErrorKind::InvalidKernel(m) => write!(f, "invalid kernel: {m}"),
            SimErrorKind::Unsupported(m) => write!(f, "unsupported: {m}"),
            SimErrorKind::OutOfBounds { space: s, addr, bytes } => {
                write!(f, "out-of-bounds {} access of {bytes} bytes at {addr:#x}", space(s))
            }
            SimErrorKind::Misaligned { space: s, addr, align } => {
                write!(f, "misaligned {} access at {addr:#x} (needs {align}-byte alignment)", space(s))
            }
            SimErrorKind::UninitializedSharedRead { addr } => {
                write!(f, "read of uninitialised shared memory at {addr:#x} (no thread of the block wrote it)")
            }
            SimErrorKind::UninitializedRegister { reg } => write!(f, "read of register {reg} before any write"),
            SimErrorKind::PendingAsyncCopy { addr, owner } => write!(
                f,
                "access to shared memory at {addr:#x} while a cp.async of thread {} still writes it (wait for its group first)",
                xyz(*owner)
            ),
            SimErrorKind::Race { addr, other, first, second } => write!(
                f,
                "shared-memory race at {addr:#x}: {} by thread {} and {} by this thread without a barrier between",
                first.name(),
                xyz(*other),
                second.name()
            ),
            SimErrorKind::GlobalRace { addr, other_block, other_thread, second } => write!(
                f,
                "global-memory race at {addr:#x}: written by block {} thread {}, then {} by this thread (blocks run in any order; threads of a block need a barrier between)",
                xyz(*other_block),
                xyz(*other_thread),
                second.name()
            ),
            SimErrorKind::NonCoherentRead { addr } => write!(
                f,
                "ld.global.nc of {addr:#x}, which this kernel wrote (read-only loads must not see the kernel's writes)"
            ),
            SimErrorKind::BarrierDivergence { arrived, expected } => write!(
                f,
                "barrier divergence: bar.sync reached by {arrived} of {expected} threads (this thread did not arrive)"
            ),
            SimErrorKind::InactiveLanes { warp, active } => {
                write!(f, "warp-collective instruction in warp {warp} with inactive lanes (active mask {active:#010x})")
            }
            SimErrorKind::NonUniform => {
                write!(
                    f,
                    "the condition of a uniform statement differs across the block (this thread differs from the first)"
                )
            }
            SimErrorKind::DivisionByZero => write!(f, "integer division by zero"),
        }
    }
}

/// `(x,y,z)`.
pub(crate) fn xyz(t: [u32; 3]) -> String {
    format!("({},{},{})", t[0], t[1], t[2])
}

/// An error of one kernel launch on the sim.
#[derive(Clone, Debug, PartialEq)]
pub struct SimError {
    /// The kernel's name.
    pub kernel: String,
    pub kind: SimErrorKind,
    /// The block (`ctaid`) where it happened.
    pub block: [u32; 3],
    /// The thread (`tid`) to blame, if one is.
    pub thread: Option<[u32; 3]>,
    /// The offending instruction or statement, printed PTX-style (empty for launch errors).
    pub inst: String,
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {}: block {}", self.kernel, xyz(self.block))?;
        if let Some(t) = self.thread {
            write!(f, ", thread {}", xyz(t))?;
        }
        write!(f, ": {}", self.kind)?;
        if !self.inst.is_empty() {
            write!(f, "\n  at: {}", self.inst)?;
        }
        Ok(())
    }
}

impl std::error::Error for SimError {}
