//! layout: the data-movement and weight-preparation ops — `concat` and `split` (one strided-copy
//! kernel each) and `row_inv_norm` (per-row inverse L2 norms of a weight). They mostly run once at
//! load, as prep groups (fused projection weights `[q; k; v]`, `[gate; up]`; the LM head's inverse
//! row norms for row-normalised logits), so they favour simple, always-correct code over peak speed,
//! while still moving 16 bytes per access where the layout allows.
//!
//! **`concat` / `split` (`copy_pieces`).** Both are lists of *pieces*: a `rows × width` block copied
//! from `src[r·src_pitch + src_off + c]` to `dst[r·dst_pitch + dst_off + c]` (elements), where `rows`
//! is the product of the dims before the axis, and widths, pitches and offsets are the axis sizes
//! times the product of the dims after it. A `concat` of `n` operands is `n` pieces into the one
//! result (offset = the sizes before it along the axis); a `split` into `n` results is `n` pieces out
//! of the one operand. One kernel runs the pieces one after the other, each as its own grid-stride
//! loop (block of 256 threads) over `rows · width / V` vectors, so no thread searches for its piece
//! and each piece picks its own vector width `V`: the largest power of two with `V · bytes ≤ 16`
//! that divides the piece's width, both pitches and both offsets (so every vector stays inside one
//! row and is aligned to its size, given 16-byte aligned buffers; the arena aligns to 256), down to
//! one element. The copy moves bits: any dtype (bf16, f16, f32, i32), `V · bytes ≥ 4` as 32-bit
//! words (1, 2 or 4 per access), a single 2-byte element as a 16-bit access. Symbolic sizes (B, T, S)
//! become u32 parameters and force `V = 1` when they enter a width, pitch or offset. Grid: enough
//! blocks for one step of the largest piece (constant sizes), capped at [`MAX_COPY_BLOCKS`] (the loops
//! make any grid correct). Indices are u32 (fewer than 2³² elements per buffer).
//!
//! **`row_inv_norm`.** `w [V, H]` (bf16 or f32) → `f32[V]`, `1/‖w[v]‖₂` (0 for a zero row, as the
//! cpu kernel). One block of 256 threads per row (a grid-stride loop over rows, at most
//! [`MAX_NORM_BLOCKS`] blocks): each thread sums the squares of `row_vector(H)`-element vectors
//! (16-byte loads when `H` allows) in f32, the block reduces with warp shuffles then the 8 warps'
//! partials through shared memory (`block_reduce`, deterministic order), and thread 0 stores
//! `1 / sqrt.rn(Σ)` (exact `div.rn`). A block per row keeps 8 warps of loads in flight on the long
//! rows of an LM head (2048–4096 columns).
//!
//! **Slots** (`ArgRule::Buffer(BufferId(k))`): the group's operands `0..n`, then its results.
//! Parameters: `concat` `x0, .., x{n-1}, out`; `split` `x, out0, .., out{n-1}`; then any symbolic
//! size (u32). `row_inv_norm`: `w, out`.

use flashc_compiler::gir::{DType, Dim, Op, TensorType};
use flashc_compiler::schedule::BufferId;

use super::elementwise::{
    Args, Coords, Elem, block_reduce, blocks, declare_block, grid3, load, row_vector, udiv, urem,
};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Reg, Space, Special, Ty, UnOp};

/// Threads per block of the copy kernel.
pub const COPY_BLOCK: u32 = 256;
/// The most blocks a copy kernel is launched with (its loops stride over the rest).
pub const MAX_COPY_BLOCKS: i64 = 8192;
/// Threads per block of `row_inv_norm` (one row per block).
pub const NORM_BLOCK: u32 = 256;
/// The most blocks `row_inv_norm` is launched with.
pub const MAX_NORM_BLOCKS: i64 = 16384;

/// One `rows × width` block copied between two buffers (sizes in elements, see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub src: BufferId,
    pub src_pitch: Dim,
    pub src_off: Dim,
    pub dst: BufferId,
    pub dst_pitch: Dim,
    pub dst_off: Dim,
    pub width: Dim,
}

