//! Scores texts with a BERT reward model through the library's own loader, for comparing an
//! `export-model --to hf` directory with other implementations (scripts/check-reward-export.sh),
//! and makes a reward model with seeded heads from a plain sentence encoder to export.
//!
//! cargo run --example score_reward -- init --from ENCODER_DIR --out DIR [--aspects a,b]
//!     [--step-head] [--seed N]
//! cargo run --example score_reward -- score --model DIR TEXT...
//!
//! A TEXT holding a tab is a (prompt, answer) pair, encoded as training encodes it (a BERT
//! sentence pair, token type 1 on the answer). `score` prints one JSON document:
//! `{"columns": ["reward", <aspects in name order>], "scores": [[...], ...]}`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rlhf_bot::model::bert::{BertRewardModel, EncodedBatch};
use rlhf_bot::train::reward_models::seeded_init_only;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("init") => init(args),
        Some("score") => score(args),
        _ => bail!("usage: score_reward init --from DIR --out DIR | score --model DIR TEXT..."),
    }
}

fn init(mut args: impl Iterator<Item = String>) -> Result<()> {
    let (mut from, mut out, mut aspects, mut step_head, mut seed) = (None, None, vec![], false, 1);
    while let Some(flag) = args.next() {
        let mut val = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--from" => from = Some(PathBuf::from(val()?)),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--aspects" => aspects = val()?.split(',').map(str::to_owned).collect(),
            "--step-head" => step_head = true,
            "--seed" => seed = val()?.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let (from, out) = (
        from.context("--from is required")?,
        out.context("--out is required")?,
    );
    let model = BertRewardModel::load_with_heads(&from, &aspects, step_head, &Device::Cpu)?;
    // std 0.5: heads large enough that scores spread over a few units, as a trained head's do.
    seeded_init_only(model.varmap(), model.fresh_heads(), seed, 0.5)?;
    model.save(&out)?;
    for file in [
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        if from.join(file).is_file() {
            std::fs::copy(from.join(file), out.join(file))?;
        }
    }
    Ok(())
}

fn score(mut args: impl Iterator<Item = String>) -> Result<()> {
    let (Some("--model"), Some(dir)) = (args.next().as_deref(), args.next()) else {
        bail!("usage: score_reward score --model DIR TEXT...");
    };
    let texts: Vec<String> = args.collect();
    if texts.is_empty() {
        bail!("no texts to score");
    }
    let model = BertRewardModel::load(&PathBuf::from(&dir), &[], &Device::Cpu)?;
    if !model.fresh_heads().is_empty() {
        bail!("{dir} lacks {:?}: not a reward model", model.fresh_heads());
    }
    let tok = &model
        .tokenizer()
        .context("the model has no tokenizer")?
        .tokenizer;
    let (mut ids, mut types) = (vec![], vec![]);
    for text in &texts {
        let enc = match text.split_once('\t') {
            Some((prompt, answer)) => tok.encode((prompt, answer), true),
            None => tok.encode(text.as_str(), true),
        }
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        ids.push(enc.get_ids().to_vec());
        types.push(enc.get_type_ids().to_vec());
    }
    let pad = tok.token_to_id("[PAD]").unwrap_or_default();
    let mut batch = EncodedBatch::from_ids(&ids, pad, &Device::Cpu)?;
    let width = batch.input_ids.dim(1)?;
    let types: Vec<u32> = types
        .iter()
        .flat_map(|t| {
            t.iter()
                .copied()
                .chain(std::iter::repeat_n(0, width - t.len()))
        })
        .collect();
    batch.token_type_ids = Tensor::from_vec(types, (texts.len(), width), &Device::Cpu)?;
    let out = model.forward(&batch, false)?;
    let mut cols = vec![out.score.unsqueeze(1)?];
    cols.extend(
        out.aspects
            .values()
            .map(|t| t.unsqueeze(1))
            .collect::<candle_core::Result<Vec<_>>>()?,
    );
    let scores: Vec<Vec<f32>> = Tensor::cat(&cols, 1)?.to_vec2()?;
    let columns: Vec<&str> = std::iter::once("reward")
        .chain(out.aspects.keys().map(String::as_str))
        .collect();
    println!(
        "{}",
        serde_json::json!({"columns": columns, "scores": scores})
    );
    Ok(())
}
