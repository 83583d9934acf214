//! fuse-decode-mixer: in decode, each layer's token-mixer step becomes one fused kernel.
//!
//! A decode step runs every layer on one token, so the work between a mixer's input projections and its
//! output projection is tiny and bound by launches. This pass finds each mixer's core op and grows a
//! set from it, along producers and consumers, over the ops that mixer's step kernel may hold (the
//! table `MIXERS`), within the core's layer (the `origin` side table; a node an earlier pass made without
//! a recorded layer may join). The set never takes a matmul or a fused node holding one, an elementwise
//! op applied straight to a matmul's result (a projection's bias, left for fuse-epilogue), a constant (weight
//! preparation such as `−exp(A_log)`), a leaf, or another mixer's core, so it stops at the projections
//! on both sides. It becomes one fused node:
//! - `mamba2_step`: the split of zxbcdt, the conv update and SiLU (or fuse-conv's `conv_silu`), the
//!   split of xBC, dt bias + softplus (+ clamp), `ssd_step`, `gated_rmsnorm` and the reshapes between;
//! - `deltanet_step`: the q/k/v conv updates and SiLUs, the l2norms, sigmoid(β), the decay gate when
//!   gated, `delta_step` and the output norm (`rmsnorm` or `gated_rmsnorm`), with the reshapes between;
//! - `attention_step`: the `kv_write`s and `attention_decode` with the reshapes around them; RoPE and
//!   QK-norm stay outside (left for fuse-rope and fuse-norm).
//!
//! If the grown set is not convex (a path leaves it and comes back, which the lowering never builds),
//! the members that could only run after such a path are dropped, or failing that the members before
//! one, and then what no longer connects to the core. The fused node's in-place updates (old state
//! operand → new state result) are derived from its body by `Graph::param_updates`; a layer whose
//! updated state would not leave the set is left unfused, so every state's new version is a result.
//!
//! Preconditions: a verified graph. Only decode graphs (`mode=decode`) are touched; prefill, train and
//! mode-less graphs are returned unchanged.
//! Postconditions: every mixer core is inside one fused node per layer holding that layer's step work
//! (unless no convex set holds it with a neighbour, or a state would not leave it: lowered graphs never
//! do that); no matmul or constant is inside one; every state is still updated in place and returned
//! under its name; the graph computes the same values and verifies.

use std::collections::BTreeSet;

use crate::gir::{Graph, Mode, NodeId, Op, Value};
use crate::passes::fuse::{extract, fusible, is_convex, member_ops};

/// A token mixer whose decode step becomes one kernel.
struct Mixer {
    /// The fused kernel's name.
    name: &'static str,
    /// The op the step is built around.
    core: fn(&Op) -> bool,
    /// The other ops the step kernel may hold.
    member: fn(&Op) -> bool,
}

/// The mixers, by core op.
const MIXERS: [Mixer; 3] = [
    // split, conv + SiLU, split, dt math, ssd_step, gated norm, reshapes.
    Mixer { name: "mamba2_step", core: |op| matches!(op, Op::SsdStep), member: recurrent_member },
    // convs + SiLU, l2norms, sigmoid(β), decay gate, delta_step, output norm, reshapes.
    Mixer { name: "deltanet_step", core: |op| matches!(op, Op::DeltaStep { .. }), member: recurrent_member },
    // kv_writes, attention_decode, reshapes.
    Mixer {
        name: "attention_step",
        core: |op| matches!(op, Op::AttentionDecode { .. }),
        member: |op| matches!(op, Op::KvWrite | Op::Reshape { .. }),
    },
];

/// What the step kernel of a recurrent mixer (Mamba2, DeltaNet) may hold besides its core.
fn recurrent_member(op: &Op) -> bool {
    op.is_elementwise()
        || matches!(
            op,
            Op::Reshape { .. }
                | Op::Split { .. }
                | Op::Conv1dUpdate { .. }
                | Op::L2Norm { .. }
                | Op::RmsNorm { .. }
                | Op::GatedRmsNorm { .. }
        )
}

