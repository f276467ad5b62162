//! The artifact store: where trained model directories live once they leave the runner, and the
//! proof that what we load later is byte-for-byte what we evaluated.
//!
//! A stored model is a directory plus a `SHA256SUMS` manifest in the format `sha256sum` writes
//! (`<hex>  <relative/path>`, one line per file, sorted by path), so anyone can check a copy with
//! `sha256sum -c SHA256SUMS` without this tool. The artifact's overall digest is the sha256 of the
//! manifest bytes: it pins every file's content and name in one value the registry can hold, and
//! its size is the sum of the file sizes (manifest excluded).
//!
//! The [`ArtifactStore`] trait is the seam between the pipeline and where weights live:
//! [`FileStore`] implements directories and `file://` URIs, [`bucket::BucketStore`] object store
//! buckets (`s3://`, `gs://`, `az://`). [`ArtifactLocation`] is the validated `registry.artifacts`
//! setting and [`open`] picks the store for it. Hashing, manifests and verification are free
//! functions so every store writes and checks the same format.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model_kind::ModelKind;

pub mod bucket;

pub use bucket::BucketStore;

/// The manifest's file name inside every stored artifact directory.
pub const MANIFEST: &str = "SHA256SUMS";

/// Where a model version's files are and what they must hash to. Stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    /// `file:///abs/root/<kind>/<id>/` for [`FileStore`]; a store-specific URL otherwise.
    pub uri: String,
    /// sha256 (lower-case hex) of the `SHA256SUMS` manifest.
    pub sha256: String,
    /// Sum of the sizes of the files listed in the manifest.
    pub size_bytes: u64,
}

/// Why storing or reading an artifact failed. Callers branch on `Mismatch`/`Missing` (a corrupt or
/// vanished model) versus everything else (a setup problem).
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "checksum mismatch for `{file}` in artifact {uri}: expected {expected}, found {actual}\nhint: the stored model was modified or corrupted after it was registered; retrain or restore it from a backup"
    )]
    Mismatch {
        uri: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error(
        "artifact {uri} is missing `{file}`\nhint: the stored model is incomplete; retrain or restore it"
    )]
    Missing { uri: String, file: String },
    #[error(
        "artifact {uri} holds `{file}`, which its {MANIFEST} does not list\nhint: remove the stray file or retrain"
    )]
    Unlisted { uri: String, file: String },
    #[error("malformed {MANIFEST} in {uri}, line {line}: {reason}")]
    BadManifest {
        uri: String,
        line: usize,
        reason: String,
    },
    #[error("unsupported artifact URI `{uri}`: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("cannot store `{}`: {reason}", path.display())]
    BadSource { path: PathBuf, reason: String },
    #[error(
        "artifact {uri} already exists with different content\nhint: model ids must be unique; pick a new id or remove the old directory"
    )]
    Conflict { uri: String },
    /// An object store request failed (network, credentials, missing bucket).
    #[error("{op} {uri}: {source}\nhint: {hint}")]
    Remote {
        op: &'static str,
        uri: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        hint: &'static str,
    },
}

impl ArtifactError {
    /// A one-line description without paths, URIs or hashes, for committed files (the report):
    /// what kind of failure, and which file of the model when that is known.
    pub fn summary(&self) -> String {
        match self {
            ArtifactError::Io { op, .. } => format!("cannot {op} its files"),
            ArtifactError::Mismatch { file, .. } => {
                format!("checksum mismatch in `{file}` (modified or corrupted after registration)")
            }
            ArtifactError::Missing { file, .. } if file == "." => "its files are missing".into(),
            ArtifactError::Missing { file, .. } => format!("`{file}` is missing"),
            ArtifactError::Unlisted { file, .. } => format!("unlisted file `{file}`"),
            ArtifactError::BadManifest { line, .. } => format!("malformed manifest (line {line})"),
            ArtifactError::BadUri { .. } => "unsupported artifact URI".into(),
            ArtifactError::BadSource { .. } => "unreadable model directory".into(),
            ArtifactError::Conflict { .. } => "conflicting stored copy".into(),
            ArtifactError::Remote { op, .. } => format!("object store request failed ({op})"),
        }
    }
}

/// Removes what a killed process left in `dir`: hidden entries named `.<name><marker><pid>`
/// (staging directories, temporary files) whose process no longer runs. Only on Linux, where
/// `/proc` says whether a pid is alive; elsewhere leftovers stay (they are hidden and harmless).
/// Best effort: a leftover that cannot be removed is logged and skipped.
pub(crate) fn remove_dead_leftovers(dir: &Path, marker: &str) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(marker)) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!("removed {}, left by a killed run", path.display()),
            Err(e) => tracing::warn!("cannot remove the leftover {}: {e}", path.display()),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A place model directories are copied to and verified from.
