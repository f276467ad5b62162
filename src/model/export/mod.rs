//! Serving formats out: a trained policy or reward model written in the shapes inference servers
//! load unchanged — merged Hugging Face weights (transformers, vLLM, TGI), a PEFT adapter (vLLM
//! `--lora-modules`), GGUF (llama.cpp, Ollama, with a `Modelfile`), and the BERT reward model in
//! the sentence-transformers layout.
//!
//! Training keeps f32 weights, a local base path in `adapter_config.json` and whatever tokenizer
//! files the base came with; servers want half precision, a public base id, and a complete,
//! self-describing directory or file. This module owns that translation and nothing else: the
//! caller (`app::export_model`) finds the model (directory, `train policy` output, registry id)
//! and hands over plain directories. [`CausalLm`] is the policy as one value — merged f32
//! weights, config, tokenizer, chat template — that every policy format is written from.

pub mod gguf_writer;
pub mod hf;
pub mod llama_gguf;
pub mod lora_gguf;
pub mod peft;
pub mod sentence_transformers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use crate::model::chat_template::{ChatTemplate, SpecialTokens};
use crate::model::llama::LlamaConfig;

/// The precision of exported weights (`--dtype`). GGUF formats fix their own encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    Bf16,
    F16,
    F32,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
            WeightDtype::F32 => DType::F32,
        }
    }

    /// The name transformers writes as `torch_dtype` / `dtype` in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
            WeightDtype::F32 => "float32",
        }
    }
}

/// A causal LM ready to export: merged f32 weights under HF names, its config, tokenizer files
/// and chat template.
#[derive(Debug)]
pub struct CausalLm {
    pub config: LlamaConfig,
    /// HF tensor name -> f32 tensor (any LoRA adapter already folded in).
    pub tensors: HashMap<String, Tensor>,
    /// `tokenizer.json`, parsed.
    pub tokenizer_json: serde_json::Value,
    /// `tokenizer_config.json`, parsed, when the model has one.
    pub tokenizer_config: Option<serde_json::Value>,
    /// `generation_config.json`, parsed, when the model has one.
    pub generation_config: Option<serde_json::Value>,
    /// The chat template source and the special tokens it renders with.
    pub chat_template: Option<String>,
    pub special_tokens: SpecialTokens,
}

impl CausalLm {
    /// Reads `config.json` from `config_dir`, the given weights, and the tokenizer files and
    /// chat template from `files_dir` (a `train policy` output keeps them beside its adapter).
    pub fn from_parts(
        config_dir: &Path,
        tensors: HashMap<String, Tensor>,
        files_dir: &Path,
    ) -> Result<Self> {
        let config = LlamaConfig::from_dir(config_dir)?;
        let tok_path = files_dir.join("tokenizer.json");
        let tokenizer_json = read_json(&tok_path)?.with_context(|| {
            format!(
                "{} is missing\nhint: the model directory needs its tokenizer.json to be served",
                tok_path.display()
            )
        })?;
        let tokenizer_config = read_json(&files_dir.join("tokenizer_config.json"))?;
        let generation_config = read_json(&files_dir.join("generation_config.json"))?;
        let template = ChatTemplate::from_hf_dir(files_dir).ok();
        let special_tokens = special_tokens(
            tokenizer_config.as_ref(),
            &tokenizer_json,
            &config,
            template.as_ref(),
        );
        Ok(Self {
            config,
            tensors,
            tokenizer_json,
            tokenizer_config,
            generation_config,
            chat_template: template.map(|t| t.source().to_owned()),
            special_tokens,
        })
    }

    /// The token string of `id` in `tokenizer.json` (vocabulary or added tokens).
    pub fn token(&self, id: u32) -> Option<String> {
        token_of(&self.tokenizer_json, id)
    }

    /// The stop tokens: the config's EOS ids as strings.
    pub fn eos_tokens(&self) -> Vec<String> {
        self.config
            .eos_token_ids()
            .into_iter()
            .filter_map(|id| self.token(id))
            .collect()
    }
}

/// Special tokens from `tokenizer_config.json`, else the chat template's, else the config's ids
/// looked up in the vocabulary.
fn special_tokens(
    tok_cfg: Option<&serde_json::Value>,
    tok_json: &serde_json::Value,
    config: &LlamaConfig,
    template: Option<&ChatTemplate>,
) -> SpecialTokens {
    let from_cfg = tok_cfg
        .map(crate::model::chat_template::special_tokens_from_config)
        .unwrap_or_default();
    let from_tpl = template
        .map(|t| t.special_tokens().clone())
        .unwrap_or_default();
    let by_id = |id: Option<u32>| id.and_then(|i| token_of(tok_json, i));
    let first = |ids: &Option<crate::model::llama::TokenIds>| {
        ids.as_ref().and_then(|t| t.to_vec().first().copied())
    };
    SpecialTokens {
        bos_token: from_cfg
            .bos_token
            .or(from_tpl.bos_token)
            .or_else(|| by_id(first(&config.bos_token_id))),
        eos_token: from_cfg
            .eos_token
            .or(from_tpl.eos_token)
            .or_else(|| by_id(first(&config.eos_token_id))),
        pad_token: from_cfg
            .pad_token
            .or(from_tpl.pad_token)
            .or_else(|| by_id(config.pad_token_id)),
        unk_token: from_cfg.unk_token.or(from_tpl.unk_token),
    }
}

/// The token string of `id` in a parsed `tokenizer.json`.
pub fn token_of(tok_json: &serde_json::Value, id: u32) -> Option<String> {
    let added = tok_json["added_tokens"].as_array().and_then(|a| {
        a.iter()
            .find(|t| t["id"].as_u64() == Some(u64::from(id)))
            .and_then(|t| t["content"].as_str().map(str::to_owned))
    });
    added.or_else(|| {
        tok_json["model"]["vocab"].as_object().and_then(|v| {
            v.iter()
                .find(|(_, i)| i.as_u64() == Some(u64::from(id)))
                .map(|(t, _)| t.clone())
        })
    })
}

/// Reads a JSON file; `None` when it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(Some(v))
}

/// Writes `value` as pretty JSON to `dir/name`; returns the path.
pub(crate) fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<PathBuf> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Named tensors converted to `dtype`, sorted by name (safetensors files list them so).
pub(crate) fn cast_all(
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<std::collections::BTreeMap<String, Tensor>> {
    tensors
        .iter()
        .map(|(k, t)| {
            let t = t
                .to_dtype(dtype)
                .with_context(|| format!("converting {k} to {dtype:?}"))?;
            Ok((k.clone(), t))
        })
        .collect()
}
