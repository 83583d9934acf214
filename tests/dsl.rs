//! Folder-driven tests of the `.arch` front end.
//!
//! - `tests/dsl/ok/*.arch` must load; each snapshot holds the warnings (rendered) and the resolved spec.
//! - `tests/dsl/err/*.arch` must fail; each snapshot holds the rendered diagnostics.
//! - `examples/*.arch` must load without warnings; each snapshot holds `flashc info` and the spec.
//!
//! Update the snapshots with `INSTA_UPDATE=always cargo test --test dsl` (or `cargo insta review`)
//! and read every changed one before committing it.

use std::path::Path;

use flashc_dsl::diag::render;
use flashc_dsl::{Severity, stats};

/// The path of a test input relative to the repository root, with `/` separators, so rendered
/// diagnostics are the same on every machine.
fn relative(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn ok_files_resolve() {
    insta::glob!("dsl/ok/*.arch", |path| {
        let name = relative(path);
        let src = read(path);
        let (spec, warnings) = match flashc_dsl::load(&src) {
            Ok(r) => r,
            Err(diags) => panic!("{name} should load, but:\n{}", render(&name, &src, &diags)),
        };
        assert!(warnings.iter().all(|d| d.severity == Severity::Warning), "{name}: errors returned with a spec");
        let mut out = String::new();
        if !warnings.is_empty() {
            out += &render(&name, &src, &warnings);
            out += "\n";
        }
        out += &serde_json::to_string_pretty(&spec).expect("a spec serialises");
        out += "\n";
        insta::assert_snapshot!(out);
    });
}

#[test]
fn err_files_fail() {
    insta::glob!("dsl/err/*.arch", |path| {
        let name = relative(path);
        let src = read(path);
        let diags = match flashc_dsl::load(&src) {
            Ok((spec, _)) => panic!("{name} should fail, but it resolved to the model `{}`", spec.name),
            Err(diags) => diags,
        };
        assert!(diags.iter().any(|d| d.severity == Severity::Error), "{name}: failed without an error");
        insta::assert_snapshot!(render(&name, &src, &diags));
    });
}

#[test]
fn examples_resolve() {
    insta::glob!("../examples", "*.arch", |path| {
        let name = relative(path);
        let src = read(path);
        let (spec, warnings) = match flashc_dsl::load(&src) {
            Ok(r) => r,
            Err(diags) => panic!("{name} should load, but:\n{}", render(&name, &src, &diags)),
        };
        assert!(warnings.is_empty(), "{name} has warnings:\n{}", render(&name, &src, &warnings));
        let s = stats::model_stats(&spec);
        let mut out = stats::render_info(&spec, &s);
        out += "\n";
        out += &serde_json::to_string_pretty(&spec).expect("a spec serialises");
        out += "\n";
        insta::assert_snapshot!(out);
    });
}

/// Loads one example (for the parameter checks below).
fn example(file: &str) -> flashc_dsl::ModelSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
    let src = read(&path);
    match flashc_dsl::load(&src) {
        Ok((spec, _)) => spec,
        Err(diags) => panic!("{}", render(file, &src, &diags)),
    }
}

fn params(file: &str) -> u64 {
    stats::model_stats(&example(file)).params_total
}

fn within(actual: u64, target: f64, rel: f64) -> bool {
    ((actual as f64 - target) / target).abs() <= rel
}

#[test]
fn example_parameter_counts() {
    // Published totals (Hugging Face safetensors metadata).
    assert_eq!(params("qwen3-0.6b.arch"), 596_049_920);
    assert_eq!(params("qwen3-1.7b.arch"), 1_720_574_976);
    // Nemotron-Flash: 0.965B and 2.750B (nemotron-flash.md §1.4).
    let p1 = params("nemotron-flash-1b.arch");
    assert!(within(p1, 0.965e9, 0.005), "{p1}");
    let p3 = params("nemotron-flash-3b.arch");
    assert!(within(p3, 2.750e9, 0.005), "{p3}");
    // A window changes the cache, not the weights.
    assert_eq!(params("nemotron-flash-3b-tp.arch"), p3);
    // The sizes the small examples promise in their headers.
    let h = params("hybrid-100m.arch");
    assert!((90_000_000..=120_000_000).contains(&h), "{h}");
    let n = params("nemotronh-hybrid.arch");
    assert!((100_000_000..=300_000_000).contains(&n), "{n}");
    let g = params("gated-deltanet-hybrid.arch");
    assert!((100_000_000..=400_000_000).contains(&g), "{g}");
}

#[test]
fn example_shapes() {
    use flashc_dsl::spec::Operator;
    let kinds = |spec: &flashc_dsl::ModelSpec| spec.layers.iter().map(|l| l.op.kind()).collect::<Vec<_>>();

    // Nemotron-Flash-3B: B1 B2 B1 B2 B1 B2 B1 B1 B1 with B1 = D F M2 F and B2 = A F M2 F.
    let flash = example("nemotron-flash-3b.arch");
    let b1 = ["deltanet", "ffn", "mamba2", "ffn"];
    let b2 = ["attention", "ffn", "mamba2", "ffn"];
    let want: Vec<&str> = [b1, b2, b1, b2, b1, b2, b1, b1, b1].concat();
    assert_eq!(kinds(&flash), want);

    // The TP variant: the same stack, the first attention layer full, the other two windowed.
    let tp = example("nemotron-flash-3b-tp.arch");
    assert_eq!(kinds(&tp), want);
    let windows: Vec<Option<u64>> = tp
        .layers
        .iter()
        .filter_map(|l| match &l.op {
            Operator::Attention(a) => Some(a.window),
            _ => None,
        })
        .collect();
    assert_eq!(windows, [None, Some(8192), Some(8192)]);

    // The tiny model uses every operator kind and variant.
    let tiny = example("tiny-hybrid.arch");
    assert!(tiny.hidden <= 256 && tiny.vocab == 256 && tiny.meta_tokens == 4 && tiny.train.is_some());
    let has = |f: &dyn Fn(&Operator) -> bool| tiny.layers.iter().any(|l| f(&l.op));
    assert!(has(&|o| matches!(o, Operator::Attention(a) if a.window.is_none() && a.qk_norm
        && a.rope.is_some() && a.kv_heads < a.heads)));
    assert!(has(&|o| matches!(o, Operator::Attention(a) if a.window.is_some())));
    assert!(has(&|o| matches!(o, Operator::DeltaNet(d) if !d.gated)));
    assert!(has(&|o| matches!(o, Operator::DeltaNet(d) if d.gated)));
    assert!(has(&|o| matches!(o, Operator::Mamba2(_))));
    assert!(has(&|o| matches!(o, Operator::Ffn(f) if f.act == flashc_dsl::spec::Activation::Swiglu)));
    assert!(has(&|o| matches!(o, Operator::Ffn(f) if f.act == flashc_dsl::spec::Activation::Relu2)));
}
