//! flashc on the `cpu` device against Hugging Face transformers: tiny random checkpoints made by
//! `scripts/make_goldens.py` (committed under `tests/goldens/`), imported with `import-hf`, loaded with
//! their own tensor names. Logits must match to a relative error < 1e-4 with the same argmax at every
//! position, and greedy continuations must be the same tokens. The DeltaNet recurrence is checked
//! against transformers' own delta-rule reference, in its chunked and recurrent forms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flashc_runtime::cpu::{Cpu, DeltaDims, delta_recurrent, delta_scan, delta_step};
use flashc_runtime::model::Model;
use flashc_runtime::session::Session;
use safetensors::SafeTensors;

fn goldens() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/goldens")
}

fn read_tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("golden file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json")).expect("valid json")
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|s| s.as_array().expect("list").iter().map(|t| t.as_u64().expect("id") as u32).collect())
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if *v > bv { (i, *v) } else { (bi, bv) }).0
}

/// Imports a golden checkpoint, runs every sequence alone, and compares logits and greedy tokens.
/// Returns the worst relative error.
fn check_model(case: &str) -> f64 {
    let dir = goldens().join(case);
    let arch = flashc_dsl::import_hf::import_dir(&dir).unwrap_or_else(|e| panic!("{case}: import: {e}"));
    let (spec, _) =
        flashc_dsl::load(&arch).unwrap_or_else(|d| panic!("{case}: imported model does not check: {d:?}\n{arch}"));
    let model = Model::load(&Cpu, spec, &dir).unwrap_or_else(|e| panic!("{case}: load: {e}"));
    let vocab = model.spec.vocab as usize;
    let inputs = ids(&json(&dir.join("inputs.json"))["sequences"]);
    let greedy = ids(&json(&dir.join("greedy.json"))["sequences"]);
    let logits = read_tensors(&dir.join("logits.safetensors"));
    let mut worst: f64 = 0.0;
    for (i, seq) in inputs.iter().enumerate() {
        let (shape, want) = &logits[&format!("seq{i}")];
        assert_eq!(shape, &vec![seq.len(), vocab], "{case} seq{i}");
        let mut s = Session::new(&Cpu, &model, 1).expect("session");
        let got = s.prefill(std::slice::from_ref(seq)).expect("prefill").remove(0);
        let e = rel_err(&got, want);
        worst = worst.max(e);
        assert!(e < 1e-4, "{case} seq{i}: logits relative error {e}");
        for t in 0..seq.len() {
            let row = |x: &[f32]| x[t * vocab..(t + 1) * vocab].to_vec();
            assert_eq!(argmax(&row(&got)), argmax(&row(want)), "{case} seq{i}: argmax differs at position {t}");
        }
        // Greedy continuation with the decode path.
        let mut next = argmax(&got[(seq.len() - 1) * vocab..]) as u32;
        let mut out = vec![next];
        while out.len() < greedy[i].len() {
            let l = s.decode(&[next]).expect("decode").remove(0);
            next = argmax(&l) as u32;
            out.push(next);
        }
        assert_eq!(out, greedy[i], "{case} seq{i}: greedy continuation");
    }
    println!("{case}: worst logits relative error {worst:.2e}");
    worst
}

#[test]
fn qwen3_tied_matches_transformers() {
    check_model("qwen3-tied");
}

#[test]
fn qwen3_untied_matches_transformers() {
    check_model("qwen3-untied");
}

#[test]
fn mamba2_matches_transformers() {
    check_model("mamba2");
}

#[test]
fn nemotron_h_matches_transformers() {
    check_model("nemotron-h");
}

#[test]
fn deltanet_matches_the_transformers_delta_rule() {
    for (file, gated) in [("plain.safetensors", false), ("gated.safetensors", true)] {
        let t = read_tensors(&goldens().join("deltanet").join(file));
        let (qs, q) = &t["q_l2"];
        let (b, tt, h, dk) = (qs[0], qs[1], qs[2], qs[3]);
        let dv = t["v"].0[3];
        let dims = DeltaDims { batch: b, tokens: tt, heads: h, dk, dv };
        let g = if gated { Some(t["g"].1.as_slice()) } else { None };
        let scale = 1.0 / (dk as f64).sqrt();
        let lens = vec![tt as i32; b];
        for (init, o_name, s_name) in
            [("initial_state", "o", "final_state"), ("", "o_zero_state", "final_state_zero_state")]
        {
            let s0 = if init.is_empty() { vec![0.0; b * h * dk * dv] } else { t[init].1.clone() };
            for chunk in [4usize, 8, 64] {
                let mut state = s0.clone();
                let mut o = vec![0.0; b * tt * h * dv];
                delta_scan(&dims, q, &t["k_l2"].1, &t["v"].1, &t["beta"].1, g, &mut state, &lens, chunk, scale, &mut o)
                    .expect("scan");
                let (eo, es) = (rel_err(&o, &t[o_name].1), rel_err(&state, &t[s_name].1));
                assert!(eo < 1e-4 && es < 1e-4, "{file} chunk {chunk} {o_name}: output {eo}, state {es}");
            }
            let mut state = s0.clone();
            let mut o = vec![0.0; b * tt * h * dv];
            delta_recurrent(&dims, q, &t["k_l2"].1, &t["v"].1, &t["beta"].1, g, &mut state, &lens, scale, &mut o)
                .expect("recurrent");
            assert!(rel_err(&o, &t[o_name].1) < 1e-4, "{file} recurrent {o_name}");
            // Token-by-token decode steps.
            let mut state = s0;
            let step = DeltaDims { tokens: 1, ..dims };
            let mut o_all = vec![0.0; b * tt * h * dv];
            for ti in 0..tt {
                let pick = |x: &[f32], w: usize| -> Vec<f32> {
                    (0..b).flat_map(|bi| x[(bi * tt + ti) * h * w..(bi * tt + ti + 1) * h * w].to_vec()).collect()
                };
                let gs = g.map(|g| pick(g, 1));
                let mut o = vec![0.0; b * h * dv];
                delta_step(
                    &step,
                    &pick(q, dk),
                    &pick(&t["k_l2"].1, dk),
                    &pick(&t["v"].1, dv),
                    &pick(&t["beta"].1, 1),
                    gs.as_deref(),
                    &mut state,
                    scale,
                    &mut o,
                )
                .expect("step");
                for bi in 0..b {
                    o_all[(bi * tt + ti) * h * dv..(bi * tt + ti + 1) * h * dv]
                        .copy_from_slice(&o[bi * h * dv..(bi + 1) * h * dv]);
                }
            }
            assert!(rel_err(&o_all, &t[o_name].1) < 1e-4, "{file} steps {o_name}");
            assert!(rel_err(&state, &t[s_name].1) < 1e-4, "{file} steps final state {s_name}");
        }
    }
}
