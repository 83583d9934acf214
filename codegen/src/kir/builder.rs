//! builder: writes kir kernels. Every value-producing call returns a fresh typed register, nested
//! control flow is a closure, and addresses are built with `index` helpers, so a generator reads like
//! the algorithm it implements.
//!
//! ```
//! use flashc_codegen::kir::{Builder, ParamTy, Space, Special, Ty, Cache};
//! // y[i] = 2 * x[i] for i < n, one element per thread.
//! let mut b = Builder::new("scale2");
//! let x = b.param_ptr("x");
//! let y = b.param_ptr("y");
//! let n = b.param(ParamTy::U32, "n");
//! let i = b.global_index_x();
//! let inside = b.setp(flashc_codegen::kir::Cmp::Lt, Ty::U32, i.into(), n.into());
//! b.if_(inside, |b| {
//!     let xa = b.index(x, i, 4);
//!     let v = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0);
//!     let w = b.bin(flashc_codegen::kir::BinOp::Mul, Ty::F32, v.into(), 2.0f32.into());
//!     let ya = b.index(y, i, 4);
//!     b.st(Space::Global, Ty::F32, ya.into(), 0, w.into());
//! });
//! let kernel = b.finish();
//! assert_eq!(kernel.params.len(), 3);
//! ```

use super::{
    AtomOp, BinOp, Cache, Cmp, Inst, Kernel, Operand, Param, ParamTy, Reg, Round, SharedArray, ShflMode, Space,
    Special, Stmt, Ty, UnOp, VoteMode,
};

impl From<f32> for Operand {
    fn from(x: f32) -> Operand {
        Operand::F32(x)
    }
}

impl From<i64> for Operand {
    fn from(x: i64) -> Operand {
        Operand::Imm(x)
    }
}

impl From<u32> for Operand {
    fn from(x: u32) -> Operand {
        Operand::Imm(i64::from(x))
    }
}

impl From<i32> for Operand {
    fn from(x: i32) -> Operand {
        Operand::Imm(i64::from(x))
    }
}

/// Builds one kernel.
pub struct Builder {
    kernel: Kernel,
    /// Open blocks: the innermost receives new statements.
    blocks: Vec<Vec<Stmt>>,
}

impl Builder {
    pub fn new(name: impl Into<String>) -> Builder {
        Builder {
            kernel: Kernel {
                name: name.into(),
                doc: Vec::new(),
                params: Vec::new(),
                regs: Vec::new(),
                shared: Vec::new(),
                dynamic_shared: false,
                block: None,
                body: Vec::new(),
            },
            blocks: vec![Vec::new()],
        }
    }

    /// Adds a line to the kernel's description.
    pub fn doc(&mut self, line: impl Into<String>) {
        self.kernel.doc.push(line.into());
    }

    /// Fixes the block size the kernel is written for.
    pub fn block_size(&mut self, x: u32, y: u32, z: u32) {
        self.kernel.block = Some([x, y, z]);
    }

    pub fn finish(mut self) -> Kernel {
        while self.blocks.len() > 1 {
            let inner = self.blocks.pop().unwrap_or_default();
            self.push_all(inner);
        }
        self.kernel.body = self.blocks.pop().unwrap_or_default();
        self.kernel
    }

    fn push_all(&mut self, stmts: Vec<Stmt>) {
        if let Some(b) = self.blocks.last_mut() {
            b.extend(stmts);
        }
    }

    /// A fresh register of type `ty`.
    pub fn reg(&mut self, ty: Ty) -> Reg {
        self.kernel.regs.push(ty);
        Reg(self.kernel.regs.len() as u32 - 1)
    }

    pub fn ty(&self, r: Reg) -> Ty {
        self.kernel.ty(r)
    }

    /// Appends an instruction.
    pub fn inst(&mut self, i: Inst) {
        if let Some(b) = self.blocks.last_mut() {
            b.push(Stmt::Inst(i));
        }
    }

    pub fn comment(&mut self, text: impl Into<String>) {
        if let Some(b) = self.blocks.last_mut() {
            b.push(Stmt::Comment(text.into()));
        }
    }

    // ------------------------------------------------------------------ parameters and specials

    /// A scalar parameter, loaded into a register.
    pub fn param(&mut self, ty: ParamTy, name: &str) -> Reg {
        let index = self.kernel.params.len() as u32;
        self.kernel.params.push(Param { name: name.to_string(), ty });
        let dst = self.reg(ty.ty());
        self.inst(Inst::LdParam { ty: ty.ty(), dst, param: index });
        dst
    }

