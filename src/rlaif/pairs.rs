//! The one home of AI feedback: `<store.dir>/rlaif.json`, what the last `rlhf-bot rlaif` run
//! decided (the judge's agreement with people, whether AI labels are on, the counts) and the
//! pairs it kept. A run replaces the file whole (write beside, rename: `atomic_file`) and only
//! when every judgement succeeded, so a reader sees the previous run or the new one, never a
//! mix. The dataset builder reads the pairs (`dataset::build_from_store`) only when the labels
//! are on; the report and the registry lineage read the counts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomically;
use crate::feedback::record::ChatMessage;
use crate::stats::Interval;

const CURRENT: &str = "rlaif.json";

/// The `source` AI-labelled pairs carry in the dataset and the TRL export.
pub const SOURCE: &str = "ai_feedback";

/// Whether the run's AI labels may train, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelsState {
    /// The agreement interval's lower bound reached `rlaif.min_agreement`.
    On,
    /// The lower bound is below the floor: AI labels are off for the run.
    OffBelowFloor,
    /// No pair people labelled was judged consistently, so agreement is unknown: off.
    OffUnvalidated,
    /// Agreement unknown, used anyway because `rlaif.allow_unvalidated` says so.
    OnUnvalidated,
}

impl LabelsState {
    pub fn is_on(self) -> bool {
        matches!(self, LabelsState::On | LabelsState::OnUnvalidated)
    }
}

/// The judge against people, on pairs they labelled.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgreementCounts {
    /// Pairs people labelled that could be judged.
    pub available: u64,
    /// Judged in both orders (at most the cap's share).
    pub judged: u64,
    /// Both orders picked the same answer.
    pub consistent: u64,
    /// ... and it was the answer people preferred.
    pub agreeing: u64,
    /// `agreeing / consistent` with its 95% Wilson interval (absent when nothing was consistent).
    pub interval: Option<Interval>,
}

/// The pairs without a human preference.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelCounts {
    pub available: u64,
    /// Judged in both orders (none when the labels are off).
    pub judged: u64,
    /// The orders disagreed: dropped.
    pub inconsistent: u64,
    /// Both orders agreed: kept as pairs.
    pub kept: u64,
    /// Left unjudged by `rlaif.max_pairs`.
    pub over_cap: u64,
}

/// One AI-labelled pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiFeedbackPair {
    pub conversation_id: String,
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
    pub chosen_id: String,
    pub rejected_id: String,
}

/// What one `rlaif` run decided and kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiFeedback {
    #[serde(flatten)]
    pub summary: AiFeedbackSummary,
    pub pairs: Vec<AiFeedbackPair>,
}

/// What one `rlaif` run decided, in numbers only (no user text): what the report and the
/// registry see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiFeedbackSummary {
    /// The endpoint's URL or the local checkpoint (never a key).
    pub judge: String,
    pub state: LabelsState,
    /// `rlaif.min_agreement` at the time of the run.
    pub min_agreement: f64,
    pub agreement: AgreementCounts,
    pub labels: LabelCounts,
}

impl AiFeedbackSummary {
    /// The counts the registry records with a trained model (`ai_feedback_*`).
    pub fn lineage_counts(&self) -> [(&'static str, u64); 6] {
        [
            ("ai_feedback_validation_judged", self.agreement.judged),
            (
                "ai_feedback_validation_consistent",
                self.agreement.consistent,
            ),
            ("ai_feedback_validation_agreeing", self.agreement.agreeing),
            ("ai_feedback_judged", self.labels.judged),
            ("ai_feedback_inconsistent", self.labels.inconsistent),
            (
                "ai_feedback_kept",
                if self.state.is_on() {
                    self.labels.kept
                } else {
                    0
                },
            ),
        ]
    }
}

pub fn current_path(store_dir: &Path) -> PathBuf {
    store_dir.join(CURRENT)
}

/// What the last run wrote, if there was one.
pub fn read_current(store_dir: &Path) -> Result<Option<AiFeedback>> {
    let path = current_path(store_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes).map(Some).with_context(|| {
        format!(
            "{} is not an AI feedback file\nhint: delete it and run `rlhf-bot rlaif` again",
            path.display()
        )
    })
}

/// Replaces the last run's file with `feedback`, or writes it to `file` when given (review).
pub fn write(store_dir: &Path, feedback: &AiFeedback, file: Option<&Path>) -> Result<PathBuf> {
    let target = match file {
        Some(f) => f.to_path_buf(),
        None => {
            std::fs::create_dir_all(store_dir)
                .with_context(|| format!("creating {}", store_dir.display()))?;
            current_path(store_dir)
        }
    };
    let mut bytes = serde_json::to_vec_pretty(feedback)?;
    bytes.push(b'\n');
    write_atomically(&target, &bytes)?;
    Ok(target)
}
