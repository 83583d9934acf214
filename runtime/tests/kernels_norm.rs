//! The norm generators on the `sim` against the `cpu` kernels: rmsnorm (warp- and block-per-row, the
//! long-row re-read path, per-head rows), the fused residual add_rmsnorm (with and without the sum),
//! l2norm and gated_rmsnorm (both gate orders, several groups), f32 and bf16.

mod kernels_util;

use flashc_codegen::kernels::norm::{self, NormKind, NormSpec};
use flashc_compiler::gir::{Bindings, DType, Dim, Op, Sym, TensorType, parse::parse};
use flashc_runtime::cpu;
use kernels_util::{Dev, Rng, at, check, quantize, tol};

fn bt() -> Dim {
    Dim::sym(Sym::B).mul(&Dim::sym(Sym::T))
}

/// Row counts: symbolic `B·T` at several sizes, and constants.
fn row_cases() -> Vec<(Dim, Bindings)> {
    vec![
        (bt(), at(2, 13)),
        (bt(), at(1, 1)),
        (Dim::constant(1), at(1, 1)),
        (Dim::constant(7), at(1, 1)),
        (Dim::constant(100), at(1, 1)),
    ]
}

/// Runs a norm spec and compares with the cpu kernels; `rows` evaluated at `at`.
fn run_spec(spec: &NormSpec, at: &Bindings, seed: u64) {
    let g = norm::norm(spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let rows = usize::try_from(spec.rows.eval(at)).unwrap();
    let d = spec.width as usize;
    let n = rows * d;
    let mut rng = Rng::new(seed);
    let mut dev = Dev::new();
    let x = quantize(spec.dtype, &rng.normals(n, 2.0));
    let r = quantize(spec.dtype, &rng.normals(n, 1.0));
    let w = quantize(spec.weight, &rng.normals(d, 1.0));
    let what = format!("{:?} {} rows={rows} width={d} {}", spec.kind, spec.dtype.name(), g.kernel.name);
    let t = tol(spec.dtype);
    match spec.kind {
        NormKind::RmsNorm => {
            let slots = [dev.input(spec.dtype, &x), dev.input(spec.weight, &w), dev.output(spec.dtype, n)];
            dev.launch(&g, at, &slots);
            let mut want = vec![0.0; n];
            cpu::rmsnorm(rows, d, &x, &w, spec.eps, &mut want).unwrap();
            check(&what, &dev.read(spec.dtype, slots[2], n), &want, t);
        }
        NormKind::L2Norm => {
            let slots = [dev.input(spec.dtype, &x), dev.output(spec.dtype, n)];
            dev.launch(&g, at, &slots);
            let mut want = vec![0.0; n];
            cpu::l2norm(rows, d, &x, spec.eps, &mut want).unwrap();
            check(&what, &dev.read(spec.dtype, slots[1], n), &want, t);
        }
        NormKind::AddRmsNorm { write_sum } => {
            let mut slots = vec![dev.input(spec.dtype, &x), dev.input(spec.dtype, &r), dev.input(spec.weight, &w)];
            if write_sum {
                slots.push(dev.output(spec.dtype, n));
            }
            slots.push(dev.output(spec.dtype, n));
            dev.launch(&g, at, &slots);
            let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
            let mut want = vec![0.0; n];
            cpu::rmsnorm(rows, d, &sum, &w, spec.eps, &mut want).unwrap();
            if write_sum {
                check(&format!("{what} sum"), &dev.read(spec.dtype, slots[3], n), &sum, t);
            }
            check(&what, &dev.read(spec.dtype, *slots.last().unwrap(), n), &want, t);
        }
        NormKind::GatedRmsNorm { group, norm_before_gate } => {
            let slots = [
                dev.input(spec.dtype, &x),
                dev.input(spec.dtype, &r),
                dev.input(spec.weight, &w),
                dev.output(spec.dtype, n),
            ];
            dev.launch(&g, at, &slots);
            let mut want = vec![0.0; n];
            cpu::gated_rmsnorm(rows, d, &x, &r, &w, spec.eps, group as usize, norm_before_gate, &mut want).unwrap();
            check(&what, &dev.read(spec.dtype, slots[3], n), &want, t);
        }
    }
}

fn spec(kind: NormKind, rows: &Dim, width: u32, dtype: DType, weight: DType) -> NormSpec {
    NormSpec { kind, rows: rows.clone(), width, dtype, weight, eps: 1e-6 }
}

#[test]
fn rmsnorm_warp_and_block_rows() {
    let mut seed = 0;
    for dt in [DType::F32, DType::Bf16] {
        for width in [64, 100, 7, 2048, 1000] {
            for (rows, a) in row_cases() {
                if width >= 1000 && rows.eval(&a) > 26 {
                    continue;
                }
                seed += 1;
                run_spec(&spec(NormKind::RmsNorm, &rows, width, dt, dt), &a, seed);
            }
        }
    }
    // A bf16 activation with an f32 weight, and 2048 rows of a per-head width.
    run_spec(&spec(NormKind::RmsNorm, &bt(), 256, DType::Bf16, DType::F32), &at(2, 13), 90);
    run_spec(&spec(NormKind::RmsNorm, &Dim::constant(2048), 64, DType::Bf16, DType::Bf16), &at(1, 1), 91);
}

#[test]
fn rmsnorm_per_head_rows() {
    // rows = B·T·heads, width = head_dim: a warp per row, 4 rows per block.
    let heads = Dim::sym(Sym::B).mul(&Dim::sym(Sym::T)).scale(4);
    for dt in [DType::F32, DType::Bf16] {
        for hd in [64, 128] {
            for a in [at(2, 13), at(1, 1), at(3, 1)] {
                run_spec(&spec(NormKind::RmsNorm, &heads, hd, dt, dt), &a, u64::from(hd));
            }
        }
    }
}

#[test]
fn rmsnorm_long_rows_reread() {
    // More than 16 values per thread of a 1024-thread block: 512 threads re-read the row; just below,
    // 1024 threads keep their values.
    for (dt, width, reread) in [
        (DType::Bf16, 20_000, true),
        (DType::F32, 20_000, true),
        (DType::F32, 16_390, true),
        (DType::Bf16, 16_384, false),
        (DType::F32, 16_384, false),
    ] {
        let g = norm::norm(&spec(NormKind::RmsNorm, &bt(), width, dt, dt)).unwrap();
        assert_eq!(g.kernel.doc.iter().any(|l| l.contains("re-read")), reread, "{:?}", g.kernel.doc);
        for a in [at(1, 2), at(1, 1)] {
            run_spec(&spec(NormKind::RmsNorm, &bt(), width, dt, dt), &a, 7);
            run_spec(&spec(NormKind::AddRmsNorm { write_sum: true }, &bt(), width, dt, dt), &a, 8);
            let kind = NormKind::GatedRmsNorm { group: width / 2, norm_before_gate: true };
            run_spec(&spec(kind, &bt(), width, dt, dt), &a, 9);
        }
    }
}

#[test]
fn add_rmsnorm_with_and_without_sum() {
    for dt in [DType::F32, DType::Bf16] {
        for write_sum in [true, false] {
            for width in [64, 100, 2048] {
                for (rows, a) in [(bt(), at(2, 13)), (bt(), at(1, 1)), (Dim::constant(7), at(1, 1))] {
                    run_spec(&spec(NormKind::AddRmsNorm { write_sum }, &rows, width, dt, dt), &a, u64::from(width));
                }
            }
        }
    }
}

#[test]
fn add_rmsnorm_from_the_fused_body() {
    for (outs, write_sum) in [("output \"0\" = %2\n output \"1\" = %4", true), ("output \"0\" = %4", false)] {
        let text = format!(
            "gir @add_rmsnorm {{
              %0 = input[name=\"p0\", role=\"param\", index=0] : bf16[B, 1, 64]
              %1 = input[name=\"p1\", role=\"param\", index=1] : bf16[B, 1, 64]
              %2 = add(%0, %1) : bf16[B, 1, 64]
              %3 = input[name=\"p2\", role=\"param\", index=2] : bf16[64]
              %4 = rmsnorm[eps=1e-6](%2, %3) : bf16[B, 1, 64]
              {outs}
            }}"
        );
        let body = parse(&text).unwrap();
        let g = norm::for_add_rmsnorm(&body).unwrap();
        let direct = norm::add_rmsnorm(&Dim::sym(Sym::B), 64, DType::Bf16, DType::Bf16, 1e-6, write_sum).unwrap();
        assert_eq!(g, direct);
    }
    let text = "gir @other {
      %0 = input[name=\"p0\", role=\"param\", index=0] : bf16[B, 64]
      %1 = silu(%0) : bf16[B, 64]
      output \"0\" = %1
    }";
    assert!(norm::for_add_rmsnorm(&parse(text).unwrap()).is_err());
}

#[test]
fn l2norm_rows() {
    for dt in [DType::F32, DType::Bf16] {
        for width in [64, 100, 128, 7, 3000] {
            for (rows, a) in [(bt(), at(2, 13)), (bt(), at(1, 1)), (Dim::constant(100), at(1, 1))] {
                if width == 3000 && rows.eval(&a) > 26 {
                    continue;
                }
                run_spec(&spec(NormKind::L2Norm, &rows, width, dt, dt), &a, u64::from(width));
            }
        }
    }
}

#[test]
fn gated_rmsnorm_orders_and_groups() {
    let mut seed = 100;
    for dt in [DType::F32, DType::Bf16] {
        for nbg in [false, true] {
            for (width, group) in [(256, 64), (256, 256), (4096, 1024), (2048, 2048), (30, 10), (96, 48)] {
                for a in [at(2, 13), at(1, 1)] {
                    seed += 1;
                    let kind = NormKind::GatedRmsNorm { group, norm_before_gate: nbg };
                    run_spec(&spec(kind, &bt(), width, dt, dt), &a, seed);
                }
            }
        }
    }
}

#[test]
fn for_op_reads_the_gir_node() {
    let x = TensorType::new(DType::Bf16, [Dim::sym(Sym::B), Dim::sym(Sym::T), Dim::constant(4), Dim::constant(64)]);
    let w = TensorType::new(DType::Bf16, [Dim::constant(64)]);
    let g = norm::for_op(&Op::RmsNorm { eps: 1e-6 }, &[x.clone(), w.clone()]).unwrap();
    let want = norm::rmsnorm(&bt().scale(4), 64, DType::Bf16, DType::Bf16, 1e-6).unwrap();
    assert_eq!(g, want);
    let op = Op::GatedRmsNorm { eps: 1e-5, group: 32, norm_before_gate: false };
    assert!(norm::for_op(&op, &[x.clone(), x.clone(), w.clone()]).is_ok());
    assert!(norm::for_op(&Op::Silu, &[x]).is_err());
    assert!(norm::gated_rmsnorm(&bt(), 64, DType::F32, DType::F32, 1e-5, 48, false).is_err());
}
