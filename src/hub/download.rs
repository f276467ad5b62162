//! Downloading a model from the Hub the way `huggingface_hub` does (`snapshot_download` and
//! `hf_hub_download`, read from its `file_download.py`), into the shared cache ([`super::cache`]):
//!
//! 1. `GET {endpoint}/api/models/{repo}/revision/{revision}`: the commit sha the revision points
//!    at and the file list (`siblings`). Only what a model directory needs is fetched (config,
//!    generation config, tokenizer and chat-template files, `*.safetensors` and their index, at
//!    the top level); READMEs, `pytorch_model.bin`, ONNX folders and the rest are skipped.
//! 2. Per file, `HEAD {endpoint}/{repo}/resolve/{commit}/{file}` without following redirects:
//!    `X-Repo-Commit`, the ETag (`X-Linked-Etag` for LFS files, whose answer is a redirect to
//!    storage, else `ETag`) and the size (`X-Linked-Size`, else `Content-Length`). The ETag names
//!    the blob, so a file another revision already brought is linked, not downloaded.
//! 3. `GET` the same URL, following the redirect (reqwest drops `Authorization` when it leaves
//!    the Hub's host), into `blobs/<etag>.incomplete`; a try that finds bytes there asks for the
//!    rest with `Range: bytes=N-`. A body cut short is retried that way, for as long as rounds of
//!    attempts bring more bytes; a run that gives up keeps the partial file for the next.
//! 4. Verification before the blob is kept: an LFS ETag is the sha256 of the content; any other
//!    ETag is the git blob id, sha1 of `blob <size>\0<content>`, and is checked as such. A
//!    mismatch deletes the partial blob and fails; nothing reaches `snapshots/`.
//!
//! A revision that is a commit sha with a finished snapshot in the cache, and any cached
//! revision under `HF_HUB_OFFLINE=1`, make no request. A branch or tag is asked about (one small
//! API request) so it follows the branch; its files then come from the cache, and when the Hub
//! cannot be reached a cached snapshot of it is used with a warning, as `huggingface_hub` does.
//! The token is sent only as a bearer header and never appears in a message or a log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::cache::RepoCache;
use super::env::HubEnv;
use super::model_ref::{HubModelRef, is_commit_sha};
use crate::retry::{Backoff, Failure, describe_transport, retrying};
use crate::sanitize::{error_body_excerpt, redact_url};

/// Attempts per request (and per download, each resuming the last).
const MAX_ATTEMPTS: u32 = 5;
/// How much of a refusal's body is read for the message.
const ERROR_BODY_BYTES: usize = 2048;

/// The top-level files a model directory is made of, besides `*.safetensors`.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether a repository file is part of what rlhf-bot loads.
pub fn is_model_file(path: &str) -> bool {
    !path.contains('/') && (MODEL_FILES.contains(&path) || path.ends_with(".safetensors"))
}

