//! Pass tests, one file each in `tests/passes/*.gir`: add a test by adding a file (the format is in
//! `common/mod.rs`). For each file the harness checks that the text parses and prints back
//! unchanged, runs the passes through `run_passes` with the verifier on after every pass, snapshots
//! the printed result, and, when every pass named is idempotent, checks that running them again
//! changes nothing and says so.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use flashc_compiler::gir::parse::parse;
use flashc_compiler::gir::{Graph, Op};
use flashc_compiler::passes::{Pass, canonicalize, run_passes};
use flashc_compiler::verify::verify;

use common::{cases, folder, read_case};

/// Passes that reach a fixed point in one run: running one again on its own result changes nothing.
const IDEMPOTENT: [Pass; 3] = [Pass::Dce, Pass::Cse, Pass::Canonicalize];

/// Parses a case, checks its round trip, runs its passes and returns the printed result.
fn check(path: &Path) -> String {
    let case = read_case(path);
    let mut g = parse(&case.ir).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(g.to_string(), case.ir, "{}: the text does not print back as written", path.display());
    if let Err(errors) = verify(&g) {
        panic!("{}: the input does not verify:\n{}", path.display(), errors.join("\n"));
    }
    run_passes(&mut g, &case.passes, true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let out = g.to_string();
    assert_eq!(
        parse(&out).map(|p| p.to_string()).as_deref(),
        Ok(out.as_str()),
        "{}: output round trip",
        path.display()
    );
    if case.passes.iter().all(|p| IDEMPOTENT.contains(p)) {
        check_stable(path, &mut g, &case.passes);
    }
    out
}

/// Runs the passes again on their own result: each must report no change and leave the text alone.
fn check_stable(path: &Path, g: &mut Graph, passes: &[Pass]) {
    let before = g.to_string();
    for pass in passes {
        let changed = pass.run(g).unwrap_or_else(|e| panic!("{}: second `{pass}`: {e}", path.display()));
        assert!(!changed, "{}: a second `{pass}` reports a change:\n{g}", path.display());
        assert_eq!(g.to_string(), before, "{}: a second `{pass}` changes the graph", path.display());
    }
}

#[test]
fn passes() {
    insta::glob!("passes/*.gir", |path| {
        insta::assert_snapshot!(check(path));
    });
}

fn file_names() -> BTreeSet<String> {
    cases().iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect()
}

#[test]
fn every_canonicalize_rule_has_a_test() {
    let files = file_names();
    let missing: Vec<&str> = canonicalize::RULES
        .iter()
        .map(|r| r.name)
        .filter(|n| !files.contains(&format!("canonicalize-{n}.gir")))
        .collect();
    assert!(missing.is_empty(), "rules without a `tests/passes/canonicalize-<rule>.gir`: {missing:?}");
}

#[test]
fn canonicalize_rules_have_distinct_names_and_identities() {
    let names: BTreeSet<&str> = canonicalize::RULES.iter().map(|r| r.name).collect();
    assert_eq!(names.len(), canonicalize::RULES.len());
    for rule in canonicalize::RULES {
        assert!(rule.identity.contains("=="), "rule `{}` states no identity: {:?}", rule.name, rule.identity);
    }
}

/// Every op kind, numbered; the match has no wildcard, so a new `Op` variant does not compile until
/// it gets a number here and a node in `roundtrip-all-ops.gir`.
fn op_kind(op: &Op) -> usize {
    match op {
        Op::Input { .. } => 0,
        Op::Weight { .. } => 1,
        Op::Zeros => 2,
        Op::Embed => 3,
        Op::MetaPrefix => 4,
        Op::Reshape { .. } => 5,
        Op::Slice { .. } => 6,
        Op::Concat { .. } => 7,
        Op::Split { .. } => 8,
        Op::Convert { .. } => 9,
        Op::MatMul { .. } => 10,
        Op::Add => 11,
        Op::Mul => 12,
        Op::Scale { .. } => 13,
        Op::Silu => 14,
        Op::Softplus => 15,
        Op::Exp => 16,
        Op::Sigmoid => 17,
        Op::Neg => 18,
        Op::Relu2 => 19,
        Op::Gelu => 20,
        Op::Swiglu => 21,
        Op::Clamp { .. } => 22,
        Op::RmsNorm { .. } => 23,
        Op::L2Norm { .. } => 24,
        Op::GatedRmsNorm { .. } => 25,
        Op::RowNormLogits => 26,
        Op::Rope { .. } => 27,
        Op::Conv1d { .. } => 28,
        Op::Conv1dUpdate { .. } => 29,
        Op::KvWrite => 30,
        Op::AttentionPrefill { .. } => 31,
        Op::AttentionDecode { .. } => 32,
        Op::SsdScan { .. } => 33,
        Op::SsdStep => 34,
        Op::DeltaScan { .. } => 35,
        Op::DeltaStep { .. } => 36,
        Op::CrossEntropy => 37,
        Op::Fused(_) => 38,
        Op::RowInvNorm => 39,
    }
}

const OP_KINDS: usize = 40;

fn collect_kinds(g: &Graph, kinds: &mut BTreeSet<usize>) {
    for n in g.node_ids() {
        let op = g.op(n);
        kinds.insert(op_kind(op));
        if let Op::Fused(body) = op {
            collect_kinds(&body.graph, kinds);
        }
    }
}

#[test]
fn roundtrip_file_has_every_op_kind() {
    let case = read_case(&folder().join("roundtrip-all-ops.gir"));
    assert!(case.passes.is_empty(), "the round-trip file runs no passes");
    let g = parse(&case.ir).expect("roundtrip-all-ops.gir parses");
    let mut kinds = BTreeSet::new();
    collect_kinds(&g, &mut kinds);
    let missing: Vec<usize> = (0..OP_KINDS).filter(|k| !kinds.contains(k)).collect();
    assert!(missing.is_empty(), "op kinds (numbered as in `op_kind`) missing from the file: {missing:?}");
}

/// Every clean-up pass, alone and in pipeline order, on every test graph (whatever passes the file
/// names): the verifier holds after each pass, and a second run changes nothing.
#[test]
fn cleanup_passes_on_every_test_graph() {
    let runs: [&[Pass]; 4] =
        [&[Pass::Canonicalize], &[Pass::Cse], &[Pass::Dce], &[Pass::Canonicalize, Pass::Cse, Pass::Dce]];
    for path in cases() {
        for passes in runs {
            let mut g = parse(&read_case(&path).ir).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            run_passes(&mut g, passes, true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            check_stable(&path, &mut g, passes);
        }
    }
}
