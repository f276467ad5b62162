//! `reward.precision`: bf16 matrix products (bf16 inputs, f32 accumulation) against f32, through
//! the real binary. A child process per run, because the precision is process-wide and every
//! other test in this binary expects f32 products.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_bot::kernels::bf16_gemm;
use rlhf_bot::model::bert::{BertConfig, BertRewardModel, LoadedTokenizer, RewardHeadConfig};
use rlhf_bot::run::outputs::{RewardMetrics, read_log, read_metrics};

use crate::common::{Workspace, bin, repo, stderr};
use crate::trainer::{pairs_jsonl, toy_pairs};

/// A seeded two-layer BERT reward model (bert.rs's tiny config, positions for 48 tokens, no
/// dropout) with the fixture tokenizer, saved to `dir`.
pub(crate) fn tiny_bert_reward_model(dir: &Path) {
    let cfg = BertConfig {
        max_position_embeddings: 64,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..crate::bert::tiny_config()
    };
    let mut model =
        BertRewardModel::new_seeded(&cfg, RewardHeadConfig::default(), &Device::Cpu, 7).unwrap();
    model.set_tokenizer(
        LoadedTokenizer::from_file(&repo().join("tests/fixtures/bert/tokenizer.json")).unwrap(),
    );
    model.save(dir).unwrap();
}

/// Trains the reward model at `precision` (as `reward.precision` in the config) and returns the
/// run directory.
fn train_at(ws: &Workspace, model: &Path, data: (&Path, &Path), precision: &str) -> PathBuf {
    let config = ws.write_config(&format!(
        "{}\nreward:\n  precision: {precision}\n",
        ws.sample_config_text()
    ));
    let out = ws.path().join(format!("run-{precision}"));
    let o = bin()
        .arg("--config")
        .arg(&config)
        .args(["train", "reward", "--model"])
        .arg(model)
        .arg("--dataset")
        .arg(data.0)
        .arg("--eval")
        .arg(data.1)
        .args(["--batch-size", "2", "--max-length", "48", "--epochs", "2"])
        .args(["--lr", "1e-3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// (step, loss) of every logged training step.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    read_log(run)
        .unwrap()
        .iter()
        .filter_map(|l| l.get("loss").map(|v| (l.step, v)))
        .collect()
}

#[test]
fn bf16_reward_training_tracks_f32() {
    if !bf16_gemm::supported() {
        eprintln!("note: this CPU lacks AVX512_BF16; the bf16 training comparison is skipped");
        return;
    }
    let ws = Workspace::new();
    let model = ws.path().join("tiny-bert");
    tiny_bert_reward_model(&model);
    let pairs = toy_pairs(16);
    let (train, eval) = (ws.path().join("train.jsonl"), ws.path().join("eval.jsonl"));
    std::fs::write(&train, pairs_jsonl(&pairs[..12])).unwrap();
    std::fs::write(&eval, pairs_jsonl(&pairs[12..])).unwrap();

    let f32_run = train_at(&ws, &model, (&train, &eval), "f32");
    let bf16_run = train_at(&ws, &model, (&train, &eval), "bf16");
    for (run, want) in [(&f32_run, "f32"), (&bf16_run, "bf16")] {
        let metrics: RewardMetrics = read_metrics(run).unwrap();
        assert_eq!(metrics.train.precision.as_deref(), Some(want));
    }
    let (exact, rounded) = (losses(&f32_run), losses(&bf16_run));
    assert_eq!(exact.len(), 12, "{exact:?}");
    assert_eq!(
        exact.iter().map(|l| l.0).collect::<Vec<_>>(),
        rounded.iter().map(|l| l.0).collect::<Vec<_>>()
    );
    let largest = exact
        .iter()
        .zip(&rounded)
        .map(|(a, b)| (a.1 - b.1).abs())
        .fold(0.0, f64::max);
    eprintln!("f32 losses {exact:?}\nbf16 losses {rounded:?}\nlargest difference {largest}");
    for (&(step, a), &(_, b)) in exact.iter().zip(&rounded) {
        assert!(
            (a - b).abs() <= 2e-3,
            "step {step}: f32 loss {a}, bf16 loss {b}"
        );
    }
    // The products really ran in bf16: some loss differs from f32's.
    assert!(
        exact.iter().zip(&rounded).any(|(a, b)| a.1 != b.1),
        "bf16 losses equal f32's bit for bit: {rounded:?}"
    );
    // Both learn: the last steps' mean loss is below the first steps'.
    let mean = |l: &[(u64, f64)]| l.iter().map(|x| x.1).sum::<f64>() / l.len() as f64;
    for l in [&exact, &rounded] {
        assert!(mean(&l[9..]) < mean(&l[..3]), "no learning: {l:?}");
    }
}

#[test]
fn an_unknown_precision_is_a_config_error_naming_the_key() {
    let ws = Workspace::new();
    let config = ws.write_config(&format!(
        "{}\nreward:\n  precision: fp8\n",
        ws.sample_config_text()
    ));
    let o = bin()
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("reward.precision")
            && err.contains("fp8")
            && err.contains("f32, bf16 or auto"),
        "{err}"
    );
}