/// A model made local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `snapshots/<commit>` in the cache: an ordinary HF model directory.
    pub dir: PathBuf,
    /// The commit the revision pointed at (what the registry pins).
    pub commit: String,
    /// Files fetched by this call (empty when the cache had everything).
    pub downloaded: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubDownloadError {
    #[error(
        "model {repo} is gated or private: the Hub at {endpoint} answered HTTP {status} to a request without a token\nhint: set HF_TOKEN to a Hugging Face access token (or log in with `hf auth login`, which writes {token_file}) from an account that has accepted the model's terms on its Hub page"
    )]
    NeedsToken {
        repo: String,
        endpoint: String,
        status: u16,
        token_file: String,
    },
    #[error(
        "model {repo} is gated or private and the Hub at {endpoint} refused the token (HTTP {status})\nhint: accept the model's terms on its Hub page with the token's account, or set HF_TOKEN to a token with read access to {repo}"
    )]
    TokenRefused {
        repo: String,
        endpoint: String,
        status: u16,
    },
    #[error(
        "{what} was not found on the Hub at {endpoint} (HTTP 404)\nhint: check the repository id and the revision in hf://ORG/NAME@REVISION (a private repository also answers 404 to some tokens)"
    )]
    NotFound { what: String, endpoint: String },
    #[error(
        "could not reach the Hugging Face Hub at {endpoint} for {repo}: {detail}\nhint: check the network; set HF_ENDPOINT to a reachable mirror, or HF_HUB_OFFLINE=1 to use the models already in the cache ({cache})"
    )]
    Unreachable {
        repo: String,
        endpoint: String,
        detail: String,
        cache: String,
    },
    #[error(
        "downloading {what} from {endpoint} stopped after {received} bytes: {detail}\nhint: run the command again: the partial file is kept and the download resumes where it stopped"
    )]
    Truncated {
        what: String,
        endpoint: String,
        received: u64,
        detail: String,
    },
    #[error("the Hub at {endpoint} answered HTTP {status} for {what}: {body}")]
    Status {
        what: String,
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error(
        "{what} failed verification: expected {check} {expected}, got {actual}; the partial download was deleted and nothing was added to the cache\nhint: run the command again to download it afresh; if it fails again, the server at {endpoint} (HF_ENDPOINT) serves a corrupted file"
    )]
    Integrity {
        what: String,
        endpoint: String,
        check: &'static str,
        expected: String,
        actual: String,
    },
    #[error(
        "model {model} is not in the local Hub cache ({cache}) and HF_HUB_OFFLINE is set\nhint: run once with the network (unset HF_HUB_OFFLINE) to download it, or name a revision that is cached"
    )]
    NotCached { model: String, cache: String },
    #[error(
        "model {model} has no *.safetensors weights at commit {commit}\nhint: rlhf-bot loads safetensors only (not pytorch_model.bin); pick a repository or revision that has them, or convert the weights"
    )]
    NoWeights { model: String, commit: String },
    #[error(
        "the Hub at {endpoint} sent an unexpected answer for {what}: {detail}\nhint: check that HF_ENDPOINT points at a Hugging Face Hub or a mirror of it"
    )]
    Protocol {
        what: String,
        endpoint: String,
        detail: String,
    },
    #[error(
        "the Hub cache at {cache}: {detail}\nhint: check that the cache directory (HF_HUB_CACHE or HF_HOME) is writable and has space"
    )]
    Cache { cache: String, detail: String },
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// What `HEAD …/resolve/…` says about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileMeta {
    etag: String,
    size: Option<u64>,
    check: Check,
}

/// How a blob is verified, decided by the shape of its ETag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// LFS: the ETag is the sha256 of the content.
    Sha256,
    /// A regular git file: the ETag is its blob id, sha1 over `blob <size>\0<content>`.
    GitBlobSha1,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Sha256 => "sha256",
            Check::GitBlobSha1 => "git blob sha1",
        }
    }
}

/// Downloads models into the cache `env` names.
pub struct HubDownloader {
    env: HubEnv,
    backoff: Backoff,
    /// Follows redirects (API calls, downloads).
    http: reqwest::Client,
    /// Does not: the Hub's LFS metadata is on the redirect itself.
    head: reqwest::Client,
}

