//! The policy stage as a user meets it: `train policy` (DPO, KTO, PPO) and `generate` through
//! the real binary on the tiny fixtures (`tests/fixtures/tiny-llama-policy`, 2 layers, hidden
//! 16, SmolLM2's vocabulary; `tests/fixtures/tiny-llama-rm`), the `policy:` config section's
//! errors, and `run` on the embedded default producing a policy candidate and report section.

use std::path::{Path, PathBuf};

use rlhf_bot::config;

use crate::common::{Workspace, bin, repo, stderr, stdout};

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// A config whose store is in the workspace (train policy with --data never reads feedback).
const POLICY_SECTION: &str = "policy:
  batch_size: 2
  max_prompt_length: 32
  max_completion_length: 8
  eval_prompts: 2
  lr: 0.01
  seed: 3
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], merge: true}
  ppo: {rollouts_per_step: 2, ppo_epochs: 1}
";

fn workspace_config(ws: &Workspace, policy: &str) -> PathBuf {
    ws.write_config(&format!(
        "feedback:\n  source: file\n  path: {}\nstore:\n  dir: {}\nregistry:\n  path: {}\n  artifacts: {}\n{policy}",
        ws.path().join("none.jsonl").display(),
        ws.store_dir().display(),
        ws.path().join("registry.yaml").display(),
        ws.path().join("artifacts").display(),
    ))
}

/// Four prompts in TRL's formats: DPO pairs and KTO thumbs on the same prompts.
fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let rows = [
        ("What is a carbon tax?", "A price on emissions.", "Bananas."),
        ("Define GDP.", "Total output of an economy.", "Trains."),
        ("What is inflation?", "Rising prices over time.", "Purple."),
        ("What is a tariff?", "A tax on imports.", "No idea."),
    ];
    let mut dpo = String::new();
    let mut kto = String::new();
    for (p, c, r) in rows {
        let prompt = format!("\n\nHuman: {p}\n\nAssistant:");
        dpo.push_str(
            &serde_json::json!({"prompt": prompt, "chosen": format!(" {c}"), "rejected": format!(" {r}")})
                .to_string(),
        );
        dpo.push('\n');
        for (answer, label) in [(c, true), (r, false)] {
            kto.push_str(
                &serde_json::json!({"prompt": prompt, "completion": format!(" {answer}"), "label": label})
                    .to_string(),
            );
            kto.push('\n');
        }
    }
    let (d, k) = (dir.join("dpo.jsonl"), dir.join("kto.jsonl"));
    std::fs::write(&d, dpo).unwrap();
    std::fs::write(&k, kto).unwrap();
    (d, k)
}

fn train_policy(ws: &Workspace, algo: &str, model: &Path, data: &Path) -> serde_json::Value {
    train_policy_with(ws, POLICY_SECTION, algo, model, data)
}

