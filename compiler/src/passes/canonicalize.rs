//! canonicalize: rewrites nodes into simpler equal forms with a table of named rules.
//!
//! Each entry of `RULES` has a name (used in test file names, `canonicalize-<name>.gir`), the
//! identity it applies, and a matcher that looks at one node (and the producers of its operands) and
//! proposes a `Rewrite`. One engine applies them: it walks the graph in topological order and, at
//! each node, applies the first rule that matches until none does, then moves on. Operands are
//! visited before their users, so one sweep normally reaches the fixed point; the engine sweeps again
//! until a sweep changes nothing, and reports an error if the bounds on rewrites per node or sweeps
//! are exceeded (a rule that undoes another is a bug). Fused bodies are left alone.
//!
//! Whatever a matcher proposes, the engine only applies it when:
//! - the result types stay the same (checked with `Op::infer`);
//! - the node is not an in-place update or a fused node;
//! - no value involved is a state value (a `State` input, an in-place operand or result, or an
//!   output named like a state), so no new reader of a state appears out of order.
//!
//! Preconditions: the graph is acyclic (the verifier holds).
//! Postconditions: no rule matches anywhere; result types, outputs' types and in-place updates are
//! unchanged. A node rewritten to another op keeps its id, its uses and its `origin` entry. A node
//! rewritten to an existing value is removed once its uses read that value. Nodes a rewrite leaves
//! unused (the inner `neg` of `neg(neg(x))`) are left for `dce`. Deterministic; running the pass again
//! changes nothing.

use std::collections::BTreeSet;

use crate::gir::{Graph, InputRole, NodeId, Op, Value};

/// A named rewrite rule.
pub struct Rule {
    /// The rule's name, as in `canonicalize-<name>.gir`.
    pub name: &'static str,
    /// The identity the rule applies, left side to right side.
    pub identity: &'static str,
    matcher: fn(&Graph, NodeId) -> Option<Rewrite>,
}

/// What a rule replaces a node with.
#[derive(Clone, Debug, PartialEq)]
enum Rewrite {
    /// Every use of the node's only result reads this existing value instead.
    Value(Value),
    /// The node computes `op` of these operands instead.
    Op(Op, Vec<Value>),
}

/// The rules, in the order they are tried at each node.
pub const RULES: &[Rule] = &[
    Rule { name: "scale-one", identity: "scale(x, 1) == x", matcher: scale_one },
    Rule { name: "scale-scale", identity: "scale(scale(x, a), b) == scale(x, a·b)", matcher: scale_scale },
    Rule { name: "reshape-same", identity: "reshape(x) to the shape of x == x", matcher: reshape_same },
    Rule { name: "reshape-reshape", identity: "reshape(reshape(x)) == reshape(x)", matcher: reshape_reshape },
    Rule { name: "slice-whole", identity: "slice(x) covering the whole axis == x", matcher: slice_whole },
    Rule { name: "concat-one", identity: "concat(x) == x", matcher: concat_one },
    Rule { name: "convert-same", identity: "convert(x) to the dtype of x == x", matcher: convert_same },
    Rule { name: "neg-neg", identity: "neg(neg(x)) == x", matcher: neg_neg },
    Rule { name: "mul-sigmoid-silu", identity: "mul(x, sigmoid(x)) == silu(x)", matcher: mul_sigmoid_silu },
    Rule { name: "mul-silu-swiglu", identity: "mul(silu(a), b) == swiglu(a, b), same type", matcher: mul_silu_swiglu },
    Rule { name: "clamp-unbounded", identity: "clamp(x) with no bounds == x", matcher: clamp_unbounded },
    Rule { name: "split-one", identity: "split(x) into one piece == x", matcher: split_one },
    Rule { name: "add-zeros", identity: "add(x, zeros) == x when zeros has the result's type", matcher: add_zeros },
];

/// How often one node may be rewritten in one sweep, and how many sweeps may change the graph.
const MAX_REWRITES_PER_NODE: usize = 64;
const MAX_SWEEPS: usize = 16;

/// Runs the pass; `Ok(true)` if any rule applied.
pub fn run(g: &mut Graph) -> Result<bool, String> {
    let mut changed = false;
    for _ in 0..MAX_SWEEPS {
        if !sweep(g)? {
            return Ok(changed);
        }
        changed = true;
    }
    Err(format!("canonicalize still rewrites after {MAX_SWEEPS} sweeps; two rules undo each other"))
}

