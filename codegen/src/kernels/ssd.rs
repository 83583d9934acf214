//! ssd: Mamba2 (SSD) kernels — the chunked prefill scan, the one-token step, and the fused decode
//! step of a whole Mamba2 mixer (`mamba2_step`, as one kernel or as two).
//!
//! Per head `h` (B/C group `h / (H/G)`), with `s` the `P × N` f32 state:
//! `s_t = exp(dt_t·A_h)·s_{t−1} + dt_t · x_t ⊗ B_t`, `y_t = s_t·C_t + D_h·x_t`.
//! Layouts as the ops (`compiler::gir::Op::{SsdScan, SsdStep}`): `x, y [B, T, H, P]`, `dt [B, T, H]`,
//! `A, D [H]`, `Bm, Cm [B, T, G, N]`, `state f32 [B, H, P, N]`, `lens i32 [B]`. Activations and the
//! per-head parameters are bf16; the state and all arithmetic are f32.
//!
//! # [`ssd_scan`]: prefill, one kernel, chunks in sequence
//!
//! Rows of the state are independent (row `p` only sees `x[·, p]`), so a block owns one
//! `(P-tile of Pt rows, head, sequence)` and walks the chunks of its sequence in order, keeping its
//! `Pt × N` slice of the running state in **mma accumulator registers** (f32) for the whole sequence:
//! the initial state is read once, the state after `lens[b]` tokens is written once, and there is no
//! scratch buffer (the per-chunk states and cumsums of the 5-kernel Triton pipeline would need
//! buffers of `⌈T/Q⌉` chunks, which a `Dim` cannot size). Per chunk of `Q` tokens (`Q = min(chunk, 64)`,
//! padded with zero rows to `Qp`, a multiple of 16):
//!
//! 1. `cp.async` (16 bytes, zero-filled past the sequence) stages `X [Qp × Pt]`, `B`, `C [Qp × N]`
//!    (bf16) in shared memory; warp 0 holds `dt` in registers and forms `Acum` (inclusive cumsum of
//!    `dt·A`) with a warp scan. With **2 stages** (the default when the kernel fits in 160 KB) the
//!    next chunk's copies and `dt` loads are issued before this chunk computes.
//! 2. Shared copies for the tensor cores: `Hb = bf16(H_c)` (the state entering the chunk), `Xw[s] =
//!    bf16(x_s · exp(Acum_last − Acum_s)·dt_s)`, and in the chunk holding `lens[b]` also `Xl` with the
//!    weights of the state after `lens[b]`.
//! 3. Warp `w < Qp/16` owns query rows `t ∈ [16w, 16w+16)`: `CB = C·Bᵀ` (mma, only the causal column
//!    tiles), the decay mask `M[t,s] = CB·exp(Acum_t − Acum_s)·dt_s` for `s ≤ t` (accumulators turned
//!    into bf16 A fragments in registers), `Y = exp(Acum_t)·(C·Hbᵀ) + M·X + D·x` (mma), stored as bf16.
//! 4. In the chunk holding `lens[b]`: `state' = exp(Acum_{l−1})·H_c + Xlᵀ·B` (mma), written to global.
//! 5. `H_{c+1} = exp(Acum_last)·H_c + Xwᵀ·B` (mma, in the accumulators).
//!
//! All five matmuls are `mma.sync.m16n8k16` (bf16 in, f32 accumulate) with `ldmatrix` fragment loads
//! (`.trans` where the operand is stored K-major); shared rows are padded by 16 bytes, so the 8 rows
//! of every `ldmatrix` matrix fall in distinct banks. Block: 128 threads = 4 warps. The state tiles
//! (16 × 8) are dealt to the warps round-robin. Shared memory (dynamic), bytes:
//! `stages·(2·Qp·(Pt+8) + 4·Qp·(N+8)) + 4·Qp·(Pt+8) + 2·Pt·(N+8) + 8·Qp` — 121.5 KB with 2 stages
//! at Qp = Pt = 64, N = 128 (the launch must raise the dynamic shared-memory limit above 48 KB).
//!
//! Assumptions: `P` and `N` multiples of 16, `N ≤ 512`; `Pt` (default the largest multiple of 16
//! dividing `P` that is ≤ 64 and ≤ 8192/N) divides `P`; `G` divides `H`; `lens[b] ∈ 0 ..= T`
//! (`lens[b] = 0` leaves the state as it was). Precision: the tensor-core operands `M`, `Xw`, `Hb`
//! are rounded to bf16 (as the Triton kernels do); accumulation and the running state stay f32.
//!
//! Cost per call (`Q` the kernel chunk, `Qp = Q`): tensor-core FLOPs
//! `B·H·⌈T/Q⌉·(P/Pt)·(2·Q²·N·5/8 + 4·Q·N·Pt) + B·H·⌈T/Q⌉·Q²·P·5/8` (at Q = 64 the causal tiles are
//! 10 of 16: `CB` per P-tile, `C·Hᵀ` and the state update, `M·X`); DRAM bytes at least `4·B·T·H·P`
//! (x, y) `+ 4·B·T·G·N` (B, C) `+ 2·B·T·H` (dt) `+ 8·B·H·P·N` (state in and out); B and C are read
//! once per head and P-tile (`H/G·P/Pt` times), mostly from L2.
//!
//! Parallelism is `B·H·P/Pt` blocks (64 for Nemotron-Flash-1B at B = 1); the chunk-parallel pipeline
//! would give `⌈T/Q⌉` times more at the price of the scratch buffers.
//!
//! # The decode row core
//!
//! The decode kernels stream the f32 state rows: `L = min(32, N/4)` lanes share a row, each lane
//! owning `N/L` columns as 16-byte vectors (`ld/st.global.v4.f32`), so a warp moves whole contiguous
//! rows; a thread issues the loads of `U = 4` rows before using them; `s ← exp(dt·A)·s + (dt·x)·B`,
//! `y = Σ s·C` (butterfly over the `L` lanes) `+ D·x`. The state is read once and written once, and
//! nothing else touches it, so the state traffic is the minimum (`8·H·P·N` bytes per sequence).
//!
//! # [`ssd_step`]: decode, the plain op
//!
//! Block `(row slice of Rb rows, head, sequence)`, 128 threads (`Rb` = one iteration of the row core
//! when that divides `P`: 16 rows at N = 128), `x`, `B`, `C` staged in shared memory (f32).
//! Cost: FLOPs `≈ 5·B·H·P·N`; bytes `8·B·H·P·N + 4·B·H·P + 4·B·G·N + 2·B·H + 4·H`.
//!
//! # [`mamba2_step`]: decode, the whole fused mixer step as one kernel
//!
//! One kernel for fuse-decode-mixer's `mamba2_step` node: from the in-proj row `zxbcdt [B, 1, 2·Di +
//! 2·G·N + H]` (split `[z, xBC, dt]`, `xBC = [x, B, C]`): the conv update + SiLU of the block's
//! channels (conv state rolled in place), `dt = clamp(softplus(dt + dt_bias))`, the state update and
//! `y = s·C + D·x` (row core), and the gated RMSNorm `rmsnorm(y ⊙ silu(z))·w` (or, with
//! `norm_before_gate`, `rmsnorm(y)·w ⊙ silu(z)`) over each group of `group` channels — which needs
//! every `y` of its group, so a block owns **one (sequence, norm group)**: the heads of the group and
//! the B/C groups they use (the norm group must cover whole B/C groups, so no two blocks share a conv
//! channel). 1024 threads: phase 1 (conv, dt) → shared; phase 2 the row core over the group's
//! `heads·P` rows (contiguous in the state); phase 3 a block-wide sum of squares (warp butterflies,
//! then the 32 warp sums added in order) and the normalised, gated output. Intermediates are rounded
//! to bf16 exactly where the unfused graph stores bf16 tensors (conv output, SiLU output, `dt + bias`,
//! softplus, clamp, `y`), so the fused kernel computes the graph's values. Every byte it needs is read
//! once and every result written once.
//!
//! Cost per step: FLOPs `≈ 5·B·H·P·N + B·Cv·(2K + 5) + 10·B·Di`; bytes `8·B·H·P·N` (state) `+
//! 4·B·Cv·(K−1)` (conv state) `+ 2·B·(2Di + 2GN + H)` (in-proj row) `+ 2·B·Di` (y) `+ 2·Cv·(K+1) + 6·H
//! + 2·Di` (weights), with `Cv = Di + 2GN`, `Di = H·P` — 4.32 MB per sequence for Nemotron-Flash-1B.
//!
//! Parallelism is `B · Di/group` blocks, so the state of a whole norm group streams through one SM.
//! With one norm group (Nemotron-Flash) and a small batch that SM's loads in flight (1024 threads ×
//! 4 rows × 16 B = 64 KB) bound the step: by Little's law about 80 GB/s at ~0.8 µs loaded latency,
//! ~26 µs for the 1B layer at B = 1 against a 0.90 µs HBM floor (4.8 TB/s), ~3.5 %; the batch reaches
//! the HBM rate from about B ≈ 60. A reduction across blocks inside one kernel needs a memory fence
//! kir does not have (and the sim runs blocks one after another), hence:
//!
//! # [`mamba2_step_split`]: the same step as two kernels
//!
//! A state kernel over `(row slice, head, sequence)` blocks (256 blocks at B = 1 for the 1B layer:
//! the whole 2 MB state is in flight at once) writes the pre-norm `y` into the output buffer, and a
//! norm kernel per `(norm group, sequence)` rolls the B/C conv state and normalises `y` in place. No
//! scratch buffer; the same values as the one-kernel version bit for bit; predicted ~2–4 µs at B = 1
//! (two launch latencies plus one DRAM round trip). Use it below B ≈ 60, the one-kernel version
//! above.

use flashc_compiler::gir::{DType, Dim, Sym};
use flashc_compiler::schedule::BufferId;

use super::conv::{
    addu, bf16_to_f32, conv_tap, divu, exp, lt_u32, madu, mulu, pack_bf16x2, remu, round_bf16, silu, softplus, to_bf16,
    unpack_bf16x2,
};
use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Operand, ParamTy, Reg, ShflMode, Space, Special, Ty, UnOp};

/// The sizes of an SSD layer (constants of the program).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsdDims {
    /// `H`, heads.
    pub heads: u32,
    /// `P`, the head width.
    pub head_dim: u32,
    /// `G`, B/C groups (divides `H`).
    pub groups: u32,
    /// `N`, the state width.
    pub state: u32,
}

impl SsdDims {
    fn check(&self) -> Result<(), CodegenError> {
        let SsdDims { heads, head_dim, groups, state } = *self;
        if heads == 0 || head_dim == 0 || state == 0 || groups == 0 || !heads.is_multiple_of(groups) {
            return Err(CodegenError::Shape(format!("ssd dims {self:?}: groups must divide heads, all positive")));
        }
        Ok(())
    }

    /// Heads per B/C group.
    fn heads_per_group(&self) -> u32 {
        self.heads / self.groups
    }
}

/// The program buffers of `ssd_scan` / `ssd_step`, in operand order, then `y`.
#[derive(Clone, Debug, PartialEq)]
pub struct SsdOperands {
    pub x: BufferId,
    pub dt: BufferId,
    pub a: BufferId,
    pub bm: BufferId,
    pub cm: BufferId,
    pub d: BufferId,
    /// f32, updated in place.
    pub state: BufferId,
    /// Scan only.
    pub lens: BufferId,
    pub y: BufferId,
}

