//! exec: the `cpu` device — runs a scheduled program's kernel groups with the reference kernels.
//!
//! Memory follows the program's buffer plan: one f32 arena for activations and outputs, indexed in
//! units of 2 bytes (the smallest float type the plan lays out), so every buffer sits at its planned
//! byte offset / 2 and no two live buffers overlap; inputs, states and prepared weights have their own
//! allocations; weights are shared `Arc`s. All values are f32 (i32 for token ids and lengths), whatever
//! the storage type the GPU would use.
//!
//! A kernel group is one node of the program's graph: a single op, or a fused node whose body is
//! interpreted op by op with temporaries. Operands updated in place (KV caches, conv, SSM and delta
//! states) are moved out of their buffer, updated, and moved back, never copied.

use std::collections::BTreeMap;
use std::sync::Arc;

use flashc_compiler::gir::{self, Bindings, Graph, InputRole, NodeId, Op, TensorType, Value};
use flashc_compiler::schedule::{BufferId, BufferKind, KernelGroup, Program};

use super::kernels as k;
use crate::device::{Device, HostData, RuntimeError};

/// The exact f32 reference device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// The cpu reference with every stored value rounded to its buffer's dtype (bf16, f16: to nearest
/// even), as the GPU kernels store them: uploads, weights and each kernel group's results. What is
/// left between it and the `sim` is the rounding inside the GPU kernels and their summation order,
/// so it is the tight reference for whole bf16 models on the sim; `Cpu` stays the exact oracle.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuRounded;

/// Bytes per arena element: the plan's offsets are multiples of this.
const UNIT: i64 = 2;

/// Memory of one program instance on the cpu.
#[derive(Debug)]
pub struct CpuMemory {
    at: Bindings,
    arena: Vec<f32>,
    /// Inputs, states and prepared weights, by root buffer.
    owned: BTreeMap<BufferId, Val>,
    /// Weights, by buffer.
    shared: BTreeMap<BufferId, Arc<Vec<f32>>>,
    /// Storage rounding (`CpuRounded`): the dtype of each root buffer.
    rounding: Option<BTreeMap<BufferId, gir::DType>>,
}

/// Rounds values to a storage dtype (bf16 and f16 to nearest even; others unchanged).
fn round_to(dtype: gir::DType, v: &mut [f32]) {
    use crate::sim::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
    match dtype {
        gir::DType::Bf16 => v.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x))),
        gir::DType::F16 => v.iter_mut().for_each(|x| *x = f16_to_f32(f32_to_f16(*x))),
        gir::DType::F32 | gir::DType::I32 => {}
    }
}

impl CpuMemory {
    /// Rounds `v` as buffer `root` stores it, when rounding storage.
    fn stored(&self, root: BufferId, mut v: Vec<f32>) -> Vec<f32> {
        if let Some(d) = self.rounding.as_ref().and_then(|m| m.get(&root)) {
            round_to(*d, &mut v);
        }
        v
    }
}

impl CpuMemory {
    pub fn bindings(&self) -> Bindings {
        self.at
    }
}

