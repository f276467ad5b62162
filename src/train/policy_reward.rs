//! The reward an online policy objective (PPO, GRPO, RLOO) trains on, as named components
//! (`policy.reward`): the reward model's final score and its per-aspect heads, each with a
//! configured weight, plus rule rewards computed from the answer alone — a length penalty, a
//! format regex and a missing-EOS penalty.
//!
//! GRPO and RLOO take the components as separate reward functions (TRL's `reward_funcs` with
//! `reward_weights`), so their advantages can aggregate them either way and TRL logs each one as
//! `rewards/<name>/mean|std`; PPO takes the weighted sum. Without a `policy.reward` section the
//! reward is the score alone, as a single function named `reward_model` (TRL names a reward
//! function after its model), so runs that predate the section log what they always did.
//!
//! [`RewardOptions`] is the section as written (serde, unknown keys refused) with its
//! model-independent checks ([`RewardOptions::problem`]); [`PolicyReward`] is it resolved against
//! a loaded reward model, which is where an aspect name is known to exist or not.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::tokenizer::Tokenizer;
use crate::train::reward_scorer::{ModelRewards, RewardScorer, StepQuery, joined_rows};
use crate::train::step_rewards::{ScoredSteps, last_token_before, split_steps, token_spans};

/// The reward model's final score in `policy.reward.weights`.
pub const SCORE_KEY: &str = "score";
/// The score component's name in metrics (TRL's name for a reward-model function).
pub const SCORE_NAME: &str = "reward_model";
/// The rule components' names (their keys under `policy.reward.rules`).
pub const LENGTH_PENALTY: &str = "length_penalty";
pub const FORMAT_REGEX: &str = "format_regex";
pub const MISSING_EOS: &str = "missing_eos";

/// `policy.reward` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardOptions {
    /// `score` and/or aspect names → weight. Empty: the score alone, weight 1.
    pub weights: BTreeMap<String, f64>,
    pub rules: RuleOptions,
    /// Dense step rewards (GRPO, RLOO): the weight of the step head's score of each reasoning step in
    /// the advantage of that step's tokens (`train::step_rewards`); 0 is off.
    pub step_weight: f64,
}

/// `policy.reward.rules`: rewards computed from the answer alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleOptions {
    pub length_penalty: Option<LengthPenalty>,
    pub format_regex: Option<FormatRegex>,
    /// Added when an answer ends without EOS (cut at `max_completion_length`); e.g. -1.
    pub missing_eos: Option<f64>,
}

/// `−per_token × max(0, answer tokens − over)`: with `over: 0`, a penalty on every token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthPenalty {
    pub per_token: f64,
    #[serde(default)]
    pub over: usize,
}

/// `reward` when the answer's text matches `pattern` (anywhere; anchor it with `^…$`), else 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatRegex {
    pub pattern: String,
    pub reward: f64,
}

impl RewardOptions {
    /// Whether the section asks for anything beyond the score alone.
    pub fn is_configured(&self) -> bool {
        !self.weights.is_empty() || self.rules != RuleOptions::default()
    }

    /// The first key (under `policy.reward`) holding a value no reward can be built from, and
    /// why. Aspect names are checked against the reward model when it is loaded.
    pub fn problem(&self) -> Option<(String, String)> {
        if !(self.step_weight.is_finite() && self.step_weight >= 0.0) {
            return Some((
                "step_weight".into(),
                format!(
                    "expected a number >= 0 (0 turns step rewards off), got {}",
                    self.step_weight
                ),
            ));
        }
        for (name, w) in &self.weights {
            if !w.is_finite() {
                return Some((
                    format!("weights.{name}"),
                    format!("expected a finite number, got {w}"),
                ));
            }
        }
        let r = &self.rules;
        if let Some(p) = &r.length_penalty
            && !(p.per_token.is_finite() && p.per_token >= 0.0)
        {
            return Some((
                "rules.length_penalty.per_token".into(),
                format!(
                    "expected a number >= 0 (it is subtracted per token), got {}",
                    p.per_token
                ),
            ));
        }
        if let Some(f) = &r.format_regex {
            if let Err(e) = Regex::new(&f.pattern) {
                return Some((
                    "rules.format_regex.pattern".into(),
                    format!(
                        "not a valid regular expression: {e}\nhint: the syntax is Rust's `regex` crate (no look-around or back-references)"
                    ),
                ));
            }
            if !f.reward.is_finite() {
                return Some((
                    "rules.format_regex.reward".into(),
                    format!("expected a finite number, got {}", f.reward),
                ));
            }
        }
        if let Some(v) = r.missing_eos.filter(|v| !v.is_finite()) {
            return Some((
                "rules.missing_eos".into(),
                format!("expected a finite number, got {v}"),
            ));
        }
        None
    }
}

