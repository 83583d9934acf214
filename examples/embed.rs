//! Embedding flashc in a Rust program: load a model, then serve prompts with streaming output.
//!
//! ```sh
//! cargo run --release --example embed -- examples/tiny-hybrid.arch            # random weights
//! cargo run --release --example embed -- examples/tiny-hybrid.arch tiny.safetensors "Hello"
//! ```

use std::io::Write;

use flashc_runtime::cpu::Cpu;
use flashc_runtime::model::Model;
use flashc_runtime::sample::{Sampler, SamplingParams};
use flashc_runtime::session::Session;
use flashc_runtime::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arch = args.get(1).map(String::as_str).unwrap_or("examples/tiny-hybrid.arch");
    let source = std::fs::read_to_string(arch)?;
    let (spec, _warnings) = flashc_dsl::load(&source).map_err(|d| flashc_dsl::diag::render(arch, &source, &d))?;
    let weights = match args.get(2) {
        Some(path) => flashc_runtime::weights::load(&spec, std::path::Path::new(path))?,
        None => flashc_runtime::weights::init(&spec, 0),
    };
    let model = Model::new(&Cpu, spec, weights)?;
    let tokenizer = Tokenizer::bytes();
    let prompt = args.get(3).map(String::as_str).unwrap_or("Once upon a time");

    let mut session = Session::new(&Cpu, &model, 1)?;
    let mut sampler = Sampler::new(SamplingParams { temperature: 0.8, top_p: Some(0.95), ..SamplingParams::greedy() })?;
    let mut stream = tokenizer.stream_decoder();
    let logits = session.prefill(&[tokenizer.encode(prompt)?])?.remove(0);
    let vocab = model.spec.vocab as usize;
    let mut next = sampler.sample(&logits[logits.len() - vocab..], &session.history()[0]);
    print!("{prompt}");
    for _ in 0..48 {
        print!("{}", stream.step(next)?);
        std::io::stdout().flush()?;
        let logits = session.decode(&[next])?.remove(0);
        next = sampler.sample(&logits, &session.history()[0]);
    }
    println!("{}", stream.finish()?);
    Ok(())
}
