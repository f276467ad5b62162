//! PPO pieces for RLHF, reproducing TRL: the per-token KL penalty and score placement, GAE with
//! whitening (classic `PPOTrainer`, trl 0.11.4), the newer `PPOTrainer` reward + GAE block with
//! its padding rules and missing-EOS penalty (trl 1.x), and the clipped policy / value loss with
//! the statistics TRL logs.
//!
//! Rewards, advantages and returns are targets, never differentiated: they are computed detached
//! and the sequential GAE recursion runs on the host in f64 (T is a few hundred at most), then
//! comes back in the inputs' dtype and device. The loss keeps its graph to `logprobs`/`vpreds`.
//! Shapes: `[B, T]` per response token, `[B]` per sequence.

use candle_core::{D, DType, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::logits_reference::entropy_from_logits;
use super::stats::{clip_by_value, masked_mean, masked_var, masked_whiten, scalar_f64};

/// TRL's `INVALID_LOGPROB`: the log-prob written at padding so that the KL there is zero.
pub const INVALID_LOGPROB: f64 = 1.0;

/// Per-token KL estimator of the classic trainer (`kl_penalty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlPenalty {
    /// `lp - ref`
    #[default]
    Kl,
    /// `|lp - ref|`
    Abs,
    /// `0.5·(lp - ref)²`
    Mse,
}

/// `kl_penalty(lp, ref)` elementwise.
pub fn kl_penalty(logprobs: &Tensor, ref_logprobs: &Tensor, kind: KlPenalty) -> Result<Tensor> {
    let d = (logprobs - ref_logprobs)?;
    match kind {
        KlPenalty::Kl => Ok(d),
        KlPenalty::Abs => d.abs(),
        KlPenalty::Mse => d.sqr()?.affine(0.5, 0.0),
    }
}

/// Classic per-token rewards.
#[derive(Debug, Clone)]
pub struct KlRewards {
    /// `[B, T]` KL estimates.
    pub kls: Tensor,
    /// `-β·kl` at every position (padding not zeroed; GAE masks later, as TRL does).
    pub non_score_rewards: Tensor,
    /// `non_score_rewards` plus the score at each row's last `mask == 1` position.
    pub rewards: Tensor,
}

/// `compute_rewards` of the classic trainer. Errors on a row without response tokens.
pub fn compute_rewards(
    scores: &Tensor,
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    mask: &Tensor,
    kl_coef: f64,
    kind: KlPenalty,
) -> Result<KlRewards> {
    let (b, t) = logprobs.dims2()?;
    let kls = kl_penalty(&logprobs.detach(), &ref_logprobs.detach(), kind)?;
    let non_score_rewards = kls.affine(-kl_coef, 0.0)?;
    let m = host2(mask)?;
    let s = host1(scores)?;
    if s.len() != b {
        bail!("{} scores for a batch of {b} responses", s.len());
    }
    let mut bonus = vec![0.0; b * t];
    for (i, row) in m.iter().enumerate() {
        let Some(last) = row.iter().rposition(|&x| x != 0.0) else {
            bail!("response {i} has no token in its mask\nhint: drop empty responses before PPO");
        };
        bonus[i * t + last] = s[i];
    }
    let bonus = Tensor::from_vec(bonus, (b, t), logprobs.device())?.to_dtype(logprobs.dtype())?;
    let rewards = (&non_score_rewards + bonus)?;
    Ok(KlRewards {
        kls,
        non_score_rewards,
        rewards,
    })
}

/// `objective/kl`: mean over the batch of each response's summed `lp - ref` over its mask.
pub fn objective_kl(logprobs: &Tensor, ref_logprobs: &Tensor, mask: &Tensor) -> Result<f64> {
    let d = (logprobs.detach() - ref_logprobs.detach())?;
    let m = mask.to_dtype(d.dtype())?;
    scalar_f64(&(d * m)?.sum(D::Minus1)?.mean_all()?)
}

