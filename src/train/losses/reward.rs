//! Reward-model losses: pairwise Bradley–Terry (TRL `RewardTrainer`) and the other signals our
//! feedback carries (thumbs and 1–5 ratings on single answers, per-reasoning-step labels,
//! per-aspect ratings), plus a weighted sum of whichever parts a batch has data for.
//!
//! Pairs come from ratings/thumbs on competing answers; pointwise labels use every piece of
//! feedback even when no pair exists. Each part is a pure function returning a 0-d loss tensor
//! that keeps the graph back to the reward model's outputs.

use candle_core::{D, DType, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::stats::{log_sigmoid, masked_mean, scalar_f64, weighted_mean};

/// TRL's reward metrics for a batch of pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardMetrics {
    /// `mean(r_c > r_r)` (TRL `accuracy`).
    pub accuracy: f64,
    /// `mean(r_c - r_r)`; the margin input is *not* subtracted (TRL `margin`).
    pub margin: f64,
}

impl RewardMetrics {
    /// `(name, value)` pairs with TRL's metric names.
    pub fn named(&self) -> [(&'static str, f64); 2] {
        [("accuracy", self.accuracy), ("margin", self.margin)]
    }
}

/// A loss with the metrics measured on the same forward pass.
#[derive(Debug, Clone)]
pub struct RewardLoss {
    pub loss: Tensor,
    pub metrics: RewardMetrics,
}

/// Bradley–Terry pairwise loss `mean(-logσ(r_c - r_r - margin))`, plus
/// `center_coef · mean((r_c + r_r)²)` when given (keeps rewards centred on zero).
/// `chosen`, `rejected` and `margin` are `[B]`. With per-pair `weights` both means are weighted
/// (`stats::weighted_mean`: a pair of weight 0 is out of the loss); `None` is TRL's mean.
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: Option<f64>,
    weights: Option<&[f64]>,
) -> Result<RewardLoss> {
    if chosen.dims() != rejected.dims() {
        bail!(
            "chosen rewards have shape {:?} but rejected {:?}",
            chosen.dims(),
            rejected.dims()
        );
    }
    let diff = (chosen - rejected)?;
    let logits = match margin {
        Some(m) => (&diff - m.to_dtype(diff.dtype())?)?,
        None => diff.clone(),
    };
    let mut loss = weighted_mean(&log_sigmoid(&logits)?.neg()?, weights)?;
    if let Some(c) = center_coef {
        let center = weighted_mean(&(chosen + rejected)?.sqr()?, weights)?.affine(c, 0.0)?;
        loss = (loss + center)?;
    }
    let detached = diff.detach();
    let accuracy = scalar_f64(&detached.gt(0.0)?.to_dtype(DType::F64)?.mean_all()?)?;
    let margin = scalar_f64(&detached.mean_all()?)?;
    Ok(RewardLoss {
        loss,
        metrics: RewardMetrics { accuracy, margin },
    })
}

/// Binary cross-entropy on logits, `mean(w · (softplus(x) - y·x))`, for thumbs up (1) / down (0).
/// With weights the mean is `sum(w·l) / sum(w)` so weights rescale examples, not the loss.
pub fn bce_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let per = bce_elementwise(logits, targets)?;
    match weights {
        Some(w) => masked_mean(&per, &w.to_dtype(per.dtype())?),
        None => per.mean_all(),
    }
}

/// `-(y·logσ(x) + (1-y)·logσ(-x))` elementwise: stable for any logit size.
fn bce_elementwise(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        bail!(
            "logits have shape {:?} but targets {:?}",
            logits.dims(),
            targets.dims()
        );
    }
    let y = targets.to_dtype(logits.dtype())?;
    let pos = log_sigmoid(logits)?;
    let neg = log_sigmoid(&logits.neg()?)?;
    ((&y * pos)? + ((1.0 - &y)? * neg)?)?.neg()
}

/// Mean squared error between predicted and given ratings.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        bail!(
            "predictions have shape {:?} but targets {:?}",
            pred.dims(),
            target.dims()
        );
    }
    (pred - target.to_dtype(pred.dtype())?)?.sqr()?.mean_all()
}

/// BCE against a rating mapped linearly onto `[0, 1]` (`(r - lo) / (hi - lo)`): a 1–5 star rating
/// as a soft label, so the head's logit stays comparable with thumbs.
pub fn rating_bce(logits: &Tensor, ratings: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    if hi <= lo || !hi.is_finite() || !lo.is_finite() {
        bail!("rating range [{lo}, {hi}] is empty\nhint: set the rating scale's min below its max");
    }
    let y = ratings
        .to_dtype(logits.dtype())?
        .affine(1.0 / (hi - lo), -lo / (hi - lo))?;
    bce_with_logits(logits, &y, None)
}

/// Per-step BCE for reasoning-step labels: `logits`, `labels`, `mask` are `[B, S]`; only steps with
/// `mask == 1` count and the mean is over counted steps.
pub fn step_bce(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if mask.dims() != logits.dims() {
        bail!(
            "step mask has shape {:?} but logits {:?}",
            mask.dims(),
            logits.dims()
        );
    }
    let per = bce_elementwise(logits, labels)?;
    masked_mean(&per, &mask.to_dtype(per.dtype())?)
}

/// How a 1–5 rating (already scaled to `[0, 1]`) trains the score: squared error between
/// `σ(r)` and the rating, or binary cross-entropy with the rating as a soft label. Either way the
/// score keeps the meaning thumbs give it (`σ(r)` = how good the answer is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatingLoss {
    #[default]
    Mse,
    Bce,
}

