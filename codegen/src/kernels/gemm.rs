//! gemm: the prefill / training GEMM, `C[M, N] = A[M, K] · W[N, K]ᵀ` in bf16 with f32 accumulation
//! on tensor cores (`mma.sync.m16n8k16`), with a fused RMSNorm prologue and fused epilogues.
//!
//! This is `MatMul { trans_a: false, trans_b: true }` with a rank-2 weight in PyTorch's `[out, in]`
//! layout, the form of every projection; A and the output are row-major with K and N contiguous.
//!
//! # Tiling
//!
//! * **Block tile 64 × 64 × 32** (`BM × BN × BK`), 128 threads = 4 warps in a 2 × 2 grid; each warp
//!   owns a 32 × 32 sub-tile = 2 (m16) × 4 (n8) mma tiles, 32 f32 accumulators per thread. Each 32-wide
//!   k-tile is two k16 steps of 2 + 2 `ldmatrix.x4` and 8 `mma.sync` per warp.
//! * **Shared memory**: `stages` (2..=4, default 3) buffers of an A tile `[64][32]` and a W tile
//!   `[64][32]` bf16 (4 KiB each, rows of 64 bytes = four 16-byte chunks), filled with
//!   `cp.async.cg` 16-byte copies (each of the 128 threads copies two chunks of each tile per stage).
//!   Chunk `c` of row `r` lives at `r·64 + 16·(c ^ ((r >> 1) & 3))`: the 64-byte XOR swizzle (bits
//!   4–5 of the address XOR bits 7–8), so the eight 16-byte rows an `ldmatrix` phase reads fall in
//!   eight different bank groups. Static shared memory: `max(stages · 8 KiB, 18 KiB)` (the epilogue's
//!   C tile reuses it), + 256 bytes of row factors with the RMSNorm prologue: 24 KiB at 3 stages.
//! * **Pipeline**: the standard multi-stage `cp.async` loop: the prologue issues and commits stages
//!   `0..S-1`; iteration `kt` waits for `S-2` pending groups, `bar.sync`s, issues and commits k-tile
//!   `kt + S - 1` into the buffer consumed in iteration `kt - 1`, then computes on buffer `kt % S`
//!   (groups are committed even when empty, so the wait count stays fixed).
//! * **Operands**: A fragments come from `ldmatrix.x4` on the A tile (lane `l` points at row `l % 16`,
//!   column block `8·(l / 16)`: the four registers are a0..a3 of the m16n8k16 A layout). W is `[N, K]`,
//!   K contiguous, which is the "col" layout of the B operand: a non-transposed `ldmatrix.x4` over W
//!   rows `n` (lanes `8i..8i+7` address n rows `8·(i / 2) + 0..8`, k block `8·(i % 2)`) yields b0, b1 of
//!   two adjacent n8 tiles.
//! * **Ragged sizes**: M, N and K are runtime `u32` parameters. Out-of-range 16-byte chunks are copied
//!   with `src-size 0` (zero fill) from a clamped in-range address, so the products of the padding are
//!   zero; stores are masked per element pair. **K must be a multiple of 8** (a 16-byte chunk is
//!   either all in range or all out) and **N even** (bf16 pairs are stored as one `b32`); `check_sizes`
//!   checks both on the host. `M·K`, `N·K` and `M·N` must fit in `u32`.
//! * **Grid**: x = blocks over N (N must be constant in the spec), y over M tiles; each block loops
//!   over the M tiles `ctaid.y, ctaid.y + nctaid.y, ...`, so any grid y works (for a symbolic M the
//!   launch rule uses a constant y sized for ~`TARGET_BLOCKS` blocks).
//!
//! # Prologue: RMSNorm
//!
//! `A' = A · rstd[row] · g[k]` with `rstd = 1 / sqrt(mean(A[row]²) + eps)`, fully fused (no pre-pass).
//! After the wait for a stage, each thread scales the two A chunks it copied itself (its own copies
//! are visible to it before any barrier) by `g` in place, rounding to bf16 like the unfused norm's
//! output, and adds the squares of the raw values to its rows' sums; the barrier that publishes the
//! stage follows. The thread's 16 bytes of `g` come from a read-only global load issued before the
//! wait (a shared copy made by one thread would need another barrier). After the k loop the four
//! threads of a row (lanes `4q..4q+3`) add their sums with two shuffles, `rstd` of the 64 tile rows
//! goes through shared memory, and every output of a row is scaled by it.
//!
//! # Epilogues
//!
//! After the k loop the warps write their accumulators (f32) to a `[64][72]` tile in shared memory
//! (reusing the pipeline buffers; the 72-float row stride keeps the 8-byte stores of a half warp on
//! distinct banks), and each thread then finishes units of 8 tile columns of one row: consecutive
//! threads cover consecutive columns of a row, the accumulators are dead (no register pressure from
//! the epilogue math) and stores are masked `b32` pairs of bf16.
//! * `None`: `C = A·Wᵀ`; `Bias`: `+ bias[n]`; `Residual`: `+ residual[m, n]` (`out` may alias
//!   `residual`: every element is read, then written, by the same thread); `Relu2`: `max(C, 0)²`.
//! * `Swiglu`: W is the fused `[gate; up]` weight (`N` rows, gate rows `0..N/2`); the output is
//!   `[M, N/2]` with `out[:, j] = silu(C[:, j]) · C[:, j + N/2]` (N/2 must be even). A block owns 32
//!   output columns: its W tile row `32·w + 16·h + q` is gate (`h = 0`) or up (`h = 1`) row of output
//!   column `32·block + 16·w + q`, so both factors of an output are in the block's C tile.
//! * `Rope`: rotate-half RoPE on the column range `[lo, hi)` (whole heads of `head_dim`, e.g. the q
//!   and k parts of a fused QKV product), optionally after a bias. Blocks `0..rope_blocks` own 32
//!   rotation pairs each, laid out like SwiGLU (first halves and their partners `+ head_dim/2`); the
//!   other blocks cover the remaining columns plainly. The position of row `r` is
//!   `start[r / T] + r % T` (`tokens` = T parameter); the angle is `pos · inv_freq[i]` in f32
//!   (`inv_freq` an f32 buffer of `head_dim/2`, as the cpu reference computes it) and its sine and
//!   cosine are evaluated with a 3-part Cody–Waite reduction and the Cephes polynomials (~1 ulp).
//!
//! # Parameters (in order)
//!
//! `a, w, out, [norm_w], [bias], [residual], [start, inv_freq], m, n, k, [tokens]` — the bracketed
//! ones only when the prologue / epilogue uses them; `n` is the number of rows of W (the product's
//! width, twice the output width for SwiGLU).

use flashc_compiler::gir::{DType, Dim};
use flashc_compiler::schedule::BufferId;

use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Kernel, Operand, ParamTy, Reg, ShflMode, Space, Special, Ty, UnOp};

/// Rows of A (and C) per block tile.
pub const BM: u32 = 64;
/// Columns of C (rows of W) per block tile.
pub const BN: u32 = 64;
/// K per pipeline stage.
pub const BK: u32 = 32;
/// Threads per block (4 warps).
pub const THREADS: u32 = 128;
/// Blocks the launch rule aims for when M is only known at run time (about 4 waves of 132 SMs).
pub const TARGET_BLOCKS: u32 = 528;

