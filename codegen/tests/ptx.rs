//! The PTX back end: hand-built kir kernels covering every instruction and control-flow form are
//! written for every target and assembled with ptxas (sm_80, sm_90, sm_90a and the target `Auto`
//! picks) with no spills; three are snapshotted. Also: target selection, the namer against hostile
//! names, determinism, and the errors for malformed kernels.
//!
//! ptxas comes from `ptxas::find()`. Without it the assembler checks are skipped with a message,
//! unless `FLASHC_REQUIRE_PTXAS=1`, where they fail. `cargo test -p flashc-codegen --test ptx --
//! --nocapture` prints the register table.

use flashc_codegen::kir::{
    AtomOp, BinOp, Builder, Cache, Cmp, Inst, Kernel, Operand, ParamTy, Reg, Round, ShflMode, Space, Special, Stmt, Ty,
    UnOp, VoteMode,
};
use flashc_codegen::ptx::{self, Error, Options, Target, ptxas};

const LOG2E: f32 = std::f32::consts::LOG2_E;

// ---------------------------------------------------------------------------------------------
// helpers

fn write(k: &Kernel, target: Target) -> Result<String, Error> {
    ptx::write_string(k, &Options { target })
}

/// The `.target` line's architecture.
fn arch_of(text: &str) -> &str {
    text.lines().find_map(|l| l.strip_prefix(".target ")).unwrap_or("?")
}

fn version_of(text: &str) -> &str {
    text.lines().find_map(|l| l.strip_prefix(".version ")).unwrap_or("?")
}

/// Assembles one module; `None` when there is no ptxas and it is not required.
fn assemble(name: &str, text: &str, arch: &str) -> Option<ptxas::Report> {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found (scripts/install-ptxas.sh)");
        eprintln!("SKIPPED the ptxas check of {name} for {arch}: ptxas not found (scripts/install-ptxas.sh)");
        return None;
    }
    let r = ptxas::assemble(text, arch).unwrap_or_else(|e| panic!("{name} for {arch}:\n{e}\n--- PTX ---\n{text}"));
    assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{name} spills on {arch}: {r:?}");
    assert!(r.warnings.is_empty(), "{name} on {arch}: ptxas warnings {:?}", r.warnings);
    println!(
        "{name:<24} {arch:<7} {:>3} registers {:>6} B smem {:>4} B stack  0 spills",
        r.registers, r.shared_bytes, r.stack_bytes
    );
    Some(r)
}

/// Writes `k` for `Auto` and for every target that can express it, assembles each (Auto for its own
/// target and, when that is sm_80, for sm_90 too), and returns the `Auto` text.
fn check(k: &Kernel) -> String {
    let auto = write(k, Target::Auto).unwrap_or_else(|e| panic!("{e}"));
    assert!(auto.ends_with("}\n"));
    let arch = arch_of(&auto).to_string();
    assemble(&k.name, &auto, &arch);
    if arch == "sm_80" {
        assemble(&k.name, &auto, "sm_90");
    }
    for t in [Target::Sm80, Target::Sm90, Target::Sm90a] {
        match write(k, t) {
            Ok(text) => {
                assert_eq!(arch_of(&text), t.arch().unwrap_or_default());
                assemble(&k.name, &text, arch_of(&text));
            }
            Err(Error::Unsupported { needs, .. }) => assert!(needs > t, "{}: {t:?} refused", k.name),
            Err(e) => panic!("{e}"),
        }
    }
    auto
}

/// Every instruction kind (the `Inst` variant names) a kernel uses, for the coverage test.
fn kinds(k: &Kernel) -> Vec<&'static str> {
    let mut v = Vec::new();
    k.visit(&mut |i| {
        v.push(match i {
            Inst::Mov { .. } => "Mov",
            Inst::Special { .. } => "Special",
            Inst::LdParam { .. } => "LdParam",
            Inst::CvtaGlobal { .. } => "CvtaGlobal",
            Inst::Bin { .. } => "Bin",
            Inst::Mad { .. } => "Mad",
            Inst::Un { .. } => "Un",
            Inst::Setp { .. } => "Setp",
            Inst::Selp { .. } => "Selp",
            Inst::Cvt { .. } => "Cvt",
            Inst::PackBf16x2 { .. } => "PackBf16x2",
            Inst::Pack16 { .. } => "Pack16",
            Inst::Unpack16 { .. } => "Unpack16",
            Inst::Ld { .. } => "Ld",
            Inst::St { .. } => "St",
            Inst::Bar => "Bar",
            Inst::Shfl { .. } => "Shfl",
            Inst::Vote { .. } => "Vote",
            Inst::Atom { .. } => "Atom",
            Inst::Mma { .. } => "Mma",
            Inst::Ldmatrix { .. } => "Ldmatrix",
            Inst::CpAsync { .. } => "CpAsync",
            Inst::CpAsyncCommit => "CpAsyncCommit",
            Inst::CpAsyncWait { .. } => "CpAsyncWait",
        })
    });
    v
}

// ---------------------------------------------------------------------------------------------
// kernels

/// `y = silu(x) * g`, four floats per thread per step with 16-byte loads, grid-stride loop.
fn silu_mul() -> Kernel {
    let mut b = Builder::new("silu_mul_v4");
    b.doc("y[i] = silu(x[i]) * g[i] over n4 groups of 4 floats; grid-stride loop, 16-byte accesses");
    b.block_size(256, 1, 1);
    let x = b.param_ptr("x");
    let g = b.param_ptr("g");
    let y = b.param_ptr("y");
    let n4 = b.param(ParamTy::U32, "n4");
    let start = b.global_index_x();
    let nt = b.special(Special::NtidX);
    let nc = b.special(Special::NctaidX);
    let stride = b.mul(Ty::U32, nt.into(), nc.into());
    b.for_(Ty::U32, start.into(), n4.into(), stride.into(), |b, i| {
        let xa = b.index(x, i, 16);
        let xs = b.ld_vec(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0, 4);
        let ga = b.index(g, i, 16);
        let gs = b.ld_vec(Space::Global, Ty::F32, Cache::ReadOnly, ga.into(), 0, 4);
        let mut out = Vec::new();
        for j in 0..4 {
            // silu(v) = v / (1 + 2^(-v log2 e))
            let t = b.mul(Ty::F32, xs[j].into(), (-LOG2E).into());
            let e = b.un(UnOp::Ex2Approx, Ty::F32, t.into());
            let den = b.add(Ty::F32, e.into(), 1.0f32.into());
            let r = b.un(UnOp::RcpApprox, Ty::F32, den.into());
            let s = b.mul(Ty::F32, xs[j].into(), r.into());
            out.push(b.mul(Ty::F32, s.into(), gs[j].into()).into());
        }
        let ya = b.index(y, i, 16);
        b.st_vec(Space::Global, Ty::F32, ya.into(), 0, out);
    });
    b.finish()
}

/// RMSNorm of one row per block: per-thread sums of squares, a warp-shuffle reduction, a shared-memory
/// reduction across the 8 warps between barriers, then the scaled row.
fn rmsnorm() -> Kernel {
    let mut b = Builder::new("rmsnorm_f32");
    b.doc("y = x * rsqrt(mean(x^2) + eps) * w, one row of n per block of 256 threads");
    b.block_size(256, 1, 1);
    let x = b.param_ptr("x");
    let w = b.param_ptr("w");
    let y = b.param_ptr("y");
    let n = b.param(ParamTy::U32, "n");
    let eps = b.param(ParamTy::F32, "eps");
    let partials = b.shared("partials", 8 * 4, 16);
    let row = b.special(Special::CtaidX);
    let tid = b.special(Special::TidX);
    let lane = b.special(Special::LaneId);
    let warp = b.special(Special::WarpInBlock);
    let first = b.mul(Ty::U32, row.into(), n.into());
    let xrow = b.index(x, first, 4);
    let yrow = b.index(y, first, 4);

    b.comment("sum of squares, strided over the row");
    let acc = b.mov(Ty::F32, 0.0f32.into());
    b.for_(Ty::U32, tid.into(), n.into(), 256u32.into(), |b, i| {
        let a = b.index(xrow, i, 4);
        let v = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, a.into(), 0);
        b.mad_into(acc, v.into(), v.into());
    });
    let s = b.warp_reduce(BinOp::Add, Ty::F32, acc);
    let lane0 = b.setp(Cmp::Eq, Ty::U32, lane.into(), 0u32.into());
    b.if_(lane0, |b| {
        let a = b.index_shared(partials, warp.into(), 4);
        b.st(Space::Shared, Ty::F32, a.into(), 0, s.into());
    });
    b.bar();
    b.comment("warp 0 adds the 8 partial sums");
    let warp0 = b.setp(Cmp::Eq, Ty::U32, warp.into(), 0u32.into());
    b.if_(warp0, |b| {
        let inside = b.setp(Cmp::Lt, Ty::U32, lane.into(), 8u32.into());
        let v = b.mov(Ty::F32, 0.0f32.into());
        b.if_(inside, |b| {
            let a = b.index_shared(partials, lane.into(), 4);
            let p = b.ld(Space::Shared, Ty::F32, Cache::None, a.into(), 0);
            b.assign(v, p.into());
        });
        let t = b.warp_reduce(BinOp::Add, Ty::F32, v);
        b.if_(lane0, |b| b.st(Space::Shared, Ty::F32, partials, 0, t.into()));
    });
    b.bar();
    let total = b.ld(Space::Shared, Ty::F32, Cache::None, partials, 0);
    let nf = b.cvt(Ty::F32, Ty::U32, n.into());
    let mean = b.bin(BinOp::Div, Ty::F32, total.into(), nf.into());
    let ms = b.add(Ty::F32, mean.into(), eps.into());
    let rstd = b.un(UnOp::RsqrtApprox, Ty::F32, ms.into());
    b.for_(Ty::U32, tid.into(), n.into(), 256u32.into(), |b, i| {
        let a = b.index(xrow, i, 4);
        let v = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, a.into(), 0);
        let wa = b.index(w, i, 4);
        let wv = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, wa.into(), 0);
        let t = b.mul(Ty::F32, v.into(), rstd.into());
        let o = b.mul(Ty::F32, t.into(), wv.into());
        let ya = b.index(yrow, i, 4);
        b.st(Space::Global, Ty::F32, ya.into(), 0, o.into());
    });
    b.finish()
}

