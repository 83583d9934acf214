//! gir: the graph IR. A dataflow graph over petgraph's `StableGraph`: nodes are `Op`s with their
//! result types; an edge carries one result of its source into one operand slot of its target.
//!
//! Values are SSA: a `Value` is one result of one node (`%12`, or `%12.1` for a second result).
//! Persistent state (KV caches, conv, SSM and delta states) enters as `Input { role: State }` and
//! leaves as the output of the same name; ops that update state consume the old version and produce
//! the new one (`Op::in_place`), so data edges alone order every read before the update that replaces
//! it, and the verifier checks that no reader can run after.
//!
//! Side tables (`origin`: the layer a node was lowered from) live beside the nodes. Node ids are stable
//! across passes, and the text form prints them as they are, so `--print-after` dumps can be compared.

pub mod dim;
pub mod op;
pub mod parse;
pub mod print;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use dim::{Bindings, Dim, Sym};
pub use op::{Attr, FusedBody, InputRole, Op, RopeStyle};
pub use types::{DType, TensorType};

/// A node of a graph; `Display` is `%N`, exactly as the dump prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One result of one node: `%N` for result 0, `%N.k` for result k > 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Value {
    pub node: NodeId,
    pub result: u16,
}

impl Value {
    pub fn new(node: NodeId, result: u16) -> Value {
        Value { node, result }
    }
}

impl From<NodeId> for Value {
    fn from(node: NodeId) -> Value {
        Value { node, result: 0 }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.result == 0 { write!(f, "{}", self.node) } else { write!(f, "{}.{}", self.node, self.result) }
    }
}

/// The compilation mode a graph was lowered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// B sequences of T new tokens: logits for every token and the final states.
    Prefill,
    /// B sequences, one new token each: logits and the updated states.
    Decode,
    /// Forward pass and mean cross-entropy loss from fresh states.
    Train,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Prefill, Mode::Decode, Mode::Train];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
            Mode::Train => "train",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// A node: its op and the types of its results.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub types: Vec<TensorType>,
    /// The node's own id (petgraph's index is an implementation detail that may be reused).
    id: NodeId,
}

/// An edge: which result of the source feeds which operand of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub result: u16,
    pub operand: u16,
}

/// A gir graph (a whole model in one mode, or the body of a fused node).
#[derive(Clone, Debug)]
pub struct Graph {
    /// The model name (or a fused kernel's name).
    pub name: String,
    /// The mode of a top-level graph; `None` for fused bodies.
    pub mode: Option<Mode>,
    g: StableGraph<Node, Edge, petgraph::Directed, u32>,
    /// Node id → petgraph index. Ids are never reused, so dumps before and after a pass agree on
    /// every node that survives it.
    index: BTreeMap<NodeId, NodeIndex<u32>>,
    next_id: u32,
    outputs: Vec<(String, Value)>,
    /// Side table: the layer index each node was lowered from.
    pub origin: BTreeMap<NodeId, u32>,
}