/// Where a component's value comes from.
#[derive(Debug, Clone)]
enum Source {
    Score,
    /// Column of the reward model's aspect output.
    Aspect(usize),
    Length(LengthPenalty),
    Format(Regex, f64),
    MissingEos(f64),
}

/// One named, weighted part of the reward.
#[derive(Debug, Clone)]
struct Component {
    name: String,
    weight: f64,
    source: Source,
}

/// The answers one reward evaluation scores: the prompts (text and the policy's ids) and the
/// answers (ids, decoded text, whether each ended with EOS), row for row.
#[derive(Debug, Clone, Copy)]
pub struct ScoredAnswers<'a> {
    pub prompts: &'a [&'a str],
    pub prompt_ids: &'a [Vec<u32>],
    pub answer_ids: &'a [Vec<u32>],
    pub answer_texts: &'a [String],
    pub finished: &'a [bool],
}

/// Splits each answer into steps (`step_rewards::split_steps`) and gives, per step, the policy
/// answer token that ends it and the step head's probability that the step is right. `tok` is
/// the policy's tokenizer (the answers' ids are its).
pub fn answer_steps(
    rm: &RewardScorer,
    tok: &Tokenizer,
    a: &ScoredAnswers<'_>,
) -> Result<Vec<ScoredSteps>> {
    let spans = a
        .answer_ids
        .iter()
        .map(|ids| token_spans(tok, ids))
        .collect::<Result<Vec<_>>>()?;
    let ends: Vec<Vec<usize>> = a.answer_texts.iter().map(|t| split_steps(t)).collect();
    let queries: Vec<StepQuery<'_>> = (0..a.answer_texts.len())
        .map(|i| StepQuery {
            prompt: a.prompts[i],
            answer: &a.answer_texts[i],
            prompt_ids: &a.prompt_ids[i],
            answer_ids: &a.answer_ids[i],
            answer_spans: &spans[i],
            step_ends: &ends[i],
        })
        .collect();
    let probs = rm.step_probabilities(&queries)?;
    Ok(ends
        .iter()
        .zip(&spans)
        .zip(probs)
        .map(|((ends, spans), probabilities)| ScoredSteps {
            last_tokens: ends.iter().map(|e| last_token_before(spans, *e)).collect(),
            probabilities,
        })
        .collect())
}

/// The policy's reward resolved against a loaded reward model.
#[derive(Debug, Clone)]
pub struct PolicyReward {
    components: Vec<Component>,
    configured: bool,
}

impl PolicyReward {
    /// Resolves `opts` against `rm`'s heads: an aspect in `weights` must be one of them.
    pub fn new(opts: &RewardOptions, rm: &RewardScorer) -> Result<Self> {
        Self::with_aspects(opts, &rm.aspect_names())
    }

    /// [`Self::new`] for a reward model whose aspect heads are `aspects` (in its output order).
    pub fn with_aspects(opts: &RewardOptions, aspects: &[String]) -> Result<Self> {
        if let Some((key, message)) = opts.problem() {
            bail!("policy.reward.{key}: {message}");
        }
        let mut components = Vec::new();
        let score_weight = if opts.weights.is_empty() {
            Some(1.0)
        } else {
            opts.weights.get(SCORE_KEY).copied()
        };
        if let Some(w) = score_weight {
            components.push(Component {
                name: SCORE_NAME.into(),
                weight: w,
                source: Source::Score,
            });
        }
        for (name, &weight) in opts.weights.iter().filter(|(k, _)| *k != SCORE_KEY) {
            let Some(col) = aspects.iter().position(|a| a == name) else {
                let have = if aspects.is_empty() {
                    "none".to_string()
                } else {
                    aspects.join(", ")
                };
                bail!(
                    "policy.reward.weights.{name}: {name:?} is not an aspect of the reward model (its aspects: {have})\nhint: use `{SCORE_KEY}` or one of its aspects, or train the reward model with `{name}` in feedback.aspects"
                );
            };
            if [LENGTH_PENALTY, FORMAT_REGEX, MISSING_EOS, SCORE_NAME].contains(&name.as_str()) {
                bail!(
                    "policy.reward.weights.{name}: the aspect name {name:?} is also a component's name, so their metrics would collide\nhint: rename the aspect in feedback.aspects"
                );
            }
            components.push(Component {
                name: name.clone(),
                weight,
                source: Source::Aspect(col),
            });
        }
        let r = &opts.rules;
        let rule = |name: &str, source| Component {
            name: name.into(),
            weight: 1.0,
            source,
        };
        if let Some(p) = &r.length_penalty {
            components.push(rule(LENGTH_PENALTY, Source::Length(p.clone())));
        }
        if let Some(f) = &r.format_regex {
            // Checked by `problem` above.
            let re = Regex::new(&f.pattern)?;
            components.push(rule(FORMAT_REGEX, Source::Format(re, f.reward)));
        }
        if let Some(v) = r.missing_eos {
            components.push(rule(MISSING_EOS, Source::MissingEos(v)));
        }
        if components.is_empty() {
            bail!(
                "policy.reward: no component left (the weights name no `{SCORE_KEY}` or aspect and no rule is set)\nhint: add `{SCORE_KEY}: 1.0` to policy.reward.weights"
            );
        }
        Ok(Self {
            components,
            configured: opts.is_configured(),
        })
    }

