//! schedule: gir → **program**, the device-neutral output that codegen and the runtime consume.
//!
//! A program is three lists over the graph it carries:
//! - **prep**: kernel groups run once when the weights are loaded: the graph's *constant* compute
//!   nodes (those computed from weights only, `passes::fuse::is_constant`: packed weights, `−exp(A_log)`).
//!   Their results are persistent `Prepared` buffers.
//! - **kernels**: one kernel group per compute node of the step, in the graph's deterministic
//!   topological order (`Graph::topo_order`). A compute node is any node that is not a leaf (input,
//!   weight, zeros), not a view (`reshape`, which aliases its operand's buffer) and not constant. A
//!   `fused` node is one group (its body is one kernel).
//! - **buffers**: one per value. Values that need no storage of their own are *aliases*: a view shares
//!   its operand's storage (same offset, other shape), and an in-place result (`Op::in_place`) shares
//!   the storage of the operand it updates, so a state's new version is the state's buffer. Every
//!   alias names its storage *root*. Roots are inputs, weights, prepared weights, states (all outside
//!   the arena, bound by name) or arena buffers: step activations and graph outputs.
//!
//! The **buffer plan** (`arena`) places the arena roots in one arena whose offsets are `Dim`s, so one
//! program serves every batch size and length; see `arena.rs` for the liveness rule, the classes by
//! size monomial and the packing.
//!
//! `Program::check` re-derives what must hold (reads after writes, in-place versions, aliases, arena
//! placement); the tests also check, for concrete sizes, that no two live arena buffers overlap.
//!
//! The text form (`--emit program`, `Display`) prints one line per kernel and per buffer:
//! ```text
//! program @tiny mode=decode: 22 kernels per step, 2 at load
//! memory: weights 171248, prepared 32, states 9152*B, arena 2816*B bytes
//! prep (once at load):
//!   k0 = exp %23 #0 (b10) -> (b20)  elements[n=8]
//!   k1 = neg %24 #0 (b20) -> (b21)  elements[n=8]
//! kernels (per step):
//!   k2 = embed %3 (b4, b0) -> (b22)  rows[rows=B, width=64]
//!   k4 = matmul %7 #0 (b23, b6) -> (b24)  matmul[m=B, n=296, k=64]
//!   k6 = conv1d_update %13 #0 (b27, b7, b2, b8) -> (b29, b30)  conv[batch=B, tokens=1, channels=160, ...]
//!   k22 = matmul %48 (b53, b19) -> (b54)  matmul[m=B, n=256, k=64]
//! buffers:
//!   b0 input tokens = %0 : i32[B, 1]  4*B bytes
//!   b2 state layers.0.conv = %11 : bf16[B, 160, 3]  960*B bytes
//!   b10 weight layers.0.mamba2.A_log = %22 : bf16[8]  16 bytes
//!   b21 prepared %24 : bf16[8]  16 bytes
//!   b24 activation %7 : bf16[B, 1, 296]  592*B bytes  @ 512*B  live k4..k5
//!   b25 activation %8 : bf16[B, 296]  view of b24
//!   b30 state %13.1 : bf16[B, 160, 3]  update of b2
//!   b55 output logits = %49 : f32[B, 1, 256]  1024*B bytes  @ 512*B  live k23..k23
//! outputs:
//!   layers.0.conv = b30
//!   logits = b55
//! arena 2816*B bytes:
//!   class B @ 0: 7 slots [256, 256, 1024, 512, 256, 256, 256]*B = 2816*B bytes
//! ```

mod arena;
mod check;
mod launch;
mod print;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::gir::{Bindings, Dim, Graph, InputRole, Mode, NodeId, Op, TensorType, Value};
use crate::passes::fuse::is_constant;

pub use arena::{ALIGN, ArenaClass, ArenaPlan, Slot};
pub use launch::Launch;

/// A kernel group of a program; `Display` is `k3`, as the text form prints it. Prep kernels are
/// numbered first (they run first, at load), then the step's kernels in launch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KernelId(pub u32);

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "k{}", self.0)
    }
}

