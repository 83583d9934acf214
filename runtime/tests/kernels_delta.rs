//! The delta-rule kernels (`codegen::kernels::delta`) on the `sim` device against the `cpu` reference:
//! the chunkwise WY prefill (`delta_scan`), the one-token `delta_step` and the fused decode body
//! `deltanet_step`; chunked prefill followed by decode steps against the recurrence from the start;
//! every kernel through ptxas for sm_80 and sm_90 (zero spills in the decode kernels); FLOP and byte
//! counts with the H200 decode floor.
//!
//! Inputs are fresh pseudo-random values quantised to bf16 (q and k L2-normalised first, β ∈ (0, 1),
//! g < 0), given to both devices; outputs start as poison (NaN) so every element must be written.

mod kernels_util;

use std::collections::BTreeMap;

use flashc_codegen::kernels::delta::{
    DeltaNetStepSpec, DeltaScanSpec, DeltaStepSpec, Engine, delta_scan, delta_step, deltanet_step, deltanet_step_cost,
    deltanet_step_min_bytes, deltanet_step_plan, scan_cost, scan_plan, step_cost, step_min_bytes, step_plan,
};
use flashc_codegen::kernels::{ArgRule, Generated};
use flashc_codegen::ptx::{self, Options, Target, ptxas};
use flashc_compiler::gir::Bindings;
use flashc_compiler::schedule::BufferId;
use flashc_runtime::cpu;
use flashc_runtime::sim::{Arg, GlobalMemory, Launch, Stats, bf16_to_f32, f32_to_bf16, run};

// ---------------------------------------------------------------------------------------------- helpers

/// SplitMix64.
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

    fn uniforms(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.unit() as f32).collect()
    }

    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = self.unit().max(1e-300);
                let u2 = self.unit();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * scale
            })
            .collect()
    }
}

fn bf16(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| bf16_to_f32(f32_to_bf16(x))).collect()
}

/// Rows of width `d` scaled to unit L2 norm, then quantised.
fn unit_rows(mut v: Vec<f32>, d: usize) -> Vec<f32> {
    for row in v.chunks_mut(d) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    bf16(v)
}

/// ‖out − reference‖ / ‖reference‖ (f64); infinite for a NaN (an element never written).
fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len());
    if out.iter().chain(reference).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        num += (f64::from(o) - f64::from(r)).powi(2);
        den += f64::from(r).powi(2);
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

#[track_caller]
fn close(what: &str, out: &[f32], reference: &[f32], tol: f64) -> f64 {
    let e = rel_err(out, reference);
    assert!(e < tol, "{what}: relative error {e:.3e} ≥ {tol:e}");
    e
}

/// Device buffers by id.
#[derive(Default)]
struct Bufs {
    mem: GlobalMemory,
    at: BTreeMap<BufferId, u64>,
}

impl Bufs {
    fn bf16(&mut self, id: BufferId, v: &[f32]) {
        let a = self.mem.alloc(v.len().max(1) * 2);
        self.mem.write_bf16(a, v).unwrap();
        self.at.insert(id, a);
    }

    fn f32(&mut self, id: BufferId, v: &[f32]) {
        let a = self.mem.alloc(v.len().max(1) * 4);
        self.mem.write_f32(a, v).unwrap();
        self.at.insert(id, a);
    }

    fn i32(&mut self, id: BufferId, v: &[i32]) {
        let a = self.mem.alloc(v.len().max(1) * 4);
        self.mem.write_i32(a, v).unwrap();
        self.at.insert(id, a);
    }

    /// An output: poison (0xFF bytes, NaN as bf16 or f32).
    fn out(&mut self, id: BufferId, bytes: usize) {
        let a = self.mem.alloc(bytes.max(1));
        self.at.insert(id, a);
    }

    fn read_bf16(&self, id: BufferId, n: usize) -> Vec<f32> {
        self.mem.read_bf16(self.at[&id], n).unwrap()
    }

    fn read_f32(&self, id: BufferId, n: usize) -> Vec<f32> {
        self.mem.read_f32(self.at[&id], n).unwrap()
    }

    fn read_state(&self, id: BufferId, n: usize) -> Vec<f32> {
        self.read_f32(id, n)
    }

    /// Launches a generated kernel by its launch rule at `b`, `t`.
    fn launch(&mut self, g: &Generated, b: usize, t: usize) -> Stats {
        let at = Bindings { b: b as i64, t: t as i64, s: 0 };
        let args: Vec<Arg> = g
            .launch
            .args
            .iter()
            .map(|a| match a {
                ArgRule::Buffer(id) => Arg::Ptr(self.at[id]),
                ArgRule::View(id, off) => Arg::Ptr(self.at[id] + off.eval(&at) as u64),
                ArgRule::Size(d) => Arg::U32(d.eval(&at) as u32),
                ArgRule::U32(x) => Arg::U32(*x),
                ArgRule::F32(x) => Arg::F32(*x),
            })
            .collect();
        let grid = g.launch.grid_at(&at);
        let launch = Launch { grid, block: g.launch.block, dynamic_shared: g.launch.dynamic_shared };
        run(&g.kernel, &launch, &args, &mut self.mem).unwrap_or_else(|e| panic!("{e}"))
    }
}

