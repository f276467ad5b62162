//! The policy stage on a Ray cluster (`train.backend: ray`, docs/ray.md), from the run's side.
//! `app::policy` resolves the models, exports the data and builds the same request a local run
//! trains from; instead of training it, this module:
//!
//! 1. splits the export into `policy.train.jsonl` and `policy.eval.jsonl` by the held-out prompts
//!    a local run uses (so no trainer sees the evaluation prompts), adds our binary's config
//!    (the run's `policy:` section) for the `rlhf-bot` entrypoint, and uploads them to
//!    `<registry.artifacts>/ray/<run id>/policy/data/`;
//! 2. submits the job `<run id>-policy` through `ray_stage::run_stage_job` (a duplicate
//!    attaches), pointing it at the reward job's output prefix for the reward model (nothing is
//!    uploaded twice);
//! 3. reads the policy back into the run's `policy/` directory (an adapter normalised to a local
//!    run's `policy/adapter/` layout, its base named as the local base) and evaluates it here
//!    with `train_policy::evaluate_trained_policy`, the evaluation a local run ends with.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::app::model_dir::{has_weights, write_merged};
use crate::app::ray_stage::{self, StageJob};
use crate::app::train_policy::{
    PolicyRunSummary, TrainPolicyRequest, eval_prompt_split, evaluate_trained_policy,
};
use crate::config::Settings;
use crate::dataset::PolicyLine;
use crate::run::outputs::PolicyMetrics;
use crate::train::ray::policy_entrypoint::{
    POLICY_CONFIG_FILE, POLICY_EVAL_FILE, POLICY_TRAIN_FILE, PolicyJob, policy_entrypoint,
};
use crate::train::ray::{EntrypointKind, RaySettings};

/// The stage name: the data prefix, the log and record file names.
const STAGE: &str = "policy";

/// What the policy stage needs to hand its training to the cluster (`run` sets it).
#[derive(Debug, Clone)]
pub struct ClusterPolicy {
    pub ray: RaySettings,
    pub run_id: String,
    /// `policy.model` as the config names it (before a Hub model was fetched here): what the
    /// cluster loads; `None`: our binary's tiny default.
    pub base_model: Option<String>,
    /// The config file, whose `policy:` section our binary trains with on the cluster.
    pub config_path: PathBuf,
}

/// The policy job's submission id: the run id names the reward job.
pub fn submission_id(run_id: &str) -> String {
    format!("{run_id}-{STAGE}")
}

/// Trains `req` on the cluster into `req.out` and evaluates the result here.
pub async fn train_policy_on_ray(
    settings: &Settings,
    cluster: &ClusterPolicy,
    req: &TrainPolicyRequest,
) -> Result<PolicyRunSummary> {
    let ray = &cluster.ray;
    let run_dir = req
        .out
        .parent()
        .context("the policy directory has no parent (the run directory)")?
        .to_path_buf();
    let mut paths = ray_stage::job_paths(settings, &cluster.run_id, STAGE)?;
    paths.reward_model = Some(ray_stage::job_paths(settings, &cluster.run_id, "reward")?.output);
    let cache = settings.registry.artifacts_dir.clone();
    let opts = &req.options;
    let job = PolicyJob {
        algo: opts.algo,
        base_model: cluster_model_name(cluster.base_model.as_deref(), ray.entrypoint),
        steps: opts.max_steps,
        epochs: opts.epochs,
        lr: opts.lr,
        beta: match opts.algo {
            crate::run::outputs::PolicyAlgo::Dpo | crate::run::outputs::PolicyAlgo::Kto => {
                opts.beta
            }
            crate::run::outputs::PolicyAlgo::Ppo => opts.ppo.kl_coef,
            algo => opts.grpo.beta_for(algo),
        },
        label_smoothing: opts.label_smoothing,
        batch_size: opts.batch_size,
        max_prompt_len: opts.max_prompt_len,
        max_completion_len: opts.max_completion_len,
        num_generations: opts.grpo.num_generations,
        lora: opts.lora.as_ref().map(|l| (l.r, l.alpha)),
    };
    if job.base_model.is_none() && ray.entrypoint != EntrypointKind::RlhfBot {
        anyhow::bail!(
            "policy.model is not set, and the `{}` entrypoint needs a policy to start from\nhint: set policy.model to a model the cluster can load (hf://ORG/NAME, or a path on its nodes)",
            ray.entrypoint.as_str()
        );
    }
    // Refused before anything is uploaded (`run --algo` can ask for what the config did not).
    let entrypoint = policy_entrypoint(ray, &paths, &job).map_err(|why| {
        anyhow::anyhow!(
            "train.ray.entrypoint `{}` cannot train {}: {why}",
            ray.entrypoint.as_str(),
            job.algo.as_str()
        )
    })?;

    let stage_job = StageJob {
        stage: STAGE,
        run_id: &cluster.run_id,
        submission_id: submission_id(&cluster.run_id),
        run_dir: &run_dir,
    };
    ray_stage::run_stage_job(ray, &stage_job, || async {
        let data_dir = run_dir.join("ray").join("policy-data");
        write_job_data(req, cluster, &data_dir)?;
        ray_stage::upload_dir(&data_dir, &paths.data, &cache).await?;
        Ok(entrypoint)
    })
    .await?;

    ray_stage::fetch_output(&paths.output, &req.out, &run_dir, &cache, STAGE)?;
    // The job's own numbers (our binary writes them), read before ours replace them.
    let job_metrics = crate::run::outputs::read_metrics::<PolicyMetrics>(&req.out).ok();
    let (candidate, lora) = candidate_dir(req)?;
    let req = req.clone();
    tokio::task::spawn_blocking(move || {
        evaluate_trained_policy(&req, &candidate, lora, job_metrics)
    })
    .await
    .context("the evaluation thread panicked")?
}

