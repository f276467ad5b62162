//! The GitHub REST client: who we talk to (`GithubTarget`), with which secret (`SecretToken`),
//! and how a request survives GitHub's bad moments (`RetryPolicy`). It wraps octocrab for the
//! transport (base URL, auth header, timeouts) but sends raw requests and reads status and headers
//! itself, because the retry rules need `retry-after` and `x-ratelimit-*`, which octocrab's typed
//! calls throw away, and because every error must keep the status and body GitHub sent.
//! The token is read once, masked in Actions logs and never printed: `SecretToken` shows `***`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use octocrab::Octocrab;
use serde::de::DeserializeOwned;

use crate::sanitize::{error_body_excerpt, redact_secrets};
use crate::secret::SecretString;

/// Where GitHub.com's REST API lives; GitHub Enterprise Server uses `https://HOST/api/v3`.
pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// A GitHub token. It never prints: it is a [`SecretString`], whose `Debug` and `Display` show
/// `***`, so a token cannot leak through a log line or an error chain. The wrapper adds what
/// GitHub needs: a blank value is refused, and a missing variable is a typed [`TokenError`] with
/// a hint about workflow secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(SecretString);

/// Why no usable token was found; raised before any network call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "the environment variable `{var}` holding the GitHub token is not set\nhint: export {var}=<token> (in a workflow: `env: {var}: ${{{{ secrets.{var} }}}}`)"
    )]
    Missing { var: String },
    #[error(
        "the environment variable `{var}` holding the GitHub token is empty\nhint: check that the secret behind `{var}` exists in this repository (secrets of forks are not passed to pull_request runs)"
    )]
    Empty { var: String },
    #[error("the environment variable `{var}` holding the GitHub token is not valid UTF-8")]
    NotUnicode { var: String },
    #[error("the GitHub token is empty\nhint: pass a non-empty token")]
    EmptyValue,
}

impl SecretToken {
    /// Wraps a token value; an empty or blank value is refused.
    pub fn new(value: impl Into<String>) -> Result<Self, TokenError> {
        let value = value.into();
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(TokenError::EmptyValue);
        }
        Ok(Self(SecretString::new(trimmed)))
    }

    /// Reads the token from the environment variable `var`; the error names the variable.
    pub fn from_env(var: &str) -> Result<Self, TokenError> {
        match std::env::var(var) {
            Ok(value) if value.trim().is_empty() => Err(TokenError::Empty {
                var: var.to_owned(),
            }),
            Ok(value) => Self::new(value).map_err(|_| TokenError::Empty {
                var: var.to_owned(),
            }),
            Err(std::env::VarError::NotPresent) => Err(TokenError::Missing {
                var: var.to_owned(),
            }),
            Err(std::env::VarError::NotUnicode(_)) => Err(TokenError::NotUnicode {
                var: var.to_owned(),
            }),
        }
    }

    /// The raw value, for the auth header and for `::add-mask::` only.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The repository a pull request goes to, and the credentials to get there.
#[derive(Debug, Clone)]
pub struct GithubTarget {
    /// REST API root: `https://api.github.com`, or `https://HOST/api/v3` for GHE.
    pub api_url: String,
    pub owner: String,
    pub repo: String,
    /// The branch pull requests target (e.g. `main`).
    pub base_branch: String,
    pub token: SecretToken,
}

impl GithubTarget {
    /// A target on github.com.
    pub fn new(
        owner: impl Into<String>,
        repo: impl Into<String>,
        base_branch: impl Into<String>,
        token: SecretToken,
    ) -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            owner: owner.into(),
            repo: repo.into(),
            base_branch: base_branch.into(),
            token,
        }
    }

    /// Checks the fields that would otherwise produce a confusing 404 from GitHub.
    pub fn validate(&self) -> Result<(), GithubError> {
        let bad = |what: &str, value: &str, hint: &str| {
            Err(GithubError::Config(format!(
                "{what} `{value}` is not valid\nhint: {hint}"
            )))
        };
        for (what, value) in [("owner", &self.owner), ("repo", &self.repo)] {
            if value.is_empty() || value.contains('/') || value.chars().any(char::is_whitespace) {
                return bad(
                    what,
                    value,
                    "give owner and repo separately, e.g. owner `acme`, repo `assistant`",
                );
            }
        }
        if !valid_branch_name(&self.base_branch) {
            return bad(
                "base branch",
                &self.base_branch,
                "name an existing branch, e.g. `main`",
            );
        }
        if !(self.api_url.starts_with("https://") || self.api_url.starts_with("http://")) {
            return bad(
                "api_url",
                &self.api_url,
                "use https://api.github.com or https://HOST/api/v3 for GitHub Enterprise",
            );
        }
        Ok(())
    }
}

