//! From text examples to padded token batches for the reward model.
//!
//! Every example is tokenised once, before training, as two pieces — the rendered prompt and the
//! answer — so truncation can keep what decides a preference: the END of the prompt (the last
//! user turn) and the START of the answer. The backbone's [`SequenceLayout`] then adds its special
//! tokens (`[CLS] prompt [SEP] answer [SEP]` for BERT, nothing for a llama reward model, whose
//! score is read at the last token as TRL does). Batches are padded to their own longest row
//! (dynamic padding), which on CPU matters more than anything else for speed: attention cost grows
//! with the square of the padded length.
//!
//! Pair batches hold the chosen rows first, then the rejected rows, so the reward vector splits
//! into `[..B]` chosen and `[B..]` rejected, as in TRL's `RewardTrainer`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::tokenizer::Tokenizer;
use crate::train::step_rewards::last_token_before;

/// One preference pair as text. `prompt` is the conversation before the answer, already rendered
/// (see [`crate::dataset::render_plain_prompt`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairText {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// How much more the chosen answer is preferred (subtracted inside the Bradley–Terry logit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// The pair's weight in the pairwise mean when not 1 (the influence cap's share of its
    /// evidence, or a constitution pair's `constitution.weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// One answer judged on its own: the kinds of feedback that do not compare two answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointText {
    pub prompt: String,
    pub answer: String,
    pub label: PointLabel,
}

/// What was said about a single answer (see docs/reward-training.md for the loss each becomes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointLabel {
    /// Thumb majority on the whole answer (BCE on the score).
    Thumb(bool),
    /// Rating (or overall score) scaled to `[0, 1]` (MSE on `σ(score)` or soft BCE).
    Rating(f64),
    /// Reasoning-step labels: `ends[i]` is the byte offset in `answer` where step `i` ends; a
    /// `None` label (tied votes) is not trained on.
    Steps {
        ends: Vec<usize>,
        labels: Vec<Option<bool>>,
    },
    /// Per-aspect ratings scaled to `[0, 1]`.
    Aspects(BTreeMap<String, f64>),
}

/// Special tokens a backbone wraps around `prompt` and `answer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceLayout {
    pub prefix: Vec<u32>,
    /// Between prompt and answer.
    pub separator: Vec<u32>,
    pub suffix: Vec<u32>,
    /// Whether the backbone reads segment ids (BERT's `token_type_ids`: 0 prompt, 1 answer).
    pub token_types: bool,
    pub pad_id: u32,
}

impl SequenceLayout {
    fn specials(&self) -> usize {
        self.prefix.len() + self.separator.len() + self.suffix.len()
    }
}

/// A tokenised row: ids plus segment ids (all zero when the layout has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
}

/// Cuts `prompt` and `answer` so the assembled row fits `max_len`: the answer keeps its start,
/// the prompt its end. The answer gets at least half of the budget (more when the prompt is
/// short), so a long conversation cannot squeeze the answer out.
pub fn assemble(
    prompt: &[u32],
    answer: &[u32],
    max_len: usize,
    layout: &SequenceLayout,
) -> Result<Row> {
    Ok(assemble_parts(prompt, answer, max_len, layout)?.0)
}

/// [`assemble`], also returning where the answer starts in the row and how many of its tokens
/// were kept (step labels are read at answer tokens and need both).
fn assemble_parts(
    prompt: &[u32],
    answer: &[u32],
    max_len: usize,
    layout: &SequenceLayout,
) -> Result<(Row, usize, usize)> {
    let budget = max_len.checked_sub(layout.specials()).filter(|b| *b >= 2).with_context(|| {
        format!(
            "max_length {max_len} leaves no room for text after {} special tokens\nhint: raise max_length",
            layout.specials()
        )
    })?;
    let (p_keep, a_keep) = if prompt.len() + answer.len() <= budget {
        (prompt.len(), answer.len())
    } else {
        let a_keep = answer
            .len()
            .min(budget.saturating_sub(prompt.len()).max(budget / 2));
        (prompt.len().min(budget - a_keep), a_keep)
    };
    let p = &prompt[prompt.len() - p_keep..];
    let a = &answer[..a_keep];
    let mut ids = Vec::with_capacity(max_len);
    ids.extend_from_slice(&layout.prefix);
    ids.extend_from_slice(p);
    ids.extend_from_slice(&layout.separator);
    let first_answer = ids.len();
    ids.extend_from_slice(a);
    ids.extend_from_slice(&layout.suffix);
    let types = if layout.token_types {
        (0..ids.len())
            .map(|i| u32::from(i >= first_answer))
            .collect()
    } else {
        vec![0; ids.len()]
    };
    if ids.is_empty() {
        bail!(
            "an example tokenised to nothing\nhint: drop empty prompts and answers from the dataset"
        );
    }
    Ok((Row { ids, types }, first_answer, a_keep))
}

