//! logits: `row_norm_logits` — each logit divided by the L2 norm of its LM-head row,
//! `out[r, v] = logits[r, v] / ‖w[v]‖₂` (f32 out), as **two kernels**:
//!
//! 1. `row_norms` over the weight `w [V, H]` → `norms f32[V]`: one warp per vocabulary row (4 rows per
//!    block of 128 threads), vectors of up to 16 bytes, a shuffle reduction, `sqrt.rn`. It depends only
//!    on the weight, so the runtime runs it once when the weights are loaded (a prep step) and keeps
//!    `norms` in a scratch buffer; it must run again only when `w` changes (training).
//! 2. `row_norm_scale`: `out = logits / norms[v]` over `rows × V`, a vectorised grid-stride loop
//!    (256 threads; 4 f32 per step when `V` divides by 4), exact `div.rn` as the cpu kernel.
//!
//! Not fused into the LM-head GEMM here: the division is a cheap epilogue the GEMM generator can take
//! over by reading `norms` (the same scratch buffer).
//!
//! **Slots** (`ArgRule::Buffer(BufferId(k))`): 0 `logits`, 1 `w`, 2 `out` (the node's operands and
//! result), 3 `norms` (scratch f32[V]). Kernel 1 takes `w, norms`; kernel 2 takes `logits, norms, out`
//! and the element count / vector width (u32) when symbolic.

use flashc_compiler::gir::{DType, Dim, Op, TensorType};

use super::elementwise::{Args, Elem, blocks, declare_block, grid3, load, row_vector, store, urem};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Special, Ty, UnOp};

/// Threads per block of the norms kernel (one warp per row).
pub const NORMS_BLOCK: u32 = 128;
/// Threads per block of the scaling kernel.
pub const SCALE_BLOCK: u32 = 256;

/// The two kernels of `row_norm_logits` for `rows` rows of `vocab` logits and an LM head of `hidden`
/// columns: `[row_norms, row_norm_scale]`, in launch order.
pub fn row_norm_logits(
    rows: &Dim,
    vocab: u32,
    hidden: u32,
    logits: DType,
    w: DType,
) -> Result<[Generated; 2], CodegenError> {
    Ok([row_norms(vocab, hidden, w)?, row_norm_scale(rows, vocab, logits)?])
}

/// The kernels of a gir `row_norm_logits` node.
pub fn for_op(op: &Op, operands: &[TensorType]) -> Result<[Generated; 2], CodegenError> {
    let (Op::RowNormLogits, [l, w]) = (op, operands) else {
        return Err(CodegenError::Unsupported(format!("`{}` as row_norm_logits", op.name())));
    };
    let cst = |d: &Dim| {
        d.as_const()
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| CodegenError::Shape(format!("LM head {w}: sizes must be constant")))
    };
    if w.rank() != 2 || l.rank() == 0 {
        return Err(CodegenError::Shape(format!("row_norm_logits of {l} and {w}")));
    }
    let rows = Dim::product(&l.shape[..l.rank() - 1]);
    row_norm_logits(&rows, cst(&w.shape[0])?, cst(&w.shape[1])?, l.dtype, w.dtype)
}

