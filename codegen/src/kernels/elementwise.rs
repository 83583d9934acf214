//! elementwise: a fused chain of elementwise ops (a gir fused body of `add`, `mul`, `scale`, `silu`,
//! `softplus`, `exp`, `sigmoid`, `neg`, `relu2`, `gelu`, `swiglu`, `clamp`, `convert` and `reshape`)
//! → one kernel.
//!
//! **Iteration space.** The kernel walks the elements of the body's output 0 (every output must have
//! as many elements; outputs of other shapes are reshapes of the same elements). Each value of the body
//! is read at an index derived from the iteration index `i`: a *map* gives, for every dim of the value's
//! shape, the digit `(i / div) % mod` (or 0 for a broadcast or size-1 dim). Broadcasting (right-aligned,
//! size-1 dims stretch) selects digits; a `reshape` re-splits a contiguous run of digits. Smaller
//! operands (a bias `[D]`, a per-head factor `[H, 1]`) are therefore read in place, never expanded.
//!
//! **Tiling.** One-dimensional grid-stride loop: block of 256 threads, each thread handles `V`
//! consecutive elements per step, `V = 16 / (widest element size)` (8 for all-bf16, 4 when an f32 is
//! involved) when every access allows it: the innermost size of the output divides by `V` and every
//! operand either runs along the innermost dim (a vector load at a `V`-aligned index) or is constant
//! across the `V` elements (one scalar load, broadcast); otherwise smaller powers of two are tried, down
//! to scalar code. Vector accesses are 16 bytes (8 for bf16 operands of an f32-wide kernel); buffers
//! are assumed 16-byte aligned (the arena aligns to 256); indices are u32 (fewer than 2³² elements).
//! Grid: enough blocks for one step per thread (a polynomial upper bound over B, T, S); the loop
//! makes any grid correct.
//!
//! **Numerics.** Storage bf16 or f32 (f16 and i32 are rejected); all math in f32, intermediate values
//! stay f32 (only an explicit `convert` to bf16 rounds), outputs round to nearest even. `exp` is
//! `ex2.approx(x·log2 e)`, `sigmoid` is `1 / (1 + exp(−x))` (exact reciprocal), `gelu` is the tanh
//! form written as `x · sigmoid(2z)`, `softplus` is `max(x, 0) + log1p(exp(−|x|))` with an accurate
//! `log1p`; `clamp` keeps NaN (compare-and-select, like the cpu kernel).
//!
//! **Parameters.** The body's params (pointers, in index order), then its outputs (pointers), then the
//! sizes: `n` (elements / V, the loop bound) and any symbolic size a broadcast index needs (u32). In the
//! launch rule, `ArgRule::Buffer(BufferId(k))` names the kernel group's operand `k`, and operand count
//! plus `j` its result `j` (the caller substitutes the group's real buffers).
//!
//! The second half of this file holds helpers the other generators share: storage loads and stores
//! with f32 conversion, the math functions, block reductions and launch-size arithmetic.

use std::collections::{BTreeMap, BTreeSet};

use flashc_compiler::gir::{DType, Dim, Graph, Op, Value};
use flashc_compiler::schedule::BufferId;

use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Inst, Operand, ParamTy, Reg, Space, Special, Ty, UnOp};

/// Threads per block of the elementwise kernel.
pub const BLOCK: u32 = 256;

