//! Training progress for people: an indicatif bar when stderr is a terminal, and otherwise (CI
//! logs, a pipe, a file) one plain line every N steps, so a GitHub Actions log stays readable and
//! never fills with carriage-return redraws (GUIDE §3.6). The first step and any step after
//! [`QUIET_LIMIT`] without a line also get one: a run whose steps take minutes still shows
//! that it is alive, and how fast it goes, from its first step on. A plain line shows the means
//! of the loss and the headline metric over the steps since the previous line (every step is in
//! `log.jsonl`; the line is the summary a person reads).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Longest stretch without a progress line when stderr is not a terminal.
pub const QUIET_LIMIT: Duration = Duration::from_secs(30);

/// Sums over the steps since the previous plain line.
#[derive(Debug, Default)]
struct Window {
    steps: u64,
    loss: f64,
    headline: Option<(&'static str, f64, u64)>,
}

impl Window {
    fn add(&mut self, loss: f64, headline: Option<(&'static str, f64)>) {
        self.steps += 1;
        self.loss += loss;
        if let Some((name, v)) = headline {
            let (_, sum, n) = self.headline.get_or_insert((name, 0.0, 0));
            *sum += v;
            *n += 1;
        }
    }

    /// `loss 0.6931 accuracy 0.500`: the means over the window.
    fn summary(&self) -> String {
        let mut text = format!("loss {:.4}", self.loss / self.steps.max(1) as f64);
        if let Some((name, sum, n)) = self.headline {
            text.push_str(&format!(" {name} {:.3}", sum / n.max(1) as f64));
        }
        text
    }
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
    window: Window,
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
            window: Window::default(),
        }
    }

    /// Records finished step `done` (1-based): its loss, the objective's headline metric when it
    /// has one, the learning rate and the tokens it processed (for tokens/s).
    pub fn step(
        &mut self,
        done: u64,
        loss: f64,
        headline: Option<(&'static str, f64)>,
        lr: f64,
        tokens: u64,
    ) {
        self.tokens += tokens;
        self.window.add(loss, headline);
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let tok_s = self.tokens as f64 / elapsed;
        let msg = format!("{} lr {lr:.2e} {tok_s:.0} tok/s", self.window.summary());
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(msg);
                self.window = Window::default();
            }
            None if done.is_multiple_of(self.every)
                || done == self.total
                || done == self.first_step + 1
                || self.last_line.elapsed() >= QUIET_LIMIT =>
            {
                let eta = self.eta(done);
                tracing::info!("step {done}/{} {msg} eta {}s", self.total, eta.as_secs());
                self.last_line = Instant::now();
                self.window = Window::default();
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