// ---------------------------------------------------------------------------------------------- prefill

/// Random delta-rule operands for `batch × tokens × heads` rows.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Option<Vec<f32>>,
    state: Vec<f32>,
}

fn inputs(rng: &mut Rng, rows: usize, bh: usize, dk: usize, dv: usize, gated: bool, with_state: bool) -> Inputs {
    Inputs {
        q: unit_rows(rng.normals(rows * dk, 1.0), dk),
        k: unit_rows(rng.normals(rows * dk, 1.0), dk),
        v: bf16(rng.normals(rows * dv, 1.0)),
        beta: bf16(rng.uniforms(rows, 0.05, 0.95)),
        g: gated.then(|| bf16(rng.uniforms(rows, -0.7, -0.01))),
        state: if with_state { rng.normals(bh * dk * dv, 0.5) } else { vec![0.0; bh * dk * dv] },
    }
}

#[derive(Clone, Copy, Debug)]
struct ScanCase {
    dk: usize,
    dv: usize,
    heads: usize,
    gated: bool,
    tokens: usize,
    chunk: u32,
    with_state: bool,
    v_tile: Option<u32>,
    engine: Option<Engine>,
}

/// Runs the prefill kernel on the sim and returns (o, state').
fn sim_scan(spec: &DeltaScanSpec, i: &Inputs, lens: &[i32], tokens: usize) -> (Vec<f32>, Vec<f32>, Stats) {
    let g = delta_scan(spec).unwrap_or_else(|e| panic!("{e}"));
    let ops = &spec.operands;
    let mut d = Bufs::default();
    d.bf16(ops.q, &i.q);
    d.bf16(ops.k, &i.k);
    d.bf16(ops.v, &i.v);
    d.bf16(ops.beta, &i.beta);
    if let (Some(id), Some(gv)) = (ops.g, &i.g) {
        d.bf16(id, gv);
    }
    d.f32(ops.state, &i.state);
    d.i32(ops.lens, lens);
    d.out(ops.o, i.v.len() * 2);
    let stats = d.launch(&g, lens.len(), tokens);
    (d.read_bf16(ops.o, i.v.len()), d.read_state(ops.state, i.state.len()), stats)
}

fn scan_case(rng: &mut Rng, c: ScanCase, lens: &[i32]) -> (f64, f64) {
    let batch = lens.len();
    let rows = batch * c.tokens * c.heads;
    let i = inputs(rng, rows, batch * c.heads, c.dk, c.dv, c.gated, c.with_state);
    let mut spec = DeltaScanSpec::new("delta_scan_test", c.heads as u32, c.dk as u32, c.dv as u32, c.gated);
    spec.chunk = c.chunk;
    spec.v_tile = c.v_tile;
    spec.engine = c.engine;
    spec.scale = 0.4;
    let plan = scan_plan(&spec).unwrap();
    let (o, s, stats) = sim_scan(&spec, &i, lens, c.tokens);
    // The reference: the cpu's chunked scan (itself checked against the recurrence).
    let dims = cpu::DeltaDims { batch, tokens: c.tokens, heads: c.heads, dk: c.dk, dv: c.dv };
    let mut ws = i.state.clone();
    let mut wo = vec![f32::NAN; i.v.len()];
    cpu::delta_scan(&dims, &i.q, &i.k, &i.v, &i.beta, i.g.as_deref(), &mut ws, lens, c.chunk as usize, 0.4, &mut wo)
        .unwrap();
    let eo = close(&format!("delta_scan o {c:?} lens {lens:?}"), &o, &wo, 1e-2);
    let es = close(&format!("delta_scan state {c:?} lens {lens:?}"), &s, &ws, 1e-2);
    println!(
        "scan dk {} dv {} H {} {} T {} chunk {} tile {} {:?} state {} lens {lens:?}: o {eo:.2e} state {es:.2e} \
         ({} warp-instructions)",
        c.dk,
        c.dv,
        c.heads,
        if c.gated { "gated" } else { "plain" },
        c.tokens,
        c.chunk,
        plan.v_tile,
        plan.engine,
        c.with_state,
        stats.instructions
    );
    (eo, es)
}

