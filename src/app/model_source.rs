//! Model paths as users give them, made local before a stage reads them. A
//! `hf://ORG/NAME[@REVISION]` reference (a config key or a `--model`-like flag) is downloaded
//! into the Hub cache (`crate::hub`) and replaced by its snapshot directory; anything else is a
//! local path and passes through untouched. Every place that takes a model calls [`localize`],
//! so `hf://` works wherever a path does, and the stages below never see a URL.
//!
//! The registry learns which commit a base model was from the snapshot path itself
//! ([`lineage`]), so no extra state travels through the stages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::hub::cache::{RepoCache, snapshot_origin};
use crate::hub::{HubDownloader, HubEnv, HubModelRef};

/// A local directory (or file) for `path`: itself, or the Hub snapshot an `hf://` names.
pub async fn localize(path: &Path) -> Result<PathBuf> {
    let model = match HubModelRef::from_path(path) {
        None => return Ok(path.to_path_buf()),
        Some(parsed) => parsed.map_err(|why| {
            anyhow!("{why}\nhint: name a Hub model as hf://ORG/NAME or hf://ORG/NAME@REVISION")
        })?,
    };
    let env = HubEnv::from_env().map_err(|e| anyhow!(e))?;
    let first_wait = Duration::from_millis(crate::app::pull::backoff_base_ms());
    let resolved = HubDownloader::new(env, first_wait)?.resolve(&model).await?;
    tracing::info!(
        model = %model,
        commit = %resolved.commit,
        dir = %resolved.dir.display(),
        "using the Hub model"
    );
    Ok(resolved.dir)
}

/// [`localize`] for an optional path.
pub async fn localize_opt(path: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match path {
        Some(p) => Ok(Some(localize(&p).await?)),
        None => Ok(None),
    }
}

/// How the registry records a base model: `(name, commit)`. A Hub snapshot becomes
/// `hf://ORG/NAME@REVISION` (the branch or tag it was asked by, when the cache's `refs/` still
/// says so; else the commit) with the commit pinned; anything else is returned as given.
pub fn lineage(base: &str) -> (String, Option<String>) {
    let Some((repo, commit)) = snapshot_origin(Path::new(base)) else {
        return (base.to_string(), None);
    };
    let snapshot = Path::new(base)
        .ancestors()
        .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(commit.as_str()));
    let revision = snapshot
        .and_then(|s| s.parent()?.parent())
        .and_then(|root| {
            let cache_dir = root.parent()?;
            RepoCache::new(cache_dir, &repo)
                .revisions_at(&commit)
                .into_iter()
                .next()
        })
        .unwrap_or_else(|| commit.clone());
    (format!("hf://{repo}@{revision}"), Some(commit))
}
