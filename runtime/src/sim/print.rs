//! print: instructions and statement heads in a PTX-like form, for error messages.
//!
//! Registers print with a prefix by type (`%p` predicates, `%h` 16-bit, `%r` 32-bit integers, `%f`
//! f32, `%rd` 64-bit integers, `%fd` f64) followed by the kir register number, so `%f12` is `Reg(12)`.

use flashc_codegen::kir::print::{atom_name, cmp_name, shfl_name};
use flashc_codegen::kir::{BinOp, Cache, Inst, Kernel, Operand, Reg, Round, Space, Stmt, Ty, UnOp, VoteMode};

pub(crate) fn reg(k: &Kernel, r: Reg) -> String {
    let prefix = match k.ty(r) {
        Ty::Pred => "p",
        Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => "h",
        Ty::B32 | Ty::U32 | Ty::S32 | Ty::F16x2 | Ty::Bf16x2 => "r",
        Ty::F32 => "f",
        Ty::B64 | Ty::U64 | Ty::S64 => "rd",
        Ty::F64 => "fd",
    };
    format!("%{prefix}{}", r.0)
}

fn operand(k: &Kernel, o: &Operand) -> String {
    match o {
        Operand::Reg(r) => reg(k, *r),
        Operand::Imm(i) => i.to_string(),
        Operand::F32(x) => format!("0f{:08X}", x.to_bits()),
        Operand::Shared(i) => k.shared.get(*i as usize).map_or_else(|| format!("shared#{i}"), |s| s.name.clone()),
        Operand::DynShared => "dyn_smem".into(),
    }
}

fn regs(k: &Kernel, rs: &[Reg]) -> String {
    let v: Vec<String> = rs.iter().map(|r| reg(k, *r)).collect();
    format!("{{{}}}", v.join(", "))
}

fn space(s: Space) -> &'static str {
    match s {
        Space::Global => "global",
        Space::Shared => "shared",
    }
}

fn address(k: &Kernel, addr: &Operand, offset: i64) -> String {
    match offset {
        0 => format!("[{}]", operand(k, addr)),
        o if o > 0 => format!("[{}+{o}]", operand(k, addr)),
        o => format!("[{}{o}]", operand(k, addr)),
    }
}

fn bin_name(op: BinOp, ty: Ty) -> &'static str {
    match op {
        BinOp::Add => "add",
        BinOp::Sub => "sub",
        BinOp::Mul if ty.is_float() => "mul.rn",
        BinOp::Mul => "mul.lo",
        BinOp::MulHi => "mul.hi",
        BinOp::MulWide => "mul.wide",
        BinOp::Div if ty.is_float() => "div.rn",
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

fn un_name(op: UnOp) -> &'static str {
    match op {
        UnOp::Neg => "neg",
        UnOp::Abs => "abs",
        UnOp::Not => "not",
        UnOp::Sqrt => "sqrt.rn",
        UnOp::RsqrtApprox => "rsqrt.approx.ftz",
        UnOp::RcpApprox => "rcp.approx.ftz",
        UnOp::Rcp => "rcp.rn",
        UnOp::Ex2Approx => "ex2.approx.ftz",
        UnOp::Lg2Approx => "lg2.approx.ftz",
        UnOp::TanhApprox => "tanh.approx",
    }
}