impl SsdOperands {
    /// Buffers numbered in operand order: x 0, dt 1, A 2, Bm 3, Cm 4, D 5, state 6, lens 7, y 8.
    pub fn numbered() -> SsdOperands {
        SsdOperands {
            x: BufferId(0),
            dt: BufferId(1),
            a: BufferId(2),
            bm: BufferId(3),
            cm: BufferId(4),
            d: BufferId(5),
            state: BufferId(6),
            lens: BufferId(7),
            y: BufferId(8),
        }
    }
}

fn bf16_only(name: &str, dtype: DType) -> Result<(), CodegenError> {
    if dtype != DType::Bf16 {
        return Err(CodegenError::Unsupported(format!("{name} with {dtype:?} activations (only bf16)")));
    }
    Ok(())
}

// ===================================================================================================
// Prefill: the chunked scan.

/// Threads of the scan kernel (4 warps).
pub const SCAN_THREADS: u32 = 128;
/// The most tokens per chunk the scan kernel processes at once (4 warps × 16 query rows); larger op
/// chunks are processed as sub-chunks of this size (the same algorithm, exact up to rounding).
pub const SCAN_MAX_CHUNK: u32 = 64;
/// The largest state slice (`Pt·N`) a scan block keeps in registers.
pub const SCAN_MAX_TILE: u32 = 8192;

/// A chunked SSD scan to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SsdScanSpec {
    pub name: String,
    pub dtype: DType,
    pub dims: SsdDims,
    /// The op's chunk (tokens); capped at [`SCAN_MAX_CHUNK`].
    pub chunk: u32,
    /// State rows per block; `None` chooses (see the module docs).
    pub p_tile: Option<u32>,
    /// Shared-memory stages of X, B, C (1 or 2); `None`: 2 when the kernel then fits in
    /// [`SCAN_STAGE2_LIMIT`] bytes of shared memory (every sm_80 part), else 1.
    pub stages: Option<u32>,
    pub batch: Dim,
    pub tokens: Dim,
    pub operands: SsdOperands,
}

impl SsdScanSpec {
    pub fn new(name: impl Into<String>, dims: SsdDims, chunk: u32) -> SsdScanSpec {
        SsdScanSpec {
            name: name.into(),
            dtype: DType::Bf16,
            dims,
            chunk,
            p_tile: None,
            stages: None,
            batch: Dim::sym(Sym::B),
            tokens: Dim::sym(Sym::T),
            operands: SsdOperands::numbered(),
        }
    }
}

/// The tiling the scan kernel uses for a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanTiling {
    /// Tokens per chunk.
    pub chunk: u32,
    /// The chunk padded to a multiple of 16 (rows of the shared tiles).
    pub padded: u32,
    /// State rows per block.
    pub p_tile: u32,
    /// Shared-memory stages of X, B, C: with 2, the next chunk's loads are in flight while the
    /// current chunk computes.
    pub stages: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl ScanTiling {
    /// Bytes of one stage (X, B, C of a chunk).
    fn stage_bytes(&self, n: u32) -> u32 {
        2 * self.padded * (self.p_tile + 8) + 4 * self.padded * (n + 8)
    }

    fn shared_for(padded: u32, p_tile: u32, n: u32, stages: u32) -> u32 {
        stages * (2 * padded * (p_tile + 8) + 4 * padded * (n + 8))
            + 4 * padded * (p_tile + 8)
            + 2 * p_tile * (n + 8)
            + 8 * padded
    }
}

/// The shared memory a 2-stage scan may take (sm_80 allows 163 KB per block).
pub const SCAN_STAGE2_LIMIT: u32 = 160 * 1024;

/// The scan kernel's tiling (or why the shapes do not fit it).
pub fn scan_tiling(spec: &SsdScanSpec) -> Result<ScanTiling, CodegenError> {
    spec.dims.check()?;
    let SsdDims { head_dim: p, state: n, .. } = spec.dims;
    if !p.is_multiple_of(16) || !n.is_multiple_of(16) {
        return Err(CodegenError::Shape(format!("ssd_scan needs P and N multiples of 16, found P={p} N={n}")));
    }
    if spec.chunk == 0 {
        return Err(CodegenError::Shape("ssd_scan chunk must be positive".to_string()));
    }
    if n > SCAN_MAX_TILE / 16 {
        return Err(CodegenError::Shape(format!("ssd_scan state width {n} above {}", SCAN_MAX_TILE / 16)));
    }
    let p_tile = match spec.p_tile {
        Some(t) => t,
        None => (1..=4).rev().map(|k| 16 * k).find(|&t| p.is_multiple_of(t) && t * n <= SCAN_MAX_TILE).unwrap_or(16),
    };
    if p_tile == 0 || !p_tile.is_multiple_of(16) || !p.is_multiple_of(p_tile) || p_tile * n > SCAN_MAX_TILE {
        return Err(CodegenError::Shape(format!("ssd_scan P-tile {p_tile} does not fit P={p} N={n}")));
    }
    let chunk = spec.chunk.min(SCAN_MAX_CHUNK);
    let padded = chunk.next_multiple_of(16);
    let stages = match spec.stages {
        Some(st @ (1 | 2)) => st,
        Some(st) => return Err(CodegenError::Shape(format!("ssd_scan stages {st} (1 or 2)"))),
        None if ScanTiling::shared_for(padded, p_tile, n, 2) <= SCAN_STAGE2_LIMIT => 2,
        None => 1,
    };
    let shared_bytes = ScanTiling::shared_for(padded, p_tile, n, stages);
    Ok(ScanTiling { chunk, padded, p_tile, stages, shared_bytes })
}

