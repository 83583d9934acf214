//! The `sim` device: tiny kir kernels, built with the `Builder`, checked against hand-computed results
//! instruction family by instruction family, and every error detector on a kernel that trips it.

use flashc_codegen::kir::{BinOp, Builder, Cache, Cmp, Kernel, Operand, ParamTy, Reg, Space, Special, Ty};
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

#[allow(dead_code)] // TODO-sim: used by the next tests
fn alloc_u32(mem: &mut GlobalMemory, v: &[u32]) -> u64 {
    let a = mem.alloc(v.len() * 4);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    mem.write(a, &bytes).expect("in bounds");
    a
}

fn read_u32(mem: &GlobalMemory, a: u64, n: usize) -> Vec<u32> {
    mem.read_i32(a, n).expect("in bounds").into_iter().map(|x| x as u32).collect()
}

#[allow(dead_code)] // TODO-sim: used by the next tests
fn read_u64(mem: &GlobalMemory, a: u64, n: usize) -> Vec<u64> {
    let b = mem.read(a, n * 8).expect("in bounds");
    b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

/// The bits of f32 values as u32.
#[allow(dead_code)] // TODO-sim: used by the next tests
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
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

/// `out[i] = f(i)` for i < n threads: a kernel `name` whose single parameter is `out`, where the body
/// computes a 32-bit value from the thread index.
#[allow(dead_code)] // TODO-sim: used by the next tests
fn per_thread_u32(name: &str, f: impl FnOnce(&mut Builder, Reg) -> Reg) -> Kernel {
    let mut b = Builder::new(name);
    let out = b.param_ptr("out");
    let (t, a) = tid_addr(&mut b, out);
    let v = f(&mut b, t);
    b.st(Space::Global, Ty::B32, a.into(), 0, v.into());
    b.finish()
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
