//! A Stoplight Prism process (npm `@stoplight/prism-cli`, installed by
//! scripts/install-test-deps.sh) for contract tests: `mock` answers from an OpenAPI document and
//! checks requests against it; `proxy` forwards to a real server and checks both the requests
//! and the server's responses. A violation shows in the `sl-violations` response header.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::free_port;

/// A Prism process (in its own process group) that is stopped when dropped.
pub struct Prism {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Prism {
    /// `prism mock SPEC`, ready to answer.
    pub fn mock(deps: &Path, spec: &Path) -> Prism {
        Self::start(deps, &["mock".as_ref(), spec.as_os_str()])
    }

    /// `prism proxy SPEC UPSTREAM`, ready to answer.
    pub fn proxy(deps: &Path, spec: &Path, upstream: &str) -> Prism {
        Self::start(
            deps,
            &["proxy".as_ref(), spec.as_os_str(), upstream.as_ref()],
        )
    }

    fn start(deps: &Path, args: &[&std::ffi::OsStr]) -> Prism {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("rlhf-bot-prism-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("prism log file");
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(deps.join("node_modules/.bin/prism"))
                .args(&args[..1])
                .args(["--host", "127.0.0.1", "-p", &port.to_string()])
                .args(&args[1..])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log handle"))
                .stderr(log_file),
            0,
        )
        .spawn()
        .expect("starting prism");
        let mut prism = Prism { child, port, log };
        prism.wait_ready();
        prism
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "prism exited ({status}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "prism did not answer within 180 s; log: {}",
            self.log.display()
        );
    }
}

impl Drop for Prism {
    fn drop(&mut self) {
        // Prism is a node process that may spawn helpers: end its whole group, by id.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
