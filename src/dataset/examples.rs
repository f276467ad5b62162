//! The dataset's vocabulary: answers (what feedback is about) and the four kinds of training
//! example built from them, plus the statistics that account for every record and every dropped
//! candidate. These are plain data with `Serialize`, because their canonical JSON is both the
//! export payload and what the fingerprint hashes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::feedback::record::{ChatMessage, FeedbackSource};

/// Identifies one answer of the assistant: feedback records about the same message of the same
/// conversation are about the same answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AnswerKey {
    pub conversation_id: String,
    pub message_id: String,
}

/// One answer with the feedback it received, aggregated from its records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    pub key: AnswerKey,
    /// The conversation up to (not including) this answer.
    pub prompt: Vec<ChatMessage>,
    /// The answer's text.
    pub response: String,
    /// The answer's reasoning steps, when the assistant reported them.
    pub steps: Vec<String>,
    pub model_version: String,
    pub feedback: AnswerFeedback,
}

/// Weighted votes and ratings on one answer. Every number is already multiplied by the weight of
/// its record (kind weight × source weight, see `DatasetOptions`), so majorities and means here
/// are weighted ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnswerFeedback {
    /// Weight of thumbs up on the whole answer.
    pub thumbs_up: f64,
    /// Weight of thumbs down on the whole answer.
    pub thumbs_down: f64,
    /// Sum of weight × scaled rating ((r − 1) / 4) and sum of weights, over 1–5 ratings.
    pub rating_sum: f64,
    pub rating_weight: f64,
    /// Per aspect: (sum of weight × scaled rating, sum of weights).
    pub aspects: BTreeMap<String, (f64, f64)>,
    /// Per step index: (weight of thumbs up, weight of thumbs down).
    pub steps: BTreeMap<usize, (f64, f64)>,
    /// How many records contributed (after drops).
    pub records: u64,
    /// The answer-level signal weight before the influence cap (the score's weight when the cap
    /// is off); the pair and KTO weights are the capped share of it.
    #[serde(skip)]
    pub uncapped_weight: f64,
}

impl AnswerFeedback {
    /// The source-weighted mean rating scaled to [0, 1], if the answer was rated.
    pub fn rating(&self) -> Option<f64> {
        (self.rating_weight > 0.0).then(|| self.rating_sum / self.rating_weight)
    }

    /// The per-aspect source-weighted mean ratings, scaled to [0, 1].
    pub fn aspect_targets(&self) -> BTreeMap<String, f64> {
        self.aspects
            .iter()
            .filter(|(_, (_, w))| *w > 0.0)
            .map(|(a, (s, w))| (a.clone(), s / w))
            .collect()
    }

    /// The thumb majority on the whole answer: `None` without thumbs or on a tie.
    pub fn thumb_label(&self) -> Option<bool> {
        majority(self.thumbs_up, self.thumbs_down)
    }

    /// The answer's score, the weighted mean of its answer-level signals (thumb up 1, down 0,
    /// ratings and aspect ratings scaled to [0, 1]), with the total weight behind it; `None`
    /// when only steps were judged.
    pub fn score(&self) -> Option<(f64, f64)> {
        let aspect_sum: f64 = self.aspects.values().map(|(s, _)| s).sum();
        let aspect_weight: f64 = self.aspects.values().map(|(_, w)| w).sum();
        let numerator = self.thumbs_up + self.rating_sum + aspect_sum;
        let weight = self.thumbs_up + self.thumbs_down + self.rating_weight + aspect_weight;
        (weight > 0.0).then(|| (numerator / weight, weight))
    }

    /// Adds another answer's feedback to this one (same completion, see `answers_merged`).
    pub fn merge(&mut self, other: &AnswerFeedback) {
        self.thumbs_up += other.thumbs_up;
        self.thumbs_down += other.thumbs_down;
        self.rating_sum += other.rating_sum;
        self.rating_weight += other.rating_weight;
        for (aspect, (s, w)) in &other.aspects {
            let entry = self.aspects.entry(aspect.clone()).or_default();
            entry.0 += s;
            entry.1 += w;
        }
        for (step, (up, down)) in &other.steps {
            let entry = self.steps.entry(*step).or_default();
            entry.0 += up;
            entry.1 += down;
        }
        self.records += other.records;
        self.uncapped_weight += other.uncapped_weight;
    }

