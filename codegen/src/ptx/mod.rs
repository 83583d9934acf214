//! ptx: kir → PTX text, one module per kernel.
//!
//! The entry point is the same as every back end's: [`write_string`] with [`Options`], failing with
//! [`Error`]. The module header carries the lowest `.version` and `.target` the kernel needs
//! (`Target::Auto`), or the target asked for when it can express every instruction:
//!
//! | tier | `.target` | base `.version` | raised by |
//! |---|---|---|---|
//! | sm_80 | `sm_80` | 7.0 | `cvt.f32.bf16` (7.1), `ld.global.nc.L1::no_allocate` (7.4) |
//! | sm_90 | `sm_90` | 7.8 | bf16 `ex2`/`tanh`/`setp`/`atom.add`, `cvt` between bf16 and other non-f32 types |
//! | sm_90a | `sm_90a` | 8.0 | (wgmma, setmaxnreg: not in kir yet) |
//!
//! Layout of the text: header, dynamic shared memory (`.extern .shared .align 16 .b8 dsmem[];`), the
//! kernel's doc lines as comments, `.visible .entry name(.param ...)`, `.maxntid` and
//! `.minnctapersm 1` when the block size is fixed, then the body: register declarations grouped by type (`.reg .f32 %f<12>;`, prefixes in
//! [`names::reg_prefix`]), static `.shared` arrays, and the statements. Structured control flow
//! becomes labels and branches (`bra.uni` where the kir statement is uniform); `For` is a rotated loop
//! (one test before the first iteration, one at the bottom of each).
//!
//! Every name goes through one namer ([`names`]): kernel, parameter and shared-array names are
//! sanitised, kept clear of PTX words and made unique. Output is deterministic: registers are numbered
//! in kir order per type, labels by a counter in program order.
//!
//! Typing follows PTX: a register is accepted where the instruction's type agrees with it (the same
//! type; a bit type and any type of its size; two integer types of one size). Immediates are printed
//! in the instruction's type (`0f3F800000` for f32, `0d...` for f64, integers in decimal) and an
//! `Operand::Imm` read as a float is its bit pattern; where PTX wants a register (16-bit float
//! operands, shared-array addresses in arithmetic, absolute addresses) the value is first moved into
//! a scratch register.

pub mod names;
pub mod ptxas;

mod emit;

use std::fmt;

use crate::kir::Kernel;

/// The GPU generation the PTX is written for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The lowest tier that expresses every instruction of the kernel.
    #[default]
    Auto,
    /// Ampere (A100) and everything after it.
    Sm80,
    /// Hopper (H100, H200) and everything after it.
    Sm90,
    /// Hopper only: the arch-specific features (wgmma, setmaxnreg); not forward compatible.
    Sm90a,
}

impl Target {
    /// The `.target` and `ptxas -arch` spelling (`None` for `Auto`).
    pub fn arch(self) -> Option<&'static str> {
        match self {
            Target::Auto => None,
            Target::Sm80 => Some("sm_80"),
            Target::Sm90 => Some("sm_90"),
            Target::Sm90a => Some("sm_90a"),
        }
    }

    /// The lowest PTX ISA version that knows the target.
    pub fn min_version(self) -> Version {
        match self {
            Target::Auto | Target::Sm80 => Version(7, 0),
            Target::Sm90 => Version(7, 8),
            Target::Sm90a => Version(8, 0),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.arch().unwrap_or("auto"))
    }
}

/// A PTX ISA version (`.version major.minor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u8, pub u8);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// How to write the PTX.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub target: Target,
}

/// Why a kernel could not be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// An instruction needs a newer target than the one asked for.
    Unsupported { kernel: String, at: String, needs: Target, target: Target },
    /// The kernel breaks a rule PTX depends on (a register of an incompatible type, a `While`
    /// condition that is not a predicate, a vector of 3, ...). A bug in the kir generator.
    Malformed { kernel: String, at: String, reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unsupported { kernel, at, needs, target } => {
                write!(f, "kernel `{kernel}`: `{at}` needs {needs} or later, but the target is {target}")
            }
            Error::Malformed { kernel, at, reason } => write!(f, "kernel `{kernel}`: `{at}`: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// Writes `kernel` as a PTX module (header, one `.entry`).
pub fn write_string(kernel: &Kernel, options: &Options) -> Result<String, Error> {
    emit::module(kernel, options)
}
