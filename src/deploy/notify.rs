//! Telling serving that a model went live: a signed webhook and/or a `repository_dispatch` to
//! another repository.
//!
//! The webhook contract (docs/serving.md): `POST` of a JSON body, `Content-Type:
//! application/json`, `X-Rlhf-Bot-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`
//! with the secret from the configured environment variable, `X-Rlhf-Bot-Event: deployed`, and
//! `Idempotency-Key: <registry id>@<deployed_at>`: retries of one deployment (in this run or
//! the next) share the key, while a rollback to an earlier id is a new deployment with a new key.
//! 5xx, 429 and transport errors are retried with doubling waits; any other non-2xx fails at once,
//! since sending the same body again cannot change the answer.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::deploy::settings::{DispatchSettings, WebhookSettings};
use crate::forge::github::{GithubClient, GithubTarget, RetryPolicy, SecretToken};
use crate::sanitize::{error_body_excerpt, redact_url};
use crate::secret::SecretString;

pub const SIGNATURE_HEADER: &str = "X-Rlhf-Bot-Signature";
pub const EVENT_HEADER: &str = "X-Rlhf-Bot-Event";
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`, as the signature header carries it.
pub fn signature(secret: &SecretString, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "the deploy webhook {url} answered {status} after {attempts} attempt(s): {body}\nhint: {hint}"
    )]
    Status {
        url: String,
        status: u16,
        attempts: u32,
        body: String,
        hint: &'static str,
    },
    #[error(
        "could not reach the deploy webhook {url} after {attempts} attempt(s): {message}\nhint: check deploy.webhook.url and that the receiver is up; the next `rlhf-bot deploy` retries"
    )]
    Transport {
        url: String,
        attempts: u32,
        message: String,
    },
    #[error("repository_dispatch to {repo} failed: {source}")]
    Dispatch {
        repo: String,
        #[source]
        source: crate::forge::GithubError,
    },
    #[error("{0}")]
    Setup(String),
}

/// The URL as errors and logs show it: no user-info, query or fragment, where receivers (chat
/// tools' incoming webhooks) often carry a token.
fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Sends the webhook, retrying 5xx, 429 and transport errors up to `settings.max_attempts`
/// times with waits doubling from `backoff`. Returns the attempts it took.
pub async fn send_webhook(
    settings: &WebhookSettings,
    secret: &SecretString,
    body: &[u8],
    idempotency_key: &str,
    backoff: Duration,
) -> Result<u32, NotifyError> {
    let shown = shown_url(&settings.url);
    let client = reqwest::Client::builder()
        .timeout(settings.timeout())
        .user_agent(concat!("rlhf-bot/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| NotifyError::Setup(format!("cannot build the webhook client: {e}")))?;
    let signed = signature(secret, body);
    let max = settings.max_attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = client
            .post(settings.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, &signed)
            .header(EVENT_HEADER, "deployed")
            .header(IDEMPOTENCY_HEADER, idempotency_key)
            .body(body.to_vec())
            .send()
            .await;
        let (retryable, error) = match sent {
            Ok(response) if response.status().is_success() => return Ok(attempt),
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                let retryable = status >= 500 || status == 429;
                let hint = match status {
                    401 | 403 => {
                        "the receiver refused the signature: check that it uses the secret in the variable deploy.webhook.secret_env names"
                    }
                    _ if retryable => {
                        "the receiver failed; the deployment record says incomplete and the next `rlhf-bot deploy` retries the notification"
                    }
                    _ => "the receiver refused the payload; see its answer above",
                };
                let error = NotifyError::Status {
                    url: shown.clone(),
                    status,
                    attempts: attempt,
                    body: error_body_excerpt(&text, &[secret.expose()]),
                    hint,
                };
                (retryable, error)
            }
            Err(e) => (
                true,
                NotifyError::Transport {
                    url: shown.clone(),
                    attempts: attempt,
                    // reqwest's message names the URL it was given: keep credentials out.
                    message: redact_url(&e.without_url().to_string()),
                },
            ),
        };
        if !retryable || attempt >= max {
            return Err(error);
        }
        let wait = backoff.saturating_mul(1u32 << (attempt - 1).min(16));
        tracing::warn!(
            "{error}; retrying in {:.1}s (attempt {}/{max})",
            wait.as_secs_f64(),
            attempt + 1
        );
        tokio::time::sleep(wait).await;
    }
}

/// Sends `POST /repos/{owner}/{repo}/dispatches` through the GitHub client. A dispatch starts
/// workflows, so it is not resent after an ambiguous failure (GitHub's `send_create` rule); the
/// record stays incomplete and the next `deploy` sends it again.
pub async fn send_dispatch(
    settings: &DispatchSettings,
    token: SecretToken,
    client_payload: serde_json::Value,
    policy: RetryPolicy,
) -> Result<(), NotifyError> {
    let repo = format!("{}/{}", settings.owner, settings.repo);
    let target = GithubTarget {
        api_url: settings.api_url.clone(),
        owner: settings.owner.clone(),
        repo: settings.repo.clone(),
        base_branch: "main".into(),
        token,
    };
    let wrap = |source| NotifyError::Dispatch {
        repo: repo.clone(),
        source,
    };
    let client = GithubClient::new(&target, policy).map_err(wrap)?;
    let body = serde_json::json!({
        "event_type": settings.event_type,
        "client_payload": client_payload,
    });
    client
        .send_create(&client.repo_path("/dispatches"), &body)
        .await
        .map_err(wrap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_drop_credentials_and_queries() {
        let url = url::Url::parse("https://u:p@hooks.example.com/x/y?token=abc#f").unwrap();
        assert_eq!(shown_url(&url), "https://hooks.example.com/x/y");
    }

    #[test]
    fn signature_is_the_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let s = signature(&SecretString::new("Jefe"), b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