impl HubDownloader {
    /// `first_wait` is the first pause between retries (doubling).
    pub fn new(env: HubEnv, first_wait: Duration) -> Result<Self, HubDownloadError> {
        let build = |redirects: reqwest::redirect::Policy| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                // Per read, not per request: a multi-gigabyte file takes as long as it takes.
                .read_timeout(Duration::from_secs(60))
                .redirect(redirects)
                .user_agent(concat!("rlhf-bot/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        let built = build(reqwest::redirect::Policy::limited(10))
            .and_then(|http| Ok((http, build(reqwest::redirect::Policy::none())?)));
        let (http, head) = built.map_err(|e| HubDownloadError::Protocol {
            what: "the HTTP client".into(),
            endpoint: redact_url(&env.endpoint),
            detail: e.to_string(),
        })?;
        Ok(Self {
            env,
            backoff: Backoff {
                max_attempts: MAX_ATTEMPTS,
                first_wait,
            },
            http,
            head,
        })
    }

    pub fn env(&self) -> &HubEnv {
        &self.env
    }

    /// Makes `model` local: its snapshot directory, downloading what the cache lacks.
    pub async fn resolve(&self, model: &HubModelRef) -> Result<Resolved, HubDownloadError> {
        let cache = RepoCache::new(&self.env.cache_dir, &model.repo);
        let cached = self.cached(model, &cache);
        if let Some(hit) = &cached
            && (self.env.offline || model.is_commit())
        {
            return Ok(hit.clone());
        }
        if self.env.offline {
            return Err(HubDownloadError::NotCached {
                model: model.to_string(),
                cache: cache.root().display().to_string(),
            });
        }
        let info = match self.revision_info(model).await {
            Ok(info) => info,
            Err(error @ HubDownloadError::Unreachable { .. }) => match cached {
                Some(hit) => {
                    tracing::warn!(
                        "{error}\nusing the cached snapshot of {model} (commit {})",
                        hit.commit
                    );
                    return Ok(hit);
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        };
        let commit = info.sha;
        let files: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| is_model_file(f))
            .collect();
        if !files.iter().any(|f| f.ends_with(".safetensors")) {
            return Err(HubDownloadError::NoWeights {
                model: model.to_string(),
                commit,
            });
        }
        let snapshot = cache.snapshot(&commit);
        let mut downloaded = Vec::new();
        for file in &files {
            if snapshot.join(file).is_file() {
                continue;
            }
            self.fetch_file(model, &commit, file, &cache).await?;
            downloaded.push(file.clone());
        }
        if model.revision != commit {
            cache
                .write_ref(&model.revision, &commit)
                .map_err(|e| self.cache_error(&cache, e))?;
        }
        cache
            .mark_complete(&commit, &files)
            .map_err(|e| self.cache_error(&cache, e))?;
        tracing::info!(
            model = %model,
            commit = %commit,
            downloaded = downloaded.len(),
            cached = files.len() - downloaded.len(),
            "model from the Hub is ready"
        );
        Ok(Resolved {
            dir: snapshot,
            commit,
            downloaded,
        })
    }

    /// The cached snapshot the revision names, when a finished resolve left it whole.
    fn cached(&self, model: &HubModelRef, cache: &RepoCache) -> Option<Resolved> {
        let commit = if model.is_commit() {
            model.revision.clone()
        } else {
            cache.read_ref(&model.revision)?
        };
        let dir = cache.complete_snapshot(&commit)?;
        Some(Resolved {
            dir,
            commit,
            downloaded: Vec::new(),
        })
    }

    async fn revision_info(&self, model: &HubModelRef) -> Result<RevisionInfo, HubDownloadError> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.env.endpoint,
            model.repo,
            segment(&model.revision)
        );
        let what = format!("model {} at revision {}", model.repo, model.revision);
        let (url, what) = (&url, &what);
        let text = retrying(self.backoff, |_| async move {
            let response = self
                .authorised(self.http.get(url))
                .send()
                .await
                .map_err(|e| Failure::Retry(self.unreachable(model, &e)))?;
            if !response.status().is_success() {
                return Err(self.refusal(response, model, what).await);
            }
            response.text().await.map_err(|e| {
                Failure::Retry(self.protocol(what, format!("reading the answer: {e}")))
            })
        })
        .await?;
        let info: RevisionInfo = serde_json::from_str(&text)
            .map_err(|e| self.protocol(what, format!("not the revision JSON: {e}")))?;
        if !is_commit_sha(&info.sha) {
            return Err(self.protocol(what, "its `sha` is not a 40-hex commit id".into()));
        }
        Ok(info)
    }

    /// Brings one file into `snapshots/<commit>/`, downloading its blob unless cached.
    async fn fetch_file(
        &self,
        model: &HubModelRef,
        commit: &str,
        file: &str,
        cache: &RepoCache,
    ) -> Result<(), HubDownloadError> {
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            self.env.endpoint,
            model.repo,
            segment(file)
        );
        let what = format!("file {file} of {} at commit {commit}", model.repo);
        let (url, what) = (&url, &what);
        let meta = retrying(self.backoff, |_| async move {
            let response = self
                .authorised(self.head.head(url))
                .header(header::ACCEPT_ENCODING, "identity")
                .send()
                .await
                .map_err(|e| Failure::Retry(self.unreachable(model, &e)))?;
            let status = response.status();
            if !(status.is_success() || status.is_redirection()) {
                return Err(self.refusal(response, model, what).await);
            }
            file_meta(response.headers(), commit)
                .map_err(|detail| Failure::Fatal(self.protocol(what, detail)))
        })
        .await?;
        // Held until this file is linked; another process fetching the same blob waits, then
        // finds it present.
        let _lock = self.lock_blob(cache, &meta.etag, what).await?;
        if !cache.blob(&meta.etag).is_file() {
            tracing::info!(model = %model, file, bytes = ?meta.size, "downloading from the Hub");
            self.download_blob(model, url, what, &meta, cache).await?;
        }
        cache
            .link(commit, file, &meta.etag)
            .map_err(|e| self.cache_error(cache, e))
    }

