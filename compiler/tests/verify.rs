//! Verifier tests: one hand-made broken graph per invariant of `verify.rs` (numbered as in its
//! module doc), each checked for a message that names the problem, and every graph of the pass
//! tests checked to verify before and after its passes.
//!
//! Broken graphs are written in the gir text form where the parser accepts them; the parser refuses
//! operands and outputs that name missing values, so those are built with the `Graph` API.

mod common;

use flashc_compiler::gir::parse::parse;
use flashc_compiler::gir::{DType, Dim, Graph, NodeId, Op, TensorType, Value};
use flashc_compiler::passes::run_passes;
use flashc_compiler::verify::verify;

use common::{cases, read_case};

fn graph(text: &str) -> Graph {
    parse(text).unwrap_or_else(|e| panic!("test graph does not parse: {e}\n{text}"))
}

/// Checks that `g` fails verification with exactly the errors `expect` (each given in full or in
/// part), in order.
fn check(g: &Graph, expect: &[&str]) {
    let errors = verify(g).err().unwrap_or_default();
    let matches = errors.len() == expect.len() && errors.iter().zip(expect).all(|(e, x)| e.contains(x));
    assert!(matches, "expected errors {expect:#?}, found {errors:#?}\nin\n{g}");
}

fn f32s(dims: &[i64]) -> TensorType {
    TensorType::new(DType::F32, dims.iter().map(|d| Dim::constant(*d)))
}

/// A small valid graph the API-built tests start from: `%0 = weight`, `%1 = exp(%0)`.
fn exp_graph() -> Graph {
    graph("gir @t {\n  %0 = weight[name=\"x\"] : f32[4]\n  %1 = exp(%0) : f32[4]\n  output \"y\" = %1\n}\n")
}

#[test]
fn the_base_graphs_verify() {
    assert_eq!(verify(&exp_graph()), Ok(()));
    assert_eq!(verify(&graph(DECODE)), Ok(()));
}

// ------------------------------------------------------------------ 1. acyclic

#[test]
fn a_cycle() {
    // The text form only reads values defined above, so the cycle is closed through the API.
    let mut g = graph(
        "gir @t {
  %0 = weight[name=\"x\"] : f32[4]
  %1 = add(%0, %0) : f32[4]
  %2 = exp(%1) : f32[4]
  output \"y\" = %2
}
",
    );
    g.set_operand(NodeId(1), 1, NodeId(2).into());
    check(&g, &["the graph has a cycle through %1, %2"]);
}

// ------------------------------------------------------------------ 2. operands well formed

#[test]
fn an_operand_slot_gap() {
    let mut g = exp_graph();
    let n = g.add_typed(Op::Add, vec![f32s(&[4])], &[NodeId(0).into()]);
    g.set_operand(n, 2, NodeId(1).into());
    check(&g, &["%2: operand slots are not 0..2: found slot 2 at position 1"]);
}

#[test]
fn an_operand_naming_a_missing_result() {
    let mut g = exp_graph();
    g.add_typed(Op::Silu, vec![f32s(&[4])], &[Value::new(NodeId(1), 1)]);
    check(&g, &["%2: operand 0 reads %1.1, which does not exist"]);
}

// ------------------------------------------------------------------ 3. types agree

#[test]
fn a_wrong_result_type() {
    let g = graph(
        "gir @t {
  %0 = weight[name=\"x\"] : f32[4]
  %1 = exp(%0) : f32[8]
  output \"y\" = %1
}
",
    );
    check(&g, &["%1: `exp` should have type (f32[4]), but is typed (f32[8])"]);
}

