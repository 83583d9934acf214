//! plan: a program's **launch plan**, what the host schedule does for each kernel, and a plain
//! interpreter of it (the reference the native schedule is tested against).
//!
//! For each kernel group, in order (prep kernels in the `prep` sequence, step kernels in `step`),
//! the plan holds the kernel id, the grid and block, the dynamic shared memory and the kernel's
//! arguments as expressions over the runtime sizes:
//! - a buffer's address: the base pointer of its storage *slot* plus the arena offset of its root
//!   (0 outside the arena). Slot 0 is the arena; every storage root outside it (input, state,
//!   weight, prepared weight) has a slot of its own, in buffer order. Views and in-place updates
//!   share their root's slot and offset.
//! - a size (a polynomial in B, T, S that must fit in a `u32`), or a constant.
//!
//! The kernel generators give a group its kernels' `LaunchRule`s (a group may be several kernels,
//! launched in order; the record's `part` says which) and the scratch buffers they use: each scratch
//! buffer gets a storage slot of its own (class `scratch`, with its size in bytes for the device to
//! allocate), after the program's slots. A group without generated rules gets the **default
//! launch**: one single-thread block per work item of its `Launch` (the reduction extents, such as
//! a matmul's `k` or a row's width, are left to the kernel), no shared memory, and as arguments its
//! input buffers, its output buffers, then every field of its `Launch` as a size:
//!
//! | launch | grid (x, y, z) | size arguments |
//! |---|---|---|
//! | `elements` | (n, 1, 1) | n |
//! | `rows` | (rows, 1, 1) | rows, width |
//! | `matmul` | (n, m, batch) | batch, m, n, k |
//! | `conv` | (channels, tokens, batch) | batch, tokens, channels, width |
//! | `attention` | (tokens, batch_heads, 1) | batch_heads, tokens, keys, head_dim |
//! | `scan` | (batch_heads, tokens, 1) | batch_heads, tokens, chunk, state |
//!
//! The semantics of running a sequence (checked arithmetic, the skip rule, the statuses) are those
//! of `abi.rs`; `interpret` implements them step by step and the native schedule must match it
//! launch for launch.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use flashc_compiler::gir::{Bindings, Dim, Mode};
use flashc_compiler::schedule::{BufferId, BufferKind, KernelGroup, KernelId, Launch, Program};

use super::abi::{Dims, Launched};
use super::{Error, RunError};
use crate::kernels::{ArgRule, LaunchRule};

/// The powers of B, T and S in a monomial.
pub type Mono = [u8; 3];

/// The constant monomial.
pub const ONE: Mono = [0, 0, 0];

/// One term of a polynomial: `coef × B^p0 × T^p1 × S^p2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    pub coef: i64,
    pub mono: Mono,
}

/// A size as the schedule evaluates it: the terms of a `Dim` in printed order (highest degree
/// first, the constant last). Its value is the checked sum, left to right, of its terms, each the
/// checked product of its coefficient and the value of its monomial (a coefficient of 1 is not
/// multiplied); no terms is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poly {
    pub dim: Dim,
    pub terms: Vec<Term>,
}

impl Poly {
    pub fn new(dim: &Dim) -> Poly {
        let terms = dim.terms().into_iter().map(|(m, coef)| Term { coef, mono: powers(&m) }).collect();
        Poly { dim: dim.clone(), terms }
    }

    pub fn constant(c: i64) -> Poly {
        Poly::new(&Dim::constant(c))
    }

    /// The value when the polynomial has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [t] if t.mono == ONE => Some(t.coef),
            _ => None,
        }
    }

    /// The monomials (other than the constant) that the polynomial reads.
    pub fn monomials(&self) -> impl Iterator<Item = Mono> + '_ {
        self.terms.iter().map(|t| t.mono).filter(|m| *m != ONE)
    }

    /// The value, or `None` on overflow, given the value of each monomial.
    pub fn eval(&self, monos: &BTreeMap<Mono, i64>) -> Option<i64> {
        let mut acc: Option<i64> = None;
        for t in &self.terms {
            let v = if t.mono == ONE {
                t.coef
            } else {
                let m = *monos.get(&t.mono)?;
                if t.coef == 1 { m } else { m.checked_mul(t.coef)? }
            };
            acc = Some(match acc {
                None => v,
                Some(a) => a.checked_add(v)?,
            });
        }
        Some(acc.unwrap_or(0))
    }
}