    /// Takes the blob's download lock, waiting while another process (rlhf-bot or an HF tool)
    /// holds it. The lock goes with the returned file (the OS drops it if the process dies).
    async fn lock_blob(
        &self,
        cache: &RepoCache,
        etag: &str,
        what: &str,
    ) -> Result<std::fs::File, HubDownloadError> {
        let path = cache.lock_file(etag);
        let opened = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
            });
        let file = opened.map_err(|e| {
            self.cache_error(
                cache,
                anyhow::Error::from(e).context(format!("opening {}", path.display())),
            )
        })?;
        let mut waited = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !waited {
                        tracing::info!("another process is downloading {what}; waiting for it");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(self.cache_error(
                        cache,
                        anyhow::Error::from(e).context(format!("locking {}", path.display())),
                    ));
                }
            }
        }
    }

    /// Downloads into `blobs/<etag>.incomplete` (resuming what is there), verifies, and moves
    /// the result to `blobs/<etag>`.
    async fn download_blob(
        &self,
        model: &HubModelRef,
        url: &str,
        what: &str,
        meta: &FileMeta,
        cache: &RepoCache,
    ) -> Result<(), HubDownloadError> {
        let partial = cache.incomplete(&meta.etag);
        std::fs::create_dir_all(cache.blobs()).map_err(|e| self.cache_error(cache, e.into()))?;
        let at = &partial;
        let held = || std::fs::metadata(at).map_or(0, |m| m.len());
        // A round of attempts that moved the download forward earns another round, so a flaky
        // link that keeps delivering finishes; a round that delivers nothing gives up, keeping
        // the partial file for the next run to resume.
        loop {
            let before = held();
            match retrying(self.backoff, |_| {
                self.download_attempt(model, url, what, meta, at)
            })
            .await
            {
                Ok(()) => break,
                Err(error) if resumable(&error) && held() > before => {
                    tracing::warn!(
                        "{}; {} bytes are in, trying again",
                        first_line(&error),
                        held()
                    );
                }
                Err(error) if resumable(&error) && held() > 0 => {
                    return Err(self.truncated(what, held(), first_line(&error)));
                }
                Err(error) => return Err(error),
            }
        }
        let (check, etag, path) = (meta.check, meta.etag.clone(), partial.clone());
        let actual = tokio::task::spawn_blocking(move || digest(&path, check))
            .await
            .map_err(|e| self.cache_error(cache, anyhow::anyhow!("hashing thread: {e}")))?
            .map_err(|e| self.cache_error(cache, e.into()))?;
        if actual != etag {
            let _ = std::fs::remove_file(&partial);
            return Err(HubDownloadError::Integrity {
                what: what.to_string(),
                endpoint: redact_url(&self.env.endpoint),
                check: check.name(),
                expected: etag,
                actual,
            });
        }
        std::fs::rename(&partial, cache.blob(&meta.etag))
            .map_err(|e| self.cache_error(cache, e.into()))
    }

    /// One GET of the file: the whole body, or the rest after what `partial` already holds.
    async fn download_attempt(
        &self,
        model: &HubModelRef,
        url: &str,
        what: &str,
        meta: &FileMeta,
        partial: &Path,
    ) -> Result<(), Failure<HubDownloadError>> {
        let have = std::fs::metadata(partial).map_or(0, |m| m.len());
        if have > 0 && meta.size == Some(have) {
            return Ok(()); // every byte arrived before the last try failed
        }
        let mut request = self
            .authorised(self.http.get(url))
            .header(header::ACCEPT_ENCODING, "identity");
        if have > 0 {
            request = request.header(header::RANGE, format!("bytes={have}-"));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| Failure::Retry(self.unreachable(model, &e)))?;
        let append = match response.status() {
            StatusCode::OK => false,
            StatusCode::PARTIAL_CONTENT if range_start(response.headers()) == Some(have) => true,
            StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                // The server's idea of the range differs from ours: start over.
                let _ = std::fs::remove_file(partial);
                return Err(Failure::Retry(self.protocol(
                    what,
                    format!("it did not resume at byte {have}; downloading from the start"),
                )));
            }
            _ => return Err(self.refusal(response, model, what).await),
        };
        if append {
            tracing::info!(model = %model, resumed_at = have, "resuming a partial download");
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).write(true);
        if append {
            options.append(true);
        } else {
            options.truncate(true);
        }
        let io_error = |e: std::io::Error| {
            Failure::Fatal(HubDownloadError::Cache {
                cache: partial.display().to_string(),
                detail: e.to_string(),
            })
        };
        let mut out = options.open(partial).await.map_err(io_error)?;
        let mut received = if append { have } else { 0 };
        loop {
            match response.chunk().await {
                Ok(Some(bytes)) => {
                    received += bytes.len() as u64;
                    if let Some(size) = meta.size
                        && received > size
                    {
                        drop(out);
                        let _ = std::fs::remove_file(partial);
                        return Err(Failure::Fatal(HubDownloadError::Integrity {
                            what: what.to_string(),
                            endpoint: redact_url(&self.env.endpoint),
                            check: "size",
                            expected: format!("{size} bytes"),
                            actual: format!("more than {}", received - bytes.len() as u64),
                        }));
                    }
                    out.write_all(&bytes).await.map_err(io_error)?;
                }
                Ok(None) => break,
                Err(e) => {
                    out.flush().await.map_err(io_error)?;
                    return Err(Failure::Retry(self.truncated(
                        what,
                        received,
                        describe_transport(&e),
                    )));
                }
            }
        }
        out.flush().await.map_err(io_error)?;
        match meta.size {
            Some(size) if received < size => Err(Failure::Retry(self.truncated(
                what,
                received,
                format!("the body ended {} bytes short", size - received),
            ))),
            _ => Ok(()),
        }
    }

    fn authorised(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.env.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    /// A non-2xx answer as an error, retryable when the Hub may answer differently later.
    async fn refusal(
        &self,
        response: Response,
        model: &HubModelRef,
        what: &str,
    ) -> Failure<HubDownloadError> {
        let status = response.status().as_u16();
        let endpoint = redact_url(&self.env.endpoint);
        match status {
            401 | 403 if self.env.token.is_none() => Failure::Fatal(HubDownloadError::NeedsToken {
                repo: model.repo.clone(),
                endpoint,
                status,
                token_file: self.env.token_file.display().to_string(),
            }),
            401 | 403 => Failure::Fatal(HubDownloadError::TokenRefused {
                repo: model.repo.clone(),
                endpoint,
                status,
            }),
            404 => Failure::Fatal(HubDownloadError::NotFound {
                what: what.to_string(),
                endpoint,
            }),
            _ => {
                let hub_message = response
                    .headers()
                    .get("x-error-message")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = match hub_message {
                    Some(message) => message,
                    None => error_text(response).await,
                };
                let secrets: Vec<&str> = self.env.token.iter().map(|t| t.expose()).collect();
                Failure::new(
                    status == 429 || status >= 500,
                    HubDownloadError::Status {
                        what: what.to_string(),
                        endpoint,
                        status,
                        body: error_body_excerpt(&body, &secrets),
                    },
                )
            }
        }
    }

    fn unreachable(&self, model: &HubModelRef, e: &reqwest::Error) -> HubDownloadError {
        HubDownloadError::Unreachable {
            repo: model.repo.clone(),
            endpoint: redact_url(&self.env.endpoint),
            detail: redact_url(&describe_transport(e)),
            cache: self.env.cache_dir.display().to_string(),
        }
    }

    fn truncated(&self, what: &str, received: u64, detail: String) -> HubDownloadError {
        HubDownloadError::Truncated {
            what: what.to_string(),
            endpoint: redact_url(&self.env.endpoint),
            received,
            detail: redact_url(&detail),
        }
    }

    fn protocol(&self, what: &str, detail: String) -> HubDownloadError {
        HubDownloadError::Protocol {
            what: what.to_string(),
            endpoint: redact_url(&self.env.endpoint),
            detail,
        }
    }

    fn cache_error(&self, cache: &RepoCache, e: anyhow::Error) -> HubDownloadError {
        HubDownloadError::Cache {
            cache: cache.root().display().to_string(),
            detail: format!("{e:#}"),
        }
    }
}

