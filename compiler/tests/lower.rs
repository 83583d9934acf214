//! Lowering every example in every mode gives a graph the verifier accepts, deterministically.

use flashc_compiler::gir::Mode;
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::verify::verify;

fn examples() -> Vec<(String, flashc_dsl::ModelSpec)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "arch"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let src = std::fs::read_to_string(&p).expect("read example");
            let (spec, _) = flashc_dsl::load(&src).unwrap_or_else(|d| panic!("{}: {d:?}", p.display()));
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), spec)
        })
        .collect()
}

#[test]
fn every_example_lowers_and_verifies_in_every_mode() {
    for (name, spec) in examples() {
        for mode in Mode::ALL {
            let g = lower(&spec, &LowerOptions::new(mode)).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
            if let Err(errs) = verify(&g) {
                panic!("{name} {mode:?}:\n{}\n{g}", errs.join("\n"));
            }
            let again = lower(&spec, &LowerOptions::new(mode)).expect("lower");
            assert_eq!(g.to_string(), again.to_string(), "{name} {mode:?} is not deterministic");
            let parsed = flashc_compiler::gir::parse::parse(&g.to_string()).expect("parse back");
            assert_eq!(parsed.to_string(), g.to_string(), "{name} {mode:?} does not round-trip");
        }
    }
}

#[test]
fn lowered_weights_are_exactly_the_manifest() {
    use flashc_compiler::gir::Op;
    for (name, spec) in examples() {
        let manifest: std::collections::BTreeMap<String, Vec<u64>> =
            flashc_dsl::manifest::manifest(&spec).into_iter().map(|t| (t.name, t.shape)).collect();
        for mode in Mode::ALL {
            let g = lower(&spec, &LowerOptions::new(mode)).expect("lower");
            let mut seen = std::collections::BTreeMap::new();
            for n in g.node_ids() {
                if let Op::Weight { name: w } = g.op(n) {
                    let shape: Vec<u64> = g
                        .ty(n.into())
                        .expect("type")
                        .shape
                        .iter()
                        .map(|d| d.as_const().expect("const") as u64)
                        .collect();
                    seen.insert(w.clone(), shape);
                }
            }
            // Every weight the graph reads is in the manifest with the same shape; in the modes that
            // run the whole model, every manifest tensor is read (meta tokens are not read in decode).
            for (w, shape) in &seen {
                assert_eq!(manifest.get(w), Some(shape), "{name} {mode:?}: weight {w}");
            }
            let missing: Vec<&String> = manifest
                .keys()
                .filter(|w| {
                    let unread_in_decode = mode == Mode::Decode && *w == "meta_tokens";
                    !seen.contains_key(*w) && !unread_in_decode
                })
                .collect();
            assert!(missing.is_empty(), "{name} {mode:?}: manifest tensors never read: {missing:?}");
        }
    }
}
