//! attention: softmax attention with a KV cache as kir kernels — FlashAttention-2-style prefill,
//! split-KV (flash-decoding) decode with its combine kernel, and the KV-cache write.
//!
//! Semantics are exactly those of the gir ops `attention_prefill`, `attention_decode` and `kv_write`
//! (the cpu reference is `flashc_runtime::cpu::kernels::attention`). Storage is bf16, every sum and
//! the softmax are f32. Caches are `[B, C, Hkv, d]` ring buffers (position `p` in slot `p mod C`);
//! query head `h` reads kv head `h / G` with `G = Hq / Hkv`.
//!
//! # Prefill (`attention_prefill` → one kernel: the attention, with the KV-cache write fused)
//!
//! **`<name>`.** One block of 128 threads (4 warps) per (query tile, sequence × kv head): grid
//! `[T, B·Hkv, 1]`.
//! * **GQA rows.** The `G` query heads of a kv head are packed into the rows of one tile: row
//!   `m ∈ 0..T·G` is token `m / G`, head `hk·G + m % G`. A tile is `BR = 64` consecutive rows
//!   (`64 / G` tokens), each warp owns 16 rows (FA2 "split-Q": warps never exchange softmax
//!   state), so every K/V tile is loaded once for all `G` heads. There are `⌈T·G / 64⌉` tiles; the
//!   launch rule's grid x is `T` (a `Dim` has no ceiling division, and `T ≥ ⌈T·G/64⌉` for `G ≤
//!   64`): blocks past the last tile exit at once. A launcher that knows `T` may use
//!   [`prefill_grid`] instead — the kernel derives its tile from `ctaid.x` only.
//! * **Key range.** The block's queries sit at positions `start[b] + t_lo ..= start[b] + t_hi`; it
//!   streams keys `lo ..= hi` with `hi = start[b] + t_hi` (**causal tile skipping**: no tile lies
//!   entirely above the diagonal) and `lo = max(0, start[b] + t_lo + 1 − window)` (**sliding-window
//!   skipping**: no tile lies entirely left of the window), in tiles of `BC = 64` keys starting at
//!   `lo`. Key `j` comes from the caches (slot `j mod C`) when `j < start[b]`, else from the new
//!   `k`/`v` (token `j − start[b]`): each 16-byte chunk picks its own source, so tiles may straddle
//!   the cached prefix and the new keys, and the ring buffer needs no special case.
//! * **Shared memory (dynamic, `640·d` bytes: 40 KiB at d = 64, 80 KiB at d = 128):** the Q tile
//!   `[64][d]` and two stages each of K and V `[64][d]` bf16. Rows of `2d` bytes are 16-byte chunks
//!   XOR-swizzled with the row (`chunk ^ ((row >> r) & (s − 1))`, `s = min(d/8, 8)`, `r = log2(8/s)`)
//!   so `ldmatrix` phases and `cp.async` writes are conflict-free (no swizzle when `d/8` is not a
//!   power of two).
//! * **Pipeline:** `cp.async.cg` 16-byte copies with `src-size 0` zero fill for keys past `hi` and
//!   rows past `T` (from a clamped in-range address), **double-buffered**: Q and K/V tile 0 are two
//!   commit groups; iteration `i` issues tile `i + 1` into the other stage, commits (also when
//!   empty), waits for one pending group, `bar.sync`s, computes on stage `i & 1`, and `bar.sync`s
//!   again before that stage is refilled.
//! * **Tensor cores:** Q fragments are loaded once (`ldmatrix.x4`, `d/16` × 4 registers per
//!   thread). `S = Q·Kᵀ` takes `d/16 × 4` `ldmatrix.x4` (K rows are the "col" B operand) and
//!   `d/16 × 8` `mma.sync.m16n8k16` per warp and tile; `O += P·V` takes `4 × d/16`
//!   `ldmatrix.x4.trans` and `4 × d/8` mma. **P stays in registers**: the f32 accumulators of two
//!   adjacent n8 tiles, packed to bf16x2, are exactly an A fragment.
//! * **Online softmax in f32** on the raw scores with `scale·log2(e)` folded into one
//!   `fma` before `ex2.approx` (`p = 2^(s·c − m·c)`); the row max is reduced over the mma quad with
//!   two `shfl.bfly`; the row sum stays per thread until the end (the rescale factors are
//!   quad-uniform), and O is divided by it once.
//! * **Masking only where needed:** a tile takes the masked path (per-element causal and window
//!   compare, `-inf` scores, a guard for rows with no visible key yet) only if it straddles the
//!   diagonal of the block's first query or the window edge of its last query; interior tiles run
//!   unmasked. The branch is block-uniform.
//! * **Cache write, fused.** The new tokens' K and V rows are written to the caches in the same
//!   pass, with the semantics of [`kv_write`] with `lens`: only the `lens[b]` valid tokens (padding
//!   never overwrites a ring slot) and of those only the last `C` (every slot is written once, the later
//!   token wins), token `t` to slot `(start[b] + t) mod C`. Token `t` belongs to the tile holding its
//!   first head row `t·G` (so with GQA one of the `G` heads' blocks writes it, and with `64 mod G ≠ 0`
//!   a token split between two tiles is written once). The owning block's key loop always passes the
//!   token's key (`lo ≤ start + t ≤ hi`): once that K/V tile is in shared memory (after the
//!   barrier that publishes it), the block copies the rows of its own written tokens from the K and V
//!   stages to both caches, one 16-byte chunk per thread and step (`ld.shared.v4` → `st.global.v4`,
//!   aligned since `d` is a multiple of 16), before the tile's math. The hot loop gains one
//!   block-uniform range test per tile; the copies run on at most two tiles. The new keys are always
//!   read from `k`/`v`, never from the caches.
//! * **Ring-buffer clashes → serial mode.** A written slot `(start + t) mod C` holds the cached
//!   position `start − C + (t mod C)`; some query of the launch still reads it iff it is one of the
//!   `n_p = start − first_visible(start)` visible cached positions. The written tokens reach such a
//!   slot iff `n_p > 0` and `lens[b] + n_p > C` (a sliding-window ring of about the window's size, or a
//!   cache too small for prefix and prompt). Blocks of other tiles read those positions, and blocks of
//!   one launch are not ordered, so for such a sequence (a run-time test, the same in all its blocks)
//!   tile 0's block runs all `⌈T·G/64⌉` query tiles in order and, after the last one, copies the
//!   written rows from `k`/`v` to the caches (`ld.global.nc.v4` → `st.global.v4`); the other blocks
//!   exit (the tiles run in one `for` over `ctaid.x .. end`, one iteration in parallel mode). A
//!   sequence with a single tile needs no serial mode: the key loop reads every cached slot before it
//!   reaches the new keys whose writes overwrite them. Serial mode costs that sequence's parallelism
//!   across query tiles (chunked prefill of a long sliding-window prompt into a ring of the window's
//!   size); otherwise the caches are never read at a written slot, and no block reads what another
//!   writes.
//!
//! **Assumptions (checked at generation):** `d` a multiple of 16 and at most 128 (tensor cores; 32,
//! 64 and 128 are the tested widths — other widths such as 80 or 96 run without the swizzle; `d > 128`
//! would need a d-split of O and is refused), `scale > 0`, `Hkv | Hq`, `G ≤ 64`. At run time (as the
//! cpu reference requires): every visible cached position is still in the cache, every tensor has
//! fewer than 2³² elements (u32 indexing), and `B·Hkv ≤ 65535` (grid y).
//!
//! # Decode (`attention_decode` → two kernels, launched in order)
//!
//! 1. **`<name>` — split-KV partials.** Grid `[P, Hkv·HC, B]`, 128 threads. Block `(split, kv head ×
//!    head chunk, b)` handles `Gc` query heads (`HC = G / Gc` head chunks, `Gc` the largest divisor of
//!    `G` that is ≤ 8) over one chunk of the visible positions `lo ..= start[b]` (`lo = max(0,
//!    start[b] + 1 − window)`, slots `j mod C` of the ring buffer). **Every K/V load serves all `Gc`
//!    heads.** CUDA cores, no shared-memory staging: a *key group* of `L = 2^⌈log2(d/8)⌉` lanes holds
//!    one key, one 16-byte chunk per lane (`ld.global.nc.L1::no_allocate.v4`, K and V), so a warp
//!    covers `32 / L` keys and the block `128 / L` keys per step; `U` steps (4, or 2 when `Gc > 4`)
//!    are unrolled so `2·U` loads per thread are in flight. Scores: 8 FMAs per lane per head and
//!    `log2 L` shuffles; each key group keeps its own online-softmax state (max, sum, `8·Gc`
//!    accumulators) — q is pre-scaled by `scale·log2(e)` — and the states are merged at the end with
//!    shuffles (within a warp) and shared memory (`4·Gc·(d + 2)·4` bytes, static, across warps).
//!    Output: the normalised partial `O_s` (f32 `[B, Hq, P, d]`) and `LSE_s = m + log2 l` (f32
//!    `[B, Hq, P]`, base 2).
//!    * **Split rule** (a launch-time function of B and of each sequence's length, computed on the
//!      device, identically in both kernels): `P` (the grid x) is fixed at generation —
//!      `max_splits`, or `clamp(⌈264 / (Hkv·HC)⌉, 1, 32)` so that one sequence already fills 1–2
//!      waves of 132 SMs. At run time `P_eff = min(P, ⌈264 / (B·Hkv·HC)⌉)` (a large batch needs no
//!      split), and sequence `b` with `n` visible positions uses `nsplit = min(P_eff, ⌈n /
//!      min_chunk⌉)` chunks of `⌈n / nsplit⌉` positions (then `nsplit` is recomputed as `⌈n /
//!      chunk⌉`, so every used split is non-empty). Blocks past `nsplit` exit at once; sequences of
//!      different lengths in one batch split differently.
//! 2. **`<name>_combine`.** Grid `[⌈Hq / R⌉, B, 1]`, 128 threads, `R = 128 / (d/8)` rows per block, one
//!    16-byte output chunk per thread: `M = max_s LSE_s`, `O = Σ_s 2^(LSE_s − M)·O_s / Σ_s 2^(LSE_s − M)`
//!    over the `nsplit` used splits, rounded to bf16.
//!
//! **Assumptions:** `d` a multiple of 8 and at most 256, `Hkv | Hq`; at run time the cache holds
//! every visible position (this step's key already written by `kv_write`), and `B ≤ 65535` (grid z).
//!
//! # KV write (`kv_write`)
//!
//! Grid `[T, B, 1]`, one block per (token, sequence), `min(128, 32·⌈Hkv·d/8/32⌉)` threads copying the
//! token's `Hkv·d` row in 16-byte chunks (`ld.global.nc.v4` → `st.global.v4`) to slot `(start[b] + t)
//! mod C` of each cache. With `lens`, tokens `t ≥ lens[b]` are skipped; tokens `t < count − C` are
//! skipped too (a later token owns their slot). `d` must be a multiple of 8.
//!
//! # Parameters (in order; `ArgRule::Buffer` placeholders name the operands' buffers)
//!
//! * prefill: `q, k, v, kcache, vcache, start, lens, o, tokens (T), capacity (C)`;
//! * decode partials: `q, kcache, vcache, start, part_o, part_lse, batch (B), capacity`;
//! * decode combine: `part_o, part_lse, start, o, batch`;
//! * kv write: `cache, new, start, tokens, capacity`.
//!
//! # Cost (see [`prefill_cost`], [`decode_cost`])
//!
//! * Prefill FLOPs (useful, the FA convention): `4·d·Hq·Σ_(b,t) n_vis(b, t)` with `n_vis` the keys a
//!   query sees (`≈ 2·d·Hq·B·T²` causal without a prefix). Tensor-core FLOPs executed:
//!   `4·d·64·64` per (block, key tile).
//! * Prefill bytes: minimum `2·B·T·Hq·d` (q, o) `+ 2·2·B·T·Hkv·d` (k, v) `+ 2·2·B·Hkv·d·n_prefix`
//!   (cached keys read) `+ 2·2·B·Hkv·d·min(lens, C)` (the fused cache write: stored only, the rows
//!   come from shared memory; serial mode reads them again) bytes of bf16; K/V tiles of
//!   the same kv head are re-read by each query tile (from L2).
//! * Decode: `4·d·Hq·n` FLOPs per sequence; bytes moved `2·2·Hkv·d·n` (K, V) `+ 2·Hq·d` (q)
//!   `+ 2·4·Hq·nsplit·(d + 1)` (partials written and read) `+ 2·Hq·d` (o) per sequence; the minimum
//!   is the same without the partials.

