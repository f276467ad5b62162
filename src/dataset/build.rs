//! Records → answers → examples. Two steps, because a record can only be judged against the
//! answer it talks about: first every record is filed under its answer (keeping the newest text
//! of the answer and only the small signal of each record, so memory grows with answers, not with
//! records), then each answer's feedback is turned into examples.
//!
//! The rules (docs/dataset.md has worked examples): an answer's score is the weighted mean of
//! its answer-level signals (thumb up 1 / down 0, rating (r − 1) / 4, each aspect rating the
//! same), weights being kind weight × source weight. Answers in the same context (same
//! conversation and same prompt messages) whose scores differ by at least `min_score_gap` pair
//! up, the higher one chosen. Answers that end up in no pair become pointwise examples. Step
//! thumbs give step labels by weighted majority; aspect ratings give per-aspect targets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::DatasetOptions;
use super::audit::influence::{AppliedWeights, Contributor, UserFactors, cap_factors};
use super::examples::{
    Answer, AnswerFeedback, AnswerKey, AspectExample, DatasetStats, DropReason, Examples,
    PointwiseExample, PreferencePair, StepExample, majority, source_name,
};
use crate::feedback::record::{ChatMessage, FeedbackRecord, Response, Signal, Thumb};

/// Tolerance on score comparisons: a gap of exactly `min_score_gap` must pair even when the
/// weighted means carry rounding error.
const EPS: f64 = 1e-9;

/// One version of an answer's text as records carry it; records normally agree, but an edited
/// answer (or a client bug) can give two.
#[derive(Debug)]
struct Version {
    prompt: Vec<ChatMessage>,
    response: Response,
    model_version: String,
    /// The newest record carrying this version: (updated_at, id) decides which version wins.
    newest: (DateTime<Utc>, String),
}

/// What one record says, weighted, and which version of the answer it was about.
#[derive(Debug)]
struct Vote {
    version: usize,
    signal: Signal,
    weight: f64,
    /// The weight before the influence cap (equal to `weight` when the cap is off).
    uncapped: f64,
}

#[derive(Debug, Default)]
struct Pending {
    versions: Vec<Version>,
    votes: Vec<Vote>,
}

/// Files records under their answers. Feed it every live record once, then [`Aggregation::finish`].
#[derive(Debug)]
pub struct Aggregation {
    options: DatasetOptions,
    pending: BTreeMap<AnswerKey, Pending>,
    stats: DatasetStats,
    /// The influence cap's factors and the weights they gave, when the cap is on.
    user_factors: Option<(UserFactors, AppliedWeights)>,
}

impl Aggregation {
    pub fn new(options: &DatasetOptions) -> Self {
        Self {
            options: options.clone(),
            pending: BTreeMap::new(),
            stats: DatasetStats::default(),
            user_factors: None,
        }
    }

    /// Applies the per-user influence cap (see `audit::influence`) to every record added after.
    pub fn with_user_factors(mut self, factors: UserFactors) -> Self {
        self.user_factors = Some((factors, AppliedWeights::default()));
        self
    }

    pub fn add(&mut self, record: FeedbackRecord) {
        *self
            .stats
            .records_by_kind
            .entry(record.signal.kind().to_string())
            .or_default() += 1;
        *self
            .stats
            .records_by_source
            .entry(source_name(record.source).to_string())
            .or_default() += 1;
        let mut weight = match record_weight(&self.options, &record) {
            Ok(w) => w,
            Err(reason) => {
                self.stats.count_drop(reason);
                return;
            }
        };
        let uncapped = weight;
        if let Some((factors, applied)) = &mut self.user_factors {
            weight *= factors.of(&record.user_id);
            applied.add(&record.user_id, weight, factors);
        }
        let key = AnswerKey {
            conversation_id: record.conversation_id,
            message_id: record.message_id,
        };
        let pending = self.pending.entry(key).or_default();
        let stamp = (record.updated_at, record.id);
        let found = pending.versions.iter().position(|v| {
            v.prompt == record.prompt
                && v.response == record.response
                && v.model_version == record.model_version
        });
        let version = match found {
            Some(i) => {
                if stamp > pending.versions[i].newest {
                    pending.versions[i].newest = stamp;
                }
                i
            }
            None => {
                pending.versions.push(Version {
                    prompt: record.prompt,
                    response: record.response,
                    model_version: record.model_version,
                    newest: stamp,
                });
                pending.versions.len() - 1
            }
        };
        pending.votes.push(Vote {
            version,
            signal: record.signal,
            weight,
            uncapped,
        });
    }

