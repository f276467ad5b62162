//! Helpers shared by the integration tests: temporary workspaces with a config file, and running
//! the real `rlhf-bot` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rlhf_bot::feedback::Store;

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn store_dir(&self) -> PathBuf {
        self.path().join("store")
    }
    /// Writes a config pointing at an HTTP feedback API.
    pub fn http_config(&self, url: &str, extra: &str) -> PathBuf {
        self.write_config(&format!(
            "feedback:\n  source: http\n  url: {url}\n  token_env: TEST_FEEDBACK_TOKEN\n  page_size: 100\n  timeout_secs: 2\n  max_attempts: 5\nstore:\n  dir: {}\n{extra}",
            self.store_dir().display()
        ))
    }
    /// The test config (`configs/tiny.yaml`: the bundled sample, tiny models from scratch) with
    /// its store, reports and would-be PR moved inside this workspace, as text.
    pub fn sample_config_text(&self) -> String {
        self.shipped_config_text("tiny.yaml", ".rlhf/tiny")
    }

    /// A config shipped in `configs/` (its store at `store_dir`) with the sample feedback, the
    /// store, the reports and the would-be PR moved inside this workspace, as text.
    pub fn shipped_config_text(&self, name: &str, store_dir: &str) -> String {
        std::fs::read_to_string(repo().join("configs").join(name))
            .unwrap()
            .replace(
                "configs/sample-feedback.jsonl",
                &repo()
                    .join("configs/sample-feedback.jsonl")
                    .display()
                    .to_string(),
            )
            .replace(store_dir, &self.store_dir().display().to_string())
            .replace(
                "dir: reports",
                &format!("dir: {}", self.path().join("reports").display()),
            )
            .replace(
                "local_dir: out/pr",
                &format!("local_dir: {}", self.path().join("pr").display()),
            )
    }

    /// [`Self::sample_config_text`] written to the workspace.
    pub fn sample_config(&self) -> PathBuf {
        self.write_config(&self.sample_config_text())
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path().join("rlhf.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }
    pub fn store(&self) -> Store {
        Store::open(&self.store_dir()).unwrap()
    }
    /// The store's records as `store dump` writes them.
    pub fn dump(&self) -> Vec<String> {
        let mut lines = Vec::new();
        self.store()
            .for_each_json(|l| {
                lines.push(l.to_string());
                Ok(())
            })
            .unwrap();
        lines
    }
}

pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rlhf-bot"));
    cmd.env("TEST_FEEDBACK_TOKEN", crate::feedback_server::TOKEN)
        .env("RLHF_BOT_BACKOFF_MS", "10")
        .env_remove("GITHUB_OUTPUT")
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("RUST_LOG");
    cmd
}

pub fn run(config: &Path, args: &[&str]) -> Output {
    bin()
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `run --force --format json` with the clock at `now` (RFC 3339), as a user's forced run; panics
/// with stderr when it fails, and returns the whole JSON (`pull`, `check`, `run`).
pub fn forced_run_json(config: &Path, now: &str) -> serde_json::Value {
    forced_run_with(bin(), config, now).0
}

/// [`forced_run_json`] with a command the caller prepared (extra environment).
pub fn forced_run_json_with(cmd: Command, config: &Path, now: &str) -> serde_json::Value {
    forced_run_with(cmd, config, now).0
}

/// [`forced_run_json`] with extra environment variables; also returns the log (stderr).
pub fn forced_run_logged(
    config: &Path,
    now: &str,
    env: &[(&str, &str)],
) -> (serde_json::Value, String) {
    let mut cmd = bin();
    cmd.envs(env.iter().copied());
    forced_run_with(cmd, config, now)
}

/// The forced run itself, on a prepared command: its JSON and its log (stderr).
fn forced_run_with(mut cmd: Command, config: &Path, now: &str) -> (serde_json::Value, String) {
    let o = cmd
        .env("RLHF_BOT_NOW", now)
        .arg("--config")
        .arg(config)
        .args(["--format", "json", "run", "--force"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let json = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    (json, stderr(&o))
}

/// `export --out dir`, then the preference lines of both splits that carry a `source`: the
/// pairs made by AI (constitution, AI feedback).
pub fn exported_ai_pairs(config: &Path, dir: &Path) -> Vec<serde_json::Value> {
    let o = run(config, &["export", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    ["preference.train.jsonl", "preference.eval.jsonl"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .filter(|l| l.get("source").is_some())
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The repository root (the tests run from it, but say so explicitly).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Largest absolute element-wise difference of two f32 tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Where scripts/install-test-deps.sh puts the test tools (Prism, actionlint, moto).
pub fn deps_dir() -> PathBuf {
    match std::env::var_os("RLHF_TEST_DEPS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/rlhf-bot/test-deps"),
    }
}

/// `true` when the tool is there; otherwise prints the skip line (or fails when required).
pub fn have(tool: &Path, what: &str) -> bool {
    if tool.exists() {
        return true;
    }
    // scripts/test.sh sets RLHF_REQUIRE_TEST_ASSETS in CI; RLHF_REQUIRE_TEST_DEPS=1 does the same.
    let flag =
        |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    let required = flag("RLHF_REQUIRE_TEST_DEPS") || flag("RLHF_REQUIRE_TEST_ASSETS");
    assert!(
        !required,
        "{what} missing at {} and the tests are required here (CI): run scripts/install-test-deps.sh",
        tool.display()
    );
    eprintln!(
        "skipped: run scripts/install-test-deps.sh ({what} not found at {})",
        tool.display()
    );
    false
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Serves `app` on a loopback port from a thread of its own (a current-thread runtime, so the
/// test's blocking calls never starve it); returns its base URL.
pub fn serve_on_thread(app: axum::Router) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    url
}