/// One instruction, PTX-style.
pub(crate) fn inst(k: &Kernel, i: &Inst) -> String {
    let r = |x: &Reg| reg(k, *x);
    let o = |x: &Operand| operand(k, x);
    match i {
        Inst::Mov { ty, dst, src } => format!("mov.{} {}, {}", ty.name(), r(dst), o(src)),
        Inst::Special { dst, reg } => format!("mov.u32 {}, %{}", r(dst), reg.name()),
        Inst::LdParam { ty, dst, param } => {
            let name = k.params.get(*param as usize).map_or_else(|| format!("param#{param}"), |p| p.name.clone());
            format!("ld.param.{} {}, [{name}]", ty.name(), r(dst))
        }
        Inst::CvtaGlobal { dst, src } => format!("cvta.to.global.u64 {}, {}", r(dst), r(src)),
        Inst::Bin { op, ty, dst, a, b } => {
            format!("{}.{} {}, {}, {}", bin_name(*op, *ty), ty.name(), r(dst), o(a), o(b))
        }
        Inst::Mad { ty, dst, a, b, c } => {
            let name = if ty.is_float() { "fma.rn" } else { "mad.lo" };
            format!("{name}.{} {}, {}, {}, {}", ty.name(), r(dst), o(a), o(b), o(c))
        }
        Inst::Un { op, ty, dst, a } => format!("{}.{} {}, {}", un_name(*op), ty.name(), r(dst), o(a)),
        Inst::Setp { cmp, ty, dst, a, b } => {
            format!("setp.{}.{} {}, {}, {}", cmp_name(*cmp), ty.name(), r(dst), o(a), o(b))
        }
        Inst::Selp { ty, dst, a, b, p } => format!("selp.{} {}, {}, {}, {}", ty.name(), r(dst), o(a), o(b), r(p)),
        Inst::Cvt { dst_ty, src_ty, rnd, dst, src } => {
            let rnd = match rnd {
                Some(Round::Nearest) => ".rn",
                Some(Round::ZeroInt) => ".rzi",
                None => "",
            };
            format!("cvt{rnd}.{}.{} {}, {}", dst_ty.name(), src_ty.name(), r(dst), o(src))
        }
        Inst::PackBf16x2 { dst, hi, lo } => format!("cvt.rn.bf16x2.f32 {}, {}, {}", r(dst), o(hi), o(lo)),
        Inst::Pack16 { dst, lo, hi } => format!("mov.b32 {}, {{{}, {}}}", r(dst), r(lo), r(hi)),
        Inst::Unpack16 { lo, hi, src } => format!("mov.b32 {{{}, {}}}, {}", r(lo), r(hi), r(src)),
        Inst::Ld { space: s, ty, cache, dst, addr, offset } => {
            let cache = match cache {
                Cache::None => "",
                Cache::ReadOnly => ".nc",
                Cache::Stream => ".nc.L1::no_allocate",
            };
            let v = if dst.len() > 1 { format!(".v{}", dst.len()) } else { String::new() };
            let d = if dst.len() == 1 { r(&dst[0]) } else { regs(k, dst) };
            format!("ld.{}{cache}{v}.{} {d}, {}", space(*s), ty.name(), address(k, addr, *offset))
        }
        Inst::St { space: s, ty, src, addr, offset } => {
            let v = if src.len() > 1 { format!(".v{}", src.len()) } else { String::new() };
            let vals: Vec<String> = src.iter().map(o).collect();
            let vals = if src.len() == 1 { vals.join("") } else { format!("{{{}}}", vals.join(", ")) };
            format!("st.{}{v}.{} {}, {vals}", space(*s), ty.name(), address(k, addr, *offset))
        }
        Inst::Bar => "bar.sync 0".into(),
        Inst::Shfl { mode, dst, src, lane, clamp } => {
            let m = shfl_name(*mode);
            format!("shfl.sync.{m}.b32 {}, {}, {}, {clamp:#x}, 0xffffffff", r(dst), r(src), o(lane))
        }
        Inst::Vote { mode, dst, src } => {
            let m = match mode {
                VoteMode::All => "all.pred",
                VoteMode::Any => "any.pred",
                VoteMode::Ballot => "ballot.b32",
            };
            format!("vote.sync.{m} {}, {}, 0xffffffff", r(dst), r(src))
        }
        Inst::Atom { op, space: s, ty, dst, addr, val } => {
            let op = atom_name(*op);
            match dst {
                Some(d) => format!("atom.{}.{op}.{} {}, [{}], {}", space(*s), ty.name(), r(d), o(addr), o(val)),
                None => format!("red.{}.{op}.{} [{}], {}", space(*s), ty.name(), o(addr), o(val)),
            }
        }
        Inst::Mma { d, a, b, c } => format!(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {}, {}, {}, {}",
            regs(k, d),
            regs(k, a),
            regs(k, b),
            regs(k, c)
        ),
        Inst::Ldmatrix { trans, dst, addr } => format!(
            "ldmatrix.sync.aligned.m8n8.x{}{}.shared.b16 {}, [{}]",
            dst.len(),
            if *trans { ".trans" } else { "" },
            regs(k, dst),
            o(addr)
        ),
        Inst::CpAsync { dst, src, bytes, src_bytes } => {
            let kind = if *bytes == 16 { "cg" } else { "ca" };
            let sb = src_bytes.as_ref().map_or(String::new(), |s| format!(", {}", o(s)));
            format!("cp.async.{kind}.shared.global [{}], [{}], {bytes}{sb}", o(dst), o(src))
        }
        Inst::CpAsyncCommit => "cp.async.commit_group".into(),
        Inst::CpAsyncWait { n } => format!("cp.async.wait_group {n}"),
    }
}

/// The head of a control statement (`if`, `for`, `while`), for errors about its condition.
pub(crate) fn stmt_head(k: &Kernel, s: &Stmt) -> String {
    match s {
        Stmt::Inst(i) => inst(k, i),
        Stmt::Comment(c) => format!("// {c}"),
        Stmt::If { cond, negate, uniform, .. } => {
            format!("if{} {}{}", if *uniform { ".uni" } else { "" }, if *negate { "!" } else { "" }, reg(k, *cond))
        }
        Stmt::For { ty, var, start, end, step, uniform, .. } => format!(
            "for{}.{} {} = {}; {} < {}; {} += {}",
            if *uniform { ".uni" } else { "" },
            ty.name(),
            reg(k, *var),
            operand(k, start),
            reg(k, *var),
            operand(k, end),
            reg(k, *var),
            operand(k, step)
        ),
        Stmt::While { cond, uniform, .. } => {
            format!("while{} {}", if *uniform { ".uni" } else { "" }, reg(k, *cond))
        }
    }
}
