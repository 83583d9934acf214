//! The compiled artifact: deterministic, round-trips, and every kind of damage is a clear error.

use std::path::Path;

use flashc_runtime::artifact::{Artifact, ArtifactError, FORMAT, MAGIC, build, cached};
use flashc_runtime::cpu::Cpu;
use flashc_runtime::model::Model;
use flashc_runtime::session::Session;

const SRC: &str = "model art { vocab = 64 hidden = 32 meta_tokens = 2 op A = attention(heads = 4) \
                   op M = mamba2(state = 8, head_dim = 8) op F = ffn(inner = 48) layers = [A, F, M, F] }";

fn artifact() -> Artifact {
    let (spec, _) = flashc_dsl::load(SRC).expect("valid");
    build(SRC, &spec).expect("build")
}

#[test]
fn artifacts_are_deterministic_and_round_trip() {
    let a = artifact();
    let b = artifact();
    assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap(), "byte-identical for the same input");
    let bytes = a.to_bytes().unwrap();
    assert!(bytes.starts_with(MAGIC));
    let back = Artifact::from_bytes(&bytes, Path::new("a.flashc")).expect("read back");
    // Source spans are not part of the artifact, so compare what is stored.
    assert!(back.to_bytes().unwrap() == bytes, "the artifact does not read back to itself");
    for mode in ["prefill", "decode", "train", "prefix"] {
        assert!(back.program(mode).is_some(), "{mode}");
    }
    assert!(back.summary().contains("program decode"));
}

/// Every group of every program is either compiled to kernels (PTX for sm_80 and sm_90, launch rule,
/// parts numbered from 0) or listed as missing with a reason; the kernels' names and launch rules
/// are those of the dispatcher.
#[test]
fn artifacts_carry_the_kernels_of_every_program() {
    let a = artifact();
    for p in &a.programs {
        let mut generated = 0;
        for g in p.program.prep.iter().chain(&p.program.kernels) {
            let parts: Vec<_> = p.kernels.iter().filter(|k| k.group == g.id.0).collect();
            let missing = p.missing.iter().any(|(k, why)| *k == g.id.0 && !why.is_empty());
            assert!(parts.is_empty() == missing, "{} {}: generated or missing, not both or neither", p.mode, g.id);
            for (i, k) in parts.iter().enumerate() {
                assert_eq!(k.part as usize, i, "{} {}", p.mode, k.name);
                let targets: Vec<&str> = k.ptx.iter().map(|(t, _)| t.as_str()).collect();
                assert_eq!(targets, ["sm_80", "sm_90"]);
                for (t, text) in &k.ptx {
                    assert!(text.contains(&format!(".target {t}")), "{}: no .target {t}", k.name);
                    assert!(text.contains(&format!(".entry {}", k.name)), "{}: no entry", k.name);
                }
                assert!(k.launch.block.iter().all(|b| *b > 0));
            }
            generated += usize::from(!parts.is_empty());
        }
        assert!(generated > 0, "{}: no group generated", p.mode);
        for sc in &p.scratch {
            assert!(p.kernels.iter().any(|k| k.group == sc.group), "{}: scratch of a group without kernels", p.mode);
        }
    }
}

#[test]
fn a_model_from_an_artifact_runs_like_one_compiled_directly() {
    let (spec, _) = flashc_dsl::load(SRC).expect("valid");
    let w = flashc_runtime::weights::init(&spec, 3);
    let direct = Model::new(&Cpu, spec.clone(), w.clone()).expect("model");
    let from = Model::from_artifact(&Cpu, &artifact(), w).expect("model");
    let run = |m: &Model| {
        let mut s = Session::new(&Cpu, m, 1).expect("session");
        let mut l = s.prefill(&[vec![1, 2, 3, 4]]).expect("prefill").remove(0);
        l.extend(s.decode(&[5]).expect("decode").remove(0));
        l
    };
    assert_eq!(run(&direct), run(&from));
}

