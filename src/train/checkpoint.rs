//! Training checkpoints: weights, optimiser state and loop state in one directory, written
//! atomically so a crash (or a CI job cancelled mid-write) never leaves a half checkpoint that a
//! resume would trust.
//!
//! Layout: `<root>/checkpoint-<step, 8 digits>/{model.safetensors, optimizer.safetensors,
//! state.json}`. Each one is written into `<final>.tmp-<pid>`, every file and the directory are
//! fsynced, then the directory is renamed into place and the parent fsynced. Only directories with
//! the final name and a `state.json` are listed, so leftovers of a crash are ignored (and removed
//! by the next save of the same process id or by [`remove_stale_tmp`]).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
const PREFIX: &str = "checkpoint-";
const STATE_VERSION: u32 = 1;

/// Where a ChaCha8 stream stands, so shuffling and sampling continue identically after a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    pub stream: u64,
    /// Position in the stream in 32-bit words (a u128, as a decimal string: JSON numbers are f64).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: hex::encode(rng.get_seed()),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let bytes = hex::decode(&self.seed)
            .with_context(|| format!("rng seed {:?} is not hex", self.seed))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| anyhow::anyhow!("rng seed has {} bytes, expected 32", b.len()))?;
        let pos: u128 = self
            .word_pos
            .parse()
            .with_context(|| format!("rng word_pos {:?} is not a number", self.word_pos))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// One logged metric value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub step: u64,
    pub name: String,
    pub value: f64,
}

/// The loop's state, saved as `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    /// Optimiser updates done.
    pub step: u64,
    pub epoch: u64,
    /// Examples consumed within the current epoch.
    pub data_position: u64,
    /// The run's seed (what produced the data order).
    pub seed: u64,
    pub rng: Option<RngState>,
    /// Every metric logged so far, in order.
    pub metrics: Vec<MetricPoint>,
    /// Trainer-specific state (e.g. the KL controller), opaque here.
    #[serde(default)]
    pub extra: serde_json::Value,
    /// What was trained (`reward`, `dpo`, `kto`, `ppo`); absent in checkpoints written before it
    /// was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
}

impl TrainState {
    /// A fresh state at step 0.
    pub fn new(seed: u64) -> Self {
        Self {
            version: STATE_VERSION,
            step: 0,
            epoch: 0,
            data_position: 0,
            seed,
            rng: None,
            metrics: Vec::new(),
            extra: serde_json::Value::Null,
            objective: None,
        }
    }

    /// A fresh state at step 0 for `objective`.
    pub fn for_objective(seed: u64, objective: &str) -> Self {
        Self {
            objective: Some(objective.to_string()),
            ..Self::new(seed)
        }
    }
}

/// Refuses to continue from the checkpoint in `dir` when it was made by another run: another
/// seed (the data order and sampling would silently change mid-run) or another objective (its
/// weights and optimiser state mean something else). The same checks for every algorithm.
pub fn check_resume(dir: &Path, state: &TrainState, seed: u64, objective: &str) -> Result<()> {
    if state.seed != seed {
        bail!(
            "checkpoint {} was made with seed {} but this run has seed {}\nhint: resume with the same settings, or start a new output directory",
            dir.display(),
            state.seed,
            seed
        );
    }
    if let Some(made_by) = &state.objective
        && made_by != objective
    {
        bail!(
            "checkpoint {} was made by {made_by} training but this run trains {objective}\nhint: start a new output directory for the {objective} run",
            dir.display()
        );
    }
    Ok(())
}

/// Name of the checkpoint directory for `step`.
pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{PREFIX}{step:08}"))
}

/// Writes a checkpoint for `state.step` under `root` atomically and returns its directory. An
/// existing checkpoint of the same step is replaced (the old one stays valid until the new one is
/// in place).
pub fn save(root: &Path, state: &TrainState, varmap: &VarMap, opt: &AdamW) -> Result<PathBuf> {
    fs::create_dir_all(root)
        .with_context(|| format!("creating checkpoint root {}", root.display()))?;
    let final_dir = checkpoint_dir(root, state.step);
    let pid = std::process::id();
    let tmp = with_suffix(&final_dir, &format!(".tmp-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let model = tmp.join(MODEL_FILE);
    varmap
        .save(&model)
        .with_context(|| format!("writing weights to {}", model.display()))?;
    sync_file(&model)?;
    let optim = tmp.join(OPTIMIZER_FILE);
    opt.save_state(&optim)?;
    sync_file(&optim)?;
    let json = serde_json::to_vec_pretty(state).context("serialising the training state")?;
    let state_path = tmp.join(STATE_FILE);
    {
        let mut f = File::create(&state_path)
            .with_context(|| format!("creating {}", state_path.display()))?;
        f.write_all(&json)
            .with_context(|| format!("writing {}", state_path.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", state_path.display()))?;
    }
    sync_dir(&tmp)?;

    if final_dir.exists() {
        let old = with_suffix(&final_dir, &format!(".old-{pid}"));
        if old.exists() {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        fs::rename(&final_dir, &old)
            .with_context(|| format!("moving aside {}", final_dir.display()))?;
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        sync_dir(root)?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
    }
    sync_dir(root)?;
    Ok(final_dir)
}

/// Complete checkpoints under `root` as `(step, dir)`, oldest first; a missing root is empty.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("listing checkpoints in {}", root.display()));
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing checkpoints in {}", root.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(step) = digits.parse::<u64>() else {
            continue;
        };
        let dir = entry.path();
        if dir.join(STATE_FILE).is_file() {
            out.push((step, dir));
        }
    }
    out.sort_by_key(|(s, _)| *s);
    Ok(out)
}

/// The checkpoint with the highest step, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, d)| d))
}

/// Loads a checkpoint into `varmap` and `opt` (both must already hold the same parameters) and
/// returns its loop state.
pub fn load(dir: &Path, varmap: &mut VarMap, opt: &mut AdamW) -> Result<TrainState> {
    let state = read_state(dir)?;
    let model = dir.join(MODEL_FILE);
    varmap.load(&model).with_context(|| {
        format!(
            "loading weights from {}\nhint: the checkpoint belongs to a different model shape",
            model.display()
        )
    })?;
    opt.load_state(&dir.join(OPTIMIZER_FILE))?;
    Ok(state)
}

/// Reads only `state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: TrainState =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    if state.version != STATE_VERSION {
        bail!(
            "{} has state version {}, this build reads {STATE_VERSION}\nhint: resume with the rlhf-bot version that wrote it, or start fresh",
            path.display(),
            state.version
        );
    }
    Ok(state)
}

/// Deletes all but the newest `keep` checkpoints; returns the removed directories.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list(root)?;
    let n = all.len().saturating_sub(keep);
    let mut removed = Vec::with_capacity(n);
    for (_, dir) in all.into_iter().take(n) {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Removes leftovers (`*.tmp-*`, `*.old-*`) of interrupted saves under `root`.
pub fn remove_stale_tmp(root: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(0);
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(PREFIX) && (name.contains(".tmp-") || name.contains(".old-")) {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn sync_file(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", p.display()))
}

fn sync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing directory {}", p.display()))
}
