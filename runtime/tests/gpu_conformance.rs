//! The instruction conformance suite: the `sim` device's model of every special instruction, checked
//! against a real GPU. Each test builds a tiny kir kernel, runs it on `sim::run` and on the `cuda`
//! device (`Cuda::run_kernel`) over the same fixed-seed random inputs, and compares every output buffer:
//! bit for bit where PTX defines the result exactly, within a stated bound where it does not (the
//! `.approx` instructions, the accumulation inside `mma`, float atomics whose rounding depends on the
//! order). Each case prints one line: instruction, cases, max difference.
//!
//! Without a CUDA driver each test still runs its sim half (the kernel is built, validated,
//! interpreted and, where `ptxas` is found, assembled for sm_80 and sm_90), prints
//! `skipped: no CUDA driver` and passes; with `FLASHC_REQUIRE_GPU=1` it fails instead.
//!
//! Bounds (PTX ISA, "Floating Point Instructions"; the sim computes the `.approx` ops in f64 and
//! rounds once, so it is within 0.5 ulp of the exact value and the bound below adds that half ulp):
//! - `ex2.approx.ftz.f32`: at most 2 ulp from the exact result → 3 ulp between GPU and sim;
//! - `rsqrt.approx.ftz.f32`: relative error at most 2^-22.9 (≤ 2.2 ulp) → 3 ulp;
//! - `rcp.approx.ftz.f32`: at most 1 ulp → 2 ulp;
//! - `lg2.approx.ftz.f32`: absolute error at most 2^-22.6 → |Δ| ≤ 2^-22 + 1 ulp of the result;
//! - `tanh.approx.f32`: relative error at most 2^-10.987 (about 11 bits, not "about 2 ulp") →
//!   |Δ| ≤ 2^-10.5 · |tanh x|;
//! - `mma.sync` bf16 → f32: products of bf16 are exact in f32, but PTX leaves the order and the
//!   intermediate rounding of the 16-term sum to the hardware → |Δ| ≤ 2^-19 · (|c| + Σ|a·b|)
//!   (16 roundings of a f32 sum, 4× margin), and bit for bit on integer inputs whose sums are exact;
//! - float atomics: bit for bit on values whose every partial sum is exact (multiples of 1/16 of
//!   magnitude < 2^10); on random values |Δ| ≤ n · 2^-24 · Σ|v| for n additions.

mod fragments;

use std::sync::OnceLock;

use flashc_codegen::kir::{
    AtomOp, BinOp, Builder, Cache, Cmp, Inst, Kernel, Operand, Reg, Round, ShflMode, Space, Special, Ty, UnOp, VoteMode,
};
use flashc_codegen::ptx;
use flashc_runtime::cuda::{Cuda, driver_present};
use flashc_runtime::sim::{self, Arg, GlobalMemory, Launch};

// ---------------------------------------------------------------------------------------------- harness

/// The GPU, opened once per test binary; `None` without a driver (a failure with
/// `FLASHC_REQUIRE_GPU=1`).
fn gpu() -> Option<&'static Cuda> {
    static GPU: OnceLock<Option<Cuda>> = OnceLock::new();
    let required = std::env::var("FLASHC_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if !driver_present() {
        assert!(!required, "FLASHC_REQUIRE_GPU=1 but no CUDA driver was found");
        return None;
    }
    GPU.get_or_init(|| match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => panic!("a CUDA driver is present but GPU 0 does not open: {e}"),
    })
    .as_ref()
}

/// Whether the driver check fails this test; called first so the failure does not wait for the sim.
fn require_gpu_if_asked() {
    let _ = gpu();
}

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

    fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }

    /// Uniform in [lo, hi).
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
}

fn bytes_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    words(b).into_iter().map(f32::from_bits).collect()
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn bf16_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The final bytes of every buffer, on the sim and (with a driver) on the GPU.
struct Outcome {
    sim: Vec<Vec<u8>>,
    gpu: Option<Vec<Vec<u8>>>,
}

/// Runs `k` on the sim and on the GPU (if there is one), each buffer starting as the given bytes and
/// passed as a pointer argument in order. Also assembles the kernel's PTX with ptxas when found.
fn both(k: &Kernel, l: Launch, bufs: &[Vec<u8>]) -> Outcome {
    let text = ptx::write_string(k, &ptx::Options::default()).unwrap_or_else(|e| panic!("{}: PTX: {e}", k.name));
    if ptx::ptxas::find().is_some() {
        for arch in ["sm_80", "sm_90"] {
            if let Err(e) = ptx::ptxas::assemble(&text, arch) {
                panic!("{}: {e}\n{text}", k.name);
            }
        }
    }
    let mut mem = GlobalMemory::new();
    let addrs: Vec<u64> = bufs
        .iter()
        .map(|b| {
            let a = mem.alloc(b.len());
            mem.write(a, b).expect("in bounds");
            a
        })
        .collect();
    let args: Vec<Arg> = addrs.iter().map(|a| Arg::Ptr(*a)).collect();
    if let Err(e) = sim::run(k, &l, &args, &mut mem) {
        panic!("{} on the sim: {e}", k.name);
    }
    let sim = addrs.iter().zip(bufs).map(|(a, b)| mem.read(*a, b.len()).expect("in bounds")).collect();
    let gpu = gpu().map(|dev| {
        let on_gpu: Vec<_> = bufs
            .iter()
            .map(|b| {
                let d = dev.alloc(b.len()).expect("GPU allocation");
                dev.write(&d, 0, b).expect("GPU write");
                d
            })
            .collect();
        let args: Vec<Arg> = on_gpu.iter().map(|d| Arg::Ptr(d.addr())).collect();
        dev.run_kernel(k, &l, &args).unwrap_or_else(|e| panic!("{} on the GPU: {e}", k.name));
        on_gpu.iter().map(|d| dev.read(d, 0, d.len()).expect("GPU read")).collect()
    });
    Outcome { sim, gpu }
}