use flashc_compiler::gir::{Dim, Sym};
use flashc_compiler::schedule::BufferId;

use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Kernel, Operand, ParamTy, Reg, ShflMode, Space, Special, Ty, UnOp};

/// Threads per block of every attention kernel.
pub const THREADS: u32 = 128;
/// Query rows (token × head of the group) per prefill block: 4 warps × 16.
pub const BR: u32 = 64;
/// Keys per prefill K/V tile.
pub const BC: u32 = 64;
/// Blocks the decode split rule aims for (2 waves of 132 SMs).
pub const TARGET_BLOCKS: u32 = 264;
/// Most splits a decode kernel is generated for by default.
pub const MAX_SPLITS: u32 = 32;
/// Default fewest positions per decode split.
pub const MIN_CHUNK: u32 = 256;

const LOG2_E: f64 = std::f64::consts::LOG2_E;

// ---------------------------------------------------------------------------------------------- specs

/// The buffers of an `attention_prefill` op, in gir operand order, and its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillOperands {
    pub q: BufferId,
    pub k: BufferId,
    pub v: BufferId,
    pub kcache: BufferId,
    pub vcache: BufferId,
    pub start: BufferId,
    pub lens: BufferId,
    pub o: BufferId,
}

impl PrefillOperands {
    /// Placeholders: operand `i` is `BufferId(i)`, the output `BufferId(7)`.
    pub fn numbered() -> PrefillOperands {
        let n = BufferId;
        PrefillOperands { q: n(0), k: n(1), v: n(2), kcache: n(3), vcache: n(4), start: n(5), lens: n(6), o: n(7) }
    }
}

/// An `attention_prefill` to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillSpec {
    pub name: String,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// New tokens per sequence (the `T` of q, usually `Dim::sym(Sym::T)`).
    pub tokens: Dim,
    /// Cache slots `C`.
    pub capacity: Dim,
    pub window: Option<u64>,
    pub scale: f64,
    pub operands: PrefillOperands,
}

/// The buffers of an `attention_decode` op, its output and its two f32 workspaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOperands {
    pub q: BufferId,
    pub kcache: BufferId,
    pub vcache: BufferId,
    pub start: BufferId,
    pub o: BufferId,
    /// f32 `[B, Hq, P, d]` (see [`decode_workspace`]).
    pub part_o: BufferId,
    /// f32 `[B, Hq, P]`.
    pub part_lse: BufferId,
}

impl DecodeOperands {
    /// Placeholders: operands 0..4, the output 4, the workspaces 5 and 6.
    pub fn numbered() -> DecodeOperands {
        let n = BufferId;
        DecodeOperands { q: n(0), kcache: n(1), vcache: n(2), start: n(3), o: n(4), part_o: n(5), part_lse: n(6) }
    }
}

/// An `attention_decode` to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeSpec {
    pub name: String,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub capacity: Dim,
    pub window: Option<u64>,
    pub scale: f64,
    /// The grid's split count `P`; `None` applies the rule in the module docs.
    pub max_splits: Option<u32>,
    /// Fewest positions per split (a sequence of `n` visible positions uses at most `⌈n / min_chunk⌉`).
    pub min_chunk: u32,
    pub operands: DecodeOperands,
}

/// A `kv_write` to generate: one or more (cache, new) pairs sharing `start` (and `lens`).
#[derive(Clone, Debug, PartialEq)]
pub struct KvWriteSpec {
    pub name: String,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub tokens: Dim,
    pub capacity: Dim,
    /// `(cache, new)` buffers, written in order.
    pub pairs: Vec<(BufferId, BufferId)>,
    pub start: BufferId,
    /// Write only the first `lens[b]` tokens (the rule the prefill's fused write follows); `None` writes
    /// all `T` (the `kv_write` op).
    pub lens: Option<BufferId>,
}

fn shape<T>(name: &str, s: impl std::fmt::Display) -> Result<T, CodegenError> {
    Err(CodegenError::Shape(format!("{name}: {s}")))
}

fn check_heads(name: &str, hq: u32, hkv: u32) -> Result<u32, CodegenError> {
    if hkv == 0 || hq == 0 || !hq.is_multiple_of(hkv) {
        return shape(name, format!("kv heads {hkv} must divide query heads {hq}"));
    }
    Ok(hq / hkv)
}

fn check_window(name: &str, window: Option<u64>) -> Result<Option<i64>, CodegenError> {
    match window {
        Some(0) => shape(name, "window must be positive"),
        Some(w) if w > i32::MAX as u64 => shape(name, format!("window {w} does not fit in i32")),
        w => Ok(w.map(|w| w as i64)),
    }
}

// ---------------------------------------------------------------------------------------------- helpers

fn imm(x: u32) -> Operand {
    Operand::Imm(i64::from(x))
}

fn simm(x: i64) -> Operand {
    Operand::Imm(x)
}

fn r(x: Reg) -> Operand {
    Operand::Reg(x)
}

const NEG_INF: f32 = f32::NEG_INFINITY;

fn u_bin(b: &mut Builder, op: BinOp, x: Operand, y: Operand) -> Reg {
    b.bin(op, Ty::U32, x, y)
}

fn s_bin(b: &mut Builder, op: BinOp, x: Operand, y: Operand) -> Reg {
    b.bin(op, Ty::S32, x, y)
}

fn u_mad(b: &mut Builder, x: Operand, y: Operand, z: Operand) -> Reg {
    b.mad(Ty::U32, x, y, z)
}

fn f_bin(b: &mut Builder, op: BinOp, x: Operand, y: Operand) -> Reg {
    b.bin(op, Ty::F32, x, y)
}

/// `max(a, b)` of f32 values where `-inf` stands for "no key yet"; the reference the exponentials
/// subtract: `m`, or 0 while `m` is `-inf` (so `2^(-inf - ref)` is 0, never NaN).
fn finite_ref(b: &mut Builder, m: Reg) -> Reg {
    let none = b.setp(Cmp::Eq, Ty::F32, r(m), Operand::F32(NEG_INF));
    b.selp(Ty::F32, Operand::F32(0.0), r(m), none)
}

/// `2^x` (`ex2.approx.ftz.f32`).
fn ex2(b: &mut Builder, x: Operand) -> Reg {
    b.un(UnOp::Ex2Approx, Ty::F32, x)
}

/// The f32 values of the two bf16 halves of a b32 register: (low, high).
fn bf16x2_to_f32(b: &mut Builder, x: Reg) -> (Reg, Reg) {
    let lo = b.bin(BinOp::Shl, Ty::B32, r(x), imm(16));
    let hi = b.bin(BinOp::And, Ty::B32, r(x), simm(0xFFFF_0000));
    let flo = b.reg(Ty::F32);
    b.raw(Inst::Mov { ty: Ty::B32, dst: flo, src: r(lo) });
    let fhi = b.reg(Ty::F32);
    b.raw(Inst::Mov { ty: Ty::B32, dst: fhi, src: r(hi) });
    (flo, fhi)
}

/// The 16-byte chunk swizzle of a `[rows][chunks]` bf16 tile: chunk `c` of row `row` is stored at
/// `c ^ key(row)`; `key` depends on `row % 8` only.
#[derive(Clone, Copy)]
struct Swizzle {
    /// `None`: no swizzle (chunks per row not a power of two).
    shift_mask: Option<(u32, u32)>,
}

impl Swizzle {
    fn new(chunks: u32) -> Swizzle {
        if chunks.is_power_of_two() && chunks >= 2 {
            let s = chunks.min(8);
            Swizzle { shift_mask: Some(((8 / s).trailing_zeros(), s - 1)) }
        } else {
            Swizzle { shift_mask: None }
        }
    }

    /// `key(row)` (u32).
    fn key(self, b: &mut Builder, row: Reg) -> Reg {
        match self.shift_mask {
            Some((shift, mask)) => {
                let x = u_bin(b, BinOp::Shr, r(row), imm(shift));
                u_bin(b, BinOp::And, r(x), imm(mask))
            }
            None => b.mov(Ty::U32, imm(0)),
        }
    }
}

// ---------------------------------------------------------------------------------------------- prefill

/// The exact grid of the prefill attention kernel for `tokens` new tokens and `batch` sequences.
pub fn prefill_grid(spec: &PrefillSpec, batch: u32, tokens: u32) -> [u32; 3] {
    let g = spec.q_heads / spec.kv_heads.max(1);
    [(tokens * g).div_ceil(BR).max(1), batch * spec.kv_heads, 1]
}

/// Dynamic shared memory of the prefill attention kernel: the Q tile and two stages of K and V.
pub fn prefill_shared_bytes(head_dim: u32) -> u32 {
    BR * head_dim * 2 + 4 * BC * head_dim * 2
}

