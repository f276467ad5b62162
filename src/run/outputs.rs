//! The contract between training and reporting: what a training run leaves in its output
//! directory, as plain serde structs.
//!
//! Trainers write `metrics.json` (one summary object) and `log.jsonl` (one JSON object per
//! optimiser step, plus one per evaluation, flushed as written); the report, the registry entry and the decision read them back. Keeping this contract in
//! one module, with public fields and constructors, lets the training and reporting code evolve
//! apart without guessing each other's key names. Log lines keep TRL's metric names so a reviewer
//! who knows TRL reads our plots without a legend. Readers tolerate unknown keys, so a trainer can
//! log more than the report uses.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// File names inside a run output directory.
pub const METRICS_FILE: &str = "metrics.json";
pub const LOG_FILE: &str = "log.jsonl";
/// What the candidate of a run directory was evaluated against ([`Baseline`]).
pub const BASELINE_FILE: &str = "baseline.json";

/// Log keys written by the reward trainer and the policy trainers (TRL's names).
pub mod keys {
    pub const LOSS: &str = "loss";
    pub const ACCURACY: &str = "accuracy";
    pub const MARGIN: &str = "margin";
    pub const LEARNING_RATE: &str = "learning_rate";
    pub const GRAD_NORM: &str = "grad_norm";
    pub const MEAN_REWARD: &str = "mean_reward";
    pub const EPOCH: &str = "epoch";
    // PPO
    pub const KL: &str = "objective/kl";
    pub const ENTROPY: &str = "objective/entropy";
    pub const RLHF_REWARD: &str = "objective/rlhf_reward";
    pub const SCORES: &str = "objective/scores";
    pub const APPROX_KL: &str = "policy/approxkl_avg";
    pub const CLIPFRAC: &str = "policy/clipfrac_avg";
    pub const POLICY_LOSS: &str = "loss/policy_avg";
    pub const VALUE_LOSS: &str = "loss/value_avg";
    pub const VALUE_CLIPFRAC: &str = "val/clipfrac_avg";
    // DPO / KTO
    pub const REWARDS_CHOSEN: &str = "rewards/chosen";
    pub const REWARDS_REJECTED: &str = "rewards/rejected";
    pub const REWARDS_ACCURACIES: &str = "rewards/accuracies";
    pub const REWARDS_MARGINS: &str = "rewards/margins";
    pub const LOGPS_CHOSEN: &str = "logps/chosen";
    pub const LOGPS_REJECTED: &str = "logps/rejected";
    // GRPO / RLOO
    pub const REWARD: &str = "reward";
    pub const REWARD_STD: &str = "reward_std";
    pub const FRAC_REWARD_ZERO_STD: &str = "frac_reward_zero_std";
    /// Token-mean KL to the reference (GRPO: k3 in the loss; RLOO: k1 in the reward).
    pub const GROUP_KL: &str = "kl";
    pub const CLIP_RATIO_REGION: &str = "clip_ratio/region_mean";
    pub const COMPLETIONS_MEAN_LENGTH: &str = "completions/mean_length";
}

#[derive(Debug, thiserror::Error)]
pub enum RunOutputError {
    #[error("{} not found\nhint: run the training stage first, or pass the run's output directory", path.display())]
    Missing { path: PathBuf },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: at `{key}`: {message}\nhint: the file does not follow the run-output contract (src/run/outputs.rs)", path.display())]
    Json {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Throughput and length of a training run (reward and policy alike).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    pub steps: u64,
    pub seconds: f64,
    pub examples_per_second: f64,
    pub tokens_per_second: f64,
    pub epochs: f64,
    /// The precision of the big matrix products (`f32` or `bf16`; see `kernels::precision`);
    /// absent in runs written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
}

/// The examples a run trained on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Examples per kind: `pairs`, `pointwise`, `steps`, `train`, `eval`, ...
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    pub examples_sha256: String,
}

impl DatasetInfo {
    /// The lineage of a JSONL training file (the policy's data): its non-blank line count as
    /// `examples`, and the sha256 of its bytes.
    pub fn of_jsonl(file: &Path) -> Result<Self, RunOutputError> {
        use sha2::Digest as _;
        let bytes = fs::read(file).map_err(|source| RunOutputError::Io {
            op: "read",
            path: file.to_path_buf(),
            source,
        })?;
        let lines = bytes
            .split(|b| *b == b'\n')
            .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
            .count() as u64;
        Ok(Self {
            counts: BTreeMap::from([("examples".to_string(), lines)]),
            examples_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        })
    }