/// Whether a failed download may succeed later from where it stopped (not a refusal, a failed
/// check or a local problem).
fn resumable(error: &HubDownloadError) -> bool {
    matches!(
        error,
        HubDownloadError::Truncated { .. }
            | HubDownloadError::Unreachable { .. }
            | HubDownloadError::Status { .. }
            | HubDownloadError::Protocol { .. }
    )
}

/// An error's first line (what failed), without its hint.
fn first_line(error: &HubDownloadError) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `text` as one URL path segment (a `/` in a branch name or file becomes `%2F`, as
/// `huggingface_hub` quotes it).
fn segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Reads the resolve answer's headers: the ETag (LFS first), the size, and that the file is of
/// the commit asked for.
fn file_meta(headers: &HeaderMap, commit: &str) -> Result<FileMeta, String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(served) = text("x-repo-commit")
        && served != commit
    {
        return Err(format!(
            "X-Repo-Commit is {served}, not the commit {commit} that was asked for"
        ));
    }
    let raw = text("x-linked-etag")
        .or_else(|| text("etag"))
        .ok_or("no X-Linked-Etag or ETag header")?;
    let etag = raw
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string();
    // The ETag becomes a file name and says how to verify the content: only hex digests pass.
    let check = match etag.len() {
        64 if is_lower_hex(&etag) => Check::Sha256,
        40 if is_lower_hex(&etag) => Check::GitBlobSha1,
        _ => {
            return Err(format!(
                "the ETag {raw:?} is neither a sha256 (LFS file) nor a git blob sha1, so the download could not be verified"
            ));
        }
    };
    let size = text("x-linked-size")
        .or_else(|| text("content-length"))
        .and_then(|v| v.trim().parse().ok());
    Ok(FileMeta { etag, size, check })
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where a 206's `Content-Range: bytes START-END/TOTAL` starts.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    value
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The digest of a downloaded file the way its ETag was made.
fn digest(path: &Path, check: Check) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut feed = |update: &mut dyn FnMut(&[u8])| -> std::io::Result<()> {
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok(());
            }
            update(&buffer[..n]);
        }
    };
    Ok(match check {
        Check::Sha256 => {
            let mut hasher = Sha256::new();
            feed(&mut |bytes| hasher.update(bytes))?;
            hex::encode(hasher.finalize())
        }
        Check::GitBlobSha1 => {
            let mut hasher = Sha1::new();
            hasher.update(format!("blob {}\0", std::fs::metadata(path)?.len()).as_bytes());
            feed(&mut |bytes| hasher.update(bytes))?;
            hex::encode(hasher.finalize())
        }
    })
}

