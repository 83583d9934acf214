//! Data movement: `embed`, `meta_prefix`.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_err, numel};

/// `embed (table [V, H], ids i32[n]) → out [n, H]`: row `ids[i]` of `table` for every id (`n` is the
/// element count of the ids, whatever their shape). An id outside `0 .. V` is an error.
pub fn embed(vocab: usize, hidden: usize, table: &[f32], ids: &[i32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "embed";
    check_dims(OP, "table", table.len(), &[vocab, hidden])?;
    check_dims(OP, "out", out.len(), &[ids.len(), hidden])?;
    for (i, &id) in ids.iter().enumerate() {
        if !matches!(usize::try_from(id), Ok(v) if v < vocab) {
            return Err(index_err(OP, format!("ids[{i}] = {id} is outside 0..{vocab}")));
        }
    }
    if hidden == 0 {
        return Ok(());
    }
    out.par_chunks_mut(hidden).zip(ids.par_iter()).for_each(|(row, &id)| {
        let v = id as usize;
        row.copy_from_slice(&table[v * hidden..(v + 1) * hidden]);
    });
    Ok(())
}

/// `meta_prefix (meta [M, H], x [B, T, H]) → out [B, M + T, H]`: the learned prefix `meta` in front of
/// every sequence of `x`.
pub fn meta_prefix(
    m: usize,
    batch: usize,
    t: usize,
    hidden: usize,
    meta: &[f32],
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "meta_prefix";
    check_dims(OP, "meta", meta.len(), &[m, hidden])?;
    check_dims(OP, "x", x.len(), &[batch, t, hidden])?;
    let total = m.checked_add(t).ok_or_else(|| index_err(OP, "M + T overflows"))?;
    check_len(OP, "out", out.len(), numel(OP, &[batch, total, hidden])?)?;
    let row = total * hidden;
    if row == 0 {
        return Ok(());
    }
    out.par_chunks_mut(row).enumerate().for_each(|(b, seq)| {
        let (head, tail) = seq.split_at_mut(m * hidden);
        head.copy_from_slice(meta);
        tail.copy_from_slice(&x[b * t * hidden..(b + 1) * t * hidden]);
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    #[test]
    fn embed_gathers_rows() {
        let mut rng = Rng::new(1);
        let (v, h) = (11, 6);
        let table = rng.normals(v * h, 1.0);
        let ids: Vec<i32> = (0..7).map(|_| rng.below(v) as i32).collect();
        let mut out = vec![f32::NAN; ids.len() * h];
        embed(v, h, &table, &ids, &mut out).unwrap();
        let mut want = Vec::new();
        for &id in &ids {
            for j in 0..h {
                want.push(table[id as usize * h + j]);
            }
        }
        assert_close("embed", &out, &want, 1e-7);
    }

    #[test]
    fn embed_rejects_bad_ids_and_sizes() {
        let table = vec![1.0; 4 * 3];
        let mut out = vec![0.0; 2 * 3];
        for bad in [4, -1, i32::MAX] {
            let e = embed(4, 3, &table, &[0, bad], &mut out).unwrap_err();
            assert!(matches!(e, KernelError::Index { .. }), "{e}");
        }
        assert!(out.iter().all(|&x| x == 0.0), "nothing is written on error");
        assert!(matches!(embed(4, 3, &table[1..], &[0, 1], &mut out), Err(KernelError::Size { .. })));
        assert!(matches!(embed(4, 3, &table, &[0], &mut out), Err(KernelError::Size { .. })));
    }

    #[test]
    fn meta_prefix_prepends() {
        let mut rng = Rng::new(2);
        let (m, b, t, h) = (3, 2, 4, 5);
        let meta = rng.normals(m * h, 1.0);
        let x = rng.normals(b * t * h, 1.0);
        let mut out = vec![f32::NAN; b * (m + t) * h];
        meta_prefix(m, b, t, h, &meta, &x, &mut out).unwrap();
        let mut want = Vec::new();
        for bi in 0..b {
            want.extend_from_slice(&meta);
            want.extend_from_slice(&x[bi * t * h..(bi + 1) * t * h]);
        }
        assert_close("meta_prefix", &out, &want, 1e-7);
        assert!(meta_prefix(m, b, t, h, &meta, &x, &mut out[1..]).is_err());
        assert!(meta_prefix(m, b, t, h, &meta[1..], &x, &mut out).is_err());
    }
}