/// A buffer of a program; `Display` is `b7`, as the text form prints it. `Program::buffers[i]` has
/// id `b{i}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BufferId(pub u32);

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// Where a buffer's storage comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BufferKind {
    /// A runtime input other than a state (`tokens`, `start`, `lens`, `targets`), given by the caller
    /// for each step and only read.
    Input,
    /// A model weight, loaded once by name and only read.
    Weight,
    /// A prepared weight: the result of a prep kernel, computed once at load and only read by the step.
    Prepared,
    /// A persistent state (KV cache, conv, SSM or delta state), bound by name: the step reads the
    /// input of that name and writes the output of the same name in place, into the same buffer.
    State,
    /// A step intermediate, placed in the arena for its lifetime.
    Activation,
    /// A graph output that is not a state (`logits`, `loss`): placed in the arena and live until the
    /// step ends, so the caller reads it after the last kernel.
    Output,
}

impl BufferKind {
    pub fn name(self) -> &'static str {
        match self {
            BufferKind::Input => "input",
            BufferKind::Weight => "weight",
            BufferKind::Prepared => "prepared",
            BufferKind::State => "state",
            BufferKind::Activation => "activation",
            BufferKind::Output => "output",
        }
    }

    /// Whether buffers of this kind live in the arena.
    pub fn in_arena(self) -> bool {
        matches!(self, BufferKind::Activation | BufferKind::Output)
    }
}

/// How an alias shares another buffer's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    /// The buffer that owns the storage (never itself an alias).
    pub root: BufferId,
    /// The operand buffer this one was derived from (the view's operand, or the updated operand).
    pub source: BufferId,
    /// `true` for an in-place update (a new version of `source`), `false` for a view of `source`.
    pub in_place: bool,
}

/// A buffer: one value of the graph and where it lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub id: BufferId,
    /// The storage kind; an alias has its root's kind.
    pub kind: BufferKind,
    /// The input, weight, state or output name, or the value (`%12.1`) for unnamed buffers.
    pub name: String,
    /// The graph value the buffer holds.
    pub value: Value,
    pub ty: TensorType,
    /// Size in bytes (`ty`'s element count × element size).
    pub bytes: Dim,
    /// Set when the buffer shares another's storage (and then needs none of its own).
    pub alias: Option<Alias>,
    /// The storage starts as zeros (a `zeros` leaf, e.g. fresh states in training): the runtime
    /// clears it before the first kernel of its lifetime.
    pub zeroed: bool,
    /// Byte offset in the arena, for arena buffers (an alias repeats its root's).
    pub offset: Option<Dim>,
    /// For arena buffers, the step kernels from the first that writes (or, for zeroed storage,
    /// uses) the storage to the last that reads or writes it, inclusive; an alias repeats its root's.
    pub live: Option<(KernelId, KernelId)>,
}

impl Buffer {
    /// The buffer that owns this one's storage (itself unless it is an alias).
    pub fn root(&self) -> BufferId {
        self.alias.map_or(self.id, |a| a.root)
    }
}

/// A kernel group: one compute node of the graph, launched as one kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelGroup {
    pub id: KernelId,
    /// The op name (`matmul`), or the fused body's name (`rmsnorm_matmul`).
    pub name: String,
    /// The graph node; later stages fetch its op (or fused body) from `Program::graph`.
    pub node: NodeId,
    /// The layer the node was lowered from (`Graph::origin`), if any.
    pub layer: Option<u32>,
    /// The buffer of each operand, in operand order.
    pub inputs: Vec<BufferId>,
    /// The buffer of each result, in result order (in-place results are aliases of the operand they
    /// update).
    pub outputs: Vec<BufferId>,
    /// The symbolic problem size, for grid sizing and cost models.
    pub launch: Launch,
}

/// A scheduled graph: what codegen compiles and the runtime runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// The model name.
    pub name: String,
    pub mode: Mode,
    /// The graph the kernel groups point into.
    pub graph: Graph,
    /// Kernel groups run once at load (weight preparation), in order.
    pub prep: Vec<KernelGroup>,
    /// Kernel groups run for each step, in launch order.
    pub kernels: Vec<KernelGroup>,
    /// Every buffer; `buffers[i].id == BufferId(i)`.
    pub buffers: Vec<Buffer>,
    /// The graph's outputs, by name, and the buffer holding each.
    pub outputs: Vec<(String, BufferId)>,
    /// The placement of the arena buffers.
    pub arena: ArenaPlan,
}

impl Program {
    /// Kernels launched per step (prep excluded).
    pub fn kernel_count(&self) -> usize {
        self.kernels.len()
    }

