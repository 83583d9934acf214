//! host: a program's launch plan → **clif** → native code through Cranelift. The compiled host
//! schedule drives every device: it evaluates the sizes of each kernel for the runtime B, T, S,
//! skips kernels without work, and calls the device's launch entry for each kernel in order.
//!
//! - `plan.rs`: the launch plan (grid, block, shared memory and argument expressions per kernel,
//!   the base-pointer slots) and its reference interpreter;
//! - `abi.rs`: the calling convention of the generated functions, field by field;
//! - `clif.rs`: plan → CLIF, one function per phase (`prep`, `step`);
//! - `jit.rs`: CLIF → native code (cranelift-jit for the host ISA) and the safe `HostSchedule`.
//!
//! This is the only module of the project that imports Cranelift.
//!
//! The entry points follow the other back ends: `Options`, `Error`, `write_string` (the CLIF text,
//! for `flashc compile --emit clif`), plus `compile` for the native schedule.

pub mod abi;
mod clif;
mod jit;
pub mod plan;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_codegen::settings;
use cranelift_codegen::{print_errors, verify_function};
use flashc_compiler::schedule::{KernelId, Program};

pub use abi::{Dims, Launched, OwnedLaunch};
pub use jit::{HostSchedule, compile, host_isa};
pub use plan::{GroupRules, LaunchPlan, Phase, interpret, plan};

/// Which calling convention the CLIF text is written for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// `system_v`, on every machine: the text is the same everywhere (snapshots, `--emit clif`).
    #[default]
    Portable,
    /// This machine's default calling convention: exactly the functions `compile` builds.
    Host,
}

/// Options of the host back end.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    pub target: Target,
    /// The generated kernels' launch rules and scratch, by kernel id; the other kernels get the
    /// default launch (`plan::default_rule`).
    pub rules: BTreeMap<KernelId, GroupRules>,
}

/// Why a host schedule could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The program or a launch rule is inconsistent (an unknown buffer or kernel, an unplaced
    /// arena buffer, a zero block dimension): an internal error of an earlier stage.
    Plan(String),
    /// The generated CLIF failed Cranelift's verifier (a bug here); the text shows the function.
    Verifier(String),
    /// Cranelift could not compile or link the function.
    Codegen(String),
    /// This machine's ISA is not supported (the host schedule needs x86_64 or aarch64).
    UnsupportedIsa(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Plan(s) => write!(f, "cannot plan the launches: {s}"),
            Error::Verifier(s) => write!(f, "internal error: the host schedule's CLIF is invalid:\n{s}"),
            Error::Codegen(s) => write!(f, "cannot compile the host schedule: {s}"),
            Error::UnsupportedIsa(s) => write!(f, "the host schedule cannot run on this machine: {s}"),
        }
    }
}

impl std::error::Error for Error {}

/// Why running a host schedule (native or interpreted) stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RunError<E> {
    /// The launch callback failed for `kernel`; no later kernel was launched.
    Launch { kernel: KernelId, error: E },
    /// B, T or S is negative; nothing was launched.
    BadDims(Dims),
    /// A size overflowed `i64` (`abi::STATUS_OVERFLOW`).
    Overflow,
    /// A grid dimension or a size argument does not fit in a `u32` (`abi::STATUS_RANGE`).
    Range,
    /// The base-pointer table is shorter than the plan's slots; nothing was launched.
    Bases { expected: usize, found: usize },
    /// The native function returned a status the ABI does not define (a bug).
    Status(i32),
}

impl<E: fmt::Display> fmt::Display for RunError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Launch { kernel, error } => write!(f, "launching {kernel} failed: {error}"),
            RunError::BadDims(d) => write!(f, "negative size: B={}, T={}, S={}", d.b, d.t, d.s),
            RunError::Overflow => f.write_str("a kernel size overflows 64 bits"),
            RunError::Range => f.write_str("a grid dimension or kernel size does not fit in 32 bits"),
            RunError::Bases { expected, found } => {
                write!(f, "the base-pointer table has {found} entries, the schedule needs {expected}")
            }
            RunError::Status(s) => write!(f, "internal error: the host schedule returned status {s}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for RunError<E> {}

/// The CLIF text of a program's host schedule: a comment header (the base-pointer slots and the
/// block where each kernel starts), then the `prep` and `step` functions. Deterministic.
pub fn write_string(program: &Program, options: &Options) -> Result<String, Error> {
    let plan = plan::plan(program, &options.rules)?;
    write_plan(&plan, options.target)
}

/// The CLIF text of a launch plan (see `write_string`).
pub fn write_plan(plan: &LaunchPlan, target: Target) -> Result<String, Error> {
    let config = match target {
        Target::Portable => TargetFrontendConfig {
            default_call_conv: CallConv::SystemV,
            pointer_width: target_lexicon::PointerWidth::U64,
            page_size_align_log2: 12,
        },
        Target::Host => host_isa()?.frontend_config(),
    };
    let flags = settings::Flags::new(settings::builder());
    let mut built = Vec::new();
    for phase in Phase::ALL {
        let b = clif::build(plan, phase, config);
        verify_function(&b.func, &flags)
            .map_err(|e| Error::Verifier(print_errors::pretty_verifier_error(&b.func, None, e)))?;
        built.push((phase, b));
    }
    render(plan, &built).map_err(|e| Error::Codegen(format!("cannot write the CLIF text: {e}")))
}

fn render(plan: &LaunchPlan, built: &[(Phase, clif::Built)]) -> Result<String, fmt::Error> {
    let mut w = String::new();
    writeln!(
        w,
        "; host schedule @{} mode={} (calling convention: codegen/src/host/abi.rs)",
        plan.name,
        plan.mode.name()
    )?;
    writeln!(w, "; bases:")?;
    for (i, s) in plan.slots.iter().enumerate() {
        match (s.buffer, &s.bytes) {
            (Some(b), _) => writeln!(w, ";   [{i}] {} {} ({b})", s.class.name(), s.name)?,
            (None, Some(bytes)) => writeln!(w, ";   [{i}] {} {} ({bytes} bytes)", s.class.name(), s.name)?,
            (None, None) => writeln!(w, ";   [{i}] {}", s.name)?,
        }
    }
    for (phase, b) in built {
        let seq = plan.sequence(*phase);
        writeln!(w, ";")?;
        writeln!(w, "; {}: {} launches", phase.name(), seq.launches.len())?;
        for (l, (_, block)) in seq.launches.iter().zip(&b.kernels) {
            let grid: Vec<String> = l.grid.iter().map(|p| p.to_string()).collect();
            let part = if l.part > 0 { format!(" (kernel {})", l.part) } else { String::new() };
            writeln!(w, ";   {} {}{part} at {block}: grid [{}]", l.kernel, l.name, grid.join(", "))?;
        }
        write!(w, "{}", b.func.display())?;
    }
    Ok(w)
}
