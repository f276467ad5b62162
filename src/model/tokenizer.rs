//! Tokenizer wrapper over the `tokenizers` crate, with the batching the trainers need.
//!
//! Training batches are rectangular `[batch, seq]` id and mask tensors. Reward and DPO batches
//! pad on the right; generation prompts pad on the left so that every row's next token is in
//! the last column. Padding and truncation are done here, explicitly, rather than through the
//! tokenizer.json's own padding settings, so the result never depends on what a checkpoint's
//! tokenizer file happens to configure.

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};

/// Which side receives padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    #[default]
    Right,
    Left,
}

/// Which end is cut when a sequence exceeds the maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationSide {
    /// Keep the beginning (drop the tail).
    #[default]
    Right,
    /// Keep the end (drop the head): what a prompt for generation wants.
    Left,
}

/// How [`Tokenizer::encode_batch`] shapes a batch.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub add_special_tokens: bool,
    pub padding_side: PaddingSide,
    pub truncation_side: TruncationSide,
    /// Longest row kept; `None` keeps every token.
    pub max_length: Option<usize>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            add_special_tokens: true,
            padding_side: PaddingSide::Right,
            truncation_side: TruncationSide::Right,
            max_length: None,
        }
    }
}

/// A padded batch: `input_ids` and `attention_mask` rows of equal length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

impl Batch {
    /// `(input_ids, attention_mask)` as `[batch, seq]` u32 tensors.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            rows_to_tensor(&self.input_ids, device)?,
            rows_to_tensor(&self.attention_mask, device)?,
        ))
    }
}

/// A `[rows, cols]` u32 tensor from equal-length rows.
pub fn rows_to_tensor(rows: &[Vec<u32>], device: &Device) -> candle_core::Result<Tensor> {
    let cols = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != cols) {
        candle_core::bail!("rows of unequal length cannot form a tensor");
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), cols), device)
}

/// Why the tokenizer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "no pad token: tokenizer has none of {tried:?}\nhint: set pad_token_id in the model config or pass a pad id"
    )]
    NoPad { tried: Vec<String> },
    #[error("tokenizer failed on {what}: {message}")]
    Tokenizers { what: &'static str, message: String },
}

/// A loaded `tokenizer.json` plus the special ids the trainers need.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: Option<u32>,
    eos_id: Option<u32>,
}

/// Conventional special-token spellings, tried in order when the caller names none.
const EOS_CANDIDATES: &[&str] = &["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<eos>"];
const PAD_CANDIDATES: &[&str] = &["<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"];

impl Tokenizer {
    /// Loads `path` (a `tokenizer.json`). Special ids are looked up among common spellings;
    /// override them with [`Self::with_special_ids`] from the model config.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("loading tokenizer {}", path.display()))?;
        let eos_id = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        let pad_id = PAD_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        Ok(Self {
            inner,
            pad_id,
            eos_id,
        })
    }

    /// Sets the pad and eos ids (typically `pad_token_id` / `eos_token_id` from config.json);
    /// `None` keeps the current value.
    pub fn with_special_ids(mut self, pad: Option<u32>, eos: Option<u32>) -> Self {
        if pad.is_some() {
            self.pad_id = pad;
        }
        if eos.is_some() {
            self.eos_id = eos;
        }
        self
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The pad id; falls back to the eos id (the usual choice for decoder-only models, and
    /// SmolLM2's own `pad_token`).
    pub fn pad_id(&self) -> Result<u32, TokenizerError> {
        self.pad_id
            .or(self.eos_id)
            .ok_or_else(|| TokenizerError::NoPad {
                tried: PAD_CANDIDATES
                    .iter()
                    .chain(EOS_CANDIDATES)
                    .map(|s| (*s).to_owned())
                    .collect(),
            })
    }

    /// Token ids of `text`, with or without the tokenizer's special tokens (BOS etc.).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Tokenizers {
                what: "encode",
                message: e.to_string(),
            })
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Tokenizers {
                what: "decode",
                message: e.to_string(),
            })
    }

    /// Encodes, truncates and pads `texts` into one rectangular batch.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        opts: &BatchOptions,
    ) -> Result<Batch, TokenizerError> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t, opts.add_special_tokens))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pad_batch(rows, self.pad_id()?, opts))
    }
}

/// Truncates and pads already-tokenised rows (used for prompt + completion pairs built from
/// separately encoded pieces).
pub fn pad_batch(rows: Vec<Vec<u32>>, pad_id: u32, opts: &BatchOptions) -> Batch {
    let rows: Vec<Vec<u32>> = rows
        .into_iter()
        .map(|mut r| {
            if let Some(max) = opts.max_length
                && r.len() > max
            {
                match opts.truncation_side {
                    TruncationSide::Right => r.truncate(max),
                    TruncationSide::Left => {
                        r.drain(..r.len() - max);
                    }
                }
            }
            r
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows.len());
    let mut attention_mask = Vec::with_capacity(rows.len());
    for r in rows {
        let pad = width - r.len();
        let (ids, mask) = match opts.padding_side {
            PaddingSide::Right => (
                r.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, pad))
                    .collect(),
                std::iter::repeat_n(1, r.len())
                    .chain(std::iter::repeat_n(0, pad))
                    .collect(),
            ),
            PaddingSide::Left => (
                std::iter::repeat_n(pad_id, pad)
                    .chain(r.iter().copied())
                    .collect(),
                std::iter::repeat_n(0, pad)
                    .chain(std::iter::repeat_n(1, r.len()))
                    .collect(),
            ),
        };
        input_ids.push(ids);
        attention_mask.push(mask);
    }
    Batch {
        input_ids,
        attention_mask,
    }
}
