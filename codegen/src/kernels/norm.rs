//! norm: row normalisations — `rmsnorm`, the fused residual `add_rmsnorm` (writes the sum and the
//! normalised sum), `l2norm` and `gated_rmsnorm` (both gate orders, per `group`) — over rows of a
//! constant width `D`; per-head norms are rows of `head_dim`. Storage bf16 or f32 (the weight may
//! differ from the activations), statistics in f32.
//!
//! **Rows.** A kernel row is one normalisation group: `D` for the plain norms, `group` for the gated
//! norm (`rows · D / group` kernel rows, the weight offset is `(row % (D / group)) · group`). Row
//! `r` starts at element `r · width`; indices are u32 (fewer than 2³² elements per tensor).
//!
//! **Tiling.** A row is read in vectors of `vw` elements (the largest power of two up to 16 bytes that
//! divides the width, so every row start stays aligned). With at most 64 vectors per row a **warp
//! owns a row** (block of 32·W threads, W warps = W rows at a time; W = 4, or fewer when the symbolic
//! row count has a small constant factor), the sum of squares is a warp shuffle reduction and no
//! shared memory or barrier is used. Longer rows get a **block per row** (64 to 1024 threads, about
//! two vectors per thread): warp shuffles, then one partial per warp in shared memory, summed by every
//! thread in warp order (deterministic) between two barriers. Rows loop grid-stride (per warp or per
//! block), so any grid is correct; the launch grid covers every row once. A thread keeps its values
//! (at most 16 f32) in registers between the statistics pass and the output pass; longer rows
//! (beyond 16384 elements per row) use 512 threads that re-read their inputs for the output
//! pass.
//!
//! **Numerics.** `rstd = 1 / √(Σv² / width + eps)` (`Σv² + eps` for l2norm) with exact `sqrt.rn` and
//! `rcp.rn`; `out = v · rstd · w` in the cpu kernel's order (`norm_before_gate`: `(y · silu(z)) · rstd · w`,
//! so a thread keeps one value per element between the passes). `add_rmsnorm` rounds the sum to the
//! storage type, writes it, and normalises that rounded sum — exactly what the unfused pair computes.
//! The gated norm's `silu` is `z · 1 / (1 + e⁻ᶻ)`.
//!
//! **Parameters** (slots of the launch rule, `ArgRule::Buffer(BufferId(k))`, operands then results):
//! - `rmsnorm`: `x`, `w`, `out`; `l2norm`: `x`, `out`;
//! - `add_rmsnorm`: `x`, `r`, `w`, [`sum`,] `out` (the sum is written when `write_sum`);
//! - `gated_rmsnorm`: `y`, `z`, `w`, `out`;
//!
//! then the kernel-row count (u32) when it is symbolic.

use flashc_compiler::gir::{DType, Dim, Graph, InputRole, Op, TensorType};

use super::elementwise::{
    Args, Coords, Elem, block_reduce, blocks, coords, declare_block, grid3, load, round_bf16, row_vector, silu, store,
    urem,
};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Operand, Reg, Special, Ty, UnOp};

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `(x, w) → x · rstd · w`.
    RmsNorm,
    /// `(x, r, w) → (x + r, rmsnorm(x + r) · w)`; without `write_sum` only the normalised value.
    AddRmsNorm { write_sum: bool },
    /// `(x) → x · rsqrt(Σx² + eps)`.
    L2Norm,
    /// `(y, z, w)`: per group of `group` channels, `rmsnorm(y) · w · silu(z)` (`norm_before_gate`) or
    /// `rmsnorm(y · silu(z)) · w`.
    GatedRmsNorm { group: u32, norm_before_gate: bool },
}

/// A normalisation over `rows` rows (symbolic) of `width` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct NormSpec {
    pub kind: NormKind,
    pub rows: Dim,
    pub width: u32,
    /// Storage of the activations (inputs and outputs).
    pub dtype: DType,
    /// Storage of the weight (ignored by `L2Norm`).
    pub weight: DType,
    pub eps: f64,
}

/// `rmsnorm` over `rows × width`.
pub fn rmsnorm(rows: &Dim, width: u32, dtype: DType, weight: DType, eps: f64) -> Result<Generated, CodegenError> {
    norm(&NormSpec { kind: NormKind::RmsNorm, rows: rows.clone(), width, dtype, weight, eps })
}

