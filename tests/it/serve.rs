//! `rlhf-bot serve`, the feedback service, run as users run it: the release-shaped binary as a
//! child process on a loopback port, written to over HTTP, and read by `rlhf-bot pull`.
//!
//! Every test that stores something runs once per storage backend (`serve::sqlite::…` and
//! `serve::postgres::…`, see [`on_every_backend`]); the PostgreSQL runs use a real server the
//! tests start themselves (`postgres_server`), one database per test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Workspace, bin, run, stderr};
use crate::postgres_server::PgServer;

const READ: &str = "read-token-for-tests-0001";
const WRITE: &str = "write-key-for-tests-0001";
const WIDGET: &str = "widget-key-for-tests-0001";
const PAGE_ORIGIN: &str = "http://chat.example.test";

/// A running `rlhf-bot serve`; killed when dropped.
struct Service {
    child: Child,
    url: String,
    config: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test's service keeps its feedback.
enum Backend {
    /// `service/feedback.sqlite3` in the test's workspace.
    Sqlite,
    /// A new database on the shared test server: its URL.
    Postgres(String),
}

/// The PostgreSQL server this test binary shares, started on first use; `None` (with a
/// "skipped" message) when its binaries are absent and the tests are not required
/// (`RLHF_REQUIRE_TEST_ASSETS` unset).
fn postgres_server() -> Option<&'static PgServer> {
    static SERVER: std::sync::OnceLock<Option<PgServer>> = std::sync::OnceLock::new();
    SERVER
        .get_or_init(|| {
            let bin = crate::postgres_server::bin_dir();
            crate::common::have(&bin.join("initdb"), "PostgreSQL (Debian's `postgresql`)")
                .then(|| PgServer::start(bin))
        })
        .as_ref()
}

impl Backend {
    /// A fresh PostgreSQL database, or `None` (the test is skipped, with a message) when the
    /// server binaries are absent and not required.
    fn postgres() -> Option<Backend> {
        postgres_server().map(|server| Backend::Postgres(server.fresh_database()))
    }

    fn database(&self, ws: &Workspace) -> String {
        match self {
            Backend::Sqlite => ws
                .path()
                .join("service/feedback.sqlite3")
                .display()
                .to_string(),
            Backend::Postgres(url) => url.clone(),
        }
    }
}

/// Runs each named test (a `fn(&Backend)`) once per backend: `sqlite::NAME`, `postgres::NAME`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Backend::Sqlite)
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                if let Some(backend) = super::Backend::postgres() {
                    super::$name(&backend)
                }
            })*
        }
    };
}

on_every_backend!(
    pull_from_the_service_stores_exactly_what_was_written,
    writes_are_idempotent_stale_edits_are_reported_and_the_server_stamps_time,
    deletes_and_erasure_reach_the_bots_store,
    bad_input_gets_a_4xx_naming_the_problem_and_nothing_is_stored,
    each_credential_does_only_its_job,
    health_readiness_metrics_and_kpis,
    two_hundred_writers_then_a_kill_lose_no_acknowledged_write,
    the_service_answers_as_its_openapi_document_says,
);

fn service_config(ws: &Workspace, backend: &Backend, extra: &str) -> PathBuf {
    ws.write_config(&format!(
        "feedback:\n  source: http\n  url: http://127.0.0.1:9/\n  token_env: SERVICE_READ\n  page_size: 1000\n\
         store:\n  dir: {store}\n\
         server:\n  listen: 127.0.0.1:0\n  database: {db}\n  read_token_env: SERVICE_READ\n  write_key_env: SERVICE_WRITE\n\
         \x20 widget_keys:\n    - key_env: SERVICE_WIDGET\n      origins: [{PAGE_ORIGIN}]\n{extra}",
        store = ws.store_dir().display(),
        db = backend.database(ws),
    ))
}