/// The chunked SSD scan (`ssd_scan`).
///
/// Parameters, in order: `x, dt, A, Bm, Cm, D, state, lens, y, tokens (u32)`. Grid `(P/Pt, H, B)`,
/// block 128, dynamic shared memory [`ScanTiling::shared_bytes`].
pub fn ssd_scan(spec: &SsdScanSpec) -> Result<Generated, CodegenError> {
    bf16_only(&spec.name, spec.dtype)?;
    let tiling = scan_tiling(spec)?;
    let ScanTiling { chunk: qk, padded: qp, p_tile: pt, stages, shared_bytes } = tiling;
    let SsdDims { heads: hh, head_dim: p, groups: gg, state: n } = spec.dims;
    let hg = spec.dims.heads_per_group();
    let xs = pt + 8; // row stride (elements) of X, Xw, Xl
    let ns = n + 8; // row stride of B, C, Hb
    // Stage k: X, B, C at k·stage_bytes; then Xw, Xl, Hb, dt, Acum.
    let stage_bytes = tiling.stage_bytes(n);
    let (o_x, o_b) = (0, 2 * qp * xs);
    let o_c = o_b + 2 * qp * ns;
    let o_xw = stages * stage_bytes;
    let o_xl = o_xw + 2 * qp * xs;
    let o_h = o_xl + 2 * qp * xs;
    let o_dt = o_h + 2 * pt * ns;
    let o_ac = o_dt + 4 * qp;
    debug_assert_eq!(o_ac + 4 * qp, shared_bytes);
    let ntiles = (pt / 16) * (n / 8);
    let ks = ntiles.div_ceil(4);

    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "Mamba2 SSD chunked scan: H={hh} P={p} G={gg} N={n}; chunk {qk} (padded {qp}), P-tile {pt}, chunks in sequence"
    ));
    b.doc("grid (P-tile, head, sequence), block 128 = 4 warps; state slice in mma accumulators");
    b.doc(format!(
        "dynamic shared {shared_bytes} B: {stages} stage(s) of X [{qp}x{xs}], B, C [{qp}x{ns}]; Xw, Xl [{qp}x{xs}], Hb [{pt}x{ns}] bf16; dt, Acum f32"
    ));
    b.block_size(SCAN_THREADS, 1, 1);
    let x = b.param_ptr("x");
    let dt = b.param_ptr("dt");
    let a = b.param_ptr("a");
    let bm = b.param_ptr("bm");
    let cm = b.param_ptr("cm");
    let d = b.param_ptr("d");
    let state = b.param_ptr("state");
    let lens = b.param_ptr("lens");
    let y = b.param_ptr("y");
    let tokens = b.param(ParamTy::U32, "tokens");
    let sm = b.dynamic_shared();
    let smem = b.shared_addr(sm);

    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let ptile = b.special(Special::CtaidX);
    let h = b.special(Special::CtaidY);
    let seq = b.special(Special::CtaidZ);
    let p0 = mulu(&mut b, ptile.into(), pt.into());
    let grp = divu(&mut b, h.into(), hg);
    let g = b.bin(BinOp::Shr, Ty::U32, lane.into(), 2u32.into());
    let tq = b.bin(BinOp::And, Ty::U32, lane.into(), 3u32.into());
    let l8 = b.bin(BinOp::And, Ty::U32, lane.into(), 7u32.into());
    let li = b.bin(BinOp::Shr, Ty::U32, lane.into(), 3u32.into()); // matrix index of ldmatrix.x4
    let li_lo = b.bin(BinOp::And, Ty::U32, li.into(), 1u32.into());
    let li_hi = b.bin(BinOp::Shr, Ty::U32, li.into(), 1u32.into());
    let l16 = b.bin(BinOp::And, Ty::U32, lane.into(), 15u32.into());
    let lhalf = b.bin(BinOp::Shr, Ty::U32, lane.into(), 4u32.into());

    let aa = b.index(a, h, 2);
    let ah = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, aa.into(), 0);
    let a_h = bf16_to_f32(&mut b, ah);
    let da = b.index(d, h, 2);
    let dh = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, da.into(), 0);
    let d_h = bf16_to_f32(&mut b, dh);
    let la = b.index(lens, seq, 4);
    let len_b = b.ld(Space::Global, Ty::U32, Cache::ReadOnly, la.into(), 0);
    let tq1 = addu(&mut b, tokens.into(), (qk - 1).into());
    let nchunks = divu(&mut b, tq1.into(), qk);
    let seq_t = mulu(&mut b, seq.into(), tokens.into());
    // Element index of state row (seq, h, p0).
    let bh = madu(&mut b, seq.into(), hh.into(), h.into());
    let srow0 = madu(&mut b, bh.into(), p.into(), p0.into());

    // ---- the state tiles of this warp: tile q = warp + 4k, rows 16·(q / (N/8)), cols 8·(q % (N/8)).
    struct Tile {
        valid: Reg,
        st: [Reg; 4],
        /// Global element index of (row g, col 2tq) of the tile.
        gidx: Reg,
        /// Shared byte address of Hb (row g, col 2tq).
        hb: Reg,
        /// ldmatrix.x4.trans lane address into X-like arrays (relative to the array), chunk row 0.
        a_off: Reg,
        /// ldmatrix.x2.trans lane address into B (absolute), chunk row 0.
        b_addr: Reg,
    }
    let mut tiles = Vec::new();
    for k in 0..ks {
        let q = addu(&mut b, warp.into(), (4 * k).into());
        let valid = lt_u32(&mut b, q.into(), ntiles.into());
        let rt = divu(&mut b, q.into(), n / 8);
        let ct = remu(&mut b, q.into(), n / 8);
        let r16 = mulu(&mut b, rt.into(), 16u32.into());
        let c8 = mulu(&mut b, ct.into(), 8u32.into());
        let row = addu(&mut b, r16.into(), g.into());
        let col = madu(&mut b, tq.into(), 2u32.into(), c8.into());
        let grow = addu(&mut b, srow0.into(), row.into());
        let gidx = madu(&mut b, grow.into(), n.into(), col.into());
        let hrow = madu(&mut b, row.into(), ns.into(), col.into());
        let hb = madu(&mut b, hrow.into(), 2u32.into(), smem.into());
        let hb = addu(&mut b, hb.into(), o_h.into());
        // A (trans): s = l%8 + 8·(i>>1), p = 16rt + 8·(i&1).
        let s_a = madu(&mut b, li_hi.into(), 8u32.into(), l8.into());
        let p_a = madu(&mut b, li_lo.into(), 8u32.into(), r16.into());
        let a_el = madu(&mut b, s_a.into(), xs.into(), p_a.into());
        let a_off = mulu(&mut b, a_el.into(), 2u32.into());
        // B (x2.trans): s = l%8 + 8·((l/8)&1), n = 8ct.
        let s_b = madu(&mut b, li_lo.into(), 8u32.into(), l8.into());
        let b_el = madu(&mut b, s_b.into(), ns.into(), c8.into());
        let b_addr = madu(&mut b, b_el.into(), 2u32.into(), smem.into());
        let b_addr = addu(&mut b, b_addr.into(), o_b.into());
        let st = [0; 4].map(|_| b.mov(Ty::F32, 0.0f32.into()));
        b.if_(valid, |b| {
            let ga = b.index(state, gidx, 4);
            let lo = b.ld_vec(Space::Global, Ty::F32, Cache::None, ga.into(), 0, 2);
            let hi = b.ld_vec(Space::Global, Ty::F32, Cache::None, ga.into(), i64::from(8 * n * 4), 2);
            for (dst, src) in st.iter().zip(lo.iter().chain(&hi)) {
                b.assign(*dst, (*src).into());
            }
        });
        tiles.push(Tile { valid, st, gidx, hb, a_off, b_addr });
    }

    // ---- per-lane constant addresses of the Y phase (warp w: query rows 16w..16w+16).
    let w16 = mulu(&mut b, warp.into(), 16u32.into());
    // C (A operand, x4): row 16w + l%16, col 8·(l/16).
    let c_row = addu(&mut b, w16.into(), l16.into());
    let c_col = mulu(&mut b, lhalf.into(), 8u32.into());
    let c_el = madu(&mut b, c_row.into(), ns.into(), c_col.into());
    let c_addr = madu(&mut b, c_el.into(), 2u32.into(), smem.into());
    let c_addr = addu(&mut b, c_addr.into(), o_c.into());
    // B / Hb (B operand, x4 non-trans): row l%8 + 8·(i>>1), col 8·(i&1).
    let nb_row = madu(&mut b, li_hi.into(), 8u32.into(), l8.into());
    let nb_col = mulu(&mut b, li_lo.into(), 8u32.into());
    let nb_el = madu(&mut b, nb_row.into(), ns.into(), nb_col.into());
    let nb_off = mulu(&mut b, nb_el.into(), 2u32.into());
    let bcb_addr = addu(&mut b, nb_off.into(), smem.into());
    let bcb_addr = addu(&mut b, bcb_addr.into(), o_b.into());
    let hb_addr = addu(&mut b, nb_off.into(), smem.into());
    let hb_addr = addu(&mut b, hb_addr.into(), o_h.into());
    // X (B operand, x4.trans): s = l%8 + 8·(i&1), p = 8·(i>>1).
    let xt_row = madu(&mut b, li_lo.into(), 8u32.into(), l8.into());
    let xt_col = mulu(&mut b, li_hi.into(), 8u32.into());
    let xt_el = madu(&mut b, xt_row.into(), xs.into(), xt_col.into());
    let xt_addr = madu(&mut b, xt_el.into(), 2u32.into(), smem.into());
    let xt_addr = addu(&mut b, xt_addr.into(), o_x.into());
    // Accumulator rows of this lane: t_lo = 16w + g, t_hi = t_lo + 8; columns 2tq (+1).
    let t_lo = addu(&mut b, w16.into(), g.into());
    let t_hi = addu(&mut b, t_lo.into(), 8u32.into());
    let tq2 = mulu(&mut b, tq.into(), 2u32.into());
    let y_active = lt_u32(&mut b, warp.into(), (qp / 16).into());

    // The first token and the length of chunk `ci` (0 past the end).
    let chunk_at = |b: &mut Builder, ci: Reg| -> (Reg, Reg) {
        let c0 = mulu(b, ci.into(), qk.into());
        let hi = b.bin(BinOp::Max, Ty::U32, tokens.into(), c0.into());
        let rest = b.bin(BinOp::Sub, Ty::U32, hi.into(), c0.into());
        let len = b.bin(BinOp::Min, Ty::U32, rest.into(), qk.into());
        (c0, len)
    };
    // cp.async of X, B, C of chunk `ci` into the stage at byte offset `so` (zero rows past the chunk;
    // the source row of a zero-filled copy is the chunk's first, which exists).
    let issue = |b: &mut Builder, ci: Reg, so: Reg| {
        let (c0, len) = chunk_at(b, ci);
        let copy =
            |b: &mut Builder, src: Reg, cols: u32, off: u32, stride: u32, rowsel: &dyn Fn(&mut Builder, Reg) -> Reg| {
                let per_row = cols / 8;
                b.for_(Ty::U32, tid.into(), (qp * per_row).into(), SCAN_THREADS.into(), |b, i| {
                    let s = divu(b, i.into(), per_row);
                    let cc = remu(b, i.into(), per_row);
                    let valid = lt_u32(b, s.into(), len.into());
                    let s_src = b.selp(Ty::U32, s.into(), 0u32.into(), valid);
                    let tok = addu(b, c0.into(), s_src.into());
                    let base = rowsel(b, tok);
                    let el = madu(b, cc.into(), 8u32.into(), base.into());
                    let ga = b.index(src, el, 2);
                    let sbytes = b.selp(Ty::U32, 16u32.into(), 0u32.into(), valid);
                    let c8 = mulu(b, cc.into(), 8u32.into());
                    let sel = madu(b, s.into(), stride.into(), c8.into());
                    let sa = madu(b, sel.into(), 2u32.into(), smem.into());
                    let sa = addu(b, sa.into(), so.into());
                    let sa = addu(b, sa.into(), off.into());
                    b.cp_async(sa.into(), ga.into(), 16, Some(sbytes.into()));
                });
            };
        // x row (seq, tok, h): ((seq·T + tok)·H + h)·P + p0.
        copy(b, x, pt, o_x, xs, &|b, tok| {
            let r = addu(b, seq_t.into(), tok.into());
            let rh = madu(b, r.into(), hh.into(), h.into());
            madu(b, rh.into(), p.into(), p0.into())
        });
        for (src, off) in [(bm, o_b), (cm, o_c)] {
            copy(b, src, n, off, ns, &|b, tok| {
                let r = addu(b, seq_t.into(), tok.into());
                let rg = madu(b, r.into(), gg.into(), grp.into());
                mulu(b, rg.into(), n.into())
            });
        }
    };
    // dt of chunk `ci` into `dts` (warp 0; lane l holds rows l and l + 32; 0 past the chunk).
    let halves = qp.div_ceil(32);
    let dts: Vec<Reg> = (0..halves).map(|_| b.mov(Ty::F32, 0.0f32.into())).collect();
    let load_dt = |b: &mut Builder, ci: Reg| {
        let (c0, len) = chunk_at(b, ci);
        for (half, &d) in dts.iter().enumerate() {
            let s = addu(b, lane.into(), (32 * half as u32).into());
            let valid = lt_u32(b, s.into(), len.into());
            b.assign(d, 0.0f32.into());
            b.if_(valid, |b| {
                let tok = addu(b, c0.into(), s.into());
                let r = addu(b, seq_t.into(), tok.into());
                let idx = madu(b, r.into(), hh.into(), h.into());
                let ga = b.index(dt, idx, 2);
                let v = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, ga.into(), 0);
                let f = bf16_to_f32(b, v);
                b.assign(d, f.into());
            });
        }
    };
    let w0 = b.setp(Cmp::Eq, Ty::U32, warp.into(), 0u32.into());
    if stages == 2 {
        // Prologue: chunk 0 in flight.
        let any = lt_u32(&mut b, 0u32.into(), nchunks.into());
        b.if_(any, |b| {
            let zero = b.mov(Ty::U32, 0u32.into());
            issue(b, zero, zero);
            b.if_(w0, |b| load_dt(b, zero));
        });
        b.cp_async_commit();
    }

    b.for_uniform(Ty::U32, 0u32.into(), nchunks.into(), 1u32.into(), |b, c| {
        let (c0, len_c) = chunk_at(b, c);
        b.bar();
        // ---- 1. X, B, C of this chunk in shared memory (with 2 stages: issue the next chunk's first).
        let so = if stages == 2 {
            let next = addu(b, c.into(), 1u32.into());
            let has_next = lt_u32(b, next.into(), nchunks.into());
            let odd = b.bin(BinOp::And, Ty::U32, next.into(), 1u32.into());
            let so_next = mulu(b, odd.into(), stage_bytes.into());
            b.if_(has_next, |b| issue(b, next, so_next));
            b.cp_async_commit();
            b.cp_async_wait(1);
            let cur = b.bin(BinOp::And, Ty::U32, c.into(), 1u32.into());
            mulu(b, cur.into(), stage_bytes.into())
        } else {
            let zero = b.mov(Ty::U32, 0u32.into());
            issue(b, c, zero);
            b.cp_async_commit();
            b.if_(w0, |b| load_dt(b, c));
            b.cp_async_wait(0);
            zero
        };
        // The inclusive cumsum of dt·A (warp 0), then (2 stages) the next chunk's dt in flight.
        b.if_(w0, |b| {
            let mut carry: Option<Reg> = None;
            for (half, &d) in dts.iter().enumerate() {
                let s = addu(b, lane.into(), (32 * half as u32).into());
                let v = b.mul(Ty::F32, d.into(), a_h.into());
                for off in [1u32, 2, 4, 8, 16] {
                    let o = b.shfl(ShflMode::Up, v, off.into());
                    let has = b.setp(Cmp::Ge, Ty::U32, lane.into(), off.into());
                    let sum = b.add(Ty::F32, v.into(), o.into());
                    let nv = b.selp(Ty::F32, sum.into(), v.into(), has);
                    b.assign(v, nv.into());
                }
                if let Some(cr) = carry {
                    b.bin_into(BinOp::Add, v, cr.into());
                }
                let total = b.shfl(ShflMode::Idx, v, 31u32.into());
                carry = Some(total);
                let inside = lt_u32(b, s.into(), qp.into());
                b.if_(inside, |b| {
                    let sa = madu(b, s.into(), 4u32.into(), smem.into());
                    b.st(Space::Shared, Ty::F32, sa.into(), i64::from(o_dt), d.into());
                    b.st(Space::Shared, Ty::F32, sa.into(), i64::from(o_ac), v.into());
                });
            }
            if stages == 2 {
                let next = addu(b, c.into(), 1u32.into());
                load_dt(b, next);
            }
        });
        b.bar();
        // Stage-relative addresses of this chunk's X, B, C.
        let c_addr = addu(b, c_addr.into(), so.into());
        let bcb_addr = addu(b, bcb_addr.into(), so.into());
        let xt_addr = addu(b, xt_addr.into(), so.into());
        let xsm = addu(b, smem.into(), so.into());

        // ---- 2. Hb, Xw (and Xl in the chunk holding lens).
        let lens_here = {
            let after = lt_u32(b, c0.into(), len_b.into());
            let end = addu(b, c0.into(), len_c.into());
            let before = b.setp(Cmp::Le, Ty::U32, len_b.into(), end.into());
            b.bin(BinOp::And, Ty::Pred, after.into(), before.into())
        };
        let l_loc = b.bin(BinOp::Sub, Ty::U32, len_b.into(), c0.into());
        let acum_at = |b: &mut Builder, s: Reg| -> Reg {
            let sa = madu(b, s.into(), 4u32.into(), smem.into());
            b.ld(Space::Shared, Ty::F32, Cache::None, sa.into(), i64::from(o_ac))
        };
        let dt_at = |b: &mut Builder, s: Reg| -> Reg {
            let sa = madu(b, s.into(), 4u32.into(), smem.into());
            b.ld(Space::Shared, Ty::F32, Cache::None, sa.into(), i64::from(o_dt))
        };
        let last = b.mov(Ty::U32, (qp - 1).into());
        let acum_last = acum_at(b, last);
        // Xw[s] = x_s·exp(Acum_last − Acum_s)·dt_s; Xl the same with `end` = l_loc − 1 and rows ≥ l_loc zero.
        let fill = |b: &mut Builder, dst_off: u32, end_acum: Reg, limit: Operand| {
            b.for_(Ty::U32, tid.into(), (qp * pt / 2).into(), SCAN_THREADS.into(), |b, i| {
                let s = divu(b, i.into(), pt / 2);
                let pc = remu(b, i.into(), pt / 2);
                let ac = acum_at(b, s);
                let dts = dt_at(b, s);
                let diff = b.bin(BinOp::Sub, Ty::F32, end_acum.into(), ac.into());
                let e = exp(b, diff.into());
                let wgt = b.mul(Ty::F32, e.into(), dts.into());
                let inside = lt_u32(b, s.into(), limit);
                let wgt = b.selp(Ty::F32, wgt.into(), 0.0f32.into(), inside);
                let pc2 = mulu(b, pc.into(), 2u32.into());
                let el = madu(b, s.into(), xs.into(), pc2.into());
                let xa = madu(b, el.into(), 2u32.into(), xsm.into());
                let word = b.ld(Space::Shared, Ty::B32, Cache::None, xa.into(), i64::from(o_x));
                let sa = madu(b, el.into(), 2u32.into(), smem.into());
                let (x0, x1) = unpack_bf16x2(b, word);
                let y0 = b.mul(Ty::F32, x0.into(), wgt.into());
                let y1 = b.mul(Ty::F32, x1.into(), wgt.into());
                let pk = pack_bf16x2(b, y0, y1);
                b.st(Space::Shared, Ty::B32, sa.into(), i64::from(dst_off), pk.into());
            });
        };
        fill(b, o_xw, acum_last, qp.into());
        let l_end = b.bin(BinOp::Sub, Ty::U32, l_loc.into(), 1u32.into());
        b.if_(lens_here, |b| {
            let end = acum_at(b, l_end);
            fill(b, o_xl, end, l_loc.into());
        });
        for t in &tiles {
            b.if_(t.valid, |b| {
                let lo = pack_bf16x2(b, t.st[0], t.st[1]);
                let hi = pack_bf16x2(b, t.st[2], t.st[3]);
                b.st(Space::Shared, Ty::B32, t.hb.into(), 0, lo.into());
                b.st(Space::Shared, Ty::B32, t.hb.into(), i64::from(16 * ns), hi.into());
            });
        }
        b.bar();

        // ---- 3. outputs of the chunk (warps 0 .. Qp/16).
        b.if_(y_active, |b| {
            // CB = C·Bᵀ for the causal column tiles (pairs jp ≤ w).
            let cb: Vec<[Reg; 4]> = (0..qp / 8).map(|_| [0; 4].map(|_| b.mov(Ty::F32, 0.0f32.into()))).collect();
            let causal: Vec<Reg> = (0..qp / 16).map(|jp| b.setp(Cmp::Ge, Ty::U32, warp.into(), jp.into())).collect();
            for kn in 0..n / 16 {
                let ca = addu(b, c_addr.into(), (kn * 32).into());
                let af = b.ldmatrix(4, false, ca.into());
                let af = [af[0], af[1], af[2], af[3]];
                for jp in 0..qp / 16 {
                    b.if_(causal[jp as usize], |b| {
                        let addr = addu(b, bcb_addr.into(), (jp * 16 * ns * 2 + kn * 32).into());
                        let bf = b.ldmatrix(4, false, addr.into());
                        for half in 0..2usize {
                            let acc = cb[2 * jp as usize + half];
                            b.inst(Inst::Mma { d: acc, a: af, b: [bf[2 * half], bf[2 * half + 1]], c: acc });
                        }
                    });
                }
            }
            // The decay mask: M[t, s] = CB·exp(Acum_t − Acum_s)·dt_s for s ≤ t, else 0.
            let ac_lo = acum_at(b, t_lo);
            let ac_hi = acum_at(b, t_hi);
            let mut m: Vec<[Reg; 2]> = Vec::new(); // per 8-column tile: (row g, row g+8) packed pairs
            for (j, acc) in cb.iter().enumerate() {
                let s0 = addu(b, tq2.into(), (8 * j as u32).into());
                let sa = madu(b, s0.into(), 4u32.into(), smem.into());
                let acs = b.ld_vec(Space::Shared, Ty::F32, Cache::None, sa.into(), i64::from(o_ac), 2);
                let dts = b.ld_vec(Space::Shared, Ty::F32, Cache::None, sa.into(), i64::from(o_dt), 2);
                let mut vals = [Reg(0); 4];
                for e in 0..4 {
                    let (t, act) = if e < 2 { (t_lo, ac_lo) } else { (t_hi, ac_hi) };
                    let s = addu(b, s0.into(), ((e & 1) as u32).into());
                    let diff = b.bin(BinOp::Sub, Ty::F32, act.into(), acs[e & 1].into());
                    let dec = exp(b, diff.into());
                    let v = b.mul(Ty::F32, acc[e].into(), dec.into());
                    let v = b.mul(Ty::F32, v.into(), dts[e & 1].into());
                    let keep = b.setp(Cmp::Le, Ty::U32, s.into(), t.into());
                    vals[e] = b.selp(Ty::F32, v.into(), 0.0f32.into(), keep);
                }
                let lo = pack_bf16x2(b, vals[0], vals[1]);
                let hi = pack_bf16x2(b, vals[2], vals[3]);
                m.push([lo, hi]);
            }
            // Y = exp(Acum_t)·(C·Hbᵀ) + M·X.
            let yacc: Vec<[Reg; 4]> = (0..pt / 8).map(|_| [0; 4].map(|_| b.mov(Ty::F32, 0.0f32.into()))).collect();
            for kn in 0..n / 16 {
                let ca = addu(b, c_addr.into(), (kn * 32).into());
                let af = b.ldmatrix(4, false, ca.into());
                let af = [af[0], af[1], af[2], af[3]];
                for pp in 0..pt / 16 {
                    let addr = addu(b, hb_addr.into(), (pp * 16 * ns * 2 + kn * 32).into());
                    let bf = b.ldmatrix(4, false, addr.into());
                    for half in 0..2usize {
                        let acc = yacc[2 * pp as usize + half];
                        b.inst(Inst::Mma { d: acc, a: af, b: [bf[2 * half], bf[2 * half + 1]], c: acc });
                    }
                }
            }
            let e_lo = exp(b, ac_lo.into());
            let e_hi = exp(b, ac_hi.into());
            for acc in &yacc {
                for (e, &r) in acc.iter().enumerate() {
                    b.bin_into(BinOp::Mul, r, if e < 2 { e_lo } else { e_hi }.into());
                }
            }
            for kk in 0..qp / 16 {
                let causal = b.setp(Cmp::Ge, Ty::U32, warp.into(), kk.into());
                let af = [
                    m[2 * kk as usize][0],
                    m[2 * kk as usize][1],
                    m[2 * kk as usize + 1][0],
                    m[2 * kk as usize + 1][1],
                ];
                b.if_(causal, |b| {
                    for pp in 0..pt / 16 {
                        let addr = addu(b, xt_addr.into(), (kk * 16 * xs * 2 + pp * 32).into());
                        let bf = b.ldmatrix(4, true, addr.into());
                        for half in 0..2usize {
                            let acc = yacc[2 * pp as usize + half];
                            b.inst(Inst::Mma { d: acc, a: af, b: [bf[2 * half], bf[2 * half + 1]], c: acc });
                        }
                    }
                });
            }
            // + D·x, stored as bf16 pairs for the rows inside the chunk.
            for (row, t) in [(0usize, t_lo), (1, t_hi)] {
                let inside = lt_u32(b, t.into(), len_c.into());
                let tok = addu(b, c0.into(), t.into());
                let r = addu(b, seq_t.into(), tok.into());
                let rh = madu(b, r.into(), hh.into(), h.into());
                let ybase = madu(b, rh.into(), p.into(), p0.into());
                let xrow = mulu(b, t.into(), xs.into());
                for (pt8, acc) in yacc.iter().enumerate() {
                    let col = addu(b, tq2.into(), (8 * pt8 as u32).into());
                    let xel = addu(b, xrow.into(), col.into());
                    let xa = madu(b, xel.into(), 2u32.into(), xsm.into());
                    let word = b.ld(Space::Shared, Ty::B32, Cache::None, xa.into(), i64::from(o_x));
                    let (x0, x1) = unpack_bf16x2(b, word);
                    let y0 = b.mad(Ty::F32, d_h.into(), x0.into(), acc[2 * row].into());
                    let y1 = b.mad(Ty::F32, d_h.into(), x1.into(), acc[2 * row + 1].into());
                    let pk = pack_bf16x2(b, y0, y1);
                    b.if_(inside, |b| {
                        let yel = addu(b, ybase.into(), col.into());
                        let ya = b.index(y, yel, 2);
                        b.st(Space::Global, Ty::B32, ya.into(), 0, pk.into());
                    });
                }
            }
        });

        // ---- 4./5. the state after lens (in its chunk) and the running state.
        let state_mma = |b: &mut Builder, acc: [Reg; 4], t: &Tile, src_off: u32| {
            for kk in 0..qp / 16 {
                let aa = addu(b, t.a_off.into(), (kk * 16 * xs * 2).into());
                let aa = addu(b, aa.into(), smem.into());
                let aa = addu(b, aa.into(), src_off.into());
                let af = b.ldmatrix(4, true, aa.into());
                let ba = addu(b, t.b_addr.into(), (kk * 16 * ns * 2).into());
                let ba = addu(b, ba.into(), so.into());
                let bf = b.ldmatrix(2, true, ba.into());
                b.inst(Inst::Mma { d: acc, a: [af[0], af[1], af[2], af[3]], b: [bf[0], bf[1]], c: acc });
            }
        };
        b.if_(lens_here, |b| {
            let end = acum_at(b, l_end);
            let dec = exp(b, end.into());
            for t in &tiles {
                b.if_(t.valid, |b| {
                    let tmp = t.st.map(|r| b.mul(Ty::F32, r.into(), dec.into()));
                    state_mma(b, tmp, t, o_xl);
                    let ga = b.index(state, t.gidx, 4);
                    b.st_vec(Space::Global, Ty::F32, ga.into(), 0, vec![tmp[0].into(), tmp[1].into()]);
                    b.st_vec(
                        Space::Global,
                        Ty::F32,
                        ga.into(),
                        i64::from(8 * n * 4),
                        vec![tmp[2].into(), tmp[3].into()],
                    );
                });
            }
        });
        let dec = exp(b, acum_last.into());
        for t in &tiles {
            b.if_(t.valid, |b| {
                for r in t.st {
                    b.bin_into(BinOp::Mul, r, dec.into());
                }
                state_mma(b, t.st, t, o_xw);
            });
        }
    });

    let o = &spec.operands;
    let args = vec![
        ArgRule::Buffer(o.x),
        ArgRule::Buffer(o.dt),
        ArgRule::Buffer(o.a),
        ArgRule::Buffer(o.bm),
        ArgRule::Buffer(o.cm),
        ArgRule::Buffer(o.d),
        ArgRule::Buffer(o.state),
        ArgRule::Buffer(o.lens),
        ArgRule::Buffer(o.y),
        ArgRule::Size(spec.tokens.clone()),
    ];
    Ok(Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(p / pt)), Dim::constant(i64::from(hh)), spec.batch.clone()],
            block: [SCAN_THREADS, 1, 1],
            dynamic_shared: shared_bytes,
            args,
        },
    })
}

