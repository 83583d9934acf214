//! arena: liveness of the arena buffers and their placement in one arena with symbolic offsets.
//!
//! **Liveness.** A storage root lives, over the step's kernel order, from the first kernel that
//! touches it (the one that writes it; for zeroed storage the first that reads it, before which the
//! runtime clears it) to the last kernel that reads or writes it or any of its aliases (views and
//! in-place updates), inclusive. `Output` buffers live until the last kernel, so the caller can read
//! them after the step. A kernel's inputs and outputs are all live at that kernel, so a kernel never
//! writes over its own operands unless the graph says so (in place).
//!
//! **Classes.** Sizes are polynomials in B, T, S, and a slot shared by two buffers must be at least as
//! large as both for *every* B, T, S. Buffers are grouped by the monomials of their size
//! (`Dim::monomial_class` for one-term sizes: all `c·B·T` together, all `c·B` together, constants
//! together). A size of several terms (`4096*B*T + 1048576*B` after the meta-token prefix) forms a
//! class with every other size of the same monomials: within such a class sizes compare coefficient
//! by coefficient, and a slot's size is the coefficient-wise maximum of its buffers' sizes, which
//! bounds each of them for all non-negative B, T, S. (Folding such a size into the `B*T` class would
//! need a bound like `c·B·T` that fails for small T; a separate class is exact.) The same comparison
//! holds across classes whose monomials nest, so a class whose monomials are all among a larger
//! class's (`B*T` and `B` inside `B*T + B`) joins it: the logits, live only at the end, then reuse the
//! slots of the prefix-length activations that are dead by then. Without several-term sizes the
//! classes are exactly the monomials. A negative term, which lowering never produces, is dropped,
//! which keeps an upper bound.
//!
//! **Alignment.** Every coefficient is rounded up to a multiple of `ALIGN` (256) bytes, so every slot
//! size, and hence every offset, is a multiple of 256 bytes for any integer B, T, S.
//!
//! **Packing.** Each class is interval-coloured: a buffer goes to the smallest slot it fits in whose
//! buffers are all dead while it lives, else to the largest such slot, which grows to the
//! coefficient-wise maximum, else to a new slot. The buffers are coloured twice, taken in lifetime
//! order and largest first, and the packing with the smaller class size is kept (neither order wins on
//! every model). Sizes (to find the smallest or largest, and to compare packings) are ordered by
//! their value at `B = 1, T = S = 4096`, which for a one-monomial class is the coefficient order.
//!
//! **Layout.** Classes are laid one after another (highest degree first); a class's offset is the sum of the previous
//! classes' sizes, and the arena size is the sum of all classes.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Buffer, BufferId, KernelGroup, KernelId};
use crate::gir::{Bindings, Dim};

/// Every arena coefficient (and so every offset) is a multiple of this many bytes.
pub const ALIGN: i64 = 256;

/// The sizes used to order the sizes of a class with several monomials.
const REFERENCE: Bindings = Bindings { b: 1, t: 4096, s: 4096 };

/// The placement of the arena buffers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArenaPlan {
    /// The arena size in bytes.
    pub size: Dim,
    /// The classes, in arena order.
    pub classes: Vec<ArenaClass>,
}

/// The buffers whose sizes have the same monomials, packed into slots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArenaClass {
    /// The monomials, each with coefficient 1 (`B*T`, `B*T + B`, `1` for constants).
    pub monomials: Dim,
    /// Where the class starts in the arena.
    pub offset: Dim,
    /// The class's bytes (the sum of its slots).
    pub size: Dim,
    pub slots: Vec<Slot>,
}

/// A piece of the arena shared by buffers whose lifetimes do not overlap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Where the slot starts in the arena.
    pub offset: Dim,
    pub size: Dim,
    /// The storage roots placed here, in lifetime order.
    pub buffers: Vec<BufferId>,
}

