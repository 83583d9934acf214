//! Mamba2 (SSD): the chunked `ssd_scan`, the one-token `ssd_step`, and the naive [`ssd_recurrent`].
//!
//! Per head `h` (group `g = h / (H/G)` for `B` and `C`), with `dt` already positive (softplus applied by
//! the graph) and `A[h]` the (negative) decay rate:
//!
//! ```text
//! s_t = exp(dt_t·A)·s_{t−1} + dt_t · x_t ⊗ B_t        (s is P × N)
//! y_t = s_t·C_t + D·x_t
//! ```
//!
//! Layouts: `x`, `y` `[B, T, H, P]`; `dt` `[B, T, H]`; `A`, `D` `[H]`; `Bm`, `Cm` `[B, T, G, N]`;
//! `state` `[B, H, P, N]` (f32), updated in place.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_vec, shape_err};

/// Sizes of the SSD kernels: `batch` sequences of `tokens` tokens, `heads` heads of width `p`, `groups`
/// groups of `B`/`C` with state size `n`. The step kernel ignores `tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsdDims {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub p: usize,
    pub groups: usize,
    pub n: usize,
}

/// The token operands of one SSD call, validated (with `A`, `D` and the state), with index helpers.
struct Ssd<'a> {
    dims: SsdDims,
    /// Tokens per operand row (T for the scans, 1 for the step).
    t: usize,
    x: &'a [f32],
    dt: &'a [f32],
    bm: &'a [f32],
    cm: &'a [f32],
}

impl<'a> Ssd<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        op: &'static str,
        dims: &SsdDims,
        t: usize,
        x: &'a [f32],
        dt: &'a [f32],
        a: &'a [f32],
        bm: &'a [f32],
        cm: &'a [f32],
        d: &'a [f32],
        state: &[f32],
    ) -> Result<Ssd<'a>> {
        let SsdDims { batch, heads, p, groups, n, .. } = *dims;
        if groups == 0 || !heads.is_multiple_of(groups) {
            return Err(shape_err(op, format!("groups {groups} must divide heads {heads}")));
        }
        check_dims(op, "x", x.len(), &[batch, t, heads, p])?;
        check_dims(op, "dt", dt.len(), &[batch, t, heads])?;
        check_len(op, "A", a.len(), heads)?;
        check_dims(op, "B", bm.len(), &[batch, t, groups, n])?;
        check_len(op, "C", cm.len(), bm.len())?;
        check_len(op, "D", d.len(), heads)?;
        check_dims(op, "state", state.len(), &[batch, heads, p, n])?;
        Ok(Ssd { dims: *dims, t, x, dt, bm, cm })
    }

    fn x(&self, b: usize, t: usize, h: usize) -> &'a [f32] {
        let p = self.dims.p;
        let at = ((b * self.t + t) * self.dims.heads + h) * p;
        &self.x[at..at + p]
    }

    fn dt(&self, b: usize, t: usize, h: usize) -> f32 {
        self.dt[(b * self.t + t) * self.dims.heads + h]
    }

    fn group(&self, h: usize) -> usize {
        h / (self.dims.heads / self.dims.groups)
    }

    fn b(&self, b: usize, t: usize, h: usize) -> &'a [f32] {
        let n = self.dims.n;
        let at = ((b * self.t + t) * self.dims.groups + self.group(h)) * n;
        &self.bm[at..at + n]
    }

    fn c(&self, b: usize, t: usize, h: usize) -> &'a [f32] {
        let n = self.dims.n;
        let at = ((b * self.t + t) * self.dims.groups + self.group(h)) * n;
        &self.cm[at..at + n]
    }

    /// Runs `head(b, h, initial state) → (y [T, P], final state [P, N])` for every (sequence, head) in
    /// parallel and writes the results into `y` and `state`.
    fn run(
        &self,
        state: &mut [f32],
        y: &mut [f32],
        head: impl Fn(usize, usize, &[f32]) -> (Vec<f32>, Vec<f32>) + Sync,
    ) {
        let SsdDims { batch, heads, p, n, .. } = self.dims;
        let (pn, t) = (p * n, self.t);
        let init: &[f32] = state;
        let results: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads)
            .into_par_iter()
            .map(|bh| head(bh / heads, bh % heads, &init[bh * pn..(bh + 1) * pn]))
            .collect();
        for (bh, (yh, sh)) in results.into_iter().enumerate() {
            let (b, h) = (bh / heads, bh % heads);
            for tt in 0..t {
                let at = ((b * t + tt) * heads + h) * p;
                y[at..at + p].copy_from_slice(&yh[tt * p..(tt + 1) * p]);
            }
            state[bh * pn..(bh + 1) * pn].copy_from_slice(&sh);
        }
    }
}

