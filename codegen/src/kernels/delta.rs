//! delta: the DeltaNet / Gated DeltaNet kernels — the chunkwise WY prefill (`delta_scan`), the
//! one-token `delta_step`, and the fused decode body `deltanet_step` (conv updates + SiLU, L2 norms,
//! sigmoid(β), the decay gate, the delta step and the output norm in one kernel).
//!
//! Semantics are those of `gir::Op::DeltaScan` / `DeltaStep` (and the cpu reference kernels): per
//! (sequence, head), with state `S` of `dk × dv` (f32, row-major), `α_t = exp(g_t)` when gated (else 1),
//!
//! ```text
//! S_t = α_t·(I − β_t·k_t·k_tᵀ)·S_{t−1} + β_t·k_t·v_tᵀ        o_t = scale · S_tᵀ·q_t
//! ```
//!
//! Layouts: `q`, `k` `[B, T, H, dk]`, `v`, `o` `[B, T, H, dv]`, `beta`, `g` `[B, T, H]` (all bf16),
//! `state` `[B, H, dk, dv]` (f32, updated in place), `lens` i32 `[B]`.
//!
//! # Prefill: `delta_scan` (chunkwise WY, one kernel)
//!
//! Grid `(H · dv/BV, B)`: one block of 128 threads (4 warps) per (sequence, head, value tile of `BV`
//! columns). The block keeps its `dk × BV` slice of the state in shared memory (f32, plus a bf16 copy
//! for the tensor cores) and walks the chunks of `C` tokens in order (`C` = `chunk`, 16..=64, a
//! multiple of 16; 64 by default, as the op says). Per chunk (local rows `i, j < C`; `G` = in-chunk
//! inclusive cumsum of `g`; rows past the sequence end are zero-filled with β = g = 0, so they change
//! nothing):
//!
//! 1. load K, Q (`C × dk`), the V tile (`C × BV`), β and g (`cp.async`, zero-fill past `T`);
//!    gated: warp 0 scans g (`shfl.up`) into G, `e^G` and `e^{G_last − G}`;
//! 2. `A = β_i·e^{G_i − G_j}·(K·Kᵀ)` strictly lower (f32), and in the same phase
//!    `R = β ⊙ (V − e^G ⊙ (K·S))` over the V tile (written over V);
//! 3. the UT transform `T = (I + A)⁻¹` in f32, hierarchically: the `C/16` diagonal 16×16 blocks by
//!    forward substitution (one thread per column), then block row by block row
//!    `T_IJ = −T_II·Σ_{M=J}^{I−1} A_IM·T_MJ` (two f32 products per block row); T is also kept in bf16;
//! 4. `V_new = T·R` (this is `U − W·S` with `U = T·(β⊙V)`, `W = T·(β⊙e^G⊙K)`: the two WY factors
//!    folded into one product), kept as bf16 together with `V_d = e^{G_last − G} ⊙ V_new` (gated);
//!    in the same phase `P = (Q·Kᵀ) ⊙ e^{G_i − G_j}` causal including the diagonal (bf16);
//! 5. `O = scale·[e^G ⊙ (Q·S) + P·V_new]`, stored for the valid rows; if `lens[b]` ends inside the
//!    chunk (at local row `l`), the final state `e^{G_l}·S + Kᵀ·(e^{G_l − G} ⊙ V_new)_{rows ≤ l}` goes
//!    straight to global memory (exact: row j of V_new depends on rows ≤ j only);
//! 6. `S ← e^{G_last}·S + Kᵀ·V_d` (f32 accumulate, bf16 copy refreshed).
//!
//! The products run on `mma.sync.m16n8k16` (bf16 × bf16 → f32) with `ldmatrix` (`.trans` where the
//! operand is stored the other way round) when `C`, `dk` and `BV` are multiples of 16 (the `Mma`
//! engine): each warp owns 16×32 (or 16×16) output tiles, round robin; lower-triangular operands stop
//! the k loop at the diagonal tile and products whose output is lower-triangular skip the tiles above
//! it. Otherwise (`Simt` engine, any `dk`, even `BV`) every thread computes pairs of outputs with f32
//! fused multiply-adds over the same shared-memory operands. The inverse is always f32 SIMT.
//! Rounding points (mma engine): T, R, V_new, V_d, P and the state copy are rounded to bf16 for the
//! tensor cores (as fla does); everything accumulates in f32 and the state itself stays f32.
//!
//! Shared memory (bytes; rows padded by 16 bytes so `ldmatrix` is conflict-free;
//! `sk = 2·(⌈dk⌉₈+8)`, `sv = 2·(⌈BV⌉₈+8)`, `sc = 2·(C+8)`, `fc = 4·(C+4)`):
//! `2·C·sk` (K, Q) + `C·sv` (V/R) + `5·4·⌈C⌉₃₂` (β, g, G, e^G, e^{G_last−G}) + `C·sc` (T bf16) +
//! `dk·4·(BV+4)` (S f32) + `dk·sv` (S bf16) + a union of `2·C·fc + 16·fc` (A, T f32, block-row
//! scratch) and `C·sc + 3·C·sv` (P, V_new, V_d, V_d masked at `lens`). `C = 64, dk = 128, BV = 64`:
//! 146 944 bytes (fits the 163 KB of sm_80). `BV` defaults to the widest tile that fits 163 KB.
//!
//! Barriers per chunk: `7 + 2·(C/16 − 1)` (+1 for the scan of g). The chunks of a (sequence, head,
//! tile) are sequential, so the grid has `B·H·dv/BV` blocks (32 for one sequence of a 16-head,
//! 128-wide layer at `BV = 64`; `v_tile` trades duplicated A/T/P work for more blocks); the next
//! chunk's loads are not overlapped with the current chunk's products (single-buffered).
//!
//! Assumptions: `0 ≤ lens[b] ≤ T` (tokens at positions ≥ `lens[b]` are computed as the recurrence
//! continues, but only the state after `lens[b]` tokens is written; `lens[b] = 0` leaves the state);
//! element indices `B·T·H·max(dk, dv)` and `B·H·dk·dv` fit in u32; `dv` even; q, k, v 16-byte aligned
//! (the 16-byte copies, when `dk` and `BV` are multiples of 8), the state 8-byte aligned. `scale` comes
//! from the op (`1/√dk` in the lowering).
//! Parameters, in order: `q, k, v, beta, [g], state, lens, o, T` (`T` u32).
//!
//! # Decode: `delta_step` and `deltanet_step`
//!
//! The recurrence in its decode form, `S ← α·S; v' = β·(v − Sᵀk); S ← S + k·v'ᵀ; o = scale·Sᵀq`, with
//! the f32 state read once and written once. Columns of S are independent given k, so a *sub-block*
//! of 128 threads owns a tile of `BVd = 4·cg` columns and all `dk` rows: thread (row group `r`,
//! column group `c`) holds rows `r, r + RG, …` (`RG = 128/cg`) × 4 columns in registers (one
//! 16-byte load and store per row); the two reductions over rows (`Sᵀk`, `Sᵀq`) are a butterfly over
//! the lanes of a warp followed by the 4 warps' partials through shared memory.
//! * `delta_step`: grid `(H · dv/BVd, B)`, one sub-block per block (BVd = 16 when `dv` allows), so a
//!   decode step has `B·H·dv/16` blocks. Parameters: `q, k, v, beta, [g], state, o`.
//! * `deltanet_step`: grid `(H, B)`, one block per (sequence, head) holding `dv/BVd` sub-blocks (the
//!   head's q/k conv states are rolled in place, so exactly one block may own them). Phases: issue the
//!   state loads; conv updates (state rolled in place) + SiLU for the q, k, v channels of the head
//!   into shared memory; every warp computes the L2 norms of q and k (eps `l2_eps`), β = sigmoid(b)
//!   and, gated, `g = neg_a·softplus(a + dt_bias)` with `neg_a = −exp(A_log)`, `α = e^g`; the delta
//!   step; then the output RMSNorm over `dv` (weight shared by the heads), times `silu(z)` when
//!   gated. Parameters: `xq, xk, xv, wq, wk, wv, [bq, bk, bv], conv_q, conv_k, conv_v, b, [a, dt_bias,
//!   neg_a (or A_log), z], norm_w, state, y`. Storage (`DeltaNetStepSpec::storage`): bf16 (the GPU
//!   models) or f32 (exact models) for everything but the f32 state; all math is f32. The row inputs
//!   `xq, xk, xv, b, a, z` are read at `row·stride + column` with one stride each
//!   (`DeltaNetStepSpec::strides`), element by element, so they may be column views of one fused
//!   projection row `[B, W]` (the decode group passes `ArgRule::View(row, byte offset)` and stride
//!   `W`), at any element offset. The kernel-cost formulas below count bf16 storage.
//!
//! `delta_step` has 2 barriers and 2·4·BVd·4 bytes of static shared memory; `deltanet_step` has 4
//! barriers and `4·(2dk + 2dv)` + `2·4·dv·4` bytes (q, k, v, o rows; the reduction buffers). The
//! fused kernel takes the fewest sub-blocks (at most 4, 512 threads, so a thread may hold 128
//! registers) that leave at most 8 rows (32 state values) per thread, else 4: 512 threads for
//! dk = dv = 128 (8 rows) and for dk = 128, dv = 256 (16 rows). It emits the q values where the second
//! reduction needs them (not across the first one), which keeps both shapes free of spills. Both need
//! `dv % 4 == 0` (16-byte state accesses) and 8-byte aligned `v` and state; `dk` is free (rows past
//! `dk` are guarded); `deltanet_step` also needs `dv/4 = cg·n` with `cg` a power of two ≤ 32 and
//! `n ≤ 4`.

use flashc_compiler::gir::{DType, Dim, Sym};
use flashc_compiler::schedule::BufferId;

use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Kernel, Operand, ParamTy, Reg, ShflMode, Space, Special, Ty, UnOp};

/// Threads per prefill block (4 warps).
pub const SCAN_THREADS: u32 = 128;
/// Threads per decode sub-block.
pub const STEP_SUB_THREADS: u32 = 128;
/// The shared memory the default value tile must fit: sm_80's opt-in maximum per block.
pub const SM80_SHARED: u32 = 163 * 1024;
/// The most shared memory a block may use (sm_90 opt-in maximum).
pub const SM90_SHARED: u32 = 227 * 1024;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

// ====================================================================== small emit helpers

fn imm(x: u32) -> Operand {
    Operand::Imm(i64::from(x))
}

fn r(x: Reg) -> Operand {
    Operand::Reg(x)
}

/// An operand as a register (immediates moved into one).
fn reg_of(b: &mut Builder, x: Operand) -> Reg {
    match x {
        Operand::Reg(x) => x,
        x => b.mov(Ty::U32, x),
    }
}

/// `x + y`, folding immediates.
fn addu(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    match (x, y) {
        (Operand::Imm(p), Operand::Imm(q)) => b.mov(Ty::U32, Operand::Imm(p + q)),
        (x, Operand::Imm(0)) | (Operand::Imm(0), x) => reg_of(b, x),
        (Operand::Imm(p), y) => b.bin(BinOp::Add, Ty::U32, y, Operand::Imm(p)),
        (x, y) => b.bin(BinOp::Add, Ty::U32, x, y),
    }
}

fn subu(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.bin(BinOp::Sub, Ty::U32, x, y)
}

/// `x·y`, folding immediates.
fn mulu(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    match (x, y) {
        (Operand::Imm(p), Operand::Imm(q)) => b.mov(Ty::U32, Operand::Imm(p * q)),
        (x, Operand::Imm(1)) | (Operand::Imm(1), x) => reg_of(b, x),
        (Operand::Imm(p), y) => b.bin(BinOp::Mul, Ty::U32, y, Operand::Imm(p)),
        (x, y) => b.bin(BinOp::Mul, Ty::U32, x, y),
    }
}

/// `x·y + z`, folding immediates.
fn madu(b: &mut Builder, x: Operand, y: Operand, z: Operand) -> Reg {
    match (x, y) {
        (Operand::Imm(p), Operand::Imm(q)) => addu(b, z, Operand::Imm(p * q)),
        (_, Operand::Imm(0)) | (Operand::Imm(0), _) => reg_of(b, z),
        (x, Operand::Imm(1)) | (Operand::Imm(1), x) => addu(b, x, z),
        (Operand::Imm(p), y) => b.mad(Ty::U32, y, Operand::Imm(p), z),
        (x, y) => b.mad(Ty::U32, x, y, z),
    }
}

fn divu(b: &mut Builder, x: Operand, d: u32) -> Reg {
    if d == 1 {
        reg_of(b, x)
    } else if d.is_power_of_two() {
        b.bin(BinOp::Shr, Ty::U32, x, imm(d.trailing_zeros()))
    } else {
        b.bin(BinOp::Div, Ty::U32, x, imm(d))
    }
}

fn remu(b: &mut Builder, x: Operand, d: u32) -> Reg {
    if d == 1 {
        b.mov(Ty::U32, imm(0))
    } else if d.is_power_of_two() {
        b.bin(BinOp::And, Ty::U32, x, imm(d - 1))
    } else {
        b.bin(BinOp::Rem, Ty::U32, x, imm(d))
    }
}

fn minu(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.bin(BinOp::Min, Ty::U32, x, y)
}