    /// Resolves each answer to its newest text and sums the feedback about that text.
    pub fn finish(self) -> (Vec<Answer>, DatasetStats) {
        let mut stats = self.stats;
        stats.influence = self
            .user_factors
            .as_ref()
            .map(|(factors, applied)| applied.summary(factors));
        let mut answers = Vec::with_capacity(self.pending.len());
        for (key, pending) in self.pending {
            let Some(winner) = (0..pending.versions.len())
                .max_by(|&a, &b| pending.versions[a].newest.cmp(&pending.versions[b].newest))
            else {
                continue;
            };
            let mut feedback = AnswerFeedback::default();
            for vote in &pending.votes {
                if vote.version != winner {
                    stats.count_drop(DropReason::InconsistentAnswer);
                    continue;
                }
                feedback.records += 1;
                let w = vote.weight;
                if !matches!(vote.signal, Signal::Step { .. }) {
                    feedback.uncapped_weight += vote.uncapped;
                }
                match &vote.signal {
                    Signal::Thumb(Thumb::Up) => feedback.thumbs_up += w,
                    Signal::Thumb(Thumb::Down) => feedback.thumbs_down += w,
                    Signal::Rating(r) => {
                        feedback.rating_sum += w * scaled(*r);
                        feedback.rating_weight += w;
                    }
                    Signal::Aspect { aspect, rating } => {
                        let entry = feedback.aspects.entry(aspect.clone()).or_default();
                        entry.0 += w * scaled(*rating);
                        entry.1 += w;
                    }
                    Signal::Step { step_index, thumb } => {
                        let entry = feedback.steps.entry(*step_index).or_default();
                        match thumb {
                            Thumb::Up => entry.0 += w,
                            Thumb::Down => entry.1 += w,
                        }
                    }
                }
            }
            stats.records_used += feedback.records;
            let mut versions = pending.versions;
            let version = versions.swap_remove(winner);
            answers.push(Answer {
                key,
                prompt: version.prompt,
                response: version.response.content,
                steps: version.response.steps,
                model_version: version.model_version,
                feedback,
            });
        }
        stats.answers = answers.len() as u64;
        stats.conversations = answers
            .iter()
            .map(|a| a.key.conversation_id.as_str())
            .collect::<BTreeSet<_>>()
            .len() as u64;
        stats.prompts = answers
            .iter()
            .map(|a| {
                let prompt: Vec<(&str, &str)> = a
                    .prompt
                    .iter()
                    .map(|m| (m.role.as_str(), m.content.as_str()))
                    .collect();
                (a.key.conversation_id.as_str(), prompt)
            })
            .collect::<BTreeSet<_>>()
            .len() as u64;
        (answers, stats)
    }
}

/// The share of an example's evidence left after the influence cap (`capped / uncapped` signal
/// weight), as the weight the losses give it; `None` (weight 1) when the cap took nothing.
fn influence_share(capped: f64, uncapped: f64) -> Option<f32> {
    let share = capped / uncapped;
    (uncapped > 0.0 && share < 1.0 - EPS).then_some(share as f32)
}

/// Files `records` under their answers (a convenience over [`Aggregation`]).
pub fn aggregate(
    records: impl IntoIterator<Item = FeedbackRecord>,
    options: &DatasetOptions,
) -> (Vec<Answer>, DatasetStats) {
    let mut aggregation = Aggregation::new(options);
    for record in records {
        aggregation.add(record);
    }
    aggregation.finish()
}

/// The weight a record carries into its answer's feedback (kind weight × source weight, before
/// the influence cap), or why it carries none.
pub(crate) fn record_weight(
    options: &DatasetOptions,
    record: &FeedbackRecord,
) -> Result<f64, DropReason> {
    if record.response.content.trim().is_empty() {
        return Err(DropReason::EmptyResponse);
    }
    let kind_weight = match &record.signal {
        Signal::Thumb(_) => options.weights.thumb,
        Signal::Rating(_) => options.weights.rating,
        Signal::Aspect { aspect, .. } => {
            if !options.aspects.is_empty() && !options.aspects.contains(aspect) {
                return Err(DropReason::AspectNotTrained);
            }
            options.weights.aspect
        }
        // Step labels are votes among steps, not part of the answer's score: only the source
        // weight applies.
        Signal::Step { .. } => 1.0,
    };
    let weight = kind_weight * options.source_weights.of(record.source);
    if weight <= 0.0 {
        return Err(DropReason::ZeroWeight);
    }
    Ok(weight)
}

