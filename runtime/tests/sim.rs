//! The `sim` device: tiny kir kernels, built with the `Builder`, checked against hand-computed results
//! instruction family by instruction family, and every error detector on a kernel that trips it.

mod fragments;

use flashc_codegen::kir::{
    AtomOp, BinOp, Builder, Cache, Cmp, Inst, Kernel, Operand, ParamTy, Reg, Round, ShflMode, Space, Special, Ty, UnOp,
    VoteMode,
};
use flashc_runtime::sim::{Arg, GlobalMemory, Launch, SimError, SimErrorKind, Stats, run};

// ---------------------------------------------------------------------------------------------- helpers

fn launch(grid: u32, block: u32) -> Launch {
    Launch { grid: [grid, 1, 1], block: [block, 1, 1], dynamic_shared: 0 }
}

/// A deterministic stream of pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn alloc_f32(mem: &mut GlobalMemory, v: &[f32]) -> u64 {
    let a = mem.alloc(v.len() * 4);
    mem.write_f32(a, v).expect("in bounds");
    a
}

fn alloc_u32(mem: &mut GlobalMemory, v: &[u32]) -> u64 {
    let a = mem.alloc(v.len() * 4);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    mem.write(a, &bytes).expect("in bounds");
    a
}

fn read_u32(mem: &GlobalMemory, a: u64, n: usize) -> Vec<u32> {
    mem.read_i32(a, n).expect("in bounds").into_iter().map(|x| x as u32).collect()
}

fn read_u64(mem: &GlobalMemory, a: u64, n: usize) -> Vec<u64> {
    let b = mem.read(a, n * 8).expect("in bounds");
    b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

/// Runs a kernel that must succeed.
fn ok(k: &Kernel, l: Launch, args: &[Arg], mem: &mut GlobalMemory) -> Stats {
    match run(k, &l, args, mem) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// Runs a kernel that must fail, and checks that the message names the kernel and the instruction.
fn fails(k: &Kernel, l: Launch, args: &[Arg], mem: &mut GlobalMemory, inst: &str) -> SimError {
    let e = run(k, &l, args, mem).expect_err("the sim must reject this kernel");
    let msg = e.to_string();
    assert!(msg.contains(&k.name), "the message names the kernel: {msg}");
    assert!(msg.contains(inst), "the message names the instruction `{inst}`: {msg}");
    e
}

/// Thread `tid.x` as a u32 register and the global address `p + 4 * tid.x`.
fn tid_addr(b: &mut Builder, p: Reg) -> (Reg, Reg) {
    let t = b.special(Special::TidX);
    let a = b.index(p, t, 4);
    (t, a)
}

// ---------------------------------------------------------------------------------------------- basics

#[test]
fn scale_by_two_with_a_bounds_check() {
    let mut b = Builder::new("scale2");
    let x = b.param_ptr("x");
    let y = b.param_ptr("y");
    let n = b.param(ParamTy::U32, "n");
    let i = b.global_index_x();
    let inside = b.setp(Cmp::Lt, Ty::U32, i.into(), n.into());
    b.if_(inside, |b| {
        let xa = b.index(x, i, 4);
        let v = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0);
        let w = b.bin(BinOp::Mul, Ty::F32, v.into(), 2.0f32.into());
        let ya = b.index(y, i, 4);
        b.st(Space::Global, Ty::F32, ya.into(), 0, w.into());
    });
    let k = b.finish();

    let mut mem = GlobalMemory::new();
    let xs = Rng(1).f32s(100);
    let xa = alloc_f32(&mut mem, &xs);
    let ya = mem.alloc(100 * 4);
    let stats = ok(&k, launch(4, 32), &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::U32(100)], &mut mem);
    let ys = mem.read_f32(ya, 100).expect("read");
    assert_eq!(ys, xs.iter().map(|x| x * 2.0).collect::<Vec<_>>());
    assert_eq!(stats.blocks, 4);
    assert!(stats.instructions > 0);
}

#[test]
fn grid_stride_loop_with_divergent_trip_counts() {
    // y[i] = i * 3 + 1 for i < n, with a grid-stride loop: threads run different numbers of
    // iterations and leave the loop on their own.
    let mut b = Builder::new("grid_stride");
    let y = b.param_ptr("y");
    let n = b.param(ParamTy::U32, "n");
    let i0 = b.global_index_x();
    let nb = b.special(Special::NctaidX);
    let nt = b.special(Special::NtidX);
    let stride = b.mul(Ty::U32, nb.into(), nt.into());
    b.for_(Ty::U32, i0.into(), n.into(), stride.into(), |b, i| {
        let v = b.mad(Ty::U32, i.into(), 3u32.into(), 1u32.into());
        let a = b.index(y, i, 4);
        b.st(Space::Global, Ty::U32, a.into(), 0, v.into());
    });
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let n = 1000;
    let ya = mem.alloc(n * 4);
    ok(&k, launch(3, 64), &[Arg::Ptr(ya), Arg::U32(n as u32)], &mut mem);
    let got = read_u32(&mem, ya, n);
    assert_eq!(got, (0..n as u32).map(|i| i * 3 + 1).collect::<Vec<_>>());
}

/// A block sum: each warp reduces with `shfl.bfly`, lane 0 of each warp writes its partial to shared
/// memory, a barrier, then warp 0 reduces the partials.
fn block_sum_kernel() -> Kernel {
    let mut b = Builder::new("block_sum");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let partial = b.shared("partial", 8 * 4, 4);
    let i = b.global_index_x();
    let xa = b.index(x, i, 4);
    let v = b.ld(Space::Global, Ty::F32, Cache::None, xa.into(), 0);
    let s = b.warp_reduce(BinOp::Add, Ty::F32, v);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let first = b.setp(Cmp::Eq, Ty::U32, lane.into(), 0u32.into());
    b.if_(first, |b| {
        let a = b.index_shared(partial, warp.into(), 4);
        b.st(Space::Shared, Ty::F32, a.into(), 0, s.into());
    });
    b.bar();
    let w0 = b.setp(Cmp::Eq, Ty::U32, warp.into(), 0u32.into());
    b.if_(w0, |b| {
        let has = b.setp(Cmp::Lt, Ty::U32, lane.into(), 8u32.into());
        let p = b.mov(Ty::F32, 0.0f32.into());
        b.if_(has, |b| {
            let a = b.index_shared(partial, lane.into(), 4);
            let q = b.ld(Space::Shared, Ty::F32, Cache::None, a.into(), 0);
            b.assign(p, q.into());
        });
        let total = b.warp_reduce(BinOp::Add, Ty::F32, p);
        b.if_(first, |b| {
            let c = b.special(Special::CtaidX);
            let oa = b.index(out, c, 4);
            b.st(Space::Global, Ty::F32, oa.into(), 0, total.into());
        });
    });
    b.finish()
}

#[test]
fn block_reduction_with_shuffles_shared_memory_and_a_barrier() {
    let k = block_sum_kernel();
    let mut mem = GlobalMemory::new();
    // Small integers, so every order of summation gives the exact result.
    let xs: Vec<f32> = (0..512).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let xa = alloc_f32(&mut mem, &xs);
    let oa = mem.alloc(2 * 4);
    let stats = ok(&k, launch(2, 256), &[Arg::Ptr(xa), Arg::Ptr(oa)], &mut mem);
    let got = mem.read_f32(oa, 2).expect("read");
    let want: Vec<f32> = xs.chunks(256).map(|c| c.iter().sum()).collect();
    assert_eq!(got, want);
    assert_eq!(stats.barriers, 2);
}

// ---------------------------------------------------------------------------------------------- integers

#[test]
fn integer_arithmetic_wraps_and_respects_signedness() {
    // Each thread computes one case; the cases are rows of (op, ty, a, b, expected low 32 bits).
    let cases: Vec<(BinOp, Ty, i64, i64, u32)> = vec![
        (BinOp::Add, Ty::U32, 0xFFFF_FFFF, 2, 1),
        (BinOp::Sub, Ty::U32, 1, 2, 0xFFFF_FFFF),
        (BinOp::Mul, Ty::S32, -7, 6, (-42i32) as u32),
        (BinOp::MulHi, Ty::U32, 0x8000_0000, 4, 2),
        (BinOp::MulHi, Ty::S32, -0x8000_0000, 4, (-2i32) as u32),
        (BinOp::Div, Ty::S32, -7, 2, (-3i32) as u32),
        (BinOp::Div, Ty::U32, (-7i32) as u32 as i64, 2, 0x7FFF_FFFC),
        (BinOp::Rem, Ty::S32, -7, 2, (-1i32) as u32),
        (BinOp::Rem, Ty::U32, 7, 3, 1),
        (BinOp::Min, Ty::S32, -1, 1, (-1i32) as u32),
        (BinOp::Min, Ty::U32, (-1i32) as u32 as i64, 1, 1),
        (BinOp::Max, Ty::S32, -5, -9, (-5i32) as u32),
        (BinOp::Shr, Ty::S32, -16, 2, (-4i32) as u32),
        (BinOp::Shr, Ty::U32, (-16i32) as u32 as i64, 2, 0x3FFF_FFFC),
        (BinOp::Shr, Ty::S32, -16, 40, 0xFFFF_FFFF), // clamped shift: sign fill
        (BinOp::Shl, Ty::B32, 1, 31, 0x8000_0000),
        (BinOp::Shl, Ty::B32, 1, 32, 0), // clamped shift
        (BinOp::And, Ty::B32, 0xF0F0, 0xFF00, 0xF000),
        (BinOp::Or, Ty::B32, 0xF0F0, 0x0F0F, 0xFFFF),
        (BinOp::Xor, Ty::B32, 0xFFFF, 0x0F0F, 0xF0F0),
        (BinOp::Add, Ty::U16, 0xFFFF, 1, 0),
        (BinOp::Div, Ty::S32, i32::MIN as i64, -1, i32::MIN as u32), // the overflow wraps
    ];
    let mut b = Builder::new("int_ops");
    let out = b.param_ptr("out");
    let (t, a) = tid_addr(&mut b, out);
    for (i, (op, ty, x, y, _)) in cases.iter().enumerate() {
        let me = b.setp(Cmp::Eq, Ty::U32, t.into(), (i as u32).into());
        let (op, ty, x, y) = (*op, *ty, *x, *y);
        b.if_(me, |b| {
            let xr = b.mov(ty, Operand::Imm(x));
            let r = b.bin(op, ty, xr.into(), Operand::Imm(y));
            let w = if ty.bytes() == 2 { b.cvt(Ty::U32, Ty::U16, r.into()) } else { r };
            b.st(Space::Global, Ty::B32, a.into(), 0, w.into());
        });
    }
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let oa = mem.alloc(32 * 4);
    ok(&k, launch(1, 32), &[Arg::Ptr(oa)], &mut mem);
    let got = read_u32(&mem, oa, cases.len());
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(got[i], c.4, "case {i}: {:?}.{} {} {}", c.0, c.1.name(), c.2, c.3);
    }
}