#[test]
fn damaged_artifacts_are_clear_errors() {
    let p = Path::new("x.flashc");
    let bytes = artifact().to_bytes().unwrap();
    // Truncated anywhere.
    for cut in [0, 4, MAGIC.len(), MAGIC.len() + 10, bytes.len() / 2, bytes.len() - 1] {
        let e = Artifact::from_bytes(&bytes[..cut], p).unwrap_err();
        assert!(matches!(e, ArtifactError::NotAnArtifact(_) | ArtifactError::Corrupt { .. }), "cut {cut}: {e}");
    }
    // A flipped digit in the body: the hash no longer matches (or the JSON no longer parses).
    let text = String::from_utf8_lossy(&bytes[MAGIC.len()..]).into_owned();
    let i = text.find("\"vocab\":64").expect("vocab");
    let mut bad = MAGIC.to_vec();
    bad.extend(&text.as_bytes()[..i]);
    bad.extend(text[i..].replacen("\"vocab\":64", "\"vocab\":65", 1).as_bytes());
    let e = Artifact::from_bytes(&bad, p).unwrap_err();
    assert!(e.to_string().contains("content hash mismatch"), "{e}");
    // Another format version.
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[MAGIC.len()..]).unwrap();
    v["format"] = serde_json::json!(FORMAT + 1);
    let mut future = MAGIC.to_vec();
    future.extend(serde_json::to_vec(&v).unwrap());
    let e = Artifact::from_bytes(&future, p).unwrap_err();
    assert!(matches!(e, ArtifactError::Version { found, .. } if found == FORMAT + 1), "{e}");
    assert!(e.to_string().contains("recompile"));
    // Not an artifact at all.
    assert!(matches!(Artifact::from_bytes(b"model m {}", p), Err(ArtifactError::NotAnArtifact(_))));
    assert!(matches!(Artifact::load(Path::new("/no/such/file.flashc")), Err(ArtifactError::Io(_))));
}

#[test]
fn the_cache_is_content_addressed() {
    let dir = std::env::temp_dir().join(format!("flashc-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // SAFETY: this test is the only one in this binary that reads or writes FLASHC_CACHE.
    unsafe { std::env::set_var("FLASHC_CACHE", &dir) };
    let (spec, _) = flashc_dsl::load(SRC).expect("valid");
    let a = cached(SRC, &spec).expect("compile");
    let files: Vec<_> = std::fs::read_dir(&dir).expect("cache dir").collect();
    assert_eq!(files.len(), 1);
    let b = cached(SRC, &spec).expect("from cache");
    assert!(a.to_bytes().unwrap() == b.to_bytes().unwrap());
    // A corrupt cache entry is recompiled, not an error.
    let path = flashc_runtime::artifact::cache_path(SRC).expect("path");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(cached(SRC, &spec).expect("recompiled").to_bytes().unwrap() == a.to_bytes().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `resources`, every kernel carries ptxas's report for sm_80 and sm_90 (registers, no spills
/// in this small model); without ptxas that is a clear error.
#[test]
fn artifacts_can_record_ptxas_resources() {
    let (spec, _) = flashc_dsl::load(SRC).expect("valid");
    let options = flashc_runtime::artifact::BuildOptions { resources: true };
    if flashc_codegen::ptx::ptxas::find().is_none() {
        assert!(!flashc_codegen::ptx::ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found");
        let err = flashc_runtime::artifact::build_with(SRC, &spec, options).unwrap_err();
        assert!(err.to_string().contains("ptxas"), "{err}");
        eprintln!("SKIPPED: ptxas not found (scripts/install-ptxas.sh)");
        return;
    }
    let a = flashc_runtime::artifact::build_with(SRC, &spec, options).expect("build");
    let decode = a.programs.iter().find(|p| p.mode == "decode").expect("decode");
    assert!(!decode.kernels.is_empty());
    for k in &decode.kernels {
        let targets: Vec<&str> = k.resources.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["sm_80", "sm_90"], "{}", k.name);
        for r in &k.resources {
            assert!(r.registers > 0 && r.spill_stores == 0, "{} {}: {r:?}", k.name, r.target);
        }
    }
    assert!(a.summary().contains("bytes spilled"));
}
