//! fuse-norm: residual add + RMSNorm — the add that closes a layer and the pre-norm that opens the
//! next one become one kernel with two results, the sum and the normalised sum.
//!
//! Matches `%s = add(h, y)` where neither operand is constant (a residual, not a bias: biases are
//! epilogues, see fuse-epilogue) and `%r = rmsnorm(%s, w)` with a constant weight `w` reads the sum
//! as its operand 0. `{%s, %r}` becomes `fused[name="add_rmsnorm"]` whose results are, in order, the
//! sum (when anything besides the norm reads it: the next residual) and the normalised value. With
//! several such norms of one sum the lowest id is taken. The fused node belongs to the norm's layer
//! (it opens that layer; the final norm belongs to none).
//!
//! Preconditions: a verified graph.
//! Postconditions: the graph verifies and computes the same values; no plain `add` of two runtime
//! values feeds a plain `rmsnorm` with a constant weight (unless the pair is not convex). Idempotent.

use std::collections::BTreeSet;

use super::fuse::{extract, fusible, is_constant, is_convex};
use crate::gir::{Graph, NodeId, Op};

/// The name of the fused node, which fuse-epilogue recognises by its body.
pub const NAME: &str = "add_rmsnorm";

pub fn run(g: &mut Graph) -> Result<bool, String> {
    let mut changed = false;
    for n in g.node_ids() {
        let Some(norm) = residual_norm(g, n) else { continue };
        let set = BTreeSet::from([n, norm]);
        if !is_convex(g, &set) {
            continue;
        }
        let origin = g.origin.get(&norm).copied();
        let fused = extract(g, &set, NAME)?;
        match origin {
            Some(o) => g.origin.insert(fused, o),
            None => g.origin.remove(&fused),
        };
        changed = true;
    }
    Ok(changed)
}

/// For a residual `add` node, the first `rmsnorm` (constant weight) that normalises its sum.
fn residual_norm(g: &Graph, n: NodeId) -> Option<NodeId> {
    if !g.contains(n) || !matches!(g.op(n), Op::Add) || !fusible(g, n) {
        return None;
    }
    if g.operands(n).iter().any(|v| is_constant(g, v.node)) {
        return None;
    }
    g.users(n.into()).into_iter().find_map(|(u, slot)| {
        let ops = g.operands(u);
        let is_norm = matches!(g.op(u), Op::RmsNorm { .. }) && slot == 0 && ops.len() == 2;
        (is_norm && is_constant(g, ops[1].node) && fusible(g, u)).then_some(u)
    })
}

