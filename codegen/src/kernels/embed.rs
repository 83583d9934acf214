//! embed: row gathers — `embed` (rows of a `[V, H]` table picked by i32 ids), `meta_prefix` (the
//! `[M, H]` meta-token rows in front of every sequence of `x [B, T, H]`) and `embed_meta_prefix`
//! (both at once: the meta rows, then the embedded tokens, without the intermediate `[B, T, H]`).
//!
//! **Tiling.** Each output row is a copy of one source row, moved as raw bits (no conversion; any
//! element type) in units of 16 bytes (`ld/st.v4.b32`), or 8, 4 or 2 when the row size in bytes does
//! not divide by 16, so every row start stays aligned. Blocks of 128 threads; a row is split over
//! `tpr` threads (the units of a row rounded up to a power of two, at most 128) and a block copies
//! `128 / tpr` rows at a time; rows loop grid-stride. No shared memory, no barriers.
//!
//! **Ids.** An id outside `0 .. V` (the cpu kernel's error) is never read out of bounds: its row is
//! written as zeros. The runtime checks ids before a step.
//!
//! **Parameters** (slots, operands then results, then sizes when symbolic):
//! - `embed`: `table`, `ids`, `out`, then `n` (ids);
//! - `meta_prefix`: `meta`, `x`, `out`, then `rows = B·(M+T)`, `M+T`, `T`;
//! - `embed_meta_prefix`: `table`, `ids [B, T]`, `meta`, `out [B, M+T, H]`, then the same sizes.

use flashc_compiler::gir::{DType, Dim, Op, TensorType};

use super::elementwise::{Args, blocks, declare_block, grid3, udiv, urem};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Operand, Reg, Space, Special, Ty};

/// Threads per block.
pub const BLOCK: u32 = 128;

/// `embed (table [vocab, hidden], ids i32[n]) → [n, hidden]`.
pub fn embed(n: &Dim, vocab: u32, hidden: u32, dtype: DType) -> Result<Generated, CodegenError> {
    let mut g = Copy::new("embed", hidden, dtype)?;
    g.b.doc(format!("embed: {n} ids into a [{vocab}, {hidden}] {} table", dtype.name()));
    let table = g.args.ptr(&mut g.b, "table", 0);
    let ids = g.args.ptr(&mut g.b, "ids", 1);
    let out = g.args.ptr(&mut g.b, "out", 2);
    let rows = g.args.size(&mut g.b, "n", n);
    g.run(rows, n, out, |b, r| {
        let id = load_id(b, ids, r);
        let ok = b.setp(Cmp::Lt, Ty::U32, id.into(), vocab.into());
        (row_addr(b, table, id, g_row_bytes(hidden, dtype)), Some(ok))
    })
}

/// `meta_prefix (meta [m, hidden], x [B, T, hidden]) → [B, m + T, hidden]`.
pub fn meta_prefix(m: u32, batch: &Dim, t: &Dim, hidden: u32, dtype: DType) -> Result<Generated, CodegenError> {
    let mut g = Copy::new("meta_prefix", hidden, dtype)?;
    g.b.doc(format!("meta_prefix: {m} meta rows in front of each of {batch} sequences of {t} rows"));
    let meta = g.args.ptr(&mut g.b, "meta", 0);
    let x = g.args.ptr(&mut g.b, "x", 1);
    let out = g.args.ptr(&mut g.b, "out", 2);
    let mt = t.add(&Dim::constant(i64::from(m)));
    let rows_dim = batch.mul(&mt);
    let rows = g.args.size(&mut g.b, "rows", &rows_dim);
    let mt_op = g.args.size(&mut g.b, "mt", &mt);
    let t_op = g.args.size(&mut g.b, "t", t);
    let rb = g_row_bytes(hidden, dtype);
    g.run(rows, &rows_dim, out, |b, r| {
        let (bi, p) = (udiv(b, r, &mt, mt_op), urem(b, r, &mt, mt_op));
        let is_meta = b.setp(Cmp::Lt, Ty::U32, p.into(), m.into());
        // x row b·T + p − M (wraps for meta rows, where it is not used).
        let xr = b.mad(Ty::U32, bi.into(), t_op, p.into());
        let xr = b.bin(BinOp::Sub, Ty::U32, xr.into(), m.into());
        let ma = row_addr(b, meta, p, rb);
        let xa = row_addr(b, x, xr, rb);
        (b.selp(Ty::U64, ma.into(), xa.into(), is_meta), None)
    })
}

