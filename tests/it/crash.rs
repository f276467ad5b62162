//! A pull killed with SIGKILL partway, then resumed, gives exactly the store an uninterrupted pull
//! gives: nothing lost, nothing duplicated (issue #2, point 3).

use std::time::Duration;

use crate::common::{Workspace, bin};
use crate::feedback_server::{self as server, Records};

fn pull_to_end(cfg: &std::path::Path) {
    let out = bin().arg("--config").arg(cfg).arg("pull").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_nine_then_resume_equals_an_uninterrupted_pull() {
    let mut records = server::many_thumbs(3000);
    // Edits and tombstones in the stream too, so replaying a page matters.
    for i in (0..3000).step_by(97) {
        let mut edit = records[i].clone();
        edit["thumb"] = serde_json::json!("down");
        edit["updated_at"] =
            serde_json::json!(format!("2026-12-01T00:{:02}:{:02}Z", i / 60 % 60, i % 60));
        records.push(edit);
    }
    for i in (5..3000).step_by(211) {
        records.push(serde_json::json!({"id": format!("fb_{i:06}"), "updated_at": "2026-12-02T00:00:00Z", "deleted": true}));
    }
    let srv = server::start(Records::List(records), Duration::from_millis(15));

    let reference = Workspace::new();
    pull_to_end(&reference.http_config(&srv.url(), ""));
    let want = reference.dump();
    assert!(want.len() > 2900);

    for (round, kill_after_ms) in [150u64, 400, 700].into_iter().enumerate() {
        let ws = Workspace::new();
        let cfg = ws.http_config(&srv.url(), "");
        let mut child = bin().arg("--config").arg(&cfg).arg("pull").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        child.kill().unwrap(); // SIGKILL on Unix: no chance to clean up
        let status = child.wait().unwrap();
        let partial = ws.dump().len();
        eprintln!(
            "round {round}: killed after {kill_after_ms} ms ({status}); {partial} records were durable"
        );
        pull_to_end(&cfg);
        assert_eq!(ws.dump(), want, "round {round}: the resumed store differs");
        assert!(!ws.store().stats().unwrap().pull_in_progress);
    }
}
