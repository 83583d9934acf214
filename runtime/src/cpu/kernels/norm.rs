//! Normalisation: `rmsnorm`, `l2norm`, `gated_rmsnorm`, `row_norm_logits`.
//!
//! All reductions are f32 sums in index order; `eps` attributes are rounded to f32.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, shape_err, silu_f32};

/// `rmsnorm (x [rows, d], w [d]) → out = x · rsqrt(mean(x²) + eps) · w` over the last dim (`rows` is the
/// product of the leading dims; per-head norms pass `rows = tokens · heads`, `d = head width`).
pub fn rmsnorm(rows: usize, d: usize, x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) -> Result<()> {
    const OP: &str = "rmsnorm";
    check_dims(OP, "x", x.len(), &[rows, d])?;
    check_len(OP, "w", w.len(), d)?;
    check_len(OP, "out", out.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let eps = eps as f32;
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &wv) in o.iter_mut().zip(xr).zip(w) {
            *o = v * r * wv;
        }
    });
    Ok(())
}

/// `l2norm (x [rows, d]) → out = x · rsqrt(Σx² + eps)` over the last dim.
pub fn l2norm(rows: usize, d: usize, x: &[f32], eps: f64, out: &mut [f32]) -> Result<()> {
    const OP: &str = "l2norm";
    check_dims(OP, "x", x.len(), &[rows, d])?;
    check_len(OP, "out", out.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let eps = eps as f32;
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
        let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() + eps).sqrt();
        for (o, &v) in o.iter_mut().zip(xr) {
            *o = v * r;
        }
    });
    Ok(())
}

/// `gated_rmsnorm (y [rows, d], z [rows, d], w [d]) → out`, normalising each group of `group` consecutive
/// channels of the last dim on its own (`group` must divide `d`; `group = d` is one norm over the row):
/// - `norm_before_gate`: `out = rmsnorm(y) · w · silu(z)`;
/// - otherwise (Mamba2): `out = rmsnorm(y · silu(z)) · w`.
///
/// `rmsnorm` here is `v · rsqrt(mean over the group(v²) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn gated_rmsnorm(
    rows: usize,
    d: usize,
    y: &[f32],
    z: &[f32],
    w: &[f32],
    eps: f64,
    group: usize,
    norm_before_gate: bool,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "gated_rmsnorm";
    check_dims(OP, "y", y.len(), &[rows, d])?;
    check_len(OP, "z", z.len(), y.len())?;
    check_len(OP, "w", w.len(), d)?;
    check_len(OP, "out", out.len(), y.len())?;
    if group == 0 || !d.is_multiple_of(group) {
        return Err(shape_err(OP, format!("group {group} does not divide the width {d}")));
    }
    if y.is_empty() {
        return Ok(());
    }
    let eps = eps as f32;
    out.par_chunks_mut(group).zip(y.par_chunks(group).zip(z.par_chunks(group))).enumerate().for_each(
        |(gi, (o, (yg, zg)))| {
            let c0 = (gi * group) % d;
            let wg = &w[c0..c0 + group];
            if norm_before_gate {
                let r = 1.0 / (yg.iter().map(|v| v * v).sum::<f32>() / group as f32 + eps).sqrt();
                for i in 0..group {
                    o[i] = yg[i] * r * wg[i] * silu_f32(zg[i]);
                }
            } else {
                for i in 0..group {
                    o[i] = yg[i] * silu_f32(zg[i]);
                }
                let r = 1.0 / (o.iter().map(|v| v * v).sum::<f32>() / group as f32 + eps).sqrt();
                for i in 0..group {
                    o[i] = o[i] * r * wg[i];
                }
            }
        },
    );
    Ok(())
}

