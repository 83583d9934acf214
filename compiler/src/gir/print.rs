//! print: the gir text form. `parse::parse` reads it back exactly (print ∘ parse ∘ print = print).
//!
//! ```text
//! gir @tiny mode=decode {
//!   %0 = input[name="tokens", role="tokens"] : i32[B, 1]
//!   %3 = rmsnorm[eps=1e-6](%2, %1) : bf16[B, 1, 128]  #0
//!   %7 = split[axis=2, sizes=[128, 64]](%6) : (bf16[B, 1, 128], bf16[B, 1, 64])
//!   %9 = fused[name="conv_silu"](%7.1, %8) : bf16[B, 1, 64] {
//!     %0 = input[name="p0", role="param", index=0] : bf16[B, 1, 64]
//!     ...
//!     output "0" = %2
//!   }
//!   output "logits" = %20
//! }
//! ```
//! Nodes print in topological order (lowest id first among ready nodes) under their real ids; `#N`
//! is the layer the node came from (the `origin` side table).

use std::fmt::Write as _;

use super::{Graph, Op};

/// The text form of a graph.
pub fn print(g: &Graph) -> String {
    let mut out = String::new();
    print_graph(g, 0, &mut out);
    out
}

fn print_graph(g: &Graph, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    let _ = write!(out, "gir @{}", g.name);
    if let Some(m) = g.mode {
        let _ = write!(out, " mode={}", m.name());
    }
    out.push_str(" {\n");
    print_body(g, indent + 1, out);
    let _ = writeln!(out, "{pad}}}");
}

fn print_body(g: &Graph, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    // A cyclic graph (only ever seen by the verifier) still prints, in id order.
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    for n in order {
        let Some(node) = g.node(n) else { continue };
        let _ = write!(out, "{pad}{n} = {}", node.op.name());
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(out, "[{}]", parts.join(", "));
        }
        let operands = g.operands(n);
        if !operands.is_empty() || !node.op.is_leaf() {
            let parts: Vec<String> = operands.iter().map(ToString::to_string).collect();
            let _ = write!(out, "({})", parts.join(", "));
        }
        out.push_str(" : ");
        if node.types.len() == 1 {
            let _ = write!(out, "{}", node.types[0]);
        } else {
            let parts: Vec<String> = node.types.iter().map(ToString::to_string).collect();
            let _ = write!(out, "({})", parts.join(", "));
        }
        if let Some(l) = g.origin.get(&n) {
            let _ = write!(out, "  #{l}");
        }
        if let Op::Fused(body) = &node.op {
            out.push_str(" {\n");
            print_body(&body.graph, indent + 1, out);
            let _ = write!(out, "{pad}}}");
        }
        out.push('\n');
    }
    for (name, v) in g.outputs() {
        let _ = writeln!(out, "{pad}output {name:?} = {v}");
    }
}
