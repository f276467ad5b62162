//! Validated settings: what the program runs on. Built from [`super::raw::RawConfig`] by
//! [`validate`], which fills defaults and checks what a single field cannot (an http source
//! needs a URL, a file source a path). Types here cannot hold bad values.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Invalid;
use super::raw::{RawConfig, SourceKind};

pub const DEFAULT_STORE_DIR: &str = ".rlhf";
pub const DEFAULT_TOKEN_ENV: &str = "FEEDBACK_API_TOKEN";

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub feedback: FeedbackSettings,
    pub store: StoreSettings,
    pub thresholds: Thresholds,
    /// sha256 of the config text: lineage for the registry and reports.
    pub config_sha256: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum SourceSettings {
    Http {
        url: url::Url,
        /// The variable's name; its value is read when pulling and never printed.
        token_env: String,
        timeout_secs: u64,
        max_attempts: u32,
    },
    File {
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct FeedbackSettings {
    #[serde(flatten)]
    pub source: SourceSettings,
    pub page_size: u32,
    pub aspects: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreSettings {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thresholds {
    pub min_new_feedback: u64,
    pub min_new_signals: u64,
    pub max_age_days: u64,
    pub min_hours_between: u64,
    pub quality: QualitySettings,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualitySettings {
    pub enabled: bool,
    pub window_days: u64,
    pub confidence: f64,
    pub min_samples: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_new_feedback: 200,
            min_new_signals: 100,
            max_age_days: 14,
            min_hours_between: 12,
            quality: QualitySettings {
                enabled: true,
                window_days: 7,
                confidence: 0.95,
                min_samples: 50,
            },
        }
    }
}

impl FeedbackSettings {
    pub fn timeout(&self) -> Duration {
        match self.source {
            SourceSettings::Http { timeout_secs, .. } => Duration::from_secs(timeout_secs),
            SourceSettings::File { .. } => Duration::ZERO,
        }
    }
}

pub fn validate(raw: RawConfig, text: &str) -> Result<Settings, Invalid> {
    let f = raw.feedback;
    let page_size = f.page_size.map_or(500, |p| p.0);
    if page_size > 1000 {
        return Err(Invalid::new(
            "feedback.page_size",
            format!("the API serves at most 1000 records a page, got {page_size}"),
        ));
    }
    let source = match f.source {
        SourceKind::Http => {
            if f.path.is_some() {
                return Err(Invalid::new(
                    "feedback.path",
                    "`path` is for the file source; this source is http",
                ));
            }
            let Some(text_url) = f.url else {
                return Err(Invalid::new(
                    "feedback.source",
                    "the http source needs `feedback.url` (the API's base URL, e.g. https://feedback.example.com)",
                ));
            };
            let url = url::Url::parse(&text_url).map_err(|e| {
                Invalid::new("feedback.url", format!("not a URL ({text_url:?}): {e}"))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Invalid::new(
                    "feedback.url",
                    format!("expected an http(s) URL, got {text_url:?}"),
                ));
            }
            let token_env = f.token_env.unwrap_or_else(|| DEFAULT_TOKEN_ENV.to_string());
            if token_env.is_empty()
                || !token_env
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(Invalid::new(
                    "feedback.token_env",
                    format!(
                        "expected the NAME of an environment variable (letters, digits, _), got {token_env:?}\nhint: never put the token itself in the config"
                    ),
                ));
            }
            SourceSettings::Http {
                url,
                token_env,
                timeout_secs: f.timeout_secs.map_or(30, |t| t.0),
                max_attempts: f.max_attempts.map_or(6, |a| a.0.min(100) as u32),
            }
        }
        SourceKind::File => {
            if f.url.is_some() {
                return Err(Invalid::new(
                    "feedback.url",
                    "`url` is for the http source; this source is file",
                ));
            }
            let Some(path) = f.path else {
                return Err(Invalid::new(
                    "feedback.source",
                    "the file source needs `feedback.path` (a JSONL file)",
                ));
            };
            SourceSettings::File {
                path: PathBuf::from(path),
            }
        }
    };
    let defaults = Thresholds::default();
    let t = raw.thresholds;
    let q = t.quality;
    let thresholds = Thresholds {
        min_new_feedback: t
            .min_new_feedback
            .map_or(defaults.min_new_feedback, |v| v.0),
        min_new_signals: t.min_new_signals.map_or(defaults.min_new_signals, |v| v.0),
        max_age_days: t.max_age_days.map_or(defaults.max_age_days, |v| v.0),
        min_hours_between: t
            .min_hours_between
            .map_or(defaults.min_hours_between, |v| v.0),
        quality: QualitySettings {
            enabled: q.enabled.unwrap_or(defaults.quality.enabled),
            window_days: q.window_days.map_or(defaults.quality.window_days, |v| v.0),
            confidence: q.confidence.map_or(defaults.quality.confidence, |v| v.0),
            min_samples: q.min_samples.map_or(defaults.quality.min_samples, |v| v.0),
        },
    };
    if thresholds.min_hours_between > thresholds.max_age_days * 24 {
        return Err(Invalid::new(
            "thresholds.min_hours_between",
            format!(
                "{} hours is longer than max_age_days ({} days): the age trigger could never fire",
                thresholds.min_hours_between, thresholds.max_age_days
            ),
        ));
    }
    Ok(Settings {
        feedback: FeedbackSettings {
            source,
            page_size: page_size as u32,
            aspects: f.aspects,
        },
        store: StoreSettings {
            dir: PathBuf::from(raw.store.dir.unwrap_or_else(|| DEFAULT_STORE_DIR.into())),
        },
        thresholds,
        config_sha256: hex::encode(Sha256::digest(text.as_bytes())),
    })
}
