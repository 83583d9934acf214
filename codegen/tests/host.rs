//! The host schedule: for every example in every mode, the JIT-compiled schedule issues exactly the
//! launches of the plan interpreter (order, grids, blocks, shared memory, argument values, final
//! status) for many sizes, including empty work (T = 0) and sizes that overflow; generated launch
//! rules of every shape; the error paths of the launch callback; the CLIF text of the tiny example,
//! snapshotted.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::c_void;
use std::time::Instant;

use flashc_codegen::host::abi::{self, LaunchRecord};
use flashc_codegen::host::plan::{Arg, GroupRules, RuleSource, StorageClass};
use flashc_codegen::host::{
    self, Dims, HostSchedule, LaunchPlan, Launched, Options, OwnedLaunch, Phase, RunError, Target, interpret,
};
use flashc_codegen::kernels::{ArgRule, LaunchRule, dispatch};
use flashc_compiler::gir::{Dim, Mode};
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{pipeline, run_passes};
use flashc_compiler::schedule::{BufferId, KernelId, Launch, Program, schedule};

fn example_paths() -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "arch"))
        .collect();
    files.sort();
    files
}

fn load(name: &str) -> flashc_dsl::ModelSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(format!("{name}.arch"));
    let src = std::fs::read_to_string(&path).expect("read example");
    flashc_dsl::load(&src).unwrap_or_else(|d| panic!("{}: {d:?}", path.display())).0
}

/// Lower, run the standard pipeline with verification after every pass, schedule.
fn program(name: &str, spec: &flashc_dsl::ModelSpec, mode: Mode) -> Program {
    let mut g = lower(spec, &LowerOptions::new(mode)).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    run_passes(&mut g, &pipeline(mode), true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    schedule(&g).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"))
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    fn upto(&mut self, max: u64) -> u64 {
        if max == u64::MAX { self.next() } else { self.next() % (max + 1) }
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.upto(xs.len() as u64 - 1) as usize]
    }
}

/// Sizes to run at: fixed corner cases, then random ones of every magnitude.
fn sizes(rng: &mut Rng, count: usize) -> Vec<Dims> {
    let mut out = vec![
        Dims::new(1, 1, 0),
        Dims::new(1, 0, 0),
        Dims::new(0, 1, 0),
        Dims::new(4, 0, 17),
        Dims::new(2, 7, 5),
        Dims::new(3, 300, 1000),
        Dims::new(64, 4096, 32768),
        Dims::new(1 << 20, 1 << 20, 1 << 31),
        Dims::new(i64::MAX, 1, 1),
        Dims::new(1, i64::MAX, 0),
        Dims::new(-1, 1, 0),
        Dims::new(1, 1, -5),
    ];
    while out.len() < count {
        let magnitude = *rng.pick(&[8u64, 300, 5000, 1 << 20, 1 << 32, 1 << 62]);
        let b = rng.upto(magnitude.min(1 << 40)) as i64;
        let t = if rng.upto(3) == 0 { 0 } else { rng.upto(magnitude) as i64 };
        let s = rng.upto(magnitude) as i64;
        out.push(Dims::new(b, t, s));
    }
    out
}

/// Random base pointers (below 2^48, 256-aligned, like device addresses).
fn bases(rng: &mut Rng, n: usize) -> Vec<u64> {
    (0..n).map(|_| rng.upto((1 << 48) - 1) & !255).collect()
}

type Outcome = (Vec<OwnedLaunch>, Result<(), RunError<Infallible>>);

fn interpreted(plan: &LaunchPlan, phase: Phase, dims: &Dims, bases: &[u64]) -> Outcome {
    let mut seen = Vec::new();
    let r = interpret(plan, phase, dims, bases, &mut |l: &Launched<'_>| {
        seen.push(l.owned());
        Ok::<(), Infallible>(())
    });
    (seen, r)
}

fn native(s: &HostSchedule, phase: Phase, dims: &Dims, bases: &[u64]) -> Outcome {
    let mut seen = Vec::new();
    let r = s.run(phase, dims, bases, &mut |l: &Launched<'_>| {
        seen.push(l.owned());
        Ok::<(), Infallible>(())
    });
    (seen, r)
}

