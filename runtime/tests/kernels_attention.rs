//! The attention kernels (`flashc_codegen::kernels::attention`) on the `sim` device against the cpu
//! reference kernels (`flashc_runtime::cpu::{attention_prefill, attention_decode, kv_write}`), on
//! fresh random bf16-quantised inputs: outputs are poisoned first (the sim's allocations are 0xFF,
//! bf16 NaN) and checked whole; stale cache slots hold NaN, so a kernel that reads a slot it must not
//! fails. The prefill writes the caches in the same kernel: the slots it must write are poisoned
//! first (unless a query still reads their old key), every written slot must hold the new row and
//! every other slot its old bits, and the caches must equal the cpu reference's bit for bit. Errors
//! are relative Frobenius norms (< 1e-2). Every kernel is also assembled with ptxas for
//! sm_80 and sm_90 (skipped with a message when ptxas is missing, a failure with
//! `FLASHC_REQUIRE_PTXAS=1`); `-- --nocapture` prints the errors, the ptxas table and the cost model.

use std::collections::HashMap;

use flashc_codegen::kernels::attention::{
    self, DecodeOperands, DecodeSpec, KvWriteSpec, PrefillOperands, PrefillSpec, decode_cost, decode_nsplit,
    decode_tiling, prefill_cost, prefill_grid,
};
use flashc_codegen::kernels::{ArgRule, Generated};
use flashc_codegen::ptx::{self, Options, Target, ptxas};
use flashc_compiler::gir::{Bindings, Dim, Sym};
use flashc_compiler::schedule::BufferId;
use flashc_runtime::cpu::{AttentionDims, attention_decode, attention_prefill, kv_write};
use flashc_runtime::sim::{Arg, GlobalMemory, Launch, bf16_to_f32, f32_to_bf16, run};

// ---------------------------------------------------------------------------------------------- helpers

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1), rounded to bf16.
    fn bf16(&mut self) -> f32 {
        let x = (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        q(x)
    }

    fn bf16s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.bf16()).collect()
    }
}

fn q(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output {g} (want {w})");
        num += f64::from(g - w).powi(2);
        den += f64::from(*w).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// Buffers of one test, by placeholder id.
#[derive(Default)]
struct Bufs {
    addr: HashMap<u32, u64>,
}

impl Bufs {
    fn bf16(&mut self, mem: &mut GlobalMemory, id: BufferId, v: &[f32]) {
        let a = mem.alloc(v.len().max(1) * 2);
        mem.write_bf16(a, v).expect("in bounds");
        self.addr.insert(id.0, a);
    }

    fn i32(&mut self, mem: &mut GlobalMemory, id: BufferId, v: &[i32]) {
        let a = mem.alloc(v.len().max(1) * 4);
        mem.write_i32(a, v).expect("in bounds");
        self.addr.insert(id.0, a);
    }

    /// An output or workspace: left poisoned (0xFF).
    fn poisoned(&mut self, mem: &mut GlobalMemory, id: BufferId, bytes: usize) {
        let a = mem.alloc(bytes.max(1));
        self.addr.insert(id.0, a);
    }

    fn get(&self, id: BufferId) -> u64 {
        self.addr[&id.0]
    }
}

/// Launches a generated kernel on the sim as its launch rule says.
fn launch(g: &Generated, at: &Bindings, bufs: &Bufs, mem: &mut GlobalMemory, grid: Option<[u32; 3]>) {
    let args: Vec<Arg> = g
        .launch
        .args
        .iter()
        .map(|a| match a {
            ArgRule::Buffer(id) => Arg::Ptr(bufs.get(*id)),
            ArgRule::View(id, off) => Arg::Ptr(bufs.get(*id) + off.eval(at) as u64),
            ArgRule::Size(d) => Arg::U32(u32::try_from(d.eval(at)).expect("size fits u32")),
            ArgRule::U32(x) => Arg::U32(*x),
            ArgRule::F32(x) => Arg::F32(*x),
        })
        .collect();
    let grid = grid.unwrap_or_else(|| g.launch.grid_at(at));
    if grid.contains(&0) {
        return;
    }
    let l = Launch { grid, block: g.launch.block, dynamic_shared: g.launch.dynamic_shared };
    run(&g.kernel, &l, &args, mem).unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name));
}

