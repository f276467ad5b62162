//! The training engine: the one loop every objective (reward, DPO, KTO, PPO) runs on (burn-train's
//! `TrainStep`/`Learner` split). The engine owns what every algorithm does the same way:
//!
//! - the data order and position ([`order`]): seeded per-epoch permutations, checkpointed;
//! - the optimiser (our AdamW, [`crate::train::optim`]), the learning-rate schedule, gradient
//!   accumulation over micro-batches, and global-norm clipping;
//! - checkpoint and resume ([`run_log`]), with the same checks for every objective (the seed and
//!   the objective that made the checkpoint);
//! - the guards: non-finite loss, gradient or logged value, and the KL ceiling;
//! - the metrics log (`log.jsonl`), one line per optimiser step with one set of names: `loss`,
//!   `grad_norm`, `learning_rate` and `epoch` on every line (TRL's names), then the objective's
//!   own metrics; held-out evaluations on lines of their own (`eval_*`);
//! - evaluation every N steps and after the last, early stopping on a stalled evaluation metric,
//!   and the progress line for people ([`crate::train::progress`]: means over the steps since
//!   the previous line).
//!
//! An algorithm is an [`Objective`]: it says how many examples it has, turns a step's examples
//! into optimiser updates ([`Objective::plan`], where PPO rolls out), gives the loss of a
//! micro-batch ([`Objective::micro_loss`]) and the step's metrics ([`Objective::finish_step`]),
//! may evaluate on held-out data ([`Objective::evaluate`]) and may keep state across a resume
//! ([`Objective::save_state`]). docs/training-engine.md shows how to add one.

pub mod order;
pub mod run_log;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_core::backprop::GradStore;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::run::outputs::{LogLine, keys};
use crate::train::guard::{self, GuardError, check_kl};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::progress::Progress;
use crate::train::schedule::Schedule;
pub use order::{DataCursor, DataOrder};
pub use run_log::RunLog;

/// What a finished training run reports (throughput and the log it wrote).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainOutcome {
    pub steps: u64,
    pub seconds: f64,
    /// Examples (pairs, thumbs, rollouts) processed in this process (not before a resume).
    pub examples: u64,
    pub tokens: u64,
    pub epochs: f64,
    pub log: Vec<LogLine>,
    /// Early stopping ended the run before its schedule ([`RunControl::patience`]).
    pub stopped_early: bool,
    /// False when [`RunControl::stop_after_steps`] interrupted the run (a checkpoint was written
    /// to resume from).
    pub completed: bool,
    /// Wall seconds per phase of the loop, summed over its steps, in the order the phases first
    /// ran: `forward`, `backward + optimiser`, `metrics + checkpoint`, and any phase an
    /// objective books itself (PPO: rollout generation, scoring, GAE).
    pub phase_seconds: Vec<(String, f64)>,
}

impl TrainOutcome {
    /// Adds `seconds` to phase `name` (appending it the first time it is seen).
    pub fn add_phase(&mut self, name: &str, seconds: f64) {
        match self.phase_seconds.iter_mut().find(|(n, _)| n == name) {
            Some((_, s)) => *s += seconds,
            None => self.phase_seconds.push((name.to_string(), seconds)),
        }
    }
}