fn ltu(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.setp(Cmp::Lt, Ty::U32, x, y)
}

fn fadd(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.bin(BinOp::Add, Ty::F32, x, y)
}

fn fsub(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.bin(BinOp::Sub, Ty::F32, x, y)
}

fn fmul(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.bin(BinOp::Mul, Ty::F32, x, y)
}

fn ffma(b: &mut Builder, x: Operand, y: Operand, z: Operand) -> Reg {
    b.mad(Ty::F32, x, y, z)
}

fn fmin(b: &mut Builder, x: Operand, y: Operand) -> Reg {
    b.bin(BinOp::Min, Ty::F32, x, y)
}

fn fzero(b: &mut Builder) -> Reg {
    b.mov(Ty::F32, Operand::F32(0.0))
}

/// `e^x` as `ex2.approx(x·log2 e)`.
fn exp(b: &mut Builder, x: Operand) -> Reg {
    let y = fmul(b, x, Operand::F32(LOG2E));
    b.un(UnOp::Ex2Approx, Ty::F32, r(y))
}

/// `1 / (1 + e^−x)` (0 for very negative x, 1 for very positive x).
fn sigmoid(b: &mut Builder, x: Operand) -> Reg {
    let nx = b.un(UnOp::Neg, Ty::F32, x);
    let e = exp(b, r(nx));
    let d = fadd(b, r(e), Operand::F32(1.0));
    b.un(UnOp::Rcp, Ty::F32, r(d))
}

fn silu(b: &mut Builder, x: Reg) -> Reg {
    let s = sigmoid(b, r(x));
    fmul(b, r(x), r(s))
}

/// `ln(1 + eˣ)` as `max(x, 0) + ln(1 + e^−|x|)`.
fn softplus(b: &mut Builder, x: Reg) -> Reg {
    let ax = b.un(UnOp::Abs, Ty::F32, r(x));
    let nax = b.un(UnOp::Neg, Ty::F32, r(ax));
    let e = exp(b, r(nax));
    let one_e = fadd(b, r(e), Operand::F32(1.0));
    let l2 = b.un(UnOp::Lg2Approx, Ty::F32, r(one_e));
    let pos = b.bin(BinOp::Max, Ty::F32, r(x), Operand::F32(0.0));
    ffma(b, r(l2), Operand::F32(LN2), r(pos))
}

/// A 32-bit pattern reinterpreted as f32.
fn as_f32(b: &mut Builder, bits: Reg) -> Reg {
    let f = b.reg(Ty::F32);
    b.inst(Inst::Mov { ty: Ty::B32, dst: f, src: r(bits) });
    f
}

/// The two bf16 halves of a 32-bit register as f32 (low, high).
fn unpack_bf16x2(b: &mut Builder, x: Reg) -> (Reg, Reg) {
    let lo = b.bin(BinOp::Shl, Ty::B32, r(x), imm(16));
    let hi = b.bin(BinOp::And, Ty::B32, r(x), Operand::Imm(0xFFFF_0000));
    (as_f32(b, lo), as_f32(b, hi))
}

/// A u16 register holding bf16 bits, widened to f32.
fn bf16_bits_to_f32(b: &mut Builder, x: Reg) -> Reg {
    b.bf16_to_f32(x)
}

/// Loads one bf16 (as f32).
fn ld_bf16(b: &mut Builder, space: Space, cache: Cache, addr: Reg, offset: i64) -> Reg {
    let raw = b.ld(space, Ty::U16, cache, r(addr), offset);
    bf16_bits_to_f32(b, raw)
}

/// Stores one f32 as bf16 (round to nearest even).
fn st_bf16(b: &mut Builder, space: Space, addr: Reg, offset: i64, x: Reg) {
    let h = b.cvt(Ty::Bf16, Ty::F32, r(x));
    b.st(space, Ty::B16, r(addr), offset, r(h));
}

/// Stores two f32 as one bf16x2 (lo at the lower address).
fn st_bf16x2(b: &mut Builder, space: Space, addr: Reg, offset: i64, lo: Reg, hi: Reg) {
    let p = b.pack_bf16x2(r(lo), r(hi));
    b.st(space, Ty::B32, r(addr), offset, r(p));
}

/// The storage of the fused decode kernel's activations, weights and conv states (the delta state
/// is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Bf16,
    F32,
}

impl Storage {
    /// The storage of a gir dtype (bf16 or f32).
    pub fn of(dtype: DType) -> Option<Storage> {
        match dtype {
            DType::Bf16 => Some(Storage::Bf16),
            DType::F32 => Some(Storage::F32),
            _ => None,
        }
    }

    pub fn bytes(self) -> u32 {
        match self {
            Storage::Bf16 => 2,
            Storage::F32 => 4,
        }
    }

    /// The register type that moves one element's bits.
    fn raw(self) -> Ty {
        match self {
            Storage::Bf16 => Ty::U16,
            Storage::F32 => Ty::B32,
        }
    }

    /// Element `index` of global `base`, as f32.
    fn ld(self, b: &mut Builder, cache: Cache, base: Reg, index: Reg) -> Reg {
        let a = gaddr(b, base, index, self.bytes());
        self.ld_at(b, cache, a, 0)
    }

    /// The element at global `addr + offset`, as f32.
    fn ld_at(self, b: &mut Builder, cache: Cache, addr: Reg, offset: i64) -> Reg {
        match self {
            Storage::Bf16 => ld_bf16(b, Space::Global, cache, addr, offset),
            Storage::F32 => b.ld(Space::Global, Ty::F32, cache, r(addr), offset),
        }
    }

    /// Raw bits as f32.
    fn widen(self, b: &mut Builder, raw: Reg) -> Reg {
        match self {
            Storage::Bf16 => bf16_bits_to_f32(b, raw),
            Storage::F32 => as_f32(b, raw),
        }
    }

    /// Stores f32 `x` as element `index` of global `base` (bf16 rounds to nearest even).
    fn st(self, b: &mut Builder, base: Reg, index: Reg, x: Reg) {
        let a = gaddr(b, base, index, self.bytes());
        match self {
            Storage::Bf16 => st_bf16(b, Space::Global, a, 0, x),
            Storage::F32 => b.st(Space::Global, Ty::F32, r(a), 0, r(x)),
        }
    }
}

/// `base + index·bytes` as a 64-bit global address.
fn gaddr(b: &mut Builder, base: Reg, index: Reg, bytes: u32) -> Reg {
    b.index(base, index, bytes)
}

fn round_up(x: u32, m: u32) -> u32 {
    x.div_ceil(m) * m
}

// ====================================================================== shared-memory matrices

/// A matrix in dynamic shared memory: element `(row, col)` at `off + row·stride + col·esize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mat {
    off: u32,
    stride: u32,
    /// f32 (4 bytes) or bf16 (2 bytes).
    f32: bool,
}

impl Mat {
    fn bf16(off: u32, stride: u32) -> Mat {
        Mat { off, stride, f32: false }
    }

    fn f32(off: u32, stride: u32) -> Mat {
        Mat { off, stride, f32: true }
    }

    fn esize(self) -> u32 {
        if self.f32 { 4 } else { 2 }
    }

    /// The sub-matrix starting at `(row, col)`.
    fn at(self, row: u32, col: u32) -> Mat {
        Mat { off: self.off + row * self.stride + col * self.esize(), ..self }
    }

    /// `smem + row·stride + col·esize` (the matrix offset goes in the access's immediate).
    fn addr(self, b: &mut Builder, smem: Reg, row: Operand, col: Operand) -> Reg {
        let a = madu(b, row, imm(self.stride), r(smem));
        madu(b, col, imm(self.esize()), r(a))
    }

    /// Loads the pair `(row, col), (row, col + 1)` as f32.
    fn ld_pair(self, b: &mut Builder, smem: Reg, row: Operand, col: Operand) -> (Reg, Reg) {
        let a = self.addr(b, smem, row, col);
        if self.f32 {
            let v = b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(a), i64::from(self.off), 2);
            (v[0], v[1])
        } else {
            let w = b.ld(Space::Shared, Ty::B32, Cache::None, r(a), i64::from(self.off));
            unpack_bf16x2(b, w)
        }
    }

    /// Stores the pair `(row, col), (row, col + 1)`.
    fn st_pair(self, b: &mut Builder, smem: Reg, row: Operand, col: Operand, v0: Reg, v1: Reg) {
        let a = self.addr(b, smem, row, col);
        if self.f32 {
            b.st_vec(Space::Shared, Ty::F32, r(a), i64::from(self.off), vec![r(v0), r(v1)]);
        } else {
            st_bf16x2(b, Space::Shared, a, i64::from(self.off), v0, v1);
        }
    }

    /// Loads one element as f32.
    fn ld1(self, b: &mut Builder, smem: Reg, row: Operand, col: Operand) -> Reg {
        let a = self.addr(b, smem, row, col);
        if self.f32 {
            b.ld(Space::Shared, Ty::F32, Cache::None, r(a), i64::from(self.off))
        } else {
            ld_bf16(b, Space::Shared, Cache::None, a, i64::from(self.off))
        }
    }

    /// Stores one element.
    fn st1(self, b: &mut Builder, smem: Reg, row: Operand, col: Operand, v: Reg) {
        let a = self.addr(b, smem, row, col);
        if self.f32 {
            b.st(Space::Shared, Ty::F32, r(a), i64::from(self.off), r(v));
        } else {
            st_bf16(b, Space::Shared, a, i64::from(self.off), v);
        }
    }
}

/// An f32 vector in shared memory (element `i` at `off + 4i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Vec32 {
    off: u32,
}

impl Vec32 {
    fn ld(self, b: &mut Builder, smem: Reg, i: Operand) -> Reg {
        let a = madu(b, i, imm(4), r(smem));
        b.ld(Space::Shared, Ty::F32, Cache::None, r(a), i64::from(self.off))
    }

    fn ld_pair(self, b: &mut Builder, smem: Reg, i: Operand) -> (Reg, Reg) {
        let a = madu(b, i, imm(4), r(smem));
        let v = b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(a), i64::from(self.off), 2);
        (v[0], v[1])
    }

    fn st(self, b: &mut Builder, smem: Reg, i: Operand, v: Reg) {
        let a = madu(b, i, imm(4), r(smem));
        b.st(Space::Shared, Ty::F32, r(a), i64::from(self.off), r(v));
    }
}

// ====================================================================== block-level products

/// How the block-level products are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Engine {
    /// `mma.sync.m16n8k16` on bf16 operands with `ldmatrix` (dims multiples of 16).
    Mma,
    /// f32 fused multiply-adds, two outputs per thread (any dims, even output widths).
    Simt,
}

/// The block's threads and lanes.
struct Ctx {
    smem: Reg,
    tid: Reg,
    warp: Reg,
    lane: Reg,
    threads: u32,
}

/// One product `A·B` accumulated into the output: `A` is `M × k`, `B` is `k × N`.
#[derive(Clone, Copy)]
struct Term {
    a: Mat,
    /// `A` is stored as `[k][M]` (its transpose), else `[M][k]`.
    a_t: bool,
    b: Mat,
    /// `B` is stored as `[N][k]` (its transpose), else `[k][N]`.
    b_t: bool,
    k: u32,
    /// `A` is square lower-triangular (`A[m][k] = 0` for `k > m`): the k loop stops at the diagonal.
    a_lower: bool,
    /// `B` is square lower-triangular (`B[k][n] = 0` for `k < n`): the k loop starts at the column
    /// (SIMT only; the stored upper part of the diagonal must be zero).
    b_lower: bool,
    /// Before this term, the accumulator's rows are multiplied by this vector.
    scale_rows: Option<Vec32>,
}

impl Term {
    fn new(a: Mat, a_t: bool, b: Mat, b_t: bool, k: u32) -> Term {
        Term { a, a_t, b, b_t, k, a_lower: false, b_lower: false, scale_rows: None }
    }
}

/// The accumulator's initial value.
#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// `factor · mat[row][col]` (f32 matrix).
    Load {
        mat: Mat,
        factor: Option<Reg>,
    },
}

/// `out (M × N) = init + Σ terms`, handed to an epilogue two adjacent columns at a time.
struct Gemm {
    m: u32,
    n: u32,
    terms: Vec<Term>,
    init: Init,
    /// Skip output tiles entirely above the diagonal (their values are never used).
    skip_upper: bool,
}

/// The epilogue: `(row, col, out[row][col], out[row][col + 1])`, `col` even.
type Epilogue<'a> = &'a mut dyn FnMut(&mut Builder, Reg, Reg, Reg, Reg);

fn gemm(b: &mut Builder, cx: &Ctx, engine: Engine, g: &Gemm, epi: Epilogue) {
    match engine {
        Engine::Mma => gemm_mma(b, cx, g, epi),
        Engine::Simt => gemm_simt(b, cx, g, epi),
    }
}

fn init_acc(b: &mut Builder, cx: &Ctx, init: Init, row: Reg, col: Reg) -> (Reg, Reg) {
    match init {
        Init::Zero => (fzero(b), fzero(b)),
        Init::Load { mat, factor } => {
            let (x0, x1) = mat.ld_pair(b, cx.smem, r(row), r(col));
            match factor {
                Some(f) => (fmul(b, r(x0), r(f)), fmul(b, r(x1), r(f))),
                None => (x0, x1),
            }
        }
    }
}

