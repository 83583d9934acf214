//! fuse-elementwise: connected groups of elementwise ops over the same elements become one kernel.
//!
//! Members: elementwise ops (`Op::is_elementwise`), fused nodes whose bodies hold only elementwise ops
//! and reshapes (so a group can grow what an earlier round made), and reshapes that connect two members
//! (a reshape whose producer or every consumer is outside the group is dropped from it). Every member
//! works over the same number of elements; operands of other sizes (a bias, a per-head factor) are read
//! as inputs and broadcast. Members are joined along data edges into maximal connected groups; a group
//! that is not convex is cut where a path leaves it and comes back (the members such a path can reach
//! go to a group of their own), so it never spans a matmul, norm, scan, step or attention. Each group
//! with at least two elementwise members becomes one fused node `elementwise`; a lone elementwise op is
//! left alone. Constants (weight preparation) are never members, and fused nodes holding anything but
//! elementwise ops and reshapes (GEMMs with epilogues, mixer steps) are never grown here.
//!
//! The pass repeats until no group is left, so running it again changes nothing.
//!
//! Preconditions: a verified graph (normally at the end of the pipeline, after the specific fusions).
//! Postconditions: no two connected elementwise members of equal size that could share a kernel are
//! left apart; the graph computes the same values and verifies.

use std::collections::{BTreeMap, BTreeSet};

use crate::gir::{Dim, Graph, NodeId, Op};
use crate::passes::fuse::{extract, fusible, is_convex, member_ops};
use crate::passes::fuse_decode_mixer::{connected, reentering};

/// The name of the fused kernels.
pub const NAME: &str = "elementwise";

pub fn run(g: &mut Graph) -> Result<bool, String> {
    let mut changed = false;
    loop {
        let mut progress = false;
        for group in groups(g) {
            // Fusing an earlier group of this round can close a path around a later one; that one is
            // found again, cut differently, in the next round.
            if is_convex(g, &group) {
                extract(g, &group, NAME)?;
                progress = true;
            }
        }
        if !progress {
            return Ok(changed);
        }
        changed = true;
    }
}

/// The number of elements a node works over, if it may be a member: an elementwise op, a reshape, or
/// a fused node of only those whose results all have one size; never a constant.
fn extent(g: &Graph, n: NodeId) -> Option<Dim> {
    let node = g.node(n)?;
    let ops = member_ops(g, n);
    let kinds_ok = match &node.op {
        Op::Fused(_) => ops.iter().all(|op| op.is_elementwise() || op.is_view()) && ops.iter().any(Op::is_elementwise),
        op => op.is_elementwise() || op.is_view(),
    };
    if !kinds_ok || !fusible(g, n) {
        return None;
    }
    let first = node.types.first()?.numel();
    node.types.iter().all(|t| t.numel() == first).then_some(first)
}

/// The groups to fuse, each convex with at least two elementwise members, ordered by first node.
fn groups(g: &Graph) -> Vec<BTreeSet<NodeId>> {
    let extents: BTreeMap<NodeId, Dim> =
        g.node_ids().into_iter().filter_map(|n| extent(g, n).map(|e| (n, e))).collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (&start, size) in &extents {
        if seen.contains(&start) {
            continue;
        }
        let candidates: BTreeSet<NodeId> = extents.iter().filter(|(_, e)| *e == size).map(|(n, _)| *n).collect();
        let component = connected(g, &candidates, start);
        seen.extend(component.iter().copied());
        let mut work = vec![component];
        while let Some(set) = work.pop() {
            let set = without_loose_reshapes(g, set);
            let mut rest = set.clone();
            while let Some(&first) = rest.first() {
                let part = connected(g, &set, first);
                rest = &rest - &part;
                if is_convex(g, &part) {
                    if part.iter().filter(|n| !g.op(**n).is_view()).count() >= 2 {
                        out.push(part);
                    }
                } else {
                    // Members a path that left the part can reach run after it; split them off.
                    let late = reentering(g, &part, true);
                    work.push(&part - &late);
                    work.push(late);
                }
            }
        }
    }
    out.sort();
    out
}