/// Generates one kernel for a fused elementwise body (see the module doc). `name` names the kernel.
pub fn fused_elementwise(body: &Graph, name: &str) -> Result<Generated, CodegenError> {
    let plan = Plan::new(body)?;
    let n = plan.n.clone();
    let mut b = Builder::new(name);
    declare_block(&mut b, BLOCK);
    b.doc(format!("fused elementwise `{}`: {} output(s) of {} elements", body.name, plan.outputs.len(), n));
    b.doc(format!("grid-stride loop, {BLOCK} threads, {} element(s) per thread and step", plan.v));
    let mut args = Args::default();
    let params: Vec<Reg> = (0..plan.param_elems.len()).map(|k| args.ptr(&mut b, &format!("p{k}"), k as u32)).collect();
    let first_out = plan.param_elems.len() as u32;
    let outs: Vec<Reg> =
        (0..plan.outputs.len()).map(|k| args.ptr(&mut b, &format!("out{k}"), first_out + k as u32)).collect();
    let nv = n.div_exact(i64::from(plan.v)).unwrap_or_else(|| n.clone());
    let nv_op = args.size(&mut b, "n", &nv);
    for (k, d) in plan.dims.iter().enumerate() {
        args.size(&mut b, &format!("s{k}"), d);
    }
    let gtid = b.global_index_x();
    let ntid = b.special(Special::NtidX);
    let nctaid = b.special(Special::NctaidX);
    let stride = b.mul(Ty::U32, ntid.into(), nctaid.into());
    let mut emit = Emit {
        plan: &plan,
        body,
        args: &args,
        params: &params,
        digits: BTreeMap::new(),
        flats: BTreeMap::new(),
        values: BTreeMap::new(),
        err: None,
    };
    b.for_(Ty::U32, gtid.into(), nv_op, stride.into(), |b, j| {
        let i = if plan.v > 1 { b.bin(BinOp::Shl, Ty::U32, j.into(), plan.v.trailing_zeros().into()) } else { j };
        for (k, (value, elem)) in plan.outputs.iter().enumerate() {
            b.comment(format!("output {k}"));
            let map = Map::natural(&emit.shape(*value));
            let lanes = emit.eval(b, *value, &map, i);
            let lanes = splat(&lanes, plan.v as usize);
            let addr = b.index(outs[k], i, elem.bytes());
            store(b, *elem, addr, 0, &lanes);
        }
        emit.digits.clear();
        emit.flats.clear();
        emit.values.clear();
    });
    if let Some(e) = emit.err {
        return Err(e);
    }
    let kernel = b.finish();
    let grid = blocks(&nv, i64::from(BLOCK));
    Ok(Generated {
        kernel,
        launch: LaunchRule { grid: grid3(grid), block: [BLOCK, 1, 1], dynamic_shared: 0, args: args.rules },
    })
}

// ---------------------------------------------------------------------------------------------------
// Index maps

/// One digit of an index: `(i / div) % modulo` (no modulo when the quotient is already in range).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Digit {
    div: Dim,
    modulo: Option<Dim>,
}

/// How a value's flat index follows from the iteration index: one digit per dim of `shape` (`None`:
/// the index along that dim is 0).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Map {
    shape: Vec<Dim>,
    digits: Vec<Option<Digit>>,
}

fn strides(shape: &[Dim]) -> Vec<Dim> {
    let mut s = vec![Dim::constant(1); shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1].mul(&shape[k + 1]);
    }
    s
}

fn one() -> Dim {
    Dim::constant(1)
}

impl Map {
    /// The row-major decomposition of `i` over `shape` (the value is read at flat index `i`).
    fn natural(shape: &[Dim]) -> Map {
        Map::natural_scaled(shape, &one(), false)
    }

    /// The row-major decomposition of `i / base` (modulo the element count when `top_mod`).
    fn natural_scaled(shape: &[Dim], base: &Dim, top_mod: bool) -> Map {
        let st = strides(shape);
        let first = shape.iter().position(|d| *d != one());
        let digits = (0..shape.len())
            .map(|k| {
                (shape[k] != one()).then(|| Digit {
                    div: base.mul(&st[k]),
                    modulo: if Some(k) == first && !top_mod { None } else { Some(shape[k].clone()) },
                })
            })
            .collect();
        Map { shape: shape.to_vec(), digits }
    }

    /// The map of an operand of shape `shape` broadcast (right-aligned) into this value.
    fn broadcast(&self, shape: &[Dim]) -> Option<Map> {
        let off = self.shape.len().checked_sub(shape.len())?;
        let digits =
            (0..shape.len()).map(|j| if shape[j] == one() { None } else { self.digits[off + j].clone() }).collect();
        Some(Map { shape: shape.to_vec(), digits })
    }

    /// The map of the operand of a reshape to this value: possible when this value's digits form one
    /// contiguous run (its flat index is `(i / base) % count`), which then re-splits over `shape`.
    fn reshape(&self, shape: &[Dim]) -> Option<Map> {
        let ks: Vec<usize> = (0..self.shape.len()).filter(|&k| self.shape[k] != one()).collect();
        if ks.iter().all(|&k| self.digits[k].is_none()) {
            return Some(Map { shape: shape.to_vec(), digits: vec![None; shape.len()] });
        }
        let ds: Vec<&Digit> = ks.iter().map(|&k| self.digits[k].as_ref()).collect::<Option<_>>()?;
        for w in 0..ds.len() - 1 {
            if ds[w].div != ds[w + 1].div.mul(&self.shape[ks[w + 1]]) {
                return None;
            }
            if ds[w + 1].modulo.as_ref() != Some(&self.shape[ks[w + 1]]) {
                return None;
            }
        }
        if ds[0].modulo.as_ref().is_some_and(|m| *m != self.shape[ks[0]]) {
            return None;
        }
        let base = ds[ds.len() - 1].div.clone();
        Some(Map::natural_scaled(shape, &base, ds[0].modulo.is_some()))
    }