fn case(dk: usize, dv: usize, heads: usize, gated: bool, tokens: usize, chunk: u32, with_state: bool) -> ScanCase {
    ScanCase { dk, dv, heads, gated, tokens, chunk, with_state, v_tile: None, engine: None }
}

#[test]
fn scan_below_at_and_above_the_chunk_dk32() {
    let mut rng = Rng(1);
    for gated in [false, true] {
        // Below, at and above chunk 16; batches with different lens (0, inside a chunk, at its end).
        scan_case(&mut rng, case(32, 32, 2, gated, 5, 16, true), &[5, 3]);
        scan_case(&mut rng, case(32, 32, 1, gated, 16, 16, false), &[16, 0]);
        scan_case(&mut rng, case(32, 32, 2, gated, 37, 16, true), &[37, 16, 21]);
    }
}

#[test]
fn scan_dk64_chunks_16_32_64() {
    let mut rng = Rng(2);
    scan_case(&mut rng, case(64, 64, 1, false, 40, 16, true), &[40, 17]);
    scan_case(&mut rng, case(64, 64, 2, true, 33, 32, true), &[33, 32]);
    scan_case(&mut rng, case(64, 64, 1, true, 70, 64, false), &[70, 64]);
}

#[test]
fn scan_value_tiles_and_dk128() {
    let mut rng = Rng(3);
    // dv 64 in two tiles of 32; dk ≠ dv.
    let mut c = case(32, 64, 2, true, 21, 16, true);
    c.v_tile = Some(32);
    scan_case(&mut rng, c, &[21, 9]);
    scan_case(&mut rng, case(128, 128, 1, true, 20, 16, true), &[20]);
    // The Nemotron-Flash shape: dk = dv = 128 at chunk 64 (value tile 64, two tiles per head).
    scan_case(&mut rng, case(128, 128, 1, false, 70, 64, true), &[70, 50]);
}

#[test]
fn scan_simt_engine() {
    let mut rng = Rng(4);
    // Dims that are not multiples of 16 take the f32 engine; 32 forced onto it cross-checks the mma one.
    scan_case(&mut rng, case(24, 20, 2, true, 21, 16, true), &[21, 6]);
    scan_case(&mut rng, case(20, 6, 1, false, 18, 16, true), &[18]);
    let mut c = case(32, 32, 1, true, 19, 16, true);
    c.engine = Some(Engine::Simt);
    scan_case(&mut rng, c, &[19]);
}

#[test]
fn scan_rejects_bad_shapes() {
    let mut s = DeltaScanSpec::new("bad", 2, 32, 32, false);
    s.chunk = 24;
    assert!(delta_scan(&s).is_err());
    let mut s = DeltaScanSpec::new("bad", 2, 24, 32, false);
    s.engine = Some(Engine::Mma);
    assert!(delta_scan(&s).is_err());
    let s = DeltaScanSpec::new("bad", 2, 32, 31, false);
    assert!(delta_scan(&s).is_err());
    let mut s = DeltaScanSpec::new("bad", 2, 32, 32, true);
    s.operands.g = None;
    assert!(delta_scan(&s).is_err());
    // dk = dv = 128 at chunk 64 takes a value tile of 64 to fit sm_80's shared memory.
    let s = DeltaScanSpec::new("nemotron", 16, 128, 128, false);
    let p = scan_plan(&s).unwrap();
    assert_eq!((p.engine, p.v_tile, p.v_tiles), (Engine::Mma, 64, 2));
    assert!(p.shared_bytes <= 163 * 1024, "{p:?}");
}

// ---------------------------------------------------------------------------------------------- decode

/// Runs `delta_step` on the sim: one token per sequence.
fn sim_step(spec: &DeltaStepSpec, i: &Inputs, batch: usize) -> (Vec<f32>, Vec<f32>) {
    let g = delta_step(spec).unwrap_or_else(|e| panic!("{e}"));
    let ops = &spec.operands;
    let mut d = Bufs::default();
    d.bf16(ops.q, &i.q);
    d.bf16(ops.k, &i.k);
    d.bf16(ops.v, &i.v);
    d.bf16(ops.beta, &i.beta);
    if let (Some(id), Some(gv)) = (ops.g, &i.g) {
        d.bf16(id, gv);
    }
    d.f32(ops.state, &i.state);
    d.out(ops.o, i.v.len() * 2);
    d.launch(&g, batch, 1);
    (d.read_bf16(ops.o, i.v.len()), d.read_state(ops.state, i.state.len()))
}