/// Each contributor's summed record weight: what the influence cap divides into shares.
#[derive(Debug, Default)]
pub(crate) struct ContributorTotals(HashMap<Contributor, f64>);

impl ContributorTotals {
    pub(crate) fn add(&mut self, options: &DatasetOptions, record: &FeedbackRecord) {
        if let Ok(w) = record_weight(options, record) {
            *self.0.entry(record.user_id.clone()).or_default() += w;
        }
    }

    pub(crate) fn factors(&self, cap: f64) -> UserFactors {
        cap_factors(&self.0, cap)
    }
}

/// One context's distinct completions that people scored: (representative answer: the lowest
/// message id, merged feedback, score, weight), and how many answers were folded into them.
struct ScoredContext {
    completions: Vec<(usize, AnswerFeedback, f64, f64)>,
    merged: u64,
}

/// The answers' indices by context and, within a context, by text. The prompt messages are part
/// of the key: two answers in one conversation but after different turns answer different
/// questions. Within a context, answers with the same text (a regeneration that came out
/// identical) are one completion, so they can never be paired against each other.
pub(crate) fn completions_by_context(answers: &[Answer]) -> Vec<Vec<Vec<usize>>> {
    type Context<'a> = (&'a str, Vec<(&'a str, &'a str)>);
    let mut contexts: BTreeMap<Context<'_>, BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
    for (i, answer) in answers.iter().enumerate() {
        let prompt = answer
            .prompt
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        contexts
            .entry((answer.key.conversation_id.as_str(), prompt))
            .or_default()
            .entry(answer.response.as_str())
            .or_default()
            .push(i);
    }
    contexts
        .into_values()
        .map(|texts| texts.into_values().collect())
        .collect()
}

/// [`completions_by_context`] with each completion's feedback merged; completions without an
/// answer-level score are left out.
fn scored_contexts(answers: &[Answer]) -> Vec<ScoredContext> {
    completions_by_context(answers)
        .into_iter()
        .map(|texts| {
            let mut out = ScoredContext {
                completions: Vec::new(),
                merged: 0,
            };
            for indices in texts {
                let feedback = merged_feedback(answers, &indices);
                if let Some((score, weight)) = feedback.score() {
                    out.merged += indices.len() as u64 - 1;
                    out.completions.push((indices[0], feedback, score, weight));
                }
            }
            out
        })
        .collect()
}

/// The feedback of one completion: every answer with its text in its context, merged.
pub(crate) fn merged_feedback(answers: &[Answer], indices: &[usize]) -> AnswerFeedback {
    let mut feedback = AnswerFeedback::default();
    for &i in indices {
        feedback.merge(&answers[i].feedback);
    }
    feedback
}

/// Whether people preferred the completion scored `a` over the one scored `b` (`Some(true)`),
/// the reverse (`Some(false)`), or neither: the scores are closer than `min_score_gap`.
pub(crate) fn human_preference(a: f64, b: f64, options: &DatasetOptions) -> Option<bool> {
    let gap = (a - b).abs();
    if gap <= 0.0 || gap + EPS < options.min_score_gap {
        return None;
    }
    Some(a > b)
}

/// A 1–5 rating on [0, 1].
fn scaled(rating: u8) -> f64 {
    (f64::from(rating) - 1.0) / 4.0
}

