//! What GRPO and RLOO share: the reward table (a weighted sum over reward functions that may
//! not score a row, NaN-skipping group statistics, the reward metrics TRL logs), the clipped
//! surrogate with its clip-ratio metrics, and the loss output type. Host-side math is f64 over
//! consecutive groups of `G` rows (rows `g·G .. (g+1)·G` answer prompt `g`).

use candle_core::{Result, Tensor, bail};

use super::stats::{nan_mean, nan_std};

/// Added to a standard deviation before dividing by it, as TRL does.
pub const STD_EPS: f64 = 1e-4;
/// A group whose reward std is at most this counts as zero-std (`frac_reward_zero_std`).
const ZERO_STD: f64 = 1e-8;
/// `Σ_k w_k·R[i,k]` skipping missing rewards; `None` (NaN) when a row has no reward at all.
pub fn weighted_rewards(rewards: &[Vec<Option<f64>>], weights: &[f64]) -> Vec<f64> {
    rewards
        .iter()
        .map(|row| {
            let scored = row
                .iter()
                .zip(weights)
                .filter_map(|(r, w)| r.map(|r| r * w));
            scored.fold(None, |acc: Option<f64>, x| Some(acc.unwrap_or(0.0) + x))
        })
        .map(|r| r.unwrap_or(f64::NAN))
        .collect()
}

/// Checks the reward table against the weights and the group size (GRPO and RLOO).
pub fn check_table(rewards: &[Vec<Option<f64>>], weights: &[f64], g: usize) -> Result<()> {
    if g < 2 {
        bail!(
            "num_generations is {g}: a group needs at least 2 completions\nhint: set num_generations to 2 or more"
        );
    }
    if weights.is_empty() {
        bail!("no reward weights: give one weight per reward function");
    }
    if !rewards.len().is_multiple_of(g) {
        bail!(
            "{} rewards do not split into groups of {g}\nhint: score every completion of every prompt",
            rewards.len()
        );
    }
    if let Some((i, row)) = rewards
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() != weights.len())
    {
        bail!(
            "row {i} has {} rewards but there are {} reward weights",
            row.len(),
            weights.len()
        );
    }
    Ok(())
}

/// The reward statistics TRL logs for GRPO and RLOO: per function `rewards/<name>/mean|std`, then
/// `reward` and `reward_std` of the weighted sums (NaN-skipping, unbiased std).
pub fn reward_metrics(
    rewards: &[Vec<Option<f64>>],
    names: &[String],
    weighted: &[f64],
) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let col: Vec<f64> = rewards
            .iter()
            .map(|row| row.get(k).copied().flatten().unwrap_or(f64::NAN))
            .collect();
        out.push((format!("rewards/{name}/mean"), nan_mean(&col)));
        out.push((format!("rewards/{name}/std"), nan_std(&col)));
    }
    out.push(("reward".into(), nan_mean(weighted)));
    out.push(("reward_std".into(), nan_std(weighted)));
    out
}

/// The unbiased std of each consecutive group of `g`, repeated over its rows.
pub fn group_std(values: &[f64], g: usize) -> Vec<f64> {
    values
        .chunks(g)
        .flat_map(|c| std::iter::repeat_n(nan_std(c), g))
        .collect()
}

/// Fraction of rows whose std is (about) zero, TRL's `frac_reward_zero_std`.
pub fn frac_zero_std(stds: &[f64]) -> f64 {
    stds.iter().filter(|s| s.abs() <= ZERO_STD).count() as f64 / stds.len().max(1) as f64
}

/// A GRPO or RLOO loss and TRL's metrics (`kl`, `entropy`, `clip_ratio/*`).
#[derive(Debug, Clone)]
pub struct GroupLoss {
    pub loss: Tensor,
    pub metrics: Vec<(String, f64)>,
}

/// `-min(w̃·A, clamp(w, 1-ε_low, 1+ε_high)·A)` where `w̃` is `w` possibly capped (GRPO's
/// `delta`); shared by GRPO (per token or sequence) and RLOO (per sequence).
pub fn clipped_surrogate(
    capped: &Tensor,
    ratio: &Tensor,
    adv: &Tensor,
    epsilon_low: f64,
    epsilon_high: f64,
) -> Result<Tensor> {
    let clipped = ratio
        .clamp(1.0 - epsilon_low, 1.0 + epsilon_high)?
        .broadcast_mul(adv)?;
    capped.broadcast_mul(adv)?.minimum(&clipped)?.neg()
}

/// TRL's clip-ratio metrics from per-sequence fractions of low- / high-clipped tokens (or flags)
/// and their token weights: `clip_ratio/low_mean|high_mean|region_mean` (weighted means),
/// `low_min`, `high_max`.
pub fn clip_ratio_metrics(
    low: &[f64],
    high: &[f64],
    region: &[f64],
    weights: &[f64],
) -> Vec<(String, f64)> {
    let total: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let wmean = |v: &[f64]| v.iter().zip(weights).map(|(x, w)| x * w).sum::<f64>() / total;
    let min = low.iter().copied().fold(f64::INFINITY, f64::min);
    let max = high.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    vec![
        ("clip_ratio/low_mean".into(), wmean(low)),
        ("clip_ratio/high_mean".into(), wmean(high)),
        ("clip_ratio/region_mean".into(), wmean(region)),
        ("clip_ratio/low_min".into(), min),
        ("clip_ratio/high_max".into(), max),
    ]
}

/// The advantage of position `j` in a host row holding one value per token, or a single value
/// for the whole row (per-completion advantages, broadcast).
pub fn advantage_at(row: &[f64], j: usize) -> f64 {
    row[j.min(row.len().saturating_sub(1))]
}

/// Per-sequence fractions of the positions (weighted by `mask`) where the ratio was clipped
/// low (`w < 1-ε_low` with `A < 0`), high (`w > 1+ε_high` with `A > 0`) or either. `adv` holds
/// one advantage per row or one per position ([`advantage_at`]).
pub fn clip_fractions(
    ratio: &[Vec<f64>],
    mask: &[Vec<f64>],
    adv: &[Vec<f64>],
    lo: f64,
    hi: f64,
) -> [Vec<f64>; 3] {
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for ((w, m), a) in ratio.iter().zip(mask).zip(adv) {
        let n: f64 = m.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let frac = |hit: &dyn Fn(f64, usize) -> bool| {
            w.iter()
                .zip(m)
                .enumerate()
                .filter(|(j, (x, _))| hit(**x, *j))
                .map(|(_, (_, m))| m)
                .sum::<f64>()
                / n
        };
        let is_low = |x: f64, j: usize| x < 1.0 - lo && advantage_at(a, j) < 0.0;
        let is_high = |x: f64, j: usize| x > 1.0 + hi && advantage_at(a, j) > 0.0;
        out[0].push(frac(&is_low));
        out[1].push(frac(&is_high));
        out[2].push(frac(&|x, j| is_low(x, j) || is_high(x, j)));
    }
    out
}
