//! `pull`: builds the source from the settings (reading the token from its variable) and runs
//! the feedback pull into the store.

use std::time::Duration;

use anyhow::Result;

use crate::config::Settings;
use crate::config::settings::SourceSettings;
use crate::feedback::Store;
use crate::feedback::http_source::HttpSourceOptions;
use crate::feedback::pull::{PullSummary, SourceSpec, pull as run_pull};
use crate::forge::actions::ActionsEnv;
use crate::secret::SecretString;

pub async fn pull(settings: &Settings) -> Result<PullSummary> {
    let source = match &settings.feedback.source {
        SourceSettings::File { path } => SourceSpec::File {
            path: path.clone(),
            page_size: settings.feedback.page_size as usize,
        },
        SourceSettings::Http {
            url,
            token_env,
            timeout_secs,
            max_attempts,
            max_page_bytes,
        } => {
            let token = SecretString::from_env(token_env, "feedback API")?;
            ActionsEnv::from_env().mask(token.expose());
            SourceSpec::Http(HttpSourceOptions {
                base_url: url.clone(),
                token: Some(token),
                page_size: settings.feedback.page_size,
                timeout: Duration::from_secs(*timeout_secs),
                max_attempts: *max_attempts,
                backoff_base: Duration::from_millis(backoff_base_ms()),
                backoff_max: Duration::from_secs(30),
                max_retry_after: Duration::from_secs(300),
                max_page_bytes: *max_page_bytes,
            })
        }
    };
    let store = Store::open(&settings.store.dir)?;
    run_pull(store, &source).await
}

/// Tests shorten the backoff with `RLHF_BOT_BACKOFF_MS`; the default suits real APIs.
pub(crate) fn backoff_base_ms() -> u64 {
    std::env::var("RLHF_BOT_BACKOFF_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}
