//! The GEMM and GEMV generators (`flashc_codegen::kernels::{gemm, gemv}`) on the `sim` device against
//! the `cpu` reference: every prologue and epilogue, ragged sizes (M, N, K not multiples of the tiles,
//! one size spanning several block tiles and enough k tiles for the `cp.async` pipeline to wrap), the
//! launch rules' grids and arguments, outputs poisoned first and every element checked written;
//! relative Frobenius error < 1e-2 against the f32 reference on bf16-quantised inputs, with every sim
//! check (races, uninitialised reads, bounds, barriers) passing. Every variant also assembles with
//! ptxas for sm_80 and sm_90 with zero spills (skipped with a message when there is no ptxas, an error
//! with `FLASHC_REQUIRE_PTXAS=1`); the test prints the register and shared-memory table.

use std::time::Instant;

use flashc_codegen::kernels::gemm::{self, GemmEpilogue, GemmPrologue, GemmSpec, RopeCols, gemm};
use flashc_codegen::kernels::gemv::{GemvSpec, gemv};
use flashc_codegen::kernels::{ArgRule, CodegenError, Generated};
use flashc_codegen::ptx::ptxas::{self, Report};
use flashc_codegen::ptx::{Options, Target, write_string};
use flashc_compiler::gir::{Bindings, DType, Dim, Sym};
use flashc_runtime::cpu::{MatmulDims, RopeDims, RopeStyle, matmul, relu2, rmsnorm, rope, rope_inv_freq, swiglu};
use flashc_runtime::sim::{Arg, GlobalMemory, Launch, Stats, run};

const TOL: f64 = 1e-2;
const EPS: f32 = 1e-6;
const THETA: f64 = 10000.0;

// ------------------------------------------------------------------------------------------ inputs

/// SplitMix64 normals.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` normals times `scale`, rounded to bf16.
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = self.unit().max(1e-300);
                let u2 = self.unit();
                let x = ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32;
                bf16(x * scale)
            })
            .collect()
    }
}

/// `x` rounded to bf16 (to nearest even) and widened back.
fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len());
    if out.iter().chain(reference).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out.iter().zip(reference).map(|(&o, &r)| (f64::from(o) - f64::from(r)).powi(2)).sum();
    let den: f64 = reference.iter().map(|&r| f64::from(r).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

// ------------------------------------------------------------------------------------------ device

/// The sim device: memory, launches and reads in one place.
struct Device {
    mem: GlobalMemory,
    stats: Stats,
}

impl Device {
    fn new() -> Device {
        Device { mem: GlobalMemory::new(), stats: Stats::default() }
    }

    fn bf16_buffer(&mut self, data: &[f32]) -> u64 {
        let addr = self.mem.alloc(data.len() * 2);
        self.mem.write_bf16(addr, data).expect("write");
        addr
    }

    fn f32_buffer(&mut self, data: &[f32]) -> u64 {
        let addr = self.mem.alloc(data.len() * 4);
        self.mem.write_f32(addr, data).expect("write");
        addr
    }

    fn i32_buffer(&mut self, data: &[i32]) -> u64 {
        let addr = self.mem.alloc(data.len() * 4);
        self.mem.write_i32(addr, data).expect("write");
        addr
    }

    /// A bf16 buffer of `n` poisoned elements (`alloc` sets every bit: a NaN no result can be).
    fn poisoned(&mut self, n: usize) -> u64 {
        self.mem.alloc(n * 2)
    }

    /// Reads `n` bf16 elements; panics naming the first element never written.
    fn read_bf16(&mut self, addr: u64, n: usize, what: &str) -> Vec<f32> {
        let raw = self.mem.read(addr, 2 * n).expect("read");
        if let Some(i) = raw.chunks_exact(2).position(|c| c == [0xFF, 0xFF]) {
            panic!("{what}: element {i} was not written");
        }
        self.mem.read_bf16(addr, n).expect("read")
    }

    /// Launches a generated kernel with its launch rule (grid y replaced by `grid_y`);
    /// `buffers[i]` is the address of `BufferId(i)`.
    fn launch(&mut self, g: &Generated, buffers: &[u64], grid_y: Option<u32>) {
        let at = Bindings { b: 1, t: 1, s: 1 };
        let mut grid = g.launch.grid_at(&at);
        if let Some(y) = grid_y {
            grid[1] = y;
        }
        let args: Vec<Arg> = g
            .launch
            .args
            .iter()
            .map(|a| match a {
                ArgRule::Buffer(id) => Arg::Ptr(buffers[id.0 as usize]),
                ArgRule::View(id, off) => Arg::Ptr(buffers[id.0 as usize] + off.eval(&at) as u64),
                ArgRule::Size(d) => Arg::U32(u32::try_from(d.eval(&at)).expect("size")),
                ArgRule::U32(x) => Arg::U32(*x),
                ArgRule::F32(x) => Arg::F32(*x),
            })
            .collect();
        let launch = Launch { grid, block: g.launch.block, dynamic_shared: g.launch.dynamic_shared };
        self.stats = run(&g.kernel, &launch, &args, &mut self.mem).unwrap_or_else(|e| panic!("sim: {e}"));
    }
}

// ------------------------------------------------------------------------------------------ reference

/// The operands of one product and what the kernel must compute from them.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    prologue: GemmPrologue,
    epilogue: GemmEpilogue,
    /// RoPE: sequences (B) and tokens per sequence (T), `m = B·T`.
    seqs: usize,
}

