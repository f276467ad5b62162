//! Direct Preference Optimisation losses over sequence log-probs (TRL `DPOTrainer`): the sigmoid
//! loss with β, conservative DPO (label smoothing ε), and IPO; implicit rewards and TRL's metrics.
//!
//! Inputs are `[B]` sequence log-probs of the chosen and rejected answers under the policy (with a
//! graph) and the frozen reference (detached here, whatever the caller passes). For IPO, TRL
//! feeds *length-averaged* log-probs (see `logits_reference::sequence_logprobs_mean`).

use candle_core::{DType, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::stats::{log_sigmoid, scalar_f64};

/// Which DPO objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// `-(1-ε)·logσ(β·z) - ε·logσ(-β·z)` (ε = 0: the original DPO loss).
    #[default]
    Sigmoid,
    /// `(z - 1/(2β))²` (Azar et al. 2023).
    Ipo,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    pub beta: f64,
    pub label_smoothing: f64,
    pub loss_type: DpoLossType,
}

impl Default for DpoConfig {
    fn default() -> Self {
        // TRL defaults (GUIDE §5).
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            loss_type: DpoLossType::Sigmoid,
        }
    }
}

impl DpoConfig {
    /// Rejects values the formulas cannot use.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!(
                "dpo beta must be positive, got {}\nhint: TRL's default is 0.1",
                self.beta
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "dpo label_smoothing must be in [0, 0.5), got {}\nhint: use 0 for plain DPO",
                self.label_smoothing
            ));
        }
        if self.loss_type == DpoLossType::Ipo && self.label_smoothing != 0.0 {
            return Err(
                "label_smoothing applies to the sigmoid loss only\nhint: set it to 0 for IPO"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The loss and the per-example tensors it came from.
#[derive(Debug, Clone)]
pub struct DpoOutput {
    /// Mean over the batch (0-d), with a graph to the policy log-probs.
    pub loss: Tensor,
    /// `[B]` per-pair losses.
    pub per_example: Tensor,
    /// `β·(π_c - ref_c)`, detached.
    pub chosen_rewards: Tensor,
    /// `β·(π_r - ref_r)`, detached.
    pub rejected_rewards: Tensor,
}

/// DPO / cDPO / IPO loss from `[B]` sequence log-probs.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    cfg: &DpoConfig,
) -> Result<DpoOutput> {
    if let Err(e) = cfg.validate() {
        bail!("{e}");
    }
    let n = policy_chosen.dims();
    for (name, t) in [
        ("policy_rejected", policy_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
    ] {
        if t.dims() != n {
            bail!(
                "{name} log-probs have shape {:?} but policy_chosen {:?}",
                t.dims(),
                n
            );
        }
    }
    let dt = policy_chosen.dtype();
    let ref_c = ref_chosen.detach().to_dtype(dt)?;
    let ref_r = ref_rejected.detach().to_dtype(dt)?;
    let chosen_ratio = (policy_chosen - &ref_c)?;
    let rejected_ratio = (policy_rejected - &ref_r)?;
    let z = (&chosen_ratio - &rejected_ratio)?;
    let per_example = match cfg.loss_type {
        DpoLossType::Sigmoid => {
            let bz = z.affine(cfg.beta, 0.0)?;
            let ls = cfg.label_smoothing;
            let main = log_sigmoid(&bz)?.affine(-(1.0 - ls), 0.0)?;
            if ls == 0.0 {
                main
            } else {
                (main + log_sigmoid(&bz.neg()?)?.affine(-ls, 0.0)?)?
            }
        }
        DpoLossType::Ipo => z.affine(1.0, -1.0 / (2.0 * cfg.beta))?.sqr()?,
    };
    Ok(DpoOutput {
        loss: per_example.mean_all()?,
        chosen_rewards: chosen_ratio.detach().affine(cfg.beta, 0.0)?,
        rejected_rewards: rejected_ratio.detach().affine(cfg.beta, 0.0)?,
        per_example,
    })
}

/// TRL's DPO metrics (batch means).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl DpoMetrics {
    /// Computes the metrics from a loss output and the policy log-probs.
    pub fn compute(
        out: &DpoOutput,
        policy_chosen: &Tensor,
        policy_rejected: &Tensor,
    ) -> Result<Self> {
        let c = &out.chosen_rewards;
        let r = &out.rejected_rewards;
        let mean = |t: &Tensor| -> Result<f64> {
            scalar_f64(&t.detach().to_dtype(DType::F64)?.mean_all()?)
        };
        Ok(Self {
            rewards_chosen: mean(c)?,
            rewards_rejected: mean(r)?,
            rewards_accuracies: mean(&c.gt(r)?)?,
            rewards_margins: mean(&(c - r)?)?,
            logps_chosen: mean(policy_chosen)?,
            logps_rejected: mean(policy_rejected)?,
        })
    }

    /// `(name, value)` pairs with TRL's metric names.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}
