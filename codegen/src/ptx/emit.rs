//! emit: the printer behind `write_string`. The body is written first (it allocates scratch
//! registers and records what each instruction needs of the target), then the header and the
//! declarations around it.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::names::{Namer, declared, reg_prefix};
use super::{Error, Options, Target, Version};
use crate::kir::print::{atom_name, bin_name, cmp_name, operand_text, shfl_name, un_name, vote_name};
use crate::kir::{
    AtomOp, BinOp, Cache, Inst, Kernel, Operand, ParamTy, Reg, Round, Space, Special, Stmt, Ty, UnOp, VoteMode,
};

/// Static shared memory a kernel may declare (ptxas: "0xc000 max").
const MAX_STATIC_SHARED: u32 = 0xc000;

pub(super) fn module(kernel: &Kernel, options: &Options) -> Result<String, Error> {
    let mut e = Emitter::new(kernel)?;
    e.stmts(&kernel.body, 0)?;
    e.line(0, "ret;");

    let target = match options.target {
        Target::Auto => e.needs.max(Target::Sm80),
        t if t < e.needs => {
            let at = e.needs_why.clone().unwrap_or_default();
            return Err(Error::Unsupported { kernel: kernel.name.clone(), at, needs: e.needs, target: t });
        }
        t => t,
    };
    let version = e.version.max(target.min_version());
    Ok(e.finish(target, version))
}

/// True for the untyped bit types.
fn is_bits(t: Ty) -> bool {
    matches!(t, Ty::B16 | Ty::B32 | Ty::B64)
}

fn is_int(t: Ty) -> bool {
    matches!(t, Ty::U16 | Ty::U32 | Ty::U64 | Ty::S16 | Ty::S32 | Ty::S64)
}

/// PTX's operand-type rule: the same type, a bit type and any type of its size, or two integer types
/// of one size.
fn agrees(a: Ty, b: Ty) -> bool {
    a == b
        || (a != Ty::Pred
            && b != Ty::Pred
            && a.bytes() == b.bytes()
            && (is_bits(a) || is_bits(b) || (is_int(a) && is_int(b))))
}

/// The bit type of a size.
fn bits_of(t: Ty) -> Ty {
    match t.bytes() {
        2 => Ty::B16,
        8 => Ty::B64,
        _ => Ty::B32,
    }
}

/// Integer spelling for arithmetic: bit types become unsigned (`add.b32` does not exist).
fn int_of(t: Ty) -> Ty {
    match t {
        Ty::B16 => Ty::U16,
        Ty::B32 => Ty::U32,
        Ty::B64 => Ty::U64,
        t => t,
    }
}

/// How data of type `t` moves (`mov`, `ld`, `st`, `selp`): 16-bit floats and packed pairs as bits.
fn data_of(t: Ty) -> Ty {
    match t {
        Ty::F16 | Ty::Bf16 => Ty::B16,
        Ty::F16x2 | Ty::Bf16x2 => Ty::B32,
        t => t,
    }
}

/// Floats PTX has no immediates for.
fn is_half(t: Ty) -> bool {
    matches!(t, Ty::F16 | Ty::Bf16 | Ty::F16x2 | Ty::Bf16x2)
}

fn fits(v: i64, bits: u32) -> bool {
    bits >= 64 || (-(1i64 << (bits - 1))..(1i64 << bits)).contains(&v)
}

struct Emitter<'k> {
    k: &'k Kernel,
    namer: Namer,
    kernel_name: String,
    params: Vec<String>,
    shared: Vec<String>,
    dyn_name: String,
    dyn_used: bool,
    /// The PTX name of every kir register.
    regs: Vec<String>,
    /// Registers declared per kir type: kir registers first, then scratch registers.
    counts: BTreeMap<Ty, u32>,
    body: String,
    labels: u32,
    /// The lowest target tier and version the body needs, and the first instruction that raised
    /// the tier.
    needs: Target,
    needs_why: Option<String>,
    version: Version,
    /// The statement being written, for error messages.
    at: Option<&'k Inst>,
}

