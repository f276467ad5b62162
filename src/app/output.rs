//! What commands print on stdout: compact text for people, one JSON document for machines.
//! Both can carry untrusted text (model versions, ids, paths from feedback), so text goes out
//! through [`sanitize::terminal_block`] and JSON through [`sanitize::json_text`].

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::check::{CheckOutcome, summary_markdown};
use crate::cli::Format;
use crate::config::Settings;
use crate::feedback::pull::PullSummary;
use crate::sanitize::{self, terminal_line};

pub fn json<T: Serialize>(value: &T) -> Result<()> {
    println!(
        "{}",
        sanitize::json_text(&serde_json::to_string_pretty(value)?)
    );
    Ok(())
}

/// Prints text for people, neutralised.
pub fn text(text: &str) {
    println!("{}", sanitize::terminal_block(text));
}

/// Prints `value` as JSON, or `text` for people.
pub fn json_or_text<T: Serialize>(format: Format, value: &T, text: &str) -> Result<()> {
    match format {
        Format::Json => json(value),
        Format::Text => {
            self::text(text);
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
            // The settings hold variable names, never secret values, and URLs with credentials
            // are refused when the config is validated.
            text(&format!(
                "{}: valid\n{}",
                path.display(),
                serde_norway::to_string(settings)?.trim_end()
            ));
            Ok(())
        }
    }
}

pub fn pull_summary(s: &PullSummary, format: Format) -> Result<()> {
    match format {
        Format::Json => json(s),
        Format::Text => {
            text(&format!(
                "pulled from {}: fetched {}, inserted {}, updated {}, deleted {}, unchanged {}, quarantined {} \
                 in {} pages ({} retries, {:.2}s); watermark {}{}",
                terminal_line(&s.source),
                s.fetched,
                s.inserted,
                s.updated,
                s.deleted,
                s.unchanged,
                s.quarantined,
                s.pages,
                s.retries,
                s.seconds,
                terminal_line(s.watermark.as_deref().unwrap_or("none")),
                if s.resumed {
                    " (resumed an interrupted pull)"
                } else {
                    ""
                }
            ));
            Ok(())
        }
    }
}

pub fn check_outcome(outcome: &CheckOutcome, format: Format) -> Result<()> {
    match format {
        Format::Json => json(outcome),
        Format::Text => {
            text(&summary_markdown(outcome));
            text(&format!(
                "last training: {} · production policy: {} (from the {})",
                outcome.last_training_at.as_deref().unwrap_or("none"),
                terminal_line(outcome.production_version.as_deref().unwrap_or("none")),
                outcome.history_source
            ));
            text(&format!(
                "decision: retrain={} (reasons: {})",
                outcome.retrain, outcome.reasons
            ));
            Ok(())
        }
    }
}
