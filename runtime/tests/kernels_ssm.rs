//! The short-convolution and Mamba2 (SSD) kernels (`flashc_codegen::kernels::{conv, ssd}`) run on the
//! `sim` device against the `cpu` reference kernels, on fresh random bf16-quantised inputs: every
//! output is poisoned first (fresh allocations are 0xFF, a NaN) and compared in full, states
//! included, by relative Frobenius error. Then every kernel is written as PTX and assembled with
//! ptxas for sm_80 and sm_90 (skipped with a message when ptxas is missing, unless
//! `FLASHC_REQUIRE_PTXAS=1`), with no register spills allowed in the decode kernels.

use std::collections::HashMap;

use flashc_codegen::kernels::conv::{self, ConvSpec};
use flashc_codegen::kernels::ssd::{self, Mamba2StepSpec, SsdDims, SsdScanSpec, SsdStepSpec};
use flashc_codegen::kernels::{ArgRule, Generated};
use flashc_codegen::ptx::{self, Options, Target, ptxas};
use flashc_compiler::gir::Bindings;
use flashc_compiler::schedule::BufferId;
use flashc_runtime::cpu;
use flashc_runtime::sim::{Arg, GlobalMemory, Launch, Stats, bf16_to_f32, f32_to_bf16, run};

// ---------------------------------------------------------------------------------------------- helpers

/// A deterministic stream of pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Roughly normal (sum of 4 uniforms), scaled.
    fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.unit()).sum::<f32>() - 2.0;
        s * 1.73 * scale
    }

    /// `n` values, bf16-quantised.
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| q(self.normal(scale))).collect()
    }
}

/// Rounds to bf16 (where the graph stores a bf16 tensor).
fn q(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

fn qv(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| q(x)).collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Relative Frobenius error `‖got − want‖ / ‖want‖`; NaN (a poisoned, unwritten output) fails.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let e = rel_err(got, want);
    let bad = got.iter().position(|v| !v.is_finite());
    assert!(bad.is_none() && e < tol, "{what}: rel. error {e:.3e} (tolerance {tol:.0e}), first non-finite at {bad:?}");
    e
}

/// Program buffers on the sim's memory.
struct Mem {
    mem: GlobalMemory,
    bufs: HashMap<BufferId, u64>,
}

impl Mem {
    fn new() -> Mem {
        Mem { mem: GlobalMemory::new(), bufs: HashMap::new() }
    }

    fn bf16(&mut self, id: BufferId, v: &[f32]) {
        let a = self.mem.alloc(v.len().max(1) * 2);
        self.mem.write_bf16(a, v).expect("in bounds");
        self.bufs.insert(id, a);
    }

    fn f32(&mut self, id: BufferId, v: &[f32]) {
        let a = self.mem.alloc(v.len().max(1) * 4);
        self.mem.write_f32(a, v).expect("in bounds");
        self.bufs.insert(id, a);
    }

    fn i32(&mut self, id: BufferId, v: &[i32]) {
        let a = self.mem.alloc(v.len().max(1) * 4);
        self.mem.write_i32(a, v).expect("in bounds");
        self.bufs.insert(id, a);
    }

    /// An output, poisoned (fresh allocations are 0xFF).
    fn out(&mut self, id: BufferId, bytes: usize) {
        let a = self.mem.alloc(bytes.max(1));
        self.bufs.insert(id, a);
    }

    fn read_bf16(&self, id: BufferId, n: usize) -> Vec<f32> {
        self.mem.read_bf16(self.bufs[&id], n).expect("in bounds")
    }

    fn read_f32(&self, id: BufferId, n: usize) -> Vec<f32> {
        self.mem.read_f32(self.bufs[&id], n).expect("in bounds")
    }

    /// Launches a generated kernel by its launch rule at sizes `at`.
    fn launch(&mut self, g: &Generated, at: Bindings) -> Option<Stats> {
        let args: Vec<Arg> = g
            .launch
            .args
            .iter()
            .map(|a| match a {
                ArgRule::Buffer(id) => Arg::Ptr(*self.bufs.get(id).unwrap_or_else(|| panic!("no buffer {id}"))),
                ArgRule::View(id, off) => {
                    Arg::Ptr(*self.bufs.get(id).unwrap_or_else(|| panic!("no buffer {id}")) + off.eval(&at) as u64)
                }
                ArgRule::Size(d) => Arg::U32(u32::try_from(d.eval(&at)).expect("size")),
                ArgRule::U32(v) => Arg::U32(*v),
                ArgRule::F32(v) => Arg::F32(*v),
            })
            .collect();
        let grid = g.launch.grid_at(&at);
        if grid.contains(&0) {
            return None;
        }
        let l = Launch { grid, block: g.launch.block, dynamic_shared: g.launch.dynamic_shared };
        Some(run(&g.kernel, &l, &args, &mut self.mem).unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name)))
    }
}

