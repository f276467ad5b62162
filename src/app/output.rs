//! What commands print on stdout: compact text for people, one JSON document for machines.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::check::{CheckOutcome, summary_markdown};
use crate::cli::Format;
use crate::config::Settings;
use crate::feedback::pull::PullSummary;

pub fn json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as JSON, or `text` for people.
pub fn json_or_text<T: Serialize>(format: Format, value: &T, text: &str) -> Result<()> {
    match format {
        Format::Json => json(value),
        Format::Text => {
            println!("{text}");
            Ok(())
        }
    }
}

pub fn config_check(path: &Path, settings: &Settings, format: Format) -> Result<()> {
    match format {
        Format::Json => {
            json(&serde_json::json!({"config": path, "valid": true, "settings": settings}))
        }
        Format::Text => {
            println!("{}: valid", path.display());
            // The settings hold variable names, never secret values, so they print as they are.
            print!("{}", serde_norway::to_string(settings)?);
            Ok(())
        }
    }
}

pub fn pull_summary(s: &PullSummary, format: Format) -> Result<()> {
    match format {
        Format::Json => json(s),
        Format::Text => {
            println!(
                "pulled from {}: fetched {}, inserted {}, updated {}, deleted {}, unchanged {}, quarantined {} \
                 in {} pages ({} retries, {:.2}s); watermark {}{}",
                s.source,
                s.fetched,
                s.inserted,
                s.updated,
                s.deleted,
                s.unchanged,
                s.quarantined,
                s.pages,
                s.retries,
                s.seconds,
                s.watermark.as_deref().unwrap_or("none"),
                if s.resumed {
                    " (resumed an interrupted pull)"
                } else {
                    ""
                }
            );
            Ok(())
        }
    }
}

pub fn check_outcome(outcome: &CheckOutcome, format: Format) -> Result<()> {
    match format {
        Format::Json => json(outcome),
        Format::Text => {
            println!("{}", summary_markdown(outcome));
            println!(
                "last training: {} · production policy: {} (from the {})",
                outcome.last_training_at.as_deref().unwrap_or("none"),
                outcome.production_version.as_deref().unwrap_or("none"),
                outcome.history_source
            );
            println!(
                "decision: retrain={} (reasons: {})",
                outcome.retrain, outcome.reasons
            );
            Ok(())
        }
    }
}

/// The closing lines of a text `run` that trained: where the report, the pull request and the
/// registry update are, so a newcomer knows what to open next.
pub fn where_to_look(run: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let publish = &run["publish"];
    let pr = match publish["local_dir"].as_str() {
        Some(dir) => format!(
            "{dir}/ (body.md: the description, with sample answers; files/: what the commit adds)"
        ),
        None => publish["pr_url"]
            .as_str()
            .map_or_else(|| text(&publish["branch"]), str::to_string),
    };
    format!(
        "where to look:\n  report        {} (plots and metrics.json beside it)\n  pull request  {pr}\n  registry      {}\n",
        text(&run["report"]),
        text(&run["registry"]),
    )
}
