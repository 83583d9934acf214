//! conv: the short causal depthwise convolution of Mamba2 and DeltaNet, with SiLU fused.
//!
//! Two kernels, both computing PyTorch's `Conv1d(groups = C)` cross-correlation with `K − 1` inputs of
//! left context, `y[t, c] = bias[c] + Σ_{j<K} w[c, j] · e[t + j, c]`, where `e` is the channel's inputs
//! preceded by the `K − 1` inputs of its state (`state[c, 0]` the oldest); then optionally SiLU:
//!
//! * [`conv1d`] (prefill, op `conv1d` / fused `conv_silu`): `x [B, T, C]`, the state as left context,
//!   `y` for all `T` tokens, and the new state (the `K − 1` inputs before position `lens[b]`) written in
//!   place;
//! * [`conv1d_update`] (decode, op `conv1d_update`): one token per sequence, the state rolled in place.
//!
//! # Numerics
//!
//! Activations, weights, bias and the state are bf16; the arithmetic is f32 (`fma` in tap order,
//! starting from the bias). With SiLU fused, the convolution result is rounded to bf16 before the SiLU,
//! exactly where the unfused graph (`conv1d → bf16 → silu`) rounds it; the output is rounded once more.
//!
//! # Tiling
//!
//! A thread owns `V` consecutive channels: `V = 8` (one 16-byte access per token row, per state row of
//! the 8 channels — `8·(K−1)` contiguous bf16 — and `K` accesses for the 8 weight rows) when `C` is a
//! multiple of 8, else `V = 1` (2-byte accesses). Lanes of a warp take consecutive channel groups, so a
//! warp touches 512 contiguous bytes of a token row.
//!
//! * Prefill: 256 threads = 8 warps; block `(x, y, z)` = (channel tile of `32·V` channels, token split,
//!   sequence). The `T` tokens of a sequence are cut into `64 = 8 splits × 8 warps` segments of
//!   `L = max(⌈T / 64⌉, K − 1)` tokens; warp `w` of split `y` runs segment `8y + w` sequentially,
//!   keeping the last `K − 1` inputs of its channels in registers (a sliding window), so every input is
//!   read once, plus `K − 1` rows at each segment start. Because `L ≥ K − 1`, only segment 0 reads
//!   the old state; the thread of segment 0 also writes the new state after its reads, so the in-place
//!   update has no race. No shared memory.
//! * Update: 256 threads, one thread per `V` channels of one sequence; block `(x, y)` = (channel tile
//!   of `256·V` channels, sequence). Each thread reads its state rows, weights, bias and input once and
//!   writes the rolled state and the output once. No shared memory.
//!
//! # Assumptions
//!
//! `2 ≤ K ≤ 8`; `lens[b] ∈ 0 ..= T`; element counts fit in `u32`; the buffers are dense and 16-byte
//! aligned (program buffers are).
//!
//! # Cost (per call)
//!
//! * `conv1d`: FLOPs `B·T·C·(2K + 5)` (taps, bias, SiLU); bytes `4·B·T·C` (x read, y written) `+
//!   2·C·(K+1)` (weights, bias) `+ 4·B·C·(K−1)` (state read and written) `+ 4·B` (lens).
//! * `conv1d_update`: FLOPs `B·C·(2K + 5)`; bytes `4·B·C + 2·C·(K+1) + 4·B·C·(K−1)`.

use flashc_compiler::gir::{DType, Dim, Sym};
use flashc_compiler::schedule::BufferId;

use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Operand, ParamTy, Reg, Space, Special, Ty, UnOp};

/// Threads per block of both kernels.
pub const THREADS: u32 = 256;
/// Token splits of the prefill grid (`grid.y`); each split's 8 warps run 8 segments.
pub const TOKEN_SPLITS: u32 = 8;
/// Segments per sequence in prefill.
pub const SEGMENTS: u32 = TOKEN_SPLITS * (THREADS / 32);
/// The widest convolution supported (registers hold `K` taps per channel).
pub const MAX_WIDTH: u32 = 8;

