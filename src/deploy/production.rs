//! The stable production prefix in the artifact store, and the only code that writes it:
//!
//! ```text
//! production/deployments.jsonl                     one DeploymentRecord per line
//! production/<kind>/manifest.json                  the live version (switched last)
//! production/<kind>/versions/<id>/<format>/…       the payload
//! production/<kind>/versions/<id>/release.json     written after the payload
//! ```
//!
//! Ordering is the whole safety story: a version's files, then its `release.json`, then the
//! kind's `manifest.json` in one put. A failure anywhere before the last put leaves the previous
//! manifest pointing at the previous, complete version; a version directory without
//! `release.json` is cleared before the next attempt. Everything goes through `object_store`, so
//! a local directory and a bucket behave alike.

use std::collections::BTreeSet;
use std::path::Path;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::ServingFormat;
use super::manifest::{DeploymentRecord, FileEntry, Manifest, PublishedFormat, Release, SCHEMA};
use crate::artifacts::{ArtifactError, ObjectRoot, list_files};
use crate::model_kind::ModelKind;

const PRODUCTION: &str = "production";
const MANIFEST: &str = "manifest.json";
const RELEASE: &str = "release.json";
const RECORDS: &str = "deployments.jsonl";
/// Files above this go up as multipart uploads (as the artifact store does).
const PART_SIZE: usize = crate::artifacts::bucket::DEFAULT_PART_SIZE;

/// The production prefix of one artifact location.
#[derive(Debug, Clone)]
pub struct ProductionStore {
    root: ObjectRoot,
}

fn remote(op: &'static str, uri: String, e: object_store::Error) -> ArtifactError {
    ArtifactError::Remote {
        op,
        uri,
        source: Box::new(e),
        hint: "check that the artifact store (registry.artifacts) is reachable and writable with the credentials in the environment",
    }
}

fn bad_json(uri: String, e: serde_json::Error) -> ArtifactError {
    ArtifactError::BadManifest {
        uri,
        line: e.line(),
        reason: format!(
            "{e}\nhint: the file was edited or written by another tool; remove it to republish"
        ),
    }
}

impl ProductionStore {
    pub fn new(root: ObjectRoot) -> Self {
        Self { root }
    }