impl fmt::Display for Poly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dim)
    }
}

/// The powers of a monomial `Dim` with coefficient 1 (from `Dim::terms`): its value at B = 2,
/// T = S = 1 is 2^pB, and so on.
fn powers(m: &Dim) -> Mono {
    let at = |b, t, s| m.eval(&Bindings { b, t, s });
    let p = |v: i64| if v > 0 { v.trailing_zeros().min(u32::from(u8::MAX)) as u8 } else { 0 };
    [p(at(2, 1, 1)), p(at(1, 2, 1)), p(at(1, 1, 2))]
}

/// A monomial printed as a product (`B*T`).
pub fn mono_name(m: &Mono) -> String {
    let mut parts = Vec::new();
    for (i, sym) in ['B', 'T', 'S'].into_iter().enumerate() {
        for _ in 0..m[i] {
            parts.push(sym.to_string());
        }
    }
    if parts.is_empty() { "1".to_string() } else { parts.join("*") }
}

/// The value of a monomial: its symbols multiplied left to right (B first, then T, then S) with
/// checked multiplication; `None` on overflow.
pub fn eval_mono(m: &Mono, dims: &Dims) -> Option<i64> {
    let mut acc: Option<i64> = None;
    for (i, v) in dims.values().into_iter().enumerate() {
        for _ in 0..m[i] {
            acc = Some(match acc {
                None => v,
                Some(a) => a.checked_mul(v)?,
            });
        }
    }
    Some(acc.unwrap_or(1))
}

/// Where a storage slot's base pointer points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StorageClass {
    /// The arena (slot 0): activations and outputs, at their offsets.
    Arena,
    Input,
    State,
    Weight,
    Prepared,
    /// A scratch buffer of one kernel group's generated kernels (`Slot::bytes` says how large).
    Scratch,
}

impl StorageClass {
    pub fn name(self) -> &'static str {
        match self {
            StorageClass::Arena => "arena",
            StorageClass::Input => "input",
            StorageClass::State => "state",
            StorageClass::Weight => "weight",
            StorageClass::Prepared => "prepared",
            StorageClass::Scratch => "scratch",
        }
    }
}

/// One entry of the base-pointer table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub class: StorageClass,
    /// The storage root (none for the arena).
    pub buffer: Option<BufferId>,
    /// The input, state or weight name, the prepared value (`%24`), `arena`, or for scratch the
    /// group and what it holds (`k12 norms`).
    pub name: String,
    /// For scratch, its size in bytes at the runtime sizes (the device allocates it).
    pub bytes: Option<Dim>,
}

/// The generated kernels of one group, as the plan needs them: their launch rules in launch order
/// and the scratch buffers they name (placeholder ids past the program's buffers), with what each
/// holds and its size in bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupRules {
    pub kernels: Vec<LaunchRule>,
    pub scratch: Vec<(BufferId, String, Dim)>,
}

impl GroupRules {
    /// One kernel, no scratch.
    pub fn one(rule: LaunchRule) -> GroupRules {
        GroupRules { kernels: vec![rule], scratch: Vec::new() }
    }
}

impl From<&crate::kernels::dispatch::Dispatched> for GroupRules {
    fn from(d: &crate::kernels::dispatch::Dispatched) -> GroupRules {
        GroupRules {
            kernels: d.kernels.iter().map(|g| g.launch.clone()).collect(),
            scratch: d.scratch.iter().map(|s| (s.id, s.what.clone(), s.bytes.clone())).collect(),
        }
    }
}

/// A kernel argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    /// `bases[slot] + offset`: the address of `buffer`'s storage.
    Address { buffer: BufferId, slot: u32, offset: Poly },
    /// A size, which must fit in a `u32`.
    Size(Poly),
    /// A constant (a `u32`, or an `f32`'s bits), zero-extended.
    Const(u64),
}

