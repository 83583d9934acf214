//! flashc-dsl: the `.arch` language — parse (text → ast), resolve (ast → spec), diagnostics — and the
//! facts derived from a spec alone: the weight manifest and the statistics behind `flashc info`.
//!
//! This crate knows nothing of graphs, GPUs or Cranelift. Its output, `spec::ModelSpec`, is the only
//! thing later stages read from a model file.
//!
//! Invariants:
//! - only `parser.rs` names pest's `Rule`;
//! - no input, however malformed, makes any function here panic or loop forever: every failure is a
//!   `diag::Diagnostic` with a span;
//! - resolving the same text twice gives identical specs (no hash-order dependence).

pub mod ast;
pub mod diag;
pub mod fmt;
pub mod import_hf;
pub mod manifest;
pub mod parser;
pub mod resolve;
pub mod spec;
pub mod stats;

pub use diag::{Code, Diagnostic, Severity, Span};
pub use resolve::load;
pub use spec::ModelSpec;