#[test]
fn out_of_bounds_global_read() {
    let mut b = Builder::new("oob_read");
    let x = b.param_ptr("x");
    let (_, a) = tid_addr(&mut b, x);
    let v = b.ld(Space::Global, Ty::F32, Cache::None, a.into(), 0);
    let _ = v;
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xa = mem.alloc(31 * 4);
    let e = fails(&k, launch(1, 32), &[Arg::Ptr(xa)], &mut mem, "ld.global.f32");
    assert!(matches!(e.kind, SimErrorKind::OutOfBounds { space: Space::Global, .. }), "{e}");
    assert_eq!(e.thread, Some([31, 0, 0]));
}

// ---------------------------------------------------------------------------------------------- per-thread maps

/// Runs `body` once per input row: thread t loads `inputs[j][t]` (as `in_tys[j]`, from 8-byte slots)
/// and stores the result as `out_ty` into an 8-byte slot of a zeroed output, returned as u64s.
fn map(in_tys: &[Ty], out_ty: Ty, inputs: &[Vec<u64>], body: impl FnOnce(&mut Builder, &[Reg]) -> Reg) -> Vec<u64> {
    let n = inputs[0].len();
    let mut b = Builder::new("map");
    let ins: Vec<Reg> = (0..in_tys.len()).map(|j| b.param_ptr(&format!("in{j}"))).collect();
    let out = b.param_ptr("out");
    let t = b.special(Special::TidX);
    let vals: Vec<Reg> = ins
        .iter()
        .zip(in_tys)
        .map(|(p, ty)| {
            let a = b.index(*p, t, 8);
            b.ld(Space::Global, *ty, Cache::None, a.into(), 0)
        })
        .collect();
    let r = body(&mut b, &vals);
    let oa = b.index(out, t, 8);
    b.st(Space::Global, out_ty, oa.into(), 0, r.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let mut args = Vec::new();
    for v in inputs {
        let a = mem.alloc(n * 8);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        mem.write(a, &bytes).expect("in bounds");
        args.push(Arg::Ptr(a));
    }
    let oa = mem.alloc(n * 8);
    mem.write(oa, &vec![0; n * 8]).expect("in bounds");
    args.push(Arg::Ptr(oa));
    ok(&k, launch(1, n as u32), &args, &mut mem);
    read_u64(&mem, oa, n)
}

fn f(x: f32) -> u64 {
    u64::from(x.to_bits())
}

fn d(x: f64) -> u64 {
    x.to_bits()
}

/// `op.ty` on pairs of f32 inputs, results as f32.
fn f32_bin(op: BinOp, pairs: &[(f32, f32)]) -> Vec<f32> {
    let a = pairs.iter().map(|p| f(p.0)).collect();
    let b = pairs.iter().map(|p| f(p.1)).collect();
    map(&[Ty::F32, Ty::F32], Ty::F32, &[a, b], |bb, v| bb.bin(op, Ty::F32, v[0].into(), v[1].into()))
        .into_iter()
        .map(|x| f32::from_bits(x as u32))
        .collect()
}

fn f32_un(op: UnOp, xs: &[f32]) -> Vec<f32> {
    let a = xs.iter().map(|x| f(*x)).collect();
    map(&[Ty::F32], Ty::F32, &[a], |bb, v| bb.un(op, Ty::F32, v[0].into()))
        .into_iter()
        .map(|x| f32::from_bits(x as u32))
        .collect()
}

fn same_bits(got: &[f32], want: &[f32]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        assert!(same, "element {i}: got {g:e} ({:#010x}), want {w:e} ({:#010x})", g.to_bits(), w.to_bits());
    }
}

#[test]
fn float_arithmetic_rounds_to_nearest_even_with_ieee_edge_cases() {
    let third = 1.0f32 / 3.0;
    let tiny = f32::from_bits(1); // the smallest subnormal: plain f32 ops do not flush it
    same_bits(
        &f32_bin(
            BinOp::Add,
            &[(0.1, 0.2), (f32::INFINITY, f32::NEG_INFINITY), (-0.0, -0.0), (tiny, tiny), (3e38, 3e38)],
        ),
        &[0.1 + 0.2, f32::NAN, -0.0, f32::from_bits(2), f32::INFINITY],
    );
    same_bits(&f32_bin(BinOp::Sub, &[(1.0, 1.0), (-0.0, 0.0)]), &[0.0, -0.0]);
    same_bits(&f32_bin(BinOp::Mul, &[(third, 3.0), (-2.0, 0.0), (tiny, 0.5)]), &[third * 3.0, -0.0, 0.0]);
    same_bits(
        &f32_bin(BinOp::Div, &[(1.0, 3.0), (1.0, 0.0), (-1.0, 0.0), (0.0, 0.0)]),
        &[third, f32::INFINITY, f32::NEG_INFINITY, f32::NAN],
    );
    // PTX min/max: a NaN operand gives the other operand, and −0 < +0.
    same_bits(
        &f32_bin(BinOp::Min, &[(f32::NAN, 1.0), (2.0, f32::NAN), (-0.0, 0.0), (0.0, -0.0), (-1.0, 3.0)]),
        &[1.0, 2.0, -0.0, -0.0, -1.0],
    );
    same_bits(&f32_bin(BinOp::Max, &[(f32::NAN, 1.0), (-0.0, 0.0), (0.0, -0.0), (-1.0, 3.0)]), &[1.0, 0.0, 0.0, 3.0]);
    let fma = {
        // (1 + 2^-23)(1 - 2^-23) - 1 = -2^-46 exactly when fused; 0 when rounded after the product.
        let a = vec![f(1.0 + f32::EPSILON), f(2.0)];
        let b = vec![f(1.0 - f32::EPSILON), f(3.0)];
        let c = vec![f(-1.0), f(0.5)];
        map(&[Ty::F32, Ty::F32, Ty::F32], Ty::F32, &[a, b, c], |bb, v| {
            bb.mad(Ty::F32, v[0].into(), v[1].into(), v[2].into())
        })
    };
    assert_eq!(fma, vec![f(-(2.0f32).powi(-46)), f(6.5)]);
    same_bits(&f32_un(UnOp::Neg, &[1.0, -0.0, 0.0]), &[-1.0, 0.0, -0.0]);
    let neg_nan = f32_un(UnOp::Neg, &[f32::NAN])[0];
    assert_eq!(neg_nan.to_bits(), f32::NAN.to_bits() ^ 0x8000_0000, "neg flips the sign bit of a NaN");
    same_bits(&f32_un(UnOp::Abs, &[-2.5, -0.0]), &[2.5, 0.0]);
    same_bits(&f32_un(UnOp::Sqrt, &[2.0, -1.0, 0.0, -0.0]), &[2.0f32.sqrt(), f32::NAN, 0.0, -0.0]);
    same_bits(&f32_un(UnOp::Rcp, &[3.0, 0.0, -0.0]), &[third, f32::INFINITY, f32::NEG_INFINITY]);
}

#[test]
fn fast_math_ops_are_exact_in_f32_and_flush_subnormals() {
    let sub = f32::from_bits(0x0000_0100); // a subnormal: `.ftz` reads it as zero
    same_bits(
        &f32_un(UnOp::Ex2Approx, &[1.0, -1.0, 10.0, f32::NEG_INFINITY, sub, -200.0]),
        &[2.0, 0.5, 1024.0, 0.0, 1.0, 0.0],
    );
    same_bits(
        &f32_un(UnOp::Lg2Approx, &[8.0, 0.5, 0.0, -1.0, sub]),
        &[3.0, -1.0, f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY],
    );
    same_bits(&f32_un(UnOp::RsqrtApprox, &[4.0, 0.25, 0.0, sub]), &[0.5, 2.0, f32::INFINITY, f32::INFINITY]);
    same_bits(&f32_un(UnOp::RcpApprox, &[4.0, sub, 3.0]), &[0.25, f32::INFINITY, 1.0 / 3.0]);
    let t = f32_un(UnOp::TanhApprox, &[0.0, 20.0, -20.0, 0.5]);
    same_bits(&t[..3], &[0.0, 1.0, -1.0]);
    assert_eq!(t[3], (0.5f64).tanh() as f32);
}

#[test]
fn comparisons_are_ordered_for_floats_and_typed_for_integers() {
    let nan = f32::NAN;
    let cases: Vec<(Cmp, f32, f32, u64)> = vec![
        (Cmp::Eq, nan, nan, 0),
        (Cmp::Ne, nan, 1.0, 0), // `ne` is ordered in PTX: false with a NaN
        (Cmp::Ne, 1.0, 2.0, 1),
        (Cmp::Lt, -0.0, 0.0, 0),
        (Cmp::Le, -0.0, 0.0, 1),
        (Cmp::Gt, f32::INFINITY, f32::MAX, 1),
        (Cmp::Ge, nan, 0.0, 0),
    ];
    for (cmp, x, y, want) in cases {
        let got = map(&[Ty::F32, Ty::F32], Ty::U32, &[vec![f(x)], vec![f(y)]], |b, v| {
            let p = b.setp(cmp, Ty::F32, v[0].into(), v[1].into());
            b.selp(Ty::U32, 1u32.into(), 0u32.into(), p)
        });
        assert_eq!(got, vec![want], "setp.{cmp:?}.f32 {x} {y}");
    }
    // -1 < 1 as s32, but 0xFFFFFFFF > 1 as u32.
    let got = map(&[Ty::U32, Ty::U32], Ty::U32, &[vec![0xFFFF_FFFF], vec![1]], |b, v| {
        let s = b.setp(Cmp::Lt, Ty::S32, v[0].into(), v[1].into());
        let u = b.setp(Cmp::Lt, Ty::U32, v[0].into(), v[1].into());
        let s = b.selp(Ty::U32, 2u32.into(), 0u32.into(), s);
        let u = b.selp(Ty::U32, 1u32.into(), 0u32.into(), u);
        b.bin(BinOp::Or, Ty::B32, s.into(), u.into())
    });
    assert_eq!(got, vec![2]);
}

