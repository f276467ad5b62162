//! The parts of TRL 1.16's `GRPOTrainer._compute_loss` beyond the clipped surrogate: the policy
//! terms of the `cispo`, `sapo` and `vespo` loss types, and the two token selections
//! (`top_entropy_quantile`'s high-entropy mask, `off_policy_mask_threshold`'s sequence mask).
//!
//! Everything that TRL computes under `no_grad` or `detach` (VESPO's gamma weights, both masks)
//! is plain host math in f64 over `[B][T]` rows: it is a constant of the loss, so it needs no
//! graph, and f64 keeps it exact for the reference vectors. Values at padding (`mask == 0`) are
//! skipped, never multiplied by zero, so junk there (even NaN) cannot leak in.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::stats::sigmoid;

/// SAPO's temperatures (TRL `sapo_temperature_pos` / `sapo_temperature_neg`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SapoTemperatures {
    /// For answers with a positive advantage.
    pub pos: f64,
    /// For answers with an advantage ≤ 0.
    pub neg: f64,
}

impl Default for SapoTemperatures {
    fn default() -> Self {
        Self {
            pos: 1.0,
            neg: 1.05,
        }
    }
}

/// VESPO's gamma-weight shape per advantage sign (TRL `vespo_k_pos`, `vespo_lambda_pos`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VespoParams {
    pub k_pos: f64,
    pub lambda_pos: f64,
    pub k_neg: f64,
    pub lambda_neg: f64,
}

impl Default for VespoParams {
    fn default() -> Self {
        Self {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        }
    }
}

/// CISPO: `-detach(min(w, ε_high)) · A · log π` — the ratio only scales the REINFORCE term, so
/// clipped tokens still pass a gradient (through `log π`).
pub fn cispo_term(ratio: &Tensor, lp: &Tensor, adv: &Tensor, epsilon_high: f64) -> Result<Tensor> {
    ratio
        .detach()
        .minimum(epsilon_high)?
        .broadcast_mul(adv)?
        .broadcast_mul(lp)?
        .neg()
}

/// SAPO: `-(σ(τ·(w − 1)) · 4/τ) · A`, a smooth gate in place of the hard clip; `τ` by the sign of
/// the advantage (`adv_h`: the same values on the host, one per row or one per token).
pub fn sapo_term(
    ratio: &Tensor,
    adv: &Tensor,
    adv_h: &[Vec<f64>],
    temps: SapoTemperatures,
) -> Result<Tensor> {
    let dev = ratio.device();
    let dt = ratio.dtype();
    let tau: Vec<f64> = adv_h
        .iter()
        .flatten()
        .map(|&a| if a > 0.0 { temps.pos } else { temps.neg })
        .collect();
    let scale: Vec<f64> = tau.iter().map(|t| 4.0 / t).collect();
    let rows = (adv_h.len(), adv_h.first().map_or(1, Vec::len));
    let tau = Tensor::from_vec(tau, rows, dev)?.to_dtype(dt)?;
    let scale = Tensor::from_vec(scale, rows, dev)?.to_dtype(dt)?;
    let gate = sigmoid(&(ratio - 1.0)?.broadcast_mul(&tau)?)?.broadcast_mul(&scale)?;
    gate.broadcast_mul(adv)?.neg()
}

/// VESPO's per-sequence gamma weight `φ(w) = exp(λ + k·ln w − λ·w)` with `ln w` the answer's
/// summed (clamped) log-ratio, `(k, λ)` by the advantage's sign; non-finite φ becomes 0 (TRL's
/// `nan_to_num`). A constant of the loss (TRL computes it under `no_grad`).
pub fn vespo_weights(
    log_ratio: &[Vec<f64>],
    mask: &[Vec<f64>],
    adv: &[f64],
    p: VespoParams,
) -> Vec<f64> {
    let low = 1e-8f64.ln();
    log_ratio
        .iter()
        .zip(mask)
        .zip(adv)
        .map(|((lr, m), &a)| {
            let sum: f64 = lr
                .iter()
                .zip(m)
                .filter(|(_, m)| **m != 0.0)
                .map(|(x, m)| x.clamp(-20.0, 20.0) * m)
                .sum();
            let log_w = sum.clamp(low, 20.0);
            let (k, lambda) = if a >= 0.0 {
                (p.k_pos, p.lambda_pos)
            } else {
                (p.k_neg, p.lambda_neg)
            };
            let lambda = lambda.max(1e-4);
            let phi = (lambda + k * log_w - lambda * log_w.exp()).exp();
            if phi.is_finite() { phi } else { 0.0 }
        })
        .collect()
}

