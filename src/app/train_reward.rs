//! The `train reward` stage for the CLI: runs [`crate::train::reward_run`] on a blocking thread
//! (training is CPU-bound and must not stall the async runtime). Wire it with
//! `pub mod train_reward;` in `app/mod.rs`.

use anyhow::{Context, Result};

pub use crate::train::reward_run::{RewardRunSummary, RewardTrainOptions, train_reward_blocking};

/// Trains a reward model as `opts` says and writes the run directory.
pub async fn train_reward(opts: RewardTrainOptions) -> Result<RewardRunSummary> {
    tokio::task::spawn_blocking(move || train_reward_blocking(&opts))
        .await
        .context("the reward training thread panicked")?
}
