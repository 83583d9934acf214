//! model: a compiled model with its weights, ready to run on a device.
//!
//! `Model::new` compiles the spec once per entry point — **prefill** (the prompt, with the meta-token
//! prefix already in the caches), **decode** (one token per sequence) and, when the model has meta
//! tokens, **prefix** (the meta tokens alone, run once per model) — through the standard pass
//! pipeline and the scheduler, and computes each program's prepared weights (packed projections,
//! `−exp(A_log)`) once. Weights are shared by every program and session.
//!
//! Every run goes through the program's compiled host schedule for the device at hand
//! ([`Entry::run`]; compiled once per device and kept); [`execute`] is the plain group-by-group
//! loop the schedule is tested against.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use flashc_codegen::host::Phase;

use flashc_compiler::gir::{Bindings, Mode};
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{VERIFY_BY_DEFAULT, pipeline, run_passes};
use flashc_compiler::schedule::{BufferId, BufferKind, Program, schedule};
use flashc_dsl::ModelSpec;

use crate::device::{Device, HostData, RuntimeError};
use crate::host::Scheduled;
use crate::weights::{self, Weights};

/// Prepared-weight buffers of a program and their values.
type Prepared = Vec<(BufferId, Arc<Vec<f32>>)>;

/// One entry point of a model: its program, its prepared weights, and its compiled host schedule
/// per device.
#[derive(Debug)]
pub struct Entry {
    pub program: Program,
    prepared: Prepared,
    schedules: Mutex<BTreeMap<&'static str, Arc<Scheduled>>>,
}

impl Entry {
    fn new(program: Program) -> Entry {
        Entry { program, prepared: Vec::new(), schedules: Mutex::new(BTreeMap::new()) }
    }

    /// An entry point for a program compiled elsewhere (e.g. with other lowering options), with its
    /// prepared weights computed from `model`'s weights.
    pub fn from_program<D: Device>(device: &D, model: &Model, program: Program) -> Result<Entry, RuntimeError> {
        let mut entry = Entry::new(program);
        entry.prepared = model.prepare(device, &entry)?;
        Ok(entry)
    }

    /// The program's host schedule for `device`, compiled on first use.
    pub fn schedule<D: Device>(&self, device: &D) -> Result<Arc<Scheduled>, RuntimeError> {
        let mut cache =
            self.schedules.lock().map_err(|_| RuntimeError::Device("a schedule cache is poisoned".into()))?;
        if let Some(s) = cache.get(device.name()) {
            return Ok(s.clone());
        }
        let s = Arc::new(Scheduled::new(device, &self.program)?);
        cache.insert(device.name(), s.clone());
        Ok(s)
    }

    /// Runs one phase of the program on `mem` (allocated at `at`) through the compiled host
    /// schedule, and waits for it; returns the launches made.
    pub fn run<D: Device>(
        &self,
        device: &D,
        mem: &mut D::Memory,
        at: &Bindings,
        phase: Phase,
    ) -> Result<usize, RuntimeError> {
        let n = self.schedule(device)?.run(device, &self.program, mem, at, phase)?;
        device.synchronize()?;
        Ok(n)
    }
}

/// A compiled model and its weights.
#[derive(Debug)]
pub struct Model {
    pub spec: ModelSpec,
    weights: BTreeMap<String, Arc<Vec<f32>>>,
    pub prefill: Entry,
    pub decode: Entry,
    /// The meta-token prefix program (`None` without meta tokens).
    pub prefix: Option<Entry>,
    /// The states after the meta-token prefix, per state, for one sequence (empty without meta
    /// tokens): computed once, copied into every new sequence.
    pub prefix_states: BTreeMap<String, Vec<f32>>,
}

/// Compiles one entry point.
pub fn compile(spec: &ModelSpec, opts: &LowerOptions) -> Result<Program, RuntimeError> {
    let mut g = lower(spec, opts).map_err(RuntimeError::Compile)?;
    run_passes(&mut g, &pipeline(opts.mode), VERIFY_BY_DEFAULT, &mut |_, _| {})
        .map_err(|e| RuntimeError::Compile(e.to_string()))?;
    schedule(&g).map_err(|e| RuntimeError::Compile(format!("internal error while scheduling: {e}")))
}

impl Model {
    /// Compiles `spec` and binds `weights` (which must match its manifest).
    pub fn new<D: Device>(device: &D, spec: ModelSpec, weights: Weights) -> Result<Model, RuntimeError> {
        let prefill = compile(&spec, &LowerOptions { mode: Mode::Prefill, prepend_meta: false })?;
        let decode = compile(&spec, &LowerOptions::new(Mode::Decode))?;
        let prefix = if spec.meta_tokens > 0 {
            Some(compile(&spec, &LowerOptions { mode: Mode::Prefill, prepend_meta: true })?)
        } else {
            None
        };
        Model::from_programs(device, spec, weights, prefill, decode, prefix)
    }

