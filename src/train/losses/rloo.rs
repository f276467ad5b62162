//! RLOO (TRL 1.16 `RLOOTrainer`): the reward minus `β·KL` of the sampling policy to the reference
//! (summed k1 over the completion), a leave-one-out baseline within each group of `G` consecutive
//! completions, optional batch normalisation, and the sequence-level clipped surrogate.
//!
//! As in GRPO, advantages are host-side f64 targets; the loss keeps its graph to the per-token
//! log-probs. The KL lives in the reward, so the loss has no KL term. Weighted rewards, reward
//! metrics and clip-ratio metrics are shared with GRPO (`losses::group_rewards`). With step
//! rewards the advantages are per token and each token's gradient carries its own advantage.

use candle_core::{D, DType, Result, Tensor, bail};

use super::group_rewards::{
    GroupLoss, STD_EPS, check_table, clip_fractions, clip_ratio_metrics, clipped_surrogate,
    frac_zero_std, group_std, reward_metrics, weighted_rewards,
};
use super::stats::{masked_mean, masked_sum_last, nan_mean, nan_std, scalar_f64};

/// The advantage settings of an RLOO step.
#[derive(Debug, Clone, PartialEq)]
pub struct RlooAdvantageConfig {
    pub num_generations: usize,
    pub reward_weights: Vec<f64>,
    /// KL coefficient in the reward (TRL default 0.05).
    pub beta: f64,
    pub normalize_advantages: bool,
    /// Clamp the weighted reward to `[lo, hi]` before the KL term.
    pub reward_clip_range: Option<(f64, f64)>,
}

/// RLOO advantages of a batch and what TRL logs about them.
#[derive(Debug, Clone)]
pub struct RlooAdvantages {
    /// Reward after clipping and the KL term.
    pub rewards: Vec<f64>,
    pub baselines: Vec<f64>,
    pub advantages: Vec<f64>,
    /// `kl`, `rewards/<func>/mean|std`, `reward`, `reward_std`, `frac_reward_zero_std`.
    pub metrics: Vec<(String, f64)>,
}

/// The sampling policy's KL to the reference per completion, `Σ_t (old - ref)·m` (k1, summed),
/// and its per-token mean over the whole batch (the logged `kl`).
pub fn sequence_kl(old: &Tensor, reference: &Tensor, mask: &Tensor) -> Result<(Vec<f64>, f64)> {
    let d = (old.detach() - reference.detach().to_dtype(old.dtype())?)?;
    let per_seq = masked_sum_last(&d, mask)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok((per_seq, scalar_f64(&masked_mean(&d, mask)?)?))
}

/// RLOO's advantages (`_generate_and_score_completions`). `kl` is `sequence_kl`'s output, needed
/// when `beta != 0`.
pub fn rloo_advantages(
    rewards: &[Vec<Option<f64>>],
    names: &[String],
    kl: Option<&(Vec<f64>, f64)>,
    cfg: &RlooAdvantageConfig,
) -> Result<RlooAdvantages> {
    let g = cfg.num_generations;
    check_table(rewards, &cfg.reward_weights, g)?;
    let weighted = weighted_rewards(rewards, &cfg.reward_weights);
    let mut metrics = Vec::new();
    let mut r: Vec<f64> = match cfg.reward_clip_range {
        Some((lo, hi)) => weighted.iter().map(|x| x.clamp(lo, hi)).collect(),
        None => weighted.clone(),
    };
    if cfg.beta != 0.0 {
        let Some((per_seq, token_mean)) = kl else {
            bail!("beta is {} but no KL to the reference was given", cfg.beta);
        };
        if per_seq.len() != r.len() {
            bail!("{} KL values for {} rewards", per_seq.len(), r.len());
        }
        for (x, k) in r.iter_mut().zip(per_seq) {
            *x -= cfg.beta * k;
        }
        metrics.push(("kl".to_string(), *token_mean));
    }
    let baselines: Vec<f64> = r
        .chunks(g)
        .flat_map(|c| {
            let sum: f64 = c.iter().sum();
            c.iter().map(move |x| (sum - x) / (g - 1) as f64)
        })
        .collect();
    let mut advantages: Vec<f64> = r.iter().zip(&baselines).map(|(x, b)| x - b).collect();
    if cfg.normalize_advantages {
        let (m, s) = (nan_mean(&advantages), nan_std(&advantages));
        advantages = advantages.iter().map(|a| (a - m) / (s + STD_EPS)).collect();
    }
    metrics.extend(reward_metrics(rewards, names, &weighted));
    metrics.push((
        "frac_reward_zero_std".into(),
        frac_zero_std(&group_std(&r, g)),
    ));
    Ok(RlooAdvantages {
        rewards: r,
        baselines,
        advantages,
        metrics,
    })
}

/// Per-row host values (ratios, mask, advantages) for the clip metrics.
type HostRows = Vec<Vec<f64>>;

