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

/// A cpu that records decode steps the way the `cuda` device records CUDA graphs: launches made
/// while recording are kept, not run; a kept recording runs once when it ends and is replayed on
/// later steps. It can fail the first recording, as a driver could.
struct Recorder {
    fail_first: bool,
    recording: std::cell::Cell<bool>,
    failed: std::cell::Cell<bool>,
    recorded: std::cell::RefCell<Vec<(flashc_compiler::schedule::KernelId, u32)>>,
    graph: std::cell::RefCell<Option<Vec<(flashc_compiler::schedule::KernelId, u32)>>>,
    steps: std::cell::Cell<u32>,
    log: std::cell::RefCell<Vec<&'static str>>,
    /// The program recorded launches belong to (a recording, like a CUDA graph, carries its work).
    program: std::cell::RefCell<Option<Program>>,
}

impl Recorder {
    fn new(fail_first: bool) -> Recorder {
        Recorder {
            fail_first,
            recording: Default::default(),
            failed: Default::default(),
            recorded: Default::default(),
            graph: Default::default(),
            steps: Default::default(),
            log: Default::default(),
            program: Default::default(),
        }
    }

    fn play(
        &self,
        p: &Program,
        mem: &mut flashc_runtime::cpu::CpuMemory,
        launches: &[(flashc_compiler::schedule::KernelId, u32)],
    ) -> Result<(), RuntimeError> {
        for (kernel, part) in launches {
            let l = flashc_codegen::host::Launched {
                kernel: *kernel,
                part: *part,
                grid: [1; 3],
                block: [1; 3],
                shared: 0,
                args: &[],
            };
            Cpu.launch(p, mem, &l, None)?;
        }
        Ok(())
    }
}

impl Device for Recorder {
    type Memory = flashc_runtime::cpu::CpuMemory;

    fn name(&self) -> &'static str {
        "recorder"
    }

    fn allocate(&self, p: &Program, at: &Bindings) -> Result<Self::Memory, RuntimeError> {
        Cpu.allocate(p, at)
    }

    fn share_weight(
        &self,
        mem: &mut Self::Memory,
        b: flashc_compiler::schedule::BufferId,
        d: std::sync::Arc<Vec<f32>>,
    ) -> Result<(), RuntimeError> {
        Cpu.share_weight(mem, b, d)
    }

    fn upload(
        &self,
        mem: &mut Self::Memory,
        b: flashc_compiler::schedule::BufferId,
        d: HostData,
    ) -> Result<(), RuntimeError> {
        Cpu.upload(mem, b, d)
    }

    fn download(
        &self,
        p: &Program,
        mem: &Self::Memory,
        b: flashc_compiler::schedule::BufferId,
    ) -> Result<HostData, RuntimeError> {
        Cpu.download(p, mem, b)
    }

    fn run(
        &self,
        p: &Program,
        k: &flashc_compiler::schedule::KernelGroup,
        mem: &mut Self::Memory,
    ) -> Result<(), RuntimeError> {
        Cpu.run(p, k, mem)
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn bases(
        &self,
        p: &Program,
        plan: &flashc_codegen::host::LaunchPlan,
        mem: &mut Self::Memory,
    ) -> Result<Vec<u64>, RuntimeError> {
        Cpu.bases(p, plan, mem)
    }

    fn launch(
        &self,
        p: &Program,
        mem: &mut Self::Memory,
        l: &flashc_codegen::host::Launched<'_>,
        kernels: Option<&flashc_codegen::kernels::dispatch::Dispatched>,
    ) -> Result<(), RuntimeError> {
        if self.recording.get() {
            if self.program.borrow().is_none() {
                *self.program.borrow_mut() = Some(p.clone());
            }
            self.recorded.borrow_mut().push((l.kernel, l.part));
            return Ok(());
        }
        Cpu.launch(p, mem, l, kernels)
    }

    fn replay(&self, mem: &mut Self::Memory, _bases: &[u64], _at: &Bindings) -> Result<Option<usize>, RuntimeError> {
        self.steps.set(self.steps.get() + 1);
        let graph = self.graph.borrow();
        let Some(g) = graph.as_ref() else { return Ok(None) };
        let program = self.program.borrow();
        self.play(program.as_ref().expect("a recorded program"), mem, g)?;
        self.log.borrow_mut().push("replayed");
        Ok(Some(g.len()))
    }

    fn wants_recording(&self, _mem: &Self::Memory) -> bool {
        self.steps.get() >= 2 && !self.failed.get() && self.graph.borrow().is_none()
    }

    fn begin_recording(&self, _mem: &mut Self::Memory) -> Result<(), RuntimeError> {
        self.log.borrow_mut().push("begin");
        self.recording.set(true);
        self.recorded.borrow_mut().clear();
        Ok(())
    }

    fn end_recording(
        &self,
        mem: &mut Self::Memory,
        keep: Option<(&[u64], &Bindings, usize)>,
    ) -> Result<(), RuntimeError> {
        self.recording.set(false);
        let launches = std::mem::take(&mut *self.recorded.borrow_mut());
        if keep.is_some() && self.fail_first && !self.failed.get() {
            self.failed.set(true);
            self.log.borrow_mut().push("failed");
            return Err(RuntimeError::Device("instantiation failed".into()));
        }
        if let Some((_, _, n)) = keep {
            assert_eq!(n, launches.len(), "the schedule counts the recorded launches");
            self.log.borrow_mut().push("kept");
            // A kept recording runs once as it ends (its launches did not run while recording).
            let program = self.program.borrow();
            self.play(program.as_ref().expect("a recorded program"), mem, &launches)?;
            *self.graph.borrow_mut() = Some(launches);
        }
        Ok(())
    }
}

/// Decode steps recorded and replayed (as CUDA graphs are) give the plain cpu's logits, and a
/// recording that fails is closed and the step rerun without it.
#[test]
fn recorded_decode_steps_replay_and_a_failed_recording_reruns_the_step() {
    let model = bf16_model(&tiny_hybrid_source(), 7);
    let prompts = vec![tokens(3, 5, 256), tokens(4, 8, 256)];
    for fail_first in [false, true] {
        let rec = Recorder::new(fail_first);
        let mut plain = flashc_runtime::session::Session::new(&Cpu, &model, 2).expect("session");
        let mut recorded = flashc_runtime::session::Session::new(&rec, &model, 2).expect("session");
        assert_eq!(plain.prefill(&prompts).expect("prefill"), recorded.prefill(&prompts).expect("prefill"));
        let mut next = vec![1u32, 2];
        for step in 0..5 {
            let want = plain.decode(&next).expect("decode");
            let got = recorded.decode(&next).expect("decode");
            assert_eq!(got, want, "fail_first {fail_first}, step {step}");
            next = vec![(step * 7 + 3) as u32, (step * 5 + 11) as u32];
        }
        let log = rec.log.borrow().clone();
        let want: Vec<&str> = if fail_first {
            // The second step's recording fails: the step reruns, and recording stays off.
            vec!["begin", "failed"]
        } else {
            vec!["begin", "kept", "replayed", "replayed", "replayed"]
        };
        assert_eq!(log, want, "fail_first {fail_first}");
    }
}
