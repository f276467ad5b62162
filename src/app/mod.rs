//! Orchestration: turns parsed arguments and the validated config into typed requests, runs a
//! stage, and writes its result to stdout (text for people, `--format json` for machines). HTTP
//! and tensor math live in the library modules; this layer only wires them.

pub mod baseline;
mod check;
pub mod export_model;
pub mod generate;
mod output;
pub mod pipeline;
pub mod policy;
mod pull;
mod registry_cmd;
mod store_cmd;
pub mod train_policy;
pub mod train_reward;

use std::path::Path;

use anyhow::{Context, Result};
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, ConfigCommand, Format};
use crate::config::{self, ConfigError, Settings};

pub use check::{CheckOutcome, check};
pub use pull::pull;

/// Logs go to stderr; `RUST_LOG` overrides the level the flags choose.
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("rlhf_bot={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// 2 for problems the user fixes in the invocation or config; 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<ConfigError>()) {
        2
    } else {
        1
    }
}

pub fn load_settings(path: &Path) -> Result<Settings> {
    Ok(config::load(path)?)
}

async fn train_reward_cmd(
    settings: &Settings,
    args: crate::cli::TrainRewardArgs,
) -> Result<crate::train::reward_run::RewardRunSummary> {
    let mut opts = settings.reward.clone();
    if let Some(m) = args.model {
        opts.model = Some(m);
    }
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
    if let Some(d) = args.run.device {
        opts.device = d.parse()?;
    }
    opts.resume = args.run.resume;
    opts.production_model = args.production_model;
    let out = args
        .run
        .out
        .unwrap_or_else(|| pipeline::run_dir(settings, &pipeline::new_run_id()).join("reward"));
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

/// The stages after a positive `check`: train the reward model on the store, register it,
/// render the report and publish the pull request. Records the training for the next `check`.
async fn train_and_publish(
    settings: &Settings,
    config_path: &Path,
    dry_run: bool,
    algo: Option<crate::run_outputs::PolicyAlgo>,
) -> Result<RunSummary> {
    let run_id = pipeline::new_run_id();
    let started = check::now()?;
    let reward_dir = pipeline::run_dir(settings, &run_id).join("reward");
    let mut reward_opts = settings.reward.clone();
    let reward_baseline = baseline::resolve(
        settings,
        crate::registry::ModelKind::Reward,
        reward_opts.production_model.as_deref(),
        "nothing (no production reward model is compared)",
        Ok,
    )?;
    reward_opts.production_model = reward_baseline.dir.clone();
    let summary = pipeline::train_reward_from_store(settings, reward_dir.clone(), reward_opts)
        .await
        .context("stage train reward")?;
    reward_baseline.baseline.write(&reward_dir)?;
    let base = settings
        .reward
        .model
        .as_ref()
        .map_or("llama-from-scratch".to_string(), |m| {
            m.display().to_string()
        });
    let policy = if settings.policy.enabled || algo.is_some() {
        let run_dir = pipeline::run_dir(settings, &run_id);
        Some(
            policy::run_policy_stage(
                settings,
                &run_dir,
                policy::PolicyOverrides {
                    algo,
                    reward_model: Some(reward_dir.clone()),
                    // A rerun of the same workflow run (same run id) continues its checkpoints.
                    resume: run_dir.join("policy").join("checkpoints").is_dir(),
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
    let registered =
        pipeline::register(settings, &run_id, (&base, policy_base)).context("stage register")?;
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
    pub reward_eval: crate::run_outputs::RewardEval,
    pub registered: Option<String>,
    pub policy_dir: Option<std::path::PathBuf>,
    pub policy_eval: Option<crate::run_outputs::PolicyEval>,
    pub registered_policy: Option<String>,
    pub report: std::path::PathBuf,
    pub draft: bool,
    pub publish: pipeline::PublishedRun,
    pub registry: std::path::PathBuf,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "run {}:", self.run_id)?;
        writeln!(f, "  reward model   {}", self.reward_dir.display())?;
        if let Some(dir) = &self.policy_dir {
            writeln!(f, "  policy         {}", dir.display())?;
        }
        writeln!(f, "  report         {}", self.report.display())?;
        writeln!(f, "  pull request   {}", self.publish)?;
        write!(
            f,
            "  registry       {} (`rlhf-bot registry show`)",
            self.registry.display()
        )
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let format = cli.format;
    match cli.command {
        Command::Config(ConfigCommand::Check) => {
            let settings = load_settings(&cli.config)?;
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
            let settings = load_settings(&cli.config)?;
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
            match format {
                Format::Json => output::json(
                    &serde_json::json!({"pull": summary, "check": outcome, "run": stages}),
                ),
                Format::Text => {
                    match &stages {
                        Some(s) => println!("{s}"),
                        None => println!("no retraining needed; nothing trained"),
                    }
                    Ok(())
                }
            }
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
        Command::Generate(args) => {
            let out = tokio::task::spawn_blocking(move || generate::generate_cmd(&args))
                .await
                .context("the generation thread panicked")??;
            output::json_or_text(format, &out, &out.completion)
        }
        Command::ExportModel(args) => {
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
                None => pipeline::latest_run(&settings)?,
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
                None => pipeline::latest_run(&settings)?,
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
            let view = registry_cmd::show(&settings)?;
            output::json_or_text(format, &view, view.to_string().trim_end())
        }
        Command::Store(cmd) => {
            let settings = load_settings(&cli.config)?;
            store_cmd::run(&settings, cmd, format)
        }
    }
}