/// `attention_prefill`: one kernel, the attention with the cache write fused (see the module docs).
pub fn attention_prefill(spec: &PrefillSpec) -> Result<Vec<Generated>, CodegenError> {
    let name = spec.name.as_str();
    let g = check_heads(name, spec.q_heads, spec.kv_heads)?;
    check_window(name, spec.window)?;
    let d = spec.head_dim;
    if d == 0 || !d.is_multiple_of(16) || d > 128 {
        return shape(name, format!("head_dim {d} must be a multiple of 16 and at most 128 (tensor-core tiles)"));
    }
    if g > BR {
        return shape(name, format!("a GQA group of {g} heads exceeds the {BR}-row query tile"));
    }
    if !(spec.scale > 0.0 && spec.scale.is_finite()) {
        return shape(name, format!("scale {} must be positive", spec.scale));
    }
    let kernel = prefill_kernel(spec, g);
    let o = &spec.operands;
    let attention = Generated {
        kernel,
        launch: LaunchRule {
            grid: [spec.tokens.clone(), Dim::sym(Sym::B).scale(i64::from(spec.kv_heads)), Dim::constant(1)],
            block: [THREADS, 1, 1],
            dynamic_shared: prefill_shared_bytes(d),
            args: vec![
                ArgRule::Buffer(o.q),
                ArgRule::Buffer(o.k),
                ArgRule::Buffer(o.v),
                ArgRule::Buffer(o.kcache),
                ArgRule::Buffer(o.vcache),
                ArgRule::Buffer(o.start),
                ArgRule::Buffer(o.lens),
                ArgRule::Buffer(o.o),
                ArgRule::Size(spec.tokens.clone()),
                ArgRule::Size(spec.capacity.clone()),
            ],
        },
    };
    Ok(vec![attention])
}

