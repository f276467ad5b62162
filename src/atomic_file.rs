//! Whole-file writes that a reader never sees half done: write beside the target, then rename
//! (atomic within one filesystem).

use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `<path>.part`, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".part");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
