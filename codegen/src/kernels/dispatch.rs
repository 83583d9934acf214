//! dispatch: a program's kernel group → the generator that handles its op or fused body.
//!
//! [`generate`] reads the group's node in `Program::graph`, derives dtypes and shapes from the graph's
//! types, calls the matching generator and rewrites the generator's slot numbers into the group's real
//! buffers: inside a generator, `ArgRule::Buffer(BufferId(k))` is slot `k` of the group (its operands,
//! then its results, then any scratch the generator needs). Operand and result slots become the
//! group's `inputs` / `outputs`; a scratch slot becomes a placeholder id past the program's last buffer
//! (`BufferId(buffers.len() + i)`), listed in [`Dispatched::scratch`] with its size, so a caller
//! allocates it explicitly (dispatch never invents program buffers).
//!
//! Covered:
//! - `matmul` (`trans_a = false`, `trans_b = true`, rank-2 bf16 weight) → `gemv` in decode (blocks of
//!   `gemv::MAX_ROWS` rows, so a batch of 8 sequences reads each weight once), `gemm` otherwise;
//! - fused `[add_]rmsnorm_matmul[_epilogue | _tail]` bodies: an optional `add(p0, p1)` (computed by
//!   an elementwise kernel first into its result, or into scratch `sum` when only the product reads
//!   it), an optional `rmsnorm` prologue, an optional `slice` of rows (copied by `slice::slice` into
//!   scratch `sliced A` and normalised by the prologue: the prefill logits head), one matmul, then
//!   either one epilogue the GEMV / GEMM fuse — `swiglu` (gate = first half of the product), `relu2`,
//!   a bias `add` or a residual `add` — or a *tail*: the product goes to its result or to scratch
//!   `product`, and the rest of the body runs after it: a split of the product's last axis into
//!   parts, each part a chain of reshapes, per-head `rmsnorm` and `rope` (positions from an i32
//!   `start[B]` operand) or of elementwise ops with vector operands → `heads::tail` (the QKV
//!   projections, the Mamba2 / DeltaNet input projections); a purely elementwise tail (the logits
//!   head's `convert` × inverse norm) → `elementwise::fused_elementwise`. A `gated_rmsnorm` before the
//!   product runs as its own kernel into a scratch A;
//! - `rmsnorm`, `l2norm`, `gated_rmsnorm` → `norm::for_op`; fused `add_rmsnorm` → `norm::for_add_rmsnorm`;
//! - elementwise ops and fused elementwise bodies → `elementwise::fused_elementwise`;
//! - `conv1d` / `conv1d_update` and fused `conv_silu` → `conv::conv1d` / `conv::conv1d_update`;
//! - `attention_prefill` → `attention::attention_prefill` (one kernel: the cache write is fused); the
//!   decode `attention_step` body (`kv_write`s + `attention_decode`) → `attention::kv_write`, then
//!   `attention::attention_decode` (partials and combine; scratch `part_o`, `part_lse`);
//! - the decode `mamba2_step` body → `ssd::mamba2_step` (one kernel);
//! - the decode `deltanet_step` body (DeltaNet / Gated DeltaNet: the projection row split into
//!   q, k, v, b[, a, z], conv updates + SiLU, L2 norms, sigmoid(β), the decay gate, `delta_step`, the
//!   output `rmsnorm` / `gated_rmsnorm`) → `delta::deltanet_step` (one kernel, bf16 or f32 storage),
//!   its row inputs passed as `ArgRule::View`s of the projection row (byte offset, stride = row width);
//! - `ssd_scan` → `ssd::ssd_scan`; `delta_scan` → `delta::delta_scan`;
//! - `embed`, `meta_prefix` → `embed::for_op`; `row_norm_logits` → `logits::for_op` (scratch `norms`);
//!   `cross_entropy` → `loss::for_op` (scratch `row_loss`, `row_lse`);
//! - `concat`, `split` (strided copies, any dtype) and `row_inv_norm` (the prep ops that fuse
//!   projection weights and take the LM head's inverse row norms) → `layout::for_op`.
//!
//! Everything else returns [`DispatchError::Unsupported`] naming the group, the op and the reason.

use std::fmt;

use flashc_compiler::gir::{DType, Dim, Graph, InputRole, Mode, NodeId, Op, TensorType, Value};
use flashc_compiler::schedule::{BufferId, KernelGroup, Program};

use super::attention::{self, DecodeOperands, DecodeSpec, KvWriteSpec, PrefillOperands, PrefillSpec};
use super::conv::{self, ConvOperands, ConvSpec};
use super::delta::{
    self, DeltaNetStepOperands, DeltaNetStepSpec, DeltaScanOperands, DeltaScanSpec, GateOperands, Storage,
};
use super::gemm::{GemmEpilogue, GemmOperands, GemmPrologue, GemmSpec};
use super::gemv::{self, GemvSpec};
use super::heads::{self, ColumnOp, HeadNorm, PartKind, TailPart, TailSpec};
use super::slice::{self, SliceSpec};
use super::ssd::{self, Mamba2Operands, Mamba2StepSpec, SsdDims, SsdScanSpec};
use super::{ArgRule, CodegenError, Generated, elementwise, embed, gemm, layout, logits, loss, norm};

/// A scratch buffer a group's kernels need besides the program's buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Scratch {
    /// The placeholder id the launch rules use (past the program's last buffer).
    pub id: BufferId,
    /// What it holds (`norms`, `row_loss`, ...).
    pub what: String,
    pub ty: TensorType,
    pub bytes: Dim,
}

/// Every kernel group of `program`, prep first, then the step, each with its dispatch result.
pub fn generate_all(program: &Program) -> Vec<(&KernelGroup, Result<Dispatched, DispatchError>)> {
    program.prep.iter().chain(&program.kernels).map(|k| (k, generate(program, k))).collect()
}

/// The kernels of one group, in launch order, with their scratch buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatched {
    pub kernels: Vec<Generated>,
    pub scratch: Vec<Scratch>,
    /// The most rows (M = batch × tokens) the kernels compute, when they have a limit (the decode
    /// GEMV: `gemv::MAX_ROWS`); a launcher with more rows must not use them.
    pub max_rows: Option<u32>,
}

/// Why a group could not be generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DispatchError {
    Unsupported { group: String, op: String, reason: String },
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DispatchError::Unsupported { group, op, reason } => write!(f, "{group} (`{op}`): {reason}"),
        }
    }
}

impl std::error::Error for DispatchError {}

/// Generates the kernels of `group` (see the module doc).
pub fn generate(program: &Program, group: &KernelGroup) -> Result<Dispatched, DispatchError> {
    let g = &program.graph;
    let err = |reason: String| DispatchError::Unsupported {
        group: format!("{} {}", group.id, group.name),
        op: group.name.clone(),
        reason,
    };
    if !g.contains(group.node) {
        return Err(err(format!("node {} is not in the program's graph", group.node)));
    }
    let op = g.op(group.node);
    let operands: Vec<TensorType> =
        g.operands(group.node).into_iter().map(|v| g.ty(v).cloned()).collect::<Result<_, _>>().map_err(&err)?;
    let results = g.node(group.node).map(|n| n.types.clone()).unwrap_or_default();
    let plan = plan(program.mode, group, op, &operands, &results).map_err(|e| match e {
        CodegenError::Unsupported(s) => err(s),
        CodegenError::Shape(s) => err(format!("shape: {s}")),
    })?;
    let slots = operands.len() + results.len();
    if group.inputs.len() != operands.len() || group.outputs.len() != results.len() {
        return Err(err(format!(
            "the group has {} inputs and {} outputs for {} operands and {} results",
            group.inputs.len(),
            group.outputs.len(),
            operands.len(),
            results.len()
        )));
    }
    let first_scratch = program.buffers.len();
    let map = |k: u32| -> BufferId {
        let k = k as usize;
        if k < group.inputs.len() {
            group.inputs[k]
        } else if k < slots {
            group.outputs[k - group.inputs.len()]
        } else {
            BufferId((first_scratch + k - slots) as u32)
        }
    };
    let mut kernels = plan.kernels;
    for k in &mut kernels {
        for a in &mut k.launch.args {
            match a {
                ArgRule::Buffer(b) => *a = ArgRule::Buffer(map(b.0)),
                ArgRule::View(b, bytes) => *a = ArgRule::View(map(b.0), bytes.clone()),
                ArgRule::Size(_) | ArgRule::U32(_) | ArgRule::F32(_) => {}
            }
        }
    }
    let scratch = plan
        .scratch
        .into_iter()
        .enumerate()
        .map(|(i, (what, ty))| Scratch { id: map((slots + i) as u32), what, bytes: ty.bytes(), ty })
        .collect();
    Ok(Dispatched { kernels, scratch, max_rows: plan.max_rows })
}

