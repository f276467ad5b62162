//! Orchestration: turns parsed arguments and the validated config into typed requests, runs a
//! stage, and writes its result to stdout (text for people, `--format json` for machines). HTTP
//! and tensor math live in the library modules; this layer only wires them.

pub mod baseline;
pub mod bucket_cmd;
mod check;
mod constitution;
mod dashboard;
pub mod deploy;
pub mod export_model;
pub mod generate;
mod judge;
pub mod model_dir;
pub mod model_source;
mod output;
pub mod pipeline;
pub mod policy;
mod pull;
pub mod ray_policy;
pub mod ray_stage;
mod registry_cmd;
mod rlaif;
mod serve;
mod store_cmd;
pub mod train_policy;
pub mod train_reward;

use std::path::Path;

use anyhow::{Context, Result};
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, ConfigCommand, Format};
use crate::config::{self, ConfigError, Settings};
use crate::hub::HubModelRef;

pub use check::{CheckOutcome, check};
pub use pull::pull;

/// Logs go to stderr; `RUST_LOG` overrides the level the flags choose. Every log line passes
/// through [`crate::sanitize::log_block`], so a value logged from a feedback record or an API
/// answer cannot move the cursor, hide text or start a workflow command on the runner.
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("rlhf_bot={level},warn")));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || SanitizedStderr { colours })
        .with_ansi(colours)
        .with_target(false)
        .try_init();
}

/// stderr for the logger. The formatter hands over one whole event per `write` call (it formats
/// into a buffer first), so each call can be sanitised as a unit.
struct SanitizedStderr {
    colours: bool,
}

impl std::io::Write for SanitizedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let clean = crate::sanitize::log_block(&text, self.colours);
        std::io::Write::write_all(&mut std::io::stderr().lock(), clean.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut std::io::stderr())
    }
}

/// 2 for problems the user fixes in the invocation or config; 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<ConfigError>()) {
        2
    } else {
        1
    }
}

/// Loads the config and, inside Actions, masks the secrets it names before any command prints
/// anything, so no later line (ours or data's) can show them.
pub fn load_settings(path: &Path) -> Result<Settings> {
    let settings = config::load(path)?;
    mask_secrets(&settings);
    Ok(settings)
}

/// `::add-mask::` for the value of every token variable the config names and the environment
/// sets. The stages mask again where they read a token; masking twice is harmless.
fn mask_secrets(settings: &Settings) {
    let env = crate::forge::actions::ActionsEnv::from_env();
    if !env.in_actions {
        return;
    }
    let mut vars = Vec::new();
    if let config::settings::SourceSettings::Http { token_env, .. } = &settings.feedback.source {
        vars.push(token_env.as_str());
    }
    if let Some(github) = &settings.publish.github {
        vars.push(github.token_env.as_str());
    }
    if let Some(webhook) = &settings.deploy.webhook {
        vars.push(webhook.secret_env.as_str());
    }
    if let Some(dispatch) = &settings.deploy.repository_dispatch {
        vars.push(dispatch.token_env.as_str());
    }
    if let crate::train::ray::TrainBackend::Ray(ray) = &settings.train
        && let Some(token_env) = &ray.token_env
    {
        vars.push(token_env.as_str());
    }
    // The Hub token `hf://` models may be fetched with (crate::hub::env).
    vars.push("HF_TOKEN");
    if let Some(var) = settings
        .evals
        .judge
        .as_ref()
        .and_then(|j| j.api_key_env.as_deref())
    {
        vars.push(var);
    }
    for var in vars {
        if let Ok(value) = std::env::var(var) {
            env.mask(value.trim());
        }
    }
}

/// `train reward|policy` always trains on this machine: only `run` hands a stage to the
/// cluster (it owns the run id the jobs are named by).
fn warn_trains_here(settings: &Settings, stage: &str) {
    if matches!(settings.train, crate::train::ray::TrainBackend::Ray(_)) {
        tracing::warn!(
            "train.backend is ray, but `train {stage}` trains on this machine; `rlhf-bot run` submits to the cluster"
        );
    }
}