/// One warp computes C[16×8] = A[16×K] · V[K×8] (bf16 in, f32 accumulate) over K in steps of 16,
/// with a two-stage cp.async pipeline in dynamic shared memory; A through `ldmatrix.x4`, V through
/// `ldmatrix.x2.trans`, rows of A at or past `m` zero-filled. Writes C in f32 and in bf16.
fn mma_tile() -> Kernel {
    let mut b = Builder::new("mma_tile_16x8");
    b.doc("C[16x8] = A[16xK] V[Kx8], bf16 x bf16 -> f32 on tensor cores (mma.sync m16n8k16)");
    b.doc("two-stage cp.async pipeline: stage s holds A at s*512, V at 1024 + s*256 (bytes)");
    b.block_size(32, 1, 1);
    let a = b.param_ptr("a");
    let v = b.param_ptr("v");
    let c = b.param_ptr("c");
    let cb = b.param_ptr("c_bf16");
    let m = b.param(ParamTy::U32, "m");
    let k = b.param(ParamTy::U32, "k");
    let smem = b.dynamic_shared();
    let base = b.shared_addr(smem);
    let lane = b.special(Special::LaneId);
    let ktiles = b.bin(BinOp::Shr, Ty::U32, k.into(), 4u32.into());

    // Copy assignments: lane l copies 16 bytes of A (row l/2, half l%2) and, for l < 16, row l of V.
    let arow = b.bin(BinOp::Shr, Ty::U32, lane.into(), 1u32.into());
    let ahalf = b.bin(BinOp::And, Ty::U32, lane.into(), 1u32.into());
    let a_inside = b.setp(Cmp::Lt, Ty::U32, arow.into(), m.into());
    let a_bytes = b.selp(Ty::U32, 16u32.into(), 0u32.into(), a_inside);
    let a_sm_off = b.mad(Ty::U32, arow.into(), 32u32.into(), base.into());
    let a_sm = b.mad(Ty::U32, ahalf.into(), 16u32.into(), a_sm_off.into());
    let v_base = b.add(Ty::U32, base.into(), 1024u32.into());
    let v_sm = b.mad(Ty::U32, lane.into(), 16u32.into(), v_base.into());
    let v_lane = b.setp(Cmp::Lt, Ty::U32, lane.into(), 16u32.into());
    let issue = |b: &mut Builder, tile: Reg, stage: Reg| {
        let k0 = b.bin(BinOp::Shl, Ty::U32, tile.into(), 4u32.into());
        // A: element (row, k0 + 8 half)
        let col = b.mad(Ty::U32, ahalf.into(), 8u32.into(), k0.into());
        let elem = b.mad(Ty::U32, arow.into(), k.into(), col.into());
        let src = b.index(a, elem, 2);
        let dst = b.mad(Ty::U32, stage.into(), 512u32.into(), a_sm.into());
        b.cp_async(dst.into(), src.into(), 16, Some(a_bytes.into()));
        b.if_(v_lane, |b| {
            let vrow = b.add(Ty::U32, k0.into(), lane.into());
            let vsrc = b.index(v, vrow, 16);
            let voff = b.mad(Ty::U32, stage.into(), 256u32.into(), v_sm.into());
            b.cp_async(voff.into(), vsrc.into(), 16, None);
        });
    };
    b.comment("prologue: stage 0 <- tile 0");
    let zero = b.mov(Ty::U32, 0u32.into());
    issue(&mut b, zero, zero);
    b.cp_async_commit();
    let acc = [b.reg(Ty::F32), b.reg(Ty::F32), b.reg(Ty::F32), b.reg(Ty::F32)];
    for r in acc {
        b.assign(r, 0.0f32.into());
    }
    // ldmatrix addresses: A lane l -> row l%16, column block l/16; V lane l -> k row l%16.
    let r16 = b.bin(BinOp::And, Ty::U32, lane.into(), 15u32.into());
    let cblk = b.bin(BinOp::Shr, Ty::U32, lane.into(), 4u32.into());
    let lm_a0 = b.mad(Ty::U32, r16.into(), 32u32.into(), base.into());
    let lm_a = b.mad(Ty::U32, cblk.into(), 16u32.into(), lm_a0.into());
    let lm_v = b.mad(Ty::U32, r16.into(), 16u32.into(), base.into());
    b.for_uniform(Ty::U32, 0u32.into(), ktiles.into(), 1u32.into(), |b, t| {
        let next = b.add(Ty::U32, t.into(), 1u32.into());
        let more = b.setp(Cmp::Lt, Ty::U32, next.into(), ktiles.into());
        b.if_uniform(more, |b| {
            let stage = b.bin(BinOp::And, Ty::U32, next.into(), 1u32.into());
            issue(b, next, stage);
        });
        // Commit even when nothing was issued, so `wait_group 1` always leaves only the next tile
        // in flight.
        b.cp_async_commit();
        b.cp_async_wait(1);
        b.bar();
        let stage = b.bin(BinOp::And, Ty::U32, t.into(), 1u32.into());
        let aoff = b.mad(Ty::U32, stage.into(), 512u32.into(), lm_a.into());
        let af = b.ldmatrix(4, false, aoff.into());
        let voff0 = b.mad(Ty::U32, stage.into(), 256u32.into(), lm_v.into());
        let voff = b.add(Ty::U32, voff0.into(), 1024u32.into());
        let vf = b.ldmatrix(2, true, voff.into());
        b.raw(Inst::Mma { d: acc, a: [af[0], af[1], af[2], af[3]], b: [vf[0], vf[1]], c: acc });
        b.bar();
    });
    b.cp_async_wait(0);
    b.comment("epilogue: lane (g, t) holds C[g][2t..2t+2] and C[g+8][2t..2t+2]");
    let g = b.bin(BinOp::Shr, Ty::U32, lane.into(), 2u32.into());
    let tq = b.bin(BinOp::And, Ty::U32, lane.into(), 3u32.into());
    let t2 = b.bin(BinOp::Shl, Ty::U32, tq.into(), 1u32.into());
    let e = b.mad(Ty::U32, g.into(), 8u32.into(), t2.into());
    let ca = b.index(c, e, 4);
    b.st_vec(Space::Global, Ty::F32, ca.into(), 0, vec![acc[0].into(), acc[1].into()]);
    b.st_vec(Space::Global, Ty::F32, ca.into(), 8 * 8 * 4, vec![acc[2].into(), acc[3].into()]);
    let lo = b.pack_bf16x2(acc[0].into(), acc[1].into());
    let hi = b.pack_bf16x2(acc[2].into(), acc[3].into());
    let cba = b.index(cb, e, 2);
    b.st(Space::Global, Ty::B32, cba.into(), 0, lo.into());
    b.st(Space::Global, Ty::B32, cba.into(), 8 * 8 * 2, hi.into());
    b.finish()
}