/// Directory of the checkpoints under a run's output directory.
pub fn checkpoint_root(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// How the engine runs; [`crate::train::policy_common::PolicyTrainOptions::engine`] maps the
/// policy options onto it.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub seed: u64,
    /// Optimiser steps of the whole run (a resumed run continues up to it).
    pub total_steps: u64,
    /// Examples a step draws from the data order.
    pub examples_per_step: usize,
    /// Examples per micro-batch: each update's examples are scored this many at a time and
    /// their losses, weighted by size, summed into one backward pass.
    pub micro_batch: usize,
    pub order: DataOrder,
    /// Learning rate for each update of step `s` is `schedule.lr_at(s - 1)`.
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (PyTorch's `clip_grad_norm_`); `None` disables it.
    pub max_grad_norm: Option<f64>,
    /// Checkpoint every N steps (and always after the last one, and when
    /// [`RunControl::stop_after_steps`] ends the run); 0: only then.
    pub checkpoint_every: u64,
    /// Stop with an error when a step's KL to the reference passes this.
    pub kl_ceiling: Option<f64>,
    pub control: RunControl,
}

/// How a run is driven beyond its maths: resume, evaluation, early stopping, interruption,
/// checkpoints kept, progress output. The defaults are what the policy runs use.
#[derive(Debug, Clone, PartialEq)]
pub struct RunControl {
    /// Continue from the newest checkpoint under `out/checkpoints` when there is one.
    pub resume: bool,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Call [`Objective::evaluate`] every N steps and after the last; 0: only after the last.
    pub eval_every: u64,
    /// Stop early when [`Evaluation::watch`] has not improved for this many evaluations.
    pub patience: Option<u32>,
    /// End the run after this many steps as an interruption would (a checkpoint is written):
    /// tests of resume and time-boxed CI jobs.
    pub stop_after_steps: Option<u64>,
    /// A progress line every N steps when stderr is not a terminal (see [`Progress`]).
    pub progress_every: u64,
    /// No progress bar, even on a terminal.
    pub quiet: bool,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            resume: true,
            keep_checkpoints: 2,
            eval_every: 0,
            patience: None,
            stop_after_steps: None,
            progress_every: 10,
            quiet: false,
        }
    }
}

/// What an objective's held-out evaluation reports ([`Objective::evaluate`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Logged on a line of their own under the step (TRL's `eval_*` names).
    pub metrics: Vec<(String, f64)>,
    /// What early stopping watches (higher is better); `None`: nothing to watch this time.
    pub watch: Option<f64>,
}

/// Early-stopping bookkeeping, kept in the checkpoint. The best value is stored as its bit
/// pattern so a resumed run compares against exactly the number it saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EarlyStopping {
    best_bits: Option<u64>,
    evals_without_improvement: u32,
}

impl EarlyStopping {
    const KEY: &'static str = "early_stopping";

    /// Records an evaluation's watched value; true when `patience` evaluations in a row have
    /// not improved on the best.
    fn observe(&mut self, watch: Option<f64>, patience: Option<u32>) -> bool {
        if let Some(v) = watch {
            if self.best_bits.is_none_or(|b| v > f64::from_bits(b)) {
                self.best_bits = Some(v.to_bits());
                self.evals_without_improvement = 0;
            } else {
                self.evals_without_improvement += 1;
            }
        }
        patience.is_some_and(|p| self.evals_without_improvement >= p)
    }
}

/// What an objective says about a finished step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// Metrics under TRL's names, logged after the engine's own.
    pub metrics: Vec<(String, f64)>,
    /// What the KL ceiling guards (per sequence, nats); `None` when the objective has no
    /// reference to drift from.
    pub kl: Option<f64>,
    /// Tokens fed forward in the step.
    pub tokens: u64,
}

impl StepReport {
    pub fn metric(mut self, name: &str, value: f64) -> Self {
        self.metrics.push((name.to_string(), value));
        self
    }
}

/// Books wall time to named phases of a step (see [`TrainOutcome::phase_seconds`]).
pub struct PhaseClock {
    mark: Instant,
    phases: TrainOutcome,
}

impl PhaseClock {
    fn start() -> Self {
        Self {
            mark: Instant::now(),
            phases: TrainOutcome::default(),
        }
    }

    /// Books the time since the previous lap under `name`.
    pub fn lap(&mut self, name: &str) {
        self.phases
            .add_phase(name, self.mark.elapsed().as_secs_f64());
        self.mark = Instant::now();
    }
}

/// A step's optimiser updates, each the indices of its examples (see [`Objective::plan`]).
pub type Updates = Vec<Vec<usize>>;

