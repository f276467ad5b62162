//! `pull` against a real HTTP server on loopback, with fault injection: after each scenario the
//! store holds exactly the expected records (issue #2, point 2).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rlhf_bot::feedback::Store;
use rlhf_bot::feedback::http_source::HttpSourceOptions;
use rlhf_bot::feedback::pull::{PullSummary, SourceSpec, pull};
use rlhf_bot::secret::SecretString;
use serde_json::{Value, json};

use crate::common::{Workspace, run, stderr, stdout};
use crate::feedback_server::{self as server, Fault, FeedbackServer, Records, TOKEN};

pub fn options(url: &str) -> HttpSourceOptions {
    HttpSourceOptions {
        base_url: url.parse().unwrap(),
        token: Some(SecretString::new(TOKEN)),
        page_size: 100,
        timeout: Duration::from_millis(800),
        max_attempts: 4,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        max_retry_after: Duration::from_secs(5),
        max_page_bytes: rlhf_bot::config::settings::DEFAULT_MAX_PAGE_BYTES,
    }
}

pub async fn pull_into(ws: &Workspace, srv: &FeedbackServer) -> anyhow::Result<PullSummary> {
    pull(
        Store::open(&ws.store_dir())?,
        &SourceSpec::Http(options(&srv.url())),
    )
    .await
}

/// What the store must hold: for each id its newest version, minus ids whose newest is a tombstone.
fn expected(records: &[Value]) -> BTreeMap<String, Value> {
    let mut newest: BTreeMap<String, Value> = BTreeMap::new();
    for r in records {
        let id = r["id"].as_str().unwrap().to_string();
        let newer = newest
            .get(&id)
            .is_none_or(|old| old["updated_at"].as_str() < r["updated_at"].as_str());
        if newer && (r.get("kind").is_some() || r.get("deleted").is_some()) {
            newest.insert(id, r.clone());
        }
    }
    newest.retain(|_, r| r.get("deleted").is_none());
    newest
}

pub fn assert_store_matches(ws: &Workspace, records: &[Value]) {
    let want = expected(records);
    let got: BTreeMap<String, Value> = ws
        .dump()
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "ids differ"
    );
    for (id, w) in &want {
        let g = &got[id];
        for field in ["kind", "thumb", "rating", "updated_at", "model_version"] {
            assert_eq!(g.get(field), w.get(field), "{id}.{field}");
        }
    }
}

#[tokio::test]
async fn pulls_every_page_into_the_store() {
    let records = server::many_thumbs(250);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    let ws = Workspace::new();
    let s = pull_into(&ws, &srv).await.unwrap();
    assert_eq!(
        (s.fetched, s.inserted, s.pages, s.retries, s.quarantined),
        (250, 250, 3, 0, 0)
    );
    assert_eq!(
        s.watermark.as_deref(),
        records.last().unwrap()["updated_at"].as_str()
    );
    assert_store_matches(&ws, &records);
}

#[tokio::test]
async fn a_second_pull_changes_nothing() {
    let records = server::many_thumbs(120);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    let ws = Workspace::new();
    pull_into(&ws, &srv).await.unwrap();
    let before = ws.dump();
    let s = pull_into(&ws, &srv).await.unwrap();
    // Only the records at the (inclusive) watermark are fetched again, and they change nothing.
    assert_eq!(
        (s.fetched, s.inserted, s.updated, s.deleted, s.unchanged),
        (1, 0, 0, 0, 1)
    );
    assert_eq!(ws.dump(), before);
}

#[tokio::test]
async fn server_errors_are_retried() {
    let records = server::many_thumbs(150);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    srv.push_fault(Fault::Status(500));
    srv.push_fault(Fault::Status(503));
    let ws = Workspace::new();
    let s = pull_into(&ws, &srv).await.unwrap();
    assert_eq!(s.retries, 2);
    assert_store_matches(&ws, &records);
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let records = server::many_thumbs(50);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    srv.push_fault(Fault::TooManyRequests {
        retry_after_secs: 1,
    });
    let ws = Workspace::new();
    let started = Instant::now();
    let s = pull_into(&ws, &srv).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(s.retries, 1);
    assert_store_matches(&ws, &records);
}