async fn train_reward_cmd(
    settings: &Settings,
    args: crate::cli::TrainRewardArgs,
) -> Result<crate::train::reward_run::RewardRunSummary> {
    warn_trains_here(settings, "reward");
    let mut opts = settings.reward.clone();
    // `hf://` references become local snapshot directories before the stage reads them.
    opts.model = model_source::localize_opt(args.model.or(opts.model)).await?;
    if let Some(v) = args.epochs {
        opts.train.epochs = v;
    }
    if let Some(v) = args.max_length {
        opts.train.max_length = v;
    }
    if let Some(v) = args.batch_size {
        opts.train.batch_size = v;
    }
    if let Some(v) = args.lr {
        opts.train.lr = v;
    }
    if let Some(v) = args.eval_every {
        opts.train.eval_every = v;
    }
    if let Some(d) = args.run.device {
        opts.device = d.choice();
    }
    opts.resume = args.run.resume;
    opts.production_model = model_source::localize_opt(args.production_model).await?;
    let out = args.run.out.unwrap_or_else(|| {
        crate::run::run_dir(&settings.store.dir, &crate::run::new_run_id()).join("reward")
    });
    match args.dataset {
        Some(dataset) => {
            opts.dataset = Some(dataset);
            opts.eval = args.eval;
            opts.out = out;
            crate::app::train_reward::train_reward(opts).await
        }
        None => pipeline::train_reward_from_store(settings, out, opts).await,
    }
}

/// The settings with every configured model made local (`hf://` references downloaded into the
/// Hub cache), failing before any training when one is missing, naming the key and (for the
/// models directory) the script that fills it; otherwise a newcomer would wait through the
/// reward model before the policy's absence surfaced.
async fn local_models(settings: &Settings, policy_runs: bool) -> Result<Settings> {
    let mut local = settings.clone();
    let mut wanted = vec![("reward.model", &mut local.reward.model)];
    if policy_runs {
        wanted.push(("policy.model", &mut local.policy.model));
        wanted.push((
            "policy.production_model",
            &mut local.policy.production_model,
        ));
    }
    for (key, slot) in wanted {
        let Some(path) = slot.take() else { continue };
        let path = model_source::localize(&path)
            .await
            .with_context(|| format!("{key}: {}", path.display()))?;
        if !path.exists() {
            anyhow::bail!(
                "{key}: model {} does not exist\nhint: {}",
                path.display(),
                config::models::missing_hint(&path)
            );
        }
        *slot = Some(path);
    }
    Ok(local)
}

