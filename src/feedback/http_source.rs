//! The feedback API client: `GET {base}/v1/feedback?updated_since&cursor&limit` with a bearer
//! token (contract: `docs/feedback-api.yaml`).
//!
//! Transient failures (connection errors, timeouts, 5xx, a body cut short) are retried with
//! exponential backoff and full jitter; a 429 waits for its `Retry-After`. Attempts are bounded,
//! then the last failure is reported. Any other 4xx fails at once with its status and body,
//! because repeating a request the server refuses cannot succeed.
//!
//! A body is read as a stream under a hard byte limit (`feedback.max_page_bytes`): a page whose
//! `Content-Length` announces more is refused before reading, and a chunked body is cut off as
//! soon as it passes the limit, so a hostile or broken server cannot make the pull hold more than
//! one limit's worth of bytes. Too large a page is fatal, not retried: asking again would bring
//! the same page.

use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::record::{Invalid, WireRecord};
use super::store::Incoming;
use crate::retry::describe_transport as describe;
use crate::secret::SecretString;

/// How the client talks to the API; built from the validated config.
#[derive(Debug, Clone)]
pub struct HttpSourceOptions {
    pub base_url: url::Url,
    pub token: Option<SecretString>,
    pub page_size: u32,
    pub timeout: Duration,
    /// Total attempts per page, the first included.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The longest `Retry-After` we honour; a server asking for more is treated as failing.
    pub max_retry_after: Duration,
    /// The most bytes one page's body may have (`feedback.max_page_bytes`).
    pub max_page_bytes: u64,
}

/// How much of a refusal's body is read and shown: enough for an API's error message.
const ERROR_BODY_BYTES: u64 = 2048;

/// One page as the API returned it, validated record by record.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Incoming>,
    pub next_cursor: Option<String>,
    pub retries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the feedback API refused the request: HTTP {status} from {url}\n{body}")]
    Refused {
        status: StatusCode,
        url: String,
        body: String,
    },
    #[error(
        "the feedback API failed {attempts} times in a row; last failure: {last}\nhint: check that the API is up, or raise feedback.max_attempts"
    )]
    Exhausted { attempts: u32, last: String },
    #[error("{}", too_large(*limit, *seen, *announced, url))]
    TooLarge {
        url: String,
        limit: u64,
        /// Bytes announced by `Content-Length` (`announced`) or received before reading stopped.
        seen: u64,
        announced: bool,
    },
    #[error("could not build the request: {0}")]
    Request(String),
    #[error(
        "the feedback API host `{host}` does not resolve: {detail}\nhint: check `feedback.url`; a team with no feedback API yet can use `feedback.source: file` (see docs/github-setup.md)"
    )]
    UnknownHost { host: String, detail: String },
}

fn too_large(limit: u64, seen: u64, announced: bool, url: &str) -> String {
    let what = if announced {
        format!("announced a page of {seen} bytes (Content-Length); nothing of it was read")
    } else {
        format!("sent more than that for one page; reading stopped after {seen} bytes")
    };
    format!(
        "the feedback API at {url} exceeded feedback.max_page_bytes ({limit} bytes): it {what}\n\
         hint: a page of feedback.page_size records is normally far smaller, so the server (or a \
         proxy in front of it) may be misbehaving; if the records really are this large, lower \
         feedback.page_size or raise feedback.max_page_bytes"
    )
}

impl FetchError {
    /// A 4xx on a resumed cursor means the server no longer knows it.
    pub fn is_client_error(&self) -> bool {
        matches!(self, FetchError::Refused { status, .. } if status.is_client_error())
    }
}

#[derive(Deserialize)]
struct PageBody<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
    next_cursor: Option<String>,
}

#[derive(Debug)]
pub struct FeedbackClient {
    http: reqwest::Client,
    options: HttpSourceOptions,
}

enum Attempt {
    Done(Page),
    /// Worth another try; `wait` overrides the backoff (429 `Retry-After`).
    Retry {
        reason: String,
        wait: Option<Duration>,
    },
    Fatal(FetchError),
}

impl FeedbackClient {
    pub fn new(options: HttpSourceOptions) -> Result<Self, FetchError> {
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("rlhf-bot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Request(e.to_string()))?;
        Ok(Self { http, options })
    }

    fn page_url(&self, since: Option<&str>, cursor: Option<&str>) -> Result<url::Url, FetchError> {
        let mut url = self.options.base_url.clone();
        // Keep any path prefix of the base URL (`https://host/api` → `/api/v1/feedback`).
        let path = format!("{}/v1/feedback", url.path().trim_end_matches('/'));
        url.set_path(&path);
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = since {
                q.append_pair("updated_since", s);
            }
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
            q.append_pair("limit", &self.options.page_size.to_string());
        }
        Ok(url)
    }

