//! The fused elementwise generator on the `sim` against the `cpu` kernels: chains, broadcasting
//! (bias, per-head factor, per-token gate), reshapes, every unary op, mixed storage types, at vectorised
//! and ragged sizes, f32 and bf16.

mod kernels_util;

use std::collections::BTreeMap;

use flashc_codegen::kernels::elementwise::fused_elementwise;
use flashc_compiler::gir::{Bindings, DType, Graph, InputRole, Op, Value, parse::parse};
use flashc_runtime::cpu;
use kernels_util::{Dev, Rng, at, check, q_bf16, quantize, tol};

/// Evaluates a fused body with the cpu kernels (f32; `convert` to bf16 rounds, as the kernel does).
fn reference(body: &Graph, params: &[Vec<f32>], at: &Bindings) -> Vec<Vec<f32>> {
    let shape = |v: Value| -> Vec<usize> {
        body.ty(v).expect("typed").shape.iter().map(|d| usize::try_from(d.eval(at)).expect("size")).collect()
    };
    let mut vals: BTreeMap<Value, Vec<f32>> = BTreeMap::new();
    for n in body.topo_order().expect("acyclic") {
        let ops = body.operands(n);
        let arg = |i: usize| vals[&ops[i]].clone();
        let out_len: usize = shape(n.into()).iter().product();
        let mut out = vec![0.0f32; out_len];
        match body.op(n) {
            Op::Input { role: InputRole::Param, index, .. } => out = params[*index as usize].clone(),
            Op::Reshape { .. } => out = arg(0),
            Op::Convert { dtype: DType::Bf16 } => out = q_bf16(&arg(0)),
            Op::Convert { .. } => out = arg(0),
            Op::Add => cpu::add(&arg(0), &shape(ops[0]), &arg(1), &shape(ops[1]), &mut out).unwrap(),
            Op::Mul => cpu::mul(&arg(0), &shape(ops[0]), &arg(1), &shape(ops[1]), &mut out).unwrap(),
            Op::Swiglu => cpu::swiglu(&arg(0), &arg(1), &mut out).unwrap(),
            Op::Scale { factor } => cpu::scale(&arg(0), *factor, &mut out).unwrap(),
            Op::Silu => cpu::silu(&arg(0), &mut out).unwrap(),
            Op::Softplus => cpu::softplus(&arg(0), &mut out).unwrap(),
            Op::Exp => cpu::exp(&arg(0), &mut out).unwrap(),
            Op::Sigmoid => cpu::sigmoid(&arg(0), &mut out).unwrap(),
            Op::Neg => cpu::neg(&arg(0), &mut out).unwrap(),
            Op::Relu2 => cpu::relu2(&arg(0), &mut out).unwrap(),
            // The cpu kernel's `0.5·x·(1 + tanh z)` cancels for x ≪ 0 (relative error up to 1e-2 on the
            // tiny results); the kernel computes `x·sigmoid(2z)`, so the reference is that in f64.
            Op::Gelu => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                out = arg(0)
                    .iter()
                    .map(|&x| {
                        let x = f64::from(x);
                        let z = c * (x + 0.044715 * x * x * x);
                        (x / (1.0 + (-2.0 * z).exp())) as f32
                    })
                    .collect();
                let mut cpu_out = vec![0.0; out.len()];
                cpu::gelu(&arg(0), &mut cpu_out).unwrap();
                assert!(kernels_util::rel_err(&cpu_out, &out) < 1e-1, "the cpu gelu drifted");
            }
            Op::Clamp { min, max } => cpu::clamp(&arg(0), *min, *max, &mut out).unwrap(),
            other => panic!("no reference for {}", other.name()),
        }
        vals.insert(n.into(), out);
    }
    body.outputs().iter().map(|(_, v)| vals[v].clone()).collect()
}