/// A branch name git and GitHub accept (the subset of `git check-ref-format` rules that matter).
pub fn valid_branch_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.ends_with('.')
        && !name.ends_with(".lock")
        && !name.starts_with('-')
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("@{")
        && !name.split('/').any(|part| part.starts_with('.'))
        && !name
            .chars()
            .any(|c| c.is_control() || " ~^:?*[\\".contains(c))
}

/// Percent-encodes one URL path segment. Git refs hold `/`, and GitHub (and its OpenAPI
/// description) treat `{ref}` as a single segment, so `heads/a/b` travels as `heads%2Fa%2Fb`.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Everything that can go wrong talking to GitHub. `Status` keeps what GitHub said, so callers
/// can branch on it (404: absent, 422: already exists) and users can read it.
#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("GitHub answered {status} to {method} {path} (after {attempts} attempt(s)): {}{}", summarize_body(.body), status_hint(*.status))]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
        attempts: u32,
    },
    #[error(
        "could not reach GitHub for {method} {path} (after {attempts} attempt(s)): {message}\nhint: check the api_url and the network of the runner"
    )]
    Transport {
        method: &'static str,
        path: String,
        message: String,
        attempts: u32,
    },
    #[error("GitHub's rate limit asks to wait {}s before {method} {path}, more than the {}s this run may wait\nhint: run again later, or use a GitHub App token (it has its own, higher limit)", .wait.as_secs(), .max_wait.as_secs())]
    RateLimitTooLong {
        method: &'static str,
        path: String,
        wait: Duration,
        max_wait: Duration,
    },
    #[error("GitHub sent an answer to {method} {path} that does not parse: {message}")]
    Decode {
        method: &'static str,
        path: String,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

impl GithubError {
    /// The HTTP status GitHub answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The body GitHub answered with, when it answered.
    pub fn body(&self) -> Option<&str> {
        match self {
            Self::Status { body, .. } => Some(body),
            _ => None,
        }
    }

    /// True when a request may or may not have been carried out: the connection failed or timed
    /// out, or GitHub answered 5xx. A create that fails this way must be looked up, not resent.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => (500..600).contains(status),
            _ => false,
        }
    }

    /// True for GitHub's "this already exists" answers: 409, or 422 whose message says so
    /// ("Reference already exists", "A pull request already exists for …").
    pub fn is_already_exists(&self) -> bool {
        match self {
            Self::Status { status: 409, .. } => true,
            Self::Status {
                status: 422, body, ..
            } => body.to_ascii_lowercase().contains("already exists"),
            _ => false,
        }
    }
}

fn summarize_body(body: &str) -> String {
    // GitHub's error bodies are JSON with `message` (and maybe `errors`); show those, else the
    // raw text. Either way as one sanitised, redacted, bounded line: a proxy or a GitHub
    // Enterprise front end may answer with anything, including our own Authorization header.
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(body) {
        let message = value.get("message").and_then(|m| m.as_str()).unwrap_or("");
        let errors = value
            .get("errors")
            .map(|e| e.to_string())
            .unwrap_or_default();
        let text = format!("{message} {errors}");
        if !text.trim().is_empty() {
            return error_body_excerpt(&text, &[]);
        }
    }
    error_body_excerpt(body, &[])
}

fn status_hint(status: u16) -> &'static str {
    match status {
        401 => "\nhint: the token is invalid or expired",
        403 => {
            "\nhint: the token lacks a permission: it needs contents: write and pull-requests: write"
        }
        404 => {
            "\nhint: check owner, repo and branch names, and that the token can see the repository"
        }
        _ => "",
    }
}

/// Sleeps between attempts. Injectable so tests can check the waits without waiting.
pub trait Sleeper: Send + Sync {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A sleeper that records every requested wait and returns at once (for tests and dry runs).
#[derive(Debug, Clone, Default)]
pub struct RecordingSleeper {
    waits: Arc<Mutex<Vec<Duration>>>,
}

impl RecordingSleeper {
    pub fn waits(&self) -> Vec<Duration> {
        self.waits.lock().map(|w| w.clone()).unwrap_or_default()
    }
}

impl Sleeper for RecordingSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        if let Ok(mut waits) = self.waits.lock() {
            waits.push(duration);
        }
        Box::pin(std::future::ready(()))
    }
}

