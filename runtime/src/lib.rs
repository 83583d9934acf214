//! flashc-runtime: **run** — load a compiled model and its safetensors weights and execute it on a
//! device (`cpu`, the exact f32 oracle; `sim`, the kir interpreter; `cuda`, PTX through the driver)
//! for inference (prefill, decode, sampling) and training.
//!
//! Invariants:
//! - the only crate that talks to a device driver (cudarc with dynamic loading, so it builds and its
//!   tests run on machines without CUDA);
//! - all devices are driven by the same program and the same compiled host schedule;
//! - bad input (corrupt or mismatched safetensors, a missing GPU) is a clear error, never a panic, and
//!   nothing is written half-way.

//! # Embedding
//!
//! ```
//! use flashc_runtime::cpu::Cpu;
//! use flashc_runtime::model::Model;
//! use flashc_runtime::sample::{Sampler, SamplingParams};
//! use flashc_runtime::session::Session;
//!
//! // A model: an `.arch` text (or `flashc_dsl::import_hf`), and weights (`weights::load` reads a
//! // checkpoint; `weights::init` draws random ones).
//! let (spec, _warnings) = flashc_dsl::load(
//!     "model demo { vocab = 256 hidden = 32 op A = attention(heads = 4) op F = ffn(inner = 64) layers = [A, F] * 2 }",
//! )
//! .expect("a valid model");
//! let weights = flashc_runtime::weights::init(&spec, 0);
//! let model = Model::new(&Cpu, spec, weights).expect("compiles");
//!
//! // One sequence: prefill the prompt, then decode greedily.
//! let mut session = Session::new(&Cpu, &model, 1).expect("session");
//! let prompt: Vec<u32> = b"Hi".iter().map(|b| u32::from(*b)).collect();
//! let logits = session.prefill(&[prompt]).expect("prefill").remove(0);
//! let mut sampler = Sampler::new(SamplingParams::greedy()).expect("valid");
//! let mut next = sampler.sample(&logits[logits.len() - 256..], &session.history()[0]);
//! for _ in 0..4 {
//!     let logits = session.decode(&[next]).expect("decode").remove(0);
//!     next = sampler.sample(&logits, &session.history()[0]);
//! }
//! assert_eq!(session.history()[0].len(), 2 + 4);
//! ```

pub mod artifact;
pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod host;
pub mod model;
pub mod sample;
pub mod session;
pub mod sim;
pub mod tokenizer;
pub mod weights;