/// Residual add + rmsnorm.
pub fn add_rmsnorm(
    rows: &Dim,
    width: u32,
    dtype: DType,
    weight: DType,
    eps: f64,
    write_sum: bool,
) -> Result<Generated, CodegenError> {
    norm(&NormSpec { kind: NormKind::AddRmsNorm { write_sum }, rows: rows.clone(), width, dtype, weight, eps })
}

/// `l2norm` over `rows × width`.
pub fn l2norm(rows: &Dim, width: u32, dtype: DType, eps: f64) -> Result<Generated, CodegenError> {
    norm(&NormSpec { kind: NormKind::L2Norm, rows: rows.clone(), width, dtype, weight: dtype, eps })
}

/// `gated_rmsnorm` over `rows × width` in groups of `group`.
pub fn gated_rmsnorm(
    rows: &Dim,
    width: u32,
    dtype: DType,
    weight: DType,
    eps: f64,
    group: u32,
    norm_before_gate: bool,
) -> Result<Generated, CodegenError> {
    let kind = NormKind::GatedRmsNorm { group, norm_before_gate };
    norm(&NormSpec { kind, rows: rows.clone(), width, dtype, weight, eps })
}

/// The kernel of a gir `rmsnorm`, `l2norm` or `gated_rmsnorm` node with operands of types `operands`.
pub fn for_op(op: &Op, operands: &[TensorType]) -> Result<Generated, CodegenError> {
    let x = operands.first().ok_or_else(|| CodegenError::Shape("a norm without operands".into()))?;
    let (rows, width) = rows_width(x)?;
    let weight = |i: usize| operands.get(i).map_or(x.dtype, |t| t.dtype);
    match op {
        Op::RmsNorm { eps } => rmsnorm(&rows, width, x.dtype, weight(1), *eps),
        Op::L2Norm { eps } => l2norm(&rows, width, x.dtype, *eps),
        Op::GatedRmsNorm { eps, group, norm_before_gate } => {
            let group = u32::try_from(*group).map_err(|_| CodegenError::Shape(format!("group {group}")))?;
            gated_rmsnorm(&rows, width, x.dtype, weight(2), *eps, group, *norm_before_gate)
        }
        other => Err(CodegenError::Unsupported(format!("`{}` as a norm", other.name()))),
    }
}

/// The kernel of a fused `add_rmsnorm` body (fuse-norm): `add(p0, p1)` then `rmsnorm(sum, p2)`, with
/// outputs `(sum, normalised)` or `(normalised)`.
pub fn for_add_rmsnorm(body: &Graph) -> Result<Generated, CodegenError> {
    let bad = || CodegenError::Unsupported(format!("fused body `{}` is not an add + rmsnorm", body.name));
    let ids = body.node_ids();
    let norm = ids.iter().copied().find(|n| matches!(body.op(*n), Op::RmsNorm { .. })).ok_or_else(bad)?;
    let Op::RmsNorm { eps } = body.op(norm) else { return Err(bad()) };
    let ops = body.operands(norm);
    let sum = ops.first().copied().ok_or_else(bad)?;
    if !matches!(body.op(sum.node), Op::Add) {
        return Err(bad());
    }
    let is_param = |v: &flashc_compiler::gir::Value, i: u32| match body.op(v.node) {
        Op::Input { role: InputRole::Param, index, .. } => *index == i,
        _ => false,
    };
    let adds = body.operands(sum.node);
    if adds.len() != 2
        || !is_param(&adds[0], 0)
        || !is_param(&adds[1], 1)
        || !ops.get(1).is_some_and(|w| is_param(w, 2))
    {
        return Err(bad());
    }
    let outs = body.outputs();
    let write_sum = match outs {
        [(_, s), (_, n)] if *s == sum && n.node == norm => true,
        [(_, n)] if n.node == norm => false,
        _ => return Err(bad()),
    };
    let params = body.params();
    if params.len() != 3 || params[0] != params[1] {
        return Err(bad());
    }
    let (rows, width) = rows_width(&params[0])?;
    add_rmsnorm(&rows, width, params[0].dtype, params[2].dtype, *eps, write_sum)
}

fn rows_width(t: &TensorType) -> Result<(Dim, u32), CodegenError> {
    let r = t.rank();
    if r == 0 {
        return Err(CodegenError::Shape(format!("a norm over a scalar {t}")));
    }
    let width = t.shape[r - 1]
        .as_const()
        .and_then(|w| u32::try_from(w).ok())
        .filter(|w| *w > 0)
        .ok_or_else(|| CodegenError::Shape(format!("the normalised width of {t} must be a positive constant")))?;
    Ok((Dim::product(&t.shape[..r - 1]), width))
}

