//! device: the interface every device implements (`cpu` now; `sim` and `cuda` behind the same calls).
//!
//! A device runs one scheduled `Program` at a time on memory it allocated for that program at given
//! sizes (`Bindings`: B, T, S): the activation arena laid out by the program's buffer plan, and one
//! allocation per input, state and prepared weight. Weights are shared between the programs of a model
//! (prefill and decode) without copies. Callers only use these calls, so a new device changes no caller.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use flashc_codegen::host::{LaunchPlan, Launched};
use flashc_codegen::kernels::dispatch::Dispatched;
use flashc_codegen::kernels::{ArgRule, LaunchRule};

/// Each group's generated kernels, by group.
pub type GroupKernels = BTreeMap<KernelId, Arc<Dispatched>>;
use flashc_compiler::gir::Bindings;
use flashc_compiler::schedule::{BufferId, KernelGroup, KernelId, Program};

use crate::cpu::KernelError;
use crate::weights::WeightError;

/// Data on the host side of an upload or download.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl HostData {
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn into_f32(self) -> Option<Vec<f32>> {
        match self {
            HostData::F32(v) => Some(v),
            HostData::I32(_) => None,
        }
    }
}

/// Everything that can go wrong while running a model.
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeError {
    /// Weights could not be read or do not match the model.
    Weights(WeightError),
    /// A kernel refused its operands (an index out of range, a size mismatch).
    Kernel { kernel: String, error: KernelError },
    /// The model could not be compiled (an internal error of the compiler).
    Compile(String),
    /// A request the runtime cannot serve (a token id out of range, a sequence longer than the cache).
    Input(String),
    /// A device problem (no driver, out of memory).
    Device(String),
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Weights(e) => write!(f, "{e}"),
            RuntimeError::Kernel { kernel, error } => write!(f, "kernel {kernel} failed: {error}"),
            RuntimeError::Compile(e) => write!(f, "{e}"),
            RuntimeError::Input(e) => write!(f, "{e}"),
            RuntimeError::Device(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RuntimeError {}

impl From<WeightError> for RuntimeError {
    fn from(e: WeightError) -> RuntimeError {
        RuntimeError::Weights(e)
    }
}

/// A device that runs scheduled programs.
pub trait Device {
    /// The memory of one program instance on this device.
    type Memory;

    /// The device's name (`cpu`, `sim`, `cuda`).
    fn name(&self) -> &'static str;

    /// Allocates memory for `program` at sizes `at`: the arena, every input, state and prepared
    /// buffer, zero-filled. Weights are attached with `share_weight`.
    fn allocate(&self, program: &Program, at: &Bindings) -> Result<Self::Memory, RuntimeError>;

    /// Attaches a weight or a prepared weight (shared, not copied where the device allows).
    fn share_weight(&self, mem: &mut Self::Memory, buffer: BufferId, data: Arc<Vec<f32>>) -> Result<(), RuntimeError>;

    /// Copies host data into a buffer (inputs, states).
    fn upload(&self, mem: &mut Self::Memory, buffer: BufferId, data: HostData) -> Result<(), RuntimeError>;

    /// Copies any buffer of `program` (an output, a state, an activation still in the arena) back to
    /// the host.
    fn download(&self, program: &Program, mem: &Self::Memory, buffer: BufferId) -> Result<HostData, RuntimeError>;

    /// Runs one kernel group of `program`.
    fn run(&self, program: &Program, kernel: &KernelGroup, mem: &mut Self::Memory) -> Result<(), RuntimeError>;

    /// Waits until every kernel issued so far has finished.
    fn synchronize(&self) -> Result<(), RuntimeError>;

    /// The generated kernels this device launches for each group of `program`, for the compiled
    /// host schedule (which plans their launch rules and scratch, and hands each launch its
    /// group's kernels). A group without an entry runs whole from its default launch (the cpu runs
    /// every group that way).
    fn kernels(&self, _program: &Program) -> Result<GroupKernels, RuntimeError> {
        Ok(BTreeMap::new())
    }

    /// The base-pointer table of `plan` (one address per slot, in slot order) for `mem`; scratch
    /// slots are allocated on first use. Devices without addresses (the cpu) return zeros.
    fn bases(&self, program: &Program, plan: &LaunchPlan, mem: &mut Self::Memory) -> Result<Vec<u64>, RuntimeError>;

    /// Performs one launch of the compiled host schedule: part `launch.part` of group
    /// `launch.kernel`, with the grid, block and arguments the schedule computed; `kernels` is the
    /// group's entry of `Device::kernels`, if it has one.
    fn launch(
        &self,
        program: &Program,
        mem: &mut Self::Memory,
        launch: &Launched<'_>,
        kernels: Option<&Dispatched>,
    ) -> Result<(), RuntimeError>;

    /// Replays the recording of a decode step made on `mem` for exactly these base pointers and
    /// sizes, if there is one (CUDA graphs); returns the launches it holds. Devices that do not
    /// record return `None`, and the schedule runs.
    fn replay(&self, _mem: &mut Self::Memory, _bases: &[u64], _at: &Bindings) -> Result<Option<usize>, RuntimeError> {
        Ok(None)
    }

    /// Whether the next decode step on `mem` should be recorded (after `begin_recording`, launches
    /// are recorded, not run, until `end_recording`).
    fn wants_recording(&self, _mem: &Self::Memory) -> bool {
        false
    }

    fn begin_recording(&self, _mem: &mut Self::Memory) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Ends a recording. With `keep`, the recording (of `launches` launches, for these base
    /// pointers and sizes) is kept and run once; otherwise it is discarded. After a failure,
    /// `wants_recording` must say `false` for this memory (the schedule then reruns the step
    /// without recording).
    fn end_recording(
        &self,
        _mem: &mut Self::Memory,
        _keep: Option<(&[u64], &Bindings, usize)>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// The kernel group of `program` (prep or step) with the given id.
pub fn group(program: &Program, id: KernelId) -> Result<&KernelGroup, RuntimeError> {
    program
        .prep
        .iter()
        .chain(&program.kernels)
        .find(|k| k.id == id)
        .ok_or_else(|| RuntimeError::Compile(format!("the schedule launched {id}, which the program does not have")))
}

/// The raw 64-bit values of a launch rule's arguments at sizes `at` (each parameter widened as the
/// host schedule passes it): `address` gives a buffer's device address (scratch included); a view
/// adds its byte offset; a size must fit in a `u32`.
pub(crate) fn bind_args(
    rule: &LaunchRule,
    kernel: &str,
    at: &Bindings,
    mut address: impl FnMut(BufferId) -> Result<u64, RuntimeError>,
) -> Result<Vec<u64>, RuntimeError> {
    rule.args
        .iter()
        .map(|a| match a {
            ArgRule::Buffer(b) => address(*b),
            ArgRule::View(b, off) => {
                let base = address(*b)?;
                let off = off.eval(at);
                let off = u64::try_from(off)
                    .map_err(|_| RuntimeError::Input(format!("{kernel}: a view of {b} at offset {off}")))?;
                Ok(base.wrapping_add(off))
            }
            ArgRule::Size(d) => {
                let v = d.eval(at);
                u32::try_from(v)
                    .map(u64::from)
                    .map_err(|_| RuntimeError::Input(format!("{kernel}: the size {d} is {v} here, not a u32")))
            }
            ArgRule::U32(v) => Ok(u64::from(*v)),
            ArgRule::F32(v) => Ok(u64::from(v.to_bits())),
        })
        .collect()
}

/// The generated kernels of the groups of `program` (the `sim` and `cuda` devices' kernels). A
/// group without a generator keeps its default launch: launching it is the device's error, naming
/// the group and the reason, so a model whose prepared weights come from another device still runs.
pub(crate) fn generated_kernels(program: &Program) -> GroupKernels {
    flashc_codegen::kernels::dispatch::generate_all(program)
        .into_iter()
        .filter_map(|(k, d)| d.ok().map(|d| (k.id, Arc::new(d))))
        .collect()
}

/// Refuses a group whose generated kernels compute fewer rows than the group has at `at`
/// (`Dispatched::max_rows`: the decode GEMV's batch limit): they would silently skip rows.
pub(crate) fn check_rows(
    group: &KernelGroup,
    d: &flashc_codegen::kernels::dispatch::Dispatched,
    at: &Bindings,
) -> Result<(), RuntimeError> {
    let Some(max) = d.max_rows else { return Ok(()) };
    let rows = match &group.launch {
        flashc_compiler::schedule::Launch::Matmul { batch, m, .. } => batch.mul(m).eval(at),
        _ => at.b * at.t,
    };
    if rows > i64::from(max) {
        return Err(RuntimeError::Input(format!(
            "{} ({}): {rows} rows, and its kernels compute at most {max}",
            group.id, group.name
        )));
    }
    Ok(())
}

/// The zeroed arena storage whose lifetime starts at `group`: (root buffer, byte offset, bytes) at
/// `at`. The device clears it before the group's first kernel.
pub(crate) fn zeroed_at(
    program: &Program,
    group: &KernelGroup,
    at: &Bindings,
) -> Result<Vec<(BufferId, u64, usize)>, RuntimeError> {
    let mut out = Vec::new();
    for b in program.buffers.iter().filter(|b| b.zeroed && b.alias.is_none() && b.kind.in_arena()) {
        if b.live.is_some_and(|(first, _)| first == group.id) {
            let off = b.offset.as_ref().map_or(0, |o| o.eval(at));
            let off = u64::try_from(off).map_err(|_| RuntimeError::Input(format!("{} has a negative offset", b.id)))?;
            let bytes = b.bytes.eval(at);
            let bytes =
                usize::try_from(bytes).map_err(|_| RuntimeError::Input(format!("{} has {bytes} bytes", b.id)))?;
            out.push((b.id, off, bytes));
        }
    }
    Ok(out)
}

/// The kernel a schedule launch names: part `launch.part` of the group's kernels `d`, with the block
/// the schedule planned (a mismatch means the schedule and the kernels disagree: an internal error).
pub(crate) fn scheduled_kernel<'a>(
    group: &KernelGroup,
    d: &'a Dispatched,
    launch: &Launched<'_>,
) -> Result<&'a flashc_codegen::kernels::Generated, RuntimeError> {
    d.kernels.get(launch.part as usize).filter(|g| g.launch.block == launch.block).ok_or_else(|| {
        RuntimeError::Compile(format!(
            "{}: the schedule's launch {} (block {:?}) is not one of the group's kernels",
            group.id, launch.part, launch.block
        ))
    })
}