impl Piece {
    /// The vector width: the largest power of two `≤ 16 / bytes` dividing every size (1 if one is
    /// symbolic).
    fn vector(&self, bytes: u32) -> u32 {
        let sizes = [&self.width, &self.src_pitch, &self.src_off, &self.dst_pitch, &self.dst_off];
        let Some(consts) = sizes.iter().map(|d| d.as_const()).collect::<Option<Vec<i64>>>() else { return 1 };
        let mut v = (16 / bytes).max(1);
        while v > 1 && consts.iter().any(|c| c % i64::from(v) != 0) {
            v /= 2;
        }
        v
    }
}

/// The kernel of a gir `concat` or `split` node over its operand and result types.
pub fn for_op(op: &Op, operands: &[TensorType], results: &[TensorType], name: &str) -> Result<Generated, CodegenError> {
    let shape = |what: &str| CodegenError::Shape(format!("{what} {name}: operands {operands:?}, results {results:?}"));
    match op {
        Op::Concat { axis } => {
            let out = results.first().ok_or_else(|| shape("concat"))?;
            let (rows, inner) = outer_inner(out, *axis).ok_or_else(|| shape("concat"))?;
            let pitch = out.shape[*axis as usize].mul(&inner);
            let mut off = Dim::constant(0);
            let mut pieces = Vec::new();
            for (j, t) in operands.iter().enumerate() {
                let width = t.shape.get(*axis as usize).ok_or_else(|| shape("concat"))?.mul(&inner);
                pieces.push(Piece {
                    src: BufferId(j as u32),
                    src_pitch: width.clone(),
                    src_off: Dim::constant(0),
                    dst: BufferId(operands.len() as u32),
                    dst_pitch: pitch.clone(),
                    dst_off: off.clone(),
                    width: width.clone(),
                });
                off = off.add(&width);
            }
            copy_pieces(name, out.dtype, &rows, &pieces, "concat")
        }
        Op::Split { axis, .. } => {
            let x = operands.first().ok_or_else(|| shape("split"))?;
            let (rows, inner) = outer_inner(x, *axis).ok_or_else(|| shape("split"))?;
            let pitch = x.shape[*axis as usize].mul(&inner);
            let mut off = Dim::constant(0);
            let mut pieces = Vec::new();
            for (j, t) in results.iter().enumerate() {
                let width = t.shape.get(*axis as usize).ok_or_else(|| shape("split"))?.mul(&inner);
                pieces.push(Piece {
                    src: BufferId(0),
                    src_pitch: pitch.clone(),
                    src_off: off.clone(),
                    dst: BufferId(1 + j as u32),
                    dst_pitch: width.clone(),
                    dst_off: Dim::constant(0),
                    width: width.clone(),
                });
                off = off.add(&width);
            }
            copy_pieces(name, x.dtype, &rows, &pieces, "split")
        }
        Op::RowInvNorm => {
            let [w] = operands else { return Err(shape("row_inv_norm")) };
            if w.rank() != 2 {
                return Err(shape("row_inv_norm"));
            }
            let hidden = w.shape[1].as_const().and_then(|c| u32::try_from(c).ok()).ok_or_else(|| {
                CodegenError::Shape(format!("row_inv_norm {name}: the row width of {w} must be constant"))
            })?;
            row_inv_norm(name, &w.shape[0], hidden, w.dtype)
        }
        other => Err(CodegenError::Unsupported(format!("`{}` is not a layout op", other.name()))),
    }
}

/// (product of the dims before `axis`, product of the dims after it).
fn outer_inner(t: &TensorType, axis: u32) -> Option<(Dim, Dim)> {
    let a = axis as usize;
    (a < t.rank()).then(|| (Dim::product(&t.shape[..a]), Dim::product(&t.shape[a + 1..])))
}