const ROW_BYTES: u32 = BK * 2;
const TILE_BYTES: u32 = BM * ROW_BYTES;
const STAGE_BYTES: u32 = 2 * TILE_BYTES;
/// Row stride (f32) of the epilogue's C tile: 72 keeps the 8-byte fragment stores of a half warp on
/// distinct banks.
const C_STRIDE: u32 = BN + 8;
const C_TILE_BYTES: u32 = BM * C_STRIDE * 4;
/// Rotation pairs (or SwiGLU output columns) per paired block.
const PAIRS: u32 = BN / 2;

/// What is applied to A before the product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GemmPrologue {
    None,
    /// `A · rstd[row] · norm_w[k]`, `rstd = 1 / sqrt(mean(A[row]²) + eps)` (see the module docs).
    RmsNorm {
        eps: f32,
    },
}

/// Rotate-half RoPE on the output columns `[lo, hi)`, whole heads of `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeCols {
    pub head_dim: u32,
    pub lo: u32,
    pub hi: u32,
    /// Add `bias[n]` (every column) before rotating (Qwen2-style QKV bias).
    pub bias: bool,
}

/// What is applied to the product before it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmEpilogue {
    None,
    Bias,
    /// `residual + A·Wᵀ`.
    Residual,
    /// `silu(C[:, j]) · C[:, j + N/2]` over the fused gate|up product; output width N/2.
    Swiglu,
    /// `max(C, 0)²`.
    Relu2,
    Rope(RopeCols),
}

/// The program buffers bound to the kernel's pointer parameters (those the prologue and epilogue do
/// not use are ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GemmOperands {
    pub a: BufferId,
    pub w: BufferId,
    pub out: BufferId,
    pub norm_w: Option<BufferId>,
    pub bias: Option<BufferId>,
    pub residual: Option<BufferId>,
    pub start: Option<BufferId>,
    pub inv_freq: Option<BufferId>,
}

impl GemmOperands {
    /// Buffers numbered in parameter order: a 0, w 1, out 2, norm_w 3, bias 4, residual 5, start 6,
    /// inv_freq 7 (tests and examples).
    pub fn numbered() -> GemmOperands {
        GemmOperands {
            a: BufferId(0),
            w: BufferId(1),
            out: BufferId(2),
            norm_w: Some(BufferId(3)),
            bias: Some(BufferId(4)),
            residual: Some(BufferId(5)),
            start: Some(BufferId(6)),
            inv_freq: Some(BufferId(7)),
        }
    }
}

/// A GEMM to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmSpec {
    /// The kernel's name.
    pub name: String,
    /// Storage type of A, W, the output and the bf16 side operands (only `Bf16`).
    pub dtype: DType,
    pub prologue: GemmPrologue,
    pub epilogue: GemmEpilogue,
    /// `cp.async` pipeline depth, 2..=4.
    pub stages: u32,
    /// Rows of A.
    pub m: Dim,
    /// Rows of W (constant).
    pub n: Dim,
    /// The reduction length (a multiple of 8).
    pub k: Dim,
    /// Rows per sequence (RoPE positions), required by `Rope`.
    pub tokens: Option<Dim>,
    pub operands: GemmOperands,
}

impl GemmSpec {
    /// A plain bf16 GEMM with 3 stages and numbered operands.
    pub fn new(name: impl Into<String>, m: Dim, n: Dim, k: Dim) -> GemmSpec {
        GemmSpec {
            name: name.into(),
            dtype: DType::Bf16,
            prologue: GemmPrologue::None,
            epilogue: GemmEpilogue::None,
            stages: 3,
            m,
            n,
            k,
            tokens: None,
            operands: GemmOperands::numbered(),
        }
    }
}

/// Generates the GEMM kernel and its launch rule.
pub fn gemm(spec: &GemmSpec) -> Result<Generated, CodegenError> {
    validate(spec)?;
    let kernel = build(spec);
    let launch = launch_rule(spec)?;
    Ok(Generated { kernel, launch })
}

/// Checks runtime sizes against the kernel's assumptions (K a multiple of 8, N even, N/2 even for
/// SwiGLU, the RoPE range inside N, products within `u32`).
pub fn check_sizes(spec: &GemmSpec, m: u32, n: u32, k: u32) -> Result<(), CodegenError> {
    let shape = |s: String| Err(CodegenError::Shape(format!("{}: {s}", spec.name)));
    if !k.is_multiple_of(8) {
        return shape(format!("K = {k} is not a multiple of 8"));
    }
    if !n.is_multiple_of(2) {
        return shape(format!("N = {n} is odd"));
    }
    if spec.epilogue == GemmEpilogue::Swiglu && !n.is_multiple_of(4) {
        return shape(format!("SwiGLU output width N/2 = {} is odd", n / 2));
    }
    if let GemmEpilogue::Rope(r) = spec.epilogue
        && r.hi > n
    {
        return shape(format!("RoPE columns end at {} beyond N = {n}", r.hi));
    }
    for (x, y, what) in [(m, k, "M·K"), (n, k, "N·K"), (m, n, "M·N")] {
        if u64::from(x) * u64::from(y) > u64::from(u32::MAX) {
            return shape(format!("{what} overflows u32"));
        }
    }
    Ok(())
}

fn blocks_x(epi: GemmEpilogue, n: u32) -> u32 {
    match epi {
        GemmEpilogue::Swiglu => (n / 2).div_ceil(PAIRS),
        GemmEpilogue::Rope(r) => rope_blocks(r) + n.saturating_sub(r.hi - r.lo).div_ceil(BN),
        _ => n.div_ceil(BN),
    }
}

fn rope_blocks(r: RopeCols) -> u32 {
    ((r.hi - r.lo) / 2).div_ceil(PAIRS)
}

fn validate(spec: &GemmSpec) -> Result<(), CodegenError> {
    let shape = |s: String| Err(CodegenError::Shape(format!("{}: {s}", spec.name)));
    if spec.dtype != DType::Bf16 {
        return Err(CodegenError::Unsupported(format!("{} GEMM in {}", spec.name, spec.dtype.name())));
    }
    if !(2..=4).contains(&spec.stages) {
        return shape(format!("{} pipeline stages (2..=4)", spec.stages));
    }
    if let GemmEpilogue::Rope(r) = spec.epilogue {
        if r.head_dim == 0 || r.head_dim % 4 != 0 {
            return shape(format!("RoPE head_dim {} is not a positive multiple of 4", r.head_dim));
        }
        if r.lo % 2 != 0 || r.hi < r.lo || (r.hi - r.lo) % r.head_dim != 0 {
            return shape(format!("RoPE columns {}..{} are not whole heads at an even start", r.lo, r.hi));
        }
        if spec.tokens.is_none() {
            return shape("RoPE needs the tokens per sequence".to_string());
        }
    }
    // N (the weight's rows) fixes the grid, so it must be known; M and K are checked when they are.
    let size = |d: &Dim| {
        d.as_const()
            .map(|x| u32::try_from(x).map_err(|_| CodegenError::Shape(format!("{}: size {x}", spec.name))))
            .transpose()
    };
    let Some(n) = size(&spec.n)? else {
        return shape(format!("N = {} is not a constant", spec.n));
    };
    check_sizes(spec, size(&spec.m)?.unwrap_or(0), n, size(&spec.k)?.unwrap_or(0))
}

