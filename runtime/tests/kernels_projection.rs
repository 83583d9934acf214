//! Dispatched projection groups on the `sim` against the `cpu` interpretation of their fused body:
//! the groups of tiny-hybrid (bf16 storage) whose product is split into parts or followed by a tail —
//! the QKV projections (qk-norm + rotate-half rope, interleaved rope), the Mamba2 / DeltaNet input
//! projections (sigmoid, bias + softplus, scale parts) and the logits head (decode, and prefill with
//! its slice of the tokens after the meta prefix). Every kernel of a group runs in order on the
//! group's real slots and its scratch; results are poisoned first and compared with
//! `cpu::exec::eval_fused` at bf16 tolerance (f32 results: the logits head reads a bf16 product).

mod kernels_util;

use flashc_codegen::kernels::dispatch;
use flashc_compiler::gir::{Bindings, DType, Mode, Op};
use flashc_compiler::lower::{LowerOptions, lower};
use flashc_compiler::passes::{pipeline, run_passes};
use flashc_compiler::schedule::{Program, schedule};
use flashc_runtime::cpu::exec::eval_fused;
use flashc_runtime::device::HostData;
use kernels_util::{Dev, Rng, check, quantize};

/// tiny-hybrid with bf16 storage, lowered for `mode`.
fn program(mode: Mode) -> Program {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-hybrid.arch");
    let text = std::fs::read_to_string(&path).expect("tiny-hybrid.arch");
    let mut spec = flashc_dsl::load(&text).expect("tiny-hybrid loads").0;
    spec.dtype = flashc_dsl::spec::DType::Bf16;
    let mut g = lower(&spec, &LowerOptions::new(mode)).expect("lower");
    run_passes(&mut g, &pipeline(mode), false, &mut |_, _| {}).expect("passes");
    schedule(&g).expect("schedule")
}

/// Runs every group named in `names` (first of each name) at `at` and checks its results.
fn run_groups(mode: Mode, names: &[&str], at: Bindings) {
    let p = program(mode);
    for want in names {
        let group = p.kernels.iter().find(|k| k.name == *want).unwrap_or_else(|| panic!("no group {want}"));
        let Op::Fused(body) = p.graph.op(group.node) else { panic!("{want} is not fused") };
        let d = dispatch::generate(&p, group).unwrap_or_else(|e| panic!("{want}: {e}"));
        let mut rng = Rng::new(17 + group.id.0 as u64);
        let mut dev = Dev::new();
        let mut slots = vec![0u64; p.buffers.len() + d.scratch.len()];
        let mut host = Vec::new();
        for &b in &group.inputs {
            let ty = &p.buffer(b).expect("input buffer").ty;
            let n = ty.numel().eval(&at) as usize;
            if ty.dtype == DType::I32 {
                // Positions: the start of each sequence.
                let v: Vec<i32> = (0..n).map(|_| rng.below(100) as i32).collect();
                slots[b.0 as usize] = dev.input_i32(&v);
                host.push(HostData::I32(v));
            } else {
                // Weights [N, K] scaled so products stay O(1); the inverse norms positive.
                let scale = if ty.rank() == 2 { 1.0 / (ty.shape[1].eval(&at) as f32).sqrt() } else { 1.0 };
                let mut v = rng.normals(n, scale);
                if ty.dtype == DType::F32 {
                    v.iter_mut().for_each(|x| *x = x.abs() + 0.5);
                }
                let v = quantize(ty.dtype, &v);
                slots[b.0 as usize] = dev.input(ty.dtype, &v);
                host.push(HostData::F32(v));
            }
        }
        for &b in &group.outputs {
            let ty = &p.buffer(b).expect("output buffer").ty;
            slots[b.0 as usize] = dev.output(ty.dtype, ty.numel().eval(&at) as usize);
        }
        for s in &d.scratch {
            slots[s.id.0 as usize] = dev.mem.alloc((s.bytes.eval(&at) as usize).max(1));
        }
        for k in &d.kernels {
            dev.launch(k, &at, &slots);
        }
        let want_out = eval_fused(&body.graph, host, &at).unwrap_or_else(|e| panic!("{want}: cpu: {e}"));
        for (j, (&b, w)) in group.outputs.iter().zip(want_out).enumerate() {
            let ty = &p.buffer(b).expect("output buffer").ty;
            let HostData::F32(w) = w else { panic!("{want}: integer result") };
            let got = dev.read(ty.dtype, slots[b.0 as usize], w.len());
            check(&format!("{mode:?} {} {want} result {j} {ty}", group.id), &got, &w, 1e-2);
        }
    }
}

#[test]
fn decode_projections_match_cpu() {
    let names =
        ["add_rmsnorm_qkv_matmul_qknorm_rope", "add_rmsnorm_qkv_matmul_rope", "add_rmsnorm_matmul_convert_scale"];
    for b in [1, 3] {
        run_groups(Mode::Decode, &names, Bindings { b, t: 1, s: 0 });
    }
}

#[test]
fn prefill_projections_match_cpu() {
    let names = [
        "add_rmsnorm_qkv_matmul_qknorm_rope",
        "add_rmsnorm_qkv_matmul_rope",
        "rmsnorm_matmul_sigmoid",
        "add_rmsnorm_matmul_bias_softplus",
        "add_rmsnorm_matmul_sigmoid_bias_softplus_scale",
        "add_rmsnorm_matmul_convert_scale",
    ];
    run_groups(Mode::Prefill, &names, Bindings { b: 2, t: 5, s: 0 });
}
