//! The schedule stage: every example in every mode schedules after the standard pipeline into a
//! program that passes `Program::check`, whose arena buffers never overlap while live (checked with
//! concrete sizes), deterministically; the programs are snapshotted as text.

use std::collections::{BTreeMap, BTreeSet};

use flashc_compiler::gir::{Bindings, Mode, Op, Value};
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::fuse::extract;
use flashc_compiler::passes::{Pass, pipeline, run_passes};
use flashc_compiler::schedule::{ALIGN, BufferId, BufferKind, KernelId, Program, schedule};

/// (B, T, S) combinations the arena is checked at.
const SIZES: [(i64, i64, i64); 3] = [(1, 1, 0), (2, 7, 5), (4, 128, 300)];

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
            (p.file_stem().unwrap_or_default().to_string_lossy().into_owned(), spec)
        })
        .collect()
}

/// Lower, run the standard pipeline with verification after every pass, schedule, check.
fn compile(name: &str, spec: &flashc_dsl::ModelSpec, mode: Mode) -> Program {
    let mut g = lower(spec, &LowerOptions::new(mode)).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    run_passes(&mut g, &pipeline(mode), true, &mut |_, _| {}).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    let p = schedule(&g).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    if let Err(errs) = p.check() {
        panic!("{name} {mode:?}: the program is invalid:\n{}\n{p}", errs.join("\n"));
    }
    p
}

fn tiny(layers: &str) -> flashc_dsl::ModelSpec {
    let src = format!(
        "model tiny {{\n  vocab = 256\n  hidden = 64\n  meta_tokens = 4\n  max_seq = 128\n  \
         norm = rmsnorm(eps = 1e-6)\n  dtype = bf16\n  \
         op A = attention(heads = 4, kv_heads = 2, head_dim = 16, rope = rope(theta = 10000))\n  \
         op W = attention(heads = 4, kv_heads = 2, head_dim = 16, window = 32, qk_norm = true)\n  \
         op M = mamba2(state = 16, expand = 2, head_dim = 16, groups = 1, conv = 4, chunk = 64)\n  \
         op D = deltanet(heads = 2, head_dim = 32, conv = 4)\n  \
         op G = deltanet(heads = 2, head_dim = 32, conv = 4, gated = true)\n  \
         op F = ffn(inner = 128, act = swiglu)\n  layers = {layers}\n}}\n"
    );
    flashc_dsl::load(&src).unwrap_or_else(|d| panic!("{d:?}")).0
}

/// The no-overlap check with concrete sizes, independent of the planner: lifetimes come from the
/// kernel lists (first to last kernel touching a storage root or any alias of it; outputs to the
/// end), offsets and sizes are evaluated, and every two arena roots that are live at the same kernel
/// must occupy disjoint bytes inside the arena, at offsets aligned to `ALIGN`.
fn check_no_overlap(p: &Program, at: Bindings) -> Result<(), String> {
    let root = |b: BufferId| p.buffers[b.0 as usize].root();
    let mut live: BTreeMap<BufferId, (KernelId, KernelId)> = BTreeMap::new();
    for k in &p.kernels {
        for b in k.inputs.iter().chain(&k.outputs) {
            live.entry(root(*b)).or_insert((k.id, k.id)).1 = k.id;
        }
    }
    let end = p.kernels.last().map_or(KernelId(0), |k| k.id);
    let arena = p.arena_bytes(&at);
    let mut placed: Vec<(KernelId, KernelId, i64, i64, BufferId)> = Vec::new();
    for b in p.buffers.iter().filter(|b| b.alias.is_none() && b.kind.in_arena()) {
        let offset = b.offset.as_ref().ok_or_else(|| format!("{} is not placed", b.id))?.eval(&at);
        let bytes = b.bytes.eval(&at);
        if offset % ALIGN != 0 || offset < 0 || offset + bytes > arena {
            return Err(format!("{} at {offset} (+{bytes}) is misaligned or outside the arena of {arena}", b.id));
        }
        let Some(&(first, mut last)) = live.get(&b.id) else { continue };
        if b.kind == BufferKind::Output {
            last = end;
        }
        placed.push((first, last, offset, offset + bytes, b.id));
    }
    for (i, x) in placed.iter().enumerate() {
        for y in &placed[i + 1..] {
            let both_live = x.0 <= y.1 && y.0 <= x.1;
            let overlap = x.2 < y.3 && y.2 < x.3;
            if both_live && overlap {
                return Err(format!(
                    "{} [{}..{}] bytes {}..{} and {} [{}..{}] bytes {}..{} overlap while both live",
                    x.4, x.0, x.1, x.2, x.3, y.4, y.0, y.1, y.2, y.3
                ));
            }
        }
    }
    Ok(())
}

