//! Data hygiene: what a run commits (the report directory) holds no user text, no secret-looking
//! string and no absolute local path; deleted feedback leaves the store's files, not just its
//! tables ("The promise, end to end", points 3 and 4).

use std::path::{Path, PathBuf};

use crate::common::{Workspace, bin, repo, stderr, stdout};

/// Each piece of hostile text a user could put in a prompt or comment, with a unique tail so
/// its absence is meaningful even where the report itself uses the same syntax (code fences).
const HOSTILE: &[&str] = &[
    "@org/team-hyg1",
    "<img src=x onerror=alert('hyg2')>",
    "```\n# INJECTED-HYG3",
    "ghp_hyg4AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "sk-hyg5proj0123456789abcdefABCDEF",
];
const USER_ID: &str = "u_hyg6_alice@example.com";
const COMMENT: &str = "call me at hyg7-555-0100";

/// The bundled sample with every user turn, comment and user id made hostile.
fn hostile_feedback(path: &Path) {
    let text = std::fs::read_to_string(repo().join("configs/sample-feedback.jsonl")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // The sample's deliberately malformed lines stay as they are.
            Err(_) => {
                out.push_str(line);
                out.push('\n');
                continue;
            }
        };
        if let Some(turns) = v.get_mut("prompt").and_then(|p| p.as_array_mut()) {
            for turn in turns {
                if turn["role"] == "user" {
                    let content = turn["content"].as_str().unwrap_or("").to_string();
                    turn["content"] = format!("{content} {}", HOSTILE.join(" ")).into();
                }
            }
            v["user_id"] = USER_ID.into();
            v["comment"] = format!("{COMMENT} {}", HOSTILE[0]).into();
        }
        out.push_str(&serde_json::to_string(&v).unwrap());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn committed_report_files_hold_no_user_text_secrets_or_local_paths() {
    let ws = Workspace::new();
    let feedback = ws.path().join("hostile.jsonl");
    hostile_feedback(&feedback);
    let text = ws.sample_config_text().replace(
        &repo()
            .join("configs/sample-feedback.jsonl")
            .display()
            .to_string(),
        &feedback.display().to_string(),
    );
    assert!(
        !text.contains("samples_in_files"),
        "the test config must keep the default"
    );
    let cfg = ws.write_config(&text);
    let json = crate::common::forced_run_json(&cfg, "2026-11-27T12:00:00Z");
    let run = &json["run"];
    let report = PathBuf::from(run["report"].as_str().unwrap());
    let report_dir = report.parent().unwrap();
    let pr_dir = PathBuf::from(run["publish"]["local_dir"].as_str().unwrap());
    // What the PR would commit: the report directory (and the registry update) under files/.
    let mut committed = files_under(report_dir);
    committed.extend(
        files_under(&pr_dir.join("files"))
            .into_iter()
            .filter(|p| p.components().any(|c| c.as_os_str() == "reports")),
    );
    assert!(
        committed.len() >= 8,
        "report.md, metrics.json and plots, twice: {committed:?}"
    );
    let tmp = ws.path().display().to_string();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for file in &committed {
        let body = std::fs::read_to_string(file).unwrap();
        for leak in HOSTILE
            .iter()
            .map(|h| h.lines().last().unwrap())
            .chain([USER_ID, COMMENT, "hyg1", "hyg2", "hyg4", "hyg5", "hyg7"])
            .chain([tmp.as_str(), home.as_str(), "file://"])
        {
            assert!(!body.contains(leak), "{} holds {leak:?}", file.display());
        }
    }
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.contains("`<artifacts>/reward/reward-"), "{md}");
    assert!(md.contains("Kept out of the committed files"), "{md}");
    // The samples did carry the hostile prompts: they are in the PR body, which a reviewer can
    // edit (fenced there, so inert: report::snapshot_hostile_text_is_neutralised).
    let body = std::fs::read_to_string(pr_dir.join("body.md")).unwrap();
    assert!(body.contains("INJECTED-HYG3"), "{body}");
}

/// The raw bytes of the store's files (database, and the write-ahead log when there is one).
fn store_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(dir.join("feedback.sqlite3")).unwrap();
    if let Ok(wal) = std::fs::read(dir.join("feedback.sqlite3-wal")) {
        bytes.extend(wal);
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn a_deleted_record_leaves_the_store_files() {
    let ws = Workspace::new();
    let feedback = ws.path().join("feedback.jsonl");
    let marker = "PURGE-ME-7f3a9c1e";
    let keep = "KEEP-ME-2b8d";
    let record = |id: &str, text: &str| {
        serde_json::json!({
            "id": id, "kind": "thumb", "thumb": "up", "conversation_id": "c1",
            "message_id": format!("m_{id}"), "model_version": "policy-v1",
            "prompt": [{"role": "user", "content": format!("question {text}")}],
            "response": {"content": format!("answer {text} {}", "padding ".repeat(40))},
            "user_id": format!("user-{text}"), "comment": format!("comment {text}"),
            "created_at": "2026-11-01T10:00:00Z", "updated_at": "2026-11-01T10:00:00Z"
        })
        .to_string()
    };
    std::fs::write(
        &feedback,
        format!("{}\n{}\n", record("fb_1", marker), record("fb_2", keep)),
    )
    .unwrap();
    let cfg = ws.write_config(&format!(
        "feedback:\n  source: file\n  path: {}\nstore:\n  dir: {}\n",
        feedback.display(),
        ws.store_dir().display()
    ));
    let pull = || {
        let o = bin()
            .arg("--config")
            .arg(&cfg)
            .args(["--format", "json", "pull"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    assert_eq!(pull()["inserted"], 2);
    let before = store_bytes(&ws.store_dir());
    assert!(
        contains(&before, marker),
        "the marker must be in the file first"
    );

    let mut text = std::fs::read_to_string(&feedback).unwrap();
    text.push_str(r#"{"id": "fb_1", "updated_at": "2026-11-02T10:00:00Z", "deleted": true}"#);
    text.push('\n');
    std::fs::write(&feedback, text).unwrap();
    assert_eq!(pull()["deleted"], 1);

    let after = store_bytes(&ws.store_dir());
    assert!(
        !contains(&after, marker),
        "the deleted record's text is still in the store's files"
    );
    assert!(contains(&after, keep), "the live record must stay");
    let dump = ws.dump();
    assert_eq!(dump.len(), 1, "{dump:?}");
}