/// Tensor-core products: warp tiles of 16 × `wn` (`wn` = 32 when N allows, else 16) dealt round robin
/// to the warps; per k step of 16 one `ldmatrix.x4` for A and one per 16 columns for B.
fn gemm_mma(b: &mut Builder, cx: &Ctx, g: &Gemm, epi: Epilogue) {
    debug_assert!(g.m.is_multiple_of(16) && g.n.is_multiple_of(16));
    let wn = if g.n.is_multiple_of(32) { 32 } else { 16 };
    let nt8 = (wn / 8) as usize;
    let ntn = g.n / wn;
    let tiles = (g.m / 16) * ntn;
    let lane = cx.lane;
    let gid = b.bin(BinOp::Shr, Ty::U32, r(lane), imm(2));
    let tig = b.bin(BinOp::And, Ty::U32, r(lane), imm(3));
    let l8 = b.bin(BinOp::And, Ty::U32, r(lane), imm(7));
    let l8b = b.bin(BinOp::Shr, Ty::U32, r(lane), imm(3));
    let mi_lo = b.bin(BinOp::And, Ty::U32, r(l8b), imm(1)); // (lane / 8) % 2
    let mi_hi = b.bin(BinOp::Shr, Ty::U32, r(lane), imm(4)); // lane / 16
    // Per term: the lane's byte offset inside a 16×16 operand tile.
    //   A [M][k], B [N][k] (no .trans): row (l%8) + 8·(mi%2 for A | mi/2 for B), col 8·(mi/2 | mi%2);
    //   A [k][M], B [k][N] (.trans):    row (l%8) + 8·(mi/2 for A | mi%2 for B), col 8·(mi%2 | mi/2).
    let lane_off = |b: &mut Builder, m: Mat, row_hi: Reg, col_hi: Reg| -> Reg {
        let row = madu(b, r(row_hi), imm(8), r(l8));
        let c = mulu(b, r(col_hi), imm(16));
        madu(b, r(row), imm(m.stride), r(c))
    };
    let mut offs = Vec::new();
    for t in &g.terms {
        let a = if t.a_t { lane_off(b, t.a, mi_hi, mi_lo) } else { lane_off(b, t.a, mi_lo, mi_hi) };
        let bb = if t.b_t { lane_off(b, t.b, mi_hi, mi_lo) } else { lane_off(b, t.b, mi_lo, mi_hi) };
        let a = addu(b, r(a), r(cx.smem));
        let bb = addu(b, r(bb), r(cx.smem));
        offs.push((a, bb));
    }
    b.for_(Ty::U32, r(cx.warp), imm(tiles), imm(cx.threads / 32), |b, tile| {
        let mt = divu(b, r(tile), ntn);
        let nt = remu(b, r(tile), ntn);
        let m0 = mulu(b, r(mt), imm(16));
        let n0 = mulu(b, r(nt), imm(wn));
        let mut body = |b: &mut Builder| {
            let row0 = addu(b, r(m0), r(gid));
            let row1 = addu(b, r(row0), imm(8));
            let col_t = madu(b, r(tig), imm(2), r(n0));
            let mut acc: Vec<[Reg; 4]> = Vec::new();
            for j in 0..nt8 {
                let col = addu(b, r(col_t), imm(8 * j as u32));
                let (c0, c1) = init_acc(b, cx, g.init, row0, col);
                let (c2, c3) = init_acc(b, cx, g.init, row1, col);
                acc.push([c0, c1, c2, c3]);
            }
            for (t, &(a_lane, b_lane)) in g.terms.iter().zip(&offs) {
                if let Some(v) = t.scale_rows {
                    let f0 = v.ld(b, cx.smem, r(row0));
                    let f1 = v.ld(b, cx.smem, r(row1));
                    for a in &acc {
                        for (i, &x) in a.iter().enumerate() {
                            let f = if i < 2 { f0 } else { f1 };
                            b.bin_into(BinOp::Mul, x, r(f));
                        }
                    }
                }
                // Tile bases: A at rows m0 (or columns m0 when stored transposed), B at n0.
                let a_base =
                    if t.a_t { madu(b, r(m0), imm(2), r(a_lane)) } else { madu(b, r(m0), imm(t.a.stride), r(a_lane)) };
                let b_base =
                    if t.b_t { madu(b, r(n0), imm(t.b.stride), r(b_lane)) } else { madu(b, r(n0), imm(2), r(b_lane)) };
                let a_kstep = if t.a_t { t.a.stride } else { 2 };
                let b_kstep = if t.b_t { 2 } else { t.b.stride };
                let b_pair = if t.b_t { 16 * t.b.stride } else { 32 };
                let kend = if t.a_lower { Operand::Reg(addu(b, r(m0), imm(16))) } else { imm(t.k) };
                b.for_(Ty::U32, imm(0), kend, imm(16), |b, k0| {
                    let aa = madu(b, r(k0), imm(a_kstep), r(a_base));
                    let aa = aa_off(b, aa, t.a.off);
                    let af = b.ldmatrix(4, t.a_t, r(aa));
                    let af = [af[0], af[1], af[2], af[3]];
                    let ba = madu(b, r(k0), imm(b_kstep), r(b_base));
                    for p in 0..nt8 / 2 {
                        let at = addu(b, r(ba), imm(t.b.off + p as u32 * b_pair));
                        let bf = b.ldmatrix(4, !t.b_t, r(at));
                        for (h, j) in [(0usize, 2 * p), (2, 2 * p + 1)] {
                            let d = acc[j];
                            b.inst(Inst::Mma { d, a: af, b: [bf[h], bf[h + 1]], c: d });
                        }
                    }
                });
            }
            for (j, a) in acc.iter().enumerate() {
                let col = addu(b, r(col_t), imm(8 * j as u32));
                epi(b, row0, col, a[0], a[1]);
                epi(b, row1, col, a[2], a[3]);
            }
        };
        if g.skip_upper {
            let last = addu(b, r(m0), imm(15));
            let live = b.setp(Cmp::Le, Ty::U32, r(n0), r(last));
            b.if_(live, body);
        } else {
            body(b);
        }
    });
}

/// `addr + off` (ldmatrix takes a plain register address).
fn aa_off(b: &mut Builder, addr: Reg, off: u32) -> Reg {
    if off == 0 { addr } else { addu(b, r(addr), imm(off)) }
}

/// f32 products: each thread computes output pairs `(row, col..col+1)`, round robin over the block.
fn gemm_simt(b: &mut Builder, cx: &Ctx, g: &Gemm, epi: Epilogue) {
    debug_assert!(g.n.is_multiple_of(2));
    let half = g.n / 2;
    b.for_(Ty::U32, r(cx.tid), imm(g.m * half), imm(cx.threads), |b, idx| {
        let row = divu(b, r(idx), half);
        let cp = remu(b, r(idx), half);
        let col = mulu(b, r(cp), imm(2));
        let mut body = |b: &mut Builder| {
            let (i0, i1) = init_acc(b, cx, g.init, row, col);
            let acc0 = b.mov(Ty::F32, r(i0));
            let acc1 = b.mov(Ty::F32, r(i1));
            for t in &g.terms {
                if let Some(v) = t.scale_rows {
                    let f = v.ld(b, cx.smem, r(row));
                    b.bin_into(BinOp::Mul, acc0, r(f));
                    b.bin_into(BinOp::Mul, acc1, r(f));
                }
                let kstart = if t.b_lower { r(col) } else { imm(0) };
                let kend = if t.a_lower { Operand::Reg(addu(b, r(row), imm(1))) } else { imm(t.k) };
                let col1 = addu(b, r(col), imm(1));
                b.for_(Ty::U32, kstart, kend, imm(1), |b, kk| {
                    let a = if t.a_t { t.a.ld1(b, cx.smem, r(kk), r(row)) } else { t.a.ld1(b, cx.smem, r(row), r(kk)) };
                    let (b0, b1) = if t.b_t {
                        (t.b.ld1(b, cx.smem, r(col), r(kk)), t.b.ld1(b, cx.smem, r(col1), r(kk)))
                    } else {
                        t.b.ld_pair(b, cx.smem, r(kk), r(col))
                    };
                    b.mad_into(acc0, r(a), r(b0));
                    b.mad_into(acc1, r(a), r(b1));
                });
            }
            epi(b, row, col, acc0, acc1);
        };
        if g.skip_upper {
            let live = b.setp(Cmp::Le, Ty::U32, r(col), r(row));
            b.if_(live, body);
        } else {
            body(b);
        }
    });
}

// ====================================================================== prefill: delta_scan

/// The program buffers of a `delta_scan` kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaScanOperands {
    pub q: BufferId,
    pub k: BufferId,
    pub v: BufferId,
    pub beta: BufferId,
    /// The log-decay (gated only).
    pub g: Option<BufferId>,
    pub state: BufferId,
    pub lens: BufferId,
    pub o: BufferId,
}

impl DeltaScanOperands {
    /// Buffers numbered in parameter order: q 0, k 1, v 2, beta 3, g 4, state 5, lens 6, o 7.
    pub fn numbered() -> DeltaScanOperands {
        DeltaScanOperands {
            q: BufferId(0),
            k: BufferId(1),
            v: BufferId(2),
            beta: BufferId(3),
            g: Some(BufferId(4)),
            state: BufferId(5),
            lens: BufferId(6),
            o: BufferId(7),
        }
    }
}

/// A `delta_scan` (DeltaNet / Gated DeltaNet prefill) kernel to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaScanSpec {
    pub name: String,
    pub heads: u32,
    pub dk: u32,
    pub dv: u32,
    /// Tokens per chunk: a multiple of 16, at most 64 (the op's `chunk`, or smaller).
    pub chunk: u32,
    /// Columns of the value tile per block (divides `dv`); `None`: the widest that fits 163 KB.
    pub v_tile: Option<u32>,
    /// `None`: `Mma` when `dk`, the value tile and the chunk are multiples of 16, else `Simt`.
    pub engine: Option<Engine>,
    pub scale: f32,
    pub gated: bool,
    /// The batch (grid y) and the tokens per sequence (the `T` parameter).
    pub batch: Dim,
    pub tokens: Dim,
    pub operands: DeltaScanOperands,
}

impl DeltaScanSpec {
    /// Chunk 64, scale `1/√dk`, batch `B`, tokens `T`, numbered operands (g dropped when not gated).
    pub fn new(name: impl Into<String>, heads: u32, dk: u32, dv: u32, gated: bool) -> DeltaScanSpec {
        let mut operands = DeltaScanOperands::numbered();
        if !gated {
            operands.g = None;
        }
        DeltaScanSpec {
            name: name.into(),
            heads,
            dk,
            dv,
            chunk: 64,
            v_tile: None,
            engine: None,
            scale: 1.0 / (dk as f32).sqrt(),
            gated,
            batch: Dim::sym(Sym::B),
            tokens: Dim::sym(Sym::T),
            operands,
        }
    }
}

/// Where everything lives in the prefill kernel's shared memory (byte offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScanLayout {
    ks: Mat,
    qs: Mat,
    /// V tile, overwritten by R.
    vs: Mat,
    beta: Vec32,
    g: Vec32,
    cum: Vec32,
    eg: Vec32,
    egl: Vec32,
    /// T in bf16.
    tb: Mat,
    /// The state slice, f32 and bf16.
    sf: Mat,
    sb: Mat,
    // Union, first half of a chunk.
    a: Mat,
    tf: Mat,
    ys: Mat,
    // Union, second half.
    p: Mat,
    vn: Mat,
    vd: Mat,
    vdl: Mat,
    bytes: u32,
}

fn scan_layout(c: u32, dk: u32, bv: u32, gated: bool) -> ScanLayout {
    let mut off = 0u32;
    let mut alloc = |bytes: u32| {
        let at = off;
        off = round_up(off + bytes, 16);
        at
    };
    let sk = 2 * (round_up(dk, 8) + 8);
    let sv = 2 * (round_up(bv, 8) + 8);
    let sc = 2 * (c + 8);
    let fc = 4 * (c + 4);
    let vl = round_up(c, 32);
    let ks = Mat::bf16(alloc(c * sk), sk);
    let qs = Mat::bf16(alloc(c * sk), sk);
    let vs = Mat::bf16(alloc(c * sv), sv);
    let beta = Vec32 { off: alloc(4 * vl) };
    let (g, cum, eg, egl) = if gated {
        (
            Vec32 { off: alloc(4 * vl) },
            Vec32 { off: alloc(4 * vl) },
            Vec32 { off: alloc(4 * vl) },
            Vec32 { off: alloc(4 * vl) },
        )
    } else {
        (beta, beta, beta, beta)
    };
    let tb = Mat::bf16(alloc(c * sc), sc);
    let sfs = 4 * (bv + 4);
    let sf = Mat::f32(alloc(dk * sfs), sfs);
    let sb = Mat::bf16(alloc(dk * sv), sv);
    let u = off;
    let a = Mat::f32(u, fc);
    let tf = Mat::f32(u + c * fc, fc);
    let ys = Mat::f32(u + 2 * c * fc, fc);
    let end1 = u + 2 * c * fc + 16 * fc;
    let p = Mat::bf16(u, sc);
    let vn = Mat::bf16(u + c * sc, sv);
    let mut e2 = u + c * sc + c * sv;
    let vd = if gated {
        let m = Mat::bf16(e2, sv);
        e2 += c * sv;
        m
    } else {
        vn
    };
    let vdl = Mat::bf16(e2, sv);
    e2 += c * sv;
    ScanLayout { ks, qs, vs, beta, g, cum, eg, egl, tb, sf, sb, a, tf, ys, p, vn, vd, vdl, bytes: end1.max(e2) }
}

