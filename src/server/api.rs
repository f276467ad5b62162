//! The feedback API's handlers: the read side (`GET /v1/feedback`, exactly what `rlhf-bot pull`
//! reads, docs/feedback-api.yaml), the write side (`POST /v1/feedback`, the two `DELETE`s) and
//! the KPIs. Every record goes through the same validator as the pull's quarantine
//! ([`WireRecord::validate`]); a batch with one bad record stores nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use super::auth::{Caller, SAME_ORIGIN, WIDGET_KEY_HEADER};
use super::db::{Outcome, WriteOp};
use super::error::ApiError;
use crate::feedback::record::{WireRecord, format_time};

/// `limit` bounds of the read side (docs/feedback-api.yaml).
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Who may call: resolves the request's credential, refusing anything else.
fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if let Some(key) = headers.get(WIDGET_KEY_HEADER) {
        let key = key.to_str().map_err(|_| ApiError::unauthorized())?;
        return state.credentials.widget(key).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown widget key: check the `key` attribute of <rlhf-feedback>",
            )
        });
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    state
        .credentials
        .bearer(token.trim())
        .ok_or_else(ApiError::unauthorized)
}

fn require_reader(caller: Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Reader => Ok(()),
        Caller::Writer => Err(ApiError::forbidden(
            "the write key cannot read feedback: use the read token (`server.read_token_env`)",
        )),
        Caller::Widget(_) => Err(ApiError::forbidden(
            "a widget key can only send feedback; reading needs the read token",
        )),
    }
}

/// The browser `Origin` a widget request must come from, and its rate limit.
fn admit_widget(
    state: &AppState,
    index: usize,
    headers: &HeaderMap,
    addr: SocketAddr,
) -> Result<String, ApiError> {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let own = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|host| format!("http://{host}"));
    let allowed = state
        .credentials
        .widget_origins(index)
        .iter()
        .any(|o| o == origin || (o == SAME_ORIGIN && own.as_deref() == Some(origin)));
    if !allowed {
        return Err(ApiError::forbidden(format!(
            "origin {:?} is not allowed for this widget key\nhint: add it to the key's `origins` in `server.widget_keys`",
            crate::sanitize::terminal_line(origin)
        )));
    }
    if let Err(seconds) = state.rate_limit.check(index, addr.ip()) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many requests from this address with this widget key; retry after {seconds} s"
            ),
        );
        e.retry_after = Some(seconds);
        return Err(e);
    }
    Ok(origin.to_string())
}

#[derive(Debug, Deserialize)]
pub struct FeedQuery {
    updated_since: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

/// An opaque cursor: the position after the last row served, bound to its `updated_since`.
fn encode_cursor(since_us: Option<i64>, served_us: i64, id: &str) -> String {
    let since = since_us.map_or_else(|| "-".to_string(), |s| s.to_string());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("1|{since}|{served_us}|{id}"))
}

fn decode_cursor(cursor: &str, since_us: Option<i64>) -> Result<(i64, String), ApiError> {
    let bad = || {
        ApiError::bad_request(
            "unknown cursor: pass back the `next_cursor` of the previous page unchanged, or start again without one",
        )
        .at("cursor")
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.splitn(4, '|');
    let (Some("1"), Some(since), Some(served), Some(id)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let cursor_since = if since == "-" {
        None
    } else {
        Some(since.parse::<i64>().map_err(|_| bad())?)
    };
    if cursor_since != since_us {
        return Err(ApiError::bad_request(
            "the cursor belongs to another `updated_since`: send the same `updated_since` with it",
        )
        .at("cursor"));
    }
    Ok((served.parse().map_err(|_| bad())?, id.to_string()))
}

fn parse_time(text: &str, field: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::bad_request(format!(
                "`{field}` is not an RFC 3339 time ({e}), e.g. 2026-12-01T00:00:00Z"
            ))
            .at(field)
        })
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub async fn list_feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FeedQuery>,
) -> Result<Response, ApiError> {
    require_reader(caller(&state, &headers)?)?;
    let since_us = match &q.updated_since {
        Some(t) => Some(parse_time(t, "updated_since")?.timestamp_micros()),
        None => None,
    };
    let limit = match &q.limit {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`limit` must be an integer from 1 to {MAX_LIMIT}"
                ))
                .at("limit"));
            }
        },
    };
    let after = match &q.cursor {
        Some(c) if !c.is_empty() => Some(decode_cursor(c, since_us)?),
        _ => None,
    };
    let mut rows = state
        .db
        .page(since_us, after, limit + 1)
        .await
        .map_err(|e| state.db_failed(&e))?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = match rows.last() {
        Some(last) if more => {
            serde_json::to_string(&encode_cursor(since_us, last.served_us, &last.id))
                .unwrap_or_else(|_| "null".into())
        }
        _ => "null".into(),
    };
    // The stored bodies are already the served JSON: the page is assembled, not re-serialised.
    let mut body = String::with_capacity(rows.iter().map(|r| r.body.len() + 1).sum::<usize>() + 64);
    body.push_str("{\"data\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&row.body);
    }
    body.push_str("],\"next_cursor\":");
    body.push_str(&next);
    body.push('}');
    Ok(json_response(StatusCode::OK, body))
}