/// Inputs of the RLOO loss: per-token `[B, T]` log-probs (with graph) and mask, the sampling
/// policy's sequence log-probs and the advantages: `[B]`, or `[B, T]` per token with step rewards
/// (`train::step_rewards`).
#[derive(Debug, Clone, Copy)]
pub struct RlooBatch<'a> {
    pub logprobs: &'a Tensor,
    pub old_sequence_logps: &'a Tensor,
    pub advantages: &'a Tensor,
    pub mask: &'a Tensor,
    pub entropies: Option<&'a Tensor>,
}

/// TRL's `RLOOTrainer._compute_loss`: `mean_i -min(w_i·A_i, clamp(w_i)·A_i)` with
/// `w_i = exp(Σ_t lp·m - old_logp_i)`. Per-token advantages go through
/// [`per_token_surrogate`], which is this loss, value and gradient, when a row's advantages are
/// all equal.
pub fn rloo_loss(x: &RlooBatch<'_>, epsilon_low: f64, epsilon_high: f64) -> Result<GroupLoss> {
    let dt = x.logprobs.dtype();
    let (b, t) = x.logprobs.dims2()?;
    let mask = x.mask.to_dtype(dt)?;
    let old = x.old_sequence_logps.detach().to_dtype(dt)?;
    let adv = x.advantages.detach().to_dtype(dt)?;
    let ratio = (masked_sum_last(x.logprobs, &mask)? - old)?.exp()?;
    let per_token = match adv.dims() {
        [n] if *n == b => false,
        [n, m] if *n == b && *m == t => true,
        other => bail!(
            "advantages of shape {other:?} for log-probs of shape [{b}, {t}]: expected [{b}] or [{b}, {t}]"
        ),
    };
    let loss = if per_token {
        per_token_surrogate(x.logprobs, &ratio, &adv, &mask, epsilon_low, epsilon_high)?
    } else {
        clipped_surrogate(&ratio, &ratio, &adv, epsilon_low, epsilon_high)?
    }
    .mean(D::Minus1)?;
    let mut metrics = Vec::new();
    if let Some(h) = x.entropies {
        let h = h.detach().to_dtype(dt)?;
        metrics.push(("entropy".into(), scalar_f64(&masked_mean(&h, &mask)?)?));
    }
    let host =
        |t: &Tensor| -> Result<Vec<f64>> { t.detach().to_dtype(DType::F64)?.to_vec1::<f64>() };
    let ratio_h = host(&ratio)?;
    // Clip flags per sequence (TRL); with per-token advantages, the share of each answer's tokens
    // whose advantage sign makes the sequence's ratio clip.
    let (ratios, masks, advs): (HostRows, HostRows, HostRows) = if per_token {
        let m = mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let a = adv.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        (ratio_h.iter().map(|w| vec![*w; t]).collect(), m, a)
    } else {
        (
            ratio_h.iter().map(|w| vec![*w]).collect(),
            vec![vec![1.0]; b],
            host(&adv)?.into_iter().map(|a| vec![a]).collect(),
        )
    };
    let [low, high, region] = clip_fractions(&ratios, &masks, &advs, epsilon_low, epsilon_high);
    metrics.extend(clip_ratio_metrics(&low, &high, &region, &vec![1.0; b]));
    Ok(GroupLoss { loss, metrics })
}

/// `[B]` per-answer losses for per-token advantages `A_t`: each token's surrogate
/// `-min(w_t·A_t, clamp(w_t)·A_t)` with `w_t` the sequence ratio's value whose gradient flows
/// through that token's log-prob only, summed over the answer, so token t is pushed by its own
/// advantage (`-w·A_t·∇lp_t` unclipped); with equal `A_t` that is the gradient of the sequence
/// surrogate. The value reported is the sequence surrogate at the answer's mean advantage, so the
/// logged loss reads as without step rewards.
fn per_token_surrogate(
    lp: &Tensor,
    ratio: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    epsilon_low: f64,
    epsilon_high: f64,
) -> Result<Tensor> {
    let (b, _) = lp.dims2()?;
    // exp(lp - sg(lp)) is exactly 1: w_t == w in value.
    let token_ratio = ratio
        .detach()
        .reshape((b, 1))?
        .broadcast_mul(&(lp - lp.detach())?.exp()?)?;
    let summed = masked_sum_last(
        &clipped_surrogate(&token_ratio, &token_ratio, adv, epsilon_low, epsilon_high)?,
        mask,
    )?;
    let lens = mask.sum(D::Minus1)?.clamp(1.0, f64::MAX)?;
    let mean_adv = masked_sum_last(adv, mask)?.div(&lens)?;
    let w = ratio.detach();
    let value = clipped_surrogate(&w, &w, &mean_adv, epsilon_low, epsilon_high)?;
    value + (&summed - summed.detach())?
}
