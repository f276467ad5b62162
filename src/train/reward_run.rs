//! The reward-model run: turns options (config keys + CLI flags, mapped by `app`) into a
//! trained reward model directory. `app::train_reward` is the async entry point over it.
//!
//! It opens the device, loads (or creates) the backbone and its tokenizer, loads and splits the
//! data — a preference file, or every kind of example the dataset builder makes from the feedback
//! store (pairs, thumbs, ratings, step labels, aspect ratings; see [`train_reward_from_store`]) —
//! adds the extra heads the data needs (aspect heads named by `feedback.aspects`, a step head when
//! there are step labels), runs the loop in `train::reward_trainer`, and writes the run directory
//! the report and the registry read: the model in Hugging Face layout (`config.json`,
//! `model.safetensors` with the heads under `aspect_heads.<name>.*` and `step_head.*`,
//! `tokenizer.json`), `metrics.json` (the `run::outputs` contract), `log.jsonl`, and
//! `checkpoints/`. A model with a non-finite weight is never written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataset::{DatasetOptions, Examples, load_preference_jsonl, render_plain_prompt};
use crate::kernels::precision::{Precision, PrecisionChoice, set_precision};
use crate::model::family::SUPPORTED_MODEL_TYPES;
use crate::model::llama::ExtraHeads;
use crate::model::tokenizer::Tokenizer;
use crate::run::outputs::{self, DatasetInfo, RewardEval, RewardMetrics, TrainStats};
use crate::train::batching::{PairText, PointLabel, PointText, encode_pairs, encode_points};
use crate::train::device::DeviceChoice;
use crate::train::losses::stats::example_weight;
use crate::train::reward_models::{
    AnyReward, BertReward, DEFAULT_TOKENIZER_JSON, LlamaReward, default_llama_config,
};
use crate::train::reward_trainer::{
    self, RewardBackbone, TrainConfig, TrainData, check_weights_finite,
};

/// Everything `train reward` needs. The caller maps config keys and flags onto it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardTrainOptions {
    /// `--model DIR`: a reward model or a base model to start from; `None` trains the small
    /// default llama from scratch.
    pub model: Option<PathBuf>,
    /// `--dataset FILE`: preference pairs as JSON lines (TRL format, see [`load_pairs`]).
    pub dataset: Option<PathBuf>,
    /// `--eval FILE`: held-out pairs; without it `eval_fraction` of the dataset is held out.
    pub eval: Option<PathBuf>,
    /// Share of the pairs held out for evaluation when no eval file is given.
    pub eval_fraction: f64,
    /// `--out DIR`: the run directory.
    pub out: PathBuf,
    /// `--resume`: continue from the newest checkpoint in `out/checkpoints`.
    pub resume: bool,
    /// `--device auto|cpu|cuda`.
    pub device: DeviceChoice,
    /// `reward.precision`: the precision of the big matrix products on the CPU.
    pub precision: PrecisionChoice,
    /// `--production-model DIR`: the current reward model, scored on the same eval set.
    pub production_model: Option<PathBuf>,
    /// Aspect heads to train (`feedback.aspects`); empty: every aspect the data is rated on.
    pub aspects: Vec<String>,
    /// `--epochs`, `--max-length`, `--batch-size`, `--lr` and the rest of the loop's settings.
    pub train: TrainConfig,
}