struct Inputs {
    a: Vec<f32>,
    w: Vec<f32>,
    norm_w: Vec<f32>,
    bias: Vec<f32>,
    residual: Vec<f32>,
    start: Vec<i32>,
    inv_freq: Vec<f32>,
}

impl Case {
    fn out_width(&self) -> usize {
        if self.epilogue == GemmEpilogue::Swiglu { self.n / 2 } else { self.n }
    }

    fn inputs(&self, seed: u64) -> Inputs {
        let mut rng = Rng(seed);
        let (m, n, k) = (self.m, self.n, self.k);
        let head_dim = match self.epilogue {
            GemmEpilogue::Rope(r) => r.head_dim as usize,
            _ => 2,
        };
        Inputs {
            a: rng.bf16s(m * k, 1.0),
            w: rng.bf16s(n * k, 1.0 / (k as f32).sqrt()),
            norm_w: rng.bf16s(k, 1.0).into_iter().map(|x| bf16(1.0 + 0.5 * x)).collect(),
            bias: rng.bf16s(n, 0.5),
            residual: rng.bf16s(m * self.out_width(), 1.0),
            start: (0..self.seqs.max(1)).map(|i| 3 + 11 * i as i32).collect(),
            inv_freq: rope_inv_freq(head_dim, THETA),
        }
    }

    /// The f32 reference: the unfused ops on the cpu device, A rounded to bf16 after the norm (the
    /// unfused norm's output is bf16).
    fn reference(&self, x: &Inputs) -> Vec<f32> {
        let (m, n, k) = (self.m, self.n, self.k);
        let a = match self.prologue {
            GemmPrologue::None => x.a.clone(),
            GemmPrologue::RmsNorm { eps } => {
                let mut o = vec![0.0; m * k];
                rmsnorm(m, k, &x.a, &x.norm_w, f64::from(eps), &mut o).expect("rmsnorm");
                o.into_iter().map(bf16).collect()
            }
        };
        let dims = MatmulDims { batch: 1, m, k, n, trans_a: false, trans_b: true, shared_b: true };
        let mut c = vec![0.0; m * n];
        matmul(&dims, &a, &x.w, &mut c).expect("matmul");
        match self.epilogue {
            GemmEpilogue::None => c,
            GemmEpilogue::Bias => c.iter().enumerate().map(|(i, v)| v + x.bias[i % n]).collect(),
            GemmEpilogue::Residual => c.iter().zip(&x.residual).map(|(v, r)| v + r).collect(),
            GemmEpilogue::Relu2 => {
                let mut o = vec![0.0; c.len()];
                relu2(&c, &mut o).expect("relu2");
                o
            }
            GemmEpilogue::Swiglu => {
                let h = n / 2;
                let gate: Vec<f32> = (0..m * h).map(|i| c[(i / h) * n + i % h]).collect();
                let up: Vec<f32> = (0..m * h).map(|i| c[(i / h) * n + h + i % h]).collect();
                let mut o = vec![0.0; m * h];
                swiglu(&gate, &up, &mut o).expect("swiglu");
                o
            }
            GemmEpilogue::Rope(r) => {
                if r.bias {
                    for (i, v) in c.iter_mut().enumerate() {
                        *v += x.bias[i % n];
                    }
                }
                let (lo, hi, d) = (r.lo as usize, r.hi as usize, r.head_dim as usize);
                let w = hi - lo;
                let part: Vec<f32> = (0..m * w).map(|i| c[(i / w) * n + lo + i % w]).collect();
                let dims = RopeDims { batch: self.seqs, tokens: m / self.seqs, heads: w / d, d };
                let mut o = vec![0.0; m * w];
                rope(&dims, &part, &x.start, RopeStyle::RotateHalf, THETA, &mut o).expect("rope");
                for (i, v) in o.into_iter().enumerate() {
                    c[(i / w) * n + lo + i % w] = v;
                }
                c
            }
        }
    }
}

