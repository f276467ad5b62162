//! Reward-model training loop: learning, resume equivalence, NaN guard, determinism, outputs.
//! Tiny models only (the 16-wide `tiny-llama-rm` fixture and the small default llama).

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_bot::train::batching::{PairText, SequenceLayout, assemble, encode_pairs};
use rlhf_bot::train::device::DeviceChoice;
use rlhf_bot::train::reward_models::weights_snapshot;
use rlhf_bot::train::reward_run::{
    RewardTrainOptions, load_backbone, load_pairs, split_pairs, train_reward_on,
};
use rlhf_bot::train::reward_trainer::{self, RewardBackbone, TrainConfig, TrainData, evaluate};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `tiny-llama-rm` with the SmolLM2 tokenizer beside it, as a model directory.
pub(crate) fn tiny_rm_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny-rm");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-llama-rm").join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("tiny-llama-policy/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    dir
}

/// A learnable toy preference set: polite, on-topic answers beat curt refusals.
pub(crate) fn toy_pairs(n: usize) -> Vec<PairText> {
    let topics = [
        "carbon taxes",
        "solar subsidies",
        "wind farms",
        "emission trading",
        "green bonds",
        "heat pumps",
        "coal phase-out",
        "electric buses",
    ];
    (0..n)
        .map(|i| {
            let t = topics[i % topics.len()];
            PairText {
                prompt: format!("User: Can you explain {t} (question {i})?\nAssistant: "),
                chosen: format!(
                    "Sure, happy to help: {t} work by changing prices, so people adapt."
                ),
                rejected: "No.".to_string(),
                margin: None,
                weight: None,
            }
        })
        .collect()
}

/// Preference pairs as TRL JSON lines (`prompt`, `chosen`, `rejected`), as `--dataset` reads them.
pub(crate) fn pairs_jsonl(pairs: &[PairText]) -> String {
    pairs
        .iter()
        .map(|p| {
            serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
                .to_string()
                + "\n"
        })
        .collect()
}

pub(crate) fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 4,
        max_length: 64,
        batch_size: 4,
        lr: 1e-2,
        warmup_steps: Some(1),
        eval_every: 4,
        log_every: 1,
        checkpoint_every: 0,
        quiet: true,
        ..TrainConfig::default()
    }
}

#[test]
fn loss_falls_and_every_parameter_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_rm_dir(tmp.path());
    let (model, tok, _) = load_backbone(Some(&dir), 1, &Device::Cpu).unwrap();
    let pairs = toy_pairs(24);
    let data = TrainData {
        pairs: encode_pairs(&tok, &pairs[..16], 64, model.layout()).unwrap(),
        points: Vec::new(),
    };
    let eval = encode_pairs(&tok, &pairs[16..], 64, model.layout()).unwrap();
    let before = weights_snapshot(model.varmap()).unwrap();
    let out = reward_trainer::train(
        &model,
        &data,
        &eval,
        &cfg(),
        tmp.path(),
        false,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(out.steps, 16);
    assert!(out.completed);
    let losses: Vec<f64> = out.log.iter().filter_map(|l| l.get("loss")).collect();
    let first = losses[..2].iter().sum::<f64>() / 2.0;
    let last = losses[losses.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(last < first * 0.5, "loss did not fall: {losses:?}");
    assert!(
        out.eval.as_ref().unwrap().accuracy >= 0.99,
        "{:?}",
        out.eval
    );
    let after = weights_snapshot(model.varmap()).unwrap();
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert!(a != b, "parameter {name} did not change");
    }
}

#[test]
fn resume_reaches_the_same_weights_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_rm_dir(tmp.path());
    let pairs = toy_pairs(18);
    // 14 pairs, batch 3, accumulation 2: uneven micro-batches and a short last step per epoch.
    let c = TrainConfig {
        epochs: 2,
        batch_size: 3,
        grad_accum: 2,
        eval_every: 2,
        log_every: 3,
        checkpoint_every: 2,
        ..cfg()
    };
    let run = |out: &Path, c: &TrainConfig, resume: bool| {
        let (model, tok, _) = load_backbone(Some(&dir), 1, &Device::Cpu).unwrap();
        let data = TrainData {
            pairs: encode_pairs(&tok, &pairs[..14], 64, model.layout()).unwrap(),
            points: Vec::new(),
        };
        let eval = encode_pairs(&tok, &pairs[14..], 64, model.layout()).unwrap();
        let o = reward_trainer::train(&model, &data, &eval, c, out, resume, &Device::Cpu).unwrap();
        (o, weights_snapshot(model.varmap()).unwrap())
    };
    let (full, w_full) = run(&tmp.path().join("a"), &c, false);
    assert_eq!(full.steps, 6);
    let b = tmp.path().join("b");
    // Interrupted after 3 steps: in the middle of the second epoch, between checkpoints.
    let (part, _) = run(
        &b,
        &TrainConfig {
            stop_after_steps: Some(3),
            ..c.clone()
        },
        false,
    );
    assert!(!part.completed);
    assert_eq!(part.steps, 3);
    let (resumed, w_resumed) = run(&b, &c, true);
    assert!(resumed.completed);
    assert_eq!(resumed.steps, 6);
    assert_eq!(
        resumed.log, full.log,
        "loss trajectory differs after resume"
    );
    assert_eq!(w_resumed, w_full, "weights differ after resume");
    let log = std::fs::read_to_string(b.join("log.jsonl")).unwrap();
    assert_eq!(
        log,
        std::fs::read_to_string(tmp.path().join("a/log.jsonl")).unwrap()
    );
}