    /// The registry's record of this dataset, at the feedback store's `watermark`.
    pub fn snapshot(&self, watermark: impl Into<String>) -> crate::registry::FeedbackSnapshot {
        crate::registry::FeedbackSnapshot {
            watermark: watermark.into(),
            counts: self.counts.clone(),
            examples_sha256: self.examples_sha256.clone(),
        }
    }
}

/// A reward model's evaluation on the held-out split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardEval {
    /// Pairwise accuracy: the share of pairs where the chosen answer scores higher.
    pub accuracy: f64,
    pub loss: f64,
    /// Number of evaluation pairs.
    pub n: u64,
    /// Mean of (chosen score - rejected score).
    pub mean_margin: f64,
    /// Per-aspect error (e.g. `accuracy`, `helpfulness`): the aspect head's mean absolute error
    /// against ratings scaled to `[0, 1]` (the same number as `aspects.<name>.mae`; the report
    /// reads it here).
    #[serde(default)]
    pub aspect_errors: BTreeMap<String, f64>,
    /// Accuracy on per-reasoning-step labels (step head logit > 0 ⇔ step marked correct), when
    /// the evaluation split has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_accuracy: Option<f64>,
    /// Labelled steps behind `step_accuracy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_n: Option<u64>,
    /// Accuracy on thumbs of single answers (score > 0 ⇔ thumb up), when the split has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointwise_accuracy: Option<f64>,
    /// Thumbs behind `pointwise_accuracy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointwise_n: Option<u64>,
    /// Per aspect head: error against the held-out aspect ratings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aspects: BTreeMap<String, AspectEval>,
}

/// One aspect head on the evaluation split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AspectEval {
    /// Mean absolute error on the rating scaled to `[0, 1]` (× 4 gives stars on a 1–5 scale).
    pub mae: f64,
    /// Answers rated on this aspect.
    pub n: u64,
}

/// `metrics.json` of a reward-model run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardMetrics {
    pub eval: RewardEval,
    pub train: TrainStats,
    pub dataset: DatasetInfo,
    /// The production reward model scored on the same evaluation split (absent on the first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_eval: Option<RewardEval>,
}

impl RewardMetrics {
    /// The flat metric map recorded in the registry entry.
    pub fn registry_metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        m.insert("eval_accuracy".to_string(), self.eval.accuracy);
        m.insert("eval_loss".to_string(), self.eval.loss);
        m.insert("eval_mean_margin".to_string(), self.eval.mean_margin);
        m.insert("eval_n".to_string(), self.eval.n as f64);
        if let Some(s) = self.eval.step_accuracy {
            m.insert("eval_step_accuracy".to_string(), s);
        }
        if let Some(s) = self.eval.pointwise_accuracy {
            m.insert("eval_pointwise_accuracy".to_string(), s);
        }
        for (name, a) in &self.eval.aspects {
            m.insert(format!("eval_aspect_mae_{name}"), a.mae);
        }
        m.insert("train_steps".to_string(), self.train.steps as f64);
        m.insert("train_seconds".to_string(), self.train.seconds);
        m.retain(|_, v| v.is_finite());
        m
    }
}

/// The policy algorithm that produced a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAlgo {
    Ppo,
    Dpo,
    Kto,
    Grpo,
    Rloo,
}

impl PolicyAlgo {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAlgo::Ppo => "ppo",
            PolicyAlgo::Dpo => "dpo",
            PolicyAlgo::Kto => "kto",
            PolicyAlgo::Grpo => "grpo",
            PolicyAlgo::Rloo => "rloo",
        }
    }

    /// Samples its own completions each step (PPO, GRPO, RLOO): counts steps, not epochs.
    pub fn is_online(self) -> bool {
        matches!(self, PolicyAlgo::Ppo | PolicyAlgo::Grpo | PolicyAlgo::Rloo)
    }

    /// Takes dense step rewards (`policy.reward.step_weight`) in its per-token advantage: the
    /// critic-free algorithms. PPO's advantage comes from its value head, DPO and KTO sample nothing.
    pub fn takes_step_rewards(self) -> bool {
        matches!(self, PolicyAlgo::Grpo | PolicyAlgo::Rloo)
    }
}

/// One evaluation prompt answered by the candidate and by production, with reward-model scores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySample {
    pub prompt: String,
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production: Option<String>,
    pub candidate_reward: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_reward: Option<f64>,
}

