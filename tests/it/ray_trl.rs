//! The `trl` entrypoint run for real: a Ray head (tests/it/ray_head.rs) whose jobs run the
//! scripts rlhf-bot builds for TRL's CLI — `trl reward` on the tiny Llama fixture, then `trl dpo`
//! with LoRA on the same fixture, a few steps each on CPU — with the data from moto S3 and the
//! checkpoints back to it through `aws s3 cp`; the run reads both back, evaluates, registers and
//! reports them as it does for our own binary's jobs.
//!
//! Opt-in: TRL needs torch (~6 GB), which CI does not install. `RLHF_TRL_PYTHON` names a Python
//! with `trl`, `accelerate`, `peft` and `awscli` installed; its `bin/` goes first on the job's
//! PATH, and the config's `runtime_env.pip: []` says the nodes have the trainers already, so Ray
//! installs nothing. Unset: the test says loudly that it skipped.

use std::path::{Path, PathBuf};

use rlhf_bot::registry::{ModelKind, Registry};

use super::common::{Workspace, repo, stderr};
use super::ray::run_command;
use super::ray_head::TOKEN;
use super::ray_policy::{
    assert_adapter_over_the_local_fixture, keys_under, our_binary_on_the_head,
};

/// The `bin/` of the Python that `RLHF_TRL_PYTHON` names (not resolved through its symlink: a
/// venv's `bin/` is where `trl`, `accelerate` and `aws` are), or `None` to skip.
fn trl_bin() -> Option<PathBuf> {
    let Some(python) = std::env::var_os("RLHF_TRL_PYTHON").filter(|p| !p.is_empty()) else {
        eprintln!(
            "\n*** ray_trl skipped: set RLHF_TRL_PYTHON=/path/to/venv/bin/python (a Python with trl==1.16.0, accelerate, peft and awscli) to run TRL's CLI on the Ray head ***\n"
        );
        return None;
    };
    let python = PathBuf::from(python);
    assert!(
        python.is_file(),
        "RLHF_TRL_PYTHON={} is not a file\nhint: the python of a venv holding trl, accelerate, peft and awscli",
        python.display()
    );
    Some(python.parent().unwrap().to_path_buf())
}

/// The Ray policy config of tests/it/ray_policy.rs with TRL as the entrypoint on CPU: the reward model from the tiny Llama
/// fixture (it has the tokenizer TRL needs), short sequences, two steps per job.
fn trl_config(ws: &Workspace, cfg: &Path, trl_bin: &Path) -> PathBuf {
    let text = std::fs::read_to_string(cfg).unwrap();
    let entrypoint = "    entrypoint: rlhf-bot\n";
    assert!(text.contains(entrypoint), "the Ray config moved: {text}");
    let fixture = repo().join("tests/fixtures/tiny-llama-policy");
    let trl = format!(
        "    entrypoint: trl\n    runtime_env:\n      pip: []\n      env_vars: {{PATH: \"{}:/usr/local/bin:/usr/bin:/bin\", HF_HUB_OFFLINE: \"1\", HF_DATASETS_OFFLINE: \"1\"}}\n    extra_args: [\"--max_steps\", \"2\"]\n",
        trl_bin.display()
    );
    ws.write_config(&format!(
        "{}\nreward:\n  model: {}\n  epochs: 1\n  max_length: 64\n  batch_size: 2\n  lr: 0.0001\n",
        text.replace(entrypoint, &trl),
        fixture.display()
    ))
}

#[test]
fn trl_jobs_train_the_reward_model_and_the_policy_and_the_run_registers_both() {
    let Some(trl_bin) = trl_bin() else {
        return;
    };
    let bucket = "ray-trl";
    let Some((head, moto, ws, cfg)) = our_binary_on_the_head(bucket) else {
        return;
    };
    let cfg = trl_config(&ws, &cfg, &trl_bin);
    let o = run_command(&cfg, moto, 9201, Some(TOKEN)).output().unwrap();
    let err = stderr(&o);
    let run_dir = ws.store_dir().join("runs/gh-9201");
    let job_log = |stage: &str| {
        std::fs::read_to_string(run_dir.join(format!("ray/{stage}.log"))).unwrap_or_default()
    };
    assert!(
        o.status.success(),
        "run failed: {err}\nreward job: {}\npolicy job: {}",
        job_log("reward"),
        job_log("policy")
    );
    assert!(!err.contains(TOKEN), "the token reached the log");
    assert_eq!(head.status("gh-9201"), "SUCCEEDED");
    assert_eq!(head.status("gh-9201-policy"), "SUCCEEDED");
    for stage in ["reward", "policy"] {
        assert!(
            job_log(stage).contains("Model saved to"),
            "TRL's {stage} job: {}",
            job_log(stage)
        );
    }

    // TRL's checkpoints came back without its resumable state, the manifest last.
    let reward_out = keys_under(moto, bucket, "models/ray/gh-9201/reward/output/");
    let policy_out = keys_under(moto, bucket, "models/ray/gh-9201/policy/output/");
    for (out, model) in [
        (&reward_out, "model.safetensors"),
        (&policy_out, "policy/adapter_model.safetensors"),
    ] {
        assert!(
            out.iter().any(|k| k == model)
                && out.iter().any(|k| k == "SHA256SUMS")
                && !out.iter().any(|k| k.contains("checkpoint-")),
            "{out:?}"
        );
    }

    // Evaluated here with our evaluation: the reward model on the held-out pairs, the policy on
    // the held-out prompts (TRL's adapter put in a local run's layout over this machine's base).
    let metrics = |stage: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(run_dir.join(format!("{stage}/metrics.json"))).unwrap(),
        )
        .unwrap()
    };
    let reward = metrics("reward");
    assert!(reward["eval"]["n"].as_u64().unwrap() > 0, "{reward}");
    let policy = metrics("policy");
    assert!(policy["eval"]["n"].as_u64().unwrap() > 0, "{policy}");
    assert_eq!(policy["algo"], "dpo");
    assert_adapter_over_the_local_fixture(&run_dir);

    // Registered with the TRL jobs in the lineage.
    let registry = Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    for (kind, id) in [
        (ModelKind::Reward, "gh-9201"),
        (ModelKind::Policy, "gh-9201-policy"),
    ] {
        let entry = registry
            .models
            .iter()
            .find(|m| m.kind == kind)
            .expect("registered");
        let job = entry.cluster_job.as_ref().expect("the job in the lineage");
        assert_eq!(
            (job.submission_id.as_str(), job.entrypoint.as_str()),
            (id, "trl")
        );
    }
}
