//! Reward-model losses: pairwise Bradley–Terry (TRL `RewardTrainer`) and the pointwise heads our
//! feedback also supports (thumbs, 1–5 ratings, per-reasoning-step labels), plus a weighted sum
//! of whichever parts a run has data for.
//!
//! Pairs come from ratings/thumbs on competing answers; pointwise labels use every piece of
//! feedback even when no pair exists. Each part is a pure function returning a 0-d loss tensor
//! that keeps the graph back to the reward model's outputs.

use candle_core::{D, DType, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::stats::{log_sigmoid, masked_mean, scalar_f64};

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
/// `chosen`, `rejected` and `margin` are `[B]`.
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: Option<f64>,
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
    let mut loss = log_sigmoid(&logits)?.neg()?.mean_all()?;
    if let Some(c) = center_coef {
        let center = (chosen + rejected)?.sqr()?.mean_all()?.affine(c, 0.0)?;
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

/// Weights of the reward-model loss parts; a part with weight 0 or no data is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardLossWeights {
    pub pairwise: f64,
    pub thumbs: f64,
    pub rating: f64,
    pub steps: f64,
}

impl Default for RewardLossWeights {
    fn default() -> Self {
        Self {
            pairwise: 1.0,
            thumbs: 1.0,
            rating: 1.0,
            steps: 1.0,
        }
    }
}

/// The parts of one batch's reward loss, each already reduced to a 0-d tensor (or absent).
#[derive(Debug, Clone, Default)]
pub struct RewardLossParts {
    pub pairwise: Option<Tensor>,
    pub thumbs: Option<Tensor>,
    pub rating: Option<Tensor>,
    pub steps: Option<Tensor>,
}

/// `Σ w_i · part_i` over present parts with non-zero weight. Errors when nothing contributes, so a
/// misconfigured run fails loudly instead of training on zero.
pub fn combine(parts: &RewardLossParts, w: &RewardLossWeights) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (part, weight) in [
        (&parts.pairwise, w.pairwise),
        (&parts.thumbs, w.thumbs),
        (&parts.rating, w.rating),
        (&parts.steps, w.steps),
    ] {
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
            "no reward-loss part has both data and a non-zero weight\nhint: check the reward loss weights in the config against the feedback kinds collected"
        ),
    }
}

/// Per-row mean of `x` over `mask` along the last dim (e.g. mean per-step score per answer).
pub fn row_masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?;
    (x * &m)?.sum(D::Minus1)?.div(&m.sum(D::Minus1)?)
}
