//! Artifacts in an object store bucket (`s3://`, `gs://`, `az://`/`abfs://`), through the
//! `object_store` crate, in the same layout and manifest format as [`super::FileStore`]:
//! `<prefix>/<kind>/<id>/<files…>` plus `<prefix>/<kind>/<id>/SHA256SUMS`.
//!
//! Why it looks the way it does:
//! - **The manifest is written last.** An artifact without its manifest is never valid (every
//!   read starts from the manifest), so an upload that fails halfway leaves objects that nothing
//!   will load; they are deleted on a best-effort basis, and cleared before the next attempt.
//! - **Files are hashed while they are uploaded**, in one read, and streamed: files above the part
//!   size go up as multipart uploads with a bounded number of parts in flight, so memory stays at
//!   a few parts whatever the model's size. The manifest lists the hashes of the bytes that were
//!   sent, so a file that changes or vanishes mid-upload fails the upload instead of registering
//!   a checksum that no stored copy matches.
//! - **Reading verifies.** `verify` streams every object through sha256 without touching disk;
//!   `materialize` downloads into a local cache and checks the copy with [`super::verify_dir`].
//! - **Sync outside, async inside.** [`super::ArtifactStore`] is synchronous (it is called between
//!   CPU-bound stages), `object_store` is async, and the binary already runs on a tokio runtime
//!   that must not be nested. Each store owns one small current-thread runtime on a thread of its
//!   own (the [`Bridge`]); calls hand it a future and wait. Keeping one runtime for the store's
//!   life matters: an HTTP client whose pooled connections belonged to a dropped runtime fails
//!   with "dispatch task is gone".
//! - **Credentials come from the environment** (`AWS_*`, `GOOGLE_*`, `AZURE_*`, read as the
//!   builders' `from_env` would, except that empty values count as unset), never from the
//!   config, and are never printed: this type's `Debug` shows only the URL.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use super::{
    ArtifactError, ArtifactRef, ArtifactStore, MANIFEST, ManifestEntry, check_id, check_sha,
    check_total, digest, io_err, manifest_text, parse_manifest, source_files, verify_dir,
};
use crate::model_kind::ModelKind;

/// Default multipart part size: 16 MiB parts allow files up to 160 GB (S3 takes 10,000 parts)
/// while keeping at most [`PARTS_IN_FLIGHT`] + 1 parts in memory.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;
/// S3's smallest part (all but the last); smaller parts are refused by the server.
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Parts uploaded concurrently for one file.
const PARTS_IN_FLIGHT: usize = 4;
/// Read size while hashing and uploading.
const READ_CHUNK: usize = 1 << 20;

/// The bucket URL schemes this store accepts, by provider.
pub const SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl"];

/// A model artifact store in an object store bucket.
pub struct BucketStore {
    store: Arc<dyn ObjectStore>,
    /// The configured URL without a trailing `/`: every artifact URI starts with it.
    base: String,
    /// The object path the URL names inside its bucket (may be empty).
    prefix: ObjectPath,
    /// Local directory `materialize` downloads into, as `<cache>/<kind>/<id>/`.
    cache: PathBuf,
    part_size: usize,
    bridge: Bridge,
}

impl fmt::Debug for BucketStore {
    // Not derived: the inner store's Debug can include static credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketStore")
            .field("base", &self.base)
            .field("cache", &self.cache)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

fn bad_uri(uri: &str, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::BadUri {
        uri: uri.to_string(),
        reason: reason.into(),
    }
}

/// Wraps an `object_store` error with the URI it concerns and a hint fitting its kind.
fn remote(op: &'static str, uri: &str, e: object_store::Error) -> ArtifactError {
    let hint = match &e {
        object_store::Error::Unauthenticated { .. }
        | object_store::Error::PermissionDenied { .. } => {
            "check the credentials in the AWS_* / GOOGLE_* / AZURE_* environment variables and that they may read and write this bucket (docs/github-setup.md)"
        }
        object_store::Error::NotFound { .. } => {
            "check that the bucket exists and that `registry.artifacts` names it"
        }
        _ => {
            "check that the bucket exists, that the endpoint is reachable (AWS_ENDPOINT_URL for S3-compatible servers) and the credentials in the environment"
        }
    };
    ArtifactError::Remote {
        op,
        uri: uri.to_string(),
        source: Box::new(e),
        hint,
    }
}

impl BucketStore {
    /// Opens the bucket a URL names, with credentials and endpoint from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_NAME`, …); empty
    /// variables count as unset.
    pub fn from_url(url: &Url, cache: impl Into<PathBuf>) -> Result<Self, ArtifactError> {
        Self::with_options(url, std::iter::empty::<(&str, &str)>(), cache)
    }

