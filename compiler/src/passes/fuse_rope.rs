//! fuse-rope: RoPE in the QKV GEMM's epilogue — the projection, the per-head views and norms, the
//! rotation and (in decode) the cache writes become one kernel.
//!
//! Each `rope(x, start)` is traced from `x` back to the matmul that produces it, through a chain of
//! single-operand steps: `reshape`, `split` (the pieces of a q|k|v matmul merged by fuse-matmul), a
//! bias `add` (the other operand constant) and a per-head `rmsnorm` (QK-norm, constant weight). The
//! matmul must have a constant RHS. Every rope that reaches the same matmul joins one set with the
//! matmul and the chains. The chains of the keys and values an `attention_prefill` reads (the V
//! piece, with its bias and view) join the set of their matmul too, and so does each
//! `kv_write(cache, new, start)` (decode) whose `new` traces back to it (the chain may also pass a
//! `rope`: the rotated K), so keys and values go straight from the GEMM into the caches. Attention
//! itself stays outside.
//!
//! The set becomes one fused node named after what it holds, e.g. `qkv_matmul_rope_kv_write`
//! (`qkv_` when the matmul's result is split, then `bias`, `qknorm`, `rope`, `kv_write` as
//! present). If the set with its cache writes is not convex it is tried without them; if that is not
//! convex either the ropes stay as they are.
//!
//! Preconditions: a verified graph; best after fuse-matmul, so q, k and v come from one matmul.
//! Postconditions: the graph verifies and computes the same values; every `rope` whose operand
//! traces back to a matmul as above is inside a fused node with that matmul (unless the set was
//! not convex). The fused node keeps the matmul's layer. Idempotent.

use std::collections::{BTreeMap, BTreeSet};

use super::fuse::{extract, fusible, is_constant, is_convex};
use crate::gir::{Graph, NodeId, Op, Value};

pub fn run(g: &mut Graph) -> Result<bool, String> {
    // Ropes grouped by the matmul they trace back to, with the chains in between.
    let mut groups: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
    for n in g.node_ids() {
        if !matches!(g.op(n), Op::Rope { .. }) || !fusible(g, n) {
            continue;
        }
        let Some((matmul, chain)) = trace(g, g.operands(n)[0], false) else { continue };
        let set = groups.entry(matmul).or_insert_with(|| BTreeSet::from([matmul]));
        set.extend(chain);
        set.insert(n);
    }
    // The un-rotated values that reach the attention from the same matmuls (v, with its bias and
    // view) join the sets; so do the cache writes of keys and values, kept apart to be dropped if
    // they make a set non-convex.
    let mut writes: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
    for n in g.node_ids() {
        let slots = match g.op(n) {
            Op::KvWrite => [1].as_slice(),
            Op::AttentionPrefill { .. } => [1, 2].as_slice(),
            _ => continue,
        };
        for &slot in slots {
            let Some((matmul, chain)) = trace(g, g.operands(n)[slot], true) else { continue };
            let Some(set) = groups.get_mut(&matmul) else { continue };
            if matches!(g.op(n), Op::KvWrite) {
                if fusible(g, n) {
                    writes.entry(matmul).or_default().extend(chain.into_iter().chain([n]));
                }
            } else {
                set.extend(chain);
            }
        }
    }
    let mut changed = false;
    for (matmul, ropes) in groups {
        let with_writes: BTreeSet<NodeId> =
            ropes.union(&writes.get(&matmul).cloned().unwrap_or_default()).copied().collect();
        let Some(set) = [with_writes, ropes].into_iter().find(|s| is_convex(g, s)) else { continue };
        let name = name(g, &set);
        extract(g, &set, &name)?;
        changed = true;
    }
    Ok(changed)
}

