//! heads: the per-head tail of a fused projection whose product row is split into parts — the
//! attention QKV projection (`split` → `reshape` to heads → optional per-head `rmsnorm` (qk-norm) →
//! `rope`, V as a plain column slice) and the Mamba2 / DeltaNet input projections (parts that go
//! through elementwise ops: `sigmoid`, `softplus(· + bias)`, `· scale`, ...). The product itself is
//! computed first by `gemv` / `gemm` into a buffer; this kernel reads it and writes every part.
//!
//! # Work split
//!
//! * **`ways` blocks per product row** (128 threads = 4 warps each; grid x = rows, looped grid-stride,
//!   grid y = `ways` = ⌈heads of all head parts / 4⌉, at least 1), so that in decode (a few rows) every
//!   head still gets its own warp. Row `r` of the product `P[rows, N]` is token `r % T` of sequence
//!   `r / T`.
//! * **Head parts**: a warp owns one head of `head_dim` at a time: the heads of all head parts, in
//!   order, are dealt round-robin to the row's `4·ways` warps. Lane `l` owns the rotation pairs
//!   `i = l + 32·e` (`e < ⌈head_dim / 64⌉`,
//!   pairs past `head_dim / 2` are masked): elements `(i, i + head_dim/2)` for `rotate_half`,
//!   `(2i, 2i + 1)` for `interleaved` (the same pairing without a rope). Each element of the head is
//!   read once from P; the per-head RMSNorm's sum of squares is a butterfly of warp shuffles (every
//!   lane gets it), so no shared memory or barrier is involved per head.
//! * **Column parts** (elementwise chains, or a plain copy such as V): the row's `128·ways` threads
//!   stride over the part's columns, one element each, and apply the chain.
//!
//! # Numerics
//!
//! bf16 or f32 storage, f32 math; intermediate values stay f32 (only an explicit `convert` to bf16
//! rounds), outputs round to nearest even. RMSNorm: `x · rstd · w`, `rstd = 1 / √(Σx² · (1/d) + eps)`
//! with exact `sqrt.rn` / `rcp.rn` (`gemm::rstd`, the cpu kernel's order of the products). RoPE
//! follows the cpu reference: the inverse frequencies `theta^(−2i/d)` are computed on the host in
//! f64, rounded to f32 and written into a shared table by thread 0 at kernel start (one barrier); the
//! angle is the f32 product `(start[b] + t) · inv_freq[i]`, its sine and cosine come from
//! `gemm::sincos` (Cody–Waite reduction and Cephes polynomials, ~1 ulp; the reduction is exact for
//! angles below 2¹⁶·π/2 ≈ 10⁵, so positions must stay below that). Elementwise ops use the
//! `elementwise` helpers (the fused elementwise kernel's formulas).
//!
//! # Assumptions
//!
//! `N` (the product width), the parts' bounds and widths, `head_dim` (even, ≤ 1024) are constants;
//! `rows` and `T` may be symbolic; indices are u32. A head part's width is a multiple of `head_dim`.
//! Parts may overlap or leave columns unread (unused parts are simply not listed).
//!
//! # Parameters (in order)
//!
//! `product`, `[start]`, then per part its `out`, its norm weight and its chain's vectors (in part
//! order), then the sizes `rows` and (with `start`) `T`, each when symbolic.

use flashc_compiler::gir::{DType, Dim, RopeStyle};
use flashc_compiler::schedule::BufferId;

use super::elementwise::{self, Args, Elem, blocks, coords, declare_block, load, round_bf16, store, udiv, urem};
use super::gemm::{rstd, sincos};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Operand, Reg, Space, Special, Ty, UnOp};

/// Threads per block.
pub const THREADS: u32 = 128;
const WARPS: u32 = THREADS / 32;
/// Largest head a warp handles (16 pair slots per lane).
pub const MAX_HEAD_DIM: u32 = 1024;

/// A tail to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct TailSpec {
    pub name: String,
    /// Rows of the product (B·T).
    pub rows: Dim,
    /// Tokens per sequence: row `r` is token `r % T` of sequence `r / T` (only read by rope).
    pub tokens: Dim,
    /// Width `N` of a product row.
    pub width: u32,
    /// Storage of the product.
    pub dtype: DType,
    pub product: BufferId,
    /// `i32 start[B]`, when a part is rotated.
    pub start: Option<BufferId>,
    pub parts: Vec<TailPart>,
}

