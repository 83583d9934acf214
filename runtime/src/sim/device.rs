//! device: the `sim` device behind the `Device` interface — program memory in a [`GlobalMemory`]
//! laid out as on the GPU, kernel groups run as kir kernels on the interpreter.
//!
//! Every buffer is stored in its declared gir dtype (bf16 and f16 as 2 bytes, rounded to nearest even
//! on upload and widened exactly on download; f32 and i32 as 4 bytes): the activation arena as one
//! allocation at the plan's byte offsets, and one allocation per input, state, prepared buffer and
//! weight. Memory starts zero-filled, as the `Device` interface promises.
//!
//! `run` asks codegen's dispatcher (`kernels::dispatch::generate`) for a group's kernels once per
//! program instance (cached in [`SimMemory`]), binds every launch rule at the instance's sizes
//! (buffers to their device addresses, views at their byte offsets, sizes evaluated), gives each
//! scratch buffer the dispatcher lists its own zero-filled allocation, clears zeroed arena storage
//! before the first kernel of its lifetime (as the schedule asks), and interprets the kernels in
//! order. A group the dispatcher cannot generate fails with its reason. [`SimMemory::stats`] sums
//! what the launches executed.

use std::collections::BTreeMap;
use std::sync::Arc;

use flashc_codegen::host::plan::StorageClass;
use flashc_codegen::host::{LaunchPlan, Launched};
use flashc_codegen::kernels::Generated;
use flashc_codegen::kernels::dispatch::{self, Dispatched};
use flashc_codegen::kir::ParamTy;
use flashc_compiler::gir::{Bindings, DType};
use flashc_compiler::schedule::{BufferId, BufferKind, KernelGroup, KernelId, Program};

use super::{Arg, GlobalMemory, Launch, SimError, Stats};
use crate::device::{Device, GroupKernels, HostData, RuntimeError};

/// The kir interpreter device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sim;

/// Where a root buffer lives.
#[derive(Clone, Copy, Debug)]
struct Slot {
    addr: u64,
    dtype: DType,
    elements: usize,
}

/// Memory of one program instance on the sim.
#[derive(Debug)]
pub struct SimMemory {
    at: Bindings,
    /// Device memory (kernels and tests may read and write it directly).
    pub global: GlobalMemory,
    arena: u64,
    /// Inputs, states, prepared buffers and (once shared) weights, by root buffer.
    slots: BTreeMap<BufferId, Slot>,
    /// Weights not yet attached: their dtype and element count.
    weights: BTreeMap<BufferId, (DType, usize)>,
    /// Each group's kernels, generated on its first run.
    generated: BTreeMap<KernelId, Arc<Dispatched>>,
    /// Each group's scratch allocations, by placeholder id.
    scratch: BTreeMap<(KernelId, BufferId), u64>,
    /// Scratch allocations of a compiled schedule's slots, by slot index.
    slot_scratch: BTreeMap<usize, u64>,
    /// What the launches executed so far (summed; `shared_bytes` is the largest).
    pub stats: Stats,
    /// Kernel launches so far.
    pub launches: u64,
}

impl SimMemory {
    pub fn bindings(&self) -> Bindings {
        self.at
    }

    /// The device address of a buffer (arena buffers at their planned offset; aliases at their root).
    pub fn address(&self, program: &Program, buffer: BufferId) -> Result<u64, RuntimeError> {
        let b = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
        let root = program.buffer(b.root()).unwrap_or(b);
        if root.kind.in_arena() {
            let off = root.offset.as_ref().map(|o| o.eval(&self.at)).unwrap_or(0);
            let off =
                u64::try_from(off).map_err(|_| RuntimeError::Input(format!("{} has a negative offset", root.id)))?;
            return Ok(self.arena + off);
        }
        self.slots
            .get(&root.id)
            .map(|s| s.addr)
            .ok_or_else(|| RuntimeError::Input(format!("buffer {buffer} has no storage (a weight not shared yet?)")))
    }
}

impl SimMemory {
    /// Writes any buffer of `program` (an activation in the arena included), in its dtype: for tests
    /// that run one kernel group on given operands.
    pub fn write(&mut self, program: &Program, buffer: BufferId, data: &HostData) -> Result<(), RuntimeError> {
        let (dtype, n) = elements(program, buffer, &self.at)?;
        if data.len() != n {
            return Err(RuntimeError::Input(format!("buffer {buffer} holds {n} values, {} given", data.len())));
        }
        let bytes = encode(dtype, data).map_err(|m| RuntimeError::Input(format!("buffer {buffer}: {m}")))?;
        let addr = self.address(program, buffer)?;
        self.global.write(addr, &bytes).map_err(device_error)
    }
}

