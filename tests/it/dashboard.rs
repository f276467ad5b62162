//! The training dashboard: `rlhf-bot dashboard --out` (the static site) and `GET /dashboard` of
//! `rlhf-bot serve` (live), over a registry, a report, a run log and real feedback written to
//! the service — one model version named with markup, so escaping is tested where it matters.
//! "Retrain now" dispatches through GitHub's OpenAPI description (a Prism mock) and the page is
//! drawn in a real headless Chromium, whose screenshot is saved under `target/test-outputs/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{Workspace, bin, stderr};
use crate::widget_browser::{Browser, Killed};

const READ: &str = "dashboard-read-token-0001";
const WRITE: &str = "dashboard-write-key-00001";
const DISPATCH: &str = "dashboard-dispatch-token-01";
/// A model version as a hostile chat application (or widget user) could name it.
const HOSTILE: &str = "<img src=x onerror=\"document.title='pwned'\"></script><b>v2";

const REGISTRY: &str = r#"version: 1
models:
- id: policy-run1
  kind: policy
  created_at: 2026-12-01T00:00:00Z
  base_model: SmolLM2-135M-Instruct
  algorithm: dpo
  config_sha256: "1111111111111111111111111111111111111111111111111111111111111111"
  feedback: {watermark: w, counts: {pairs: 12}, examples_sha256: "2222222222222222222222222222222222222222222222222222222222222222"}
  artifact: {uri: "file:///nowhere/policy/policy-run1/", sha256: "0000000000000000000000000000000000000000000000000000000000000000", size_bytes: 1}
  metrics: {win_rate: 0.5, kl: 0.02}
  status: production
  aliases: [production]
- id: policy-run2
  kind: policy
  created_at: 2026-12-02T00:00:00Z
  base_model: SmolLM2-135M-Instruct
  parent: policy-run1
  algorithm: dpo
  config_sha256: "1111111111111111111111111111111111111111111111111111111111111111"
  feedback: {watermark: w, counts: {pairs: 30}, examples_sha256: "3333333333333333333333333333333333333333333333333333333333333333"}
  artifact: {uri: "file:///nowhere/policy/policy-run2/", sha256: "0000000000000000000000000000000000000000000000000000000000000000", size_bytes: 1}
  metrics: {win_rate: 0.75, kl: 0.04}
  status: candidate
"#;

/// A workspace with the registry, run2's report and run log, and a config whose `extra` lines
/// go under `dashboard:`.
fn setup(ws: &Workspace, dashboard: &str) -> PathBuf {
    let registry = ws.path().join("models/registry.yaml");
    std::fs::create_dir_all(registry.parent().unwrap()).unwrap();
    std::fs::write(&registry, REGISTRY).unwrap();
    let report = ws.path().join("reports/run2");
    std::fs::create_dir_all(&report).unwrap();
    std::fs::write(
        report.join("metrics.json"),
        json!({"gates": [{"id": "kl", "name": "KL to reference <= 10 nats", "status": "pass", "detail": "0.04 <= 10"}]}).to_string(),
    )
    .unwrap();
    let log = ws.store_dir().join("runs/run2/policy");
    std::fs::create_dir_all(&log).unwrap();
    let lines: String = (1..=20)
        .map(|s| format!("{{\"step\":{s},\"loss\":{}}}\n", 0.7 - 0.01 * s as f64))
        .collect();
    std::fs::write(log.join("log.jsonl"), lines).unwrap();
    ws.write_config(&format!(
        "feedback:\n  source: http\n  url: http://127.0.0.1:9/\n  token_env: DASH_READ\n\
         store:\n  dir: {store}\n\
         registry:\n  path: {registry}\n  artifacts: {artifacts}\n\
         report:\n  dir: {reports}\n\
         server:\n  listen: 127.0.0.1:0\n  database: {db}\n  read_token_env: DASH_READ\n  write_key_env: DASH_WRITE\n\
         dashboard:\n  repo: acme/assistant\n{dashboard}",
        store = ws.store_dir().display(),
        registry = registry.display(),
        artifacts = ws.path().join("artifacts").display(),
        reports = ws.path().join("reports").display(),
        db = ws.path().join("service.sqlite3").display(),
    ))
}

fn start(config: &Path, dispatch: bool) -> (Killed, String) {
    let mut cmd = bin();
    cmd.env("DASH_READ", READ)
        .env("DASH_WRITE", WRITE)
        .arg("--config")
        .arg(config)
        .arg("serve");
    if dispatch {
        cmd.env("DASH_DISPATCH", DISPATCH);
    }
    let (child, url) = crate::serve::spawn_service(cmd);
    (Killed(child), url)
}