/// One result of the tail: columns `[lo, lo + width)` of every product row, written contiguously
/// (`out[r, c]` at `r · width + c`).
#[derive(Clone, Debug, PartialEq)]
pub struct TailPart {
    pub lo: u32,
    pub width: u32,
    pub out: BufferId,
    pub out_dtype: DType,
    pub kind: PartKind,
}

/// What happens to a part.
#[derive(Clone, Debug, PartialEq)]
pub enum PartKind {
    /// An elementwise chain applied to every column, in order (empty: a copy).
    Columns(Vec<ColumnOp>),
    /// Heads of `head_dim`: an optional RMSNorm (weight `[head_dim]`), then an optional RoPE.
    Heads { head_dim: u32, norm: Option<HeadNorm>, rope: Option<Rope> },
}

/// The per-head RMSNorm of a head part.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadNorm {
    pub weight: BufferId,
    pub dtype: DType,
    pub eps: f32,
}

/// The rotary embedding of a head part (positions `start[b] + t`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    pub theta: f64,
}

/// One elementwise op of a column part (f32 math).
#[derive(Clone, Debug, PartialEq)]
pub enum ColumnOp {
    Sigmoid,
    Softplus,
    Silu,
    Exp,
    Neg,
    Relu2,
    Scale(f32),
    /// Round to bf16 (an explicit `convert`).
    RoundBf16,
    /// `x + v[c]` (`v` of the part's width) or `x + v[0]` (`broadcast`).
    Add(Vector),
    /// `x · v[c]` or `x · v[0]`.
    Mul(Vector),
}

/// A vector operand of a column op.
#[derive(Clone, Debug, PartialEq)]
pub struct Vector {
    pub buf: BufferId,
    pub dtype: DType,
    pub broadcast: bool,
}

/// The inverse frequencies of the cpu reference (`theta^(−2i/d)` in f64, rounded to f32).
pub fn inv_freq(head_dim: u32, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| theta.powf(-2.0 * f64::from(i) / f64::from(head_dim)) as f32).collect()
}