/// Generated kernels over group slots, and the scratch slots they use (in slot order).
struct Plan {
    kernels: Vec<Generated>,
    scratch: Vec<(String, TensorType)>,
    max_rows: Option<u32>,
}

fn one(g: Generated) -> Plan {
    Plan { kernels: vec![g], scratch: Vec::new(), max_rows: None }
}

fn unsupported(s: impl Into<String>) -> CodegenError {
    CodegenError::Unsupported(s.into())
}

fn plan(
    mode: Mode,
    group: &KernelGroup,
    op: &Op,
    operands: &[TensorType],
    results: &[TensorType],
) -> Result<Plan, CodegenError> {
    let name = kernel_name(group);
    match op {
        Op::MatMul { .. } => {
            let body = single_op_body(op, operands, results);
            matmul_body(mode, &body, &name)
        }
        Op::RmsNorm { .. } | Op::L2Norm { .. } | Op::GatedRmsNorm { .. } => Ok(one(norm::for_op(op, operands)?)),
        Op::Embed | Op::MetaPrefix => Ok(one(embed::for_op(op, operands)?)),
        Op::RowNormLogits => {
            let ks = logits::for_op(op, operands)?;
            let vocab = operands[1].shape[0].clone();
            Ok(Plan {
                kernels: ks.to_vec(),
                scratch: vec![("norms".into(), TensorType::new(DType::F32, [vocab]))],
                max_rows: None,
            })
        }
        Op::CrossEntropy => {
            let ks = loss::for_op(op, operands)?;
            let l = &operands[0];
            let rows = Dim::product(&l.shape[..l.rank().saturating_sub(1)]);
            let t = TensorType::new(DType::F32, [rows]);
            Ok(Plan {
                kernels: ks.to_vec(),
                scratch: vec![("row_loss".into(), t.clone()), ("row_lse".into(), t)],
                max_rows: None,
            })
        }
        Op::Conv1d { .. } | Op::Conv1dUpdate { .. } => {
            let body = single_op_body(op, operands, results);
            Ok(one(conv_body(&body, &name)?))
        }
        Op::AttentionPrefill { window, scale } => {
            need_bf16("attention", operands.iter().take(5))?;
            let dim = |t: usize, i: usize, what: &str| cst_u32(&operands[t].shape[i], what);
            let spec = PrefillSpec {
                name: name.clone(),
                q_heads: dim(0, 2, "query heads")?,
                kv_heads: dim(1, 2, "kv heads")?,
                head_dim: dim(0, 3, "head dim")?,
                tokens: operands[0].shape[1].clone(),
                capacity: operands[3].shape[1].clone(),
                window: *window,
                scale: *scale,
                operands: PrefillOperands::numbered(),
            };
            Ok(Plan { kernels: attention::attention_prefill(&spec)?, scratch: Vec::new(), max_rows: None })
        }
        Op::SsdScan { chunk } => {
            let x = &operands[0];
            let dims = SsdDims {
                heads: cst_u32(&x.shape[2], "heads")?,
                head_dim: cst_u32(&x.shape[3], "head dim")?,
                groups: cst_u32(&operands[3].shape[2], "groups")?,
                state: cst_u32(&operands[3].shape[3], "state width")?,
            };
            let chunk = u32::try_from(*chunk).unwrap_or(u32::MAX).min(ssd::SCAN_MAX_CHUNK);
            let mut spec = SsdScanSpec::new(&name, dims, chunk);
            spec.dtype = x.dtype;
            spec.batch = x.shape[0].clone();
            spec.tokens = x.shape[1].clone();
            Ok(one(ssd::ssd_scan(&spec)?))
        }
        Op::DeltaScan { chunk, scale, gated } => {
            let (q, v) = (&operands[0], &operands[2]);
            need_bf16("delta_scan", operands.iter().take(if *gated { 5 } else { 4 }))?;
            let mut spec = DeltaScanSpec::new(
                &name,
                cst_u32(&q.shape[2], "heads")?,
                cst_u32(&q.shape[3], "dk")?,
                cst_u32(&v.shape[3], "dv")?,
                *gated,
            );
            spec.chunk = u32::try_from(*chunk).unwrap_or(64).min(64);
            spec.scale = *scale as f32;
            spec.batch = q.shape[0].clone();
            spec.tokens = q.shape[1].clone();
            let g = u32::from(*gated);
            spec.operands = DeltaScanOperands {
                q: BufferId(0),
                k: BufferId(1),
                v: BufferId(2),
                beta: BufferId(3),
                g: gated.then_some(BufferId(4)),
                state: BufferId(4 + g),
                lens: BufferId(5 + g),
                o: BufferId(6 + g),
            };
            Ok(one(delta::delta_scan(&spec)?))
        }
        Op::Concat { .. } | Op::Split { .. } | Op::RowInvNorm => Ok(one(layout::for_op(op, operands, results, &name)?)),
        Op::Fused(f) => fused(mode, &f.graph, &f.name, &name),
        op if op.is_elementwise() => {
            let body = single_op_body(op, operands, results);
            Ok(one(elementwise::fused_elementwise(&body, &name)?))
        }
        other => Err(unsupported(format!("no generator for the op `{}` yet", other.name()))),
    }
}

/// The kernel name of a group: `k12_rmsnorm_matmul`.
fn kernel_name(group: &KernelGroup) -> String {
    format!("{}_{}", group.id, group.name)
}

/// A body graph holding one op over params `p0..`, its results the body's outputs.
fn single_op_body(op: &Op, operands: &[TensorType], results: &[TensorType]) -> Graph {
    let mut g = Graph::new(op.name());
    let params: Vec<Value> = operands
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = g.add_leaf(Op::Input { name: format!("p{i}"), role: InputRole::Param, index: i as u32 }, t.clone());
            Value::from(n)
        })
        .collect();
    let n = g.add_typed(op.clone(), results.to_vec(), &params);
    for i in 0..results.len() {
        g.set_output(i.to_string(), Value::new(n, i as u16));
    }
    g
}

fn fused(mode: Mode, body: &Graph, body_name: &str, name: &str) -> Result<Plan, CodegenError> {
    let ids = body.node_ids();
    let compute: Vec<NodeId> = ids.iter().copied().filter(|n| !matches!(body.op(*n), Op::Input { .. })).collect();
    if compute.iter().any(|n| matches!(body.op(*n), Op::MatMul { .. })) {
        return matmul_body(mode, body, name);
    }
    let ops_named = |what: &str| compute.iter().copied().filter(|n| body.op(*n).name() == what).collect::<Vec<_>>();
    if !ops_named("ssd_step").is_empty() {
        return Ok(one(mamba2_step(body, name)?));
    }
    if !ops_named("delta_step").is_empty() {
        return Ok(one(deltanet_step(body, name)?));
    }
    if !ops_named("attention_decode").is_empty() {
        return attention_step(body, name);
    }
    let recurrent = !ops_named("ssd_step").is_empty() || !ops_named("delta_step").is_empty();
    if !recurrent && (!ops_named("conv1d").is_empty() || !ops_named("conv1d_update").is_empty()) {
        return Ok(one(conv_body(body, name)?));
    }
    let has = |f: fn(&Op) -> bool| compute.iter().any(|n| f(body.op(*n)));
    if has(|o| matches!(o, Op::RmsNorm { .. })) && has(|o| matches!(o, Op::Add)) && compute.len() == 2 {
        return Ok(one(norm::for_add_rmsnorm(body)?));
    }
    if compute.iter().all(|n| body.op(*n).is_elementwise() || matches!(body.op(*n), Op::Reshape { .. })) {
        return Ok(one(elementwise::fused_elementwise(body, name)?));
    }
    let ops: Vec<&str> = compute.iter().map(|n| body.op(*n).name()).collect();
    Err(unsupported(format!("no generator for the fused body `{body_name}` ({}) yet", ops.join(", "))))
}

/// The param index of a body value, if it is a param.
fn param_index(body: &Graph, v: Value) -> Option<u32> {
    match body.op(v.node) {
        Op::Input { role: InputRole::Param, index, .. } => Some(*index),
        _ => None,
    }
}

