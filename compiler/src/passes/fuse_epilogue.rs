//! fuse-epilogue: GEMM prologues and epilogues — the norm that feeds a matmul's LHS and the
//! elementwise ops applied to its result run inside the GEMM's kernel.
//!
//! A **GEMM** is a plain `matmul`, or a fused node holding exactly one matmul and otherwise only ops
//! a GEMM kernel can apply on the way in or out (views, elementwise ops, norms, rope, cache writes,
//! logit scaling; see `gemm_member`), such as fuse-rope's `qkv_matmul_rope`. Never a second matmul,
//! attention, a scan, a step, a convolution.
//!
//! **Prologue**: when the GEMM's LHS (untransposed, from outside) is produced by an `rmsnorm`, a
//! `gated_rmsnorm` (constant weights) or fuse-norm's `add_rmsnorm`, possibly through one `reshape`
//! or `slice`, and the GEMM is the only reader of that value (after fuse-matmul merged the
//! projections of one norm, their single matmul is), the norm joins the GEMM. Its other results
//! (the residual sum of `add_rmsnorm`) stay results of the fused node.
//!
//! **Epilogues**: ops that read the GEMM's results join it by the rules in `EPILOGUES`, repeatedly
//! (a split, then a swiglu of its halves), as long as the set stays convex.
//!
//! The fused node is named `[prologue_]<gemm>[_epilogue..]`, e.g. `rmsnorm_matmul_swiglu`,
//! `add_rmsnorm_qkv_matmul_rope_kv_write`, `matmul_residual`, and keeps the GEMM's layer.
//!
//! Preconditions: a verified graph; best after fuse-matmul, fuse-rope and fuse-norm.
//! Postconditions: the graph verifies and computes the same values; no GEMM has a fusible prologue
//! or epilogue left outside it (unless taking it would break convexity). Idempotent.

use std::collections::BTreeSet;

use super::fuse::{extract, fusible, is_constant, is_convex};
use super::fuse_norm;
use crate::gir::{Graph, InputRole, NodeId, Op, Value};