/// The program buffers of a convolution, in the op's operand order then its result.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvOperands {
    pub x: BufferId,
    pub w: BufferId,
    /// Updated in place.
    pub state: BufferId,
    /// Prefill only (ignored by the update).
    pub lens: BufferId,
    pub bias: Option<BufferId>,
    pub y: BufferId,
}

impl ConvOperands {
    /// Buffers numbered in operand order: x 0, w 1, state 2, lens 3, bias 4, y 5 (tests).
    pub fn numbered(bias: bool) -> ConvOperands {
        ConvOperands {
            x: BufferId(0),
            w: BufferId(1),
            state: BufferId(2),
            lens: BufferId(3),
            bias: bias.then_some(BufferId(4)),
            y: BufferId(5),
        }
    }
}

/// A convolution to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvSpec {
    pub name: String,
    /// Storage type of activations, weights and state (only `Bf16`).
    pub dtype: DType,
    pub channels: u32,
    /// `K`, the taps per channel.
    pub width: u32,
    /// Whether SiLU is applied to the result (`conv_silu`).
    pub silu: bool,
    /// Sequences in the batch (`B`).
    pub batch: Dim,
    /// New tokens per sequence (prefill; `T`, or `T + meta` on the first step).
    pub tokens: Dim,
    pub operands: ConvOperands,
}

impl ConvSpec {
    /// A bf16 `conv_silu` over `channels` channels of width `width`, batch `B`, `T` tokens, numbered
    /// operands.
    pub fn new(name: impl Into<String>, channels: u32, width: u32, bias: bool) -> ConvSpec {
        ConvSpec {
            name: name.into(),
            dtype: DType::Bf16,
            channels,
            width,
            silu: true,
            batch: Dim::sym(Sym::B),
            tokens: Dim::sym(Sym::T),
            operands: ConvOperands::numbered(bias),
        }
    }

    fn check(&self) -> Result<(), CodegenError> {
        if self.dtype != DType::Bf16 {
            return Err(CodegenError::Unsupported(format!("conv {} in {:?} (only bf16)", self.name, self.dtype)));
        }
        if !(2..=MAX_WIDTH).contains(&self.width) {
            return Err(CodegenError::Shape(format!("conv width {} outside 2..={MAX_WIDTH}", self.width)));
        }
        if self.channels == 0 {
            return Err(CodegenError::Shape("conv with no channels".to_string()));
        }
        Ok(())
    }

    /// Channels per thread: 8 (16-byte accesses) when the channel count allows it.
    pub fn vector(&self) -> u32 {
        if self.channels.is_multiple_of(8) { 8 } else { 1 }
    }
}

// ---------------------------------------------------------------------------------------------------
// Shared helpers (also used by the SSD kernels).

pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const LN2: f32 = std::f32::consts::LN_2;

/// Reinterprets a 32-bit register as f32 (`mov.b32`).
pub(crate) fn as_f32(b: &mut Builder, bits: Reg) -> Reg {
    let f = b.reg(Ty::F32);
    b.inst(Inst::Mov { ty: Ty::B32, dst: f, src: bits.into() });
    f
}

/// The two bf16 halves of a 32-bit register as f32 (low half first; exact).
pub(crate) fn unpack_bf16x2(b: &mut Builder, w: Reg) -> (Reg, Reg) {
    let lo = b.bin(BinOp::Shl, Ty::B32, w.into(), 16u32.into());
    let hi = b.bin(BinOp::And, Ty::B32, w.into(), 0xFFFF_0000u32.into());
    (as_f32(b, lo), as_f32(b, hi))
}

/// Two f32 rounded to bf16 and packed, `lo` in the low half.
pub(crate) fn pack_bf16x2(b: &mut Builder, lo: Reg, hi: Reg) -> Reg {
    b.pack_bf16x2(lo.into(), hi.into())
}

/// `v` rounded to bf16, as a 16-bit register.
pub(crate) fn to_bf16(b: &mut Builder, v: Reg) -> Reg {
    let p = b.pack_bf16x2(v.into(), v.into());
    b.unpack16(p).0
}