/// Follows reshapes back to the value they view.
fn unview(body: &Graph, mut v: Value) -> Value {
    while matches!(body.op(v.node), Op::Reshape { .. }) {
        match body.operands(v.node).first() {
            Some(o) => v = *o,
            None => break,
        }
    }
    v
}

/// The only user of `v` that is not a reshape, following reshapes forward.
fn sole_user(body: &Graph, mut v: Value) -> Option<(NodeId, u16, Value)> {
    loop {
        let users = body.users(v);
        if users.len() != 1 {
            return None;
        }
        let (n, slot) = users[0];
        if matches!(body.op(n), Op::Reshape { .. }) {
            v = Value::from(n);
        } else {
            return Some((n, slot, v));
        }
    }
}

/// Rejects a generator that is written for bf16 storage only when a tensor is of another type.
fn need_bf16<'a>(what: &str, tys: impl IntoIterator<Item = &'a TensorType>) -> Result<(), CodegenError> {
    match tys.into_iter().find(|t| t.dtype != DType::Bf16) {
        Some(t) => Err(unsupported(format!("the {what} generator is bf16 only, found {t}"))),
        None => Ok(()),
    }
}

fn cst_u32(d: &Dim, what: &str) -> Result<u32, CodegenError> {
    d.as_const()
        .and_then(|c| u32::try_from(c).ok())
        .ok_or_else(|| CodegenError::Shape(format!("{what} must be a constant, found {d}")))
}

/// The result slot of body value `v` (or of a reshape of it), numbered after the `np` params.
fn result_slot(body: &Graph, np: u32, v: Value) -> Result<u32, CodegenError> {
    body.outputs()
        .iter()
        .position(|(_, o)| *o == v || unview(body, *o) == v)
        .map(|i| np + i as u32)
        .ok_or_else(|| unsupported("a value the kernel must write is not a result of the group"))
}

/// The param index of `v` (through reshapes), or an error naming `what`.
fn param_of(body: &Graph, v: Value, what: &str) -> Result<u32, CodegenError> {
    param_index(body, unview(body, v)).ok_or_else(|| unsupported(format!("the {what} is not an operand of the group")))
}

/// `conv1d` / `conv1d_update`, optionally followed by `silu` (`conv_silu`), → `conv::conv1d` /
/// `conv::conv1d_update`.
fn conv_body(body: &Graph, name: &str) -> Result<Generated, CodegenError> {
    let params = body.params();
    let np = params.len() as u32;
    let convs: Vec<NodeId> = body
        .node_ids()
        .into_iter()
        .filter(|n| matches!(body.op(*n), Op::Conv1d { .. } | Op::Conv1dUpdate { .. }))
        .collect();
    let [c] = convs[..] else { return Err(unsupported(format!("{} convolutions in one body", convs.len()))) };
    let (update, bias) = match body.op(c) {
        Op::Conv1d { bias } => (false, *bias),
        Op::Conv1dUpdate { bias } => (true, *bias),
        other => return Err(unsupported(format!("`{}` is not a convolution", other.name()))),
    };
    let ops = body.operands(c);
    let x = param_of(body, ops[0], "convolution input")?;
    let w = param_of(body, ops[1], "convolution weight")?;
    let state = param_of(body, ops[2], "convolution state")?;
    let lens = if update { None } else { Some(param_of(body, ops[3], "lens")?) };
    let bias_slot = if bias { Some(param_of(body, ops[if update { 3 } else { 4 }], "bias")?) } else { None };
    let y = Value::new(c, 0);
    let (silu, y_slot) = match sole_user(body, y) {
        Some((u, _, _)) if matches!(body.op(u), Op::Silu) => (true, result_slot(body, np, Value::from(u))?),
        Some((u, _, _)) => return Err(unsupported(format!("a `{}` after the convolution", body.op(u).name()))),
        None => (false, result_slot(body, np, y)?),
    };
    let new_state = body.outputs().iter().any(|(_, o)| *o == Value::new(c, 1));
    if !new_state {
        return Err(unsupported("the new convolution state is not a result of the group"));
    }
    let xt = &params[x as usize];
    let wt = &params[w as usize];
    let mut spec = ConvSpec::new(name, cst_u32(&wt.shape[0], "channels")?, cst_u32(&wt.shape[1], "width")?, bias);
    spec.dtype = xt.dtype;
    spec.silu = silu;
    spec.batch = xt.shape[0].clone();
    if !update {
        spec.tokens = xt.shape[1].clone();
    }
    spec.operands = ConvOperands {
        x: BufferId(x),
        w: BufferId(w),
        state: BufferId(state),
        lens: BufferId(lens.unwrap_or(state)),
        bias: bias_slot.map(BufferId),
        y: BufferId(y_slot),
    };
    if update { conv::conv1d_update(&spec) } else { conv::conv1d(&spec) }
}

/// The decode `attention_step` body: `kv_write`s of the new keys and values, then
/// `attention_decode` over the updated caches → `kv_write` (both pairs), the split-KV partials and
/// the combine, with the two f32 workspaces as scratch.
fn attention_step(body: &Graph, name: &str) -> Result<Plan, CodegenError> {
    let params = body.params();
    let np = params.len() as u32;
    let nout = body.outputs().len() as u32;
    let ids = body.node_ids();
    let attn: Vec<NodeId> = ids.iter().copied().filter(|n| matches!(body.op(*n), Op::AttentionDecode { .. })).collect();
    let [a] = attn[..] else { return Err(unsupported(format!("{} attention_decode nodes in one body", attn.len()))) };
    let Op::AttentionDecode { window, scale } = body.op(a) else {
        return Err(unsupported("no attention_decode in the body"));
    };
    let ops = body.operands(a);
    let q = param_of(body, ops[0], "query")?;
    let start = param_of(body, ops[3], "start")?;
    // Each cache is a param, or a kv_write of a param with new keys (written first).
    let mut pairs = Vec::new();
    let mut caches = [0u32; 2];
    let mut tokens = None;
    for (i, c) in [ops[1], ops[2]].into_iter().enumerate() {
        let c = unview(body, c);
        if let Some(p) = param_index(body, c) {
            caches[i] = p;
        } else if matches!(body.op(c.node), Op::KvWrite) {
            let wops = body.operands(c.node);
            let cache = param_of(body, wops[0], "cache")?;
            let new = param_of(body, wops[1], "new keys")?;
            if param_of(body, wops[2], "start")? != start {
                return Err(unsupported("kv_write and attention_decode read different starts"));
            }
            tokens = Some(body.ty(wops[1]).map_err(CodegenError::Shape)?.shape[1].clone());
            pairs.push((BufferId(cache), BufferId(new)));
            caches[i] = cache;
        } else {
            return Err(unsupported(format!("the attention reads a cache from `{}`", body.op(c.node).name())));
        }
    }
    let o = result_slot(body, np, Value::from(a))?;
    let qt = body.ty(unview(body, ops[0])).map_err(CodegenError::Shape)?;
    let qt = if qt.rank() == 4 { qt.clone() } else { body.ty(ops[0]).map_err(CodegenError::Shape)?.clone() };
    let kt = &params[caches[0] as usize];
    let (q_heads, head_dim) = match qt.rank() {
        4 => (cst_u32(&qt.shape[2], "query heads")?, cst_u32(&qt.shape[3], "head dim")?),
        3 => (cst_u32(&qt.shape[1], "query heads")?, cst_u32(&qt.shape[2], "head dim")?),
        _ => return Err(CodegenError::Shape(format!("query {qt}"))),
    };
    need_bf16("attention", [&qt, kt, &params[caches[1] as usize]])?;
    let kv_heads = cst_u32(&kt.shape[2], "kv heads")?;
    let capacity = kt.shape[1].clone();
    let mut kernels = Vec::new();
    if !pairs.is_empty() {
        kernels.push(attention::kv_write(&KvWriteSpec {
            name: format!("{name}_kv_write"),
            kv_heads,
            head_dim,
            tokens: tokens.unwrap_or(Dim::constant(1)),
            capacity: capacity.clone(),
            pairs,
            start: BufferId(start),
            lens: None,
        })?);
    }
    let (part_o, part_lse) = (np + nout, np + nout + 1);
    let spec = DecodeSpec {
        name: name.to_string(),
        q_heads,
        kv_heads,
        head_dim,
        capacity,
        window: *window,
        scale: *scale,
        max_splits: None,
        min_chunk: attention::MIN_CHUNK,
        operands: DecodeOperands {
            q: BufferId(q),
            kcache: BufferId(caches[0]),
            vcache: BufferId(caches[1]),
            start: BufferId(start),
            o: BufferId(o),
            part_o: BufferId(part_o),
            part_lse: BufferId(part_lse),
        },
    };
    let (po, pl) = attention::decode_workspace(&spec)?;
    kernels.extend(attention::attention_decode(&spec)?);
    let f32_bytes = |d: Dim| TensorType::new(DType::F32, [d.div_exact(4).unwrap_or(d)]);
    Ok(Plan {
        kernels,
        scratch: vec![("part_o".into(), f32_bytes(po)), ("part_lse".into(), f32_bytes(pl))],
        max_rows: None,
    })
}