impl Default for RewardTrainOptions {
    fn default() -> Self {
        Self {
            model: None,
            dataset: None,
            eval: None,
            eval_fraction: 0.2,
            out: PathBuf::from("runs/reward"),
            resume: false,
            device: DeviceChoice::Auto,
            precision: PrecisionChoice::F32,
            production_model: None,
            aspects: Vec::new(),
            train: TrainConfig::default(),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardRunSummary {
    pub out: PathBuf,
    /// The model directory (the run directory itself), absent when the run was interrupted.
    pub model_dir: Option<PathBuf>,
    pub metrics: RewardMetrics,
    pub backbone: String,
    pub stopped_early: bool,
    pub completed: bool,
}

/// The stage, synchronously: loads the data named in `opts` and trains.
pub fn train_reward_blocking(opts: &RewardTrainOptions) -> Result<RewardRunSummary> {
    let dataset = opts.dataset.as_deref().context(
        "no preference dataset given\nhint: pass --dataset FILE (JSON lines with chosen/rejected)",
    )?;
    let pairs = load_pairs(dataset)?;
    let (train, eval) = match &opts.eval {
        Some(path) => (pairs, load_pairs(path)?),
        None => split_pairs(pairs, opts.eval_fraction, opts.train.seed)?,
    };
    train_reward_on(opts, &train, &eval)
}

/// Examples as text, before tokenisation: preference pairs and single-answer examples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TextData {
    pub pairs: Vec<PairText>,
    pub points: Vec<PointText>,
}

impl TextData {
    /// The dataset builder's examples as text. A pointwise example becomes a thumb when its
    /// thumbs have a majority, else a rating (its score in `[0, 1]`); step and aspect examples
    /// keep their labels. Prompts are rendered as `render_plain_prompt` does for the TRL export.
    pub fn from_examples(ex: &Examples) -> Self {
        let pairs = ex
            .pairs
            .iter()
            .map(|p| PairText {
                prompt: render_plain_prompt(&p.prompt),
                chosen: p.chosen.clone(),
                rejected: p.rejected.clone(),
                margin: Some(f64::from(p.margin)),
                weight: p.weight.map(f64::from),
            })
            .collect();
        let pointwise = ex.pointwise.iter().map(|p| PointText {
            prompt: render_plain_prompt(&p.prompt),
            answer: p.completion.clone(),
            label: match p.label {
                Some(up) => PointLabel::Thumb(up),
                None => PointLabel::Rating(f64::from(p.target)),
            },
        });
        let steps = ex.steps.iter().map(|s| PointText {
            prompt: render_plain_prompt(&s.prompt),
            answer: s.completion.clone(),
            label: PointLabel::Steps {
                ends: s.step_ends.clone(),
                labels: s.labels.clone(),
            },
        });
        let aspects = ex.aspects.iter().map(|a| PointText {
            prompt: render_plain_prompt(&a.prompt),
            answer: a.completion.clone(),
            label: PointLabel::Aspects(
                a.targets
                    .iter()
                    .map(|(k, v)| (k.clone(), f64::from(*v)))
                    .collect(),
            ),
        });
        Self {
            pairs,
            points: pointwise.chain(steps).chain(aspects).collect(),
        }
    }

    /// Drops the single-answer examples whose kind has weight 0 (they would train nothing and
    /// need heads that are not there).
    fn weighted(mut self, cfg: &TrainConfig) -> Self {
        let w = &cfg.loss_weights;
        self.points.retain(|p| match p.label {
            PointLabel::Thumb(_) | PointLabel::Rating(_) => w.pointwise != 0.0,
            PointLabel::Steps { .. } => w.steps != 0.0,
            PointLabel::Aspects(_) => w.aspects != 0.0,
        });
        self
    }
}

/// The stage on pairs already in memory.
pub fn train_reward_on(
    opts: &RewardTrainOptions,
    train: &[PairText],
    eval: &[PairText],
) -> Result<RewardRunSummary> {
    let as_data = |pairs: &[PairText]| TextData {
        pairs: pairs.to_vec(),
        points: Vec::new(),
    };
    train_reward_mixed(opts, &as_data(train), &as_data(eval))
}

/// The extra heads `train` needs: aspect heads named by `aspects` (or, when that is empty, by
/// every aspect the data is rated on, sorted) and a step head when it has step labels.
pub fn heads_for(aspects: &[String], train: &TextData, eval: &TextData) -> Result<ExtraHeads> {
    let points = || train.points.iter().chain(&eval.points);
    let rated: std::collections::BTreeSet<&String> = points()
        .filter_map(|p| match &p.label {
            PointLabel::Aspects(t) => Some(t.keys()),
            _ => None,
        })
        .flatten()
        .collect();
    let names: Vec<String> = if rated.is_empty() {
        Vec::new()
    } else if aspects.is_empty() {
        rated.into_iter().cloned().collect()
    } else {
        aspects.to_vec()
    };
    for name in &names {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!(
                "aspect name {name:?} cannot name a model head\nhint: use ASCII letters, digits, '_' or '-' in feedback.aspects"
            );
        }
    }
    Ok(ExtraHeads {
        aspects: names,
        step_head: train
            .points
            .iter()
            .any(|p| matches!(p.label, PointLabel::Steps { .. })),
    })
}

/// The stage on every kind of example, already in memory: builds the model with the heads the
/// data needs, trains, evaluates each kind present, and writes the run directory.
pub fn train_reward_mixed(
    opts: &RewardTrainOptions,
    train: &TextData,
    eval: &TextData,
) -> Result<RewardRunSummary> {
    opts.train.validate()?;
    let train = train.clone().weighted(&opts.train);
    let eval = eval.clone().weighted(&opts.train);
    let heads = heads_for(&opts.aspects, &train, &eval)?;
    let resolved = opts.device.resolve()?;
    let device = resolved.device.clone();
    // The setting is about the CPU kernels; on CUDA candle's own f32 ops run.
    let precision = if device.is_cpu() {
        opts.precision.resolve("reward.precision")?
    } else {
        Precision::F32
    };
    set_precision(precision);
    let (model, tok, tok_json) =
        load_backbone_with_heads(opts.model.as_deref(), opts.train.seed, &heads, &device)?;
    tracing::info!(
        backbone = model.kind(),
        train_pairs = train.pairs.len(),
        train_points = train.points.len(),
        eval_pairs = eval.pairs.len(),
        eval_points = eval.points.len(),
        aspects = ?heads.aspects,
        step_head = heads.step_head,
        device = %resolved.name(),
        %precision,
        "training the reward model"
    );
    let data = encode(&model, &tok, &train, opts.train.max_length)?;
    let eval_enc = encode(&model, &tok, &eval, opts.train.max_length)?;
    let outcome = reward_trainer::train_mixed(
        &model,
        &data,
        &eval_enc,
        &opts.train,
        &opts.out,
        opts.resume,
        &device,
    )?;

    let counts = example_counts(&train, &eval);
    let metrics_eval = outcome.eval.clone().unwrap_or_default();
    let mut metrics = RewardMetrics {
        eval: metrics_eval,
        train: TrainStats {
            steps: outcome.steps,
            seconds: outcome.seconds,
            examples_per_second: outcome.examples as f64 / outcome.seconds.max(1e-9),
            tokens_per_second: outcome.tokens as f64 / outcome.seconds.max(1e-9),
            epochs: outcome.epochs,
            precision: Some(precision.to_string()),
        },
        dataset: DatasetInfo {
            counts,
            examples_sha256: fingerprint_data(&train, &eval),
        },
        production_eval: None,
    };
    let mut model_dir = None;
    if outcome.completed {
        check_weights_finite(model.varmap())?;
        model.save_pretrained(&opts.out)?;
        std::fs::write(opts.out.join("tokenizer.json"), &tok_json)
            .with_context(|| format!("writing {}", opts.out.join("tokenizer.json").display()))?;
        model_dir = Some(opts.out.clone());
        if let Some(prod) = &opts.production_model
            && !(eval.pairs.is_empty() && eval.points.is_empty())
        {
            metrics.production_eval = Some(
                evaluate_reward_model(prod, &eval, opts, &device)
                    .with_context(|| format!("scoring production model {}", prod.display()))?,
            );
        }
    }
    outputs::write_metrics(&opts.out, &metrics)?;
    Ok(RewardRunSummary {
        out: opts.out.clone(),
        model_dir,
        metrics,
        backbone: model.kind().to_string(),
        stopped_early: outcome.stopped_early,
        completed: outcome.completed,
    })
}

/// Tokenises text data for `model` (aspect targets in its head order).
pub fn encode<M: RewardBackbone>(
    model: &M,
    tok: &Tokenizer,
    data: &TextData,
    max_len: usize,
) -> Result<TrainData> {
    Ok(TrainData {
        pairs: encode_pairs(tok, &data.pairs, max_len, model.layout())?,
        points: encode_points(
            tok,
            &data.points,
            max_len,
            model.layout(),
            &model.aspect_names(),
        )?,
    })
}

/// Builds the dataset from the feedback store in `store_dir` and trains on every kind of example
/// it yields, into `opts.out`. The run's metrics carry the dataset's counts (`train_pairs`,
/// `train_pointwise`, `train_steps`, `train_aspects`) and fingerprint for lineage.
pub fn train_reward_from_store(
    store_dir: &Path,
    dataset: &DatasetOptions,
    opts: &RewardTrainOptions,
) -> Result<RewardRunSummary> {
    let store = crate::feedback::Store::open(store_dir)?;
    let ds = crate::dataset::build_from_store(&store, dataset)?;
    let (train, eval) = reward_split(&ds)?;
    let mut summary = train_reward_mixed(opts, &train, &eval)?;
    record_dataset_lineage(&mut summary.metrics.dataset, &ds);
    outputs::write_metrics(&summary.out, &summary.metrics)?;
    Ok(summary)
}

/// The dataset's two splits as the reward model reads them. Pairwise accuracy is the headline
/// metric every later stage reads (gates, report, registry): a run needs pairs on both sides,
/// whatever else it trains on.
pub fn reward_split(ds: &crate::dataset::Dataset) -> Result<(TextData, TextData)> {
    let (train, eval) = (
        TextData::from_examples(&ds.train),
        TextData::from_examples(&ds.eval),
    );
    if train.pairs.is_empty() || eval.pairs.is_empty() {
        bail!(
            "the store yields {} training and {} evaluation preference pairs; a reward model needs both\n\
             hint: collect answers to the same prompt with different feedback, or lower dataset.min_score_gap",
            train.pairs.len(),
            eval.pairs.len()
        );
    }
    Ok((train, eval))
}

/// How many examples of each kind a run saw (`pairs`, `train`, `eval`, and the single-answer
/// `train_points`/`eval_points` when there are any).
pub fn example_counts(train: &TextData, eval: &TextData) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    counts.insert(
        "pairs".to_string(),
        (train.pairs.len() + eval.pairs.len()) as u64,
    );
    counts.insert("train".to_string(), train.pairs.len() as u64);
    counts.insert("eval".to_string(), eval.pairs.len() as u64);
    if !(train.points.is_empty() && eval.points.is_empty()) {
        counts.insert("train_points".to_string(), train.points.len() as u64);
        counts.insert("eval_points".to_string(), eval.points.len() as u64);
    }
    counts
}

