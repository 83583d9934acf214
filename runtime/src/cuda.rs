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
//! - Kernels come from `flashc_codegen::kernels::dispatch` (generated once per program instance),
//!   are written as PTX for the lowest target that expresses them and JIT-compiled by the driver
//!   for the GPU at hand; a kernel group without a generator is reported as such. Every launch goes
//!   to one non-blocking stream of the device, in order; uploads and downloads wait for it first.
//! - `Cuda::time` brackets work with two events on that stream and reports the GPU time.
//! - Single kernels, as on the sim (`sim::run`): `Cuda::alloc` gives a zeroed [`CudaBuffer`] (freed
//!   on drop), `Cuda::write` and `Cuda::read` copy bytes, and `Cuda::run_kernel` launches one
//!   `kir::Kernel` with `sim::Launch` sizes and `sim::Arg` arguments and waits for it. Used by the
//!   instruction conformance suite (`runtime/tests/gpu_conformance.rs`), which runs the same
//!   kernels on both devices.
//! - Copies go to the device's stream (pageable copies and memsets on the legacy stream are not
//!   ordered with a non-blocking stream), and allocations wait for their zeroing.

use std::collections::BTreeMap;
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use flashc_codegen::kernels::Generated;
use flashc_codegen::kernels::dispatch::{self, Dispatched};
use flashc_codegen::kir::{Kernel, ParamTy};
use flashc_codegen::ptx;
use flashc_compiler::gir::{Bindings, DType};
use flashc_compiler::schedule::{BufferId, BufferKind, KernelGroup, KernelId, Program};

use crate::device::{Device, HostData, RuntimeError};
use crate::sim::{Arg, Launch};

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

/// A weight on the device and the host data it was uploaded from (kept alive, see `Cuda::weights`).
type SharedWeight = (Arc<Vec<f32>>, Arc<DevBuf>);

/// A loaded PTX module and its kernel.
struct Module {
    handle: sys::CUmodule,
    function: sys::CUfunction,
}

// SAFETY: a CUmodule handle may be used from any thread once its context is current.
unsafe impl Send for Module {}