/// Allocates the operands in parameter-number order (`GemmOperands::numbered`).
fn upload(dev: &mut Device, case: &Case, x: &Inputs) -> (Vec<u64>, u64) {
    let out = dev.poisoned(case.m * case.out_width());
    let residual = dev.bf16_buffer(&x.residual);
    let buffers = vec![
        dev.bf16_buffer(&x.a),
        dev.bf16_buffer(&x.w),
        out,
        dev.bf16_buffer(&x.norm_w),
        dev.bf16_buffer(&x.bias),
        residual,
        dev.i32_buffer(&x.start),
        dev.f32_buffer(&x.inv_freq),
    ];
    (buffers, out)
}

fn dims(case: &Case) -> (Dim, Dim, Dim) {
    (Dim::constant(case.m as i64), Dim::constant(case.n as i64), Dim::constant(case.k as i64))
}

fn gemm_spec(case: &Case) -> GemmSpec {
    let (m, n, k) = dims(case);
    let mut spec = GemmSpec::new("gemm_test", m, n, k);
    spec.prologue = case.prologue;
    spec.epilogue = case.epilogue;
    spec.tokens = Some(Dim::constant((case.m / case.seqs.max(1)) as i64));
    spec
}

/// Runs `case` through the GEMM on the sim and returns the error against the reference.
fn check_gemm(case: &Case, grid_y: Option<u32>) -> f64 {
    let spec = gemm_spec(case);
    let g = gemm(&spec).expect("generates");
    let x = case.inputs(case.m as u64 * 1_000_003 + case.n as u64 * 1009 + case.k as u64);
    let mut dev = Device::new();
    let (buffers, out) = upload(&mut dev, case, &x);
    let t = Instant::now();
    dev.launch(&g, &buffers, grid_y);
    let secs = t.elapsed().as_secs_f64();
    let got = dev.read_bf16(out, case.m * case.out_width(), "gemm out");
    let err = rel_err(&got, &case.reference(&x));
    println!(
        "gemm  m={:<4} n={:<4} k={:<4} {:<28} err {err:.2e}  sim {secs:.2}s ({} warp-insts)",
        case.m,
        case.n,
        case.k,
        format!("{:?}/{:?}", case.prologue, case.epilogue).chars().take(28).collect::<String>(),
        dev.stats.instructions
    );
    assert!(err < TOL, "gemm {}x{}x{} {:?} {:?}: error {err}", case.m, case.n, case.k, case.prologue, case.epilogue);
    err
}

fn check_gemv(case: &Case, max_rows: u32, split: Option<u32>) -> f64 {
    let (m, n, k) = dims(case);
    let mut spec = GemvSpec::new("gemv_test", max_rows, m, n, k);
    spec.prologue = case.prologue;
    spec.epilogue = case.epilogue;
    spec.split_k = split;
    let g = gemv(&spec).expect("generates");
    let x = case.inputs(case.m as u64 * 7919 + case.n as u64 * 31 + case.k as u64);
    let mut dev = Device::new();
    let (buffers, out) = upload(&mut dev, case, &x);
    let t = Instant::now();
    dev.launch(&g, &buffers, None);
    let secs = t.elapsed().as_secs_f64();
    let got = dev.read_bf16(out, case.m * case.out_width(), "gemv out");
    let err = rel_err(&got, &case.reference(&x));
    println!(
        "gemv  m={:<2}/{max_rows} n={:<4} k={:<5} split {:?} {:?}/{:?}  err {err:.2e}  sim {secs:.2}s",
        case.m, case.n, case.k, split, case.prologue, case.epilogue
    );
    assert!(err < TOL, "gemv {}x{}x{} {:?} {:?}: error {err}", case.m, case.n, case.k, case.prologue, case.epilogue);
    err
}

