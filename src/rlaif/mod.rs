//! AI feedback where humans gave none (RLAIF, docs/rlaif.md). Regenerations (two different
//! answers to one context) that no human preference separates are shown to the judge twice, as
//! A/B and as B/A; a pair is kept only when both orders pick the same answer, which guards
//! against the judge's position bias. Before any AI label is trusted, the judge is run the same
//! way on pairs people did label, and its agreement with them (with a 95% Wilson interval) is
//! compared with `rlaif.min_agreement`: below the floor, or with no such pairs at all, AI labels
//! are off for the run. Finding the candidates is the dataset's job (`dataset::regenerations`),
//! loading a local judge model is `app::rlaif`'s; this module sees the judge as [`AnyJudge`].

pub mod pairs;

use std::sync::LazyLock;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::evals::judge::{AnyJudge, JudgeError, JudgeSource};
use crate::feedback::record::ChatMessage;
use crate::sanitize::error_body_excerpt;
use crate::stats::{Interval, wilson};
use pairs::{
    AgreementCounts, AiFeedback, AiFeedbackPair, AiFeedbackSummary, LabelCounts, LabelsState,
};

/// `rlaif:` in the config, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RlaifSettings {
    pub enabled: bool,
    /// Required when `enabled`.
    pub judge: Option<JudgeSource>,
    /// The weight of AI-labelled pairs in the dataset, separate from human feedback.
    pub weight: f64,
    /// The floor on the judge's agreement with people, compared with the lower bound of the
    /// 95% interval (not the point estimate: a handful of lucky agreements must not switch AI
    /// labels on).
    pub min_agreement: f64,
    /// Use AI labels even when no pair labelled by people could check the judge.
    pub allow_unvalidated: bool,
    /// The most pairs judged per run (each costs two judge calls), both kinds together.
    pub max_pairs: usize,
}

impl Default for RlaifSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            judge: None,
            weight: 0.5,
            min_agreement: 0.6,
            allow_unvalidated: false,
            max_pairs: 200,
        }
    }
}

/// The config section of the judge, named by its errors' hints.
pub const JUDGE_SECTION: &str = "rlaif.judge";

/// One sentence on whether AI labels are used this run and why, with the agreement numbers
/// (the CLI's summary and the report say the same).
pub fn state_sentence(state: LabelsState, floor: f64, a: &AgreementCounts) -> String {
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let measured = a.interval.map(|i| {
        format!(
            "the judge agreed with people on {} of {} pairs it judged consistently ({}, 95% interval {}–{})",
            a.agreeing,
            a.consistent,
            pct(i.estimate),
            pct(i.low),
            pct(i.high)
        )
    });
    match (state, measured) {
        (LabelsState::On, Some(m)) => format!(
            "AI labels on: {m}; the interval's lower bound is at or above `rlaif.min_agreement` ({})",
            pct(floor)
        ),
        (LabelsState::OffBelowFloor, Some(m)) => format!(
            "AI labels off for this run: {m}; the interval's lower bound is below `rlaif.min_agreement` ({})",
            pct(floor)
        ),
        (LabelsState::OnUnvalidated, _) => format!(
            "AI labels on without validation: agreement with people unknown ({} labelled pairs judged, none consistently), used because `rlaif.allow_unvalidated: true`",
            a.judged
        ),
        _ => format!(
            "AI labels off for this run: agreement with people unknown ({} pairs people labelled, {} judged, none consistently); label more regenerations, or set `rlaif.allow_unvalidated: true`",
            a.available, a.judged
        ),
    }
}

/// One of the two answers of a candidate pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub message_id: String,
    pub text: String,
}

/// Which answer of a pair: the first or the second as the candidate lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    First,
    Second,
}

/// Two different answers to the same context, and which one people preferred when they did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub conversation_id: String,
    pub prompt: Vec<ChatMessage>,
    pub first: Completion,
    pub second: Completion,
    /// `None`: no human preference between them (the pairs RLAIF labels).
    pub human: Option<Side>,
}

/// The system message of every pairwise request.
pub const PAIRWISE_SYSTEM: &str = "You compare two answers an assistant gave to the same \
conversation. Judge which one is more helpful, correct and honest. Think briefly, then end your \
reply with one line: `Preferred: A` or `Preferred: B`.";