#[derive(Debug, Serialize)]
struct WriteResult {
    id: String,
    outcome: Outcome,
}

/// Turns one posted JSON value into a write, filling what the server decides: `updated_at`
/// (and `created_at`) when the client sent none, and `source: end_user` for the widget.
fn to_op(
    raw: &RawValue,
    field: &str,
    caller: Caller,
    now: DateTime<Utc>,
) -> Result<WriteOp, ApiError> {
    // The plain parse is the fast path; only a record that fails it is parsed again with path
    // tracking (several times slower), to name the field in the answer.
    let mut wire: WireRecord = match serde_json::from_str(raw.get()) {
        Ok(wire) => wire,
        Err(_) => {
            let mut reader = serde_json::Deserializer::from_str(raw.get());
            let e = match serde_path_to_error::deserialize::<_, WireRecord>(&mut reader) {
                // Both parse the same bytes; agreeing to accept after one refused would be a
                // serde bug, answered like any unparsable record.
                Ok(_) => {
                    return Err(ApiError::bad_request(format!(
                        "`{field}`: the record could not be parsed"
                    ))
                    .at(field));
                }
                Err(e) => e,
            };
            let path = e.path().to_string();
            let at = if path == "." {
                field.to_string()
            } else {
                format!("{field}.{path}")
            };
            return Err(ApiError::bad_request(format!("`{at}`: {}", e.inner())).at(at));
        }
    };
    if wire.updated_at.is_none() {
        wire.updated_at = Some(format_time(now));
    }
    if wire.created_at.is_none() && wire.deleted != Some(true) {
        wire.created_at = wire.updated_at.clone();
    }
    if let Caller::Widget(_) = caller {
        if wire.deleted == Some(true) {
            return Err(ApiError::forbidden(
                "a widget key cannot delete feedback; the chat application's backend deletes with the write key",
            )
            .at(field));
        }
        if wire.source.as_deref().is_some_and(|s| s != "end_user") {
            return Err(ApiError::bad_request(
                "records sent with a widget key are `source: end_user`",
            )
            .at(format!("{field}.source")));
        }
        wire.source = Some("end_user".into());
    }
    let change = wire
        .validate()
        .map_err(|e| ApiError::bad_request(format!("{field}: {e}")).at(field))?;
    WriteOp::from_change(change).map_err(|e| {
        ApiError::bad_request(format!("{field}: cannot be stored as JSON: {e}")).at(field)
    })
}

pub async fn post_feedback(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&state, &headers)?;
    let origin = match who {
        Caller::Reader => {
            return Err(ApiError::forbidden(
                "the read token cannot write feedback: use the write key (`server.write_key_env`) or a widget key",
            ));
        }
        Caller::Writer => None,
        Caller::Widget(i) => Some(admit_widget(&state, i, &headers, addr)?),
    };
    let body = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the body is larger than {} bytes (`server.max_body_bytes`); send fewer records per request",
                state.settings.max_body_bytes
            )
        } else {
            format!("the body could not be read: {e}")
        };
        ApiError::new(status, "invalid_body", message)
    })?;
    let not_json = |e: serde_json::Error| {
        ApiError::bad_request(format!(
            "the body is not JSON ({e}); send one record, or {{\"data\": [records]}}"
        ))
    };
    // Only the top level is parsed here; each record is parsed once, on its own, below.
    let top: BTreeMap<&str, &RawValue> = serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request(
                "the body must be one record (an object), or {\"data\": [records]}",
            )
        } else {
            not_json(e)
        }
    })?;
    let now = Utc::now();
    let (values, batch): (Vec<&RawValue>, bool) = match top.get("data") {
        Some(data) => (
            serde_json::from_str(data.get()).map_err(|_| {
                ApiError::bad_request("`data` must be an array of records").at("data")
            })?,
            true,
        ),
        None => (
            vec![serde_json::from_slice(&body).map_err(not_json)?],
            false,
        ),
    };
    if values.is_empty() {
        return Err(ApiError::bad_request("`data` is empty").at("data"));
    }
    if values.len() > state.settings.max_batch {
        return Err(ApiError::bad_request(format!(
            "{} records in one request; the limit is {} (`server.max_batch`)",
            values.len(),
            state.settings.max_batch
        ))
        .at("data"));
    }
    let mut ops = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let field = if batch {
            format!("data[{i}]")
        } else {
            "record".to_string()
        };
        ops.push(to_op(value, &field, who, now)?);
    }
    let ids: Vec<String> = ops
        .iter()
        .map(|op| match op {
            WriteOp::Upsert { record, .. } => record.id.clone(),
            WriteOp::Delete { id, .. } => id.clone(),
            WriteOp::EraseUser { .. } => String::new(),
        })
        .collect();
    let outcomes = state.db.write(ops).await.map_err(|e| state.db_failed(&e))?;
    let results: Vec<WriteResult> = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| WriteResult { id, outcome })
        .collect();
    let (status, body) = if batch {
        (
            StatusCode::OK,
            serde_json::json!({ "results": results }).to_string(),
        )
    } else {
        let status = match results[0].outcome {
            Outcome::Conflict => StatusCode::CONFLICT,
            _ => StatusCode::OK,
        };
        (
            status,
            serde_json::to_string(&results[0]).unwrap_or_default(),
        )
    };
    let mut response = json_response(status, body);
    if let Some(origin) = origin {
        super::cors::allow(&mut response, &origin);
    }
    Ok(response)
}