#[test]
fn non_finite_loss_names_the_step_and_writes_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_rm_dir(tmp.path());
    let mut pairs = toy_pairs(12);
    // One poisoned pair: its batch's loss is NaN, whichever step the shuffle puts it in.
    pairs[5].margin = Some(f64::NAN);
    let out = tmp.path().join("out");
    let opts = RewardTrainOptions {
        model: Some(dir.clone()),
        out: out.clone(),
        train: cfg(),
        ..RewardTrainOptions::default()
    };
    let err = format!(
        "{:#}",
        train_reward_on(&opts, &pairs[..8], &pairs[8..]).unwrap_err()
    );
    assert!(err.contains("loss is NaN at step "), "{err}");
    assert!(!out.join("model.safetensors").exists());
    assert!(!out.join("metrics.json").exists());

    // An absurd learning rate blows the weights up; the guard stops the run before a save.
    let out2 = tmp.path().join("out2");
    let opts = RewardTrainOptions {
        model: Some(dir),
        out: out2.clone(),
        train: TrainConfig {
            lr: 1e30,
            max_grad_norm: None,
            ..cfg()
        },
        ..RewardTrainOptions::default()
    };
    let err = format!(
        "{:#}",
        train_reward_on(&opts, &pairs[..4], &pairs[8..]).unwrap_err()
    );
    assert!(err.contains("at step "), "{err}");
    assert!(err.contains("hint:"), "{err}");
    assert!(!out2.join("model.safetensors").exists());
}

fn default_model_run(out: &Path, seed: u64) -> Vec<(String, Vec<f32>)> {
    let opts = RewardTrainOptions {
        out: out.to_path_buf(),
        train: TrainConfig {
            epochs: 1,
            seed,
            lr: 1e-3,
            ..cfg()
        },
        ..RewardTrainOptions::default()
    };
    let pairs = toy_pairs(10);
    let s = train_reward_on(&opts, &pairs[..8], &pairs[8..]).unwrap();
    assert_eq!(s.backbone, "llama");
    let (model, _, _) = load_backbone(Some(out), seed, &Device::Cpu).unwrap();
    weights_snapshot(model.varmap()).unwrap()
}

#[test]
fn same_seed_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = default_model_run(&tmp.path().join("a"), 7);
    let b = default_model_run(&tmp.path().join("b"), 7);
    let c = default_model_run(&tmp.path().join("c"), 8);
    assert!(a == b, "same seed, different weights");
    assert!(a != c, "different seeds gave the same weights");
}

#[test]
fn run_directory_has_model_metrics_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_rm_dir(tmp.path());
    let out = tmp.path().join("run");
    let opts = RewardTrainOptions {
        model: Some(dir.clone()),
        out: out.clone(),
        production_model: Some(dir),
        train: TrainConfig {
            checkpoint_every: 4,
            ..cfg()
        },
        ..RewardTrainOptions::default()
    };
    let pairs = toy_pairs(20);
    let s = train_reward_on(&opts, &pairs[..16], &pairs[16..]).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.json",
        "log.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    for k in ["accuracy", "loss", "n"] {
        assert!(m["eval"][k].is_number(), "eval.{k} missing in {m}");
    }
    for k in ["steps", "seconds", "examples_per_second"] {
        assert!(m["train"][k].is_number(), "train.{k} missing in {m}");
    }
    assert_eq!(m["eval"]["n"], 4);
    assert_eq!(m["train"]["steps"], 16);
    assert_eq!(m["dataset"]["examples_sha256"].as_str().unwrap().len(), 64);
    assert!(m["production_eval"]["accuracy"].is_number());
    let lines = rlhf_bot::run::outputs::read_log(&out).unwrap();
    for k in ["loss", "accuracy", "margin", "mean_reward", "learning_rate"] {
        assert!(lines[0].get(k).is_some(), "log line lacks {k}");
    }
    assert!(lines.iter().any(|l| l.get("eval_accuracy").is_some()));
    // Checkpoints are pruned to the newest two.
    let ckpts = std::fs::read_dir(out.join("checkpoints")).unwrap().count();
    assert_eq!(ckpts, 2);

    // The saved model reloads and scores the eval set exactly as the run reported.
    let (model, tok, _) = load_backbone(Some(&out), 0, &Device::Cpu).unwrap();
    let eval = encode_pairs(&tok, &pairs[16..], 64, model.layout()).unwrap();
    let ev = evaluate(&model, &eval, 8, &Device::Cpu).unwrap();
    assert_eq!(ev.accuracy, s.metrics.eval.accuracy);
    assert!((ev.loss - s.metrics.eval.loss).abs() < 1e-6);
}