/// Runs the plan both ways at every size and compares; returns (launches, skips, errors) seen.
fn check_plan(what: &str, plan: &LaunchPlan, rng: &mut Rng, count: usize) -> (usize, usize, usize) {
    let s = host::compile(plan).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (mut launched, mut skipped, mut errors) = (0, 0, 0);
    for dims in sizes(rng, count) {
        let b = bases(rng, plan.slots.len());
        for phase in Phase::ALL {
            let want = interpreted(plan, phase, &dims, &b);
            let got = native(&s, phase, &dims, &b);
            if got != want {
                let first = got.0.iter().zip(&want.0).position(|(g, w)| g != w);
                panic!(
                    "{what} {phase:?} at {dims:?}: the native schedule differs from the interpreter\n\
                     first differing launch: {first:?}\nnative: {} launches, {:?}\ninterpreter: {} launches, {:?}\n\
                     native at it: {:?}\ninterpreter at it: {:?}",
                    got.0.len(),
                    got.1,
                    want.0.len(),
                    want.1,
                    first.map(|i| &got.0[i]),
                    first.map(|i| &want.0[i]),
                );
            }
            launched += want.0.len();
            if want.1.is_ok() {
                skipped += plan.sequence(phase).launches.len() - want.0.len();
            } else {
                errors += 1;
            }
        }
    }
    (launched, skipped, errors)
}

#[test]
fn native_schedule_matches_the_interpreter_on_every_example() {
    let mut rng = Rng(0x5eed);
    let paths = example_paths();
    assert!(paths.len() >= 5, "expected the examples, found {paths:?}");
    for path in paths {
        let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let spec = load(&name);
        for mode in Mode::ALL {
            let p = program(&name, &spec, mode);
            let plan = host::plan(&p, &BTreeMap::new()).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
            assert_eq!(plan.step.launches.len(), p.kernels.len());
            assert_eq!(plan.prep.launches.len(), p.prep.len());
            let (launched, skipped, errors) = check_plan(&format!("{name} {mode:?}"), &plan, &mut rng, 40);
            assert!(launched > 0 && errors > 0, "{name} {mode:?}: the sizes exercise launches and errors");
            if mode != Mode::Decode {
                assert!(skipped > 0, "{name} {mode:?}: T = 0 skips kernels");
            }
            // With the generated kernels' rules (several kernels per group, scratch slots).
            let rules: BTreeMap<KernelId, GroupRules> = dispatch::generate_all(&p)
                .into_iter()
                .filter_map(|(k, d)| d.ok().map(|d| (k.id, GroupRules::from(&d))))
                .collect();
            let plan = host::plan(&p, &rules).unwrap_or_else(|e| panic!("{name} {mode:?} generated: {e}"));
            let parts: usize = rules.values().map(|r| r.kernels.len()).sum::<usize>()
                + p.kernels.iter().chain(&p.prep).filter(|k| !rules.contains_key(&k.id)).count();
            assert_eq!(plan.step.launches.len() + plan.prep.launches.len(), parts, "{name} {mode:?}");
            let scratch: usize = rules.values().map(|r| r.scratch.len()).sum();
            assert_eq!(plan.slots.iter().filter(|s| s.class == StorageClass::Scratch).count(), scratch);
            check_plan(&format!("{name} {mode:?} generated"), &plan, &mut rng, 20);
        }
    }
}

/// The default launch: every input and output buffer, then the sizes; buffers resolve to their
/// root's slot and offset.
#[test]
fn default_launch_passes_buffers_then_sizes() {
    let p = program("tiny-hybrid", &load("tiny-hybrid"), Mode::Decode);
    let plan = host::plan(&p, &BTreeMap::new()).expect("plan");
    for (l, k) in plan.step.launches.iter().zip(&p.kernels) {
        assert_eq!(l.kernel, k.id);
        assert_eq!(l.source, RuleSource::Default);
        let buffers: Vec<_> = l
            .args
            .iter()
            .filter_map(|a| match a {
                Arg::Address { buffer, .. } => Some(*buffer),
                _ => None,
            })
            .collect();
        let expected: Vec<_> = k.inputs.iter().chain(&k.outputs).copied().collect();
        assert_eq!(buffers, expected, "{}", k.id);
        let sizes = match k.launch {
            Launch::Elements { .. } => 1,
            Launch::Rows { .. } => 2,
            _ => 4,
        };
        assert_eq!(l.args.len(), expected.len() + sizes, "{}", k.id);
        assert!(l.args[expected.len()..].iter().all(|a| matches!(a, Arg::Size(_))));
        for a in &l.args[..expected.len()] {
            let Arg::Address { buffer, slot, offset } = a else { unreachable!() };
            let root = p.buffers[p.buffers[buffer.0 as usize].root().0 as usize].clone();
            if root.kind.in_arena() {
                assert_eq!(*slot, 0);
                assert_eq!(Some(&offset.dim), root.offset.as_ref());
            } else {
                assert_eq!(plan.slots[*slot as usize].buffer, Some(root.id));
                assert_eq!(offset.dim, Dim::constant(0));
            }
        }
    }
}

