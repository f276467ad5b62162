//! The PostgreSQL backend of [`FeedbackDb`], chosen by `server.database: postgres://…`.
//!
//! Writes: one writer task per process owns one connection and applies every queued request in
//! one transaction (group commit, as the SQLite backend), then answers each after `COMMIT`.
//!
//! Why the writer is serialised: the feed's order is the server time assigned to each change.
//! With concurrent transactions, a transaction that took time T can commit after one that took
//! T+1; a reader that saw T+1 first moves its watermark past T and never sees that row. So one
//! transaction at a time assigns times and commits: inside this process the single writer task
//! does it, and each transaction also takes a transaction-scoped advisory lock and starts its
//! clock past the table's largest time, so two `serve` processes sharing one database keep the
//! same order (the lock queues them; the second reads what the first committed). A sequence
//! would not do: its values are handed out before commit, in no commit order.
//!
//! Reads use a small pool of their own connections and never wait for the writer.
//!
//! Deletion: the tombstone replaces the content in the row before the answer, but PostgreSQL
//! keeps the old row version as a dead tuple until VACUUM. After a group that deleted or erased
//! something, the writer runs `VACUUM feedback` before answering, so the old versions are gone
//! from the table's pages (docs/feedback-service.md says what remains: WAL segments until
//! recycled, and bytes in free page space until overwritten).
//!
//! The URL may hold a password: every message names the database by its redacted form.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls, Row, Statement, Transaction};

use super::{
    DAY_US, FeedRow, FeedbackDb, Job, KpiBucket, Outcome, QUEUE, RecordColumns, ServedClock,
    StoredVersion, WriteOp, plan_delete, plan_upsert, served_body, tombstone_body,
};
use crate::config::server::PostgresUrl;
use crate::feedback::record::format_time;
use crate::feedback::store::VersionCounts;
use crate::secret::SecretString;

/// Versioned schema steps, applied in order, each once; step N is the same schema as
/// [`super::sqlite`]'s step N. Text columns compare bytewise (`COLLATE "C"`), as SQLite's do,
/// so the feed's `(served_us, id)` order and its cursors do not depend on the database's locale.
const MIGRATIONS: &[&str] = &[
    // 1: records and tombstones in one table; the feed index; the erasure index.
    r#"CREATE TABLE feedback (
         id TEXT COLLATE "C" PRIMARY KEY,
         served_us BIGINT NOT NULL,
         client_us BIGINT NOT NULL,
         deleted BOOLEAN NOT NULL,
         user_id TEXT COLLATE "C",
         model_version TEXT COLLATE "C",
         kind TEXT COLLATE "C",
         thumb SMALLINT,
         rating INTEGER,
         created_us BIGINT,
         body TEXT NOT NULL);
     CREATE INDEX feedback_feed ON feedback(served_us, id);
     CREATE INDEX feedback_user ON feedback(user_id) WHERE user_id IS NOT NULL;
     CREATE INDEX feedback_kpi ON feedback(model_version, created_us) WHERE NOT deleted;"#,
];

/// Advisory-lock keys (per database): one for migrating, one held by each write transaction.
const MIGRATION_LOCK: i64 = 0x726c_6866_6d69_6772; // "rlhfmigr"
const WRITER_LOCK: i64 = 0x726c_6866_7772_6974; // "rlhfwrit"

/// Idle read connections kept; more are opened under load and closed after.
const READ_POOL: usize = 4;

pub struct PostgresDb {
    target: Target,
    jobs: mpsc::Sender<Job>,
    readers: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for PostgresDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDb")
            .field("url", &self.target.url)
            .finish_non_exhaustive()
    }
}

/// Where to connect: the URL, and the password from `server.database_password_env` (it
/// replaces one in the URL).
#[derive(Clone)]
struct Target {
    url: PostgresUrl,
    password: Option<SecretString>,
}

