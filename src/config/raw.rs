//! The config file as written: serde structs that mirror the YAML one to one. Unknown keys are
//! refused (`deny_unknown_fields`), so a typo is an error rather than a silently ignored setting.
//! Defaults live in [`super::settings`], where the raw values are validated.

use serde::Deserialize;

use super::values::{Fraction, NonNegativeInt, PositiveInt};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub feedback: RawFeedback,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub thresholds: RawThresholds,
    #[serde(default)]
    pub registry: RawRegistry,
    #[serde(default)]
    pub report: RawReport,
    /// Release gates the report checks (see docs/report.md).
    #[serde(default)]
    pub gates: crate::report::GateConfig,
    #[serde(default)]
    pub publish: RawPublish,
    #[serde(default)]
    pub dataset: RawDataset,
    /// The feedback audit (docs/feedback-audit.md).
    #[serde(default)]
    pub audit: super::audit::RawAudit,
    /// Behaviour tests as merge gates (docs/evals.md).
    #[serde(default)]
    pub evals: super::evals::RawEvals,
    /// Constitution as code (docs/constitution.md).
    #[serde(default)]
    pub constitution: super::constitution::RawConstitution,
    /// AI feedback where humans gave none (docs/rlaif.md).
    #[serde(default)]
    pub rlaif: super::rlaif::RawRlaif,
    #[serde(default)]
    pub reward: RawReward,
    #[serde(default)]
    pub policy: RawPolicy,
    /// Where the training stage runs (docs/ray.md).
    #[serde(default)]
    pub train: super::train::RawTrain,
    /// `rlhf-bot deploy`: what is published after a promotion, and who is told.
    #[serde(default)]
    pub deploy: RawDeploy,
    /// The feedback service (`rlhf-bot serve`); docs/feedback-service.md.
    #[serde(default)]
    pub server: RawServer,
    /// The training dashboard (`rlhf-bot dashboard`, `GET /dashboard`); docs/dashboard.md.
    #[serde(default)]
    pub dashboard: RawDashboard,
}

