//! `rlhf-bot bucket get|put`: a directory to or from a bucket prefix with a `SHA256SUMS`
//! manifest (`artifacts::bucket::BucketStore::put_dir`/`get_dir`). A Ray training job runs it on
//! the cluster to fetch its dataset and return its checkpoint (docs/ray.md).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::artifacts::{ArtifactRef, BucketStore};

/// What was copied.
#[derive(Debug, Serialize)]
pub struct Copied {
    #[serde(flatten)]
    pub artifact: ArtifactRef,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes, SHA256SUMS sha256 {})",
            self.artifact.uri, self.artifact.size_bytes, self.artifact.sha256
        )
    }
}

fn open(uri: &str, cache: &Path) -> Result<BucketStore> {
    let url = url::Url::parse(uri)
        .with_context(|| format!("{uri:?} is not a bucket URL\nhint: e.g. s3://bucket/prefix"))?;
    Ok(BucketStore::from_url(&url, cache)?)
}

/// Downloads the prefix `uri` into `dir` (which must not exist).
pub fn get(uri: &str, dir: &Path) -> Result<Copied> {
    if dir.exists() {
        bail!(
            "{} already exists\nhint: `bucket get` writes into a new directory; remove it or pick another",
            dir.display()
        );
    }
    let store = open(uri, dir)?;
    let result = store.get_dir(dir);
    if result.is_err() {
        // Half a download must not look like data to whoever looks next.
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(Copied { artifact: result? })
}

/// Uploads the files under `dir` to the prefix `uri`.
pub fn put(dir: &Path, uri: &str) -> Result<Copied> {
    let store = open(uri, dir)?;
    Ok(Copied {
        artifact: store.put_dir(dir)?,
    })
}
