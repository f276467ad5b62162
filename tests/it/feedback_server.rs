//! A real HTTP feedback API for tests and benchmarks: axum on loopback, serving the contract in
//! docs/feedback-api.yaml (bearer token, `updated_since` inclusive, opaque cursor, `limit`),
//! with scripted faults (status codes, 429 + Retry-After, slow, truncated or huge responses,
//! broken pagination) applied to successive requests. Shared with benches/pull.rs through `#[path]`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;

pub const TOKEN: &str = "test-token-8d1f";

/// What the server does to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answers normally (lets a script fail the second request, not the first).
    Pass,
    Status(u16),
    TooManyRequests {
        retry_after_secs: u64,
    },
    /// Sleeps before answering (past the client's timeout, to test timeouts).
    Slow(Duration),
    /// Answers 200 with the page cut in the middle.
    Truncated,
    /// Answers the page asked for, but with this `next_cursor` (a server repeating a cursor).
    NextCursor(String),
    /// Answers an empty page that still hands out this `next_cursor` (a feed that never ends).
    EmptyPage(String),
    /// Answers 200 with a body of `bytes` bytes, produced as it is sent (never held whole):
    /// chunked, or announced up front by `Content-Length`.
    HugeBody {
        bytes: u64,
        chunked: bool,
    },
    /// Answers `status` with `body`, where `{authorization}` becomes the request's
    /// `Authorization` header (a server that echoes credentials into its error page).
    Reply {
        status: u16,
        body: String,
    },
}

/// Where the records come from: a list (tests) or a generator (the million-record benchmark).
pub enum Records {
    List(Vec<Value>),
    /// `count` records produced on demand by `make(index)`, already in (updated_at, id) order.
    Generated {
        count: usize,
        make: Box<dyn Fn(usize) -> String + Send + Sync>,
    },
}

pub struct ServerState {
    pub records: Records,
    pub faults: VecDeque<Fault>,
    pub requests: u64,
    /// Sleep before every page (crash tests need a pull that takes a while).
    pub page_delay: Duration,
}

#[derive(Clone)]
pub struct FeedbackServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ServerState>>,
}

impl FeedbackServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn push_fault(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push_back(fault);
    }
    pub fn set_records(&self, records: Vec<Value>) {
        self.state.lock().unwrap().records = Records::List(sorted(records));
    }
    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }
}

fn sorted(mut records: Vec<Value>) -> Vec<Value> {
    let key = |v: &Value| {
        (
            v["updated_at"].as_str().unwrap_or("").to_string(),
            v["id"].as_str().unwrap_or("").to_string(),
        )
    };
    records.sort_by_key(key);
    records
}

