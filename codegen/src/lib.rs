//! flashc-codegen: the back ends — **kernels** (each kernel group → kir, a typed SIMT kernel IR),
//! **ptx** (kir → PTX text, sm_80 tier with mma.sync/ldmatrix/cp.async, sm_90a tier later) and
//! **host** (a program's launch plan → CLIF → native code through Cranelift).
//!
//! Invariants:
//! - never links the CUDA driver: it produces text and bytes only, so every codegen test runs on a
//!   machine without a GPU (PTX is checked with `ptxas` and executed on the `sim` device);
//! - only `host/` imports Cranelift;
//! - every back end exposes the same small entry point (options, error, `write_string`);
//! - output is deterministic: the same program gives byte-identical kir, PTX and CLIF.

pub mod kernels;
pub mod kir;
pub mod ptx;