/// A cache `[B, C, Hkv, d]` holding, for each sequence, positions `lo_b ..< end_b` of `hist`
/// (`[B, L, Hkv, d]`) in their ring slots; every other slot is NaN (stale, must never be read).
fn ring_cache(hist: &[f32], batch: usize, len: usize, row: usize, cap: usize, ranges: &[(usize, usize)]) -> Vec<f32> {
    let mut c = vec![f32::NAN; batch * cap * row];
    for (b, &(lo, end)) in ranges.iter().enumerate() {
        for pos in lo..end {
            let slot = pos % cap;
            c[(b * cap + slot) * row..(b * cap + slot + 1) * row]
                .copy_from_slice(&hist[(b * len + pos) * row..(b * len + pos + 1) * row]);
        }
    }
    c
}

/// Rows `lo..hi` of each sequence of `[B, len, row]`.
fn rows(x: &[f32], batch: usize, len: usize, row: usize, lo: usize, hi: usize) -> Vec<f32> {
    (0..batch).flat_map(|b| x[(b * len + lo) * row..(b * len + hi) * row].to_vec()).collect()
}

fn first_visible(p: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (p + 1).saturating_sub(w))
}

// ---------------------------------------------------------------------------------------------- prefill

#[derive(Clone, Debug)]
struct PrefillCase {
    batch: usize,
    tokens: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    cap: usize,
    window: Option<usize>,
    start: Vec<usize>,
    lens: Vec<usize>,
}

fn prefill_spec(c: &PrefillCase, scale: f64) -> PrefillSpec {
    PrefillSpec {
        name: format!("attn_prefill_d{}_g{}", c.d, c.hq / c.hkv),
        q_heads: c.hq as u32,
        kv_heads: c.hkv as u32,
        head_dim: c.d as u32,
        tokens: Dim::sym(Sym::T),
        capacity: Dim::constant(c.cap as i64),
        window: c.window.map(|w| w as u64),
        scale,
        operands: PrefillOperands::numbered(),
    }
}

struct PrefillOut {
    o: Vec<f32>,
    kc: Vec<f32>,
    vc: Vec<f32>,
}

/// Runs the generated prefill (one kernel: attention and the cache write) on the sim.
#[allow(clippy::too_many_arguments)]
fn sim_prefill(
    c: &PrefillCase,
    scale: f64,
    qv: &[f32],
    k: &[f32],
    v: &[f32],
    kc: &[f32],
    vc: &[f32],
    exact_grid: bool,
) -> PrefillOut {
    let spec = prefill_spec(c, scale);
    let gens = attention::attention_prefill(&spec).expect("generates");
    assert_eq!(gens.len(), 1, "the prefill is one kernel");
    let ops = spec.operands;
    let mut mem = GlobalMemory::new();
    let mut bufs = Bufs::default();
    bufs.bf16(&mut mem, ops.q, qv);
    bufs.bf16(&mut mem, ops.k, k);
    bufs.bf16(&mut mem, ops.v, v);
    bufs.bf16(&mut mem, ops.kcache, kc);
    bufs.bf16(&mut mem, ops.vcache, vc);
    bufs.i32(&mut mem, ops.start, &c.start.iter().map(|&s| s as i32).collect::<Vec<_>>());
    bufs.i32(&mut mem, ops.lens, &c.lens.iter().map(|&s| s as i32).collect::<Vec<_>>());
    bufs.poisoned(&mut mem, ops.o, qv.len() * 2);
    let at = Bindings { b: c.batch as i64, t: c.tokens as i64, s: 0 };
    let grid = exact_grid.then(|| prefill_grid(&spec, c.batch as u32, c.tokens as u32));
    launch(&gens[0], &at, &bufs, &mut mem, grid);
    PrefillOut {
        o: mem.read_bf16(bufs.get(ops.o), qv.len()).expect("o"),
        kc: mem.read_bf16(bufs.get(ops.kcache), kc.len()).expect("kcache"),
        vc: mem.read_bf16(bufs.get(ops.vcache), vc.len()).expect("vcache"),
    }
}

/// A cache slot the prefill must write and whose old key no query reads: a finite value far outside
/// the inputs' [-1, 1), so a slot left unwritten or a read of it shows.
const POISON: f32 = 7168.0;

/// The slots the prefill writes, `(b, slot, token)`: the last `C` of the `lens[b]` valid tokens.
fn written_slots(c: &PrefillCase) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for b in 0..c.batch {
        for t in c.lens[b].saturating_sub(c.cap)..c.lens[b] {
            out.push((b, (c.start[b] + t) % c.cap, t));
        }
    }
    out
}