/// `v` rounded to bf16 and widened back to f32 (where the unfused graph stores a bf16 tensor).
pub(crate) fn round_bf16(b: &mut Builder, v: Reg) -> Reg {
    let p = b.pack_bf16x2(v.into(), v.into());
    let s = b.bin(BinOp::Shl, Ty::B32, p.into(), 16u32.into());
    as_f32(b, s)
}

/// A bf16 in a 16-bit register as f32.
pub(crate) fn bf16_to_f32(b: &mut Builder, h: Reg) -> Reg {
    b.bf16_to_f32(h)
}

/// `eˣ` (`ex2.approx` of `x·log2 e`).
pub(crate) fn exp(b: &mut Builder, x: Operand) -> Reg {
    let s = b.mul(Ty::F32, x, LOG2E.into());
    b.un(UnOp::Ex2Approx, Ty::F32, s.into())
}

/// `silu(x) = x / (1 + e^{−x})`.
pub(crate) fn silu(b: &mut Builder, x: Reg) -> Reg {
    let s = b.mul(Ty::F32, x.into(), (-LOG2E).into());
    let e = b.un(UnOp::Ex2Approx, Ty::F32, s.into());
    let d = b.add(Ty::F32, e.into(), 1.0f32.into());
    let r = b.un(UnOp::Rcp, Ty::F32, d.into());
    b.mul(Ty::F32, x.into(), r.into())
}

/// `softplus(x) = max(x, 0) + ln(1 + e^{−|x|})` (no overflow for large `|x|`).
pub(crate) fn softplus(b: &mut Builder, x: Reg) -> Reg {
    let a = b.un(UnOp::Abs, Ty::F32, x.into());
    let s = b.mul(Ty::F32, a.into(), (-LOG2E).into());
    let e = b.un(UnOp::Ex2Approx, Ty::F32, s.into());
    let one_e = b.add(Ty::F32, e.into(), 1.0f32.into());
    let l = b.un(UnOp::Lg2Approx, Ty::F32, one_e.into());
    let m = b.bin(BinOp::Max, Ty::F32, x.into(), 0.0f32.into());
    b.mad(Ty::F32, l.into(), LN2.into(), m.into())
}

/// `a·b + c` on u32.
pub(crate) fn madu(b: &mut Builder, a: Operand, m: Operand, c: Operand) -> Reg {
    b.mad(Ty::U32, a, m, c)
}

pub(crate) fn addu(b: &mut Builder, a: Operand, c: Operand) -> Reg {
    b.add(Ty::U32, a, c)
}

pub(crate) fn mulu(b: &mut Builder, a: Operand, c: Operand) -> Reg {
    b.mul(Ty::U32, a, c)
}

/// `a / d` for a constant `d` (a shift for powers of two).
pub(crate) fn divu(b: &mut Builder, a: Operand, d: u32) -> Reg {
    if d.is_power_of_two() {
        b.bin(BinOp::Shr, Ty::U32, a, d.trailing_zeros().into())
    } else {
        b.bin(BinOp::Div, Ty::U32, a, d.into())
    }
}

/// `a % d` for a constant `d`.
pub(crate) fn remu(b: &mut Builder, a: Operand, d: u32) -> Reg {
    if d.is_power_of_two() {
        b.bin(BinOp::And, Ty::U32, a, (d - 1).into())
    } else {
        b.bin(BinOp::Rem, Ty::U32, a, d.into())
    }
}

pub(crate) fn lt_u32(b: &mut Builder, a: Operand, c: Operand) -> Reg {
    b.setp(Cmp::Lt, Ty::U32, a, c)
}

