//! `rlhf-bot rlaif`: the store's regenerations (`dataset::regeneration_candidates`), judged in
//! both orders by the judge of `rlaif.judge` (`app::judge`: an endpoint or a local checkpoint),
//! first on pairs people labelled (the agreement check), then, when that passes, on pairs they
//! did not (`rlaif::label`). All or nothing: the result is written once, atomically, after every
//! judgement succeeded (`rlaif::pairs`); a failure leaves the previous file as it was.

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;

use super::judge::JudgeHandle;
use crate::config::Settings;
use crate::dataset::{answers_from_store, regeneration_candidates};
use crate::feedback::Store;
use crate::rlaif::pairs::{self, AiFeedbackSummary};
use crate::rlaif::{JUDGE_SECTION, label, state_sentence};

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RlaifSummary {
    #[serde(flatten)]
    pub result: AiFeedbackSummary,
    pub written: PathBuf,
}

impl std::fmt::Display for RlaifSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.result;
        writeln!(
            f,
            "rlaif: {}",
            state_sentence(r.state, r.min_agreement, &r.agreement)
        )?;
        write!(
            f,
            "rlaif: {} pairs without a human preference, {} judged, {} inconsistent (dropped), {} kept, {} over the cap; written to {}",
            r.labels.available,
            r.labels.judged,
            r.labels.inconsistent,
            r.labels.kept,
            r.labels.over_cap,
            self.written.display()
        )
    }
}

pub async fn rlaif_cmd(
    settings: &Settings,
    max_pairs: Option<usize>,
    out: Option<PathBuf>,
) -> Result<RlaifSummary> {
    let rs = &settings.rlaif;
    if !rs.enabled {
        bail!(
            "AI feedback is off\nhint: set `rlaif.enabled: true` and `rlaif.judge` in the config (docs/rlaif.md)"
        );
    }
    let Some(source) = &rs.judge else {
        bail!("`rlaif.enabled: true` needs a judge\nhint: set `rlaif.judge`");
    };
    // The judge (its key, its model) is checked before the store is read.
    let handle = JudgeHandle::open(
        source,
        JUDGE_SECTION,
        &settings.store.dir.join("rlaif-judge-model"),
    )
    .await?;
    let store = Store::open(&settings.store.dir)?;
    let answers = answers_from_store(&store, &settings.dataset)?;
    let candidates = regeneration_candidates(&answers, &settings.dataset);
    let judge = handle.judge(JUDGE_SECTION);
    let result = label(&candidates, rs, max_pairs.unwrap_or(rs.max_pairs), &judge).await?;
    let written = pairs::write(&settings.store.dir, &result, out.as_deref())?;
    Ok(RlaifSummary {
        result: result.summary,
        written,
    })
}