/// A pair, tokenised.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Row,
    pub rejected: Row,
    pub margin: f64,
    /// Weight in the pairwise mean (1 unless the pair says otherwise).
    pub weight: f64,
}

/// A single-answer example, tokenised.
#[derive(Debug, Clone)]
pub struct EncodedPoint {
    pub row: Row,
    pub target: PointTarget,
}

/// The label of an [`EncodedPoint`], placed where the model reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum PointTarget {
    /// 1 up, 0 down.
    Thumb(f32),
    /// In `[0, 1]`.
    Rating(f32),
    /// `positions[i]` is the row index of the last token of a labelled step, `labels[i]` 1 for a
    /// correct step and 0 for a wrong one (steps cut off by truncation or tied are left out).
    Steps {
        positions: Vec<usize>,
        labels: Vec<f32>,
    },
    /// One entry per aspect head, in the model's column order; `None` where not rated.
    Aspects(Vec<Option<f32>>),
}
/// The tokenizer without the truncation and padding a `tokenizer.json` may carry (MiniLM's
/// truncates at 128 and pads): truncation here must be ours, piece by piece.
fn plain(tok: &Tokenizer) -> Result<tokenizers::Tokenizer> {
    let mut t = tok.inner().clone();
    t.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("disabling the tokenizer's truncation")?;
    t.with_padding(None);
    Ok(t)
}

fn encode_text(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("tokenising {:?}", text.chars().take(60).collect::<String>()))
}

/// Tokenises pairs (prompt once per pair).
pub fn encode_pairs(
    tok: &Tokenizer,
    pairs: &[PairText],
    max_len: usize,
    layout: &SequenceLayout,
) -> Result<Vec<EncodedPair>> {
    let tok = plain(tok)?;
    let tok = &tok;
    pairs
        .iter()
        .map(|p| {
            let prompt = encode_text(tok, &p.prompt)?;
            Ok(EncodedPair {
                chosen: assemble(&prompt, &encode_text(tok, &p.chosen)?, max_len, layout)?,
                rejected: assemble(&prompt, &encode_text(tok, &p.rejected)?, max_len, layout)?,
                margin: p.margin.unwrap_or(0.0),
                weight: p.weight.unwrap_or(1.0),
            })
        })
        .collect()
}

