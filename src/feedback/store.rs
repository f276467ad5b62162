//! The durable local feedback store: one SQLite database (`<store.dir>/feedback.sqlite3`).
//!
//! Why SQLite: `pull` must survive `kill -9` at any instant with nothing lost and nothing
//! duplicated, and `check` must aggregate a million records in well under a second. SQLite gives
//! both without a server: each fetched page is applied in ONE transaction together with the
//! cursor and watermark that resume after it, so the watermark can never run ahead of the data it
//! covers (it advances only when that data is durable), and a crash rolls back to the last whole
//! page. WAL mode with `synchronous=NORMAL` is durable across process crashes (the fault CI runners
//! have); only an OS crash could lose the last commits, which the next pull simply fetches again.
//! The append-only alternative (segments + manifest) would need its own compaction and indexes
//! for deduplication by `id`; SQLite's primary key gives that for free.
//!
//! Tables: `records` (the current version of every live record: a few columns `check` aggregates
//! plus the record's canonical JSON), `tombstones` (deleted ids, so an older copy arriving late
//! cannot resurrect a deleted record), `quarantine` (malformed input with its reason, keyed by the
//! raw text's sha256 so re-reading the same bad line does not pile up) and `meta` (watermark,
//! resume cursor, and the loop's own state: the last training and the pull requests the bot opened
//! with their fate, see `crate::proposals`).
//!
//! A damaged database file (SQLite reports it corrupt or not a database, or a text column holds
//! bytes that are not UTF-8) is reported as such, naming the file, with the way out: the store is
//! a local copy of the feedback API, so deleting it and pulling again rebuilds it.
//!
//! Deleted feedback must leave the file, not just the table: a user who asked for their feedback
//! to be removed should not find it in `strings feedback.sqlite3`. `secure_delete` makes SQLite
//! overwrite a deleted or replaced row (and every page it frees) with zeros, and after a pull
//! that deleted or replaced records [`Store::purge_freed`] returns the freed pages to the file
//! system (`incremental_vacuum`, for stores created with `auto_vacuum = INCREMENTAL`) and
//! truncates the write-ahead log, whose older frames would otherwise still hold the old pages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::{Change, FeedbackRecord, Invalid, WireRecord, format_time};

const SCHEMA_VERSION: &str = "1";
const DB_FILE: &str = "feedback.sqlite3";

