//! `rlhf-bot serve`: reads the service's credentials from their environment variables, opens the
//! database, and serves the feedback API until SIGINT or SIGTERM, finishing the requests in
//! flight (every acknowledged write is already committed).

use std::io::Write as _;

use std::sync::Arc;

use anyhow::Result;

use crate::cli::ServeArgs;
use crate::config::Settings;
use crate::forge::github::SecretToken;
use crate::server::dashboard::{DashboardSource, DeployedReader};

pub async fn serve_cmd(settings: Settings, args: &ServeArgs) -> Result<()> {
    let mut server = settings.server.clone();
    if let Some(listen) = args.listen {
        server.listen = listen;
    }
    let mut generated = Vec::new();
    let mut demo_key = None;
    if args.demo {
        for var in [&server.read_token_env, &server.write_key_env] {
            if std::env::var(var).map_or(true, |v| v.trim().is_empty()) {
                generated.push((var.clone(), random_secret()));
            }
        }
        demo_key = Some(random_secret());
    }
    let env = |name: &str| {
        generated
            .iter()
            .find(|(var, _)| var == name)
            .map(|(_, value)| value.clone())
            .or_else(|| std::env::var(name).ok())
    };
    let dashboard = dashboard_source(&settings, &env)?;
    let state = crate::server::build_state(server, &env, demo_key, Some(dashboard)).await?;
    crate::server::serve(
        state,
        |addr| {
            // Scripts and tests read the bound address from the first line (the port may be 0
            // in the config); it goes to stdout so that logs on stderr stay separate. A reader
            // that closed stdout must not stop the service, so write errors are ignored.
            let mut lines = vec![format!("feedback service listening on http://{addr}")];
            if args.demo {
                lines.push(format!("demo page: http://{addr}/demo"));
                // Demo mode only: the user asked for throw-away credentials and needs the read
                // token to pull what they clicked.
                for (var, value) in &generated {
                    lines.push(format!("generated {var}={value}"));
                }
            }
            let mut out = std::io::stdout().lock();
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
            let _ = out.flush();
        },
        shutdown_signal(),
    )
    .await
}

/// What the live dashboard reads: the same registry, reports and run logs as the bot, and
/// what is deployed from the artifact store.
fn dashboard_source(
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DashboardSource> {
    let d = &settings.dashboard;
    let dispatch_token = match &d.dispatch_token_env {
        Some(var) => match env(var).filter(|v| !v.trim().is_empty()) {
            Some(value) => Some(
                SecretToken::new(value)
                    .map_err(|e| anyhow::anyhow!("dashboard.dispatch_token_env ({var}): {e}"))?,
            ),
            None => {
                tracing::warn!(
                    "{var} (dashboard.dispatch_token_env) is unset: the dashboard links to the workflow page instead of dispatching"
                );
                None
            }
        },
        None => None,
    };
    let for_reader = Arc::new(settings.clone());
    let deployed: DeployedReader = Arc::new(move || {
        let settings = Arc::clone(&for_reader);
        Box::pin(async move { crate::app::deploy::live_best_effort(&settings).await })
    });
    Ok(DashboardSource {
        registry_file: settings.registry.path.clone(),
        reports_dir: settings.report.dir.clone(),
        store_dir: settings.store.dir.clone(),
        settings: d.clone(),
        repository: d.repository(|k| env(k)),
        dispatch_token,
        deployed,
    })
}

/// 32 random bytes as hex, from the thread's OS-seeded generator.
fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
