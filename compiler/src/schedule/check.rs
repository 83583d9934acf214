//! check: the invariants of a program, re-derived from its lists (for tests, `--emit program` in
//! debug builds, and programs read back from JSON).
//!
//! 1. **ids**: `buffers[i]` is `b{i}`; kernels are numbered `k0..` through `prep`, then `kernels`.
//! 2. **graph agreement**: each buffer holds an existing value of its type and `bytes` is its size;
//!    each kernel group is a compute node (not a leaf or a view), its inputs hold the node's operands
//!    in order and its outputs the node's results.
//! 3. **aliases**: an alias's root is a non-alias buffer, the root of its source, and gives it its kind,
//!    offset and lifetime.
//! 4. **reads after writes, in version order**: prep kernels read only weights and earlier prepared
//!    weights; a step kernel reads inputs, weights, prepared weights, states, zeroed storage, or what
//!    an earlier step kernel wrote; and it reads the *current* version of the storage (no reader runs
//!    after an in-place update of what it reads). Storage is written once, except by in-place updates;
//!    inputs, weights and prepared weights are never written by the step.
//! 5. **outputs**: every graph output is listed with the buffer of its value, which holds the final
//!    version of its storage; a state's output is in the state's buffer.
//! 6. **arena**: exactly the arena roots have an offset; each lies in one slot at the slot's offset,
//!    within its size for all B, T, S; slots of a class and classes follow each other without gaps or
//!    overlap and sum to the arena size; every offset coefficient is a multiple of `ALIGN`; a root's
//!    recorded lifetime covers every kernel that touches it (and the last kernel for outputs), and the
//!    roots sharing a slot have disjoint lifetimes. Together these mean no two live arena buffers
//!    overlap, for any B, T, S.

use std::collections::{BTreeMap, BTreeSet};

use super::arena::aligned_bound;
use super::{ALIGN, BufferId, BufferKind, KernelGroup, KernelId, Program};
use crate::gir::{Dim, InputRole, Value};

impl Program {
    /// Checks every invariant; returns all violations found.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        self.check_ids(&mut errs);
        if !errs.is_empty() {
            return Err(errs);
        }
        self.check_graph(&mut errs);
        self.check_aliases(&mut errs);
        self.check_versions(&mut errs);
        self.check_arena(&mut errs);
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn check_ids(&self, errs: &mut Vec<String>) {
        for (i, b) in self.buffers.iter().enumerate() {
            if b.id.0 as usize != i {
                errs.push(format!("buffer {i} has id {}", b.id));
            }
        }
        for (i, k) in self.prep.iter().chain(&self.kernels).enumerate() {
            if k.id.0 as usize != i {
                errs.push(format!("kernel {i} has id {}", k.id));
            }
            for b in k.inputs.iter().chain(&k.outputs) {
                if self.buffer(*b).is_none() {
                    errs.push(format!("{} uses a missing buffer {b}", k.id));
                }
            }
        }
        for b in &self.buffers {
            if let Some(a) = b.alias
                && (self.buffer(a.root).is_none() || self.buffer(a.source).is_none())
            {
                errs.push(format!("{} aliases a missing buffer", b.id));
            }
        }
        for (name, b) in &self.outputs {
            if self.buffer(*b).is_none() {
                errs.push(format!("output `{name}` is a missing buffer {b}"));
            }
        }
    }

    fn check_graph(&self, errs: &mut Vec<String>) {
        let g = &self.graph;
        for b in &self.buffers {
            match g.ty(b.value) {
                Ok(t) if *t == b.ty => {}
                Ok(t) => errs.push(format!("{} has type {}, but {} is {t}", b.id, b.ty, b.value)),
                Err(e) => errs.push(format!("{}: {e}", b.id)),
            }
            if b.bytes != b.ty.bytes() {
                errs.push(format!("{} is {} bytes, but {} takes {}", b.id, b.bytes, b.ty, b.ty.bytes()));
            }
        }
        for k in self.prep.iter().chain(&self.kernels) {
            let Some(node) = g.node(k.node) else {
                errs.push(format!("{} runs the missing node {}", k.id, k.node));
                continue;
            };
            if node.op.is_leaf() || node.op.is_view() {
                errs.push(format!("{} runs {}, which computes nothing", k.id, k.node));
            }
            let operands = g.operands(k.node);
            let held: Vec<Value> = k.inputs.iter().map(|b| self.buffers[b.0 as usize].value).collect();
            if held != operands {
                errs.push(format!("{}: inputs hold {held:?}, but {} reads {operands:?}", k.id, k.node));
            }
            let results: Vec<Value> = (0..node.types.len()).map(|r| Value::new(k.node, r as u16)).collect();
            let held: Vec<Value> = k.outputs.iter().map(|b| self.buffers[b.0 as usize].value).collect();
            if held != results {
                errs.push(format!("{}: outputs hold {held:?}, but {} yields {results:?}", k.id, k.node));
            }
        }
    }

