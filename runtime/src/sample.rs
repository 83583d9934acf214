//! sample: choosing the next token from a step's logits.
//!
//! [`SamplingParams`] (temperature, top-k, top-p, repetition penalty, seed) configure a [`Sampler`],
//! which owns its own seeded PRNG (SplitMix64: the same seed draws the same tokens on every machine)
//! and picks one token per call to [`Sampler::sample`]:
//! 1. the repetition penalty (CTRL / Hugging Face convention): for each distinct token of the history,
//!    a positive logit is divided by the penalty and a negative one multiplied by it;
//! 2. temperature 0 is greedy: the highest logit, ties going to the lowest id;
//! 3. otherwise the logits are divided by the temperature, the `top_k` highest kept, then the smallest
//!    set of highest-probability tokens whose softmax mass reaches `top_p` (at least one token), and a
//!    token is drawn from the renormalised probabilities.
//!
//! NaN logits are never chosen; `-inf` logits are never drawn (greedy may still return one when every
//! logit is `-inf` or NaN: then it returns the lowest such id). Among equal logits the lower id comes
//! first, so the filtered set does not depend on the sorting algorithm. History ids outside the
//! vocabulary are ignored.

/// How to choose the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep only the smallest set of most likely tokens whose probability mass is at least `p`.
    pub top_p: Option<f32>,
    /// Repetition penalty; 1 is off.
    pub repetition_penalty: f32,
    /// Seed of the sampler's PRNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding, no penalty.
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding, no penalty.
    pub fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, seed: 0 }
    }

    /// Whether the parameters are usable: temperature finite and ≥ 0, top_p in (0, 1], top_k ≥ 1,
    /// repetition penalty finite and > 0.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be a finite number ≥ 0, got {}", self.temperature));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("top_p must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be ≥ 1, got 0".to_string());
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, fast generator whose output depends only on the seed.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Chooses tokens under fixed [`SamplingParams`], with its own PRNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Scratch buffers, reused between calls.
    logits: Vec<f32>,
    seen: Vec<u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params` (validated), seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Sampler, String> {
        params.validate()?;
        let rng = SplitMix64(params.seed);
        Ok(Sampler { params, rng, logits: Vec::new(), seen: Vec::new(), candidates: Vec::new() })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token given one step's `logits` (one per vocabulary entry) and the tokens so far.
    /// Empty logits (a vocabulary of size 0, which no valid model has) give token 0.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let mut scratch = std::mem::take(&mut self.logits);
        scratch.clear();
        scratch.extend_from_slice(logits);
        self.penalise(&mut scratch, history);
        let id = if self.params.temperature == 0.0 { argmax(&scratch) } else { self.draw(&scratch) };
        self.logits = scratch;
        id
    }

    fn penalise(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || history.is_empty() {
            return;
        }
        self.seen.clear();
        self.seen.extend_from_slice(history);
        self.seen.sort_unstable();
        self.seen.dedup();
        for &id in &self.seen {
            if let Some(x) = logits.get_mut(id as usize) {
                if *x > 0.0 {
                    *x /= penalty;
                } else if *x < 0.0 {
                    *x *= penalty;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().filter(|(_, x)| !x.is_nan()).map(|(i, &x)| (i as u32, x / t)).filter(
            |(_, x)| {
                // -inf (before or after scaling) has probability 0.
                *x > f32::NEG_INFINITY
            },
        ));
        if cands.is_empty() {
            return argmax(logits);
        }
        // A +inf logit (or one that overflowed when divided by a tiny temperature) takes all the mass,
        // shared equally with any other +inf.
        if cands.iter().any(|(_, x)| *x == f32::INFINITY) {
            cands.retain(|(_, x)| *x == f32::INFINITY);
            cands.iter_mut().for_each(|c| c.1 = 0.0);
        }

        // Descending logit, then ascending id: a total order, so the kept set is unique.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.params.top_k
            && k < cands.len()
        {
            cands.select_nth_unstable_by(k - 1, order);
            cands.truncate(k);
        }
        // Sorted whenever filtered, so the draw below walks the same order on every machine and Rust
        // version (`select_nth_unstable_by` leaves the kept ones in an unspecified order).
        if self.params.top_k.is_some() || self.params.top_p.is_some() {
            cands.sort_unstable_by(order);
        }

        // Softmax weights relative to the largest logit, in f64.
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let weight = |x: f32| f64::from(x - max).exp();
        let total: f64 = cands.iter().map(|c| weight(c.1)).sum();
        let mut kept = cands.len();
        let mut kept_mass = total;
        if let Some(p) = self.params.top_p {
            let target = f64::from(p) * total;
            let mut mass = 0.0;
            for (i, c) in cands.iter().enumerate() {
                mass += weight(c.1);
                if mass >= target {
                    kept = i + 1;
                    kept_mass = mass;
                    break;
                }
            }
        }

        let u = self.rng.next_f64() * kept_mass;
        let mut mass = 0.0;
        for c in &cands[..kept] {
            mass += weight(c.1);
            if u < mass {
                return c.0;
            }
        }
        // Rounding: `u` fell at the very top of the range.
        cands[kept - 1].0
    }
}

/// The index of the largest logit; ties go to the lowest index and NaN never wins (index 0 when every
/// logit is NaN).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, penalty: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_k, top_p, repetition_penalty: penalty, seed }).unwrap()
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits.iter().map(|&x| f64::from((x - m) / t).exp()).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_lowest_id() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&[7.0, 7.0], &[]), 0);
        assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NEG_INFINITY], &[]), 1);
        assert_eq!(s.sample(&[-1.0, f32::NAN, -0.5], &[]), 2);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::INFINITY], &[]), 2);
        assert_eq!(s.sample(&[4.0], &[]), 0);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.3, 1.2, 1.25, -0.7, 1.25, 0.9];
        let greedy = argmax(&logits);
        assert_eq!(greedy, 2);
        let mut k1 = sampler(1.5, Some(1), None, 1.0, 7);
        let mut p0 = sampler(1.5, None, Some(1e-6), 1.0, 7);
        let mut both = sampler(0.8, Some(3), Some(1e-3), 1.0, 9);
        for _ in 0..500 {
            assert_eq!(k1.sample(&logits, &[]), greedy);
            assert_eq!(p0.sample(&logits, &[]), greedy);
            assert_eq!(both.sample(&logits, &[]), greedy);
        }
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0, 2.0, 0.5, -1.0, 1.5];
        let n = 200_000;
        for t in [0.7f32, 1.0, 2.0] {
            let expected = softmax(&logits, t);
            let freq = frequencies(&mut sampler(t, None, None, 1.0, 42), &logits, n);
            for (f, e) in freq.iter().zip(&expected) {
                assert!((f - e).abs() < 0.005, "t={t}: {freq:?} vs {expected:?}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_renormalise() {
        let logits = [1.0, 2.0, 0.5, -1.0, 1.5];
        let n = 200_000;
        let p = softmax(&logits, 1.0);
        // top-k = 2 keeps tokens 1 and 4.
        let freq = frequencies(&mut sampler(1.0, Some(2), None, 1.0, 3), &logits, n);
        let z = p[1] + p[4];
        let expected = [0.0, p[1] / z, 0.0, 0.0, p[4] / z];
        for (f, e) in freq.iter().zip(&expected) {
            assert!((f - e).abs() < 0.005, "{freq:?} vs {expected:?}");
        }
        // top-p just above p1 + p4 also keeps token 0 (the next most likely); just below keeps 1 and 4.
        let freq = frequencies(&mut sampler(1.0, None, Some((p[1] + p[4] + 0.01) as f32), 1.0, 4), &logits, n);
        let z = p[1] + p[4] + p[0];
        let expected = [p[0] / z, p[1] / z, 0.0, 0.0, p[4] / z];
        for (f, e) in freq.iter().zip(&expected) {
            assert!((f - e).abs() < 0.005, "{freq:?} vs {expected:?}");
        }
        let freq = frequencies(&mut sampler(1.0, None, Some((p[1] + p[4] - 0.01) as f32), 1.0, 5), &logits, n);
        assert!(freq[0] == 0.0 && freq[2] == 0.0 && freq[3] == 0.0, "{freq:?}");
        // -inf and NaN are never drawn; top_p = 1 keeps everything else.
        let logits = [0.0, f32::NEG_INFINITY, f32::NAN, 0.0];
        let freq = frequencies(&mut sampler(1.0, None, Some(1.0), 1.0, 6), &logits, 20_000);
        assert!(freq[1] == 0.0 && freq[2] == 0.0 && (freq[0] - 0.5).abs() < 0.02, "{freq:?}");
    }

    #[test]
    fn repetition_penalty_flips_a_choice() {
        // Positive logits are divided: 2.0 / 1.2 = 1.67 < 1.8.
        let mut s = sampler(0.0, None, None, 1.2, 0);
        assert_eq!(s.sample(&[2.0, 1.8], &[]), 0);
        assert_eq!(s.sample(&[2.0, 1.8], &[0]), 1);
        // Negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1.
        assert_eq!(s.sample(&[-1.0, -1.1], &[]), 0);
        assert_eq!(s.sample(&[-1.0, -1.1], &[0]), 1);
        // Each distinct token is penalised once: 2.0 / 1.2 = 1.67 > 1.5 (twice would be 1.39).
        assert_eq!(s.sample(&[2.0, 1.5], &[0, 0, 0]), 0);
        // History ids outside the vocabulary are ignored.
        assert_eq!(s.sample(&[2.0, 1.8], &[5, 1000]), 0);
        // A penalty < 1 rewards repetition.
        let mut s = sampler(0.0, None, None, 0.5, 0);
        assert_eq!(s.sample(&[2.0, 1.8], &[1]), 1);
        // With temperature, a penalised token's share drops accordingly.
        let mut s = sampler(1.0, None, None, 2.0, 11);
        let mut n0 = 0;
        for _ in 0..20_000 {
            n0 += usize::from(s.sample(&[2.0, 1.0], &[0]) == 0);
        }
        // Penalised: logits [1.0, 1.0] → one half each.
        assert!((n0 as f64 / 20_000.0 - 0.5).abs() < 0.02, "{n0}");
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed: u64| {
            let mut s = sampler(0.9, Some(20), Some(0.95), 1.1, seed);
            let mut history = Vec::new();
            for _ in 0..200 {
                let id = s.sample(&logits, &history);
                history.push(id);
            }
            history
        };
        let a = run(1234);
        assert_eq!(a, run(1234));
        assert_ne!(a, run(1235));
        assert_ne!(a, run(0));
        // The generator itself is fixed: SplitMix64's reference output for seed 0.
        let mut g = SplitMix64(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn validation() {
        let ok =
            SamplingParams { temperature: 0.7, top_k: Some(40), top_p: Some(0.9), repetition_penalty: 1.1, seed: 1 };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams { top_p: Some(1.0), ..ok.clone() }.validate(), Ok(()));
        let bad = [
            (SamplingParams { temperature: -0.1, ..ok.clone() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..ok.clone() }, "temperature"),
            (SamplingParams { temperature: f32::INFINITY, ..ok.clone() }, "temperature"),
            (SamplingParams { top_p: Some(0.0), ..ok.clone() }, "top_p"),
            (SamplingParams { top_p: Some(1.01), ..ok.clone() }, "top_p"),
            (SamplingParams { top_p: Some(f32::NAN), ..ok.clone() }, "top_p"),
            (SamplingParams { top_k: Some(0), ..ok.clone() }, "top_k"),
            (SamplingParams { repetition_penalty: 0.0, ..ok.clone() }, "repetition_penalty"),
            (SamplingParams { repetition_penalty: -1.0, ..ok.clone() }, "repetition_penalty"),
            (SamplingParams { repetition_penalty: f32::NAN, ..ok.clone() }, "repetition_penalty"),
        ];
        for (params, field) in bad {
            let err = params.validate().unwrap_err();
            assert!(err.starts_with(field), "{err}");
            assert_eq!(Sampler::new(params).unwrap_err(), err);
        }
    }
}