fn launch_rule(spec: &GemmSpec) -> Result<LaunchRule, CodegenError> {
    let n = spec
        .n
        .as_const()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| CodegenError::Shape(format!("{}: N = {} is not a constant", spec.name, spec.n)))?;
    let gx = blocks_x(spec.epilogue, n).max(1);
    let gy = match spec.m.as_const() {
        Some(m) => Dim::constant(((m.max(1) + i64::from(BM) - 1) / i64::from(BM)).max(1)),
        None => Dim::constant(i64::from(TARGET_BLOCKS.div_ceil(gx).clamp(1, 65535))),
    };
    let need = |b: Option<BufferId>, what: &str| {
        b.map(ArgRule::Buffer).ok_or_else(|| CodegenError::Shape(format!("{}: no buffer for `{what}`", spec.name)))
    };
    let o = &spec.operands;
    let mut args = vec![ArgRule::Buffer(o.a), ArgRule::Buffer(o.w), ArgRule::Buffer(o.out)];
    if let GemmPrologue::RmsNorm { .. } = spec.prologue {
        args.push(need(o.norm_w, "norm_w")?);
    }
    if uses_bias(spec.epilogue) {
        args.push(need(o.bias, "bias")?);
    }
    if spec.epilogue == GemmEpilogue::Residual {
        args.push(need(o.residual, "residual")?);
    }
    if let GemmEpilogue::Rope(_) = spec.epilogue {
        args.push(need(o.start, "start")?);
        args.push(need(o.inv_freq, "inv_freq")?);
    }
    args.extend([ArgRule::Size(spec.m.clone()), ArgRule::Size(spec.n.clone()), ArgRule::Size(spec.k.clone())]);
    if let GemmEpilogue::Rope(_) = spec.epilogue {
        let t = spec.tokens.clone().ok_or_else(|| CodegenError::Shape(format!("{}: no tokens", spec.name)))?;
        args.push(ArgRule::Size(t));
    }
    Ok(LaunchRule {
        grid: [Dim::constant(i64::from(gx)), gy, Dim::constant(1)],
        block: [THREADS, 1, 1],
        dynamic_shared: 0,
        args,
    })
}