/// Lineage: the store dataset's own counts and fingerprint replace the trainer's.
pub fn record_dataset_lineage(info: &mut DatasetInfo, ds: &crate::dataset::Dataset) {
    info.examples_sha256 = ds.fingerprint.sha256.clone();
    let c = ds.fingerprint.train;
    for (name, n) in [
        ("pairs", c.pairs),
        ("pointwise", c.pointwise),
        ("steps", c.steps),
        ("aspects", c.aspects),
    ] {
        info.counts.insert(format!("train_{name}"), n);
    }
}

/// Loads the reward model in `dir` (or the default one) with its tokenizer; returns the
/// tokenizer's JSON too, to copy next to the trained weights.
pub fn load_backbone(
    dir: Option<&Path>,
    seed: u64,
    device: &Device,
) -> Result<(AnyReward, Tokenizer, Vec<u8>)> {
    load_backbone_with_heads(dir, seed, &ExtraHeads::default(), device)
}

/// [`load_backbone`] with at least the extra heads in `heads` (new ones are initialised).
pub fn load_backbone_with_heads(
    dir: Option<&Path>,
    seed: u64,
    heads: &ExtraHeads,
    device: &Device,
) -> Result<(AnyReward, Tokenizer, Vec<u8>)> {
    match dir {
        None => {
            let tok = tokenizer_from_bytes(DEFAULT_TOKENIZER_JSON)?;
            let mut cfg = default_llama_config(&tok);
            if *heads != ExtraHeads::default() {
                cfg.extra_heads = Some(heads.clone());
            }
            let model = LlamaReward::random(cfg, &tok, seed, device)?;
            Ok((
                AnyReward::Llama(model),
                tok,
                DEFAULT_TOKENIZER_JSON.to_vec(),
            ))
        }
        Some(dir) => {
            let kind = model_type(dir)?;
            let tok_path = dir.join("tokenizer.json");
            let tok_json = std::fs::read(&tok_path).with_context(|| {
                format!(
                    "reading {}\nhint: the model directory needs its tokenizer.json",
                    tok_path.display()
                )
            })?;
            let tok = tokenizer_from_bytes(&tok_json)?;
            match kind.as_str() {
                t if SUPPORTED_MODEL_TYPES.contains(&t) => {
                    let model = LlamaReward::load_with_heads(dir, &tok, heads, seed, device)?;
                    Ok((AnyReward::Llama(model), tok, tok_json))
                }
                "bert" => {
                    let model = BertReward::load_with_heads(dir, &tok, heads, seed, device)?;
                    Ok((AnyReward::Bert(model), tok, tok_json))
                }
                other => bail!(
                    "model type {other:?} in {} is not supported for reward training\nhint: use a BERT model or one of the decoder families {SUPPORTED_MODEL_TYPES:?}",
                    dir.join("config.json").display()
                ),
            }
        }
    }
}

