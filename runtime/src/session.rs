//! session: a batch of sequences being generated — prefill their prompts, then decode step by step.
//!
//! The session owns the sequences' persistent state (KV caches, conv, SSM and delta states, by name,
//! each `[B, ...]`) and how many tokens each sequence has cached. A model with meta tokens starts
//! every sequence from the meta-token prefix state, computed once per model and copied in (exact:
//! every operator is causal, so the state after the prefix does not depend on what follows).
//!
//! Prompts of different lengths share one prefill call (right-padded; each sequence's `lens` and
//! `start` keep padding out of its state and positions). Decode then advances every sequence by one
//! token per call, each at its own position. Between decode steps the states stay in the decode
//! program's memory on the device.

use std::collections::BTreeMap;

use flashc_compiler::gir::Bindings;
use flashc_compiler::schedule::{BufferId, BufferKind, Program};

use crate::device::{Device, HostData, RuntimeError};
use crate::model::{Entry, Model};
use flashc_codegen::host::Phase;

/// A state buffer of a program: its name, its root buffer id and its element count per sequence.
fn state_buffers(program: &Program, at: &Bindings) -> Result<Vec<(String, BufferId, usize)>, RuntimeError> {
    let mut out = Vec::new();
    for b in program.buffers.iter().filter(|b| b.kind == BufferKind::State && b.alias.is_none()) {
        let n = numel_at(&b.ty, at)?;
        let per_seq = if at.b > 0 { n / at.b as usize } else { 0 };
        out.push((b.name.clone(), b.id, per_seq));
    }
    Ok(out)
}

fn numel_at(ty: &flashc_compiler::gir::TensorType, at: &Bindings) -> Result<usize, RuntimeError> {
    let mut n = 1usize;
    for d in &ty.shape {
        let v = usize::try_from(d.eval(at)).map_err(|_| RuntimeError::Input(format!("negative size {d}")))?;
        n = n.saturating_mul(v);
    }
    Ok(n)
}

/// The buffer of an input of a given name.
fn input_buffer(program: &Program, name: &str) -> Option<BufferId> {
    program.buffers.iter().find(|b| b.kind == BufferKind::Input && b.name == name).map(|b| b.id)
}

fn output_buffer(program: &Program, name: &str) -> Option<BufferId> {
    program.outputs.iter().find(|(n, _)| n == name).map(|(_, b)| *b)
}

/// Runs the meta-token prefix program once (batch 1, no prompt) and returns the states after it.
pub fn prefix_states<D: Device>(
    device: &D,
    model: &Model,
    entry: &Entry,
) -> Result<BTreeMap<String, Vec<f32>>, RuntimeError> {
    let m = model.spec.meta_tokens as i32;
    let at = Bindings { b: 1, t: 0, s: 0 };
    let mut mem = model.instantiate(device, entry, &at)?;
    let p = &entry.program;
    for (name, data) in
        [("tokens", HostData::I32(Vec::new())), ("start", HostData::I32(vec![0])), ("lens", HostData::I32(vec![m]))]
    {
        if let Some(b) = input_buffer(p, name) {
            device.upload(&mut mem, b, data)?;
        }
    }
    entry.run(device, &mut mem, &at, Phase::Step)?;
    let mut states = BTreeMap::new();
    for (name, _, _) in state_buffers(p, &at)? {
        let out =
            output_buffer(p, &name).ok_or_else(|| RuntimeError::Compile(format!("state {name} has no output")))?;
        if let HostData::F32(v) = device.download(p, &mem, out)? {
            states.insert(name, v);
        }
    }
    Ok(states)
}

/// A batch of sequences on a device.
pub struct Session<'a, D: Device> {
    model: &'a Model,
    device: &'a D,
    batch: usize,
    /// Per state: `[B, ...]` values (when not held by the decode memory).
    states: BTreeMap<String, Vec<f32>>,
    /// Tokens cached per sequence, meta tokens included.
    cached: Vec<usize>,
    /// The decode program's memory, holding the states between decode steps.
    /// The decode memory and the sizes it was allocated at.
    decode_mem: Option<(D::Memory, Bindings)>,
    /// Every token fed to each sequence (prompt and generated).
    history: Vec<Vec<u32>>,
    /// Per-kernel times of decode steps, when profiling.
    profile: Option<crate::bench::Profile>,
}

