//! fuse-conv: a short convolution and the SiLU of its output become one `conv_silu` kernel.
//!
//! Pattern: a `conv1d` (prefill, train) or `conv1d_update` (decode) whose first result, the convolved
//! tokens, is read by exactly one node, a `silu`, and is not a graph output. The pair becomes one
//! fused node `conv_silu` that takes the conv's operands in the conv's order and yields
//! `(silu(y), state')`: the same signature as the conv, so the new state stays result 1 and the fused
//! node updates the state operand in place as the conv did. (When the new state is unused, as with the
//! zero states of training, the only result is `silu(y)`.)
//!
//! The three convs of a DeltaNet layer fuse separately here; in decode, fuse-decode-mixer later takes
//! them, with the rest of the layer's step, into one kernel.
//!
//! Preconditions: a verified graph.
//! Postconditions: no conv at top level has its output read by a lone `silu`; every conv state's new
//! version is still returned under its name; the graph computes the same values and verifies.

use std::collections::BTreeSet;

use crate::gir::{Graph, NodeId, Op, Value};
use crate::passes::fuse::{extract, fusible};

/// The name of the fused kernel.
pub const NAME: &str = "conv_silu";

pub fn run(g: &mut Graph) -> Result<bool, String> {
    let mut changed = false;
    for conv in g.node_ids() {
        let Some(silu) = activation_of(g, conv) else { continue };
        let fused = extract(g, &BTreeSet::from([conv, silu]), NAME)?;
        // `extract` orders results as their producers run, which puts the state before the activation.
        activation_first(g, fused)?;
        changed = true;
    }
    Ok(changed)
}

/// The `silu` that alone reads the convolved output of `conv`, if `conv` is a conv.
fn activation_of(g: &Graph, conv: NodeId) -> Option<NodeId> {
    if !matches!(g.node(conv)?.op, Op::Conv1d { .. } | Op::Conv1dUpdate { .. }) || !fusible(g, conv) {
        return None;
    }
    let y = Value::from(conv);
    if g.is_output(y) {
        return None;
    }
    match g.users(y).as_slice() {
        [(silu, 0)] if matches!(g.op(*silu), Op::Silu) && fusible(g, *silu) => Some(*silu),
        _ => None,
    }
}

