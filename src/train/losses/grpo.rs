//! GRPO (TRL 1.16 `GRPOTrainer`): group-relative advantages from one or more reward functions and
//! the token-level loss with an optional k3 KL term against the frozen reference, for every TRL
//! loss type (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo` on the clipped surrogate; `cispo`,
//! `sapo`, `vespo` on their own terms from `losses::grpo_terms`), at token or sequence level, with
//! the entropy bonus and the top-entropy and off-policy masks.
//!
//! Advantages are targets, never differentiated, so they are computed on the host in f64 from
//! plain reward rows (a `None` reward is a function that could not score the row, TRL's NaN). The
//! loss keeps its graph to the per-token log-probs. Rows are grouped consecutively: rows
//! `g·G .. (g+1)·G` are the `G` completions of prompt `g`. What RLOO shares with it is in
//! `losses::group_rewards`.

use candle_core::{D, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::group_rewards::{
    GroupLoss, STD_EPS, advantage_at, check_table, clip_fractions, clip_ratio_metrics,
    clipped_surrogate, frac_zero_std, group_std, reward_metrics, weighted_rewards,
};
use super::grpo_terms::{
    SapoTemperatures, VespoParams, cispo_term, high_entropy_mask, off_policy_keep, sapo_term,
    vespo_weights,
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

/// GRPO's loss types (TRL `loss_type`): the policy term and how it is normalised.
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
    /// ScaleRL's CISPO: the ratio, capped at `epsilon_high` and detached, scales `A·log π`;
    /// normalised as `dapo`.
    Cispo,
    /// Soft Adaptive Policy Optimization: a sigmoid gate on the ratio instead of the clip;
    /// normalised as `grpo`.
    Sapo,
    /// VESPO: a per-sequence gamma weight of the summed log-ratio scales `A·log π`; normalised as
    /// `dapo`.
    Vespo,
}

impl LossType {
    pub const NAMES: &'static str = "grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            "dapo" => Self::Dapo,
            "luspo" => Self::Luspo,
            "cispo" => Self::Cispo,
            "sapo" => Self::Sapo,
            "vespo" => Self::Vespo,
            _ => return None,
        })
    }

    /// The loss types whose policy term is PPO's clipped surrogate (and that log `clip_ratio/*`).
    fn is_clipped(self) -> bool {
        matches!(
            self,
            Self::Grpo | Self::Bnpo | Self::DrGrpo | Self::Dapo | Self::Luspo
        )
    }

    /// The loss types normalised by the generation batch's token count (`num_items_in_batch`).
    fn divides_by_batch_tokens(self) -> bool {
        matches!(self, Self::Dapo | Self::Cispo | Self::Vespo)
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

/// Settings of the GRPO loss; [`Default`] holds TRL 1.16's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossConfig {
    pub loss_type: LossType,
    /// KL coefficient; 0 skips the KL term (and the reference pass).
    pub beta: f64,
    pub epsilon_low: f64,
    /// Upper clip bound `1 + epsilon_high`; for `cispo`, the cap on the ratio itself.
    pub epsilon_high: f64,
    pub level: RatioLevel,
    /// Multiply the k3 KL by the (differentiable) importance ratio.
    pub kl_bias_correction: bool,
    /// Upper bound on the unclipped ratio (two-sided clipping), if set.
    pub delta: Option<f64>,
    /// `dr_grpo`'s denominator per row (the configured maximum, not the padded width).
    pub max_completion_length: usize,
    /// `dapo` / `cispo` / `vespo`'s denominator: completion tokens of the whole generation batch.
    pub num_items_in_batch: f64,
    pub sapo: SapoTemperatures,
    pub vespo: VespoParams,
    /// Entropy bonus: the loss minus `entropy_coef ×` the mean answer-token entropy (needs the
    /// entropies with their graph); 0 is off.
    pub entropy_coef: f64,
    /// Keep only this top quantile of answer tokens by entropy in the policy term; 1 keeps all.
    pub top_entropy_quantile: f64,
    /// Drop answers with a negative advantage whose mean drift since sampling passes this.
    pub off_policy_mask_threshold: Option<f64>,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        Self {
            loss_type: LossType::Dapo,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            level: RatioLevel::Token,
            kl_bias_correction: true,
            delta: None,
            max_completion_length: 512,
            num_items_in_batch: 0.0,
            sapo: SapoTemperatures::default(),
            vespo: VespoParams::default(),
            entropy_coef: 0.0,
            top_entropy_quantile: 1.0,
            off_policy_mask_threshold: None,
        }
    }
}

impl GrpoLossConfig {
    /// Whether the loss needs the per-token entropies (entropy bonus or top-entropy mask).
    pub fn needs_entropies(&self) -> bool {
        self.entropy_coef != 0.0 || self.top_entropy_quantile < 1.0
    }
}

