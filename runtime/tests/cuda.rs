//! The `cuda` device. Without a driver: a clear error, never a panic, and every GPU test prints
//! `skipped: no CUDA driver` and passes (it fails with `FLASHC_REQUIRE_GPU=1`). With a driver:
//! - every kernel group the dispatcher generates for `examples/tiny-hybrid.arch` in bf16, run on the
//!   GPU on the operands the cpu saw at that point of the same step, gives the cpu's results
//!   (relative L2 < 2e-2, as on the sim in `sim_programs.rs`); groups without a generator are
//!   skipped and named;
//! - whole sessions on tiny-hybrid (skipped, naming the groups, while some have no GPU kernel) and
//!   on its attention and FFN layers alone: prefill and decode steps on the GPU give the cpu's
//!   logits (relative error < 1e-2), and decode after prefill gives the logits of a prefill of the
//!   whole sequence (< 2e-2: two bf16 paths).

use std::sync::OnceLock;

use flashc_compiler::gir::{Bindings, DType, Mode};
use flashc_compiler::schedule::{BufferId, BufferKind, Program};
use flashc_runtime::cpu::Cpu;
use flashc_runtime::cuda::{Cuda, driver_present};
use flashc_runtime::device::{Device, HostData};
use flashc_runtime::model::Model;
use flashc_runtime::session::Session;
use flashc_runtime::weights::{Weights, init};

/// Whether a missing GPU fails the tests (`FLASHC_REQUIRE_GPU=1`, set by `scripts/gpu-check.sh`).
fn gpu_required() -> bool {
    std::env::var("FLASHC_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The GPU, opened once per test binary; `None` (and a printed skip) without a driver.
fn gpu(test: &str) -> Option<&'static Cuda> {
    static GPU: OnceLock<Option<Cuda>> = OnceLock::new();
    if !driver_present() {
        assert!(!gpu_required(), "{test}: FLASHC_REQUIRE_GPU=1 but no CUDA driver was found");
        eprintln!("{test}: skipped: no CUDA driver");
        return None;
    }
    GPU.get_or_init(|| match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => panic!("a CUDA driver is present but GPU 0 does not open: {e}"),
    })
    .as_ref()
}

#[test]
fn without_a_driver_the_device_is_a_clear_error() {
    if driver_present() {
        eprintln!("a CUDA driver is present: checking the device opens instead");
        let dev = Cuda::new(0).expect("open GPU 0");
        let (free, total) = dev.memory().expect("memory");
        assert!(free <= total && total > 0);
        // The single-kernel API: a zeroed allocation, a write and a read back.
        let buf = dev.alloc(64).expect("allocates");
        assert_eq!(dev.read(&buf, 0, 64).expect("reads"), vec![0; 64]);
        dev.write(&buf, 8, &[1, 2, 3]).expect("writes");
        assert_eq!(dev.read(&buf, 7, 5).expect("reads"), vec![0, 1, 2, 3, 0]);
        assert!(dev.write(&buf, 62, &[1, 2, 3]).is_err(), "a write past the end is refused");
        return;
    }
    assert!(!gpu_required(), "FLASHC_REQUIRE_GPU=1 but no CUDA driver was found");
    let e = Cuda::new(0).err().expect("no driver");
    assert!(e.to_string().contains("no CUDA driver found"), "{e}");
    eprintln!("skipped: no CUDA driver (the device reports: {e})");
}

// ---------------------------------------------------------------------------------------------- helpers

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `examples/tiny-hybrid.arch`.
fn tiny_hybrid() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-hybrid.arch");
    std::fs::read_to_string(path).expect("example")
}