/// Generated launch rules of every shape: constant, symbolic, negative and out-of-range grids and
/// sizes, constants of both kinds, shared memory and blocks.
#[test]
fn generated_rules_match_the_interpreter() {
    let mut rng = Rng(42);
    let dims: Vec<Dim> = [
        "1",
        "0",
        "7",
        "B",
        "B*T",
        "T - 1",
        "S + T",
        "2*B*S - 3",
        "B*T*S",
        "T*T + 5",
        "-1",
        "4294967295",
        "4294967296",
        "65536*B*T",
        "S*S*B",
    ]
    .iter()
    .map(|s| Dim::parse(s).expect("dim"))
    .collect();
    for mode in Mode::ALL {
        let p = program("tiny-hybrid", &load("tiny-hybrid"), mode);
        for round in 0..4 {
            let mut rules = BTreeMap::new();
            for k in p.prep.iter().chain(&p.kernels) {
                if rng.upto(4) == 0 {
                    continue; // keep some default launches
                }
                let grid_dim = |rng: &mut Rng| {
                    // Mostly launchable grids, sometimes empty or out of range.
                    if rng.upto(2) == 0 { rng.pick(&dims).clone() } else { rng.pick(&dims[..6]).clone() }
                };
                // Up to two scratch buffers, placeholder ids past the program's buffers.
                let scratch: Vec<(BufferId, String, Dim)> = (0..rng.upto(3))
                    .map(|i| {
                        (BufferId((p.buffers.len() + i as usize) as u32), format!("s{i}"), rng.pick(&dims).clone())
                    })
                    .collect();
                let mut kernels = Vec::new();
                for _ in 0..1 + rng.upto(3) {
                    let grid = [grid_dim(&mut rng), grid_dim(&mut rng), grid_dim(&mut rng)];
                    let mut args = Vec::new();
                    for _ in 0..rng.upto(12) {
                        args.push(match rng.upto(6) {
                            0 => ArgRule::Size(rng.pick(&dims).clone()),
                            1 => ArgRule::U32(rng.next() as u32),
                            2 => ArgRule::F32(f32::from_bits(rng.next() as u32)),
                            3 => ArgRule::View(*rng.pick(&k.inputs), rng.pick(&dims[..6]).clone()),
                            4 if !scratch.is_empty() => ArgRule::Buffer(rng.pick(&scratch).0),
                            _ => ArgRule::Buffer(*rng.pick(&k.inputs)),
                        });
                    }
                    let block = [1 + rng.upto(1023) as u32, 1 + rng.upto(3) as u32, 1];
                    kernels.push(LaunchRule { grid, block, dynamic_shared: rng.upto(1 << 16) as u32, args });
                }
                rules.insert(k.id, GroupRules { kernels, scratch });
            }
            let plan = host::plan(&p, &rules).expect("plan");
            assert!(plan.step.launches.iter().any(|l| l.source == RuleSource::Generated));
            assert!(plan.step.launches.iter().any(|l| l.part > 0), "some groups are several kernels");
            assert!(
                plan.slots.iter().any(|s| s.class == StorageClass::Scratch)
                    || rules.values().all(|r| r.scratch.is_empty())
            );
            check_plan(&format!("tiny-hybrid {mode:?} rules #{round}"), &plan, &mut rng, 40);
        }
    }
}