    /// True when something other than step thumbs speaks about the whole answer.
    pub fn has_answer_signal(&self) -> bool {
        self.thumbs_up + self.thumbs_down > 0.0
            || self.rating_weight > 0.0
            || self.aspects.values().any(|(_, w)| *w > 0.0)
    }
}

/// A weighted vote: `Some(true)` when up outweighs down, `None` on a tie or without votes.
pub(crate) fn majority(up: f64, down: f64) -> Option<bool> {
    if up > down {
        Some(true)
    } else if down > up {
        Some(false)
    } else {
        None
    }
}

/// Two answers to the same prompt where people preferred one: reward-model and DPO data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
    /// How much more the chosen answer was preferred: score gap × `margin_scale` (TRL adds it
    /// inside the reward loss, `-logsigmoid(r_c - r_r - margin)`).
    pub margin: f32,
    pub conversation_id: String,
    pub chosen_id: String,
    pub rejected_id: String,
    /// Where the pair came from when not from human feedback (`ai_constitution`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The pair's weight in the losses when not 1: the config's weight for its `source`, or for
    /// a human pair the share of its evidence left after the influence cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
}

/// One answer judged on its own (no other answer to the same prompt to compare it with): KTO data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointwiseExample {
    pub prompt: Vec<ChatMessage>,
    pub completion: String,
    /// The thumb majority on the answer (`None`: no thumbs, or they tie).
    pub label: Option<bool>,
    /// The answer's score in [0, 1]: the weighted mean of all its answer-level signals.
    pub target: f32,
    /// The evidence behind the example: the summed weights of its signals.
    pub weight: f32,
    /// The share of that evidence left after the influence cap when below 1: the example's
    /// weight in the KTO loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influence: Option<f32>,
    pub conversation_id: String,
    pub message_id: String,
}

impl PointwiseExample {
    /// The desirable/undesirable label KTO needs: the thumb majority, else the score's side of
    /// the neutral middle (a 3 of 5 is neither and gives `None`).
    pub fn kto_label(&self) -> Option<bool> {
        self.label.or(if self.target > 0.5 {
            Some(true)
        } else if self.target < 0.5 {
            Some(false)
        } else {
            None
        })
    }
}

/// Per-step correctness labels on one answer: process-reward-model data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepExample {
    pub prompt: Vec<ChatMessage>,
    pub completion: String,
    /// The answer's steps, in order.
    pub steps: Vec<String>,
    /// Byte offset in `completion` where each step ends (exclusive; always a char boundary, the
    /// unit the tokenizers crate reports offsets in), to find the token that scores the step.
    pub step_ends: Vec<usize>,
    /// One entry per step: the vote majority, `None` when nobody voted or the votes tie.
    pub labels: Vec<Option<bool>>,
    pub conversation_id: String,
    pub message_id: String,
}

/// Per-aspect targets on one answer (accuracy, helpfulness, …) for multi-head reward models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AspectExample {
    pub prompt: Vec<ChatMessage>,
    pub completion: String,
    /// Mean rating per aspect, scaled to [0, 1].
    pub targets: BTreeMap<String, f32>,
    pub conversation_id: String,
    pub message_id: String,
}

/// Examples of every kind, sorted (see [`Examples::sort`]) so equal inputs serialise equally.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Examples {
    pub pairs: Vec<PreferencePair>,
    pub pointwise: Vec<PointwiseExample>,
    pub steps: Vec<StepExample>,
    pub aspects: Vec<AspectExample>,
}