/// Prints the one line of a case whose GPU half was skipped.
fn skipped(name: &str, cases: usize) {
    let ptxas = if ptx::ptxas::find().is_some() { "ptxas sm_80/sm_90 ok" } else { "no ptxas" };
    eprintln!("conformance {name:<40} {cases:>6} cases  sim ran, {ptxas}; skipped: no CUDA driver");
}

/// Compares 32-bit words bit for bit (NaN against NaN passes only where `nan_any` is set, and is
/// counted); prints the line and fails on a difference.
fn exact_words(name: &str, sim: &[u32], gpu: &[u32], nan_any: bool, describe: impl Fn(usize) -> String) {
    assert_eq!(sim.len(), gpu.len());
    let mut bad = Vec::new();
    let mut nan_payloads = 0;
    for (i, (s, g)) in sim.iter().zip(gpu).enumerate() {
        if s == g {
            continue;
        }
        if nan_any && f32::from_bits(*s).is_nan() && f32::from_bits(*g).is_nan() {
            nan_payloads += 1;
            continue;
        }
        bad.push(i);
    }
    let nan_note = if nan_payloads > 0 { format!(" ({nan_payloads} NaN payloads differ)") } else { String::new() };
    eprintln!("conformance {name:<40} {:>6} cases  {} differ (bit-exact required){nan_note}", sim.len(), bad.len());
    for i in bad.iter().take(8) {
        eprintln!("  {}: sim {:#010x}, gpu {:#010x}", describe(*i), sim[*i], gpu[*i]);
    }
    assert!(bad.is_empty(), "{name}: {} of {} results differ from the GPU", bad.len(), sim.len());
}

/// Distance in representable f32 values (the same sign assumed; otherwise the sum of both
/// distances to zero).
fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        i64::from(if i < 0 { i32::MIN - i } else { i })
    };
    (key(a) - key(b)).unsigned_abs()
}

// ---------------------------------------------------------------------------------------------- mma

/// Runs the mma kernel on `tiles` tiles with values from `gen` (rounded to bf16 for A and B).
fn mma_case(tiles: u32, mut draw: impl FnMut() -> f32) -> (Vec<f32>, Vec<f64>, Outcome) {
    let n = tiles as usize;
    let a: Vec<u16> = (0..n * 256).map(|_| bf16_bits(draw())).collect();
    let bm: Vec<u16> = (0..n * 128).map(|_| bf16_bits(draw())).collect();
    let c: Vec<f32> = (0..n * 128).map(|_| draw()).collect();
    let b16 = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let out =
        both(&fragments::mma_kernel(), launch(tiles, 32), &[b16(&a), b16(&bm), bytes_f32(&c), vec![0; n * 128 * 4]]);
    // Σ|a·b| + |c| per output element, for the bound, and the exact result in f64.
    let mut scale = vec![0f32; n * 128];
    let mut exact = vec![0f64; n * 128];
    for tile in 0..n {
        for i in 0..16 {
            for j in 0..8 {
                let mut s = c[tile * 128 + i * 8 + j].abs();
                let mut e = f64::from(c[tile * 128 + i * 8 + j]);
                for k in 0..16 {
                    let p = bf16_f32(a[tile * 256 + i * 16 + k]) * bf16_f32(bm[tile * 128 + k * 8 + j]);
                    s += p.abs();
                    e += f64::from(p);
                }
                scale[tile * 128 + i * 8 + j] = s;
                exact[tile * 128 + i * 8 + j] = e;
            }
        }
    }
    (scale, exact, out)
}

#[test]
fn mma_m16n8k16_bf16_f32_fragments() {
    require_gpu_if_asked();
    // Small integers: every partial sum is exact, so any order gives the same bits.
    let mut rng = Rng(0x3A3A);
    let (_, _, exact) = mma_case(16, || (rng.u32() % 9) as f32 - 4.0);
    let mut rng = Rng(0x4B4B);
    let (scale, exact_sums, random) = mma_case(16, || rng.f32(-1.0, 1.0));
    // The sim half on its own: against the f64 sum, relative to Σ|a·b| + |c|.
    let sim_d = floats(&random.sim[3]);
    let own = (0..sim_d.len())
        .map(|i| (f64::from(sim_d[i]) - exact_sums[i]).abs() / f64::from(scale[i]))
        .fold(0f64, f64::max);
    eprintln!(
        "conformance {:<40} {:>6} cases  sim vs f64 sum: max |Δ|/(|c|+Σ|ab|) = {own:.2e}",
        "mma.m16n8k16 bf16 (random, sim)",
        sim_d.len()
    );
    assert!(own < 2f64.powi(-20), "the sim's mma is {own:e} from the f64 sum");
    let (Some(ge), Some(gr)) = (&exact.gpu, &random.gpu) else {
        skipped("mma.m16n8k16 bf16 (integers)", 16 * 128);
        skipped("mma.m16n8k16 bf16 (random)", 16 * 128);
        return;
    };
    exact_words("mma.m16n8k16 bf16 (integers)", &words(&exact.sim[3]), &words(&ge[3]), false, |i| {
        format!("tile {} D[{}][{}]", i / 128, i % 128 / 8, i % 8)
    });
    let (s, g) = (floats(&random.sim[3]), floats(&gr[3]));
    let mut worst = 0f32;
    let mut bad = 0;
    for i in 0..s.len() {
        let rel = (s[i] - g[i]).abs() / scale[i];
        worst = worst.max(rel);
        if rel.is_nan() || rel > 2f32.powi(-19) {
            bad += 1;
            eprintln!("  tile {} D[{}][{}]: sim {:e}, gpu {:e}", i / 128, i % 128 / 8, i % 8, s[i], g[i]);
        }
    }
    eprintln!(
        "conformance {:<40} {:>6} cases  max |Δ|/(|c|+Σ|ab|) = {worst:.2e} (bound 2^-19 = {:.2e})",
        "mma.m16n8k16 bf16 (random)",
        s.len(),
        2f32.powi(-19)
    );
    assert_eq!(bad, 0, "mma: {bad} results outside the bound");
}