/// The `cuda` device: one GPU, its context and a cache of loaded modules.
pub struct Cuda {
    context: sys::CUcontext,
    /// The stream every launch goes to.
    stream: sys::CUstream,
    modules: Mutex<BTreeMap<String, Module>>,
    /// Weights on the device, uploaded once and shared by every program instance: keyed by the
    /// host data's address, the stored size and the element size (the host data is kept alive with
    /// its entry, so the address stays unique).
    weights: Mutex<BTreeMap<(usize, usize, u64), SharedWeight>>,
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
            let mut stream = std::ptr::null_mut();
            check(
                "cuStreamCreate",
                sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32),
            )?;
            Ok(Cuda {
                context: ctx,
                stream,
                modules: Mutex::new(BTreeMap::new()),
                weights: Mutex::new(BTreeMap::new()),
                dump_dir: std::env::temp_dir(),
            })
        }
    }

    fn bind(&self) -> Result<(), RuntimeError> {
        // SAFETY: the context was retained in `new` and lives as long as `self`.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.context) })
    }

    /// Loads a PTX module (cached by its text), reporting the JIT logs on failure.
    pub fn load_ptx(&self, kernel: &str, ptx: &str) -> Result<(), RuntimeError> {
        self.function(kernel, ptx).map(|_| ())
    }

    /// The kernel `kernel` of a PTX module, loading the module on first use (cached by its text).
    fn function(&self, kernel: &str, ptx: &str) -> Result<sys::CUfunction, RuntimeError> {
        self.bind()?;
        let key = format!("{kernel}\n{ptx}");
        let mut cache = self.modules.lock().map_err(|_| RuntimeError::Device("module cache poisoned".into()))?;
        if let Some(m) = cache.get(&key) {
            return Ok(m.function);
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
                "the driver rejected the PTX of kernel `{kernel}` ({r:?}):\n{log}\nthe PTX is in {}; reproduce with:\n  ptxas -arch=sm_90 -v {}   (sm_80 for an A100)",
                path.display(),
                path.display()
            )));
        }
        let name = CString::new(kernel).map_err(|_| RuntimeError::Device(format!("kernel name {kernel:?}")))?;
        let mut function = std::ptr::null_mut();
        // SAFETY: the module was just loaded; the name is NUL-terminated.
        let r = unsafe { sys::cuModuleGetFunction(&mut function, module, name.as_ptr()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: the module was loaded above and is not cached.
            unsafe { sys::cuModuleUnload(module) };
            return Err(dev_err(&format!("cuModuleGetFunction({kernel})"), r));
        }
        cache.insert(key, Module { handle: module, function });
        Ok(function)
    }

    /// Before `group`'s first kernel launches: checks the row limit of its kernels `d` and clears
    /// zeroed storage whose lifetime starts here.
    fn begin_group(
        &self,
        program: &Program,
        group: &KernelGroup,
        d: &Dispatched,
        mem: &mut CudaMemory,
    ) -> Result<(), RuntimeError> {
        crate::device::check_rows(group, d, &mem.at)?;
        for (_, off, bytes) in crate::device::zeroed_at(program, group, &mem.at)? {
            self.bind()?;
            // SAFETY: the range lies in the arena (the program's plan); ordered on the stream.
            check("cuMemsetD8Async", unsafe { sys::cuMemsetD8Async(mem.arena.ptr + off, 0, bytes, self.stream) })?;
        }
        Ok(())
    }

    /// Ends a capture; with `keep`, instantiates the graph and runs it once.
    fn finish_recording(
        &self,
        mem: &mut CudaMemory,
        keep: Option<(&[u64], &Bindings, usize)>,
    ) -> Result<(), RuntimeError> {
        self.bind()?;
        let mut graph = std::ptr::null_mut();
        // SAFETY: ends the capture begun on this stream; the graph is destroyed below.
        check("cuStreamEndCapture", unsafe { sys::cuStreamEndCapture(self.stream, &mut graph) })?;
        let Some((bases, at, launches)) = keep else {
            // SAFETY: the captured graph, not instantiated.
            unsafe { sys::cuGraphDestroy(graph) };
            return Ok(());
        };
        let mut exec = std::ptr::null_mut();
        // SAFETY: a graph captured above; the template is not needed after instantiation.
        let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        // SAFETY: as above.
        unsafe { sys::cuGraphDestroy(graph) };
        check("cuGraphInstantiate", r)?;
        let g = Graph { exec, bases: bases.to_vec(), at: *at, launches };
        // The captured launches did not run: run the step now.
        // SAFETY: instantiated above, on the device's stream.
        check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(g.exec, self.stream) })?;
        mem.graph = Some(g);
        Ok(())
    }

    /// Waits for every launch issued to the device's stream.
    fn sync_stream(&self) -> Result<(), RuntimeError> {
        self.bind()?;
        // SAFETY: the stream was created in `new` and lives as long as `self`.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.stream) })
    }

    /// Launches a generated kernel on the device's stream with raw 64-bit arguments (each passed in
    /// its parameter's width).
    fn launch_kernel(&self, g: &Generated, grid: [u32; 3], shared: u32, raw: &[u64]) -> Result<(), RuntimeError> {
        self.launch_raw(&g.kernel, grid, g.launch.block, shared, raw)
    }

    /// Launches `kernel` on the device's stream with raw 64-bit arguments (each passed in its
    /// parameter's width), without waiting for it.
    fn launch_raw(
        &self,
        kernel: &Kernel,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        raw: &[u64],
    ) -> Result<(), RuntimeError> {
        if raw.len() != kernel.params.len() {
            return Err(RuntimeError::Compile(format!(
                "{}: {} arguments for {} parameters",
                kernel.name,
                raw.len(),
                kernel.params.len()
            )));
        }
        let text = ptx::write_string(kernel, &ptx::Options::default())
            .map_err(|e| RuntimeError::Compile(format!("{}: {e}", kernel.name)))?;
        let f = self.function(&kernel.name, &text)?;
        // Past 48 KB of static plus dynamic shared memory, the dynamic part must be allowed
        // explicitly.
        if u64::from(kernel.static_shared_bytes()) + u64::from(shared) > 48 * 1024 {
            // SAFETY: a function of a loaded module; the attribute takes a byte count.
            check("cuFuncSetAttribute", unsafe {
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
            })?;
        }
        // Each value in a u64 slot: a 4-byte parameter reads the low half (little-endian hosts).
        let mut values: Vec<u64> = raw
            .iter()
            .zip(&kernel.params)
            .map(|(v, p)| match p.ty {
                ParamTy::Ptr | ParamTy::U64 => *v,
                ParamTy::U32 | ParamTy::S32 | ParamTy::F32 => *v & 0xFFFF_FFFF,
            })
            .collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        let [gx, gy, gz] = grid;
        let [bx, by, bz] = block;
        // SAFETY: `params` points to one value per kernel parameter, alive during the call (the
        // driver copies them at launch).
        check(&format!("cuLaunchKernel({})", kernel.name), unsafe {
            sys::cuLaunchKernel(
                f,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                shared,
                self.stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// A device allocation of `bytes`, zeroed, freed when the buffer is dropped.
    pub fn alloc(&self, bytes: usize) -> Result<CudaBuffer, RuntimeError> {
        self.bind()?;
        Ok(CudaBuffer { buf: alloc(bytes)? })
    }

    /// Copies `bytes` into `dst` at byte `offset`, after the work issued so far.
    pub fn write(&self, dst: &CudaBuffer, offset: usize, bytes: &[u8]) -> Result<(), RuntimeError> {
        let end = offset.checked_add(bytes.len()).filter(|e| *e <= dst.buf.bytes).ok_or_else(|| {
            RuntimeError::Input(format!(
                "writing {} bytes at offset {offset} of a buffer of {} bytes",
                bytes.len(),
                dst.buf.bytes
            ))
        })?;
        if end == offset {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the destination range lies inside the allocation (checked above); the host
        // buffer outlives the copy because the stream is synchronised before returning.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.buf.ptr + offset as u64, bytes.as_ptr().cast(), bytes.len(), self.stream)
        })?;
        self.sync_stream()
    }

    /// Reads `len` bytes of `src` from byte `offset`, after the work issued so far.
    pub fn read(&self, src: &CudaBuffer, offset: usize, len: usize) -> Result<Vec<u8>, RuntimeError> {
        offset.checked_add(len).filter(|e| *e <= src.buf.bytes).ok_or_else(|| {
            RuntimeError::Input(format!(
                "reading {len} bytes at offset {offset} of a buffer of {} bytes",
                src.buf.bytes
            ))
        })?;
        let mut host = vec![0u8; len];
        if len > 0 {
            self.copy_to_host(&mut host, src.buf.ptr + offset as u64)?;
        }
        Ok(host)
    }

    /// Copies `bytes` to the start of `dst` (which holds exactly that many) on the device's stream
    /// and waits for it.
    fn copy_to_device(&self, dst: &DevBuf, bytes: &[u8]) -> Result<(), RuntimeError> {
        if bytes.len() != dst.bytes {
            return Err(RuntimeError::Input(format!("{} bytes for a buffer of {}", bytes.len(), dst.bytes)));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the destination holds exactly `bytes.len()` bytes; the host bytes outlive the copy
        // because the stream is synchronised before returning.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.ptr, bytes.as_ptr().cast(), bytes.len(), self.stream)
        })?;
        self.sync_stream()
    }

    /// Copies device memory at `src` into `host` on the device's stream and waits for it.
    fn copy_to_host(&self, host: &mut [u8], src: sys::CUdeviceptr) -> Result<(), RuntimeError> {
        self.bind()?;
        // SAFETY: the caller checked that `host.len()` bytes from `src` lie in one allocation; the
        // host buffer outlives the copy because the stream is synchronised before returning.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(host.as_mut_ptr().cast(), src, host.len(), self.stream)
        })?;
        self.sync_stream()
    }

    /// Runs one kir kernel: writes its PTX for the lowest target, loads it (cached), launches it
    /// with `launch` and `args` and waits for it. Errors name the kernel (a fault inside the kernel
    /// shows at the wait, and leaves the context unusable, as CUDA faults do).
    pub fn run_kernel(&self, kernel: &Kernel, launch: &Launch, args: &[Arg]) -> Result<(), RuntimeError> {
        let bad = |m: String| RuntimeError::Input(format!("kernel `{}`: {m}", kernel.name));
        if args.len() != kernel.params.len() {
            return Err(bad(format!("{} arguments for {} parameters", args.len(), kernel.params.len())));
        }
        let mut raw = Vec::with_capacity(args.len());
        for (a, p) in args.iter().zip(&kernel.params) {
            raw.push(match (a, p.ty) {
                (Arg::Ptr(v), ParamTy::Ptr) | (Arg::U64(v), ParamTy::U64) => *v,
                (Arg::U32(v), ParamTy::U32) => u64::from(*v),
                (Arg::S32(v), ParamTy::S32) => u64::from(*v as u32),
                (Arg::F32(v), ParamTy::F32) => u64::from(v.to_bits()),
                _ => return Err(bad(format!("argument {a:?} for parameter {} of type {:?}", p.name, p.ty))),
            });
        }
        if launch.grid.contains(&0) || launch.block.contains(&0) {
            return Err(bad(format!("empty grid {:?} or block {:?}", launch.grid, launch.block)));
        }
        if let Some(b) = kernel.block
            && b != launch.block
        {
            return Err(bad(format!("written for blocks of {b:?}, launched with {:?}", launch.block)));
        }
        self.launch_raw(kernel, launch.grid, launch.block, launch.dynamic_shared, &raw)?;
        self.sync_stream().map_err(|e| RuntimeError::Device(format!("kernel `{}`: {e}", kernel.name)))
    }

    /// Runs `work` between two events on the device's stream; returns its result and the GPU time
    /// in milliseconds.
    pub fn time<T>(&self, work: impl FnOnce() -> Result<T, RuntimeError>) -> Result<(T, f32), RuntimeError> {
        self.bind()?;
        let (mut start, mut end) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out-pointers we own; the events are destroyed below.
        unsafe {
            check("cuEventCreate", sys::cuEventCreate(&mut start, 0))?;
            check("cuEventCreate", sys::cuEventCreate(&mut end, 0))?;
        }
        let result = (|| {
            // SAFETY: events and stream of this context.
            check("cuEventRecord", unsafe { sys::cuEventRecord(start, self.stream) })?;
            let out = work()?;
            check("cuEventRecord", unsafe { sys::cuEventRecord(end, self.stream) })?;
            check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(end) })?;
            let mut ms = 0f32;
            check("cuEventElapsedTime", unsafe { sys::cuEventElapsedTime(&mut ms, start, end) })?;
            Ok((out, ms))
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            sys::cuEventDestroy_v2(start);
            sys::cuEventDestroy_v2(end);
        }
        result
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
        // Module unloading acts on the current context: make it ours.
        let _ = self.bind();
        // SAFETY: the stream was created in `new` and is destroyed once, after its work.
        unsafe {
            sys::cuStreamSynchronize(self.stream);
            sys::cuStreamDestroy_v2(self.stream);
        }
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