#[test]
fn step_matches_cpu() {
    let mut rng = Rng(5);
    for &(dk, dv, heads, batch) in &[(32, 32, 2, 3), (64, 64, 1, 2), (128, 128, 2, 1), (24, 20, 1, 2), (32, 64, 2, 2)] {
        for gated in [false, true] {
            let i = inputs(&mut rng, batch * heads, batch * heads, dk, dv, gated, true);
            let mut spec = DeltaStepSpec::new("delta_step_test", heads as u32, dk as u32, dv as u32, gated);
            spec.scale = 0.4;
            let (o, s) = sim_step(&spec, &i, batch);
            let dims = cpu::DeltaDims { batch, tokens: 1, heads, dk, dv };
            let mut ws = i.state.clone();
            let mut wo = vec![f32::NAN; i.v.len()];
            cpu::delta_step(&dims, &i.q, &i.k, &i.v, &i.beta, i.g.as_deref(), &mut ws, 0.4, &mut wo).unwrap();
            let eo = close("delta_step o", &o, &wo, 1e-2);
            let es = close("delta_step state", &s, &ws, 1e-5);
            println!("step dk {dk} dv {dv} H {heads} B {batch} gated {gated}: o {eo:.2e} state {es:.2e}");
        }
    }
}

/// The unfused decode graph of one DeltaNet layer on the cpu: three `conv1d_update`s + SiLU, L2 norms,
/// sigmoid, the gate math, `delta_step`, the output norm. Returns (y, conv states, delta state).
struct FusedInputs {
    xq: Vec<f32>,
    xk: Vec<f32>,
    xv: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    cq: Vec<f32>,
    ck: Vec<f32>,
    cv: Vec<f32>,
    b: Vec<f32>,
    a: Vec<f32>,
    dt_bias: Vec<f32>,
    neg_a: Vec<f32>,
    z: Vec<f32>,
    norm_w: Vec<f32>,
    state: Vec<f32>,
    /// Conv biases (q, k, v), when the convs have them.
    bias: Option<[Vec<f32>; 3]>,
}

fn fused_inputs(rng: &mut Rng, batch: usize, heads: usize, dk: usize, dv: usize, kw: usize) -> FusedInputs {
    let (ck, cv) = (heads * dk, heads * dv);
    FusedInputs {
        xq: bf16(rng.normals(batch * ck, 1.0)),
        xk: bf16(rng.normals(batch * ck, 1.0)),
        xv: bf16(rng.normals(batch * cv, 1.0)),
        wq: bf16(rng.normals(ck * kw, 0.5)),
        wk: bf16(rng.normals(ck * kw, 0.5)),
        wv: bf16(rng.normals(cv * kw, 0.5)),
        cq: bf16(rng.normals(batch * ck * (kw - 1), 1.0)),
        ck: bf16(rng.normals(batch * ck * (kw - 1), 1.0)),
        cv: bf16(rng.normals(batch * cv * (kw - 1), 1.0)),
        b: bf16(rng.normals(batch * heads, 1.0)),
        a: bf16(rng.normals(batch * heads, 1.0)),
        dt_bias: bf16(rng.normals(heads, 0.5)),
        neg_a: bf16(rng.uniforms(heads, -1.5, -0.2)),
        z: bf16(rng.normals(batch * cv, 1.0)),
        norm_w: bf16(rng.uniforms(dv, 0.5, 1.5)),
        state: rng.normals(batch * heads * dk * dv, 0.5),
        bias: None,
    }
}

struct FusedOut {
    y: Vec<f32>,
    cq: Vec<f32>,
    ck: Vec<f32>,
    cv: Vec<f32>,
    state: Vec<f32>,
}

fn cpu_deltanet_step(
    i: &FusedInputs,
    batch: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    kw: usize,
    gated: bool,
) -> FusedOut {
    let conv = |x: &[f32], w: &[f32], st: &[f32], ch: usize, which: usize| {
        let mut s = st.to_vec();
        let mut y = vec![0.0; batch * ch];
        let bias = i.bias.as_ref().map(|bs| bs[which].as_slice());
        cpu::conv1d_update(&cpu::ConvDims { batch, tokens: 1, channels: ch, k: kw }, x, w, &mut s, bias, &mut y)
            .unwrap();
        let mut a = vec![0.0; y.len()];
        cpu::silu(&y, &mut a).unwrap();
        (a, s)
    };
    let (q, cq) = conv(&i.xq, &i.wq, &i.cq, heads * dk, 0);
    let (k, ck) = conv(&i.xk, &i.wk, &i.ck, heads * dk, 1);
    let (v, cv) = conv(&i.xv, &i.wv, &i.cv, heads * dv, 2);
    let mut qn = vec![0.0; q.len()];
    let mut kn = vec![0.0; k.len()];
    cpu::l2norm(batch * heads, dk, &q, 1e-6, &mut qn).unwrap();
    cpu::l2norm(batch * heads, dk, &k, 1e-6, &mut kn).unwrap();
    let mut beta = vec![0.0; i.b.len()];
    cpu::sigmoid(&i.b, &mut beta).unwrap();
    let g = gated.then(|| {
        let mut x = vec![0.0; i.a.len()];
        cpu::add(&i.a, &[batch, heads], &i.dt_bias, &[heads], &mut x).unwrap();
        let mut sp = vec![0.0; x.len()];
        cpu::softplus(&x, &mut sp).unwrap();
        let mut g = vec![0.0; x.len()];
        cpu::mul(&sp, &[batch, heads], &i.neg_a, &[heads], &mut g).unwrap();
        g
    });
    let mut state = i.state.clone();
    let mut o = vec![0.0; batch * heads * dv];
    let dims = cpu::DeltaDims { batch, tokens: 1, heads, dk, dv };
    cpu::delta_step(&dims, &qn, &kn, &v, &beta, g.as_deref(), &mut state, 1.0 / (dk as f64).sqrt(), &mut o).unwrap();
    let mut y = vec![0.0; o.len()];
    if gated {
        cpu::gated_rmsnorm(batch * heads, dv, &o, &i.z, &i.norm_w, 1e-5, dv, true, &mut y).unwrap();
    } else {
        cpu::rmsnorm(batch * heads, dv, &o, &i.norm_w, 1e-5, &mut y).unwrap();
    }
    FusedOut { y, cq, ck, cv, state }
}