    /// Whether the flat index is `i` itself (`n`: the elements of the iteration space; a value with
    /// fewer elements, e.g. a broadcast `[1]`, is never read at `i`).
    fn is_identity(&self, n: &Dim) -> bool {
        Dim::product(&self.shape) == *n && *self == Map::natural(&self.shape)
    }

    /// The non-constant sizes the index computation needs.
    fn dims(&self, n: &Dim, out: &mut BTreeSet<Dim>) {
        if self.is_identity(n) {
            return;
        }
        let st = strides(&self.shape);
        for (k, d) in self.digits.iter().enumerate() {
            let Some(d) = d else { continue };
            for x in [Some(&d.div), d.modulo.as_ref(), Some(&st[k])].into_iter().flatten() {
                if x.as_const().is_none() {
                    out.insert(x.clone());
                }
            }
        }
    }

    /// How `v` consecutive iteration indices (starting at a multiple of `v`) read this value:
    /// `Some(false)` all the same element, `Some(true)` `v` consecutive elements starting at a multiple
    /// of `v`, `None` neither.
    fn lanes(&self, v: i64) -> Option<bool> {
        if v == 1 {
            return Some(false);
        }
        let st = strides(&self.shape);
        let mut contiguous = false;
        for (k, d) in self.digits.iter().enumerate() {
            let Some(d) = d else { continue };
            if d.div == one() {
                if st[k] != one() {
                    return None;
                }
                if let Some(m) = &d.modulo {
                    m.div_exact(v)?;
                }
                contiguous = true;
            } else {
                d.div.div_exact(v)?;
            }
        }
        Some(contiguous)
    }
}

// ---------------------------------------------------------------------------------------------------
// Planning: which values are read at which maps, the sizes needed, the vector width

struct Plan {
    /// Elements of the iteration space.
    n: Dim,
    /// Elements per thread and step.
    v: u32,
    /// Storage of each param.
    param_elems: Vec<Elem>,
    /// Each output's value and storage.
    outputs: Vec<(Value, Elem)>,
    /// Symbolic sizes passed as parameters (after `n`).
    dims: Vec<Dim>,
}

impl Plan {
    fn new(body: &Graph) -> Result<Plan, CodegenError> {
        let unsupported = |s: String| CodegenError::Unsupported(s);
        let params = body.params();
        let param_elems: Vec<Elem> = params
            .iter()
            .enumerate()
            .map(|(k, t)| Elem::of(t.dtype, &format!("param {k}")))
            .collect::<Result<_, _>>()?;
        let outs = body.outputs();
        if outs.is_empty() {
            return Err(unsupported("an elementwise body without outputs".to_string()));
        }
        let ty = |v: Value| body.ty(v).map_err(|e| CodegenError::Shape(e.to_string()));
        let n = ty(outs[0].1)?.numel();
        let mut outputs = Vec::new();
        for (name, v) in outs {
            let t = ty(*v)?;
            if t.numel() != n {
                return Err(CodegenError::Shape(format!(
                    "output `{name}` has {} elements, output 0 has {n}: one kernel walks one index space",
                    t.numel()
                )));
            }
            outputs.push((*v, Elem::of(t.dtype, &format!("output `{name}`"))?));
        }
        // Every (value, map) the outputs read, and the loads among them.
        let mut seen: BTreeSet<(Value, Map)> = BTreeSet::new();
        let mut loads: Vec<Map> = Vec::new();
        let mut stack: Vec<(Value, Map)> =
            outputs.iter().map(|(v, _)| Ok((*v, Map::natural(&ty(*v)?.shape)))).collect::<Result<_, CodegenError>>()?;
        let mut dims = BTreeSet::new();
        while let Some((v, map)) = stack.pop() {
            if !seen.insert((v, map.clone())) {
                continue;
            }
            let op = body.op(v.node);
            let operands = body.operands(v.node);
            match op {
                Op::Input { role: flashc_compiler::gir::InputRole::Param, .. } => {
                    map.dims(&n, &mut dims);
                    loads.push(map.clone());
                    continue;
                }
                Op::Reshape { .. } => {
                    let src =
                        operands.first().copied().ok_or_else(|| unsupported("a reshape without operand".into()))?;
                    let m = map.reshape(&ty(src)?.shape).ok_or_else(|| {
                        unsupported(format!("reshape {} of a broadcast value (no contiguous index)", v.node))
                    })?;
                    stack.push((src, m));
                    continue;
                }
                Op::Convert { dtype } => {
                    Elem::of(*dtype, "convert target")?;
                }
                op if op.is_elementwise() => {}
                other => return Err(unsupported(format!("`{}` in an elementwise body", other.name()))),
            }
            for src in operands {
                let t = ty(src)?;
                Elem::of(t.dtype, &format!("operand of {}", v.node))?;
                let m = map.broadcast(&t.shape).ok_or_else(|| CodegenError::Shape(format!("{} broadcast", v.node)))?;
                stack.push((src, m));
            }
        }
        // The widest vector every access allows.
        let widest = param_elems.iter().chain(outputs.iter().map(|(_, e)| e)).map(|e| e.bytes()).max().unwrap_or(4);
        let mut v = 16 / widest;
        while v > 1 {
            let ok = n.div_exact(i64::from(v)).is_some()
                && loads.iter().all(|m| m.lanes(i64::from(v)).is_some())
                && outputs
                    .iter()
                    .all(|(val, _)| ty(*val).is_ok_and(|t| Map::natural(&t.shape).lanes(i64::from(v)) == Some(true)));
            if ok {
                break;
            }
            v /= 2;
        }
        Ok(Plan { n, v, param_elems, outputs, dims: dims.into_iter().collect() })
    }
}