// ---------------------------------------------------------------------------------------------- ldmatrix

/// Four 8×8 b16 matrices in shared memory with a row stride of 32 bytes, rows copied from global
/// (thread t writes row t: matrix t / 8, row t % 8); then `ldmatrix.xN[.trans]` with lane l pointing
/// at row l, and every lane stores its N registers.
fn ldmatrix_kernel(n: usize, trans: bool) -> Kernel {
    let mut b = Builder::new(format!("conf_ldmatrix_x{n}{}", if trans { "_trans" } else { "" }));
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let smem = b.shared("tiles", 32 * 32, 16);
    let t = b.special(Special::TidX);
    let src = b.index(x, t, 16);
    let v = b.ld_vec(Space::Global, Ty::B32, Cache::None, src.into(), 0, 4);
    let row = b.index_shared(smem, t.into(), 32);
    b.st_vec(Space::Shared, Ty::B32, row.into(), 0, v.iter().map(|r| (*r).into()).collect());
    // The padding half of each row, so no lane reads shared memory nobody wrote.
    b.st_vec(Space::Shared, Ty::B32, row.into(), 16, vec![Operand::Imm(0); 4]);
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
fn ldmatrix_x1_x2_x4_and_trans() {
    require_gpu_if_asked();
    for n in [1usize, 2, 4] {
        for trans in [false, true] {
            let mut rng = Rng(0x1D + n as u64 * 2 + u64::from(trans));
            let x: Vec<u32> = (0..32 * 4).map(|_| rng.u32()).collect();
            let out = both(&ldmatrix_kernel(n, trans), launch(1, 32), &[bytes_u32(&x), vec![0; 32 * 16]]);
            let name = format!("ldmatrix.x{n}{}", if trans { ".trans" } else { "" });
            let Some(g) = &out.gpu else {
                skipped(&name, 32 * n);
                continue;
            };
            // Only the N registers each lane wrote are results; the other slots stay zero on both.
            exact_words(&name, &words(&out.sim[1]), &words(&g[1]), false, |i| format!("lane {} reg {}", i / 4, i % 4));
        }
    }
}

// ---------------------------------------------------------------------------------------------- cp.async

/// Thread t copies `bytes` into each of two shared buffers, in two commit groups: the first with
/// src-size `t % (bytes + 1)` (the rest zero-filled), the second whole. `wait_group 1` completes the
/// first group; after a barrier each thread reads its neighbour's chunk of the first buffer; then
/// `wait_group 0` completes the second, which each thread reads back itself.
fn cp_async_kernel(bytes: u32) -> Kernel {
    let mut b = Builder::new(format!("conf_cp_async_{bytes}"));
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let s0 = b.shared("stage0", 32 * bytes, 16);
    let s1 = b.shared("stage1", 32 * bytes, 16);
    let t = b.special(Special::TidX);
    let src0 = b.index(x, t, bytes);
    let t32 = b.add(Ty::U32, t.into(), 32u32.into());
    let src1 = b.index(x, t32, bytes);
    let d0 = b.index_shared(s0, t.into(), bytes);
    let d1 = b.index_shared(s1, t.into(), bytes);
    let valid = b.bin(BinOp::Rem, Ty::U32, t.into(), (bytes + 1).into());
    b.cp_async(d0.into(), src0.into(), bytes, Some(valid.into()));
    b.cp_async_commit();
    b.cp_async(d1.into(), src1.into(), bytes, None);
    b.cp_async_commit();
    b.cp_async_wait(1);
    b.bar();
    let nb = b.add(Ty::U32, t.into(), 1u32.into());
    let nb = b.bin(BinOp::Rem, Ty::U32, nb.into(), 32u32.into());
    let n0 = b.index_shared(s0, nb.into(), bytes);
    let w = (bytes / 4) as usize;
    let v0 = if w == 1 {
        vec![b.ld(Space::Shared, Ty::B32, Cache::None, n0.into(), 0)]
    } else {
        b.ld_vec(Space::Shared, Ty::B32, Cache::None, n0.into(), 0, w)
    };
    b.cp_async_wait(0);
    let v1 = if w == 1 {
        vec![b.ld(Space::Shared, Ty::B32, Cache::None, d1.into(), 0)]
    } else {
        b.ld_vec(Space::Shared, Ty::B32, Cache::None, d1.into(), 0, w)
    };
    let o0 = b.index(out, t, bytes);
    b.st_vec(Space::Global, Ty::B32, o0.into(), 0, v0.iter().map(|r| (*r).into()).collect());
    let o1 = b.index(out, t32, bytes);
    b.st_vec(Space::Global, Ty::B32, o1.into(), 0, v1.iter().map(|r| (*r).into()).collect());
    b.finish()
}

#[test]
fn cp_async_zero_fill_and_commit_wait_groups() {
    require_gpu_if_asked();
    for bytes in [4u32, 8, 16] {
        let mut rng = Rng(0xC0 + u64::from(bytes));
        let x: Vec<u32> = (0..64 * bytes / 4).map(|_| rng.u32() | 0x0101_0101).collect();
        let out = both(&cp_async_kernel(bytes), launch(1, 32), &[bytes_u32(&x), vec![0; 64 * bytes as usize]]);
        let name = format!("cp.async {bytes} B + commit/wait_group");
        let Some(g) = &out.gpu else {
            skipped(&name, 64 * bytes as usize / 4);
            continue;
        };
        let per = bytes as usize / 4;
        exact_words(&name, &words(&out.sim[1]), &words(&g[1]), false, |i| {
            format!("chunk {} word {}", i / per, i % per)
        });
    }
}

// ---------------------------------------------------------------------------------------------- warps

#[test]
fn shfl_sync_idx_up_down_bfly_with_clamps() {
    require_gpu_if_asked();
    // (mode, lane operand per lane (else the constant b), b, clamp): full warps and segments.
    let cases: Vec<(ShflMode, bool, i32, u32)> = vec![
        (ShflMode::Down, false, 1, 0x1F),
        (ShflMode::Down, false, 5, 0x1F),
        (ShflMode::Down, false, 16, 0x1F),
        (ShflMode::Up, false, 1, 0),
        (ShflMode::Up, false, 2, 0),
        (ShflMode::Up, false, 16, 0),
        (ShflMode::Bfly, false, 1, 0x1F),
        (ShflMode::Bfly, false, 3, 0x1F),
        (ShflMode::Bfly, false, 16, 0x1F),
        (ShflMode::Idx, true, 0, 0x1F),
        (ShflMode::Idx, false, 7, 0x1F),
        (ShflMode::Bfly, false, 4, 0x181F),
        (ShflMode::Down, false, 3, 0x181F),
        (ShflMode::Up, false, 1, 0x1800),
        (ShflMode::Idx, false, 2, 0x101F),
        (ShflMode::Idx, true, 0, 0x1C1F),
        (ShflMode::Down, false, 2, 0x0F),
        (ShflMode::Up, false, 3, 0x04),
        (ShflMode::Bfly, false, 8, 0x0F),
    ];
    let mut mb = Builder::new("conf_shfl");
    let x = mb.param_ptr("x");
    let out = mb.param_ptr("out");
    let t = mb.special(Special::TidX);
    let xa = mb.index(x, t, 4);
    let v = mb.ld(Space::Global, Ty::B32, Cache::None, xa.into(), 0);
    // Per-lane lane operand: (5 * lane + 3) % 32, out of the segment for some lanes.
    let lane = mb.special(Special::LaneId);
    let m = mb.mad(Ty::U32, lane.into(), 5u32.into(), 3u32.into());
    let per_lane = mb.bin(BinOp::Rem, Ty::U32, m.into(), 32u32.into());
    let nt = mb.special(Special::NtidX);
    for (i, (mode, pl, bconst, clamp)) in cases.iter().enumerate() {
        let lane_op: Operand = if *pl { per_lane.into() } else { Operand::Imm(i64::from(*bconst)) };
        let dst = mb.reg(Ty::B32);
        mb.raw(Inst::Shfl { mode: *mode, dst, src: v, lane: lane_op, clamp: *clamp });
        let slot = mb.mad(Ty::U32, nt.into(), (i as u32).into(), t.into());
        let oa = mb.index(out, slot, 4);
        mb.st(Space::Global, Ty::B32, oa.into(), 0, dst.into());
    }
    let k = mb.finish();
    let threads = 64usize;
    let mut rng = Rng(0x5F1);
    let xs: Vec<u32> = (0..threads).map(|_| rng.u32()).collect();
    let out = both(&k, launch(1, threads as u32), &[bytes_u32(&xs), vec![0; cases.len() * threads * 4]]);
    let Some(g) = &out.gpu else {
        skipped("shfl.sync idx/up/down/bfly", cases.len() * threads);
        return;
    };
    exact_words("shfl.sync idx/up/down/bfly", &words(&out.sim[1]), &words(&g[1]), false, |i| {
        let (mode, pl, bc, c) = cases[i / threads];
        format!("{mode:?} b={} c={c:#x} thread {}", if pl { "per lane".into() } else { bc.to_string() }, i % threads)
    });
}

#[test]
fn vote_sync_all_any_ballot() {
    require_gpu_if_asked();
    let mut b = Builder::new("conf_vote");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let t = b.special(Special::TidX);
    let xa = b.index(x, t, 4);
    let v = b.ld(Space::Global, Ty::U32, Cache::None, xa.into(), 0);
    let p = b.setp(Cmp::Ne, Ty::U32, v.into(), 0u32.into());
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
    // Warps: random, all true, all false, one lane, random sparse, all but one.
    let mut rng = Rng(0x707E);
    let mut xs = Vec::new();
    for w in 0..6 {
        for l in 0..32u32 {
            xs.push(match w {
                0 => rng.u32() & 1,
                1 => 1,
                2 => 0,
                3 => u32::from(l == 13),
                4 => u32::from(rng.u32().is_multiple_of(7)),
                _ => u32::from(l != 31),
            });
        }
    }
    let out = both(&k, launch(1, 192), &[bytes_u32(&xs), vec![0; 192 * 12]]);
    let Some(g) = &out.gpu else {
        skipped("vote.sync all/any/ballot", 192 * 3);
        return;
    };
    exact_words("vote.sync all/any/ballot", &words(&out.sim[1]), &words(&g[1]), false, |i| {
        format!("thread {} {}", i / 3, ["all", "any", "ballot"][i % 3])
    });
}

// ---------------------------------------------------------------------------------------------- conversions

/// Thread t reads `inputs[j][t]` (as `in_tys[j]`, from 8-byte slots) and stores `body`'s result as
/// `out_ty` into an 8-byte slot; returns the sim's and the GPU's result slots.
fn map(
    name: &str,
    in_tys: &[Ty],
    out_ty: Ty,
    inputs: &[Vec<u64>],
    body: impl FnOnce(&mut Builder, &[Reg]) -> Reg,
) -> (Vec<u64>, Option<Vec<u64>>) {
    let n = inputs[0].len();
    let mut b = Builder::new(name);
    let ins: Vec<Reg> = (0..in_tys.len()).map(|j| b.param_ptr(&format!("in{j}"))).collect();
    let out = b.param_ptr("out");
    let t = b.global_index_x();
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
    assert_eq!(n % 64, 0, "whole blocks of 64");
    let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    bufs.push(vec![0; n * 8]);
    let o = both(&k, launch((n / 64) as u32, 64), &bufs);
    let slots = |b: &[u8]| b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    (slots(&o.sim[inputs.len()]), o.gpu.as_ref().map(|g| slots(&g[inputs.len()])))
}

/// Float inputs with the edge cases of a conversion: ±0, ±inf, NaN, subnormals, rounding ties of
/// bf16 and f16, values past every integer range, then random bit patterns and random magnitudes;
/// 1024 in all.
fn f32_inputs(seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7FC0_1234),
        f32::from_bits(0xFF80_0001),
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::from_bits(0x007F_FFFF),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_8001),
        f32::from_bits(0x3F80_7FFF),
        f32::from_bits(0x7F7F_8000),
        f32::from_bits(0x3F80_1000),
        f32::from_bits(0x3F80_3000),
        65504.0,
        65520.0,
        65519.99,
        6.0e-8,
        2.9e-8,
        0.5,
        1.5,
        2.5,
        -2.5,
        3.5,
        -0.5,
        2147483520.0,
        2147483648.0,
        -2147483648.0,
        -2147483904.0,
        4294967040.0,
        4294967296.0,
        -1.0,
        -0.99,
        16777217.0,
    ];
    let mut rng = Rng(seed);
    while v.len() < 512 {
        v.push(f32::from_bits(rng.u32()));
    }
    while v.len() < 1024 {
        let e = rng.f32(-40.0, 40.0);
        let s = if rng.u32() & 1 == 0 { 1.0 } else { -1.0 };
        v.push(s * 2f32.powf(e) * rng.f32(1.0, 2.0));
    }
    v
}