/// Atomics and reductions on both spaces and all supported types: a shared-memory histogram flushed
/// with `red`, float and 64-bit sums, min/max, exchange.
fn atomics() -> Kernel {
    let mut b = Builder::new("atomics");
    b.doc("histogram of the low byte of data[i] plus sums, extrema and exchanges of every kind");
    b.block_size(256, 1, 1);
    let data = b.param_ptr("data");
    let hist = b.param_ptr("hist");
    let stats = b.param_ptr("stats");
    let n = b.param(ParamTy::U32, "n");
    let bins = b.shared("bins", 256 * 4, 16);
    let mins = b.shared("mins", 8, 8);
    let tid = b.special(Special::TidX);
    let slot = b.index_shared(bins, tid.into(), 4);
    b.st(Space::Shared, Ty::U32, slot.into(), 0, 0u32.into());
    let first_thread = b_setp_eq0(&mut b, tid);
    b.if_(first_thread, |b| {
        b.st(Space::Shared, Ty::U32, mins, 0, u32::MAX.into());
        b.st(Space::Shared, Ty::S32, mins, 4, i32::MIN.into());
    });
    b.bar();
    let i = b.global_index_x();
    let inside = b.setp(Cmp::Lt, Ty::U32, i.into(), n.into());
    b.if_(inside, |b| {
        let da = b.index(data, i, 4);
        let v = b.ld(Space::Global, Ty::U32, Cache::None, da.into(), 0);
        let bin = b.bin(BinOp::And, Ty::U32, v.into(), 255u32.into());
        let ba = b.index_shared(bins, bin.into(), 4);
        let old = b.atom(AtomOp::Add, Space::Shared, Ty::U32, ba.into(), 1u32.into());
        b.red(AtomOp::Min, Space::Shared, Ty::U32, mins, v.into());
        let sv = b.mov(Ty::S32, v.into());
        let m4 = b.mov(Ty::U32, mins);
        let m4 = b.add(Ty::U32, m4.into(), 4u32.into());
        b.red(AtomOp::Max, Space::Shared, Ty::S32, m4.into(), sv.into());
        let f = b.cvt(Ty::F32, Ty::U32, v.into());
        b.red(AtomOp::Add, Space::Global, Ty::F32, stats.into(), f.into());
        let prev = b.atom(AtomOp::Add, Space::Global, Ty::F32, stats.into(), 0.5f32.into());
        let s8 = b.add(Ty::U64, stats.into(), 8u32.into());
        b.red(AtomOp::Add, Space::Global, Ty::U64, s8.into(), 1u32.into());
        let d = b.cvt(Ty::F64, Ty::F32, prev.into());
        let s16 = b.add(Ty::U64, stats.into(), 16u32.into());
        b.red(AtomOp::Add, Space::Global, Ty::F64, s16.into(), d.into());
        let s24 = b.add(Ty::U64, stats.into(), 24u32.into());
        let got = b.atom(AtomOp::Exch, Space::Global, Ty::B32, s24.into(), old.into());
        let s28 = b.add(Ty::U64, stats.into(), 28u32.into());
        b.red(AtomOp::Exch, Space::Global, Ty::F32, s28.into(), 1.0f32.into());
        let s32 = b.add(Ty::U64, stats.into(), 32u32.into());
        b.red(AtomOp::Max, Space::Global, Ty::U32, s32.into(), got.into());
        let s40 = b.add(Ty::U64, stats.into(), 40u32.into());
        let wide = b.cvt(Ty::S64, Ty::U32, v.into());
        b.red(AtomOp::Min, Space::Global, Ty::S64, s40.into(), wide.into());
        let s48 = b.add(Ty::U64, stats.into(), 48u32.into());
        let h2 = b.mov(Ty::F16x2, 0x3c00_3c00u32.into());
        b.red(AtomOp::Add, Space::Global, Ty::F16x2, s48.into(), h2.into());
        let h = b.mov(Ty::F16, 0x3c00u32.into());
        let s52 = b.add(Ty::U64, stats.into(), 52u32.into());
        b.red(AtomOp::Add, Space::Global, Ty::F16, s52.into(), h.into());
    });
    b.bar();
    let count = b.ld(Space::Shared, Ty::U32, Cache::None, slot.into(), 0);
    let ha = b.index(hist, tid, 4);
    b.red(AtomOp::Add, Space::Global, Ty::U32, ha.into(), count.into());
    b.finish()
}

fn b_setp_eq0(b: &mut Builder, r: Reg) -> Reg {
    b.setp(Cmp::Eq, Ty::U32, r.into(), 0u32.into())
}

/// Warp votes, every shuffle mode and every special register.
fn warp_ops() -> Kernel {
    let mut b = Builder::new("warp_ops");
    b.doc("votes over x > 0, shuffles of x in all four modes, and the launch geometry");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let i = b.global_index_x();
    let xa = b.index(x, i, 4);
    let v = b.ld(Space::Global, Ty::F32, Cache::None, xa.into(), 0);
    let pos = b.setp(Cmp::Gt, Ty::F32, v.into(), 0.0f32.into());
    let ballot = b.vote(VoteMode::Ballot, pos);
    let any = b.vote(VoteMode::Any, pos);
    let all = b.vote(VoteMode::All, pos);
    let anyi = b.selp(Ty::U32, 1u32.into(), 0u32.into(), any);
    let alli = b.selp(Ty::U32, 2u32.into(), 0u32.into(), all);
    let flags = b.bin(BinOp::Or, Ty::U32, anyi.into(), alli.into());
    let lane = b.special(Special::LaneId);
    let up = b.shfl(ShflMode::Up, v, 1u32.into());
    let down = b.shfl(ShflMode::Down, v, 2u32.into());
    let src = b.bin(BinOp::Xor, Ty::U32, lane.into(), 5u32.into());
    let idx = b.shfl(ShflMode::Idx, v, src.into());
    let bf = b.shfl(ShflMode::Bfly, v, 16u32.into());
    let s1 = b.add(Ty::F32, up.into(), down.into());
    let s2 = b.add(Ty::F32, idx.into(), bf.into());
    let s = b.add(Ty::F32, s1.into(), s2.into());
    let oa = b.index(out, i, 32);
    b.st_vec(Space::Global, Ty::B32, oa.into(), 0, vec![ballot.into(), flags.into(), s.into(), lane.into()]);
    let mut geo = Vec::new();
    for sp in [
        Special::TidY,
        Special::TidZ,
        Special::NtidY,
        Special::NtidZ,
        Special::CtaidY,
        Special::CtaidZ,
        Special::NctaidX,
        Special::NctaidY,
        Special::NctaidZ,
        Special::WarpInBlock,
    ] {
        geo.push(b.special(sp));
    }
    let mut sum = geo[0];
    for r in &geo[1..] {
        sum = b.add(Ty::U32, sum.into(), (*r).into());
    }
    b.st(Space::Global, Ty::U32, oa.into(), 16, sum.into());
    b.finish()
}

