//! The candidates of AI feedback (`rlaif`): in each context, every two different answers
//! (regenerations), with the human preference between them when the dataset's own pairing rule
//! (`build::human_preference`: a score gap of at least `min_score_gap`) gives one. Pairs with a
//! preference check the judge against people; pairs without one are what the judge labels.
//! Answers without an answer-level score (only step thumbs, say) have no human preference with
//! anything, so they are candidates too.

use super::DatasetOptions;
use super::build::{completions_by_context, human_preference, merged_feedback};
use super::examples::Answer;
use crate::rlaif::{Candidate, Completion, Side};

/// Every pair of different answers to one context, in a stable order (context, then text).
pub fn regeneration_candidates(answers: &[Answer], options: &DatasetOptions) -> Vec<Candidate> {
    let mut out = Vec::new();
    for texts in completions_by_context(answers) {
        // (representative answer: the lowest message id, score when people gave one)
        let completions: Vec<(usize, Option<f64>)> = texts
            .iter()
            .map(|indices| {
                let score = merged_feedback(answers, indices).score().map(|(s, _)| s);
                (indices[0], score)
            })
            .collect();
        for (a, &(ia, sa)) in completions.iter().enumerate() {
            for &(ib, sb) in &completions[a + 1..] {
                let human = match (sa, sb) {
                    (Some(sa), Some(sb)) => human_preference(sa, sb, options)
                        .map(|a_wins| if a_wins { Side::First } else { Side::Second }),
                    _ => None,
                };
                let completion = |i: usize| Completion {
                    message_id: answers[i].key.message_id.clone(),
                    text: answers[i].response.clone(),
                };
                out.push(Candidate {
                    conversation_id: answers[ia].key.conversation_id.clone(),
                    prompt: answers[ia].prompt.clone(),
                    first: completion(ia),
                    second: completion(ib),
                    human,
                });
            }
        }
    }
    out
}