/// The stages after a positive `check`: train the reward model on the store, register it,
/// render the report and publish the pull request. Records the training for the next `check`.
async fn train_and_publish(
    settings: &Settings,
    config_path: &Path,
    dry_run: bool,
    algo: Option<crate::run::outputs::PolicyAlgo>,
) -> Result<RunSummary> {
    let policy_runs = settings.policy.enabled || algo.is_some();
    // What the cluster loads is the model as the config names it (a Hub model is fetched here
    // too, below, for the evaluation).
    let configured_policy_model = settings
        .policy
        .model
        .as_ref()
        .map(|m| m.display().to_string());
    let settings = &local_models(settings, policy_runs).await?;
    let run_id = crate::run::new_run_id();
    let started = check::now()?;
    let reward_dir = crate::run::run_dir(&settings.store.dir, &run_id).join("reward");
    let mut reward_opts = settings.reward.clone();
    let reward_baseline = baseline::resolve(
        settings,
        crate::registry::ModelKind::Reward,
        reward_opts.production_model.as_deref(),
        "no other model",
        Ok,
    )?;
    reward_opts.production_model = reward_baseline.dir.clone();
    let summary = match &settings.train {
        crate::train::ray::TrainBackend::Local => {
            pipeline::train_reward_from_store(settings, reward_dir.clone(), reward_opts).await
        }
        crate::train::ray::TrainBackend::Ray(ray) => {
            ray_stage::train_reward_on_ray(settings, ray, &run_id, reward_dir.clone(), reward_opts)
                .await
        }
    }
    .context("stage train reward")?;
    reward_baseline.baseline.write(&reward_dir)?;
    let base = settings
        .reward
        .model
        .as_ref()
        .map_or("llama-from-scratch".to_string(), |m| {
            m.display().to_string()
        });
    let policy = if policy_runs {
        let run_dir = crate::run::run_dir(&settings.store.dir, &run_id);
        Some(
            policy::run_policy_stage(
                settings,
                &run_dir,
                policy::PolicyOverrides {
                    algo,
                    reward_model: Some(reward_dir.clone()),
                    // A rerun of the same workflow run (same run id) continues its checkpoints.
                    resume: run_dir.join("policy").join("checkpoints").is_dir(),
                    cluster: match &settings.train {
                        crate::train::ray::TrainBackend::Local => None,
                        crate::train::ray::TrainBackend::Ray(ray) => {
                            Some(ray_policy::ClusterPolicy {
                                ray: ray.as_ref().clone(),
                                run_id: run_id.clone(),
                                base_model: configured_policy_model,
                                config_path: config_path.to_path_buf(),
                            })
                        }
                    },
                    ..Default::default()
                },
            )
            .await
            .context("stage train policy")?,
        )
    } else {
        None
    };
    let policy_base = policy.as_ref().map_or("", |p| p.base_model.as_str());
    let registered = pipeline::register(
        settings,
        &run_id,
        (&base, policy_base),
        policy.as_ref().map(|p| p.data.as_path()),
    )
    .context("stage register")?;
    let (report_dir, body, draft) =
        pipeline::build_report(settings, &run_id, config_path).context("stage report")?;
    let published = pipeline::publish_run(settings, &run_id, body, draft, dry_run)
        .await
        .context("stage publish")?;
    let store = crate::feedback::Store::open(&settings.store.dir)?;
    let previous = store.last_training()?;
    store.set_last_training(&crate::feedback::store::LastTraining {
        at: started,
        watermark: store.watermark()?,
        production_version: previous.as_ref().and_then(|p| p.production_version.clone()),
        promoted_at: previous.and_then(|p| p.promoted_at),
    })?;
    crate::constitution::record_principles(&store, &settings.constitution)?;
    Ok(RunSummary {
        run_id,
        reward_dir: summary.out,
        reward_eval: summary.metrics.eval,
        registered: registered.reward.map(|e| e.id),
        policy_dir: policy.as_ref().map(|p| p.run.out_dir.clone()),
        policy_eval: policy.as_ref().map(|p| p.run.metrics.eval.clone()),
        registered_policy: registered.policy.map(|e| e.id),
        report: report_dir.join("report.md"),
        draft,
        publish: published,
        registry: settings.registry.path.clone(),
    })
}