/// Generates the tail kernel (see the module doc).
pub fn tail(spec: &TailSpec) -> Result<Generated, CodegenError> {
    let shape = |s: String| CodegenError::Shape(format!("{}: {s}", spec.name));
    let pe = Elem::of(spec.dtype, "the product")?;
    for p in &spec.parts {
        if p.lo.checked_add(p.width).is_none_or(|hi| hi > spec.width) {
            return Err(shape(format!("part [{}, +{}) past the product width {}", p.lo, p.width, spec.width)));
        }
        if let PartKind::Heads { head_dim, rope, .. } = &p.kind {
            if *head_dim == 0 || head_dim % 2 != 0 || *head_dim > MAX_HEAD_DIM || p.width % head_dim != 0 {
                return Err(shape(format!("head_dim {head_dim} for a part of width {}", p.width)));
            }
            if rope.is_some() && spec.start.is_none() {
                return Err(shape("a rotated part without start positions".into()));
            }
        }
    }

    let total_heads: u32 = spec
        .parts
        .iter()
        .map(|p| match &p.kind {
            PartKind::Heads { head_dim, .. } => p.width / head_dim,
            PartKind::Columns(_) => 0,
        })
        .sum();
    let ways = total_heads.div_ceil(WARPS).max(1);
    let (all_warps, all_threads) = (ways * WARPS, ways * THREADS);

    let mut b = Builder::new(&spec.name);
    declare_block(&mut b, THREADS);
    b.doc(format!(
        "split-product tail: {} part(s) of a {}-wide {} product row",
        spec.parts.len(),
        spec.width,
        pe.name()
    ));
    b.doc(format!("{ways} block(s) of {THREADS} threads per row; a warp per head, a thread per column"));
    let mut args = Args::default();
    let product = args.ptr(&mut b, "product", spec.product.0);
    let start = spec.start.map(|s| args.ptr(&mut b, "start", s.0));
    // Per part: its output (pointer, storage), its norm weight and its chain's vectors.
    struct PartRegs {
        out: Reg,
        oe: Elem,
        norm: Option<(Reg, Elem, f32)>,
        vectors: Vec<(Reg, Elem)>,
    }
    let mut regs = Vec::new();
    for (k, p) in spec.parts.iter().enumerate() {
        let out = args.ptr(&mut b, &format!("out{k}"), p.out.0);
        let oe = Elem::of(p.out_dtype, "a tail result")?;
        let mut norm = None;
        let mut vectors = Vec::new();
        match &p.kind {
            PartKind::Heads { norm: Some(n), .. } => {
                let w = args.ptr(&mut b, &format!("norm_w{k}"), n.weight.0);
                norm = Some((w, Elem::of(n.dtype, "a head norm weight")?, n.eps));
            }
            PartKind::Heads { .. } => {}
            PartKind::Columns(ops) => {
                for (j, op) in ops.iter().enumerate() {
                    if let ColumnOp::Add(v) | ColumnOp::Mul(v) = op {
                        let r = args.ptr(&mut b, &format!("v{k}_{j}"), v.buf.0);
                        vectors.push((r, Elem::of(v.dtype, "a column vector")?));
                    }
                }
            }
        }
        regs.push(PartRegs { out, oe, norm, vectors });
    }
    let rows = args.size(&mut b, "rows", &spec.rows);
    let tokens = start.map(|_| args.size(&mut b, "tokens", &spec.tokens));
    let c = coords(&mut b);

    // The inverse-frequency tables, one per distinct (head_dim, theta), filled by thread 0.
    let mut tables: Vec<((u32, u64), Operand)> = Vec::new();
    for p in &spec.parts {
        if let PartKind::Heads { head_dim, rope: Some(r), .. } = &p.kind {
            let key = (*head_dim, r.theta.to_bits());
            if tables.iter().all(|(k, _)| *k != key) {
                let t = b.shared(&format!("inv_freq{}", tables.len()), 4 * (head_dim / 2), 16);
                tables.push((key, t));
            }
        }
    }
    if !tables.is_empty() {
        b.comment("inverse frequencies (computed on the host like the cpu reference)");
        let first = b.setp(Cmp::Eq, Ty::U32, c.tid.into(), 0u32.into());
        let fills: Vec<(Operand, Vec<f32>)> =
            tables.iter().map(|((d, th), t)| (*t, inv_freq(*d, f64::from_bits(*th)))).collect();
        b.if_(first, |b| {
            for (t, vals) in &fills {
                let base = b.shared_addr(*t);
                for (i, v) in vals.iter().enumerate() {
                    b.st(Space::Shared, Ty::F32, base.into(), 4 * i as i64, (*v).into());
                }
            }
        });
        b.bar();
    }

    // Blocks along y share a row: `gw` is the warp's index among the row's `ways · WARPS` warps, `gt`
    // the thread's among its `ways · THREADS` threads.
    let cy = b.special(Special::CtaidY);
    let gw = b.mad(Ty::U32, cy.into(), WARPS.into(), c.warp.into());
    let gt = b.mad(Ty::U32, cy.into(), THREADS.into(), c.tid.into());
    let mut first_head = 0u32;
    let ctaid = b.special(Special::CtaidX);
    let nctaid = b.special(Special::NctaidX);
    b.for_uniform(Ty::U32, ctaid.into(), rows, nctaid.into(), |b, row| {
        let prow = b.mul(Ty::U32, row.into(), spec.width.into());
        // Position of the row, when a part is rotated.
        let pos = start.zip(tokens).map(|(start, tokens)| {
            let seq = udiv(b, row, &spec.tokens, tokens);
            let t = urem(b, row, &spec.tokens, tokens);
            let sa = b.index(start, seq, 4);
            let s = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, sa.into(), 0);
            let p = b.add(Ty::S32, s.into(), t.into());
            b.cvt(Ty::F32, Ty::S32, p.into())
        });
        for (k, p) in spec.parts.iter().enumerate() {
            let oe = regs[k].oe;
            let orow = b.mul(Ty::U32, row.into(), p.width.into());
            match &p.kind {
                PartKind::Heads { head_dim, rope, .. } => {
                    b.comment(format!("part {k}: {} heads of {head_dim}", p.width / head_dim));
                    let table = rope.map(|r| {
                        let key = (*head_dim, r.theta.to_bits());
                        tables.iter().find(|(k, _)| *k == key).map(|(_, t)| *t).unwrap_or(Operand::Imm(0))
                    });
                    let heads = p.width / head_dim;
                    let hp = HeadPart {
                        pe,
                        oe,
                        head_dim: *head_dim,
                        lo: p.lo,
                        prow,
                        orow,
                        product,
                        out: regs[k].out,
                        norm: regs[k].norm,
                        rope: rope.zip(table).zip(pos).map(|((r, t), pos)| (r.style, t, pos)),
                    };
                    // Flat head `first_head + h` belongs to warp `(first_head + h) % all_warps`.
                    let skew = (all_warps - first_head % all_warps) % all_warps;
                    let h0 = b.add(Ty::U32, gw.into(), skew.into());
                    let h0 = b.bin(BinOp::Rem, Ty::U32, h0.into(), all_warps.into());
                    first_head += heads;
                    b.for_(Ty::U32, h0.into(), heads.into(), all_warps.into(), |b, h| hp.emit(b, h, c.lane));
                }
                PartKind::Columns(ops) => {
                    b.comment(format!("part {k}: {} columns, {} op(s)", p.width, ops.len()));
                    let out = regs[k].out;
                    let vectors = &regs[k].vectors;
                    b.for_(Ty::U32, gt.into(), p.width.into(), all_threads.into(), |b, col| {
                        let src = b.add(Ty::U32, prow.into(), col.into());
                        let src = b.add(Ty::U32, src.into(), p.lo.into());
                        let a = b.index(product, src, pe.bytes());
                        let mut x = load(b, pe, Cache::None, a, 0, 1)[0];
                        let mut vi = 0;
                        for op in ops {
                            x = match op {
                                ColumnOp::Sigmoid => elementwise::sigmoid(b, x),
                                ColumnOp::Softplus => elementwise::softplus(b, x),
                                ColumnOp::Silu => elementwise::silu(b, x),
                                ColumnOp::Exp => elementwise::exp(b, x),
                                ColumnOp::Neg => b.un(UnOp::Neg, Ty::F32, x.into()),
                                ColumnOp::Relu2 => super::gemm::relu2(b, x),
                                ColumnOp::Scale(f) => b.mul(Ty::F32, x.into(), (*f).into()),
                                ColumnOp::RoundBf16 => round_bf16(b, x),
                                ColumnOp::Add(v) | ColumnOp::Mul(v) => {
                                    let (vr, ve) = vectors[vi];
                                    let idx = if v.broadcast { b.mov(Ty::U32, 0u32.into()) } else { col };
                                    let va = b.index(vr, idx, ve.bytes());
                                    vi += 1;
                                    let y = load(b, ve, Cache::ReadOnly, va, 0, 1)[0];
                                    let op = if matches!(op, ColumnOp::Add(_)) { BinOp::Add } else { BinOp::Mul };
                                    b.bin(op, Ty::F32, x.into(), y.into())
                                }
                            };
                        }
                        let dst = b.add(Ty::U32, orow.into(), col.into());
                        let da = b.index(out, dst, oe.bytes());
                        store(b, oe, da, 0, &[x]);
                    });
                }
            }
        }
    });
    let kernel = b.finish();
    Ok(Generated {
        kernel,
        launch: LaunchRule {
            grid: [blocks(&spec.rows, 1), Dim::constant(i64::from(ways)), Dim::constant(1)],
            block: [THREADS, 1, 1],
            dynamic_shared: 0,
            args: args.rules,
        },
    })
}

