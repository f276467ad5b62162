//! Dense step rewards for GRPO and RLOO (`policy.reward.step_weight`): the reward model's step
//! head scores each reasoning step of a sampled answer, and the score joins the advantage of that
//! step's tokens. This module owns the step split of a sampled answer, the mapping of a step's end
//! (a byte offset in the text) to a token position in either tokenizer, the per-token advantage
//! and the step metrics. The reward model's side (the forward pass, σ of the step logit) is
//! `RewardScorer::step_probabilities`; `policy_reward::answer_steps` puts the two together.
//!
//! The split: a sampled answer has no reported steps, so it is cut where recorded steps end. The
//! assistant reports its steps as sentences of the answer (every step end recorded in the bundled
//! sample is a sentence end), and the dataset joins steps with `"\n"` when it rebuilds an answer
//! from them (`dataset::build`). So a step ends after `.`, `!` or `?` followed by whitespace or
//! the end of the text, and at the last visible character before a line break or the end; blank
//! stretches are no step. A lead-in sentence ("Here is how economists see it.") is a step of its
//! own, and an abbreviation such as "e.g. " cuts a sentence in two: both only add a step.
//!
//! The score of step k is `2·σ(logit) − 1` ∈ (−1, 1): the step head is trained with BCE on thumbs
//! (up = 1), so σ is its probability that the step is right, and centring it at ½ makes a step the
//! head cannot judge add nothing. It is added, times `step_weight`, to the group advantage on the
//! policy tokens of step k (after step k−1's last token, up to and including step k's last), so
//! each step's credit lands on the tokens that wrote it; tokens after the last step keep the
//! plain group advantage.

use anyhow::{Context, Result};

use crate::model::tokenizer::Tokenizer;

/// Byte offsets (exclusive) where each step of `text` ends: at sentence ends and line ends.
pub fn split_steps(text: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    // End of the last visible character of the step being read, if it has one.
    let mut open: Option<usize> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\n' {
            ends.extend(open.take());
            continue;
        }
        if c.is_whitespace() {
            continue;
        }
        let end = i + c.len_utf8();
        open = Some(end);
        let at_break = chars.peek().is_none_or(|(_, next)| next.is_whitespace());
        if matches!(c, '.' | '!' | '?') && at_break {
            ends.extend(open.take());
        }
    }
    ends.extend(open);
    ends
}

/// The index of the token that carries a step ending at byte `end`: the last token that starts
/// before it (`offsets` are each token's `(start, end)` bytes). The step head is trained and read
/// at this token (`train::batching`).
pub fn last_token_before(offsets: &[(usize, usize)], end: usize) -> Option<usize> {
    offsets.iter().rposition(|(start, _)| *start < end)
}

/// Each token's `(start, end)` bytes in the decoded text of `ids` (special tokens skipped, as the
/// reward reads the answer). Decoding prefix by prefix, because re-encoding the text need not give
/// back the sampled tokens.
pub fn token_spans(tok: &Tokenizer, ids: &[u32]) -> Result<Vec<(usize, usize)>> {
    let mut spans = Vec::with_capacity(ids.len());
    let mut prev = 0;
    for i in 1..=ids.len() {
        let len = tok
            .decode(&ids[..i], true)
            .context("decoding a sampled answer to place its steps")?
            .len();
        // A token that completes a multi-byte character shows up late; never move backwards.
        let end = len.max(prev);
        spans.push((prev, end));
        prev = end;
    }
    Ok(spans)
}

/// One answer's steps as the step head sees them, in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSteps {
    /// The policy answer token that ends each step (`None`: no token starts before its end).
    pub last_tokens: Vec<Option<usize>>,
    /// σ(step logit) of each step; `NaN` where the reward model's row has no token for it.
    pub probabilities: Vec<f64>,
}

/// One sampled answer's steps: for each, the policy token that ends it and its score in (−1, 1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerSteps {
    pub steps: Vec<(usize, f64)>,
}

impl AnswerSteps {
    /// Pairs each step end's policy token with the step head's probability (`NaN` = no token of
    /// the reward model's row carries it: the step is left out).
    pub fn from_probabilities(last_tokens: &[Option<usize>], probs: &[f64]) -> Self {
        let steps = last_tokens
            .iter()
            .zip(probs)
            .filter_map(|(t, p)| Some((((*t)?), 2.0 * p - 1.0)).filter(|(_, s)| s.is_finite()))
            .collect();
        Self { steps }
    }
}

