//! Shared helpers of the `kernels_*` tests: seeded inputs, device buffers on the `sim`, launching a
//! generated kernel by its launch rule, and the checks (every output element written, relative
//! Frobenius error against the `cpu` reference).

#![allow(dead_code)]

use flashc_codegen::kernels::{ArgRule, Generated};
use flashc_compiler::gir::{Bindings, DType};
use flashc_runtime::sim::{Arg, GlobalMemory, Launch, Stats, bf16_to_f32, f32_to_bf16, run};

/// SplitMix64.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values rounded to bf16 (nearest even), as f32.
pub fn q_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| bf16_to_f32(f32_to_bf16(*x))).collect()
}

/// Values as stored in `dtype` (bf16 rounds, f32 is exact).
pub fn quantize(dtype: DType, v: &[f32]) -> Vec<f32> {
    if dtype == DType::Bf16 { q_bf16(v) } else { v.to_vec() }
}

/// The tolerance of a kernel storing `dtype` (DESIGN.md: f32 < 1e-5, bf16 < 1e-2).
pub fn tol(dtype: DType) -> f64 {
    if dtype == DType::Bf16 { 1e-2 } else { 1e-5 }
}

/// ‖out − reference‖ / ‖reference‖ in f64; infinite when either holds a non-finite value.
pub fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len(), "lengths differ");
    if out.iter().chain(reference).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        num += (f64::from(o) - f64::from(r)).powi(2);
        den += f64::from(r).powi(2);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Asserts every element was written (the poison reads as NaN) and the error is below `tol`; prints
/// the error (`cargo test -- --nocapture` lists them) and returns it.
#[track_caller]
pub fn check(what: &str, out: &[f32], reference: &[f32], tol: f64) -> f64 {
    if let Some(i) = out.iter().position(|x| x.is_nan()) {
        panic!("{what}: element {i} of {} not written (NaN)", out.len());
    }
    let e = rel_err(out, reference);
    println!("[err] {what}: {e:.3e}");
    assert!(e < tol, "{what}: relative error {e:e} ≥ {tol:e}");
    e
}

/// Device memory on the sim.
pub struct Dev {
    pub mem: GlobalMemory,
}

impl Default for Dev {
    fn default() -> Self {
        Dev::new()
    }
}

impl Dev {
    pub fn new() -> Dev {
        Dev { mem: GlobalMemory::new() }
    }

    /// A buffer holding `v` stored as `dtype` (at least one byte is allocated).
    pub fn input(&mut self, dtype: DType, v: &[f32]) -> u64 {
        let a = self.mem.alloc((v.len() * dtype.size() as usize).max(1));
        match dtype {
            DType::Bf16 => self.mem.write_bf16(a, v).expect("write"),
            DType::F32 => self.mem.write_f32(a, v).expect("write"),
            other => panic!("no float input of {other:?}"),
        }
        a
    }

    pub fn input_i32(&mut self, v: &[i32]) -> u64 {
        let a = self.mem.alloc((v.len() * 4).max(1));
        self.mem.write_i32(a, v).expect("write");
        a
    }

    /// A poisoned buffer of `n` elements of `dtype`.
    pub fn output(&mut self, dtype: DType, n: usize) -> u64 {
        self.mem.alloc((n * dtype.size() as usize).max(1))
    }

    pub fn read(&self, dtype: DType, a: u64, n: usize) -> Vec<f32> {
        match dtype {
            DType::Bf16 => self.mem.read_bf16(a, n).expect("read"),
            DType::F32 => self.mem.read_f32(a, n).expect("read"),
            other => panic!("no float output of {other:?}"),
        }
    }

    pub fn read_i32(&self, a: u64, n: usize) -> Vec<i32> {
        self.mem.read_i32(a, n).expect("read")
    }

    /// Launches `g` by its rule at sizes `at`, buffer slot `k` at `slots[k]`; panics on any sim error.
    #[track_caller]
    pub fn launch(&mut self, g: &Generated, at: &Bindings, slots: &[u64]) -> Stats {
        let args: Vec<Arg> = g
            .launch
            .args
            .iter()
            .map(|r| match r {
                ArgRule::Buffer(b) => Arg::Ptr(slots[b.0 as usize]),
                ArgRule::View(b, off) => Arg::Ptr(slots[b.0 as usize] + off.eval(at) as u64),
                ArgRule::Size(d) => Arg::U32(u32::try_from(d.eval(at)).expect("size fits u32")),
                ArgRule::U32(x) => Arg::U32(*x),
                ArgRule::F32(x) => Arg::F32(*x),
            })
            .collect();
        let grid = g.launch.grid_at(at);
        if grid.contains(&0) {
            return Stats::default();
        }
        let launch = Launch { grid, block: g.launch.block, dynamic_shared: g.launch.dynamic_shared };
        run(&g.kernel, &launch, &args, &mut self.mem).unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name))
    }
}