/// Pointwise loss over single answers, `mean_i l_i`: thumbs (`is_rating_i = 0`, target 0/1) always
/// take BCE on the logit; ratings (`is_rating_i = 1`, target in `[0, 1]`) take `rating`'s loss.
/// All three tensors are `[B]`.
pub fn pointwise(
    logits: &Tensor,
    targets: &Tensor,
    is_rating: &Tensor,
    rating: RatingLoss,
) -> Result<Tensor> {
    let bce = bce_elementwise(logits, targets)?;
    match rating {
        RatingLoss::Bce => bce.mean_all(),
        RatingLoss::Mse => {
            let y = targets.to_dtype(logits.dtype())?;
            let r = is_rating.to_dtype(logits.dtype())?;
            // σ(x) = exp(logσ(x)): log_sigmoid has a backward, so the graph stays intact.
            let sq = (log_sigmoid(logits)?.exp()? - &y)?.sqr()?;
            let per = ((&r * sq)? + ((1.0 - &r)? * bce)?)?;
            per.mean_all()
        }
    }
}

/// Per-aspect squared error `sum(mask · (pred − target)²) / sum(mask)`: `[B, A]` predictions of
/// the aspect heads against ratings scaled to `[0, 1]`; `mask` marks the aspects each answer was
/// rated on.
pub fn aspect_mse(pred: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if pred.dims() != targets.dims() || pred.dims() != mask.dims() {
        bail!(
            "aspect predictions have shape {:?}, targets {:?}, mask {:?}",
            pred.dims(),
            targets.dims(),
            mask.dims()
        );
    }
    let err = (pred - targets.to_dtype(pred.dtype())?)?.sqr()?;
    masked_mean(&err, &mask.to_dtype(pred.dtype())?)
}

/// Weights of the reward-model loss parts (config `reward.loss_weights`). A part with weight 0,
/// or without examples in a batch, is skipped. Each part is a mean over its own examples, so a
/// weight says how much that kind of feedback counts per batch, however many examples it has.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardLossWeights {
    /// Bradley–Terry on preference pairs.
    pub pairwise: f64,
    /// BCE on thumbs, MSE or BCE on ratings (single answers).
    pub pointwise: f64,
    /// BCE per reasoning step, read by the step head.
    pub steps: f64,
    /// MSE per aspect, read by the aspect heads.
    pub aspects: f64,
}

impl Default for RewardLossWeights {
    fn default() -> Self {
        Self {
            pairwise: 1.0,
            pointwise: 1.0,
            steps: 1.0,
            aspects: 1.0,
        }
    }
}

/// A loss weight that cannot train; `key` is the config key (`reward.loss_weights.pointwise`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {problem}\nhint: {hint}")]
pub struct InvalidLossWeight {
    pub key: String,
    pub problem: String,
    pub hint: &'static str,
}

impl RewardLossWeights {
    /// `(key, weight)` in a fixed order.
    pub fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("pairwise", self.pairwise),
            ("pointwise", self.pointwise),
            ("steps", self.steps),
            ("aspects", self.aspects),
        ]
    }

    /// Every weight finite and `>= 0`, and at least one above 0.
    pub fn validate(&self) -> std::result::Result<(), InvalidLossWeight> {
        for (name, w) in self.named() {
            if !(w.is_finite() && w >= 0.0) {
                return Err(InvalidLossWeight {
                    key: format!("reward.loss_weights.{name}"),
                    problem: format!("must be a finite number >= 0, got {w}"),
                    hint: "0 switches that kind of feedback off, 1 counts it like a pair",
                });
            }
        }
        if self.named().iter().all(|(_, w)| *w == 0.0) {
            return Err(InvalidLossWeight {
                key: "reward.loss_weights".into(),
                problem: "every weight is 0, so nothing would train".into(),
                hint: "set pairwise: 1 (the default) or another kind above 0",
            });
        }
        Ok(())
    }
}

/// The parts of one batch's reward loss, each already reduced to a 0-d tensor (or absent).
#[derive(Debug, Clone, Default)]
pub struct RewardLossParts {
    pub pairwise: Option<Tensor>,
    pub pointwise: Option<Tensor>,
    pub steps: Option<Tensor>,
    pub aspects: Option<Tensor>,
}

impl RewardLossParts {
    /// `(key, part)` in the order of [`RewardLossWeights::named`].
    pub fn named(&self) -> [(&'static str, Option<&Tensor>); 4] {
        [
            ("pairwise", self.pairwise.as_ref()),
            ("pointwise", self.pointwise.as_ref()),
            ("steps", self.steps.as_ref()),
            ("aspects", self.aspects.as_ref()),
        ]
    }
}

/// `Σ w_i · part_i` over present parts with non-zero weight. Errors when nothing contributes, so a
/// misconfigured run fails loudly instead of training on zero.
pub fn combine(parts: &RewardLossParts, w: &RewardLossWeights) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for ((_, part), (_, weight)) in parts.named().into_iter().zip(w.named()) {
        if let Some(p) = part
            && weight != 0.0
        {
            let term = p.affine(weight, 0.0)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
    }
    match total {
        Some(t) => Ok(t),
        None => bail!(
            "no reward-loss part has both data and a non-zero weight\nhint: check reward.loss_weights in the config against the feedback kinds collected"
        ),
    }
}

/// Per-row mean of `x` over `mask` along the last dim (e.g. mean per-step score per answer).
pub fn row_masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?;
    (x * &m)?.sum(D::Minus1)?.div(&m.sum(D::Minus1)?)
}
