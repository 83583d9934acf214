//! Elementwise ops: broadcasting `add`/`mul`, the unary activations, `swiglu`, `clamp`.
//!
//! Unary kernels take `x` and an `out` of the same length; the math is f32 throughout.

use rayon::prelude::*;

use super::{Result, check_len, index_err, numel, shape_err, sigmoid_f32, silu_f32};

/// Right-aligned broadcasting of two shapes: missing leading dims count as 1, and a dim of size 1
/// stretches to the other operand's size; any other mismatch is an error.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            match (da, db) {
                _ if da == db => Ok(da),
                (1, _) => Ok(db),
                (_, 1) => Ok(da),
                _ => Err(shape_err("broadcast", format!("shapes {a:?} and {b:?} do not broadcast"))),
            }
        })
        .collect()
}

/// Strides of `shape` (right-aligned inside `out_shape`) in the index space of `out_shape`, with 0 for
/// the broadcast dims.
fn broadcast_strides(shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let offset = out_shape.len() - shape.len();
    let mut strides = vec![0; out_shape.len()];
    let mut step = 1;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 {
            strides[offset + i] = step;
        }
        step *= shape[i];
    }
    strides
}

/// Validates a broadcasting binary op and returns, for every output element, the pair of source indices.
fn broadcast_plan(
    op: &'static str,
    a_len: usize,
    a_shape: &[usize],
    b_len: usize,
    b_shape: &[usize],
    out_len: usize,
) -> Result<impl Fn(usize) -> (usize, usize) + Sync> {
    check_len(op, "a", a_len, numel(op, a_shape)?)?;
    check_len(op, "b", b_len, numel(op, b_shape)?)?;
    let out_shape = broadcast_shape(a_shape, b_shape).map_err(|e| shape_err(op, e.to_string()))?;
    check_len(op, "out", out_len, numel(op, &out_shape)?)?;
    let sa = broadcast_strides(a_shape, &out_shape);
    let sb = broadcast_strides(b_shape, &out_shape);
    Ok(move |flat: usize| {
        let (mut rest, mut ia, mut ib) = (flat, 0, 0);
        for d in (0..out_shape.len()).rev() {
            let i = rest % out_shape[d];
            rest /= out_shape[d];
            ia += i * sa[d];
            ib += i * sb[d];
        }
        (ia, ib)
    })
}

fn binary(
    op: &'static str,
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    out: &mut [f32],
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    let at = broadcast_plan(op, a.len(), a_shape, b.len(), b_shape, out.len())?;
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        let (ia, ib) = at(i);
        *o = f(a[ia], b[ib]);
    });
    Ok(())
}

/// `add (a, b) → out = a + b` with right-aligned broadcasting ([`broadcast_shape`]); `out` has the
/// broadcast shape.
pub fn add(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], out: &mut [f32]) -> Result<()> {
    binary("add", a, a_shape, b, b_shape, out, |x, y| x + y)
}

/// `add` on `i32` tensors: exact, and an overflow is an error (nothing written).
pub fn add_i32(a: &[i32], a_shape: &[usize], b: &[i32], b_shape: &[usize], out: &mut [i32]) -> Result<()> {
    const OP: &str = "add";
    let at = broadcast_plan(OP, a.len(), a_shape, b.len(), b_shape, out.len())?;
    let sums = (0..out.len())
        .map(|i| {
            let (ia, ib) = at(i);
            a[ia].checked_add(b[ib]).ok_or_else(|| index_err(OP, format!("{} + {} overflows i32", a[ia], b[ib])))
        })
        .collect::<Result<Vec<i32>>>()?;
    out.copy_from_slice(&sums);
    Ok(())
}

/// `mul (a, b) → out = a · b`, broadcasting like [`add`].
pub fn mul(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], out: &mut [f32]) -> Result<()> {
    binary("mul", a, a_shape, b, b_shape, out, |x, y| x * y)
}

fn unary(op: &'static str, x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) -> Result<()> {
    check_len(op, "out", out.len(), x.len())?;
    out.par_iter_mut().zip(x.par_iter()).for_each(|(o, &v)| *o = f(v));
    Ok(())
}

/// `scale (x) → factor · x`; the f64 attribute is rounded to f32 first, then multiplied in f32.
pub fn scale(x: &[f32], factor: f64, out: &mut [f32]) -> Result<()> {
    let f = factor as f32;
    unary("scale", x, out, |v| f * v)
}

/// `silu (x) → x · sigmoid(x)`.
pub fn silu(x: &[f32], out: &mut [f32]) -> Result<()> {
    unary("silu", x, out, silu_f32)
}

