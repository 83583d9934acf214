//! Short convolution: `conv1d` (prefill) and `conv1d_update` (one decode step).
//!
//! Both compute the causal depthwise cross-correlation of PyTorch's `Conv1d(groups = C)` with `K − 1`
//! positions of left context: `y[t, c] = bias[c] + Σ_{j<K} w[c, j] · e[t + j, c]`, where `e` is the
//! channel's inputs preceded by the `K − 1` inputs of its state (`state[c, 0]` the oldest). No activation
//! is applied here.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_vec, shape_err};

/// Sizes of a convolution: `batch` sequences of `tokens` new tokens with `channels` channels and width
/// `k` (the state holds `k − 1` inputs per channel). `conv1d_update` ignores `tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
    pub k: usize,
}

fn check_common(op: &'static str, dims: &ConvDims, w: &[f32], state: &[f32], bias: Option<&[f32]>) -> Result<()> {
    let ConvDims { batch, channels, k, .. } = *dims;
    if k == 0 {
        return Err(shape_err(op, "conv width must be positive"));
    }
    check_dims(op, "w", w.len(), &[channels, k])?;
    check_dims(op, "state", state.len(), &[batch, channels, k - 1])?;
    if let Some(bias) = bias {
        check_len(op, "bias", bias.len(), channels)?;
    }
    Ok(())
}

/// `conv1d (x [B, T, C], w [C, K], state [B, C, K−1], lens i32[B] [, bias [C]]) → (y [B, T, C], state')`.
///
/// The left context of sequence `b` is `state[b]` (the `K − 1` inputs before its first new token). `y` is
/// computed for all `T` tokens (padding positions `t ≥ lens[b]` just continue the convolution). `state` is
/// updated in place to the `K − 1` inputs before position `lens[b]`: the last `K − 1` entries of
/// `[state[b]; x[b, ..lens[b]]]`, so part of the old state survives when `lens[b] < K − 1`. `lens[b]`
/// must lie in `0 ..= T`.
pub fn conv1d(
    dims: &ConvDims,
    x: &[f32],
    w: &[f32],
    state: &mut [f32],
    lens: &[i32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "conv1d";
    let ConvDims { batch, tokens, channels, k } = *dims;
    check_common(OP, dims, w, state, bias)?;
    check_dims(OP, "x", x.len(), &[batch, tokens, channels])?;
    check_len(OP, "y", y.len(), x.len())?;
    let lens = index_vec(OP, "lens", lens, batch, tokens)?;
    let km1 = k - 1;
    if batch * channels == 0 {
        return Ok(());
    }
    let seq = tokens * channels;
    let srow = channels * km1;
    // One task per sequence: its outputs and its new state, copied out once all are computed.
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..batch)
        .into_par_iter()
        .map(|b| {
            let xb = &x[b * seq..(b + 1) * seq];
            let sb = &state[b * srow..(b + 1) * srow];
            // Extended input of channel c at extended index e (0 .. K−1 + T).
            let ext = |e: usize, c: usize| if e < km1 { sb[c * km1 + e] } else { xb[(e - km1) * channels + c] };
            let mut yb = vec![0.0f32; seq];
            for t in 0..tokens {
                for c in 0..channels {
                    let mut acc = bias.map_or(0.0, |bv| bv[c]);
                    for j in 0..k {
                        acc += w[c * k + j] * ext(t + j, c);
                    }
                    yb[t * channels + c] = acc;
                }
            }
            // New state: extended indices lens[b] .. lens[b] + K − 1.
            let new: Vec<f32> = (0..srow).map(|i| ext(lens[b] + i % km1, i / km1)).collect();
            (yb, new)
        })
        .collect();
    for (b, (yb, sb)) in results.into_iter().enumerate() {
        y[b * seq..(b + 1) * seq].copy_from_slice(&yb);
        state[b * srow..(b + 1) * srow].copy_from_slice(&sb);
    }
    Ok(())
}

