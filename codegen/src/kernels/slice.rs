//! slice: a range `[start, start + len)` along one axis of a row-major tensor, copied into a contiguous
//! buffer (`slice` before a projection: the logits head of prefill reads the tokens after the meta
//! prefix).
//!
//! **Shape.** The input is viewed as `[outer, S, inner]` around the sliced axis (`S` its length), the
//! output as `[outer, len, inner]`; every size may be symbolic. Output vector `j` (of `V` elements)
//! reads input vector `(j / (len·inner/V))·(S·inner/V) + start·inner/V + j % (len·inner/V)`.
//!
//! **Tiling.** One-dimensional grid-stride loop, 256 threads, one vector of `V` elements per thread and
//! step: `V` is the largest power of two up to 16 bytes that divides `inner` when `inner` is constant
//! (else 1). Storage bf16 or f32, copied exactly (through f32, which is exact for both).
//!
//! **Parameters.** `x`, `out`, then the symbolic sizes (`n` vectors, `len·inner/V`, `S·inner/V`,
//! `start·inner/V`).

use flashc_compiler::gir::{DType, Dim};
use flashc_compiler::schedule::BufferId;

use super::elementwise::{Args, Elem, blocks, declare_block, grid3, load, store, udiv, urem};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{Builder, Cache, Special, Ty};

/// Threads per block.
pub const BLOCK: u32 = 256;

/// A slice to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceSpec {
    pub name: String,
    pub dtype: DType,
    /// The input's shape.
    pub shape: Vec<Dim>,
    pub axis: usize,
    pub start: Dim,
    pub len: Dim,
    pub x: BufferId,
    pub out: BufferId,
}

/// Generates the copy (see the module doc).
pub fn slice(spec: &SliceSpec) -> Result<Generated, CodegenError> {
    let e = Elem::of(spec.dtype, "a slice")?;
    if spec.axis >= spec.shape.len() {
        return Err(CodegenError::Shape(format!("slice axis {} of a rank-{} tensor", spec.axis, spec.shape.len())));
    }
    let outer = Dim::product(&spec.shape[..spec.axis]);
    let s = spec.shape[spec.axis].clone();
    let inner = Dim::product(&spec.shape[spec.axis + 1..]);
    let mut v = 16 / e.bytes();
    match inner.as_const() {
        Some(c) => {
            while v > 1 && c % i64::from(v) != 0 {
                v /= 2;
            }
        }
        None => v = 1,
    }
    let vi = |d: &Dim| d.mul(&inner).div_exact(i64::from(v)).unwrap_or_else(|| d.mul(&inner));
    let (len_v, s_v, start_v) = (vi(&spec.len), vi(&s), vi(&spec.start));
    let n = outer.mul(&len_v);

    let mut b = Builder::new(&spec.name);
    declare_block(&mut b, BLOCK);
    b.doc(format!("slice [{}, +{}) of axis {} of {} {:?}", spec.start, spec.len, spec.axis, e.name(), spec.shape));
    b.doc(format!("grid-stride copy, {BLOCK} threads, {v} element(s) per thread and step"));
    let mut args = Args::default();
    let x = args.ptr(&mut b, "x", spec.x.0);
    let out = args.ptr(&mut b, "out", spec.out.0);
    let n_op = args.size(&mut b, "n", &n);
    let len_op = args.size(&mut b, "len_v", &len_v);
    let s_op = args.size(&mut b, "s_v", &s_v);
    let start_op = args.size(&mut b, "start_v", &start_v);
    let gtid = b.global_index_x();
    let ntid = b.special(Special::NtidX);
    let nctaid = b.special(Special::NctaidX);
    let stride = b.mul(Ty::U32, ntid.into(), nctaid.into());
    b.for_(Ty::U32, gtid.into(), n_op, stride.into(), |b, j| {
        let q = udiv(b, j, &len_v, len_op);
        let r = urem(b, j, &len_v, len_op);
        let src = b.mad(Ty::U32, q.into(), s_op, r.into());
        let src = b.add(Ty::U32, src.into(), start_op);
        let sa = b.index(x, src, v * e.bytes());
        let vals = load(b, e, Cache::None, sa, 0, v as usize);
        let da = b.index(out, j, v * e.bytes());
        store(b, e, da, 0, &vals);
    });
    let kernel = b.finish();
    Ok(Generated {
        kernel,
        launch: LaunchRule {
            grid: grid3(blocks(&n, i64::from(BLOCK))),
            block: [BLOCK, 1, 1],
            dynamic_shared: 0,
            args: args.rules,
        },
    })
}