/// Loads `n` bf16 values starting at the global byte address `addr` as f32 registers: 16-byte
/// vectors when `vector` (then `n` is a multiple of 8 and `addr` 16-byte aligned), else 2-byte loads.
pub(crate) fn load_bf16_run(b: &mut Builder, addr: Reg, n: u32, cache: Cache, vector: bool) -> Vec<Reg> {
    let mut out = Vec::with_capacity(n as usize);
    if vector {
        debug_assert!(n.is_multiple_of(8));
        for i in 0..n / 8 {
            let w = b.ld_vec(Space::Global, Ty::B32, cache, addr.into(), i64::from(i) * 16, 4);
            for r in w {
                let (lo, hi) = unpack_bf16x2(b, r);
                out.push(lo);
                out.push(hi);
            }
        }
    } else {
        for i in 0..n {
            let h = b.ld(Space::Global, Ty::B16, cache, addr.into(), i64::from(i) * 2);
            out.push(bf16_to_f32(b, h));
        }
    }
    out
}

/// Stores f32 values as bf16 at the global byte address `addr` (16-byte vectors when `vector`).
pub(crate) fn store_bf16_run(b: &mut Builder, addr: Reg, vals: &[Reg], vector: bool) {
    if vector {
        debug_assert!(vals.len().is_multiple_of(8));
        for (i, v) in vals.chunks(8).enumerate() {
            let words: Vec<Operand> = v.chunks(2).map(|p| pack_bf16x2(b, p[0], p[1]).into()).collect();
            b.st_vec(Space::Global, Ty::B32, addr.into(), i as i64 * 16, words);
        }
    } else {
        for (i, &v) in vals.iter().enumerate() {
            let h = to_bf16(b, v);
            b.st(Space::Global, Ty::B16, addr.into(), i as i64 * 2, h.into());
        }
    }
}

/// Stores bf16 values held in 16-bit registers (no rounding), 16-byte vectors when `vector`.
fn store_b16_run(b: &mut Builder, addr: Reg, vals: &[Reg], vector: bool) {
    if vector {
        for (i, v) in vals.chunks(8).enumerate() {
            let mut words = Vec::with_capacity(4);
            for p in v.chunks(2) {
                let w = b.reg(Ty::B32);
                b.inst(Inst::Pack16 { dst: w, lo: p[0], hi: p[1] });
                words.push(w.into());
            }
            b.st_vec(Space::Global, Ty::B32, addr.into(), i as i64 * 16, words);
        }
    } else {
        for (i, &v) in vals.iter().enumerate() {
            b.st(Space::Global, Ty::B16, addr.into(), i as i64 * 2, v.into());
        }
    }
}

/// Loads `n` bf16 values as 16-bit registers (no conversion), 16-byte vectors when `vector`.
fn load_b16_run(b: &mut Builder, addr: Reg, n: u32, cache: Cache, vector: bool) -> Vec<Reg> {
    let mut out = Vec::with_capacity(n as usize);
    if vector {
        for i in 0..n / 8 {
            let w = b.ld_vec(Space::Global, Ty::B32, cache, addr.into(), i64::from(i) * 16, 4);
            for r in w {
                let (lo, hi) = b.unpack16(r);
                out.push(lo);
                out.push(hi);
            }
        }
    } else {
        for i in 0..n {
            out.push(b.ld(Space::Global, Ty::B16, cache, addr.into(), i64::from(i) * 2));
        }
    }
    out
}

/// The convolution of one channel: `bias + Σ_j w[j]·e[j]` in tap order, rounded to bf16 and passed
/// through SiLU when `silu` (the final rounding is the store's).
pub(crate) fn conv_tap(b: &mut Builder, bias: Option<Reg>, w: &[Reg], e: &[Reg], silu_out: bool) -> Reg {
    let acc = match bias {
        Some(bv) => b.mov(Ty::F32, bv.into()),
        None => b.mov(Ty::F32, 0.0f32.into()),
    };
    for (wj, ej) in w.iter().zip(e) {
        b.mad_into(acc, (*wj).into(), (*ej).into());
    }
    if silu_out {
        let r = round_bf16(b, acc);
        silu(b, r)
    } else {
        acc
    }
}

// ---------------------------------------------------------------------------------------------------
// Prefill.

