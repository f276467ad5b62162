//! `check`: gathers the store's statistics and the last training, runs the pure decision, and
//! (inside GitHub Actions) writes `retrain` / `reasons` outputs and a step-summary table.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Settings;
use crate::dataset::audit::burst::{held_counts, subtract};
use crate::decision::{Decision, DecisionInput, QualityWindows, decide, window_start};
use crate::feedback::Store;
use crate::feedback::record::format_time;
use crate::feedback::store::{LastTraining, VersionCounts};
use crate::forge::actions::ActionsEnv;
use crate::kpi::{VersionKpis, all_kpis};
use crate::registry::{ModelKind, Registry};
use crate::report::neutralize::{code, inline};

#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    pub retrain: bool,
    pub reasons: String,
    pub decision: Decision,
    pub new_feedback: u64,
    pub new_signals: u64,
    pub last_training_at: Option<String>,
    pub production_version: Option<String>,
    /// Where the training history came from: `registry` (the team's registry file) or `store`
    /// (the store's own record of `run`, used when the registry names no model yet).
    pub history_source: &'static str,
    pub kpis: Vec<VersionKpis>,
    /// Flagged feedback bursts still held out of the quality trigger (ids only).
    pub held_bursts: Vec<String>,
    pub now: String,
}

/// "Now", overridable with `RLHF_BOT_NOW` (RFC 3339) so a past decision can be replayed exactly.
pub fn now() -> Result<DateTime<Utc>> {
    match std::env::var("RLHF_BOT_NOW") {
        Ok(text) => Ok(DateTime::parse_from_rfc3339(&text)
            .with_context(|| format!("RLHF_BOT_NOW={text:?} is not an RFC 3339 timestamp"))?
            .with_timezone(&Utc)),
        Err(_) => Ok(Utc::now()),
    }
}

pub fn check(settings: &Settings, force: bool) -> Result<CheckOutcome> {
    let store = Store::open(&settings.store.dir)?;
    let now = now()?;
    let (last, history_source) = training_history(settings, &store)?;
    let (new_feedback, new_signals) = store.new_since(
        last.as_ref().and_then(|l| l.watermark),
        &settings.feedback.aspects,
    )?;
    // Flagged feedback bursts are held out of the quality trigger until a person clears them.
    let bursts = if settings.audit.enabled {
        crate::dataset::audit::bursts_in_store(&store, &settings.audit)?
    } else {
        Vec::new()
    };
    let held = bursts.iter().filter(|b| !b.cleared).count();
    if held > 0 {
        tracing::info!(
            bursts = held,
            "flagged feedback bursts held out of the quality trigger until cleared (audit.cleared_bursts)"
        );
    }
    let quality = match last
        .as_ref()
        .and_then(|l| l.production_version.clone().map(|v| (v, l.promoted_at)))
    {
        None => None,
        Some((version, promoted_at)) => {
            let start = window_start(now, settings.thresholds.quality.window_days);
            let pick = |rows: Vec<VersionCounts>| {
                rows.into_iter()
                    .find(|c| c.model_version == version)
                    .unwrap_or_else(|| VersionCounts {
                        model_version: version.clone(),
                        ..Default::default()
                    })
            };
            let held_base = held_counts(&bursts, &version, promoted_at, Some(start));
            let held_recent = held_counts(&bursts, &version, Some(start), None);
            Some(QualityWindows {
                baseline: subtract(
                    &pick(store.version_counts(promoted_at, Some(start))?),
                    &held_base,
                ),
                recent: subtract(
                    &pick(store.version_counts(Some(start), None)?),
                    &held_recent,
                ),
                held_out: held_base.records + held_recent.records,
                production_version: version.clone(),
            })
        }
    };
    let input = DecisionInput {
        now,
        new_feedback,
        new_signals,
        last_training_at: last.as_ref().map(|l| l.at),
        quality,
        force,
        rejected_same_data: crate::proposals::Proposals::load(&store)?
            .rejected_same(store.watermark()?, &settings.config_sha256)
            .map(|p| {
                format!(
                    "pull request #{} ({})",
                    p.pr_number.unwrap_or_default(),
                    p.models.join(", ")
                )
            }),
        principles: crate::constitution::principle_changes(&store, &settings.constitution)?,
    };
    let decision = decide(&input, &settings.thresholds);
    let kpis = all_kpis(
        &store.version_counts(None, None)?,
        settings.thresholds.quality.confidence,
    );
    Ok(CheckOutcome {
        retrain: decision.retrain,
        reasons: decision.reasons(),
        new_feedback,
        new_signals,
        last_training_at: last.as_ref().map(|l| format_time(l.at)),
        production_version: last.and_then(|l| l.production_version),
        history_source,
        kpis,
        held_bursts: bursts
            .iter()
            .filter(|b| !b.cleared)
            .map(|b| b.id.clone())
            .collect(),
        now: format_time(now),
        decision,
    })
}

