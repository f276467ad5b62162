//! The PEFT adapter export: `adapter_config.json` + `adapter_model.safetensors`, as `peft` and
//! vLLM's `--lora-modules` load them.
//!
//! Training records the base as the local directory it read (that is what `train policy` needs
//! to find it again); a server needs the base's public id (`HuggingFaceTB/SmolLM2-135M-Instruct`)
//! to match the adapter with the model it serves, so the export rewrites
//! `base_model_name_or_path` and nothing else about the adapter's maths.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{WeightDtype, cast_all, write_json};
use crate::model::checkpoint_io::save_tensors;
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft};

/// Writes the adapter in `adapter_dir` to `out` with `base_model_name_or_path = base_id`.
pub fn write_adapter(
    adapter_dir: &Path,
    base_id: &str,
    dtype: WeightDtype,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let (mut cfg, tensors) = load_peft(adapter_dir)?;
    cfg.base_model = Some(base_id.to_owned());
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let config = write_json(out, ADAPTER_CONFIG, &cfg.to_peft_json())?;
    let weights = out.join(ADAPTER_WEIGHTS);
    save_tensors(&cast_all(&tensors, dtype.dtype())?, &weights)?;
    Ok(vec![config, weights])
}