/// Every conversion form sm_80 has, bf16x2 packing, 16-bit packs, and 16-bit float arithmetic with
/// immediates (which PTX wants in registers).
fn conversions() -> Kernel {
    let mut b = Builder::new("conversions");
    b.doc("conversions between every pair of widths, bf16x2 packing, f16/bf16 arithmetic");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let i = b.global_index_x();
    let xa = b.index(x, i, 8);
    let xv = b.ld_vec(Space::Global, Ty::F32, Cache::None, xa.into(), 0, 2);
    let (f, f2) = (xv[0], xv[1]);
    let oa = b.index(out, i, 64);
    let st = |b: &mut Builder, ty: Ty, off: i64, v: Reg| b.st(Space::Global, ty, oa.into(), off, v.into());

    // float <-> float
    let h = b.cvt(Ty::F16, Ty::F32, f.into());
    let hb = b.cvt(Ty::Bf16, Ty::F32, f.into());
    let hf = b.cvt(Ty::F32, Ty::F16, h.into());
    let bff = b.cvt(Ty::F32, Ty::Bf16, hb.into());
    let wide = b.cvt(Ty::F64, Ty::F32, f.into());
    let narrow = b.cvt(Ty::F32, Ty::F64, wide.into());
    let hw = b.cvt(Ty::F64, Ty::F16, h.into());
    let hn = b.cvt(Ty::F16, Ty::F64, hw.into());
    let trunc = b.reg(Ty::F32);
    b.raw(Inst::Cvt { dst_ty: Ty::F32, src_ty: Ty::F32, rnd: Some(Round::ZeroInt), dst: trunc, src: f.into() });
    // float <-> int
    let si = b.cvt(Ty::S32, Ty::F32, f.into());
    let ni = b.reg(Ty::S32);
    b.raw(Inst::Cvt { dst_ty: Ty::S32, src_ty: Ty::F32, rnd: Some(Round::Nearest), dst: ni, src: f.into() });
    let ui = b.cvt(Ty::U16, Ty::F16, h.into());
    let sf = b.cvt(Ty::F32, Ty::S32, si.into());
    let uf = b.cvt(Ty::F64, Ty::U64, 7u32.into());
    let hf16 = b.cvt(Ty::F16, Ty::U32, i.into());
    let d2i = b.cvt(Ty::S64, Ty::F64, wide.into());
    // int <-> int
    let s64 = b.cvt(Ty::S64, Ty::S32, si.into());
    let u32_ = b.cvt(Ty::U32, Ty::S64, s64.into());
    let u16_ = b.cvt(Ty::U16, Ty::U32, u32_.into());
    let back = b.cvt(Ty::U32, Ty::U16, u16_.into());
    let bits = b.cvt(Ty::U32, Ty::B16, hb.into());
    // bf16 packing: (lo, hi) = (f, f2); the upper half must hold f2.
    let packed = b.pack_bf16x2(f.into(), f2.into());
    let (lo, hi) = b.unpack16(packed);
    let lo_f = b.bf16_to_f32(lo);
    let hi_f = b.bf16_to_f32(hi);
    let swapped = b.reg(Ty::B32);
    b.raw(Inst::Pack16 { dst: swapped, lo: hi, hi: lo });
    let hb2 = b.cvt(Ty::Bf16, Ty::F32, f2.into());
    let pair = b.reg(Ty::Bf16x2);
    b.raw(Inst::Pack16 { dst: pair, lo: hb, hi: hb2 });
    let imm_pack = b.pack_bf16x2(1.0f32.into(), Operand::F32(-2.0));
    // 16-bit float arithmetic; immediates go through registers.
    let h1 = b.add(Ty::F16, h.into(), Operand::Imm(0x3c00));
    let h2 = b.mad(Ty::F16, h1.into(), h.into(), Operand::Imm(0x3800));
    let hh = b.reg(Ty::F16x2);
    b.raw(Inst::Pack16 { dst: hh, lo: h1, hi: h2 });
    let hh2 = b.mul(Ty::F16x2, hh.into(), hh.into());
    let hh3 = b.un(UnOp::Ex2Approx, Ty::F16x2, hh2.into());
    let hh4 = b.un(UnOp::TanhApprox, Ty::F16x2, hh3.into());
    let h5 = b.un(UnOp::Ex2Approx, Ty::F16, h2.into());
    let hmin = b.bin(BinOp::Min, Ty::F16, h5.into(), Operand::Imm(0x4000));
    let hsub = b.bin(BinOp::Sub, Ty::F16x2, hh4.into(), Operand::Imm(0x3c00_3c00));
    let hlt = b.setp(Cmp::Lt, Ty::F16, hmin.into(), h.into());
    let hsel = b.selp(Ty::F16, hmin.into(), h.into(), hlt);
    let bsum = b.add(Ty::Bf16, hb.into(), hb2.into());
    let bdiff = b.bin(BinOp::Sub, Ty::Bf16, bsum.into(), hb.into());
    let bprod = b.mul(Ty::Bf16, bdiff.into(), Operand::Imm(0x4000));
    let bmax = b.bin(BinOp::Max, Ty::Bf16, bprod.into(), hb.into());
    let bfma = b.mad(Ty::Bf16, bmax.into(), hb.into(), hb2.into());
    let bneg = b.un(UnOp::Neg, Ty::Bf16, bfma.into());
    let babs = b.un(UnOp::Abs, Ty::Bf16x2, pair.into());
    let b2 = b.add(Ty::Bf16x2, babs.into(), pair.into());
    let b3 = b.mul(Ty::Bf16x2, b2.into(), Operand::Imm(0x3f80_3f80));
    let b4 = b.bin(BinOp::Sub, Ty::Bf16x2, b3.into(), pair.into());
    let b5 = b.bin(BinOp::Min, Ty::Bf16x2, b4.into(), pair.into());
    let hneg = b.un(UnOp::Neg, Ty::F16, hsel.into());
    let habs = b.un(UnOp::Abs, Ty::F16x2, hsub.into());

    for (k, (ty, v)) in [
        (Ty::F32, hf),
        (Ty::F32, bff),
        (Ty::F32, narrow),
        (Ty::F32, trunc),
        (Ty::S32, ni),
        (Ty::F32, sf),
        (Ty::F32, lo_f),
        (Ty::F32, hi_f),
        (Ty::B32, swapped),
        (Ty::U32, back),
        (Ty::U32, bits),
        (Ty::B32, imm_pack),
        (Ty::Bf16x2, b5),
        (Ty::F16x2, habs),
    ]
    .into_iter()
    .enumerate()
    {
        st(&mut b, ty, 4 * k as i64, v);
    }
    st(&mut b, Ty::F64, 56, uf);
    let mut o = 64;
    for (ty, v) in [(Ty::F16, hn), (Ty::U16, ui), (Ty::F16, hf16), (Ty::Bf16, bneg), (Ty::F16, hneg)] {
        st(&mut b, ty, o, v);
        o += 2;
    }
    st(&mut b, Ty::S64, 80, d2i);
    b.finish()
}

/// Fast-math and integer arithmetic: every unary op, every binary op on ints and floats, every
/// comparison, selects and fused multiply-adds.
fn math_ops() -> Kernel {
    let mut b = Builder::new("math_ops");
    b.doc("every unary, binary and comparison op of kir on f32, f64, u32, s32, u64 and predicates");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let scale = b.param(ParamTy::F32, "scale");
    let shift = b.param(ParamTy::S32, "shift");
    let big = b.param(ParamTy::U64, "big");
    let i = b.global_index_x();
    let xa = b.index(x, i, 4);
    let v = b.ld(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0);
    let mut fs = Vec::new();
    let mut cur = b.mul(Ty::F32, v.into(), scale.into());
    for op in [
        UnOp::Abs,
        UnOp::Sqrt,
        UnOp::RsqrtApprox,
        UnOp::RcpApprox,
        UnOp::Rcp,
        UnOp::Ex2Approx,
        UnOp::Lg2Approx,
        UnOp::TanhApprox,
        UnOp::Neg,
    ] {
        cur = b.un(op, Ty::F32, cur.into());
        fs.push(cur);
    }
    for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Min, BinOp::Max] {
        cur = b.bin(op, Ty::F32, cur.into(), v.into());
    }
    let fma = b.mad(Ty::F32, cur.into(), 0.5f32.into(), v.into());
    let abs_mask = b.bin(BinOp::And, Ty::F32, fma.into(), Operand::Imm(0x7fff_ffff));
    // f64
    let d = b.cvt(Ty::F64, Ty::F32, abs_mask.into());
    let mut dc = d;
    for op in [UnOp::Sqrt, UnOp::RsqrtApprox, UnOp::RcpApprox, UnOp::Rcp, UnOp::Neg, UnOp::Abs] {
        dc = b.un(op, Ty::F64, dc.into());
    }
    for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Min, BinOp::Max] {
        dc = b.bin(op, Ty::F64, dc.into(), d.into());
    }
    dc = b.mad(Ty::F64, dc.into(), 2.0f32.into(), d.into());
    // integers
    let u = b.cvt(Ty::U32, Ty::F32, abs_mask.into());
    let s = b.cvt(Ty::S32, Ty::F32, fma.into());
    let mut uc = u;
    for (op, rhs) in [
        (BinOp::Add, Operand::Imm(3)),
        (BinOp::Sub, i.into()),
        (BinOp::Mul, Operand::Imm(-7)),
        (BinOp::MulHi, u.into()),
        (BinOp::Div, Operand::Imm(5)),
        (BinOp::Rem, Operand::Imm(9)),
        (BinOp::Min, i.into()),
        (BinOp::Max, Operand::Imm(1)),
        (BinOp::And, Operand::Imm(0xffff)),
        (BinOp::Or, i.into()),
        (BinOp::Xor, Operand::Imm(0x55)),
        (BinOp::Shl, Operand::Imm(2)),
        (BinOp::Shr, shift.into()),
    ] {
        uc = b.bin(op, Ty::U32, uc.into(), rhs);
    }
    let mut sc = s;
    for op in [BinOp::Div, BinOp::Rem, BinOp::Min, BinOp::Max, BinOp::Shr, BinOp::MulHi] {
        sc = b.bin(op, Ty::S32, sc.into(), shift.into());
    }
    sc = b.un(UnOp::Neg, Ty::S32, sc.into());
    sc = b.un(UnOp::Abs, Ty::S32, sc.into());
    sc = b.un(UnOp::Not, Ty::B32, sc.into());
    let negu = b.un(UnOp::Neg, Ty::U32, uc.into());
    let mw = b.bin(BinOp::MulWide, Ty::S32, sc.into(), Operand::Imm(-3));
    let mwu = b.bin(BinOp::MulWide, Ty::U32, negu.into(), uc.into());
    let big2 = b.mad(Ty::U64, big.into(), mwu.into(), Operand::Imm(1));
    let big3 = b.bin(BinOp::Div, Ty::U64, big2.into(), big.into());
    let big4 = b.bin(BinOp::Shl, Ty::B64, big3.into(), Operand::Imm(3));
    let big5 = b.bin(BinOp::Shr, Ty::U64, big4.into(), shift.into());
    let big6 = b.bin(BinOp::Add, Ty::S64, big5.into(), mw.into());
    let ma = b.mad(Ty::S32, sc.into(), shift.into(), Operand::Imm(-1));
    let u16a = b.cvt(Ty::U16, Ty::U32, uc.into());
    let u16b = b.bin(BinOp::Mul, Ty::U16, u16a.into(), Operand::Imm(3));
    let u16c = b.bin(BinOp::MulWide, Ty::U16, u16b.into(), u16a.into());
    // comparisons, predicates, selects
    let mut preds = Vec::new();
    for (k, cmp) in [Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Le, Cmp::Gt, Cmp::Ge].into_iter().enumerate() {
        let ty = [Ty::F32, Ty::U32, Ty::S32, Ty::F64, Ty::U64, Ty::B32][k];
        let p = match ty {
            Ty::F32 => b.setp(cmp, ty, cur.into(), v.into()),
            Ty::U32 | Ty::B32 => b.setp(cmp, ty, uc.into(), Operand::Imm(10)),
            Ty::S32 => b.setp(cmp, ty, sc.into(), ma.into()),
            Ty::F64 => b.setp(cmp, ty, dc.into(), 1.0f32.into()),
            _ => b.setp(cmp, ty, big6.into(), big.into()),
        };
        preds.push(p);
    }
    let p01 = b.bin(BinOp::And, Ty::Pred, preds[0].into(), preds[1].into());
    let p23 = b.bin(BinOp::Or, Ty::Pred, preds[2].into(), preds[3].into());
    let p45 = b.bin(BinOp::Xor, Ty::Pred, preds[4].into(), preds[5].into());
    let p = b.bin(BinOp::And, Ty::Pred, p01.into(), p23.into());
    let p = b.bin(BinOp::Or, Ty::Pred, p.into(), p45.into());
    let np = b.un(UnOp::Not, Ty::Pred, p.into());
    let t = b.bin(BinOp::Xor, Ty::Pred, np.into(), Operand::Imm(1));
    let fsel = b.selp(Ty::F32, fs[0].into(), 1.5f32.into(), t);
    let dsel = b.selp(Ty::F64, dc.into(), 0.25f32.into(), np);
    let usel = b.selp(Ty::U32, uc.into(), Operand::Imm(-1), p);
    let oa = b.index(out, i, 64);
    let mut acc = fsel;
    for f in &fs[1..] {
        acc = b.add(Ty::F32, acc.into(), (*f).into());
    }
    b.st_vec(Space::Global, Ty::F32, oa.into(), 0, vec![acc.into(), Operand::F32(0.0), fma.into(), 1.0f32.into()]);
    b.st_vec(Space::Global, Ty::U32, oa.into(), 16, vec![usel.into(), ma.into()]);
    b.st(Space::Global, Ty::F64, oa.into(), 24, dsel.into());
    b.st_vec(Space::Global, Ty::U64, oa.into(), 32, vec![big6.into(), big.into()]);
    b.st(Space::Global, Ty::U32, oa.into(), 48, u16c.into());
    b.st(Space::Global, Ty::U16, oa.into(), 52, u16b.into());
    b.finish()
}

