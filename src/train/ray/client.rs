//! The Ray Jobs REST API, as the dashboard of a Ray head serves it: `POST /api/jobs/` (submit),
//! `GET /api/jobs/{id}` (status), `GET /api/jobs/{id}/logs` (the whole log), `POST
//! /api/jobs/{id}/stop`.
//!
//! Why it looks the way it does:
//! - **A duplicate submission attaches.** The submission id is the run id; Ray answers a second
//!   submission with the same id with HTTP 500 "… already exists". That answer is
//!   [`SubmitOutcome::AlreadyExists`], not an error, which also makes the submit safe to retry
//!   after an ambiguous failure: the retry either creates the job or finds it.
//! - **Auth** is a bearer token (`RAY_AUTH_MODE=token` heads, Ray ≥ 2.52) held as a
//!   [`SecretString`]; a 401 (no token) or 403 (wrong token) says which and what to set.
//! - Reads and the stop are retried on transport errors and 5xx through [`crate::retry`];
//!   4xx answers are final. A User-Agent is always sent: Ray answers a browser-like one with 405.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::retry::{Backoff, Failure, describe_transport, retrying};
use crate::secret::SecretString;

/// A job's state as Ray reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    Pending,
    Running,
    Stopped,
    Succeeded,
    Failed,
}

impl JobStatus {
    /// No further change will come.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Stopped | Self::Succeeded | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Stopped => "STOPPED",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `GET /api/jobs/{id}` says about a job (the fields we use).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobInfo {
    pub submission_id: String,
    pub status: JobStatus,
    /// Ray's one-line explanation ("Job failed due to an application error, …").
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The body of `POST /api/jobs/`.
#[derive(Debug, Clone, Serialize)]
pub struct JobRequest {
    pub entrypoint: String,
    pub submission_id: String,
    pub runtime_env: serde_json::Value,
    /// Ray accepts string values only.
    pub metadata: BTreeMap<String, String>,
    pub entrypoint_num_cpus: f64,
    pub entrypoint_num_gpus: f64,
}

/// What a submission found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// A new job was created.
    Created,
    /// A job with this submission id already existed (a retried workflow): we attach to it.
    AlreadyExists,
}

/// Why a request to the head failed. The address is the configured dashboard URL (it never holds
/// credentials: `config` refuses those); the token is never part of any message.
#[derive(Debug, thiserror::Error)]
pub enum RayError {
    #[error(
        "cannot reach the Ray head at {address} ({detail})\nhint: check `train.ray.address` (the dashboard URL, port 8265 by default), that the head runs (`ray status` on it) and that this runner can reach it"
    )]
    Unreachable { address: String, detail: String },
    #[error("the Ray head at {address} answered HTTP {status} to {op}: {reason}\nhint: {hint}")]
    Unauthorized {
        address: String,
        status: u16,
        op: &'static str,
        reason: &'static str,
        hint: String,
    },
    #[error(
        "the Ray head at {address} has no job `{id}`\nhint: the cluster may have been restarted since it was submitted (Ray keeps jobs in its GCS); rerun the workflow with a new run id"
    )]
    NoSuchJob { address: String, id: String },
    #[error("the Ray head at {address} answered HTTP {status} to {op}: {body}")]
    Http {
        address: String,
        status: u16,
        op: &'static str,
        body: String,
    },
    #[error(
        "the Ray head at {address} sent an answer to {op} that is not what the Jobs API sends: {detail}"
    )]
    Decode {
        address: String,
        op: &'static str,
        detail: String,
    },
}

/// A client for one Ray head's Jobs API.
pub struct JobsClient {
    http: reqwest::Client,
    /// The dashboard URL without a trailing `/`.
    base: String,
    token: Option<SecretString>,
    /// The variable the token came from, for the 401/403 hint.
    token_env: Option<String>,
    backoff: Backoff,
}

impl std::fmt::Debug for JobsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobsClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Ray's error bodies are Python tracebacks; the last non-empty line says what happened. Shown
/// sanitised, with the token redacted should a proxy echo it.
fn last_line(body: &str, token: Option<&SecretString>) -> String {
    let line = body
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && *l != ".")
        .unwrap_or_default();
    let secrets: Vec<&str> = token.map(SecretString::expose).into_iter().collect();
    crate::sanitize::error_body_excerpt(line, &secrets)
}

impl JobsClient {
    /// A client for the head at `address`; `token` (read from `token_env`) goes in an
    /// `Authorization: Bearer` header on every request.
    pub fn new(
        address: &url::Url,
        token: Option<SecretString>,
        token_env: Option<String>,
        timeout: Duration,
        backoff: Backoff,
    ) -> Result<Self, RayError> {
        let base = address.as_str().trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .user_agent(concat!("rlhf-bot/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| RayError::Unreachable {
                address: base.clone(),
                detail: describe_transport(&e),
            })?;
        Ok(Self {
            http,
            base,
            token,
            token_env,
            backoff,
        })
    }

