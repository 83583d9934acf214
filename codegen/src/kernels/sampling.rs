//! sampling: per-row reductions over a vocabulary row — `softmax` (f32 probabilities), `argmax`
//! (ties → lowest index, NaN never wins) and `top_k` (the `k ≤ 64` largest values and their indices,
//! sorted descending, ties → lowest index first).
//!
//! **Tiling.** One block per row (rows loop grid-stride, so any grid is correct; the launch grid is
//! one block per row), `threads = clamp(32·⌈vectors/128⌉, 32, 1024)` threads: each thread walks the
//! vectors `tid, tid + threads, ..` of the row (16-byte vectors when the vocabulary allows, else
//! narrower). Row starts are 64-bit (`rows · V` may exceed 2³²). Warp shuffles reduce within warps,
//! one partial per warp goes through shared memory and every thread combines the partials in warp
//! order: results are deterministic.
//!
//! - **softmax**: one pass computes the running max and the rescaled sum (`online` softmax, one
//!   rescale per vector), a second writes `exp(x − max) · (1 / sum)`.
//! - **argmax**: each thread keeps its best (value, index) in index order (`>`, so the first of equal
//!   values stays), combined by `(larger value, then smaller index)`; `−∞` rows give the first index,
//!   all-NaN rows give 0 (as `flashc_runtime::sample::argmax`).
//! - **top-k**: radix select on a 64-bit key that is unique per element: the f32 value mapped to an
//!   order-preserving u32 (`-0` counts as `+0`, NaN below everything), then the index reversed (`2ᵇ −
//!   1 − i`, so lower indices rank higher). Four passes of 8-bit digits over the value (shared 256-bin
//!   histogram with shared atomics; warp 0 finds the digit holding the k-th element with a shuffle
//!   scan) fix the k-th value; only when that value is tied across the cut do `⌈b/8⌉` passes over the
//!   index bits follow. A last pass collects exactly the k selected elements into shared memory
//!   (atomic slots) and the threads compute each element's rank and write it in place:
//!   sorted, deterministic output. Cost: 5 to 8 reads of the row per row; one block per row.
//!
//! **Slots** (`ArgRule::Buffer(BufferId(k))`): 0 `logits [rows, V]`, then the results: softmax
//! `probs f32[rows, V]`; argmax `index i32[rows]`; top-k `indices i32[rows, k]`, `values f32[rows, k]`;
//! then the row count (u32) when symbolic. Logits are bf16 or f32.

use flashc_compiler::gir::{DType, Dim};

use super::elementwise::{Args, Coords, Elem, coords, declare_block, exp, grid3, load, row_vector, store};
use super::{CodegenError, Generated, LaunchRule};
use crate::kir::{AtomOp, BinOp, Builder, Cache, Cmp, Operand, Reg, ShflMode, Space, Special, Ty, UnOp};

/// The largest `k` of `top_k`.
pub const MAX_K: u32 = 64;

/// How a kernel walks one vocabulary row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowLayout {
    pub elem: Elem,
    pub vocab: u32,
    /// Elements per vector and vectors per row.
    pub vw: u32,
    pub nvec: u32,
    /// Threads per block (one block per row).
    pub threads: u32,
}

impl RowLayout {
    pub(crate) fn new(vocab: u32, dtype: DType, what: &str) -> Result<RowLayout, CodegenError> {
        let elem = Elem::of(dtype, what)?;
        if vocab == 0 {
            return Err(CodegenError::Shape(format!("{what}: an empty row")));
        }
        let vw = row_vector(vocab, elem);
        let nvec = vocab / vw;
        let threads = nvec.div_ceil(4).next_multiple_of(32).clamp(32, 1024);
        Ok(RowLayout { elem, vocab, vw, nvec, threads })
    }

    pub(crate) fn warps(&self) -> u32 {
        self.threads / 32
    }

    /// The start of row `r` of `base` (64-bit offset).
    pub(crate) fn row(&self, b: &mut Builder, base: Reg, r: Reg, elem_bytes: u32) -> Reg {
        b.index(base, r, self.vocab * elem_bytes)
    }

