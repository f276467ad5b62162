//! `train.backend: ray` against a real Ray head (tests/it/ray_head.rs) and a real S3 server
//! (moto): a real job — our own binary as the entrypoint, training the reward model from the
//! dataset the run exported to the bucket and writing the checkpoint back — and the faults:
//! a failing job, a wrong or missing token, an unreachable head, a cancelled run, a duplicate
//! submission.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rlhf_bot::artifacts::ArtifactStore;
use rlhf_bot::registry::{ModelKind, Registry};
use rlhf_bot::train::ray::client::JobRequest;
use rlhf_bot::train::ray::{JobsClient, SubmitOutcome};

use super::common::{Workspace, bin, free_port, stderr};
use super::moto::{Moto, moto};
use super::ray_head::{RayHead, TOKEN, ray_head};

pub(crate) const TOKEN_ENV: &str = "RAY_TEST_TOKEN";

/// Both servers, or `None` (skipped, said loudly by the helpers).
pub(crate) fn servers() -> Option<(&'static RayHead, &'static Moto)> {
    let head = ray_head()?;
    let moto = moto()?;
    Some((head, moto))
}

/// The sample config, reward model only, its artifacts in `bucket`, training on the head at
/// `address` with `ray_extra` added to `train.ray`.
pub(crate) fn config(
    ws: &Workspace,
    moto: &Moto,
    bucket: &str,
    address: &str,
    ray_extra: &str,
) -> PathBuf {
    moto.create_bucket(bucket);
    let local_root = format!("artifacts: {}/artifacts", ws.store_dir().display());
    let policy_on = "enabled: true                         # run trains";
    let text = ws.sample_config_text();
    assert!(
        text.contains(&local_root) && text.contains(policy_on),
        "the sample config moved: {text}"
    );
    let text = text
        .replace(&local_root, &format!("artifacts: s3://{bucket}/models"))
        .replace(
            policy_on,
            "enabled: false                        # run trains",
        );
    ws.write_config(&format!(
        "{text}\ntrain:\n  backend: ray\n  ray:\n    address: {address}\n    entrypoint: rlhf-bot\n    forward_env: [AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION]\n    poll_first_secs: 0.5\n    poll_max_secs: 2\n    num_cpus: 0\n{ray_extra}"
    ))
}

/// `rlhf-bot run --force` as the workflow runs it, with run id `gh-<run>`.
pub(crate) fn run_command(config: &Path, moto: &Moto, run: u32, token: Option<&str>) -> Command {
    let mut cmd = bin();
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    cmd.env_remove(TOKEN_ENV);
    if let Some(token) = token {
        cmd.env(TOKEN_ENV, token);
    }
    cmd.env("GITHUB_RUN_ID", run.to_string())
        .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
        .arg("--config")
        .arg(config)
        .args(["--format", "json", "run", "--force"]);
    cmd
}

/// `run_command` run to its end, which must be a success whose log never shows the token; the
/// run's stderr.
pub(crate) fn run_succeeds(config: &Path, moto: &Moto, run: u32, head: &RayHead) -> String {
    let o = run_command(config, moto, run, Some(TOKEN))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(
        o.status.success(),
        "run failed: {err}\nhead log: {}",
        head.log.display()
    );
    assert!(!err.contains(TOKEN), "the token reached the log");
    err
}

/// A stand-in for our binary on the cluster: a script that prints and then does `tail`.
fn fake_trainer(ws: &Workspace, tail: &str) -> PathBuf {
    executable_script(
        ws,
        "fake-trainer.sh",
        &format!("echo \"fake trainer: $*\"\necho 'loading 12 pairs'\n{tail}"),
    )
}