/// Turns answers into examples; everything left out is counted in `stats.dropped`.
pub(crate) fn examples(
    answers: &[Answer],
    options: &DatasetOptions,
    stats: &mut DatasetStats,
) -> Examples {
    let mut out = Examples::default();

    for group in scored_contexts(answers) {
        stats.answers_merged += group.merged;
        let group = group.completions;
        let mut paired = vec![false; group.len()];
        for a in 0..group.len() {
            for b in a + 1..group.len() {
                let (ia, sa) = (group[a].0, group[a].2);
                let (ib, sb) = (group[b].0, group[b].2);
                let Some(a_wins) = human_preference(sa, sb, options) else {
                    stats.count_drop(DropReason::ScoreGapTooSmall);
                    continue;
                };
                let gap = (sa - sb).abs();
                let (chosen, rejected) = if a_wins {
                    (&answers[ia], &answers[ib])
                } else {
                    (&answers[ib], &answers[ia])
                };
                // The influence cap's share of the pair's evidence: a capped user's pair
                // weighs less in every loss, not only in the answers' scores (where a user
                // who rated both answers alone would cancel out).
                let evidence = group[a].3 + group[b].3;
                let uncapped = group[a].1.uncapped_weight + group[b].1.uncapped_weight;
                out.pairs.push(PreferencePair {
                    prompt: chosen.prompt.clone(),
                    chosen: chosen.response.clone(),
                    rejected: rejected.response.clone(),
                    margin: (gap * options.margin_scale) as f32,
                    conversation_id: chosen.key.conversation_id.clone(),
                    chosen_id: chosen.key.message_id.clone(),
                    rejected_id: rejected.key.message_id.clone(),
                    source: None,
                    weight: influence_share(evidence, uncapped),
                });
                paired[a] = true;
                paired[b] = true;
            }
        }
        for ((i, feedback, score, weight), paired) in group.into_iter().zip(paired) {
            if paired {
                continue;
            }
            let answer = &answers[i];
            let label = feedback.thumb_label();
            let only_thumbs = feedback.rating_weight == 0.0 && feedback.aspects.is_empty();
            if label.is_none() && only_thumbs {
                stats.count_drop(DropReason::ThumbTie);
                continue;
            }
            out.pointwise.push(PointwiseExample {
                prompt: answer.prompt.clone(),
                completion: answer.response.clone(),
                label,
                target: score as f32,
                weight: weight as f32,
                influence: influence_share(weight, feedback.uncapped_weight),
                conversation_id: answer.key.conversation_id.clone(),
                message_id: answer.key.message_id.clone(),
            });
        }
    }

    for answer in answers {
        if let Some(example) = step_example(answer, stats) {
            out.steps.push(example);
        }
        let targets = answer.feedback.aspect_targets();
        if !targets.is_empty() {
            out.aspects.push(AspectExample {
                prompt: answer.prompt.clone(),
                completion: answer.response.clone(),
                targets: targets.into_iter().map(|(a, t)| (a, t as f32)).collect(),
                conversation_id: answer.key.conversation_id.clone(),
                message_id: answer.key.message_id.clone(),
            });
        }
    }
    out.sort();
    out
}

fn step_example(answer: &Answer, stats: &mut DatasetStats) -> Option<StepExample> {
    let votes = &answer.feedback.steps;
    if votes.is_empty() || answer.steps.is_empty() {
        return None;
    }
    let mut labels = vec![None; answer.steps.len()];
    for (&index, &(up, down)) in votes {
        // The record validator bounds step_index by the steps of the record's own response,
        // which is this answer's version, so this only guards against a future change.
        let Some(slot) = labels.get_mut(index) else {
            continue;
        };
        *slot = majority(up, down);
        if slot.is_none() {
            stats.count_drop(DropReason::StepTie);
        }
    }
    if labels.iter().all(Option::is_none) {
        stats.count_drop(DropReason::NoStepLabel);
        return None;
    }
    let (completion, step_ends) = match locate_steps(&answer.response, &answer.steps) {
        Some(ends) => (answer.response.clone(), ends),
        None => {
            stats.steps_rebuilt += 1;
            let joined = answer.steps.join("\n");
            let ends = locate_steps(&joined, &answer.steps).unwrap_or_default();
            (joined, ends)
        }
    };
    Some(StepExample {
        prompt: answer.prompt.clone(),
        completion,
        steps: answer.steps.clone(),
        step_ends,
        labels,
        conversation_id: answer.key.conversation_id.clone(),
        message_id: answer.key.message_id.clone(),
    })
}

/// Finds each step in order in `text` and returns where each ends (byte offsets), or `None` if a
/// step is missing.
fn locate_steps(text: &str, steps: &[String]) -> Option<Vec<usize>> {
    let mut from = 0;
    let mut ends = Vec::with_capacity(steps.len());
    for step in steps {
        let at = text[from..].find(step.as_str())? + from;
        from = at + step.len();
        ends.push(from);
    }
    Some(ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_located_in_order_with_byte_offsets() {
        let text = "Kurz: CO₂ steigt. Dann fällt er.";
        let steps = vec!["CO₂ steigt.".to_string(), "Dann fällt er.".to_string()];
        let ends = locate_steps(text, &steps).unwrap();
        assert_eq!(&text[..ends[0]], "Kurz: CO₂ steigt.");
        assert_eq!(ends[1], text.len());
        assert!(locate_steps(text, &["fällt".into(), "CO₂".into()]).is_none());
    }
}
