//! The training engine's promises, for every objective: an interrupted run resumed from its
//! checkpoint ends where an uninterrupted one does (KTO and the reward model here; DPO and PPO
//! in `policytrain`, reward with every kind of feedback in `rewardloss`), and a checkpoint made with another seed or by another objective is
//! refused with an error that names both and says what to do. The engine alone, with the smallest
//! objective (a line fit): micro-batch accumulation, objective state across a resume, the guards,
//! evaluation lines and early stopping.

use std::path::Path;

use candle_core::Device;
use rlhf_bot::run::outputs::PolicyAlgo;
use rlhf_bot::train::batching::encode_pairs;
use rlhf_bot::train::dpo_trainer::train_dpo;
use rlhf_bot::train::engine::{
    self, DataOrder, EngineConfig, Evaluation, Objective, RunControl, StepReport,
};
use rlhf_bot::train::kto_trainer::train_kto;
use rlhf_bot::train::optim::AdamWConfig;
use rlhf_bot::train::policy_common::{Policy, PolicyTrainOptions};
use rlhf_bot::train::policy_eval::RewardScorer;
use rlhf_bot::train::ppo_trainer::train_ppo;
use rlhf_bot::train::reward_models::weights_snapshot;
use rlhf_bot::train::reward_run::load_backbone;
use rlhf_bot::train::reward_trainer::{self, RewardBackbone, TrainConfig, TrainData};
use rlhf_bot::train::schedule::{Decay, Schedule};

use crate::policytrain::{
    assert_logs_close, assert_vars_close, dpo_opts, policy_dir, ppo_opts, prompts, rm_dir, thumbs,
    toy_pairs,
};

fn kto_opts(steps: u64) -> PolicyTrainOptions {
    PolicyTrainOptions {
        algo: PolicyAlgo::Kto,
        batch_size: 2,
        grad_accum: 1,
        ..dpo_opts(steps)
    }
}

fn load(opts: &PolicyTrainOptions, lora_seed: u64) -> Policy {
    Policy::load(&policy_dir(), opts.lora.as_ref(), lora_seed, &Device::Cpu).unwrap()
}

#[test]
fn kto_stop_and_resume_equals_one_run() {
    let ex = thumbs();
    let one = tempfile::tempdir().unwrap();
    let mut p1 = load(&kto_opts(5), 1);
    let full = train_kto(&mut p1, &ex, &kto_opts(5), one.path()).unwrap();

    // Interrupted after 3 steps: in the middle of the second epoch (4 thumbs, 2 per step).
    let two = tempfile::tempdir().unwrap();
    let mut p2 = load(&kto_opts(3), 1);
    train_kto(&mut p2, &ex, &kto_opts(3), two.path()).unwrap();
    drop(p2);
    // A new process: other fresh adapters, then resumed from the step-3 checkpoint.
    let mut p3 = load(&kto_opts(5), 99);
    let resumed = train_kto(&mut p3, &ex, &kto_opts(5), two.path()).unwrap();

    assert_eq!((resumed.steps, resumed.log.len()), (5, 5));
    // Only the two resumed steps ran in this process.
    assert_eq!(resumed.examples, 4);
    assert_logs_close(&full.log, &resumed.log, 1e-6);
    assert_eq!(full.epochs, 2.5);
    assert_eq!(resumed.epochs, 2.5);
    assert_vars_close(&p1, &p3);
}

