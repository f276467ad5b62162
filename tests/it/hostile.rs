//! Hostile inputs (issue: "hostile inputs", findings 4–6 and the config hardening items): the real
//! binary is fed feedback records, API error bodies and configs crafted to inject terminal
//! escapes, bidi overrides, workflow commands (`::error::`, `::stop-commands::`) and Markdown, or
//! to leak a secret; each test asserts that nothing raw or secret reaches stdout, stderr, the
//! step summary or the step outputs.

use std::path::{Path, PathBuf};
use std::process::Output;

use rlhf_bot::forge::github::{GithubClient, GithubTarget, Method, RetryPolicy, SecretToken};
use rlhf_bot::registry::{ModelKind, Registry};
use serde_json::json;

use crate::common::{Workspace, bin, stderr, stdout};
use crate::feedback_server::{self, Fault, Records, TOKEN};

/// The model version from the issue: Markdown/HTML, a mention, and a workflow command after a
/// newline.
const MV_MARKDOWN: &str = "pv-<img src=x>|@org/team`x`\n::error::MV-INJ";
/// Terminal escapes (colour, OSC title, OSC 8 link), bidi override and isolate, zero-width space,
/// line separator, and the legacy command form.
const MV_TERMINAL: &str = "\u{1b}[31mRED\u{1b}[0m\u{1b}]0;TITLE\u{07}\u{1b}]8;;http://evil/\u{1b}\\LINK\u{202e}RTL\u{2066}ISO\u{200b}ZW\u{2028}LS##[warning]LEGACY";
/// A record that tries to switch off the runner's masking.
const MV_STOP: &str = "\r\n::stop-commands::STOPTOKEN";

/// Characters that must never reach a terminal or log from data.
const FORBIDDEN: &[char] = &[
    '\u{1b}', '\u{07}', '\u{9b}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}',
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{200b}', '\u{2028}', '\u{2029}', '\r',
];

/// Asserts `text` (a whole stdout or stderr) carries no escape or invisible character and no line
/// the Actions runner would read as a workflow command, except `allowed` line prefixes.
fn assert_inert(what: &str, text: &str, allowed: &[&str]) {
    for c in FORBIDDEN {
        assert!(
            !text.contains(*c),
            "{what} contains U+{:04X}: {text:?}",
            *c as u32
        );
    }
    assert!(!text.contains("##["), "{what} has a legacy command: {text}");
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("::") {
            assert!(
                allowed.iter().any(|a| trimmed.starts_with(a)),
                "{what} has a workflow command line: {line:?}\n{text}"
            );
        }
    }
}

fn record(id: &str, version: &str, kind_extra: serde_json::Value) -> serde_json::Value {
    let mut r = json!({
        "id": id, "kind": "thumb", "thumb": "up",
        "conversation_id": "c1", "message_id": format!("m-{id}"), "model_version": version,
        "prompt": [{"role": "user", "content": "hi"}], "response": {"content": "hello"},
        "source": "end_user", "user_id": "u1",
        "created_at": "2026-11-20T12:00:00Z", "updated_at": "2026-11-20T12:00:00Z"
    });
    if let (Some(r), Some(extra)) = (r.as_object_mut(), kind_extra.as_object()) {
        for (k, v) in extra {
            r.insert(k.clone(), v.clone());
        }
    }
    r
}