    fn check_aliases(&self, errs: &mut Vec<String>) {
        for b in &self.buffers {
            let Some(a) = b.alias else { continue };
            let root = &self.buffers[a.root.0 as usize];
            if root.alias.is_some() {
                errs.push(format!("{}: its root {} is itself an alias", b.id, a.root));
            }
            if self.buffers[a.source.0 as usize].root() != a.root {
                errs.push(format!("{}: its source {} does not share the root {}", b.id, a.source, a.root));
            }
            if b.kind != root.kind || b.offset != root.offset || b.live != root.live {
                errs.push(format!("{}: kind, offset or lifetime differ from its root {}", b.id, a.root));
            }
            if b.zeroed {
                errs.push(format!("{}: an alias cannot be zeroed (its root is)", b.id));
            }
        }
    }

    /// The version a buffer holds: a view holds its source's version, anything else its own.
    fn version(&self, mut b: BufferId) -> BufferId {
        while let Some(a) = self.buffers[b.0 as usize].alias.filter(|a| !a.in_place) {
            b = a.source;
        }
        b
    }

    fn check_versions(&self, errs: &mut Vec<String>) {
        // The current version of each storage root, once it holds data.
        let mut current: BTreeMap<BufferId, BufferId> = BTreeMap::new();
        for b in self.buffers.iter().filter(|b| b.alias.is_none() && b.kind == BufferKind::Weight) {
            current.insert(b.id, b.id);
        }
        let run = |k: &KernelGroup, prep: bool, current: &mut BTreeMap<BufferId, BufferId>, errs: &mut Vec<String>| {
            for &x in &k.inputs {
                let root = self.buffers[x.0 as usize].root();
                let kind = self.buffers[root.0 as usize].kind;
                if prep && !matches!(kind, BufferKind::Weight | BufferKind::Prepared) {
                    errs.push(format!("{} (prep) reads {x}, a {} buffer", k.id, kind.name()));
                }
                match current.get(&root) {
                    None => errs.push(format!("{} reads {x} before anything writes it", k.id)),
                    Some(v) if *v != self.version(x) => {
                        errs.push(format!("{} reads {x} after {v} replaced it in place", k.id))
                    }
                    Some(_) => {}
                }
            }
            for &y in &k.outputs {
                let b = &self.buffers[y.0 as usize];
                let kind = self.buffers[b.root().0 as usize].kind;
                let writable =
                    if prep { kind == BufferKind::Prepared } else { kind.in_arena() || kind == BufferKind::State };
                if !writable {
                    errs.push(format!("{} writes {y}, a {} buffer", k.id, kind.name()));
                }
                match b.alias {
                    None if current.contains_key(&y) => {
                        errs.push(format!("{} writes {y}, which is already written", k.id))
                    }
                    Some(a) if !a.in_place => errs.push(format!("{} writes the view {y}", k.id)),
                    Some(a) if !k.inputs.contains(&a.source) => {
                        errs.push(format!("{} updates {} in place without reading it", k.id, a.source))
                    }
                    _ => {}
                }
                current.insert(b.root(), y);
            }
        };
        for k in &self.prep {
            run(k, true, &mut current, errs);
        }
        for b in self.buffers.iter().filter(|b| b.alias.is_none()) {
            let ready = matches!(b.kind, BufferKind::Input | BufferKind::State) || b.zeroed;
            if ready {
                current.insert(b.id, b.id);
            }
            if b.kind == BufferKind::Prepared && !current.contains_key(&b.id) {
                errs.push(format!("the prepared weight {} is written by no prep kernel", b.id));
            }
        }
        for k in &self.kernels {
            run(k, false, &mut current, errs);
        }

        let g = &self.graph;
        let listed: Vec<&str> = self.outputs.iter().map(|(n, _)| n.as_str()).collect();
        let expected: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
        if listed != expected {
            errs.push(format!("outputs {listed:?} differ from the graph's {expected:?}"));
        }
        let states: BTreeSet<String> = g.inputs(InputRole::State).into_iter().map(|(n, _)| n).collect();
        for ((name, b), (_, v)) in self.outputs.iter().zip(g.outputs()) {
            let buf = &self.buffers[b.0 as usize];
            if buf.value != *v {
                errs.push(format!("output `{name}` is {b}, which holds {}, not {v}", buf.value));
            }
            if current.get(&buf.root()) != Some(&self.version(*b)) {
                errs.push(format!("output `{name}` ({b}) is not the final version of its storage"));
            }
            let root = &self.buffers[buf.root().0 as usize];
            if states.contains(name) && !(root.kind == BufferKind::State && root.name == *name) {
                errs.push(format!("state output `{name}` ({b}) is not in the state's buffer"));
            }
        }
    }