/// The resolved shape of a `delta_scan` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanPlan {
    pub engine: Engine,
    pub chunk: u32,
    /// Columns of the value tile per block, and tiles per head.
    pub v_tile: u32,
    pub v_tiles: u32,
    pub threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
}

/// Checks a `delta_scan` spec and resolves its engine, value tile and shared memory.
pub fn scan_plan(spec: &DeltaScanSpec) -> Result<ScanPlan, CodegenError> {
    let shape = |m: String| Err(CodegenError::Shape(format!("delta_scan {}: {m}", spec.name)));
    let (c, dk, dv) = (spec.chunk, spec.dk, spec.dv);
    if spec.heads == 0 || dk == 0 || dv == 0 {
        return shape("heads, dk and dv must be positive".into());
    }
    if c == 0 || !c.is_multiple_of(16) || c > 64 {
        return shape(format!("chunk {c} must be a multiple of 16, at most 64"));
    }
    if !dv.is_multiple_of(2) {
        return shape(format!("dv {dv} must be even"));
    }
    if spec.gated != spec.operands.g.is_some() {
        return shape("the g operand must be given exactly when gated".into());
    }
    let mma_ok = |bv: u32| dk.is_multiple_of(16) && bv.is_multiple_of(16);
    let tiles: Vec<u32> = match spec.v_tile {
        Some(t) => vec![t],
        None => {
            let mut t: Vec<u32> =
                [dv, 128, 64, 32, 16].into_iter().filter(|&t| t <= dv && dv.is_multiple_of(t)).collect();
            t.dedup();
            t
        }
    };
    for &bv in &tiles {
        if bv == 0 || !dv.is_multiple_of(bv) || !bv.is_multiple_of(2) {
            return shape(format!("value tile {bv} must be even and divide dv {dv}"));
        }
        let engine = match spec.engine {
            Some(Engine::Mma) if !mma_ok(bv) => {
                return shape(format!("the mma engine needs dk ({dk}) and the value tile ({bv}) multiples of 16"));
            }
            Some(e) => e,
            None if mma_ok(bv) => Engine::Mma,
            None => Engine::Simt,
        };
        let bytes = scan_layout(c, dk, bv, spec.gated).bytes;
        let budget = if spec.v_tile.is_some() { SM90_SHARED } else { SM80_SHARED };
        if bytes <= budget {
            return Ok(ScanPlan {
                engine,
                chunk: c,
                v_tile: bv,
                v_tiles: dv / bv,
                threads: SCAN_THREADS,
                shared_bytes: bytes,
            });
        }
    }
    shape(format!("no value tile of dv {dv} fits in shared memory with dk {dk} and chunk {c}"))
}

/// Generates the chunkwise WY prefill kernel and its launch rule.
pub fn delta_scan(spec: &DeltaScanSpec) -> Result<Generated, CodegenError> {
    let plan = scan_plan(spec)?;
    let kernel = build_scan(spec, &plan);
    let o = &spec.operands;
    let mut args = vec![ArgRule::Buffer(o.q), ArgRule::Buffer(o.k), ArgRule::Buffer(o.v), ArgRule::Buffer(o.beta)];
    if let Some(g) = o.g {
        args.push(ArgRule::Buffer(g));
    }
    args.extend([
        ArgRule::Buffer(o.state),
        ArgRule::Buffer(o.lens),
        ArgRule::Buffer(o.o),
        ArgRule::Size(spec.tokens.clone()),
    ]);
    let launch = LaunchRule {
        grid: [Dim::constant(i64::from(spec.heads * plan.v_tiles)), spec.batch.clone(), Dim::constant(1)],
        block: [plan.threads, 1, 1],
        dynamic_shared: plan.shared_bytes,
        args,
    };
    Ok(Generated { kernel, launch })
}

/// Loads `rows × width` bf16 (row `i` at global element `row0 + i·row_step`, columns from `col0`) into
/// `dst`, zero-filling rows `≥ valid` (16-byte `cp.async` when `width` and the row pitch allow).
#[allow(clippy::too_many_arguments)]
fn load_rows(
    b: &mut Builder,
    cx: &Ctx,
    src: Reg,
    row0: Reg,
    row_step: u32,
    pitch: u32,
    col0: Operand,
    rows: u32,
    width: u32,
    valid: Reg,
    dst: Mat,
) {
    let last = subu(b, r(valid), imm(1));
    if width.is_multiple_of(8) && pitch.is_multiple_of(8) {
        let per_row = width / 8;
        b.for_(Ty::U32, r(cx.tid), imm(rows * per_row), imm(cx.threads), |b, idx| {
            let i = divu(b, r(idx), per_row);
            let ch = remu(b, r(idx), per_row);
            let ok = ltu(b, r(i), r(valid));
            let ic = minu(b, r(i), r(last));
            let grow = madu(b, r(ic), imm(row_step), r(row0));
            let col = madu(b, r(ch), imm(8), col0);
            let elem = madu(b, r(grow), imm(pitch), r(col));
            let ga = gaddr(b, src, elem, 2);
            let bytes = b.selp(Ty::U32, imm(16), imm(0), ok);
            let da = dst.addr(b, cx.smem, r(i), imm(0));
            let da = madu(b, r(ch), imm(16), r(da));
            let da = aa_off(b, da, dst.off);
            b.cp_async(r(da), r(ga), 16, Some(r(bytes)));
        });
    } else {
        b.for_(Ty::U32, r(cx.tid), imm(rows * width), imm(cx.threads), |b, idx| {
            let i = divu(b, r(idx), width);
            let c = remu(b, r(idx), width);
            let ok = ltu(b, r(i), r(valid));
            let ic = minu(b, r(i), r(last));
            let grow = madu(b, r(ic), imm(row_step), r(row0));
            let col = addu(b, r(c), col0);
            let elem = madu(b, r(grow), imm(pitch), r(col));
            let ga = gaddr(b, src, elem, 2);
            let x = b.ld(Space::Global, Ty::U16, Cache::ReadOnly, r(ga), 0);
            let x = b.selp(Ty::U16, r(x), imm(0), ok);
            let da = dst.addr(b, cx.smem, r(i), r(c));
            b.st(Space::Shared, Ty::U16, r(da), i64::from(dst.off), r(x));
        });
    }
}