    /// Like [`BucketStore::from_url`], with builder options (the `object_store` config keys, e.g.
    /// `aws_endpoint`, `aws_allow_http`) applied over the environment's.
    pub fn with_options<I, K, V>(
        url: &Url,
        options: I,
        cache: impl Into<PathBuf>,
    ) -> Result<Self, ArtifactError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let store = build_store(url, options)?;
        Self::from_store(store, url, cache)
    }

    /// Wraps an already built store (a custom client, a wrapper adding limits, or an in-memory
    /// store in tests) that serves the bucket `url` names.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        url: &Url,
        cache: impl Into<PathBuf>,
    ) -> Result<Self, ArtifactError> {
        let (_, prefix) = object_store::ObjectStoreScheme::parse(url)
            .map_err(|e| bad_uri(url.as_str(), e.to_string()))?;
        let base = url.as_str().trim_end_matches('/').to_string();
        let bridge = Bridge::start().map_err(io_err(
            "starting the artifact upload thread for",
            Path::new(&base),
        ))?;
        Ok(Self {
            store,
            base,
            prefix,
            cache: cache.into(),
            part_size: DEFAULT_PART_SIZE,
            bridge,
        })
    }

    /// Sets the multipart part size (at least [`MIN_PART_SIZE`]); files up to this size go up in
    /// one request.
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(MIN_PART_SIZE);
        self
    }

    /// The URL artifact URIs start with (no trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The directory `materialize` downloads into.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    fn uri_for(&self, kind: &str, id: &str) -> String {
        format!("{}/{kind}/{id}/", self.base)
    }

    fn dir_path(&self, kind: &str, id: &str) -> ObjectPath {
        self.prefix.clone().join(kind).join(id)
    }

    /// `(kind, id)` of an artifact URI, which must lie under this store's URL.
    fn locate(&self, uri: &str) -> Result<(String, String), ArtifactError> {
        let outside = || {
            bad_uri(
                uri,
                format!(
                    "it lies outside the artifact store {}\nhint: point `registry.artifacts` at the store the registry was written with",
                    self.base
                ),
            )
        };
        let rest = uri
            .strip_prefix(self.base.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(outside)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let Some((kind, id)) = rest.split_once('/') else {
            return Err(outside());
        };
        if kind != ModelKind::Reward.as_str() && kind != ModelKind::Policy.as_str() {
            return Err(bad_uri(
                uri,
                format!("`{kind}` is not a model kind (reward, policy)"),
            ));
        }
        check_id(id).map_err(|_| bad_uri(uri, format!("`{id}` is not a valid model id")))?;
        Ok((kind.to_string(), id.to_string()))
    }
}

impl BucketStore {
    /// Copies the files under `src_dir` to this store's own prefix (not under `<kind>/<id>`)
    /// with a `SHA256SUMS` manifest written last: how data goes to and comes back from a
    /// training cluster (`rlhf-bot bucket put`, `train.backend: ray`). An identical copy there
    /// is a no-op; a different one is replaced, its manifest deleted first so that no reader
    /// takes the mix for a whole copy (unlike a model artifact, nothing pins this content: a
    /// retried run that pulled more feedback exports a new dataset before submitting its job).
    pub fn put_dir(&self, src_dir: &Path) -> Result<ArtifactRef, ArtifactError> {
        let files = super::list_files(src_dir)?;
        if files.is_empty() {
            return Err(ArtifactError::BadSource {
                path: src_dir.to_path_buf(),
                reason: "the directory holds no files".into(),
            });
        }
        let job = Upload {
            store: Arc::clone(&self.store),
            dir: self.prefix.clone(),
            uri: format!("{}/", self.base),
            src: src_dir.to_path_buf(),
            files,
            part_size: self.part_size,
        };
        let store = Arc::clone(&self.store);
        self.bridge.run(async move {
            let manifest_at = job.dir.clone().join(MANIFEST);
            if let Some(bytes) = get_bytes(&*store, &manifest_at, &job.uri, MANIFEST).await? {
                match job.existing(&bytes) {
                    Err(ArtifactError::Conflict { .. }) => store
                        .delete(&manifest_at)
                        .await
                        .map_err(|e| remote("replacing", &job.uri, e))?,
                    same_or_error => return same_or_error,
                }
            }
            job.run().await
        })
    }