/// The store's settings and tables; `CREATE … IF NOT EXISTS` so opening an existing store is a
/// no-op.
const SCHEMA: &str = "
    PRAGMA auto_vacuum = INCREMENTAL;
    PRAGMA secure_delete = ON;
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = NORMAL;
    PRAGMA busy_timeout = 10000;
    PRAGMA cache_size = -65536;
    CREATE TABLE IF NOT EXISTS records (
        id TEXT PRIMARY KEY,
        updated_us INTEGER NOT NULL,
        created_us INTEGER NOT NULL,
        kind TEXT NOT NULL,
        model_version TEXT NOT NULL,
        aspect TEXT,
        thumb INTEGER,
        rating INTEGER,
        has_answer INTEGER NOT NULL,
        body TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS tombstones (
        id TEXT PRIMARY KEY, updated_us INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS quarantine (
        raw_sha256 TEXT PRIMARY KEY, reason TEXT NOT NULL, raw TEXT NOT NULL,
        received_at TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    -- Covering indexes for `check`: its counts read these narrow rows (and only the
    -- time window asked for) instead of scanning the record bodies.
    CREATE INDEX IF NOT EXISTS records_by_update
        ON records(updated_us, kind, aspect, has_answer);
    CREATE INDEX IF NOT EXISTS records_by_version
        ON records(model_version, created_us, thumb, rating);";

/// One item of a fetched page: a validated change, or the raw text and why it was refused.
#[derive(Debug)]
pub enum Incoming {
    Valid(Prepared),
    Malformed { raw: String, reason: Invalid },
}

/// A validated change with the canonical JSON body the store keeps for an upsert. The body is
/// serialised where the page is parsed, not on the store's single writer thread: that thread is
/// what bounds a pull's speed (docs/benchmarks.md, "pull").
#[derive(Debug)]
pub struct Prepared {
    change: Change,
    /// `Some` exactly for [`Change::Upsert`].
    body: Option<String>,
}

impl Incoming {
    pub fn valid(change: Change) -> Result<Self, Invalid> {
        let body = match &change {
            Change::Upsert(record) => Some(
                serde_json::to_string(&record.to_wire())
                    .map_err(|e| Invalid(format!("the record cannot be stored as JSON: {e}")))?,
            ),
            Change::Delete { .. } => None,
        };
        Ok(Incoming::Valid(Prepared { change, body }))
    }
}

/// What applying a page did; summed over a pull for its summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ApplyCounts {
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Same or older version than the store already holds (re-delivery): nothing changed.
    pub unchanged: u64,
    pub quarantined: u64,
}

impl std::ops::AddAssign for ApplyCounts {
    fn add_assign(&mut self, o: Self) {
        self.inserted += o.inserted;
        self.updated += o.updated;
        self.deleted += o.deleted;
        self.unchanged += o.unchanged;
        self.quarantined += o.quarantined;
    }
}

/// Where an interrupted or finished pull resumes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResumePoint {
    /// The `updated_since` the saved cursor belongs to (cursors are only valid for their query).
    pub since: Option<String>,
    /// The cursor of the next page of an unfinished pull.
    pub cursor: Option<String>,
}

/// The state `check` compares against until the registry records trainings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastTraining {
    pub at: DateTime<Utc>,
    /// The store watermark the training's data snapshot covered.
    pub watermark: Option<DateTime<Utc>>,
    pub production_version: Option<String>,
    /// When the production version was promoted: feedback before it is its baseline.
    pub promoted_at: Option<DateTime<Utc>>,
}

/// Counts of one model version's answer-level feedback, for KPIs and the quality trigger.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VersionCounts {
    pub model_version: String,
    pub records: u64,
    pub thumbs: u64,
    pub thumbs_up: u64,
    pub ratings: u64,
    pub rating_sum: f64,
    pub rating_sq_sum: f64,
}