async fn write_one(state: &AppState, op: WriteOp) -> Result<Outcome, ApiError> {
    let outcomes = state
        .db
        .write(vec![op])
        .await
        .map_err(|e| state.db_failed(&e))?;
    outcomes
        .first()
        .copied()
        .ok_or_else(|| state.db_failed(&anyhow::anyhow!("the writer answered no outcome")))
}

fn require_writer(caller: Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Writer => Ok(()),
        _ => Err(ApiError::forbidden(
            "deleting feedback needs the write key (`server.write_key_env`)",
        )),
    }
}

pub async fn delete_feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_writer(caller(&state, &headers)?)?;
    if id.is_empty()
        || id.len() > crate::feedback::record::limits::MAX_NAME_BYTES
        || id.contains('\0')
    {
        return Err(
            ApiError::bad_request("the id is empty, too long, or holds a NUL character").at("id"),
        );
    }
    let op = WriteOp::Delete {
        id: id.clone(),
        client_at: Utc::now(),
    };
    let outcome = write_one(&state, op).await?;
    let result = WriteResult { id, outcome };
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_string(&result).unwrap_or_default(),
    ))
}

pub async fn erase_user(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    require_writer(caller(&state, &headers)?)?;
    if user_id.is_empty()
        || user_id.len() > crate::feedback::record::limits::MAX_NAME_BYTES
        || user_id.contains('\0')
    {
        return Err(ApiError::bad_request(
            "the user id is empty, too long, or holds a NUL character",
        )
        .at("user_id"));
    }
    let erased = match write_one(&state, WriteOp::EraseUser { user_id }).await? {
        Outcome::Erased(n) => n,
        _ => 0,
    };
    // The user id is not echoed: responses end up in logs.
    Ok(json_response(
        StatusCode::OK,
        serde_json::json!({ "erased": erased }).to_string(),
    ))
}

#[derive(Debug, Deserialize)]
pub struct KpiQuery {
    model_version: Option<String>,
    from: Option<String>,
    to: Option<String>,
    bucket: Option<String>,
}

pub async fn kpis(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<KpiQuery>,
) -> Result<Response, ApiError> {
    require_reader(caller(&state, &headers)?)?;
    if q.bucket.as_deref().is_some_and(|b| b != "day") {
        return Err(ApiError::bad_request("`bucket` must be `day`").at("bucket"));
    }
    let to = match &q.to {
        Some(t) => parse_time(t, "to")?,
        None => Utc::now(),
    };
    let from = match &q.from {
        Some(t) => parse_time(t, "from")?,
        None => to - Duration::days(30),
    };
    if from >= to {
        return Err(ApiError::bad_request("`from` must be before `to`").at("from"));
    }
    if q.model_version.as_deref().is_some_and(|v| v.contains('\0')) {
        return Err(
            ApiError::bad_request("`model_version` holds a NUL character").at("model_version"),
        );
    }
    let buckets = state
        .db
        .kpi_counts(
            q.model_version.clone(),
            from.timestamp_micros(),
            to.timestamp_micros(),
        )
        .await
        .map_err(|e| state.db_failed(&e))?;
    let rows: Vec<serde_json::Value> = buckets
        .iter()
        .map(|b| {
            let day = DateTime::from_timestamp_micros(b.bucket_us)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            let mut v =
                serde_json::to_value(crate::kpi::version_kpis(&b.counts, 0.95)).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("bucket".into(), day.into());
            }
            v
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        serde_json::json!({
            "from": format_time(from),
            "to": format_time(to),
            "bucket": "day",
            "confidence": 0.95,
            "data": rows,
        })
        .to_string(),
    ))
}