    /// `production/…` relative key → object path under the location's prefix.
    fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.prefix.clone(), |p, part| p.join(part))
    }

    /// The URI a reader uses for a relative key.
    pub fn uri(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root.base)
    }

    fn kind_dir(kind: ModelKind) -> String {
        format!("{PRODUCTION}/{kind}")
    }

    fn version_dir(kind: ModelKind, id: &str) -> String {
        format!("{PRODUCTION}/{kind}/versions/{id}")
    }

    pub fn manifest_uri(&self, kind: ModelKind) -> String {
        self.uri(&format!("{}/{MANIFEST}", Self::kind_dir(kind)))
    }

    pub fn records_uri(&self) -> String {
        self.uri(&format!("{PRODUCTION}/{RECORDS}"))
    }

    async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        match self.root.store.get(&self.path(rel)).await {
            Ok(got) => Ok(Some(
                got.bytes()
                    .await
                    .map_err(|e| remote("reading", self.uri(rel), e))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("reading", self.uri(rel), e)),
        }
    }

    async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        self.root
            .store
            .put(&self.path(rel), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| remote("writing", self.uri(rel), e))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        rel: &str,
    ) -> Result<Option<T>, ArtifactError> {
        match self.get(rel).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| bad_json(self.uri(rel), e)),
        }
    }

    /// The live manifest of `kind`, if any deployment switched it, with the sha256 of its bytes.
    pub async fn manifest(
        &self,
        kind: ModelKind,
    ) -> Result<Option<(Manifest, String)>, ArtifactError> {
        let rel = format!("{}/{MANIFEST}", Self::kind_dir(kind));
        match self.get(&rel).await? {
            None => Ok(None),
            Some(bytes) => {
                let manifest =
                    serde_json::from_slice(&bytes).map_err(|e| bad_json(self.uri(&rel), e))?;
                Ok(Some((manifest, hex::encode(Sha256::digest(&bytes)))))
            }
        }
    }

    /// The complete release of a version, if one was published (and not pruned).
    pub async fn release(
        &self,
        kind: ModelKind,
        id: &str,
    ) -> Result<Option<Release>, ArtifactError> {
        self.get_json(&format!("{}/{RELEASE}", Self::version_dir(kind, id)))
            .await
    }

    /// The bytes of one file of a published format of version `id` (`None` when missing).
    pub async fn published_file(
        &self,
        kind: ModelKind,
        id: &str,
        format: ServingFormat,
        path: &str,
    ) -> Result<Option<Vec<u8>>, ArtifactError> {
        self.get(&format!("{}/{format}/{path}", Self::version_dir(kind, id)))
            .await
    }

    /// The release's URI (what a manifest names).
    pub fn release_uri(&self, kind: ModelKind, id: &str) -> String {
        self.uri(&format!("{}/{RELEASE}", Self::version_dir(kind, id)))
    }

    /// `true` when every file of `release` is stored and hashes as listed: a kept version is
    /// switched back to only if it is intact.
    pub async fn intact(&self, release: &Release) -> Result<bool, ArtifactError> {
        for (format, published) in &release.formats {
            let dir = format!("{}/{format}", Self::version_dir(release.kind, &release.id));
            for file in &published.files {
                let rel = format!("{dir}/{}", file.path);
                let got = match self.root.store.get(&self.path(&rel)).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => return Ok(false),
                    Err(e) => return Err(remote("reading", self.uri(&rel), e)),
                };
                let mut stream = got.into_stream();
                let mut hasher = Sha256::new();
                let mut size = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| remote("reading", self.uri(&rel), e))?;
                    hasher.update(&chunk);
                    size += chunk.len() as u64;
                }
                if size != file.size_bytes || hex::encode(hasher.finalize()) != file.sha256 {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Uploads the exported formats of version `id` (each a local directory) and writes its
    /// `release.json` last. Whatever a failed attempt left in the version directory is cleared
    /// first.
    pub async fn upload_version(
        &self,
        kind: ModelKind,
        id: &str,
        artifact_sha256: &str,
        staged: &[(ServingFormat, &Path)],
    ) -> Result<Release, ArtifactError> {
        let version = Self::version_dir(kind, id);
        self.delete_under(&version).await?;
        let mut release = Release {
            schema: SCHEMA,
            kind,
            id: id.to_string(),
            artifact_sha256: artifact_sha256.to_string(),
            formats: Default::default(),
        };
        for (format, dir) in staged {
            let format_dir = format!("{version}/{format}");
            let mut files = Vec::new();
            for rel in list_files(dir)? {
                let key = format!("{format_dir}/{rel}");
                let (sha256, size_bytes) = crate::artifacts::bucket::upload_file(
                    &*self.root.store,
                    &dir.join(&rel),
                    &self.path(&key),
                    &self.uri(&key),
                    PART_SIZE,
                )
                .await?;
                files.push(FileEntry {
                    path: rel,
                    sha256,
                    size_bytes,
                });
            }
            release.formats.insert(
                *format,
                PublishedFormat {
                    uri: self.uri(&format!("{format_dir}/")),
                    files,
                },
            );
        }
        let body = serde_json::to_vec_pretty(&release).expect("a release serialises");
        self.put(&format!("{version}/{RELEASE}"), body).await?;
        Ok(release)
    }

    /// Points `production/<kind>/manifest.json` at `manifest`, in one put; returns the sha256 of
    /// the bytes written.
    pub async fn switch(&self, manifest: &Manifest) -> Result<String, ArtifactError> {
        let body = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
        let sha = hex::encode(Sha256::digest(&body));
        self.put(
            &format!("{}/{MANIFEST}", Self::kind_dir(manifest.kind)),
            body,
        )
        .await?;
        Ok(sha)
    }

    /// Every deployment record, oldest first.
    pub async fn records(&self) -> Result<Vec<DeploymentRecord>, ArtifactError> {
        let rel = format!("{PRODUCTION}/{RECORDS}");
        let Some(bytes) = self.get(&rel).await? else {
            return Ok(Vec::new());
        };
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| bad_json(self.uri(&rel), e)))
            .collect()
    }

    /// Appends a record (read, add a line, write back: object stores have no append; deploys
    /// run one at a time, as the workflow's concurrency group ensures).
    pub async fn append_record(&self, record: &DeploymentRecord) -> Result<(), ArtifactError> {
        let rel = format!("{PRODUCTION}/{RECORDS}");
        let mut bytes = self.get(&rel).await?.unwrap_or_default();
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        serde_json::to_writer(&mut bytes, record).expect("a record serialises");
        bytes.push(b'\n');
        self.put(&rel, bytes).await
    }

    /// The ids with a version directory under `production/<kind>/versions/`.
    pub async fn version_ids(&self, kind: ModelKind) -> Result<BTreeSet<String>, ArtifactError> {
        let rel = format!("{}/versions", Self::kind_dir(kind));
        let listed = self
            .root
            .store
            .list_with_delimiter(Some(&self.path(&rel)))
            .await
            .map_err(|e| remote("listing", self.uri(&rel), e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Deletes the version directories of `kind` whose ids are not in `keep`; returns their ids.
    pub async fn prune(
        &self,
        kind: ModelKind,
        keep: &BTreeSet<String>,
    ) -> Result<Vec<String>, ArtifactError> {
        let mut removed = Vec::new();
        for id in self.version_ids(kind).await? {
            if !keep.contains(&id) {
                self.delete_under(&Self::version_dir(kind, &id)).await?;
                removed.push(id);
            }
        }
        Ok(removed)
    }

    async fn delete_under(&self, rel: &str) -> Result<(), ArtifactError> {
        let dir = self.path(rel);
        let mut listing = self.root.store.list(Some(&dir));
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            found.push(
                meta.map_err(|e| remote("listing", self.uri(rel), e))?
                    .location,
            );
        }
        // The release marker first: a half-deleted version must never look complete.
        found.sort_by_key(|p| p.filename() != Some(RELEASE));
        for location in found {
            self.root
                .store
                .delete(&location)
                .await
                .map_err(|e| remote("deleting", self.uri(rel), e))?;
        }
        Ok(())
    }
}
