//! `import-hf`: the fixtures under `tests/hf/` (repository root) become `.arch` text.
//!
//! Good fixtures are snapshotted; bad ones must fail with a message naming the offending key or
//! option; no input — truncated, garbage, or a fixture with a key removed or retyped — may panic.

use std::path::PathBuf;

use flashc_dsl::import_hf::{import_config, import_dir};
use serde_json::Value;

const GOOD: [&str; 5] = ["qwen3-0.6b", "qwen3-1.7b", "nemotron-flash-1b", "mamba2-tiny", "nemotron-h-tiny"];
const BAD: [&str; 3] = ["bad-llama", "bad-nemotron-h-moe", "bad-nemotron-flash-mixer-mlp"];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/hf").join(name)
}

fn fixture_text(name: &str) -> String {
    let path = fixture_dir(name).join("config.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn import(name: &str) -> String {
    import_dir(&fixture_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn import_err(name: &str) -> String {
    match import_dir(&fixture_dir(name)) {
        Ok(text) => panic!("{name}: expected an error, got\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn qwen3_0_6b() {
    insta::assert_snapshot!(import("qwen3-0.6b"));
}

#[test]
fn qwen3_1_7b() {
    insta::assert_snapshot!(import("qwen3-1.7b"));
}

#[test]
fn nemotron_flash_1b() {
    insta::assert_snapshot!(import("nemotron-flash-1b"));
}

#[test]
fn mamba2_tiny() {
    insta::assert_snapshot!(import("mamba2-tiny"));
}

#[test]
fn nemotron_h_tiny() {
    insta::assert_snapshot!(import("nemotron-h-tiny"));
}

#[test]
fn model_names_come_from_the_directory_or_the_caller() {
    assert!(import("qwen3-0.6b").contains("\nmodel qwen3_0_6b {\n"));
    assert!(import("nemotron-flash-1b").contains("\nmodel nemotron_flash_1b {\n"));
    let text = fixture_text("mamba2-tiny");
    let named = import_config(&text, "TinyMamba").unwrap_or_else(|e| panic!("{e}"));
    assert!(named.starts_with("// TinyMamba — imported by `flashc import-hf`"));
    assert!(named.contains("\nmodel TinyMamba {\n"));
    let odd = import_config(&text, "7b Mamba.v2").unwrap_or_else(|e| panic!("{e}"));
    assert!(odd.contains("\nmodel m_7b_mamba_v2 {\n"));
}

#[test]
fn importing_is_deterministic() {
    for name in GOOD {
        let text = fixture_text(name);
        let a = import_config(&text, name);
        let b = import_config(&text, name);
        assert_eq!(a, b, "{name}");
        assert!(a.is_ok(), "{name}");
        // import_dir and import_config agree except for how the name is spelt.
        let via_dir = import(name);
        let via_config = import_config(&text, &via_dir_ident(&via_dir)).unwrap_or_default();
        assert_eq!(via_dir.lines().skip(1).collect::<Vec<_>>(), via_config.lines().skip(1).collect::<Vec<_>>());
    }
}

fn via_dir_ident(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("model ").and_then(|r| r.strip_suffix(" {")))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn unknown_model_type_is_refused() {
    let msg = import_err("bad-llama");
    assert!(msg.contains("config.json: unsupported model_type \"llama\""), "{msg}");
    assert!(msg.contains("supported: nemotron_flash, qwen3, mamba2, nemotron_h"), "{msg}");
}

#[test]
fn moe_layers_are_refused() {
    let msg = import_err("bad-nemotron-h-moe");
    assert!(msg.contains("MoE") && msg.contains("hybrid_override_pattern"), "{msg}");
    let text = fixture_text("nemotron-h-tiny").replace(
        "\"hybrid_override_pattern\": \"M-M*-M-\",",
        "\"layers_block_type\": [\"linear_attention\", \"moe\"],",
    );
    let msg = import_config(&text, "x").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("layers_block_type[1]") && msg.contains("moe"), "{msg}");
}

#[test]
fn mixer_internal_mlps_are_refused() {
    let msg = import_err("bad-nemotron-flash-mixer-mlp");
    assert!(msg.contains("intermediate_size") && msg.contains("6144"), "{msg}");
}

/// The fixture as a JSON value (its bare `Infinity` spelt as transformers 5 does, for serde_json).
fn fixture_value(name: &str) -> Value {
    let text = fixture_text(name).replace(": [0.0, Infinity]", ": [0.0, {\"__float__\": \"Infinity\"}]");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `key` of the fixture's top-level object replaced by `value` (or removed when `None`).
fn edited(name: &str, key: &str, value: Option<Value>) -> String {
    let mut v = fixture_value(name);
    if let Some(obj) = v.as_object_mut() {
        match value {
            Some(x) => {
                obj.insert(key.to_string(), x);
            }
            None => {
                obj.remove(key);
            }
        }
    }
    v.to_string()
}

fn error_of(text: &str) -> String {
    match import_config(text, "m") {
        Ok(out) => panic!("expected an error, got\n{out}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_the_key_or_option() {
    let cases: Vec<(&str, &str, Option<Value>, &str)> = vec![
        ("qwen3-0.6b", "hidden_size", None, "missing required key \"hidden_size\""),
        ("qwen3-0.6b", "hidden_size", Some(Value::from("1024")), "key \"hidden_size\" must be a positive integer"),
        ("qwen3-0.6b", "num_key_value_heads", Some(Value::from(5)), "\"num_key_value_heads\" = 5 must divide"),
        (
            "qwen3-0.6b",
            "rope_parameters",
            Some(serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6})),
            "rope_parameters.rope_type",
        ),
        ("qwen3-0.6b", "hidden_act", Some(Value::from("gelu")), "unsupported hidden_act \"gelu\""),
        ("qwen3-0.6b", "layer_types", Some(serde_json::json!(["full_attention"])), "layer_types"),
        ("qwen3-1.7b", "rope_scaling", Some(serde_json::json!({"type": "linear", "factor": 2.0})), "rope_scaling.type"),
        ("nemotron-flash-1b", "layer_types", Some(serde_json::json!(["deltanet", "gdn"])), "layer_types[1]"),
        ("nemotron-flash-1b", "num_hidden_layers", Some(Value::from(12)), "num_hidden_layers"),
        ("nemotron-flash-1b", "rope_type", Some(Value::from("dynamic_ntk")), "unsupported rope_type \"dynamic_ntk\""),
        ("nemotron-flash-1b", "orig_max_position_embeddings", None, "orig_max_position_embeddings"),
        ("nemotron-flash-1b", "kq_norm", Some(Value::from("layer")), "unsupported kq_norm \"layer\""),
        ("nemotron-flash-1b", "mlp_hidden_act", Some(Value::from("gelu")), "unsupported mlp_hidden_act \"gelu\""),
        ("nemotron-flash-1b", "intermediate_size", None, "intermediate_size"),
        ("nemotron-flash-1b", "ffn_expand_ratio", None, "ffn_expand_ratio"),
        ("mamba2-tiny", "num_heads", Some(Value::from(12)), "\"num_heads\" × \"head_dim\""),
        ("mamba2-tiny", "n_groups", Some(Value::from(3)), "\"n_groups\" = 3 must divide"),
        ("mamba2-tiny", "time_step_limit", Some(serde_json::json!([0.5, 0.1])), "time_step_limit"),
        ("mamba2-tiny", "num_hidden_layers", Some(Value::from(1u64 << 40)), "num_hidden_layers"),
        ("nemotron-h-tiny", "mlp_hidden_act", Some(Value::from("swiglu")), "unsupported mlp_hidden_act \"swiglu\""),
        ("nemotron-h-tiny", "hybrid_override_pattern", None, "layers_block_type"),
        ("nemotron-h-tiny", "hybrid_override_pattern", Some(Value::from("M-X")), "hybrid_override_pattern"),
        ("nemotron-h-tiny", "ssm_state_size", None, "missing required key \"ssm_state_size\""),
        ("nemotron-h-tiny", "dtype", Some(Value::from("int8")), "unsupported dtype \"int8\""),
    ];
    for (name, key, value, want) in cases {
        let msg = error_of(&edited(name, key, value));
        assert!(msg.starts_with("config.json: "), "{name}/{key}: {msg}");
        assert!(msg.contains(want), "{name}/{key}: wanted {want:?} in {msg:?}");
        assert!(!msg.contains('\n'), "{name}/{key}: the message must be one line: {msg:?}");
    }
    let msg = error_of("[1, 2]");
    assert!(msg.contains("JSON object"), "{msg}");
    let msg = error_of("{\"model_type\": ");
    assert!(msg.contains("not valid JSON"), "{msg}");
    let missing = import_dir(&fixture_dir("no-such-model")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(missing.contains("no-such-model") && missing.contains("config.json"), "{missing}");
}

#[test]
fn non_standard_floats_and_defaults() {
    // Bare Infinity (older files) reads like transformers 5's {"__float__": "Infinity"}.
    let text = fixture_text("mamba2-tiny").replace("{\"__float__\": \"Infinity\"}", "Infinity");
    assert_eq!(import_config(&text, "m"), import_config(&fixture_text("mamba2-tiny"), "m"));
    // A bounded limit becomes dt_min / dt_max.
    let out = import_config(&edited("mamba2-tiny", "time_step_limit", Some(serde_json::json!([0.001, 100.0]))), "m");
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("dt_min = 0.001, dt_max = 100"), "{out}");
    // Absent keys are listed in the output.
    let out = import_config(&edited("nemotron-flash-1b", "rms_norm_eps", None), "m").unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("//   rms_norm_eps = 1e-6") && out.contains("norm = rmsnorm(eps = 1e-6)"), "{out}");
    // Sliding windows: Qwen3 with use_sliding_window and max_window_layers.
    let mut v: Value = fixture_value("qwen3-1.7b");
    v["use_sliding_window"] = Value::from(true);
    v["sliding_window"] = Value::from(4096);
    v["max_window_layers"] = Value::from(20);
    let out = import_config(&v.to_string(), "m").unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("op SWA = attention(heads = 16, kv_heads = 8, window = 4096, qk_norm = true"), "{out}");
    assert!(out.contains("layers = [A, F] * 20 ++ [SWA, F] * 8"), "{out}");
    // An explicit null window means full attention everywhere; a null KV head count means MHA.
    v["sliding_window"] = Value::Null;
    v["num_key_value_heads"] = Value::Null;
    let out = import_config(&v.to_string(), "m").unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.contains("SWA") && out.contains("layers = [L] * 28"), "{out}");
    assert!(out.contains("op A = attention(heads = 16, qk_norm = true"), "{out}");
    assert!(out.contains("//   num_key_value_heads = num_attention_heads"), "{out}");
    // Nemotron-Flash sliding windows everywhere except the global layers.
    let mut v: Value = fixture_value("nemotron-flash-1b");
    v["sliding_window"] = Value::from(512);
    v["global_attn_idx"] = serde_json::json!([4]);
    let out = import_config(&v.to_string(), "m").unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("op A = attention(heads = 16, kv_heads = 4, rope"), "{out}");
    assert!(out.contains("op SWA = attention(heads = 16, kv_heads = 4, window = 512, rope"), "{out}");
}

/// Every prefix of every fixture, garbage, and every fixture with each key removed or retyped:
/// the importer returns Ok or Err, never panics.
#[test]
fn no_input_panics() {
    let mut texts: Vec<String> = Vec::new();
    let garbage = [
        "",
        " ",
        "null",
        "0",
        "\"qwen3\"",
        "[]",
        "{}",
        "{{",
        "}",
        "[[[[[[",
        "NaN",
        "-Infinity",
        "\"\\",
        "{\"model_type\": null}",
        "{\"model_type\": 7}",
        "{\"model_type\": \"qwen3\"}",
        "{\"model_type\": \"mamba2\", \"time_step_limit\": [NaN, Infinity]}",
        "{\"model_type\": \"nemotron_h\", \"hybrid_override_pattern\": \"\"}",
        "{\"model_type\": \"nemotron_flash\", \"layer_types\": []}",
        "\u{feff}{\"a\": \"é\u{1F600}\"}",
        "{\"a\": \"\\uD800\"}",
    ];
    texts.extend(garbage.iter().map(|s| s.to_string()));
    texts.push("[".repeat(100_000));
    let wrong_values = [
        Value::Null,
        Value::from(true),
        Value::from(-1),
        Value::from(0),
        Value::from(1),
        Value::from(3),
        Value::from(2.5),
        Value::from(u64::MAX),
        Value::from(1e300),
        Value::from("x"),
        serde_json::json!([]),
        serde_json::json!([1, "a", null]),
        serde_json::json!({"__float__": "Infinity"}),
        serde_json::json!({"__float__": "NaN"}),
        serde_json::json!({"rope_theta": -1, "rope_type": 3}),
    ];
    for name in GOOD.iter().chain(BAD.iter()) {
        let text = fixture_text(name);
        for (i, _) in text.char_indices().step_by(7) {
            texts.push(text[..i].to_string());
        }
        let v = fixture_value(name);
        let keys: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        for key in &keys {
            texts.push(edited(name, key, None));
            for w in &wrong_values {
                texts.push(edited(name, key, Some(w.clone())));
            }
        }
    }
    for text in &texts {
        let a = import_config(text, "m");
        assert_eq!(a, import_config(text, "m"));
        if let Err(e) = &a {
            assert!(!e.to_string().contains('\n'), "multi-line message: {e}");
        }
    }
}