/// Spawns `rlhf-bot … serve` and returns it with its base URL, read from the first line of its
/// stdout; the rest of its output is drained so the service never blocks on a full pipe.
pub fn spawn_service(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let url = line
        .trim()
        .strip_prefix("feedback service listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

/// `rlhf-bot --config CONFIG serve` with the test credentials set.
fn serve_command(config: &Path) -> Command {
    let mut cmd = bin();
    cmd.env("SERVICE_READ", READ)
        .env("SERVICE_WRITE", WRITE)
        .env("SERVICE_WIDGET", WIDGET)
        .arg("--config")
        .arg(config)
        .arg("serve");
    cmd
}

fn start_with(config: &Path) -> Service {
    let (child, url) = spawn_service(serve_command(config));
    Service {
        child,
        url,
        config: config.to_path_buf(),
    }
}

fn start(ws: &Workspace, backend: &Backend) -> Service {
    start_with(&service_config(ws, backend, ""))
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn record(id: &str, kind: &str, updated_at: &str) -> Value {
    let mut r = json!({
        "id": id, "kind": kind, "conversation_id": "conv-1", "message_id": "msg-1",
        "model_version": "policy-v1", "user_id": "user-a",
        "prompt": [{"role": "user", "content": "How does a carbon tax work?"}],
        "response": {"content": "It prices emissions.", "steps": ["Name the externality.", "Price it."]},
        "created_at": "2026-12-01T10:00:00Z", "updated_at": updated_at,
    });
    match kind {
        "thumb" => r["thumb"] = json!("up"),
        "rating" => r["rating"] = json!(4),
        "aspect" => {
            r["aspect"] = json!("accuracy");
            r["rating"] = json!(5)
        }
        "step" => {
            r["step_index"] = json!(1);
            r["thumb"] = json!("down")
        }
        _ => {}
    }
    r
}

fn post(svc: &Service, auth: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}/v1/feedback", svc.url))
        .bearer_auth(auth)
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn post_raw(svc: &Service, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(format!("{}/v1/feedback", svc.url))
        .bearer_auth(WRITE)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Every record the service serves, following cursors.
fn read_all(svc: &Service) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut req = client()
            .get(format!("{}/v1/feedback", svc.url))
            .bearer_auth(READ)
            .query(&[("limit", "500")]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let page: Value = req
            .send()
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .unwrap();
        out.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// `rlhf-bot pull` from the service into the workspace's store.
fn pull(ws: &Workspace, svc: &Service) -> Value {
    let config = ws.write_config(
        &std::fs::read_to_string(&svc.config)
            .unwrap()
            .replace("http://127.0.0.1:9/", &format!("{}/", svc.url)),
    );
    let o = bin()
        .env("SERVICE_READ", READ)
        .arg("--config")
        .arg(&config)
        .args(["--format", "json", "pull"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn pull_from_the_service_stores_exactly_what_was_written(backend: &Backend) {
    let ws = Workspace::new();
    let svc = start(&ws, backend);
    let mut comment = record("fb-aspect", "aspect", "2026-12-01T10:00:03Z");
    comment["comment"] = json!("Clear, but cite a source.");
    let batch = json!({"data": [
        record("fb-thumb", "thumb", "2026-12-01T10:00:00Z"),
        record("fb-step", "step", "2026-12-01T10:00:01Z"),
        record("fb-rating", "rating", "2026-12-01T10:00:02Z"),
        comment,
    ]});
    let (status, body) = post(&svc, WRITE, &batch);
    assert_eq!(status, 200, "{body}");
    let outcomes: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["created"; 4]);

    let first = pull(&ws, &svc);
    assert_eq!(first["inserted"], 4, "{first}");
    // The user flips the thumb: the same id with a later updated_at is an edit.
    let mut flip = record("fb-thumb", "thumb", "2026-12-01T10:05:00Z");
    flip["thumb"] = json!("down");
    let (status, body) = post(&svc, WRITE, &flip);
    assert_eq!((status, body["outcome"].as_str()), (200, Some("updated")));
    let second = pull(&ws, &svc);
    assert_eq!(
        (second["updated"].as_u64(), second["inserted"].as_u64()),
        (Some(1), Some(0)),
        "{second}"
    );

    let dump = ws.dump();
    assert_eq!(dump.len(), 4, "{dump:?}");
    let stored: Vec<Value> = dump
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| stored.iter().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(by_id("fb-thumb")["thumb"], "down");
    assert_eq!(by_id("fb-step")["step_index"], 1);
    assert_eq!(by_id("fb-rating")["rating"], 4);
    assert_eq!(by_id("fb-aspect")["comment"], "Clear, but cite a source.");
}

fn writes_are_idempotent_stale_edits_are_reported_and_the_server_stamps_time(backend: &Backend) {
    let ws = Workspace::new();
    let svc = start(&ws, backend);
    let r = record("fb-1", "thumb", "2026-12-01T10:00:00Z");
    assert_eq!(post(&svc, WRITE, &r).1["outcome"], "created");
    assert_eq!(post(&svc, WRITE, &r).1["outcome"], "unchanged");
    let mut newer = record("fb-1", "thumb", "2026-12-01T11:00:00Z");
    newer["thumb"] = json!("down");
    assert_eq!(post(&svc, WRITE, &newer).1["outcome"], "updated");
    // An edit older than what is stored (a retry queued offline, say) is ignored, and said so.
    let stale = record("fb-1", "thumb", "2026-12-01T10:30:00Z");
    assert_eq!(post(&svc, WRITE, &stale).1["outcome"], "stale");
    let mut conflicting = newer.clone();
    conflicting["thumb"] = json!("up");
    let (status, body) = post(&svc, WRITE, &conflicting);
    assert_eq!((status, body["outcome"].as_str()), (409, Some("conflict")));
    // No updated_at: the server assigns one.
    let mut unstamped = record("fb-2", "rating", "x");
    unstamped.as_object_mut().unwrap().remove("updated_at");
    assert_eq!(post(&svc, WRITE, &unstamped).1["outcome"], "created");

    let all = read_all(&svc);
    assert_eq!(all.len(), 2);
    let one = all.iter().find(|r| r["id"] == "fb-1").unwrap();
    assert_eq!(one["thumb"], "down");
    let two = all.iter().find(|r| r["id"] == "fb-2").unwrap();
    assert!(
        two["updated_at"].as_str().unwrap().starts_with("20"),
        "{two}"
    );
    // The feed is in (updated_at, id) order of the server's times.
    let times: Vec<&str> = all
        .iter()
        .map(|r| r["updated_at"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);
}

fn deletes_and_erasure_reach_the_bots_store(backend: &Backend) {
    let ws = Workspace::new();
    let svc = start(&ws, backend);
    let mut other = record("fb-b1", "rating", "2026-12-01T10:00:01Z");
    other["user_id"] = json!("user-b");
    let private = |id: &str, kind: &str, at: &str| {
        let mut r = record(id, kind, at);
        r["comment"] = json!("private-note-of-a");
        r
    };
    let batch = json!({"data": [
        private("fb-a1", "thumb", "2026-12-01T10:00:00Z"),
        private("fb-a2", "rating", "2026-12-01T10:00:02Z"),
        other,
        private("fb-a3", "step", "2026-12-01T10:00:03Z"),
    ]});
    assert_eq!(post(&svc, WRITE, &batch).0, 200);
    assert_eq!(pull(&ws, &svc)["inserted"], 4);

    let c = client();
    let gone: Value = c
        .delete(format!("{}/v1/feedback/fb-a3", svc.url))
        .bearer_auth(WRITE)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(gone["outcome"], "deleted");
    let erased: Value = c
        .delete(format!("{}/v1/users/user-a/feedback", svc.url))
        .bearer_auth(WRITE)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(erased["erased"], 2, "fb-a3 was already deleted");
    let second = pull(&ws, &svc);
    assert_eq!(second["deleted"], 3, "{second}");

    let dump = ws.dump();
    assert_eq!(dump.len(), 1, "{dump:?}");
    assert!(dump[0].contains("fb-b1"));
    let served = read_all(&svc);
    assert!(
        !served.iter().any(|r| r.to_string().contains("user-a")),
        "{served:?}"
    );
    match backend {
        // Erased content leaves the files too, the write-ahead log included.
        Backend::Sqlite => {
            for file in ["feedback.sqlite3", "feedback.sqlite3-wal"] {
                let bytes = std::fs::read(ws.path().join("service").join(file)).unwrap_or_default();
                for needle in ["user-a", "private-note-of-a"] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                        "{file} still holds {needle:?}"
                    );
                }
            }
        }
        // Erased content leaves the table (the live rows) before the answer, and the service
        // vacuumed it: no dead row version is left behind.
        Backend::Postgres(url) => {
            let server = postgres_server().expect("the server that made this database");
            let left = server.query(
                url,
                "SELECT count(*) FROM feedback
                 WHERE user_id = 'user-a' OR body LIKE '%user-a%' OR body LIKE '%private-note-of-a%'",
            );
            assert_eq!(left, "0", "the table still holds user-a's content");
            let tombstones = server.query(url, "SELECT count(*) FROM feedback WHERE deleted");
            assert_eq!(tombstones, "3");
            // Every row version on the table's page, dead ones included (pageinspect).
            server.query(url, "CREATE EXTENSION IF NOT EXISTS pageinspect");
            let versions = server.query(
                url,
                "SELECT count(*) FROM heap_page_items(get_raw_page('feedback', 0))
                 WHERE position('private-note-of-a'::bytea IN t_data) > 0",
            );
            assert_eq!(versions, "0", "dead row versions still hold erased content");
        }
    }
}

fn bad_input_gets_a_4xx_naming_the_problem_and_nothing_is_stored(backend: &Backend) {
    let ws = Workspace::new();
    let svc = start_with(&service_config(&ws, backend, "  max_body_bytes: 65536\n"));
    let huge =
        json!({"data": [record("x", "thumb", "2026-12-01T10:00:00Z")], "pad": "y".repeat(70_000)});
    let (status, body) = post(&svc, WRITE, &huge);
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes")
    );

    // 10,000 levels deep, inside a record and as the whole body: refused, naming where.
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let deep = format!(
        r#"{{"data": [{{"id": "d", "comment": {}}}]}}"#,
        nest(10_000)
    );
    let (status, body) = post_raw(&svc, deep.into_bytes());
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "data[0].comment", "{body}");
    let (status, body) = post_raw(&svc, nest(10_000).into_bytes());
    assert_eq!(status, 400, "{body}");

    let mut bad_utf8 = serde_json::to_vec(&record("u", "thumb", "2026-12-01T10:00:00Z")).unwrap();
    let at = bad_utf8
        .windows(5)
        .position(|w| w == b"hello" || w == b"It pr")
        .unwrap();
    bad_utf8[at] = 0xff;
    assert_eq!(post_raw(&svc, bad_utf8).0, 400);

    let mut wrong_type = record("w", "rating", "2026-12-01T10:00:00Z");
    wrong_type["rating"] = json!("five");
    let ok = record("fine", "thumb", "2026-12-01T10:00:00Z");
    let (status, body) = post(&svc, WRITE, &json!({"data": [ok.clone(), wrong_type]}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "data[1].rating", "{body}");

    let mut unknown_kind = record("k", "thumb", "2026-12-01T10:00:00Z");
    unknown_kind["kind"] = json!("emoji");
    let (status, body) = post(&svc, WRITE, &unknown_kind);
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown `kind`"),
        "{body}"
    );

    let mut out_of_range = record("s", "step", "2026-12-01T10:00:00Z");
    out_of_range["step_index"] = json!(7);
    let (status, body) = post(&svc, WRITE, &out_of_range);
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside"),
        "{body}"
    );

    let mut long_comment = record("c", "thumb", "2026-12-01T10:00:00Z");
    long_comment["comment"] = json!("z".repeat(20_000));
    let (status, body) = post(&svc, WRITE, &long_comment);
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`comment`"),
        "{body}"
    );

    // PostgreSQL's text cannot hold a NUL: refused up front, for every backend alike.
    let nul_id = record("fb-nul\u{0}id", "thumb", "2026-12-01T10:00:00Z");
    let (status, body) = post(&svc, WRITE, &nul_id);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("NUL"),
        "{body}"
    );

    assert!(
        read_all(&svc).is_empty(),
        "a refused request stored something"
    );

    // Injection strings are data: stored verbatim, returned verbatim.
    let mut hostile = record(
        "fb-'; DROP TABLE feedback; --",
        "thumb",
        "2026-12-01T10:00:00Z",
    );
    hostile["comment"] = json!("<script>alert(1)</script> ' OR 1=1 --");
    assert_eq!(post(&svc, WRITE, &hostile).0, 200);
    let all = read_all(&svc);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["id"], "fb-'; DROP TABLE feedback; --");
    assert_eq!(all[0]["comment"], "<script>alert(1)</script> ' OR 1=1 --");
}