/// Poisons the written slots of `cache` whose cached position (if any) no query sees; returns how
/// many it poisoned.
fn poison_written(c: &PrefillCase, cache: &mut [f32], row: usize) -> usize {
    let mut n = 0;
    for (b, slot, _) in written_slots(c) {
        let s = c.start[b];
        let held = (s.saturating_sub(c.cap)..s).find(|p| p % c.cap == slot);
        if held.is_none_or(|p| p < first_visible(s, c.window)) {
            cache[(b * c.cap + slot) * row..(b * c.cap + slot + 1) * row].fill(POISON);
            n += 1;
        }
    }
    n
}

/// The cache after the prefill: every written slot holds its token's new row, every other slot its
/// old bits.
fn check_cache(c: &PrefillCase, what: &str, before: &[f32], after: &[f32], new: &[f32], row: usize) {
    let mut token = vec![None; c.batch * c.cap];
    for (b, slot, t) in written_slots(c) {
        token[b * c.cap + slot] = Some(t);
    }
    for (i, t) in token.iter().enumerate() {
        let got = &after[i * row..(i + 1) * row];
        let (b, slot) = (i / c.cap, i % c.cap);
        match t {
            Some(t) => {
                let want = &new[(b * c.tokens + t) * row..(b * c.tokens + t + 1) * row];
                assert!(same_bits(got, want), "prefill {c:?}: {what} slot {slot} of sequence {b} lacks token {t}");
            }
            None => {
                let old = &before[i * row..(i + 1) * row];
                // Stale slots are NaN (canonical in the sim's bf16); any write shows as other bits.
                assert!(same_bits(got, old), "prefill {c:?}: {what} slot {slot} of sequence {b} must be untouched");
            }
        }
    }
}

/// One prefill case: random history, caches holding the visible prefix (written slots poisoned),
/// sim vs cpu, the caches checked slot by slot.
fn check_prefill(c: &PrefillCase, seed: u64, exact_grid: bool) -> f64 {
    let mut rng = Rng(seed);
    let scale = 1.0 / (c.d as f64).sqrt();
    let row = c.hkv * c.d;
    let len = c.start.iter().max().copied().unwrap_or(0) + c.tokens;
    let kf = rng.bf16s(c.batch * len * row);
    let vf = rng.bf16s(c.batch * len * row);
    let qv = rng.bf16s(c.batch * c.tokens * c.hq * c.d);
    let pick = |hist: &[f32]| -> Vec<f32> {
        (0..c.batch)
            .flat_map(|b| hist[(b * len + c.start[b]) * row..(b * len + c.start[b] + c.tokens) * row].to_vec())
            .collect()
    };
    let (k, v) = (pick(&kf), pick(&vf));
    // The cache holds the last C cached positions (what a ring buffer keeps).
    let ranges: Vec<(usize, usize)> = c.start.iter().map(|&s| (s.saturating_sub(c.cap), s)).collect();
    let mut kc = ring_cache(&kf, c.batch, len, row, c.cap, &ranges);
    let mut vc = ring_cache(&vf, c.batch, len, row, c.cap, &ranges);
    let poisoned = poison_written(c, &mut kc, row);
    poison_written(c, &mut vc, row);

    let got = sim_prefill(c, scale, &qv, &k, &v, &kc, &vc, exact_grid);

    let dims = AttentionDims {
        batch: c.batch,
        tokens: c.tokens,
        q_heads: c.hq,
        kv_heads: c.hkv,
        head_dim: c.d,
        capacity: c.cap,
    };
    let (mut kc_w, mut vc_w) = (kc.clone(), vc.clone());
    let mut want = vec![0.0; qv.len()];
    let start: Vec<i32> = c.start.iter().map(|&s| s as i32).collect();
    let lens: Vec<i32> = c.lens.iter().map(|&s| s as i32).collect();
    attention_prefill(&dims, &qv, &k, &v, &mut kc_w, &mut vc_w, &start, &lens, c.window, scale, &mut want)
        .expect("cpu prefill");
    let err = rel_err(&got.o, &want);
    let written = written_slots(c).len();
    println!("prefill {c:?}: rel err {err:.2e}, {written} slots written ({poisoned} poisoned first)");
    assert!(err < 1e-2, "prefill {c:?}: rel err {err}");
    check_cache(c, "k cache", &kc, &got.kc, &k, row);
    check_cache(c, "v cache", &vc, &got.vc, &v, row);
    assert!(same_bits(&got.kc, &kc_w), "prefill {c:?}: k cache differs");
    assert!(same_bits(&got.vc, &vc_w), "prefill {c:?}: v cache differs");
    err
}

