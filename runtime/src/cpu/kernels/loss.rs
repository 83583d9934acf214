//! Loss: `cross_entropy`.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_err};

/// `cross_entropy (logits [rows, V], targets i32[rows]) → out f32[1]`: the mean over the rows whose
/// target is `≥ 0` of `logsumexp(logits[r]) − logits[r, target]`; negative targets are ignored, and a
/// target `≥ V` is an error. The log-sum-exp is the stable `max + ln Σ exp(x − max)` in f32; the per-row
/// losses are summed in f64 before the mean. With no counted row the loss is 0 (not NaN).
pub fn cross_entropy(rows: usize, vocab: usize, logits: &[f32], targets: &[i32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "cross_entropy";
    check_dims(OP, "logits", logits.len(), &[rows, vocab])?;
    check_len(OP, "targets", targets.len(), rows)?;
    check_len(OP, "out", out.len(), 1)?;
    for (r, &t) in targets.iter().enumerate() {
        if usize::try_from(t).is_ok_and(|t| t >= vocab) {
            return Err(index_err(OP, format!("targets[{r}] = {t} is outside 0..{vocab}")));
        }
    }
    if rows == 0 || vocab == 0 {
        out[0] = 0.0;
        return Ok(());
    }
    let (sum, count) = logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .filter(|(_, t)| **t >= 0)
        .map(|(row, &t)| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            (f64::from(lse - row[t as usize]), 1usize)
        })
        .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    out[0] = if count == 0 { 0.0 } else { (sum / count as f64) as f32 };
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    #[test]
    fn cross_entropy_matches_formula() {
        let mut rng = Rng::new(90);
        let (rows, v) = (9, 13);
        let mut logits = rng.normals(rows * v, 3.0);
        logits[5] = 80.0; // large logits stay stable
        let targets: Vec<i32> = (0..rows).map(|r| if r % 4 == 3 { -100 } else { rng.below(v) as i32 }).collect();
        let mut out = [f32::NAN];
        cross_entropy(rows, v, &logits, &targets, &mut out).unwrap();
        let (mut sum, mut n) = (0.0f64, 0);
        for r in 0..rows {
            if targets[r] < 0 {
                continue;
            }
            let row: Vec<f64> = logits[r * v..(r + 1) * v].iter().map(|&x| x.into()).collect();
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            sum += lse - row[targets[r] as usize];
            n += 1;
        }
        assert_close("cross_entropy", &out, &[(sum / f64::from(n)) as f32], 1e-6);
    }

    #[test]
    fn cross_entropy_edge_cases() {
        let logits = [1.0, 2.0, 3.0, 4.0];
        let mut out = [f32::NAN];
        cross_entropy(2, 2, &logits, &[-1, -1], &mut out).unwrap();
        assert_eq!(out[0], 0.0);
        assert!(matches!(cross_entropy(2, 2, &logits, &[0, 2], &mut out), Err(KernelError::Index { .. })));
        assert!(matches!(cross_entropy(2, 2, &logits, &[0], &mut out), Err(KernelError::Size { .. })));
        assert!(matches!(cross_entropy(2, 2, &logits[1..], &[0, 1], &mut out), Err(KernelError::Size { .. })));
        assert!(matches!(cross_entropy(2, 2, &logits, &[0, 1], &mut []), Err(KernelError::Size { .. })));
    }
}
