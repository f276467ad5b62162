//! `rlhf-bot deploy`: after a merge moved `production` in the registry, publish that model where
//! serving picks it up, and tell serving. For each kind whose production model differs from the
//! live manifest (or whose last deployment was left incomplete):
//!
//! 1. verify every artifact to publish against the registry's sha256, before anything is uploaded;
//! 2. export the configured serving formats ([`ServingFormat`]) through an [`Exporter`];
//! 3. upload them under `production/<kind>/versions/<id>/`, then switch the kind's manifest in
//!    one put ([`production`] owns that ordering), and prune versions beyond `deploy.keep`; a
//!    kept version whose files are intact is switched back to without exporting again (a
//!    rollback);
//! 4. notify ([`notify`]), commit the kind `deploy.hub` names to a Hugging Face Hub repository
//!    ([`hub`]), and append a [`manifest::DeploymentRecord`]: `complete`, or `incomplete` with
//!    the error, which the next run retries.
//!
//! The model export and the secrets come from the caller (`app::deploy`), so this module knows
//! nothing of clap or the environment, and tests can inject faults at each seam.

pub mod format;
pub mod hub;
pub mod manifest;
pub mod notify;
pub mod production;
pub mod settings;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

pub use format::ServingFormat;
use manifest::{DeploymentRecord, Manifest, RecordStatus};
pub use production::ProductionStore;

use crate::artifacts::ArtifactStore;
use crate::deploy::settings::{DeploySettings, DispatchSettings, HubSettings, WebhookSettings};
use crate::forge::github::{RetryPolicy, SecretToken};
use crate::model_kind::ModelKind;
use crate::registry::{ModelEntry, Registry};
use crate::secret::SecretString;

/// Writes one serving format of a verified model directory.
pub trait Exporter {
    /// Writes `format` of the `kind` model in `model_dir` into the empty directory `out`.
    fn export(
        &self,
        kind: ModelKind,
        format: ServingFormat,
        model_dir: &Path,
        out: &Path,
    ) -> Result<()>;
}

/// The notifications to send, with their secrets already read.
#[derive(Debug, Default)]
pub struct Notifiers {
    pub webhook: Option<(WebhookSettings, SecretString)>,
    pub dispatch: Option<(DispatchSettings, SecretToken, RetryPolicy)>,
    pub hub: Option<(HubSettings, SecretString)>,
    /// First wait between webhook (and Hub) attempts; doubles each time.
    pub backoff: Duration,
}

pub const WEBHOOK: &str = "webhook";
pub const DISPATCH: &str = "repository_dispatch";
/// In a record's `notified`: the Hub commit was made.
pub const HUB: &str = "hf_hub";

#[derive(Debug)]
pub struct DeployRequest<'a> {
    pub kinds: Vec<ModelKind>,
    pub settings: &'a DeploySettings,
    /// Verify and say what would happen; upload and notify nothing.
    pub dry_run: bool,
    pub now: DateTime<Utc>,
    /// A local directory for the exports (cleared per version).
    pub staging: PathBuf,
}

/// What happened to one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing to deploy (no production model, or no formats configured).
    Skipped,
    /// The live manifest already names the production model and its record is complete.
    Unchanged,
    /// Exported, uploaded and switched.
    Published,
    /// Switched back to a kept version without exporting again (a rollback).
    Republished,
    /// Already live; only the notification of an incomplete deployment was sent again.
    Renotified,
    /// `--dry-run`: what a real run would do.
    WouldPublish,
    WouldRenotify,
}

#[derive(Debug, Clone, Serialize)]
pub struct KindOutcome {
    pub kind: ModelKind,
    /// The production model's registry id.
    pub id: Option<String>,
    pub action: Action,
    /// Why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The record this run wrote (`None` when it wrote none).
    pub status: Option<RecordStatus>,
    pub manifest: String,
    pub formats: BTreeMap<ServingFormat, String>,
    /// Version ids removed beyond `deploy.keep`.
    pub pruned: Vec<String>,
    pub notified: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `deploy --format json`: `{"dry_run", "records", "kinds": [KindOutcome…]}`.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    pub dry_run: bool,
    /// The URI of `production/deployments.jsonl`.
    pub records: String,
    pub kinds: Vec<KindOutcome>,
}

