//! host: a program run by its compiled host schedule (codegen's Cranelift back end) on any device.
//!
//! [`Scheduled::new`] asks the device which kernels it launches for each group (`Device::kernels`:
//! the generated kernels on `sim` and `cuda`, the group as a whole on `cpu`), plans the launches
//! and compiles them to native code. [`Scheduled::run`] fills the base-pointer table from the
//! device's memory (`Device::bases`) and calls the native prep or step function, which evaluates
//! every grid and argument for the memory's sizes, skips kernels without work and calls
//! `Device::launch` for each launch in order. The first failing launch stops the schedule, and its
//! error is returned as is.
//!
//! A decode step on a device that records (`cuda`: CUDA graphs) is recorded once, from the second
//! step on a memory (the first loads the modules), and replayed while the base pointers and sizes
//! stay the same; the kernels read the step's inputs (tokens, positions) from device memory, so a
//! replay computes the new step.

use flashc_codegen::host::{self, Dims, HostSchedule, LaunchPlan, Phase, RunError};
use flashc_compiler::gir::{Bindings, Mode};
use flashc_compiler::schedule::Program;

use std::sync::Arc;

use flashc_codegen::host::GroupRules;

use crate::device::{Device, GroupKernels, RuntimeError};

/// A program's launch plan for one device and its native schedule.
pub struct Scheduled {
    pub plan: LaunchPlan,
    native: HostSchedule,
    /// The device's generated kernels per group (generated once here, handed to each launch).
    kernels: GroupKernels,
}

impl std::fmt::Debug for Scheduled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduled")
            .field("prep", &self.plan.prep.launches.len())
            .field("step", &self.plan.step.launches.len())
            .field("slots", &self.plan.slots.len())
            .finish()
    }
}

impl Scheduled {
    /// Plans and compiles `program`'s launches for `device`.
    pub fn new<D: Device>(device: &D, program: &Program) -> Result<Scheduled, RuntimeError> {
        let kernels = device.kernels(program)?;
        let rules = kernels.iter().map(|(k, d)| (*k, GroupRules::from(d.as_ref()))).collect();
        let plan = host::plan(program, &rules).map_err(|e| RuntimeError::Compile(e.to_string()))?;
        let native = host::compile(&plan).map_err(|e| RuntimeError::Compile(e.to_string()))?;
        Ok(Scheduled { plan, native, kernels })
    }

    /// Runs one phase on `mem` (allocated for `program` at sizes `at`); returns the launches made.
    pub fn run<D: Device>(
        &self,
        device: &D,
        program: &Program,
        mem: &mut D::Memory,
        at: &Bindings,
        phase: Phase,
    ) -> Result<usize, RuntimeError> {
        let bases = device.bases(program, &self.plan, mem)?;
        let step = phase == Phase::Step && program.mode == Mode::Decode;
        if step && let Some(n) = device.replay(mem, &bases, at)? {
            return Ok(n);
        }
        let record = step && device.wants_recording(mem);
        if record {
            device.begin_recording(mem)?;
        }
        let mut launches = 0;
        let dims = Dims::new(at.b, at.t, at.s);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.native.run(phase, &dims, &bases, &mut |l| {
                launches += 1;
                device.launch(program, mem, l, self.kernels.get(&l.kernel).map(Arc::as_ref))
            })
        }));
        if record {
            match &r {
                Ok(Ok(())) => {
                    if device.end_recording(mem, Some((&bases, at, launches))).is_err() {
                        // The recording failed (and is off for this memory from now on): the
                        // step did not run, so run it without one.
                        return self.run(device, program, mem, at, phase);
                    }
                }
                // A failed or panicking step: close the capture, keep the step's own error.
                _ => {
                    let _ = device.end_recording(mem, None);
                }
            }
        }
        let r = match r {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match r {
            Ok(()) => Ok(launches),
            Err(RunError::Launch { error, .. }) => Err(error),
            Err(e) => Err(RuntimeError::Input(format!("the host schedule of {}: {e}", program.name))),
        }
    }
}
