//! The `pull` stage: moves feedback from the configured source into the store, page by page.
//!
//! Fetching and writing overlap: the network side fetches and validates page k+1 while a
//! blocking thread commits page k. Each commit carries the resume point that follows it, so a
//! pull killed anywhere restarts exactly after the last durable page. If fetching fails, every
//! page already received is still committed before the error is reported: nothing pulled is lost.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use tokio::sync::mpsc;

use super::file_source::FileSource;
use super::http_source::{FeedbackClient, HttpSourceOptions};
use super::record::format_time;
use super::store::{ApplyCounts, Incoming, ResumePoint, Store};

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
        let next = ResumePoint {
            since: since.clone(),
            cursor: page.next_cursor.clone(),
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
        if done {
            return Ok(());
        }
    }
}