    /// A model from a compiled artifact and weights.
    pub fn from_artifact<D: Device>(
        device: &D,
        artifact: &crate::artifact::Artifact,
        weights: Weights,
    ) -> Result<Model, RuntimeError> {
        let get = |mode: &str| {
            artifact
                .program(mode)
                .cloned()
                .ok_or_else(|| RuntimeError::Compile(format!("the artifact has no {mode} program")))
        };
        let prefix = artifact.program("prefix").cloned();
        Model::from_programs(device, artifact.spec.clone(), weights, get("prefill")?, get("decode")?, prefix)
    }

    /// A model from already compiled programs.
    pub fn from_programs<D: Device>(
        device: &D,
        spec: ModelSpec,
        weights: Weights,
        prefill: Program,
        decode: Program,
        prefix: Option<Program>,
    ) -> Result<Model, RuntimeError> {
        let mut shared = BTreeMap::new();
        for name in weights.names().cloned().collect::<Vec<_>>() {
            if let Some(t) = weights.get(&name) {
                shared.insert(name, Arc::new(t.data.clone()));
            }
        }
        let mut model = Model {
            spec,
            weights: shared,
            prefill: Entry::new(prefill),
            decode: Entry::new(decode),
            prefix: prefix.map(Entry::new),
            prefix_states: BTreeMap::new(),
        };
        model.prefill.prepared = model.prepare(device, &model.prefill)?;
        model.decode.prepared = model.prepare(device, &model.decode)?;
        if let Some(p) = &model.prefix {
            let prepared = model.prepare(device, p)?;
            if let Some(p) = &mut model.prefix {
                p.prepared = prepared;
            }
        }
        if let Some(p) = &model.prefix {
            model.prefix_states = crate::session::prefix_states(device, &model, p)?;
        }
        Ok(model)
    }

    /// Loads weights from a checkpoint (file or directory) and compiles.
    pub fn load<D: Device>(device: &D, spec: ModelSpec, checkpoint: &Path) -> Result<Model, RuntimeError> {
        let w = weights::load(&spec, checkpoint)?;
        Model::new(device, spec, w)
    }

    /// The weight of a given canonical name.
    pub fn weight(&self, name: &str) -> Option<&Arc<Vec<f32>>> {
        self.weights.get(name)
    }

    /// Runs a program's weight preparation once (the prep phase of its host schedule) and keeps
    /// the results.
    fn prepare<D: Device>(&self, device: &D, entry: &Entry) -> Result<Prepared, RuntimeError> {
        let program = &entry.program;
        if program.prep.is_empty() {
            return Ok(Vec::new());
        }
        let at = Bindings { b: 1, t: 1, s: 0 };
        let mut mem = device.allocate(program, &at)?;
        self.bind_weights(device, program, &mut mem)?;
        entry.run(device, &mut mem, &at, Phase::Prep)?;
        let mut out = Vec::new();
        for b in program.buffers.iter().filter(|b| b.kind == BufferKind::Prepared && b.alias.is_none()) {
            match device.download(program, &mem, b.id)? {
                HostData::F32(v) => out.push((b.id, Arc::new(v))),
                HostData::I32(_) => {
                    return Err(RuntimeError::Compile(format!("prepared weight {} is not float", b.id)));
                }
            }
        }
        Ok(out)
    }

    /// Attaches every weight a program reads.
    fn bind_weights<D: Device>(&self, device: &D, program: &Program, mem: &mut D::Memory) -> Result<(), RuntimeError> {
        for b in program.buffers.iter().filter(|b| b.kind == BufferKind::Weight && b.alias.is_none()) {
            let w = self.weights.get(&b.name).ok_or_else(|| {
                RuntimeError::Compile(format!("the program reads weight `{}`, which the model does not have", b.name))
            })?;
            device.share_weight(mem, b.id, w.clone())?;
        }
        Ok(())
    }

    /// Allocates memory for an entry point at the given sizes, with weights and prepared weights
    /// attached.
    pub fn instantiate<D: Device>(&self, device: &D, entry: &Entry, at: &Bindings) -> Result<D::Memory, RuntimeError> {
        let mut mem = device.allocate(&entry.program, at)?;
        self.bind_weights(device, &entry.program, &mut mem)?;
        for (b, v) in &entry.prepared {
            device.share_weight(&mut mem, *b, v.clone())?;
        }
        Ok(mem)
    }
}

/// Runs every per-step kernel group of a program in order, without the host schedule: the
/// reference loop the compiled schedule is tested against.
pub fn execute<D: Device>(device: &D, program: &Program, mem: &mut D::Memory) -> Result<(), RuntimeError> {
    for k in &program.kernels {
        device.run(program, k, mem)?;
    }
    device.synchronize()
}
