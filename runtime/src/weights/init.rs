//! init: random weights following the reference initialisers, deterministic for a seed on every
//! machine (own generator, no platform randomness).
//!
//! | tensor | initialiser |
//! |---|---|
//! | embedding, LM head, every projection matrix | normal(0, 0.02) (`initializer_range`) |
//! | meta tokens | normal(0, 0.02) (the reference uses `randn`; scaled like the embedding so tiny models stay stable) |
//! | norm weights (layer, final, q/k, `o_norm`, gated norms) | 1 |
//! | biases (projections, convs) | 0 |
//! | conv weights `[C, K]` | uniform(−1/√K, 1/√K) (PyTorch's `Conv1d` default for depthwise convs) |
//! | Mamba2 / Gated DeltaNet `A_log` | log(uniform(1, 16)) |
//! | Mamba2 / Gated DeltaNet `dt_bias` | softplus⁻¹(dt), dt = exp(uniform(ln 1e-3, ln 0.1)) floored at 1e-4 |
//! | Mamba2 `D` | 1 |

use std::collections::BTreeMap;

use flashc_dsl::ModelSpec;
use flashc_dsl::manifest::{WeightRole, manifest};

use super::{Family, HostTensor, Weights};

/// SplitMix64: small, fast, and identical everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Random weights for `spec` from `seed`.
pub fn init(spec: &ModelSpec, seed: u64) -> Weights {
    let mut tensors = BTreeMap::new();
    for decl in manifest(spec) {
        // Each tensor gets its own stream, so adding a tensor does not change the others.
        let mut rng = Rng(seed ^ fnv(&decl.name));
        let shape: Vec<usize> = decl.shape.iter().map(|d| *d as usize).collect();
        let n: usize = shape.iter().product();
        let leaf = decl.name.rsplit('.').next().unwrap_or("");
        let data: Vec<f32> = match (decl.role, leaf) {
            (WeightRole::Norm, _) => vec![1.0; n],
            (WeightRole::Vector, "A_log") => (0..n).map(|_| (1.0 + 15.0 * rng.uniform()).ln() as f32).collect(),
            (WeightRole::Vector, "dt_bias") => (0..n)
                .map(|_| {
                    let (lo, hi) = (1e-3f64.ln(), 0.1f64.ln());
                    let dt = (lo + (hi - lo) * rng.uniform()).exp().max(1e-4);
                    // softplus⁻¹(dt) = dt + ln(1 − e^−dt)
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                })
                .collect(),
            (WeightRole::Vector, "D") => vec![1.0; n],
            (WeightRole::Vector, _) => vec![0.0; n],
            (WeightRole::Conv, _) => {
                let k = *shape.last().unwrap_or(&1) as f64;
                let bound = 1.0 / k.sqrt();
                (0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect()
            }
            _ => (0..n).map(|_| (0.02 * rng.normal()) as f32).collect(),
        };
        tensors.insert(decl.name, HostTensor { shape, data });
    }
    Weights::from_map(tensors, Family::Flashc)
}

/// FNV-1a, to derive a per-tensor stream from its name.
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
