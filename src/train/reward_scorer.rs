//! The trained reward model as the policy objectives and the evaluation read it: loads a
//! `train reward` output directory (llama or BERT, chosen by `config.json`'s `model_type`) and
//! scores prompt + answer rows, giving the final score and every aspect head's output. Frozen:
//! nothing here records a graph or changes a weight.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};

use crate::model::bert::BertRewardModel;
use crate::model::family::SUPPORTED_MODEL_TYPES;
use crate::model::llama::{
    ClassifierOutput, LlamaConfig, LlamaForSequenceClassification, load_frozen_reward_model,
};
use crate::model::tokenizer::Tokenizer;
use crate::train::step_rewards::last_token_before;

/// A trained reward model (from `train reward`), scoring (prompt + answer) texts.
// One value per run holds a whole model either way; boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
pub enum RewardScorer {
    /// `LlamaForSequenceClassification`, read at the last non-pad token. Without its own
    /// `tokenizer.json` it must share the policy's vocabulary and is fed the policy's token ids.
    Llama {
        model: LlamaForSequenceClassification,
        tokenizer: Option<Tokenizer>,
        score_weight: Option<Tensor>,
    },
    /// A BERT encoder with a score head (`BertRewardModel`).
    Bert(Box<BertRewardModel>, Device),
}

impl std::fmt::Debug for RewardScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Llama { .. } => f.write_str("RewardScorer::Llama"),
            Self::Bert(..) => f.write_str("RewardScorer::Bert"),
        }
    }
}

/// The reward model's own tokenizer, when its directory has one.
fn scorer_tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Option<Tokenizer>> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Ok(None);
    }
    Ok(Some(Tokenizer::from_file(&tok_path)?.with_special_ids(
        config.pad_token_id,
        config.eos_token_ids().first().copied(),
    )))
}