    pub fn buffer(&self, id: BufferId) -> Option<&Buffer> {
        self.buffers.get(id.0 as usize)
    }

    /// The arena size in bytes for concrete sizes.
    pub fn arena_bytes(&self, at: &Bindings) -> i64 {
        self.arena.size.eval(at)
    }

    /// The most arena bytes live at once for concrete sizes (unaligned): the floor any placement
    /// needs, to compare `arena_bytes` against.
    pub fn arena_live_peak(&self, at: &Bindings) -> i64 {
        let roots: Vec<(KernelId, KernelId, i64)> = self
            .buffers
            .iter()
            .filter(|b| b.alias.is_none())
            .filter_map(|b| b.live.map(|(s, e)| (s, e, b.bytes.eval(at))))
            .collect();
        let live_at = |k: KernelId| {
            roots.iter().filter(|(s, e, _)| *s <= k && k <= *e).fold(0i64, |acc, (_, _, n)| acc.saturating_add(*n))
        };
        self.kernels.iter().map(|k| live_at(k.id)).max().unwrap_or(0)
    }

    /// The total size of the storage roots of a kind (e.g. all state bytes).
    pub fn total_bytes(&self, kind: BufferKind) -> Dim {
        self.buffers
            .iter()
            .filter(|b| b.alias.is_none() && b.kind == kind)
            .fold(Dim::constant(0), |a, b| a.add(&b.bytes))
    }
}

/// Schedules a verified graph. An error is an internal error (a graph the verifier accepts always
/// schedules), except for the documented requirements: a state's output must be its in-place update.
pub fn schedule(g: &Graph) -> Result<Program, String> {
    let mode = g.mode.ok_or("cannot schedule a fused body: the graph has no mode")?;
    let order = g.topo_order().map_err(|c| format!("the graph has a cycle through {c:?}"))?;
    let mut s = Scheduler { g, bufs: Vec::new(), of: BTreeMap::new(), prep: Vec::new(), kernels: Vec::new() };

    // Buffers in sections, so the listing reads top-down: inputs, states, weights, prepared, step.
    for &n in &order {
        if let Op::Input { name, role, .. } = g.op(n) {
            let kind = match role {
                InputRole::Tokens | InputRole::Targets | InputRole::Start | InputRole::Lens => BufferKind::Input,
                InputRole::State => continue,
                InputRole::Param => return Err(format!("{n}: a `param` input outside a fused body")),
            };
            s.root(Value::from(n), kind, name.clone(), false)?;
        }
    }
    for &n in &order {
        if let Op::Input { name, role: InputRole::State, .. } = g.op(n) {
            s.root(Value::from(n), BufferKind::State, name.clone(), false)?;
        }
    }
    for &n in &order {
        if let Op::Weight { name } = g.op(n) {
            s.root(Value::from(n), BufferKind::Weight, name.clone(), false)?;
        }
    }
    let constant: BTreeSet<NodeId> =
        order.iter().copied().filter(|n| !g.op(*n).is_leaf() && is_constant(g, *n)).collect();
    for &n in order.iter().filter(|n| constant.contains(n)) {
        s.node(n, true)?;
    }
    for &n in &order {
        if matches!(g.op(n), Op::Zeros) {
            s.root(Value::from(n), BufferKind::Activation, n.to_string(), true)?;
        } else if !g.op(n).is_leaf() && !constant.contains(&n) {
            s.node(n, false)?;
        }
    }

    // Number the kernels: prep first, then the step.
    let Scheduler { mut bufs, of, mut prep, mut kernels, .. } = s;
    for (i, k) in prep.iter_mut().chain(kernels.iter_mut()).enumerate() {
        k.id = KernelId(i as u32);
    }

    // Outputs: a step activation that an output reaches (through aliases) becomes an `Output` and is
    // named after it; a state's output must be the state's storage.
    let mut outputs = Vec::new();
    for (name, v) in g.outputs() {
        let b = *of.get(v).ok_or_else(|| format!("output `{name}` names {v}, which has no buffer"))?;
        let root = bufs[b.0 as usize].root();
        let r = &mut bufs[root.0 as usize];
        let is_state = g.inputs(InputRole::State).iter().any(|(s, _)| s == name);
        if is_state && !(r.kind == BufferKind::State && r.name == *name) {
            return Err(format!("state output `{name}` ({v}) is not an in-place update of the state `{name}`"));
        }
        if r.kind == BufferKind::Activation {
            r.kind = BufferKind::Output;
            r.name = name.clone();
        }
        outputs.push((name.clone(), b));
    }
    for i in 0..bufs.len() {
        if let Some(a) = bufs[i].alias {
            bufs[i].kind = bufs[a.root.0 as usize].kind;
        }
    }

    let arena = arena::plan(&mut bufs, &kernels)?;
    Ok(Program { name: g.name.clone(), mode, graph: g.clone(), prep, kernels, buffers: bufs, outputs, arena })
}