// ---------------------------------------------------------------------------------------------------
// Emission

struct Emit<'a> {
    plan: &'a Plan,
    body: &'a Graph,
    args: &'a Args,
    params: &'a [Reg],
    digits: BTreeMap<Digit, Reg>,
    flats: BTreeMap<Map, Reg>,
    values: BTreeMap<(Value, Map), Vec<Reg>>,
    err: Option<CodegenError>,
}

impl Emit<'_> {
    fn shape(&self, v: Value) -> Vec<Dim> {
        self.body.ty(v).map(|t| t.shape.clone()).unwrap_or_default()
    }

    fn dim(&self, d: &Dim) -> Operand {
        self.args.operand(d)
    }

    fn digit(&mut self, b: &mut Builder, d: &Digit, i: Reg) -> Reg {
        if let Some(r) = self.digits.get(d) {
            return *r;
        }
        let q = if d.div == one() { i } else { udiv(b, i, &d.div, self.dim(&d.div)) };
        let r = match &d.modulo {
            None => q,
            Some(m) => urem(b, q, m, self.dim(m)),
        };
        self.digits.insert(d.clone(), r);
        r
    }

    /// The flat element index of a map at iteration index `i`.
    fn flat(&mut self, b: &mut Builder, map: &Map, i: Reg) -> Reg {
        if map.is_identity(&self.plan.n) {
            return i;
        }
        if let Some(r) = self.flats.get(map) {
            return *r;
        }
        let st = strides(&map.shape);
        let mut acc: Option<Reg> = None;
        for (k, d) in map.digits.iter().enumerate() {
            let Some(d) = d else { continue };
            let x = self.digit(b, d, i);
            let s = self.dim(&st[k]);
            acc = Some(match (acc, s) {
                (None, Operand::Imm(1)) => x,
                (None, s) => b.mul(Ty::U32, x.into(), s),
                (Some(a), Operand::Imm(1)) => b.add(Ty::U32, a.into(), x.into()),
                (Some(a), s) => b.mad(Ty::U32, x.into(), s, a.into()),
            });
        }
        let r = acc.unwrap_or_else(|| b.mov(Ty::U32, 0u32.into()));
        self.flats.insert(map.clone(), r);
        r
    }

    /// The value `v` read at `map`: `V` lane registers (f32), or one when all lanes agree.
    fn eval(&mut self, b: &mut Builder, v: Value, map: &Map, i: Reg) -> Vec<Reg> {
        if let Some(r) = self.values.get(&(v, map.clone())) {
            return r.clone();
        }
        let op = self.body.op(v.node).clone();
        let operands = self.body.operands(v.node);
        let lanes_v = self.plan.v as usize;
        let result: Vec<Reg> = match &op {
            Op::Input { index, .. } => {
                let k = *index as usize;
                let (Some(&base), Some(&elem)) = (self.params.get(k), self.plan.param_elems.get(k)) else {
                    return self.fail(b, format!("param {k} out of range"));
                };
                let contiguous = map.lanes(i64::from(self.plan.v)) == Some(true);
                let flat = self.flat(b, map, i);
                let addr = b.index(base, flat, elem.bytes());
                load(b, elem, Cache::ReadOnly, addr, 0, if contiguous { lanes_v } else { 1 })
            }
            Op::Reshape { .. } => {
                let Some(src) = operands.first().copied() else { return self.fail(b, "reshape".into()) };
                let Some(m) = map.reshape(&self.shape(src)) else { return self.fail(b, "reshape map".into()) };
                self.eval(b, src, &m, i)
            }
            _ => {
                let mut ins = Vec::new();
                for src in &operands {
                    let Some(m) = map.broadcast(&self.shape(*src)) else { return self.fail(b, "broadcast".into()) };
                    ins.push(self.eval(b, *src, &m, i));
                }
                let width = ins.iter().map(Vec::len).max().unwrap_or(1);
                let ins: Vec<Vec<Reg>> = ins.iter().map(|x| splat(x, width)).collect();
                let mut out = Vec::with_capacity(width);
                for l in 0..width {
                    let a = ins.first().map(|x| x[l]);
                    let c = ins.get(1).map(|x| x[l]);
                    match apply(b, &op, a, c) {
                        Some(r) => out.push(r),
                        None => return self.fail(b, format!("`{}` in an elementwise body", op.name())),
                    }
                }
                out
            }
        };
        self.values.insert((v, map.clone()), result.clone());
        result
    }

    fn fail(&mut self, b: &mut Builder, msg: String) -> Vec<Reg> {
        self.err.get_or_insert(CodegenError::Unsupported(msg));
        vec![b.mov(Ty::F32, 0.0f32.into())]
    }
}