fn each_credential_does_only_its_job(backend: &Backend) {
    let ws = Workspace::new();
    let svc = start_with(&service_config(
        &ws,
        backend,
        "  widget_requests_per_minute: 60\n",
    ));
    let c = client();
    let feed = format!("{}/v1/feedback", svc.url);
    assert_eq!(c.get(&feed).send().unwrap().status(), 401);
    assert_eq!(
        c.get(&feed)
            .bearer_auth("not-a-token-at-all")
            .send()
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(&feed).bearer_auth(WRITE).send().unwrap().status(),
        403
    );
    let r = c
        .get(&feed)
        .header("x-rlhf-widget-key", WIDGET)
        .send()
        .unwrap();
    assert_eq!(r.status(), 403, "a widget key must not read");
    assert_eq!(
        post(&svc, READ, &record("r", "thumb", "2026-12-01T10:00:00Z")).0,
        403
    );

    let widget_post = |origin: &str, id: &str| {
        c.post(&feed)
            .header("x-rlhf-widget-key", WIDGET)
            .header("origin", origin)
            .json(&record(id, "thumb", "2026-12-01T10:00:00Z"))
            .send()
            .unwrap()
    };
    let r = widget_post("http://evil.example.test", "w0");
    assert_eq!(r.status(), 403);
    let r = widget_post(PAGE_ORIGIN, "w1");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], PAGE_ORIGIN);
    let preflight = c
        .request(reqwest::Method::OPTIONS, &feed)
        .header("origin", PAGE_ORIGIN)
        .send()
        .unwrap();
    assert_eq!(preflight.status(), 204);

    // A flood from one address with the public key is cut off with 429 and Retry-After.
    let mut limited = None;
    for i in 0..40 {
        let r = widget_post(PAGE_ORIGIN, &format!("flood-{i}"));
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let limited = limited.expect("40 requests at once passed a limit of 60 per minute");
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait >= 1);
    let widget_rows = read_all(&svc);
    assert!(widget_rows.iter().all(|r| r["source"] == "end_user"));
}