    /// Emits a loop over this thread's vectors of the row at `row`: `body(b, first index, values)`.
    pub(crate) fn scan(&self, b: &mut Builder, row: Reg, tid: Reg, body: impl FnOnce(&mut Builder, Reg, &[Reg])) {
        let (vw, elem) = (self.vw, self.elem);
        b.for_(Ty::U32, tid.into(), self.nvec.into(), self.threads.into(), |b, c| {
            let i = if vw > 1 { b.bin(BinOp::Shl, Ty::U32, c.into(), vw.trailing_zeros().into()) } else { c };
            let a = b.index(row, i, elem.bytes());
            let vals = load(b, elem, Cache::ReadOnly, a, 0, vw as usize);
            body(b, i, &vals);
        });
    }

    pub(crate) fn doc(&self) -> String {
        format!(
            "one block of {} threads per row of {} {}; {}-element vectors, about {} per thread",
            self.threads,
            self.vocab,
            self.elem.name(),
            self.vw,
            self.nvec.div_ceil(self.threads)
        )
    }
}

/// A running (max, sum of exp(x − max)) pair.
pub(crate) struct Online {
    pub m: Reg,
    pub s: Reg,
}

/// `m` unless it is −∞ (then 0), so `exp(x − m)` never computes `−∞ − (−∞)`.
fn finite_or_zero(b: &mut Builder, m: Reg) -> Reg {
    let inf = b.setp(Cmp::Eq, Ty::F32, m.into(), f32::NEG_INFINITY.into());
    b.selp(Ty::F32, 0.0f32.into(), m.into(), inf)
}

impl Online {
    pub(crate) fn new(b: &mut Builder) -> Online {
        Online { m: b.mov(Ty::F32, f32::NEG_INFINITY.into()), s: b.mov(Ty::F32, 0.0f32.into()) }
    }

    /// Folds a vector of values in: one rescale of the sum per vector.
    pub(crate) fn add(&self, b: &mut Builder, vals: &[Reg]) {
        let mut cm = vals[0];
        for v in &vals[1..] {
            cm = b.bin(BinOp::Max, Ty::F32, cm.into(), (*v).into());
        }
        let mn = b.bin(BinOp::Max, Ty::F32, self.m.into(), cm.into());
        let safe = finite_or_zero(b, mn);
        let d = b.bin(BinOp::Sub, Ty::F32, self.m.into(), safe.into());
        let scale = exp(b, d);
        b.bin_into(BinOp::Mul, self.s, scale.into());
        for v in vals {
            let d = b.bin(BinOp::Sub, Ty::F32, (*v).into(), safe.into());
            let e = exp(b, d);
            b.bin_into(BinOp::Add, self.s, e.into());
        }
        b.assign(self.m, mn.into());
    }

    /// Combines two pairs (commutative bit for bit, so butterfly lanes agree).
    fn combine(b: &mut Builder, m1: Reg, s1: Reg, m2: Reg, s2: Reg) -> (Reg, Reg) {
        let mn = b.bin(BinOp::Max, Ty::F32, m1.into(), m2.into());
        let safe = finite_or_zero(b, mn);
        let d1 = b.bin(BinOp::Sub, Ty::F32, m1.into(), safe.into());
        let d2 = b.bin(BinOp::Sub, Ty::F32, m2.into(), safe.into());
        let e1 = exp(b, d1);
        let e2 = exp(b, d2);
        let t1 = b.mul(Ty::F32, s1.into(), e1.into());
        let t2 = b.mul(Ty::F32, s2.into(), e2.into());
        (mn, b.add(Ty::F32, t1.into(), t2.into()))
    }

