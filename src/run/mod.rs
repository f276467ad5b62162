//! One run of the bot: where its outputs live (`<store>/runs/<run id>/`), how a run id is made,
//! and which run is the newest. [`outputs`] is the contract for what a run directory holds.

pub mod outputs;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::Utc;

/// The directory of one run's outputs, under the store directory (`store.dir`).
pub fn run_dir(store_dir: &Path, run_id: &str) -> PathBuf {
    store_dir.join("runs").join(run_id)
}

/// A run id: the Actions run id when there is one (reruns of a workflow run share it, so the
/// publisher updates the same PR), else a UTC timestamp.
pub fn new_run_id() -> String {
    match std::env::var("GITHUB_RUN_ID") {
        Ok(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()) => format!("gh-{id}"),
        _ => Utc::now().format("%Y%m%d-%H%M%S").to_string(),
    }
}

/// The newest run directory, for `report` / `publish` without `--run`.
pub fn latest_run(store_dir: &Path) -> Result<String> {
    let root = store_dir.join("runs");
    let mut runs: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&root)
        .with_context(|| {
            format!(
                "no runs under {}\nhint: run `rlhf-bot run` or `rlhf-bot train reward` first",
                root.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            Some((
                e.metadata().ok()?.modified().ok()?,
                e.file_name().to_string_lossy().into_owned(),
            ))
        })
        .collect();
    runs.sort();
    runs.pop()
        .map(|(_, id)| id)
        .with_context(|| format!("no runs under {}", root.display()))
}