/// The `model_type` of the Hugging Face model directory `dir` (its `config.json`).
pub fn model_type(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}\nhint: --model must be a Hugging Face model directory",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v.get("model_type")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no model_type", path.display()))
}

fn tokenizer_from_bytes(bytes: &[u8]) -> Result<Tokenizer> {
    // The wrapper loads from a path; a temporary file keeps one loading code path.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rlhf-bot-tok-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, bytes)?;
    let tok = Tokenizer::from_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    tok
}

/// Scores the evaluation split with the reward model in `dir` (the production model, or one a
/// cluster trained), on what its heads can read: pairs and
/// single-answer labels always, step labels when it has a step head, the aspects it has heads for.
pub fn evaluate_reward_model(
    dir: &Path,
    eval: &TextData,
    opts: &RewardTrainOptions,
    device: &Device,
) -> Result<RewardEval> {
    let (model, tok, _) = load_backbone(Some(dir), opts.train.seed, device)?;
    let names = model.aspect_names();
    let points = eval
        .points
        .iter()
        .filter_map(|p| {
            let label = match &p.label {
                PointLabel::Steps { .. } if !model.has_step_head() => return None,
                PointLabel::Aspects(t) => {
                    let kept: BTreeMap<String, f64> = t
                        .iter()
                        .filter(|(k, _)| names.contains(k))
                        .map(|(k, v)| (k.clone(), *v))
                        .collect();
                    if kept.is_empty() {
                        return None;
                    }
                    PointLabel::Aspects(kept)
                }
                other => other.clone(),
            };
            Some(PointText { label, ..p.clone() })
        })
        .collect();
    let data = TextData {
        pairs: eval.pairs.clone(),
        points,
    };
    let enc = encode(&model, &tok, &data, opts.train.max_length)?;
    reward_trainer::evaluate_mixed(&model, &enc, opts.train.batch_size * 4, device)
}

