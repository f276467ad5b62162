//! Feedback → training data. This module owns the one place where human judgements on answers
//! become examples a trainer can use: preference pairs with margins (reward model, DPO),
//! pointwise examples (KTO), per-step labels (process reward models) and per-aspect targets;
//! the deterministic train/eval split by conversation; TRL-format JSONL export; the one way in
//! for data from files (`io`: TRL preference and policy files, Anthropic HH-RLHF); and a
//! fingerprint for lineage; and the audit of the feedback itself (`audit`: the per-user influence
//! cap the builder applies, burst detection, rater agreement).
//!
//! Why it is separate from `feedback`: the store keeps what people said, faithfully; how that
//! becomes a learning signal (weights, which answers pair up, what a tie means) is a modelling
//! choice that changes with the options, so it lives here, is pure, and counts everything it
//! drops (see [`DropReason`]). The same store and options always give byte-identical output.
//! docs/dataset.md explains the rules with examples.

pub mod audit;
mod build;
pub mod examples;
pub mod export;
pub mod fingerprint;
pub mod io;
mod regenerations;
pub mod split;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::feedback::Store;
use crate::feedback::record::{FeedbackRecord, FeedbackSource};

pub use build::{Aggregation, aggregate};
pub use examples::{
    Answer, AnswerFeedback, AnswerKey, AspectExample, DatasetStats, DropReason, ExampleCounts,
    Examples, PointwiseExample, PreferencePair, StepExample,
};
pub use export::{ExportOptions, ExportSummary, ExportedFile, export, export_with};
pub use fingerprint::Fingerprint;
pub use io::{
    LoadError, PolicyLine, hh_rlhf_pairs, load_policy_jsonl, load_preference_jsonl,
    render_plain_prompt,
};
pub use regenerations::regeneration_candidates;
pub use split::{SplitSide, split, split_side};

/// How much each kind of answer-level signal counts in an answer's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SignalWeights {
    /// One thumb on the whole answer (up = 1, down = 0).
    pub thumb: f64,
    /// One 1–5 rating of the whole answer, scaled to (r − 1) / 4.
    pub rating: f64,
    /// One per-aspect rating, scaled the same. Half by default: people usually rate two aspects
    /// at once, and together they then weigh as much as one overall rating.
    pub aspect: f64,
}

impl Default for SignalWeights {
    fn default() -> Self {
        Self {
            thumb: 1.0,
            rating: 1.0,
            aspect: 0.5,
        }
    }
}

/// How much a record counts by who gave it; 0 leaves that source out entirely.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SourceWeights {
    pub end_user: f64,
    pub annotator: f64,
    pub llm_judge: f64,
    /// Records whose source the API did not say.
    pub unknown: f64,
}

impl Default for SourceWeights {
    fn default() -> Self {
        Self {
            end_user: 1.0,
            annotator: 1.0,
            llm_judge: 1.0,
            unknown: 1.0,
        }
    }
}

impl SourceWeights {
    pub fn of(&self, source: Option<FeedbackSource>) -> f64 {
        match source {
            Some(FeedbackSource::EndUser) => self.end_user,
            Some(FeedbackSource::Annotator) => self.annotator,
            Some(FeedbackSource::LlmJudge) => self.llm_judge,
            None => self.unknown,
        }
    }
}

/// Everything that shapes the dataset. The config maps onto this; defaults are the documented
/// behaviour (docs/dataset.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetOptions {
    pub weights: SignalWeights,
    /// Two answers to the same prompt pair up only when their scores differ by at least this.
    pub min_score_gap: f64,
    /// A pair's margin is its score gap times this (0 gives margin-free pairs).
    pub margin_scale: f64,
    /// Aspects to learn from (empty: all).
    pub aspects: Vec<String>,
    /// Share of conversations held out for evaluation, in [0, 1).
    pub eval_fraction: f64,
    /// Seeds the split: another seed gives another (equally deterministic) split.
    pub seed: u64,
    pub source_weights: SourceWeights,
    /// The per-user influence cap (`audit.max_user_share`): no contributor's records may carry
    /// more than this share of the summed record weights; `None` turns the cap off.
    #[serde(default)]
    pub max_user_share: Option<f64>,
    /// The weight of constitution pairs (`constitution.weight`), separate from human feedback:
    /// 0 leaves them out of the dataset.
    #[serde(default = "one")]
    pub constitution_weight: f64,
    /// The weight of AI-labelled pairs (`rlaif.weight` when `rlaif.enabled`, else 0), separate
    /// from human feedback: 0 leaves them out of the dataset.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ai_feedback_weight: f64,
}