/// Whether `n` is a fused node made by this pass (its body is exactly an add feeding an rmsnorm),
/// and if so which of its results is the normalised value.
pub fn norm_result(g: &Graph, n: NodeId) -> Option<u16> {
    let Some(Op::Fused(body)) = g.node(n).map(|x| &x.op) else { return None };
    let b = &body.graph;
    let compute: Vec<NodeId> = b.node_ids().into_iter().filter(|m| !b.op(*m).is_leaf()).collect();
    let [first, second] = compute[..] else { return None };
    let (add, norm) = match (b.op(first), b.op(second)) {
        (Op::Add, Op::RmsNorm { .. }) => (first, second),
        (Op::RmsNorm { .. }, Op::Add) => (second, first),
        _ => return None,
    };
    if b.operands(norm).first().map(|v| v.node) != Some(add) {
        return None;
    }
    b.outputs().iter().position(|(_, v)| *v == norm.into()).map(|i| i as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gir::Value;
    use crate::gir::parse::parse;
    use crate::verify::verify;

    /// Parses and verifies `text`, runs the pass, verifies the result and checks that a second run
    /// changes nothing. Returns whether the first run changed the graph, and the graph.
    fn check(text: &str) -> (bool, Graph) {
        let mut g = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        verify(&g).unwrap_or_else(|e| panic!("input: {e:?}\n{g}"));
        let changed = run(&mut g).expect("fuse-norm");
        verify(&g).unwrap_or_else(|e| panic!("output: {e:?}\n{g}"));
        let once = g.to_string();
        assert!(!run(&mut g).expect("second fuse-norm"), "a second run reports a change:\n{g}");
        assert_eq!(g.to_string(), once, "a second run changes the graph");
        (changed, g)
    }

    fn fused(g: &Graph) -> Vec<NodeId> {
        g.node_ids().into_iter().filter(|n| matches!(g.op(*n), Op::Fused(_))).collect()
    }

    /// Two layers of a residual stream: `h1 = h0 + y0`, normalised for layer 1 and carried on.
    const RESIDUAL: &str = "gir @t mode=decode {
  %0 = input[name=\"h\", role=\"tokens\"] : bf16[B, 1, 32]
  %1 = weight[name=\"w0\"] : bf16[32, 32]
  %2 = weight[name=\"n0\"] : bf16[32]
  %3 = rmsnorm[eps=1e-6](%0, %2) : bf16[B, 1, 32]  #0
  %4 = matmul[trans_a=false, trans_b=true](%3, %1) : bf16[B, 1, 32]  #0
  %5 = add(%0, %4) : bf16[B, 1, 32]  #0
  %6 = weight[name=\"n1\"] : bf16[32]
  %7 = rmsnorm[eps=1e-6](%5, %6) : bf16[B, 1, 32]  #1
  %8 = weight[name=\"w1\"] : bf16[32, 32]
  %9 = matmul[trans_a=false, trans_b=true](%7, %8) : bf16[B, 1, 32]  #1
  %10 = add(%5, %9) : bf16[B, 1, 32]  #1
  %11 = weight[name=\"final\"] : bf16[32]
  %12 = rmsnorm[eps=1e-6](%10, %11) : bf16[B, 1, 32]
  output \"y\" = %12
}
";

    #[test]
    fn fuses_residual_add_with_the_next_norm() {
        let (changed, g) = check(RESIDUAL);
        assert!(changed);
        let f = fused(&g);
        assert_eq!(f.len(), 2, "{g}");
        // Layer 1's pre-norm: two results, the sum (read by the next residual add) and the norm.
        let mid = f.iter().copied().find(|n| g.node(*n).unwrap().types.len() == 2).expect("two results");
        assert_eq!(g.origin.get(&mid), Some(&1));
        assert_eq!(norm_result(&g, mid), Some(1));
        let matmul = g.node_ids().into_iter().find(|n| g.origin.get(n) == Some(&1) && g.op(*n).name() == "matmul");
        assert_eq!(g.operands(matmul.unwrap())[0], Value::new(mid, 1));
        // The final norm: only the normalised value is read, and it belongs to no layer.
        let last = f.iter().copied().find(|n| *n != mid).unwrap();
        assert_eq!(g.node(last).unwrap().types.len(), 1);
        assert_eq!(norm_result(&g, last), Some(0));
        assert_eq!(g.origin.get(&last), None);
        assert_eq!(g.outputs()[0].1, Value::from(last));
        // The first norm reads the embedding, not an add.
        assert!(g.node_ids().iter().any(|n| g.op(*n).name() == "rmsnorm"));
    }

    #[test]
    fn leaves_bias_adds_reshaped_sums_and_runtime_weights_alone() {
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 8]
  %1 = input[name=\"y\", role=\"tokens\"] : f32[B, 8]
  %2 = input[name=\"w\", role=\"tokens\"] : f32[8]
  %3 = weight[name=\"bias\"] : f32[8]
  %4 = weight[name=\"n\"] : f32[8]
  %5 = weight[name=\"m\"] : f32[4]
  %6 = add(%0, %3) : f32[B, 8]
  %7 = rmsnorm[eps=1e-6](%6, %4) : f32[B, 8]
  %8 = add(%0, %1) : f32[B, 8]
  %9 = reshape[shape=[B, 2, 4]](%8) : f32[B, 2, 4]
  %10 = rmsnorm[eps=1e-6](%9, %5) : f32[B, 2, 4]
  %11 = add(%1, %0) : f32[B, 8]
  %12 = rmsnorm[eps=1e-6](%11, %2) : f32[B, 8]
  %13 = silu(%11) : f32[B, 8]
  output \"a\" = %7
  output \"b\" = %10
  output \"c\" = %12
  output \"d\" = %13
}
",
        );
        assert!(!changed, "{g}");
        assert!(fused(&g).is_empty());
    }

    #[test]
    fn recognises_only_its_own_fused_nodes() {
        let (_, g) = check(RESIDUAL);
        for n in g.node_ids() {
            let expected = matches!(g.op(n), Op::Fused(_));
            assert_eq!(norm_result(&g, n).is_some(), expected, "{n}");
        }
    }
}