/// Runs `algo` for `steps` steps with `seed` on `out`.
/// Issue 18: the reward model runs on the engine too. Interrupted in the middle of an epoch and
/// resumed by a new load of the model, it ends with the weights, the log (training and
/// evaluation lines) and the evaluation of one uninterrupted run, bit for bit.
#[test]
fn reward_stop_and_resume_equals_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = crate::trainer::tiny_rm_dir(tmp.path());
    let pairs = crate::trainer::toy_pairs(12);
    // 10 pairs, 2 a micro-batch, 2 micro-batches a step: steps of 4, 4 and 2 pairs an epoch.
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 2,
        grad_accum: 2,
        eval_every: 2,
        checkpoint_every: 0,
        ..crate::trainer::cfg()
    };
    let run = |out: &Path, stop: Option<u64>| {
        let (model, tok, _) = load_backbone(Some(&dir), 1, &Device::Cpu).unwrap();
        let data = TrainData::from(encode_pairs(&tok, &pairs[..10], 64, model.layout()).unwrap());
        let eval = encode_pairs(&tok, &pairs[10..], 64, model.layout()).unwrap();
        let c = TrainConfig {
            stop_after_steps: stop,
            ..cfg.clone()
        };
        let o = reward_trainer::train(&model, &data, &eval, &c, out, true, &Device::Cpu).unwrap();
        (o, weights_snapshot(model.varmap()).unwrap())
    };
    let (full, w_full) = run(&tmp.path().join("one"), None);
    assert_eq!(full.steps, 6);
    // A line per step and an evaluation line at steps 2, 4 and 6.
    assert_eq!(full.log.len(), 9);

    // Interrupted after step 2 (8 of the 10 pairs of the first epoch seen); checkpoint_every 0,
    // so the interruption's checkpoint is the only one.
    let two = tmp.path().join("two");
    let (part, _) = run(&two, Some(2));
    assert!(!part.completed);
    assert_eq!((part.steps, part.eval.as_ref()), (2, None));
    let (resumed, w_resumed) = run(&two, None);
    assert!(resumed.completed);
    assert_eq!(resumed.steps, 6);
    // Only steps 3 to 6 ran in this process: 2 + 4 + 4 + 2 pairs.
    assert_eq!(resumed.examples, 12);
    assert_eq!(resumed.log, full.log, "log differs after resume");
    assert_eq!(w_resumed, w_full, "weights differ after resume");
    assert_eq!(resumed.eval, full.eval);
    assert_eq!(resumed.epochs, 2.0);

    // Resuming the finished run trains nothing and still reports the final model's evaluation.
    let (again, w_again) = run(&two, None);
    assert_eq!((again.steps, again.examples), (6, 0));
    assert_eq!(again.eval, full.eval);
    assert_eq!(w_again, w_full);
}

fn policy_run(algo: PolicyAlgo, seed: u64, steps: u64, out: &Path) -> anyhow::Result<()> {
    let opts = PolicyTrainOptions {
        seed,
        ..match algo {
            PolicyAlgo::Dpo => dpo_opts(steps),
            PolicyAlgo::Kto => kto_opts(steps),
            PolicyAlgo::Ppo => ppo_opts(steps),
        }
    };
    let mut policy = load(&opts, 1);
    match algo {
        PolicyAlgo::Dpo => train_dpo(&mut policy, &toy_pairs(), &opts, out).map(drop),
        PolicyAlgo::Kto => train_kto(&mut policy, &thumbs(), &opts, out).map(drop),
        PolicyAlgo::Ppo => {
            let rm = RewardScorer::load(&rm_dir(), &Device::Cpu).unwrap();
            train_ppo(&mut policy, &rm, &prompts(), &opts, out).map(drop)
        }
    }
}

fn assert_seed_refused(err: &anyhow::Error, out: &Path) {
    let text = format!("{err:#}");
    assert!(
        text.contains("was made with seed 42 but this run has seed 43"),
        "{text}"
    );
    assert!(
        text.contains("hint: resume with the same settings"),
        "{text}"
    );
    assert!(
        text.contains(&out.join("checkpoints").display().to_string()),
        "{text}"
    );
}

/// Every policy objective, each after one step with seed 42 in a fresh directory, with the
/// `log.jsonl` it wrote.
fn first_steps() -> impl Iterator<Item = (PolicyAlgo, tempfile::TempDir, String)> {
    [PolicyAlgo::Dpo, PolicyAlgo::Kto, PolicyAlgo::Ppo]
        .into_iter()
        .map(|algo| {
            let tmp = tempfile::tempdir().unwrap();
            policy_run(algo, 42, 1, tmp.path()).unwrap();
            let log = std::fs::read_to_string(tmp.path().join("log.jsonl")).unwrap();
            (algo, tmp, log)
        })
}