/// Computes liveness, places every arena root, and records `offset` and `live` on the roots and
/// their aliases.
pub fn plan(bufs: &mut [Buffer], kernels: &[KernelGroup]) -> Result<ArenaPlan, String> {
    let last = kernels.len().saturating_sub(1);
    // First and last kernel (position in the step) touching each arena root.
    let mut live: BTreeMap<BufferId, (usize, usize)> = BTreeMap::new();
    for (p, k) in kernels.iter().enumerate() {
        for b in k.inputs.iter().chain(&k.outputs) {
            let root = bufs.get(b.0 as usize).ok_or_else(|| format!("{} uses a missing buffer {b}", k.id))?.root();
            if bufs[root.0 as usize].kind.in_arena() {
                let e = live.entry(root).or_insert((p, p));
                e.1 = p;
            }
        }
    }
    let mut members: BTreeMap<Dim, Vec<Member>> = BTreeMap::new();
    for b in bufs.iter().filter(|b| b.alias.is_none() && b.kind.in_arena()) {
        let (start, mut end) = live.get(&b.id).copied().unwrap_or((0, 0));
        if b.kind == super::BufferKind::Output {
            end = last;
        }
        live.insert(b.id, (start, end));
        let size = aligned_bound(&b.bytes);
        let monomials = terms(&size).into_iter().fold(Dim::constant(0), |acc, (m, _)| acc.add(&m));
        let monomials = if monomials.is_zero() { Dim::constant(1) } else { monomials };
        members.entry(monomials).or_default().push(Member { id: b.id, start, end, size });
    }

    // A class whose monomials are all among a larger class's joins the first such class.
    let mut order: Vec<Dim> = members.keys().cloned().collect();
    order.sort_by_cached_key(|m| (Reverse(degree(m)), m.to_string()));
    let maximal: Vec<Dim> = order.iter().filter(|x| !order.iter().any(|y| y != *x && subset(x, y))).cloned().collect();
    let mut classes: Vec<(Dim, Vec<Member>)> = maximal.iter().map(|m| (m.clone(), Vec::new())).collect();
    for (monomials, ms) in members {
        if let Some(c) = classes.iter_mut().find(|(m, _)| subset(&monomials, m)) {
            c.1.extend(ms);
        }
    }
    let mut offset = Dim::constant(0);
    let mut plan = ArenaPlan { size: Dim::constant(0), classes: Vec::new() };
    for (monomials, ms) in classes {
        let slots = pack(&ms);
        let class_offset = offset.clone();
        let mut out = Vec::with_capacity(slots.len());
        for s in slots {
            let buffers = s.members.iter().map(|(_, _, id)| *id).collect();
            out.push(Slot { offset: offset.clone(), size: s.size.clone(), buffers });
            offset = offset.add(&s.size);
        }
        let size = offset.sub(&class_offset);
        plan.classes.push(ArenaClass { monomials, offset: class_offset, size, slots: out });
    }
    plan.size = offset;

    // Record the placement on the roots, then on their aliases.
    let first_kernel = kernels.first().map_or(0, |k| k.id.0);
    let kernel = |p: usize| KernelId(first_kernel + p as u32);
    for class in &plan.classes {
        for slot in &class.slots {
            for id in &slot.buffers {
                let b = &mut bufs[id.0 as usize];
                b.offset = Some(slot.offset.clone());
                b.live = live.get(id).filter(|_| !kernels.is_empty()).map(|(s, e)| (kernel(*s), kernel(*e)));
            }
        }
    }
    for i in 0..bufs.len() {
        if let Some(a) = bufs[i].alias {
            let (offset, live) = (bufs[a.root.0 as usize].offset.clone(), bufs[a.root.0 as usize].live);
            bufs[i].offset = offset;
            bufs[i].live = live;
        }
    }
    Ok(plan)
}

/// An arena root to place: its lifetime (step positions, inclusive) and aligned size bound.
struct Member {
    id: BufferId,
    start: usize,
    end: usize,
    size: Dim,
}

/// A slot being filled: its size so far and its members' lifetimes, in lifetime order.
struct Open {
    size: Dim,
    members: Vec<(usize, usize, BufferId)>,
}

/// Packs one class into slots twice — buffers taken in lifetime order, and largest first — and
/// keeps the smaller packing at the reference sizes (the first on a tie). Neither order gives the
/// smaller arena on every example.
fn pack(ms: &[Member]) -> Vec<Open> {
    let total = |slots: &[Open]| slots.iter().map(|s| s.size.eval(&REFERENCE)).fold(0i64, i64::saturating_add);
    let mut by_start: Vec<&Member> = ms.iter().collect();
    by_start.sort_by_key(|m| (m.start, m.id));
    let mut by_size: Vec<&Member> = ms.iter().collect();
    by_size.sort_by_cached_key(|m| (Reverse(m.size.eval(&REFERENCE)), m.start, m.id));
    let a = colour(&by_start);
    let b = colour(&by_size);
    if total(&b) < total(&a) { b } else { a }
}

