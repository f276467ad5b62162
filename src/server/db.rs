//! The feedback service's database: the one storage interface ([`FeedbackDb`]) and its SQLite
//! implementation.
//!
//! Ordering: the feed is ordered by `(updated_at, id)`, where `updated_at` is the time the
//! SERVER accepted the change, strictly increasing across writes (one writer assigns it). A
//! client's own `updated_at` only decides which of two versions of a record wins (a later
//! client time is an edit, an earlier one is stale). With client times as the feed order, a
//! record arriving late with an old time would sort before the bot's watermark and never be
//! pulled.
//!
//! Writes: one writer thread owns the write connection and applies every queued request in one
//! transaction (group commit), then answers each. A request is acknowledged only after its
//! transaction committed; WAL with `synchronous = NORMAL` keeps committed transactions across a
//! killed process. Reads use their own connections and never wait for the writer.
//!
//! Migrations: `schema_migrations` records each applied step; [`MIGRATIONS`] only grows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::feedback::record::{Change, FeedbackRecord, format_time};
use crate::feedback::store::VersionCounts;

/// Versioned schema steps, applied in order, each once.
const MIGRATIONS: &[&str] = &[
    // 1: records and tombstones in one table; the feed index; the erasure index.
    "CREATE TABLE feedback (
         id TEXT PRIMARY KEY,
         served_us INTEGER NOT NULL,
         client_us INTEGER NOT NULL,
         deleted INTEGER NOT NULL,
         user_id TEXT,
         model_version TEXT,
         kind TEXT,
         thumb INTEGER,
         rating INTEGER,
         created_us INTEGER,
         body TEXT NOT NULL);
     CREATE INDEX feedback_feed ON feedback(served_us, id);
     CREATE INDEX feedback_user ON feedback(user_id) WHERE user_id IS NOT NULL;
     CREATE INDEX feedback_kpi ON feedback(model_version, created_us) WHERE deleted = 0;",
];

/// One change a client asked for.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Create or edit a record. `client_at` is the client's `updated_at` (or the time the server
    /// received it, when the client sent none).
    Upsert {
        record: Box<FeedbackRecord>,
        client_at: DateTime<Utc>,
    },
    Delete {
        id: String,
        client_at: DateTime<Utc>,
    },
    /// Tombstones every live record of one user (right to erasure).
    EraseUser { user_id: String },
}

impl WriteOp {
    pub fn from_change(change: Change) -> Self {
        match change {
            Change::Upsert(record) => {
                let client_at = record.updated_at;
                WriteOp::Upsert { record, client_at }
            }
            Change::Delete { id, updated_at } => WriteOp::Delete {
                id,
                client_at: updated_at,
            },
        }
    }
}

/// What a write did, per op, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    Updated,
    /// The same id and `updated_at` with the same content: a retried request, nothing changed.
    Unchanged,
    /// Older than the version stored (or than its deletion): ignored.
    Stale,
    /// The same id and `updated_at` as the stored version but other content.
    Conflict,
    Deleted,
    /// A delete of an id the server never had: a tombstone is kept so a late create cannot
    /// bring it back.
    NotFound,
    /// `EraseUser`: how many records were tombstoned.
    Erased(u64),
}

/// One row of the feed as served: its position and its JSON.
#[derive(Debug, Clone)]
pub struct FeedRow {
    pub served_us: i64,
    pub id: String,
    pub body: String,
}

/// Per model version and UTC day: the counts the KPI endpoint turns into rates and intervals.
#[derive(Debug, Clone, PartialEq)]
pub struct KpiBucket {
    /// Start of the day, as µs since the epoch.
    pub bucket_us: i64,
    pub counts: VersionCounts,
}

/// The storage interface every backend implements; the same test suite runs against each.
pub trait FeedbackDb: Send + Sync + 'static {
    /// Applies the ops in one transaction; answers only once it committed.
    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<Vec<Outcome>>>;
    /// Up to `limit` rows after `after` (exclusive), from `since_us` (inclusive), in feed order.
    fn page(
        &self,
        since_us: Option<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FeedRow>>>;
    /// Live answer-level records created in `[from_us, to_us)`, per version and UTC day.
    fn kpi_counts(
        &self,
        model_version: Option<String>,
        from_us: i64,
        to_us: i64,
    ) -> BoxFuture<'_, Result<Vec<KpiBucket>>>;
    /// Whether the database answers (for `/readyz`).
    fn ping(&self) -> BoxFuture<'_, Result<()>>;
}