/// A workspace with hostile records in a file source, and a registry that records a recent
/// training, so `run` decides not to retrain (and trains nothing).
fn hostile_workspace() -> (Workspace, PathBuf) {
    let ws = Workspace::new();
    let mut lines = Vec::new();
    for (i, version) in [MV_MARKDOWN, MV_TERMINAL, MV_STOP].iter().enumerate() {
        for j in 0..3 {
            lines.push(record(&format!("h{i}-{j}"), version, json!({})).to_string());
        }
    }
    // A malformed record with hostile fields: quarantined, shown by `store quarantine`.
    lines.push(
        record(
            "q\u{202e}1",
            MV_TERMINAL,
            json!({"kind": "\u{1b}[2J\n::error::KIND-INJ"}),
        )
        .to_string(),
    );
    let feed = ws.path().join("feed.jsonl");
    std::fs::write(&feed, lines.join("\n") + "\n").unwrap();
    let registry = ws.store_dir().join("registry.yaml");
    std::fs::create_dir_all(ws.store_dir()).unwrap();
    let mut reg = Registry::default();
    let mut rm = crate::registry::entry("rm-001", ModelKind::Reward, 20, None);
    rm.feedback.watermark = "2026-11-19T00:00:00Z".into();
    reg.add_candidate(rm).unwrap();
    reg.save(&registry).unwrap();
    let cfg = ws.write_config(&format!(
        "feedback:\n  source: file\n  path: {}\n  aspects: [accuracy]\nstore:\n  dir: {}\nthresholds:\n  min_new_feedback: 100000\n  min_new_signals: 100000\nregistry:\n  path: {}\n  artifacts: {}\nreport:\n  dir: {}\npublish:\n  mode: local\n  local_dir: {}\npolicy:\n  enabled: false\n",
        feed.display(),
        ws.store_dir().display(),
        registry.display(),
        ws.path().join("artifacts").display(),
        ws.path().join("reports").display(),
        ws.path().join("pr").display(),
    ));
    (ws, cfg)
}

