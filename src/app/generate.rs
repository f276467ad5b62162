//! `rlhf-bot generate`: a reviewer's quick look at a model — a candidate from `train policy`, a
//! Hugging Face directory or a GGUF file — answering one prompt. stdout carries only the
//! continuation (or, with `--format json`, `{"prompt", "completion", "tokens", "seconds"}`),
//! so the output can be piped and compared.
//!
//! A GGUF file is read in memory (no conversion on disk); a `train policy` output with only a
//! LoRA adapter is merged with its base model in memory.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use serde::Serialize;

use crate::cli::GenerateArgs;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::generate::{GenerationConfig, generate_from_texts};
use crate::model::llama::{LlamaConfig, LlamaForCausalLM};
use crate::model::sampling::SamplingParams;
use crate::train::device::DeviceChoice;

/// A causal LM ready to answer: weights, tokenizer, chat template and stop ids.
pub struct LoadedLm {
    pub model: LlamaForCausalLM,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: Option<ChatTemplate>,
    pub config: LlamaConfig,
}

impl std::fmt::Debug for LoadedLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedLm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LoadedLm {
    /// The token ids that end an answer (the config's EOS, else the first chat end token the
    /// tokenizer knows) and the padding id (the config's, else the first stop id, else 0).
    pub fn stop_and_pad(&self) -> (Vec<u32>, u32) {
        let mut stop = self.config.eos_token_ids();
        if stop.is_empty() {
            stop.extend(
                ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"]
                    .iter()
                    .find_map(|t| self.tokenizer.token_to_id(t)),
            );
        }
        let pad = self
            .config
            .pad_token_id
            .or_else(|| stop.first().copied())
            .unwrap_or(0);
        (stop, pad)
    }
}

/// Loads a `.gguf` file, an HF directory, or a `train policy` output (`policy/`, `merged/` or
/// a PEFT adapter over its base).
pub fn load_lm(path: &Path, device: &Device) -> Result<LoadedLm> {
    if super::model_dir::is_gguf(path) {
        let g = crate::model::gguf::GgufLlama::read(path)?;
        let template = match &g.chat_template {
            Some(t) => Some(ChatTemplate::new(t.clone(), g.special_tokens.clone())?),
            None => None,
        };
        return Ok(LoadedLm {
            model: g.causal_lm(device)?,
            tokenizer: g.tokenizer()?,
            template,
            config: g.llama_config()?,
        });
    }
    let dir = super::model_dir::find_model_dir(path)?;
    let config = LlamaConfig::from_dir(&dir.weights)?;
    let tensors = match &dir.adapter {
        Some(adapter) => super::model_dir::merged_weights(&dir.weights, adapter)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?,
        None => crate::model::checkpoint_io::read_dir_tensors(&dir.weights, device)?,
    };
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = LlamaForCausalLM::new(&config, vb)
        .with_context(|| format!("building the model in {}", path.display()))?;
    let tok_path = dir.files.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "loading {}\nhint: the model directory needs its tokenizer.json",
                tok_path.display()
            )
        })?;
    Ok(LoadedLm {
        model,
        tokenizer,
        template: ChatTemplate::from_hf_dir(&dir.files).ok(),
        config,
    })
}

/// What `generate --format json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub prompt: String,
    pub completion: String,
    /// Generated tokens, the stop token included when one was produced.
    pub tokens: usize,
    pub seconds: f64,
}

pub fn generate_cmd(args: &GenerateArgs) -> Result<GenerateOutput> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampling.validate().context("invalid sampling options")?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let device = args
        .device
        .map_or(DeviceChoice::default(), crate::cli::DeviceArg::choice)
        .open()?;
    let lm = load_lm(&args.model, &device)?;
    let text = if args.chat {
        let t = lm.template.as_ref().with_context(|| {
            format!(
                "{} has no chat template\nhint: drop --chat to continue the raw prompt",
                args.model.display()
            )
        })?;
        t.render(&[ChatMessage::user(args.prompt.clone())], true)?
    } else {
        args.prompt.clone()
    };
    if text.is_empty() {
        bail!("--prompt is empty\nhint: give the text the model should continue");
    }
    let (stop, pad) = lm.stop_and_pad();
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        seed: args.seed,
        stop_token_ids: stop,
        pad_token_id: pad,
        use_cache: true,
    };
    let started = Instant::now();
    let out = generate_from_texts(&lm.model, &lm.tokenizer, std::slice::from_ref(&text), &cfg)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(GenerateOutput {
        prompt: args.prompt.clone(),
        completion: out.texts.into_iter().next().unwrap_or_default(),
        tokens: out.generation.num_tokens(),
        seconds,
    })
}
