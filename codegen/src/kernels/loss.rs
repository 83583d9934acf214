//! loss: fused **cross-entropy forward**, `mean over rows with target ≥ 0 of logsumexp(logits[r]) −
//! logits[r, target[r]]`, as two deterministic kernels (no float atomics, so the loss is bit-for-bit
//! reproducible):
//!
//! 1. `cross_entropy_rows`: one block per row (the `sampling` row layout: 16-byte vectors, warp
//!    shuffles, one partial per warp in shared memory), an online max/sum pass gives
//!    `lse = max + ln Σ exp(x − max)`; thread 0 reads the target logit and writes
//!    `row_loss[r] = lse − logits[r, t]` (0 for an ignored row, `t < 0`; NaN for `t ≥ V`, so a bad
//!    target shows in the loss instead of reading out of bounds) and `row_lse[r] = lse` (kept for the
//!    backward pass: `softmax = exp(x − lse)`).
//! 2. `cross_entropy_mean`: one block of 256 threads sums `row_loss` over the rows with `t ≥ 0` and
//!    counts them (per-thread partials in row order, then a fixed-order block reduction) and writes
//!    `loss = sum / count` (0 when no row counts, as the cpu kernel).
//!
//! **Slots** (`ArgRule::Buffer(BufferId(k))`): 0 `logits [rows, V]`, 1 `targets i32[rows]`, 2 `loss
//! f32[1]` (the node's operands and result), 3 `row_loss f32[rows]`, 4 `row_lse f32[rows]` (scratch,
//! or saved for the backward pass); then the row count (u32) when symbolic.

use flashc_compiler::gir::{DType, Dim, Op, TensorType};

use super::elementwise::{Args, block_reduce, coords, declare_block, grid3, ln, load};
use super::sampling::{Online, RowLayout};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Operand, Space, Special, Ty};

/// Threads of the mean kernel.
pub const MEAN_BLOCK: u32 = 256;

/// The two kernels of the cross-entropy forward, in launch order: `[rows, mean]`.
pub fn cross_entropy(rows: &Dim, vocab: u32, dtype: DType) -> Result<[Generated; 2], CodegenError> {
    Ok([cross_entropy_rows(rows, vocab, dtype)?, cross_entropy_mean(rows)?])
}

/// The kernels of a gir `cross_entropy` node.
pub fn for_op(op: &Op, operands: &[TensorType]) -> Result<[Generated; 2], CodegenError> {
    let (Op::CrossEntropy, [l, _]) = (op, operands) else {
        return Err(CodegenError::Unsupported(format!("`{}` as cross_entropy", op.name())));
    };
    let r = l.rank();
    let vocab = (r > 0)
        .then(|| l.shape[r - 1].as_const())
        .flatten()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| CodegenError::Shape(format!("the vocabulary of {l} must be a constant")))?;
    cross_entropy(&Dim::product(&l.shape[..r - 1]), vocab, l.dtype)
}

