//! Attention: `kv_write`, `attention_prefill`, `attention_decode`.
//!
//! Caches are `[B, C, Hkv, d]` ring buffers: position `p` of sequence `b` lives in slot `p mod C`, so a
//! cache of capacity `C` holds the last `C` positions written. Query head `h` reads kv head
//! `h / (Hq / Hkv)` (consecutive query heads share a kv head, as `repeat_kv` does). Softmax is the exact
//! two-pass form per query row in f32: scores `scale · q·k`, their maximum, `exp(s − max)`, the weighted
//! sum of values divided by the sum of the weights.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_err, index_vec, shape_err};

/// Sizes of the attention kernels: `batch` sequences of `tokens` new tokens (prefill; decode has one),
/// `q_heads` query heads and `kv_heads` key/value heads of width `head_dim`, caches of `capacity` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub batch: usize,
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

fn check_heads(op: &'static str, dims: &AttentionDims) -> Result<()> {
    if dims.kv_heads == 0 || !dims.q_heads.is_multiple_of(dims.kv_heads) {
        return Err(shape_err(op, format!("kv heads {} must divide query heads {}", dims.kv_heads, dims.q_heads)));
    }
    if dims.capacity == 0 {
        return Err(shape_err(op, "cache capacity must be positive"));
    }
    Ok(())
}

fn check_window(op: &'static str, window: Option<usize>) -> Result<()> {
    if window == Some(0) {
        return Err(shape_err(op, "window must be positive"));
    }
    Ok(())
}

/// Validates `start` and that `start[b] + tokens` does not overflow.
fn positions(op: &'static str, start: &[i32], batch: usize, tokens: usize) -> Result<Vec<usize>> {
    let start = index_vec(op, "start", start, batch, i32::MAX as usize)?;
    if start.iter().any(|s| s.checked_add(tokens).is_none()) {
        return Err(index_err(op, "start + T overflows"));
    }
    Ok(start)
}

/// The first position a query at position `p` sees: keys at positions `> p − window`.
fn first_visible(p: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (p + 1).saturating_sub(w))
}

/// Softmax attention of one query over the keys `key(j)`/`value(j)` for `j` in `lo ..= hi`, into `o`.
fn attend<'a>(
    q: &[f32],
    lo: usize,
    hi: usize,
    scale: f32,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    o: &mut [f32],
) {
    let scores: Vec<f32> = (lo..=hi).map(|j| scale * q.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f32>()).collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
    let l: f32 = weights.iter().sum();
    o.fill(0.0);
    for (j, &wj) in (lo..=hi).zip(&weights) {
        for (ov, &vv) in o.iter_mut().zip(value(j)) {
            *ov += wj * vv;
        }
    }
    o.iter_mut().for_each(|ov| *ov /= l);
}

/// `kv_write (cache [B, C, Hkv, d], new [B, T, Hkv, d], start i32[B]) → cache'`: writes `new[b, t]` to
/// slot `(start[b] + t) mod C`, in place, for every `t` in order (so when `T > C` the later tokens win).
/// `dims.q_heads` is not used.
pub fn kv_write(dims: &AttentionDims, cache: &mut [f32], new: &[f32], start: &[i32]) -> Result<()> {
    const OP: &str = "kv_write";
    let AttentionDims { batch, tokens, kv_heads, head_dim, capacity, .. } = *dims;
    if capacity == 0 {
        return Err(shape_err(OP, "cache capacity must be positive"));
    }
    check_dims(OP, "cache", cache.len(), &[batch, capacity, kv_heads, head_dim])?;
    check_dims(OP, "new", new.len(), &[batch, tokens, kv_heads, head_dim])?;
    let start = positions(OP, start, batch, tokens)?;
    write_cache(dims, cache, new, &start, &vec![dims.tokens; dims.batch]);
    Ok(())
}

