//! warp: the warp-collective instructions — `shfl.sync`, `vote.sync`, `mma.sync` m16n8k16 bf16 and
//! `ldmatrix` — with their exact PTX semantics. Each needs all 32 lanes of every warp it runs in
//! (kir always uses the full member mask `0xffffffff`), and a warp must have 32 threads.

use flashc_codegen::kir::{Operand, Reg, ShflMode, Space, Ty, VoteMode};

use super::SimErrorKind;
use super::exec::{Block, Fault, Mask, fault};
use super::num::bf16_to_f32;

impl<'a, 'm> Block<'a, 'm> {
    /// The warps of a mask, each checked to have all 32 lanes active.
    fn full_warps(&self, mask: &Mask) -> Result<Vec<usize>, Fault> {
        let mut warps = Vec::with_capacity(mask.warps as usize);
        let ts = &mask.threads;
        let mut i = 0;
        while i < ts.len() {
            let w = ts[i] / 32;
            let mut active = 0u32;
            let start = i;
            while i < ts.len() && ts[i] / 32 == w {
                active |= 1 << (ts[i] % 32);
                i += 1;
            }
            if active != u32::MAX {
                return Err(Fault::new(SimErrorKind::InactiveLanes { warp: w, active }, Some(ts[start])));
            }
            warps.push(w as usize);
        }
        Ok(warps)
    }

    pub(crate) fn shfl(
        &mut self,
        mask: &Mask,
        mode: ShflMode,
        dst: Reg,
        src: Reg,
        lane: &Operand,
        clamp: u32,
    ) -> Result<(), Fault> {
        if self.k.ty(src).bytes() != 4 {
            let m = format!("shfl.sync moves 32-bit registers, not .{}", self.k.ty(src).name());
            return Err(fault(SimErrorKind::Unsupported(m), mask.threads[0] as usize));
        }
        let cval = clamp & 0x1F;
        let segmask = (clamp >> 8) & 0x1F;
        for w in self.full_warps(mask)? {
            let base = w * 32;
            let mut out = [0u64; 32];
            for (l, o) in out.iter_mut().enumerate() {
                let b = (self.get(lane, Ty::U32, base + l)? & 0x1F) as i32;
                let l = l as i32;
                let min_lane = l & segmask as i32;
                let max_lane = min_lane | (cval & !segmask) as i32;
                let (j, ok) = match mode {
                    ShflMode::Up => (l - b, l - b >= max_lane),
                    ShflMode::Down => (l + b, l + b <= max_lane),
                    ShflMode::Bfly => (l ^ b, (l ^ b) <= max_lane),
                    ShflMode::Idx => {
                        let j = min_lane | (b & !(segmask as i32));
                        (j, j <= max_lane)
                    }
                };
                // Out of the segment: the thread keeps its own value.
                let j = if ok { j } else { l };
                *o = self.reg(src, base + j as usize)?;
            }
            for (l, v) in out.iter().enumerate() {
                self.set(dst, base + l, *v);
            }
        }
        Ok(())
    }