/// One training algorithm on the engine: its data, its loss and its metrics.
pub trait Objective {
    /// `dpo`, `kto`, `ppo`, ...: recorded in checkpoints (a checkpoint of another objective is
    /// refused) and used as the key of [`Objective::save_state`].
    const NAME: &'static str;

    /// Examples the data order permutes (pairs, thumbs, prompts).
    fn examples(&self) -> usize;

    /// Turns the step's examples into optimiser updates, each a list of indices the engine
    /// splits into micro-batches and passes to [`Objective::micro_loss`]. The default is one
    /// update over the step's examples (gradient accumulation over its micro-batches). PPO
    /// rolls out here and returns `ppo_epochs × num_minibatches` updates over rollout rows.
    fn plan(&mut self, step: u64, batch: &[usize], clock: &mut PhaseClock) -> Result<Updates> {
        let _ = (step, clock);
        Ok(vec![batch.to_vec()])
    }

    /// The mean loss of one micro-batch (indices as [`Objective::plan`] gave them), with its
    /// autograd graph; the engine weights it by the micro-batch's share of the update (its share
    /// of the update's [`Objective::example_weight`]s).
    fn micro_loss(&mut self, step: u64, micro: &[usize]) -> Result<Tensor>;

    /// Example `i`'s weight in its update's mean loss (the influence cap's share, a constitution
    /// or AI pair's config weight); 1 by default. An objective whose micro-batch loss is the
    /// weighted mean `sum(w·l) / sum(w)` returns its weights here, so that the engine, weighing
    /// each micro-batch by its share of the update's total weight, gives the whole update
    /// `sum(w·l) / sum(w)` whatever the micro-batch size: a half-weight pair alone in its
    /// micro-batch still counts half.
    fn example_weight(&self, i: usize) -> f64 {
        let _ = i;
        1.0
    }

    /// The step's metrics, after all its updates.
    fn finish_step(&mut self, step: u64) -> Result<StepReport>;

    /// The step metric the progress line shows beside the loss (its mean since the previous
    /// line), when the objective has a headline one.
    const PROGRESS_METRIC: Option<&'static str> = None;

    /// Held-out evaluation after `step` (every [`RunControl::eval_every`] steps and after the
    /// last); `None` when there is nothing to evaluate on. It must not build an autograd graph.
    fn evaluate(&mut self, step: u64) -> Result<Option<Evaluation>> {
        let _ = step;
        Ok(None)
    }

    /// State to keep across a resume besides weights, optimiser and data position (PPO's KL
    /// controller).
    fn save_state(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }

