//! softmax, argmax and top-k on the `sim`: softmax against an f64 evaluation, argmax against the
//! runtime's `sample::argmax`, top-k against a stable sort (value descending, index ascending), with
//! ties, −∞ and NaN rows, ragged vocabularies and every k up to 64.

mod kernels_util;

use flashc_codegen::kernels::sampling;
use flashc_compiler::gir::{Bindings, DType, Dim, Sym};
use flashc_runtime::sample;
use kernels_util::{Dev, Rng, at, check, quantize};

fn rows() -> Dim {
    Dim::sym(Sym::B)
}

fn softmax_ref(x: &[f32], v: usize) -> Vec<f32> {
    x.chunks(v)
        .flat_map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
            let e: Vec<f64> = row.iter().map(|&b| (f64::from(b) - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |x| (x / s) as f32)
        })
        .collect()
}

/// `b` rows of `v` logits (normal, scaled) stored as `dt`.
fn logits(rng: &mut Rng, dt: DType, b: usize, v: usize, scale: f32) -> Vec<f32> {
    quantize(dt, &rng.normals(b * v, scale))
}

fn sizes() -> Vec<Bindings> {
    vec![at(1, 1), at(7, 1), at(3, 1)]
}

const VOCABS: [u32; 6] = [1, 7, 100, 2048, 5003, 50_000];

#[test]
fn softmax_rows() {
    let mut rng = Rng::new(40);
    for dt in [DType::F32, DType::Bf16] {
        for v in VOCABS {
            let g = sampling::softmax(&rows(), v, dt).unwrap();
            for a in sizes() {
                if v == 50_000 && a.b > 1 {
                    continue;
                }
                let (b, vu) = (a.b as usize, v as usize);
                let x = logits(&mut rng, dt, b, vu, 4.0);
                let mut dev = Dev::new();
                let slots = [dev.input(dt, &x), dev.output(DType::F32, b * vu)];
                dev.launch(&g, &a, &slots);
                let what = format!("softmax {} rows={b} V={v}", dt.name());
                // The input is quantised; the math and the output are f32.
                check(&what, &dev.read(DType::F32, slots[1], b * vu), &softmax_ref(&x, vu), 1e-5);
            }
        }
    }
}

#[test]
fn softmax_with_masked_logits() {
    // −∞ entries (masked vocabulary) get probability 0; a large logit does not overflow.
    let v = 300usize;
    let mut rng = Rng::new(41);
    let mut x = rng.normals(2 * v, 2.0);
    for i in (0..2 * v).step_by(3) {
        x[i] = f32::NEG_INFINITY;
    }
    x[7] = 80.0;
    let g = sampling::softmax(&rows(), v as u32, DType::F32).unwrap();
    let mut dev = Dev::new();
    let slots = [dev.input(DType::F32, &x), dev.output(DType::F32, 2 * v)];
    dev.launch(&g, &at(2, 1), &slots);
    let got = dev.read(DType::F32, slots[1], 2 * v);
    check("softmax masked", &got, &softmax_ref(&x, v), 1e-5);
    assert!((0..2 * v).step_by(3).all(|i| got[i] == 0.0));
}

fn argmax_case(dt: DType, v: u32, x: &[f32], b: usize, what: &str) {
    let g = sampling::argmax(&rows(), v, dt).unwrap();
    let mut dev = Dev::new();
    let slots = [dev.input(dt, x), dev.output(DType::I32, b)];
    dev.launch(&g, &at(b as i64, 1), &slots);
    let got = dev.read_i32(slots[1], b);
    let want: Vec<i32> = x.chunks(v as usize).map(|r| sample::argmax(r) as i32).collect();
    assert_eq!(got, want, "{what}");
    println!("[err] argmax {what}: exact");
}

#[test]
fn argmax_rows_and_ties() {
    let mut rng = Rng::new(42);
    for dt in [DType::F32, DType::Bf16] {
        for v in VOCABS {
            for b in [1usize, 7] {
                if v == 50_000 && b > 1 {
                    continue;
                }
                let x = logits(&mut rng, dt, b, v as usize, 3.0);
                argmax_case(dt, v, &x, b, &format!("{} rows={b} V={v}", dt.name()));
            }
        }
        // Ties: small integers, many equal maxima; the lowest index wins.
        let v = 1000u32;
        let x: Vec<f32> = (0..4 * v as usize).map(|_| (rng.below(5)) as f32).collect();
        argmax_case(dt, v, &x, 4, &format!("{} ties", dt.name()));
    }
    // −∞ rows, NaN entries and an all-NaN row.
    let v = 64usize;
    let mut x = vec![f32::NEG_INFINITY; 3 * v];
    x[v + 5] = f32::NAN;
    x[v + 9] = 1.0;
    x[v + 40] = f32::NAN;
    x[2 * v..].fill(f32::NAN);
    argmax_case(DType::F32, v as u32, &x, 3, "−∞ and NaN rows");
}