/// Where a launch's rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleSource {
    /// The kernel generator's `LaunchRule`.
    Generated,
    /// The default launch of the kernel group (see the module doc).
    Default,
}

/// What the schedule does for one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedLaunch {
    pub kernel: KernelId,
    /// Which of the group's kernels (0 for the first).
    pub part: u32,
    /// The kernel group's name (`rmsnorm_matmul`).
    pub name: String,
    pub grid: [Poly; 3],
    pub block: [u32; 3],
    pub shared: u32,
    pub args: Vec<Arg>,
    pub source: RuleSource,
}

/// The kernels of one entry function, in launch order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    /// Every monomial (other than the constant) the launches read, by degree then powers: the
    /// products computed once at entry.
    pub monomials: Vec<Mono>,
    pub launches: Vec<PlannedLaunch>,
}

impl Sequence {
    fn new(launches: Vec<PlannedLaunch>) -> Sequence {
        let mut monos = BTreeSet::new();
        for l in &launches {
            for p in l.polys() {
                monos.extend(p.monomials());
            }
        }
        let mut monomials: Vec<Mono> = monos.into_iter().collect();
        monomials.sort_by_key(|m| (m.iter().map(|p| u32::from(*p)).sum::<u32>(), *m));
        Sequence { monomials, launches }
    }

    /// The most arguments any launch passes.
    pub fn max_args(&self) -> usize {
        self.launches.iter().map(|l| l.args.len()).max().unwrap_or(0)
    }
}

impl PlannedLaunch {
    /// Every polynomial the launch evaluates: the grid, then the arguments.
    pub fn polys(&self) -> impl Iterator<Item = &Poly> {
        self.grid.iter().chain(self.args.iter().filter_map(|a| match a {
            Arg::Address { offset, .. } => Some(offset),
            Arg::Size(p) => Some(p),
            Arg::Const(_) => None,
        }))
    }
}

/// Which entry function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Once, after the weights are loaded.
    Prep,
    /// Every step.
    Step,
}

impl Phase {
    pub const ALL: [Phase; 2] = [Phase::Prep, Phase::Step];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Prep => "prep",
            Phase::Step => "step",
        }
    }
}

/// A program's launch plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The model name.
    pub name: String,
    pub mode: Mode,
    /// The base-pointer table: `bases[i]` is the base of `slots[i]`.
    pub slots: Vec<Slot>,
    pub prep: Sequence,
    pub step: Sequence,
}

impl LaunchPlan {
    pub fn sequence(&self, phase: Phase) -> &Sequence {
        match phase {
            Phase::Prep => &self.prep,
            Phase::Step => &self.step,
        }
    }

    /// The slot of a storage root outside the arena, by buffer.
    pub fn slot_of(&self, buffer: BufferId) -> Option<u32> {
        self.slots.iter().position(|s| s.buffer == Some(buffer)).map(|i| i as u32)
    }
}

/// The default launch of a kernel group (see the module doc).
pub fn default_rule(group: &KernelGroup) -> LaunchRule {
    let one = Dim::constant(1);
    let (grid, sizes): ([&Dim; 3], Vec<&Dim>) = match &group.launch {
        Launch::Elements { n } => ([n, &one, &one], vec![n]),
        Launch::Rows { rows, width } => ([rows, &one, &one], vec![rows, width]),
        Launch::Matmul { batch, m, n, k } => ([n, m, batch], vec![batch, m, n, k]),
        Launch::Conv { batch, tokens, channels, width } => {
            ([channels, tokens, batch], vec![batch, tokens, channels, width])
        }
        Launch::Attention { batch_heads, tokens, keys, head_dim } => {
            ([tokens, batch_heads, &one], vec![batch_heads, tokens, keys, head_dim])
        }
        Launch::Scan { batch_heads, tokens, chunk, state } => {
            ([batch_heads, tokens, &one], vec![batch_heads, tokens, chunk, state])
        }
    };
    let args = group
        .inputs
        .iter()
        .chain(&group.outputs)
        .map(|b| ArgRule::Buffer(*b))
        .chain(sizes.into_iter().map(|d| ArgRule::Size(d.clone())))
        .collect();
    LaunchRule { grid: grid.map(Clone::clone), block: [1, 1, 1], dynamic_shared: 0, args }
}