/// The value feeding `v` through reshapes, as `(split node, result index)` when it is a split result.
fn split_part(body: &Graph, v: Value) -> Option<(NodeId, u16)> {
    let v = unview(body, v);
    matches!(body.op(v.node), Op::Split { .. }).then_some((v.node, v.result))
}

/// The decode `mamba2_step` body (fuse-decode-mixer): the in-proj row `zxbcdt` split into
/// `[z, xBC, dt]`, `dt = softplus(dt + dt_bias)` (optionally clamped), `conv1d_update` + SiLU of
/// xBC split into `[x, B, C]`, `ssd_step`, then `gated_rmsnorm(y, z)` → `ssd::mamba2_step` (one
/// kernel). Every link is checked; a body of another shape is reported unsupported.
fn mamba2_step(body: &Graph, name: &str) -> Result<Generated, CodegenError> {
    let params = body.params();
    let np = params.len() as u32;
    let find = |what: &str| body.node_ids().into_iter().filter(|n| body.op(*n).name() == what).collect::<Vec<_>>();
    let bad = |s: &str| unsupported(format!("mamba2_step body: {s}"));
    let (ssd_nodes, conv_nodes, norm_nodes) = (find("ssd_step"), find("conv1d_update"), find("gated_rmsnorm"));
    let ([ss], [cv], [gn]) = (&ssd_nodes[..], &conv_nodes[..], &norm_nodes[..]) else {
        return Err(bad("expected one ssd_step, one conv1d_update and one gated_rmsnorm"));
    };
    let (ss, cv, gn) = (*ss, *cv, *gn);
    let Op::Conv1dUpdate { bias } = body.op(cv) else { return Err(bad("no conv1d_update")) };
    let Op::GatedRmsNorm { eps, group, norm_before_gate } = body.op(gn) else {
        return Err(bad("no gated_rmsnorm"));
    };
    let sops = body.operands(ss);
    let cops = body.operands(cv);
    let nops = body.operands(gn);
    // zxbcdt = [z | xBC | dt]
    let (zsplit, zi) =
        split_part(body, nops[1]).ok_or_else(|| bad("the norm gate is not a split of the in-proj row"))?;
    let (csplit, ci) =
        split_part(body, cops[0]).ok_or_else(|| bad("the conv input is not a split of the in-proj row"))?;
    if zsplit != csplit || zi != 0 || ci != 1 {
        return Err(bad("the in-proj row is not split as [z, xBC, dt]"));
    }
    let zxbcdt = param_of(body, body.operands(zsplit)[0], "in-proj row")?;
    // dt = [clamp](softplus(add(dt_raw, dt_bias)))
    let mut dt = unview(body, sops[1]);
    let (mut dt_min, mut dt_max) = (None, None);
    if let Op::Clamp { min, max } = body.op(dt.node) {
        dt_min = min.map(|m| m as f32);
        dt_max = max.map(|m| m as f32);
        dt = unview(body, body.operands(dt.node)[0]);
    }
    if !matches!(body.op(dt.node), Op::Softplus) {
        return Err(bad("dt is not a softplus"));
    }
    let add = unview(body, body.operands(dt.node)[0]);
    if !matches!(body.op(add.node), Op::Add) {
        return Err(bad("dt is not softplus(dt + dt_bias)"));
    }
    let aops = body.operands(add.node);
    if split_part(body, aops[0]) != Some((zsplit, 2)) {
        return Err(bad("dt is not the third part of the in-proj row"));
    }
    let dt_bias = param_of(body, aops[1], "dt bias")?;
    // conv + silu, split into [x, B, C]
    let conv_w = param_of(body, cops[1], "conv weight")?;
    let conv_state = param_of(body, cops[2], "conv state")?;
    let conv_bias = if *bias { Some(param_of(body, cops[3], "conv bias")?) } else { None };
    let xs = split_part(body, sops[0]);
    let bs = split_part(body, sops[3]);
    let cs = split_part(body, sops[4]);
    let (Some((xsplit, 0)), Some((bsplit, 1)), Some((csplit2, 2))) = (xs, bs, cs) else {
        return Err(bad("the ssd_step's x, B, C are not the parts of one split"));
    };
    if xsplit != bsplit || xsplit != csplit2 {
        return Err(bad("the ssd_step's x, B, C come from different splits"));
    }
    let silu = unview(body, body.operands(xsplit)[0]);
    if !matches!(body.op(silu.node), Op::Silu) || unview(body, body.operands(silu.node)[0]) != Value::new(cv, 0) {
        return Err(bad("x, B, C are not a split of silu(conv1d_update(..))"));
    }
    let a = param_of(body, sops[2], "A")?;
    let d = param_of(body, sops[5], "D")?;
    let state = param_of(body, sops[6], "ssm state")?;
    if unview(body, nops[0]) != Value::new(ss, 0) {
        return Err(bad("the norm does not read the ssd_step output"));
    }
    let norm_w = param_of(body, nops[2], "norm weight")?;
    let y = result_slot(body, np, Value::from(gn))?;
    for v in [Value::new(cv, 1), Value::new(ss, 1)] {
        if !body.outputs().iter().any(|(_, o)| *o == v) {
            return Err(bad("a state update is not a result of the group"));
        }
    }
    // Dims: x [B, H, P], B [B, G, N] (through reshapes, from the split sizes).
    let xt = body.ty(sops[0]).map_err(CodegenError::Shape)?;
    let bt = body.ty(sops[3]).map_err(CodegenError::Shape)?;
    if xt.rank() != 3 || bt.rank() != 3 {
        return Err(bad("unexpected ssd_step operand ranks"));
    }
    let dims = SsdDims {
        heads: cst_u32(&xt.shape[1], "heads")?,
        head_dim: cst_u32(&xt.shape[2], "head dim")?,
        groups: cst_u32(&bt.shape[1], "groups")?,
        state: cst_u32(&bt.shape[2], "state width")?,
    };
    let zt = &params[zxbcdt as usize];
    let mut spec = Mamba2StepSpec::new(name, dims);
    spec.dtype = zt.dtype;
    spec.conv_width = cst_u32(&params[conv_w as usize].shape[1], "conv width")?;
    spec.dt_min = dt_min;
    spec.dt_max = dt_max;
    spec.norm_eps = *eps as f32;
    spec.norm_group = u32::try_from(*group).map_err(|_| CodegenError::Shape(format!("norm group {group}")))?;
    spec.norm_before_gate = *norm_before_gate;
    spec.batch = zt.shape[0].clone();
    spec.operands = Mamba2Operands {
        zxbcdt: BufferId(zxbcdt),
        dt_bias: BufferId(dt_bias),
        conv_w: BufferId(conv_w),
        conv_state: BufferId(conv_state),
        conv_bias: conv_bias.map(BufferId),
        a: BufferId(a),
        d: BufferId(d),
        state: BufferId(state),
        norm_w: BufferId(norm_w),
        y: BufferId(y),
    };
    ssd::mamba2_step(&spec)
}

