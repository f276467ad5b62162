//! Committing the production model to a Hugging Face Hub model repository through the Hub's HTTP
//! commit API, the protocol `huggingface_hub`'s `create_commit` speaks (read from its
//! `_commit_api.py` and `lfs.py`):
//!
//! 1. `POST {endpoint}/api/models/{repo}/preupload/{revision}` with `{"files": [{path, size,
//!    sample}]}` (`sample`: base64 of the first 512 bytes); the Hub answers each file's
//!    `uploadMode`, `regular` or `lfs`, and whether it `shouldIgnore` it.
//! 2. For `lfs` files, the Git LFS batch API: `POST {endpoint}/{repo}.git/info/lfs/objects/batch`
//!    (`operation: upload`, `transfers: ["basic"]`, sha256 oids and sizes); an object the Hub
//!    lacks comes back with an `upload` action (a URL and headers to `PUT` the bytes to) and
//!    optionally a `verify` action (`POST {oid, size}`); one it already has, with none.
//! 3. `POST {endpoint}/api/models/{repo}/commit/{revision}` with an NDJSON body: a `header` line
//!    (`summary`, `description`), then one `file` line per regular file (base64 content) and one
//!    `lfsFile` line per LFS file (`algo: sha256`, `oid`, `size`).
//!
//! The token goes in `Authorization: Bearer` to the Hub's own endpoints, never to an upload URL
//! (a presigned storage URL, as `huggingface_hub` does) and never into an error or a log. Reads
//! and the uploads are retried on 5xx/429/transport errors; the commit is not (a lost answer
//! could mean a duplicate commit): a failed push leaves the deployment record `incomplete`, and
//! the next `deploy` pushes again, when the Hub reports the LFS objects already stored.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use crate::deploy::settings::HubSettings;
use crate::retry::{Backoff, Failure, retrying};
use crate::sanitize::{error_body_excerpt, redact_url};
use crate::secret::SecretString;

/// The first bytes of a file the preupload call sees (what `huggingface_hub` sends).
const SAMPLE_BYTES: usize = 512;
const LFS_MEDIA_TYPE: &str = "application/vnd.git-lfs+json";
/// Attempts for the retried calls (preupload, LFS batch, upload, verify).
const MAX_ATTEMPTS: u32 = 4;

/// One file of the commit, its content in memory.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// `/`-separated path in the repository.
    pub path: String,
    pub content: Vec<u8>,
    /// Hex sha256 of `content` (the LFS oid).
    pub sha256: String,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCommit {
    pub commit_url: String,
    pub commit_oid: String,
    /// Files sent through LFS that the Hub did not have yet.
    pub lfs_uploaded: usize,
    /// Files the Hub said to ignore (its `.gitignore`), left out of the commit.
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the Hugging Face Hub ({step}) answered {status} for {repo}: {body}\nhint: {hint}")]
    Status {
        step: &'static str,
        repo: String,
        status: u16,
        body: String,
        hint: &'static str,
    },
    #[error(
        "could not reach the Hugging Face Hub ({step}) for {repo}: {message}\nhint: check deploy.hub.endpoint and the network; the next `rlhf-bot deploy` pushes again"
    )]
    Transport {
        step: &'static str,
        repo: String,
        message: String,
    },
    #[error("the Hugging Face Hub ({step}) sent an unexpected answer for {repo}: {message}")]
    Protocol {
        step: &'static str,
        repo: String,
        message: String,
    },
}

#[derive(Deserialize)]
struct PreuploadAnswer {
    files: Vec<PreuploadFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadFile {
    path: String,
    upload_mode: String,
    #[serde(default)]
    should_ignore: bool,
}

#[derive(Deserialize)]
struct BatchAnswer {
    objects: Vec<BatchObject>,
}

#[derive(Deserialize)]
struct BatchObject {
    oid: String,
    #[serde(default)]
    actions: Option<BatchActions>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct BatchActions {
    upload: Option<LfsAction>,
    verify: Option<LfsAction>,
}

#[derive(Deserialize)]
struct LfsAction {
    href: String,
    #[serde(default)]
    header: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitAnswer {
    commit_url: String,
    commit_oid: String,
}

/// A client for one repository; `backoff` is the first wait between retries (doubling).
pub struct HubClient<'a> {
    settings: &'a HubSettings,
    token: &'a SecretString,
    http: reqwest::Client,
    backoff: Duration,
}

impl<'a> HubClient<'a> {
    pub fn new(
        settings: &'a HubSettings,
        token: &'a SecretString,
        backoff: Duration,
    ) -> Result<Self, HubError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("rlhf-bot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HubError::Transport {
                step: "client",
                repo: settings.repo.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            settings,
            token,
            http,
            backoff,
        })
    }