/// Follows `v` back to the matmul (with a constant RHS) that computes it, through reshapes, splits,
/// bias adds, per-head norms and (with `through_rope`) ropes. Returns the matmul and the nodes
/// passed, or `None` when the chain meets anything else.
fn trace(g: &Graph, mut v: Value, through_rope: bool) -> Option<(NodeId, Vec<NodeId>)> {
    let mut chain = Vec::new();
    loop {
        let n = v.node;
        if !fusible(g, n) {
            return None;
        }
        let ops = g.operands(n);
        let next = match g.op(n) {
            Op::MatMul { .. } => return is_constant(g, ops.get(1)?.node).then_some((n, chain)),
            Op::Reshape { .. } | Op::Split { .. } => ops[0],
            Op::Rope { .. } if through_rope => ops[0],
            // A per-head norm (QK-norm) with its weight.
            Op::RmsNorm { .. } if is_constant(g, ops[1].node) => ops[0],
            // A bias: the other operand is constant.
            Op::Add if is_constant(g, ops[1].node) => ops[0],
            Op::Add if is_constant(g, ops[0].node) => ops[1],
            _ => return None,
        };
        chain.push(n);
        v = next;
    }
}

/// The fused node's name: `[qkv_]matmul[_bias][_qknorm]_rope[_kv_write]`.
fn name(g: &Graph, set: &BTreeSet<NodeId>) -> String {
    let has = |f: fn(&Op) -> bool| set.iter().any(|n| f(g.op(*n)));
    let mut parts = vec![if has(|o| matches!(o, Op::Split { .. })) { "qkv_matmul" } else { "matmul" }];
    if has(|o| matches!(o, Op::Add)) {
        parts.push("bias");
    }
    if has(|o| matches!(o, Op::RmsNorm { .. })) {
        parts.push("qknorm");
    }
    parts.push("rope");
    if has(|o| matches!(o, Op::KvWrite)) {
        parts.push("kv_write");
    }
    parts.join("_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gir::parse::parse;
    use crate::passes::fuse::member_ops;
    use crate::verify::verify;

    /// Parses and verifies `text`, runs the pass, verifies the result and checks that a second run
    /// changes nothing. Returns whether the first run changed the graph, and the graph.
    fn check(text: &str) -> (bool, Graph) {
        let mut g = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        verify(&g).unwrap_or_else(|e| panic!("input: {e:?}\n{g}"));
        let changed = run(&mut g).expect("fuse-rope");
        verify(&g).unwrap_or_else(|e| panic!("output: {e:?}\n{g}"));
        let once = g.to_string();
        assert!(!run(&mut g).expect("second fuse-rope"), "a second run reports a change:\n{g}");
        assert_eq!(g.to_string(), once, "a second run changes the graph");
        (changed, g)
    }

    /// The fused nodes as `(name, sorted member op names)`, sorted.
    fn fused(g: &Graph) -> Vec<(String, Vec<&'static str>)> {
        let mut v: Vec<(String, Vec<&'static str>)> = g
            .node_ids()
            .into_iter()
            .filter_map(|n| match g.op(n) {
                Op::Fused(b) => {
                    let mut ops: Vec<&'static str> = member_ops(g, n).iter().map(Op::name).collect();
                    ops.sort();
                    Some((b.name.clone(), ops))
                }
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Decode attention after fuse-matmul: q|k|v in one matmul, QK-norm, RoPE, cache writes.
    const DECODE: &str = "gir @t mode=decode {
  %0 = input[name=\"x\", role=\"tokens\"] : bf16[B, 1, 32]
  %1 = input[name=\"start\", role=\"start\"] : i32[B]
  %2 = input[name=\"k_cache\", role=\"state\"] : bf16[B, 64, 1, 8]
  %3 = input[name=\"v_cache\", role=\"state\"] : bf16[B, 64, 1, 8]
  %4 = weight[name=\"qkv\"] : bf16[32, 32]
  %5 = weight[name=\"q_norm\"] : bf16[8]
  %6 = weight[name=\"k_norm\"] : bf16[8]
  %7 = matmul[trans_a=false, trans_b=true](%0, %4) : bf16[B, 1, 32]  #2
  %8 = split[axis=2, sizes=[16, 8, 8]](%7) : (bf16[B, 1, 16], bf16[B, 1, 8], bf16[B, 1, 8])  #2
  %9 = reshape[shape=[B, 1, 2, 8]](%8) : bf16[B, 1, 2, 8]  #2
  %10 = reshape[shape=[B, 1, 1, 8]](%8.1) : bf16[B, 1, 1, 8]  #2
  %11 = reshape[shape=[B, 1, 1, 8]](%8.2) : bf16[B, 1, 1, 8]  #2
  %12 = rmsnorm[eps=1e-6](%9, %5) : bf16[B, 1, 2, 8]  #2
  %13 = rmsnorm[eps=1e-6](%10, %6) : bf16[B, 1, 1, 8]  #2
  %14 = rope[style=\"rotate_half\", theta=10000.0](%12, %1) : bf16[B, 1, 2, 8]  #2
  %15 = rope[style=\"rotate_half\", theta=10000.0](%13, %1) : bf16[B, 1, 1, 8]  #2
  %16 = kv_write(%2, %15, %1) : bf16[B, 64, 1, 8]  #2
  %17 = kv_write(%3, %11, %1) : bf16[B, 64, 1, 8]  #2
  %18 = reshape[shape=[B, 2, 8]](%14) : bf16[B, 2, 8]  #2
  %19 = attention_decode[window=none, scale=0.35](%18, %16, %17, %1) : bf16[B, 2, 8]  #2
  output \"o\" = %19
  output \"k_cache\" = %16
  output \"v_cache\" = %17
}
";

    #[test]
    fn fuses_qkv_matmul_norms_rope_and_cache_writes_in_decode() {
        let (changed, g) = check(DECODE);
        assert!(changed);
        let f = fused(&g);
        assert_eq!(f.len(), 1, "{g}");
        assert_eq!(f[0].0, "qkv_matmul_qknorm_rope_kv_write");
        assert_eq!(
            f[0].1,
            [
                "kv_write", "kv_write", "matmul", "reshape", "reshape", "reshape", "rmsnorm", "rmsnorm", "rope",
                "rope", "split"
            ]
        );
        let n = g.node_ids().into_iter().find(|n| matches!(g.op(*n), Op::Fused(_))).unwrap();
        // Results: the rotated q and both caches; the fused node updates both caches in place.
        assert_eq!(g.node(n).unwrap().types.len(), 3);
        assert_eq!(g.op(n).in_place(g.operands(n).len()).len(), 2);
        assert_eq!(g.origin.get(&n), Some(&2));
        // Attention stays outside.
        assert!(g.node_ids().iter().any(|n| matches!(g.op(*n), Op::AttentionDecode { .. })));
    }

    #[test]
    fn fuses_separate_projections_with_bias_in_prefill() {
        // Without fuse-matmul: q and k come from their own matmuls (with biases); v is not rotated.
        let (changed, g) = check(
            "gir @t mode=prefill {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, T, 16]
  %1 = input[name=\"start\", role=\"start\"] : i32[B]
  %2 = input[name=\"k_cache\", role=\"state\"] : f32[B, 64, 1, 8]
  %3 = input[name=\"v_cache\", role=\"state\"] : f32[B, 64, 1, 8]
  %4 = weight[name=\"q\"] : f32[16, 16]
  %5 = weight[name=\"k\"] : f32[8, 16]
  %6 = weight[name=\"v\"] : f32[8, 16]
  %7 = weight[name=\"q_bias\"] : f32[16]
  %8 = matmul[trans_a=false, trans_b=true](%0, %4) : f32[B, T, 16]
  %9 = add(%8, %7) : f32[B, T, 16]
  %10 = matmul[trans_a=false, trans_b=true](%0, %5) : f32[B, T, 8]
  %11 = matmul[trans_a=false, trans_b=true](%0, %6) : f32[B, T, 8]
  %12 = reshape[shape=[B, T, 2, 8]](%9) : f32[B, T, 2, 8]
  %13 = reshape[shape=[B, T, 1, 8]](%10) : f32[B, T, 1, 8]
  %14 = reshape[shape=[B, T, 1, 8]](%11) : f32[B, T, 1, 8]
  %15 = rope[style=\"interleaved\", theta=10000.0](%12, %1) : f32[B, T, 2, 8]
  %16 = rope[style=\"interleaved\", theta=10000.0](%13, %1) : f32[B, T, 1, 8]
  %17 = attention_prefill[window=none, scale=0.35](%15, %16, %14, %2, %3, %1, %1) : (f32[B, T, 2, 8], f32[B, 64, 1, 8], f32[B, 64, 1, 8])
  output \"o\" = %17
  output \"k_cache\" = %17.1
  output \"v_cache\" = %17.2
}
",
        );
        assert!(changed);
        let f = fused(&g);
        assert_eq!(f.len(), 2, "{g}");
        assert_eq!(f[0].0, "matmul_bias_rope");
        assert_eq!(f[0].1, ["add", "matmul", "reshape", "rope"]);
        assert_eq!(f[1].0, "matmul_rope");
        assert_eq!(f[1].1, ["matmul", "reshape", "rope"]);
        // v's matmul has no rope: it stays.
        assert_eq!(g.node_ids().iter().filter(|n| matches!(g.op(**n), Op::MatMul { .. })).count(), 1);
    }

    #[test]
    fn leaves_ropes_of_other_values_alone() {
        // The rope reads a SiLU of the projection, and another rope reads an input.
        let (changed, g) = check(
            "gir @t mode=prefill {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, T, 16]
  %1 = input[name=\"start\", role=\"start\"] : i32[B]
  %2 = weight[name=\"q\"] : f32[16, 16]
  %3 = matmul[trans_a=false, trans_b=true](%0, %2) : f32[B, T, 16]
  %4 = silu(%3) : f32[B, T, 16]
  %5 = reshape[shape=[B, T, 2, 8]](%4) : f32[B, T, 2, 8]
  %6 = rope[style=\"rotate_half\", theta=10000.0](%5, %1) : f32[B, T, 2, 8]
  %7 = reshape[shape=[B, T, 2, 8]](%0) : f32[B, T, 2, 8]
  %8 = rope[style=\"rotate_half\", theta=10000.0](%7, %1) : f32[B, T, 2, 8]
  output \"a\" = %6
  output \"b\" = %8
}
",
        );
        assert!(!changed, "{g}");
        assert!(fused(&g).is_empty());
    }

    #[test]
    fn drops_cache_writes_that_would_make_the_set_non_convex() {
        // The key cache is first written with a SiLU of the v piece (outside the set), then with
        // the rotated k: taking the second write would leave the set and come back.
        let (changed, g) = check(
            "gir @t mode=decode {
  %0 = input[name=\"x\", role=\"tokens\"] : bf16[B, 1, 16]
  %1 = input[name=\"start\", role=\"start\"] : i32[B]
  %2 = input[name=\"k_cache\", role=\"state\"] : bf16[B, 64, 1, 8]
  %3 = weight[name=\"kv\"] : bf16[16, 16]
  %4 = matmul[trans_a=false, trans_b=true](%0, %3) : bf16[B, 1, 16]
  %5 = split[axis=2, sizes=[8, 8]](%4) : (bf16[B, 1, 8], bf16[B, 1, 8])
  %6 = reshape[shape=[B, 1, 1, 8]](%5) : bf16[B, 1, 1, 8]
  %7 = silu(%5.1) : bf16[B, 1, 8]
  %8 = reshape[shape=[B, 1, 1, 8]](%7) : bf16[B, 1, 1, 8]
  %9 = rope[style=\"rotate_half\", theta=10000.0](%6, %1) : bf16[B, 1, 1, 8]
  %10 = kv_write(%2, %8, %1) : bf16[B, 64, 1, 8]
  %11 = kv_write(%10, %9, %1) : bf16[B, 64, 1, 8]
  output \"k_cache\" = %11
}
",
        );
        assert!(changed);
        let f = fused(&g);
        assert_eq!(f.len(), 1, "{g}");
        assert_eq!(f[0].0, "qkv_matmul_rope");
        assert_eq!(g.node_ids().iter().filter(|n| matches!(g.op(**n), Op::KvWrite)).count(), 2);
    }
}