    /// Downloads what [`BucketStore::put_dir`] (or `sha256sum` and a copy tool) left at this
    /// store's prefix into `dest` (created; must not exist yet), checking every file against the
    /// manifest. A prefix without a manifest is [`ArtifactError::Missing`]: its writer has not
    /// finished.
    pub fn get_dir(&self, dest: &Path) -> Result<ArtifactRef, ArtifactError> {
        let uri = format!("{}/", self.base);
        let store = Arc::clone(&self.store);
        let prefix = self.prefix.clone();
        let staging = dest.to_path_buf();
        let fetched = self.bridge.run(async move {
            let bytes = get_bytes(&*store, &prefix.clone().join(MANIFEST), &uri, MANIFEST)
                .await?
                .ok_or_else(|| ArtifactError::Missing {
                    uri: uri.clone(),
                    file: MANIFEST.into(),
                })?;
            let expected = ArtifactRef {
                uri: uri.clone(),
                sha256: hex::encode(Sha256::digest(&bytes)),
                size_bytes: 0,
            };
            download(store, prefix, expected.clone(), staging).await?;
            Ok(expected)
        })?;
        let mut size_bytes = 0;
        for rel in super::list_files(dest)? {
            let path = dest.join(&rel);
            size_bytes += std::fs::metadata(&path)
                .map_err(io_err("inspecting", &path))?
                .len();
        }
        Ok(ArtifactRef {
            size_bytes,
            ..fetched
        })
    }
}

/// The provider's variables from the environment (`AWS_*`, …) as builder options, skipping empty
/// ones: a workflow that maps an unset secret or variable into `env` passes an empty string, which
/// must mean "not set" (an empty endpoint or key would otherwise break every request).
fn env_options(prefix: &str) -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, v)| k.starts_with(prefix) && !v.trim().is_empty())
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// Builds the `object_store` client for a bucket URL: the provider's builder with the
/// environment's options (as its `from_env` would), then `options`, then the URL.
pub(crate) fn build_store<I, K, V>(
    url: &Url,
    options: I,
) -> Result<Arc<dyn ObjectStore>, ArtifactError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: Into<String>,
{
    use object_store::ObjectStoreScheme as Scheme;
    let uri = url.as_str();
    let explicit: Vec<(String, String)> = options
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
        .collect();
    let built = |r: object_store::Result<Arc<dyn ObjectStore>>| {
        r.map_err(|e| {
            bad_uri(
                uri,
                format!("{e}\nhint: set the provider's environment variables (docs/config.md, `registry.artifacts`)"),
            )
        })
    };
    // Environment first, explicit options over it; an unknown explicit key is an error, unknown
    // environment variables are someone else's (AWS_PROFILE, AWS_CA_BUNDLE, …).
    macro_rules! configure {
        ($builder:expr, $key:ty, $prefix:literal) => {{
            let mut b = $builder.with_url(uri);
            for (k, v) in env_options($prefix) {
                if let Ok(key) = k.parse::<$key>() {
                    b = b.with_config(key, v);
                }
            }
            for (k, v) in explicit {
                let key = k.parse::<$key>().map_err(|_| {
                    bad_uri(
                        uri,
                        format!("unknown store option `{k}`\nhint: see the object_store crate's config keys for this provider"),
                    )
                })?;
                b = b.with_config(key, v);
            }
            b
        }};
    }
    let (scheme, _) = Scheme::parse(url).map_err(|e| bad_uri(uri, e.to_string()))?;
    match scheme {
        Scheme::AmazonS3 => {
            use object_store::ClientConfigKey;
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let b = configure!(AmazonS3Builder::new(), AmazonS3ConfigKey, "AWS_");
            // A plain-http endpoint (MinIO, moto on a laptop) needs an explicit opt-in; say so
            // here rather than let every request fail deep in the client.
            let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
            let allow = b
                .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            if let Some(endpoint) = endpoint.filter(|e| e.starts_with("http://"))
                && !allow
            {
                return Err(bad_uri(
                    uri,
                    format!(
                        "the endpoint {endpoint} is plain http\nhint: set AWS_ALLOW_HTTP=true to allow it (test servers only), or use https"
                    ),
                ));
            }
            built(b.build().map(|s| Arc::new(s) as _))
        }
        Scheme::GoogleCloudStorage => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let b = configure!(GoogleCloudStorageBuilder::new(), GoogleConfigKey, "GOOGLE_");
            built(b.build().map(|s| Arc::new(s) as _))
        }
        Scheme::MicrosoftAzure => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let b = configure!(MicrosoftAzureBuilder::new(), AzureConfigKey, "AZURE_");
            built(b.build().map(|s| Arc::new(s) as _))
        }
        _ => Err(bad_uri(
            uri,
            format!(
                "not a bucket URL\nhint: use one of {}://bucket/prefix, or a directory",
                SCHEMES.join("://, ")
            ),
        )),
    }
}