/// The decode `deltanet_step` body (fuse-decode-mixer): the projection row `p [.., W]` split along
/// its last axis into `[q, k, v, b]` (plain) or `[q, k, v, b, a, z]` (gated); `conv1d_update` + SiLU
/// of q, k and v (states rolled in place), L2 norms of q and k (optional), `β = sigmoid(b)`, gated:
/// `g = softplus(a + dt_bias) · neg_a` (or `· −exp(A_log)`); `delta_step`; then `rmsnorm(o, w)` or
/// `gated_rmsnorm(o, z, w)` (norm before gate, one group per head) → `delta::deltanet_step` (one
/// kernel), its row inputs passed as `ArgRule::View`s of the projection row at their element offsets
/// with stride `W`. Every link is checked; a body of another shape is reported unsupported.
fn deltanet_step(body: &Graph, name: &str) -> Result<Generated, CodegenError> {
    let params = body.params();
    let np = params.len() as u32;
    let bad = |s: &str| unsupported(format!("deltanet_step body: {s}"));
    let steps: Vec<NodeId> = body.node_ids().into_iter().filter(|n| body.op(*n).name() == "delta_step").collect();
    let [ds] = steps[..] else { return Err(bad("expected one delta_step")) };
    let Op::DeltaStep { scale, gated } = body.op(ds) else { return Err(bad("no delta_step")) };
    let gated = *gated;
    let dops = body.operands(ds);
    if dops.len() != if gated { 6 } else { 5 } {
        return Err(bad("unexpected delta_step operands"));
    }
    // Every row input is a part of one split of the projection row.
    let mut row_split: Option<NodeId> = None;
    let mut part = |v: Value, what: &str| -> Result<u16, CodegenError> {
        let (sp, i) = split_part(body, v).ok_or_else(|| bad(&format!("{what} is not a part of the projection row")))?;
        if row_split.is_some_and(|r| r != sp) {
            return Err(bad(&format!("{what} comes from another split")));
        }
        row_split = Some(sp);
        Ok(i)
    };
    // q, k: [l2norm] ∘ silu ∘ conv1d_update; v: silu ∘ conv1d_update.
    let mut l2 = Vec::new();
    let mut convs = Vec::new();
    for (i, what) in [(0usize, "q"), (1, "k"), (2, "v")] {
        let mut x = unview(body, dops[i]);
        if let Op::L2Norm { eps } = body.op(x.node) {
            if i == 2 {
                return Err(bad("an L2 norm of v"));
            }
            l2.push(*eps);
            x = unview(body, body.operands(x.node)[0]);
        }
        if !matches!(body.op(x.node), Op::Silu) {
            return Err(bad(&format!("{what} is not silu(conv1d_update(..))")));
        }
        let c = unview(body, body.operands(x.node)[0]);
        let Op::Conv1dUpdate { bias } = body.op(c.node) else {
            return Err(bad(&format!("{what} is not silu(conv1d_update(..))")));
        };
        if c.result != 0 {
            return Err(bad(&format!("{what} reads the conv state, not its output")));
        }
        let cops = body.operands(c.node);
        let p = part(cops[0], what)?;
        let w = param_of(body, cops[1], "conv weight")?;
        let st = param_of(body, cops[2], "conv state")?;
        let b = if *bias { Some(param_of(body, cops[3], "conv bias")?) } else { None };
        if !body.outputs().iter().any(|(_, o)| *o == Value::new(c.node, 1)) {
            return Err(bad("a new conv state is not a result of the group"));
        }
        convs.push((p, w, st, b));
    }
    let qk_l2norm = match l2[..] {
        [] => false,
        [a, b] if a == b => true,
        _ => return Err(bad("q and k are not normalised alike")),
    };
    let conv_bias = match convs.iter().map(|c| c.3).collect::<Vec<_>>()[..] {
        [None, None, None] => None,
        [Some(a), Some(b), Some(c)] => Some([BufferId(a), BufferId(b), BufferId(c)]),
        _ => return Err(bad("some convs have a bias and some do not")),
    };
    // β = sigmoid(b).
    let be = unview(body, dops[3]);
    if !matches!(body.op(be.node), Op::Sigmoid) {
        return Err(bad("β is not sigmoid(b)"));
    }
    let b_part = part(body.operands(be.node)[0], "b")?;
    // Gated: g = softplus(a + dt_bias) · decay, decay = neg_a or −exp(A_log).
    let mut gate = None;
    if gated {
        let g = unview(body, dops[4]);
        if !matches!(body.op(g.node), Op::Mul) {
            return Err(bad("g is not softplus(a + dt_bias) · neg_a"));
        }
        let mops = body.operands(g.node);
        let (sp, dc) = if matches!(body.op(unview(body, mops[0]).node), Op::Softplus) {
            (unview(body, mops[0]), unview(body, mops[1]))
        } else {
            (unview(body, mops[1]), unview(body, mops[0]))
        };
        if !matches!(body.op(sp.node), Op::Softplus) {
            return Err(bad("g is not softplus(a + dt_bias) · neg_a"));
        }
        let add = unview(body, body.operands(sp.node)[0]);
        if !matches!(body.op(add.node), Op::Add) {
            return Err(bad("g is not softplus(a + dt_bias) · neg_a"));
        }
        let aops = body.operands(add.node);
        let a_part = part(aops[0], "a")?;
        let dt_bias = param_of(body, aops[1], "dt bias")?;
        let (decay, from_a_log) = if let Some(p) = param_index(body, dc) {
            (p, false)
        } else if matches!(body.op(dc.node), Op::Neg)
            && matches!(body.op(unview(body, body.operands(dc.node)[0]).node), Op::Exp)
        {
            let e = unview(body, body.operands(dc.node)[0]);
            (param_of(body, body.operands(e.node)[0], "A_log")?, true)
        } else {
            return Err(bad("the decay is neither an operand nor −exp(A_log)"));
        };
        gate = Some((a_part, dt_bias, decay, from_a_log));
    }
    let state = param_of(body, dops[if gated { 5 } else { 4 }], "delta state")?;
    if !body.outputs().iter().any(|(_, o)| *o == Value::new(ds, 1)) {
        return Err(bad("the new delta state is not a result of the group"));
    }
    // The output norm.
    let Some((nn, _, _)) = sole_user(body, Value::new(ds, 0)) else {
        return Err(bad("the delta_step output is not read by one norm"));
    };
    let nops = body.operands(nn);
    let qt = body.ty(dops[0]).map_err(CodegenError::Shape)?;
    let vt = body.ty(dops[2]).map_err(CodegenError::Shape)?;
    if qt.rank() != 3 || vt.rank() != 3 {
        return Err(bad("q and v are not [B, heads, d]"));
    }
    let heads = cst_u32(&qt.shape[1], "heads")?;
    let dk = cst_u32(&qt.shape[2], "dk")?;
    let dv = cst_u32(&vt.shape[2], "dv")?;
    let (norm_eps, norm_w, z_part) = match body.op(nn) {
        Op::RmsNorm { eps } if !gated => (*eps, param_of(body, nops[1], "norm weight")?, None),
        Op::GatedRmsNorm { eps, group, norm_before_gate: true } if gated && *group == u64::from(dv) => {
            (*eps, param_of(body, nops[2], "norm weight")?, Some(part(nops[1], "z")?))
        }
        other => {
            return Err(bad(&format!(
                "the output norm is a `{}` (expected rmsnorm, or for gated a gated_rmsnorm with the norm \
                 before the gate over one head)",
                other.name()
            )));
        }
    };
    let y = result_slot(body, np, Value::from(nn))?;
    // The projection row and the element offsets of its parts.
    let sp = row_split.ok_or_else(|| bad("no projection row"))?;
    let Op::Split { axis, sizes } = body.op(sp) else { return Err(bad("no split of the projection row")) };
    let row = param_of(body, body.operands(sp)[0], "projection row")?;
    let rt = &params[row as usize];
    if *axis as usize + 1 != rt.rank() {
        return Err(bad("the projection row is not split along its last axis"));
    }
    let sizes: Vec<u32> = sizes.iter().map(|d| cst_u32(d, "split size")).collect::<Result<_, _>>()?;
    let width: u32 = sizes.iter().sum();
    let offset = |i: u16| sizes[..i as usize].iter().sum::<u32>();
    // Storage: one dtype for everything but the f32 delta state.
    let storage = Storage::of(rt.dtype).ok_or_else(|| bad(&format!("rows of type {}", rt.dtype.name())))?;
    if body.ty(Value::from(nn)).map_err(CodegenError::Shape)?.dtype != rt.dtype {
        return Err(bad("the output is not stored like the projection row"));
    }
    for (i, t) in params.iter().enumerate() {
        let want = if i as u32 == state { DType::F32 } else { rt.dtype };
        if t.dtype != want {
            return Err(bad(&format!("operand {i} is {t}, expected {}", want.name())));
        }
    }
    let (pq, wq, cq, _) = convs[0];
    let (pk, wk, ck, _) = convs[1];
    let (pv, wv, cv, _) = convs[2];
    let mut spec = DeltaNetStepSpec::new(name, heads, dk, dv, gated);
    spec.conv = cst_u32(&params[wq as usize].shape[1], "conv width")?;
    spec.scale = *scale as f32;
    spec.qk_l2norm = qk_l2norm;
    spec.l2_eps = l2.first().copied().unwrap_or(0.0) as f32;
    spec.norm_eps = norm_eps as f32;
    spec.decay_from_a_log = gate.is_some_and(|g| g.3);
    spec.strides = [width; 6];
    let a_part = gate.map_or(0, |g| g.0);
    spec.offsets = [pq, pk, pv, b_part, a_part, z_part.unwrap_or(0)].map(offset);
    spec.storage = storage;
    spec.batch = Dim::product(&rt.shape[..rt.rank() - 1]);
    let id = BufferId;
    spec.operands = DeltaNetStepOperands {
        xq: id(row),
        xk: id(row),
        xv: id(row),
        wq: id(wq),
        wk: id(wk),
        wv: id(wv),
        conv_bias,
        conv_q: id(cq),
        conv_k: id(ck),
        conv_v: id(cv),
        b: id(row),
        gate: gate.map(|(_, dt, dc, _)| GateOperands { a: id(row), dt_bias: id(dt), decay: id(dc), z: id(row) }),
        norm_w: id(norm_w),
        state: id(state),
        y: id(y),
    };
    delta::deltanet_step(&spec)
}

