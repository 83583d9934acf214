//! cuda: the `cuda` device — PTX JIT-loaded through the CUDA driver (cudarc with dynamic loading, so
//! flashc builds and runs everywhere; without a driver, `Cuda::new` is a clear error).
//!
//! - The driver is looked up at run time (`is_culib_present`), never at link time.
//! - PTX modules are loaded with `cuModuleLoadDataEx` with the JIT's error and info logs; a failure
//!   names the kernel, writes its PTX to a file and prints the `ptxas` command that reproduces it.
//!   Loaded modules are cached by content.
//! - Weights are uploaded once per model (in the program's storage type) and shared by every program
//!   instance; each instance gets one arena allocation and one allocation per input and state.
//!
//! The kernels a program launches come from `flashc_codegen::kernels`; a kernel group without a
//! generator is reported as such.

use std::collections::BTreeMap;
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use flashc_compiler::gir::Bindings;
use flashc_compiler::schedule::{BufferId, KernelGroup, Program};

use crate::device::{Device, HostData, RuntimeError};

fn dev_err(what: &str, r: sys::CUresult) -> RuntimeError {
    RuntimeError::Device(format!("{what} failed: {r:?}"))
}

fn check(what: &str, r: sys::CUresult) -> Result<(), RuntimeError> {
    if r == sys::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(dev_err(what, r)) }
}

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the driver library; no driver function is called.
    unsafe { sys::is_culib_present() }
}

/// A loaded PTX module.
struct Module {
    handle: sys::CUmodule,
}

// SAFETY: a CUmodule handle may be used from any thread once its context is current.
unsafe impl Send for Module {}

/// The `cuda` device: one GPU, its context and a cache of loaded modules.
pub struct Cuda {
    context: sys::CUcontext,
    modules: Mutex<BTreeMap<String, Module>>,
    /// Where failed PTX is written for reproduction.
    dump_dir: PathBuf,
}

// SAFETY: the context handle is only used to make it current on the calling thread.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

impl Cuda {
    /// Opens GPU `ordinal`. Without a driver: "no CUDA driver found".
    pub fn new(ordinal: usize) -> Result<Cuda, RuntimeError> {
        if !driver_present() {
            return Err(RuntimeError::Device(
                "no CUDA driver found (libcuda could not be loaded); use `--device cpu` or `--device sim`".to_string(),
            ));
        }
        // SAFETY: plain driver calls with out-pointers we own.
        unsafe {
            check("cuInit", sys::cuInit(0))?;
            let mut dev = 0;
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal as i32))?;
            let mut ctx = std::ptr::null_mut();
            check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
            check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx))?;
            Ok(Cuda { context: ctx, modules: Mutex::new(BTreeMap::new()), dump_dir: std::env::temp_dir() })
        }
    }

    fn bind(&self) -> Result<(), RuntimeError> {
        // SAFETY: the context was retained in `new` and lives as long as `self`.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.context) })
    }

    /// Loads a PTX module (cached by its text), reporting the JIT logs on failure.
    pub fn load_ptx(&self, kernel: &str, ptx: &str) -> Result<(), RuntimeError> {
        self.bind()?;
        let key = format!("{kernel}\n{ptx}");
        let mut cache = self.modules.lock().map_err(|_| RuntimeError::Device("module cache poisoned".into()))?;
        if cache.contains_key(&key) {
            return Ok(());
        }
        let src =
            CString::new(ptx).map_err(|_| RuntimeError::Device(format!("PTX of {kernel} contains a NUL byte")))?;
        let mut error_log = vec![0u8; 16 << 10];
        let mut info_log = vec![0u8; 16 << 10];
        let mut options = [
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
            sys::CUjit_option::CU_JIT_LOG_VERBOSE,
        ];
        // The driver reads integer options through the pointer-sized slots (its convention).
        let mut values: [*mut c_void; 5] = [
            error_log.as_mut_ptr().cast(),
            std::ptr::without_provenance_mut(error_log.len()),
            info_log.as_mut_ptr().cast(),
            std::ptr::without_provenance_mut(info_log.len()),
            std::ptr::without_provenance_mut(1),
        ];
        let mut module = std::ptr::null_mut();
        // SAFETY: the option values point to buffers that outlive the call, with their sizes.
        let r = unsafe {
            sys::cuModuleLoadDataEx(
                &mut module,
                src.as_ptr().cast(),
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            let log = String::from_utf8_lossy(&error_log).trim_end_matches('\0').to_string();
            let path = self.dump_dir.join(format!("flashc-{kernel}.ptx"));
            let _ = std::fs::write(&path, ptx);
            return Err(RuntimeError::Device(format!(
                "the driver rejected the PTX of kernel `{kernel}` ({r:?}):\n{log}\nthe PTX is in {}; reproduce with:\n  ptxas -arch=sm_80 -v {}",
                path.display(),
                path.display()
            )));
        }
        cache.insert(key, Module { handle: module });
        Ok(())
    }

    /// Device memory in bytes (free, total).
    pub fn memory(&self) -> Result<(usize, usize), RuntimeError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-pointers we own.
        check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
        Ok((free, total))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if let Ok(mut cache) = self.modules.lock() {
            for (_, m) in std::mem::take(&mut *cache) {
                // SAFETY: each module was loaded by this device and is unloaded once.
                unsafe {
                    sys::cuModuleUnload(m.handle);
                }
            }
        }
    }
}