/// The inputs of one loss evaluation, all `[B, T]` except `advantages`: `[B]` (one per
/// completion, TRL's case) or `[B, T]` (per token, with step rewards); a `[B]` advantage is the
/// per-token one broadcast over its row, and gives exactly the same loss.
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
    /// Per-token entropies: the `entropy` metric, the top-entropy mask and (with their graph)
    /// the entropy bonus. Required when [`GrpoLossConfig::needs_entropies`].
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

/// A `[rows, cols]` tensor of `dt` from host rows.
fn from_rows(rows: Vec<Vec<f64>>, like: &Tensor) -> Result<Tensor> {
    let (r, c) = (rows.len(), rows.first().map_or(0, Vec::len));
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    Tensor::from_vec(flat, (r, c), like.device())?.to_dtype(like.dtype())
}

/// The mean of `flag` over answer tokens (`weights` per position: the mask, or one per sequence
/// at sequence level), as TRL's `global_masked_mean` of a boolean; `flag` gets the value, its
/// row and its column.
fn flag_mean(
    ratio: &[Vec<f64>],
    weights: &[Vec<f64>],
    flag: impl Fn(f64, usize, usize) -> bool,
) -> f64 {
    let (mut hit, mut total) = (0.0, 0.0);
    for (i, (w, m)) in ratio.iter().zip(weights).enumerate() {
        for (j, (x, m)) in w.iter().zip(m).enumerate() {
            total += m;
            if flag(*x, i, j) {
                hit += m;
            }
        }
    }
    hit / f64::max(total, 1.0)
}

/// Each answer's advantage as one number: the value itself when the row holds one, else the
/// mean over the answer's tokens.
fn sequence_advantages(adv: &[Vec<f64>], mask: &[Vec<f64>]) -> Vec<f64> {
    adv.iter()
        .zip(mask)
        .map(|(a, m)| match a.as_slice() {
            [one] => *one,
            _ => {
                let n: f64 = m.iter().sum();
                a.iter().zip(m).map(|(a, m)| a * m).sum::<f64>() / n.max(1.0)
            }
        })
        .collect()
}