/// A policy's evaluation against the production policy (or the base model on the first run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyEval {
    /// Share of prompts where the reward model prefers the candidate's answer (ties count half).
    pub win_rate: f64,
    /// 95% confidence interval of `win_rate`.
    pub win_rate_low: f64,
    pub win_rate_high: f64,
    pub n: u64,
    pub mean_reward: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_mean_reward: Option<f64>,
    /// Mean KL(candidate || reference) per response, in nats.
    pub kl: f64,
    /// Mean response length in tokens.
    pub response_length: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_response_length: Option<f64>,
    #[serde(default)]
    pub samples: Vec<PolicySample>,
    /// With `policy.reward` configured: each reward component's mean on the held-out prompts
    /// before and after training.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reward_components: Vec<RewardComponentEval>,
    /// With a step head on the reward model: the mean probability it gives the steps of the
    /// candidate's held-out answers (and of production's) of being right (`train::step_rewards`
    /// splits the answers into steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_step_score: Option<f64>,
}

/// One component of the policy's reward (`policy.reward`) on the held-out prompts: its mean for
/// the initial policy's answers and for the trained policy's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardComponentEval {
    /// `reward_model` (the score), an aspect name, or a rule (`length_penalty`, `format_regex`,
    /// `missing_eos`).
    pub name: String,
    pub weight: f64,
    pub before: f64,
    pub after: f64,
}

/// `metrics.json` of a policy run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyMetrics {
    pub algo: PolicyAlgo,
    pub eval: PolicyEval,
    pub train: TrainStats,
    /// The objective's metrics at the last training step, under TRL's names (`log.jsonl`'s last
    /// training line: GRPO/RLOO's `reward`, `reward_std`, `kl`, `clip_ratio/*`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub last_step: BTreeMap<String, f64>,
}

impl PolicyMetrics {
    /// The flat metric map recorded in the registry entry.
    pub fn registry_metrics(&self) -> BTreeMap<String, f64> {
        let e = &self.eval;
        let mut m = BTreeMap::new();
        m.insert("win_rate".to_string(), e.win_rate);
        m.insert("win_rate_low".to_string(), e.win_rate_low);
        m.insert("win_rate_high".to_string(), e.win_rate_high);
        m.insert("eval_n".to_string(), e.n as f64);
        m.insert("mean_reward".to_string(), e.mean_reward);
        m.insert("kl".to_string(), e.kl);
        m.insert("response_length".to_string(), e.response_length);
        m.insert("train_steps".to_string(), self.train.steps as f64);
        m.insert("train_seconds".to_string(), self.train.seconds);
        m.retain(|_, v| v.is_finite());
        m
    }
}

/// One line of `log.jsonl`: the step and every numeric value logged at it. Reading keeps numbers
/// and ignores other values (strings, nulls, nested objects), so trainers may log freely.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LogLine {
    pub step: u64,
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

impl LogLine {
    pub fn new(step: u64) -> Self {
        Self {
            step,
            values: BTreeMap::new(),
        }
    }

    /// Builder-style insert: `LogLine::new(3).with(keys::LOSS, 0.61)`.
    pub fn with(mut self, key: &str, value: f64) -> Self {
        self.values.insert(key.to_string(), value);
        self
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).copied()
    }
}

impl<'de> Deserialize<'de> for LogLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let step = map
            .get("step")
            .ok_or_else(|| D::Error::missing_field("step"))?
            .as_u64()
            .ok_or_else(|| D::Error::custom("`step` must be a non-negative integer"))?;
        let values = map
            .into_iter()
            .filter(|(k, _)| k != "step")
            .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
            .collect();
        Ok(Self { step, values })
    }
}

/// The series of one key across a log: (step, value) pairs, non-finite values dropped.
pub fn series(log: &[LogLine], key: &str) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|l| {
            l.get(key)
                .filter(|v| v.is_finite())
                .map(|v| (l.step as f64, v))
        })
        .collect()
}

/// Appends log lines to `log.jsonl`, one flushed line per call so a killed run keeps its curve.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    out: BufWriter<fs::File>,
}