impl<'a, D: Device> Session<'a, D> {
    /// A session of `batch` empty sequences (holding the meta-token prefix, if the model has one).
    pub fn new(device: &'a D, model: &'a Model, batch: usize) -> Result<Self, RuntimeError> {
        let prefix = &model.prefix_states;
        if batch == 0 {
            return Err(RuntimeError::Input("a session needs at least one sequence".to_string()));
        }
        let at = Bindings { b: batch as i64, t: 1, s: 0 };
        let mut states = BTreeMap::new();
        for (name, _, per_seq) in state_buffers(&model.prefill.program, &at)? {
            let data = match prefix.get(&name) {
                Some(p) if p.len() == per_seq => p.repeat(batch),
                Some(p) => {
                    return Err(RuntimeError::Compile(format!(
                        "prefix state {name} has {} values, expected {per_seq}",
                        p.len()
                    )));
                }
                None => vec![0.0; per_seq * batch],
            };
            states.insert(name, data);
        }
        let meta = if prefix.is_empty() { 0 } else { model.spec.meta_tokens as usize };
        Ok(Session {
            model,
            device,
            batch,
            states,
            cached: vec![meta; batch],
            decode_mem: None,
            history: vec![Vec::new(); batch],
            profile: None,
        })
    }

    /// Times every kernel of later decode steps (synchronising after each).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = if on { Some(Default::default()) } else { None };
    }

    /// The kernel times collected since profiling was switched on.
    pub fn take_profile(&mut self) -> crate::bench::Profile {
        self.profile.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens cached per sequence (meta tokens included).
    pub fn cached(&self) -> &[usize] {
        &self.cached
    }

    /// Every token fed to each sequence so far.
    pub fn history(&self) -> &[Vec<u32>] {
        &self.history
    }

    fn check_tokens(&self, tokens: impl Iterator<Item = u32>) -> Result<Vec<i32>, RuntimeError> {
        let vocab = self.model.spec.vocab;
        tokens
            .map(|t| {
                if u64::from(t) < vocab {
                    Ok(t as i32)
                } else {
                    Err(RuntimeError::Input(format!("token id {t} is outside the vocabulary (size {vocab})")))
                }
            })
            .collect()
    }

    /// Brings the states back from the decode memory (before a prefill continues the sequences).
    fn pull_states(&mut self) -> Result<(), RuntimeError> {
        let Some((mem, _)) = self.decode_mem.take() else { return Ok(()) };
        let p = &self.model.decode.program;
        for (name, _, _) in state_buffers(p, &self.bindings(1))? {
            if let Some(out) = output_buffer(p, &name)
                && let HostData::F32(v) = self.device.download(p, &mem, out)?
            {
                self.states.insert(name, v);
            }
        }
        Ok(())
    }

    fn bindings(&self, t: usize) -> Bindings {
        Bindings { b: self.batch as i64, t: t as i64, s: self.cached.iter().copied().max().unwrap_or(0) as i64 }
    }

    /// Feeds each sequence its prompt (lengths may differ; an empty prompt leaves a sequence as it is)
    /// and returns, per sequence, the f32 logits of every prompt position (`len × vocab`).
    pub fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        if prompts.len() != self.batch {
            return Err(RuntimeError::Input(format!(
                "the session has {} sequences but {} prompts were given",
                self.batch,
                prompts.len()
            )));
        }
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if t == 0 {
            return Ok(vec![Vec::new(); self.batch]);
        }
        let max_seq = self.model.spec.max_seq as usize;
        for (b, p) in prompts.iter().enumerate() {
            if self.cached[b] + p.len() > max_seq {
                return Err(RuntimeError::Input(format!(
                    "sequence {b} would hold {} tokens, more than the model's max_seq of {max_seq}",
                    self.cached[b] + p.len()
                )));
            }
        }
        self.pull_states()?;
        let mut tokens = Vec::with_capacity(self.batch * t);
        for p in prompts {
            tokens.extend(self.check_tokens(p.iter().copied())?);
            tokens.extend(std::iter::repeat_n(0, t - p.len()));
        }
        let at = self.bindings(t);
        let entry = &self.model.prefill;
        let prog = &entry.program;
        let mut mem = self.model.instantiate(self.device, entry, &at)?;
        let start: Vec<i32> = self.cached.iter().map(|c| *c as i32).collect();
        let lens: Vec<i32> = prompts.iter().map(|p| p.len() as i32).collect();
        for (name, data) in
            [("tokens", HostData::I32(tokens)), ("start", HostData::I32(start)), ("lens", HostData::I32(lens))]
        {
            if let Some(b) = input_buffer(prog, name) {
                self.device.upload(&mut mem, b, data)?;
            }
        }
        let names = state_buffers(prog, &at)?;
        for (name, id, _) in &names {
            let data = self.states.remove(name).unwrap_or_default();
            self.device.upload(&mut mem, *id, HostData::F32(data))?;
        }
        entry.run(self.device, &mut mem, &at, Phase::Step)?;
        for (name, _, _) in &names {
            let out = output_buffer(prog, name)
                .ok_or_else(|| RuntimeError::Compile(format!("state {name} has no output")))?;
            if let HostData::F32(v) = self.device.download(prog, &mem, out)? {
                self.states.insert(name.clone(), v);
            }
        }
        let logits_buf =
            output_buffer(prog, "logits").ok_or_else(|| RuntimeError::Compile("no logits output".into()))?;
        let logits = match self.device.download(prog, &mem, logits_buf)? {
            HostData::F32(v) => v,
            HostData::I32(_) => return Err(RuntimeError::Compile("logits are not float".into())),
        };
        let vocab = self.model.spec.vocab as usize;
        let mut out = Vec::with_capacity(self.batch);
        for (b, p) in prompts.iter().enumerate() {
            let base = b * t * vocab;
            out.push(logits[base..base + p.len() * vocab].to_vec());
            self.cached[b] += p.len();
            self.history[b].extend_from_slice(p);
        }
        Ok(out)
    }

    /// Feeds one token to every sequence and returns each sequence's next-token logits (`vocab`).
    pub fn decode(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        if tokens.len() != self.batch {
            return Err(RuntimeError::Input(format!(
                "the session has {} sequences but {} tokens were given",
                self.batch,
                tokens.len()
            )));
        }
        let max_seq = self.model.spec.max_seq as usize;
        if let Some(b) = self.cached.iter().position(|c| *c + 1 > max_seq) {
            return Err(RuntimeError::Input(format!(
                "sequence {b} has reached the model's max_seq of {max_seq} tokens"
            )));
        }
        let ids = self.check_tokens(tokens.iter().copied())?;
        let entry = &self.model.decode;
        let prog = &entry.program;
        if self.decode_mem.is_none() {
            let at = self.bindings(1);
            let mut mem = self.model.instantiate(self.device, entry, &at)?;
            for (name, id, _) in state_buffers(prog, &at)? {
                let data = self.states.remove(&name).unwrap_or_default();
                self.device.upload(&mut mem, id, HostData::F32(data))?;
            }
            self.decode_mem = Some((mem, at));
        }
        let Some((mem, at)) = self.decode_mem.as_mut() else {
            return Err(RuntimeError::Compile("no decode memory".into()));
        };
        let at = *at;
        let start: Vec<i32> = self.cached.iter().map(|c| *c as i32).collect();
        for (name, data) in [("tokens", HostData::I32(ids)), ("start", HostData::I32(start))] {
            if let Some(b) = input_buffer(prog, name) {
                self.device.upload(mem, b, data)?;
            }
        }
        match self.profile.as_mut() {
            None => {
                entry.run(self.device, mem, &at, Phase::Step)?;
            }
            Some(profile) => {
                for k in &prog.kernels {
                    let t = std::time::Instant::now();
                    self.device.run(prog, k, mem)?;
                    self.device.synchronize()?;
                    let e = profile
                        .entry(k.name.clone())
                        .or_insert_with(|| crate::bench::KernelTime { name: k.name.clone(), ..Default::default() });
                    e.calls += 1;
                    e.seconds += t.elapsed().as_secs_f64();
                }
            }
        }
        let logits_buf =
            output_buffer(prog, "logits").ok_or_else(|| RuntimeError::Compile("no logits output".into()))?;
        let logits = match self.device.download(prog, mem, logits_buf)? {
            HostData::F32(v) => v,
            HostData::I32(_) => return Err(RuntimeError::Compile("logits are not float".into())),
        };
        let vocab = self.model.spec.vocab as usize;
        for (b, t) in tokens.iter().enumerate() {
            self.cached[b] += 1;
            self.history[b].push(*t);
        }
        Ok(logits.chunks(vocab).map(<[f32]>::to_vec).collect())
    }
}