fn uses_bias(e: GemmEpilogue) -> bool {
    match e {
        GemmEpilogue::Bias => true,
        GemmEpilogue::Rope(r) => r.bias,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------- helpers
// Shared with `gemv`.

/// The two bf16 halves of a `b32` as f32 (exact: the bits shifted into the high half).
pub(crate) fn unpack_bf16x2(b: &mut Builder, x: Reg) -> (Reg, Reg) {
    let lo = b.bin(BinOp::Shl, Ty::B32, x.into(), 16u32.into());
    let hi = b.bin(BinOp::And, Ty::B32, x.into(), Operand::Imm(0xFFFF_0000));
    (as_f32(b, lo), as_f32(b, hi))
}

/// Reinterprets a `b32` register as f32.
pub(crate) fn as_f32(b: &mut Builder, x: Reg) -> Reg {
    let f = b.reg(Ty::F32);
    b.inst(Inst::Mov { ty: Ty::B32, dst: f, src: x.into() });
    f
}

/// `x · sigmoid(x) = x / (1 + 2^(−x·log2 e))`.
pub(crate) fn silu(b: &mut Builder, x: Reg) -> Reg {
    let t = b.mul(Ty::F32, x.into(), (-std::f32::consts::LOG2_E).into());
    let e = b.un(UnOp::Ex2Approx, Ty::F32, t.into());
    let d = b.add(Ty::F32, e.into(), 1.0f32.into());
    let r = b.un(UnOp::Rcp, Ty::F32, d.into());
    b.mul(Ty::F32, x.into(), r.into())
}

/// `max(x, 0)²`.
pub(crate) fn relu2(b: &mut Builder, x: Reg) -> Reg {
    let m = b.bin(BinOp::Max, Ty::F32, x.into(), 0.0f32.into());
    b.mul(Ty::F32, m.into(), m.into())
}

/// `1 / sqrt(sum_sq / k + eps)` (exact square root and reciprocal, like the reference).
pub(crate) fn rstd(b: &mut Builder, sum_sq: Reg, inv_k: Reg, eps: f32) -> Reg {
    let ms = b.mad(Ty::F32, sum_sq.into(), inv_k.into(), eps.into());
    let s = b.un(UnOp::Sqrt, Ty::F32, ms.into());
    b.un(UnOp::Rcp, Ty::F32, s.into())
}

/// `and` of two predicates.
pub(crate) fn and_p(b: &mut Builder, p: Reg, q: Reg) -> Reg {
    b.bin(BinOp::And, Ty::Pred, p.into(), q.into())
}

/// `lt.u32`.
pub(crate) fn lt(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.setp(Cmp::Lt, Ty::U32, x, y)
}

/// `x + y` in u32.
pub(crate) fn addu(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.add(Ty::U32, x, y)
}

/// `x · y + z` in u32.
pub(crate) fn madu(b: &mut Builder, x: Operand, y: Operand, z: Operand) -> Reg {
    b.mad(Ty::U32, x, y, z)
}

/// `base + idx · bytes` as a global address.
pub(crate) fn gaddr(b: &mut Builder, base: Reg, idx: Reg, bytes: u32) -> Reg {
    b.index(base, idx, bytes)
}

/// Sine and cosine of `x ≥ 0` (f32): `q = round(x · 2/π)`, `r = x − q·π/2` in three parts (exact for
/// q < 2¹⁶), Cephes single-precision polynomials on `|r| ≤ π/4`, the quadrant from `q mod 4`.
pub(crate) fn sincos(b: &mut Builder, x: Reg) -> (Reg, Reg) {
    let qf = b.mad(Ty::F32, x.into(), std::f32::consts::FRAC_2_PI.into(), 0.5f32.into());
    let q = b.cvt(Ty::U32, Ty::F32, qf.into());
    let qf = b.cvt(Ty::F32, Ty::U32, q.into());
    let r = b.mad(Ty::F32, qf.into(), (-1.570_312_5f32).into(), x.into());
    let r = b.mad(Ty::F32, qf.into(), (-4.837_513e-4f32).into(), r.into());
    let r = b.mad(Ty::F32, qf.into(), (-7.549_79e-8_f32).into(), r.into());
    let z = b.mul(Ty::F32, r.into(), r.into());
    // sin r = r + r·z·(s1 + z·(s2 + z·s3))
    let sp = b.mad(Ty::F32, z.into(), (-1.951_529_6e-4f32).into(), 8.332_161e-3f32.into());
    let sp = b.mad(Ty::F32, z.into(), sp.into(), (-1.666_665_5e-1f32).into());
    let sp = b.mul(Ty::F32, sp.into(), z.into());
    let s = b.mad(Ty::F32, r.into(), sp.into(), r.into());
    // cos r = 1 − z/2 + z²·(c1 + z·(c2 + z·c3))
    let cp = b.mad(Ty::F32, z.into(), 2.443_315_7e-5f32.into(), (-1.388_731_6e-3f32).into());
    let cp = b.mad(Ty::F32, z.into(), cp.into(), 4.166_664_6e-2f32.into());
    let z2 = b.mul(Ty::F32, z.into(), z.into());
    let c0 = b.mad(Ty::F32, z.into(), (-0.5f32).into(), 1.0f32.into());
    let c = b.mad(Ty::F32, z2.into(), cp.into(), c0.into());
    // Quadrant: odd q swaps sin and cos; q ∈ {2, 3} negates sin, q ∈ {1, 2} negates cos.
    let odd_bit = b.bin(BinOp::And, Ty::U32, q.into(), 1u32.into());
    let odd = b.setp(Cmp::Ne, Ty::U32, odd_bit.into(), 0u32.into());
    let sv = b.selp(Ty::F32, c.into(), s.into(), odd);
    let cv = b.selp(Ty::F32, s.into(), c.into(), odd);
    let sbit = b.bin(BinOp::And, Ty::U32, q.into(), 2u32.into());
    let sneg = b.setp(Cmp::Ne, Ty::U32, sbit.into(), 0u32.into());
    let q1 = b.add(Ty::U32, q.into(), 1u32.into());
    let cbit = b.bin(BinOp::And, Ty::U32, q1.into(), 2u32.into());
    let cneg = b.setp(Cmp::Ne, Ty::U32, cbit.into(), 0u32.into());
    let svn = b.un(UnOp::Neg, Ty::F32, sv.into());
    let cvn = b.un(UnOp::Neg, Ty::F32, cv.into());
    let sin = b.selp(Ty::F32, svn.into(), sv.into(), sneg);
    let cos = b.selp(Ty::F32, cvn.into(), cv.into(), cneg);
    (sin, cos)
}

// ---------------------------------------------------------------------------------------------- kernel

/// Kernel parameters as registers.
struct Params {
    out: Reg,
    bias: Option<Reg>,
    residual: Option<Reg>,
    start: Option<Reg>,
    inv_freq: Option<Reg>,
    m: Reg,
    n: Reg,
    tokens: Option<Reg>,
}

/// How a block's 64 tile columns map to W rows / output columns.
#[derive(Clone, Copy)]
enum Cols {
    /// Tile column `c` is W row `n0 + c` (through `plain_col` for RoPE kernels).
    Plain,
    /// Tile column `c` is half `(c / 16) % 2` of pair `pair0 + 16·(c / 32) + c % 16`.
    Paired,
}

/// Per-block values the column mapping needs.
struct BlockCols {
    /// First plain column of the block (in the plain column numbering).
    n0: Reg,
    /// Plain columns that exist (N, or N minus the rotated range).
    nplain: Reg,
    /// First pair of the block.
    pair0: Reg,
    /// Pairs that exist (N/2 for SwiGLU, the rotated pairs for RoPE).
    npairs: Reg,
    /// Output row stride (N, or N/2 for SwiGLU).
    ldo: Reg,
    /// For RoPE kernels: whether this block is a rotation block.
    is_rope: Option<Reg>,
}

fn build(spec: &GemmSpec) -> Kernel {
    let s = spec.stages;
    let norm_eps = match spec.prologue {
        GemmPrologue::RmsNorm { eps } => Some(eps),
        GemmPrologue::None => None,
    };
    let epi = spec.epilogue;
    let rope = match epi {
        GemmEpilogue::Rope(r) => Some(r),
        _ => None,
    };
    let mut b = Builder::new(spec.name.clone());
    b.block_size(THREADS, 1, 1);
    b.doc(format!(
        "GEMM C[M,N] = A[M,K] * W[N,K]^T, bf16 in, f32 accumulate; block tile {BM}x{BN}x{BK}, {THREADS} threads (2x2 warps of 32x32), mma.sync.m16n8k16"
    ));
    b.doc(format!("cp.async {s}-stage pipeline, 64B XOR-swizzled shared tiles read with ldmatrix.x4"));
    b.doc(format!("prologue: {:?}; epilogue: {:?}", spec.prologue, epi));
    b.doc("assumes K % 8 == 0 and N even; M, N, K are runtime parameters");

    // ---------------------------------------------------------------- parameters
    let a = b.param_ptr("a");
    let w = b.param_ptr("w");
    let out = b.param_ptr("out");
    let norm_w = norm_eps.map(|_| b.param_ptr("norm_w"));
    let bias = uses_bias(epi).then(|| b.param_ptr("bias"));
    let residual = (epi == GemmEpilogue::Residual).then(|| b.param_ptr("residual"));
    let start = rope.map(|_| b.param_ptr("start"));
    let inv_freq = rope.map(|_| b.param_ptr("inv_freq"));
    let m = b.param(ParamTy::U32, "m");
    let n = b.param(ParamTy::U32, "n");
    let k = b.param(ParamTy::U32, "k");
    let tokens = rope.map(|_| b.param(ParamTy::U32, "tokens"));
    let p = Params { out, bias, residual, start, inv_freq, m, n, tokens };

    // Norm weight slices (one 64-byte k-tile slice per stage) and the 64 row factors follow the tiles.
    // The C tile of the epilogue reuses the start of it; the row factors go past both.
    let rstd_at = (s * STAGE_BYTES).max(C_TILE_BYTES);
    let bytes = if norm_eps.is_some() { rstd_at + BM * 4 } else { (s * STAGE_BYTES).max(C_TILE_BYTES) };
    let smem = b.shared("tiles", bytes, 128);
    let sbase = b.shared_addr(smem);

    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let wm = b.bin(BinOp::Shr, Ty::U32, warp.into(), 1u32.into());
    let wn = b.bin(BinOp::And, Ty::U32, warp.into(), 1u32.into());
    let g = b.bin(BinOp::Shr, Ty::U32, lane.into(), 2u32.into());
    let t = b.bin(BinOp::And, Ty::U32, lane.into(), 3u32.into());
    let nb = b.special(Special::CtaidX);

    // ---------------------------------------------------------------- block columns
    b.comment("block columns");
    let bc = block_cols(&mut b, &p, epi, nb);
    let layout_default = match epi {
        GemmEpilogue::Swiglu => Cols::Paired,
        _ => Cols::Plain,
    };

    // ---------------------------------------------------------------- loader constants
    b.comment("cp.async loader: thread copies chunk tid%4 of tile rows tid/4 and tid/4 + 32");
    let lrow = b.bin(BinOp::Shr, Ty::U32, tid.into(), 2u32.into());
    let lc = b.bin(BinOp::And, Ty::U32, tid.into(), 3u32.into());
    let kel = b.bin(BinOp::Shl, Ty::U32, lc.into(), 3u32.into());
    let key = b.bin(BinOp::Shr, Ty::U32, tid.into(), 3u32.into());
    let key = b.bin(BinOp::And, Ty::U32, key.into(), 3u32.into());
    let pc = b.bin(BinOp::Xor, Ty::U32, lc.into(), key.into());
    let pc16 = b.bin(BinOp::Shl, Ty::U32, pc.into(), 4u32.into());
    let st_off = madu(&mut b, lrow.into(), ROW_BYTES.into(), pc16.into());

    // Element index of the loader's chunk in W's rows (fixed for the block).
    let mut w_idx = Vec::new();
    let mut w_ok = Vec::new();
    for i in 0..2u32 {
        let r = addu(&mut b, lrow.into(), (32 * i).into());
        let (wrow, ok) = tile_w_row(&mut b, &p, &bc, epi, layout_default, r);
        w_idx.push(madu(&mut b, wrow.into(), k.into(), kel.into()));
        w_ok.push(ok);
    }

    // ldmatrix lane offsets in a stage for the first k16 step; the second one's chunk index differs
    // in bit 1 (`(2 + h) ^ key == (h ^ key) ^ 2`), i.e. the offset XOR 32.
    b.comment("ldmatrix lane offsets");
    let lkey = b.bin(BinOp::Shr, Ty::U32, lane.into(), 1u32.into());
    let lkey = b.bin(BinOp::And, Ty::U32, lkey.into(), 3u32.into());
    let arow = b.bin(BinOp::And, Ty::U32, lane.into(), 15u32.into());
    let arow = madu(&mut b, wm.into(), 32u32.into(), arow.into());
    let ahalf = b.bin(BinOp::Shr, Ty::U32, lane.into(), 4u32.into());
    let li = b.bin(BinOp::Shr, Ty::U32, lane.into(), 3u32.into());
    let wrow_l = b.bin(BinOp::And, Ty::U32, lane.into(), 7u32.into());
    let wr8 = b.bin(BinOp::Shr, Ty::U32, li.into(), 1u32.into());
    let wrow_l = madu(&mut b, wr8.into(), 8u32.into(), wrow_l.into());
    let wrow_l = madu(&mut b, wn.into(), 32u32.into(), wrow_l.into());
    let whalf = b.bin(BinOp::And, Ty::U32, li.into(), 1u32.into());
    let mut off0 = Vec::new();
    for (row, half) in [(arow, ahalf), (wrow_l, whalf)] {
        let c = b.bin(BinOp::Xor, Ty::U32, half.into(), lkey.into());
        let c = b.bin(BinOp::Shl, Ty::U32, c.into(), 4u32.into());
        off0.push(madu(&mut b, row.into(), ROW_BYTES.into(), c.into()));
    }
    let (a_off, w_off) = (off0[0], off0[1]);

    let m_tiles = addu(&mut b, m.into(), (BM - 1).into());
    let m_tiles = b.bin(BinOp::Shr, Ty::U32, m_tiles.into(), 6u32.into());
    let k_tiles = addu(&mut b, k.into(), (BK - 1).into());
    let k_tiles = b.bin(BinOp::Shr, Ty::U32, k_tiles.into(), 5u32.into());
    let y0 = b.special(Special::CtaidY);
    let ny = b.special(Special::NctaidY);

    b.for_uniform(Ty::U32, y0.into(), m_tiles.into(), ny.into(), |b, mt| {
        b.comment("m tile");
        let m0 = b.bin(BinOp::Shl, Ty::U32, mt.into(), 6u32.into());
        let mut a_ok = Vec::new();
        let r0 = addu(b, m0.into(), lrow.into());
        for i in 0..2u32 {
            let r = addu(b, r0.into(), (32 * i).into());
            a_ok.push(lt(b, r.into(), m.into()));
        }
        let a_idx0 = madu(b, r0.into(), k.into(), kel.into());
        let acc: Vec<[Reg; 4]> = (0..8).map(|_| [0; 4].map(|_| b.mov(Ty::F32, 0.0f32.into()))).collect();
        // Sums of squares of the loader's two rows over its chunks (RMSNorm).
        let ss: Vec<Reg> =
            if norm_eps.is_some() { (0..2).map(|_| b.mov(Ty::F32, 0.0f32.into())).collect() } else { Vec::new() };

        // Issues the copies of k-tile `kt` into stage `stage`.
        let load = |b: &mut Builder, stage: Reg, kt: Reg| {
            let kpos = madu(b, kt.into(), BK.into(), kel.into());
            let kok = lt(b, kpos.into(), k.into());
            let kstep = b.mul(Ty::U32, kt.into(), BK.into());
            let sdst = madu(b, stage.into(), STAGE_BYTES.into(), sbase.into());
            let sdst = addu(b, sdst.into(), st_off.into());
            // The second A row is 32 rows down: its index is derived, not kept (registers are tight).
            let a0 = addu(b, a_idx0.into(), kstep.into());
            let a1 = madu(b, k.into(), 32u32.into(), a0.into());
            let w0 = addu(b, w_idx[0].into(), kstep.into());
            let w1 = addu(b, w_idx[1].into(), kstep.into());
            for (tile, (idxs, oks, base)) in [([a0, a1], &a_ok, a), ([w0, w1], &w_ok, w)].into_iter().enumerate() {
                for i in 0..2usize {
                    let ok = and_p(b, oks[i], kok);
                    let idx = idxs[i];
                    let src = gaddr(b, base, idx, 2);
                    // A chunk past M, N or K: nothing is read (src-size 0), from an in-range address.
                    let src = b.selp(Ty::U64, src.into(), base.into(), ok);
                    let nbytes = b.selp(Ty::U32, 16u32.into(), 0u32.into(), ok);
                    let dst = addu(b, sdst.into(), (tile as u32 * TILE_BYTES + i as u32 * 32 * ROW_BYTES).into());
                    b.cp_async(dst.into(), src.into(), 16, Some(nbytes.into()));
                }
            }
        };

        b.comment("pipeline prologue");
        for st in 0..s - 1 {
            let stage = b.mov(Ty::U32, st.into());
            let live = lt(b, stage.into(), k_tiles.into());
            b.if_uniform(live, |b| load(b, stage, stage));
            b.cp_async_commit();
        }
        b.comment("main loop over k tiles");
        b.for_uniform(Ty::U32, 0u32.into(), k_tiles.into(), 1u32.into(), |b, kt| {
            // The norm weights of this thread's chunk: a read-only global load (L1/L2-resident, shared
            // by every block) issued before the wait, so the wait hides its latency. It is not staged:
            // a copy by one thread would need a barrier before the others could read it.
            let gv = norm_w.map(|gw| {
                let kpos = madu(b, kt.into(), BK.into(), kel.into());
                let kmax = b.bin(BinOp::Sub, Ty::U32, k.into(), 8u32.into());
                // Past K the A chunk is zero-filled: any in-range weight does.
                let kpos = b.bin(BinOp::Min, Ty::U32, kpos.into(), kmax.into());
                let at = gaddr(b, gw, kpos, 2);
                b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, at.into(), 0, 4)
            });
            b.cp_async_wait(s - 2);
            let rs = b.bin(BinOp::Rem, Ty::U32, kt.into(), s.into());
            let abase = madu(b, rs.into(), STAGE_BYTES.into(), sbase.into());
            if let Some(gv) = gv {
                // This thread's copies have landed (for this thread): scale its own two A chunks by the
                // norm weights in place, before the barrier publishes the stage.
                b.comment("RMSNorm: A chunk *= norm_w, sum of squares of the raw values");
                let chunk = addu(b, abase.into(), st_off.into());
                for (i, &acc_ss) in ss.iter().enumerate() {
                    let off = i as i64 * 32 * i64::from(ROW_BYTES);
                    let av = b.ld_vec(Space::Shared, Ty::B32, Cache::None, chunk.into(), off, 4);
                    let mut scaled = Vec::new();
                    for (x, &gp) in av.into_iter().zip(&gv) {
                        let (gl, gh) = unpack_bf16x2(b, gp);
                        let (lo, hi) = unpack_bf16x2(b, x);
                        b.mad_into(acc_ss, lo.into(), lo.into());
                        b.mad_into(acc_ss, hi.into(), hi.into());
                        let lo = b.mul(Ty::F32, lo.into(), gl.into());
                        let hi = b.mul(Ty::F32, hi.into(), gh.into());
                        scaled.push(b.pack_bf16x2(lo.into(), hi.into()).into());
                    }
                    b.st_vec(Space::Shared, Ty::B32, chunk.into(), off, scaled);
                }
            }
            b.bar();
            let nk = addu(b, kt.into(), (s - 1).into());
            let live = lt(b, nk.into(), k_tiles.into());
            b.if_uniform(live, |b| {
                let ws = b.bin(BinOp::Rem, Ty::U32, nk.into(), s.into());
                load(b, ws, nk);
            });
            b.cp_async_commit();
            let a_lane = addu(b, abase.into(), a_off.into());
            let w_lane = addu(b, abase.into(), w_off.into());
            for kk in 0..2u32 {
                let (a_at, w_at) = if kk == 0 {
                    (a_lane, w_lane)
                } else {
                    (
                        b.bin(BinOp::Xor, Ty::U32, a_lane.into(), 32u32.into()),
                        b.bin(BinOp::Xor, Ty::U32, w_lane.into(), 32u32.into()),
                    )
                };
                // B fragments of the warp's four n8 tiles, then one A fragment at a time (fewer live
                // registers than loading both A fragments first).
                let bf: Vec<Vec<Reg>> = (0..2u32)
                    .map(|nj| {
                        let addr = addu(b, w_at.into(), (TILE_BYTES + nj * 16 * ROW_BYTES).into());
                        b.ldmatrix(4, false, addr.into())
                    })
                    .collect();
                for mi in 0..2usize {
                    let addr = addu(b, a_at.into(), (mi as u32 * 16 * ROW_BYTES).into());
                    let af = b.ldmatrix(4, false, addr.into());
                    for nt in 0..4usize {
                        let fr = &bf[nt / 2];
                        let c = acc[mi * 4 + nt];
                        let a4 = [af[0], af[1], af[2], af[3]];
                        b.raw(Inst::Mma { d: c, a: a4, b: [fr[2 * (nt % 2)], fr[2 * (nt % 2) + 1]], c });
                    }
                }
            }
        });
        b.cp_async_wait(0);

        // ---------------------------------------------------------------- epilogue
        b.comment("epilogue: row factors, accumulators to a shared f32 tile, one thread per 8 columns");
        if let Some(eps) = norm_eps {
            // Quad sums (the four loader threads of a row are lanes 4q..4q+3), then rstd of the tile's
            // 64 rows in shared memory (a region the pipeline and the C tile do not use).
            let kf = b.cvt(Ty::F32, Ty::U32, k.into());
            let inv_k = b.un(UnOp::Rcp, Ty::F32, kf.into());
            let lead = b.setp(Cmp::Eq, Ty::U32, lc.into(), 0u32.into());
            for (i, &x) in ss.iter().enumerate() {
                let o = b.shfl(ShflMode::Bfly, x, 1u32.into());
                let x = b.add(Ty::F32, x.into(), o.into());
                let o = b.shfl(ShflMode::Bfly, x, 2u32.into());
                let x = b.add(Ty::F32, x.into(), o.into());
                let r = rstd(b, x, inv_k, eps);
                b.if_(lead, |b| {
                    let at = madu(b, lrow.into(), 4u32.into(), sbase.into());
                    b.st(Space::Shared, Ty::F32, at.into(), i64::from(rstd_at + 32 * 4 * i as u32), r.into());
                });
            }
        }
        // Every warp is done with the pipeline buffers before they hold the C tile.
        b.bar();
        let crow = madu(b, wm.into(), 32u32.into(), g.into());
        let ccol = b.bin(BinOp::Shl, Ty::U32, t.into(), 1u32.into());
        let ccol = madu(b, wn.into(), 32u32.into(), ccol.into());
        let cidx = madu(b, crow.into(), C_STRIDE.into(), ccol.into());
        let cbase = madu(b, cidx.into(), 4u32.into(), sbase.into());
        for mi in 0..2u32 {
            for nt in 0..4u32 {
                for h in 0..2u32 {
                    let f = acc[(mi * 4 + nt) as usize];
                    let off = ((mi * 16 + h * 8) * C_STRIDE + nt * 8) * 4;
                    let vals = vec![f[2 * h as usize].into(), f[2 * h as usize + 1].into()];
                    b.st_vec(Space::Shared, Ty::F32, cbase.into(), i64::from(off), vals);
                }
            }
        }
        b.bar();
        let ep = Epi { p: &p, bc: &bc, sbase, m0, tid, rstd_at: norm_eps.map(|_| rstd_at), epi };
        match (epi, bc.is_rope) {
            (GemmEpilogue::Rope(r), Some(is_rope)) => {
                b.if_else(is_rope, |b| ep.paired(b, Some(r)), |b| ep.plain(b));
            }
            (GemmEpilogue::Swiglu, _) => ep.paired(b, None),
            _ => ep.plain(b),
        }
        // The next m tile's prologue overwrites buffers (the C tile) other warps may still read.
        b.bar();
    });
    b.finish()
}

/// The per-block column bookkeeping.
fn block_cols(b: &mut Builder, p: &Params, epi: GemmEpilogue, nb: Reg) -> BlockCols {
    let zero = |b: &mut Builder| b.mov(Ty::U32, 0u32.into());
    match epi {
        GemmEpilogue::Swiglu => {
            let npairs = b.bin(BinOp::Shr, Ty::U32, p.n.into(), 1u32.into());
            let pair0 = b.mul(Ty::U32, nb.into(), PAIRS.into());
            BlockCols { n0: zero(b), nplain: zero(b), pair0, npairs, ldo: npairs, is_rope: None }
        }
        GemmEpilogue::Rope(r) => {
            let rb = rope_blocks(r);
            let is_rope = lt(b, nb.into(), rb.into());
            let pair0 = b.mul(Ty::U32, nb.into(), PAIRS.into());
            let npairs = b.mov(Ty::U32, ((r.hi - r.lo) / 2).into());
            let nbp = b.bin(BinOp::Sub, Ty::U32, nb.into(), rb.into());
            let n0 = b.mul(Ty::U32, nbp.into(), BN.into());
            let nplain = b.bin(BinOp::Sub, Ty::U32, p.n.into(), (r.hi - r.lo).into());
            BlockCols { n0, nplain, pair0, npairs, ldo: p.n, is_rope: Some(is_rope) }
        }
        _ => {
            let n0 = b.mul(Ty::U32, nb.into(), BN.into());
            BlockCols { n0, nplain: p.n, pair0: zero(b), npairs: zero(b), ldo: p.n, is_rope: None }
        }
    }
}

/// A plain column index → the output column (skipping the rotated range of RoPE kernels).
fn plain_col(b: &mut Builder, epi: GemmEpilogue, c: Reg) -> Reg {
    match epi {
        GemmEpilogue::Rope(r) if r.hi > r.lo => {
            let past = b.setp(Cmp::Ge, Ty::U32, c.into(), r.lo.into());
            let shifted = addu(b, c.into(), (r.hi - r.lo).into());
            b.selp(Ty::U32, shifted.into(), c.into(), past)
        }
        _ => c,
    }
}

/// Pair `p`, half `half` (0 first, 1 partner) → the W row / output column.
fn pair_col(b: &mut Builder, p: &Params, epi: GemmEpilogue, pair: Reg, half: u32) -> Reg {
    match epi {
        GemmEpilogue::Rope(r) => {
            let hh = r.head_dim / 2;
            let head = b.bin(BinOp::Div, Ty::U32, pair.into(), hh.into());
            let i = b.bin(BinOp::Rem, Ty::U32, pair.into(), hh.into());
            let c = madu(b, head.into(), r.head_dim.into(), i.into());
            addu(b, c.into(), (r.lo + half * hh).into())
        }
        _ => {
            // SwiGLU: gate j, up j + N/2.
            if half == 0 {
                pair
            } else {
                let h = b.bin(BinOp::Shr, Ty::U32, p.n.into(), 1u32.into());
                addu(b, pair.into(), h.into())
            }
        }
    }
}

/// The W row a loader tile row `r` reads, and whether it exists.
fn tile_w_row(b: &mut Builder, p: &Params, bc: &BlockCols, epi: GemmEpilogue, layout: Cols, r: Reg) -> (Reg, Reg) {
    let plain = |b: &mut Builder| {
        let c = addu(b, bc.n0.into(), r.into());
        let ok = lt(b, c.into(), bc.nplain.into());
        (plain_col(b, epi, c), ok)
    };
    let paired = |b: &mut Builder| {
        // r = 32·w + 16·half + q  →  pair pair0 + 16·w + q.
        let wq = b.bin(BinOp::Shr, Ty::U32, r.into(), 5u32.into());
        let q = b.bin(BinOp::And, Ty::U32, r.into(), 15u32.into());
        let pr = madu(b, wq.into(), 16u32.into(), q.into());
        let pr = addu(b, pr.into(), bc.pair0.into());
        let ok = lt(b, pr.into(), bc.npairs.into());
        let hbit = b.bin(BinOp::And, Ty::U32, r.into(), 16u32.into());
        let second = b.setp(Cmp::Ne, Ty::U32, hbit.into(), 0u32.into());
        let c0 = pair_col(b, p, epi, pr, 0);
        let c1 = pair_col(b, p, epi, pr, 1);
        (b.selp(Ty::U32, c1.into(), c0.into(), second), ok)
    };
    match (layout, bc.is_rope) {
        (_, Some(is_rope)) => {
            let (pc, pok) = paired(b);
            let (qc, qok) = plain(b);
            let c = b.selp(Ty::U32, pc.into(), qc.into(), is_rope);
            let not_rope = b.un(UnOp::Not, Ty::Pred, is_rope.into());
            let pok = and_p(b, pok, is_rope);
            let qok = and_p(b, qok, not_rope);
            let ok = b.bin(BinOp::Or, Ty::Pred, pok.into(), qok.into());
            // A missing row reads row 0 (never used: its copy has src-size 0).
            let c = b.selp(Ty::U32, c.into(), 0u32.into(), ok);
            (c, ok)
        }
        (Cols::Paired, None) => {
            let (c, ok) = paired(b);
            (b.selp(Ty::U32, c.into(), 0u32.into(), ok), ok)
        }
        (Cols::Plain, None) => {
            let (c, ok) = plain(b);
            (b.selp(Ty::U32, c.into(), 0u32.into(), ok), ok)
        }
    }
}

/// Epilogue context: the block's f32 C tile in shared memory (`[64][C_STRIDE]`, tile column `c` is
/// the product with W-tile row `c`), read back by one thread per 8 tile columns of a row.
struct Epi<'a> {
    p: &'a Params,
    bc: &'a BlockCols,
    sbase: Reg,
    m0: Reg,
    tid: Reg,
    /// Where the RMSNorm row factors are, with the prologue.
    rstd_at: Option<u32>,
    epi: GemmEpilogue,
}