    /// Whether `policy.reward` asked for more than the score alone (then the evaluation also
    /// reports each component before and after training).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    pub fn names(&self) -> Vec<String> {
        self.components.iter().map(|c| c.name.clone()).collect()
    }

    pub fn weights(&self) -> Vec<f64> {
        self.components.iter().map(|c| c.weight).collect()
    }

    fn needs_model(&self) -> bool {
        self.components
            .iter()
            .any(|c| matches!(c.source, Source::Score | Source::Aspect(_)))
    }

    /// Each answer's component values, `[rows][components]` in [`Self::names`] order (not
    /// weighted). A non-finite model output is `None` (a function that could not score it).
    pub fn components(
        &self,
        rm: &RewardScorer,
        a: &ScoredAnswers<'_>,
    ) -> Result<Vec<Vec<Option<f64>>>> {
        let n = a.answer_ids.len();
        if [
            a.prompts.len(),
            a.prompt_ids.len(),
            a.answer_texts.len(),
            a.finished.len(),
        ]
        .iter()
        .any(|&len| len != n)
        {
            bail!("reward inputs disagree on the number of answers ({n} answers)");
        }
        let model = if self.needs_model() {
            let (ids, texts) = joined_rows(a.prompts, a.prompt_ids, a.answer_ids, a.answer_texts);
            Some(rm.score_with_aspects(&ids, &texts)?)
        } else {
            None
        };
        Ok(self.table(model.as_ref(), a))
    }

    /// The component table from the reward model's outputs (`None`: not run, so its
    /// components are missing) and the answers.
    fn table(&self, model: Option<&ModelRewards>, a: &ScoredAnswers<'_>) -> Vec<Vec<Option<f64>>> {
        let finite = |x: Option<&f32>| x.map(|&x| f64::from(x)).filter(|v| v.is_finite());
        (0..a.answer_ids.len())
            .map(|i| {
                self.components
                    .iter()
                    .map(|c| match &c.source {
                        Source::Score => finite(model.and_then(|m| m.scores.get(i))),
                        Source::Aspect(k) => {
                            finite(model.and_then(|m| m.aspects.get(i)).and_then(|r| r.get(*k)))
                        }
                        Source::Length(p) => Some(length_penalty(p, a.answer_ids[i].len())),
                        Source::Format(re, reward) => Some(if re.is_match(&a.answer_texts[i]) {
                            *reward
                        } else {
                            0.0
                        }),
                        Source::MissingEos(v) => Some(if a.finished[i] { 0.0 } else { *v }),
                    })
                    .collect()
            })
            .collect()
    }

    /// `Σ_k w_k·value_k` of one row, skipping components that could not score it (TRL's
    /// `nansum`); NaN when none could.
    pub fn weighted(&self, row: &[Option<f64>]) -> f64 {
        crate::train::losses::group_rewards::weighted_rewards(&[row.to_vec()], &self.weights())[0]
    }

    /// `rewards/<name>/mean` of each component over `rows` (NaN-skipping), as TRL logs them.
    pub fn mean_metrics(&self, rows: &[Vec<Option<f64>>]) -> Vec<(String, f64)> {
        self.component_means(rows)
            .into_iter()
            .map(|(name, m)| (format!("rewards/{name}/mean"), m))
            .collect()
    }

    /// Each component's name and its mean over `rows` (NaN-skipping).
    pub fn component_means(&self, rows: &[Vec<Option<f64>>]) -> Vec<(String, f64)> {
        self.components
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let col: Vec<f64> = rows
                    .iter()
                    .map(|r| r.get(k).copied().flatten().unwrap_or(f64::NAN))
                    .collect();
                (c.name.clone(), crate::train::losses::stats::nan_mean(&col))
            })
            .collect()
    }

    /// Each component's weight, by name.
    pub fn weight_of(&self, name: &str) -> Option<f64> {
        self.components
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.weight)
    }
}

