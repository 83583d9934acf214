//! clif: a launch plan's sequence → one CLIF function with the signature of `abi::EntryFn`.
//!
//! The function is straight-line code, one stretch per kernel, in launch order:
//! 1. entry: load B, T, S from `dims`; return `STATUS_BAD_DIMS` if one is negative; compute every
//!    monomial the sizes read (`B*T`, …) with `smul_overflow`, reusing shorter products; return
//!    `STATUS_OVERFLOW` if one overflowed; take the addresses of the launch record and the argument
//!    array (two stack slots) and store the record's fixed fields.
//! 2. per kernel: evaluate the grid (`smul_overflow`/`sadd_overflow`, flags or-ed), branch to the
//!    overflow exit on any flag, skip to the next kernel if a dimension is ≤ 0, evaluate the
//!    arguments (a buffer is `load bases[slot]` plus its arena offset), branch to the overflow or
//!    range exit, fill the record and `call_indirect` the launch entry; a non-zero status goes to
//!    the exit block, which returns it.
//!
//! Constant sizes are folded here (no instructions, no checks), so the common case, a kernel whose
//! grid and arguments do not depend on B, T, S, is a handful of stores and a call. The checks
//! mirror `plan::interpret` exactly (see `abi.rs` for the semantics).

use std::collections::BTreeMap;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{
    AbiParam, Block, BlockArg, Function, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Type,
    UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use flashc_compiler::gir::Dim;
use flashc_compiler::schedule::KernelId;

use super::abi;
use super::plan::{Arg, LaunchPlan, Mono, ONE, Phase, Poly};

/// The pointer type: the host schedule runs on 64-bit hosts only.
const PTR: Type = I64;

/// The signature of an entry function (`abi::EntryFn`).
pub fn entry_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.extend([AbiParam::new(PTR); 4]);
    sig.returns.push(AbiParam::new(I32));
    sig
}

/// The signature of the launch entry (`abi::LaunchFn`).
fn launch_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.extend([AbiParam::new(PTR); 2]);
    sig.returns.push(AbiParam::new(I32));
    sig
}

/// A built function and the block where each kernel's code starts.
pub struct Built {
    pub func: Function,
    pub kernels: Vec<(KernelId, Block)>,
}

/// Builds the entry function of one sequence of the plan.
pub fn build(plan: &LaunchPlan, phase: Phase, config: TargetFrontendConfig) -> Built {
    let call_conv = config.default_call_conv;
    let mut func = Function::with_name_signature(UserFuncName::testcase(phase.name()), entry_signature(call_conv));
    let mut fctx = FunctionBuilderContext::new();
    let b = FunctionBuilder::new(&mut func, &mut fctx);
    let mut g =
        Gen { b, monos: BTreeMap::new(), consts: BTreeMap::new(), ranges: BTreeMap::new(), polys: BTreeMap::new() };
    let kernels = g.sequence(plan, phase, call_conv);
    g.b.seal_all_blocks();
    g.b.finalize(config);
    Built { func, kernels }
}

/// A value known at compile time or computed at run time.
#[derive(Clone, Copy)]
enum Val {
    Const(i64),
    Var(Value),
}

/// A condition known at compile time or computed at run time (an `i8`, non-zero when true).
#[derive(Clone, Copy)]
enum Flag {
    False,
    True,
    Var(Value),
}

struct Gen<'a> {
    b: FunctionBuilder<'a>,
    /// The value of each monomial (including shorter products computed on the way).
    monos: BTreeMap<Mono, Value>,
    /// The constants defined in the current block, by type and value.
    consts: BTreeMap<(u32, i64), Value>,
    /// The range checks of the current kernel, by checked value.
    ranges: BTreeMap<Value, Value>,
    /// The sizes the current kernel has evaluated (their overflow flags are already accounted for).
    polys: BTreeMap<Dim, Value>,
}

fn trusted_readonly() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly()
}

