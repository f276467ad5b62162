//! Behaviour tests as merge gates (issue #19, section 5): every check kind passing and failing,
//! the judge against a loopback server that speaks the chat-completions shape (a good score, a
//! timeout, garbage, an HTTP error), and a forced `run` whose failing required eval makes the
//! pull request a draft while a judge-scored eval passes.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rlhf_bot::evals::judge::{Judge, JudgeError, JudgeSettings};
use rlhf_bot::evals::{Answered, ModelAnswer, check, parse, results};
use rlhf_bot::secret::SecretString;
use serde_json::Value;

use crate::chat_judge::{self, Seen, completion};
use crate::common::{Workspace, forced_run_logged, run, stderr};

const JUDGE_KEY: &str = "judge-key-4c1d9e";

/// How the loopback judge answers.
#[derive(Clone, Copy)]
enum Reply {
    Score(f64),
    /// Sleeps longer than the client's timeout.
    Slow,
    /// 200 with a body that is not JSON.
    NotJson,
    /// Valid chat-completions JSON whose message holds no score.
    Chatter,
    Status(u16),
}

async fn completions(reply: Reply, _body: Value) -> Response {
    let message = completion;
    match reply {
        Reply::Score(x) => message(&format!("The answer covers the rubric.\nScore: {x}")),
        Reply::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            message("Score: 9")
        }
        Reply::NotJson => "<html>upstream busy</html>".into_response(),
        Reply::Chatter => message("I think it is rather good."),
        Reply::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            format!("{{\"error\": \"bad key {JUDGE_KEY}\"}}"),
        )
            .into_response(),
    }
}

fn start_judge(reply: Reply) -> (String, Seen) {
    chat_judge::start_judge(reply, completions)
}

fn judge(url: &str) -> Judge {
    Judge::with_key(
        &JudgeSettings {
            url: url.parse().unwrap(),
            model: "judge-test".into(),
            api_key_env: None,
            timeout_secs: 1,
        },
        Some(SecretString::new(JUDGE_KEY)),
    )
    .unwrap()
}

const CASES: &str = r#"
- name: explains-the-price
  required: true
  conversation:
    - {role: user, content: "How does a carbon tax work?"}
  checks:
    - contains: "price"
    - not_contains: "As an AI"
    - regex: "(?i)emission"
    - min_reward: 0.5
    - judge: "Does the answer say that a carbon tax puts a price on emissions?"
      min_score: 7
"#;

fn answered(text: &str, reward: f64, judge: f64) -> Answered {
    Answered {
        text: text.into(),
        reward,
        judge_scores: vec![Some(judge)],
    }
}

#[test]
fn each_check_kind_passes_and_fails() {
    let case = parse(CASES, Path::new("evals/climate.yaml"))
        .unwrap()
        .remove(0);
    assert!(case.required);
    let good = check(
        &case,
        &answered("It puts a price on each tonne of emissions.", 0.9, 8.0),
    );
    assert!(good.passed, "{good:?}");
    let bad = check(&case, &answered("As an AI I cannot say.", 0.1, 3.0));
    assert!(!bad.passed);
    let kinds: Vec<(&str, bool)> = bad
        .checks
        .iter()
        .map(|c| (c.kind.as_str(), c.passed))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("contains", false),
            ("not_contains", false),
            ("regex", false),
            ("min_reward", false),
            ("judge", false)
        ]
    );
    assert!(
        bad.checks[3].detail.contains("reward 0.100 < 0.500"),
        "{:?}",
        bad.checks[3]
    );
    assert!(
        bad.checks[4].detail.contains("judge score 3.0 < 7.0"),
        "{:?}",
        bad.checks[4]
    );
}

#[test]
fn a_bad_eval_file_names_the_file_the_eval_and_the_check() {
    let two_keys = "- name: x\n  conversation: [{role: user, content: hi}]\n  checks:\n    - {contains: a, regex: b}\n";
    let e = parse(two_keys, Path::new("evals/a.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("evals/a.yaml") && e.contains("\"x\"") && e.contains("check 1 has 2 check keys"),
        "{e}"
    );
    let bad_regex =
        "- name: y\n  conversation: [{role: user, content: hi}]\n  checks: [{regex: \"(\"}]\n";
    let e = parse(bad_regex, Path::new("evals/b.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid regex \"(\""), "{e}");
    let no_user =
        "- name: z\n  conversation: [{role: assistant, content: hi}]\n  checks: [{contains: a}]\n";
    let e = parse(no_user, Path::new("evals/c.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not end with a user turn"), "{e}");
}

