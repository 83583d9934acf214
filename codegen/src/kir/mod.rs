//! kir: the kernel IR — a typed SIMT program, close enough to PTX to print directly, structured
//! enough to interpret (the `sim` device) and to analyse.
//!
//! A `Kernel` has parameters, virtual registers of PTX types, static and dynamic shared memory, and a
//! body of structured statements: instructions, `If`, `For` and `While` (no gotos), so divergence is
//! explicit and every barrier's position in the control flow is known. Every thread of a block runs the
//! body; the sim runs them in lock-step with per-thread active masks, the PTX printer emits branches.
//!
//! Semantics follow the PTX ISA instruction by instruction (each variant names its PTX form). Values
//! live in registers as bit patterns; a register's type decides how instructions read it. Addresses
//! are byte addresses: `u64` for global memory (converted from the parameter with `cvta`), `u32` for
//! shared memory.

pub mod builder;
pub mod print;

use serde::{Deserialize, Serialize};

pub use builder::Builder;

/// PTX register types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Ty {
    Pred,
    B16,
    B32,
    B64,
    U16,
    U32,
    U64,
    S16,
    S32,
    S64,
    F16,
    Bf16,
    F16x2,
    Bf16x2,
    F32,
    F64,
}

impl Ty {
    /// The PTX spelling (`.u32` without the dot).
    pub fn name(self) -> &'static str {
        match self {
            Ty::Pred => "pred",
            Ty::B16 => "b16",
            Ty::B32 => "b32",
            Ty::B64 => "b64",
            Ty::U16 => "u16",
            Ty::U32 => "u32",
            Ty::U64 => "u64",
            Ty::S16 => "s16",
            Ty::S32 => "s32",
            Ty::S64 => "s64",
            Ty::F16 => "f16",
            Ty::Bf16 => "bf16",
            Ty::F16x2 => "f16x2",
            Ty::Bf16x2 => "bf16x2",
            Ty::F32 => "f32",
            Ty::F64 => "f64",
        }
    }

    /// Size in bytes (a predicate counts as 1).
    pub fn bytes(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 2,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 => 4,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::Bf16 | Ty::F16x2 | Ty::Bf16x2 | Ty::F32 | Ty::F64)
    }

    pub fn is_signed(self) -> bool {
        matches!(self, Ty::S16 | Ty::S32 | Ty::S64)
    }
}

/// A virtual register; its type is in `Kernel::regs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reg(pub u32);

/// Special registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Special {
    TidX,
    TidY,
    TidZ,
    NtidX,
    NtidY,
    NtidZ,
    CtaidX,
    CtaidY,
    CtaidZ,
    NctaidX,
    NctaidY,
    NctaidZ,
    LaneId,
    /// The warp of the thread within its block (`tid.x / 32` for 1-D blocks; not `%warpid`).
    WarpInBlock,
}

impl Special {
    pub fn name(self) -> &'static str {
        match self {
            Special::TidX => "tid.x",
            Special::TidY => "tid.y",
            Special::TidZ => "tid.z",
            Special::NtidX => "ntid.x",
            Special::NtidY => "ntid.y",
            Special::NtidZ => "ntid.z",
            Special::CtaidX => "ctaid.x",
            Special::CtaidY => "ctaid.y",
            Special::CtaidZ => "ctaid.z",
            Special::NctaidX => "nctaid.x",
            Special::NctaidY => "nctaid.y",
            Special::NctaidZ => "nctaid.z",
            Special::LaneId => "laneid",
            Special::WarpInBlock => "warp",
        }
    }
}

/// An instruction operand. Equality compares f32 immediates by bit pattern, as they are printed: a
/// NaN immediate equals itself and `-0.0` differs from `0.0`, so a kernel always equals its copy.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum Operand {
    Reg(Reg),
    /// An integer immediate (also used for bit patterns).
    Imm(i64),
    /// An f32 immediate (printed as its bit pattern, `0f3F800000`).
    F32(f32),
    /// The shared-memory address of a static shared array.
    Shared(u32),
    /// The shared-memory address of the dynamic shared memory.
    DynShared,
}

impl PartialEq for Operand {
    fn eq(&self, other: &Operand) -> bool {
        match (self, other) {
            (Operand::Reg(a), Operand::Reg(b)) => a == b,
            (Operand::Imm(a), Operand::Imm(b)) => a == b,
            (Operand::F32(a), Operand::F32(b)) => a.to_bits() == b.to_bits(),
            (Operand::Shared(a), Operand::Shared(b)) => a == b,
            (Operand::DynShared, Operand::DynShared) => true,
            _ => false,
        }
    }
}

impl Eq for Operand {}

impl From<Reg> for Operand {
    fn from(r: Reg) -> Operand {
        Operand::Reg(r)
    }
}

/// Memory spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Space {
    Global,
    Shared,
}