    /// Fetches one page, retrying transient failures.
    pub async fn fetch_page(
        &self,
        since: Option<&str>,
        cursor: Option<&str>,
    ) -> Result<Page, FetchError> {
        let url = self.page_url(since, cursor)?;
        let mut retries = 0;
        loop {
            match self.attempt(&url).await {
                Attempt::Done(mut page) => {
                    page.retries = retries;
                    return Ok(page);
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry { reason, wait } => {
                    retries += 1;
                    if retries >= self.options.max_attempts {
                        return Err(FetchError::Exhausted {
                            attempts: retries,
                            last: reason,
                        });
                    }
                    let wait = wait.unwrap_or_else(|| self.backoff(retries));
                    tracing::warn!(
                        "feedback API: {reason}; retry {retries} in {:.1}s",
                        wait.as_secs_f64()
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Exponential backoff with full jitter: uniform in [0, min(max, base·2^n)].
    fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .options
            .backoff_base
            .saturating_mul(1 << retry.min(16))
            .min(self.options.backoff_max);
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    async fn attempt(&self, url: &url::Url) -> Attempt {
        let mut request = self.http.get(url.clone());
        if let Some(token) = &self.options.token {
            request = request.bearer_auth(token.expose());
        }
        let response = match request.send().await {
            Ok(r) => r,
            // A name that does not resolve will not resolve in a minute either: retrying it only
            // makes a misconfigured job spend minutes before it says so.
            Err(e) if is_dns_failure(&e) => {
                return Attempt::Fatal(FetchError::UnknownHost {
                    host: url.host_str().unwrap_or_default().to_string(),
                    detail: describe(&e),
                });
            }
            Err(e) => {
                return Attempt::Retry {
                    reason: describe(&e),
                    wait: None,
                };
            }
        };
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(response.headers());
            return match wait {
                Some(w) if w > self.options.max_retry_after => {
                    Attempt::Fatal(FetchError::Refused {
                        status,
                        url: redact(url),
                        body: format!(
                            "Retry-After asks for {}s, more than the {}s we wait",
                            w.as_secs(),
                            self.options.max_retry_after.as_secs()
                        ),
                    })
                }
                _ => Attempt::Retry {
                    reason: "HTTP 429 Too Many Requests".into(),
                    wait: wait.or(Some(self.backoff(3))),
                },
            };
        }
        let limit = if status.is_success() {
            self.options.max_page_bytes
        } else {
            ERROR_BODY_BYTES
        };
        if status.is_success()
            && let Some(announced) = response.content_length().filter(|&n| n > limit)
        {
            return Attempt::Fatal(FetchError::TooLarge {
                url: redact(url),
                limit,
                seen: announced,
                announced: true,
            });
        }
        let body = match read_capped(response, limit).await {
            Ok(b) => b,
            Err(e) => {
                return Attempt::Retry {
                    reason: format!("reading the body: {}", describe(&e)),
                    wait: None,
                };
            }
        };
        if status.is_server_error() {
            return Attempt::Retry {
                reason: format!("HTTP {status}"),
                wait: None,
            };
        }
        if !status.is_success() {
            // Shown in part, sanitised, with the token and any echoed credential redacted.
            let text = String::from_utf8_lossy(&body.bytes[..body.bytes.len().min(64 * 1024)]);
            let token = self.options.token.as_ref().map_or("", |t| t.expose());
            return Attempt::Fatal(FetchError::Refused {
                status,
                url: redact(url),
                body: crate::sanitize::error_body_excerpt(&text, &[token]),
            });
        }
        if let Some(seen) = body.cut_at {
            return Attempt::Fatal(FetchError::TooLarge {
                url: redact(url),
                limit,
                seen,
                announced: false,
            });
        }
        match parse_page(&body.bytes) {
            Ok(page) => Attempt::Done(page),
            // A body that is not the page shape is most often a response cut short by a proxy or a
            // dying server: worth a retry, and reported if it persists.
            Err(e) => Attempt::Retry {
                reason: format!("the response is not a feedback page: {e}"),
                wait: None,
            },
        }
    }
}

/// A body read under a byte limit.
struct Capped {
    /// At most the limit's worth of the body's first bytes.
    bytes: Vec<u8>,
    /// `Some(bytes received)` when the body passed the limit and reading stopped there.
    cut_at: Option<u64>,
}

/// Reads the body chunk by chunk and stops as soon as it passes `limit`, so memory stays bounded
/// by the limit whatever the server sends (a chunked body has no length to check up front).
async fn read_capped(mut response: reqwest::Response, limit: u64) -> reqwest::Result<Capped> {
    let expected = response.content_length().unwrap_or(0).min(limit);
    let mut bytes = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    let mut seen: u64 = 0;
    while let Some(chunk) = response.chunk().await? {
        seen += chunk.len() as u64;
        let room = usize::try_from(limit.saturating_sub(bytes.len() as u64)).unwrap_or(usize::MAX);
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if seen > limit {
            // Dropping the response here closes the connection: the rest is never read.
            return Ok(Capped {
                bytes,
                cut_at: Some(seen),
            });
        }
    }
    Ok(Capped {
        bytes,
        cut_at: None,
    })
}

/// Parses a page body; each record is validated on its own so one bad record is quarantined
/// instead of failing the page.
pub fn parse_page(body: &[u8]) -> Result<Page, serde_json::Error> {
    let page: PageBody<'_> = serde_json::from_slice(body)?;
    let items = page
        .data
        .into_iter()
        .map(|raw| incoming_from_json(raw.get()))
        .collect();
    Ok(Page {
        items,
        next_cursor: page.next_cursor.filter(|c| !c.is_empty()),
        retries: 0,
    })
}

/// Validates one record's JSON text.
pub fn incoming_from_json(raw: &str) -> Incoming {
    let parsed = serde_json::from_str::<WireRecord>(raw)
        .map_err(|e| Invalid(format!("not a feedback record: {e}")))
        .and_then(WireRecord::validate)
        .and_then(Incoming::valid);
    match parsed {
        Ok(valid) => valid,
        Err(reason) => Incoming::Malformed {
            raw: raw.to_string(),
            reason,
        },
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// Whether a connection failed because the host name did not resolve (hyper-util reports it as a
/// connect error whose cause is a "dns error"; the resolver's own text varies by libc).
fn is_dns_failure(e: &reqwest::Error) -> bool {
    if !e.is_connect() {
        return false;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The URL without its query, for messages (cursors can be long and opaque).
fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}