    /// The block-wide pair (every thread gets it); `sm`, `ss` are shared arrays of one f32 per warp.
    pub(crate) fn reduce(&self, b: &mut Builder, sm: Operand, ss: Operand, warps: u32, c: &Coords) -> (Reg, Reg) {
        let (mut m, mut s) = (self.m, self.s);
        for off in [16u32, 8, 4, 2, 1] {
            let om = b.shfl(ShflMode::Bfly, m, off.into());
            let os = b.shfl(ShflMode::Bfly, s, off.into());
            (m, s) = Online::combine(b, m, s, om, os);
        }
        if warps == 1 {
            return (m, s);
        }
        let first = b.setp(Cmp::Eq, Ty::U32, c.lane.into(), 0u32.into());
        let am = b.index_shared(sm, c.warp.into(), 4);
        let as_ = b.index_shared(ss, c.warp.into(), 4);
        b.if_(first, |b| {
            b.st(Space::Shared, Ty::F32, am.into(), 0, m.into());
            b.st(Space::Shared, Ty::F32, as_.into(), 0, s.into());
        });
        b.bar();
        let bm = b.shared_addr(sm);
        let bs = b.shared_addr(ss);
        let mut m = b.ld(Space::Shared, Ty::F32, Cache::None, bm.into(), 0);
        let mut s = b.ld(Space::Shared, Ty::F32, Cache::None, bs.into(), 0);
        for w in 1..warps {
            let om = b.ld(Space::Shared, Ty::F32, Cache::None, bm.into(), 4 * i64::from(w));
            let os = b.ld(Space::Shared, Ty::F32, Cache::None, bs.into(), 4 * i64::from(w));
            (m, s) = Online::combine(b, m, s, om, os);
        }
        b.bar();
        (m, s)
    }
}

/// A row kernel's common start: builder, args, the logits pointer, the rows loop bounds.
struct RowKernel {
    b: Builder,
    args: Args,
    layout: RowLayout,
    logits: Reg,
}

impl RowKernel {
    fn new(name: &str, vocab: u32, dtype: DType) -> Result<RowKernel, CodegenError> {
        let layout = RowLayout::new(vocab, dtype, "logits")?;
        let mut b = Builder::new(format!("{name}_{}_{vocab}", layout.elem.name()));
        declare_block(&mut b, layout.threads);
        let mut args = Args::default();
        let logits = args.ptr(&mut b, "logits", 0);
        Ok(RowKernel { b, args, layout, logits })
    }

    /// Emits the uniform rows loop (one block per row).
    fn rows(&mut self, rows: Operand, body: impl FnOnce(&mut Builder, Reg)) {
        let ctaid = self.b.special(Special::CtaidX);
        let nctaid = self.b.special(Special::NctaidX);
        self.b.for_uniform(Ty::U32, ctaid.into(), rows, nctaid.into(), body);
    }

    fn finish(self, rows: &Dim) -> Generated {
        let threads = self.layout.threads;
        let kernel = self.b.finish();
        Generated {
            kernel,
            launch: LaunchRule {
                grid: grid3(rows.clone()),
                block: [threads, 1, 1],
                dynamic_shared: 0,
                args: self.args.rules,
            },
        }
    }
}

/// `probs[r] = softmax(logits[r])` (f32) for `rows` rows of `vocab` logits.
pub fn softmax(rows: &Dim, vocab: u32, dtype: DType) -> Result<Generated, CodegenError> {
    let mut k = RowKernel::new("softmax", vocab, dtype)?;
    let l = k.layout;
    k.b.doc(format!("softmax over rows of {vocab}: online max/sum pass, then the output pass (f32)"));
    k.b.doc(l.doc());
    let probs = k.args.ptr(&mut k.b, "probs", 1);
    let nrows = k.args.size(&mut k.b, "rows", rows);
    let c = coords(&mut k.b);
    let sm = k.b.shared("red_max", 4 * l.warps(), 4);
    let ss = k.b.shared("red_sum", 4 * l.warps(), 4);
    let logits = k.logits;
    k.rows(nrows, |b, r| {
        let row = l.row(b, logits, r, l.elem.bytes());
        let on = Online::new(b);
        l.scan(b, row, c.tid, |b, _, vals| on.add(b, vals));
        let (m, s) = on.reduce(b, sm, ss, l.warps(), &c);
        let inv = b.un(UnOp::Rcp, Ty::F32, s.into());
        let out = l.row(b, probs, r, 4);
        l.scan(b, row, c.tid, |b, i, vals| {
            let p: Vec<Reg> = vals
                .iter()
                .map(|x| {
                    let d = b.bin(BinOp::Sub, Ty::F32, (*x).into(), m.into());
                    let e = exp(b, d);
                    b.mul(Ty::F32, e.into(), inv.into())
                })
                .collect();
            let a = b.index(out, i, 4);
            store(b, Elem::F32, a, 0, &p);
        });
    });
    Ok(k.finish(rows))
}