/// Tokenises single-answer examples. `aspects` is the model's aspect-head order; an aspect the
/// model has no head for is an error. Step examples whose labelled steps all fall beyond the
/// truncated answer are left out (they would train nothing).
pub fn encode_points(
    tok: &Tokenizer,
    points: &[PointText],
    max_len: usize,
    layout: &SequenceLayout,
    aspects: &[String],
) -> Result<Vec<EncodedPoint>> {
    let tok = plain(tok)?;
    let tok = &tok;
    let mut out = Vec::with_capacity(points.len());
    let mut dropped_steps = 0usize;
    for p in points {
        let prompt = encode_text(tok, &p.prompt)?;
        let answer = tok
            .encode(p.answer.as_str(), false)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "tokenising {:?}",
                    p.answer.chars().take(60).collect::<String>()
                )
            })?;
        let (row, answer_start, kept) = assemble_parts(&prompt, answer.get_ids(), max_len, layout)?;
        let target = match &p.label {
            PointLabel::Thumb(up) => PointTarget::Thumb(if *up { 1.0 } else { 0.0 }),
            PointLabel::Rating(r) => PointTarget::Rating(*r as f32),
            PointLabel::Steps { ends, labels } => {
                let offsets = &answer.get_offsets()[..kept];
                let (mut positions, mut ys) = (Vec::new(), Vec::new());
                for (end, label) in ends.iter().zip(labels) {
                    let Some(label) = label else { continue };
                    if let Some(j) = last_token_before(offsets, *end) {
                        positions.push(answer_start + j);
                        ys.push(if *label { 1.0 } else { 0.0 });
                    }
                }
                if positions.is_empty() {
                    dropped_steps += 1;
                    continue;
                }
                PointTarget::Steps {
                    positions,
                    labels: ys,
                }
            }
            PointLabel::Aspects(targets) => {
                if let Some(name) = targets.keys().find(|k| !aspects.contains(k)) {
                    bail!(
                        "an example is rated on aspect {name:?} but the reward model has heads only for {aspects:?}\nhint: list the aspect under feedback.aspects"
                    );
                }
                PointTarget::Aspects(
                    aspects
                        .iter()
                        .map(|a| targets.get(a).map(|v| *v as f32))
                        .collect(),
                )
            }
        };
        out.push(EncodedPoint { row, target });
    }
    if dropped_steps > 0 {
        tracing::info!(
            dropped_steps,
            "step examples left out: every labelled step lies beyond max_length"
        );
    }
    Ok(out)
}

/// A padded batch on a device.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `[rows, seq]` u32.
    pub input_ids: Tensor,
    /// `[rows, seq]` u32, 1 on real tokens.
    pub attention_mask: Tensor,
    /// `[rows, seq]` u32 segment ids (zeros when the layout has none).
    pub token_type_ids: Tensor,
    /// Real (non-pad) tokens in the batch.
    pub tokens: u64,
}

impl TokenBatch {
    pub fn rows(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }
}

/// Right-pads `rows` to the longest one.
pub fn collate(rows: &[&Row], pad_id: u32, device: &Device) -> Result<TokenBatch> {
    let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    if rows.is_empty() || width == 0 {
        bail!("cannot build an empty batch");
    }
    let n = rows.len();
    let mut ids = Vec::with_capacity(n * width);
    let mut mask = Vec::with_capacity(n * width);
    let mut types = Vec::with_capacity(n * width);
    let mut tokens = 0u64;
    for r in rows {
        let pad = width - r.ids.len();
        tokens += r.ids.len() as u64;
        ids.extend_from_slice(&r.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        mask.extend(std::iter::repeat_n(1u32, r.ids.len()));
        mask.extend(std::iter::repeat_n(0u32, pad));
        types.extend_from_slice(&r.types);
        types.extend(std::iter::repeat_n(0u32, pad));
    }
    Ok(TokenBatch {
        input_ids: Tensor::from_vec(ids, (n, width), device)?,
        attention_mask: Tensor::from_vec(mask, (n, width), device)?,
        token_type_ids: Tensor::from_vec(types, (n, width), device)?,
        tokens,
    })
}

/// A batch of pairs: chosen rows then rejected rows, plus the margins `[B]`.
pub fn collate_pairs(
    pairs: &[&EncodedPair],
    pad_id: u32,
    device: &Device,
) -> Result<(TokenBatch, Vec<f64>)> {
    let margins = pairs.iter().map(|p| p.margin).collect();
    Ok((collate_mixed(pairs, &[], pad_id, device)?, margins))
}

/// One forward pass worth of mixed examples: the rows of `pairs` (chosen, then rejected) followed
/// by one row per point, so a single forward scores them all.
pub fn collate_mixed(
    pairs: &[&EncodedPair],
    points: &[&EncodedPoint],
    pad_id: u32,
    device: &Device,
) -> Result<TokenBatch> {
    let rows: Vec<&Row> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .chain(points.iter().map(|p| &p.row))
        .collect();
    collate(&rows, pad_id, device)
}
