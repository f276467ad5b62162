//! Feedback service benchmark, against the release `rlhf-bot serve` on loopback:
//! 1. acknowledged single-record writes per second, and their p50/p99 latency, from `CLIENTS`
//!    concurrent clients (default 64) for `DURATION` seconds (default 10);
//! 2. the same with batches of `BATCH` records (default 500) from `BATCH_CLIENTS` clients
//!    (default 8): records per second;
//! 3. `rlhf-bot pull` of `PULL_RECORDS` records (default 1,000,000; the service is topped up with
//!    batches first) into a fresh store: wall and CPU time, peak memory.
//!
//! Each step runs once per storage backend in `BACKENDS` (default `sqlite,postgres`). PostgreSQL
//! is the database at `BENCH_POSTGRES_URL`, or else a throwaway local server started like the
//! tests' (Debian's `postgresql`; skipped with a message when absent).
//!
//! Run: `cargo bench --bench serve`. The service, the clients and the puller share the machine,
//! as they would on a small host; say the core count next to any number.

#[path = "../tests/it/child_usage.rs"]
mod child_usage;
#[allow(dead_code)]
#[path = "../tests/it/postgres_server.rs"]
mod postgres_server;
#[path = "common/records.rs"]
mod records;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const READ: &str = "bench-read-token-0000000001";
const WRITE: &str = "bench-write-key-00000000001";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs `clients` loops posting what `body(n)` makes until `seconds` pass; returns
/// (acknowledged requests, sorted latencies).
async fn load(
    url: &str,
    clients: usize,
    seconds: f64,
    next: Arc<AtomicUsize>,
    per_request: usize,
) -> (usize, Vec<Duration>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.to_string(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let first = next.fetch_add(per_request, Ordering::Relaxed);
                    let body = if per_request == 1 {
                        records::feedback_record(first)
                    } else {
                        let items: Vec<String> = (first..first + per_request)
                            .map(records::feedback_record)
                            .collect();
                        format!("{{\"data\":[{}]}}", items.join(","))
                    };
                    let started = Instant::now();
                    let r = client
                        .post(format!("{url}/v1/feedback"))
                        .bearer_auth(WRITE)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status().is_success()
                        && r.bytes().await.is_ok()
                    {
                        latencies.push(started.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (all.len(), all)
}

fn main() {
    let backends = std::env::var("BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    // Kept until the end: dropping it (closing its guard pipe at exit) stops the server.
    let mut local_postgres = None;
    for backend in backends.split(',').map(str::trim) {
        let database = match backend {
            "sqlite" => None,
            "postgres" => match std::env::var("BENCH_POSTGRES_URL") {
                Ok(url) => Some(url),
                Err(_) => {
                    let bin = postgres_server::bin_dir();
                    if !bin.join("initdb").exists() {
                        println!(
                            "postgres: skipped (no PostgreSQL at {}; set BENCH_POSTGRES_URL or install postgresql)",
                            bin.display()
                        );
                        continue;
                    }
                    let server =
                        local_postgres.get_or_insert_with(|| postgres_server::PgServer::start(bin));
                    Some(server.fresh_database())
                }
            },
            other => panic!("BACKENDS lists {other:?}; expected sqlite and/or postgres"),
        };
        println!("backend: {backend}");
        bench_backend(database);
    }
}

/// The three steps against one service; `postgres`: its database URL (`None`: SQLite).
fn bench_backend(postgres: Option<String>) {
    let clients = env_usize("CLIENTS", 64);
    let seconds = env_usize("DURATION", 10) as f64;
    let batch = env_usize("BATCH", 500);
    let batch_clients = env_usize("BATCH_CLIENTS", 8);
    let pull_records = env_usize("PULL_RECORDS", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bench.yaml");
    std::fs::write(
        &cfg,
        format!(
            "feedback:\n  source: http\n  url: http://127.0.0.1:9/\n  token_env: BENCH_READ\n  page_size: 1000\nstore:\n  dir: {store}\nserver:\n  listen: 127.0.0.1:0\n  database: {db}\n  read_token_env: BENCH_READ\n  write_key_env: BENCH_WRITE\n  max_body_bytes: 67108864\n",
            store = dir.path().join("store").display(),
            db = postgres.unwrap_or_else(|| dir.path().join("service.sqlite3").display().to_string()),
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_rlhf-bot");
    let mut server = Command::new(bin)
        .env("BENCH_READ", READ)
        .env("BENCH_WRITE", WRITE)
        .args(["-q", "--config"])
        .arg(&cfg)
        .arg("serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting rlhf-bot serve");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("feedback service listening on ")
        .expect("the service's first line")
        .to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let (n, lat) = rt.block_on(load(&url, clients, seconds, next.clone(), 1));
    println!(
        "single records  {clients} clients: {:.0} acknowledged writes/s, p50 {:.1} ms, p99 {:.1} ms",
        n as f64 / seconds,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    let (n, lat) = rt.block_on(load(&url, batch_clients, seconds, next.clone(), batch));
    println!(
        "batches of {batch}  {batch_clients} clients: {:.0} acknowledged records/s ({:.1} requests/s), p50 {:.1} ms, p99 {:.1} ms",
        (n * batch) as f64 / seconds,
        n as f64 / seconds,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    // Top up to the pull size (not timed), then pull everything into a fresh store.
    let client = reqwest::blocking::Client::new();
    while next.load(Ordering::Relaxed) < pull_records {
        let first = next.fetch_add(1000, Ordering::Relaxed);
        let items: Vec<String> = (first..first + 1000)
            .map(records::feedback_record)
            .collect();
        let r = client
            .post(format!("{url}/v1/feedback"))
            .bearer_auth(WRITE)
            .header("content-type", "application/json")
            .body(format!("{{\"data\":[{}]}}", items.join(",")))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "top-up failed: {}", r.status());
    }
    let held = next.load(Ordering::Relaxed);
    let started = Instant::now();
    let usage = child_usage::wait_with_usage(
        Command::new(bin)
            .env("BENCH_READ", READ)
            .args(["-q", "--config"])
            .arg(pull_config(dir.path(), &cfg, &url))
            .arg("pull")
            .spawn()
            .unwrap(),
    );
    assert!(usage.success(), "pull failed");
    println!(
        "pull            {held} records: {:.2} s wall, {:.2} s CPU, peak RSS {:.0} MiB",
        started.elapsed().as_secs_f64(),
        usage.cpu_seconds,
        usage.peak_rss_bytes as f64 / 1048576.0
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// Writes the pull's config (the bench config pointed at the service) and returns its path.
fn pull_config(dir: &std::path::Path, from: &std::path::Path, url: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(from)
        .unwrap()
        .replace("http://127.0.0.1:9/", &format!("{url}/"));
    let path = dir.join("pull.yaml");
    std::fs::write(&path, text).unwrap();
    path
}