#[test]
fn serve_refuses_to_start_without_its_credentials() {
    let ws = Workspace::new();
    let config = service_config(&ws, &Backend::Sqlite, "");
    let o = bin()
        .env("SERVICE_READ", READ)
        .env("SERVICE_WIDGET", WIDGET)
        .env_remove("SERVICE_WRITE")
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("SERVICE_WRITE"), "{err}");
    assert!(err.contains("server.write_key_env"), "{err}");
    // A secret pasted into the config instead of a variable name is refused without echoing it.
    let pasted = ws.write_config(&std::fs::read_to_string(&config).unwrap().replace(
        "write_key_env: SERVICE_WRITE",
        "write_key_env: sk-live-abcdefghijklmnop0123456789",
    ));
    let o = run(&pasted, &["serve"]);
    assert!(!o.status.success());
    assert!(!stderr(&o).contains("abcdefghijklmnop"), "{}", stderr(&o));
}

/// The database URL's password never reaches the output, whatever fails.
#[test]
fn serve_never_shows_the_database_password() {
    let ws = Workspace::new();
    let port = crate::common::free_port();
    let config = service_config(&ws, &Backend::Sqlite, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let sqlite = Backend::Sqlite.database(&ws);
    for url in [
        format!("postgres://rlhf:pw-never-shown-42@127.0.0.1:{port}/feedback"),
        format!("postgresql://rlhf:pw-never-shown-42@127.0.0.1:{port}/feedback?sslmode=bogus"),
    ] {
        let config = ws.write_config(&text.replace(&sqlite, &url));
        let o = serve_command(&config).output().unwrap();
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(!err.contains("pw-never-shown"), "{err}");
        assert!(err.contains(&format!("rlhf:***@127.0.0.1:{port}")), "{err}");
    }
}

/// The password can come from a variable instead of the URL; a wrong one is refused at start
/// with the server's answer, and neither password is shown.
#[test]
fn postgres_password_from_the_environment() {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return;
    };
    let ws = Workspace::new();
    let bare = url.replace(&format!(":{}@", crate::postgres_server::PASSWORD), "@");
    assert_ne!(bare, url);
    let text = std::fs::read_to_string(service_config(&ws, &Backend::Sqlite, "")).unwrap();
    let config = ws.write_config(
        &text.replace(&Backend::Sqlite.database(&ws), &bare).replace(
            "  read_token_env:",
            "  database_password_env: SERVICE_DB_PASSWORD\n  read_token_env:",
        ),
    );
    let serve = |config: &Path, password: &str| {
        let mut cmd = serve_command(config);
        cmd.env("SERVICE_DB_PASSWORD", password);
        cmd
    };
    let o = serve(&config, "wrong-password-never-shown")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("wrong-password-never-shown"), "{err}");

    // `sslmode=require` goes through rustls; this test server has no TLS, so it must refuse
    // rather than fall back to plain text.
    let plain = std::fs::read_to_string(&config).unwrap();
    let tls_config = ws.path().join("tls.yaml");
    std::fs::write(
        &tls_config,
        plain.replace(&bare, &format!("{bare}?sslmode=require")),
    )
    .unwrap();
    let o = serve(&tls_config, crate::postgres_server::PASSWORD)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));

    let (child, url) = spawn_service(serve(&config, crate::postgres_server::PASSWORD));
    let svc = Service { child, url, config };
    let ready = client().get(format!("{}/readyz", svc.url)).send().unwrap();
    assert_eq!(ready.status(), 200);
    let r = record("fb-1", "thumb", "2026-12-01T10:00:00Z");
    assert_eq!(post(&svc, WRITE, &r).1["outcome"], "created");
}

