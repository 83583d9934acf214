//! Tiny kir kernels shared by the sim's own tests (`sim.rs`) and the GPU conformance suite
//! (`gpu_conformance.rs`): the same kernel runs against a naive reference on the sim and against
//! the GPU.

#![allow(dead_code)]

use flashc_codegen::kir::{BinOp, Builder, Cache, Inst, Kernel, Reg, Space, Special, Ty};

/// Loads a 16-bit element `base[index]` into a b16 register.
pub fn ld16(b: &mut Builder, base: Reg, index: Reg) -> Reg {
    let a = b.index(base, index, 2);
    b.ld(Space::Global, Ty::B16, Cache::None, a.into(), 0)
}

/// `(row + row_add) * cols + col + col_add` as a u32 register.
pub fn rc(b: &mut Builder, row: Reg, row_add: u32, col: Reg, col_add: u32, cols: u32) -> Reg {
    let r = b.add(Ty::U32, row.into(), row_add.into());
    let c = b.add(Ty::U32, col.into(), col_add.into());
    b.mad(Ty::U32, r.into(), cols.into(), c.into())
}

/// D = A (16×16 row-major bf16) · B (16×8 k-major bf16) + C (16×8 f32), one warp per block, block
/// `ctaid.x` on its own tiles. Fragments are built element by element from the PTX layout.
pub fn mma_kernel() -> Kernel {
    let mut b = Builder::new("conf_mma");
    let pa = b.param_ptr("a");
    let pb = b.param_ptr("b");
    let pc = b.param_ptr("c");
    let pd = b.param_ptr("d");
    let blk = b.special(Special::CtaidX);
    let pa = b.index(pa, blk, 16 * 16 * 2);
    let pb = b.index(pb, blk, 16 * 8 * 2);
    let pc = b.index(pc, blk, 16 * 8 * 4);
    let pd = b.index(pd, blk, 16 * 8 * 4);
    let lane = b.special(Special::LaneId);
    let g = b.bin(BinOp::Shr, Ty::U32, lane.into(), 2u32.into());
    let t = b.bin(BinOp::And, Ty::B32, lane.into(), 3u32.into());
    let t2 = b.mul(Ty::U32, t.into(), 2u32.into());
    let mut a = Vec::new();
    for (dr, dc) in [(0, 0), (8, 0), (0, 8), (8, 8)] {
        let i0 = rc(&mut b, g, dr, t2, dc, 16);
        let i1 = rc(&mut b, g, dr, t2, dc + 1, 16);
        let lo = ld16(&mut b, pa, i0);
        let hi = ld16(&mut b, pa, i1);
        let r = b.reg(Ty::B32);
        b.raw(Inst::Pack16 { dst: r, lo, hi });
        a.push(r);
    }
    let mut bf = Vec::new();
    for dk in [0, 8] {
        let i0 = rc(&mut b, t2, dk, g, 0, 8);
        let i1 = rc(&mut b, t2, dk + 1, g, 0, 8);
        let lo = ld16(&mut b, pb, i0);
        let hi = ld16(&mut b, pb, i1);
        let r = b.reg(Ty::B32);
        b.raw(Inst::Pack16 { dst: r, lo, hi });
        bf.push(r);
    }
    let cells: Vec<Reg> =
        [(0, 0), (0, 1), (8, 0), (8, 1)].iter().map(|&(dr, dc)| rc(&mut b, g, dr, t2, dc, 8)).collect();
    let c: Vec<Reg> = cells
        .iter()
        .map(|i| {
            let ad = b.index(pc, *i, 4);
            b.ld(Space::Global, Ty::F32, Cache::None, ad.into(), 0)
        })
        .collect();
    let d = b.mma([a[0], a[1], a[2], a[3]], [bf[0], bf[1]], [c[0], c[1], c[2], c[3]]);
    for (i, cell) in cells.iter().enumerate() {
        let ad = b.index(pd, *cell, 4);
        b.st(Space::Global, Ty::F32, ad.into(), 0, d[i].into());
    }
    b.finish()
}