/// Every control-flow form: if, if/else, `if !cond`, an else-only if, uniform ifs around barriers,
/// for loops (dynamic bounds, immediate bounds that run at least once, nested, uniform), while loops
/// (divergent and uniform), comments.
fn control_flow() -> Kernel {
    let mut b = Builder::new("control_flow");
    b.doc("collatz steps with every control-flow form of kir");
    b.block_size(128, 1, 1);
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let rounds = b.param(ParamTy::U32, "rounds");
    let scratch = b.shared("scratch", 128 * 4, 4);
    let tid = b.special(Special::TidX);
    let i = b.global_index_x();
    let xa = b.index(x, i, 4);
    let v = b.ld(Space::Global, Ty::U32, Cache::None, xa.into(), 0);
    let n = b.mov(Ty::U32, v.into());
    let steps = b.mov(Ty::U32, 0u32.into());
    b.comment("while n > 1: n = n even ? n / 2 : 3 n + 1\n(multi-line comment)");
    b.while_(
        |b| b.setp(Cmp::Gt, Ty::U32, n.into(), 1u32.into()),
        |b| {
            let odd = b.bin(BinOp::And, Ty::U32, n.into(), 1u32.into());
            let is_odd = b.setp(Cmp::Ne, Ty::U32, odd.into(), 0u32.into());
            b.if_else(
                is_odd,
                |b| {
                    let t = b.mad(Ty::U32, n.into(), 3u32.into(), 1u32.into());
                    b.assign(n, t.into());
                },
                |b| b.bin_into(BinOp::Shr, n, 1u32.into()),
            );
            b.bin_into(BinOp::Add, steps, 1u32.into());
        },
    );
    let sa = b.index_shared(scratch, tid.into(), 4);
    b.st(Space::Shared, Ty::U32, sa.into(), 0, steps.into());
    let acc = b.mov(Ty::U32, 0u32.into());
    b.for_uniform(Ty::U32, 0u32.into(), rounds.into(), 1u32.into(), |b, r| {
        b.bar();
        b.for_(Ty::U32, 0u32.into(), 4u32.into(), 1u32.into(), |b, j| {
            let other = b.add(Ty::U32, tid.into(), j.into());
            let wrapped = b.bin(BinOp::And, Ty::U32, other.into(), 127u32.into());
            let oa = b.index_shared(scratch, wrapped.into(), 4);
            let o = b.ld(Space::Shared, Ty::U32, Cache::None, oa.into(), 0);
            b.bin_into(BinOp::Add, acc, o.into());
        });
        let even = b.bin(BinOp::And, Ty::U32, r.into(), 1u32.into());
        let is_even = b.setp(Cmp::Eq, Ty::U32, even.into(), 0u32.into());
        b.if_uniform(is_even, |b| b.bar());
    });
    let mut k = b.finish();
    // Forms the builder has no call for, written as statements.
    let big = Reg(k.regs.len() as u32);
    k.regs.push(Ty::Pred);
    let w = Reg(k.regs.len() as u32);
    k.regs.push(Ty::S32);
    let iw = Reg(k.regs.len() as u32);
    k.regs.push(Ty::Pred);
    let inst = |i: Inst| Stmt::Inst(i);
    k.body.extend([
        inst(Inst::Setp { cmp: Cmp::Gt, ty: Ty::U32, dst: big, a: acc.into(), b: Operand::Imm(1000) }),
        Stmt::If {
            cond: big,
            negate: true,
            then: vec![inst(Inst::Bin { op: BinOp::Add, ty: Ty::U32, dst: acc, a: acc.into(), b: Operand::Imm(1000) })],
            else_: vec![],
            uniform: false,
        },
        Stmt::If {
            cond: big,
            negate: false,
            then: vec![],
            else_: vec![inst(Inst::Bin { op: BinOp::Shl, ty: Ty::U32, dst: acc, a: acc.into(), b: Operand::Imm(1) })],
            uniform: false,
        },
        Stmt::If { cond: big, negate: true, then: vec![], else_: vec![], uniform: false },
        inst(Inst::Mov { ty: Ty::S32, dst: w, src: Operand::Imm(3) }),
        Stmt::While {
            head: vec![inst(Inst::Setp { cmp: Cmp::Ge, ty: Ty::S32, dst: iw, a: w.into(), b: Operand::Imm(0) })],
            cond: iw,
            body: vec![
                Stmt::Comment("a uniform countdown with a barrier inside".into()),
                inst(Inst::Bar),
                inst(Inst::Bin { op: BinOp::Sub, ty: Ty::S32, dst: w, a: w.into(), b: Operand::Imm(1) }),
            ],
            uniform: true,
        },
        Stmt::For {
            ty: Ty::S32,
            var: w,
            start: Operand::Imm(-4),
            end: Operand::Imm(4),
            step: Operand::Imm(2),
            body: vec![inst(Inst::Bin { op: BinOp::Add, ty: Ty::U32, dst: acc, a: acc.into(), b: w.into() })],
            uniform: false,
        },
    ]);
    let oa = Reg(k.regs.len() as u32);
    k.regs.push(Ty::U64);
    let off = Reg(k.regs.len() as u32);
    k.regs.push(Ty::U64);
    k.body.extend([
        inst(Inst::Bin { op: BinOp::MulWide, ty: Ty::U32, dst: off, a: i.into(), b: Operand::Imm(4) }),
        inst(Inst::Bin { op: BinOp::Add, ty: Ty::U64, dst: oa, a: out.into(), b: off.into() }),
        inst(Inst::St { space: Space::Global, ty: Ty::U32, src: vec![acc.into()], addr: oa.into(), offset: 0 }),
    ]);
    k
}

/// A decode-style GEMV row: bf16 weights streamed once (`ld.global.nc.L1::no_allocate`, PTX 7.4).
fn gemv_stream() -> Kernel {
    let mut b = Builder::new("gemv_bf16_stream");
    b.doc("y[row] = W[row, :] . x, bf16 weights read once with L1::no_allocate, one warp per row");
    b.block_size(32, 1, 1);
    let w = b.param_ptr("w");
    let x = b.param_ptr("x");
    let y = b.param_ptr("y");
    let k8 = b.param(ParamTy::U32, "k8");
    let row = b.special(Special::CtaidX);
    let lane = b.special(Special::LaneId);
    let first = b.mul(Ty::U32, row.into(), k8.into());
    let wrow = b.index(w, first, 16);
    let acc = b.mov(Ty::F32, 0.0f32.into());
    b.for_(Ty::U32, lane.into(), k8.into(), 32u32.into(), |b, j| {
        let wa = b.index(wrow, j, 16);
        let ws = b.ld_vec(Space::Global, Ty::B32, Cache::Stream, wa.into(), 0, 4);
        let xa = b.index(x, j, 32);
        let x0 = b.ld_vec(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 0, 4);
        let x1 = b.ld_vec(Space::Global, Ty::F32, Cache::ReadOnly, xa.into(), 16, 4);
        let xs: Vec<Reg> = x0.into_iter().chain(x1).collect();
        for (p, pair) in ws.iter().enumerate() {
            let (lo, hi) = b.unpack16(*pair);
            let l = b.bf16_to_f32(lo);
            let h = b.bf16_to_f32(hi);
            b.mad_into(acc, l.into(), xs[2 * p].into());
            b.mad_into(acc, h.into(), xs[2 * p + 1].into());
        }
    });
    let s = b.warp_reduce(BinOp::Add, Ty::F32, acc);
    let lane0 = b_setp_eq0(&mut b, lane);
    b.if_(lane0, |b| {
        let ya = b.index(y, row, 4);
        b.st(Space::Global, Ty::F32, ya.into(), 0, s.into());
    });
    b.finish()
}