/// `conv1d_update (x [B, C], w [C, K], state [B, C, K−1] [, bias [C]]) → (y [B, C], state')`: one decode
/// step, `y = bias + Σ_j w[c, j] · [state; x][j]`; `state` is rolled in place (oldest input dropped, `x`
/// appended).
pub fn conv1d_update(
    dims: &ConvDims,
    x: &[f32],
    w: &[f32],
    state: &mut [f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "conv1d_update";
    let ConvDims { batch, channels, k, .. } = *dims;
    check_common(OP, dims, w, state, bias)?;
    check_dims(OP, "x", x.len(), &[batch, channels])?;
    check_len(OP, "y", y.len(), x.len())?;
    let km1 = k - 1;
    if batch * channels == 0 {
        return Ok(());
    }
    let srow = channels * km1;
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..batch)
        .into_par_iter()
        .map(|b| {
            let mut yb = vec![0.0f32; channels];
            let mut sb = state[b * srow..(b + 1) * srow].to_vec();
            for c in 0..channels {
                let xv = x[b * channels + c];
                let s = &mut sb[c * km1..(c + 1) * km1];
                let wc = &w[c * k..(c + 1) * k];
                let mut acc = bias.map_or(0.0, |bv| bv[c]);
                for (wj, sj) in wc.iter().zip(s.iter()) {
                    acc += wj * sj;
                }
                acc += wc[km1] * xv;
                yb[c] = acc;
                if km1 > 0 {
                    s.rotate_left(1);
                    s[km1 - 1] = xv;
                }
            }
            (yb, sb)
        })
        .collect();
    for (b, (yb, sb)) in results.into_iter().enumerate() {
        y[b * channels..(b + 1) * channels].copy_from_slice(&yb);
        state[b * srow..(b + 1) * srow].copy_from_slice(&sb);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    /// Direct formula: y[t] = bias + Σ_j w[j]·in(t − (K−1) + j), in(p < 0) = state[K−1+p].
    fn naive(
        dims: &ConvDims,
        x: &[f32],
        w: &[f32],
        state: &[f32],
        lens: &[i32],
        bias: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let ConvDims { batch, tokens, channels, k } = *dims;
        let mut y = vec![0.0f32; x.len()];
        let mut st = vec![0.0f32; state.len()];
        for b in 0..batch {
            for c in 0..channels {
                let input = |p: isize| -> f64 {
                    if p < 0 {
                        f64::from(state[(b * channels + c) * (k - 1) + (k as isize - 1 + p) as usize])
                    } else {
                        f64::from(x[(b * tokens + p as usize) * channels + c])
                    }
                };
                for t in 0..tokens {
                    let mut acc = bias.map_or(0.0, |bv| f64::from(bv[c]));
                    for j in 0..k {
                        acc += f64::from(w[c * k + j]) * input(t as isize - (k as isize - 1) + j as isize);
                    }
                    y[(b * tokens + t) * channels + c] = acc as f32;
                }
                for i in 0..k - 1 {
                    st[(b * channels + c) * (k - 1) + i] =
                        input(lens[b] as isize - (k as isize - 1) + i as isize) as f32;
                }
            }
        }
        (y, st)
    }

    #[test]
    fn conv1d_matches_formula() {
        let mut rng = Rng::new(50);
        for &(batch, tokens, channels, k) in &[(3, 6, 5, 4), (2, 2, 3, 4), (1, 5, 2, 1), (2, 7, 4, 2)] {
            let dims = ConvDims { batch, tokens, channels, k };
            let x = rng.normals(batch * tokens * channels, 1.0);
            let w = rng.normals(channels * k, 1.0);
            let bias = rng.normals(channels, 1.0);
            let state0 = rng.normals(batch * channels * (k - 1), 1.0);
            // Different lens per sequence, including 0, < K−1 and T.
            let lens: Vec<i32> = (0..batch).map(|b| [tokens, 0, 1.min(tokens)][b % 3] as i32).collect();
            for with_bias in [false, true] {
                let bias = with_bias.then_some(&bias[..]);
                let mut state = state0.clone();
                let mut y = vec![f32::NAN; x.len()];
                conv1d(&dims, &x, &w, &mut state, &lens, bias, &mut y).unwrap();
                let (wy, ws) = naive(&dims, &x, &w, &state0, &lens, bias);
                assert_close("conv1d y", &y, &wy, 1e-6);
                assert_eq!(state, ws, "conv1d state {dims:?}");
            }
        }
    }

    #[test]
    fn conv1d_update_steps_equal_conv1d() {
        let mut rng = Rng::new(51);
        let dims = ConvDims { batch: 2, tokens: 6, channels: 5, k: 4 };
        let x = rng.normals(2 * 6 * 5, 1.0);
        let w = rng.normals(5 * 4, 1.0);
        let bias = rng.normals(5, 1.0);
        let state0 = rng.normals(2 * 5 * 3, 1.0);
        let mut s_scan = state0.clone();
        let mut y_scan = vec![0.0; x.len()];
        conv1d(&dims, &x, &w, &mut s_scan, &[6, 6], Some(&bias), &mut y_scan).unwrap();
        let mut s_step = state0.clone();
        let mut y_step = vec![0.0; x.len()];
        for t in 0..6 {
            let xt: Vec<f32> = (0..2).flat_map(|b| x[(b * 6 + t) * 5..(b * 6 + t + 1) * 5].to_vec()).collect();
            let mut yt = vec![f32::NAN; 10];
            conv1d_update(&dims, &xt, &w, &mut s_step, Some(&bias), &mut yt).unwrap();
            for b in 0..2 {
                y_step[(b * 6 + t) * 5..(b * 6 + t + 1) * 5].copy_from_slice(&yt[b * 5..(b + 1) * 5]);
            }
        }
        assert_close("conv1d_update y", &y_step, &y_scan, 1e-6);
        assert_close("conv1d_update state", &s_step, &s_scan, 1e-7);
    }

    #[test]
    fn conv1d_split_prefill_equals_one_call() {
        let mut rng = Rng::new(52);
        let (batch, tokens, channels, k) = (2, 9, 3, 4);
        let x = rng.normals(batch * tokens * channels, 1.0);
        let w = rng.normals(channels * k, 1.0);
        let state0 = rng.normals(batch * channels * (k - 1), 1.0);
        let mut s_full = state0.clone();
        let mut y_full = vec![0.0; x.len()];
        conv1d(&ConvDims { batch, tokens, channels, k }, &x, &w, &mut s_full, &[9, 9], None, &mut y_full).unwrap();
        // Split 2 + 7 (the first part shorter than K − 1).
        let t1 = 2;
        let part = |lo: usize, hi: usize| -> Vec<f32> {
            (0..batch).flat_map(|b| x[(b * tokens + lo) * channels..(b * tokens + hi) * channels].to_vec()).collect()
        };
        let mut s = state0.clone();
        let mut y1 = vec![0.0; batch * t1 * channels];
        conv1d(&ConvDims { batch, tokens: t1, channels, k }, &part(0, t1), &w, &mut s, &[2, 2], None, &mut y1).unwrap();
        let mut y2 = vec![0.0; batch * (tokens - t1) * channels];
        let d2 = ConvDims { batch, tokens: tokens - t1, channels, k };
        conv1d(&d2, &part(t1, tokens), &w, &mut s, &[7, 7], None, &mut y2).unwrap();
        let mut y = Vec::new();
        for b in 0..batch {
            y.extend_from_slice(&y1[b * t1 * channels..(b + 1) * t1 * channels]);
            y.extend_from_slice(&y2[b * (tokens - t1) * channels..(b + 1) * (tokens - t1) * channels]);
        }
        assert_close("conv1d split y", &y, &y_full, 1e-6);
        assert_eq!(s, s_full);
    }

    #[test]
    fn conv1d_rejects_bad_operands() {
        let dims = ConvDims { batch: 2, tokens: 3, channels: 2, k: 3 };
        let x = vec![1.0; 12];
        let w = vec![1.0; 6];
        let mut state = vec![0.5; 8];
        let mut y = vec![0.0; 12];
        let e = conv1d(&dims, &x, &w, &mut state, &[3, 4], None, &mut y).unwrap_err();
        assert!(matches!(e, KernelError::Index { .. }));
        let e = conv1d(&dims, &x, &w, &mut state, &[3, -1], None, &mut y).unwrap_err();
        assert!(matches!(e, KernelError::Index { .. }));
        assert!(state.iter().all(|&s| s == 0.5) && y.iter().all(|&v| v == 0.0));
        assert!(conv1d(&dims, &x, &w, &mut state[1..], &[3, 3], None, &mut y).is_err());
        assert!(conv1d(&dims, &x, &w, &mut state, &[3, 3], Some(&[1.0]), &mut y).is_err());
        assert!(conv1d(&dims, &x, &w[1..], &mut state, &[3, 3], None, &mut y).is_err());
        assert!(conv1d(&ConvDims { k: 0, ..dims }, &x, &[], &mut [], &[3, 3], None, &mut y).is_err());
        assert!(conv1d_update(&dims, &x[..3], &w, &mut state, None, &mut y[..3]).is_err());
        assert!(conv1d_update(&dims, &x[..4], &w, &mut state, None, &mut y[..3]).is_err());
    }
}