/// GAE outputs, all detached.
#[derive(Debug, Clone)]
pub struct Gae {
    /// `values · mask`
    pub values: Tensor,
    /// Masked-whitened advantages (what the policy loss uses).
    pub advantages: Tensor,
    /// Advantages before whitening.
    pub advantages_raw: Tensor,
    /// `advantages_raw + values` (value-head targets).
    pub returns: Tensor,
}

/// `compute_advantages` of the classic trainer: values and rewards masked, optional reward
/// whitening (mean kept), GAE over the full length with next value 0 after the last column,
/// returns from the raw advantages, then advantage whitening over the mask.
pub fn compute_advantages(
    values: &Tensor,
    rewards: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lam: f64,
    whiten_rewards: bool,
) -> Result<Gae> {
    let dt = values.dtype();
    let mask = mask.to_dtype(dt)?;
    let values = (values.detach() * &mask)?;
    let mut rewards = (rewards.detach().to_dtype(dt)? * &mask)?;
    if whiten_rewards {
        rewards = masked_whiten(&rewards, &mask, false)?;
    }
    let advantages_raw = gae_host(&values, &rewards, gamma, lam)?;
    let returns = (&advantages_raw + &values)?;
    let advantages = masked_whiten(&advantages_raw, &mask, true)?;
    Ok(Gae {
        values,
        advantages,
        advantages_raw,
        returns,
    })
}

/// The GAE recursion `A_t = δ_t + γλ·A_{t+1}`, `δ_t = r_t + γ·V_{t+1} - V_t`, `V_T = 0`.
fn gae_host(values: &Tensor, rewards: &Tensor, gamma: f64, lam: f64) -> Result<Tensor> {
    let (b, t) = values.dims2()?;
    if rewards.dims() != [b, t] {
        bail!(
            "rewards have shape {:?} but values {:?}",
            rewards.dims(),
            values.dims()
        );
    }
    let v = host2(values)?;
    let r = host2(rewards)?;
    let mut adv = vec![0.0; b * t];
    for i in 0..b {
        let mut last = 0.0;
        for j in (0..t).rev() {
            let next = if j + 1 < t { v[i][j + 1] } else { 0.0 };
            let delta = r[i][j] + gamma * next - v[i][j];
            last = delta + gamma * lam * last;
            adv[i * t + j] = last;
        }
    }
    Tensor::from_vec(adv, (b, t), values.device())?.to_dtype(values.dtype())
}

/// KL estimator of the newer trainer (`kl_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `lp - ref`
    #[default]
    K1,
    /// `(exp(ref - lp) - 1) - (ref - lp)`: unbiased and non-negative.
    K3,
}