/// The prefill convolution (`conv1d` / `conv_silu` in prefill and training).
///
/// Parameters, in order: `x, w, state, lens, [bias], y, tokens (u32)`. Grid `(⌈C / (32·V)⌉, 8, B)`,
/// block 256, no shared memory.
pub fn conv1d(spec: &ConvSpec) -> Result<Generated, CodegenError> {
    spec.check()?;
    let (c, k) = (spec.channels, spec.width);
    let km1 = k - 1;
    let v = spec.vector();
    let vector = v == 8;
    let per_block = 32 * v;
    let tiles = c.div_ceil(per_block);

    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "causal depthwise conv1d prefill{}: C={c} K={k}, {v} channel(s) per thread, {SEGMENTS} token segments per sequence",
        if spec.silu { " + SiLU" } else { "" }
    ));
    b.doc("grid (channel tile, token split, sequence), block 256 = 8 warps (one segment each), no shared memory");
    b.block_size(THREADS, 1, 1);
    let x = b.param_ptr("x");
    let w = b.param_ptr("w");
    let state = b.param_ptr("state");
    let lens = b.param_ptr("lens");
    let bias = spec.operands.bias.map(|_| b.param_ptr("bias"));
    let y = b.param_ptr("y");
    let tokens = b.param(ParamTy::U32, "tokens");

    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let tile = b.special(Special::CtaidX);
    let split = b.special(Special::CtaidY);
    let seq = b.special(Special::CtaidZ);
    let cv = madu(&mut b, tile.into(), 32u32.into(), lane.into());
    let ch0 = mulu(&mut b, cv.into(), v.into());
    let seg = madu(&mut b, split.into(), (THREADS / 32).into(), warp.into());
    // L = max(⌈T / SEGMENTS⌉, K − 1).
    let tp = addu(&mut b, tokens.into(), (SEGMENTS - 1).into());
    let l0 = divu(&mut b, tp.into(), SEGMENTS);
    let lseg = b.bin(BinOp::Max, Ty::U32, l0.into(), km1.into());
    let t0 = mulu(&mut b, seg.into(), lseg.into());
    let t1a = addu(&mut b, t0.into(), lseg.into());
    let t1 = b.bin(BinOp::Min, Ty::U32, t1a.into(), tokens.into());
    let active = lt_u32(&mut b, ch0.into(), c.into());
    let is_first = b.setp(Cmp::Eq, Ty::U32, seg.into(), 0u32.into());
    // Row offsets: x/y row (seq, t) starts at element (seq·T + t)·C; the state of (seq, ch) at
    // (seq·C + ch)·(K−1).
    let seq_t = mulu(&mut b, seq.into(), tokens.into());
    let srow = madu(&mut b, seq.into(), c.into(), ch0.into());
    let sidx = mulu(&mut b, srow.into(), km1.into());
    let saddr = b.index(state, sidx, 2);

    b.if_(active, |b| {
        // Weights of the V channels: V·K contiguous bf16 (16-byte aligned when V = 8).
        let widx = mulu(b, ch0.into(), k.into());
        let waddr = b.index(w, widx, 2);
        let wv = load_bf16_run(b, waddr, v * k, Cache::ReadOnly, vector);
        let bv: Option<Vec<Reg>> = bias.map(|bias| {
            let baddr = b.index(bias, ch0, 2);
            load_bf16_run(b, baddr, v, Cache::ReadOnly, vector)
        });
        let has_work = lt_u32(b, t0.into(), tokens.into());
        b.if_(has_work, |b| {
            // The sliding window: win[j][i] = input at position t − (K−1) + j of channel ch0 + i.
            let win: Vec<Vec<Reg>> = (0..km1).map(|_| (0..v).map(|_| b.reg(Ty::F32)).collect()).collect();
            b.if_else(
                is_first,
                |b| {
                    // Segment 0: the window is the old state, [ch][j] in memory.
                    let s = load_bf16_run(b, saddr, v * km1, Cache::None, vector);
                    for (j, row) in win.iter().enumerate() {
                        for (i, &r) in row.iter().enumerate() {
                            b.assign(r, s[i * km1 as usize + j].into());
                        }
                    }
                },
                |b| {
                    for (j, row) in win.iter().enumerate() {
                        let t = b.add(Ty::U32, t0.into(), (j as u32).into());
                        let t = b.bin(BinOp::Sub, Ty::U32, t.into(), km1.into());
                        let r = addu(b, seq_t.into(), t.into());
                        let idx = madu(b, r.into(), c.into(), ch0.into());
                        let a = b.index(x, idx, 2);
                        let vals = load_bf16_run(b, a, v, Cache::ReadOnly, vector);
                        for (&dst, &src) in row.iter().zip(&vals) {
                            b.assign(dst, src.into());
                        }
                    }
                },
            );
            b.for_(Ty::U32, t0.into(), t1.into(), 1u32.into(), |b, t| {
                let r = addu(b, seq_t.into(), t.into());
                let idx = madu(b, r.into(), c.into(), ch0.into());
                let xa = b.index(x, idx, 2);
                let xt = load_bf16_run(b, xa, v, Cache::ReadOnly, vector);
                let mut out = Vec::with_capacity(v as usize);
                for i in 0..v as usize {
                    let taps: Vec<Reg> = (0..k as usize).map(|j| wv[i * k as usize + j]).collect();
                    let e: Vec<Reg> = win.iter().map(|row| row[i]).chain([xt[i]]).collect();
                    out.push(conv_tap(b, bv.as_ref().map(|bv| bv[i]), &taps, &e, spec.silu));
                }
                let ya = b.index(y, idx, 2);
                store_bf16_run(b, ya, &out, vector);
                // Shift the window.
                for j in 0..km1 as usize {
                    for i in 0..v as usize {
                        let src = if j + 1 < km1 as usize { win[j + 1][i] } else { xt[i] };
                        b.assign(win[j][i], src.into());
                    }
                }
            });
        });
        // The new state, by segment 0 after its reads of the old one: slot i holds the input at
        // position lens − (K−1) + i, from x when that is ≥ 0, else old slot lens + i.
        b.if_(is_first, |b| {
            let la = b.index(lens, seq, 4);
            let len = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, la.into(), 0);
            let mut new: Vec<Vec<Reg>> = Vec::new();
            for i in 0..km1 {
                let pos = b.add(Ty::S32, len.into(), (i as i32 - km1 as i32).into());
                let from_x = b.setp(Cmp::Ge, Ty::S32, pos.into(), 0i32.into());
                let vals: Vec<Reg> = (0..v).map(|_| b.reg(Ty::B16)).collect();
                b.if_else(
                    from_x,
                    |b| {
                        let r = addu(b, seq_t.into(), pos.into());
                        let idx = madu(b, r.into(), c.into(), ch0.into());
                        let a = b.index(x, idx, 2);
                        let h = load_b16_run(b, a, v, Cache::ReadOnly, vector);
                        for (&d, &s) in vals.iter().zip(&h) {
                            b.assign(d, s.into());
                        }
                    },
                    |b| {
                        // Old slot K−1 + pos = lens + i of each channel.
                        let slot = b.add(Ty::U32, len.into(), i.into());
                        for (ii, &d) in vals.iter().enumerate() {
                            let e = addu(b, slot.into(), (ii as u32 * km1).into());
                            let a = b.index(saddr, e, 2);
                            let h = b.ld(Space::Global, Ty::B16, Cache::None, a.into(), 0);
                            b.assign(d, h.into());
                        }
                    },
                );
                new.push(vals);
            }
            // Memory order [ch][slot].
            let flat: Vec<Reg> = (0..v as usize).flat_map(|ii| new.iter().map(move |row| row[ii])).collect();
            store_b16_run(b, saddr, &flat, vector);
        });
    });

    let mut args = vec![
        ArgRule::Buffer(spec.operands.x),
        ArgRule::Buffer(spec.operands.w),
        ArgRule::Buffer(spec.operands.state),
        ArgRule::Buffer(spec.operands.lens),
    ];
    if let Some(bias) = spec.operands.bias {
        args.push(ArgRule::Buffer(bias));
    }
    args.push(ArgRule::Buffer(spec.operands.y));
    args.push(ArgRule::Size(spec.tokens.clone()));
    Ok(Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(tiles)), Dim::constant(i64::from(TOKEN_SPLITS)), spec.batch.clone()],
            block: [THREADS, 1, 1],
            dynamic_shared: 0,
            args,
        },
    })
}

