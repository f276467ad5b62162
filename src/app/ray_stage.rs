//! A training stage on a Ray cluster (`train.backend: ray`, docs/ray.md), from the run's side.
//! Each stage (the reward model here, the policy in `app::ray_policy`) goes through
//! [`run_stage_job`], the one submit-or-attach and follow path:
//!
//! 1. the stage exports its data and uploads it to `<registry.artifacts>/ray/<run id>/<stage>/data/`
//!    (the reward stage: the store's preference pairs in TRL's format);
//! 2. the job is submitted with its submission id (the reward job: the run id; the policy job:
//!    `<run id>-policy`) — or attached to when that id already names one (a rerun of the
//!    workflow), without exporting again;
//! 3. it is followed: status with backoff, new log lines into `<run>/ray/<stage>.log` and the
//!    log; SIGTERM or ctrl-c asks the cluster to stop the job, then ends the run with an error;
//! 4. the checkpoint is read back from `…/<stage>/output/` (checked against its `SHA256SUMS`)
//!    into the run's `<stage>/` directory ([`fetch_output`]), and evaluated here with our own
//!    evaluation, so gates, registry and report treat it exactly like a local run;
//! 5. the job is recorded (`<run>/ray/<stage>.json`) for the registry's lineage and the report.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::artifacts::{ArtifactLocation, BucketStore};
use crate::config::Settings;
use crate::registry::ClusterJob;
use crate::retry::Backoff;
use crate::run::outputs::{self, DatasetInfo, RewardMetrics, TrainStats};
use crate::secret::SecretString;
use crate::train::ray::client::JobRequest;
use crate::train::ray::entrypoint::{
    EVAL_FILE, JobPaths, RewardJob, TRAIN_FILE, reward_entrypoint,
};
use crate::train::ray::follow::{self, JobDidNotSucceed, PollPace};
use crate::train::ray::{JobStatus, JobsClient, RaySettings, SubmitOutcome};
use crate::train::reward_run::{RewardRunSummary, RewardTrainOptions, TextData};

/// The file beside a run's model directories that records the cluster job of `stage`.
pub fn job_record(run_dir: &Path, stage: &str) -> PathBuf {
    run_dir.join("ray").join(format!("{stage}.json"))
}

/// The cluster job recorded for `stage` of the run in `run_dir`, if it trained on one.
pub fn recorded_job(run_dir: &Path, stage: &str) -> Result<Option<ClusterJob>> {
    let path = job_record(run_dir, stage);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The client for the configured head, with the token from its variable.
pub fn client(ray: &RaySettings) -> Result<JobsClient> {
    let token = ray
        .token_env
        .as_deref()
        .map(|var| SecretString::from_env(var, "Ray cluster"))
        .transpose()?;
    let backoff = Backoff {
        max_attempts: ray.max_attempts,
        first_wait: ray.poll_first,
    };
    Ok(JobsClient::new(
        &ray.address,
        token,
        ray.token_env.clone(),
        ray.request_timeout,
        backoff,
    )?)
}

/// Where the data and result of `stage`'s job live in the artifact store.
pub fn job_paths(settings: &Settings, run_id: &str, stage: &str) -> Result<JobPaths> {
    let ArtifactLocation::Bucket(url) = &settings.registry.artifacts else {
        bail!("train.backend: ray needs `registry.artifacts` to be a bucket (docs/ray.md)");
    };
    let base = format!(
        "{}/ray/{run_id}/{stage}",
        url.as_str().trim_end_matches('/')
    );
    Ok(JobPaths {
        data: format!("{base}/data"),
        output: format!("{base}/output"),
        reward_model: None,
    })
}

pub fn bucket(uri: &str, cache: &Path) -> Result<BucketStore> {
    let url = url::Url::parse(uri).with_context(|| format!("{uri} is not a URL"))?;
    Ok(BucketStore::from_url(&url, cache)?)
}

/// The job's runtime environment: the pinned packages and the variables (literal, then the
/// forwarded ones, whose values are read here and never logged).
pub fn runtime_env(ray: &RaySettings) -> Result<serde_json::Value> {
    let mut env_vars = ray.env_vars.clone();
    for name in &ray.forward_env {
        let value = std::env::var(name).with_context(|| {
            format!("train.ray.forward_env names {name}, which is not set here\nhint: set it, or remove it from forward_env")
        })?;
        env_vars.insert(name.clone(), value);
    }
    let mut env = serde_json::Map::new();
    if !ray.pip.is_empty() {
        env.insert("pip".into(), serde_json::json!(ray.pip));
    }
    if !env_vars.is_empty() {
        env.insert("env_vars".into(), serde_json::json!(env_vars));
    }
    Ok(serde_json::Value::Object(env))
}

/// Resolves when the workflow is cancelled: ctrl-c, or SIGTERM (what a runner sends).
async fn cancelled() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted (ctrl-c)",
                _ = term.recv() => "terminated (SIGTERM)",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "interrupted (ctrl-c)"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupted (ctrl-c)"
    }
}

