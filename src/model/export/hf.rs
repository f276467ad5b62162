//! The Hugging Face directory export: what `from_pretrained` in transformers, vLLM and TGI load
//! without arguments.
//!
//! A policy becomes `LlamaForCausalLM` with merged weights; a llama reward model stays
//! `LlamaForSequenceClassification` with its `score` head and `num_labels: 1` (a BERT reward
//! model is handed to `sentence_transformers`). Both get
//! `config.json` with `torch_dtype`/`dtype` naming the stored precision (bf16 by default — what
//! these servers run in), the tokenizer files (`tokenizer.json`, a `tokenizer_config.json` that
//! carries `chat_template`, `special_tokens_map.json`), `chat_template.jinja` (newer
//! transformers read it first) and `generation_config.json` (its `eos_token_id` is where servers
//! learn when to stop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use super::{CausalLm, WeightDtype, cast_all, read_json, write_json};
use crate::model::bert::REWARD_CONFIG_KEY;
use crate::model::chat_template::SpecialTokens;
use crate::model::checkpoint_io::save_tensors;
use crate::model::llama::{Architecture, LlamaConfig};

/// Writes the policy as an HF causal-LM directory at `out`; returns the files written.
pub fn write_causal_lm(lm: &CausalLm, dtype: WeightDtype, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = Vec::new();
    let mut cfg = lm.config.clone();
    set_dtype(&mut cfg.extra, dtype);
    let class = Architecture::CausalLm.class_name(&cfg);
    cfg.save(out, &class)?;
    files.push(out.join("config.json"));
    let mut tensors = lm.tensors.clone();
    if cfg.tie_word_embeddings {
        // transformers re-ties the head on load; a stored copy would only double the size.
        tensors.remove("lm_head.weight");
    }
    files.push(write_weights(&tensors, dtype, out)?);
    let generation = lm
        .generation_config
        .clone()
        .unwrap_or_else(|| generation_defaults(&cfg));
    files.push(write_json(out, "generation_config.json", &generation)?);
    files.extend(write_tokenizer_files(
        &lm.tokenizer_json,
        lm.tokenizer_config.as_ref(),
        &lm.special_tokens,
        lm.chat_template.as_deref(),
        cfg.max_position_embeddings,
        out,
    )?);
    Ok(files)
}