struct Job {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<Vec<Outcome>, String>>,
}

/// SQLite in WAL mode: one writer thread, a small pool of read connections.
pub struct SqliteDb {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDb")
            .field("path", &self.path)
            .finish()
    }
}

/// Requests waiting for the writer; past this, callers wait for room (back-pressure).
const QUEUE: usize = 4096;
/// Ops applied in one transaction at most, so one commit never grows without bound.
const MAX_OPS_PER_COMMIT: usize = 20_000;

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("opening the feedback database {}", path.display()))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 10000;
         PRAGMA secure_delete = ON;
         PRAGMA wal_autocheckpoint = 4096;",
    )
    .with_context(|| format!("configuring the feedback database {}", path.display()))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
    )?;
    let applied: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    if applied > MIGRATIONS.len() as i64 {
        anyhow::bail!(
            "the feedback database {} has schema version {applied}, newer than this rlhf-bot knows ({})\nhint: run the rlhf-bot release that wrote it",
            path.display(),
            MIGRATIONS.len()
        );
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)
            .with_context(|| format!("applying schema step {} to {}", i + 1, path.display()))?;
        tx.execute(
            "INSERT INTO schema_migrations(version, applied_at) VALUES (?1, ?2)",
            params![i as i64 + 1, format_time(Utc::now())],
        )?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteDb {
    /// Opens (creating and migrating if needed) the database and starts its writer thread.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory {}", dir.display()))?;
        }
        let mut writer = open_connection(path)?;
        migrate(&mut writer, path)?;
        let last_served: i64 = writer.query_row(
            "SELECT COALESCE(MAX(served_us), 0) FROM feedback",
            [],
            |r| r.get(0),
        )?;
        let readers = (0..4)
            .map(|_| open_connection(path))
            .collect::<Result<Vec<_>>>()?;
        let (jobs, rx) = mpsc::channel(QUEUE);
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("feedback-db-writer".into())
            .spawn(move || writer_loop(writer, rx, last_served, &thread_path))
            .context("starting the database writer thread")?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            jobs,
            readers: Mutex::new(readers),
        }))
    }

    /// Runs `f` on a pooled read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self
            .readers
            .lock()
            .map_err(|_| anyhow!("the read pool is poisoned"))?
            .pop();
        let conn = match conn {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&conn);
            (conn, result)
        })
        .await
        .context("a database read panicked")?;
        if let Ok(mut pool) = self.readers.lock() {
            pool.push(conn);
        }
        result
    }
}

