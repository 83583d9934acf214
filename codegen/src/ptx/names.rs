//! names: turns kir names (kernel, parameters, shared arrays) and generated labels into PTX
//! identifiers that ptxas accepts, and names virtual registers.
//!
//! A PTX identifier is `[a-zA-Z][a-zA-Z0-9_$]*` or `[_$][a-zA-Z0-9_$]+`. Every name of one module goes
//! through one `Namer`, so names are unique (parameters and shared arrays share a scope in ptxas, and
//! labels live there too). Opcodes, type and state-space words and predefined identifiers are never
//! emitted as names even where ptxas would accept them, so the text stays unambiguous to read.
//! Registers need no sanitising: they are `%` + a per-type prefix + an index.

use std::collections::BTreeSet;

use crate::kir::Ty;

/// Words a name is never allowed to be: PTX opcodes, type and state-space words, predefined
/// identifiers and the directive words without their dot.
const RESERVED: &[&str] = &[
    // Opcodes.
    "abs",
    "activemask",
    "add",
    "addc",
    "alloca",
    "and",
    "applypriority",
    "atom",
    "bar",
    "barrier",
    "bfe",
    "bfi",
    "bfind",
    "bmsk",
    "bra",
    "brev",
    "brkpt",
    "brx",
    "call",
    "clz",
    "cnot",
    "copysign",
    "cos",
    "cp",
    "createpolicy",
    "cvt",
    "cvta",
    "discard",
    "div",
    "dp2a",
    "dp4a",
    "elect",
    "ex2",
    "exit",
    "fence",
    "fma",
    "fns",
    "getctarank",
    "griddepcontrol",
    "isspacep",
    "istypeof",
    "ld",
    "ldmatrix",
    "ldu",
    "lg2",
    "lop3",
    "mad",
    "mad24",
    "madc",
    "mapa",
    "match",
    "max",
    "mbarrier",
    "membar",
    "min",
    "mma",
    "mov",
    "movmatrix",
    "mul",
    "mul24",
    "multimem",
    "nanosleep",
    "neg",
    "not",
    "or",
    "pmevent",
    "popc",
    "prefetch",
    "prefetchu",
    "prmt",
    "rcp",
    "red",
    "redux",
    "rem",
    "ret",
    "rsqrt",
    "sad",
    "selp",
    "set",
    "setmaxnreg",
    "setp",
    "shf",
    "shfl",
    "shl",
    "shr",
    "sin",
    "slct",
    "sqrt",
    "st",
    "stackrestore",
    "stacksave",
    "stmatrix",
    "sub",
    "subc",
    "suld",
    "suq",
    "sured",
    "sust",
    "szext",
    "tanh",
    "testp",
    "tex",
    "tld4",
    "trap",
    "txq",
    "vabsdiff",
    "vabsdiff2",
    "vabsdiff4",
    "vadd",
    "vadd2",
    "vadd4",
    "vavrg2",
    "vavrg4",
    "vmad",
    "vmax",
    "vmax2",
    "vmax4",
    "vmin",
    "vmin2",
    "vmin4",
    "vote",
    "vset",
    "vset2",
    "vset4",
    "vshl",
    "vshr",
    "vsub",
    "vsub2",
    "vsub4",
    "wgmma",
    "wmma",
    "xor",
    // Types.
    "pred",
    "b8",
    "b16",
    "b32",
    "b64",
    "b128",
    "u8",
    "u16",
    "u32",
    "u64",
    "s8",
    "s16",
    "s32",
    "s64",
    "f16",
    "f16x2",
    "bf16",
    "bf16x2",
    "tf32",
    "f32",
    "f64",
    "e4m3",
    "e5m2",
    "texref",
    "samplerref",
    "surfref",
    // State spaces and directive words.
    "reg",
    "sreg",
    "const",
    "global",
    "local",
    "param",
    "shared",
    "tex",
    "entry",
    "func",
    "version",
    "target",
    "address_size",
    "align",
    "extern",
    "visible",
    "weak",
    "common",
    "file",
    "loc",
    "section",
    "maxnreg",
    "maxntid",
    "reqntid",
    "minnctapersm",
    "maxnctapersm",
    "pragma",
    "callprototype",
    "calltargets",
    "branchtargets",
    // Predefined identifiers.
    "WARP_SZ",
];

/// Hands out unique, valid PTX identifiers.
#[derive(Debug, Default)]
pub struct Namer {
    taken: BTreeSet<String>,
}

impl Namer {
    /// A valid identifier for `wanted`, different from every name handed out before.
    pub fn name(&mut self, wanted: &str) -> String {
        let base = sanitize(wanted);
        let mut name = base.clone();
        let mut n = 1;
        while self.taken.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.taken.insert(name.clone());
        name
    }
}

/// Maps any string to a valid PTX identifier that is not a reserved word (not yet unique).
pub fn sanitize(wanted: &str) -> String {
    let mut s: String =
        wanted.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '$' { c } else { '_' }).collect();
    match s.chars().next() {
        None => s = "unnamed".to_string(),
        Some(c) if c.is_ascii_digit() => s.insert(0, '_'),
        // `_` and `$` may start a name only when something follows.
        Some('_' | '$') if s.len() == 1 => s.push('_'),
        _ => {}
    }
    if RESERVED.contains(&s.as_str()) {
        s.push('_');
    }
    s
}

/// The register-name prefix of a type (`%r` for `u32`, ...). Every prefix is letters only, so a
/// prefix followed by an index never spells another prefix's register.
pub fn reg_prefix(ty: Ty) -> &'static str {
    match ty {
        Ty::Pred => "%p",
        Ty::B16 => "%bh",
        Ty::B32 => "%b",
        Ty::B64 => "%bd",
        Ty::U16 => "%rh",
        Ty::U32 => "%r",
        Ty::U64 => "%rd",
        Ty::S16 => "%sh",
        Ty::S32 => "%s",
        Ty::S64 => "%sd",
        Ty::F16 => "%h",
        Ty::F16x2 => "%hh",
        Ty::Bf16 => "%hb",
        Ty::Bf16x2 => "%hhb",
        Ty::F32 => "%f",
        Ty::F64 => "%fd",
    }
}

/// The PTX type a register of kir type `ty` is declared with: PTX has no `.bf16`/`.bf16x2` register
/// types, so bf16 values live in `.b16` and `.b32` registers.
pub fn declared(ty: Ty) -> Ty {
    match ty {
        Ty::Bf16 => Ty::B16,
        Ty::Bf16x2 => Ty::B32,
        t => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_hostile_names() {
        assert_eq!(sanitize("add"), "add_");
        assert_eq!(sanitize("WARP_SZ"), "WARP_SZ_");
        assert_eq!(sanitize("1st"), "_1st");
        assert_eq!(sanitize(""), "unnamed");
        assert_eq!(sanitize("_"), "__");
        assert_eq!(sanitize("$"), "$_");
        assert_eq!(sanitize("naïve κ"), "na_ve__");
        assert_eq!(sanitize("%r1"), "_r1");
        assert_eq!(sanitize("a.b-c"), "a_b_c");
        assert_eq!(sanitize("$ok_1"), "$ok_1");
    }

    #[test]
    fn namer_is_unique() {
        let mut n = Namer::default();
        assert_eq!(n.name("x"), "x");
        assert_eq!(n.name("x"), "x_1");
        assert_eq!(n.name("x_1"), "x_1_1");
        assert_eq!(n.name("x"), "x_2");
        assert_eq!(n.name("ret"), "ret_");
        assert_eq!(n.name("ret_"), "ret__1");
    }
}