    /// `revision` as one URL path segment (`/` in a branch name becomes `%2F`).
    fn revision(&self) -> String {
        url::form_urlencoded::byte_serialize(self.settings.revision.as_bytes()).collect()
    }

    fn api(&self, what: &str) -> String {
        format!(
            "{}/api/models/{}/{what}/{}",
            self.settings.endpoint,
            self.settings.repo,
            self.revision()
        )
    }

    /// Commits `files` in one commit; returns where it landed.
    pub async fn push(
        &self,
        files: &[HubFile],
        summary: &str,
        description: &str,
    ) -> Result<HubCommit, HubError> {
        let modes = self.preupload(files).await?;
        let mut lfs = Vec::new();
        let mut ignored = Vec::new();
        let mut lines = vec![serde_json::json!({
            "key": "header",
            "value": {"summary": summary, "description": description},
        })];
        for (file, (mode, ignore)) in files.iter().zip(&modes) {
            if *ignore {
                ignored.push(file.path.clone());
                continue;
            }
            // The Hub refuses empty LFS objects; huggingface_hub sends them as regular files.
            if mode == "lfs" && !file.content.is_empty() {
                lfs.push(file);
                lines.push(serde_json::json!({
                    "key": "lfsFile",
                    "value": {
                        "path": file.path,
                        "algo": "sha256",
                        "oid": file.sha256,
                        "size": file.content.len(),
                    },
                }));
            } else {
                lines.push(serde_json::json!({
                    "key": "file",
                    "value": {
                        "content": B64.encode(&file.content),
                        "path": file.path,
                        "encoding": "base64",
                    },
                }));
            }
        }
        let lfs_uploaded = self.upload_lfs(&lfs).await?;
        let mut body = Vec::new();
        for line in &lines {
            serde_json::to_writer(&mut body, line).expect("JSON values serialise");
            body.push(b'\n');
        }
        let answer = self
            .http
            .post(self.api("commit"))
            .bearer_auth(self.token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await;
        let answer: CommitAnswer = self.json_answer("commit", answer).await?;
        Ok(HubCommit {
            commit_url: answer.commit_url,
            commit_oid: answer.commit_oid,
            lfs_uploaded,
            ignored,
        })
    }

    /// Each file's upload mode and whether the Hub ignores it, in `files`' order.
    async fn preupload(&self, files: &[HubFile]) -> Result<Vec<(String, bool)>, HubError> {
        let mut out = Vec::with_capacity(files.len());
        // huggingface_hub asks about 256 files per call.
        for chunk in files.chunks(256) {
            let body = serde_json::json!({
                "files": chunk.iter().map(|f| serde_json::json!({
                    "path": f.path,
                    "size": f.content.len(),
                    "sample": B64.encode(&f.content[..f.content.len().min(SAMPLE_BYTES)]),
                })).collect::<Vec<_>>(),
            });
            let answer: PreuploadAnswer = self
                .retried("preupload", || {
                    self.http
                        .post(self.api("preupload"))
                        .bearer_auth(self.token.expose())
                        .json(&body)
                })
                .await?;
            for f in chunk {
                let found = answer
                    .files
                    .iter()
                    .find(|a| a.path == f.path)
                    .ok_or_else(|| {
                        self.protocol("preupload", format!("no answer for {}", f.path))
                    })?;
                out.push((found.upload_mode.clone(), found.should_ignore));
            }
        }
        Ok(out)
    }

    /// Uploads the LFS objects the Hub lacks; returns how many it uploaded.
    async fn upload_lfs(&self, files: &[&HubFile]) -> Result<usize, HubError> {
        if files.is_empty() {
            return Ok(0);
        }
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.settings.endpoint, self.settings.repo
        );
        let body = serde_json::json!({
            "operation": "upload",
            "transfers": ["basic"],
            "objects": files.iter().map(|f| serde_json::json!({
                "oid": f.sha256,
                "size": f.content.len(),
            })).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": self.settings.revision},
        });
        let answer: BatchAnswer = self
            .retried("LFS batch", || {
                self.http
                    .post(&url)
                    .bearer_auth(self.token.expose())
                    .header(reqwest::header::ACCEPT, LFS_MEDIA_TYPE)
                    .header(reqwest::header::CONTENT_TYPE, LFS_MEDIA_TYPE)
                    .body(serde_json::to_vec(&body).expect("JSON values serialise"))
            })
            .await?;
        let mut uploaded = 0;
        for object in &answer.objects {
            if let Some(e) = &object.error {
                return Err(self.protocol("LFS batch", format!("object {}: {e}", object.oid)));
            }
            let Some(actions) = &object.actions else {
                continue; // already stored
            };
            let file = files
                .iter()
                .find(|f| f.sha256 == object.oid)
                .ok_or_else(|| self.protocol("LFS batch", format!("unknown oid {}", object.oid)))?;
            if let Some(upload) = &actions.upload {
                if upload.header.contains_key("chunk_size") {
                    return Err(self.protocol(
                        "LFS batch",
                        "the Hub asked for a multipart upload, which was not offered".into(),
                    ));
                }
                // A storage URL: the Hub token is not sent there.
                self.retried_empty("LFS upload", || {
                    let mut req = self.http.put(&upload.href).body(file.content.clone());
                    for (k, v) in &upload.header {
                        req = req.header(k, v);
                    }
                    req
                })
                .await?;
                uploaded += 1;
            }
            if let Some(verify) = &actions.verify {
                let body = serde_json::json!({"oid": file.sha256, "size": file.content.len()});
                self.retried_empty("LFS verify", || {
                    let mut req = self
                        .http
                        .post(&verify.href)
                        .bearer_auth(self.token.expose())
                        .json(&body);
                    for (k, v) in &verify.header {
                        req = req.header(k, v);
                    }
                    req
                })
                .await?;
            }
        }
        Ok(uploaded)
    }