/// A device buffer of the single-kernel API ([`Cuda::alloc`]), zeroed when allocated and freed on
/// drop.
pub struct CudaBuffer {
    buf: DevBuf,
}

impl CudaBuffer {
    /// The device address, for `Arg::Ptr`.
    pub fn addr(&self) -> u64 {
        self.buf.ptr
    }

    pub fn len(&self) -> usize {
        self.buf.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.buf.bytes == 0
    }
}

/// A zeroed allocation (the context must be current).
fn alloc(bytes: usize) -> Result<DevBuf, RuntimeError> {
    let mut ptr = 0;
    // SAFETY: out-pointer we own; zero-size allocations are skipped.
    if bytes > 0 {
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) })?;
        let buf = DevBuf { ptr, bytes };
        // The memset runs on the legacy stream, which a non-blocking stream does not wait for:
        // wait for it here, so no kernel sees the allocation before it is zeroed.
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(ptr, 0, bytes) })?;
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })?;
        return Ok(buf);
    }
    Ok(DevBuf { ptr, bytes })
}

/// Memory of one program instance on the GPU.
pub struct CudaMemory {
    at: Bindings,
    arena: DevBuf,
    /// Storage outside the arena by root buffer (weights shared with the device's weight cache).
    buffers: BTreeMap<BufferId, Arc<DevBuf>>,
    /// Every root buffer's dtype and size in bytes at this memory's sizes.
    roots: BTreeMap<BufferId, (DType, usize)>,
    /// Scratch of a compiled schedule's slots, by slot index.
    scratch: BTreeMap<usize, DevBuf>,
    /// Scratch of groups run one by one, by group and placeholder id.
    group_scratch: BTreeMap<(KernelId, BufferId), DevBuf>,
    /// Each group's kernels, generated on first use.
    generated: BTreeMap<KernelId, Arc<Dispatched>>,
    /// Decode steps run on this memory so far (the second is recorded).
    steps: u64,
    /// Recording failed once on this memory: decode steps run without a graph.
    no_graphs: bool,
    /// The recorded decode step: its graph, base pointers, sizes and launch count.
    graph: Option<Graph>,
}

