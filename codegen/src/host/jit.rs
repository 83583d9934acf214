//! jit: the entry functions of a launch plan → native code for this machine (Cranelift JIT), and the
//! safe handle that runs them.
//!
//! `HostSchedule::run` calls the native `prep` or `step` function with a trampoline as the launch
//! entry and a pointer to the caller's closure as `ctx`. The trampoline turns each record into a
//! `Launched`, calls the closure inside `catch_unwind`, and returns 1 when it fails and 2 when it
//! panics, keeping the error or the panic in the context; once the native function has returned,
//! `run` hands back the error or resumes the panic. Nothing unwinds through generated code.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{print_errors, verify_function};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module, default_libcall_names};
use flashc_compiler::schedule::KernelId;
use target_lexicon::{Architecture, PointerWidth};

use super::abi::{self, Dims, EntryFn, LaunchRecord, Launched};
use super::clif;
use super::plan::{LaunchPlan, Phase};
use super::{Error, RunError};

/// A compiled launch plan: the native `prep` and `step` functions and the code memory they live in.
pub struct HostSchedule {
    /// Owns the code; freed on drop.
    module: Option<JITModule>,
    prep: EntryFn,
    step: EntryFn,
    /// The number of base-pointer slots the functions read.
    slots: usize,
}

/// The ISA of this machine, with the settings the host schedule is compiled with.
pub fn host_isa() -> Result<OwnedTargetIsa, Error> {
    let mut flags = settings::builder();
    let setting = |e: settings::SetError| Error::Codegen(format!("a Cranelift setting: {e}"));
    flags.set("opt_level", "speed").map_err(setting)?;
    flags.set("is_pic", "false").map_err(setting)?;
    flags.set("use_colocated_libcalls", "false").map_err(setting)?;
    let builder = cranelift_native::builder().map_err(|e| Error::UnsupportedIsa(e.to_string()))?;
    let isa = builder.finish(settings::Flags::new(flags)).map_err(|e| Error::UnsupportedIsa(format!("{e}")))?;
    let triple = isa.triple();
    // The generated code uses 64-bit pointers and the checked-arithmetic instructions
    // (`sadd_overflow`, `smul_overflow`) that these back ends implement.
    let supported = matches!(triple.architecture, Architecture::X86_64 | Architecture::Aarch64(_))
        && triple.pointer_width().ok() == Some(PointerWidth::U64);
    if !supported {
        return Err(Error::UnsupportedIsa(format!("{triple} (the host schedule needs x86_64 or aarch64)")));
    }
    Ok(isa)
}

/// Compiles a launch plan for this machine.
pub fn compile(plan: &LaunchPlan) -> Result<HostSchedule, Error> {
    let isa = host_isa()?;
    let call_conv = isa.default_call_conv();
    let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
    let mut ids = Vec::new();
    for phase in Phase::ALL {
        let built = clif::build(plan, phase, module.isa().frontend_config());
        verify_function(&built.func, module.isa())
            .map_err(|e| Error::Verifier(print_errors::pretty_verifier_error(&built.func, None, e)))?;
        let name = format!("flashc_{}_{}", plan.name, phase.name());
        let id = module
            .declare_function(&name, Linkage::Local, &clif::entry_signature(call_conv))
            .map_err(|e| Error::Codegen(e.to_string()))?;
        let mut ctx = module.make_context();
        ctx.func = built.func;
        module.define_function(id, &mut ctx).map_err(|e| Error::Codegen(format!("{e:?}")))?;
        module.clear_context(&mut ctx);
        ids.push(id);
    }
    module.finalize_definitions().map_err(|e| Error::Codegen(e.to_string()))?;
    let entry = |i: usize| {
        let ptr = module.get_finalized_function(ids[i]);
        // SAFETY: the function was built with `clif::entry_signature` for this ISA's default
        // calling convention, which is `extern "C"` on every supported host.
        unsafe { std::mem::transmute::<*const u8, EntryFn>(ptr) }
    };
    let (prep, step) = (entry(0), entry(1));
    Ok(HostSchedule { module: Some(module), prep, step, slots: plan.slots.len() })
}