fn build_scan(spec: &DeltaScanSpec, plan: &ScanPlan) -> Kernel {
    let (c, dk, dv, hh) = (plan.chunk, spec.dk, spec.dv, spec.heads);
    let bv = plan.v_tile;
    let nvt = plan.v_tiles;
    let gated = spec.gated;
    let eng = plan.engine;
    let lay = scan_layout(c, dk, bv, gated);
    let nb = c / 16;
    let vl = round_up(c, 32);

    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "delta_scan ({}): chunkwise WY prefill, chunk {c}, dk {dk}, dv {dv} (value tile {bv}), {hh} heads, {:?} engine",
        if gated { "Gated DeltaNet" } else { "DeltaNet" },
        eng
    ));
    b.doc(format!(
        "grid (heads*{nvt}, B), {} threads, {} bytes of dynamic shared memory; params q, k, v, beta, {}state, lens, o, T",
        plan.threads,
        lay.bytes,
        if gated { "g, " } else { "" }
    ));
    b.block_size(plan.threads, 1, 1);
    let q = b.param_ptr("q");
    let k = b.param_ptr("k");
    let v = b.param_ptr("v");
    let beta = b.param_ptr("beta");
    let g = if gated { Some(b.param_ptr("g")) } else { None };
    let state = b.param_ptr("state");
    let lens = b.param_ptr("lens");
    let o = b.param_ptr("o");
    let t_len = b.param(ParamTy::U32, "T");
    let dynsh = b.dynamic_shared();
    let smem = b.shared_addr(dynsh);
    let tid = b.special(Special::TidX);
    let lane = b.bin(BinOp::And, Ty::U32, r(tid), imm(31));
    let warp = b.bin(BinOp::Shr, Ty::U32, r(tid), imm(5));
    let cx = Ctx { smem, tid, warp, lane, threads: plan.threads };
    let bx = b.special(Special::CtaidX);
    let bi = b.special(Special::CtaidY);
    let h = divu(&mut b, r(bx), nvt);
    let vt = remu(&mut b, r(bx), nvt);
    let col0 = mulu(&mut b, r(vt), imm(bv));
    // lens[b], clamped to 0..=T.
    let la = gaddr(&mut b, lens, bi, 4);
    let len_s = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, r(la), 0);
    let len_s = b.bin(BinOp::Max, Ty::S32, r(len_s), imm(0));
    let len_u = b.reg(Ty::U32);
    b.inst(Inst::Mov { ty: Ty::B32, dst: len_u, src: r(len_s) });
    let len_u = minu(&mut b, r(len_u), r(t_len));
    // The state slice: rows of dv f32 from column col0.
    let bh = madu(&mut b, r(bi), imm(hh), r(h));
    let st_elem = madu(&mut b, r(bh), imm(dk * dv), r(col0));
    let st_base = gaddr(&mut b, state, st_elem, 4);

    b.comment("initial state: S (f32) and its bf16 copy");
    let half = bv / 2;
    b.for_(Ty::U32, r(tid), imm(dk * half), imm(plan.threads), |b, idx| {
        let a = divu(b, r(idx), half);
        let cp = remu(b, r(idx), half);
        let cc = mulu(b, r(cp), imm(2));
        let e = madu(b, r(a), imm(dv), r(cc));
        let ga = gaddr(b, st_base, e, 4);
        let x = b.ld_vec(Space::Global, Ty::F32, Cache::None, r(ga), 0, 2);
        lay.sf.st_pair(b, smem, r(a), r(cc), x[0], x[1]);
        lay.sb.st_pair(b, smem, r(a), r(cc), x[0], x[1]);
    });
    b.bar();

    let scale = spec.scale;
    b.for_uniform(Ty::U32, imm(0), r(t_len), imm(c), |b, t0| {
        b.comment("chunk: load K, Q, the V tile, beta and g (zero past T)");
        let rest = subu(b, r(t_len), r(t0));
        let valid = minu(b, imm(c), r(rest));
        // The local row where lens[b] ends, if it ends in this chunk.
        let l_end = subu(b, r(len_u), r(t0));
        let l = subu(b, r(l_end), imm(1));
        let snap = ltu(b, r(l), r(valid));
        let bt = madu(b, r(bi), r(t_len), r(t0));
        let row0 = madu(b, r(bt), imm(hh), r(h));
        load_rows(b, &cx, k, row0, hh, dk, imm(0), c, dk, valid, lay.ks);
        load_rows(b, &cx, q, row0, hh, dk, imm(0), c, dk, valid, lay.qs);
        load_rows(b, &cx, v, row0, hh, dv, r(col0), c, bv, valid, lay.vs);
        b.cp_async_commit();
        let in_vec = ltu(b, r(tid), imm(vl));
        b.if_(in_vec, |b| {
            let ok = ltu(b, r(tid), r(valid));
            let last = subu(b, r(valid), imm(1));
            let ic = minu(b, r(tid), r(last));
            let grow = madu(b, r(ic), imm(hh), r(row0));
            let ba = gaddr(b, beta, grow, 2);
            let x = ld_bf16(b, Space::Global, Cache::ReadOnly, ba, 0);
            let x = b.selp(Ty::F32, r(x), Operand::F32(0.0), ok);
            lay.beta.st(b, smem, r(tid), x);
            if let Some(g) = g {
                let ga = gaddr(b, g, grow, 2);
                let y = ld_bf16(b, Space::Global, Cache::ReadOnly, ga, 0);
                let y = b.selp(Ty::F32, r(y), Operand::F32(0.0), ok);
                lay.g.st(b, smem, r(tid), y);
            }
        });
        b.cp_async_wait(0);
        b.bar();

        if gated {
            b.comment("G = cumsum(g) in the chunk (warp 0), e^G and e^(G_last - G)");
            let w0 = b.setp(Cmp::Eq, Ty::U32, r(warp), imm(0));
            b.if_(w0, |b| {
                let carry = fzero(b);
                let mut xs = Vec::new();
                for p in 0..vl / 32 {
                    let idx = addu(b, r(lane), imm(32 * p));
                    let x = lay.g.ld(b, smem, r(idx));
                    for off in [1u32, 2, 4, 8, 16] {
                        let y = b.shfl(ShflMode::Up, x, imm(off));
                        let has = b.setp(Cmp::Ge, Ty::U32, r(lane), imm(off));
                        let y = b.selp(Ty::F32, r(y), Operand::F32(0.0), has);
                        b.bin_into(BinOp::Add, x, r(y));
                    }
                    b.bin_into(BinOp::Add, x, r(carry));
                    lay.cum.st(b, smem, r(idx), x);
                    let tot = b.shfl(ShflMode::Idx, x, imm(31));
                    b.assign(carry, r(tot));
                    xs.push((idx, x));
                }
                for (idx, x) in xs {
                    let e = exp(b, r(x));
                    lay.eg.st(b, smem, r(idx), e);
                    let d = fsub(b, r(carry), r(x));
                    let e = exp(b, r(d));
                    lay.egl.st(b, smem, r(idx), e);
                }
            });
            b.bar();
        }

        b.comment("A = beta_i e^(G_i-G_j) K K^T (strict lower, f32); R = beta (V - e^G (K S)) over V");
        let ga = Gemm {
            m: c,
            n: c,
            terms: vec![Term::new(lay.ks, false, lay.ks, true, dk)],
            init: Init::Zero,
            skip_upper: true,
        };
        gemm(b, &cx, eng, &ga, &mut |b, row, col, v0, v1| {
            let bi_ = lay.beta.ld(b, smem, r(row));
            let mut vals = [v0, v1];
            if gated {
                let gi = lay.cum.ld(b, smem, r(row));
                let (g0, g1) = lay.cum.ld_pair(b, smem, r(col));
                for (x, gj) in vals.iter_mut().zip([g0, g1]) {
                    let d = fsub(b, r(gi), r(gj));
                    let d = fmin(b, r(d), Operand::F32(0.0));
                    let e = exp(b, r(d));
                    *x = fmul(b, r(*x), r(e));
                }
            }
            let col1 = addu(b, r(col), imm(1));
            let mut out = [v0, v1];
            for (e, (x, cj)) in vals.iter().zip([col, col1]).enumerate() {
                let y = fmul(b, r(*x), r(bi_));
                let below = ltu(b, r(cj), r(row));
                out[e] = b.selp(Ty::F32, r(y), Operand::F32(0.0), below);
            }
            lay.a.st_pair(b, smem, r(row), r(col), out[0], out[1]);
        });
        let gr = Gemm {
            m: c,
            n: bv,
            terms: vec![Term::new(lay.ks, false, lay.sb, false, dk)],
            init: Init::Zero,
            skip_upper: false,
        };
        gemm(b, &cx, eng, &gr, &mut |b, row, col, v0, v1| {
            let bi_ = lay.beta.ld(b, smem, r(row));
            let (x0, x1) = lay.vs.ld_pair(b, smem, r(row), r(col));
            let (s0, s1) = if gated {
                let e = lay.eg.ld(b, smem, r(row));
                (fmul(b, r(v0), r(e)), fmul(b, r(v1), r(e)))
            } else {
                (v0, v1)
            };
            let d0 = fsub(b, r(x0), r(s0));
            let d1 = fsub(b, r(x1), r(s1));
            let y0 = fmul(b, r(d0), r(bi_));
            let y1 = fmul(b, r(d1), r(bi_));
            lay.vs.st_pair(b, smem, r(row), r(col), y0, y1);
        });
        b.bar();

        b.comment("T = (I + A)^-1: diagonal 16x16 blocks by forward substitution, one thread per column");
        let in_c = ltu(b, r(tid), imm(c));
        b.if_(in_c, |b| {
            let blk = b.bin(BinOp::Shr, Ty::U32, r(tid), imm(4));
            let j = b.bin(BinOp::And, Ty::U32, r(tid), imm(15));
            let r0 = mulu(b, r(blk), imm(16));
            let colj = addu(b, r(r0), r(j));
            b.for_(Ty::U32, imm(0), imm(16), imm(1), |b, i| {
                let acc = fzero(b);
                let row = addu(b, r(r0), r(i));
                b.for_(Ty::U32, r(j), r(i), imm(1), |b, m| {
                    let rm = addu(b, r(r0), r(m));
                    let a = lay.a.ld1(b, smem, r(row), r(rm));
                    let t = lay.tf.ld1(b, smem, r(rm), r(colj));
                    b.mad_into(acc, r(a), r(t));
                });
                let diag = b.setp(Cmp::Eq, Ty::U32, r(i), r(j));
                let neg = fsub(b, Operand::F32(0.0), r(acc));
                let val = b.selp(Ty::F32, Operand::F32(1.0), r(neg), diag);
                lay.tf.st1(b, smem, r(row), r(colj), val);
                lay.tb.st1(b, smem, r(row), r(colj), val);
            });
        });
        b.bar();
        for bi_row in 1..nb {
            b.comment(format!("T block row {bi_row}: Y = A[I, :I] T[:I, :I]; T[I, :I] = -T_II Y"));
            let w = 16 * bi_row;
            let mut ty = Term::new(lay.a.at(w, 0), false, lay.tf, false, w);
            ty.b_lower = true;
            let gy = Gemm { m: 16, n: w, terms: vec![ty], init: Init::Zero, skip_upper: false };
            gemm(b, &cx, Engine::Simt, &gy, &mut |b, row, col, v0, v1| {
                lay.ys.st_pair(b, smem, r(row), r(col), v0, v1);
            });
            b.bar();
            let mut tt = Term::new(lay.tf.at(w, w), false, lay.ys, false, 16);
            tt.a_lower = true;
            let gt = Gemm { m: 16, n: w, terms: vec![tt], init: Init::Zero, skip_upper: false };
            let tf_row = lay.tf.at(w, 0);
            let tb_row = lay.tb.at(w, 0);
            gemm(b, &cx, Engine::Simt, &gt, &mut |b, row, col, v0, v1| {
                let n0 = b.un(UnOp::Neg, Ty::F32, r(v0));
                let n1 = b.un(UnOp::Neg, Ty::F32, r(v1));
                tf_row.st_pair(b, smem, r(row), r(col), n0, n1);
                tb_row.st_pair(b, smem, r(row), r(col), n0, n1);
            });
            b.bar();
        }

        b.comment("V_new = T R (bf16), V_d = e^(G_last-G) V_new, the lens-masked V_d; P = (Q K^T) e^(G_i-G_j), j <= i");
        let mut tn = Term::new(lay.tb, false, lay.vs, false, c);
        tn.a_lower = true;
        let gn = Gemm { m: c, n: bv, terms: vec![tn], init: Init::Zero, skip_upper: false };
        gemm(b, &cx, eng, &gn, &mut |b, row, col, v0, v1| {
            lay.vn.st_pair(b, smem, r(row), r(col), v0, v1);
            if gated {
                let e = lay.egl.ld(b, smem, r(row));
                let d0 = fmul(b, r(v0), r(e));
                let d1 = fmul(b, r(v1), r(e));
                lay.vd.st_pair(b, smem, r(row), r(col), d0, d1);
            }
            b.if_(snap, |b| {
                let keep = b.setp(Cmp::Le, Ty::U32, r(row), r(l));
                let (w0, w1) = if gated {
                    let gl = lay.cum.ld(b, smem, r(l));
                    let gr_ = lay.cum.ld(b, smem, r(row));
                    let d = fsub(b, r(gl), r(gr_));
                    let d = fmin(b, r(d), Operand::F32(0.0));
                    let e = exp(b, r(d));
                    (fmul(b, r(v0), r(e)), fmul(b, r(v1), r(e)))
                } else {
                    (v0, v1)
                };
                let w0 = b.selp(Ty::F32, r(w0), Operand::F32(0.0), keep);
                let w1 = b.selp(Ty::F32, r(w1), Operand::F32(0.0), keep);
                lay.vdl.st_pair(b, smem, r(row), r(col), w0, w1);
            });
        });
        let gp = Gemm {
            m: c,
            n: c,
            terms: vec![Term::new(lay.qs, false, lay.ks, true, dk)],
            init: Init::Zero,
            skip_upper: true,
        };
        gemm(b, &cx, eng, &gp, &mut |b, row, col, v0, v1| {
            let mut vals = [v0, v1];
            if gated {
                let gi = lay.cum.ld(b, smem, r(row));
                let (g0, g1) = lay.cum.ld_pair(b, smem, r(col));
                for (x, gj) in vals.iter_mut().zip([g0, g1]) {
                    let d = fsub(b, r(gi), r(gj));
                    let d = fmin(b, r(d), Operand::F32(0.0));
                    let e = exp(b, r(d));
                    *x = fmul(b, r(*x), r(e));
                }
            }
            let col1 = addu(b, r(col), imm(1));
            let mut out = [v0, v1];
            for (e, (x, cj)) in vals.iter().zip([col, col1]).enumerate() {
                let causal = b.setp(Cmp::Le, Ty::U32, r(cj), r(row));
                out[e] = b.selp(Ty::F32, r(*x), Operand::F32(0.0), causal);
            }
            lay.p.st_pair(b, smem, r(row), r(col), out[0], out[1]);
        });
        b.bar();

        b.comment("O = scale (e^G (Q S) + P V_new); the final state where lens[b] ends");
        let mut tpv = Term::new(lay.p, false, lay.vn, false, c);
        tpv.a_lower = true;
        if gated {
            tpv.scale_rows = Some(lay.eg);
        }
        let go = Gemm {
            m: c,
            n: bv,
            terms: vec![Term::new(lay.qs, false, lay.sb, false, dk), tpv],
            init: Init::Zero,
            skip_upper: false,
        };
        gemm(b, &cx, eng, &go, &mut |b, row, col, v0, v1| {
            let live = ltu(b, r(row), r(valid));
            b.if_(live, |b| {
                let grow = madu(b, r(row), imm(hh), r(row0));
                let cc = addu(b, r(col0), r(col));
                let e = madu(b, r(grow), imm(dv), r(cc));
                let ga = gaddr(b, o, e, 2);
                let y0 = fmul(b, r(v0), Operand::F32(scale));
                let y1 = fmul(b, r(v1), Operand::F32(scale));
                st_bf16x2(b, Space::Global, ga, 0, y0, y1);
            });
        });
        b.if_uniform(snap, |b| {
            let factor = if gated { Some(lay.eg.ld(b, smem, r(l))) } else { None };
            let gs = Gemm {
                m: dk,
                n: bv,
                terms: vec![Term::new(lay.ks, true, lay.vdl, false, c)],
                init: Init::Load { mat: lay.sf, factor },
                skip_upper: false,
            };
            gemm(b, &cx, eng, &gs, &mut |b, row, col, v0, v1| {
                let e = madu(b, r(row), imm(dv), r(col));
                let ga = gaddr(b, st_base, e, 4);
                b.st_vec(Space::Global, Ty::F32, r(ga), 0, vec![r(v0), r(v1)]);
            });
        });
        b.bar();

        b.comment("S = e^G_last S + K^T V_d");
        let factor = if gated { Some(lay.eg.ld(b, smem, imm(c - 1))) } else { None };
        let gu = Gemm {
            m: dk,
            n: bv,
            terms: vec![Term::new(lay.ks, true, lay.vd, false, c)],
            init: Init::Load { mat: lay.sf, factor },
            skip_upper: false,
        };
        gemm(b, &cx, eng, &gu, &mut |b, row, col, v0, v1| {
            lay.sf.st_pair(b, smem, r(row), r(col), v0, v1);
            lay.sb.st_pair(b, smem, r(row), r(col), v0, v1);
        });
        b.bar();
    });
    b.finish()
}

// ====================================================================== decode: the state core

/// How the decode kernels split the state: sub-blocks of 128 threads, each owning `tile = 4·cg`
/// columns and all `dk` rows; thread (row group `r < rg`, column group `c < cg`) holds rows
/// `r, r + rg, …` (`rows` of them) × 4 columns in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    pub cg: u32,
    pub rg: u32,
    pub rows: u32,
    pub tile: u32,
    /// Sub-blocks per block (1 for `delta_step`, `dv / tile` for `deltanet_step`).
    pub sub_blocks: u32,
    pub threads: u32,
}

fn step_shape(dk: u32, cg: u32, sub_blocks: u32) -> StepShape {
    let rg = STEP_SUB_THREADS / cg;
    StepShape { cg, rg, rows: dk.div_ceil(rg), tile: 4 * cg, sub_blocks, threads: STEP_SUB_THREADS * sub_blocks }
}

fn step_dims_ok(what: &str, name: &str, heads: u32, dk: u32, dv: u32) -> Result<(), CodegenError> {
    if heads == 0 || dk == 0 || dv == 0 || !dv.is_multiple_of(4) {
        return Err(CodegenError::Shape(format!(
            "{what} {name}: heads, dk and dv must be positive and dv a multiple of 4 (dk {dk}, dv {dv})"
        )));
    }
    Ok(())
}

/// The per-thread view of the state core.
struct Core {
    /// This thread's row group, its lane and its warp within the sub-block.
    rgi: Reg,
    lane: Reg,
    wsub: Reg,
    /// `smem + sub_block·4·tile·4 + cgi·16`: this thread's column slot in the reduction buffers.
    red_slot: Reg,
    /// The thread's first column within the head.
    col: Reg,
    /// The thread's rows and, for the last one when `rg·rows > dk`, whether it exists.
    rows: Vec<Reg>,
    last_ok: Option<Reg>,
}

