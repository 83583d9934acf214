//! Whole programs on the `sim` device against the `cpu` devices: every kernel group the dispatcher
//! generates, run on the sim on the operands the storage-rounded cpu (`CpuRounded`) saw at that point
//! of the same step, gives its results (relative L2 < 1e-2); whole models (prefill of prompts of
//! different lengths, then decode) give its logits; and the compiled host schedule drives the cpu
//! exactly like the plain group-by-group loop.
//!
//! The models are `examples/tiny-hybrid.arch` (every operator kind) stored in bf16, the dtype of the
//! GPU kernels, and a small Nemotron-Flash-shaped model; weights are rounded to bf16 so every device
//! reads the same values.

use std::collections::BTreeMap;

use flashc_codegen::host::Phase;
use flashc_compiler::gir::{Bindings, DType, Mode};
use flashc_compiler::schedule::{BufferId, BufferKind, Program};
use flashc_runtime::cpu::{Cpu, CpuRounded};
use flashc_runtime::device::{Device, HostData};
use flashc_runtime::host::Scheduled;
use flashc_runtime::model::{Model, execute};
use flashc_runtime::session::Session;
use flashc_runtime::sim::{Sim, bf16_to_f32, f32_to_bf16};
use flashc_runtime::weights::init;

fn bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// tiny-hybrid in bf16, with bf16-exact random weights, compiled for the cpu.
fn tiny_bf16() -> Model {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-hybrid.arch");
    let mut spec = flashc_dsl::load(&std::fs::read_to_string(path).expect("example")).expect("valid").0;
    spec.dtype = flashc_dsl::spec::DType::Bf16;
    bf16_model(spec, 7)
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

/// Runs `program` (its prep groups again, then a step) on the cpu group by group; every group the dispatcher generates also runs on the
/// sim on the cpu's operands of that moment, and its results are compared. Returns (group, worst
/// relative error) for the generated groups and the names of the others.
fn groups_against_cpu(model: &Model, mode: Mode, at: Bindings) -> (Vec<(String, f64)>, Vec<String>) {
    let entry = match mode {
        Mode::Decode => &model.decode,
        _ => &model.prefill,
    };
    let p = &entry.program;
    let mut cpu = model.instantiate(&CpuRounded, entry, &at).expect("cpu memory");
    let mut sim = model.instantiate(&Sim, entry, &at).expect("sim memory");
    for (id, data) in step_inputs(p, &at, model.spec.vocab as u32) {
        CpuRounded.upload(&mut cpu, id, data.clone()).expect("cpu upload");
        Sim.upload(&mut sim, id, data).expect("sim upload");
    }
    let mut checked = Vec::new();
    let mut skipped = Vec::new();
    for k in p.prep.iter().chain(&p.kernels) {
        let ins: Vec<(BufferId, HostData)> =
            k.inputs.iter().map(|b| (*b, CpuRounded.download(p, &cpu, *b).expect("cpu operand"))).collect();
        CpuRounded.run(p, k, &mut cpu).expect("cpu runs");
        if flashc_codegen::kernels::dispatch::generate(p, k).is_err() {
            skipped.push(format!("{} {}", k.id, k.name));
            continue;
        }
        for (b, data) in &ins {
            let data = match (p.buffer(*b).map(|x| x.ty.dtype), data) {
                (Some(DType::I32), HostData::F32(v)) => HostData::I32(v.iter().map(|x| *x as i32).collect()),
                _ => data.clone(),
            };
            sim.write(p, *b, &data).unwrap_or_else(|e| panic!("{} {}: writing {b}: {e}", k.id, k.name));
        }
        Sim.run(p, k, &mut sim).unwrap_or_else(|e| panic!("{} {} on the sim: {e}", k.id, k.name));
        let mut worst = 0.0f64;
        for b in &k.outputs {
            let want = floats(CpuRounded.download(p, &cpu, *b).expect("cpu result"));
            let got = floats(Sim.download(p, &sim, *b).expect("sim result"));
            assert!(got.iter().all(|x| x.is_finite()), "{} {}: {b} has non-finite values", k.id, k.name);
            let e = rel_err(&got, &want);
            assert!(e < 1e-2, "{} {}: result {b} differs from the cpu by {e:.3e} (relative L2)", k.id, k.name);
            worst = worst.max(e);
        }
        checked.push((format!("{} {}", k.id, k.name), worst));
    }
    (checked, skipped)
}

#[test]
fn tiny_hybrid_decode_groups_on_the_sim_match_the_cpu() {
    let model = tiny_bf16();
    let (checked, skipped) = groups_against_cpu(&model, Mode::Decode, Bindings { b: 2, t: 1, s: 0 });
    let table: BTreeMap<_, _> = checked.iter().cloned().collect();
    eprintln!("decode groups checked on the sim: {}; not generated: {skipped:?}", checked.len());
    for (k, e) in &table {
        eprintln!("  {k:<48} {e:.2e}");
    }
    assert!(checked.len() >= 33, "{} groups checked", checked.len());
}

#[test]
fn tiny_hybrid_prefill_groups_on_the_sim_match_the_cpu() {
    let model = tiny_bf16();
    let (checked, skipped) = groups_against_cpu(&model, Mode::Prefill, Bindings { b: 2, t: 5, s: 0 });
    eprintln!("prefill groups checked on the sim: {}; not generated: {skipped:?}", checked.len());
    for (k, e) in &checked {
        eprintln!("  {k:<48} {e:.2e}");
    }
    assert!(checked.len() >= 43, "{} groups checked", checked.len());
}

/// The compiled host schedule drives the cpu launch for launch: a tiny-hybrid decode step and a
/// prefill run through it give exactly the plain run's results.
#[test]
fn the_host_schedule_drives_the_cpu_exactly_like_the_plain_run() {
    let model = tiny_bf16();
    for (entry, at) in [(&model.decode, Bindings { b: 2, t: 1, s: 0 }), (&model.prefill, Bindings { b: 2, t: 5, s: 0 })]
    {
        let p = &entry.program;
        let scheduled = Scheduled::new(&Cpu, p).expect("schedule");
        let mut plain = model.instantiate(&Cpu, entry, &at).expect("memory");
        let mut driven = model.instantiate(&Cpu, entry, &at).expect("memory");
        for (id, data) in step_inputs(p, &at, model.spec.vocab as u32) {
            Cpu.upload(&mut plain, id, data.clone()).expect("upload");
            Cpu.upload(&mut driven, id, data).expect("upload");
        }
        execute(&Cpu, p, &mut plain).expect("plain run");
        let launches = scheduled.run(&Cpu, p, &mut driven, &at, Phase::Step).expect("scheduled run");
        assert_eq!(launches, p.kernels.len(), "{:?}: one launch per group on the cpu", p.mode);
        for b in p.buffers.iter().filter(|b| matches!(b.kind, BufferKind::Output | BufferKind::State)) {
            assert_eq!(
                Cpu.download(p, &driven, b.id).expect("download"),
                Cpu.download(p, &plain, b.id).expect("download"),
                "{:?}: {} differs",
                p.mode,
                b.name
            );
        }
    }
}

/// A small model shaped like Nemotron-Flash-1B: DeltaNet, Mamba2 and GQA attention mixers in the
/// same block pattern, SwiGLU FFNs, meta tokens, tied row-normalised logits, bf16.
const NEMOTRON_SHAPED: &str = "model nemotron_shaped {
  vocab = 300
  hidden = 128
  tie_embeddings = true
  meta_tokens = 8
  max_seq = 96
  norm = rmsnorm(eps = 1e-6)
  logits = row_normalized
  dtype = bf16
  op D = deltanet(heads = 2, head_dim = 64, conv = 4)
  op M2 = mamba2(state = 32, expand = 2, head_dim = 32, groups = 1, conv = 4, chunk = 16)
  op A = attention(heads = 4, kv_heads = 2, head_dim = 32, rope = rope(theta = 10000))
  op F = ffn(inner = 3 * hidden, act = swiglu)
  block B1 = [D, F, M2, F]
  block B2 = [A, F, M2, F]
  layers = [B1, B2]
}";

