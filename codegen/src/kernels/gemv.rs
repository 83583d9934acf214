//! gemv: the decode product, `C[M, N] = A[M, K] · W[N, K]ᵀ` for a few rows, as a weight-streaming
//! kernel: decode is memory-bound, so the kernel's job is to read W once, in
//! 16-byte loads that bypass L1 (`ld.global.nc.L1::no_allocate.v4`, `Cache::Stream`), with enough
//! loads in flight.
//!
//! # Work split
//!
//! * **Rows**: a block computes `max_rows` (≤ 8) rows of A, chunk `ctaid.y`; the grid has M blocks
//!   in y (a size the schedule evaluates) and those past the last chunk do nothing, so any M runs.
//!   Decode batches up to `max_rows` read W once; larger ones read it once per chunk (from L2 after
//!   the first).
//! * 256 threads = 8 warps per block. A warp owns **2 W rows** (2 output columns, or for SwiGLU the
//!   gate and up rows of 1 output column) and a share of K: the block's warps form
//!   `8 / split` column groups × `split` k groups (**in-block split-K**). Lane `l` of a warp reads the
//!   16 bytes at `k = 256·s + 8·l` of both its rows for each 256-wide k slice `s` it owns (slices are
//!   dealt to the k groups round-robin), so a warp's 32 lanes read 512 contiguous bytes per row.
//! * **A in shared memory**: the `max_rows` rows of A are staged, a K chunk at a time (`chunk` =
//!   `8192 / max_rows` rounded down to a power of two, clamped to 1024..=4096, and at least
//!   `256 · split`), into `[max_rows][chunk]` bf16 (zero past M and K, so a slice that runs past K
//!   contributes nothing and W needs no masking: its address is clamped to the row's last chunk).
//!   Each lane reads its 8 A values of every row with one 16-byte `ld.shared` (conflict-free).
//! * **Reduction**, deterministic: the 32 lanes' partials of each (row, column) are summed with a
//!   butterfly of shuffles, the k groups' partials go through shared memory and are added in k-group
//!   order by the thread that owns the output, which also applies the epilogue.
//! * **Split rule** (`split_k: None`): the smallest `split ∈ {1, 2, 4, 8}` for which the grid has at
//!   least `TARGET_BLOCKS` (2 × 132 SMs) blocks, but no more than `K / 512` (every warp keeps two or
//!   more slices); 1 when N or K is not a constant.
//!
//! # Prologue and epilogues
//!
//! * RMSNorm: warp `r` computes `rstd[r]` of row `r` over all of K first (a short pass over A, from
//!   L2); A is scaled by `rstd[r] · norm_w[k]` and rounded to bf16 while it is staged.
//! * `None`, `Bias`, `Residual` (`out` may alias `residual`), `Relu2`, `Swiglu` (W `[gate; up]` with
//!   `N` rows, output width `N/2`). `Rope` is for the GEMM only.
//!
//! # Assumptions
//!
//! K a multiple of 8 (16-byte chunks),
//! N even for SwiGLU; `N·K` and `M·K` fit in `u32`. Output stores are per element (bf16), so N has no
//! other constraint.
//!
//! # Parameters (in order)
//!
//! `a, w, out, [norm_w], [bias], [residual], m, n, k` (`n` = rows of W).

use flashc_compiler::gir::{DType, Dim};

use super::gemm::{
    GemmEpilogue, GemmOperands, GemmPrologue, addu, and_p, gaddr, lt, madu, relu2, rstd, silu, unpack_bf16x2,
};
use super::{ArgRule, CodegenError, Generated, LaunchRule};
use crate::kir::{BinOp, Builder, Cache, Cmp, Kernel, Operand, ParamTy, Reg, Space, Special, Ty, UnOp};

/// Threads per block.
pub const THREADS: u32 = 256;
const WARPS: u32 = THREADS / 32;
/// W rows per warp.
const ROWS_PER_WARP: u32 = 2;
/// K elements one warp covers with one 16-byte load per lane.
const SLICE: u32 = 256;
/// Most A rows a GEMV kernel handles.
pub const MAX_ROWS: u32 = 8;
/// Blocks the split rule aims for (2 waves of 132 SMs).
pub const TARGET_BLOCKS: u32 = 264;