/// The text form with the weight lines (the same in every mode, and listed by the manifest) folded
/// into one, which keeps the example snapshots to the kernels, the other buffers and the arena.
fn summary(p: &Program) -> String {
    let weights: Vec<_> = p.buffers.iter().filter(|b| b.alias.is_none() && b.kind == BufferKind::Weight).collect();
    let mut out = String::new();
    let mut folded = false;
    for line in p.to_string().lines() {
        let is_weight =
            line.strip_prefix("  b").and_then(|l| l.split_once(' ')).is_some_and(|(_, l)| l.starts_with("weight "));
        if !is_weight {
            out.push_str(line);
            out.push('\n');
        } else if !folded {
            folded = true;
            out.push_str(&format!("  ... {} weights, {} bytes\n", weights.len(), p.total_bytes(BufferKind::Weight)));
        }
    }
    out
}

fn check_sizes(name: &str, p: &Program) {
    for (b, t, s) in SIZES {
        if let Err(e) = check_no_overlap(p, Bindings { b, t, s }) {
            panic!("{name} {:?} at B={b} T={t} S={s}: {e}", p.mode);
        }
    }
}

#[test]
fn every_example_schedules_in_every_mode() {
    for (name, spec) in examples() {
        for mode in Mode::ALL {
            let p = compile(&name, &spec, mode);
            check_sizes(&name, &p);
            insta::assert_snapshot!(format!("{name}-{}", mode.name()), summary(&p));
        }
    }
}

#[test]
fn scheduling_is_deterministic_and_round_trips_through_json() {
    let mut cases = examples();
    cases.push(("tiny".to_string(), tiny("[A, F, M, D, W, G]")));
    for (name, spec) in cases {
        for mode in Mode::ALL {
            let a = compile(&name, &spec, mode);
            let b = compile(&name, &spec, mode);
            assert_eq!(a.to_string(), b.to_string(), "{name} {mode:?}: text differs");
            let ja = serde_json::to_string(&a).expect("serialise");
            let jb = serde_json::to_string(&b).expect("serialise");
            assert_eq!(ja, jb, "{name} {mode:?}: JSON differs");
            let back: Program = serde_json::from_str(&ja).expect("deserialise");
            assert_eq!(back, a, "{name} {mode:?}: JSON does not round-trip");
            assert_eq!(back.check(), Ok(()));
        }
    }
}

#[test]
fn every_operator_schedules_in_every_mode() {
    let spec = tiny("[A, F, M, D, W, G]");
    for mode in Mode::ALL {
        let p = compile("tiny", &spec, mode);
        check_sizes("tiny", &p);
        // Every state is one buffer: its output is an alias of the state input.
        for (name, b) in &p.outputs {
            let root = &p.buffers[p.buffers[b.0 as usize].root().0 as usize];
            let want = if name == "logits" || name == "loss" { BufferKind::Output } else { BufferKind::State };
            assert_eq!(root.kind, want, "{mode:?}: output {name}");
        }
        // Weight preparation runs at load, not per step: −exp(A_log) for Mamba2 and Gated DeltaNet,
        // and the weights packed by horizontal matmul fusion.
        let prep: Vec<&str> = p.prep.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(prep.iter().filter(|n| **n == "exp").count(), 2, "{mode:?}: {prep:?}");
        assert_eq!(prep.iter().filter(|n| **n == "neg").count(), 2, "{mode:?}: {prep:?}");
        assert!(prep.iter().all(|n| matches!(*n, "exp" | "neg" | "concat")), "{mode:?}: {prep:?}");
        assert!(prep.contains(&"concat"), "{mode:?}: {prep:?}");
        assert!(p.kernels.iter().all(|k| k.name != "exp"), "{mode:?}");
    }
}

#[test]
fn a_small_decode_program() {
    let p = compile("tiny", &tiny("[M, F]"), Mode::Decode);
    check_sizes("tiny", &p);
    insta::assert_snapshot!(p.to_string());
}

#[test]
fn training_states_start_as_zeroed_arena_buffers() {
    let p = compile("tiny", &tiny("[A, M]"), Mode::Train);
    let zeroed: Vec<_> = p.buffers.iter().filter(|b| b.zeroed).collect();
    // start, k/v caches, conv and ssm states.
    assert_eq!(zeroed.len(), 5, "{p}");
    assert!(zeroed.iter().all(|b| b.kind == BufferKind::Activation && b.offset.is_some()));
    assert!(p.outputs.iter().any(|(n, _)| n == "loss"));
}

