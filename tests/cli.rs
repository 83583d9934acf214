//! End-to-end tests of the `flashc` binary: exit codes, output streams, files written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flashc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run flashc")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashc-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn examples() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "arch"))
        .map(|p| format!("examples/{}", p.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    v.sort();
    v
}

#[test]
fn check_accepts_every_example() {
    let ex = examples();
    assert!(ex.len() >= 2);
    let args: Vec<&str> = std::iter::once("check").chain(ex.iter().map(String::as_str)).collect();
    let out = flashc(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok: ")).count(), ex.len(), "{stdout}");
}

#[test]
fn check_reports_errors_and_exits_1() {
    let dir = scratch("check");
    let bad = dir.join("bad.arch");
    std::fs::write(
        &bad,
        "model m {\n  vocab = 10\n  hidden = 64\n  op A = attention(heads = 4, kv_heads = 3)\n  layers = [A]\n}\n",
    )
    .unwrap();
    let out = flashc(&["check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("error[E0306]"), "{err}");
    assert!(err.contains("bad.arch:4:"), "{err}");
    assert!(text(&out.stdout).is_empty());
    // A missing file is an error, not a panic.
    let out = flashc(&["check", "no/such/file.arch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read"));
}

#[test]
fn info_reports_exact_parameter_counts() {
    for (file, total) in [("examples/qwen3-0.6b.arch", "596,049,920"), ("examples/qwen3-1.7b.arch", "1,720,574,976")] {
        if !Path::new(env!("CARGO_MANIFEST_DIR")).join(file).exists() {
            continue;
        }
        let out = flashc(&["info", file]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(total), "{file}: {}", text(&out.stdout));
    }
    let out = flashc(&["info", "examples/nemotron-flash-1b.arch", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let total = v["model"]["params_total"].as_u64().expect("params_total");
    // Decode needs at most 3 kernels per layer on average, embedding and LM head included.
    let decode =
        v["compiled"]["modes"].as_array().and_then(|m| m.iter().find(|x| x["mode"] == "decode")).expect("decode");
    let kernels = decode["kernels"].as_u64().expect("kernels");
    assert!(kernels <= 3 * 24, "{kernels} kernels per decode step for 24 layers");
    assert!((total as f64 - 0.965e9).abs() / 0.965e9 < 0.005, "{total}");
}

#[test]
fn compile_emits_stages_and_writes_atomically() {
    let out = flashc(&["compile", "examples/nemotron-flash-1b.arch", "--emit", "ast"]);
    assert!(out.status.success());
    let ast: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ast json");
    assert_eq!(ast["models"][0]["name"]["name"], "nemotron_flash_1b");

    let dir = scratch("compile");
    let dest = dir.join("spec.json");
    let out = flashc(&["compile", "examples/nemotron-flash-1b.arch", "--emit", "spec", "-o", dest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dest).unwrap()).unwrap();
    assert_eq!(spec["layers"].as_array().map(Vec::len), Some(24));
    // Byte-identical output for the same input.
    let again = flashc(&["compile", "examples/nemotron-flash-1b.arch", "--emit", "spec"]);
    assert_eq!(again.stdout, std::fs::read(&dest).unwrap());
    // Nothing else (no temp file) is left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    // A failing compile leaves an existing output untouched.
    let bad = dir.join("bad.arch");
    std::fs::write(&bad, "model m { vocab = 1 }").unwrap();
    let out = flashc(&["compile", bad.to_str().unwrap(), "--emit", "spec", "-o", dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&dest).unwrap(), again.stdout);
}

#[test]
fn compile_emits_gir_and_program_with_debug_knobs() {
    let out = flashc(&["compile", "examples/tiny-hybrid.arch", "--emit", "gir", "--mode", "decode"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let gir = text(&out.stdout);
    assert!(gir.starts_with("gir @tiny_hybrid mode=decode {"), "{gir}");
    assert!(gir.contains("fused[name=\"mamba2_step\"]"), "{gir}");
    // The printed IR parses back to itself.
    let g = flashc_compiler::gir::parse::parse(&gir).expect("parse");
    assert_eq!(g.to_string(), gir);

    let out =
        flashc(&["compile", "examples/tiny-hybrid.arch", "--emit", "gir", "--passes", "none", "--print-after", "all"]);
    assert!(out.status.success());
    assert!(!text(&out.stdout).contains("fused["));
    let out = flashc(&[
        "compile",
        "examples/tiny-hybrid.arch",
        "--emit",
        "gir",
        "--passes",
        "fuse-conv,dce",
        "--print-after",
        "fuse-conv",
    ]);
    assert!(out.status.success());
    assert!(text(&out.stderr).starts_with("// gir after fuse-conv\n"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("conv_silu"));
    assert_eq!(
        flashc(&["compile", "examples/tiny-hybrid.arch", "--emit", "gir", "--passes", "nope"]).status.code(),
        Some(1)
    );

    let out = flashc(&["compile", "examples/tiny-hybrid.arch", "--emit", "program", "--mode", "prefill"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let program = text(&out.stdout);
    assert!(program.starts_with("program @tiny_hybrid mode=prefill:"), "{program}");
    let again = flashc(&["compile", "examples/tiny-hybrid.arch", "--emit", "program", "--mode", "prefill"]);
    assert_eq!(again.stdout, out.stdout, "program output is not deterministic");
}

#[test]
fn compile_emits_kir_and_ptx_with_a_coverage_summary() {
    for emit in ["kir", "ptx"] {
        let args = ["compile", "examples/nemotron-flash-1b.arch", "--emit", emit, "--mode", "decode"];
        let out = flashc(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("93 of 93 kernel groups generated"), "{stderr}");
        let listing = text(&out.stdout);
        assert!(listing.contains("// k0 exp: 1 kernel(s)"), "{listing}");
        assert!(!listing.contains(": not generated (`"), "every group is generated");
        if emit == "ptx" {
            assert!(listing.contains(".visible .entry"), "no PTX entry");
        }
        assert_eq!(flashc(&args).stdout, out.stdout, "--emit {emit} is not deterministic");
    }
    // tiny-hybrid stores f32, which the big generators do not cover: the misses are named.
    let out = flashc(&["compile", "examples/tiny-hybrid.arch", "--emit", "kir", "--mode", "decode"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(" of 47 kernel groups generated"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(": not generated (`"), "uncovered groups are listed");
}

#[test]
fn import_hf_writes_a_checkable_model() {
    let dir = scratch("import");
    let dest = dir.join("qwen.arch");
    let out = flashc(&["import-hf", "tests/hf/qwen3-0.6b", "-o", dest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = flashc(&["info", dest.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["model"]["params_total"].as_u64(), Some(596_049_920));

    let out = flashc(&["import-hf", "tests/hf/bad-llama"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unsupported model_type \"llama\""), "{}", text(&out.stderr));
    let out = flashc(&["import-hf", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn explain_and_help() {
    let out = flashc(&["explain", "E0306"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("kv_heads does not divide heads"));
    assert_eq!(flashc(&["explain", "E9999"]).status.code(), Some(1));
    for cmd in ["check", "info", "compile", "fmt", "import-hf", "init", "generate", "logits", "explain"] {
        let out = flashc(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd}");
        assert!(text(&out.stdout).contains("Example"), "{cmd} --help has no example");
    }
}

#[test]
fn init_generate_and_logits_on_a_tiny_model() {
    let dir = scratch("generate");
    let w = dir.join("tiny.safetensors");
    let out = flashc(&["init", "examples/tiny-hybrid.arch", "-o", w.to_str().unwrap(), "--seed", "5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = || {
        flashc(&[
            "generate",
            "examples/tiny-hybrid.arch",
            "--weights",
            w.to_str().unwrap(),
            "--prompt",
            "abc",
            "--max-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-k",
            "20",
            "--seed",
            "4",
        ])
    };
    let a = run();
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(a.stdout.starts_with(b"abc"));
    assert!(text(&a.stderr).contains("tokens/s"), "{}", text(&a.stderr));
    // Seeded sampling is reproducible.
    assert_eq!(run().stdout, a.stdout);

    // Logits: one f32 [T, vocab] tensor per sequence.
    let l = dir.join("logits.safetensors");
    let out = flashc(&[
        "logits",
        "examples/tiny-hybrid.arch",
        "--weights",
        w.to_str().unwrap(),
        "--tokens",
        "1 2 3",
        "--tokens",
        "4,5",
        "-o",
        l.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&l).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("seq0").unwrap().shape(), &[3, 256]);
    assert_eq!(st.tensor("seq1").unwrap().shape(), &[2, 256]);

    // Errors: no weights, bad sampling, tokens outside the vocabulary, an unavailable device.
    let fails = |args: &[&str], needle: &str| {
        let out = flashc(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
    };
    fails(&["generate", "examples/tiny-hybrid.arch", "--prompt", "x"], "no weights");
    let ws = w.to_str().unwrap();
    fails(&["generate", "examples/tiny-hybrid.arch", "--weights", ws, "--prompt", "x", "--top-p", "2"], "top_p");
    fails(&["logits", "examples/tiny-hybrid.arch", "--weights", ws, "--tokens", "9999", "-o", "/tmp/x"], "vocabulary");
    // Without a GPU driver: a clear error, not a panic.
    if !flashc_runtime::cuda::driver_present() {
        let cuda = ["generate", "examples/tiny-hybrid.arch", "--weights", ws, "--prompt", "x", "--device", "cuda"];
        fails(&cuda, "no CUDA driver found");
    }
    // Weights of another model: a clear error naming a tensor.
    fails(&["generate", "examples/qwen3-0.6b.arch", "--weights", ws, "--prompt", "x"], "tensor");
}

#[test]
fn generate_runs_a_hugging_face_directory() {
    // The golden Qwen3 checkpoint: config.json + model.safetensors + tokenizer.json.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/qwen3-tied");
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let greedy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("greedy.json")).unwrap()).unwrap();
    let prompt = inputs["texts"][0].as_str().unwrap();
    let want: Vec<u32> =
        greedy["sequences"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let out = flashc(&["generate", dir.to_str().unwrap(), "--prompt", prompt, "--max-tokens", &want.len().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tok = flashc_runtime::tokenizer::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut stream = tok.stream_decoder();
    let mut expected = prompt.to_string();
    for t in &want {
        expected.push_str(&stream.step(*t).unwrap());
    }
    expected.push_str(&stream.finish().unwrap());
    assert_eq!(text(&out.stdout).trim_end_matches('\n'), expected);
}

#[test]
fn bench_reports_latency_throughput_kernels_and_the_roofline() {
    let out = flashc(&[
        "bench",
        "examples/tiny-hybrid.arch",
        "--random",
        "--batch",
        "1,2",
        "--prompt",
        "8",
        "--decode",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["bandwidth_bytes_per_s"].as_f64().unwrap() > 0.0);
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for r in results {
        for key in
            ["time_to_first_token_ms", "decode_step_ms", "decode_tokens_per_s", "roofline_step_ms", "roofline_fraction"]
        {
            let x = r[key].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        assert!(!r["decode_kernels"].as_array().unwrap().is_empty());
    }
    let out = flashc(&["bench", "examples/tiny-hybrid.arch", "--random", "--prompt", "100000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("max_seq"));
}

/// The `sim` device runs a whole bf16 model from the command line (the generated GPU kernels,
/// interpreted), and its logits are the cpu's up to bf16 storage.
#[test]
fn the_sim_device_runs_a_bf16_model() {
    let dir = scratch("sim");
    let arch = dir.join("small.arch");
    std::fs::write(
        &arch,
        "model small { vocab = 256 hidden = 64 meta_tokens = 2 max_seq = 64 dtype = bf16 \
         op A = attention(heads = 2, kv_heads = 1) op M = mamba2(state = 16, head_dim = 16, chunk = 8) \
         op D = deltanet(heads = 2, gated = true) op F = ffn(inner = 128) layers = [A, F, M, F, D, F] }",
    )
    .unwrap();
    let a = arch.to_str().unwrap();
    let w = dir.join("small.safetensors");
    let ws = w.to_str().unwrap();
    assert!(flashc(&["init", a, "-o", ws, "--seed", "3"]).status.success());
    let logits = |device: &str| {
        let out_path = dir.join(format!("logits-{device}.safetensors"));
        let out = flashc(&[
            "logits",
            a,
            "--weights",
            ws,
            "--tokens",
            "5 17 200 3 9 42 7",
            "--tokens",
            "1 2",
            "--device",
            device,
            "-o",
            out_path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{device}: {}", text(&out.stderr));
        let bytes = std::fs::read(&out_path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let seq = |n: &str| -> Vec<f32> {
            st.tensor(n).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        (seq("seq0"), seq("seq1"))
    };
    let (c0, c1) = logits("cpu");
    let (s0, s1) = logits("sim");
    for (s, c) in [(&s0, &c0), (&s1, &c1)] {
        let num: f64 = s.iter().zip(c.iter()).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = c.iter().map(|y| f64::from(*y).powi(2)).sum();
        let e = (num / den).sqrt();
        assert!(e < 3e-2, "sim logits are {e:.3e} from the cpu's");
    }
    let out = flashc(&["generate", a, "--weights", ws, "--prompt", "hi", "--max-tokens", "3", "--device", "sim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("tokens/s"), "{}", text(&out.stderr));

    // tiny-hybrid stores f32, which the GEMV / GEMM kernels do not: on the sim it runs with
    // `--dtype bf16`, and without it the error names the group and the way out.
    let w = dir.join("tiny.safetensors");
    let ws = w.to_str().unwrap();
    assert!(flashc(&["init", "examples/tiny-hybrid.arch", "-o", ws]).status.success());
    let run = ["generate", "examples/tiny-hybrid.arch", "--weights", ws, "--prompt", "a", "--max-tokens", "2"];
    let out = flashc(&[&run[..], &["--device", "sim", "--dtype", "bf16"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = flashc(&[&run[..], &["--device", "sim"]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("store it in bf16"), "{}", text(&out.stderr));
}
