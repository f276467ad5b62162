//! The reward objective on the training engine ([`crate::train::engine`]), independent of the
//! backbone.
//!
//! A [`RewardBackbone`] (the llama and BERT reward models implement it) maps a token batch to one
//! score per row, plus per-aspect scores and per-token step logits when it has those heads. The
//! objective trains on every kind of feedback at once: the engine's data order shuffles all
//! examples (pairs, thumbs, ratings, step labels, aspect ratings) each epoch; a micro-batch is the
//! next `batch_size` of them, scored in ONE forward pass, and its loss is the configured weighted
//! sum of the parts it holds (Bradley–Terry on pairs, BCE on thumbs, MSE or BCE on ratings, BCE
//! per step through the step head, MSE through the aspect heads; see [`batch_loss`]). Kinds with
//! weight 0 never enter the data order. What every algorithm does the same way — accumulation,
//! clipping, AdamW under the warm-up + decay schedule, guards, checkpoint and resume, the log, the
//! evaluation cadence and early stopping — is the engine's; this file owns the loss, the step
//! metrics (`accuracy`, `margin`, `mean_reward`, `loss/<part>`) and the held-out evaluation
//! (pairwise accuracy, loss and mean margin; pointwise and step accuracy and per-aspect MAE where
//! the split has them), which scores through [`RewardBackbone::score`] and builds no graph.
//!
//! Nothing here knows about files other than its run directory (`log.jsonl`, `checkpoints/`);
//! loading models and data and writing the final model belong to `train::reward_run`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::batching::{
    EncodedPair, EncodedPoint, PointTarget, SequenceLayout, TokenBatch, collate_mixed,
    collate_pairs,
};
use super::engine::{self, DataOrder, EngineConfig, Evaluation, Objective, RunControl, StepReport};
use super::losses::reward::{
    self as losses, RatingLoss, RewardLossParts, RewardLossWeights, aspect_mse, bce_with_logits,
    bradley_terry, combine,
};
use super::losses::stats::non_unit_weights;
use super::optim::AdamWConfig;
use super::schedule::{Decay, Schedule};
use crate::run::outputs::{AspectEval, LogLine, RewardEval, keys};

/// What a backbone returns for a batch.
#[derive(Debug, Clone)]
pub struct RewardForward {
    /// One score per row, `[rows]`.
    pub rewards: Tensor,
    /// Per-aspect scores `[rows, aspects]`, when the model has aspect heads.
    pub aspects: Option<Tensor>,
    /// Per-token step logits `[rows, seq]`, when the model has a step head.
    pub step_logits: Option<Tensor>,
}

/// A trainable reward model, whatever its architecture.
pub trait RewardBackbone {
    /// Scores every row of `batch`; keeps the autograd graph.
    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward>;
    /// Scores every row of `batch` without building an autograd graph (evaluation, scoring):
    /// the same values as [`RewardBackbone::forward`], computed on detached views of the
    /// trainable weights, so no op records its inputs for a backward pass.
    fn score(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward>;
    /// Every trainable weight (the optimiser and checkpoints use it).
    fn varmap(&self) -> &VarMap;
    /// Special tokens and pad id of the backbone's input format.
    fn layout(&self) -> &SequenceLayout;
    /// Writes `config.json` and `model.safetensors` in Hugging Face layout.
    fn save_pretrained(&self, dir: &Path) -> Result<()>;
    /// `llama`, `bert`, ... for logs and reports.
    fn kind(&self) -> &'static str;
    /// Names of the aspect heads, in the column order of [`RewardForward::aspects`].
    fn aspect_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether [`RewardForward::step_logits`] is produced.
    fn has_step_head(&self) -> bool {
        false
    }
}

/// The loop's hyper-parameters. Defaults follow TRL's `RewardConfig` where it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: u32,
    /// Longest tokenised row (prompt end + answer start + special tokens).
    pub max_length: usize,
    /// Examples per micro-batch (a pair is one example and two rows).
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Warm-up steps; `None` means 10% of the run.
    pub warmup_steps: Option<u64>,
    pub decay: Decay,
    /// Global gradient-norm clip; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every N optimiser steps (and always at the end); 0 only at the end.
    pub eval_every: u64,
    /// A progress line every N steps when stderr is not a terminal (`log.jsonl` has every
    /// step).
    pub log_every: u64,
    /// Checkpoint every N steps; 0: only after the last step and at `stop_after_steps`.
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Stop when eval accuracy has not improved for this many evaluations.
    pub patience: Option<u32>,
    pub seed: u64,
    /// TRL's `center_rewards_coefficient`.
    pub center_rewards_coefficient: Option<f64>,
    /// Weight of each kind of feedback in the total loss (`reward.loss_weights`).
    pub loss_weights: RewardLossWeights,
    /// How ratings train the score (`reward.rating_loss`: `mse` or `bce`).
    pub rating_loss: RatingLoss,
    /// End the run after this many optimiser steps, as an interruption would (a checkpoint is
    /// written, no final model): for tests of resume and for time-boxed CI jobs.
    pub stop_after_steps: Option<u64>,
    /// No progress bar (logs only).
    pub quiet: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_length: 512,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            weight_decay: 0.0,
            warmup_steps: None,
            decay: Decay::Cosine,
            max_grad_norm: Some(1.0),
            eval_every: 50,
            log_every: 10,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            patience: None,
            seed: 42,
            center_rewards_coefficient: None,
            loss_weights: RewardLossWeights::default(),
            rating_loss: RatingLoss::default(),
            stop_after_steps: None,
            quiet: false,
        }
    }
}