/// What `run` trained, registered, reported and published (`--format json`: these keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub reward_dir: std::path::PathBuf,
    pub reward_eval: crate::run::outputs::RewardEval,
    pub registered: Option<String>,
    pub policy_dir: Option<std::path::PathBuf>,
    pub policy_eval: Option<crate::run::outputs::PolicyEval>,
    pub registered_policy: Option<String>,
    pub report: std::path::PathBuf,
    pub draft: bool,
    pub publish: pipeline::PublishedRun,
    pub registry: std::path::PathBuf,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {}: reward model in {}",
            self.run_id,
            self.reward_dir.display()
        )?;
        if let Some(dir) = &self.policy_dir {
            write!(f, ", policy in {}", dir.display())?;
        }
        writeln!(f)?;
        writeln!(f, "where to look:")?;
        writeln!(
            f,
            "  report        {} (plots and metrics.json beside it)",
            self.report.display()
        )?;
        let p = &self.publish;
        let draft = if p.draft { "draft" } else { "ready for review" };
        match (&p.local_dir, &p.pr_url) {
            (Some(dir), _) => writeln!(
                f,
                "  pull request  {} ({draft}; body.md: the description, with sample answers; files/: what the commit adds)",
                dir.display()
            )?,
            (None, Some(url)) => writeln!(f, "  pull request  {url} ({draft})")?,
            (None, None) => writeln!(f, "  pull request  {}", p)?,
        }
        write!(f, "  registry      {}", self.registry.display())
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let format = cli.format;
    match cli.command {
        Command::Config(ConfigCommand::Check) => {
            let settings = load_settings(&cli.config)?;
            // The behaviour tests are part of what a config change can break.
            crate::evals::load_checked(&settings.evals)?;
            // So are the principles, when the team keeps a file (a pull request may edit it).
            if settings.constitution.principles.is_file() {
                crate::constitution::principles::load(&settings.constitution.principles)?;
            }
            output::config_check(&cli.config, &settings, format)
        }
        Command::Pull => {
            let settings = load_settings(&cli.config)?;
            let summary = pull(&settings).await?;
            output::pull_summary(&summary, format)
        }
        Command::Check(args) => {
            let settings = load_settings(&cli.config)?;
            pipeline::reconcile_proposals(&settings).await?;
            let outcome = check(&settings, args.force)?;
            check::publish_to_actions(&outcome)?;
            output::check_outcome(&outcome, format)
        }
        Command::Run(args) => {
            let mut settings = load_settings(&cli.config)?;
            if let Some(d) = args.device {
                settings.reward.device = d.choice();
                settings.policy.device = d.choice();
            }
            let summary = pull(&settings).await.context("stage pull")?;
            if format == Format::Text {
                output::pull_summary(&summary, format)?;
            }
            pipeline::reconcile_proposals(&settings).await?;
            let outcome = check(&settings, args.force).context("stage check")?;
            check::publish_to_actions(&outcome)?;
            if format == Format::Text {
                output::check_outcome(&outcome, format)?;
            }
            let stages = if outcome.retrain {
                Some(
                    train_and_publish(
                        &settings,
                        &cli.config,
                        args.dry_run,
                        args.algo.map(policy::algo_of),
                    )
                    .await?,
                )
            } else {
                None
            };
            let text = match &stages {
                Some(s) => s.to_string(),
                None => "no retraining needed; nothing trained".to_owned(),
            };
            output::json_or_text(
                format,
                &serde_json::json!({"pull": summary, "check": outcome, "run": stages}),
                &text,
            )
        }
        Command::Train(crate::cli::TrainCommand::Reward(args)) => {
            let settings = load_settings(&cli.config)?;
            let summary = train_reward_cmd(&settings, args).await?;
            output::json_or_text(
                format,
                &summary,
                &format!(
                    "reward model written to {} (eval accuracy {:.3} on {} pairs)",
                    summary.out.display(),
                    summary.metrics.eval.accuracy,
                    summary.metrics.eval.n
                ),
            )
        }
        Command::Train(crate::cli::TrainCommand::Policy(args)) => {
            let settings = load_settings(&cli.config)?;
            warn_trains_here(&settings, "policy");
            let summary = policy::train_policy_cmd(&settings, args).await?;
            let e = &summary.run.metrics.eval;
            output::json_or_text(
                format,
                &summary,
                &format!(
                    "{} policy written to {} (win rate {:.3} [{:.3}, {:.3}] over {} prompts, mean reward {:.3}, KL {:.3})",
                    summary.algo.as_str(),
                    summary.run.out_dir.display(),
                    e.win_rate,
                    e.win_rate_low,
                    e.win_rate_high,
                    e.n,
                    e.mean_reward,
                    e.kl
                ),
            )
        }
        Command::Generate(mut args) => {
            args.model = model_source::localize(&args.model).await?;
            let out = tokio::task::spawn_blocking(move || generate::generate_cmd(&args))
                .await
                .context("the generation thread panicked")??;
            output::json_or_text(format, &out, &out.completion)
        }
        Command::ExportModel(mut args) => {
            if HubModelRef::from_value(&args.model).is_some() {
                let local = model_source::localize(Path::new(&args.model)).await?;
                args.model = local.display().to_string();
            }
            // A directory exports without a config; a registry id needs one.
            let settings = if cli.config.is_file() {
                Some(load_settings(&cli.config)?)
            } else {
                None
            };
            let summary = tokio::task::spawn_blocking(move || {
                export_model::export_model_cmd(settings.as_ref(), &args)
            })
            .await
            .context("the export thread panicked")??;
            output::json_or_text(
                format,
                &summary,
                &format!(
                    "{} {} model written to {}",
                    summary.format,
                    summary.kind,
                    summary.out.display()
                ),
            )
        }
        Command::Deploy(args) => {
            let settings = load_settings(&cli.config)?;
            deploy::deploy_cmd(&settings, &args, |report| {
                output::json_or_text(format, report, &report.to_string())
            })
            .await
        }
        Command::Serve(args) => {
            let settings = load_settings(&cli.config)?;
            serve::serve_cmd(settings, &args).await
        }
        Command::Bucket(command) => {
            let copied = match command {
                crate::cli::BucketCommand::Get { uri, dir } => bucket_cmd::get(&uri, &dir)?,
                crate::cli::BucketCommand::Put { dir, uri } => bucket_cmd::put(&dir, &uri)?,
            };
            output::json_or_text(format, &copied, &copied.to_string())
        }
        Command::Dashboard(args) => {
            let settings = load_settings(&cli.config)?;
            let summary = dashboard::dashboard_cmd(&settings, &args).await?;
            output::json_or_text(format, &summary, &summary.to_string())
        }
        Command::Constitution { limit, out } => {
            let settings = load_settings(&cli.config)?;
            let summary =
                constitution::constitution_cmd(&settings, limit.map(|n| n as usize), out).await?;
            output::json_or_text(format, &summary, &summary.to_string())
        }
        Command::Rlaif { max_pairs, out } => {
            let settings = load_settings(&cli.config)?;
            let summary = rlaif::rlaif_cmd(&settings, max_pairs.map(|n| n as usize), out).await?;
            output::json_or_text(format, &summary, &summary.to_string())
        }
        Command::Export { out } => {
            let settings = load_settings(&cli.config)?;
            let store = crate::feedback::Store::open(&settings.store.dir)?;
            let dataset = crate::dataset::build_from_store(&store, &settings.dataset)?;
            let summary = crate::dataset::export(&dataset, &out)?;
            output::json_or_text(
                format,
                &summary,
                &format!("dataset written to {}", out.display()),
            )
        }
        Command::Report(select) => {
            let settings = load_settings(&cli.config)?;
            let run_id = match select.run {
                Some(id) => id,
                None => crate::run::latest_run(&settings.store.dir)?,
            };
            let (dir, _, draft) = pipeline::build_report(&settings, &run_id, &cli.config)?;
            output::json_or_text(
                format,
                &serde_json::json!({"run": run_id, "report": dir.join("report.md"), "draft": draft}),
                &format!("report written to {}", dir.join("report.md").display()),
            )
        }
        Command::Publish(args) => {
            let settings = load_settings(&cli.config)?;
            let run_id = match args.select.run {
                Some(id) => id,
                None => crate::run::latest_run(&settings.store.dir)?,
            };
            let (_, body, draft) = pipeline::build_report(&settings, &run_id, &cli.config)?;
            let outcome =
                pipeline::publish_run(&settings, &run_id, body, draft, args.dry_run).await?;
            output::json_or_text(
                format,
                &outcome,
                &format!("published run {run_id}: {outcome}"),
            )
        }
        Command::Promote { id } => {
            let settings = load_settings(&cli.config)?;
            let change = registry_cmd::promote(&settings, &id)?;
            output::json_or_text(format, &change, &change.to_string())
        }
        Command::Rollback { kind } => {
            let settings = load_settings(&cli.config)?;
            let change = registry_cmd::rollback(&settings, kind)?;
            output::json_or_text(format, &change, &change.to_string())
        }
        Command::Registry(crate::cli::RegistryCommand::Show) => {
            let settings = load_settings(&cli.config)?;
            let view = registry_cmd::show(&settings).await?;
            output::json_or_text(format, &view, view.to_string().trim_end())
        }
        Command::Store(cmd) => {
            let settings = load_settings(&cli.config)?;
            store_cmd::run(&settings, cmd, format)
        }
    }
}
