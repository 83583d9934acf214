//! kernels: kernel groups of a program → kir kernels, with the rule that launches them.
//!
//! Each generator lives in its own file, documents its tiling and its assumptions, and returns a
//! `Generated`: the kir kernel and its `LaunchRule` (grid, block, shared memory and the value of each
//! kernel parameter as a function of the program's buffers and the runtime sizes B, T, S). Sizes that
//! vary at run time are kernel parameters, so one kernel serves every batch and length.

pub mod attention;
pub mod conv;
pub mod delta;
pub mod dispatch;
pub mod elementwise;
pub mod embed;
pub mod gemm;
pub mod gemv;
pub mod heads;
pub mod layout;
pub mod logits;
pub mod loss;
pub mod norm;
pub mod sampling;
pub mod slice;
pub mod ssd;

use flashc_compiler::gir::{Bindings, Dim};
use flashc_compiler::schedule::BufferId;
use serde::{Deserialize, Serialize};

use crate::kir::Kernel;

/// What one kernel parameter receives at launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ArgRule {
    /// The device address of a program buffer (its root's storage plus the view's offset).
    Buffer(BufferId),
    /// The device address of a program buffer plus a byte offset evaluated at launch: a strided
    /// column view inside a buffer (one part of a fused projection row), which has no buffer of its own.
    View(BufferId, Dim),
    /// A size evaluated at launch (u32).
    Size(Dim),
    /// A constant.
    U32(u32),
    F32(f32),
}

/// How to launch a generated kernel: grid (in blocks, evaluated at launch), block size, dynamic
/// shared memory, and the parameters in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaunchRule {
    pub grid: [Dim; 3],
    pub block: [u32; 3],
    pub dynamic_shared: u32,
    pub args: Vec<ArgRule>,
}

impl LaunchRule {
    /// The grid for concrete sizes (a grid dimension of 0 means there is no work: skip the launch).
    pub fn grid_at(&self, at: &Bindings) -> [u32; 3] {
        self.grid.clone().map(|d| u32::try_from(d.eval(at).max(0)).unwrap_or(u32::MAX))
    }
}

/// A generated kernel and its launch rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generated {
    pub kernel: Kernel,
    pub launch: LaunchRule,
}

/// Why a kernel group could not be generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodegenError {
    /// No generator handles this kind of group yet.
    Unsupported(String),
    /// The group's shapes break a generator's assumptions.
    Shape(String),
}

impl std::fmt::Display for CodegenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodegenError::Unsupported(s) => write!(f, "no kernel generator for {s}"),
            CodegenError::Shape(s) => write!(f, "cannot generate a kernel: {s}"),
        }
    }
}

impl std::error::Error for CodegenError {}
