//! Pull benchmark: 1,000,000 feedback records from a loopback API into a fresh store, then
//! `check` over that store. Runs the release binary as a child process so its peak RSS is the
//! pull's alone (read with wait4). Run: `cargo bench --bench pull` (RECORDS=N to change the size).

#[path = "../tests/it/child_usage.rs"]
mod child_usage;
#[path = "../tests/it/feedback_server.rs"]
mod feedback_server;
#[path = "common/records.rs"]
mod records;

use std::process::Command;
use std::time::{Duration, Instant};

use feedback_server::{Records, TOKEN};

/// Runs a command and returns (wall seconds, peak RSS in MiB, CPU seconds, success).
fn measure(cmd: &mut Command) -> (f64, f64, f64, bool) {
    let started = Instant::now();
    let usage = child_usage::wait_with_usage(cmd.spawn().expect("spawning rlhf-bot"));
    (
        started.elapsed().as_secs_f64(),
        usage.peak_rss_bytes as f64 / (1024.0 * 1024.0),
        usage.cpu_seconds,
        usage.success(),
    )
}

fn main() {
    let count: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = feedback_server::start(
        Records::Generated {
            count,
            make: Box::new(records::feedback_record),
        },
        Duration::ZERO,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bench.yaml");
    std::fs::write(
        &cfg,
        format!(
            "feedback:\n  source: http\n  url: {}\n  token_env: BENCH_TOKEN\n  page_size: 1000\nstore:\n  dir: {}\nthresholds:\n  min_new_feedback: 1000\n",
            server.url(),
            dir.path().join("store").display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_rlhf-bot");
    let base = || {
        let mut c = Command::new(bin);
        c.env("BENCH_TOKEN", TOKEN)
            .arg("--config")
            .arg(&cfg)
            .arg("-q");
        c
    };
    let (pull_s, pull_rss, pull_cpu, ok) = measure(base().arg("pull"));
    assert!(ok, "pull failed");
    let (check_s, check_rss, check_cpu, ok) = measure(
        base()
            .args(["--format", "json", "check"])
            .stdout(std::process::Stdio::null()),
    );
    assert!(ok, "check failed");
    let (again_s, _, _, ok) = measure(base().arg("pull").stdout(std::process::Stdio::null()));
    assert!(ok, "second pull failed");
    let db = std::fs::metadata(dir.path().join("store/feedback.sqlite3"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("records            {count}");
    println!(
        "pull               {pull_s:.2} s wall, {pull_cpu:.2} s CPU, peak RSS {pull_rss:.0} MiB ({:.0} records/s)",
        count as f64 / pull_s
    );
    println!(
        "check              {check_s:.2} s wall, {check_cpu:.2} s CPU, peak RSS {check_rss:.0} MiB"
    );
    println!("second pull (noop) {again_s:.2} s");
    println!("store size         {:.0} MiB", db as f64 / 1048576.0);
}
