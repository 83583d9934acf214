//! abi: the calling convention between a compiled host schedule and the device that runs it.
//!
//! This file is the one description of that convention. The CLIF generator (`clif.rs`) takes every
//! offset and status code from the constants here, and callers read the records through the
//! `#[repr(C)]` views below; the `const` assertions at the bottom tie the two together.
//!
//! A program compiles to two native functions of the same type, [`EntryFn`]: **prep** (the kernels
//! run once after the weights are loaded) and **step** (the kernels of one step). In C:
//!
//! ```c
//! typedef struct { int64_t b, t, s; } Dims;
//! typedef struct {
//!     uint32_t kernel;     /* offset  0: the program's kernel id (k7 -> 7)                 */
//!     uint32_t grid[3];    /* offset  4: blocks in x, y, z; each in 1..=UINT32_MAX          */
//!     uint32_t block[3];   /* offset 16: threads per block in x, y, z                      */
//!     uint32_t shared;     /* offset 28: dynamic shared memory in bytes                    */
//!     uint32_t nargs;      /* offset 32: number of kernel parameters in args               */
//!     uint32_t part;       /* offset 36: which of the group's kernels (0 for the first)     */
//!     const uint64_t *args;/* offset 40: the parameters in order, each widened to 64 bits  */
//! } LaunchRecord;          /* 48 bytes, 8-aligned                                          */
//! typedef int32_t (*LaunchFn)(void *ctx, const LaunchRecord *record);
//!
//! int32_t prep(const Dims *dims, const uint64_t *bases, void *ctx, LaunchFn launch);
//! int32_t step(const Dims *dims, const uint64_t *bases, void *ctx, LaunchFn launch);
//! ```
//!
//! Parameters of an entry function:
//! - `dims`: the runtime sizes, read once at entry: `b` sequences in the batch, `t` new tokens per
//!   sequence, `s` cached tokens per sequence. All three must be ≥ 0, else the function returns
//!   [`STATUS_BAD_DIMS`] before any launch.
//! - `bases`: the table of base pointers, one `u64` per storage slot of the launch plan
//!   (`LaunchPlan::slots`): slot 0 is the arena, then one slot per storage root outside the arena
//!   (inputs, states, weights, prepared weights) in buffer order. It must hold at least as many
//!   entries as the plan has slots; only `bases[slot]` for slots the kernels use are read, each
//!   possibly more than once, so neither table may change while the entry function runs.
//! - `ctx`: opaque, passed unchanged to every `launch` call.
//! - `launch`: the device's launch entry, called once per launched kernel in launch order. It
//!   returns 0 to go on; any other value stops the schedule at once, and the entry function returns
//!   that value. It must not return a value in the reserved range [`RESERVED_MIN`]`..=`
//!   [`RESERVED_MAX`] (those are the schedule's own statuses).
//!
//! The record passed to `launch` lives in the entry function's stack frame: it is valid only during
//! the call, and the callee must not write to it. Argument values: a buffer argument is the address
//! `bases[slot] + offset` (wrapping u64 addition); a size is a value in `0..=u32::MAX`; a `u32`
//! constant is zero-extended; an `f32` constant is its bit pattern, zero-extended.
//!
//! Every size is a polynomial in B, T, S evaluated with checked `i64` arithmetic. For each kernel,
//! in order: the schedule evaluates the grid (an overflow returns [`STATUS_OVERFLOW`]); a grid with
//! a dimension ≤ 0 means no work, and the kernel is skipped; otherwise it evaluates the arguments
//! (an overflow returns [`STATUS_OVERFLOW`]), checks that every grid dimension and every size
//! argument fits in a `u32` (else [`STATUS_RANGE`]), and calls `launch`. Before the first kernel
//! it computes the products of B, T, S (`B*T`, `B*S`, …) that the sizes use, left to right with
//! checked multiplication ([`STATUS_OVERFLOW`] on overflow).
//!
//! Return value: [`STATUS_OK`] when every kernel was launched or skipped, else the first failing
//! `launch` status or one of the schedule's own statuses.

use std::ffi::c_void;
use std::mem::{offset_of, size_of};

use flashc_compiler::gir::Bindings;
use flashc_compiler::schedule::KernelId;

/// The runtime sizes an entry function reads (`dims`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Sequences in the batch (B).
    pub b: i64,
    /// New tokens per sequence (T).
    pub t: i64,
    /// Cached tokens per sequence (S).
    pub s: i64,
}

impl Dims {
    pub fn new(b: i64, t: i64, s: i64) -> Dims {
        Dims { b, t, s }
    }

    /// The values by symbol, in B, T, S order (the order of monomial powers).
    pub fn values(&self) -> [i64; 3] {
        [self.b, self.t, self.s]
    }
}

impl From<Bindings> for Dims {
    fn from(b: Bindings) -> Dims {
        Dims { b: b.b, t: b.t, s: b.s }
    }
}

impl From<Dims> for Bindings {
    fn from(d: Dims) -> Bindings {
        Bindings { b: d.b, t: d.t, s: d.s }
    }
}