/// One walk in topological order; `Ok(true)` if any rule applied.
fn sweep(g: &mut Graph) -> Result<bool, String> {
    let order = g.topo_order().map_err(|cycle| {
        let ids: Vec<String> = cycle.iter().map(ToString::to_string).collect();
        format!("canonicalize needs an acyclic graph, found a cycle through {}", ids.join(", "))
    })?;
    // Rules never touch state values, so the outputs that carry states stay the same all sweep.
    let states: BTreeSet<String> = g.inputs(InputRole::State).into_iter().map(|(name, _)| name).collect();
    let state_outputs: BTreeSet<Value> =
        g.outputs().iter().filter(|(name, _)| states.contains(name)).map(|(_, v)| *v).collect();
    let mut changed = false;
    for n in order {
        let mut at = n;
        let mut count = 0;
        while g.contains(at) {
            let Some((rule, rewrite)) = first_match(g, &state_outputs, at) else { break };
            count += 1;
            if count > MAX_REWRITES_PER_NODE {
                return Err(format!(
                    "canonicalize rewrote {n} {MAX_REWRITES_PER_NODE} times; last rule `{}`",
                    rule.name
                ));
            }
            changed = true;
            match apply(g, at, rewrite) {
                Some(next) => at = next,
                None => break,
            }
        }
    }
    Ok(changed)
}

/// The first rule that matches at `n` and passes the engine's checks.
fn first_match(g: &Graph, state_outputs: &BTreeSet<Value>, n: NodeId) -> Option<(&'static Rule, Rewrite)> {
    let is_state = |v: Value| state_outputs.contains(&v) || is_state_value(g, v);
    let node = g.node(n)?;
    let operands = g.operands(n);
    if matches!(node.op, Op::Fused(_)) || !node.op.in_place(operands.len()).is_empty() {
        return None;
    }
    let results = (0..node.types.len() as u16).map(|r| Value::new(n, r));
    if operands.iter().copied().chain(results).any(is_state) {
        return None;
    }
    RULES.iter().find_map(|rule| {
        let rewrite = (rule.matcher)(g, n)?;
        let reads = match &rewrite {
            Rewrite::Value(v) => std::slice::from_ref(v),
            Rewrite::Op(_, operands) => operands.as_slice(),
        };
        (keeps_types(g, n, &rewrite) && !reads.iter().copied().any(is_state)).then_some((rule, rewrite))
    })
}

/// Whether the rewrite gives the node's results exactly the types they have.
fn keeps_types(g: &Graph, n: NodeId, rewrite: &Rewrite) -> bool {
    let Some(node) = g.node(n) else { return false };
    match rewrite {
        Rewrite::Value(v) => node.types.len() == 1 && g.ty(*v).is_ok_and(|t| *t == node.types[0]),
        Rewrite::Op(op, operands) => {
            let Ok(ins) = operands.iter().map(|v| g.ty(*v)).collect::<Result<Vec<_>, _>>() else { return false };
            op.infer(&ins, None).is_ok_and(|types| types == node.types)
        }
    }
}

/// A state input, a value updated in place, or the new version an in-place update produces. (Outputs
/// named like a state input are state values too; the sweep collects those once.)
fn is_state_value(g: &Graph, v: Value) -> bool {
    let Some(node) = g.node(v.node) else { return false };
    if matches!(node.op, Op::Input { role: InputRole::State, .. }) {
        return true;
    }
    if node.op.in_place(g.operands(v.node).len()).iter().any(|(_, r)| *r == v.result as usize) {
        return true;
    }
    g.users(v).into_iter().any(|(user, slot)| {
        g.op(user).in_place(g.operands(user).len()).iter().any(|(operand, _)| *operand == slot as usize)
    })
}

/// Applies a rewrite at `n`; returns the node that now computes its results, if any.
fn apply(g: &mut Graph, n: NodeId, rewrite: Rewrite) -> Option<NodeId> {
    match rewrite {
        Rewrite::Value(v) => {
            g.replace_uses(n.into(), v);
            g.remove(n);
            None
        }
        Rewrite::Op(op, operands) => {
            // The node keeps its id, results, uses and layer; only its op and operands change.
            if let Some(node) = g.node_mut(n) {
                node.op = op;
            }
            g.set_operands(n, &operands);
            Some(n)
        }
    }
}

// ------------------------------------------------------------------ matchers