/// `kv_write` after validation.
/// Writes the first `count[b]` new rows of each sequence to slots `(start[b] + t) mod C`.
fn write_cache(dims: &AttentionDims, cache: &mut [f32], new: &[f32], start: &[usize], count: &[usize]) {
    let AttentionDims { tokens, kv_heads, head_dim, capacity, .. } = *dims;
    let row = kv_heads * head_dim;
    if row == 0 {
        return;
    }
    cache.par_chunks_mut(capacity * row).enumerate().for_each(|(b, cb)| {
        for t in 0..count[b].min(tokens) {
            let slot = (start[b] + t) % capacity;
            cb[slot * row..(slot + 1) * row].copy_from_slice(&new[(b * tokens + t) * row..(b * tokens + t + 1) * row]);
        }
    });
}

/// `attention_prefill (q [B, T, Hq, d], k [B, T, Hkv, d], v [B, T, Hkv, d], kcache [B, C, Hkv, d], vcache,
/// start i32[B], lens i32[B]) → (o [B, T, Hq, d], kcache', vcache')`.
///
/// New token `t` of sequence `b` sits at position `p = start[b] + t` and attends causally (keys at
/// positions `≤ p`), with `window` only to keys at positions `> p − window`. Keys and values at positions
/// `< start[b]` are read from the caches (slot `pos mod C`), the new ones from `k`/`v`; afterwards the new
/// keys and values are written to the caches as [`kv_write`] does (in place). All `T` rows are computed
/// (there is no `lens`). Scores are `scale · q·k`.
///
/// Errors besides sizes: a negative `start`, a zero window, and a cache too small for the prefix a query
/// must read (a cached position `< start[b] − C` that is visible: `start[b] > C` without a window, or
/// `window − 1 > C` with one), since its slot has been overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill(
    dims: &AttentionDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kcache: &mut [f32],
    vcache: &mut [f32],
    start: &[i32],
    lens: &[i32],
    window: Option<usize>,
    scale: f64,
    o: &mut [f32],
) -> Result<()> {
    const OP: &str = "attention_prefill";
    let AttentionDims { batch, tokens, q_heads, kv_heads, head_dim: d, capacity } = *dims;
    check_heads(OP, dims)?;
    check_window(OP, window)?;
    check_dims(OP, "q", q.len(), &[batch, tokens, q_heads, d])?;
    check_dims(OP, "k", k.len(), &[batch, tokens, kv_heads, d])?;
    check_len(OP, "v", v.len(), k.len())?;
    check_dims(OP, "kcache", kcache.len(), &[batch, capacity, kv_heads, d])?;
    check_len(OP, "vcache", vcache.len(), kcache.len())?;
    check_len(OP, "o", o.len(), q.len())?;
    let start = positions(OP, start, batch, tokens)?;
    check_len(OP, "lens", lens.len(), batch)?;
    let mut count = Vec::with_capacity(batch);
    for (b, &l) in lens.iter().enumerate() {
        if l < 0 || l as usize > tokens {
            return Err(index_err(OP, format!("lens[{b}] = {l} is outside 0..={tokens}")));
        }
        count.push(l as usize);
    }
    for (b, &s) in start.iter().enumerate() {
        if tokens > 0 && s - first_visible(s, window) > capacity {
            return Err(index_err(
                OP,
                format!(
                    "sequence {b} must read cached positions from {} but a cache of {capacity} holds only {}..{s}",
                    first_visible(s, window),
                    s - capacity
                ),
            ));
        }
    }
    if !o.is_empty() {
        let group = q_heads / kv_heads;
        let scale = scale as f32;
        let (kc, vc): (&[f32], &[f32]) = (kcache, vcache);
        o.par_chunks_mut(d).enumerate().for_each(|(i, orow)| {
            let (b, t, h) = (i / (tokens * q_heads), (i / q_heads) % tokens, i % q_heads);
            let hk = h / group;
            let s = start[b];
            let p = s + t;
            // Row offsets of position j: in the caches for j < s, among the new keys otherwise.
            let cached = move |j: usize| ((b * capacity + j % capacity) * kv_heads + hk) * d;
            let fresh = move |j: usize| ((b * tokens + j - s) * kv_heads + hk) * d;
            let key = move |j: usize| if j < s { &kc[cached(j)..cached(j) + d] } else { &k[fresh(j)..fresh(j) + d] };
            let value = move |j: usize| if j < s { &vc[cached(j)..cached(j) + d] } else { &v[fresh(j)..fresh(j) + d] };
            attend(&q[i * d..(i + 1) * d], first_visible(p, window), p, scale, key, value, orow);
        });
    }
    // Only valid tokens are written: right-padding must not overwrite ring-buffer slots that later
    // queries still read.
    write_cache(dims, kcache, k, &start, &count);
    write_cache(dims, vcache, v, &start, &count);
    Ok(())
}