/// `s ← decay·s + coef · x ⊗ B` on a row-major `P × N` state.
fn rank1_update(s: &mut [f32], decay: f32, coef: f32, x: &[f32], bv: &[f32]) {
    let n = bv.len();
    for (i, &xi) in x.iter().enumerate() {
        let c = coef * xi;
        for (sj, &bj) in s[i * n..(i + 1) * n].iter_mut().zip(bv) {
            *sj = decay * *sj + c * bj;
        }
    }
}

/// `out[i] += coef · Σ_j s[i, j]·C[j]` for a row-major `P × N` state.
fn add_state_times_c(out: &mut [f32], coef: f32, s: &[f32], cv: &[f32]) {
    let n = cv.len();
    for (i, o) in out.iter_mut().enumerate() {
        *o += coef * s[i * n..(i + 1) * n].iter().zip(cv).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// `ssd_scan (x, dt, A, Bm, Cm, D, state, lens) → (y [B, T, H, P], state')` by the chunked SSD algorithm
/// with `chunk` tokens per chunk (the last chunk may be shorter). For each (sequence, head):
///
/// 1. chunk cumsum: `Acum_t = Σ_{r = chunk start ..= t} dt_r·A` within each chunk;
/// 2. chunk states: `S_c = Σ_{s ∈ c} exp(Acum_last − Acum_s)·dt_s · x_s ⊗ B_s`;
/// 3. state passing: `H_0 = state`, `H_{c+1} = exp(Acum_last of c)·H_c + S_c`;
/// 4. outputs: the intra-chunk term `Σ_{s ≤ t in c} (C_t·B_s)·exp(Acum_t − Acum_s)·dt_s·x_s` (the masked
///    decay "attention"), plus the inter-chunk term `exp(Acum_t)·H_c·C_t`, plus the skip `D·x_t`.
///
/// `y` covers all `T` tokens. `state` becomes the state after `lens[b]` tokens (`0 ..= T`): when
/// `lens[b]` falls inside a chunk, that chunk's state sum is taken over its first tokens only, so tokens at
/// positions `≥ lens[b]` never touch it; `lens[b] = 0` keeps the initial state.
#[allow(clippy::too_many_arguments)]
pub fn ssd_scan(
    dims: &SsdDims,
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    bm: &[f32],
    cm: &[f32],
    d: &[f32],
    state: &mut [f32],
    lens: &[i32],
    chunk: usize,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "ssd_scan";
    let SsdDims { batch, tokens, p, n, .. } = *dims;
    if chunk == 0 {
        return Err(shape_err(OP, "chunk must be positive"));
    }
    let ssd = Ssd::new(OP, dims, tokens, x, dt, a, bm, cm, d, state)?;
    check_len(OP, "y", y.len(), x.len())?;
    let lens = index_vec(OP, "lens", lens, batch, tokens)?;
    ssd.run(state, y, |b, h, init| {
        let ah = a[h];
        // 1. Within-chunk cumulative sums of dt·A.
        let mut acum = vec![0.0f32; tokens];
        for c0 in (0..tokens).step_by(chunk) {
            let mut run = 0.0f32;
            for (t, slot) in acum.iter_mut().enumerate().take((c0 + chunk).min(tokens)).skip(c0) {
                run += ssd.dt(b, t, h) * ah;
                *slot = run;
            }
        }
        // The state contribution of tokens c0 .. end of one chunk, decayed to token end − 1.
        let chunk_state = |c0: usize, end: usize| -> Vec<f32> {
            let mut s = vec![0.0f32; p * n];
            for t in c0..end {
                rank1_update(
                    &mut s,
                    1.0,
                    (acum[end - 1] - acum[t]).exp() * ssd.dt(b, t, h),
                    ssd.x(b, t, h),
                    ssd.b(b, t, h),
                );
            }
            s
        };
        // 2. Chunk states.
        let starts: Vec<usize> = (0..tokens).step_by(chunk).collect();
        let states: Vec<Vec<f32>> = starts.iter().map(|&c0| chunk_state(c0, (c0 + chunk).min(tokens))).collect();
        // 3. State passing: the state entering each chunk, and the state after lens[b] tokens.
        let mut entering = Vec::with_capacity(starts.len());
        let mut h_c = init.to_vec();
        let mut fin = init.to_vec();
        for (&c0, s_c) in starts.iter().zip(&states) {
            let c1 = (c0 + chunk).min(tokens);
            if lens[b] > c0 && lens[b] <= c1 {
                let l = lens[b];
                let decay = acum[l - 1].exp();
                fin = chunk_state(c0, l).iter().zip(&h_c).map(|(s, hv)| decay * hv + s).collect();
            }
            let decay = acum[c1 - 1].exp();
            let next: Vec<f32> = s_c.iter().zip(&h_c).map(|(s, hv)| decay * hv + s).collect();
            entering.push(std::mem::replace(&mut h_c, next));
        }
        // 4. Outputs: intra-chunk (C·Bᵀ with the decay mask), inter-chunk, and the D skip.
        let mut yh = vec![0.0f32; tokens * p];
        for (&c0, h_in) in starts.iter().zip(&entering) {
            let c1 = (c0 + chunk).min(tokens);
            for t in c0..c1 {
                let out = &mut yh[t * p..(t + 1) * p];
                let ct = ssd.c(b, t, h);
                for s in c0..=t {
                    let cb: f32 = ct.iter().zip(ssd.b(b, s, h)).map(|(u, v)| u * v).sum();
                    let coef = cb * (acum[t] - acum[s]).exp() * ssd.dt(b, s, h);
                    for (o, &xv) in out.iter_mut().zip(ssd.x(b, s, h)) {
                        *o += coef * xv;
                    }
                }
                add_state_times_c(out, acum[t].exp(), h_in, ct);
                for (o, &xv) in out.iter_mut().zip(ssd.x(b, t, h)) {
                    *o += d[h] * xv;
                }
            }
        }
        (yh, fin)
    });
    Ok(())
}

/// The naive token-by-token recurrence over `T` tokens, the independent reference for [`ssd_scan`]:
/// same operands and results (`y` for all tokens, `state` after `lens[b]` tokens), computed straight
/// from `s_t = exp(dt_t·A)·s_{t−1} + dt_t · x_t ⊗ B_t`, `y_t = s_t·C_t + D·x_t`.
#[allow(clippy::too_many_arguments)]
pub fn ssd_recurrent(
    dims: &SsdDims,
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    bm: &[f32],
    cm: &[f32],
    d: &[f32],
    state: &mut [f32],
    lens: &[i32],
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "ssd_recurrent";
    let SsdDims { batch, tokens, p, .. } = *dims;
    let ssd = Ssd::new(OP, dims, tokens, x, dt, a, bm, cm, d, state)?;
    check_len(OP, "y", y.len(), x.len())?;
    let lens = index_vec(OP, "lens", lens, batch, tokens)?;
    ssd.run(state, y, |b, h, init| {
        let mut s = init.to_vec();
        let mut fin = init.to_vec();
        let mut yh = vec![0.0f32; tokens * p];
        for t in 0..tokens {
            let dtv = ssd.dt(b, t, h);
            rank1_update(&mut s, (dtv * a[h]).exp(), dtv, ssd.x(b, t, h), ssd.b(b, t, h));
            let out = &mut yh[t * p..(t + 1) * p];
            add_state_times_c(out, 1.0, &s, ssd.c(b, t, h));
            for (o, &xv) in out.iter_mut().zip(ssd.x(b, t, h)) {
                *o += d[h] * xv;
            }
            if t + 1 == lens[b] {
                fin.copy_from_slice(&s);
            }
        }
        (yh, fin)
    });
    Ok(())
}

/// `ssd_step (x [B, H, P], dt [B, H], A [H], Bm [B, G, N], Cm [B, G, N], D [H], state [B, H, P, N]) →
/// (y [B, H, P], state')`: the recurrence for one token, updating `state` in place. `dims.tokens` is not
/// used.
#[allow(clippy::too_many_arguments)]
pub fn ssd_step(
    dims: &SsdDims,
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    bm: &[f32],
    cm: &[f32],
    d: &[f32],
    state: &mut [f32],
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "ssd_step";
    let ssd = Ssd::new(OP, dims, 1, x, dt, a, bm, cm, d, state)?;
    check_len(OP, "y", y.len(), x.len())?;
    ssd.run(state, y, |b, h, init| {
        let mut s = init.to_vec();
        let dtv = ssd.dt(b, 0, h);
        rank1_update(&mut s, (dtv * a[h]).exp(), dtv, ssd.x(b, 0, h), ssd.b(b, 0, h));
        let mut yh = vec![0.0f32; dims.p];
        add_state_times_c(&mut yh, 1.0, &s, ssd.c(b, 0, h));
        for (o, &xv) in yh.iter_mut().zip(ssd.x(b, 0, h)) {
            *o += d[h] * xv;
        }
        (yh, s)
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close, rel_err};

    struct Inputs {
        dims: SsdDims,
        x: Vec<f32>,
        dt: Vec<f32>,
        a: Vec<f32>,
        bm: Vec<f32>,
        cm: Vec<f32>,
        d: Vec<f32>,
        state: Vec<f32>,
    }

    fn inputs(rng: &mut Rng, dims: SsdDims, with_state: bool) -> Inputs {
        let SsdDims { batch, tokens, heads, p, groups, n } = dims;
        Inputs {
            dims,
            x: rng.normals(batch * tokens * heads * p, 1.0),
            // dt = softplus of a normal-ish value, A = −exp(log U[1, 16]) as in Mamba2 (kept moderate).
            dt: (0..batch * tokens * heads).map(|_| (rng.normal() - 1.0).exp().ln_1p()).collect(),
            a: (0..heads).map(|_| -rng.uniform(0.2, 2.0)).collect(),
            bm: rng.normals(batch * tokens * groups * n, 0.5),
            cm: rng.normals(batch * tokens * groups * n, 0.5),
            d: rng.normals(heads, 1.0),
            state: if with_state { rng.normals(batch * heads * p * n, 1.0) } else { vec![0.0; batch * heads * p * n] },
        }
    }

    fn scan(i: &Inputs, lens: &[i32], chunk: usize) -> (Vec<f32>, Vec<f32>) {
        let mut s = i.state.clone();
        let mut y = vec![f32::NAN; i.x.len()];
        ssd_scan(&i.dims, &i.x, &i.dt, &i.a, &i.bm, &i.cm, &i.d, &mut s, lens, chunk, &mut y).unwrap();
        (y, s)
    }

    fn recurrent(i: &Inputs, lens: &[i32]) -> (Vec<f32>, Vec<f32>) {
        let mut s = i.state.clone();
        let mut y = vec![f32::NAN; i.x.len()];
        ssd_recurrent(&i.dims, &i.x, &i.dt, &i.a, &i.bm, &i.cm, &i.d, &mut s, lens, &mut y).unwrap();
        (y, s)
    }

    /// Sequence `b`'s first `len` tokens as a batch of one.
    fn truncate(i: &Inputs, b: usize, len: usize) -> Inputs {
        let SsdDims { tokens, heads, p, groups, n, .. } = i.dims;
        let seq = |v: &[f32], row: usize| v[b * tokens * row..(b * tokens + len) * row].to_vec();
        Inputs {
            dims: SsdDims { batch: 1, tokens: len, ..i.dims },
            x: seq(&i.x, heads * p),
            dt: seq(&i.dt, heads),
            a: i.a.clone(),
            bm: seq(&i.bm, groups * n),
            cm: seq(&i.cm, groups * n),
            d: i.d.clone(),
            state: i.state[b * heads * p * n..(b + 1) * heads * p * n].to_vec(),
        }
    }

    /// A direct implementation written from the formula, in f64, for one small case.
    #[test]
    fn recurrent_matches_formula_in_f64() {
        let mut rng = Rng::new(70);
        let dims = SsdDims { batch: 2, tokens: 5, heads: 4, p: 3, groups: 2, n: 4 };
        let i = inputs(&mut rng, dims, true);
        let (y, s) = recurrent(&i, &[5, 5]);
        let SsdDims { batch, tokens, heads, p, groups, n } = dims;
        let mut wy = vec![0.0f32; y.len()];
        let mut ws = vec![0.0f32; s.len()];
        for b in 0..batch {
            for h in 0..heads {
                let g = h / (heads / groups);
                let mut st: Vec<f64> =
                    i.state[(b * heads + h) * p * n..(b * heads + h + 1) * p * n].iter().map(|&v| v.into()).collect();
                for t in 0..tokens {
                    let dtv = f64::from(i.dt[(b * tokens + t) * heads + h]);
                    let decay = (dtv * f64::from(i.a[h])).exp();
                    for pi in 0..p {
                        let xv = f64::from(i.x[((b * tokens + t) * heads + h) * p + pi]);
                        let mut yv = f64::from(i.d[h]) * xv;
                        for ni in 0..n {
                            let bv = f64::from(i.bm[((b * tokens + t) * groups + g) * n + ni]);
                            let cv = f64::from(i.cm[((b * tokens + t) * groups + g) * n + ni]);
                            st[pi * n + ni] = decay * st[pi * n + ni] + dtv * xv * bv;
                            yv += st[pi * n + ni] * cv;
                        }
                        wy[((b * tokens + t) * heads + h) * p + pi] = yv as f32;
                    }
                }
                for (k, v) in st.iter().enumerate() {
                    ws[(b * heads + h) * p * n + k] = *v as f32;
                }
            }
        }
        assert_close("ssd_recurrent y", &y, &wy, 1e-5);
        assert_close("ssd_recurrent state", &s, &ws, 1e-5);
    }

    #[test]
    fn chunked_scan_matches_recurrence() {
        let mut rng = Rng::new(71);
        // (chunk, tokens, heads, p, groups, n)
        let cases = [
            (8, 3, 2, 4, 1, 8),
            (8, 8, 4, 3, 2, 5),
            (8, 21, 3, 4, 3, 6),
            (8, 21, 4, 2, 1, 16),
            (64, 100, 2, 8, 1, 16),
            (1, 5, 2, 3, 1, 4),
        ];
        for &(chunk, tokens, heads, p, groups, n) in &cases {
            for with_state in [false, true] {
                let dims = SsdDims { batch: 2, tokens, heads, p, groups, n };
                let i = inputs(&mut rng, dims, with_state);
                let lens = [tokens as i32; 2];
                let (y, s) = scan(&i, &lens, chunk);
                let (wy, ws) = recurrent(&i, &lens);
                let ey = assert_close("ssd y", &y, &wy, 1e-4);
                let es = assert_close("ssd state", &s, &ws, 1e-4);
                println!(
                    "ssd chunk {chunk} T {tokens} H {heads} P {p} G {groups} N {n} state {with_state}: y {ey:.2e} state {es:.2e}"
                );
            }
        }
    }

    #[test]
    fn chunked_scan_final_state_stops_at_lens() {
        let mut rng = Rng::new(72);
        for &(chunk, tokens) in &[(8, 21), (4, 9), (64, 100)] {
            let batch = 5;
            let dims = SsdDims { batch, tokens, heads: 2, p: 3, groups: 1, n: 4 };
            let i = inputs(&mut rng, dims, true);
            let lens: Vec<i32> = [tokens, 0, 1, chunk, tokens - 2].iter().map(|&l| l.min(tokens) as i32).collect();
            let (y, s) = scan(&i, &lens, chunk);
            // Outputs cover every token whatever lens says.
            let (wy, ws) = recurrent(&i, &lens);
            assert_close("ssd y with lens", &y, &wy, 1e-4);
            assert_close("ssd state with lens (recurrent with lens)", &s, &ws, 1e-4);
            let pn = dims.heads * dims.p * dims.n;
            for b in 0..batch {
                // The recurrence stopped at lens[b], on the truncated sequence alone.
                let (_, want) = recurrent(&truncate(&i, b, lens[b] as usize), &[lens[b]]);
                let e = rel_err(&s[b * pn..(b + 1) * pn], &want);
                println!("ssd lens chunk {chunk} T {tokens} lens {}: state {e:.2e}", lens[b]);
                assert!(e < 1e-4, "ssd final state for lens {}: {e:e}", lens[b]);
            }
        }
    }

    #[test]
    fn steps_equal_scan() {
        let mut rng = Rng::new(73);
        let dims = SsdDims { batch: 2, tokens: 11, heads: 4, p: 3, groups: 2, n: 5 };
        let i = inputs(&mut rng, dims, true);
        let (y_scan, s_scan) = scan(&i, &[11, 11], 4);
        let SsdDims { batch, tokens, heads, p, groups, n } = dims;
        let mut s = i.state.clone();
        let mut y = vec![0.0; y_scan.len()];
        let at = |v: &[f32], row: usize, t: usize| -> Vec<f32> {
            (0..batch).flat_map(|b| v[(b * tokens + t) * row..(b * tokens + t + 1) * row].to_vec()).collect()
        };
        for t in 0..tokens {
            let mut yt = vec![f32::NAN; batch * heads * p];
            let (xt, dtt, bt, ct) =
                (at(&i.x, heads * p, t), at(&i.dt, heads, t), at(&i.bm, groups * n, t), at(&i.cm, groups * n, t));
            ssd_step(&dims, &xt, &dtt, &i.a, &bt, &ct, &i.d, &mut s, &mut yt).unwrap();
            for b in 0..batch {
                y[(b * tokens + t) * heads * p..(b * tokens + t + 1) * heads * p]
                    .copy_from_slice(&yt[b * heads * p..(b + 1) * heads * p]);
            }
        }
        assert_close("ssd_step y", &y, &y_scan, 1e-4);
        assert_close("ssd_step state", &s, &s_scan, 1e-4);
    }

    #[test]
    fn split_scan_equals_one_call() {
        let mut rng = Rng::new(74);
        let dims = SsdDims { batch: 2, tokens: 19, heads: 2, p: 4, groups: 1, n: 6 };
        let i = inputs(&mut rng, dims, true);
        let (y_full, s_full) = scan(&i, &[19, 19], 8);
        let SsdDims { batch, tokens, heads, p, groups, n } = dims;
        let part = |v: &[f32], row: usize, lo: usize, hi: usize| -> Vec<f32> {
            (0..batch).flat_map(|b| v[(b * tokens + lo) * row..(b * tokens + hi) * row].to_vec()).collect()
        };
        let t1 = 7;
        let mut s = i.state.clone();
        let mut ys = Vec::new();
        for (lo, hi) in [(0, t1), (t1, tokens)] {
            let d = SsdDims { tokens: hi - lo, ..dims };
            let mut y = vec![0.0; batch * (hi - lo) * heads * p];
            let (x, dt, bm, cm) = (
                part(&i.x, heads * p, lo, hi),
                part(&i.dt, heads, lo, hi),
                part(&i.bm, groups * n, lo, hi),
                part(&i.cm, groups * n, lo, hi),
            );
            let l = [(hi - lo) as i32; 2];
            ssd_scan(&d, &x, &dt, &i.a, &bm, &cm, &i.d, &mut s, &l, 8, &mut y).unwrap();
            ys.push(y);
        }
        let mut y = Vec::new();
        for b in 0..batch {
            y.extend_from_slice(&ys[0][b * t1 * heads * p..(b + 1) * t1 * heads * p]);
            y.extend_from_slice(&ys[1][b * (tokens - t1) * heads * p..(b + 1) * (tokens - t1) * heads * p]);
        }
        assert_close("ssd split y", &y, &y_full, 1e-4);
        assert_close("ssd split state", &s, &s_full, 1e-4);
    }

    #[test]
    fn ssd_rejects_bad_operands() {
        let mut rng = Rng::new(75);
        let dims = SsdDims { batch: 2, tokens: 3, heads: 2, p: 2, groups: 1, n: 3 };
        let i = inputs(&mut rng, dims, true);
        let mut s = i.state.clone();
        let mut y = vec![0.0; i.x.len()];
        let mut run = |dims: &SsdDims, x: &[f32], lens: &[i32], chunk: usize, s: &mut [f32]| {
            ssd_scan(dims, x, &i.dt, &i.a, &i.bm, &i.cm, &i.d, s, lens, chunk, &mut y)
        };
        assert!(matches!(run(&dims, &i.x, &[3, 4], 2, &mut s), Err(KernelError::Index { .. })));
        assert!(matches!(run(&dims, &i.x, &[3, -1], 2, &mut s), Err(KernelError::Index { .. })));
        assert!(matches!(run(&dims, &i.x, &[3], 2, &mut s), Err(KernelError::Size { .. })));
        assert!(matches!(run(&dims, &i.x, &[3, 3], 0, &mut s), Err(KernelError::Shape { .. })));
        assert!(matches!(run(&dims, &i.x[1..], &[3, 3], 2, &mut s), Err(KernelError::Size { .. })));
        assert!(matches!(
            run(&SsdDims { groups: 3, ..dims }, &i.x, &[3, 3], 2, &mut s),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(run(&dims, &i.x, &[3, 3], 2, &mut s[1..]), Err(KernelError::Size { .. })));
        assert_eq!(s, i.state, "nothing written on error");
        let mut y1 = vec![0.0; 8];
        let e = ssd_step(&dims, &i.x[..8], &i.dt[..4], &i.a, &i.bm[..6], &i.cm[..5], &i.d, &mut s, &mut y1);
        assert!(matches!(e, Err(KernelError::Size { .. })));
    }
}
