//! The engine's run log: the checkpointed [`TrainState`], every log line so far (kept in the
//! checkpoint, so a resumed run rewrites the full `log.jsonl`) and the writer; start or resume
//! with the same checks for every objective ([`checkpoint::check_resume`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_nn::VarMap;

use crate::run::outputs::{LogLine, LogWriter};
use crate::train::checkpoint::{self, TrainState};
use crate::train::guard::check_finite;
use crate::train::optim::AdamW;

/// Checkpoints kept on disk (the newest ones).
const KEEP_CHECKPOINTS: usize = 2;

pub struct RunLog {
    pub state: TrainState,
    pub lines: Vec<LogLine>,
    writer: LogWriter,
}

impl RunLog {
    /// Starts a fresh log in `out`, or resumes from the newest checkpoint under `ckpt_root`
    /// (loading weights and optimiser state into `varmap`/`opt`) after checking that it was made
    /// by a run of the same `objective` with the same `seed`.
    pub fn start_or_resume(
        out: &Path,
        ckpt_root: &Path,
        seed: u64,
        objective: &str,
        varmap: &mut VarMap,
        opt: &mut AdamW,
    ) -> Result<Self> {
        let (state, lines) = match checkpoint::latest(ckpt_root)? {
            Some(dir) => {
                let state = checkpoint::load(&dir, varmap, opt)
                    .with_context(|| format!("resuming from {}", dir.display()))?;
                checkpoint::check_resume(&dir, &state, seed, objective)?;
                let lines: Vec<LogLine> = match state.extra.get("log") {
                    Some(v) => serde_json::from_value(v.clone()).context("checkpoint log lines")?,
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

    /// Saves a checkpoint with `extra` objective state (the log lines are added here).
    pub fn checkpoint(
        &mut self,
        ckpt_root: &Path,
        varmap: &VarMap,
        opt: &AdamW,
        mut extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<PathBuf> {
        extra.insert("log".into(), serde_json::to_value(&self.lines)?);
        self.state.extra = serde_json::Value::Object(extra);
        let dir = checkpoint::save(ckpt_root, &self.state, varmap, opt)?;
        checkpoint::prune(ckpt_root, KEEP_CHECKPOINTS)?;
        Ok(dir)
    }
}