/// The record an entry function passes to `launch` for each launched kernel (see the module doc
/// for each field).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LaunchRecord {
    pub kernel: u32,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
    pub nargs: u32,
    pub part: u32,
    pub args: *const u64,
}

/// The device's launch entry.
pub type LaunchFn = unsafe extern "C" fn(ctx: *mut c_void, record: *const LaunchRecord) -> i32;

/// A compiled entry function (`prep` or `step`).
pub type EntryFn =
    unsafe extern "C" fn(dims: *const Dims, bases: *const u64, ctx: *mut c_void, launch: LaunchFn) -> i32;

/// Every kernel was launched or skipped.
pub const STATUS_OK: i32 = 0;
/// The lowest status reserved for the schedule itself.
pub const RESERVED_MIN: i32 = i32::MIN;
/// The highest status reserved for the schedule itself.
pub const RESERVED_MAX: i32 = i32::MIN + 255;
/// B, T or S is negative (returned before any launch).
pub const STATUS_BAD_DIMS: i32 = i32::MIN;
/// A size overflowed `i64`.
pub const STATUS_OVERFLOW: i32 = i32::MIN + 1;
/// A grid dimension or a size argument does not fit in a `u32`.
pub const STATUS_RANGE: i32 = i32::MIN + 2;

/// Byte offsets of `Dims` fields, by symbol (B, T, S).
pub const DIMS_OFFSETS: [i32; 3] = [offset_of!(Dims, b) as i32, offset_of!(Dims, t) as i32, offset_of!(Dims, s) as i32];
/// Byte size of one `bases` entry.
pub const BASE_BYTES: i32 = size_of::<u64>() as i32;
/// Byte size of one `args` entry.
pub const ARG_BYTES: i32 = size_of::<u64>() as i32;
/// Byte offsets of `LaunchRecord` fields.
pub const RECORD_KERNEL: i32 = offset_of!(LaunchRecord, kernel) as i32;
pub const RECORD_GRID: i32 = offset_of!(LaunchRecord, grid) as i32;
pub const RECORD_BLOCK: i32 = offset_of!(LaunchRecord, block) as i32;
pub const RECORD_SHARED: i32 = offset_of!(LaunchRecord, shared) as i32;
pub const RECORD_NARGS: i32 = offset_of!(LaunchRecord, nargs) as i32;
pub const RECORD_PART: i32 = offset_of!(LaunchRecord, part) as i32;
pub const RECORD_ARGS: i32 = offset_of!(LaunchRecord, args) as i32;
/// Byte size and alignment of a `LaunchRecord`.
pub const RECORD_BYTES: u32 = size_of::<LaunchRecord>() as u32;
pub const RECORD_ALIGN_SHIFT: u8 = std::mem::align_of::<LaunchRecord>().trailing_zeros() as u8;
/// Alignment of the `args` array (log2).
pub const ARGS_ALIGN_SHIFT: u8 = std::mem::align_of::<u64>().trailing_zeros() as u8;

// The layout the module doc promises (and the generated code relies on, on 64-bit hosts).
const _: () = {
    assert!(size_of::<Dims>() == 24);
    assert!(DIMS_OFFSETS[0] == 0 && DIMS_OFFSETS[1] == 8 && DIMS_OFFSETS[2] == 16);
    assert!(RECORD_KERNEL == 0);
    assert!(RECORD_GRID == 4);
    assert!(RECORD_BLOCK == 16);
    assert!(RECORD_SHARED == 28);
    assert!(RECORD_NARGS == 32);
    assert!(RECORD_PART == 36);
    assert!(cfg!(not(target_pointer_width = "64")) || (RECORD_ARGS == 40 && RECORD_BYTES == 48));
};

/// One launch, as the interpreter and the safe wrapper around the native schedule report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launched<'a> {
    pub kernel: KernelId,
    /// Which of the group's kernels (a kernel group may be several kernels, in order).
    pub part: u32,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
    pub args: &'a [u64],
}

impl Launched<'_> {
    /// The record with its arguments copied out.
    pub fn owned(&self) -> OwnedLaunch {
        OwnedLaunch {
            kernel: self.kernel,
            part: self.part,
            grid: self.grid,
            block: self.block,
            shared: self.shared,
            args: self.args.to_vec(),
        }
    }

    /// Reads a record passed to a `launch` entry.
    ///
    /// # Safety
    /// `record` must point to a valid `LaunchRecord` whose `args` points to `nargs` readable `u64`s
    /// (as an entry function guarantees for the duration of the call), and the result must not
    /// outlive the call.
    pub unsafe fn from_record<'a>(record: *const LaunchRecord) -> Launched<'a> {
        // SAFETY: the caller guarantees that the record and its arguments are valid.
        let r = unsafe { &*record };
        let args = if r.nargs == 0 || r.args.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(r.args, r.nargs as usize) }
        };
        Launched { kernel: KernelId(r.kernel), part: r.part, grid: r.grid, block: r.block, shared: r.shared, args }
    }
}

/// A launch with its arguments owned, for collecting and comparing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedLaunch {
    pub kernel: KernelId,
    pub part: u32,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
    pub args: Vec<u64>,
}