/// The user message showing `a` as answer A and `b` as answer B.
pub fn pairwise_request(prompt: &[ChatMessage], a: &str, b: &str) -> String {
    let mut transcript = String::new();
    for m in prompt {
        transcript.push_str(&format!("{}: {}\n", m.role, m.content));
    }
    format!(
        "Conversation:\n{transcript}\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is better? End with `Preferred: A` or `Preferred: B`."
    )
}

/// Which answer the reply prefers: the last `Preferred: A|B` (any case, optional bold), or a
/// reply that is only `A` or `B`. Anything else (both, neither, a tie) is `None`.
pub fn parse_preference(reply: &str) -> Option<bool> {
    static PREFERRED: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?i)preferred\s*[:=]?\s*\**\s*(?:answer\s+)?([ab])\b")
            .expect("a valid pattern")
    });
    let letter = match PREFERRED.captures_iter(reply).last() {
        Some(c) => c[1].to_ascii_uppercase(),
        None => reply.trim().trim_matches('*').trim().to_ascii_uppercase(),
    };
    match letter.as_str() {
        "A" => Some(true),
        "B" => Some(false),
        _ => None,
    }
}

/// Asks the judge once, with `a` shown first; `true` when it prefers `a`.
async fn ask(
    judge: &AnyJudge<'_>,
    prompt: &[ChatMessage],
    a: &str,
    b: &str,
) -> Result<bool, JudgeError> {
    let reply = judge
        .chat(PAIRWISE_SYSTEM, &pairwise_request(prompt, a, b))
        .await?;
    parse_preference(&reply).ok_or_else(|| JudgeError::NoPreference {
        judge: judge.shown(),
        problem: "no `Preferred: A` or `Preferred: B` in the reply".to_string(),
        excerpt: error_body_excerpt(&reply, &[]),
        section: judge.section(),
    })
}

/// The judge's verdict on a candidate in both orders: `Some(side)` when both orders pick the
/// same answer, `None` when the verdict follows the position instead (inconsistent).
pub async fn judge_both_orders(
    judge: &AnyJudge<'_>,
    candidate: &Candidate,
) -> Result<Option<Side>, JudgeError> {
    let (first, second) = (&candidate.first.text, &candidate.second.text);
    let first_wins_shown_first = ask(judge, &candidate.prompt, first, second).await?;
    let second_wins_shown_first = ask(judge, &candidate.prompt, second, first).await?;
    Ok(match (first_wins_shown_first, second_wins_shown_first) {
        (true, false) => Some(Side::First),
        (false, true) => Some(Side::Second),
        _ => None,
    })
}

/// How the per-run cap splits between pairs people labelled (the validation) and pairs they did
/// not: validation gets up to half, and either kind takes what the other leaves unused.
/// Returns (validation pairs, unlabelled pairs) to judge.
pub fn budget(cap: usize, labelled: usize, unlabelled: usize) -> (usize, usize) {
    let validation = labelled.min((cap / 2).max(cap.saturating_sub(unlabelled)));
    (validation, unlabelled.min(cap - validation))
}

/// Whether AI labels are used this run, from the validation's counts and interval.
pub fn decide(
    consistent: u64,
    interval: Option<&Interval>,
    settings: &RlaifSettings,
) -> LabelsState {
    match interval {
        None if consistent == 0 && settings.allow_unvalidated => LabelsState::OnUnvalidated,
        None => LabelsState::OffUnvalidated,
        Some(i) if i.low >= settings.min_agreement => LabelsState::On,
        Some(_) => LabelsState::OffBelowFloor,
    }
}