/// Thumbs and ratings on two versions over two days, one of them named [`HOSTILE`].
fn write_feedback(url: &str) {
    let mut data = Vec::new();
    for (i, (version, day, thumb)) in [
        ("policy-run1", "2026-12-01", "up"),
        ("policy-run1", "2026-12-02", "down"),
        (HOSTILE, "2026-12-02", "up"),
        (HOSTILE, "2026-12-03", "up"),
    ]
    .iter()
    .enumerate()
    {
        data.push(json!({
            "id": format!("fb-{i}"), "kind": "thumb", "thumb": thumb,
            "conversation_id": "c", "message_id": format!("m{i}"), "model_version": version,
            "prompt": [{"role": "user", "content": "hi"}], "response": {"content": "hello"},
            "created_at": format!("{day}T10:00:00Z"),
        }));
    }
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/feedback"))
        .bearer_auth(WRITE)
        .json(&json!({"data": data}))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
}

fn basic(token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("team:{token}"))
    )
}

/// The JSON a page embeds, read back the way the page script reads it.
fn embedded_data(html: &str) -> Value {
    let start = html
        .find("<script id=\"rlhf-data\" type=\"application/json\">")
        .unwrap();
    let body = &html[start..];
    let body = &body[body.find('>').unwrap() + 1..];
    serde_json::from_str(&body[..body.find("</script>").unwrap()]).unwrap()
}

