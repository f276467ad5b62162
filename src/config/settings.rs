//! Validated settings: what the program runs on. Built from [`super::raw::RawConfig`] by
//! [`validate`], which fills defaults and checks what a single field cannot (an http source
//! needs a URL, a file source a path). Types here cannot hold bad values.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Invalid;
use super::fields::{env_name, http_url, owner_repo};
use super::raw::{PublishMode, RawConfig, RawPublish, SourceKind};
use crate::artifacts::{ArtifactError, ArtifactLocation, ArtifactStore};
use crate::forge::publish::OnExisting;

pub const DEFAULT_STORE_DIR: &str = ".rlhf";
pub const DEFAULT_TOKEN_ENV: &str = "FEEDBACK_API_TOKEN";
pub const DEFAULT_REGISTRY: &str = "models/registry.yaml";
pub const DEFAULT_ARTIFACTS_DIR: &str = ".rlhf/artifacts";
/// Under `store.dir`: where models read from a bucket are downloaded and verified.
pub const ARTIFACT_CACHE_DIR: &str = "artifact-cache";
pub const DEFAULT_GITHUB_TOKEN_ENV: &str = "GITHUB_TOKEN";
/// `feedback.max_page_bytes`: a page of 1000 records with long conversations is a few MB; a body
/// far beyond that is a broken or hostile server, and must not be read into memory whole.
pub const DEFAULT_MAX_PAGE_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub feedback: FeedbackSettings,
    pub store: StoreSettings,
    pub thresholds: Thresholds,
    pub registry: RegistrySettings,
    pub report: ReportSettings,
    pub gates: crate::report::GateConfig,
    pub publish: PublishSettings,
    pub dataset: crate::dataset::DatasetOptions,
    pub audit: crate::dataset::audit::AuditSettings,
    pub evals: crate::evals::EvalsSettings,
    pub constitution: crate::constitution::ConstitutionSettings,
    pub rlaif: crate::rlaif::RlaifSettings,
    pub reward: crate::train::reward_run::RewardTrainOptions,
    pub policy: super::policy::PolicySettings,
    /// `train.backend`: where the training stage runs.
    pub train: crate::train::ray::TrainBackend,
    pub deploy: super::deploy::DeploySettings,
    pub server: super::server::ServerSettings,
    pub dashboard: super::dashboard::DashboardSettings,
    /// sha256 of the config text: lineage for the registry and reports.
    pub config_sha256: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum SourceSettings {
    Http {
        url: url::Url,
        /// The variable's name; its value is read when pulling and never printed.
        token_env: String,
        timeout_secs: u64,
        max_attempts: u32,
        /// The most bytes one page's response body may have.
        max_page_bytes: u64,
    },
    File {
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct FeedbackSettings {
    #[serde(flatten)]
    pub source: SourceSettings,
    pub page_size: u32,
    pub aspects: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreSettings {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegistrySettings {
    pub path: PathBuf,
    /// Where model directories are stored: a directory or a bucket URL.
    pub artifacts: ArtifactLocation,
    /// The local side of the artifact store: the directory itself, or for a bucket the cache
    /// that downloads go to (`<store.dir>/artifact-cache`).
    pub artifacts_dir: PathBuf,
}

impl RegistrySettings {
    /// Opens the configured artifact store (bucket credentials come from the environment).
    pub fn open_artifacts(&self) -> Result<Box<dyn ArtifactStore>, ArtifactError> {
        crate::artifacts::open(&self.artifacts, &self.artifacts_dir)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportSettings {
    pub dir: PathBuf,
    pub templates: Option<PathBuf>,
    pub max_samples: usize,
    /// Sample answers in the committed report files too (default: only in the PR body).
    pub samples_in_files: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PublishSettings {
    pub mode: PublishMode,
    pub local_dir: PathBuf,
    pub branch_prefix: String,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub on_existing: OnExisting,
    /// Present when `mode: github`.
    pub github: Option<GithubSettings>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GithubSettings {
    pub api_url: String,
    pub owner: String,
    pub repo: String,
    /// The variable's name; the token itself is read when publishing and never printed.
    pub token_env: String,
    pub base_branch: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thresholds {
    pub min_new_feedback: u64,
    pub min_new_signals: u64,
    pub max_age_days: u64,
    pub min_hours_between: u64,
    pub quality: QualitySettings,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualitySettings {
    pub enabled: bool,
    pub window_days: u64,
    pub confidence: f64,
    pub min_samples: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_new_feedback: 200,
            min_new_signals: 100,
            max_age_days: 14,
            min_hours_between: 12,
            quality: QualitySettings {
                enabled: true,
                window_days: 7,
                confidence: 0.95,
                min_samples: 50,
            },
        }
    }
}

impl FeedbackSettings {
    pub fn timeout(&self) -> Duration {
        match self.source {
            SourceSettings::Http { timeout_secs, .. } => Duration::from_secs(timeout_secs),
            SourceSettings::File { .. } => Duration::ZERO,
        }
    }
}

pub fn validate(raw: RawConfig, text: &str) -> Result<Settings, Invalid> {
    let f = raw.feedback;
    let page_size = f.page_size.map_or(500, |p| p.0);
    if page_size > 1000 {
        return Err(Invalid::new(
            "feedback.page_size",
            format!("the API serves at most 1000 records a page, got {page_size}"),
        ));
    }
    let source = match f.source {
        SourceKind::Http => {
            if f.path.is_some() {
                return Err(Invalid::new(
                    "feedback.path",
                    "`path` is for the file source; this source is http",
                ));
            }
            let Some(text_url) = f.url else {
                return Err(Invalid::new(
                    "feedback.source",
                    "the http source needs `feedback.url` (the API's base URL, e.g. https://feedback.example.com)",
                ));
            };
            let url = http_url("feedback.url", &text_url, "feedback.token_env")?;
            let token_env = env_name(
                "feedback.token_env",
                f.token_env.unwrap_or_else(|| DEFAULT_TOKEN_ENV.to_string()),
                DEFAULT_TOKEN_ENV,
            )?;
            SourceSettings::Http {
                url,
                token_env,
                timeout_secs: f.timeout_secs.map_or(30, |t| t.0),
                max_attempts: f.max_attempts.map_or(6, |a| a.0.min(100) as u32),
                max_page_bytes: f.max_page_bytes.map_or(DEFAULT_MAX_PAGE_BYTES, |b| b.0),
            }
        }
        SourceKind::File => {
            if f.url.is_some() {
                return Err(Invalid::new(
                    "feedback.url",
                    "`url` is for the http source; this source is file",
                ));
            }
            let Some(path) = f.path else {
                return Err(Invalid::new(
                    "feedback.source",
                    "the file source needs `feedback.path` (a JSONL file)",
                ));
            };
            SourceSettings::File {
                path: PathBuf::from(path),
            }
        }
    };
    let defaults = Thresholds::default();
    let t = raw.thresholds;
    let q = t.quality;
    let thresholds = Thresholds {
        min_new_feedback: t
            .min_new_feedback
            .map_or(defaults.min_new_feedback, |v| v.0),
        min_new_signals: t.min_new_signals.map_or(defaults.min_new_signals, |v| v.0),
        max_age_days: t.max_age_days.map_or(defaults.max_age_days, |v| v.0),
        min_hours_between: t
            .min_hours_between
            .map_or(defaults.min_hours_between, |v| v.0),
        quality: QualitySettings {
            enabled: q.enabled.unwrap_or(defaults.quality.enabled),
            window_days: q.window_days.map_or(defaults.quality.window_days, |v| v.0),
            confidence: q.confidence.map_or(defaults.quality.confidence, |v| v.0),
            min_samples: q.min_samples.map_or(defaults.quality.min_samples, |v| v.0),
        },
    };
    if thresholds.min_hours_between > thresholds.max_age_days * 24 {
        return Err(Invalid::new(
            "thresholds.min_hours_between",
            format!(
                "{} hours is longer than max_age_days ({} days): the age trigger could never fire",
                thresholds.min_hours_between, thresholds.max_age_days
            ),
        ));
    }
    let publish = validate_publish(raw.publish)?;
    validate_gates(&raw.gates)?;
    let mut dataset = crate::dataset::DatasetOptions {
        aspects: f.aspects.clone(),
        ..Default::default()
    };
    if let Some(v) = raw.dataset.eval_fraction {
        dataset.eval_fraction = v.0;
    }
    if let Some(v) = raw.dataset.seed {
        dataset.seed = v.0;
    }
    if let Some(v) = raw.dataset.min_score_gap {
        dataset.min_score_gap = v;
    }
    if let Some(v) = raw.dataset.margin_scale {
        dataset.margin_scale = v;
    }
    let audit = super::audit::validate_audit(raw.audit)?;
    let evals = super::evals::validate_evals(raw.evals)?;
    let constitution = super::constitution::validate_constitution(raw.constitution)?;
    dataset.constitution_weight = constitution.weight;
    let rlaif = super::rlaif::validate_rlaif(raw.rlaif)?;
    dataset.ai_feedback_weight = if rlaif.enabled { rlaif.weight } else { 0.0 };
    if audit.enabled && audit.max_user_share < 1.0 {
        dataset.max_user_share = Some(audit.max_user_share);
    }
    dataset.validate().map_err(|e| {
        Invalid::new(
            &format!("dataset.{}", e.option),
            format!("{}\nhint: {}", e.problem, e.hint),
        )
    })?;
    let mut reward = crate::train::reward_run::RewardTrainOptions {
        model: raw
            .reward
            .model
            .as_deref()
            .map(|v| super::models::model_path("reward.model", v))
            .transpose()?,
        eval_fraction: dataset.eval_fraction,
        ..Default::default()
    };
    reward.train.seed = dataset.seed;
    if let Some(v) = raw.reward.epochs {
        reward.train.epochs = v.0 as u32;
    }
    if let Some(v) = raw.reward.max_length {
        reward.train.max_length = v.0 as usize;
    }
    if let Some(v) = raw.reward.batch_size {
        reward.train.batch_size = v.0 as usize;
    }
    if let Some(v) = raw.reward.lr {
        if !(v.is_finite() && v > 0.0) {
            return Err(Invalid::new(
                "reward.lr",
                format!("expected a learning rate > 0, got {v}"),
            ));
        }
        reward.train.lr = v;
    }
    if let Some(v) = raw.reward.eval_every {
        reward.train.eval_every = v;
    }
    if let Some(d) = raw.reward.device {
        reward.device = d
            .parse()
            .map_err(|e| Invalid::new("reward.device", format!("{e}")))?;
    }
    if let Some(p) = raw.reward.precision {
        reward.precision = p
            .parse()
            .map_err(|e| Invalid::new("reward.precision", format!("{e}")))?;
    }
    reward.aspects = f.aspects.clone();
    let lw = raw.reward.loss_weights;
    let w = &mut reward.train.loss_weights;
    for (slot, value) in [
        (&mut w.pairwise, lw.pairwise),
        (&mut w.pointwise, lw.pointwise),
        (&mut w.steps, lw.steps),
        (&mut w.aspects, lw.aspects),
    ] {
        if let Some(v) = value {
            *slot = v;
        }
    }
    w.validate()
        .map_err(|e| Invalid::new(&e.key, format!("{}\nhint: {}", e.problem, e.hint)))?;
    if let Some(c) = raw.reward.center_rewards_coefficient {
        if !(c.is_finite() && c >= 0.0) {
            return Err(Invalid::new(
                "reward.center_rewards_coefficient",
                format!("expected a finite number >= 0, got {c}\nhint: TRL suggests 0.01"),
            ));
        }
        reward.train.center_rewards_coefficient = Some(c);
    }
    if let Some(r) = raw.reward.rating_loss {
        reward.train.rating_loss = r;
    }
    let policy = super::policy::validate_policy(raw.policy)?;
    let train = super::train::validate_train(raw.train)?;
    let deploy = super::deploy::validate_deploy(
        raw.deploy,
        publish.github.as_ref().map(|g| g.api_url.as_str()),
    )?;
    let server = super::server::validate_server(raw.server)?;
    let dashboard = super::dashboard::validate_dashboard(
        raw.dashboard,
        publish
            .github
            .as_ref()
            .map(|g| super::dashboard::PublishRepo {
                owner: &g.owner,
                repo: &g.repo,
                api_url: &g.api_url,
                base_branch: &g.base_branch,
            }),
    )?;
    let store_dir = PathBuf::from(raw.store.dir.unwrap_or_else(|| DEFAULT_STORE_DIR.into()));
    let artifacts = match raw.registry.artifacts.as_deref() {
        None => ArtifactLocation::Dir(PathBuf::from(DEFAULT_ARTIFACTS_DIR)),
        Some(value) => ArtifactLocation::parse(value)
            .map_err(|problem| Invalid::new("registry.artifacts", problem))?,
    };
    if matches!(train, crate::train::ray::TrainBackend::Ray(_))
        && !matches!(artifacts, ArtifactLocation::Bucket(_))
    {
        return Err(Invalid::new(
            "registry.artifacts",
            "`train.backend: ray` exchanges the dataset and the checkpoint with the cluster through the artifact store, and this one is a directory\nhint: set `registry.artifacts` to a bucket both this runner and the cluster can reach, e.g. `s3://team-models/rlhf` (docs/ray.md)",
        ));
    }
    if let crate::train::ray::TrainBackend::Ray(ray) = &train
        && policy.enabled
    {
        crate::train::ray::policy_entrypoint::check_supported(
            ray.entrypoint,
            policy.options.algo,
            &ray.pip,
        )
        .map_err(|why| {
            Invalid::new(
                "policy.algo",
                format!(
                    "{} on the Ray cluster (train.ray.entrypoint: {}): {why}",
                    policy.options.algo.as_str(),
                    ray.entrypoint.as_str()
                ),
            )
        })?;
    }
    let artifacts_dir = match &artifacts {
        ArtifactLocation::Dir(dir) => dir.clone(),
        ArtifactLocation::Bucket(_) => store_dir.join(ARTIFACT_CACHE_DIR),
    };
    Ok(Settings {
        registry: RegistrySettings {
            path: PathBuf::from(raw.registry.path.unwrap_or_else(|| DEFAULT_REGISTRY.into())),
            artifacts,
            artifacts_dir,
        },
        report: ReportSettings {
            dir: PathBuf::from(raw.report.dir.unwrap_or_else(|| "reports".into())),
            templates: raw.report.templates.map(PathBuf::from),
            max_samples: raw.report.max_samples.map_or(3, |v| v.0 as usize),
            samples_in_files: raw.report.samples_in_files.unwrap_or(false),
        },
        gates: raw.gates,
        publish,
        dataset,
        audit,
        evals,
        constitution,
        rlaif,
        reward,
        policy,
        train,
        deploy,
        server,
        dashboard,
        feedback: FeedbackSettings {
            source,
            page_size: page_size as u32,
            aspects: f.aspects,
        },
        store: StoreSettings { dir: store_dir },
        thresholds,
        config_sha256: hex::encode(Sha256::digest(text.as_bytes())),
    })
}

/// Gate thresholds are compared with measured numbers: NaN would make every comparison false
/// (a gate that silently never fails or never passes), infinity or a negative value one that
/// means nothing.
fn validate_gates(g: &crate::report::GateConfig) -> Result<(), Invalid> {
    let checks = [
        (
            "gates.rm_accuracy_max_drop_points",
            g.rm_accuracy_max_drop_points,
            100.0,
            "percentage points, 0 to 100",
        ),
        (
            "gates.min_win_rate_lower_bound",
            g.min_win_rate_lower_bound,
            1.0,
            "a win rate, 0 to 1",
        ),
        (
            "gates.kl_budget",
            g.kl_budget,
            f64::MAX,
            "nats, a finite number >= 0",
        ),
    ];
    for (key, value, max, what) in checks {
        if !(value.is_finite() && (0.0..=max).contains(&value)) {
            return Err(Invalid::new(key, format!("expected {what}, got {value}")));
        }
    }
    Ok(())
}

fn validate_publish(p: RawPublish) -> Result<PublishSettings, Invalid> {
    let mode = p.mode.unwrap_or(PublishMode::Local);
    let github = match mode {
        PublishMode::Local => None,
        PublishMode::Github => {
            let g = p.github;
            let Some(repo) = g.repo else {
                return Err(Invalid::new(
                    "publish.mode",
                    "`mode: github` needs `publish.github.repo` (owner/name)",
                ));
            };
            let (owner, name) = owner_repo("publish.github.repo", &repo)?;
            let token_env = env_name(
                "publish.github.token_env",
                g.token_env
                    .unwrap_or_else(|| DEFAULT_GITHUB_TOKEN_ENV.into()),
                DEFAULT_GITHUB_TOKEN_ENV,
            )?;
            let api_url = g.api_url.unwrap_or_else(|| "https://api.github.com".into());
            http_url(
                "publish.github.api_url",
                &api_url,
                "publish.github.token_env",
            )?;
            Some(GithubSettings {
                api_url: api_url.trim_end_matches('/').to_string(),
                owner: owner.to_string(),
                repo: name.to_string(),
                token_env,
                base_branch: g.base_branch.unwrap_or_else(|| "main".into()),
            })
        }
    };
    let branch_prefix = p.branch_prefix.unwrap_or_else(|| "rlhf-bot/".into());
    if branch_prefix.is_empty()
        || branch_prefix.contains(char::is_whitespace)
        || branch_prefix.contains("..")
    {
        return Err(Invalid::new(
            "publish.branch_prefix",
            format!("not usable in a git branch name: {branch_prefix:?}"),
        ));
    }
    Ok(PublishSettings {
        mode,
        local_dir: PathBuf::from(p.local_dir.unwrap_or_else(|| "out/pr".into())),
        branch_prefix,
        labels: p.labels,
        reviewers: p.reviewers,
        on_existing: p.on_existing.unwrap_or_default(),
        github,
    })
}