fn is_zero(w: &f64) -> bool {
    *w == 0.0
}

fn one() -> f64 {
    1.0
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            weights: SignalWeights::default(),
            min_score_gap: 0.25,
            margin_scale: 1.0,
            aspects: Vec::new(),
            eval_fraction: 0.1,
            seed: 0,
            source_weights: SourceWeights::default(),
            max_user_share: None,
            constitution_weight: 1.0,
            ai_feedback_weight: 0.0,
        }
    }
}

/// Options that cannot build a dataset; the message names the option and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid dataset option `{option}`: {problem}\nhint: {hint}")]
pub struct InvalidOptions {
    pub option: &'static str,
    pub problem: String,
    pub hint: &'static str,
}

impl DatasetOptions {
    /// Checks what the types cannot: finite, non-negative weights and a usable eval fraction.
    pub fn validate(&self) -> Result<(), InvalidOptions> {
        let weights: [(&'static str, f64); 11] = [
            ("weights.thumb", self.weights.thumb),
            ("weights.rating", self.weights.rating),
            ("weights.aspect", self.weights.aspect),
            ("source_weights.end_user", self.source_weights.end_user),
            ("source_weights.annotator", self.source_weights.annotator),
            ("source_weights.llm_judge", self.source_weights.llm_judge),
            ("source_weights.unknown", self.source_weights.unknown),
            ("min_score_gap", self.min_score_gap),
            ("margin_scale", self.margin_scale),
            ("constitution_weight", self.constitution_weight),
            ("ai_feedback_weight", self.ai_feedback_weight),
        ];
        for (option, value) in weights {
            if !value.is_finite() || value < 0.0 {
                return Err(InvalidOptions {
                    option,
                    problem: format!("must be a finite number >= 0, got {value}"),
                    hint: "use 0 to switch a signal or source off, 1 to count it normally",
                });
            }
        }
        if self.min_score_gap > 1.0 {
            return Err(InvalidOptions {
                option: "min_score_gap",
                problem: format!(
                    "scores lie in [0, 1], so a gap of {} can never be reached",
                    self.min_score_gap
                ),
                hint: "0.25 pairs answers one rating point apart",
            });
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(InvalidOptions {
                option: "eval_fraction",
                problem: format!("must be in [0, 1), got {}", self.eval_fraction),
                hint: "0.1 holds out a tenth of the conversations; 0 holds out none",
            });
        }
        if let Some(cap) = self.max_user_share
            && !(cap > 0.0 && cap <= 1.0)
        {
            return Err(InvalidOptions {
                option: "max_user_share",
                problem: format!("must be in (0, 1], got {cap}"),
                hint: "0.2 lets no user supply more than a fifth of the training signal; 1 turns the cap off",
            });
        }
        Ok(())
    }
}

/// A built dataset: split examples, what happened on the way, and the fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dataset {
    pub train: Examples,
    pub eval: Examples,
    pub stats: DatasetStats,
    pub fingerprint: Fingerprint,
    pub options: DatasetOptions,
}

/// Builds the dataset from records (each id once, its newest version: what the store holds).
pub fn build(
    records: impl IntoIterator<Item = FeedbackRecord>,
    options: &DatasetOptions,
) -> Result<Dataset, InvalidOptions> {
    options.validate()?;
    let records: Vec<FeedbackRecord> = records.into_iter().collect();
    let mut aggregation = Aggregation::new(options);
    if let Some(cap) = options.max_user_share {
        let mut totals = build::ContributorTotals::default();
        for record in &records {
            totals.add(options, record);
        }
        aggregation = aggregation.with_user_factors(totals.factors(cap));
    }
    for record in records {
        aggregation.add(record);
    }
    Ok(finish(aggregation, options))
}

/// Builds the dataset from every live record of the store (tombstones and edits already applied
/// there). Pairs made by AI join the human pairs, each marked with its `source` and weighted
/// separately from human feedback (a weight of 0 leaves them out): those of the last
/// `rlhf-bot constitution` run (`constitution::pairs`, `constitution_weight`) and those of the
/// last `rlhf-bot rlaif` run when its AI labels passed the agreement check (`rlaif::pairs`,
/// `ai_feedback_weight`).
pub fn build_from_store(store: &Store, options: &DatasetOptions) -> Result<Dataset> {
    options.validate()?;
    let aggregation = aggregate_store(store, options)?;
    let store_dir = store.path().parent().unwrap_or(std::path::Path::new("."));
    Ok(finish_with(
        aggregation,
        options,
        ai_pairs(store_dir, options)?,
    ))
}