impl Target {
    /// Opens one connection: plain TCP, or TLS through rustls when the URL says
    /// `sslmode=require` (the server's certificate is verified against the system's roots).
    async fn connect(&self) -> Result<Client> {
        let name = self.url.redacted().to_string();
        let mut config: tokio_postgres::Config = self
            .url
            .expose()
            .parse()
            .with_context(|| format!("parsing the database URL {name}"))?;
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        // The hint goes last, after the driver's reason (a `.context()` would print it first).
        let failed = |e: tokio_postgres::Error| {
            let reason = anyhow::Error::from(e);
            anyhow!(
                "cannot connect to the feedback database {name}: {reason:#}\nhint: is PostgreSQL running there, and do the user, the password and the database exist?"
            )
        };
        let logged_name = name.clone();
        let closed = move |e: tokio_postgres::Error| {
            tracing::warn!(database = %logged_name, "a database connection ended: {e}");
        };
        if config.get_ssl_mode() == SslMode::Require {
            let (client, connection) = config.connect(tls()?).await.map_err(failed)?;
            tokio::spawn(async move { connection.await.map_err(closed) });
            Ok(client)
        } else {
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(async move { connection.await.map_err(closed) });
            Ok(client)
        }
    }
}

fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        anyhow::bail!(
            "`sslmode=require` but no CA certificate was found in the system's store\nhint: install ca-certificates (or add the database's CA to the system store)"
        );
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