/// Judges the candidates: first those people labelled (the agreement check), then, when AI
/// labels pass it, those they did not. `max_pairs` caps the pairs judged (see [`budget`]).
/// Any judge failure stops the run with an error naming the pair's position; the caller writes
/// nothing then.
pub async fn label(
    candidates: &[Candidate],
    settings: &RlaifSettings,
    max_pairs: usize,
    judge: &AnyJudge<'_>,
) -> Result<AiFeedback> {
    let (labelled, unlabelled): (Vec<&Candidate>, Vec<&Candidate>) =
        candidates.iter().partition(|c| c.human.is_some());
    let (validate_n, label_n) = budget(max_pairs, labelled.len(), unlabelled.len());

    let mut agreement = AgreementCounts {
        available: labelled.len() as u64,
        ..AgreementCounts::default()
    };
    for (i, c) in labelled.iter().take(validate_n).enumerate() {
        let verdict = judge_both_orders(judge, c).await.with_context(|| {
            format!(
                "judging pair {} of {} that people labelled (the agreement check)",
                i + 1,
                validate_n
            )
        })?;
        agreement.judged += 1;
        if let Some(side) = verdict {
            agreement.consistent += 1;
            if Some(side) == c.human {
                agreement.agreeing += 1;
            }
        }
    }
    agreement.interval = wilson(agreement.agreeing, agreement.consistent, 0.95);
    let state = decide(agreement.consistent, agreement.interval.as_ref(), settings);

    let mut labels = LabelCounts {
        available: unlabelled.len() as u64,
        ..LabelCounts::default()
    };
    let mut kept = Vec::new();
    if state.is_on() {
        for (i, c) in unlabelled.iter().take(label_n).enumerate() {
            let verdict = judge_both_orders(judge, c).await.with_context(|| {
                format!(
                    "judging pair {} of {} without a human preference",
                    i + 1,
                    label_n
                )
            })?;
            labels.judged += 1;
            let Some(side) = verdict else {
                labels.inconsistent += 1;
                continue;
            };
            let (chosen, rejected) = match side {
                Side::First => (&c.first, &c.second),
                Side::Second => (&c.second, &c.first),
            };
            kept.push(AiFeedbackPair {
                conversation_id: c.conversation_id.clone(),
                prompt: c.prompt.clone(),
                chosen: chosen.text.clone(),
                rejected: rejected.text.clone(),
                chosen_id: chosen.message_id.clone(),
                rejected_id: rejected.message_id.clone(),
            });
        }
        labels.kept = kept.len() as u64;
        // With the labels off nothing is counted over the cap: nothing was to be judged.
        labels.over_cap = labels.available.saturating_sub(label_n as u64);
    }
    Ok(AiFeedback {
        summary: AiFeedbackSummary {
            judge: judge.shown(),
            state,
            min_agreement: settings.min_agreement,
            agreement,
            labels,
        },
        pairs: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_are_read_from_the_last_line_and_nothing_else_passes() {
        assert_eq!(parse_preference("A is longer.\nPreferred: B"), Some(false));
        assert_eq!(parse_preference("preferred = **a**"), Some(true));
        assert_eq!(parse_preference("Preferred: Answer B"), Some(false));
        assert_eq!(parse_preference(" B "), Some(false));
        assert_eq!(parse_preference("Both are fine."), None);
        assert_eq!(parse_preference("Preferred: tie"), None);
        assert_eq!(parse_preference(""), None);
    }

    #[test]
    fn the_cap_gives_validation_up_to_half_and_lends_what_is_unused() {
        assert_eq!(budget(10, 100, 100), (5, 5));
        assert_eq!(budget(10, 2, 100), (2, 8));
        assert_eq!(budget(10, 100, 3), (7, 3));
        assert_eq!(budget(10, 0, 0), (0, 0));
        assert_eq!(budget(0, 4, 4), (0, 0));
        assert_eq!(budget(3, 4, 4), (1, 2));
    }

    #[test]
    fn the_floor_is_checked_against_the_lower_bound() {
        let settings = RlaifSettings {
            min_agreement: 0.6,
            ..RlaifSettings::default()
        };
        // 9 of 10 agreeing: point 0.9, lower bound ~0.596: below a 0.6 floor.
        let nine = wilson(9, 10, 0.95).unwrap();
        assert_eq!(
            decide(10, Some(&nine), &settings),
            LabelsState::OffBelowFloor
        );
        let twenty = wilson(19, 20, 0.95).unwrap();
        assert_eq!(decide(20, Some(&twenty), &settings), LabelsState::On);
        assert_eq!(decide(0, None, &settings), LabelsState::OffUnvalidated);
        let open = RlaifSettings {
            allow_unvalidated: true,
            ..settings
        };
        assert_eq!(decide(0, None, &open), LabelsState::OnUnvalidated);
    }
}