fn prefill_kernel(spec: &PrefillSpec, g: u32) -> Kernel {
    let d = spec.head_dim;
    let (hq, hkv) = (spec.q_heads, spec.kv_heads);
    let cpr = d / 8; // 16-byte chunks per row
    let row_bytes = 2 * d;
    let q_bytes = BR * row_bytes;
    let tile_bytes = BC * row_bytes;
    let swz = Swizzle::new(cpr);
    let c_log2 = (spec.scale * LOG2_E) as f32;
    let window = spec.window.map(|w| w as i64);
    let ksteps = d / 16; // k16 steps of Q·Kᵀ; also d16 pairs of P·V
    let ntile_n = BC / 8; // n8 tiles of S
    let dtiles = d / 8; // n8 tiles of O

    let mut b = Builder::new(&spec.name);
    b.doc(format!(
        "attention_prefill: Hq {hq}, Hkv {hkv} (GQA group {g}), head_dim {d}, window {:?}, scale {}",
        spec.window, spec.scale
    ));
    b.doc(format!(
        "FlashAttention-2: block = {BR} query rows (tokens x group heads) x 4 warps of 16 rows; K/V tiles of {BC} keys, \
         cp.async double-buffered; mma.sync m16n8k16 bf16->f32; online softmax (exp2, scale*log2e folded)"
    ));
    b.doc(format!(
        "grid [T, B*Hkv, 1] (blocks past ceil(T*G/{BR}) exit), block 128, dynamic shared {} bytes (Q + 2 x (K, V))",
        prefill_shared_bytes(d)
    ));
    b.doc("causal tiles above the diagonal and window tiles left of the window are skipped; masks only on edge tiles");
    b.doc(
        "cache write fused: the tile owning a token (its first head row) stores its K/V rows from shared memory; \
         serial mode (block 0 runs every tile, then writes) when a written ring slot holds a visible cached key",
    );
    b.doc("params: q, k, v, kcache, vcache, start, lens, o, tokens, capacity");
    b.block_size(THREADS, 1, 1);

    let q = b.param_ptr("q");
    let k = b.param_ptr("k");
    let v = b.param_ptr("v");
    let kc = b.param_ptr("kcache");
    let vc = b.param_ptr("vcache");
    let start_p = b.param_ptr("start");
    let lens_p = b.param_ptr("lens");
    let o = b.param_ptr("o");
    let tn = b.param(ParamTy::U32, "tokens");
    let cap = b.param(ParamTy::U32, "capacity");
    let smem = b.dynamic_shared();

    let tid = b.special(Special::TidX);
    let warp = b.special(Special::WarpInBlock);
    let lane = b.special(Special::LaneId);
    let tile0 = b.special(Special::CtaidX);
    let by = b.special(Special::CtaidY);
    let bi = u_bin(&mut b, BinOp::Div, r(by), imm(hkv));
    let hk = u_bin(&mut b, BinOp::Rem, r(by), imm(hkv));
    let rows = u_bin(&mut b, BinOp::Mul, r(tn), imm(g));
    let sa = b.index(start_p, bi, 4);
    let s = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, r(sa), 0);
    let la = b.index(lens_p, bi, 4);
    let count = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, r(la), 0);

    b.comment(
        "cache write: tokens max(0, lens - C) .. lens; serial mode when a written slot holds a visible cached key",
    );
    // Written tokens: the valid ones, and of those only the last C (a later token owns the slot).
    let w_first = s_bin(&mut b, BinOp::Sub, r(count), r(cap));
    let w_first = s_bin(&mut b, BinOp::Max, r(w_first), simm(0));
    // Visible cached positions n_p = s - first_visible(s): slot (s + t) mod C holds cached position
    // s - C + (t mod C), visible to some query iff t mod C >= C - n_p; the written tokens reach such a
    // residue iff n_p > 0 and lens + n_p > C.
    let n_p = match window {
        Some(w) => s_bin(&mut b, BinOp::Min, r(s), simm(w - 1)),
        None => s,
    };
    let has_prefix = b.setp(Cmp::Gt, Ty::S32, r(n_p), simm(0));
    let reach = s_bin(&mut b, BinOp::Add, r(count), r(n_p));
    let wraps = b.setp(Cmp::Gt, Ty::S32, r(reach), r(cap));
    let clash = b.bin(BinOp::And, Ty::Pred, r(has_prefix), r(wraps));
    let rows_p = b.add(Ty::U32, r(rows), imm(BR - 1));
    let ntl = u_bin(&mut b, BinOp::Div, r(rows_p), imm(BR));
    let several = b.setp(Cmp::Gt, Ty::U32, r(ntl), imm(1));
    let serial = b.bin(BinOp::And, Ty::Pred, r(clash), r(several));
    // Parallel: this block's tile (none past the last). Serial: block 0 runs every tile in order and
    // writes the cache after the last one; the other blocks exit.
    let one_end = b.add(Ty::U32, r(tile0), imm(1));
    let one_end = u_bin(&mut b, BinOp::Min, r(one_end), r(ntl));
    let first_block = b.setp(Cmp::Eq, Ty::U32, r(tile0), imm(0));
    let all_end = b.selp(Ty::U32, r(ntl), imm(0), first_block);
    let tile_end = b.selp(Ty::U32, r(all_end), r(one_end), serial);

    b.for_uniform(Ty::U32, r(tile0), r(tile_end), imm(1), |b, tile| {
        let m0 = u_bin(b, BinOp::Mul, r(tile), imm(BR));
        b.comment("the block's key range: causal (hi) and window (lo) tile skipping");
        let t_lo = u_bin(b, BinOp::Div, r(m0), imm(g));
        let last = b.add(Ty::U32, r(m0), imm(BR - 1));
        let rows_m1 = b.add(Ty::U32, r(rows), simm(-1));
        let last = u_bin(b, BinOp::Min, r(last), r(rows_m1));
        let t_hi = u_bin(b, BinOp::Div, r(last), imm(g));
        let hi = s_bin(b, BinOp::Add, r(s), r(t_hi));
        let lo = match window {
            Some(w) => {
                let x = s_bin(b, BinOp::Add, r(s), r(t_lo));
                let x = s_bin(b, BinOp::Add, r(x), simm(1 - w));
                s_bin(b, BinOp::Max, r(x), simm(0))
            }
            None => b.mov(Ty::S32, simm(0)),
        };
        let span = s_bin(b, BinOp::Sub, r(hi), r(lo));
        let span = s_bin(b, BinOp::Add, r(span), simm(i64::from(BC)));
        let ntiles = s_bin(b, BinOp::Div, r(span), simm(i64::from(BC)));
        // The new keys this block writes to the caches: positions s + t of the tokens whose first
        // head row lies in the tile (t·G ∈ [m0, m0 + BR)), of the written ones; none in serial mode.
        let own_lo = b.add(Ty::U32, r(m0), imm(g - 1));
        let own_lo = u_bin(b, BinOp::Div, r(own_lo), imm(g));
        let own_end = b.add(Ty::U32, r(m0), imm(BR + g - 1));
        let own_end = u_bin(b, BinOp::Div, r(own_end), imm(g));
        let wlo = s_bin(b, BinOp::Max, r(own_lo), r(w_first));
        let wend = s_bin(b, BinOp::Min, r(own_end), r(count));
        let p_lo = s_bin(b, BinOp::Add, r(s), r(wlo));
        let p_end = s_bin(b, BinOp::Add, r(s), r(wend));
        let p_end = b.selp(Ty::S32, simm(-1), r(p_end), serial);

        let base = b.shared_addr(smem);
        let q_s = base;
        let k_s = b.add(Ty::U32, r(base), imm(q_bytes));
        let v_s = b.add(Ty::U32, r(base), imm(q_bytes + 2 * tile_bytes));

        // ---- Q tile: rows m0 .. m0 + 64 (token m / G, head hk·G + m % G), zero past T·G.
        b.comment("Q tile -> shared (cp.async, zero-filled past T)");
        for u in 0..(BR * cpr / THREADS) {
            let idx = b.add(Ty::U32, r(tid), imm(u * THREADS));
            let row = u_bin(b, BinOp::Div, r(idx), imm(cpr));
            let c = u_bin(b, BinOp::Rem, r(idx), imm(cpr));
            let m = b.add(Ty::U32, r(m0), r(row));
            let t = u_bin(b, BinOp::Div, r(m), imm(g));
            let gh = u_bin(b, BinOp::Rem, r(m), imm(g));
            let ok = b.setp(Cmp::Lt, Ty::U32, r(t), r(tn));
            let tc = b.selp(Ty::U32, r(t), imm(0), ok);
            let x = u_mad(b, r(bi), r(tn), r(tc));
            let hh = u_mad(b, r(hk), imm(g), r(gh));
            let x = u_mad(b, r(x), imm(hq), r(hh));
            let c8 = u_bin(b, BinOp::Mul, r(c), imm(8));
            let elem = u_mad(b, r(x), imm(d), r(c8));
            let src = b.index(q, elem, 2);
            let key = swz.key(b, row);
            let pc = u_bin(b, BinOp::Xor, r(c), r(key));
            let off = u_mad(b, r(row), imm(row_bytes), r(q_s));
            let dst = u_mad(b, r(pc), imm(16), r(off));
            let n = b.selp(Ty::U32, imm(16), imm(0), ok);
            b.cp_async(r(dst), r(src), 16, Some(r(n)));
        }
        b.cp_async_commit();

        // ---- K/V tile loader: keys j0 .. j0 + 64 into stage `stage_off`.
        let load_kv = |b: &mut Builder, stage_off: Reg, j0: Reg| {
            for u in 0..(BC * cpr / THREADS) {
                let idx = b.add(Ty::U32, r(tid), imm(u * THREADS));
                let row = u_bin(b, BinOp::Div, r(idx), imm(cpr));
                let c = u_bin(b, BinOp::Rem, r(idx), imm(cpr));
                let pos = s_bin(b, BinOp::Add, r(j0), r(row));
                let ok = b.setp(Cmp::Le, Ty::S32, r(pos), r(hi));
                let pc_ = b.selp(Ty::S32, r(pos), r(hi), ok);
                let cached = b.setp(Cmp::Lt, Ty::S32, r(pc_), r(s));
                let c8 = u_bin(b, BinOp::Mul, r(c), imm(8));
                // In the cache: slot pos mod C.
                let slot = u_bin(b, BinOp::Rem, r(pc_), r(cap));
                let x = u_mad(b, r(bi), r(cap), r(slot));
                let x = u_mad(b, r(x), imm(hkv), r(hk));
                let ci = u_mad(b, r(x), imm(d), r(c8));
                // Among the new keys: token pos − start.
                let tt = s_bin(b, BinOp::Sub, r(pc_), r(s));
                let x = u_mad(b, r(bi), r(tn), r(tt));
                let x = u_mad(b, r(x), imm(hkv), r(hk));
                let ni = u_mad(b, r(x), imm(d), r(c8));
                let ei = b.selp(Ty::U32, r(ci), r(ni), cached);
                let off = b.bin(BinOp::MulWide, Ty::U32, r(ei), imm(2));
                let kb = b.selp(Ty::U64, r(kc), r(k), cached);
                let vb = b.selp(Ty::U64, r(vc), r(v), cached);
                let ksrc = b.add(Ty::U64, r(kb), r(off));
                let vsrc = b.add(Ty::U64, r(vb), r(off));
                let key = swz.key(b, row);
                let pcx = u_bin(b, BinOp::Xor, r(c), r(key));
                let doff = u_mad(b, r(row), imm(row_bytes), r(stage_off));
                let doff = u_mad(b, r(pcx), imm(16), r(doff));
                let kd = b.add(Ty::U32, r(k_s), r(doff));
                let vd = b.add(Ty::U32, r(v_s), r(doff));
                let n = b.selp(Ty::U32, imm(16), imm(0), ok);
                b.cp_async(r(kd), r(ksrc), 16, Some(r(n)));
                b.cp_async(r(vd), r(vsrc), 16, Some(r(n)));
            }
        };
        b.comment("K/V tile 0 -> stage 0");
        let zero_off = b.mov(Ty::U32, imm(0));
        load_kv(b, zero_off, lo);
        b.cp_async_commit();

        // ---- Lane constants of the fragment layouts.
        let r8 = u_bin(b, BinOp::And, r(lane), imm(7));
        let mi = u_bin(b, BinOp::Shr, r(lane), imm(3)); // the ldmatrix matrix a lane addresses
        let key = swz.key(b, r8);
        let gq = u_bin(b, BinOp::Shr, r(lane), imm(2)); // mma group (row within 8)
        let tq = u_bin(b, BinOp::And, r(lane), imm(3)); // thread in group
        // Q A-fragments: row 16w + lane % 16, chunk 2kk + lane / 16.
        let l15 = u_bin(b, BinOp::And, r(lane), imm(15));
        let qrow = u_mad(b, r(warp), imm(16), r(l15));
        let qc = u_bin(b, BinOp::Shr, r(lane), imm(4));
        // K B-fragments: row 8·(i / 2) + lane % 8, chunk 2kk + i % 2.
        let kr = u_bin(b, BinOp::Shr, r(mi), imm(1));
        let krow = u_mad(b, r(kr), imm(8), r(r8));
        let kcb = u_bin(b, BinOp::And, r(mi), imm(1));
        // V B-fragments (trans): row 8·(i % 2) + lane % 8, chunk 2dp + i / 2.
        let vr = u_bin(b, BinOp::And, r(mi), imm(1));
        let vrow = u_mad(b, r(vr), imm(8), r(r8));
        let vcb = u_bin(b, BinOp::Shr, r(mi), imm(1));
        let chunk_off = |b: &mut Builder, row: Reg, cbit: Reg, step: u32| -> Reg {
            let c = b.add(Ty::U32, r(cbit), imm(2 * step));
            let c = u_bin(b, BinOp::Xor, r(c), r(key));
            let x = u_bin(b, BinOp::Mul, r(c), imm(16));
            u_mad(b, r(row), imm(row_bytes), r(x))
        };
        let koff: Vec<Reg> = (0..ksteps).map(|kk| chunk_off(b, krow, kcb, kk)).collect();
        let voff: Vec<Reg> = (0..ksteps).map(|dp| chunk_off(b, vrow, vcb, dp)).collect();

        b.comment("wait for Q; Q fragments -> registers (ldmatrix.x4)");
        b.cp_async_wait(1);
        b.bar();
        let mut qf: Vec<[Reg; 4]> = Vec::new();
        for kk in 0..ksteps {
            let off = chunk_off(b, qrow, qc, kk);
            let addr = b.add(Ty::U32, r(q_s), r(off));
            let f = b.ldmatrix(4, false, r(addr));
            qf.push([f[0], f[1], f[2], f[3]]);
        }

        // ---- Softmax state: rows a = g, b = g + 8 of the warp's 16.
        let m_row = [b.mov(Ty::F32, Operand::F32(NEG_INF)), b.mov(Ty::F32, Operand::F32(NEG_INF))];
        let l_row = [b.mov(Ty::F32, Operand::F32(0.0)), b.mov(Ty::F32, Operand::F32(0.0))];
        let oacc: Vec<[Reg; 4]> = (0..dtiles)
            .map(|_| {
                let z = [b.reg(Ty::F32), b.reg(Ty::F32), b.reg(Ty::F32), b.reg(Ty::F32)];
                for x in z {
                    b.assign(x, Operand::F32(0.0));
                }
                z
            })
            .collect();
        let zero = b.mov(Ty::F32, Operand::F32(0.0));
        // Tokens of this thread's two rows.
        let ma = u_mad(b, r(warp), imm(16), r(gq));
        let ma = b.add(Ty::U32, r(m0), r(ma));
        let mb = b.add(Ty::U32, r(ma), imm(8));
        let ta = u_bin(b, BinOp::Div, r(ma), imm(g));
        let tb = u_bin(b, BinOp::Div, r(mb), imm(g));
        // Per-row causal limit of key offsets: key j0 + x is visible iff x ≤ s + t − j0; thread
        // columns are 2·tq + (8n + e), so compare 8n + e with s + t − j0 − 2·tq.
        let tq2 = u_bin(b, BinOp::Mul, r(tq), imm(2));
        let base_a = s_bin(b, BinOp::Add, r(s), r(ta));
        let base_a = s_bin(b, BinOp::Sub, r(base_a), r(tq2));
        let base_b = s_bin(b, BinOp::Add, r(s), r(tb));
        let base_b = s_bin(b, BinOp::Sub, r(base_b), r(tq2));
        // Edge tests of the masked path.
        let first_q = s_bin(b, BinOp::Add, r(s), r(t_lo));
        let win_edge = window.map(|w| s_bin(b, BinOp::Add, r(hi), simm(1 - w)));

        b.comment("main loop over K/V tiles");
        b.for_uniform(Ty::S32, simm(0), r(ntiles), simm(1), |b, i| {
            let j0 = u_mad(b, r(i), imm(BC), r(lo));
            let i1 = b.add(Ty::S32, r(i), simm(1));
            let has_next = b.setp(Cmp::Lt, Ty::S32, r(i1), r(ntiles));
            let stage = u_bin(b, BinOp::And, r(i), imm(1));
            let next_stage = u_bin(b, BinOp::Xor, r(stage), imm(1));
            b.if_uniform(has_next, |b| {
                b.comment("prefetch the next K/V tile into the other stage");
                let off = u_bin(b, BinOp::Mul, r(next_stage), imm(tile_bytes));
                let j1 = b.add(Ty::S32, r(j0), imm(BC));
                load_kv(b, off, j1);
            });
            b.cp_async_commit();
            b.cp_async_wait(1);
            b.bar();
            let soff = u_bin(b, BinOp::Mul, r(stage), imm(tile_bytes));
            let kst = b.add(Ty::U32, r(k_s), r(soff));
            let vst = b.add(Ty::U32, r(v_s), r(soff));

            // Fused cache write: the block's own new keys in this tile (rows r_lo .. r_end) go from
            // shared memory to the caches, one 16-byte chunk per thread and step.
            let j_end = b.add(Ty::S32, r(j0), imm(BC));
            let before_end = b.setp(Cmp::Lt, Ty::S32, r(j0), r(p_end));
            let after_lo = b.setp(Cmp::Gt, Ty::S32, r(j_end), r(p_lo));
            let writes = b.bin(BinOp::And, Ty::Pred, r(before_end), r(after_lo));
            b.if_uniform(writes, |b| {
                b.comment("cache write: the block's new keys of this tile, shared -> kcache / vcache");
                let r_lo = s_bin(b, BinOp::Sub, r(p_lo), r(j0));
                let r_lo = s_bin(b, BinOp::Max, r(r_lo), simm(0));
                let r_end = s_bin(b, BinOp::Sub, r(p_end), r(j0));
                let r_end = s_bin(b, BinOp::Min, r(r_end), simm(i64::from(BC)));
                let nr = s_bin(b, BinOp::Sub, r(r_end), r(r_lo));
                let n = s_bin(b, BinOp::Mul, r(nr), simm(i64::from(cpr)));
                b.for_(Ty::S32, r(tid), r(n), simm(i64::from(THREADS)), |b, idx| {
                    let rr = u_bin(b, BinOp::Div, r(idx), imm(cpr));
                    let row = b.add(Ty::U32, r(r_lo), r(rr));
                    let c = u_bin(b, BinOp::Rem, r(idx), imm(cpr));
                    let key = swz.key(b, row);
                    let pcx = u_bin(b, BinOp::Xor, r(c), r(key));
                    let doff = u_mad(b, r(row), imm(row_bytes), r(soff));
                    let doff = u_mad(b, r(pcx), imm(16), r(doff));
                    let pos = b.add(Ty::U32, r(j0), r(row));
                    let slot = u_bin(b, BinOp::Rem, r(pos), r(cap));
                    let x = u_mad(b, r(bi), r(cap), r(slot));
                    let x = u_mad(b, r(x), imm(hkv), r(hk));
                    let c8 = u_bin(b, BinOp::Mul, r(c), imm(8));
                    let ci = u_mad(b, r(x), imm(d), r(c8));
                    let off = b.bin(BinOp::MulWide, Ty::U32, r(ci), imm(2));
                    for (sbase, cache) in [(k_s, kc), (v_s, vc)] {
                        let sa = b.add(Ty::U32, r(sbase), r(doff));
                        let x = b.ld_vec(Space::Shared, Ty::B32, Cache::None, r(sa), 0, 4);
                        let dst = b.add(Ty::U64, r(cache), r(off));
                        b.st_vec(Space::Global, Ty::B32, r(dst), 0, x.into_iter().map(Operand::Reg).collect());
                    }
                });
            });

            // Masked path: the tile reaches past the first query's diagonal or left of the last
            // query's window.
            let jend = b.add(Ty::S32, r(j0), imm(BC - 1));
            let diag = b.setp(Cmp::Gt, Ty::S32, r(jend), r(first_q));
            let need = match win_edge {
                Some(we) => {
                    let left = b.setp(Cmp::Lt, Ty::S32, r(j0), r(we));
                    b.bin(BinOp::Or, Ty::Pred, r(diag), r(left))
                }
                None => diag,
            };
            let plain = b.un(UnOp::Not, Ty::Pred, r(need));
            let tile_body = |b: &mut Builder, masked: bool| {
                b.comment(if masked { "S = Q K^T (masked tile)" } else { "S = Q K^T (interior tile)" });
                let mut sacc: Vec<[Reg; 4]> = Vec::with_capacity(ntile_n as usize);
                for kk in 0..ksteps as usize {
                    let kaddr = b.add(Ty::U32, r(kst), r(koff[kk]));
                    for np in 0..BC / 16 {
                        let addr = b.add(Ty::U32, r(kaddr), imm(np * 16 * row_bytes));
                        let f = b.ldmatrix(4, false, r(addr));
                        for h in 0..2usize {
                            let bf = [f[2 * h], f[2 * h + 1]];
                            let n = (2 * np) as usize + h;
                            if kk == 0 {
                                let dst = b.mma(qf[kk], bf, [zero; 4]);
                                sacc.push(dst);
                            } else {
                                let acc = sacc[n];
                                b.raw(Inst::Mma { d: acc, a: qf[kk], b: bf, c: acc });
                            }
                        }
                    }
                }
                let mut p: Vec<[Reg; 4]> = sacc.clone();
                if masked {
                    let j0s = j0;
                    let lim = [s_bin(b, BinOp::Sub, r(base_a), r(j0s)), s_bin(b, BinOp::Sub, r(base_b), r(j0s))];
                    let wlim = window.map(|w| lim.map(|l| s_bin(b, BinOp::Add, r(l), simm(1 - w))));
                    for (n, sn) in sacc.iter().enumerate() {
                        for e in 0..4usize {
                            let row = e / 2;
                            let x = (8 * n + (e & 1)) as i64;
                            let mut ok = b.setp(Cmp::Ge, Ty::S32, r(lim[row]), simm(x));
                            if let Some(wl) = wlim {
                                let okw = b.setp(Cmp::Le, Ty::S32, r(wl[row]), simm(x));
                                ok = b.bin(BinOp::And, Ty::Pred, r(ok), r(okw));
                            }
                            p[n][e] = b.selp(Ty::F32, r(sn[e]), Operand::F32(NEG_INF), ok);
                        }
                    }
                }
                b.comment("online softmax");
                let mut probs = p.clone();
                for row in 0..2usize {
                    let mut mx = f_bin(b, BinOp::Max, r(p[0][2 * row]), r(p[0][2 * row + 1]));
                    for pn in p.iter().skip(1) {
                        mx = f_bin(b, BinOp::Max, r(mx), r(pn[2 * row]));
                        mx = f_bin(b, BinOp::Max, r(mx), r(pn[2 * row + 1]));
                    }
                    for off in [1u32, 2] {
                        let other = b.shfl(ShflMode::Bfly, mx, imm(off));
                        mx = f_bin(b, BinOp::Max, r(mx), r(other));
                    }
                    let m_new = f_bin(b, BinOp::Max, r(m_row[row]), r(mx));
                    let m_use = if masked { finite_ref(b, m_new) } else { m_new };
                    let dm = f_bin(b, BinOp::Sub, r(m_row[row]), r(m_use));
                    let dm = f_bin(b, BinOp::Mul, r(dm), Operand::F32(c_log2));
                    let alpha = ex2(b, r(dm));
                    let neg = f_bin(b, BinOp::Mul, r(m_use), Operand::F32(-c_log2));
                    let mut sum: Option<Reg> = None;
                    for (n, pn) in p.iter().enumerate() {
                        for e in [2 * row, 2 * row + 1] {
                            let x = b.mad(Ty::F32, r(pn[e]), Operand::F32(c_log2), r(neg));
                            let pe = ex2(b, r(x));
                            probs[n][e] = pe;
                            sum = Some(match sum {
                                None => pe,
                                Some(s0) => f_bin(b, BinOp::Add, r(s0), r(pe)),
                            });
                        }
                    }
                    let sum = sum.unwrap_or(zero);
                    let l_new = b.mad(Ty::F32, r(l_row[row]), r(alpha), r(sum));
                    b.assign(l_row[row], r(l_new));
                    b.assign(m_row[row], r(m_new));
                    for od in &oacc {
                        b.bin_into(BinOp::Mul, od[2 * row], r(alpha));
                        b.bin_into(BinOp::Mul, od[2 * row + 1], r(alpha));
                    }
                }
                b.comment("O += P V (P from registers, V via ldmatrix.trans)");
                for kk2 in 0..(BC / 16) as usize {
                    let (p0, p1) = (probs[2 * kk2], probs[2 * kk2 + 1]);
                    let a = [
                        b.pack_bf16x2(r(p0[0]), r(p0[1])),
                        b.pack_bf16x2(r(p0[2]), r(p0[3])),
                        b.pack_bf16x2(r(p1[0]), r(p1[1])),
                        b.pack_bf16x2(r(p1[2]), r(p1[3])),
                    ];
                    let vaddr = b.add(Ty::U32, r(vst), imm(kk2 as u32 * 16 * row_bytes));
                    for (dp, vo) in voff.iter().enumerate() {
                        let addr = b.add(Ty::U32, r(vaddr), r(*vo));
                        let f = b.ldmatrix(4, true, r(addr));
                        for h in 0..2usize {
                            let acc = oacc[2 * dp + h];
                            b.raw(Inst::Mma { d: acc, a, b: [f[2 * h], f[2 * h + 1]], c: acc });
                        }
                    }
                }
            };
            b.if_uniform(need, |b| tile_body(b, true));
            b.if_uniform(plain, |b| tile_body(b, false));
            b.bar();
        });

        b.comment("O / l -> bf16 -> o (rows of valid tokens)");
        for (row, (mrow, trow)) in [(ma, ta), (mb, tb)].into_iter().enumerate() {
            let mut l = l_row[row];
            for off in [1u32, 2] {
                let other = b.shfl(ShflMode::Bfly, l, imm(off));
                l = f_bin(b, BinOp::Add, r(l), r(other));
            }
            let inv = b.un(UnOp::Rcp, Ty::F32, r(l));
            let ok = b.setp(Cmp::Lt, Ty::U32, r(trow), r(tn));
            let gh = u_bin(b, BinOp::Rem, r(mrow), imm(g));
            b.if_(ok, |b| {
                let x = u_mad(b, r(bi), r(tn), r(trow));
                let hh = u_mad(b, r(hk), imm(g), r(gh));
                let x = u_mad(b, r(x), imm(hq), r(hh));
                let elem = u_mad(b, r(x), imm(d), r(tq2));
                let addr = b.index(o, elem, 2);
                for (nd, od) in oacc.iter().enumerate() {
                    let lo_v = f_bin(b, BinOp::Mul, r(od[2 * row]), r(inv));
                    let hi_v = f_bin(b, BinOp::Mul, r(od[2 * row + 1]), r(inv));
                    let pk = b.pack_bf16x2(r(lo_v), r(hi_v));
                    b.st(Space::Global, Ty::B32, r(addr), (nd * 16) as i64, r(pk));
                }
            });
        }
    });

    // Serial mode: every read of the caches is behind the last tile's barrier; now write them.
    let tail = b.bin(BinOp::And, Ty::Pred, r(serial), r(first_block));
    b.if_uniform(tail, |b| {
        b.comment("serial mode: cache write after every tile (global k, v -> kcache, vcache)");
        let nrows = s_bin(b, BinOp::Sub, r(count), r(w_first));
        let n = u_bin(b, BinOp::Mul, r(nrows), imm(cpr));
        b.for_(Ty::U32, r(tid), r(n), imm(THREADS), |b, idx| {
            let tr = u_bin(b, BinOp::Div, r(idx), imm(cpr));
            let t = b.add(Ty::U32, r(w_first), r(tr));
            let c = u_bin(b, BinOp::Rem, r(idx), imm(cpr));
            let c8 = u_bin(b, BinOp::Mul, r(c), imm(8));
            let pos = b.add(Ty::U32, r(s), r(t));
            let slot = u_bin(b, BinOp::Rem, r(pos), r(cap));
            let x = u_mad(b, r(bi), r(cap), r(slot));
            let x = u_mad(b, r(x), imm(hkv), r(hk));
            let ci = u_mad(b, r(x), imm(d), r(c8));
            let x = u_mad(b, r(bi), r(tn), r(t));
            let x = u_mad(b, r(x), imm(hkv), r(hk));
            let ni = u_mad(b, r(x), imm(d), r(c8));
            for (cache, new) in [(kc, k), (vc, v)] {
                let src = b.index(new, ni, 2);
                let dst = b.index(cache, ci, 2);
                let x = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, r(src), 0, 4);
                b.st_vec(Space::Global, Ty::B32, r(dst), 0, x.into_iter().map(Operand::Reg).collect());
            }
        });
    });
    b.finish()
}

