//! The Hub cache layout HF tools share (`huggingface_hub`'s `file_download.py`), one folder per
//! repository:
//!
//! ```text
//! <cache>/models--ORG--NAME/
//!   blobs/<etag>                  file contents, named by the Hub's ETag (sha256 for LFS files,
//!                                 git sha1 otherwise); `<etag>.incomplete` while downloading
//!   snapshots/<commit>/<file>     relative symlinks to ../../blobs/<etag>
//!   refs/<revision>               the commit a branch or tag pointed at when last resolved
//! ```
//!
//! Downloads of one blob are serialised by `<cache>/.locks/models--ORG--NAME/<etag>.lock`, the
//! lock `huggingface_hub` takes too. One addition of ours, beside (not inside) those folders: `.rlhf-bot/complete-<commit>` lists
//! the files a finished resolve put in that snapshot, so a later resolve of a commit (or an
//! offline one) knows the snapshot is whole without asking the Hub. HF tools ignore it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::atomic_file::write_atomically;

/// The cache of one repository.
#[derive(Debug, Clone)]
pub struct RepoCache {
    root: PathBuf,
}

const MARKER_DIR: &str = ".rlhf-bot";

impl RepoCache {
    /// `repo` is a validated `ORG/NAME` (`HubModelRef` guarantees no `/` beyond the one).
    pub fn new(cache_dir: &Path, repo: &str) -> Self {
        Self {
            root: cache_dir.join(format!("models--{}", repo.replace('/', "--"))),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.blobs().join(etag)
    }

    /// Where a blob grows while it downloads; a later try resumes it.
    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.blobs().join(format!("{etag}.incomplete"))
    }

    /// The lock a process holds while it downloads blob `etag`: where `huggingface_hub` puts
    /// its own (`<cache>/.locks/models--ORG--NAME/<etag>.lock`, an advisory `flock`), so
    /// rlhf-bot and HF tools never write one blob at once.
    pub fn lock_file(&self, etag: &str) -> PathBuf {
        let folder = self.root.file_name().unwrap_or_default();
        let cache_dir = self.root.parent().unwrap_or(Path::new("."));
        cache_dir
            .join(".locks")
            .join(folder)
            .join(format!("{etag}.lock"))
    }

    fn ref_file(&self, revision: &str) -> PathBuf {
        self.root.join("refs").join(revision)
    }