/// One lane of an elementwise op on f32 registers (`None` for ops this file does not compute).
fn apply(b: &mut Builder, op: &Op, a: Option<Reg>, c: Option<Reg>) -> Option<Reg> {
    let x = a?;
    Some(match op {
        Op::Add => b.add(Ty::F32, x.into(), c?.into()),
        Op::Mul => b.mul(Ty::F32, x.into(), c?.into()),
        Op::Swiglu => {
            let s = silu(b, x);
            b.mul(Ty::F32, s.into(), c?.into())
        }
        Op::Scale { factor } => b.mul(Ty::F32, x.into(), (*factor as f32).into()),
        Op::Silu => silu(b, x),
        Op::Softplus => softplus(b, x),
        Op::Exp => exp(b, x),
        Op::Sigmoid => sigmoid(b, x),
        Op::Neg => b.un(UnOp::Neg, Ty::F32, x.into()),
        Op::Relu2 => {
            let r = b.bin(BinOp::Max, Ty::F32, x.into(), 0.0f32.into());
            b.mul(Ty::F32, r.into(), r.into())
        }
        Op::Gelu => gelu(b, x),
        Op::Clamp { min, max } => {
            let mut v = x;
            if let Some(lo) = min {
                let lo = *lo as f32;
                let p = b.setp(Cmp::Lt, Ty::F32, v.into(), lo.into());
                v = b.selp(Ty::F32, lo.into(), v.into(), p);
            }
            if let Some(hi) = max {
                let hi = *hi as f32;
                let p = b.setp(Cmp::Gt, Ty::F32, v.into(), hi.into());
                v = b.selp(Ty::F32, hi.into(), v.into(), p);
            }
            v
        }
        Op::Convert { dtype: DType::Bf16 } => round_bf16(b, x),
        Op::Convert { dtype: DType::F32 } => x,
        _ => return None,
    })
}

/// `lanes` widened to `n` registers (a single register repeated).
fn splat(lanes: &[Reg], n: usize) -> Vec<Reg> {
    if lanes.len() == 1 { vec![lanes[0]; n] } else { lanes.to_vec() }
}

// ===================================================================================================
// Helpers shared by the generators of this module.

/// The storage types the generators read and write (f32 math inside).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    Bf16,
    F32,
}

impl Elem {
    /// The storage of a float gir dtype (`f16` and `i32` are not supported).
    pub fn of(dtype: DType, what: &str) -> Result<Elem, CodegenError> {
        match dtype {
            DType::Bf16 => Ok(Elem::Bf16),
            DType::F32 => Ok(Elem::F32),
            other => Err(CodegenError::Unsupported(format!("{what} of type {} (bf16 and f32 only)", other.name()))),
        }
    }

