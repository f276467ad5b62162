//! One moto S3 server (PyPI `moto[server]`, from scripts/install-test-deps.sh) for the whole test
//! binary; each test uses its own bucket. `moto()` is `None` (the test prints "skipped") when
//! moto is not installed, unless the test assets are required (CI).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rlhf_bot::artifacts::BucketStore;

use super::common::{deps_dir, free_port, have};

const AUTH: &str = "AWS4-HMAC-SHA256 Credential=testing/20261127/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";

/// A moto server for this test process. It runs under a shell that kills it when our end of its
/// stdin closes, which happens when the test process exits however it exits: a static is never
/// dropped, so a `Drop` impl could not stop it.
pub(crate) struct Moto {
    port: u16,
    log: PathBuf,
    _shell: Child,
    _stdin: ChildStdin,
}

pub(crate) fn moto() -> Option<&'static Moto> {
    static MOTO: OnceLock<Option<Moto>> = OnceLock::new();
    MOTO.get_or_init(|| {
        let server = deps_dir().join("venv/bin/moto_server");
        if !have(&server, "moto_server") {
            return None;
        }
        let port = free_port();
        let log = std::env::temp_dir().join(format!("rlhf-bot-moto-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("moto log file");
        let mut shell = Command::new("sh")
            .args([
                "-c",
                r#""$0" -H 127.0.0.1 -p "$1" </dev/null & pid=$!; cat >/dev/null; kill $pid; wait $pid"#,
            ])
            .arg(&server)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .expect("starting moto_server");
        let stdin = shell.stdin.take().expect("moto stdin");
        let deadline = Instant::now() + Duration::from_secs(90);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within 90 s; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(Moto {
            port,
            log,
            _shell: shell,
            _stdin: stdin,
        })
    })
    .as_ref()
}

impl Moto {
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One unsigned HTTP/1.1 request; returns the status and body.
    pub(crate) fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: {AUTH}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head}"));
        (status, raw[split + 4..].to_vec())
    }

    pub(crate) fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), b"");
        assert_eq!(
            status,
            200,
            "creating bucket {bucket}: {}; log {}",
            String::from_utf8_lossy(&body),
            self.log.display()
        );
    }

    pub(crate) fn exists(&self, bucket: &str, key: &str) -> bool {
        match self.request("HEAD", &format!("/{bucket}/{key}"), b"").0 {
            200 => true,
            404 => false,
            other => panic!("HEAD /{bucket}/{key}: status {other}"),
        }
    }

    /// The environment `rlhf-bot` reads to reach this server.
    pub(crate) fn env(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// A store on a fresh bucket `bucket`, under the prefix `models`.
    pub(crate) fn store(&self, bucket: &str, cache: &Path) -> BucketStore {
        self.create_bucket(bucket);
        let url = url::Url::parse(&format!("s3://{bucket}/models")).unwrap();
        let options = self.env().map(|(k, v)| (k.to_ascii_lowercase(), v));
        BucketStore::with_options(&url, options, cache).expect("bucket store")
    }
}

impl Moto {
    /// The object's bytes, or `None` when it does not exist.
    pub(crate) fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        match self.request("GET", &format!("/{bucket}/{key}"), b"") {
            (200, body) => Some(body),
            (404, _) => None,
            (other, body) => panic!(
                "GET /{bucket}/{key}: status {other}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// The keys under `prefix`, sorted (ListObjectsV2; fine for the few objects of a test).
    pub(crate) fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = self.request(
            "GET",
            &format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"),
            b"",
        );
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "listing /{bucket}/{prefix}: {text}");
        let mut keys: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect();
        keys.sort();
        keys
    }
}