    /// The commit `revision` resolved to last time, if recorded.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.ref_file(revision)).ok()?;
        let commit = text.trim();
        super::model_ref::is_commit_sha(commit).then(|| commit.to_string())
    }

    /// The revisions whose ref points at `commit` (`main` first, then in name order).
    pub fn revisions_at(&self, commit: &str) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, commit: &str, found: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let revision = format!("{prefix}{name}");
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, &format!("{revision}/"), commit, found);
                } else if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == commit) {
                    found.push(revision);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.root.join("refs"), "", commit, &mut found);
        found.sort_by_key(|r| (r != super::model_ref::DEFAULT_REVISION, r.clone()));
        found
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        write_creating_dirs(&self.ref_file(revision), commit.as_bytes())
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` (a relative symlink, as HF tools
    /// make; a copy where symlinks are unavailable).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<()> {
        let dir = self.snapshot(commit);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let at = dir.join(file);
        if at.symlink_metadata().is_ok() {
            std::fs::remove_file(&at).with_context(|| format!("replacing {}", at.display()))?;
        }
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(Path::new("../../blobs").join(etag), &at);
        #[cfg(not(unix))]
        let linked = std::fs::copy(self.blob(etag), &at).map(|_| ());
        linked.with_context(|| format!("linking {} to its blob", at.display()))
    }

    fn marker(&self, commit: &str) -> PathBuf {
        self.root
            .join(MARKER_DIR)
            .join(format!("complete-{commit}"))
    }

    /// Records that the snapshot of `commit` holds `files`, all downloaded and verified.
    pub fn mark_complete(&self, commit: &str, files: &[String]) -> Result<()> {
        write_creating_dirs(&self.marker(commit), files.join("\n").as_bytes())
    }

    /// The snapshot directory of `commit` when a finished resolve recorded it and every file it
    /// listed is still there (a user may have pruned blobs since).
    pub fn complete_snapshot(&self, commit: &str) -> Option<PathBuf> {
        let listed = std::fs::read_to_string(self.marker(commit)).ok()?;
        let dir = self.snapshot(commit);
        listed
            .lines()
            .filter(|l| !l.is_empty())
            .all(|file| dir.join(file).is_file())
            .then_some(dir)
    }
}

fn write_creating_dirs(file: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    write_atomically(file, bytes)
}

/// `(ORG/NAME, commit)` when `path` is (inside) a snapshot of the Hub cache: how the registry
/// records a base model that came from `hf://` without carrying extra state through the stages.
pub fn snapshot_origin(path: &Path) -> Option<(String, String)> {
    let parts: Vec<&str> = path.iter().filter_map(|p| p.to_str()).collect();
    let at = parts.iter().rposition(|p| *p == "snapshots")?;
    let folder = parts.get(at.checked_sub(1)?)?;
    let commit = parts.get(at + 1)?;
    let (org, name) = folder.strip_prefix("models--")?.split_once("--")?;
    super::model_ref::is_commit_sha(commit).then(|| (format!("{org}/{name}"), commit.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn layout_matches_huggingface_hub() {
        let cache = RepoCache::new(Path::new("/c"), "Org/Name");
        assert_eq!(cache.root(), Path::new("/c/models--Org--Name"));
        assert_eq!(
            cache.snapshot(SHA),
            Path::new("/c/models--Org--Name/snapshots").join(SHA)
        );
        assert_eq!(
            cache.incomplete("abc"),
            Path::new("/c/models--Org--Name/blobs/abc.incomplete")
        );
        assert_eq!(
            cache.lock_file("abc"),
            Path::new("/c/.locks/models--Org--Name/abc.lock")
        );
    }

    #[test]
    fn refs_links_and_completeness() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "o/n");
        assert_eq!(cache.read_ref("main"), None);
        cache.write_ref("main", SHA).unwrap();
        cache.write_ref("refs/pr/1", SHA).unwrap();
        cache.write_ref("a-tag", SHA).unwrap();
        assert_eq!(cache.read_ref("main").as_deref(), Some(SHA));
        assert_eq!(cache.revisions_at(SHA), ["main", "a-tag", "refs/pr/1"]);
        std::fs::create_dir_all(cache.blobs()).unwrap();
        std::fs::write(cache.blob("e1"), b"{}").unwrap();
        cache.link(SHA, "config.json", "e1").unwrap();
        cache.link(SHA, "config.json", "e1").unwrap(); // relinking replaces
        assert_eq!(
            std::fs::read(cache.snapshot(SHA).join("config.json")).unwrap(),
            b"{}"
        );
        assert_eq!(cache.complete_snapshot(SHA), None);
        cache.mark_complete(SHA, &["config.json".into()]).unwrap();
        assert_eq!(cache.complete_snapshot(SHA), Some(cache.snapshot(SHA)));
        std::fs::remove_file(cache.blob("e1")).unwrap();
        assert_eq!(cache.complete_snapshot(SHA), None, "a pruned blob");
    }

    #[test]
    fn the_origin_of_a_snapshot_path() {
        let path = Path::new("/c/models--Org--Name/snapshots").join(SHA);
        assert_eq!(
            snapshot_origin(&path),
            Some(("Org/Name".to_string(), SHA.to_string()))
        );
        assert_eq!(
            snapshot_origin(&path.join("config.json")),
            Some(("Org/Name".to_string(), SHA.to_string()))
        );
        assert_eq!(snapshot_origin(Path::new("/models/smol")), None);
        assert_eq!(
            snapshot_origin(Path::new("/c/models--Org--Name/snapshots/notasha")),
            None
        );
    }
}