#[test]
fn prefill_head_dims_and_gqa() {
    // Lengths below, at and above the tile (64 rows = 64/G tokens; 64 keys).
    let cases = [
        PrefillCase {
            batch: 1,
            tokens: 20,
            hq: 2,
            hkv: 1,
            d: 32,
            cap: 96,
            window: None,
            start: vec![0],
            lens: vec![20],
        },
        PrefillCase {
            batch: 1,
            tokens: 32,
            hq: 4,
            hkv: 2,
            d: 64,
            cap: 64,
            window: None,
            start: vec![0],
            lens: vec![32],
        },
        PrefillCase {
            batch: 1,
            tokens: 37,
            hq: 4,
            hkv: 1,
            d: 32,
            cap: 64,
            window: None,
            start: vec![0],
            lens: vec![37],
        },
        PrefillCase {
            batch: 1,
            tokens: 70,
            hq: 3,
            hkv: 1,
            d: 32,
            cap: 80,
            window: None,
            start: vec![0],
            lens: vec![70],
        },
        // No GQA, exactly one query tile and one key tile.
        PrefillCase {
            batch: 1,
            tokens: 64,
            hq: 2,
            hkv: 2,
            d: 64,
            cap: 64,
            window: None,
            start: vec![0],
            lens: vec![64],
        },
        // A width whose rows are not a power of two of chunks (no swizzle).
        PrefillCase {
            batch: 1,
            tokens: 33,
            hq: 2,
            hkv: 1,
            d: 48,
            cap: 64,
            window: None,
            start: vec![9],
            lens: vec![30],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        check_prefill(c, 100 + i as u64, false);
    }
}

#[test]
fn prefill_head_dim_128() {
    let c = PrefillCase {
        batch: 1,
        tokens: 24,
        hq: 2,
        hkv: 1,
        d: 128,
        cap: 64,
        window: None,
        start: vec![5],
        lens: vec![24],
    };
    check_prefill(&c, 7, true);
}

#[test]
fn prefill_batch_with_prefix_and_lens() {
    // Different cached prefixes (one crossing a key tile) and valid lengths; kv heads 2, group 2.
    let c = PrefillCase {
        batch: 3,
        tokens: 19,
        hq: 4,
        hkv: 2,
        d: 32,
        cap: 128,
        window: None,
        start: vec![0, 7, 70],
        lens: vec![19, 11, 0],
    };
    check_prefill(&c, 21, true);
}

#[test]
fn prefill_sliding_window_ring_buffer() {
    // Window smaller than T, ring-buffer caches of the window's size (and one larger), prefixes that
    // wrap the ring, padding that must not overwrite slots.
    let cases = [
        PrefillCase {
            batch: 2,
            tokens: 40,
            hq: 2,
            hkv: 1,
            d: 32,
            cap: 16,
            window: Some(16),
            start: vec![0, 23],
            lens: vec![40, 29],
        },
        PrefillCase {
            batch: 2,
            tokens: 30,
            hq: 4,
            hkv: 2,
            d: 64,
            cap: 24,
            window: Some(9),
            start: vec![50, 3],
            lens: vec![30, 30],
        },
        // Four query tiles over a ring of the window's size: sequence 0 continues a prefix, so the
        // written slots hold keys that earlier tiles' queries read (serial mode); sequence 1 has no
        // prefix and writes only its last 32 tokens (parallel, every tile writes its own).
        PrefillCase {
            batch: 2,
            tokens: 100,
            hq: 2,
            hkv: 1,
            d: 32,
            cap: 32,
            window: Some(32),
            start: vec![40, 0],
            lens: vec![90, 100],
        },
        // The smallest ring the window allows (C = window - 1) and a group of 3, so token 21 is split
        // between tiles 0 and 1: query 21 (in both) reads the cached key in the slot token 21 writes.
        // The sim runs blocks in order and tracks write-then-read, so this is the case where a
        // parallel write would show as a race (the serial mode orders it).
        PrefillCase {
            batch: 1,
            tokens: 50,
            hq: 3,
            hkv: 1,
            d: 32,
            cap: 32,
            window: Some(33),
            start: vec![40],
            lens: vec![50],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        check_prefill(c, 300 + i as u64, i == 1);
    }
}

#[test]
fn prefill_cache_too_small_for_prefix_and_prompt() {
    // No window, a prefix of 20 and 66 valid tokens in 64 slots: the last tokens overwrite cached
    // keys that every query (of both tiles) still reads, so the caches are written after them.
    let c = PrefillCase {
        batch: 1,
        tokens: 70,
        hq: 1,
        hkv: 1,
        d: 32,
        cap: 64,
        window: None,
        start: vec![20],
        lens: vec![66],
    };
    check_prefill(&c, 310, false);
}

// ---------------------------------------------------------------------------------------------- decode

#[derive(Clone, Debug)]
struct DecodeCase {
    hq: usize,
    hkv: usize,
    d: usize,
    cap: usize,
    window: Option<usize>,
    /// Position of each sequence's new token.
    start: Vec<usize>,
    max_splits: u32,
    min_chunk: u32,
}

fn decode_spec(c: &DecodeCase, scale: f64) -> DecodeSpec {
    DecodeSpec {
        name: format!("attn_decode_d{}_g{}", c.d, c.hq / c.hkv),
        q_heads: c.hq as u32,
        kv_heads: c.hkv as u32,
        head_dim: c.d as u32,
        capacity: Dim::constant(c.cap as i64),
        window: c.window.map(|w| w as u64),
        scale,
        max_splits: Some(c.max_splits),
        min_chunk: c.min_chunk,
        operands: DecodeOperands::numbered(),
    }
}

fn sim_decode(c: &DecodeCase, scale: f64, qv: &[f32], kc: &[f32], vc: &[f32]) -> Vec<f32> {
    let spec = decode_spec(c, scale);
    let gens = attention::attention_decode(&spec).expect("generates");
    let (wo, wl) = attention::decode_workspace(&spec).expect("workspace");
    let ops = spec.operands;
    let batch = c.start.len();
    let at = Bindings { b: batch as i64, t: 1, s: 0 };
    let mut mem = GlobalMemory::new();
    let mut bufs = Bufs::default();
    bufs.bf16(&mut mem, ops.q, qv);
    bufs.bf16(&mut mem, ops.kcache, kc);
    bufs.bf16(&mut mem, ops.vcache, vc);
    bufs.i32(&mut mem, ops.start, &c.start.iter().map(|&s| s as i32).collect::<Vec<_>>());
    bufs.poisoned(&mut mem, ops.o, qv.len() * 2);
    bufs.poisoned(&mut mem, ops.part_o, wo.eval(&at) as usize);
    bufs.poisoned(&mut mem, ops.part_lse, wl.eval(&at) as usize);
    for g in &gens {
        launch(g, &at, &bufs, &mut mem, None);
    }
    mem.read_bf16(bufs.get(ops.o), qv.len()).expect("o")
}

fn check_decode(c: &DecodeCase, seed: u64) -> f64 {
    let mut rng = Rng(seed);
    let scale = 1.0 / (c.d as f64).sqrt();
    let batch = c.start.len();
    let row = c.hkv * c.d;
    let len = c.start.iter().max().copied().unwrap_or(0) + 1;
    let kf = rng.bf16s(batch * len * row);
    let vf = rng.bf16s(batch * len * row);
    let qv = rng.bf16s(batch * c.hq * c.d);
    let ranges: Vec<(usize, usize)> = c.start.iter().map(|&p| (first_visible(p, c.window), p + 1)).collect();
    let kc = ring_cache(&kf, batch, len, row, c.cap, &ranges);
    let vc = ring_cache(&vf, batch, len, row, c.cap, &ranges);
    let got = sim_decode(c, scale, &qv, &kc, &vc);
    let dims = AttentionDims { batch, tokens: 1, q_heads: c.hq, kv_heads: c.hkv, head_dim: c.d, capacity: c.cap };
    let mut want = vec![0.0; qv.len()];
    let start: Vec<i32> = c.start.iter().map(|&s| s as i32).collect();
    attention_decode(&dims, &qv, &kc, &vc, &start, c.window, scale, &mut want).expect("cpu decode");
    let err = rel_err(&got, &want);
    let t = decode_tiling(&decode_spec(c, scale)).expect("tiling");
    let splits: Vec<u32> = c
        .start
        .iter()
        .map(|&p| {
            let n = p + 1 - first_visible(p, c.window);
            decode_nsplit(&t, c.hkv as u32, c.min_chunk, batch as u32, n as u32)
        })
        .collect();
    println!("decode {c:?}: splits {splits:?}, rel err {err:.2e}");
    assert!(err < 1e-2, "decode {c:?}: rel err {err}");
    err
}

#[test]
fn decode_cache_lengths_and_split_boundaries() {
    // min_chunk 16: lengths 1, 16 (one split), 17 (two), 48 (three), 49 and 100 (four, uneven).
    let c = DecodeCase {
        hq: 4,
        hkv: 2,
        d: 64,
        cap: 128,
        window: None,
        start: vec![0, 15, 16, 47, 48, 99],
        max_splits: 4,
        min_chunk: 16,
    };
    check_decode(&c, 41);
    // Head dim 32, one kv head, group 3; head dim 128, group 2.
    let c = DecodeCase { hq: 3, hkv: 1, d: 32, cap: 80, window: None, start: vec![70, 5], max_splits: 3, min_chunk: 8 };
    check_decode(&c, 42);
    let c = DecodeCase { hq: 4, hkv: 2, d: 128, cap: 64, window: None, start: vec![40], max_splits: 2, min_chunk: 16 };
    check_decode(&c, 43);
    // A group of 12 (two head chunks of 6, unroll 2) and a width of 6 chunks (8 lanes per key, 2 idle).
    let c =
        DecodeCase { hq: 12, hkv: 1, d: 48, cap: 64, window: None, start: vec![33, 0], max_splits: 2, min_chunk: 8 };
    check_decode(&c, 44);
}

#[test]
fn decode_sliding_window_ring_buffer() {
    // Windows 16 and 9 over rings of 16 and 24 slots, positions far past the capacity.
    let c = DecodeCase {
        hq: 4,
        hkv: 1,
        d: 32,
        cap: 16,
        window: Some(16),
        start: vec![3, 15, 16, 130],
        max_splits: 4,
        min_chunk: 4,
    };
    check_decode(&c, 51);
    let c =
        DecodeCase { hq: 8, hkv: 2, d: 64, cap: 24, window: Some(9), start: vec![200, 8], max_splits: 2, min_chunk: 4 };
    check_decode(&c, 52);
}

#[test]
fn decode_default_split_rule() {
    // The generated-default P with a large min_chunk: one split per sequence at these lengths.
    let scale = 0.125;
    let spec = DecodeSpec {
        name: "attn_decode_default".into(),
        q_heads: 32,
        kv_heads: 8,
        head_dim: 64,
        capacity: Dim::constant(4096),
        window: None,
        scale,
        max_splits: None,
        min_chunk: attention::MIN_CHUNK,
        operands: DecodeOperands::numbered(),
    };
    let t = decode_tiling(&spec).expect("tiling");
    // P = ⌈264 / 8⌉ = 33, capped at 32.
    assert_eq!(t.splits, attention::MAX_SPLITS);
    // Batch 1 of 4096 positions: 16 splits of 256 (B·Hkv·nsplit = 128 blocks ≈ one wave).
    assert_eq!(decode_nsplit(&t, 8, attention::MIN_CHUNK, 1, 4096), 16);
    // Batch 64: no split needed.
    assert_eq!(decode_nsplit(&t, 8, attention::MIN_CHUNK, 64, 4096), 1);
    // Short sequences: one split.
    assert_eq!(decode_nsplit(&t, 8, attention::MIN_CHUNK, 1, 100), 1);
}

// ---------------------------------------------------------------------------------------------- prefill + decode

#[test]
fn prefill_then_decode_equals_longer_prefill() {
    for (window, cap) in [(None, 96usize), (Some(24), 24)] {
        let (batch, tokens, hq, hkv, d) = (2usize, 40usize, 4usize, 2usize, 32usize);
        let scale = 1.0 / (d as f64).sqrt();
        let mut rng = Rng(77 + cap as u64);
        let row = hkv * d;
        let len = tokens + 1;
        let kf = rng.bf16s(batch * len * row);
        let vf = rng.bf16s(batch * len * row);
        let qf = rng.bf16s(batch * len * hq * d);
        let sub = |x: &[f32], r: usize, lo: usize, hi: usize| rows(x, batch, len, r, lo, hi);
        let stale = vec![f32::NAN; batch * cap * row];

        // Prefill of T + 1 on the sim.
        let long =
            PrefillCase { batch, tokens: len, hq, hkv, d, cap, window, start: vec![0; batch], lens: vec![len; batch] };
        let full = sim_prefill(&long, scale, &qf, &kf, &vf, &stale, &stale, false);

        // Prefill of T, then kv_write (one kernel per cache, as the gir op) and decode of token T.
        let short = PrefillCase { tokens, lens: vec![tokens; batch], ..long.clone() };
        let first = sim_prefill(
            &short,
            scale,
            &sub(&qf, hq * d, 0, tokens),
            &sub(&kf, row, 0, tokens),
            &sub(&vf, row, 0, tokens),
            &stale,
            &stale,
            false,
        );
        let mut kc = first.kc;
        let mut vc = first.vc;
        let st = vec![tokens as i32; batch];
        for (cache, hist) in [(&mut kc, &kf), (&mut vc, &vf)] {
            let spec = KvWriteSpec {
                name: "kv_write".into(),
                kv_heads: hkv as u32,
                head_dim: d as u32,
                tokens: Dim::sym(Sym::T),
                capacity: Dim::constant(cap as i64),
                pairs: vec![(BufferId(0), BufferId(1))],
                start: BufferId(2),
                lens: None,
            };
            let g = attention::kv_write(&spec).expect("kv_write");
            let mut mem = GlobalMemory::new();
            let mut bufs = Bufs::default();
            bufs.bf16(&mut mem, BufferId(0), cache);
            bufs.bf16(&mut mem, BufferId(1), &sub(hist, row, tokens, len));
            bufs.i32(&mut mem, BufferId(2), &st);
            launch(&g, &Bindings { b: batch as i64, t: 1, s: 0 }, &bufs, &mut mem, None);
            let after = mem.read_bf16(bufs.get(BufferId(0)), cache.len()).expect("cache");
            // The cpu kv_write agrees bit for bit.
            let mut want = cache.clone();
            let dims = AttentionDims { batch, tokens: 1, q_heads: hq, kv_heads: hkv, head_dim: d, capacity: cap };
            kv_write(&dims, &mut want, &sub(hist, row, tokens, len), &st).expect("cpu kv_write");
            assert!(same_bits(&after, &want), "kv_write differs from the cpu");
            *cache = after;
        }
        let dc = DecodeCase { hq, hkv, d, cap, window, start: vec![tokens; batch], max_splits: 3, min_chunk: 8 };
        let o1 = sim_decode(&dc, scale, &sub(&qf, hq * d, tokens, len), &kc, &vc);
        let last = sub(&full.o, hq * d, tokens, len);
        let err = rel_err(&o1, &last);
        println!("prefill {tokens} + decode vs prefill {len} (window {window:?}, cap {cap}): rel err {err:.2e}");
        assert!(err < 1e-2, "prefill+decode vs longer prefill: {err}");
        // The caches agree with the longer prefill's.
        assert!(same_bits(&kc, &full.kc) && same_bits(&vc, &full.vc), "caches differ");
    }
}

// ---------------------------------------------------------------------------------------------- ptxas and cost

fn all_kernels() -> Vec<Generated> {
    let mut out = Vec::new();
    for (d, hq, hkv, window) in
        [(32u32, 4u32, 1u32, None), (64, 8, 2, Some(512u64)), (128, 16, 8, None), (64, 32, 8, None)]
    {
        let p = PrefillSpec {
            name: format!("attn_prefill_d{d}_g{}{}", hq / hkv, if window.is_some() { "_swa" } else { "" }),
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            tokens: Dim::sym(Sym::T),
            capacity: Dim::constant(4096),
            window,
            scale: 1.0 / f64::from(d).sqrt(),
            operands: PrefillOperands::numbered(),
        };
        for g in attention::attention_prefill(&p).expect("prefill") {
            out.push(g);
        }
        let dspec = DecodeSpec {
            name: format!("attn_decode_d{d}_g{}{}", hq / hkv, if window.is_some() { "_swa" } else { "" }),
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            capacity: Dim::constant(4096),
            window,
            scale: 1.0 / f64::from(d).sqrt(),
            max_splits: None,
            min_chunk: attention::MIN_CHUNK,
            operands: DecodeOperands::numbered(),
        };
        for g in attention::attention_decode(&dspec).expect("decode") {
            out.push(g);
        }
    }
    let kw = KvWriteSpec {
        name: "kv_write_h8_d128".into(),
        kv_heads: 8,
        head_dim: 128,
        tokens: Dim::sym(Sym::T),
        capacity: Dim::constant(4096),
        pairs: vec![(BufferId(0), BufferId(1))],
        start: BufferId(2),
        lens: None,
    };
    out.push(attention::kv_write(&kw).expect("kv_write"));
    out
}

#[test]
fn every_kernel_assembles_for_sm80_and_sm90() {
    let have = ptxas::find().is_some();
    if !have {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!("SKIPPED the ptxas checks of the attention kernels: ptxas not found (scripts/install-ptxas.sh)");
    }
    println!("{:<34} {:<6} {:>5} {:>9} {:>9} {:>7}", "kernel", "arch", "regs", "static B", "dyn B", "spills");
    for g in all_kernels() {
        for target in [Target::Sm80, Target::Sm90] {
            let text =
                ptx::write_string(&g.kernel, &Options { target }).unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name));
            if !have {
                continue;
            }
            let arch = target.arch().expect("arch");
            let r = ptxas::assemble(&text, arch).unwrap_or_else(|e| panic!("{} for {arch}:\n{e}", g.kernel.name));
            let spills = r.spill_stores + r.spill_loads;
            println!(
                "{:<34} {:<6} {:>5} {:>9} {:>9} {:>7}",
                g.kernel.name, arch, r.registers, r.shared_bytes, g.launch.dynamic_shared, spills
            );
            assert!(r.warnings.is_empty(), "{} on {arch}: ptxas warnings {:?}", g.kernel.name, r.warnings);
            assert_eq!(spills, 0, "{} spills on {arch}: {r:?}", g.kernel.name);
        }
    }
}