/// An instantiated CUDA graph of one decode step.
struct Graph {
    exec: sys::CUgraphExec,
    bases: Vec<u64>,
    at: Bindings,
    launches: usize,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: instantiated once by `end_recording`, destroyed once.
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
        }
    }
}

impl CudaMemory {
    fn kernels(&mut self, program: &Program, group: &KernelGroup) -> Result<Arc<Dispatched>, RuntimeError> {
        if let Some(d) = self.generated.get(&group.id) {
            return Ok(d.clone());
        }
        let d = Arc::new(dispatch::generate(program, group).map_err(|e| {
            RuntimeError::Compile(format!(
                "{e}: no GPU kernel for this group; run the model on the cpu device, or store it in bf16"
            ))
        })?);
        self.generated.insert(group.id, d.clone());
        Ok(d)
    }

    /// The device address of a program buffer (arena buffers at their planned offset).
    fn address(&self, program: &Program, buffer: BufferId) -> Result<u64, RuntimeError> {
        let b = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
        let root = program.buffer(b.root()).unwrap_or(b);
        if root.kind.in_arena() {
            let off = root.offset.as_ref().map_or(0, |o| o.eval(&self.at));
            let off =
                u64::try_from(off).map_err(|_| RuntimeError::Input(format!("{} has a negative offset", root.id)))?;
            return Ok(self.arena.ptr + off);
        }
        self.buffers.get(&root.id).map(|d| d.ptr).ok_or_else(|| RuntimeError::Input(format!("{buffer} has no storage")))
    }
}