/// `b` sequences of `t` tokens.
pub fn at(b: i64, t: i64) -> Bindings {
    Bindings { b, t, s: 0 }
}

// ---------------------------------------------------------------------------------------------- groups

use flashc_codegen::kernels::dispatch::{self, Dispatched};
use flashc_compiler::gir::Mode;
use flashc_compiler::schedule::{BufferId, KernelGroup, Program};
use flashc_runtime::device::HostData;

/// The scheduled program of `examples/{name}.arch` in `mode`, with `edit` applied to the text first
/// (e.g. switching the model's dtype).
pub fn example_program(name: &str, mode: Mode, edit: impl Fn(String) -> String) -> Program {
    use flashc_compiler::lower::{LowerOptions, lower};
    use flashc_compiler::passes::{pipeline, run_passes};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(format!("{name}.arch"));
    let text = edit(std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let spec = flashc_dsl::load(&text).unwrap_or_else(|d| panic!("{name}: {d:?}")).0;
    let mut g = lower(&spec, &LowerOptions::new(mode)).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    run_passes(&mut g, &pipeline(mode), false, &mut |_, _| {}).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    flashc_compiler::schedule::schedule(&g).unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"))
}

/// One float result of a group: its name, storage type, the sim's values and the cpu's.
pub struct GroupOut {
    pub what: String,
    pub dtype: DType,
    pub sim: Vec<f32>,
    pub cpu: Vec<f32>,
}

/// Runs kernel group `group` of `program` at sizes `at` twice from the same inputs (`input(name,
/// type, n)` gives each input's values, quantised here to its storage): its dispatched kernels on the
/// sim (inputs updated in place share their storage with the update, other results and scratch start
/// as poison) and the group on the cpu reference (`cpu::exec::eval_group`). Returns every result.
pub fn group_vs_cpu(
    program: &Program,
    group: &KernelGroup,
    at: &Bindings,
    mut input: impl FnMut(&str, &flashc_compiler::gir::TensorType, usize) -> Vec<f32>,
) -> (Dispatched, Vec<GroupOut>) {
    let d = dispatch::generate(program, group).unwrap_or_else(|e| panic!("{e}"));
    let mut dev = Dev::new();
    let mut root_addr: std::collections::BTreeMap<BufferId, (u64, Vec<f32>)> = std::collections::BTreeMap::new();
    let mut slots = vec![0u64; program.buffers.len() + d.scratch.len()];
    let numel = |t: &flashc_compiler::gir::TensorType| t.shape.iter().map(|s| s.eval(at) as usize).product::<usize>();
    let mut cpu_in = Vec::new();
    for &b in &group.inputs {
        let buf = program.buffer(b).expect("input buffer");
        let n = numel(&buf.ty);
        let root = buf.root();
        let (addr, vals) = root_addr
            .entry(root)
            .or_insert_with(|| {
                let v = quantize(buf.ty.dtype, &input(&buf.name, &buf.ty, n));
                (dev.input(buf.ty.dtype, &v), v)
            })
            .clone();
        slots[b.0 as usize] = addr;
        cpu_in.push(HostData::F32(vals[..n].to_vec()));
    }
    for &b in &group.outputs {
        let buf = program.buffer(b).expect("output buffer");
        let addr = match root_addr.get(&buf.root()) {
            Some((a, _)) => *a,
            None => dev.output(buf.ty.dtype, numel(&buf.ty)),
        };
        slots[b.0 as usize] = addr;
    }
    for s in &d.scratch {
        slots[s.id.0 as usize] = dev.mem.alloc((s.bytes.eval(at) as usize).max(1));
    }
    for k in &d.kernels {
        dev.launch(k, at, &slots);
    }
    let cpu_out = flashc_runtime::cpu::exec::eval_group(program, group, cpu_in, at).unwrap_or_else(|e| panic!("{e}"));
    let outs = group
        .outputs
        .iter()
        .zip(cpu_out)
        .map(|(&b, c)| {
            let buf = program.buffer(b).expect("output buffer");
            let HostData::F32(cpu) = c else { panic!("{}: an integer result", buf.name) };
            let sim = dev.read(buf.ty.dtype, slots[b.0 as usize], numel(&buf.ty));
            GroupOut { what: format!("{} {} {}", group.id, group.name, buf.name), dtype: buf.ty.dtype, sim, cpu }
        })
        .collect();
    (d, outs)
}
