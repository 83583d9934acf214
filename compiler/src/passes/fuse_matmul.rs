//! fuse-matmul: horizontal GEMM fusion — matmuls that read the same activation with different
//! weights become one matmul over the concatenated weights, followed by a split.
//!
//! Matches `matmul[trans_b=true](x, w_i)` nodes with the same LHS value `x` and the same `trans_a`,
//! whose RHS `w_i` are rank-2 constants (`weight` leaves or weight preparation, see
//! `fuse::is_constant`) of one dtype, so they share the input width `K`. At least two distinct weights
//! are needed; they are rewritten as
//!
//! ```text
//! %c = concat[axis=0](w_1, .., w_n)                   // constant: computed once at load
//! %m = matmul[trans_a=.., trans_b=true](x, %c)        // [.., M, n_1 + .. + n_n]
//! %s = split[axis=last, sizes=[n_1, .., n_n]](%m)
//! ```
//! and every use of the i-th matmul reads `%s.i` (matmuls that share both `x` and `w` share a
//! piece). Weights are concatenated in the order of the matmuls' node ids. This covers attention
//! q/k/v, FFN gate/up, DeltaNet q/k/v/b (and a/g when gated): any projections of one input. Bias
//! adds stay where they are; fuse-epilogue makes them epilogues.
//!
//! Preconditions: a verified graph.
//! Postconditions: the graph verifies and computes the same values; no two `matmul[trans_b=true]`
//! nodes with rank-2 constant RHS of the same dtype and different weights read the same runtime LHS
//! with the same `trans_a`. New nodes take the layer of the first matmul merged. Idempotent.

use std::collections::BTreeMap;

use super::fuse::is_constant;
use crate::gir::{DType, Dim, Graph, NodeId, Op, Value};

/// What merged matmuls have in common: the LHS value, `trans_a` and the weights' dtype.
type GroupKey = (Value, bool, DType);

pub fn run(g: &mut Graph) -> Result<bool, String> {
    let mut groups: BTreeMap<GroupKey, Vec<NodeId>> = BTreeMap::new();
    for n in g.node_ids() {
        let Op::MatMul { trans_a, trans_b: true } = *g.op(n) else { continue };
        let [x, w] = g.operands(n)[..] else { continue };
        let wt = g.ty(w)?;
        // A matmul of weights only is weight preparation, computed once at load: leave it alone.
        if wt.rank() != 2 || !is_constant(g, w.node) || is_constant(g, x.node) {
            continue;
        }
        groups.entry((x, trans_a, wt.dtype)).or_default().push(n);
    }
    let mut changed = false;
    for ((x, trans_a, _), members) in groups {
        changed |= merge(g, x, trans_a, &members)?;
    }
    Ok(changed)
}