impl HostSchedule {
    /// The number of entries `bases` must hold.
    pub fn slot_count(&self) -> usize {
        self.slots
    }

    /// The native entry function of a phase, for callers that drive it through the C ABI
    /// themselves (see `abi.rs`). It stays valid while `self` lives.
    pub fn entry(&self, phase: Phase) -> EntryFn {
        match phase {
            Phase::Prep => self.prep,
            Phase::Step => self.step,
        }
    }

    /// Runs a phase: `launch` is called for each launched kernel, in order; its error stops the
    /// schedule. A panic in `launch` stops the schedule and is resumed here.
    pub fn run<E>(
        &self,
        phase: Phase,
        dims: &Dims,
        bases: &[u64],
        launch: &mut dyn FnMut(&Launched<'_>) -> Result<(), E>,
    ) -> Result<(), RunError<E>> {
        if bases.len() < self.slots {
            return Err(RunError::Bases { expected: self.slots, found: bases.len() });
        }
        let mut t = Trampoline { launch, kernel: KernelId(0), error: None, panic: None };
        let ctx = &mut t as *mut Trampoline<'_, E> as *mut c_void;
        // SAFETY: the entry function reads the three sizes of `dims`, at most `self.slots` entries
        // of `bases` (checked above), writes only its own stack frame, and calls `trampoline::<E>`
        // with `ctx`, which points to `t` for the whole call.
        let status = unsafe { (self.entry(phase))(dims, bases.as_ptr(), ctx, trampoline::<E>) };
        if let Some(p) = t.panic {
            resume_unwind(p);
        }
        if let Some(error) = t.error {
            return Err(RunError::Launch { kernel: t.kernel, error });
        }
        match status {
            abi::STATUS_OK => Ok(()),
            abi::STATUS_BAD_DIMS => Err(RunError::BadDims(*dims)),
            abi::STATUS_OVERFLOW => Err(RunError::Overflow),
            abi::STATUS_RANGE => Err(RunError::Range),
            other => Err(RunError::Status(other)),
        }
    }
}

// SAFETY: through a shared reference a `HostSchedule` only hands out its entry pointers and slot
// count, which never change, and the generated code keeps no state between calls (every call has
// its own stack frame). The JIT module, which is not `Sync` (its symbol table has interior
// mutability), is only touched by `compile` and `drop`, both with exclusive access.
unsafe impl Sync for HostSchedule {}

impl Drop for HostSchedule {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: `run` borrows `self`, so no call through it is in flight; a pointer taken with
            // `entry` may only be called while `self` lives (calling it is `unsafe`, and its doc
            // says so).
            unsafe { m.free_memory() };
        }
    }
}

impl std::fmt::Debug for HostSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSchedule").field("slots", &self.slots).finish_non_exhaustive()
    }
}

/// The closure behind `ctx`, and what became of its last call.
struct Trampoline<'f, E> {
    launch: &'f mut dyn FnMut(&Launched<'_>) -> Result<(), E>,
    /// The kernel of the last launch.
    kernel: KernelId,
    error: Option<E>,
    panic: Option<Box<dyn Any + Send>>,
}

/// The launch status for a closure that failed, or panicked.
const CLOSURE_FAILED: i32 = 1;
const CLOSURE_PANICKED: i32 = 2;

/// The launch entry `run` passes: calls the closure behind `ctx`.
unsafe extern "C" fn trampoline<E>(ctx: *mut c_void, record: *const LaunchRecord) -> i32 {
    // SAFETY: `run` passes a pointer to its `Trampoline<E>` as `ctx`, and nothing else refers
    // to it during the call.
    let t = unsafe { &mut *(ctx as *mut Trampoline<'_, E>) };
    // SAFETY: the entry function passes a valid record, valid for the duration of this call.
    let launched = unsafe { Launched::from_record(record) };
    t.kernel = launched.kernel;
    match catch_unwind(AssertUnwindSafe(|| (t.launch)(&launched))) {
        Ok(Ok(())) => abi::STATUS_OK,
        Ok(Err(e)) => {
            t.error = Some(e);
            CLOSURE_FAILED
        }
        Err(p) => {
            t.panic = Some(p);
            CLOSURE_PANICKED
        }
    }
}
