//! Weight loading: round trips, families, sharding, and every error path (no panics).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flashc_runtime::weights::{Family, WeightError, init, load, save};
use safetensors::Dtype;

const MODEL: &str = "model m { vocab = 32 hidden = 16 meta_tokens = 2 op A = attention(heads = 2, kv_heads = 1) \
                     op F = ffn(inner = 24) op D = deltanet(heads = 2) op M = mamba2(state = 4, head_dim = 8) \
                     layers = [A, F, D, M] }";

fn spec() -> flashc_dsl::ModelSpec {
    flashc_dsl::load(MODEL).expect("valid").0
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashc-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Writes tensors (name, dtype, shape, f32 values) as safetensors.
fn write(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dt, _, v)| match dt {
            Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, dt, s, _), b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b).expect("view")))
        .collect();
    let out = safetensors::tensor::serialize(views, None::<HashMap<String, String>>).expect("serialize");
    std::fs::write(path, out).expect("write");
}

#[test]
fn init_save_load_round_trip_is_exact_and_deterministic() {
    let s = spec();
    let w = init(&s, 7);
    assert_eq!(w.param_count() as u64, flashc_dsl::stats::model_stats(&s).params_total);
    assert_eq!(init(&s, 7), w);
    assert_ne!(init(&s, 8), w);
    let dir = scratch("roundtrip");
    let p = dir.join("w.safetensors");
    save(&w, &p).expect("save");
    let back = load(&s, &p).expect("load");
    assert_eq!(back.family, Family::Flashc);
    assert_eq!(back, w);
    // Byte-identical files for the same weights.
    let p2 = dir.join("w2.safetensors");
    save(&w, &p2).expect("save");
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
    // Norms start at one, A_log in [0, ln 16], matrices small and not all equal.
    assert!(w.get("layers.0.norm").unwrap().data.iter().all(|x| *x == 1.0));
    assert!(w.get("layers.3.mamba2.A_log").unwrap().data.iter().all(|x| (0.0..=16f32.ln()).contains(x)));
    let q = &w.get("layers.0.attn.q_proj").unwrap().data;
    assert!(q.iter().any(|x| *x != q[0]) && q.iter().all(|x| x.abs() < 0.2));
}

/// The model's tensors under Nemotron-Flash names, in bf16, with `[C, 1, K]` convs.
fn nemotron_tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<f32>)> {
    let s = spec();
    let w = init(&s, 3);
    let names = flashc_runtime::weights::hf::source_names(Family::NemotronFlash, &s);
    flashc_dsl::manifest::manifest(&s)
        .into_iter()
        .map(|d| {
            let t = w.get(&d.name).unwrap();
            let mut shape = t.shape.clone();
            if d.role == flashc_dsl::manifest::WeightRole::Conv {
                shape = vec![shape[0], 1, shape[1]];
            }
            (names[&d.name].clone(), Dtype::BF16, shape, t.data.clone())
        })
        .collect()
}

#[test]
fn hf_names_bf16_widening_and_sharding() {
    let s = spec();
    let dir = scratch("nemotron");
    let tensors = nemotron_tensors();
    write(&dir.join("model.safetensors"), &tensors);
    let w = load(&s, &dir).expect("load nemotron names");
    assert_eq!(w.family, Family::NemotronFlash);
    let q = w.get("layers.0.attn.q_proj").unwrap();
    let orig = &tensors.iter().find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight").unwrap().3;
    for (a, b) in q.data.iter().zip(orig) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
    assert_eq!(w.get("layers.2.deltanet.q_conv").unwrap().shape, vec![16, 4]);

    // Sharded: two files and an index.
    let sharded = scratch("sharded");
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write(&sharded.join("model-00001-of-00002.safetensors"), a);
    write(&sharded.join("model-00002-of-00002.safetensors"), b);
    let mut map = serde_json::Map::new();
    for t in a {
        map.insert(t.0.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in b {
        map.insert(t.0.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(load(&s, &sharded).expect("sharded"), w);
}

#[test]
fn errors_name_the_tensor_and_never_panic() {
    let s = spec();
    let dir = scratch("errors");
    let mut tensors = nemotron_tensors();

    // Missing tensor.
    let removed = tensors.remove(5);
    write(&dir.join("missing.safetensors"), &tensors);
    let e = load(&s, &dir.join("missing.safetensors")).unwrap_err();
    assert!(matches!(&e, WeightError::Missing { source, .. } if *source == removed.0), "{e}");
    assert!(e.to_string().contains(&removed.0));

    // Wrong shape.
    let mut bad = removed.clone();
    bad.2 = vec![bad.2.iter().product::<usize>() + 1];
    bad.3.push(0.0);
    tensors.insert(5, bad);
    write(&dir.join("shape.safetensors"), &tensors);
    let e = load(&s, &dir.join("shape.safetensors")).unwrap_err();
    assert!(matches!(e, WeightError::Shape { .. }), "{e}");
    assert!(e.to_string().contains("expects"), "{e}");
    tensors[5] = removed;

    // Unexpected tensor.
    let mut extra = tensors.clone();
    extra.push(("model.layers.9.mlp.up_proj.weight".into(), Dtype::F32, vec![2], vec![1.0, 2.0]));
    write(&dir.join("extra.safetensors"), &extra);
    let e = load(&s, &dir.join("extra.safetensors")).unwrap_err();
    assert!(
        matches!(&e, WeightError::Unexpected { source, .. } if source == "model.layers.9.mlp.up_proj.weight"),
        "{e}"
    );

    // Unsupported dtype.
    let mut ints = tensors.clone();
    ints[0].1 = Dtype::I32;
    write(&dir.join("dtype.safetensors"), &ints);
    let e = load(&s, &dir.join("dtype.safetensors")).unwrap_err();
    assert!(matches!(e, WeightError::Dtype { .. }), "{e}");

    // Truncated file and corrupt header: an error, not a panic.
    write(&dir.join("good.safetensors"), &tensors);
    let good = std::fs::read(dir.join("good.safetensors")).unwrap();
    for cut in [0, 4, 8, 20, good.len() / 2, good.len() - 1] {
        std::fs::write(dir.join("cut.safetensors"), &good[..cut]).unwrap();
        let e = load(&s, &dir.join("cut.safetensors")).unwrap_err();
        assert!(matches!(e, WeightError::Corrupt { .. }), "cut at {cut}: {e}");
    }
    let mut garbled = good.clone();
    for b in garbled.iter_mut().skip(8).take(16) {
        *b = b'{';
    }
    std::fs::write(dir.join("garbled.safetensors"), &garbled).unwrap();
    assert!(load(&s, &dir.join("garbled.safetensors")).is_err());
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(dir.join("huge.safetensors"), &huge).unwrap();
    assert!(load(&s, &dir.join("huge.safetensors")).is_err());

    // Missing file, empty directory, unknown names.
    assert!(matches!(load(&s, &dir.join("nope.safetensors")), Err(WeightError::Io { .. })));
    let empty = scratch("empty");
    assert!(matches!(load(&s, &empty), Err(WeightError::Io { .. })));
    write(&dir.join("alien.safetensors"), &[("x".into(), Dtype::F32, vec![1], vec![1.0])]);
    assert!(matches!(load(&s, &dir.join("alien.safetensors")), Err(WeightError::UnknownFamily { .. })));
}