#[test]
fn a_rule_for_an_unknown_kernel_is_an_error() {
    let p = program("tiny-hybrid", &load("tiny-hybrid"), Mode::Decode);
    let rule = LaunchRule {
        grid: [Dim::constant(1), Dim::constant(1), Dim::constant(1)],
        block: [1, 1, 1],
        dynamic_shared: 0,
        args: vec![],
    };
    let err = host::plan(&p, &BTreeMap::from([(KernelId(9999), GroupRules::one(rule.clone()))])).unwrap_err();
    assert!(err.to_string().contains("k9999"), "{err}");
    let k = p.kernels[0].id;
    let bad = LaunchRule { block: [0, 1, 1], ..rule };
    assert!(host::plan(&p, &BTreeMap::from([(k, GroupRules::one(bad))])).is_err());
    let empty = GroupRules { kernels: Vec::new(), scratch: Vec::new() };
    assert!(host::plan(&p, &BTreeMap::from([(k, empty)])).is_err());
}

/// A failing callback stops the schedule: the error names the kernel, and no later kernel runs.
#[test]
fn a_callback_error_stops_the_schedule() {
    let p = program("tiny-hybrid", &load("tiny-hybrid"), Mode::Prefill);
    let plan = host::plan(&p, &BTreeMap::new()).expect("plan");
    let s = host::compile(&plan).expect("compile");
    let dims = Dims::new(2, 5, 3);
    let b = vec![0x1000; plan.slots.len()];
    let all = native(&s, Phase::Step, &dims, &b).0;
    assert!(all.len() > 4);
    for stop_at in [0, 3, all.len() - 1] {
        let mut calls = 0;
        let r = s.run(Phase::Step, &dims, &b, &mut |_l: &Launched<'_>| {
            calls += 1;
            if calls == stop_at + 1 { Err(format!("device error at call {calls}")) } else { Ok(()) }
        });
        assert_eq!(calls, stop_at + 1);
        assert_eq!(
            r,
            Err(RunError::Launch { kernel: all[stop_at].kernel, error: format!("device error at call {calls}") })
        );
        // The interpreter agrees.
        let mut calls = 0;
        let ri = interpret(&plan, Phase::Step, &dims, &b, &mut |_l: &Launched<'_>| {
            calls += 1;
            if calls == stop_at + 1 { Err(format!("device error at call {calls}")) } else { Ok(()) }
        });
        assert_eq!(ri, r);
    }

    // Through the raw C ABI: the first non-zero status is returned as is.
    struct Counter {
        calls: u32,
        fail_at: u32,
    }
    unsafe extern "C" fn count(ctx: *mut c_void, record: *const LaunchRecord) -> i32 {
        // SAFETY: `ctx` is the `Counter` below; the record is valid during the call.
        let (c, r) = unsafe { (&mut *(ctx as *mut Counter), &*record) };
        assert_eq!(r.part, 0);
        c.calls += 1;
        if c.calls == c.fail_at { 7 } else { 0 }
    }
    let mut c = Counter { calls: 0, fail_at: 3 };
    // SAFETY: `b` has every slot, and `count` honours the launch contract for `c`.
    let status = unsafe { (s.entry(Phase::Step))(&dims, b.as_ptr(), &mut c as *mut Counter as *mut c_void, count) };
    assert_eq!((status, c.calls), (7, 3));
    let mut c = Counter { calls: 0, fail_at: 0 };
    // SAFETY: as above.
    let status = unsafe { (s.entry(Phase::Step))(&dims, b.as_ptr(), &mut c as *mut Counter as *mut c_void, count) };
    assert_eq!((status, c.calls as usize), (abi::STATUS_OK, all.len()));
    let bad = Dims::new(-1, 1, 1);
    // SAFETY: as above.
    let status = unsafe { (s.entry(Phase::Step))(&bad, b.as_ptr(), &mut c as *mut Counter as *mut c_void, count) };
    assert_eq!(status, abi::STATUS_BAD_DIMS);

    // A short base table is refused before anything runs.
    let r = s.run(Phase::Step, &dims, &b[..1], &mut |_l: &Launched<'_>| Ok::<(), ()>(()));
    assert_eq!(r, Err(RunError::Bases { expected: plan.slots.len(), found: 1 }));
}

