//! The report's AI feedback section: what the last `rlhf-bot rlaif` run decided (AI labels on or
//! off, and why, with the judge's agreement with people and its 95% interval) and its counts.
//! The summary it reads holds numbers and the judge's URL or checkpoint only, never a prompt or
//! an answer.

use serde::Serialize;

use super::neutralize::code;
use crate::rlaif::pairs::AiFeedbackSummary;
use crate::rlaif::state_sentence;

#[derive(Debug, Serialize)]
pub(super) struct AiFeedbackView {
    judge: String,
    on: bool,
    decision: String,
    rows: Vec<CountRow>,
}

#[derive(Debug, Serialize)]
struct CountRow {
    what: &'static str,
    pairs: u64,
}

pub(super) fn view(s: &AiFeedbackSummary) -> AiFeedbackView {
    let (a, l) = (&s.agreement, &s.labels);
    let row = |what, pairs| CountRow { what, pairs };
    AiFeedbackView {
        judge: code(&s.judge),
        on: s.state.is_on(),
        decision: format!("{}.", state_sentence(s.state, s.min_agreement, a)),
        rows: vec![
            row("Labelled by people: judged in both orders", a.judged),
            row("… the same answer in both orders", a.consistent),
            row("… and the one people preferred", a.agreeing),
            row("Without a human preference", l.available),
            row("… judged in both orders", l.judged),
            row("… orders disagreed (dropped)", l.inconsistent),
            row("… kept (`source: ai_feedback`)", l.kept),
            row("… left for a later run (`rlaif.max_pairs`)", l.over_cap),
        ],
    }
}