#[tokio::test]
async fn a_response_slower_than_the_timeout_is_retried() {
    let records = server::many_thumbs(50);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    srv.push_fault(Fault::Slow(Duration::from_secs(3)));
    let ws = Workspace::new();
    let s = pull_into(&ws, &srv).await.unwrap();
    assert_eq!(s.retries, 1);
    assert_store_matches(&ws, &records);
}

#[tokio::test]
async fn a_truncated_body_is_retried() {
    let records = server::many_thumbs(150);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    srv.push_fault(Fault::Truncated);
    let ws = Workspace::new();
    let s = pull_into(&ws, &srv).await.unwrap();
    assert_eq!((s.retries, s.quarantined), (1, 0));
    assert_store_matches(&ws, &records);
}

#[tokio::test]
async fn malformed_records_are_quarantined_and_the_rest_stored() {
    let mut records = server::many_thumbs(30);
    let bad = vec![
        server::record(
            "fb_bad_rating",
            "2026-11-01T00:00:00Z",
            json!({"kind": "rating", "rating": 7}),
        ),
        server::record(
            "fb_bad_kind",
            "2026-11-01T00:00:00Z",
            json!({"kind": "emoji"}),
        ),
        server::record(
            "fb_bad_step",
            "2026-11-01T00:00:00Z",
            json!({"kind": "step", "step_index": 5, "thumb": "up"}),
        ),
        json!({"id": "fb_no_time", "kind": "thumb", "thumb": "up"}),
        json!({"id": 17, "updated_at": "2026-11-01T00:00:00Z"}),
    ];
    records.extend(bad);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    let ws = Workspace::new();
    let s = pull_into(&ws, &srv).await.unwrap();
    assert_eq!((s.fetched, s.inserted, s.quarantined), (35, 30, 5));
    let q = ws.store().quarantined().unwrap();
    let reasons: Vec<&str> = q.iter().map(|q| q.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("`rating` must be an integer from 1 to 5, got 7")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("outside the response's 2 steps")),
        "{reasons:?}"
    );
    assert!(
        q.iter().any(|q| q.raw.contains("fb_bad_kind")),
        "the raw record is kept"
    );
    // The valid records are all there, the bad ones are not.
    assert_store_matches(&ws, &server::many_thumbs(30));
    // Pulling again does not quarantine the same inputs twice.
    pull_into(&ws, &srv).await.unwrap();
    assert_eq!(ws.store().stats().unwrap().quarantined, 5);
}

#[tokio::test]
async fn edits_and_tombstones_are_honoured() {
    let mut records = vec![
        server::thumb("fb_a", "2026-11-01T10:00:00Z", true),
        server::thumb("fb_b", "2026-11-01T10:00:01Z", true),
        server::thumb("fb_c", "2026-11-01T10:00:02Z", false),
    ];
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    let ws = Workspace::new();
    pull_into(&ws, &srv).await.unwrap();
    // The user flips fb_a, withdraws fb_b; a stale copy of fb_c (older) is re-delivered.
    let flip = server::thumb("fb_a", "2026-11-02T09:00:00Z", false);
    let tomb = json!({"id": "fb_b", "updated_at": "2026-11-02T09:00:01Z", "deleted": true});
    let stale = server::thumb("fb_c", "2026-11-02T09:00:02Z", true);
    let mut stale_older = stale.clone();
    stale_older["updated_at"] = json!("2026-10-01T00:00:00Z");
    records.extend([flip, tomb]);
    srv.set_records(records.clone());
    let s = pull_into(&ws, &srv).await.unwrap();
    assert_eq!((s.updated, s.deleted), (1, 1));
    assert_store_matches(&ws, &records);
    let dump = ws.dump();
    assert!(dump[0].contains("\"thumb\":\"down\""), "{}", dump[0]);

    // A copy of fb_b older than its tombstone (e.g. from a full re-pull) must not resurrect it.
    let mut old_b = server::thumb("fb_b", "2026-11-01T10:00:01Z", true);
    old_b["comment"] = json!("old");
    let item = rlhf_bot::feedback::http_source::incoming_from_json(&old_b.to_string());
    let counts = ws
        .store()
        .apply_page(vec![item], &Default::default())
        .unwrap();
    assert_eq!(
        (counts.inserted, counts.updated, counts.unchanged),
        (0, 0, 1)
    );
    assert!(!ws.dump().iter().any(|l| l.contains("\"fb_b\"")));
}