#[test]
fn the_static_site_shows_versions_gates_curves_and_kpis_with_hostile_text_inert() {
    let ws = Workspace::new();
    let config = setup(&ws, "");
    let (_svc, url) = start(&config, false);
    write_feedback(&url);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("http://127.0.0.1:9/", &format!("{url}/"));
    let config = ws.write_config(&text);
    let o = bin()
        .env("DASH_READ", READ)
        .arg("--config")
        .arg(&config)
        .arg("pull")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let site = ws.path().join("site");
    let o = bin()
        .env("GITHUB_REPOSITORY", "ignored/because-config-names-one")
        .arg("--config")
        .arg(&config)
        .args(["--format", "json", "dashboard", "--out"])
        .arg(&site)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["versions"], 2, "{summary}");

    let html = std::fs::read_to_string(site.join("index.html")).unwrap();
    assert!(
        !html.contains("<img") && !html.contains("<b>v2"),
        "markup from feedback reached the page unescaped"
    );
    let data = embedded_data(&html);
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(site.join("data.json")).unwrap()).unwrap();
    assert_eq!(data, on_disk);
    let versions: Vec<(&str, &str)> = data["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        versions,
        [("policy-run2", "candidate"), ("policy-run1", "production")]
    );
    assert_eq!(data["versions"][0]["parent"], "policy-run1");
    assert_eq!(data["versions"][0]["examples"]["pairs"], 30);
    assert_eq!(data["versions"][0]["gates"][0]["status"], "pass");
    assert!(data["versions"][1]["gates"].is_null(), "run1 has no report");
    assert_eq!(
        data["curves"]["policy-run2"]["loss"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    assert_eq!(
        data["retrain"]["workflow_url"],
        "https://github.com/acme/assistant/actions/workflows/rlhf.yml"
    );
    assert_eq!(data["retrain"]["button"], false);
    // KPIs per version and day, from the bot's store after the pull.
    let kpis = data["kpis"].as_array().unwrap();
    let day = |v: &str, d: &str| {
        kpis.iter()
            .find(|k| k["model_version"] == v && k["day"] == d)
            .unwrap_or_else(|| panic!("no KPI row for {v} on {d}: {kpis:?}"))
    };
    assert_eq!(
        day("policy-run1", "2026-12-02")["positive_rate"]["estimate"],
        0.0
    );
    assert_eq!(day(HOSTILE, "2026-12-03")["positive_rate"]["estimate"], 1.0);
    let interval = &day(HOSTILE, "2026-12-03")["positive_rate"];
    assert!(
        interval["low"].as_f64().unwrap() < 1.0,
        "a one-vote day has a wide interval"
    );
}

#[test]
fn the_live_dashboard_needs_the_read_token_and_retrains_through_github() {
    let ws = Workspace::new();
    // Without a dispatch token: a link, and the retrain endpoint says what is missing.
    let config = setup(&ws, "");
    let (_svc, url) = start(&config, false);
    let c = reqwest::blocking::Client::new();
    let r = c.get(format!("{url}/dashboard")).send().unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let r = c
        .get(format!("{url}/dashboard"))
        .header("authorization", basic(WRITE))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "the write key cannot read the dashboard");
    let r = c
        .get(format!("{url}/dashboard"))
        .header("authorization", basic(READ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let data = embedded_data(&r.text().unwrap());
    assert_eq!(data["live"], true);
    assert_eq!(data["retrain"]["button"], false);
    let r = c
        .post(format!("{url}/dashboard/retrain"))
        .bearer_auth(READ)
        .send()
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().unwrap().contains("dashboard.dispatch_token_env"));
    drop(_svc);

    // With a dispatch token, against GitHub's OpenAPI description.
    let Some(prism) = crate::forge_contract::github_prism() else {
        return;
    };
    let config = setup(
        &ws,
        &format!(
            "  dispatch_token_env: DASH_DISPATCH\n  api_url: http://127.0.0.1:{}\n",
            prism.port
        ),
    );
    let (_svc, url) = start(&config, true);
    let r = c
        .get(format!("{url}/dashboard"))
        .bearer_auth(READ)
        .send()
        .unwrap();
    assert_eq!(embedded_data(&r.text().unwrap())["retrain"]["button"], true);
    let r = c
        .post(format!("{url}/dashboard/retrain"))
        .header("origin", "https://evil.example")
        .header("authorization", basic(READ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403, "a cross-site POST must not start a run");
    let r = c.post(format!("{url}/dashboard/retrain")).send().unwrap();
    assert_eq!(r.status(), 401);
    let host = url.trim_start_matches("http://");
    let r = c
        .post(format!("{url}/dashboard/retrain"))
        .header("origin", format!("http://{host}"))
        .header("authorization", basic(READ))
        .send()
        .unwrap();
    let status = r.status();
    let body: Value = r.json().unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["dispatched"], true);
    drop(prism);
}

#[test]
fn the_dashboard_draws_in_chromium_and_keeps_hostile_text_as_text() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let Some(prism) = crate::forge_contract::github_prism() else {
        return;
    };
    let ws = Workspace::new();
    let config = setup(
        &ws,
        &format!(
            "  dispatch_token_env: DASH_DISPATCH\n  api_url: http://127.0.0.1:{}\n",
            prism.port
        ),
    );
    let (_svc, url) = start(&config, true);
    write_feedback(&url);
    // A team member signs in with the read token as the password (Basic auth); the browser
    // then sends it with the page's own "Retrain now" request too.
    let host = url.trim_start_matches("http://");
    browser.go(&format!("http://team:{READ}@{host}/dashboard"));
    let script = |js: &str| {
        browser.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": js, "args": []}),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while script("return document.body.dataset.ready === 'true';") != json!(true) {
        assert!(Instant::now() < deadline, "the page script never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = script(
        "return {
            title: document.title,
            injected: document.querySelectorAll('img, b').length,
            legend: [...document.querySelectorAll('#kpis .legend li')].map(li => li.textContent),
            rows: document.querySelectorAll('#versions tbody tr').length,
            paths: document.querySelectorAll('svg path').length,
            compare: [...document.querySelectorAll('#compare-out th')].map(th => th.textContent),
        };",
    );
    assert_eq!(seen["title"], "rlhf-bot dashboard", "{seen}");
    assert_eq!(seen["injected"], 0, "feedback text became markup: {seen}");
    assert!(
        seen["legend"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == HOSTILE),
        "the hostile version should be shown as text: {seen}"
    );
    assert_eq!(seen["rows"], 2, "{seen}");
    assert!(
        seen["paths"].as_u64().unwrap() >= 3,
        "two KPI lines and the training curve: {seen}"
    );
    assert_eq!(seen["compare"][1], "policy-run1", "{seen}");
    assert_eq!(seen["compare"][2], "policy-run2", "{seen}");
    let shot = crate::common::repo().join("target/test-outputs/dashboard.png");
    browser.screenshot(&shot);
    // "Retrain now" from the page itself, through GitHub's description.
    let button = script("return document.getElementById('retrain') !== null;");
    assert_eq!(button, json!(true));
    let el = browser.call(
        reqwest::Method::POST,
        "/element",
        json!({"using": "css selector", "value": "#retrain"}),
    );
    browser.click(&crate::widget_browser::element_id(&el));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = script("return document.getElementById('retrain-result').textContent;");
        if result == json!("workflow dispatched") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retrain never answered: {result}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(prism);
}