impl VersionCounts {
    /// Reads the seven columns from `first` on, in field order: model_version, records, thumbs,
    /// thumbs_up, ratings, rating_sum, rating_sq_sum (the feedback service's KPIs query the same
    /// shape).
    pub fn from_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
        Ok(VersionCounts {
            model_version: r.get(first)?,
            records: r.get::<_, i64>(first + 1)? as u64,
            thumbs: r.get::<_, i64>(first + 2)? as u64,
            thumbs_up: r.get::<_, i64>(first + 3)? as u64,
            ratings: r.get::<_, i64>(first + 4)? as u64,
            rating_sum: r.get::<_, i64>(first + 5)? as f64,
            rating_sq_sum: r.get::<_, i64>(first + 6)? as f64,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub records: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub by_model_version: BTreeMap<String, BTreeMap<String, u64>>,
    pub watermark: Option<String>,
    pub tombstones: u64,
    pub quarantined: u64,
    pub pull_in_progress: bool,
}

/// A quarantined input with the reason it was refused.
#[derive(Debug, Clone, Serialize)]
pub struct Quarantined {
    pub reason: String,
    pub raw: String,
    pub received_at: String,
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// A page applied since the last purge deleted or replaced a record.
    freed: bool,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Whether `dir` holds a store already (opening one creates it).
pub fn exists(dir: &Path) -> bool {
    dir.join(DB_FILE).is_file()
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. A missing store is a normal first run.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the store directory {}", dir.display()))?;
        let path = dir.join(DB_FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("opening the feedback store {}", path.display()))?;
        // auto_vacuum and the page size only take effect in a database without tables (a new
        // store); older stores keep theirs (their zeroed free pages are reused, which
        // secure_delete already made harmless).
        crate::sqlite_pages::request_page_size(&conn)
            .and_then(|()| conn.execute_batch(SCHEMA))
            .and_then(|()| crate::sqlite_pages::checkpoint_after_bytes(&conn, 32 << 20))
            .with_context(|| format!("initialising the feedback store {}", path.display()))
            .map_err(|e| if_damaged(&path, e))?;
        let store = Self {
            conn,
            path,
            freed: false,
        };
        match store.reading(|| store.meta("schema_version"))? {
            None => store.set_meta_now("schema_version", SCHEMA_VERSION)?,
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => bail!(
                "the store {} has schema version {v}, this rlhf-bot reads version {SCHEMA_VERSION}\n\
                 hint: use the rlhf-bot release that wrote it, or delete the store and pull again",
                store.path.display()
            ),
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta_now(&self, key: &str, value: &str) -> Result<()> {
        set_meta(&self.conn, key, Some(value))
    }

    pub fn watermark(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .meta("watermark_us")?
            .and_then(|v| v.parse().ok())
            .and_then(DateTime::from_timestamp_micros))
    }

    pub fn resume_point(&self) -> Result<ResumePoint> {
        Ok(ResumePoint {
            since: self.meta("cursor_since")?,
            cursor: self.meta("cursor")?,
        })
    }

    /// Forgets an unfinished pull's cursor (e.g. the server no longer accepts it); the next pull
    /// starts again from the watermark, which deduplication makes safe.
    pub fn clear_cursor(&self) -> Result<()> {
        set_meta(&self.conn, "cursor", None)?;
        set_meta(&self.conn, "cursor_since", None)
    }

    /// Applies one page atomically, together with where to resume after it.
    /// `next` is the resume point once this page is durable (`cursor: None` = pull finished).
    pub fn apply_page(&mut self, items: Vec<Incoming>, next: &ResumePoint) -> Result<ApplyCounts> {
        let tx = self
            .conn
            .transaction()
            .context("starting a store transaction")?;
        let counts = apply_items(&tx, items)?;
        set_meta(&tx, "cursor", next.cursor.as_deref())?;
        set_meta(
            &tx,
            "cursor_since",
            next.cursor.as_ref().and(next.since.as_deref()),
        )?;
        tx.commit().context("committing a page to the store")?;
        self.freed |= counts.deleted > 0 || counts.updated > 0;
        // The last page of a pull (no cursor to resume from) purges what the pull freed.
        if self.freed && next.cursor.is_none() {
            self.purge_freed()?;
        }
        Ok(counts)
    }

    /// Drops deleted content from the files themselves: gives the (already zeroed) free pages
    /// back to the file system and checkpoints the write-ahead log into the database, truncating
    /// it, so no older copy of a deleted record's page survives in either file.
    pub fn purge_freed(&mut self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA incremental_vacuum;")
            .with_context(|| format!("vacuuming the feedback store {}", self.path.display()))?;
        // (busy, log frames, checkpointed frames): busy = 1 when a reader kept the checkpoint
        // from finishing; the next purge or the last connection's close completes it.
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .with_context(|| format!("checkpointing the feedback store {}", self.path.display()))?;
        if busy != 0 {
            tracing::warn!(store = %self.path.display(), "another connection kept the write-ahead log from being truncated; deleted records leave it when that connection closes");
        }
        self.freed = false;
        Ok(())
    }

    pub fn last_training(&self) -> Result<Option<LastTraining>> {
        self.loop_state("last_training")
    }

    pub fn set_last_training(&self, state: &LastTraining) -> Result<()> {
        self.set_loop_state("last_training", state)
    }

    /// A piece of the loop's state kept beside the feedback (it travels with the store between
    /// workflow runs): JSON under `key` in `meta`, `None` when never written.
    pub fn loop_state<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.meta(key)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text).map(Some).with_context(|| {
                format!(
                    "the store's `{key}` state in {} is unreadable\nhint: the store may be corrupted; delete it and pull again",
                    self.path.display()
                )
            }),
        }
    }

