//! Kahneman–Tversky Optimisation (TRL `KTOTrainer`, `loss_type = "kto"`): learns from unpaired
//! thumbs up / down, which is most of the feedback we collect.
//!
//! The reference point is the batch KL estimate
//! `kl = clamp(mean(π_KL - ref_KL), min 0)`, detached, where the `_KL` log-probs are computed on
//! mismatched (prompt, completion) pairs. Then, with `ρ_x = π(x) - ref(x)`:
//! desirable `λ_D·(1 - σ(β(ρ - kl)))`, undesirable `λ_U·(1 - σ(β(kl - ρ)))`, and the loss is the
//! mean over all examples of the batch (desirable and undesirable concatenated).

use candle_core::{DType, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::stats::{scalar_f64, sigmoid};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KtoConfig {
    pub beta: f64,
    /// λ_D, weight of desirable examples.
    pub desirable_weight: f64,
    /// λ_U, weight of undesirable examples.
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// Loss, detached rewards and the reference point used.
#[derive(Debug, Clone)]
pub struct KtoOutput {
    /// Mean of all per-example losses (0-d).
    pub loss: Tensor,
    /// `[n_desirable + n_undesirable]` weighted per-example losses, desirable first.
    pub per_example: Tensor,
    /// `β·ρ` of desirable examples, detached (`[n_desirable]`, possibly empty).
    pub chosen_rewards: Tensor,
    /// `β·ρ` of undesirable examples, detached.
    pub rejected_rewards: Tensor,
    /// The clamped KL reference point.
    pub kl: f64,
}

/// KTO loss. `policy_desirable`/`ref_desirable` are `[n_d]`, `policy_undesirable`/
/// `ref_undesirable` are `[n_u]` (either may be empty, not both), `policy_kl`/`ref_kl` are the
/// mismatched-pair log-probs `[n_kl]`.
#[allow(clippy::too_many_arguments)]
pub fn kto_loss(
    policy_desirable: &Tensor,
    ref_desirable: &Tensor,
    policy_undesirable: &Tensor,
    ref_undesirable: &Tensor,
    policy_kl: &Tensor,
    ref_kl: &Tensor,
    cfg: &KtoConfig,
) -> Result<KtoOutput> {
    if cfg.beta.is_nan() || cfg.beta <= 0.0 {
        bail!(
            "kto beta must be positive, got {}\nhint: TRL's default is 0.1",
            cfg.beta
        );
    }
    let dt = policy_desirable.dtype();
    let nd = policy_desirable.elem_count();
    let nu = policy_undesirable.elem_count();
    if nd + nu == 0 {
        bail!("kto batch has no desirable and no undesirable examples");
    }
    if ref_desirable.elem_count() != nd || ref_undesirable.elem_count() != nu {
        bail!(
            "kto reference log-probs ({} desirable, {} undesirable) do not match the policy's ({nd}, {nu})",
            ref_desirable.elem_count(),
            ref_undesirable.elem_count()
        );
    }
    let kl_t =
        (policy_kl.detach().to_dtype(DType::F64)? - ref_kl.detach().to_dtype(DType::F64)?)?;
    let kl = if kl_t.elem_count() == 0 {
        0.0
    } else {
        scalar_f64(&kl_t.mean_all()?)?.max(0.0)
    };

    let mut parts = Vec::with_capacity(2);
    let d_ratio = (policy_desirable - ref_desirable.detach().to_dtype(dt)?)?;
    let u_ratio = (policy_undesirable.to_dtype(dt)? - ref_undesirable.detach().to_dtype(dt)?)?;
    if nd > 0 {
        // 1 - σ(β(ρ - kl)), times λ_D
        let s = sigmoid(&d_ratio.affine(cfg.beta, -cfg.beta * kl)?)?;
        parts.push(s.affine(-cfg.desirable_weight, cfg.desirable_weight)?);
    }
    if nu > 0 {
        let s = sigmoid(&u_ratio.affine(-cfg.beta, cfg.beta * kl)?)?;
        parts.push(s.affine(-cfg.undesirable_weight, cfg.undesirable_weight)?);
    }
    let per_example = Tensor::cat(&parts, 0)?;
    Ok(KtoOutput {
        loss: per_example.mean_all()?,
        per_example,
        chosen_rewards: d_ratio.detach().affine(cfg.beta, 0.0)?,
        rejected_rewards: u_ratio.detach().affine(cfg.beta, 0.0)?,
        kl,
    })
}