/// Instructions only sm_90 has: bf16 `ex2`, `tanh`, `setp`, atomic add, and bf16 ↔ f16 conversion.
fn bf16_sm90() -> Kernel {
    let mut b = Builder::new("bf16_sm90");
    b.doc("softmax-style bf16x2 exponentials and bf16 atomics (sm_90 only)");
    let x = b.param_ptr("x");
    let out = b.param_ptr("out");
    let i = b.global_index_x();
    let xa = b.index(x, i, 4);
    let p = b.ld(Space::Global, Ty::Bf16x2, Cache::ReadOnly, xa.into(), 0);
    let e = b.un(UnOp::Ex2Approx, Ty::Bf16x2, p.into());
    let t = b.un(UnOp::TanhApprox, Ty::Bf16x2, e.into());
    let (lo, hi) = b.unpack16(t);
    let lo = b.mov(Ty::Bf16, lo.into());
    let hi = b.mov(Ty::Bf16, hi.into());
    let e1 = b.un(UnOp::Ex2Approx, Ty::Bf16, lo.into());
    let t1 = b.un(UnOp::TanhApprox, Ty::Bf16, hi.into());
    let lt = b.setp(Cmp::Lt, Ty::Bf16, e1.into(), t1.into());
    let m = b.selp(Ty::Bf16, e1.into(), t1.into(), lt);
    let h = b.cvt(Ty::F16, Ty::Bf16, m.into());
    let back = b.cvt(Ty::Bf16, Ty::F16, h.into());
    let iv = b.cvt(Ty::S32, Ty::Bf16, back.into());
    b.red(AtomOp::Add, Space::Global, Ty::Bf16x2, out.into(), t.into());
    let o2 = b.add(Ty::U64, out.into(), 4u32.into());
    b.red(AtomOp::Add, Space::Global, Ty::Bf16, o2.into(), back.into());
    let o4 = b.add(Ty::U64, out.into(), 8u32.into());
    b.red(AtomOp::Add, Space::Global, Ty::S32, o4.into(), iv.into());
    b.finish()
}

fn all_kernels() -> Vec<Kernel> {
    vec![
        silu_mul(),
        rmsnorm(),
        mma_tile(),
        atomics(),
        warp_ops(),
        conversions(),
        math_ops(),
        control_flow(),
        gemv_stream(),
        bf16_sm90(),
    ]
}

// ---------------------------------------------------------------------------------------------
// tests: the kernels

#[test]
fn silu_mul_grid_stride() {
    let text = check(&silu_mul());
    assert!(text.contains("ld.global.nc.v4.f32 {"), "{text}");
    assert!(text.contains("st.global.v4.f32 ["), "{text}");
    assert!(text.contains("ex2.approx.ftz.f32"));
    assert!(text.contains("rcp.approx.ftz.f32"));
    assert!(text.contains(".maxntid 256, 1, 1"));
    insta::assert_snapshot!("silu_mul_v4", text);
}

#[test]
fn rmsnorm_block_reduction() {
    let text = check(&rmsnorm());
    assert!(text.contains("shfl.sync.bfly.b32 "), "{text}");
    assert!(text.contains("bar.sync 0;"));
    assert!(text.contains("rsqrt.approx.ftz.f32"));
    assert!(text.contains(".shared .align 16 .b8 partials[32];"));
    // WarpInBlock is tid.x / 32.
    assert!(text.contains("mov.u32 %r4, %tid.x;\n    shr.u32 %r4, %r4, 5;"), "{text}");
    insta::assert_snapshot!("rmsnorm_f32", text);
}