    fn protocol(&self, step: &'static str, message: String) -> HubError {
        HubError::Protocol {
            step,
            repo: self.settings.repo.clone(),
            message,
        }
    }

    async fn json_answer<T: serde::de::DeserializeOwned>(
        &self,
        step: &'static str,
        sent: reqwest::Result<reqwest::Response>,
    ) -> Result<T, HubError> {
        let text = self.text_answer(step, sent).await.map_err(|(_, e)| e)?;
        serde_json::from_str(&text).map_err(|e| self.protocol(step, e.to_string()))
    }

    /// The body of a 2xx answer; otherwise the error and whether it is worth retrying.
    async fn text_answer(
        &self,
        step: &'static str,
        sent: reqwest::Result<reqwest::Response>,
    ) -> Result<String, (bool, HubError)> {
        let repo = self.settings.repo.clone();
        match sent {
            Ok(response) if response.status().is_success() => response.text().await.map_err(|e| {
                let message = redact_url(&e.without_url().to_string());
                (
                    true,
                    HubError::Transport {
                        step,
                        repo,
                        message,
                    },
                )
            }),
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                let retryable = status >= 500 || status == 429;
                let hint = match status {
                    401 | 403 => {
                        "the Hub refused the token: check that the variable deploy.hub.token_env names holds a token with write access to deploy.hub.repo"
                    }
                    404 => {
                        "check deploy.hub.repo and deploy.hub.revision: the repository and branch must exist"
                    }
                    _ if retryable => {
                        "the Hub failed; the deployment record says incomplete and the next `rlhf-bot deploy` pushes again"
                    }
                    _ => "the Hub refused the request; see its answer above",
                };
                let body = error_body_excerpt(&body, &[self.token.expose()]);
                Err((
                    retryable,
                    HubError::Status {
                        step,
                        repo,
                        status,
                        body,
                        hint,
                    },
                ))
            }
            Err(e) => Err((
                true,
                HubError::Transport {
                    step,
                    repo,
                    // reqwest's message names the URL it was given: keep credentials out.
                    message: redact_url(&e.without_url().to_string()),
                },
            )),
        }
    }

    async fn retried<T: serde::de::DeserializeOwned>(
        &self,
        step: &'static str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, HubError> {
        let text = self.retried_text(step, request).await?;
        serde_json::from_str(&text).map_err(|e| self.protocol(step, e.to_string()))
    }

    async fn retried_empty(
        &self,
        step: &'static str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(), HubError> {
        self.retried_text(step, request).await.map(|_| ())
    }

    /// Sends `request()` until a 2xx, a non-retryable answer, or [`MAX_ATTEMPTS`] (the loop
    /// shared with the model download, `crate::retry`).
    async fn retried_text(
        &self,
        step: &'static str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<String, HubError> {
        let backoff = Backoff {
            max_attempts: MAX_ATTEMPTS,
            first_wait: self.backoff,
        };
        let request = &request;
        retrying(backoff, |_| async move {
            self.text_answer(step, request().send().await)
                .await
                .map_err(|(retryable, error)| Failure::new(retryable, error))
        })
        .await
    }
}