fn operand(g: &Graph, n: NodeId, slot: usize) -> Option<Value> {
    g.operands(n).get(slot).copied()
}

/// The op producing `v` and its operands, when `v` is the first result of its node.
fn producer(g: &Graph, v: Value) -> Option<(&Op, Vec<Value>)> {
    (v.result == 0).then_some(())?;
    Some((&g.node(v.node)?.op, g.operands(v.node)))
}

fn scale_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Scale { factor } = g.op(n) else { return None };
    (*factor == 1.0).then_some(())?;
    operand(g, n, 0).map(Rewrite::Value)
}

fn scale_scale(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Scale { factor: b } = g.op(n) else { return None };
    let (Op::Scale { factor: a }, inner) = producer(g, operand(g, n, 0)?)? else { return None };
    // A product that overflows or underflows would not be the same function any more.
    let factor = a * b;
    (factor.is_normal() || (factor == 0.0 && (*a == 0.0 || *b == 0.0))).then_some(())?;
    Some(Rewrite::Op(Op::Scale { factor }, vec![*inner.first()?]))
}

fn reshape_same(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Reshape { shape } = g.op(n) else { return None };
    let x = operand(g, n, 0)?;
    (g.ty(x).ok()?.shape == *shape).then_some(Rewrite::Value(x))
}

fn reshape_reshape(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Reshape { shape } = g.op(n) else { return None };
    let (Op::Reshape { .. }, inner) = producer(g, operand(g, n, 0)?)? else { return None };
    Some(Rewrite::Op(Op::Reshape { shape: shape.clone() }, vec![*inner.first()?]))
}

fn slice_whole(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Slice { axis, start, len } = g.op(n) else { return None };
    let x = operand(g, n, 0)?;
    let whole = start.is_zero() && g.ty(x).ok()?.shape.get(*axis as usize) == Some(len);
    whole.then_some(Rewrite::Value(x))
}

fn concat_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Concat { .. } = g.op(n) else { return None };
    match g.operands(n)[..] {
        [x] => Some(Rewrite::Value(x)),
        _ => None,
    }
}

fn convert_same(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Convert { dtype } = g.op(n) else { return None };
    let x = operand(g, n, 0)?;
    (g.ty(x).ok()?.dtype == *dtype).then_some(Rewrite::Value(x))
}

fn neg_neg(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Neg = g.op(n) else { return None };
    let (Op::Neg, inner) = producer(g, operand(g, n, 0)?)? else { return None };
    inner.first().copied().map(Rewrite::Value)
}

fn mul_sigmoid_silu(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Mul = g.op(n) else { return None };
    let (a, b) = (operand(g, n, 0)?, operand(g, n, 1)?);
    // Either order: mul(x, sigmoid(x)) or mul(sigmoid(x), x).
    [(a, b), (b, a)].into_iter().find_map(|(x, s)| match producer(g, s)? {
        (Op::Sigmoid, inner) if inner == [x] => Some(Rewrite::Op(Op::Silu, vec![x])),
        _ => None,
    })
}

fn mul_silu_swiglu(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Mul = g.op(n) else { return None };
    let (a, b) = (operand(g, n, 0)?, operand(g, n, 1)?);
    // Either order: mul(silu(gate), up) or mul(up, silu(gate)), as long as nothing broadcasts.
    [(a, b), (b, a)].into_iter().find_map(|(s, up)| match producer(g, s)? {
        (Op::Silu, inner) => {
            let gate = *inner.first()?;
            (g.ty(gate).ok()? == g.ty(up).ok()?).then_some(Rewrite::Op(Op::Swiglu, vec![gate, up]))
        }
        _ => None,
    })
}

fn clamp_unbounded(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Clamp { min: None, max: None } = g.op(n) else { return None };
    operand(g, n, 0).map(Rewrite::Value)
}

fn split_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Split { sizes, .. } = g.op(n) else { return None };
    (sizes.len() == 1).then_some(())?;
    operand(g, n, 0).map(Rewrite::Value)
}

fn add_zeros(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Add = g.op(n) else { return None };
    let result = g.node(n)?.types.first()?;
    let (a, b) = (operand(g, n, 0)?, operand(g, n, 1)?);
    // Either order; the zeros must not widen the result by broadcasting.
    [(a, b), (b, a)].into_iter().find_map(|(x, z)| match producer(g, z)? {
        (Op::Zeros, _) if g.ty(z).ok()? == result => Some(Rewrite::Value(x)),
        _ => None,
    })
}
