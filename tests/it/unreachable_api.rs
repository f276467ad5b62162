//! Issue 15 §4: a team whose feedback API does not resolve gets one clear error, fast, and in
//! GitHub Actions one `::error::` annotation, instead of minutes of retries on a DNS failure.

use crate::common::{Workspace, bin, stderr, stdout};

#[test]
fn an_unresolvable_feedback_api_fails_at_once_with_one_error_annotation() {
    let ws = Workspace::new();
    // `.invalid` never resolves (RFC 6761).
    let cfg = ws.http_config("http://feedback.rlhf-bot-test.invalid/", "");
    let summary = ws.path().join("summary.md");
    let o = bin()
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("RLHF_BOT_BACKOFF_MS", "60000")
        .arg("--config")
        .arg(&cfg)
        .arg("pull")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("feedback.rlhf-bot-test.invalid") && err.contains("does not resolve"),
        "{err}"
    );
    assert!(
        !err.contains("retry"),
        "a DNS failure must not be retried:\n{err}"
    );
    // Workflow commands go to stderr, so `--format json` output on stdout stays JSON.
    assert!(!stdout(&o).contains("::error"), "{}", stdout(&o));
    let out = stderr(&o);
    let annotations: Vec<&str> = out.lines().filter(|l| l.starts_with("::error")).collect();
    assert_eq!(annotations.len(), 1, "{out}");
    assert!(annotations[0].contains("does not resolve"), "{out}");
    // The annotation is one line: the hint is encoded, not a second workflow command.
    assert!(annotations[0].contains("%0Ahint:"), "{}", annotations[0]);
}
