//! fuse: the one mechanism every fusion pass uses — move a set of nodes into a `fused` node.
//!
//! `extract` takes a set of compute nodes, checks the set is convex (no path leaves the set and comes
//! back, which would create a cycle), and replaces it by one `Op::Fused` node whose body holds copies
//! of the nodes. Values read from outside become the node's operands (body `param` inputs, in the order
//! first read); values used outside the set (or graph outputs) become its results. Fused members are
//! inlined, so bodies are flat. Passes decide *what* to fuse; this file decides *how*.

use std::collections::{BTreeMap, BTreeSet};

use crate::gir::{FusedBody, Graph, InputRole, NodeId, Op, Value};

/// Nodes that may go into a fused body: everything that computes (not leaves, not other kinds of
/// boundary).
pub fn fusible(g: &Graph, n: NodeId) -> bool {
    g.node(n).is_some_and(|node| !node.op.is_leaf()) && !is_constant(g, n)
}

/// Whether a node computes only from weights (no runtime input, no zeros): such nodes are weight
/// preparation (packed weights, `−exp(A_log)`), computed once at load by the schedule, and fusion
/// passes treat them like leaves.
pub fn is_constant(g: &Graph, n: NodeId) -> bool {
    let mut stack = vec![n];
    let mut seen = BTreeSet::new();
    while let Some(x) = stack.pop() {
        if !seen.insert(x) {
            continue;
        }
        match g.node(x).map(|node| &node.op) {
            Some(Op::Weight { .. }) => {}
            Some(Op::Input { .. } | Op::Zeros) | None => return false,
            Some(_) => stack.extend(g.operands(x).iter().map(|v| v.node)),
        }
    }
    true
}

/// Whether no path from a member leaves the set and re-enters it.
pub fn is_convex(g: &Graph, set: &BTreeSet<NodeId>) -> bool {
    // Walk forward from the set's outside successors; reaching a member means a path re-enters.
    let mut stack: Vec<NodeId> = set.iter().flat_map(|n| g.successors(*n)).filter(|s| !set.contains(s)).collect();
    let mut seen: BTreeSet<NodeId> = stack.iter().copied().collect();
    while let Some(n) = stack.pop() {
        for s in g.successors(n) {
            if set.contains(&s) {
                return false;
            }
            if seen.insert(s) {
                stack.push(s);
            }
        }
    }
    true
}