/// Concrete sizes of a type at the given bindings.
pub fn shape_of(ty: &TensorType, at: &Bindings) -> Result<Vec<usize>, RuntimeError> {
    ty.shape
        .iter()
        .map(|d| {
            let v = d.eval(at);
            usize::try_from(v).map_err(|_| RuntimeError::Input(format!("size {d} is negative ({v}) for these sizes")))
        })
        .collect()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Device for CpuRounded {
    type Memory = CpuMemory;

    fn name(&self) -> &'static str {
        "cpu-rounded"
    }

    fn allocate(&self, program: &Program, at: &Bindings) -> Result<CpuMemory, RuntimeError> {
        let mut mem = Cpu.allocate(program, at)?;
        mem.rounding = Some(program.buffers.iter().filter(|b| b.alias.is_none()).map(|b| (b.id, b.ty.dtype)).collect());
        Ok(mem)
    }

    fn share_weight(&self, mem: &mut CpuMemory, buffer: BufferId, data: Arc<Vec<f32>>) -> Result<(), RuntimeError> {
        Cpu.share_weight(mem, buffer, data)
    }

    fn upload(&self, mem: &mut CpuMemory, buffer: BufferId, data: HostData) -> Result<(), RuntimeError> {
        Cpu.upload(mem, buffer, data)
    }

    fn download(&self, program: &Program, mem: &CpuMemory, buffer: BufferId) -> Result<HostData, RuntimeError> {
        Cpu.download(program, mem, buffer)
    }

    fn run(&self, program: &Program, kernel: &KernelGroup, mem: &mut CpuMemory) -> Result<(), RuntimeError> {
        Cpu.run(program, kernel, mem)
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn bases(
        &self,
        program: &Program,
        plan: &flashc_codegen::host::LaunchPlan,
        mem: &mut CpuMemory,
    ) -> Result<Vec<u64>, RuntimeError> {
        Cpu.bases(program, plan, mem)
    }

    fn launch(
        &self,
        program: &Program,
        mem: &mut CpuMemory,
        launch: &flashc_codegen::host::Launched<'_>,
        kernels: Option<&flashc_codegen::kernels::dispatch::Dispatched>,
    ) -> Result<(), RuntimeError> {
        Cpu.launch(program, mem, launch, kernels)
    }
}

impl Device for Cpu {
    type Memory = CpuMemory;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn allocate(&self, program: &Program, at: &Bindings) -> Result<CpuMemory, RuntimeError> {
        let arena_bytes = program.arena_bytes(at);
        let arena_len = usize::try_from(arena_bytes / UNIT + 1)
            .map_err(|_| RuntimeError::Input(format!("the activation arena would be {arena_bytes} bytes")))?;
        let mut owned = BTreeMap::new();
        for b in &program.buffers {
            if b.alias.is_some() {
                continue;
            }
            match b.kind {
                BufferKind::Input | BufferKind::State | BufferKind::Prepared => {
                    let n = numel(&shape_of(&b.ty, at)?);
                    let data = if b.ty.dtype == gir::DType::I32 {
                        Val::I(Arc::new(vec![0; n]))
                    } else {
                        Val::F(Arc::new(vec![0.0; n]))
                    };
                    owned.insert(b.id, data);
                }
                _ => {}
            }
        }
        Ok(CpuMemory { at: *at, arena: vec![0.0; arena_len], owned, shared: BTreeMap::new(), rounding: None })
    }

    fn share_weight(&self, mem: &mut CpuMemory, buffer: BufferId, data: Arc<Vec<f32>>) -> Result<(), RuntimeError> {
        let data = match mem.rounding.as_ref().and_then(|m| m.get(&buffer)) {
            Some(gir::DType::Bf16 | gir::DType::F16) => Arc::new(mem.stored(buffer, data.as_ref().clone())),
            _ => data,
        };
        mem.shared.insert(buffer, data);
        Ok(())
    }

    fn upload(&self, mem: &mut CpuMemory, buffer: BufferId, data: HostData) -> Result<(), RuntimeError> {
        let data = match data {
            HostData::F32(v) if mem.rounding.is_some() => {
                let v = mem.stored(buffer, v);
                HostData::F32(v)
            }
            d => d,
        };
        let Some(slot) = mem.owned.get_mut(&buffer) else {
            return Err(RuntimeError::Input(format!("buffer {buffer} cannot be uploaded to")));
        };
        *slot = match (&*slot, data) {
            (Val::F(old), HostData::F32(v)) if old.len() == v.len() => Val::F(Arc::new(v)),
            (Val::I(old), HostData::I32(v)) if old.len() == v.len() => Val::I(Arc::new(v)),
            (old, data) => {
                return Err(RuntimeError::Input(format!(
                    "buffer {buffer} holds {} values of its type, {} given",
                    old.len(),
                    data.len()
                )));
            }
        };
        Ok(())
    }

    fn download(&self, program: &Program, mem: &CpuMemory, buffer: BufferId) -> Result<HostData, RuntimeError> {
        read(program, mem, buffer)
    }

    fn run(&self, program: &Program, kernel: &KernelGroup, mem: &mut CpuMemory) -> Result<(), RuntimeError> {
        run_kernel(program, kernel, mem)
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn bases(
        &self,
        _program: &Program,
        plan: &flashc_codegen::host::LaunchPlan,
        _mem: &mut CpuMemory,
    ) -> Result<Vec<u64>, RuntimeError> {
        Ok(vec![0; plan.slots.len()])
    }

    /// The cpu runs each group whole (its kernels are per group): the launch says which group, in
    /// the schedule's order; its grid and arguments are not needed.
    fn launch(
        &self,
        program: &Program,
        mem: &mut CpuMemory,
        launch: &flashc_codegen::host::Launched<'_>,
        _kernels: Option<&flashc_codegen::kernels::dispatch::Dispatched>,
    ) -> Result<(), RuntimeError> {
        if launch.part != 0 {
            return Err(RuntimeError::Compile(format!(
                "the cpu runs {} whole, but the schedule launched its kernel {}",
                launch.kernel, launch.part
            )));
        }
        let group = crate::device::group(program, launch.kernel)?;
        self.run(program, group, mem)
    }
}

/// Reads any buffer of a program (arena, input, state, prepared or weight) as host data.
pub fn read(program: &Program, mem: &CpuMemory, buffer: BufferId) -> Result<HostData, RuntimeError> {
    let b = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
    let n = numel(&shape_of(&b.ty, &mem.at)?);
    let root = b.root();
    let rb = program.buffer(root).ok_or_else(|| RuntimeError::Input(format!("no buffer {root}")))?;
    if rb.kind.in_arena() {
        let off = arena_offset(program, root, &mem.at)?;
        return Ok(HostData::F32(mem.arena[off..off + n].to_vec()));
    }
    if let Some(w) = mem.shared.get(&root) {
        return Ok(HostData::F32(w.as_ref().clone()));
    }
    if let Some(d) = mem.owned.get(&root) {
        return Ok(d.to_host());
    }
    Err(RuntimeError::Input(format!("buffer {buffer} has no storage")))
}

/// Moves a state buffer's data out without copying (leaving it empty until the next upload).
pub fn take(mem: &mut CpuMemory, buffer: BufferId) -> Option<Vec<f32>> {
    match mem.owned.get_mut(&buffer)? {
        Val::F(a) => Some(Arc::try_unwrap(std::mem::take(a)).unwrap_or_else(|a| a.as_ref().clone())),
        Val::I(_) => None,
    }
}

/// Puts state data into a buffer without copying (the inverse of `take`).
pub fn put(mem: &mut CpuMemory, buffer: BufferId, data: Vec<f32>) -> Result<(), RuntimeError> {
    match mem.owned.get_mut(&buffer) {
        Some(slot @ Val::F(_)) => {
            *slot = Val::F(Arc::new(data));
            Ok(())
        }
        _ => Err(RuntimeError::Input(format!("buffer {buffer} is not a float state"))),
    }
}

fn arena_offset(program: &Program, root: BufferId, at: &Bindings) -> Result<usize, RuntimeError> {
    let b = program.buffer(root).ok_or_else(|| RuntimeError::Input(format!("no buffer {root}")))?;
    let off = b.offset.as_ref().ok_or_else(|| RuntimeError::Input(format!("{root} has no arena offset")))?.eval(at);
    usize::try_from(off / UNIT).map_err(|_| RuntimeError::Input(format!("{root} has a negative offset")))
}

/// A value on the cpu: shared, so reads never copy and an in-place update copies only when the
/// value is still read elsewhere.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    F(Arc<Vec<f32>>),
    I(Arc<Vec<i32>>),
}

impl Val {
    fn len(&self) -> usize {
        match self {
            Val::F(v) => v.len(),
            Val::I(v) => v.len(),
        }
    }

    fn to_host(&self) -> HostData {
        match self {
            Val::F(v) => HostData::F32(v.as_ref().clone()),
            Val::I(v) => HostData::I32(v.as_ref().clone()),
        }
    }

    fn f(&self) -> &[f32] {
        match self {
            Val::F(v) => v,
            Val::I(_) => &[],
        }
    }

    fn i(&self) -> &[i32] {
        match self {
            Val::I(v) => v,
            Val::F(_) => &[],
        }
    }
}

fn kernel_err(kernel: &KernelGroup, error: k::KernelError) -> RuntimeError {
    RuntimeError::Kernel { kernel: format!("{} ({})", kernel.id, kernel.name), error }
}

fn run_kernel(program: &Program, kernel: &KernelGroup, mem: &mut CpuMemory) -> Result<(), RuntimeError> {
    let at = mem.at;
    let node =
        program.graph.node(kernel.node).ok_or_else(|| RuntimeError::Compile(format!("no node {}", kernel.node)))?;
    // Operands updated in place are moved out of their buffer (no copy); the rest are shared.
    let in_place: Vec<usize> = node.op.in_place(kernel.inputs.len()).iter().map(|(o, _)| *o).collect();
    let roots: Vec<BufferId> = kernel.inputs.iter().map(|b| program.buffer(*b).map_or(*b, |x| x.root())).collect();
    let mut ins = Vec::with_capacity(kernel.inputs.len());
    for (i, &b) in kernel.inputs.iter().enumerate() {
        let buf = program.buffer(b).ok_or_else(|| RuntimeError::Compile(format!("no buffer {b}")))?;
        let root = roots[i];
        let rb = program.buffer(root).unwrap_or(buf);
        let n = numel(&shape_of(&buf.ty, &at)?);
        let v = if rb.kind.in_arena() {
            let off = arena_offset(program, root, &at)?;
            if rb.zeroed { Val::F(Arc::new(vec![0.0; n])) } else { Val::F(Arc::new(mem.arena[off..off + n].to_vec())) }
        } else if let Some(w) = mem.shared.get(&root) {
            Val::F(w.clone())
        } else {
            let read_twice = roots.iter().filter(|r| **r == root).count() > 1;
            match mem.owned.get_mut(&root) {
                Some(Val::F(a)) if in_place.contains(&i) && !read_twice => Val::F(std::mem::take(a)),
                Some(v) => v.clone(),
                None => return Err(RuntimeError::Compile(format!("{b} ({}) has no storage", buf.name))),
            }
        };
        ins.push(v);
    }
    let results = match &node.op {
        Op::Fused(body) => eval_body(&body.graph, ins, &at).map_err(|e| kernel_err(kernel, e))?,
        op => {
            let types: Vec<TensorType> =
                program.graph.operands(kernel.node).iter().filter_map(|v| program.graph.ty(*v).ok().cloned()).collect();
            eval_op(op, &types, &node.types, ins, &at).map_err(|e| kernel_err(kernel, e))?
        }
    };
    // Write the results: arena buffers by copy, states and inputs by moving the value in.
    for (&b, mut val) in kernel.outputs.iter().zip(results) {
        let buf = program.buffer(b).ok_or_else(|| RuntimeError::Compile(format!("no buffer {b}")))?;
        let root = buf.root();
        let rb = program.buffer(root).unwrap_or(buf);
        if mem.rounding.is_some()
            && let Val::F(v) = &mut val
            && matches!(rb.ty.dtype, gir::DType::Bf16 | gir::DType::F16)
        {
            round_to(rb.ty.dtype, Arc::make_mut(v).as_mut_slice());
        }
        if rb.kind.in_arena() {
            let off = arena_offset(program, root, &at)?;
            let data = val.f();
            mem.arena[off..off + data.len()].copy_from_slice(data);
        } else if let Some(slot) = mem.owned.get_mut(&root) {
            *slot = val;
        } else {
            return Err(RuntimeError::Compile(format!("{b} ({}) cannot be written", buf.name)));
        }
    }
    // A state moved out for an in-place update that wrote no result back (an unused new state) is
    // restored empty-safe: every moved-out buffer must have been written.
    for (i, root) in roots.iter().enumerate() {
        if in_place.contains(&i)
            && let Some(Val::F(a)) = mem.owned.get(root)
            && a.is_empty()
            && program.buffer(*root).is_none_or(|b| numel(&shape_of(&b.ty, &at).unwrap_or_default()) != 0)
        {
            return Err(RuntimeError::Compile(format!(
                "{} updated {root} in place but did not write it back",
                kernel.id
            )));
        }
    }
    Ok(())
}

/// Host data as interpreter values.
fn to_vals(data: Vec<HostData>) -> Vec<Val> {
    data.into_iter()
        .map(|d| match d {
            HostData::F32(v) => Val::F(Arc::new(v)),
            HostData::I32(v) => Val::I(Arc::new(v)),
        })
        .collect()
}

/// Interprets a fused body on host data (the oracle of a generated kernel group in tests): params
/// are the group's operands, the results its outputs, in order.
pub fn eval_fused(g: &Graph, params: Vec<HostData>, at: &Bindings) -> Result<Vec<HostData>, k::KernelError> {
    Ok(eval_body(g, to_vals(params), at)?.iter().map(Val::to_host).collect())
}

/// Evaluates one kernel group on explicit operand values (in the group's input order) at `at` and
/// returns its results (in output order), touching no device memory: the reference a test compares a
/// generated kernel group against.
pub fn eval_group(
    program: &Program,
    kernel: &KernelGroup,
    inputs: Vec<HostData>,
    at: &Bindings,
) -> Result<Vec<HostData>, RuntimeError> {
    let node =
        program.graph.node(kernel.node).ok_or_else(|| RuntimeError::Compile(format!("no node {}", kernel.node)))?;
    let ins = to_vals(inputs);
    let results = match &node.op {
        Op::Fused(body) => eval_body(&body.graph, ins, at).map_err(|e| kernel_err(kernel, e))?,
        op => {
            let types: Vec<TensorType> =
                program.graph.operands(kernel.node).iter().filter_map(|v| program.graph.ty(*v).ok().cloned()).collect();
            eval_op(op, &types, &node.types, ins, at).map_err(|e| kernel_err(kernel, e))?
        }
    };
    Ok(results.iter().map(Val::to_host).collect())
}

/// Interprets a fused body: params are the kernel's operands, outputs its results.
fn eval_body(g: &Graph, params: Vec<Val>, at: &Bindings) -> Result<Vec<Val>, k::KernelError> {
    let mut params: Vec<Option<Val>> = params.into_iter().map(Some).collect();
    let mut vals: BTreeMap<Value, Val> = BTreeMap::new();
    let order = g.topo_order().map_err(|_| shape_err("fused", "cyclic body".to_string()))?;
    for n in order {
        let node = g.node(n).ok_or_else(|| shape_err("fused", format!("no node {n}")))?;
        if let Op::Input { role: InputRole::Param, index, .. } = &node.op {
            let v = params
                .get_mut(*index as usize)
                .and_then(Option::take)
                .ok_or_else(|| shape_err("fused", format!("no param {index}")))?;
            vals.insert(n.into(), v);
            continue;
        }
        let operands = g.operands(n);
        let types: Vec<TensorType> = operands.iter().filter_map(|v| g.ty(*v).ok().cloned()).collect();
        let mut ins = Vec::with_capacity(operands.len());
        for v in &operands {
            // A value read for the last time is moved, so an in-place update does not copy it.
            let last_use = g.users(*v).iter().all(|(u, _)| *u == n) && !g.is_output(*v);
            let x = if last_use { vals.remove(v) } else { vals.get(v).cloned() };
            ins.push(x.ok_or_else(|| shape_err("fused", format!("{v} is not computed")))?);
        }
        let res = eval_op(&node.op, &types, &node.types, ins, at)?;
        for (r, x) in res.into_iter().enumerate() {
            vals.insert(Value::new(n, r as u16), x);
        }
    }
    g.outputs()
        .iter()
        .map(|(_, v)| vals.get(v).cloned().ok_or_else(|| shape_err("fused", format!("output {v} is not computed"))))
        .collect()
}

fn shape_err(op: &'static str, msg: String) -> k::KernelError {
    k::KernelError::Shape { op, msg }
}

fn dims(t: &TensorType, at: &Bindings) -> Result<Vec<usize>, k::KernelError> {
    t.shape
        .iter()
        .map(|d| usize::try_from(d.eval(at)).map_err(|_| shape_err("size", format!("negative size {d}"))))
        .collect()
}

/// Takes an in-place operand: the data itself when nobody else holds it, else a copy.
fn owned_f(v: Val) -> Vec<f32> {
    match v {
        Val::F(a) => Arc::try_unwrap(a).unwrap_or_else(|a| a.as_ref().clone()),
        Val::I(_) => Vec::new(),
    }
}

fn f(v: Vec<f32>) -> Val {
    Val::F(Arc::new(v))
}

/// Evaluates one op on f32/i32 values. `types` are the operand types, `out` the result types.
fn eval_op(
    op: &Op,
    types: &[TensorType],
    out: &[TensorType],
    mut ins: Vec<Val>,
    at: &Bindings,
) -> Result<Vec<Val>, k::KernelError> {
    let shape = |i: usize| -> Result<Vec<usize>, k::KernelError> {
        types.get(i).map(|t| dims(t, at)).unwrap_or_else(|| Err(shape_err("operand", format!("no operand {i}"))))
    };
    let out_shape = |i: usize| -> Result<Vec<usize>, k::KernelError> {
        out.get(i).map(|t| dims(t, at)).unwrap_or_else(|| Err(shape_err("result", format!("no result {i}"))))
    };
    let alloc = |i: usize| -> Result<Vec<f32>, k::KernelError> { Ok(vec![0.0; numel(&out_shape(i)?)]) };
    let unary = |ins: &[Val], kernel: fn(&[f32], &mut [f32]) -> k::Result<()>| -> Result<Vec<Val>, k::KernelError> {
        let mut o = vec![0.0; ins[0].f().len()];
        kernel(ins[0].f(), &mut o)?;
        Ok(vec![f(o)])
    };
    let last = |s: &[usize]| s.last().copied().unwrap_or(1);
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err(shape_err("leaf", "leaves are not kernels".to_string())),
        Op::Zeros => Ok(vec![f(alloc(0)?)]),
        Op::Embed => {
            let t = shape(0)?;
            let mut o = alloc(0)?;
            k::embed(t[0], t[1], ins[0].f(), ins[1].i(), &mut o)?;
            Ok(vec![f(o)])
        }
        Op::MetaPrefix => {
            let (m, x) = (shape(0)?, shape(1)?);
            let mut o = alloc(0)?;
            k::meta_prefix(m[0], x[0], x[1], x[2], ins[0].f(), ins[1].f(), &mut o)?;
            Ok(vec![f(o)])
        }
        Op::Reshape { .. } => Ok(vec![ins.swap_remove(0)]),
        Op::Convert { dtype } => {
            if *dtype == gir::DType::I32 {
                return Ok(vec![Val::I(Arc::new(ins[0].f().iter().map(|x| *x as i32).collect()))]);
            }
            match &ins[0] {
                Val::I(v) => Ok(vec![f(v.iter().map(|x| *x as f32).collect())]),
                Val::F(_) => Ok(vec![ins.swap_remove(0)]),
            }
        }
        Op::Slice { axis, start, len } => {
            let s = shape(0)?;
            let a = *axis as usize;
            let (st, ln) = (start.eval(at) as usize, len.eval(at) as usize);
            let outer: usize = s[..a].iter().product();
            let inner: usize = s[a + 1..].iter().product();
            let mut o = Vec::with_capacity(outer * ln * inner);
            let x = ins[0].f();
            for i in 0..outer {
                let base = (i * s[a] + st) * inner;
                o.extend_from_slice(&x[base..base + ln * inner]);
            }
            Ok(vec![f(o)])
        }
        Op::Split { axis, .. } => {
            let s = shape(0)?;
            let a = *axis as usize;
            let outer: usize = s[..a].iter().product();
            let inner: usize = s[a + 1..].iter().product();
            let x = ins[0].f();
            let mut res = Vec::new();
            let mut off = 0;
            for r in 0..out.len() {
                let piece = out_shape(r)?[a];
                let mut o = Vec::with_capacity(outer * piece * inner);
                for i in 0..outer {
                    let base = (i * s[a] + off) * inner;
                    o.extend_from_slice(&x[base..base + piece * inner]);
                }
                off += piece;
                res.push(f(o));
            }
            Ok(res)
        }
        Op::Concat { axis } => {
            let a = *axis as usize;
            let os = out_shape(0)?;
            let outer: usize = os[..a].iter().product();
            let inner: usize = os[a + 1..].iter().product();
            let mut o = Vec::with_capacity(numel(&os));
            for i in 0..outer {
                for (j, x) in ins.iter().enumerate() {
                    let w = shape(j)?[a] * inner;
                    o.extend_from_slice(&x.f()[i * w..(i + 1) * w]);
                }
            }
            Ok(vec![f(o)])
        }
        Op::MatMul { trans_a, trans_b } => {
            let (a, b) = (shape(0)?, shape(1)?);
            let (ra, rb) = (a.len(), b.len());
            let (m, kk) = if *trans_a { (a[ra - 1], a[ra - 2]) } else { (a[ra - 2], a[ra - 1]) };
            let n = if *trans_b { b[rb - 2] } else { b[rb - 1] };
            let shared_b = rb == 2;
            // A shared weight folds the batch dims into M.
            let (batch, m) =
                if shared_b && !*trans_a { (1, numel(&a) / kk) } else { (a[..ra - 2].iter().product(), m) };
            let dims = k::MatmulDims { batch, m, k: kk, n, trans_a: *trans_a, trans_b: *trans_b, shared_b };
            let mut o = alloc(0)?;
            k::matmul(&dims, ins[0].f(), ins[1].f(), &mut o)?;
            Ok(vec![f(o)])
        }
        Op::Add | Op::Mul => {
            let (sa, sb) = (shape(0)?, shape(1)?);
            if let (Val::I(a), Val::I(b)) = (&ins[0], &ins[1]) {
                let mut o = vec![0; numel(&out_shape(0)?)];
                k::add_i32(a, &sa, b, &sb, &mut o)?;
                return Ok(vec![Val::I(Arc::new(o))]);
            }
            let mut o = alloc(0)?;
            if matches!(op, Op::Add) {
                k::add(ins[0].f(), &sa, ins[1].f(), &sb, &mut o)?;
            } else {
                k::mul(ins[0].f(), &sa, ins[1].f(), &sb, &mut o)?;
            }
            Ok(vec![f(o)])
        }
        Op::Scale { factor } => {
            let mut o = alloc(0)?;
            k::scale(ins[0].f(), *factor, &mut o)?;
            Ok(vec![f(o)])
        }
        Op::Silu => unary(&ins, k::silu),
        Op::Softplus => unary(&ins, k::softplus),
        Op::Exp => unary(&ins, k::exp),
        Op::Sigmoid => unary(&ins, k::sigmoid),
        Op::Neg => unary(&ins, k::neg),
        Op::Relu2 => unary(&ins, k::relu2),
        Op::Gelu => unary(&ins, k::gelu),
        Op::Swiglu => {
            let mut o = alloc(0)?;
            k::swiglu(ins[0].f(), ins[1].f(), &mut o)?;
            Ok(vec![f(o)])
        }
        Op::Clamp { min, max } => {
            let mut o = alloc(0)?;
            k::clamp(ins[0].f(), *min, *max, &mut o)?;
            Ok(vec![f(o)])
        }
        Op::RmsNorm { eps } => {
            let s = shape(0)?;
            let d = last(&s);
            let mut o = alloc(0)?;
            k::rmsnorm(numel(&s) / d.max(1), d, ins[0].f(), ins[1].f(), *eps, &mut o)?;
            Ok(vec![f(o)])
        }
        Op::L2Norm { eps } => {
            let s = shape(0)?;
            let d = last(&s);
            let mut o = alloc(0)?;
            k::l2norm(numel(&s) / d.max(1), d, ins[0].f(), *eps, &mut o)?;
            Ok(vec![f(o)])
        }
        Op::GatedRmsNorm { eps, group, norm_before_gate } => {
            let s = shape(0)?;
            let d = last(&s);
            let mut o = alloc(0)?;
            k::gated_rmsnorm(
                numel(&s) / d.max(1),
                d,
                ins[0].f(),
                ins[1].f(),
                ins[2].f(),
                *eps,
                *group as usize,
                *norm_before_gate,
                &mut o,
            )?;
            Ok(vec![f(o)])
        }
        Op::RowNormLogits => {
            let (s, w) = (shape(0)?, shape(1)?);
            let v = last(&s);
            let mut o = alloc(0)?;
            k::row_norm_logits(numel(&s) / v.max(1), v, w[1], ins[0].f(), ins[1].f(), &mut o)?;
            Ok(vec![f(o)])
        }
        Op::RowInvNorm => {
            let w = shape(0)?;
            let (v, h) = (w[0], w[1]);
            let x = ins[0].f();
            let o: Vec<f32> = (0..v)
                .map(|r| {
                    let n: f64 =
                        x[r * h..(r + 1) * h].iter().map(|a| f64::from(*a) * f64::from(*a)).sum::<f64>().sqrt();
                    if n > 0.0 { (1.0 / n) as f32 } else { 0.0 }
                })
                .collect();
            Ok(vec![f(o)])
        }
        Op::Rope { style, theta } => {
            let s = shape(0)?;
            let dims = k::RopeDims { batch: s[0], tokens: s[1], heads: s[2], d: s[3] };
            let style = match style {
                gir::RopeStyle::RotateHalf => k::RopeStyle::RotateHalf,
                gir::RopeStyle::Interleaved => k::RopeStyle::Interleaved,
            };
            let mut o = alloc(0)?;
            k::rope(&dims, ins[0].f(), ins[1].i(), style, *theta, &mut o)?;
            Ok(vec![f(o)])
        }
        Op::Conv1d { bias } => {
            let (x, w) = (shape(0)?, shape(1)?);
            let dims = k::ConvDims { batch: x[0], tokens: x[1], channels: x[2], k: w[1] };
            let mut state = owned_f(std::mem::replace(&mut ins[2], f(Vec::new())));
            let mut y = alloc(0)?;
            let b = if *bias { Some(ins[4].f()) } else { None };
            k::conv1d(&dims, ins[0].f(), ins[1].f(), &mut state, ins[3].i(), b, &mut y)?;
            Ok(vec![f(y), f(state)])
        }
        Op::Conv1dUpdate { bias } => {
            let (x, w) = (shape(0)?, shape(1)?);
            let dims = k::ConvDims { batch: x[0], tokens: 1, channels: x[1], k: w[1] };
            let mut state = owned_f(std::mem::replace(&mut ins[2], f(Vec::new())));
            let mut y = alloc(0)?;
            let b = if *bias { Some(ins[3].f()) } else { None };
            k::conv1d_update(&dims, ins[0].f(), ins[1].f(), &mut state, b, &mut y)?;
            Ok(vec![f(y), f(state)])
        }
        Op::KvWrite => {
            let (c, n) = (shape(0)?, shape(1)?);
            let dims = k::AttentionDims {
                batch: c[0],
                tokens: n[1],
                q_heads: c[2],
                kv_heads: c[2],
                head_dim: c[3],
                capacity: c[1],
            };
            let mut cache = owned_f(std::mem::replace(&mut ins[0], f(Vec::new())));
            k::kv_write(&dims, &mut cache, ins[1].f(), ins[2].i())?;
            Ok(vec![f(cache)])
        }
        Op::AttentionPrefill { window, scale } => {
            let (q, kc) = (shape(0)?, shape(3)?);
            let dims = k::AttentionDims {
                batch: q[0],
                tokens: q[1],
                q_heads: q[2],
                kv_heads: kc[2],
                head_dim: q[3],
                capacity: kc[1],
            };
            let mut kcache = owned_f(std::mem::replace(&mut ins[3], f(Vec::new())));
            let mut vcache = owned_f(std::mem::replace(&mut ins[4], f(Vec::new())));
            let mut o = alloc(0)?;
            k::attention_prefill(
                &dims,
                ins[0].f(),
                ins[1].f(),
                ins[2].f(),
                &mut kcache,
                &mut vcache,
                ins[5].i(),
                ins[6].i(),
                window.map(|w| w as usize),
                *scale,
                &mut o,
            )?;
            Ok(vec![f(o), f(kcache), f(vcache)])
        }
        Op::AttentionDecode { window, scale } => {
            let (q, kc) = (shape(0)?, shape(1)?);
            let dims = k::AttentionDims {
                batch: q[0],
                tokens: 1,
                q_heads: q[1],
                kv_heads: kc[2],
                head_dim: q[2],
                capacity: kc[1],
            };
            let mut o = alloc(0)?;
            k::attention_decode(
                &dims,
                ins[0].f(),
                ins[1].f(),
                ins[2].f(),
                ins[3].i(),
                window.map(|w| w as usize),
                *scale,
                &mut o,
            )?;
            Ok(vec![f(o)])
        }
        Op::SsdScan { chunk } => {
            let (x, bm) = (shape(0)?, shape(3)?);
            let dims = k::SsdDims { batch: x[0], tokens: x[1], heads: x[2], p: x[3], groups: bm[2], n: bm[3] };
            let mut state = owned_f(std::mem::replace(&mut ins[6], f(Vec::new())));
            let mut y = alloc(0)?;
            k::ssd_scan(
                &dims,
                ins[0].f(),
                ins[1].f(),
                ins[2].f(),
                ins[3].f(),
                ins[4].f(),
                ins[5].f(),
                &mut state,
                ins[7].i(),
                *chunk as usize,
                &mut y,
            )?;
            Ok(vec![f(y), f(state)])
        }
        Op::SsdStep => {
            let (x, bm) = (shape(0)?, shape(3)?);
            let dims = k::SsdDims { batch: x[0], tokens: 1, heads: x[1], p: x[2], groups: bm[1], n: bm[2] };
            let mut state = owned_f(std::mem::replace(&mut ins[6], f(Vec::new())));
            let mut y = alloc(0)?;
            k::ssd_step(
                &dims,
                ins[0].f(),
                ins[1].f(),
                ins[2].f(),
                ins[3].f(),
                ins[4].f(),
                ins[5].f(),
                &mut state,
                &mut y,
            )?;
            Ok(vec![f(y), f(state)])
        }
        Op::DeltaScan { chunk, scale, gated } => {
            let (q, v) = (shape(0)?, shape(2)?);
            let dims = k::DeltaDims { batch: q[0], tokens: q[1], heads: q[2], dk: q[3], dv: v[3] };
            let si = ins.len() - 2;
            let mut state = owned_f(std::mem::replace(&mut ins[si], f(Vec::new())));
            let g = if *gated { Some(ins[4].f()) } else { None };
            let mut o = alloc(0)?;
            k::delta_scan(
                &dims,
                ins[0].f(),
                ins[1].f(),
                ins[2].f(),
                ins[3].f(),
                g,
                &mut state,
                ins[si + 1].i(),
                *chunk as usize,
                *scale,
                &mut o,
            )?;
            Ok(vec![f(o), f(state)])
        }
        Op::DeltaStep { scale, gated } => {
            let (q, v) = (shape(0)?, shape(2)?);
            let dims = k::DeltaDims { batch: q[0], tokens: 1, heads: q[1], dk: q[2], dv: v[2] };
            let si = ins.len() - 1;
            let mut state = owned_f(std::mem::replace(&mut ins[si], f(Vec::new())));
            let g = if *gated { Some(ins[4].f()) } else { None };
            let mut o = alloc(0)?;
            k::delta_step(&dims, ins[0].f(), ins[1].f(), ins[2].f(), ins[3].f(), g, &mut state, *scale, &mut o)?;
            Ok(vec![f(o), f(state)])
        }
        Op::CrossEntropy => {
            let s = shape(0)?;
            let v = last(&s);
            let mut o = vec![0.0; 1];
            k::cross_entropy(numel(&s) / v.max(1), v, ins[0].f(), ins[1].i(), &mut o)?;
            Ok(vec![f(o)])
        }
        Op::Fused(body) => eval_body(&body.graph, ins, at),
    }
}

/// The node a kernel runs (for tests and traces).
pub fn kernel_node(program: &Program, kernel: &KernelGroup) -> Option<NodeId> {
    program.graph.contains(kernel.node).then_some(kernel.node)
}