impl RewardScorer {
    /// Loads a reward-model directory; `config.json`'s `model_type` picks the architecture.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_in(dir, device, DType::F32)
    }

    /// [`Self::load`] with the reward model's big weights held in `projections` (bf16 under
    /// `policy.precision: bf16`): a decoder's projections, or a BERT encoder's linear layers.
    pub fn load_in(dir: &Path, device: &Device, projections: DType) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "reading {}\nhint: pass the output directory of `train reward`",
                cfg_path.display()
            )
        })?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
        match cfg.get("model_type").and_then(|v| v.as_str()) {
            Some("bert") => Ok(Self::Bert(
                Box::new(BertRewardModel::load_frozen(dir, device, projections)?),
                device.clone(),
            )),
            Some(t) if !SUPPORTED_MODEL_TYPES.contains(&t) => bail!(
                "reward model type {t:?} in {} is not supported\nhint: use a BERT reward model or one of the decoder families {SUPPORTED_MODEL_TYPES:?}",
                cfg_path.display()
            ),
            _ if projections != DType::F32 => {
                let (model, config, score_weight) =
                    load_frozen_reward_model(dir, device, projections)?;
                Ok(Self::Llama {
                    model,
                    tokenizer: scorer_tokenizer(dir, &config)?,
                    score_weight,
                })
            }
            _ => {
                let p = LlamaForSequenceClassification::load(dir, Some(1), None, device)?;
                let tokenizer = scorer_tokenizer(dir, &p.config)?;
                let score_weight = p
                    .varmap
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .get("score.weight")
                    .map(|v| v.as_tensor().detach());
                Ok(Self::Llama {
                    model: p.model,
                    tokenizer,
                    score_weight,
                })
            }
        }
    }

    /// The `[1, hidden]` score head, to start a value head from (Llama reward models only).
    pub fn score_weight(&self) -> Option<&Tensor> {
        match self {
            Self::Llama { score_weight, .. } => score_weight.as_ref(),
            Self::Bert(..) => None,
        }
    }

    /// The names of the reward model's aspect heads, in the column order of
    /// [`ModelRewards::aspects`].
    pub fn aspect_names(&self) -> Vec<String> {
        match self {
            Self::Llama { model, .. } => model
                .aspect_names()
                .into_iter()
                .map(str::to_string)
                .collect(),
            // The BERT model keeps its heads in a name-ordered map.
            Self::Bert(m, _) => {
                let mut names = m.head_config().aspects.clone();
                names.sort();
                names
            }
        }
    }

    /// Scores rows given both as policy token ids (prompt + answer) and as text; each
    /// architecture reads the form it can.
    pub fn score(&self, ids: &[Vec<u32>], texts: &[String]) -> Result<Vec<f32>> {
        Ok(self.score_with_aspects(ids, texts)?.scores)
    }

    /// [`Self::score`] plus every aspect head's output for each row.
    pub fn score_with_aspects(&self, ids: &[Vec<u32>], texts: &[String]) -> Result<ModelRewards> {
        if ids.len() != texts.len() {
            bail!("{} id rows for {} texts", ids.len(), texts.len());
        }
        let rows_of = |t: Option<Tensor>| -> Result<Vec<Vec<f32>>> {
            match t {
                Some(t) => Ok(t.to_vec2::<f32>()?),
                None => Ok(vec![Vec::new(); ids.len()]),
            }
        };
        match self {
            Self::Llama {
                model, tokenizer, ..
            } => {
                let rows: Vec<Vec<u32>> = match tokenizer {
                    Some(t) => texts
                        .iter()
                        .map(|x| t.encode(x, false).map_err(anyhow::Error::from))
                        .collect::<Result<_>>()?,
                    None => ids.to_vec(),
                };
                let out = llama_forward(model, &rows)?;
                Ok(ModelRewards {
                    scores: out
                        .logits
                        .narrow(D::Minus1, 0, 1)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    aspects: rows_of(out.aspects)?,
                })
            }
            Self::Bert(m, dev) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let batch = m.encode(&refs, dev)?;
                let out = m.forward(&batch, false)?;
                // BTreeMap order: the sorted names of `aspect_names`.
                let cols: Vec<Tensor> = out
                    .aspects
                    .values()
                    .map(|t| t.unsqueeze(1))
                    .collect::<candle_core::Result<_>>()?;
                let aspects = (!cols.is_empty())
                    .then(|| Tensor::cat(&cols, 1))
                    .transpose()?;
                Ok(ModelRewards {
                    scores: out.score.to_vec1::<f32>()?,
                    aspects: rows_of(aspects)?,
                })
            }
        }
    }
}

impl RewardScorer {
    /// Refuses a reward model that cannot score steps (`policy.reward.step_weight` > 0).
    pub fn require_step_head(&self) -> Result<()> {
        match self {
            Self::Llama { model, .. } if model.has_step_head() => Ok(()),
            Self::Llama { .. } => bail!(
                "policy.reward.step_weight is set but the reward model has no step head\nhint: train it with `train reward` on feedback that has step thumbs, or set policy.reward.step_weight to 0"
            ),
            Self::Bert(..) => bail!(
                "policy.reward.step_weight needs a llama-family reward model; this one is BERT\nhint: set policy.reward.step_weight to 0, or train the reward model from a llama checkpoint"
            ),
        }
    }

