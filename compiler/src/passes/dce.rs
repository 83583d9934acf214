//! dce: removes every node whose results no graph output needs.
//!
//! A node is live when one of its results is (transitively) read by a graph output. `State` inputs
//! are always live, because each is paired with the output of the same name, and so are `Param`
//! inputs of fused bodies, because they are tied by index to the fused node's operands. Every other
//! input is kept only while a live node reads it. Live fused nodes are cleaned the same way inside:
//! body nodes that no body output needs are removed, params never. A fused node's results are left
//! as they are, even unused ones, so values `%N.k` keep their meaning.
//!
//! Preconditions: the graph is acyclic (the verifier holds).
//! Postconditions: every node reaches an output, except `State` and `Param` inputs; node ids,
//! outputs and the `origin` entries of surviving nodes are unchanged. Removal is in id order, so
//! the result is deterministic; running the pass again changes nothing.

use std::collections::BTreeSet;

use crate::gir::{Graph, InputRole, NodeId, Op};

/// Runs the pass; `Ok(true)` if any node was removed, here or inside a fused body.
pub fn run(g: &mut Graph) -> Result<bool, String> {
    Ok(dce(g))
}

fn dce(g: &mut Graph) -> bool {
    let live = live_nodes(g);
    let dead: Vec<NodeId> = g.node_ids().into_iter().filter(|n| !live.contains(n)).collect();
    let mut changed = !dead.is_empty();
    for n in dead {
        g.remove(n);
    }
    for n in g.node_ids() {
        if let Some(node) = g.node_mut(n)
            && let Op::Fused(body) = &mut node.op
        {
            changed |= dce(&mut body.graph);
        }
    }
    changed
}

/// The nodes the outputs need, plus the inputs that are always kept.
fn live_nodes(g: &Graph) -> BTreeSet<NodeId> {
    let mut live = BTreeSet::new();
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|(_, v)| v.node).collect();
    stack.extend(g.node_ids().into_iter().filter(|n| always_kept(g.op(*n))));
    while let Some(n) = stack.pop() {
        if !g.contains(n) || !live.insert(n) {
            continue;
        }
        stack.extend(g.operands(n).into_iter().map(|v| v.node));
    }
    live
}

fn always_kept(op: &Op) -> bool {
    matches!(op, Op::Input { role: InputRole::State | InputRole::Param, .. })
}