/// `index[r] = argmax(logits[r])` (i32; ties → lowest index; NaN never wins; all NaN → 0).
pub fn argmax(rows: &Dim, vocab: u32, dtype: DType) -> Result<Generated, CodegenError> {
    let mut k = RowKernel::new("argmax", vocab, dtype)?;
    let l = k.layout;
    k.b.doc(format!("argmax over rows of {vocab}: (value, index) pairs, larger value then smaller index wins"));
    k.b.doc(l.doc());
    let out = k.args.ptr(&mut k.b, "index", 1);
    let nrows = k.args.size(&mut k.b, "rows", rows);
    let c = coords(&mut k.b);
    let warps = l.warps();
    let sv = k.b.shared("red_val", 4 * warps, 4);
    let si = k.b.shared("red_idx", 4 * warps, 4);
    let logits = k.logits;
    k.rows(nrows, |b, r| {
        let row = l.row(b, logits, r, l.elem.bytes());
        let best = b.mov(Ty::F32, f32::NEG_INFINITY.into());
        let idx = b.mov(Ty::U32, u32::MAX.into());
        l.scan(b, row, c.tid, |b, i, vals| {
            for (lane, x) in vals.iter().enumerate() {
                let xi = b.add(Ty::U32, i.into(), (lane as u32).into());
                take_better(b, best, idx, *x, xi);
            }
        });
        for off in [16u32, 8, 4, 2, 1] {
            let ov = b.shfl(ShflMode::Bfly, best, off.into());
            let oi = b.shfl(ShflMode::Bfly, idx, off.into());
            take_better(b, best, idx, ov, oi);
        }
        if warps > 1 {
            let first = b.setp(Cmp::Eq, Ty::U32, c.lane.into(), 0u32.into());
            let av = b.index_shared(sv, c.warp.into(), 4);
            let ai = b.index_shared(si, c.warp.into(), 4);
            b.if_(first, |b| {
                b.st(Space::Shared, Ty::F32, av.into(), 0, best.into());
                b.st(Space::Shared, Ty::U32, ai.into(), 0, idx.into());
            });
            b.bar();
            let bv = b.shared_addr(sv);
            let bi = b.shared_addr(si);
            for w in 0..warps {
                let ov = b.ld(Space::Shared, Ty::F32, Cache::None, bv.into(), 4 * i64::from(w));
                let oi = b.ld(Space::Shared, Ty::U32, Cache::None, bi.into(), 4 * i64::from(w));
                take_better(b, best, idx, ov, oi);
            }
            b.bar();
        }
        let first = b.setp(Cmp::Eq, Ty::U32, c.tid.into(), 0u32.into());
        b.if_(first, |b| {
            let none = b.setp(Cmp::Eq, Ty::U32, idx.into(), u32::MAX.into());
            let v = b.selp(Ty::U32, 0u32.into(), idx.into(), none);
            let a = b.index(out, r, 4);
            b.st(Space::Global, Ty::U32, a.into(), 0, v.into());
        });
    });
    Ok(k.finish(rows))
}

/// `(best, idx) ← (x, xi)` when `x > best`, or `x == best` and `xi < idx` (NaN never taken).
fn take_better(b: &mut Builder, best: Reg, idx: Reg, x: Reg, xi: Reg) {
    let gt = b.setp(Cmp::Gt, Ty::F32, x.into(), best.into());
    let eq = b.setp(Cmp::Eq, Ty::F32, x.into(), best.into());
    let lo = b.setp(Cmp::Lt, Ty::U32, xi.into(), idx.into());
    let tie = b.bin(BinOp::And, Ty::Pred, eq.into(), lo.into());
    let take = b.bin(BinOp::Or, Ty::Pred, gt.into(), tie.into());
    let nb = b.selp(Ty::F32, x.into(), best.into(), take);
    let ni = b.selp(Ty::U32, xi.into(), idx.into(), take);
    b.assign(best, nb.into());
    b.assign(idx, ni.into());
}

/// The order-preserving u32 key of an f32 (`−0` as `+0`; NaN → 0, below every number).
fn value_key(b: &mut Builder, x: Reg) -> Reg {
    let x0 = b.add(Ty::F32, x.into(), 0.0f32.into());
    let bits = super::elementwise::f32_bits(b, x0);
    let sign = b.bin(BinOp::Shr, Ty::S32, bits.into(), 31u32.into());
    let flip = b.bin(BinOp::Or, Ty::B32, sign.into(), 0x8000_0000u32.into());
    let key = b.bin(BinOp::Xor, Ty::B32, bits.into(), flip.into());
    let num = b.setp(Cmp::Eq, Ty::F32, x.into(), x.into());
    b.selp(Ty::U32, key.into(), 0u32.into(), num)
}

