//! AI feedback where humans gave none (docs/rlaif.md) through the real binary: feedback with
//! regenerations pulled into a real store, a loopback judge that speaks the chat-completions
//! shape and prefers the answer marked `GOOD` (else the one shown first: position bias).
//! Both orders agreeing keeps a pair, disagreeing drops and counts it; the agreement with people
//! matches a hand computation of the Wilson interval; a floor the interval's lower bound misses
//! switches AI labels off (the report and the registry say so); no pair labelled by people means
//! agreement unknown and labels off unless allowed; a judge that times out, answers garbage, or
//! is a local checkpoint whose reply is no preference is a clear error and nothing is written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::response::Response;
use serde_json::{Value, json};

use crate::chat_judge::{self, Seen, completion, user_message};
use crate::common::{Workspace, bin, exported_ai_pairs, repo, stderr, stdout};

const KEY: &str = "rlaif-key-91c0d4";

#[derive(Clone, Copy)]
enum Reply {
    /// Prefers the answer containing `GOOD`; with none, the one shown first.
    MarkedOrFirst,
    /// Sleeps past the client's timeout.
    Slow,
    /// A chat completion that states no preference.
    Chatter,
}

/// The two answers of a pairwise request, as shown: (A, B).
fn shown(user: &str) -> (String, String) {
    let a = user.split("Answer A:\n").nth(1).unwrap_or("");
    let (a, b) = a.split_once("\n\nAnswer B:\n").unwrap_or((a, ""));
    let b = b.split("\n\nWhich answer").next().unwrap_or(b);
    (a.to_string(), b.to_string())
}

async fn completions(reply: Reply, body: Value) -> Response {
    let user = user_message(&body);
    match reply {
        Reply::MarkedOrFirst => {
            let (a, b) = shown(&user);
            let pick = if !a.contains("GOOD") && b.contains("GOOD") {
                "B"
            } else {
                "A"
            };
            completion(&format!("Both are plausible.\nPreferred: {pick}"))
        }
        Reply::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            completion("Preferred: A")
        }
        Reply::Chatter => completion("Both answers have their merits."),
    }
}

fn start_judge(reply: Reply) -> (String, Seen) {
    chat_judge::start_judge(reply, completions)
}

/// One thumb on one answer, as the feedback API sends it.
fn thumb(id: &str, conversation: &str, message: &str, answer: &str, up: bool) -> String {
    json!({
        "id": id, "kind": "thumb", "thumb": if up { "up" } else { "down" },
        "conversation_id": conversation, "message_id": message, "model_version": "policy-v1",
        "prompt": [{"role": "user", "content": format!("Question {conversation}?")}],
        "response": {"content": answer}, "source": "end_user", "user_id": format!("u_{id}"),
        "created_at": "2026-10-01T12:00:00Z", "updated_at": "2026-10-01T12:00:00Z",
    })
    .to_string()
}

/// Two answers to one question with a thumb each: `(first, up?)`, `(second, up?)`.
fn regeneration(n: &str, first: (&str, bool), second: (&str, bool)) -> Vec<String> {
    let c = format!("c_{n}");
    vec![
        thumb(&format!("{n}a"), &c, &format!("m_{n}_a"), first.0, first.1),
        thumb(
            &format!("{n}b"),
            &c,
            &format!("m_{n}_b"),
            second.0,
            second.1,
        ),
    ]
}

/// Pairs people labelled (a thumb up against a thumb down): 8 where they preferred the `GOOD`
/// answer (the judge agrees), 2 where they preferred the other (it disagrees, in both orders),
/// and 1 where neither is marked (the judge follows the position: inconsistent).
fn labelled() -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..8 {
        lines.extend(regeneration(
            &format!("l{i}"),
            (&format!("GOOD answer {i}"), true),
            (&format!("weak answer {i}"), false),
        ));
    }
    for i in 8..10 {
        lines.extend(regeneration(
            &format!("l{i}"),
            (&format!("plain answer {i}"), true),
            (&format!("GOOD answer {i}"), false),
        ));
    }
    lines.extend(regeneration(
        "l10",
        ("one way", true),
        ("another way", false),
    ));
    lines
}