fn cvt_case(name: &str, dst: Ty, src: Ty, rnd: Option<Round>, xs: Vec<u64>, nan_any: bool) {
    let (s, g) =
        map(&format!("conf_cvt_{}", name.replace(['.', ' '], "_")), &[src], dst, std::slice::from_ref(&xs), |b, v| {
            let r = b.reg(dst);
            b.raw(Inst::Cvt { dst_ty: dst, src_ty: src, rnd, dst: r, src: v[0].into() });
            r
        });
    compare_slots(name, &xs, &s, g.as_deref(), dst, nan_any);
}

/// Compares 64-bit result slots bit for bit (the low `dst` bits; NaN of any payload equal where
/// `nan_any`).
fn compare_slots(name: &str, xs: &[u64], s: &[u64], g: Option<&[u64]>, dst: Ty, nan_any: bool) {
    let Some(g) = g else {
        skipped(name, s.len());
        return;
    };
    let is_nan = |v: u64| match dst {
        Ty::F32 => f32::from_bits(v as u32).is_nan(),
        Ty::F64 => f64::from_bits(v).is_nan(),
        Ty::Bf16 => (v & 0x7FFF) > 0x7F80,
        Ty::F16 => (v & 0x7FFF) > 0x7C00,
        _ => false,
    };
    let mut bad = Vec::new();
    let mut nans = 0;
    for i in 0..s.len() {
        if s[i] == g[i] {
            continue;
        }
        if nan_any && is_nan(s[i]) && is_nan(g[i]) {
            nans += 1;
            continue;
        }
        bad.push(i);
    }
    let note = if nans > 0 { format!(" ({nans} NaN payloads differ)") } else { String::new() };
    eprintln!("conformance {name:<40} {:>6} cases  {} differ (bit-exact required){note}", s.len(), bad.len());
    for i in bad.iter().take(8) {
        eprintln!("  input {:#018x}: sim {:#x}, gpu {:#x}", xs[*i], s[*i], g[*i]);
    }
    assert!(bad.is_empty(), "{name}: {} of {} results differ from the GPU", bad.len(), s.len());
}

