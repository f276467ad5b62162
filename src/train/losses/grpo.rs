//! GRPO (TRL 1.16 `GRPOTrainer`): group-relative advantages from one or more reward functions and
//! the clipped token-level surrogate with an optional k3 KL term against the frozen reference, for
//! the loss types `grpo`, `bnpo`, `dr_grpo`, `dapo` and `luspo`, at token or sequence level.
//!
//! Advantages are targets, never differentiated, so they are computed on the host in f64 from
//! plain reward rows (a `None` reward is a function that could not score the row, TRL's NaN). The
//! loss keeps its graph to the per-token log-probs. Rows are grouped consecutively: rows
//! `g·G .. (g+1)·G` are the `G` completions of prompt `g`. What RLOO shares with it is in
//! `losses::group_rewards`.

use candle_core::{D, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::group_rewards::{
    GroupLoss, STD_EPS, check_table, clip_fractions, clip_ratio_metrics, clipped_surrogate,
    frac_zero_std, group_std, reward_metrics, weighted_rewards,
};
use super::ppo::KlEstimator;
use super::stats::{masked_mean, masked_sum_last, nan_mean, nan_std, scalar_f64};

/// What the group-centred reward is divided by (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// The group's own unbiased std.
    #[default]
    Group,
    /// The unbiased std of the whole batch (the mean subtracted is still the group's).
    Batch,
    /// Nothing (Dr. GRPO's recommendation).
    None,
}

/// How several reward functions combine (TRL `multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Weighted sum first, then the group normalisation.
    #[default]
    SumThenNormalize,
    /// Each function z-scored within its group, weighted sum, then a batch z-score.
    NormalizeThenSum,
}

/// The advantage settings of a GRPO step.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvantageConfig {
    pub num_generations: usize,
    /// One weight per reward function.
    pub reward_weights: Vec<f64>,
    pub scale_rewards: ScaleRewards,
    pub aggregation: Aggregation,
}

/// Advantages of a batch and what TRL logs about its rewards.
#[derive(Debug, Clone)]
pub struct GroupAdvantages {
    /// One per row; 0 for a row no function could score.
    pub advantages: Vec<f64>,
    /// Each row's group mean (sum_then_normalize only).
    pub mean_grouped_rewards: Option<Vec<f64>>,
    /// The std each row was (or, with `scale_rewards: none`, would have been) divided by.
    pub std_rewards: Vec<f64>,
    /// `rewards/<func>/mean|std`, `reward`, `reward_std`, `frac_reward_zero_std`.
    pub metrics: Vec<(String, f64)>,
}

/// `(x - mean) / (std + 1e-4)` with `mean` and `std` over the non-NaN values.
fn z_scores(values: &[f64]) -> Vec<f64> {
    let (m, s) = (nan_mean(values), nan_std(values));
    values.iter().map(|v| (v - m) / (s + STD_EPS)).collect()
}