fn elements(program: &Program, buffer: BufferId, at: &Bindings) -> Result<(DType, usize), RuntimeError> {
    let b = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
    let n = b.ty.numel().eval(at);
    let n = usize::try_from(n).map_err(|_| RuntimeError::Input(format!("{buffer} has {n} elements at these sizes")))?;
    Ok((b.ty.dtype, n))
}

fn device_error(e: SimError) -> RuntimeError {
    RuntimeError::Device(e.to_string())
}

/// Host values in a dtype's storage format (bf16 and f16 rounded to nearest even).
pub(crate) fn encode(dtype: DType, data: &HostData) -> Result<Vec<u8>, String> {
    Ok(match (dtype, data) {
        (DType::F32, HostData::F32(v)) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (DType::Bf16, HostData::F32(v)) => v.iter().flat_map(|x| super::f32_to_bf16(*x).to_le_bytes()).collect(),
        (DType::F16, HostData::F32(v)) => v.iter().flat_map(|x| super::f32_to_f16(*x).to_le_bytes()).collect(),
        (DType::I32, HostData::I32(v)) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (d, HostData::F32(_)) => return Err(format!("f32 data for a {d:?} buffer")),
        (d, HostData::I32(_)) => return Err(format!("i32 data for a {d:?} buffer")),
    })
}