// ---------------------------------------------------------------------------------------------------
// Decode.

/// The decode convolution (`conv1d_update` / `conv_silu` in decode): one token per sequence, the state
/// rolled in place.
///
/// Parameters, in order: `x, w, state, [bias], y`. Grid `(⌈C / (256·V)⌉, B)`, block 256, no shared
/// memory.
pub fn conv1d_update(spec: &ConvSpec) -> Result<Generated, CodegenError> {
    spec.check()?;
    let (c, k) = (spec.channels, spec.width);
    let km1 = k - 1;
    let v = spec.vector();
    let vector = v == 8;
    let tiles = c.div_ceil(THREADS * v);

    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "conv1d update (decode){}: C={c} K={k}, {v} channel(s) per thread, state rolled in place",
        if spec.silu { " + SiLU" } else { "" }
    ));
    b.doc("grid (channel tile, sequence), block 256, no shared memory");
    b.block_size(THREADS, 1, 1);
    let x = b.param_ptr("x");
    let w = b.param_ptr("w");
    let state = b.param_ptr("state");
    let bias = spec.operands.bias.map(|_| b.param_ptr("bias"));
    let y = b.param_ptr("y");

    let tid = b.special(Special::TidX);
    let tile = b.special(Special::CtaidX);
    let seq = b.special(Special::CtaidY);
    let cv = madu(&mut b, tile.into(), THREADS.into(), tid.into());
    let ch0 = mulu(&mut b, cv.into(), v.into());
    let active = lt_u32(&mut b, ch0.into(), c.into());
    b.if_(active, |b| {
        let row = madu(b, seq.into(), c.into(), ch0.into());
        let sidx = mulu(b, row.into(), km1.into());
        let saddr = b.index(state, sidx, 2);
        let old = load_b16_run(b, saddr, v * km1, Cache::None, vector);
        let xa = b.index(x, row, 2);
        let xh = load_b16_run(b, xa, v, Cache::ReadOnly, vector);
        let widx = mulu(b, ch0.into(), k.into());
        let waddr = b.index(w, widx, 2);
        let wv = load_bf16_run(b, waddr, v * k, Cache::ReadOnly, vector);
        let bv: Option<Vec<Reg>> = bias.map(|bias| {
            let baddr = b.index(bias, ch0, 2);
            load_bf16_run(b, baddr, v, Cache::ReadOnly, vector)
        });
        let mut out = Vec::with_capacity(v as usize);
        let mut new = Vec::with_capacity((v * km1) as usize);
        for i in 0..v as usize {
            let km1 = km1 as usize;
            let mut e: Vec<Reg> = old[i * km1..(i + 1) * km1].iter().map(|&h| bf16_to_f32(b, h)).collect();
            e.push(bf16_to_f32(b, xh[i]));
            let taps = &wv[i * k as usize..(i + 1) * k as usize];
            out.push(conv_tap(b, bv.as_ref().map(|bv| bv[i]), taps, &e, spec.silu));
            new.extend_from_slice(&old[i * km1 + 1..(i + 1) * km1]);
            new.push(xh[i]);
        }
        store_b16_run(b, saddr, &new, vector);
        let ya = b.index(y, row, 2);
        store_bf16_run(b, ya, &out, vector);
    });

    let mut args =
        vec![ArgRule::Buffer(spec.operands.x), ArgRule::Buffer(spec.operands.w), ArgRule::Buffer(spec.operands.state)];
    if let Some(bias) = spec.operands.bias {
        args.push(ArgRule::Buffer(bias));
    }
    args.push(ArgRule::Buffer(spec.operands.y));
    Ok(Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(tiles)), spec.batch.clone(), Dim::constant(1)],
            block: [THREADS, 1, 1],
            dynamic_shared: 0,
            args,
        },
    })
}
