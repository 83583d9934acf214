//! Delta rule (DeltaNet, Gated DeltaNet): the chunked `delta_scan`, the one-token `delta_step`, and the
//! naive [`delta_recurrent`].
//!
//! Per head, with state `S` of `dk × dv` (row-major, `S[a, c]`), `α_t = exp(g_t)` when gated (else 1):
//!
//! ```text
//! S_t = α_t·(I − β_t·k_t·k_tᵀ)·S_{t−1} + β_t·k_t·v_tᵀ
//! o_t = scale · S_tᵀ·q_t          (the output reads the updated state)
//! ```
//!
//! Layouts: `q`, `k` `[B, T, H, dk]`; `v`, `o` `[B, T, H, dv]`; `beta`, `g` `[B, T, H]`; `state`
//! `[B, H, dk, dv]` (f32), updated in place.

use rayon::prelude::*;

use super::{Result, check_dims, check_len, index_vec, shape_err};

/// Sizes of the delta-rule kernels: `batch` sequences of `tokens` tokens, `heads` heads with key width
/// `dk` and value width `dv`. The step kernel ignores `tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaDims {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub dk: usize,
    pub dv: usize,
}

/// The operands of one delta-rule call, validated, with index helpers.
struct Delta<'a> {
    dims: DeltaDims,
    /// Tokens per operand row (T for the scans, 1 for the step).
    t: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f32],
    g: Option<&'a [f32]>,
}