    pub fn bytes(self) -> u32 {
        match self {
            Elem::Bf16 => 2,
            Elem::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F32 => "f32",
        }
    }
}

/// Whether the generated kernels declare their block size (`Kernel::block`, printed as `.maxntid`
/// with `.minnctapersm 1`, checked by the sim at launch).
pub const DECLARE_BLOCK: bool = true;

/// Records the block size a kernel is written for (see [`DECLARE_BLOCK`]).
pub(crate) fn declare_block(b: &mut Builder, threads: u32) {
    if DECLARE_BLOCK {
        b.block_size(threads, 1, 1);
    }
}

/// Kernel parameters with their launch rules, declared in order.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) rules: Vec<ArgRule>,
    sizes: BTreeMap<Dim, Reg>,
}

impl Args {
    /// A pointer parameter bound to buffer slot `slot` of the kernel group.
    pub(crate) fn ptr(&mut self, b: &mut Builder, name: &str, slot: u32) -> Reg {
        self.rules.push(ArgRule::Buffer(BufferId(slot)));
        b.param_ptr(name)
    }

    /// A size: an immediate when constant, else a u32 parameter (one per distinct size).
    pub(crate) fn size(&mut self, b: &mut Builder, name: &str, d: &Dim) -> Operand {
        if let Some(c) = d.as_const() {
            return Operand::Imm(c);
        }
        if let Some(r) = self.sizes.get(d) {
            return (*r).into();
        }
        self.rules.push(ArgRule::Size(d.clone()));
        let r = b.param(ParamTy::U32, name);
        self.sizes.insert(d.clone(), r);
        r.into()
    }

    /// A size already declared (or constant).
    pub(crate) fn operand(&self, d: &Dim) -> Operand {
        match d.as_const() {
            Some(c) => Operand::Imm(c),
            None => self.sizes.get(d).map_or(Operand::Imm(0), |r| (*r).into()),
        }
    }
}

/// Blocks for `n` work items at `per_block` per block: an upper bound of `⌈n / per_block⌉` for every
/// B, T, S ≥ 0 (each positive term rounded up on its own; negative terms dropped).
pub(crate) fn blocks(n: &Dim, per_block: i64) -> Dim {
    n.terms()
        .into_iter()
        .filter(|(_, c)| *c > 0)
        .fold(Dim::constant(0), |acc, (m, c)| acc.add(&m.scale((c + per_block - 1) / per_block)))
}

/// A 1-D grid.
pub(crate) fn grid3(x: Dim) -> [Dim; 3] {
    [x, Dim::constant(1), Dim::constant(1)]
}

/// `q = i / d` (u32): a shift for a constant power of two.
pub(crate) fn udiv(b: &mut Builder, i: Reg, d: &Dim, op: Operand) -> Reg {
    match d.as_const() {
        Some(c) if c > 0 && (c as u64).is_power_of_two() => {
            b.bin(BinOp::Shr, Ty::U32, i.into(), (c as u64).trailing_zeros().into())
        }
        _ => b.bin(BinOp::Div, Ty::U32, i.into(), op),
    }
}

/// `r = i % d` (u32): a mask for a constant power of two.
pub(crate) fn urem(b: &mut Builder, i: Reg, d: &Dim, op: Operand) -> Reg {
    match d.as_const() {
        Some(c) if c > 0 && (c as u64).is_power_of_two() => b.bin(BinOp::And, Ty::B32, i.into(), (c - 1).into()),
        _ => b.bin(BinOp::Rem, Ty::U32, i.into(), op),
    }
}

/// A 32-bit register's bits as an f32 register.
pub(crate) fn bits_f32(b: &mut Builder, r: Reg) -> Reg {
    let f = b.reg(Ty::F32);
    b.inst(Inst::Mov { ty: Ty::B32, dst: f, src: r.into() });
    f
}

/// An f32 register's bits as a b32 register.
pub(crate) fn f32_bits(b: &mut Builder, f: Reg) -> Reg {
    let r = b.reg(Ty::B32);
    b.inst(Inst::Mov { ty: Ty::B32, dst: r, src: f.into() });
    r
}

/// The two bf16 halves of a 32-bit word as f32 (low half first).
fn split_bf16x2(b: &mut Builder, w: Reg) -> [Reg; 2] {
    let lo = b.bin(BinOp::Shl, Ty::B32, w.into(), 16u32.into());
    let hi = b.bin(BinOp::And, Ty::B32, w.into(), 0xffff_0000u32.into());
    [bits_f32(b, lo), bits_f32(b, hi)]
}

