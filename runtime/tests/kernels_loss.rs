//! The cross-entropy forward (per-row kernel, then the deterministic mean) on the `sim` against the
//! `cpu` kernel: ignored targets, no counted row, large logits, bad targets.

mod kernels_util;

use flashc_codegen::kernels::loss;
use flashc_compiler::gir::{DType, Dim, Op, Sym, TensorType};
use flashc_runtime::cpu;
use kernels_util::{Dev, Rng, at, check, quantize};

fn bt() -> Dim {
    Dim::sym(Sym::B).mul(&Dim::sym(Sym::T))
}

/// Runs both kernels; returns (loss, row losses, row lse).
fn run(dt: DType, vocab: u32, x: &[f32], targets: &[i32], b: i64, t: i64) -> (f32, Vec<f32>, Vec<f32>) {
    let [rows_k, mean_k] = loss::cross_entropy(&bt(), vocab, dt).unwrap();
    let rows = targets.len();
    let mut dev = Dev::new();
    let slots = [
        dev.input(dt, x),
        dev.input_i32(targets),
        dev.output(DType::F32, 1),
        dev.output(DType::F32, rows),
        dev.output(DType::F32, rows),
    ];
    let a = at(b, t);
    dev.launch(&rows_k, &a, &slots);
    dev.launch(&mean_k, &a, &slots);
    let l = dev.read(DType::F32, slots[2], 1)[0];
    (l, dev.read(DType::F32, slots[3], rows), dev.read(DType::F32, slots[4], rows))
}

#[test]
fn cross_entropy_matches_cpu() {
    let mut seed = 0;
    for dt in [DType::F32, DType::Bf16] {
        for vocab in [7u32, 100, 2048, 5003, 1] {
            for (b, t) in [(2, 13), (1, 1), (3, 1), (1, 7)] {
                seed += 1;
                let mut rng = Rng::new(seed);
                let rows = (b * t) as usize;
                let v = vocab as usize;
                let mut x = quantize(dt, &rng.normals(rows * v, 3.0));
                x[0] = 60.0; // a large logit stays stable
                let targets: Vec<i32> =
                    (0..rows).map(|r| if r % 5 == 3 { -100 } else { rng.below(v) as i32 }).collect();
                let (l, row_loss, row_lse) = run(dt, vocab, &x, &targets, b, t);
                let mut want = [0.0f32];
                cpu::cross_entropy(rows, v, &x, &targets, &mut want).unwrap();
                let what = format!("cross_entropy {} rows={rows} V={vocab}", dt.name());
                // Inputs are quantised to their storage; the math and the loss are f32.
                check(&what, &[l], &want, 1e-5);
                // Per-row: 0 for ignored rows; lse written for every row.
                for (r, &tg) in targets.iter().enumerate() {
                    let row = &x[r * v..(r + 1) * v];
                    let mut one = [0.0f32];
                    cpu::cross_entropy(1, v, row, &[tg], &mut one).unwrap();
                    assert!((row_loss[r] - one[0]).abs() <= 1e-5 * one[0].abs().max(1.0), "{what} row {r}");
                    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let lse = m + row.iter().map(|&z| (z - m).exp()).sum::<f32>().ln();
                    assert!((row_lse[r] - lse).abs() <= 1e-5 * lse.abs().max(1.0), "{what} lse row {r}");
                }
            }
        }
    }
}

#[test]
fn cross_entropy_edge_cases() {
    let x = vec![1.0, 2.0, 3.0, 4.0];
    // No counted row: 0, not NaN.
    let (l, rows, _) = run(DType::F32, 2, &x, &[-1, -100], 2, 1);
    assert_eq!((l, rows.clone()), (0.0, vec![0.0, 0.0]));
    // A target beyond the vocabulary poisons the loss (NaN), never reads out of bounds.
    let (l, rows, _) = run(DType::F32, 2, &x, &[0, 2], 2, 1);
    assert!(l.is_nan() && rows[1].is_nan() && rows[0].is_finite());
    // Many rows: the mean kernel's grid-stride loop and its block reduction.
    let mut rng = Rng::new(9);
    let (b, t, v) = (4, 300, 16usize);
    let x = rng.normals(b * t * v, 2.0);
    let targets: Vec<i32> = (0..b * t).map(|r| if r % 7 == 0 { -1 } else { rng.below(v) as i32 }).collect();
    let (l, _, _) = run(DType::F32, v as u32, &x, &targets, b as i64, t as i64);
    let mut want = [0.0f32];
    cpu::cross_entropy(b * t, v, &x, &targets, &mut want).unwrap();
    check("cross_entropy 1200 rows", &[l], &want, 1e-5);
}

#[test]
fn for_op_reads_the_gir_node() {
    let l = TensorType::new(DType::Bf16, [Dim::sym(Sym::B), Dim::sym(Sym::T), Dim::constant(300)]);
    let t = TensorType::new(DType::I32, [Dim::sym(Sym::B), Dim::sym(Sym::T)]);
    let got = loss::for_op(&Op::CrossEntropy, &[l, t]).unwrap();
    let want = loss::cross_entropy(&bt(), 300, DType::Bf16).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.launch, w.launch);
        assert!(g.kernel == w.kernel, "{}", g.kernel.name);
    }
}