/// Replaces `members` (matmuls of `x`, in id order) by one matmul over their concatenated weights.
/// Returns false when they use fewer than two distinct weights (that is CSE's business).
fn merge(g: &mut Graph, x: Value, trans_a: bool, members: &[NodeId]) -> Result<bool, String> {
    let mut weights: Vec<Value> = Vec::new();
    let mut piece_of: Vec<usize> = Vec::new();
    for &m in members {
        let w = g.operands(m)[1];
        let piece = match weights.iter().position(|x| *x == w) {
            Some(i) => i,
            None => {
                weights.push(w);
                weights.len() - 1
            }
        };
        piece_of.push(piece);
    }
    if weights.len() < 2 {
        return Ok(false);
    }
    let sizes: Vec<Dim> = weights.iter().map(|w| g.ty(*w).map(|t| t.shape[0].clone())).collect::<Result<_, _>>()?;
    let origin = g.origin.get(&members[0]).copied();
    let concat = g.add(Op::Concat { axis: 0 }, &weights)?;
    let matmul = g.add(Op::MatMul { trans_a, trans_b: true }, &[x, concat.into()])?;
    let axis = g.ty(matmul.into())?.rank() - 1;
    let split = g.add(Op::Split { axis: axis as u32, sizes }, &[matmul.into()])?;
    if let Some(o) = origin {
        for n in [concat, matmul, split] {
            g.origin.insert(n, o);
        }
    }
    for (&m, &piece) in members.iter().zip(&piece_of) {
        g.replace_uses(m.into(), Value::new(split, piece as u16));
        g.remove(m);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gir::parse::parse;
    use crate::verify::verify;

    /// Parses and verifies `text`, runs the pass, verifies the result and checks that a second run
    /// changes nothing. Returns whether the first run changed the graph, and the graph.
    fn check(text: &str) -> (bool, Graph) {
        let mut g = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        verify(&g).unwrap_or_else(|e| panic!("input: {e:?}\n{g}"));
        let changed = run(&mut g).expect("fuse-matmul");
        verify(&g).unwrap_or_else(|e| panic!("output: {e:?}\n{g}"));
        let once = g.to_string();
        assert!(!run(&mut g).expect("second fuse-matmul"), "a second run reports a change:\n{g}");
        assert_eq!(g.to_string(), once, "a second run changes the graph");
        (changed, g)
    }

    fn count(g: &Graph, name: &str) -> usize {
        g.node_ids().iter().filter(|n| g.op(**n).name() == name).count()
    }

    const QKV: &str = "gir @attn mode=decode {
  %0 = input[name=\"x\", role=\"tokens\"] : bf16[B, 1, 64]
  %1 = weight[name=\"q\"] : bf16[64, 64]
  %2 = matmul[trans_a=false, trans_b=true](%0, %1) : bf16[B, 1, 64]  #3
  %3 = weight[name=\"k\"] : bf16[16, 64]
  %4 = matmul[trans_a=false, trans_b=true](%0, %3) : bf16[B, 1, 16]  #3
  %5 = weight[name=\"v\"] : bf16[16, 64]
  %6 = matmul[trans_a=false, trans_b=true](%0, %5) : bf16[B, 1, 16]  #3
  %7 = weight[name=\"v_bias\"] : bf16[16]
  %8 = add(%6, %7) : bf16[B, 1, 16]  #3
  output \"q\" = %2
  output \"k\" = %4
  output \"v\" = %8
}
";

    #[test]
    fn merges_projections_of_one_input() {
        let (changed, g) = check(QKV);
        assert!(changed);
        assert_eq!(count(&g, "matmul"), 1, "{g}");
        assert_eq!(count(&g, "concat"), 1);
        assert_eq!(count(&g, "split"), 1);
        // The bias add stays, now reading the third piece.
        assert_eq!(count(&g, "add"), 1);
        let text = g.to_string();
        assert!(text.contains("concat[axis=0](%1, %3, %5) : bf16[96, 64]  #3"), "{text}");
        assert!(text.contains("split[axis=2, sizes=[64, 16, 16]]"), "{text}");
        let split = g.node_ids().into_iter().find(|n| g.op(*n).name() == "split").unwrap();
        let outs: Vec<Value> = g.outputs().iter().map(|(_, v)| *v).collect();
        assert_eq!(outs[0], Value::new(split, 0));
        assert_eq!(outs[1], Value::new(split, 1));
        let add = g.node_ids().into_iter().find(|n| g.op(*n).name() == "add").unwrap();
        assert_eq!(g.operands(add)[0], Value::new(split, 2));
        // The concatenated weight is computed once at load.
        let concat = g.node_ids().into_iter().find(|n| g.op(*n).name() == "concat").unwrap();
        assert!(is_constant(&g, concat));
    }

    #[test]
    fn leaves_matmuls_of_different_inputs_alone() {
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : bf16[B, 64]
  %1 = input[name=\"y\", role=\"tokens\"] : bf16[B, 64]
  %2 = weight[name=\"a\"] : bf16[32, 64]
  %3 = weight[name=\"b\"] : bf16[32, 64]
  %4 = matmul[trans_a=false, trans_b=true](%0, %2) : bf16[B, 32]
  %5 = matmul[trans_a=false, trans_b=true](%1, %3) : bf16[B, 32]
  output \"a\" = %4
  output \"b\" = %5
}
",
        );
        assert!(!changed);
        assert_eq!(count(&g, "matmul"), 2);
    }

    #[test]
    fn leaves_runtime_rhs_other_dtypes_and_shared_weights_alone() {
        // %4 has a runtime RHS, %6 an f32 weight, %7 the same weight as %5 (CSE's business), %8 an
        // untransposed weight.
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 8]
  %1 = input[name=\"m\", role=\"tokens\"] : f32[4, 8]
  %2 = weight[name=\"a\"] : bf16[4, 8]
  %3 = weight[name=\"b\"] : f32[4, 8]
  %4 = matmul[trans_a=false, trans_b=true](%0, %1) : f32[B, 4]
  %5 = matmul[trans_a=false, trans_b=true](%0, %2) : f32[B, 4]
  %6 = matmul[trans_a=false, trans_b=true](%0, %3) : f32[B, 4]
  %7 = matmul[trans_a=false, trans_b=true](%0, %2) : f32[B, 4]
  %9 = weight[name=\"c\"] : bf16[8, 3]
  %8 = matmul[trans_a=false, trans_b=false](%0, %9) : f32[B, 3]
  output \"a\" = %4
  output \"b\" = %5
  output \"c\" = %6
  output \"d\" = %7
  output \"e\" = %8
}
",
        );
        assert!(!changed, "{g}");
        assert_eq!(count(&g, "matmul"), 5);
    }

    #[test]
    fn merged_matmuls_that_share_a_weight_share_a_piece() {
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 8]
  %1 = weight[name=\"a\"] : f32[4, 8]
  %2 = weight[name=\"b\"] : f32[2, 8]
  %3 = matmul[trans_a=false, trans_b=true](%0, %1) : f32[B, 4]
  %4 = matmul[trans_a=false, trans_b=true](%0, %2) : f32[B, 2]
  %5 = matmul[trans_a=false, trans_b=true](%0, %1) : f32[B, 4]
  %6 = add(%3, %5) : f32[B, 4]
  output \"a\" = %6
  output \"b\" = %4
}
",
        );
        assert!(changed);
        let text = g.to_string();
        assert!(text.contains("concat[axis=0](%1, %2) : f32[6, 8]"), "{text}");
        let add = g.node_ids().into_iter().find(|n| g.op(*n).name() == "add").unwrap();
        let ops = g.operands(add);
        assert_eq!(ops[0], ops[1], "{text}");
    }

    #[test]
    fn merges_gated_deltanet_projections_and_weight_preparation() {
        // Five projections and one constant (prepared) weight.
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : bf16[B, T, 16]
  %1 = weight[name=\"q\"] : bf16[8, 16]
  %2 = weight[name=\"k\"] : bf16[8, 16]
  %3 = weight[name=\"v\"] : bf16[16, 16]
  %4 = weight[name=\"b\"] : bf16[2, 16]
  %5 = weight[name=\"a\"] : bf16[2, 16]
  %6 = weight[name=\"g_raw\"] : bf16[16, 16]
  %7 = scale[factor=0.5](%6) : bf16[16, 16]
  %8 = matmul[trans_a=false, trans_b=true](%0, %1) : bf16[B, T, 8]
  %9 = matmul[trans_a=false, trans_b=true](%0, %2) : bf16[B, T, 8]
  %10 = matmul[trans_a=false, trans_b=true](%0, %3) : bf16[B, T, 16]
  %11 = matmul[trans_a=false, trans_b=true](%0, %4) : bf16[B, T, 2]
  %12 = matmul[trans_a=false, trans_b=true](%0, %5) : bf16[B, T, 2]
  %13 = matmul[trans_a=false, trans_b=true](%0, %7) : bf16[B, T, 16]
  output \"q\" = %8
  output \"k\" = %9
  output \"v\" = %10
  output \"b\" = %11
  output \"a\" = %12
  output \"g\" = %13
}
",
        );
        assert!(changed);
        assert_eq!(count(&g, "matmul"), 1, "{g}");
        assert!(g.to_string().contains("split[axis=2, sizes=[8, 8, 16, 2, 2, 16]]"), "{g}");
    }
}