fn sim_deltanet_step(spec: &DeltaNetStepSpec, i: &FusedInputs, batch: usize) -> FusedOut {
    let g = deltanet_step(spec).unwrap_or_else(|e| panic!("{e}"));
    let o = &spec.operands;
    let mut d = Bufs::default();
    for (id, v) in [
        (o.xq, &i.xq),
        (o.xk, &i.xk),
        (o.xv, &i.xv),
        (o.wq, &i.wq),
        (o.wk, &i.wk),
        (o.wv, &i.wv),
        (o.conv_q, &i.cq),
        (o.conv_k, &i.ck),
        (o.conv_v, &i.cv),
        (o.b, &i.b),
        (o.norm_w, &i.norm_w),
    ] {
        d.bf16(id, v);
    }
    if let Some(gt) = &o.gate {
        for (id, v) in [(gt.a, &i.a), (gt.dt_bias, &i.dt_bias), (gt.decay, &i.neg_a), (gt.z, &i.z)] {
            d.bf16(id, v);
        }
    }
    if let (Some(ids), Some(bs)) = (o.conv_bias, &i.bias) {
        for (id, v) in ids.iter().zip(bs) {
            d.bf16(*id, v);
        }
    }
    d.f32(o.state, &i.state);
    let ny = batch * spec.heads as usize * spec.dv as usize;
    d.out(o.y, ny * 2);
    d.launch(&g, batch, 1);
    FusedOut {
        y: d.read_bf16(o.y, ny),
        cq: d.read_bf16(o.conv_q, i.cq.len()),
        ck: d.read_bf16(o.conv_k, i.ck.len()),
        cv: d.read_bf16(o.conv_v, i.cv.len()),
        state: d.read_state(o.state, i.state.len()),
    }
}

#[test]
fn deltanet_step_matches_the_unfused_graph() {
    let mut rng = Rng(6);
    for &(dk, dv, heads, batch) in &[(32, 32, 2, 2), (64, 64, 1, 2), (128, 128, 2, 1), (32, 64, 1, 1)] {
        for gated in [false, true] {
            let kw = 4;
            let i = fused_inputs(&mut rng, batch, heads, dk, dv, kw);
            let spec = DeltaNetStepSpec::new("deltanet_step_test", heads as u32, dk as u32, dv as u32, gated);
            let shape = deltanet_step_plan(&spec).unwrap();
            let got = sim_deltanet_step(&spec, &i, batch);
            let want = cpu_deltanet_step(&i, batch, heads, dk, dv, kw, gated);
            let ey = close("deltanet_step y", &got.y, &want.y, 1e-2);
            let es = close("deltanet_step state", &got.state, &want.state, 1e-2);
            // The conv states are rolled exactly (bf16 values moved, x appended).
            assert_eq!(got.cq, want.cq, "conv_q");
            assert_eq!(got.ck, want.ck, "conv_k");
            assert_eq!(got.cv, want.cv, "conv_v");
            println!(
                "deltanet_step dk {dk} dv {dv} H {heads} B {batch} gated {gated} ({} threads, {} sub-blocks): y {ey:.2e} state {es:.2e}",
                shape.threads, shape.sub_blocks
            );
        }
    }
}