#[test]
fn resuming_with_another_seed_is_refused_for_every_policy_objective() {
    for (algo, tmp, log_before) in first_steps() {
        let err = policy_run(algo, 43, 2, tmp.path()).unwrap_err();
        assert_seed_refused(&err, tmp.path());
        // Refused before anything was trained or rewritten.
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("log.jsonl")).unwrap(),
            log_before,
            "{algo:?}"
        );
        // The same seed resumes.
        policy_run(algo, 42, 2, tmp.path()).unwrap();
    }
}

#[test]
fn resuming_another_objectives_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    policy_run(PolicyAlgo::Dpo, 42, 1, tmp.path()).unwrap();
    let text = format!(
        "{:#}",
        policy_run(PolicyAlgo::Kto, 42, 2, tmp.path()).unwrap_err()
    );
    assert!(
        text.contains("was made by dpo training but this run trains kto"),
        "{text}"
    );
    assert!(
        text.contains("hint: start a new output directory"),
        "{text}"
    );
}

#[test]
fn resuming_the_reward_model_with_another_seed_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = crate::trainer::tiny_rm_dir(tmp.path());
    let pairs = crate::trainer::toy_pairs(8);
    let out = tmp.path().join("run");
    let run = |seed: u64, stop: Option<u64>| {
        let (model, tok, _) = load_backbone(Some(&dir), 1, &Device::Cpu).unwrap();
        let data = TrainData::from(encode_pairs(&tok, &pairs[..6], 64, model.layout()).unwrap());
        let eval = encode_pairs(&tok, &pairs[6..], 64, model.layout()).unwrap();
        let cfg = TrainConfig {
            seed,
            epochs: 2,
            batch_size: 2,
            stop_after_steps: stop,
            ..crate::trainer::cfg()
        };
        reward_trainer::train(&model, &data, &eval, &cfg, &out, true, &Device::Cpu)
    };
    assert!(!run(42, Some(1)).unwrap().completed);
    assert_seed_refused(&run(43, None).unwrap_err(), &out);
    assert!(run(42, None).unwrap().completed);
}

#[test]
fn every_objective_logs_the_engine_names() {
    for (algo, _tmp, text) in first_steps() {
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for key in ["loss", "grad_norm", "learning_rate", "epoch"] {
            let v = line[key].as_f64();
            assert!(v.is_some_and(f64::is_finite), "{algo:?}: {key} in {line}");
        }
        let lr = match algo {
            PolicyAlgo::Ppo => ppo_opts(1).lr,
            _ => dpo_opts(1).lr,
        };
        assert_eq!(line["learning_rate"].as_f64(), Some(lr), "{algo:?}");
        assert!(line.get("lr").is_none(), "{algo:?}: {line}");
    }
}

// ------------------------------------------------- the engine alone, with the smallest objective

/// Least squares for a line through noisy points of y = 3x − 1: the smallest objective the
/// engine runs, and the pattern a new algorithm follows (docs/training-engine.md).
struct Line {
    w: candle_core::Tensor,
    b: candle_core::Tensor,
    xs: Vec<f32>,
    ys: Vec<f32>,
    /// Examples scored so far, kept across a resume through save_state.
    seen: u64,
    nan_at_step: Option<u64>,
    kl: Option<f64>,
    /// When set, every evaluation reports this as the value early stopping watches (a stalled
    /// metric), beside the fit's mean squared error.
    eval_watch: Option<f64>,
}

impl Line {
    fn new(varmap: &candle_nn::VarMap) -> Self {
        let var = |name: &str| {
            varmap
                .get(
                    1,
                    name,
                    candle_nn::Init::Const(0.0),
                    candle_core::DType::F32,
                    &Device::Cpu,
                )
                .unwrap()
        };
        let xs: Vec<f32> = (0..10).map(|i| i as f32 / 5.0 - 1.0).collect();
        let ys = xs
            .iter()
            .enumerate()
            .map(|(i, x)| 3.0 * x - 1.0 + if i % 2 == 0 { 0.1 } else { -0.1 })
            .collect();
        Self {
            w: var("w"),
            b: var("b"),
            xs,
            ys,
            seen: 0,
            nan_at_step: None,
            kl: None,
            eval_watch: None,
        }
    }
}