#[test]
fn truncation_keeps_the_prompt_end_and_the_answer_start() {
    let layout = SequenceLayout {
        prefix: vec![101],
        separator: vec![102],
        suffix: vec![102],
        token_types: true,
        pad_id: 0,
    };
    let prompt: Vec<u32> = (1..=20).collect();
    let answer: Vec<u32> = (1001..=1020).collect();
    let row = assemble(&prompt, &answer, 13, &layout).unwrap();
    // 10 text tokens: the answer gets half (its first 5), the prompt its last 5.
    assert_eq!(
        row.ids,
        vec![
            101, 16, 17, 18, 19, 20, 102, 1001, 1002, 1003, 1004, 1005, 102
        ]
    );
    assert_eq!(row.types, vec![0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
    // A short prompt leaves the rest of the budget to the answer.
    let row = assemble(&prompt[..2], &answer, 13, &layout).unwrap();
    assert_eq!(&row.ids[..4], &[101, 1, 2, 102]);
    assert_eq!(row.ids.len(), 13);
    assert!(assemble(&prompt, &answer, 4, &layout).is_err());
}

#[test]
fn preference_files_split_hh_dialogues_and_split_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant: Sure: a pun.", "rejected": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant: No."}"#,
            "\n",
            r#"{"prompt": "Why?", "chosen": "Because.", "rejected": "No.", "margin": 1.5}"#,
            "\n"
        ),
    )
    .unwrap();
    let pairs = load_pairs(&path).unwrap();
    assert_eq!(
        pairs[0].prompt,
        "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant:"
    );
    // Answers are trimmed and a plain prompt is rendered as the store's prompts are (dataset::io).
    assert_eq!(pairs[0].chosen, "Sure: a pun.");
    assert_eq!(pairs[0].rejected, "No.");
    assert_eq!(pairs[1].prompt, "\n\nHuman: Why?\n\nAssistant:");
    assert_eq!(pairs[1].margin, Some(1.5));

    // The same file gzip-compressed (as HH-RLHF ships) reads the same.
    let gz = tmp.path().join("pairs.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    std::io::Write::write_all(&mut enc, &std::fs::read(&path).unwrap()).unwrap();
    enc.finish().unwrap();
    assert_eq!(load_pairs(&gz).unwrap(), pairs);

    let (t1, e1) = split_pairs(toy_pairs(50), 0.2, 3).unwrap();
    let (t2, e2) = split_pairs(toy_pairs(50), 0.2, 3).unwrap();
    assert_eq!((t1.len(), e1.len()), (40, 10));
    assert_eq!((&t1, &e1), (&t2, &e2));
    assert!(e1.iter().all(|p| !t1.contains(p)));
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let d: DeviceChoice = "cuda".parse().unwrap();
    if cfg!(feature = "cuda") {
        return;
    }
    let err = d.open().unwrap_err().to_string();
    assert!(
        err.contains("--features cuda") && err.contains("hint:"),
        "{err}"
    );
    assert!("tpu".parse::<DeviceChoice>().is_err());
}

/// Issue 18: a run whose stderr is a pipe (neither a terminal nor CI) still reports progress —
/// a line for the first step, then every `log_every` (10) steps and at the end — and `log.jsonl`
/// holds a training line for every optimiser step and the evaluation lines, flushed as they are
/// written.
#[test]
fn piped_stderr_gets_progress_lines_and_the_log_fills() {
    let ws = crate::common::Workspace::new();
    let config = ws.sample_config();
    let model = tiny_rm_dir(ws.path());
    let pairs = toy_pairs(16);
    let (train, eval) = (ws.path().join("train.jsonl"), ws.path().join("eval.jsonl"));
    std::fs::write(&train, pairs_jsonl(&pairs[..12])).unwrap();
    std::fs::write(&eval, pairs_jsonl(&pairs[12..])).unwrap();
    let out = ws.path().join("run");
    let o = crate::common::bin()
        .arg("--config")
        .arg(&config)
        .args(["train", "reward", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&train)
        .arg("--eval")
        .arg(&eval)
        .args([
            "--batch-size",
            "1",
            "--max-length",
            "48",
            "--eval-every",
            "5",
            "--out",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = crate::common::stderr(&o);
    assert!(o.status.success(), "{stderr}");
    let steps: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split(" step ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    for want in ["1/12", "10/12", "12/12"] {
        assert!(
            steps.contains(&want),
            "no progress line for step {want}:\n{stderr}"
        );
    }
    assert!(stderr.contains("tok/s"), "{stderr}");
    // No terminal: no carriage-return redraws of a bar.
    assert!(!stderr.contains('\r'), "{stderr:?}");
    let lines = rlhf_bot::run::outputs::read_log(&out).unwrap();
    let logged: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l.step)
        .collect();
    assert_eq!(logged, (1..=12).collect::<Vec<u64>>(), "{lines:?}");
    // `--eval-every 5`: after steps 5 and 10, and after the last.
    let evaluated: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("eval_accuracy").is_some())
        .map(|l| l.step)
        .collect();
    assert_eq!(evaluated, [5, 10, 12], "{lines:?}");
}