///
/// Kept synchronous and object-safe (`&dyn ArtifactStore`) on purpose: training and reporting
/// call it between CPU-bound stages. The async [`BucketStore`] implements it by running its
/// transfers on a runtime of its own, so callers inside or outside tokio can use it alike.
pub trait ArtifactStore {
    /// Copies `src_dir` into the store as model `<kind>/<id>`, writes its manifest, and returns
    /// the reference to record in the registry. Storing identical content twice is a no-op.
    fn put(&self, kind: ModelKind, id: &str, src_dir: &Path) -> Result<ArtifactRef, ArtifactError>;

    /// Checks every file against the manifest and the manifest against `artifact.sha256`.
    fn verify(&self, artifact: &ArtifactRef) -> Result<(), ArtifactError>;

    /// Returns a local directory holding the verified files (for `file://`, the stored directory
    /// itself; a remote store would download into a cache first).
    fn materialize(&self, artifact: &ArtifactRef) -> Result<PathBuf, ArtifactError>;
}

/// One line of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub sha256: String,
    /// Relative path with `/` separators.
    pub path: String,
    pub size_bytes: u64,
}

/// Hashes one file, streaming, and returns (hex digest, size).
pub fn hash_file(path: &Path) -> Result<(String, u64), ArtifactError> {
    let mut file = fs::File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Lists the regular files under `dir` as sorted relative `/`-paths, skipping a top-level
/// manifest. Symlinks to files are followed (Hugging Face caches are made of them); symlinked
/// directories are refused so a loop cannot recurse forever.
pub fn list_files(dir: &Path) -> Result<Vec<String>, ArtifactError> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), ArtifactError> {
        let here = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let entries = fs::read_dir(&here).map_err(io_err("listing", &here))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &here))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(ArtifactError::BadSource {
                    path: entry.path(),
                    reason: "file name is not UTF-8".into(),
                });
            };
            if name.contains(['\n', '\r', '\\']) {
                return Err(ArtifactError::BadSource {
                    path: entry.path(),
                    reason:
                        "file names with newlines or backslashes cannot be listed in SHA256SUMS"
                            .into(),
                });
            }
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let path = entry.path();
            let link_meta = fs::symlink_metadata(&path).map_err(io_err("inspecting", &path))?;
            let meta = fs::metadata(&path).map_err(io_err("following", &path))?;
            if meta.is_dir() {
                if link_meta.file_type().is_symlink() {
                    return Err(ArtifactError::BadSource {
                        path,
                        reason: "symlinked directories are not stored; copy the directory instead"
                            .into(),
                    });
                }
                walk(root, &child_rel, out)?;
            } else if meta.is_file() {
                if !(rel.is_empty() && name == MANIFEST) {
                    out.push(child_rel);
                }
            } else {
                return Err(ArtifactError::BadSource {
                    path,
                    reason: "not a regular file or directory".into(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Hashes every file under `dir` into manifest entries (sorted by path).
pub fn hash_dir(dir: &Path) -> Result<Vec<ManifestEntry>, ArtifactError> {
    hash_listed(dir, list_files(dir)?)
}

/// Hashes the listed files (relative `/`-paths under `dir`) into manifest entries.
fn hash_listed(dir: &Path, files: Vec<String>) -> Result<Vec<ManifestEntry>, ArtifactError> {
    files
        .into_iter()
        .map(|path| {
            let (sha256, size_bytes) = hash_file(&dir.join(&path))?;
            Ok(ManifestEntry {
                sha256,
                path,
                size_bytes,
            })
        })
        .collect()
}

/// The manifest text for `entries`, in `sha256sum` format.
pub fn manifest_text(entries: &[ManifestEntry]) -> String {
    entries
        .iter()
        .map(|e| format!("{}  {}\n", e.sha256, e.path))
        .collect()
}

/// The artifact digest and size for manifest text and its entries.
pub fn digest(manifest: &str, entries: &[ManifestEntry]) -> (String, u64) {
    let sha = hex::encode(Sha256::digest(manifest.as_bytes()));
    (sha, entries.iter().map(|e| e.size_bytes).sum())
}

/// Parses a manifest into (sha256, path) pairs, rejecting anything `sha256sum -c` would not accept
/// or that could escape the artifact directory.
pub fn parse_manifest(uri: &str, text: &str) -> Result<Vec<(String, String)>, ArtifactError> {
    let bad = |line: usize, reason: &str| ArtifactError::BadManifest {
        uri: uri.to_string(),
        line,
        reason: reason.to_string(),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((sha, path)) = line.split_once("  ") else {
            return Err(bad(n, "expected `<sha256>  <path>`"));
        };
        if sha.len() != 64
            || !sha
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(bad(n, "the checksum is not 64 lower-case hex digits"));
        }
        if path.is_empty()
            || path.starts_with('/')
            || path
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(bad(
                n,
                "the path must be relative and stay inside the artifact",
            ));
        }
        out.push((sha.to_string(), path.to_string()));
    }
    Ok(out)
}

/// Verifies a local artifact directory against its manifest and the expected reference: every
/// listed file exists and hashes as listed, no unlisted file is present, and the manifest digest
/// and total size equal `expected`. Errors name the offending file.
pub fn verify_dir(dir: &Path, expected: &ArtifactRef) -> Result<(), ArtifactError> {
    let uri = &expected.uri;
    let manifest_path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&manifest_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ArtifactError::Missing {
                uri: uri.clone(),
                file: MANIFEST.into(),
            });
        }
        Err(e) => return Err(io_err("reading", &manifest_path)(e)),
    };
    let listed = parse_manifest(uri, &text)?;
    let mut total = 0u64;
    for (sha, rel) in &listed {
        let path = dir.join(rel);
        if !path.is_file() {
            return Err(ArtifactError::Missing {
                uri: uri.clone(),
                file: rel.clone(),
            });
        }
        let (actual, size) = hash_file(&path)?;
        check_sha(uri, rel, sha, actual)?;
        total += size;
    }
    let listed_paths: BTreeSet<&str> = listed.iter().map(|(_, p)| p.as_str()).collect();
    if let Some(stray) = list_files(dir)?
        .into_iter()
        .find(|f| !listed_paths.contains(f.as_str()))
    {
        return Err(ArtifactError::Unlisted {
            uri: uri.clone(),
            file: stray,
        });
    }
    let actual = hex::encode(Sha256::digest(text.as_bytes()));
    check_sha(uri, MANIFEST, &expected.sha256, actual)?;
    check_total(expected, total)
}