// ===================================================================================================
// Decode: the row core.

/// Rows of state a thread loads before it uses them (memory-level parallelism).
pub const STEP_UNROLL: u32 = 4;

/// How the decode kernels stream the rows of an f32 `rows × N` state: `lanes` consecutive lanes share
/// a row, each owning `vecs` 16-byte vectors of it (columns `4j + 4·lanes·m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCore {
    pub n: u32,
    pub lanes: u32,
    pub vecs: u32,
    pub threads: u32,
}

impl RowCore {
    pub fn new(n: u32, threads: u32) -> Result<RowCore, CodegenError> {
        let q = n / 4;
        let bad =
            || CodegenError::Shape(format!("decode SSD kernels need N = 4·2^k ≤ 128 or a multiple of 128, found {n}"));
        if n == 0 || !n.is_multiple_of(4) {
            return Err(bad());
        }
        let lanes = if q <= 32 {
            if !32u32.is_multiple_of(q) {
                return Err(bad());
            }
            q
        } else {
            if !q.is_multiple_of(32) {
                return Err(bad());
            }
            32
        };
        Ok(RowCore { n, lanes, vecs: q / lanes, threads })
    }

    /// Rows the whole block covers with one row per thread group.
    pub fn rows_per_pass(&self) -> u32 {
        (self.threads / 32) * (32 / self.lanes)
    }
}