#[test]
fn cvt_rounding_saturation_and_bf16x2_packing() {
    require_gpu_if_asked();
    let f = |v: &[f32]| v.iter().map(|x| u64::from(x.to_bits())).collect::<Vec<u64>>();
    let xs = f(&f32_inputs(0xC7));
    // Float → narrower float, round to nearest even (NaN: PTX gives a canonical NaN; any NaN passes
    // and is counted).
    cvt_case("cvt.rn.bf16.f32", Ty::Bf16, Ty::F32, Some(Round::Nearest), xs.clone(), true);
    cvt_case("cvt.rn.f16.f32", Ty::F16, Ty::F32, Some(Round::Nearest), xs.clone(), true);
    // Float → integer: toward zero and to nearest, saturating, NaN → 0.
    cvt_case("cvt.rzi.s32.f32", Ty::S32, Ty::F32, Some(Round::ZeroInt), xs.clone(), false);
    cvt_case("cvt.rzi.u32.f32", Ty::U32, Ty::F32, Some(Round::ZeroInt), xs.clone(), false);
    cvt_case("cvt.rni.s32.f32", Ty::S32, Ty::F32, Some(Round::Nearest), xs.clone(), false);
    cvt_case("cvt.rzi.f32.f32", Ty::F32, Ty::F32, Some(Round::ZeroInt), xs.clone(), true);
    cvt_case("cvt.f64.f32", Ty::F64, Ty::F32, None, xs.clone(), true);
    // Narrow float → f32 is exact; every 16-bit pattern twice over (1024 random ones).
    let mut rng = Rng(0x16);
    let h: Vec<u64> = (0..1024)
        .map(|i| {
            if i < 64 {
                [0, 0x8000, 0x7F80, 0x7FC1, 0x0001, 0x7C00, 0x7E01, 0x03FF][i % 8]
            } else {
                u64::from(rng.u32() & 0xFFFF)
            }
        })
        .collect();
    cvt_case("cvt.f32.bf16", Ty::F32, Ty::Bf16, None, h.clone(), true);
    cvt_case("cvt.f32.f16", Ty::F32, Ty::F16, None, h, true);
    // Integer → float rounds to nearest even.
    let ints: Vec<u64> = (0..1024)
        .map(|i| match i {
            0 => 16_777_217,
            1 => u64::from((-16_777_219i32) as u32),
            2 => 0xFFFF_FFFF,
            3 => 0x8000_0000,
            4 => 0x7FFF_FFFF,
            _ => u64::from(rng.u32() >> (rng.u32() % 32)),
        })
        .collect();
    cvt_case("cvt.rn.f32.s32", Ty::F32, Ty::S32, Some(Round::Nearest), ints.clone(), false);
    cvt_case("cvt.rn.f32.u32", Ty::F32, Ty::U32, Some(Round::Nearest), ints.clone(), false);
    // Integer ↔ integer: truncation and extension by the source's signedness.
    cvt_case("cvt.u16.u32", Ty::U16, Ty::U32, None, ints.clone(), false);
    cvt_case("cvt.s32.s16", Ty::S32, Ty::S16, None, ints.clone(), false);
    cvt_case("cvt.s64.s32", Ty::S64, Ty::S32, None, ints, false);
    // f64 → f32 rounds to nearest even.
    let ds: Vec<u64> = (0..1024)
        .map(|_| (f64::from(rng.f32(-1.0, 1.0)) * 2f64.powi((rng.u32() % 300) as i32 - 150)).to_bits())
        .collect();
    cvt_case("cvt.rn.f32.f64", Ty::F32, Ty::F64, Some(Round::Nearest), ds, true);

    // cvt.rn.bf16x2.f32 d, hi, lo: the first source in the upper half.
    let his = f32_inputs(0xB1);
    let mut los = f32_inputs(0xB2);
    los.rotate_left(7);
    let (s, g) = map("conf_pack_bf16x2", &[Ty::F32, Ty::F32], Ty::B32, &[f(&his), f(&los)], |b, v| {
        let r = b.reg(Ty::B32);
        b.raw(Inst::PackBf16x2 { dst: r, hi: v[0].into(), lo: v[1].into() });
        r
    });
    // A NaN half may carry any payload; compare the halves with that rule.
    let nan16 = |v: u64| (v & 0x7FFF) > 0x7F80;
    let split = |v: &[u64]| v.iter().flat_map(|x| [x & 0xFFFF, (x >> 16) & 0xFFFF]).collect::<Vec<u64>>();
    match g {
        Some(g) => {
            let (sh, gh) = (split(&s), split(&g));
            let bad: Vec<usize> =
                (0..sh.len()).filter(|i| sh[*i] != gh[*i] && !(nan16(sh[*i]) && nan16(gh[*i]))).collect();
            eprintln!(
                "conformance {:<40} {:>6} cases  {} differ (bit-exact required)",
                "cvt.rn.bf16x2.f32 (hi, lo)",
                s.len(),
                bad.len()
            );
            for i in bad.iter().take(8) {
                eprintln!("  pair {} {}: sim {:#06x}, gpu {:#06x}", i / 2, ["lo", "hi"][i % 2], sh[*i], gh[*i]);
            }
            assert!(bad.is_empty(), "cvt.rn.bf16x2.f32: {} halves differ", bad.len());
        }
        None => skipped("cvt.rn.bf16x2.f32 (hi, lo)", s.len()),
    }
    // The sim half: the packing order is the documented one (hi in the upper half).
    assert_eq!(s[40] >> 16 & 0xFFFF, u64::from(bf16_bits(his[40])), "hi goes to the upper half");
}

