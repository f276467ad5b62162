//! Models reach the policy stage (and `generate`, `export-model`, the Ray stage's read-back) in
//! several shapes, so [`resolve_model_dir`] reduces each to a plain Hugging Face directory:
//! `train policy` outputs (`policy/` with `merged/` or a PEFT `adapter/`), registry artifacts
//! (the same, copied), GGUF files, and HF directories; and a LoRA adapter is folded into its base
//! here ([`write_merged`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use crate::model::llama::{Architecture, LlamaConfig};

/// Files that travel with a model's weights (tokenizer, template, generation defaults).
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

pub fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Reduces a model path to a Hugging Face causal-LM directory with weights: a `.gguf` file is
/// converted into `scratch` (once: an existing conversion is reused, so `--resume` is cheap);
/// a `train policy` output is followed to its `policy/` directory, its `merged/` weights, or its
/// PEFT adapter folded into the base model (written into `scratch`).
pub fn resolve_model_dir(path: &Path, scratch: &Path) -> Result<PathBuf> {
    if is_gguf(path) {
        if !has_weights(scratch) {
            tracing::info!(gguf = %path.display(), out = %scratch.display(), "converting GGUF to a Hugging Face directory");
            crate::model::gguf::convert_gguf_to_hf_dir(path, scratch)?;
        }
        return Ok(scratch.to_path_buf());
    }
    let found = find_model_dir(path)?;
    match &found.adapter {
        None => Ok(found.weights),
        Some(adapter) => {
            write_merged(&found.weights, adapter, scratch)?;
            // The tokenizer and template saved next to the adapter win over the base's.
            copy_side_files(&found.files, scratch)?;
            Ok(scratch.to_path_buf())
        }
    }
}

/// Where a model directory's weights, optional LoRA adapter and tokenizer files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    /// An HF directory with `config.json` and the weights.
    pub weights: PathBuf,
    /// A PEFT adapter to fold into `weights`.
    pub adapter: Option<PathBuf>,
    /// Where `tokenizer.json` and the chat template are.
    pub files: PathBuf,
}

/// Follows an HF directory or a `train policy` output (`policy/`, `merged/`, `adapter/` over
/// the base named in `adapter_config.json`) to its weights.
pub fn find_model_dir(path: &Path) -> Result<ModelDir> {
    if !path.exists() {
        bail!(
            "model {} does not exist\nhint: pass a Hugging Face model directory or a .gguf file",
            path.display()
        );
    }
    if path.is_dir() {
        if has_weights(path) {
            return Ok(ModelDir {
                weights: path.to_path_buf(),
                adapter: None,
                files: path.to_path_buf(),
            });
        }
        if has_weights(&path.join("merged")) {
            return find_model_dir(&path.join("merged"));
        }
        if path.join("policy").is_dir() {
            return find_model_dir(&path.join("policy"));
        }
        let adapter = path.join("adapter");
        if adapter.join("adapter_config.json").is_file() {
            let base = adapter_base(&adapter)?;
            let inner = find_model_dir(&base)?;
            if inner.adapter.is_some() {
                bail!(
                    "the adapter in {} sits on another adapter ({})\nhint: merge the base first (policy.lora.merge: true)",
                    adapter.display(),
                    base.display()
                );
            }
            return Ok(ModelDir {
                weights: inner.weights,
                adapter: Some(adapter),
                files: path.to_path_buf(),
            });
        }
    }
    bail!(
        "{} is neither a .gguf file nor a Hugging Face model directory (config.json + model.safetensors) nor a `train policy` output\nhint: pass a model directory or a .gguf file",
        path.display()
    )
}

/// The base model a PEFT adapter was trained on (`base_model_name_or_path`).
pub fn adapter_base(adapter: &Path) -> Result<PathBuf> {
    let (cfg, _) = crate::model::lora::load_peft(adapter)?;
    let base = cfg.base_model.with_context(|| {
        format!(
            "{} does not name its base model\nhint: set policy.lora.merge: true so runs also write full weights",
            adapter.display()
        )
    })?;
    let base = PathBuf::from(base);
    if !base.exists() {
        bail!(
            "the adapter in {} was trained on {}, which no longer exists\nhint: set policy.lora.merge: true so runs also write full weights (policy/merged/)",
            adapter.display(),
            base.display()
        );
    }
    Ok(base)
}

fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for f in SIDE_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f))
                .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The base model's weights with the adapter folded in (`W += α/r · B A`), in memory.
pub fn merged_weights(base: &Path, adapter: &Path) -> Result<HashMap<String, Tensor>> {
    let mut weights = crate::model::checkpoint_io::read_dir_tensors(base, &Device::Cpu)?;
    let (cfg, tensors) = crate::model::lora::load_peft(adapter)?;
    let merged = crate::model::lora::merge_into_state_dict(&mut weights, &cfg, &tensors)?;
    if merged.is_empty() {
        bail!("the adapter in {} adapts no module", adapter.display());
    }
    Ok(weights)
}

/// Writes `base` + `adapter` merged as a full HF directory at `out` (weights, config, tokenizer).
pub fn write_merged(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let weights = merged_weights(base, adapter)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cfg = LlamaConfig::from_dir(base)?;
    cfg.save(out, &Architecture::CausalLm.class_name(&cfg))?;
    let path = out.join("model.safetensors");
    candle_core::safetensors::save(&weights, &path)
        .with_context(|| format!("writing {}", path.display()))?;
    copy_side_files(base, out)
}