/// What the caller knows about one state row.
struct RowIn {
    decay: Reg,
    /// `dt·x`.
    coef: Reg,
    x: Reg,
    dskip: Reg,
    /// Shared byte address of the row's B (f32 × N); its C follows `c_stride` bytes later.
    bc: Reg,
}

/// Streams `rows` state rows starting at the global address `base`: `s ← decay·s + coef·B`,
/// `dot = Σ s·C` (reduced over the row's lanes), then `out(row, dot, in)` on the row's first lane.
#[allow(clippy::too_many_arguments)]
fn stream_rows(
    b: &mut Builder,
    core: &RowCore,
    rows: u32,
    base: Reg,
    c_stride: u32,
    lane: Reg,
    warp: Reg,
    row_in: &dyn Fn(&mut Builder, Reg) -> RowIn,
    out: &dyn Fn(&mut Builder, Reg, Reg, &RowIn),
) {
    let RowCore { n, lanes, vecs, .. } = *core;
    let rp = core.rows_per_pass();
    let j = remu(b, lane.into(), lanes);
    let rsub = divu(b, lane.into(), lanes);
    let wrow = madu(b, warp.into(), (32 / lanes).into(), rsub.into());
    let first = b.setp(Cmp::Eq, Ty::U32, j.into(), 0u32.into());
    let col4 = mulu(b, j.into(), 4u32.into());
    b.for_(Ty::U32, 0u32.into(), rows.into(), (STEP_UNROLL * rp).into(), |b, it| {
        let mut rs = Vec::new();
        // Issue every load first.
        for u in 0..STEP_UNROLL {
            let r0 = addu(b, it.into(), (u * rp).into());
            let r = addu(b, r0.into(), wrow.into());
            let valid = lt_u32(b, r.into(), rows.into());
            let el = madu(b, r.into(), n.into(), col4.into());
            let addr = b.index(base, el, 4);
            let vals: Vec<[Reg; 4]> = (0..vecs).map(|_| [0; 4].map(|_| b.mov(Ty::F32, 0.0f32.into()))).collect();
            b.if_(valid, |b| {
                for (m, v) in vals.iter().enumerate() {
                    let got =
                        b.ld_vec(Space::Global, Ty::F32, Cache::None, addr.into(), m as i64 * 16 * i64::from(lanes), 4);
                    for (d, s) in v.iter().zip(got) {
                        b.assign(*d, s.into());
                    }
                }
            });
            rs.push((r, valid, addr, vals));
        }
        for (r, valid, addr, vals) in rs {
            let rc = b.bin(BinOp::Min, Ty::U32, r.into(), (rows - 1).into());
            let ri = row_in(b, rc);
            let dot = b.mov(Ty::F32, 0.0f32.into());
            let mut news = Vec::new();
            for (m, v) in vals.iter().enumerate() {
                let off = madu(b, col4.into(), 4u32.into(), ri.bc.into());
                let boff = (m as u32 * 16 * lanes) as i64;
                let bv = b.ld_vec(Space::Shared, Ty::F32, Cache::None, off.into(), boff, 4);
                let cv = b.ld_vec(Space::Shared, Ty::F32, Cache::None, off.into(), boff + i64::from(c_stride), 4);
                let mut nv = Vec::new();
                for e in 0..4 {
                    let t = b.mul(Ty::F32, v[e].into(), ri.decay.into());
                    let s = b.mad(Ty::F32, ri.coef.into(), bv[e].into(), t.into());
                    b.mad_into(dot, s.into(), cv[e].into());
                    nv.push(Operand::Reg(s));
                }
                news.push(nv);
            }
            b.if_(valid, |b| {
                for (m, nv) in news.into_iter().enumerate() {
                    b.st_vec(Space::Global, Ty::F32, addr.into(), m as i64 * 16 * i64::from(lanes), nv);
                }
            });
            let mut off = lanes / 2;
            while off > 0 {
                let o = b.shfl(ShflMode::Bfly, dot, off.into());
                b.bin_into(BinOp::Add, dot, o.into());
                off /= 2;
            }
            let write = b.bin(BinOp::And, Ty::Pred, valid.into(), first.into());
            b.if_(write, |b| out(b, r, dot, &ri));
        }
    });
}

/// A shared f32 at `base + index·4` (base a shared operand).
fn ld_shared_f32(b: &mut Builder, base: Operand, index: Reg, offset: i64) -> Reg {
    let a = b.index_shared(base, index.into(), 4);
    b.ld(Space::Shared, Ty::F32, Cache::None, a.into(), offset)
}

// ===================================================================================================
// Decode: the plain ssd_step.

/// Threads of the `ssd_step` kernel.
pub const STEP_THREADS: u32 = 128;

/// An `ssd_step` to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SsdStepSpec {
    pub name: String,
    pub dtype: DType,
    pub dims: SsdDims,
    pub batch: Dim,
    /// `lens` is not used.
    pub operands: SsdOperands,
}

impl SsdStepSpec {
    pub fn new(name: impl Into<String>, dims: SsdDims) -> SsdStepSpec {
        SsdStepSpec {
            name: name.into(),
            dtype: DType::Bf16,
            dims,
            batch: Dim::sym(Sym::B),
            operands: SsdOperands::numbered(),
        }
    }
}

/// State rows per `ssd_step` block: one block iteration of the row core, or all of `P`.
pub fn step_rows_per_block(dims: &SsdDims) -> Result<u32, CodegenError> {
    let core = RowCore::new(dims.state, STEP_THREADS)?;
    let per_iter = STEP_UNROLL * core.rows_per_pass();
    Ok(if per_iter < dims.head_dim && dims.head_dim.is_multiple_of(per_iter) { per_iter } else { dims.head_dim })
}

/// The one-token SSD recurrence (`ssd_step`).
///
/// Parameters, in order: `x, dt, A, Bm, Cm, D, state, y`. Grid `(P/Rb, H, B)` with `Rb` =
/// [`step_rows_per_block`], block 128, static shared memory `4·(Rb + 2N)` bytes.
pub fn ssd_step(spec: &SsdStepSpec) -> Result<Generated, CodegenError> {
    bf16_only(&spec.name, spec.dtype)?;
    spec.dims.check()?;
    let SsdDims { heads: hh, head_dim: p, groups: gg, state: n } = spec.dims;
    let core = RowCore::new(n, STEP_THREADS)?;
    let rb = step_rows_per_block(&spec.dims)?;
    let hg = spec.dims.heads_per_group();

    let mut b = Builder::new(spec.name.clone());
    b.doc(format!("Mamba2 SSD decode step: H={hh} P={p} G={gg} N={n}; {rb} state rows per block"));
    b.doc(format!(
        "grid (row slice, head, sequence), block {STEP_THREADS}; {} lanes per row, {} x 16 B per lane, {STEP_UNROLL} rows in flight per thread",
        core.lanes, core.vecs
    ));
    b.block_size(STEP_THREADS, 1, 1);
    let x = b.param_ptr("x");
    let dt = b.param_ptr("dt");
    let a = b.param_ptr("a");
    let bm = b.param_ptr("bm");
    let cm = b.param_ptr("cm");
    let d = b.param_ptr("d");
    let state = b.param_ptr("state");
    let y = b.param_ptr("y");
    let xs = b.shared("xs", 4 * rb, 16);
    let bc = b.shared("bc", 8 * n, 16);

    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let slice = b.special(Special::CtaidX);
    let h = b.special(Special::CtaidY);
    let seq = b.special(Special::CtaidZ);
    let r0 = mulu(&mut b, slice.into(), rb.into());
    let bh = madu(&mut b, seq.into(), hh.into(), h.into());
    let xrow = madu(&mut b, bh.into(), p.into(), r0.into());
    let grp = divu(&mut b, h.into(), hg);
    let bg = madu(&mut b, seq.into(), gg.into(), grp.into());
    let bgn = mulu(&mut b, bg.into(), n.into());
    // Stage x (the block's rows), B and C as f32.
    b.for_(Ty::U32, tid.into(), rb.into(), STEP_THREADS.into(), |b, i| {
        let el = addu(b, xrow.into(), i.into());
        let ga = b.index(x, el, 2);
        let v = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, ga.into(), 0);
        let f = bf16_to_f32(b, v);
        let sa = b.index_shared(xs, i.into(), 4);
        b.st(Space::Shared, Ty::F32, sa.into(), 0, f.into());
    });
    b.for_(Ty::U32, tid.into(), (2 * n).into(), STEP_THREADS.into(), |b, i| {
        let is_b = lt_u32(b, i.into(), n.into());
        let k = remu(b, i.into(), n);
        let el = addu(b, bgn.into(), k.into());
        let ab = b.index(bm, el, 2);
        let ac = b.index(cm, el, 2);
        let src = b.selp(Ty::U64, ab.into(), ac.into(), is_b);
        let v = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, src.into(), 0);
        let f = bf16_to_f32(b, v);
        let sa = b.index_shared(bc, i.into(), 4);
        b.st(Space::Shared, Ty::F32, sa.into(), 0, f.into());
    });
    let dta = b.index(dt, bh, 2);
    let dtv = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, dta.into(), 0);
    let dtv = bf16_to_f32(&mut b, dtv);
    let aa = b.index(a, h, 2);
    let av = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, aa.into(), 0);
    let av = bf16_to_f32(&mut b, av);
    let da = b.index(d, h, 2);
    let dv = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, da.into(), 0);
    let dv = bf16_to_f32(&mut b, dv);
    let da_ = b.mul(Ty::F32, dtv.into(), av.into());
    let decay = exp(&mut b, da_.into());
    let bc_base = b.shared_addr(bc);
    b.bar();
    let srow = mulu(&mut b, xrow.into(), n.into());
    let base = b.index(state, srow, 4);
    stream_rows(
        &mut b,
        &core,
        rb,
        base,
        4 * n,
        lane,
        warp,
        &|b, r| {
            let xv = ld_shared_f32(b, xs, r, 0);
            let coef = b.mul(Ty::F32, dtv.into(), xv.into());
            RowIn { decay, coef, x: xv, dskip: dv, bc: bc_base }
        },
        &|b, r, dot, ri| {
            let yv = b.mad(Ty::F32, ri.dskip.into(), ri.x.into(), dot.into());
            let hv = to_bf16(b, yv);
            let el = addu(b, xrow.into(), r.into());
            let ya = b.index(y, el, 2);
            b.st(Space::Global, Ty::B16, ya.into(), 0, hv.into());
        },
    );

    let o = &spec.operands;
    let args = vec![
        ArgRule::Buffer(o.x),
        ArgRule::Buffer(o.dt),
        ArgRule::Buffer(o.a),
        ArgRule::Buffer(o.bm),
        ArgRule::Buffer(o.cm),
        ArgRule::Buffer(o.d),
        ArgRule::Buffer(o.state),
        ArgRule::Buffer(o.y),
    ];
    Ok(Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(p / rb)), Dim::constant(i64::from(hh)), spec.batch.clone()],
            block: [STEP_THREADS, 1, 1],
            dynamic_shared: 0,
            args,
        },
    })
}

