//! The reward-model training loop, independent of the backbone.
//!
//! A [`RewardBackbone`] (the llama and BERT reward models implement it) maps a token batch to one
//! score per row. The loop feeds it batches of pairs (chosen rows, then rejected rows) and,
//! when the run has them, pointwise thumbs examples, combines the Bradley–Terry and BCE losses
//! with the configured weights, accumulates gradients over micro-batches, guards against
//! non-finite values, clips, and steps our AdamW under a warm-up + decay schedule. It evaluates
//! every N steps (pairwise accuracy, loss, mean margin), stops early when accuracy stalls, and
//! checkpoints weights, optimiser state, step, RNG and data position atomically, so a resumed
//! run reaches bit-for-bit the weights of an uninterrupted one (the data order is drawn from one
//! ChaCha8 stream whose position is saved at each epoch start).
//!
//! Nothing here knows about files other than its run directory (`log.jsonl`, `checkpoints/`);
//! loading models and data and writing the final model belong to `app::train_reward`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::batching::{
    EncodedPair, EncodedPoint, SequenceLayout, TokenBatch, collate, collate_pairs,
};
use super::checkpoint::{self, MetricPoint, RngState, TrainState};
use super::guard;
use super::losses::reward::{
    RewardLossParts, RewardLossWeights, bce_with_logits, bradley_terry, combine,
};
use super::optim::{AdamW, AdamWConfig, clip_grad_norm};
use super::progress::{Progress, StepReport};
use super::schedule::{Decay, Schedule};
use crate::run_outputs::{LogLine, LogWriter, RewardEval, keys};

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
    /// Every trainable weight (the optimiser and checkpoints use it).
    fn varmap(&self) -> &VarMap;
    /// Special tokens and pad id of the backbone's input format.
    fn layout(&self) -> &SequenceLayout;
    /// Writes `config.json` and `model.safetensors` in Hugging Face layout.
    fn save_pretrained(&self, dir: &Path) -> Result<()>;
    /// `llama`, `bert`, ... for logs and reports.
    fn kind(&self) -> &'static str;
}

/// The loop's hyper-parameters. Defaults follow TRL's `RewardConfig` where it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: u32,
    /// Longest tokenised row (prompt end + answer start + special tokens).
    pub max_length: usize,
    /// Pairs per micro-batch (twice as many rows go through the model).
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
    /// Log (and report progress) every N steps.
    pub log_every: u64,
    /// Checkpoint every N steps; 0 never.
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Stop when eval accuracy has not improved for this many evaluations.
    pub patience: Option<u32>,
    pub seed: u64,
    /// TRL's `center_rewards_coefficient`.
    pub center_rewards_coefficient: Option<f64>,
    pub loss_weights: RewardLossWeights,
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
        Ok(())
    }

    /// Optimiser steps for `pairs` training pairs.
    pub fn total_steps(&self, pairs: usize) -> u64 {
        self.steps_per_epoch(pairs) * u64::from(self.epochs)
    }

    fn steps_per_epoch(&self, pairs: usize) -> u64 {
        let micro = pairs.div_ceil(self.batch_size);
        micro.div_ceil(self.grad_accum) as u64
    }

    fn schedule(&self, pairs: usize) -> Schedule {
        let total = self.total_steps(pairs);
        Schedule {
            peak_lr: self.lr,
            min_lr: 0.0,
            warmup_steps: self.warmup_steps.unwrap_or(total / 10).min(total),
            total_steps: total,
            decay: self.decay,
        }
    }
}

/// Training data, tokenised.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    pub pairs: Vec<EncodedPair>,
    /// Thumbs-labelled answers (BCE on the score); used when `loss_weights.thumbs > 0`.
    pub points: Vec<EncodedPoint>,
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

/// Loop state kept in `TrainState::extra`, so a resume continues every counter. Floats that feed
/// later numbers are stored as their bit patterns: serde_json's default parser may miss the last
/// bit of a decimal, and a resumed run must log exactly what an uninterrupted one logs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Extra {
    #[serde(with = "f64_bits_opt")]
    best_accuracy: Option<f64>,
    evals_without_improvement: u32,
    micro_batches: u64,
    examples: u64,
    tokens: u64,
    seconds: f64,
    window: Window,
    last_eval: Option<RewardEval>,
    /// Every log line so far, values as f64 bits.
    log: Vec<(u64, Vec<(String, u64)>)>,
}

