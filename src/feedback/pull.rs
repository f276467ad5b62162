//! The `pull` stage: moves feedback from the configured source into the store, page by page.
//!
//! Fetching and writing overlap: the network side fetches and validates page k+1 while a
//! blocking thread commits page k. Each commit carries the resume point that follows it, so a
//! pull killed anywhere restarts exactly after the last durable page. If fetching fails, every
//! page already received is still committed before the error is reported: nothing pulled is lost.
//!
//! The server's pagination is not trusted to end: a `next_cursor` already seen in this pull (the
//! API would send us round in a circle) or [`MAX_EMPTY_PAGES_IN_A_ROW`] empty pages that each
//! hand out a new cursor (a feed that never ends) stop the pull with an error naming the cursor.
//! The offending page is committed with the cursor that fetched it as the resume point, so the
//! next pull asks for that page again instead of trusting the bad cursor.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::file_source::FileSource;
use super::http_source::{FeedbackClient, HttpSourceOptions};
use super::record::format_time;
use super::store::{ApplyCounts, Incoming, ResumePoint, Store};

/// Empty pages that still carry a `next_cursor`, in a row, after which the API is taken to be
/// feeding us nothing forever. A real API may return an empty page now and then (records filtered
/// out on its side), but not five in a row.
pub const MAX_EMPTY_PAGES_IN_A_ROW: u32 = 5;

/// Where feedback comes from (validated config).
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Http(HttpSourceOptions),
    File { path: PathBuf, page_size: usize },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PullSummary {
    pub source: String,
    pub fetched: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub quarantined: u64,
    pub watermark: Option<String>,
    pub pages: u64,
    pub retries: u64,
    pub seconds: f64,
    /// True when this pull continued an earlier, interrupted one from its saved cursor.
    pub resumed: bool,
}

struct PageJob {
    items: Vec<Incoming>,
    next: ResumePoint,
}