/// Writes a reward model directory (`src`, as `train reward` leaves it) as an HF
/// sequence-classification checkpoint at `out` (llama) or a sentence-transformers directory
/// (BERT, see `sentence_transformers`).
pub fn write_reward_model(src: &Path, dtype: WeightDtype, out: &Path) -> Result<Vec<PathBuf>> {
    let raw = read_json(&src.join("config.json"))?
        .with_context(|| format!("{} has no config.json", src.display()))?;
    if raw["model_type"] == "bert" || raw.get(REWARD_CONFIG_KEY).is_some() {
        // BertForSequenceClassification's tanh pooler is not what this head reads: the BERT
        // reward model goes out in the sentence-transformers layout instead.
        return super::sentence_transformers::write_bert_reward(src, dtype, out);
    }
    let mut cfg = LlamaConfig::from_dir(src)?;
    if cfg.num_labels() != 1 {
        bail!(
            "{} has {} labels, not a reward model's 1",
            src.display(),
            cfg.num_labels()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    cfg.set_num_labels(1);
    cfg.num_labels = Some(1);
    set_dtype(&mut cfg.extra, dtype);
    let class = Architecture::SequenceClassification.class_name(&cfg);
    cfg.save(out, &class)?;
    let mut files = vec![out.join("config.json")];
    let tensors = crate::model::checkpoint_io::read_dir_tensors(src, &candle_core::Device::Cpu)?;
    files.push(write_weights(&tensors, dtype, out)?);
    let tok_path = src.join("tokenizer.json");
    let tok_json = read_json(&tok_path)?.with_context(|| {
        format!(
            "{} is missing\nhint: a reward model directory from `train reward` has its tokenizer.json",
            tok_path.display()
        )
    })?;
    let tok_cfg = read_json(&src.join("tokenizer_config.json"))?;
    let first = |ids: &Option<crate::model::llama::TokenIds>| {
        ids.as_ref().and_then(|t| t.to_vec().first().copied())
    };
    let by_id = |id: Option<u32>| id.and_then(|i| super::token_of(&tok_json, i));
    let from_cfg = tok_cfg
        .as_ref()
        .map(crate::model::chat_template::special_tokens_from_config)
        .unwrap_or_default();
    // Sequence classification reads the score at the last non-pad token: the pad token matters.
    let special = SpecialTokens {
        bos_token: from_cfg
            .bos_token
            .or_else(|| by_id(first(&cfg.bos_token_id))),
        eos_token: from_cfg
            .eos_token
            .or_else(|| by_id(first(&cfg.eos_token_id))),
        pad_token: from_cfg.pad_token.or_else(|| by_id(cfg.pad_token_id)),
        unk_token: from_cfg.unk_token,
    };
    files.extend(write_tokenizer_files(
        &tok_json,
        tok_cfg.as_ref(),
        &special,
        None,
        cfg.max_position_embeddings,
        out,
    )?);
    Ok(files)
}

/// transformers 4 reads `torch_dtype`, transformers 5 `dtype`: both name the stored precision.
fn set_dtype(extra: &mut serde_json::Map<String, serde_json::Value>, dtype: WeightDtype) {
    for key in ["torch_dtype", "dtype"] {
        extra.insert(key.into(), dtype.torch_name().into());
    }
}

fn write_weights(
    tensors: &HashMap<String, Tensor>,
    dtype: WeightDtype,
    out: &Path,
) -> Result<PathBuf> {
    let path = out.join("model.safetensors");
    save_tensors(&cast_all(tensors, dtype.dtype())?, &path)?;
    Ok(path)
}

fn generation_defaults(cfg: &LlamaConfig) -> serde_json::Value {
    serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    })
}

/// `tokenizer.json`, `tokenizer_config.json` (with the chat template and special tokens),
/// `special_tokens_map.json` and `chat_template.jinja`.
fn write_tokenizer_files(
    tok_json: &serde_json::Value,
    tok_cfg: Option<&serde_json::Value>,
    special: &SpecialTokens,
    chat_template: Option<&str>,
    max_len: usize,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let mut files = vec![write_json(out, "tokenizer.json", tok_json)?];
    let mut cfg = tok_cfg
        .and_then(|c| c.as_object().cloned())
        .unwrap_or_default();
    // Keys a local conversion leaves that would make a server refuse to look anything up, and a
    // class name only transformers 5 knows (`PreTrainedTokenizerFast` loads in 4 and 5).
    for key in ["is_local", "local_files_only", "backend"] {
        cfg.remove(key);
    }
    if cfg.get("tokenizer_class").and_then(|c| c.as_str()) != Some("PreTrainedTokenizerFast") {
        cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    }
    let huge = cfg
        .get("model_max_length")
        .and_then(|v| v.as_f64())
        .is_none_or(|v| v > 1e12);
    if huge {
        cfg.insert("model_max_length".into(), max_len.into());
    }
    let mut map = serde_json::Map::new();
    for (key, tok) in [
        ("bos_token", &special.bos_token),
        ("eos_token", &special.eos_token),
        ("pad_token", &special.pad_token),
        ("unk_token", &special.unk_token),
    ] {
        if let Some(t) = tok {
            cfg.insert(key.into(), t.clone().into());
            map.insert(key.into(), t.clone().into());
        }
    }
    if let Some(t) = chat_template {
        cfg.insert("chat_template".into(), t.into());
        let p = out.join("chat_template.jinja");
        std::fs::write(&p, t).with_context(|| format!("writing {}", p.display()))?;
        files.push(p);
    }
    files.push(write_json(
        out,
        "tokenizer_config.json",
        &serde_json::Value::Object(cfg),
    )?);
    files.push(write_json(
        out,
        "special_tokens_map.json",
        &serde_json::Value::Object(map),
    )?);
    Ok(files)
}