    /// The step head's probability that each step is right, per row and step (`NaN` where no
    /// token carries the step). Each row is prompt + answer; the head is read at the last token
    /// that starts before the step's end (`step_rewards::last_token_before`), in the reward
    /// model's own tokenization when it has a tokenizer, else at the policy's answer tokens.
    pub fn step_probabilities(&self, rows: &[StepQuery<'_>]) -> Result<Vec<Vec<f64>>> {
        self.require_step_head()?;
        let Self::Llama {
            model, tokenizer, ..
        } = self
        else {
            bail!("step scoring needs a llama reward model");
        };
        let mut ids = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len());
        for q in rows {
            match tokenizer {
                Some(t) => {
                    let text = format!("{}{}", q.prompt, q.answer);
                    let enc = t
                        .inner()
                        .encode(text.as_str(), false)
                        .map_err(|e| anyhow::anyhow!("tokenising an answer for its steps: {e}"))?;
                    let at = q.prompt.len();
                    positions.push(
                        q.step_ends
                            .iter()
                            .map(|e| last_token_before(enc.get_offsets(), at + e))
                            .collect::<Vec<_>>(),
                    );
                    ids.push(enc.get_ids().to_vec());
                }
                None => {
                    let at = q.prompt_ids.len();
                    positions.push(
                        q.step_ends
                            .iter()
                            .map(|e| last_token_before(q.answer_spans, *e).map(|j| at + j))
                            .collect(),
                    );
                    ids.push(q.prompt_ids.iter().chain(q.answer_ids).copied().collect());
                }
            }
        }
        let out = llama_forward(model, &ids)?;
        let logits = out
            .step_logits
            .context("the reward model gave no step logits")?
            .to_vec2::<f32>()?;
        Ok(positions
            .iter()
            .zip(&logits)
            .map(|(pos, row)| {
                pos.iter()
                    .map(|p| match p {
                        Some(j) => 1.0 / (1.0 + (-f64::from(row[*j])).exp()),
                        None => f64::NAN,
                    })
                    .collect()
            })
            .collect())
    }
}

/// One answer whose steps the step head scores.
#[derive(Debug, Clone, Copy)]
pub struct StepQuery<'a> {
    pub prompt: &'a str,
    /// The answer's text, as the reward reads it.
    pub answer: &'a str,
    pub prompt_ids: &'a [u32],
    pub answer_ids: &'a [u32],
    /// Each answer token's `(start, end)` bytes in `answer` (`step_rewards::token_spans`).
    pub answer_spans: &'a [(usize, usize)],
    /// Byte offsets in `answer` where its steps end (`step_rewards::split_steps`).
    pub step_ends: &'a [usize],
}

/// Pads `rows` (token ids in the model's vocabulary) and runs the reward model once.
fn llama_forward(
    model: &LlamaForSequenceClassification,
    rows: &[Vec<u32>],
) -> Result<ClassifierOutput> {
    let cfg = model.config();
    let pad = cfg
        .pad_token_id
        .or_else(|| cfg.eos_token_ids().first().copied())
        .unwrap_or(0);
    if let Some(bad) = rows
        .iter()
        .flatten()
        .find(|&&x| x as usize >= cfg.vocab_size)
    {
        bail!(
            "token id {bad} is outside the reward model's vocabulary ({})\nhint: give the reward model directory its tokenizer.json",
            cfg.vocab_size
        );
    }
    let dev = model.model().embed_weight().device().clone();
    let t = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let b = rows.len();
    let mut flat = vec![pad; b * t];
    let mut mask = vec![0u32; b * t];
    for (i, r) in rows.iter().enumerate() {
        for (j, &x) in r.iter().enumerate() {
            flat[i * t + j] = x;
            mask[i * t + j] = 1;
        }
    }
    let ids = Tensor::from_vec(flat, (b, t), &dev)?;
    let mask = Tensor::from_vec(mask, (b, t), &dev)?;
    Ok(model.forward(&ids, Some(&mask))?)
}

/// The reward model's outputs for a batch of rows.
#[derive(Debug, Clone)]
pub struct ModelRewards {
    /// The final score of each row.
    pub scores: Vec<f32>,
    /// Each row's aspect-head outputs, in [`RewardScorer::aspect_names`] order.
    pub aspects: Vec<Vec<f32>>,
}

/// Prompt + answer rows in both forms a reward model reads: token ids and text.
pub(crate) fn joined_rows(
    prompts: &[&str],
    prompt_ids: &[Vec<u32>],
    answer_ids: &[Vec<u32>],
    answer_texts: &[String],
) -> (Vec<Vec<u32>>, Vec<String>) {
    let ids = prompt_ids
        .iter()
        .zip(answer_ids)
        .map(|(p, r)| p.iter().chain(r).copied().collect())
        .collect();
    let texts = prompts
        .iter()
        .zip(answer_texts)
        .map(|(p, a)| format!("{p}{a}"))
        .collect();
    (ids, texts)
}