impl KindOutcome {
    fn new(
        production: &ProductionStore,
        kind: ModelKind,
        id: Option<&str>,
        action: Action,
    ) -> Self {
        Self {
            kind,
            id: id.map(str::to_string),
            action,
            reason: None,
            status: None,
            manifest: production.manifest_uri(kind),
            formats: BTreeMap::new(),
            pruned: Vec::new(),
            notified: Vec::new(),
            error: None,
        }
    }
}

impl DeployReport {
    /// The kinds whose deployment is incomplete (a notification failed).
    pub fn incomplete(&self) -> Vec<&KindOutcome> {
        self.kinds.iter().filter(|k| k.error.is_some()).collect()
    }
}

impl std::fmt::Display for DeployReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for k in &self.kinds {
            let id = k.id.as_deref().unwrap_or("none");
            let action = serde_json::to_value(k.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
                .replace('_', " ");
            write!(f, "{} {id}: {action}", k.kind)?;
            if let Some(reason) = &k.reason {
                write!(f, " ({reason})")?;
            }
            if !k.formats.is_empty() {
                let names: Vec<&str> = k.formats.keys().map(|f| f.as_str()).collect();
                write!(f, "; formats {}; manifest {}", names.join(", "), k.manifest)?;
            }
            if !k.pruned.is_empty() {
                write!(f, "; removed old versions {}", k.pruned.join(", "))?;
            }
            if let Some(status) = k.status {
                let status = if status == RecordStatus::Complete {
                    "complete"
                } else {
                    "incomplete"
                };
                write!(f, "; record {status}")?;
            }
            writeln!(f)?;
        }
        write!(f, "deployment records: {}", self.records)
    }
}

/// What is live for one kind, as `registry show` summarises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveView {
    pub id: String,
    pub deployed_at: String,
    pub formats: Vec<ServingFormat>,
    /// The newest record of this deployment; `None` when none was written (a crash between the
    /// switch and the record: the next `deploy` notifies and records).
    pub status: Option<RecordStatus>,
}

/// The live manifest of each kind with the status of its newest record.
pub async fn live(production: &ProductionStore) -> Result<BTreeMap<ModelKind, LiveView>> {
    let records = production.records().await?;
    let mut out = BTreeMap::new();
    for kind in [ModelKind::Reward, ModelKind::Policy] {
        if let Some((m, _)) = production.manifest(kind).await? {
            let status = records
                .iter()
                .rev()
                .find(|r| r.kind == kind && r.id == m.id && r.deployed_at == m.deployed_at)
                .map(|r| r.status);
            out.insert(
                kind,
                LiveView {
                    formats: m.format_names(),
                    id: m.id,
                    deployed_at: m.deployed_at,
                    status,
                },
            );
        }
    }
    Ok(out)
}

/// The per-kind decision, made before anything is written.
struct Plan<'r> {
    kind: ModelKind,
    entry: &'r ModelEntry,
    formats: Vec<ServingFormat>,
    /// The live manifest and the sha256 of its bytes.
    live: Option<(Manifest, String)>,
    publish: bool,
    /// Notifications already acknowledged for the live deployment (when not publishing).
    acknowledged: Vec<String>,
    notify: bool,
    /// The verified artifact directory (publishing only).
    model_dir: Option<PathBuf>,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Runs blocking work (hashing, exporting) without stalling a multi-threaded runtime's other
