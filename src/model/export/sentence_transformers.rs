//! The BERT reward model (an encoder, mean or `[CLS]` pooling, and this project's linear heads)
//! as a sentence-transformers directory, so a team scores with `SentenceTransformer(dir).encode`
//! or with plain transformers, without rlhf-bot.
//!
//! Why not `BertForSequenceClassification`: that class puts BERT's pooler (`[CLS]`, dense, tanh)
//! before its classifier, and our heads read the pooled encoder output directly, so no renaming of
//! weights would make it compute our score. sentence-transformers' module chain (Transformer →
//! Pooling → Dense) is exactly our forward pass. The layout ([`st_layout`]) is shared with the
//! loader in `model::bert`, which reads this directory back: the Dense rows are the score, then
//! the aspect heads in name order; the per-token step head goes in its own file because a Dense
//! after pooling cannot express it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use super::{WeightDtype, cast_all, read_json, write_json};
use crate::model::bert::{BertRewardModel, Pooling, REWARD_CONFIG_KEY, st_layout};
use crate::model::checkpoint_io::save_tensors;

/// BERT's special tokens, written to `tokenizer_config.json` when the vocabulary has them (the
/// sentence-transformers `Transformer` module pads, so `pad_token` must be known).
const BERT_SPECIAL_TOKENS: [(&str, &str); 5] = [
    ("cls_token", "[CLS]"),
    ("sep_token", "[SEP]"),
    ("pad_token", "[PAD]"),
    ("mask_token", "[MASK]"),
    ("unk_token", "[UNK]"),
];