/// A GEMV to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GemvSpec {
    pub name: String,
    /// Only `Bf16`.
    pub dtype: DType,
    pub prologue: GemmPrologue,
    /// `None`, `Bias`, `Residual`, `Swiglu` or `Relu2`.
    pub epilogue: GemmEpilogue,
    /// Rows of A one block computes (1..=8); larger M runs in chunks of this many rows.
    pub max_rows: u32,
    /// Warps per column group that share K (1, 2, 4 or 8); `None` applies the split rule.
    pub split_k: Option<u32>,
    pub m: Dim,
    /// Rows of W (constant).
    pub n: Dim,
    pub k: Dim,
    pub operands: GemmOperands,
}

impl GemvSpec {
    /// A plain bf16 GEMV for up to `max_rows` rows, numbered operands, automatic split.
    pub fn new(name: impl Into<String>, max_rows: u32, m: Dim, n: Dim, k: Dim) -> GemvSpec {
        GemvSpec {
            name: name.into(),
            dtype: DType::Bf16,
            prologue: GemmPrologue::None,
            epilogue: GemmEpilogue::None,
            max_rows,
            split_k: None,
            m,
            n,
            k,
            operands: GemmOperands::numbered(),
        }
    }
}

/// The block shape a spec generates: k groups, K chunk, output columns per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    /// Warps sharing the K of a column group.
    pub split: u32,
    /// Column groups per block.
    pub groups: u32,
    /// K elements of A staged per chunk.
    pub chunk: u32,
    /// Output columns per block.
    pub out_per_block: u32,
    /// Static shared memory in bytes.
    pub shared_bytes: u32,
}

/// The block shape of a spec (see the split rule in the module docs).
pub fn shape(spec: &GemvSpec) -> GemvShape {
    let r = spec.max_rows.clamp(1, MAX_ROWS);
    let out_per_warp = if spec.epilogue == GemmEpilogue::Swiglu { 1 } else { ROWS_PER_WARP };
    let split = match spec.split_k {
        Some(s) => s,
        None => match (spec.n.as_const(), spec.k.as_const()) {
            (Some(n), Some(k)) => {
                let outw = if spec.epilogue == GemmEpilogue::Swiglu { n / 2 } else { n }.max(1) as u64;
                let max_split = (k.max(0) as u64 / 512).max(1);
                let mut s = 1u32;
                while s < WARPS && u64::from(s) * 2 <= max_split {
                    let per_block = u64::from(WARPS / s * out_per_warp);
                    if outw.div_ceil(per_block) >= u64::from(TARGET_BLOCKS) {
                        break;
                    }
                    s *= 2;
                }
                s
            }
            _ => 1,
        },
    };
    let groups = WARPS / split.max(1);
    let base = (8192 / r).next_power_of_two();
    let base = if base > 8192 / r { base / 2 } else { base };
    let chunk = base.clamp(1024, 4096).max(SLICE * split);
    let shared_bytes = r * chunk * 2 + WARPS * ROWS_PER_WARP * r * 4 + r * 4;
    GemvShape { split, groups, chunk, out_per_block: groups * out_per_warp, shared_bytes }
}

/// Generates the GEMV kernel and its launch rule.
pub fn gemv(spec: &GemvSpec) -> Result<Generated, CodegenError> {
    let err = |s: String| Err(CodegenError::Shape(format!("{}: {s}", spec.name)));
    if spec.dtype != DType::Bf16 {
        return Err(CodegenError::Unsupported(format!("{} GEMV in {}", spec.name, spec.dtype.name())));
    }
    if !(1..=MAX_ROWS).contains(&spec.max_rows) {
        return err(format!("max_rows {} (1..={MAX_ROWS})", spec.max_rows));
    }
    if let Some(s) = spec.split_k
        && ![1, 2, 4, 8].contains(&s)
    {
        return err(format!("split {s} (1, 2, 4 or 8)"));
    }
    if let GemmEpilogue::Rope(_) = spec.epilogue {
        return Err(CodegenError::Unsupported(format!("{}: RoPE epilogue in a GEMV", spec.name)));
    }
    let n = spec
        .n
        .as_const()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| CodegenError::Shape(format!("{}: N = {} is not a constant", spec.name, spec.n)))?;
    if let Some(k) = spec.k.as_const()
        && k % 8 != 0
    {
        return err(format!("K = {k} is not a multiple of 8"));
    }
    if spec.epilogue == GemmEpilogue::Swiglu && n % 2 != 0 {
        return err(format!("SwiGLU over an odd N = {n}"));
    }
    let sh = shape(spec);
    let outw = if spec.epilogue == GemmEpilogue::Swiglu { n / 2 } else { n };
    let kernel = build(spec, sh);
    let o = &spec.operands;
    let need = |b: Option<flashc_compiler::schedule::BufferId>, what: &str| {
        b.map(ArgRule::Buffer).ok_or_else(|| CodegenError::Shape(format!("{}: no buffer for `{what}`", spec.name)))
    };
    let mut args = vec![ArgRule::Buffer(o.a), ArgRule::Buffer(o.w), ArgRule::Buffer(o.out)];
    if let GemmPrologue::RmsNorm { .. } = spec.prologue {
        args.push(need(o.norm_w, "norm_w")?);
    }
    if spec.epilogue == GemmEpilogue::Bias {
        args.push(need(o.bias, "bias")?);
    }
    if spec.epilogue == GemmEpilogue::Residual {
        args.push(need(o.residual, "residual")?);
    }
    args.extend([ArgRule::Size(spec.m.clone()), ArgRule::Size(spec.n.clone()), ArgRule::Size(spec.k.clone())]);
    let gx = outw.div_ceil(sh.out_per_block).max(1);
    let launch = LaunchRule {
        grid: [Dim::constant(i64::from(gx)), spec.m.clone(), Dim::constant(1)],
        block: [THREADS, 1, 1],
        dynamic_shared: 0,
        args,
    };
    Ok(Generated { kernel, launch })
}