    pub(crate) fn vote(&mut self, mask: &Mask, mode: VoteMode, dst: Reg, src: Reg) -> Result<(), Fault> {
        for w in self.full_warps(mask)? {
            let base = w * 32;
            let mut ballot = 0u32;
            for l in 0..32 {
                if self.reg(src, base + l)? & 1 == 1 {
                    ballot |= 1 << l;
                }
            }
            let v = match mode {
                VoteMode::All => u64::from(ballot == u32::MAX),
                VoteMode::Any => u64::from(ballot != 0),
                VoteMode::Ballot => u64::from(ballot),
            };
            for l in 0..32 {
                self.set(dst, base + l, v);
            }
        }
        Ok(())
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: D = A·B + C for a 16×16 A, a 16×8 B and
    /// a 16×8 C spread over the warp (g = lane / 4, t = lane % 4; two bf16 per 32-bit register, the
    /// lower-indexed element in the low half):
    /// - A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..2t+1), a2 = (g, 2t+8..2t+9), a3 = (g+8, 2t+8..2t+9);
    /// - B: b0 = k rows 2t..2t+1 of column g, b1 = k rows 2t+8..2t+9;
    /// - C and D: c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1).
    ///
    /// Each element is `c + Σ_k a·b`, the sum taken in f32 in ascending k (every bf16 product is
    /// exact in f32) and then added to c. Tensor cores accumulate with a different internal order and
    /// precision, so real results can differ in the last bits.
    pub(crate) fn mma(
        &mut self,
        mask: &Mask,
        d: &[Reg; 4],
        a: &[Reg; 4],
        b: &[Reg; 2],
        c: &[Reg; 4],
    ) -> Result<(), Fault> {
        for w in self.full_warps(mask)? {
            let base = w * 32;
            let mut ma = [[0f32; 16]; 16];
            let mut mb = [[0f32; 8]; 16];
            let mut mc = [[0f32; 8]; 16];
            let halves = |v: u64| (bf16_to_f32(v as u16), bf16_to_f32((v >> 16) as u16));
            for l in 0..32 {
                let (g, t) = (l / 4, l % 4);
                let th = base + l;
                for (i, (row, col)) in
                    [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate()
                {
                    let (lo, hi) = halves(self.reg(a[i], th)?);
                    ma[row][col] = lo;
                    ma[row][col + 1] = hi;
                }
                for (i, k) in [2 * t, 2 * t + 8].into_iter().enumerate() {
                    let (lo, hi) = halves(self.reg(b[i], th)?);
                    mb[k][g] = lo;
                    mb[k + 1][g] = hi;
                }
                for (i, (row, col)) in
                    [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].into_iter().enumerate()
                {
                    mc[row][col] = f32::from_bits(self.reg(c[i], th)? as u32);
                }
            }
            let mut md = [[0f32; 8]; 16];
            for (i, row) in md.iter_mut().enumerate() {
                for (j, out) in row.iter_mut().enumerate() {
                    let mut s = 0f32;
                    for (k, bk) in mb.iter().enumerate() {
                        s += ma[i][k] * bk[j];
                    }
                    *out = mc[i][j] + s;
                }
            }
            for l in 0..32 {
                let (g, t) = (l / 4, l % 4);
                let cells = [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)];
                for (i, (row, col)) in cells.into_iter().enumerate() {
                    self.set(d[i], base + l, u64::from(md[row][col].to_bits()));
                }
            }
        }
        Ok(())
    }

    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16`: lanes 8i..8i+7 give the (16-byte aligned)
    /// row addresses of matrix i; register i of lane l receives matrix i's row l/4, elements 2(l%4)
    /// and 2(l%4)+1 (the first in the low half), or with `.trans` the same of the transposed matrix.
    /// Each row is read from shared memory by the lane that gave its address.
    pub(crate) fn ldmatrix(&mut self, mask: &Mask, trans: bool, dst: &[Reg], addr: &Operand) -> Result<(), Fault> {
        for w in self.full_warps(mask)? {
            let base = w * 32;
            let mut m = [[[0u16; 8]; 8]; 4];
            for (i, mat) in m.iter_mut().enumerate().take(dst.len()) {
                for (r, row) in mat.iter_mut().enumerate() {
                    let th = base + 8 * i + r;
                    let a = self.address(th, Space::Shared, addr, 0, 16)?;
                    let bytes = self.shared.read(th as u32, a, 16).map_err(|k| fault(k, th))?;
                    for (e, x) in row.iter_mut().enumerate() {
                        *x = u16::from_le_bytes([bytes[2 * e], bytes[2 * e + 1]]);
                    }
                }
            }
            for l in 0..32 {
                let (row, col) = (l / 4, 2 * (l % 4));
                for (i, r) in dst.iter().enumerate() {
                    let (lo, hi) =
                        if trans { (m[i][col][row], m[i][col + 1][row]) } else { (m[i][row][col], m[i][row][col + 1]) };
                    self.set(*r, base + l, u64::from(lo) | (u64::from(hi) << 16));
                }
            }
        }
        Ok(())
    }
}