/// `body` as an executable POSIX shell script named `name` in the workspace.
pub(crate) fn executable_script(ws: &Workspace, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = ws.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_real_ray_job_trains_the_reward_model_and_the_run_registers_and_reports_it() {
    let Some((head, moto)) = servers() else {
        return;
    };
    let ws = Workspace::new();
    let bucket = "ray-real";
    let cfg = config(
        &ws,
        moto,
        bucket,
        &head.address(),
        &format!(
            "    token_env: {TOKEN_ENV}\n    rlhf_bot_command: {}\n",
            env!("CARGO_BIN_EXE_rlhf-bot")
        ),
    );
    let err = run_succeeds(&cfg, moto, 9001, head);
    assert_eq!(head.status("gh-9001"), "SUCCEEDED");

    // The dataset went up in TRL's format, the checkpoint came back with its manifest.
    let keys = moto.keys(bucket, "models/ray/gh-9001/reward/");
    for key in [
        "models/ray/gh-9001/reward/data/SHA256SUMS",
        "models/ray/gh-9001/reward/data/preference.train.jsonl",
        "models/ray/gh-9001/reward/data/preference.eval.jsonl",
        "models/ray/gh-9001/reward/output/SHA256SUMS",
        "models/ray/gh-9001/reward/output/model.safetensors",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    let first = String::from_utf8(
        moto.get(
            bucket,
            "models/ray/gh-9001/reward/data/preference.train.jsonl",
        )
        .unwrap(),
    )
    .unwrap();
    let pair: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(
        pair["chosen"].is_array() && pair["rejected"].is_array(),
        "{pair}"
    );

    // The job's log was streamed into the run, line by line.
    let run_dir = ws.store_dir().join("runs/gh-9001");
    let job_log = std::fs::read_to_string(run_dir.join("ray/reward.log")).unwrap();
    assert!(job_log.contains("training the reward model"), "{job_log}");
    assert!(
        err.lines()
            .any(|l| l.contains("ray job: ") && l.contains("training the reward model")),
        "the job's lines are not in the run's log: {err}"
    );

    // Evaluated here, registered like a local run, with the job in the lineage.
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("reward/metrics.json")).unwrap(),
    )
    .unwrap();
    assert!(metrics["eval"]["n"].as_u64().unwrap() > 0, "{metrics}");
    assert!(
        metrics["train"]["steps"].as_u64().unwrap() > 0,
        "the job's own numbers: {metrics}"
    );
    let registry = Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    let reward = registry
        .models
        .iter()
        .find(|m| m.kind == ModelKind::Reward)
        .expect("a reward model registered");
    let job = reward
        .cluster_job
        .as_ref()
        .expect("the cluster job in the lineage");
    assert_eq!(
        (
            job.backend.as_str(),
            job.submission_id.as_str(),
            job.entrypoint.as_str()
        ),
        ("ray", "gh-9001", "rlhf-bot")
    );
    assert_eq!(job.address, head.address());
    assert_eq!(
        reward.metrics["eval_accuracy"],
        metrics["eval"]["accuracy"].as_f64().unwrap()
    );
    let url = url::Url::parse(&format!("s3://{bucket}/models")).unwrap();
    let options = moto.env().map(|(k, v)| (k.to_ascii_lowercase(), v));
    let artifacts =
        rlhf_bot::artifacts::BucketStore::with_options(&url, options, ws.path().join("c")).unwrap();
    artifacts.verify(&reward.artifact).unwrap();
    let report = std::fs::read_to_string(ws.path().join("reports/gh-9001/report.md")).unwrap();
    assert!(
        report.contains("trained by the cluster") && report.contains("`gh-9001`"),
        "{report}"
    );
}

pub(crate) fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "the run succeeded: {}", stderr(o));
    stderr(o)
}

#[test]
fn a_failed_job_is_reported_with_its_last_log_lines() {
    let Some((head, moto)) = servers() else {
        return;
    };
    let ws = Workspace::new();
    let script = fake_trainer(&ws, "echo 'RuntimeError: CUDA out of memory' >&2\nexit 3");
    let cfg = config(
        &ws,
        moto,
        "ray-fail",
        &head.address(),
        &format!(
            "    token_env: {TOKEN_ENV}\n    rlhf_bot_command: {}\n",
            script.display()
        ),
    );
    let o = run_command(&cfg, moto, 9002, Some(TOKEN)).output().unwrap();
    assert_job_failed(
        &o,
        &ws,
        head,
        "gh-9002",
        &["RuntimeError: CUDA out of memory", "loading 12 pairs"],
    );
}

