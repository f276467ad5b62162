//! Picking the next token from a row of logits: greedy, temperature, top-k and top-p (nucleus).
//!
//! Sampling is kept apart from the model so it can be a pure function of `(logits, params, rng)`:
//! generation, PPO rollouts and evaluation all draw through it, and a fixed seed gives the same
//! tokens on every machine (the generator is ChaCha, whose stream is specified, not `thread_rng`).
//! The order of the filters follows Hugging Face's `generate`: temperature, then top-k, then
//! top-p, so a config written for `transformers` means the same thing here.

use crate::kernels::math as fused_math;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

/// Why sampling parameters or a logits row were refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature {0} is not a finite number >= 0\nhint: use 0 for greedy decoding")]
    BadTemperature(f32),
    #[error("top_p {0} is outside (0, 1]\nhint: use 1.0 to disable nucleus sampling")]
    BadTopP(f32),
    #[error("top_k 0 keeps no token\nhint: leave top_k unset to disable it")]
    ZeroTopK,
    #[error("the logits row is empty")]
    EmptyLogits,
    #[error("the logits row has no finite maximum (NaN or all -inf); the model output is broken")]
    NoFiniteLogit,
}

/// How to choose the next token. `temperature == 0` means greedy (argmax); the other fields are
/// then ignored.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability mass reaches `p` (`None` or
    /// 1.0: all).
    pub top_p: Option<f32>,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution (what PPO rollouts need, so that the
    /// log-probs recorded during generation are those of the policy being optimised).
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the ranges; called by [`Sampler::new`] so that a bad config fails before any
    /// model work.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::BadTemperature(self.temperature));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(SamplingError::BadTopP(p));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::ZeroTopK);
        }
        Ok(())
    }
}

/// A seeded sampler: the parameters plus the random stream they draw from.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Draws one token id from `logits` (one row, vocabulary-sized).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        sample_token(logits, &self.params, &mut self.rng)
    }
}

/// Index of the largest logit; ties go to the lowest index, as `torch.argmax` does.
pub fn argmax(logits: &[f32]) -> Result<u32, SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            return Err(SamplingError::NoFiniteLogit);
        }
        if !found || v > best_v {
            best = i;
            best_v = v;
            found = true;
        }
    }
    if best_v == f32::NEG_INFINITY {
        return Err(SamplingError::NoFiniteLogit);
    }
    Ok(best as u32)
}

/// Draws one token id from `logits` under `params` using `rng`. Pure apart from the rng.
pub fn sample_token<R: Rng + ?Sized>(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut R,
) -> Result<u32, SamplingError> {
    params.validate()?;
    if params.is_greedy() {
        return argmax(logits);
    }
    let candidates = filtered_distribution(logits, params)?;
    // Inverse-CDF draw over the surviving tokens; probabilities are already normalised, but the
    // total is recomputed so rounding can never leave the draw past the last candidate.
    let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
    let mut u = rng.random::<f64>() * total;
    for &(id, p) in &candidates {
        if u < p {
            return Ok(id);
        }
        u -= p;
    }
    // Only reachable through floating-point rounding: the last candidate owns the remainder.
    Ok(candidates.last().map(|&(id, _)| id).unwrap_or(0))
}

/// The tokens that survive temperature, top-k and top-p, each with its renormalised
/// probability, most likely first. Exposed so tests (and diagnostics) can inspect the
/// distribution a draw is taken from.
pub fn filtered_distribution(
    logits: &[f32],
    params: &SamplingParams,
) -> Result<Vec<(u32, f64)>, SamplingError> {
    params.validate()?;
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    if logits.iter().any(|v| v.is_nan()) {
        return Err(SamplingError::NoFiniteLogit);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(SamplingError::NoFiniteLogit);
    }
    let t = if params.is_greedy() {
        1.0
    } else {
        f64::from(params.temperature)
    };
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > f32::NEG_INFINITY)
        .map(|(i, &v)| (i as u32, v))
        .collect();
    // Most likely first; equal logits keep vocabulary order so results do not depend on the
    // sort algorithm.
    let by_logit_desc =
        |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0));
    match params.top_k {
        Some(k) if k < cands.len() => {
            // Partial selection first: a full sort of a 49k vocabulary per step is wasted work.
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
            cands.sort_unstable_by(by_logit_desc);
        }
        _ => cands.sort_unstable_by(by_logit_desc),
    }
    let max = f64::from(max);
    let mut probs: Vec<(u32, f64)> = cands
        .iter()
        .map(|&(i, v)| (i, ((f64::from(v) - max) / t).exp()))
        .collect();
    let z: f64 = probs.iter().map(|&(_, p)| p).sum();
    for p in &mut probs {
        p.1 /= z;
    }
    if let Some(top_p) = params.top_p
        && top_p < 1.0
    {
        // Keep the shortest prefix whose mass reaches top_p (the token that crosses the line is
        // kept, as in HF's TopPLogitsWarper), and at least one token.
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, &(_, p)) in probs.iter().enumerate() {
            cum += p;
            if cum >= f64::from(top_p) {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let z: f64 = probs.iter().map(|&(_, p)| p).sum();
        for p in &mut probs {
            p.1 /= z;
        }
    }
    Ok(probs)
}