/// `softplus (x) → ln(1 + eˣ)`, evaluated as `max(x, 0) + ln(1 + e^(−|x|))` so that it neither overflows
/// for large `x` nor loses the small values for very negative `x`.
pub fn softplus(x: &[f32], out: &mut [f32]) -> Result<()> {
    unary("softplus", x, out, |v| v.max(0.0) + (-v.abs()).exp().ln_1p())
}

/// `exp (x) → eˣ`.
pub fn exp(x: &[f32], out: &mut [f32]) -> Result<()> {
    unary("exp", x, out, f32::exp)
}

/// `sigmoid (x) → 1 / (1 + e⁻ˣ)`, without overflow for either sign.
pub fn sigmoid(x: &[f32], out: &mut [f32]) -> Result<()> {
    unary("sigmoid", x, out, sigmoid_f32)
}

/// `neg (x) → −x`.
pub fn neg(x: &[f32], out: &mut [f32]) -> Result<()> {
    unary("neg", x, out, |v| -v)
}

/// `relu2 (x) → max(x, 0)²`.
pub fn relu2(x: &[f32], out: &mut [f32]) -> Result<()> {
    unary("relu2", x, out, |v| {
        let r = v.max(0.0);
        r * r
    })
}

/// `gelu (x) → 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))` (the tanh approximation).
pub fn gelu(x: &[f32], out: &mut [f32]) -> Result<()> {
    let c = (2.0 / std::f64::consts::PI).sqrt() as f32;
    unary("gelu", x, out, |v| 0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh()))
}

/// `swiglu (gate, up) → silu(gate) · up` (same lengths).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "swiglu";
    check_len(OP, "up", up.len(), gate.len())?;
    check_len(OP, "out", out.len(), gate.len())?;
    out.par_iter_mut().zip(gate.par_iter().zip(up.par_iter())).for_each(|(o, (&g, &u))| *o = silu_f32(g) * u);
    Ok(())
}

