//! cse: merges nodes that compute the same values, keeping the one with the lowest id.
//!
//! Two nodes are the same when their ops have the same `Op::cse_key` and they read the same operand
//! values, or when both are `Weight` leaves of the same name and type. Ops without a key are never
//! merged: inputs, `zeros`, in-place updates (each consumes its own version of a state) and fused
//! nodes. Nodes are numbered in topological order, so operands are already merged when a node is
//! looked at and a whole chain of duplicates collapses in one run. Fused bodies are left alone.
//!
//! Preconditions: the graph is acyclic (the verifier holds).
//! Postconditions: no two nodes with a key read the same operands; every use (operands and outputs)
//! of a merged node reads the kept node instead; the kept node keeps its id and `origin` entry, the
//! merged ones are removed. The graph stays acyclic and in-place updates stay ordered, since every
//! reader that is merged away has its users moved to an equal reader. Deterministic; running the
//! pass again changes nothing.

use std::collections::BTreeMap;

use crate::gir::{Graph, NodeId, Op, TensorType, Value};

/// What makes two nodes equal: the op's key and the (merged) operands, or a weight's name and type.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Compute(String, Vec<Value>),
    Weight(String, String),
}

/// Runs the pass; `Ok(true)` if any node was merged.
pub fn run(g: &mut Graph) -> Result<bool, String> {
    let order = g.topo_order().map_err(|cycle| {
        let ids: Vec<String> = cycle.iter().map(ToString::to_string).collect();
        format!("cse needs an acyclic graph, found a cycle through {}", ids.join(", "))
    })?;

    // Number the nodes: `class[n]` is the first node met that computes the same values as `n`.
    // Classes, not ids, are compared, so equal operands are recognised even before any rewiring.
    let mut class: BTreeMap<NodeId, NodeId> = BTreeMap::new();
    let mut seen: BTreeMap<Key, NodeId> = BTreeMap::new();
    let mut members: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    for &n in &order {
        let rep = match key(g, n, &class) {
            Some(k) => *seen.entry(k).or_insert(n),
            None => n,
        };
        class.insert(n, rep);
        members.entry(rep).or_default().push(n);
    }

    // Keep the lowest id of each class; point the others' uses at it and remove them. The quotient
    // graph is acyclic (a class only reads classes met before it), so the rewiring is too.
    let mut changed = false;
    for group in members.values().filter(|m| m.len() > 1) {
        let keep = group.iter().copied().min().unwrap_or(group[0]);
        for &n in group.iter().filter(|n| **n != keep) {
            let results = g.node(n).map(|x| x.types.len()).unwrap_or(0);
            for r in 0..results as u16 {
                g.replace_uses(Value::new(n, r), Value::new(keep, r));
            }
            g.remove(n);
            changed = true;
        }
    }
    Ok(changed)
}

fn key(g: &Graph, n: NodeId, class: &BTreeMap<NodeId, NodeId>) -> Option<Key> {
    let node = g.node(n)?;
    match &node.op {
        Op::Weight { name } => Some(Key::Weight(name.clone(), types_text(&node.types))),
        op => {
            let operands = g
                .operands(n)
                .into_iter()
                .map(|v| Value::new(class.get(&v.node).copied().unwrap_or(v.node), v.result))
                .collect();
            Some(Key::Compute(op.cse_key()?, operands))
        }
    }
}

fn types_text(types: &[TensorType]) -> String {
    types.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gir::parse::parse;

    #[test]
    fn identical_in_place_updates_are_never_merged() {
        // Two writes into one cache break the verifier's invariant 6, but even then cse must not
        // fold them into one update.
        let mut g = parse(
            "gir @t mode=decode {\n  %0 = input[name=\"start\", role=\"start\"] : i32[B]\n  \
             %1 = input[name=\"kcache\", role=\"state\"] : f32[B, 4, 1, 2]\n  \
             %2 = weight[name=\"k\"] : f32[B, 1, 1, 2]\n  %3 = kv_write(%1, %2, %0) : f32[B, 4, 1, 2]\n  \
             %4 = kv_write(%1, %2, %0) : f32[B, 4, 1, 2]\n  output \"kcache\" = %3\n  output \"other\" = %4\n}\n",
        )
        .unwrap();
        let before = g.to_string();
        assert_eq!(run(&mut g), Ok(false));
        assert_eq!(g.to_string(), before);
    }
}