impl Examples {
    /// Orders every list by conversation, then answer ids: the only order the output depends on.
    pub fn sort(&mut self) {
        self.pairs.sort_by(|a, b| {
            (&a.conversation_id, &a.chosen_id, &a.rejected_id).cmp(&(
                &b.conversation_id,
                &b.chosen_id,
                &b.rejected_id,
            ))
        });
        self.pointwise.sort_by(|a, b| {
            (&a.conversation_id, &a.message_id).cmp(&(&b.conversation_id, &b.message_id))
        });
        self.steps.sort_by(|a, b| {
            (&a.conversation_id, &a.message_id).cmp(&(&b.conversation_id, &b.message_id))
        });
        self.aspects.sort_by(|a, b| {
            (&a.conversation_id, &a.message_id).cmp(&(&b.conversation_id, &b.message_id))
        });
    }

    pub fn counts(&self) -> ExampleCounts {
        ExampleCounts {
            pairs: self.pairs.len() as u64,
            pointwise: self.pointwise.len() as u64,
            steps: self.steps.len() as u64,
            aspects: self.aspects.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts().total() == 0
    }
}

/// How many examples of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExampleCounts {
    pub pairs: u64,
    pub pointwise: u64,
    pub steps: u64,
    pub aspects: u64,
}

impl ExampleCounts {
    pub fn total(&self) -> u64 {
        self.pairs + self.pointwise + self.steps + self.aspects
    }
}

/// Why a record, a candidate example or a label did not make it into the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Record: the answer text is empty, so there is nothing to learn from.
    EmptyResponse,
    /// Record: its prompt, response or model version differs from the newest record about the
    /// same answer, so its judgement was about another text.
    InconsistentAnswer,
    /// Record: an aspect rating for an aspect the options do not train.
    AspectNotTrained,
    /// Record: its kind or source has weight 0.
    ZeroWeight,
    /// Candidate pair: two answers to the same prompt whose scores differ by less than
    /// `min_score_gap` (counted once per such pair of answers).
    ScoreGapTooSmall,
    /// Candidate pointwise example: only thumbs, and they tie.
    ThumbTie,
    /// Step label: votes on the step tie (counted once per step).
    StepTie,
    /// Candidate step example: no step of the answer has a label (all its votes tie).
    NoStepLabel,
}

/// What building a dataset did with its input, so a report can explain every number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Input records by kind (thumb, rating, aspect, step).
    pub records_by_kind: BTreeMap<String, u64>,
    /// Input records by source (`unknown` when the API did not say).
    pub records_by_source: BTreeMap<String, u64>,
    /// Records that contributed to at least one answer's feedback.
    pub records_used: u64,
    /// Distinct answers with usable feedback.
    pub answers: u64,
    /// Distinct conversations among those answers.
    pub conversations: u64,
    /// Distinct (conversation, prompt) contexts: the groups whose answers can be paired.
    pub prompts: u64,
    /// Everything dropped, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    pub train: ExampleCounts,
    pub eval: ExampleCounts,
    pub train_conversations: u64,
    pub eval_conversations: u64,
    /// Answers folded into another answer with the same text in the same context (identical
    /// regenerations) before pairing: their feedback counts for the one completion.
    pub answers_merged: u64,
    /// Step examples whose steps could not be found in order in the answer text, so their
    /// completion is the steps joined by newlines instead.
    pub steps_rebuilt: u64,
    /// What the per-user influence cap did (absent when `audit.max_user_share` is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influence: Option<super::audit::influence::InfluenceSummary>,
}

impl DatasetStats {
    pub(crate) fn count_drop(&mut self, reason: DropReason) {
        *self.dropped.entry(reason).or_default() += 1;
    }

    /// Examples of every kind, train and eval together.
    pub fn examples(&self) -> ExampleCounts {
        ExampleCounts {
            pairs: self.train.pairs + self.eval.pairs,
            pointwise: self.train.pointwise + self.eval.pointwise,
            steps: self.train.steps + self.eval.steps,
            aspects: self.train.aspects + self.eval.aspects,
        }
    }
}

/// The name a source goes by in stats.
pub(crate) fn source_name(source: Option<FeedbackSource>) -> &'static str {
    match source {
        Some(FeedbackSource::EndUser) => "end_user",
        Some(FeedbackSource::Annotator) => "annotator",
        Some(FeedbackSource::LlmJudge) => "llm_judge",
        None => "unknown",
    }
}
