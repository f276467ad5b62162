//! The feedback service's database: the one storage interface ([`FeedbackDb`]), the types and
//! rules every backend shares, and the choice of backend from `server.database`.
//!
//! - [`sqlite`]: a file in WAL mode (the default);
//! - [`postgres`]: a `postgres://` URL.
//!
//! Semantics every backend keeps (tests/it/serve.rs runs the same suite against each):
//!
//! - Ordering: the feed is ordered by `(updated_at, id)`, where `updated_at` is the time the
//!   SERVER accepted the change, strictly increasing across writes and visible in that order
//!   (one writer assigns it and commits before assigning the next). A client's own `updated_at`
//!   only decides which of two versions of a record wins (a later client time is an edit, an
//!   earlier one is stale). With client times as the feed order, a record arriving late with an
//!   old time would sort before the bot's watermark and never be pulled.
//! - Writes: one writer applies every queued request in one transaction (group commit), then
//!   answers each. A request is acknowledged only after its transaction committed.
//! - Deletion and erasure replace a record by a tombstone: the content leaves the row before
//!   the answer, the id and a new server time stay so the deletion reaches every puller.
//! - Migrations: `schema_migrations` records each applied step; each backend's list only grows,
//!   and step N means the same schema in both.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::config::server::DatabaseLocation;
use crate::feedback::record::{Change, FeedbackRecord, format_time};
use crate::feedback::store::VersionCounts;
use crate::secret::SecretString;

pub use postgres::PostgresDb;
pub use sqlite::SqliteDb;

/// Opens (creating and migrating if needed) the configured database and starts its writer.
/// `env` reads the variable `server.database_password_env` names, if any.
pub async fn open(
    location: &DatabaseLocation,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn FeedbackDb>> {
    Ok(match location {
        DatabaseLocation::Sqlite(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || SqliteDb::open(&path))
                .await
                .context("opening the SQLite database panicked")??
        }
        DatabaseLocation::Postgres { url, password_env } => {
            let password = match password_env {
                None => None,
                Some(var) => match env(var) {
                    Some(value) if !value.is_empty() => Some(SecretString::new(value)),
                    _ => anyhow::bail!(
                        "`server.database_password_env` names {var}, which is not set or empty\nhint: export {var}=<the database password>"
                    ),
                },
            };
            PostgresDb::open(url, password).await?
        }
    })
}

/// One change a client asked for.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Create or edit a record. `client_at` is the client's `updated_at` (or the time the server
    /// received it, when the client sent none).
    Upsert {
        record: Box<FeedbackRecord>,
        client_at: DateTime<Utc>,
        /// The record's JSON without `updated_at`, made by the request's task so that the one
        /// writer only appends the server time ([`served_body`]).
        content: String,
    },
    Delete {
        id: String,
        client_at: DateTime<Utc>,
    },
    /// Tombstones every live record of one user (right to erasure).
    EraseUser { user_id: String },
}