    /// A pointer parameter, converted to a global address.
    pub fn param_ptr(&mut self, name: &str) -> Reg {
        let p = self.param(ParamTy::Ptr, name);
        let dst = self.reg(Ty::U64);
        self.inst(Inst::CvtaGlobal { dst, src: p });
        dst
    }

    pub fn special(&mut self, reg: Special) -> Reg {
        let dst = self.reg(Ty::U32);
        self.inst(Inst::Special { dst, reg });
        dst
    }

    /// `ctaid.x * ntid.x + tid.x`.
    pub fn global_index_x(&mut self) -> Reg {
        let c = self.special(Special::CtaidX);
        let n = self.special(Special::NtidX);
        let t = self.special(Special::TidX);
        self.mad(Ty::U32, c.into(), n.into(), t.into())
    }

    // ------------------------------------------------------------------ arithmetic

    pub fn mov(&mut self, ty: Ty, src: Operand) -> Reg {
        let dst = self.reg(ty);
        self.inst(Inst::Mov { ty, dst, src });
        dst
    }

    /// Assigns to an existing register (loop-carried values).
    pub fn assign(&mut self, dst: Reg, src: Operand) {
        let ty = self.ty(dst);
        self.inst(Inst::Mov { ty, dst, src });
    }

    pub fn bin(&mut self, op: BinOp, ty: Ty, a: Operand, b: Operand) -> Reg {
        let rty = match (op, ty) {
            (BinOp::MulWide, Ty::U32) => Ty::U64,
            (BinOp::MulWide, Ty::S32) => Ty::S64,
            (BinOp::MulWide, Ty::U16) => Ty::U32,
            (BinOp::MulWide, Ty::S16) => Ty::S32,
            _ => ty,
        };
        let dst = self.reg(rty);
        self.inst(Inst::Bin { op, ty, dst, a, b });
        dst
    }

    /// `dst = op(dst, b)` in place (accumulators).
    pub fn bin_into(&mut self, op: BinOp, dst: Reg, b: Operand) {
        let ty = self.ty(dst);
        self.inst(Inst::Bin { op, ty, dst, a: dst.into(), b });
    }

    pub fn add(&mut self, ty: Ty, a: Operand, b: Operand) -> Reg {
        self.bin(BinOp::Add, ty, a, b)
    }

    pub fn mul(&mut self, ty: Ty, a: Operand, b: Operand) -> Reg {
        self.bin(BinOp::Mul, ty, a, b)
    }

    pub fn mad(&mut self, ty: Ty, a: Operand, b: Operand, c: Operand) -> Reg {
        let dst = self.reg(ty);
        self.inst(Inst::Mad { ty, dst, a, b, c });
        dst
    }

    /// `dst = a * b + dst` in place.
    pub fn mad_into(&mut self, dst: Reg, a: Operand, b: Operand) {
        let ty = self.ty(dst);
        self.inst(Inst::Mad { ty, dst, a, b, c: dst.into() });
    }

    pub fn un(&mut self, op: UnOp, ty: Ty, a: Operand) -> Reg {
        let dst = self.reg(ty);
        self.inst(Inst::Un { op, ty, dst, a });
        dst
    }

    pub fn setp(&mut self, cmp: Cmp, ty: Ty, a: Operand, b: Operand) -> Reg {
        let dst = self.reg(Ty::Pred);
        self.inst(Inst::Setp { cmp, ty, dst, a, b });
        dst
    }

    pub fn selp(&mut self, ty: Ty, a: Operand, b: Operand, p: Reg) -> Reg {
        let dst = self.reg(ty);
        self.inst(Inst::Selp { ty, dst, a, b, p });
        dst
    }

    pub fn cvt(&mut self, dst_ty: Ty, src_ty: Ty, src: Operand) -> Reg {
        let rnd = match (dst_ty.is_float(), src_ty.is_float()) {
            // Narrowing float conversions and int → float round to nearest; float → int truncates.
            (true, true) if dst_ty.bytes() < src_ty.bytes() => Some(Round::Nearest),
            (true, false) => Some(Round::Nearest),
            (false, true) => Some(Round::ZeroInt),
            _ => None,
        };
        let dst = self.reg(dst_ty);
        self.inst(Inst::Cvt { dst_ty, src_ty, rnd, dst, src });
        dst
    }

    /// Two f32 into one bf16x2 register, `lo` in the low half.
    pub fn pack_bf16x2(&mut self, lo: Operand, hi: Operand) -> Reg {
        let dst = self.reg(Ty::B32);
        self.inst(Inst::PackBf16x2 { dst, hi, lo });
        dst
    }