/// A panicking callback does not unwind through the generated code: the schedule stops, and the
/// panic resumes in the caller.
#[test]
fn a_panicking_callback_stops_the_schedule_and_resumes() {
    let p = program("tiny-hybrid", &load("tiny-hybrid"), Mode::Decode);
    let plan = host::plan(&p, &BTreeMap::new()).expect("plan");
    let s = host::compile(&plan).expect("compile");
    let calls = Cell::new(0);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = s.run(Phase::Step, &Dims::new(1, 1, 4), &vec![0; plan.slots.len()], &mut |_l: &Launched<'_>| {
            calls.set(calls.get() + 1);
            if calls.get() == 2 {
                panic!("the device fell over");
            }
            Ok::<(), ()>(())
        });
    }));
    let payload = caught.expect_err("the panic resumes");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"the device fell over"));
    assert_eq!(calls.get(), 2);
    // The schedule is still usable.
    assert!(native(&s, Phase::Step, &Dims::new(1, 1, 4), &vec![0; plan.slots.len()]).1.is_ok());
}

#[test]
fn clif_of_tiny_hybrid() {
    let spec = load("tiny-hybrid");
    for mode in [Mode::Decode, Mode::Prefill] {
        let p = program("tiny-hybrid", &spec, mode);
        let text = host::write_string(&p, &Options::default()).expect("clif");
        assert_eq!(text, host::write_string(&p, &Options::default()).expect("clif"), "deterministic");
        // The host flavour differs at most in the calling convention.
        let native = host::write_string(&p, &Options { target: Target::Host, ..Options::default() }).expect("clif");
        assert_eq!(native.lines().count(), text.lines().count());
        insta::assert_snapshot!(format!("tiny_hybrid_{}", mode.name()), text);
    }
}

/// The per-call cost of the decode schedule of Nemotron-Flash-1B with a no-op callback, native and
/// interpreted. A measurement, not a test: run with
/// `cargo test --release -p flashc-codegen --test host -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_of_the_decode_schedule() {
    let p = program("nemotron-flash-1b", &load("nemotron-flash-1b"), Mode::Decode);
    // The GPU devices' schedule: every group's generated kernels.
    let rules: BTreeMap<KernelId, GroupRules> = dispatch::generate_all(&p)
        .into_iter()
        .filter_map(|(k, d)| d.ok().map(|d| (k.id, GroupRules::from(&d))))
        .collect();
    let plan = host::plan(&p, &rules).expect("plan");
    let started = Instant::now();
    let s = host::compile(&plan).expect("compile");
    let compile_time = started.elapsed();
    let b = vec![0x7f00_0000_0000; plan.slots.len()];
    let dims = Dims::new(1, 1, 1000);
    let median = |f: &mut dyn FnMut()| {
        let mut times: Vec<f64> = (0..2001)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e9
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let mut n = 0u64;
    let jit = median(&mut || {
        s.run(Phase::Step, &dims, &b, &mut |l: &Launched<'_>| {
            n = n.wrapping_add(l.args.len() as u64);
            Ok::<(), ()>(())
        })
        .expect("run");
    });
    let mut raw_calls = 0u64;
    unsafe extern "C" fn noop(ctx: *mut c_void, _record: *const LaunchRecord) -> i32 {
        // SAFETY: `ctx` is `raw_calls`.
        unsafe { *(ctx as *mut u64) += 1 };
        0
    }
    let raw = median(&mut || {
        // SAFETY: `b` has every slot; `noop` honours the launch contract.
        let status =
            unsafe { (s.entry(Phase::Step))(&dims, b.as_ptr(), &mut raw_calls as *mut u64 as *mut c_void, noop) };
        assert_eq!(status, 0);
    });
    let interp = median(&mut || {
        interpret(&plan, Phase::Step, &dims, &b, &mut |l: &Launched<'_>| {
            n = n.wrapping_add(l.args.len() as u64);
            Ok::<(), ()>(())
        })
        .expect("interpret");
    });
    println!(
        "nemotron-flash-1b decode: {} kernels, {} slots; compile {:.1} ms; per call: native {:.0} ns \
         (raw C callback {:.0} ns), interpreter {:.0} ns ({n})",
        plan.step.launches.len(),
        plan.slots.len(),
        compile_time.as_secs_f64() * 1e3,
        jit,
        raw,
        interp
    );
}

/// A compiled schedule can be shared between threads (the runtime runs it from any of them).
#[test]
fn a_schedule_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<HostSchedule>();
}