/// GRPO's advantages (`_generate_and_score_completions`): `rewards[i][k]` is function `k`'s
/// reward for row `i`, `names` their names for the metrics.
pub fn grpo_advantages(
    rewards: &[Vec<Option<f64>>],
    names: &[String],
    cfg: &AdvantageConfig,
) -> Result<GroupAdvantages> {
    let g = cfg.num_generations;
    check_table(rewards, &cfg.reward_weights, g)?;
    let weighted = weighted_rewards(rewards, &cfg.reward_weights);
    let mut metrics = reward_metrics(rewards, names, &weighted);
    let (advantages, mean_grouped, std_rewards) = match cfg.aggregation {
        Aggregation::SumThenNormalize => {
            let means: Vec<f64> = weighted
                .chunks(g)
                .flat_map(|c| std::iter::repeat_n(nan_mean(c), g))
                .collect();
            let stds = match cfg.scale_rewards {
                ScaleRewards::Batch => vec![nan_std(&weighted); weighted.len()],
                ScaleRewards::Group | ScaleRewards::None => group_std(&weighted, g),
            };
            let adv = weighted
                .iter()
                .zip(&means)
                .zip(&stds)
                .map(|((r, m), s)| match cfg.scale_rewards {
                    ScaleRewards::None => r - m,
                    _ => (r - m) / (s + STD_EPS),
                })
                .collect();
            (adv, Some(means), stds)
        }
        Aggregation::NormalizeThenSum => {
            let funcs = cfg.reward_weights.len();
            let mut summed = vec![0.0; rewards.len()];
            for (k, w) in cfg.reward_weights.iter().enumerate() {
                let col: Vec<f64> = rewards
                    .iter()
                    .map(|row| row[k].unwrap_or(f64::NAN))
                    .collect();
                for (gi, chunk) in col.chunks(g).enumerate() {
                    for (j, z) in z_scores(chunk).into_iter().enumerate() {
                        if !z.is_nan() {
                            summed[gi * g + j] += w * z;
                        }
                    }
                }
            }
            for (s, row) in summed.iter_mut().zip(rewards) {
                if row.iter().take(funcs).all(Option::is_none) {
                    *s = f64::NAN;
                }
            }
            let std = nan_std(&summed);
            (z_scores(&summed), None, vec![std; summed.len()])
        }
    };
    metrics.push(("frac_reward_zero_std".into(), frac_zero_std(&std_rewards)));
    // An unscorable row (or a degenerate group) carries no signal: TRL's nan_to_num.
    let advantages = advantages
        .into_iter()
        .map(|a: f64| if a.is_finite() { a } else { 0.0 })
        .collect();
    Ok(GroupAdvantages {
        advantages,
        mean_grouped_rewards: mean_grouped,
        std_rewards,
        metrics,
    })
}

/// GRPO's loss types that this crate implements (TRL `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Per-sequence token mean, then the batch mean (the paper; length-biased).
    Grpo,
    /// Token mean over the micro-batch.
    Bnpo,
    /// Token sum over `batch × max_completion_length` (no length bias).
    DrGrpo,
    /// Token sum over the tokens of the whole generation batch (TRL's default).
    #[default]
    Dapo,
    /// Per-sequence token sum, then the batch mean.
    Luspo,
}

impl LossType {
    pub const NAMES: &'static str = "grpo, bnpo, dr_grpo, dapo, luspo";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            "dapo" => Self::Dapo,
            "luspo" => Self::Luspo,
            _ => return None,
        })
    }
}

/// Where the importance ratio is taken (TRL `importance_sampling_level`; sequence = GSPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    #[default]
    Token,
    Sequence,
}

/// Settings of the GRPO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossConfig {
    pub loss_type: LossType,
    /// KL coefficient; 0 skips the KL term (and the reference pass).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub level: RatioLevel,
    /// Multiply the k3 KL by the (differentiable) importance ratio.
    pub kl_bias_correction: bool,
    /// Upper bound on the unclipped ratio (two-sided clipping), if set.
    pub delta: Option<f64>,
    /// `dr_grpo`'s denominator per row (the configured maximum, not the padded width).
    pub max_completion_length: usize,
    /// `dapo`'s denominator: completion tokens of the whole generation batch.
    pub num_items_in_batch: f64,
}

/// The inputs of one loss evaluation, all `[B, T]` except `advantages` (`[B]`).
#[derive(Debug, Clone, Copy)]
pub struct GrpoBatch<'a> {
    /// Current policy log-probs (with graph).
    pub logprobs: &'a Tensor,
    /// Log-probs at sampling time; `None` = on-policy (TRL uses the detached current ones).
    pub old_logprobs: Option<&'a Tensor>,
    /// Reference log-probs; needed when `beta != 0`.
    pub ref_logprobs: Option<&'a Tensor>,
    pub advantages: &'a Tensor,
    /// 1 on completion tokens (up to and including EOS), 0 on padding.
    pub mask: &'a Tensor,
    /// Per-token entropies for the `entropy` metric, if known.
    pub entropies: Option<&'a Tensor>,
}

/// The importance ratio: per token, or per sequence (`exp` of the masked mean log-ratio, `[B, 1]`).
pub fn importance_ratio(log_ratio: &Tensor, mask: &Tensor, level: RatioLevel) -> Result<Tensor> {
    match level {
        RatioLevel::Token => log_ratio.exp(),
        RatioLevel::Sequence => {
            let lens = mask.sum_keepdim(D::Minus1)?.clamp(1.0, f64::MAX)?;
            masked_sum_last(log_ratio, mask)?
                .unsqueeze(1)?
                .div(&lens)?
                .exp()
        }
    }
}

