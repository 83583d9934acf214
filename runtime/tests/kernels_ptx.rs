//! Every generator's kernels (each family, storage type and code path) printed as PTX for sm_80 and
//! sm_90 and assembled with ptxas: no errors, no warnings, no register spills. Prints the register
//! table (`cargo test --test kernels_ptx -- --nocapture`). Without ptxas the assembler check is skipped
//! with a message, unless `FLASHC_REQUIRE_PTXAS=1`.

use flashc_codegen::kernels::heads::{self, ColumnOp, HeadNorm, PartKind, Rope, TailPart, TailSpec, Vector};
use flashc_codegen::kernels::slice::{self, SliceSpec};
use flashc_codegen::kernels::{Generated, elementwise, embed, logits, loss, norm, sampling};
use flashc_codegen::ptx::{Options, Target, ptxas, write_string};
use flashc_compiler::gir::{DType, Dim, RopeStyle, Sym, parse::parse};
use flashc_compiler::schedule::BufferId;

fn bt() -> Dim {
    Dim::sym(Sym::B).mul(&Dim::sym(Sym::T))
}

/// A representative kernel of every generator and code path.
fn kernels() -> Vec<(String, Generated)> {
    let mut out: Vec<(String, Generated)> = Vec::new();
    let mut add = |label: &str, g: Generated| out.push((label.to_string(), g));
    for dt in ["bf16", "f32"] {
        for (d, what) in [(2048, "vector"), (7, "scalar")] {
            let text = format!(
                "gir @swiglu_bias {{
                  %0 = input[name=\"p0\", role=\"param\", index=0] : {dt}[B, T, {d}]
                  %1 = input[name=\"p1\", role=\"param\", index=1] : {dt}[B, T, {d}]
                  %2 = input[name=\"p2\", role=\"param\", index=2] : {dt}[{d}]
                  %3 = add(%0, %2) : {dt}[B, T, {d}]
                  %4 = swiglu(%3, %1) : {dt}[B, T, {d}]
                  %5 = gelu(%4) : {dt}[B, T, {d}]
                  %6 = softplus(%5) : {dt}[B, T, {d}]
                  %7 = clamp[min=-3.0, max=3.0](%6) : {dt}[B, T, {d}]
                  output \"0\" = %7
                }}"
            );
            let g = elementwise::fused_elementwise(&parse(&text).unwrap(), &format!("ew_{dt}_{what}")).unwrap();
            add(&format!("elementwise {dt} {what}"), g);
        }
        let text = format!(
            "gir @heads {{
              %0 = input[name=\"p0\", role=\"param\", index=0] : {dt}[B, T, 80]
              %1 = input[name=\"p1\", role=\"param\", index=1] : {dt}[5, 1]
              %2 = reshape[shape=[B, T, 5, 16]](%0) : {dt}[B, T, 5, 16]
              %3 = mul(%2, %1) : {dt}[B, T, 5, 16]
              %4 = sigmoid(%3) : {dt}[B, T, 5, 16]
              %5 = convert[dtype=\"f32\"](%4) : f32[B, T, 5, 16]
              output \"0\" = %5
            }}"
        );
        add(
            &format!("elementwise {dt} heads"),
            elementwise::fused_elementwise(&parse(&text).unwrap(), "ew_heads").unwrap(),
        );
    }
    for dt in [DType::Bf16, DType::F32] {
        let n = dt.name();
        add(&format!("rmsnorm {n} 128 (warp)"), norm::rmsnorm(&bt().scale(16), 128, dt, dt, 1e-6).unwrap());
        add(&format!("rmsnorm {n} 2048 (block)"), norm::rmsnorm(&bt(), 2048, dt, dt, 1e-6).unwrap());
        add(&format!("rmsnorm {n} 8192"), norm::rmsnorm(&bt(), 8192, dt, dt, 1e-6).unwrap());
        add(&format!("rmsnorm {n} 40000 (re-read)"), norm::rmsnorm(&bt(), 40_000, dt, dt, 1e-6).unwrap());
        add(&format!("add_rmsnorm {n} 2048"), norm::add_rmsnorm(&bt(), 2048, dt, dt, 1e-6, true).unwrap());
        add(&format!("add_rmsnorm {n} 100 no sum"), norm::add_rmsnorm(&bt(), 100, dt, dt, 1e-6, false).unwrap());
        add(&format!("l2norm {n} 128"), norm::l2norm(&bt().scale(16), 128, dt, 1e-6).unwrap());
        add(&format!("gated {n} 4096/g1024"), norm::gated_rmsnorm(&bt(), 4096, dt, dt, 1e-5, 1024, false).unwrap());
        add(&format!("gated {n} 4096 nbg"), norm::gated_rmsnorm(&bt(), 4096, dt, dt, 1e-5, 4096, true).unwrap());
        add(&format!("embed {n} 2048"), embed::embed(&bt(), 131_072, 2048, dt).unwrap());
        add(&format!("embed {n} 7"), embed::embed(&bt(), 100, 7, dt).unwrap());
        add(
            &format!("meta_prefix {n}"),
            embed::meta_prefix(256, &Dim::sym(Sym::B), &Dim::sym(Sym::T), 2048, dt).unwrap(),
        );
        let g = embed::embed_meta_prefix(256, &Dim::sym(Sym::B), &Dim::sym(Sym::T), 131_072, 2048, dt).unwrap();
        add(&format!("embed_meta_prefix {n}"), g);
        let [a, b] = logits::row_norm_logits(&bt(), 131_072, 2048, dt, dt).unwrap();
        add(&format!("row_norms {n}"), a);
        add(&format!("row_norm_scale {n}"), b);
        add(&format!("softmax {n} 151936"), sampling::softmax(&Dim::sym(Sym::B), 151_936, dt).unwrap());
        add(&format!("softmax {n} 1001"), sampling::softmax(&Dim::sym(Sym::B), 1001, dt).unwrap());
        add(&format!("argmax {n} 151936"), sampling::argmax(&Dim::sym(Sym::B), 151_936, dt).unwrap());
        add(&format!("top_k {n} 151936 k=64"), sampling::top_k(&Dim::sym(Sym::B), 151_936, 64, dt).unwrap());
        add(&format!("top_k {n} 1001 k=5"), sampling::top_k(&Dim::sym(Sym::B), 1001, 5, dt).unwrap());
        let [a, b] = loss::cross_entropy(&bt(), 131_072, dt).unwrap();
        add(&format!("ce_rows {n}"), a);
        add(&format!("ce_mean {n}"), b);
        for head_dim in [64, 128, 256] {
            for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
                let g = heads::tail(&qkv_tail(dt, head_dim, style)).unwrap();
                add(&format!("heads {n} d{head_dim} {style:?}"), g);
            }
        }
        add(&format!("heads {n} columns"), heads::tail(&columns_tail(dt)).unwrap());
        let spec = SliceSpec {
            name: format!("slice_{n}"),
            dtype: dt,
            shape: vec![Dim::sym(Sym::B), Dim::sym(Sym::T).add(&Dim::constant(256)), Dim::constant(2048)],
            axis: 1,
            start: Dim::constant(256),
            len: Dim::sym(Sym::T),
            x: BufferId(0),
            out: BufferId(1),
        };
        add(&format!("slice {n} 2048"), slice::slice(&spec).unwrap());
    }
    out
}

/// A Qwen3-style QKV tail: 16 query heads and 8 kv heads, qk-norm and rope, v copied.
fn qkv_tail(dt: DType, head_dim: u32, style: RopeStyle) -> TailSpec {
    let (q, kv) = (16 * head_dim, 8 * head_dim);
    let kind = |w: u32| PartKind::Heads {
        head_dim,
        norm: Some(HeadNorm { weight: BufferId(w), dtype: DType::Bf16, eps: 1e-6 }),
        rope: Some(Rope { style, theta: 1e6 }),
    };
    TailSpec {
        name: format!("qkv_tail_{}_{head_dim}", dt.name()),
        rows: bt(),
        tokens: Dim::sym(Sym::T),
        width: q + 2 * kv,
        dtype: dt,
        product: BufferId(0),
        start: Some(BufferId(1)),
        parts: vec![
            TailPart { lo: 0, width: q, out: BufferId(4), out_dtype: dt, kind: kind(2) },
            TailPart { lo: q, width: kv, out: BufferId(5), out_dtype: dt, kind: kind(3) },
            TailPart { lo: q + kv, width: kv, out: BufferId(6), out_dtype: dt, kind: PartKind::Columns(Vec::new()) },
        ],
    }
}

/// A Mamba2-style input projection tail: `[z | xBC | softplus(dt + bias)]`.
fn columns_tail(dt: DType) -> TailSpec {
    let bias = Vector { buf: BufferId(1), dtype: dt, broadcast: false };
    let part = |lo: u32, width: u32, out: u32, ops: Vec<ColumnOp>| TailPart {
        lo,
        width,
        out: BufferId(out),
        out_dtype: dt,
        kind: PartKind::Columns(ops),
    };
    TailSpec {
        name: format!("columns_tail_{}", dt.name()),
        rows: bt(),
        tokens: Dim::sym(Sym::T),
        width: 4096 + 4352 + 64,
        dtype: dt,
        product: BufferId(0),
        start: None,
        parts: vec![
            part(0, 4096, 2, Vec::new()),
            part(4096, 4352, 3, Vec::new()),
            part(8448, 64, 4, vec![ColumnOp::Add(bias), ColumnOp::Softplus]),
        ],
    }
}

#[test]
fn every_kernel_assembles_without_spills() {
    let have = ptxas::find().is_some();
    if !have {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!("SKIPPED the ptxas checks of the generated kernels: ptxas not found (scripts/install-ptxas.sh)");
    }
    let mut table = vec![format!("{:<34} {:>8} {:>8} {:>9}", "kernel", "sm_80", "sm_90", "smem (B)")];
    for (label, g) in kernels() {
        let mut regs = Vec::new();
        let mut smem = 0;
        for target in [Target::Sm80, Target::Sm90] {
            let text = write_string(&g.kernel, &Options { target }).unwrap_or_else(|e| panic!("{label}: {e}"));
            if !have {
                continue;
            }
            let arch = target.arch().unwrap_or_default();
            let r = ptxas::assemble(&text, arch)
                .unwrap_or_else(|e| panic!("{label} for {arch}:\n{e}\n--- PTX ---\n{text}"));
            assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{label} spills on {arch}: {r:?}");
            assert!(r.warnings.is_empty(), "{label} on {arch}: ptxas warnings {:?}", r.warnings);
            regs.push(r.registers);
            smem = r.shared_bytes;
        }
        if have {
            table.push(format!("{label:<34} {:>8} {:>8} {smem:>9}", regs[0], regs[1]));
        }
    }
    if have {
        println!("{}", table.join("\n"));
    }
}

#[test]
fn kernels_are_deterministic() {
    let a: Vec<String> = kernels().iter().map(|(_, g)| write_string(&g.kernel, &Options::default()).unwrap()).collect();
    let b: Vec<String> = kernels().iter().map(|(_, g)| write_string(&g.kernel, &Options::default()).unwrap()).collect();
    assert_eq!(a, b);
}

#[test]
fn norm_widths_assemble_without_spills() {
    // Every norm kind across the warp / block / re-read boundaries (register pressure peaks at four
    // kept vectors per thread).
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!("SKIPPED the ptxas checks of the norm widths: ptxas not found (scripts/install-ptxas.sh)");
        return;
    }
    for dt in [DType::Bf16, DType::F32] {
        for width in [64u32, 512, 1024, 2048, 4096, 6144, 8192, 12_288, 16_384, 20_480, 32_768] {
            let gens = [
                norm::rmsnorm(&bt(), width, dt, DType::F32, 1e-6).unwrap(),
                norm::add_rmsnorm(&bt(), width, dt, dt, 1e-6, true).unwrap(),
                norm::l2norm(&bt(), width, dt, 1e-6).unwrap(),
                norm::gated_rmsnorm(&bt(), width, dt, dt, 1e-5, width, false).unwrap(),
                norm::gated_rmsnorm(&bt(), width, dt, dt, 1e-5, width / 2, true).unwrap(),
            ];
            for g in gens {
                for target in [Target::Sm80, Target::Sm90] {
                    let text = write_string(&g.kernel, &Options { target }).unwrap();
                    let arch = target.arch().unwrap_or_default();
                    let r = ptxas::assemble(&text, arch).unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name));
                    let what = format!("{} {arch} ({})", g.kernel.name, g.kernel.doc[1]);
                    assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{what} spills: {r:?}");
                }
            }
        }
    }
}