// ---------------------------------------------------------------------------------------------- approximations

/// Runs `op.f32` over `xs` on both devices; returns (sim, gpu).
fn un_f32(name: &str, op: UnOp, xs: &[f32]) -> (Vec<f32>, Option<Vec<f32>>) {
    let input = xs.iter().map(|x| u64::from(x.to_bits())).collect::<Vec<u64>>();
    let (s, g) = map(name, &[Ty::F32], Ty::F32, &[input], |b, v| b.un(op, Ty::F32, v[0].into()));
    let f = |v: Vec<u64>| v.into_iter().map(|x| f32::from_bits(x as u32)).collect::<Vec<f32>>();
    (f(s), g.map(f))
}

/// How an approximation is bounded against the sim's correctly rounded value.
#[derive(Clone, Copy)]
enum Bound {
    /// At most this many representable values apart.
    Ulps(u64),
    /// |Δ| ≤ abs + ulps · ulp(sim).
    Abs(f32),
    /// |Δ| ≤ rel · |sim|.
    Rel(f32),
}

/// How far the sim is from `exact` (in f64, rounded once to f32), in ulp, over the inputs whose
/// exact result is a normal f32 (where `.ftz` changes nothing).
fn sim_vs_exact(xs: &[f32], sim: &[f32], exact: fn(f64) -> f64) -> u64 {
    let mut worst = 0;
    for (x, s) in xs.iter().zip(sim) {
        let want = exact(f64::from(*x)) as f32;
        if want.is_normal() && s.is_finite() && x.is_finite() {
            worst = worst.max(ulps(*s, want));
        }
    }
    worst
}

