//! The layout kernels (`codegen::kernels::layout`: `concat`, `split`, `row_inv_norm`) on the `sim`
//! device against the `cpu` reference: ragged, aligned and symbolic shapes in bf16, f32 and i32
//! (outputs poisoned first), and the prep groups of the examples through the dispatcher against
//! `cpu::exec::eval_group`. Copies must be bit-exact; norms within the DESIGN.md tolerances.

mod kernels_util;

use flashc_codegen::kernels::layout;
use flashc_compiler::gir::{DType, Dim, Mode, Op, Sym, TensorType};
use kernels_util::{Dev, Rng, at, check, example_program, group_vs_cpu, quantize, tol};

fn ty(dtype: DType, shape: &[Dim]) -> TensorType {
    TensorType::new(dtype, shape.to_vec())
}

fn c(x: i64) -> Dim {
    Dim::constant(x)
}

fn dims(t: &TensorType, b: i64) -> Vec<usize> {
    t.shape.iter().map(|d| d.eval(&at(b, 1)) as usize).collect()
}

/// The cpu's concat: for every outer index, each operand's run along the axis and the inner dims.
fn cpu_concat(axis: usize, shapes: &[Vec<usize>], xs: &[Vec<f32>]) -> Vec<f32> {
    let outer: usize = shapes[0][..axis].iter().product();
    let inner: usize = shapes[0][axis + 1..].iter().product();
    let mut o = Vec::new();
    for i in 0..outer {
        for (s, x) in shapes.iter().zip(xs) {
            let w = s[axis] * inner;
            o.extend_from_slice(&x[i * w..(i + 1) * w]);
        }
    }
    o
}

/// The cpu's split: consecutive pieces of `sizes` along `axis`.
fn cpu_split(axis: usize, shape: &[usize], sizes: &[usize], x: &[f32]) -> Vec<Vec<f32>> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut off = 0;
    sizes
        .iter()
        .map(|&piece| {
            let mut o = Vec::new();
            for i in 0..outer {
                let base = (i * shape[axis] + off) * inner;
                o.extend_from_slice(&x[base..base + piece * inner]);
            }
            off += piece;
            o
        })
        .collect()
}

/// Random values for `n` elements of `dtype` (integers for i32).
fn values(rng: &mut Rng, dtype: DType, n: usize) -> Vec<f32> {
    match dtype {
        DType::I32 => (0..n).map(|_| (rng.below(1000) + 1) as f32).collect(),
        _ => quantize(dtype, &rng.normals(n, 1.0)),
    }
}

fn upload(dev: &mut Dev, dtype: DType, v: &[f32]) -> u64 {
    match dtype {
        DType::I32 => dev.input_i32(&v.iter().map(|x| *x as i32).collect::<Vec<_>>()),
        _ => dev.input(dtype, v),
    }
}

fn download(dev: &Dev, dtype: DType, a: u64, n: usize) -> Vec<f32> {
    match dtype {
        DType::I32 => dev.read_i32(a, n).into_iter().map(|x| x as f32).collect(),
        _ => dev.read(dtype, a, n),
    }
}

/// Copies must reproduce every element exactly (and write every one: poison is NaN, or −1 as i32).
#[track_caller]
fn exact(what: &str, dtype: DType, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what} ({}): element {i} is {g}, expected {w}", dtype.name());
    }
    println!("[err] {what} ({}): exact, {} elements", dtype.name(), got.len());
}