    /// The low and high 16-bit halves of a 32-bit register.
    pub fn unpack16(&mut self, src: Reg) -> (Reg, Reg) {
        let lo = self.reg(Ty::B16);
        let hi = self.reg(Ty::B16);
        self.inst(Inst::Unpack16 { lo, hi, src });
        (lo, hi)
    }

    /// A bf16 value (in a 16-bit register) widened to f32, exactly: its bits shifted up by 16.
    pub fn bf16_to_f32(&mut self, x: Reg) -> Reg {
        let w = self.cvt(Ty::U32, Ty::U16, x.into());
        let s = self.bin(BinOp::Shl, Ty::B32, w.into(), 16u32.into());
        let f = self.reg(Ty::F32);
        self.inst(Inst::Mov { ty: Ty::B32, dst: f, src: s.into() });
        f
    }

    /// `base + index * elem_bytes` as a 64-bit global address (`index` a u32 register).
    pub fn index(&mut self, base: Reg, index: Reg, elem_bytes: u32) -> Reg {
        let off = self.bin(BinOp::MulWide, Ty::U32, index.into(), elem_bytes.into());
        self.add(Ty::U64, base.into(), off.into())
    }

    /// `base + index * elem_bytes` as a 32-bit shared address.
    pub fn index_shared(&mut self, base: Operand, index: Operand, elem_bytes: u32) -> Reg {
        self.mad(Ty::U32, index, elem_bytes.into(), base)
    }

    // ------------------------------------------------------------------ memory

    /// Loads one value.
    pub fn ld(&mut self, space: Space, ty: Ty, cache: Cache, addr: Operand, offset: i64) -> Reg {
        let dst = self.reg(ty);
        self.inst(Inst::Ld { space, ty, cache, dst: vec![dst], addr, offset });
        dst
    }

    /// Loads `n` consecutive values (`n` ∈ {2, 4}) with one vector access.
    pub fn ld_vec(&mut self, space: Space, ty: Ty, cache: Cache, addr: Operand, offset: i64, n: usize) -> Vec<Reg> {
        let dst: Vec<Reg> = (0..n).map(|_| self.reg(ty)).collect();
        self.inst(Inst::Ld { space, ty, cache, dst: dst.clone(), addr, offset });
        dst
    }

    pub fn st(&mut self, space: Space, ty: Ty, addr: Operand, offset: i64, value: Operand) {
        self.inst(Inst::St { space, ty, src: vec![value], addr, offset });
    }

    pub fn st_vec(&mut self, space: Space, ty: Ty, addr: Operand, offset: i64, values: Vec<Operand>) {
        self.inst(Inst::St { space, ty, src: values, addr, offset });
    }

    /// A static shared array of `bytes`, aligned to `align`; returns its index (`Operand::Shared`).
    pub fn shared(&mut self, name: &str, bytes: u32, align: u32) -> Operand {
        self.kernel.shared.push(SharedArray { name: name.to_string(), bytes, align });
        Operand::Shared(self.kernel.shared.len() as u32 - 1)
    }

    /// The dynamic shared memory (sized at launch).
    pub fn dynamic_shared(&mut self) -> Operand {
        self.kernel.dynamic_shared = true;
        Operand::DynShared
    }

    /// The 32-bit address of a shared operand, in a register.
    pub fn shared_addr(&mut self, s: Operand) -> Reg {
        self.mov(Ty::U32, s)
    }

    pub fn bar(&mut self) {
        self.inst(Inst::Bar);
    }

    pub fn shfl(&mut self, mode: ShflMode, src: Reg, lane: Operand) -> Reg {
        let dst = self.reg(self.ty(src));
        let clamp = if mode == ShflMode::Up { 0 } else { 0x1f };
        self.inst(Inst::Shfl { mode, dst, src, lane, clamp });
        dst
    }

    pub fn vote(&mut self, mode: VoteMode, src: Reg) -> Reg {
        let dst = self.reg(if mode == VoteMode::Ballot { Ty::B32 } else { Ty::Pred });
        self.inst(Inst::Vote { mode, dst, src });
        dst
    }

    /// `atom` returning the old value.
    pub fn atom(&mut self, op: AtomOp, space: Space, ty: Ty, addr: Operand, val: Operand) -> Reg {
        let dst = self.reg(ty);
        self.inst(Inst::Atom { op, space, ty, dst: Some(dst), addr, val });
        dst
    }

    /// `red`: an atomic update without a result.
    pub fn red(&mut self, op: AtomOp, space: Space, ty: Ty, addr: Operand, val: Operand) {
        self.inst(Inst::Atom { op, space, ty, dst: None, addr, val });
    }

