//! The policy stage on a real Ray head (tests/it/ray_head.rs) with a real S3 server (moto):
//! after the reward job, `rlhf-bot run` hands the policy to the cluster as job
//! `<run id>-policy` — our own binary as the entrypoint, DPO with LoRA on the tiny Llama fixture
//! for two steps, reading the split export and the reward job's model from the bucket and
//! writing the adapter back — then evaluates, registers and reports it; and the faults: a failing
//! policy job, a retried run that attaches to the policy job its killed first attempt left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rlhf_bot::registry::{ModelKind, Registry};

use super::common::{Workspace, repo};
use super::moto::Moto;
use super::ray::{
    TOKEN_ENV, assert_job_failed, config, executable_script, kill_once_submitted, rerun_attaches,
    run_command, run_succeeds, servers,
};
use super::ray_head::{RayHead, TOKEN};

/// The Ray config of the reward tests with the policy stage on: DPO, LoRA (merged), two steps,
/// from the tiny Llama fixture; `command` is what the cluster runs as our binary.
pub(crate) fn policy_config(
    ws: &Workspace,
    moto: &Moto,
    bucket: &str,
    address: &str,
    command: &Path,
) -> PathBuf {
    let cfg = config(
        ws,
        moto,
        bucket,
        address,
        &format!(
            "    token_env: {TOKEN_ENV}\n    rlhf_bot_command: {}\n",
            command.display()
        ),
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    let off = "enabled: false                        # run trains";
    let steps = "steps: 8 ";
    assert!(
        text.contains(off) && text.contains(steps) && text.contains("  algo: dpo"),
        "the sample config moved: {text}"
    );
    let fixture = repo().join("tests/fixtures/tiny-llama-policy");
    ws.write_config(
        &text
            .replace(off, "enabled: true # run trains")
            .replace(
                "  algo: dpo",
                &format!("  model: {}\n  algo: dpo", fixture.display()),
            )
            .replace(steps, "steps: 2 "),
    )
}

/// The servers, a workspace and [`policy_config`] with our own binary as the entrypoint, its
/// artifacts in `bucket`; `None` when the servers are skipped.
pub(crate) fn our_binary_on_the_head(
    bucket: &str,
) -> Option<(&'static RayHead, &'static Moto, Workspace, PathBuf)> {
    let (head, moto) = servers()?;
    let ws = Workspace::new();
    let cfg = policy_config(
        &ws,
        moto,
        bucket,
        &head.address(),
        Path::new(env!("CARGO_BIN_EXE_rlhf-bot")),
    );
    Some((head, moto, ws, cfg))
}

pub(crate) fn keys_under(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    moto.keys(bucket, prefix)
        .into_iter()
        .map(|k| k[prefix.len()..].to_string())
        .collect()
}

fn prompts(jsonl: &[u8]) -> Vec<String> {
    String::from_utf8(jsonl.to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn a_real_ray_job_trains_the_policy_and_the_run_registers_and_reports_it() {
    let Some((head, moto, ws, cfg)) = our_binary_on_the_head("ray-policy") else {
        return;
    };
    let bucket = "ray-policy";
    run_succeeds(&cfg, moto, 9101, head);
    assert_eq!(head.status("gh-9101"), "SUCCEEDED");
    assert_eq!(head.status("gh-9101-policy"), "SUCCEEDED");

    // The export went up split by the held-out prompts, with our binary's config; the reward
    // model was read from the reward job's output, not uploaded again.
    assert_eq!(
        keys_under(moto, bucket, "models/ray/gh-9101/policy/data/"),
        [
            "SHA256SUMS",
            "job.yaml",
            "policy.eval.jsonl",
            "policy.train.jsonl"
        ]
    );
    let data = |name: &str| {
        moto.get(bucket, &format!("models/ray/gh-9101/policy/data/{name}"))
            .unwrap()
    };
    let (train, eval) = (
        prompts(&data("policy.train.jsonl")),
        prompts(&data("policy.eval.jsonl")),
    );
    assert!(!train.is_empty() && !eval.is_empty());
    assert!(
        train.iter().all(|p| !eval.contains(p)),
        "an evaluation prompt was trained on"
    );
    let job_yaml = String::from_utf8(data("job.yaml")).unwrap();
    assert!(
        job_yaml.contains("policy:")
            && job_yaml.contains("steps: 2")
            && job_yaml.contains("r: 8")
            && job_yaml.contains("eval_prompts: 1"),
        "{job_yaml}"
    );
    assert!(
        !job_yaml.contains("tiny-llama-policy") && !job_yaml.contains("enabled"),
        "{job_yaml}"
    );
    let output = keys_under(moto, bucket, "models/ray/gh-9101/policy/output/");
    assert!(
        output
            .iter()
            .any(|k| k == "policy/adapter/adapter_model.safetensors")
            && output.iter().any(|k| k == "SHA256SUMS")
            && !output.iter().any(|k| k.starts_with("checkpoints/")),
        "{output:?}"
    );

    // The job's log was streamed into the run; the adapter came back in a local run's layout,
    // over this machine's base, and was merged as `lora.merge` asks.
    let run_dir = ws.store_dir().join("runs/gh-9101");
    let job_log = std::fs::read_to_string(run_dir.join("ray/policy.log")).unwrap();
    assert!(job_log.contains("training the policy"), "{job_log}");
    assert_adapter_over_the_local_fixture(&run_dir);
    assert!(run_dir.join("policy/merged/model.safetensors").is_file());

    // Evaluated here (held-out prompts), the job's own training numbers kept.
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("policy/metrics.json")).unwrap(),
    )
    .unwrap();
    let held_out: std::collections::BTreeSet<&String> = eval.iter().collect();
    assert_eq!(
        metrics["eval"]["n"].as_u64().unwrap(),
        held_out.len() as u64,
        "{metrics}"
    );
    assert_eq!(metrics["train"]["steps"].as_u64(), Some(2), "{metrics}");
    assert_eq!(metrics["algo"], "dpo");

    // Registered with its own cluster job beside the reward model's, and reported.
    let registry = Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    let job_of = |kind: ModelKind| {
        let entry = registry
            .models
            .iter()
            .find(|m| m.kind == kind)
            .expect("registered");
        let job = entry
            .cluster_job
            .clone()
            .expect("the cluster job in the lineage");
        (entry.clone(), job)
    };
    let (policy, policy_job) = job_of(ModelKind::Policy);
    let (_, reward_job) = job_of(ModelKind::Reward);
    assert_eq!(
        (
            policy_job.backend.as_str(),
            policy_job.submission_id.as_str(),
            policy_job.entrypoint.as_str()
        ),
        ("ray", "gh-9101-policy", "rlhf-bot")
    );
    assert_eq!(reward_job.submission_id, "gh-9101");
    assert_eq!(policy.algorithm, "dpo");
    let report = std::fs::read_to_string(ws.path().join("reports/gh-9101/report.md")).unwrap();
    assert!(
        report.contains("`gh-9101-policy`") && report.contains("`gh-9101`"),
        "{report}"
    );
}

/// The adapter a policy job wrote is in a local run's layout under `run_dir`, over this
/// machine's copy of the tiny Llama fixture.
pub(crate) fn assert_adapter_over_the_local_fixture(run_dir: &Path) {
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("policy/policy/adapter/adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        adapter["base_model_name_or_path"].as_str().unwrap(),
        repo()
            .join("tests/fixtures/tiny-llama-policy")
            .display()
            .to_string()
    );
}

/// Our binary, except that `train policy` prints and fails: the reward job succeeds, the policy
/// job fails.
fn failing_policy_trainer(ws: &Workspace) -> PathBuf {
    executable_script(
        ws,
        "policy-fails.sh",
        &format!(
            "case \"$*\" in *'train policy'*)\n  echo 'loading 6 preference pairs'\n  echo 'ValueError: policy diverged at step 1' >&2\n  exit 3;;\nesac\nexec {} \"$@\"",
            env!("CARGO_BIN_EXE_rlhf-bot")
        ),
    )
}

#[test]
fn a_failed_policy_job_is_reported_with_its_last_log_lines() {
    let Some((head, moto)) = servers() else {
        return;
    };
    let ws = Workspace::new();
    let script = failing_policy_trainer(&ws);
    let cfg = policy_config(&ws, moto, "ray-policy-fail", &head.address(), &script);
    let o = run_command(&cfg, moto, 9102, Some(TOKEN)).output().unwrap();
    let err = assert_job_failed(
        &o,
        &ws,
        head,
        "gh-9102-policy",
        &[
            "ValueError: policy diverged at step 1",
            "loading 6 preference pairs",
        ],
    );
    assert!(
        err.contains("stage train policy") && err.contains("ray/policy.log"),
        "{err}"
    );
    // The reward job before it succeeded.
    assert_eq!(head.status("gh-9102"), "SUCCEEDED");
}

#[test]
fn a_retried_run_attaches_to_the_policy_job_its_killed_first_attempt_left_running() {
    let Some((head, moto, ws, cfg)) = our_binary_on_the_head("ray-policy-retry") else {
        return;
    };
    let bucket = "ray-policy-retry";
    // The first attempt gets as far as submitting the policy job, then its runner dies
    // (SIGKILL: no stop request is sent).
    let mut run = run_command(&cfg, moto, 9103, Some(TOKEN));
    kill_once_submitted(&mut run, head, "gh-9103-policy", Duration::from_secs(600));
    let uploaded = moto.keys(bucket, "models/ray/gh-9103/policy/data/");

    let err = rerun_attaches(&mut run, head, "gh-9103-policy");
    assert!(!err.contains("submitted the policy training"), "{err}");
    assert_eq!(err.matches("exists already: attaching").count(), 2, "{err}");
    assert_eq!(head.status("gh-9103-policy"), "SUCCEEDED");
    assert_eq!(
        moto.keys(bucket, "models/ray/gh-9103/policy/data/"),
        uploaded,
        "the data was exported again"
    );
    let registry = Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    let policy = registry
        .models
        .iter()
        .find(|m| m.kind == ModelKind::Policy)
        .expect("a policy registered");
    assert_eq!(
        policy
            .cluster_job
            .as_ref()
            .map(|j| j.submission_id.as_str()),
        Some("gh-9103-policy")
    );
}
