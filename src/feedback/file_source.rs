//! The JSONL file source: the same records as the API, one per line (the embedded default reads
//! the bundled sample this way). Lines are read in pages of `page_size`, so memory stays bounded
//! whatever the file's size. Every pull re-reads the whole file; the store's deduplication makes
//! that a no-op for lines it has already applied.
//!
//! A line is quarantined, never fatal, whatever is wrong with it, invalid UTF-8 included: lines
//! are read as bytes and decoded one by one, so one bad line cannot abort the pull.

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
    reader: BufReader<File>,
    /// Lines read so far (the 1-based number of the last one).
    line_no: usize,
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
            reader: BufReader::new(file),
            line_no: 0,
            page_size: page_size.max(1),
        })
    }

    /// The next page of lines, or `None` at the end of the file.
    pub fn next_page(&mut self) -> Result<Option<Vec<Incoming>>> {
        let mut items = Vec::with_capacity(self.page_size);
        let mut bytes = Vec::new();
        while items.len() < self.page_size {
            bytes.clear();
            let read = self.reader.read_until(b'\n', &mut bytes).with_context(|| {
                format!(
                    "reading line {} of {}",
                    self.line_no + 1,
                    self.path.display()
                )
            })?;
            if read == 0 {
                break;
            }
            self.line_no += 1;
            // The line without its `\n` or `\r\n`, as `BufRead::lines` gives it.
            let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let item = match std::str::from_utf8(line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => incoming_from_json(text),
                Err(e) => Incoming::Malformed {
                    raw: String::from_utf8_lossy(line).into_owned(),
                    reason: Invalid(format!(
                        "not valid UTF-8 (byte {} of the line is the first bad one)",
                        e.valid_up_to() + 1
                    )),
                },
            };
            items.push(match item {
                Incoming::Malformed { raw, reason } => Incoming::Malformed {
                    raw,
                    reason: Invalid(format!(
                        "{}:{}: {}",
                        self.path.display(),
                        self.line_no,
                        reason.0
                    )),
                },
                valid => valid,
            });
        }
        Ok(if items.is_empty() { None } else { Some(items) })
    }
}