    fn check_arena(&self, errs: &mut Vec<String>) {
        // Lifetimes from the kernel lists, independent of the planner's.
        let last = self.kernels.last().map(|k| k.id);
        let mut used: BTreeMap<BufferId, (KernelId, KernelId)> = BTreeMap::new();
        for k in &self.kernels {
            for b in k.inputs.iter().chain(&k.outputs) {
                let e = used.entry(self.buffers[b.0 as usize].root()).or_insert((k.id, k.id));
                e.1 = k.id;
            }
        }
        let mut placed: BTreeMap<BufferId, usize> = BTreeMap::new();
        let mut offset = Dim::constant(0);
        for class in &self.arena.classes {
            if class.offset != offset {
                errs.push(format!("class {} starts at {}, not {offset}", class.monomials, class.offset));
            }
            for slot in &class.slots {
                if slot.offset != offset {
                    errs.push(format!("a slot of class {} starts at {}, not {offset}", class.monomials, slot.offset));
                }
                let mut lifetimes: Vec<(KernelId, KernelId, BufferId)> = Vec::new();
                for id in &slot.buffers {
                    *placed.entry(*id).or_default() += 1;
                    let Some(b) = self.buffer(*id) else {
                        errs.push(format!("the arena places a missing buffer {id}"));
                        continue;
                    };
                    if b.offset.as_ref() != Some(&slot.offset) {
                        errs.push(format!("{id} is in a slot at {}, but records {:?}", slot.offset, b.offset));
                    }
                    if !slot.size.sub(&b.bytes).is_nonneg() {
                        errs.push(format!("{id} ({} bytes) exceeds its slot ({})", b.bytes, slot.size));
                    }
                    if let Some(live) = b.live {
                        lifetimes.push((live.0, live.1, *id));
                    }
                }
                lifetimes.sort();
                for w in lifetimes.windows(2) {
                    if w[1].0 <= w[0].1 {
                        errs.push(format!("{} and {} share a slot while both live", w[0].2, w[1].2));
                    }
                }
                if slot.size != aligned_bound(&slot.size) {
                    errs.push(format!(
                        "a slot of class {} has a size {} not aligned to {ALIGN}",
                        class.monomials, slot.size
                    ));
                }
                offset = offset.add(&slot.size);
            }
            if class.size != offset.sub(&class.offset) {
                errs.push(format!(
                    "class {} records size {}, its slots sum to {}",
                    class.monomials,
                    class.size,
                    offset.sub(&class.offset)
                ));
            }
        }
        if self.arena.size != offset {
            errs.push(format!("the arena records size {}, its classes sum to {offset}", self.arena.size));
        }
        for b in self.buffers.iter().filter(|b| b.alias.is_none()) {
            let count = placed.get(&b.id).copied().unwrap_or(0);
            if !b.kind.in_arena() {
                if count > 0 || b.offset.is_some() || b.live.is_some() {
                    errs.push(format!("{} ({}) is placed in the arena", b.id, b.kind.name()));
                }
                continue;
            }
            if count != 1 {
                errs.push(format!("{} ({}) is placed {count} times in the arena", b.id, b.kind.name()));
            }
            let Some(last) = last else { continue };
            let Some((start, end)) = b.live else {
                errs.push(format!("{} has no lifetime", b.id));
                continue;
            };
            if let Some((first, latest)) = used.get(&b.id)
                && (start > *first || end < *latest)
            {
                errs.push(format!("{} lives {start}..{end} but is used {first}..{latest}", b.id));
            }
            if b.kind == BufferKind::Output && end != last {
                errs.push(format!("the output {} dies at {end}, before the step ends", b.id));
            }
        }
    }
}