/// tiny-hybrid's attention and FFN layers alone: every group of its prefill and decode steps has a
/// GPU kernel today (tiny-hybrid's Mamba2 prefill and DeltaNet decode do not yet), so a whole
/// session runs on the GPU.
const TINY_ATTENTION: &str = "model tiny_attention {
  vocab = 256
  hidden = 128
  tie_embeddings = true
  meta_tokens = 4
  max_seq = 512
  norm = rmsnorm(eps = 1e-6)
  logits = row_normalized
  op A = attention(heads = 4, kv_heads = 2, head_dim = 32, rope = rope(theta = 10000), qk_norm = true)
  op W = attention(heads = 4, kv_heads = 1, window = 64, rope = rope(theta = 10000, style = interleaved))
  op F = ffn(inner = 384, act = swiglu)
  op R = ffn(inner = 512, act = relu2)
  layers = [A, F, W, R, A, F]
}";

/// tiny-hybrid in bf16 with bf16-exact random weights.
fn tiny_bf16_parts() -> (flashc_dsl::ModelSpec, Weights) {
    bf16_parts(&tiny_hybrid())
}

/// A model in bf16 with bf16-exact random weights (the spec and weights, to compile per device).
fn bf16_parts(src: &str) -> (flashc_dsl::ModelSpec, Weights) {
    let mut spec = flashc_dsl::load(src).expect("valid").0;
    spec.dtype = flashc_dsl::spec::DType::Bf16;
    let mut w = init(&spec, 7);
    for name in w.names().cloned().collect::<Vec<_>>() {
        if let Some(t) = w.get_mut(&name) {
            t.data.iter_mut().for_each(|x| *x = bf16(*x));
        }
    }
    (spec, w)
}

