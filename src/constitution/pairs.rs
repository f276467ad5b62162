//! The one home of constitution pairs: `<store.dir>/constitution.json`, the pairs of the last
//! `rlhf-bot constitution` with the fingerprints of the principles they were made with. A run
//! replaces the file whole (write beside, rename: `atomic_file`) and only when every prompt
//! succeeded, so a reader sees the previous run's pairs or the new run's, never a mix. The file it
//! replaces is kept as `constitution.previous.json`: the "before" of the report's constitution
//! diff. The dataset builder reads the current file (`dataset::build_from_store`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomically;
use crate::feedback::record::ChatMessage;

const CURRENT: &str = "constitution.json";
const PREVIOUS: &str = "constitution.previous.json";

/// The `source` constitution pairs carry in the dataset and the TRL export.
pub const SOURCE: &str = "ai_constitution";

/// One revision: `chosen` is the revised answer, `rejected` the policy's original.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiPair {
    /// The stored conversation the prompt came from (the split keeps it with its conversation).
    pub conversation_id: String,
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
    /// The id of the principle sampled for this prompt.
    pub principle: String,
}

/// What one `constitution` run wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConstitutionPairs {
    /// Every principle's fingerprint at the time of the run, by id.
    pub principles: BTreeMap<String, String>,
    /// `policy` or `judge`.
    pub critic: String,
    pub pairs: Vec<AiPair>,
}

pub fn current_path(store_dir: &Path) -> PathBuf {
    store_dir.join(CURRENT)
}

/// The pairs of the last run, if there was one.
pub fn read_current(store_dir: &Path) -> Result<Option<ConstitutionPairs>> {
    read(&store_dir.join(CURRENT))
}

/// The pairs of the run before the last, if there were two.
pub fn read_previous(store_dir: &Path) -> Result<Option<ConstitutionPairs>> {
    read(&store_dir.join(PREVIOUS))
}

fn read(path: &Path) -> Result<Option<ConstitutionPairs>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes).map(Some).with_context(|| {
        format!(
            "{} is not a constitution pairs file\nhint: delete it and run `rlhf-bot constitution` again",
            path.display()
        )
    })
}

/// Replaces the current pairs with `pairs`, keeping the replaced file as the previous one.
pub fn write(store_dir: &Path, pairs: &ConstitutionPairs) -> Result<()> {
    std::fs::create_dir_all(store_dir)
        .with_context(|| format!("creating {}", store_dir.display()))?;
    let current = store_dir.join(CURRENT);
    if current.is_file() {
        let old =
            std::fs::read(&current).with_context(|| format!("reading {}", current.display()))?;
        write_atomically(&store_dir.join(PREVIOUS), &old)?;
    }
    let mut bytes = serde_json::to_vec_pretty(pairs)?;
    bytes.push(b'\n');
    write_atomically(&current, &bytes)
}

/// What the last run changed against the run before it: for the report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConstitutionDiff {
    /// `"<id> changed"`, `"<id> added"`, `"<id> removed"` (see [`super::diff`]).
    pub changed: Vec<String>,
    /// Prompts whose pair used a changed or added principle, in the last run's order.
    pub examples: Vec<DiffExample>,
    /// How many prompts the change affected (`examples` holds at most the asked number).
    pub affected: usize,
}

/// One affected prompt: the answer before the change and after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffExample {
    pub principle: String,
    pub prompt: Vec<ChatMessage>,
    /// The previous run's revision of this prompt, else the policy's unrevised answer.
    pub before: String,
    pub after: String,
}

/// The diff between the last two runs kept beside the store (`None`: no run yet), with at
/// most `max_examples` examples.
pub fn diff_last_runs(store_dir: &Path, max_examples: usize) -> Result<Option<ConstitutionDiff>> {
    let Some(current) = read_current(store_dir)? else {
        return Ok(None);
    };
    let previous = read_previous(store_dir)?.unwrap_or_default();
    let changed = super::diff(&previous.principles, &current.principles);
    let touched = |id: &str| previous.principles.get(id) != current.principles.get(id);
    let affected: Vec<&AiPair> = current
        .pairs
        .iter()
        .filter(|p| touched(&p.principle))
        .collect();
    let examples = affected
        .iter()
        .take(max_examples)
        .map(|p| DiffExample {
            principle: p.principle.clone(),
            prompt: p.prompt.clone(),
            before: previous
                .pairs
                .iter()
                .find(|old| old.prompt == p.prompt)
                .map_or_else(|| p.rejected.clone(), |old| old.chosen.clone()),
            after: p.chosen.clone(),
        })
        .collect();
    Ok(Some(ConstitutionDiff {
        changed,
        examples,
        affected: affected.len(),
    }))
}