fn case(m: usize, n: usize, k: usize, epilogue: GemmEpilogue) -> Case {
    Case { m, n, k, prologue: GemmPrologue::None, epilogue, seqs: 1 }
}

fn normed(mut c: Case) -> Case {
    c.prologue = GemmPrologue::RmsNorm { eps: EPS };
    c
}

// ------------------------------------------------------------------------------------------ gemm

#[test]
fn gemm_plain_ragged_sizes() {
    for (m, n, k) in [(1, 8, 16), (5, 40, 40), (37, 136, 72), (130, 136, 200)] {
        check_gemm(&case(m, n, k, GemmEpilogue::None), None);
    }
}

#[test]
fn gemm_loops_over_m_tiles_with_a_short_grid() {
    // Grid y = 1: one block row walks all three M tiles.
    check_gemm(&case(130, 40, 72, GemmEpilogue::None), Some(1));
}

#[test]
fn gemm_bias_residual_relu2() {
    check_gemm(&case(37, 40, 72, GemmEpilogue::Bias), None);
    check_gemm(&case(37, 136, 40, GemmEpilogue::Residual), None);
    check_gemm(&case(5, 40, 40, GemmEpilogue::Relu2), None);
}

#[test]
fn gemm_swiglu() {
    check_gemm(&case(37, 136, 72, GemmEpilogue::Swiglu), None);
    check_gemm(&case(130, 72, 200, GemmEpilogue::Swiglu), None);
}

#[test]
fn gemm_rmsnorm_prologue() {
    check_gemm(&normed(case(37, 136, 72, GemmEpilogue::None)), None);
    check_gemm(&normed(case(5, 40, 200, GemmEpilogue::Swiglu)), None);
    check_gemm(&normed(case(130, 40, 40, GemmEpilogue::Residual)), None);
}

#[test]
fn gemm_rope() {
    // Fused QKV, head_dim 32: 2 q heads and 1 k head rotated, 1 v head plain.
    let qkv = RopeCols { head_dim: 32, lo: 0, hi: 96, bias: false };
    check_gemm(&Case { seqs: 2, ..case(38, 128, 72, GemmEpilogue::Rope(qkv)) }, None);
    // A rotated range in the middle, with a bias, head_dim 16.
    let mid = RopeCols { head_dim: 16, lo: 16, hi: 48, bias: true };
    check_gemm(&Case { seqs: 1, ..normed(case(37, 72, 40, GemmEpilogue::Rope(mid))) }, None);
}

// ------------------------------------------------------------------------------------------ gemv

#[test]
fn gemv_plain_ragged_sizes() {
    for (m, r, n, k) in [(1, 1, 8, 16), (3, 4, 40, 40), (8, 8, 136, 72), (5, 8, 40, 1032)] {
        check_gemv(&case(m, n, k, GemmEpilogue::None), r, None);
    }
}

#[test]
fn gemv_split_k() {
    for split in [2, 4, 8] {
        check_gemv(&case(3, 40, 1032, GemmEpilogue::None), 4, Some(split));
    }
    check_gemv(&case(1, 136, 4104, GemmEpilogue::Bias), 1, Some(4));
}

#[test]
fn gemv_epilogues() {
    check_gemv(&case(2, 40, 72, GemmEpilogue::Bias), 2, None);
    check_gemv(&case(5, 136, 40, GemmEpilogue::Residual), 8, None);
    check_gemv(&case(4, 136, 72, GemmEpilogue::Swiglu), 4, Some(2));
    check_gemv(&case(1, 40, 40, GemmEpilogue::Relu2), 1, None);
}

/// More rows than one block computes: the rows run in chunks of `max_rows` (ragged last chunk),
/// every prologue and epilogue included.
#[test]
fn gemv_rows_in_chunks() {
    check_gemv(&case(19, 40, 72, GemmEpilogue::None), 8, None);
    check_gemv(&case(9, 136, 40, GemmEpilogue::Residual), 8, None);
    check_gemv(&case(11, 136, 72, GemmEpilogue::Swiglu), 4, Some(2));
    check_gemv(&normed(case(17, 72, 1032, GemmEpilogue::Bias)), 8, None);
}