fn approx_case(name: &str, op: UnOp, xs: &[f32], bound: Bound, exact: fn(f64) -> f64) {
    let (s, g) = un_f32(&format!("conf_{}", name.replace('.', "_")), op, xs);
    // The sim half on its own: the sim computes these in f64 and rounds once.
    let own = sim_vs_exact(xs, &s, exact);
    eprintln!("conformance {:<40} {:>6} cases  sim vs f64 reference: max {own} ulp", format!("{name} (sim)"), xs.len());
    assert!(own <= 1, "{name}: the sim is {own} ulp from the f64 reference");
    let Some(g) = g else {
        skipped(name, xs.len());
        return;
    };
    let mut worst_ulps = 0u64;
    let mut worst_rel = 0f64;
    let mut bad = Vec::new();
    for i in 0..xs.len() {
        let (a, b) = (s[i], g[i]);
        if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) {
            continue;
        }
        let u = if a.is_finite() && b.is_finite() { ulps(a, b) } else { u64::MAX };
        let d = f64::from((a - b).abs());
        let rel = d / f64::from(a.abs()).max(f64::MIN_POSITIVE);
        worst_ulps = worst_ulps.max(u);
        worst_rel = worst_rel.max(rel);
        let ok = match bound {
            Bound::Ulps(n) => u <= n,
            Bound::Abs(abs) => {
                let ulp = f64::from(f32::from_bits(a.abs().to_bits() + 1) - a.abs());
                d <= f64::from(abs) + ulp
            }
            Bound::Rel(r) => rel <= f64::from(r),
        };
        if !ok {
            bad.push(i);
        }
    }
    let b = match bound {
        Bound::Ulps(n) => format!("bound {n} ulp"),
        Bound::Abs(a) => format!("bound {a:.1e} + 1 ulp absolute"),
        Bound::Rel(r) => format!("bound {r:.1e} relative"),
    };
    eprintln!("conformance {name:<40} {:>6} cases  max {worst_ulps} ulp, {worst_rel:.2e} relative ({b})", xs.len());
    for i in bad.iter().take(8) {
        eprintln!("  x = {:e}: sim {:e}, gpu {:e}", xs[*i], s[*i], g[*i]);
    }
    assert!(bad.is_empty(), "{name}: {} of {} results outside the bound", bad.len(), xs.len());
}

/// `n` values: the given specials, then uniform in [lo, hi).
fn inputs(seed: u64, specials: &[f32], lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut v = specials.to_vec();
    while v.len() < 2048 {
        v.push(rng.f32(lo, hi));
    }
    v
}

#[test]
fn approximations_ex2_rsqrt_rcp_lg2_tanh_within_the_ptx_bounds() {
    require_gpu_if_asked();
    let specials = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    approx_case("ex2.approx.ftz.f32", UnOp::Ex2Approx, &inputs(1, &specials, -100.0, 100.0), Bound::Ulps(3), f64::exp2);
    let mut rng = Rng(2);
    // Positive magnitudes over 2^-60 .. 2^60 (log-uniform), with the specials.
    let mut pos: Vec<f32> = vec![1.0, 4.0, 0.25, 2.0, f32::INFINITY, 0.0, f32::MAX];
    while pos.len() < 2048 {
        pos.push(2f32.powf(rng.f32(-60.0, 60.0)));
    }
    approx_case("rsqrt.approx.ftz.f32", UnOp::RsqrtApprox, &pos, Bound::Ulps(3), |x| 1.0 / x.sqrt());
    approx_case("rcp.approx.ftz.f32", UnOp::RcpApprox, &pos, Bound::Ulps(2), |x| 1.0 / x);
    approx_case("lg2.approx.ftz.f32", UnOp::Lg2Approx, &pos, Bound::Abs(2f32.powi(-22)), f64::log2);
    // Small arguments too, where tanh x ≈ x.
    let mut small = specials.to_vec();
    small.extend((0..256).map(|i| (i as f32 - 128.0) * 1e-3));
    let t = inputs(3, &small, -6.0, 6.0);
    approx_case("tanh.approx.f32", UnOp::TanhApprox, &t, Bound::Rel(2f32.powf(-10.5)), f64::tanh);
    // The correctly rounded ones are exact.
    approx_case("sqrt.rn.f32", UnOp::Sqrt, &pos, Bound::Ulps(0), f64::sqrt);
    approx_case("rcp.rn.f32", UnOp::Rcp, &pos, Bound::Ulps(0), |x| 1.0 / x);
}

// ---------------------------------------------------------------------------------------------- atomics

/// Every thread of the grid (blocks of 256) adds its values to counter `t % 8`: `atom.add.u32` on
/// global (returning the old value), `red.add.f32`, `red.max.s32` and `red.min.u32` on global, and
/// per-block `red.add.u32` / `atom.add.f32` on shared memory (threads 0..7 zero the shared slots;
/// after a barrier they write them out).
fn atomics_kernel() -> Kernel {
    let mut b = Builder::new("conf_atomics");
    let vu = b.param_ptr("vu");
    let vf = b.param_ptr("vf");
    let gu = b.param_ptr("gu");
    let gf = b.param_ptr("gf");
    let olds = b.param_ptr("olds");
    let su_out = b.param_ptr("su_out");
    let sf_out = b.param_ptr("sf_out");
    let gmax = b.param_ptr("gmax");
    let gmin = b.param_ptr("gmin");
    let su = b.shared("su", 8 * 4, 4);
    let sf = b.shared("sf", 8 * 4, 4);
    let t = b.special(Special::TidX);
    let i = b.global_index_x();
    let slot = b.bin(BinOp::And, Ty::B32, t.into(), 7u32.into());
    let first = b.setp(Cmp::Lt, Ty::U32, t.into(), 8u32.into());
    b.if_(first, |b| {
        let a = b.index_shared(su, slot.into(), 4);
        b.st(Space::Shared, Ty::U32, a.into(), 0, 0u32.into());
        let a = b.index_shared(sf, slot.into(), 4);
        b.st(Space::Shared, Ty::F32, a.into(), 0, 0.0f32.into());
    });
    b.bar();
    let ua = b.index(vu, i, 4);
    let u = b.ld(Space::Global, Ty::U32, Cache::None, ua.into(), 0);
    let fa = b.index(vf, i, 4);
    let x = b.ld(Space::Global, Ty::F32, Cache::None, fa.into(), 0);
    let ga = b.index(gu, slot, 4);
    let old = b.atom(AtomOp::Add, Space::Global, Ty::U32, ga.into(), u.into());
    let oa = b.index(olds, i, 4);
    b.st(Space::Global, Ty::U32, oa.into(), 0, old.into());
    let ga = b.index(gf, slot, 4);
    b.red(AtomOp::Add, Space::Global, Ty::F32, ga.into(), x.into());
    let ma = b.index(gmax, slot, 4);
    b.red(AtomOp::Max, Space::Global, Ty::S32, ma.into(), u.into());
    let na = b.index(gmin, slot, 4);
    b.red(AtomOp::Min, Space::Global, Ty::U32, na.into(), u.into());
    let sa = b.index_shared(su, slot.into(), 4);
    b.red(AtomOp::Add, Space::Shared, Ty::U32, sa.into(), u.into());
    let sa = b.index_shared(sf, slot.into(), 4);
    let _ = b.atom(AtomOp::Add, Space::Shared, Ty::F32, sa.into(), x.into());
    b.bar();
    b.if_(first, |b| {
        let c = b.special(Special::CtaidX);
        let row = b.mad(Ty::U32, c.into(), 8u32.into(), slot.into());
        let a = b.index_shared(su, slot.into(), 4);
        let v = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
        let o = b.index(su_out, row, 4);
        b.st(Space::Global, Ty::U32, o.into(), 0, v.into());
        let a = b.index_shared(sf, slot.into(), 4);
        let v = b.ld(Space::Shared, Ty::F32, Cache::None, a.into(), 0);
        let o = b.index(sf_out, row, 4);
        b.st(Space::Global, Ty::F32, o.into(), 0, v.into());
    });
    b.finish()
}