// ---------------------------------------------------------------------------------------------- kv write

/// `kv_write` (one pair, all tokens) or the prefill cache write (both caches, `lens`).
pub fn kv_write(spec: &KvWriteSpec) -> Result<Generated, CodegenError> {
    let name = spec.name.as_str();
    let d = spec.head_dim;
    if d == 0 || !d.is_multiple_of(8) {
        return shape(name, format!("head_dim {d} must be a multiple of 8"));
    }
    if spec.kv_heads == 0 || spec.pairs.is_empty() {
        return shape(name, "no kv heads or no caches");
    }
    let chunks = spec.kv_heads * d / 8;
    let threads = chunks.div_ceil(32).clamp(1, 4) * 32;
    let mut b = Builder::new(name);
    b.doc(format!(
        "kv_write: {} cache(s) [B, C, {}, {d}] <- new [B, T, {}, {d}] at slot (start[b] + t) mod C{}",
        spec.pairs.len(),
        spec.kv_heads,
        spec.kv_heads,
        if spec.lens.is_some() { ", tokens t < lens[b] only" } else { "" }
    ));
    b.doc(format!(
        "grid [T, B, 1], block {threads}: one token row of {chunks} 16-byte chunks per block; tokens older than the last C are skipped"
    ));
    b.block_size(threads, 1, 1);
    let mut ptrs = Vec::new();
    for (i, _) in spec.pairs.iter().enumerate() {
        let c = b.param_ptr(&format!("cache{i}"));
        let n = b.param_ptr(&format!("new{i}"));
        ptrs.push((c, n));
    }
    let start_p = b.param_ptr("start");
    let lens_p = spec.lens.map(|_| b.param_ptr("lens"));
    let tn = b.param(ParamTy::U32, "tokens");
    let cap = b.param(ParamTy::U32, "capacity");
    let t = b.special(Special::CtaidX);
    let bi = b.special(Special::CtaidY);
    let tid = b.special(Special::TidX);
    let count = match lens_p {
        Some(lp) => {
            let a = b.index(lp, bi, 4);
            b.ld(Space::Global, Ty::U32, Cache::ReadOnly, r(a), 0)
        }
        None => tn,
    };
    let sa = b.index(start_p, bi, 4);
    let s = b.ld(Space::Global, Ty::U32, Cache::ReadOnly, r(sa), 0);
    // Written iff t < count and t + C ≥ count (one of the last C tokens).
    let valid = b.setp(Cmp::Lt, Ty::U32, r(t), r(count));
    let tc = b.add(Ty::U32, r(t), r(cap));
    let recent = b.setp(Cmp::Ge, Ty::U32, r(tc), r(count));
    let go = b.bin(BinOp::And, Ty::Pred, r(valid), r(recent));
    b.if_uniform(go, |b| {
        let pos = b.add(Ty::U32, r(s), r(t));
        let slot = u_bin(b, BinOp::Rem, r(pos), r(cap));
        let crow = u_mad(b, r(bi), r(cap), r(slot));
        let nrow = u_mad(b, r(bi), r(tn), r(t));
        b.for_(Ty::U32, r(tid), imm(chunks), imm(threads), |b, c| {
            for &(cp, np) in &ptrs {
                let ce = u_mad(b, r(crow), imm(chunks), r(c));
                let ne = u_mad(b, r(nrow), imm(chunks), r(c));
                let src = b.index(np, ne, 16);
                let dst = b.index(cp, ce, 16);
                let x = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, r(src), 0, 4);
                b.st_vec(Space::Global, Ty::B32, r(dst), 0, x.into_iter().map(Operand::Reg).collect());
            }
        });
    });
    let mut args = Vec::new();
    for &(c, n) in &spec.pairs {
        args.push(ArgRule::Buffer(c));
        args.push(ArgRule::Buffer(n));
    }
    args.push(ArgRule::Buffer(spec.start));
    if let Some(l) = spec.lens {
        args.push(ArgRule::Buffer(l));
    }
    args.push(ArgRule::Size(spec.tokens.clone()));
    args.push(ArgRule::Size(spec.capacity.clone()));
    Ok(Generated {
        kernel: b.finish(),
        launch: LaunchRule {
            grid: [spec.tokens.clone(), Dim::sym(Sym::B), Dim::constant(1)],
            block: [threads, 1, 1],
            dynamic_shared: 0,
            args,
        },
    })
}