/// tasks; on a current-thread runtime it simply runs.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Deploys the production models of `request.kinds`. A checksum mismatch or a failed upload is
/// an `Err` (nothing switched for that kind; the previous manifest stays live). A failed
/// notification is reported in the outcome (`error`, record `incomplete`), after the other
/// kinds were handled.
pub async fn deploy(
    registry: &Registry,
    artifacts: &dyn ArtifactStore,
    production: &ProductionStore,
    exporter: &dyn Exporter,
    notifiers: &Notifiers,
    request: &DeployRequest<'_>,
) -> Result<DeployReport> {
    let records = production.records().await?;
    let mut outcomes = Vec::new();
    let mut plans = Vec::new();
    for &kind in &request.kinds {
        let formats = request.settings.formats(kind).to_vec();
        let skip = |reason: String| KindOutcome {
            reason: Some(reason),
            ..KindOutcome::new(production, kind, None, Action::Skipped)
        };
        if formats.is_empty() {
            outcomes.push(skip(format!("deploy.formats.{kind} is empty")));
            continue;
        }
        let Some(entry) = registry.production(kind) else {
            outcomes.push(skip(format!("no {kind} model holds `production`")));
            continue;
        };
        let live = production.manifest(kind).await?;
        let publish = live.as_ref().is_none_or(|(m, _)| {
            m.id != entry.id
                || m.format_names() != formats
                || m.artifact_sha256 != entry.artifact.sha256
        });
        let last = live.as_ref().and_then(|(m, _)| {
            records
                .iter()
                .rev()
                .find(|r| r.kind == kind && r.id == m.id && r.deployed_at == m.deployed_at)
        });
        let complete = last.is_some_and(|r| r.status == RecordStatus::Complete);
        plans.push(Plan {
            kind,
            entry,
            formats,
            live,
            publish,
            acknowledged: last.map(|r| r.notified.clone()).unwrap_or_default(),
            notify: publish || !complete,
            model_dir: None,
        });
    }
    // Every artifact is verified before the first upload, so a corrupt one stops the whole
    // deployment with nothing written.
    for plan in plans.iter_mut().filter(|p| p.publish) {
        let dir = blocking(|| artifacts.materialize(&plan.entry.artifact)).with_context(|| {
            format!(
                "verifying the artifact of the production {} model {} against the registry; nothing was uploaded",
                plan.kind, plan.entry.id
            )
        })?;
        plan.model_dir = Some(dir);
    }
    for plan in plans {
        let outcome = if request.dry_run {
            dry_run_outcome(production, &plan)
        } else {
            let mut outcome = carry_out(production, exporter, request, &records, &plan).await?;
            if plan.notify {
                notify_and_record(production, notifiers, request, &plan, &mut outcome).await?;
            }
            outcome
        };
        outcomes.push(outcome);
    }
    outcomes.sort_by_key(|o| o.kind);
    Ok(DeployReport {
        dry_run: request.dry_run,
        records: production.records_uri(),
        kinds: outcomes,
    })
}

fn dry_run_outcome(production: &ProductionStore, plan: &Plan<'_>) -> KindOutcome {
    let action = match (plan.publish, plan.notify) {
        (true, _) => Action::WouldPublish,
        (false, true) => Action::WouldRenotify,
        (false, false) => Action::Unchanged,
    };
    let mut outcome = KindOutcome::new(production, plan.kind, Some(&plan.entry.id), action);
    if let Some((live, _)) = plan.live.as_ref().filter(|_| !plan.publish) {
        outcome.formats = uris(&live.formats);
    }
    outcome
}

fn uris(
    formats: &BTreeMap<ServingFormat, manifest::PublishedFormat>,
) -> BTreeMap<ServingFormat, String> {
    formats.iter().map(|(f, p)| (*f, p.uri.clone())).collect()
}