/// `row_norm_logits (logits [rows, V], w [V, H]) → out[r, v] = logits[r, v] / ‖w[v]‖₂` (f32). A zero row
/// of `w` gives ±inf or NaN, as the formula does.
pub fn row_norm_logits(
    rows: usize,
    vocab: usize,
    hidden: usize,
    logits: &[f32],
    w: &[f32],
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "row_norm_logits";
    check_dims(OP, "logits", logits.len(), &[rows, vocab])?;
    check_dims(OP, "w", w.len(), &[vocab, hidden])?;
    check_len(OP, "out", out.len(), logits.len())?;
    if logits.is_empty() {
        return Ok(());
    }
    let norms: Vec<f32> = if hidden == 0 {
        vec![0.0; vocab]
    } else {
        w.par_chunks(hidden).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect()
    };
    out.par_chunks_mut(vocab).zip(logits.par_chunks(vocab)).for_each(|(o, l)| {
        for ((o, &lv), &n) in o.iter_mut().zip(l).zip(&norms) {
            *o = lv / n;
        }
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    fn silu64(v: f64) -> f64 {
        v / (1.0 + (-v).exp())
    }

    #[test]
    fn rmsnorm_and_l2norm_match_formulas() {
        let mut rng = Rng::new(30);
        let (rows, d) = (7, 24);
        let x = rng.normals(rows * d, 2.0);
        let w = rng.normals(d, 1.0);
        let mut out = vec![f32::NAN; rows * d];
        rmsnorm(rows, d, &x, &w, 1e-6, &mut out).unwrap();
        let mut want = vec![0.0; rows * d];
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let ms: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                want[r * d + i] = (f64::from(row[i]) / (ms + 1e-6).sqrt() * f64::from(w[i])) as f32;
            }
        }
        assert_close("rmsnorm", &out, &want, 1e-6);

        l2norm(rows, d, &x, 1e-6, &mut out).unwrap();
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let ss: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum();
            for i in 0..d {
                want[r * d + i] = (f64::from(row[i]) / (ss + 1e-6).sqrt()) as f32;
            }
        }
        assert_close("l2norm", &out, &want, 1e-6);
        assert!(matches!(rmsnorm(rows, d, &x, &w[1..], 1e-6, &mut out), Err(KernelError::Size { .. })));
        assert!(matches!(rmsnorm(rows + 1, d, &x, &w, 1e-6, &mut out), Err(KernelError::Size { .. })));
        assert!(matches!(l2norm(rows, d, &x, 1e-6, &mut out[1..]), Err(KernelError::Size { .. })));
    }

    #[test]
    fn gated_rmsnorm_both_orders_per_group() {
        let mut rng = Rng::new(31);
        let (rows, d) = (5, 12);
        let y = rng.normals(rows * d, 1.5);
        let z = rng.normals(rows * d, 1.5);
        let w = rng.normals(d, 1.0);
        for group in [3, 4, 12] {
            for nbg in [false, true] {
                let mut out = vec![f32::NAN; rows * d];
                gated_rmsnorm(rows, d, &y, &z, &w, 1e-5, group, nbg, &mut out).unwrap();
                let mut want = vec![0.0f32; rows * d];
                for r in 0..rows {
                    for g0 in (0..d).step_by(group) {
                        let idx = |i: usize| r * d + g0 + i;
                        let v: Vec<f64> = (0..group)
                            .map(|i| {
                                let yv = f64::from(y[idx(i)]);
                                if nbg { yv } else { yv * silu64(f64::from(z[idx(i)])) }
                            })
                            .collect();
                        let ms = v.iter().map(|a| a * a).sum::<f64>() / group as f64;
                        for i in 0..group {
                            let mut o = v[i] / (ms + 1e-5).sqrt() * f64::from(w[g0 + i]);
                            if nbg {
                                o *= silu64(f64::from(z[idx(i)]));
                            }
                            want[idx(i)] = o as f32;
                        }
                    }
                }
                assert_close(&format!("gated_rmsnorm group {group} nbg {nbg}"), &out, &want, 1e-6);
            }
        }
        let mut out = vec![0.0; rows * d];
        for bad in [0, 5] {
            let e = gated_rmsnorm(rows, d, &y, &z, &w, 1e-5, bad, false, &mut out).unwrap_err();
            assert!(matches!(e, KernelError::Shape { .. }));
        }
        assert!(gated_rmsnorm(rows, d, &y, &z[1..], &w, 1e-5, 4, false, &mut out).is_err());
    }

    #[test]
    fn row_norm_logits_divides_by_row_norms() {
        let mut rng = Rng::new(32);
        let (rows, v, h) = (4, 9, 6);
        let logits = rng.normals(rows * v, 3.0);
        let w = rng.normals(v * h, 1.0);
        let mut out = vec![f32::NAN; rows * v];
        row_norm_logits(rows, v, h, &logits, &w, &mut out).unwrap();
        let want: Vec<f32> = (0..rows * v)
            .map(|i| {
                let vi = i % v;
                let n: f64 = w[vi * h..(vi + 1) * h].iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
                (f64::from(logits[i]) / n) as f32
            })
            .collect();
        assert_close("row_norm_logits", &out, &want, 1e-6);
        assert!(row_norm_logits(rows, v, h, &logits, &w[1..], &mut out).is_err());
    }
}
