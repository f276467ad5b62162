//! Constitution as code (docs/constitution.md) through the real binary: principles from a file,
//! the tiny policy's answers to the bundled sample's prompts, critiques and revisions from a
//! loopback server that speaks the chat-completions shape. A run's pairs reach the dataset and
//! the TRL export with their source and weight; a judge that times out or answers garbage is a
//! clear error naming the endpoint, and nothing is written; the API key never shows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::chat_judge::{self, Seen, completion, user_message};
use crate::common::{Workspace, bin, exported_ai_pairs, stderr, stdout};

const KEY: &str = "constitution-key-7f3a2b";
const REVISED: &str = "A carbon tax puts a price on each tonne of CO2 emitted.";

const PRINCIPLES: &str = r#"
- id: plain-language
  critique: "CRITIQUE: does this answer to {prompt} avoid jargon? Answer: {answer}"
  revision: "REVISE: rewrite {answer} so that it meets the critique: {critique}"
- id: cite-numbers
  critique: "CRITIQUE: does {answer} give numbers with their source?"
  revision: "REVISE: rewrite {answer} given {critique}"
"#;

#[derive(Clone, Copy)]
enum Reply {
    /// A critique for critique requests, [`REVISED`] for revision requests.
    Good,
    /// Sleeps past the client's timeout.
    Slow,
    /// 200 with a body that is not JSON.
    NotJson,
    /// JSON without `choices`.
    NoChoices,
}

async fn completions(reply: Reply, body: Value) -> Response {
    let user = user_message(&body);
    let message = completion;
    match reply {
        Reply::Good if user.starts_with("CRITIQUE") => message("It uses jargon and no numbers."),
        Reply::Good => message(REVISED),
        Reply::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            message(REVISED)
        }
        Reply::NotJson => "<html>upstream busy</html>".into_response(),
        Reply::NoChoices => {
            axum::Json(json!({"id": "chatcmpl-1", "object": "chat.completion"})).into_response()
        }
    }
}

fn start_judge(reply: Reply) -> (String, Seen) {
    chat_judge::start_judge(reply, completions)
}

/// The tiny test config with a `constitution:` section whose judge is at `url`.
fn write_config(ws: &Workspace, url: &str, weight: f64) -> PathBuf {
    let principles = ws.path().join("principles.yaml");
    std::fs::write(&principles, PRINCIPLES).unwrap();
    ws.write_config(&format!(
        "{}constitution:\n  principles: {}\n  critic: judge\n  weight: {weight}\n  seed: 3\n  max_new_tokens: 6\n  limit: 3\n  judge:\n    url: {url}\n    model: critic-test\n    api_key_env: TEST_CONSTITUTION_KEY\n    timeout_secs: 1\n",
        ws.sample_config_text(),
        principles.display()
    ))
}

fn constitution(config: &Path) -> std::process::Output {
    bin()
        .env("TEST_CONSTITUTION_KEY", KEY)
        .arg("--config")
        .arg(config)
        .args(["--format", "json", "constitution"])
        .output()
        .unwrap()
}

fn pull(config: &Path) {
    let o = bin()
        .arg("--config")
        .arg(config)
        .arg("pull")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_run_makes_weighted_pairs_that_reach_the_dataset_and_the_export() {
    let (url, seen) = start_judge(Reply::Good);
    let ws = Workspace::new();
    let config = write_config(&ws, &url, 0.5);
    pull(&config);
    let o = constitution(&config);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(summary["prompts"], 3, "{summary}");
    assert_eq!(summary["pairs"], 3, "{summary}");
    assert_eq!(summary["critic"], "judge");
    assert!(
        !stdout(&o).contains(KEY) && !stderr(&o).contains(KEY),
        "the key leaked"
    );

    // One critique and one revision per prompt, each with the key, the revision seeing the
    // critique.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(auth, _)| auth == &format!("Bearer {KEY}"))
    );
    let revise = user_message(&seen[1].1);
    assert!(revise.starts_with("REVISE") && revise.contains("It uses jargon"));

    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(ws.store_dir().join("constitution.json")).unwrap(),
    )
    .unwrap();
    let pairs = file["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    for p in pairs {
        assert_eq!(p["chosen"], REVISED);
        assert_ne!(p["rejected"], REVISED);
        assert!(["plain-language", "cite-numbers"].contains(&p["principle"].as_str().unwrap()));
    }
    assert_eq!(file["principles"].as_object().unwrap().len(), 2);

    let lines = exported_ai_pairs(&config, &ws.path().join("export"));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["source"], "ai_constitution");
        assert_eq!(l["weight"], 0.5);
        assert_eq!(l["chosen"][0]["content"], REVISED);
    }

    // Weight 0 leaves them out of the dataset.
    let off = write_config(&ws, &url, 0.0);
    assert!(exported_ai_pairs(&off, &ws.path().join("export-off")).is_empty());
}