/// `red_block`: the sub-block's index in the reduction buffers; `col_tile`: its column tile in the head.
#[allow(clippy::too_many_arguments)]
fn core_ctx(
    b: &mut Builder,
    sh: &StepShape,
    dk: u32,
    smem: Reg,
    tid: Reg,
    red_block: Operand,
    col_tile: Operand,
) -> Core {
    let st = b.bin(BinOp::And, Ty::U32, r(tid), imm(STEP_SUB_THREADS - 1));
    let cgi = remu(b, r(st), sh.cg);
    let rgi = divu(b, r(st), sh.cg);
    let lane = b.bin(BinOp::And, Ty::U32, r(st), imm(31));
    let wsub = b.bin(BinOp::Shr, Ty::U32, r(st), imm(5));
    let slot = madu(b, red_block, imm(4 * sh.tile * 4), r(smem));
    let red_slot = madu(b, r(cgi), imm(16), r(slot));
    let c4 = mulu(b, r(cgi), imm(4));
    let col = madu(b, col_tile, imm(sh.tile), r(c4));
    let rows: Vec<Reg> = (0..sh.rows).map(|i| addu(b, r(rgi), imm(i * sh.rg))).collect();
    let last_ok = if sh.rg * sh.rows > dk {
        let last = *rows.last().unwrap_or(&rgi);
        Some(ltu(b, r(last), imm(dk)))
    } else {
        None
    };
    Core { rgi, lane, wsub, red_slot, col, rows, last_ok }
}

impl Core {
    /// Runs `f` for row `i`, guarded when that row may not exist.
    fn guarded(&self, b: &mut Builder, i: usize, f: impl FnOnce(&mut Builder)) {
        match self.last_ok {
            Some(p) if i + 1 == self.rows.len() => b.if_(p, f),
            _ => f(b),
        }
    }

    /// Loads the thread's state registers (zero for a missing row): `state + (row·dv + col)·4`.
    fn load_state(&self, b: &mut Builder, st_base: Reg, dv: u32) -> Vec<[Reg; 4]> {
        let mut s = Vec::new();
        for i in 0..self.rows.len() {
            let regs = [b.reg(Ty::F32), b.reg(Ty::F32), b.reg(Ty::F32), b.reg(Ty::F32)];
            if self.last_ok.is_some() && i + 1 == self.rows.len() {
                for x in regs {
                    b.assign(x, Operand::F32(0.0));
                }
            }
            let row = self.rows[i];
            let col = self.col;
            self.guarded(b, i, |b| {
                let e = madu(b, r(row), imm(dv), r(col));
                let ga = gaddr(b, st_base, e, 4);
                b.inst(Inst::Ld {
                    space: Space::Global,
                    ty: Ty::F32,
                    cache: Cache::None,
                    dst: regs.to_vec(),
                    addr: r(ga),
                    offset: 0,
                });
            });
            s.push(regs);
        }
        s
    }

    /// One value per row (0 for a missing row), from `load(row)`.
    fn per_row(&self, b: &mut Builder, mut load: impl FnMut(&mut Builder, Reg) -> Reg) -> Vec<Reg> {
        let mut out = Vec::new();
        for i in 0..self.rows.len() {
            let x = fzero(b);
            let row = self.rows[i];
            self.guarded(b, i, |b| {
                let y = load(b, row);
                b.assign(x, r(y));
            });
            out.push(x);
        }
        out
    }

    /// Partial column sums `Σ_i w_i·S[i][·]` reduced over the lanes of the warp (butterfly over the
    /// row groups) and written by the warp's first row group to `slot + wsub·tile·4 + buf`.
    fn partial(&self, b: &mut Builder, sh: &StepShape, s: &[[Reg; 4]], w: &[Reg], buf: u32) {
        let mut p = [fzero(b), fzero(b), fzero(b), fzero(b)];
        for (si, wi) in s.iter().zip(w) {
            for j in 0..4 {
                b.mad_into(p[j], r(si[j]), r(*wi));
            }
        }
        let mut off = sh.cg;
        while off < 32 {
            for x in &mut p {
                let y = b.shfl(ShflMode::Bfly, *x, imm(off));
                *x = fadd(b, r(*x), r(y));
            }
            off *= 2;
        }
        let first = ltu(b, r(self.lane), imm(sh.cg));
        let at = madu(b, r(self.wsub), imm(sh.tile * 4), r(self.red_slot));
        b.if_(first, |b| {
            b.st_vec(Space::Shared, Ty::F32, r(at), i64::from(buf), p.iter().map(|x| r(*x)).collect());
        });
    }

    /// The four warps' partials summed (after a barrier).
    fn total(&self, b: &mut Builder, sh: &StepShape, buf: u32) -> [Reg; 4] {
        let t = [fzero(b), fzero(b), fzero(b), fzero(b)];
        for w in 0..STEP_SUB_THREADS / 32 {
            let x =
                b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(self.red_slot), i64::from(buf + w * sh.tile * 4), 4);
            for j in 0..4 {
                b.bin_into(BinOp::Add, t[j], r(x[j]));
            }
        }
        t
    }

    /// The decode update on the registers: `S ← α·S; v' = β·(v − Sᵀk); S ← S + k·v'ᵀ` (stored back),
    /// then `out(Sᵀq)` in the threads of row group 0. Two barriers; the reduction buffers are
    /// `buf1`, `buf2` (each `sub_blocks·4·tile` f32). `qv` emits the thread's q values where they are
    /// first needed (after the state is stored), so a kernel that keeps q in shared memory does not
    /// hold them in registers across the first reduction.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        b: &mut Builder,
        sh: &StepShape,
        s: &[[Reg; 4]],
        kv: &[Reg],
        qv: impl FnOnce(&mut Builder) -> Vec<Reg>,
        v4: [Reg; 4],
        beta: Reg,
        alpha: Option<Reg>,
        st_base: Reg,
        dv: u32,
        bufs: (u32, u32),
        out: impl FnOnce(&mut Builder, [Reg; 4]),
    ) {
        if let Some(a) = alpha {
            for row in s {
                for &x in row {
                    b.bin_into(BinOp::Mul, x, r(a));
                }
            }
        }
        self.partial(b, sh, s, kv, bufs.0);
        b.bar();
        let sk = self.total(b, sh, bufs.0);
        let mut vp = [fzero(b); 4];
        for j in 0..4 {
            let d = fsub(b, r(v4[j]), r(sk[j]));
            vp[j] = fmul(b, r(d), r(beta));
        }
        for (i, (row_s, ki)) in s.iter().zip(kv).enumerate() {
            for j in 0..4 {
                b.mad_into(row_s[j], r(*ki), r(vp[j]));
            }
            let row = self.rows[i];
            let col = self.col;
            self.guarded(b, i, |b| {
                let e = madu(b, r(row), imm(dv), r(col));
                let ga = gaddr(b, st_base, e, 4);
                b.st_vec(Space::Global, Ty::F32, r(ga), 0, row_s.iter().map(|x| r(*x)).collect());
            });
        }
        let qv = qv(b);
        self.partial(b, sh, s, &qv, bufs.1);
        b.bar();
        let lead = b.setp(Cmp::Eq, Ty::U32, r(self.rgi), imm(0));
        b.if_(lead, |b| {
            let o = self.total(b, sh, bufs.1);
            out(b, o);
        });
    }
}

// ====================================================================== decode: delta_step

/// The program buffers of a `delta_step` kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaStepOperands {
    pub q: BufferId,
    pub k: BufferId,
    pub v: BufferId,
    pub beta: BufferId,
    pub g: Option<BufferId>,
    pub state: BufferId,
    pub o: BufferId,
}

impl DeltaStepOperands {
    /// Buffers numbered in parameter order: q 0, k 1, v 2, beta 3, g 4, state 5, o 6.
    pub fn numbered() -> DeltaStepOperands {
        DeltaStepOperands {
            q: BufferId(0),
            k: BufferId(1),
            v: BufferId(2),
            beta: BufferId(3),
            g: Some(BufferId(4)),
            state: BufferId(5),
            o: BufferId(6),
        }
    }
}

/// A `delta_step` (one decode token of the delta rule) kernel to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaStepSpec {
    pub name: String,
    pub heads: u32,
    pub dk: u32,
    pub dv: u32,
    pub scale: f32,
    pub gated: bool,
    pub batch: Dim,
    pub operands: DeltaStepOperands,
}

impl DeltaStepSpec {
    /// Scale `1/√dk`, batch `B`, numbered operands (g dropped when not gated).
    pub fn new(name: impl Into<String>, heads: u32, dk: u32, dv: u32, gated: bool) -> DeltaStepSpec {
        let mut operands = DeltaStepOperands::numbered();
        if !gated {
            operands.g = None;
        }
        DeltaStepSpec {
            name: name.into(),
            heads,
            dk,
            dv,
            scale: 1.0 / (dk as f32).sqrt(),
            gated,
            batch: Dim::sym(Sym::B),
            operands,
        }
    }
}

/// The split of a `delta_step` kernel: one sub-block per block, 16 columns per block when `dv` allows.
pub fn step_plan(spec: &DeltaStepSpec) -> Result<StepShape, CodegenError> {
    step_dims_ok("delta_step", &spec.name, spec.heads, spec.dk, spec.dv)?;
    if spec.gated != spec.operands.g.is_some() {
        return Err(CodegenError::Shape(format!("delta_step {}: g must be given exactly when gated", spec.name)));
    }
    let cg = [4u32, 2, 1].into_iter().find(|cg| spec.dv.is_multiple_of(4 * cg)).unwrap_or(1);
    Ok(step_shape(spec.dk, cg, 1))
}

/// Generates the one-token delta-rule kernel and its launch rule.
pub fn delta_step(spec: &DeltaStepSpec) -> Result<Generated, CodegenError> {
    let sh = step_plan(spec)?;
    let kernel = build_step(spec, &sh);
    let o = &spec.operands;
    let mut args = vec![ArgRule::Buffer(o.q), ArgRule::Buffer(o.k), ArgRule::Buffer(o.v), ArgRule::Buffer(o.beta)];
    if let Some(g) = o.g {
        args.push(ArgRule::Buffer(g));
    }
    args.extend([ArgRule::Buffer(o.state), ArgRule::Buffer(o.o)]);
    let tiles = spec.dv / sh.tile;
    let launch = LaunchRule {
        grid: [Dim::constant(i64::from(spec.heads * tiles)), spec.batch.clone(), Dim::constant(1)],
        block: [sh.threads, 1, 1],
        dynamic_shared: 0,
        args,
    };
    Ok(Generated { kernel, launch })
}

fn build_step(spec: &DeltaStepSpec, sh: &StepShape) -> Kernel {
    let (hh, dk, dv) = (spec.heads, spec.dk, spec.dv);
    let tiles = dv / sh.tile;
    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "delta_step ({}): dk {dk}, dv {dv}, {hh} heads; block = {} columns x {dk} rows, {} threads, {} rows x 4 columns of S per thread",
        if spec.gated { "gated" } else { "plain" },
        sh.tile,
        sh.threads,
        sh.rows
    ));
    b.doc(format!("grid (heads*{tiles}, B); params q, k, v, beta, {}state, o", if spec.gated { "g, " } else { "" }));
    b.block_size(sh.threads, 1, 1);
    let q = b.param_ptr("q");
    let k = b.param_ptr("k");
    let v = b.param_ptr("v");
    let beta = b.param_ptr("beta");
    let g = if spec.gated { Some(b.param_ptr("g")) } else { None };
    let state = b.param_ptr("state");
    let o = b.param_ptr("o");
    let red = b.shared("red", 2 * 4 * sh.tile * 4, 16);
    let smem = b.shared_addr(red);
    let tid = b.special(Special::TidX);
    let bx = b.special(Special::CtaidX);
    let bi = b.special(Special::CtaidY);
    let h = divu(&mut b, r(bx), tiles);
    let vt = remu(&mut b, r(bx), tiles);
    let bh = madu(&mut b, r(bi), imm(hh), r(h));
    let cx = core_ctx(&mut b, sh, dk, smem, tid, imm(0), r(vt));
    let se = mulu(&mut b, r(bh), imm(dk * dv));
    let st_base = gaddr(&mut b, state, se, 4);
    b.comment("the state slice first (the long loads), then q, k, v, beta, g");
    let s = cx.load_state(&mut b, st_base, dv);
    let kb = mulu(&mut b, r(bh), imm(dk));
    let kv = cx.per_row(&mut b, |b, row| {
        let e = addu(b, r(kb), r(row));
        let a = gaddr(b, k, e, 2);
        ld_bf16(b, Space::Global, Cache::ReadOnly, a, 0)
    });
    let qv = cx.per_row(&mut b, |b, row| {
        let e = addu(b, r(kb), r(row));
        let a = gaddr(b, q, e, 2);
        ld_bf16(b, Space::Global, Cache::ReadOnly, a, 0)
    });
    let ve = madu(&mut b, r(bh), imm(dv), r(cx.col));
    let va = gaddr(&mut b, v, ve, 2);
    let vw = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, r(va), 0, 2);
    let (v0, v1) = unpack_bf16x2(&mut b, vw[0]);
    let (v2, v3) = unpack_bf16x2(&mut b, vw[1]);
    let ba = gaddr(&mut b, beta, bh, 2);
    let be = ld_bf16(&mut b, Space::Global, Cache::ReadOnly, ba, 0);
    let alpha = g.map(|g| {
        let ga = gaddr(&mut b, g, bh, 2);
        let gv = ld_bf16(&mut b, Space::Global, Cache::ReadOnly, ga, 0);
        exp(&mut b, r(gv))
    });
    let scale = spec.scale;
    let col = cx.col;
    cx.update(
        &mut b,
        sh,
        &s,
        &kv,
        |_| qv,
        [v0, v1, v2, v3],
        be,
        alpha,
        st_base,
        dv,
        (0, 4 * sh.tile * 4),
        |b, ot| {
            let ys: Vec<Reg> = ot.iter().map(|x| fmul(b, r(*x), Operand::F32(scale))).collect();
            let oe = madu(b, r(bh), imm(dv), r(col));
            let oa = gaddr(b, o, oe, 2);
            let p0 = b.pack_bf16x2(r(ys[0]), r(ys[1]));
            let p1 = b.pack_bf16x2(r(ys[2]), r(ys[3]));
            b.st_vec(Space::Global, Ty::B32, r(oa), 0, vec![r(p0), r(p1)]);
        },
    );
    b.finish()
}