#[test]
fn sixty_four_bit_and_wide_integer_ops() {
    let a = vec![0xFFFF_FFFFu64, 0x8000_0000, 7];
    let b = vec![0xFFFF_FFFFu64, 2, 0];
    let wide_u = map(&[Ty::U32, Ty::U32], Ty::U64, &[a.clone(), b.clone()], |bb, v| {
        bb.bin(BinOp::MulWide, Ty::U32, v[0].into(), v[1].into())
    });
    assert_eq!(wide_u, vec![0xFFFF_FFFE_0000_0001, 0x1_0000_0000, 0]);
    let wide_s = map(&[Ty::S32, Ty::S32], Ty::S64, &[a.clone(), b.clone()], |bb, v| {
        bb.bin(BinOp::MulWide, Ty::S32, v[0].into(), v[1].into())
    });
    assert_eq!(wide_s, vec![1, (-(1i64 << 32)) as u64, 0]);
    let hi64 = map(&[Ty::U64, Ty::U64], Ty::U64, &[vec![u64::MAX], vec![u64::MAX]], |bb, v| {
        bb.bin(BinOp::MulHi, Ty::U64, v[0].into(), v[1].into())
    });
    assert_eq!(hi64, vec![u64::MAX - 1]);
    let add64 = map(&[Ty::U64, Ty::U64], Ty::U64, &[vec![u64::MAX, 1 << 40], vec![2, 1 << 40]], |bb, v| {
        bb.bin(BinOp::Add, Ty::U64, v[0].into(), v[1].into())
    });
    assert_eq!(add64, vec![1, 1 << 41]);
    let mad = map(&[Ty::S32, Ty::S32, Ty::S32], Ty::S32, &[vec![0x7FFF_FFFF], vec![2], vec![3]], |bb, v| {
        bb.mad(Ty::S32, v[0].into(), v[1].into(), v[2].into())
    });
    assert_eq!(mad, vec![1], "mad.lo wraps");
    let neg = map(&[Ty::S32], Ty::S32, &[vec![5, 0x8000_0000]], |bb, v| bb.un(UnOp::Neg, Ty::S32, v[0].into()));
    assert_eq!(neg, vec![(-5i32) as u32 as u64, 0x8000_0000]);
    let not = map(&[Ty::B32], Ty::B32, &[vec![0x0F0F_0F0F]], |bb, v| bb.un(UnOp::Not, Ty::B32, v[0].into()));
    assert_eq!(not, vec![0xF0F0_F0F0]);
    let f64s = map(&[Ty::F64, Ty::F64, Ty::F64], Ty::F64, &[vec![d(0.1)], vec![d(3.0)], vec![d(0.7)]], |bb, v| {
        bb.mad(Ty::F64, v[0].into(), v[1].into(), v[2].into())
    });
    assert_eq!(f64s, vec![d(0.1f64.mul_add(3.0, 0.7))]);
}

#[test]
fn conversions_round_saturate_and_extend() {
    let cvt = |dst: Ty, src: Ty, rnd: Option<Round>, xs: Vec<u64>| {
        map(&[src], dst, &[xs], |b, v| {
            let r = b.reg(dst);
            b.raw(Inst::Cvt { dst_ty: dst, src_ty: src, rnd, dst: r, src: v[0].into() });
            r
        })
    };
    let s = |x: i32| u64::from(x as u32);
    // Float → integer toward zero, saturating, NaN → 0.
    let got = cvt(Ty::S32, Ty::F32, Some(Round::ZeroInt), vec![f(-2.7), f(2.7), f(3e9), f(-3e9), f(f32::NAN)]);
    assert_eq!(got, vec![s(-2), 2, s(i32::MAX), s(i32::MIN), 0]);
    let got = cvt(Ty::U32, Ty::F32, Some(Round::ZeroInt), vec![f(-1.5), f(5e9), f(7.99)]);
    assert_eq!(got, vec![0, 0xFFFF_FFFF, 7]);
    // `.rn` on float → integer rounds to nearest even.
    let got = cvt(Ty::S32, Ty::F32, Some(Round::Nearest), vec![f(2.5), f(3.5), f(-2.5)]);
    assert_eq!(got, vec![2, 4, s(-2)]);
    // Integer → float rounds to nearest even.
    let got = cvt(Ty::F32, Ty::S32, Some(Round::Nearest), vec![16_777_217, s(-16_777_219), s(-1)]);
    assert_eq!(got, vec![f(16_777_216.0), f(-16_777_220.0), f(-1.0)]);
    assert_eq!(cvt(Ty::F32, Ty::U32, Some(Round::Nearest), vec![0xFFFF_FFFF]), vec![f(4_294_967_296.0)]);
    // Integer ↔ integer: extension by the source's signedness, truncation.
    assert_eq!(cvt(Ty::U32, Ty::U16, None, vec![0xFFFF]), vec![0xFFFF]);
    assert_eq!(cvt(Ty::S32, Ty::S16, None, vec![0xFFFF]), vec![0xFFFF_FFFF]);
    assert_eq!(cvt(Ty::U16, Ty::U32, None, vec![0x1_2345]), vec![0x2345]);
    assert_eq!(cvt(Ty::S64, Ty::S32, None, vec![s(-3)]), vec![(-3i64) as u64]);
    // f32 → bf16 rounds to nearest even: exact ties go to the even neighbour.
    let got = cvt(
        Ty::Bf16,
        Ty::F32,
        Some(Round::Nearest),
        vec![u64::from(0x3F80_8000u32), u64::from(0x3F81_8000u32), u64::from(0x3F80_8001u32), f(-1.0), f(f32::NAN)],
    );
    assert_eq!(got, vec![0x3F80, 0x3F82, 0x3F81, 0xBF80, 0x7FFF]);
    // bf16 and f16 → f32 are exact; f32 → f16 rounds.
    assert_eq!(cvt(Ty::F32, Ty::Bf16, None, vec![0x3FC0, 0x8001]), vec![f(1.5), u64::from(0x8001_0000u32)]);
    assert_eq!(cvt(Ty::F32, Ty::F16, None, vec![0x3C00, 0x0001]), vec![f(1.0), f(5.960_464_5e-8)]);
    assert_eq!(
        cvt(Ty::F16, Ty::F32, Some(Round::Nearest), vec![f(1.0), f(65520.0), f(1.0 / 3.0)]),
        vec![0x3C00, 0x7C00, 0x3555]
    );
    assert_eq!(cvt(Ty::F64, Ty::F32, None, vec![f(0.1)]), vec![d(f64::from(0.1f32))]);
    assert_eq!(cvt(Ty::F32, Ty::F64, Some(Round::Nearest), vec![d(0.1)]), vec![f(0.1)]);
}

#[test]
fn bf16_packing_puts_lo_in_the_low_half() {
    // `cvt.rn.bf16x2.f32 d, hi, lo`: hi in the upper half.
    let got = map(&[Ty::F32, Ty::F32], Ty::B32, &[vec![f(1.0)], vec![f(2.0)]], |b, v| {
        b.pack_bf16x2(v[0].into(), v[1].into())
    });
    assert_eq!(got, vec![0x4000_3F80]);
    let inst = map(&[Ty::F32, Ty::F32], Ty::B32, &[vec![f(-1.0)], vec![f(3.0)]], |b, v| {
        let r = b.reg(Ty::B32);
        b.raw(Inst::PackBf16x2 { dst: r, hi: v[0].into(), lo: v[1].into() });
        r
    });
    assert_eq!(inst, vec![0xBF80_4040]);
    // Unpack, widen each half exactly, and pack the halves back swapped.
    let got = map(&[Ty::B32], Ty::B32, &[vec![0x4000_3F80]], |b, v| {
        let (lo, hi) = b.unpack16(v[0]);
        let flo = b.bf16_to_f32(lo);
        let fhi = b.bf16_to_f32(hi);
        let sum = b.add(Ty::F32, flo.into(), fhi.into());
        let sum = b.cvt(Ty::Bf16, Ty::F32, sum.into());
        let r = b.reg(Ty::B32);
        b.raw(Inst::Pack16 { dst: r, lo: hi, hi: sum });
        r
    });
    assert_eq!(got, vec![0x4040_4000]);
    // Packed bf16x2 arithmetic works per half.
    let got = map(&[Ty::B32, Ty::B32], Ty::B32, &[vec![0x4000_3F80], vec![0x3E80_3F00]], |b, v| {
        b.bin(BinOp::Add, Ty::Bf16x2, v[0].into(), v[1].into())
    });
    assert_eq!(got, vec![0x4010_3FC0], "(1 + 0.5, 2 + 0.25)");
}