/// `norms[v] = ‖w[v]‖₂` for `w [vocab, hidden]`.
pub fn row_norms(vocab: u32, hidden: u32, w: DType) -> Result<Generated, CodegenError> {
    let we = Elem::of(w, "LM head")?;
    if hidden == 0 {
        return Err(CodegenError::Shape("an LM head without columns".into()));
    }
    let vw = row_vector(hidden, we);
    let nvec = hidden / vw;
    let wpb = NORMS_BLOCK / 32;
    let mut b = Builder::new(format!("row_norms_{}_{hidden}", we.name()));
    declare_block(&mut b, NORMS_BLOCK);
    b.doc(format!("row_norms: L2 norm of each of the {vocab} rows of a [{vocab}, {hidden}] {} matrix", we.name()));
    b.doc(format!("one warp per row, {wpb} rows per block; {vw}-element vectors; f32 sum of squares"));
    let mut args = Args::default();
    let wp = args.ptr(&mut b, "w", 1);
    let norms = args.ptr(&mut b, "norms", 3);
    let tid = b.special(Special::TidX);
    let lane = b.bin(BinOp::And, Ty::B32, tid.into(), 31u32.into());
    let warp = b.bin(BinOp::Shr, Ty::U32, tid.into(), 5u32.into());
    let ctaid = b.special(Special::CtaidX);
    let nctaid = b.special(Special::NctaidX);
    let r0 = b.mad(Ty::U32, ctaid.into(), wpb.into(), warp.into());
    let step = b.mul(Ty::U32, nctaid.into(), wpb.into());
    b.for_(Ty::U32, r0.into(), vocab.into(), step.into(), |b, r| {
        let ss = b.mov(Ty::F32, 0.0f32.into());
        let base = b.mul(Ty::U32, r.into(), hidden.into());
        b.for_(Ty::U32, lane.into(), nvec.into(), 32u32.into(), |b, c| {
            let e = b.mad(Ty::U32, c.into(), vw.into(), base.into());
            let a = b.index(wp, e, we.bytes());
            for v in load(b, we, Cache::Stream, a, 0, vw as usize) {
                b.mad_into(ss, v.into(), v.into());
            }
        });
        let total = b.warp_reduce(BinOp::Add, Ty::F32, ss);
        let first = b.setp(Cmp::Eq, Ty::U32, lane.into(), 0u32.into());
        b.if_(first, |b| {
            let n = b.un(UnOp::Sqrt, Ty::F32, total.into());
            let a = b.index(norms, r, 4);
            store(b, Elem::F32, a, 0, &[n]);
        });
    });
    let kernel = b.finish();
    let grid = blocks(&Dim::constant(i64::from(vocab)), i64::from(wpb));
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(grid), block: [NORMS_BLOCK, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}

/// `out[r, v] = logits[r, v] / norms[v]` over `rows × vocab` (f32 out).
pub fn row_norm_scale(rows: &Dim, vocab: u32, logits: DType) -> Result<Generated, CodegenError> {
    let le = Elem::of(logits, "logits")?;
    if vocab == 0 {
        return Err(CodegenError::Shape("an empty vocabulary".into()));
    }
    let vw = row_vector(vocab, Elem::F32);
    let n = rows.scale(i64::from(vocab));
    let nv = n.div_exact(i64::from(vw)).unwrap_or_else(|| n.clone());
    let mut b = Builder::new(format!("row_norm_scale_{}_{vocab}", le.name()));
    declare_block(&mut b, SCALE_BLOCK);
    b.doc(format!(
        "row_norm_scale: {rows} rows of {vocab} {} logits divided by the LM-head row norms (f32 out)",
        le.name()
    ));
    b.doc(format!("grid-stride loop, {SCALE_BLOCK} threads, {vw} element(s) per thread and step"));
    let mut args = Args::default();
    let lp = args.ptr(&mut b, "logits", 0);
    let norms = args.ptr(&mut b, "norms", 3);
    let out = args.ptr(&mut b, "out", 2);
    let nv_op = args.size(&mut b, "n", &nv);
    let gtid = b.global_index_x();
    let ntid = b.special(Special::NtidX);
    let nctaid = b.special(Special::NctaidX);
    let stride = b.mul(Ty::U32, ntid.into(), nctaid.into());
    let vocab_dim = Dim::constant(i64::from(vocab));
    b.for_(Ty::U32, gtid.into(), nv_op, stride.into(), |b, j| {
        let i = if vw > 1 { b.bin(BinOp::Shl, Ty::U32, j.into(), vw.trailing_zeros().into()) } else { j };
        let v = urem(b, i, &vocab_dim, vocab.into());
        let la = b.index(lp, i, le.bytes());
        let ls = load(b, le, Cache::ReadOnly, la, 0, vw as usize);
        let na = b.index(norms, v, 4);
        let ns = load(b, Elem::F32, Cache::ReadOnly, na, 0, vw as usize);
        let q: Vec<_> = ls.iter().zip(&ns).map(|(l, n)| b.bin(BinOp::Div, Ty::F32, (*l).into(), (*n).into())).collect();
        let oa = b.index(out, i, 4);
        store(b, Elem::F32, oa, 0, &q);
    });
    let kernel = b.finish();
    let grid = blocks(&nv, i64::from(SCALE_BLOCK));
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(grid), block: [SCALE_BLOCK, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}