/// The operand slots of the norm producing the product's A when it must run as its own kernel: a
/// gated RMSNorm, or an RMSNorm whose weight is narrower than K (per head). `None` for anything
/// else (a plain RMSNorm over K is the GEMM / GEMV prologue).
fn standalone_norm(body: &Graph, a: Value, k: &Dim, params: &[TensorType]) -> Result<Option<Vec<u32>>, CodegenError> {
    let nops = body.operands(a.node);
    match body.op(a.node) {
        Op::GatedRmsNorm { .. } => Ok(Some(vec![
            param_of(body, nops[0], "norm input")?,
            param_of(body, nops[1], "norm gate")?,
            param_of(body, nops[2], "norm weight")?,
        ])),
        Op::RmsNorm { .. } => {
            let (Some(x), Some(w)) =
                (param_index(body, unview(body, nops[0])), param_index(body, unview(body, nops[1])))
            else {
                return Ok(None);
            };
            Ok((params[w as usize].numel() != *k).then(|| vec![x, w]))
        }
        _ => Ok(None),
    }
}

/// A projection body: `[add(p0, p1) →] [rmsnorm(·, w) →] [slice →] matmul(·, W) [→ epilogue | → tail]`.
///
/// The product is one GEMV / GEMM kernel (after an elementwise kernel for the sum, when there is an
/// add, and a copy of the sliced rows, when there is a slice). An epilogue the GEMV / GEMM fuse (bias,
/// residual, relu2, swiglu) is applied in place; anything else after the product (a split into parts,
/// per-head norms, rope, elementwise ops) is the *tail*: the product goes to its result or to a
/// scratch buffer, and [`tail`] computes the rest of the body from it.
fn matmul_body(mode: Mode, body: &Graph, name: &str) -> Result<Plan, CodegenError> {
    let params = body.params();
    let np = params.len() as u32;
    let nout = body.outputs().len() as u32;
    let out_slot = |v: Value| result_slot(body, np, v);
    let mms: Vec<NodeId> = body.node_ids().into_iter().filter(|n| matches!(body.op(*n), Op::MatMul { .. })).collect();
    let [mm] = mms[..] else { return Err(unsupported(format!("{} matmuls in one body", mms.len()))) };
    let Op::MatMul { trans_a: false, trans_b: true } = body.op(mm) else {
        return Err(unsupported("only `matmul[trans_a=false, trans_b=true]` (A · Wᵀ) has a generator"));
    };
    let ops = body.operands(mm);
    let (mut a, w) = (unview(body, ops[0]), unview(body, ops[1]));
    let w_slot = param_index(body, w).ok_or_else(|| unsupported("the weight of the product is not an operand"))?;
    let wt = &params[w_slot as usize];
    if wt.rank() != 2 {
        return Err(unsupported(format!("the weight {wt} is not rank 2")));
    }
    if wt.dtype != DType::Bf16 {
        return Err(unsupported(format!("GEMV / GEMM are bf16 only, the weight is {}", wt.dtype.name())));
    }
    let (n, k) = (wt.shape[0].clone(), wt.shape[1].clone());
    let mut scratch: Vec<(String, TensorType)> = Vec::new();
    let mut new_scratch = |what: &str, ty: TensorType| -> u32 {
        scratch.push((what.to_string(), ty));
        np + nout + scratch.len() as u32 - 1
    };
    // Every result the kernels write (checked against the body's outputs at the end).
    let mut written: Vec<u32> = Vec::new();

    // A slice of rows between the norm and the product: the norm is row-wise, so the rows are
    // sliced first (a copy into scratch) and normalised by the GEMV / GEMM prologue.
    let mut slice = None;
    if let Op::Slice { axis, start, len } = body.op(a.node) {
        let src = unview(body, body.operands(a.node)[0]);
        let st = body.ty(src).map_err(CodegenError::Shape)?.clone();
        if *axis as usize + 1 >= st.rank() {
            return Err(unsupported("the product reads a slice of the normalised axis"));
        }
        slice = Some((*axis as usize, start.clone(), len.clone()));
        a = src;
    }

    // Prologue: rmsnorm of A, maybe of a sum.
    let mut pre = Vec::new();
    let mut norm_w = None;
    let mut prologue = GemmPrologue::None;
    let (mut a_slot, a_src_ty) = if let Some(p) = param_index(body, a) {
        (p, params[p as usize].clone())
    } else if let Some(norm) = standalone_norm(body, a, &k, &params)? {
        // A norm the GEMM / GEMV cannot take as a prologue (gated, or per head: its weight narrower
        // than K, e.g. a DeltaNet output norm) writes a scratch A first.
        let types: Vec<TensorType> = norm.iter().map(|p| params[*p as usize].clone()).collect();
        let mut g = norm::for_op(body.op(a.node), &types)?;
        let a_ty = body.ty(a).map_err(CodegenError::Shape)?.clone();
        let a_scratch = new_scratch("normed A", a_ty.clone());
        let slots: Vec<u32> = norm.into_iter().chain([a_scratch]).collect();
        for arg in &mut g.launch.args {
            if let ArgRule::Buffer(b) = arg {
                *arg = ArgRule::Buffer(BufferId(slots[(b.0 as usize).min(slots.len() - 1)]));
            }
        }
        pre.push(g);
        (a_scratch, a_ty)
    } else if let Op::RmsNorm { eps } = body.op(a.node) {
        let nops = body.operands(a.node);
        let (x, nw) = (unview(body, nops[0]), unview(body, nops[1]));
        norm_w = Some(param_index(body, nw).ok_or_else(|| unsupported("the norm weight is not an operand"))?);
        prologue = GemmPrologue::RmsNorm { eps: *eps as f32 };
        if let Some(p) = param_index(body, x) {
            (p, params[p as usize].clone())
        } else if matches!(body.op(x.node), Op::Add) {
            let aops = body.operands(x.node);
            let (p0, p1) = (unview(body, aops[0]), unview(body, aops[1]));
            let (Some(i0), Some(i1)) = (param_index(body, p0), param_index(body, p1)) else {
                return Err(unsupported("the residual add before the norm does not add two operands"));
            };
            let t0 = &params[i0 as usize];
            let t1 = &params[i1 as usize];
            let sum_ty = body.ty(x).map_err(CodegenError::Shape)?.clone();
            if t0.numel() != sum_ty.numel() || t1.numel() != sum_ty.numel() {
                return Err(unsupported("the residual add broadcasts"));
            }
            // The sum is a result of the group, or (the logits head) only read by the product.
            let sum_slot = match out_slot(x) {
                Ok(s) => {
                    written.push(s);
                    s
                }
                Err(_) => new_scratch("sum", sum_ty.clone()),
            };
            let add = single_op_body(&Op::Add, &[t0.clone(), t1.clone()], std::slice::from_ref(&sum_ty));
            let mut g = elementwise::fused_elementwise(&add, &format!("{name}_add"))?;
            let remap = |s: u32| match s {
                0 => i0,
                1 => i1,
                _ => sum_slot,
            };
            for arg in &mut g.launch.args {
                if let ArgRule::Buffer(b) = arg {
                    *arg = ArgRule::Buffer(BufferId(remap(b.0)));
                }
            }
            pre.push(g);
            (sum_slot, sum_ty)
        } else {
            return Err(unsupported(format!("the norm reads a `{}`, not an operand or a sum", body.op(x.node).name())));
        }
    } else {
        return Err(unsupported(format!("the product reads a `{}` (no such prologue)", body.op(a.node).name())));
    };
    if let Some((axis, start, len)) = slice {
        need_bf16("slice", [&a_src_ty])?;
        let mut sliced = a_src_ty.clone();
        sliced.shape[axis] = len.clone();
        let out = new_scratch("sliced A", sliced);
        pre.push(slice::slice(&SliceSpec {
            name: format!("{name}_slice"),
            dtype: a_src_ty.dtype,
            shape: a_src_ty.shape.clone(),
            axis,
            start,
            len,
            x: BufferId(a_slot),
            out: BufferId(out),
        })?);
        a_slot = out;
    }
    let at = body.ty(ops[0]).map_err(CodegenError::Shape)?.clone();
    need_bf16("GEMV / GEMM", [&at])?;
    let m = Dim::product(&at.shape[..at.rank().saturating_sub(1)]);
    let m = if m.as_const().is_some() || at.rank() > 1 { m } else { Dim::constant(1) };

    // Epilogue, or a tail.
    let mm_v = Value::from(mm);
    let mut tail_kernels = Vec::new();
    let (epilogue, out, bias, residual) = match fused_epilogue(body, np, mm_v) {
        Some(e) => e,
        None => {
            let p_slot = match out_slot(mm_v) {
                Ok(s) => s,
                Err(_) => new_scratch("product", body.ty(mm_v).map_err(CodegenError::Shape)?.clone()),
            };
            let (ks, outs) = tail(body, mm_v, p_slot, &format!("{name}_tail"))?;
            tail_kernels = ks;
            written.extend(outs);
            (GemmEpilogue::None, p_slot, None, None)
        }
    };
    written.push(out);
    if let Some((j, (o, _))) = body.outputs().iter().enumerate().find(|(j, _)| !written.contains(&(np + *j as u32))) {
        return Err(unsupported(format!("the result `{o}` (output {j}) is not computed by the projection's kernels")));
    }
    let out_ty = (out >= np && out < np + nout)
        .then(|| body.outputs().get((out - np) as usize).and_then(|(_, v)| body.ty(*v).ok()).cloned())
        .flatten()
        .or_else(|| body.ty(mm_v).ok().cloned());
    need_bf16(
        "GEMV / GEMM",
        out_ty.iter().chain(bias.iter().chain(&residual).chain(&norm_w).map(|p| &params[*p as usize])),
    )?;
    let slot = |s: Option<u32>| s.map(BufferId);
    let operands = GemmOperands {
        a: BufferId(a_slot),
        w: BufferId(w_slot),
        out: BufferId(out),
        norm_w: slot(norm_w),
        bias: slot(bias),
        residual: slot(residual),
        start: None,
        inv_freq: None,
    };
    let main = if mode == Mode::Decode {
        gemv::gemv(&GemvSpec {
            name: name.to_string(),
            dtype: DType::Bf16,
            prologue,
            epilogue,
            max_rows: gemv::MAX_ROWS,
            split_k: None,
            m,
            n,
            k,
            operands,
        })?
    } else {
        let mut spec = GemmSpec::new(name, m, n, k);
        spec.prologue = prologue;
        spec.epilogue = epilogue;
        spec.operands = operands;
        gemm::gemm(&spec)?
    };
    pre.push(main);
    pre.extend(tail_kernels);
    Ok(Plan { kernels: pre, scratch, max_rows: None })
}