/// A device allocation, freed on drop.
struct DevBuf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated with cuMemAlloc and freed once.
            unsafe {
                sys::cuMemFree_v2(self.ptr);
            }
        }
    }
}

fn alloc(bytes: usize) -> Result<DevBuf, RuntimeError> {
    let mut ptr = 0;
    // SAFETY: out-pointer we own; zero-size allocations are skipped.
    if bytes > 0 {
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) })?;
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(ptr, 0, bytes) })?;
    }
    Ok(DevBuf { ptr, bytes })
}

/// Memory of one program instance on the GPU.
pub struct CudaMemory {
    at: Bindings,
    arena: DevBuf,
    buffers: BTreeMap<BufferId, DevBuf>,
    /// Scratch of a compiled schedule's slots, by slot index.
    scratch: BTreeMap<usize, DevBuf>,
}

impl Device for Cuda {
    type Memory = CudaMemory;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn allocate(&self, program: &Program, at: &Bindings) -> Result<CudaMemory, RuntimeError> {
        self.bind()?;
        let arena = alloc(usize::try_from(program.arena_bytes(at)).unwrap_or(0))?;
        let mut buffers = BTreeMap::new();
        for b in program.buffers.iter().filter(|b| b.alias.is_none() && !b.kind.in_arena()) {
            let bytes = usize::try_from(b.bytes.eval(at))
                .map_err(|_| RuntimeError::Input(format!("{} has a negative size", b.id)))?;
            buffers.insert(b.id, alloc(bytes)?);
        }
        Ok(CudaMemory { at: *at, arena, buffers, scratch: BTreeMap::new() })
    }

    fn share_weight(&self, mem: &mut CudaMemory, buffer: BufferId, data: Arc<Vec<f32>>) -> Result<(), RuntimeError> {
        self.upload(mem, buffer, HostData::F32(data.as_ref().clone()))
    }