/// `embed` fused with `meta_prefix`: `(table [vocab, hidden], ids i32[B, T], meta [m, hidden]) →
/// [B, m + T, hidden]`.
pub fn embed_meta_prefix(
    m: u32,
    batch: &Dim,
    t: &Dim,
    vocab: u32,
    hidden: u32,
    dtype: DType,
) -> Result<Generated, CodegenError> {
    let mut g = Copy::new("embed_meta_prefix", hidden, dtype)?;
    g.b.doc(format!("embed_meta_prefix: {m} meta rows, then {t} embedded ids, for each of {batch} sequences"));
    let table = g.args.ptr(&mut g.b, "table", 0);
    let ids = g.args.ptr(&mut g.b, "ids", 1);
    let meta = g.args.ptr(&mut g.b, "meta", 2);
    let out = g.args.ptr(&mut g.b, "out", 3);
    let mt = t.add(&Dim::constant(i64::from(m)));
    let rows_dim = batch.mul(&mt);
    let rows = g.args.size(&mut g.b, "rows", &rows_dim);
    let mt_op = g.args.size(&mut g.b, "mt", &mt);
    let t_op = g.args.size(&mut g.b, "t", t);
    let rb = g_row_bytes(hidden, dtype);
    g.run(rows, &rows_dim, out, |b, r| {
        let (bi, p) = (udiv(b, r, &mt, mt_op), urem(b, r, &mt, mt_op));
        let is_meta = b.setp(Cmp::Lt, Ty::U32, p.into(), m.into());
        let id = b.mov(Ty::U32, 0u32.into());
        b.if_else(
            is_meta,
            |b| b.assign(id, p.into()),
            |b| {
                let xr = b.mad(Ty::U32, bi.into(), t_op, p.into());
                let xr = b.bin(BinOp::Sub, Ty::U32, xr.into(), m.into());
                let v = load_id(b, ids, xr);
                b.assign(id, v.into());
            },
        );
        let in_vocab = b.setp(Cmp::Lt, Ty::U32, id.into(), vocab.into());
        let ok = b.bin(BinOp::Or, Ty::Pred, is_meta.into(), in_vocab.into());
        let ma = row_addr(b, meta, id, rb);
        let ta = row_addr(b, table, id, rb);
        let src = b.selp(Ty::U64, ma.into(), ta.into(), is_meta);
        (src, Some(ok))
    })
}

/// The kernel of a gir `embed` or `meta_prefix` node.
pub fn for_op(op: &Op, operands: &[TensorType]) -> Result<Generated, CodegenError> {
    let shape =
        |i: usize| operands.get(i).ok_or_else(|| CodegenError::Shape(format!("`{}` lacks operand {i}", op.name())));
    let cst = |d: &Dim, what: &str| {
        d.as_const()
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| CodegenError::Shape(format!("{what} must be a constant, found {d}")))
    };
    match op {
        Op::Embed => {
            let table = shape(0)?;
            let ids = shape(1)?;
            if table.rank() != 2 {
                return Err(CodegenError::Shape(format!("embedding table {table}")));
            }
            embed(&ids.numel(), cst(&table.shape[0], "vocab")?, cst(&table.shape[1], "hidden")?, table.dtype)
        }
        Op::MetaPrefix => {
            let meta = shape(0)?;
            let x = shape(1)?;
            if meta.rank() != 2 || x.rank() != 3 {
                return Err(CodegenError::Shape(format!("meta_prefix of {meta} and {x}")));
            }
            meta_prefix(
                cst(&meta.shape[0], "meta tokens")?,
                &x.shape[0],
                &x.shape[1],
                cst(&x.shape[2], "hidden")?,
                x.dtype,
            )
        }
        other => Err(CodegenError::Unsupported(format!("`{}` as a gather", other.name()))),
    }
}

fn g_row_bytes(hidden: u32, dtype: DType) -> u32 {
    hidden * dtype.size() as u32
}

/// `base + row · row_bytes`.
fn row_addr(b: &mut Builder, base: Reg, row: Reg, row_bytes: u32) -> Reg {
    b.index(base, row, row_bytes)
}

/// `ids[i]` as u32 (a negative id becomes a huge one, so one unsigned compare checks both ends).
fn load_id(b: &mut Builder, ids: Reg, i: Reg) -> Reg {
    let a = b.index(ids, i, 4);
    b.ld(Space::Global, Ty::U32, Cache::ReadOnly, a.into(), 0)
}

/// A row-copy kernel under construction.
struct Copy {
    b: Builder,
    args: Args,
    /// Bytes per copy unit and units per row.
    unit: u32,
    units: u32,
    /// Threads per row and rows per block.
    tpr: u32,
    rpb: u32,
}