    /// The head's dashboard URL, as configured.
    pub fn address(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unauthorized(&self, status: StatusCode, op: &'static str) -> RayError {
        let var = self.token_env.as_deref();
        let (reason, hint) = match (status.as_u16(), var) {
            (401, None) => (
                "the head requires a token and none was sent",
                "the head runs with RAY_AUTH_MODE=token: put its token (`ray get-auth-token` on the head) in a secret and name that variable in `train.ray.token_env`".to_string(),
            ),
            (401, Some(v)) => (
                "the head did not accept the request without a valid token",
                format!("set {v} to the cluster's token (`ray get-auth-token` on the head)"),
            ),
            (_, Some(v)) => (
                "the token was refused",
                format!("the token in {v} is not this cluster's: set it to the output of `ray get-auth-token` on the head (a restarted head may have a new token)"),
            ),
            (_, None) => (
                "access denied",
                "the head or a proxy in front of it refuses this runner; name the variable holding its token in `train.ray.token_env`".to_string(),
            ),
        };
        RayError::Unauthorized {
            address: self.base.clone(),
            status: status.as_u16(),
            op,
            reason,
            hint,
        }
    }

    /// One request with the token; a transport error or 5xx is worth another try (the caller
    /// decides what a 5xx body means first).
    async fn send(
        &self,
        op: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, String), Failure<RayError>> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        };
        let response = request.send().await.map_err(|e| {
            Failure::Retry(RayError::Unreachable {
                address: self.base.clone(),
                detail: describe_transport(&e),
            })
        })?;
        let status = response.status();
        let body = response.text().await.map_err(|e| {
            Failure::Retry(RayError::Unreachable {
                address: self.base.clone(),
                detail: format!("reading the answer to {op}: {}", describe_transport(&e)),
            })
        })?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Failure::Fatal(self.unauthorized(status, op)));
        }
        Ok((status, body))
    }

    fn http_error(&self, op: &'static str, status: StatusCode, body: &str) -> Failure<RayError> {
        let error = RayError::Http {
            address: self.base.clone(),
            status: status.as_u16(),
            op,
            body: last_line(body, self.token.as_ref()),
        };
        Failure::new(status.is_server_error(), error)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        body: &str,
    ) -> Result<T, Failure<RayError>> {
        serde_json::from_str(body).map_err(|e| {
            Failure::Fatal(RayError::Decode {
                address: self.base.clone(),
                op,
                detail: e.to_string(),
            })
        })
    }

    /// Submits a job, or finds that one with the same submission id exists.
    pub async fn submit(&self, job: &JobRequest) -> Result<SubmitOutcome, RayError> {
        const OP: &str = "the job submission";
        retrying(self.backoff, |_| async {
            let (status, body) = self
                .send(OP, self.http.post(self.url("/api/jobs/")).json(job))
                .await?;
            if status.is_success() {
                return Ok(SubmitOutcome::Created);
            }
            // Ray ≥ 2.x: "ValueError: Job with submission_id … already exists." inside a 500
            // (older heads answered 400 with the same words).
            if body.contains("already exists") {
                return Ok(SubmitOutcome::AlreadyExists);
            }
            Err(self.http_error(OP, status, &body))
        })
        .await
    }

    /// The job's status; `None` when the head has no such job.
    pub async fn find(&self, id: &str) -> Result<Option<JobInfo>, RayError> {
        const OP: &str = "the job status request";
        retrying(self.backoff, |_| async {
            let (status, body) = self
                .send(OP, self.http.get(self.url(&format!("/api/jobs/{id}"))))
                .await?;
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(self.http_error(OP, status, &body));
            }
            self.decode(OP, &body).map(Some)
        })
        .await
    }

    /// The job's status; a job the head does not know is an error.
    pub async fn status(&self, id: &str) -> Result<JobInfo, RayError> {
        self.find(id).await?.ok_or_else(|| RayError::NoSuchJob {
            address: self.base.clone(),
            id: id.to_string(),
        })
    }

    /// A request about the job `id` whose JSON answer is `T`; a 404 is [`RayError::NoSuchJob`].
    async fn about_job<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        id: &str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, RayError> {
        retrying(self.backoff, |_| async {
            let (status, body) = self.send(op, request()).await?;
            if status == StatusCode::NOT_FOUND {
                return Err(Failure::Fatal(RayError::NoSuchJob {
                    address: self.base.clone(),
                    id: id.to_string(),
                }));
            }
            if !status.is_success() {
                return Err(self.http_error(op, status, &body));
            }
            self.decode(op, &body)
        })
        .await
    }

    /// The job's whole log so far (the API has no offset: [`crate::train::ray::follow`] keeps
    /// track of what it already showed).
    pub async fn logs(&self, id: &str) -> Result<String, RayError> {
        #[derive(Deserialize)]
        struct Logs {
            logs: String,
        }
        let url = self.url(&format!("/api/jobs/{id}/logs"));
        let logs: Logs = self
            .about_job("the job log request", id, || self.http.get(&url))
            .await?;
        Ok(logs.logs)
    }

    /// Asks the head to stop the job; `true` when it was running and is being stopped, `false`
    /// when it had already finished. Idempotent, hence retried like a read.
    pub async fn stop(&self, id: &str) -> Result<bool, RayError> {
        #[derive(Deserialize)]
        struct Stopped {
            stopped: bool,
        }
        let url = self.url(&format!("/api/jobs/{id}/stop"));
        let stopped: Stopped = self
            .about_job("the stop request", id, || self.http.post(&url))
            .await?;
        Ok(stopped.stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceback_reads_as_its_last_line() {
        let body = "Traceback (most recent call last):\n  File \"x.py\"\nValueError: Job with submission_id r1 already exists.\n.\n";
        assert_eq!(
            last_line(body, None),
            "ValueError: Job with submission_id r1 already exists."
        );
        assert_eq!(last_line("", None), "(empty body)");
        let token = SecretString::new("s3cret-token");
        assert_eq!(
            last_line("denied for s3cret-token", Some(&token)),
            "denied for ***"
        );
    }

    #[test]
    fn statuses_parse_as_ray_spells_them() {
        let info: JobInfo = serde_json::from_str(
            r#"{"type":"SUBMISSION","submission_id":"r1","status":"FAILED","message":"boom","metadata":{"a":"b"}}"#,
        )
        .unwrap();
        assert_eq!(info.status, JobStatus::Failed);
        assert!(info.status.is_terminal());
        assert!(!JobStatus::Pending.is_terminal());
    }
}