impl Cuda {
    /// Writes any buffer of `program` (an activation in the arena included), in its dtype: for tests
    /// that run one kernel group on given operands (like `SimMemory::write`).
    pub fn write_buffer(
        &self,
        program: &Program,
        mem: &mut CudaMemory,
        buffer: BufferId,
        data: &HostData,
    ) -> Result<(), RuntimeError> {
        let b = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
        let n = usize::try_from(b.ty.numel().eval(&mem.at))
            .map_err(|_| RuntimeError::Input(format!("{buffer} has a negative size")))?;
        if data.len() != n {
            return Err(RuntimeError::Input(format!("buffer {buffer} holds {n} values, {} given", data.len())));
        }
        let bytes =
            crate::sim::encode(b.ty.dtype, data).map_err(|m| RuntimeError::Input(format!("buffer {buffer}: {m}")))?;
        if bytes.is_empty() {
            return Ok(());
        }
        let addr = mem.address(program, buffer)?;
        self.bind()?;
        // SAFETY: the program's plan places `bytes.len()` bytes of this buffer at `addr`; the host
        // bytes outlive the copy (the stream is synchronised below).
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(addr, bytes.as_ptr().cast(), bytes.len(), self.stream)
        })?;
        self.sync_stream()
    }
}

impl Device for Cuda {
    type Memory = CudaMemory;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn allocate(&self, program: &Program, at: &Bindings) -> Result<CudaMemory, RuntimeError> {
        self.bind()?;
        let arena_bytes = program.arena_bytes(at);
        let arena = alloc(
            usize::try_from(arena_bytes)
                .map_err(|_| RuntimeError::Input(format!("the activation arena would be {arena_bytes} bytes")))?,
        )?;
        let mut buffers = BTreeMap::new();
        let mut roots = BTreeMap::new();
        for b in program.buffers.iter().filter(|b| b.alias.is_none() && !b.kind.in_arena()) {
            let bytes = usize::try_from(b.bytes.eval(at))
                .map_err(|_| RuntimeError::Input(format!("{} has a negative size", b.id)))?;
            roots.insert(b.id, (b.ty.dtype, bytes));
            // Weights come from the device's weight cache (`share_weight`).
            if b.kind != BufferKind::Weight {
                buffers.insert(b.id, Arc::new(alloc(bytes)?));
            }
        }
        Ok(CudaMemory {
            at: *at,
            arena,
            buffers,
            roots,
            scratch: BTreeMap::new(),
            group_scratch: BTreeMap::new(),
            generated: BTreeMap::new(),
            steps: 0,
            no_graphs: false,
            graph: None,
        })
    }