/// Asks the cluster to stop the job and waits (a little) until it says STOPPED.
async fn stop_job(client: &JobsClient, id: &str, why: &str) -> anyhow::Error {
    tracing::warn!(job = id, "{why}: asking the Ray cluster to stop the job");
    if let Err(e) = client.stop(id).await {
        return anyhow::anyhow!(
            "{why} while Ray job `{id}` ran, and the stop request failed: {e}\nhint: stop it by hand: `ray job stop {id} --address {}`",
            client.address()
        );
    }
    // A runner gives a cancelled step seconds, not minutes: look for ~10 s, then report what
    // the head says (the stop request itself has been accepted either way).
    let mut status = None;
    for _ in 0..20 {
        match client.status(id).await {
            Ok(info) if info.status.is_terminal() => {
                status = Some(info.status);
                break;
            }
            Ok(info) => status = Some(info.status),
            Err(_) => break,
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let status = status.map_or("unknown".to_string(), |s| s.to_string());
    anyhow::anyhow!(
        "{why}: Ray job `{id}` on {} was asked to stop (its status is now {status}); nothing was registered\nhint: a rerun with the same run id attaches to this stopped job; start a new run to train again",
        client.address()
    )
}

/// One stage's job on the cluster, as the stage names it.
pub struct StageJob<'a> {
    /// `reward` or `policy`: the job's metadata, its log and record file names.
    pub stage: &'a str,
    pub run_id: &'a str,
    /// Unique on the cluster: what a rerun attaches by.
    pub submission_id: String,
    pub run_dir: &'a Path,
}

/// Submits `job` — `prepare` uploads the stage's data and returns the entrypoint, and runs only
/// when no job with that submission id exists yet — or attaches to the one that does; records
/// it for the lineage, follows it to its end, and fails unless it succeeded.
pub async fn run_stage_job<F, Fut>(ray: &RaySettings, job: &StageJob<'_>, prepare: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let (stage, id, run_dir) = (job.stage, job.submission_id.as_str(), job.run_dir);
    let client = client(ray)?;
    let existing = client.find(id).await?;
    match &existing {
        Some(info) => tracing::info!(
            job = id,
            status = %info.status,
            "a Ray job for this stage of the run exists already: attaching to it"
        ),
        None => {
            let request = JobRequest {
                entrypoint: prepare().await?,
                submission_id: id.to_string(),
                runtime_env: runtime_env(ray)?,
                metadata: [
                    ("rlhf_bot_run".to_string(), job.run_id.to_string()),
                    ("rlhf_bot_stage".to_string(), stage.to_string()),
                    (
                        "rlhf_bot_version".to_string(),
                        env!("CARGO_PKG_VERSION").to_string(),
                    ),
                ]
                .into(),
                entrypoint_num_cpus: ray.num_cpus,
                entrypoint_num_gpus: ray.num_gpus,
            };
            match client.submit(&request).await? {
                SubmitOutcome::Created => tracing::info!(
                    job = id,
                    address = client.address(),
                    entrypoint = ray.entrypoint.as_str(),
                    "submitted the {stage} training to the Ray cluster"
                ),
                SubmitOutcome::AlreadyExists => tracing::info!(
                    job = id,
                    "the Ray cluster already had a job with this id: attaching to it"
                ),
            }
        }
    }
    let record = ClusterJob {
        backend: "ray".into(),
        address: client.address().to_string(),
        submission_id: id.to_string(),
        entrypoint: ray.entrypoint.as_str().into(),
    };
    let record_path = job_record(run_dir, stage);
    std::fs::create_dir_all(record_path.parent().unwrap_or(run_dir))?;
    crate::atomic_file::write_atomically(
        &record_path,
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;

    let log_path = job_log(run_dir, stage);
    let mut log_file = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let pace = PollPace {
        first: ray.poll_first,
        max: ray.poll_max,
    };
    let followed = tokio::select! {
        r = follow::until_done(&client, id, pace, |lines| {
            let _ = log_file.write_all(lines.as_bytes());
            for line in lines.lines() {
                tracing::info!("ray job: {}", crate::sanitize::terminal_line(line));
            }
        }) => r?,
        why = cancelled() => return Err(stop_job(&client, id, why).await),
    };
    let (info, log) = followed;
    if info.status != JobStatus::Succeeded {
        return Err(JobDidNotSucceed::new(
            client.address(),
            &info,
            &log,
            &log_path.display().to_string(),
        )
        .into());
    }
    Ok(())
}

/// Where the log of `stage`'s job is kept in the run directory.
fn job_log(run_dir: &Path, stage: &str) -> PathBuf {
    run_dir.join("ray").join(format!("{stage}.log"))
}

/// Trains the reward model of run `run_id` on the cluster into `out` (`<run>/reward/`), and
/// evaluates it here. `opts` is what a local run would train with.
pub async fn train_reward_on_ray(
    settings: &Settings,
    ray: &RaySettings,
    run_id: &str,
    out: PathBuf,
    opts: RewardTrainOptions,
) -> Result<RewardRunSummary> {
    let run_dir = out
        .parent()
        .context("the reward directory has no parent (the run directory)")?
        .to_path_buf();
    let paths = job_paths(settings, run_id, "reward")?;
    let cache = settings.registry.artifacts_dir.clone();

    // The dataset, built as a local run builds it: the evaluation below needs its split even
    // when we only attach.
    let store_dir = settings.store.dir.clone();
    let dataset_options = settings.dataset.clone();
    let ds = tokio::task::spawn_blocking(move || {
        let store = crate::feedback::Store::open(&store_dir)?;
        crate::dataset::build_from_store(&store, &dataset_options)
    })
    .await
    .context("the dataset thread panicked")??;
    let (train, eval) = crate::train::reward_run::reward_split(&ds)?;

    let job = StageJob {
        stage: "reward",
        run_id,
        submission_id: run_id.to_string(),
        run_dir: &run_dir,
    };
    run_stage_job(ray, &job, || async {
        let job = RewardJob {
            base_model: opts.model.as_ref().map(|m| m.display().to_string()),
            epochs: opts.train.epochs,
            max_length: opts.train.max_length,
            batch_size: opts.train.batch_size,
            lr: opts.train.lr,
        };
        if job.base_model.is_none() && ray.entrypoint != crate::train::ray::EntrypointKind::RlhfBot
        {
            bail!(
                "reward.model is not set, and the `{}` entrypoint needs a model to start from\nhint: set reward.model to a model the cluster can load (a Hub name or a path on its nodes)",
                ray.entrypoint.as_str()
            );
        }
        upload_dataset(&ds, &run_dir, &paths.data, &cache).await?;
        Ok(reward_entrypoint(ray, &paths, &job))
    })
    .await?;

    fetch_output(&paths.output, &out, &run_dir, &cache, "reward")?;
    evaluate(&out, &opts, &ds, &train, &eval).await
}

/// Exports the pairs in TRL's preference format and uploads them (train and eval only: the job
/// needs nothing else, and a TRL job reads every JSON file in the directory).
async fn upload_dataset(
    ds: &crate::dataset::Dataset,
    run_dir: &Path,
    data_uri: &str,
    cache: &Path,
) -> Result<()> {
    let export_dir = run_dir.join("ray").join("export");
    let data_dir = run_dir.join("ray").join("data");
    for dir in [&export_dir, &data_dir] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
    }
    crate::dataset::export::export(ds, &export_dir)?;
    std::fs::create_dir_all(&data_dir)?;
    for name in [TRAIN_FILE, EVAL_FILE] {
        std::fs::copy(export_dir.join(name), data_dir.join(name))
            .with_context(|| format!("copying the exported {name}"))?;
    }
    std::fs::remove_dir_all(&export_dir)?;
    upload_dir(&data_dir, data_uri, cache).await
}

/// Uploads a stage's data directory to `data_uri` (the manifest last).
pub async fn upload_dir(dir: &Path, data_uri: &str, cache: &Path) -> Result<()> {
    let store = bucket(data_uri, cache)?;
    let data = dir.to_path_buf();
    let stored = tokio::task::spawn_blocking(move || store.put_dir(&data))
        .await
        .context("the upload thread panicked")??;
    tracing::info!(uri = %stored.uri, bytes = stored.size_bytes, "uploaded the data for the Ray job");
    Ok(())
}

/// Downloads the output of `stage`'s job into the run's model directory `out`.
pub fn fetch_output(
    output_uri: &str,
    out: &Path,
    run_dir: &Path,
    cache: &Path,
    stage: &str,
) -> Result<()> {
    let staging = run_dir.join("ray").join(format!("{stage}-output"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let store = bucket(output_uri, cache)?;
    store.get_dir(&staging).with_context(|| {
        format!("reading the trained model back from {output_uri}\nhint: the job reported success but its output is missing or incomplete; its log is in {}", job_log(run_dir, stage).display())
    })?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    // The registry writes its own manifest when it stores the model.
    std::fs::remove_file(staging.join(crate::artifacts::MANIFEST))?;
    std::fs::rename(&staging, out)
        .with_context(|| format!("moving the trained model into {}", out.display()))?;
    if !out.join(outputs::LOG_FILE).exists() {
        // OpenRLHF and TRL jobs write no per-step log of ours; an empty one keeps the contract.
        outputs::LogWriter::create(out)?;
    }
    Ok(())
}

/// Scores the downloaded model on the run's evaluation split, and the production model on the
/// same split, as a local run does; writes `metrics.json`.
async fn evaluate(
    out: &Path,
    opts: &RewardTrainOptions,
    ds: &crate::dataset::Dataset,
    train: &TextData,
    eval: &TextData,
) -> Result<RewardRunSummary> {
    // The job's own numbers say how training went; the evaluation is ours.
    let job_train = outputs::read_metrics::<RewardMetrics>(out)
        .map(|m| m.train)
        .unwrap_or_else(|_| TrainStats::default());
    let mut dataset = DatasetInfo {
        counts: crate::train::reward_run::example_counts(train, eval),
        examples_sha256: String::new(),
    };
    crate::train::reward_run::record_dataset_lineage(&mut dataset, ds);
    let (out_dir, opts, eval) = (out.to_path_buf(), opts.clone(), eval.clone());
    tokio::task::spawn_blocking(move || {
        let device = opts.device.resolve()?.device;
        let scored =
            crate::train::reward_run::evaluate_reward_model(&out_dir, &eval, &opts, &device)
                .with_context(|| {
                    format!(
                        "evaluating the model the cluster trained ({})",
                        out_dir.display()
                    )
                })?;
        let production_eval = match &opts.production_model {
            Some(prod) => Some(
                crate::train::reward_run::evaluate_reward_model(prod, &eval, &opts, &device)
                    .with_context(|| format!("scoring production model {}", prod.display()))?,
            ),
            None => None,
        };
        let metrics = RewardMetrics {
            eval: scored,
            train: job_train,
            dataset,
            production_eval,
        };
        outputs::write_metrics(&out_dir, &metrics)?;
        Ok(RewardRunSummary {
            backbone: crate::train::reward_run::model_type(&out_dir)?,
            out: out_dir.clone(),
            model_dir: Some(out_dir),
            metrics,
            stopped_early: false,
            completed: true,
        })
    })
    .await
    .context("the evaluation thread panicked")?
}