/// `Ok` when a file hashed as its manifest line (or the manifest as the registry) says.
fn check_sha(uri: &str, file: &str, expected: &str, actual: String) -> Result<(), ArtifactError> {
    if actual == expected {
        Ok(())
    } else {
        Err(ArtifactError::Mismatch {
            uri: uri.to_string(),
            file: file.to_string(),
            expected: expected.to_string(),
            actual,
        })
    }
}

/// `Ok` when the listed files add up to the size the registry recorded.
fn check_total(expected: &ArtifactRef, total: u64) -> Result<(), ArtifactError> {
    if total == expected.size_bytes {
        return Ok(());
    }
    Err(ArtifactError::Mismatch {
        uri: expected.uri.clone(),
        file: "(total size)".into(),
        expected: expected.size_bytes.to_string(),
        actual: total.to_string(),
    })
}

/// Artifacts on a local or mounted file system, under `root/<kind>/<id>/`.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens (creating if needed) a store rooted at `root`. The root is made absolute so the URIs
    /// it hands out stay valid from any working directory.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, ArtifactError> {
        let root = root.as_ref();
        fs::create_dir_all(root).map_err(io_err("creating", root))?;
        let root = fs::canonicalize(root).map_err(io_err("resolving", root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory a `file://` URI names, which must lie under this store's root.
    pub fn path_of(&self, uri: &str) -> Result<PathBuf, ArtifactError> {
        let bad = |reason: &str| ArtifactError::BadUri {
            uri: uri.to_string(),
            reason: reason.into(),
        };
        let url = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "file" {
            return Err(bad("this store reads only file:// URIs"));
        }
        let path = url.to_file_path().map_err(|()| bad("not a local path"))?;
        if !path.starts_with(&self.root) {
            return Err(bad(&format!(
                "it lies outside the artifact root {}\nhint: point the artifact store at the root the registry was written with",
                self.root.display()
            )));
        }
        Ok(path)
    }

    fn uri_of(&self, dir: &Path) -> Result<String, ArtifactError> {
        url::Url::from_directory_path(dir)
            .map(String::from)
            .map_err(|()| ArtifactError::BadUri {
                uri: dir.display().to_string(),
                reason: "not an absolute path".into(),
            })
    }
}

/// Ids become directory names: keep them to a portable, traversal-free alphabet.
fn check_id(id: &str) -> Result<(), ArtifactError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ArtifactError::BadSource {
            path: PathBuf::from(id),
            reason: "model ids may hold only ASCII letters, digits and `-_.+`, and may not start with `.`".into(),
        })
    }
}