    fn share_weight(&self, mem: &mut CudaMemory, buffer: BufferId, data: Arc<Vec<f32>>) -> Result<(), RuntimeError> {
        let &(dtype, bytes) =
            mem.roots.get(&buffer).ok_or_else(|| RuntimeError::Input(format!("{buffer} is not a buffer")))?;
        if dtype.size() as usize * data.len() != bytes {
            return Err(RuntimeError::Input(format!("{buffer} holds {bytes} bytes, {} values given", data.len())));
        }
        let key = (Arc::as_ptr(&data) as usize, bytes, dtype.size());
        let mut cache = self.weights.lock().map_err(|_| RuntimeError::Device("weight cache poisoned".into()))?;
        let dev = match cache.get(&key) {
            Some((_, d)) => d.clone(),
            None => {
                self.bind()?;
                let d = Arc::new(alloc(bytes)?);
                let encoded = crate::sim::encode(dtype, &HostData::F32(data.as_ref().clone()))
                    .map_err(|m| RuntimeError::Input(format!("{buffer}: {m}")))?;
                self.copy_to_device(&d, &encoded)?;
                cache.insert(key, (data.clone(), d.clone()));
                d
            }
        };
        mem.buffers.insert(buffer, dev);
        Ok(())
    }

    fn upload(&self, mem: &mut CudaMemory, buffer: BufferId, data: HostData) -> Result<(), RuntimeError> {
        let &(dtype, bytes) =
            mem.roots.get(&buffer).ok_or_else(|| RuntimeError::Input(format!("{buffer} cannot be uploaded to")))?;
        let b =
            mem.buffers.get(&buffer).ok_or_else(|| RuntimeError::Input(format!("{buffer} cannot be uploaded to")))?;
        let encoded = crate::sim::encode(dtype, &data).map_err(|m| RuntimeError::Input(format!("{buffer}: {m}")))?;
        if encoded.len() != bytes {
            return Err(RuntimeError::Input(format!("{buffer} holds {bytes} bytes, {} given", encoded.len())));
        }
        self.copy_to_device(b, &encoded)
    }

    fn download(&self, program: &Program, mem: &CudaMemory, buffer: BufferId) -> Result<HostData, RuntimeError> {
        self.sync_stream()?;
        let buf = program.buffer(buffer).ok_or_else(|| RuntimeError::Input(format!("no buffer {buffer}")))?;
        let root = buf.root();
        let rb = program.buffer(root).unwrap_or(buf);
        let n: usize = buf.ty.shape.iter().map(|d| d.eval(&mem.at).max(0) as usize).product();
        let elem = buf.ty.dtype.size() as usize;
        let (ptr, bytes) = if rb.kind.in_arena() {
            let off = rb.offset.as_ref().map_or(0, |o| o.eval(&mem.at));
            let off = u64::try_from(off).map_err(|_| RuntimeError::Input(format!("{root} has a negative offset")))?;
            (mem.arena.ptr + off, n * elem)
        } else {
            let d = mem.buffers.get(&root).ok_or_else(|| RuntimeError::Input(format!("{buffer} has no storage")))?;
            (d.ptr, n * elem)
        };
        let mut host = vec![0u8; bytes];
        if bytes > 0 {
            // The source range lies inside the allocation (checked by the program's plan).
            self.copy_to_host(&mut host, ptr)?;
        }
        Ok(crate::sim::decode(buf.ty.dtype, &host))
    }

