//! The feedback widget in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! installed by scripts/install-test-deps.sh), driven over the W3C WebDriver protocol: a user
//! opens `/demo` of `rlhf-bot serve --demo`, clicks and types, and `rlhf-bot pull` then stores
//! exactly what they did. A screenshot of the page is saved under `target/test-outputs/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{Workspace, bin, free_port, stderr};

const READ: &str = "browser-read-token-000001";
const WRITE: &str = "browser-write-key-000001";
/// The WebDriver key code for Enter and Tab.
const ENTER: &str = "\u{E007}";
const TAB: &str = "\u{E004}";

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal W3C WebDriver client over chromedriver.
pub(crate) struct Browser {
    http: reqwest::blocking::Client,
    session: String,
    _driver: Killed,
}

impl Browser {
    pub(crate) fn start() -> Option<Browser> {
        let (chromium, driver) = (
            Path::new("/usr/bin/chromium"),
            Path::new("/usr/bin/chromedriver"),
        );
        if !crate::common::have(chromium, "chromium")
            || !crate::common::have(driver, "chromedriver")
        {
            return None;
        }
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let driver = Killed(child);
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{base}/status")).send().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1400"]
            }
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        Some(Browser {
            http,
            session: format!("{base}/session/{session}"),
            _driver: driver,
        })
    }

    pub(crate) fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r: Value = self
            .http
            .request(method, format!("{}{path}", self.session))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert!(r["value"].get("error").is_none(), "{path}: {r}");
        r["value"].clone()
    }

    pub(crate) fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}));
    }

    /// The id of the element `css` inside the shadow root of the `n`-th widget.
    fn in_widget(&self, n: usize, css: &str) -> String {
        let hosts = self.call(
            reqwest::Method::POST,
            "/elements",
            json!({"using": "css selector", "value": "rlhf-feedback"}),
        );
        let host = element_id(&hosts[n]);
        let shadow = self.call(
            reqwest::Method::GET,
            &format!("/element/{host}/shadow"),
            json!({}),
        );
        let shadow_id = shadow
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        let el = self.call(
            reqwest::Method::POST,
            &format!("/shadow/{shadow_id}/element"),
            json!({"using": "css selector", "value": css}),
        );
        element_id(&el)
    }

    pub(crate) fn click(&self, element: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        );
    }

    fn type_into(&self, element: &str, text: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({"text": text}),
        );
    }

    /// Presses keys on whatever has focus, as a keyboard user does.
    fn press(&self, keys: &[&str]) {
        let actions: Vec<Value> = keys
            .iter()
            .flat_map(|k| {
                [
                    json!({"type": "keyDown", "value": k}),
                    json!({"type": "keyUp", "value": k}),
                ]
            })
            .collect();
        self.call(
            reqwest::Method::POST,
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        );
    }

    fn focused_label(&self) -> String {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": "const w = document.activeElement; const f = w && w.shadowRoot && w.shadowRoot.activeElement; return f ? f.getAttribute('aria-label') : null;", "args": []}),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    pub(crate) fn screenshot(&self, to: &Path) {
        let png = self.call(reqwest::Method::GET, "/screenshot", json!({}));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.session).send();
    }
}

pub(crate) fn element_id(v: &Value) -> String {
    v.as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("not an element: {v}"))
        .to_string()
}

fn start_demo(ws: &Workspace) -> (Killed, String, PathBuf) {
    let config = ws.write_config(&format!(
        "feedback:\n  source: http\n  url: http://127.0.0.1:9/\n  token_env: DEMO_READ\n\
         store:\n  dir: {}\n\
         server:\n  listen: 127.0.0.1:0\n  database: {}\n  read_token_env: DEMO_READ\n  write_key_env: DEMO_WRITE\n",
        ws.store_dir().display(),
        ws.path().join("service.sqlite3").display()
    ));
    let mut cmd = bin();
    cmd.env("DEMO_READ", READ)
        .env("DEMO_WRITE", WRITE)
        .arg("--config")
        .arg(&config)
        .args(["serve", "--demo"]);
    let (child, url) = crate::serve::spawn_service(cmd);
    (Killed(child), url, config)
}

