//! The dispatcher over the examples' programs: for every example in prefill, decode and train it never
//! panics, every kernel it generates prints to PTX deterministically, the group slots of every launch
//! rule name real program buffers (or listed scratch), and coverage stays at least what it was
//! measured at. With ptxas, the kernels of tiny-hybrid decode, nemotron-flash-1b decode and prefill and
//! gated-deltanet-hybrid decode assemble for sm_80 (`FLASHC_REQUIRE_PTXAS=1` turns a missing ptxas into a failure).

use flashc_codegen::kernels::ArgRule;
use flashc_codegen::kernels::dispatch::{self, DispatchError};
use flashc_codegen::ptx::{self, Options, Target, ptxas};
use flashc_compiler::gir::Mode;
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{pipeline, run_passes};
use flashc_compiler::schedule::{Program, schedule};

fn program(name: &str, mode: Mode) -> Program {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(format!("{name}.arch"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = flashc_dsl::load(&text).unwrap_or_else(|d| panic!("{name}: {d:?}")).0;
    let mut g = lower(&spec, &LowerOptions::new(mode)).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    run_passes(&mut g, &pipeline(mode), false, &mut |_, _| {}).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    schedule(&g).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"))
}

fn examples() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("examples/")
        .filter_map(|e| e.ok()?.path().file_name()?.to_str()?.strip_suffix(".arch").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// (generated groups, all groups) and every generated group's PTX modules, checked.
fn check(name: &str, mode: Mode) -> (usize, usize, Vec<(String, String)>) {
    let p = program(name, mode);
    let all = dispatch::generate_all(&p);
    let mut modules = Vec::new();
    let mut generated = 0;
    for (group, result) in &all {
        match result {
            Ok(d) => {
                generated += 1;
                assert!(!d.kernels.is_empty(), "{name} {mode:?} {}: no kernels", group.id);
                let scratch: Vec<_> = d.scratch.iter().map(|s| s.id).collect();
                for k in &d.kernels {
                    for a in &k.launch.args {
                        if let ArgRule::Buffer(b) | ArgRule::View(b, _) = a {
                            let known = group.inputs.contains(b) || group.outputs.contains(b) || scratch.contains(b);
                            assert!(known, "{name} {mode:?} {}: argument {b} is not a buffer of the group", group.id);
                        }
                    }
                    let text = ptx::write_string(&k.kernel, &Options::default())
                        .unwrap_or_else(|e| panic!("{name} {mode:?} {}: {e}", group.id));
                    let again = ptx::write_string(&k.kernel, &Options::default()).unwrap();
                    assert_eq!(text, again, "{name} {mode:?} {}: PTX is not deterministic", group.id);
                    modules.push((k.kernel.name.clone(), text));
                }
            }
            Err(DispatchError::Unsupported { group: g, reason, .. }) => {
                assert!(!reason.is_empty() && g.contains(&group.name), "{name} {mode:?}: {g}: {reason}");
            }
        }
    }
    // Generating twice gives the same kernels.
    let again = dispatch::generate_all(&p);
    for ((_, a), (_, b)) in all.iter().zip(&again) {
        assert_eq!(a, b, "{name} {mode:?}: dispatch is not deterministic");
    }
    (generated, all.len(), modules)
}

#[test]
fn every_example_dispatches_without_panicking() {
    for name in examples() {
        for mode in [Mode::Prefill, Mode::Decode, Mode::Train] {
            let (n, m, _) = check(&name, mode);
            println!("{name:<28} {:<8} {n:>4} of {m:>4} kernel groups generated", mode.name());
        }
    }
}

/// Coverage lower bounds, as last measured (raise them when a generator lands).
#[test]
fn coverage_does_not_regress() {
    let expect = [
        ("tiny-hybrid", Mode::Decode, 18, 47),
        ("tiny-hybrid", Mode::Prefill, 23, 62),
        ("nemotron-flash-1b", Mode::Decode, 90, 93),
        ("nemotron-flash-1b", Mode::Prefill, 113, 126),
        ("gated-deltanet-hybrid", Mode::Decode, 91, 98),
        ("qwen3-0.6b", Mode::Decode, 169, 198),
        ("qwen3-0.6b", Mode::Prefill, 169, 198),
    ];
    for (name, mode, at_least, total) in expect {
        let (n, m, _) = check(name, mode);
        assert_eq!(m, total, "{name} {mode:?}: kernel group count changed");
        assert!(n >= at_least, "{name} {mode:?}: {n} of {m} groups generated, expected at least {at_least}");
    }
}

#[test]
fn kernels_assemble_for_sm80() {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!("SKIPPED: ptxas not found (scripts/install-ptxas.sh)");
        return;
    }
    for (name, mode) in [
        ("tiny-hybrid", Mode::Decode),
        ("nemotron-flash-1b", Mode::Decode),
        ("nemotron-flash-1b", Mode::Prefill),
        ("gated-deltanet-hybrid", Mode::Decode),
    ] {
        let p = program(name, mode);
        let mut seen = std::collections::BTreeSet::new();
        for (group, result) in dispatch::generate_all(&p) {
            let Ok(d) = result else { continue };
            for k in &d.kernels {
                let text = ptx::write_string(&k.kernel, &Options { target: Target::Sm80 })
                    .unwrap_or_else(|e| panic!("{name} {}: {e}", group.id));
                // Kernels that differ only in their group are assembled once.
                let body: String = text.lines().filter(|l| !l.contains(&k.kernel.name)).collect();
                if !seen.insert(body) {
                    continue;
                }
                let r = ptxas::assemble(&text, "sm_80")
                    .unwrap_or_else(|e| panic!("{name} {} {}:\n{e}\n--- PTX ---\n{text}", group.id, k.kernel.name));
                println!(
                    "{name} {:<40} {:>3} registers {:>3} spill stores",
                    k.kernel.name, r.registers, r.spill_stores
                );
            }
        }
    }
}