/// How hard to try. Defaults follow GitHub's guidance: honour `retry-after`, else
/// `x-ratelimit-reset` when no requests remain, else wait at least a minute; back off
/// exponentially on 5xx and transport errors.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First wait after a 5xx or a transport error; doubles each time.
    pub server_error_backoff: Duration,
    /// Wait after a secondary rate limit that names no time.
    pub secondary_min_wait: Duration,
    /// Longest single wait; a rate limit asking for more fails at once instead of hanging CI.
    pub max_wait: Duration,
    /// How long one request may wait for GitHub to send or accept data.
    pub timeout: Duration,
    pub sleeper: Arc<dyn Sleeper>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("server_error_backoff", &self.server_error_backoff)
            .field("secondary_min_wait", &self.secondary_min_wait)
            .field("max_wait", &self.max_wait)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            server_error_backoff: Duration::from_secs(2),
            secondary_min_wait: Duration::from_secs(60),
            max_wait: Duration::from_secs(15 * 60),
            timeout: Duration::from_secs(60),
            sleeper: Arc::new(TokioSleeper),
        }
    }
}

impl RetryPolicy {
    /// The same rules with a different clock.
    pub fn with_sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }
}

/// The HTTP methods the publisher uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Patch,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Patch => "PATCH",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

/// A successful answer: status and body text.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
    method: &'static str,
    path: String,
}

impl ApiResponse {
    /// Parses the body; a mismatch becomes `GithubError::Decode` naming the request.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, GithubError> {
        serde_json::from_str(&self.body).map_err(|e| GithubError::Decode {
            method: self.method,
            path: self.path.clone(),
            message: format!(
                "{e}; body starts with: {}",
                error_body_excerpt(&self.body, &[])
            ),
        })
    }
}

/// What one attempt's answer means for the retry loop.
#[derive(Debug, PartialEq)]
enum Verdict {
    Done,
    Fail,
    RetryAfter(Duration),
}

/// The rate-limit headers of one answer.
#[derive(Debug, Default, Clone)]
struct RateHeaders {
    retry_after: Option<String>,
    remaining: Option<String>,
    reset: Option<String>,
}

fn classify(
    status: u16,
    headers: &RateHeaders,
    body: &str,
    attempt: u32,
    policy: &RetryPolicy,
    now_unix: u64,
) -> Verdict {
    if (200..400).contains(&status) {
        return Verdict::Done;
    }
    let retry_after = headers
        .retry_after
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let exhausted = headers.remaining.as_deref().map(str::trim) == Some("0");
    let reset_wait = headers
        .reset
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
        // One second of slack: GitHub's reset is a whole second and clocks drift.
        .map(|reset| Duration::from_secs(reset.saturating_sub(now_unix) + 1));
    let lower = body.to_ascii_lowercase();
    let says_rate_limit = lower.contains("rate limit");
    let rate_limited =
        status == 429 || (status == 403 && (retry_after.is_some() || exhausted || says_rate_limit));
    if rate_limited {
        if let Some(wait) = retry_after {
            return Verdict::RetryAfter(wait);
        }
        if exhausted && let Some(wait) = reset_wait {
            return Verdict::RetryAfter(wait);
        }
        return Verdict::RetryAfter(policy.secondary_min_wait.max(Duration::from_secs(1)));
    }
    if (500..600).contains(&status) {
        if let Some(wait) = retry_after {
            return Verdict::RetryAfter(wait);
        }
        return Verdict::RetryAfter(backoff(policy, attempt));
    }
    Verdict::Fail
}

fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    policy.backoff(attempt)
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` after a 5xx or transport error: doubling from
    /// `server_error_backoff`, capped at `max_wait`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.server_error_backoff
            .saturating_mul(factor)
            .min(self.max_wait)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A client bound to one repository.
#[derive(Clone)]
pub struct GithubClient {
    octo: Octocrab,
    owner: String,
    repo: String,
    policy: RetryPolicy,
    /// Kept only to redact it from error bodies that echo it.
    token: SecretToken,
}

impl fmt::Debug for GithubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubClient")
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl GithubClient {
    /// Builds the octocrab transport for `target`. Makes no request.
    pub fn new(target: &GithubTarget, policy: RetryPolicy) -> Result<Self, GithubError> {
        target.validate()?;
        let octo = Octocrab::builder()
            .base_uri(target.api_url.trim_end_matches('/'))
            .map_err(|e| {
                GithubError::Config(format!(
                    "api_url `{}` is not a valid URL: {e}\nhint: use https://api.github.com or https://HOST/api/v3",
                    target.api_url
                ))
            })?
            .personal_token(target.token.expose().to_owned())
            .set_connect_timeout(Some(Duration::from_secs(15)))
            .set_read_timeout(Some(policy.timeout))
            .set_write_timeout(Some(policy.timeout))
            .build()
            .map_err(|e| GithubError::Config(format!("could not build the GitHub client: {e}")))?;
        Ok(Self {
            octo,
            owner: target.owner.clone(),
            repo: target.repo.clone(),
            policy,
            token: target.token.clone(),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// `/repos/{owner}/{repo}{tail}` with owner and repo percent-encoded.
    pub fn repo_path(&self, tail: &str) -> String {
        format!(
            "/repos/{}/{}{tail}",
            encode_segment(&self.owner),
            encode_segment(&self.repo)
        )
    }

    /// Sends one request with retries. `path` is relative to the API root and already encoded.
    /// Success is any 2xx/3xx; anything else is `GithubError::Status` with GitHub's body.
    ///
    /// For requests that are safe to repeat: reads, updates to a given state, and creations of
    /// content-addressed git objects (a repeated blob, tree or commit is an unreferenced object,
    /// not a second commit on a branch). Use [`GithubClient::send_create`] for the rest.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ApiResponse, GithubError> {
        self.send_with(method, path, body, false).await
    }

    /// Sends a POST that creates something a repeat would duplicate (a ref, a pull request, a
    /// comment). It is retried only when GitHub says it did not process it (rate limits); after
    /// a timeout, a dropped connection or a 5xx the error is returned at once
    /// ([`GithubError::is_ambiguous`]) so the caller can look up whether the thing exists.
    pub async fn send_create(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<ApiResponse, GithubError> {
        self.send_with(Method::Post, path, Some(body), true).await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        create: bool,
    ) -> Result<ApiResponse, GithubError> {
        let name = method.as_str();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.send_once(method, path, body).await;
            let (verdict, error) = match outcome {
                Ok((status, headers, text)) => {
                    let verdict =
                        classify(status, &headers, &text, attempt, &self.policy, now_unix());
                    if verdict == Verdict::Done {
                        tracing::debug!(method = name, path, status, "github");
                        return Ok(ApiResponse {
                            status,
                            body: text,
                            method: name,
                            path: path.to_owned(),
                        });
                    }
                    let error = GithubError::Status {
                        method: name,
                        path: path.to_owned(),
                        status,
                        // The token never lives in an error, which callers may log or print.
                        body: redact_secrets(&text, &[self.token.expose()]),
                        attempts: attempt,
                    };
                    (verdict, error)
                }
                Err(message) => (
                    Verdict::RetryAfter(backoff(&self.policy, attempt)),
                    GithubError::Transport {
                        method: name,
                        path: path.to_owned(),
                        message,
                        attempts: attempt,
                    },
                ),
            };
            let wait = match verdict {
                _ if create && error.is_ambiguous() => return Err(error),
                Verdict::RetryAfter(wait) if attempt < self.policy.max_attempts => wait,
                _ => return Err(error),
            };
            if wait > self.policy.max_wait {
                return Err(GithubError::RateLimitTooLong {
                    method: name,
                    path: path.to_owned(),
                    wait,
                    max_wait: self.policy.max_wait,
                });
            }
            tracing::warn!(
                "GitHub: {error}; retrying in {}s (attempt {}/{})",
                wait.as_secs_f64(),
                attempt + 1,
                self.policy.max_attempts
            );
            self.policy.sleeper.sleep(wait).await;
        }
    }

    /// One attempt: status, rate-limit headers and body, or a transport error's text.
    async fn send_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, RateHeaders, String), String> {
        let uri = path.to_owned();
        let response = match method {
            Method::Get => self.octo._get(uri).await,
            Method::Post => self.octo._post(uri, body).await,
            Method::Patch => self.octo._patch(uri, body).await,
            Method::Put => self.octo._put(uri, body).await,
            Method::Delete => self.octo._delete(uri, body).await,
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let headers = RateHeaders {
            retry_after: header("retry-after"),
            remaining: header("x-ratelimit-remaining"),
            reset: header("x-ratelimit-reset"),
        };
        let text = self
            .octo
            .body_to_string(response)
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, headers, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    fn headers(
        retry_after: Option<&str>,
        remaining: Option<&str>,
        reset: Option<&str>,
    ) -> RateHeaders {
        RateHeaders {
            retry_after: retry_after.map(str::to_owned),
            remaining: remaining.map(str::to_owned),
            reset: reset.map(str::to_owned),
        }
    }

    #[test]
    fn token_never_prints() {
        let token = SecretToken::new("ghp_very_secret").unwrap();
        assert_eq!(format!("{token}"), "***");
        assert_eq!(format!("{token:?}"), "***");
        let target = GithubTarget::new("o", "r", "main", token);
        assert!(!format!("{target:?}").contains("very_secret"));
    }

    #[test]
    fn missing_and_empty_token_name_the_variable() {
        let missing = SecretToken::from_env("RLHF_BOT_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("RLHF_BOT_TEST_SURELY_UNSET_VAR")
        );
        assert!(missing.to_string().contains("hint:"));
        assert_eq!(SecretToken::new("  "), Err(TokenError::EmptyValue));
    }

    #[test]
    fn refs_are_one_encoded_segment() {
        assert_eq!(
            encode_segment("heads/rlhf-bot/dpo-1"),
            "heads%2Frlhf-bot%2Fdpo-1"
        );
        assert_eq!(encode_segment("a b:c"), "a%20b%3Ac");
        assert_eq!(encode_segment("Plain-1.2_x~"), "Plain-1.2_x~");
    }

    #[test]
    fn branch_names() {
        assert!(valid_branch_name("rlhf-bot/dpo-2026-11-27"));
        for bad in [
            "",
            "a..b",
            "a b",
            "/a",
            "a/",
            "a.lock",
            "x/.hidden",
            "a:b",
            "-x",
        ] {
            assert!(!valid_branch_name(bad), "{bad}");
        }
    }

    #[test]
    fn retry_after_wins_for_secondary_limits() {
        let v = classify(
            403,
            &headers(Some("7"), None, None),
            "{}",
            1,
            &policy(),
            1000,
        );
        assert_eq!(v, Verdict::RetryAfter(Duration::from_secs(7)));
        let v = classify(
            429,
            &headers(Some("3"), Some("0"), Some("2000")),
            "",
            1,
            &policy(),
            1000,
        );
        assert_eq!(v, Verdict::RetryAfter(Duration::from_secs(3)));
    }

    #[test]
    fn reset_used_when_no_requests_remain() {
        let v = classify(
            403,
            &headers(None, Some("0"), Some("1010")),
            "",
            1,
            &policy(),
            1000,
        );
        assert_eq!(v, Verdict::RetryAfter(Duration::from_secs(11)));
    }

    #[test]
    fn secondary_limit_without_hints_waits_a_minute() {
        let body = r#"{"message":"You have exceeded a secondary rate limit."}"#;
        let v = classify(
            403,
            &headers(None, Some("4000"), Some("1010")),
            body,
            1,
            &policy(),
            1000,
        );
        assert_eq!(v, Verdict::RetryAfter(Duration::from_secs(60)));
    }

    #[test]
    fn plain_forbidden_and_client_errors_fail_at_once() {
        let body = r#"{"message":"Resource not accessible by integration"}"#;
        assert_eq!(
            classify(
                403,
                &headers(None, Some("4000"), None),
                body,
                1,
                &policy(),
                0
            ),
            Verdict::Fail
        );
        assert_eq!(
            classify(404, &RateHeaders::default(), "", 1, &policy(), 0),
            Verdict::Fail
        );
        assert_eq!(
            classify(422, &RateHeaders::default(), "", 1, &policy(), 0),
            Verdict::Fail
        );
    }

    #[test]
    fn server_errors_back_off_exponentially() {
        let p = policy();
        assert_eq!(
            classify(502, &RateHeaders::default(), "", 1, &p, 0),
            Verdict::RetryAfter(Duration::from_secs(2))
        );
        assert_eq!(
            classify(502, &RateHeaders::default(), "", 3, &p, 0),
            Verdict::RetryAfter(Duration::from_secs(8))
        );
        assert_eq!(backoff(&p, 40), p.max_wait);
    }

    #[test]
    fn errors_keep_status_and_body() {
        let e = GithubError::Status {
            method: "POST",
            path: "/repos/o/r/git/refs".into(),
            status: 422,
            body: r#"{"message":"Reference already exists"}"#.into(),
            attempts: 1,
        };
        assert!(e.is_already_exists());
        assert_eq!(e.status(), Some(422));
        assert!(e.to_string().contains("Reference already exists"));
    }
}