/// `attention_decode (q [B, Hq, d], kcache [B, C, Hkv, d], vcache, start i32[B]) → o [B, Hq, d]`: one new
/// token per sequence at position `start[b]`, whose key and value are already in the caches (this step's
/// `kv_write` ran first), attending to cached positions `0 ..= start[b]`, with `window` only those
/// `> start[b] − window`. `dims.tokens` is not used.
///
/// Errors besides sizes: a negative `start`, a zero window, and a cache that cannot hold every visible
/// position (`start[b] + 1 > C` without a window, `min(start[b] + 1, window) > C` with one).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    dims: &AttentionDims,
    q: &[f32],
    kcache: &[f32],
    vcache: &[f32],
    start: &[i32],
    window: Option<usize>,
    scale: f64,
    o: &mut [f32],
) -> Result<()> {
    const OP: &str = "attention_decode";
    let AttentionDims { batch, q_heads, kv_heads, head_dim: d, capacity, .. } = *dims;
    check_heads(OP, dims)?;
    check_window(OP, window)?;
    check_dims(OP, "q", q.len(), &[batch, q_heads, d])?;
    check_dims(OP, "kcache", kcache.len(), &[batch, capacity, kv_heads, d])?;
    check_len(OP, "vcache", vcache.len(), kcache.len())?;
    check_len(OP, "o", o.len(), q.len())?;
    let start = positions(OP, start, batch, 1)?;
    for (b, &s) in start.iter().enumerate() {
        if s + 1 - first_visible(s, window) > capacity {
            return Err(index_err(
                OP,
                format!(
                    "sequence {b} sees positions {}..={s}, more than a cache of {capacity} holds",
                    first_visible(s, window)
                ),
            ));
        }
    }
    if o.is_empty() {
        return Ok(());
    }
    let group = q_heads / kv_heads;
    let scale = scale as f32;
    o.par_chunks_mut(d).enumerate().for_each(|(i, orow)| {
        let (b, h) = (i / q_heads, i % q_heads);
        let hk = h / group;
        let p = start[b];
        let at = |j: usize| ((b * capacity + j % capacity) * kv_heads + hk) * d;
        attend(
            &q[i * d..(i + 1) * d],
            first_visible(p, window),
            p,
            scale,
            |j| &kcache[at(j)..at(j) + d],
            |j| &vcache[at(j)..at(j) + d],
            orow,
        );
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close};

    /// Explicit softmax over masked scores: `kf`/`vf` hold the full key/value history of each sequence,
    /// `[B, L, Hkv, d]`; queries `[B, T, Hq, d]` sit at positions `start[b] + t`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        dims: &AttentionDims,
        len: usize,
        q: &[f32],
        kf: &[f32],
        vf: &[f32],
        start: &[usize],
        window: Option<usize>,
        scale: f64,
    ) -> Vec<f32> {
        let AttentionDims { batch, tokens, q_heads, kv_heads, head_dim: d, .. } = *dims;
        let mut o = vec![0.0f32; batch * tokens * q_heads * d];
        for b in 0..batch {
            for t in 0..tokens {
                let p = start[b] + t;
                for h in 0..q_heads {
                    let hk = h * kv_heads / q_heads;
                    let qi = ((b * tokens + t) * q_heads + h) * d;
                    let ki = |j: usize| ((b * len + j) * kv_heads + hk) * d;
                    let mut scores = vec![f64::NEG_INFINITY; len];
                    for (j, s) in scores.iter_mut().enumerate() {
                        let visible = j <= p && window.is_none_or(|w| j as i64 > p as i64 - w as i64);
                        if visible {
                            *s = scale * (0..d).map(|x| f64::from(q[qi + x]) * f64::from(kf[ki(j) + x])).sum::<f64>();
                        }
                    }
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..d {
                        o[qi + x] = ((0..len).map(|j| e[j] * f64::from(vf[ki(j) + x])).sum::<f64>() / z) as f32;
                    }
                }
            }
        }
        o
    }

    /// Rows `lo .. hi` of the token axis of a `[B, L, row]` tensor.
    fn rows(x: &[f32], batch: usize, len: usize, row: usize, lo: usize, hi: usize) -> Vec<f32> {
        (0..batch).flat_map(|b| x[(b * len + lo) * row..(b * len + hi) * row].to_vec()).collect()
    }

    /// A cache `[B, C, Hkv, d]` holding positions `< start[b]` of the history `[B, L, Hkv, d]`.
    fn cache_of(
        hist: &[f32],
        batch: usize,
        len: usize,
        row: usize,
        cap: usize,
        start: &[usize],
        rng: &mut Rng,
    ) -> Vec<f32> {
        let mut c = rng.normals(batch * cap * row, 1.0); // stale garbage where nothing was written
        for b in 0..batch {
            for pos in 0..start[b] {
                let slot = pos % cap;
                c[(b * cap + slot) * row..(b * cap + slot + 1) * row]
                    .copy_from_slice(&hist[(b * len + pos) * row..(b * len + pos + 1) * row]);
            }
        }
        c
    }

    #[test]
    fn kv_write_fills_ring_slots() {
        let mut rng = Rng::new(63);
        let (batch, tokens, hkv, d, cap) = (2, 7, 2, 3, 4);
        let row = hkv * d;
        let dims = AttentionDims { batch, tokens, q_heads: hkv, kv_heads: hkv, head_dim: d, capacity: cap };
        let new = rng.normals(batch * tokens * row, 1.0);
        let old = rng.normals(batch * cap * row, 1.0);
        let mut cache = old.clone();
        kv_write(&dims, &mut cache, &new, &[2, 0]).unwrap();
        // Expected: the last writer of each slot, positions start .. start + T in order.
        let mut want = old.clone();
        for (b, s) in [(0usize, 2usize), (1, 0)] {
            for t in 0..tokens {
                let slot = (s + t) % cap;
                for x in 0..row {
                    want[(b * cap + slot) * row + x] = new[(b * tokens + t) * row + x];
                }
            }
        }
        assert_eq!(cache, want);
        // A short write leaves the other slots alone.
        let mut cache = old.clone();
        kv_write(&AttentionDims { tokens: 1, ..dims }, &mut cache, &new[..batch * row], &[5, 2]).unwrap();
        for b in 0..batch {
            for slot in 0..cap {
                let got = &cache[(b * cap + slot) * row..(b * cap + slot + 1) * row];
                let written = [(5 % cap), 2][b] == slot;
                let src = if written {
                    &new[b * row..(b + 1) * row]
                } else {
                    &old[(b * cap + slot) * row..(b * cap + slot + 1) * row]
                };
                assert_eq!(got, src);
            }
        }
    }

    #[test]
    fn prefill_matches_explicit_softmax() {
        let mut rng = Rng::new(60);
        // (batch, tokens, hq, hkv, d, window, start per sequence, capacity)
        let cases: &[(usize, usize, usize, usize, usize, Option<usize>, &[usize], usize)] = &[
            (2, 5, 4, 2, 8, None, &[0, 3], 16),
            (2, 6, 2, 2, 4, Some(3), &[4, 0], 4),
            (1, 7, 6, 2, 5, Some(4), &[9], 3),
            (3, 4, 3, 1, 6, None, &[0, 0, 2], 8),
            (1, 9, 2, 1, 4, Some(2), &[0], 2),
        ];
        for &(batch, tokens, hq, hkv, d, window, start, cap) in cases {
            let len = start.iter().max().unwrap() + tokens;
            let dims = AttentionDims { batch, tokens, q_heads: hq, kv_heads: hkv, head_dim: d, capacity: cap };
            let row = hkv * d;
            let kf = rng.normals(batch * len * row, 1.0);
            let vf = rng.normals(batch * len * row, 1.0);
            let q = rng.normals(batch * tokens * hq * d, 1.0);
            // New keys of sequence b are history rows start[b] .. start[b] + T.
            let pick = |hist: &[f32]| -> Vec<f32> {
                (0..batch)
                    .flat_map(|b| hist[(b * len + start[b]) * row..(b * len + start[b] + tokens) * row].to_vec())
                    .collect()
            };
            let (k, v) = (pick(&kf), pick(&vf));
            let mut kc = cache_of(&kf, batch, len, row, cap, start, &mut rng);
            let mut vc = cache_of(&vf, batch, len, row, cap, start, &mut rng);
            let start_i: Vec<i32> = start.iter().map(|&s| s as i32).collect();
            let mut o = vec![f32::NAN; q.len()];
            attention_prefill(
                &dims,
                &q,
                &k,
                &v,
                &mut kc,
                &mut vc,
                &start_i,
                &vec![tokens as i32; batch],
                window,
                0.3,
                &mut o,
            )
            .unwrap();
            let want = naive(&dims, len, &q, &kf, &vf, start, window, 0.3);
            assert_close(&format!("attention_prefill {dims:?} {window:?}"), &o, &want, 1e-5);
            // The caches now hold the last C positions written.
            for b in 0..batch {
                let end = start[b] + tokens;
                for pos in end.saturating_sub(cap)..end {
                    let slot = pos % cap;
                    assert_eq!(
                        kc[(b * cap + slot) * row..(b * cap + slot + 1) * row],
                        kf[(b * len + pos) * row..(b * len + pos + 1) * row]
                    );
                    assert_eq!(
                        vc[(b * cap + slot) * row..(b * cap + slot + 1) * row],
                        vf[(b * len + pos) * row..(b * len + pos + 1) * row]
                    );
                }
            }
        }
    }

    #[test]
    fn decode_after_prefill_equals_longer_prefill() {
        let mut rng = Rng::new(61);
        for &(window, cap) in &[(None, 16), (Some(4), 4), (Some(3), 5)] {
            let (batch, tokens, hq, hkv, d) = (2, 10, 4, 2, 8);
            let row = hkv * d;
            let len = tokens + 1;
            let kf = rng.normals(batch * len * row, 1.0);
            let vf = rng.normals(batch * len * row, 1.0);
            let qf = rng.normals(batch * len * hq * d, 1.0);
            // Reference: one prefill over T + 1 tokens.
            let dims1 = AttentionDims { batch, tokens: len, q_heads: hq, kv_heads: hkv, head_dim: d, capacity: cap };
            let mut kc = vec![0.0; batch * cap * row];
            let mut vc = kc.clone();
            let mut o_full = vec![0.0; qf.len()];
            attention_prefill(
                &dims1,
                &qf,
                &kf,
                &vf,
                &mut kc,
                &mut vc,
                &[0, 0],
                &[len as i32; 2],
                window,
                0.35,
                &mut o_full,
            )
            .unwrap();
            // Prefill over T tokens, then kv_write + decode for token T.
            let dims0 = AttentionDims { tokens, ..dims1 };
            let mut kc = rng.normals(batch * cap * row, 1.0);
            let mut vc = rng.normals(batch * cap * row, 1.0);
            let mut o0 = vec![0.0; batch * tokens * hq * d];
            let sub = |x: &[f32], r: usize, lo: usize, hi: usize| rows(x, batch, len, r, lo, hi);
            attention_prefill(
                &dims0,
                &sub(&qf, hq * d, 0, tokens),
                &sub(&kf, row, 0, tokens),
                &sub(&vf, row, 0, tokens),
                &mut kc,
                &mut vc,
                &[0, 0],
                &[tokens as i32; 2],
                window,
                0.35,
                &mut o0,
            )
            .unwrap();
            assert_close("prefill rows", &o0, &sub(&o_full, hq * d, 0, tokens), 1e-6);
            let st = [tokens as i32; 2];
            let dims_step = AttentionDims { tokens: 1, ..dims1 };
            kv_write(&dims_step, &mut kc, &sub(&kf, row, tokens, len), &st).unwrap();
            kv_write(&dims_step, &mut vc, &sub(&vf, row, tokens, len), &st).unwrap();
            let mut o1 = vec![f32::NAN; batch * hq * d];
            attention_decode(&dims_step, &sub(&qf, hq * d, tokens, len), &kc, &vc, &st, window, 0.35, &mut o1).unwrap();
            assert_close(&format!("decode window {window:?} cap {cap}"), &o1, &sub(&o_full, hq * d, tokens, len), 1e-6);
        }
    }

    #[test]
    fn split_prefill_equals_one_call() {
        let mut rng = Rng::new(62);
        for &(window, cap, t1) in &[(None, 32, 5), (Some(4), 4, 6), (Some(5), 6, 3)] {
            let (batch, tokens, hq, hkv, d) = (2, 13, 2, 1, 8);
            let row = hkv * d;
            let kf = rng.normals(batch * tokens * row, 1.0);
            let vf = rng.normals(batch * tokens * row, 1.0);
            let qf = rng.normals(batch * tokens * hq * d, 1.0);
            let dims = AttentionDims { batch, tokens, q_heads: hq, kv_heads: hkv, head_dim: d, capacity: cap };
            let mut kc = vec![0.0; batch * cap * row];
            let mut vc = kc.clone();
            let mut o_full = vec![0.0; qf.len()];
            attention_prefill(
                &dims,
                &qf,
                &kf,
                &vf,
                &mut kc,
                &mut vc,
                &[0, 0],
                &[tokens as i32; 2],
                window,
                0.3,
                &mut o_full,
            )
            .unwrap();
            let (kc_full, vc_full) = (kc, vc);

            let mut kc = vec![0.0; batch * cap * row];
            let mut vc = kc.clone();
            let sub = |x: &[f32], r: usize, lo: usize, hi: usize| rows(x, batch, tokens, r, lo, hi);
            let d1 = AttentionDims { tokens: t1, ..dims };
            let mut o1 = vec![0.0; batch * t1 * hq * d];
            attention_prefill(
                &d1,
                &sub(&qf, hq * d, 0, t1),
                &sub(&kf, row, 0, t1),
                &sub(&vf, row, 0, t1),
                &mut kc,
                &mut vc,
                &[0, 0],
                &[t1 as i32; 2],
                window,
                0.3,
                &mut o1,
            )
            .unwrap();
            let d2 = AttentionDims { tokens: tokens - t1, ..dims };
            let mut o2 = vec![0.0; batch * (tokens - t1) * hq * d];
            let st = [t1 as i32; 2];
            attention_prefill(
                &d2,
                &sub(&qf, hq * d, t1, tokens),
                &sub(&kf, row, t1, tokens),
                &sub(&vf, row, t1, tokens),
                &mut kc,
                &mut vc,
                &st,
                &[(tokens - t1) as i32; 2],
                window,
                0.3,
                &mut o2,
            )
            .unwrap();
            assert_close("split first", &o1, &sub(&o_full, hq * d, 0, t1), 1e-6);
            assert_close("split second", &o2, &sub(&o_full, hq * d, t1, tokens), 1e-6);
            assert_eq!(kc, kc_full);
            assert_eq!(vc, vc_full);
        }
    }

    #[test]
    fn padding_never_overwrites_ring_buffer_slots() {
        // Window 4, ring of 4: sequence 0 has 3 valid tokens of 6, sequence 1 all 6.
        let (batch, tokens, hq, hkv, d, cap) = (2, 6, 2, 1, 4, 4);
        let dims = AttentionDims { batch, tokens, q_heads: hq, kv_heads: hkv, head_dim: d, capacity: cap };
        let mut rng = Rng::new(63);
        let q = rng.normals(batch * tokens * hq * d, 1.0);
        let k = rng.normals(batch * tokens * hkv * d, 1.0);
        let v = rng.normals(batch * tokens * hkv * d, 1.0);
        let (mut kc, mut vc) = (vec![7.0; batch * cap * d], vec![7.0; batch * cap * d]);
        let mut o = vec![0.0; q.len()];
        attention_prefill(&dims, &q, &k, &v, &mut kc, &mut vc, &[0, 0], &[3, 6], Some(4), 0.5, &mut o).unwrap();
        // Sequence 0: slots 0..3 hold its three tokens, slot 3 is untouched.
        assert_eq!(kc[..3 * d], k[..3 * d]);
        assert!(kc[3 * d..4 * d].iter().all(|x| *x == 7.0));
        // Sequence 1: the ring holds its last four tokens (positions 2..6 in slots 2, 3, 0, 1).
        let row = |t: usize| &k[(tokens + t) * d..(tokens + t + 1) * d];
        assert_eq!(&kc[(cap + 2) * d..(cap + 3) * d], row(2));
        assert_eq!(&kc[cap * d..(cap + 1) * d], row(4));
        assert!(matches!(
            attention_prefill(&dims, &q, &k, &v, &mut kc, &mut vc, &[0, 0], &[7, 0], None, 0.5, &mut o),
            Err(KernelError::Index { .. })
        ));
    }

    #[test]
    fn attention_rejects_bad_operands() {
        let dims = AttentionDims { batch: 1, tokens: 2, q_heads: 2, kv_heads: 1, head_dim: 2, capacity: 4 };
        let q = vec![0.1; 8];
        let k = vec![0.2; 4];
        let mut kc = vec![0.0; 8];
        let mut vc = vec![0.0; 8];
        let mut o = vec![0.0; 8];
        let mut run = |dims: &AttentionDims, start: &[i32], window: Option<usize>, kc: &mut [f32], o: &mut [f32]| {
            attention_prefill(
                dims,
                &q,
                &k,
                &k,
                kc,
                &mut vc,
                start,
                &vec![dims.tokens as i32; dims.batch],
                window,
                1.0,
                o,
            )
        };
        assert!(matches!(run(&dims, &[-1], None, &mut kc, &mut o), Err(KernelError::Index { .. })));
        assert!(matches!(run(&dims, &[5], None, &mut kc, &mut o), Err(KernelError::Index { .. })));
        assert!(matches!(run(&dims, &[5], Some(6), &mut kc, &mut o), Err(KernelError::Index { .. })));
        run(&dims, &[5], Some(5), &mut kc, &mut o).unwrap();
        assert!(matches!(run(&dims, &[0], Some(0), &mut kc, &mut o), Err(KernelError::Shape { .. })));
        assert!(matches!(
            run(&AttentionDims { kv_heads: 3, ..dims }, &[0], None, &mut kc, &mut o),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(run(&dims, &[0], None, &mut kc[1..], &mut o), Err(KernelError::Size { .. })));
        assert!(matches!(run(&dims, &[0], None, &mut kc, &mut o[1..]), Err(KernelError::Size { .. })));
        assert!(matches!(run(&dims, &[0, 0], None, &mut kc, &mut o), Err(KernelError::Size { .. })));
        let mut o = vec![0.0; 4];
        assert!(matches!(
            attention_decode(&dims, &q[..4], &kc, &vc, &[4], None, 1.0, &mut o),
            Err(KernelError::Index { .. })
        ));
        attention_decode(&dims, &q[..4], &kc, &vc, &[3], None, 1.0, &mut o).unwrap();
        attention_decode(&dims, &q[..4], &kc, &vc, &[40], Some(4), 1.0, &mut o).unwrap();
        assert!(matches!(
            attention_decode(&dims, &q[..4], &kc, &vc, &[40], Some(5), 1.0, &mut o),
            Err(KernelError::Index { .. })
        ));
        assert!(matches!(
            attention_decode(&dims, &q[..3], &kc, &vc, &[0], None, 1.0, &mut o),
            Err(KernelError::Size { .. })
        ));
        assert!(matches!(kv_write(&dims, &mut kc, &k, &[-3]), Err(KernelError::Index { .. })));
        assert!(matches!(kv_write(&dims, &mut kc, &k[1..], &[0]), Err(KernelError::Size { .. })));
        assert!(matches!(
            kv_write(&AttentionDims { capacity: 0, ..dims }, &mut [], &k, &[0]),
            Err(KernelError::Shape { .. })
        ));
    }
}
