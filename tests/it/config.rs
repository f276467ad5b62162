//! `config check`: valid configs print their effective settings; a typo'd key or a wrong type
//! prints `file:line:col: key.path: message` and exits non-zero (issue #2, point 6).

use crate::common::{Workspace, repo, run, stderr, stdout};

#[test]
fn shipped_configs_are_valid() {
    for name in [
        "configs/example.yaml",
        "configs/tiny.yaml",
        "configs/smollm2-demo.yaml",
        "configs/rlhf.yaml",
    ] {
        let out = run(&repo().join(name), &["config", "check"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(stdout(&out).contains("valid"), "{}", stdout(&out));
    }
}

#[test]
fn typo_in_a_key_is_located() {
    let ws = Workspace::new();
    let cfg = ws.write_config(
        "feedback:\n  source: file\n  path: x.jsonl\nthresholds:\n  min_new_feedbak: 3\n",
    );
    let out = run(&cfg, &["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("rlhf.yaml:5:3: thresholds.min_new_feedbak: unknown field `min_new_feedbak`"),
        "{err}"
    );
    assert!(
        err.contains("min_new_feedback"),
        "the message lists the valid keys: {err}"
    );
}

#[test]
fn wrong_value_names_file_line_column_and_key_path() {
    let ws = Workspace::new();
    let cfg = ws.write_config(
        "feedback:\n  source: file\n  path: x.jsonl\nthresholds:\n  max_age_days: 3\n  min_new_feedback: -3\n",
    );
    let out = run(&cfg, &["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(
            "rlhf.yaml:6:21: thresholds.min_new_feedback: expected a positive integer, got -3"
        ),
        "{err}"
    );
}

#[test]
fn wrong_type_is_reported_with_its_value() {
    let ws = Workspace::new();
    let cfg = ws.write_config("feedback:\n  source: file\n  path: x.jsonl\n  page_size: lots\n");
    let out = run(&cfg, &["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "rlhf.yaml:4:14: feedback.page_size: expected a positive integer, got \"lots\""
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn cross_field_errors_point_at_the_key() {
    let ws = Workspace::new();
    let cfg = ws.write_config("store:\n  dir: x\nfeedback:\n  source: http\n  token_env: X\n");
    let out = run(&cfg, &["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("rlhf.yaml:4:3: feedback.source: the http source needs `feedback.url`"),
        "{}",
        stderr(&out)
    );
}

/// `config check --format json` with the feedback token's variable set to `s3cr3t-value`.
fn check_json(cfg: &std::path::Path) -> std::process::Output {
    crate::common::bin()
        .env("TEST_FEEDBACK_TOKEN", "s3cr3t-value")
        .arg("--config")
        .arg(cfg)
        .args(["--format", "json", "config", "check"])
        .output()
        .unwrap()
}

#[test]
fn secrets_are_named_never_printed() {
    let ws = Workspace::new();
    let cfg = ws.http_config("http://127.0.0.1:9", "");
    let out = check_json(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("TEST_FEEDBACK_TOKEN") && !text.contains("s3cr3t-value"),
        "{text}"
    );
}

#[test]
fn a_missing_config_file_says_what_to_do() {
    let out = run(
        std::path::Path::new("/nonexistent/rlhf.yaml"),
        &["config", "check"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("hint: pass --config"),
        "{}",
        stderr(&out)
    );
}

/// Issue 18: the binary itself tunes the allocator the benchmarks measured with (it used to be
/// called only by the benches).
#[test]
fn the_binary_tunes_the_allocator_at_start_up() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();
    let out = run(&cfg, &["-vv", "config", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    let line = log
        .lines()
        .find(|l| l.contains("glibc malloc tuned"))
        .unwrap_or_else(|| panic!("no allocator line in:\n{log}"));
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        assert!(line.contains("tuned=true"), "{line}");
    }
}

/// `server.database` may be a PostgreSQL URL with a password: the effective settings show it
/// redacted, and a password variable beside a SQLite path is refused, naming the key.
#[test]
fn database_urls_are_printed_without_their_password() {
    let ws = Workspace::new();
    let base = ws.http_config("http://127.0.0.1:9", "");
    let text = std::fs::read_to_string(&base).unwrap();
    let cfg = ws.write_config(&format!(
        "{text}server:\n  database: postgresql://rlhf:pw-in-the-url-77@db.internal:5432/feedback?sslmode=require\n"
    ));
    let out = check_json(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(!printed.contains("pw-in-the-url-77"), "{printed}");
    assert!(
        printed.contains("postgresql://rlhf:***@db.internal:5432/feedback?sslmode=require"),
        "{printed}"
    );

    let cfg = ws.write_config(&format!(
        "{text}server:\n  database: x.sqlite3\n  database_password_env: DB_PASSWORD\n"
    ));
    let out = run(&cfg, &["config", "check"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server.database_password_env"),
        "{}",
        stderr(&out)
    );
}