/// A deterministic value in [-scale, scale), rounded to bf16.
fn noise(seed: u64, i: usize, scale: f32) -> f32 {
    let mut x = seed.wrapping_add(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    bf16(((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
}

/// Inputs and states of a step: tokens, positions, lengths (all of T), random caches and recurrent
/// states.
fn step_inputs(program: &Program, at: &Bindings, vocab: u32) -> Vec<(BufferId, HostData)> {
    let b = at.b as usize;
    let mut out = Vec::new();
    for buf in program.buffers.iter().filter(|x| x.alias.is_none()) {
        let n = buf.ty.numel().eval(at) as usize;
        match (buf.kind, buf.name.as_str()) {
            (BufferKind::Input, "tokens") => {
                out.push((buf.id, HostData::I32((0..n).map(|i| ((i * 37 + 11) as u32 % vocab) as i32).collect())))
            }
            (BufferKind::Input, "start") => {
                out.push((buf.id, HostData::I32((0..b).map(|i| (9 + 23 * i) as i32).collect())))
            }
            (BufferKind::Input, "lens") => out.push((buf.id, HostData::I32(vec![at.t as i32; b]))),
            (BufferKind::State, _) => {
                let scale = if buf.name.ends_with("_cache") { 1.0 } else { 0.3 };
                out.push((buf.id, HostData::F32((0..n).map(|i| noise(u64::from(buf.id.0), i, scale)).collect())))
            }
            _ => {}
        }
    }
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn floats(h: HostData) -> Vec<f32> {
    match h {
        HostData::F32(v) => v,
        HostData::I32(v) => v.into_iter().map(|x| x as f32).collect(),
    }
}

// ---------------------------------------------------------------------------------------------- groups

/// Runs `program` (its prep groups, then a step) on the cpu group by group; every group the
/// dispatcher generates also runs on the GPU on the cpu's operands of that moment, and its results
/// are compared. Returns (group, worst relative error) for the generated groups and the names of the
/// others.
fn groups_against_cpu(dev: &Cuda, model: &Model, mode: Mode, at: Bindings) -> (Vec<(String, f64)>, Vec<String>) {
    let entry = match mode {
        Mode::Decode => &model.decode,
        _ => &model.prefill,
    };
    let p = &entry.program;
    let mut cpu = model.instantiate(&Cpu, entry, &at).expect("cpu memory");
    let mut gpu = model.instantiate(dev, entry, &at).expect("GPU memory");
    for (id, data) in step_inputs(p, &at, model.spec.vocab as u32) {
        Cpu.upload(&mut cpu, id, data.clone()).expect("cpu upload");
        dev.upload(&mut gpu, id, data).expect("GPU upload");
    }
    let mut checked = Vec::new();
    let mut skipped = Vec::new();
    for k in p.prep.iter().chain(&p.kernels) {
        let ins: Vec<(BufferId, HostData)> =
            k.inputs.iter().map(|b| (*b, Cpu.download(p, &cpu, *b).expect("cpu operand"))).collect();
        Cpu.run(p, k, &mut cpu).expect("cpu runs");
        if flashc_codegen::kernels::dispatch::generate(p, k).is_err() {
            skipped.push(format!("{} {}", k.id, k.name));
            continue;
        }
        for (b, data) in &ins {
            let data = match (p.buffer(*b).map(|x| x.ty.dtype), data) {
                (Some(DType::I32), HostData::F32(v)) => HostData::I32(v.iter().map(|x| *x as i32).collect()),
                _ => data.clone(),
            };
            dev.write_buffer(p, &mut gpu, *b, &data)
                .unwrap_or_else(|e| panic!("{} {}: writing {b}: {e}", k.id, k.name));
        }
        dev.run(p, k, &mut gpu).unwrap_or_else(|e| panic!("{} {} on the GPU: {e}", k.id, k.name));
        dev.synchronize().unwrap_or_else(|e| panic!("{} {} on the GPU: {e}", k.id, k.name));
        let mut worst = 0.0f64;
        for b in &k.outputs {
            let want = floats(Cpu.download(p, &cpu, *b).expect("cpu result"));
            let got = floats(dev.download(p, &gpu, *b).expect("GPU result"));
            assert!(got.iter().all(|x| x.is_finite()), "{} {}: {b} has non-finite values", k.id, k.name);
            let e = rel_err(&got, &want);
            assert!(e < 2e-2, "{} {}: result {b} differs from the cpu by {e:.3e} (relative L2)", k.id, k.name);
            worst = worst.max(e);
        }
        checked.push((format!("{} {}", k.id, k.name), worst));
    }
    (checked, skipped)
}

fn groups_case(test: &str, mode: Mode, at: Bindings) {
    let Some(dev) = gpu(test) else { return };
    let (spec, w) = tiny_bf16_parts();
    let model = Model::new(&Cpu, spec, w).expect("compiles");
    let (checked, skipped) = groups_against_cpu(dev, &model, mode, at);
    eprintln!("{test}: {} groups checked on the GPU; not generated (skipped): {skipped:?}", checked.len());
    for (k, e) in &checked {
        eprintln!("  {k:<48} {e:.2e}");
    }
    assert!(!checked.is_empty(), "no group was generated");
}

#[test]
fn tiny_hybrid_decode_groups_on_the_gpu_match_the_cpu() {
    groups_case("decode groups", Mode::Decode, Bindings { b: 2, t: 1, s: 0 });
}

#[test]
fn tiny_hybrid_prefill_groups_on_the_gpu_match_the_cpu() {
    groups_case("prefill groups", Mode::Prefill, Bindings { b: 2, t: 5, s: 0 });
}

// ---------------------------------------------------------------------------------------------- sessions

fn tokens(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503)) % vocab).collect()
}

/// The model `src` in bf16, compiled (with its prepared weights) on the cpu, or `None` (printed)
/// when a group of its prefill or decode step has no GPU kernel yet. Prepared weights are host
/// data, so the same model runs on every device.
fn model_for_gpu(test: &str, src: &str) -> Option<Model> {
    let (spec, w) = bf16_parts(src);
    let model = Model::new(&Cpu, spec, w).expect("compiles");
    let step = |p: &Program| -> Vec<String> {
        p.kernels
            .iter()
            .filter(|k| flashc_codegen::kernels::dispatch::generate(p, k).is_err())
            .map(|k| format!("{} {}", k.id, k.name))
            .collect()
    };
    let mut missing = step(&model.prefill.program);
    missing.extend(step(&model.decode.program));
    if !missing.is_empty() {
        eprintln!("{test} ({}): skipped: groups without a GPU kernel: {missing:?}", model.spec.name);
        return None;
    }
    Some(model)
}

/// The models the session tests run: tiny-hybrid (skipped while some of its groups have no GPU
/// kernel) and its attention and FFN layers alone.
fn session_models() -> [String; 2] {
    [tiny_hybrid(), TINY_ATTENTION.to_string()]
}

#[test]
fn sessions_on_the_gpu_match_the_cpu() {
    let test = "sessions";
    if let Some(dev) = gpu(test) {
        for src in session_models() {
            sessions_against_cpu(test, dev, &src);
        }
    }
}

/// Prefill of two prompts of different lengths and four decode steps on `dev` and on the cpu.
fn sessions_against_cpu<D: Device>(test: &str, dev: &D, src: &str) {
    let Some(model) = model_for_gpu(test, src) else { return };
    let test = &format!("{test} ({})", model.spec.name);
    let vocab = model.spec.vocab as u32;
    let mut cpu = Session::new(&Cpu, &model, 2).expect("cpu session");
    let mut gpu = Session::new(dev, &model, 2).expect("GPU session");
    // Two prompts of different lengths.
    let prompts = vec![tokens(3, 9, vocab), tokens(5, 6, vocab)];
    let want = cpu.prefill(&prompts).expect("cpu prefill");
    let got = gpu.prefill(&prompts).expect("GPU prefill");
    let mut worst = 0f64;
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.iter().all(|x| x.is_finite()), "prefill: sequence {s} has non-finite logits");
        let e = rel_err(g, w);
        assert!(e < 1e-2, "prefill: sequence {s} differs from the cpu by {e:.3e}");
        worst = worst.max(e);
    }
    eprintln!("{test}: prefill of 9 and 6 tokens: worst relative error {worst:.2e}");
    for step in 0..4u32 {
        let next = [(7 + 13 * step) % vocab, (101 + 29 * step) % vocab];
        let want = cpu.decode(&next).expect("cpu decode");
        let got = gpu.decode(&next).expect("GPU decode");
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.iter().all(|x| x.is_finite()), "decode step {step}: sequence {s} has non-finite logits");
            let e = rel_err(g, w);
            assert!(e < 1e-2, "decode step {step}: sequence {s} differs from the cpu by {e:.3e}");
            eprintln!("{test}: decode step {step} sequence {s}: relative error {e:.2e}");
        }
    }
}