impl Epi<'_> {
    /// C tile values `[row][col .. col + 8]`, times the row's RMSNorm factor.
    fn values(&self, b: &mut Builder, row: Reg, col: Reg) -> Vec<Reg> {
        let idx = madu(b, row.into(), C_STRIDE.into(), col.into());
        let at = madu(b, idx.into(), 4u32.into(), self.sbase.into());
        let mut v = b.ld_vec(Space::Shared, Ty::F32, Cache::None, at.into(), 0, 4);
        v.extend(b.ld_vec(Space::Shared, Ty::F32, Cache::None, at.into(), 16, 4));
        if let Some(off) = self.rstd_at {
            let ra = madu(b, row.into(), 4u32.into(), self.sbase.into());
            let s = b.ld(Space::Shared, Ty::F32, Cache::None, ra.into(), i64::from(off));
            v = v.into_iter().map(|x| b.mul(Ty::F32, x.into(), s.into())).collect();
        }
        v
    }

    /// Stores a bf16 pair at `out[row, col .. col + 2]`.
    fn store(&self, b: &mut Builder, row: Reg, col: Reg, v: [Reg; 2]) {
        let idx = madu(b, row.into(), self.bc.ldo.into(), col.into());
        let addr = gaddr(b, self.p.out, idx, 2);
        let packed = b.pack_bf16x2(v[0].into(), v[1].into());
        b.st(Space::Global, Ty::B32, addr.into(), 0, packed.into());
    }

    /// `v + base[idx .. idx + 2]` (bf16 pair).
    fn add_pair(b: &mut Builder, v: [Reg; 2], base: Reg, idx: Reg, cache: Cache) -> [Reg; 2] {
        let addr = gaddr(b, base, idx, 2);
        let x = b.ld(Space::Global, Ty::B32, cache, addr.into(), 0);
        let (lo, hi) = unpack_bf16x2(b, x);
        [b.add(Ty::F32, v[0].into(), lo.into()), b.add(Ty::F32, v[1].into(), hi.into())]
    }

    /// Plain columns: units of (row, 8 columns), 4 per thread; pairs masked at the edge.
    fn plain(&self, b: &mut Builder) {
        for j in 0..(BM * BN / 8) / THREADS {
            let u = addu(b, self.tid.into(), (j * THREADS).into());
            let row = b.bin(BinOp::Shr, Ty::U32, u.into(), 3u32.into());
            let c0 = b.bin(BinOp::And, Ty::U32, u.into(), 7u32.into());
            let c0 = b.bin(BinOp::Shl, Ty::U32, c0.into(), 3u32.into());
            let grow = addu(b, self.m0.into(), row.into());
            let cp = addu(b, self.bc.n0.into(), c0.into());
            let row_ok = lt(b, grow.into(), self.p.m.into());
            let col_ok = lt(b, cp.into(), self.bc.nplain.into());
            let live = and_p(b, row_ok, col_ok);
            b.if_(live, |b| {
                let v = self.values(b, row, c0);
                for q in 0..4usize {
                    let c = addu(b, cp.into(), (2 * q as u32).into());
                    let ok = lt(b, c.into(), self.bc.nplain.into());
                    b.if_(ok, |b| {
                        let col = plain_col(b, self.epi, c);
                        let mut x = [v[2 * q], v[2 * q + 1]];
                        if let Some(bias) = self.p.bias {
                            x = Self::add_pair(b, x, bias, col, Cache::ReadOnly);
                        }
                        if let Some(res) = self.p.residual {
                            // Plain loads: `out` may alias `residual`.
                            let idx = madu(b, grow.into(), self.bc.ldo.into(), col.into());
                            x = Self::add_pair(b, x, res, idx, Cache::None);
                        }
                        if self.epi == GemmEpilogue::Relu2 {
                            x = x.map(|y| relu2(b, y));
                        }
                        self.store(b, grow, col, x);
                    });
                }
            });
        }
    }

    /// Paired columns (SwiGLU, or RoPE with `rope`): units of (row, 8 pairs), 2 per thread; the first
    /// halves are tile columns `32·w + 8·h + 0..8`, their partners 16 further.
    fn paired(&self, b: &mut Builder, rope: Option<RopeCols>) {
        let (start, inv_freq, tokens) = (self.p.start, self.p.inv_freq, self.p.tokens);
        for j in 0..(BM * PAIRS / 8) / THREADS {
            let u = addu(b, self.tid.into(), (j * THREADS).into());
            let row = b.bin(BinOp::Shr, Ty::U32, u.into(), 2u32.into());
            let q = b.bin(BinOp::And, Ty::U32, u.into(), 3u32.into());
            let wq = b.bin(BinOp::Shr, Ty::U32, q.into(), 1u32.into());
            let hq = b.bin(BinOp::And, Ty::U32, q.into(), 1u32.into());
            let hq8 = b.bin(BinOp::Shl, Ty::U32, hq.into(), 3u32.into());
            let c_first = madu(b, wq.into(), 32u32.into(), hq8.into());
            let c_second = addu(b, c_first.into(), 16u32.into());
            let p0 = madu(b, wq.into(), 16u32.into(), hq8.into());
            let p0 = addu(b, p0.into(), self.bc.pair0.into());
            let grow = addu(b, self.m0.into(), row.into());
            let row_ok = lt(b, grow.into(), self.p.m.into());
            let col_ok = lt(b, p0.into(), self.bc.npairs.into());
            let live = and_p(b, row_ok, col_ok);
            b.if_(live, |b| {
                let x1 = self.values(b, row, c_first);
                let x2 = self.values(b, row, c_second);
                // RoPE position of the row: start[row / T] + row % T.
                let pos = match (rope, start, tokens) {
                    (Some(_), Some(start), Some(tokens)) => {
                        let seq = b.bin(BinOp::Div, Ty::U32, grow.into(), tokens.into());
                        let tok = b.bin(BinOp::Rem, Ty::U32, grow.into(), tokens.into());
                        let sa = gaddr(b, start, seq, 4);
                        let s0 = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, sa.into(), 0);
                        let pos = b.add(Ty::S32, s0.into(), tok.into());
                        Some(b.cvt(Ty::F32, Ty::S32, pos.into()))
                    }
                    _ => None,
                };
                for e2 in 0..4usize {
                    let pr = addu(b, p0.into(), (2 * e2 as u32).into());
                    let ok = lt(b, pr.into(), self.bc.npairs.into());
                    b.if_(ok, |b| {
                        let a = [x1[2 * e2], x1[2 * e2 + 1]];
                        let c = [x2[2 * e2], x2[2 * e2 + 1]];
                        match (rope, pos, inv_freq) {
                            (Some(r), Some(pos), Some(inv_freq)) => {
                                self.rotate(b, r, grow, pr, pos, inv_freq, a, c);
                            }
                            _ => {
                                // SwiGLU: gate (first half) and up (partner).
                                let v = [0, 1].map(|e| {
                                    let s = silu(b, a[e]);
                                    b.mul(Ty::F32, s.into(), c[e].into())
                                });
                                self.store(b, grow, pr, v);
                            }
                        }
                    });
                }
            });
        }
    }

    /// Rotates pairs `pr, pr + 1` (first halves `x1`, partners `x2`) of row `grow` and stores both.
    #[allow(clippy::too_many_arguments)]
    fn rotate(
        &self,
        b: &mut Builder,
        r: RopeCols,
        grow: Reg,
        pr: Reg,
        pos: Reg,
        inv_freq: Reg,
        mut x1: [Reg; 2],
        mut x2: [Reg; 2],
    ) {
        let hh = r.head_dim / 2;
        let c0 = pair_col(b, self.p, GemmEpilogue::Rope(r), pr, 0);
        let c1 = addu(b, c0.into(), hh.into());
        if let Some(bias) = self.p.bias {
            x1 = Self::add_pair(b, x1, bias, c0, Cache::ReadOnly);
            x2 = Self::add_pair(b, x2, bias, c1, Cache::ReadOnly);
        }
        let i = b.bin(BinOp::Rem, Ty::U32, pr.into(), hh.into());
        let fa = gaddr(b, inv_freq, i, 4);
        let mut o1 = x1;
        let mut o2 = x2;
        for e in 0..2usize {
            let f = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, fa.into(), 4 * e as i64);
            let ang = b.mul(Ty::F32, pos.into(), f.into());
            let (sn, cs) = sincos(b, ang);
            // (x1·cos − x2·sin, x2·cos + x1·sin)
            let a = b.mul(Ty::F32, x1[e].into(), cs.into());
            let bb = b.mul(Ty::F32, x2[e].into(), sn.into());
            o1[e] = b.bin(BinOp::Sub, Ty::F32, a.into(), bb.into());
            let a = b.mul(Ty::F32, x2[e].into(), cs.into());
            let bb = b.mul(Ty::F32, x1[e].into(), sn.into());
            o2[e] = b.add(Ty::F32, a.into(), bb.into());
        }
        self.store(b, grow, c0, o1);
        self.store(b, grow, c1, o2);
    }
}