/// Makes the activation result 0 of a fresh `conv_silu` node, keeping the order of the other results,
/// and redirects every reader.
fn activation_first(g: &mut Graph, fused: NodeId) -> Result<(), String> {
    let Some(Op::Fused(body)) = g.node(fused).map(|n| &n.op) else {
        return Err(format!("fuse-conv: {fused} is not a fused node"));
    };
    let outputs: Vec<Value> = body.graph.outputs().iter().map(|(_, v)| *v).collect();
    let first = outputs
        .iter()
        .position(|v| matches!(body.graph.op(v.node), Op::Silu))
        .ok_or_else(|| format!("fuse-conv: {fused} does not return its activation"))?;
    if first == 0 {
        return Ok(());
    }
    // New result i is old result order[i].
    let mut order: Vec<usize> = vec![first];
    order.extend((0..outputs.len()).filter(|i| *i != first));
    let new_index = |old: usize| order.iter().position(|o| *o == old).unwrap_or(old) as u16;

    let readers: Vec<Vec<(NodeId, u16)>> = (0..outputs.len()).map(|r| g.users(Value::new(fused, r as u16))).collect();
    let returned: Vec<(String, Value)> =
        g.outputs().iter().filter(|(_, v)| v.node == fused).map(|(n, v)| (n.clone(), *v)).collect();
    let node = g.node_mut(fused).ok_or("fuse-conv: the fused node vanished")?;
    node.types = order.iter().map(|o| node.types[*o].clone()).collect();
    if let Op::Fused(body) = &mut node.op {
        for (i, o) in order.iter().enumerate() {
            body.graph.set_output(i.to_string(), outputs[*o]);
        }
    }
    for (r, users) in readers.iter().enumerate() {
        for (user, slot) in users {
            g.set_operand(*user, *slot, Value::new(fused, new_index(r)));
        }
    }
    for (name, v) in returned {
        g.set_output(name, Value::new(fused, new_index(v.result as usize)));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gir::parse::parse;
    use crate::passes::{Pass, run_passes};
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

    /// Every `tests/passes/{prefix}-*.gir` file run through the passes its first line names
    /// (`// passes: a, b`) with the verifier on; returns `(file name, result)` in name order. Shared by
    /// the fusion passes' tests until the folder-driven snapshot harness runs them all.
    pub(crate) fn gir_files(prefix: &str) -> Vec<(String, Graph)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/passes");
        let mut files: Vec<_> =
            std::fs::read_dir(&dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
        files.retain(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&format!("{prefix}-")) && name.ends_with(".gir")
        });
        files.sort();
        assert!(files.len() >= 2, "expected at least two {prefix}-*.gir files in {}", dir.display());
        files
            .into_iter()
            .map(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&p).unwrap();
                let header = text.lines().next().and_then(|l| l.strip_prefix("// passes:"));
                let header = header.unwrap_or_else(|| panic!("{name}: first line must be `// passes: ...`"));
                let passes: Vec<Pass> = header
                    .split(',')
                    .map(|s| Pass::parse(s.trim()).unwrap_or_else(|| panic!("{name}: unknown pass `{s}`")))
                    .collect();
                let mut g = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
                verify(&g).unwrap_or_else(|e| panic!("{name}: input does not verify: {e:?}"));
                run_passes(&mut g, &passes, true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
                (name, g)
            })
            .collect()
    }

    /// The names of the fused nodes of a graph, in node order.
    pub(crate) fn fused_names(g: &Graph) -> Vec<String> {
        g.node_ids()
            .into_iter()
            .filter_map(|n| match g.op(n) {
                Op::Fused(b) => Some(b.name.clone()),
                _ => None,
            })
            .collect()
    }

    const DECODE: &str = r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 64]
  %1 = weight[name="w"] : bf16[64, 4]
  %2 = input[name="conv", role="state"] : bf16[B, 64, 3]
  %3 = conv1d_update[bias=false](%0, %1, %2) : (bf16[B, 64], bf16[B, 64, 3])  #2
  %4 = silu(%3) : bf16[B, 64]  #2
  %5 = l2norm[eps=1e-6](%4) : bf16[B, 64]  #2
  output "y" = %5
  output "conv" = %3.1
}
"#;

    #[test]
    fn decode_conv_and_silu_fuse_with_the_conv_signature() {
        let (changed, g) = check(DECODE);
        assert!(changed);
        assert_eq!(fused_names(&g), ["conv_silu"]);
        let text = g.to_string();
        // Operands (x, w, state), results (activated, state'); the state is updated in place.
        assert!(text.contains(r#"fused[name="conv_silu"](%0, %1, %2) : (bf16[B, 64], bf16[B, 64, 3])  #2"#), "{text}");
        let f = g.node_ids().into_iter().find(|n| matches!(g.op(*n), Op::Fused(_))).unwrap();
        assert_eq!(g.op(f).in_place(3), vec![(2, 1)]);
        assert!(text.contains(&format!("l2norm[eps=1e-6]({f})")), "{text}");
        assert!(text.contains(&format!("output \"conv\" = {f}.1")), "{text}");
        let top: Vec<&str> = g.node_ids().iter().map(|n| g.op(*n).name()).collect();
        assert_eq!(top, ["input", "weight", "input", "l2norm", "fused"]);
    }

    #[test]
    fn prefill_conv_with_bias_fuses() {
        let (changed, g) = check(
            r#"
gir @t mode=prefill {
  %0 = input[name="x", role="tokens"] : bf16[B, T, 32]
  %1 = input[name="lens", role="lens"] : i32[B]
  %2 = weight[name="w"] : bf16[32, 4]
  %3 = input[name="conv", role="state"] : bf16[B, 32, 3]
  %4 = weight[name="b"] : bf16[32]
  %5 = conv1d[bias=true](%0, %2, %3, %1, %4) : (bf16[B, T, 32], bf16[B, 32, 3])
  %6 = silu(%5) : bf16[B, T, 32]
  %7 = split[axis=2, sizes=[16, 16]](%6) : (bf16[B, T, 16], bf16[B, T, 16])
  %8 = add(%7, %7.1) : bf16[B, T, 16]
  output "y" = %8
  output "conv" = %5.1
}
"#,
        );
        assert!(changed);
        let text = g.to_string();
        assert!(text.contains(r#"fused[name="conv_silu"](%0, %2, %3, %1, %4)"#), "{text}");
        assert!(text.contains("conv1d[bias=true](%0, %1, %2, %3, %4)"), "the body keeps the conv: {text}");
    }

    #[test]
    fn train_conv_with_a_dead_state_yields_only_the_activation() {
        let (changed, g) = check(
            r#"
gir @t mode=train {
  %0 = input[name="x", role="tokens"] : bf16[B, T, 8]
  %1 = input[name="lens", role="lens"] : i32[B]
  %2 = weight[name="w"] : bf16[8, 4]
  %3 = zeros : bf16[B, 8, 3]
  %4 = conv1d[bias=false](%0, %2, %3, %1) : (bf16[B, T, 8], bf16[B, 8, 3])
  %5 = silu(%4) : bf16[B, T, 8]
  output "y" = %5
}
"#,
        );
        assert!(changed);
        assert!(g.to_string().contains(r#"fused[name="conv_silu"](%0, %2, %3, %1) : bf16[B, T, 8]"#), "{g}");
    }

    #[test]
    fn silu_elsewhere_is_left_alone() {
        let cases = [
            // The silu reads the new state, not the convolved tokens.
            r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 8]
  %1 = weight[name="w"] : bf16[8, 4]
  %2 = input[name="conv", role="state"] : bf16[B, 8, 3]
  %3 = conv1d_update[bias=false](%0, %1, %2) : (bf16[B, 8], bf16[B, 8, 3])
  %4 = silu(%3.1) : bf16[B, 8, 3]
  output "y" = %3
  output "s" = %4
  output "conv" = %3.1
}
"#,
            // The convolved tokens are also read by something else.
            r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 8]
  %1 = weight[name="w"] : bf16[8, 4]
  %2 = input[name="conv", role="state"] : bf16[B, 8, 3]
  %3 = conv1d_update[bias=false](%0, %1, %2) : (bf16[B, 8], bf16[B, 8, 3])
  %4 = silu(%3) : bf16[B, 8]
  %5 = add(%3, %4) : bf16[B, 8]
  output "y" = %5
  output "conv" = %3.1
}
"#,
            // The convolved tokens are a graph output.
            r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 8]
  %1 = weight[name="w"] : bf16[8, 4]
  %2 = input[name="conv", role="state"] : bf16[B, 8, 3]
  %3 = conv1d_update[bias=false](%0, %1, %2) : (bf16[B, 8], bf16[B, 8, 3])
  %4 = silu(%3) : bf16[B, 8]
  output "y" = %4
  output "raw" = %3
  output "conv" = %3.1
}
"#,
            // A silu of the conv's input.
            r#"
gir @t mode=decode {
  %0 = input[name="x", role="tokens"] : bf16[B, 8]
  %1 = weight[name="w"] : bf16[8, 4]
  %2 = input[name="conv", role="state"] : bf16[B, 8, 3]
  %4 = silu(%0) : bf16[B, 8]
  %3 = conv1d_update[bias=false](%4, %1, %2) : (bf16[B, 8], bf16[B, 8, 3])
  output "y" = %3
  output "conv" = %3.1
}
"#,
        ];
        for text in cases {
            let (changed, g) = check(text);
            assert!(!changed, "{g}");
            assert_eq!(g, parse(text).unwrap());
        }
    }

    #[test]
    fn each_deltanet_conv_fuses_separately() {
        let (changed, g) = check(
            r#"
gir @t mode=decode {
  %0 = input[name="q", role="tokens"] : bf16[B, 16]
  %1 = input[name="k", role="tokens"] : bf16[B, 16]
  %2 = input[name="v", role="tokens"] : bf16[B, 16]
  %3 = weight[name="w"] : bf16[16, 4]
  %4 = input[name="conv_q", role="state"] : bf16[B, 16, 3]
  %5 = input[name="conv_k", role="state"] : bf16[B, 16, 3]
  %6 = input[name="conv_v", role="state"] : bf16[B, 16, 3]
  %7 = conv1d_update[bias=false](%0, %3, %4) : (bf16[B, 16], bf16[B, 16, 3])  #0
  %8 = conv1d_update[bias=false](%1, %3, %5) : (bf16[B, 16], bf16[B, 16, 3])  #0
  %9 = conv1d_update[bias=false](%2, %3, %6) : (bf16[B, 16], bf16[B, 16, 3])  #0
  %10 = silu(%7) : bf16[B, 16]  #0
  %11 = silu(%8) : bf16[B, 16]  #0
  %12 = silu(%9) : bf16[B, 16]  #0
  %13 = add(%10, %11) : bf16[B, 16]  #0
  %14 = add(%13, %12) : bf16[B, 16]  #0
  output "y" = %14
  output "conv_q" = %7.1
  output "conv_k" = %8.1
  output "conv_v" = %9.1
}
"#,
        );
        assert!(changed);
        assert_eq!(fused_names(&g), ["conv_silu", "conv_silu", "conv_silu"]);
    }

    #[test]
    fn gir_files_leave_no_conv_and_silu_apart() {
        for (name, g) in gir_files("fuse-conv") {
            let convs =
                g.node_ids().into_iter().filter(|n| matches!(g.op(*n), Op::Conv1d { .. } | Op::Conv1dUpdate { .. }));
            let lone: Vec<_> = convs.filter(|c| activation_of(&g, *c).is_some()).collect();
            assert!(lone.is_empty(), "{name}: unfused conv + silu at {lone:?}\n{g}");
        }
    }
}