/// The service's records, by id, once `want` of them are there (the widget sends in the
/// background).
fn served(url: &str, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let c = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = c
            .get(format!("{url}/v1/feedback"))
            .bearer_auth(READ)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let rows = page["data"].as_array().unwrap().clone();
        if want(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "the widget's records never arrived: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pull(ws: &Workspace, config: &Path, url: &str) -> Value {
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace("http://127.0.0.1:9/", &format!("{url}/"));
    let o = bin()
        .env("DEMO_READ", READ)
        .arg("--config")
        .arg(ws.write_config(&text))
        .args(["--format", "json", "pull"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn find<'a>(rows: &'a [Value], id_suffix: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["id"].as_str().is_some_and(|id| id.ends_with(id_suffix)))
}

#[test]
fn a_user_gives_feedback_in_the_demo_page_and_pull_stores_exactly_that() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let ws = Workspace::new();
    let (_service, url, config) = start_demo(&ws);
    browser.go(&format!("{url}/demo"));

    // Mouse: a thumb, a step thumb, a rating, an aspect rating, a comment.
    browser.click(&browser.in_widget(0, r#"[aria-label="Thumb up for this answer"]"#));
    browser.click(&browser.in_widget(0, r#"[aria-label^="Thumb down for step 1"]"#));
    browser.click(&browser.in_widget(0, r#"[aria-label="Rate 4 of 5"]"#));
    browser.click(&browser.in_widget(0, r#"[aria-label="Rate accuracy 5 of 5"]"#));
    let comment = browser.in_widget(0, "textarea");
    browser.type_into(&comment, "Cite the EU CBAM text, please.");
    browser.click(&browser.in_widget(0, r#"[aria-label^="Send the comment"]"#));
    let rows = served(&url, |rows| {
        rows.len() >= 4 && find(rows, ":thumb").is_some_and(|t| t["comment"].is_string())
    });
    browser.screenshot(&crate::common::repo().join("target/test-outputs/demo.png"));
    let first = pull(&ws, &config, &url);
    assert_eq!(first["inserted"], 4, "{first}");
    assert_eq!(find(&rows, ":thumb").unwrap()["thumb"], "up");
    assert_eq!(find(&rows, ":step:0").unwrap()["thumb"], "down");
    assert_eq!(find(&rows, ":rating").unwrap()["rating"], 4);
    let aspect = find(&rows, ":aspect:accuracy").unwrap();
    assert_eq!(
        (aspect["aspect"].as_str(), aspect["rating"].as_u64()),
        (Some("accuracy"), Some(5))
    );
    assert_eq!(
        find(&rows, ":thumb").unwrap()["comment"],
        "Cite the EU CBAM text, please."
    );
    assert!(rows.iter().all(|r| r["source"] == "end_user"));

    // The user changes their mind: the same record, edited.
    browser.click(&browser.in_widget(0, r#"[aria-label="Thumb down for this answer"]"#));
    served(&url, |rows| {
        find(rows, ":thumb").is_some_and(|t| t["thumb"] == "down")
    });
    let second = pull(&ws, &config, &url);
    assert_eq!(
        (second["updated"].as_u64(), second["inserted"].as_u64()),
        (Some(1), Some(0)),
        "{second}"
    );

    // Keyboard only, on the second answer: Enter on the thumb up, Tab to thumb down, Enter.
    let up = browser.in_widget(1, r#"[aria-label="Thumb up for this answer"]"#);
    browser.type_into(&up, ENTER);
    assert_eq!(
        browser.focused_label(),
        "Thumb up for this answer",
        "focus stays on the control after it re-renders"
    );
    browser.press(&[TAB, ENTER]);
    assert_eq!(browser.focused_label(), "Thumb down for this answer");
    let thumbs_down = |rows: &[Value]| {
        rows.iter()
            .filter(|r| r["kind"] == "thumb" && r["thumb"] == "down")
            .count()
    };
    let rows = served(&url, |rows| thumbs_down(rows) == 2);
    let third = pull(&ws, &config, &url);
    assert_eq!(third["inserted"], 1, "{third}");
    let dump = ws.dump();
    assert_eq!(dump.len(), 5, "{dump:?}");
    assert_eq!(
        rows.iter().filter(|r| r["kind"] == "thumb").count(),
        2,
        "{rows:?}"
    );
}

/// Chromium's own network emulation: `offline` fails every request the page makes.
fn set_offline(browser: &Browser, offline: bool) {
    browser.call(
        reqwest::Method::POST,
        "/chromium/network_conditions",
        json!({"network_conditions": {
            "offline": offline, "latency": 0, "download_throughput": -1, "upload_throughput": -1
        }}),
    );
}

#[test]
fn feedback_given_offline_is_queued_in_the_browser_and_sent_when_back_online() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let ws = Workspace::new();
    let (_service, url, _config) = start_demo(&ws);
    browser.go(&format!("{url}/demo"));
    set_offline(&browser, true);
    browser.click(&browser.in_widget(0, r#"[aria-label="Thumb up for this answer"]"#));
    browser.click(&browser.in_widget(0, r#"[aria-label="Rate 2 of 5"]"#));
    // Both wait in localStorage (which outlives the page), and nothing reached the service.
    let queued = |b: &Browser| {
        b.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": "return Object.keys(JSON.parse(localStorage.getItem('rlhf-feedback-queue') || '{}')).length;", "args": []}),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued(&browser) != json!(2) {
        assert!(
            Instant::now() < deadline,
            "the offline sends were not queued: {}",
            queued(&browser)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let c = reqwest::blocking::Client::new();
    let page: Value = c
        .get(format!("{url}/v1/feedback"))
        .bearer_auth(READ)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(page["data"], json!([]), "nothing can arrive while offline");
    set_offline(&browser, false);
    let rows = served(&url, |rows| rows.len() == 2);
    assert_eq!(find(&rows, ":thumb").unwrap()["thumb"], "up");
    assert_eq!(find(&rows, ":rating").unwrap()["rating"], 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued(&browser) != json!(0) {
        assert!(
            Instant::now() < deadline,
            "the queue was not emptied after the sends"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