/// What every store checks before storing: a valid id and a directory holding files, which it
/// lists (sorted relative paths).
fn source_files(id: &str, src_dir: &Path) -> Result<Vec<String>, ArtifactError> {
    check_id(id)?;
    if !src_dir.is_dir() {
        return Err(ArtifactError::BadSource {
            path: src_dir.to_path_buf(),
            reason: "not a directory".into(),
        });
    }
    let files = list_files(src_dir)?;
    if files.is_empty() {
        return Err(ArtifactError::BadSource {
            path: src_dir.to_path_buf(),
            reason: "the directory holds no files".into(),
        });
    }
    Ok(files)
}

impl ArtifactStore for FileStore {
    fn put(&self, kind: ModelKind, id: &str, src_dir: &Path) -> Result<ArtifactRef, ArtifactError> {
        let entries = hash_listed(src_dir, source_files(id, src_dir)?)?;
        let manifest = manifest_text(&entries);
        let (sha256, size_bytes) = digest(&manifest, &entries);
        let kind_dir = self.root.join(kind.as_str());
        fs::create_dir_all(&kind_dir).map_err(io_err("creating", &kind_dir))?;
        let dest = kind_dir.join(id);
        let reference = ArtifactRef {
            uri: self.uri_of(&dest)?,
            sha256,
            size_bytes,
        };
        if dest.exists() {
            // Re-running a publish step must not fail, but it must never overwrite a different model.
            return match verify_dir(&dest, &reference) {
                Ok(()) => Ok(reference),
                Err(_) => Err(ArtifactError::Conflict { uri: reference.uri }),
            };
        }
        // Copy into a sibling staging directory and rename, so a crash never leaves a half-copied
        // model under the final name.
        remove_dead_leftovers(&kind_dir, ".partial-");
        let staging = kind_dir.join(format!(".{id}.partial-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("removing", &staging))?;
        }
        let result = (|| {
            for entry in &entries {
                let to = staging.join(&entry.path);
                if let Some(parent) = to.parent() {
                    fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
                }
                let from = src_dir.join(&entry.path);
                fs::copy(&from, &to).map_err(io_err("copying", &from))?;
            }
            let manifest_path = staging.join(MANIFEST);
            let mut file =
                fs::File::create(&manifest_path).map_err(io_err("creating", &manifest_path))?;
            file.write_all(manifest.as_bytes())
                .map_err(io_err("writing", &manifest_path))?;
            file.sync_all().map_err(io_err("syncing", &manifest_path))?;
            // The source could have changed while we copied: check the copy, not the source.
            verify_dir(&staging, &reference)?;
            fs::rename(&staging, &dest).map_err(io_err("renaming into", &dest))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result.map(|()| reference)
    }

    fn verify(&self, artifact: &ArtifactRef) -> Result<(), ArtifactError> {
        let dir = self.path_of(&artifact.uri)?;
        if !dir.is_dir() {
            return Err(ArtifactError::Missing {
                uri: artifact.uri.clone(),
                file: ".".into(),
            });
        }
        verify_dir(&dir, artifact)
    }

    fn materialize(&self, artifact: &ArtifactRef) -> Result<PathBuf, ArtifactError> {
        self.verify(artifact)?;
        self.path_of(&artifact.uri)
    }
}

/// Where `registry.artifacts` says model directories go: validated, so a bad scheme is a config
/// error rather than a failure after hours of training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "at", rename_all = "lowercase")]
pub enum ArtifactLocation {
    /// A local or mounted directory ([`FileStore`]).
    Dir(PathBuf),
    /// An object store bucket URL ([`BucketStore`]).
    Bucket(url::Url),
}

impl ArtifactLocation {
    /// Parses the setting: a plain path or `file://` URL is a directory; `s3://`, `s3a://`,
    /// `gs://`, `az://`, `azure://`, `abfs://`, `abfss://` and `adl://` URLs are buckets. The
    /// error names the value and says what is accepted.
    pub fn parse(value: &str) -> Result<Self, String> {
        let accepted = "hint: use a directory, file:///abs/dir, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix (docs/config.md, `registry.artifacts`)";
        if let Some(path) = value.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("{value:?} names no directory\n{accepted}"));
            }
            return Ok(Self::Dir(PathBuf::from(path)));
        }
        let Some((scheme, _)) = value.split_once("://") else {
            if value.trim().is_empty() {
                return Err(format!("an empty artifact location\n{accepted}"));
            }
            return Ok(Self::Dir(PathBuf::from(value)));
        };
        if !bucket::SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unsupported artifact store {value:?}: the scheme `{scheme}://` is not one this tool writes to\n{accepted}"
            ));
        }
        let url = url::Url::parse(value)
            .map_err(|e| format!("{value:?} is not a valid URL: {e}\n{accepted}"))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!(
                "{value:?} names no bucket\nhint: write {scheme}://BUCKET/optional/prefix"
            ));
        }
        // abfs://CONTAINER@ACCOUNT.dfs.core.windows.net holds the container where a user name goes.
        let has_user = !url.username().is_empty() && !scheme.starts_with("abfs");
        if has_user || url.password().is_some() {
            return Err(format!(
                "{} carries credentials\nhint: keep secrets out of the config; set them as environment variables (docs/github-setup.md)",
                url.host_str().unwrap_or_default()
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{value:?} has a query or fragment\nhint: configure the store through environment variables, not URL parameters"
            ));
        }
        Ok(Self::Bucket(url))
    }
}