    fn upload(&self, mem: &mut CudaMemory, buffer: BufferId, data: HostData) -> Result<(), RuntimeError> {
        self.bind()?;
        let b =
            mem.buffers.get(&buffer).ok_or_else(|| RuntimeError::Input(format!("{buffer} cannot be uploaded to")))?;
        // Floats are stored as bf16 when the buffer is 2 bytes per element, else f32; ints as i32.
        let bytes: Vec<u8> = match data {
            HostData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::F32(v) if b.bytes == v.len() * 2 => {
                v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect()
            }
            HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        if bytes.len() != b.bytes {
            return Err(RuntimeError::Input(format!("{buffer} holds {} bytes, {} given", b.bytes, bytes.len())));
        }
        if !bytes.is_empty() {
            // SAFETY: the destination holds exactly `bytes.len()` bytes.
            check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(b.ptr, bytes.as_ptr().cast(), bytes.len()) })?;
        }
        Ok(())
    }

    fn download(&self, program: &Program, mem: &CudaMemory, buffer: BufferId) -> Result<HostData, RuntimeError> {
        self.bind()?;
        let buf = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
        let root = buf.root();
        let rb = program.buffer(root).unwrap_or(buf);
        let n: usize = buf.ty.shape.iter().map(|d| d.eval(&mem.at).max(0) as usize).product();
        let elem = buf.ty.dtype.size() as usize;
        let (ptr, bytes) = if rb.kind.in_arena() {
            let off = rb.offset.as_ref().map_or(0, |o| o.eval(&mem.at)) as u64;
            (mem.arena.ptr + off, n * elem)
        } else {
            let d = mem.buffers.get(&root).ok_or_else(|| RuntimeError::Input(format!("{buffer} has no storage")))?;
            (d.ptr, n * elem)
        };
        let mut host = vec![0u8; bytes];
        if bytes > 0 {
            // SAFETY: the source range lies inside the allocation (checked by the program's plan).
            check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), ptr, bytes) })?;
        }
        Ok(match (buf.ty.dtype, elem) {
            (flashc_compiler::gir::DType::I32, _) => {
                HostData::I32(host.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            (_, 2) => HostData::F32(
                host.chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            ),
            _ => HostData::F32(host.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        })
    }

    fn run(&self, _program: &Program, kernel: &KernelGroup, _mem: &mut CudaMemory) -> Result<(), RuntimeError> {
        Err(RuntimeError::Device(format!(
            "no GPU kernel for {} ({}) yet: run this model with `--device cpu`",
            kernel.id, kernel.name
        )))
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        self.bind()?;
        // SAFETY: no arguments.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    fn bases(
        &self,
        program: &Program,
        plan: &flashc_codegen::host::LaunchPlan,
        mem: &mut CudaMemory,
    ) -> Result<Vec<u64>, RuntimeError> {
        use flashc_codegen::host::plan::StorageClass;
        self.bind()?;
        let mut bases = Vec::with_capacity(plan.slots.len());
        for (i, slot) in plan.slots.iter().enumerate() {
            bases.push(match (slot.class, slot.buffer, &slot.bytes) {
                (StorageClass::Arena, _, _) => mem.arena.ptr,
                (StorageClass::Scratch, _, Some(bytes)) => {
                    if !mem.scratch.contains_key(&i) {
                        let n = usize::try_from(bytes.eval(&mem.at))
                            .map_err(|_| RuntimeError::Input(format!("scratch `{}` has a negative size", slot.name)))?;
                        mem.scratch.insert(i, alloc(n)?);
                    }
                    mem.scratch[&i].ptr
                }
                (_, Some(b), _) => {
                    let root = program.buffer(b).map_or(b, |x| x.root());
                    mem.buffers
                        .get(&root)
                        .map(|d| d.ptr)
                        .ok_or_else(|| RuntimeError::Input(format!("{b} has no storage")))?
                }
                _ => return Err(RuntimeError::Compile(format!("slot {i} (`{}`) has no storage", slot.name))),
            });
        }
        Ok(bases)
    }

    fn launch(
        &self,
        program: &Program,
        mem: &mut CudaMemory,
        launch: &flashc_codegen::host::Launched<'_>,
    ) -> Result<(), RuntimeError> {
        let group = crate::device::group(program, launch.kernel)?;
        self.run(program, group, mem)
    }
}