#[test]
fn operands_the_op_does_not_accept() {
    let g = graph(
        "gir @t {
  %0 = weight[name=\"x\"] : f32[4]
  %1 = weight[name=\"y\"] : f32[3]
  %2 = add(%0, %1) : f32[4]
  output \"y\" = %2
}
",
    );
    check(&g, &["%2: `add`: shapes f32[4] and f32[3] do not broadcast"]);
}

#[test]
fn a_leaf_with_two_types() {
    let g = graph("gir @t {\n  %0 = weight[name=\"x\"] : (f32[4], f32[4])\n  output \"y\" = %0\n}\n");
    check(&g, &["%0: `weight`: `weight` needs exactly one declared type"]);
}

// ------------------------------------------------------------------ 4. boundary

#[test]
fn a_duplicate_input_name() {
    let g = graph(
        "gir @t {
  %0 = input[name=\"tokens\", role=\"tokens\"] : i32[B, T]
  %1 = input[name=\"tokens\", role=\"lens\"] : i32[B]
  output \"y\" = %1
}
",
    );
    check(&g, &["%1: input \"tokens\" is also defined by %0"]);
}

#[test]
fn a_param_outside_a_fused_body() {
    let g = graph("gir @t {\n  %0 = input[name=\"p0\", role=\"param\", index=0] : f32[4]\n  output \"y\" = %0\n}\n");
    check(&g, &["%0: a `param` input outside a fused body"]);
}

#[test]
fn an_output_naming_a_missing_value() {
    let mut g = exp_graph();
    g.set_output("z", NodeId(7).into());
    check(&g, &["output \"z\" names %7, which does not exist"]);
    let mut g = exp_graph();
    g.set_output("z", Value::new(NodeId(1), 1));
    check(&g, &["output \"z\" names %1.1, which does not exist"]);
}

// ------------------------------------------------------------------ 5. state threading

#[test]
fn a_state_input_without_its_output() {
    let g = graph(
        "gir @t mode=decode {
  %0 = input[name=\"conv\", role=\"state\"] : f32[B, 4, 3]
  %1 = exp(%0) : f32[B, 4, 3]
  output \"y\" = %1
}
",
    );
    check(&g, &["%0: state \"conv\" has no output of the same name"]);
}

#[test]
fn a_state_output_of_another_type() {
    let g = graph(
        "gir @t mode=decode {
  %0 = input[name=\"conv\", role=\"state\"] : f32[B, 4, 3]
  %1 = convert[dtype=\"bf16\"](%0) : bf16[B, 4, 3]
  output \"conv\" = %1
}
",
    );
    check(&g, &["%0: state \"conv\" changes type between input and output"]);
}

// ------------------------------------------------------------------ 6. in-place updates ordered

/// A decode step writing one key into a cache; the tests below add a broken line before the outputs.
const DECODE: &str = "gir @t mode=decode {
  %0 = input[name=\"tokens\", role=\"tokens\"] : i32[B, 1]
  %1 = input[name=\"start\", role=\"start\"] : i32[B]
  %2 = input[name=\"kcache\", role=\"state\"] : f32[B, 4, 1, 2]
  %3 = weight[name=\"embed\"] : f32[16, 2]
  %4 = embed(%3, %0) : f32[B, 1, 2]
  %5 = reshape[shape=[B, 1, 1, 2]](%4) : f32[B, 1, 1, 2]
  %6 = kv_write(%2, %5, %1) : f32[B, 4, 1, 2]
  output \"kcache\" = %6
}
";

fn decode_with(lines: &str) -> Graph {
    let text = DECODE.replace("  output \"kcache\"", &format!("{lines}  output \"kcache\""));
    graph(&text)
}

#[test]
fn a_state_read_after_its_update() {
    // %7 reads the old cache, but nothing orders it before the `kv_write` that overwrites it.
    let g = decode_with("  %7 = scale[factor=2.0](%2) : f32[B, 4, 1, 2]\n  output \"y\" = %7\n");
    check(&g, &["%6: %7 reads %2 but is not ordered before %6, which updates it in place"]);
}

#[test]
fn a_state_read_ordered_before_its_update_is_fine() {
    // The same read, feeding the new keys, runs before the write.
    let g = graph(
        "gir @t mode=decode {
  %0 = input[name=\"start\", role=\"start\"] : i32[B]
  %1 = input[name=\"kcache\", role=\"state\"] : f32[B, 4, 1, 2]
  %2 = scale[factor=2.0](%1) : f32[B, 4, 1, 2]
  %3 = slice[axis=1, start=<0>, len=<1>](%2) : f32[B, 1, 1, 2]
  %4 = kv_write(%1, %3, %0) : f32[B, 4, 1, 2]
  output \"kcache\" = %4
}
",
    );
    assert_eq!(verify(&g), Ok(()));
}

#[test]
fn two_in_place_updates_of_one_value() {
    let g = decode_with("  %7 = kv_write(%2, %5, %1) : f32[B, 4, 1, 2]\n  output \"y\" = %7\n");
    // The second write also reads %2 without being ordered before the first.
    check(
        &g,
        &[
            "%6: %7 reads %2 but is not ordered before %6, which updates it in place",
            "%7: %2 is updated in place by both %6 and %7",
        ],
    );
}

#[test]
fn a_stale_state_version_as_an_output() {
    let g = decode_with("  output \"old\" = %2\n");
    check(&g, &["%6: %2 is updated in place by %6 but is also a graph output (a stale version)"]);
}

// ------------------------------------------------------------------ 7. fused bodies well formed

/// A graph with one fused node whose operands, body and result type are given.
fn fused(operands: &str, result: &str, body: &str) -> Graph {
    graph(&format!(
        "gir @t {{
  %0 = weight[name=\"a\"] : f32[4]
  %1 = weight[name=\"b\"] : f32[4]
  %2 = fused[name=\"k\"]({operands}) : {result} {{
{body}    output \"0\" = %2
  }}
  output \"y\" = %2
}}
"
    ))
}

const BODY: &str = "    %0 = input[name=\"p0\", role=\"param\", index=0] : f32[4]
    %1 = input[name=\"p1\", role=\"param\", index=1] : f32[4]
    %2 = add(%0, %1) : f32[4]
";

#[test]
fn a_well_formed_fused_node_verifies() {
    assert_eq!(verify(&fused("%0, %1", "f32[4]", BODY)), Ok(()));
}

#[test]
fn fused_params_that_do_not_match_the_operands() {
    check(&fused("%0", "f32[4]", BODY), &["%2: `fused`: fused body takes 2 operand(s), found 1"]);
    // The body broadcasts a one-element second param, so it is well typed; the operand is not.
    let body = BODY.replace("index=1] : f32[4]", "index=1] : f32[1]");
    check(&fused("%0, %1", "f32[4]", &body), &["%2: `fused`: fused operand 1: body expects f32[1], found f32[4]"]);
}

#[test]
fn fused_results_that_do_not_match_the_body_outputs() {
    check(&fused("%0, %1", "f32[8]", BODY), &["%2: `fused` should have type (f32[4]), but is typed (f32[8])"]);
}

#[test]
fn fused_param_indices_with_a_gap() {
    let body = BODY.replace("index=1", "index=2");
    check(&fused("%0, %1", "f32[4]", &body), &["%2 (fused \"k\"): param indices are not 0..2"]);
}

#[test]
fn a_fused_body_with_a_non_param_input() {
    let body = BODY.replace("role=\"param\", index=1", "role=\"tokens\"");
    check(
        &fused("%0", "f32[4]", &body),
        &["%2 (fused \"k\"): %1: a fused body may only have `param` inputs, found role \"tokens\""],
    );
}

#[test]
fn a_broken_node_inside_a_fused_body_is_named_with_its_body() {
    let body = BODY.replace("add(%0, %1) : f32[4]", "add(%0, %1) : f32[2]");
    check(
        &fused("%0, %1", "f32[2]", &body),
        &["%2 (fused \"k\"): %2: `add` should have type (f32[4]), but is typed (f32[2])"],
    );
}

// ------------------------------------------------------------------ the pass tests

#[test]
fn every_pass_test_graph_verifies_before_and_after() {
    let paths = cases();
    assert!(!paths.is_empty(), "no pass tests found");
    for path in paths {
        let case = read_case(&path);
        let mut g = parse(&case.ir).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(errors) = verify(&g) {
            panic!("{}: the input does not verify:\n{}", path.display(), errors.join("\n"));
        }
        // Verification after every pass is on; the last pass's result is checked again here.
        run_passes(&mut g, &case.passes, true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(errors) = verify(&g) {
            panic!("{}: the output does not verify:\n{}", path.display(), errors.join("\n"));
        }
    }
}