pub fn run(g: &mut Graph) -> Result<bool, String> {
    if g.mode != Some(Mode::Decode) {
        return Ok(false);
    }
    let mut changed = false;
    for core in g.node_ids() {
        let Some(mixer) = g.node(core).and_then(|n| MIXERS.iter().find(|m| (m.core)(&n.op))) else { continue };
        let Some(set) = convex_around(g, grow(g, core, mixer), core) else { continue };
        if set.len() < 2 || !updates_leave(g, &set) {
            continue;
        }
        extract(g, &set, mixer.name)?;
        changed = true;
    }
    Ok(changed)
}

/// The nodes reachable from `core` through producers and consumers that `mixer`'s step may hold.
fn grow(g: &Graph, core: NodeId, mixer: &Mixer) -> BTreeSet<NodeId> {
    let layer = g.origin.get(&core).copied();
    let holds_matmul = |n: NodeId| member_ops(g, n).iter().any(|op| matches!(op, Op::MatMul { .. }));
    let admissible = |n: NodeId| {
        let same_layer = g.origin.get(&n).is_none_or(|l| Some(*l) == layer);
        let ops = member_ops(g, n);
        let epilogue = g.op(n).is_elementwise() && g.operands(n).iter().any(|v| holds_matmul(v.node));
        same_layer && fusible(g, n) && !epilogue && !ops.is_empty() && ops.iter().all(|op| (mixer.member)(op))
    };
    let mut set = BTreeSet::from([core]);
    let mut stack = vec![core];
    while let Some(n) = stack.pop() {
        let neighbours: BTreeSet<NodeId> = g.operands(n).into_iter().map(|v| v.node).chain(g.successors(n)).collect();
        for m in neighbours {
            if !set.contains(&m) && admissible(m) {
                set.insert(m);
                stack.push(m);
            }
        }
    }
    set
}

/// `set` if it is convex; otherwise a convex part of it that holds `core` (see the module doc), or
/// `None` when there is none.
fn convex_around(g: &Graph, set: BTreeSet<NodeId>, core: NodeId) -> Option<BTreeSet<NodeId>> {
    if is_convex(g, &set) {
        return Some(set);
    }
    for forward in [true, false] {
        let left = &set - &reentering(g, &set, forward);
        if left.contains(&core) {
            return Some(connected(g, &left, core));
        }
    }
    None
}

/// The members a path that has left `set` can reach (`forward`), or, against the edges, the members
/// that reach a path coming back into it. Dropping either kind leaves a convex set.
pub(crate) fn reentering(g: &Graph, set: &BTreeSet<NodeId>, forward: bool) -> BTreeSet<NodeId> {
    let step = |n: NodeId| -> Vec<NodeId> {
        if forward { g.successors(n) } else { g.operands(n).into_iter().map(|v| v.node).collect() }
    };
    let mut stack: Vec<NodeId> = set.iter().flat_map(|n| step(*n)).filter(|m| !set.contains(m)).collect();
    let mut seen: BTreeSet<NodeId> = stack.iter().copied().collect();
    while let Some(n) = stack.pop() {
        for m in step(n) {
            if seen.insert(m) {
                stack.push(m);
            }
        }
    }
    &seen & set
}

/// The members of `set` connected to `start` by edges between members. (A connected part of a convex
/// set is convex: any path out of it leaves the whole set first.)
pub(crate) fn connected(g: &Graph, set: &BTreeSet<NodeId>, start: NodeId) -> BTreeSet<NodeId> {
    let mut part = BTreeSet::from([start]);
    let mut stack = vec![start];
    while let Some(n) = stack.pop() {
        for m in g.operands(n).into_iter().map(|v| v.node).chain(g.successors(n)) {
            if set.contains(&m) && part.insert(m) {
                stack.push(m);
            }
        }
    }
    part
}