fn at(b: usize, t: usize) -> Bindings {
    Bindings { b: b as i64, t: t as i64, s: 0 }
}

// ---------------------------------------------------------------------------------------------- conv

/// The graph's `conv_silu`: conv in f32, stored bf16, SiLU, stored bf16.
fn conv_silu_ref(y: &[f32]) -> Vec<f32> {
    y.iter().map(|&v| q(silu(q(v)))).collect()
}

struct ConvCase {
    batch: usize,
    tokens: usize,
    channels: usize,
    k: usize,
    bias: bool,
}

/// Runs the prefill conv on the sim and the cpu; returns (sim y, sim state, cpu y, cpu state).
fn conv_prefill(
    c: &ConvCase,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    state: &[f32],
    lens: &[i32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let spec = ConvSpec::new("conv_silu_prefill", c.channels as u32, c.k as u32, c.bias);
    let g = conv::conv1d(&spec).expect("generates");
    let o = &spec.operands;
    let mut m = Mem::new();
    m.bf16(o.x, x);
    m.bf16(o.w, w);
    m.bf16(o.state, state);
    m.i32(o.lens, lens);
    if let Some(bi) = o.bias {
        m.bf16(bi, bias);
    }
    m.out(o.y, x.len() * 2);
    m.launch(&g, at(c.batch, c.tokens));
    let y = m.read_bf16(o.y, x.len());
    let s = m.read_bf16(o.state, state.len());
    let dims = cpu::ConvDims { batch: c.batch, tokens: c.tokens, channels: c.channels, k: c.k };
    let mut ws = state.to_vec();
    let mut wy = vec![0.0; x.len()];
    cpu::conv1d(&dims, x, w, &mut ws, lens, c.bias.then_some(bias), &mut wy).expect("cpu conv1d");
    (y, s, conv_silu_ref(&wy), ws)
}

#[test]
fn conv1d_prefill_matches_cpu() {
    let mut rng = Rng::new(1);
    let cases = [
        ConvCase { batch: 3, tokens: 37, channels: 24, k: 4, bias: true },
        ConvCase { batch: 2, tokens: 5, channels: 40, k: 4, bias: false },
        ConvCase { batch: 3, tokens: 2, channels: 16, k: 4, bias: true },
        ConvCase { batch: 2, tokens: 70, channels: 13, k: 3, bias: true },
        ConvCase { batch: 1, tokens: 9, channels: 264, k: 2, bias: false },
        ConvCase { batch: 2, tokens: 1, channels: 8, k: 4, bias: true },
    ];
    for c in &cases {
        let (b, t, ch, k) = (c.batch, c.tokens, c.channels, c.k);
        let x = rng.normals(b * t * ch, 1.0);
        let w = rng.normals(ch * k, 0.5);
        let bias = rng.normals(ch, 0.5);
        let state = rng.normals(b * ch * (k - 1), 1.0);
        // Different lens per sequence: all, none, fewer than K − 1, one.
        let lens: Vec<i32> = (0..b).map(|i| [t, 0, 1.min(t), (k - 2).min(t)][i % 4] as i32).collect();
        let (y, s, wy, ws) = conv_prefill(c, &x, &w, &bias, &state, &lens);
        let ey = check("conv1d y", &y, &wy, 1e-2);
        let es = check("conv1d state", &s, &ws, 1e-6);
        println!("conv1d B={b} T={t} C={ch} K={k} bias={} lens={lens:?}: y {ey:.2e} state {es:.1e}", c.bias);
    }
}

#[test]
fn conv1d_update_matches_cpu_and_extends_prefill() {
    let mut rng = Rng::new(2);
    for &(b, t, ch, k, with_bias) in
        &[(3usize, 6usize, 24usize, 4usize, true), (2, 3, 13, 4, false), (2, 1, 48, 2, true)]
    {
        let x = rng.normals(b * (t + 1) * ch, 1.0);
        let w = rng.normals(ch * k, 0.5);
        let bias = rng.normals(ch, 0.5);
        let state0 = rng.normals(b * ch * (k - 1), 1.0);
        // Prefill of t tokens, then one update, against prefill of t + 1 tokens.
        let part = |lo: usize, hi: usize| -> Vec<f32> {
            (0..b).flat_map(|i| x[(i * (t + 1) + lo) * ch..(i * (t + 1) + hi) * ch].to_vec()).collect()
        };
        let c1 = ConvCase { batch: b, tokens: t, channels: ch, k, bias: with_bias };
        let (y1, s1, _, _) = conv_prefill(&c1, &part(0, t), &w, &bias, &state0, &vec![t as i32; b]);
        let spec = ConvSpec::new("conv_silu_update", ch as u32, k as u32, with_bias);
        let g = conv::conv1d_update(&spec).expect("generates");
        let o = &spec.operands;
        let mut m = Mem::new();
        let xt = part(t, t + 1);
        m.bf16(o.x, &xt);
        m.bf16(o.w, &w);
        m.bf16(o.state, &s1);
        if let Some(bi) = o.bias {
            m.bf16(bi, &bias);
        }
        m.out(o.y, xt.len() * 2);
        m.launch(&g, at(b, 1));
        let y2 = m.read_bf16(o.y, xt.len());
        let s2 = m.read_bf16(o.state, s1.len());
        // Against the cpu update from the same state.
        let dims = cpu::ConvDims { batch: b, tokens: 1, channels: ch, k };
        let mut ws = s1.clone();
        let mut wy = vec![0.0; xt.len()];
        cpu::conv1d_update(&dims, &xt, &w, &mut ws, with_bias.then_some(&bias[..]), &mut wy).expect("cpu update");
        let e1 = check("conv1d_update y", &y2, &conv_silu_ref(&wy), 1e-2);
        check("conv1d_update state", &s2, &ws, 1e-6);
        // Against one prefill of t + 1 tokens.
        let c2 = ConvCase { batch: b, tokens: t + 1, channels: ch, k, bias: with_bias };
        let (yf, sf, _, _) = conv_prefill(&c2, &x, &w, &bias, &state0, &vec![t as i32 + 1; b]);
        let y_split: Vec<f32> = (0..b)
            .flat_map(|i| {
                let mut r = y1[i * t * ch..(i + 1) * t * ch].to_vec();
                r.extend_from_slice(&y2[i * ch..(i + 1) * ch]);
                r
            })
            .collect();
        assert_eq!(y_split, yf, "prefill + update = prefill of one more token (y)");
        assert_eq!(s2, sf, "prefill + update = prefill of one more token (state)");
        println!(
            "conv1d_update B={b} C={ch} K={k} bias={with_bias}: y {e1:.2e}; prefill {t} + update = prefill {}",
            t + 1
        );
    }
}

// ---------------------------------------------------------------------------------------------- SSD

struct SsdInputs {
    x: Vec<f32>,
    dt: Vec<f32>,
    a: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
    d: Vec<f32>,
    state: Vec<f32>,
}

fn ssd_inputs(rng: &mut Rng, dims: SsdDims, batch: usize, tokens: usize, with_state: bool) -> SsdInputs {
    let SsdDims { heads, head_dim: p, groups, state: n } = dims;
    let (h, p, g, n) = (heads as usize, p as usize, groups as usize, n as usize);
    SsdInputs {
        x: rng.normals(batch * tokens * h * p, 1.0),
        // softplus of a normal-ish value (as after the graph's softplus), A = −U[0.2, 2].
        dt: (0..batch * tokens * h).map(|_| q((rng.normal(1.0) - 1.0).exp().ln_1p())).collect(),
        a: (0..h).map(|_| q(-rng.uniform(0.2, 2.0))).collect(),
        bm: rng.normals(batch * tokens * g * n, 0.5),
        cm: rng.normals(batch * tokens * g * n, 0.5),
        d: rng.normals(h, 1.0),
        state: if with_state {
            (0..batch * h * p * n).map(|_| rng.normal(1.0)).collect()
        } else {
            vec![0.0; batch * h * p * n]
        },
    }
}

fn cpu_dims(dims: SsdDims, batch: usize, tokens: usize) -> cpu::SsdDims {
    cpu::SsdDims {
        batch,
        tokens,
        heads: dims.heads as usize,
        p: dims.head_dim as usize,
        groups: dims.groups as usize,
        n: dims.state as usize,
    }
}

/// The scan on the sim: (y, state').
fn sim_scan(
    spec: &SsdScanSpec,
    i: &SsdInputs,
    batch: usize,
    tokens: usize,
    lens: &[i32],
) -> (Vec<f32>, Vec<f32>, Stats) {
    let g = ssd::ssd_scan(spec).unwrap_or_else(|e| panic!("{e}"));
    let o = &spec.operands;
    let mut m = Mem::new();
    m.bf16(o.x, &i.x);
    m.bf16(o.dt, &i.dt);
    m.bf16(o.a, &i.a);
    m.bf16(o.bm, &i.bm);
    m.bf16(o.cm, &i.cm);
    m.bf16(o.d, &i.d);
    m.f32(o.state, &i.state);
    m.i32(o.lens, lens);
    m.out(o.y, i.x.len() * 2);
    let stats = m.launch(&g, at(batch, tokens)).unwrap_or_default();
    (m.read_bf16(o.y, i.x.len()), m.read_f32(o.state, i.state.len()), stats)
}

/// The step on the sim: (y, state').
fn sim_step(spec: &SsdStepSpec, i: &SsdInputs, batch: usize) -> (Vec<f32>, Vec<f32>) {
    let g = ssd::ssd_step(spec).unwrap_or_else(|e| panic!("{e}"));
    let o = &spec.operands;
    let mut m = Mem::new();
    m.bf16(o.x, &i.x);
    m.bf16(o.dt, &i.dt);
    m.bf16(o.a, &i.a);
    m.bf16(o.bm, &i.bm);
    m.bf16(o.cm, &i.cm);
    m.bf16(o.d, &i.d);
    m.f32(o.state, &i.state);
    m.out(o.y, i.x.len() * 2);
    m.launch(&g, at(batch, 1));
    (m.read_bf16(o.y, i.x.len()), m.read_f32(o.state, i.state.len()))
}

#[test]
fn ssd_scan_matches_cpu() {
    let mut rng = Rng::new(3);
    // (H, P, G, N, chunk, batch)
    let shapes =
        [(2u32, 16u32, 1u32, 16u32, 8u32, 3usize), (4, 32, 2, 32, 16, 2), (2, 64, 2, 16, 16, 2), (3, 16, 1, 32, 8, 2)];
    let mut worst = (0.0f64, 0.0f64);
    for (si, &(h, p, g, n, chunk, batch)) in shapes.iter().enumerate() {
        let dims = SsdDims { heads: h, head_dim: p, groups: g, state: n };
        let c = chunk as usize;
        // Below, at and above the chunk, and across several chunks.
        let lengths: Vec<usize> = match si {
            0 => vec![c - 3, c, c + 5, 3 * c + 2],
            1 => vec![c + 1, 2 * c],
            2 => vec![c - 1, 2 * c + 3],
            _ => vec![1, 2 * c + 5],
        };
        for &t in &lengths {
            for with_state in [false, true] {
                let i = ssd_inputs(&mut rng, dims, batch, t, with_state);
                // Different lens: all, none, one, a chunk boundary or inside a chunk.
                let lens: Vec<i32> =
                    (0..batch).map(|b| [t, 0, 1, c.min(t), t.saturating_sub(2)][(b + si) % 5] as i32).collect();
                let mut ws = i.state.clone();
                let mut wy = vec![0.0; i.x.len()];
                let cd = cpu_dims(dims, batch, t);
                cpu::ssd_scan(&cd, &i.x, &i.dt, &i.a, &i.bm, &i.cm, &i.d, &mut ws, &lens, c, &mut wy)
                    .expect("cpu scan");
                let mut runs = Vec::new();
                for stages in [1, 2] {
                    let mut spec = SsdScanSpec::new("ssd_scan", dims, chunk);
                    spec.stages = Some(stages);
                    let (y, s, stats) = sim_scan(&spec, &i, batch, t, &lens);
                    let ey = check("ssd_scan y", &y, &qv(&wy), 1e-2);
                    let es = check("ssd_scan state", &s, &ws, 1e-2);
                    worst = (worst.0.max(ey), worst.1.max(es));
                    println!(
                        "ssd_scan H={h} P={p} G={g} N={n} chunk={chunk} B={batch} T={t} lens={lens:?} init={with_state} stages={stages}: y {ey:.2e} state {es:.2e} ({} warp-instructions)",
                        stats.instructions
                    );
                    runs.push((y, s));
                }
                assert_eq!(runs[0], runs[1], "1 and 2 stages compute the same values");
            }
        }
    }
    println!("ssd_scan worst: y {:.2e} state {:.2e}", worst.0, worst.1);
}

#[test]
fn ssd_scan_large_chunks_and_p_tiles() {
    // An op chunk of 256 (Nemotron-Flash) runs as 64-token sub-chunks: the same values. Also a
    // P-tile below P (several blocks per head) and the Nemotron state width N = 128.
    let mut rng = Rng::new(4);
    let cases = [
        // (dims, chunk, p_tile, batch, tokens, lens)
        (SsdDims { heads: 2, head_dim: 16, groups: 1, state: 16 }, 256u32, None, 2usize, 70usize, vec![70, 65]),
        (SsdDims { heads: 2, head_dim: 64, groups: 2, state: 32 }, 16, Some(16u32), 2, 37, vec![37, 16]),
        (SsdDims { heads: 2, head_dim: 64, groups: 1, state: 128 }, 256, None, 1, 67, vec![66]),
    ];
    for (dims, chunk, p_tile, batch, t, lens) in cases {
        let i = ssd_inputs(&mut rng, dims, batch, t, true);
        let mut spec = SsdScanSpec::new("ssd_scan", dims, chunk);
        spec.p_tile = p_tile;
        let tiling = ssd::scan_tiling(&spec).expect("tiles");
        assert_eq!(tiling.chunk, chunk.min(64));
        let (y, s, stats) = sim_scan(&spec, &i, batch, t, &lens);
        let mut ws = i.state.clone();
        let mut wy = vec![0.0; i.x.len()];
        let cd = cpu_dims(dims, batch, t);
        cpu::ssd_scan(&cd, &i.x, &i.dt, &i.a, &i.bm, &i.cm, &i.d, &mut ws, &lens, chunk as usize, &mut wy)
            .expect("cpu");
        let ey = check("ssd_scan y", &y, &qv(&wy), 1e-2);
        let es = check("ssd_scan state", &s, &ws, 1e-2);
        println!(
            "ssd_scan {dims:?} chunk {chunk} → {} P-tile {} B={batch} T={t} lens={lens:?}: y {ey:.2e} state {es:.2e} ({} warp-instructions)",
            tiling.chunk, tiling.p_tile, stats.instructions
        );
    }
}

#[test]
fn ssd_step_matches_cpu() {
    let mut rng = Rng::new(5);
    for &(h, p, g, n, batch) in
        &[(2u32, 16u32, 1u32, 16u32, 3usize), (4, 32, 2, 32, 2), (2, 64, 2, 16, 2), (2, 64, 1, 128, 1)]
    {
        let dims = SsdDims { heads: h, head_dim: p, groups: g, state: n };
        let i = ssd_inputs(&mut rng, dims, batch, 1, true);
        let (y, s) = sim_step(&SsdStepSpec::new("ssd_step", dims), &i, batch);
        let mut ws = i.state.clone();
        let mut wy = vec![0.0; i.x.len()];
        cpu::ssd_step(&cpu_dims(dims, batch, 1), &i.x, &i.dt, &i.a, &i.bm, &i.cm, &i.d, &mut ws, &mut wy).expect("cpu");
        let ey = check("ssd_step y", &y, &qv(&wy), 1e-2);
        let es = check("ssd_step state", &s, &ws, 1e-5);
        assert!(rel_err(&s, &i.state) > 1e-3, "the state was updated");
        let differ = s.iter().zip(&ws).filter(|(a, b)| a != b).count();
        println!(
            "ssd_step H={h} P={p} G={g} N={n} B={batch}: y {ey:.2e} state {es:.2e} ({differ} of {} state values not bit-equal)",
            s.len()
        );
    }
}

#[test]
fn ssd_prefill_then_step_equals_steps_from_the_start() {
    let mut rng = Rng::new(6);
    let dims = SsdDims { heads: 4, head_dim: 16, groups: 2, state: 16 };
    let (batch, t) = (2usize, 21usize);
    let (h, p, g, n) = (4usize, 16usize, 2usize, 16usize);
    let all = ssd_inputs(&mut rng, dims, batch, t + 1, true);
    let tok = |v: &[f32], row: usize, lo: usize, hi: usize| -> Vec<f32> {
        (0..batch).flat_map(|b| v[(b * (t + 1) + lo) * row..(b * (t + 1) + hi) * row].to_vec()).collect()
    };
    let part = |lo: usize, hi: usize, state: Vec<f32>| SsdInputs {
        x: tok(&all.x, h * p, lo, hi),
        dt: tok(&all.dt, h, lo, hi),
        a: all.a.clone(),
        bm: tok(&all.bm, g * n, lo, hi),
        cm: tok(&all.cm, g * n, lo, hi),
        d: all.d.clone(),
        state,
    };
    // Chunked prefill of t tokens (chunk 8), then one decode step.
    let (_, s_pre, _) =
        sim_scan(&SsdScanSpec::new("ssd_scan", dims, 8), &part(0, t, all.state.clone()), batch, t, &[t as i32; 2]);
    let step = SsdStepSpec::new("ssd_step", dims);
    let (y_a, s_a) = sim_step(&step, &part(t, t + 1, s_pre), batch);
    // Decode from the start: t + 1 steps.
    let mut s = all.state.clone();
    let mut y_b = Vec::new();
    for i in 0..=t {
        let (y, s2) = sim_step(&step, &part(i, i + 1, s), batch);
        s = s2;
        y_b = y;
    }
    let ey = check("prefill + step y", &y_a, &y_b, 1e-2);
    let es = check("prefill + step state", &s_a, &s, 1e-2);
    println!("ssd prefill {t} + step vs {} steps: y {ey:.2e} state {es:.2e}", t + 1);
}

// ---------------------------------------------------------------------------------------------- mamba2_step

struct Mamba2Case {
    dims: SsdDims,
    k: usize,
    group: u32,
    batch: usize,
    conv_bias: bool,
    clamp: Option<(f32, f32)>,
    norm_before_gate: bool,
}

/// A variant's results: (name, y, conv state, ssm state).
type Mamba2Run = (&'static str, Vec<f32>, Vec<f32>, Vec<f32>);

#[test]
fn mamba2_step_matches_the_unfused_graph() {
    let mut rng = Rng::new(7);
    let cases = [
        Mamba2Case {
            dims: SsdDims { heads: 4, head_dim: 16, groups: 2, state: 16 },
            k: 4,
            group: 32,
            batch: 2,
            conv_bias: true,
            clamp: Some((0.001, 0.1)),
            norm_before_gate: false,
        },
        Mamba2Case {
            dims: SsdDims { heads: 4, head_dim: 16, groups: 2, state: 16 },
            k: 4,
            group: 64,
            batch: 3,
            conv_bias: false,
            clamp: None,
            norm_before_gate: false,
        },
        Mamba2Case {
            dims: SsdDims { heads: 2, head_dim: 32, groups: 1, state: 32 },
            k: 4,
            group: 64,
            batch: 2,
            conv_bias: true,
            clamp: None,
            norm_before_gate: true,
        },
        Mamba2Case {
            dims: SsdDims { heads: 2, head_dim: 64, groups: 1, state: 16 },
            k: 3,
            group: 128,
            batch: 1,
            conv_bias: true,
            clamp: Some((0.0, 0.5)),
            norm_before_gate: false,
        },
        // Several B/C groups per block, 4 row-core iterations, conv channels beyond the block size.
        Mamba2Case {
            dims: SsdDims { heads: 16, head_dim: 64, groups: 2, state: 32 },
            k: 4,
            group: 1024,
            batch: 2,
            conv_bias: true,
            clamp: None,
            norm_before_gate: false,
        },
        // A per-head norm narrower than a B/C group: the split version only.
        Mamba2Case {
            dims: SsdDims { heads: 4, head_dim: 16, groups: 1, state: 16 },
            k: 4,
            group: 16,
            batch: 2,
            conv_bias: true,
            clamp: None,
            norm_before_gate: true,
        },
        // The Nemotron-Flash state width (a whole warp per row), two norm groups.
        Mamba2Case {
            dims: SsdDims { heads: 4, head_dim: 64, groups: 2, state: 128 },
            k: 4,
            group: 128,
            batch: 1,
            conv_bias: true,
            clamp: None,
            norm_before_gate: false,
        },
    ];
    for c in &cases {
        let SsdDims { heads, head_dim, groups, state } = c.dims;
        let (h, p, g, n, b, k) = (heads as usize, head_dim as usize, groups as usize, state as usize, c.batch, c.k);
        let di = h * p;
        let cd = di + 2 * g * n;
        let zw = 2 * di + 2 * g * n + h;
        let zx = rng.normals(b * zw, 1.0);
        let dt_bias = rng.normals(h, 1.0);
        let conv_w = rng.normals(cd * k, 0.5);
        let conv_b = rng.normals(cd, 0.5);
        let conv_s = rng.normals(b * cd * (k - 1), 1.0);
        let a: Vec<f32> = (0..h).map(|_| q(-rng.uniform(1.0, 16.0))).collect();
        let d = rng.normals(h, 1.0);
        let ssm: Vec<f32> = (0..b * h * p * n).map(|_| rng.normal(1.0)).collect();
        let norm_w = rng.normals(di, 1.0);

        let mut spec = Mamba2StepSpec::new("mamba2_step", c.dims);
        spec.conv_width = k as u32;
        spec.norm_group = c.group;
        spec.norm_before_gate = c.norm_before_gate;
        spec.dt_min = c.clamp.map(|v| v.0);
        spec.dt_max = c.clamp.map(|v| v.1);
        spec.operands = ssd::Mamba2Operands::numbered(c.conv_bias);
        // Both variants, when the one-kernel version takes the shape: (name, y, conv state, ssm state).
        let mut variants: Vec<(&str, Vec<Generated>)> = Vec::new();
        if let Ok(one) = ssd::mamba2_step(&spec) {
            variants.push(("one kernel", vec![one]));
        } else {
            assert!(c.group < c.dims.head_dim * c.dims.heads / c.dims.groups, "only narrow norm groups are refused");
        }
        variants.push(("split", ssd::mamba2_step_split(&spec).unwrap_or_else(|e| panic!("{e}")).to_vec()));
        let o = &spec.operands;
        let results: Vec<Mamba2Run> = variants
            .into_iter()
            .map(|(name, kernels)| {
                let mut m = Mem::new();
                m.bf16(o.zxbcdt, &zx);
                m.bf16(o.dt_bias, &dt_bias);
                m.bf16(o.conv_w, &conv_w);
                m.bf16(o.conv_state, &conv_s);
                if let Some(cb) = o.conv_bias {
                    m.bf16(cb, &conv_b);
                }
                m.bf16(o.a, &a);
                m.bf16(o.d, &d);
                m.f32(o.state, &ssm);
                m.bf16(o.norm_w, &norm_w);
                m.out(o.y, b * di * 2);
                for kernel in &kernels {
                    m.launch(kernel, at(b, 1));
                }
                (
                    name,
                    m.read_bf16(o.y, b * di),
                    m.read_bf16(o.conv_state, conv_s.len()),
                    m.read_f32(o.state, ssm.len()),
                )
            })
            .collect();

        // The unfused graph on the cpu, with its bf16 tensors between ops.
        let col =
            |lo: usize, hi: usize| -> Vec<f32> { (0..b).flat_map(|i| zx[i * zw + lo..i * zw + hi].to_vec()).collect() };
        let z = col(0, di);
        let xbc = col(di, di + cd);
        let dt_raw = col(di + cd, zw);
        let mut wcs = conv_s.clone();
        let mut conv_y = vec![0.0; b * cd];
        let cdims = cpu::ConvDims { batch: b, tokens: 1, channels: cd, k };
        cpu::conv1d_update(&cdims, &xbc, &conv_w, &mut wcs, c.conv_bias.then_some(&conv_b[..]), &mut conv_y)
            .expect("conv");
        let act = conv_silu_ref(&conv_y);
        let pick = |lo: usize, hi: usize| -> Vec<f32> {
            (0..b).flat_map(|i| act[i * cd + lo..i * cd + hi].to_vec()).collect()
        };
        let (xs, bs, cs_) = (pick(0, di), pick(di, di + g * n), pick(di + g * n, cd));
        let dt: Vec<f32> = dt_raw
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let s = q(q(v + dt_bias[i % h]));
                let sp = q(s.max(0.0) + (-s.abs()).exp().ln_1p());
                match c.clamp {
                    Some((lo, hi)) => q(sp.max(lo).min(hi)),
                    None => sp,
                }
            })
            .collect();
        let mut wss = ssm.clone();
        let mut ssd_y = vec![0.0; b * di];
        cpu::ssd_step(&cpu_dims(c.dims, b, 1), &xs, &dt, &a, &bs, &cs_, &d, &mut wss, &mut ssd_y).expect("ssd");
        let ssd_y = qv(&ssd_y);
        let mut wy = vec![0.0; b * di];
        cpu::gated_rmsnorm(b, di, &ssd_y, &z, &norm_w, 1e-5, c.group as usize, c.norm_before_gate, &mut wy)
            .expect("norm");
        for (name, y, cs, ss) in &results {
            let ey = check(&format!("mamba2_step ({name}) y"), y, &qv(&wy), 1e-2);
            check(&format!("mamba2_step ({name}) conv state"), cs, &wcs, 1e-6);
            let es = check(&format!("mamba2_step ({name}) ssm state"), ss, &wss, 1e-3);
            println!(
                "mamba2_step {name}: H={h} P={p} G={g} N={n} K={k} group={} B={b} bias={} clamp={:?} nbg={}: y {ey:.2e} ssm state {es:.2e}",
                c.group, c.conv_bias, c.clamp, c.norm_before_gate
            );
        }
        if let [one, split] = &results[..] {
            assert_eq!((&one.1, &one.2, &one.3), (&split.1, &split.2, &split.3), "the two variants agree exactly");
        }
    }
}