fn host2(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.detach()
        .to_dtype(candle_core::DType::F64)?
        .to_vec2::<f64>()
}

/// TRL's `GRPOTrainer._compute_loss` for the implemented loss types.
pub fn grpo_loss(x: &GrpoBatch<'_>, cfg: &GrpoLossConfig) -> Result<GroupLoss> {
    let lp = x.logprobs;
    let dt = lp.dtype();
    let (b, t) = lp.dims2()?;
    let mask = x.mask.to_dtype(dt)?;
    let adv = x.advantages.detach().to_dtype(dt)?.reshape((b, 1))?;
    let old = match x.old_logprobs {
        Some(o) => o.detach().to_dtype(dt)?,
        None => lp.detach(),
    };
    let ratio = importance_ratio(&(lp - &old)?, &mask, cfg.level)?;
    let capped = match cfg.delta {
        Some(d) => ratio.minimum(d)?,
        None => ratio.clone(),
    };
    let mut per_token =
        clipped_surrogate(&capped, &ratio, &adv, cfg.epsilon_low, cfg.epsilon_high)?
            .broadcast_as((b, t))?
            .contiguous()?;
    let mut metrics = Vec::new();
    if cfg.beta != 0.0 {
        let Some(reference) = x.ref_logprobs else {
            bail!("beta is {} but no reference log-probs were given", cfg.beta);
        };
        let mut kl = KlEstimator::K3.estimate(lp, &reference.detach().to_dtype(dt)?)?;
        if cfg.kl_bias_correction {
            kl = kl.broadcast_mul(&ratio)?;
        }
        metrics.push((
            "kl".to_string(),
            scalar_f64(&masked_mean(&kl.detach(), &mask)?)?,
        ));
        per_token = (per_token + kl.affine(cfg.beta, 0.0)?)?;
    }
    let masked = (&per_token * &mask)?;
    let lens = mask.sum(D::Minus1)?.clamp(1.0, f64::MAX)?;
    let loss = match cfg.loss_type {
        LossType::Grpo => masked.sum(D::Minus1)?.div(&lens)?.mean_all()?,
        LossType::Bnpo => {
            let n = scalar_f64(&mask.sum_all()?)?.max(1.0);
            masked.sum_all()?.affine(1.0 / n, 0.0)?
        }
        LossType::DrGrpo => {
            let denom = (b * cfg.max_completion_length.max(1)) as f64;
            masked.sum_all()?.affine(1.0 / denom, 0.0)?
        }
        LossType::Dapo => {
            if cfg.num_items_in_batch <= 0.0 {
                bail!(
                    "dapo needs the completion token count of the generation batch (got {})",
                    cfg.num_items_in_batch
                );
            }
            masked
                .sum_all()?
                .affine(1.0 / cfg.num_items_in_batch, 0.0)?
        }
        LossType::Luspo => masked.sum(D::Minus1)?.mean_all()?,
    };
    if let Some(h) = x.entropies {
        let h = h.detach().to_dtype(dt)?;
        metrics.push(("entropy".into(), scalar_f64(&masked_mean(&h, &mask)?)?));
    }
    let mask_h = host2(&mask)?;
    let adv_h: Vec<f64> = host2(&adv)?.into_iter().map(|r| r[0]).collect();
    let (ratio_h, weights_mask) = match cfg.level {
        RatioLevel::Token => (host2(&capped)?, mask_h.clone()),
        // One flag per sequence, each sequence weighing the same.
        RatioLevel::Sequence => (host2(&capped)?, vec![vec![1.0]; b]),
    };
    let [low, high, region] = clip_fractions(
        &ratio_h,
        &weights_mask,
        &adv_h,
        cfg.epsilon_low,
        cfg.epsilon_high,
    );
    let weights: Vec<f64> = weights_mask.iter().map(|m| m.iter().sum()).collect();
    metrics.extend(clip_ratio_metrics(&low, &high, &region, &weights));
    Ok(GroupLoss { loss, metrics })
}