impl ArtifactStore for BucketStore {
    fn put(&self, kind: ModelKind, id: &str, src_dir: &Path) -> Result<ArtifactRef, ArtifactError> {
        let files = source_files(id, src_dir)?;
        let job = Upload {
            store: Arc::clone(&self.store),
            dir: self.dir_path(kind.as_str(), id),
            uri: self.uri_for(kind.as_str(), id),
            src: src_dir.to_path_buf(),
            files,
            part_size: self.part_size,
        };
        self.bridge.run(job.run())
    }

    fn verify(&self, artifact: &ArtifactRef) -> Result<(), ArtifactError> {
        let (kind, id) = self.locate(&artifact.uri)?;
        let dir = self.dir_path(&kind, &id);
        let store = Arc::clone(&self.store);
        let expected = artifact.clone();
        self.bridge.run(verify_remote(store, dir, expected))
    }

    fn materialize(&self, artifact: &ArtifactRef) -> Result<PathBuf, ArtifactError> {
        let (kind, id) = self.locate(&artifact.uri)?;
        let dest = self.cache.join(&kind).join(&id);
        // A cached copy is used only if it still verifies; otherwise it is downloaded again.
        if dest.is_dir() && verify_dir(&dest, artifact).is_ok() {
            return Ok(dest);
        }
        let kind_dir = self.cache.join(&kind);
        std::fs::create_dir_all(&kind_dir).map_err(io_err("creating", &kind_dir))?;
        let staging = kind_dir.join(format!(".{id}.partial-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io_err("removing", &staging))?;
        }
        let job = download(
            Arc::clone(&self.store),
            self.dir_path(&kind, &id),
            artifact.clone(),
            staging.clone(),
        );
        let result = self.bridge.run(job).and_then(|()| {
            verify_dir(&staging, artifact)?;
            if dest.exists() {
                std::fs::remove_dir_all(&dest).map_err(io_err("removing", &dest))?;
            }
            std::fs::rename(&staging, &dest).map_err(io_err("renaming into", &dest))
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result.map(|()| dest)
    }
}

/// The object path of a manifest-relative file path.
fn object_of(dir: &ObjectPath, rel: &str) -> ObjectPath {
    rel.split('/').fold(dir.clone(), |p, part| p.join(part))
}

/// Reads an object whole (the manifest: a line per file).
async fn get_bytes(
    store: &dyn ObjectStore,
    location: &ObjectPath,
    uri: &str,
    file: &str,
) -> Result<Option<Vec<u8>>, ArtifactError> {
    match store.get(location).await {
        Ok(got) => Ok(Some(
            got.bytes()
                .await
                .map_err(|e| remote("reading", uri, e))?
                .to_vec(),
        )),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(remote("reading", &format!("{uri}{file}"), e)),
    }
}

/// One `put`: everything it needs, owned, so it can run on the bridge's runtime.
struct Upload {
    store: Arc<dyn ObjectStore>,
    dir: ObjectPath,
    uri: String,
    src: PathBuf,
    files: Vec<String>,
    part_size: usize,
}

impl Upload {
    async fn run(self) -> Result<ArtifactRef, ArtifactError> {
        let manifest_at = self.dir.clone().join(MANIFEST);
        if let Some(existing) = get_bytes(&*self.store, &manifest_at, &self.uri, MANIFEST).await? {
            return self.existing(&existing);
        }
        // No manifest: whatever is under the directory is the rest of a failed attempt.
        self.clear().await?;
        let mut entries = Vec::with_capacity(self.files.len());
        let mut written = Vec::with_capacity(self.files.len());
        let mut result = Ok(());
        for rel in &self.files {
            let location = object_of(&self.dir, rel);
            written.push(location.clone());
            match self.upload_file(rel, &location).await {
                Ok((sha256, size_bytes)) => entries.push(ManifestEntry {
                    sha256,
                    path: rel.clone(),
                    size_bytes,
                }),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let manifest = manifest_text(&entries);
        if result.is_ok() {
            // Last, so that an artifact is valid only once every file is in place.
            result = self
                .store
                .put(
                    &manifest_at,
                    PutPayload::from(manifest.clone().into_bytes()),
                )
                .await
                .map(|_| ())
                .map_err(|e| remote("uploading", &format!("{}{MANIFEST}", self.uri), e));
        }
        if let Err(e) = result {
            for location in &written {
                let _ = self.store.delete(location).await;
            }
            return Err(e);
        }
        let (sha256, size_bytes) = digest(&manifest, &entries);
        Ok(ArtifactRef {
            uri: self.uri,
            sha256,
            size_bytes,
        })
    }

    /// The artifact exists: storing identical content again is a no-op, anything else a conflict.
    fn existing(&self, stored: &[u8]) -> Result<ArtifactRef, ArtifactError> {
        let entries = super::hash_dir(&self.src)?;
        let manifest = manifest_text(&entries);
        if manifest.as_bytes() != stored {
            return Err(ArtifactError::Conflict {
                uri: self.uri.clone(),
            });
        }
        let (sha256, size_bytes) = digest(&manifest, &entries);
        Ok(ArtifactRef {
            uri: self.uri.clone(),
            sha256,
            size_bytes,
        })
    }

    async fn clear(&self) -> Result<(), ArtifactError> {
        let mut listing = self.store.list(Some(&self.dir));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| remote("listing", &self.uri, e))?;
            self.store
                .delete(&meta.location)
                .await
                .map_err(|e| remote("deleting a partial upload under", &self.uri, e))?;
        }
        Ok(())
    }

    /// Streams one file up, hashing what is sent; returns (sha256, size).
    async fn upload_file(
        &self,
        rel: &str,
        location: &ObjectPath,
    ) -> Result<(String, u64), ArtifactError> {
        let uri = format!("{}{rel}", self.uri);
        upload_file(
            &*self.store,
            &self.src.join(rel),
            location,
            &uri,
            self.part_size,
        )
        .await
    }
}

/// Streams the file at `path` to `location`, hashing what is sent; returns (sha256, size).
/// Files above `part_size` go up as a multipart upload with a bounded number of parts in flight.
pub(crate) async fn upload_file(
    store: &dyn ObjectStore,
    path: &Path,
    location: &ObjectPath,
    uri: &str,
    part_size: usize,
) -> Result<(String, u64), ArtifactError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("opening", path))?;
    let len = file
        .metadata()
        .await
        .map_err(io_err("inspecting", path))?
        .len();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    if len <= part_size as u64 {
        let mut body = Vec::with_capacity(len as usize);
        file.read_to_end(&mut body)
            .await
            .map_err(io_err("reading", path))?;
        hasher.update(&body);
        size = body.len() as u64;
        store
            .put(location, PutPayload::from(body))
            .await
            .map_err(|e| remote("uploading", uri, e))?;
    } else {
        let upload = store
            .put_multipart(location)
            .await
            .map_err(|e| remote("starting the upload of", uri, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
        let streamed: Result<(), ArtifactError> = async {
            loop {
                let n = file.read(&mut buf).await.map_err(io_err("reading", path))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                size += n as u64;
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| remote("uploading", uri, e))?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match streamed {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| remote("uploading", uri, e))?;
            }
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// The manifest of an artifact, checked against the registry's digest, and its entries.
async fn checked_manifest(
    store: &dyn ObjectStore,
    dir: &ObjectPath,
    expected: &ArtifactRef,
) -> Result<(String, Vec<(String, String)>), ArtifactError> {
    let uri = &expected.uri;
    let bytes = get_bytes(store, &dir.clone().join(MANIFEST), uri, MANIFEST)
        .await?
        .ok_or_else(|| ArtifactError::Missing {
            uri: uri.clone(),
            file: MANIFEST.into(),
        })?;
    // The digest first: nothing else is worth downloading if the manifest is not the one the
    // registry recorded.
    check_sha(
        uri,
        MANIFEST,
        &expected.sha256,
        hex::encode(Sha256::digest(&bytes)),
    )?;
    let text = String::from_utf8(bytes).map_err(|_| ArtifactError::BadManifest {
        uri: uri.clone(),
        line: 0,
        reason: "not UTF-8".into(),
    })?;
    let listed = parse_manifest(uri, &text)?;
    Ok((text, listed))
}

/// Streams one object through sha256, writing it to `to` when given; returns (sha256, size).
/// A missing object is [`ArtifactError::Missing`].
async fn stream_object(
    store: &dyn ObjectStore,
    location: &ObjectPath,
    uri: &str,
    rel: &str,
    mut to: Option<(&Path, tokio::fs::File)>,
) -> Result<(String, u64), ArtifactError> {
    let got = match store.get(location).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ArtifactError::Missing {
                uri: uri.to_string(),
                file: rel.to_string(),
            });
        }
        Err(e) => return Err(remote("downloading", &format!("{uri}{rel}"), e)),
    };
    let mut stream = got.into_stream();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| remote("downloading", &format!("{uri}{rel}"), e))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if let Some((path, file)) = to.as_mut() {
            file.write_all(&chunk)
                .await
                .map_err(io_err("writing", path))?;
        }
    }
    if let Some((path, mut file)) = to {
        // tokio's File writes in the background: flush, or the last bytes may be lost.
        file.flush().await.map_err(io_err("writing", path))?;
        file.sync_all().await.map_err(io_err("syncing", path))?;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Checks every object against the manifest, the manifest against `expected`, the total size,
/// and that no object outside the manifest lies in the artifact's directory.
async fn verify_remote(
    store: Arc<dyn ObjectStore>,
    dir: ObjectPath,
    expected: ArtifactRef,
) -> Result<(), ArtifactError> {
    let uri = &expected.uri;
    let (_, listed) = checked_manifest(&*store, &dir, &expected).await?;
    let mut total = 0u64;
    for (sha, rel) in &listed {
        let (actual, size) = stream_object(&*store, &object_of(&dir, rel), uri, rel, None).await?;
        check_sha(uri, rel, sha, actual)?;
        total += size;
    }
    let known: std::collections::BTreeSet<ObjectPath> = listed
        .iter()
        .map(|(_, rel)| object_of(&dir, rel))
        .chain([dir.clone().join(MANIFEST)])
        .collect();
    let mut listing = store.list(Some(&dir));
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| remote("listing", uri, e))?;
        if !known.contains(&meta.location) {
            let file = meta
                .location
                .prefix_match(&dir)
                .map(|parts| {
                    parts
                        .map(|p| p.as_ref().to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_else(|| meta.location.to_string());
            return Err(ArtifactError::Unlisted {
                uri: uri.clone(),
                file,
            });
        }
    }
    check_total(&expected, total)
}

/// Downloads the manifest and every file it lists into `staging`, checking each as it arrives.
async fn download(
    store: Arc<dyn ObjectStore>,
    dir: ObjectPath,
    expected: ArtifactRef,
    staging: PathBuf,
) -> Result<(), ArtifactError> {
    let uri = &expected.uri;
    let (text, listed) = checked_manifest(&*store, &dir, &expected).await?;
    for (sha, rel) in &listed {
        let to = staging.join(rel);
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err("creating", parent))?;
        }
        let file = tokio::fs::File::create(&to)
            .await
            .map_err(io_err("creating", &to))?;
        let (actual, _) = stream_object(
            &*store,
            &object_of(&dir, rel),
            uri,
            rel,
            Some((to.as_path(), file)),
        )
        .await?;
        check_sha(uri, rel, sha, actual)?;
    }
    let manifest = staging.join(MANIFEST);
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(io_err("creating", &staging))?;
    tokio::fs::write(&manifest, text.as_bytes())
        .await
        .map_err(io_err("writing", &manifest))
}

/// A current-thread tokio runtime on a thread of its own, which runs the store's futures for
/// synchronous callers, whether or not they are themselves inside a runtime.
struct Bridge {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bridge {
    fn start() -> std::io::Result<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rlhf-artifacts".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // Drives every spawned future until the store is dropped; the runtime is then
                // dropped here, outside any async context, as tokio requires.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("the artifact runtime thread exited"))??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `fut` on the bridge's runtime and waits for its result.
    fn run<T, F>(&self, fut: F) -> Result<T, ArtifactError>
    where
        F: Future<Output = Result<T, ArtifactError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        let wait = move || rx.recv();
        // On a multi-threaded runtime's worker, tell tokio this thread blocks so its other tasks
        // move elsewhere; a current-thread runtime cannot do that, and need not: the future runs
        // on the bridge's own thread either way.
        let got = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        got.unwrap_or_else(|_| {
            Err(ArtifactError::Io {
                op: "running",
                path: PathBuf::from("the artifact transfer"),
                source: std::io::Error::other("the transfer task panicked or was cancelled"),
            })
        })
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