/// TRL's `GRPOTrainer._compute_loss` (static entropy coefficient, no vLLM correction).
pub fn grpo_loss(x: &GrpoBatch<'_>, cfg: &GrpoLossConfig) -> Result<GroupLoss> {
    let lp = x.logprobs;
    let dt = lp.dtype();
    let (b, t) = lp.dims2()?;
    let mask = x.mask.to_dtype(dt)?;
    let adv = match x.advantages.rank() {
        1 => x.advantages.detach().to_dtype(dt)?.reshape((b, 1))?,
        _ if x.advantages.dims() == [b, t] => x.advantages.detach().to_dtype(dt)?,
        _ => bail!(
            "advantages of shape {:?} for log-probs of shape [{b}, {t}]: expected [{b}] or [{b}, {t}]",
            x.advantages.dims()
        ),
    };
    let old = match x.old_logprobs {
        Some(o) => o.detach().to_dtype(dt)?,
        None => lp.detach(),
    };
    let entropies = match x.entropies {
        Some(h) => Some(h.to_dtype(dt)?),
        None if cfg.needs_entropies() => bail!(
            "entropy_coef {} / top_entropy_quantile {} need the per-token entropies, and none were given",
            cfg.entropy_coef,
            cfg.top_entropy_quantile
        ),
        None => None,
    };
    let mask_h = host2(&mask)?;
    // Host copies: per row `[a]`, or per token; the sequence-level choices (VESPO's shape, the
    // sequence-level clip flags) read each answer's mean advantage.
    let adv_h = host2(&adv)?;
    let seq_adv = sequence_advantages(&adv_h, &mask_h);
    let log_ratio = (lp - &old)?;
    let ratio = importance_ratio(&log_ratio, &mask, cfg.level)?;
    // The delta cap applies to the surrogate and the clip metrics, not to the KL's correction.
    let capped = match cfg.delta {
        Some(d) if cfg.loss_type.is_clipped() => ratio.minimum(d)?,
        _ => ratio.clone(),
    };
    let mut metrics = Vec::new();
    let mut vespo_phi = None;
    let policy_term = match cfg.loss_type {
        LossType::Cispo => cispo_term(&ratio, lp, &adv, cfg.epsilon_high)?,
        LossType::Sapo => sapo_term(&ratio, &adv, &adv_h, cfg.sapo)?,
        LossType::Vespo => {
            let phi = vespo_weights(&host2(&log_ratio)?, &mask_h, &seq_adv, cfg.vespo);
            let phi_t = from_rows(phi.iter().map(|p| vec![*p]).collect(), lp)?;
            vespo_phi = Some(phi);
            phi_t.broadcast_mul(&adv)?.broadcast_mul(lp)?.neg()?
        }
        _ => clipped_surrogate(&capped, &ratio, &adv, cfg.epsilon_low, cfg.epsilon_high)?,
    };
    let mut per_token = policy_term.broadcast_as((b, t))?.contiguous()?;
    if let Some(d) = cfg.off_policy_mask_threshold {
        let keep = off_policy_keep(&adv_h, &host2(lp)?, &host2(&old)?, &mask_h, d);
        let keep = from_rows(keep, lp)?;
        per_token = per_token.broadcast_mul(&keep)?;
    }
    let entropy_mask = match &entropies {
        Some(h) if cfg.top_entropy_quantile < 1.0 => {
            let m = high_entropy_mask(&host2(h)?, &mask_h, cfg.top_entropy_quantile);
            Some(from_rows(m, lp)?)
        }
        _ => None,
    };
    if let Some(m) = &entropy_mask {
        per_token = (per_token * m)?;
    }
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
    let batch_tokens = || {
        if cfg.num_items_in_batch <= 0.0 {
            bail!(
                "{:?} needs the completion token count of the generation batch (got {})",
                cfg.loss_type,
                cfg.num_items_in_batch
            );
        }
        Ok(cfg.num_items_in_batch)
    };
    let loss = match cfg.loss_type {
        LossType::Grpo | LossType::Sapo => masked.sum(D::Minus1)?.div(&lens)?.mean_all()?,
        LossType::Bnpo => {
            let n = scalar_f64(&mask.sum_all()?)?.max(1.0);
            masked.sum_all()?.affine(1.0 / n, 0.0)?
        }
        LossType::DrGrpo => {
            let denom = (b * cfg.max_completion_length.max(1)) as f64;
            masked.sum_all()?.affine(1.0 / denom, 0.0)?
        }
        LossType::Dapo | LossType::Cispo | LossType::Vespo => {
            masked.sum_all()?.affine(1.0 / batch_tokens()?, 0.0)?
        }
        LossType::Luspo => masked.sum(D::Minus1)?.mean_all()?,
    };
    let loss = match (&entropies, cfg.entropy_coef) {
        (Some(h), coef) if coef != 0.0 => {
            // The bonus acts on the tokens the policy term keeps.
            let active = match &entropy_mask {
                Some(m) => (&mask * m)?,
                None => mask.clone(),
            };
            let summed = (h * &active)?.sum_all()?;
            // Batch-token normalised losses already sum to a mean over the generation batch.
            let denom = if cfg.loss_type.divides_by_batch_tokens() {
                batch_tokens()?
            } else {
                scalar_f64(&active.sum_all()?)?.max(1.0)
            };
            metrics.push(("policy_loss".into(), scalar_f64(&loss)?));
            metrics.push(("entropy_coef".into(), coef));
            (loss - summed.affine(coef / denom, 0.0)?)?
        }
        _ => loss,
    };
    if let Some(h) = &entropies {
        metrics.push((
            "entropy".into(),
            scalar_f64(&masked_mean(&h.detach(), &mask)?)?,
        ));
    }
    // Ratio flags weigh each answer token, or each answer once at sequence level.
    let (ratio_h, weights_mask, flag_adv) = match cfg.level {
        RatioLevel::Token => (host2(&capped)?, mask_h.clone(), adv_h),
        RatioLevel::Sequence => (
            host2(&capped)?,
            vec![vec![1.0]; b],
            seq_adv.iter().map(|a| vec![*a]).collect(),
        ),
    };
    match cfg.loss_type {
        LossType::Cispo => {
            let hi = cfg.epsilon_high;
            let clipped = flag_mean(&ratio_h, &weights_mask, |w, i, j| {
                w > hi && advantage_at(&flag_adv[i], j) > 0.0
            });
            metrics.push(("cispo_clip_ratio".into(), clipped));
        }
        LossType::Vespo => {
            let phi = vespo_phi.unwrap_or_default();
            let mean = phi.iter().sum::<f64>() / phi.len().max(1) as f64;
            metrics.push(("vespo/phi_seq_mean".into(), mean));
        }
        LossType::Sapo => {}
        _ => {
            let [low, high, region] = clip_fractions(
                &ratio_h,
                &weights_mask,
                &flag_adv,
                cfg.epsilon_low,
                cfg.epsilon_high,
            );
            let weights: Vec<f64> = weights_mask.iter().map(|m| m.iter().sum()).collect();
            metrics.extend(clip_ratio_metrics(&low, &high, &region, &weights));
        }
    }
    Ok(GroupLoss { loss, metrics })
}
