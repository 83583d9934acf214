//! The gather generators on the `sim` against the `cpu` kernels: embed (16-byte and narrower copies,
//! ragged widths, bad ids written as zeros), meta_prefix and the fused embed_meta_prefix.

mod kernels_util;

use flashc_codegen::kernels::embed;
use flashc_compiler::gir::{Bindings, DType, Dim, Op, Sym, TensorType};
use flashc_runtime::cpu;
use kernels_util::{Dev, Rng, at, check, quantize};

fn bt() -> Dim {
    Dim::sym(Sym::B).mul(&Dim::sym(Sym::T))
}

fn ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(vocab) as i32).collect()
}

/// Exact copies: the error must be 0.
const EXACT: f64 = 1e-30;

#[test]
fn embed_gathers_rows() {
    let mut rng = Rng::new(11);
    let vocab = 50;
    for dt in [DType::F32, DType::Bf16] {
        for hidden in [64u32, 100, 7, 2048, 3] {
            let g = embed::embed(&bt(), vocab, hidden, dt).unwrap();
            for a in [at(2, 13), at(1, 1), at(3, 1)] {
                let n = (a.b * a.t) as usize;
                let h = hidden as usize;
                let table = quantize(dt, &rng.normals(vocab as usize * h, 1.0));
                let id = ids(&mut rng, n, vocab as usize);
                let mut dev = Dev::new();
                let slots = [dev.input(dt, &table), dev.input_i32(&id), dev.output(dt, n * h)];
                dev.launch(&g, &a, &slots);
                let mut want = vec![0.0; n * h];
                cpu::embed(vocab as usize, h, &table, &id, &mut want).unwrap();
                let what = format!("embed {} hidden={hidden} ids={n} ({})", dt.name(), g.kernel.doc[1]);
                check(&what, &dev.read(dt, slots[2], n * h), &want, EXACT);
            }
        }
    }
}

#[test]
fn embed_writes_zeros_for_bad_ids() {
    let (vocab, hidden) = (10u32, 16u32);
    let g = embed::embed(&Dim::constant(4), vocab, hidden, DType::Bf16).unwrap();
    let mut rng = Rng::new(12);
    let table = quantize(DType::Bf16, &rng.normals(160, 1.0));
    let mut dev = Dev::new();
    let slots = [dev.input(DType::Bf16, &table), dev.input_i32(&[3, -1, 10, 9]), dev.output(DType::Bf16, 64)];
    dev.launch(&g, &at(1, 1), &slots);
    let out = dev.read(DType::Bf16, slots[2], 64);
    assert_eq!(&out[..16], &table[48..64]);
    assert!(out[16..48].iter().all(|x| *x == 0.0), "rows of bad ids are zeros");
    assert_eq!(&out[48..], &table[144..160]);
}

fn meta_case(dt: DType, m: u32, hidden: u32, a: &Bindings, fused: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let (b, t, h, mu) = (a.b as usize, a.t as usize, hidden as usize, m as usize);
    let vocab = 37u32;
    let meta = quantize(dt, &rng.normals(mu * h, 1.0));
    let table = quantize(dt, &rng.normals(vocab as usize * h, 1.0));
    let id = ids(&mut rng, b * t, vocab as usize);
    let mut x = vec![0.0; b * t * h];
    cpu::embed(vocab as usize, h, &table, &id, &mut x).unwrap();
    let mut want = vec![0.0; b * (mu + t) * h];
    cpu::meta_prefix(mu, b, t, h, &meta, &x, &mut want).unwrap();
    let mut dev = Dev::new();
    let n = want.len();
    let (g, slots) = if fused {
        let g = embed::embed_meta_prefix(m, &Dim::sym(Sym::B), &Dim::sym(Sym::T), vocab, hidden, dt).unwrap();
        let s = vec![dev.input(dt, &table), dev.input_i32(&id), dev.input(dt, &meta), dev.output(dt, n)];
        (g, s)
    } else {
        let g = embed::meta_prefix(m, &Dim::sym(Sym::B), &Dim::sym(Sym::T), hidden, dt).unwrap();
        let s = vec![dev.input(dt, &meta), dev.input(dt, &x), dev.output(dt, n)];
        (g, s)
    };
    dev.launch(&g, a, &slots);
    let what = format!("{} {} m={m} hidden={hidden} B={b} T={t}", g.kernel.name, dt.name());
    check(&what, &dev.read(dt, *slots.last().unwrap(), n), &want, EXACT);
}

#[test]
fn meta_prefix_and_fused_gather() {
    let mut seed = 20;
    for dt in [DType::F32, DType::Bf16] {
        for (m, hidden) in [(3u32, 64u32), (256, 16), (1, 100), (5, 7)] {
            for a in [at(2, 13), at(1, 1), at(3, 1)] {
                for fused in [false, true] {
                    seed += 1;
                    meta_case(dt, m, hidden, &a, fused, seed);
                }
            }
        }
    }
}

#[test]
fn for_op_reads_the_gir_node() {
    let table = TensorType::new(DType::Bf16, [Dim::constant(50), Dim::constant(64)]);
    let ids = TensorType::new(DType::I32, [Dim::sym(Sym::B), Dim::sym(Sym::T)]);
    assert_eq!(embed::for_op(&Op::Embed, &[table, ids]).unwrap(), embed::embed(&bt(), 50, 64, DType::Bf16).unwrap());
    let meta = TensorType::new(DType::Bf16, [Dim::constant(4), Dim::constant(64)]);
    let x = TensorType::new(DType::Bf16, [Dim::sym(Sym::B), Dim::sym(Sym::T), Dim::constant(64)]);
    let want = embed::meta_prefix(4, &Dim::sym(Sym::B), &Dim::sym(Sym::T), 64, DType::Bf16).unwrap();
    assert_eq!(embed::for_op(&Op::MetaPrefix, &[meta, x]).unwrap(), want);
}