/// Per-token advantages `[rows][width]`: the group advantage of each row plus
/// `weight × score` of step k on the tokens of step k.
pub fn step_advantages(
    group: &[f64],
    answers: &[AnswerSteps],
    width: usize,
    weight: f64,
) -> Vec<Vec<f64>> {
    group
        .iter()
        .zip(answers)
        .map(|(&a, steps)| {
            let mut row = vec![a; width];
            let mut from = 0;
            for &(last, score) in &steps.steps {
                let to = (last + 1).min(width);
                for x in row.iter_mut().take(to).skip(from) {
                    *x = a + weight * score;
                }
                from = from.max(to);
            }
            row
        })
        .collect()
}

/// `rewards/steps/mean` (mean step score over every scored step) and `steps/multi_step_frac` (the
/// share of answers with two steps or more).
pub fn step_metrics(answers: &[AnswerSteps]) -> Vec<(String, f64)> {
    let scores: Vec<f64> = answers
        .iter()
        .flat_map(|a| a.steps.iter().map(|(_, s)| *s))
        .collect();
    let mean = if scores.is_empty() {
        0.0
    } else {
        scores.iter().sum::<f64>() / scores.len() as f64
    };
    let multi = answers.iter().filter(|a| a.steps.len() >= 2).count() as f64;
    vec![
        ("rewards/steps/mean".into(), mean),
        (
            "steps/multi_step_frac".into(),
            multi / answers.len().max(1) as f64,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_end_at_sentence_and_line_ends() {
        let text = "First, add 2. Then double it!\n\n  So 8  \nPi is 3.14 or so";
        let ends = split_steps(text);
        let steps: Vec<&str> = ends.iter().map(|e| &text[..*e]).collect();
        assert_eq!(ends.len(), 4, "{steps:?}");
        assert_eq!(steps[0], "First, add 2.");
        assert!(steps[1].ends_with("Then double it!"));
        assert!(steps[2].ends_with("So 8"));
        // A decimal point is no sentence end.
        assert_eq!(ends[3], text.len());
        // A recorded answer of the sample: its two steps end where the split ends them.
        let answer = "Briefly, EVs use more oil than cars. Oil demand cannot change.";
        let e = split_steps(answer);
        assert_eq!(&answer[..e[0]], "Briefly, EVs use more oil than cars.");
        assert_eq!(e[1], answer.len());
        assert_eq!(split_steps("one step"), vec![8]);
        assert!(split_steps("  \n\n ").is_empty());
        // Multi-byte characters: offsets stay on char boundaries.
        let de = "CO₂ steigt. Dann fällt er.";
        let e = split_steps(de);
        assert_eq!(&de[..e[0]], "CO₂ steigt.");
        assert_eq!(e[1], de.len());
    }

    #[test]
    fn the_step_token_is_the_last_one_starting_before_the_end() {
        let offsets = [(0, 3), (3, 6), (6, 7), (7, 12)];
        assert_eq!(last_token_before(&offsets, 6), Some(1));
        assert_eq!(last_token_before(&offsets, 7), Some(2));
        assert_eq!(last_token_before(&offsets, 12), Some(3));
        assert_eq!(last_token_before(&offsets, 0), None);
    }

    #[test]
    fn step_scores_land_on_their_own_tokens_only() {
        let group = [0.5, -1.0];
        let answers = [
            AnswerSteps::from_probabilities(&[Some(1), Some(3)], &[1.0, 0.25]),
            AnswerSteps::default(),
        ];
        let adv = step_advantages(&group, &answers, 5, 0.5);
        // Step 0 (tokens 0..=1): +0.5·1; step 1 (tokens 2..=3): +0.5·(−0.5); token 4: plain.
        assert_eq!(adv[0], vec![1.0, 1.0, 0.25, 0.25, 0.5]);
        assert_eq!(adv[1], vec![-1.0; 5]);
        let zero = step_advantages(&group, &answers, 5, 0.0);
        assert_eq!(zero, vec![vec![0.5; 5], vec![-1.0; 5]]);
        let m = step_metrics(&answers);
        assert_eq!(m[0], ("rewards/steps/mean".into(), 0.25));
        assert_eq!(m[1], ("steps/multi_step_frac".into(), 0.5));
    }

    #[test]
    fn a_step_no_token_carries_is_left_out() {
        let a = AnswerSteps::from_probabilities(&[None, Some(2)], &[0.9, f64::NAN]);
        assert!(a.steps.is_empty());
    }
}