/// `train policy` under a config whose `policy:` section is `section`.
fn train_policy_with(
    ws: &Workspace,
    section: &str,
    algo: &str,
    model: &Path,
    data: &Path,
) -> serde_json::Value {
    let cfg = workspace_config(ws, section);
    let out = ws.path().join(format!("run-{algo}/policy"));
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args([
            "--format", "json", "train", "policy", "--algo", algo, "--steps", "2",
        ])
        .arg("--model")
        .arg(model)
        .arg("--reward-model")
        .arg(fixtures().join("tiny-llama-rm"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(summary["algo"], algo);
    assert_eq!(summary["out_dir"], out.display().to_string());
    summary
}

fn log_keys(dir: &Path) -> Vec<String> {
    let log = rlhf_bot::run::outputs::read_log(dir).unwrap();
    assert_eq!(log.len(), 2, "two steps logged");
    log[1].values.keys().cloned().collect()
}

/// metrics.json is the `PolicyMetrics` contract the report reads; the log has TRL's names.
fn check_outputs(out: &Path, algo: &str, trl_keys: &[&str]) {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["algo"], algo);
    assert_eq!(m["train"]["steps"], 2);
    assert_eq!(m["eval"]["n"], 2, "eval_prompts: 2");
    let (w, lo, hi) = (
        m["eval"]["win_rate"].as_f64().unwrap(),
        m["eval"]["win_rate_low"].as_f64().unwrap(),
        m["eval"]["win_rate_high"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&w) && lo <= w && w <= hi, "{m}");
    for k in ["mean_reward", "kl", "response_length"] {
        assert!(m["eval"][k].as_f64().unwrap().is_finite(), "{k}: {m}");
    }
    let keys = log_keys(out);
    for k in trl_keys {
        assert!(
            keys.iter().any(|x| x == k),
            "{k} missing from log.jsonl: {keys:?}"
        );
    }
    // LoRA: a PEFT adapter, and with lora.merge the full weights in HF layout.
    assert!(
        out.join("policy/adapter/adapter_model.safetensors")
            .is_file()
    );
    assert!(out.join("merged/model.safetensors").is_file());
    assert!(out.join("merged/tokenizer.json").is_file());
}

#[test]
fn train_policy_dpo_writes_trl_metrics_and_merged_weights() {
    let ws = Workspace::new();
    let (dpo, _) = write_data(ws.path());
    let s = train_policy(&ws, "dpo", &fixtures().join("tiny-llama-policy"), &dpo);
    let out = PathBuf::from(s["out_dir"].as_str().unwrap());
    check_outputs(
        &out,
        "dpo",
        &[
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ],
    );
    // The merged weights differ from the base (the adapter was folded in), and the merged
    // directory answers like the adapter over its base does.
    let base = candle_core::safetensors::load(
        fixtures().join("tiny-llama-policy/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let merged = candle_core::safetensors::load(
        out.join("merged/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let diff = (&base[name] - &merged[name])
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0, "q_proj unchanged by the merge");
    let a = generate(&[&out.join("merged").display().to_string(), "--seed", "1"]);
    let b = generate(&[&out.join("policy").display().to_string(), "--seed", "1"]);
    assert_eq!(a["completion"], b["completion"]);
}

#[test]
fn train_policy_kto_writes_trl_metrics() {
    let ws = Workspace::new();
    let (_, kto) = write_data(ws.path());
    let s = train_policy(&ws, "kto", &fixtures().join("tiny-llama-policy"), &kto);
    check_outputs(
        Path::new(s["out_dir"].as_str().unwrap()),
        "kto",
        &[
            "loss",
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
        ],
    );
}

#[test]
fn train_policy_ppo_from_a_gguf_writes_trl_metrics() {
    let ws = Workspace::new();
    let (dpo, _) = write_data(ws.path());
    let gguf = ws.path().join("tiny.gguf");
    crate::policy_model::write_tiny_gguf(&gguf);
    let s = train_policy(&ws, "ppo", &gguf, &dpo);
    let out = PathBuf::from(s["out_dir"].as_str().unwrap());
    check_outputs(&out, "ppo", &crate::policytrain::PPO_KEYS);
    // The GGUF was converted once, beside the output (not inside what the registry copies).
    assert!(
        out.with_file_name("policy-base")
            .join("model.safetensors")
            .is_file()
    );
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn train_policy_grpo_and_rloo_write_trl_metrics() {
    let ws = Workspace::new();
    let (dpo, _) = write_data(ws.path());
    for algo in ["grpo", "rloo"] {
        let s = train_policy(&ws, algo, &fixtures().join("tiny-llama-policy"), &dpo);
        let out = PathBuf::from(s["out_dir"].as_str().unwrap());
        check_outputs(
            &out,
            algo,
            &[
                "loss",
                "reward",
                "reward_std",
                "frac_reward_zero_std",
                "clip_ratio/region_mean",
                "completions/mean_length",
            ],
        );
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        assert!(m["last_step"]["reward_std"].as_f64().is_some(), "{m}");
    }
}

/// `policy.precision: bf16` (frozen base, reference and reward model held in bf16) and
/// `policy.gradient_checkpointing` through the binary: GRPO scores rollouts with the reward
/// model, and the run records the precision it ran in.
#[test]
fn train_policy_grpo_with_bf16_frozen_models_and_recomputed_layers() {
    if !rlhf_bot::kernels::bf16_gemm::supported() {
        eprintln!("note: this CPU lacks AVX512_BF16; policy.precision: bf16 is refused here");
        return;
    }
    let ws = Workspace::new();
    let (dpo, _) = write_data(ws.path());
    let section = format!("{POLICY_SECTION}  precision: bf16\n  gradient_checkpointing: true\n");
    let s = train_policy_with(
        &ws,
        &section,
        "grpo",
        &fixtures().join("tiny-llama-policy"),
        &dpo,
    );
    let out = PathBuf::from(s["out_dir"].as_str().unwrap());
    check_outputs(&out, "grpo", &["loss", "reward"]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["train"]["precision"], "bf16", "{m}");
}

#[test]
fn train_policy_continues_only_with_resume() {
    let ws = Workspace::new();
    let (dpo, _) = write_data(ws.path());
    train_policy(&ws, "dpo", &fixtures().join("tiny-llama-policy"), &dpo);
    let cfg = workspace_config(&ws, POLICY_SECTION);
    let out = ws.path().join("run-dpo/policy");
    let again = |extra: &[&str]| {
        bin()
            .arg("--config")
            .arg(&cfg)
            .args(["train", "policy", "--algo", "dpo"])
            .args(extra)
            .arg("--model")
            .arg(fixtures().join("tiny-llama-policy"))
            .arg("--reward-model")
            .arg(fixtures().join("tiny-llama-rm"))
            .arg("--data")
            .arg(&dpo)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = again(&["--steps", "3"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("--resume") && err.contains("hint:"), "{err}");
    // With --resume the run goes on from its step-2 checkpoint: one more step is logged.
    let o = again(&["--steps", "3", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = rlhf_bot::run::outputs::read_log(&out).unwrap();
    assert_eq!(log.iter().map(|l| l.step).collect::<Vec<_>>(), [1, 2, 3]);
}

fn generate(extra: &[&str]) -> serde_json::Value {
    let (model, rest) = extra.split_first().unwrap();
    let o = bin()
        .args([
            "--format",
            "json",
            "generate",
            "--prompt",
            "The capital of France is",
        ])
        .args(["--model", model, "--max-new-tokens", "8"])
        .args(rest)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn generate_is_deterministic_for_a_seed_and_varies_across_seeds() {
    let m = fixtures().join("tiny-llama-policy").display().to_string();
    let sampled = |seed: &str| generate(&[&m, "--temperature", "1.0", "--seed", seed]);
    let a = sampled("1");
    let b = sampled("1");
    let c = sampled("2");
    assert_eq!(a["completion"], b["completion"]);
    assert_eq!(
        a["tokens"], 8,
        "the random tiny model never says EOS in 8 tokens: {a}"
    );
    assert_ne!(
        a["completion"], c["completion"],
        "seeds 1 and 2 sampled the same text"
    );
    assert_eq!(a["prompt"], "The capital of France is");
    assert!(a["seconds"].as_f64().unwrap() >= 0.0);
    // Greedy ignores the seed.
    let g1 = generate(&[&m, "--seed", "1"]);
    let g2 = generate(&[&m, "--seed", "2"]);
    assert_eq!(g1["completion"], g2["completion"]);
}

#[test]
fn generate_reads_gguf_like_the_hf_directory_and_applies_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    crate::policy_model::write_tiny_gguf(&gguf);
    let hf = fixtures().join("tiny-llama-policy").display().to_string();
    let g = gguf.display().to_string();
    assert_eq!(
        generate(&[&hf, "--chat"])["completion"],
        generate(&[&g, "--chat"])["completion"]
    );
    // Text output is the completion alone.
    let o = bin()
        .args([
            "generate",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "8",
        ])
        .args(["--model", &hf])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).strip_suffix('\n').unwrap(),
        generate(&[&hf])["completion"].as_str().unwrap()
    );
}

#[test]
fn bad_algo_and_bad_models_give_clear_errors() {
    let ws = Workspace::new();
    let cfg = workspace_config(&ws, "");
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["train", "policy", "--algo", "sft"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("'sft'") && err.contains("dpo") && err.contains("ppo"),
        "{err}"
    );

    // No run has a reward model and the registry has no production one.
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["train", "policy", "--algo", "dpo"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("no reward model") && err.contains("hint:") && err.contains("--reward-model"),
        "{err}"
    );

    let o = bin()
        .args(["generate", "--model", "/nonexistent/model", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("/nonexistent/model") && err.contains("hint:"),
        "{err}"
    );

    let o = bin()
        .args(["generate", "--prompt", "x", "--top-p", "1.5", "--model"])
        .arg(fixtures().join("tiny-llama-policy"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("1.5"), "{}", stderr(&o));

    // Issue 18 §3: a zero count is a usage error (exit 2), named by clap.
    for args in [
        &["train", "policy", "--steps", "0"][..],
        &["train", "reward", "--batch-size", "0"][..],
        &["train", "reward", "--epochs", "0"][..],
    ] {
        let o = bin().arg("--config").arg(&cfg).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains('0'), "{}", stderr(&o));
    }
}

fn config_error(policy: &str) -> String {
    let text = format!("feedback:\n  source: file\n  path: f.jsonl\n{policy}");
    config::load_str(Path::new("rlhf.yaml"), &text)
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_policy_config_values_name_the_key_and_position() {
    let e = config_error("policy:\n  algo: sft\n");
    assert!(
        e.starts_with("rlhf.yaml:5:9: policy.algo: unknown variant `sft`"),
        "{e}"
    );
    let e = config_error("policy:\n  lr: -1\n");
    assert!(
        e.starts_with("rlhf.yaml:5:3: policy.lr: expected a number > 0, got -1"),
        "{e}"
    );
    let e = config_error("policy:\n  lora:\n    target_modules: [qq_proj]\n");
    assert!(
        e.starts_with("rlhf.yaml:6:5: policy.lora.target_modules:"),
        "{e}"
    );
    assert!(e.contains("qq_proj") && e.contains("hint:"), "{e}");
    let e = config_error("policy:\n  ppo:\n    gamma: 1.5\n");
    assert!(
        e.contains("policy.ppo.gamma: expected a number in (0, 1], got 1.5"),
        "{e}"
    );
    let e = config_error("policy:\n  ppo:\n    rollouts_per_step: 6\n    num_minibatches: 4\n");
    assert!(
        e.contains("policy.ppo.num_minibatches") && e.contains("hint:"),
        "{e}"
    );
    let e = config_error("policy:\n  device: tpu\n");
    assert!(e.contains("policy.device") && e.contains("\"tpu\""), "{e}");
    let e = config_error("policy:\n  gradient_checkpointing: true\n  lora:\n    dropout: 0.1\n");
    assert!(
        e.contains("policy.gradient_checkpointing") && e.contains("dropout is 0.1"),
        "{e}"
    );
    let e = config_error("policy:\n  precision: fp8\n");
    assert!(
        e.contains("policy.precision") && e.contains("\"fp8\"") && e.contains("hint:"),
        "{e}"
    );
    let e = config_error("policy:\n  stepz: 3\n");
    assert!(
        e.contains("unknown field `stepz`") && e.contains("hint:"),
        "{e}"
    );
    let e = config_error("policy:\n  lora: {enabled: false, merge: true}\n");
    assert!(e.contains("policy.lora.merge"), "{e}");
    let e = config_error("policy:\n  grpo:\n    num_generations: 1\n");
    assert!(
        e.starts_with("rlhf.yaml:6:5: policy.grpo.num_generations: expected an integer >= 2"),
        "{e}"
    );
    let e = config_error("policy:\n  grpo:\n    loss_type: gspo\n");
    assert!(
        e.contains("policy.grpo.loss_type") && e.contains("unknown variant `gspo`"),
        "{e}"
    );
    // GRPO's loss knobs and policy.reward: each bad value names its key (position-located),
    // and says what is expected.
    for (yaml, needles) in [
        // cispo caps the ratio itself at epsilon_high: the default 0.2 would freeze every update.
        (
            "  grpo:\n    loss_type: cispo\n",
            &["policy.grpo.epsilon_high", "got 0.2", "hint:"][..],
        ),
        (
            "  grpo:\n    top_entropy_quantile: 1.5\n",
            &["policy.grpo.top_entropy_quantile: expected a number in [0, 1]"],
        ),
        (
            "  grpo:\n    delta: 0.5\n",
            &["policy.grpo.delta: expected a number > 1"],
        ),
        (
            "  grpo:\n    sapo_temperature_neg: 0\n",
            &["policy.grpo.sapo_temperature_neg: expected a number > 0"],
        ),
        (
            "  reward:\n    rules:\n      format_regex: {pattern: '(x', reward: 1}\n",
            &[
                "rlhf.yaml:",
                "policy.reward.rules.format_regex.pattern: not a valid regular expression",
                "hint:",
            ],
        ),
        (
            "  reward:\n    rules:\n      length_penalty: {per_token: -0.1}\n",
            &["policy.reward.rules.length_penalty.per_token: expected a number >= 0"],
        ),
        (
            "  reward:\n    rules:\n      eos: -1\n",
            &["unknown field `eos`"],
        ),
        (
            "  reward:\n    step_weight: -0.5\n",
            &[
                "policy.reward.step_weight: expected a number >= 0",
                "got -0.5",
            ],
        ),
        (
            "  reward:\n    step_weight: .nan\n",
            &[
                "policy.reward.step_weight: expected a number >= 0",
                "got NaN",
            ],
        ),
    ] {
        let e = config_error(&format!("policy:\n{yaml}"));
        for needle in needles {
            assert!(e.contains(needle), "{needle} missing for {yaml:?}: {e}");
        }
    }
    let e = config_error("policy:\n  grpo:\n    scale_rewards: prompt\n");
    assert!(e.contains("unknown variant `prompt`"), "{e}");
}

#[test]
fn policy_config_maps_onto_the_trainer_options() {
    let text = format!(
        "feedback:\n  source: file\n  path: f.jsonl\n{POLICY_SECTION}  enabled: true\n  algo: kto\n  beta: 0.2\n  steps: 5\n"
    );
    let s = config::load_str(Path::new("rlhf.yaml"), &text).unwrap();
    let p = &s.policy;
    assert!(p.enabled && p.merge);
    let o = p.options_for(p.options.algo);
    assert_eq!(o.algo, rlhf_bot::run::outputs::PolicyAlgo::Kto);
    assert_eq!((o.beta, o.lr, o.max_steps), (0.2, 0.01, Some(5)));
    assert_eq!(
        (o.batch_size, o.max_prompt_len, o.max_completion_len),
        (2, 32, 8)
    );
    let lora = o.lora.unwrap();
    assert_eq!((lora.r, lora.alpha, lora.dropout), (4, 8.0, 0.0));
    assert_eq!(o.ppo.rollouts_per_step, 2);
    // Absent keys: TRL's defaults, by algorithm.
    let d = config::load_str(
        Path::new("rlhf.yaml"),
        "feedback:\n  source: file\n  path: f\n",
    )
    .unwrap()
    .policy;
    assert!(!d.enabled && d.model.is_none());
    let ppo = d.options_for(rlhf_bot::run::outputs::PolicyAlgo::Ppo);
    assert_eq!((ppo.lr, ppo.max_steps), (3e-6, Some(100)));
    let dpo = d.options_for(rlhf_bot::run::outputs::PolicyAlgo::Dpo);
    assert_eq!((dpo.lr, dpo.max_steps, dpo.beta), (1e-6, None, 0.1));
}

#[test]
fn sample_run_trains_registers_and_reports_a_policy() {
    let ws = Workspace::new();
    let text = ws.sample_config_text();
    assert!(
        text.contains("enabled: true"),
        "tiny.yaml enables the policy stage"
    );
    let cfg = ws.write_config(&text);
    let json = crate::common::forced_run_json(&cfg, "2026-11-27T12:00:00Z");
    let run = &json["run"];
    let policy_id = run["registered_policy"]
        .as_str()
        .expect("a policy candidate");
    assert!(policy_id.starts_with("policy-"), "{run}");
    let registry = std::fs::read_to_string(ws.store_dir().join("registry.yaml")).unwrap();
    assert!(
        registry.contains(policy_id) && registry.contains("algorithm: dpo"),
        "{registry}"
    );
    let report = std::fs::read_to_string(run["report"].as_str().unwrap()).unwrap();
    for needle in [
        "Policy win rate vs",
        "Mean reward",
        "KL to reference (nats)",
        "**Policy**",
    ] {
        assert!(
            report.contains(needle),
            "{needle} missing from the report:\n{report}"
        );
    }
    let n = run["policy_eval"]["n"].as_u64().unwrap();
    assert!(n >= 2, "{run}");
}

/// `run --force --algo grpo` on `cfg` through the binary; its JSON output.
fn forced_grpo_run(cfg: &Path) -> serde_json::Value {
    let o = bin()
        .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
        .arg("--config")
        .arg(cfg)
        .args(["--format", "json", "run", "--force", "--algo", "grpo"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// Issue 19: `run --algo grpo` on the sample config trains a GRPO policy; its metrics.json and
/// the report carry GRPO's metrics under TRL's names.
#[test]
fn sample_run_with_algo_grpo_reports_grpo_metrics() {
    let ws = Workspace::new();
    let cfg = ws.write_config(&ws.sample_config_text());
    let json = forced_grpo_run(&cfg);
    let run = &json["run"];
    let policy_id = run["registered_policy"]
        .as_str()
        .expect("a policy candidate");
    let registry = std::fs::read_to_string(ws.store_dir().join("registry.yaml")).unwrap();
    assert!(
        registry.contains(policy_id) && registry.contains("algorithm: grpo"),
        "{registry}"
    );
    let report_path = PathBuf::from(run["report"].as_str().unwrap());
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(report_path.with_file_name("metrics.json")).unwrap(),
    )
    .unwrap();
    let policy = &metrics["policy"]["metrics"];
    assert_eq!(policy["algo"], "grpo", "{metrics}");
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "clip_ratio/region_mean",
        "completions/mean_length",
    ] {
        let v = policy["last_step"][key].as_f64();
        assert!(v.is_some_and(f64::is_finite), "{key}: {policy}");
    }
    let report = std::fs::read_to_string(&report_path).unwrap();
    for needle in [
        "(GRPO)",
        "Policy objective at the last step",
        "`reward_std`",
        "`frac_reward_zero_std`",
        "Policy: reward (reward)",
    ] {
        assert!(
            report.contains(needle),
            "{needle} missing from the report:\n{report}"
        );
    }
}

/// Issue 19: a multi-objective reward on the sample config (its reward model has `accuracy` and
/// `helpfulness` heads): GRPO logs every component under TRL's `rewards/<name>/mean`, and
/// metrics.json and the report carry each component's mean before and after training.
#[test]
fn sample_run_with_a_weighted_reward_reports_every_component_before_and_after() {
    let ws = Workspace::new();
    let grpo_line = "  grpo: {prompts_per_step: 2, num_generations: 4}";
    let text = ws.sample_config_text();
    assert!(text.contains(grpo_line), "tiny.yaml changed");
    let text = text.replace(
        grpo_line,
        &format!(
            "{grpo_line}\n  reward:\n    weights: {{score: 1.0, accuracy: 0.5, helpfulness: 0.5}}\n    rules:\n      length_penalty: {{per_token: 0.01, over: 4}}\n      format_regex: {{pattern: '[.!?]', reward: 0.5}}\n      missing_eos: -1.0\n"
        ),
    );
    let cfg = ws.write_config(&text);
    let json = forced_grpo_run(&cfg);
    let report_path = PathBuf::from(json["run"]["report"].as_str().unwrap());
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(report_path.with_file_name("metrics.json")).unwrap(),
    )
    .unwrap();
    let policy = &metrics["policy"]["metrics"];
    let components = [
        ("reward_model", 1.0),
        ("accuracy", 0.5),
        ("helpfulness", 0.5),
        ("length_penalty", 1.0),
        ("format_regex", 1.0),
        ("missing_eos", 1.0),
    ];
    for (name, _) in components {
        let v = policy["last_step"][format!("rewards/{name}/mean")].as_f64();
        assert!(v.is_some_and(f64::is_finite), "{name}: {policy}");
    }
    let evals = policy["eval"]["reward_components"]
        .as_array()
        .expect("components");
    let names: Vec<&str> = evals.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, components.map(|c| c.0), "{policy}");
    for (c, (_, weight)) in evals.iter().zip(components) {
        assert_eq!(c["weight"].as_f64(), Some(weight), "{c}");
        for k in ["before", "after"] {
            assert!(c[k].as_f64().is_some_and(f64::is_finite), "{k}: {c}");
        }
    }
    // Rule values are bounded by their settings, whatever the answers were.
    let get = |name: &str, k: &str| {
        evals.iter().find(|c| c["name"] == name).unwrap()[k]
            .as_f64()
            .unwrap()
    };
    for k in ["before", "after"] {
        assert!((0.0..=0.5).contains(&get("format_regex", k)), "{policy}");
        assert!((-1.0..=0.0).contains(&get("missing_eos", k)), "{policy}");
        assert!(get("length_penalty", k) <= 0.0, "{policy}");
    }
    let report = std::fs::read_to_string(&report_path).unwrap();
    assert!(
        report.contains("Policy reward components (held-out prompts)"),
        "{report}"
    );
    for (name, _) in components {
        assert!(
            report.contains(&format!("| `{name}` |")),
            "{name}:\n{report}"
        );
        assert!(
            report.contains(&format!("`rewards/{name}/mean`")),
            "{name} per-step mean:\n{report}"
        );
    }
}
