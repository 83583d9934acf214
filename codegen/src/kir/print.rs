//! print: the kir text dump (`flashc compile --emit kir`), in the builder's vocabulary.
//!
//! One statement per line, blocks indented by four spaces. Every register a statement writes is
//! shown with its type (`r7: f32 = ...`); registers it reads are just `r7`. Shared arrays are `@name`,
//! the dynamic shared memory `@dynamic`, parameters are read by name. The dump is for people: it is
//! not PTX and is not parsed back.
//!
//! ```text
//! kernel scale2(x: ptr, y: ptr, n: u32) {
//!     r0: u64 = param.u64 x
//!     r1: u64 = cvta.global r0
//!     ...
//!     if r10 {
//!         r13: f32 = ld.global.readonly.f32 [r12]
//!         ...
//!     }
//! }
//! ```

use std::fmt::{self, Display, Formatter, Write};

use super::{
    AtomOp, BinOp, Cache, Cmp, Inst, Kernel, Operand, ParamTy, Reg, Round, ShflMode, Space, Stmt, Ty, UnOp, VoteMode,
};

impl Display for Reg {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl Display for Ty {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Display for Kernel {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for line in &self.doc {
            writeln!(f, "// {line}")?;
        }
        write!(f, "kernel {}(", self.name)?;
        for (i, p) in self.params.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}", p.name, param_ty_name(p.ty))?;
        }
        f.write_str(")")?;
        if let Some([x, y, z]) = self.block {
            write!(f, " block({x}, {y}, {z})")?;
        }
        f.write_str(" {\n")?;
        let p = Printer { k: self };
        for s in &self.shared {
            writeln!(f, "    shared @{}: {} bytes, align {}", s.name, s.bytes, s.align)?;
        }
        if self.dynamic_shared {
            writeln!(f, "    shared @dynamic")?;
        }
        p.stmts(f, &self.body, 1)?;
        f.write_str("}\n")
    }
}

impl Kernel {
    /// One instruction as the dump prints it (for error messages that point into a kernel).
    pub fn display_inst<'a>(&'a self, inst: &'a Inst) -> impl Display + 'a {
        InstDisplay { k: self, inst }
    }
}

struct InstDisplay<'a> {
    k: &'a Kernel,
    inst: &'a Inst,
}

impl Display for InstDisplay<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        Printer { k: self.k }.inst(f, self.inst)
    }
}

fn param_ty_name(t: ParamTy) -> &'static str {
    match t {
        ParamTy::Ptr => "ptr",
        ParamTy::U32 => "u32",
        ParamTy::S32 => "s32",
        ParamTy::U64 => "u64",
        ParamTy::F32 => "f32",
    }
}

fn space_name(s: Space) -> &'static str {
    match s {
        Space::Global => "global",
        Space::Shared => "shared",
    }
}

/// The PTX base name of an operation (no type or rounding suffix); shared by the dump, the PTX
/// printer and the `sim` device's messages.
pub fn bin_name(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "add",
        BinOp::Sub => "sub",
        BinOp::Mul => "mul",
        BinOp::MulHi => "mul.hi",
        BinOp::MulWide => "mul.wide",
        BinOp::Div => "div",
        BinOp::Rem => "rem",
        BinOp::Min => "min",
        BinOp::Max => "max",
        BinOp::And => "and",
        BinOp::Or => "or",
        BinOp::Xor => "xor",
        BinOp::Shl => "shl",
        BinOp::Shr => "shr",
    }
}

pub fn un_name(op: UnOp) -> &'static str {
    match op {
        UnOp::Neg => "neg",
        UnOp::Abs => "abs",
        UnOp::Not => "not",
        UnOp::Sqrt => "sqrt",
        UnOp::RsqrtApprox => "rsqrt.approx",
        UnOp::RcpApprox => "rcp.approx",
        UnOp::Rcp => "rcp",
        UnOp::Ex2Approx => "ex2.approx",
        UnOp::Lg2Approx => "lg2.approx",
        UnOp::TanhApprox => "tanh.approx",
    }
}

pub fn cmp_name(c: Cmp) -> &'static str {
    match c {
        Cmp::Eq => "eq",
        Cmp::Ne => "ne",
        Cmp::Lt => "lt",
        Cmp::Le => "le",
        Cmp::Gt => "gt",
        Cmp::Ge => "ge",
    }
}