/// Pairs without a human preference (both thumbs up): 3 with a `GOOD` answer (second, so the
/// judge's choice is not the position), 1 with none (inconsistent).
fn unlabelled() -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..3 {
        lines.extend(regeneration(
            &format!("u{i}"),
            (&format!("so-so reply {i}"), true),
            (&format!("GOOD reply {i}"), true),
        ));
    }
    lines.extend(regeneration(
        "u3",
        ("this reply", true),
        ("that reply", true),
    ));
    lines
}

/// A config over `records` (written beside it) with an `rlaif:` section; `judge` is the
/// section's `judge:` body.
fn write_config(ws: &Workspace, records: &[String], rlaif: &str, judge: &str) -> PathBuf {
    let feedback = ws.path().join("feedback.jsonl");
    std::fs::write(&feedback, records.join("\n") + "\n").unwrap();
    let sample = repo().join("configs/sample-feedback.jsonl");
    let base = ws.sample_config_text().replace(
        &sample.display().to_string(),
        &feedback.display().to_string(),
    );
    ws.write_config(&format!(
        "{base}rlaif:\n  enabled: true\n{rlaif}  judge:\n{judge}"
    ))
}

fn endpoint(url: &str) -> String {
    format!(
        "    url: {url}\n    model: judge-test\n    api_key_env: TEST_RLAIF_KEY\n    timeout_secs: 1\n"
    )
}

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    bin()
        .env("TEST_RLAIF_KEY", KEY)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn pull(config: &Path) {
    let o = cli(config, &["pull"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `rlaif --format json`: the summary, after checking the run succeeded and hid the key.
fn rlaif(config: &Path, extra: &[&str]) -> Value {
    let o = cli(config, &[&["--format", "json", "rlaif"], extra].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stdout(&o).contains(KEY) && !stderr(&o).contains(KEY),
        "the key leaked"
    );
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// The exported pairs made by AI, each checked to come from AI feedback.
fn exported_ai_feedback(config: &Path, dir: &Path) -> Vec<Value> {
    let lines = exported_ai_pairs(config, dir);
    for l in &lines {
        assert_eq!(l["source"], "ai_feedback", "{l}");
    }
    lines
}

fn close(got: &Value, want: f64) -> bool {
    got.as_f64().is_some_and(|g| (g - want).abs() < 1e-3)
}

#[test]
fn consistent_pairs_are_kept_inconsistent_ones_dropped_and_agreement_matches_wilson() {
    let (url, seen) = start_judge(Reply::MarkedOrFirst);
    let ws = Workspace::new();
    let records = [labelled(), unlabelled()].concat();
    let config = write_config(
        &ws,
        &records,
        "  weight: 0.5\n  min_agreement: 0.45\n",
        &endpoint(&url),
    );
    pull(&config);
    let s = rlaif(&config, &[]);

    // The agreement check: 11 labelled pairs judged, 10 consistently, 8 as people did.
    let a = &s["agreement"];
    assert_eq!(
        (
            &a["available"],
            &a["judged"],
            &a["consistent"],
            &a["agreeing"]
        ),
        (&json!(11), &json!(11), &json!(10), &json!(8)),
        "{s}"
    );
    // Wilson by hand, 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.716740,
    // half-width z / (1 + z²/10) · sqrt(0.8·0.2/10 + z²/400) = 0.226578.
    let i = &a["interval"];
    assert!(close(&i["estimate"], 0.8), "{i}");
    assert!(
        close(&i["low"], 0.490162) && close(&i["high"], 0.943318),
        "{i}"
    );
    assert_eq!(s["state"], "on", "{s}");

    // The labelling: 4 pairs without a preference, 3 kept, the unmarked one dropped.
    let l = &s["labels"];
    assert_eq!(
        (
            &l["available"],
            &l["judged"],
            &l["inconsistent"],
            &l["kept"],
            &l["over_cap"]
        ),
        (&json!(4), &json!(4), &json!(1), &json!(3), &json!(0)),
        "{s}"
    );

    // Every pair was asked in both orders, one right after the other, with the key.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2 * (11 + 4));
    assert!(
        seen.iter()
            .all(|(auth, _)| auth == &format!("Bearer {KEY}"))
    );
    let asked: Vec<String> = seen.iter().map(|(_, body)| user_message(body)).collect();
    for pair in asked.chunks(2) {
        let (a1, b1) = shown(&pair[0]);
        let (a2, b2) = shown(&pair[1]);
        assert!(!a1.is_empty() && !b1.is_empty(), "{}", pair[0]);
        assert_eq!(
            (a1, b1),
            (b2, a2),
            "the second order is not the first swapped"
        );
    }

    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.store_dir().join("rlaif.json")).unwrap())
            .unwrap();
    let pairs = file["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    for p in pairs {
        assert!(
            p["chosen"].as_str().unwrap().starts_with("GOOD reply"),
            "{p}"
        );
        assert!(
            p["rejected"].as_str().unwrap().starts_with("so-so reply"),
            "{p}"
        );
    }

    // The kept pairs reach the dataset and the export, marked and weighted.
    let lines = exported_ai_feedback(&config, &ws.path().join("export"));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["weight"], 0.5);
        assert!(
            l["chosen"][0]["content"]
                .as_str()
                .unwrap()
                .starts_with("GOOD reply")
        );
    }

    // `rlaif.enabled: false` leaves them out.
    let off = std::fs::read_to_string(&config)
        .unwrap()
        .replace("enabled: true", "enabled: false");
    let off = ws.write_config(&off);
    assert!(exported_ai_feedback(&off, &ws.path().join("export-off")).is_empty());
}