/// Loads `n` consecutive elements (n ∈ {1, 2, 4, 8}) at `addr + offset` (aligned to their total size)
/// and widens them to f32.
pub(crate) fn load(b: &mut Builder, e: Elem, cache: Cache, addr: Reg, offset: i64, n: usize) -> Vec<Reg> {
    match (e, n) {
        (Elem::F32, 1) => vec![b.ld(Space::Global, Ty::F32, cache, addr.into(), offset)],
        (Elem::F32, 2 | 4) => b.ld_vec(Space::Global, Ty::F32, cache, addr.into(), offset, n),
        (Elem::F32, _) => {
            let mut v = b.ld_vec(Space::Global, Ty::F32, cache, addr.into(), offset, 4);
            v.extend(b.ld_vec(Space::Global, Ty::F32, cache, addr.into(), offset + 16, 4));
            v
        }
        (Elem::Bf16, 1) => {
            let h = b.ld(Space::Global, Ty::B16, cache, addr.into(), offset);
            vec![b.bf16_to_f32(h)]
        }
        (Elem::Bf16, _) => {
            let words = if n == 2 {
                vec![b.ld(Space::Global, Ty::B32, cache, addr.into(), offset)]
            } else {
                b.ld_vec(Space::Global, Ty::B32, cache, addr.into(), offset, n / 2)
            };
            words.into_iter().flat_map(|w| split_bf16x2(b, w)).collect()
        }
    }
}

/// Stores f32 values (1, 2, 4 or 8) as `e` at `addr + offset` (aligned to their total size), rounding
/// to nearest even.
pub(crate) fn store(b: &mut Builder, e: Elem, addr: Reg, offset: i64, vals: &[Reg]) {
    match (e, vals.len()) {
        (Elem::F32, 1) => b.st(Space::Global, Ty::F32, addr.into(), offset, vals[0].into()),
        (Elem::F32, 2 | 4) => {
            b.st_vec(Space::Global, Ty::F32, addr.into(), offset, vals.iter().map(|r| (*r).into()).collect())
        }
        (Elem::F32, _) => {
            for (k, chunk) in vals.chunks(4).enumerate() {
                let src = chunk.iter().map(|r| (*r).into()).collect();
                b.st_vec(Space::Global, Ty::F32, addr.into(), offset + 16 * k as i64, src);
            }
        }
        (Elem::Bf16, 1) => {
            let w = b.pack_bf16x2(vals[0].into(), 0.0f32.into());
            let (lo, _) = b.unpack16(w);
            b.st(Space::Global, Ty::B16, addr.into(), offset, lo.into());
        }
        (Elem::Bf16, _) => {
            let words: Vec<Operand> = vals
                .chunks(2)
                .map(|p| b.pack_bf16x2(p[0].into(), p.get(1).copied().unwrap_or(p[0]).into()).into())
                .collect();
            if words.len() == 1 {
                b.st(Space::Global, Ty::B32, addr.into(), offset, words[0]);
            } else {
                b.st_vec(Space::Global, Ty::B32, addr.into(), offset, words);
            }
        }
    }
}

/// `x` rounded to bf16 precision (nearest even), as f32.
pub(crate) fn round_bf16(b: &mut Builder, x: Reg) -> Reg {
    let w = b.pack_bf16x2(x.into(), 0.0f32.into());
    let s = b.bin(BinOp::Shl, Ty::B32, w.into(), 16u32.into());
    bits_f32(b, s)
}

pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const LN2: f32 = std::f32::consts::LN_2;

/// `eˣ` as `2^(x·log2 e)` (`ex2.approx.ftz`).
pub(crate) fn exp(b: &mut Builder, x: Reg) -> Reg {
    let t = b.mul(Ty::F32, x.into(), LOG2E.into());
    b.un(UnOp::Ex2Approx, Ty::F32, t.into())
}

/// `ln x` as `log2(x)·ln 2` (`lg2.approx.ftz`).
pub(crate) fn ln(b: &mut Builder, x: Reg) -> Reg {
    let l = b.un(UnOp::Lg2Approx, Ty::F32, x.into());
    b.mul(Ty::F32, l.into(), LN2.into())
}

/// `1 / (1 + e⁻ˣ)`: 0 for x → −∞ (e⁻ˣ = ∞), 1 for x → +∞.
pub(crate) fn sigmoid(b: &mut Builder, x: Reg) -> Reg {
    let t = b.mul(Ty::F32, x.into(), (-LOG2E).into());
    let e = b.un(UnOp::Ex2Approx, Ty::F32, t.into());
    let d = b.add(Ty::F32, e.into(), 1.0f32.into());
    b.un(UnOp::Rcp, Ty::F32, d.into())
}

