//! device: the `sim` device behind the `Device` interface — program memory in a [`GlobalMemory`]
//! laid out as on the GPU, kernel groups run as kir kernels on the interpreter.
//!
//! Every buffer is stored in its declared gir dtype (bf16 and f16 as 2 bytes, rounded to nearest even
//! on upload and widened exactly on download; f32 and i32 as 4 bytes): the activation arena as one
//! allocation at the plan's byte offsets, and one allocation per input, state, prepared buffer and
//! weight. Memory starts zero-filled, as the `Device` interface promises.
//!
//! Kernel groups need codegen's kernel generators, which do not exist yet: until they do, `run`
//! reports "no kernel generator for …". Wiring them is the one function [`generate`].

use std::collections::BTreeMap;
use std::sync::Arc;

use flashc_codegen::kir::Kernel;
use flashc_compiler::gir::{Bindings, DType};
use flashc_compiler::schedule::{BufferId, BufferKind, KernelGroup, Program};

use super::{GlobalMemory, Launch, SimError};
use crate::device::{Device, HostData, RuntimeError};

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

fn elements(program: &Program, buffer: BufferId, at: &Bindings) -> Result<(DType, usize), RuntimeError> {
    let b = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
    let n = b.ty.numel().eval(at);
    let n = usize::try_from(n).map_err(|_| RuntimeError::Input(format!("{buffer} has {n} elements at these sizes")))?;
    Ok((b.ty.dtype, n))
}

fn device_error(e: SimError) -> RuntimeError {
    RuntimeError::Device(e.to_string())
}

/// Host values in a dtype's storage format.
fn encode(dtype: DType, data: &HostData) -> Result<Vec<u8>, String> {
    Ok(match (dtype, data) {
        (DType::F32, HostData::F32(v)) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (DType::Bf16, HostData::F32(v)) => v.iter().flat_map(|x| super::f32_to_bf16(*x).to_le_bytes()).collect(),
        (DType::F16, HostData::F32(v)) => v.iter().flat_map(|x| super::f32_to_f16(*x).to_le_bytes()).collect(),
        (DType::I32, HostData::I32(v)) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (d, HostData::F32(_)) => return Err(format!("f32 data for a {d:?} buffer")),
        (d, HostData::I32(_)) => return Err(format!("i32 data for a {d:?} buffer")),
    })
}

fn decode(dtype: DType, bytes: &[u8]) -> HostData {
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

/// The kir kernel and launch for a kernel group: codegen's generators, once they exist.
fn generate(_program: &Program, group: &KernelGroup) -> Result<(Kernel, Launch), RuntimeError> {
    Err(RuntimeError::Device(format!("no kernel generator for {} ({})", group.name, group.id)))
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
        Ok(SimMemory { at: *at, global, arena, slots, weights })
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

    fn run(&self, program: &Program, kernel: &KernelGroup, _mem: &mut SimMemory) -> Result<(), RuntimeError> {
        let (_kernel, _launch) = generate(program, kernel)?;
        Err(RuntimeError::Device(format!("kernel {}: arguments cannot be bound yet", kernel.name)))
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}