#[test]
fn cost_model() {
    const H200_BW: f64 = 4.8e12;
    // Decode, batch 1: Llama-3.2-1B-like (Hq 32, Hkv 8, d 64) and Qwen3-0.6B-like (16, 8, 128).
    println!("{:<40} {:>12} {:>12} {:>12} {:>8} {:>10}", "decode", "flops", "bytes", "min bytes", "floor", "floor µs");
    for (hq, hkv, d) in [(32u32, 8u32, 64u32), (16, 8, 128)] {
        for (batch, len) in [(1usize, 1024u64), (1, 4096), (1, 32768), (8, 4096), (64, 4096)] {
            let spec = DecodeSpec {
                name: "d".into(),
                q_heads: hq,
                kv_heads: hkv,
                head_dim: d,
                capacity: Dim::constant(65536),
                window: None,
                scale: 0.125,
                max_splits: None,
                min_chunk: attention::MIN_CHUNK,
                operands: DecodeOperands::numbered(),
            };
            let c = decode_cost(&spec, &vec![len - 1; batch]);
            let share = c.min_bytes / c.bytes;
            assert!(share > 0.9 && share <= 1.0, "decode moves {share} of the minimum");
            println!(
                "{:<40} {:>12.3e} {:>12.3e} {:>12.3e} {:>7.1}% {:>10.2}",
                format!("Hq {hq} Hkv {hkv} d {d} B {batch} S {len}"),
                c.flops,
                c.bytes,
                c.min_bytes,
                100.0 * share,
                c.min_bytes / H200_BW * 1e6
            );
        }
    }
    println!("{:<40} {:>12} {:>12} {:>12} {:>12}", "prefill", "flops", "exec flops", "bytes", "min bytes");
    for (hq, hkv, d, t) in [(32u32, 8u32, 64u32, 2048u64), (16, 8, 128, 2048)] {
        let spec = PrefillSpec {
            name: "p".into(),
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            tokens: Dim::sym(Sym::T),
            capacity: Dim::constant(8192),
            window: None,
            scale: 0.125,
            operands: PrefillOperands::numbered(),
        };
        let c = prefill_cost(&spec, t, &[0], &[t]);
        // FA convention: 4·T²·d·Hq / 2 for causal (plus the diagonal).
        let fa = 2.0 * (t * (t + 1)) as f64 * f64::from(d) * f64::from(hq);
        assert!((c.flops - fa).abs() / fa < 1e-9);
        println!(
            "{:<40} {:>12.3e} {:>12.3e} {:>12.3e} {:>12.3e}",
            format!("Hq {hq} Hkv {hkv} d {d} T {t}"),
            c.flops,
            c.executed_flops,
            c.bytes,
            c.min_bytes
        );
    }
}
