//! Hugging Face safetensors checkpoints in and out of a candle [`VarMap`].
//!
//! `VarMap::load` insists that every variable is in one file and gives bare errors; training
//! needs more: sharded checkpoints (`model.safetensors.index.json`), half-precision files
//! widened to f32, heads that may be missing (a reward head on top of a causal-LM checkpoint),
//! and a saved file that transformers accepts (`{"format": "pt"}` metadata, sorted names).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// Why weights could not be placed into the model.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "tensor {name:?} is missing from the checkpoint\nhint: is this a checkpoint of the same \
         architecture? (tie_word_embeddings, num_hidden_layers and the model type must match)"
    )]
    Missing { name: String },
    #[error(
        "tensor {name:?} has shape {found:?} in the checkpoint but the config implies {expected:?}"
    )]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "no model.safetensors or model.safetensors.index.json in {dir}\nhint: save the model \
         with safe_serialization=True (the transformers default)"
    )]
    NoWeights { dir: PathBuf },
}

/// What [`load_into_varmap`] did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Variables set from the checkpoint.
    pub loaded: Vec<String>,
    /// Optional variables absent from the checkpoint, left at their initial values.
    pub initialised: Vec<String>,
    /// Checkpoint tensors the model has no variable for (a tied `lm_head.weight`, say).
    pub unused: Vec<String>,
}

/// The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed
/// by `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(CheckpointError::NoWeights {
            dir: dir.to_path_buf(),
        }
        .into());
    }
    let text =
        std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map object", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads every tensor of a checkpoint directory onto `device`, as f32.
pub fn read_dir_tensors(dir: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    read_dir_tensors_as(dir, device, |_| DType::F32)
}

/// Reads every tensor of a checkpoint directory onto `device` in the dtype `dtype_of(name)`
/// gives it, converting one file at a time (a model held in bf16 never has all of its weights
/// in f32 at once).
pub fn read_dir_tensors_as(
    dir: &Path,
    device: &Device,
    dtype_of: impl Fn(&str) -> DType,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, device)
            .with_context(|| format!("reading {}", file.display()))?;
        for (name, t) in tensors {
            let t = t.to_dtype(dtype_of(&name))?;
            all.insert(name, t);
        }
    }
    Ok(all)
}

/// Sets every variable of `varmap` from `tensors` (matched by name). Variables for which
/// `optional(name)` is true may be absent and keep their initial values; any other absence or
/// a shape mismatch is an error.
pub fn load_into_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    optional: impl Fn(&str) -> bool,
) -> anyhow::Result<LoadReport> {
    let mut report = LoadReport::default();
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("the VarMap lock is poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        match tensors.get(name) {
            Some(t) => {
                if t.dims() != var.dims() {
                    return Err(CheckpointError::Shape {
                        name: name.clone(),
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    }
                    .into());
                }
                var.set(t).with_context(|| format!("setting {name}"))?;
                report.loaded.push(name.clone());
            }
            None if optional(name) => report.initialised.push(name.clone()),
            None => return Err(CheckpointError::Missing { name: name.clone() }.into()),
        }
    }
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !data.contains_key(k.as_str()))
        .cloned()
        .collect();
    unused.sort();
    report.unused = unused;
    Ok(report)
}

/// Writes the variables of `varmap` to one safetensors file, names sorted, with the
/// `{"format": "pt"}` metadata transformers checks for.
/// A [`candle_nn::VarBuilder`] over detached views of every weight of `varmap`: the same storage
/// (no copy), so a model built from it sees every in-place update of the variables, but no op
/// on it records an autograd graph. What a no-graph twin of a trained model (evaluation,
/// scoring) is built from.
pub fn detached_view(varmap: &VarMap) -> candle_nn::VarBuilder<'static> {
    let data = match varmap.data().lock() {
        Ok(d) => d,
        Err(poisoned) => poisoned.into_inner(),
    };
    let device = data
        .values()
        .next()
        .map_or(Device::Cpu, |v| v.as_tensor().device().clone());
    let weights: HashMap<String, Tensor> = data
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    candle_nn::VarBuilder::from_tensors(weights, DType::F32, &device)
}

pub fn save_varmap(varmap: &VarMap, path: &Path) -> anyhow::Result<()> {
    let tensors: BTreeMap<String, Tensor> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("the VarMap lock is poisoned"))?;
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    };
    save_tensors(&tensors, path)
}

/// Writes named tensors to a safetensors file with transformers' metadata.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let contiguous = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(contiguous, Some(metadata), path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Names and shapes stored in a safetensors file, sorted by name (for checks and reports).
pub fn tensor_names(path: &Path) -> anyhow::Result<Vec<(String, Vec<usize>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut out: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    out.sort();
    Ok(out)
}

/// The `__metadata__` of a safetensors file.
pub fn metadata(path: &Path) -> anyhow::Result<Option<HashMap<String, String>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(meta.metadata().clone())
}