/// DeepSeek-V3.2's off-policy sequence mask: 1 keeps, 0 drops, in the shape of `adv` (one value
/// per row, or per token with step rewards). A position is dropped when its advantage is
/// negative AND its answer's mean per-token `log π_old − log π` (the drift since sampling) is
/// above `threshold`.
pub fn off_policy_keep(
    adv: &[Vec<f64>],
    lp: &[Vec<f64>],
    old: &[Vec<f64>],
    mask: &[Vec<f64>],
    threshold: f64,
) -> Vec<Vec<f64>> {
    adv.iter()
        .zip(lp.iter().zip(old))
        .zip(mask)
        .map(|((a, (lp, old)), m)| {
            let (sum, n) = lp
                .iter()
                .zip(old)
                .zip(m)
                .filter(|(_, m)| **m != 0.0)
                .fold((0.0, 0.0), |(s, n), ((l, o), m)| (s + (o - l) * m, n + m));
            let drift = sum / f64::max(n, 1.0);
            a.iter()
                .map(|&a| {
                    if a >= 0.0 || drift <= threshold {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// `torch.quantile`'s default (linear interpolation between the two nearest ranks) of `values`,
/// which must be sorted ascending and non-empty; `q` in `[0, 1]`.
fn quantile_sorted(values: &[f64], q: f64) -> f64 {
    let pos = q * (values.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
}

/// The top-`keep` quantile of the answer tokens by entropy (TRL `top_entropy_quantile`, "Beyond
/// the 80/20 rule"): 1 where a token's entropy is at least the `1 − keep` quantile of all
/// answer-token entropies of the batch, 0 elsewhere and on padding.
pub fn high_entropy_mask(entropies: &[Vec<f64>], mask: &[Vec<f64>], keep: f64) -> Vec<Vec<f64>> {
    let mut active: Vec<f64> = entropies
        .iter()
        .zip(mask)
        .flat_map(|(h, m)| h.iter().zip(m).filter(|(_, m)| **m != 0.0).map(|(h, _)| *h))
        .collect();
    if active.is_empty() {
        return mask.iter().map(|m| vec![0.0; m.len()]).collect();
    }
    active.sort_by(f64::total_cmp);
    let threshold = quantile_sorted(&active, 1.0 - keep);
    entropies
        .iter()
        .zip(mask)
        .map(|(h, m)| {
            h.iter()
                .zip(m)
                .map(|(h, m)| f64::from(u8::from(*m != 0.0 && *h >= threshold)))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 8.0);
        // pos = 0.5 · 3 = 1.5: halfway between 2 and 4.
        assert_eq!(quantile_sorted(&v, 0.5), 3.0);
    }

    #[test]
    fn keep_zero_leaves_only_the_highest_entropy_token_and_never_padding() {
        let h = vec![vec![0.1, 0.9, 5.0], vec![0.3, 0.2, 0.0]];
        let m = vec![vec![1.0, 1.0, 0.0], vec![1.0, 1.0, 1.0]];
        let out = high_entropy_mask(&h, &m, 0.0);
        assert_eq!(out, vec![vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 0.0]]);
    }

    #[test]
    fn off_policy_mask_drops_only_drifted_answers_with_negative_advantage() {
        let lp = vec![vec![-1.0, -1.0], vec![-1.0, -1.0], vec![-1.0, -1.0]];
        let old = vec![vec![-0.5, -0.5], vec![-0.5, -0.5], vec![-1.0, f64::NAN]];
        let m = vec![vec![1.0, 1.0], vec![1.0, 1.0], vec![1.0, 0.0]];
        // Drift 0.5 on rows 0 and 1; row 2 has none (its NaN is padding).
        let adv = [vec![1.0], vec![-1.0], vec![-1.0]];
        let keep = off_policy_keep(&adv, &lp, &old, &m, 0.1);
        assert_eq!(keep, vec![vec![1.0], vec![0.0], vec![1.0]]);
    }

    #[test]
    fn off_policy_mask_with_per_token_advantages_drops_only_the_negative_tokens() {
        let lp = vec![vec![-1.0, -1.0]];
        let old = vec![vec![-0.5, -0.5]];
        let m = vec![vec![1.0, 1.0]];
        let keep = off_policy_keep(&[vec![0.5, -0.5]], &lp, &old, &m, 0.1);
        assert_eq!(keep, vec![vec![1.0, 0.0]]);
    }
}