/// Sums over the current logging window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Window {
    steps: u64,
    #[serde(with = "f64_bits")]
    loss: f64,
    #[serde(with = "f64_bits")]
    accuracy: f64,
    #[serde(with = "f64_bits")]
    margin: f64,
    #[serde(with = "f64_bits")]
    mean_reward: f64,
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.to_bits())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(f64::from_bits(u64::deserialize(d)?))
    }
}

mod f64_bits_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_some(&x.to_bits()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(f64::from_bits))
    }
}

/// Directory where the loop keeps its checkpoints.
pub fn checkpoint_root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Trains `model` in place. `run_dir` receives `log.jsonl` and `checkpoints/`; with `resume`, the
/// newest checkpoint there is loaded first (a fresh start when there is none).
pub fn train<M: RewardBackbone>(
    model: &M,
    data: &TrainData,
    eval: &[EncodedPair],
    cfg: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<LoopOutcome> {
    cfg.validate()?;
    if data.pairs.is_empty() {
        bail!("no training pairs\nhint: the dataset needs at least one chosen/rejected pair");
    }
    let n = data.pairs.len();
    let schedule = cfg.schedule(n);
    schedule.validate().map_err(anyhow::Error::msg)?;
    let total = schedule.total_steps;
    let mut opt = AdamW::from_varmap(
        model.varmap(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let ckpt_root = checkpoint_root(run_dir);
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;

    let mut state = TrainState::new(cfg.seed);
    let mut extra = Extra::default();
    let mut epoch_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    if resume && let Some(dir) = checkpoint::latest(&ckpt_root)? {
        let mut vm = model.varmap().clone();
        state = checkpoint::load(&dir, &mut vm, &mut opt)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        if state.seed != cfg.seed {
            bail!(
                "checkpoint {} was made with seed {} but this run has seed {}\nhint: resume with the same settings, or start a new output directory",
                dir.display(),
                state.seed,
                cfg.seed
            );
        }
        extra = serde_json::from_value(state.extra.clone())
            .context("reading the trainer state of the checkpoint")?;
        if let Some(rng) = &state.rng {
            epoch_rng = rng.restore()?;
        }
        tracing::info!(step = state.step, dir = %dir.display(), "resuming reward training");
    }

    let mut log_lines: Vec<LogLine> = extra
        .log
        .iter()
        .map(|(step, values)| LogLine {
            step: *step,
            values: values
                .iter()
                .map(|(k, v)| (k.clone(), f64::from_bits(*v)))
                .collect(),
        })
        .collect();
    let mut log = LogWriter::create(run_dir)?;
    for l in &log_lines {
        log.write(l)?;
    }

    // Pointwise examples cycle through one fixed order, indexed by the global micro-batch count:
    // no state beyond that count is needed to resume them.
    let point_order: Vec<usize> = {
        let mut o: Vec<usize> = (0..data.points.len()).collect();
        o.shuffle(&mut ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x9e37_79b9_7f4a_7c15,
        ));
        o
    };
    let use_points = !data.points.is_empty() && cfg.loss_weights.thumbs != 0.0;
    let pad = model.layout().pad_id;

    let started = Instant::now();
    let seconds_before = extra.seconds;
    let mut progress = Progress::new(total, state.step, cfg.log_every, cfg.quiet);
    let mut stopped_early = false;
    let mut interrupted = false;

    'epochs: while state.epoch < u64::from(cfg.epochs) {
        let rng_at_epoch_start = RngState::capture(&epoch_rng);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut epoch_rng);
        let mut pos = state.data_position as usize;
        while pos < n {
            let step = state.step;
            let micro_left = (n - pos).div_ceil(cfg.batch_size);
            let micro_n = micro_left.min(cfg.grad_accum);
            let mut acc_grads: Option<GradStore> = None;
            let (mut s_loss, mut s_acc, mut s_margin, mut s_reward, mut s_tokens) =
                (0.0, 0.0, 0.0, 0.0, 0u64);
            for _ in 0..micro_n {
                let end = (pos + cfg.batch_size).min(n);
                let pairs: Vec<&EncodedPair> =
                    order[pos..end].iter().map(|&i| &data.pairs[i]).collect();
                pos = end;
                let (batch, margins) = collate_pairs(&pairs, pad, device)?;
                let b = pairs.len();
                let out = model.forward(&batch)?;
                let rewards = out.rewards.flatten_all()?;
                let chosen = rewards.narrow(0, 0, b)?;
                let rejected = rewards.narrow(0, b, b)?;
                let margin = margins
                    .iter()
                    .any(|m| *m != 0.0)
                    .then(|| Tensor::from_vec(margins.clone(), b, device))
                    .transpose()?;
                let bt = bradley_terry(
                    &chosen,
                    &rejected,
                    margin.as_ref(),
                    cfg.center_rewards_coefficient,
                )?;
                let mut parts = RewardLossParts {
                    pairwise: Some(bt.loss.clone()),
                    ..RewardLossParts::default()
                };
                s_tokens += batch.tokens;
                if use_points {
                    let k = cfg.batch_size.min(point_order.len());
                    let start = (extra.micro_batches as usize * k) % point_order.len();
                    let pts: Vec<&EncodedPoint> = (0..k)
                        .map(|j| &data.points[point_order[(start + j) % point_order.len()]])
                        .collect();
                    let rows: Vec<_> = pts.iter().map(|p| &p.row).collect();
                    let pb = collate(&rows, pad, device)?;
                    let labels: Vec<f32> = pts.iter().map(|p| p.label as f32).collect();
                    let labels = Tensor::from_vec(labels, k, device)?;
                    let logits = model.forward(&pb)?.rewards.flatten_all()?;
                    parts.thumbs = Some(bce_with_logits(&logits, &labels, None)?);
                    s_tokens += pb.tokens;
                    extra.examples += k as u64;
                }
                let loss = combine(&parts, &cfg.loss_weights)?;
                let value = guard::check_loss(step, &loss)?;
                let grads = loss.affine(1.0 / micro_n as f64, 0.0)?.backward()?;
                acc_grads = Some(match acc_grads {
                    None => grads,
                    Some(acc) => add_grads(acc, grads, &opt)?,
                });
                s_loss += value / micro_n as f64;
                s_acc += bt.metrics.accuracy / micro_n as f64;
                s_margin += bt.metrics.margin / micro_n as f64;
                s_reward += scalar(&rewards.mean_all()?)? / micro_n as f64;
                extra.micro_batches += 1;
                extra.examples += b as u64;
            }
            let mut grads = acc_grads.context("an optimiser step without micro-batches")?;
            let params = opt.params();
            guard::check_grads(step, &grads, &params)?;
            if let Some(max) = cfg.max_grad_norm {
                clip_grad_norm(&mut grads, &params, max)?;
            }
            let lr = schedule.lr_at(step);
            opt.set_learning_rate(lr);
            opt.step(&grads)?;
            state.step += 1;
            extra.tokens += s_tokens;
            let w = &mut extra.window;
            w.steps += 1;
            w.loss += s_loss;
            w.accuracy += s_acc;
            w.margin += s_margin;
            w.mean_reward += s_reward;
            progress.step(StepReport {
                step,
                loss: s_loss,
                accuracy: s_acc,
                lr,
                tokens: s_tokens,
            });

            let done = state.step;
            let epoch_f = state.epoch as f64 + pos as f64 / n as f64;
            if done.is_multiple_of(cfg.log_every.max(1)) || done == total {
                let k = w.steps.max(1) as f64;
                let line = LogLine::new(done)
                    .with(keys::LOSS, w.loss / k)
                    .with(keys::ACCURACY, w.accuracy / k)
                    .with(keys::MARGIN, w.margin / k)
                    .with(keys::MEAN_REWARD, w.mean_reward / k)
                    .with(keys::LR, lr)
                    .with(keys::EPOCH, epoch_f);
                *w = Window::default();
                push_line(&mut state, &mut extra, &mut log_lines, &mut log, line)?;
            }
            let last = done == total;
            if !eval.is_empty()
                && ((cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every)) || last)
            {
                let ev = evaluate(model, eval, cfg.batch_size * 2, device)?;
                progress.note(&format!(
                    "step {done}: eval accuracy {:.4} loss {:.4} margin {:.4} (n={})",
                    ev.accuracy, ev.loss, ev.mean_margin, ev.n
                ));
                let line = LogLine::new(done)
                    .with("eval_loss", ev.loss)
                    .with("eval_accuracy", ev.accuracy)
                    .with("eval_margin", ev.mean_margin);
                push_line(&mut state, &mut extra, &mut log_lines, &mut log, line)?;
                if extra.best_accuracy.is_none_or(|b| ev.accuracy > b) {
                    extra.best_accuracy = Some(ev.accuracy);
                    extra.evals_without_improvement = 0;
                } else {
                    extra.evals_without_improvement += 1;
                }
                extra.last_eval = Some(ev);
                if let Some(p) = cfg.patience
                    && extra.evals_without_improvement >= p
                    && !last
                {
                    progress.note(&format!(
                        "early stopping at step {done}: eval accuracy has not improved for {p} evaluations"
                    ));
                    stopped_early = true;
                }
            }

            // Where the data stands after this step (a finished epoch points at the next one).
            let (epoch_after, pos_after, rng_after) = if pos >= n {
                (state.epoch + 1, 0, RngState::capture(&epoch_rng))
            } else {
                (state.epoch, pos, rng_at_epoch_start.clone())
            };
            let interrupt = cfg.stop_after_steps.is_some_and(|k| done >= k) && !last;
            if (cfg.checkpoint_every > 0 && done.is_multiple_of(cfg.checkpoint_every)) || interrupt
            {
                extra.seconds = seconds_before + started.elapsed().as_secs_f64();
                let mut snap = state.clone();
                snap.epoch = epoch_after;
                snap.data_position = pos_after as u64;
                snap.rng = Some(rng_after);
                snap.extra = serde_json::to_value(&extra)?;
                checkpoint::save(&ckpt_root, &snap, model.varmap(), &opt)?;
                checkpoint::prune(&ckpt_root, cfg.keep_checkpoints.max(1))?;
            }
            if stopped_early {
                break 'epochs;
            }
            if interrupt {
                interrupted = true;
                break 'epochs;
            }
        }
        state.epoch += 1;
        state.data_position = 0;
    }
    progress.finish();
    let seconds = seconds_before + started.elapsed().as_secs_f64();
    Ok(LoopOutcome {
        steps: state.step,
        seconds,
        examples: extra.examples,
        tokens: extra.tokens,
        epochs: state.step as f64 / cfg.steps_per_epoch(n).max(1) as f64,
        eval: if interrupted { None } else { extra.last_eval },
        log: log_lines,
        stopped_early,
        completed: !interrupted,
    })
}