impl<'k> Emitter<'k> {
    fn new(k: &'k Kernel) -> Result<Emitter<'k>, Error> {
        let mut namer = Namer::default();
        let kernel_name = namer.name(&k.name);
        let params = k.params.iter().map(|p| namer.name(&p.name)).collect();
        let shared = k.shared.iter().map(|s| namer.name(&s.name)).collect();
        let dyn_name = namer.name("dsmem");
        let mut counts = BTreeMap::new();
        let regs = k
            .regs
            .iter()
            .map(|&t| {
                let n = counts.entry(t).or_insert(0u32);
                *n += 1;
                format!("{}{}", reg_prefix(t), *n - 1)
            })
            .collect();
        let e = Emitter {
            k,
            namer,
            kernel_name,
            params,
            shared,
            dyn_name,
            dyn_used: k.dynamic_shared,
            regs,
            counts,
            body: String::new(),
            labels: 0,
            needs: Target::Sm80,
            needs_why: None,
            version: Target::Sm80.min_version(),
            at: None,
        };
        e.check_header()?;
        Ok(e)
    }

    fn check_header(&self) -> Result<(), Error> {
        for s in &self.k.shared {
            if s.bytes == 0 {
                return Err(self.malformed_at(format!("shared @{}", s.name), "a shared array of 0 bytes".into()));
            }
            if !s.align.is_power_of_two() {
                let reason = format!("alignment {} is not a power of two", s.align);
                return Err(self.malformed_at(format!("shared @{}", s.name), reason));
            }
        }
        let total = self.k.shared.iter().try_fold(0u32, |acc, s| acc.checked_add(s.bytes.next_multiple_of(s.align)));
        if total.is_none_or(|t| t > MAX_STATIC_SHARED) {
            let reason = format!(
                "static shared memory exceeds {MAX_STATIC_SHARED} bytes; use dynamic shared memory for larger tiles"
            );
            return Err(self.malformed_at("shared arrays".into(), reason));
        }
        if let Some(b) = self.k.block {
            let threads = b.iter().try_fold(1u32, |acc, &x| acc.checked_mul(x));
            if b.contains(&0) || threads.is_none_or(|t| t > 1024) {
                let reason = "a block has 1 to 1024 threads".to_string();
                return Err(self.malformed_at(format!("block {b:?}"), reason));
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ errors and requirements

    fn at_text(&self) -> String {
        match self.at {
            Some(i) => self.k.display_inst(i).to_string(),
            None => "kernel".to_string(),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> Error {
        self.malformed_at(self.at_text(), reason.into())
    }

    fn malformed_at(&self, at: String, reason: String) -> Error {
        Error::Malformed { kernel: self.k.name.clone(), at, reason }
    }

    /// Records that the current instruction needs `tier` and PTX `version`.
    fn need(&mut self, tier: Target, version: Version) {
        if tier > self.needs {
            self.needs = tier;
            self.needs_why = Some(self.at_text());
        }
        self.version = self.version.max(version);
    }

    fn need_sm90(&mut self) {
        self.need(Target::Sm90, Version(7, 8));
    }

    // ------------------------------------------------------------------ output

    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..=depth {
            self.body.push_str("    ");
        }
        self.body.push_str(text);
        self.body.push('\n');
    }

    fn label(&mut self, depth: usize, name: &str) {
        for _ in 0..depth {
            self.body.push_str("    ");
        }
        self.body.push_str(name);
        self.body.push_str(":\n");
    }

    fn comment(&mut self, depth: usize, text: &str) {
        for l in text.lines() {
            self.line(depth, &format!("// {}", ascii_comment(l)));
        }
    }

    /// A fresh label `$L<n>_<what>`.
    fn new_label(&mut self, n: u32, what: &str) -> String {
        self.namer.name(&format!("$L{n}_{what}"))
    }

    fn next_construct(&mut self) -> u32 {
        self.labels += 1;
        self.labels - 1
    }

    /// A scratch register of kir type `ty`.
    fn scratch(&mut self, ty: Ty) -> String {
        let n = self.counts.entry(ty).or_insert(0);
        *n += 1;
        format!("{}{}", reg_prefix(ty), *n - 1)
    }

    fn finish(self, target: Target, version: Version) -> String {
        let k = self.k;
        let mut out = String::new();
        let arch = target.arch().unwrap_or("sm_80");
        let _ = writeln!(out, ".version {version}\n.target {arch}\n.address_size 64\n");
        if self.dyn_used {
            let _ = writeln!(out, ".extern .shared .align 16 .b8 {}[];\n", self.dyn_name);
        }
        if self.kernel_name != k.name {
            let _ = writeln!(out, "// kir kernel \"{}\"", ascii_comment(&k.name));
        }
        for d in &k.doc {
            for l in d.lines() {
                let _ = writeln!(out, "// {}", ascii_comment(l));
            }
        }
        let _ = write!(out, ".visible .entry {}(", self.kernel_name);
        for (i, (p, name)) in k.params.iter().zip(&self.params).enumerate() {
            let sep = if i + 1 < k.params.len() { "," } else { "" };
            let _ = write!(out, "\n    .param .{} {name}{sep}", param_ty(p.ty).name());
        }
        out.push_str(if k.params.is_empty() { ")\n" } else { "\n)\n" });
        if let Some([x, y, z]) = k.block {
            // `.minnctapersm 1` with `.maxntid`: without it ptxas caps registers to fit more blocks
            // per SM than the kernel asks for, and spills.
            let _ = writeln!(out, ".maxntid {x}, {y}, {z}");
            out.push_str(".minnctapersm 1\n");
        }
        out.push_str("{\n");
        for (ty, n) in &self.counts {
            if *n > 0 {
                let _ = writeln!(out, "    .reg .{} {}<{n}>;", declared(*ty).name(), reg_prefix(*ty));
            }
        }
        for (s, name) in k.shared.iter().zip(&self.shared) {
            let _ = writeln!(out, "    .shared .align {} .b8 {name}[{}];", s.align, s.bytes);
        }
        out.push('\n');
        out.push_str(&self.body);
        out.push_str("}\n");
        out
    }

    // ------------------------------------------------------------------ operands

    fn reg_ty(&self, r: Reg) -> Result<Ty, Error> {
        match self.k.regs.get(r.0 as usize) {
            Some(t) => Ok(*t),
            None => Err(self.malformed(format!("register {r} is not declared (the kernel has {})", self.k.regs.len()))),
        }
    }

    /// The name of `r`, used by an instruction of kir type `kty` printed with PTX type `pty`.
    fn reg(&self, r: Reg, kty: Ty, pty: Ty) -> Result<String, Error> {
        let t = self.reg_ty(r)?;
        if !agrees(kty, t) || !agrees(pty, declared(t)) {
            let how = if kty == pty { String::new() } else { format!(" (written as .{})", pty.name()) };
            return Err(self.malformed(format!("register {r} is {t}, but the instruction uses it as {kty}{how}")));
        }
        Ok(self.regs[r.0 as usize].clone())
    }

    /// A predicate register.
    fn pred(&self, r: Reg) -> Result<String, Error> {
        self.reg(r, Ty::Pred, Ty::Pred)
    }

    /// An immediate in the type `pty`, or `None` when PTX has no immediates of that type.
    fn imm(&self, v: i64, pty: Ty) -> Result<Option<String>, Error> {
        let bits = pty.bytes() * 8;
        let fit = |b: u32| {
            if fits(v, b) {
                Ok(())
            } else {
                Err(self.malformed(format!("immediate {v} does not fit in .{}", pty.name())))
            }
        };
        Ok(Some(match pty {
            Ty::Pred => match v {
                0 | 1 => v.to_string(),
                _ => return Err(self.malformed(format!("immediate {v} is not a predicate (0 or 1)"))),
            },
            Ty::F32 => {
                fit(32)?;
                format!("0f{:08X}", v as u32)
            }
            Ty::F64 => format!("0d{:016X}", v as u64),
            t if is_half(t) => return Ok(None),
            t if is_bits(t) => {
                fit(bits)?;
                let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
                format!("{:#X}", (v as u64) & mask)
            }
            _ => {
                fit(bits)?;
                v.to_string()
            }
        }))
    }

    /// An f32 immediate in the type `pty` (its value for f64, its bit pattern for 32-bit types).
    fn imm_f32(&self, x: f32, pty: Ty) -> Result<String, Error> {
        match pty {
            Ty::F32 | Ty::B32 => Ok(format!("0f{:08X}", x.to_bits())),
            Ty::F64 => Ok(format!("0d{:016X}", f64::from(x).to_bits())),
            Ty::U32 | Ty::S32 => Ok(x.to_bits().to_string()),
            t => Err(self.malformed(format!("an f32 immediate ({x:?}) cannot be used as {t}"))),
        }
    }

    /// The shared-memory symbol an operand names.
    fn symbol(&mut self, op: &Operand) -> Result<Option<String>, Error> {
        match op {
            Operand::Shared(i) => match self.shared.get(*i as usize) {
                Some(n) => Ok(Some(n.clone())),
                None => Err(self.malformed(format!("shared array {i} is not declared"))),
            },
            Operand::DynShared => {
                self.dyn_used = true;
                Ok(Some(self.dyn_name.clone()))
            }
            _ => Ok(None),
        }
    }

    /// A source operand of an instruction of kir type `kty` printed with PTX type `pty`; values PTX
    /// wants in a register are moved into a scratch register first.
    fn src(&mut self, op: &Operand, kty: Ty, pty: Ty, depth: usize) -> Result<String, Error> {
        match op {
            Operand::Reg(r) => self.reg(*r, kty, pty),
            Operand::Imm(v) => match self.imm(*v, pty)? {
                Some(s) => Ok(s),
                None => {
                    let bits = data_of(kty);
                    let value = self.imm(*v, bits)?.unwrap_or_default();
                    let t = self.scratch(kty);
                    self.line(depth, &format!("mov.{} {t}, {value};", bits.name()));
                    Ok(t)
                }
            },
            Operand::F32(x) => self.imm_f32(*x, pty),
            Operand::Shared(_) | Operand::DynShared => {
                if !is_int(int_of(pty)) || pty.bytes() < 4 {
                    return Err(self.malformed(format!("a shared-memory address cannot be used as {kty}")));
                }
                let sym = self.symbol(op)?.unwrap_or_default();
                let t = self.scratch(if pty.bytes() == 8 { Ty::U64 } else { Ty::U32 });
                let mt = if pty.bytes() == 8 { "u64" } else { "u32" };
                self.line(depth, &format!("mov.{mt} {t}, {sym};"));
                Ok(t)
            }
        }
    }

    /// `[base+offset]` for an access to `space`.
    fn address(&mut self, addr: &Operand, offset: i64, space: Space, depth: usize) -> Result<String, Error> {
        let base = match (addr, space) {
            (Operand::Reg(r), _) => {
                let t = self.reg_ty(*r)?;
                let ok = match space {
                    Space::Global => t.bytes() == 8 && (is_int(t) || is_bits(t)),
                    Space::Shared => t.bytes() >= 4 && (is_int(t) || is_bits(t)),
                };
                if !ok {
                    let want = if space == Space::Global { "a 64-bit integer" } else { "a 32- or 64-bit integer" };
                    return Err(self.malformed(format!("address register {r} is {t}, not {want}")));
                }
                self.regs[r.0 as usize].clone()
            }
            (Operand::Shared(_) | Operand::DynShared, Space::Shared) => self.symbol(addr)?.unwrap_or_default(),
            (Operand::Shared(_) | Operand::DynShared, Space::Global) => {
                return Err(self.malformed("a shared-memory address used for a global access"));
            }
            (Operand::Imm(v), _) => {
                // PTX allows absolute addresses only in .local: move the address into a register.
                let ty = if space == Space::Global { Ty::U64 } else { Ty::U32 };
                let value = self.imm(*v, ty)?.unwrap_or_default();
                let t = self.scratch(ty);
                self.line(depth, &format!("mov.{} {t}, {value};", ty.name()));
                t
            }
            (Operand::F32(_), _) => return Err(self.malformed("an f32 immediate used as an address")),
        };
        if i32::try_from(offset).is_err() {
            return Err(self.malformed(format!("address offset {offset} does not fit in 32 bits")));
        }
        Ok(match offset {
            0 => format!("[{base}]"),
            o => format!("[{base}+{o}]"),
        })
    }

    // ------------------------------------------------------------------ statements

    fn stmts(&mut self, stmts: &'k [Stmt], depth: usize) -> Result<(), Error> {
        for s in stmts {
            self.stmt(s, depth)?;
        }
        Ok(())
    }

    fn bra(uniform: bool) -> &'static str {
        if uniform { "bra.uni" } else { "bra" }
    }

    fn stmt(&mut self, s: &'k Stmt, depth: usize) -> Result<(), Error> {
        match s {
            Stmt::Inst(i) => {
                self.at = Some(i);
                self.inst(i, depth)?;
                self.at = None;
            }
            Stmt::Comment(text) => self.comment(depth, text),
            Stmt::If { cond, negate, then, else_, uniform } => {
                let p = self.cond(*cond, "if")?;
                if then.is_empty() && else_.is_empty() {
                    return Ok(());
                }
                let n = self.next_construct();
                let bra = Self::bra(*uniform);
                // Branch around the part that does not run: `@!p` skips `then` when the condition is
                // false (negated again for `if !cond`).
                let (skip_then, skip_else) = if *negate { ("", "!") } else { ("!", "") };
                match (then.is_empty(), else_.is_empty()) {
                    (true, true) => {}
                    (false, true) => {
                        let end = self.new_label(n, "end");
                        self.line(depth, &format!("@{skip_then}{p} {bra} {end};"));
                        self.stmts(then, depth + 1)?;
                        self.label(depth, &end);
                    }
                    (true, false) => {
                        let end = self.new_label(n, "end");
                        self.line(depth, &format!("@{skip_else}{p} {bra} {end};"));
                        self.stmts(else_, depth + 1)?;
                        self.label(depth, &end);
                    }
                    (false, false) => {
                        let els = self.new_label(n, "else");
                        let end = self.new_label(n, "end");
                        self.line(depth, &format!("@{skip_then}{p} {bra} {els};"));
                        self.stmts(then, depth + 1)?;
                        self.line(depth + 1, &format!("bra.uni {end};"));
                        self.label(depth, &els);
                        self.stmts(else_, depth + 1)?;
                        self.label(depth, &end);
                    }
                }
            }
            Stmt::For { ty, var, start, end, step, body, uniform } => {
                let k = self.k;
                let at = || {
                    let (s, e, st) = (operand_text(k, start), operand_text(k, end), operand_text(k, step));
                    format!("for {var}: {ty} = {s}; {var} < {e}; {var} += {st}")
                };
                if !is_int(int_of(*ty)) {
                    return Err(self.malformed_at(at(), format!("the loop variable has type {ty}, not an integer")));
                }
                let pty = int_of(*ty);
                let v = self.reg(*var, *ty, pty).map_err(|e| self.retarget(e, at()))?;
                let s = self.src(start, *ty, pty, depth).map_err(|e| self.retarget(e, at()))?;
                self.line(depth, &format!("mov.{} {v}, {s};", pty.name()));
                let n = self.next_construct();
                let body_l = self.new_label(n, "body");
                let end_l = self.new_label(n, "end");
                let p = self.scratch(Ty::Pred);
                let bra = Self::bra(*uniform);
                let e = self.src(end, *ty, pty, depth).map_err(|e| self.retarget(e, at()))?;
                // A loop that provably runs once needs no test before the first iteration.
                let runs = matches!((start, end), (Operand::Imm(a), Operand::Imm(b)) if 0 <= *a && a < b);
                if !runs {
                    self.line(depth, &format!("setp.ge.{} {p}, {v}, {e};", pty.name()));
                    self.line(depth, &format!("@{p} {bra} {end_l};"));
                }
                self.label(depth, &body_l);
                self.stmts(body, depth + 1)?;
                let st = self.src(step, *ty, pty, depth + 1).map_err(|e| self.retarget(e, at()))?;
                self.line(depth + 1, &format!("add.{} {v}, {v}, {st};", pty.name()));
                let e = self.src(end, *ty, pty, depth + 1).map_err(|e| self.retarget(e, at()))?;
                self.line(depth + 1, &format!("setp.lt.{} {p}, {v}, {e};", pty.name()));
                self.line(depth + 1, &format!("@{p} {bra} {body_l};"));
                self.label(depth, &end_l);
            }
            Stmt::While { head, cond, body, uniform } => {
                let n = self.next_construct();
                let head_l = self.new_label(n, "head");
                let end_l = self.new_label(n, "end");
                self.label(depth, &head_l);
                self.stmts(head, depth + 1)?;
                let p = self.cond(*cond, "while")?;
                self.line(depth + 1, &format!("@!{p} {} {end_l};", Self::bra(*uniform)));
                self.stmts(body, depth + 1)?;
                self.line(depth + 1, &format!("bra.uni {head_l};"));
                self.label(depth, &end_l);
            }
        }
        Ok(())
    }

    /// The predicate of an `if` or `while`.
    fn cond(&self, r: Reg, what: &str) -> Result<String, Error> {
        let t = self.reg_ty(r).map_err(|e| self.retarget(e, format!("{what} {r}")))?;
        if t != Ty::Pred {
            let reason = format!("the condition {r} is {t}, not a predicate");
            return Err(self.malformed_at(format!("{what} {r}"), reason));
        }
        Ok(self.regs[r.0 as usize].clone())
    }

    /// The same error, pointing at a control-flow statement instead of an instruction.
    fn retarget(&self, e: Error, at: String) -> Error {
        match e {
            Error::Malformed { kernel, reason, .. } => Error::Malformed { kernel, at, reason },
            e => e,
        }
    }

    // ------------------------------------------------------------------ instructions

    fn inst(&mut self, i: &'k Inst, d: usize) -> Result<(), Error> {
        match i {
            Inst::Mov { ty, dst, src } => {
                let pty = data_of(*ty);
                let dn = self.reg(*dst, *ty, pty)?;
                let s = match src {
                    Operand::Shared(_) | Operand::DynShared => {
                        if !is_int(int_of(pty)) || pty.bytes() < 4 {
                            return Err(self.malformed(format!("a shared-memory address cannot be moved as {ty}")));
                        }
                        self.symbol(src)?.unwrap_or_default()
                    }
                    op => self.src(op, *ty, pty, d)?,
                };
                self.line(d, &format!("mov.{} {dn}, {s};", pty.name()));
            }
            Inst::Special { dst, reg } => {
                let dn = self.reg(*dst, Ty::U32, Ty::U32)?;
                match reg {
                    Special::WarpInBlock => {
                        self.line(d, &format!("mov.u32 {dn}, %tid.x;"));
                        self.line(d, &format!("shr.u32 {dn}, {dn}, 5;"));
                    }
                    r => self.line(d, &format!("mov.u32 {dn}, %{};", r.name())),
                }
            }
            Inst::LdParam { ty, dst, param } => {
                let Some(p) = self.k.params.get(*param as usize) else {
                    return Err(self.malformed(format!("parameter {param} is not declared")));
                };
                let pt = param_ty(p.ty);
                if !agrees(*ty, pt) {
                    return Err(self.malformed(format!("parameter `{}` is {pt}, read as {ty}", p.name)));
                }
                let dn = self.reg(*dst, *ty, *ty)?;
                let name = self.params[*param as usize].clone();
                self.line(d, &format!("ld.param.{} {dn}, [{name}];", ty.name()));
            }
            Inst::CvtaGlobal { dst, src } => {
                let dn = self.reg(*dst, Ty::U64, Ty::U64)?;
                let sn = self.reg(*src, Ty::U64, Ty::U64)?;
                self.line(d, &format!("cvta.to.global.u64 {dn}, {sn};"));
            }
            Inst::Bin { op, ty, dst, a, b } => self.bin(*op, *ty, *dst, a, b, d)?,
            Inst::Mad { ty, dst, a, b, c } => {
                let (opcode, pty) = match ty {
                    Ty::F32 | Ty::F64 | Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2 => ("fma.rn", *ty),
                    t if is_int(int_of(*t)) => ("mad.lo", int_of(*t)),
                    t => return Err(self.malformed(format!("mad on {t}"))),
                };
                let dn = self.reg(*dst, *ty, pty)?;
                let an = self.src(a, *ty, pty, d)?;
                let bn = self.src(b, *ty, pty, d)?;
                let cn = self.src(c, *ty, pty, d)?;
                self.line(d, &format!("{opcode}.{} {dn}, {an}, {bn}, {cn};", pty.name()));
            }
            Inst::Un { op, ty, dst, a } => self.un(*op, *ty, *dst, a, d)?,
            Inst::Setp { cmp, ty, dst, a, b } => {
                let pty = match ty {
                    Ty::F32 | Ty::F64 | Ty::F16 => *ty,
                    Ty::Bf16 => {
                        self.need_sm90();
                        *ty
                    }
                    t if is_int(int_of(*t)) => int_of(*t),
                    t => return Err(self.malformed(format!("setp on {t} (packed pairs give two predicates)"))),
                };
                let dn = self.pred(*dst)?;
                let an = self.src(a, *ty, pty, d)?;
                let bn = self.src(b, *ty, pty, d)?;
                self.line(d, &format!("setp.{}.{} {dn}, {an}, {bn};", cmp_name(*cmp), pty.name()));
            }
            Inst::Selp { ty, dst, a, b, p } => {
                if *ty == Ty::Pred {
                    return Err(self.malformed("selp on predicates"));
                }
                let pty = data_of(*ty);
                let dn = self.reg(*dst, *ty, pty)?;
                let an = self.src(a, *ty, pty, d)?;
                let bn = self.src(b, *ty, pty, d)?;
                let pn = self.pred(*p)?;
                self.line(d, &format!("selp.{} {dn}, {an}, {bn}, {pn};", pty.name()));
            }
            Inst::Cvt { dst_ty, src_ty, rnd, dst, src } => self.cvt(*dst_ty, *src_ty, *rnd, *dst, src, d)?,
            Inst::PackBf16x2 { dst, hi, lo } => {
                let dn = self.reg(*dst, Ty::Bf16x2, Ty::Bf16x2)?;
                let h = self.src(hi, Ty::F32, Ty::F32, d)?;
                let l = self.src(lo, Ty::F32, Ty::F32, d)?;
                // The first source goes to the upper half.
                self.line(d, &format!("cvt.rn.bf16x2.f32 {dn}, {h}, {l};"));
            }
            Inst::Pack16 { dst, lo, hi } => {
                let dn = self.reg(*dst, Ty::B32, Ty::B32)?;
                let (l, h) = self.halves(*lo, *hi)?;
                self.line(d, &format!("mov.b32 {dn}, {{{l}, {h}}};"));
            }
            Inst::Unpack16 { lo, hi, src } => {
                let sn = self.reg(*src, Ty::B32, Ty::B32)?;
                let (l, h) = self.halves(*lo, *hi)?;
                self.line(d, &format!("mov.b32 {{{l}, {h}}}, {sn};"));
            }
            Inst::Ld { space, ty, cache, dst, addr, offset } => {
                let pty = self.mem_ty(*ty, dst.len())?;
                let mut names = Vec::with_capacity(dst.len());
                for r in dst {
                    names.push(self.reg(*r, *ty, pty)?);
                }
                // ptxas wants one register type per vector: load the odd ones through scratch
                // registers of the first one's type.
                let first = self.reg_ty(dst[0])?;
                let mut moves = Vec::new();
                for (r, name) in dst.iter().zip(names.iter_mut()) {
                    if declared(self.reg_ty(*r)?) != declared(first) {
                        let t = self.scratch(first);
                        moves.push(format!("mov.{} {name}, {t};", bits_of(pty).name()));
                        *name = t;
                    }
                }
                let c = match (space, cache) {
                    (_, Cache::None) => "",
                    (Space::Global, Cache::ReadOnly) => ".nc",
                    (Space::Global, Cache::Stream) => {
                        self.need(Target::Sm80, Version(7, 4));
                        ".nc.L1::no_allocate"
                    }
                    (Space::Shared, _) => return Err(self.malformed("cache hints apply to global loads only")),
                };
                let a = self.address(addr, *offset, *space, d)?;
                let sp = space_name(*space);
                let (v, regs) = vector(&names);
                self.line(d, &format!("ld.{sp}{c}{v}.{} {regs}, {a};", pty.name()));
                for m in moves {
                    self.line(d, &m);
                }
            }
            Inst::St { space, ty, src, addr, offset } => {
                let pty = self.mem_ty(*ty, src.len())?;
                let mut names = Vec::with_capacity(src.len());
                for s in src {
                    names.push(self.src(s, *ty, pty, d)?);
                }
                // One register type per vector: move the odd ones into scratch registers of the
                // first register's type.
                let regs: Vec<Reg> =
                    src.iter().filter_map(|s| if let Operand::Reg(r) = s { Some(*r) } else { None }).collect();
                if let Some(&r0) = regs.first() {
                    let first = self.reg_ty(r0)?;
                    for (s, name) in src.iter().zip(names.iter_mut()) {
                        if let Operand::Reg(r) = s
                            && declared(self.reg_ty(*r)?) != declared(first)
                        {
                            let t = self.scratch(first);
                            self.line(d, &format!("mov.{} {t}, {name};", bits_of(pty).name()));
                            *name = t;
                        }
                    }
                }
                let a = self.address(addr, *offset, *space, d)?;
                let (v, vals) = vector(&names);
                self.line(d, &format!("st.{}{v}.{} {a}, {vals};", space_name(*space), pty.name()));
            }
            Inst::Bar => self.line(d, "bar.sync 0;"),
            Inst::Shfl { mode, dst, src, lane, clamp } => {
                let dn = self.reg(*dst, Ty::B32, Ty::B32)?;
                let sn = self.reg(*src, Ty::B32, Ty::B32)?;
                let ln = self.src(lane, Ty::U32, Ty::U32, d)?;
                let m = shfl_name(*mode);
                self.line(d, &format!("shfl.sync.{m}.b32 {dn}, {sn}, {ln}, {clamp:#x}, 0xffffffff;"));
            }
            Inst::Vote { mode, dst, src } => {
                let sn = self.pred(*src)?;
                let (dn, t) = match mode {
                    VoteMode::Ballot => (self.reg(*dst, Ty::B32, Ty::B32)?, "b32"),
                    VoteMode::All | VoteMode::Any => (self.pred(*dst)?, "pred"),
                };
                self.line(d, &format!("vote.sync.{}.{t} {dn}, {sn}, 0xffffffff;", vote_name(*mode)));
            }
            Inst::Atom { op, space, ty, dst, addr, val } => self.atom(*op, *space, *ty, *dst, addr, val, d)?,
            Inst::Mma { d: dd, a, b, c } => {
                let frag = |rs: &[Reg], acc: bool| -> Result<String, Error> {
                    let mut names = Vec::new();
                    for &r in rs {
                        if acc {
                            names.push(self.reg(r, Ty::F32, Ty::F32)?);
                        } else {
                            // ptxas wants `.b32` registers for the packed bf16 operands.
                            let t = self.reg_ty(r)?;
                            if !matches!(t, Ty::B32 | Ty::Bf16x2) {
                                return Err(self.malformed(format!("mma operand {r} is {t}, not b32 or bf16x2")));
                            }
                            names.push(self.regs[r.0 as usize].clone());
                        }
                    }
                    Ok(format!("{{{}}}", names.join(", ")))
                };
                let (dn, an, bn, cn) = (frag(dd, true)?, frag(a, false)?, frag(b, false)?, frag(c, true)?);
                self.line(d, &format!("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {dn}, {an}, {bn}, {cn};"));
            }
            Inst::Ldmatrix { trans, dst, addr } => {
                if !matches!(dst.len(), 1 | 2 | 4) {
                    return Err(self.malformed(format!("ldmatrix loads 1, 2 or 4 matrices, not {}", dst.len())));
                }
                let mut names = Vec::new();
                for r in dst {
                    names.push(self.reg(*r, Ty::B32, Ty::B32)?);
                }
                let a = self.address(addr, 0, Space::Shared, d)?;
                let t = if *trans { ".trans" } else { "" };
                let n = dst.len();
                let regs = names.join(", ");
                self.line(d, &format!("ldmatrix.sync.aligned.m8n8.x{n}{t}.shared.b16 {{{regs}}}, {a};"));
            }
            Inst::CpAsync { dst, src, bytes, src_bytes } => {
                let kind = match bytes {
                    16 => "cg",
                    4 | 8 => "ca",
                    n => return Err(self.malformed(format!("cp.async copies 4, 8 or 16 bytes, not {n}"))),
                };
                let dn = self.address(dst, 0, Space::Shared, d)?;
                let sn = self.address(src, 0, Space::Global, d)?;
                let tail = match src_bytes {
                    Some(n) => format!(", {}", self.src(n, Ty::U32, Ty::U32, d)?),
                    None => String::new(),
                };
                self.line(d, &format!("cp.async.{kind}.shared.global {dn}, {sn}, {bytes}{tail};"));
            }
            Inst::CpAsyncCommit => self.line(d, "cp.async.commit_group;"),
            Inst::CpAsyncWait { n } => self.line(d, &format!("cp.async.wait_group {n};")),
        }
        Ok(())
    }

    /// The two 16-bit halves of a `mov.b32` pack or unpack: any 16-bit registers of one PTX type.
    fn halves(&self, lo: Reg, hi: Reg) -> Result<(String, String), Error> {
        let l = self.reg(lo, Ty::B16, Ty::B16)?;
        let h = self.reg(hi, Ty::B16, Ty::B16)?;
        if declared(self.reg_ty(lo)?) != declared(self.reg_ty(hi)?) {
            return Err(self.malformed(format!("the halves {lo} and {hi} must have one type")));
        }
        Ok((l, h))
    }

    /// The type a load or store of `n` values of `ty` is written with.
    fn mem_ty(&self, ty: Ty, n: usize) -> Result<Ty, Error> {
        if ty == Ty::Pred {
            return Err(self.malformed("predicates cannot be loaded or stored"));
        }
        if !matches!(n, 1 | 2 | 4) {
            return Err(self.malformed(format!("a memory access moves 1, 2 or 4 values, not {n}")));
        }
        if n as u32 * ty.bytes() > 16 {
            return Err(
                self.malformed(format!("a vector access moves at most 16 bytes, not {}", n as u32 * ty.bytes()))
            );
        }
        Ok(data_of(ty))
    }

    fn bin(&mut self, op: BinOp, ty: Ty, dst: Reg, a: &Operand, b: &Operand, d: usize) -> Result<(), Error> {
        let float = ty.is_float();
        if ty == Ty::Pred && !matches!(op, BinOp::And | BinOp::Or | BinOp::Xor) {
            return Err(self.malformed(format!("{} on predicates", bin_name(op))));
        }
        if matches!(ty, Ty::Bf16 | Ty::Bf16x2) && matches!(op, BinOp::Add | BinOp::Sub | BinOp::Mul) {
            return self.bf16_arith(op, ty, dst, a, b, d);
        }
        let bad = || format!("{} on {ty}", bin_name(op));
        // (opcode, printed type, type of b, type of dst)
        let (opcode, pty, bty, dty) = match op {
            // `.rn` like kir's `mul.rn`: an add without a rounding modifier may be fused by ptxas
            // with a neighbouring multiply, and kir fuses only where it says `Mad` (so the sim and
            // the GPU round alike). bf16 was lowered above.
            BinOp::Add | BinOp::Sub if float => (format!("{}.rn", bin_name(op)), ty, ty, ty),
            BinOp::Add | BinOp::Sub => (bin_name(op).to_string(), int_of(ty), ty, ty),
            BinOp::Mul if float => ("mul.rn".to_string(), ty, ty, ty),
            BinOp::Mul => ("mul.lo".to_string(), int_of(ty), ty, ty),
            BinOp::MulHi if !float => ("mul.hi".to_string(), int_of(ty), ty, ty),
            BinOp::MulWide if !float && ty.bytes() <= 4 => {
                let wide = match int_of(ty) {
                    Ty::U16 => Ty::U32,
                    Ty::S16 => Ty::S32,
                    Ty::U32 => Ty::U64,
                    _ => Ty::S64,
                };
                ("mul.wide".to_string(), int_of(ty), ty, wide)
            }
            BinOp::Div if matches!(ty, Ty::F32 | Ty::F64) => ("div.rn".to_string(), ty, ty, ty),
            BinOp::Div | BinOp::Rem if !float => (bin_name(op).to_string(), int_of(ty), ty, ty),
            BinOp::Min | BinOp::Max if float => (bin_name(op).to_string(), ty, ty, ty),
            BinOp::Min | BinOp::Max => (bin_name(op).to_string(), int_of(ty), ty, ty),
            BinOp::And | BinOp::Or | BinOp::Xor if ty == Ty::Pred => (bin_name(op).to_string(), ty, ty, ty),
            BinOp::And | BinOp::Or | BinOp::Xor => (bin_name(op).to_string(), bits_of(ty), ty, ty),
            BinOp::Shl if !float => ("shl".to_string(), bits_of(ty), Ty::U32, ty),
            BinOp::Shr if !float => ("shr".to_string(), ty, Ty::U32, ty),
            _ => return Err(self.malformed(bad())),
        };
        let dn = self.reg(dst, dty, if dty == ty { pty } else { dty })?;
        let an = self.src(a, ty, pty, d)?;
        let bn =
            if matches!(op, BinOp::Shl | BinOp::Shr) { self.src(b, bty, bty, d)? } else { self.src(b, ty, pty, d)? };
        self.line(d, &format!("{opcode}.{} {dn}, {an}, {bn};", pty.name()));
        Ok(())
    }

    /// bf16 add, sub and mul as one `fma.rn.bf16` (sm_80 has no `add.bf16`; the product with ±1 is
    /// exact and `x + -0 == x`, so the results are the correctly rounded ones).
    fn bf16_arith(&mut self, op: BinOp, ty: Ty, dst: Reg, a: &Operand, b: &Operand, d: usize) -> Result<(), Error> {
        let half = |bits: i64| if ty == Ty::Bf16x2 { bits << 16 | bits } else { bits };
        let dn = self.reg(dst, ty, ty)?;
        let an = self.src(a, ty, ty, d)?;
        let bn = self.src(b, ty, ty, d)?;
        let (x, y, z) = match op {
            // a * 1 + b
            BinOp::Add => (an, self.src(&Operand::Imm(half(0x3f80)), ty, ty, d)?, bn),
            // b * -1 + a
            BinOp::Sub => (bn, self.src(&Operand::Imm(half(0xbf80)), ty, ty, d)?, an),
            // a * b + -0
            _ => (an, bn, self.src(&Operand::Imm(half(0x8000)), ty, ty, d)?),
        };
        self.line(d, &format!("fma.rn.{} {dn}, {x}, {y}, {z};", ty.name()));
        Ok(())
    }

    fn un(&mut self, op: UnOp, ty: Ty, dst: Reg, a: &Operand, d: usize) -> Result<(), Error> {
        let bad = || format!("{} on {ty}", un_name(op));
        let (opcode, pty) = match (op, ty) {
            (UnOp::Neg, t) if t.is_float() => ("neg", t),
            (UnOp::Neg, t) if is_int(int_of(t)) => ("neg", signed_of(t)),
            (UnOp::Abs, t) if t.is_float() => ("abs", t),
            (UnOp::Abs, Ty::S16 | Ty::S32 | Ty::S64 | Ty::B16 | Ty::B32 | Ty::B64) => ("abs", signed_of(ty)),
            (UnOp::Not, Ty::Pred) => ("not", Ty::Pred),
            (UnOp::Not, t) if !t.is_float() => ("not", bits_of(t)),
            (UnOp::Sqrt, Ty::F32 | Ty::F64) => ("sqrt.rn", ty),
            (UnOp::RsqrtApprox, Ty::F32) => ("rsqrt.approx.ftz", ty),
            (UnOp::RsqrtApprox, Ty::F64) => ("rsqrt.approx", ty),
            (UnOp::RcpApprox, Ty::F32 | Ty::F64) => ("rcp.approx.ftz", ty),
            (UnOp::Rcp, Ty::F32 | Ty::F64) => ("rcp.rn", ty),
            (UnOp::Ex2Approx, Ty::F32) => ("ex2.approx.ftz", ty),
            (UnOp::Ex2Approx, Ty::F16 | Ty::F16x2) => ("ex2.approx", ty),
            (UnOp::Ex2Approx, Ty::Bf16 | Ty::Bf16x2) => {
                self.need_sm90();
                ("ex2.approx.ftz", ty)
            }
            (UnOp::Lg2Approx, Ty::F32) => ("lg2.approx.ftz", ty),
            (UnOp::TanhApprox, Ty::F32 | Ty::F16 | Ty::F16x2) => ("tanh.approx", ty),
            (UnOp::TanhApprox, Ty::Bf16 | Ty::Bf16x2) => {
                self.need_sm90();
                ("tanh.approx", ty)
            }
            _ => return Err(self.malformed(bad())),
        };
        let dn = self.reg(dst, ty, pty)?;
        let an = self.src(a, ty, pty, d)?;
        self.line(d, &format!("{opcode}.{} {dn}, {an};", pty.name()));
        Ok(())
    }

    fn cvt(&mut self, dt: Ty, st: Ty, rnd: Option<Round>, dst: Reg, src: &Operand, d: usize) -> Result<(), Error> {
        let (dp, sp) = (int_of(dt), int_of(st));
        for t in [dp, sp] {
            if t == Ty::Pred || matches!(t, Ty::F16x2 | Ty::Bf16x2) {
                return Err(self.malformed(format!("cvt has no {t} form (use pack.bf16x2 or pack16)")));
            }
        }
        let (df, sf) = (dt.is_float(), st.is_float());
        // The rounding PTX requires or allows: float results of narrowing or integer sources round
        // to nearest, integer results of float sources round toward zero (or to nearest integer),
        // float → float of one type may round to an integral value; exact conversions take none.
        let r = match (df, sf) {
            (false, false) => "",
            (true, false) => match rnd {
                Some(Round::Nearest) => ".rn",
                _ => return Err(self.malformed("an integer → float conversion rounds to nearest (.rn)")),
            },
            (false, true) => match rnd {
                Some(Round::ZeroInt) => ".rzi",
                Some(Round::Nearest) => ".rni",
                None => return Err(self.malformed("a float → integer conversion needs a rounding mode")),
            },
            (true, true) if dt == st => match rnd {
                Some(Round::ZeroInt) => ".rzi",
                _ => "",
            },
            (true, true) if dt.bytes() > st.bytes() => "",
            // f16 <-> bf16: PTX rounds to nearest with or without `.rn`.
            (true, true) if dt.bytes() == st.bytes() => match rnd {
                None => "",
                Some(Round::Nearest) => ".rn",
                Some(Round::ZeroInt) => return Err(self.malformed("f16 <-> bf16 conversions round to nearest")),
            },
            (true, true) => match rnd {
                Some(Round::Nearest) => ".rn",
                _ => return Err(self.malformed("a narrowing float conversion rounds to nearest (.rn)")),
            },
        };
        if dt == Ty::Bf16 || st == Ty::Bf16 {
            match (dt, st) {
                (Ty::Bf16, Ty::F32) => {}
                (Ty::F32, Ty::Bf16) => self.need(Target::Sm80, Version(7, 1)),
                _ => self.need_sm90(),
            }
        }
        let dn = self.reg(dst, dt, dp)?;
        let sn = self.src(src, st, sp, d)?;
        self.line(d, &format!("cvt{r}.{}.{} {dn}, {sn};", dp.name(), sp.name()));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn atom(
        &mut self,
        op: AtomOp,
        space: Space,
        ty: Ty,
        dst: Option<Reg>,
        addr: &Operand,
        val: &Operand,
        d: usize,
    ) -> Result<(), Error> {
        let bad = || format!("atomic {} on {ty}", atom_name(op));
        let (modifier, pty) = match (op, ty) {
            (AtomOp::Add, Ty::U32 | Ty::S32 | Ty::U64 | Ty::F32 | Ty::F64) => ("", ty),
            (AtomOp::Add, Ty::B32 | Ty::B64 | Ty::S64) => ("", int_of(bits_of(ty))),
            (AtomOp::Add, Ty::F16 | Ty::F16x2) => (".noftz", ty),
            (AtomOp::Add, Ty::Bf16 | Ty::Bf16x2) => {
                self.need_sm90();
                (".noftz", ty)
            }
            (AtomOp::Min | AtomOp::Max, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64) => ("", ty),
            (AtomOp::Min | AtomOp::Max, Ty::B32 | Ty::B64) => ("", int_of(ty)),
            (AtomOp::Exch, t) if t != Ty::Pred && t.bytes() >= 4 && !matches!(t, Ty::F16x2 | Ty::Bf16x2) => {
                ("", bits_of(t))
            }
            _ => return Err(self.malformed(bad())),
        };
        let o = atom_name(op);
        let sp = space_name(space);
        let v = self.src(val, ty, pty, d)?;
        let a = self.address(addr, 0, space, d)?;
        let dn = match dst {
            Some(r) => Some(self.reg(r, ty, pty)?),
            // `red` has no exchange: exchange into a scratch register.
            None if op == AtomOp::Exch => Some(self.scratch(ty)),
            None => None,
        };
        match dn {
            Some(dn) => self.line(d, &format!("atom.{sp}.{o}{modifier}.{} {dn}, {a}, {v};", pty.name())),
            None => self.line(d, &format!("red.{sp}.{o}{modifier}.{} {a}, {v};", pty.name())),
        }
        Ok(())
    }
}

/// `.vN` and `{a, b}` for a vector access, nothing and `a` for a scalar one.
fn vector(names: &[String]) -> (String, String) {
    match names {
        [one] => (String::new(), one.clone()),
        many => (format!(".v{}", many.len()), format!("{{{}}}", many.join(", "))),
    }
}

fn signed_of(t: Ty) -> Ty {
    match t.bytes() {
        2 => Ty::S16,
        8 => Ty::S64,
        _ => Ty::S32,
    }
}

fn space_name(s: Space) -> &'static str {
    match s {
        Space::Global => "global",
        Space::Shared => "shared",
    }
}

fn param_ty(t: ParamTy) -> Ty {
    t.ty()
}

/// Comment text ptxas accepts: ASCII only (it rejects any other byte, even in comments).
fn ascii_comment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' '..='~' => out.push(c),
            '\t' => out.push(' '),
            c if c.is_control() => out.push(' '),
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operand_type_rule() {
        assert!(agrees(Ty::F32, Ty::B32));
        assert!(agrees(Ty::U32, Ty::S32));
        assert!(!agrees(Ty::F32, Ty::U32));
        assert!(!agrees(Ty::Bf16x2, Ty::F32));
        assert!(!agrees(Ty::U64, Ty::U32));
        assert!(!agrees(Ty::Pred, Ty::B16));
    }

    #[test]
    fn comments_are_ascii() {
        assert_eq!(ascii_comment("x → y\té"), "x \\u{2192} y \\u{e9}");
    }

    #[test]
    fn immediate_ranges() {
        assert!(fits(-1, 32));
        assert!(fits(u32::MAX as i64, 32));
        assert!(!fits(1 << 32, 32));
        assert!(fits(i64::MIN, 64));
    }
}