/// Builds the buffers and kernel groups node by node.
struct Scheduler<'g> {
    g: &'g Graph,
    bufs: Vec<Buffer>,
    /// The buffer of each value.
    of: BTreeMap<Value, BufferId>,
    prep: Vec<KernelGroup>,
    kernels: Vec<KernelGroup>,
}

impl Scheduler<'_> {
    fn push(
        &mut self,
        v: Value,
        kind: BufferKind,
        name: String,
        alias: Option<Alias>,
        zeroed: bool,
    ) -> Result<BufferId, String> {
        let ty = self.g.ty(v)?.clone();
        let id = BufferId(self.bufs.len() as u32);
        self.bufs.push(Buffer {
            id,
            kind,
            name,
            value: v,
            bytes: ty.bytes(),
            ty,
            alias,
            zeroed,
            offset: None,
            live: None,
        });
        self.of.insert(v, id);
        Ok(id)
    }

    fn root(&mut self, v: Value, kind: BufferKind, name: String, zeroed: bool) -> Result<BufferId, String> {
        self.push(v, kind, name, None, zeroed)
    }

    fn alias(&mut self, v: Value, source: BufferId, in_place: bool) -> Result<BufferId, String> {
        let root = self.bufs[source.0 as usize].root();
        let kind = self.bufs[root.0 as usize].kind;
        if in_place && matches!(kind, BufferKind::Input | BufferKind::Weight | BufferKind::Prepared) {
            return Err(format!("{v} updates {source} in place, but it is read-only ({})", kind.name()));
        }
        self.push(v, kind, v.to_string(), Some(Alias { root, source, in_place }), false)
    }

    fn buffer_of(&self, v: Value) -> Result<BufferId, String> {
        self.of.get(&v).copied().ok_or_else(|| format!("{v} is read before it has a buffer"))
    }

    /// A non-leaf node: a view becomes an alias; anything else a kernel group (in `prep` when
    /// `constant`) whose results are new buffers or aliases of the operands they update in place.
    fn node(&mut self, n: NodeId, constant: bool) -> Result<(), String> {
        let g = self.g;
        let op = g.op(n);
        let operands = g.operands(n);
        let inputs: Vec<BufferId> = operands.iter().map(|v| self.buffer_of(*v)).collect::<Result<_, _>>()?;
        if op.is_view() {
            let src = *inputs.first().ok_or_else(|| format!("{n}: a view without an operand"))?;
            self.alias(Value::from(n), src, false)?;
            return Ok(());
        }
        let in_place: BTreeMap<usize, usize> = op.in_place(operands.len()).into_iter().map(|(o, r)| (r, o)).collect();
        let count = g.node(n).map_or(0, |x| x.types.len());
        let mut outputs = Vec::with_capacity(count);
        for r in 0..count {
            let v = Value::new(n, r as u16);
            let b = match in_place.get(&r) {
                Some(o) => {
                    let src = *inputs.get(*o).ok_or_else(|| format!("{n}: in-place operand {o} out of range"))?;
                    self.alias(v, src, true)?
                }
                None if constant => self.root(v, BufferKind::Prepared, v.to_string(), false)?,
                None => self.root(v, BufferKind::Activation, v.to_string(), false)?,
            };
            outputs.push(b);
        }
        let name = match op {
            Op::Fused(body) => body.name.clone(),
            _ => op.name().to_string(),
        };
        let group = KernelGroup {
            id: KernelId(0),
            name,
            node: n,
            layer: g.origin.get(&n).copied(),
            inputs,
            outputs,
            launch: launch::launch(g, n)?,
        };
        if constant {
            self.prep.push(group)
        } else {
            self.kernels.push(group)
        }
        Ok(())
    }
}