#[test]
fn gemv_rmsnorm_prologue() {
    check_gemv(&normed(case(3, 40, 72, GemmEpilogue::None)), 4, None);
    check_gemv(&normed(case(8, 72, 1032, GemmEpilogue::Swiglu)), 8, Some(2));
}

#[test]
fn gemm_pipeline_depths() {
    for stages in [2, 4] {
        let c = case(130, 136, 200, GemmEpilogue::Bias);
        let mut spec = gemm_spec(&c);
        spec.stages = stages;
        let g = gemm(&spec).expect("generates");
        let x = c.inputs(u64::from(stages));
        let mut dev = Device::new();
        let (buffers, out) = upload(&mut dev, &c, &x);
        dev.launch(&g, &buffers, None);
        let got = dev.read_bf16(out, c.m * c.n, "gemm out");
        let err = rel_err(&got, &c.reference(&x));
        println!("gemm  {stages} stages: err {err:.2e}");
        assert!(err < TOL, "{stages} stages: error {err}");
    }
}

#[test]
fn sizes_are_checked() {
    let spec = gemm_spec(&case(8, 40, 20, GemmEpilogue::None));
    assert!(matches!(gemm(&spec), Err(CodegenError::Shape(_))), "K = 20 is not a multiple of 8");
    let spec = gemm_spec(&case(8, 42, 16, GemmEpilogue::Swiglu));
    assert!(matches!(gemm(&spec), Err(CodegenError::Shape(_))), "SwiGLU width 21 is odd");
    let mut spec = gemm_spec(&case(8, 40, 16, GemmEpilogue::None));
    spec.dtype = DType::F32;
    assert!(matches!(gemm(&spec), Err(CodegenError::Unsupported(_))));
    let (m, n, k) = dims(&case(9, 40, 16, GemmEpilogue::None));
    // M = 9 over blocks of 8 rows: two row chunks (grid.y = M; the blocks past the last chunk idle).
    let g = gemv(&GemvSpec::new("g", 8, m, n, k)).expect("any M generates");
    assert_eq!(g.launch.grid_at(&Bindings { b: 1, t: 1, s: 0 })[1], 9);
    let (m, n, k) = dims(&case(8, 40, 20, GemmEpilogue::None));
    assert!(
        matches!(gemv(&GemvSpec::new("g", 8, m, n, k)), Err(CodegenError::Shape(_))),
        "K = 20 is not a multiple of 8"
    );
    let (m, n, k) = dims(&case(8, 40, 16, GemmEpilogue::None));
    assert!(matches!(gemv(&GemvSpec::new("g", 9, m, n, k)), Err(CodegenError::Shape(_))), "9 rows per block");
    // A symbolic M: the grid covers N, and a constant number of block rows loop over the M tiles.
    let spec = GemmSpec::new("g", Dim::sym(Sym::T), Dim::constant(4096), Dim::constant(2048));
    let g = gemm(&spec).expect("generates");
    let grid = g.launch.grid_at(&Bindings { b: 1, t: 5000, s: 1 });
    assert_eq!(grid[0], 64);
    assert!(grid[1] >= 1 && grid[1] * grid[0] >= gemm::TARGET_BLOCKS);
}

// ------------------------------------------------------------------------------------------ ptxas