/// The start of a refusal's body, for the message (a hostile server cannot make us hold more).
async fn error_text(mut response: Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_a_model_directory_needs() {
        for f in [
            "config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "chat_template.jinja",
            "generation_config.json",
        ] {
            assert!(is_model_file(f), "{f}");
        }
        for f in [
            "README.md",
            "pytorch_model.bin",
            ".gitattributes",
            "onnx/model.safetensors",
            "model.gguf",
        ] {
            assert!(!is_model_file(f), "{f}");
        }
    }

    #[test]
    fn resolve_headers_name_the_blob_and_its_check() {
        let sha256 = "a".repeat(64);
        let mut h = HeaderMap::new();
        h.insert("x-linked-etag", format!("\"{sha256}\"").parse().unwrap());
        h.insert("etag", "W/\"ignored\"".parse().unwrap());
        h.insert("x-linked-size", "1234".parse().unwrap());
        h.insert("x-repo-commit", "c0ffee".parse().unwrap());
        let meta = file_meta(&h, "c0ffee").unwrap();
        assert_eq!(
            meta,
            FileMeta {
                etag: sha256,
                size: Some(1234),
                check: Check::Sha256
            }
        );
        assert!(
            file_meta(&h, "other")
                .unwrap_err()
                .contains("X-Repo-Commit")
        );
        let mut h = HeaderMap::new();
        h.insert("etag", format!("\"{}\"", "b".repeat(40)).parse().unwrap());
        h.insert("content-length", "9".parse().unwrap());
        let meta = file_meta(&h, "c").unwrap();
        assert_eq!(meta.check, Check::GitBlobSha1);
        assert_eq!(meta.size, Some(9));
        let mut h = HeaderMap::new();
        h.insert("etag", "\"../../etc/passwd\"".parse().unwrap());
        assert!(
            file_meta(&h, "c")
                .unwrap_err()
                .contains("could not be verified")
        );
    }

    #[test]
    fn git_blob_ids_match_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello\n").unwrap();
        assert_eq!(
            digest(&file, Check::GitBlobSha1).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            digest(&file, Check::Sha256).unwrap(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }

    #[test]
    fn revisions_and_files_are_one_path_segment() {
        assert_eq!(segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(segment("a b"), "a%20b");
        let mut h = HeaderMap::new();
        h.insert("content-range", "bytes 100-199/200".parse().unwrap());
        assert_eq!(range_start(&h), Some(100));
    }
}