impl Copy {
    fn new(name: &str, hidden: u32, dtype: DType) -> Result<Copy, CodegenError> {
        if dtype == DType::I32 && name != "embed" {
            return Err(CodegenError::Unsupported(format!("{name} of i32 rows")));
        }
        let row_bytes = hidden * dtype.size() as u32;
        if row_bytes == 0 {
            return Err(CodegenError::Shape(format!("{name} of empty rows")));
        }
        let unit = [16u32, 8, 4, 2].into_iter().find(|u| row_bytes.is_multiple_of(*u)).unwrap_or(2);
        let units = row_bytes / unit;
        let tpr = units.next_power_of_two().min(BLOCK);
        let rpb = BLOCK / tpr;
        let mut b = Builder::new(format!("{name}_{}_{hidden}", dtype.name()));
        declare_block(&mut b, BLOCK);
        b.doc(format!(
            "row copy: {units} units of {unit} bytes per row, {tpr} threads per row, {rpb} rows per block of {BLOCK}"
        ));
        Ok(Copy { b, args: Args::default(), unit, units, tpr, rpb })
    }

    /// Emits the row loop: `source(b, row)` gives the source row address and, when rows can be
    /// invalid, a predicate that is false for them (an invalid row is written as zeros).
    fn run(
        mut self,
        rows: Operand,
        rows_dim: &Dim,
        out: Reg,
        source: impl FnOnce(&mut Builder, Reg) -> (Reg, Option<Reg>),
    ) -> Result<Generated, CodegenError> {
        let b = &mut self.b;
        let tid = b.special(Special::TidX);
        let ctaid = b.special(Special::CtaidX);
        let nctaid = b.special(Special::NctaidX);
        let sub = b.bin(BinOp::Shr, Ty::U32, tid.into(), self.tpr.trailing_zeros().into());
        let lane = b.bin(BinOp::And, Ty::B32, tid.into(), (self.tpr - 1).into());
        let r0 = b.mad(Ty::U32, ctaid.into(), self.rpb.into(), sub.into());
        let step = b.mul(Ty::U32, nctaid.into(), self.rpb.into());
        let (unit, units, tpr) = (self.unit, self.units, self.tpr);
        let row_bytes = unit * units;
        b.for_(Ty::U32, r0.into(), rows, step.into(), |b, r| {
            let (src, ok) = source(b, r);
            let dst = b.index(out, r, row_bytes);
            b.for_(Ty::U32, lane.into(), units.into(), tpr.into(), |b, u| {
                let off = b.bin(BinOp::MulWide, Ty::U32, u.into(), unit.into());
                let s = b.add(Ty::U64, src.into(), off.into());
                let d = b.add(Ty::U64, dst.into(), off.into());
                copy_unit(b, unit, s, d, ok);
            });
        });
        let kernel = self.b.finish();
        let grid = blocks(rows_dim, i64::from(self.rpb));
        let launch = LaunchRule { grid: grid3(grid), block: [BLOCK, 1, 1], dynamic_shared: 0, args: self.args.rules };
        Ok(Generated { kernel, launch })
    }
}

/// Copies one unit from `src` to `dst`, or writes zeros when `ok` is false.
fn copy_unit(b: &mut Builder, unit: u32, src: Reg, dst: Reg, ok: Option<Reg>) {
    let (ty, n) = match unit {
        16 => (Ty::B32, 4),
        8 => (Ty::B32, 2),
        4 => (Ty::B32, 1),
        _ => (Ty::B16, 1),
    };
    let ld = |b: &mut Builder| {
        if n == 1 {
            vec![b.ld(Space::Global, ty, Cache::ReadOnly, src.into(), 0)]
        } else {
            b.ld_vec(Space::Global, ty, Cache::ReadOnly, src.into(), 0, n)
        }
    };
    let vals: Vec<Reg> = match ok {
        None => ld(b),
        Some(ok) => {
            let vals: Vec<Reg> = (0..n).map(|_| b.mov(ty, 0u32.into())).collect();
            b.if_(ok, |b| {
                for (v, l) in vals.iter().zip(ld(b)) {
                    b.assign(*v, l.into());
                }
            });
            vals
        }
    };
    if n == 1 {
        b.st(Space::Global, ty, dst.into(), 0, vals[0].into());
    } else {
        b.st_vec(Space::Global, ty, dst.into(), 0, vals.iter().map(|r| (*r).into()).collect());
    }
}