// ---------------------------------------------------------------------------------------------- decode

/// The decode work split of one kv head: heads per block (`Gc`), head chunks (`HC`), lanes per key
/// (`L`) and keys per key group and step (`U`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeTiling {
    pub group: u32,
    pub heads_per_block: u32,
    pub head_chunks: u32,
    pub lanes_per_key: u32,
    pub unroll: u32,
    /// The grid's split count `P`.
    pub splits: u32,
}

/// The decode tiling for a spec (see the module docs).
pub fn decode_tiling(spec: &DecodeSpec) -> Result<DecodeTiling, CodegenError> {
    let name = spec.name.as_str();
    let g = check_heads(name, spec.q_heads, spec.kv_heads)?;
    let d = spec.head_dim;
    if d == 0 || !d.is_multiple_of(8) || d > 256 {
        return shape(name, format!("head_dim {d} must be a multiple of 8 and at most 256"));
    }
    if spec.min_chunk == 0 {
        return shape(name, "min_chunk must be positive");
    }
    let gc = (1..=g.min(8)).rev().find(|c| g.is_multiple_of(*c)).unwrap_or(1);
    let hc = g / gc;
    let splits = match spec.max_splits {
        Some(p) if p >= 1 => p,
        Some(_) => return shape(name, "max_splits must be positive"),
        None => TARGET_BLOCKS.div_ceil(spec.kv_heads * hc).clamp(1, MAX_SPLITS),
    };
    Ok(DecodeTiling {
        group: g,
        heads_per_block: gc,
        head_chunks: hc,
        lanes_per_key: (d / 8).next_power_of_two(),
        unroll: if gc > 4 { 2 } else { 4 },
        splits,
    })
}

/// Bytes of the decode workspaces `(part_o, part_lse)` as functions of B.
pub fn decode_workspace(spec: &DecodeSpec) -> Result<(Dim, Dim), CodegenError> {
    let t = decode_tiling(spec)?;
    let rows = i64::from(spec.q_heads) * i64::from(t.splits);
    let b = Dim::sym(Sym::B);
    Ok((b.scale(rows * i64::from(spec.head_dim) * 4), b.scale(rows * 4)))
}

/// The number of splits sequence with `n ≥ 1` visible positions uses in a batch of `batch` (the
/// rule the kernels evaluate on the device).
pub fn decode_nsplit(t: &DecodeTiling, kv_heads: u32, min_chunk: u32, batch: u32, n: u32) -> u32 {
    let p_eff = t.splits.min(TARGET_BLOCKS.div_ceil((batch * kv_heads * t.head_chunks).max(1))).max(1);
    let ns = p_eff.min(n.div_ceil(min_chunk)).max(1);
    let chunk = n.div_ceil(ns);
    n.div_ceil(chunk)
}

/// Emits the split rule: `(lo, n, chunk, nsplit)` for position `p` of a sequence (s32 `p`), with
/// `batch` the number of sequences (u32).
fn emit_split(
    b: &mut Builder,
    t: &DecodeTiling,
    spec: &DecodeSpec,
    window: Option<i64>,
    p: Reg,
    batch: Reg,
) -> (Reg, Reg, Reg, Reg) {
    let lo = match window {
        Some(w) => {
            let x = s_bin(b, BinOp::Add, r(p), simm(1 - w));
            s_bin(b, BinOp::Max, r(x), simm(0))
        }
        None => b.mov(Ty::S32, simm(0)),
    };
    let n = s_bin(b, BinOp::Sub, r(p), r(lo));
    let n = b.add(Ty::U32, r(n), imm(1));
    let den = u_bin(b, BinOp::Mul, r(batch), imm(spec.kv_heads * t.head_chunks));
    let num = b.add(Ty::U32, r(den), imm(TARGET_BLOCKS - 1));
    let want = u_bin(b, BinOp::Div, r(num), r(den));
    let want = u_bin(b, BinOp::Max, r(want), imm(1));
    let p_eff = u_bin(b, BinOp::Min, r(want), imm(t.splits));
    let by_len = b.add(Ty::U32, r(n), imm(spec.min_chunk - 1));
    let by_len = u_bin(b, BinOp::Div, r(by_len), imm(spec.min_chunk));
    let ns = u_bin(b, BinOp::Min, r(p_eff), r(by_len));
    let ns = u_bin(b, BinOp::Max, r(ns), imm(1));
    let chunk = b.add(Ty::U32, r(n), r(ns));
    let chunk = b.add(Ty::U32, r(chunk), simm(-1));
    let chunk = u_bin(b, BinOp::Div, r(chunk), r(ns));
    let nsplit = b.add(Ty::U32, r(n), r(chunk));
    let nsplit = b.add(Ty::U32, r(nsplit), simm(-1));
    let nsplit = u_bin(b, BinOp::Div, r(nsplit), r(chunk));
    (lo, n, chunk, nsplit)
}

/// `attention_decode`: the split-KV kernel and the combine kernel, in launch order.
pub fn attention_decode(spec: &DecodeSpec) -> Result<Vec<Generated>, CodegenError> {
    let name = spec.name.as_str();
    let t = decode_tiling(spec)?;
    let window = check_window(name, spec.window)?;
    if !(spec.scale > 0.0 && spec.scale.is_finite()) {
        return shape(name, format!("scale {} must be positive", spec.scale));
    }
    let o = &spec.operands;
    let split = Generated {
        kernel: decode_kernel(spec, &t, window),
        launch: LaunchRule {
            grid: [
                Dim::constant(i64::from(t.splits)),
                Dim::constant(i64::from(spec.kv_heads * t.head_chunks)),
                Dim::sym(Sym::B),
            ],
            block: [THREADS, 1, 1],
            dynamic_shared: 0,
            args: vec![
                ArgRule::Buffer(o.q),
                ArgRule::Buffer(o.kcache),
                ArgRule::Buffer(o.vcache),
                ArgRule::Buffer(o.start),
                ArgRule::Buffer(o.part_o),
                ArgRule::Buffer(o.part_lse),
                ArgRule::Size(Dim::sym(Sym::B)),
                ArgRule::Size(spec.capacity.clone()),
            ],
        },
    };
    let cpr = spec.head_dim / 8;
    let rpb = (THREADS / cpr).max(1);
    let combine = Generated {
        kernel: combine_kernel(spec, &t, window),
        launch: LaunchRule {
            grid: [Dim::constant(i64::from(spec.q_heads.div_ceil(rpb))), Dim::sym(Sym::B), Dim::constant(1)],
            block: [THREADS, 1, 1],
            dynamic_shared: 0,
            args: vec![
                ArgRule::Buffer(o.part_o),
                ArgRule::Buffer(o.part_lse),
                ArgRule::Buffer(o.start),
                ArgRule::Buffer(o.o),
                ArgRule::Size(Dim::sym(Sym::B)),
            ],
        },
    };
    Ok(vec![split, combine])
}