fn log2(x: u32) -> u32 {
    x.trailing_zeros()
}

fn build(spec: &GemvSpec, sh: GemvShape) -> Kernel {
    let r_max = spec.max_rows;
    let epi = spec.epilogue;
    let swiglu = epi == GemmEpilogue::Swiglu;
    let norm_eps = match spec.prologue {
        GemmPrologue::RmsNorm { eps } => Some(eps),
        GemmPrologue::None => None,
    };
    let GemvShape { split, groups, chunk, out_per_block, .. } = sh;
    let mut b = Builder::new(spec.name.clone());
    b.block_size(THREADS, 1, 1);
    b.doc(format!(
        "GEMV C[M,N] = A[M,K] * W[N,K]^T for M <= {r_max}: {THREADS} threads, warps own {ROWS_PER_WARP} W rows, \
         {groups} column groups x {split} k groups (in-block split-K), 16-byte streaming W loads"
    ));
    b.doc(format!("A staged in shared memory in K chunks of {chunk}; {out_per_block} output columns per block"));
    b.doc(format!("prologue: {:?}; epilogue: {:?}; assumes K % 8 == 0", spec.prologue, epi));

    let a = b.param_ptr("a");
    let w = b.param_ptr("w");
    let out = b.param_ptr("out");
    let norm_w = norm_eps.map(|_| b.param_ptr("norm_w"));
    let bias = (epi == GemmEpilogue::Bias).then(|| b.param_ptr("bias"));
    let residual = (epi == GemmEpilogue::Residual).then(|| b.param_ptr("residual"));
    let m_total = b.param(ParamTy::U32, "m");
    let n = b.param(ParamTy::U32, "n");
    let k = b.param(ParamTy::U32, "k");

    let sa = b.shared("a_rows", r_max * chunk * 2, 16);
    let sred = b.shared("partials", WARPS * ROWS_PER_WARP * r_max * 4, 16);
    let srstd = b.shared("rstd", r_max * 4, 16);
    let sa = b.shared_addr(sa);
    let sred = b.shared_addr(sred);
    let srstd = b.shared_addr(srstd);

    // The block's row chunk: rows r0 .. r0 + max_rows of A (grid.y = M blocks; those past the last
    // chunk have no rows and do nothing).
    let cy = b.special(Special::CtaidY);
    let r0 = b.mul(Ty::U32, cy.into(), r_max.into());
    let active = lt(&mut b, r0.into(), m_total.into());
    b.if_uniform(active, |b| {
        let m = b.bin(BinOp::Sub, Ty::U32, m_total.into(), r0.into());
        let outw_rows = if swiglu { b.bin(BinOp::Shr, Ty::U32, n.into(), 1u32.into()) } else { n };
        let a_off = b.mul(Ty::U32, r0.into(), k.into());
        let a = gaddr(b, a, a_off, 2);
        let out_off = b.mul(Ty::U32, r0.into(), outw_rows.into());
        let out = gaddr(b, out, out_off, 2);
        let residual = residual.map(|r| gaddr(b, r, out_off, 2));
        let tid = b.special(Special::TidX);
        let lane = b.special(Special::LaneId);
        let warp = b.special(Special::WarpInBlock);
        let nb = b.special(Special::CtaidX);
        let wk = b.bin(BinOp::And, Ty::U32, warp.into(), (split - 1).into());
        let wc = b.bin(BinOp::Shr, Ty::U32, warp.into(), log2(split).into());
        let outw = if swiglu { b.bin(BinOp::Shr, Ty::U32, n.into(), 1u32.into()) } else { n };
        let lane8 = b.bin(BinOp::Shl, Ty::U32, lane.into(), 3u32.into());
        let kmax = b.bin(BinOp::Sub, Ty::U32, k.into(), 8u32.into());

        // ---------------------------------------------------------------- the warp's W rows
        b.comment("W rows of this warp");
        let col0 = b.mul(Ty::U32, nb.into(), out_per_block.into());
        let mut w_rows = Vec::new();
        for c in 0..ROWS_PER_WARP {
            let (o, wrow) = if swiglu {
                let o = addu(b, col0.into(), wc.into());
                let wrow = if c == 0 { o } else { addu(b, o.into(), outw.into()) };
                (o, wrow)
            } else {
                let o = madu(b, wc.into(), ROWS_PER_WARP.into(), col0.into());
                let o = addu(b, o.into(), c.into());
                (o, o)
            };
            let ok = lt(b, o.into(), outw.into());
            let wrow = b.selp(Ty::U32, wrow.into(), 0u32.into(), ok);
            let idx = b.mul(Ty::U32, wrow.into(), k.into());
            w_rows.push(gaddr(b, w, idx, 2));
        }

        // ---------------------------------------------------------------- RMSNorm row factors
        if let (Some(eps), Some(_)) = (norm_eps, norm_w) {
            b.comment("rstd of row `warp`");
            let kf = b.cvt(Ty::F32, Ty::U32, k.into());
            let inv_k = b.un(UnOp::Rcp, Ty::F32, kf.into());
            let mine = lt(b, warp.into(), r_max.into());
            b.if_(mine, |b| {
                let row_ok = lt(b, warp.into(), m.into());
                let end = b.selp(Ty::U32, k.into(), 0u32.into(), row_ok);
                let ss = b.mov(Ty::F32, 0.0f32.into());
                let rowk = b.mul(Ty::U32, warp.into(), k.into());
                b.for_(Ty::U32, lane8.into(), end.into(), SLICE.into(), |b, kq| {
                    let idx = addu(b, rowk.into(), kq.into());
                    let addr = gaddr(b, a, idx, 2);
                    let v = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, addr.into(), 0, 4);
                    for x in v {
                        let (lo, hi) = unpack_bf16x2(b, x);
                        b.mad_into(ss, lo.into(), lo.into());
                        b.mad_into(ss, hi.into(), hi.into());
                    }
                });
                let total = b.warp_reduce(BinOp::Add, Ty::F32, ss);
                let rs = rstd(b, total, inv_k, eps);
                let first = b.setp(Cmp::Eq, Ty::U32, lane.into(), 0u32.into());
                b.if_(first, |b| {
                    let addr = madu(b, warp.into(), 4u32.into(), srstd.into());
                    b.st(Space::Shared, Ty::F32, addr.into(), 0, rs.into());
                });
            });
            b.bar();
        }

        let acc: Vec<Reg> = (0..ROWS_PER_WARP * r_max).map(|_| b.mov(Ty::F32, 0.0f32.into())).collect();

        // ---------------------------------------------------------------- K chunks
        let chunks16 = r_max * chunk / 8;
        let stage_iters = chunks16.div_ceil(THREADS);
        let per_warp = chunk / SLICE / split;
        let unroll = per_warp.min(4);
        b.for_uniform(Ty::U32, 0u32.into(), k.into(), chunk.into(), |b, kc| {
            b.comment("stage A[:, kc .. kc + chunk] (zero past M and K)");
            for j in 0..stage_iters {
                let q = addu(b, tid.into(), (j * THREADS).into());
                let body = |b: &mut Builder| {
                    let r = b.bin(BinOp::Shr, Ty::U32, q.into(), log2(chunk / 8).into());
                    let kq = b.bin(BinOp::And, Ty::U32, q.into(), (chunk / 8 - 1).into());
                    let kq = b.bin(BinOp::Shl, Ty::U32, kq.into(), 3u32.into());
                    let gk = addu(b, kc.into(), kq.into());
                    let rok = lt(b, r.into(), m.into());
                    let kok = lt(b, gk.into(), k.into());
                    let ok = and_p(b, rok, kok);
                    let idx = madu(b, r.into(), k.into(), gk.into());
                    let idx = b.selp(Ty::U32, idx.into(), 0u32.into(), ok);
                    let addr = gaddr(b, a, idx, 2);
                    let mut v = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, addr.into(), 0, 4);
                    if let Some(gw) = norm_w {
                        let rs_addr = madu(b, r.into(), 4u32.into(), srstd.into());
                        let rs = b.ld(Space::Shared, Ty::F32, Cache::None, rs_addr.into(), 0);
                        let gidx = b.selp(Ty::U32, gk.into(), 0u32.into(), ok);
                        let gaddr_ = gaddr(b, gw, gidx, 2);
                        let gv = b.ld_vec(Space::Global, Ty::B32, Cache::ReadOnly, gaddr_.into(), 0, 4);
                        for (x, gx) in v.iter_mut().zip(gv) {
                            let (lo, hi) = unpack_bf16x2(b, *x);
                            let (gl, gh) = unpack_bf16x2(b, gx);
                            let lo = b.mul(Ty::F32, lo.into(), rs.into());
                            let lo = b.mul(Ty::F32, lo.into(), gl.into());
                            let hi = b.mul(Ty::F32, hi.into(), rs.into());
                            let hi = b.mul(Ty::F32, hi.into(), gh.into());
                            *x = b.pack_bf16x2(lo.into(), hi.into());
                        }
                    }
                    let v: Vec<Operand> =
                        v.into_iter().map(|x| b.selp(Ty::B32, x.into(), 0u32.into(), ok).into()).collect();
                    let sidx = madu(b, r.into(), chunk.into(), kq.into());
                    let saddr = madu(b, sidx.into(), 2u32.into(), sa.into());
                    b.st_vec(Space::Shared, Ty::B32, saddr.into(), 0, v);
                };
                if (j + 1) * THREADS > chunks16 {
                    let inside = lt(b, q.into(), chunks16.into());
                    b.if_(inside, body);
                } else {
                    body(b);
                }
            }
            b.bar();

            b.comment("stream W: slices wk, wk + split, ... of the chunk");
            for grp in 0..per_warp / unroll {
                // First k of the group's first slice; the whole group is skipped past K.
                let s0 = addu(b, wk.into(), (grp * unroll * split).into());
                let k0 = madu(b, s0.into(), SLICE.into(), kc.into());
                let live = lt(b, k0.into(), k.into());
                b.if_(live, |b| {
                    let mut wv = Vec::new();
                    let mut kls = Vec::new();
                    for u in 0..unroll {
                        let kl = madu(b, s0.into(), SLICE.into(), lane8.into());
                        let kl = addu(b, kl.into(), (u * split * SLICE).into());
                        let gk = addu(b, kl.into(), kc.into());
                        let kw = b.bin(BinOp::Min, Ty::U32, gk.into(), kmax.into());
                        let kw2 = b.bin(BinOp::MulWide, Ty::U32, kw.into(), 2u32.into());
                        let mut cols = Vec::new();
                        for row in &w_rows {
                            let addr = b.add(Ty::U64, (*row).into(), kw2.into());
                            cols.push(b.ld_vec(Space::Global, Ty::B32, Cache::Stream, addr.into(), 0, 4));
                        }
                        wv.push(cols);
                        kls.push(kl);
                    }
                    for u in 0..unroll as usize {
                        let wf: Vec<Vec<Reg>> = wv[u]
                            .iter()
                            .map(|regs| {
                                regs.iter()
                                    .flat_map(|&x| {
                                        let (lo, hi) = unpack_bf16x2(b, x);
                                        [lo, hi]
                                    })
                                    .collect()
                            })
                            .collect();
                        for r in 0..r_max {
                            let sidx = addu(b, kls[u].into(), (r * chunk).into());
                            let saddr = madu(b, sidx.into(), 2u32.into(), sa.into());
                            let av = b.ld_vec(Space::Shared, Ty::B32, Cache::None, saddr.into(), 0, 4);
                            let af: Vec<Reg> = av
                                .iter()
                                .flat_map(|&x| {
                                    let (lo, hi) = unpack_bf16x2(b, x);
                                    [lo, hi]
                                })
                                .collect();
                            for (c, wcol) in wf.iter().enumerate() {
                                let dst = acc[c * r_max as usize + r as usize];
                                for (x, y) in af.iter().zip(wcol) {
                                    b.mad_into(dst, (*x).into(), (*y).into());
                                }
                            }
                        }
                    }
                });
            }
            // The next chunk's staging overwrites A.
            b.bar();
        });

        // ---------------------------------------------------------------- reduction
        b.comment("reduce over lanes, then over k groups in order");
        let first = b.setp(Cmp::Eq, Ty::U32, lane.into(), 0u32.into());
        let slot = madu(b, wk.into(), groups.into(), wc.into());
        let mut sums = Vec::new();
        for &x in &acc {
            sums.push(b.warp_reduce(BinOp::Add, Ty::F32, x));
        }
        b.if_(first, |b| {
            // partials[((wk·groups + wc)·2 + c)·R + r]
            let base = b.mul(Ty::U32, slot.into(), (ROWS_PER_WARP * r_max * 4).into());
            let base = addu(b, base.into(), sred.into());
            for (i, &s) in sums.iter().enumerate() {
                b.st(Space::Shared, Ty::F32, base.into(), i as i64 * 4, s.into());
            }
        });
        b.bar();

        b.comment("epilogue: one thread per output");
        let owners = r_max * out_per_block;
        let mine = lt(b, tid.into(), owners.into());
        b.if_(mine, |b| {
            let r = b.bin(BinOp::Div, Ty::U32, tid.into(), out_per_block.into());
            let o = b.bin(BinOp::Rem, Ty::U32, tid.into(), out_per_block.into());
            let col = addu(b, col0.into(), o.into());
            let rok = lt(b, r.into(), m.into());
            let cok = lt(b, col.into(), outw.into());
            let ok = and_p(b, rok, cok);
            b.if_(ok, |b| {
                // The partial of (group g, W row c of the warp, row r) for k group j.
                let gather = |b: &mut Builder, g: Reg, c: Operand| {
                    let mut total: Option<Reg> = None;
                    for j in 0..split {
                        let s = addu(b, g.into(), (j * groups).into());
                        let i = madu(b, s.into(), ROWS_PER_WARP.into(), c);
                        let i = madu(b, i.into(), r_max.into(), r.into());
                        let addr = madu(b, i.into(), 4u32.into(), sred.into());
                        let v = b.ld(Space::Shared, Ty::F32, Cache::None, addr.into(), 0);
                        total = Some(match total {
                            None => v,
                            Some(t) => b.add(Ty::F32, t.into(), v.into()),
                        });
                    }
                    total.unwrap_or_else(|| b.mov(Ty::F32, 0.0f32.into()))
                };
                let mut v = if swiglu {
                    let gate = gather(b, o, 0u32.into());
                    let up = gather(b, o, 1u32.into());
                    let s = silu(b, gate);
                    b.mul(Ty::F32, s.into(), up.into())
                } else {
                    let g = b.bin(BinOp::Shr, Ty::U32, o.into(), 1u32.into());
                    let c = b.bin(BinOp::And, Ty::U32, o.into(), 1u32.into());
                    gather(b, g, c.into())
                };
                let idx = madu(b, r.into(), outw.into(), col.into());
                if let Some(bias) = bias {
                    let x = load_bf16(b, bias, col, Cache::ReadOnly);
                    v = b.add(Ty::F32, v.into(), x.into());
                }
                if let Some(res) = residual {
                    // Plain loads: `out` may alias `residual`.
                    let x = load_bf16(b, res, idx, Cache::None);
                    v = b.add(Ty::F32, v.into(), x.into());
                }
                if epi == GemmEpilogue::Relu2 {
                    v = relu2(b, v);
                }
                let packed = b.pack_bf16x2(v.into(), 0.0f32.into());
                let (lo, _) = b.unpack16(packed);
                let addr = gaddr(b, out, idx, 2);
                b.st(Space::Global, Ty::B16, addr.into(), 0, lo.into());
            });
        });
    });
    b.finish()
}

/// One bf16 element as f32.
fn load_bf16(b: &mut Builder, base: Reg, idx: Reg, cache: Cache) -> Reg {
    let addr = gaddr(b, base, idx, 2);
    let x = b.ld(Space::Global, Ty::U16, cache, addr.into(), 0);
    b.bf16_to_f32(x)
}
