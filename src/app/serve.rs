//! `rlhf-bot serve`: reads the service's credentials from their environment variables, opens the
//! database, and serves the feedback API until SIGINT or SIGTERM, finishing the requests in
//! flight (every acknowledged write is already committed).

use anyhow::Result;

use crate::cli::ServeArgs;
use crate::config::Settings;

pub async fn serve_cmd(settings: Settings, args: &ServeArgs) -> Result<()> {
    let mut server = settings.server;
    if let Some(listen) = args.listen {
        server.listen = listen;
    }
    let state = crate::server::build_state(server, &|name| std::env::var(name).ok())?;
    crate::server::serve(
        state,
        |addr| {
            // Scripts and tests read the bound address from this line (the port may be 0 in the
            // config); it goes to stdout so that logs on stderr stay separate.
            println!("feedback service listening on http://{addr}");
        },
        shutdown_signal(),
    )
    .await
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
