//! Greedy generation throughput with the KV cache on SmolLM2-135M-Instruct (f32, CPU; CUDA
//! with `DEVICE=cuda` on a `--features cuda` build: every step reads its tokens back, which
//! synchronises).
//!
//! PPO spends most of its wall time generating rollouts, so tokens/s of batched greedy decoding
//! is the number that decides whether policy training fits a CI job. Each case generates
//! exactly `NEW_TOKENS` tokens per row (no early stop, so every run does the same work) from
//! chat-template prompts; batch 8 uses eight different questions, left-padded.
//!
//! Run: `cargo bench --bench generate` (env: `RUNS`, default 3; `BATCHES`, default `1,8`;
//! `NEW_TOKENS`, default 64; `DEVICE`, default cpu; `MODEL_DIR`, an HF directory to run instead
//! of the GGUF). Needs the GGUF (see `fetch-models.sh`; `RLHF_MODELS_DIR`), else
//! prints "skipped".

use std::time::Instant;

use anyhow::Result;
use rlhf_bot::model::chat_template::{ChatMessage, ChatTemplate};
use rlhf_bot::model::generate::{self, GenerationConfig};
use rlhf_bot::model::gguf::GgufLlama;
use rlhf_bot::model::llama::LlamaForCausalLM;

mod common;
use common::{questions, start_bench};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
        generate::generate(&model, &prompts, &GenerationConfig::greedy(4, vec![], pad))?;
        let mut times = Vec::with_capacity(runs);
        let mut produced = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let out = generate::generate(&model, &prompts, &cfg)?;
            times.push(t.elapsed().as_secs_f64());
            produced = out.num_tokens();
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        println!(
            "batch {batch}: {produced} tokens (prompt {prompt_len}) median {median:.3} s over {runs} runs (min {:.3}) -> {:.1} tok/s",
            times[0],
            produced as f64 / median
        );
    }
    Ok(())
}
