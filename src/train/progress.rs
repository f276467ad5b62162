//! Training progress for people: an indicatif bar when stderr is a terminal, and otherwise (CI
//! logs, a pipe, a file) one plain line every N steps, so a GitHub Actions log stays readable and
//! never fills with carriage-return redraws (GUIDE §3.6). The first step and any step after
//! [`QUIET_LIMIT`] without a line also get one: a run whose steps take minutes still shows
//! that it is alive, and how fast it goes, from its first step on.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Longest stretch without a progress line when stderr is not a terminal.
pub const QUIET_LIMIT: Duration = Duration::from_secs(30);

/// What one optimiser step reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub lr: f64,
    /// Tokens processed by this step (for tokens/s).
    pub tokens: u64,
}

/// Reports steps either to a bar or to the log.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    every: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    first_step: u64,
    tokens: u64,
    last_line: Instant,
}

impl Progress {
    /// `total` steps in the run, `first_step` where a resumed run starts, a log line every
    /// `every` steps when not on a terminal. `quiet` turns the bar off (tests, `--quiet`).
    pub fn new(total: u64, first_step: u64, every: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(first_step);
            bar
        });
        Self {
            total,
            every: every.max(1),
            bar,
            started: Instant::now(),
            first_step,
            tokens: 0,
            last_line: Instant::now(),
        }
    }

    /// Records a finished step.
    pub fn step(&mut self, r: StepReport) {
        self.tokens += r.tokens;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let tok_s = self.tokens as f64 / elapsed;
        let done = r.step + 1;
        let msg = format!(
            "loss {:.4} acc {:.3} lr {:.2e} {:.0} tok/s",
            r.loss, r.accuracy, r.lr, tok_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(msg);
            }
            None if done.is_multiple_of(self.every)
                || done == self.total
                || r.step == self.first_step
                || self.last_line.elapsed() >= QUIET_LIMIT =>
            {
                let eta = self.eta(done);
                tracing::info!("step {done}/{} {msg} eta {}s", self.total, eta.as_secs());
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    /// Time left at the mean pace of the steps run by this process.
    pub fn eta(&self, done: u64) -> Duration {
        let run = done.saturating_sub(self.first_step);
        if run == 0 {
            return Duration::ZERO;
        }
        let per = self.started.elapsed().as_secs_f64() / run as f64;
        Duration::from_secs_f64(per * self.total.saturating_sub(done) as f64)
    }

    /// A one-off message (evaluation results) that does not break the bar.
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => tracing::info!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