impl PartialEq for Graph {
    /// Graphs are equal when they print the same (same ids, ops, types, edges and outputs).
    fn eq(&self, other: &Graph) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Serialize for Graph {
    /// A graph serialises as its text form, which is canonical and parses back exactly.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Graph {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Graph, D::Error> {
        let text = String::deserialize(d)?;
        parse::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            mode: None,
            g: StableGraph::default(),
            index: BTreeMap::new(),
            next_id: 0,
            outputs: Vec::new(),
            origin: BTreeMap::new(),
        }
    }

    /// Adds a node whose result types are inferred from its operands.
    pub fn add(&mut self, op: Op, operands: &[Value]) -> Result<NodeId, String> {
        let types = {
            let ins: Vec<&TensorType> = operands.iter().map(|v| self.ty(*v)).collect::<Result<_, _>>()?;
            op.infer(&ins, None)?
        };
        Ok(self.add_typed(op, types, operands))
    }

    /// Adds a leaf (input, weight, zeros) of the given type.
    pub fn add_leaf(&mut self, op: Op, ty: TensorType) -> NodeId {
        self.add_typed(op, vec![ty], &[])
    }

    /// Adds a node with the given result types, unchecked (the parser and passes that build nodes of
    /// known type use this; the verifier re-checks).
    pub fn add_typed(&mut self, op: Op, types: Vec<TensorType>, operands: &[Value]) -> NodeId {
        let id = NodeId(self.next_id);
        self.insert(id, op, types, operands);
        id
    }

    /// Adds a node under a given id (the parser restores ids this way). Ids at or above the next
    /// fresh id move the counter past them.
    pub(crate) fn insert(&mut self, id: NodeId, op: Op, types: Vec<TensorType>, operands: &[Value]) {
        let ix = self.g.add_node(Node { op, types, id });
        self.index.insert(id, ix);
        self.next_id = self.next_id.max(id.0 + 1);
        for (i, v) in operands.iter().enumerate() {
            if let Some(&src) = self.index.get(&v.node) {
                self.g.add_edge(src, ix, Edge { result: v.result, operand: i as u16 });
            }
        }
    }

    fn ix(&self, n: NodeId) -> Option<NodeIndex<u32>> {
        self.index.get(&n).copied()
    }

    fn id_of(&self, ix: NodeIndex<u32>) -> NodeId {
        self.g[ix].id
    }

    pub fn contains(&self, n: NodeId) -> bool {
        self.index.contains_key(&n)
    }

    pub fn node(&self, n: NodeId) -> Option<&Node> {
        self.ix(n).and_then(|ix| self.g.node_weight(ix))
    }

    pub fn node_mut(&mut self, n: NodeId) -> Option<&mut Node> {
        let ix = self.ix(n)?;
        self.g.node_weight_mut(ix)
    }

    /// The op of a node. A dangling id is an internal error; it reads as `zeros`.
    pub fn op(&self, n: NodeId) -> &Op {
        const DANGLING: Op = Op::Zeros;
        self.node(n).map(|x| &x.op).unwrap_or(&DANGLING)
    }

    /// The type of a value, or an error naming it.
    pub fn ty(&self, v: Value) -> Result<&TensorType, String> {
        self.node(v.node).and_then(|n| n.types.get(v.result as usize)).ok_or_else(|| format!("no value {v}"))
    }

    /// Node ids in increasing order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.index.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// The operands of a node, in slot order.
    pub fn operands(&self, n: NodeId) -> Vec<Value> {
        self.operand_slots(n).into_iter().map(|(_, v)| v).collect()
    }

    /// The operand slots of a node as `(slot, value)`, including duplicates (for the verifier).
    pub fn operand_slots(&self, n: NodeId) -> Vec<(u16, Value)> {
        let Some(ix) = self.ix(n) else { return Vec::new() };
        let mut ins: Vec<(u16, Value)> = self
            .g
            .edges_directed(ix, Direction::Incoming)
            .map(|e| (e.weight().operand, Value::new(self.id_of(e.source()), e.weight().result)))
            .collect();
        ins.sort();
        ins
    }

    /// Every `(user, operand slot)` reading `v`, sorted.
    pub fn users(&self, v: Value) -> Vec<(NodeId, u16)> {
        let Some(ix) = self.ix(v.node) else { return Vec::new() };
        let mut out: Vec<(NodeId, u16)> = self
            .g
            .edges_directed(ix, Direction::Outgoing)
            .filter(|e| e.weight().result == v.result)
            .map(|e| (self.id_of(e.target()), e.weight().operand))
            .collect();
        out.sort();
        out
    }

    /// Nodes reading any result of `n`, sorted and deduplicated.
    pub fn successors(&self, n: NodeId) -> Vec<NodeId> {
        let Some(ix) = self.ix(n) else { return Vec::new() };
        let set: BTreeSet<NodeId> =
            self.g.edges_directed(ix, Direction::Outgoing).map(|e| self.id_of(e.target())).collect();
        set.into_iter().collect()
    }

    pub fn outputs(&self) -> &[(String, Value)] {
        &self.outputs
    }

    pub fn set_output(&mut self, name: impl Into<String>, v: Value) {
        let name = name.into();
        if let Some(o) = self.outputs.iter_mut().find(|(n, _)| *n == name) {
            o.1 = v;
        } else {
            self.outputs.push((name, v));
        }
    }

    /// Whether `v` is a graph output.
    pub fn is_output(&self, v: Value) -> bool {
        self.outputs.iter().any(|(_, o)| *o == v)
    }

    /// Redirects every use of `old` (operands and outputs) to `new`.
    pub fn replace_uses(&mut self, old: Value, new: Value) {
        for (user, slot) in self.users(old) {
            self.set_operand(user, slot, new);
        }
        for o in &mut self.outputs {
            if o.1 == old {
                o.1 = new;
            }
        }
    }

    /// Points operand `slot` of `n` at `v`.
    pub fn set_operand(&mut self, n: NodeId, slot: u16, v: Value) {
        let (Some(ix), Some(src)) = (self.ix(n), self.ix(v.node)) else { return };
        let old: Vec<_> = self
            .g
            .edges_directed(ix, Direction::Incoming)
            .filter(|e| e.weight().operand == slot)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(src, ix, Edge { result: v.result, operand: slot });
    }

    /// Replaces all operands of `n` (their number may change).
    pub fn set_operands(&mut self, n: NodeId, operands: &[Value]) {
        let Some(ix) = self.ix(n) else { return };
        let old: Vec<_> = self.g.edges_directed(ix, Direction::Incoming).map(|e| e.id()).collect();
        for e in old {
            self.g.remove_edge(e);
        }
        for (i, v) in operands.iter().enumerate() {
            if let Some(src) = self.ix(v.node) {
                self.g.add_edge(src, ix, Edge { result: v.result, operand: i as u16 });
            }
        }
    }

    /// Removes a node and its edges (its users must have been redirected first).
    pub fn remove(&mut self, n: NodeId) {
        if let Some(ix) = self.index.remove(&n) {
            self.g.remove_node(ix);
        }
        self.origin.remove(&n);
    }

    /// Nodes in a deterministic topological order (operands first; among ready nodes, lowest id
    /// first), or the nodes on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, Vec<NodeId>> {
        let mut indeg: BTreeMap<NodeId, usize> = BTreeMap::new();
        for n in self.node_ids() {
            let preds: BTreeSet<NodeId> = self.operands(n).iter().map(|v| v.node).collect();
            indeg.insert(n, preds.len());
        }
        let mut ready: BTreeSet<NodeId> = indeg.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for s in self.successors(n) {
                if let Some(d) = indeg.get_mut(&s) {
                    *d -= 1;
                    if *d == 0 {
                        ready.insert(s);
                    }
                }
            }
        }
        if order.len() == indeg.len() {
            Ok(order)
        } else {
            let done: BTreeSet<NodeId> = order.into_iter().collect();
            Err(indeg.keys().filter(|n| !done.contains(n)).copied().collect())
        }
    }

    /// Whether `to` depends on `from` through data edges (`from` must run first).
    pub fn reaches(&self, from: NodeId, to: NodeId) -> bool {
        if from == to {
            return true;
        }
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            for s in self.successors(n) {
                if s == to {
                    return true;
                }
                if seen.insert(s) {
                    stack.push(s);
                }
            }
        }
        false
    }

    /// The types of the `Param` inputs of a fused body, in index order.
    pub fn params(&self) -> Vec<TensorType> {
        let mut ps: Vec<(u32, TensorType)> = self
            .node_ids()
            .into_iter()
            .filter_map(|n| match &self.node(n)?.op {
                Op::Input { role: InputRole::Param, index, .. } => Some((*index, self.node(n)?.types[0].clone())),
                _ => None,
            })
            .collect();
        ps.sort_by_key(|(i, _)| *i);
        ps.into_iter().map(|(_, t)| t).collect()
    }

    /// The `Param` input node of a fused body with the given index.
    pub fn param_node(&self, index: u32) -> Option<NodeId> {
        self.node_ids().into_iter().find(|n| {
            matches!(self.node(*n).map(|x| &x.op), Some(Op::Input { role: InputRole::Param, index: i, .. }) if *i == index)
        })
    }

    /// The types of the outputs, in order.
    pub fn output_types(&self) -> Vec<TensorType> {
        self.outputs.iter().filter_map(|(_, v)| self.ty(*v).ok().cloned()).collect()
    }

    /// For a fused body: `(param index, output index)` for each param updated in place by an op of the
    /// body whose new version is an output.
    pub fn param_updates(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for n in self.node_ids() {
            let ops = self.operands(n);
            for (operand, result) in self.op(n).in_place(ops.len()) {
                let Some(src) = ops.get(operand) else { continue };
                let Op::Input { role: InputRole::Param, index, .. } = self.op(src.node) else { continue };
                let new = Value::new(n, result as u16);
                if let Some(pos) = self.outputs.iter().position(|(_, v)| *v == new) {
                    out.push((*index as usize, pos));
                }
            }
        }
        out.sort();
        out
    }

    /// Inputs of a role, as `(name, node)` sorted by name.
    pub fn inputs(&self, role: InputRole) -> Vec<(String, NodeId)> {
        let mut v: Vec<(String, NodeId)> = self
            .node_ids()
            .into_iter()
            .filter_map(|n| match self.op(n) {
                Op::Input { name, role: r, .. } if *r == role => Some((name.clone(), n)),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// The nodes a node's results are computed from (transitively), itself included.
    pub fn ancestors(&self, n: NodeId) -> BTreeSet<NodeId> {
        let mut seen = BTreeSet::from([n]);
        let mut stack = vec![n];
        while let Some(x) = stack.pop() {
            for v in self.operands(x) {
                if seen.insert(v.node) {
                    stack.push(v.node);
                }
            }
        }
        seen
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&print::print(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_query() {
        let mut g = Graph::new("t");
        let x = g.add_leaf(
            Op::Input { name: "x".into(), role: InputRole::Tokens, index: 0 },
            TensorType::new(DType::F32, [Dim::sym(Sym::B), Dim::constant(4)]),
        );
        let s = g.add(Op::Silu, &[x.into()]).unwrap();
        let a = g.add(Op::Add, &[x.into(), s.into()]).unwrap();
        g.set_output("y", a.into());
        assert_eq!(g.operands(a), vec![Value::from(x), Value::from(s)]);
        assert_eq!(g.users(x.into()), vec![(s, 0), (a, 0)]);
        assert_eq!(g.topo_order().unwrap(), vec![x, s, a]);
        assert!(g.reaches(x, a));
        assert!(!g.reaches(a, x));
        assert_eq!(a.to_string(), "%2");
        assert_eq!(Value::new(a, 1).to_string(), "%2.1");
        assert!(g.add(Op::Embed, &[x.into()]).is_err());
    }
}