/// The length rule's value for an answer of `tokens` tokens.
pub fn length_penalty(p: &LengthPenalty, tokens: usize) -> f64 {
    -p.per_token * tokens.saturating_sub(p.over) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(yaml: &str) -> RewardOptions {
        serde_norway::from_str(yaml).unwrap()
    }

    fn aspects() -> Vec<String> {
        vec!["accuracy".into(), "helpfulness".into()]
    }

    #[test]
    fn rules_score_known_answers() {
        let r = PolicyReward::with_aspects(
            &opts(
                "weights: {helpfulness: 0.5}\nrules:\n  length_penalty: {per_token: 0.25, over: 2}\n  format_regex: {pattern: '^Answer: \\d+$', reward: 0.5}\n  missing_eos: -1.0\n",
            ),
            &aspects(),
        )
        .unwrap();
        assert_eq!(
            r.names(),
            [
                "helpfulness",
                "length_penalty",
                "format_regex",
                "missing_eos"
            ]
        );
        assert_eq!(r.weights(), [0.5, 1.0, 1.0, 1.0]);
        let texts = ["Answer: 42".to_string(), "Answer: forty-two".to_string()];
        let a = ScoredAnswers {
            prompts: &["Q?", "Q?"],
            prompt_ids: &[vec![1], vec![1]],
            answer_ids: &[vec![5, 6, 7, 8, 2], vec![5]],
            answer_texts: &texts,
            finished: &[true, false],
        };
        let model = ModelRewards {
            scores: vec![9.0, 9.0],
            aspects: vec![vec![0.1, 0.7], vec![0.2, f32::NAN]],
        };
        let t = r.table(Some(&model), &a);
        // Row 0: helpfulness is column 1; 5 tokens, 3 over 2; the regex matches; ended with EOS.
        assert_eq!(
            t[0],
            [Some(f64::from(0.7f32)), Some(-0.75), Some(0.5), Some(0.0)]
        );
        // Row 1: a NaN head scores nothing; 1 token is under the limit; no match; no EOS.
        assert_eq!(t[1], [None, Some(0.0), Some(0.0), Some(-1.0)]);
        assert!((r.weighted(&t[0]) - (0.35 - 0.75 + 0.5)).abs() < 1e-6);
        assert_eq!(r.weighted(&t[1]), -1.0);
        let means = r.mean_metrics(&t);
        assert_eq!(means[0].0, "rewards/helpfulness/mean");
        assert_eq!(means[3], ("rewards/missing_eos/mean".to_string(), -0.5));
        // Without any model output the model's components are missing, the rules still count.
        assert_eq!(r.table(None, &a)[0][0], None);
    }

    #[test]
    fn without_a_section_the_reward_is_the_score_alone() {
        let r = PolicyReward::with_aspects(&RewardOptions::default(), &[]).unwrap();
        assert_eq!(
            (r.names(), r.weights()),
            (vec![SCORE_NAME.to_string()], vec![1.0])
        );
        assert!(!r.is_configured());
        let with_score =
            PolicyReward::with_aspects(&opts("weights: {score: 1.0, accuracy: 0.5}"), &aspects())
                .unwrap();
        assert_eq!(with_score.names(), [SCORE_NAME, "accuracy"]);
    }

    #[test]
    fn bad_sections_name_the_key() {
        let e = PolicyReward::with_aspects(&opts("weights: {tone: 1.0}"), &aspects())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policy.reward.weights.tone") && e.contains("accuracy, helpfulness"),
            "{e}"
        );
        let e = PolicyReward::with_aspects(&opts("weights: {tone: 1.0}"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("(its aspects: none)") && e.contains("hint:"),
            "{e}"
        );
        let bad = opts("rules: {format_regex: {pattern: '(unclosed', reward: 1}}");
        let (key, message) = bad.problem().unwrap();
        assert_eq!(key, "rules.format_regex.pattern");
        assert!(
            message.contains("not a valid regular expression"),
            "{message}"
        );
        let (key, _) = opts("rules: {length_penalty: {per_token: -1}}")
            .problem()
            .unwrap();
        assert_eq!(key, "rules.length_penalty.per_token");
    }
}
