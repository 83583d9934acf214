//! Whole programs on the `sim` device against the `cpu` device: every kernel group the dispatcher
//! generates, run on the sim on the operands the cpu saw at that point of the same step, gives the
//! cpu's results (bf16 tolerance); and a whole decode step gives the cpu's logits.
//!
//! The model is `examples/tiny-hybrid.arch` (every operator kind) stored in bf16, the dtype of the
//! GPU kernels; weights are rounded to bf16 so both devices read the same values.

use std::collections::BTreeMap;

use flashc_codegen::host::Phase;
use flashc_compiler::gir::{Bindings, DType, Mode};
use flashc_compiler::schedule::{BufferId, BufferKind, Program};
use flashc_runtime::cpu::Cpu;
use flashc_runtime::device::{Device, HostData};
use flashc_runtime::host::Scheduled;
use flashc_runtime::model::{Model, execute};
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
    let mut w = init(&spec, 7);
    for name in w.names().cloned().collect::<Vec<_>>() {
        if let Some(t) = w.get_mut(&name) {
            t.data.iter_mut().for_each(|x| *x = bf16(*x));
        }
    }
    Model::new(&Cpu, spec, w).expect("compiles")
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
    let mut cpu = model.instantiate(&Cpu, entry, &at).expect("cpu memory");
    let mut sim = model.instantiate(&Sim, entry, &at).expect("sim memory");
    for (id, data) in step_inputs(p, &at, model.spec.vocab as u32) {
        Cpu.upload(&mut cpu, id, data.clone()).expect("cpu upload");
        Sim.upload(&mut sim, id, data).expect("sim upload");
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
            sim.write(p, *b, &data).unwrap_or_else(|e| panic!("{} {}: writing {b}: {e}", k.id, k.name));
        }
        Sim.run(p, k, &mut sim).unwrap_or_else(|e| panic!("{} {} on the sim: {e}", k.id, k.name));
        let mut worst = 0.0f64;
        for b in &k.outputs {
            let want = floats(Cpu.download(p, &cpu, *b).expect("cpu result"));
            let got = floats(Sim.download(p, &sim, *b).expect("sim result"));
            assert!(got.iter().all(|x| x.is_finite()), "{} {}: {b} has non-finite values", k.id, k.name);
            let e = rel_err(&got, &want);
            assert!(e < 2e-2, "{} {}: result {b} differs from the cpu by {e:.3e} (relative L2)", k.id, k.name);
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