/// Publishes (or reuses) the version and switches the manifest when the plan says so.
async fn carry_out(
    production: &ProductionStore,
    exporter: &dyn Exporter,
    request: &DeployRequest<'_>,
    records: &[DeploymentRecord],
    plan: &Plan<'_>,
) -> Result<KindOutcome> {
    let (kind, id) = (plan.kind, plan.entry.id.as_str());
    let mut outcome = KindOutcome::new(production, kind, Some(id), Action::Unchanged);
    if !plan.publish {
        if let Some((m, _)) = &plan.live {
            outcome.formats = uris(&m.formats);
        }
        if plan.notify {
            outcome.action = Action::Renotified;
        }
        return Ok(outcome);
    }
    let failed = || {
        format!(
            "publishing the {kind} model {id} failed, so the previous manifest is still live (once the cause is fixed, `rlhf-bot deploy` completes it)"
        )
    };
    let kept = production.release(kind, id).await.with_context(failed)?;
    let reusable = match kept {
        Some(r)
            if r.format_names() == plan.formats
                && r.artifact_sha256 == plan.entry.artifact.sha256 =>
        {
            production
                .intact(&r)
                .await
                .with_context(failed)?
                .then_some(r)
        }
        _ => None,
    };
    let release = match reusable {
        Some(release) => {
            outcome.action = Action::Republished;
            release
        }
        None => {
            outcome.action = Action::Published;
            let model_dir = plan
                .model_dir
                .as_deref()
                .expect("verified before publishing");
            let staging = request.staging.join(kind.as_str()).join(id);
            let staged =
                blocking(|| export_all(exporter, kind, &plan.formats, model_dir, &staging))
                    .with_context(failed)?;
            let staged_refs: Vec<(ServingFormat, &Path)> =
                staged.iter().map(|(f, d)| (*f, d.as_path())).collect();
            let release = production
                .upload_version(kind, id, &plan.entry.artifact.sha256, &staged_refs)
                .await
                .with_context(failed);
            let _ = std::fs::remove_dir_all(&staging);
            release?
        }
    };
    let manifest = Manifest::of(
        &release,
        production.release_uri(kind, id),
        time(request.now),
    );
    production.switch(&manifest).await.with_context(failed)?;
    tracing::info!(%kind, id, "production manifest switched");
    outcome.formats = uris(&release.formats);
    // Keep the live version and the most recently deployed others, newest first.
    let mut keep = BTreeSet::from([id.to_string()]);
    for r in records.iter().rev().filter(|r| r.kind == kind) {
        if keep.len() >= request.settings.keep.max(1) {
            break;
        }
        keep.insert(r.id.clone());
    }
    outcome.pruned = production
        .prune(kind, &keep)
        .await
        .with_context(|| format!("removing {kind} versions beyond deploy.keep"))?;
    Ok(outcome)
}

/// Exports every format into `staging/<format>/`, from a clean directory.
fn export_all(
    exporter: &dyn Exporter,
    kind: ModelKind,
    formats: &[ServingFormat],
    model_dir: &Path,
    staging: &Path,
) -> Result<Vec<(ServingFormat, PathBuf)>> {
    if staging.exists() {
        std::fs::remove_dir_all(staging)
            .with_context(|| format!("clearing {}", staging.display()))?;
    }
    let mut out = Vec::new();
    for &format in formats {
        let dir = staging.join(format.as_str());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        exporter
            .export(kind, format, model_dir, &dir)
            .with_context(|| format!("exporting {format}"))?;
        out.push((format, dir));
    }
    Ok(out)
}

/// Commits the live version's files to the Hub: the `hf` format at the repository's root (what
/// `from_pretrained(repo)` loads), every other format under a folder of its name.
async fn push_to_hub(
    production: &ProductionStore,
    settings: &HubSettings,
    token: &SecretString,
    manifest: &Manifest,
    backoff: Duration,
) -> Result<hub::HubCommit> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    for (format, published) in &manifest.formats {
        for file in &published.files {
            let content = production
                .published_file(manifest.kind, &manifest.id, *format, &file.path)
                .await?
                .with_context(|| {
                    format!("{}{} is listed but not stored", published.uri, file.path)
                })?;
            let sha256 = hex::encode(Sha256::digest(&content));
            if sha256 != file.sha256 {
                anyhow::bail!(
                    "{}{} does not hash as release.json says; nothing was pushed to the Hub\nhint: remove the version directory so that `rlhf-bot deploy` republishes it",
                    published.uri,
                    file.path
                );
            }
            let path = match format {
                ServingFormat::Hf => file.path.clone(),
                other => format!("{other}/{}", file.path),
            };
            files.push(hub::HubFile {
                path,
                content,
                sha256,
            });
        }
    }
    let summary = format!("rlhf-bot deploy: {} {}", manifest.kind, manifest.id);
    let description = format!(
        "Production {} model {} (artifact sha256 {}), deployed at {}; formats: {}.",
        manifest.kind,
        manifest.id,
        manifest.artifact_sha256,
        manifest.deployed_at,
        manifest
            .format_names()
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let client = hub::HubClient::new(settings, token, backoff)?;
    Ok(client.push(&files, &summary, &description).await?)
}