/// Interval colouring in the given order: each buffer goes to the smallest slot it fits in whose
/// members are all dead while it lives, else to the largest such slot, which grows to hold it, else
/// to a new slot.
fn colour(ms: &[&Member]) -> Vec<Open> {
    let mut slots: Vec<Open> = Vec::new();
    for m in ms {
        let free: Vec<usize> =
            (0..slots.len()).filter(|i| slots[*i].members.iter().all(|(a, b, _)| *b < m.start || m.end < *a)).collect();
        let key = |i: &usize| slots[*i].size.eval(&REFERENCE);
        // `min_by_key` keeps the first minimum; reversing makes `max_by_key` keep the first maximum.
        let fitting = free.iter().copied().filter(|i| slots[*i].size.sub(&m.size).is_nonneg()).min_by_key(key);
        let i = match fitting.or_else(|| free.iter().rev().copied().max_by_key(key)) {
            Some(i) => i,
            None => {
                slots.push(Open { size: Dim::constant(0), members: Vec::new() });
                slots.len() - 1
            }
        };
        let slot = &mut slots[i];
        slot.size = coefficient_max(&slot.size, &m.size);
        let at = slot.members.partition_point(|(a, _, _)| *a < m.start);
        slot.members.insert(at, (m.start, m.end, m.id));
    }
    slots
}

/// The terms of a polynomial as `(monomial with coefficient 1, coefficient)`.
pub(crate) fn terms(d: &Dim) -> Vec<(Dim, i64)> {
    d.terms()
}

/// An upper bound of `d` for non-negative B, T, S whose coefficients are multiples of `ALIGN`.
pub(crate) fn aligned_bound(d: &Dim) -> Dim {
    terms(d).into_iter().filter(|(_, c)| *c > 0).fold(Dim::constant(0), |acc, (m, c)| {
        acc.add(&m.scale((c.saturating_add(ALIGN - 1) / ALIGN).saturating_mul(ALIGN)))
    })
}

/// The coefficient-wise maximum of two polynomials with non-negative coefficients.
fn coefficient_max(a: &Dim, b: &Dim) -> Dim {
    let grow =
        terms(&b.sub(a)).into_iter().filter(|(_, c)| *c > 0).fold(Dim::constant(0), |acc, (m, c)| acc.add(&m.scale(c)));
    a.add(&grow)
}

/// Whether every monomial of `x` is one of `y` (both with coefficients 1).
fn subset(x: &Dim, y: &Dim) -> bool {
    y.sub(x).is_nonneg()
}

/// The highest total degree of a polynomial's monomials.
fn degree(d: &Dim) -> u32 {
    let twos = Bindings { b: 2, t: 2, s: 2 };
    terms(d).iter().map(|(m, _)| m.eval(&twos).trailing_zeros()).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dim {
        Dim::parse(s).unwrap()
    }

    #[test]
    fn terms_bounds_and_maxima() {
        let t = terms(&d("4096*B*T + 1048576*B - 3"));
        assert_eq!(t, vec![(d("B*T"), 4096), (d("B"), 1048576), (d("1"), -3)]);
        assert!(terms(&Dim::constant(0)).is_empty());
        assert_eq!(aligned_bound(&d("4*B*T + 300 - 7*S")).to_string(), "256*B*T + 512");
        assert_eq!(coefficient_max(&d("512*B*T + 256*B"), &d("256*B*T + 1024*B")).to_string(), "512*B*T + 1024*B");
        assert_eq!(degree(&d("B*T + B")), 2);
        assert_eq!(degree(&d("1")), 0);
        assert!(subset(&d("B*T"), &d("B*T + B")));
        assert!(subset(&d("B"), &d("B*T + B")));
        assert!(!subset(&d("1"), &d("B*T + B")));
        assert!(!subset(&d("B*T + B"), &d("B*T")));
    }
}
