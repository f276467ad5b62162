//! Waiting for a child process together with its resource usage (peak RSS, CPU time), read with
//! `wait4` so the numbers are that child's alone: `getrusage(RUSAGE_CHILDREN)` would mix in every
//! child the other tests of this binary run in parallel. Shared with benches/pull.rs through
//! `#[path]`.
#![allow(unsafe_code)]
#![allow(dead_code)]

use std::process::Child;

/// How a child ended and what it used.
#[derive(Debug, Clone, Copy)]
pub struct ChildUsage {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// Peak resident set size in bytes (`ru_maxrss`).
    pub peak_rss_bytes: u64,
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
}

impl ChildUsage {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Waits for `child` to end (reaping it) and returns its usage. Take its piped output first, or
/// read it on another thread, if the child could fill a pipe.
pub fn wait_with_usage(child: Child) -> ChildUsage {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped; status and usage point to live locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    // Already reaped: `Child` must not wait for it again (dropping it does not).
    drop(child);
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    ChildUsage {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    }
}