    fn run(&self, program: &Program, group: &KernelGroup, mem: &mut CudaMemory) -> Result<(), RuntimeError> {
        let d = mem.kernels(program, group)?;
        self.begin_group(program, group, &d, mem)?;
        let at = mem.at;
        for g in &d.kernels {
            let grid = g.launch.grid_at(&at);
            if grid.contains(&0) {
                continue;
            }
            let mut address = |b: BufferId| -> Result<u64, RuntimeError> {
                let Some(sc) = d.scratch.iter().find(|s| s.id == b) else { return mem.address(program, b) };
                if let Some(buf) = mem.group_scratch.get(&(group.id, b)) {
                    return Ok(buf.ptr);
                }
                let n = usize::try_from(sc.bytes.eval(&at))
                    .map_err(|_| RuntimeError::Input(format!("{}: scratch `{}` is negative", group.id, sc.what)))?;
                let buf = alloc(n)?;
                let ptr = buf.ptr;
                mem.group_scratch.insert((group.id, b), buf);
                Ok(ptr)
            };
            let raw = crate::device::bind_args(&g.launch, &g.kernel.name, &at, &mut address)?;
            self.launch_kernel(g, grid, g.launch.dynamic_shared, &raw)?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        self.sync_stream()
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
        kernels: Option<&Dispatched>,
    ) -> Result<(), RuntimeError> {
        let group = crate::device::group(program, launch.kernel)?;
        let generated;
        let d = match kernels {
            Some(d) => d,
            None => {
                generated = mem.kernels(program, group)?;
                generated.as_ref()
            }
        };
        if launch.part == 0 {
            self.begin_group(program, group, d, mem)?;
        }
        let g = crate::device::scheduled_kernel(group, d, launch)?;
        self.launch_kernel(g, launch.grid, launch.shared, launch.args)
    }

    fn replay(&self, mem: &mut CudaMemory, bases: &[u64], at: &Bindings) -> Result<Option<usize>, RuntimeError> {
        mem.steps += 1;
        let Some(g) = &mem.graph else { return Ok(None) };
        if g.bases != bases || g.at != *at || std::env::var_os("FLASHC_NO_CUDA_GRAPHS").is_some() {
            mem.graph = None;
            return Ok(None);
        }
        self.bind()?;
        // SAFETY: an instantiated graph of this context, launched on the device's stream.
        check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(g.exec, self.stream) })?;
        Ok(Some(g.launches))
    }

    fn wants_recording(&self, mem: &CudaMemory) -> bool {
        mem.steps >= 2 && !mem.no_graphs && std::env::var_os("FLASHC_NO_CUDA_GRAPHS").is_none()
    }

    fn begin_recording(&self, _mem: &mut CudaMemory) -> Result<(), RuntimeError> {
        self.bind()?;
        // SAFETY: the device's stream; relaxed mode, as module loading may happen during the step.
        check("cuStreamBeginCapture", unsafe {
            sys::cuStreamBeginCapture_v2(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        })
    }

    fn end_recording(
        &self,
        mem: &mut CudaMemory,
        keep: Option<(&[u64], &Bindings, usize)>,
    ) -> Result<(), RuntimeError> {
        // Any failure here turns recording off for this memory: the host schedule then runs the
        // step without it.
        let r = self.finish_recording(mem, keep);
        if r.is_err() {
            mem.no_graphs = true;
            mem.graph = None;
        }
        r
    }

    fn kernels(&self, program: &Program) -> Result<crate::device::GroupKernels, RuntimeError> {
        Ok(crate::device::generated_kernels(program))
    }
}
