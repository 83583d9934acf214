//! Positions: `rope`.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_err, index_vec, shape_err};

/// Sizes of a `rope` operand `[batch, tokens, heads, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeDims {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub d: usize,
}

/// How the `d` channels of a head pair up for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Llama/NeoX: channel `i` pairs with `i + d/2`, both at frequency `i`.
    RotateHalf,
    /// GPT-J / original Meta: channel `2i` pairs with `2i + 1`, at frequency `i`.
    Interleaved,
}

/// The `d/2` inverse frequencies `theta^(−2i/d)`, computed in f64 and rounded to f32.
pub fn rope_inv_freq(d: usize, theta: f64) -> Vec<f32> {
    (0..d / 2).map(|i| theta.powf(-2.0 * i as f64 / d as f64) as f32).collect()
}

/// `rope (x [B, T, heads, d], start i32[B]) → out`: every head of token `t` of sequence `b` rotated by
/// position `p = start[b] + t`.
///
/// Numerics (the Hugging Face convention): the inverse frequencies `theta^(−2i/d)` are computed in f64
/// and rounded to f32 ([`rope_inv_freq`]); the angle is the f32 product `(p as f32) · inv_freq[i]`; its
/// cosine and sine are evaluated in f32. A pair `(x₁, x₂)` becomes `(x₁·cos − x₂·sin, x₂·cos + x₁·sin)`,
/// with the pairs of `style`. `d` must be even; a negative `start` is an error.
pub fn rope(dims: &RopeDims, x: &[f32], start: &[i32], style: RopeStyle, theta: f64, out: &mut [f32]) -> Result<()> {
    const OP: &str = "rope";
    let RopeDims { batch, tokens, heads, d } = *dims;
    check_dims(OP, "x", x.len(), &[batch, tokens, heads, d])?;
    check_len(OP, "out", out.len(), x.len())?;
    if d % 2 != 0 {
        return Err(shape_err(OP, format!("head width {d} is odd")));
    }
    let start = index_vec(OP, "start", start, batch, i32::MAX as usize)?;
    if x.is_empty() {
        return Ok(());
    }
    if start.iter().any(|&s| s.checked_add(tokens).is_none()) {
        return Err(index_err(OP, "start + T overflows"));
    }
    let inv = rope_inv_freq(d, theta);
    let half = d / 2;
    out.par_chunks_mut(heads * d).zip(x.par_chunks(heads * d)).enumerate().for_each(|(bt, (o, xt))| {
        let p = (start[bt / tokens] + bt % tokens) as f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv.iter().map(|&f| (p * f).sin_cos()).map(|(s, c)| (c, s)).unzip();
        for (oh, xh) in o.chunks_mut(d).zip(xt.chunks(d)) {
            for i in 0..half {
                let (a, b) = match style {
                    RopeStyle::RotateHalf => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (xh[a], xh[b]);
                oh[a] = x1 * cos[i] - x2 * sin[i];
                oh[b] = x2 * cos[i] + x1 * sin[i];
            }
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

    /// The rotation written from the formula in f64 (angle p·theta^(−2i/d)).
    fn naive(dims: &RopeDims, x: &[f32], start: &[i32], style: RopeStyle, theta: f64) -> Vec<f32> {
        let RopeDims { batch, tokens, heads, d } = *dims;
        let mut out = vec![0.0; x.len()];
        for b in 0..batch {
            for t in 0..tokens {
                let p = f64::from(start[b]) + t as f64;
                for h in 0..heads {
                    let base = ((b * tokens + t) * heads + h) * d;
                    for i in 0..d / 2 {
                        let ang = p * theta.powf(-2.0 * i as f64 / d as f64);
                        let (ia, ib) = match style {
                            RopeStyle::RotateHalf => (i, i + d / 2),
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        };
                        let (x1, x2) = (f64::from(x[base + ia]), f64::from(x[base + ib]));
                        out[base + ia] = (x1 * ang.cos() - x2 * ang.sin()) as f32;
                        out[base + ib] = (x2 * ang.cos() + x1 * ang.sin()) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rope_matches_formula_both_styles() {
        let mut rng = Rng::new(40);
        let dims = RopeDims { batch: 2, tokens: 5, heads: 3, d: 16 };
        let x = rng.normals(2 * 5 * 3 * 16, 1.0);
        // Small positions: the f32 angle product is then accurate to well under 1e-5.
        let start = [0, 7];
        for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
            let mut out = vec![f32::NAN; x.len()];
            rope(&dims, &x, &start, style, 10000.0, &mut out).unwrap();
            assert_close(&format!("rope {style:?}"), &out, &naive(&dims, &x, &start, style, 10000.0), 1e-5);
        }
    }

    #[test]
    fn rope_position_zero_is_identity_and_styles_differ() {
        let mut rng = Rng::new(41);
        let dims = RopeDims { batch: 1, tokens: 1, heads: 2, d: 8 };
        let x = rng.normals(16, 1.0);
        let mut out = vec![f32::NAN; 16];
        rope(&dims, &x, &[0], RopeStyle::RotateHalf, 500.0, &mut out).unwrap();
        assert_eq!(out, x);
        let mut a = vec![0.0; 16];
        let mut b = vec![0.0; 16];
        rope(&dims, &x, &[3], RopeStyle::RotateHalf, 500.0, &mut a).unwrap();
        rope(&dims, &x, &[3], RopeStyle::Interleaved, 500.0, &mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn rope_rejects_bad_operands() {
        let dims = RopeDims { batch: 2, tokens: 1, heads: 1, d: 4 };
        let x = vec![1.0; 8];
        let mut out = vec![0.0; 8];
        assert!(matches!(
            rope(&dims, &x, &[0, -1], RopeStyle::RotateHalf, 1e4, &mut out),
            Err(KernelError::Index { .. })
        ));
        assert!(matches!(rope(&dims, &x, &[0], RopeStyle::RotateHalf, 1e4, &mut out), Err(KernelError::Size { .. })));
        let odd = RopeDims { d: 3, heads: 1, tokens: 1, batch: 2 };
        assert!(matches!(
            rope(&odd, &x[..6], &[0, 0], RopeStyle::RotateHalf, 1e4, &mut out[..6]),
            Err(KernelError::Shape { .. })
        ));
        assert!(rope(&dims, &x, &[0, 0], RopeStyle::RotateHalf, 1e4, &mut out[1..]).is_err());
    }
}