fn decode_kernel(spec: &DecodeSpec, t: &DecodeTiling, window: Option<i64>) -> Kernel {
    let d = spec.head_dim;
    let (hq, hkv) = (spec.q_heads, spec.kv_heads);
    let cpr = d / 8;
    let lanes = t.lanes_per_key;
    let gc = t.heads_per_block as usize;
    let u_n = t.unroll;
    let kg_warp = 32 / lanes;
    let nkg = 4 * kg_warp;
    let c_log2 = (spec.scale * LOG2_E) as f32;
    let p_grid = t.splits;

    let mut b = Builder::new(&spec.name);
    b.doc(format!(
        "attention_decode (split-KV): Hq {hq}, Hkv {hkv}, head_dim {d}, window {:?}, scale {}; {} heads per block ({} head chunks)",
        spec.window, spec.scale, gc, t.head_chunks
    ));
    b.doc(format!(
        "grid [{p_grid}, Hkv*{}, B], block 128: {lanes} lanes per key (one 16-byte chunk each), {nkg} keys per step x {u_n} unrolled; \
         K/V loads shared by the block's heads",
        t.head_chunks
    ));
    b.doc(format!(
        "split rule: P_eff = min({p_grid}, ceil({TARGET_BLOCKS} / (B*{}))), nsplit = min(P_eff, ceil(n / {})), chunk = ceil(n / nsplit)",
        hkv * t.head_chunks,
        spec.min_chunk
    ));
    b.doc("writes the normalised partial O_s (f32 [B, Hq, P, d]) and LSE_s = m + log2(l) (f32 [B, Hq, P]); <name>_combine merges");
    b.doc("params: q, kcache, vcache, start, part_o, part_lse, batch, capacity");
    b.block_size(THREADS, 1, 1);

    let q = b.param_ptr("q");
    let kc = b.param_ptr("kcache");
    let vc = b.param_ptr("vcache");
    let start_p = b.param_ptr("start");
    let po = b.param_ptr("part_o");
    let pl = b.param_ptr("part_lse");
    let batch = b.param(ParamTy::U32, "batch");
    let cap = b.param(ParamTy::U32, "capacity");
    let red_ml = b.shared("red_ml", 4 * gc as u32 * 2 * 4, 16);
    let red_acc = b.shared("red_acc", 4 * gc as u32 * d * 4, 16);

    let tid = b.special(Special::TidX);
    let warp = b.special(Special::WarpInBlock);
    let lane = b.special(Special::LaneId);
    let split = b.special(Special::CtaidX);
    let y = b.special(Special::CtaidY);
    let bi = b.special(Special::CtaidZ);
    let hk = u_bin(&mut b, BinOp::Div, r(y), imm(t.head_chunks));
    let hc = u_bin(&mut b, BinOp::Rem, r(y), imm(t.head_chunks));
    let sa = b.index(start_p, bi, 4);
    let p = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, r(sa), 0);
    let (lo, _n, chunk, nsplit) = emit_split(&mut b, t, spec, window, p, batch);
    let live = b.setp(Cmp::Lt, Ty::U32, r(split), r(nsplit));

    b.if_uniform(live, |b| {
        let c_lo = u_mad(b, r(split), r(chunk), r(lo));
        let c_end = b.add(Ty::U32, r(c_lo), r(chunk));
        let p1 = b.add(Ty::U32, r(p), imm(1));
        let c_end = u_bin(b, BinOp::Min, r(c_end), r(p1));
        let c_last = b.add(Ty::U32, r(c_end), simm(-1));
        // Lane roles.
        let c = u_bin(b, BinOp::Rem, r(lane), imm(lanes));
        let kg = u_bin(b, BinOp::Div, r(lane), imm(lanes));
        let kgi = u_mad(b, r(warp), imm(kg_warp), r(kg));
        let c_ok = b.setp(Cmp::Lt, Ty::U32, r(c), imm(cpr));
        let cc = u_bin(b, BinOp::Min, r(c), imm(cpr - 1));
        // q of the block's heads, pre-scaled by scale·log2(e) (zero on padding lanes).
        let hbase = {
            let x = u_bin(b, BinOp::Mul, r(hk), imm(t.group));
            u_mad(b, r(hc), imm(t.heads_per_block), r(x))
        };
        let mut qv: Vec<[Reg; 8]> = Vec::new();
        for gi in 0..gc {
            let h = b.add(Ty::U32, r(hbase), imm(gi as u32));
            let row = u_mad(b, r(bi), imm(hq), r(h));
            let e = u_mad(b, r(row), imm(cpr), r(cc));
            let a = b.index(q, e, 16);
            let w = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, r(a), 0, 4);
            let mut f = [Reg(0); 8];
            for (i, wi) in w.iter().enumerate() {
                let (x0, x1) = bf16x2_to_f32(b, *wi);
                for (j, x) in [x0, x1].into_iter().enumerate() {
                    let sc = f_bin(b, BinOp::Mul, r(x), Operand::F32(c_log2));
                    f[2 * i + j] = b.selp(Ty::F32, r(sc), Operand::F32(0.0), c_ok);
                }
            }
            qv.push(f);
        }
        // Online-softmax state of this key group.
        let m: Vec<Reg> = (0..gc).map(|_| b.mov(Ty::F32, Operand::F32(NEG_INF))).collect();
        let l: Vec<Reg> = (0..gc).map(|_| b.mov(Ty::F32, Operand::F32(0.0))).collect();
        let acc: Vec<[Reg; 8]> = (0..gc)
            .map(|_| {
                let mut a = [Reg(0); 8];
                for x in a.iter_mut() {
                    *x = b.mov(Ty::F32, Operand::F32(0.0));
                }
                a
            })
            .collect();
        let kvrow = u_mad(b, r(bi), r(cap), imm(0));
        let step = nkg * u_n;
        b.comment("stream the chunk's keys: each key group takes keys base + u*NKG + kgi");
        b.for_uniform(Ty::U32, r(c_lo), r(c_end), imm(step), |b, base| {
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            let mut oks = Vec::new();
            for u in 0..u_n {
                let j = u_mad(b, imm(u), imm(nkg), r(kgi));
                let j = b.add(Ty::U32, r(base), r(j));
                let ok = b.setp(Cmp::Lt, Ty::U32, r(j), r(c_end));
                let jc = u_bin(b, BinOp::Min, r(j), r(c_last));
                let slot = u_bin(b, BinOp::Rem, r(jc), r(cap));
                let x = b.add(Ty::U32, r(kvrow), r(slot));
                let x = u_mad(b, r(x), imm(hkv), r(hk));
                let e = u_mad(b, r(x), imm(cpr), r(cc));
                let ka = b.index(kc, e, 16);
                let va = b.index(vc, e, 16);
                ks.push(b.ld_vec(Space::Global, Ty::B32, Cache::Stream, r(ka), 0, 4));
                vs.push(b.ld_vec(Space::Global, Ty::B32, Cache::Stream, r(va), 0, 4));
                oks.push(ok);
            }
            // Scores of every (key, head).
            let mut sc: Vec<Vec<Reg>> = Vec::new();
            for u in 0..u_n as usize {
                let kf: Vec<(Reg, Reg)> = ks[u].iter().map(|w| bf16x2_to_f32(b, *w)).collect();
                let mut row = Vec::new();
                for qg in qv.iter() {
                    let mut dot = f_bin(b, BinOp::Mul, r(qg[0]), r(kf[0].0));
                    for (i, (x0, x1)) in kf.iter().enumerate() {
                        if i > 0 {
                            dot = b.mad(Ty::F32, r(qg[2 * i]), r(*x0), r(dot));
                        }
                        dot = b.mad(Ty::F32, r(qg[2 * i + 1]), r(*x1), r(dot));
                    }
                    let mut off = 1;
                    while off < lanes {
                        let o2 = b.shfl(ShflMode::Bfly, dot, imm(off));
                        dot = f_bin(b, BinOp::Add, r(dot), r(o2));
                        off *= 2;
                    }
                    row.push(b.selp(Ty::F32, r(dot), Operand::F32(NEG_INF), oks[u]));
                }
                sc.push(row);
            }
            let vf: Vec<Vec<Reg>> = vs
                .iter()
                .map(|w| {
                    let mut out = Vec::new();
                    for x in w {
                        let (a0, a1) = bf16x2_to_f32(b, *x);
                        out.push(a0);
                        out.push(a1);
                    }
                    out
                })
                .collect();
            for gi in 0..gc {
                let mut mx = sc[0][gi];
                for row in sc.iter().skip(1) {
                    mx = f_bin(b, BinOp::Max, r(mx), r(row[gi]));
                }
                let m_new = f_bin(b, BinOp::Max, r(m[gi]), r(mx));
                let m_use = finite_ref(b, m_new);
                let dm = f_bin(b, BinOp::Sub, r(m[gi]), r(m_use));
                let alpha = ex2(b, r(dm));
                let ps: Vec<Reg> = sc
                    .iter()
                    .map(|row| {
                        let x = f_bin(b, BinOp::Sub, r(row[gi]), r(m_use));
                        ex2(b, r(x))
                    })
                    .collect();
                let mut sum = ps[0];
                for pv in ps.iter().skip(1) {
                    sum = f_bin(b, BinOp::Add, r(sum), r(*pv));
                }
                let ln = b.mad(Ty::F32, r(l[gi]), r(alpha), r(sum));
                b.assign(l[gi], r(ln));
                b.assign(m[gi], r(m_new));
                for e in 0..8 {
                    b.bin_into(BinOp::Mul, acc[gi][e], r(alpha));
                    for (u, pv) in ps.iter().enumerate() {
                        b.mad_into(acc[gi][e], r(*pv), r(vf[u][e]));
                    }
                }
            }
        });

        b.comment("merge the key groups of a warp (shuffles)");
        let merge = |b: &mut Builder, m: Reg, l: Reg, acc: &[Reg], mo: Reg, lo_: Reg, acco: &[Reg]| {
            let m_new = f_bin(b, BinOp::Max, r(m), r(mo));
            let m_use = finite_ref(b, m_new);
            let d1 = f_bin(b, BinOp::Sub, r(m), r(m_use));
            let a1 = ex2(b, r(d1));
            let d2 = f_bin(b, BinOp::Sub, r(mo), r(m_use));
            let a2 = ex2(b, r(d2));
            let l1 = f_bin(b, BinOp::Mul, r(l), r(a1));
            let ln = b.mad(Ty::F32, r(lo_), r(a2), r(l1));
            b.assign(l, r(ln));
            b.assign(m, r(m_new));
            for (x, xo) in acc.iter().zip(acco) {
                let y = f_bin(b, BinOp::Mul, r(*x), r(a1));
                let y = b.mad(Ty::F32, r(*xo), r(a2), r(y));
                b.assign(*x, r(y));
            }
        };
        let mut off = lanes;
        while off < 32 {
            for gi in 0..gc {
                let mo = b.shfl(ShflMode::Bfly, m[gi], imm(off));
                let lo_ = b.shfl(ShflMode::Bfly, l[gi], imm(off));
                let acco: Vec<Reg> = acc[gi].iter().map(|x| b.shfl(ShflMode::Bfly, *x, imm(off))).collect();
                merge(b, m[gi], l[gi], &acc[gi], mo, lo_, &acco);
            }
            off *= 2;
        }
        b.comment("key group 0 of each warp -> shared; merge the 4 warps");
        let lead = b.setp(Cmp::Lt, Ty::U32, r(lane), imm(lanes));
        let wr = b.bin(BinOp::And, Ty::Pred, r(lead), r(c_ok));
        let ml_base = b.shared_addr(red_ml);
        let acc_base = b.shared_addr(red_acc);
        b.if_(wr, |b| {
            let first = b.setp(Cmp::Eq, Ty::U32, r(c), imm(0));
            for gi in 0..gc {
                let slot = u_mad(b, r(warp), imm(gc as u32), imm(gi as u32));
                let a = u_mad(b, r(slot), imm(8), r(ml_base));
                b.if_(first, |b| {
                    b.st_vec(Space::Shared, Ty::F32, r(a), 0, vec![r(m[gi]), r(l[gi])]);
                });
                let e = u_mad(b, r(slot), imm(d), imm(0));
                let e = u_mad(b, r(c), imm(8), r(e));
                let aa = u_mad(b, r(e), imm(4), r(acc_base));
                b.st_vec(Space::Shared, Ty::F32, r(aa), 0, acc[gi][..4].iter().map(|x| r(*x)).collect());
                b.st_vec(Space::Shared, Ty::F32, r(aa), 16, acc[gi][4..].iter().map(|x| r(*x)).collect());
            }
        });
        b.bar();
        let fin = b.setp(Cmp::Lt, Ty::U32, r(tid), imm(gc as u32 * cpr));
        b.if_(fin, |b| {
            let gi = u_bin(b, BinOp::Div, r(tid), imm(cpr));
            let cf = u_bin(b, BinOp::Rem, r(tid), imm(cpr));
            let mm = b.mov(Ty::F32, Operand::F32(NEG_INF));
            let ll = b.mov(Ty::F32, Operand::F32(0.0));
            let aa: Vec<Reg> = (0..8).map(|_| b.mov(Ty::F32, Operand::F32(0.0))).collect();
            for w in 0..4u32 {
                let slot = b.add(Ty::U32, r(gi), imm(w * gc as u32));
                let a = u_mad(b, r(slot), imm(8), r(ml_base));
                let ml = b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(a), 0, 2);
                let e = u_mad(b, r(slot), imm(d), imm(0));
                let e = u_mad(b, r(cf), imm(8), r(e));
                let ea = u_mad(b, r(e), imm(4), r(acc_base));
                let mut xo = b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(ea), 0, 4);
                xo.extend(b.ld_vec(Space::Shared, Ty::F32, Cache::None, r(ea), 16, 4));
                merge(b, mm, ll, &aa, ml[0], ml[1], &xo);
            }
            let inv = b.un(UnOp::Rcp, Ty::F32, r(ll));
            let h = b.add(Ty::U32, r(hbase), r(gi));
            let row = u_mad(b, r(bi), imm(hq), r(h));
            let prow = u_mad(b, r(row), imm(p_grid), r(split));
            let e = u_mad(b, r(prow), imm(cpr), r(cf));
            let oa = b.index(po, e, 32);
            let outs: Vec<Reg> = aa.iter().map(|x| f_bin(b, BinOp::Mul, r(*x), r(inv))).collect();
            b.st_vec(Space::Global, Ty::F32, r(oa), 0, outs[..4].iter().map(|x| r(*x)).collect());
            b.st_vec(Space::Global, Ty::F32, r(oa), 16, outs[4..].iter().map(|x| r(*x)).collect());
            let first = b.setp(Cmp::Eq, Ty::U32, r(cf), imm(0));
            b.if_(first, |b| {
                let lg = b.un(UnOp::Lg2Approx, Ty::F32, r(ll));
                let lse = f_bin(b, BinOp::Add, r(mm), r(lg));
                let la = b.index(pl, prow, 4);
                b.st(Space::Global, Ty::F32, r(la), 0, r(lse));
            });
        });
    });
    b.finish()
}