impl Objective for Line {
    const NAME: &'static str = "line";

    fn examples(&self) -> usize {
        self.xs.len()
    }

    fn micro_loss(&mut self, step: u64, micro: &[usize]) -> anyhow::Result<candle_core::Tensor> {
        self.seen += micro.len() as u64;
        let pick = |v: &[f32]| micro.iter().map(|&i| v[i]).collect::<Vec<f32>>();
        let x = candle_core::Tensor::from_vec(pick(&self.xs), micro.len(), &Device::Cpu)?;
        let y = candle_core::Tensor::from_vec(pick(&self.ys), micro.len(), &Device::Cpu)?;
        let err = x.broadcast_mul(&self.w)?.broadcast_add(&self.b)?.sub(&y)?;
        let loss = err.sqr()?.mean_all()?;
        Ok(match self.nan_at_step {
            Some(s) if s == step => loss.affine(f64::NAN, 0.0)?,
            _ => loss,
        })
    }

    fn finish_step(&mut self, _step: u64) -> anyhow::Result<StepReport> {
        Ok(StepReport {
            kl: self.kl,
            ..StepReport::default()
        }
        .metric("seen", self.seen as f64))
    }

    /// Evaluation reads the weights detached: no graph, as the engine requires.
    fn evaluate(&mut self, _step: u64) -> anyhow::Result<Option<Evaluation>> {
        let Some(watch) = self.eval_watch else {
            return Ok(None);
        };
        let (w, b) = (self.w.detach(), self.b.detach());
        let x = candle_core::Tensor::from_vec(self.xs.clone(), self.xs.len(), &Device::Cpu)?;
        let y = candle_core::Tensor::from_vec(self.ys.clone(), self.ys.len(), &Device::Cpu)?;
        let err = x.broadcast_mul(&w)?.broadcast_add(&b)?.sub(&y)?;
        let mse = err.sqr()?.mean_all()?.to_scalar::<f32>()?;
        Ok(Some(Evaluation {
            metrics: vec![("eval_mse".into(), f64::from(mse))],
            watch: Some(watch),
        }))
    }

    fn save_state(&self) -> anyhow::Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!(self.seen)))
    }

    fn restore_state(&mut self, state: serde_json::Value) -> anyhow::Result<()> {
        self.seen = serde_json::from_value(state)?;
        Ok(())
    }
}

fn line_cfg(total_steps: u64, micro_batch: usize) -> EngineConfig {
    EngineConfig {
        seed: 7,
        total_steps,
        examples_per_step: 4,
        micro_batch,
        order: DataOrder::Epochs,
        schedule: Schedule {
            peak_lr: 0.1,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps,
            decay: Decay::Constant,
        },
        adamw: AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        max_grad_norm: None,
        checkpoint_every: 2,
        kl_ceiling: Some(1.0),
        control: RunControl::default(),
    }
}

/// Trains a fresh line for `cfg` on `out`; returns the outcome and (w, b).
fn train_line(cfg: &EngineConfig, out: &Path) -> (engine::TrainOutcome, Vec<f32>) {
    let varmap = candle_nn::VarMap::new();
    let mut line = Line::new(&varmap);
    let outcome = engine::run(&mut line, &varmap, cfg, out).unwrap();
    let wb = [&line.w, &line.b].map(|t| t.to_vec1::<f32>().unwrap()[0]);
    (outcome, wb.to_vec())
}

#[test]
fn micro_batches_accumulate_to_the_same_update_as_one_batch() {
    // 10 examples, 4 a step: steps of 4, 4 and 2 per epoch; 9 steps are three epochs.
    let tmp = tempfile::tempdir().unwrap();
    let (whole, w_whole) = train_line(&line_cfg(9, 4), &tmp.path().join("whole"));
    for micro in [1, 2, 3] {
        let (split, w_split) =
            train_line(&line_cfg(9, micro), &tmp.path().join(format!("m{micro}")));
        for (a, b) in w_whole.iter().zip(&w_split) {
            assert!(
                (a - b).abs() < 1e-5,
                "micro {micro}: {w_whole:?} vs {w_split:?}"
            );
        }
        assert_logs_close(&whole.log, &split.log, 1e-5);
    }
    // Every example once per epoch, and the line is being learnt.
    assert_eq!(whole.examples, 30);
    assert_eq!(whole.log.last().unwrap().get("seen"), Some(30.0));
    assert_eq!(whole.epochs, 3.0);
    let loss = |i: usize| whole.log[i].get("loss").unwrap();
    assert!(loss(8) < 0.75 * loss(0), "{} then {}", loss(0), loss(8));
}