fn concat_case(rng: &mut Rng, dtype: DType, axis: u32, parts: &[Vec<Dim>], b: i64) {
    let ins: Vec<TensorType> = parts.iter().map(|s| ty(dtype, s)).collect();
    let mut out_shape = parts[0].clone();
    out_shape[axis as usize] = parts.iter().fold(c(0), |acc, s| acc.add(&s[axis as usize]));
    let out = ty(dtype, &out_shape);
    let g = layout::for_op(&Op::Concat { axis }, &ins, std::slice::from_ref(&out), "concat_test").unwrap();
    let shapes: Vec<Vec<usize>> = ins.iter().map(|t| dims(t, b)).collect();
    let xs: Vec<Vec<f32>> = shapes.iter().map(|s| values(rng, dtype, s.iter().product())).collect();
    let mut dev = Dev::new();
    let mut slots: Vec<u64> = xs.iter().map(|x| upload(&mut dev, dtype, x)).collect();
    let n: usize = dims(&out, b).iter().product();
    slots.push(dev.output(dtype, n));
    dev.launch(&g, &at(b, 1), &slots);
    let got = download(&dev, dtype, slots[parts.len()], n);
    let want = cpu_concat(axis as usize, &shapes, &xs);
    let desc: Vec<String> = ins.iter().map(ToString::to_string).collect();
    exact(&format!("concat axis {axis} of [{}] at B={b}", desc.join(", ")), dtype, &got, &want);
}

fn split_case(rng: &mut Rng, dtype: DType, axis: u32, shape: &[Dim], sizes: &[Dim], b: i64) {
    let x = ty(dtype, shape);
    let results: Vec<TensorType> = sizes
        .iter()
        .map(|s| {
            let mut sh = shape.to_vec();
            sh[axis as usize] = s.clone();
            ty(dtype, &sh)
        })
        .collect();
    let op = Op::Split { axis, sizes: sizes.to_vec() };
    let g = layout::for_op(&op, std::slice::from_ref(&x), &results, "split_test").unwrap();
    let xs = dims(&x, b);
    let xv = values(rng, dtype, xs.iter().product());
    let mut dev = Dev::new();
    let mut slots = vec![upload(&mut dev, dtype, &xv)];
    let ns: Vec<usize> = results.iter().map(|t| dims(t, b).iter().product()).collect();
    for n in &ns {
        slots.push(dev.output(dtype, *n));
    }
    dev.launch(&g, &at(b, 1), &slots);
    let sizes_at: Vec<usize> = sizes.iter().map(|s| s.eval(&at(b, 1)) as usize).collect();
    let want = cpu_split(axis as usize, &xs, &sizes_at, &xv);
    for (j, (n, w)) in ns.iter().zip(&want).enumerate() {
        let got = download(&dev, dtype, slots[1 + j], *n);
        exact(&format!("split axis {axis} of {x} at B={b}: piece {j}"), dtype, &got, w);
    }
}

#[test]
fn concat_matches_cpu() {
    let mut rng = Rng::new(1);
    let b = Dim::sym(Sym::B);
    for dtype in [DType::F32, DType::Bf16] {
        // Fused projection weights: rows of whole operands (16-byte copies).
        concat_case(&mut rng, dtype, 0, &[vec![c(5), c(8)], vec![c(3), c(8)], vec![c(1), c(8)]], 1);
        // Ragged widths along the last axis: odd offsets force element copies.
        concat_case(&mut rng, dtype, 1, &[vec![c(3), c(7)], vec![c(3), c(5)], vec![c(3), c(1)]], 1);
        // A middle axis, and symbolic rows (sizes as parameters).
        concat_case(&mut rng, dtype, 1, &[vec![c(2), c(3), c(4)], vec![c(2), c(5), c(4)]], 1);
        concat_case(&mut rng, dtype, 1, &[vec![b.clone(), c(6)], vec![b.clone(), c(10)]], 3);
    }
    concat_case(&mut rng, DType::I32, 2, &[vec![c(2), c(3), c(4)], vec![c(2), c(3), c(2)]], 1);
    // Large enough that the grid-stride loops wrap (more vectors than threads of a block).
    concat_case(&mut rng, DType::Bf16, 0, &[vec![c(70), c(64)], vec![c(30), c(64)]], 1);
}