#[test]
fn mma_tile_double_buffered() {
    let k = mma_tile();
    let text = check(&k);
    for needle in [
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f0, %f1, %f2, %f3}, {",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {",
        "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {",
        "cp.async.cg.shared.global [",
        "cp.async.commit_group;",
        "cp.async.wait_group 1;",
        "cp.async.wait_group 0;",
        ".extern .shared .align 16 .b8 dsmem[];",
        "mov.u32 %r2, dsmem;",
        "cvt.rn.bf16x2.f32 ",
        "bra.uni ",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    insta::assert_snapshot!("mma_tile_16x8", text);
    insta::assert_snapshot!("mma_tile_16x8_kir", k.to_string());
}

#[test]
fn atomics_and_reductions() {
    let text = check(&atomics());
    for needle in [
        "atom.shared.add.u32 ",
        "red.shared.min.u32 [mins], ",
        "red.shared.max.s32 ",
        "red.global.add.f32 ",
        "atom.global.add.f32 ",
        "red.global.add.u64 ",
        "red.global.add.f64 ",
        "atom.global.exch.b32 ",
        "red.global.max.u32 ",
        "red.global.min.s64 ",
        "red.global.add.noftz.f16x2 ",
        "red.global.add.noftz.f16 ",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    // `red` has no exchange: the value goes to a scratch register.
    assert!(text.contains("atom.global.exch.b32 %f"), "{text}");
}

#[test]
fn warp_votes_shuffles_specials() {
    let text = check(&warp_ops());
    for needle in [
        "vote.sync.ballot.b32 %b0, %p0, 0xffffffff;",
        "vote.sync.any.pred %p1, %p0, 0xffffffff;",
        "vote.sync.all.pred %p2, %p0, 0xffffffff;",
        "shfl.sync.up.b32 %f1, %f0, 1, 0x0, 0xffffffff;",
        "shfl.sync.down.b32 %f2, %f0, 2, 0x1f, 0xffffffff;",
        "shfl.sync.idx.b32 ",
        "shfl.sync.bfly.b32 %f4, %f0, 16, 0x1f, 0xffffffff;",
        "%laneid",
        "%tid.z",
        "%ntid.y",
        "%ctaid.z",
        "%nctaid.y",
        "st.global.v4.b32 [",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
}

#[test]
fn conversions_and_packing() {
    let text = check(&conversions());
    for needle in [
        "cvt.rn.f16.f32 ",
        "cvt.rn.bf16.f32 ",
        "cvt.f32.f16 ",
        "cvt.f32.bf16 ",
        "cvt.f64.f32 ",
        "cvt.rn.f32.f64 ",
        "cvt.rzi.f32.f32 ",
        "cvt.rzi.s32.f32 ",
        "cvt.rni.s32.f32 ",
        "cvt.rn.f32.s32 ",
        "cvt.rn.f64.u64 %fd2, 7;",
        "cvt.s64.s32 ",
        "cvt.u16.u32 ",
        "cvt.u32.u16 ",
        "mov.b32 {%bh0, %bh1}, %b",
        "cvt.rn.bf16x2.f32 %b4, 0fC0000000, 0f3F800000;",
        "mov.b16 %h",
        "fma.rn.bf16 ",
        "fma.rn.bf16x2 ",
        "min.bf16x2 ",
        "max.bf16 ",
        "neg.bf16 ",
        "abs.bf16x2 ",
        "ex2.approx.f16x2 ",
        "tanh.approx.f16x2 ",
        "setp.lt.f16 ",
        "selp.b16 ",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    // bf16x2 packing puts its first source in the upper half: pack(lo = f, hi = f2) is `cvt d, f2, f`.
    let (f, f2) = ("%f0", "%f1");
    assert!(text.contains(&format!("cvt.rn.bf16x2.f32 %b0, {f2}, {f};")), "{text}");
    // cvt.f32.bf16 needs PTX 7.1, nothing else does: the lowest version is picked.
    assert_eq!((arch_of(&text), version_of(&text)), ("sm_80", "7.1"));
}

#[test]
fn math_ops_all_forms() {
    let text = check(&math_ops());
    for needle in [
        "abs.f32 ",
        "sqrt.rn.f32 ",
        "rsqrt.approx.ftz.f32 ",
        "rcp.approx.ftz.f32 ",
        "rcp.rn.f32 ",
        "ex2.approx.ftz.f32 ",
        "lg2.approx.ftz.f32 ",
        "tanh.approx.f32 ",
        "neg.f32 ",
        "add.rn.f32 ",
        "sub.rn.f32 ",
        "add.rn.f64 ",
        "sub.rn.f64 ",
        "mul.rn.f32 ",
        "div.rn.f32 ",
        "min.f32 ",
        "max.f32 ",
        "fma.rn.f32 ",
        "and.b32 %f",
        "sqrt.rn.f64 ",
        "rsqrt.approx.f64 ",
        "rcp.approx.ftz.f64 ",
        "fma.rn.f64 %fd13, %fd12, 0d4000000000000000, %fd0;",
        "mul.lo.u32 %r7, %r6, -7;",
        "mul.hi.u32 ",
        "div.u32 ",
        "rem.u32 ",
        "min.u32 ",
        "max.u32 ",
        "and.b32 %r",
        "or.b32 ",
        "xor.b32 ",
        "shl.b32 ",
        "shr.u32 %r",
        "div.s32 ",
        "rem.s32 ",
        "shr.s32 ",
        "mul.hi.s32 ",
        "neg.s32 ",
        "abs.s32 ",
        "not.b32 ",
        "mul.wide.s32 ",
        "mul.wide.u32 ",
        "mad.lo.u64 ",
        "div.u64 ",
        "shl.b64 ",
        "shr.u64 ",
        "add.s64 ",
        "mad.lo.s32 ",
        "mul.lo.u16 ",
        "mul.wide.u16 ",
        "setp.eq.f32 ",
        "setp.ne.u32 ",
        "setp.lt.s32 ",
        "setp.le.f64 ",
        "setp.gt.u64 ",
        "setp.ge.u32 ",
        "and.pred ",
        "or.pred ",
        "xor.pred %p12, %p11, 1;",
        "not.pred ",
        "selp.f32 %f",
        "selp.f64 ",
        "selp.u32 %r",
        "st.global.v4.f32 [%rd12], {%f28, 0f00000000, %f18, 0f3F800000};",
        // One register type per vector: the s32 and s64 values go through scratch registers.
        "mov.b32 %r21, %s10;\n    st.global.v2.u32 [%rd12+16], {%r20, %r21};",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
}

#[test]
fn control_flow_forms() {
    let k = control_flow();
    let text = check(&k);
    // The divergent while: head, exit test, body, back edge.
    assert!(text.contains("$L0_head:\n"), "{text}");
    assert!(text.contains("bra.uni $L0_head;\n$L0_end:\n"), "{text}");
    // if/else inside it.
    assert!(text.contains("$L1_else:"), "{text}");
    // The uniform for loop tests with bra.uni, the inner loop with immediate bounds has no guard.
    assert!(text.contains("@%p5 bra.uni $L2_end;"), "{text}");
    assert!(!text.contains("$L3_end;"), "the loop 0..4 runs at least once:\n{text}");
    assert!(text.contains("@%p6 bra $L3_body;"), "{text}");
    // if !cond skips on cond; an else-only if skips on cond too.
    assert!(text.contains("@%p3 bra $L5_end;"), "{text}");
    assert!(text.contains("@%p3 bra $L6_end;"), "{text}");
    // The uniform while.
    assert!(text.contains("@!%p4 bra.uni $L7_end;"), "{text}");
    // The for loop over s32 from -4: signed comparisons.
    assert!(text.contains("mov.s32 %s0, -4;\n    setp.ge.s32 %p7, %s0, 4;\n    @%p7 bra $L8_end;"), "{text}");
    // Comments, multi-line ones split.
    assert!(text.contains("// while n > 1: n = n even ? n / 2 : 3 n + 1\n    // (multi-line comment)"), "{text}");
}

#[test]
fn gemv_stream_needs_ptx_7_4() {
    let text = check(&gemv_stream());
    assert!(text.contains("ld.global.nc.L1::no_allocate.v4.b32 {"), "{text}");
    assert_eq!((arch_of(&text), version_of(&text)), ("sm_80", "7.4"));
}

#[test]
fn sm90_instructions_pick_sm90() {
    let k = bf16_sm90();
    let text = check(&k);
    assert_eq!((arch_of(&text), version_of(&text)), ("sm_90", "7.8"));
    for needle in [
        "ex2.approx.ftz.bf16x2 ",
        "tanh.approx.bf16x2 ",
        "ex2.approx.ftz.bf16 ",
        "tanh.approx.bf16 ",
        "setp.lt.bf16 ",
        "cvt.f16.bf16 ",
        "cvt.bf16.f16 ",
        "cvt.rzi.s32.bf16 ",
        "red.global.add.noftz.bf16x2 ",
        "red.global.add.noftz.bf16 ",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    match write(&k, Target::Sm80) {
        Err(Error::Unsupported { needs: Target::Sm90, target: Target::Sm80, at, .. }) => {
            assert!(at.contains("ex2.approx.bf16x2"), "{at}");
        }
        other => panic!("{other:?}"),
    }
    let a = write(&k, Target::Sm90a).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((arch_of(&a), version_of(&a)), ("sm_90a", "8.0"));
}

#[test]
fn every_instruction_is_covered() {
    let mut seen: Vec<&str> = all_kernels().iter().flat_map(kinds).collect();
    seen.sort();
    seen.dedup();
    let all = [
        "Atom",
        "Bar",
        "Bin",
        "CpAsync",
        "CpAsyncCommit",
        "CpAsyncWait",
        "Cvt",
        "CvtaGlobal",
        "Ld",
        "LdParam",
        "Ldmatrix",
        "Mad",
        "Mma",
        "Mov",
        "Pack16",
        "PackBf16x2",
        "Selp",
        "Setp",
        "Shfl",
        "Special",
        "St",
        "Un",
        "Unpack16",
        "Vote",
    ];
    assert_eq!(seen, all);
}

// ---------------------------------------------------------------------------------------------
// tests: targets, determinism, names, errors

#[test]
fn sm80_features_get_the_lowest_header() {
    let text = write(&silu_mul(), Target::Auto).unwrap_or_else(|e| panic!("{e}"));
    assert!(text.starts_with(".version 7.0\n.target sm_80\n.address_size 64\n"), "{text}");
    let sm90 = write(&silu_mul(), Target::Sm90).unwrap_or_else(|e| panic!("{e}"));
    assert!(sm90.starts_with(".version 7.8\n.target sm_90\n"), "{sm90}");
    // Asking for a target changes only the header.
    assert_eq!(text.lines().skip(2).collect::<Vec<_>>(), sm90.lines().skip(2).collect::<Vec<_>>());
}

#[test]
fn stream_cache_needs_7_4_on_sm80_only() {
    let mut b = Builder::new("stream");
    let p = b.param_ptr("p");
    let v = b.ld(Space::Global, Ty::F32, Cache::Stream, p.into(), 0);
    b.st(Space::Global, Ty::F32, p.into(), 4, v.into());
    let k = b.finish();
    let text = check(&k);
    assert!(text.starts_with(".version 7.4\n.target sm_80\n"), "{text}");
    let sm90 = write(&k, Target::Sm90).unwrap_or_else(|e| panic!("{e}"));
    assert!(sm90.starts_with(".version 7.8\n.target sm_90\n"), "{sm90}");
}

#[test]
fn output_is_deterministic() {
    for (a, b) in all_kernels().iter().zip(all_kernels()) {
        let x = write(a, Target::Auto).unwrap_or_else(|e| panic!("{e}"));
        let y = write(&b, Target::Auto).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(x, y, "{}", a.name);
        assert_eq!(write(a, Target::Auto).ok(), Some(x));
        assert_eq!(a.to_string(), b.to_string());
    }
}

#[test]
fn hostile_names_are_sanitised() {
    let cases: &[(&str, &[&str], &[&str], &str)] = &[
        ("ret", &["add", "mov", "%r1"], &["bra", "shared"], ".visible .entry ret_("),
        ("1st kernel", &["", "_", "$"], &["tile", "tile", "tile_1"], ".visible .entry _1st_kernel("),
        ("naïve—κ∑", &["x", "x", "x_1"], &["dsmem", "WARP_SZ"], ".visible .entry na_ve___("),
        ("", &["$L0_end", "param"], &["reg", "$L0_head"], ".visible .entry unnamed("),
        ("WARP_SZ", &["entry", "b32"], &["f32", "u64"], ".visible .entry WARP_SZ_("),
    ];
    for (kernel, params, shared, entry) in cases {
        let mut b = Builder::new(*kernel);
        b.doc("names from a hostile source: ∀ é \u{7}");
        let mut ptrs = Vec::new();
        for p in params.iter() {
            ptrs.push(b.param_ptr(p));
        }
        let dynamic = b.dynamic_shared();
        let mut arrays = Vec::new();
        for s in shared.iter() {
            arrays.push(b.shared(s, 64, 16));
        }
        let lane = b.special(Special::LaneId);
        let cond = b.setp(Cmp::Lt, Ty::U32, lane.into(), 4u32.into());
        b.while_(
            |b| {
                let c = b.setp(Cmp::Lt, Ty::U32, lane.into(), 2u32.into());
                b.bin(BinOp::And, Ty::Pred, c.into(), cond.into())
            },
            |b| {
                b.if_else(
                    cond,
                    |b| {
                        for (k, a) in arrays.iter().enumerate() {
                            let v = b.ld(Space::Shared, Ty::U32, Cache::None, *a, 4 * k as i64);
                            b.st(Space::Global, Ty::U32, ptrs[k % ptrs.len()].into(), 0, v.into());
                        }
                    },
                    |b| {
                        let v = b.ld(Space::Shared, Ty::U32, Cache::None, dynamic, 0);
                        b.st(Space::Global, Ty::U32, ptrs[0].into(), 0, v.into());
                    },
                );
            },
        );
        let k = b.finish();
        let text = check(&k);
        assert!(text.contains(entry), "{text}");
        assert!(text.is_ascii());
        // The kir name is kept in a comment when it had to change.
        if !kernel.is_empty() && sanitised_differs(kernel) {
            assert!(text.contains("// kir kernel \""), "{text}");
        }
    }
}

fn sanitised_differs(name: &str) -> bool {
    ptx::names::sanitize(name) != name
}

#[test]
fn duplicate_names_get_suffixes() {
    let mut b = Builder::new("dup");
    let p = b.param_ptr("dup");
    let _ = b.param_ptr("dup");
    let s1 = b.shared("dup", 16, 16);
    let s2 = b.shared("dup", 16, 16);
    let v1 = b.ld(Space::Shared, Ty::U32, Cache::None, s1, 0);
    let v2 = b.ld(Space::Shared, Ty::U32, Cache::None, s2, 0);
    let s = b.add(Ty::U32, v1.into(), v2.into());
    b.st(Space::Global, Ty::U32, p.into(), 0, s.into());
    let text = check(&b.finish());
    assert!(text.contains(".visible .entry dup(\n    .param .u64 dup_1,\n    .param .u64 dup_2\n)"), "{text}");
    assert!(text.contains(".b8 dup_3[16];") && text.contains(".b8 dup_4[16];"), "{text}");
}

fn malformed(k: &Kernel) -> String {
    match write(k, Target::Auto) {
        Err(e @ Error::Malformed { .. }) => e.to_string(),
        other => panic!("expected a malformed-kernel error, got {other:?}"),
    }
}

#[test]
fn malformed_kernels_are_errors() {
    // A register read with an incompatible type.
    let mut b = Builder::new("bad_type");
    let u = b.mov(Ty::U32, 1u32.into());
    let _ = b.un(UnOp::Sqrt, Ty::F32, u.into());
    let e = malformed(&b.finish());
    assert!(e.contains("register r0 is u32, but the instruction uses it as f32"), "{e}");
    assert!(e.contains("r1: f32 = sqrt.f32 r0"), "{e}");

    // A `While` condition that is not a predicate.
    let mut b = Builder::new("bad_while");
    b.while_(|b| b.mov(Ty::U32, 1u32.into()), |_| {});
    let e = malformed(&b.finish());
    assert!(e.contains("not a predicate"), "{e}");

    // An `If` on an undeclared register.
    let mut k = Builder::new("bad_if").finish();
    k.body.push(Stmt::If { cond: Reg(7), negate: false, then: vec![], else_: vec![], uniform: false });
    assert!(malformed(&k).contains("register r7 is not declared"));

    // A vector of 3, a cache hint on shared memory, a cp.async of 12 bytes, a 32-byte vector.
    let mut b = Builder::new("bad_vec");
    let p = b.param_ptr("p");
    let _ = b.ld_vec(Space::Global, Ty::F32, Cache::None, p.into(), 0, 3);
    assert!(malformed(&b.finish()).contains("1, 2 or 4 values, not 3"));
    let mut b = Builder::new("bad_vec64");
    let p = b.param_ptr("p");
    let _ = b.ld_vec(Space::Global, Ty::F64, Cache::None, p.into(), 0, 4);
    assert!(malformed(&b.finish()).contains("at most 16 bytes"));
    let mut b = Builder::new("bad_cache");
    let s = b.shared("s", 16, 16);
    let _ = b.ld(Space::Shared, Ty::F32, Cache::ReadOnly, s, 0);
    assert!(malformed(&b.finish()).contains("global loads only"));
    let mut b = Builder::new("bad_cp");
    let p = b.param_ptr("p");
    let s = b.shared("s", 16, 16);
    b.cp_async(s, p.into(), 12, None);
    assert!(malformed(&b.finish()).contains("4, 8 or 16 bytes, not 12"));

    // A shared address used for a global access; a global address in a 32-bit register.
    let mut b = Builder::new("bad_space");
    let s = b.shared("s", 16, 16);
    b.st(Space::Global, Ty::U32, s, 0, 0u32.into());
    assert!(malformed(&b.finish()).contains("shared-memory address used for a global access"));
    let mut b = Builder::new("bad_addr");
    let a = b.mov(Ty::U32, 0u32.into());
    b.st(Space::Global, Ty::U32, a.into(), 0, 0u32.into());
    assert!(malformed(&b.finish()).contains("not a 64-bit integer"));

    // mma operands in u32 registers (ptxas wants b32).
    let mut b = Builder::new("bad_mma");
    let u = b.mov(Ty::U32, 0u32.into());
    let f = b.mov(Ty::F32, 0.0f32.into());
    let _ = b.mma([u, u, u, u], [u, u], [f, f, f, f]);
    assert!(malformed(&b.finish()).contains("not b32 or bf16x2"));

    // Immediates that do not fit, f32 immediates as f16, float ops PTX lacks.
    let mut b = Builder::new("bad_imm");
    let _ = b.add(Ty::U32, 1u32.into(), Operand::Imm(1 << 40));
    assert!(malformed(&b.finish()).contains("does not fit in .u32"));
    let mut b = Builder::new("bad_f16_imm");
    let h = b.mov(Ty::F16, 0u32.into());
    let _ = b.add(Ty::F16, h.into(), 1.0f32.into());
    assert!(malformed(&b.finish()).contains("cannot be used as f16"));
    let mut b = Builder::new("bad_rem");
    let _ = b.bin(BinOp::Rem, Ty::F32, 1.0f32.into(), 2.0f32.into());
    assert!(malformed(&b.finish()).contains("rem on f32"));
    let mut b = Builder::new("bad_atom");
    let p = b.param_ptr("p");
    b.red(AtomOp::Max, Space::Global, Ty::F32, p.into(), 1.0f32.into());
    assert!(malformed(&b.finish()).contains("atomic max on f32"));

    // A float loop variable; a block of 2048 threads; 64 KiB of static shared memory.
    let mut k = Builder::new("bad_for").finish();
    k.regs.push(Ty::F32);
    k.body.push(Stmt::For {
        ty: Ty::F32,
        var: Reg(0),
        start: Operand::F32(0.0),
        end: Operand::F32(1.0),
        step: Operand::F32(0.5),
        body: vec![],
        uniform: false,
    });
    let e = malformed(&k);
    assert!(e.contains("for r0: f32 = 0.0; r0 < 1.0; r0 += 0.5") && e.contains("not an integer"), "{e}");
    let mut b = Builder::new("bad_block");
    b.block_size(2048, 1, 1);
    assert!(malformed(&b.finish()).contains("1 to 1024 threads"));
    let mut b = Builder::new("bad_shared");
    let _ = b.shared("big", 64 * 1024, 16);
    assert!(malformed(&b.finish()).contains("use dynamic shared memory"));
}

#[test]
fn absolute_addresses_and_shared_operands_use_registers() {
    let mut b = Builder::new("materialise");
    let s = b.shared("tile", 64, 16);
    let d = b.dynamic_shared();
    let i = b.special(Special::TidX);
    let a = b.index_shared(s, i.into(), 4);
    let a2 = b.index_shared(d, i.into(), 4);
    let v = b.ld(Space::Shared, Ty::U32, Cache::None, a.into(), 0);
    b.st(Space::Shared, Ty::U32, a2.into(), 8, v.into());
    b.st(Space::Shared, Ty::U32, Operand::Imm(0), 0, v.into());
    b.st(Space::Shared, Ty::U32, s, -4 + 8, v.into());
    let text = check(&b.finish());
    assert!(text.contains("mov.u32 %r4, tile;\n    mad.lo.u32 %r1, %r0, 4, %r4;"), "{text}");
    assert!(text.contains("mov.u32 %r5, dsmem;\n    mad.lo.u32 %r2, %r0, 4, %r5;"), "{text}");
    assert!(text.contains("mov.u32 %r6, 0;\n    st.shared.u32 [%r6], %r3;"), "{text}");
    assert!(text.contains("st.shared.u32 [tile+4], %r3;"), "{text}");
}

#[test]
fn ptxas_reports_errors() {
    if ptxas::find().is_none() {
        assert!(!ptxas::require(), "FLASHC_REQUIRE_PTXAS=1 but ptxas was not found");
        eprintln!("SKIPPED ptxas_reports_errors: ptxas not found");
        return;
    }
    let bad = ".version 7.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n    bogus.u32 %r0;\n}\n";
    let e = ptxas::assemble(bad, "sm_80").expect_err("bogus PTX assembles");
    assert!(e.contains("ptxas -arch=sm_80 failed") && e.contains("bogus"), "{e}");
}

#[test]
fn empty_kernel() {
    let text = check(&Builder::new("empty").finish());
    assert_eq!(text, ".version 7.0\n.target sm_80\n.address_size 64\n\n.visible .entry empty()\n{\n\n    ret;\n}\n");
}