/// Sums two gradient stores of the same parameters (gradient accumulation).
fn add_grads(mut acc: GradStore, next: GradStore, opt: &AdamW) -> Result<GradStore> {
    for (_, var) in opt.params() {
        let t = var.as_tensor();
        if let Some(g) = next.get(t) {
            let sum = match acc.get(t) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(t, sum);
        }
    }
    Ok(acc)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn push_line(
    state: &mut TrainState,
    extra: &mut Extra,
    lines: &mut Vec<LogLine>,
    log: &mut LogWriter,
    line: LogLine,
) -> Result<()> {
    for (name, value) in &line.values {
        state.metrics.push(MetricPoint {
            step: line.step,
            name: name.clone(),
            value: *value,
        });
    }
    extra.log.push((
        line.step,
        line.values
            .iter()
            .map(|(k, v)| (k.clone(), v.to_bits()))
            .collect(),
    ));
    log.write(&line)?;
    lines.push(line);
    Ok(())
}

/// Pairwise evaluation: accuracy (`r_c > r_r`), mean Bradley–Terry loss and mean margin over
/// `pairs`, in batches of `batch_pairs`. No gradients are kept.
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
        let rewards = model.forward(&batch)?.rewards.detach().flatten_all()?;
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
        aspect_errors: BTreeMap::new(),
        step_accuracy: None,
    })
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