#[derive(Deserialize)]
struct PageQuery {
    updated_since: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// Starts the server on an ephemeral loopback port, on its own thread and runtime, so it serves
/// whatever the test's own runtime is doing (including a blocking child-process wait).
pub fn start(records: Records, page_delay: Duration) -> FeedbackServer {
    let records = match records {
        Records::List(list) => Records::List(sorted(list)),
        generated => generated,
    };
    let state = Arc::new(Mutex::new(ServerState {
        records,
        faults: VecDeque::new(),
        requests: 0,
        page_delay,
    }));
    let app = Router::new()
        .route("/v1/feedback", get(page))
        .with_state(state.clone());
    let addr = serve_in_background(app);
    FeedbackServer { addr, state }
}

async fn page(
    State(state): State<Arc<Mutex<ServerState>>>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    let (fault, delay) = {
        let mut s = state.lock().unwrap();
        s.requests += 1;
        (s.faults.pop_front(), s.page_delay)
    };
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"error":"missing or wrong bearer token"}"#,
        )
            .into_response();
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return (
            StatusCode::BAD_REQUEST,
            format!(r#"{{"error":"limit must be 1..1000, got {limit}"}}"#),
        )
            .into_response();
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match &fault {
        Some(Fault::Status(code)) => {
            return (StatusCode::from_u16(*code).unwrap(), "fault injected").into_response();
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after_secs.to_string())],
                "slow down",
            )
                .into_response();
        }
        Some(Fault::Reply { status, body }) => {
            let authorization = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return (
                StatusCode::from_u16(*status).unwrap(),
                body.replace("{authorization}", authorization),
            )
                .into_response();
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(*d).await,
        Some(Fault::EmptyPage(next)) => {
            return json_ok(format!(
                r#"{{"data":[],"next_cursor":{}}}"#,
                Value::from(next.as_str())
            ));
        }
        Some(Fault::HugeBody { bytes, chunked }) => return huge_body(*bytes, *chunked),
        _ => {}
    }
    let body = {
        let s = state.lock().unwrap();
        let (start, end, items): (usize, usize, Vec<String>) = match &s.records {
            Records::List(list) => {
                let first = match &q.cursor {
                    Some(c) => match decode_cursor(c) {
                        Some(i) => i,
                        None => {
                            return (StatusCode::BAD_REQUEST, r#"{"error":"unknown cursor"}"#)
                                .into_response();
                        }
                    },
                    None => q.updated_since.as_deref().map_or(0, |since| {
                        list.partition_point(|r| r["updated_at"].as_str().unwrap_or("") < since)
                    }),
                };
                let end = (first + limit).min(list.len());
                (
                    first,
                    end,
                    list[first.min(end)..end]
                        .iter()
                        .map(|v| v.to_string())
                        .collect(),
                )
            }
            Records::Generated { count, make } => {
                let first = match &q.cursor {
                    Some(c) => decode_cursor(c).unwrap_or(0),
                    // Generated records carry increasing timestamps: `since` = index of that time.
                    None => q.updated_since.as_deref().map_or(0, |since| {
                        let (mut lo, mut hi) = (0, *count);
                        while lo < hi {
                            let mid = (lo + hi) / 2;
                            let v: Value = serde_json::from_str(&make(mid)).unwrap();
                            if v["updated_at"].as_str().unwrap() < since {
                                lo = mid + 1
                            } else {
                                hi = mid
                            }
                        }
                        lo
                    }),
                };
                let end = (first + limit).min(*count);
                (first, end, (first..end).map(make).collect())
            }
        };
        let total = match &s.records {
            Records::List(l) => l.len(),
            Records::Generated { count, .. } => *count,
        };
        let next = if let Some(Fault::NextCursor(c)) = &fault {
            Value::from(c.as_str()).to_string()
        } else if end < total && start < end {
            format!("\"{}\"", encode_cursor(end))
        } else {
            "null".into()
        };
        format!(
            "{{\"data\":[{}],\"next_cursor\":{}}}",
            items.join(","),
            next
        )
    };
    if matches!(fault, Some(Fault::Truncated)) {
        let cut = body.len() / 2;
        return json_ok(body[..cut].to_string());
    }
    json_ok(body)
}

fn json_ok(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A 200 whose body (JSON whitespace, never a page) is made 64 KiB at a time while it is sent, so
/// the server never holds it; sending stops when the client hangs up.
fn huge_body(bytes: u64, chunked: bool) -> Response {
    const CHUNK: usize = 64 * 1024;
    let filler = axum::body::Bytes::from(vec![b' '; CHUNK]);
    let chunks = futures::stream::unfold(0u64, move |sent| {
        let filler = filler.clone();
        async move {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            (n > 0).then(|| {
                (
                    Ok::<_, std::convert::Infallible>(filler.slice(..n)),
                    sent + n as u64,
                )
            })
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    if !chunked {
        headers.insert(header::CONTENT_LENGTH, bytes.into());
    }
    response
}

fn encode_cursor(offset: usize) -> String {
    format!("off-{offset:x}")
}

fn decode_cursor(cursor: &str) -> Option<usize> {
    usize::from_str_radix(cursor.strip_prefix("off-")?, 16).ok()
}

/// A valid record with the given id, kind payload and update time.
pub fn record(id: &str, updated_at: &str, payload: Value) -> Value {
    let mut r = serde_json::json!({
        "id": id,
        "conversation_id": format!("c_{}", &id[id.len().saturating_sub(1)..]),
        "message_id": format!("m_{id}"),
        "model_version": "policy-v1",
        "prompt": [{"role": "user", "content": "How does a carbon tax work?"}],
        "response": {"content": "It prices emissions.", "steps": ["First, a price.", "Then, less CO2."]},
        "created_at": "2026-11-01T00:00:00Z",
        "updated_at": updated_at,
    });
    for (k, v) in payload.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

pub fn thumb(id: &str, updated_at: &str, up: bool) -> Value {
    record(
        id,
        updated_at,
        serde_json::json!({"kind": "thumb", "thumb": if up { "up" } else { "down" }}),
    )
}

/// `n` valid thumbs with increasing timestamps, one second apart.
pub fn many_thumbs(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let t = chrono::DateTime::from_timestamp(1_793_000_000 + i as i64, 0).unwrap();
            thumb(
                &format!("fb_{i:06}"),
                &t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                i % 3 != 0,
            )
        })
        .collect()
}

/// Serves `app` on a loopback port from a thread with its own runtime, so that a test blocked on
/// a child process (or busy on its own runtime) cannot stall the server. Returns its address.
/// Here rather than in `common` because benches/pull.rs includes this file on its own.
pub fn serve_in_background(app: axum::Router) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().expect("the test server did not start")
}