/// `clamp (x) → min(max(x, min), max)`; a missing bound does not clamp. A NaN input stays NaN (as in
/// PyTorch); when `min > max` every element becomes `max` (the order of the formula).
pub fn clamp(x: &[f32], min: Option<f64>, max: Option<f64>, out: &mut [f32]) -> Result<()> {
    let lo = min.map(|m| m as f32);
    let hi = max.map(|m| m as f32);
    unary("clamp", x, out, |v| {
        if v.is_nan() {
            return v;
        }
        let v = lo.map_or(v, |l| if v < l { l } else { v });
        hi.map_or(v, |h| if v > h { h } else { v })
    })
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    /// Naive broadcasting: index each operand by the output multi-index, clamping size-1 dims to 0.
    fn naive_binary(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize], f: fn(f64, f64) -> f64) -> Vec<f32> {
        let n = sa.len().max(sb.len());
        let pad = |s: &[usize]| {
            let mut p = vec![1; n - s.len()];
            p.extend_from_slice(s);
            p
        };
        let (pa, pb) = (pad(sa), pad(sb));
        let shape: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
        let total: usize = shape.iter().product();
        let flat = |s: &[usize], idx: &[usize]| {
            idx.iter().zip(s).fold(0, |acc, (&i, &d)| acc * d + if d == 1 { 0 } else { i })
        };
        (0..total)
            .map(|mut i| {
                let mut idx = vec![0; n];
                for d in (0..n).rev() {
                    idx[d] = i % shape[d];
                    i /= shape[d];
                }
                f(f64::from(a[flat(&pa, &idx)]), f64::from(b[flat(&pb, &idx)])) as f32
            })
            .collect()
    }

    #[test]
    fn add_and_mul_broadcast() {
        let mut rng = Rng::new(20);
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3, 4], &[2, 3, 4]),
            (&[2, 3, 4], &[4]),
            (&[4], &[2, 3, 4]),
            (&[2, 1, 4], &[3, 1]),
            (&[1], &[5, 2]),
            (&[2, 3, 1, 5], &[1, 3, 4, 1]),
            (&[], &[3]),
        ];
        for &(sa, sb) in cases {
            let a = rng.normals(sa.iter().product(), 1.0);
            let b = rng.normals(sb.iter().product(), 1.0);
            let shape = broadcast_shape(sa, sb).unwrap();
            let mut out = vec![f32::NAN; shape.iter().product()];
            add(&a, sa, &b, sb, &mut out).unwrap();
            assert_close("add", &out, &naive_binary(&a, sa, &b, sb, |x, y| x + y), 1e-6);
            mul(&a, sa, &b, sb, &mut out).unwrap();
            assert_close("mul", &out, &naive_binary(&a, sa, &b, sb, |x, y| x * y), 1e-6);
        }
    }

    #[test]
    fn add_i32_is_exact_and_checks_overflow() {
        let mut out = vec![0; 6];
        add_i32(&[1, 2, 3, 4, 5, 6], &[2, 3], &[10, 20, 30], &[3], &mut out).unwrap();
        assert_eq!(out, [11, 22, 33, 14, 25, 36]);
        let e = add_i32(&[i32::MAX], &[1], &[1], &[1], &mut out[..1]).unwrap_err();
        assert!(matches!(e, KernelError::Index { .. }));
    }

    #[test]
    fn broadcast_errors() {
        let mut out = vec![0.0; 6];
        assert!(matches!(add(&[0.0; 6], &[2, 3], &[0.0; 2], &[2], &mut out), Err(KernelError::Shape { .. })));
        assert!(matches!(add(&[0.0; 5], &[2, 3], &[0.0; 3], &[3], &mut out), Err(KernelError::Size { .. })));
        assert!(matches!(mul(&[0.0; 6], &[2, 3], &[0.0; 3], &[3], &mut out[..5]), Err(KernelError::Size { .. })));
    }

    #[test]
    fn unary_ops_match_formulas() {
        let mut rng = Rng::new(21);
        let mut x = rng.normals(257, 4.0);
        x.extend_from_slice(&[-100.0, -30.0, 30.0, 100.0, 0.0]);
        let n = x.len();
        let mut out = vec![f32::NAN; n];
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let check = |name: &str, out: &[f32], f: &dyn Fn(f64) -> f64| {
            let want: Vec<f32> = x.iter().map(|&v| f(f64::from(v)) as f32).collect();
            assert_close(name, out, &want, 1e-6);
        };
        scale(&x, 0.37, &mut out).unwrap();
        check("scale", &out, &|v| 0.37 * v);
        silu(&x, &mut out).unwrap();
        check("silu", &out, &|v| v * sig(v));
        softplus(&x, &mut out).unwrap();
        check("softplus", &out, &|v| if v > 30.0 { v } else { v.exp().ln_1p() });
        exp(&x[..257], &mut out[..257]).unwrap();
        let want: Vec<f32> = x[..257].iter().map(|&v| f64::from(v).exp() as f32).collect();
        assert_close("exp", &out[..257], &want, 1e-6);
        sigmoid(&x, &mut out).unwrap();
        check("sigmoid", &out, &sig);
        neg(&x, &mut out).unwrap();
        check("neg", &out, &|v| -v);
        relu2(&x, &mut out).unwrap();
        check("relu2", &out, &|v| v.max(0.0).powi(2));
        gelu(&x, &mut out).unwrap();
        let c = (2.0 / std::f64::consts::PI).sqrt();
        check("gelu", &out, &|v| 0.5 * v * (1.0 + (c * (v + 0.044715 * v.powi(3))).tanh()));
        clamp(&x, Some(-1.5), Some(2.0), &mut out).unwrap();
        check("clamp", &out, &|v| v.clamp(-1.5, 2.0));
        clamp(&x, None, Some(0.5), &mut out).unwrap();
        check("clamp max", &out, &|v| v.min(0.5));
        clamp(&x, Some(0.5), None, &mut out).unwrap();
        check("clamp min", &out, &|v| v.max(0.5));
        clamp(&x, None, None, &mut out).unwrap();
        check("clamp none", &out, &|v| v);
        // Softplus stays finite and exact at the extremes.
        softplus(&[-100.0, 100.0], &mut out[..2]).unwrap();
        assert!(out[0] > 0.0 && out[0] < 1e-40 && out[1] == 100.0);
        // NaN propagates through clamp.
        clamp(&[f32::NAN], Some(0.0), Some(1.0), &mut out[..1]).unwrap();
        assert!(out[0].is_nan());
    }

    #[test]
    fn swiglu_matches_formula() {
        let mut rng = Rng::new(22);
        let g = rng.normals(100, 3.0);
        let u = rng.normals(100, 1.0);
        let mut out = vec![f32::NAN; 100];
        swiglu(&g, &u, &mut out).unwrap();
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| {
                let a = f64::from(a);
                (a / (1.0 + (-a).exp()) * f64::from(b)) as f32
            })
            .collect();
        assert_close("swiglu", &out, &want, 1e-6);
        assert!(swiglu(&g, &u[1..], &mut out).is_err());
        assert!(swiglu(&g, &u, &mut out[1..]).is_err());
        assert!(silu(&g, &mut out[1..]).is_err());
    }
}