#[test]
fn objective_state_and_data_position_survive_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, w_full) = train_line(&line_cfg(7, 2), &tmp.path().join("full"));
    let out = tmp.path().join("split");
    // Stopped after step 4 (a checkpoint: checkpoint_every 2), in the middle of the 2nd epoch.
    train_line(&line_cfg(4, 2), &out);
    let (resumed, w_resumed) = train_line(&line_cfg(7, 2), &out);
    assert_eq!((resumed.steps, resumed.examples), (7, 10));
    // `seen` counts from the restored state, not from 0.
    assert_eq!(resumed.log.last().unwrap().get("seen"), Some(24.0));
    assert_logs_close(&full.log, &resumed.log, 1e-6);
    for (a, b) in w_full.iter().zip(&w_resumed) {
        assert!((a - b).abs() < 1e-6, "{w_full:?} vs {w_resumed:?}");
    }
}

#[test]
fn a_non_finite_loss_or_a_kl_past_the_ceiling_stops_the_run_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let varmap = candle_nn::VarMap::new();
    let mut line = Line {
        nan_at_step: Some(3),
        ..Line::new(&varmap)
    };
    let err = engine::run(&mut line, &varmap, &line_cfg(6, 2), tmp.path()).unwrap_err();
    assert!(
        format!("{err:#}").contains("loss is NaN at step 3"),
        "{err:#}"
    );
    // Steps 1 and 2 were logged, nothing after.
    let log = std::fs::read_to_string(tmp.path().join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);

    let tmp = tempfile::tempdir().unwrap();
    let varmap = candle_nn::VarMap::new();
    let mut line = Line {
        kl: Some(2.5),
        ..Line::new(&varmap)
    };
    let err = engine::run(&mut line, &varmap, &line_cfg(6, 2), tmp.path()).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("KL to the reference is 2.500 nats at step 1, above the ceiling 1"),
        "{text}"
    );
    assert!(text.contains("hint:"), "{text}");
}

#[test]
fn evaluations_are_logged_and_a_stalled_one_stops_the_run_early() {
    // Every evaluation reports the same watched value: it never improves after the first.
    let stalled = |patience: Option<u32>| {
        let tmp = tempfile::tempdir().unwrap();
        let varmap = candle_nn::VarMap::new();
        let mut line = Line {
            eval_watch: Some(0.5),
            ..Line::new(&varmap)
        };
        let mut cfg = line_cfg(8, 2);
        cfg.control.eval_every = 1;
        cfg.control.patience = patience;
        let outcome = engine::run(&mut line, &varmap, &cfg, tmp.path()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("log.jsonl")).unwrap();
        (outcome, text.lines().count())
    };
    let (outcome, file_lines) = stalled(Some(2));
    // Step 1 sets the best; steps 2 and 3 do not beat it: two evaluations without improvement.
    assert!(outcome.stopped_early && outcome.completed);
    assert_eq!(outcome.steps, 3);
    let evals: Vec<u64> = outcome
        .log
        .iter()
        .filter(|l| l.get("eval_mse").is_some())
        .map(|l| l.step)
        .collect();
    assert_eq!(evals, vec![1, 2, 3]);
    // One training line per step, each followed by its evaluation line, in the file too.
    assert_eq!(file_lines, 6);

    // Without patience the same run goes to its end, evaluating every step.
    let (outcome, file_lines) = stalled(None);
    assert!(!outcome.stopped_early);
    assert_eq!(outcome.steps, 8);
    assert_eq!((outcome.log.len(), file_lines), (16, 16));
}
