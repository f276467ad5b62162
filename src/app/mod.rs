//! Orchestration: turns parsed arguments and the validated config into typed requests, runs a
//! stage, and writes its result to stdout (text for people, `--format json` for machines). HTTP
//! and tensor math live in the library modules; this layer only wires them.

mod check;
mod output;
mod pull;
mod store_cmd;
pub mod train_policy;

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
            let outcome = check(&settings, args.force).context("stage check")?;
            check::publish_to_actions(&outcome)?;
            match format {
                Format::Text => output::check_outcome(&outcome, format),
                Format::Json => {
                    output::json(&serde_json::json!({"pull": summary, "check": outcome}))
                }
            }
        }
        Command::Store(cmd) => {
            let settings = load_settings(&cli.config)?;
            store_cmd::run(&settings, cmd, format)
        }
    }
}
