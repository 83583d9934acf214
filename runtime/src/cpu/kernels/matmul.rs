//! Linear algebra: `matmul`.

use rayon::prelude::*;

use super::{Result, check_dims};

/// Sizes of a `matmul`.
///
/// `a` is `[batch, m, k]` (`[batch, k, m]` with `trans_a`); `b` is `[batch, k, n]` (`[batch, n, k]` with
/// `trans_b`, a PyTorch `[out, in]` weight), or a single rank-2 `[k, n]` / `[n, k]` shared by every batch
/// entry when `shared_b`; `out` is `[batch, m, n]`. `batch` is the product of the leading dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub shared_b: bool,
}

/// `matmul (a, b) → out = a · b` per batch entry (see [`MatmulDims`] for the layouts), through
/// `matrixmultiply::sgemm` with the strides of each layout (f32 accumulation), batch entries in parallel.
pub fn matmul(dims: &MatmulDims, a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "matmul";
    let MatmulDims { batch, m, k, n, trans_a, trans_b, shared_b } = *dims;
    check_dims(OP, "a", a.len(), &[batch, m, k])?;
    check_dims(OP, "b", b.len(), &[if shared_b { 1 } else { batch }, k, n])?;
    check_dims(OP, "out", out.len(), &[batch, m, n])?;
    if m * n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // Decode-shaped products (a few rows times a `[n, k]` weight) are memory-bound: stream the weight
    // rows once, in parallel over output columns.
    if !trans_a && trans_b && m <= GEMV_ROWS {
        let b_step = if shared_b { 0 } else { k * n };
        for (i, c) in out.chunks_mut(m * n).enumerate() {
            let a_i = &a[i * m * k..(i + 1) * m * k];
            let b_i = &b[i * b_step..i * b_step + k * n];
            gemv_rows(m, k, n, a_i, b_i, c);
        }
        return Ok(());
    }
    // Row and column strides of the logical `m × k` matrix A and `k × n` matrix B.
    let (rsa, csa) = if trans_a { (1, m) } else { (k, 1) };
    let (rsb, csb) = if trans_b { (1, k) } else { (n, 1) };
    let b_step = if shared_b { 0 } else { k * n };
    out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
        let a_i = &a[i * m * k..(i + 1) * m * k];
        let b_i = &b[i * b_step..i * b_step + k * n];
        // SAFETY: `a_i` holds the m·k elements that the strides (rsa, csa) address for an m × k matrix,
        // `b_i` the k·n elements addressed by (rsb, csb) for a k × n matrix, and `c` the m·n elements of a
        // row-major m × n matrix with distinct (n, 1) strides; the lengths were checked above.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a_i.as_ptr(),
                rsa as isize,
                csa as isize,
                b_i.as_ptr(),
                rsb as isize,
                csb as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
    Ok(())
}

/// Most rows of A for which the row-streaming path is used.
const GEMV_ROWS: usize = 4;

/// `c[r, j] = a[r, :] · b[j, :]` for `m` rows of `a` (`[m, k]`) and a `[n, k]` matrix `b`, in parallel
/// over blocks of output columns; each weight row is read once for all `m` rows.
fn gemv_rows(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    const BLOCK: usize = 64;
    let mut cols = vec![0.0f32; m * n];
    cols.par_chunks_mut(BLOCK * m).enumerate().for_each(|(blk, chunk)| {
        for (jj, out) in chunk.chunks_mut(m).enumerate() {
            let j = blk * BLOCK + jj;
            let w = &b[j * k..(j + 1) * k];
            for (r, o) in out.iter_mut().enumerate() {
                *o = dot(&a[r * k..(r + 1) * k], w);
            }
        }
    });
    // `cols` is column-major (`[n, m]`); the result is row-major `[m, n]`.
    for j in 0..n {
        for r in 0..m {
            c[r * n + j] = cols[j * m + r];
        }
    }
}

/// A dot product with eight independent accumulators, so the compiler can vectorise it.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, xr) = x.split_at(x.len() / 8 * 8);
    let (yc, yr) = y.split_at(xc.len());
    for (a, b) in xc.chunks_exact(8).zip(yc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in xr.iter().zip(yr) {
        s += a * b;
    }
    s
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    fn naive(d: &MatmulDims, a: &[f32], b: &[f32]) -> Vec<f32> {
        let MatmulDims { batch, m, k, n, trans_a, trans_b, shared_b } = *d;
        let mut out = vec![0.0f32; batch * m * n];
        for bi in 0..batch {
            let bb = if shared_b { 0 } else { bi };
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0f64;
                    for p in 0..k {
                        let av = if trans_a { a[bi * m * k + p * m + i] } else { a[bi * m * k + i * k + p] };
                        let bv = if trans_b { b[bb * k * n + j * k + p] } else { b[bb * k * n + p * n + j] };
                        s += f64::from(av) * f64::from(bv);
                    }
                    out[bi * m * n + i * n + j] = s as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matmul_matches_triple_loop_for_every_layout() {
        let mut rng = Rng::new(10);
        for &(batch, m, k, n) in
            &[(1, 1, 1, 1), (3, 5, 7, 4), (2, 17, 33, 9), (1, 64, 40, 3), (2, 3, 37, 150), (1, 1, 64, 200)]
        {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    for shared_b in [false, true] {
                        let d = MatmulDims { batch, m, k, n, trans_a, trans_b, shared_b };
                        let a = rng.normals(batch * m * k, 1.0);
                        let b = rng.normals(if shared_b { 1 } else { batch } * k * n, 1.0);
                        let mut out = vec![f32::NAN; batch * m * n];
                        matmul(&d, &a, &b, &mut out).unwrap();
                        assert_close(&format!("matmul {d:?}"), &out, &naive(&d, &a, &b), 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_empty_inner_dim_is_zero() {
        let d = MatmulDims { batch: 2, m: 2, k: 0, n: 3, trans_a: false, trans_b: false, shared_b: false };
        let mut out = vec![f32::NAN; 12];
        matmul(&d, &[], &[], &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn matmul_rejects_bad_sizes() {
        let d = MatmulDims { batch: 2, m: 2, k: 3, n: 4, trans_a: false, trans_b: true, shared_b: true };
        let a = vec![1.0; 12];
        let b = vec![1.0; 12];
        let mut out = vec![0.0; 16];
        matmul(&d, &a, &b, &mut out).unwrap();
        assert!(matches!(matmul(&d, &a[1..], &b, &mut out), Err(KernelError::Size { what: "a", .. })));
        let unshared = MatmulDims { shared_b: false, ..d };
        assert!(matches!(matmul(&unshared, &a, &b, &mut out), Err(KernelError::Size { what: "b", .. })));
        assert!(matches!(matmul(&d, &a, &b, &mut out[1..]), Err(KernelError::Size { what: "out", .. })));
        let huge = MatmulDims { batch: usize::MAX, ..d };
        assert!(matches!(matmul(&huge, &a, &b, &mut out), Err(KernelError::Shape { .. })));
    }
}