/// Whether the old values `atom.add` returned are consistent with some order of the additions: for
/// each counter, {olds} ∪ {final} = {initial} ∪ {old + value} as multisets.
fn atom_olds_consistent(vals: &[u32], olds: &[u32], finals: &[u32]) -> bool {
    (0..8).all(|c| {
        let mut left: Vec<u32> = (0..vals.len()).filter(|i| i % 256 % 8 == c).map(|i| olds[i]).collect();
        let mut right: Vec<u32> =
            (0..vals.len()).filter(|i| i % 256 % 8 == c).map(|i| olds[i].wrapping_add(vals[i])).collect();
        left.push(finals[c]);
        right.push(0);
        left.sort_unstable();
        right.sort_unstable();
        left == right
    })
}

#[test]
fn atomics_add_min_max_on_global_and_shared_under_contention() {
    require_gpu_if_asked();
    let blocks = 4u32;
    let n = blocks as usize * 256;
    let k = atomics_kernel();
    for (label, seed, exact) in [("exact sums", 0xA70u64, true), ("random", 0xA71, false)] {
        let mut rng = Rng(seed);
        let vu: Vec<u32> = (0..n).map(|_| rng.u32()).collect();
        // Exact: multiples of 1/16 with |v| ≤ 64, so every partial sum (|s| < 2^16) is exact in f32.
        let vf: Vec<f32> = (0..n)
            .map(|_| if exact { ((rng.u32() % 2049) as f32 - 1024.0) / 16.0 } else { rng.f32(-1.0, 1.0) })
            .collect();
        let bufs = vec![
            bytes_u32(&vu),
            bytes_f32(&vf),
            vec![0; 32],
            vec![0; 32],
            vec![0; n * 4],
            vec![0; blocks as usize * 32],
            vec![0; blocks as usize * 32],
            bytes_u32(&[0x8000_0000; 8]),
            vec![0xFF; 32],
        ];
        let out = both(&k, launch(blocks, 256), &bufs);
        let sim_olds = words(&out.sim[4]);
        assert!(atom_olds_consistent(&vu, &sim_olds, &words(&out.sim[2])), "the sim's atom.add old values");
        let name = format!("atom/red global+shared ({label})");
        let Some(g) = &out.gpu else {
            skipped(&name, n * 6);
            continue;
        };
        // Integer results are exact whatever the order.
        for (i, what) in [
            (2, "atom.add.u32 global"),
            (5, "red.add.u32 shared"),
            (7, "red.max.s32 global"),
            (8, "red.min.u32 global"),
        ] {
            exact_words(&format!("{what} ({label})"), &words(&out.sim[i]), &words(&g[i]), false, |j| {
                format!("counter {j}")
            });
        }
        let olds_ok = atom_olds_consistent(&vu, &words(&g[4]), &words(&g[2]));
        eprintln!(
            "conformance {:<40} {:>6} cases  consistent: {olds_ok}",
            format!("atom.add.u32 old values ({label})"),
            n
        );
        assert!(olds_ok, "the GPU's atom.add old values are not a permutation of one order of the additions");
        // Float sums: bit for bit when every partial sum is exact, else within n · 2^-24 · Σ|v|.
        for (i, what, adds) in [(3, "red.add.f32 global", n / 8), (6, "atom.add.f32 shared", 32)] {
            let (s, gv) = (floats(&out.sim[i]), floats(&g[i]));
            if exact {
                exact_words(&format!("{what} ({label})"), &words(&out.sim[i]), &words(&g[i]), false, |j| {
                    format!("counter {j}")
                });
                continue;
            }
            let sum_abs: f32 = vf.iter().map(|v| v.abs()).sum();
            let bound = adds as f32 * 2f32.powi(-24) * sum_abs;
            let worst = s.iter().zip(&gv).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            eprintln!(
                "conformance {:<40} {:>6} cases  max |Δ| {worst:.2e} (bound {bound:.2e})",
                format!("{what} ({label})"),
                s.len()
            );
            assert!(worst <= bound && gv.iter().all(|x| x.is_finite()), "{what}: {worst:e} over the bound {bound:e}");
        }
    }
}
