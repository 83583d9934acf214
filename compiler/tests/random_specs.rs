//! Property test: random valid models (random operator mix and sizes, written as `.arch` text) lower
//! in every mode and pass through the whole pipeline with the verifier holding after every pass.

use flashc_compiler::gir::Mode;
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{pipeline, run_passes};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    fn flag(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// One random model as `.arch` text.
fn random_model(seed: u64) -> String {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let hidden = r.pick(&[32u64, 48, 64, 96, 128]);
    let mut ops = Vec::new();
    for k in 0..1 + r.below(5) {
        let op = match r.below(4) {
            0 => {
                let heads = r.pick(
                    &divisors(hidden)
                        .into_iter()
                        .filter(|h| (hidden / h).is_multiple_of(2) && *h <= 8)
                        .collect::<Vec<_>>(),
                );
                let kv = r.pick(&divisors(heads));
                let window = if r.flag() { format!(", window = {}", 1 + r.below(16)) } else { String::new() };
                let rope = match r.below(3) {
                    0 => ", rope = none".to_string(),
                    1 => format!(", rope = rope(theta = {})", 1000 + r.below(100_000)),
                    _ => String::new(),
                };
                let qk = if r.flag() { ", qk_norm = true" } else { "" };
                let bias = if r.flag() { ", qkv_bias = true, out_bias = true" } else { "" };
                format!("attention(heads = {heads}, kv_heads = {kv}{window}{rope}{qk}{bias})")
            }
            1 => {
                let heads = r.pick(&divisors(hidden).into_iter().filter(|h| *h <= 8).collect::<Vec<_>>());
                let gated = if r.flag() { ", gated = true" } else { "" };
                let conv = 2 + r.below(3);
                format!("deltanet(heads = {heads}, conv = {conv}{gated})")
            }
            2 => {
                let inner = hidden * r.pick(&[1u64, 2]);
                let head_dim = r.pick(&divisors(inner).into_iter().filter(|d| *d >= 4 && *d <= 32).collect::<Vec<_>>());
                let heads = inner / head_dim;
                let groups = r.pick(&divisors(heads).into_iter().filter(|g| *g <= 4).collect::<Vec<_>>());
                let state = r.pick(&[4u64, 8, 16]);
                let dt = if r.flag() { ", dt_min = 0.001, dt_max = 0.1" } else { "" };
                format!(
                    "mamba2(state = {state}, inner = {inner}, head_dim = {head_dim}, groups = {groups}, chunk = {}{dt})",
                    1 + r.below(64)
                )
            }
            _ => {
                let act = r.pick(&["swiglu", "relu2", "gelu"]);
                let bias = if r.flag() { ", bias = true" } else { "" };
                format!("ffn(inner = {}, act = {act}{bias})", 8 * (1 + r.below(32)))
            }
        };
        ops.push((format!("O{k}"), op));
    }
    let layers: Vec<String> = (0..1 + r.below(8)).map(|_| ops[r.below(ops.len() as u64) as usize].0.clone()).collect();
    let mut text = format!(
        "model r{seed} {{\n  vocab = {}\n  hidden = {hidden}\n  tie_embeddings = {}\n  meta_tokens = {}\n  logits = {}\n  dtype = {}\n  max_seq = {}\n",
        16 + r.below(300),
        r.flag(),
        r.pick(&[0u64, 0, 1, 3]),
        r.pick(&["plain", "row_normalized"]),
        r.pick(&["bf16", "f16", "f32"]),
        64 + r.below(512),
    );
    for (name, op) in &ops {
        text.push_str(&format!("  op {name} = {op}\n"));
    }
    text.push_str(&format!("  layers = [{}]\n}}\n", layers.join(", ")));
    text
}

#[test]
fn random_models_pass_the_pipeline_with_the_verifier_holding() {
    for seed in 0..60 {
        let text = random_model(seed);
        let spec = match flashc_dsl::load(&text) {
            Ok((spec, _)) => spec,
            Err(d) => panic!("seed {seed}: generated an invalid model:\n{text}\n{d:?}"),
        };
        for mode in Mode::ALL {
            let mut g =
                lower(&spec, &LowerOptions::new(mode)).unwrap_or_else(|e| panic!("seed {seed} {mode:?}: {e}\n{text}"));
            if let Err(e) = run_passes(&mut g, &pipeline(mode), true, &mut |_, _| {}) {
                panic!("seed {seed} {mode:?}:\n{text}\n{e}");
            }
        }
    }
}