/// The epilogue the GEMV / GEMM fuse after the product `mm` — `(epilogue, out, bias, residual)` —
/// or `None` when what follows the product is not one of them (a tail).
fn fused_epilogue(body: &Graph, np: u32, mm: Value) -> Option<(GemmEpilogue, u32, Option<u32>, Option<u32>)> {
    let params = body.params();
    let out_slot = |v: Value| result_slot(body, np, v).ok();
    let Some((u, _, via)) = sole_user(body, mm) else {
        return out_slot(mm).map(|o| (GemmEpilogue::None, o, None, None));
    };
    match body.op(u) {
        Op::Split { sizes, .. } => {
            // A swiglu of the two halves, gate first.
            let uses: Vec<(NodeId, u16)> = (0..sizes.len() as u16).flat_map(|r| body.users(Value::new(u, r))).collect();
            let [(sw, _), (sw2, _)] = uses[..] else { return None };
            if sw != sw2 || !matches!(body.op(sw), Op::Swiglu) || sizes.len() != 2 {
                return None;
            }
            if body.operands(sw)[0] != Value::new(u, 0) {
                return None;
            }
            out_slot(Value::from(sw)).map(|o| (GemmEpilogue::Swiglu, o, None, None))
        }
        Op::Relu2 => out_slot(Value::from(u)).map(|o| (GemmEpilogue::Relu2, o, None, None)),
        Op::Add => {
            let aops = body.operands(u);
            let other = if unview(body, aops[0]) == unview(body, via) { aops[1] } else { aops[0] };
            let p = param_index(body, unview(body, other))?;
            let res = Value::from(u);
            if sole_user(body, res).is_some() || body.ty(other).ok()?.dtype != DType::Bf16 {
                return None;
            }
            let o = out_slot(res)?;
            if params[p as usize].rank() == 1 {
                Some((GemmEpilogue::Bias, o, Some(p), None))
            } else {
                Some((GemmEpilogue::Residual, o, None, Some(p)))
            }
        }
        _ => None,
    }
}

/// The nodes computed from `v` (its users, transitively), in id order.
fn descendants(body: &Graph, v: Value) -> Vec<NodeId> {
    let mut seen = std::collections::BTreeSet::new();
    let mut work = vec![v.node];
    while let Some(n) = work.pop() {
        let results = body.node(n).map_or(0, |x| x.types.len());
        for r in 0..results as u16 {
            for (u, _) in body.users(Value::new(n, r)) {
                if seen.insert(u) {
                    work.push(u);
                }
            }
        }
    }
    seen.into_iter().collect()
}

/// The tail of a projection body: everything computed from the product `mm`, which the kernels read
/// at slot `p_slot`. A split of the product into parts → `heads::tail` (per-head rmsnorm and rope,
/// elementwise chains per part); a purely elementwise tail → `elementwise::fused_elementwise` over a
/// body with the product as param 0. Returns the kernels and the result slots they write.
fn tail(body: &Graph, mm: Value, p_slot: u32, name: &str) -> Result<(Vec<Generated>, Vec<u32>), CodegenError> {
    let np = body.params().len() as u32;
    let desc = descendants(body, mm);
    let split = desc.iter().copied().find(|n| matches!(body.op(*n), Op::Split { .. }));
    match split {
        Some(s) => {
            let (g, outs) = split_tail(body, mm, s, p_slot, &desc, name)?;
            Ok((vec![g], outs))
        }
        None => {
            let params = body.params();
            let mut g = Graph::new(format!("{}_tail", body.name));
            let mut slots = vec![p_slot];
            let mut map = std::collections::BTreeMap::new();
            let pt = body.ty(mm).map_err(CodegenError::Shape)?.clone();
            let p0 = g.add_leaf(Op::Input { name: "p0".into(), role: InputRole::Param, index: 0 }, pt);
            map.insert(mm, Value::from(p0));
            for &n in &desc {
                let op = body.op(n);
                if !op.is_elementwise() && !matches!(op, Op::Reshape { .. }) {
                    return Err(unsupported(format!("a `{}` after the product (no tail generator for it)", op.name())));
                }
                let mut operands = Vec::new();
                for o in body.operands(n) {
                    let v = match map.get(&o) {
                        Some(v) => *v,
                        None => {
                            let Some(i) = param_index(body, o) else {
                                return Err(unsupported(format!(
                                    "the `{}` after the product reads a value computed before it",
                                    op.name()
                                )));
                            };
                            let index = slots.len() as u32;
                            let leaf = g.add_leaf(
                                Op::Input { name: format!("p{index}"), role: InputRole::Param, index },
                                params[i as usize].clone(),
                            );
                            slots.push(i);
                            map.insert(o, Value::from(leaf));
                            Value::from(leaf)
                        }
                    };
                    operands.push(v);
                }
                let types = body.node(n).map(|x| x.types.clone()).unwrap_or_default();
                let new = g.add_typed(op.clone(), types.clone(), &operands);
                for r in 0..types.len() as u16 {
                    map.insert(Value::new(n, r), Value::new(new, r));
                }
            }
            let mut outs = Vec::new();
            for (j, (_, o)) in body.outputs().iter().enumerate() {
                if let Some(v) = map.get(o).filter(|_| *o != mm) {
                    g.set_output(outs.len().to_string(), *v);
                    outs.push(np + j as u32);
                }
            }
            if outs.is_empty() {
                return Err(unsupported("nothing after the product is a result of the group"));
            }
            let mut k = elementwise::fused_elementwise(&g, name)?;
            let ins = slots.len() as u32;
            for arg in &mut k.launch.args {
                if let ArgRule::Buffer(b) = arg {
                    let s = if b.0 < ins { slots[b.0 as usize] } else { outs[(b.0 - ins) as usize] };
                    *arg = ArgRule::Buffer(BufferId(s));
                }
            }
            Ok((vec![k], outs))
        }
    }
}