/// The store skips tombstone look-ups while it has none; a delete earlier in the same page must
/// still keep an older copy later in that page from coming back.
#[test]
fn a_delete_holds_against_an_older_copy_in_the_same_page() {
    let ws = Workspace::new();
    let parse =
        |v: serde_json::Value| rlhf_bot::feedback::http_source::incoming_from_json(&v.to_string());
    let tomb = json!({"id": "fb_x", "updated_at": "2026-11-02T09:00:00Z", "deleted": true});
    let older = server::thumb("fb_x", "2026-11-01T09:00:00Z", true);
    let fresh = server::thumb("fb_y", "2026-11-01T09:00:00Z", true);
    let counts = ws
        .store()
        .apply_page(
            vec![parse(tomb), parse(older), parse(fresh)],
            &Default::default(),
        )
        .unwrap();
    assert_eq!((counts.inserted, counts.unchanged), (1, 2), "{counts:?}");
    let dump = ws.dump();
    assert!(!dump.iter().any(|l| l.contains("\"fb_x\"")), "{dump:?}");
    assert!(dump.iter().any(|l| l.contains("\"fb_y\"")), "{dump:?}");
}

#[tokio::test]
async fn refused_requests_fail_at_once_with_status_and_body() {
    let srv = server::start(Records::List(server::many_thumbs(10)), Duration::ZERO);
    let ws = Workspace::new();
    let mut opts = options(&srv.url());
    opts.token = Some(SecretString::new("wrong-token"));
    let err = pull(ws.store(), &SourceSpec::Http(opts)).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("HTTP 401") && text.contains("missing or wrong bearer token"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-token"),
        "the token leaked into the error: {text}"
    );
    assert_eq!(srv.requests(), 1, "a 401 must not be retried");
}

#[tokio::test]
async fn persistent_failure_keeps_what_was_pulled_and_resumes() {
    let records = server::many_thumbs(250);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    let ws = Workspace::new();
    // Page 1 succeeds, then page 2 fails on every attempt.
    for fault in [
        Fault::Pass,
        Fault::Status(502),
        Fault::Status(502),
        Fault::Status(502),
        Fault::Status(502),
    ] {
        srv.push_fault(fault);
    }
    let err = pull_into(&ws, &srv).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("failed 4 times in a row"),
        "{err:#}"
    );
    assert_eq!(ws.dump().len(), 100, "the first page must be kept");
    assert!(ws.store().stats().unwrap().pull_in_progress);
    let s = pull_into(&ws, &srv).await.unwrap();
    assert!(s.resumed);
    assert_eq!(s.fetched, 150);
    assert_store_matches(&ws, &records);
}

#[test]
fn the_cli_pulls_and_reports_a_summary() {
    let records = server::many_thumbs(120);
    let srv = server::start(Records::List(records.clone()), Duration::ZERO);
    let ws = Workspace::new();
    let cfg = ws.http_config(&srv.url(), "");
    let out = run(&cfg, &["--format", "json", "pull"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: Value = serde_json::from_str(&stdout(&out)).unwrap();
    for key in [
        "fetched",
        "inserted",
        "updated",
        "deleted",
        "quarantined",
        "watermark",
        "pages",
        "retries",
        "seconds",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}: {summary}");
    }
    assert_eq!(summary["inserted"], 120);
    assert_store_matches(&ws, &records);
    let dump = run(&cfg, &["store", "dump"]);
    let text = stdout(&dump);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 120);
    assert!(
        lines.windows(2).all(|w| w[0] < w[1]),
        "dump is sorted by id"
    );
    assert!(
        lines[0].contains("\"updated_at\":\"2026-10-26T") && lines[0].contains("Z\""),
        "{}",
        lines[0]
    );
}

#[test]
fn a_missing_token_fails_before_any_request() {
    let srv = server::start(Records::List(server::many_thumbs(5)), Duration::ZERO);
    let ws = Workspace::new();
    let cfg = ws.http_config(&srv.url(), "");
    let out = crate::common::bin()
        .env_remove("TEST_FEEDBACK_TOKEN")
        .arg("--config")
        .arg(&cfg)
        .arg("pull")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("TEST_FEEDBACK_TOKEN is not set"),
        "{}",
        stderr(&out)
    );
    assert_eq!(srv.requests(), 0);
}