fn bf16_model(spec: flashc_dsl::ModelSpec, seed: u64) -> Model {
    let mut w = init(&spec, seed);
    for name in w.names().cloned().collect::<Vec<_>>() {
        if let Some(t) = w.get_mut(&name) {
            t.data.iter_mut().for_each(|x| *x = bf16(*x));
        }
    }
    Model::new(&Cpu, spec, w).expect("compiles")
}

/// Errors of one whole-model run on the sim.
struct EndToEnd {
    /// Sim against the storage-rounded cpu (the tight reference).
    sim_vs_rounded: f64,
    /// Sim against the exact f32 cpu, and the rounded cpu against it (bf16 storage itself).
    sim_vs_exact: f64,
    rounded_vs_exact: f64,
    /// Sim time per decode step, and what one step executed.
    per_step: std::time::Duration,
}

/// Prefills prompts of different lengths, then decodes `steps` tokens (the rounded cpu's greedy
/// choices fed to every device), on the exact cpu, the storage-rounded cpu and the sim. The sim's
/// logits (every prompt position, every step; relative L2 per sequence) must stay within 3e-2 of the
/// rounded cpu's everywhere, and their worst distance within 1e-2 or twice the worst distance bf16
/// storage alone puts between the rounded and the exact cpu, whichever is larger.
fn whole_model_on_the_sim(model: &Model, prompts: &[Vec<u32>], steps: usize) -> EndToEnd {
    let b = prompts.len();
    let mut exact = Session::new(&Cpu, model, b).expect("cpu session");
    let mut rounded = Session::new(&CpuRounded, model, b).expect("cpu session");
    let mut sim = Session::new(&Sim, model, b).expect("sim session");
    let mut e =
        EndToEnd { sim_vs_rounded: 0.0, sim_vs_exact: 0.0, rounded_vs_exact: 0.0, per_step: std::time::Duration::ZERO };
    let mut compare = |what: &str, x: &[Vec<f32>], r: &[Vec<f32>], s: &[Vec<f32>]| {
        for q in 0..b {
            let err = rel_err(&s[q], &r[q]);
            assert!(err < 3e-2, "{what}, sequence {q}: the sim is {err:.3e} from the rounded cpu");
            e.sim_vs_rounded = e.sim_vs_rounded.max(err);
            e.sim_vs_exact = e.sim_vs_exact.max(rel_err(&s[q], &x[q]));
            e.rounded_vs_exact = e.rounded_vs_exact.max(rel_err(&r[q], &x[q]));
        }
    };
    let x = exact.prefill(prompts).expect("cpu prefill");
    let r = rounded.prefill(prompts).expect("cpu prefill");
    let s = sim.prefill(prompts).unwrap_or_else(|err| panic!("sim prefill: {err}"));
    compare("prefill", &x, &r, &s);
    let vocab = model.spec.vocab as usize;
    let argmax = |l: &[f32]| l.iter().enumerate().max_by(|p, q| p.1.total_cmp(q.1)).map_or(0, |(i, _)| i as u32);
    let mut next: Vec<u32> = r.iter().map(|l| argmax(&l[l.len() - vocab..])).collect();
    let mut sim_time = std::time::Duration::ZERO;
    for step in 0..steps {
        let x = exact.decode(&next).expect("cpu decode");
        let r = rounded.decode(&next).expect("cpu decode");
        let t = std::time::Instant::now();
        let s = sim.decode(&next).unwrap_or_else(|err| panic!("sim decode: {err}"));
        sim_time += t.elapsed();
        compare(&format!("decode step {step}"), &x, &r, &s);
        next = r.iter().map(|l| argmax(l)).collect();
    }
    e.per_step = sim_time / steps.max(1) as u32;
    // bf16 storage alone moves these random models' logits by about 1e-2 (the rounded cpu against
    // the exact one); over the whole run the sim must stay within twice that, or within 1e-2.
    let bound = (2.0 * e.rounded_vs_exact).max(1e-2);
    assert!(
        e.sim_vs_rounded < bound,
        "the sim is {:.3e} from the rounded cpu (bound {bound:.3e}; storage alone {:.3e})",
        e.sim_vs_rounded,
        e.rounded_vs_exact
    );
    e
}

fn report(name: &str, e: &EndToEnd) {
    eprintln!(
        "{name} on the sim: logits vs the rounded cpu {:.2e}, vs the exact cpu {:.2e} (rounded cpu vs exact: {:.2e}); {:?} per decode step (B = 2)",
        e.sim_vs_rounded, e.sim_vs_exact, e.rounded_vs_exact, e.per_step
    );
}

#[test]
fn tiny_hybrid_runs_end_to_end_on_the_sim() {
    let model = tiny_bf16();
    let prompts = vec![tokens_for(3, 9, 256), tokens_for(5, 70, 256)];
    let e = whole_model_on_the_sim(&model, &prompts, 3);
    report("tiny-hybrid (bf16)", &e);
}

#[test]
fn a_nemotron_shaped_model_runs_end_to_end_on_the_sim() {
    let spec = flashc_dsl::load(NEMOTRON_SHAPED).expect("valid").0;
    let model = bf16_model(spec, 3);
    let prompts = vec![tokens_for(1, 20, 300), tokens_for(2, 33, 300)];
    let e = whole_model_on_the_sim(&model, &prompts, 3);
    report("nemotron-shaped (bf16)", &e);
}

fn tokens_for(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503)) % vocab).collect()
}