/// When its PostgreSQL database goes away, `/readyz` and writes answer 503 (nothing stored,
/// retry), and the service keeps running.
#[test]
fn readiness_follows_the_postgres_database() {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return;
    };
    let ws = Workspace::new();
    let svc = start(&ws, &Backend::Postgres(url.clone()));
    let ready = || {
        client()
            .get(format!("{}/readyz", svc.url))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready(), 200);
    let (database, maintenance) = url
        .rsplit_once('/')
        .map(|(base, name)| (name.to_string(), format!("{base}/postgres")))
        .unwrap();
    postgres_server().unwrap().query(
        &maintenance,
        &format!("DROP DATABASE {database} WITH (FORCE)"),
    );
    assert_eq!(ready(), 503);
    let (status, body) = post(
        &svc,
        WRITE,
        &record("fb-1", "thumb", "2026-12-01T10:00:00Z"),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        client()
            .get(format!("{}/healthz", svc.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}

fn health_readiness_metrics_and_kpis(backend: &Backend) {
    let ws = Workspace::new();
    let svc = start(&ws, backend);
    let c = client();
    assert_eq!(
        c.get(format!("{}/healthz", svc.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{}/readyz", svc.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    let mut down = record("fb-2", "thumb", "2026-12-01T10:00:01Z");
    down["thumb"] = json!("down");
    let batch = json!({"data": [
        record("fb-1", "thumb", "2026-12-01T10:00:00Z"),
        down,
        record("fb-3", "rating", "2026-12-01T10:00:02Z"),
    ]});
    assert_eq!(post(&svc, WRITE, &batch).0, 200);
    let kpis: Value = c
        .get(format!("{}/v1/kpis", svc.url))
        .bearer_auth(READ)
        .query(&[
            ("from", "2026-11-30T00:00:00Z"),
            ("to", "2026-12-03T00:00:00Z"),
            ("bucket", "day"),
        ])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let day = &kpis["data"][0];
    assert_eq!(day["bucket"], "2026-12-01", "{kpis}");
    assert_eq!(
        (day["thumbs"].as_u64(), day["ratings"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(day["positive_rate"]["estimate"], 0.5);
    let (low, high) = (
        day["positive_rate"]["low"].as_f64().unwrap(),
        day["positive_rate"]["high"].as_f64().unwrap(),
    );
    assert!(
        low < 0.5 && high > 0.5 && low >= 0.0 && high <= 1.0,
        "{day}"
    );
    assert_eq!(day["mean_rating"]["estimate"], 4.0);

    let metrics = c
        .get(format!("{}/metrics", svc.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains(r#"rlhf_http_requests_total{route="/v1/feedback",status="200"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("rlhf_http_request_duration_seconds_bucket"));
    assert!(metrics.contains("rlhf_db_errors_total 0"));
}

/// 200 concurrent writers hammer the service for 30 s; then it is killed with SIGKILL while
/// they are still writing, and restarted on the same database: every write that was
/// acknowledged is there, once.
fn two_hundred_writers_then_a_kill_lose_no_acknowledged_write(backend: &Backend) {
    const WRITERS: usize = 200;
    const LOAD: Duration = Duration::from_secs(30);
    let ws = Workspace::new();
    let config = service_config(&ws, backend, "");
    let svc = start_with(&config);
    let url = svc.url.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = client();
                let mut acked = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("w{w}-{i}");
                    i += 1;
                    let sent = c
                        .post(format!("{url}/v1/feedback"))
                        .bearer_auth(WRITE)
                        .json(&record(&id, "thumb", "2026-12-01T10:00:00Z"))
                        .send();
                    match sent {
                        Ok(r) if r.status() == 200 => acked.push(id),
                        _ => {}
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(LOAD);
    let mut svc = svc;
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    drop(svc);
    assert!(
        acked.len() > WRITERS,
        "only {} writes were acknowledged",
        acked.len()
    );

    let again = start_with(&config);
    let all = read_all(&again);
    let ids: std::collections::HashSet<&str> =
        all.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "a record is served twice");
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Every endpoint, answered by the real service through a Prism proxy that checks requests and
/// responses against docs/feedback-api.yaml: no exchange may carry an `sl-violations` header.
fn the_service_answers_as_its_openapi_document_says(backend: &Backend) {
    let deps = crate::common::deps_dir();
    if !crate::common::have(&deps.join("node_modules/.bin/prism"), "prism") {
        return;
    }
    let ws = Workspace::new();
    let svc = start(&ws, backend);
    let spec = crate::common::repo().join("docs/feedback-api.yaml");
    let prism = crate::prism::Prism::proxy(&deps, &spec, &svc.url);
    let base = prism.url();
    let c = client();
    let mut checked = Vec::new();
    // A request that breaks the contract on purpose (no credential) is flagged on the request
    // side; the response must still be as documented.
    let mut check = |what: &str, r: reqwest::blocking::Response, status: u16| {
        let violations: Vec<Value> = r
            .headers()
            .get("sl-violations")
            .map(|v| serde_json::from_str(v.to_str().unwrap_or("[]")).unwrap_or_default())
            .unwrap_or_default();
        let got = r.status().as_u16();
        let body = r.text().unwrap_or_default();
        assert_eq!(got, status, "{what}: {body}");
        let on_purpose = |v: &&Value| status == 401 && v["location"][0] == "request";
        let broken: Vec<&Value> = violations.iter().filter(|v| !on_purpose(v)).collect();
        assert!(broken.is_empty(), "{what}: {broken:?}\n{body}");
        checked.push(what.to_string());
    };
    let feed = format!("{base}/v1/feedback");
    let one = record("fb-1", "thumb", "2026-12-01T10:00:00Z");
    let r = c.post(&feed).bearer_auth(WRITE).json(&one).send().unwrap();
    check("POST one", r, 200);
    let batch = json!({"data": [record("fb-2", "step", "2026-12-01T10:00:01Z"), record("fb-3", "aspect", "2026-12-01T10:00:02Z")]});
    let r = c
        .post(&feed)
        .bearer_auth(WRITE)
        .json(&batch)
        .send()
        .unwrap();
    check("POST batch", r, 200);
    let mut bad = record("fb-4", "rating", "2026-12-01T10:00:00Z");
    bad["rating"] = json!(9);
    let r = c.post(&feed).bearer_auth(WRITE).json(&bad).send().unwrap();
    check("POST invalid", r, 400);
    let r = c
        .get(&feed)
        .bearer_auth(READ)
        .query(&[("limit", "2")])
        .send()
        .unwrap();
    let page: Value = {
        let text = r.text().unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let r = c
        .get(&feed)
        .bearer_auth(READ)
        .query(&[("limit", "2"), ("cursor", cursor.as_str())])
        .send()
        .unwrap();
    check("GET page 2", r, 200);
    let r = c
        .get(&feed)
        .bearer_auth(READ)
        .query(&[("updated_since", "2026-01-01T00:00:00Z")])
        .send()
        .unwrap();
    check("GET since", r, 200);
    let r = c.get(&feed).send().unwrap();
    check("GET without a token", r, 401);
    let r = c
        .delete(format!("{base}/v1/feedback/fb-1"))
        .bearer_auth(WRITE)
        .send()
        .unwrap();
    check("DELETE one", r, 200);
    let r = c
        .delete(format!("{base}/v1/users/user-a/feedback"))
        .bearer_auth(WRITE)
        .send()
        .unwrap();
    check("DELETE user", r, 200);
    let r = c
        .delete(format!("{base}/v1/users/user-a/feedback"))
        .bearer_auth(READ)
        .send()
        .unwrap();
    check("DELETE user with the read token", r, 403);
    let r = c
        .get(format!("{base}/v1/kpis"))
        .bearer_auth(READ)
        .query(&[("bucket", "day")])
        .send()
        .unwrap();
    check("GET kpis", r, 200);
    for probe in ["healthz", "readyz", "metrics"] {
        let r = c.get(format!("{base}/{probe}")).send().unwrap();
        check(probe, r, 200);
    }
    assert_eq!(checked.len(), 13);
}