/// Host values of bytes in a dtype's storage format (widened exactly).
pub(crate) fn decode(dtype: DType, bytes: &[u8]) -> HostData {
    match dtype {
        DType::F32 => {
            HostData::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        DType::Bf16 => {
            HostData::F32(bytes.chunks_exact(2).map(|c| super::bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
        }
        DType::F16 => {
            HostData::F32(bytes.chunks_exact(2).map(|c| super::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
        }
        DType::I32 => {
            HostData::I32(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
    }
}

/// A zero-filled allocation.
fn alloc_zeroed(mem: &mut GlobalMemory, bytes: usize) -> Result<u64, RuntimeError> {
    let addr = mem.alloc(bytes);
    mem.write(addr, &vec![0; bytes]).map_err(device_error)?;
    Ok(addr)
}

/// A bound argument in the type of the parameter that receives it.
fn typed(value: u64, ty: ParamTy, what: &str) -> Result<Arg, RuntimeError> {
    let narrow = |v: u64| {
        u32::try_from(v).map_err(|_| RuntimeError::Input(format!("{what}: {v} does not fit a 32-bit parameter")))
    };
    Ok(match ty {
        ParamTy::Ptr => Arg::Ptr(value),
        ParamTy::U64 => Arg::U64(value),
        ParamTy::U32 => Arg::U32(narrow(value)?),
        ParamTy::S32 => Arg::S32(narrow(value)? as i32),
        ParamTy::F32 => Arg::F32(f32::from_bits(narrow(value)?)),
    })
}

impl SimMemory {
    /// The kernels of `group`, generated on first use.
    fn kernels(&mut self, program: &Program, group: &KernelGroup) -> Result<Arc<Dispatched>, RuntimeError> {
        if let Some(d) = self.generated.get(&group.id) {
            return Ok(d.clone());
        }
        let d = Arc::new(dispatch::generate(program, group).map_err(|e| {
            RuntimeError::Compile(format!(
                "{e}: the sim cannot run this group; run the model on the cpu device, or store it in bf16"
            ))
        })?);
        self.generated.insert(group.id, d.clone());
        Ok(d)
    }

    /// The address of a buffer named by a launch rule: a program buffer or one of the group's scratch.
    fn bind_buffer(
        &mut self,
        program: &Program,
        group: &KernelGroup,
        d: &Dispatched,
        id: BufferId,
    ) -> Result<u64, RuntimeError> {
        let Some(s) = d.scratch.iter().find(|s| s.id == id) else {
            return self.address(program, id);
        };
        if let Some(a) = self.scratch.get(&(group.id, id)) {
            return Ok(*a);
        }
        let bytes = s.bytes.eval(&self.at);
        let bytes = usize::try_from(bytes)
            .map_err(|_| RuntimeError::Input(format!("{}: scratch `{}` would be {bytes} bytes", group.id, s.what)))?;
        let addr = alloc_zeroed(&mut self.global, bytes.max(1))?;
        self.scratch.insert((group.id, id), addr);
        Ok(addr)
    }

    /// Before `group`'s first kernel runs: checks the row limit of its kernels `d` and clears
    /// zeroed storage whose lifetime starts here.
    fn begin_group(&mut self, program: &Program, group: &KernelGroup, d: &Dispatched) -> Result<(), RuntimeError> {
        crate::device::check_rows(group, d, &self.at)?;
        self.clear_zeroed(program, group)
    }

    /// Interprets one kernel with raw 64-bit arguments (typed by its parameters) and adds up what
    /// it executed.
    fn launch_kernel(&mut self, g: &Generated, launch: &Launch, raw: &[u64]) -> Result<(), RuntimeError> {
        if raw.len() != g.kernel.params.len() {
            return Err(RuntimeError::Compile(format!(
                "{}: {} arguments for {} parameters",
                g.kernel.name,
                raw.len(),
                g.kernel.params.len()
            )));
        }
        let args = raw
            .iter()
            .zip(&g.kernel.params)
            .map(|(v, p)| typed(*v, p.ty, &format!("{} parameter `{}`", g.kernel.name, p.name)))
            .collect::<Result<Vec<_>, _>>()?;
        let stats = super::run(&g.kernel, launch, &args, &mut self.global).map_err(device_error)?;
        self.launches += 1;
        self.stats.blocks += stats.blocks;
        self.stats.instructions += stats.instructions;
        self.stats.thread_instructions += stats.thread_instructions;
        self.stats.barriers += stats.barriers;
        self.stats.shared_bytes = self.stats.shared_bytes.max(stats.shared_bytes);
        Ok(())
    }

    /// Clears the zeroed arena storage whose lifetime starts at `group`.
    fn clear_zeroed(&mut self, program: &Program, group: &KernelGroup) -> Result<(), RuntimeError> {
        for (_, off, bytes) in crate::device::zeroed_at(program, group, &self.at)? {
            self.global.write(self.arena + off, &vec![0; bytes]).map_err(device_error)?;
        }
        Ok(())
    }
}

impl Device for Sim {
    type Memory = SimMemory;

    fn name(&self) -> &'static str {
        "sim"
    }

    fn allocate(&self, program: &Program, at: &Bindings) -> Result<SimMemory, RuntimeError> {
        let mut global = GlobalMemory::new();
        let arena_bytes = program.arena_bytes(at);
        let arena_bytes = usize::try_from(arena_bytes)
            .map_err(|_| RuntimeError::Input(format!("the activation arena would be {arena_bytes} bytes")))?;
        let arena = alloc_zeroed(&mut global, arena_bytes)?;
        let mut slots = BTreeMap::new();
        let mut weights = BTreeMap::new();
        for b in program.buffers.iter().filter(|b| b.alias.is_none()) {
            let (dtype, n) = elements(program, b.id, at)?;
            match b.kind {
                BufferKind::Input | BufferKind::State | BufferKind::Prepared => {
                    let addr = alloc_zeroed(&mut global, n * dtype.size() as usize)?;
                    slots.insert(b.id, Slot { addr, dtype, elements: n });
                }
                BufferKind::Weight => {
                    weights.insert(b.id, (dtype, n));
                }
                BufferKind::Activation | BufferKind::Output => {}
            }
        }
        Ok(SimMemory {
            at: *at,
            global,
            arena,
            slots,
            weights,
            generated: BTreeMap::new(),
            scratch: BTreeMap::new(),
            slot_scratch: BTreeMap::new(),
            stats: Stats::default(),
            launches: 0,
        })
    }

    fn share_weight(&self, mem: &mut SimMemory, buffer: BufferId, data: Arc<Vec<f32>>) -> Result<(), RuntimeError> {
        let (dtype, n) = match (mem.weights.get(&buffer), mem.slots.get(&buffer)) {
            (Some(w), _) => *w,
            (None, Some(s)) => (s.dtype, s.elements),
            (None, None) => return Err(RuntimeError::Input(format!("buffer {buffer} is not a weight"))),
        };
        if data.len() != n {
            return Err(RuntimeError::Input(format!("weight {buffer} has {n} elements, {} given", data.len())));
        }
        let bytes = encode(dtype, &HostData::F32(data.as_ref().clone())).map_err(RuntimeError::Input)?;
        let addr = match mem.slots.get(&buffer) {
            Some(s) => s.addr,
            None => mem.global.alloc(bytes.len()),
        };
        mem.global.write(addr, &bytes).map_err(device_error)?;
        mem.slots.insert(buffer, Slot { addr, dtype, elements: n });
        Ok(())
    }

    fn upload(&self, mem: &mut SimMemory, buffer: BufferId, data: HostData) -> Result<(), RuntimeError> {
        let Some(slot) = mem.slots.get(&buffer).copied() else {
            return Err(RuntimeError::Input(format!("buffer {buffer} cannot be uploaded to")));
        };
        if data.len() != slot.elements {
            return Err(RuntimeError::Input(format!(
                "buffer {buffer} holds {} values of its type, {} given",
                slot.elements,
                data.len()
            )));
        }
        let bytes = encode(slot.dtype, &data).map_err(|m| RuntimeError::Input(format!("buffer {buffer}: {m}")))?;
        mem.global.write(slot.addr, &bytes).map_err(device_error)
    }

    fn download(&self, program: &Program, mem: &SimMemory, buffer: BufferId) -> Result<HostData, RuntimeError> {
        let (dtype, n) = elements(program, buffer, &mem.at)?;
        let addr = mem.address(program, buffer)?;
        let bytes = mem.global.read(addr, n * dtype.size() as usize).map_err(device_error)?;
        Ok(decode(dtype, &bytes))
    }

    fn run(&self, program: &Program, group: &KernelGroup, mem: &mut SimMemory) -> Result<(), RuntimeError> {
        let d = mem.kernels(program, group)?;
        mem.begin_group(program, group, &d)?;
        let at = mem.at;
        for g in d.kernels.iter() {
            let grid = g.launch.grid_at(&at);
            if grid.contains(&0) {
                continue;
            }
            if g.launch.args.len() != g.kernel.params.len() {
                return Err(RuntimeError::Compile(format!(
                    "{}: {} launch arguments for {} parameters",
                    g.kernel.name,
                    g.launch.args.len(),
                    g.kernel.params.len()
                )));
            }
            let args =
                crate::device::bind_args(&g.launch, &g.kernel.name, &at, |b| mem.bind_buffer(program, group, &d, b))?;
            let launch = Launch { grid, block: g.launch.block, dynamic_shared: g.launch.dynamic_shared };
            mem.launch_kernel(g, &launch, &args)?;
        }
        Ok(())
    }

    fn bases(&self, program: &Program, plan: &LaunchPlan, mem: &mut SimMemory) -> Result<Vec<u64>, RuntimeError> {
        let mut bases = Vec::with_capacity(plan.slots.len());
        for (i, slot) in plan.slots.iter().enumerate() {
            bases.push(match (slot.class, slot.buffer, &slot.bytes) {
                (StorageClass::Arena, _, _) => mem.arena,
                (StorageClass::Scratch, _, Some(bytes)) => {
                    if let Some(a) = mem.slot_scratch.get(&i) {
                        *a
                    } else {
                        let n = bytes.eval(&mem.at);
                        let n = usize::try_from(n)
                            .map_err(|_| RuntimeError::Input(format!("scratch `{}` would be {n} bytes", slot.name)))?;
                        let a = alloc_zeroed(&mut mem.global, n.max(1))?;
                        mem.slot_scratch.insert(i, a);
                        a
                    }
                }
                (_, Some(b), _) => mem.address(program, b)?,
                _ => return Err(RuntimeError::Compile(format!("slot {i} (`{}`) has no storage", slot.name))),
            });
        }
        Ok(bases)
    }

    fn launch(
        &self,
        program: &Program,
        mem: &mut SimMemory,
        launch: &Launched<'_>,
        kernels: Option<&Dispatched>,
    ) -> Result<(), RuntimeError> {
        let group = crate::device::group(program, launch.kernel)?;
        let generated;
        let d = match kernels {
            Some(d) => d,
            None => {
                generated = mem.kernels(program, group)?;
                generated.as_ref()
            }
        };
        if launch.part == 0 {
            mem.begin_group(program, group, d)?;
        }
        let g = crate::device::scheduled_kernel(group, d, launch)?;
        let sim_launch = Launch { grid: launch.grid, block: launch.block, dynamic_shared: launch.shared };
        mem.launch_kernel(g, &sim_launch, launch.args)
    }

    fn kernels(&self, program: &Program) -> Result<GroupKernels, RuntimeError> {
        Ok(crate::device::generated_kernels(program))
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}