/// An epilogue rule: whether node `n` may run in the epilogue of a GEMM, given which values the
/// GEMM (with the epilogues taken so far) computes.
struct Rule {
    /// The rule's name, which also names the epilogue in the fused node's name (`split` and `view`
    /// do not; `unary` is named by its op).
    name: &'static str,
    matches: fn(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool,
}

/// The epilogue rules, tried in order on the GEMM's readers (lowest id first).
const EPILOGUES: [Rule; 8] = [
    // split(y): the pieces are column ranges the GEMM stores to separate buffers.
    Rule { name: "split", matches: split },
    // reshape(y) read by another epilogue: a view on the way to it.
    Rule { name: "view", matches: view },
    // add(y, b) with a constant b: a bias.
    Rule { name: "bias", matches: bias },
    // mul(y, c) with a constant c: a scale.
    Rule { name: "scale", matches: scale },
    // add(h, y) with h computed elsewhere and y the GEMM's full result: the residual.
    Rule { name: "residual", matches: residual },
    // swiglu(gate, up) with both halves from the GEMM (a gate|up matmul and its split).
    Rule { name: "swiglu", matches: swiglu },
    // relu2(y), gelu(y), sigmoid(y), convert(y), ..: an activation or any other unary elementwise op.
    Rule { name: "unary", matches: unary },
    // row_norm_logits(y, w) with a constant w: a per-column scale (the GEMM reads each row of w).
    Rule { name: "row_norm_logits", matches: row_norm_logits },
];

fn split(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    matches!(g.op(n), Op::Split { .. }) && from_gemm(g.operands(n)[0])
}

fn view(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    if !matches!(g.op(n), Op::Reshape { .. }) || !from_gemm(g.operands(n)[0]) {
        return false;
    }
    let through = |v: Value| v.node == n || from_gemm(v);
    g.successors(n)
        .into_iter()
        .any(|u| fusible(g, u) && EPILOGUES.iter().any(|r| r.name != "view" && (r.matches)(g, u, &through)))
}

/// Whether a binary node reads one value from the GEMM and one constant.
fn gemm_and_constant(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    let ops = g.operands(n);
    ops.len() == 2
        && ((from_gemm(ops[0]) && is_constant(g, ops[1].node)) || (from_gemm(ops[1]) && is_constant(g, ops[0].node)))
}

fn bias(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    matches!(g.op(n), Op::Add) && gemm_and_constant(g, n, from_gemm)
}

fn scale(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    matches!(g.op(n), Op::Mul) && gemm_and_constant(g, n, from_gemm)
}

fn residual(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    if !matches!(g.op(n), Op::Add) {
        return false;
    }
    let ops = g.operands(n);
    let full = |v: Value| g.ty(v).ok() == g.ty(n.into()).ok();
    let other_runtime = |v: Value| !from_gemm(v) && !is_constant(g, v.node);
    (from_gemm(ops[0]) && full(ops[0]) && other_runtime(ops[1]))
        || (from_gemm(ops[1]) && full(ops[1]) && other_runtime(ops[0]))
}

fn swiglu(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    matches!(g.op(n), Op::Swiglu) && g.operands(n).iter().all(|v| from_gemm(*v))
}

fn unary(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    let ops = g.operands(n);
    g.op(n).is_elementwise() && ops.len() == 1 && from_gemm(ops[0])
}

fn row_norm_logits(g: &Graph, n: NodeId, from_gemm: &dyn Fn(Value) -> bool) -> bool {
    let ops = g.operands(n);
    matches!(g.op(n), Op::RowNormLogits) && from_gemm(ops[0]) && is_constant(g, ops[1].node)
}

pub fn run(g: &mut Graph) -> Result<bool, String> {
    let mut changed = false;
    for n in g.node_ids() {
        if !g.contains(n) {
            continue;
        }
        let Some(gemm) = Gemm::of(g, n) else { continue };
        let mut set = BTreeSet::from([n]);
        let mut parts: Vec<&str> = Vec::new();
        if let Some((nodes, label)) = gemm.lhs.and_then(|slot| prologue(g, n, slot)) {
            let with: BTreeSet<NodeId> = set.union(&nodes).copied().collect();
            if is_convex(g, &with) {
                set = with;
                parts.push(label);
            }
        }
        parts.push(&gemm.name);
        let labels = epilogues(g, n, &gemm, &mut set);
        if set.len() == 1 {
            continue;
        }
        for label in labels {
            if parts.last() != Some(&label) {
                parts.push(label);
            }
        }
        let origin = g.origin.get(&n).copied();
        let fused = extract(g, &set, &parts.join("_"))?;
        match origin {
            Some(o) => g.origin.insert(fused, o),
            None => g.origin.remove(&fused),
        };
        changed = true;
    }
    Ok(changed)
}

/// A node that is a GEMM.
struct Gemm {
    /// The operand slot carrying the matmul's LHS when it comes from outside, untransposed.
    lhs: Option<usize>,
    /// The node's results computed from the matmul.
    results: BTreeSet<u16>,
    /// `matmul`, or the fused node's name.
    name: String,
}

impl Gemm {
    fn of(g: &Graph, n: NodeId) -> Option<Gemm> {
        if !fusible(g, n) {
            return None;
        }
        match g.op(n) {
            Op::MatMul { trans_a, .. } => {
                Some(Gemm { lhs: (!trans_a).then_some(0), results: BTreeSet::from([0]), name: "matmul".to_string() })
            }
            Op::Fused(body) => {
                let b = &body.graph;
                let compute: Vec<NodeId> = b.node_ids().into_iter().filter(|m| !b.op(*m).is_leaf()).collect();
                if !compute.iter().all(|m| gemm_member(b.op(*m))) {
                    return None;
                }
                let matmuls: Vec<NodeId> =
                    compute.into_iter().filter(|m| matches!(b.op(*m), Op::MatMul { .. })).collect();
                let [mm] = matmuls[..] else { return None };
                let lhs = match (b.op(mm), b.operands(mm).first().map(|v| b.op(v.node))) {
                    (Op::MatMul { trans_a: false, .. }, Some(Op::Input { role: InputRole::Param, index, .. })) => {
                        Some(*index as usize)
                    }
                    _ => None,
                };
                let results = (0..b.outputs().len())
                    .filter(|i| b.reaches(mm, b.outputs()[*i].1.node))
                    .map(|i| i as u16)
                    .collect();
                Some(Gemm { lhs, results, name: body.name.clone() })
            }
            _ => None,
        }
    }
}

/// Ops a GEMM kernel may hold besides its one matmul: views, elementwise ops, norms, rotations,
/// cache writes and logit scaling. Not attention, scans, steps, convolutions, embeddings or losses,
/// which are kernels of their own kind.
fn gemm_member(op: &Op) -> bool {
    op.is_elementwise()
        || matches!(
            op,
            Op::MatMul { .. }
                | Op::Reshape { .. }
                | Op::Slice { .. }
                | Op::Concat { .. }
                | Op::Split { .. }
                | Op::RmsNorm { .. }
                | Op::L2Norm { .. }
                | Op::GatedRmsNorm { .. }
                | Op::RowNormLogits
                | Op::Rope { .. }
                | Op::KvWrite
        )
}

/// Whether `user` is the only reader of `v` (and `v` is no graph output).
fn sole_reader(g: &Graph, v: Value, user: NodeId) -> bool {
    let users = g.users(v);
    !users.is_empty() && users.iter().all(|(u, _)| *u == user) && !g.is_output(v)
}

/// The norm computing operand `slot` of GEMM `n`, with the reshape or slice in between if any (a
/// per-head norm, or the meta tokens cut off before the LM head), when `n` is its only reader: the
/// nodes and the prologue's name.
fn prologue(g: &Graph, n: NodeId, slot: usize) -> Option<(BTreeSet<NodeId>, &'static str)> {
    let mut v = *g.operands(n).get(slot)?;
    let mut nodes = BTreeSet::new();
    if !sole_reader(g, v, n) {
        return None;
    }
    if matches!(g.op(v.node), Op::Reshape { .. } | Op::Slice { .. }) && fusible(g, v.node) {
        let view = v.node;
        nodes.insert(view);
        v = g.operands(view)[0];
        if !sole_reader(g, v, view) {
            return None;
        }
    }
    let p = v.node;
    let ops = g.operands(p);
    let label = match g.op(p) {
        Op::RmsNorm { .. } if is_constant(g, ops[1].node) => "rmsnorm",
        Op::GatedRmsNorm { .. } if is_constant(g, ops[2].node) => "gated_rmsnorm",
        Op::Fused(_) if fuse_norm::norm_result(g, p) == Some(v.result) => fuse_norm::NAME,
        _ => return None,
    };
    if !fusible(g, p) {
        return None;
    }
    nodes.insert(p);
    Some((nodes, label))
}

/// Grows `set` (the GEMM `n` and its prologue) by the epilogues of `EPILOGUES`, one at a time, lowest
/// node id and first rule first. Returns the epilogues' names in the order taken.
fn epilogues(g: &Graph, n: NodeId, gemm: &Gemm, set: &mut BTreeSet<NodeId>) -> Vec<&'static str> {
    let mut taken: BTreeSet<NodeId> = BTreeSet::new();
    let mut labels = Vec::new();
    loop {
        let next = {
            let from_gemm = |v: Value| taken.contains(&v.node) || (v.node == n && gemm.results.contains(&v.result));
            let readers: BTreeSet<NodeId> = std::iter::once(n)
                .chain(taken.iter().copied())
                .flat_map(|m| g.successors(m))
                .filter(|m| !set.contains(m) && fusible(g, *m) && !matches!(g.op(*m), Op::Fused(_)))
                .collect();
            readers.into_iter().find_map(|m| {
                let rule = EPILOGUES.iter().find(|r| (r.matches)(g, m, &from_gemm))?;
                let mut with = set.clone();
                with.insert(m);
                is_convex(g, &with).then_some((m, rule))
            })
        };
        let Some((m, rule)) = next else { break };
        set.insert(m);
        taken.insert(m);
        match rule.name {
            "split" | "view" => {}
            "unary" => labels.push(g.op(m).name()),
            name => labels.push(name),
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::gir::Mode;
    use crate::gir::parse::parse;
    use crate::lower::{LowerOptions, lower};
    use crate::passes::fuse::member_ops;
    use crate::passes::{Pass, pipeline, run_passes};
    use crate::verify::verify;

    /// Parses and verifies `text`, runs `passes` and then this pass, verifies the result and checks
    /// that a second run of this pass changes nothing. Returns whether this pass changed the graph.
    fn check_after(passes: &[Pass], text: &str) -> (bool, Graph) {
        let mut g = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        verify(&g).unwrap_or_else(|e| panic!("input: {e:?}\n{g}"));
        run_passes(&mut g, passes, true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        let changed = run(&mut g).expect("fuse-epilogue");
        verify(&g).unwrap_or_else(|e| panic!("output: {e:?}\n{g}"));
        let once = g.to_string();
        assert!(!run(&mut g).expect("second fuse-epilogue"), "a second run reports a change:\n{g}");
        assert_eq!(g.to_string(), once, "a second run changes the graph");
        (changed, g)
    }

    fn check(text: &str) -> (bool, Graph) {
        check_after(&[], text)
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

    fn names(g: &Graph) -> Vec<String> {
        let mut v: Vec<String> = fused(g).into_iter().map(|(n, _)| n).collect();
        v.sort();
        v
    }

    /// A SwiGLU FFN layer after fuse-matmul: norm, gate|up matmul, split, swiglu, down, residual.
    const FFN: &str = "gir @t mode=decode {
  %0 = input[name=\"h\", role=\"tokens\"] : bf16[B, 1, 16]
  %1 = weight[name=\"norm\"] : bf16[16]
  %2 = weight[name=\"up_gate\"] : bf16[64, 16]
  %3 = weight[name=\"down\"] : bf16[16, 32]
  %4 = rmsnorm[eps=1e-6](%0, %1) : bf16[B, 1, 16]  #1
  %5 = matmul[trans_a=false, trans_b=true](%4, %2) : bf16[B, 1, 64]  #1
  %6 = split[axis=2, sizes=[32, 32]](%5) : (bf16[B, 1, 32], bf16[B, 1, 32])  #1
  %7 = swiglu(%6.1, %6) : bf16[B, 1, 32]  #1
  %8 = matmul[trans_a=false, trans_b=true](%7, %3) : bf16[B, 1, 16]  #1
  %9 = add(%0, %8) : bf16[B, 1, 16]  #1
  output \"h\" = %9
}
";

    #[test]
    fn fuses_norm_prologue_swiglu_and_residual_epilogues() {
        let (changed, g) = check(FFN);
        assert!(changed);
        let f = fused(&g);
        assert_eq!(
            f,
            [
                ("matmul_residual".to_string(), vec!["add", "matmul"]),
                ("rmsnorm_matmul_swiglu".to_string(), vec!["matmul", "rmsnorm", "split", "swiglu"]),
            ],
            "{g}"
        );
        for n in g.node_ids() {
            if matches!(g.op(n), Op::Fused(_)) {
                assert_eq!(g.origin.get(&n), Some(&1));
            }
        }
    }

    #[test]
    fn takes_add_rmsnorm_as_prologue_and_keeps_the_sum_as_a_result() {
        // Two FFN layers: fuse-norm joins layer 0's residual add with layer 1's norm.
        let (changed, g) = check_after(
            &[Pass::FuseNorm],
            "gir @t mode=decode {
  %0 = input[name=\"h\", role=\"tokens\"] : bf16[B, 1, 16]
  %1 = input[name=\"y\", role=\"tokens\"] : bf16[B, 1, 16]
  %2 = weight[name=\"norm\"] : bf16[16]
  %3 = weight[name=\"up\"] : bf16[32, 16]
  %4 = weight[name=\"down\"] : bf16[16, 32]
  %5 = add(%0, %1) : bf16[B, 1, 16]  #0
  %6 = rmsnorm[eps=1e-6](%5, %2) : bf16[B, 1, 16]  #1
  %7 = matmul[trans_a=false, trans_b=true](%6, %3) : bf16[B, 1, 32]  #1
  %8 = relu2(%7) : bf16[B, 1, 32]  #1
  %9 = matmul[trans_a=false, trans_b=true](%8, %4) : bf16[B, 1, 16]  #1
  output \"sum\" = %5
  output \"y\" = %9
}
",
        );
        assert!(changed);
        assert_eq!(names(&g), ["add_rmsnorm_matmul_relu2"], "{g}");
        let f = g.node_ids().into_iter().find(|n| matches!(g.op(*n), Op::Fused(_))).unwrap();
        // Results: the residual sum and the activation.
        assert_eq!(g.node(f).unwrap().types.len(), 2);
        assert_eq!(g.outputs()[0].1, Value::new(f, 0));
        assert_eq!(g.origin.get(&f), Some(&1));
        // The second matmul is another kernel.
        assert_eq!(g.node_ids().iter().filter(|n| matches!(g.op(**n), Op::MatMul { .. })).count(), 1);
    }

    #[test]
    fn leaves_a_norm_with_a_second_reader_outside() {
        // The norm feeds two matmuls of different dtypes (not merged) and a bias epilogue is
        // still taken.
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 8]
  %1 = weight[name=\"n\"] : f32[8]
  %2 = weight[name=\"a\"] : f32[4, 8]
  %3 = weight[name=\"b\"] : bf16[4, 8]
  %4 = weight[name=\"bias\"] : f32[4]
  %5 = rmsnorm[eps=1e-6](%0, %1) : f32[B, 8]
  %6 = matmul[trans_a=false, trans_b=true](%5, %2) : f32[B, 4]
  %7 = add(%6, %4) : f32[B, 4]
  %8 = matmul[trans_a=false, trans_b=true](%5, %3) : f32[B, 4]
  output \"a\" = %7
  output \"b\" = %8
}
",
        );
        assert!(changed);
        assert_eq!(fused(&g), [("matmul_bias".to_string(), vec!["add", "matmul"])], "{g}");
        assert!(g.node_ids().iter().any(|n| matches!(g.op(*n), Op::RmsNorm { .. })));
        // A norm that is also a graph output stays outside as well.
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 8]
  %1 = weight[name=\"n\"] : f32[8]
  %2 = weight[name=\"a\"] : f32[4, 8]
  %3 = rmsnorm[eps=1e-6](%0, %1) : f32[B, 8]
  %4 = matmul[trans_a=false, trans_b=true](%3, %2) : f32[B, 4]
  output \"a\" = %4
  output \"n\" = %3
}
",
        );
        assert!(!changed, "{g}");
    }

    #[test]
    fn does_not_take_non_convex_epilogues_or_other_matmuls() {
        // add(y, mul(y, x)): the add reads the GEMM twice, once through a node that cannot join.
        // gelu(y) feeds another matmul, which stays a kernel of its own.
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 8]
  %1 = weight[name=\"a\"] : f32[8, 8]
  %2 = weight[name=\"b\"] : f32[8, 8]
  %3 = matmul[trans_a=false, trans_b=true](%0, %1) : f32[B, 8]
  %4 = mul(%3, %0) : f32[B, 8]
  %5 = add(%3, %4) : f32[B, 8]
  %6 = gelu(%3) : f32[B, 8]
  %7 = matmul[trans_a=false, trans_b=true](%6, %2) : f32[B, 8]
  output \"a\" = %5
  output \"b\" = %7
}
",
        );
        assert!(changed);
        assert_eq!(fused(&g), [("matmul_gelu".to_string(), vec!["gelu", "matmul"])], "{g}");
        assert!(g.node_ids().iter().any(|n| matches!(g.op(*n), Op::Add)));
        assert_eq!(g.node_ids().iter().filter(|n| matches!(g.op(**n), Op::MatMul { .. })).count(), 1);
    }

    #[test]
    fn grows_a_rope_fused_gemm_and_the_lm_head() {
        // The qkv GEMM made by fuse-rope takes its norm; the LM head takes the final norm, the
        // row normalisation and nothing else.
        let (changed, g) = check_after(
            &[Pass::FuseMatmul, Pass::FuseRope],
            "gir @t mode=decode {
  %0 = input[name=\"x\", role=\"tokens\"] : bf16[B, 1, 16]
  %1 = input[name=\"start\", role=\"start\"] : i32[B]
  %2 = input[name=\"k_cache\", role=\"state\"] : bf16[B, 64, 1, 8]
  %3 = input[name=\"v_cache\", role=\"state\"] : bf16[B, 64, 1, 8]
  %4 = weight[name=\"norm\"] : bf16[16]
  %5 = weight[name=\"q\"] : bf16[16, 16]
  %6 = weight[name=\"k\"] : bf16[8, 16]
  %7 = weight[name=\"v\"] : bf16[8, 16]
  %8 = weight[name=\"o\"] : bf16[16, 16]
  %9 = weight[name=\"final\"] : bf16[16]
  %10 = weight[name=\"head\"] : bf16[32, 16]
  %11 = rmsnorm[eps=1e-6](%0, %4) : bf16[B, 1, 16]  #0
  %12 = matmul[trans_a=false, trans_b=true](%11, %5) : bf16[B, 1, 16]  #0
  %13 = matmul[trans_a=false, trans_b=true](%11, %6) : bf16[B, 1, 8]  #0
  %14 = matmul[trans_a=false, trans_b=true](%11, %7) : bf16[B, 1, 8]  #0
  %15 = reshape[shape=[B, 1, 2, 8]](%12) : bf16[B, 1, 2, 8]  #0
  %16 = reshape[shape=[B, 1, 1, 8]](%13) : bf16[B, 1, 1, 8]  #0
  %17 = reshape[shape=[B, 1, 1, 8]](%14) : bf16[B, 1, 1, 8]  #0
  %18 = rope[style=\"rotate_half\", theta=10000.0](%15, %1) : bf16[B, 1, 2, 8]  #0
  %19 = rope[style=\"rotate_half\", theta=10000.0](%16, %1) : bf16[B, 1, 1, 8]  #0
  %20 = kv_write(%2, %19, %1) : bf16[B, 64, 1, 8]  #0
  %21 = kv_write(%3, %17, %1) : bf16[B, 64, 1, 8]  #0
  %22 = reshape[shape=[B, 2, 8]](%18) : bf16[B, 2, 8]  #0
  %23 = attention_decode[window=none, scale=0.35](%22, %20, %21, %1) : bf16[B, 2, 8]  #0
  %24 = reshape[shape=[B, 1, 16]](%23) : bf16[B, 1, 16]  #0
  %25 = matmul[trans_a=false, trans_b=true](%24, %8) : bf16[B, 1, 16]  #0
  %26 = add(%0, %25) : bf16[B, 1, 16]  #0
  %27 = rmsnorm[eps=1e-6](%26, %9) : bf16[B, 1, 16]
  %28 = matmul[trans_a=false, trans_b=true](%27, %10) : bf16[B, 1, 32]
  %29 = row_norm_logits(%28, %10) : f32[B, 1, 32]
  output \"logits\" = %29
  output \"k_cache\" = %20
  output \"v_cache\" = %21
}
",
        );
        assert!(changed);
        assert_eq!(
            names(&g),
            ["matmul_residual", "rmsnorm_matmul_row_norm_logits", "rmsnorm_qkv_matmul_rope_kv_write"],
            "{g}"
        );
        let head = g.node_ids().into_iter().find(|n| g.op(*n).name() == "fused" && !g.origin.contains_key(n));
        assert!(head.is_some(), "the LM head belongs to no layer:\n{g}");
    }

    #[test]
    fn takes_a_per_head_norm_through_a_reshape() {
        // DeltaNet's output norm runs per head before the output projection.
        let (changed, g) = check(
            "gir @t {
  %0 = input[name=\"o\", role=\"tokens\"] : f32[B, 2, 4]
  %1 = weight[name=\"o_norm\"] : f32[4]
  %2 = weight[name=\"o_proj\"] : f32[8, 8]
  %3 = rmsnorm[eps=1e-5](%0, %1) : f32[B, 2, 4]
  %4 = reshape[shape=[B, 1, 8]](%3) : f32[B, 1, 8]
  %5 = matmul[trans_a=false, trans_b=true](%4, %2) : f32[B, 1, 8]
  output \"y\" = %5
}
",
        );
        assert!(changed);
        assert_eq!(fused(&g), [("rmsnorm_matmul".to_string(), vec!["matmul", "reshape", "rmsnorm"])]);
    }

    #[test]
    fn takes_views_only_on_the_way_to_another_epilogue() {
        // Mamba2's decode in_proj: squeezed, split into z | x | dt, with a bias, softplus and a
        // constant scale on dt.
        // The second matmul's view leads to nothing an epilogue rule takes.
        let (changed, g) = check(
            "gir @t mode=decode {
  %0 = input[name=\"x\", role=\"tokens\"] : f32[B, 1, 8]
  %1 = weight[name=\"in_proj\"] : f32[12, 8]
  %2 = weight[name=\"dt_bias\"] : f32[2]
  %3 = weight[name=\"other\"] : f32[8, 8]
  %4 = matmul[trans_a=false, trans_b=true](%0, %1) : f32[B, 1, 12]
  %5 = reshape[shape=[B, 12]](%4) : f32[B, 12]
  %6 = split[axis=1, sizes=[4, 6, 2]](%5) : (f32[B, 4], f32[B, 6], f32[B, 2])
  %7 = add(%6.2, %2) : f32[B, 2]
  %8 = softplus(%7) : f32[B, 2]
  %12 = mul(%8, %2) : f32[B, 2]
  %9 = matmul[trans_a=false, trans_b=true](%0, %3) : f32[B, 1, 8]
  %10 = reshape[shape=[B, 8]](%9) : f32[B, 8]
  %11 = l2norm[eps=1e-6](%10) : f32[B, 8]
  output \"z\" = %6
  output \"x\" = %6.1
  output \"dt\" = %12
  output \"y\" = %11
}
",
        );
        assert!(changed);
        assert_eq!(
            fused(&g),
            [("matmul_bias_softplus_scale".to_string(), vec!["add", "matmul", "mul", "reshape", "softplus", "split"])],
            "{g}"
        );
        assert_eq!(g.node_ids().iter().filter(|n| matches!(g.op(**n), Op::Reshape { .. })).count(), 1);
    }

    /// Compute nodes (not leaves, not views, not weight preparation) per layer; `None` is the
    /// embedding and the LM head.
    fn kernels_per_layer(g: &Graph) -> BTreeMap<Option<u32>, usize> {
        let mut count = BTreeMap::new();
        for n in g.node_ids() {
            let op = g.op(n);
            if op.is_leaf() || op.is_view() || is_constant(g, n) {
                continue;
            }
            *count.entry(g.origin.get(&n).copied()).or_insert(0) += 1;
        }
        count
    }

    #[test]
    fn decode_kernels_per_layer_of_example_models() {
        use flashc_dsl::spec::Operator;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for file in ["nemotron-flash-1b.arch", "qwen3-0.6b.arch"] {
            let Ok(src) = std::fs::read_to_string(dir.join(file)) else {
                println!("{file}: not in examples/, skipped");
                continue;
            };
            let (spec, _) = flashc_dsl::load(&src).unwrap_or_else(|d| panic!("{file}: {d:?}"));
            let mut g = lower(&spec, &LowerOptions::new(Mode::Decode)).expect("lower");
            run_passes(&mut g, &pipeline(Mode::Decode), true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
            let count = kernels_per_layer(&g);
            let total: usize = count.values().sum();
            println!(
                "{file}: {total} kernels for {} layers ({:.2} per layer, embedding and LM head included)",
                spec.layers.len(),
                total as f64 / spec.layers.len() as f64
            );
            println!("  embedding + LM head: {}", count.get(&None).copied().unwrap_or(0));
            for layer in &spec.layers {
                let k = count.get(&Some(layer.index as u32)).copied().unwrap_or(0);
                println!("  layer {:2} {:10} {k}", layer.index, layer.name);
                // What these passes achieve on their own for attention and FFN layers.
                match layer.op {
                    Operator::Attention(_) => assert!(k <= 3, "{file} layer {}: {k} kernels\n{g}", layer.index),
                    Operator::Ffn(_) => assert!(k <= 2, "{file} layer {}: {k} kernels\n{g}", layer.index),
                    _ => {}
                }
            }
            assert!(count.get(&None).copied().unwrap_or(0) <= 2, "{file}: embedding and LM head\n{g}");
        }
    }
}