// ====================================================================== decode: deltanet_step

/// The Gated DeltaNet operands of `deltanet_step`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateOperands {
    /// The projected `a` row `[B, H]`, `dt_bias [H]`, the decay factor `[H]` (`−exp(A_log)`, or
    /// `A_log` itself with `DeltaNetStepSpec::decay_from_a_log`), and the output gate `z [B, H·dv]`.
    pub a: BufferId,
    pub dt_bias: BufferId,
    pub decay: BufferId,
    pub z: BufferId,
}

/// The program buffers of a `deltanet_step` kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaNetStepOperands {
    /// Projected q, k, v rows (before the convs): `[B, H·dk]`, `[B, H·dk]`, `[B, H·dv]`.
    pub xq: BufferId,
    pub xk: BufferId,
    pub xv: BufferId,
    /// Depthwise conv weights `[channels, K]`.
    pub wq: BufferId,
    pub wk: BufferId,
    pub wv: BufferId,
    /// Conv biases `[channels]` (q, k, v), if the convs have them.
    pub conv_bias: Option<[BufferId; 3]>,
    /// Conv states `[B, channels, K−1]`, rolled in place.
    pub conv_q: BufferId,
    pub conv_k: BufferId,
    pub conv_v: BufferId,
    /// The projected β logits `[B, H]` (before the sigmoid).
    pub b: BufferId,
    pub gate: Option<GateOperands>,
    /// The output norm's weight `[dv]`, shared by the heads.
    pub norm_w: BufferId,
    /// The delta state `f32 [B, H, dk, dv]`, updated in place.
    pub state: BufferId,
    /// The normed output `[B, H·dv]`.
    pub y: BufferId,
}

impl DeltaNetStepOperands {
    /// Buffers numbered in parameter order (with biases and gate; tests drop what they do not use).
    pub fn numbered() -> DeltaNetStepOperands {
        let id = BufferId;
        DeltaNetStepOperands {
            xq: id(0),
            xk: id(1),
            xv: id(2),
            wq: id(3),
            wk: id(4),
            wv: id(5),
            conv_bias: Some([id(6), id(7), id(8)]),
            conv_q: id(9),
            conv_k: id(10),
            conv_v: id(11),
            b: id(12),
            gate: Some(GateOperands { a: id(13), dt_bias: id(14), decay: id(15), z: id(16) }),
            norm_w: id(17),
            state: id(18),
            y: id(19),
        }
    }
}

/// The fused DeltaNet decode body (`deltanet_step`) to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaNetStepSpec {
    pub name: String,
    pub heads: u32,
    pub dk: u32,
    pub dv: u32,
    /// Conv width K (4).
    pub conv: u32,
    pub scale: f32,
    /// L2-normalise q and k (eps `l2_eps`).
    pub qk_l2norm: bool,
    pub l2_eps: f32,
    /// The output RMSNorm's eps.
    pub norm_eps: f32,
    /// The gate's decay operand is `A_log` (the kernel computes `−exp(A_log)`), not `−exp(A_log)`.
    pub decay_from_a_log: bool,
    /// Elements between consecutive sequences of `xq`, `xk`, `xv`, `b`, `a` and `z` (their widths
    /// when they are whole buffers; larger when they are views into a wider projection).
    pub strides: [u32; 6],
    /// Element offsets of `xq`, `xk`, `xv`, `b`, `a` and `z` inside their buffers (0 for whole
    /// buffers): a nonzero offset makes the parameter an `ArgRule::View` of the buffer.
    pub offsets: [u32; 6],
    /// The storage of everything but the delta state (bf16 by default; f32 for exact models).
    pub storage: Storage,
    pub batch: Dim,
    pub operands: DeltaNetStepOperands,
}

impl DeltaNetStepSpec {
    /// Nemotron-Flash defaults: conv 4 without bias, L2 norms (1e-6), RMSNorm eps 1e-5, scale
    /// `1/√dk`, contiguous rows; gated adds the decay and the gated norm.
    pub fn new(name: impl Into<String>, heads: u32, dk: u32, dv: u32, gated: bool) -> DeltaNetStepSpec {
        let mut operands = DeltaNetStepOperands::numbered();
        operands.conv_bias = None;
        if !gated {
            operands.gate = None;
        }
        DeltaNetStepSpec {
            name: name.into(),
            heads,
            dk,
            dv,
            conv: 4,
            scale: 1.0 / (dk as f32).sqrt(),
            qk_l2norm: true,
            l2_eps: 1e-6,
            norm_eps: 1e-5,
            decay_from_a_log: false,
            strides: [heads * dk, heads * dk, heads * dv, heads, heads, heads * dv],
            offsets: [0; 6],
            storage: Storage::Bf16,
            batch: Dim::sym(Sym::B),
            operands,
        }
    }
}

/// The split of a `deltanet_step` block: `dv/4 = cg·sub_blocks` with `cg` a power of two ≤ 32 and at
/// most 4 sub-blocks (512 threads, so each thread may use 128 registers: at 1024 threads the 64-register
/// budget spills); the fewest sub-blocks that keep 8 rows (32 state values) or fewer per thread, else
/// 4 sub-blocks (dk = 128, dv = 256: 16 rows, 125 registers, no spills on sm_80).
pub fn deltanet_step_plan(spec: &DeltaNetStepSpec) -> Result<StepShape, CodegenError> {
    step_dims_ok("deltanet_step", &spec.name, spec.heads, spec.dk, spec.dv)?;
    if spec.conv == 0 {
        return Err(CodegenError::Shape(format!("deltanet_step {}: conv width must be positive", spec.name)));
    }
    let cgt = spec.dv / 4;
    let shapes: Vec<StepShape> = [1u32, 2, 4]
        .into_iter()
        .filter(|n| cgt.is_multiple_of(*n) && (cgt / n).is_power_of_two() && cgt / n <= 32)
        .map(|n| step_shape(spec.dk, cgt / n, n))
        .collect();
    shapes.iter().find(|s| s.rows <= 8).or(shapes.last()).copied().ok_or_else(|| {
        CodegenError::Shape(format!(
            "deltanet_step {}: dv {} must be 4·cg·n with cg a power of two ≤ 32 and n ≤ 4",
            spec.name, spec.dv
        ))
    })
}

/// Generates the fused DeltaNet decode kernel and its launch rule.
pub fn deltanet_step(spec: &DeltaNetStepSpec) -> Result<Generated, CodegenError> {
    let sh = deltanet_step_plan(spec)?;
    let kernel = build_deltanet_step(spec, &sh);
    let o = &spec.operands;
    // A row input at a nonzero element offset is a view of its buffer.
    let row = |id: BufferId, which: usize| match spec.offsets[which] {
        0 => ArgRule::Buffer(id),
        off => ArgRule::View(id, Dim::constant(i64::from(off) * i64::from(spec.storage.bytes()))),
    };
    let mut args = vec![row(o.xq, 0), row(o.xk, 1), row(o.xv, 2)];
    args.extend([o.wq, o.wk, o.wv].map(ArgRule::Buffer));
    if let Some(bs) = o.conv_bias {
        args.extend(bs.map(ArgRule::Buffer));
    }
    args.extend([o.conv_q, o.conv_k, o.conv_v].map(ArgRule::Buffer));
    args.push(row(o.b, 3));
    if let Some(gt) = &o.gate {
        args.extend([row(gt.a, 4), ArgRule::Buffer(gt.dt_bias), ArgRule::Buffer(gt.decay), row(gt.z, 5)]);
    }
    args.extend([o.norm_w, o.state, o.y].map(ArgRule::Buffer));
    let launch = LaunchRule {
        grid: [Dim::constant(i64::from(spec.heads)), spec.batch.clone(), Dim::constant(1)],
        block: [sh.threads, 1, 1],
        dynamic_shared: 0,
        args,
    };
    Ok(Generated { kernel, launch })
}

/// One depthwise conv channel for one new input: `Σ_j w[j]·[state; x][j] (+ bias)`, with the state
/// rolled in place (oldest dropped, `x` appended). Returns the conv output (before SiLU).
#[allow(clippy::too_many_arguments)]
fn conv_channel(
    b: &mut Builder,
    el: Storage,
    x: Reg,
    x_elem: Reg,
    w: Reg,
    bias: Option<Reg>,
    st: Reg,
    st_row: Reg,
    ch: Reg,
    kw: u32,
) -> Reg {
    let eb = i64::from(el.bytes());
    let xa = gaddr(b, x, x_elem, el.bytes());
    let xr = b.ld(Space::Global, el.raw(), Cache::ReadOnly, r(xa), 0);
    let xf = el.widen(b, xr);
    let we = mulu(b, r(ch), imm(kw));
    let wa = gaddr(b, w, we, el.bytes());
    let se = mulu(b, r(st_row), imm(kw - 1));
    let sa = gaddr(b, st, se, el.bytes());
    let acc = match bias {
        Some(bp) => el.ld(b, Cache::ReadOnly, bp, ch),
        None => fzero(b),
    };
    let acc = b.mov(Ty::F32, r(acc));
    let mut hist = Vec::new();
    for j in 0..i64::from(kw - 1) {
        let s = b.ld(Space::Global, el.raw(), Cache::None, r(sa), eb * j);
        let sf = el.widen(b, s);
        let wj = el.ld_at(b, Cache::ReadOnly, wa, eb * j);
        b.mad_into(acc, r(wj), r(sf));
        hist.push(s);
    }
    let wl = el.ld_at(b, Cache::ReadOnly, wa, eb * i64::from(kw - 1));
    b.mad_into(acc, r(wl), r(xf));
    hist.push(xr);
    for j in 0..kw as usize - 1 {
        b.st(Space::Global, el.raw(), r(sa), eb * j as i64, r(hist[j + 1]));
    }
    acc
}

/// `Σ x²` over `n` f32 in shared memory, reduced over the warp (every lane gets it).
fn warp_sumsq(b: &mut Builder, lane: Reg, smem: Reg, v: Vec32, n: u32) -> Reg {
    let acc = fzero(b);
    b.for_(Ty::U32, r(lane), imm(n), imm(32), |b, i| {
        let x = v.ld(b, smem, r(i));
        b.mad_into(acc, r(x), r(x));
    });
    b.warp_reduce(BinOp::Add, Ty::F32, acc)
}

