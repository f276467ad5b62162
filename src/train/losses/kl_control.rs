//! KL-penalty coefficient controllers for PPO (TRL `AdaptiveKLController` / `FixedKLController`).
//!
//! The adaptive one nudges β towards a target KL with a proportional step clipped to ±20 %:
//! `e = clip(KL/target - 1, ±0.2); β ← β·(1 + e·n_steps/horizon)`. Both are plain serialisable
//! state so a checkpoint can carry them and a resumed run continues with the same β.

use serde::{Deserialize, Serialize};

/// A β for the per-token KL penalty, possibly adapted after each batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KlController {
    Fixed {
        value: f64,
    },
    Adaptive {
        value: f64,
        target: f64,
        horizon: f64,
    },
}

impl KlController {
    /// A constant β.
    pub fn fixed(value: f64) -> Self {
        Self::Fixed { value }
    }

    /// TRL's legacy defaults are `adaptive(0.2, 6.0, 10000.0)`.
    pub fn adaptive(init: f64, target: f64, horizon: f64) -> Self {
        Self::Adaptive {
            value: init,
            target,
            horizon,
        }
    }

    /// The current β.
    pub fn value(&self) -> f64 {
        match self {
            Self::Fixed { value } | Self::Adaptive { value, .. } => *value,
        }
    }

    /// Feeds the KL measured on the last batch of `n_steps` samples; a no-op for `Fixed`.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if let Self::Adaptive {
            value,
            target,
            horizon,
        } = self
        {
            let e = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            *value *= 1.0 + e * n_steps as f64 / *horizon;
        }
    }
}
