//! Whole programs on the `sim` device against the `cpu` devices: every kernel group the dispatcher
//! generates, run on the sim on the operands the storage-rounded cpu (`CpuRounded`) saw at that point
//! of the same step, gives its results (relative L2 < 1e-2); whole models (prefill of prompts of
//! different lengths, then decode) give its logits (the rule in `programs::sessions_against_cpu`);
//! and the compiled host schedule drives the cpu exactly like the plain group-by-group loop.
//!
//! The models are `examples/tiny-hybrid.arch` (every operator kind) stored in bf16, the dtype of the
//! GPU kernels, and a small Nemotron-Flash-shaped model; weights are rounded to bf16 so every device
//! reads the same values.

mod programs;

use flashc_codegen::host::Phase;
use flashc_compiler::gir::{Bindings, Mode};
use flashc_compiler::schedule::{BufferKind, Program};
use flashc_runtime::cpu::Cpu;
use flashc_runtime::device::{Device, HostData, RuntimeError};
use flashc_runtime::host::Scheduled;
use flashc_runtime::model::execute;
use flashc_runtime::sim::{Sim, SimMemory};
use programs::{bf16_model, groups_against_cpu, sessions_against_cpu, step_inputs, tiny_hybrid_source, tokens};

fn sim_write(
    p: &Program,
    mem: &mut SimMemory,
    b: flashc_compiler::schedule::BufferId,
    d: &HostData,
) -> Result<(), RuntimeError> {
    mem.write(p, b, d)
}

fn groups(mode: Mode, at: Bindings, at_least: usize) {
    let model = bf16_model(&tiny_hybrid_source(), 7);
    let (checked, skipped) = groups_against_cpu(&Sim, &sim_write, &model, mode, at, 1e-2);
    eprintln!("{mode:?} groups checked on the sim: {}; not generated: {skipped:?}", checked.len());
    for (k, e) in &checked {
        eprintln!("  {k:<48} {e:.2e}");
    }
    assert!(checked.len() >= at_least, "{} groups checked", checked.len());
}

#[test]
fn tiny_hybrid_decode_groups_on_the_sim_match_the_cpu() {
    groups(Mode::Decode, Bindings { b: 2, t: 1, s: 0 }, 47);
}

#[test]
fn tiny_hybrid_prefill_groups_on_the_sim_match_the_cpu() {
    groups(Mode::Prefill, Bindings { b: 2, t: 5, s: 0 }, 61);
}

/// The compiled host schedule drives the cpu launch for launch: a tiny-hybrid decode step and a
/// prefill run through it give exactly the plain run's results.
#[test]
fn the_host_schedule_drives_the_cpu_exactly_like_the_plain_run() {
    let model = bf16_model(&tiny_hybrid_source(), 7);
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

#[test]
fn tiny_hybrid_runs_end_to_end_on_the_sim() {
    let model = bf16_model(&tiny_hybrid_source(), 7);
    let prompts = vec![tokens(3, 9, 256), tokens(5, 70, 256)];
    sessions_against_cpu(&Sim, &model, &prompts, 3).report("tiny-hybrid (bf16) on the sim, B = 2");
}

#[test]
fn a_nemotron_shaped_model_runs_end_to_end_on_the_sim() {
    let model = bf16_model(NEMOTRON_SHAPED, 3);
    let prompts = vec![tokens(1, 20, 300), tokens(2, 33, 300)];
    sessions_against_cpu(&Sim, &model, &prompts, 3).report("nemotron-shaped (bf16) on the sim, B = 2");
}