/// The run `o` failed on job `id`: its error names the job, says it ended FAILED, quotes `lines`
/// of its log and has a hint; the head agrees, and nothing was registered. Returns the error.
pub(crate) fn assert_job_failed(
    o: &Output,
    ws: &Workspace,
    head: &RayHead,
    id: &str,
    lines: &[&str],
) -> String {
    let err = failed(o);
    let job = format!("Ray job `{id}`");
    assert!(
        [job.as_str(), "ended FAILED", "hint:"]
            .iter()
            .chain(lines)
            .all(|needle| err.contains(needle)),
        "{err}"
    );
    assert_eq!(head.status(id), "FAILED");
    assert!(
        !ws.store_dir().join("registry.yaml").exists(),
        "nothing registered"
    );
    err
}

#[test]
fn a_wrong_or_missing_token_is_explained() {
    let Some((head, moto)) = servers() else {
        return;
    };
    let ws = Workspace::new();
    let cfg = config(
        &ws,
        moto,
        "ray-token",
        &head.address(),
        &format!("    token_env: {TOKEN_ENV}\n    max_attempts: 2\n"),
    );
    let err = failed(
        &run_command(&cfg, moto, 9003, Some("not-the-token"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("HTTP 403")
            && err.contains("the token was refused")
            && err.contains(TOKEN_ENV)
            && err.contains("ray get-auth-token"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-token"),
        "the token was printed: {err}"
    );

    // No token configured at all: Ray's 401, and where to put one.
    let ws = Workspace::new();
    let cfg = config(
        &ws,
        moto,
        "ray-token2",
        &head.address(),
        "    max_attempts: 2\n",
    );
    let err = failed(&run_command(&cfg, moto, 9004, None).output().unwrap());
    assert!(
        err.contains("HTTP 401") && err.contains("train.ray.token_env"),
        "{err}"
    );
    // Neither submitted anything.
    let ids: Vec<String> = head
        .jobs()
        .iter()
        .filter_map(|j| j["submission_id"].as_str().map(str::to_string))
        .collect();
    assert!(
        !ids.iter().any(|i| i == "gh-9003" || i == "gh-9004"),
        "{ids:?}"
    );
}

#[test]
fn an_unreachable_head_is_named_with_what_to_check() {
    // No Ray needed: nothing listens on the port.
    let Some(moto) = moto() else { return };
    let ws = Workspace::new();
    let address = format!("http://127.0.0.1:{}", free_port());
    let cfg = config(&ws, moto, "ray-unreach", &address, "    max_attempts: 2\n");
    let started = Instant::now();
    let err = failed(&run_command(&cfg, moto, 9005, None).output().unwrap());
    assert!(
        err.contains(&format!("cannot reach the Ray head at {address}"))
            && err.contains("could not connect")
            && err.contains("train.ray.address"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_cancelled_run_stops_its_job() {
    let Some((head, moto)) = servers() else {
        return;
    };
    let ws = Workspace::new();
    let script = fake_trainer(&ws, "sleep 300");
    let cfg = config(
        &ws,
        moto,
        "ray-cancel",
        &head.address(),
        &format!(
            "    token_env: {TOKEN_ENV}\n    rlhf_bot_command: {}\n",
            script.display()
        ),
    );
    let mut cmd = run_command(&cfg, moto, 9006, Some(TOKEN));
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while head.status("gh-9006") != "RUNNING" {
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(300));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let err = failed(&child.wait_with_output().unwrap());
    assert!(
        err.contains("terminated (SIGTERM)")
            && err.contains("Ray job `gh-9006`")
            && err.contains("asked to stop")
            && err.contains("STOPPED"),
        "{err}"
    );
    assert_eq!(head.status("gh-9006"), "STOPPED");
}

#[tokio::test]
async fn a_duplicate_submission_attaches_instead_of_starting_a_second_job() {
    let Some(head) = ray_head() else { return };
    let client = JobsClient::new(
        &head.address().parse().unwrap(),
        Some(rlhf_bot::secret::SecretString::new(TOKEN)),
        Some(TOKEN_ENV.into()),
        Duration::from_secs(30),
        rlhf_bot::retry::Backoff {
            max_attempts: 2,
            first_wait: Duration::from_millis(100),
        },
    )
    .unwrap();
    let job = |entrypoint: &str| JobRequest {
        entrypoint: entrypoint.into(),
        submission_id: "dup-1".into(),
        runtime_env: serde_json::json!({}),
        metadata: [("rlhf_bot_run".to_string(), "dup-1".to_string())].into(),
        entrypoint_num_cpus: 0.0,
        entrypoint_num_gpus: 0.0,
    };
    assert_eq!(
        client.submit(&job("echo first")).await.unwrap(),
        SubmitOutcome::Created
    );
    assert_eq!(
        client.submit(&job("echo second")).await.unwrap(),
        SubmitOutcome::AlreadyExists
    );
    let info = client.status("dup-1").await.unwrap();
    assert_eq!(
        info.entrypoint.as_deref(),
        Some("echo first"),
        "the first job is the one kept"
    );
    let jobs = tokio::task::spawn_blocking(move || ray_head().unwrap().jobs())
        .await
        .unwrap();
    let same: Vec<_> = jobs
        .iter()
        .filter(|j| j["submission_id"] == "dup-1")
        .collect();
    assert_eq!(same.len(), 1, "{jobs:?}");
    assert!(client.find("no-such-job").await.unwrap().is_none());
}

#[test]
fn the_ray_config_is_checked_with_the_key_and_a_hint() {
    let load = |train: &str, artifacts: &str| {
        rlhf_bot::config::load_str(
            Path::new("rlhf.yaml"),
            &format!(
                "feedback:\n  source: file\n  path: f\nregistry:\n  artifacts: {artifacts}\npolicy:\n  enabled: false\ntrain:\n{train}"
            ),
        )
    };
    let ok = load(
        "  backend: ray\n  ray:\n    address: http://head:8265\n    token_env: RAY_AUTH_TOKEN\n    entrypoint: openrlhf\n    runtime_env:\n      pip: [openrlhf==0.10.1, awscli==1.42.70]\n      env_vars: {NCCL_DEBUG: WARN}\n    num_gpus: 1\n    gpus_per_node: 8\n",
        "s3://team/models",
    )
    .unwrap();
    match &ok.train {
        rlhf_bot::train::ray::TrainBackend::Ray(ray) => {
            assert_eq!(ray.address.as_str(), "http://head:8265/");
            assert_eq!(ray.pip, ["openrlhf==0.10.1", "awscli==1.42.70"]);
            assert_eq!((ray.num_gpus, ray.gpus_per_node), (1.0, 8));
            assert_eq!(ray.token_env.as_deref(), Some("RAY_AUTH_TOKEN"));
        }
        other => panic!("{other:?}"),
    }
    // An explicit empty list: the nodes' image has the trainers, the job installs nothing.
    let preinstalled = load(
        "  backend: ray\n  ray:\n    address: http://head:8265\n    entrypoint: trl\n    runtime_env: {pip: []}\n",
        "s3://team/models",
    )
    .unwrap();
    match &preinstalled.train {
        rlhf_bot::train::ray::TrainBackend::Ray(ray) => assert!(ray.pip.is_empty()),
        other => panic!("{other:?}"),
    }
    let bad = "s3://team/models";
    let on_head =
        |rest: &str| format!("  backend: ray\n  ray:\n    address: http://h:8265\n    {rest}");
    for (train, artifacts, needles) in [
        (
            "  backend: cloud\n".to_string(),
            bad,
            &["train.backend", "`local` (default) or `ray`"][..],
        ),
        (
            "  backend: ray\n".to_string(),
            bad,
            &["train.ray", "hint:"][..],
        ),
        (
            "  backend: ray\n  ray:\n    entrypoint: trl\n".to_string(),
            bad,
            &["train.ray.address", "8265"][..],
        ),
        (
            on_head("entrypoint: deepspeed\n"),
            bad,
            &["train.ray.entrypoint", "openrlhf, trl, rlhf-bot"][..],
        ),
        (
            on_head("entrypoint: trl\n"),
            bad,
            &["train.ray.runtime_env.pip", "trl==", "`pip: []`"][..],
        ),
        (
            on_head("entrypoint: trl\n    runtime_env: {pip: [trl]}\n"),
            bad,
            &["\"trl\" is not pinned", "NAME==VERSION"][..],
        ),
        (
            on_head("entrypoint: rlhf-bot\n    token_env: ghp_abcdefghijklmnopqrstuvwxyz123456\n"),
            bad,
            &["train.ray.token_env", "not shown"][..],
        ),
        (
            on_head("entrypoint: rlhf-bot\n    token_env: RAY_T\n    forward_env: [RAY_T]\n"),
            bad,
            &["train.ray.forward_env", "token"][..],
        ),
        (
            on_head("entrypoint: rlhf-bot\n"),
            "models/dir",
            &["registry.artifacts", "bucket"][..],
        ),
    ] {
        let text = format!("{:#}", load(&train, artifacts).unwrap_err());
        assert!(needles.iter().all(|n| text.contains(n)), "{train}: {text}");
        assert!(!text.contains("ghp_abc"), "the token was echoed: {text}");
    }
    // The policy stage runs on the cluster; the combinations no trainer offers are refused at
    // load, naming the algorithm, the entrypoint and what to do.
    let with_policy = |algo: &str, ray: &str| {
        rlhf_bot::config::load_str(
            Path::new("rlhf.yaml"),
            &format!(
                "feedback:\n  source: file\n  path: f\nregistry:\n  artifacts: s3://t/m\npolicy:\n  enabled: true\n  algo: {algo}\ntrain:\n  backend: ray\n  ray:\n    address: http://h:8265\n{ray}"
            ),
        )
    };
    for algo in ["dpo", "kto", "ppo", "grpo", "rloo"] {
        with_policy(algo, "    entrypoint: rlhf-bot\n").unwrap();
    }
    let trl = "    entrypoint: trl\n    runtime_env:\n      pip: [trl==1.16.0, awscli==1.42.70]\n";
    with_policy("grpo", trl).unwrap();
    let text = format!("{:#}", with_policy("ppo", trl).unwrap_err());
    assert!(
        ["policy.algo", "ppo", "trl", "no PPO command", "hint:"]
            .iter()
            .all(|n| text.contains(n)),
        "{text}"
    );
    let openrlhf = |version: &str| {
        format!(
            "    entrypoint: openrlhf\n    runtime_env:\n      pip: [openrlhf=={version}, awscli==1.42.70]\n"
        )
    };
    with_policy("kto", &openrlhf("0.9.5")).unwrap();
    with_policy("ppo", &openrlhf("0.10.1")).unwrap();
    let text = format!("{:#}", with_policy("kto", &openrlhf("0.10.1")).unwrap_err());
    assert!(
        ["policy.algo", "OpenRLHF 0.10.1", "train_kto", "hint:"]
            .iter()
            .all(|n| text.contains(n)),
        "{text}"
    );
}

#[test]
fn a_retried_run_attaches_to_the_job_its_killed_first_attempt_left_running() {
    let Some((head, moto)) = servers() else {
        return;
    };
    let ws = Workspace::new();
    let bucket = "ray-retry";
    let cfg = config(
        &ws,
        moto,
        bucket,
        &head.address(),
        &format!(
            "    token_env: {TOKEN_ENV}\n    rlhf_bot_command: {}\n",
            env!("CARGO_BIN_EXE_rlhf-bot")
        ),
    );
    // The first attempt submits, then its runner dies (SIGKILL: no stop request is sent).
    let mut first = run_command(&cfg, moto, 9007, Some(TOKEN));
    kill_once_submitted(&mut first, head, "gh-9007", Duration::from_secs(120));
    let uploaded = moto.keys(bucket, "models/ray/gh-9007/reward/data/");

    // The re-run (same workflow run id) follows that job to its end instead of starting one.
    let err = rerun_attaches(&mut first, head, "gh-9007");
    assert!(err.contains("exists already: attaching"), "{err}");
    assert!(!err.contains("submitted the reward training"), "{err}");
    assert_eq!(head.status("gh-9007"), "SUCCEEDED");
    // The data was not exported again, and the model came back and was registered.
    assert_eq!(
        moto.keys(bucket, "models/ray/gh-9007/reward/data/"),
        uploaded
    );
    let registry = Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    let reward = registry
        .models
        .iter()
        .find(|m| m.kind == ModelKind::Reward)
        .expect("a reward model registered");
    assert_eq!(
        reward
            .cluster_job
            .as_ref()
            .map(|j| j.submission_id.as_str()),
        Some("gh-9007")
    );
}

/// Starts `run` (a first attempt) and SIGKILLs it (no stop request is sent) as soon as the
/// head holds job `id`; fails when that takes longer than `limit` or the run ends first.
pub(crate) fn kill_once_submitted(run: &mut Command, head: &RayHead, id: &str, limit: Duration) {
    let mut first = run
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while head.status(id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first attempt never submitted {id}"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first attempt ended before submitting {id}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    first.kill().unwrap();
    first.wait().unwrap();
}

/// Runs `run` again (the retry), which must succeed with the head still holding one job `id`;
/// returns its log.
pub(crate) fn rerun_attaches(run: &mut Command, head: &RayHead, id: &str) -> String {
    let o = run
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "the retry failed: {err}");
    let same: Vec<_> = head
        .jobs()
        .into_iter()
        .filter(|j| j["submission_id"] == id)
        .collect();
    assert_eq!(same.len(), 1, "{same:?}");
    err
}

#[test]
fn bucket_put_and_get_move_a_directory_with_its_manifest_and_check_it() {
    let Some(moto) = moto() else { return };
    let ws = Workspace::new();
    let bucket = "ray-bucket-cmd";
    moto.create_bucket(bucket);
    let uri = format!("s3://{bucket}/exchange/run-1/data");
    let bucket_cmd = |args: &[&str]| {
        let mut cmd = bin();
        for (k, v) in moto.env() {
            cmd.env(k, v);
        }
        cmd.arg("bucket").args(args).output().unwrap()
    };
    let src = ws.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.jsonl"), "one\n").unwrap();
    std::fs::write(src.join("sub/b.bin"), [0u8, 1, 2]).unwrap();
    let o = bucket_cmd(&["put", src.to_str().unwrap(), &uri]);
    assert!(o.status.success(), "{}", stderr(&o));
    let keys = moto.keys(bucket, "exchange/run-1/data/");
    assert_eq!(
        keys,
        [
            "exchange/run-1/data/SHA256SUMS",
            "exchange/run-1/data/a.jsonl",
            "exchange/run-1/data/sub/b.bin"
        ]
    );
    // A changed directory replaces the copy (a retried run's new dataset).
    std::fs::write(src.join("a.jsonl"), "one\ntwo\n").unwrap();
    let o = bucket_cmd(&["put", src.to_str().unwrap(), &uri]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dest = ws.path().join("dest");
    let o = bucket_cmd(&["get", &uri, dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(dest.join("a.jsonl")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(std::fs::read(dest.join("sub/b.bin")).unwrap(), [0u8, 1, 2]);
    // An existing destination is refused; a corrupted object fails the check and leaves nothing.
    let o = bucket_cmd(&["get", &uri, dest.to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains("already exists"),
        "{}",
        stderr(&o)
    );
    let (status, _) = moto.request(
        "PUT",
        &format!("/{bucket}/exchange/run-1/data/a.jsonl"),
        b"evil\n",
    );
    assert_eq!(status, 200);
    let dest2 = ws.path().join("dest2");
    let o = bucket_cmd(&["get", &uri, dest2.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("checksum mismatch") && err.contains("a.jsonl"),
        "{err}"
    );
    assert!(!dest2.exists(), "half a download was left behind");
    // A prefix whose writer has not finished (no manifest) is not data.
    let o = bucket_cmd(&[
        "get",
        &format!("s3://{bucket}/exchange/nothing"),
        dest2.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("missing `SHA256SUMS`"),
        "{err}"
    );
}
