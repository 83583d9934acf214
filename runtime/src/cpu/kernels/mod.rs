//! kernels: one module per family of ops, plus the error type and the validation helpers they share.

use std::fmt;

mod attention;
mod conv;
mod data;
mod delta;
mod elementwise;
mod loss;
mod matmul;
mod norm;
mod rope;
mod ssd;

pub use attention::{AttentionDims, attention_decode, attention_prefill, kv_write};
pub use conv::{ConvDims, conv1d, conv1d_update};
pub use data::{embed, meta_prefix};
pub use delta::{DeltaDims, delta_recurrent, delta_scan, delta_step};
pub use elementwise::{
    add, add_i32, broadcast_shape, clamp, exp, gelu, mul, neg, relu2, scale, sigmoid, silu, softplus, swiglu,
};
pub use loss::cross_entropy;
pub use matmul::{MatmulDims, matmul};
pub use norm::{gated_rmsnorm, l2norm, rmsnorm, row_norm_logits};
pub use rope::{RopeDims, RopeStyle, rope, rope_inv_freq};
pub use ssd::{SsdDims, ssd_recurrent, ssd_scan, ssd_step};

/// Why a kernel refused its operands. Nothing was written when a kernel returns one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length does not match the sizes the kernel was given.
    Size { op: &'static str, what: &'static str, expected: usize, found: usize },
    /// Sizes or attributes that do not fit together (a zero chunk, kv heads that do not divide the query
    /// heads, shapes that do not broadcast, a size product that overflows, ...).
    Shape { op: &'static str, msg: String },
    /// An integer operand out of range (a token id ≥ vocab, a negative `start`, `lens[b] > T`, a cache too
    /// small for the positions an attention query must see, ...).
    Index { op: &'static str, msg: String },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Size { op, what, expected, found } => {
                write!(f, "{op}: {what} has {found} element(s), expected {expected}")
            }
            KernelError::Shape { op, msg } => write!(f, "{op}: {msg}"),
            KernelError::Index { op, msg } => write!(f, "{op}: {msg}"),
        }
    }
}

impl std::error::Error for KernelError {}

/// Result of a kernel.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Shape { op, msg: msg.into() }
}

pub(crate) fn index_err(op: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Index { op, msg: msg.into() }
}

/// The product of `dims`, or an error when the product of its non-zero entries overflows `usize` (so that
/// every partial product of the dims fits once this returns, even when one of them is zero).
pub(crate) fn numel(op: &'static str, dims: &[usize]) -> Result<usize> {
    let nonzero = dims
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| shape_err(op, format!("size {dims:?} overflows")))?;
    Ok(if dims.contains(&0) { 0 } else { nonzero })
}

/// Checks that a buffer holds exactly `expected` elements.
pub(crate) fn check_len(op: &'static str, what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found != expected {
        return Err(KernelError::Size { op, what, expected, found });
    }
    Ok(())
}

/// Checks a length against the product of `dims` (which must not overflow).
pub(crate) fn check_dims(op: &'static str, what: &'static str, found: usize, dims: &[usize]) -> Result<()> {
    check_len(op, what, found, numel(op, dims)?)
}

/// Validates an `i32[B]` index operand whose entries must lie in `0 ..= max` and returns them as `usize`.
pub(crate) fn index_vec(
    op: &'static str,
    what: &'static str,
    v: &[i32],
    batch: usize,
    max: usize,
) -> Result<Vec<usize>> {
    check_len(op, what, v.len(), batch)?;
    v.iter()
        .enumerate()
        .map(|(b, &x)| match usize::try_from(x) {
            Ok(u) if u <= max => Ok(u),
            _ => Err(index_err(op, format!("{what}[{b}] = {x} is outside 0..={max}"))),
        })
        .collect()
}

/// `1 / (1 + e⁻ˣ)`, evaluated without overflow for either sign of `x`.
#[inline]
pub(crate) fn sigmoid_f32(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `x · sigmoid(x)`.
#[inline]
pub(crate) fn silu_f32(x: f32) -> f32 {
    x * sigmoid_f32(x)
}