async fn migrate(client: &mut Client, name: &str) -> Result<()> {
    // Two services starting at once on a new database: the second waits, then finds the
    // steps applied.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_migrations(client, name).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

async fn apply_migrations(client: &mut Client, name: &str) -> Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
        )
        .await
        .with_context(|| format!("creating schema_migrations in {name}"))?;
    let applied: i32 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    if applied as usize > MIGRATIONS.len() {
        anyhow::bail!(
            "the feedback database {name} has schema version {applied}, newer than this rlhf-bot knows ({})\nhint: run the rlhf-bot release that wrote it",
            MIGRATIONS.len()
        );
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i32::try_from(i + 1)?;
        let tx = client.transaction().await?;
        tx.batch_execute(step)
            .await
            .with_context(|| format!("applying schema step {version} to {name}"))?;
        tx.execute(
            "INSERT INTO schema_migrations(version, applied_at) VALUES ($1, $2)",
            &[&version, &format_time(Utc::now())],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

impl PostgresDb {
    /// Connects, migrates, and starts the writer task.
    pub async fn open(url: &PostgresUrl, password: Option<SecretString>) -> Result<Arc<Self>> {
        let target = Target {
            url: url.clone(),
            password,
        };
        let mut client = target.connect().await?;
        migrate(&mut client, url.redacted()).await?;
        let writer = Writer::new(client, target.clone()).await?;
        let readers = vec![target.connect().await?];
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer.run(rx));
        Ok(Arc::new(Self {
            target,
            jobs,
            readers: Mutex::new(readers),
        }))
    }

    /// Runs `f` on a pooled read connection (a new one when none is idle).
    async fn read<T>(&self, f: impl AsyncFnOnce(&Client) -> Result<T>) -> Result<T> {
        let idle = self
            .readers
            .lock()
            .map_err(|_| anyhow!("the read pool is poisoned"))?
            .pop()
            .filter(|c| !c.is_closed());
        let client = match idle {
            Some(c) => c,
            None => self.target.connect().await?,
        };
        let result = f(&client).await;
        if !client.is_closed()
            && let Ok(mut pool) = self.readers.lock()
            && pool.len() < READ_POOL
        {
            pool.push(client);
        }
        result
    }
}

impl FeedbackDb for PostgresDb {
    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<Vec<Outcome>>> {
        Box::pin(super::submit(&self.jobs, ops))
    }

    fn page(
        &self,
        since_us: Option<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FeedRow>>> {
        Box::pin(self.read(async move |client| {
            let (since, after_us, after_id) = super::page_bounds(since_us, after);
            let limit = i64::try_from(limit)?;
            let rows = client
                .query(
                    "SELECT served_us, id, body FROM feedback
                     WHERE served_us >= $1 AND (served_us > $2 OR (served_us = $2 AND id > $3))
                     ORDER BY served_us, id LIMIT $4",
                    &[&since, &after_us, &after_id, &limit],
                )
                .await
                .context("reading the feed")?;
            rows.iter()
                .map(|r| {
                    Ok(FeedRow {
                        served_us: r.try_get(0)?,
                        id: r.try_get(1)?,
                        body: r.try_get(2)?,
                    })
                })
                .collect()
        }))
    }

    fn kpi_counts(
        &self,
        model_version: Option<String>,
        from_us: i64,
        to_us: i64,
    ) -> BoxFuture<'_, Result<Vec<KpiBucket>>> {
        Box::pin(self.read(async move |client| {
            let rows = client
                .query(
                    "SELECT model_version, count(*), count(thumb), COALESCE(sum(thumb), 0),
                            count(rating), COALESCE(sum(rating), 0),
                            COALESCE(sum(rating * rating), 0),
                            (created_us / $1) * $1 AS bucket
                     FROM feedback
                     WHERE NOT deleted AND created_us >= $2 AND created_us < $3
                       AND kind IN ('thumb', 'rating')
                       AND ($4::text IS NULL OR model_version = $4)
                     GROUP BY model_version, bucket ORDER BY model_version, bucket",
                    &[&DAY_US, &from_us, &to_us, &model_version],
                )
                .await
                .context("counting KPIs")?;
            rows.iter().map(kpi_bucket).collect()
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.jobs.is_closed() {
                anyhow::bail!("the database writer has stopped");
            }
            self.read(async |client| {
                client.query_one("SELECT 1", &[]).await?;
                Ok(())
            })
            .await
        })
    }
}

/// The seven count columns, then the bucket, as the KPI query returns them.
fn kpi_bucket(r: &Row) -> Result<KpiBucket> {
    let count = |i: usize| -> Result<u64> { Ok(u64::try_from(r.try_get::<_, i64>(i)?)?) };
    Ok(KpiBucket {
        bucket_us: r.try_get(7)?,
        counts: VersionCounts {
            model_version: r.try_get(0)?,
            records: count(1)?,
            thumbs: count(2)?,
            thumbs_up: count(3)?,
            ratings: count(4)?,
            rating_sum: r.try_get::<_, i64>(5)? as f64,
            rating_sq_sum: r.try_get::<_, i64>(6)? as f64,
        },
    })
}

/// The statements the writer runs for every op, prepared once per connection.
struct Statements {
    stored: Statement,
    upsert: Statement,
    bury: Statement,
    live_of_user: Statement,
    forget_user: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self> {
        Ok(Self {
            stored: client
                .prepare("SELECT client_us, deleted, body FROM feedback WHERE id = $1")
                .await?,
            upsert: client
                .prepare(
                    "INSERT INTO feedback(id, served_us, client_us, deleted, user_id, model_version,
                                          kind, thumb, rating, created_us, body)
                     VALUES ($1, $2, $3, false, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT(id) DO UPDATE SET served_us = excluded.served_us,
                         client_us = excluded.client_us, deleted = false,
                         user_id = excluded.user_id, model_version = excluded.model_version,
                         kind = excluded.kind, thumb = excluded.thumb, rating = excluded.rating,
                         created_us = excluded.created_us, body = excluded.body",
                )
                .await?,
            bury: client
                .prepare(
                    "INSERT INTO feedback(id, served_us, client_us, deleted, body)
                     VALUES ($1, $2, $3, true, $4)
                     ON CONFLICT(id) DO UPDATE SET served_us = excluded.served_us,
                         client_us = excluded.client_us, deleted = true, user_id = NULL,
                         model_version = NULL, kind = NULL, thumb = NULL, rating = NULL,
                         created_us = NULL, body = excluded.body",
                )
                .await?,
            live_of_user: client
                .prepare("SELECT id, client_us FROM feedback WHERE user_id = $1 AND NOT deleted")
                .await?,
            forget_user: client
                .prepare("UPDATE feedback SET user_id = NULL WHERE user_id = $1")
                .await?,
        })
    }
}

/// The one writer of this process: its connection (re-opened when it drops) and its clock.
struct Writer {
    target: Target,
    conn: Option<(Client, Statements)>,
    clock: ServedClock,
}

impl Writer {
    async fn new(client: Client, target: Target) -> Result<Self> {
        let statements = Statements::prepare(&client).await?;
        Ok(Self {
            target,
            conn: Some((client, statements)),
            clock: ServedClock { last: 0 },
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let database = self.target.url.redacted().to_string();
        while let Some(first) = rx.recv().await {
            let jobs = super::gather(first, &mut rx);
            let result = self.apply_jobs(&jobs).await;
            if let Ok(outcomes) = &result
                && super::removed_content(outcomes, false)
                && let Some((client, _)) = &self.conn
                && let Err(e) = client.batch_execute("VACUUM feedback").await
            {
                tracing::warn!(database, "could not vacuum the table after a deletion: {e}");
            }
            super::answer(jobs, result, &database);
        }
    }

    async fn apply_jobs(&mut self, jobs: &[Job]) -> Result<Vec<Vec<Outcome>>> {
        if self.conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.conn = None;
            let client = self.target.connect().await?;
            let statements = Statements::prepare(&client).await?;
            self.conn = Some((client, statements));
        }
        let Some((client, statements)) = self.conn.as_mut() else {
            anyhow::bail!("the database writer has no connection");
        };
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK])
            .await?;
        let latest: i64 = tx
            .query_one("SELECT COALESCE(MAX(served_us), 0) FROM feedback", &[])
            .await?
            .try_get(0)?;
        self.clock.last = self.clock.last.max(latest);
        let mut all = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut outcomes = Vec::with_capacity(job.ops.len());
            for op in &job.ops {
                outcomes.push(apply_op(&tx, statements, op, &mut self.clock).await?);
            }
            all.push(outcomes);
        }
        tx.commit().await.context("committing feedback")?;
        Ok(all)
    }
}

