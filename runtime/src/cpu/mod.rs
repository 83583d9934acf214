//! cpu: the `cpu` device's exact f32 reference kernels, the project's numerical oracle.
//!
//! One plain function per gir op (`flashc_compiler::gir::Op`), over row-major f32 slices with explicit
//! sizes. The doc comment of each `Op` variant is the semantics implemented here; each kernel repeats
//! the parts that matter (operand order, shapes, in-place updates) in its own documentation.
//!
//! Conventions shared by every kernel:
//! - operands come in the op's operand order, then the op's attributes, then the outputs;
//! - an operand the op updates in place (KV caches, conv, SSM and delta states) is taken as `&mut` and
//!   holds the new value on return; every other result is a `&mut [f32]` the caller allocates;
//! - integer operands (`start`, `lens`, token ids, targets) are `&[i32]`;
//! - sizes are validated before anything is written: a length that does not match the sizes, an index
//!   out of range (a token id ≥ vocab, a negative `start`, `lens[b] > T`) or an inconsistent attribute
//!   returns a [`KernelError`] and leaves every output untouched; no kernel panics on bad input;
//! - arithmetic is f32; a few long reductions say where they differ (documented per kernel);
//! - work is split across batch × heads or rows with rayon where that is natural.
//!
//! Besides the op kernels, [`ssd_recurrent`] and [`delta_recurrent`] are the naive token-by-token
//! recurrences, the independent references for the chunked [`ssd_scan`] and [`delta_scan`].
//!
//! | ops | kernels |
//! |---|---|
//! | data movement | [`embed`], [`meta_prefix`] |
//! | linear algebra | [`matmul`] ([`MatmulDims`]) |
//! | elementwise | [`add`], [`add_i32`], [`mul`] ([`broadcast_shape`]), [`scale`], [`silu`], [`softplus`], [`exp`], [`sigmoid`], [`neg`], [`relu2`], [`gelu`], [`swiglu`], [`clamp`] |
//! | normalisation | [`rmsnorm`], [`l2norm`], [`gated_rmsnorm`], [`row_norm_logits`] |
//! | positions | [`rope`] ([`RopeDims`], [`RopeStyle`], [`rope_inv_freq`]) |
//! | short convolution | [`conv1d`], [`conv1d_update`] ([`ConvDims`]) |
//! | attention | [`kv_write`], [`attention_prefill`], [`attention_decode`] ([`AttentionDims`]) |
//! | Mamba2 (SSD) | [`ssd_scan`], [`ssd_step`], [`ssd_recurrent`] ([`SsdDims`]) |
//! | delta rule | [`delta_scan`], [`delta_step`], [`delta_recurrent`] ([`DeltaDims`]) |
//! | loss | [`cross_entropy`] |

pub mod exec;
pub mod kernels;

pub use exec::{Cpu, CpuMemory, CpuRounded};

pub use kernels::*;

#[cfg(test)]
pub(crate) mod testutil;
