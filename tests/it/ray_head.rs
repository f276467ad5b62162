//! One real Ray head (PyPI `ray[default]`, installed by scripts/install-test-deps.sh into its own
//! venv, `$RLHF_TEST_DEPS/ray-venv`) for the whole test binary: CPU only, on loopback, with
//! Ray's token authentication on (`RAY_AUTH_MODE=token`), so the bearer token is checked by Ray
//! itself. Started once (a `OnceLock`); the tests share it and give their jobs distinct ids.
//!
//! Like the moto server, it runs under a shell that stops it when our end of its stdin closes,
//! i.e. when the test process exits however it exits: `ray start --block` then gets SIGTERM and
//! takes every process of this head down with it (it drains for up to 30 s first), and the
//! shell removes the head's temporary directory. Nothing else is touched: no `ray stop`, which
//! would stop every Ray process on the machine.
//!
//! Ray not installed: the tests fail, naming the install script, unless `RLHF_SKIP_RAY=1` says
//! to skip them (then each prints a loud line saying so).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::common::{deps_dir, free_port};

/// The token the head checks.
pub(crate) const TOKEN: &str = "ray-test-token-4f1c9a";

pub(crate) struct RayHead {
    port: u16,
    pub(crate) log: PathBuf,
    _shell: Child,
    _stdin: ChildStdin,
}

fn skip_requested() -> bool {
    std::env::var("RLHF_SKIP_RAY").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The shared head, or `None` when `RLHF_SKIP_RAY=1` asks to skip the Ray tests.
pub(crate) fn ray_head() -> Option<&'static RayHead> {
    static HEAD: OnceLock<Option<RayHead>> = OnceLock::new();
    let head = HEAD.get_or_init(|| {
        if skip_requested() {
            return None;
        }
        let ray = deps_dir().join("ray-venv/bin/ray");
        assert!(
            ray.exists(),
            "Ray is not installed at {}\nhint: run scripts/install-test-deps.sh, or set RLHF_SKIP_RAY=1 to skip the Ray backend's tests",
            ray.display()
        );
        // Ports outside Ray's default worker range (10002-19999), each probed free.
        let pick = || loop {
            let p = free_port();
            if p > 20_000 {
                return p;
            }
        };
        let (port, client_port, agent_port) = (pick(), pick(), pick());
        // Short: Ray puts Unix sockets under it, whose paths may not exceed 107 bytes.
        let temp = std::env::temp_dir().join(format!("rlhf-ray-{port}"));
        let log = std::env::temp_dir().join(format!("rlhf-bot-ray-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("ray log file");
        let mut shell = Command::new("sh")
            .args([
                "-c",
                r#""$0" start --head --block --port=0 --num-cpus=4 --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$1" --ray-client-server-port="$2" --dashboard-agent-listen-port="$3" --disable-usage-stats --temp-dir="$4" </dev/null & pid=$!; cat >/dev/null; kill $pid; wait $pid; rm -rf "$4""#,
            ])
            .arg(&ray)
            .arg(port.to_string())
            .arg(client_port.to_string())
            .arg(agent_port.to_string())
            .arg(&temp)
            .env("RAY_AUTH_MODE", "token")
            .env("RAY_AUTH_TOKEN", TOKEN)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .expect("starting ray");
        let stdin = shell.stdin.take().expect("ray stdin");
        let head = RayHead {
            port,
            log,
            _shell: shell,
            _stdin: stdin,
        };
        head.wait_until_serving(Duration::from_secs(180));
        Some(head)
    });
    if head.is_none() {
        eprintln!(
            "SKIPPED: RLHF_SKIP_RAY is set, so the Ray backend's tests against a real head did not run"
        );
    }
    head.as_ref()
}

impl RayHead {
    /// The dashboard URL (the Jobs API's address).
    pub(crate) fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the Jobs API answers an authenticated request.
    fn wait_until_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let ok = client
                    .get(format!("{}/api/jobs/", self.address()))
                    .bearer_auth(TOKEN)
                    .header("user-agent", "rlhf-bot-tests")
                    .send()
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the Ray head did not serve its Jobs API within {limit:?}; log {}:\n{}",
                self.log.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every job the head knows, as `GET /api/jobs/` lists them.
    pub(crate) fn jobs(&self) -> Vec<serde_json::Value> {
        reqwest::blocking::Client::new()
            .get(format!("{}/api/jobs/", self.address()))
            .bearer_auth(TOKEN)
            .header("user-agent", "rlhf-bot-tests")
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// The status Ray reports for a job; empty while the head has no such job.
    pub(crate) fn status(&self, id: &str) -> String {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}/api/jobs/{id}", self.address()))
            .bearer_auth(TOKEN)
            .header("user-agent", "rlhf-bot-tests")
            .send()
            .unwrap();
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return String::new();
        }
        let v: serde_json::Value = response.json().unwrap();
        v["status"].as_str().unwrap_or_default().to_string()
    }
}