    pub fn set_loop_state<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        self.set_meta_now(key, &serde_json::to_string(value)?)
    }

    pub fn stats(&self) -> Result<StoreStats> {
        self.reading(|| self.read_stats())
    }

    fn read_stats(&self) -> Result<StoreStats> {
        let mut stats = StoreStats::default();
        let mut stmt = self.conn.prepare(
            "SELECT model_version, kind, count(*) FROM records GROUP BY model_version, kind",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (version, kind, n) = row?;
            let n = n as u64;
            stats.records += n;
            *stats.by_kind.entry(kind.clone()).or_default() += n;
            *stats
                .by_model_version
                .entry(version)
                .or_default()
                .entry(kind)
                .or_default() += n;
        }
        stats.watermark = self.watermark()?.map(format_time);
        stats.tombstones = self.count("SELECT count(*) FROM tombstones")?;
        stats.quarantined = self.count("SELECT count(*) FROM quarantine")?;
        stats.pull_in_progress = self.meta("cursor")?.is_some();
        Ok(stats)
    }

    fn count(&self, sql: &str) -> Result<u64> {
        Ok(self.conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Records updated after `since` (all when `None`), and how many of them carry a usable
    /// training signal: an answer to learn from and, for aspect ratings, an aspect the config
    /// trains (`aspects` empty = all aspects).
    pub fn new_since(
        &self,
        since: Option<DateTime<Utc>>,
        aspects: &[String],
    ) -> Result<(u64, u64)> {
        let since_us = since.map(micros).unwrap_or(i64::MIN);
        // One streaming pass over the covering index `records_by_update` (no GROUP BY: sorting
        // a million rows cost more than the count itself).
        let mut stmt = self.conn.prepare_cached(
            "SELECT count(*), coalesce(sum(has_answer
                        AND (kind <> 'aspect' OR ?2 OR aspect IN (SELECT value FROM json_each(?3)))), 0)
             FROM records WHERE updated_us > ?1",
        )?;
        let all_aspects = aspects.is_empty();
        let aspect_list = serde_json::to_string(aspects)?;
        let (all, usable) = stmt.query_row(params![since_us, all_aspects, aspect_list], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?;
        Ok((all, usable))
    }

    /// Records updated after `since` (all when `None`), counted by kind: what the report's
    /// headline calls new feedback.
    pub fn kinds_since(&self, since: Option<DateTime<Utc>>) -> Result<BTreeMap<String, u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT kind, count(*) FROM records WHERE updated_us > ?1 GROUP BY kind",
        )?;
        let rows = stmt.query_map([since.map(micros).unwrap_or(i64::MIN)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Answer-level feedback counts per model version, for records created in `[from, to)`.
    pub fn version_counts(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<VersionCounts>> {
        let rows = self.counts_by(from, to, false)?;
        Ok(rows.into_iter().map(|(_, counts)| counts).collect())
    }

    /// The same counts per model version and UTC day (the day's start in µs since the epoch),
    /// for the dashboard's KPI trends.
    pub fn daily_version_counts(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<(i64, VersionCounts)>> {
        self.counts_by(from, to, true)
    }

    fn counts_by(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        daily: bool,
    ) -> Result<Vec<(i64, VersionCounts)>> {
        const DAY_US: i64 = 86_400_000_000;
        let bucket = if daily {
            format!("(created_us / {DAY_US}) * {DAY_US}")
        } else {
            "0".to_string()
        };
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {bucket} AS bucket, model_version, count(*), count(thumb),
                    coalesce(sum(thumb), 0), count(rating), coalesce(sum(rating), 0),
                    coalesce(sum(rating * rating), 0)
             FROM records WHERE created_us >= ?1 AND created_us < ?2
             GROUP BY model_version, bucket ORDER BY model_version, bucket"
        ))?;
        let rows = stmt.query_map(
            [
                from.map(micros).unwrap_or(i64::MIN),
                to.map(micros).unwrap_or(i64::MAX),
            ],
            |r| Ok((r.get::<_, i64>(0)?, VersionCounts::from_row(r, 1)?)),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Streams every live record, sorted by `id`, to `visit` (memory stays bounded).
    pub fn for_each_record(
        &self,
        mut visit: impl FnMut(FeedbackRecord) -> Result<()>,
    ) -> Result<()> {
        self.for_each_body(|id, body| {
            let wire: WireRecord = serde_json::from_str(body)
                .with_context(|| format!("record {id} in the store is not valid JSON"))?;
            match wire.validate() {
                Ok(Change::Upsert(record)) => visit(*record),
                Ok(Change::Delete { .. }) => bail!("record {id} in the store is a tombstone"),
                Err(e) => bail!("record {id} in the store no longer validates: {e}"),
            }
        })
    }

    /// Every live record, sorted by `id` (for small stores: tests, datasets of the sample).
    pub fn records(&self) -> Result<Vec<FeedbackRecord>> {
        let mut out = Vec::new();
        self.for_each_record(|r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Streams the stored canonical JSON of every live record, sorted by `id`.
    pub fn for_each_json(&self, mut visit: impl FnMut(&str) -> Result<()>) -> Result<()> {
        self.for_each_body(|_, body| visit(body))
    }

    /// Streams `(id, JSON body)` of every live record, sorted by `id`; a body that is not text
    /// names its record and is reported as damage.
    fn for_each_body(&self, mut visit: impl FnMut(&str, &str) -> Result<()>) -> Result<()> {
        self.reading(|| {
            let mut stmt = self
                .conn
                .prepare("SELECT id, body FROM records ORDER BY id")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let id = String::from_utf8_lossy(row.get_ref(0)?.as_bytes()?).into_owned();
                let body = row
                    .get_ref(1)?
                    .as_str()
                    .with_context(|| format!("the JSON of record {id}"))?;
                visit(&id, body)?;
            }
            Ok(())
        })
    }

    /// Runs a read of the database, reporting a damaged file as such (see [`if_damaged`]).
    fn reading<T>(&self, read: impl FnOnce() -> Result<T>) -> Result<T> {
        read().map_err(|e| if_damaged(&self.path, e))
    }

    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        self.reading(|| self.read_quarantined())
    }

    fn read_quarantined(&self) -> Result<Vec<Quarantined>> {
        let mut stmt = self.conn.prepare(
            "SELECT reason, raw, received_at FROM quarantine ORDER BY received_at, raw_sha256",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Quarantined {
                reason: r.get(0)?,
                raw: r.get(1)?,
                received_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Replaces an error showing that the database file itself is damaged (SQLite finds it corrupt
/// or not a database; a text column holds bytes that are not UTF-8) with one that names the file
/// and says what to do. Other errors pass through unchanged.
fn if_damaged(path: &Path, e: anyhow::Error) -> anyhow::Error {
    let damaged = e.chain().any(|cause| {
        cause.is::<std::str::Utf8Error>()
            || matches!(
                cause.downcast_ref::<rusqlite::Error>(),
                Some(rusqlite::Error::SqliteFailure(f, _))
                    if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
            )
    });
    if !damaged {
        return e;
    }
    anyhow!(
        "the feedback store {} looks corrupted: {e:#}\n\
         hint: the store is only a local copy of the feedback API: delete it (with the -wal and \
         -shm files beside it) and run `rlhf-bot pull` to fetch everything again",
        path.display()
    )
}

fn set_meta(conn: &Connection, key: &str, value: Option<&str>) -> Result<()> {
    match value {
        Some(v) => conn.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, v],
        )?,
        None => conn.execute("DELETE FROM meta WHERE key = ?1", [key])?,
    };
    Ok(())
}

/// Binds one record to an insert into `records` (plain or upsert: the same ten columns) and runs
/// it; returns the rows written.
fn write_record(
    stmt: &mut rusqlite::CachedStatement<'_>,
    id: &str,
    at: i64,
    record: &FeedbackRecord,
    body: &str,
) -> rusqlite::Result<usize> {
    let aspect = match &record.signal {
        super::Signal::Aspect { aspect, .. } => Some(aspect.as_str()),
        _ => None,
    };
    stmt.execute(params![
        id,
        at,
        micros(record.created_at),
        record.signal.kind(),
        record.model_version,
        aspect,
        record.answer_thumb().map(|t| t == super::Thumb::Up),
        record.answer_rating(),
        !record.response.content.trim().is_empty(),
        body
    ])
}

fn apply_items(tx: &Transaction<'_>, items: Vec<Incoming>) -> Result<ApplyCounts> {
    let mut counts = ApplyCounts::default();
    let mut newest: Option<i64> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'watermark_us'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok());
    let received_at = format_time(Utc::now());
    let mut current = tx.prepare_cached("SELECT updated_us FROM records WHERE id = ?1")?;
    let mut tombstone = tx.prepare_cached("SELECT updated_us FROM tombstones WHERE id = ?1")?;
    let mut upsert = tx.prepare_cached(
        "INSERT INTO records(id, updated_us, created_us, kind, model_version, aspect, thumb, rating,
                             has_answer, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT(id) DO UPDATE SET updated_us = excluded.updated_us,
             created_us = excluded.created_us, kind = excluded.kind,
             model_version = excluded.model_version, aspect = excluded.aspect,
             thumb = excluded.thumb, rating = excluded.rating, has_answer = excluded.has_answer,
             body = excluded.body",
    )?;
    let mut insert_new = tx.prepare_cached(
        "INSERT INTO records(id, updated_us, created_us, kind, model_version, aspect, thumb, rating,
                             has_answer, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT(id) DO NOTHING",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM records WHERE id = ?1")?;
    let mut bury = tx.prepare_cached(
        "INSERT INTO tombstones(id, updated_us) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET updated_us = excluded.updated_us",
    )?;
    let mut unbury = tx.prepare_cached("DELETE FROM tombstones WHERE id = ?1")?;
    let mut quarantine = tx.prepare_cached(
        "INSERT OR IGNORE INTO quarantine(raw_sha256, reason, raw, received_at) VALUES (?1, ?2, ?3, ?4)",
    )?;

    // Most stores hold no tombstones; then there is nothing to look up for each record.
    let mut any_tombstones: bool =
        tx.query_row("SELECT EXISTS(SELECT 1 FROM tombstones)", [], |r| r.get(0))?;
    for item in items {
        let Prepared { change, body } = match item {
            Incoming::Valid(prepared) => prepared,
            Incoming::Malformed { raw, reason } => {
                let digest = hex::encode(Sha256::digest(raw.as_bytes()));
                quarantine.execute(params![digest, reason.0, raw, received_at])?;
                counts.quarantined += 1;
                continue;
            }
        };
        let id = change.id().to_string();
        let at = micros(change.updated_at());
        newest = Some(newest.map_or(at, |n| n.max(at)));
        // A record the store has never seen (the common case: a first pull) is inserted at once;
        // only when its id exists does it take the look-ups below. With tombstones around, an
        // unknown id may still be a deleted one, so the look-ups come first.
        if !any_tombstones
            && let Change::Upsert(record) = &change
            && let Some(body) = &body
            && write_record(&mut insert_new, &id, at, record, body)? == 1
        {
            counts.inserted += 1;
            continue;
        }
        let live: Option<i64> = current.query_row([&id], |r| r.get(0)).optional()?;
        let buried: Option<i64> = if any_tombstones {
            tombstone.query_row([&id], |r| r.get(0)).optional()?
        } else {
            None
        };
        // Newest `updated_at` wins; on a tie the stored version stays (re-delivery is a no-op).
        let known = live.into_iter().chain(buried).max();
        if known.is_some_and(|k| k >= at) {
            counts.unchanged += 1;
            continue;
        }
        match change {
            Change::Delete { .. } => {
                bury.execute(params![id, at])?;
                any_tombstones = true;
                if live.is_some() {
                    delete.execute([&id])?;
                    counts.deleted += 1;
                } else {
                    counts.unchanged += 1;
                }
            }
            Change::Upsert(record) => {
                if buried.is_some() {
                    unbury.execute([&id])?;
                }
                let body = body.context("an upsert reached the store without its body")?;
                write_record(&mut upsert, &id, at, &record, &body)?;
                if live.is_some() {
                    counts.updated += 1
                } else {
                    counts.inserted += 1
                }
            }
        }
    }
    if let Some(n) = newest {
        set_meta(tx, "watermark_us", Some(&n.to_string()))?;
    }
    Ok(counts)
}