/// A tail whose product is split along its last axis: every result computed from a part is a chain
/// of reshapes, per-head `rmsnorm` and `rope` (a head part) or of elementwise ops with operand
/// vectors (a column part) → one `heads::tail` kernel.
fn split_tail(
    body: &Graph,
    mm: Value,
    split: NodeId,
    p_slot: u32,
    desc: &[NodeId],
    name: &str,
) -> Result<(Generated, Vec<u32>), CodegenError> {
    let params = body.params();
    let np = params.len() as u32;
    let bad = |s: String| unsupported(format!("split product: {s}"));
    let Op::Split { axis, sizes } = body.op(split) else { return Err(bad("no split".into())) };
    let pt = body.ty(mm).map_err(CodegenError::Shape)?.clone();
    if unview(body, body.operands(split)[0]) != mm || *axis as usize + 1 != pt.rank() {
        return Err(bad("the split is not of the product's last axis".into()));
    }
    let width = cst_u32(&pt.shape[pt.rank() - 1], "the product width")?;
    let mut offsets = Vec::new();
    let mut lo = 0u32;
    for s in sizes {
        let s = cst_u32(s, "a split size")?;
        offsets.push((lo, s));
        lo += s;
    }
    let rows = Dim::product(&pt.shape[..pt.rank() - 1]);
    let mut tokens = if pt.rank() >= 3 { pt.shape[pt.rank() - 2].clone() } else { Dim::constant(1) };
    let mut start = None;
    let mut parts = Vec::new();
    let mut outs = Vec::new();
    for (j, (oname, o)) in body.outputs().iter().enumerate() {
        if unview(body, *o) == mm || !desc.contains(&o.node) {
            continue;
        }
        // Walk back from the result to its part.
        let mut chain = Vec::new();
        let mut head_dim = None;
        let mut v = *o;
        let part = loop {
            if v.node == split {
                break v.result as usize;
            }
            let op = body.op(v.node);
            let vops = body.operands(v.node);
            let param = |x: Value| param_index(body, unview(body, x));
            match op {
                Op::Reshape { .. } => {}
                Op::RmsNorm { eps } => {
                    let w = param(vops[1]).ok_or_else(|| bad("a head norm weight is not an operand".into()))?;
                    let xt = body.ty(vops[0]).map_err(CodegenError::Shape)?;
                    head_dim = Some(cst_u32(&xt.shape[xt.rank() - 1], "head dim")?);
                    chain.push(Step::Norm(w, *eps as f32));
                }
                Op::Rope { style, theta } => {
                    let s = param(vops[1]).ok_or_else(|| bad("the rope positions are not an operand".into()))?;
                    if start.is_some_and(|p| p != s) {
                        return Err(bad("ropes with different positions".into()));
                    }
                    start = Some(s);
                    let xt = body.ty(vops[0]).map_err(CodegenError::Shape)?;
                    if xt.rank() != 4 {
                        return Err(bad(format!("rope of {xt} (expected [B, T, heads, head_dim])")));
                    }
                    head_dim = Some(cst_u32(&xt.shape[3], "head dim")?);
                    tokens = xt.shape[1].clone();
                    chain.push(Step::Rope(heads::Rope { style: *style, theta: *theta }));
                }
                Op::Sigmoid => chain.push(Step::Col(ColumnOp::Sigmoid)),
                Op::Softplus => chain.push(Step::Col(ColumnOp::Softplus)),
                Op::Silu => chain.push(Step::Col(ColumnOp::Silu)),
                Op::Exp => chain.push(Step::Col(ColumnOp::Exp)),
                Op::Neg => chain.push(Step::Col(ColumnOp::Neg)),
                Op::Relu2 => chain.push(Step::Col(ColumnOp::Relu2)),
                Op::Scale { factor } => chain.push(Step::Col(ColumnOp::Scale(*factor as f32))),
                Op::Convert { dtype: DType::Bf16 } => chain.push(Step::Col(ColumnOp::RoundBf16)),
                Op::Convert { dtype: DType::F32 } => {}
                Op::Add | Op::Mul => {
                    let (pi, other) = match (param(vops[0]), param(vops[1])) {
                        (_, Some(p)) => (p, vops[0]),
                        (Some(p), _) => (p, vops[1]),
                        _ => return Err(bad(format!("`{}` of two parts of the product", op.name()))),
                    };
                    let pt = &params[pi as usize];
                    let vec =
                        heads::Vector { buf: BufferId(pi), dtype: pt.dtype, broadcast: pt.numel() == Dim::constant(1) };
                    chain.push(Step::Col(if matches!(op, Op::Add) { ColumnOp::Add(vec) } else { ColumnOp::Mul(vec) }));
                    chain.push(Step::Check(pi));
                    v = other;
                    continue;
                }
                other => return Err(bad(format!("no `{}` in a split-product tail", other.name()))),
            }
            v = vops[0];
        };
        chain.reverse();
        let (plo, pw) = offsets[part];
        // Vector operands must cover the part's columns (or be one value).
        for s in &chain {
            if let Step::Check(p) = s {
                let t = &params[*p as usize];
                if t.numel() != Dim::constant(i64::from(pw)) && t.numel() != Dim::constant(1) {
                    return Err(bad(format!("operand {t} of a part of {pw} columns")));
                }
            }
        }
        let is_head = chain.iter().any(|s| matches!(s, Step::Norm(..) | Step::Rope(_)));
        let kind = if is_head {
            let mut norm = None;
            let mut rope = None;
            for s in &chain {
                match s {
                    Step::Norm(w, eps) if norm.is_none() && rope.is_none() => {
                        let wt = &params[*w as usize];
                        norm = Some(HeadNorm { weight: BufferId(*w), dtype: wt.dtype, eps: *eps });
                    }
                    Step::Rope(r) if rope.is_none() => rope = Some(*r),
                    _ => {
                        return Err(bad(format!("`{oname}`: a head part is [rmsnorm] → [rope], with nothing else")));
                    }
                }
            }
            let head_dim = head_dim.unwrap_or(pw);
            if let Some(n) = &norm
                && params[n.weight.0 as usize].numel() != Dim::constant(i64::from(head_dim))
            {
                return Err(bad(format!("the head norm weight is not [{head_dim}]")));
            }
            PartKind::Heads { head_dim, norm, rope }
        } else {
            PartKind::Columns(
                chain
                    .into_iter()
                    .filter_map(|s| match s {
                        Step::Col(c) => Some(c),
                        _ => None,
                    })
                    .collect(),
            )
        };
        let ot = body.ty(*o).map_err(CodegenError::Shape)?;
        parts.push(TailPart { lo: plo, width: pw, out: BufferId(np + j as u32), out_dtype: ot.dtype, kind });
        outs.push(np + j as u32);
    }
    if parts.is_empty() {
        return Err(bad("no part of the product is a result of the group".into()));
    }
    let spec = TailSpec {
        name: name.to_string(),
        rows,
        tokens,
        width,
        dtype: pt.dtype,
        product: BufferId(p_slot),
        start: start.map(BufferId),
        parts,
    };
    Ok((heads::tail(&spec)?, outs))
}

/// One link of a split-product chain, as parsed (results back to the part).
enum Step {
    Norm(u32, f32),
    Rope(heads::Rope),
    Col(ColumnOp),
    /// A vector operand whose size is checked against the part.
    Check(u32),
}