fn combine_kernel(spec: &DecodeSpec, t: &DecodeTiling, window: Option<i64>) -> Kernel {
    let d = spec.head_dim;
    let hq = spec.q_heads;
    let cpr = d / 8;
    let rpb = (THREADS / cpr).max(1);
    let p_grid = t.splits;
    let mut b = Builder::new(format!("{}_combine", spec.name));
    b.doc(format!(
        "attention_decode combine: O = sum_s 2^(LSE_s - M) O_s / sum_s 2^(LSE_s - M) over the used splits (at most {p_grid}); Hq {hq}, head_dim {d}"
    ));
    b.doc(format!(
        "grid [ceil(Hq / {rpb}), B, 1], block 128: {rpb} rows per block, one 16-byte output chunk per thread"
    ));
    b.doc("params: part_o, part_lse, start, o, batch");
    b.block_size(THREADS, 1, 1);
    let po = b.param_ptr("part_o");
    let pl = b.param_ptr("part_lse");
    let start_p = b.param_ptr("start");
    let o = b.param_ptr("o");
    let batch = b.param(ParamTy::U32, "batch");
    let tid = b.special(Special::TidX);
    let bx = b.special(Special::CtaidX);
    let bi = b.special(Special::CtaidY);
    let rr = u_bin(&mut b, BinOp::Div, r(tid), imm(cpr));
    let c = u_bin(&mut b, BinOp::Rem, r(tid), imm(cpr));
    let h = u_mad(&mut b, r(bx), imm(rpb), r(rr));
    let ok_r = b.setp(Cmp::Lt, Ty::U32, r(rr), imm(rpb));
    let ok_h = b.setp(Cmp::Lt, Ty::U32, r(h), imm(hq));
    let ok = b.bin(BinOp::And, Ty::Pred, r(ok_r), r(ok_h));
    b.if_(ok, |b| {
        let sa = b.index(start_p, bi, 4);
        let p = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, r(sa), 0);
        let (_lo, _n, _chunk, nsplit) = emit_split(b, t, spec, window, p, batch);
        let row = u_mad(b, r(bi), imm(hq), r(h));
        let prow0 = u_bin(b, BinOp::Mul, r(row), imm(p_grid));
        let mx = b.mov(Ty::F32, Operand::F32(NEG_INF));
        b.for_(Ty::U32, imm(0), r(nsplit), imm(1), |b, s| {
            let pr = b.add(Ty::U32, r(prow0), r(s));
            let la = b.index(pl, pr, 4);
            let x = b.ld(Space::Global, Ty::F32, Cache::None, r(la), 0);
            b.bin_into(BinOp::Max, mx, r(x));
        });
        let den = b.mov(Ty::F32, Operand::F32(0.0));
        let acc: Vec<Reg> = (0..8).map(|_| b.mov(Ty::F32, Operand::F32(0.0))).collect();
        b.for_(Ty::U32, imm(0), r(nsplit), imm(1), |b, s| {
            let pr = b.add(Ty::U32, r(prow0), r(s));
            let la = b.index(pl, pr, 4);
            let x = b.ld(Space::Global, Ty::F32, Cache::None, r(la), 0);
            let dx = f_bin(b, BinOp::Sub, r(x), r(mx));
            let w = ex2(b, r(dx));
            b.bin_into(BinOp::Add, den, r(w));
            let e = u_mad(b, r(pr), imm(cpr), r(c));
            let oa = b.index(po, e, 32);
            let mut v = b.ld_vec(Space::Global, Ty::F32, Cache::None, r(oa), 0, 4);
            v.extend(b.ld_vec(Space::Global, Ty::F32, Cache::None, r(oa), 16, 4));
            for (a, x) in acc.iter().zip(&v) {
                b.mad_into(*a, r(w), r(*x));
            }
        });
        let inv = b.un(UnOp::Rcp, Ty::F32, r(den));
        let packed: Vec<Operand> = (0..4)
            .map(|i| {
                let x0 = f_bin(b, BinOp::Mul, r(acc[2 * i]), r(inv));
                let x1 = f_bin(b, BinOp::Mul, r(acc[2 * i + 1]), r(inv));
                r(b.pack_bf16x2(r(x0), r(x1)))
            })
            .collect();
        let e = u_mad(b, r(row), imm(cpr), r(c));
        let oa = b.index(o, e, 16);
        b.st_vec(Space::Global, Ty::B32, r(oa), 0, packed);
    });
    b.finish()
}

// ---------------------------------------------------------------------------------------------- cost

/// FLOPs and bytes of one launch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Useful FLOPs (`4·d` per visible (query, key) pair).
    pub flops: f64,
    /// Tensor-core or CUDA-core FLOPs the kernels execute (padding and masked elements included).
    pub executed_flops: f64,
    /// Bytes the kernels move to and from global memory (each block's reads counted).
    pub bytes: f64,
    /// The minimum bytes: every input read once, every output written once.
    pub min_bytes: f64,
}

fn visible(p: u64, window: Option<u64>) -> u64 {
    window.map_or(p + 1, |w| (p + 1).min(w))
}

/// The cost of a prefill of `tokens` new tokens (`lens[b]` valid) after `start[b]` cached ones.
pub fn prefill_cost(spec: &PrefillSpec, tokens: u64, start: &[u64], lens: &[u64]) -> Cost {
    let d = u64::from(spec.head_dim);
    let (hq, hkv) = (u64::from(spec.q_heads), u64::from(spec.kv_heads));
    let g = hq / hkv.max(1);
    let mut c = Cost::default();
    for (bi, &s) in start.iter().enumerate() {
        let pairs: u64 = (0..tokens).map(|t| visible(s + t, spec.window)).sum();
        c.flops += (4 * d * hq * pairs) as f64;
        let prefix = (0..s).filter(|&j| j + spec.window.unwrap_or(u64::MAX) > s).count() as u64;
        let lens_b = lens.get(bi).copied().unwrap_or(tokens);
        let written = lens_b.min(spec.capacity.as_const().map_or(u64::MAX, |x| x as u64));
        // The cache write stores the new rows once (they are read once, as keys).
        c.min_bytes += (2 * 2 * tokens * hq * d + 2 * 2 * tokens * hkv * d + 2 * 2 * prefix * hkv * d) as f64
            + (2 * 2 * written * hkv * d) as f64;
        // Executed: per (tile, kv head) block the key tiles it streams.
        let tiles = (tokens * g).div_ceil(u64::from(BR));
        let mut kv_tiles = 0;
        for ti in 0..tiles {
            let t_lo = ti * u64::from(BR) / g;
            let t_hi = ((ti + 1) * u64::from(BR) - 1).min(tokens * g - 1) / g;
            let hi = s + t_hi;
            let lo = spec.window.map_or(0, |w| (s + t_lo + 1).saturating_sub(w));
            kv_tiles += (hi - lo + 1).div_ceil(u64::from(BC));
        }
        c.executed_flops += (kv_tiles * hkv * 4 * u64::from(BR * BC) * d) as f64;
        c.bytes += (kv_tiles * hkv * 2 * u64::from(BC) * d * 2) as f64
            + (2 * 2 * tokens * hq * d) as f64
            + (2 * 2 * written * hkv * d) as f64;
    }
    c
}

/// The cost of one decode step over sequences at positions `start[b]`, with `nsplit` as the
/// kernels choose it.
pub fn decode_cost(spec: &DecodeSpec, start: &[u64]) -> Cost {
    let d = spec.head_dim as f64;
    let (hq, hkv) = (f64::from(spec.q_heads), f64::from(spec.kv_heads));
    let mut c = Cost::default();
    let Ok(t) = decode_tiling(spec) else { return c };
    for &p in start {
        let n = visible(p, spec.window);
        let ns = decode_nsplit(&t, spec.kv_heads, spec.min_chunk, start.len() as u32, n as u32) as f64;
        let n = n as f64;
        c.flops += 4.0 * d * hq * n;
        c.executed_flops += 4.0 * d * hq * n;
        let kv = 2.0 * 2.0 * hkv * d * n;
        let qo = 2.0 * 2.0 * hq * d;
        c.min_bytes += kv + qo;
        c.bytes += kv + qo + 2.0 * 4.0 * hq * ns * (d + 1.0);
    }
    c
}