/// Writes the BERT reward model in `src` (as `train reward` leaves it) as a sentence-transformers
/// directory at `out`; returns the files written.
pub fn write_bert_reward(src: &Path, dtype: WeightDtype, out: &Path) -> Result<Vec<PathBuf>> {
    let model = BertRewardModel::load(src, &[], &Device::Cpu)
        .with_context(|| format!("loading the BERT reward model in {}", src.display()))?;
    if !model.fresh_heads().is_empty() {
        bail!(
            "{} has no trained reward head ({} missing)\nhint: export the output of `train reward`, not a plain sentence encoder",
            src.display(),
            model.fresh_heads().join(", ")
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let head = model.head_config();
    let mut aspects = head.aspects.clone();
    aspects.sort();
    let vars: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    let is_head = |name: &str| {
        name.starts_with("score.")
            || name.starts_with("aspect_heads.")
            || name.starts_with("step_head.")
    };
    let encoder: HashMap<String, Tensor> = vars
        .iter()
        .filter(|(name, _)| !is_head(name))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();

    let mut files = Vec::new();
    let cfg = model.config();
    let mut config = serde_json::to_value(cfg)?;
    config["architectures"] = serde_json::json!(["BertModel"]);
    config["model_type"] = "bert".into();
    for key in ["torch_dtype", "dtype"] {
        config[key] = dtype.torch_name().into();
    }
    // Aspects in Dense row order, so the config alone tells which output column is which.
    let mut recorded = head.clone();
    recorded.aspects = aspects.clone();
    config[REWARD_CONFIG_KEY] = serde_json::to_value(&recorded)?;
    files.push(write_json(out, "config.json", &config)?);
    files.push(save(&encoder, dtype, &out.join("model.safetensors"))?);

    // Pooling, then one Dense whose rows are the score and the aspect heads.
    let rows: Vec<String> = std::iter::once("score".to_string())
        .chain(aspects.iter().map(|a| format!("aspect_heads.{a}")))
        .collect();
    let pick = |suffix: &str| -> Result<Tensor> {
        let parts = rows
            .iter()
            .map(|r| {
                vars.get(&format!("{r}.{suffix}"))
                    .cloned()
                    .with_context(|| format!("the reward model has no {r}.{suffix}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let dense_dir = out.join(st_layout::DENSE_DIR);
    std::fs::create_dir_all(&dense_dir)
        .with_context(|| format!("creating {}", dense_dir.display()))?;
    let dense = HashMap::from([
        ("linear.weight".to_string(), pick("weight")?),
        ("linear.bias".to_string(), pick("bias")?),
    ]);
    files.push(save(&dense, dtype, &dense_dir.join("model.safetensors"))?);
    files.push(write_json(
        &dense_dir,
        "config.json",
        &serde_json::json!({
            "in_features": cfg.hidden_size,
            "out_features": rows.len(),
            "bias": true,
            "activation_function": "torch.nn.modules.linear.Identity",
        }),
    )?);
    let pooling_dir = out.join(st_layout::POOLING_DIR);
    std::fs::create_dir_all(&pooling_dir)
        .with_context(|| format!("creating {}", pooling_dir.display()))?;
    files.push(write_json(
        &pooling_dir,
        "config.json",
        &serde_json::json!({
            "word_embedding_dimension": cfg.hidden_size,
            "pooling_mode_cls_token": head.pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": head.pooling == Pooling::Mean,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true,
        }),
    )?);
    if head.step_head {
        let step = HashMap::from([
            ("weight".to_string(), vars["step_head.weight"].clone()),
            ("bias".to_string(), vars["step_head.bias"].clone()),
        ]);
        files.push(save(&step, dtype, &out.join(st_layout::STEP_HEAD_FILE))?);
    }
    files.push(write_json(
        out,
        st_layout::MODULES,
        &serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": st_layout::POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": st_layout::DENSE_DIR, "type": "sentence_transformers.models.Dense"},
        ]),
    )?);
    // Our scoring truncates at the position table; the Transformer module must do the same.
    files.push(write_json(
        out,
        "sentence_bert_config.json",
        &serde_json::json!({"max_seq_length": cfg.max_position_embeddings, "do_lower_case": false}),
    )?);
    files.push(write_json(
        out,
        "config_sentence_transformers.json",
        &serde_json::json!({
            "__version__": {"sentence_transformers": "3.0.1"},
            "prompts": {},
            "default_prompt_name": null,
            "similarity_fn_name": null,
        }),
    )?);
    files.extend(write_tokenizer(src, cfg.max_position_embeddings, out)?);
    files.push(write_model_card(
        &aspects,
        head.step_head,
        head.pooling,
        out,
    )?);
    Ok(files)
}

fn save(tensors: &HashMap<String, Tensor>, dtype: WeightDtype, path: &Path) -> Result<PathBuf> {
    save_tensors(&cast_all(tensors, dtype.dtype())?, path)?;
    Ok(path.to_path_buf())
}

/// `tokenizer.json` verbatim, `vocab.txt` when the source has one, and a `tokenizer_config.json`
/// / `special_tokens_map.json` naming BERT's special tokens.
fn write_tokenizer(src: &Path, max_len: usize, out: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for name in ["tokenizer.json", "vocab.txt"] {
        let from = src.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            files.push(to);
        }
    }
    let tok_json = read_json(&src.join("tokenizer.json"))?.unwrap_or_default();
    let mut cfg = read_json(&src.join("tokenizer_config.json"))?
        .and_then(|c| c.as_object().cloned())
        .unwrap_or_default();
    cfg.insert("tokenizer_class".into(), "BertTokenizerFast".into());
    cfg.entry("model_max_length")
        .or_insert_with(|| max_len.into());
    let mut map = BTreeMap::new();
    for (key, token) in BERT_SPECIAL_TOKENS {
        if has_token(&tok_json, token) {
            cfg.insert(key.into(), token.into());
            map.insert(key, token);
        }
    }
    files.push(write_json(out, "tokenizer_config.json", &cfg.into())?);
    files.push(write_json(
        out,
        "special_tokens_map.json",
        &serde_json::to_value(map)?,
    )?);
    Ok(files)
}

fn has_token(tok_json: &serde_json::Value, token: &str) -> bool {
    tok_json["model"]["vocab"].get(token).is_some()
        || tok_json["added_tokens"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["content"] == token))
}

/// `README.md`: how to score with sentence-transformers and with plain transformers, which
/// output column is which, and what the step head file is.
fn write_model_card(
    aspects: &[String],
    step_head: bool,
    pooling: Pooling,
    out: &Path,
) -> Result<PathBuf> {
    let mut columns = String::from("| 0 | `reward` (the score `train reward` optimised) |\n");
    for (i, a) in aspects.iter().enumerate() {
        columns.push_str(&format!("| {} | aspect `{a}` |\n", i + 1));
    }
    let (pool_name, pool_code) = match pooling {
        Pooling::Mean => (
            "the mean of the last hidden state over real (unmasked) tokens",
            "m = enc[\"attention_mask\"].unsqueeze(-1).to(h.dtype)\n    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)",
        ),
        Pooling::Cls => ("the `[CLS]` token's last hidden state", "pooled = h[:, 0]"),
    };
    let step = if step_head {
        format!(
            "\n## Step head\n\n`{}` holds the per-token process-reward head (`weight` [1, hidden], \
             `bias` [1]): step logits are `last_hidden_state @ weight.T + bias` at every token, read \
             at the token that ends each reasoning step. sentence-transformers does not load it.\n",
            st_layout::STEP_HEAD_FILE
        )
    } else {
        String::new()
    };
    let card = format!(
        r#"---
library_name: sentence-transformers
tags:
- sentence-transformers
- reward-model
- rlhf-bot
---

# Reward model exported by rlhf-bot

A BERT encoder, {pool_name}, and a linear head: the output vector's columns are

| column | meaning |
|---|---|
{columns}
The model was trained on a prompt and an answer encoded as a BERT sentence pair
(`[CLS] prompt [SEP] answer [SEP]`, token type 1 on the answer): score pairs the same way.
Higher is better; scores are comparable between answers to one prompt.

## Scoring with sentence-transformers

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/this/dir")
scores = model.encode([("What is a carbon tax?", "A price on emissions.")])  # [n, {n_cols}]
reward = scores[:, 0]
```

## Scoring with transformers only

```python
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/this/dir")
enc_model = AutoModel.from_pretrained("path/to/this/dir", torch_dtype=torch.float32)
dense = load_file("path/to/this/dir/{dense}/model.safetensors")
with torch.no_grad():
    enc = tok(["What is a carbon tax?"], ["A price on emissions."], padding=True, return_tensors="pt")
    h = enc_model(**enc).last_hidden_state
    {pool_code}
    scores = pooled @ dense["linear.weight"].float().T + dense["linear.bias"].float()
```

`BertForSequenceClassification` would put BERT's tanh pooler before the head and compute a
different score: do not load this directory with it. transformers reports the `pooler.*`
weights as newly initialised when it loads the encoder; nothing above uses them.
{step}"#,
        n_cols = 1 + aspects.len(),
        dense = st_layout::DENSE_DIR,
    );
    let path = out.join("README.md");
    std::fs::write(&path, card).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
