//! flashc-compiler: the middle of the pipeline — **lower** (spec + mode → gir), **passes**
//! (gir → gir: verify, dce, cse, canonicalize, fuse-*), **autodiff** (forward + loss → training step)
//! and **schedule** (gir → program: kernel groups, buffer plan, launch order).
//!
//! Job: turn a `flashc_dsl::ModelSpec` into a device-neutral `program` for each mode (`prefill`,
//! `decode`, `train`) that codegen and the runtime consume.
//!
//! Invariants:
//! - knows nothing of PTX, Cranelift or the CUDA driver; its output is device-neutral;
//! - the graph IR is a closed `enum Op` over petgraph, with typed ids whose `Display` matches the dump;
//!   spans and analysis results live in side tables;
//! - the verifier runs after every pass in debug builds and tests; a verifier failure is an internal
//!   error naming the pass, never a user diagnostic;
//! - state (KV cache, conv, SSM and delta states) is explicit graph input and output, and in-place
//!   updates are ordered so no pass can reorder them;
//! - output is deterministic: the same spec gives byte-identical dumps and programs.
//!
//! The graph IR, lowering and passes arrive with the graph-IR work; the crate exists now so the
//! workspace shows the whole pipeline.

pub mod gir;
pub mod lower;
pub mod passes;
pub mod schedule;
pub mod verify;
