//! The stages after training: register what a run produced (artifact store + registry
//! candidate), render its report, and publish the pull request (locally or on GitHub).
//!
//! A run lives in `<store.dir>/runs/<run-id>/`, with one sub-directory per trained model
//! (`reward/`, `policy/`) in the run-outputs format (`metrics.json`, `log.jsonl`, the weights).
//! Each stage reads what the previous one left there, so `report` and `publish` can be rerun on
//! their own after a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use serde::Serialize;

use crate::config::Settings;
use crate::config::raw::PublishMode;
use crate::feedback::Store;
use crate::feedback::record::format_time;
use crate::forge::github::{GithubTarget, SecretToken};
use crate::forge::local::publish_local;
use crate::forge::publish::{PublishAction, PublishRequest, closed_bot_pulls, publish};
use crate::kpi::all_kpis;
use crate::proposals::{Proposal, ProposalState, Proposals};
use crate::registry::{
    FeedbackSnapshot, ModelEntry, ModelKind, ModelStatus, Registry, created_by_from_env,
};
use crate::report::{self, KpiRow, PolicySection, RenderOptions, ReportContext, RewardSection};
use crate::run::outputs::{Baseline, DatasetInfo, PolicyRunOutput, RewardRunOutput};
use crate::run::run_dir;

/// What `register` added to the registry.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub reward: Option<ModelEntry>,
    pub policy: Option<ModelEntry>,
    pub registry: PathBuf,
}

/// The registry's record of the feedback a model trained on; with AI feedback on, the last
/// `rlaif` run's counts join the example counts (`ai_feedback_*`).
fn snapshot(settings: &Settings, store: &Store, dataset: &DatasetInfo) -> Result<FeedbackSnapshot> {
    let mut snapshot = dataset.snapshot(store.watermark()?.map(format_time).unwrap_or_default());
    if let Some(ai) = ai_feedback_summary(settings)? {
        for (name, count) in ai.lineage_counts() {
            snapshot.counts.insert(name.to_string(), count);
        }
    }
    Ok(snapshot)
}

/// The last `rlhf-bot rlaif` run's decision and counts, when AI feedback is on.
fn ai_feedback_summary(
    settings: &Settings,
) -> Result<Option<crate::rlaif::pairs::AiFeedbackSummary>> {
    if !settings.rlaif.enabled {
        return Ok(None);
    }
    Ok(crate::rlaif::pairs::read_current(&settings.store.dir)?.map(|f| f.summary))
}