/// Whether every value from outside `set` that a member updates in place has its new version leave the
/// set (as a graph output or an operand elsewhere), so the fused node updates it in place too and no
/// reader of the old version can be ordered after the update.
fn updates_leave(g: &Graph, set: &BTreeSet<NodeId>) -> bool {
    set.iter().all(|&n| {
        let ops = g.operands(n);
        g.op(n).in_place(ops.len()).into_iter().all(|(operand, result)| {
            let new = Value::new(n, result as u16);
            ops.get(operand).is_none_or(|old| set.contains(&old.node))
                || g.is_output(new)
                || g.users(new).iter().any(|(u, _)| !set.contains(u))
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::gir::parse::parse;
    use crate::lower::{LowerOptions, lower};
    use crate::passes::fuse::is_constant;
    use crate::passes::fuse_conv::tests::{fused_names, gir_files};
    use crate::passes::{Pass, pipeline, run_passes};
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

    /// The fused node named `name` and the op names of its body (leaves left out), sorted.
    fn body_of(g: &Graph, name: &str) -> (NodeId, Vec<&'static str>) {
        let n = g
            .node_ids()
            .into_iter()
            .find(|n| matches!(g.op(*n), Op::Fused(b) if b.name == name))
            .unwrap_or_else(|| panic!("no fused {name}:\n{g}"));
        let mut ops: Vec<&'static str> = member_ops(g, n).iter().map(Op::name).collect();
        ops.sort();
        (n, ops)
    }

    /// The op names at the top level (leaves left out), in node order.
    fn top_ops(g: &Graph) -> Vec<&'static str> {
        g.node_ids().into_iter().map(|n| g.op(n)).filter(|op| !op.is_leaf()).map(Op::name).collect()
    }

    const MAMBA2: &str = r#"
gir @m mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 1, 64]
  %1 = weight[name="in_proj"] : bf16[296, 64]
  %2 = matmul[trans_a=false, trans_b=true](%0, %1) : bf16[B, 1, 296]  #4
  %3 = reshape[shape=[B, 296]](%2) : bf16[B, 296]  #4
  %4 = split[axis=1, sizes=[128, 160, 8]](%3) : (bf16[B, 128], bf16[B, 160], bf16[B, 8])  #4
  %5 = weight[name="conv"] : bf16[160, 4]
  %6 = input[name="layers.4.conv", role="state"] : bf16[B, 160, 3]
  %7 = weight[name="conv_bias"] : bf16[160]
  %8 = conv1d_update[bias=true](%4.1, %5, %6, %7) : (bf16[B, 160], bf16[B, 160, 3])  #4
  %9 = silu(%8) : bf16[B, 160]  #4
  %10 = split[axis=1, sizes=[128, 16, 16]](%9) : (bf16[B, 128], bf16[B, 16], bf16[B, 16])  #4
  %11 = reshape[shape=[B, 8, 16]](%10) : bf16[B, 8, 16]  #4
  %12 = reshape[shape=[B, 1, 16]](%10.1) : bf16[B, 1, 16]  #4
  %13 = reshape[shape=[B, 1, 16]](%10.2) : bf16[B, 1, 16]  #4
  %14 = weight[name="dt_bias"] : bf16[8]
  %15 = add(%4.2, %14) : bf16[B, 8]  #4
  %16 = softplus(%15) : bf16[B, 8]  #4
  %17 = clamp[min=0.001, max=none](%16) : bf16[B, 8]  #4
  %18 = weight[name="A_log"] : bf16[8]
  %19 = exp(%18) : bf16[8]  #4
  %20 = neg(%19) : bf16[8]  #4
  %21 = weight[name="D"] : bf16[8]
  %22 = input[name="layers.4.ssm", role="state"] : f32[B, 8, 16, 16]
  %23 = ssd_step(%11, %17, %20, %12, %13, %21, %22) : (bf16[B, 8, 16], f32[B, 8, 16, 16])  #4
  %24 = reshape[shape=[B, 128]](%23) : bf16[B, 128]  #4
  %25 = weight[name="norm"] : bf16[128]
  %26 = gated_rmsnorm[eps=1e-5, group=128, norm_before_gate=false](%24, %4, %25) : bf16[B, 128]  #4
  %27 = reshape[shape=[B, 1, 128]](%26) : bf16[B, 1, 128]  #4
  %28 = weight[name="out_proj"] : bf16[64, 128]
  %29 = matmul[trans_a=false, trans_b=true](%27, %28) : bf16[B, 1, 64]  #4
  %30 = add(%0, %29) : bf16[B, 1, 64]  #4
  output "y" = %30
  output "layers.4.conv" = %8.1
  output "layers.4.ssm" = %23.1
}
"#;

    #[test]
    fn mamba2_step_takes_everything_between_the_projections() {
        let (changed, g) = check(MAMBA2);
        assert!(changed);
        let (f, ops) = body_of(&g, "mamba2_step");
        assert_eq!(
            ops,
            [
                "add",
                "clamp",
                "conv1d_update",
                "gated_rmsnorm",
                "reshape",
                "reshape",
                "reshape",
                "reshape",
                "reshape",
                "reshape",
                "silu",
                "softplus",
                "split",
                "split",
                "ssd_step"
            ]
        );
        // The projections, the residual add and the weight preparation stay outside.
        assert_eq!(top_ops(&g), ["matmul", "exp", "neg", "matmul", "add", "fused"]);
        // Both states are updated in place by the fused node and returned.
        assert_eq!(g.op(f).in_place(g.operands(f).len()).len(), 2, "{g}");
        for (name, r) in [("layers.4.conv", 0), ("layers.4.ssm", 1)] {
            assert!(g.outputs().contains(&(name.to_string(), Value::new(f, r))), "{name}: {g}");
        }
    }

    #[test]
    fn mamba2_step_grows_through_conv_silu() {
        let mut g = parse(MAMBA2).unwrap();
        assert!(crate::passes::fuse_conv::run(&mut g).unwrap());
        let changed = run(&mut g).unwrap();
        verify(&g).unwrap_or_else(|e| panic!("{e:?}\n{g}"));
        assert!(changed);
        assert_eq!(fused_names(&g), ["mamba2_step"], "{g}");
        let (_, ops) = body_of(&g, "mamba2_step");
        assert!(ops.contains(&"conv1d_update") && ops.contains(&"silu"), "{ops:?}");
    }

    const GATED_DELTANET: &str = r#"
gir @d mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 1, 64]
  %1 = weight[name="q_proj"] : bf16[64, 64]
  %2 = matmul[trans_a=false, trans_b=true](%0, %1) : bf16[B, 1, 64]  #3
  %3 = weight[name="k_proj"] : bf16[64, 64]
  %4 = matmul[trans_a=false, trans_b=true](%0, %3) : bf16[B, 1, 64]  #3
  %5 = weight[name="v_proj"] : bf16[64, 64]
  %6 = matmul[trans_a=false, trans_b=true](%0, %5) : bf16[B, 1, 64]  #3
  %7 = weight[name="b_proj"] : bf16[2, 64]
  %8 = matmul[trans_a=false, trans_b=true](%0, %7) : bf16[B, 1, 2]  #3
  %9 = reshape[shape=[B, 64]](%2) : bf16[B, 64]  #3
  %10 = reshape[shape=[B, 64]](%4) : bf16[B, 64]  #3
  %11 = reshape[shape=[B, 64]](%6) : bf16[B, 64]  #3
  %12 = weight[name="q_conv"] : bf16[64, 4]
  %13 = input[name="layers.3.conv_q", role="state"] : bf16[B, 64, 3]
  %14 = conv1d_update[bias=false](%9, %12, %13) : (bf16[B, 64], bf16[B, 64, 3])  #3
  %15 = silu(%14) : bf16[B, 64]  #3
  %16 = weight[name="k_conv"] : bf16[64, 4]
  %17 = input[name="layers.3.conv_k", role="state"] : bf16[B, 64, 3]
  %18 = conv1d_update[bias=false](%10, %16, %17) : (bf16[B, 64], bf16[B, 64, 3])  #3
  %19 = silu(%18) : bf16[B, 64]  #3
  %20 = weight[name="v_conv"] : bf16[64, 4]
  %21 = input[name="layers.3.conv_v", role="state"] : bf16[B, 64, 3]
  %22 = conv1d_update[bias=false](%11, %20, %21) : (bf16[B, 64], bf16[B, 64, 3])  #3
  %23 = silu(%22) : bf16[B, 64]  #3
  %24 = reshape[shape=[B, 2, 32]](%15) : bf16[B, 2, 32]  #3
  %25 = reshape[shape=[B, 2, 32]](%19) : bf16[B, 2, 32]  #3
  %26 = reshape[shape=[B, 2, 32]](%23) : bf16[B, 2, 32]  #3
  %27 = l2norm[eps=1e-6](%24) : bf16[B, 2, 32]  #3
  %28 = l2norm[eps=1e-6](%25) : bf16[B, 2, 32]  #3
  %29 = reshape[shape=[B, 2]](%8) : bf16[B, 2]  #3
  %30 = sigmoid(%29) : bf16[B, 2]  #3
  %31 = weight[name="a_proj"] : bf16[2, 64]
  %32 = matmul[trans_a=false, trans_b=true](%0, %31) : bf16[B, 1, 2]  #3
  %33 = reshape[shape=[B, 2]](%32) : bf16[B, 2]  #3
  %34 = weight[name="dt_bias"] : bf16[2]
  %35 = weight[name="A_log"] : bf16[2]
  %36 = add(%33, %34) : bf16[B, 2]  #3
  %37 = softplus(%36) : bf16[B, 2]  #3
  %38 = exp(%35) : bf16[2]  #3
  %39 = neg(%38) : bf16[2]  #3
  %40 = mul(%37, %39) : bf16[B, 2]  #3
  %41 = input[name="layers.3.delta", role="state"] : f32[B, 2, 32, 32]
  %42 = delta_step[scale=0.17677669529663687, gated=true](%27, %28, %26, %30, %40, %41) : (bf16[B, 2, 32], f32[B, 2, 32, 32])  #3
  %43 = weight[name="o_norm"] : bf16[32]
  %44 = weight[name="g_proj"] : bf16[64, 64]
  %45 = matmul[trans_a=false, trans_b=true](%0, %44) : bf16[B, 1, 64]  #3
  %46 = reshape[shape=[B, 2, 32]](%45) : bf16[B, 2, 32]  #3
  %47 = gated_rmsnorm[eps=1e-5, group=32, norm_before_gate=true](%42, %46, %43) : bf16[B, 2, 32]  #3
  %48 = reshape[shape=[B, 1, 64]](%47) : bf16[B, 1, 64]  #3
  %49 = weight[name="o_proj"] : bf16[64, 64]
  %50 = matmul[trans_a=false, trans_b=true](%48, %49) : bf16[B, 1, 64]  #3
  output "y" = %50
  output "layers.3.conv_q" = %14.1
  output "layers.3.conv_k" = %18.1
  output "layers.3.conv_v" = %22.1
  output "layers.3.delta" = %42.1
}
"#;

    #[test]
    fn deltanet_step_joins_the_three_convs_the_gate_and_the_norm() {
        let mut g = parse(GATED_DELTANET).unwrap();
        crate::passes::fuse_conv::run(&mut g).unwrap();
        let (changed, g) = check(&g.to_string());
        assert!(changed);
        assert_eq!(fused_names(&g), ["deltanet_step"], "{g}");
        let (f, ops) = body_of(&g, "deltanet_step");
        for op in ["conv1d_update", "silu", "l2norm", "sigmoid", "add", "softplus", "mul", "delta_step"] {
            assert!(ops.contains(&op), "{op} missing from {ops:?}");
        }
        assert!(ops.contains(&"gated_rmsnorm"));
        assert_eq!(ops.iter().filter(|o| **o == "conv1d_update").count(), 3);
        // Six projections and the constant gate factor stay outside.
        assert_eq!(top_ops(&g).iter().filter(|o| **o == "matmul").count(), 7);
        assert!(top_ops(&g).contains(&"neg") && top_ops(&g).contains(&"exp"));
        // Four states updated in place, each returned.
        assert_eq!(g.op(f).in_place(g.operands(f).len()).len(), 4, "{g}");
    }

    const ATTENTION: &str = r#"