impl WriteOp {
    pub fn from_change(change: Change) -> Result<Self> {
        Ok(match change {
            Change::Upsert(record) => {
                let client_at = record.updated_at;
                let mut wire = record.to_wire();
                wire.updated_at = None;
                let content = serde_json::to_string(&wire)?;
                WriteOp::Upsert {
                    record,
                    client_at,
                    content,
                }
            }
            Change::Delete { id, updated_at } => WriteOp::Delete {
                id,
                client_at: updated_at,
            },
        })
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

/// The width of a KPI bucket: one UTC day in µs.
pub const DAY_US: i64 = 86_400_000_000;

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

/// A page's bounds with their defaults: (from time, after time, after id) — every row when
/// neither is given.
pub(crate) fn page_bounds(
    since_us: Option<i64>,
    after: Option<(i64, String)>,
) -> (i64, i64, String) {
    let (after_us, after_id) = after.unwrap_or((i64::MIN, String::new()));
    (since_us.unwrap_or(i64::MIN), after_us, after_id)
}

/// One request waiting for the writer, with where to send its outcomes.
pub(crate) struct Job {
    pub ops: Vec<WriteOp>,
    pub reply: oneshot::Sender<Result<Vec<Outcome>, String>>,
}

/// Requests waiting for the writer; past this, callers wait for room (back-pressure).
pub(crate) const QUEUE: usize = 4096;
/// Ops applied in one transaction at most, so one commit never grows without bound.
const MAX_OPS_PER_COMMIT: usize = 20_000;

/// The writer's side of the queue: hands a request to the writer and waits for its answer.
pub(crate) async fn submit(jobs: &mpsc::Sender<Job>, ops: Vec<WriteOp>) -> Result<Vec<Outcome>> {
    let (reply, answer) = oneshot::channel();
    jobs.send(Job { ops, reply })
        .await
        .map_err(|_| anyhow::anyhow!("the database writer has stopped"))?;
    answer
        .await
        .map_err(|_| anyhow::anyhow!("the database writer has stopped"))?
        .map_err(|e| anyhow::anyhow!(e))
}

/// One group commit: `first` and every request already queued behind it, up to
/// [`MAX_OPS_PER_COMMIT`] ops.
pub(crate) fn gather(first: Job, rx: &mut mpsc::Receiver<Job>) -> Vec<Job> {
    let mut ops = first.ops.len();
    let mut jobs = vec![first];
    while ops < MAX_OPS_PER_COMMIT {
        match rx.try_recv() {
            Ok(job) => {
                ops += job.ops.len();
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    jobs
}

/// Answers every request of a group commit: its outcomes once committed, or the error of the
/// failed transaction (nothing of it was stored, and nothing was acknowledged).
pub(crate) fn answer(jobs: Vec<Job>, result: Result<Vec<Vec<Outcome>>>, database: &str) {
    match result {
        Ok(outcomes) => {
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                let _ = job.reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            tracing::error!(database, "a write transaction failed: {e:#}");
            let message = format!("{e:#}");
            for job in jobs {
                let _ = job.reply.send(Err(message.clone()));
            }
        }
    }
}

/// Whether a committed group removed someone's content (a deletion, an erasure, or an edit
/// that replaced a version): the backend then purges what it keeps of old row images.
pub(crate) fn removed_content(outcomes: &[Vec<Outcome>], edits_count: bool) -> bool {
    outcomes.iter().flatten().any(|o| match o {
        Outcome::Deleted | Outcome::Erased(1..) => true,
        Outcome::Updated => edits_count,
        _ => false,
    })
}

/// Hands out strictly increasing server times in µs: the wall clock, or one past the last time
/// when the clock has not moved (or went back).
pub(crate) struct ServedClock {
    pub last: i64,
}

impl ServedClock {
    pub fn next(&mut self) -> i64 {
        let now = Utc::now().timestamp_micros();
        self.last = now.max(self.last + 1);
        self.last
    }
}

/// The version of one id a backend has stored.
pub(crate) struct StoredVersion {
    pub client_us: i64,
    pub deleted: bool,
    pub body: String,
}

/// What an upsert does given the stored version: `Ok(outcome)` when the row must be written,
/// `Err(outcome)` when it is answered without writing (stale, retried, conflicting).
pub(crate) fn plan_upsert(
    existing: Option<&StoredVersion>,
    client_us: i64,
    content: &str,
) -> Result<Outcome, Outcome> {
    match existing {
        None => Ok(Outcome::Created),
        Some(known) if client_us < known.client_us => Err(Outcome::Stale),
        Some(known) if client_us == known.client_us => Err(if known.deleted {
            Outcome::Stale
        } else if same_content(&known.body, content) {
            Outcome::Unchanged
        } else {
            Outcome::Conflict
        }),
        Some(_) => Ok(Outcome::Updated),
    }
}

/// What a delete does given the stored version: `Ok(outcome)` when a tombstone must be written.
pub(crate) fn plan_delete(
    existing: Option<&StoredVersion>,
    client_us: i64,
) -> Result<Outcome, Outcome> {
    match existing {
        Some(known) if client_us < known.client_us => Err(Outcome::Stale),
        Some(known) if known.deleted => Err(Outcome::Unchanged),
        Some(_) => Ok(Outcome::Deleted),
        None => Ok(Outcome::NotFound),
    }
}

/// The columns of a live record, as both backends store them.
pub(crate) struct RecordColumns<'a> {
    pub id: &'a str,
    pub client_us: i64,
    pub user_id: Option<&'a str>,
    pub model_version: &'a str,
    pub kind: &'static str,
    /// Answer-level thumbs only: up is 1, down 0 (so `sum` counts the ups).
    pub thumb: Option<i16>,
    pub rating: Option<i32>,
    pub created_us: i64,
}

impl<'a> RecordColumns<'a> {
    pub fn of(record: &'a FeedbackRecord, client_at: DateTime<Utc>) -> Self {
        Self {
            id: &record.id,
            client_us: client_at.timestamp_micros(),
            user_id: record.user_id.as_deref(),
            model_version: &record.model_version,
            kind: record.signal.kind(),
            thumb: record
                .answer_thumb()
                .map(|t| i16::from(t == crate::feedback::Thumb::Up)),
            rating: record.answer_rating().map(i32::from),
            created_us: record.created_at.timestamp_micros(),
        }
    }
}

/// The key the served time is appended under; inside a JSON string a `"` is always escaped, so
/// this text can only be our own key.
const SERVED_KEY: &str = ",\"updated_at\":\"";

/// A record's JSON as served: its content with the server's `updated_at` appended.
pub(crate) fn served_body(content: &str, served_us: i64) -> Result<String> {
    let at = DateTime::from_timestamp_micros(served_us).context("server time out of range")?;
    let open = content
        .strip_suffix('}')
        .context("a record's JSON does not end with `}`")?;
    Ok(format!("{open}{SERVED_KEY}{}\"}}", format_time(at)))
}

/// Whether a stored body is `content` with some served time (a retried request).
fn same_content(stored: &str, content: &str) -> bool {
    match (stored.rfind(SERVED_KEY), content.strip_suffix('}')) {
        (Some(cut), Some(open)) => &stored[..cut] == open,
        _ => false,
    }
}

pub(crate) fn tombstone_body(id: &str, served_us: i64) -> Result<String> {
    let at = DateTime::from_timestamp_micros(served_us).context("server time out of range")?;
    Ok(serde_json::json!({"id": id, "updated_at": format_time(at), "deleted": true}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(client_us: i64, deleted: bool, content: &str) -> StoredVersion {
        StoredVersion {
            client_us,
            deleted,
            body: served_body(content, 1_000).unwrap(),
        }
    }

    #[test]
    fn an_upsert_is_decided_by_the_client_time_then_the_content() {
        let stored = version(10, false, r#"{"id":"a","thumb":"up"}"#);
        let same = r#"{"id":"a","thumb":"up"}"#;
        let other = r#"{"id":"a","thumb":"down"}"#;
        assert_eq!(plan_upsert(None, 10, same), Ok(Outcome::Created));
        assert_eq!(plan_upsert(Some(&stored), 9, same), Err(Outcome::Stale));
        assert_eq!(
            plan_upsert(Some(&stored), 10, same),
            Err(Outcome::Unchanged)
        );
        assert_eq!(
            plan_upsert(Some(&stored), 10, other),
            Err(Outcome::Conflict)
        );
        assert_eq!(plan_upsert(Some(&stored), 11, other), Ok(Outcome::Updated));
        let buried = version(10, true, r#"{"id":"a"}"#);
        assert_eq!(plan_upsert(Some(&buried), 10, same), Err(Outcome::Stale));
        assert_eq!(plan_upsert(Some(&buried), 11, same), Ok(Outcome::Updated));
    }

    #[test]
    fn a_delete_keeps_a_tombstone_even_for_an_unknown_id() {
        let stored = version(10, false, r#"{"id":"a"}"#);
        assert_eq!(plan_delete(None, 10), Ok(Outcome::NotFound));
        assert_eq!(plan_delete(Some(&stored), 9), Err(Outcome::Stale));
        assert_eq!(plan_delete(Some(&stored), 10), Ok(Outcome::Deleted));
        let buried = version(10, true, r#"{"id":"a"}"#);
        assert_eq!(plan_delete(Some(&buried), 11), Err(Outcome::Unchanged));
    }

    #[test]
    fn served_times_strictly_increase_even_when_the_clock_does_not() {
        let mut clock = ServedClock { last: i64::MAX / 2 };
        let first = clock.next();
        assert!(clock.next() > first);
    }
}