/// `server:`: where the feedback service listens, its database and its credentials.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// `host:port`.
    pub listen: Option<String>,
    /// A SQLite file path, or a `postgres://` / `postgresql://` URL.
    pub database: Option<String>,
    /// The variable holding the PostgreSQL password (instead of one in the URL).
    pub database_password_env: Option<String>,
    /// The variable holding the bearer token that reads feedback (what `rlhf-bot pull` sends).
    pub read_token_env: Option<String>,
    /// The variable holding the key a chat application's backend writes and deletes with.
    pub write_key_env: Option<String>,
    /// Public keys for the browser widget: each may only write, from its listed origins.
    #[serde(default)]
    pub widget_keys: Vec<RawWidgetKey>,
    /// Records in one `POST /v1/feedback` batch.
    pub max_batch: Option<super::values::PositiveInt>,
    /// Bytes in one request body.
    pub max_body_bytes: Option<super::values::PositiveInt>,
    /// Requests per minute one widget key may make from one client address.
    pub widget_requests_per_minute: Option<super::values::PositiveInt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWidgetKey {
    pub key_env: String,
    /// Origins allowed to use the key, e.g. `https://chat.example.com`.
    pub origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataset {
    pub eval_fraction: Option<Fraction>,
    pub seed: Option<NonNegativeInt>,
    /// Smallest score gap (0..1 scale) between two answers that makes a preference pair.
    pub min_score_gap: Option<f64>,
    /// Margin = score gap × this (TRL's `margin` column).
    pub margin_scale: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReward {
    /// A local Hugging Face checkpoint (encoder or decoder); absent: a small llama from scratch.
    pub model: Option<String>,
    pub epochs: Option<PositiveInt>,
    pub max_length: Option<PositiveInt>,
    pub batch_size: Option<PositiveInt>,
    pub lr: Option<f64>,
    /// Evaluate on the held-out pairs every N optimiser steps (and after the last); 0: only
    /// after the last.
    pub eval_every: Option<u64>,
    /// `cpu` or `cuda` (a binary built with `--features cuda`).
    pub device: Option<String>,
    /// The CPU's big matrix products: `f32` (default), `bf16` or `auto` (docs/reward-training.md).
    pub precision: Option<String>,
    /// Weight of each kind of feedback in the reward loss (docs/reward-training.md).
    #[serde(default)]
    pub loss_weights: RawLossWeights,
    /// TRL's `center_rewards_coefficient`: pulls rewards towards zero.
    pub center_rewards_coefficient: Option<f64>,
    /// How ratings train the score: `mse` (default) or `bce`.
    pub rating_loss: Option<crate::train::losses::reward::RatingLoss>,
}

/// `reward.loss_weights`; an absent key keeps its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLossWeights {
    pub pairwise: Option<f64>,
    pub pointwise: Option<f64>,
    pub steps: Option<f64>,
    pub aspects: Option<f64>,
}

/// The policy stage (`train policy`, and `run` after the reward model when `enabled`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub enabled: Option<bool>,
    /// `dpo`, `kto`, `ppo`, `grpo` or `rloo`.
    pub algo: Option<crate::run::outputs::PolicyAlgo>,
    /// A Hugging Face causal-LM directory or a `.gguf` file; absent: a tiny llama from scratch.
    pub model: Option<String>,
    /// The base model's public id (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`), written as
    /// `base_model_name_or_path` by `export-model --to peft` and as the GGUF's name.
    pub base_model_id: Option<String>,
    /// The production policy the candidate is evaluated against; absent: the registry's
    /// production policy, else the base model.
    pub production_model: Option<String>,
    /// Render prompts with the model's chat template; absent: when the model has one.
    pub chat_template: Option<bool>,
    #[serde(default)]
    pub lora: RawLora,
    /// Optimiser steps (PPO always counts steps; DPO/KTO count epochs without it).
    pub steps: Option<PositiveInt>,
    pub epochs: Option<PositiveInt>,
    pub lr: Option<f64>,
    pub beta: Option<f64>,
    pub label_smoothing: Option<f64>,
    pub ipo: Option<bool>,
    pub kto_desirable_weight: Option<f64>,
    pub kto_undesirable_weight: Option<f64>,
    pub batch_size: Option<PositiveInt>,
    pub grad_accum: Option<PositiveInt>,
    pub max_prompt_length: Option<PositiveInt>,
    pub max_completion_length: Option<PositiveInt>,
    pub max_grad_norm: Option<f64>,
    pub kl_ceiling: Option<f64>,
    pub eval_prompts: Option<PositiveInt>,
    pub eval_greedy: Option<bool>,
    pub checkpoint_every: Option<PositiveInt>,
    pub seed: Option<NonNegativeInt>,
    /// `cpu` or `cuda` (a binary built with `--features cuda`).
    pub device: Option<String>,
    /// Frozen models held in bf16 and bf16 products: `f32` (default), `bf16` or `auto`
    /// (docs/config.md, `policy.precision`).
    pub precision: Option<String>,
    /// Recompute each decoder layer's activations in backward instead of keeping them.
    pub gradient_checkpointing: Option<bool>,
    #[serde(default)]
    pub ppo: RawPpo,
    /// GRPO / RLOO settings (TRL's names; validated by `GroupRlOptions::validate`).
    #[serde(default)]
    pub grpo: crate::train::policy_common::GroupRlOptions,
    /// The online objectives' reward: weights of the score and aspects, rule rewards
    /// (validated by `RewardOptions::problem`; aspect names against the model at train time).
    #[serde(default)]
    pub reward: crate::train::policy_reward::RewardOptions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    /// `false` trains every weight.
    pub enabled: Option<bool>,
    pub r: Option<PositiveInt>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    pub target_modules: Option<Vec<String>>,
    /// Also write the adapter folded into full weights (`policy/merged/`, HF layout).
    pub merge: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPpo {
    pub rollouts_per_step: Option<PositiveInt>,
    pub ppo_epochs: Option<PositiveInt>,
    pub num_minibatches: Option<PositiveInt>,
    pub cliprange: Option<f64>,
    pub cliprange_value: Option<f64>,
    pub vf_coef: Option<f64>,
    pub gamma: Option<f64>,
    pub lam: Option<f64>,
    pub kl_coef: Option<f64>,
    pub adaptive_kl: Option<bool>,
    pub adaptive_kl_init: Option<f64>,
    pub adaptive_kl_target: Option<f64>,
    pub adaptive_kl_horizon: Option<f64>,
    pub missing_eos_penalty: Option<f64>,
    pub whiten_rewards: Option<bool>,
    pub temperature: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    /// The git-native registry file in the team's repository.
    pub path: Option<String>,
    /// Where model weights go (`file:///abs/dir` or a relative directory); never into git.
    pub artifacts: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    pub dir: Option<String>,
    /// A directory whose `*.md.j2` files replace the embedded templates.
    pub templates: Option<String>,
    pub max_samples: Option<PositiveInt>,
    /// Also put sample answers (users' prompts, the models' answers) in the committed
    /// `report.md` and `metrics.json`; the PR body has them either way.
    pub samples_in_files: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Write the would-be pull request under `publish.local_dir` (no network).
    Local,
    /// Open or update the pull request on GitHub.
    Github,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    pub mode: Option<PublishMode>,
    pub local_dir: Option<String>,
    pub branch_prefix: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub reviewers: Vec<String>,
    pub on_existing: Option<crate::forge::publish::OnExisting>,
    #[serde(default)]
    pub github: RawGithub,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGithub {
    pub api_url: Option<String>,
    /// `owner/name`.
    pub repo: Option<String>,
    pub token_env: Option<String>,
    pub base_branch: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Http,
    File,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeedback {
    pub source: SourceKind,
    /// Base URL of the feedback API (http source).
    pub url: Option<String>,
    /// Name of the environment variable holding the API token (http source).
    pub token_env: Option<String>,
    pub page_size: Option<PositiveInt>,
    /// JSONL file (file source).
    pub path: Option<String>,
    pub timeout_secs: Option<PositiveInt>,
    pub max_attempts: Option<PositiveInt>,
    /// The most bytes one page's response body may have (http source).
    pub max_page_bytes: Option<PositiveInt>,
    /// Aspects that train per-aspect heads and count as usable signals (empty: all).
    #[serde(default)]
    pub aspects: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThresholds {
    pub min_new_feedback: Option<PositiveInt>,
    pub min_new_signals: Option<PositiveInt>,
    pub max_age_days: Option<PositiveInt>,
    pub min_hours_between: Option<NonNegativeInt>,
    #[serde(default)]
    pub quality: RawQuality,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuality {
    pub enabled: Option<bool>,
    pub window_days: Option<PositiveInt>,
    pub confidence: Option<Fraction>,
    pub min_samples: Option<PositiveInt>,
}

/// `deploy:` (docs/serving.md, "Deploying what was promoted").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    #[serde(default)]
    pub formats: RawDeployFormats,
    /// Versions kept under `production/<kind>/versions/` (the live one included).
    pub keep: Option<PositiveInt>,
    pub webhook: Option<RawWebhook>,
    pub repository_dispatch: Option<RawDispatch>,
    pub hub: Option<RawHub>,
}

/// `deploy.hub`: push the production model to a Hugging Face Hub model repository.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHub {
    /// `owner/name` of the model repository (it must exist).
    pub repo: String,
    /// Name of the environment variable holding a Hub token with write access to `repo`.
    pub token_env: Option<String>,
    /// Branch committed to.
    pub revision: Option<String>,
    /// The Hub's base URL.
    pub endpoint: Option<String>,
    /// Which production model goes there: `policy` or `reward`.
    pub kind: Option<String>,
}

/// Serving formats per kind, by `export-model --to` names; validated in `config::deploy`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployFormats {
    pub policy: Option<Vec<String>>,
    pub reward: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    /// Name of the environment variable holding the HMAC secret.
    pub secret_env: Option<String>,
    pub max_attempts: Option<PositiveInt>,
    pub timeout_secs: Option<PositiveInt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDispatch {
    /// `owner/name` of the repository whose workflows receive the event.
    pub repo: String,
    pub event_type: Option<String>,
    /// Name of the environment variable holding a token that may dispatch to `repo`.
    pub token_env: Option<String>,
    pub api_url: Option<String>,
}

/// `dashboard:`: where "Retrain now" points, and who may open the live dashboard.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDashboard {
    /// `owner/name` (default: `publish.github.repo`, else `$GITHUB_REPOSITORY`).
    pub repo: Option<String>,
    /// The workflow file name under `.github/workflows/` (default `rlhf.yml`).
    pub workflow: Option<String>,
    /// The branch a dispatched run uses (default: `publish.github.base_branch`, else `main`).
    pub branch: Option<String>,
    /// REST API root (default: `publish.github.api_url`, else `https://api.github.com`).
    pub api_url: Option<String>,
    /// The variable holding a token that may dispatch the workflow (live button instead of link).
    pub dispatch_token_env: Option<String>,
    /// Serve `/dashboard` without the read token.
    pub public: Option<bool>,
    /// Days of KPIs shown (default 90).
    pub kpi_days: Option<super::values::PositiveInt>,
}
