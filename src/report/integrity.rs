//! The report's Integrity section: what the feedback audit (`dataset::audit`) found, as
//! sentences and a burst table ready for the templates. The summary it reads holds counts,
//! rates and burst ids only, so nothing here can name a user; model versions come from the
//! feedback API and are escaped like every other untrusted label.

use serde::Serialize;

use super::neutralize::code;
use crate::dataset::audit::IntegritySummary;

#[derive(Debug, Serialize)]
pub(super) struct IntegrityView {
    influence: String,
    bursts: Vec<BurstView>,
    bursts_note: String,
    agreement: String,
    smoothing: String,
}

#[derive(Debug, Serialize)]
struct BurstView {
    id: String,
    version: String,
    window: String,
    votes: u64,
    users: u64,
    why: String,
    status: &'static str,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

pub(super) fn view(s: &IntegritySummary) -> IntegrityView {
    let influence = match &s.influence {
        None => "Per-user influence cap: off (`audit.max_user_share`).".to_string(),
        Some(i) => {
            let mut text = format!(
                "Per-user influence cap {}: {} of {} contributors were down-weighted ({} records); the largest share of the training signal went from {} to {}.",
                pct(i.cap),
                i.capped_users,
                i.contributors,
                i.records_down_weighted,
                pct(i.largest_share_before),
                pct(i.largest_share_after),
            );
            if i.effective_cap > i.cap + 1e-12 {
                text.push_str(&format!(
                    " With only {} contributors the cap cannot hold; every contributor was held to an equal share ({}).",
                    i.contributors,
                    pct(i.effective_cap)
                ));
            }
            if i.anonymous_records > 0 {
                text.push_str(&format!(
                    " {} records carry no user id and were capped together as one contributor.",
                    i.anonymous_records
                ));
            }
            text
        }
    };
    let bursts: Vec<BurstView> = s
        .bursts
        .iter()
        .map(|b| BurstView {
            id: code(&b.id),
            version: code(&b.model_version),
            window: format!(
                "{} – {}",
                b.start.format("%Y-%m-%d %H:%M"),
                b.end.format("%H:%M")
            ),
            votes: b.votes,
            users: b.users,
            why: b
                .reasons
                .iter()
                .map(|r| r.describe())
                .collect::<Vec<_>>()
                .join(", "),
            status: if b.cleared { "cleared" } else { "held out" },
        })
        .collect();
    let held = s.held_bursts().count();
    let bursts_note = if s.bursts.is_empty() {
        "No feedback bursts flagged.".to_string()
    } else if held > 0 {
        format!(
            "{held} burst(s) held out of the quality trigger. After looking at one, list its id under `audit.cleared_bursts` to count its votes again."
        )
    } else {
        "Every flagged burst was cleared by a person; their votes count again.".to_string()
    };
    let a = &s.agreement;
    let agreement = match (&a.agreement, &a.flip_rate) {
        (Some(rate), Some(flip)) => format!(
            "Rater agreement: {} [{}, {}] over {} label pairs ({} answers rated by two or more users: {} pairs; the same user's repeated labels: {} pairs). Estimated label flip rate {} [{}, {}].",
            pct(rate.estimate),
            pct(rate.low),
            pct(rate.high),
            a.rater_pairs + a.duplicate_pairs,
            a.answers_multi_rated,
            a.rater_pairs,
            a.duplicate_pairs,
            pct(flip.estimate),
            pct(flip.low),
            pct(flip.high),
        ),
        _ => "Rater agreement: no answer was rated by two users yet.".to_string(),
    };
    let agreement = if a.held_out_labels > 0 {
        format!(
            "{agreement} {} labels of held bursts were left out.",
            a.held_out_labels
        )
    } else {
        agreement
    };
    let smoothing = match (a.suggested_label_smoothing, s.applied_label_smoothing) {
        (_, Some(applied)) => {
            format!(
                "DPO trained with `label_smoothing` {applied:.3}, the estimated flip rate (`audit.apply_label_smoothing`)."
            )
        }
        (Some(suggested), None) => format!(
            "Suggested DPO `label_smoothing`: {suggested:.3} (set `audit.apply_label_smoothing: true` to apply it)."
        ),
        (None, None) => format!(
            "No `label_smoothing` suggested: fewer than {} label pairs.",
            a.min_pairs
        ),
    };
    IntegrityView {
        influence,
        bursts,
        bursts_note,
        agreement,
        smoothing,
    }
}