/// Stores each trained model of the run in the artifact store and adds it to the registry as a
/// candidate (production stays where it is until the PR is merged / `promote` runs).
/// `policy_data` is the JSONL file the policy trained on; its digest and line count are the
/// policy's lineage.
pub fn register(
    settings: &Settings,
    run_id: &str,
    base_models: (&str, &str),
    policy_data: Option<&Path>,
) -> Result<Registered> {
    let dir = run_dir(&settings.store.dir, run_id);
    let mut registry = Registry::load_or_default(&settings.registry.path)?;
    let artifacts = settings.registry.open_artifacts()?;
    let store = Store::open(&settings.store.dir)?;
    let created_by = created_by_from_env(|k| std::env::var(k).ok());
    let mut add = |kind: ModelKind,
                   sub: &str,
                   base: &str,
                   algorithm: String,
                   metrics: BTreeMap<String, f64>,
                   dataset: &DatasetInfo|
     -> Result<ModelEntry> {
        let id = format!("{}-{run_id}", kind.as_str());
        let artifact = artifacts.put(kind, &id, &dir.join(sub))?;
        // A Hub base model is named `hf://ORG/NAME@REVISION` with its commit pinned.
        let (base, base_model_commit) = crate::app::model_source::lineage(base);
        let entry = ModelEntry {
            id: id.clone(),
            kind,
            created_at: Utc::now(),
            created_by: created_by.clone(),
            // Committed with the PR: a local path is shown as `<models>/…` or repo-relative.
            base_model: local_paths(settings).display(&base),
            base_model_commit,
            parent: registry.production(kind).map(|p| p.id.clone()),
            algorithm,
            config_sha256: settings.config_sha256.clone(),
            feedback: snapshot(settings, &store, dataset)?,
            artifact,
            metrics,
            status: ModelStatus::Candidate,
            aliases: Vec::new(),
            cluster_job: crate::app::ray_stage::recorded_job(&dir, sub)?,
        };
        registry
            .add_candidate(entry.clone())
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        Ok(registry.get(&id).cloned().unwrap_or(entry))
    };
    let reward = match RewardRunOutput::load(&dir.join("reward")) {
        Ok(out) => {
            let metrics = out.metrics.registry_metrics();
            Some(add(
                ModelKind::Reward,
                "reward",
                base_models.0,
                "reward".into(),
                metrics,
                &out.metrics.dataset,
            )?)
        }
        Err(crate::run::outputs::RunOutputError::Missing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let policy = match PolicyRunOutput::load(&dir.join("policy")) {
        Ok(out) => {
            let algo = out.metrics.algo.as_str().to_string();
            let dataset = match policy_data {
                Some(file) => DatasetInfo::of_jsonl(file)?,
                None => DatasetInfo::default(),
            };
            let metrics = out.metrics.registry_metrics();
            Some(add(
                ModelKind::Policy,
                "policy",
                base_models.1,
                algo,
                metrics,
                &dataset,
            )?)
        }
        Err(crate::run::outputs::RunOutputError::Missing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if reward.is_none() && policy.is_none() {
        bail!(
            "run {run_id} has no trained model in {}\nhint: train first (`rlhf-bot train reward`)",
            dir.display()
        );
    }
    if let Some(parent) = settings.registry.path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    registry.save(&settings.registry.path)?;
    Ok(Registered {
        reward,
        policy,
        registry: settings.registry.path.clone(),
    })
}

fn kpi_rows(store: &Store, confidence: f64) -> Result<Vec<KpiRow>> {
    let convert = |i: crate::stats::Interval| report::Interval {
        estimate: i.estimate,
        low: i.low,
        high: i.high,
    };
    Ok(all_kpis(&store.version_counts(None, None)?, confidence)
        .into_iter()
        .map(|k| KpiRow {
            model_version: k.model_version,
            count: k.count,
            positive_rate: k.positive_rate.map(convert),
            mean_rating: k.mean_rating.map(convert),
        })
        .collect())
}

/// Renders the run's report into `<report.dir>/<run-id>/` and returns (dir, PR body, draft).
pub fn build_report(
    settings: &Settings,
    run_id: &str,
    config_path: &Path,
) -> Result<(PathBuf, String, bool)> {
    let dir = run_dir(&settings.store.dir, run_id);
    let registry = Registry::load_or_default(&settings.registry.path)?;
    let store = Store::open(&settings.store.dir)?;
    let candidate = |kind: ModelKind| {
        registry
            .get(&format!("{}-{run_id}", kind.as_str()))
            .cloned()
    };
    let reward_baseline = Baseline::read(&dir.join("reward"))?;
    let policy_baseline = Baseline::read(&dir.join("policy"))?;
    let reward = match (
        candidate(ModelKind::Reward),
        RewardRunOutput::load(&dir.join("reward")),
    ) {
        (Some(entry), Ok(out)) => Some(RewardSection {
            candidate: entry,
            production: compared_production(&registry, ModelKind::Reward, &reward_baseline),
            baseline: reward_baseline,
            metrics: out.metrics,
            log: out.log,
        }),
        _ => None,
    };
    let policy = match (
        candidate(ModelKind::Policy),
        PolicyRunOutput::load(&dir.join("policy")),
    ) {
        (Some(entry), Ok(out)) => Some(PolicySection {
            candidate: entry,
            production: compared_production(&registry, ModelKind::Policy, &policy_baseline),
            baseline: policy_baseline,
            metrics: out.metrics,
            log: out.log,
        }),
        _ => None,
    };
    if reward.is_none() && policy.is_none() {
        bail!(
            "run {run_id} has no registered model\nhint: `rlhf-bot run` registers what it trains; see `rlhf-bot store stats`"
        );
    }
    let last = store.last_training()?;
    let new_feedback = store.kinds_since(last.and_then(|l| l.watermark))?;
    let integrity = if settings.audit.enabled {
        let mut found =
            crate::dataset::audit::integrity(&store, &settings.dataset, &settings.audit)?;
        // Say "applied" only when a DPO policy trained with it in this run.
        let dpo = policy
            .as_ref()
            .is_some_and(|p| p.metrics.algo == crate::run::outputs::PolicyAlgo::Dpo);
        if !dpo {
            found.applied_label_smoothing = None;
        }
        Some(found)
    } else {
        None
    };
    let ctx = ReportContext {
        run_id: run_id.to_string(),
        generated_at: Utc::now(),
        repository: settings
            .publish
            .github
            .as_ref()
            .map(|g| format!("{}/{}", g.owner, g.repo)),
        run_url: created_by_from_env(|k| std::env::var(k).ok()),
        report_url: None,
        new_feedback,
        reward,
        policy,
        kpis: kpi_rows(&store, settings.thresholds.quality.confidence)?,
        gates: settings.gates.clone(),
        reproduce: format!("rlhf-bot --config {} run --force", config_path.display()),
        max_samples: settings.report.max_samples,
        integrity,
        evals: crate::evals::EvalResults::read(&dir.join("policy"))?,
        constitution: crate::constitution::pairs::diff_last_runs(
            &settings.store.dir,
            settings.report.max_samples,
        )?,
        ai_feedback: ai_feedback_summary(settings)?,
        deployed: crate::app::deploy::live_blocking(settings)
            .into_iter()
            .map(|(kind, live)| report::Deployment {
                kind: kind.to_string(),
                id: live.id,
                deployed_at: live.deployed_at,
                notified: live
                    .status
                    .map(|s| s == crate::deploy::manifest::RecordStatus::Complete),
            })
            .collect(),
        rejections: Proposals::load(&store)?
            .rejected()
            .filter_map(|p| {
                Some(report::Rejection {
                    pr_number: p.pr_number?,
                    pr_url: p.pr_url.clone()?,
                    models: p.models.clone(),
                    closed_at: p.closed_at.clone(),
                })
            })
            .collect(),
    };
    let draft = !report::verdict(&ctx.gate_results()).passed;
    let rendered = report::render_with(
        &ctx,
        &RenderOptions {
            template_dir: settings.report.templates.clone(),
            samples_in_files: settings.report.samples_in_files,
            local_paths: local_paths(settings),
        },
    )?;
    let out = report::write_report(&settings.report.dir, run_id, &rendered)?;
    Ok((out, rendered.pr_body, draft))
}

/// The local directories a committed report may mention, and how it names them.
fn local_paths(settings: &Settings) -> report::LocalPaths {
    let cwd = std::env::current_dir().unwrap_or_default();
    report::LocalPaths::default()
        .with_root(&cwd, "")
        .with_root(cwd.join(&settings.registry.artifacts_dir), "<artifacts>")
        .with_root(cwd.join(&settings.store.dir), "<store>")
        .with_root(crate::config::models::models_dir(), "<models>")
}

/// Publishes the run: the registry file and the report directory as one commit on the run's
/// branch, with the report as the PR body. `dry_run` forces the local publisher.
pub async fn publish_run(
    settings: &Settings,
    run_id: &str,
    body: String,
    draft: bool,
    dry_run: bool,
) -> Result<PublishedRun> {
    let report_dir = settings.report.dir.join(run_id);
    let kinds: Vec<&str> = ["reward", "policy"]
        .into_iter()
        .filter(|k| run_dir(&settings.store.dir, run_id).join(k).is_dir())
        .collect();
    let mut files = vec![(
        repo_path(&settings.registry.path, "models/registry.yaml"),
        proposed_registry(settings, run_id)?.into_bytes(),
    )];
    for entry in std::fs::read_dir(&report_dir)
        .with_context(|| format!("reading {}", report_dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let in_repo = repo_path(&settings.report.dir, "reports");
            files.push((format!("{in_repo}/{run_id}/{name}"), std::fs::read(&path)?));
        }
    }
    let request = PublishRequest {
        run_id: run_id.to_string(),
        branch: format!(
            "{}{}-{run_id}",
            settings.publish.branch_prefix,
            kinds.join("-")
        ),
        branch_prefix: settings.publish.branch_prefix.clone(),
        title: format!("rlhf-bot: promote {} from run {run_id}", kinds.join(" + ")),
        body,
        files,
        labels: settings.publish.labels.clone(),
        reviewers: settings.publish.reviewers.clone(),
        draft,
        on_existing: settings.publish.on_existing,
    };
    match github_target(settings)? {
        Some(target) if !dry_run => {
            let outcome = publish(&target, &request).await?;
            remember_proposal(
                settings,
                run_id,
                &outcome.branch,
                outcome.pr_number.zip(outcome.pr_url.clone()),
                &outcome.superseded,
            )?;
            Ok(PublishedRun {
                branch: outcome.branch,
                draft,
                pr_number: outcome.pr_number,
                pr_url: outcome.pr_url,
                action: Some(outcome.action),
                superseded: outcome.superseded,
                local_dir: None,
            })
        }
        _ => {
            let outcome = publish_local(&settings.publish.local_dir, &request)?;
            remember_proposal(settings, run_id, &request.branch, None, &[])?;
            Ok(PublishedRun {
                branch: request.branch,
                draft,
                pr_number: None,
                pr_url: None,
                action: None,
                superseded: Vec::new(),
                local_dir: Some(outcome.dir),
            })
        }
    }
}

/// Where a run's pull request went.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedRun {
    pub branch: String,
    pub draft: bool,
    /// On GitHub: the pull request opened or updated.
    pub pr_number: Option<u64>,
    pub pr_url: Option<String>,
    pub action: Option<PublishAction>,
    /// Earlier bot PRs closed in favour of this one.
    pub superseded: Vec<u64>,
    /// Dry run / `publish.mode: local`: the directory holding `pr.json`, `body.md` and `files/`.
    pub local_dir: Option<PathBuf>,
}

impl std::fmt::Display for PublishedRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let draft = if self.draft { "draft " } else { "" };
        match (&self.pr_url, &self.local_dir) {
            (Some(url), _) => write!(f, "{draft}pull request {url} (branch {})", self.branch)?,
            (None, Some(dir)) => write!(
                f,
                "{draft}pull request written locally to {} (branch {})",
                dir.display(),
                self.branch
            )?,
            (None, None) => write!(
                f,
                "branch {} left alone (it has human commits)",
                self.branch
            )?,
        }
        if !self.superseded.is_empty() {
            let list: Vec<String> = self.superseded.iter().map(|n| format!("#{n}")).collect();
            write!(f, "; superseded {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// The GitHub repository the config publishes to, with its token; `None` for the local publisher.
pub fn github_target(settings: &Settings) -> Result<Option<GithubTarget>> {
    match (settings.publish.mode, &settings.publish.github) {
        (PublishMode::Github, Some(g)) => Ok(Some(GithubTarget {
            api_url: g.api_url.clone(),
            owner: g.owner.clone(),
            repo: g.repo.clone(),
            base_branch: g.base_branch.clone(),
            token: SecretToken::from_env(&g.token_env)?,
        })),
        _ => Ok(None),
    }
}

/// Records the PR just opened, updated or written as a dry run (`pr` is its number and URL on
/// GitHub) in the store's loop state, with the data and config its models were trained on, so a
/// later rejection can be recognised.
fn remember_proposal(
    settings: &Settings,
    run_id: &str,
    branch: &str,
    pr: Option<(u64, String)>,
    superseded: &[u64],
) -> Result<()> {
    let registry = Registry::load_or_default(&settings.registry.path)?;
    let models: Vec<&ModelEntry> = [ModelKind::Reward, ModelKind::Policy]
        .into_iter()
        .filter_map(|k| registry.get(&format!("{}-{run_id}", k.as_str())))
        .collect();
    let watermark = models
        .iter()
        .find_map(|m| chrono::DateTime::parse_from_rfc3339(m.feedback.watermark.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    let store = Store::open(&settings.store.dir)?;
    let mut proposals = Proposals::load(&store)?;
    let (pr_number, pr_url) = pr.unzip();
    proposals.record_opened(
        Proposal {
            run_id: run_id.to_string(),
            models: models.iter().map(|m| m.id.clone()).collect(),
            pr_number,
            pr_url,
            branch: branch.to_string(),
            watermark,
            config_sha256: settings.config_sha256.clone(),
            state: ProposalState::Open,
            closed_at: None,
        },
        superseded,
    );
    proposals.save(&store)
}

/// Asks the forge what became of the bot's open pull requests and records merges and
/// rejections. A forge that cannot be reached only costs the report its rejection list, so the
/// failure is logged and the run goes on.
pub async fn reconcile_proposals(settings: &Settings) -> Result<()> {
    let Some(target) = github_target(settings)? else {
        return Ok(());
    };
    let store = Store::open(&settings.store.dir)?;
    let mut proposals = Proposals::load(&store)?;
    if proposals.open().is_none() {
        return Ok(());
    }
    let closed = match closed_bot_pulls(
        &target,
        &settings.publish.branch_prefix,
        Default::default(),
    )
    .await
    {
        Ok(closed) => closed,
        Err(e) => {
            tracing::warn!("could not look up the bot's closed pull requests: {e:#}");
            return Ok(());
        }
    };
    for p in proposals.reconcile(&closed) {
        tracing::warn!(
            "pull request #{} was closed without merging: {} recorded as rejected",
            p.pr_number.unwrap_or_default(),
            p.models.join(", ")
        );
    }
    proposals.save(&store)
}

/// The registry as the run's pull request proposes it: each model this run registered holds
/// `production`, and the models they replace are archived and marked `previous`. Merging the PR
/// is therefore the promotion, and reverting the merge is the rollback. The gates decide only
/// whether the PR is a draft, never what it proposes.
pub fn proposed_registry(settings: &Settings, run_id: &str) -> Result<String> {
    let mut registry = Registry::load(&settings.registry.path)?;
    for kind in [ModelKind::Reward, ModelKind::Policy] {
        let id = format!("{}-{run_id}", kind.as_str());
        if registry.get(&id).is_some() {
            registry.promote(&id)?;
        }
    }
    Ok(registry.to_yaml()?)
}

/// A path as the repository sees it: relative to the working directory (the repository root in
/// Actions), `/`-separated; a path outside it (e.g. a temporary store) goes to `fallback`.
fn repo_path(path: &Path, fallback: &str) -> String {
    let cwd = std::env::current_dir().ok();
    let rel = if path.is_absolute() {
        match cwd.as_ref().and_then(|c| path.strip_prefix(c).ok()) {
            Some(rel) => rel,
            None => return fallback.to_string(),
        }
    } else {
        path
    };
    rel.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The production entry a section names: the one the candidate was compared with, as its
/// baseline records; for runs older than the baseline file, the registry's current production.
fn compared_production(
    registry: &Registry,
    kind: ModelKind,
    baseline: &Option<Baseline>,
) -> Option<ModelEntry> {
    match baseline {
        Some(b) => b
            .production_id
            .as_deref()
            .and_then(|id| registry.get(id))
            .cloned(),
        None => registry.production(kind).cloned(),
    }
}

/// Builds the dataset from the store and trains the reward model into `runs/<run-id>/reward/` on
/// every kind of example (see `train::reward_run::train_reward_from_store`); the run's metrics
/// carry the dataset's counts and fingerprint for lineage.
pub async fn train_reward_from_store(
    settings: &Settings,
    out: PathBuf,
    mut opts: crate::train::reward_run::RewardTrainOptions,
) -> Result<crate::train::reward_run::RewardRunSummary> {
    opts.out = out;
    let store_dir = settings.store.dir.clone();
    let dataset = settings.dataset.clone();
    tokio::task::spawn_blocking(move || {
        crate::train::reward_run::train_reward_from_store(&store_dir, &dataset, &opts)
    })
    .await
    .context("the reward training thread panicked")?
}
