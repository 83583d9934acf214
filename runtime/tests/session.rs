//! Whole models on the `cpu` device: incremental decode equals full prefill at every position, batches
//! of different lengths equal single sequences, the cached meta-token prefix equals recomputing it.

use flashc_compiler::gir::{Bindings, Mode};
use flashc_compiler::lower::LowerOptions;
use flashc_runtime::cpu::Cpu;
use flashc_runtime::device::{Device, HostData};
use flashc_runtime::model::{Entry, Model, compile, execute};
use flashc_runtime::session::Session;
use flashc_runtime::weights::init;

fn example(name: &str) -> flashc_dsl::ModelSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
    let src = std::fs::read_to_string(&path).expect("example");
    flashc_dsl::load(&src).expect("valid").0
}

/// A small model with every operator kind, a sliding window shorter than the test sequences, meta
/// tokens and chunks shorter than the prompts.
const ALL_OPS: &str = "model all_ops {
  vocab = 97
  hidden = 32
  meta_tokens = 3
  max_seq = 64
  logits = row_normalized
  dtype = f32
  op A = attention(heads = 4, kv_heads = 2, qk_norm = true)
  op W = attention(heads = 2, window = 5, rope = none, qkv_bias = true)
  op D = deltanet(heads = 2)
  op G = deltanet(heads = 2, gated = true)
  op M = mamba2(state = 8, head_dim = 8, groups = 2, chunk = 4, dt_max = 0.2)
  op F = ffn(inner = 48)
  op R = ffn(inner = 40, act = relu2)
  layers = [A, F, D, W, M, R, G, F]
}";

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn tokens(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503)) % vocab).collect()
}

struct Fixture {
    model: Model,
}

fn fixture(spec: flashc_dsl::ModelSpec, seed: u64) -> Fixture {
    let w = init(&spec, seed);
    let model = Model::new(&Cpu, spec, w).expect("compile");
    Fixture { model }
}

#[test]
fn decode_after_prefill_matches_prefill_of_the_whole_sequence() {
    let fx = fixture(flashc_dsl::load(ALL_OPS).expect("valid").0, 11);
    let vocab = fx.model.spec.vocab as usize;
    let seq = tokens(7, 14, 97);
    // One prefill over all 14 tokens.
    let mut full = Session::new(&Cpu, &fx.model, 1).expect("session");
    let all = full.prefill(std::slice::from_ref(&seq)).expect("prefill").remove(0);
    // Prefill 6 tokens, then decode the other 8 one at a time.
    let mut inc = Session::new(&Cpu, &fx.model, 1).expect("session");
    let first = inc.prefill(&[seq[..6].to_vec()]).expect("prefill").remove(0);
    assert!(rel_err(&first, &all[..6 * vocab]) < 1e-5, "prefill rows");
    for (i, t) in seq[6..].iter().enumerate() {
        let pos = 6 + i;
        let logits = inc.decode(&[*t]).expect("decode").remove(0);
        let want = &all[pos * vocab..(pos + 1) * vocab];
        let e = rel_err(&logits, want);
        assert!(e < 1e-4, "position {pos}: relative error {e}");
    }
    // A second prefill continues from the decoded state.
    assert!(all.iter().all(|x| x.is_finite()));
}

#[test]
fn a_batch_of_different_lengths_equals_each_sequence_alone() {
    let fx = fixture(flashc_dsl::load(ALL_OPS).expect("valid").0, 12);
    let vocab = fx.model.spec.vocab as usize;
    let prompts = vec![tokens(1, 9, 97), tokens(2, 4, 97), tokens(3, 13, 97)];
    let mut batch = Session::new(&Cpu, &fx.model, 3).expect("session");
    let got = batch.prefill(&prompts).expect("prefill");
    let next = batch.decode(&[5, 6, 7]).expect("decode");
    for (b, p) in prompts.iter().enumerate() {
        let mut one = Session::new(&Cpu, &fx.model, 1).expect("session");
        let want = one.prefill(std::slice::from_ref(p)).expect("prefill").remove(0);
        assert!(rel_err(&got[b], &want) < 1e-5, "sequence {b} prefill");
        let want_next = one.decode(&[[5, 6, 7][b]]).expect("decode").remove(0);
        let e = rel_err(&next[b], &want_next);
        assert!(e < 1e-5, "sequence {b} decode: {e}");
        assert_eq!(got[b].len(), p.len() * vocab);
    }
}

#[test]
fn the_cached_meta_prefix_equals_recomputing_it() {
    let spec = flashc_dsl::load(ALL_OPS).expect("valid").0;
    let fx = fixture(spec.clone(), 13);
    let seq = tokens(9, 10, 97);
    let mut s = Session::new(&Cpu, &fx.model, 1).expect("session");
    let cached = s.prefill(std::slice::from_ref(&seq)).expect("prefill").remove(0);
    // Recompute: the prefill program with the meta tokens prepended, from empty states.
    let program = compile(&spec, &LowerOptions { mode: Mode::Prefill, prepend_meta: true }).expect("compile");
    let entry = Entry::from_program(&Cpu, &fx.model, program).expect("entry");
    let m = spec.meta_tokens as i32;
    let at = Bindings { b: 1, t: seq.len() as i64, s: 0 };
    let mut mem = fx.model.instantiate(&Cpu, &entry, &at).expect("memory");
    let p = &entry.program;
    let find = |n: &str| p.buffers.iter().find(|b| b.name == n).map(|b| b.id).expect("input");
    Cpu.upload(&mut mem, find("tokens"), HostData::I32(seq.iter().map(|t| *t as i32).collect())).unwrap();
    Cpu.upload(&mut mem, find("start"), HostData::I32(vec![0])).unwrap();
    Cpu.upload(&mut mem, find("lens"), HostData::I32(vec![m + seq.len() as i32])).unwrap();
    execute(&Cpu, p, &mut mem).expect("run");
    let out = p.outputs.iter().find(|(n, _)| n == "logits").map(|(_, b)| *b).expect("logits");
    let recomputed = Cpu.download(p, &mem, out).expect("download").into_f32().expect("f32");
    let e = rel_err(&cached, &recomputed);
    assert!(e < 1e-5, "cached prefix vs recomputed: {e}");
}

#[test]
fn tiny_hybrid_runs_and_bad_requests_are_errors() {
    let fx = fixture(example("tiny-hybrid.arch"), 1);
    let mut s = Session::new(&Cpu, &fx.model, 2).expect("session");
    let out = s.prefill(&[vec![1, 2, 3], vec![4, 5]]).expect("prefill");
    assert!(out.iter().flatten().all(|x| x.is_finite()));
    assert!(s.decode(&[1]).is_err(), "wrong number of tokens");
    assert!(s.decode(&[1, 100_000]).is_err(), "token outside the vocabulary");
    assert!(s.prefill(&[vec![1]]).is_err(), "wrong number of prompts");
    let too_long = vec![1u32; fx.model.spec.max_seq as usize + 1];
    assert!(s.prefill(&[too_long, vec![1]]).is_err(), "longer than max_seq");
    assert!(Session::new(&Cpu, &fx.model, 0).is_err());
}