#[test]
fn config_check_validates_the_eval_files() {
    let ws = Workspace::new();
    let evals = ws.path().join("evals");
    std::fs::create_dir_all(&evals).unwrap();
    std::fs::write(evals.join("judged.yaml"), CASES).unwrap();
    let config = ws.write_config(&format!(
        "{}evals:\n  dir: {}\n",
        ws.sample_config_text(),
        evals.display()
    ));
    let o = run(&config, &["config", "check"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("\"explains-the-price\"") && err.contains("no judge is configured"),
        "{err}"
    );
    std::fs::write(
        evals.join("judged.yaml"),
        CASES.replace("    - judge:", "    - not_judge:"),
    )
    .unwrap();
    let err = stderr(&run(&config, &["config", "check"]));
    assert!(
        err.contains("judged.yaml") && err.contains("not_judge"),
        "{err}"
    );
    std::fs::remove_file(evals.join("judged.yaml")).unwrap();
    assert!(run(&config, &["config", "check"]).status.success());
}

#[tokio::test]
async fn the_judge_scores_over_chat_completions_with_the_key() {
    let (url, seen) = start_judge(Reply::Score(8.5));
    let case = parse(CASES, Path::new("evals/climate.yaml")).unwrap();
    let answers = [ModelAnswer {
        text: "A price on emissions.".into(),
        reward: 1.0,
    }];
    let prod = [ModelAnswer {
        text: "No idea.".into(),
        reward: 0.0,
    }];
    let out = results(&case, &answers, Some(&prod[..]), Some(&judge(&url)))
        .await
        .unwrap();
    assert!(out.cases[0].candidate.passed, "{out:?}");
    // Production fails contains/regex/min_reward: not a regression, the candidate passes.
    assert!(!out.cases[0].production.as_ref().unwrap().passed);
    assert_eq!(out.regressions().count(), 0);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "one judge request per answer");
    assert_eq!(seen[0].0, format!("Bearer {JUDGE_KEY}"));
    assert_eq!(seen[0].1["model"], "judge-test");
    let prompt = seen[0].1["messages"][1]["content"].as_str().unwrap();
    assert!(
        prompt.contains("price on emissions") && prompt.contains("A price on emissions."),
        "{prompt}"
    );
}

#[tokio::test]
async fn judge_faults_are_clear_errors_that_never_show_the_key() {
    let case = parse(CASES, Path::new("evals/climate.yaml")).unwrap();
    let answers = [ModelAnswer {
        text: "A price on emissions.".into(),
        reward: 1.0,
    }];
    for (reply, want) in [
        (Reply::Slow, "did not answer within 1 s"),
        (Reply::NotJson, "the body is not JSON"),
        (Reply::Chatter, "no `Score: N` in the reply"),
        (Reply::Score(42.0), "score 42 is outside 0-10"),
        (Reply::Status(401), "answered HTTP 401"),
    ] {
        let (url, _) = start_judge(reply);
        let j = judge(&url);
        let direct = j
            .score("rubric", &case[0].conversation, "answer")
            .await
            .unwrap_err();
        if matches!(reply, Reply::Slow) {
            assert!(matches!(direct, JudgeError::Timeout { .. }), "{direct:?}");
        }
        let e = format!(
            "{:#}",
            results(&case, &answers, None, Some(&j)).await.unwrap_err()
        );
        assert!(e.contains(want) && e.contains("hint:"), "{want}: {e}");
        assert!(e.contains("judging eval \"explains-the-price\""), "{e}");
        assert!(!e.contains(JUDGE_KEY), "the key leaked: {e}");
    }
    // A judge check with no judge configured says what to set.
    let e = results(&case, &answers, None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no judge is configured") && e.contains("evals.judge.url"),
        "{e}"
    );
}

#[test]
fn a_failing_required_eval_makes_the_pull_request_a_draft() {
    let (url, seen) = start_judge(Reply::Score(9.0));
    let ws = Workspace::new();
    let evals = ws.path().join("evals");
    std::fs::create_dir_all(&evals).unwrap();
    std::fs::write(
        evals.join("gates.yaml"),
        r#"
- name: must-name-the-price
  required: true
  conversation:
    - {role: user, content: "How does a carbon tax work?"}
  checks:
    - contains: "zz-a-tiny-model-never-writes-this-zz"
- name: judged-kindly
  conversation:
    - {role: user, content: "What is a carbon price?"}
  checks:
    - not_contains: "zz-a-tiny-model-never-writes-this-zz"
    - min_reward: -1000
    - judge: "Is the answer polite?"
"#,
    )
    .unwrap();
    let config = ws.write_config(&format!(
        "{}gates:\n  min_win_rate_lower_bound: 0.0\n  kl_budget: 1000\nevals:\n  dir: {}\n  judge:\n    url: {url}\n    model: judge-test\n    api_key_env: TEST_JUDGE_KEY\n    timeout_secs: 5\n",
        ws.sample_config_text(),
        evals.display()
    ));
    let (out, log) = forced_run_logged(
        &config,
        "2026-11-27T12:00:00Z",
        &[("TEST_JUDGE_KEY", JUDGE_KEY)],
    );
    assert!(!log.contains(JUDGE_KEY), "the judge key reached the log");
    let run = &out["run"];
    assert_eq!(run["draft"], true, "{run}");
    let report_path = Path::new(run["report"].as_str().unwrap());
    // The other gates are set so they pass: the failing required eval alone makes the draft.
    let metrics: Value = serde_json::from_str(
        &std::fs::read_to_string(report_path.with_file_name("metrics.json")).unwrap(),
    )
    .unwrap();
    let failing: Vec<&str> = metrics["gates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["status"] == "fail")
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(failing, vec!["evals"], "{metrics}");
    let report = std::fs::read_to_string(report_path).unwrap();
    assert!(report.contains("### Behaviour tests"), "{report}");
    assert!(
        report.contains("1 of 1 required evals fail: `must-name-the-price`"),
        "{report}"
    );
    assert!(report.contains("| `judged-kindly` | no | ✅ |"), "{report}");
    assert!(!report.contains(JUDGE_KEY));
    // Candidate and production were each judged once on the one judge check.
    assert_eq!(seen.lock().unwrap().len(), 2);
}