// ===================================================================================================
// Decode: the fused Mamba2 mixer step.

/// Threads of the `mamba2_step` kernel.
pub const MAMBA2_THREADS: u32 = 1024;

/// The program buffers of a `mamba2_step` node: its operands in order, then `y`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mamba2Operands {
    /// The in-proj output row `[B, 1, 2·Di + 2·G·N + H]`.
    pub zxbcdt: BufferId,
    pub dt_bias: BufferId,
    pub conv_w: BufferId,
    /// `[B, Di + 2·G·N, K − 1]`, rolled in place.
    pub conv_state: BufferId,
    pub conv_bias: Option<BufferId>,
    /// `A = −exp(A_log)` `[H]`.
    pub a: BufferId,
    pub d: BufferId,
    /// f32 `[B, H, P, N]`, updated in place.
    pub state: BufferId,
    pub norm_w: BufferId,
    /// `[B, 1, Di]`.
    pub y: BufferId,
}

impl Mamba2Operands {
    /// Numbered in order: zxbcdt 0, dt_bias 1, conv_w 2, conv_state 3, conv_bias 4, A 5, D 6, state 7,
    /// norm_w 8, y 9.
    pub fn numbered(conv_bias: bool) -> Mamba2Operands {
        Mamba2Operands {
            zxbcdt: BufferId(0),
            dt_bias: BufferId(1),
            conv_w: BufferId(2),
            conv_state: BufferId(3),
            conv_bias: conv_bias.then_some(BufferId(4)),
            a: BufferId(5),
            d: BufferId(6),
            state: BufferId(7),
            norm_w: BufferId(8),
            y: BufferId(9),
        }
    }
}

/// A fused Mamba2 decode step to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct Mamba2StepSpec {
    pub name: String,
    pub dtype: DType,
    pub dims: SsdDims,
    pub conv_width: u32,
    /// `dt` clamp bounds (`clamp[min, max]` after the softplus), when the graph has one.
    pub dt_min: Option<f32>,
    pub dt_max: Option<f32>,
    pub norm_eps: f32,
    /// Channels per gated-RMSNorm group (`Di` for one group).
    pub norm_group: u32,
    pub norm_before_gate: bool,
    pub batch: Dim,
    pub operands: Mamba2Operands,
}

impl Mamba2StepSpec {
    /// Mamba2 defaults: one norm group over `Di`, eps 1e-5, conv width 4 with bias, no clamp.
    pub fn new(name: impl Into<String>, dims: SsdDims) -> Mamba2StepSpec {
        Mamba2StepSpec {
            name: name.into(),
            dtype: DType::Bf16,
            dims,
            conv_width: 4,
            dt_min: None,
            dt_max: None,
            norm_eps: 1e-5,
            norm_group: dims.heads * dims.head_dim,
            norm_before_gate: false,
            batch: Dim::sym(Sym::B),
            operands: Mamba2Operands::numbered(true),
        }
    }
}

/// The block shape of a `mamba2_step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mamba2Tiling {
    /// Heads per block (one norm group).
    pub heads: u32,
    /// B/C groups per block.
    pub groups: u32,
    /// Blocks per sequence (norm groups).
    pub blocks: u32,
    pub shared_bytes: u32,
}

/// The tiling of a `mamba2_step` (or why its shapes do not fit the kernel).
pub fn mamba2_tiling(spec: &Mamba2StepSpec) -> Result<Mamba2Tiling, CodegenError> {
    spec.dims.check()?;
    let SsdDims { heads: hh, head_dim: p, state: n, .. } = spec.dims;
    RowCore::new(n, MAMBA2_THREADS)?;
    let hg = spec.dims.heads_per_group();
    let di = hh * p;
    let grp = spec.norm_group;
    if grp == 0 || !di.is_multiple_of(grp) || !grp.is_multiple_of(hg * p) {
        return Err(CodegenError::Shape(format!(
            "mamba2_step: the norm group ({grp} channels) must divide Di = {di} and cover whole B/C groups ({} channels)",
            hg * p
        )));
    }
    if !(2..=super::conv::MAX_WIDTH).contains(&spec.conv_width) {
        return Err(CodegenError::Shape(format!("mamba2_step conv width {}", spec.conv_width)));
    }
    let heads = grp / p;
    if heads > MAMBA2_THREADS {
        return Err(CodegenError::Shape(format!(
            "mamba2_step: {heads} heads per norm group (at most {MAMBA2_THREADS})"
        )));
    }
    let groups = heads / hg;
    let shared_bytes =
        4 * grp.next_multiple_of(8) + 8 * groups * n + 12 * heads.next_multiple_of(4) + 4 * (MAMBA2_THREADS / 32);
    if shared_bytes > 48 * 1024 {
        return Err(CodegenError::Shape(format!("mamba2_step needs {shared_bytes} B of shared memory (48 KB static)")));
    }
    Ok(Mamba2Tiling { heads, groups, blocks: di / grp, shared_bytes })
}

/// The kernel parameters of a `mamba2_step` (declared in the documented order).
struct M2Params {
    zx: Reg,
    dt_bias: Reg,
    conv_w: Reg,
    conv_state: Reg,
    conv_bias: Option<Reg>,
    a: Reg,
    d: Reg,
    state: Reg,
    norm_w: Reg,
    y: Reg,
}

fn m2_params(b: &mut Builder, spec: &Mamba2StepSpec) -> M2Params {
    M2Params {
        zx: b.param_ptr("zxbcdt"),
        dt_bias: b.param_ptr("dt_bias"),
        conv_w: b.param_ptr("conv_w"),
        conv_state: b.param_ptr("conv_state"),
        conv_bias: spec.operands.conv_bias.map(|_| b.param_ptr("conv_bias")),
        a: b.param_ptr("a"),
        d: b.param_ptr("d"),
        state: b.param_ptr("state"),
        norm_w: b.param_ptr("norm_w"),
        y: b.param_ptr("y"),
    }
}

fn m2_args(spec: &Mamba2StepSpec) -> Vec<ArgRule> {
    let o = &spec.operands;
    let mut args = vec![
        ArgRule::Buffer(o.zxbcdt),
        ArgRule::Buffer(o.dt_bias),
        ArgRule::Buffer(o.conv_w),
        ArgRule::Buffer(o.conv_state),
    ];
    if let Some(cb) = o.conv_bias {
        args.push(ArgRule::Buffer(cb));
    }
    args.extend([
        ArgRule::Buffer(o.a),
        ArgRule::Buffer(o.d),
        ArgRule::Buffer(o.state),
        ArgRule::Buffer(o.norm_w),
        ArgRule::Buffer(o.y),
    ]);
    args
}

/// Sizes a `mamba2_step` kernel derives from its spec.
struct M2Sizes {
    hh: u32,
    p: u32,
    n: u32,
    hg: u32,
    di: u32,
    gn: u32,
    conv_dim: u32,
    /// In-proj row width.
    zw: u32,
    k: u32,
}

impl M2Sizes {
    fn of(spec: &Mamba2StepSpec) -> M2Sizes {
        let SsdDims { heads: hh, head_dim: p, groups: gg, state: n } = spec.dims;
        let di = hh * p;
        let gn = gg * n;
        M2Sizes {
            hh,
            p,
            n,
            hg: spec.dims.heads_per_group(),
            di,
            gn,
            conv_dim: di + 2 * gn,
            zw: 2 * di + 2 * gn + hh,
            k: spec.conv_width,
        }
    }
}

/// The conv update + SiLU of conv channel `ch` of one sequence (in-proj row at element `zrow`, conv
/// state rows from `crow`): the bf16-rounded activation as f32. With `roll`, the channel's conv state
/// is rolled in place (its old inputs are read before).
fn m2_conv(b: &mut Builder, pr: &M2Params, sz: &M2Sizes, ch: Reg, zrow: Reg, crow: Reg, roll: bool) -> Reg {
    let (k, km1) = (sz.k, sz.k - 1);
    let row = addu(b, crow.into(), ch.into());
    let sidx = mulu(b, row.into(), km1.into());
    let sa = b.index(pr.conv_state, sidx, 2);
    let old: Vec<Reg> =
        (0..km1).map(|j| b.ld(Space::Global, Ty::B16, Cache::None, sa.into(), i64::from(j) * 2)).collect();
    let xin_el = addu(b, zrow.into(), ch.into());
    let xa = b.index(pr.zx, xin_el, 2);
    let xin = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, xa.into(), i64::from(sz.di) * 2);
    let widx = mulu(b, ch.into(), k.into());
    let wa = b.index(pr.conv_w, widx, 2);
    let taps: Vec<Reg> = (0..k)
        .map(|j| {
            let h = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, wa.into(), i64::from(j) * 2);
            bf16_to_f32(b, h)
        })
        .collect();
    let bias = pr.conv_bias.map(|cb| {
        let ba = b.index(cb, ch, 2);
        let h = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, ba.into(), 0);
        bf16_to_f32(b, h)
    });
    let mut e: Vec<Reg> = old.iter().map(|&h| bf16_to_f32(b, h)).collect();
    e.push(bf16_to_f32(b, xin));
    let v = conv_tap(b, bias, &taps, &e, true);
    let v = round_bf16(b, v);
    if roll {
        m2_roll(b, sa, &old, xin);
    }
    v
}