/// How the cluster names the base policy. Our binary reads `hf://` itself; OpenRLHF and TRL
/// take the Hub's `ORG/NAME` (at the repository's default revision: neither has a revision
/// flag, so a pinned one is only warned about).
fn cluster_model_name(model: Option<&str>, kind: EntrypointKind) -> Option<String> {
    let model = model?;
    if kind == EntrypointKind::RlhfBot {
        return Some(model.to_string());
    }
    match crate::hub::model_ref::HubModelRef::from_value(model) {
        Some(Ok(hub)) => {
            if hub.revision != crate::hub::model_ref::DEFAULT_REVISION {
                tracing::warn!(
                    model = %hub.repo,
                    revision = %hub.revision,
                    "the cluster's trainer loads the Hub model at its default revision, not the pinned one"
                );
            }
            Some(hub.repo)
        }
        _ => Some(model.to_string()),
    }
}

/// The files the job reads: the export split by the held-out prompts, and for our binary the
/// config it trains with.
fn write_job_data(req: &TrainPolicyRequest, cluster: &ClusterPolicy, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = std::fs::read_to_string(&req.data)
        .with_context(|| format!("reading {}", req.data.display()))?;
    let mut rows = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: PolicyLine = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a policy example", req.data.display(), n + 1))?;
        rows.push((row, line));
    }
    let lines: Vec<PolicyLine> = rows.iter().map(|(r, _)| r.clone()).collect();
    let held = eval_prompt_split(&lines, req.options.eval_prompts, &req.data)?;
    let (mut train, mut eval) = (String::new(), String::new());
    for (row, line) in &rows {
        let into = if held.contains(&row.prompt) {
            &mut eval
        } else {
            &mut train
        };
        into.push_str(line);
        into.push('\n');
    }
    std::fs::write(dir.join(POLICY_TRAIN_FILE), train)?;
    std::fs::write(dir.join(POLICY_EVAL_FILE), eval)?;
    if cluster.ray.entrypoint == EntrypointKind::RlhfBot {
        let config = job_config(&cluster.config_path, &req.options)?;
        std::fs::write(dir.join(POLICY_CONFIG_FILE), config)?;
    }
    Ok(())
}

/// Keys of `policy:` that name things on this machine or are given to the job as flags.
const LOCAL_POLICY_KEYS: &[&str] = &["enabled", "model", "production_model", "device", "algo"];

/// Our binary's config on the cluster: no feedback source to read (it trains from the data
/// given), and the run's `policy:` section without the keys that name this machine's files, so
/// the job trains with the hyper-parameters a local run would. What the stage resolved here
/// (DPO's label smoothing from the rater audit) replaces the file's value, and `eval_prompts`
/// is 1 (see below).
fn job_config(
    config_path: &Path,
    options: &crate::app::train_policy::PolicyTrainOptions,
) -> Result<String> {
    use serde_norway::{Mapping, Value};
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let file: Value = serde_norway::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let mut policy = match file.get("policy") {
        Some(Value::Mapping(m)) => m.clone(),
        _ => Mapping::new(),
    };
    for key in LOCAL_POLICY_KEYS {
        policy.remove(*key);
    }
    if options.algo == crate::run::outputs::PolicyAlgo::Dpo {
        policy.insert("label_smoothing".into(), options.label_smoothing.into());
    }
    // `train policy` holds prompts out of its data for its own evaluation, which the stage
    // replaces with ours: the data is already without the evaluation prompts, so the job keeps
    // out the least it can (one) and trains on nearly what a local run trains on.
    policy.insert("eval_prompts".into(), 1.into());
    let mut feedback = Mapping::new();
    feedback.insert("source".into(), "file".into());
    feedback.insert("path".into(), "/dev/null".into());
    let mut config = Mapping::new();
    config.insert("feedback".into(), Value::Mapping(feedback));
    config.insert("policy".into(), Value::Mapping(policy));
    Ok(serde_norway::to_string(&Value::Mapping(config))?)
}

/// The downloaded policy as full weights to evaluate, and whether it is a LoRA adapter. An
/// adapter is moved into a local run's layout (`policy/adapter/`, whichever trainer wrote it),
/// its base renamed to this machine's copy of the base model, and folded into that base beside
/// the output (`policy-candidate/`, not registered).
fn candidate_dir(req: &TrainPolicyRequest) -> Result<(PathBuf, bool)> {
    let policy_dir = req.out.join("policy");
    if has_weights(&policy_dir) {
        return Ok((policy_dir, false));
    }
    let adapter = policy_dir.join("adapter");
    if policy_dir.join("adapter_config.json").is_file() && !adapter.exists() {
        let moved = req.out.join("adapter-moving");
        std::fs::rename(&policy_dir, &moved)?;
        std::fs::create_dir_all(&policy_dir)?;
        std::fs::rename(&moved, &adapter)?;
    }
    let config_path = adapter.join("adapter_config.json");
    if !config_path.is_file() {
        anyhow::bail!(
            "the policy job's output {} holds neither weights (model.safetensors) nor a LoRA adapter (adapter_config.json)\nhint: the trainer saved elsewhere; check the job's log in {}",
            policy_dir.display(),
            req.out.with_file_name("ray").join("policy.log").display()
        );
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)
            .with_context(|| format!("parsing {}", config_path.display()))?;
    config["base_model_name_or_path"] = req.base_model.display().to_string().into();
    crate::atomic_file::write_atomically(
        &config_path,
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let merged = req.out.with_file_name("policy-candidate");
    if merged.exists() {
        std::fs::remove_dir_all(&merged)?;
    }
    write_merged(&req.base_model, &adapter, &merged)?;
    Ok((merged, true))
}
