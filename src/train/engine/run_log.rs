//! The engine's run log: the checkpointed [`TrainState`], every log line so far (kept in the
//! checkpoint, so a resumed run rewrites the full `log.jsonl`) and the writer; start or resume
//! with the same checks for every objective ([`checkpoint::check_resume`]). Values are kept in
//! the checkpoint as their bit patterns: serde_json's default parser may miss the last bit of a
//! decimal, and a resumed run must write exactly the log an uninterrupted one writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_nn::VarMap;

use crate::run::outputs::{LogLine, LogWriter};
use crate::train::checkpoint::{self, TrainState};
use crate::train::guard::check_finite;
use crate::train::optim::AdamW;

/// A log line as the checkpoint stores it: the step and each value's f64 bit pattern.
type StoredLine = (u64, Vec<(String, u64)>);

fn store(line: &LogLine) -> StoredLine {
    let values = line.values.iter().map(|(k, v)| (k.clone(), v.to_bits()));
    (line.step, values.collect())
}

fn restore((step, values): StoredLine) -> LogLine {
    LogLine {
        step,
        values: values
            .into_iter()
            .map(|(k, v)| (k, f64::from_bits(v)))
            .collect(),
    }
}

pub struct RunLog {
    pub state: TrainState,
    pub lines: Vec<LogLine>,
    writer: LogWriter,
}

impl RunLog {
    /// Starts a fresh log in `out`, or (with `resume`) resumes from the newest checkpoint under
    /// `ckpt_root` (loading weights and optimiser state into `varmap`/`opt`) after checking that
    /// it was made by a run of the same `objective` with the same `seed`.
    pub fn start_or_resume(
        out: &Path,
        ckpt_root: &Path,
        resume: bool,
        seed: u64,
        objective: &str,
        varmap: &mut VarMap,
        opt: &mut AdamW,
    ) -> Result<Self> {
        let newest = if resume {
            checkpoint::latest(ckpt_root)?
        } else {
            None
        };
        let (state, lines) = match newest {
            Some(dir) => {
                let state = checkpoint::load(&dir, varmap, opt)
                    .with_context(|| format!("resuming from {}", dir.display()))?;
                checkpoint::check_resume(&dir, &state, seed, objective)?;
                let lines: Vec<LogLine> = match state.extra.get("log") {
                    Some(v) => serde_json::from_value::<Vec<StoredLine>>(v.clone())
                        .context("checkpoint log lines")?
                        .into_iter()
                        .map(restore)
                        .collect(),
                    None => Vec::new(),
                };
                tracing::info!(dir = %dir.display(), step = state.step, objective, "resuming training");
                (state, lines)
            }
            None => (TrainState::for_objective(seed, objective), Vec::new()),
        };
        let mut writer = LogWriter::create(out)?;
        for l in &lines {
            writer.write(l)?;
        }
        Ok(Self {
            state,
            lines,
            writer,
        })
    }

    /// Appends a line after checking every value is finite.
    pub fn push(&mut self, line: LogLine) -> Result<()> {
        check_finite(&line)?;
        self.writer.write(&line)?;
        self.lines.push(line);
        Ok(())
    }

    /// Saves a checkpoint with `extra` objective state (the log lines are added here), keeping
    /// the newest `keep` checkpoints (at least one).
    pub fn checkpoint(
        &mut self,
        ckpt_root: &Path,
        varmap: &VarMap,
        opt: &AdamW,
        mut extra: serde_json::Map<String, serde_json::Value>,
        keep: usize,
    ) -> Result<PathBuf> {
        let stored: Vec<StoredLine> = self.lines.iter().map(store).collect();
        extra.insert("log".into(), serde_json::to_value(stored)?);
        self.state.extra = serde_json::Value::Object(extra);
        let dir = checkpoint::save(ckpt_root, &self.state, varmap, opt)?;
        checkpoint::prune(ckpt_root, keep.max(1))?;
        Ok(dir)
    }
}