/// Every GEMM and GEMV variant at model-like sizes: each prologue × epilogue (and the pipeline depths
/// for the GEMM; row counts and splits for the GEMV).
fn all_kernels() -> Vec<Generated> {
    let (t, d) = (Dim::sym(Sym::T), |x: i64| Dim::constant(x));
    let prologues = [("", GemmPrologue::None), ("norm_", GemmPrologue::RmsNorm { eps: EPS })];
    let rope = RopeCols { head_dim: 128, lo: 0, hi: 3072, bias: false };
    let epilogues = [
        ("none", GemmEpilogue::None),
        ("bias", GemmEpilogue::Bias),
        ("residual", GemmEpilogue::Residual),
        ("swiglu", GemmEpilogue::Swiglu),
        ("relu2", GemmEpilogue::Relu2),
        ("rope", GemmEpilogue::Rope(rope)),
        ("rope_bias", GemmEpilogue::Rope(RopeCols { bias: true, ..rope })),
    ];
    let mut out = Vec::new();
    for (pn, pro) in prologues {
        for (en, epi) in epilogues {
            let mut spec = GemmSpec::new(format!("gemm_{pn}{en}"), t.clone(), d(4096), d(2048));
            spec.prologue = pro;
            spec.epilogue = epi;
            spec.tokens = Some(t.clone());
            out.push(gemm(&spec).expect("generates"));
        }
    }
    for stages in [2, 4] {
        let mut spec = GemmSpec::new(format!("gemm_none_{stages}stages"), t.clone(), d(4096), d(2048));
        spec.stages = stages;
        out.push(gemm(&spec).expect("generates"));
    }
    for (pn, pro) in prologues {
        for (en, epi) in &epilogues[..5] {
            for rows in [1, 4, 8] {
                let mut spec =
                    GemvSpec::new(format!("gemv{rows}_{pn}{en}"), rows, d(i64::from(rows)), d(2048), d(2048));
                spec.prologue = pro;
                spec.epilogue = *epi;
                out.push(gemv(&spec).expect("generates"));
            }
        }
    }
    for split in [1, 8] {
        let mut spec = GemvSpec::new(format!("gemv1_split{split}"), 1, d(1), d(256), d(8192));
        spec.split_k = Some(split);
        out.push(gemv(&spec).expect("generates"));
    }
    out
}

/// Assembles `text` for `arch`: zero spills, no warnings.
fn assemble(name: &str, text: &str, arch: &str) -> Report {
    let r = ptxas::assemble(text, arch).unwrap_or_else(|e| panic!("{name} for {arch}:\n{e}"));
    assert_eq!((r.spill_stores, r.spill_loads, r.stack_bytes), (0, 0, 0), "{name} spills on {arch}: {r:?}");
    assert!(r.warnings.is_empty(), "{name} on {arch}: ptxas warnings {:?}", r.warnings);
    r
}

#[test]
fn every_kernel_assembles_for_sm80_and_sm90_without_spills() {
    let kernels = all_kernels();
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!(
            "SKIPPED the ptxas check of {} GEMM/GEMV kernels: ptxas not found (scripts/install-ptxas.sh)",
            kernels.len()
        );
        return;
    }
    println!("{:<26} {:>9} {:>9} {:>9} {:>8}  spills", "kernel", "sm_80 reg", "sm_90 reg", "(jit 90)", "smem B");
    for g in &kernels {
        let k = &g.kernel;
        let ptx80 = write_string(k, &Options { target: Target::Sm80 }).unwrap_or_else(|e| panic!("{e}"));
        let ptx90 = write_string(k, &Options { target: Target::Sm90 }).unwrap_or_else(|e| panic!("{e}"));
        let r80 = assemble(&k.name, &ptx80, "sm_80");
        // The sm_80 module as the driver would JIT it on Hopper, and the sm_90 module.
        let jit90 = assemble(&k.name, &ptx80, "sm_90");
        let r90 = assemble(&k.name, &ptx90, "sm_90");
        assert!(r80.shared_bytes <= k.static_shared_bytes(), "{}", k.name);
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>8}  0",
            k.name, r80.registers, r90.registers, jit90.registers, r80.shared_bytes
        );
    }
}

#[test]
fn residual_in_place() {
    // `out` aliases `residual` (h = h + x·Wᵀ): every element is read, then written, by one thread.
    let c = case(37, 136, 72, GemmEpilogue::Residual);
    let (m, n, k) = dims(&c);
    let mut gv = GemvSpec::new("gemv_test", 8, Dim::constant(5), n.clone(), k.clone());
    gv.epilogue = GemmEpilogue::Residual;
    let mut gm = GemmSpec::new("gemm_test", m, n, k);
    gm.epilogue = GemmEpilogue::Residual;
    for (g, rows) in [(gemm(&gm).expect("generates"), 37), (gemv(&gv).expect("generates"), 5)] {
        let c = Case { m: rows, ..case(rows, 136, 72, GemmEpilogue::Residual) };
        let x = c.inputs(99);
        let mut dev = Device::new();
        let (mut buffers, _) = upload(&mut dev, &c, &x);
        buffers[2] = buffers[5];
        dev.launch(&g, &buffers, None);
        let got = dev.read_bf16(buffers[2], c.m * c.n, "in-place out");
        let err = rel_err(&got, &c.reference(&x));
        println!("{} in place: err {err:.2e}", g.kernel.name);
        assert!(err < TOL, "{}: error {err}", g.kernel.name);
    }
}