/// Per-row loss and log-sum-exp.
pub fn cross_entropy_rows(rows: &Dim, vocab: u32, dtype: DType) -> Result<Generated, CodegenError> {
    let l = RowLayout::new(vocab, dtype, "logits")?;
    let mut b = Builder::new(format!("cross_entropy_rows_{}_{vocab}", l.elem.name()));
    declare_block(&mut b, l.threads);
    b.doc(format!("cross-entropy rows: lse − logit[target] per row of {vocab}; 0 for ignored rows (target < 0)"));
    b.doc(l.doc());
    let mut args = Args::default();
    let logits = args.ptr(&mut b, "logits", 0);
    let targets = args.ptr(&mut b, "targets", 1);
    let row_loss = args.ptr(&mut b, "row_loss", 3);
    let row_lse = args.ptr(&mut b, "row_lse", 4);
    let nrows = args.size(&mut b, "rows", rows);
    let c = coords(&mut b);
    let sm = b.shared("red_max", 4 * l.warps(), 4);
    let ss = b.shared("red_sum", 4 * l.warps(), 4);
    let ctaid = b.special(Special::CtaidX);
    let nctaid = b.special(Special::NctaidX);
    b.for_uniform(Ty::U32, ctaid.into(), nrows, nctaid.into(), |b, r| {
        let row = l.row(b, logits, r, l.elem.bytes());
        let on = Online::new(b);
        l.scan(b, row, c.tid, |b, _, vals| on.add(b, vals));
        let (m, s) = on.reduce(b, sm, ss, l.warps(), &c);
        let t0 = b.setp(Cmp::Eq, Ty::U32, c.tid.into(), 0u32.into());
        b.if_(t0, |b| {
            let lns = ln(b, s);
            let lse = b.add(Ty::F32, m.into(), lns.into());
            let ta = b.index(targets, r, 4);
            let t = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, ta.into(), 0);
            let loss = b.mov(Ty::F32, 0.0f32.into());
            let counted = b.setp(Cmp::Ge, Ty::S32, t.into(), 0i32.into());
            b.if_(counted, |b| {
                // NaN by its bits (an `Operand::F32(NaN)` would make the kernel unequal to itself).
                b.inst(Inst::Mov { ty: Ty::B32, dst: loss, src: Operand::Imm(0x7FC0_0000) });
                let inside = b.setp(Cmp::Lt, Ty::U32, t.into(), vocab.into());
                b.if_(inside, |b| {
                    let a = b.index(row, t, l.elem.bytes());
                    let x = load(b, l.elem, Cache::ReadOnly, a, 0, 1)[0];
                    let v = b.bin(BinOp::Sub, Ty::F32, lse.into(), x.into());
                    b.assign(loss, v.into());
                });
            });
            let a = b.index(row_loss, r, 4);
            b.st(Space::Global, Ty::F32, a.into(), 0, loss.into());
            let a = b.index(row_lse, r, 4);
            b.st(Space::Global, Ty::F32, a.into(), 0, lse.into());
        });
    });
    let kernel = b.finish();
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(rows.clone()), block: [l.threads, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}

/// The mean of the counted rows' losses, in one block.
pub fn cross_entropy_mean(rows: &Dim) -> Result<Generated, CodegenError> {
    let mut b = Builder::new("cross_entropy_mean");
    declare_block(&mut b, MEAN_BLOCK);
    b.doc("cross-entropy mean: Σ row_loss / #rows with target ≥ 0 (0 when none), one block, fixed order");
    let mut args = Args::default();
    let row_loss = args.ptr(&mut b, "row_loss", 3);
    let targets = args.ptr(&mut b, "targets", 1);
    let loss = args.ptr(&mut b, "loss", 2);
    let nrows = args.size(&mut b, "rows", rows);
    let c = coords(&mut b);
    let red = b.shared("red", 4 * (MEAN_BLOCK / 32), 4);
    let sum = b.mov(Ty::F32, 0.0f32.into());
    let count = b.mov(Ty::U32, 0u32.into());
    b.for_(Ty::U32, c.tid.into(), nrows, MEAN_BLOCK.into(), |b, r| {
        let ta = b.index(targets, r, 4);
        let t = b.ld(Space::Global, Ty::S32, Cache::ReadOnly, ta.into(), 0);
        let counted = b.setp(Cmp::Ge, Ty::S32, t.into(), 0i32.into());
        b.if_(counted, |b| {
            let a = b.index(row_loss, r, 4);
            let v = b.ld(Space::Global, Ty::F32, Cache::None, a.into(), 0);
            b.bin_into(BinOp::Add, sum, v.into());
            b.bin_into(BinOp::Add, count, 1u32.into());
        });
    });
    let total = block_reduce(&mut b, BinOp::Add, Ty::F32, sum, red, MEAN_BLOCK / 32, &c);
    let n = block_reduce(&mut b, BinOp::Add, Ty::U32, count, red, MEAN_BLOCK / 32, &c);
    let t0 = b.setp(Cmp::Eq, Ty::U32, c.tid.into(), 0u32.into());
    b.if_(t0, |b| {
        let nf = b.cvt(Ty::F32, Ty::U32, n.into());
        let mean = b.bin(BinOp::Div, Ty::F32, total.into(), nf.into());
        let none = b.setp(Cmp::Eq, Ty::U32, n.into(), 0u32.into());
        let v = b.selp(Ty::F32, 0.0f32.into(), mean.into(), none);
        b.st(Space::Global, Ty::F32, loss.into(), 0, v.into());
    });
    let kernel = b.finish();
    Ok(Generated {
        kernel,
        launch: LaunchRule {
            grid: grid3(Dim::constant(1)),
            block: [MEAN_BLOCK, 1, 1],
            dynamic_shared: 0,
            args: args.rules,
        },
    })
}