impl FeedbackDb for SqliteDb {
    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<Vec<Outcome>>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.jobs
                .send(Job { ops, reply })
                .await
                .map_err(|_| anyhow!("the database writer has stopped"))?;
            answer
                .await
                .map_err(|_| anyhow!("the database writer has stopped"))?
                .map_err(|e| anyhow!(e))
        })
    }

    fn page(
        &self,
        since_us: Option<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FeedRow>>> {
        Box::pin(self.read(move |conn| {
            let since = since_us.unwrap_or(i64::MIN);
            let (after_us, after_id) = after.unwrap_or((i64::MIN, String::new()));
            let mut stmt = conn.prepare_cached(
                "SELECT served_us, id, body FROM feedback
                 WHERE served_us >= ?1 AND (served_us > ?2 OR (served_us = ?2 AND id > ?3))
                 ORDER BY served_us, id LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![since, after_us, after_id, limit as i64], |r| {
                Ok(FeedRow {
                    served_us: r.get(0)?,
                    id: r.get(1)?,
                    body: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        }))
    }

    fn kpi_counts(
        &self,
        model_version: Option<String>,
        from_us: i64,
        to_us: i64,
    ) -> BoxFuture<'_, Result<Vec<KpiBucket>>> {
        const DAY_US: i64 = 86_400_000_000;
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT model_version, count(*), count(thumb), COALESCE(sum(thumb), 0),
                        count(rating), COALESCE(sum(rating), 0), COALESCE(sum(rating * rating), 0),
                        (created_us / ?1) * ?1 AS bucket
                 FROM feedback
                 WHERE deleted = 0 AND created_us >= ?2 AND created_us < ?3
                   AND kind IN ('thumb', 'rating')
                   AND (?4 IS NULL OR model_version = ?4)
                 GROUP BY model_version, bucket ORDER BY model_version, bucket",
            )?;
            let rows = stmt.query_map(params![DAY_US, from_us, to_us, model_version], |r| {
                Ok(KpiBucket {
                    bucket_us: r.get(7)?,
                    counts: VersionCounts::from_row(r, 0)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.jobs.is_closed() {
                anyhow::bail!("the database writer has stopped");
            }
            self.read(|conn| {
                conn.query_row("SELECT 1", [], |_| Ok(()))?;
                Ok(())
            })
            .await
        })
    }
}

/// Takes every queued request (up to [`MAX_OPS_PER_COMMIT`] ops), applies them in one
/// transaction, commits, then answers each. A failed transaction answers every request in it
/// with the error: nothing of it was stored, and nothing was acknowledged.
fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>, last_served: i64, path: &Path) {
    let mut clock = ServedClock { last: last_served };
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut ops = jobs[0].ops.len();
        while ops < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => {
                    ops += job.ops.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let clock_before = clock.last;
        let result = apply_jobs(&mut conn, &jobs, &mut clock);
        match result {
            Ok(outcomes) => {
                let removed = outcomes.iter().flatten().any(|o| {
                    matches!(
                        o,
                        Outcome::Deleted | Outcome::Updated | Outcome::Erased(1..)
                    )
                });
                // secure_delete zeroes the old content in the database pages, but the write-ahead
                // log still holds earlier images of those pages until it is checkpointed and
                // truncated. Deleted or erased feedback must leave every file before the client
                // hears that it is gone.
                if removed
                    && let Err(e) =
                        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                {
                    tracing::warn!(database = %path.display(), "could not truncate the write-ahead log after a deletion: {e}");
                }
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                clock.last = clock_before;
                tracing::error!(database = %path.display(), "a write transaction failed: {e:#}");
                let message = format!("{e:#}");
                for job in jobs {
                    let _ = job.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

/// Hands out strictly increasing server times in µs: the wall clock, or one past the last time
/// when the clock has not moved (or went back).
struct ServedClock {
    last: i64,
}

impl ServedClock {
    fn next(&mut self) -> i64 {
        let now = Utc::now().timestamp_micros();
        self.last = now.max(self.last + 1);
        self.last
    }
}

fn apply_jobs(
    conn: &mut Connection,
    jobs: &[Job],
    clock: &mut ServedClock,
) -> Result<Vec<Vec<Outcome>>> {
    let tx = conn.transaction()?;
    let mut all = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut outcomes = Vec::with_capacity(job.ops.len());
        for op in &job.ops {
            outcomes.push(apply_op(&tx, op, clock)?);
        }
        all.push(outcomes);
    }
    tx.commit().context("committing feedback")?;
    Ok(all)
}

/// The stored version of one id: (client time, deleted, body).
fn stored(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Option<(i64, bool, String)>> {
    Ok(tx
        .prepare_cached("SELECT client_us, deleted, body FROM feedback WHERE id = ?1")?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?))
        })
        .optional()?)
}

/// A record's JSON as served: its own fields, with the server's `updated_at`.
fn served_body(record: &FeedbackRecord, served_us: i64) -> Result<String> {
    let mut wire = record.to_wire();
    let at = DateTime::from_timestamp_micros(served_us).context("server time out of range")?;
    wire.updated_at = Some(format_time(at));
    Ok(serde_json::to_string(&wire)?)
}

fn tombstone_body(id: &str, served_us: i64) -> Result<String> {
    let at = DateTime::from_timestamp_micros(served_us).context("server time out of range")?;
    Ok(serde_json::json!({"id": id, "updated_at": format_time(at), "deleted": true}).to_string())
}

/// The body without its `updated_at`, to tell a retried request from a conflicting one.
fn content_of(body: &str) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.as_object_mut()?.remove("updated_at");
    Some(v)
}

fn apply_op(
    tx: &rusqlite::Transaction<'_>,
    op: &WriteOp,
    clock: &mut ServedClock,
) -> Result<Outcome> {
    match op {
        WriteOp::Upsert { record, client_at } => {
            let client_us = client_at.timestamp_micros();
            let existing = stored(tx, &record.id)?;
            let outcome = match &existing {
                None => Outcome::Created,
                Some((known, _, _)) if client_us < *known => return Ok(Outcome::Stale),
                Some((known, deleted, body)) if client_us == *known => {
                    if *deleted {
                        return Ok(Outcome::Stale);
                    }
                    let candidate = served_body(record, 0)?;
                    return Ok(if content_of(&candidate) == content_of(body) {
                        Outcome::Unchanged
                    } else {
                        Outcome::Conflict
                    });
                }
                Some(_) => Outcome::Updated,
            };
            let served = clock.next();
            let body = served_body(record, served)?;
            tx.prepare_cached(
                "INSERT INTO feedback(id, served_us, client_us, deleted, user_id, model_version,
                                      kind, thumb, rating, created_us, body)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(id) DO UPDATE SET served_us = excluded.served_us,
                     client_us = excluded.client_us, deleted = 0, user_id = excluded.user_id,
                     model_version = excluded.model_version, kind = excluded.kind,
                     thumb = excluded.thumb, rating = excluded.rating,
                     created_us = excluded.created_us, body = excluded.body",
            )?
            .execute(params![
                record.id,
                served,
                client_us,
                record.user_id,
                record.model_version,
                record.signal.kind(),
                record
                    .answer_thumb()
                    .map(|t| t == crate::feedback::Thumb::Up),
                record.answer_rating(),
                record.created_at.timestamp_micros(),
                body,
            ])?;
            Ok(outcome)
        }
        WriteOp::Delete { id, client_at } => {
            let client_us = client_at.timestamp_micros();
            let existing = stored(tx, id)?;
            let outcome = match &existing {
                Some((known, _, _)) if client_us < *known => return Ok(Outcome::Stale),
                Some((_, true, _)) => return Ok(Outcome::Unchanged),
                Some(_) => Outcome::Deleted,
                None => Outcome::NotFound,
            };
            bury(tx, id, client_us, clock)?;
            Ok(outcome)
        }
        WriteOp::EraseUser { user_id } => {
            let ids: Vec<(String, i64)> = tx
                .prepare_cached(
                    "SELECT id, client_us FROM feedback WHERE user_id = ?1 AND deleted = 0",
                )?
                .query_map([user_id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (id, client_us) in &ids {
                bury(tx, id, *client_us, clock)?;
            }
            // Tombstones of earlier deletes still carry the user id: drop it too.
            tx.prepare_cached("UPDATE feedback SET user_id = NULL WHERE user_id = ?1")?
                .execute([user_id])?;
            Ok(Outcome::Erased(ids.len() as u64))
        }
    }
}

/// Replaces a record by its tombstone: the content leaves the row (and, with `secure_delete`,
/// the file), the id and a new server time stay so the deletion reaches every puller.
fn bury(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    client_us: i64,
    clock: &mut ServedClock,
) -> Result<()> {
    let served = clock.next();
    tx.prepare_cached(
        "INSERT INTO feedback(id, served_us, client_us, deleted, body) VALUES (?1, ?2, ?3, 1, ?4)
         ON CONFLICT(id) DO UPDATE SET served_us = excluded.served_us,
             client_us = excluded.client_us, deleted = 1, user_id = NULL, model_version = NULL,
             kind = NULL, thumb = NULL, rating = NULL, created_us = NULL, body = excluded.body",
    )?
    .execute(params![id, served, client_us, tombstone_body(id, served)?])?;
    Ok(())
}