pub fn shfl_name(m: ShflMode) -> &'static str {
    match m {
        ShflMode::Bfly => "bfly",
        ShflMode::Down => "down",
        ShflMode::Up => "up",
        ShflMode::Idx => "idx",
    }
}

pub fn vote_name(m: VoteMode) -> &'static str {
    match m {
        VoteMode::All => "all",
        VoteMode::Any => "any",
        VoteMode::Ballot => "ballot",
    }
}

pub fn atom_name(op: AtomOp) -> &'static str {
    match op {
        AtomOp::Add => "add",
        AtomOp::Min => "min",
        AtomOp::Max => "max",
        AtomOp::Exch => "exch",
    }
}

/// An operand as the dump prints it.
pub(crate) fn operand_text(k: &Kernel, o: &Operand) -> String {
    Printer { k }.operand(o)
}

struct Printer<'k> {
    k: &'k Kernel,
}

impl Printer<'_> {
    fn stmts(&self, f: &mut Formatter<'_>, stmts: &[Stmt], depth: usize) -> fmt::Result {
        for s in stmts {
            self.stmt(f, s, depth)?;
        }
        Ok(())
    }

    fn stmt(&self, f: &mut Formatter<'_>, s: &Stmt, depth: usize) -> fmt::Result {
        let pad = "    ".repeat(depth);
        match s {
            Stmt::Inst(i) => {
                f.write_str(&pad)?;
                self.inst(f, i)?;
                f.write_char('\n')
            }
            Stmt::Comment(text) => {
                for line in text.lines() {
                    writeln!(f, "{pad}// {line}")?;
                }
                Ok(())
            }
            Stmt::If { cond, negate, then, else_, uniform } => {
                let u = if *uniform { "uniform " } else { "" };
                let n = if *negate { "!" } else { "" };
                writeln!(f, "{pad}if {u}{n}{cond} {{")?;
                self.stmts(f, then, depth + 1)?;
                if !else_.is_empty() {
                    writeln!(f, "{pad}}} else {{")?;
                    self.stmts(f, else_, depth + 1)?;
                }
                writeln!(f, "{pad}}}")
            }
            Stmt::For { ty, var, start, end, step, body, uniform } => {
                let u = if *uniform { "uniform " } else { "" };
                writeln!(
                    f,
                    "{pad}for {u}{var}: {ty} = {}; {var} < {}; {var} += {} {{",
                    self.operand(start),
                    self.operand(end),
                    self.operand(step)
                )?;
                self.stmts(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")
            }
            Stmt::While { head, cond, body, uniform } => {
                let u = if *uniform { " uniform" } else { "" };
                writeln!(f, "{pad}loop{u} {{")?;
                self.stmts(f, head, depth + 1)?;
                writeln!(f, "{pad}    break unless {cond}")?;
                self.stmts(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")
            }
        }
    }

    /// `r3: u32` for a register the statement writes.
    fn def(&self, r: Reg) -> String {
        match self.k.regs.get(r.0 as usize) {
            Some(t) => format!("{r}: {t}"),
            None => format!("{r}: ?"),
        }
    }

    fn defs(&self, rs: &[Reg]) -> String {
        rs.iter().map(|&r| self.def(r)).collect::<Vec<_>>().join(", ")
    }

    fn operand(&self, o: &Operand) -> String {
        match o {
            Operand::Reg(r) => r.to_string(),
            Operand::Imm(v) => v.to_string(),
            // `{:?}` keeps a `.` or an exponent, so a float never reads as an integer.
            Operand::F32(x) => format!("{x:?}"),
            Operand::Shared(i) => match self.k.shared.get(*i as usize) {
                Some(s) => format!("@{}", s.name),
                None => format!("@shared{i}"),
            },
            Operand::DynShared => "@dynamic".to_string(),
        }
    }

    fn operands(&self, os: &[Operand]) -> String {
        os.iter().map(|o| self.operand(o)).collect::<Vec<_>>().join(", ")
    }

    fn regs(rs: &[Reg]) -> String {
        rs.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
    }

    fn address(&self, addr: &Operand, offset: i64) -> String {
        match offset {
            0 => format!("[{}]", self.operand(addr)),
            o if o < 0 => format!("[{} - {}]", self.operand(addr), o.unsigned_abs()),
            o => format!("[{} + {o}]", self.operand(addr)),
        }
    }

    fn inst(&self, f: &mut Formatter<'_>, i: &Inst) -> fmt::Result {
        match i {
            Inst::Mov { ty, dst, src } => write!(f, "{} = mov.{ty} {}", self.def(*dst), self.operand(src)),
            Inst::Special { dst, reg } => write!(f, "{} = special {}", self.def(*dst), reg.name()),
            Inst::LdParam { ty, dst, param } => {
                let name = match self.k.params.get(*param as usize) {
                    Some(p) => p.name.clone(),
                    None => format!("#{param}"),
                };
                write!(f, "{} = param.{ty} {name}", self.def(*dst))
            }
            Inst::CvtaGlobal { dst, src } => write!(f, "{} = cvta.global {src}", self.def(*dst)),
            Inst::Bin { op, ty, dst, a, b } => {
                write!(f, "{} = {}.{ty} {}, {}", self.def(*dst), bin_name(*op), self.operand(a), self.operand(b))
            }
            Inst::Mad { ty, dst, a, b, c } => {
                write!(f, "{} = mad.{ty} {}, {}, {}", self.def(*dst), self.operand(a), self.operand(b), self.operand(c))
            }
            Inst::Un { op, ty, dst, a } => write!(f, "{} = {}.{ty} {}", self.def(*dst), un_name(*op), self.operand(a)),
            Inst::Setp { cmp, ty, dst, a, b } => {
                write!(f, "{} = setp.{}.{ty} {}, {}", self.def(*dst), cmp_name(*cmp), self.operand(a), self.operand(b))
            }
            Inst::Selp { ty, dst, a, b, p } => {
                write!(f, "{} = selp.{ty} {}, {}, {p}", self.def(*dst), self.operand(a), self.operand(b))
            }
            Inst::Cvt { dst_ty, src_ty, rnd, dst, src } => {
                let r = match rnd {
                    None => "",
                    Some(Round::Nearest) => ".rn",
                    Some(Round::ZeroInt) => ".rzi",
                };
                write!(f, "{} = cvt{r}.{dst_ty}.{src_ty} {}", self.def(*dst), self.operand(src))
            }
            Inst::PackBf16x2 { dst, hi, lo } => {
                write!(f, "{} = pack.bf16x2 lo {}, hi {}", self.def(*dst), self.operand(lo), self.operand(hi))
            }
            Inst::Pack16 { dst, lo, hi } => write!(f, "{} = pack16 lo {lo}, hi {hi}", self.def(*dst)),
            Inst::Unpack16 { lo, hi, src } => write!(f, "{}, {} = unpack16 {src}", self.def(*lo), self.def(*hi)),
            Inst::Ld { space, ty, cache, dst, addr, offset } => {
                let c = match cache {
                    Cache::None => "",
                    Cache::ReadOnly => ".readonly",
                    Cache::Stream => ".stream",
                };
                let v = if dst.len() > 1 { format!(".v{}", dst.len()) } else { String::new() };
                let a = self.address(addr, *offset);
                write!(f, "{} = ld.{}{c}{v}.{ty} {a}", self.defs(dst), space_name(*space))
            }
            Inst::St { space, ty, src, addr, offset } => {
                let v = if src.len() > 1 { format!(".v{}", src.len()) } else { String::new() };
                let a = self.address(addr, *offset);
                write!(f, "st.{}{v}.{ty} {a}, {}", space_name(*space), self.operands(src))
            }
            Inst::Bar => f.write_str("bar"),
            Inst::Shfl { mode, dst, src, lane, clamp } => write!(
                f,
                "{} = shfl.{} {src}, {}, clamp {clamp:#x}",
                self.def(*dst),
                shfl_name(*mode),
                self.operand(lane)
            ),
            Inst::Vote { mode, dst, src } => write!(f, "{} = vote.{} {src}", self.def(*dst), vote_name(*mode)),
            Inst::Atom { op, space, ty, dst, addr, val } => {
                let a = self.address(addr, 0);
                let (sp, o, v) = (space_name(*space), atom_name(*op), self.operand(val));
                match dst {
                    Some(d) => write!(f, "{} = atom.{sp}.{o}.{ty} {a}, {v}", self.def(*d)),
                    None => write!(f, "red.{sp}.{o}.{ty} {a}, {v}"),
                }
            }
            Inst::Mma { d, a, b, c } => write!(
                f,
                "{} = mma.m16n8k16.bf16 {{{}}}, {{{}}}, {{{}}}",
                self.defs(d),
                Self::regs(a),
                Self::regs(b),
                Self::regs(c)
            ),
            Inst::Ldmatrix { trans, dst, addr } => {
                let t = if *trans { ".trans" } else { "" };
                write!(f, "{} = ldmatrix.x{}{t} {}", self.defs(dst), dst.len(), self.address(addr, 0))
            }
            Inst::CpAsync { dst, src, bytes, src_bytes } => {
                write!(f, "cp.async {bytes} {}, {}", self.address(dst, 0), self.address(src, 0))?;
                match src_bytes {
                    Some(n) => write!(f, ", src_bytes {}", self.operand(n)),
                    None => Ok(()),
                }
            }
            Inst::CpAsyncCommit => f.write_str("cp.async.commit"),
            Inst::CpAsyncWait { n } => write!(f, "cp.async.wait {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kir::{Builder, Cache, Cmp, ParamTy, Space, Ty};

    #[test]
    fn prints_the_builder_example() {
        let mut b = Builder::new("scale2");
        b.doc("y = 2 x");
        let x = b.param_ptr("x");
        let y = b.param_ptr("y");
        let n = b.param(ParamTy::U32, "n");
        let i = b.global_index_x();
        let inside = b.setp(Cmp::Lt, Ty::U32, i.into(), n.into());
        b.if_(inside, |b| {
            let xa = b.index(x, i, 4);
            let v = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0);
            let w = b.mul(Ty::F32, v.into(), 2.0f32.into());
            let ya = b.index(y, i, 4);
            b.st(Space::Global, Ty::F32, ya.into(), -8, w.into());
        });
        let text = b.finish().to_string();
        let expected = "\
// y = 2 x
kernel scale2(x: ptr, y: ptr, n: u32) {
    r0: u64 = param.u64 x
    r1: u64 = cvta.global r0
    r2: u64 = param.u64 y
    r3: u64 = cvta.global r2
    r4: u32 = param.u32 n
    r5: u32 = special ctaid.x
    r6: u32 = special ntid.x
    r7: u32 = special tid.x
    r8: u32 = mad.u32 r5, r6, r7
    r9: pred = setp.lt.u32 r8, r4
    if r9 {
        r10: u64 = mul.wide.u32 r8, 4
        r11: u64 = add.u64 r1, r10
        r12: f32 = ld.global.readonly.f32 [r11]
        r13: f32 = mul.f32 r12, 2.0
        r14: u64 = mul.wide.u32 r8, 4
        r15: u64 = add.u64 r3, r14
        st.global.f32 [r15 - 8], r13
    }
}
";
        assert_eq!(text, expected);
    }

    #[test]
    fn prints_control_flow() {
        use crate::kir::{BinOp, Operand, Reg, Stmt};
        let mut b = Builder::new("flow");
        b.block_size(64, 1, 1);
        let s = b.shared("tile", 256, 16);
        let n = b.mov(Ty::U32, 4u32.into());
        b.for_uniform(Ty::U32, 0u32.into(), n.into(), 1u32.into(), |b, i| {
            b.bar();
            let a = b.index_shared(s, i.into(), 4);
            b.st(Space::Shared, Ty::F32, a.into(), 0, 1.5f32.into());
        });
        b.while_(
            |b| b.setp(Cmp::Gt, Ty::U32, n.into(), 0u32.into()),
            |b| {
                b.comment("count down");
                b.bin_into(BinOp::Sub, n, 1u32.into());
            },
        );
        let mut k = b.finish();
        k.body.push(Stmt::If {
            cond: Reg(3),
            negate: true,
            then: vec![],
            else_: vec![Stmt::Inst(crate::kir::Inst::Bar)],
            uniform: true,
        });
        k.body.push(Stmt::Inst(crate::kir::Inst::Mov { ty: Ty::F32, dst: Reg(9), src: Operand::DynShared }));
        let expected = "\
kernel flow() block(64, 1, 1) {
    shared @tile: 256 bytes, align 16
    r0: u32 = mov.u32 4
    for uniform r1: u32 = 0; r1 < r0; r1 += 1 {
        bar
        r2: u32 = mad.u32 r1, 4, @tile
        st.shared.f32 [r2], 1.5
    }
    loop {
        r3: pred = setp.gt.u32 r0, 0
        break unless r3
        // count down
        r0: u32 = sub.u32 r0, 1
    }
    if uniform !r3 {
    } else {
        bar
    }
    r9: ? = mov.f32 @dynamic
}
";
        assert_eq!(k.to_string(), expected);
    }
}