impl LogWriter {
    /// Creates (truncating) `dir/log.jsonl`.
    pub fn create(dir: &Path) -> Result<Self, RunOutputError> {
        fs::create_dir_all(dir).map_err(|source| RunOutputError::Io {
            op: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(LOG_FILE);
        let file = fs::File::create(&path).map_err(|source| RunOutputError::Io {
            op: "create",
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, line: &LogLine) -> Result<(), RunOutputError> {
        let text = serde_json::to_string(line).map_err(|e| RunOutputError::Json {
            path: self.path.clone(),
            key: "".into(),
            message: e.to_string(),
        })?;
        let io = |source| RunOutputError::Io {
            op: "write",
            path: self.path.clone(),
            source,
        };
        writeln!(self.out, "{text}").map_err(io)?;
        self.out.flush().map_err(|source| RunOutputError::Io {
            op: "write",
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `value` as pretty JSON to `dir/metrics.json` (creating `dir`).
pub fn write_metrics<T: Serialize>(dir: &Path, value: &T) -> Result<PathBuf, RunOutputError> {
    write_json(dir, METRICS_FILE, value)
}

/// Writes `value` as pretty JSON to `dir/name` (creating `dir`).
fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<PathBuf, RunOutputError> {
    fs::create_dir_all(dir).map_err(|source| RunOutputError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).map_err(|e| RunOutputError::Json {
        path: path.clone(),
        key: "".into(),
        message: e.to_string(),
    })?;
    fs::write(&path, text + "\n").map_err(|source| RunOutputError::Io {
        op: "write",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Reads `dir/metrics.json` into `T`, naming the offending key on error.
pub fn read_metrics<T: DeserializeOwned>(dir: &Path) -> Result<T, RunOutputError> {
    read_json(dir, METRICS_FILE)
}

/// Reads `dir/name` into `T`, naming the offending key on error.
fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<T, RunOutputError> {
    let path = dir.join(name);
    let text = read(&path)?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| RunOutputError::Json {
        path: path.clone(),
        key: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Reads `dir/log.jsonl`. Blank lines are skipped; a malformed line is an error naming its line
/// number, except a torn last line (a run killed mid-write), which is dropped.
pub fn read_log(dir: &Path) -> Result<Vec<LogLine>, RunOutputError> {
    let path = dir.join(LOG_FILE);
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RunOutputError::Missing { path });
        }
        Err(source) => {
            return Err(RunOutputError::Io {
                op: "read",
                path,
                source,
            });
        }
    };
    let lines: Vec<String> = io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| RunOutputError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<LogLine>(line) {
            Ok(l) => out.push(l),
            Err(e) if e.is_eof() && Some(i) == last => break,
            Err(e) => {
                return Err(RunOutputError::Line {
                    path: path.clone(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String, RunOutputError> {
    fs::read_to_string(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            RunOutputError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            RunOutputError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// What a candidate was compared with in its evaluation, and why. The report states it word for
/// word, so a reviewer never reads "vs production" when production could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// The registry id of the production model the candidate was compared with, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_id: Option<String>,
    /// A production model that exists but could not be used (it failed verification or did not
    /// load): the candidate was compared with something else, and the report says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable_production: Option<UnusableProduction>,
    /// For people, Markdown-safe and path-free: "production `policy-…`", "the base model".
    pub against: String,
    /// Why this baseline, for people (path-free).
    pub reason: String,
}

/// A production model that was skipped, with a path-free reason ("checksum mismatch in …").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnusableProduction {
    pub id: String,
    pub reason: String,
}

impl Baseline {
    /// Writes `dir/baseline.json`.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, RunOutputError> {
        write_json(dir, BASELINE_FILE, self)
    }

    /// Reads `dir/baseline.json`; `None` when a run predates the file.
    pub fn read(dir: &Path) -> Result<Option<Self>, RunOutputError> {
        if !dir.join(BASELINE_FILE).is_file() {
            return Ok(None);
        }
        read_json(dir, BASELINE_FILE).map(Some)
    }
}

/// A training run's output directory, loaded: its `metrics.json` (of type `M`) and its log.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutput<M> {
    pub metrics: M,
    pub log: Vec<LogLine>,
}

/// A reward run's output directory, loaded.
pub type RewardRunOutput = RunOutput<RewardMetrics>;

/// A policy run's output directory, loaded.
pub type PolicyRunOutput = RunOutput<PolicyMetrics>;

impl<M: Serialize + DeserializeOwned> RunOutput<M> {
    pub fn load(dir: &Path) -> Result<Self, RunOutputError> {
        Ok(Self {
            metrics: read_metrics(dir)?,
            log: read_log(dir)?,
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), RunOutputError> {
        write_metrics(dir, &self.metrics)?;
        let mut w = LogWriter::create(dir)?;
        self.log.iter().try_for_each(|l| w.write(l))
    }
}
