//! Converts a llama-family GGUF file into an f32 Hugging Face directory (config.json,
//! model.safetensors, tokenizer files), e.g. so transformers can load the same SmolLM2 weights
//! in `scripts/bench-compare.sh`.
//!
//! cargo run --release --example gguf_to_hf -- MODEL.gguf OUT_DIR

use std::path::PathBuf;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let gguf = PathBuf::from(
        args.next()
            .context("usage: gguf_to_hf MODEL.gguf OUT_DIR")?,
    );
    let out = PathBuf::from(
        args.next()
            .context("usage: gguf_to_hf MODEL.gguf OUT_DIR")?,
    );
    let cfg = rlhf_bot::model::gguf::convert_gguf_to_hf_dir(&gguf, &out)?;
    println!(
        "{} -> {} ({} layers, hidden {})",
        gguf.display(),
        out.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size
    );
    Ok(())
}