#[test]
fn deltanet_step_with_conv_biases_and_a_log() {
    let mut rng = Rng(7);
    let (dk, dv, heads, batch, kw) = (32usize, 32usize, 2usize, 2usize, 4usize);
    let mut i = fused_inputs(&mut rng, batch, heads, dk, dv, kw);
    i.bias = Some([
        bf16(rng.normals(heads * dk, 0.3)),
        bf16(rng.normals(heads * dk, 0.3)),
        bf16(rng.normals(heads * dv, 0.3)),
    ]);
    // The kernel gets A_log and computes −exp(A_log); the cpu gets −exp(A_log) as the graph would.
    let a_log = bf16(i.neg_a.iter().map(|x| (-x).ln()).collect());
    let neg_a: Vec<f32> = a_log.iter().map(|x| -x.exp()).collect();
    let mut spec = DeltaNetStepSpec::new("deltanet_step_bias_alog", heads as u32, dk as u32, dv as u32, true);
    spec.decay_from_a_log = true;
    spec.operands.conv_bias = Some([BufferId(6), BufferId(7), BufferId(8)]);
    i.neg_a = a_log;
    let got = sim_deltanet_step(&spec, &i, batch);
    i.neg_a = neg_a;
    let want = cpu_deltanet_step(&i, batch, heads, dk, dv, kw, true);
    let ey = close("deltanet_step (biases, A_log) y", &got.y, &want.y, 1e-2);
    let es = close("deltanet_step (biases, A_log) state", &got.state, &want.state, 1e-2);
    assert_eq!((got.cq, got.ck, got.cv), (want.cq, want.ck, want.cv), "conv states");
    println!("deltanet_step with conv biases and A_log: y {ey:.2e} state {es:.2e}");
}

/// The decode `deltanet_step` groups of real programs, dispatched (q, k, v, β, a and z read as
/// `ArgRule::View`s of the one projection row at their offsets, stride = the row width) and run on
/// the sim, against the cpu's evaluation of the same fused group: plain and gated, f32 and bf16
/// storage, dk = dv and dk ≠ dv. Conv states are rolled exactly; y and the delta state within the
/// tolerance of their storage.
#[test]
fn deltanet_step_groups_of_the_examples_match_cpu() {
    use flashc_compiler::gir::Mode;
    let bf16 = |t: String| t.replace("dtype = f32 ", "dtype = bf16 ");
    let cases = [
        ("tiny-hybrid f32", kernels_util::example_program("tiny-hybrid", Mode::Decode, |t| t), 3),
        ("tiny-hybrid bf16", kernels_util::example_program("tiny-hybrid", Mode::Decode, bf16), 2),
        ("gated-deltanet-hybrid", kernels_util::example_program("gated-deltanet-hybrid", Mode::Decode, |t| t), 1),
        ("nemotron-flash-1b", kernels_util::example_program("nemotron-flash-1b", Mode::Decode, |t| t), 1),
    ];
    let mut rng = kernels_util::Rng::new(8);
    for (what, p, batch) in &cases {
        // One group per distinct body (layers of the same kind dispatch to the same kernel).
        let mut seen = std::collections::BTreeSet::new();
        for group in p.kernels.iter().filter(|g| g.name == "deltanet_step") {
            let types: Vec<String> = group.inputs.iter().map(|b| p.buffer(*b).unwrap().ty.to_string()).collect();
            if !seen.insert(types) {
                continue;
            }
            let at = kernels_util::at(*batch, 1);
            let (d, outs) = kernels_util::group_vs_cpu(p, group, &at, |_, _, n| rng.normals(n, 0.5));
            let views = d.kernels[0].launch.args.iter().filter(|a| matches!(a, ArgRule::View(..))).count();
            assert!(views >= 3, "{what}: the row inputs are not views ({views})");
            let mut errs = Vec::new();
            for o in outs {
                let e = kernels_util::check(
                    &format!("{what} B={batch}: {}", o.what),
                    &o.sim,
                    &o.cpu,
                    kernels_util::tol(o.dtype),
                );
                errs.push(format!("{e:.1e}"));
            }
            println!(
                "{what} {} {}: {} threads, {} views; conv q/k/v, state, y errors [{}]",
                group.id,
                d.kernels[0].kernel.name,
                d.kernels[0].launch.block[0],
                views,
                errs.join(", ")
            );
        }
        assert!(!seen.is_empty(), "{what}: no deltanet_step group");
    }
}

// ---------------------------------------------------------------------------------------------- prefill + decode