/// One kernel copying every piece in turn (see the module doc). `what` names the op in the docs.
pub fn copy_pieces(
    name: &str,
    dtype: DType,
    rows: &Dim,
    pieces: &[Piece],
    what: &str,
) -> Result<Generated, CodegenError> {
    let bytes = u32::try_from(dtype.size()).unwrap_or(4);
    if pieces.is_empty() {
        return Err(CodegenError::Shape(format!("{what} {name}: nothing to copy")));
    }
    let mut b = Builder::new(name);
    declare_block(&mut b, COPY_BLOCK);
    b.doc(format!("{what}: {} piece(s) of {rows} row(s), {} elements, copied as bits", pieces.len(), dtype.name()));
    let mut args = Args::default();
    // Pointer parameters: every distinct slot once, in slot order.
    let mut slots: Vec<u32> = pieces.iter().flat_map(|p| [p.src.0, p.dst.0]).collect();
    slots.sort_unstable();
    slots.dedup();
    let ptrs: Vec<(u32, Reg)> = slots.iter().map(|&s| (s, args.ptr(&mut b, &format!("buf{s}"), s))).collect();
    let ptr = |s: BufferId| ptrs.iter().find(|(k, _)| *k == s.0).map(|(_, r)| *r);
    let gtid = b.global_index_x();
    let ntid = b.special(Special::NtidX);
    let nctaid = b.special(Special::NctaidX);
    let stride = b.mul(Ty::U32, ntid.into(), nctaid.into());
    let mut most = Dim::constant(0);
    for (j, p) in pieces.iter().enumerate() {
        let v = p.vector(bytes);
        let wv = p.width.div_exact(i64::from(v)).unwrap_or_else(|| p.width.clone());
        let n = rows.mul(&wv);
        b.doc(format!(
            "piece {j}: buf{}[r*{} + {} + c] -> buf{}[r*{} + {} + c], width {}, {v} element(s) per access",
            p.src.0, p.src_pitch, p.src_off, p.dst.0, p.dst_pitch, p.dst_off, p.width
        ));
        most = match (most.as_const(), n.as_const()) {
            (Some(a), Some(c)) => Dim::constant(a.max(c)),
            _ => most.add(&n),
        };
        let (Some(src), Some(dst)) = (ptr(p.src), ptr(p.dst)) else {
            return Err(CodegenError::Shape(format!("{what} {name}: a piece names an undeclared buffer")));
        };
        let n_op = args.size(&mut b, &format!("n{j}"), &n);
        let wv_op = args.size(&mut b, &format!("w{j}"), &wv);
        let names = ["src_pitch", "src_off", "dst_pitch", "dst_off"];
        let dims = [&p.src_pitch, &p.src_off, &p.dst_pitch, &p.dst_off];
        let sizes: Vec<_> = names.iter().zip(dims).map(|(nm, d)| args.size(&mut b, &format!("{nm}{j}"), d)).collect();
        b.comment(format!("piece {j}"));
        b.for_(Ty::U32, gtid.into(), n_op, stride.into(), |b, e| {
            let r = udiv(b, e, &wv, wv_op);
            let c = urem(b, e, &wv, wv_op);
            let cv = if v > 1 { b.bin(BinOp::Shl, Ty::U32, c.into(), v.trailing_zeros().into()) } else { c };
            let se0 = b.mad(Ty::U32, r.into(), sizes[0], sizes[1]);
            let se = b.add(Ty::U32, se0.into(), cv.into());
            let de0 = b.mad(Ty::U32, r.into(), sizes[2], sizes[3]);
            let de = b.add(Ty::U32, de0.into(), cv.into());
            let sa = b.index(src, se, bytes);
            let da = b.index(dst, de, bytes);
            let total = v * bytes;
            if total >= 4 {
                let words = (total / 4) as usize;
                if words == 1 {
                    let x = b.ld(Space::Global, Ty::B32, Cache::Stream, sa.into(), 0);
                    b.st(Space::Global, Ty::B32, da.into(), 0, x.into());
                } else {
                    let x = b.ld_vec(Space::Global, Ty::B32, Cache::Stream, sa.into(), 0, words);
                    b.st_vec(Space::Global, Ty::B32, da.into(), 0, x.into_iter().map(Into::into).collect());
                }
            } else {
                let x = b.ld(Space::Global, Ty::B16, Cache::Stream, sa.into(), 0);
                b.st(Space::Global, Ty::B16, da.into(), 0, x.into());
            }
        });
    }
    let kernel = b.finish();
    let grid = blocks(&most, i64::from(COPY_BLOCK));
    let grid = match grid.as_const() {
        Some(g) => Dim::constant(g.clamp(1, MAX_COPY_BLOCKS)),
        None => grid,
    };
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(grid), block: [COPY_BLOCK, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}

/// `out[v] = 1 / ‖w[v]‖₂` (0 for a zero row) for `w [rows, hidden]`, f32 out (see the module doc).
pub fn row_inv_norm(name: &str, rows: &Dim, hidden: u32, dtype: DType) -> Result<Generated, CodegenError> {
    let we = Elem::of(dtype, "row_inv_norm weight")?;
    if hidden == 0 {
        return Err(CodegenError::Shape(format!("row_inv_norm {name}: rows without columns")));
    }
    let vw = row_vector(hidden, we);
    let nvec = hidden / vw;
    let warps = NORM_BLOCK / 32;
    let mut b = Builder::new(name);
    declare_block(&mut b, NORM_BLOCK);
    b.doc(format!("row_inv_norm: 1 / L2 norm of each row of a [{rows}, {hidden}] {} matrix (f32 out)", we.name()));
    b.doc(format!("one block of {NORM_BLOCK} threads per row; {vw}-element vectors; f32 sum of squares"));
    let mut args = Args::default();
    let wp = args.ptr(&mut b, "w", 0);
    let out = args.ptr(&mut b, "out", 1);
    let rows_op = args.size(&mut b, "rows", rows);
    let red = b.shared("red", 4 * warps, 16);
    let tid = b.special(Special::TidX);
    let lane = b.bin(BinOp::And, Ty::B32, tid.into(), 31u32.into());
    let warp = b.bin(BinOp::Shr, Ty::U32, tid.into(), 5u32.into());
    let c = Coords { tid, lane, warp };
    let ctaid = b.special(Special::CtaidX);
    let nctaid = b.special(Special::NctaidX);
    b.for_uniform(Ty::U32, ctaid.into(), rows_op, nctaid.into(), |b, r| {
        let ss = b.mov(Ty::F32, 0.0f32.into());
        let base = b.mul(Ty::U32, r.into(), hidden.into());
        b.for_(Ty::U32, tid.into(), nvec.into(), NORM_BLOCK.into(), |b, k| {
            let e = b.mad(Ty::U32, k.into(), vw.into(), base.into());
            let a = b.index(wp, e, we.bytes());
            for x in load(b, we, Cache::Stream, a, 0, vw as usize) {
                b.mad_into(ss, x.into(), x.into());
            }
        });
        let total = block_reduce(b, BinOp::Add, Ty::F32, ss, red, warps, &c);
        let first = b.setp(Cmp::Eq, Ty::U32, tid.into(), 0u32.into());
        b.if_(first, |b| {
            let n = b.un(UnOp::Sqrt, Ty::F32, total.into());
            let inv = b.bin(BinOp::Div, Ty::F32, 1.0f32.into(), n.into());
            let pos = b.setp(Cmp::Gt, Ty::F32, n.into(), 0.0f32.into());
            let y = b.selp(Ty::F32, inv.into(), 0.0f32.into(), pos);
            let oa = b.index(out, r, 4);
            b.st(Space::Global, Ty::F32, oa.into(), 0, y.into());
        });
    });
    let kernel = b.finish();
    let grid = match rows.as_const() {
        Some(n) => Dim::constant(n.clamp(1, MAX_NORM_BLOCKS)),
        None => rows.clone(),
    };
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(grid), block: [NORM_BLOCK, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}