/// The registers and constants of one head part, for one row.
struct HeadPart {
    pe: Elem,
    oe: Elem,
    head_dim: u32,
    lo: u32,
    prow: Reg,
    orow: Reg,
    product: Reg,
    out: Reg,
    /// Weight pointer, its storage, eps.
    norm: Option<(Reg, Elem, f32)>,
    /// Style, inverse-frequency table, position (f32).
    rope: Option<(RopeStyle, Operand, Reg)>,
}

impl HeadPart {
    /// Head `h` of the part, by the calling warp (`lane` = its lane).
    fn emit(&self, b: &mut Builder, h: Reg, lane: Reg) {
        let d = self.head_dim;
        let half = d / 2;
        let slots = half.div_ceil(32);
        let interleaved = matches!(self.rope, Some((RopeStyle::Interleaved, _, _)));
        // Element indices of pair i within the head.
        let pair = |b: &mut Builder, i: Reg| -> (Reg, Reg) {
            if interleaved {
                let a = b.bin(BinOp::Shl, Ty::U32, i.into(), 1u32.into());
                let c = b.add(Ty::U32, a.into(), 1u32.into());
                (a, c)
            } else {
                let c = b.add(Ty::U32, i.into(), half.into());
                (i, c)
            }
        };
        let hbase = b.mul(Ty::U32, h.into(), d.into());
        let src0 = b.add(Ty::U32, self.prow.into(), hbase.into());
        let src0 = b.add(Ty::U32, src0.into(), self.lo.into());
        let dst0 = b.add(Ty::U32, self.orow.into(), hbase.into());
        // Load the lane's pairs (masked pairs read as 0 from a clamped index).
        let mut vals = Vec::new();
        for e in 0..slots {
            let i = b.add(Ty::U32, lane.into(), (32 * e).into());
            let valid = b.setp(Cmp::Lt, Ty::U32, i.into(), half.into());
            let ic = b.bin(BinOp::Min, Ty::U32, i.into(), (half - 1).into());
            let (ia, ib) = pair(b, ic);
            let aa = b.add(Ty::U32, src0.into(), ia.into());
            let ab = b.add(Ty::U32, src0.into(), ib.into());
            let pa = b.index(self.product, aa, self.pe.bytes());
            let pb = b.index(self.product, ab, self.pe.bytes());
            let xa = load(b, self.pe, Cache::None, pa, 0, 1)[0];
            let xb = load(b, self.pe, Cache::None, pb, 0, 1)[0];
            let xa = b.selp(Ty::F32, xa.into(), 0.0f32.into(), valid);
            let xb = b.selp(Ty::F32, xb.into(), 0.0f32.into(), valid);
            vals.push((ic, ia, ib, valid, xa, xb));
        }
        if let Some((w, we, eps)) = self.norm {
            let mut ss = b.mov(Ty::F32, 0.0f32.into());
            for &(_, _, _, _, xa, xb) in &vals {
                ss = b.mad(Ty::F32, xa.into(), xa.into(), ss.into());
                ss = b.mad(Ty::F32, xb.into(), xb.into(), ss.into());
            }
            let ss = b.warp_reduce(BinOp::Add, Ty::F32, ss);
            let inv_d = b.mov(Ty::F32, (1.0f32 / d as f32).into());
            let r = rstd(b, ss, inv_d, eps);
            for v in &mut vals {
                let (_, ia, ib, _, xa, xb) = *v;
                let wa = b.index(w, ia, we.bytes());
                let wb = b.index(w, ib, we.bytes());
                let ga = load(b, we, Cache::ReadOnly, wa, 0, 1)[0];
                let gb = load(b, we, Cache::ReadOnly, wb, 0, 1)[0];
                let ya = b.mul(Ty::F32, xa.into(), r.into());
                let ya = b.mul(Ty::F32, ya.into(), ga.into());
                let yb = b.mul(Ty::F32, xb.into(), r.into());
                let yb = b.mul(Ty::F32, yb.into(), gb.into());
                v.4 = ya;
                v.5 = yb;
            }
        }
        for &(ic, ia, ib, valid, xa, xb) in &vals {
            let (oa, ob) = match self.rope {
                Some((_, table, pos)) => {
                    let ta = b.index_shared(table, ic.into(), 4);
                    let f = b.ld(Space::Shared, Ty::F32, Cache::None, ta.into(), 0);
                    let ang = b.mul(Ty::F32, pos.into(), f.into());
                    let (sin, cos) = sincos(b, ang);
                    // (x₁·cos − x₂·sin, x₂·cos + x₁·sin)
                    let m = b.mul(Ty::F32, xa.into(), cos.into());
                    let t = b.mul(Ty::F32, xb.into(), sin.into());
                    let oa = b.bin(BinOp::Sub, Ty::F32, m.into(), t.into());
                    let t = b.mul(Ty::F32, xa.into(), sin.into());
                    let m = b.mul(Ty::F32, xb.into(), cos.into());
                    let ob = b.add(Ty::F32, m.into(), t.into());
                    (oa, ob)
                }
                None => (xa, xb),
            };
            let oe = self.oe;
            let (out, dst0) = (self.out, dst0);
            b.if_(valid, |b| {
                let da = b.add(Ty::U32, dst0.into(), ia.into());
                let db = b.add(Ty::U32, dst0.into(), ib.into());
                let pa = b.index(out, da, oe.bytes());
                let pb = b.index(out, db, oe.bytes());
                store(b, oe, pa, 0, &[oa]);
                store(b, oe, pb, 0, &[ob]);
            });
        }
    }
}