#[test]
fn a_floor_the_lower_bound_misses_switches_ai_labels_off_and_the_report_says_so() {
    let (url, seen) = start_judge(Reply::MarkedOrFirst);
    let ws = Workspace::new();
    // The sample's feedback too, so that the forced run has enough to train on.
    let sample = std::fs::read_to_string(repo().join("configs/sample-feedback.jsonl")).unwrap();
    let mut records: Vec<String> = sample.lines().map(str::to_string).collect();
    records.extend([labelled(), unlabelled()].concat());
    // 0.8 agreement on our pairs is above 0.6, but its lower bound is not: labels off.
    let config = write_config(&ws, &records, "  min_agreement: 0.6\n", &endpoint(&url));
    pull(&config);
    let o = cli(&config, &["rlaif"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("AI labels off for this run")
            && text.contains("below `rlaif.min_agreement` (60.0%)"),
        "{text}"
    );
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.store_dir().join("rlaif.json")).unwrap())
            .unwrap();
    assert_eq!(file["state"], "off_below_floor", "{file}");
    let a = &file["agreement"];
    assert!(a["interval"]["low"].as_f64().unwrap() < 0.6, "{file}");
    // Only the agreement check was paid for: no pair without a preference was judged.
    assert_eq!(file["labels"]["judged"], 0, "{file}");
    assert_eq!(
        seen.lock().unwrap().len() as u64,
        2 * a["judged"].as_u64().unwrap()
    );
    assert!(file["pairs"].as_array().unwrap().is_empty());
    assert!(exported_ai_feedback(&config, &ws.path().join("export")).is_empty());

    // The report's AI feedback section and the registry's lineage carry the decision.
    let now = chrono::Utc::now().to_rfc3339();
    let (out, log) = crate::common::forced_run_logged(&config, &now, &[("TEST_RLAIF_KEY", KEY)]);
    assert!(!log.contains(KEY), "the key reached the log");
    let report = std::fs::read_to_string(out["run"]["report"].as_str().unwrap()).unwrap();
    assert!(report.contains("### AI feedback"), "{report}");
    assert!(
        report.contains("AI labels off for this run")
            && report.contains("below `rlaif.min_agreement` (60.0%)"),
        "{report}"
    );
    assert!(!report.contains("GOOD"), "answers reached the report");
    let report_dir = Path::new(out["run"]["report"].as_str().unwrap())
        .parent()
        .unwrap();
    let metrics: Value =
        serde_json::from_str(&std::fs::read_to_string(report_dir.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(
        metrics["ai_feedback"]["state"], "off_below_floor",
        "{metrics}"
    );
    assert_eq!(
        metrics["ai_feedback"]["agreement"], file["agreement"],
        "{metrics}"
    );
    let registry =
        rlhf_bot::registry::Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    let entry = registry.models.first().expect("a registered model");
    let counts = &entry.feedback.counts;
    assert_eq!(
        counts.get("ai_feedback_validation_agreeing").copied(),
        a["agreeing"].as_u64(),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("ai_feedback_kept").copied(),
        Some(0),
        "{counts:?}"
    );
}

#[test]
fn without_pairs_people_labelled_agreement_is_unknown_and_labels_stay_off_unless_allowed() {
    let (url, seen) = start_judge(Reply::MarkedOrFirst);
    let ws = Workspace::new();
    let config = write_config(&ws, &unlabelled(), "", &endpoint(&url));
    pull(&config);
    let s = rlaif(&config, &[]);
    assert_eq!(s["state"], "off_unvalidated", "{s}");
    assert_eq!(s["agreement"]["judged"], 0);
    assert!(s["agreement"]["interval"].is_null(), "{s}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "the judge was paid for nothing"
    );
    let o = cli(&config, &["rlaif"]);
    assert!(
        stdout(&o).contains("agreement with people unknown")
            && stdout(&o).contains("rlaif.allow_unvalidated: true"),
        "{}",
        stdout(&o)
    );

    // Allowed: the labels are used, and `--max-pairs` caps the cost.
    let allowed = write_config(
        &ws,
        &unlabelled(),
        "  allow_unvalidated: true\n",
        &endpoint(&url),
    );
    let s = rlaif(&allowed, &["--max-pairs", "2"]);
    assert_eq!(s["state"], "on_unvalidated", "{s}");
    let l = &s["labels"];
    assert_eq!(
        (&l["judged"], &l["kept"], &l["over_cap"]),
        (&json!(2), &json!(2), &json!(2)),
        "{s}"
    );
    assert_eq!(
        exported_ai_feedback(&allowed, &ws.path().join("export")).len(),
        2
    );
}

#[test]
fn a_judge_that_times_out_or_answers_garbage_is_a_clear_error_and_nothing_is_written() {
    let ws = Workspace::new();
    let records = [labelled(), unlabelled()].concat();
    let (good, _) = start_judge(Reply::MarkedOrFirst);
    let rlaif_args = "  min_agreement: 0.45\n";
    let config = write_config(&ws, &records, rlaif_args, &endpoint(&good));
    pull(&config);
    rlaif(&config, &[]);
    let file = ws.store_dir().join("rlaif.json");
    let before = std::fs::read(&file).unwrap();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(ws.store_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let files_before = listing();
    for (reply, want) in [
        (Reply::Slow, "did not answer within 1 s"),
        (Reply::Chatter, "replied without a usable preference"),
    ] {
        let (url, _) = start_judge(reply);
        let o = cli(
            &write_config(&ws, &records, rlaif_args, &endpoint(&url)),
            &["rlaif"],
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{want}: the run succeeded");
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains(&format!("{url}/chat/completions")), "{err}");
        assert!(
            err.contains("hint:") && err.contains("rlaif.judge"),
            "{err}"
        );
        assert!(err.contains("pair 1 of 11 that people labelled"), "{err}");
        assert!(!err.contains(KEY), "the key leaked: {err}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            before,
            "{want}: file changed"
        );
        assert_eq!(listing(), files_before, "{want}: a file was left behind");
    }
}

#[test]
fn a_local_checkpoint_judges_through_our_generation_and_nonsense_is_a_clear_error() {
    let ws = Workspace::new();
    let checkpoint = repo().join("tests/fixtures/tiny-llama-policy");
    let judge = format!(
        "    checkpoint: {}\n    max_new_tokens: 4\n",
        checkpoint.display()
    );
    let config = write_config(&ws, &[labelled(), unlabelled()].concat(), "", &judge);
    pull(&config);
    let o = cli(&config, &["rlaif"]);
    let err = stderr(&o);
    // The tiny model writes nonsense: the plumbing ran (a reply came back and was read), and
    // the reply is named as no preference, with the checkpoint and the key to change.
    assert!(!o.status.success(), "the tiny model stated a preference?");
    assert!(
        err.contains("(local checkpoint)")
            && err.contains(&checkpoint.display().to_string())
            && err.contains("replied without a usable preference")
            && err.contains("`rlaif.judge`"),
        "{err}"
    );
    assert!(!ws.store_dir().join("rlaif.json").exists());

    // A judge is a checkpoint or an endpoint, not both.
    let both = format!("{judge}    url: http://127.0.0.1:9/v1\n");
    let o = cli(
        &write_config(&ws, &unlabelled(), "", &both),
        &["config", "check"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("rlaif.judge.checkpoint")
            && stderr(&o).contains("either a local checkpoint or an endpoint"),
        "{}",
        stderr(&o)
    );
}