#[test]
fn a_judge_that_times_out_or_answers_garbage_is_a_clear_error_and_nothing_is_written() {
    let ws = Workspace::new();
    // A good run first: a failed run must leave its pairs exactly as they were.
    let (good, _) = start_judge(Reply::Good);
    let config_good = write_config(&ws, &good, 1.0);
    pull(&config_good);
    assert!(constitution(&config_good).status.success());
    let pairs_file = ws.store_dir().join("constitution.json");
    let before = std::fs::read(&pairs_file).unwrap();
    for (reply, want) in [
        (Reply::Slow, "did not answer within 1 s"),
        (Reply::NotJson, "the body is not JSON"),
        (Reply::NoChoices, "no choices[0].message.content"),
    ] {
        let (url, _) = start_judge(reply);
        let o = constitution(&write_config(&ws, &url, 1.0));
        let err = stderr(&o);
        assert!(!o.status.success(), "{want}: the run succeeded");
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains(&format!("{url}/chat/completions")), "{err}");
        assert!(
            err.contains("hint:") && err.contains("constitution.judge"),
            "{err}"
        );
        assert!(err.contains("prompt 1 of 3"), "{err}");
        assert!(
            !err.contains(KEY) && !stdout(&o).contains(KEY),
            "the key leaked: {err}"
        );
        assert_eq!(
            std::fs::read(&pairs_file).unwrap(),
            before,
            "{want}: pairs changed"
        );
        assert!(
            !ws.store_dir().join("constitution.previous.json").exists(),
            "{want}: a failed run rotated the pairs"
        );
    }
}

#[test]
fn a_bad_principles_file_names_the_file_the_principle_and_the_field() {
    let (url, seen) = start_judge(Reply::Good);
    let ws = Workspace::new();
    let config = write_config(&ws, &url, 1.0);
    let principles = ws.path().join("principles.yaml");
    std::fs::write(
        &principles,
        "- id: plain-language\n  critique: \"Is {answer} plain?\"\n",
    )
    .unwrap();
    let o = constitution(&config);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&principles.display().to_string())
            && err.contains("principle 1 (\"plain-language\")")
            && err.contains("`revision` is missing"),
        "{err}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "the judge was asked anyway"
    );
}

/// `check --format json` at `now`.
fn check(config: &Path, now: &str) -> Value {
    let o = bin()
        .env("RLHF_BOT_NOW", now)
        .arg("--config")
        .arg(config)
        .args(["--format", "json", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn principles_trigger(check: &Value) -> Value {
    check["decision"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "principles")
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn editing_the_principles_fires_the_principles_trigger_and_the_report_shows_the_change() {
    let (url, _) = start_judge(Reply::Good);
    let ws = Workspace::new();
    let config = write_config(&ws, &url, 1.0);
    pull(&config);
    assert!(constitution(&config).status.success());
    let now = chrono::Utc::now();
    let (out, log) = crate::common::forced_run_logged(
        &config,
        &now.to_rfc3339(),
        &[("TEST_CONSTITUTION_KEY", KEY)],
    );
    assert!(!log.contains(KEY), "the key reached the log");

    // The report: which principles are new, and (in the PR body only: prompts are user text)
    // the answers before and after.
    let report_path = PathBuf::from(out["run"]["report"].as_str().unwrap());
    let report = std::fs::read_to_string(&report_path).unwrap();
    assert!(report.contains("### Constitution"), "{report}");
    assert!(
        report.contains("`cite-numbers` added") && report.contains("`plain-language` added"),
        "{report}"
    );
    assert!(report.contains("3 prompt(s) affected"), "{report}");
    assert!(
        !report.contains(REVISED),
        "answers reached the committed report"
    );
    let body_dir = PathBuf::from(out["run"]["publish"]["local_dir"].as_str().unwrap());
    let body = std::fs::read_to_string(body_dir.join("body.md")).unwrap();
    assert!(
        body.contains("Constitution: answers before and after (3)") && body.contains(REVISED),
        "{body}"
    );

    // Unchanged principles: listed, not fired.
    let later = (now + chrono::Duration::days(1)).to_rfc3339();
    let quiet = check(&config, &later);
    let t = principles_trigger(&quiet);
    assert_eq!(t["fired"], false, "{quiet}");
    assert_eq!(quiet["retrain"], false, "{quiet}");

    // A pull request edits one principle: the next check retrains for that reason alone.
    let principles = ws.path().join("principles.yaml");
    let edited = PRINCIPLES.replace("given {critique}", "so that it answers {critique}");
    std::fs::write(&principles, edited).unwrap();
    let fired = check(&config, &later);
    let t = principles_trigger(&fired);
    assert_eq!(t["fired"], true, "{fired}");
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("cite-numbers changed")
            && !t["detail"].as_str().unwrap().contains("plain-language"),
        "{t}"
    );
    assert_eq!(fired["retrain"], true, "{fired}");
    assert_eq!(fired["reasons"], "principles", "{fired}");
}

#[test]
fn a_local_checkpoint_critic_answers_through_our_generation_and_an_empty_critique_is_an_error() {
    let ws = Workspace::new();
    let principles = ws.path().join("principles.yaml");
    std::fs::write(&principles, PRINCIPLES).unwrap();
    let checkpoint = crate::common::repo().join("tests/fixtures/tiny-llama-policy");
    let config = ws.write_config(&format!(
        "{}constitution:\n  principles: {}\n  critic: judge\n  max_new_tokens: 6\n  limit: 2\n  judge:\n    checkpoint: {}\n    max_new_tokens: 6\n",
        ws.sample_config_text(),
        principles.display(),
        checkpoint.display()
    ));
    pull(&config);
    // The tiny fixture stops at once: its (empty) critique came back through the local judge and
    // is refused with the prompt it was for; nothing is written.
    let o = constitution(&config);
    let err = stderr(&o);
    assert!(!o.status.success(), "the tiny model wrote a critique?");
    assert!(
        err.contains("the critic returned an empty critique for prompt 1 of 2"),
        "{err}"
    );
    assert!(!ws.store_dir().join("constitution.json").exists());
}