/// Plans a program's launches; `rules` holds the generated kernels of each group by kernel id (the
/// other groups get the default launch).
pub fn plan(program: &Program, rules: &BTreeMap<KernelId, GroupRules>) -> Result<LaunchPlan, Error> {
    let known: BTreeSet<KernelId> = program.prep.iter().chain(&program.kernels).map(|k| k.id).collect();
    if let Some(k) = rules.keys().find(|k| !known.contains(k)) {
        return Err(Error::Plan(format!("a launch rule for {k}, which the program does not have")));
    }
    if let Some((k, _)) = rules.iter().find(|(_, r)| r.kernels.is_empty()) {
        return Err(Error::Plan(format!("{k}: generated rules without a kernel")));
    }

    let mut slots = vec![Slot { class: StorageClass::Arena, buffer: None, name: "arena".to_string(), bytes: None }];
    let mut slot_of: BTreeMap<BufferId, u32> = BTreeMap::new();
    for b in program.buffers.iter().filter(|b| b.alias.is_none() && !b.kind.in_arena()) {
        let class = match b.kind {
            BufferKind::Input => StorageClass::Input,
            BufferKind::State => StorageClass::State,
            BufferKind::Weight => StorageClass::Weight,
            BufferKind::Prepared => StorageClass::Prepared,
            BufferKind::Activation | BufferKind::Output => continue,
        };
        slot_of.insert(b.id, slots.len() as u32);
        slots.push(Slot { class, buffer: Some(b.id), name: b.name.clone(), bytes: None });
    }
    // Scratch: one slot per (group, scratch buffer), in launch order.
    let mut scratch_slot: BTreeMap<(KernelId, BufferId), u32> = BTreeMap::new();
    for k in program.prep.iter().chain(&program.kernels) {
        for (id, what, bytes) in rules.get(&k.id).map(|r| r.scratch.as_slice()).unwrap_or_default() {
            if program.buffer(*id).is_some() {
                return Err(Error::Plan(format!("{}: scratch {id} is a buffer of the program", k.id)));
            }
            scratch_slot.insert((k.id, *id), slots.len() as u32);
            slots.push(Slot {
                class: StorageClass::Scratch,
                buffer: None,
                name: format!("{} {what}", k.id),
                bytes: Some(bytes.clone()),
            });
        }
    }

    let address = |group: KernelId, id: BufferId| -> Result<Arg, Error> {
        if let Some(slot) = scratch_slot.get(&(group, id)) {
            return Ok(Arg::Address { buffer: id, slot: *slot, offset: Poly::constant(0) });
        }
        let b = program.buffer(id).ok_or_else(|| Error::Plan(format!("{id} is not a buffer of the program")))?;
        let root = program
            .buffer(b.root())
            .ok_or_else(|| Error::Plan(format!("{id}'s root {} is not a buffer of the program", b.root())))?;
        if root.kind.in_arena() {
            let offset =
                root.offset.as_ref().ok_or_else(|| Error::Plan(format!("{} is not placed in the arena", root.id)))?;
            Ok(Arg::Address { buffer: id, slot: 0, offset: Poly::new(offset) })
        } else {
            let slot = *slot_of.get(&root.id).ok_or_else(|| Error::Plan(format!("{} has no storage slot", root.id)))?;
            Ok(Arg::Address { buffer: id, slot, offset: Poly::constant(0) })
        }
    };

    let launches = |group: &KernelGroup| -> Result<Vec<PlannedLaunch>, Error> {
        let (kernels, source) = match rules.get(&group.id) {
            Some(r) => (r.kernels.clone(), RuleSource::Generated),
            None => (vec![default_rule(group)], RuleSource::Default),
        };
        let mut out = Vec::with_capacity(kernels.len());
        for (part, rule) in kernels.into_iter().enumerate() {
            if rule.block.contains(&0) {
                return Err(Error::Plan(format!("{}: the block {:?} has a zero dimension", group.id, rule.block)));
            }
            let args = rule
                .args
                .iter()
                .map(|a| match a {
                    ArgRule::Buffer(b) => address(group.id, *b),
                    ArgRule::View(b, bytes) => match address(group.id, *b)? {
                        Arg::Address { buffer, slot, offset } => {
                            Ok(Arg::Address { buffer, slot, offset: Poly::new(&offset.dim.add(bytes)) })
                        }
                        other => Ok(other),
                    },
                    ArgRule::Size(d) => Ok(Arg::Size(Poly::new(d))),
                    ArgRule::U32(v) => Ok(Arg::Const(u64::from(*v))),
                    ArgRule::F32(v) => Ok(Arg::Const(u64::from(v.to_bits()))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if u32::try_from(args.len()).is_err() {
                return Err(Error::Plan(format!("{}: too many arguments", group.id)));
            }
            out.push(PlannedLaunch {
                kernel: group.id,
                part: part as u32,
                name: group.name.clone(),
                grid: rule.grid.each_ref().map(Poly::new),
                block: rule.block,
                shared: rule.dynamic_shared,
                args,
                source,
            });
        }
        Ok(out)
    };

    let flat = |groups: &[KernelGroup]| -> Result<Vec<PlannedLaunch>, Error> {
        let mut all = Vec::new();
        for g in groups {
            all.extend(launches(g)?);
        }
        Ok(all)
    };
    let prep = flat(&program.prep)?;
    let step = flat(&program.kernels)?;
    Ok(LaunchPlan {
        name: program.name.clone(),
        mode: program.mode,
        slots,
        prep: Sequence::new(prep),
        step: Sequence::new(step),
    })
}

/// Runs a sequence of the plan without compiling it: the reference semantics of the native
/// schedule (see `abi.rs`). `launch` is called for each launched kernel, in order; its error stops
/// the sequence.
pub fn interpret<E>(
    plan: &LaunchPlan,
    phase: Phase,
    dims: &Dims,
    bases: &[u64],
    launch: &mut dyn FnMut(&Launched<'_>) -> Result<(), E>,
) -> Result<(), RunError<E>> {
    if bases.len() < plan.slots.len() {
        return Err(RunError::Bases { expected: plan.slots.len(), found: bases.len() });
    }
    if dims.values().iter().any(|v| *v < 0) {
        return Err(RunError::BadDims(*dims));
    }
    let seq = plan.sequence(phase);
    let mut monos = BTreeMap::new();
    for m in &seq.monomials {
        monos.insert(*m, eval_mono(m, dims).ok_or(RunError::Overflow)?);
    }
    let mut args: Vec<u64> = Vec::with_capacity(seq.max_args());
    for l in &seq.launches {
        let grid: Vec<Option<i64>> = l.grid.iter().map(|p| p.eval(&monos)).collect();
        if grid.iter().any(Option::is_none) {
            return Err(RunError::Overflow);
        }
        let grid: Vec<i64> = grid.into_iter().flatten().collect();
        if grid.iter().any(|g| *g <= 0) {
            continue;
        }
        let mut overflow = false;
        let mut range = grid.iter().any(|g| u32::try_from(*g).is_err());
        args.clear();
        for a in &l.args {
            let v = match a {
                Arg::Address { slot, offset, .. } => match offset.eval(&monos) {
                    Some(o) => bases[*slot as usize].wrapping_add(o as u64),
                    None => {
                        overflow = true;
                        0
                    }
                },
                Arg::Size(p) => match p.eval(&monos) {
                    Some(v) => {
                        range |= u32::try_from(v).is_err();
                        v as u64
                    }
                    None => {
                        overflow = true;
                        0
                    }
                },
                Arg::Const(c) => *c,
            };
            args.push(v);
        }
        if overflow {
            return Err(RunError::Overflow);
        }
        if range {
            return Err(RunError::Range);
        }
        let to_u32 = |g: i64| u32::try_from(g).unwrap_or(u32::MAX);
        let record = Launched {
            kernel: l.kernel,
            part: l.part,
            grid: [to_u32(grid[0]), to_u32(grid[1]), to_u32(grid[2])],
            block: l.block,
            shared: l.shared,
            args: &args,
        };
        launch(&record).map_err(|error| RunError::Launch { kernel: l.kernel, error })?;
    }
    Ok(())
}