async fn stored(
    tx: &Transaction<'_>,
    statements: &Statements,
    id: &str,
) -> Result<Option<StoredVersion>> {
    let Some(row) = tx.query_opt(&statements.stored, &[&id]).await? else {
        return Ok(None);
    };
    Ok(Some(StoredVersion {
        client_us: row.try_get(0)?,
        deleted: row.try_get(1)?,
        body: row.try_get(2)?,
    }))
}

async fn apply_op(
    tx: &Transaction<'_>,
    statements: &Statements,
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
            let existing = stored(tx, statements, row.id).await?;
            let outcome = match plan_upsert(existing.as_ref(), row.client_us, content) {
                Ok(outcome) => outcome,
                Err(answered) => return Ok(answered),
            };
            let served = clock.next();
            let body = served_body(content, served)?;
            tx.execute(
                &statements.upsert,
                &[
                    &row.id,
                    &served,
                    &row.client_us,
                    &row.user_id,
                    &row.model_version,
                    &row.kind,
                    &row.thumb,
                    &row.rating,
                    &row.created_us,
                    &body,
                ],
            )
            .await?;
            Ok(outcome)
        }
        WriteOp::Delete { id, client_at } => {
            let client_us = client_at.timestamp_micros();
            let existing = stored(tx, statements, id).await?;
            let outcome = match plan_delete(existing.as_ref(), client_us) {
                Ok(outcome) => outcome,
                Err(answered) => return Ok(answered),
            };
            bury(tx, statements, id, client_us, clock).await?;
            Ok(outcome)
        }
        WriteOp::EraseUser { user_id } => {
            let rows = tx.query(&statements.live_of_user, &[user_id]).await?;
            for r in &rows {
                let id: String = r.try_get(0)?;
                bury(tx, statements, &id, r.try_get(1)?, clock).await?;
            }
            // Tombstones of earlier deletes still carry the user id: drop it too.
            tx.execute(&statements.forget_user, &[user_id]).await?;
            Ok(Outcome::Erased(rows.len() as u64))
        }
    }
}

/// Replaces a record by its tombstone: the content leaves the row, the id and a new server
/// time stay so the deletion reaches every puller.
async fn bury(
    tx: &Transaction<'_>,
    statements: &Statements,
    id: &str,
    client_us: i64,
    clock: &mut ServedClock,
) -> Result<()> {
    let served = clock.next();
    let body = tombstone_body(id, served)?;
    tx.execute(&statements.bury, &[&id, &served, &client_us, &body])
        .await?;
    Ok(())
}