impl std::fmt::Display for ArtifactLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::Bucket(url) => f.write_str(url.as_str()),
        }
    }
}

/// Opens the store for `location`: the directory itself, or a bucket whose downloads are cached
/// under `cache`. Bucket credentials come from the environment.
pub fn open(
    location: &ArtifactLocation,
    cache: &Path,
) -> Result<Box<dyn ArtifactStore>, ArtifactError> {
    Ok(match location {
        ArtifactLocation::Dir(dir) => Box::new(FileStore::new(dir)?),
        ArtifactLocation::Bucket(url) => Box::new(BucketStore::from_url(url, cache)?),
    })
}

/// The artifact location as a plain object store: what `deploy` writes its production prefix
/// through, the same way for a directory (`object_store`'s local file system, whose puts are
/// atomic renames) and a bucket.
#[derive(Clone)]
pub struct ObjectRoot {
    pub store: std::sync::Arc<dyn object_store::ObjectStore>,
    /// The object path the location names (empty for a directory).
    pub prefix: object_store::path::Path,
    /// The location as a URL without a trailing `/` (`file:///abs/dir`, `s3://bucket/prefix`).
    pub base: String,
}

impl std::fmt::Debug for ObjectRoot {
    // Not derived: a bucket client's Debug can include static credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRoot")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Opens `location` as an [`ObjectRoot`]; bucket credentials come from the environment.
pub fn object_root(location: &ArtifactLocation) -> Result<ObjectRoot, ArtifactError> {
    match location {
        ArtifactLocation::Dir(dir) => {
            fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
            let root = fs::canonicalize(dir).map_err(io_err("resolving", dir))?;
            // Deleting a file removes the directories it leaves empty: otherwise a pruned
            // version would still be listed as a directory.
            let store = object_store::local::LocalFileSystem::new_with_prefix(&root)
                .map_err(|e| ArtifactError::BadUri {
                    uri: root.display().to_string(),
                    reason: e.to_string(),
                })?
                .with_automatic_cleanup(true);
            let base = url::Url::from_directory_path(&root)
                .map(|u| u.as_str().trim_end_matches('/').to_string())
                .map_err(|()| ArtifactError::BadUri {
                    uri: root.display().to_string(),
                    reason: "not an absolute path".into(),
                })?;
            Ok(ObjectRoot {
                store: std::sync::Arc::new(store),
                prefix: object_store::path::Path::default(),
                base,
            })
        }
        ArtifactLocation::Bucket(url) => {
            ObjectRoot::bucket(url, std::iter::empty::<(&str, &str)>())
        }
    }
}

impl ObjectRoot {
    /// A bucket with builder options (the `object_store` config keys) over the environment's,
    /// as [`BucketStore::with_options`] takes them.
    pub fn bucket<I, K, V>(url: &url::Url, options: I) -> Result<Self, ArtifactError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let store = bucket::build_store(url, options)?;
        let (_, prefix) =
            object_store::ObjectStoreScheme::parse(url).map_err(|e| ArtifactError::BadUri {
                uri: url.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            store,
            prefix,
            base: url.as_str().trim_end_matches('/').to_string(),
        })
    }
}