/// The k largest of each row: indices and values, value descending, index ascending on ties.
fn top_k_ref(x: &[f32], v: usize, k: usize) -> (Vec<i32>, Vec<f32>) {
    let mut idx = Vec::new();
    let mut val = Vec::new();
    for row in x.chunks(v) {
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in &order[..k] {
            idx.push(i as i32);
            val.push(row[i]);
        }
    }
    (idx, val)
}

fn top_k_case(dt: DType, v: u32, k: u32, x: &[f32], b: usize, what: &str) {
    let g = sampling::top_k(&rows(), v, k, dt).unwrap();
    let mut dev = Dev::new();
    let n = b * k as usize;
    let slots = [dev.input(dt, x), dev.output(DType::I32, n), dev.output(DType::F32, n)];
    dev.launch(&g, &at(b as i64, 1), &slots);
    let (want_idx, want_val) = top_k_ref(x, v as usize, k as usize);
    let got_idx = dev.read_i32(slots[1], n);
    let got_val = dev.read(DType::F32, slots[2], n);
    assert_eq!(got_idx, want_idx, "top-k indices, {what}");
    assert_eq!(got_val, want_val, "top-k values, {what}");
    println!("[err] top_k {what}: exact");
}

#[test]
fn top_k_rows() {
    let mut rng = Rng::new(43);
    for dt in [DType::F32, DType::Bf16] {
        for v in [7u32, 100, 2048, 5003, 50_000] {
            for k in [1u32, 5, 64] {
                if k > v {
                    continue;
                }
                for b in [1usize, 3] {
                    if v >= 5003 && (b > 1 || k == 5) {
                        continue;
                    }
                    let x = logits(&mut rng, dt, b, v as usize, 3.0);
                    top_k_case(dt, v, k, &x, b, &format!("{} rows={b} V={v} k={k}", dt.name()));
                }
            }
        }
    }
    top_k_case(DType::F32, 1, 1, &[0.5, -2.0], 2, "V=1");
}

#[test]
fn top_k_ties_cut_by_index() {
    let mut rng = Rng::new(44);
    // Few distinct values: the k-th value is tied across the cut, the index passes decide.
    for (v, k) in [(1000u32, 64u32), (300, 10), (70_000, 33), (257, 64)] {
        let x: Vec<f32> = (0..2 * v as usize).map(|_| rng.below(7) as f32 - 3.0).collect();
        top_k_case(DType::F32, v, k, &x, 2, &format!("ties V={v} k={k}"));
    }
    // Equal values: the first k indices.
    let mut x = vec![1.25f32; 200];
    x[150..].fill(f32::NEG_INFINITY);
    x[10] = 0.0;
    x[11] = 0.0;
    let want: Vec<i32> = (0..66).filter(|i| *i != 10 && *i != 11).collect();
    top_k_exact(&x, 200, 64, &want);
    // −0 ties +0 (index order), −∞ ranks below every number and NaN below −∞.
    let mut x = vec![f32::NEG_INFINITY; 128];
    x[3] = -0.0;
    x[5] = 0.0;
    x[8] = 1.0;
    x[100] = f32::NAN;
    top_k_exact(&x, 128, 4, &[8, 3, 5, 0]);
    let mut x = vec![f32::NAN; 40];
    x[30] = f32::NEG_INFINITY;
    top_k_exact(&x, 40, 3, &[30, 0, 1]);
    assert!(sampling::top_k(&rows(), 10, 65, DType::F32).is_err());
    assert!(sampling::top_k(&rows(), 10, 11, DType::F32).is_err());
    assert!(sampling::top_k(&rows(), 10, 0, DType::F32).is_err());
}

fn top_k_exact(x: &[f32], v: u32, k: u32, want: &[i32]) {
    let g = sampling::top_k(&rows(), v, k, DType::F32).unwrap();
    let mut dev = Dev::new();
    let slots = [dev.input(DType::F32, x), dev.output(DType::I32, k as usize), dev.output(DType::F32, k as usize)];
    dev.launch(&g, &at(1, 1), &slots);
    assert_eq!(dev.read_i32(slots[1], k as usize), want);
}
