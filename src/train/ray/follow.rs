//! Waiting for a Ray job: its status polled with a growing pause (the doubling rule of
//! [`crate::retry::Backoff`], capped), its log passed on as new lines appear, and what a job that
//! did not succeed says: its status, Ray's message and the last lines of its log.
//!
//! The Jobs API returns the whole log on every request (no offset), so [`LogCursor`] remembers
//! how many bytes were already passed on and hands out only complete new lines; the unfinished
//! last line waits for its newline, or for the job's end.

use std::time::Duration;

use super::client::{JobInfo, JobStatus, JobsClient, RayError};
use crate::retry::Backoff;

/// Lines of the log quoted in the error of a job that did not succeed.
pub const TAIL_LINES: usize = 20;

/// What of a growing log was already passed on.
#[derive(Debug, Default, Clone)]
pub struct LogCursor {
    shown: usize,
}

impl LogCursor {
    /// The complete lines of `log` after what was already passed on (empty when none).
    pub fn new_lines<'a>(&mut self, log: &'a str) -> &'a str {
        if log.len() < self.shown || !log.is_char_boundary(self.shown) {
            // A log that shrank is not the one we were reading (the head rotated or lost it):
            // start over rather than cut a line in half.
            self.shown = 0;
        }
        let fresh = &log[self.shown..];
        let Some(end) = fresh.rfind('\n') else {
            return "";
        };
        self.shown += end + 1;
        &fresh[..=end]
    }

    /// Everything after what was already passed on, the unfinished last line included: for the
    /// end of the job, when no more is coming.
    pub fn rest<'a>(&mut self, log: &'a str) -> &'a str {
        if log.len() < self.shown || !log.is_char_boundary(self.shown) {
            self.shown = 0;
        }
        let start = self.shown;
        self.shown = log.len();
        &log[start..]
    }
}

/// The last `n` lines of a log, sanitised for a terminal.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let kept = &lines[lines.len().saturating_sub(n)..];
    crate::sanitize::terminal_block(&kept.join("\n")).into_owned()
}

/// A job that ended without succeeding.
#[derive(Debug, thiserror::Error)]
#[error(
    "Ray job `{id}` on {address} ended {status}: {message}\nlast {shown} log lines:\n{tail}\nhint: {hint}"
)]
pub struct JobDidNotSucceed {
    pub id: String,
    pub address: String,
    pub status: JobStatus,
    pub message: String,
    pub shown: usize,
    pub tail: String,
    pub hint: String,
}

impl JobDidNotSucceed {
    /// The error for `info` with the end of its `log`; `full_log` names where the whole log is.
    pub fn new(address: &str, info: &JobInfo, log: &str, full_log: &str) -> Self {
        let tail = tail(log, TAIL_LINES);
        let hint = match info.status {
            JobStatus::Stopped => format!(
                "the job was stopped (by a cancelled workflow or on the cluster); the whole log is in {full_log}. Ray keeps the submission id, so a rerun with the same run id attaches to this stopped job: start a new run"
            ),
            _ => format!(
                "the whole log is in {full_log}; fix the cause, then start a new run (a rerun with the same run id attaches to this failed job)"
            ),
        };
        Self {
            id: info.submission_id.clone(),
            address: address.to_string(),
            status: info.status,
            message: crate::sanitize::terminal_line(
                info.message.as_deref().unwrap_or("(no message)"),
            )
            .into_owned(),
            shown: tail.lines().count(),
            tail,
            hint,
        }
    }
}

/// How often to look.
#[derive(Debug, Clone, Copy)]
pub struct PollPace {
    pub first: Duration,
    pub max: Duration,
}

impl PollPace {
    /// The pause before look `n + 1`: doubling from `first`, never above `max`.
    pub fn pause(&self, n: u32) -> Duration {
        let doubling = Backoff {
            max_attempts: u32::MAX,
            first_wait: self.first,
        };
        doubling.wait_after(n).min(self.max)
    }
}

/// Polls the job until it ends, passing each batch of new log lines to `on_lines`, and returns
/// its last status and whole log. The pause grows while nothing changes and starts again from
/// `pace.first` when the status changes.
pub async fn until_done(
    client: &JobsClient,
    id: &str,
    pace: PollPace,
    mut on_lines: impl FnMut(&str),
) -> Result<(JobInfo, String), RayError> {
    let mut cursor = LogCursor::default();
    let mut last_status = None;
    let mut n = 0u32;
    loop {
        let info = client.status(id).await?;
        let log = client.logs(id).await?;
        if info.status.is_terminal() {
            let rest = cursor.rest(&log);
            if !rest.is_empty() {
                on_lines(rest);
            }
            return Ok((info, log));
        }
        let lines = cursor.new_lines(&log);
        if !lines.is_empty() {
            on_lines(lines);
        }
        if last_status != Some(info.status) {
            tracing::info!(job = id, status = %info.status, "Ray job");
            last_status = Some(info.status);
            n = 0;
        }
        n += 1;
        tokio::time::sleep(pace.pause(n)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_hands_out_each_complete_line_once() {
        let mut c = LogCursor::default();
        assert_eq!(c.new_lines("a\nb"), "a\n");
        assert_eq!(c.new_lines("a\nb"), "");
        assert_eq!(c.new_lines("a\nbc\nd\n"), "bc\nd\n");
        assert_eq!(c.rest("a\nbc\nd\ne"), "e");
        assert_eq!(c.rest("a\nbc\nd\ne"), "");
        // A log that shrank starts over.
        assert_eq!(c.new_lines("x\n"), "x\n");
        let mut c = LogCursor::default();
        assert_eq!(c.rest("p\nq"), "p\nq");
    }

    #[test]
    fn the_tail_keeps_the_last_lines_and_defuses_them() {
        let log: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let t = tail(&log, 3);
        assert_eq!(t, "line 28\nline 29\nline 30");
        assert!(!tail("::set-output name=x::y\n", 5).starts_with("::"));
    }

    #[test]
    fn the_pace_doubles_up_to_its_cap() {
        let pace = PollPace {
            first: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let pauses: Vec<u64> = (1..=5).map(|n| pace.pause(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 5, 5]);
    }
}
