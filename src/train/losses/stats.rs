//! Masked statistics shared by every loss: masked mean / variance, whitening, clipping, the
//! running score moments PPO uses to scale rewards, and the per-example weighted batch mean (with
//! the check of a weight) that the reward, DPO and KTO losses take.
//!
//! They mirror `trl.core` (0.11.4) exactly, including its conventions that trip people up:
//! `masked_var` is *unbiased* by default (Bessel factor `n / (n - 1)` over the mask count),
//! whitening adds `1e-8` under the square root, and `shift_mean = false` adds the mean back after
//! whitening. Everything is a pure function over candle tensors and keeps the autograd graph, so
//! the same helpers serve loss terms (PPO's masked means) and no-grad bookkeeping (GAE whitening).
//! Masks are float tensors of the data's dtype holding 0/1.

use candle_core::{D, DType, Result, Tensor};

/// Epsilon under the square root when whitening, as in TRL.
pub const WHITEN_EPS: f64 = 1e-8;

/// The mean of per-example losses `[B]` with per-example weights (the influence cap's share, a
/// constitution pair's config weight): `sum(w·l) / sum(w)`, so a weight of 0 takes an example
/// out of the batch and weights rescale examples, not the loss. `None` is TRL's plain mean,
/// bit for bit. A batch whose weights are all 0 gives 0 (and no gradient).
pub fn weighted_mean(per_example: &Tensor, weights: Option<&[f64]>) -> Result<Tensor> {
    let Some(w) = weights else {
        return per_example.mean_all();
    };
    let n = per_example.elem_count();
    if w.len() != n {
        candle_core::bail!("{} weights for {n} per-example losses", w.len());
    }
    let total: f64 = w.iter().sum();
    let w = Tensor::from_iter(
        w.iter().map(|x| x / total.max(f64::MIN_POSITIVE)),
        per_example.device(),
    )?
    .to_dtype(per_example.dtype())?;
    (per_example.flatten_all()? * w)?.sum_all()
}

/// Per-example weights for [`weighted_mean`]: `None` (the plain mean) when every weight is 1.
pub fn non_unit_weights(weights: impl IntoIterator<Item = f64>) -> Option<Vec<f64>> {
    let w: Vec<f64> = weights.into_iter().collect();
    w.iter().any(|x| *x != 1.0).then_some(w)
}

/// Example `i`'s weight in its batch mean (`what`: "preference pair", "thumb"): 1 when none is
/// given; a negative or non-finite one is refused, naming the example and the value.
pub fn example_weight(what: &str, i: usize, weight: Option<f64>) -> Result<f64> {
    let w = weight.unwrap_or(1.0);
    if !(w.is_finite() && w >= 0.0) {
        candle_core::bail!(
            "{what} {i} has weight {w}: expected a finite number >= 0\nhint: fix its \"weight\" field in the training data (0 leaves the example out)"
        );
    }
    Ok(w)
}

/// `sum(x * mask) / sum(mask)` over all elements (a 0-d tensor).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(x.dtype())?;
    (x * &mask)?.sum_all()?.div(&mask.sum_all()?)
}

/// `sum(x * mask, dim) / sum(mask, dim)` along `dim` (TRL's `masked_mean(..., axis=dim)`).
pub fn masked_mean_dim(x: &Tensor, mask: &Tensor, dim: usize) -> Result<Tensor> {
    let mask = mask.to_dtype(x.dtype())?;
    (x * &mask)?.sum(dim)?.div(&mask.sum(dim)?)
}

/// `sum(x * mask)` along the last dimension: a per-sequence sum such as a sequence log-prob.
pub fn masked_sum_last(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(x.dtype())?;
    (x * &mask)?.sum(D::Minus1)
}

/// Masked variance; `unbiased` multiplies by `n / (n - 1)` with `n = sum(mask)`.
///
/// With `unbiased` and a mask holding a single element the result is non-finite, as in TRL
/// (which raises there); callers that whiten tiny batches should check `mask` first.
pub fn masked_var(x: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = masked_mean(&centered.sqr()?, mask)?;
    if unbiased {
        let n = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        var.affine(n / (n - 1.0), 0.0)
    } else {
        Ok(var)
    }
}

/// Whitening over every element: `(x - mean) / sqrt(var_unbiased + 1e-8)`, plus the mean back when
/// `shift_mean` is false.
pub fn whiten(x: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let n = x.elem_count() as f64;
    let mean = x.mean_all()?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.sum_all()?.affine(1.0 / (n - 1.0), 0.0)?;
    finish_whiten(&centered, &mean, &var, shift_mean)
}

/// Whitening with statistics taken over the mask only (every element is still transformed).
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let var = masked_var(x, mask, true)?;
    let centered = x.broadcast_sub(&mean)?;
    finish_whiten(&centered, &mean, &var, shift_mean)
}