#[test]
fn generators_reject_unsupported_shapes() {
    let dims = SsdDims { heads: 4, head_dim: 16, groups: 2, state: 16 };
    let mut spec = Mamba2StepSpec::new("m", dims);
    spec.norm_group = 16; // smaller than a B/C group's heads (2·16)
    assert!(ssd::mamba2_step(&spec).is_err());
    assert!(ssd::ssd_scan(&SsdScanSpec::new("s", SsdDims { head_dim: 12, ..dims }, 16)).is_err());
    assert!(ssd::ssd_step(&SsdStepSpec::new("s", SsdDims { state: 12, ..dims })).is_err());
    assert!(conv::conv1d(&ConvSpec::new("c", 16, 9, false)).is_err());
}

// ---------------------------------------------------------------------------------------------- ptxas

/// Every kernel, at test sizes and at Nemotron-Flash sizes; `true` for the decode kernels.
fn all_kernels() -> Vec<(Generated, bool)> {
    let mut out = Vec::new();
    for (ch, k, bias) in [(24u32, 4u32, true), (13, 3, false), (4352, 4, true), (6400, 4, true)] {
        out.push((conv::conv1d(&ConvSpec::new(format!("conv1d_c{ch}_k{k}"), ch, k, bias)).expect("conv1d"), false));
        out.push((
            conv::conv1d_update(&ConvSpec::new(format!("conv1d_update_c{ch}_k{k}"), ch, k, bias)).expect("update"),
            true,
        ));
    }
    let nemo1b = SsdDims { heads: 64, head_dim: 64, groups: 1, state: 128 };
    let nemo3b = SsdDims { heads: 96, head_dim: 64, groups: 1, state: 128 };
    let small = [
        SsdDims { heads: 2, head_dim: 16, groups: 1, state: 16 },
        SsdDims { heads: 4, head_dim: 32, groups: 2, state: 32 },
        SsdDims { heads: 2, head_dim: 64, groups: 2, state: 16 },
    ];
    for (i, dims) in small.iter().chain([&nemo1b, &nemo3b]).enumerate() {
        for chunk in [16u32, 256] {
            for stages in [1, 2] {
                let mut spec = SsdScanSpec::new(format!("ssd_scan_{i}_q{chunk}_s{stages}"), *dims, chunk);
                spec.stages = Some(stages);
                out.push((ssd::ssd_scan(&spec).expect("scan"), false));
            }
        }
        out.push((ssd::ssd_step(&SsdStepSpec::new(format!("ssd_step_{i}"), *dims)).expect("step"), true));
        let spec = Mamba2StepSpec::new(format!("mamba2_step_{i}"), *dims);
        out.push((ssd::mamba2_step(&spec).expect("mamba2_step"), true));
        for g in ssd::mamba2_step_split(&spec).expect("mamba2_step_split") {
            out.push((g, true));
        }
    }
    out
}

#[test]
fn kernels_assemble_for_sm80_and_sm90_without_decode_spills() {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        println!("ptxas not found: skipping the assembler checks (scripts/install-ptxas.sh)");
        return;
    }
    println!("{:<28} {:>6} {:>5} {:>6} {:>9} {:>6} {:>5}", "kernel", "arch", "regs", "spill", "smem", "dyn", "block");
    for (g, decode) in all_kernels() {
        for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90, "sm_90")] {
            let text = ptx::write_string(&g.kernel, &Options { target }).unwrap_or_else(|e| panic!("{e}"));
            let r = ptxas::assemble(&text, arch).unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name));
            println!(
                "{:<28} {:>6} {:>5} {:>6} {:>9} {:>6} {:>5}",
                g.kernel.name,
                arch,
                r.registers,
                r.spill_stores + r.spill_loads,
                r.shared_bytes,
                g.launch.dynamic_shared,
                g.launch.block[0]
            );
            if decode {
                assert_eq!(r.spill_stores + r.spill_loads, 0, "{} spills on {arch}: {r:?}", g.kernel.name);
            }
            assert!(r.warnings.is_empty(), "{} on {arch}: {:?}", g.kernel.name, r.warnings);
        }
    }
}
