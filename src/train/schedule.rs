//! Learning-rate schedules as pure functions of the step: linear warm-up, then cosine decay,
//! linear decay or a constant. Being pure, a resumed run recomputes the same rate from the saved
//! step with no schedule state to checkpoint.

use serde::{Deserialize, Serialize};

/// What follows the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Half a cosine from the peak to `min_lr` at `total_steps` (HF `cosine`).
    #[default]
    Cosine,
    /// Straight line from the peak to `min_lr` at `total_steps` (HF `linear`).
    Linear,
    /// Stay at the peak.
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    #[serde(default)]
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate for update number `step` (0-based). Warm-up rises linearly as
    /// `peak·(step + 1)/warmup` — HF uses `step/warmup`, which wastes the first update at lr 0 —
    /// reaching the peak at `step = warmup - 1`; the decay then runs from `warmup` to `total_steps`
    /// and the rate stays at its end value afterwards.
    pub fn lr_at(&self, step: u64) -> f64 {
        let peak = self.peak_lr;
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_len = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_len == 0 {
            return match self.decay {
                Decay::Constant => peak,
                _ => self.min_lr,
            };
        }
        let progress = ((step - self.warmup_steps) as f64 / decay_len as f64).min(1.0);
        match self.decay {
            Decay::Constant => peak,
            Decay::Linear => self.min_lr + (peak - self.min_lr) * (1.0 - progress),
            Decay::Cosine => {
                self.min_lr
                    + (peak - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// Rejects schedules that cannot train (non-positive peak, min above peak, warm-up past the end).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.peak_lr > 0.0 && self.peak_lr.is_finite()) {
            return Err(format!(
                "learning rate must be positive, got {}\nhint: TRL uses 1e-6 for DPO, 1e-4 for reward models",
                self.peak_lr
            ));
        }
        if !(0.0..=self.peak_lr).contains(&self.min_lr) {
            return Err(format!(
                "min_lr {} must lie in [0, peak_lr = {}]",
                self.min_lr, self.peak_lr
            ));
        }
        if self.warmup_steps > self.total_steps {
            return Err(format!(
                "warm-up of {} steps is longer than the {} training steps\nhint: lower warmup_steps",
                self.warmup_steps, self.total_steps
            ));
        }
        Ok(())
    }
}
