//! The dispatcher over the examples' programs: for every example in prefill, decode and train it never
//! panics, every kernel it generates prints to PTX deterministically, the group slots of every launch
//! rule name real program buffers (or listed scratch), and coverage stays at least what it was
//! measured at. `tiny-hybrid-bf16` is tiny-hybrid with bf16 storage (the GPU generators are bf16
//! first; the example itself is f32). With ptxas, every distinct kernel of every example in every
//! mode (and of tiny-hybrid-bf16) assembles for sm_80 and sm_90 without spills in the decode and
//! GEMM/GEMV kernels (`FLASHC_REQUIRE_PTXAS=1` turns a missing ptxas into a failure).

use flashc_codegen::kernels::ArgRule;
use flashc_codegen::kernels::dispatch::{self, DispatchError};
use flashc_codegen::ptx::{self, Options, Target, ptxas};
use flashc_compiler::gir::Mode;
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{pipeline, run_passes};
use flashc_compiler::schedule::{Program, schedule};

/// The program of example `name` (`NAME-bf16`: the example with bf16 storage) in `mode`.
fn program(name: &str, mode: Mode) -> Program {
    let (file, bf16) = match name.strip_suffix("-bf16") {
        Some(f) => (f, true),
        None => (name, false),
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(format!("{file}.arch"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut spec = flashc_dsl::load(&text).unwrap_or_else(|d| panic!("{name}: {d:?}")).0;
    if bf16 {
        spec.dtype = flashc_dsl::spec::DType::Bf16;
    }
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
    for name in examples().into_iter().chain(["tiny-hybrid-bf16".to_string()]) {
        for mode in [Mode::Prefill, Mode::Decode, Mode::Train] {
            let (n, m, _) = check(&name, mode);
            println!("{name:<28} {:<8} {n:>4} of {m:>4} kernel groups generated", mode.name());
        }
    }
}

/// Coverage lower bounds, as last measured (raised with each new generator).
#[test]
fn coverage_does_not_regress() {
    let expect = [
        ("gated-deltanet-hybrid", Mode::Prefill, 128, 128),
        ("gated-deltanet-hybrid", Mode::Decode, 98, 98),
        ("gated-deltanet-hybrid", Mode::Train, 111, 129),
        ("hybrid-100m", Mode::Prefill, 104, 104),
        ("hybrid-100m", Mode::Decode, 78, 78),
        ("hybrid-100m", Mode::Train, 91, 105),
        ("nemotron-flash-1b", Mode::Prefill, 126, 126),
        ("nemotron-flash-1b", Mode::Decode, 93, 93),
        ("nemotron-flash-1b", Mode::Train, 109, 127),
        ("nemotron-flash-3b", Mode::Prefill, 187, 187),
        ("nemotron-flash-3b", Mode::Decode, 138, 138),
        ("nemotron-flash-3b", Mode::Train, 161, 188),
        ("nemotronh-hybrid", Mode::Prefill, 234, 234),
        ("nemotronh-hybrid", Mode::Decode, 186, 186),
        ("nemotronh-hybrid", Mode::Train, 211, 235),
        ("qwen3-0.6b", Mode::Prefill, 198, 198),
        ("qwen3-0.6b", Mode::Decode, 198, 198),
        ("qwen3-0.6b", Mode::Train, 199, 199),
        ("tiny-hybrid", Mode::Prefill, 23, 62),
        ("tiny-hybrid", Mode::Decode, 18, 47),
        ("tiny-hybrid", Mode::Train, 24, 63),
        ("tiny-hybrid-bf16", Mode::Prefill, 62, 62),
        ("tiny-hybrid-bf16", Mode::Decode, 47, 47),
        ("tiny-hybrid-bf16", Mode::Train, 55, 63),
    ];
    for (name, mode, at_least, total) in expect {
        let (n, m, _) = check(name, mode);
        assert_eq!(m, total, "{name} {mode:?}: kernel group count changed");
        assert!(n >= at_least, "{name} {mode:?}: {n} of {m} groups generated, expected at least {at_least}");
    }
}

/// Every distinct kernel of every example in every mode (and of tiny-hybrid-bf16) assembles for
/// sm_80 and sm_90 (kernels that differ only in their group's name are assembled once per target),
/// and the hot kernels — every decode kernel, the GEMM / GEMV projections, the norms — have no spills.
#[test]
fn every_kernel_assembles_for_sm80_and_sm90() {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!("SKIPPED: ptxas not found (scripts/install-ptxas.sh)");
        return;
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut spills = Vec::new();
    for name in examples().into_iter().chain(["tiny-hybrid-bf16".to_string()]) {
        for mode in [Mode::Prefill, Mode::Decode, Mode::Train] {
            let p = program(&name, mode);
            for (group, result) in dispatch::generate_all(&p) {
                let Ok(d) = result else { continue };
                for k in &d.kernels {
                    for target in [Target::Sm80, Target::Sm90] {
                        let arch = target.arch().expect("a concrete target");
                        let text = ptx::write_string(&k.kernel, &Options { target })
                            .unwrap_or_else(|e| panic!("{name} {mode:?} {}: {e}", group.id));
                        let body: String = text.lines().filter(|l| !l.contains(&k.kernel.name)).collect();
                        if !seen.insert((arch, body)) {
                            continue;
                        }
                        let r = ptxas::assemble(&text, arch).unwrap_or_else(|e| {
                            panic!("{name} {mode:?} {} {} ({arch}):\n{e}\n--- PTX ---\n{text}", group.id, k.kernel.name)
                        });
                        println!(
                            "{arch} {name:<22} {:<8} {:<48} {:>3} registers {:>4} spill stores",
                            mode.name(),
                            k.kernel.name,
                            r.registers,
                            r.spill_stores
                        );
                        let hot = mode == Mode::Decode || group.name.contains("matmul") || group.name.contains("norm");
                        if hot && (r.spill_stores > 0 || r.spill_loads > 0) {
                            spills.push(format!(
                                "{arch} {name} {mode:?} {}: {} spill stores",
                                k.kernel.name, r.spill_stores
                            ));
                        }
                    }
                }
            }
        }
    }
    println!("{} distinct kernel modules assembled", seen.len());
    assert!(spills.is_empty(), "hot kernels spill:\n{}", spills.join("\n"));
}