#[test]
fn vector_loads_and_stores() {
    let mut b = Builder::new("vec");
    let x = b.param_ptr("x");
    let y = b.param_ptr("y");
    let t = b.special(Special::TidX);
    let xa = b.index(x, t, 16);
    let v = b.ld_vec(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0, 4);
    let ya = b.index(y, t, 16);
    b.st_vec(Space::Global, Ty::F32, ya.into(), 0, vec![v[3].into(), v[2].into()]);
    b.st_vec(Space::Global, Ty::F32, ya.into(), 8, vec![v[1].into(), v[0].into()]);
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xs = Rng(5).f32s(64 * 4);
    let xa = alloc_f32(&mut mem, &xs);
    let ya = mem.alloc(64 * 16);
    ok(&k, launch(1, 64), &[Arg::Ptr(xa), Arg::Ptr(ya)], &mut mem);
    let got = mem.read_f32(ya, 64 * 4).expect("read");
    let want: Vec<f32> = xs.chunks(4).flat_map(|c| [c[3], c[2], c[1], c[0]]).collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------- control flow

#[test]
fn if_else_and_while_loops_diverge_per_thread() {
    // Collatz steps of tid + 1, with odd and even steps in the two branches of an if/else inside a
    // while loop whose trip count differs per thread.
    let mut b = Builder::new("collatz");
    let out = b.param_ptr("out");
    let (t, a) = tid_addr(&mut b, out);
    let x = b.add(Ty::U32, t.into(), 1u32.into());
    let steps = b.mov(Ty::U32, 0u32.into());
    b.while_(
        |b| b.setp(Cmp::Ne, Ty::U32, x.into(), 1u32.into()),
        |b| {
            let odd = b.bin(BinOp::And, Ty::B32, x.into(), 1u32.into());
            let is_odd = b.setp(Cmp::Eq, Ty::B32, odd.into(), 1u32.into());
            b.if_else(
                is_odd,
                |b| {
                    let y = b.mad(Ty::U32, x.into(), 3u32.into(), 1u32.into());
                    b.assign(x, y.into());
                },
                |b| b.bin_into(BinOp::Shr, x, 1u32.into()),
            );
            b.bin_into(BinOp::Add, steps, 1u32.into());
        },
    );
    b.st(Space::Global, Ty::U32, a.into(), 0, steps.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let oa = mem.alloc(64 * 4);
    ok(&k, launch(1, 64), &[Arg::Ptr(oa)], &mut mem);
    let want: Vec<u32> = (1..=64u32)
        .map(|mut x| {
            let mut n = 0;
            while x != 1 {
                x = if x % 2 == 1 { 3 * x + 1 } else { x / 2 };
                n += 1;
            }
            n
        })
        .collect();
    assert_eq!(read_u32(&mem, oa, 64), want);
}

#[test]
fn special_registers_of_a_three_dimensional_block() {
    let mut b = Builder::new("specials");
    let out = b.param_ptr("out");
    let regs = [
        Special::TidX,
        Special::TidY,
        Special::TidZ,
        Special::NtidX,
        Special::NtidY,
        Special::NtidZ,
        Special::CtaidX,
        Special::CtaidY,
        Special::CtaidZ,
        Special::NctaidX,
        Special::NctaidY,
        Special::NctaidZ,
        Special::LaneId,
        Special::WarpInBlock,
    ];
    let vals: Vec<Reg> = regs.iter().map(|r| b.special(*r)).collect();
    // Linear block and thread index: slot = (block * 64 + thread) * 14.
    let nx = vals[3];
    let ny = vals[4];
    let lin = b.mad(Ty::U32, vals[2].into(), ny.into(), vals[1].into());
    let lin = b.mad(Ty::U32, lin.into(), nx.into(), vals[0].into());
    let blk = b.mad(Ty::U32, vals[7].into(), vals[9].into(), vals[6].into());
    let slot = b.mad(Ty::U32, blk.into(), 64u32.into(), lin.into());
    let slot = b.mul(Ty::U32, slot.into(), 14u32.into());
    for (i, v) in vals.iter().enumerate() {
        let s = b.add(Ty::U32, slot.into(), (i as u32).into());
        let a = b.index(out, s, 4);
        b.st(Space::Global, Ty::U32, a.into(), 0, (*v).into());
    }
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let oa = mem.alloc(2 * 64 * 14 * 4);
    let l = Launch { grid: [2, 1, 1], block: [8, 4, 2], dynamic_shared: 0 };
    ok(&k, l, &[Arg::Ptr(oa)], &mut mem);
    let got = read_u32(&mem, oa, 2 * 64 * 14);
    for blk in 0..2u32 {
        for z in 0..2u32 {
            for y in 0..4u32 {
                for x in 0..8u32 {
                    let lin = x + 8 * y + 32 * z;
                    let s = ((blk * 64 + lin) * 14) as usize;
                    assert_eq!(&got[s..s + 14], &[x, y, z, 8, 4, 2, blk, 0, 0, 2, 1, 1, lin % 32, lin / 32]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------- warps

/// The PTX rule for `shfl.sync`: the source lane of `lane` for mode, lane operand `b` and clamp `c`.
fn shfl_source(mode: ShflMode, lane: i32, b: i32, c: u32) -> i32 {
    let cval = (c & 0x1F) as i32;
    let seg = ((c >> 8) & 0x1F) as i32;
    let min_lane = lane & seg;
    let max_lane = min_lane | (cval & !seg);
    let (j, ok) = match mode {
        ShflMode::Up => (lane - b, lane - b >= max_lane),
        ShflMode::Down => (lane + b, lane + b <= max_lane),
        ShflMode::Bfly => (lane ^ b, lane ^ b <= max_lane),
        ShflMode::Idx => {
            let j = min_lane | (b & !seg);
            (j, j <= max_lane)
        }
    };
    if ok { j } else { lane }
}

#[test]
fn shuffles_in_every_mode_with_clamps_and_segments() {
    // (mode, lane operand from the lane id (None: the constant `b`), b, clamp)
    let cases: Vec<(ShflMode, bool, i32, u32)> = vec![
        (ShflMode::Down, false, 1, 0x1F),
        (ShflMode::Down, false, 5, 0x1F),
        (ShflMode::Up, false, 2, 0),
        (ShflMode::Bfly, false, 3, 0x1F),
        (ShflMode::Idx, true, 0, 0x1F),     // lane operand (5 * lane + 3) % 32 per lane
        (ShflMode::Bfly, false, 4, 0x181F), // width 8
        (ShflMode::Down, false, 3, 0x181F), // width 8: stays inside each group of 8
        (ShflMode::Up, false, 1, 0x1800),   // width 8
        (ShflMode::Idx, false, 2, 0x101F),  // width 16: lane 2 of each half
    ];
    for (mode, per_lane, bconst, clamp) in cases {
        let mut b = Builder::new("shfl");
        let out = b.param_ptr("out");
        let (t, a) = tid_addr(&mut b, out);
        // Each lane's value: 100 + lane (in a 32-bit register).
        let v = b.add(Ty::U32, t.into(), 100u32.into());
        let lane_op: Operand = if per_lane {
            let m = b.mad(Ty::U32, t.into(), 5u32.into(), 3u32.into());
            b.bin(BinOp::Rem, Ty::U32, m.into(), 32u32.into()).into()
        } else {
            Operand::Imm(i64::from(bconst))
        };
        let dst = b.reg(Ty::U32);
        b.raw(Inst::Shfl { mode, dst, src: v, lane: lane_op, clamp });
        b.st(Space::Global, Ty::U32, a.into(), 0, dst.into());
        let k = b.finish();
        let mut mem = GlobalMemory::new();
        let oa = mem.alloc(64 * 4);
        ok(&k, launch(1, 64), &[Arg::Ptr(oa)], &mut mem);
        let got = read_u32(&mem, oa, 64);
        for t in 0..64i32 {
            let lane = t % 32;
            let bl = if per_lane { (5 * lane + 3) % 32 } else { bconst };
            let src = shfl_source(mode, lane, bl, clamp) + (t - lane);
            assert_eq!(got[t as usize], 100 + src as u32, "{mode:?} b={bl} c={clamp:#x} thread {t}");
        }
    }
}

#[test]
fn votes_all_any_and_ballot() {
    let mut b = Builder::new("votes");
    let out = b.param_ptr("out");
    let t = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    // p: lane % 3 == 0 in warp 0; every lane in warp 1.
    let r3 = b.bin(BinOp::Rem, Ty::U32, lane.into(), 3u32.into());
    let m3 = b.setp(Cmp::Eq, Ty::U32, r3.into(), 0u32.into());
    let w1 = b.setp(Cmp::Ge, Ty::U32, t.into(), 32u32.into());
    let p = b.bin(BinOp::Or, Ty::Pred, m3.into(), w1.into());
    let all = b.vote(VoteMode::All, p);
    let any = b.vote(VoteMode::Any, p);
    let ballot = b.vote(VoteMode::Ballot, p);
    let all = b.selp(Ty::U32, 1u32.into(), 0u32.into(), all);
    let any = b.selp(Ty::U32, 1u32.into(), 0u32.into(), any);
    let slot = b.mul(Ty::U32, t.into(), 3u32.into());
    let a = b.index(out, slot, 4);
    b.st(Space::Global, Ty::U32, a.into(), 0, all.into());
    b.st(Space::Global, Ty::U32, a.into(), 4, any.into());
    b.st(Space::Global, Ty::B32, a.into(), 8, ballot.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let oa = mem.alloc(64 * 12);
    ok(&k, launch(1, 64), &[Arg::Ptr(oa)], &mut mem);
    let got = read_u32(&mem, oa, 64 * 3);
    let mask3: u32 = (0..32).filter(|l| l % 3 == 0).map(|l| 1u32 << l).sum();
    for t in 0..64 {
        let want = if t < 32 { [0, 1, mask3] } else { [1, 1, u32::MAX] };
        assert_eq!(&got[3 * t..3 * t + 3], &want, "thread {t}");
    }
}

#[test]
fn mma_m16n8k16_matches_a_naive_product() {
    // D (16×8) = A (16×16, row-major bf16) · B (16×8, row-major k × n bf16) + C (16×8 f32), one warp;
    // every fragment built element by element from the PTX layout (`fragments::mma_kernel`).
    let k = fragments::mma_kernel();

    let mut rng = Rng(42);
    let mut mem = GlobalMemory::new();
    let a_vals = rng.f32s(16 * 16);
    let b_vals = rng.f32s(16 * 8);
    let c_vals = rng.f32s(16 * 8);
    let aa = mem.alloc(16 * 16 * 2);
    mem.write_bf16(aa, &a_vals).expect("write");
    let ba = mem.alloc(16 * 8 * 2);
    mem.write_bf16(ba, &b_vals).expect("write");
    let ca = alloc_f32(&mut mem, &c_vals);
    let da = mem.alloc(16 * 8 * 4);
    let stats = ok(&k, launch(1, 32), &[Arg::Ptr(aa), Arg::Ptr(ba), Arg::Ptr(ca), Arg::Ptr(da)], &mut mem);
    assert!(stats.instructions > 0);
    let got = mem.read_f32(da, 16 * 8).expect("read");
    // The rounded inputs, as the kernel sees them.
    let a_r = mem.read_bf16(aa, 16 * 16).expect("read");
    let b_r = mem.read_bf16(ba, 16 * 8).expect("read");
    for i in 0..16 {
        for j in 0..8 {
            let mut s = 0f32;
            let mut exact = 0f64;
            for kk in 0..16 {
                s += a_r[i * 16 + kk] * b_r[kk * 8 + j];
                exact += f64::from(a_r[i * 16 + kk]) * f64::from(b_r[kk * 8 + j]);
            }
            let want = c_vals[i * 8 + j] + s;
            assert_eq!(got[i * 8 + j], want, "D[{i}][{j}]");
            let exact = exact + f64::from(c_vals[i * 8 + j]);
            assert!((f64::from(got[i * 8 + j]) - exact).abs() < 1e-5, "D[{i}][{j}] against f64");
        }
    }
}

/// Four 8×8 b16 matrices in shared memory, row stride 32 bytes (16 bytes of data, 16 of padding):
/// element (i, r, c) = i * 64 + r * 8 + c. Each of 32 threads writes one row with a vector store.
fn ldmatrix_kernel(n: usize, trans: bool) -> Kernel {
    let mut b = Builder::new("ldmatrix_test");
    let out = b.param_ptr("out");
    let smem = b.shared("tiles", 32 * 32, 16);
    let t = b.special(Special::TidX);
    // Row t (matrix t / 8, row t % 8): four b32 words of two elements each.
    let base = b.mul(Ty::U32, t.into(), 8u32.into()); // i * 64 + r * 8 == 8 t
    let mut words = Vec::new();
    for w in 0..4u32 {
        let lo = b.add(Ty::U32, base.into(), (2 * w).into());
        let hi = b.add(Ty::U32, base.into(), (2 * w + 1).into());
        let hi = b.bin(BinOp::Shl, Ty::B32, hi.into(), 16u32.into());
        words.push(b.bin(BinOp::Or, Ty::B32, lo.into(), hi.into()));
    }
    let row = b.index_shared(smem, t.into(), 32);
    b.st_vec(Space::Shared, Ty::B32, row.into(), 0, words.iter().map(|w| (*w).into()).collect());
    b.bar();
    let dst = b.ldmatrix(n, trans, row.into());
    for (i, r) in dst.iter().enumerate() {
        let slot = b.mad(Ty::U32, t.into(), 4u32.into(), (i as u32).into());
        let a = b.index(out, slot, 4);
        b.st(Space::Global, Ty::B32, a.into(), 0, (*r).into());
    }
    b.finish()
}

#[test]
fn ldmatrix_and_ldmatrix_trans_distribute_rows_per_the_ptx_layout() {
    let elem = |i: u32, r: u32, c: u32| i * 64 + r * 8 + c;
    for n in [1usize, 2, 4] {
        for trans in [false, true] {
            let k = ldmatrix_kernel(n, trans);
            let mut mem = GlobalMemory::new();
            let oa = mem.alloc(32 * 16);
            ok(&k, launch(1, 32), &[Arg::Ptr(oa)], &mut mem);
            let got = read_u32(&mem, oa, 32 * 4);
            for l in 0..32u32 {
                for i in 0..n as u32 {
                    let (row, col) = (l / 4, 2 * (l % 4));
                    let (lo, hi) = if trans {
                        (elem(i, col, row), elem(i, col + 1, row))
                    } else {
                        (elem(i, row, col), elem(i, row, col + 1))
                    };
                    assert_eq!(got[(4 * l + i) as usize], lo | (hi << 16), "x{n} trans={trans} lane {l} reg {i}");
                }
            }
        }
    }
}

#[test]
fn ldmatrix_fragments_feed_mma_like_the_documented_a_tile_addressing() {
    // A 16×16 A tile in shared memory loaded with ldmatrix.x4 (lane l points at row l % 16, column
    // block 8 * (l / 16)) gives exactly the A fragment registers a0..a3.
    let mut b = Builder::new("ldmatrix_a");
    let pa = b.param_ptr("a");
    let out = b.param_ptr("out");
    let smem = b.shared("a_tile", 16 * 16 * 2, 16);
    let t = b.special(Special::TidX);
    // Thread t copies 16 bytes: row t / 2, half t % 2.
    let ga = b.index(pa, t, 16);
    let v = b.ld_vec(Space::Global, Ty::B32, Cache::None, ga.into(), 0, 4);
    let sa = b.index_shared(smem, t.into(), 16);
    b.st_vec(Space::Shared, Ty::B32, sa.into(), 0, v.iter().map(|r| (*r).into()).collect());
    b.bar();
    let row = b.bin(BinOp::Rem, Ty::U32, t.into(), 16u32.into());
    let cb = b.bin(BinOp::Shr, Ty::U32, t.into(), 4u32.into());
    let off = b.mad(Ty::U32, row.into(), 32u32.into(), smem);
    let addr = b.mad(Ty::U32, cb.into(), 16u32.into(), off.into());
    let regs = b.ldmatrix(4, false, addr.into());
    for (i, r) in regs.iter().enumerate() {
        let slot = b.mad(Ty::U32, t.into(), 4u32.into(), (i as u32).into());
        let a = b.index(out, slot, 4);
        b.st(Space::Global, Ty::B32, a.into(), 0, (*r).into());
    }
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let vals: Vec<u32> = (0..256).collect();
    let bytes: Vec<u8> = vals.iter().flat_map(|v| (*v as u16).to_le_bytes()).collect();
    let aa = mem.alloc(512);
    mem.write(aa, &bytes).expect("write");
    let oa = mem.alloc(32 * 16);
    ok(&k, launch(1, 32), &[Arg::Ptr(aa), Arg::Ptr(oa)], &mut mem);
    let got = read_u32(&mem, oa, 128);
    for l in 0..32u32 {
        let (g, t) = (l / 4, l % 4);
        for (i, (r, c)) in [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate() {
            let lo = r * 16 + c;
            assert_eq!(got[(4 * l) as usize + i], lo | ((lo + 1) << 16), "lane {l} a{i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------- cp.async

#[test]
fn cp_async_zero_fills_and_lands_at_the_wait_of_its_group() {
    // Thread t copies 16 bytes into each of two shared buffers, in two groups: the first with
    // src-size t % 17 (the rest zero-filled), the second whole. `wait_group 1` completes the first
    // group only; after a barrier each thread reads its neighbour's chunk of the first buffer; then
    // `wait_group 0` completes the second.
    let mut b = Builder::new("cp_async_test");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let s0 = b.shared("stage0", 32 * 16, 16);
    let s1 = b.shared("stage1", 32 * 16, 16);
    let t = b.special(Special::TidX);
    let src0 = b.index(x, t, 16);
    let t32 = b.add(Ty::U32, t.into(), 32u32.into());
    let src1 = b.index(x, t32, 16);
    let d0 = b.index_shared(s0, t.into(), 16);
    let d1 = b.index_shared(s1, t.into(), 16);
    let valid = b.bin(BinOp::Rem, Ty::U32, t.into(), 17u32.into());
    b.cp_async(d0.into(), src0.into(), 16, Some(valid.into()));
    b.cp_async_commit();
    b.cp_async(d1.into(), src1.into(), 16, None);
    b.cp_async_commit();
    b.cp_async_wait(1);
    b.bar();
    let nb = b.add(Ty::U32, t.into(), 1u32.into());
    let nb = b.bin(BinOp::Rem, Ty::U32, nb.into(), 32u32.into());
    let n0 = b.index_shared(s0, nb.into(), 16);
    let v0 = b.ld_vec(Space::Shared, Ty::B32, Cache::None, n0.into(), 0, 4);
    b.cp_async_wait(0);
    let v1 = b.ld_vec(Space::Shared, Ty::B32, Cache::None, d1.into(), 0, 4);
    let o0 = b.index(out, t, 16);
    b.st_vec(Space::Global, Ty::B32, o0.into(), 0, v0.iter().map(|r| (*r).into()).collect());
    let o1 = b.index(out, t32, 16);
    b.st_vec(Space::Global, Ty::B32, o1.into(), 0, v1.iter().map(|r| (*r).into()).collect());
    let k = b.finish();

    let mut mem = GlobalMemory::new();
    let xs: Vec<u8> = (0..64 * 16).map(|i| (i % 251) as u8 + 1).collect();
    let xa = mem.alloc(xs.len());
    mem.write(xa, &xs).expect("write");
    let oa = mem.alloc(64 * 16);
    ok(&k, launch(1, 32), &[Arg::Ptr(xa), Arg::Ptr(oa)], &mut mem);
    let got = mem.read(oa, 64 * 16).expect("read");
    for t in 0..32usize {
        let nb = (t + 1) % 32;
        let valid = nb % 17;
        for j in 0..16 {
            let want = if j < valid { xs[nb * 16 + j] } else { 0 };
            assert_eq!(got[t * 16 + j], want, "thread {t} byte {j} of its neighbour's chunk");
        }
        assert_eq!(&got[(32 + t) * 16..(33 + t) * 16], &xs[(32 + t) * 16..(33 + t) * 16]);
    }
}

// ---------------------------------------------------------------------------------------------- atomics

#[test]
fn atomics_are_sequential_in_lock_step_order() {
    let mut b = Builder::new("atomics");
    let counter = b.param_ptr("counter");
    let olds = b.param_ptr("olds");
    let sum = b.param_ptr("sum");
    let out = b.param_ptr("out");
    let smax = b.shared("smax", 4, 4);
    let t = b.special(Special::TidX);
    let i = b.global_index_x();
    // Global: a ticket per thread, in block order then thread order.
    let old = b.atom(AtomOp::Add, Space::Global, Ty::U32, counter.into(), 1u32.into());
    let oa = b.index(olds, i, 4);
    b.st(Space::Global, Ty::U32, oa.into(), 0, old.into());
    // Global f32 reduction without a result.
    let fi = b.cvt(Ty::F32, Ty::U32, i.into());
    b.red(AtomOp::Add, Space::Global, Ty::F32, sum.into(), fi.into());
    // Shared: a signed max, initialised by thread 0.
    let first = b.setp(Cmp::Eq, Ty::U32, t.into(), 0u32.into());
    b.if_(first, |b| b.st(Space::Shared, Ty::S32, smax, 0, Operand::Imm(-1000)));
    b.bar();
    // value = (t * 37) % 64 - 32
    let v = b.mul(Ty::U32, t.into(), 37u32.into());
    let v = b.bin(BinOp::Rem, Ty::U32, v.into(), 64u32.into());
    let v = b.bin(BinOp::Sub, Ty::S32, v.into(), 32u32.into());
    b.red(AtomOp::Max, Space::Shared, Ty::S32, smax, v.into());
    b.bar();
    b.if_(first, |b| {
        let m = b.ld(Space::Shared, Ty::S32, Cache::None, smax, 0);
        let c = b.special(Special::CtaidX);
        let a = b.index(out, c, 4);
        b.st(Space::Global, Ty::S32, a.into(), 0, m.into());
        // Exchange returns the old value.
        let prev = b.atom(AtomOp::Exch, Space::Shared, Ty::B32, smax, 7u32.into());
        b.st(Space::Global, Ty::B32, a.into(), 8, prev.into());
    });
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let ca = alloc_u32(&mut mem, &[0]);
    let oa = mem.alloc(128 * 4);
    let sa = alloc_f32(&mut mem, &[0.0]);
    let out = mem.alloc(4 * 4);
    ok(&k, launch(2, 64), &[Arg::Ptr(ca), Arg::Ptr(oa), Arg::Ptr(sa), Arg::Ptr(out)], &mut mem);
    assert_eq!(read_u32(&mem, ca, 1), vec![128]);
    assert_eq!(read_u32(&mem, oa, 128), (0..128).collect::<Vec<u32>>());
    assert_eq!(mem.read_f32(sa, 1).expect("read"), vec![(0..128).sum::<u32>() as f32]);
    let got = mem.read_i32(out, 4).expect("read");
    assert_eq!(&got[..2], &[31, 31]);
    assert_eq!(&got[2..], &[31, 31]);
}

// ---------------------------------------------------------------------------------------------- error detectors

#[test]
fn out_of_bounds_shared_write() {
    let mut b = Builder::new("oob_shared");
    let s = b.shared("buf", 16 * 4, 4);
    let t = b.special(Special::TidX);
    let a = b.index_shared(s, t.into(), 4);
    b.st(Space::Shared, Ty::U32, a.into(), 0, t.into());
    let k = b.finish();
    let e = fails(&k, launch(1, 32), &[], &mut GlobalMemory::new(), "st.shared.u32");
    assert!(matches!(e.kind, SimErrorKind::OutOfBounds { space: Space::Shared, addr: 64, bytes: 4 }), "{e}");
    assert_eq!(e.thread, Some([16, 0, 0]));
}

#[test]
fn uninitialised_shared_read() {
    let mut b = Builder::new("uninit_shared");
    let out = b.param_ptr("out");
    let s = b.shared("buf", 32 * 4, 4);
    let (t, oa) = tid_addr(&mut b, out);
    // Only even threads write their word; everyone reads its own after a barrier.
    let odd = b.bin(BinOp::And, Ty::B32, t.into(), 1u32.into());
    let even = b.setp(Cmp::Eq, Ty::B32, odd.into(), 0u32.into());
    let a = b.index_shared(s, t.into(), 4);
    b.if_(even, |b| b.st(Space::Shared, Ty::U32, a.into(), 0, t.into()));
    b.bar();
    let v = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
    b.st(Space::Global, Ty::U32, oa.into(), 0, v.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let oa = mem.alloc(32 * 4);
    let e = fails(&k, launch(1, 32), &[Arg::Ptr(oa)], &mut mem, "ld.shared.u32");
    assert_eq!(e.kind, SimErrorKind::UninitializedSharedRead { addr: 4 });
    assert_eq!(e.thread, Some([1, 0, 0]));
}

#[test]
fn shared_memory_is_uninitialised_again_in_the_next_block() {
    // Block 0 writes and reads its word; block 1 only reads: what block 0 left is not initialised.
    let mut b = Builder::new("stale_block");
    let s = b.shared("word", 4, 4);
    let c = b.special(Special::CtaidX);
    let first = b.setp(Cmp::Eq, Ty::U32, c.into(), 0u32.into());
    b.if_uniform(first, |b| b.st(Space::Shared, Ty::U32, s, 0, 5u32.into()));
    let _ = b.ld(Space::Shared, Ty::U32, Cache::None, s, 0);
    let k = b.finish();
    let e = fails(&k, launch(2, 1), &[], &mut GlobalMemory::new(), "ld.shared.u32");
    assert_eq!(e.kind, SimErrorKind::UninitializedSharedRead { addr: 0 });
    assert_eq!(e.block, [1, 0, 0]);
}

#[test]
fn write_write_race_names_both_threads() {
    // Threads 0 and 1 write the same shared word with no barrier between.
    let mut b = Builder::new("ww_race");
    let s = b.shared("word", 4, 4);
    let t = b.special(Special::TidX);
    let two = b.setp(Cmp::Lt, Ty::U32, t.into(), 2u32.into());
    b.if_(two, |b| b.st(Space::Shared, Ty::U32, s, 0, t.into()));
    let k = b.finish();
    let e = fails(&k, launch(1, 32), &[], &mut GlobalMemory::new(), "st.shared.u32");
    assert!(matches!(e.kind, SimErrorKind::Race { addr: 0, other: [0, 0, 0], .. }), "{e}");
    assert_eq!(e.thread, Some([1, 0, 0]));
    let msg = e.to_string();
    assert!(msg.contains("(0,0,0)") && msg.contains("(1,0,0)"), "{msg}");
}

#[test]
fn read_after_write_race_without_a_barrier() {
    let mut b = Builder::new("rw_race");
    let s = b.shared("buf", 64 * 4, 4);
    let t = b.special(Special::TidX);
    let a = b.index_shared(s, t.into(), 4);
    b.st(Space::Shared, Ty::U32, a.into(), 0, t.into());
    // Reads the word of thread t ^ 1, which that thread wrote in the same epoch.
    let o = b.bin(BinOp::Xor, Ty::B32, t.into(), 1u32.into());
    let oa = b.index_shared(s, o.into(), 4);
    let _ = b.ld(Space::Shared, Ty::U32, Cache::None, oa.into(), 0);
    let k = b.finish();
    let e = fails(&k, launch(1, 64), &[], &mut GlobalMemory::new(), "ld.shared.u32");
    assert!(
        matches!(e.kind, SimErrorKind::Race { other: [1, 0, 0], first: flashc_runtime::sim::Access::Write, .. }),
        "{e}"
    );
    assert_eq!(e.thread, Some([0, 0, 0]));
}

#[test]
fn barrier_inside_a_divergent_branch() {
    let mut b = Builder::new("divergent_bar");
    let t = b.special(Special::TidX);
    let low = b.setp(Cmp::Lt, Ty::U32, t.into(), 16u32.into());
    b.if_(low, |b| b.bar());
    let k = b.finish();
    let e = fails(&k, launch(1, 64), &[], &mut GlobalMemory::new(), "bar.sync 0");
    assert_eq!(e.kind, SimErrorKind::BarrierDivergence { arrived: 16, expected: 64 });
    assert_eq!(e.thread, Some([16, 0, 0]));
}

#[test]
fn shuffle_with_inactive_lanes() {
    let mut b = Builder::new("partial_shfl");
    let t = b.special(Special::TidX);
    let low = b.setp(Cmp::Lt, Ty::U32, t.into(), 20u32.into());
    b.if_(low, |b| {
        let _ = b.shfl(ShflMode::Bfly, t, 1u32.into());
    });
    let k = b.finish();
    let e = fails(&k, launch(1, 32), &[], &mut GlobalMemory::new(), "shfl.sync.bfly.b32");
    assert_eq!(e.kind, SimErrorKind::InactiveLanes { warp: 0, active: 0x000F_FFFF });
}

#[test]
fn collectives_need_whole_warps() {
    // A block of 48 threads: its second warp has only 16 threads.
    let mut b = Builder::new("short_warp");
    let t = b.special(Special::TidX);
    let p = b.setp(Cmp::Lt, Ty::U32, t.into(), 100u32.into());
    let _ = b.vote(VoteMode::All, p);
    let k = b.finish();
    let e = fails(&k, launch(1, 48), &[], &mut GlobalMemory::new(), "vote.sync.all.pred");
    assert_eq!(e.kind, SimErrorKind::InactiveLanes { warp: 1, active: 0xFFFF });
}

#[test]
fn non_uniform_condition_of_a_uniform_loop() {
    // A `uniform` loop whose bound depends on the thread.
    let mut b = Builder::new("nonuniform_loop");
    let t = b.special(Special::TidX);
    let n = b.bin(BinOp::Shr, Ty::U32, t.into(), 3u32.into());
    b.for_uniform(Ty::U32, 0u32.into(), n.into(), 1u32.into(), |b, _| b.bar());
    let k = b.finish();
    let e = fails(&k, launch(1, 32), &[], &mut GlobalMemory::new(), "for.uni.u32");
    assert_eq!(e.kind, SimErrorKind::NonUniform);
    assert_eq!(e.thread, Some([8, 0, 0]), "the first thread whose condition differs from thread 0's");
}

#[test]
fn non_uniform_condition_of_a_uniform_if() {
    let mut b = Builder::new("nonuniform_if");
    let w = b.special(Special::WarpInBlock);
    let p = b.setp(Cmp::Eq, Ty::U32, w.into(), 1u32.into());
    b.if_uniform(p, |b| b.bar());
    let k = b.finish();
    let e = fails(&k, launch(1, 64), &[], &mut GlobalMemory::new(), "if.uni");
    assert_eq!(e.kind, SimErrorKind::NonUniform);
    assert_eq!(e.thread, Some([32, 0, 0]));
}

#[test]
fn reading_a_cp_async_destination_before_the_wait() {
    let mut b = Builder::new("early_read");
    let x = b.param_ptr("x");
    let s = b.shared("stage", 32 * 16, 16);
    let t = b.special(Special::TidX);
    let src = b.index(x, t, 16);
    let dst = b.index_shared(s, t.into(), 16);
    b.cp_async(dst.into(), src.into(), 16, None);
    b.cp_async_commit();
    let _ = b.ld(Space::Shared, Ty::F32, Cache::None, dst.into(), 0);
    b.cp_async_wait(0);
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xa = alloc_f32(&mut mem, &[1.0; 32 * 4]);
    let e = fails(&k, launch(1, 32), &[Arg::Ptr(xa)], &mut mem, "ld.shared.f32");
    assert_eq!(e.kind, SimErrorKind::PendingAsyncCopy { addr: 0, owner: [0, 0, 0] });

    // A stale read: the buffer holds data from a previous stage, but a newer copy is in flight
    // (waiting for all but the newest group leaves it pending).
    let mut b = Builder::new("stale_stage");
    let x = b.param_ptr("x");
    let s = b.shared("stage", 32 * 16, 16);
    let t = b.special(Special::TidX);
    let src = b.index(x, t, 16);
    let dst = b.index_shared(s, t.into(), 16);
    b.cp_async(dst.into(), src.into(), 16, None);
    b.cp_async_commit();
    b.cp_async_wait(0);
    let _ = b.ld(Space::Shared, Ty::F32, Cache::None, dst.into(), 0);
    b.cp_async(dst.into(), src.into(), 16, None);
    b.cp_async_commit();
    b.cp_async_wait(1);
    let _ = b.ld(Space::Shared, Ty::F32, Cache::None, dst.into(), 4);
    let k = b.finish();
    let e = fails(&k, launch(1, 32), &[Arg::Ptr(xa)], &mut mem, "ld.shared.f32 %f");
    assert!(matches!(e.kind, SimErrorKind::PendingAsyncCopy { addr: 4, .. }), "{e}");
}

#[test]
fn misaligned_vector_access() {
    let mut b = Builder::new("misaligned");
    let x = b.param_ptr("x");
    let _ = b.ld_vec(Space::Global, Ty::F32, Cache::None, x.into(), 4, 2);
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xa = alloc_f32(&mut mem, &[0.0; 4]);
    let e = fails(&k, launch(1, 1), &[Arg::Ptr(xa)], &mut mem, "ld.global.v2.f32");
    assert_eq!(e.kind, SimErrorKind::Misaligned { space: Space::Global, addr: xa + 4, align: 8 });
}

#[test]
fn integer_division_by_zero() {
    let mut b = Builder::new("div0");
    let t = b.special(Special::TidX);
    let _ = b.bin(BinOp::Div, Ty::U32, 10u32.into(), t.into());
    let k = b.finish();
    let e = fails(&k, launch(1, 4), &[], &mut GlobalMemory::new(), "div.u32");
    assert_eq!(e.kind, SimErrorKind::DivisionByZero);
    assert_eq!(e.thread, Some([0, 0, 0]));
}

#[test]
fn register_read_before_any_write() {
    let mut b = Builder::new("uninit_reg");
    let t = b.special(Special::TidX);
    let r = b.reg(Ty::U32);
    let odd = b.bin(BinOp::And, Ty::B32, t.into(), 1u32.into());
    let p = b.setp(Cmp::Eq, Ty::B32, odd.into(), 1u32.into());
    b.if_(p, |b| b.assign(r, 1u32.into()));
    let _ = b.add(Ty::U32, r.into(), 1u32.into());
    let k = b.finish();
    let e = fails(&k, launch(1, 2), &[], &mut GlobalMemory::new(), "add.u32");
    assert!(matches!(e.kind, SimErrorKind::UninitializedRegister { .. }), "{e}");
    assert_eq!(e.thread, Some([0, 0, 0]));
}

#[test]
fn non_coherent_load_of_data_the_kernel_wrote() {
    let mut b = Builder::new("nc_after_store");
    let x = b.param_ptr("x");
    b.st(Space::Global, Ty::F32, x.into(), 0, 1.0f32.into());
    let _ = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, x.into(), 0);
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xa = alloc_f32(&mut mem, &[0.0]);
    let e = fails(&k, launch(1, 1), &[Arg::Ptr(xa)], &mut mem, "ld.global.nc.f32");
    assert_eq!(e.kind, SimErrorKind::NonCoherentRead { addr: xa });
    // The next launch starts afresh.
    let mut b = Builder::new("nc_only");
    let x = b.param_ptr("x");
    let _ = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, x.into(), 0);
    ok(&b.finish(), launch(1, 1), &[Arg::Ptr(xa)], &mut mem);
}

#[test]
fn invalid_launches() {
    let mut b = Builder::new("launch_checks");
    let _ = b.param_ptr("x");
    let d = b.dynamic_shared();
    b.st(Space::Shared, Ty::U32, d, 0, 1u32.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xa = mem.alloc(4);
    let launch_kind = |r: Result<Stats, SimError>| match r {
        Err(SimError { kind: SimErrorKind::Launch(m), .. }) => m,
        other => panic!("expected a launch error, got {other:?}"),
    };
    let m = launch_kind(run(&k, &launch(1, 32), &[], &mut mem));
    assert!(m.contains("0 arguments for 1 parameters"), "{m}");
    let m = launch_kind(run(&k, &launch(1, 32), &[Arg::U32(0)], &mut mem));
    assert!(m.contains("parameter x"), "{m}");
    let m = launch_kind(run(&k, &launch(1, 2048), &[Arg::Ptr(xa)], &mut mem));
    assert!(m.contains("2048 threads"), "{m}");
    let big = Launch { dynamic_shared: 228 * 1024, ..launch(1, 1) };
    let m = launch_kind(run(&k, &big, &[Arg::Ptr(xa)], &mut mem));
    assert!(m.contains("shared memory"), "{m}");
    // Without dynamic shared memory the store is out of bounds; with 4 bytes it runs.
    let e = run(&k, &launch(1, 1), &[Arg::Ptr(xa)], &mut mem).expect_err("no dynamic shared memory");
    assert!(matches!(e.kind, SimErrorKind::OutOfBounds { space: Space::Shared, .. }), "{e}");
    ok(&k, Launch { dynamic_shared: 4, ..launch(1, 1) }, &[Arg::Ptr(xa)], &mut mem);
}

#[test]
fn host_accessors_round_trip_and_catch_bad_addresses() {
    let mut mem = GlobalMemory::new();
    let a = mem.alloc(10);
    let b2 = mem.alloc(8);
    assert_eq!(a % 256, 0);
    assert_eq!(b2 % 256, 0);
    assert!(b2 > a + 10, "allocations are separated by a gap");
    assert_eq!(mem.read(a, 10).expect("read"), vec![0xFF; 10], "fresh memory holds the poison pattern");
    assert!(mem.read_f32(a, 1).expect("read")[0].is_nan());
    mem.write_bf16(a, &[1.0, -2.5, 1.0 + 1.0 / 256.0]).expect("write");
    assert_eq!(mem.read_bf16(a, 3).expect("read"), vec![1.0, -2.5, 1.0], "ties round to even");
    mem.write_i32(b2, &[-7, 9]).expect("write");
    assert_eq!(mem.read_i32(b2, 2).expect("read"), vec![-7, 9]);
    assert!(mem.read(a, 11).is_err(), "past the end");
    assert!(mem.write_f32(a + 8, &[1.0]).is_err(), "crosses the end");
    assert!(mem.read(0, 1).is_err(), "null");
}

// ---------------------------------------------------------------------------------------------- speed

/// CPU time of this thread in seconds (Linux), so the measurement holds on a busy machine; wall time
/// elsewhere.
fn cpu_seconds(wall: std::time::Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()))
        .map_or_else(|| wall.elapsed().as_secs_f64(), |ns| ns / 1e9)
}

/// Runs a kernel and prints its speed.
fn measure(name: &str, k: &Kernel, l: Launch, args: &[Arg], mem: &mut GlobalMemory) {
    let wall = std::time::Instant::now();
    let c0 = cpu_seconds(wall);
    let s = ok(k, l, args, mem);
    let cpu = cpu_seconds(wall) - c0;
    println!(
        "{name}: {} warp-instructions in {cpu:.3} s of CPU ({:.3} s wall): {:.2} M warp-instructions/s, {:.1} M thread-instructions/s",
        s.instructions,
        wall.elapsed().as_secs_f64(),
        s.instructions as f64 / cpu / 1e6,
        s.thread_instructions as f64 / cpu / 1e6
    );
}

/// Interpreter speed (`cargo test --release -p flashc-runtime --test sim throughput -- --ignored
/// --nocapture`): a grid-stride `y = 2 x + y` over 2^20 elements, the shared-memory block sum, and
/// a warp of mma.sync tiles.
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    let mut b = Builder::new("saxpy");
    let x = b.param_ptr("x");
    let y = b.param_ptr("y");
    let n = b.param(ParamTy::U32, "n");
    let i0 = b.global_index_x();
    let nb = b.special(Special::NctaidX);
    let nt = b.special(Special::NtidX);
    let stride = b.mul(Ty::U32, nb.into(), nt.into());
    b.for_(Ty::U32, i0.into(), n.into(), stride.into(), |b, i| {
        let xa = b.index(x, i, 4);
        let ya = b.index(y, i, 4);
        let xv = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0);
        let yv = b.ld(Space::Global, Ty::F32, Cache::None, ya.into(), 0);
        let r = b.mad(Ty::F32, xv.into(), 2.0f32.into(), yv.into());
        b.st(Space::Global, Ty::F32, ya.into(), 0, r.into());
    });
    let k = b.finish();
    let n = 1usize << 20;
    let mut mem = GlobalMemory::new();
    let xs = Rng(3).f32s(n);
    let xa = alloc_f32(&mut mem, &xs);
    let ya = alloc_f32(&mut mem, &xs);
    measure("saxpy", &k, launch(64, 256), &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::U32(n as u32)], &mut mem);

    let k = block_sum_kernel();
    let xs: Vec<f32> = (0..256 * 1024).map(|i| (i % 7) as f32).collect();
    let xa = alloc_f32(&mut mem, &xs);
    let oa = mem.alloc(1024 * 4);
    measure("block_sum", &k, launch(1024, 256), &[Arg::Ptr(xa), Arg::Ptr(oa)], &mut mem);

    // 1024 mma.sync per warp on register fragments.
    let mut b = Builder::new("mma_loop");
    let out = b.param_ptr("out");
    let one = b.pack_bf16x2(1.0f32.into(), 1.0f32.into());
    let acc: Vec<Reg> = (0..4).map(|_| b.mov(Ty::F32, 0.0f32.into())).collect();
    b.for_uniform(Ty::U32, 0u32.into(), 1024u32.into(), 1u32.into(), |b, _| {
        let d = b.mma([one; 4], [one; 2], [acc[0], acc[1], acc[2], acc[3]]);
        for (a, r) in acc.iter().zip(d) {
            b.assign(*a, r.into());
        }
    });
    let i = b.global_index_x();
    let oa = b.index(out, i, 4);
    b.st(Space::Global, Ty::F32, oa.into(), 0, acc[0].into());
    let k = b.finish();
    let oa = mem.alloc(4 * 128 * 4);
    measure("mma_loop", &k, launch(4, 128), &[Arg::Ptr(oa)], &mut mem);
}

#[test]
fn signed_loads_into_wider_registers_sign_extend() {
    let mut b = Builder::new("ld_s16");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let r = b.reg(Ty::S32);
    b.raw(Inst::Ld { space: Space::Global, ty: Ty::S16, cache: Cache::None, dst: vec![r], addr: x.into(), offset: 0 });
    let u = b.reg(Ty::U32);
    b.raw(Inst::Ld { space: Space::Global, ty: Ty::U16, cache: Cache::None, dst: vec![u], addr: x.into(), offset: 0 });
    b.st(Space::Global, Ty::S32, out.into(), 0, r.into());
    b.st(Space::Global, Ty::U32, out.into(), 4, u.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let xa = mem.alloc(2);
    mem.write(xa, &(-3i16).to_le_bytes()).expect("write");
    let oa = mem.alloc(8);
    ok(&k, launch(1, 1), &[Arg::Ptr(xa), Arg::Ptr(oa)], &mut mem);
    assert_eq!(mem.read_i32(oa, 2).expect("read"), vec![-3, 0xFFFD]);
}

#[test]
fn global_races_between_blocks_and_between_threads_without_a_barrier() {
    // Every block adds its partial into out[tid] with a plain read-modify-write: split-K without
    // atomics. Block 1 reads what block 0 wrote.
    let mut b = Builder::new("split_k_race");
    let out = b.param_ptr("out");
    let (_, a) = tid_addr(&mut b, out);
    let v = b.ld(Space::Global, Ty::F32, Cache::None, a.into(), 0);
    let w = b.add(Ty::F32, v.into(), 1.0f32.into());
    b.st(Space::Global, Ty::F32, a.into(), 0, w.into());
    let k = b.finish();
    let mut mem = GlobalMemory::new();
    let oa = alloc_f32(&mut mem, &[0.0; 32]);
    let e = fails(&k, launch(2, 32), &[Arg::Ptr(oa)], &mut mem, "ld.global.f32");
    assert_eq!(
        e.kind,
        SimErrorKind::GlobalRace {
            addr: oa,
            other_block: [0, 0, 0],
            other_thread: [0, 0, 0],
            second: flashc_runtime::sim::Access::Read
        }
    );
    assert_eq!(e.block, [1, 0, 0]);
    // The same with atomics is fine (the failed launch left block 0's writes behind: reset).
    mem.write_f32(oa, &[0.0; 32]).expect("write");
    let mut b = Builder::new("split_k_atomic");
    let out = b.param_ptr("out");
    let (_, a) = tid_addr(&mut b, out);
    b.red(AtomOp::Add, Space::Global, Ty::F32, a.into(), 1.0f32.into());
    ok(&b.finish(), launch(2, 32), &[Arg::Ptr(oa)], &mut mem);
    assert_eq!(mem.read_f32(oa, 32).expect("read"), vec![2.0; 32]);

    // Within a block: thread t reads what thread t ^ 1 wrote, first without and then with a barrier.
    for barrier in [false, true] {
        let mut b = Builder::new("exchange_through_global");
        let buf = b.param_ptr("buf");
        let (t, a) = tid_addr(&mut b, buf);
        b.st(Space::Global, Ty::U32, a.into(), 0, t.into());
        if barrier {
            b.bar();
        }
        let o = b.bin(BinOp::Xor, Ty::B32, t.into(), 1u32.into());
        let oa = b.index(buf, o, 4);
        let _ = b.ld(Space::Global, Ty::U32, Cache::None, oa.into(), 0);
        let k = b.finish();
        let mut mem = GlobalMemory::new();
        let ba = mem.alloc(64 * 4);
        let r = run(&k, &launch(1, 64), &[Arg::Ptr(ba)], &mut mem);
        if barrier {
            assert!(r.is_ok(), "{r:?}");
        } else {
            let e = r.expect_err("a race");
            assert!(matches!(e.kind, SimErrorKind::GlobalRace { other_thread: [1, 0, 0], .. }), "{e}");
        }
    }
}

/// A two-stage cp.async pipeline over `stages` chunks of 32 × 16 bytes: each iteration issues the
/// next stage, waits for the current one, and reads a neighbour's chunk; with `second_barrier` the
/// iteration ends with a barrier before the buffer is refilled.
fn pipeline_kernel(second_barrier: bool, stages: u32) -> Kernel {
    let mut b = Builder::new("pipeline");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let s = b.shared("stages", 2 * 32 * 16, 16);
    let t = b.special(Special::TidX);
    let nb = b.add(Ty::U32, t.into(), 1u32.into());
    let nb = b.bin(BinOp::Rem, Ty::U32, nb.into(), 32u32.into());
    let issue = |b: &mut Builder, stage: Operand| {
        let chunk = b.mad(Ty::U32, stage, 32u32.into(), t.into());
        let src = b.index(x, chunk, 16);
        let buf = b.bin(BinOp::And, Ty::B32, stage, 1u32.into());
        let slot = b.mad(Ty::U32, buf.into(), 32u32.into(), t.into());
        let dst = b.index_shared(s, slot.into(), 16);
        b.cp_async(dst.into(), src.into(), 16, None);
        b.cp_async_commit();
    };
    issue(&mut b, 0u32.into());
    let acc = b.mov(Ty::U32, 0u32.into());
    b.for_uniform(Ty::U32, 0u32.into(), stages.into(), 1u32.into(), |b, i| {
        let next = b.add(Ty::U32, i.into(), 1u32.into());
        let more = b.setp(Cmp::Lt, Ty::U32, next.into(), stages.into());
        b.if_uniform(more, |b| issue(b, next.into()));
        // Without a next stage there is no newer group to leave pending.
        b.if_uniform(more, |b| b.cp_async_wait(1));
        let last = b.setp(Cmp::Ge, Ty::U32, next.into(), stages.into());
        b.if_uniform(last, |b| b.cp_async_wait(0));
        b.bar();
        let buf = b.bin(BinOp::And, Ty::B32, i.into(), 1u32.into());
        let slot = b.mad(Ty::U32, buf.into(), 32u32.into(), nb.into());
        let a = b.index_shared(s, slot.into(), 16);
        let v = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
        b.bin_into(BinOp::Add, acc, v.into());
        if second_barrier {
            b.bar();
        }
    });
    let (_, oa) = tid_addr(&mut b, out);
    b.st(Space::Global, Ty::U32, oa.into(), 0, acc.into());
    b.finish()
}

#[test]
fn cp_async_pipeline_needs_a_barrier_before_refilling_a_stage() {
    let stages = 4u32;
    let mut mem = GlobalMemory::new();
    let words: Vec<u32> = (0..stages * 32 * 4).map(|i| i * 3 + 1).collect();
    let xa = alloc_u32(&mut mem, &words);
    let oa = mem.alloc(32 * 4);
    ok(&pipeline_kernel(true, stages), launch(1, 32), &[Arg::Ptr(xa), Arg::Ptr(oa)], &mut mem);
    let got = read_u32(&mem, oa, 32);
    for t in 0..32u32 {
        let nb = (t + 1) % 32;
        let want: u32 = (0..stages).map(|s| words[((s * 32 + nb) * 4) as usize]).sum();
        assert_eq!(got[t as usize], want, "thread {t}");
    }
    // With one barrier per iteration, the copy into a stage the other threads are still reading is a
    // race from the moment it is issued.
    let e =
        fails(&pipeline_kernel(false, stages), launch(1, 32), &[Arg::Ptr(xa), Arg::Ptr(oa)], &mut mem, "cp.async.cg");
    assert!(matches!(e.kind, SimErrorKind::Race { second: flashc_runtime::sim::Access::Write, .. }), "{e}");
}

#[test]
fn malformed_kernels_and_undefined_ops_are_refused() {
    // A register that does not exist.
    let mut b = Builder::new("bad_reg");
    let r = b.reg(Ty::U32);
    b.raw(Inst::Mov { ty: Ty::U32, dst: r, src: Reg(99).into() });
    let k = b.finish();
    let e = fails(&k, launch(1, 1), &[], &mut GlobalMemory::new(), "mov.u32 %r0, %r99");
    assert!(matches!(e.kind, SimErrorKind::InvalidKernel(_)), "{e}");
    // A vector wider than 16 bytes.
    let mut b = Builder::new("wide_vector");
    let x = b.param_ptr("x");
    let _ = b.ld_vec(Space::Global, Ty::F64, Cache::None, x.into(), 0, 4);
    let e = fails(&b.finish(), launch(1, 1), &[Arg::Ptr(0)], &mut GlobalMemory::new(), "ld.global.v4.f64");
    assert!(matches!(e.kind, SimErrorKind::InvalidKernel(_)), "{e}");
    // rem.f32 does not exist in PTX.
    let mut b = Builder::new("rem_f32");
    let _ = b.bin(BinOp::Rem, Ty::F32, 1.0f32.into(), 2.0f32.into());
    let e = fails(&b.finish(), launch(1, 1), &[], &mut GlobalMemory::new(), "rem.f32");
    assert!(matches!(e.kind, SimErrorKind::Unsupported(_)), "{e}");
    // The message says where: kernel, block, thread and instruction.
    let msg = e.to_string();
    assert!(msg.starts_with("kernel rem_f32: block (0,0,0), thread (0,0,0): unsupported"), "{msg}");
}