impl KlEstimator {
    /// The per-token estimate of `KL(π ‖ π_ref)` from `lp = log π` and `ref = log π_ref`
    /// (keeps the graph to both).
    pub fn estimate(self, logprobs: &Tensor, ref_logprobs: &Tensor) -> Result<Tensor> {
        let logr = (ref_logprobs - logprobs)?;
        match self {
            Self::K1 => logr.neg(),
            Self::K3 => (logr.exp()? - 1.0)? - &logr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardGaeConfig {
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
}

impl Default for RewardGaeConfig {
    fn default() -> Self {
        // TRL PPO defaults (GUIDE §5).
        Self {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
        }
    }
}

/// Rewards, advantages and returns of the newer trainer, all detached `[B, T]`.
#[derive(Debug, Clone)]
pub struct RewardGae {
    pub kl: Tensor,
    pub non_score_reward: Tensor,
    pub rewards: Tensor,
    /// Whitened over `!padding_mask`, zero at padding.
    pub advantages: Tensor,
    pub returns: Tensor,
    /// `1` where `idx > seq_len` (after the last response token).
    pub padding_mask: Tensor,
    /// `1` where `idx > seq_len + 1`.
    pub padding_mask_p1: Tensor,
}

/// Index of each response's last token: first pad position minus one (`T - 1` with no padding),
/// as TRL's `first_true_indices(responses == pad) - 1`. A response that starts with padding gets
/// `None`'s TRL equivalent, -1, which is reported as an error here.
pub fn sequence_lengths(responses: &Tensor, pad_token_id: u32) -> Result<Vec<usize>> {
    let rows = responses.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    rows.iter()
        .enumerate()
        .map(
            |(i, row)| match row.iter().position(|&x| x == pad_token_id) {
                Some(0) => bail!("response {i} is empty (starts with the pad token)"),
                Some(p) => Ok(p - 1),
                None => Ok(row.len().saturating_sub(1)),
            },
        )
        .collect()
}

/// TRL's missing-EOS penalty: `score - penalty` for responses that never emitted EOS, so that
/// truncated rambling is never rewarded.
pub fn apply_missing_eos_penalty(
    scores: &Tensor,
    contains_eos: &[bool],
    penalty: f64,
) -> Result<Tensor> {
    if contains_eos.len() != scores.elem_count() {
        bail!(
            "{} EOS flags for {} scores",
            contains_eos.len(),
            scores.elem_count()
        );
    }
    let sub: Vec<f64> = contains_eos
        .iter()
        .map(|&e| if e { 0.0 } else { penalty })
        .collect();
    let sub = Tensor::from_vec(sub, scores.dims(), scores.device())?.to_dtype(scores.dtype())?;
    scores - sub
}

/// Steps 4–6 of the newer TRL PPO loop (see [`RewardGae`]): logprobs are overwritten with
/// [`INVALID_LOGPROB`] after each sequence's last token, values zeroed beyond `seq_len + 1`, the
/// score added at `seq_len + 1` (or `seq_len` when that is past the end), optional reward whitening
/// over `!padding_mask_p1`, GAE over the full length, advantages whitened over `!padding_mask`.
pub fn rewards_and_advantages(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    values: &Tensor,
    scores: &Tensor,
    seq_lens: &[usize],
    cfg: &RewardGaeConfig,
) -> Result<RewardGae> {
    let (b, t) = logprobs.dims2()?;
    let dev = logprobs.device();
    let dt = logprobs.dtype();
    if seq_lens.len() != b || scores.elem_count() != b {
        bail!(
            "batch of {b} but {} sequence lengths and {} scores",
            seq_lens.len(),
            scores.elem_count()
        );
    }
    let mut pad = vec![0u8; b * t];
    let mut pad_p1 = vec![0u8; b * t];
    let mut end_hot = vec![0.0f64; b * t];
    let s = host1(scores)?;
    for (i, &len) in seq_lens.iter().enumerate() {
        if len >= t {
            bail!("sequence length {len} of response {i} is outside the {t} response positions");
        }
        for j in 0..t {
            pad[i * t + j] = u8::from(j > len);
            pad_p1[i * t + j] = u8::from(j > len + 1);
        }
        let end = if len + 1 < t { len + 1 } else { len };
        end_hot[i * t + end] = s[i];
    }
    let padding_mask = Tensor::from_vec(pad, (b, t), dev)?;
    let padding_mask_p1 = Tensor::from_vec(pad_p1, (b, t), dev)?;
    let invalid = Tensor::full(INVALID_LOGPROB, (b, t), dev)?.to_dtype(dt)?;
    let lp = padding_mask.where_cond(&invalid, &logprobs.detach())?;
    let rlp = padding_mask.where_cond(&invalid, &ref_logprobs.detach().to_dtype(dt)?)?;
    let zeros = Tensor::zeros((b, t), dt, dev)?;
    let values = padding_mask_p1.where_cond(&zeros, &values.detach().to_dtype(dt)?)?;

    let kl = cfg.kl_estimator.estimate(&lp, &rlp)?;
    let non_score_reward = kl.affine(-cfg.kl_coef, 0.0)?;
    let end_hot = Tensor::from_vec(end_hot, (b, t), dev)?.to_dtype(dt)?;
    let mut rewards = (&non_score_reward + end_hot)?;
    let not_pad = padding_mask.ones_like()?.sub(&padding_mask)?.to_dtype(dt)?;
    let not_pad_p1 = padding_mask_p1
        .ones_like()?
        .sub(&padding_mask_p1)?
        .to_dtype(dt)?;
    if cfg.whiten_rewards {
        rewards = masked_whiten(&rewards, &not_pad_p1, false)?;
        rewards = padding_mask_p1.where_cond(&zeros, &rewards)?;
    }
    let adv_raw = gae_host(&values, &rewards, cfg.gamma, cfg.lam)?;
    let returns = (&adv_raw + &values)?;
    let advantages = masked_whiten(&adv_raw, &not_pad, true)?;
    let advantages = padding_mask.where_cond(&zeros, &advantages)?;
    Ok(RewardGae {
        kl,
        non_score_reward,
        rewards,
        advantages,
        returns,
        padding_mask,
        padding_mask_p1,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PpoLossConfig {
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    /// Skip the batch (zero loss) when the mean ratio exceeds this (TRL `ratio_threshold`).
    pub ratio_threshold: Option<f64>,
}

impl Default for PpoLossConfig {
    fn default() -> Self {
        Self {
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ratio_threshold: Some(10.0),
        }
    }
}

/// Statistics of one PPO minibatch, named as TRL's classic trainer logs them (see [`Self::named`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PpoStats {
    pub loss_policy: f64,
    /// Unscaled value loss (before `vf_coef`).
    pub loss_value: f64,
    pub loss_total: f64,
    /// `None` when no logits were given.
    pub policy_entropy: Option<f64>,
    pub policy_approxkl: f64,
    pub policy_policykl: f64,
    pub policy_clipfrac: f64,
    pub policy_advantages_mean: f64,
    pub ratio_mean: f64,
    pub returns_mean: f64,
    pub returns_var: f64,
    pub val_vpred: f64,
    pub val_error: f64,
    pub val_clipfrac: f64,
    pub val_mean: f64,
    pub val_var: f64,
    /// The batch was zeroed because the mean ratio passed `ratio_threshold`.
    pub skipped_ratio_threshold: bool,
}

impl PpoStats {
    /// `(name, value)` pairs with TRL's names; entropy only when computed.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("loss/policy", self.loss_policy),
            ("loss/value", self.loss_value),
            ("loss/total", self.loss_total),
            ("policy/approxkl", self.policy_approxkl),
            ("policy/policykl", self.policy_policykl),
            ("policy/clipfrac", self.policy_clipfrac),
            ("policy/advantages_mean", self.policy_advantages_mean),
            ("returns/mean", self.returns_mean),
            ("returns/var", self.returns_var),
            ("val/vpred", self.val_vpred),
            ("val/error", self.val_error),
            ("val/clipfrac", self.val_clipfrac),
            ("val/mean", self.val_mean),
            ("val/var", self.val_var),
        ];
        if let Some(e) = self.policy_entropy {
            v.push(("policy/entropy", e));
        }
        v
    }
}

/// Loss tensors with graphs (`pg_loss` to `logprobs`, `vf_loss` to `vpreds`) and the stats.
#[derive(Debug, Clone)]
pub struct PpoLoss {
    pub pg_loss: Tensor,
    /// `vf_coef · vf` (what TRL returns).
    pub vf_loss: Tensor,
    /// `pg_loss + vf_loss`.
    pub loss: Tensor,
    pub stats: PpoStats,
}

/// Inputs of [`ppo_loss`]; all `[B, T]` except `logits` (`[B, T, V]`, for the entropy stat).
#[derive(Debug, Clone, Copy)]
pub struct PpoBatch<'a> {
    pub old_logprobs: &'a Tensor,
    pub logprobs: &'a Tensor,
    /// Value predictions at rollout time (the clipping centre).
    pub values: &'a Tensor,
    pub vpreds: &'a Tensor,
    /// Response tokens that count for the policy loss and stats.
    pub mask: &'a Tensor,
    /// Tokens that count for the value loss and `val/*`, `returns/*` stats; `None` uses `mask`.
    /// The newer TRL trainer passes `!padding_mask_p1` here and `!padding_mask` as `mask`.
    pub value_mask: Option<&'a Tensor>,
    pub advantages: &'a Tensor,
    pub returns: &'a Tensor,
    pub logits: Option<&'a Tensor>,
}

/// TRL's `PPOTrainer.loss`: clipped surrogate policy loss and clipped value loss, both masked means.
pub fn ppo_loss(x: &PpoBatch<'_>, cfg: &PpoLossConfig) -> Result<PpoLoss> {
    let dt = x.logprobs.dtype();
    let mask = x.mask.to_dtype(dt)?;
    let vmask = match x.value_mask {
        Some(m) => m.to_dtype(dt)?,
        None => mask.clone(),
    };
    let old_lp = x.old_logprobs.detach().to_dtype(dt)?;
    let values = x.values.detach().to_dtype(dt)?;
    let adv = x.advantages.detach().to_dtype(dt)?;
    let ret = x.returns.detach().to_dtype(dt)?;

    let lo = values.affine(1.0, -cfg.cliprange_value)?;
    let hi = values.affine(1.0, cfg.cliprange_value)?;
    let vclipped = clip_by_value(x.vpreds, &lo, &hi)?;
    let vf1 = (x.vpreds - &ret)?.sqr()?;
    let vf2 = (&vclipped - &ret)?.sqr()?;
    let vf = masked_mean(&vf1.maximum(&vf2)?, &vmask)?.affine(0.5, 0.0)?;
    let vf_clipfrac = masked_mean(&vf2.gt(&vf1)?.to_dtype(dt)?, &vmask)?;

    let log_ratio = (x.logprobs - &old_lp)?;
    let ratio = log_ratio.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()? * ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let mut pg_loss = masked_mean(&pg1.maximum(&pg2)?, &mask)?;
    let pg_clipfrac = masked_mean(&pg2.gt(&pg1)?.to_dtype(dt)?, &mask)?;
    let mut vf = vf;

    let ratio_mean = scalar_f64(&masked_mean(&ratio.detach(), &mask)?)?;
    let skipped = cfg.ratio_threshold.is_some_and(|th| ratio_mean > th);
    if skipped {
        pg_loss = pg_loss.affine(0.0, 0.0)?;
        vf = vf.affine(0.0, 0.0)?;
    }
    let vf_loss = vf.affine(cfg.vf_coef, 0.0)?;
    let loss = (&pg_loss + &vf_loss)?;

    let lr = log_ratio.detach();
    let vpreds = x.vpreds.detach();
    let policy_entropy = match x.logits {
        Some(l) => Some(scalar_f64(&masked_mean(
            &entropy_from_logits(l)?.to_dtype(dt)?,
            &mask,
        )?)?),
        None => None,
    };
    let stats = PpoStats {
        loss_policy: scalar_f64(&pg_loss)?,
        loss_value: scalar_f64(&vf)?,
        loss_total: scalar_f64(&loss)?,
        policy_entropy,
        policy_approxkl: scalar_f64(&masked_mean(&lr.sqr()?, &mask)?)? * 0.5,
        policy_policykl: -scalar_f64(&masked_mean(&lr, &mask)?)?,
        policy_clipfrac: scalar_f64(&pg_clipfrac)?,
        policy_advantages_mean: scalar_f64(&masked_mean(&adv, &mask)?)?,
        ratio_mean,
        returns_mean: scalar_f64(&masked_mean(&ret, &vmask)?)?,
        returns_var: scalar_f64(&masked_var(&ret, &vmask, true)?)?,
        val_vpred: scalar_f64(&masked_mean(&vpreds, &vmask)?)?,
        val_error: scalar_f64(&masked_mean(&(&vpreds - &ret)?.sqr()?, &vmask)?)?,
        val_clipfrac: scalar_f64(&vf_clipfrac)?,
        val_mean: scalar_f64(&masked_mean(&values, &vmask)?)?,
        val_var: scalar_f64(&masked_var(&values, &vmask, true)?)?,
        skipped_ratio_threshold: skipped,
    };
    Ok(PpoLoss {
        pg_loss,
        vf_loss,
        loss,
        stats,
    })
}

fn host2(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()
}

fn host1(t: &Tensor) -> Result<Vec<f64>> {
    t.detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}