/// Runs a pull to completion (or to the first unrecoverable error, after saving what arrived).
pub async fn pull(store: Store, source: &SourceSpec) -> Result<PullSummary> {
    let started = Instant::now();
    let resume = store.resume_point()?;
    let watermark = store.watermark()?;
    let (tx, mut rx) = mpsc::channel::<PageJob>(2);

    let writer = tokio::task::spawn_blocking(move || -> Result<(ApplyCounts, Store)> {
        let mut store = store;
        let mut counts = ApplyCounts::default();
        while let Some(job) = rx.blocking_recv() {
            counts += store.apply_page(job.items, &job.next)?;
        }
        Ok((counts, store))
    });

    let mut summary = PullSummary::default();
    let fetched = match source {
        SourceSpec::File { path, page_size } => {
            summary.source = format!("file {}", path.display());
            fetch_file(path, *page_size, &tx, &mut summary).await
        }
        SourceSpec::Http(options) => {
            summary.source = format!("http {}", options.base_url);
            let since = match &resume.cursor {
                Some(_) => resume.since.clone(),
                None => watermark.map(format_time),
            };
            let restart_since = watermark.map(format_time);
            fetch_http(
                options,
                since,
                restart_since,
                resume.cursor.clone(),
                &tx,
                &mut summary,
            )
            .await
        }
    };
    drop(tx);
    let (counts, store) = writer.await.context("the store writer thread panicked")??;
    fetched?;
    summary.inserted = counts.inserted;
    summary.updated = counts.updated;
    summary.deleted = counts.deleted;
    summary.unchanged = counts.unchanged;
    summary.quarantined = counts.quarantined;
    summary.watermark = store.watermark()?.map(format_time);
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn send(tx: &mpsc::Sender<PageJob>, job: PageJob) -> Result<()> {
    tx.send(job)
        .await
        .map_err(|_| anyhow!("the store writer stopped early"))
}

async fn fetch_file(
    path: &std::path::Path,
    page_size: usize,
    tx: &mpsc::Sender<PageJob>,
    summary: &mut PullSummary,
) -> Result<()> {
    let mut file = FileSource::open(path, page_size)?;
    while let Some(items) = file.next_page()? {
        summary.pages += 1;
        summary.fetched += items.len() as u64;
        send(
            tx,
            PageJob {
                items,
                next: ResumePoint::default(),
            },
        )
        .await?;
    }
    Ok(())
}

async fn fetch_http(
    options: &HttpSourceOptions,
    since: Option<String>,
    restart_since: Option<String>,
    mut cursor: Option<String>,
    tx: &mpsc::Sender<PageJob>,
    summary: &mut PullSummary,
) -> Result<()> {
    let client = FeedbackClient::new(options.clone())?;
    let mut since = since;
    summary.resumed = cursor.is_some();
    let mut guard = PageGuard::new(cursor.as_deref());
    loop {
        let page = match client.fetch_page(since.as_deref(), cursor.as_deref()).await {
            Ok(page) => page,
            // A saved cursor the server no longer accepts: start over from the watermark.
            Err(e) if summary.resumed && summary.pages == 0 && e.is_client_error() => {
                tracing::warn!(
                    "the saved cursor was refused ({e}); pulling again from the watermark"
                );
                send(
                    tx,
                    PageJob {
                        items: Vec::new(),
                        next: ResumePoint::default(),
                    },
                )
                .await?;
                summary.resumed = false;
                cursor = None;
                since = restart_since.clone();
                guard = PageGuard::new(None);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        summary.pages += 1;
        summary.retries += page.retries as u64;
        summary.fetched += page.items.len() as u64;
        tracing::debug!(
            page = summary.pages,
            records = page.items.len(),
            "fetched a page"
        );
        let verdict = guard.check(page.items.len(), page.next_cursor.as_deref(), summary.pages);
        // A page whose cursor cannot be trusted is kept, but the resume point stays on the cursor
        // that fetched it: the next pull asks for this page again.
        let next = ResumePoint {
            since: since.clone(),
            cursor: if verdict.is_ok() {
                page.next_cursor.clone()
            } else {
                cursor.clone()
            },
        };
        let done = page.next_cursor.is_none();
        cursor = page.next_cursor;
        send(
            tx,
            PageJob {
                items: page.items,
                next,
            },
        )
        .await?;
        verdict?;
        if done {
            return Ok(());
        }
    }
}

/// Watches the cursors of one pull for pagination that would never end.
struct PageGuard {
    /// sha256 of every cursor this pull has used or been given: a hostile server's cursors can be
    /// long, and only their identity matters here.
    seen: HashSet<[u8; 32]>,
    empty_in_a_row: u32,
}

impl PageGuard {
    fn new(start: Option<&str>) -> Self {
        let mut guard = Self {
            seen: HashSet::new(),
            empty_in_a_row: 0,
        };
        if let Some(c) = start {
            guard.seen.insert(Sha256::digest(c).into());
        }
        guard
    }

    /// Checks the page just fetched (`page` counts this pull's pages, this one included).
    fn check(&mut self, items: usize, next: Option<&str>, page: u64) -> Result<()> {
        let Some(next) = next else {
            return Ok(());
        };
        if !self.seen.insert(Sha256::digest(next).into()) {
            anyhow::bail!(
                "the feedback API's page {page} of this pull gave next_cursor {}, a cursor this \
                 pull has already followed: going on would request the same pages forever\n\
                 hint: the API's pagination is broken (every next_cursor must be new until it \
                 answers next_cursor: null); report it to whoever runs the feedback API. The pages \
                 received so far are stored, and the next pull resumes before the repeating page",
                shown_cursor(next)
            );
        }
        self.empty_in_a_row = if items == 0 {
            self.empty_in_a_row + 1
        } else {
            0
        };
        if self.empty_in_a_row >= MAX_EMPTY_PAGES_IN_A_ROW {
            anyhow::bail!(
                "the feedback API sent {} empty pages in a row, each with a new next_cursor (the \
                 last: {}): a feed that hands out cursors but no records would never end\n\
                 hint: the API must answer next_cursor: null when there is nothing more; report it \
                 to whoever runs the feedback API. The pages received so far are stored",
                self.empty_in_a_row,
                shown_cursor(next)
            );
        }
        Ok(())
    }
}

/// A server's cursor as shown in a message: opaque text from the network, so control characters
/// escapes are neutralised (`crate::sanitize`) and a long one is cut to its first 80 characters.
fn shown_cursor(cursor: &str) -> String {
    const MAX_CHARS: usize = 80;
    let clean = crate::sanitize::terminal_line(cursor);
    let total = clean.chars().count();
    if total <= MAX_CHARS {
        format!("{clean:?}")
    } else {
        let head: String = clean.chars().take(MAX_CHARS).collect();
        format!("{head:?}… ({total} characters)")
    }
}