/// Reads preference pairs through `dataset::io` (TRL preference JSONL, explicit or implicit
/// prompt, e.g. Anthropic HH; gzip allowed), rendering each prompt as the reward model reads
/// prompts from the feedback store ([`render_plain_prompt`]), so a file and the store train the
/// same format. A margin of 0 (or none) is no margin.
pub fn load_pairs(path: &Path) -> Result<Vec<PairText>> {
    let pairs = load_preference_jsonl(path)?;
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let weight = p.weight.map(f64::from);
            example_weight("preference pair", i, weight)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(PairText {
                prompt: render_plain_prompt(&p.prompt),
                chosen: p.chosen,
                rejected: p.rejected,
                margin: (p.margin != 0.0).then_some(f64::from(p.margin)),
                weight,
            })
        })
        .collect()
}

/// Seeded split by pair: `fraction` of the pairs (at least one) go to evaluation.
pub fn split_pairs(
    mut pairs: Vec<PairText>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<PairText>, Vec<PairText>)> {
    if !(0.0..1.0).contains(&fraction) {
        bail!("eval fraction must be in [0, 1), got {fraction}");
    }
    pairs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_eval = ((pairs.len() as f64 * fraction).round() as usize).min(pairs.len() - 1);
    let eval = pairs.split_off(pairs.len() - n_eval);
    Ok((pairs, eval))
}

/// sha256 over the train then eval pairs (JSON, one per line): names the exact data a model saw.
pub fn fingerprint(train: &[PairText], eval: &[PairText]) -> String {
    let as_data = |pairs: &[PairText]| TextData {
        pairs: pairs.to_vec(),
        points: Vec::new(),
    };
    fingerprint_data(&as_data(train), &as_data(eval))
}

/// [`fingerprint`] over pairs and then single-answer examples (which add nothing when absent, so
/// a pairs-only run keeps its digest).
pub fn fingerprint_data(train: &TextData, eval: &TextData) -> String {
    let mut h = Sha256::new();
    for (tag, set) in [("train", train), ("eval", eval)] {
        h.update(tag.as_bytes());
        let lines = (set.pairs.iter().map(serde_json::to_vec))
            .chain(set.points.iter().map(serde_json::to_vec));
        for line in lines {
            h.update(line.unwrap_or_default());
            h.update(b"\n");
        }
    }
    hex::encode(h.finalize())
}