impl TrainConfig {
    /// Rejects values the loop cannot run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("epochs must be at least 1\nhint: set epochs: 1");
        }
        if self.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("grad_accum must be at least 1");
        }
        if let Some(n) = self.max_grad_norm
            && !(n > 0.0 && n.is_finite())
        {
            bail!(
                "max_grad_norm must be positive, got {n}\nhint: leave it unset to disable clipping"
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("weight_decay must be >= 0, got {}", self.weight_decay);
        }
        if let Some(c) = self.center_rewards_coefficient
            && !(c >= 0.0 && c.is_finite())
        {
            bail!(
                "reward.center_rewards_coefficient must be a finite number >= 0, got {c}\nhint: TRL suggests 0.01; leave it unset to disable centring"
            );
        }
        self.loss_weights.validate()?;
        Ok(())
    }

    /// Optimiser steps for `examples` training examples (a pair counts once).
    pub fn total_steps(&self, examples: usize) -> u64 {
        self.steps_per_epoch(examples) * u64::from(self.epochs)
    }

    fn steps_per_epoch(&self, examples: usize) -> u64 {
        let micro = examples.div_ceil(self.batch_size);
        micro.div_ceil(self.grad_accum) as u64
    }

    /// The weight the config gives to `point`'s kind of feedback.
    pub fn weight_of(&self, point: &EncodedPoint) -> f64 {
        let w = &self.loss_weights;
        match point.target {
            PointTarget::Thumb(_) | PointTarget::Rating(_) => w.pointwise,
            PointTarget::Steps { .. } => w.steps,
            PointTarget::Aspects(_) => w.aspects,
        }
    }

    fn schedule(&self, examples: usize) -> Schedule {
        let total = self.total_steps(examples);
        Schedule {
            peak_lr: self.lr,
            min_lr: 0.0,
            warmup_steps: self.warmup_steps.unwrap_or(total / 10).min(total),
            total_steps: total,
            decay: self.decay,
        }
    }

    /// How the engine runs this config on `examples` examples: `batch_size × grad_accum`
    /// examples a step, in micro-batches of `batch_size`, a step never crossing an epoch.
    pub fn engine(&self, examples: usize, resume: bool) -> EngineConfig {
        let schedule = self.schedule(examples);
        EngineConfig {
            seed: self.seed,
            total_steps: schedule.total_steps,
            examples_per_step: self.batch_size * self.grad_accum,
            micro_batch: self.batch_size,
            order: DataOrder::Epochs,
            schedule,
            adamw: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            max_grad_norm: self.max_grad_norm,
            checkpoint_every: self.checkpoint_every,
            kl_ceiling: None,
            control: RunControl {
                resume,
                keep_checkpoints: self.keep_checkpoints,
                eval_every: self.eval_every,
                patience: self.patience,
                stop_after_steps: self.stop_after_steps,
                progress_every: self.log_every,
                quiet: self.quiet,
            },
        }
    }
}