/// Runs the binary as the Actions runner would: step summary, outputs and `GITHUB_ACTIONS`.
fn run_in_actions(ws: &Workspace, cfg: &Path, args: &[&str]) -> Output {
    bin()
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", ws.path().join("summary.md"))
        .env("GITHUB_OUTPUT", ws.path().join("output"))
        .env("RLHF_BOT_NOW", "2026-11-21T12:00:00Z")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn hostile_model_versions_are_neutralised_in_every_output() {
    let (ws, cfg) = hostile_workspace();
    for args in [
        &["pull"][..],
        &["check"],
        &["run"],
        &["store", "stats"],
        &["--format", "json", "check"],
        &["--format", "json", "store", "stats"],
        &["store", "quarantine"],
        &["store", "dump"],
        &["-vv", "check"],
    ] {
        let out = run_in_actions(&ws, &cfg, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_inert(&format!("stdout of {args:?}"), &stdout(&out), &[]);
        assert_inert(&format!("stderr of {args:?}"), &stderr(&out), &[]);
    }

    // The values are still there to read, neutralised, not dropped.
    let stats = stdout(&run_in_actions(&ws, &cfg, &["store", "stats"]));
    assert!(
        stats.contains("pv-<img src=x>|@org/team`x` ::error::MV-INJ: thumb 3"),
        "{stats}"
    );
    assert!(
        stats.contains("REDLINKRTLISOZW LS# #[warning]LEGACY"),
        "{stats}"
    );
    assert!(stats.contains(": :stop-commands::STOPTOKEN"), "{stats}");
    let check = stdout(&run_in_actions(&ws, &cfg, &["check"]));
    assert!(check.contains("retrain=false"), "{check}");
    // JSON output keeps the exact value (escaped, so a terminal shows it inertly).
    let json: serde_json::Value = serde_json::from_str(&stdout(&run_in_actions(
        &ws,
        &cfg,
        &["--format", "json", "check"],
    )))
    .unwrap();
    let versions: Vec<&str> = json["kpis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["model_version"].as_str().unwrap())
        .collect();
    assert!(versions.contains(&MV_TERMINAL), "{versions:?}");

    // The step summary: Markdown escaped the way the report escapes it.
    let summary = std::fs::read_to_string(ws.path().join("summary.md")).unwrap();
    assert!(!summary.contains("<img"), "{summary}");
    assert!(summary.contains("&lt;img src=x&gt;"), "{summary}");
    assert!(!summary.contains("@org"), "a mention survived: {summary}");
    assert!(summary.contains("@\u{200d}org/team"), "{summary}");
    for c in ['\u{1b}', '\u{202e}', '\u{2066}', '\r'] {
        assert!(!summary.contains(c), "U+{:04X} in {summary:?}", c as u32);
    }
    for line in summary.lines() {
        assert!(!line.trim_start().starts_with("::"), "{line:?}");
    }
    let outputs = std::fs::read_to_string(ws.path().join("output")).unwrap();
    assert!(outputs.contains("retrain=false\n"), "{outputs}");
    assert!(
        !outputs.contains("MV-INJ") && !outputs.contains('\u{1b}'),
        "{outputs}"
    );
}

#[test]
fn hostile_api_error_bodies_are_cut_sanitised_and_redacted() {
    let server = feedback_server::start(Records::List(vec![]), std::time::Duration::ZERO);
    let body = format!(
        "\u{1b}[2J\u{1b}]0;pwned\u{07}denied\u{202e}!\n::error::BODY-INJ\n::stop-commands::STOP\n##[warning]LEGACY\nAuthorization: {{authorization}}\n{{\"echo\":{{\"authorization\":\"{{authorization}}\"}}}}\nreceived {TOKEN} again\n{}",
        "A".repeat(5000)
    );
    server.push_fault(Fault::Reply { status: 403, body });
    let ws = Workspace::new();
    let cfg = ws.http_config(&server.url(), "");
    let out = run_in_actions(&ws, &cfg, &["pull"]);
    assert!(!out.status.success());
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(e.contains("HTTP 403"), "{e}");
    assert!(e.contains("denied!"), "the body is shown, sanitised: {e}");
    assert!(e.contains("Authorization: Bearer ***"), "{e}");
    assert!(e.contains("[truncated: "), "the body is cut: {e}");
    // Workflow commands go to stderr (stdout stays data): the bot's own mask of the token comes
    // first and its error annotation last; no data reaches the start of a line.
    let error_block: String = e
        .lines()
        .filter(|l| !l.starts_with("::"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        error_block.len() < 2000,
        "at most 500 characters of body: {} bytes",
        error_block.len()
    );
    assert_eq!(
        e.lines().next(),
        Some(format!("::add-mask::{TOKEN}").as_str()),
        "{e}"
    );
    assert!(
        !e.replace(&format!("::add-mask::{TOKEN}"), "")
            .contains(TOKEN),
        "the token leaked into stderr: {e}"
    );
    assert_inert("stderr", &e, &["::add-mask::", "::error title=rlhf-bot::"]);
    assert!(!o.contains(TOKEN), "{o}");
    assert_inert("stdout", &o, &[]);
}

#[test]
fn github_error_bodies_never_show_the_token() {
    const GH_TOKEN: &str = "ghs_hostileTestToken1234";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::any())
            .respond_with(|req: &wiremock::Request| {
                let auth = req
                    .headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                wiremock::ResponseTemplate::new(401).set_body_string(format!(
                    "{{\"message\":\"Bad credentials \\u001b[31m{auth}\\u202e\\n::error::GH-INJ\",\"documentation_url\":\"x\"}}"
                ))
            })
            .mount(&server)
            .await;
        let target = GithubTarget {
            api_url: server.uri(),
            owner: "acme".into(),
            repo: "assistant".into(),
            base_branch: "main".into(),
            token: SecretToken::new(GH_TOKEN).unwrap(),
        };
        let client = GithubClient::new(&target, RetryPolicy::default()).unwrap();
        let err = client
            .send(Method::Get, "/repos/acme/assistant", None)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(401));
        let shown = format!("{err}");
        assert!(shown.contains("Bad credentials"), "{shown}");
        assert!(!shown.contains(GH_TOKEN), "{shown}");
        assert!(!format!("{err:?}").contains(GH_TOKEN));
        assert!(!err.body().unwrap().contains(GH_TOKEN));
        assert_inert("the GitHub error", &shown, &[]);
        assert!(!shown.contains("\n::"), "{shown}");
    });
}

#[test]
fn credentials_in_urls_are_refused_without_printing_the_password() {
    let ws = Workspace::new();
    for (config, key) in [
        (
            "feedback:\n  source: http\n  url: http://bot:hunter2-pw@feedback.example.com/api\n"
                .to_string(),
            "feedback.url",
        ),
        (
            "feedback:\n  source: file\n  path: x.jsonl\npublish:\n  mode: github\n  github:\n    repo: acme/assistant\n    api_url: https://x-access-token:hunter2-pw@ghe.example.com/api/v3\n"
                .to_string(),
            "publish.github.api_url",
        ),
        (
            // Not even a parseable URL: still no password in the message.
            "feedback:\n  source: http\n  url: http://bot:hunter2-pw @feedback.example.com/\n"
                .to_string(),
            "feedback.url",
        ),
    ] {
        let cfg = ws.write_config(&config);
        for format in ["text", "json"] {
            let out = bin()
                .arg("--config")
                .arg(&cfg)
                .args(["--format", format, "config", "check"])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{config}");
            let (o, e) = (stdout(&out), stderr(&out));
            assert!(!o.contains("hunter2") && !e.contains("hunter2"), "{o}{e}");
            assert!(e.contains(key), "{e}");
            assert!(e.contains("***@"), "the URL is named with its credentials hidden: {e}");
        }
    }
    let cfg = ws.write_config(
        "feedback:\n  source: http\n  url: http://bot:hunter2-pw@feedback.example.com/api\n",
    );
    let e = stderr(
        &bin()
            .arg("--config")
            .arg(&cfg)
            .arg("pull")
            .output()
            .unwrap(),
    );
    assert!(e.contains("credentials") && e.contains("token_env"), "{e}");
}