/// The store's answers with their feedback, as [`build_from_store`] sees them.
pub fn answers_from_store(store: &Store, options: &DatasetOptions) -> Result<Vec<Answer>> {
    options.validate()?;
    Ok(aggregate_store(store, options)?.finish().0)
}

/// Every live record of the store filed under its answer, streaming them: twice when the
/// influence cap is on, once to weigh each contributor and once to file.
fn aggregate_store(store: &Store, options: &DatasetOptions) -> Result<Aggregation> {
    let mut aggregation = Aggregation::new(options);
    if let Some(cap) = options.max_user_share {
        let mut totals = build::ContributorTotals::default();
        store.for_each_record(|record| {
            totals.add(options, &record);
            Ok(())
        })?;
        aggregation = aggregation.with_user_factors(totals.factors(cap));
    }
    store.for_each_record(|record| {
        aggregation.add(record);
        Ok(())
    })?;
    Ok(aggregation)
}

/// The pairs made by AI kept beside the store, as preference pairs with their source and weight.
fn ai_pairs(store_dir: &std::path::Path, options: &DatasetOptions) -> Result<Vec<PreferencePair>> {
    let ai_pair = |prompt,
                   chosen,
                   rejected,
                   conversation_id,
                   ids: (String, String),
                   source: &str,
                   weight: f64| PreferencePair {
        prompt,
        chosen,
        rejected,
        margin: 0.0,
        conversation_id,
        chosen_id: ids.0,
        rejected_id: ids.1,
        source: Some(source.to_string()),
        weight: Some(weight as f32),
    };
    let mut out = Vec::new();
    if options.constitution_weight > 0.0
        && let Some(c) = crate::constitution::pairs::read_current(store_dir)?
    {
        for (i, p) in c.pairs.into_iter().enumerate() {
            out.push(ai_pair(
                p.prompt,
                p.chosen,
                p.rejected,
                p.conversation_id,
                (
                    format!("constitution-{i}-revised"),
                    format!("constitution-{i}-original"),
                ),
                crate::constitution::pairs::SOURCE,
                options.constitution_weight,
            ));
        }
    }
    if options.ai_feedback_weight > 0.0
        && let Some(f) = crate::rlaif::pairs::read_current(store_dir)?
        && f.summary.state.is_on()
    {
        for p in f.pairs {
            out.push(ai_pair(
                p.prompt,
                p.chosen,
                p.rejected,
                p.conversation_id,
                (p.chosen_id, p.rejected_id),
                crate::rlaif::pairs::SOURCE,
                options.ai_feedback_weight,
            ));
        }
    }
    Ok(out)
}

fn finish(aggregation: Aggregation, options: &DatasetOptions) -> Dataset {
    finish_with(aggregation, options, Vec::new())
}

fn finish_with(
    aggregation: Aggregation,
    options: &DatasetOptions,
    ai_pairs: Vec<PreferencePair>,
) -> Dataset {
    let (answers, mut stats) = aggregation.finish();
    let mut examples = build::examples(&answers, options, &mut stats);
    examples.pairs.extend(ai_pairs);
    let (train, eval) = split(examples, options.eval_fraction, options.seed);
    stats.train = train.counts();
    stats.eval = eval.counts();
    stats.train_conversations = conversations(&train).len() as u64;
    stats.eval_conversations = conversations(&eval).len() as u64;
    let fingerprint = Fingerprint::of(&train, &eval);
    Dataset {
        train,
        eval,
        stats,
        fingerprint,
        options: options.clone(),
    }
}

/// Every conversation id an example set mentions, with how many examples each has.
pub fn conversations(examples: &Examples) -> BTreeMap<&str, u64> {
    let mut out: BTreeMap<&str, u64> = BTreeMap::new();
    let ids = examples
        .pairs
        .iter()
        .map(|e| e.conversation_id.as_str())
        .chain(
            examples
                .pointwise
                .iter()
                .map(|e| e.conversation_id.as_str()),
        )
        .chain(examples.steps.iter().map(|e| e.conversation_id.as_str()))
        .chain(examples.aspects.iter().map(|e| e.conversation_id.as_str()));
    for id in ids {
        *out.entry(id).or_default() += 1;
    }
    out
}