/// `set` without the reshapes that do not connect two of its members (repeated, for chains).
fn without_loose_reshapes(g: &Graph, mut set: BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    loop {
        let loose: Vec<NodeId> = set
            .iter()
            .copied()
            .filter(|&n| {
                g.op(n).is_view()
                    && (!g.operands(n).iter().all(|v| set.contains(&v.node))
                        || !g.successors(n).iter().any(|s| set.contains(s)))
            })
            .collect();
        if loose.is_empty() {
            return set;
        }
        for n in loose {
            set.remove(&n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gir::parse::parse;
    use crate::passes::fuse_conv::tests::{fused_names, gir_files};
    use crate::verify::verify;

    /// Runs the pass over IR text, verifies, checks idempotence; returns whether it changed and the graph.
    fn check(text: &str) -> (bool, Graph) {
        let mut g = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        verify(&g).unwrap_or_else(|e| panic!("input does not verify: {e:?}\n{g}"));
        let changed = run(&mut g).unwrap_or_else(|e| panic!("{e}\n{g}"));
        verify(&g).unwrap_or_else(|e| panic!("output does not verify: {e:?}\n{g}"));
        let once = g.to_string();
        assert!(!run(&mut g).unwrap(), "not idempotent:\n{once}\n{g}");
        (changed, g)
    }

    /// The body ops (leaves left out, sorted) of every fused node, in node order.
    fn bodies(g: &Graph) -> Vec<Vec<&'static str>> {
        g.node_ids()
            .into_iter()
            .filter(|n| matches!(g.op(*n), Op::Fused(_)))
            .map(|n| {
                let mut ops: Vec<&'static str> = member_ops(g, n).iter().map(Op::name).collect();
                ops.sort();
                ops
            })
            .collect()
    }

    #[test]
    fn a_chain_with_a_broadcast_bias_becomes_one_kernel() {
        // dt = clamp(softplus(dt + bias)) · scale, as in a prefill Mamba2 layer.
        let (changed, g) = check(
            r#"
gir @t mode=prefill {
  %0 = input[name="x", role="tokens"] : bf16[B, T, 64]
  %1 = weight[name="w"] : bf16[8, 64]
  %2 = matmul[trans_a=false, trans_b=true](%0, %1) : bf16[B, T, 8]  #0
  %3 = weight[name="dt_bias"] : bf16[8]
  %4 = add(%2, %3) : bf16[B, T, 8]  #0
  %5 = softplus(%4) : bf16[B, T, 8]  #0
  %6 = clamp[min=0.001, max=none](%5) : bf16[B, T, 8]  #0
  %7 = scale[factor=0.5](%6) : bf16[B, T, 8]  #0
  %8 = matmul[trans_a=false, trans_b=false](%7, %1) : bf16[B, T, 64]  #0
  output "y" = %8
}
"#,
        );
        assert!(changed);
        assert_eq!(fused_names(&g), ["elementwise"]);
        assert_eq!(bodies(&g), [["add", "clamp", "scale", "softplus"]]);
        let text = g.to_string();
        assert!(text.contains(r#"fused[name="elementwise"](%2, %3) : bf16[B, T, 8]  #0"#), "{text}");
    }

    #[test]
    fn a_tree_with_two_results_and_a_connecting_reshape() {
        // The gate math of a gated DeltaNet layer (prefill), plus a reshape between two members and one
        // (before the add) that connects nothing.
        let (changed, g) = check(
            r#"
gir @t mode=prefill {
  %0 = input[name="a", role="tokens"] : bf16[B, T, 2]
  %1 = reshape[shape=[B, T, 2, 1]](%0) : bf16[B, T, 2, 1]  #3
  %2 = weight[name="dt_bias"] : bf16[1]
  %3 = add(%1, %2) : bf16[B, T, 2, 1]  #3
  %4 = softplus(%3) : bf16[B, T, 2, 1]  #3
  %5 = reshape[shape=[B, T, 2]](%4) : bf16[B, T, 2]  #3
  %6 = weight[name="A_log"] : bf16[2]
  %7 = exp(%6) : bf16[2]  #3
  %8 = neg(%7) : bf16[2]  #3
  %9 = mul(%5, %8) : bf16[B, T, 2]  #3
  %10 = sigmoid(%9) : bf16[B, T, 2]  #3
  %11 = neg(%9) : bf16[B, T, 2]  #3
  output "g" = %10
  output "h" = %11
  output "raw" = %3
}
"#,
        );
        assert!(changed);
        assert_eq!(bodies(&g), [["add", "mul", "neg", "reshape", "sigmoid", "softplus"]], "{g}");
        let f = g.node_ids().into_iter().find(|n| matches!(g.op(*n), Op::Fused(_))).unwrap();
        // Inputs: the loose reshape, the bias and the constant gate factor (not recomputed per step).
        let ins: Vec<&str> = g.operands(f).iter().map(|v| g.op(v.node).name()).collect();
        assert_eq!(ins, ["reshape", "weight", "neg"]);
        // Results: the add (returned), sigmoid and neg.
        assert_eq!(g.node(f).unwrap().types.len(), 3);
        assert!(g.op(NodeId(7)).name() == "exp" && g.op(NodeId(8)).name() == "neg", "constants stay: {g}");
    }

    #[test]
    fn lone_ops_and_ops_of_other_sizes_stay_apart() {
        let text = r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 1, 64]
  %1 = input[name="y", role="tokens"] : bf16[B, 1, 64]
  %2 = weight[name="w"] : bf16[32, 64]
  %3 = swiglu(%0, %1) : bf16[B, 1, 64]
  %4 = matmul[trans_a=false, trans_b=true](%3, %2) : bf16[B, 1, 32]
  %5 = weight[name="n"] : bf16[32]
  %6 = rmsnorm[eps=1e-6](%4, %5) : bf16[B, 1, 32]
  %7 = silu(%6) : bf16[B, 1, 32]
  %8 = reshape[shape=[B, 32]](%7) : bf16[B, 32]
  %9 = input[name="z", role="tokens"] : bf16[B, 32, 2]
  %10 = mul(%9, %9) : bf16[B, 32, 2]
  %11 = reshape[shape=[B, 32, 1]](%8) : bf16[B, 32, 1]
  %12 = add(%10, %11) : bf16[B, 32, 2]
  %13 = convert[dtype="f32"](%12) : f32[B, 32, 2]
  output "a" = %13
}
"#;
        let (changed, g) = check(text);
        // swiglu (matmul after), silu (a norm before, a bigger add after) stay alone; mul → add →
        // convert is a group (the silu result is broadcast into it).
        assert!(changed);
        assert_eq!(bodies(&g), [["add", "convert", "mul"]]);
        assert!(g.to_string().contains("= swiglu(") && g.to_string().contains("= silu("), "{g}");
    }

    #[test]
    fn a_path_through_a_matmul_cuts_the_group() {
        // %1 → %2 is a direct edge, but %1 → matmul → %4 → %2 leaves and comes back: fusing {%1, %2}
        // would be a cycle. %1 stays alone; %4 → %2 → %5 fuse.
        let text = r#"
gir @t mode=prefill {
  %0 = input[name="x", role="tokens"] : bf16[B, 16]
  %6 = weight[name="w"] : bf16[16, 16]
  %1 = silu(%0) : bf16[B, 16]
  %3 = matmul[trans_a=false, trans_b=true](%1, %6) : bf16[B, 16]
  %4 = exp(%3) : bf16[B, 16]
  %2 = mul(%1, %4) : bf16[B, 16]
  %5 = neg(%2) : bf16[B, 16]
  output "y" = %5
}
"#;
        let g0 = parse(text).unwrap();
        assert!(!is_convex(&g0, &BTreeSet::from([NodeId(1), NodeId(2), NodeId(4), NodeId(5)])));
        let (changed, g) = check(text);
        assert!(changed);
        assert_eq!(bodies(&g), [["exp", "mul", "neg"]]);
        assert!(g.contains(NodeId(1)) && g.op(NodeId(1)).name() == "silu", "{g}");
    }

    #[test]
    fn grows_an_elementwise_kernel_but_never_other_fused_nodes() {
        let text = r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 8]
  %1 = fused[name="elementwise"](%0) : bf16[B, 8] {
    %0 = input[name="p0", role="param", index=0] : bf16[B, 8]
    %1 = exp(%0) : bf16[B, 8]
    %2 = neg(%1) : bf16[B, 8]
    output "0" = %2
  }
  %2 = sigmoid(%1) : bf16[B, 8]
  %3 = weight[name="w"] : bf16[8, 4]
  %4 = input[name="conv", role="state"] : bf16[B, 8, 3]
  %5 = fused[name="conv_silu"](%2, %3, %4) : (bf16[B, 8], bf16[B, 8, 3]) {
    %0 = input[name="p0", role="param", index=0] : bf16[B, 8]
    %1 = input[name="p1", role="param", index=1] : bf16[8, 4]
    %2 = input[name="p2", role="param", index=2] : bf16[B, 8, 3]
    %3 = conv1d_update[bias=false](%0, %1, %2) : (bf16[B, 8], bf16[B, 8, 3])
    %4 = silu(%3) : bf16[B, 8]
    output "0" = %4
    output "1" = %3.1
  }
  %6 = scale[factor=2.0](%5) : bf16[B, 8]
  output "y" = %6
  output "conv" = %5.1
}
"#;
        let (changed, g) = check(text);
        assert!(changed);
        assert_eq!(fused_names(&g), ["conv_silu", "elementwise"]);
        assert_eq!(bodies(&g)[1], ["exp", "neg", "sigmoid"]);
        assert!(g.to_string().contains("= scale[factor=2.0]"), "the conv kernel is not grown: {g}");
    }

    #[test]
    fn nothing_to_do_is_no_change() {
        let text = r#"
gir @t {
  %0 = input[name="x", role="tokens"] : f32[B, 4]
  %1 = weight[name="a"] : f32[4]
  %2 = exp(%1) : f32[4]
  %3 = neg(%2) : f32[4]
  %4 = l2norm[eps=1e-6](%0) : f32[B, 4]
  %5 = mul(%4, %3) : f32[B, 4]
  output "y" = %5
}
"#;
        let (changed, g) = check(text);
        assert!(!changed, "constants are not fused and a lone mul stays: {g}");
        assert_eq!(g, parse(text).unwrap());
    }

    #[test]
    fn gir_files_leave_no_fusible_pair() {
        for (name, g) in gir_files("fuse-elementwise") {
            assert!(groups(&g).is_empty(), "{name}: a group is left:\n{g}");
        }
    }
}