#[test]
fn a_token_written_into_token_env_is_not_echoed() {
    let ws = Workspace::new();
    for (config, key, secret) in [
        (
            "feedback:\n  source: http\n  url: https://f.example.com\n  token_env: secret-token-xyz\n",
            "feedback.token_env",
            "secret-token-xyz",
        ),
        (
            "feedback:\n  source: http\n  url: https://f.example.com\n  token_env: ghp_R4nd0mLooking1Token2Value3\n",
            "feedback.token_env",
            "ghp_R4nd0mLooking1Token2Value3",
        ),
        (
            "feedback:\n  source: file\n  path: x.jsonl\npublish:\n  mode: github\n  github:\n    repo: acme/assistant\n    token_env: \"github_pat_11ABC xyz\"\n",
            "publish.github.token_env",
            "github_pat_11ABC",
        ),
    ] {
        let cfg = ws.write_config(config);
        for format in ["text", "json"] {
            let out = bin()
                .arg("--config")
                .arg(&cfg)
                .args(["--format", format, "config", "check"])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2));
            let (o, e) = (stdout(&out), stderr(&out));
            assert!(!o.contains(secret) && !e.contains(secret), "{o}{e}");
            assert!(e.contains(key) && e.contains("not shown"), "{e}");
            assert!(
                e.contains("hint: put the token in an environment variable"),
                "{e}"
            );
        }
    }
    // Ordinary names still pass.
    let cfg = ws.write_config(
        "feedback:\n  source: http\n  url: https://f.example.com\n  token_env: MY_FEEDBACK_TOKEN_2\n",
    );
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn gates_refuse_nan_infinite_and_negative_values() {
    let ws = Workspace::new();
    for (gate, value, shown) in [
        ("kl_budget", ".nan", "NaN"),
        ("kl_budget", ".inf", "inf"),
        ("rm_accuracy_max_drop_points", "-1", "-1"),
        ("min_win_rate_lower_bound", "-0.5", "-0.5"),
        ("min_win_rate_lower_bound", "1.5", "1.5"),
    ] {
        let cfg = ws.write_config(&format!(
            "feedback:\n  source: file\n  path: x.jsonl\ngates:\n  {gate}: {value}\n"
        ));
        let out = bin()
            .arg("--config")
            .arg(&cfg)
            .args(["config", "check"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{gate}: {value}");
        let e = stderr(&out);
        assert!(
            e.contains(&format!("rlhf.yaml:5:3: gates.{gate}: expected"))
                && e.contains(&format!("got {shown}")),
            "{e}"
        );
    }
}

#[test]
fn deeply_nested_yaml_is_refused_before_parsing() {
    let ws = Workspace::new();
    let deep = format!("feedback: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let cfg = ws.write_config(&deep);
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.contains("rlhf.yaml:1:1: the YAML is nested more than 64 levels deep"),
        "{e}"
    );

    let indented: String = (0..1000)
        .map(|i| format!("{}k:\n", " ".repeat(i)))
        .collect();
    let cfg = ws.write_config(&indented);
    let e = stderr(
        &bin()
            .arg("--config")
            .arg(&cfg)
            .args(["config", "check"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("nested more than 64 levels"), "{e}");

    // The registry, too.
    let (ws, cfg) = hostile_workspace();
    std::fs::write(
        ws.store_dir().join("registry.yaml"),
        format!("version: 1\nmodels: {}\n", "[".repeat(50_000)),
    )
    .unwrap();
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("registry.yaml:2: the YAML is nested more than 64 levels deep"),
        "{e}"
    );
}