/// `(indices, values)[r] = the k largest of logits[r]`, sorted descending, ties → lowest index first.
pub fn top_k(rows: &Dim, vocab: u32, k: u32, dtype: DType) -> Result<Generated, CodegenError> {
    if k == 0 || k > MAX_K || k > vocab {
        return Err(CodegenError::Shape(format!("top-k needs 1 ≤ k ≤ min({MAX_K}, vocabulary {vocab}), found {k}")));
    }
    let mut kern = RowKernel::new("top_k", vocab, dtype)?;
    let l = kern.layout;
    kern.b.doc(format!("top-{k} over rows of {vocab}: radix select on (value key, reversed index), then a rank sort"));
    kern.b.doc(l.doc());
    let out_idx = kern.args.ptr(&mut kern.b, "indices", 1);
    let out_val = kern.args.ptr(&mut kern.b, "values", 2);
    let nrows = kern.args.size(&mut kern.b, "rows", rows);
    let c = coords(&mut kern.b);
    let hist = kern.b.shared("hist", 256 * 4, 16);
    let sel = kern.b.shared("sel", 16, 16);
    let cnt = kern.b.shared("count", 4, 4);
    let ckey = kern.b.shared("cand_key", 4 * k, 4);
    let cidx = kern.b.shared("cand_idx", 4 * k, 4);
    let cval = kern.b.shared("cand_val", 4 * k, 4);
    let nbits = 32 - (vocab - 1).leading_zeros();
    let imask = if nbits == 0 { 0 } else { u32::MAX >> (32 - nbits) };
    let mut idx_digits = Vec::new();
    let mut s = nbits;
    while s > 0 {
        let w = s.min(8);
        s -= w;
        idx_digits.push((s, w));
    }
    let logits = kern.logits;
    let threads = l.threads;
    kern.rows(nrows, |b, r| {
        let row = l.row(b, logits, r, l.elem.bytes());
        let t0 = b.setp(Cmp::Eq, Ty::U32, c.tid.into(), 0u32.into());
        b.if_(t0, |b| b.st(Space::Shared, Ty::U32, cnt, 0, 0u32.into()));
        let vprefix = b.mov(Ty::U32, 0u32.into());
        let vmask = b.mov(Ty::U32, 0u32.into());
        let iprefix = b.mov(Ty::U32, 0u32.into());
        let imask_r = b.mov(Ty::U32, 0u32.into());
        let kk = b.mov(Ty::U32, k.into());
        let eqc = b.mov(Ty::U32, 0u32.into());
        let pass = |b: &mut Builder, index_pass: bool, shift: u32, width: u32| {
            // Clear the histogram.
            b.for_(Ty::U32, c.tid.into(), 256u32.into(), threads.into(), |b, i| {
                let a = b.index_shared(hist, i.into(), 4);
                b.st(Space::Shared, Ty::U32, a.into(), 0, 0u32.into());
            });
            b.bar();
            l.scan(b, row, c.tid, |b, i, vals| {
                for (lane, x) in vals.iter().enumerate() {
                    let vk = value_key(b, *x);
                    let (key, matches) = if index_pass {
                        let xi = b.add(Ty::U32, i.into(), (lane as u32).into());
                        let ik = b.bin(BinOp::Sub, Ty::U32, imask.into(), xi.into());
                        let veq = b.setp(Cmp::Eq, Ty::U32, vk.into(), vprefix.into());
                        let im = b.bin(BinOp::And, Ty::B32, ik.into(), imask_r.into());
                        let ieq = b.setp(Cmp::Eq, Ty::U32, im.into(), iprefix.into());
                        (ik, b.bin(BinOp::And, Ty::Pred, veq.into(), ieq.into()))
                    } else {
                        let vm = b.bin(BinOp::And, Ty::B32, vk.into(), vmask.into());
                        (vk, b.setp(Cmp::Eq, Ty::U32, vm.into(), vprefix.into()))
                    };
                    b.if_(matches, |b| {
                        let d = b.bin(BinOp::Shr, Ty::U32, key.into(), shift.into());
                        let d = b.bin(BinOp::And, Ty::B32, d.into(), ((1u32 << width) - 1).into());
                        let a = b.index_shared(hist, d.into(), 4);
                        b.red(AtomOp::Add, Space::Shared, Ty::U32, a.into(), 1u32.into());
                    });
                }
            });
            b.bar();
            find_digit(b, hist, sel, kk, &c);
            b.bar();
            let sa = b.shared_addr(sel);
            let d = b.ld(Space::Shared, Ty::U32, Cache::None, sa.into(), 0);
            let nk = b.ld(Space::Shared, Ty::U32, Cache::None, sa.into(), 4);
            let ne = b.ld(Space::Shared, Ty::U32, Cache::None, sa.into(), 8);
            b.assign(kk, nk.into());
            b.assign(eqc, ne.into());
            let (prefix, mask) = if index_pass { (iprefix, imask_r) } else { (vprefix, vmask) };
            let ds = b.bin(BinOp::Shl, Ty::B32, d.into(), shift.into());
            b.bin_into(BinOp::Or, prefix, ds.into());
            b.bin_into(BinOp::Or, mask, (((1u32 << width) - 1) << shift).into());
        };
        for shift in [24u32, 16, 8, 0] {
            pass(b, false, shift, 8);
        }
        // The k-th value is tied across the cut: order the tied elements by index.
        let tie = b.setp(Cmp::Ne, Ty::U32, eqc.into(), kk.into());
        b.if_uniform(tie, |b| {
            for &(shift, width) in &idx_digits {
                pass(b, true, shift, width);
            }
        });
        // Collect the k selected elements.
        l.scan(b, row, c.tid, |b, i, vals| {
            for (lane, x) in vals.iter().enumerate() {
                let vk = value_key(b, *x);
                let xi = b.add(Ty::U32, i.into(), (lane as u32).into());
                let ik = b.bin(BinOp::Sub, Ty::U32, imask.into(), xi.into());
                let gt = b.setp(Cmp::Gt, Ty::U32, vk.into(), vprefix.into());
                let veq = b.setp(Cmp::Eq, Ty::U32, vk.into(), vprefix.into());
                let ige = b.setp(Cmp::Ge, Ty::U32, ik.into(), iprefix.into());
                let tied = b.bin(BinOp::And, Ty::Pred, veq.into(), ige.into());
                let take = b.bin(BinOp::Or, Ty::Pred, gt.into(), tied.into());
                let x = *x;
                b.if_(take, |b| {
                    let slot = b.atom(AtomOp::Add, Space::Shared, Ty::U32, cnt, 1u32.into());
                    let fits = b.setp(Cmp::Lt, Ty::U32, slot.into(), k.into());
                    b.if_(fits, |b| {
                        let a = b.index_shared(ckey, slot.into(), 4);
                        b.st(Space::Shared, Ty::U32, a.into(), 0, vk.into());
                        let a = b.index_shared(cidx, slot.into(), 4);
                        b.st(Space::Shared, Ty::U32, a.into(), 0, xi.into());
                        let a = b.index_shared(cval, slot.into(), 4);
                        b.st(Space::Shared, Ty::F32, a.into(), 0, x.into());
                    });
                });
            }
        });
        b.bar();
        // Rank sort (threads loop over the k candidates): element t goes to position
        // #{j : key_j > key_t, or equal keys and idx_j < idx_t}.
        b.for_(Ty::U32, c.tid.into(), k.into(), threads.into(), |b, me| {
            let a = b.index_shared(ckey, me.into(), 4);
            let my_key = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
            let a = b.index_shared(cidx, me.into(), 4);
            let my_idx = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
            let a = b.index_shared(cval, me.into(), 4);
            let my_val = b.ld(Space::Shared, Ty::F32, Cache::None, a.into(), 0);
            let rank = b.mov(Ty::U32, 0u32.into());
            b.for_(Ty::U32, 0u32.into(), k.into(), 1u32.into(), |b, j| {
                let a = b.index_shared(ckey, j.into(), 4);
                let kj = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
                let a = b.index_shared(cidx, j.into(), 4);
                let ij = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
                let gt = b.setp(Cmp::Gt, Ty::U32, kj.into(), my_key.into());
                let eq = b.setp(Cmp::Eq, Ty::U32, kj.into(), my_key.into());
                let lo = b.setp(Cmp::Lt, Ty::U32, ij.into(), my_idx.into());
                let tie = b.bin(BinOp::And, Ty::Pred, eq.into(), lo.into());
                let before = b.bin(BinOp::Or, Ty::Pred, gt.into(), tie.into());
                let inc = b.selp(Ty::U32, 1u32.into(), 0u32.into(), before);
                b.bin_into(BinOp::Add, rank, inc.into());
            });
            let pos = b.mad(Ty::U32, r.into(), k.into(), rank.into());
            let a = b.index(out_idx, pos, 4);
            b.st(Space::Global, Ty::U32, a.into(), 0, my_idx.into());
            let a = b.index(out_val, pos, 4);
            b.st(Space::Global, Ty::F32, a.into(), 0, my_val.into());
        });
        b.bar();
    });
    Ok(kern.finish(rows))
}

