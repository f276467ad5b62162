//! The retraining decision: a pure function of store statistics, the thresholds from the config
//! and the last training, so it can be tested exhaustively (see the property tests) and
//! explained: every trigger is reported with its numbers, fired or not.
//!
//! Triggers: `force`; `volume` (N new records AND M new usable signals since the last training);
//! `age` (the last training is older than D days and something new arrived); `quality` (the
//! production version's positive-thumb rate or mean rating in the recent window is significantly
//! below its earlier baseline, one-sided test at the configured confidence). A `cooldown` (less
//! than H hours since the last training) holds back every trigger but `force`, so a flood of
//! feedback does not retrain on every scheduled run. Votes of flagged feedback bursts are left
//! out of the quality windows by the caller until a person clears them (see `QualityWindows`).
//! `principles` (listed when the team keeps a principles file and a training recorded it): the
//! principles changed since the last training, e.g. a merged pull request edited
//! `principles.yaml` (docs/constitution.md).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::config::settings::Thresholds;
use crate::feedback::store::VersionCounts;
use crate::stats::{mean_drop, proportion_drop};

/// Everything the decision looks at, gathered by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionInput {
    pub now: DateTime<Utc>,
    pub new_feedback: u64,
    pub new_signals: u64,
    pub last_training_at: Option<DateTime<Utc>>,
    pub quality: Option<QualityWindows>,
    pub force: bool,
    /// Set when a person rejected (closed unmerged) a pull request whose models were trained on
    /// exactly the data and config a training now would use: the text names that PR. Training
    /// again would propose the same model, so it blocks retraining unless forced.
    pub rejected_same_data: Option<String>,
    /// The team's principles (`constitution.principles`) against those recorded at the last
    /// training: `None` when there is no principles file or none was recorded, else what changed
    /// (`"plain-language changed"`, empty when nothing did).
    pub principles: Option<Vec<String>>,
}

/// The production version's answer-level counts before and inside the recent window.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityWindows {
    pub production_version: String,
    pub baseline: VersionCounts,
    pub recent: VersionCounts,
    /// Records of flagged, uncleared feedback bursts already left out of both windows
    /// (`dataset::audit::burst`); named in the trigger's detail so a reader knows.
    pub held_out: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trigger {
    pub name: &'static str,
    pub fired: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub retrain: bool,
    pub triggers: Vec<Trigger>,
}

impl Decision {
    /// The fired triggers' names, comma-separated (`none` when nothing fired).
    pub fn reasons(&self) -> String {
        let fired: Vec<&str> = self
            .triggers
            .iter()
            .filter(|t| t.fired && !matches!(t.name, "cooldown" | "rejected"))
            .map(|t| t.name)
            .collect();
        if self.retrain && !fired.is_empty() {
            fired.join(",")
        } else {
            "none".into()
        }
    }

    pub fn trigger(&self, name: &str) -> Option<&Trigger> {
        self.triggers.iter().find(|t| t.name == name)
    }
}