fn finish_whiten(
    centered: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    shift_mean: bool,
) -> Result<Tensor> {
    let inv_std = (var + WHITEN_EPS)?.sqrt()?.recip()?;
    let w = centered.broadcast_mul(&inv_std)?;
    if shift_mean {
        Ok(w)
    } else {
        w.broadcast_add(mean)
    }
}

/// `clamp(x, lo, hi)` elementwise with tensor bounds (TRL's `clip_by_value`).
pub fn clip_by_value(x: &Tensor, lo: &Tensor, hi: &Tensor) -> Result<Tensor> {
    x.maximum(lo)?.minimum(hi)
}

/// Numerically stable `log(sigmoid(x))` with an exact gradient everywhere, zero included.
///
/// `min(x, 0) - log(1 + exp(-|x|))` would be the usual form, but candle splits the gradient of
/// `min` evenly at a tie, which gives 1.0 instead of 0.5 at `x = 0`: exactly where DPO's first
/// step sits (policy == reference). `where_cond` routes the gradient to one branch only.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let neg_part = x.ge(&zeros)?.where_cond(&zeros, x)?;
    let softplus_tail = log1p_unit(&x.abs()?.neg()?.exp()?)?;
    neg_part - softplus_tail
}

/// `log(1 + t)` for `t` in `[0, 1]`, accurate for tiny `t` (candle has no `log1p`): `1 + t`
/// rounds to 1 below ~1e-16 in f64 (6e-8 in f32), so `logσ(40)` would read exactly 0. Below
/// 1e-4 the series `t - t²/2 + t³/3` is exact to ~t⁴/4.
fn log1p_unit(t: &Tensor) -> Result<Tensor> {
    let direct = (t + 1.0)?.log()?;
    let series = (t * t.affine(-1.0 / 3.0, 0.5)?.mul(t)?.affine(-1.0, 1.0)?)?;
    t.lt(1e-4)?.where_cond(&series, &direct)
}

/// `sigmoid(x)` built from ops with a backward on every device (`exp(log_sigmoid(x))`).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    log_sigmoid(x)?.exp()
}

/// Reads a 0-d or single-element tensor as `f64` (for metrics).
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()
}

/// Running mean/std of reward-model scores across batches (TRL `RunningMoments`), used to scale
/// or normalise PPO scores so the reward's scale does not drift the KL trade-off.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningMoments {
    pub mean: f64,
    pub std: f64,
    pub var: f64,
    pub count: f64,
}

impl Default for RunningMoments {
    fn default() -> Self {
        // TRL starts from count 1e-24 so the first update is (almost) the batch statistics.
        Self {
            mean: 0.0,
            std: 1.0,
            var: 1.0,
            count: 1e-24,
        }
    }
}

impl RunningMoments {
    /// Folds a batch in (parallel-variance update) and returns the batch's `(mean, unbiased std)`.
    pub fn update(&mut self, xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        if xs.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let xs_mean = xs.iter().sum::<f64>() / n;
        let xs_var = xs.iter().map(|x| (x - xs_mean).powi(2)).sum::<f64>() / n;
        let delta = xs_mean - self.mean;
        let tot = self.count + n;
        let old_sum = self.var * self.count + delta * delta * self.count * n / tot;
        let tot_sum = old_sum + xs_var * n;
        self.mean += delta * n / tot;
        let new_var = tot_sum / tot;
        self.std = (new_var * tot / (tot - 1.0)).sqrt();
        self.var = new_var;
        self.count = tot;
        (xs_mean, (xs_var * n / (n - 1.0)).sqrt())
    }

    /// `score / (std + eps)` (TRL `use_score_scaling`).
    pub fn scale(&self, score: f64, eps: f64) -> f64 {
        score / (self.std + eps)
    }

    /// `(score - mean) / (std + eps)` (TRL `use_score_scaling` with `use_score_norm`).
    pub fn normalize(&self, score: f64, eps: f64) -> f64 {
        (score - self.mean) / (self.std + eps)
    }
}

/// Mean of the non-NaN values (`torch.nanmean`); NaN when there are none.
pub fn nan_mean(xs: &[f64]) -> f64 {
    let (sum, n) = xs
        .iter()
        .filter(|x| !x.is_nan())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// Unbiased (`n - 1`) standard deviation of the non-NaN values (TRL's `nanstd`); NaN below two
/// values, as torch gives.
pub fn nan_std(xs: &[f64]) -> f64 {
    let mean = nan_mean(xs);
    let vals: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if vals.len() < 2 {
        return f64::NAN;
    }
    let ss: f64 = vals.iter().map(|x| (x - mean).powi(2)).sum();
    (ss / (vals.len() - 1) as f64).sqrt()
}
