//! row_norm_logits (row norms of the LM head, then the scaling kernel) on the `sim` against the `cpu`
//! kernel.

mod kernels_util;

use flashc_codegen::kernels::logits;
use flashc_compiler::gir::{DType, Dim, Op, Sym, TensorType};
use flashc_runtime::cpu;
use kernels_util::{Dev, Rng, at, check, quantize};

#[test]
fn row_norm_logits_matches_cpu() {
    let rows = Dim::sym(Sym::B).mul(&Dim::sym(Sym::T));
    let mut seed = 0;
    for ldt in [DType::F32, DType::Bf16] {
        for wdt in [DType::F32, DType::Bf16] {
            for (vocab, hidden) in [(100u32, 64u32), (7, 7), (1000, 100), (2048, 16), (1, 5)] {
                let [norms_k, scale_k] = logits::row_norm_logits(&rows, vocab, hidden, ldt, wdt).unwrap();
                for a in [at(2, 13), at(1, 1), at(1, 7)] {
                    seed += 1;
                    let mut rng = Rng::new(seed);
                    let (r, v, h) = ((a.b * a.t) as usize, vocab as usize, hidden as usize);
                    let l = quantize(ldt, &rng.normals(r * v, 3.0));
                    let w = quantize(wdt, &rng.normals(v * h, 0.5));
                    let mut dev = Dev::new();
                    let slots = [
                        dev.input(ldt, &l),
                        dev.input(wdt, &w),
                        dev.output(DType::F32, r * v),
                        dev.output(DType::F32, v),
                    ];
                    dev.launch(&norms_k, &a, &slots);
                    dev.launch(&scale_k, &a, &slots);
                    let mut want = vec![0.0; r * v];
                    cpu::row_norm_logits(r, v, h, &l, &w, &mut want).unwrap();
                    let what = format!("row_norm_logits logits {} w {} rows={r} V={v} H={h}", ldt.name(), wdt.name());
                    // Inputs are quantised to their storage; the math and the output are f32.
                    check(&what, &dev.read(DType::F32, slots[2], r * v), &want, 1e-5);
                }
            }
        }
    }
}

#[test]
fn for_op_reads_the_gir_node() {
    let l = TensorType::new(DType::F32, [Dim::sym(Sym::B), Dim::constant(1), Dim::constant(300)]);
    let w = TensorType::new(DType::Bf16, [Dim::constant(300), Dim::constant(64)]);
    let got = logits::for_op(&Op::RowNormLogits, &[l, w]).unwrap();
    let want = logits::row_norm_logits(&Dim::sym(Sym::B), 300, 64, DType::F32, DType::Bf16).unwrap();
    assert_eq!(got, want);
    assert!(logits::for_op(&Op::Silu, &[]).is_err());
}
