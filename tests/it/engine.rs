//! The training engine's promises, for every objective: an interrupted run resumed from its
//! checkpoint ends where an uninterrupted one does (KTO here; DPO and PPO in `policytrain`,
//! reward in `trainer`), and a checkpoint made with another seed or by another objective is
//! refused with an error that names both and says what to do.

use std::path::Path;

use candle_core::Device;
use rlhf_bot::run::outputs::PolicyAlgo;
use rlhf_bot::train::batching::encode_pairs;
use rlhf_bot::train::dpo_trainer::train_dpo;
use rlhf_bot::train::kto_trainer::train_kto;
use rlhf_bot::train::policy_common::{Policy, PolicyTrainOptions};
use rlhf_bot::train::policy_eval::RewardScorer;
use rlhf_bot::train::ppo_trainer::train_ppo;
use rlhf_bot::train::reward_run::load_backbone;
use rlhf_bot::train::reward_trainer::{self, RewardBackbone, TrainConfig, TrainData};

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