fn build_deltanet_step(spec: &DeltaNetStepSpec, sh: &StepShape) -> Kernel {
    let (hh, dk, dv, kw) = (spec.heads, spec.dk, spec.dv, spec.conv);
    let gated = spec.operands.gate.is_some();
    let el = spec.storage;
    let nt = sh.threads;
    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "deltanet_step ({}, {} storage): conv{kw} + SiLU, {}beta = sigmoid(b){}, the delta step and the output {}; dk {dk}, dv {dv}, {hh} heads",
        if gated { "Gated DeltaNet" } else { "DeltaNet" },
        if el == Storage::Bf16 { "bf16" } else { "f32" },
        if spec.qk_l2norm { "L2 norms, " } else { "" },
        if gated { ", g = -exp(A_log) softplus(a + dt_bias)" } else { "" },
        if gated { "gated RMSNorm" } else { "RMSNorm" },
    ));
    b.doc(format!(
        "grid (heads, B), {nt} threads = {} sub-blocks of {} columns; {} rows x 4 columns of S per thread",
        sh.sub_blocks, sh.tile, sh.rows
    ));
    b.block_size(nt, 1, 1);
    let xq = b.param_ptr("xq");
    let xk = b.param_ptr("xk");
    let xv = b.param_ptr("xv");
    let wq = b.param_ptr("wq");
    let wk = b.param_ptr("wk");
    let wv = b.param_ptr("wv");
    let biases = spec.operands.conv_bias.map(|_| [b.param_ptr("bq"), b.param_ptr("bk"), b.param_ptr("bv")]);
    let cq = b.param_ptr("conv_q");
    let ck = b.param_ptr("conv_k");
    let cv = b.param_ptr("conv_v");
    let braw = b.param_ptr("b");
    let gate = spec.operands.gate.as_ref().map(|_| {
        let a = b.param_ptr("a");
        let dt = b.param_ptr("dt_bias");
        let dc = b.param_ptr(if spec.decay_from_a_log { "A_log" } else { "neg_a" });
        let z = b.param_ptr("z");
        (a, dt, dc, z)
    });
    let nw = b.param_ptr("norm_w");
    let state = b.param_ptr("state");
    let y = b.param_ptr("y");
    // Shared: q, k, v after conv (f32), the output row, two reduction buffers.
    let red_bytes = sh.sub_blocks * 4 * sh.tile * 4;
    let qf = Vec32 { off: 0 };
    let kf = Vec32 { off: round_up(4 * dk, 16) };
    let vf = Vec32 { off: 2 * round_up(4 * dk, 16) };
    let of = Vec32 { off: vf.off + round_up(4 * dv, 16) };
    let red = of.off + round_up(4 * dv, 16);
    let sh_arr = b.shared("smem", red + 2 * red_bytes, 16);
    let smem = b.shared_addr(sh_arr);
    let tid = b.special(Special::TidX);
    let lane = b.bin(BinOp::And, Ty::U32, r(tid), imm(31));
    let h = b.special(Special::CtaidX);
    let bi = b.special(Special::CtaidY);
    let bh = madu(&mut b, r(bi), imm(hh), r(h));
    let sub = b.bin(BinOp::Shr, Ty::U32, r(tid), imm(STEP_SUB_THREADS.trailing_zeros()));
    let cx = core_ctx(&mut b, sh, dk, smem, tid, r(sub), r(sub));
    let se = mulu(&mut b, r(bh), imm(dk * dv));
    let st_base = gaddr(&mut b, state, se, 4);
    b.comment("the state first (the long loads)");
    let s = cx.load_state(&mut b, st_base, dv);

    b.comment("conv updates (states rolled in place) + SiLU into shared memory");
    let [sq, sk, sv] = spec.strides[..3] else { unreachable!() };
    let convs = [(xq, wq, cq, dk, sq, qf, 0usize), (xk, wk, ck, dk, sk, kf, 1), (xv, wv, cv, dv, sv, vf, 2)];
    for (x, w, cs, d, stride, dst, which) in convs {
        let bias = biases.map(|bs| bs[which]);
        b.for_(Ty::U32, r(tid), imm(d), imm(nt), |b, c| {
            let ch = madu(b, r(h), imm(d), r(c));
            let xe = madu(b, r(bi), imm(stride), r(ch));
            let st_row = madu(b, r(bi), imm(hh * d), r(ch));
            let yv = if kw > 1 {
                conv_channel(b, el, x, xe, w, bias, cs, st_row, ch, kw)
            } else {
                let xf = el.ld(b, Cache::ReadOnly, x, xe);
                let wf = el.ld(b, Cache::ReadOnly, w, ch);
                let base = match bias {
                    Some(bp) => el.ld(b, Cache::ReadOnly, bp, ch),
                    None => fzero(b),
                };
                ffma(b, r(wf), r(xf), r(base))
            };
            let act = silu(b, yv);
            dst.st(b, smem, r(c), act);
        });
    }
    b.bar();

    b.comment(
        "every warp: the L2 norms of q and k; beta = sigmoid(b); gated: alpha = exp(neg_a softplus(a + dt_bias))",
    );
    let (rq, rk) = if spec.qk_l2norm {
        let ssq = warp_sumsq(&mut b, lane, smem, qf, dk);
        let ssk = warp_sumsq(&mut b, lane, smem, kf, dk);
        let tq = fadd(&mut b, r(ssq), Operand::F32(spec.l2_eps));
        let tk = fadd(&mut b, r(ssk), Operand::F32(spec.l2_eps));
        (b.un(UnOp::RsqrtApprox, Ty::F32, r(tq)), b.un(UnOp::RsqrtApprox, Ty::F32, r(tk)))
    } else {
        (b.mov(Ty::F32, Operand::F32(1.0)), b.mov(Ty::F32, Operand::F32(1.0)))
    };
    let [_, _, _, s_b, s_a, s_z] = spec.strides;
    let be_e = madu(&mut b, r(bi), imm(s_b), r(h));
    let be_raw = el.ld(&mut b, Cache::ReadOnly, braw, be_e);
    let beta = sigmoid(&mut b, r(be_raw));
    let alpha = gate.map(|(a, dt, dc, _)| {
        let ae = madu(&mut b, r(bi), imm(s_a), r(h));
        let av = el.ld(&mut b, Cache::ReadOnly, a, ae);
        let dv_ = el.ld(&mut b, Cache::ReadOnly, dt, h);
        let x = fadd(&mut b, r(av), r(dv_));
        let sp = softplus(&mut b, x);
        let cval = el.ld(&mut b, Cache::ReadOnly, dc, h);
        let na = if spec.decay_from_a_log {
            let e = exp(&mut b, r(cval));
            b.un(UnOp::Neg, Ty::F32, r(e))
        } else {
            cval
        };
        let gd = fmul(&mut b, r(na), r(sp));
        exp(&mut b, r(gd))
    });
    let kv = cx.per_row(&mut b, |b, row| {
        let x = kf.ld(b, smem, r(row));
        fmul(b, r(x), r(rk))
    });
    let load_q = |b: &mut Builder| {
        cx.per_row(b, |b, row| {
            let x = qf.ld(b, smem, r(row));
            fmul(b, r(x), r(rq))
        })
    };
    let va = madu(&mut b, r(cx.col), imm(4), r(smem));
    let v4 = b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(va), i64::from(vf.off), 4);
    let scale = spec.scale;
    let col = cx.col;
    b.comment("the delta step");
    cx.update(
        &mut b,
        sh,
        &s,
        &kv,
        load_q,
        [v4[0], v4[1], v4[2], v4[3]],
        beta,
        alpha,
        st_base,
        dv,
        (red, red + red_bytes),
        |b, ot| {
            let ys: Vec<Operand> = ot.iter().map(|x| r(fmul(b, r(*x), Operand::F32(scale)))).collect();
            let oa = madu(b, r(col), imm(4), r(smem));
            b.st_vec(Space::Shared, Ty::F32, r(oa), i64::from(of.off), ys);
        },
    );
    b.bar();

    b.comment("the output RMSNorm over dv (every warp reduces), times silu(z) when gated");
    let sso = warp_sumsq(&mut b, lane, smem, of, dv);
    let ms = fmul(&mut b, r(sso), Operand::F32(1.0 / dv as f32));
    let ms = fadd(&mut b, r(ms), Operand::F32(spec.norm_eps));
    let rr = b.un(UnOp::RsqrtApprox, Ty::F32, r(ms));
    b.for_(Ty::U32, r(tid), imm(dv), imm(nt), |b, c| {
        let x = of.ld(b, smem, r(c));
        let wv_ = el.ld(b, Cache::ReadOnly, nw, c);
        let yv = fmul(b, r(x), r(rr));
        let mut yv = fmul(b, r(yv), r(wv_));
        if let Some((_, _, _, z)) = gate {
            let hc = madu(b, r(h), imm(dv), r(c));
            let ze = madu(b, r(bi), imm(s_z), r(hc));
            let zv = el.ld(b, Cache::ReadOnly, z, ze);
            let sz = silu(b, zv);
            yv = fmul(b, r(yv), r(sz));
        }
        let ye = madu(b, r(bh), imm(dv), r(c));
        el.st(b, y, ye, yv);
    });
    b.finish()
}

// ====================================================================== costs

/// Useful floating-point operations and DRAM bytes of one launch (documented formulas; a multiply-add
/// counts 2).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelCost {
    pub flops: f64,
    pub bytes: f64,
}

/// `delta_scan` at `batch` sequences of `tokens` tokens, per (sequence, head, value tile, chunk of C):
/// A `C(C−1)·dk`, R `2C·dk·BV`, inverse `(C³ − C)/3`, V_new `C(C+1)·BV`, P `C(C+1)·dk`, O
/// `2C·dk·BV + C(C+1)·BV`, state `2C·dk·BV` (the exact-arithmetic work, over `⌈T/C⌉` chunks; the
/// kernel also computes the padded rows of a short last chunk). Bytes: q and k once per value tile,
/// β and g likewise, v and o once, the state read and written once, `lens`.
pub fn scan_cost(spec: &DeltaScanSpec, plan: &ScanPlan, batch: u64, tokens: u64) -> KernelCost {
    let (c, dk, bv) = (f64::from(plan.chunk), f64::from(spec.dk), f64::from(plan.v_tile));
    let chunks = tokens.div_ceil(u64::from(plan.chunk)) as f64;
    let per = c * (c - 1.0) * dk
        + 2.0 * c * dk * bv
        + (c * c * c - c) / 3.0
        + c * (c + 1.0) * bv
        + c * (c + 1.0) * dk
        + 2.0 * c * dk * bv
        + c * (c + 1.0) * bv
        + 2.0 * c * dk * bv;
    let (b, t, h) = (batch as f64, tokens as f64, f64::from(spec.heads));
    let nvt = f64::from(plan.v_tiles);
    let flops = per * chunks * b * h * nvt;
    let rows = b * t * h;
    let gates = if spec.gated { 2.0 } else { 1.0 };
    let bytes = rows * (2.0 * dk * 2.0 + gates * 2.0) * nvt
        + rows * f64::from(spec.dv) * 2.0 * 2.0
        + b * h * dk * f64::from(spec.dv) * 4.0 * 2.0
        + b * 4.0;
    KernelCost { flops, bytes }
}

/// `delta_step` at `batch`: per (sequence, head) `α·S` `dk·dv` (gated), `Sᵀk` `2dk·dv`, `v'` `2dv`,
/// `S += k·v'ᵀ` `2dk·dv`, `Sᵀq` `2dk·dv`, scale `dv`. Bytes: the state read and written once
/// (`8·dk·dv`), k and q once per column tile, v, β, g and o once.
pub fn step_cost(spec: &DeltaStepSpec, shape: &StepShape, batch: u64) -> KernelCost {
    let (dk, dv) = (f64::from(spec.dk), f64::from(spec.dv));
    let bh = batch as f64 * f64::from(spec.heads);
    let alpha = if spec.gated { dk * dv } else { 0.0 };
    let flops = bh * (alpha + 6.0 * dk * dv + 3.0 * dv);
    let tiles = dv / f64::from(shape.tile);
    let gates = if spec.gated { 2.0 } else { 1.0 };
    let bytes = bh * (8.0 * dk * dv + 2.0 * 2.0 * dk * tiles + 2.0 * dv + 2.0 * gates + 2.0 * dv);
    KernelCost { flops, bytes }
}

/// The fewest bytes a `delta_step` must move: the state once each way, q, k, v, β, g read and o
/// written once.
pub fn step_min_bytes(spec: &DeltaStepSpec, batch: u64) -> f64 {
    let (dk, dv) = (f64::from(spec.dk), f64::from(spec.dv));
    let gates = if spec.gated { 2.0 } else { 1.0 };
    batch as f64 * f64::from(spec.heads) * (8.0 * dk * dv + 4.0 * dk + 4.0 * dv + 2.0 * gates)
}

/// `deltanet_step` at `batch`: `delta_step`'s work plus, per (sequence, head), the convs
/// `2K·(2dk + dv)`, SiLUs `~5·(2dk + dv)`, L2 norms `4dk`, the norm `~4dv` (`+5dv` for the gate).
/// Bytes: the state once each way, the x rows, the conv states read and written (`2·2(K−1)` per
/// channel), conv weights and biases, b, a, z, the norm weight, y.
pub fn deltanet_step_cost(spec: &DeltaNetStepSpec, batch: u64) -> KernelCost {
    let (dk, dv, k) = (f64::from(spec.dk), f64::from(spec.dv), f64::from(spec.conv));
    let gated = spec.operands.gate.is_some();
    let bh = batch as f64 * f64::from(spec.heads);
    let ch = 2.0 * dk + dv;
    let alpha = if gated { dk * dv } else { 0.0 };
    let flops = bh * (alpha + 6.0 * dk * dv + 3.0 * dv + 2.0 * k * ch + 5.0 * ch + 4.0 * dk + 4.0 * dv)
        + if gated { bh * 5.0 * dv } else { 0.0 };
    let bias = if spec.operands.conv_bias.is_some() { 2.0 } else { 0.0 };
    let gate_bytes = if gated { 2.0 * 3.0 + 2.0 * dv } else { 0.0 };
    let bytes =
        bh * (8.0 * dk * dv + ch * (2.0 + 4.0 * (k - 1.0) + 2.0 * k + bias) + 2.0 + gate_bytes + 2.0 * dv + 2.0 * dv);
    KernelCost { flops, bytes }
}

/// The fewest bytes a `deltanet_step` must move: as [`deltanet_step_cost`] but with the weights (conv
/// weights and biases, `dt_bias`, the decay, the norm weight) read once rather than once per sequence.
pub fn deltanet_step_min_bytes(spec: &DeltaNetStepSpec, batch: u64) -> f64 {
    let (dk, dv, k) = (f64::from(spec.dk), f64::from(spec.dv), f64::from(spec.conv));
    let gated = spec.operands.gate.is_some();
    let bias = if spec.operands.conv_bias.is_some() { 2.0 } else { 0.0 };
    let per_head_weights = (2.0 * dk + dv) * (2.0 * k + bias) + if gated { 4.0 } else { 0.0 };
    let norm_w = 2.0 * dv;
    let all = deltanet_step_cost(spec, batch).bytes;
    all - (batch.saturating_sub(1)) as f64 * f64::from(spec.heads) * per_head_weights
        - (batch * u64::from(spec.heads) - 1) as f64 * norm_w
}