    /// A warp-wide reduction over lanes with `shfl.bfly` (offsets 16, 8, 4, 2, 1).
    pub fn warp_reduce(&mut self, op: BinOp, ty: Ty, x: Reg) -> Reg {
        let mut acc = x;
        for off in [16u32, 8, 4, 2, 1] {
            let other = self.shfl(ShflMode::Bfly, acc, off.into());
            acc = self.bin(op, ty, acc.into(), other.into());
        }
        acc
    }

    // ------------------------------------------------------------------ control flow

    fn block(&mut self, f: impl FnOnce(&mut Builder)) -> Vec<Stmt> {
        self.blocks.push(Vec::new());
        f(self);
        self.blocks.pop().unwrap_or_default()
    }

    fn push(&mut self, s: Stmt) {
        if let Some(b) = self.blocks.last_mut() {
            b.push(s);
        }
    }

    /// `if cond { then }` (divergent allowed).
    pub fn if_(&mut self, cond: Reg, then: impl FnOnce(&mut Builder)) {
        let then = self.block(then);
        self.push(Stmt::If { cond, negate: false, then, else_: Vec::new(), uniform: false });
    }

    /// `if cond { then } else { else_ }`.
    pub fn if_else(&mut self, cond: Reg, then: impl FnOnce(&mut Builder), else_: impl FnOnce(&mut Builder)) {
        let then = self.block(then);
        let else_ = self.block(else_);
        self.push(Stmt::If { cond, negate: false, then, else_, uniform: false });
    }

    /// `if cond { then }` where `cond` is the same for the whole block (may contain barriers).
    pub fn if_uniform(&mut self, cond: Reg, then: impl FnOnce(&mut Builder)) {
        let then = self.block(then);
        self.push(Stmt::If { cond, negate: false, then, else_: Vec::new(), uniform: true });
    }

    /// `for i = start; i < end; i += step { body(i) }` on a fresh register of type `ty`.
    pub fn for_(&mut self, ty: Ty, start: Operand, end: Operand, step: Operand, body: impl FnOnce(&mut Builder, Reg)) {
        let var = self.reg(ty);
        let body = self.block(|b| body(b, var));
        self.push(Stmt::For { ty, var, start, end, step, body, uniform: false });
    }

    /// A `for` whose bounds are the same for the whole block (may contain barriers).
    pub fn for_uniform(
        &mut self,
        ty: Ty,
        start: Operand,
        end: Operand,
        step: Operand,
        body: impl FnOnce(&mut Builder, Reg),
    ) {
        let var = self.reg(ty);
        let body = self.block(|b| body(b, var));
        self.push(Stmt::For { ty, var, start, end, step, body, uniform: true });
    }

    /// `loop { head (computes cond); if !cond break; body }`.
    pub fn while_(&mut self, head: impl FnOnce(&mut Builder) -> Reg, body: impl FnOnce(&mut Builder)) {
        let mut cond = Reg(0);
        let head = self.block(|b| cond = head(b));
        let body = self.block(body);
        self.push(Stmt::While { head, cond, body, uniform: false });
    }

    // ------------------------------------------------------------------ tensor cores and async copies

    /// `mma.sync.m16n8k16` bf16 × bf16 + f32 → f32 into fresh registers.
    pub fn mma(&mut self, a: [Reg; 4], b: [Reg; 2], c: [Reg; 4]) -> [Reg; 4] {
        let d = [self.reg(Ty::F32), self.reg(Ty::F32), self.reg(Ty::F32), self.reg(Ty::F32)];
        self.inst(Inst::Mma { d, a, b, c });
        d
    }

    /// `ldmatrix.x{n}[.trans]` into fresh b32 registers.
    pub fn ldmatrix(&mut self, n: usize, trans: bool, addr: Operand) -> Vec<Reg> {
        let dst: Vec<Reg> = (0..n).map(|_| self.reg(Ty::B32)).collect();
        self.inst(Inst::Ldmatrix { trans, dst: dst.clone(), addr });
        dst
    }

    pub fn cp_async(&mut self, dst: Operand, src: Operand, bytes: u32, src_bytes: Option<Operand>) {
        self.inst(Inst::CpAsync { dst, src, bytes, src_bytes });
    }

    pub fn cp_async_commit(&mut self) {
        self.inst(Inst::CpAsyncCommit);
    }

    pub fn cp_async_wait(&mut self, n: u32) {
        self.inst(Inst::CpAsyncWait { n });
    }

    /// Any other instruction a generator needs (loads with cache hints, atomics by name, ...).
    pub fn raw(&mut self, i: Inst) {
        self.inst(i);
    }

    /// Registers allocated so far.
    pub fn reg_count(&self) -> usize {
        self.kernel.regs.len()
    }
}