#[test]
fn split_matches_cpu() {
    let mut rng = Rng::new(2);
    let b = Dim::sym(Sym::B);
    for dtype in [DType::F32, DType::Bf16] {
        split_case(&mut rng, dtype, 1, &[c(4), c(20)], &[c(8), c(4), c(6), c(2)], 1);
        split_case(&mut rng, dtype, 0, &[c(9), c(6)], &[c(4), c(5)], 1);
        // The decode projection row of a Gated DeltaNet layer: [q, k, v, b, a, z].
        let sizes = [64, 64, 128, 2, 2, 128].map(c);
        split_case(&mut rng, dtype, 2, &[b.clone(), c(1), c(388)], &sizes, 3);
    }
    split_case(&mut rng, DType::I32, 1, &[c(3), c(5), c(2)], &[c(2), c(3)], 1);
}

/// `1 / ‖w[r]‖₂` in f64, 0 for a zero row (the cpu's `row_inv_norm`).
fn cpu_row_inv_norm(w: &[f32], rows: usize, h: usize) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            let n = w[r * h..(r + 1) * h].iter().map(|a| f64::from(*a) * f64::from(*a)).sum::<f64>().sqrt();
            if n > 0.0 { (1.0 / n) as f32 } else { 0.0 }
        })
        .collect()
}

#[test]
fn row_inv_norm_matches_cpu() {
    let mut rng = Rng::new(3);
    for dtype in [DType::F32, DType::Bf16] {
        for (rows, h, zero_row) in
            [(7usize, 100usize, false), (33, 2048, false), (5, 1, false), (4, 6, true), (3, 33, false)]
        {
            let w_ty = ty(dtype, &[c(rows as i64), c(h as i64)]);
            let out_ty = ty(DType::F32, &[c(rows as i64)]);
            let g =
                layout::for_op(&Op::RowInvNorm, std::slice::from_ref(&w_ty), &[out_ty], "row_inv_norm_test").unwrap();
            let mut w = quantize(dtype, &rng.normals(rows * h, 0.05));
            if zero_row {
                w[h..2 * h].fill(0.0);
            }
            let mut dev = Dev::new();
            let slots = [dev.input(dtype, &w), dev.output(DType::F32, rows)];
            dev.launch(&g, &at(1, 1), &slots);
            let got = dev.read(DType::F32, slots[1], rows);
            let want = cpu_row_inv_norm(&w, rows, h);
            if zero_row {
                assert_eq!(got[1], 0.0, "a zero row has inverse norm 0");
            }
            // f32 out, f32 accumulation: the f32 tolerance whatever the weight's storage.
            check(&format!("row_inv_norm [{rows}, {h}] {}", dtype.name()), &got, &want, tol(DType::F32));
        }
    }
}

/// Every `concat`, `split` and `row_inv_norm` group of the examples' programs, dispatched, on the sim
/// against the cpu's evaluation of the same group.
#[test]
fn example_layout_groups_match_cpu() {
    let bf16 = |t: String| t.replace("dtype = f32 ", "dtype = bf16 ");
    let programs = [
        ("tiny-hybrid f32 decode", example_program("tiny-hybrid", Mode::Decode, |t| t)),
        ("tiny-hybrid bf16 decode", example_program("tiny-hybrid", Mode::Decode, bf16)),
        ("tiny-hybrid f32 prefill", example_program("tiny-hybrid", Mode::Prefill, |t| t)),
    ];
    let mut rng = Rng::new(4);
    let mut seen = 0;
    for (what, p) in &programs {
        for group in p.prep.iter().chain(&p.kernels) {
            if !matches!(group.name.as_str(), "concat" | "split" | "row_inv_norm") {
                continue;
            }
            seen += 1;
            let (_, outs) = group_vs_cpu(p, group, &at(2, 5), |_, _, n| rng.normals(n, 0.1));
            for o in outs {
                let name = format!("{what}: {}", o.what);
                if group.name == "row_inv_norm" {
                    check(&name, &o.sim, &o.cpu, tol(DType::F32));
                } else {
                    exact(&name, o.dtype, &o.sim, &o.cpu);
                }
            }
        }
    }
    assert!(seen >= 10, "only {seen} layout groups in the examples");
}
