//! verify: checks the invariants every gir graph holds between passes.
//!
//! Invariants (each has a test with a hand-made broken graph in `tests/verify.rs`):
//! 1. **acyclic**: the data edges form a DAG;
//! 2. **operands well formed**: every node's operand slots are exactly `0..n` (no gaps, no duplicates)
//!    and every operand names an existing result of its producer;
//! 3. **types agree**: each node's result types equal what `Op::infer` computes from its operand types
//!    (leaves: exactly one declared type);
//! 4. **boundary**: inputs have unique names; `Param` inputs appear only in fused bodies, with indices
//!    `0..n`; graph outputs have unique names and name existing values;
//! 5. **state threading**: in a top-level graph every `State` input has an output of the same name
//!    and type (the state's new version);
//! 6. **in-place updates ordered**: a value is updated in place by at most one node; every other
//!    reader of that value is an ancestor of the updating node (so it runs before the update), and the
//!    old version is not a graph output;
//! 7. **fused bodies well formed**: each body satisfies 1–6 (as a body), takes exactly the node's
//!    operands as `Param`s and yields the node's results.
//!
//! A failure is a compiler bug: callers report it as an internal error naming the pass.

use std::collections::{BTreeMap, BTreeSet};

use crate::gir::{Graph, InputRole, NodeId, Op, TensorType, Value};

/// Checks a top-level graph. Returns every violation found, or `Ok`.
pub fn verify(g: &Graph) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    check(g, false, "", &mut errs);
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn check(g: &Graph, is_body: bool, ctx: &str, errs: &mut Vec<String>) {
    let err = |errs: &mut Vec<String>, n: Option<NodeId>, m: String| match n {
        Some(n) => errs.push(format!("{ctx}{n}: {m}")),
        None => errs.push(format!("{ctx}{m}")),
    };

    // 1. acyclic
    if let Err(cycle) = g.topo_order() {
        let ids: Vec<String> = cycle.iter().map(ToString::to_string).collect();
        err(errs, None, format!("the graph has a cycle through {}", ids.join(", ")));
        return;
    }

    let mut input_names: BTreeMap<String, NodeId> = BTreeMap::new();
    let mut params: BTreeMap<u32, NodeId> = BTreeMap::new();
    for n in g.node_ids() {
        let Some(node) = g.node(n) else { continue };
        // 2. operands well formed
        let slots = g.operand_slots(n);
        let mut ok = true;
        for (i, (slot, v)) in slots.iter().enumerate() {
            if *slot as usize != i {
                err(
                    errs,
                    Some(n),
                    format!("operand slots are not 0..{}: found slot {slot} at position {i}", slots.len()),
                );
                ok = false;
                break;
            }
            if g.ty(*v).is_err() {
                err(errs, Some(n), format!("operand {slot} reads {v}, which does not exist"));
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        // 3. types agree
        let ins: Vec<&TensorType> = slots.iter().filter_map(|(_, v)| g.ty(*v).ok()).collect();
        let declared = node.op.is_leaf().then_some(node.types.as_slice());
        match node.op.infer(&ins, declared) {
            Ok(types) if types == node.types => {}
            Ok(types) => {
                let want: Vec<String> = types.iter().map(ToString::to_string).collect();
                let have: Vec<String> = node.types.iter().map(ToString::to_string).collect();
                err(
                    errs,
                    Some(n),
                    format!(
                        "`{}` should have type ({}), but is typed ({})",
                        node.op.name(),
                        want.join(", "),
                        have.join(", ")
                    ),
                );
            }
            Err(e) => err(errs, Some(n), format!("`{}`: {e}", node.op.name())),
        }
        // 4. boundary
        if let Op::Input { name, role, index } = &node.op {
            if let Some(prev) = input_names.insert(name.clone(), n) {
                err(errs, Some(n), format!("input {name:?} is also defined by {prev}"));
            }
            if *role == InputRole::Param {
                if !is_body {
                    err(errs, Some(n), "a `param` input outside a fused body".to_string());
                } else if let Some(prev) = params.insert(*index, n) {
                    err(errs, Some(n), format!("param index {index} is also used by {prev}"));
                }
            } else if is_body {
                err(errs, Some(n), format!("a fused body may only have `param` inputs, found role {:?}", role.name()));
            }
        }
        // 7. fused bodies
        if let Op::Fused(body) = &node.op {
            let inner = format!("{ctx}{n} (fused {:?}): ", body.name);
            check(&body.graph, true, &inner, errs);
        }
    }
    if is_body {
        for (i, idx) in params.keys().enumerate() {
            if *idx as usize != i {
                err(errs, None, format!("param indices are not 0..{}", params.len()));
                break;
            }
        }
    }

    let mut out_names = BTreeSet::new();
    for (name, v) in g.outputs() {
        if !out_names.insert(name.clone()) {
            err(errs, None, format!("output {name:?} is defined twice"));
        }
        if g.ty(*v).is_err() {
            err(errs, None, format!("output {name:?} names {v}, which does not exist"));
        }
    }

    // 5. state threading
    if !is_body {
        for (name, n) in g.inputs(InputRole::State) {
            let want = g.node(n).and_then(|x| x.types.first()).cloned();
            match g.outputs().iter().find(|(o, _)| *o == name) {
                None => err(errs, Some(n), format!("state {name:?} has no output of the same name")),
                Some((_, v)) => {
                    if g.ty(*v).ok().cloned() != want {
                        err(errs, Some(n), format!("state {name:?} changes type between input and output"));
                    }
                }
            }
        }
    }

    // 6. in-place updates ordered
    let mut updated: BTreeMap<Value, NodeId> = BTreeMap::new();
    for n in g.node_ids() {
        let ops = g.operands(n);
        for (operand, _) in g.op(n).in_place(ops.len()) {
            let Some(v) = ops.get(operand).copied() else {
                err(errs, Some(n), format!("in-place operand {operand} does not exist"));
                continue;
            };
            if let Some(prev) = updated.insert(v, n) {
                err(errs, Some(n), format!("{v} is updated in place by both {prev} and {n}"));
                continue;
            }
            if g.is_output(v) {
                err(
                    errs,
                    Some(n),
                    format!("{v} is updated in place by {n} but is also a graph output (a stale version)"),
                );
            }
            for (user, _) in g.users(v) {
                if user != n && !g.reaches(user, n) {
                    err(
                        errs,
                        Some(n),
                        format!("{user} reads {v} but is not ordered before {n}, which updates it in place"),
                    );
                }
            }
        }
    }
}