/// Training (or evaluation) data, tokenised.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    pub pairs: Vec<EncodedPair>,
    /// Single-answer examples: thumbs, ratings, step labels, aspect ratings.
    pub points: Vec<EncodedPoint>,
}

impl From<Vec<EncodedPair>> for TrainData {
    fn from(pairs: Vec<EncodedPair>) -> Self {
        Self {
            pairs,
            points: Vec::new(),
        }
    }
}

impl TrainData {
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty() && self.points.is_empty()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopOutcome {
    /// Optimiser steps done (including those before a resume).
    pub steps: u64,
    /// Training wall time in seconds, summed over resumed segments.
    pub seconds: f64,
    /// Pairs (and points) trained on, counted with repetition.
    pub examples: u64,
    /// Non-pad tokens fed forward.
    pub tokens: u64,
    pub epochs: f64,
    /// The last evaluation (`None` when there is no eval set or the run was interrupted).
    pub eval: Option<RewardEval>,
    /// Every log line of the run, resumed segments included.
    pub log: Vec<LogLine>,
    /// Early stopping fired.
    pub stopped_early: bool,
    /// False when `stop_after_steps` ended the run before its schedule.
    pub completed: bool,
}

/// Trains `model` in place on `data`, evaluating on the pairs `eval`. See [`train_mixed`].
pub fn train<M: RewardBackbone>(
    model: &M,
    data: &TrainData,
    eval: &[EncodedPair],
    cfg: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<LoopOutcome> {
    let eval = TrainData::from(eval.to_vec());
    train_mixed(model, data, &eval, cfg, run_dir, resume, device)
}

/// One example of the epoch's shuffle.
#[derive(Debug, Clone, Copy)]
enum Item {
    Pair(usize),
    Point(usize),
}

/// Trains `model` in place on the engine. `run_dir` receives `log.jsonl` and `checkpoints/`;
/// with `resume`, the newest checkpoint there is loaded first (a fresh start when there is none).
/// `eval` may mix every kind of example; each is evaluated where present.
pub fn train_mixed<M: RewardBackbone>(
    model: &M,
    data: &TrainData,
    eval: &TrainData,
    cfg: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<LoopOutcome> {
    cfg.validate()?;
    check_heads(model, data, cfg)?;
    // Kinds with weight 0 never enter the data order: they would cost forward passes for
    // nothing. Pairs come first so a pairs-only run orders its data as it always has.
    let items: Vec<Item> = (0..data.pairs.len())
        .filter(|_| cfg.loss_weights.pairwise != 0.0)
        .map(Item::Pair)
        .chain(
            data.points
                .iter()
                .enumerate()
                .filter(|(_, p)| cfg.weight_of(p) != 0.0)
                .map(|(i, _)| Item::Point(i)),
        )
        .collect();
    if items.is_empty() {
        bail!(
            "no training examples of a kind with a non-zero loss weight ({} pairs, {} single-answer examples)\nhint: the dataset needs at least one chosen/rejected pair, or set reward.loss_weights for the kinds collected",
            data.pairs.len(),
            data.points.len()
        );
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    let engine_cfg = cfg.engine(items.len(), resume);
    let mut objective = RewardObjective {
        model,
        data,
        eval,
        items,
        cfg,
        device,
        step: StepSums::default(),
        last_eval: None,
    };
    let out = engine::run(&mut objective, model.varmap(), &engine_cfg, run_dir)?;
    // A resume of a finished run trains no step and so never evaluates: evaluate here, so its
    // outcome still reports the model it ends with.
    let final_eval = match objective.last_eval.take() {
        Some(ev) => Some(ev),
        None if out.completed && !eval.is_empty() => {
            Some(evaluate_mixed(model, eval, cfg.batch_size * 4, device)?)
        }
        None => None,
    };
    Ok(LoopOutcome {
        steps: out.steps,
        seconds: out.seconds,
        examples: out.examples,
        tokens: out.tokens,
        epochs: out.epochs,
        eval: if out.completed { final_eval } else { None },
        log: out.log,
        stopped_early: out.stopped_early,
        completed: out.completed,
    })
}

/// The reward model's objective: the engine's indices are positions in `items`.
struct RewardObjective<'a, M> {
    model: &'a M,
    data: &'a TrainData,
    eval: &'a TrainData,
    items: Vec<Item>,
    cfg: &'a TrainConfig,
    device: &'a Device,
    /// What the current step's micro-batches have added up so far.
    step: StepSums,
    last_eval: Option<RewardEval>,
}

/// What one optimiser step adds up over its micro-batches (detached numbers only).
#[derive(Debug, Default)]
struct StepSums {
    micro: u64,
    /// Sum of the micro-batches' mean scores.
    reward: f64,
    /// Sums over the micro-batches that held pairs (`pair_micro` of them).
    accuracy: f64,
    margin: f64,
    pair_micro: u64,
    /// Per loss part, in [`RewardLossWeights::named`] order: (sum over micro-batches,
    /// micro-batches where present).
    parts: [(f64, u64); 4],
    tokens: u64,
}

impl<M: RewardBackbone> Objective for RewardObjective<'_, M> {
    const NAME: &'static str = "reward";
    const PROGRESS_METRIC: Option<&'static str> = Some(keys::ACCURACY);

    fn examples(&self) -> usize {
        self.items.len()
    }

    fn micro_loss(&mut self, _step: u64, micro: &[usize]) -> Result<Tensor> {
        let (mut pairs, mut points) = (Vec::new(), Vec::new());
        for &i in micro {
            match self.items[i] {
                Item::Pair(j) => pairs.push(&self.data.pairs[j]),
                Item::Point(j) => points.push(&self.data.points[j]),
            }
        }
        let batch = collate_mixed(&pairs, &points, self.model.layout().pad_id, self.device)?;
        let out = self.model.forward(&batch)?;
        let bl = batch_loss(&out, &pairs, &points, self.cfg)?;
        let s = &mut self.step;
        s.micro += 1;
        s.tokens += batch.tokens;
        s.reward += scalar(&out.rewards.detach().mean_all()?)?;
        if let Some(m) = bl.pair_metrics {
            s.accuracy += m.accuracy;
            s.margin += m.margin;
            s.pair_micro += 1;
        }
        for (k, (_, part)) in bl.parts.named().into_iter().enumerate() {
            if let Some(p) = part {
                s.parts[k].0 += scalar(&p.detach())?;
                s.parts[k].1 += 1;
            }
        }
        Ok(bl.total)
    }

    /// Means over the step's micro-batches: `accuracy` and `margin` over those that held pairs,
    /// `loss/<part>` over those that held the part.
    fn finish_step(&mut self, _step: u64) -> Result<StepReport> {
        let s = std::mem::take(&mut self.step);
        let mut report = StepReport {
            tokens: s.tokens,
            ..StepReport::default()
        };
        if s.pair_micro > 0 {
            let p = s.pair_micro as f64;
            report = report
                .metric(keys::ACCURACY, s.accuracy / p)
                .metric(keys::MARGIN, s.margin / p);
        }
        report = report.metric(keys::MEAN_REWARD, s.reward / s.micro.max(1) as f64);
        for ((name, _), (sum, n)) in RewardLossWeights::default().named().iter().zip(s.parts) {
            if n > 0 {
                report = report.metric(&format!("loss/{name}"), sum / n as f64);
            }
        }
        Ok(report)
    }

    /// Held-out evaluation; early stopping watches pairwise accuracy, the headline metric
    /// (without evaluation pairs there is nothing to watch).
    fn evaluate(&mut self, _step: u64) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let ev = evaluate_mixed(self.model, self.eval, self.cfg.batch_size * 4, self.device)?;
        let evaluation = Evaluation {
            metrics: eval_metrics(&ev),
            watch: (ev.n > 0).then_some(ev.accuracy),
        };
        self.last_eval = Some(ev);
        Ok(Some(evaluation))
    }
}

/// The eval log line's metrics: TRL-style `eval_*` names, the optional ones where present.
fn eval_metrics(ev: &RewardEval) -> Vec<(String, f64)> {
    let mut m: Vec<(String, f64)> = Vec::new();
    if ev.n > 0 {
        m.push(("eval_loss".into(), ev.loss));
        m.push(("eval_accuracy".into(), ev.accuracy));
        m.push(("eval_margin".into(), ev.mean_margin));
    }
    if let Some(a) = ev.pointwise_accuracy {
        m.push(("eval_pointwise_accuracy".into(), a));
    }
    if let Some(a) = ev.step_accuracy {
        m.push(("eval_step_accuracy".into(), a));
    }
    for (name, a) in &ev.aspects {
        m.push((format!("eval_aspect_mae/{name}"), a.mae));
    }
    m
}

/// Refuses data the model has no head for (it would otherwise fail mid-run); kinds with weight
/// 0 are not trained on and need no head.
fn check_heads<M: RewardBackbone + ?Sized>(
    model: &M,
    data: &TrainData,
    cfg: &TrainConfig,
) -> Result<()> {
    let steps = data
        .points
        .iter()
        .any(|p| matches!(p.target, PointTarget::Steps { .. }) && cfg.weight_of(p) != 0.0);
    if steps && !model.has_step_head() {
        bail!(
            "the data has reasoning-step labels but the {} reward model has no step head\nhint: load it through reward_run (which adds the head), or set reward.loss_weights.steps: 0",
            model.kind()
        );
    }
    let n_aspects = model.aspect_names().len();
    if let Some(p) = data.points.iter().find_map(|p| match &p.target {
        PointTarget::Aspects(t) if t.len() != n_aspects && cfg.weight_of(p) != 0.0 => Some(t.len()),
        _ => None,
    }) {
        bail!(
            "an aspect example has {p} targets but the model has {n_aspects} aspect heads\nhint: encode aspect examples with the model's aspect_names()"
        );
    }
    Ok(())
}

/// A micro-batch's loss: the weighted total, its parts, and the pairwise metrics.
#[derive(Debug, Clone)]
pub struct BatchLoss {
    pub total: Tensor,
    pub parts: RewardLossParts,
    /// Accuracy and margin of the pairs, when the batch has any.
    pub pair_metrics: Option<losses::RewardMetrics>,
}

/// The loss of a batch collated by [`collate_mixed`] (`pairs` rows first: chosen then rejected,
/// then one row per point) from the model's outputs on it. Each part is the mean over its own
/// examples: Bradley–Terry (with margins and centring; weighted by each pair's `weight`) over pairs; over single answers BCE for
/// thumbs and `cfg.rating_loss` for ratings; BCE over every labelled step, read from the step
/// head at the step's last token; MSE over every rated (answer, aspect) through the aspect heads.
pub fn batch_loss(
    out: &RewardForward,
    pairs: &[&EncodedPair],
    points: &[&EncodedPoint],
    cfg: &TrainConfig,
) -> Result<BatchLoss> {
    let device = out.rewards.device();
    let rewards = out.rewards.flatten_all()?;
    let b = pairs.len();
    let first_point = 2 * b;
    let mut parts = RewardLossParts::default();
    let mut pair_metrics = None;
    if b > 0 {
        let chosen = rewards.narrow(0, 0, b)?;
        let rejected = rewards.narrow(0, b, b)?;
        let margins: Vec<f32> = pairs.iter().map(|p| p.margin as f32).collect();
        let margin = margins
            .iter()
            .any(|m| *m != 0.0)
            .then(|| Tensor::from_vec(margins, b, device))
            .transpose()?;
        let weights = non_unit_weights(pairs.iter().map(|p| p.weight));
        let bt = bradley_terry(
            &chosen,
            &rejected,
            margin.as_ref(),
            cfg.center_rewards_coefficient,
            weights.as_deref(),
        )?;
        parts.pairwise = Some(bt.loss);
        pair_metrics = Some(bt.metrics);
    }

    // Single answers: thumbs and ratings share one mean.
    let (mut rows, mut targets, mut is_rating) = (Vec::new(), Vec::new(), Vec::new());
    // Steps: flat (row · seq + position) indices into the step logits.
    let (mut step_idx, mut step_y) = (Vec::new(), Vec::new());
    // Aspects: rows and a dense target / mask matrix.
    let (mut a_rows, mut a_y, mut a_mask) = (Vec::new(), Vec::new(), Vec::new());
    let seq = out
        .step_logits
        .as_ref()
        .map(|t| t.dim(1))
        .transpose()?
        .unwrap_or(0);
    for (j, p) in points.iter().enumerate() {
        let row = (first_point + j) as u32;
        match &p.target {
            PointTarget::Thumb(y) | PointTarget::Rating(y) => {
                rows.push(row);
                targets.push(*y);
                is_rating.push(if matches!(p.target, PointTarget::Rating(_)) {
                    1f32
                } else {
                    0.0
                });
            }
            PointTarget::Steps { positions, labels } => {
                for (pos, y) in positions.iter().zip(labels) {
                    step_idx.push(row * seq as u32 + *pos as u32);
                    step_y.push(*y);
                }
            }
            PointTarget::Aspects(t) => {
                a_rows.push(row);
                a_y.extend(t.iter().map(|v| v.unwrap_or(0.0)));
                a_mask.extend(t.iter().map(|v| if v.is_some() { 1f32 } else { 0.0 }));
            }
        }
    }
    if !rows.is_empty() {
        let k = rows.len();
        let logits = rewards.index_select(&Tensor::from_vec(rows, k, device)?, 0)?;
        parts.pointwise = Some(losses::pointwise(
            &logits,
            &Tensor::from_vec(targets, k, device)?,
            &Tensor::from_vec(is_rating, k, device)?,
            cfg.rating_loss,
        )?);
    }
    if !step_idx.is_empty() {
        let Some(step_logits) = &out.step_logits else {
            bail!("the batch has step labels but the model gave no step logits");
        };
        let k = step_idx.len();
        let logits = step_logits
            .flatten_all()?
            .index_select(&Tensor::from_vec(step_idx, k, device)?, 0)?;
        parts.steps = Some(bce_with_logits(
            &logits,
            &Tensor::from_vec(step_y, k, device)?,
            None,
        )?);
    }
    if !a_rows.is_empty() {
        let Some(aspects) = &out.aspects else {
            bail!("the batch has aspect ratings but the model gave no aspect scores");
        };
        let (k, a) = (a_rows.len(), aspects.dim(1)?);
        let pred = aspects.index_select(&Tensor::from_vec(a_rows, k, device)?, 0)?;
        parts.aspects = Some(aspect_mse(
            &pred,
            &Tensor::from_vec(a_y, (k, a), device)?,
            &Tensor::from_vec(a_mask, (k, a), device)?,
        )?);
    }
    let total = combine(&parts, &cfg.loss_weights)?;
    Ok(BatchLoss {
        total,
        parts,
        pair_metrics,
    })
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Pairwise evaluation: accuracy (`r_c > r_r`), mean Bradley–Terry loss and mean margin over
/// `pairs`, in batches of `batch_pairs`, scored through [`RewardBackbone::score`] (no graph).
pub fn evaluate<M: RewardBackbone + ?Sized>(
    model: &M,
    pairs: &[EncodedPair],
    batch_pairs: usize,
    device: &Device,
) -> Result<RewardEval> {
    if pairs.is_empty() {
        bail!("no evaluation pairs");
    }
    let (mut correct, mut loss, mut margin) = (0.0, 0.0, 0.0);
    for chunk in pairs.chunks(batch_pairs.max(1)) {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let (batch, _) = collate_pairs(&refs, model.layout().pad_id, device)?;
        let rewards = model.score(&batch)?.rewards.flatten_all()?;
        let r: Vec<f64> = rewards.to_dtype(DType::F64)?.to_vec1()?;
        let b = chunk.len();
        for i in 0..b {
            let d = r[i] - r[b + i];
            correct += f64::from(u8::from(d > 0.0));
            margin += d;
            // -log σ(d), computed stably.
            loss += if d >= 0.0 {
                (-d).exp().ln_1p()
            } else {
                -d + d.exp().ln_1p()
            };
        }
    }
    let n = pairs.len() as f64;
    Ok(RewardEval {
        accuracy: correct / n,
        loss: loss / n,
        n: pairs.len() as u64,
        mean_margin: margin / n,
        ..RewardEval::default()
    })
}

/// Evaluation on every kind of held-out example: the pairwise metrics of [`evaluate`] (zero with
/// `n = 0` when there are no pairs), accuracy on thumbs (`score > 0` ⇔ up), accuracy on step
/// labels (`step logit > 0` ⇔ correct) and each aspect head's mean absolute error. Rows go
/// through [`RewardBackbone::score`] `batch_rows` at a time (no graph).
pub fn evaluate_mixed<M: RewardBackbone + ?Sized>(
    model: &M,
    eval: &TrainData,
    batch_rows: usize,
    device: &Device,
) -> Result<RewardEval> {
    let mut ev = if eval.pairs.is_empty() {
        RewardEval::default()
    } else {
        evaluate(model, &eval.pairs, (batch_rows / 2).max(1), device)?
    };
    let names = model.aspect_names();
    let (mut thumbs_right, mut thumbs_n) = (0u64, 0u64);
    let (mut steps_right, mut steps_n) = (0u64, 0u64);
    let mut abs_err = vec![(0.0f64, 0u64); names.len()];
    for chunk in eval.points.chunks(batch_rows.max(1)) {
        let refs: Vec<&EncodedPoint> = chunk.iter().collect();
        let batch = collate_mixed(&[], &refs, model.layout().pad_id, device)?;
        let out = model.score(&batch)?;
        let rewards: Vec<f32> = out.rewards.flatten_all()?.to_vec1()?;
        let steps: Option<Vec<Vec<f32>>> = out.step_logits.map(|t| t.to_vec2()).transpose()?;
        let aspects: Option<Vec<Vec<f32>>> = out.aspects.map(|t| t.to_vec2()).transpose()?;
        for (j, p) in chunk.iter().enumerate() {
            match &p.target {
                PointTarget::Thumb(y) => {
                    thumbs_n += 1;
                    thumbs_right += u64::from((rewards[j] > 0.0) == (*y > 0.5));
                }
                PointTarget::Rating(_) => {}
                PointTarget::Steps { positions, labels } => {
                    let row = steps.as_ref().map(|s| &s[j]).with_context(|| {
                        format!(
                            "the evaluation split has step labels but the {} reward model has no step head",
                            model.kind()
                        )
                    })?;
                    for (pos, y) in positions.iter().zip(labels) {
                        steps_n += 1;
                        steps_right += u64::from((row[*pos] > 0.0) == (*y > 0.5));
                    }
                }
                PointTarget::Aspects(targets) => {
                    let row = aspects.as_ref().map(|a| &a[j]).with_context(|| {
                        format!(
                            "the evaluation split has aspect ratings but the {} reward model has no aspect heads",
                            model.kind()
                        )
                    })?;
                    for ((acc, t), pred) in abs_err.iter_mut().zip(targets).zip(row) {
                        if let Some(t) = t {
                            acc.0 += f64::from((pred - t).abs());
                            acc.1 += 1;
                        }
                    }
                }
            }
        }
    }
    if thumbs_n > 0 {
        ev.pointwise_accuracy = Some(thumbs_right as f64 / thumbs_n as f64);
        ev.pointwise_n = Some(thumbs_n);
    }
    if steps_n > 0 {
        ev.step_accuracy = Some(steps_right as f64 / steps_n as f64);
        ev.step_n = Some(steps_n);
    }
    for (name, (sum, n)) in names.into_iter().zip(abs_err) {
        if n > 0 {
            let mae = sum / n as f64;
            ev.aspect_errors.insert(name.clone(), mae);
            ev.aspects.insert(name, AspectEval { mae, n });
        }
    }
    Ok(ev)
}

/// Fails when any weight is NaN or infinite, so a broken model is never written as final.
pub fn check_weights_finite(varmap: &VarMap) -> Result<()> {
    for (name, var) in super::optim::named_vars(varmap) {
        let probe = var
            .as_tensor()
            .affine(0.0, 0.0)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !probe.is_finite() {
            bail!(
                "weight {name} holds NaN or infinite values; the model was not saved\nhint: lower the learning rate or enable gradient clipping"
            );
        }
    }
    Ok(())
}