/// Warp 0 finds the digit holding the `kk`-th largest key among the histogram's counts (bins scanned
/// from 255 down) and writes `(digit, kk − count above it, count in it)` to `sel`.
fn find_digit(b: &mut Builder, hist: Operand, sel: Operand, kk: Reg, c: &Coords) {
    let w0 = b.setp(Cmp::Eq, Ty::U32, c.warp.into(), 0u32.into());
    b.if_(w0, |b| {
        // Lane l owns bins 255 − 8l − j, j = 0..8 (descending).
        let top = b.mad(Ty::U32, c.lane.into(), (-8i32).into(), 255u32.into());
        let mut counts = Vec::new();
        let mut bins = Vec::new();
        let sum = b.mov(Ty::U32, 0u32.into());
        for j in 0..8u32 {
            let bin = b.bin(BinOp::Sub, Ty::U32, top.into(), j.into());
            let a = b.index_shared(hist, bin.into(), 4);
            let n = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
            b.bin_into(BinOp::Add, sum, n.into());
            counts.push(n);
            bins.push(bin);
        }
        let incl = b.mov(Ty::U32, sum.into());
        for off in [1u32, 2, 4, 8, 16] {
            let t = b.shfl(ShflMode::Up, incl, off.into());
            let has = b.setp(Cmp::Ge, Ty::U32, c.lane.into(), off.into());
            let add = b.selp(Ty::U32, t.into(), 0u32.into(), has);
            b.bin_into(BinOp::Add, incl, add.into());
        }
        let excl = b.bin(BinOp::Sub, Ty::U32, incl.into(), sum.into());
        let below = b.setp(Cmp::Lt, Ty::U32, excl.into(), kk.into());
        let reaches = b.setp(Cmp::Ge, Ty::U32, incl.into(), kk.into());
        let here = b.bin(BinOp::And, Ty::Pred, below.into(), reaches.into());
        b.if_(here, |b| {
            let run = b.mov(Ty::U32, excl.into());
            let digit = b.mov(Ty::U32, 0u32.into());
            let nk = b.mov(Ty::U32, 0u32.into());
            let eq = b.mov(Ty::U32, 0u32.into());
            for j in 0..8 {
                let next = b.add(Ty::U32, run.into(), counts[j].into());
                let lt = b.setp(Cmp::Lt, Ty::U32, run.into(), kk.into());
                let ge = b.setp(Cmp::Ge, Ty::U32, next.into(), kk.into());
                let hit = b.bin(BinOp::And, Ty::Pred, lt.into(), ge.into());
                let rem = b.bin(BinOp::Sub, Ty::U32, kk.into(), run.into());
                let d = b.selp(Ty::U32, bins[j].into(), digit.into(), hit);
                let n = b.selp(Ty::U32, rem.into(), nk.into(), hit);
                let e = b.selp(Ty::U32, counts[j].into(), eq.into(), hit);
                b.assign(digit, d.into());
                b.assign(nk, n.into());
                b.assign(eq, e.into());
                b.assign(run, next.into());
            }
            let sa = b.shared_addr(sel);
            b.st(Space::Shared, Ty::U32, sa.into(), 0, digit.into());
            b.st(Space::Shared, Ty::U32, sa.into(), 4, nk.into());
            b.st(Space::Shared, Ty::U32, sa.into(), 8, eq.into());
        });
    });
}
