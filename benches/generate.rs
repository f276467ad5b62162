//! Greedy generation throughput with the KV cache on SmolLM2-135M-Instruct (f32, CPU; CUDA
//! with `DEVICE=cuda` on a `--features cuda` build: every step reads its tokens back, which
//! synchronises).
//!
//! PPO spends most of its wall time generating rollouts, so tokens/s of batched greedy decoding
//! is the number that decides whether policy training fits a CI job. Each case generates
//! exactly `NEW_TOKENS` tokens per row (no early stop, so every run does the same work) from
//! chat-template prompts; batch 8 uses eight different questions, left-padded.
//!
//! `HELD=f32,bf16` also runs the model with its projections held in bf16, as
//! `policy.precision: bf16` holds a frozen model (the LM head, embeddings and norms stay f32),
//! the two alternated run by run, and prints the ratio of their medians.
//!
//! Run: `cargo bench --bench generate` (env: `RUNS`, default 3; `BATCHES`, default `1,8`;
//! `NEW_TOKENS`, default 64; `DEVICE`, default cpu; `MODEL_DIR`, an HF directory to run instead
//! of the GGUF; `HELD`, default `f32`). Needs the GGUF (see `fetch-models.sh`;
//! `RLHF_MODELS_DIR`), else prints "skipped".

use std::time::Instant;

use anyhow::Result;
use candle_core::DType;
use candle_nn::Linear;
use rlhf_bot::model::chat_template::{ChatMessage, ChatTemplate};
use rlhf_bot::model::generate::{self, GenerationConfig};
use rlhf_bot::model::gguf::GgufLlama;
use rlhf_bot::model::llama::LlamaForCausalLM;
use rlhf_bot::model::lora::{AdaptableLinear, HasAdaptableLinears};

mod common;
use common::{questions, start_bench};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `model` with its projections held in bf16, as `policy.precision: bf16` holds a frozen model.
fn held_in_bf16(model: &LlamaForCausalLM) -> Result<LlamaForCausalLM> {
    let mut held = model.clone();
    let mut weights = Vec::new();
    for (_, layer) in held.linears_mut() {
        let weight = layer.weight().to_dtype(DType::BF16)?;
        weights.push(weight.clone());
        *layer = AdaptableLinear::Plain(Linear::new(weight, layer.bias().cloned()));
    }
    rlhf_bot::kernels::collapse_into_huge_pages(weights.iter());
    Ok(held)
}

fn main() -> Result<()> {
    start_bench();
    let runs = env_usize("RUNS", 3).max(1);
    let new_tokens = env_usize("NEW_TOKENS", 64);
    let batches: Vec<usize> = std::env::var("BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    let dev = rlhf_bot::train::device::DeviceChoice::open_from_env("DEVICE")?;

    let t0 = Instant::now();
    // MODEL_DIR: an HF directory of the same shape instead of the GGUF (scripts/gpu-bench.sh
    // makes a randomly initialised one on a GPU machine the 98 MB GGUF cannot be carried to).
    let (model, tokenizer, template, pad, source) = match std::env::var_os("MODEL_DIR") {
        Some(dir) => {
            let dir = std::path::PathBuf::from(dir);
            let pre = LlamaForCausalLM::load(&dir, &dev)?;
            let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let pad = pre
                .config
                .pad_token_id
                .or(pre.config.eos_token_ids().first().copied())
                .unwrap_or(0);
            (
                pre.model,
                tokenizer,
                ChatTemplate::from_hf_dir(&dir)?,
                pad,
                dir,
            )
        }
        None => {
            let Some(path) = common::smollm2_gguf() else {
                return Ok(());
            };
            let m = GgufLlama::read(&path)?;
            let template = ChatTemplate::new(
                m.chat_template.clone().unwrap_or_default(),
                m.special_tokens.clone(),
            )?;
            let pad = m.config.pad_token_id.or(m.config.eos_token_id).unwrap_or(0);
            (m.causal_lm(&dev)?, m.tokenizer()?, template, pad, path)
        }
    };
    println!(
        "loaded {} in {:.1} s; threads: {}",
        source.display(),
        t0.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );

    let mut models = Vec::new();
    for held in std::env::var("HELD")
        .unwrap_or_else(|_| "f32".into())
        .split(',')
    {
        match held.trim() {
            "f32" => models.push(("f32", model.clone())),
            "bf16" => models.push(("bf16", held_in_bf16(&model)?)),
            other => anyhow::bail!("HELD: unknown precision {other:?}\nhint: f32, bf16 or both"),
        }
    }

    let questions = questions();
    for &batch in &batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| {
                let text =
                    template.render(&[ChatMessage::user(questions[i % questions.len()])], true)?;
                let enc = tokenizer
                    .encode(text, false)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(enc.get_ids().to_vec())
            })
            .collect::<Result<_>>()?;
        // No stop ids: every row generates exactly `new_tokens`.
        let cfg = GenerationConfig::greedy(new_tokens, vec![], pad);
        for (_, model) in &models {
            generate::generate(model, &prompts, &GenerationConfig::greedy(4, vec![], pad))?;
        }
        let mut times = vec![Vec::with_capacity(runs); models.len()];
        let mut produced = 0;
        // Alternated run by run, so a change in the machine's load hits every side alike.
        for _ in 0..runs {
            for ((_, model), side) in models.iter().zip(&mut times) {
                let t = Instant::now();
                let out = generate::generate(model, &prompts, &cfg)?;
                side.push(t.elapsed().as_secs_f64());
                produced = out.num_tokens();
            }
        }
        let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut medians = Vec::new();
        for ((held, _), side) in models.iter().zip(&mut times) {
            side.sort_by(f64::total_cmp);
            let median = side[side.len() / 2];
            medians.push(median);
            println!(
                "batch {batch}, weights {held}: {produced} tokens (prompt {prompt_len}) median {median:.3} s over {runs} runs (min {:.3}) -> {:.1} tok/s",
                side[0],
                produced as f64 / median
            );
        }
        if let [first, .., last] = medians[..] {
            println!(
                "batch {batch}: {} decodes at {:.2}x the tokens/s of {}",
                models[models.len() - 1].0,
                first / last,
                models[0].0
            );
        }
    }
    Ok(())
}