    /// Restores what [`Objective::save_state`] kept.
    fn restore_state(&mut self, state: serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// Trains the variables of `varmap` with `objective`; metrics stream to `out/log.jsonl` (one line
/// per step, flushed) and checkpoints to `out/checkpoints/`. A run started on an output directory
/// with a checkpoint resumes from it (unless [`RunControl::resume`] is off) and ends where an
/// uninterrupted run would.
pub fn run<O: Objective>(
    objective: &mut O,
    varmap: &VarMap,
    cfg: &EngineConfig,
    out: &Path,
) -> Result<TrainOutcome> {
    let name = O::NAME;
    let ctl = &cfg.control;
    let cursor = DataCursor {
        n: objective.examples(),
        seed: cfg.seed,
        order: cfg.order,
    };
    if cursor.n == 0 {
        bail!("no examples to train {name} on");
    }
    if cfg.examples_per_step == 0 || cfg.micro_batch == 0 {
        bail!(
            "a step needs at least one example (examples_per_step {}, micro_batch {})",
            cfg.examples_per_step,
            cfg.micro_batch
        );
    }
    cfg.schedule.validate().map_err(anyhow::Error::msg)?;
    let root = checkpoint_root(out);
    let mut opt = AdamW::from_varmap(varmap, cfg.adamw)?;
    let mut vm = varmap.clone();
    let mut log =
        RunLog::start_or_resume(out, &root, ctl.resume, cfg.seed, name, &mut vm, &mut opt)?;
    if let Some(saved) = log.state.extra.get(name) {
        objective
            .restore_state(saved.clone())
            .with_context(|| format!("{name} state in the checkpoint"))?;
    }
    let mut early: EarlyStopping = match log.state.extra.get(EarlyStopping::KEY) {
        Some(v) => serde_json::from_value(v.clone()).context("early-stopping state")?,
        None => EarlyStopping::default(),
    };
    let started = Instant::now();
    let mut outcome = TrainOutcome {
        completed: true,
        ..TrainOutcome::default()
    };
    let mut clock = PhaseClock::start();
    let mut progress = Progress::new(
        cfg.total_steps,
        log.state.step,
        ctl.progress_every,
        ctl.quiet,
    );
    while log.state.step < cfg.total_steps {
        let step = log.state.step + 1;
        let last = step == cfg.total_steps;
        let batch = cursor.next_batch(&mut log.state, cfg.examples_per_step);
        let lr = cfg.schedule.lr_at(step - 1);
        opt.set_learning_rate(lr);
        let updates = objective.plan(step, &batch, &mut clock)?;
        let (loss, grad_norm) = run_updates(objective, &mut opt, &updates, step, cfg, &mut clock)?;
        let report = objective.finish_step(step)?;
        cursor.advance(&mut log.state, batch.len());
        log.state.step = step;
        let mut line = LogLine::new(step)
            .with(keys::LOSS, loss)
            .with(keys::GRAD_NORM, grad_norm)
            .with(keys::LEARNING_RATE, lr);
        for (key, value) in &report.metrics {
            line = line.with(key, *value);
        }
        line = line.with(keys::EPOCH, cursor.epochs(&log.state));
        let headline = O::PROGRESS_METRIC.and_then(|k| line.get(k).map(|v| (k, v)));
        log.push(line)?;
        outcome.examples += batch.len() as u64;
        outcome.tokens += report.tokens;
        progress.step(step, loss, headline, lr, report.tokens);
        if let (Some(kl), Some(ceiling)) = (report.kl, cfg.kl_ceiling) {
            check_kl(step, kl, ceiling)?;
        }
        let due = |every: u64| every > 0 && step.is_multiple_of(every);
        if (due(ctl.eval_every) || last)
            && let Some(ev) = objective.evaluate(step)?
        {
            let mut line = LogLine::new(step);
            for (key, value) in &ev.metrics {
                line = line.with(key, *value);
            }
            progress.note(&format!("step {step}: {}", describe(&ev.metrics)));
            log.push(line)?;
            if early.observe(ev.watch, ctl.patience) && !last {
                progress.note(&format!(
                    "early stopping at step {step}: the evaluation has not improved for {} evaluations",
                    early.evals_without_improvement
                ));
                outcome.stopped_early = true;
            }
        }
        let interrupted = ctl.stop_after_steps.is_some_and(|k| step >= k) && !last;
        if due(cfg.checkpoint_every) || last || interrupted {
            let mut extra = serde_json::Map::new();
            if let Some(state) = objective.save_state()? {
                extra.insert(name.to_string(), state);
            }
            extra.insert(EarlyStopping::KEY.into(), serde_json::to_value(&early)?);
            log.checkpoint(&root, varmap, &opt, extra, ctl.keep_checkpoints)?;
        }
        clock.lap("metrics + checkpoint");
        if interrupted {
            outcome.completed = false;
        }
        if interrupted || outcome.stopped_early {
            break;
        }
    }
    progress.finish();
    outcome.steps = log.state.step;
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.epochs = cursor.epochs(&log.state);
    outcome.log = log.lines.clone();
    outcome.phase_seconds = clock.phases.phase_seconds;
    Ok(outcome)
}

/// `eval_accuracy 0.7500 eval_loss 0.4123 ...` for the progress output.
fn describe(metrics: &[(String, f64)]) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One optimiser update per entry of `updates`: its examples are scored `micro_batch` at a time,
/// each micro-batch's loss weighted by its share of the update and sent through its own backward
/// pass (so only one micro-batch's graph is alive at a time), the gradients summed, then one
/// AdamW step. Returns the mean loss and gradient norm over the updates.
fn run_updates<O: Objective>(
    objective: &mut O,
    opt: &mut AdamW,
    updates: &Updates,
    step: u64,
    cfg: &EngineConfig,
    clock: &mut PhaseClock,
) -> Result<(f64, f64)> {
    let (mut loss_sum, mut norm_sum) = (0.0, 0.0);
    for update in updates {
        let mut grads: Option<GradStore> = None;
        let mut value = 0.0;
        let update_weight = weight_of(objective, update);
        for micro in update.chunks(cfg.micro_batch) {
            let mut loss = objective.micro_loss(step, micro)?;
            if micro.len() != update.len() {
                // With unit weights this is the micro-batch's share of the examples, exactly.
                let share = if update_weight > 0.0 {
                    weight_of(objective, micro) / update_weight
                } else {
                    micro.len() as f64 / update.len() as f64
                };
                loss = loss.affine(share, 0.0)?;
            }
            clock.lap("forward");
            value += guard::check_loss(step, &loss)?;
            let next = loss.backward()?;
            grads = Some(match grads {
                Some(acc) => add_grads(acc, next, opt)?,
                None => next,
            });
            clock.lap("backward + optimiser");
        }
        let grads = grads.context("an optimiser update without micro-batches")?;
        let norm = apply_update(opt, &grads, step, cfg.max_grad_norm)?;
        loss_sum += value;
        norm_sum += norm;
        clock.lap("backward + optimiser");
    }
    let k = updates.len().max(1) as f64;
    Ok((loss_sum / k, norm_sum / k))
}

/// The total [`Objective::example_weight`] of `examples`.
fn weight_of<O: Objective>(objective: &O, examples: &[usize]) -> f64 {
    examples.iter().map(|&i| objective.example_weight(i)).sum()
}

/// Sums the gradients of the optimiser's parameters in `next` into `acc` (accumulation over
/// micro-batches).
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

/// Gradient guard, optional clip and AdamW step; returns the gradient norm (before clipping).
///
/// One pass over each gradient gives its sum of squares, which is finite exactly when the
/// gradient is (so it is both the guard and the norm), and the clip coefficient is applied
/// inside the AdamW update instead of rewriting every gradient first.
fn apply_update(
    opt: &mut AdamW,
    grads: &GradStore,
    step: u64,
    max_grad_norm: Option<f64>,
) -> Result<f64> {
    let mut sq = 0f64;
    for (name, var) in opt.params() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = crate::train::optim::grad_sq_sum(g)?;
            if !s.is_finite() {
                return Err(GuardError::NonFiniteGradient {
                    step,
                    param: name.to_string(),
                }
                .into());
            }
            sq += s;
        }
    }
    let norm = sq.sqrt();
    // PyTorch's clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied only below 1.
    let scale = max_grad_norm
        .map(|m| m / (norm + 1e-6))
        .filter(|&c| c < 1.0);
    opt.step_scaled(grads, scale)?;
    Ok(norm)
}

/// One optimiser update outside the engine (benchmarks and tests of a single step): the same
/// guard, clip and AdamW step the engine takes; returns the gradient norm.
pub fn optimiser_step(
    opt: &mut AdamW,
    loss: &Tensor,
    step: u64,
    max_grad_norm: Option<f64>,
) -> Result<f64> {
    guard::check_loss(step, loss)?;
    let grads = loss.backward()?;
    apply_update(opt, &grads, step, max_grad_norm)
}