/// Generates, runs and checks one body at the given sizes; returns the vector width chosen.
fn run_case(name: &str, text: &str, sizes: &[Bindings], seed: u64, scale: f32) -> u32 {
    let body = parse(text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
    let g = fused_elementwise(&body, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let v = g.kernel.doc.iter().find_map(|l| l.split(", ").nth(2)?.split(' ').next()?.parse().ok()).unwrap_or(0);
    let mut rng = Rng::new(seed);
    for at in sizes {
        let mut dev = Dev::new();
        let params: Vec<(DType, Vec<f32>)> = body
            .params()
            .iter()
            .map(|t| {
                let n = usize::try_from(t.numel().eval(at)).unwrap();
                (t.dtype, quantize(t.dtype, &rng.normals(n, scale)))
            })
            .collect();
        let mut slots: Vec<u64> = params.iter().map(|(d, x)| dev.input(*d, x)).collect();
        let outs: Vec<(DType, usize)> =
            body.output_types().iter().map(|t| (t.dtype, usize::try_from(t.numel().eval(at)).unwrap())).collect();
        for (d, n) in &outs {
            slots.push(dev.output(*d, *n));
        }
        dev.launch(&g, at, &slots);
        let want = reference(&body, &params.iter().map(|(_, x)| x.clone()).collect::<Vec<_>>(), at);
        let first_out = params.len();
        for (k, (d, n)) in outs.iter().enumerate() {
            let got = dev.read(*d, slots[first_out + k], *n);
            let widest = if params.iter().any(|(d, _)| *d == DType::Bf16) || *d == DType::Bf16 {
                DType::Bf16
            } else {
                DType::F32
            };
            check(&format!("{name} out{k} B={} T={} (V={v})", at.b, at.t), &got, &want[k], tol(widest));
        }
    }
    v
}

fn sizes() -> Vec<Bindings> {
    vec![at(2, 13), at(1, 1), at(3, 1), at(1, 7)]
}

#[test]
fn chain_silu_mul_at_several_widths() {
    for dt in ["f32", "bf16"] {
        for (d, want_v) in
            [(64, if dt == "f32" { 4 } else { 8 }), (100, 4), (7, 1), (2048, if dt == "f32" { 4 } else { 8 })]
        {
            let text = format!(
                "gir @chain {{
                  %0 = input[name=\"p0\", role=\"param\", index=0] : {dt}[B, T, {d}]
                  %1 = input[name=\"p1\", role=\"param\", index=1] : {dt}[B, T, {d}]
                  %2 = add(%0, %1) : {dt}[B, T, {d}]
                  %3 = silu(%2) : {dt}[B, T, {d}]
                  %4 = mul(%3, %1) : {dt}[B, T, {d}]
                  output \"0\" = %4
                }}"
            );
            let v = run_case(&format!("chain_{dt}_{d}"), &text, &sizes(), 1, 1.5);
            assert_eq!(v, want_v, "vector width of {dt} width {d}");
        }
    }
}

#[test]
fn bias_and_scalar_broadcasts() {
    for dt in ["f32", "bf16"] {
        for d in [64, 100, 7] {
            let text = format!(
                "gir @bias {{
                  %0 = input[name=\"p0\", role=\"param\", index=0] : {dt}[B, T, {d}]
                  %1 = input[name=\"p1\", role=\"param\", index=1] : {dt}[{d}]
                  %2 = input[name=\"p2\", role=\"param\", index=2] : {dt}[1]
                  %3 = add(%0, %1) : {dt}[B, T, {d}]
                  %4 = gelu(%3) : {dt}[B, T, {d}]
                  %5 = mul(%4, %2) : {dt}[B, T, {d}]
                  output \"0\" = %5
                }}"
            );
            run_case(&format!("bias_{dt}_{d}"), &text, &sizes(), 2, 1.0);
        }
    }
}

#[test]
fn per_head_factors_through_reshapes() {
    for dt in ["f32", "bf16"] {
        for (h, d) in [(4, 16), (3, 5), (2, 64)] {
            let hd = h * d;
            let text = format!(
                "gir @heads {{
                  %0 = input[name=\"p0\", role=\"param\", index=0] : {dt}[B, T, {hd}]
                  %1 = input[name=\"p1\", role=\"param\", index=1] : {dt}[{h}, 1]
                  %2 = input[name=\"p2\", role=\"param\", index=2] : {dt}[B, T, {h}, 1]
                  %3 = reshape[shape=[B, T, {h}, {d}]](%0) : {dt}[B, T, {h}, {d}]
                  %4 = mul(%3, %1) : {dt}[B, T, {h}, {d}]
                  %5 = sigmoid(%2) : {dt}[B, T, {h}, 1]
                  %6 = mul(%4, %5) : {dt}[B, T, {h}, {d}]
                  %7 = reshape[shape=[B, T, {hd}]](%6) : {dt}[B, T, {hd}]
                  output \"0\" = %7
                }}"
            );
            run_case(&format!("heads_{dt}_{h}x{d}"), &text, &sizes(), 3, 1.0);
        }
    }
}

#[test]
fn every_unary_op() {
    for dt in ["f32", "bf16"] {
        for n in [1, 7, 100, 2048] {
            let text = format!(
                "gir @unary {{
                  %0 = input[name=\"p0\", role=\"param\", index=0] : {dt}[{n}]
                  %1 = input[name=\"p1\", role=\"param\", index=1] : {dt}[{n}]
                  %2 = scale[factor=0.37](%0) : {dt}[{n}]
                  %3 = softplus(%0) : {dt}[{n}]
                  %4 = exp(%0) : {dt}[{n}]
                  %5 = sigmoid(%0) : {dt}[{n}]
                  %6 = neg(%0) : {dt}[{n}]
                  %7 = relu2(%0) : {dt}[{n}]
                  %8 = clamp[min=-1.5, max=2.0](%0) : {dt}[{n}]
                  %9 = clamp[min=none, max=0.5](%0) : {dt}[{n}]
                  %10 = clamp[min=0.25, max=none](%0) : {dt}[{n}]
                  %11 = swiglu(%0, %1) : {dt}[{n}]
                  %12 = silu(%0) : {dt}[{n}]
                  %13 = gelu(%0) : {dt}[{n}]
                  output \"scale\" = %2
                  output \"softplus\" = %3
                  output \"exp\" = %4
                  output \"sigmoid\" = %5
                  output \"neg\" = %6
                  output \"relu2\" = %7
                  output \"clamp\" = %8
                  output \"clamp_max\" = %9
                  output \"clamp_min\" = %10
                  output \"swiglu\" = %11
                  output \"silu\" = %12
                  output \"gelu\" = %13
                }}"
            );
            // Wide inputs: softplus, sigmoid and exp at their extremes.
            run_case(&format!("unary_{dt}_{n}"), &text, &[at(1, 1)], 4, 4.0);
        }
    }
}

#[test]
fn mixed_storage_and_two_outputs() {
    for d in [64, 100, 6] {
        let text = format!(
            "gir @mixed {{
              %0 = input[name=\"p0\", role=\"param\", index=0] : bf16[B, T, {d}]
              %1 = input[name=\"p1\", role=\"param\", index=1] : bf16[B, T, {d}]
              %2 = input[name=\"p2\", role=\"param\", index=2] : f32[{d}]
              %3 = add(%0, %1) : bf16[B, T, {d}]
              %4 = convert[dtype=\"f32\"](%3) : f32[B, T, {d}]
              %5 = mul(%4, %2) : f32[B, T, {d}]
              %6 = convert[dtype=\"bf16\"](%5) : bf16[B, T, {d}]
              %7 = relu2(%6) : bf16[B, T, {d}]
              output \"sum\" = %3
              output \"f32\" = %5
              output \"relu2\" = %7
            }}"
        );
        run_case(&format!("mixed_{d}"), &text, &sizes(), 5, 1.0);
    }
}

#[test]
fn rejects_what_it_cannot_compute() {
    let text = "gir @bad {
      %0 = input[name=\"p0\", role=\"param\", index=0] : f32[B, 8]
      %1 = input[name=\"p1\", role=\"param\", index=1] : f32[8]
      %2 = rmsnorm[eps=1e-6](%0, %1) : f32[B, 8]
      output \"0\" = %2
    }";
    assert!(fused_elementwise(&parse(text).unwrap(), "bad").is_err());
    let text = "gir @ints {
      %0 = input[name=\"p0\", role=\"param\", index=0] : i32[B, 8]
      %1 = add(%0, %0) : i32[B, 8]
      output \"0\" = %1
    }";
    assert!(fused_elementwise(&parse(text).unwrap(), "ints").is_err());
}