/// The last training and the production version. The production version comes from the
/// registry (merging the bot's PR is what changes it). The last training is the newer of the
/// registry's newest entry and the store's own record of `run`: a run whose pull request is still
/// under review (or was rejected) is in the store only, and it must still count as a training,
/// or every scheduled run would retrain and supersede the PR under review.
fn training_history(
    settings: &Settings,
    store: &Store,
) -> Result<(Option<LastTraining>, &'static str)> {
    let registry = Registry::load_or_default(&settings.registry.path).with_context(|| {
        format!(
            "reading the model registry {} (registry.path)",
            settings.registry.path.display()
        )
    })?;
    let production = registry.production(ModelKind::Policy).map(|m| m.id.clone());
    let newest = [ModelKind::Reward, ModelKind::Policy]
        .into_iter()
        .filter_map(|kind| registry.last_training(kind))
        .max_by_key(|(id, at, _)| (*at, *id));
    let from_registry = match newest {
        None => None,
        Some((_, at, snapshot)) => Some(LastTraining {
            at,
            watermark: registry_watermark(settings, &snapshot.watermark)?,
            production_version: production.clone(),
            // A version's feedback only exists once it is deployed, so all of its feedback
            // before the recent window is its baseline: no promotion time is needed.
            promoted_at: None,
        }),
    };
    let from_store = store.last_training()?.map(|mut l| {
        l.production_version = production.clone().or(l.production_version);
        if production.is_some() {
            l.promoted_at = None;
        }
        l
    });
    Ok(match (from_registry, from_store) {
        (Some(r), Some(s)) if s.at > r.at => (Some(s), "store"),
        (Some(r), _) => (Some(r), "registry"),
        (None, s) => (s, "store"),
    })
}

fn registry_watermark(settings: &Settings, text: &str) -> Result<Option<DateTime<Utc>>> {
    match text.trim() {
        "" => Ok(None),
        text => Ok(Some(
            DateTime::parse_from_rfc3339(text)
                .with_context(|| {
                    format!(
                        "the registry {} holds feedback watermark {text:?}, not an RFC 3339 time\nhint: fix `feedback.watermark` of its newest entry",
                        settings.registry.path.display()
                    )
                })?
                .with_timezone(&Utc),
        )),
    }
}

/// Writes the outcome to the Actions outputs and step summary (no-op outside Actions).
pub fn publish_to_actions(outcome: &CheckOutcome) -> Result<()> {
    let env = ActionsEnv::from_env();
    env.set_output("retrain", if outcome.retrain { "true" } else { "false" })?;
    env.set_output("reasons", &outcome.reasons)?;
    env.append_summary(&summary_markdown(outcome))
}

/// The decision as Markdown. Model versions come from feedback records (and the quality trigger's
/// detail names one), so they are escaped like the report escapes them.
pub fn summary_markdown(outcome: &CheckOutcome) -> String {
    let mut md = format!(
        "### rlhf-bot check: {}\n\n| trigger | fired | numbers |\n|---|---|---|\n",
        if outcome.retrain {
            "retrain"
        } else {
            "no retraining needed"
        }
    );
    for t in &outcome.decision.triggers {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            t.name,
            if t.fired { "yes" } else { "no" },
            inline(&t.detail, 500)
        ));
    }
    md.push_str("\n| model version | feedback | positive rate (95% CI) | mean rating (95% CI) |\n|---|---|---|---|\n");
    for k in &outcome.kpis {
        let rate = k.positive_rate.map_or("–".into(), |i| {
            format!(
                "{:.1}% ({:.1}–{:.1}), n={}",
                100.0 * i.estimate,
                100.0 * i.low,
                100.0 * i.high,
                k.thumbs
            )
        });
        let rating = k.mean_rating.map_or("–".into(), |i| {
            format!(
                "{:.2} ({:.2}–{:.2}), n={}",
                i.estimate, i.low, i.high, k.ratings
            )
        });
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            code(&k.model_version),
            k.count,
            rate,
            rating
        ));
    }
    md
}