impl<'a> Delta<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        op: &'static str,
        dims: &DeltaDims,
        t: usize,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        beta: &'a [f32],
        g: Option<&'a [f32]>,
        state: &[f32],
    ) -> Result<Delta<'a>> {
        let DeltaDims { batch, heads, dk, dv, .. } = *dims;
        check_dims(op, "q", q.len(), &[batch, t, heads, dk])?;
        check_len(op, "k", k.len(), q.len())?;
        check_dims(op, "v", v.len(), &[batch, t, heads, dv])?;
        check_dims(op, "beta", beta.len(), &[batch, t, heads])?;
        if let Some(g) = g {
            check_len(op, "g", g.len(), beta.len())?;
        }
        check_dims(op, "state", state.len(), &[batch, heads, dk, dv])?;
        Ok(Delta { dims: *dims, t, q, k, v, beta, g })
    }

    fn row(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.t + t) * self.dims.heads + h
    }

    fn q(&self, b: usize, t: usize, h: usize) -> &'a [f32] {
        let dk = self.dims.dk;
        &self.q[self.row(b, t, h) * dk..(self.row(b, t, h) + 1) * dk]
    }

    fn k(&self, b: usize, t: usize, h: usize) -> &'a [f32] {
        let dk = self.dims.dk;
        &self.k[self.row(b, t, h) * dk..(self.row(b, t, h) + 1) * dk]
    }

    fn v(&self, b: usize, t: usize, h: usize) -> &'a [f32] {
        let dv = self.dims.dv;
        &self.v[self.row(b, t, h) * dv..(self.row(b, t, h) + 1) * dv]
    }

    fn beta(&self, b: usize, t: usize, h: usize) -> f32 {
        self.beta[self.row(b, t, h)]
    }

    /// The log-gate `g` (0 when not gated).
    fn g(&self, b: usize, t: usize, h: usize) -> f32 {
        self.g.map_or(0.0, |g| g[self.row(b, t, h)])
    }

    /// Runs `head(b, h, initial state) → (o [T, dv], final state [dk, dv])` for every (sequence, head)
    /// in parallel and writes the results into `o` and `state`.
    fn run(
        &self,
        state: &mut [f32],
        o: &mut [f32],
        head: impl Fn(usize, usize, &[f32]) -> (Vec<f32>, Vec<f32>) + Sync,
    ) {
        let DeltaDims { batch, heads, dk, dv, .. } = self.dims;
        let (kv, t) = (dk * dv, self.t);
        let init: &[f32] = state;
        let results: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads)
            .into_par_iter()
            .map(|bh| head(bh / heads, bh % heads, &init[bh * kv..(bh + 1) * kv]))
            .collect();
        for (bh, (oh, sh)) in results.into_iter().enumerate() {
            let (b, h) = (bh / heads, bh % heads);
            for tt in 0..t {
                let at = self.row(b, tt, h) * dv;
                o[at..at + dv].copy_from_slice(&oh[tt * dv..(tt + 1) * dv]);
            }
            state[bh * kv..(bh + 1) * kv].copy_from_slice(&sh);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out[c] = Σ_a x[a]·S[a, c]` (`Sᵀ·x`) for a row-major `dk × dv` state.
fn state_t_times(s: &[f32], x: &[f32], dv: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; dv];
    for (a, &xa) in x.iter().enumerate() {
        for (o, &sv) in out.iter_mut().zip(&s[a * dv..(a + 1) * dv]) {
            *o += xa * sv;
        }
    }
    out
}

/// One state update in the decode form: `S ← α·S`, `v' = β·(v − Sᵀk)`, `S ← S + k·v'ᵀ`.
fn step_one(s: &mut [f32], k: &[f32], v: &[f32], beta: f32, alpha: f32, dv: usize) {
    s.iter_mut().for_each(|x| *x *= alpha);
    let sk = state_t_times(s, k, dv);
    let vp: Vec<f32> = v.iter().zip(&sk).map(|(vc, skc)| beta * (vc - skc)).collect();
    for (a, &ka) in k.iter().enumerate() {
        for (sv, &vc) in s[a * dv..(a + 1) * dv].iter_mut().zip(&vp) {
            *sv += ka * vc;
        }
    }
}

/// `delta_scan (q, k, v, beta [, g], state, lens) → (o [B, T, H, dv], state')` by the chunked WY
/// algorithm with `chunk` tokens per chunk (the last chunk may be shorter). Within a chunk of `L` tokens
/// (local index `i`), with `G` the within-chunk inclusive cumsum of `g` (0 when not gated) and `S` the
/// state entering the chunk:
///
/// 1. `A[i, j] = β_i·exp(G_i − G_j)·(k_i·k_j)` for `i > j` (strictly lower triangular);
/// 2. the UT transform `T = (I + A)⁻¹` by forward substitution;
/// 3. the WY factors `W = T·(β ⊙ exp(G) ⊙ K)` and `U = T·(β ⊙ V)`;
/// 4. `V_new = U − W·S`;
/// 5. `O = scale·[(Q ⊙ exp(G))·S + ((Q·Kᵀ) ⊙ exp(G_i − G_j) ⊙ M)·V_new]`, `M` causal including the
///    diagonal;
/// 6. `S ← exp(G_last)·S + (K ⊙ exp(G_last − G))ᵀ·V_new`.
///
/// `o` covers all `T` tokens. `state` becomes the state after `lens[b]` tokens (`0 ..= T`): when
/// `lens[b]` ends inside a chunk, step 6 is taken over that chunk's first tokens only
/// (`exp(G_l)·S + Σ_{j ≤ l} exp(G_l − G_j)·k_j·V_new[j]ᵀ` with `l` the last valid token — exact because
/// row `j` of `V_new` depends on tokens `≤ j` only); `lens[b] = 0` keeps the initial state.
#[allow(clippy::too_many_arguments)]
pub fn delta_scan(
    dims: &DeltaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: Option<&[f32]>,
    state: &mut [f32],
    lens: &[i32],
    chunk: usize,
    scale: f64,
    o: &mut [f32],
) -> Result<()> {
    const OP: &str = "delta_scan";
    let DeltaDims { batch, tokens, dk, dv, .. } = *dims;
    if chunk == 0 {
        return Err(shape_err(OP, "chunk must be positive"));
    }
    let dl = Delta::new(OP, dims, tokens, q, k, v, beta, g, state)?;
    check_len(OP, "o", o.len(), v.len())?;
    let lens = index_vec(OP, "lens", lens, batch, tokens)?;
    let scale = scale as f32;
    dl.run(state, o, |b, h, init| {
        let mut s = init.to_vec();
        let mut fin = init.to_vec();
        let mut oh = vec![0.0f32; tokens * dv];
        for c0 in (0..tokens).step_by(chunk) {
            let len = chunk.min(tokens - c0);
            let tok = |i: usize| c0 + i;
            // Within-chunk cumsum of the log-gates.
            let mut gc = vec![0.0f32; len];
            let mut run = 0.0f32;
            for (i, gi) in gc.iter_mut().enumerate() {
                run += dl.g(b, tok(i), h);
                *gi = run;
            }
            let betas: Vec<f32> = (0..len).map(|i| dl.beta(b, tok(i), h)).collect();
            // 1. A (strictly lower triangular, row-major L × L).
            let mut a = vec![0.0f32; len * len];
            for i in 0..len {
                for j in 0..i {
                    a[i * len + j] = betas[i] * (gc[i] - gc[j]).exp() * dot(dl.k(b, tok(i), h), dl.k(b, tok(j), h));
                }
            }
            // 2. T = (I + A)⁻¹ by forward substitution: T[i, j] = −Σ_{j ≤ m < i} A[i, m]·T[m, j].
            let mut tm = vec![0.0f32; len * len];
            for i in 0..len {
                tm[i * len + i] = 1.0;
                for j in 0..i {
                    tm[i * len + j] = -(j..i).map(|m| a[i * len + m] * tm[m * len + j]).sum::<f32>();
                }
            }
            // 3. W = T·(β ⊙ exp(G) ⊙ K) [L × dk], U = T·(β ⊙ V) [L × dv].
            let mut w = vec![0.0f32; len * dk];
            let mut u = vec![0.0f32; len * dv];
            for i in 0..len {
                for j in 0..=i {
                    let t_ij = tm[i * len + j];
                    let cw = t_ij * betas[j] * gc[j].exp();
                    for (wv, &kv) in w[i * dk..(i + 1) * dk].iter_mut().zip(dl.k(b, tok(j), h)) {
                        *wv += cw * kv;
                    }
                    let cu = t_ij * betas[j];
                    for (uv, &vv) in u[i * dv..(i + 1) * dv].iter_mut().zip(dl.v(b, tok(j), h)) {
                        *uv += cu * vv;
                    }
                }
            }
            // 4. V_new = U − W·S.
            let mut vnew = u;
            for i in 0..len {
                let ws = state_t_times(&s, &w[i * dk..(i + 1) * dk], dv);
                for (x, y) in vnew[i * dv..(i + 1) * dv].iter_mut().zip(&ws) {
                    *x -= y;
                }
            }
            // 5. Outputs.
            for i in 0..len {
                let qi = dl.q(b, tok(i), h);
                let out = &mut oh[tok(i) * dv..(tok(i) + 1) * dv];
                let inter = state_t_times(&s, qi, dv);
                let ei = gc[i].exp();
                for (ov, iv) in out.iter_mut().zip(&inter) {
                    *ov = ei * iv;
                }
                for j in 0..=i {
                    let c = dot(qi, dl.k(b, tok(j), h)) * (gc[i] - gc[j]).exp();
                    for (ov, &nv) in out.iter_mut().zip(&vnew[j * dv..(j + 1) * dv]) {
                        *ov += c * nv;
                    }
                }
                out.iter_mut().for_each(|ov| *ov *= scale);
            }
            // 6. The state after local token `last`: exp(G_last)·S + Σ_{j ≤ last} exp(G_last − G_j)·k_j·V_new[j]ᵀ.
            let advance = |s: &[f32], last: usize| -> Vec<f32> {
                let mut next: Vec<f32> = s.iter().map(|x| gc[last].exp() * x).collect();
                for j in 0..=last {
                    let e = (gc[last] - gc[j]).exp();
                    for (kd, &ka) in dl.k(b, tok(j), h).iter().enumerate() {
                        for (nv, &vv) in next[kd * dv..(kd + 1) * dv].iter_mut().zip(&vnew[j * dv..(j + 1) * dv]) {
                            *nv += e * ka * vv;
                        }
                    }
                }
                next
            };
            if lens[b] > c0 && lens[b] <= c0 + len {
                fin = advance(&s, lens[b] - c0 - 1);
            }
            s = advance(&s, len - 1);
        }
        (oh, fin)
    });
    Ok(())
}

/// The naive token-by-token recurrence over `T` tokens, the independent reference for [`delta_scan`]:
/// same operands and results (`o` for all tokens, `state` after `lens[b]` tokens), computed straight from
/// `S_t = α_t·(I − β_t·k_t·k_tᵀ)·S_{t−1} + β_t·k_t·v_tᵀ` and `o_t = scale · S_tᵀ·q_t`.
#[allow(clippy::too_many_arguments)]
pub fn delta_recurrent(
    dims: &DeltaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: Option<&[f32]>,
    state: &mut [f32],
    lens: &[i32],
    scale: f64,
    o: &mut [f32],
) -> Result<()> {
    const OP: &str = "delta_recurrent";
    let DeltaDims { batch, tokens, dv, .. } = *dims;
    let dl = Delta::new(OP, dims, tokens, q, k, v, beta, g, state)?;
    check_len(OP, "o", o.len(), v.len())?;
    let lens = index_vec(OP, "lens", lens, batch, tokens)?;
    let scale = scale as f32;
    dl.run(state, o, |b, h, init| {
        let mut s = init.to_vec();
        let mut fin = init.to_vec();
        let mut oh = vec![0.0f32; tokens * dv];
        for t in 0..tokens {
            let (kt, vt, bt, at) = (dl.k(b, t, h), dl.v(b, t, h), dl.beta(b, t, h), dl.g(b, t, h).exp());
            // (kᵀS)[c] = Σ_m k[m]·S[m, c]
            let kts = state_t_times(&s, kt, dv);
            // S[x, c] ← α·(S[x, c] − β·k[x]·(kᵀS)[c]) + β·k[x]·v[c]
            for (row, &kx) in s.chunks_mut(dv.max(1)).zip(kt) {
                for ((sv, &ksc), &vc) in row.iter_mut().zip(&kts).zip(vt) {
                    *sv = at * (*sv - bt * kx * ksc) + bt * kx * vc;
                }
            }
            let ot = state_t_times(&s, dl.q(b, t, h), dv);
            for (dst, &src) in oh[t * dv..(t + 1) * dv].iter_mut().zip(&ot) {
                *dst = scale * src;
            }
            if t + 1 == lens[b] {
                fin.copy_from_slice(&s);
            }
        }
        (oh, fin)
    });
    Ok(())
}

/// `delta_step (q [B, H, dk], k, v [B, H, dv], beta [B, H] [, g [B, H]], state [B, H, dk, dv]) →
/// (o [B, H, dv], state')`: one token, updating `state` in place, in the decode form
/// `S ← α·S; v' = β·(v − Sᵀk); S ← S + k·v'ᵀ; o = scale·Sᵀq` (the same recurrence). `dims.tokens` is not
/// used.
#[allow(clippy::too_many_arguments)]
pub fn delta_step(
    dims: &DeltaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: Option<&[f32]>,
    state: &mut [f32],
    scale: f64,
    o: &mut [f32],
) -> Result<()> {
    const OP: &str = "delta_step";
    let dv = dims.dv;
    let dl = Delta::new(OP, dims, 1, q, k, v, beta, g, state)?;
    check_len(OP, "o", o.len(), v.len())?;
    let scale = scale as f32;
    dl.run(state, o, |b, h, init| {
        let mut s = init.to_vec();
        step_one(&mut s, dl.k(b, 0, h), dl.v(b, 0, h), dl.beta(b, 0, h), dl.g(b, 0, h).exp(), dv);
        let out: Vec<f32> = state_t_times(&s, dl.q(b, 0, h), dv).iter().map(|x| scale * x).collect();
        (out, s)
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::cpu::KernelError;
    use crate::cpu::testutil::{Rng, assert_close, l2_rows, rel_err};

    struct Inputs {
        dims: DeltaDims,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        beta: Vec<f32>,
        g: Option<Vec<f32>>,
        state: Vec<f32>,
    }

    fn inputs(rng: &mut Rng, dims: DeltaDims, gated: bool, with_state: bool) -> Inputs {
        let DeltaDims { batch, tokens, heads, dk, dv } = dims;
        let rows = batch * tokens * heads;
        // L2-normalised q and k and β ∈ (0, 1), as the layers feed them.
        let mut q = rng.normals(rows * dk, 1.0);
        let mut k = rng.normals(rows * dk, 1.0);
        l2_rows(&mut q, dk);
        l2_rows(&mut k, dk);
        Inputs {
            dims,
            q,
            k,
            v: rng.normals(rows * dv, 1.0),
            beta: rng.uniforms(rows, 0.05, 0.95),
            // Log-decays in (−0.7, −0.01): α ∈ (0.5, 0.99).
            g: gated.then(|| rng.uniforms(rows, -0.7, -0.01)),
            state: if with_state {
                rng.normals(batch * heads * dk * dv, 0.5)
            } else {
                vec![0.0; batch * heads * dk * dv]
            },
        }
    }

    fn scan(i: &Inputs, lens: &[i32], chunk: usize) -> (Vec<f32>, Vec<f32>) {
        let mut s = i.state.clone();
        let mut o = vec![f32::NAN; i.v.len()];
        delta_scan(&i.dims, &i.q, &i.k, &i.v, &i.beta, i.g.as_deref(), &mut s, lens, chunk, 0.4, &mut o).unwrap();
        (o, s)
    }

    fn recurrent(i: &Inputs, lens: &[i32]) -> (Vec<f32>, Vec<f32>) {
        let mut s = i.state.clone();
        let mut o = vec![f32::NAN; i.v.len()];
        delta_recurrent(&i.dims, &i.q, &i.k, &i.v, &i.beta, i.g.as_deref(), &mut s, lens, 0.4, &mut o).unwrap();
        (o, s)
    }

    fn truncate(i: &Inputs, b: usize, len: usize) -> Inputs {
        let DeltaDims { tokens, heads, dk, dv, .. } = i.dims;
        let seq = |v: &[f32], row: usize| v[b * tokens * row..(b * tokens + len) * row].to_vec();
        Inputs {
            dims: DeltaDims { batch: 1, tokens: len, ..i.dims },
            q: seq(&i.q, heads * dk),
            k: seq(&i.k, heads * dk),
            v: seq(&i.v, heads * dv),
            beta: seq(&i.beta, heads),
            g: i.g.as_ref().map(|g| seq(g, heads)),
            state: i.state[b * heads * dk * dv..(b + 1) * heads * dk * dv].to_vec(),
        }
    }

    /// The recurrence as explicit matrices in f64: S = α(I − βkkᵀ)S + βkvᵀ, o = scale·Sᵀq.
    #[test]
    fn recurrent_matches_matrix_formula_in_f64() {
        let mut rng = Rng::new(80);
        let dims = DeltaDims { batch: 2, tokens: 6, heads: 2, dk: 4, dv: 3 };
        for gated in [false, true] {
            let i = inputs(&mut rng, dims, gated, true);
            let (o, s) = recurrent(&i, &[6, 6]);
            let DeltaDims { batch, tokens, heads, dk, dv } = dims;
            let mut wo = vec![0.0f32; o.len()];
            let mut ws = vec![0.0f32; s.len()];
            for b in 0..batch {
                for h in 0..heads {
                    let base = (b * heads + h) * dk * dv;
                    let mut st: Vec<f64> = i.state[base..base + dk * dv].iter().map(|&x| x.into()).collect();
                    for t in 0..tokens {
                        let r = (b * tokens + t) * heads + h;
                        let k: Vec<f64> = i.k[r * dk..(r + 1) * dk].iter().map(|&x| x.into()).collect();
                        let q: Vec<f64> = i.q[r * dk..(r + 1) * dk].iter().map(|&x| x.into()).collect();
                        let v: Vec<f64> = i.v[r * dv..(r + 1) * dv].iter().map(|&x| x.into()).collect();
                        let be = f64::from(i.beta[r]);
                        let al = i.g.as_ref().map_or(1.0, |g| f64::from(g[r]).exp());
                        // M = I − β k kᵀ; S' = α M S + β k vᵀ.
                        let mut next = vec![0.0f64; dk * dv];
                        for x in 0..dk {
                            for c in 0..dv {
                                let mut acc = 0.0;
                                for m in 0..dk {
                                    let mm = if x == m { 1.0 } else { 0.0 } - be * k[x] * k[m];
                                    acc += mm * st[m * dv + c];
                                }
                                next[x * dv + c] = al * acc + be * k[x] * v[c];
                            }
                        }
                        st = next;
                        for c in 0..dv {
                            wo[r * dv + c] = (0.4 * (0..dk).map(|x| st[x * dv + c] * q[x]).sum::<f64>()) as f32;
                        }
                    }
                    for (j, x) in st.iter().enumerate() {
                        ws[base + j] = *x as f32;
                    }
                }
            }
            assert_close("delta_recurrent o", &o, &wo, 1e-5);
            assert_close("delta_recurrent state", &s, &ws, 1e-5);
        }
    }

    #[test]
    fn chunked_scan_matches_recurrence() {
        let mut rng = Rng::new(81);
        // (chunk, tokens, heads, dk, dv)
        let cases = [
            (8, 3, 2, 8, 4),
            (8, 8, 3, 4, 6),
            (8, 21, 2, 8, 8),
            (8, 21, 4, 5, 3),
            (64, 100, 2, 16, 8),
            (1, 6, 1, 4, 4),
        ];
        for &(chunk, tokens, heads, dk, dv) in &cases {
            for gated in [false, true] {
                for with_state in [false, true] {
                    let dims = DeltaDims { batch: 2, tokens, heads, dk, dv };
                    let i = inputs(&mut rng, dims, gated, with_state);
                    let lens = [tokens as i32; 2];
                    let (o, s) = scan(&i, &lens, chunk);
                    let (wo, ws) = recurrent(&i, &lens);
                    let eo = assert_close("delta o", &o, &wo, 1e-4);
                    let es = assert_close("delta state", &s, &ws, 1e-4);
                    println!(
                        "delta chunk {chunk} T {tokens} H {heads} dk {dk} dv {dv} gated {gated} state {with_state}: o {eo:.2e} state {es:.2e}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunked_scan_final_state_stops_at_lens() {
        let mut rng = Rng::new(82);
        for gated in [false, true] {
            for &(chunk, tokens) in &[(8, 21), (4, 9), (64, 100)] {
                let batch = 5;
                let dims = DeltaDims { batch, tokens, heads: 2, dk: 4, dv: 3 };
                let i = inputs(&mut rng, dims, gated, true);
                let lens: Vec<i32> = [tokens, 0, 1, chunk, tokens - 2].iter().map(|&l| l.min(tokens) as i32).collect();
                let (o, s) = scan(&i, &lens, chunk);
                let (wo, ws) = recurrent(&i, &lens);
                assert_close("delta o with lens", &o, &wo, 1e-4);
                assert_close("delta state with lens (recurrent with lens)", &s, &ws, 1e-4);
                let kv = dims.heads * dims.dk * dims.dv;
                for b in 0..batch {
                    let (_, want) = recurrent(&truncate(&i, b, lens[b] as usize), &[lens[b]]);
                    let e = rel_err(&s[b * kv..(b + 1) * kv], &want);
                    println!("delta lens gated {gated} chunk {chunk} T {tokens} lens {}: state {e:.2e}", lens[b]);
                    assert!(e < 1e-4, "delta final state for lens {}: {e:e}", lens[b]);
                }
            }
        }
    }

    #[test]
    fn steps_equal_scan() {
        let mut rng = Rng::new(83);
        for gated in [false, true] {
            let dims = DeltaDims { batch: 2, tokens: 11, heads: 3, dk: 4, dv: 5 };
            let i = inputs(&mut rng, dims, gated, true);
            let (o_scan, s_scan) = scan(&i, &[11, 11], 4);
            let DeltaDims { batch, tokens, heads, dk, dv } = dims;
            let at = |v: &[f32], row: usize, t: usize| -> Vec<f32> {
                (0..batch).flat_map(|b| v[(b * tokens + t) * row..(b * tokens + t + 1) * row].to_vec()).collect()
            };
            let mut s = i.state.clone();
            let mut o = vec![0.0; o_scan.len()];
            for t in 0..tokens {
                let mut ot = vec![f32::NAN; batch * heads * dv];
                let gt = i.g.as_ref().map(|g| at(g, heads, t));
                let (qt, kt, vt, bt) =
                    (at(&i.q, heads * dk, t), at(&i.k, heads * dk, t), at(&i.v, heads * dv, t), at(&i.beta, heads, t));
                delta_step(&dims, &qt, &kt, &vt, &bt, gt.as_deref(), &mut s, 0.4, &mut ot).unwrap();
                for b in 0..batch {
                    o[(b * tokens + t) * heads * dv..(b * tokens + t + 1) * heads * dv]
                        .copy_from_slice(&ot[b * heads * dv..(b + 1) * heads * dv]);
                }
            }
            assert_close("delta_step o", &o, &o_scan, 1e-4);
            assert_close("delta_step state", &s, &s_scan, 1e-4);
        }
    }

    #[test]
    fn split_scan_equals_one_call() {
        let mut rng = Rng::new(84);
        for gated in [false, true] {
            let dims = DeltaDims { batch: 2, tokens: 19, heads: 2, dk: 6, dv: 4 };
            let i = inputs(&mut rng, dims, gated, true);
            let (o_full, s_full) = scan(&i, &[19, 19], 8);
            let DeltaDims { batch, tokens, heads, dk, dv } = dims;
            let part = |v: &[f32], row: usize, lo: usize, hi: usize| -> Vec<f32> {
                (0..batch).flat_map(|b| v[(b * tokens + lo) * row..(b * tokens + hi) * row].to_vec()).collect()
            };
            let t1 = 11;
            let mut s = i.state.clone();
            let mut os = Vec::new();
            for (lo, hi) in [(0, t1), (t1, tokens)] {
                let d = DeltaDims { tokens: hi - lo, ..dims };
                let mut o = vec![0.0; batch * (hi - lo) * heads * dv];
                let g = i.g.as_ref().map(|g| part(g, heads, lo, hi));
                let (q, k, v, be) = (
                    part(&i.q, heads * dk, lo, hi),
                    part(&i.k, heads * dk, lo, hi),
                    part(&i.v, heads * dv, lo, hi),
                    part(&i.beta, heads, lo, hi),
                );
                let l = [(hi - lo) as i32; 2];
                delta_scan(&d, &q, &k, &v, &be, g.as_deref(), &mut s, &l, 8, 0.4, &mut o).unwrap();
                os.push(o);
            }
            let mut o = Vec::new();
            for b in 0..batch {
                o.extend_from_slice(&os[0][b * t1 * heads * dv..(b + 1) * t1 * heads * dv]);
                o.extend_from_slice(&os[1][b * (tokens - t1) * heads * dv..(b + 1) * (tokens - t1) * heads * dv]);
            }
            assert_close("delta split o", &o, &o_full, 1e-4);
            assert_close("delta split state", &s, &s_full, 1e-4);
        }
    }

    #[test]
    fn delta_rejects_bad_operands() {
        let mut rng = Rng::new(85);
        let dims = DeltaDims { batch: 2, tokens: 3, heads: 2, dk: 3, dv: 2 };
        let i = inputs(&mut rng, dims, true, true);
        let mut s = i.state.clone();
        let mut o = vec![0.0; i.v.len()];
        let g = i.g.clone().unwrap();
        let run = |g: Option<&[f32]>, lens: &[i32], chunk: usize, s: &mut [f32], o: &mut [f32]| {
            delta_scan(&dims, &i.q, &i.k, &i.v, &i.beta, g, s, lens, chunk, 1.0, o)
        };
        assert!(matches!(run(Some(&g), &[3, 4], 2, &mut s, &mut o), Err(KernelError::Index { .. })));
        assert!(matches!(run(Some(&g), &[-2, 3], 2, &mut s, &mut o), Err(KernelError::Index { .. })));
        assert!(matches!(run(Some(&g), &[3, 3], 0, &mut s, &mut o), Err(KernelError::Shape { .. })));
        assert!(matches!(run(Some(&g[1..]), &[3, 3], 2, &mut s, &mut o), Err(KernelError::Size { .. })));
        assert!(matches!(run(None, &[3, 3], 2, &mut s[1..], &mut o), Err(KernelError::Size { .. })));
        assert!(matches!(run(None, &[3, 3], 2, &mut s, &mut o[1..]), Err(KernelError::Size { .. })));
        assert_eq!(s, i.state, "nothing written on error");
        let mut o1 = vec![0.0; 8];
        let e = delta_step(&dims, &i.q[..12], &i.k[..12], &i.v[..8], &i.beta[..3], None, &mut s, 1.0, &mut o1);
        assert!(matches!(e, Err(KernelError::Size { .. })));
    }
}
