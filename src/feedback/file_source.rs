//! The JSONL file source: the same records as the API, one per line (the embedded default reads
//! the bundled sample this way). Lines are read in pages of `page_size`, so memory stays bounded
//! whatever the file's size. Every pull re-reads the whole file; the store's deduplication makes
//! that a no-op for lines it has already applied.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::http_source::incoming_from_json;
use super::record::Invalid;
use super::store::Incoming;

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    lines: std::iter::Enumerate<std::io::Lines<BufReader<File>>>,
    page_size: usize,
}

impl FileSource {
    pub fn open(path: &Path, page_size: usize) -> Result<Self> {
        let file = File::open(path).with_context(|| {
            format!(
                "cannot read the feedback file {}\nhint: check feedback.path in the config (relative paths are relative to the working directory)",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            lines: BufReader::new(file).lines().enumerate(),
            page_size: page_size.max(1),
        })
    }

    /// The next page of lines, or `None` at the end of the file.
    pub fn next_page(&mut self) -> Result<Option<Vec<Incoming>>> {
        let mut items = Vec::with_capacity(self.page_size);
        for (index, line) in self.lines.by_ref() {
            let line = line.with_context(|| {
                format!("reading line {} of {}", index + 1, self.path.display())
            })?;
            if line.trim().is_empty() {
                continue;
            }
            items.push(match incoming_from_json(&line) {
                Incoming::Malformed { raw, reason } => Incoming::Malformed {
                    raw,
                    reason: Invalid(format!(
                        "{}:{}: {}",
                        self.path.display(),
                        index + 1,
                        reason.0
                    )),
                },
                valid => valid,
            });
            if items.len() == self.page_size {
                break;
            }
        }
        Ok(if items.is_empty() { None } else { Some(items) })
    }
}