impl Gen<'_> {
    fn sequence(&mut self, plan: &LaunchPlan, phase: Phase, call_conv: CallConv) -> Vec<(KernelId, Block)> {
        let seq = plan.sequence(phase);

        // Entry: the parameters, the dims check.
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.switch(entry);
        let params = self.b.block_params(entry).to_vec();
        let (dims, bases, ctx, launch) = (params[0], params[1], params[2], params[3]);
        let mut syms = [dims; 3];
        for (i, s) in syms.iter_mut().enumerate() {
            *s = self.b.ins().load(I64, trusted_readonly(), dims, abi::DIMS_OFFSETS[i]);
        }

        // The exits, laid out right after the entry block (and marked cold): `exit(status)`
        // returns the status, the others return the schedule's own statuses. `pending` stands in
        // for the next kernel's block in skip branches until that block exists (so that blocks
        // are numbered in layout order); it is never laid out.
        let exit = self.b.create_block();
        let status = self.b.append_block_param(exit, I32);
        let bad_dims = self.b.create_block();
        let overflow = self.b.create_block();
        let range = self.b.create_block();
        let pending = self.b.create_block();

        let mut negative = Flag::False;
        for s in syms {
            let f = self.cmp(IntCC::SignedLessThan, s, 0);
            negative = self.or(negative, f);
        }
        let body = self.b.create_block();
        self.branch(negative, bad_dims, body);

        self.switch(exit);
        self.b.ins().return_(&[status]);
        for (block, code) in
            [(bad_dims, abi::STATUS_BAD_DIMS), (overflow, abi::STATUS_OVERFLOW), (range, abi::STATUS_RANGE)]
        {
            self.switch(block);
            self.b.set_cold_block(block);
            let v = self.b.ins().iconst(I32, i64::from(code));
            self.b.ins().return_(&[v]);
        }
        self.b.set_cold_block(exit);

        // The monomials.
        self.switch(body);
        let mut ovf = Flag::False;
        for m in &seq.monomials {
            self.mono(*m, &syms, &mut ovf);
        }
        self.check(ovf, overflow);
        if seq.launches.is_empty() {
            let ok = self.iconst(I32, i64::from(abi::STATUS_OK));
            self.b.ins().return_(&[ok]);
            return Vec::new();
        }

        // The launch record, the argument array, the arena base.
        let record_slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            abi::RECORD_BYTES,
            abi::RECORD_ALIGN_SHIFT,
        ));
        let arg_bytes = (seq.max_args().max(1) as u32) * abi::ARG_BYTES as u32;
        let args_slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            arg_bytes,
            abi::ARGS_ALIGN_SHIFT,
        ));
        let record = self.b.ins().stack_addr(PTR, record_slot, 0);
        let args = self.b.ins().stack_addr(PTR, args_slot, 0);
        self.store(args, record, abi::RECORD_ARGS);
        let uses_arena = seq.launches.iter().flat_map(|l| &l.args).any(|a| matches!(a, Arg::Address { slot: 0, .. }));
        let arena = uses_arena.then(|| self.b.ins().load(I64, trusted_readonly(), bases, 0));
        let sig = self.b.import_signature(launch_signature(call_conv));

        let first = self.b.create_block();
        self.b.ins().jump(first, &[]);
        self.switch(first);
        let mut heads = Vec::with_capacity(seq.launches.len());
        for l in &seq.launches {
            let head = self.b.current_block().expect("a kernel starts in a block");
            heads.push((l.kernel, head));
            // A kernel's blocks form a chain, each dominating the next: its checks can be reused.
            self.ranges.clear();
            self.polys.clear();

            // The grid, and the skip rule.
            let mut ovf = Flag::False;
            let grid: Vec<Val> = l.grid.iter().map(|p| self.poly(p, &mut ovf)).collect();
            self.check(ovf, overflow);
            let mut skip = Flag::False;
            let mut range_flag = Flag::False;
            for g in &grid {
                let (s, r) = match *g {
                    Val::Const(c) => (bool_flag(c <= 0), bool_flag(c > i64::from(u32::MAX))),
                    Val::Var(v) => (self.cmp(IntCC::SignedLessThanOrEqual, v, 0), self.out_of_range(v)),
                };
                skip = self.or(skip, s);
                range_flag = self.or(range_flag, r);
            }
            if matches!(skip, Flag::True) {
                // Never launched: the grid is empty for every size.
                continue;
            }
            let skip_branch = match skip {
                Flag::Var(s) => {
                    let launch_block = self.b.create_block();
                    let inst = self.b.ins().brif(s, pending, &[], launch_block, &[]);
                    self.switch(launch_block);
                    Some(inst)
                }
                _ => None,
            };

            // The arguments.
            let mut ovf = Flag::False;
            let mut values = Vec::with_capacity(l.args.len());
            for a in &l.args {
                let v = match a {
                    Arg::Address { slot, offset, .. } => {
                        let base = match arena {
                            Some(base) if *slot == 0 => base,
                            _ => self.b.ins().load(I64, trusted_readonly(), bases, *slot as i32 * abi::BASE_BYTES),
                        };
                        match self.poly(offset, &mut ovf) {
                            Val::Const(0) => base,
                            Val::Const(c) => self.b.ins().iadd_imm_s(base, c),
                            Val::Var(o) => self.b.ins().iadd(base, o),
                        }
                    }
                    Arg::Size(p) => match self.poly(p, &mut ovf) {
                        Val::Const(c) => {
                            range_flag = self.or(range_flag, bool_flag(u32::try_from(c).is_err()));
                            self.iconst(I64, c)
                        }
                        Val::Var(v) => {
                            let r = self.out_of_range(v);
                            range_flag = self.or(range_flag, r);
                            v
                        }
                    },
                    Arg::Const(c) => self.iconst(I64, *c as i64),
                };
                values.push(v);
            }
            self.check(ovf, overflow);
            self.check(range_flag, range);

            // The record, the call, the status.
            let kernel = self.iconst(I32, i64::from(l.kernel.0));
            self.store(kernel, record, abi::RECORD_KERNEL);
            let part = self.iconst(I32, i64::from(l.part));
            self.store(part, record, abi::RECORD_PART);
            for (i, g) in grid.iter().enumerate() {
                let v = match *g {
                    // A constant out of the u32 range never reaches this store (the range check
                    // jumps to the error), but the dead store must still be a valid immediate.
                    Val::Const(c) => self.iconst(I32, i64::from(u32::try_from(c).unwrap_or(0))),
                    Val::Var(v) => self.b.ins().ireduce(I32, v),
                };
                self.store(v, record, abi::RECORD_GRID + 4 * i as i32);
            }
            for (i, x) in l.block.iter().enumerate() {
                let v = self.iconst(I32, i64::from(*x));
                self.store(v, record, abi::RECORD_BLOCK + 4 * i as i32);
            }
            let shared = self.iconst(I32, i64::from(l.shared));
            self.store(shared, record, abi::RECORD_SHARED);
            let nargs = self.iconst(I32, l.args.len() as i64);
            self.store(nargs, record, abi::RECORD_NARGS);
            for (i, v) in values.into_iter().enumerate() {
                self.store(v, args, i as i32 * abi::ARG_BYTES);
            }
            let call = self.b.ins().call_indirect(sig, launch, &[ctx, record]);
            let status = self.b.inst_results(call)[0];
            let next = self.b.create_block();
            self.b.ins().brif(status, exit, &[BlockArg::Value(status)], next, &[]);
            if let Some(inst) = skip_branch {
                self.b.change_jump_destination(inst, pending, next);
            }
            self.switch(next);
        }
        let ok = self.iconst(I32, i64::from(abi::STATUS_OK));
        self.b.ins().return_(&[ok]);
        heads
    }

    /// Switches to a block (constants are reused within a block only).
    fn switch(&mut self, block: Block) {
        self.b.switch_to_block(block);
        self.consts.clear();
    }

    /// `v <s/<=s/… c` as a flag.
    fn cmp(&mut self, cc: IntCC, v: Value, c: i64) -> Flag {
        let c = self.iconst(I64, c);
        Flag::Var(self.b.ins().icmp(cc, v, c))
    }

    /// Whether `v`, as unsigned, exceeds `u32::MAX` (computed once per kernel).
    fn out_of_range(&mut self, v: Value) -> Flag {
        if let Some(f) = self.ranges.get(&v) {
            return Flag::Var(*f);
        }
        let f = self.cmp(IntCC::UnsignedGreaterThan, v, i64::from(u32::MAX));
        if let Flag::Var(x) = f {
            self.ranges.insert(v, x);
        }
        f
    }

    /// A constant, defined once per block.
    fn iconst(&mut self, ty: Type, c: i64) -> Value {
        if let Some(v) = self.consts.get(&(ty.bits(), c)) {
            return *v;
        }
        let v = self.b.ins().iconst(ty, c);
        self.consts.insert((ty.bits(), c), v);
        v
    }

    fn store(&mut self, v: Value, ptr: Value, offset: i32) {
        self.b.ins().store(MemFlagsData::trusted(), v, ptr, offset);
    }

    /// Branches to `to` if `f` holds, else continues in a new block.
    fn check(&mut self, f: Flag, to: Block) {
        match f {
            Flag::False => {}
            Flag::True => {
                self.b.ins().jump(to, &[]);
                let dead = self.b.create_block();
                self.switch(dead);
            }
            Flag::Var(v) => {
                let go_on = self.b.create_block();
                self.b.ins().brif(v, to, &[], go_on, &[]);
                self.switch(go_on);
            }
        }
    }

    /// Ends the block: to `yes` if `f` holds, else to `no`.
    fn branch(&mut self, f: Flag, yes: Block, no: Block) {
        match f {
            Flag::False => self.b.ins().jump(no, &[]),
            Flag::True => self.b.ins().jump(yes, &[]),
            Flag::Var(v) => self.b.ins().brif(v, yes, &[], no, &[]),
        };
    }

    fn or(&mut self, a: Flag, b: Flag) -> Flag {
        match (a, b) {
            (Flag::True, _) | (_, Flag::True) => Flag::True,
            (Flag::False, x) | (x, Flag::False) => x,
            (Flag::Var(x), Flag::Var(y)) if x == y => Flag::Var(x),
            (Flag::Var(x), Flag::Var(y)) => Flag::Var(self.b.ins().bor(x, y)),
        }
    }

    /// The value of a monomial: its last factor times the product of the others (computed first,
    /// and reused), with the overflow flag or-ed into `ovf`.
    fn mono(&mut self, m: Mono, syms: &[Value; 3], ovf: &mut Flag) -> Value {
        if let Some(v) = self.monos.get(&m) {
            return *v;
        }
        let last = (0..3).rev().find(|i| m[*i] > 0).expect("the constant monomial is never computed");
        let mut prefix = m;
        prefix[last] -= 1;
        let v = if prefix == ONE {
            syms[last]
        } else {
            let p = self.mono(prefix, syms, ovf);
            let (v, o) = self.b.ins().smul_overflow(p, syms[last]);
            *ovf = self.or(*ovf, Flag::Var(o));
            v
        };
        self.monos.insert(m, v);
        v
    }

    /// The value of a polynomial (see `Poly`), with the overflow flags or-ed into `ovf`. A size the
    /// kernel has already evaluated is reused: its flags were or-ed into an earlier check, or into
    /// the same `ovf`.
    fn poly(&mut self, p: &Poly, ovf: &mut Flag) -> Val {
        if let Some(c) = p.as_const() {
            return Val::Const(c);
        }
        if let Some(v) = self.polys.get(&p.dim) {
            return Val::Var(*v);
        }
        let mut acc: Option<Val> = None;
        for t in &p.terms {
            let v = if t.mono == ONE {
                Val::Const(t.coef)
            } else {
                let m = *self.monos.get(&t.mono).expect("every monomial is computed at entry");
                if t.coef == 1 {
                    Val::Var(m)
                } else {
                    let c = self.iconst(I64, t.coef);
                    let (v, o) = self.b.ins().smul_overflow(m, c);
                    *ovf = self.or(*ovf, Flag::Var(o));
                    Val::Var(v)
                }
            };
            acc = Some(match acc {
                None => v,
                Some(a) => {
                    let x = self.materialize(a);
                    let y = self.materialize(v);
                    let (s, o) = self.b.ins().sadd_overflow(x, y);
                    *ovf = self.or(*ovf, Flag::Var(o));
                    Val::Var(s)
                }
            });
        }
        let v = acc.unwrap_or(Val::Const(0));
        if let Val::Var(x) = v {
            self.polys.insert(p.dim.clone(), x);
        }
        v
    }

    fn materialize(&mut self, v: Val) -> Value {
        match v {
            Val::Const(c) => self.iconst(I64, c),
            Val::Var(v) => v,
        }
    }
}

fn bool_flag(b: bool) -> Flag {
    if b { Flag::True } else { Flag::False }
}
