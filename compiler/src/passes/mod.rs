//! passes: gir → gir transformations and the pipeline that runs them.
//!
//! Each pass lives in its own file named like its CLI name (`fuse-elementwise` ↔
//! `fuse_elementwise.rs` ↔ `Pass::FuseElementwise`), starts with `//! name: summary`, and states its
//! preconditions and postconditions. A pass returns whether it changed the graph. The pass manager
//! verifies the graph after every pass when `verify` is on (debug builds and tests); a failure is an
//! `InternalError` naming the pass, with the IR before and after.

pub mod canonicalize;
pub mod cse;
pub mod dce;
pub mod fuse;
pub mod fuse_conv;
pub mod fuse_decode_mixer;
pub mod fuse_elementwise;
pub mod fuse_epilogue;
pub mod fuse_matmul;
pub mod fuse_norm;
pub mod fuse_rope;

use std::fmt;

use crate::gir::{Graph, Mode};
use crate::verify::verify;

/// Every pass, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    Dce,
    Cse,
    Canonicalize,
    FuseMatmul,
    FuseConv,
    FuseRope,
    FuseNorm,
    FuseEpilogue,
    FuseDecodeMixer,
    FuseElementwise,
}

impl Pass {
    pub const ALL: [Pass; 10] = [
        Pass::Dce,
        Pass::Cse,
        Pass::Canonicalize,
        Pass::FuseMatmul,
        Pass::FuseConv,
        Pass::FuseRope,
        Pass::FuseNorm,
        Pass::FuseEpilogue,
        Pass::FuseDecodeMixer,
        Pass::FuseElementwise,
    ];

    /// The name used by `--print-after`, `--passes` and in file names (with `_`).
    pub fn name(self) -> &'static str {
        match self {
            Pass::Dce => "dce",
            Pass::Cse => "cse",
            Pass::Canonicalize => "canonicalize",
            Pass::FuseMatmul => "fuse-matmul",
            Pass::FuseConv => "fuse-conv",
            Pass::FuseRope => "fuse-rope",
            Pass::FuseNorm => "fuse-norm",
            Pass::FuseEpilogue => "fuse-epilogue",
            Pass::FuseDecodeMixer => "fuse-decode-mixer",
            Pass::FuseElementwise => "fuse-elementwise",
        }
    }

    pub fn parse(name: &str) -> Option<Pass> {
        Pass::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Runs the pass once; `Ok(true)` if the graph changed.
    pub fn run(self, g: &mut Graph) -> Result<bool, String> {
        match self {
            Pass::Dce => dce::run(g),
            Pass::Cse => cse::run(g),
            Pass::Canonicalize => canonicalize::run(g),
            Pass::FuseMatmul => fuse_matmul::run(g),
            Pass::FuseConv => fuse_conv::run(g),
            Pass::FuseRope => fuse_rope::run(g),
            Pass::FuseNorm => fuse_norm::run(g),
            Pass::FuseEpilogue => fuse_epilogue::run(g),
            Pass::FuseDecodeMixer => fuse_decode_mixer::run(g),
            Pass::FuseElementwise => fuse_elementwise::run(g),
        }
    }
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The standard pipeline for a mode: clean up, then fuse from the most specific patterns (whole
/// mixer steps, rope, norms into GEMMs) to the most general (elementwise chains), then clean up.
pub fn pipeline(mode: Mode) -> Vec<Pass> {
    let mut p = vec![Pass::Canonicalize, Pass::Cse, Pass::Dce, Pass::FuseMatmul, Pass::FuseConv];
    if mode == Mode::Decode {
        p.push(Pass::FuseDecodeMixer);
    }
    p.extend([Pass::FuseRope, Pass::FuseNorm, Pass::FuseEpilogue, Pass::FuseElementwise, Pass::Dce]);
    p
}

/// A verifier failure after a pass: a compiler bug, reported with both versions of the IR.
#[derive(Debug, Clone)]
pub struct InternalError {
    pub pass: String,
    pub errors: Vec<String>,
    pub before: String,
    pub after: String,
}

impl fmt::Display for InternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "internal compiler error: the graph is invalid after pass `{}`:", self.pass)?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        writeln!(f, "--- IR before `{}` ---\n{}", self.pass, self.before)?;
        write!(f, "--- IR after `{}` ---\n{}", self.pass, self.after)
    }
}

impl std::error::Error for InternalError {}

/// Whether the pass manager verifies after every pass by default (debug builds and tests).
pub const VERIFY_BY_DEFAULT: bool = cfg!(debug_assertions);

/// Runs `passes` in order, verifying after each when `verify` is set, and calling `observe` after
/// each pass (for `--print-after`).
pub fn run_passes(
    g: &mut Graph,
    passes: &[Pass],
    verify_each: bool,
    observe: &mut dyn FnMut(Pass, &Graph),
) -> Result<(), InternalError> {
    for &pass in passes {
        let before = if verify_each { Some(g.to_string()) } else { None };
        let result = pass.run(g);
        let failure = match result {
            Err(e) => Some(vec![e]),
            Ok(_) if verify_each => verify(g).err(),
            Ok(_) => None,
        };
        if let Some(errors) = failure {
            return Err(InternalError {
                pass: pass.name().to_string(),
                errors,
                before: before.unwrap_or_default(),
                after: g.to_string(),
            });
        }
        observe(pass, g);
    }
    Ok(())
}