/// Most values a thread keeps in registers between the two passes (about 50 registers at the peak).
const MAX_KEEP_VALUES: u32 = 16;

/// Generates the kernel of a normalisation (see the module doc).
pub fn norm(spec: &NormSpec) -> Result<Generated, CodegenError> {
    let x = Elem::of(spec.dtype, "norm input")?;
    let we = Elem::of(spec.weight, "norm weight")?;
    let width = spec.width;
    let group = match spec.kind {
        NormKind::GatedRmsNorm { group, .. } => group,
        _ => width,
    };
    if width == 0 || group == 0 || !width.is_multiple_of(group) {
        return Err(CodegenError::Shape(format!("group {group} does not divide the width {width}")));
    }
    let groups = width / group;
    let krows = spec.rows.scale(i64::from(groups));
    let vw = row_vector(group, x);
    let nvec = group / vw;

    // Threads per row, warps per block, vectors per thread.
    let warp_mode = nvec <= 64;
    let (tpr, wpb) = if warp_mode {
        (32, warps_per_block(&krows))
    } else {
        let kept_vectors = (MAX_KEEP_VALUES / vw).max(1);
        let t = nvec.div_ceil(kept_vectors).next_multiple_of(32).clamp(64, 1024);
        let t = if nvec.div_ceil(t) * vw > MAX_KEEP_VALUES { 512 } else { t };
        (t, t / 32)
    };
    let per_thread = nvec.div_ceil(tpr);
    let keep = per_thread * vw <= MAX_KEEP_VALUES;
    let block = if warp_mode { 32 * wpb } else { tpr };

    let name = match spec.kind {
        NormKind::RmsNorm => "rmsnorm",
        NormKind::AddRmsNorm { .. } => "add_rmsnorm",
        NormKind::L2Norm => "l2norm",
        NormKind::GatedRmsNorm { .. } => "gated_rmsnorm",
    };
    let mut b = Builder::new(format!("{name}_{}_{width}", x.name()));
    declare_block(&mut b, block);
    b.doc(format!(
        "{name} over rows of {width} {} (groups of {group}), weight {}, eps {:e}",
        x.name(),
        we.name(),
        spec.eps
    ));
    if warp_mode {
        b.doc(format!(
            "one warp per row, {wpb} rows per block of {block} threads; {vw}-element vectors, {per_thread} per lane"
        ));
    } else {
        b.doc(format!(
            "one block of {block} threads per row; {vw}-element vectors, {per_thread} per thread, {}",
            if keep { "kept in registers" } else { "re-read for the output pass" }
        ));
    }
    b.doc("rows loop grid-stride; statistics in f32; deterministic reduction order");

    let mut args = Args::default();
    let mut slot = 0u32;
    let mut ptr = |b: &mut Builder, args: &mut Args, n: &str| {
        let r = args.ptr(b, n, slot);
        slot += 1;
        r
    };
    let (inputs, wptr, sum_ptr, out) = match spec.kind {
        NormKind::RmsNorm => {
            let xp = ptr(&mut b, &mut args, "x");
            let w = ptr(&mut b, &mut args, "w");
            (vec![xp], Some(w), None, ptr(&mut b, &mut args, "out"))
        }
        NormKind::AddRmsNorm { write_sum } => {
            let xp = ptr(&mut b, &mut args, "x");
            let rp = ptr(&mut b, &mut args, "r");
            let w = ptr(&mut b, &mut args, "w");
            let s = write_sum.then(|| ptr(&mut b, &mut args, "sum"));
            (vec![xp, rp], Some(w), s, ptr(&mut b, &mut args, "out"))
        }
        NormKind::L2Norm => {
            let xp = ptr(&mut b, &mut args, "x");
            (vec![xp], None, None, ptr(&mut b, &mut args, "out"))
        }
        NormKind::GatedRmsNorm { .. } => {
            let y = ptr(&mut b, &mut args, "y");
            let z = ptr(&mut b, &mut args, "z");
            let w = ptr(&mut b, &mut args, "w");
            (vec![y, z], Some(w), None, ptr(&mut b, &mut args, "out"))
        }
    };
    let nrows = args.size(&mut b, "rows", &krows);
    let c = coords(&mut b);
    let red = if warp_mode { None } else { Some(b.shared("red", 4 * wpb, 4)) };
    let ctaid = b.special(Special::CtaidX);
    let nctaid = b.special(Special::NctaidX);
    let g = RowGen {
        kind: spec.kind,
        x,
        we,
        vw,
        nvec,
        tpr,
        per_thread,
        group,
        groups,
        eps: spec.eps as f32,
        inputs,
        wptr,
        sum_ptr,
        out,
    };
    if warp_mode {
        let r0 = b.mad(Ty::U32, ctaid.into(), wpb.into(), c.warp.into());
        let step = b.mul(Ty::U32, nctaid.into(), wpb.into());
        b.for_(Ty::U32, r0.into(), nrows, step.into(), |b, r| g.row(b, r, c.lane, &c, None, keep));
    } else {
        b.for_uniform(Ty::U32, ctaid.into(), nrows, nctaid.into(), |b, r| g.row(b, r, c.tid, &c, red, keep));
    }
    let kernel = b.finish();
    let grid = blocks(&krows, i64::from(if warp_mode { wpb } else { 1 }));
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(grid), block: [block, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}

/// Warps per block for warp-per-row kernels: 4, or the largest power of two dividing every
/// coefficient of a symbolic row count (`B·T` rows get one warp per block, so no warp idles).
fn warps_per_block(rows: &Dim) -> u32 {
    let symbolic: Vec<i64> = rows.terms().into_iter().filter(|(m, _)| m.as_const().is_none()).map(|(_, c)| c).collect();
    let mut w = 4;
    while w > 1 && symbolic.iter().any(|c| c % i64::from(w) != 0) {
        w /= 2;
    }
    w
}

struct RowGen {
    kind: NormKind,
    x: Elem,
    we: Elem,
    vw: u32,
    nvec: u32,
    tpr: u32,
    per_thread: u32,
    group: u32,
    groups: u32,
    eps: f32,
    inputs: Vec<Reg>,
    wptr: Option<Reg>,
    sum_ptr: Option<Reg>,
    out: Reg,
}

/// One chunk: the values whose squares make the statistics, and the values the output scales
/// (`y · silu(z)` for `norm_before_gate`, where the statistics are of `y`; otherwise the same).
struct Chunk {
    sq: Vec<Reg>,
    v: Vec<Reg>,
}

impl RowGen {
    /// Emits the work of kernel row `r` for the thread at position `t` within the row.
    fn row(&self, b: &mut Builder, r: Reg, t: Reg, c: &Coords, red: Option<Operand>, keep: bool) {
        let base = b.mul(Ty::U32, r.into(), self.group.into());
        let wbase = if self.groups > 1 {
            let g = urem(b, r, &Dim::constant(i64::from(self.groups)), Operand::Imm(i64::from(self.groups)));
            b.mul(Ty::U32, g.into(), self.group.into())
        } else {
            b.mov(Ty::U32, 0u32.into())
        };
        let ss = b.mov(Ty::F32, 0.0f32.into());
        let mut kept: Vec<Option<Chunk>> = Vec::new();
        if keep {
            for k in 0..self.per_thread {
                let cidx = b.add(Ty::U32, t.into(), (k * self.tpr).into());
                let mut chunk = None;
                self.guarded(b, k, cidx, |b| {
                    let ch = self.prenorm(b, base, cidx, true);
                    for v in &ch.sq {
                        b.mad_into(ss, (*v).into(), (*v).into());
                    }
                    chunk = Some(ch);
                });
                kept.push(chunk);
            }
        } else {
            b.for_(Ty::U32, t.into(), self.nvec.into(), self.tpr.into(), |b, cidx| {
                let ch = self.prenorm(b, base, cidx, true);
                for v in &ch.sq {
                    b.mad_into(ss, (*v).into(), (*v).into());
                }
            });
        }
        let total = match red {
            None => b.warp_reduce(BinOp::Add, Ty::F32, ss),
            Some(red) => block_reduce(b, BinOp::Add, Ty::F32, ss, red, self.tpr / 32, c),
        };
        let rstd = self.rstd(b, total);
        if keep {
            for (k, ch) in kept.iter().enumerate() {
                let Some(ch) = ch else { continue };
                let cidx = b.add(Ty::U32, t.into(), (k as u32 * self.tpr).into());
                self.guarded(b, k as u32, cidx, |b| self.output(b, ch, rstd, base, wbase, cidx));
            }
        } else {
            b.for_(Ty::U32, t.into(), self.nvec.into(), self.tpr.into(), |b, cidx| {
                let ch = self.prenorm(b, base, cidx, false);
                self.output(b, &ch, rstd, base, wbase, cidx);
            });
        }
    }

    /// Runs `body` for chunk `k` of the thread, under `cidx < nvec` when the last round is partial.
    fn guarded(&self, b: &mut Builder, k: u32, cidx: Reg, body: impl FnOnce(&mut Builder)) {
        if k + 1 == self.per_thread && !self.nvec.is_multiple_of(self.tpr) {
            let inside = b.setp(Cmp::Lt, Ty::U32, cidx.into(), self.nvec.into());
            b.if_(inside, body);
        } else {
            body(b);
        }
    }

    /// Loads chunk `cidx` of the row at element `base` and computes the values to normalise (writing the
    /// residual sum when `first` and the kernel writes it).
    fn prenorm(&self, b: &mut Builder, base: Reg, cidx: Reg, first: bool) -> Chunk {
        let n = self.vw as usize;
        let e = b.mad(Ty::U32, cidx.into(), self.vw.into(), base.into());
        let ld = |b: &mut Builder, p: Reg| {
            let a = b.index(p, e, self.x.bytes());
            load(b, self.x, Cache::ReadOnly, a, 0, n)
        };
        match self.kind {
            NormKind::RmsNorm | NormKind::L2Norm => {
                let v = ld(b, self.inputs[0]);
                Chunk { sq: v.clone(), v }
            }
            NormKind::AddRmsNorm { .. } => {
                let xs = ld(b, self.inputs[0]);
                let rs = ld(b, self.inputs[1]);
                let mut v: Vec<Reg> =
                    xs.iter().zip(&rs).map(|(a, c)| b.add(Ty::F32, (*a).into(), (*c).into())).collect();
                if self.x == Elem::Bf16 {
                    v = v.into_iter().map(|s| round_bf16(b, s)).collect();
                }
                if let (true, Some(sp)) = (first, self.sum_ptr) {
                    let a = b.index(sp, e, self.x.bytes());
                    store(b, self.x, a, 0, &v);
                }
                Chunk { sq: v.clone(), v }
            }
            NormKind::GatedRmsNorm { norm_before_gate, .. } => {
                let ys = ld(b, self.inputs[0]);
                let zs = ld(b, self.inputs[1]);
                let gs: Vec<Reg> = zs.iter().map(|z| silu(b, *z)).collect();
                let v: Vec<Reg> = ys.iter().zip(&gs).map(|(y, g)| b.mul(Ty::F32, (*y).into(), (*g).into())).collect();
                if norm_before_gate { Chunk { sq: ys, v } } else { Chunk { sq: v.clone(), v } }
            }
        }
    }

    /// `rstd` from the row's sum of squares.
    fn rstd(&self, b: &mut Builder, ss: Reg) -> Reg {
        let m = match self.kind {
            NormKind::L2Norm => ss,
            _ => b.bin(BinOp::Div, Ty::F32, ss.into(), (self.group as f32).into()),
        };
        let m = b.add(Ty::F32, m.into(), self.eps.into());
        let s = b.un(UnOp::Sqrt, Ty::F32, m.into());
        b.un(UnOp::Rcp, Ty::F32, s.into())
    }

    /// Writes chunk `cidx` of the output.
    fn output(&self, b: &mut Builder, ch: &Chunk, rstd: Reg, base: Reg, wbase: Reg, cidx: Reg) {
        let n = self.vw as usize;
        let ws = self.wptr.map(|w| {
            let we = b.mad(Ty::U32, cidx.into(), self.vw.into(), wbase.into());
            let a = b.index(w, we, self.we.bytes());
            load(b, self.we, Cache::ReadOnly, a, 0, n)
        });
        let mut out = Vec::with_capacity(n);
        for l in 0..n {
            let mut o = b.mul(Ty::F32, ch.v[l].into(), rstd.into());
            if let Some(ws) = &ws {
                o = b.mul(Ty::F32, o.into(), ws[l].into());
            }
            out.push(o);
        }
        let e = b.mad(Ty::U32, cidx.into(), self.vw.into(), base.into());
        let a = b.index(self.out, e, self.x.bytes());
        store(b, self.x, a, 0, &out);
    }
}