/// Replaces `set` by one fused node named `name`; returns it. The layer of the first member (if
/// any) becomes the fused node's origin.
pub fn extract(g: &mut Graph, set: &BTreeSet<NodeId>, name: &str) -> Result<NodeId, String> {
    if set.is_empty() {
        return Err("cannot fuse an empty set".to_string());
    }
    if let Some(n) = set.iter().find(|n| !fusible(g, **n)) {
        return Err(format!("{n} cannot be fused"));
    }
    if !is_convex(g, set) {
        return Err("the nodes to fuse are not convex".to_string());
    }
    let order: Vec<NodeId> =
        g.topo_order().map_err(|_| "cycle".to_string())?.into_iter().filter(|n| set.contains(n)).collect();

    let mut body = Graph::new(name);
    let mut map: BTreeMap<Value, Value> = BTreeMap::new();
    let mut operands: Vec<Value> = Vec::new();
    for &n in &order {
        let node = g.node(n).cloned().ok_or("missing node")?;
        let mut ins = Vec::new();
        for v in g.operands(n) {
            let inner = match map.get(&v) {
                Some(x) => *x,
                None => {
                    let idx = operands.len() as u32;
                    let ty = g.ty(v)?.clone();
                    let p =
                        body.add_leaf(Op::Input { name: format!("p{idx}"), role: InputRole::Param, index: idx }, ty);
                    operands.push(v);
                    map.insert(v, p.into());
                    p.into()
                }
            };
            ins.push(inner);
        }
        match node.op {
            Op::Fused(inner) => {
                // Inline a fused member: its params become `ins`, its outputs the member's results.
                let sub = inner.graph;
                let mut submap: BTreeMap<Value, Value> = BTreeMap::new();
                for sn in sub.topo_order().map_err(|_| "cycle in fused body".to_string())? {
                    let snode = sub.node(sn).cloned().ok_or("missing node")?;
                    if let Op::Input { role: InputRole::Param, index, .. } = snode.op {
                        let v = ins.get(index as usize).copied().ok_or("fused param out of range")?;
                        submap.insert(sn.into(), v);
                        continue;
                    }
                    let sins: Vec<Value> = sub.operands(sn).iter().map(|v| submap[v]).collect();
                    let nn = body.add_typed(snode.op, snode.types.clone(), &sins);
                    for r in 0..snode.types.len() {
                        submap.insert(Value::new(sn, r as u16), Value::new(nn, r as u16));
                    }
                }
                for (r, (_, v)) in sub.outputs().iter().enumerate() {
                    map.insert(Value::new(n, r as u16), submap[v]);
                }
            }
            op => {
                let nn = body.add_typed(op, node.types.clone(), &ins);
                for r in 0..node.types.len() {
                    map.insert(Value::new(n, r as u16), Value::new(nn, r as u16));
                }
            }
        }
    }
    // Results: member values read outside the set or returned by the graph, in (node, result) order.
    let mut results: Vec<Value> = Vec::new();
    for &n in &order {
        let count = g.node(n).map(|x| x.types.len()).unwrap_or(0);
        for r in 0..count {
            let v = Value::new(n, r as u16);
            let outside = g.users(v).iter().any(|(u, _)| !set.contains(u)) || g.is_output(v);
            if outside {
                results.push(v);
            }
        }
    }
    for (i, v) in results.iter().enumerate() {
        body.set_output(i.to_string(), map[v]);
    }
    let types: Vec<_> = results.iter().map(|v| g.ty(*v).cloned()).collect::<Result<_, _>>()?;
    let origin = order.iter().find_map(|n| g.origin.get(n).copied());
    let fused = g.add_typed(Op::Fused(Box::new(FusedBody { name: name.to_string(), graph: body })), types, &operands);
    if let Some(o) = origin {
        g.origin.insert(fused, o);
    }
    for (i, v) in results.iter().enumerate() {
        g.replace_uses(*v, Value::new(fused, i as u16));
    }
    for &n in order.iter().rev() {
        g.remove(n);
    }
    Ok(fused)
}

/// The ops inside a node: the node's own op, or every op of a fused body.
pub fn member_ops(g: &Graph, n: NodeId) -> Vec<Op> {
    match g.node(n).map(|x| &x.op) {
        Some(Op::Fused(b)) => {
            b.graph.node_ids().iter().map(|m| b.graph.op(*m).clone()).filter(|o| !o.is_leaf()).collect()
        }
        Some(op) => vec![op.clone()],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gir::parse::parse;
    use crate::verify::verify;

    #[test]
    fn extract_makes_a_fused_node_and_keeps_meaning_of_edges() {
        let mut g = parse(
            "gir @t {\n  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 4]\n  %1 = silu(%0) : f32[B, 4]\n  \
             %2 = exp(%1) : f32[B, 4]\n  %3 = add(%2, %1) : f32[B, 4]\n  output \"y\" = %3\n  output \"z\" = %1\n}\n",
        )
        .unwrap();
        let f = extract(&mut g, &BTreeSet::from([NodeId(1), NodeId(2)]), "k").unwrap();
        verify(&g).unwrap();
        assert_eq!(g.node(f).unwrap().types.len(), 2);
        // %1 feeds %3 and is an output; %2 feeds %3.
        assert!(g.to_string().contains("output \"z\" = %4"), "{g}");
        // Not convex: %1 → %2 → %3 with %2 outside.
        let mut g2 = parse(
            "gir @t {\n  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 4]\n  %1 = silu(%0) : f32[B, 4]\n  \
             %2 = exp(%1) : f32[B, 4]\n  %3 = add(%2, %1) : f32[B, 4]\n  output \"y\" = %3\n}\n",
        )
        .unwrap();
        assert!(extract(&mut g2, &BTreeSet::from([NodeId(1), NodeId(3)]), "k").is_err());
    }
}