/// Log-softmax of one logits row at `token`.
///
/// Generation calls this for every row and token over the whole vocabulary (49k entries for
/// SmolLM2), so the exponentials use the vectorisable `exp` of the fused kernels (f32, ~2 ulp)
/// instead of libm's f64 one: each term is at most 1, summed in eight f32 lanes over blocks of
/// [`LOGSUMEXP_BLOCK`] entries and the block sums in f64, which keeps the result within ~1e-6 of
/// an all-f64 evaluation at a fraction of its cost.
pub fn token_logprob(logits: &[f32], token: u32) -> Option<f64> {
    let x = f64::from(*logits.get(token as usize)?);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let sum: f64 = logits
        .chunks(LOGSUMEXP_BLOCK)
        .map(|block| {
            let mut lanes = [0f32; 8];
            let mut groups = block.chunks_exact(8);
            for group in &mut groups {
                for (acc, &v) in lanes.iter_mut().zip(group) {
                    *acc += fused_math::exp(v - max);
                }
            }
            let tail: f32 = groups
                .remainder()
                .iter()
                .map(|&v| fused_math::exp(v - max))
                .sum();
            lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail)
        })
        .sum();
    Some(x - (sum.ln() + f64::from(max)))
}

/// Entries per f32 partial sum in [`token_logprob`] (64 per lane: rounding stays ~1e-7).
const LOGSUMEXP_BLOCK: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: Option<usize>, p: Option<f32>) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
        }
    }

    #[test]
    fn greedy_is_argmax_with_first_tie() {
        let mut s = Sampler::new(SamplingParams::greedy(), 1).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, -1.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, -5.0]).unwrap(), 1);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            Sampler::new(params(-1.0, None, None), 0).unwrap_err(),
            SamplingError::BadTemperature(-1.0)
        );
        assert_eq!(
            params(1.0, None, Some(0.0)).validate(),
            Err(SamplingError::BadTopP(0.0))
        );
        assert_eq!(
            params(1.0, Some(0), None).validate(),
            Err(SamplingError::ZeroTopK)
        );
        let mut s = Sampler::new(SamplingParams::default(), 0).unwrap();
        assert_eq!(s.sample(&[]), Err(SamplingError::EmptyLogits));
        assert_eq!(
            s.sample(&[1.0, f32::NAN]),
            Err(SamplingError::NoFiniteLogit)
        );
        assert_eq!(
            s.sample(&[f32::NEG_INFINITY; 3]),
            Err(SamplingError::NoFiniteLogit)
        );
    }

    #[test]
    fn top_k_and_top_p_filter_as_hf() {
        // probs of softmax([ln .5, ln .3, ln .15, ln .05]) = [.5, .3, .15, .05]
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let d = filtered_distribution(&logits, &params(1.0, Some(2), None)).unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((d[0].1 - 0.625).abs() < 1e-6);
        // top_p 0.8 keeps .5 + .3 (reaches 0.8), top_p 0.81 also needs .15.
        let d = filtered_distribution(&logits, &params(1.0, None, Some(0.79))).unwrap();
        assert_eq!(d.len(), 2);
        let d = filtered_distribution(&logits, &params(1.0, None, Some(0.81))).unwrap();
        assert_eq!(d.len(), 3);
        // A tiny top_p still keeps the best token.
        let d = filtered_distribution(&logits, &params(1.0, None, Some(1e-6))).unwrap();
        assert_eq!(d, vec![(0, 1.0)]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [2.0f32, 1.0, 0.0];
        let cold = filtered_distribution(&logits, &params(0.5, None, None)).unwrap();
        let warm = filtered_distribution(&logits, &params(2.0, None, None)).unwrap();
        assert!(cold[0].1 > warm[0].1);
        let z: f64 = [4.0f64, 2.0, 0.0].iter().map(|x| x.exp()).sum();
        assert!((cold[0].1 - 4f64.exp() / z).abs() < 1e-12);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let logits: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed).unwrap();
            (0..20_000)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let mut counts = [0usize; 3];
        for t in &a {
            counts[*t as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.6, 0.3, 0.1]) {
            let f = *c as f64 / a.len() as f64;
            // 4+ standard deviations for n = 20000.
            assert!((f - p).abs() < 0.015, "freq {f} vs p {p}");
        }
    }

    #[test]
    fn logprob_matches_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((token_logprob(&logits, 2).unwrap() - (3.0 - z)).abs() < 1e-6);
        assert_eq!(token_logprob(&logits, 3), None);
    }

    #[test]
    fn logprob_over_a_large_vocabulary_stays_close_to_f64() {
        // A 49152-entry row (SmolLM2's vocabulary) spanning several blocks and a ragged tail,
        // with one dominant logit and a long range below it.
        let logits: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0)
            .chain([12.5])
            .collect();
        let max = 12.5f64;
        let z = logits
            .iter()
            .map(|&v| (f64::from(v) - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        for token in [0u32, 17, 49_157] {
            let want = f64::from(logits[token as usize]) - z;
            let got = token_logprob(&logits, token).unwrap();
            assert!((got - want).abs() < 1e-5, "token {token}: {got} vs {want}");
        }
        assert_eq!(token_logprob(&[f32::NEG_INFINITY; 3], 0), None);
    }
}