#[test]
fn check_catches_broken_programs() {
    let good = compile("tiny", &tiny("[A, F]"), Mode::Decode);
    // A kernel moved before the kernel that writes its input.
    let mut p = good.clone();
    p.kernels.swap(0, 1);
    for (i, k) in p.prep.iter_mut().chain(p.kernels.iter_mut()).enumerate() {
        k.id = KernelId(i as u32);
    }
    assert!(p.check().is_err());
    // Two live activations in the same place.
    let mut p = good.clone();
    let acts: Vec<usize> = p
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.alias.is_none() && b.kind == BufferKind::Activation)
        .map(|(i, _)| i)
        .collect();
    let first = p.buffers[acts[0]].offset.clone();
    p.buffers[acts[1]].offset = first;
    assert!(p.check().is_err());
    assert!(SIZES.iter().any(|(b, t, s)| check_no_overlap(&p, Bindings { b: *b, t: *t, s: *s }).is_err()));
}

/// The numbers quoted in reviews: kernels per step per mode, and the prefill arena at B=1, T=4096.
#[test]
fn report_kernel_counts_and_arena() {
    for (name, spec) in examples() {
        for mode in Mode::ALL {
            let p = compile(&name, &spec, mode);
            let at = Bindings { b: 1, t: 4096, s: 0 };
            let arena = p.arena_bytes(&at);
            println!(
                "{name} {:7}: {:4} kernels per step, {:2} at load; arena {} = {} bytes ({:.3} GB) at B=1 T=4096, \
                 live peak {} bytes",
                mode.name(),
                p.kernel_count(),
                p.prep.len(),
                p.arena.size,
                arena,
                arena as f64 / 1e9,
                p.arena_live_peak(&at)
            );
        }
    }
}

/// Fused graphs schedule like unfused ones: a fused node is one kernel group, takes the launch of its
/// main member, and a state it updates in place stays in the state's buffer.
#[test]
fn fused_nodes_are_one_kernel_and_keep_states_in_place() {
    for mode in Mode::ALL {
        let spec = tiny("[A, F, M, D, W, G]");
        let mut g = lower(&spec, &LowerOptions::new(mode)).expect("lower");
        let cleanup = [Pass::Canonicalize, Pass::Cse, Pass::Dce];
        run_passes(&mut g, &cleanup, true, &mut |_, _| {}).expect("passes");
        let unfused = schedule(&g).expect("schedule");
        // Each conv with the SiLU after it, and each norm with the matmuls reading it.
        let mut fused = 0;
        for n in g.node_ids() {
            if !g.contains(n) {
                continue;
            }
            let (name, set): (&str, BTreeSet<_>) = match g.op(n) {
                Op::Conv1d { .. } | Op::Conv1dUpdate { .. } => {
                    let users = g.users(Value::from(n));
                    if users.len() != 1 || !matches!(g.op(users[0].0), Op::Silu) {
                        continue;
                    }
                    ("conv_silu", [n, users[0].0].into())
                }
                Op::RmsNorm { .. } => {
                    let users = g.successors(n);
                    if users.is_empty() || !users.iter().all(|u| matches!(g.op(*u), Op::MatMul { .. })) {
                        continue;
                    }
                    ("rmsnorm_matmul", users.into_iter().chain([n]).collect())
                }
                _ => continue,
            };
            extract(&mut g, &set, name).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            fused += set.len() - 1;
        }
        flashc_compiler::verify::verify(&g).unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
        let p = schedule(&g).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        if let Err(errs) = p.check() {
            panic!("{mode:?}: the fused program is invalid:\n{}\n{p}", errs.join("\n"));
        }
        check_sizes("tiny fused", &p);
        assert!(fused > 0);
        assert_eq!(p.kernel_count(), unfused.kernel_count() - fused, "{mode:?}");
        for k in &p.kernels {
            match k.name.as_str() {
                "conv_silu" => assert_eq!(k.launch.kind(), "conv", "{mode:?} {k}"),
                "rmsnorm_matmul" => assert_eq!(k.launch.kind(), "matmul", "{mode:?} {k}"),
                _ => {}
            }
        }
        for (name, b) in p.outputs.iter().filter(|(n, _)| n.contains(".conv")) {
            let root = &p.buffers[p.buffers[b.0 as usize].root().0 as usize];
            assert_eq!((root.kind, root.name.as_str()), (BufferKind::State, name.as_str()), "{mode:?}");
        }
    }
}

#[test]
fn a_state_output_must_update_the_state_in_place() {
    let g = flashc_compiler::gir::parse::parse(
        "gir @t mode=decode {\n  %0 = input[name=\"s\", role=\"state\"] : f32[B, 4]\n  \
         %1 = silu(%0) : f32[B, 4]\n  output \"s\" = %1\n}\n",
    )
    .expect("parse");
    flashc_compiler::verify::verify(&g).expect("verify");
    let err = schedule(&g).expect_err("a state copied, not updated in place");
    assert!(err.contains("state output `s`"), "{err}");
}