/// Cache hints on global loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cache {
    /// Default.
    None,
    /// `ld.global.nc`: read-only data, non-coherent cache.
    ReadOnly,
    /// `ld.global.nc.L1::no_allocate`: streamed once (weights in decode).
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinOp {
    Add,
    Sub,
    /// `mul.lo` for integers, `mul.rn` for floats.
    Mul,
    /// `mul.hi` (integers).
    MulHi,
    /// `mul.wide`: 32-bit operands, 64-bit result (`ty` is the source type).
    MulWide,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnOp {
    Neg,
    Abs,
    Not,
    Sqrt,
    /// `rsqrt.approx.ftz.f32`.
    RsqrtApprox,
    /// `rcp.approx.ftz.f32`.
    RcpApprox,
    /// `rcp.rn.f32` (exact).
    Rcp,
    /// `ex2.approx.ftz.f32`: 2^x.
    Ex2Approx,
    /// `lg2.approx.ftz.f32`: log2 x.
    Lg2Approx,
    /// `tanh.approx.f32`.
    TanhApprox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Rounding of conversions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Round {
    /// Round to nearest even (`.rn`), float results.
    Nearest,
    /// Round toward zero to an integer (`.rzi`), float → integer.
    ZeroInt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShflMode {
    Bfly,
    Down,
    Up,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VoteMode {
    All,
    Any,
    Ballot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
}

/// One instruction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Inst {
    /// `mov.ty dst, src`.
    Mov { ty: Ty, dst: Reg, src: Operand },
    /// `mov.u32 dst, %special`.
    Special { dst: Reg, reg: Special },
    /// `ld.param.ty dst, [param]`.
    LdParam { ty: Ty, dst: Reg, param: u32 },
    /// `cvta.to.global.u64 dst, src`: a generic pointer (kernel parameter) to a global address.
    CvtaGlobal { dst: Reg, src: Reg },
    /// `op.ty dst, a, b` (see `BinOp`).
    Bin { op: BinOp, ty: Ty, dst: Reg, a: Operand, b: Operand },
    /// `fma.rn.ty` (floats) or `mad.lo.ty` (integers): `dst = a * b + c`.
    Mad { ty: Ty, dst: Reg, a: Operand, b: Operand, c: Operand },
    /// `op.ty dst, a` (see `UnOp`).
    Un { op: UnOp, ty: Ty, dst: Reg, a: Operand },
    /// `setp.cmp.ty dst, a, b` (`dst` a predicate).
    Setp { cmp: Cmp, ty: Ty, dst: Reg, a: Operand, b: Operand },
    /// `selp.ty dst, a, b, p`: `p ? a : b`.
    Selp { ty: Ty, dst: Reg, a: Operand, b: Operand, p: Reg },
    /// `cvt[.rnd].dst_ty.src_ty dst, src`.
    Cvt { dst_ty: Ty, src_ty: Ty, rnd: Option<Round>, dst: Reg, src: Operand },
    /// `cvt.rn.bf16x2.f32 dst, hi, lo`: two f32 into one bf16x2 (`hi` in the upper half).
    PackBf16x2 { dst: Reg, hi: Operand, lo: Operand },
    /// `mov.b32 dst, {lo, hi}`: two 16-bit registers into one 32-bit register.
    Pack16 { dst: Reg, lo: Reg, hi: Reg },
    /// `mov.b32 {lo, hi}, src`: the halves of a 32-bit register.
    Unpack16 { lo: Reg, hi: Reg, src: Reg },
    /// `ld.space[.cache][.vN].ty {dst..}, [addr + offset]` (`dst.len()` ∈ {1, 2, 4}; vector accesses
    /// must be aligned to their whole size).
    Ld { space: Space, ty: Ty, cache: Cache, dst: Vec<Reg>, addr: Operand, offset: i64 },
    /// `st.space[.vN].ty [addr + offset], {src..}`.
    St { space: Space, ty: Ty, src: Vec<Operand>, addr: Operand, offset: i64 },
    /// `bar.sync 0`: every thread of the block waits here.
    Bar,
    /// `shfl.sync.mode.b32 dst, src, lane, clamp, 0xffffffff` (whole warp).
    Shfl { mode: ShflMode, dst: Reg, src: Reg, lane: Operand, clamp: u32 },
    /// `vote.sync.mode.pred dst, p, 0xffffffff` (`Ballot`: `vote.sync.ballot.b32`, dst a b32).
    Vote { mode: VoteMode, dst: Reg, src: Reg },
    /// `atom.space.op.ty dst, [addr], val`, or `red.space.op.ty [addr], val` without `dst`.
    Atom { op: AtomOp, space: Space, ty: Ty, dst: Option<Reg>, addr: Operand, val: Operand },
    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d}, {a}, {b}, {c}` (whole warp; fragment
    /// layouts as in the PTX ISA, see `kernels::gemm`).
    Mma { d: [Reg; 4], a: [Reg; 4], b: [Reg; 2], c: [Reg; 4] },
    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 {dst..}, [addr]` (whole warp; `dst.len()` = N).
    Ldmatrix { trans: bool, dst: Vec<Reg>, addr: Operand },
    /// `cp.async.cg.shared.global [dst], [src], 16, src_bytes` (`cg` for 16 bytes, `ca` otherwise):
    /// copies `bytes`, zero-filling past `src_bytes`.
    CpAsync { dst: Operand, src: Operand, bytes: u32, src_bytes: Option<Operand> },
    /// `cp.async.commit_group`.
    CpAsyncCommit,
    /// `cp.async.wait_group n`: wait until at most `n` committed groups are pending.
    CpAsyncWait { n: u32 },
}

/// A statement: an instruction or structured control flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Stmt {
    Inst(Inst),
    /// A comment in the output (e.g. the fused op a section computes).
    Comment(String),
    /// `if cond (or !cond) { then } else { else_ }`. `uniform`: the condition is the same for every
    /// thread of the block (checked by the sim; lets PTX use `bra.uni`).
    If {
        cond: Reg,
        negate: bool,
        then: Vec<Stmt>,
        else_: Vec<Stmt>,
        uniform: bool,
    },
    /// `for var = start; var < end; var += step { body }` on integer `var` of type `ty`.
    For {
        ty: Ty,
        var: Reg,
        start: Operand,
        end: Operand,
        step: Operand,
        body: Vec<Stmt>,
        uniform: bool,
    },
    /// `loop { head; if !cond break; body }`.
    While {
        head: Vec<Stmt>,
        cond: Reg,
        body: Vec<Stmt>,
        uniform: bool,
    },
}

/// Types of kernel parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamTy {
    /// A global-memory pointer (`.u64`).
    Ptr,
    U32,
    S32,
    U64,
    F32,
}