#[test]
fn decode_after_prefill_matches_prefill_of_the_whole_sequence_on_the_gpu() {
    let test = "decode after prefill";
    if let Some(dev) = gpu(test) {
        for src in session_models() {
            decode_after_prefill(test, dev, &src);
        }
    }
}

/// Prefill of 6 tokens then 6 decode steps on `dev` against one prefill of all 12 on `dev`.
fn decode_after_prefill<D: Device>(test: &str, dev: &D, src: &str) {
    let Some(model) = model_for_gpu(test, src) else { return };
    let test = &format!("{test} ({})", model.spec.name);
    let vocab = model.spec.vocab as usize;
    let seq = tokens(7, 12, vocab as u32);
    // Both runs are bf16 paths within 1e-2 of the cpu (the test above), so they are within 2e-2 of
    // each other; on the sim they differ by about 7e-3.
    let bound = 2e-2;
    let mut full = Session::new(dev, &model, 1).expect("session");
    let all = full.prefill(std::slice::from_ref(&seq)).expect("prefill").remove(0);
    let mut inc = Session::new(dev, &model, 1).expect("session");
    let first = inc.prefill(&[seq[..6].to_vec()]).expect("prefill").remove(0);
    let e = rel_err(&first, &all[..6 * vocab]);
    assert!(e < bound, "the first 6 rows differ by {e:.3e}");
    for (i, t) in seq[6..].iter().enumerate() {
        let pos = 6 + i;
        let logits = inc.decode(&[*t]).expect("decode").remove(0);
        let e = rel_err(&logits, &all[pos * vocab..(pos + 1) * vocab]);
        eprintln!("{test}: position {pos}: relative error {e:.2e}");
        assert!(e < bound, "position {pos}: decode differs from the whole prefill by {e:.3e}");
    }
}