gir @a mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 1, 64]
  %1 = input[name="start", role="start"] : i32[B]
  %2 = weight[name="q_proj"] : bf16[64, 64]
  %3 = matmul[trans_a=false, trans_b=true](%0, %2) : bf16[B, 1, 64]  #0
  %4 = weight[name="k_proj"] : bf16[32, 64]
  %5 = matmul[trans_a=false, trans_b=true](%0, %4) : bf16[B, 1, 32]  #0
  %6 = weight[name="v_proj"] : bf16[32, 64]
  %7 = matmul[trans_a=false, trans_b=true](%0, %6) : bf16[B, 1, 32]  #0
  %8 = reshape[shape=[B, 1, 4, 16]](%3) : bf16[B, 1, 4, 16]  #0
  %9 = reshape[shape=[B, 1, 2, 16]](%5) : bf16[B, 1, 2, 16]  #0
  %10 = reshape[shape=[B, 1, 2, 16]](%7) : bf16[B, 1, 2, 16]  #0
  %11 = rope[style="rotate_half", theta=10000.0](%8, %1) : bf16[B, 1, 4, 16]  #0
  %12 = rope[style="rotate_half", theta=10000.0](%9, %1) : bf16[B, 1, 2, 16]  #0
  %13 = input[name="layers.0.k_cache", role="state"] : bf16[B, 64, 2, 16]
  %14 = input[name="layers.0.v_cache", role="state"] : bf16[B, 64, 2, 16]
  %15 = kv_write(%13, %12, %1) : bf16[B, 64, 2, 16]  #0
  %16 = kv_write(%14, %10, %1) : bf16[B, 64, 2, 16]  #0
  %17 = reshape[shape=[B, 4, 16]](%11) : bf16[B, 4, 16]  #0
  %18 = attention_decode[window=none, scale=0.25](%17, %15, %16, %1) : bf16[B, 4, 16]  #0
  %19 = reshape[shape=[B, 1, 64]](%18) : bf16[B, 1, 64]  #0
  %20 = weight[name="o_proj"] : bf16[64, 64]
  %21 = matmul[trans_a=false, trans_b=true](%19, %20) : bf16[B, 1, 64]  #0
  output "y" = %21
  output "layers.0.k_cache" = %15
  output "layers.0.v_cache" = %16
}
"#;

    #[test]
    fn attention_step_takes_the_cache_writes_and_leaves_rope_outside() {
        let (changed, g) = check(ATTENTION);
        assert!(changed);
        let (f, ops) = body_of(&g, "attention_step");
        assert_eq!(ops, ["attention_decode", "kv_write", "kv_write", "reshape", "reshape", "reshape"]);
        assert_eq!(
            top_ops(&g),
            ["matmul", "matmul", "matmul", "reshape", "reshape", "rope", "rope", "matmul", "fused"],
            "{g}"
        );
        assert_eq!(g.op(f).in_place(g.operands(f).len()).len(), 2);
        assert!(g.outputs().contains(&("layers.0.k_cache".to_string(), Value::new(f, 0))), "{g}");
    }

    #[test]
    fn other_modes_are_left_alone() {
        let prefill = r#"
gir @p mode=prefill {
  %0 = input[name="x", role="tokens"] : bf16[B, T, 16]
  %1 = input[name="lens", role="lens"] : i32[B]
  %2 = weight[name="w"] : bf16[16, 4]
  %3 = input[name="conv", role="state"] : bf16[B, 16, 3]
  %4 = conv1d[bias=false](%0, %2, %3, %1) : (bf16[B, T, 16], bf16[B, 16, 3])  #0
  %5 = silu(%4) : bf16[B, T, 16]  #0
  output "y" = %5
  output "conv" = %4.1
}
"#;
        let (changed, g) = check(prefill);
        assert!(!changed);
        assert_eq!(g, parse(prefill).unwrap());
        // Even a step op in a graph not marked decode is not touched.
        let modeless = ATTENTION.replace(" mode=decode", "");
        let (changed, g) = check(&modeless);
        assert!(!changed);
        assert_eq!(g, parse(&modeless).unwrap());
        for mode in [Mode::Prefill, Mode::Train] {
            let mut g = lower(&all_operators(), &LowerOptions::new(mode)).unwrap();
            let before = g.to_string();
            assert!(!run(&mut g).unwrap());
            assert_eq!(before, g.to_string());
        }
    }

    #[test]
    fn a_path_leaving_the_mixer_and_coming_back_is_cut() {
        // The gated norm's gate goes through a matmul from inside the step, so the norm (and what
        // follows) cannot join the step: the kernel would need the matmul's result before it ends.
        let text = r#"
gir @n mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 1, 64]
  %1 = weight[name="in_proj"] : bf16[64, 64]
  %2 = matmul[trans_a=false, trans_b=true](%0, %1) : bf16[B, 1, 64]  #0
  %3 = reshape[shape=[B, 2, 32]](%2) : bf16[B, 2, 32]  #0
  %4 = l2norm[eps=1e-6](%3) : bf16[B, 2, 32]  #0
  %5 = input[name="beta", role="tokens"] : bf16[B, 2]
  %6 = input[name="delta", role="state"] : f32[B, 2, 32, 32]
  %7 = delta_step[scale=0.125, gated=false](%4, %4, %3, %5, %6) : (bf16[B, 2, 32], f32[B, 2, 32, 32])  #0
  %8 = weight[name="g"] : bf16[32, 32]
  %9 = matmul[trans_a=false, trans_b=true](%4, %8) : bf16[B, 2, 32]  #0
  %10 = weight[name="o_norm"] : bf16[32]
  %11 = gated_rmsnorm[eps=1e-5, group=32, norm_before_gate=true](%7, %9, %10) : bf16[B, 2, 32]  #0
  %12 = reshape[shape=[B, 1, 64]](%11) : bf16[B, 1, 64]  #0
  output "y" = %12
  output "delta" = %7.1
}
"#;
        let g0 = parse(text).unwrap();
        let grown = grow(&g0, NodeId(7), &MIXERS[1]);
        assert_eq!(grown, BTreeSet::from([3, 4, 7, 11, 12].map(NodeId)));
        assert!(!is_convex(&g0, &grown));
        let (changed, g) = check(text);
        assert!(changed);
        let (_, ops) = body_of(&g, "deltanet_step");
        assert_eq!(ops, ["delta_step", "l2norm", "reshape"]);
        assert!(top_ops(&g).contains(&"gated_rmsnorm"), "{g}");
    }

    #[test]
    fn two_layers_fuse_separately() {
        // Two attention layers with no projections in between (hand-made): one step each, by origin.
        let text = r#"
gir @two mode=decode {
  %0 = input[name="q", role="tokens"] : bf16[B, 1, 8]
  %1 = input[name="start", role="start"] : i32[B]
  %2 = input[name="k0", role="state"] : bf16[B, 16, 1, 8]
  %3 = input[name="v0", role="state"] : bf16[B, 16, 1, 8]
  %4 = reshape[shape=[B, 1, 1, 8]](%0) : bf16[B, 1, 1, 8]  #0
  %5 = kv_write(%2, %4, %1) : bf16[B, 16, 1, 8]  #0
  %6 = kv_write(%3, %4, %1) : bf16[B, 16, 1, 8]  #0
  %7 = attention_decode[window=none, scale=0.25](%0, %5, %6, %1) : bf16[B, 1, 8]  #0
  %8 = input[name="k1", role="state"] : bf16[B, 16, 1, 8]
  %9 = input[name="v1", role="state"] : bf16[B, 16, 1, 8]
  %10 = reshape[shape=[B, 1, 1, 8]](%7) : bf16[B, 1, 1, 8]  #1
  %11 = kv_write(%8, %10, %1) : bf16[B, 16, 1, 8]  #1
  %12 = kv_write(%9, %10, %1) : bf16[B, 16, 1, 8]  #1
  %13 = attention_decode[window=8, scale=0.25](%7, %11, %12, %1) : bf16[B, 1, 8]  #1
  output "y" = %13
  output "k0" = %5
  output "v0" = %6
  output "k1" = %11
  output "v1" = %12
}
"#;
        let (changed, g) = check(text);
        assert!(changed);
        assert_eq!(fused_names(&g), ["attention_step", "attention_step"], "{g}");
        let layers: BTreeSet<u32> = g.node_ids().iter().filter_map(|n| g.origin.get(n).copied()).collect();
        assert_eq!(layers, BTreeSet::from([0, 1]));
    }

    #[test]
    fn gir_files_fuse_one_step_per_mixer() {
        for (name, g) in gir_files("fuse-decode-mixer") {
            if g.mode != Some(Mode::Decode) {
                continue;
            }
            let cores = g.node_ids().into_iter().filter(|n| MIXERS.iter().any(|m| (m.core)(g.op(*n))));
            assert_eq!(cores.count(), 0, "{name}: a mixer core is left unfused\n{g}");
        }
    }

    /// A model with every operator kind (and the options that change the decode graph).
    fn all_operators() -> flashc_dsl::ModelSpec {
        let src = "model t { vocab = 256 hidden = 64 \
                   op A = attention(heads = 4, kv_heads = 2) \
                   op W = attention(heads = 4, kv_heads = 4, window = 16, qk_norm = true, qkv_bias = true, \
                   out_bias = true, rope = none) \
                   op D = deltanet(heads = 2) op G = deltanet(heads = 2, gated = true) \
                   op M = mamba2(state = 16, head_dim = 16) op F = ffn(inner = 128) \
                   layers = [A, F, D, G, M, W] }";
        flashc_dsl::load(src).unwrap_or_else(|d| panic!("{d:?}")).0
    }

    /// Compute nodes per layer (leaves, reshapes and constants left out), as `layer → [op or kernel name]`.
    fn compute_per_layer(g: &Graph) -> BTreeMap<Option<u32>, Vec<String>> {
        let mut out: BTreeMap<Option<u32>, Vec<String>> = BTreeMap::new();
        for n in g.topo_order().unwrap() {
            let op = g.op(n);
            if op.is_leaf() || op.is_view() || is_constant(g, n) {
                continue;
            }
            let name = match op {
                Op::Fused(b) => b.name.clone(),
                op => op.name().to_string(),
            };
            out.entry(g.origin.get(&n).copied()).or_default().push(name);
        }
        out
    }

    #[test]
    fn the_decode_pipeline_leaves_one_step_kernel_per_mixer_layer() {
        let spec = all_operators();
        let mut g = lower(&spec, &LowerOptions::new(Mode::Decode)).unwrap();
        let mut seen = Vec::new();
        run_passes(&mut g, &pipeline(Mode::Decode), true, &mut |p, _| seen.push(p)).unwrap_or_else(|e| panic!("{e}"));
        assert!(seen.contains(&Pass::FuseDecodeMixer));
        let per_layer = compute_per_layer(&g);
        for (layer, ops) in &per_layer {
            let label = layer.map_or("-".to_string(), |l| l.to_string());
            println!("layer {label}: {} compute nodes: {}", ops.len(), ops.join(", "));
        }
        let steps = |l: u32| per_layer[&Some(l)].iter().filter(|o| o.ends_with("_step")).cloned().collect::<Vec<_>>();
        assert_eq!(steps(0), ["attention_step"]);
        assert!(steps(1).is_empty());
        assert_eq!(steps(2), ["deltanet_step"]);
        assert_eq!(steps(3), ["deltanet_step"]);
        assert_eq!(steps(4), ["mamba2_step"]);
        assert_eq!(steps(5), ["attention_step"]);
        // No step op, conv or norm of a mixer is left outside its kernel.
        for ops in per_layer.values() {
            for bad in ["ssd_step", "delta_step", "attention_decode", "kv_write", "conv1d_update", "gated_rmsnorm"] {
                assert!(!ops.iter().any(|o| o == bad), "{bad} left outside: {ops:?}");
            }
        }
    }
}
