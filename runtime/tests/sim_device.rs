//! The `sim` device behind the `Device` interface: buffers in their gir dtypes at the program's layout,
//! and kernel groups run through codegen's dispatcher (a decode batch larger than one GEMV block's rows
//! included).

use std::sync::Arc;

use flashc_compiler::gir::{Bindings, DType, Mode};
use flashc_compiler::lower::LowerOptions;
use flashc_compiler::schedule::BufferKind;
use flashc_runtime::device::{Device, HostData};
use flashc_runtime::model::compile;
use flashc_runtime::sim::{Sim, f32_to_bf16};

const TINY: &str = "model tiny {
  vocab = 64
  hidden = 16
  op A = attention(heads = 2)
  op F = ffn(inner = 32)
  layers = [A, F]
}";

#[test]
fn buffers_are_stored_in_their_dtype_and_groups_run_through_the_dispatcher() {
    let spec = flashc_dsl::load(TINY).expect("valid").0;
    let program = compile(&spec, &LowerOptions::new(Mode::Decode)).expect("compiles");
    let at = Bindings { b: 2, t: 1, s: 4 };
    let mut mem = Sim.allocate(&program, &at).expect("allocates");

    // Weights: rounded to their dtype on the way in, widened exactly on the way out.
    let weights: Vec<_> =
        program.buffers.iter().filter(|b| b.kind == BufferKind::Weight && b.alias.is_none()).collect();
    assert!(!weights.is_empty());
    for (i, w) in weights.iter().enumerate() {
        let n = w.ty.numel().eval(&at) as usize;
        let data: Vec<f32> = (0..n).map(|j| ((i * 31 + j * 7) % 97) as f32 / 97.0 - 0.5).collect();
        Sim.share_weight(&mut mem, w.id, Arc::new(data.clone())).expect("shares");
        let back = Sim.download(&program, &mem, w.id).expect("downloads").into_f32().expect("float");
        let want: Vec<f32> = match w.ty.dtype {
            DType::Bf16 => data.iter().map(|x| f32::from_bits(u32::from(f32_to_bf16(*x)) << 16)).collect(),
            _ => data.clone(),
        };
        assert_eq!(back, want, "weight {}", w.name);
    }

    // Inputs: token ids are i32; a wrong length or type is refused.
    let tokens =
        program.buffers.iter().find(|b| b.kind == BufferKind::Input && b.ty.dtype == DType::I32).expect("tokens");
    Sim.upload(&mut mem, tokens.id, HostData::I32(vec![3, 60])).expect("uploads");
    assert_eq!(Sim.download(&program, &mem, tokens.id).expect("downloads"), HostData::I32(vec![3, 60]));
    assert!(Sim.upload(&mut mem, tokens.id, HostData::I32(vec![1])).is_err());
    assert!(Sim.upload(&mut mem, tokens.id, HostData::F32(vec![1.0, 2.0])).is_err());

    // States start zeroed.
    let state = program.buffers.iter().find(|b| b.kind == BufferKind::State && b.alias.is_none()).expect("a KV cache");
    let zeros = Sim.download(&program, &mem, state.id).expect("downloads").into_f32().expect("float");
    assert!(zeros.iter().all(|x| *x == 0.0));

    // Kernel groups run through codegen's dispatcher: the embedding gathers the tokens' rows.
    let embed = program.kernels.iter().find(|k| k.name == "embed").expect("an embedding");
    let table =
        embed.inputs.iter().find_map(|b| weights.iter().find(|w| w.id == *b)).expect("the embedding table is a weight");
    Sim.run(&program, embed, &mut mem).expect("the embedding runs");
    let hidden = 16;
    let table_data = Sim.download(&program, &mem, table.id).expect("downloads").into_f32().expect("float");
    let rows = Sim.download(&program, &mem, embed.outputs[0]).expect("downloads").into_f32().expect("float");
    assert_eq!(rows[..hidden], table_data[3 * hidden..4 * hidden]);
    assert_eq!(rows[hidden..], table_data[60 * hidden..61 * hidden]);
    assert!(mem.launches >= 1 && mem.stats.instructions > 0);

    // The decode GEMV computes 8 rows per block: a batch of 9 runs in two row chunks.
    let matmul = program
        .kernels
        .iter()
        .find(|k| k.name.contains("matmul") && flashc_codegen::kernels::dispatch::generate(&program, k).is_ok())
        .expect("a projection");
    let mut wide = Sim.allocate(&program, &Bindings { b: 9, t: 1, s: 4 }).expect("allocates");
    for w in &weights {
        let n = w.ty.numel().eval(&at) as usize;
        Sim.share_weight(&mut wide, w.id, Arc::new(vec![0.25; n])).expect("shares");
    }
    for b in &matmul.inputs {
        let buf = program.buffer(*b).expect("a buffer");
        if buf.kind != BufferKind::Weight {
            let n = buf.ty.numel().eval(&Bindings { b: 9, t: 1, s: 4 }) as usize;
            let data = if buf.ty.dtype == DType::I32 { HostData::I32(vec![1; n]) } else { HostData::F32(vec![0.5; n]) };
            wide.write(&program, *b, &data).expect("writes");
        }
    }
    Sim.run(&program, matmul, &mut wide).expect("a batch of 9 runs");
    let out = Sim.download(&program, &wide, matmul.outputs[0]).expect("downloads").into_f32().expect("float");
    assert!(out.iter().all(|x| x.is_finite()), "every row of the 9 is written");
    assert_eq!(Sim.name(), "sim");
}