/// Chunked prefill of T tokens then N decode steps (sim) equals the recurrence over T + N tokens from
/// the start (cpu), and equals N + T decode steps on the sim.
#[test]
fn prefill_then_decode_equals_decode_from_the_start() {
    let mut rng = Rng(8);
    for gated in [false, true] {
        let (batch, heads, dk, dv, t_pre, n_dec) = (2usize, 2usize, 32usize, 32usize, 21usize, 3usize);
        let total = t_pre + n_dec;
        let all = inputs(&mut rng, batch * total * heads, batch * heads, dk, dv, gated, true);
        // Token-major slices [B, t0..t1, H, d].
        let part = |v: &[f32], d: usize, t0: usize, t1: usize| -> Vec<f32> {
            (0..batch).flat_map(|b| v[(b * total + t0) * heads * d..(b * total + t1) * heads * d].to_vec()).collect()
        };
        let sub = |t0: usize, t1: usize, state: Vec<f32>| Inputs {
            q: part(&all.q, dk, t0, t1),
            k: part(&all.k, dk, t0, t1),
            v: part(&all.v, dv, t0, t1),
            beta: part(&all.beta, 1, t0, t1),
            g: all.g.as_ref().map(|g| part(g, 1, t0, t1)),
            state,
        };
        // The recurrence over everything (cpu).
        let dims = cpu::DeltaDims { batch, tokens: total, heads, dk, dv };
        let mut want_s = all.state.clone();
        let mut want_o = vec![0.0; all.v.len()];
        cpu::delta_recurrent(
            &dims,
            &all.q,
            &all.k,
            &all.v,
            &all.beta,
            all.g.as_deref(),
            &mut want_s,
            &[total as i32; 2],
            0.4,
            &mut want_o,
        )
        .unwrap();
        // Prefill (chunk 16) then decode steps, on the sim.
        let mut scan = DeltaScanSpec::new("prefill", heads as u32, dk as u32, dv as u32, gated);
        scan.chunk = 16;
        scan.scale = 0.4;
        let (o_pre, mut s, _) = sim_scan(&scan, &sub(0, t_pre, all.state.clone()), &[t_pre as i32; 2], t_pre);
        let mut step = DeltaStepSpec::new("decode", heads as u32, dk as u32, dv as u32, gated);
        step.scale = 0.4;
        let mut o_dec = Vec::new();
        for t in t_pre..total {
            let (o, s2) = sim_step(&step, &sub(t, t + 1, s), batch);
            s = s2;
            o_dec.push(o);
        }
        let mut got_o = Vec::new();
        for b in 0..batch {
            got_o.extend_from_slice(&o_pre[b * t_pre * heads * dv..(b + 1) * t_pre * heads * dv]);
            for o in &o_dec {
                got_o.extend_from_slice(&o[b * heads * dv..(b + 1) * heads * dv]);
            }
        }
        let eo = close("prefill + decode o", &got_o, &want_o, 1e-2);
        let es = close("prefill + decode state", &s, &want_s, 1e-2);
        // Decode from the start on the sim.
        let mut s2 = all.state.clone();
        let mut o_all = vec![Vec::new(); batch];
        for t in 0..total {
            let (o, s3) = sim_step(&step, &sub(t, t + 1, s2), batch);
            s2 = s3;
            for (b, ob) in o_all.iter_mut().enumerate() {
                ob.extend_from_slice(&o[b * heads * dv..(b + 1) * heads * dv]);
            }
        }
        let o_all: Vec<f32> = o_all.concat();
        let ed = close("prefill + decode vs sim decode o", &got_o, &o_all, 1e-2);
        let eds = close("prefill + decode vs sim decode state", &s, &s2, 1e-2);
        println!(
            "prefill {t_pre} + decode {n_dec} (gated {gated}): vs recurrence o {eo:.2e} state {es:.2e}; vs sim decode o {ed:.2e} state {eds:.2e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------- ptxas

fn assemble(g: &Generated, arch: &str) -> Option<ptxas::Report> {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        return None;
    }
    let target = if arch == "sm_90" { Target::Sm90 } else { Target::Sm80 };
    let text = ptx::write_string(&g.kernel, &Options { target }).unwrap_or_else(|e| panic!("{e}"));
    Some(ptxas::assemble(&text, arch).unwrap_or_else(|e| panic!("{} for {arch}:\n{e}", g.kernel.name)))
}

#[test]
fn every_kernel_assembles_and_decode_has_no_spills() {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        println!("ptxas not found: skipping the assembler checks (scripts/install-ptxas.sh)");
        return;
    }
    let mut kernels: Vec<(String, Generated, bool)> = Vec::new();
    for &(dk, dv) in &[(32u32, 32u32), (64, 64), (128, 128)] {
        for gated in [false, true] {
            let tag = if gated { "gated" } else { "plain" };
            for chunk in [16u32, 64] {
                let mut s = DeltaScanSpec::new(format!("delta_scan_{tag}_d{dk}_c{chunk}"), 16, dk, dv, gated);
                s.chunk = chunk;
                kernels.push((s.name.clone(), delta_scan(&s).unwrap(), false));
            }
            let s = DeltaStepSpec::new(format!("delta_step_{tag}_d{dk}"), 16, dk, dv, gated);
            kernels.push((s.name.clone(), delta_step(&s).unwrap(), true));
            let s = DeltaNetStepSpec::new(format!("deltanet_step_{tag}_d{dk}"), 16, dk, dv, gated);
            kernels.push((s.name.clone(), deltanet_step(&s).unwrap(), true));
        }
    }
    // The Gated DeltaNet shape of the gated-deltanet-hybrid example: values twice as wide as keys.
    for gated in [false, true] {
        let tag = if gated { "gated" } else { "plain" };
        let s = DeltaNetStepSpec::new(format!("deltanet_step_{tag}_dk128_dv256"), 6, 128, 256, gated);
        kernels.push((s.name.clone(), deltanet_step(&s).unwrap(), true));
    }
    let mut s = DeltaScanSpec::new("delta_scan_simt_d24", 4, 24, 20, true);
    s.chunk = 16;
    kernels.push((s.name.clone(), delta_scan(&s).unwrap(), false));
    println!("| kernel | arch | registers | spill st/ld | smem static | smem dynamic | threads |");
    println!("|---|---|---|---|---|---|---|");
    for (name, g, decode) in &kernels {
        for arch in ["sm_80", "sm_90"] {
            let Some(rep) = assemble(g, arch) else { return };
            println!(
                "| {name} | {arch} | {} | {}/{} | {} | {} | {} |",
                rep.registers,
                rep.spill_stores,
                rep.spill_loads,
                rep.shared_bytes,
                g.launch.dynamic_shared,
                g.launch.block[0]
            );
            if *decode {
                assert_eq!((rep.spill_stores, rep.spill_loads), (0, 0), "{name} spills on {arch}");
            }
            assert!(rep.registers * g.launch.block[0] <= 65536, "{name}: too many registers for the block on {arch}");
        }
    }
}

// ---------------------------------------------------------------------------------------------- costs

/// FLOPs and bytes per kernel (the documented formulas) and the decode floor on an H200.
#[test]
fn costs_and_the_h200_decode_floor() {
    const H200_BYTES_PER_S: f64 = 4.8e12;
    let (heads, d) = (16u32, 128u32);
    println!("| kernel | B | T | GFLOP | MB | FLOP/byte |");
    println!("|---|---|---|---|---|---|");
    for gated in [false, true] {
        let s = DeltaScanSpec::new("scan", heads, d, d, gated);
        let p = scan_plan(&s).unwrap();
        for (b, t) in [(1u64, 1024u64), (8, 4096)] {
            let c = scan_cost(&s, &p, b, t);
            println!(
                "| delta_scan {} (chunk {}, tile {}) | {b} | {t} | {:.2} | {:.2} | {:.1} |",
                if gated { "gated" } else { "plain" },
                p.chunk,
                p.v_tile,
                c.flops / 1e9,
                c.bytes / 1e6,
                c.flops / c.bytes
            );
            assert!(c.flops > 0.0 && c.bytes > 0.0);
        }
    }
    println!(
        "| kernel | B | MFLOP | state MB r+w | kernel MB | minimum MB | minimum / kernel bytes | floor µs (H200) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for gated in [false, true] {
        let s = DeltaStepSpec::new("step", heads, d, d, gated);
        let sh = step_plan(&s).unwrap();
        let f = DeltaNetStepSpec::new("fused", heads, d, d, gated);
        for b in [1u64, 8, 64] {
            let c = step_cost(&s, &sh, b);
            let min = step_min_bytes(&s, b);
            let state = b as f64 * f64::from(heads) * f64::from(d * d) * 8.0;
            println!(
                "| delta_step {} | {b} | {:.2} | {:.2} | {:.3} | {:.3} | {:.1}% | {:.2} |",
                if gated { "gated" } else { "plain" },
                c.flops / 1e6,
                state / 1e6,
                c.bytes / 1e6,
                min / 1e6,
                100.0 * min / c.bytes,
                min / H200_BYTES_PER_S * 1e6
            );
            assert!(min <= c.bytes && min / c.bytes > 0.95);
            let cf = deltanet_step_cost(&f, b);
            let minf = deltanet_step_min_bytes(&f, b);
            println!(
                "| deltanet_step {} | {b} | {:.2} | {:.2} | {:.3} | {:.3} | {:.1}% | {:.2} |",
                if gated { "gated" } else { "plain" },
                cf.flops / 1e6,
                state / 1e6,
                cf.bytes / 1e6,
                minf / 1e6,
                100.0 * minf / cf.bytes,
                minf / H200_BYTES_PER_S * 1e6
            );
            assert!(minf <= cf.bytes && state / cf.bytes > 0.9, "the state dominates the fused kernel's traffic");
        }
    }
}
