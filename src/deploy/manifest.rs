//! What a deployment writes for readers: the per-version `release.json` (the payload's files and
//! their sha256s, written after the payload), the live `manifest.json` (the release plus when it
//! went live, switched last), and the deployment records (`production/deployments.jsonl`). Plain
//! serde types, so serving code in any language can read them (docs/serving.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ServingFormat;
use crate::model_kind::ModelKind;

/// Bumped on incompatible changes to `release.json` / `manifest.json`.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the format's URI, `/`-separated.
    pub path: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// One format of one version: where it is and what its files hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedFormat {
    /// The directory's URI, ending in `/`.
    pub uri: String,
    pub files: Vec<FileEntry>,
}

/// `production/<kind>/versions/<id>/release.json`: a complete payload. A version directory
/// without it is the rest of a failed upload and is never pointed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub schema: u32,
    pub kind: ModelKind,
    /// The registry id.
    pub id: String,
    /// The registry's sha256 of the artifact the formats were exported from.
    pub artifact_sha256: String,
    pub formats: BTreeMap<ServingFormat, PublishedFormat>,
}

impl Release {
    pub fn format_names(&self) -> Vec<ServingFormat> {
        self.formats.keys().copied().collect()
    }
}

/// `production/<kind>/manifest.json`: the live version. Replaced in one put, so a reader sees
/// the old release or the new one, never a mix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub kind: ModelKind,
    pub id: String,
    pub artifact_sha256: String,
    /// RFC 3339, UTC: when this deployment switched the manifest.
    pub deployed_at: String,
    /// The `release.json` this manifest copies.
    pub release: String,
    pub formats: BTreeMap<ServingFormat, PublishedFormat>,
}

impl Manifest {
    pub fn of(release: &Release, release_uri: String, deployed_at: String) -> Self {
        Self {
            schema: SCHEMA,
            kind: release.kind,
            id: release.id.clone(),
            artifact_sha256: release.artifact_sha256.clone(),
            deployed_at,
            release: release_uri,
            formats: release.formats.clone(),
        }
    }

    pub fn format_names(&self) -> Vec<ServingFormat> {
        self.formats.keys().copied().collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    /// Published and every configured notification acknowledged.
    Complete,
    /// Published, but a notification failed; the next `deploy` retries it.
    Incomplete,
}

/// One line of `production/deployments.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// When this record was written (RFC 3339, UTC).
    pub at: String,
    pub kind: ModelKind,
    pub id: String,
    /// The manifest's `deployed_at`: a record belongs to one switch of the manifest.
    pub deployed_at: String,
    pub formats: Vec<ServingFormat>,
    pub uris: BTreeMap<ServingFormat, String>,
    /// sha256 of the manifest bytes as written.
    pub manifest_sha256: String,
    pub status: RecordStatus,
    /// The notifications that were acknowledged (`webhook`, `repository_dispatch`).
    #[serde(default)]
    pub notified: Vec<String>,
    /// Why the record is incomplete (no secrets, no URLs with credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