/// `x · sigmoid(x)`.
pub(crate) fn silu(b: &mut Builder, x: Reg) -> Reg {
    let s = sigmoid(b, x);
    b.mul(Ty::F32, x.into(), s.into())
}

/// `max(x, 0) + log1p(e^−|x|)`, with `log1p(y) = ln(u)·y/(u − 1)` for `u = 1 + y ≠ 1` (else `y`).
pub(crate) fn softplus(b: &mut Builder, x: Reg) -> Reg {
    let a = b.un(UnOp::Abs, Ty::F32, x.into());
    let na = b.un(UnOp::Neg, Ty::F32, a.into());
    let y = exp(b, na);
    let u = b.add(Ty::F32, y.into(), 1.0f32.into());
    let lu = ln(b, u);
    let um1 = b.bin(BinOp::Sub, Ty::F32, u.into(), 1.0f32.into());
    let q = b.bin(BinOp::Div, Ty::F32, y.into(), um1.into());
    let l = b.mul(Ty::F32, lu.into(), q.into());
    let exact = b.setp(Cmp::Eq, Ty::F32, u.into(), 1.0f32.into());
    let l = b.selp(Ty::F32, y.into(), l.into(), exact);
    let m = b.bin(BinOp::Max, Ty::F32, x.into(), 0.0f32.into());
    b.add(Ty::F32, m.into(), l.into())
}

/// The tanh approximation of gelu, `0.5·x·(1 + tanh(z)) = x·sigmoid(2z)` with
/// `z = √(2/π)·(x + 0.044715·x³)`.
pub(crate) fn gelu(b: &mut Builder, x: Reg) -> Reg {
    let c = (2.0 / std::f64::consts::PI).sqrt() as f32;
    let x2 = b.mul(Ty::F32, x.into(), x.into());
    let x3 = b.mul(Ty::F32, x2.into(), x.into());
    let inner = b.mad(Ty::F32, x3.into(), 0.044715f32.into(), x.into());
    let z2 = b.mul(Ty::F32, inner.into(), (2.0 * c).into());
    let s = sigmoid(b, z2);
    b.mul(Ty::F32, x.into(), s.into())
}

/// Thread coordinates of a 1-D block.
pub(crate) struct Coords {
    pub tid: Reg,
    pub lane: Reg,
    pub warp: Reg,
}

pub(crate) fn coords(b: &mut Builder) -> Coords {
    let tid = b.special(Special::TidX);
    let lane = b.bin(BinOp::And, Ty::B32, tid.into(), 31u32.into());
    let warp = b.bin(BinOp::Shr, Ty::U32, tid.into(), 5u32.into());
    Coords { tid, lane, warp }
}

/// Reduces `x` over the block (`warps` warps): shuffles within each warp, then lane 0 of every warp
/// writes its partial to `red` (shared, `4·warps` bytes) and every thread combines the partials in warp
/// order (deterministic; every thread gets the result). Two barriers: one before the partials are read,
/// one after, so `red` can be reused at once. Must be reached by the whole block.
pub(crate) fn block_reduce(b: &mut Builder, op: BinOp, ty: Ty, x: Reg, red: Operand, warps: u32, c: &Coords) -> Reg {
    let w = b.warp_reduce(op, ty, x);
    if warps == 1 {
        return w;
    }
    let first = b.setp(Cmp::Eq, Ty::U32, c.lane.into(), 0u32.into());
    let addr = b.index_shared(red, c.warp.into(), 4);
    b.if_(first, |b| b.st(Space::Shared, ty, addr.into(), 0, w.into()));
    b.bar();
    let base = b.shared_addr(red);
    let mut acc = b.ld(Space::Shared, ty, Cache::None, base.into(), 0);
    for k in 1..warps {
        let p = b.ld(Space::Shared, ty, Cache::None, base.into(), 4 * i64::from(k));
        acc = b.bin(op, ty, acc.into(), p.into());
    }
    b.bar();
    acc
}

/// The largest power of two `≤ 16 / bytes` elements that divides `width`: the vector width of rows of
/// `width` elements whose starts stay aligned.
pub(crate) fn row_vector(width: u32, e: Elem) -> u32 {
    let mut v = 16 / e.bytes();
    while v > 1 && !width.is_multiple_of(v) {
        v /= 2;
    }
    v
}