/// Writes the rolled conv state `[old[1..], xin]` at `sa`.
fn m2_roll(b: &mut Builder, sa: Reg, old: &[Reg], xin: Reg) {
    for j in 0..old.len() {
        let src = if j + 1 < old.len() { old[j + 1] } else { xin };
        b.st(Space::Global, Ty::B16, sa.into(), j as i64 * 2, src.into());
    }
}

/// `dt = clamp(softplus(dt_raw + dt_bias))` of head `hglob` (each step rounded to bf16 as the graph
/// stores it), the decay `exp(dt·A)` and `D`: `(dt, decay, D)`.
fn m2_dt(
    b: &mut Builder,
    pr: &M2Params,
    sz: &M2Sizes,
    spec: &Mamba2StepSpec,
    hglob: Reg,
    zrow: Reg,
) -> (Reg, Reg, Reg) {
    let el = addu(b, zrow.into(), hglob.into());
    let ra = b.index(pr.zx, el, 2);
    let raw = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, ra.into(), i64::from(sz.di + sz.conv_dim) * 2);
    let raw = bf16_to_f32(b, raw);
    let ba = b.index(pr.dt_bias, hglob, 2);
    let bias = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, ba.into(), 0);
    let bias = bf16_to_f32(b, bias);
    let v = b.add(Ty::F32, raw.into(), bias.into());
    let v = round_bf16(b, v);
    let v = softplus(b, v);
    let mut v = round_bf16(b, v);
    if let Some(lo) = spec.dt_min {
        v = b.bin(BinOp::Max, Ty::F32, v.into(), lo.into());
    }
    if let Some(hi) = spec.dt_max {
        v = b.bin(BinOp::Min, Ty::F32, v.into(), hi.into());
    }
    if spec.dt_min.is_some() || spec.dt_max.is_some() {
        v = round_bf16(b, v);
    }
    let aa = b.index(pr.a, hglob, 2);
    let av = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, aa.into(), 0);
    let av = bf16_to_f32(b, av);
    let da = b.index(pr.d, hglob, 2);
    let dv = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, da.into(), 0);
    let dv = bf16_to_f32(b, dv);
    let prod = b.mul(Ty::F32, v.into(), av.into());
    let decay = exp(b, prod.into());
    (v, decay, dv)
}

/// The gated RMSNorm of `count` channels (`c0` the first, global channel index) of one sequence, by
/// the whole block: `y_at(c)` gives the pre-norm `y` of local channel `c`; the result goes to
/// `pr.y[ybase + c]`. A block-wide sum of squares (warp butterflies, then the warp sums in order
/// through `red`, one f32 per warp).
#[allow(clippy::too_many_arguments)]
fn m2_norm(
    b: &mut Builder,
    pr: &M2Params,
    spec: &Mamba2StepSpec,
    nt: u32,
    count: u32,
    c0: Reg,
    zrow: Reg,
    ybase: Reg,
    red: Operand,
    y_at: &dyn Fn(&mut Builder, Reg) -> Reg,
) {
    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let zbase = addu(b, zrow.into(), c0.into());
    let gated = |b: &mut Builder, c: Reg| -> (Reg, Reg) {
        let yv = y_at(b, c);
        let el = addu(b, zbase.into(), c.into());
        let za = b.index(pr.zx, el, 2);
        let zh = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, za.into(), 0);
        let zv = bf16_to_f32(b, zh);
        let sz = silu(b, zv);
        (yv, sz)
    };
    let ss = b.mov(Ty::F32, 0.0f32.into());
    b.for_(Ty::U32, tid.into(), count.into(), nt.into(), |b, c| {
        let (yv, sz) = gated(b, c);
        let g = if spec.norm_before_gate { yv } else { b.mul(Ty::F32, yv.into(), sz.into()) };
        b.mad_into(ss, g.into(), g.into());
    });
    let total = b.warp_reduce(BinOp::Add, Ty::F32, ss);
    let lane0 = b.setp(Cmp::Eq, Ty::U32, lane.into(), 0u32.into());
    b.if_(lane0, |b| {
        let a = b.index_shared(red, warp.into(), 4);
        b.st(Space::Shared, Ty::F32, a.into(), 0, total.into());
    });
    b.bar();
    let red_base = b.shared_addr(red);
    let sum = b.ld(Space::Shared, Ty::F32, Cache::None, red_base.into(), 0);
    for w in 1..nt / 32 {
        let v = b.ld(Space::Shared, Ty::F32, Cache::None, red_base.into(), i64::from(w) * 4);
        b.bin_into(BinOp::Add, sum, v.into());
    }
    let ms = b.mul(Ty::F32, sum.into(), (1.0 / spec.norm_group as f32).into());
    let mse = b.add(Ty::F32, ms.into(), spec.norm_eps.into());
    let rstd = b.un(UnOp::RsqrtApprox, Ty::F32, mse.into());
    b.for_(Ty::U32, tid.into(), count.into(), nt.into(), |b, c| {
        let (yv, sz) = gated(b, c);
        let wel = addu(b, c0.into(), c.into());
        let wa = b.index(pr.norm_w, wel, 2);
        let wh = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, wa.into(), 0);
        let wv = bf16_to_f32(b, wh);
        let o = if spec.norm_before_gate {
            let t = b.mul(Ty::F32, yv.into(), rstd.into());
            let t = b.mul(Ty::F32, t.into(), wv.into());
            b.mul(Ty::F32, t.into(), sz.into())
        } else {
            let g = b.mul(Ty::F32, yv.into(), sz.into());
            let t = b.mul(Ty::F32, g.into(), rstd.into());
            b.mul(Ty::F32, t.into(), wv.into())
        };
        let oh = to_bf16(b, o);
        let el = addu(b, ybase.into(), c.into());
        let ya = b.index(pr.y, el, 2);
        b.st(Space::Global, Ty::B16, ya.into(), 0, oh.into());
    });
}

/// The fused Mamba2 decode step (`mamba2_step`), one kernel.
///
/// Parameters, in order: `zxbcdt, dt_bias, conv_w, conv_state, [conv_bias], A, D, state, norm_w, y`.
/// Grid `(Di/group, B)`, block 1024, static shared memory [`Mamba2Tiling::shared_bytes`].
pub fn mamba2_step(spec: &Mamba2StepSpec) -> Result<Generated, CodegenError> {
    bf16_only(&spec.name, spec.dtype)?;
    let tiling = mamba2_tiling(spec)?;
    let Mamba2Tiling { heads: hb, groups: gb, blocks, .. } = tiling;
    let sz = M2Sizes::of(spec);
    let M2Sizes { hh, p, n, hg, di, gn, conv_dim, zw, k } = sz;
    let core = RowCore::new(n, MAMBA2_THREADS)?;
    let xp = hb * p; // channels (and state rows) per block
    let gbn = gb * n;
    let nt = MAMBA2_THREADS;

    let mut b = Builder::new(spec.name.clone());
    b.doc(format!(
        "fused Mamba2 decode step: H={hh} P={p} G={} N={n} K={k}; one block per (sequence, norm group of {} channels = {hb} heads)",
        spec.dims.groups, spec.norm_group
    ));
    b.doc("phase 1: conv update + SiLU of the block's x/B/C channels, dt softplus; phase 2: state rows (row core); phase 3: gated RMSNorm");
    b.block_size(nt, 1, 1);
    let pr = m2_params(&mut b, spec);
    let xs = b.shared("xs", 2 * xp.next_multiple_of(8), 16);
    let ys = b.shared("ys", 2 * xp.next_multiple_of(8), 16);
    let bcs = b.shared("bc", 8 * gbn, 16);
    let hds = b.shared("heads", 12 * hb.next_multiple_of(4), 16);
    let red = b.shared("red", 4 * (nt / 32), 16);

    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let blk = b.special(Special::CtaidX);
    let seq = b.special(Special::CtaidY);
    let h0 = mulu(&mut b, blk.into(), hb.into());
    let h0p = mulu(&mut b, h0.into(), p.into());
    let g0n = {
        let g0 = divu(&mut b, h0.into(), hg);
        mulu(&mut b, g0.into(), n.into())
    };
    let zrow = mulu(&mut b, seq.into(), zw.into());
    let crow = mulu(&mut b, seq.into(), conv_dim.into());

    // ---- phase 1: conv update + SiLU of the block's x, B and C channels; dt of its heads.
    b.comment("phase 1: conv update + SiLU (x, B, C channels of the block), dt");
    b.for_(Ty::U32, tid.into(), (xp + 2 * gbn).into(), nt.into(), |b, i| {
        let is_x = lt_u32(b, i.into(), xp.into());
        let is_b = lt_u32(b, i.into(), (xp + gbn).into());
        let chx = addu(b, h0p.into(), i.into());
        let ib = b.bin(BinOp::Sub, Ty::U32, i.into(), xp.into());
        let chb = addu(b, ib.into(), di.into());
        let chb = addu(b, chb.into(), g0n.into());
        let chc = addu(b, chb.into(), (gn - gbn).into());
        let ch_bc = b.selp(Ty::U32, chb.into(), chc.into(), is_b);
        let ch = b.selp(Ty::U32, chx.into(), ch_bc.into(), is_x);
        let v = m2_conv(b, &pr, &sz, ch, zrow, crow, true);
        b.if_else(
            is_x,
            |b| {
                let hv = to_bf16(b, v);
                let a = b.index_shared(xs, i.into(), 2);
                b.st(Space::Shared, Ty::B16, a.into(), 0, hv.into());
            },
            |b| {
                let a = b.index_shared(bcs, ib.into(), 4);
                b.st(Space::Shared, Ty::F32, a.into(), 0, v.into());
            },
        );
    });
    let has_head = lt_u32(&mut b, tid.into(), hb.into());
    b.if_(has_head, |b| {
        let hglob = addu(b, h0.into(), tid.into());
        let (dtv, decay, dv) = m2_dt(b, &pr, &sz, spec, hglob, zrow);
        let sa = b.index_shared(hds, tid.into(), 4);
        b.st(Space::Shared, Ty::F32, sa.into(), 0, dtv.into());
        b.st(Space::Shared, Ty::F32, sa.into(), i64::from(4 * hb), decay.into());
        b.st(Space::Shared, Ty::F32, sa.into(), i64::from(8 * hb), dv.into());
    });
    b.bar();

    // ---- phase 2: the state rows of the block's heads (contiguous in the state).
    b.comment("phase 2: s = exp(dt·A)·s + dt·x⊗B, y = s·C + D·x");
    let bc_base = b.shared_addr(bcs);
    let srow = {
        let bh = madu(&mut b, seq.into(), hh.into(), h0.into());
        let r = mulu(&mut b, bh.into(), p.into());
        mulu(&mut b, r.into(), n.into())
    };
    let base = b.index(pr.state, srow, 4);
    stream_rows(
        &mut b,
        &core,
        xp,
        base,
        4 * gbn,
        lane,
        warp,
        &|b, r| {
            let hl = divu(b, r.into(), p);
            let xa = b.index_shared(xs, r.into(), 2);
            let xh = b.ld(Space::Shared, Ty::B16, Cache::None, xa.into(), 0);
            let xv = bf16_to_f32(b, xh);
            let dtv = ld_shared_f32(b, hds, hl, 0);
            let decay = ld_shared_f32(b, hds, hl, i64::from(4 * hb));
            let dv = ld_shared_f32(b, hds, hl, i64::from(8 * hb));
            let coef = b.mul(Ty::F32, dtv.into(), xv.into());
            let gl = divu(b, hl.into(), hg);
            let bc = madu(b, gl.into(), (4 * n).into(), bc_base.into());
            RowIn { decay, coef, x: xv, dskip: dv, bc }
        },
        &|b, r, dot, ri| {
            let yv = b.mad(Ty::F32, ri.dskip.into(), ri.x.into(), dot.into());
            let hv = to_bf16(b, yv);
            let a = b.index_shared(ys, r.into(), 2);
            b.st(Space::Shared, Ty::B16, a.into(), 0, hv.into());
        },
    );
    b.bar();

    // ---- phase 3: gated RMSNorm over the block's channels.
    b.comment("phase 3: gated RMSNorm (block-wide sum of squares)");
    let ybase = madu(&mut b, seq.into(), di.into(), h0p.into());
    m2_norm(&mut b, &pr, spec, nt, xp, h0p, zrow, ybase, red, &|b, c| {
        let a = b.index_shared(ys, c.into(), 2);
        let yh = b.ld(Space::Shared, Ty::B16, Cache::None, a.into(), 0);
        bf16_to_f32(b, yh)
    });

    Ok(Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(blocks)), spec.batch.clone(), Dim::constant(1)],
            block: [nt, 1, 1],
            dynamic_shared: 0,
            args: m2_args(spec),
        },
    })
}