pub fn decide(input: &DecisionInput, t: &Thresholds) -> Decision {
    let mut triggers = Vec::with_capacity(5);

    triggers.push(Trigger {
        name: "force",
        fired: input.force,
        detail: if input.force {
            "requested with --force".into()
        } else {
            "not requested".into()
        },
    });

    let volume = input.new_feedback >= t.min_new_feedback && input.new_signals >= t.min_new_signals;
    triggers.push(Trigger {
        name: "volume",
        fired: volume,
        detail: format!(
            "{} new records (need {}), {} new usable signals (need {})",
            input.new_feedback, t.min_new_feedback, input.new_signals, t.min_new_signals
        ),
    });

    let hours_since = input
        .last_training_at
        .map(|at| (input.now - at).num_minutes() as f64 / 60.0);
    let age = match hours_since {
        None => Trigger {
            name: "age",
            fired: input.new_signals > 0,
            detail: format!(
                "no training recorded yet; {} usable signals available",
                input.new_signals
            ),
        },
        Some(h) => Trigger {
            name: "age",
            fired: h >= (t.max_age_days * 24) as f64 && input.new_signals > 0,
            detail: format!(
                "last training {:.1} days ago (retrain after {} days with new signals; {} new)",
                h / 24.0,
                t.max_age_days,
                input.new_signals
            ),
        },
    };
    triggers.push(age);

    triggers.push(quality_trigger(input.quality.as_ref(), t));

    // Listed only when principles are tracked, so configs without them keep their table.
    if let Some(changes) = &input.principles {
        triggers.push(Trigger {
            name: "principles",
            fired: !changes.is_empty(),
            detail: if changes.is_empty() {
                "unchanged since the last training".into()
            } else {
                format!("since the last training: {}", changes.join(", "))
            },
        });
    }

    let cooling = hours_since.is_some_and(|h| h < t.min_hours_between as f64);
    triggers.push(Trigger {
        name: "cooldown",
        fired: cooling,
        detail: match hours_since {
            Some(h) => format!(
                "{h:.1} h since the last training (minimum {} h between trainings)",
                t.min_hours_between
            ),
            None => "no earlier training".into(),
        },
    });

    // Listed only when it applies, so the usual table stays as it was.
    if let Some(pr) = &input.rejected_same_data {
        triggers.push(Trigger {
            name: "rejected",
            fired: true,
            detail: format!(
                "{pr} was closed without merging, and nothing changed since: the same model would be proposed again"
            ),
        });
    }
    let rejected = input.rejected_same_data.is_some();

    let any = triggers
        .iter()
        .any(|tr| matches!(tr.name, "volume" | "age" | "quality" | "principles") && tr.fired);
    Decision {
        retrain: input.force || (any && !cooling && !rejected),
        triggers,
    }
}

fn quality_trigger(windows: Option<&QualityWindows>, t: &Thresholds) -> Trigger {
    let q = &t.quality;
    let off = |detail: String| Trigger {
        name: "quality",
        fired: false,
        detail,
    };
    if !q.enabled {
        return off("disabled in the config".into());
    }
    let Some(w) = windows else {
        return off("no production model recorded yet".into());
    };
    let alpha = 1.0 - q.confidence;
    let (b, r) = (&w.baseline, &w.recent);
    let mut parts = Vec::new();
    let mut fired = false;
    if b.thumbs >= q.min_samples && r.thumbs >= q.min_samples {
        if let Some((z, p)) = proportion_drop(b.thumbs_up, b.thumbs, r.thumbs_up, r.thumbs) {
            let drop = z < 0.0 && p < alpha;
            fired |= drop;
            parts.push(format!(
                "positive rate {:.1}% → {:.1}% (z={z:.2}, p={p:.4}{})",
                100.0 * b.thumbs_up as f64 / b.thumbs as f64,
                100.0 * r.thumbs_up as f64 / r.thumbs as f64,
                if drop { ", significant drop" } else { "" }
            ));
        }
    } else {
        parts.push(format!(
            "thumbs: {} baseline / {} recent (need {} each)",
            b.thumbs, r.thumbs, q.min_samples
        ));
    }
    if b.ratings >= q.min_samples && r.ratings >= q.min_samples {
        if let Some((z, p)) = mean_drop(
            (b.ratings, b.rating_sum, b.rating_sq_sum),
            (r.ratings, r.rating_sum, r.rating_sq_sum),
        ) {
            let drop = z < 0.0 && p < alpha;
            fired |= drop;
            parts.push(format!(
                "mean rating {:.2} → {:.2} (z={z:.2}, p={p:.4}{})",
                b.rating_sum / b.ratings as f64,
                r.rating_sum / r.ratings as f64,
                if drop { ", significant drop" } else { "" }
            ));
        }
    } else {
        parts.push(format!(
            "ratings: {} baseline / {} recent (need {} each)",
            b.ratings, r.ratings, q.min_samples
        ));
    }
    if w.held_out > 0 {
        parts.push(format!(
            "{} records of flagged feedback bursts held out until cleared (audit.cleared_bursts)",
            w.held_out
        ));
    }
    Trigger {
        name: "quality",
        fired,
        detail: format!("{}: {}", w.production_version, parts.join("; ")),
    }
}

/// The start of the recent window for the quality trigger.
pub fn window_start(now: DateTime<Utc>, window_days: u64) -> DateTime<Utc> {
    now - Duration::days(window_days as i64)
}
