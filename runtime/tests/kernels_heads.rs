//! The split-product tail (`heads::tail`) and the row slice (`slice::slice`) on the `sim` against the
//! `cpu` kernels: QKV parts with and without the per-head RMSNorm, both rope styles, head widths whose
//! pairs do not fill a warp (ragged lanes), symbolic and constant row counts, meta-token offsets in
//! the positions; elementwise column parts (sigmoid, bias + softplus, per-column and broadcast scale);
//! bf16 and f32 storage.

mod kernels_util;

use flashc_codegen::kernels::heads::{self, ColumnOp, HeadNorm, PartKind, Rope, TailPart, TailSpec, Vector};
use flashc_codegen::kernels::slice::{self, SliceSpec};
use flashc_compiler::gir::{Bindings, DType, Dim, RopeStyle, Sym};
use flashc_compiler::schedule::BufferId;
use flashc_runtime::cpu;
use kernels_util::{Dev, Rng, at, check, quantize, tol};

fn sym(s: Sym) -> Dim {
    Dim::sym(s)
}

/// One attention projection layout: query heads, kv heads, head width.
#[derive(Clone, Copy, Debug)]
struct Qkv {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Runs a QKV tail (`[q | k | v]` product, q and k normed and / or rotated, v copied) and compares
/// every part with `cpu::rmsnorm` + `cpu::rope`. `tokens` is the T of the positions (`meta` extra
/// tokens per sequence are part of the rows, like prefill's meta prefix).
fn run_qkv(dtype: DType, shape: Qkv, norm: bool, style: Option<RopeStyle>, symbolic: bool, at: Bindings, meta: i64) {
    let Qkv { q_heads, kv_heads, head_dim: d } = shape;
    let (qw, kw) = (q_heads * d, kv_heads * d);
    let width = qw + 2 * kw;
    let tokens_dim = if symbolic { sym(Sym::T).add(&Dim::constant(meta)) } else { Dim::constant(at.t + meta) };
    let rows_dim = if symbolic { sym(Sym::B).mul(&tokens_dim) } else { Dim::constant(at.b * (at.t + meta)) };
    let (batch, tokens) = (at.b as usize, (at.t + meta) as usize);
    let rows = batch * tokens;
    let theta = 10000.0;
    let eps = 1e-6f32;
    // Slots: product, start, q norm w, k norm w, q out, k out, v out.
    let heads_kind = |w: u32| PartKind::Heads {
        head_dim: d as u32,
        norm: norm.then_some(HeadNorm { weight: BufferId(w), dtype: DType::Bf16, eps }),
        rope: style.map(|style| Rope { style, theta }),
    };
    let spec = TailSpec {
        name: "qkv_tail".into(),
        rows: rows_dim,
        tokens: tokens_dim,
        width: width as u32,
        dtype,
        product: BufferId(0),
        start: style.map(|_| BufferId(1)),
        parts: vec![
            TailPart { lo: 0, width: qw as u32, out: BufferId(4), out_dtype: dtype, kind: heads_kind(2) },
            TailPart { lo: qw as u32, width: kw as u32, out: BufferId(5), out_dtype: dtype, kind: heads_kind(3) },
            TailPart {
                lo: (qw + kw) as u32,
                width: kw as u32,
                out: BufferId(6),
                out_dtype: dtype,
                kind: PartKind::Columns(Vec::new()),
            },
        ],
    };
    let g = heads::tail(&spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let mut rng = Rng::new(7 + d as u64 + rows as u64);
    let p = quantize(dtype, &rng.normals(rows * width, 1.5));
    let start: Vec<i32> = (0..batch).map(|_| rng.below(200) as i32).collect();
    let wq = quantize(DType::Bf16, &rng.normals(d, 1.0));
    let wk = quantize(DType::Bf16, &rng.normals(d, 1.0));
    let mut dev = Dev::new();
    let slots = [
        dev.input(dtype, &p),
        dev.input_i32(&start),
        dev.input(DType::Bf16, &wq),
        dev.input(DType::Bf16, &wk),
        dev.output(dtype, rows * qw),
        dev.output(dtype, rows * kw),
        dev.output(dtype, rows * kw),
    ];
    dev.launch(&g, &at, &slots);

    let part = |lo: usize, w: usize| -> Vec<f32> {
        (0..rows).flat_map(|r| p[r * width + lo..r * width + lo + w].to_vec()).collect()
    };
    let reference = |x: Vec<f32>, heads: usize, w: &[f32]| -> Vec<f32> {
        let mut y = x.clone();
        if norm {
            cpu::rmsnorm(rows * heads, d, &x, w, f64::from(eps), &mut y).unwrap();
        }
        if let Some(style) = style {
            let style = match style {
                RopeStyle::RotateHalf => cpu::RopeStyle::RotateHalf,
                RopeStyle::Interleaved => cpu::RopeStyle::Interleaved,
            };
            let dims = cpu::RopeDims { batch, tokens, heads, d };
            let mut out = vec![0.0; y.len()];
            cpu::rope(&dims, &y, &start, style, theta, &mut out).unwrap();
            y = out;
        }
        y
    };
    let what = |n: &str| {
        format!("{n} {} q{q_heads} kv{kv_heads} d{d} norm={norm} {style:?} rows={rows} T={tokens}", dtype.name())
    };
    let t = tol(dtype);
    let q_ref = reference(part(0, qw), q_heads, &wq);
    let k_ref = reference(part(qw, kw), kv_heads, &wk);
    check(&what("q"), &dev.read(dtype, slots[4], rows * qw), &q_ref, t);
    check(&what("k"), &dev.read(dtype, slots[5], rows * kw), &k_ref, t);
    check(&what("v"), &dev.read(dtype, slots[6], rows * kw), &part(qw + kw, kw), 0.0f64.max(1e-12));
}

#[test]
fn qkv_parts_match_cpu() {
    let styles = [Some(RopeStyle::RotateHalf), Some(RopeStyle::Interleaved)];
    for dtype in [DType::Bf16, DType::F32] {
        for style in styles {
            for norm in [true, false] {
                // Decode: one token per sequence, a batch of 1 and of 3.
                run_qkv(dtype, Qkv { q_heads: 4, kv_heads: 2, head_dim: 32 }, norm, style, true, at(1, 1), 0);
                run_qkv(dtype, Qkv { q_heads: 4, kv_heads: 1, head_dim: 64 }, norm, style, true, at(3, 1), 0);
                // Prefill with a meta prefix of 4 tokens, symbolic rows.
                run_qkv(dtype, Qkv { q_heads: 5, kv_heads: 1, head_dim: 128 }, norm, style, true, at(2, 13), 4);
                // Ragged pair slots: head_dim 48 (24 pairs) and 96 (48 pairs: one full and one partial slot).
                run_qkv(dtype, Qkv { q_heads: 3, kv_heads: 2, head_dim: 48 }, norm, style, false, at(2, 5), 0);
                run_qkv(dtype, Qkv { q_heads: 2, kv_heads: 1, head_dim: 96 }, norm, style, true, at(1, 7), 2);
            }
        }
        // Norm only (no rope): no start operand.
        run_qkv(dtype, Qkv { q_heads: 4, kv_heads: 2, head_dim: 64 }, true, None, true, at(2, 3), 0);
    }
}

fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Column parts of a Mamba2 / DeltaNet input projection: `[z | xBC | sigmoid(g) | softplus(dt + b) ·
/// s | exp(-a) · c]` with per-column and broadcast operands, the bias and scales in bf16 or f32.
fn run_columns(dtype: DType, out_dtype: DType, widths: [usize; 5], rows_at: (Dim, Bindings)) {
    let (rows_dim, at) = rows_at;
    let rows = usize::try_from(rows_dim.eval(&at)).unwrap();
    let width: usize = widths.iter().sum();
    let lo: Vec<usize> = widths.iter().scan(0, |s, w| Some(std::mem::replace(s, *s + w))).collect();
    let v = |slot: u32, dtype: DType, broadcast: bool| Vector { buf: BufferId(slot), dtype, broadcast };
    // Slots: product, bias [w3] bf16, scale [w3] f32, c [1] bf16, then 5 outputs.
    let kinds = [
        PartKind::Columns(Vec::new()),
        PartKind::Columns(vec![ColumnOp::Silu]),
        PartKind::Columns(vec![ColumnOp::Sigmoid]),
        PartKind::Columns(vec![
            ColumnOp::Add(v(1, DType::Bf16, false)),
            ColumnOp::Softplus,
            ColumnOp::Mul(v(2, DType::F32, false)),
        ]),
        PartKind::Columns(vec![
            ColumnOp::Neg,
            ColumnOp::Exp,
            ColumnOp::Mul(v(3, DType::Bf16, true)),
            ColumnOp::Scale(0.5),
        ]),
    ];
    let parts = kinds
        .into_iter()
        .enumerate()
        .map(|(k, kind)| TailPart {
            lo: lo[k] as u32,
            width: widths[k] as u32,
            out: BufferId(4 + k as u32),
            out_dtype,
            kind,
        })
        .collect();
    let spec = TailSpec {
        name: "columns_tail".into(),
        rows: rows_dim.clone(),
        tokens: Dim::constant(1),
        width: width as u32,
        dtype,
        product: BufferId(0),
        start: None,
        parts,
    };
    let g = heads::tail(&spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let mut rng = Rng::new(99 + rows as u64 + width as u64);
    let p = quantize(dtype, &rng.normals(rows * width, 2.0));
    let bias = quantize(DType::Bf16, &rng.normals(widths[3], 1.0));
    let scale = rng.normals(widths[3], 1.0);
    let c = quantize(DType::Bf16, &[rng.normal()]);
    let mut dev = Dev::new();
    let mut slots = vec![
        dev.input(dtype, &p),
        dev.input(DType::Bf16, &bias),
        dev.input(DType::F32, &scale),
        dev.input(DType::Bf16, &c),
    ];
    for w in widths {
        slots.push(dev.output(out_dtype, rows * w));
    }
    dev.launch(&g, &at, &slots);
    let f: [&dyn Fn(usize, f32) -> f32; 5] =
        [&|_, x| x, &|_, x| x * sigmoid(x), &|_, x| sigmoid(x), &|j, x| softplus(x + bias[j]) * scale[j], &|_, x| {
            (-x).exp() * c[0] * 0.5
        }];
    for k in 0..5 {
        let want: Vec<f32> = (0..rows)
            .flat_map(|r| (0..widths[k]).map(move |j| (r, j)))
            .map(|(r, j)| f[k](j, p[r * width + lo[k] + j]))
            .collect();
        let what = format!("part {k} {}→{} rows={rows} widths={widths:?}", dtype.name(), out_dtype.name());
        check(&what, &dev.read(out_dtype, slots[4 + k], rows * widths[k]), &want, tol(out_dtype));
    }
}

#[test]
fn column_parts_match_reference() {
    let bt = sym(Sym::B).mul(&sym(Sym::T).add(&Dim::constant(4)));
    for (dtype, out) in [(DType::Bf16, DType::Bf16), (DType::F32, DType::F32), (DType::Bf16, DType::F32)] {
        run_columns(dtype, out, [64, 128, 2, 8, 3], (bt.clone(), at(2, 9)));
        run_columns(dtype, out, [256, 320, 8, 2, 128], (Dim::constant(3), at(1, 1)));
        run_columns(dtype, out, [5, 130, 1, 300, 7], (sym(Sym::B), at(5, 1)));
    }
}

/// `slice` along `axis` of `shape` (at `at`) against a host copy; exact.
fn run_slice(dtype: DType, shape: Vec<Dim>, axis: usize, start: Dim, len: Dim, at: Bindings) {
    let spec = SliceSpec {
        name: "slice".into(),
        dtype,
        shape: shape.clone(),
        axis,
        start: start.clone(),
        len: len.clone(),
        x: BufferId(0),
        out: BufferId(1),
    };
    let g = slice::slice(&spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let dims: Vec<usize> = shape.iter().map(|d| usize::try_from(d.eval(&at)).unwrap()).collect();
    let (start, len) = (start.eval(&at) as usize, len.eval(&at) as usize);
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let s = dims[axis];
    let mut rng = Rng::new(5 + outer as u64 + inner as u64);
    let x = quantize(dtype, &rng.normals(outer * s * inner, 1.0));
    let n = outer * len * inner;
    let mut dev = Dev::new();
    let slots = [dev.input(dtype, &x), dev.output(dtype, n)];
    dev.launch(&g, &at, &slots);
    let want: Vec<f32> =
        (0..outer).flat_map(|o| x[(o * s + start) * inner..(o * s + start + len) * inner].to_vec()).collect();
    let got = dev.read(dtype, slots[1], n);
    check(&format!("slice {} {dims:?} axis {axis} [{start}, +{len})", dtype.name()), &got, &want, 1e-30);
    assert_eq!(got, want, "a slice is an exact copy");
}

#[test]
fn slice_matches_copy() {
    let (b, t) = (sym(Sym::B), sym(Sym::T));
    let meta = Dim::constant(4);
    for dtype in [DType::Bf16, DType::F32] {
        // The logits head of prefill: the tokens after a meta prefix of 4.
        let shape = vec![b.clone(), t.add(&meta), Dim::constant(128)];
        run_slice(dtype, shape.clone(), 1, meta.clone(), t.clone(), at(3, 11));
        run_slice(dtype, shape, 1, meta.clone(), t.clone(), at(1, 1));
        // Ragged inner widths (vectors of 2 and 1 elements) and a constant shape.
        run_slice(
            dtype,
            vec![b.clone(), t.clone(), Dim::constant(6)],
            1,
            Dim::constant(2),
            t.sub(&Dim::constant(2)),
            at(2, 7),
        );
        run_slice(
            dtype,
            vec![Dim::constant(3), Dim::constant(10), Dim::constant(5)],
            1,
            Dim::constant(3),
            Dim::constant(4),
            at(1, 1),
        );
        run_slice(
            dtype,
            vec![Dim::constant(6), Dim::constant(4), Dim::constant(8)],
            0,
            Dim::constant(1),
            Dim::constant(4),
            at(1, 1),
        );
    }
}