/// What the webhook receives (and, trimmed, the dispatch's `client_payload`).
#[derive(Debug, Serialize)]
struct Payload<'a> {
    event: &'static str,
    kind: ModelKind,
    id: &'a str,
    deployed_at: &'a str,
    manifest: String,
    artifact_sha256: &'a str,
    formats: &'a BTreeMap<ServingFormat, manifest::PublishedFormat>,
}

async fn notify_and_record(
    production: &ProductionStore,
    notifiers: &Notifiers,
    request: &DeployRequest<'_>,
    plan: &Plan<'_>,
    outcome: &mut KindOutcome,
) -> Result<()> {
    let kind = plan.kind;
    let (manifest, manifest_sha256) = production
        .manifest(kind)
        .await?
        .context("the manifest vanished right after it was written")?;
    let mut notified = if plan.publish {
        Vec::new()
    } else {
        plan.acknowledged.clone()
    };
    let payload = Payload {
        event: "deployed",
        kind,
        id: &manifest.id,
        deployed_at: &manifest.deployed_at,
        manifest: production.manifest_uri(kind),
        artifact_sha256: &manifest.artifact_sha256,
        formats: &manifest.formats,
    };
    let mut errors = Vec::new();
    if let Some((settings, secret)) = &notifiers.webhook
        && !notified.iter().any(|n| n == WEBHOOK)
    {
        let body = serde_json::to_vec(&payload).expect("a payload serialises");
        let key = format!("{}@{}", manifest.id, manifest.deployed_at);
        match notify::send_webhook(settings, secret, &body, &key, notifiers.backoff).await {
            Ok(_) => notified.push(WEBHOOK.into()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some((settings, token, policy)) = &notifiers.dispatch
        && !notified.iter().any(|n| n == DISPATCH)
    {
        let uris: BTreeMap<ServingFormat, &str> = manifest
            .formats
            .iter()
            .map(|(f, p)| (*f, p.uri.as_str()))
            .collect();
        let client_payload = serde_json::json!({
            "kind": kind,
            "id": manifest.id,
            "deployed_at": manifest.deployed_at,
            "manifest": payload.manifest,
            "artifact_sha256": manifest.artifact_sha256,
            "formats": uris,
        });
        match notify::send_dispatch(settings, token.clone(), client_payload, policy.clone()).await {
            Ok(()) => notified.push(DISPATCH.into()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some((settings, token)) = &notifiers.hub
        && settings.kind == kind
        && !notified.iter().any(|n| n == HUB)
    {
        match push_to_hub(production, settings, token, &manifest, notifiers.backoff).await {
            Ok(commit) => {
                tracing::info!(%kind, repo = %settings.repo, commit = %commit.commit_oid, "committed to the Hugging Face Hub");
                notified.push(HUB.into());
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let status = if errors.is_empty() {
        RecordStatus::Complete
    } else {
        RecordStatus::Incomplete
    };
    let error = (!errors.is_empty()).then(|| errors.join("\n"));
    let record = DeploymentRecord {
        at: time(request.now),
        kind,
        id: manifest.id.clone(),
        deployed_at: manifest.deployed_at.clone(),
        formats: manifest.format_names(),
        uris: uris(&manifest.formats),
        manifest_sha256,
        status,
        notified: notified.clone(),
        error: error.clone(),
    };
    production
        .append_record(&record)
        .await
        .context("writing the deployment record")?;
    outcome.status = Some(status);
    outcome.notified = notified;
    outcome.error = error;
    Ok(())
}
