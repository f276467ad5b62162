//! Stops a training run at the first non-finite loss or gradient, naming the step and the
//! parameter, instead of letting NaNs spread into the weights and then into a checkpoint that a
//! pull request would promote; and the rails a policy run stops at (a non-finite logged value,
//! the KL ceiling).

use candle_core::Tensor;
use candle_core::Var;
use candle_core::backprop::GradStore;

use super::optim::first_non_finite_grad;
use crate::run::outputs::LogLine;

/// Why a step was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GuardError {
    #[error(
        "loss is {value} at step {step}\nhint: lower the learning rate, enable gradient clipping, or check the batch for empty completions"
    )]
    NonFiniteLoss { step: u64, value: f64 },
    #[error(
        "gradient of parameter {param} is not finite at step {step}\nhint: lower the learning rate or set max_grad_norm"
    )]
    NonFiniteGradient { step: u64, param: String },
    #[error("could not inspect the step's tensors: {0}")]
    Tensor(String),
}

/// Reads a 0-d (or one-element) loss and fails if it is NaN or infinite; returns its value.
pub fn check_loss(step: u64, loss: &Tensor) -> Result<f64, GuardError> {
    let value =
        super::losses::stats::scalar_f64(loss).map_err(|e| GuardError::Tensor(e.to_string()))?;
    check_loss_value(step, value)
}

/// The same for a loss already read as `f64`.
pub fn check_loss_value(step: u64, value: f64) -> Result<f64, GuardError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(GuardError::NonFiniteLoss { step, value })
    }
}

/// Fails with the first parameter (in `params` order) whose gradient is not finite.
pub fn check_grads(
    step: u64,
    grads: &GradStore,
    params: &[(&str, &Var)],
) -> Result<(), GuardError> {
    match first_non_finite_grad(grads, params) {
        Ok(None) => Ok(()),
        Ok(Some(param)) => Err(GuardError::NonFiniteGradient { step, param }),
        Err(e) => Err(GuardError::Tensor(e.to_string())),
    }
}

/// Why a run stopped on its own.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RailError {
    #[error(
        "KL to the reference is {kl:.3} nats at step {step}, above the ceiling {ceiling}\nhint: lower the learning rate, raise beta / kl_coef, or raise kl_ceiling if the drift is intended"
    )]
    KlCeiling { step: u64, kl: f64, ceiling: f64 },
    #[error(
        "{what} is not finite ({value}) at step {step}\nhint: lower the learning rate or set max_grad_norm"
    )]
    NonFinite { step: u64, what: String, value: f64 },
}

/// Fails on the first non-finite value of a log line.
pub fn check_finite(line: &LogLine) -> Result<(), RailError> {
    match line.values.iter().find(|(_, v)| !v.is_finite()) {
        Some((k, v)) => Err(RailError::NonFinite {
            step: line.step,
            what: k.clone(),
            value: *v,
        }),
        None => Ok(()),
    }
}

pub fn check_kl(step: u64, kl: f64, ceiling: f64) -> Result<(), RailError> {
    if !kl.is_finite() {
        return Err(RailError::NonFinite {
            step,
            what: "kl".into(),
            value: kl,
        });
    }
    if kl > ceiling {
        return Err(RailError::KlCeiling { step, kl, ceiling });
    }
    Ok(())
}