// ===================================================================================================
// Decode: the Mamba2 step as two kernels (full parallelism at small batch).

/// Threads of the norm kernel of the split `mamba2_step`.
pub const MAMBA2_NORM_THREADS: u32 = 1024;

/// The `mamba2_step` body as **two** kernels, for small batches, where one block per norm group leaves
/// the state of a whole group to one SM. Both take the one-kernel version's parameters, in the same
/// order, and run in order on one stream:
///
/// 1. `<name>_state`, grid `(P/Rb, H, B)` (`Rb` = [`step_rows_per_block`]), block 128: the conv
///    update + SiLU of the block's `Rb` x channels (their conv state rolled in place), of the `2N`
///    B/C channels of its group (computed from the old conv state, which it does not write: other
///    blocks read it), `dt` of its head, then the row core over its `Rb` state rows; the **pre-norm
///    `y`** (bf16, as `ssd_step` stores it) goes to the output buffer `y`.
/// 2. `<name>_norm`, grid `(Di/group, B)`, block 1024: rolls the B/C conv state (channels dealt to
///    the norm blocks round-robin), then the gated RMSNorm of its group, reading `y` and overwriting
///    it in place (each element read and written by one thread).
///
/// No scratch buffer; the extra traffic over the one-kernel version is `y` written and read once more
/// (`4·B·Di` bytes) and the B/C conv inputs re-read by every block of the first kernel (from L2).
/// The norm group only has to divide `Di`. Values equal the one-kernel version's.
pub fn mamba2_step_split(spec: &Mamba2StepSpec) -> Result<[Generated; 2], CodegenError> {
    bf16_only(&spec.name, spec.dtype)?;
    spec.dims.check()?;
    let sz = M2Sizes::of(spec);
    let M2Sizes { hh, p, n, hg, di, gn, conv_dim, zw, k } = sz;
    if !(2..=super::conv::MAX_WIDTH).contains(&k) {
        return Err(CodegenError::Shape(format!("mamba2_step conv width {k}")));
    }
    let grp = spec.norm_group;
    if grp == 0 || !di.is_multiple_of(grp) {
        return Err(CodegenError::Shape(format!("mamba2_step: the norm group {grp} must divide Di = {di}")));
    }
    let core = RowCore::new(n, STEP_THREADS)?;
    let rb = step_rows_per_block(&spec.dims)?;
    let nt = STEP_THREADS;

    // ---- kernel 1: conv, dt, state rows, pre-norm y.
    let mut b = Builder::new(format!("{}_state", spec.name));
    b.doc(format!(
        "Mamba2 decode step, part 1 of 2: H={hh} P={p} G={} N={n} K={k}; {rb} state rows per block; pre-norm y",
        spec.dims.groups
    ));
    b.doc(
        "grid (row slice, head, sequence), block 128: conv + SiLU of the block's x and its group's B/C, dt, row core",
    );
    b.block_size(nt, 1, 1);
    let pr = m2_params(&mut b, spec);
    let xs = b.shared("xs", 4 * rb, 16);
    let bcs = b.shared("bc", 8 * n, 16);
    let hds = b.shared("head", 16, 16);
    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let slice = b.special(Special::CtaidX);
    let h = b.special(Special::CtaidY);
    let seq = b.special(Special::CtaidZ);
    let r0 = mulu(&mut b, slice.into(), rb.into());
    let hp = mulu(&mut b, h.into(), p.into());
    let ch0 = addu(&mut b, hp.into(), r0.into());
    let grp_n = {
        let g = divu(&mut b, h.into(), hg);
        mulu(&mut b, g.into(), n.into())
    };
    let zrow = mulu(&mut b, seq.into(), zw.into());
    let crow = mulu(&mut b, seq.into(), conv_dim.into());
    b.for_(Ty::U32, tid.into(), (rb + 2 * n).into(), nt.into(), |b, i| {
        let is_x = lt_u32(b, i.into(), rb.into());
        let is_b = lt_u32(b, i.into(), (rb + n).into());
        let chx = addu(b, ch0.into(), i.into());
        let ib = b.bin(BinOp::Sub, Ty::U32, i.into(), rb.into());
        let chb = addu(b, ib.into(), di.into());
        let chb = addu(b, chb.into(), grp_n.into());
        let chc = addu(b, chb.into(), (gn - n).into());
        let ch_bc = b.selp(Ty::U32, chb.into(), chc.into(), is_b);
        b.if_else(
            is_x,
            |b| {
                let v = m2_conv(b, &pr, &sz, chx, zrow, crow, true);
                let a = b.index_shared(xs, i.into(), 4);
                b.st(Space::Shared, Ty::F32, a.into(), 0, v.into());
            },
            |b| {
                let v = m2_conv(b, &pr, &sz, ch_bc, zrow, crow, false);
                let a = b.index_shared(bcs, ib.into(), 4);
                b.st(Space::Shared, Ty::F32, a.into(), 0, v.into());
            },
        );
    });
    let t0 = b.setp(Cmp::Eq, Ty::U32, tid.into(), 0u32.into());
    b.if_(t0, |b| {
        let (dtv, decay, dv) = m2_dt(b, &pr, &sz, spec, h, zrow);
        let sa = b.shared_addr(hds);
        b.st_vec(Space::Shared, Ty::F32, sa.into(), 0, vec![dtv.into(), decay.into(), dv.into(), dv.into()]);
    });
    b.bar();
    let hsa = b.shared_addr(hds);
    let hv = b.ld_vec(Space::Shared, Ty::F32, Cache::None, hsa.into(), 0, 4);
    let (dtv, decay, dv) = (hv[0], hv[1], hv[2]);
    let bc_base = b.shared_addr(bcs);
    let bh = madu(&mut b, seq.into(), hh.into(), h.into());
    let xrow = madu(&mut b, bh.into(), p.into(), r0.into());
    let srow = mulu(&mut b, xrow.into(), n.into());
    let base = b.index(pr.state, srow, 4);
    stream_rows(
        &mut b,
        &core,
        rb,
        base,
        4 * n,
        lane,
        warp,
        &|b, r| {
            let xv = ld_shared_f32(b, xs, r, 0);
            let coef = b.mul(Ty::F32, dtv.into(), xv.into());
            RowIn { decay, coef, x: xv, dskip: dv, bc: bc_base }
        },
        &|b, r, dot, ri| {
            let yv = b.mad(Ty::F32, ri.dskip.into(), ri.x.into(), dot.into());
            let yh = to_bf16(b, yv);
            let el = addu(b, xrow.into(), r.into());
            let ya = b.index(pr.y, el, 2);
            b.st(Space::Global, Ty::B16, ya.into(), 0, yh.into());
        },
    );
    let state_kernel = Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(p / rb)), Dim::constant(i64::from(hh)), spec.batch.clone()],
            block: [nt, 1, 1],
            dynamic_shared: 0,
            args: m2_args(spec),
        },
    };

    // ---- kernel 2: B/C conv state roll, gated RMSNorm in place.
    let nt = MAMBA2_NORM_THREADS;
    let blocks = di / grp;
    let mut b = Builder::new(format!("{}_norm", spec.name));
    b.doc(format!(
        "Mamba2 decode step, part 2 of 2: roll of the B/C conv state, gated RMSNorm of y in place ({grp}-channel groups)"
    ));
    b.doc("grid (norm group, sequence), block 1024");
    b.block_size(nt, 1, 1);
    let pr = m2_params(&mut b, spec);
    let red = b.shared("red", 4 * (nt / 32), 16);
    let tid = b.special(Special::TidX);
    let blk = b.special(Special::CtaidX);
    let seq = b.special(Special::CtaidY);
    let zrow = mulu(&mut b, seq.into(), zw.into());
    let crow = mulu(&mut b, seq.into(), conv_dim.into());
    // B/C channel i (of 2GN) belongs to norm block i mod blocks.
    let first = madu(&mut b, tid.into(), blocks.into(), blk.into());
    b.for_(Ty::U32, first.into(), (2 * gn).into(), (nt * blocks).into(), |b, i| {
        let ch = addu(b, i.into(), di.into());
        let row = addu(b, crow.into(), ch.into());
        let sidx = mulu(b, row.into(), (k - 1).into());
        let sa = b.index(pr.conv_state, sidx, 2);
        let old: Vec<Reg> =
            (1..k - 1).map(|j| b.ld(Space::Global, Ty::B16, Cache::None, sa.into(), i64::from(j) * 2)).collect();
        let xel = addu(b, zrow.into(), ch.into());
        let xa = b.index(pr.zx, xel, 2);
        let xin = b.ld(Space::Global, Ty::B16, Cache::ReadOnly, xa.into(), i64::from(di) * 2);
        for (j, &v) in old.iter().chain([&xin]).enumerate() {
            b.st(Space::Global, Ty::B16, sa.into(), j as i64 * 2, v.into());
        }
    });
    let c0 = mulu(&mut b, blk.into(), grp.into());
    let ybase = madu(&mut b, seq.into(), di.into(), c0.into());
    let ybuf = pr.y;
    m2_norm(&mut b, &pr, spec, nt, grp, c0, zrow, ybase, red, &|b, c| {
        let el = addu(b, ybase.into(), c.into());
        let ya = b.index(ybuf, el, 2);
        let yh = b.ld(Space::Global, Ty::B16, Cache::None, ya.into(), 0);
        bf16_to_f32(b, yh)
    });
    let norm_kernel = Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(blocks)), spec.batch.clone(), Dim::constant(1)],
            block: [nt, 1, 1],
            dynamic_shared: 0,
            args: m2_args(spec),
        },
    };
    Ok([state_kernel, norm_kernel])
}