impl ParamTy {
    pub fn ty(self) -> Ty {
        match self {
            ParamTy::Ptr | ParamTy::U64 => Ty::U64,
            ParamTy::U32 => Ty::U32,
            ParamTy::S32 => Ty::S32,
            ParamTy::F32 => Ty::F32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub ty: ParamTy,
}

/// A static shared-memory array.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedArray {
    pub name: String,
    pub bytes: u32,
    pub align: u32,
}

/// A kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub name: String,
    /// Lines describing the kernel (what it computes, its tiling), printed as comments.
    pub doc: Vec<String>,
    pub params: Vec<Param>,
    /// The type of each virtual register, by `Reg` index.
    pub regs: Vec<Ty>,
    pub shared: Vec<SharedArray>,
    /// Whether the kernel uses dynamic shared memory (sized at launch).
    pub dynamic_shared: bool,
    /// The block size the kernel is written for (`.maxntid`), if fixed.
    pub block: Option<[u32; 3]>,
    pub body: Vec<Stmt>,
}

impl Kernel {
    /// The type of a register.
    pub fn ty(&self, r: Reg) -> Ty {
        self.regs.get(r.0 as usize).copied().unwrap_or(Ty::B32)
    }

    /// Visits every instruction, depth first, in program order.
    pub fn visit(&self, f: &mut impl FnMut(&Inst)) {
        fn walk(stmts: &[Stmt], f: &mut impl FnMut(&Inst)) {
            for s in stmts {
                match s {
                    Stmt::Inst(i) => f(i),
                    Stmt::Comment(_) => {}
                    Stmt::If { then, else_, .. } => {
                        walk(then, f);
                        walk(else_, f);
                    }
                    Stmt::For { body, .. } => walk(body, f),
                    Stmt::While { head, body, .. } => {
                        walk(head, f);
                        walk(body, f);
                    }
                }
            }
        }
        walk(&self.body, f);
    }

    /// Static shared memory in bytes: the arrays laid out in declaration order, each at its
    /// alignment (the layout the `sim` device uses; ptxas may pack them tighter, never looser).
    pub fn static_shared_bytes(&self) -> u32 {
        self.shared.iter().fold(0, |end, s| end.next_multiple_of(s.align.max(1)) + s.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::{Kernel, Operand, SharedArray};

    #[test]
    fn f32_immediates_compare_by_bits() {
        assert_eq!(Operand::F32(f32::NAN), Operand::F32(f32::NAN));
        assert_ne!(Operand::F32(0.0), Operand::F32(-0.0));
        assert_eq!(Operand::F32(1.5), Operand::F32(1.5));
        assert_ne!(Operand::F32(1.0), Operand::Imm(1.0f32.to_bits() as i64));
    }

    #[test]
    fn static_shared_bytes_pads_each_array_to_its_alignment() {
        let array = |bytes, align| SharedArray { name: String::new(), bytes, align };
        let k = Kernel {
            name: "k".into(),
            doc: Vec::new(),
            params: Vec::new(),
            regs: Vec::new(),
            shared: vec![array(3, 1), array(4, 16), array(2, 2)],
            dynamic_shared: false,
            block: None,
            body: Vec::new(),
        };
        // 0..3, pad to 16, 16..20, 20..22.
        assert_eq!(k.static_shared_bytes(), 22);
    }
}
