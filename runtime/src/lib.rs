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

pub mod cpu;
pub mod device;
pub mod model;
pub mod sample;
pub mod session;
pub mod tokenizer;
pub mod weights;
