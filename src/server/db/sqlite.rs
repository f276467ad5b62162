//! The SQLite backend of [`FeedbackDb`]: a file in WAL mode.
//!
//! Writes: one writer thread owns the write connection and applies every queued request in one
//! transaction (group commit), then answers each; WAL with `synchronous = NORMAL` keeps
//! committed transactions across a killed process. Reads use their own connections and never
//! wait for the writer. Deleted content leaves the file too: `secure_delete` zeroes it in the
//! pages, and the write-ahead log is truncated before the client hears it is gone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use futures::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::{
    DAY_US, FeedRow, FeedbackDb, Job, KpiBucket, Outcome, QUEUE, RecordColumns, ServedClock,
    StoredVersion, WriteOp, plan_delete, plan_upsert, served_body, tombstone_body,
};
use crate::feedback::record::format_time;
use crate::feedback::store::VersionCounts;

/// Versioned schema steps, applied in order, each once; step N is the same schema as
/// [`super::postgres`]'s step N.
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

/// Each connection keeps up to 64 MiB of pages and reads the file through a 256 MiB memory map:
/// with SQLite's 2 MiB default, most of a batch's index look-ups were `read()` system calls
/// into the page cache (the writer's largest cost in a profile of `cargo bench --bench serve`).
fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("opening the feedback database {}", path.display()))?;
    crate::sqlite_pages::request_page_size(&conn)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 10000;
         PRAGMA secure_delete = ON;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA cache_size = -65536;
         PRAGMA mmap_size = 268435456;",
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
        // Checkpoints run beside the writer, not inside its commits: a checkpoint copies the
        // whole write-ahead log into the database file, and inside a commit it stalled every
        // request of that group (p99 of single writes 27-38 ms with, 7-9 ms without).
        // The writer still checkpoints past 64 MiB of log, should the thread fall behind: a
        // long log makes every read search more of the log's index.
        crate::sqlite_pages::checkpoint_after_bytes(&writer, 64 << 20)?;
        let checkpointer = open_connection(path)?;
        let (jobs, rx) = mpsc::channel(QUEUE);
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("feedback-db-writer".into())
            .spawn(move || writer_loop(writer, rx, last_served, &thread_path))
            .context("starting the database writer thread")?;
        let db = Arc::new(Self {
            path: path.to_path_buf(),
            jobs,
            readers: Mutex::new(readers),
        });
        let weak = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("feedback-db-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, weak))
            .context("starting the database checkpoint thread")?;
        Ok(db)
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
        Box::pin(super::submit(&self.jobs, ops))
    }

    fn page(
        &self,
        since_us: Option<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FeedRow>>> {
        Box::pin(self.read(move |conn| {
            let (since, after_us, after_id) = super::page_bounds(since_us, after);
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

/// Takes every queued request (one group commit, [`super::gather`]), applies them in one
/// transaction, commits, then answers each.
/// How often the log is copied into the database file: PASSIVE never waits for the writer or
/// the readers, so it only takes what is not in use.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Checkpoints until the database is dropped (the service shut down).
fn checkpoint_loop(conn: Connection, db: std::sync::Weak<SqliteDb>) {
    while db.strong_count() > 0 {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("could not checkpoint the feedback database: {e}");
        }
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>, last_served: i64, path: &Path) {
    let mut clock = ServedClock { last: last_served };
    let database = path.display().to_string();
    while let Some(first) = rx.blocking_recv() {
        let jobs = super::gather(first, &mut rx);
        let clock_before = clock.last;
        let result = apply_jobs(&mut conn, &jobs, &mut clock);
        match &result {
            // secure_delete zeroes the old content in the database pages, but the write-ahead
            // log still holds earlier images of those pages until it is checkpointed and
            // truncated. Deleted or erased feedback must leave every file before the client
            // hears that it is gone.
            Ok(outcomes) if super::removed_content(outcomes, true) => {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                    tracing::warn!(
                        database,
                        "could not truncate the write-ahead log after a deletion: {e}"
                    );
                }
            }
            Ok(_) => {}
            Err(_) => clock.last = clock_before,
        }
        super::answer(jobs, result, &database);
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

fn stored(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Option<StoredVersion>> {
    Ok(tx
        .prepare_cached("SELECT client_us, deleted, body FROM feedback WHERE id = ?1")?
        .query_row([id], |r| {
            Ok(StoredVersion {
                client_us: r.get(0)?,
                deleted: r.get::<_, i64>(1)? != 0,
                body: r.get(2)?,
            })
        })
        .optional()?)
}

fn apply_op(
    tx: &rusqlite::Transaction<'_>,
    op: &WriteOp,
    clock: &mut ServedClock,
) -> Result<Outcome> {
    match op {
        WriteOp::Upsert {
            record,
            client_at,
            content,
        } => {
            let row = RecordColumns::of(record, *client_at);
            let outcome = match plan_upsert(stored(tx, row.id)?.as_ref(), row.client_us, content) {
                Ok(outcome) => outcome,
                Err(answered) => return Ok(answered),
            };
            let served = clock.next();
            let body = served_body(content, served)?;
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
                row.id,
                served,
                row.client_us,
                row.user_id,
                row.model_version,
                row.kind,
                row.thumb,
                row.rating,
                row.created_us,
                body,
            ])?;
            Ok(outcome)
        }
        WriteOp::Delete { id, client_at } => {
            let client_us = client_at.timestamp_micros();
            let outcome = match plan_delete(stored(tx, id)?.as_ref(), client_us) {
                Ok(outcome) => outcome,
                Err(answered) => return Ok(answered),
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
