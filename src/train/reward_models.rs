//! Adapters from the concrete reward models to the reward objective's [`RewardBackbone`], plus
//! the small llama reward model trained from scratch when no `--model` is given. Both backbones
//! can carry extra heads ([`ExtraHeads`]: per-aspect heads `aspect_heads.<name>.*` and a per-token
//! `step_head.*`); loading adds the heads a run needs, initialised, when the checkpoint lacks them.
//!
//! Evaluation scores through a twin of each model built over detached views of the same weight
//! storage (`checkpoint_io::detached_view`): the optimiser updates the weights in place, so the
//! twin always sees the current values, and no op on it records a graph.
//!
//! The decoder reads its score at the last real token and wants no special tokens (TRL's reward
//! batches carry the plain text tokens); the default model's weights are drawn from a seeded
//! ChaCha8 stream because candle's CPU initialisers cannot be seeded, and "same seed, same
//! weights" must hold from the first step.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::batching::{SequenceLayout, TokenBatch};
use super::reward_trainer::{RewardBackbone, RewardForward};
use crate::model::bert::{BertRewardModel, EncodedBatch};
use crate::model::checkpoint_io;
use crate::model::llama::{
    Architecture, ExtraHeads, LlamaConfig, LlamaForSequenceClassification, save_pretrained,
};
use crate::model::tokenizer::Tokenizer;

/// The SmolLM2 tokenizer, embedded so the default model needs no files.
pub const DEFAULT_TOKENIZER_JSON: &[u8] =
    include_bytes!("../../tests/fixtures/tiny-llama-policy/tokenizer.json");

/// A llama-family reward model (`LlamaForSequenceClassification`, 1 label).
pub struct LlamaReward {
    pub model: LlamaForSequenceClassification,
    pub varmap: VarMap,
    pub config: LlamaConfig,
    layout: SequenceLayout,
    /// The same model over detached weights, built on first use ([`RewardBackbone::score`]).
    scorer: OnceLock<LlamaForSequenceClassification>,
}

impl LlamaReward {
    /// Loads a reward model, or starts one from a causal-LM checkpoint (the score head is then
    /// initialised).
    pub fn load(dir: &Path, tok: &Tokenizer, device: &Device) -> Result<Self> {
        Self::load_with_heads(dir, tok, &ExtraHeads::default(), 0, device)
    }

    /// [`LlamaReward::load`] with at least the extra heads in `heads` (those the checkpoint's
    /// config already records are kept). Heads the checkpoint lacks are drawn from `seed`.
    pub fn load_with_heads(
        dir: &Path,
        tok: &Tokenizer,
        heads: &ExtraHeads,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let saved = LlamaConfig::from_dir(dir)?.extra_heads.unwrap_or_default();
        let merged = merge_heads(&saved, heads);
        let p = LlamaForSequenceClassification::load(dir, Some(1), Some(merged), device)
            .with_context(|| format!("loading the llama reward model in {}", dir.display()))?;
        seeded_init_only(
            &p.varmap,
            &p.report.initialised,
            seed,
            p.config.initializer_range,
        )?;
        Ok(Self::wrap(p.model, p.varmap, p.config, tok))
    }

    /// A randomly initialised model of `config`, its weights drawn from `seed`.
    pub fn random(
        mut config: LlamaConfig,
        tok: &Tokenizer,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.set_num_labels(1);
        if config.pad_token_id.is_none() {
            config.pad_token_id = tok.pad_id().ok();
        }
        let (model, varmap) = LlamaForSequenceClassification::random(&config, device)?;
        seeded_init(&varmap, seed, config.initializer_range)?;
        Ok(Self::wrap(model, varmap, config, tok))
    }

    fn wrap(
        model: LlamaForSequenceClassification,
        varmap: VarMap,
        config: LlamaConfig,
        tok: &Tokenizer,
    ) -> Self {
        // The pooled token is the last one that is not the pad id (transformers' rule), so the
        // batch must be padded with exactly that id.
        let pad_id = config
            .pad_token_id
            .or_else(|| tok.pad_id().ok())
            .unwrap_or(0);
        Self {
            model,
            varmap,
            config,
            layout: SequenceLayout {
                pad_id,
                ..SequenceLayout::default()
            },
            scorer: OnceLock::new(),
        }
    }

    fn scorer(&self) -> candle_core::Result<&LlamaForSequenceClassification> {
        if let Some(m) = self.scorer.get() {
            return Ok(m);
        }
        let vb = checkpoint_io::detached_view(&self.varmap);
        let twin = LlamaForSequenceClassification::new(&self.config, vb)?;
        Ok(self.scorer.get_or_init(|| twin))
    }
}

impl std::fmt::Debug for LlamaReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaReward")
            .field("config", &self.config)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// The default model trained from scratch: 2 layers, hidden 64, the SmolLM2 vocabulary.
pub fn default_llama_config(tok: &Tokenizer) -> LlamaConfig {
    let mut cfg = LlamaConfig::new(tok.vocab_size(), 64, 128, 2, 4, 2, true);
    cfg.max_position_embeddings = 2048;
    cfg.pad_token_id = tok.pad_id().ok();
    cfg
}

impl LlamaReward {
    fn forward_with(
        model: &LlamaForSequenceClassification,
        batch: &TokenBatch,
    ) -> candle_core::Result<RewardForward> {
        let out = model.forward(&batch.input_ids, Some(&batch.attention_mask))?;
        Ok(RewardForward {
            rewards: out.logits.flatten_all()?,
            aspects: out.aspects,
            step_logits: out.step_logits,
        })
    }
}

impl RewardBackbone for LlamaReward {
    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        Self::forward_with(&self.model, batch)
    }
    fn score(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        Self::forward_with(self.scorer()?, batch)
    }
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    fn layout(&self) -> &SequenceLayout {
        &self.layout
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        save_pretrained(
            dir,
            &self.config,
            &self.varmap,
            Architecture::SequenceClassification,
        )
    }
    fn kind(&self) -> &'static str {
        "llama"
    }
    fn aspect_names(&self) -> Vec<String> {
        self.model
            .aspect_names()
            .into_iter()
            .map(str::to_string)
            .collect()
    }
    fn has_step_head(&self) -> bool {
        self.config
            .extra_heads
            .as_ref()
            .is_some_and(|h| h.step_head)
    }
}

/// `a`'s heads plus those of `b` that `a` lacks (aspect order: `a`'s, then `b`'s new ones).
pub fn merge_heads(a: &ExtraHeads, b: &ExtraHeads) -> ExtraHeads {
    let mut out = a.clone();
    for name in &b.aspects {
        if !out.aspects.contains(name) {
            out.aspects.push(name.clone());
        }
    }
    out.step_head |= b.step_head;
    out
}

/// Redraws every weight from `seed`: normal(0, std) for matrices, ones for norm weights, zeros
/// for biases (HF's init), visiting the variables in name order so the result is reproducible.
pub fn seeded_init(varmap: &VarMap, seed: u64, std: f64) -> Result<()> {
    seeded_init_where(varmap, seed, std, |_| true)
}

/// [`seeded_init`] for the variables named in `names` only (heads a checkpoint lacked: candle's
/// own initialisers cannot be seeded, and "same seed, same weights" must hold for them too).
pub fn seeded_init_only(varmap: &VarMap, names: &[String], seed: u64, std: f64) -> Result<()> {
    seeded_init_where(varmap, seed, std, |name| names.iter().any(|n| n == name))
}

fn seeded_init_where(
    varmap: &VarMap,
    seed: u64,
    std: f64,
    pick: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in super::optim::named_vars(varmap) {
        if !pick(&name) {
            continue;
        }
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let head = name.starts_with("aspect_heads.") || name.starts_with("step_head.");
        let values: Vec<f32> = if name.contains("norm") && !head {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
        };
        let t = Tensor::from_vec(values, shape, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Bit-exact copy of every weight (for comparisons in tests and reports).
pub fn weights_snapshot(varmap: &VarMap) -> Result<Vec<(String, Vec<f32>)>> {
    super::optim::named_vars(varmap)
        .into_iter()
        .map(|(name, var)| {
            let v = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok((name, v))
        })
        .collect()
}

/// Cost, in tokens, of one more encoder pass (a group's fixed overhead: op launches, gemm
/// packing, small-matrix inefficiency); measured per step it is a few hundredths of a second.
const GROUP_OVERHEAD_TOKENS: usize = 96;

/// Splits rows (given by their real lengths) into groups that each get padded to their own
/// longest row, minimising the padded work: rows sorted by length, then the cut points chosen by
/// dynamic programming over `rows × (len + len²/2300) + overhead` per group (attention adds a
/// cost quadratic in the length, about len/2300 of the rest for a MiniLM-size layer). Returns the
/// row indices of each group, shortest rows first; one group when splitting does not pay.
pub fn length_groups(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&r| (lengths[r], r));
    let n = order.len();
    let padded = |t: usize| t as f64 * (1.0 + t as f64 / 2300.0);
    // best[j]: cheapest cost of the first j sorted rows; cut[j]: where its last group starts.
    let mut best = vec![f64::INFINITY; n + 1];
    let mut cut = vec![0usize; n + 1];
    best[0] = 0.0;
    for j in 1..=n {
        let longest = padded(lengths[order[j - 1]]);
        for i in 0..j {
            let cost = best[i] + (j - i) as f64 * longest + GROUP_OVERHEAD_TOKENS as f64;
            if cost < best[j] {
                best[j] = cost;
                cut[j] = i;
            }
        }
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        groups.push(order[cut[j]..j].to_vec());
        j = cut[j];
    }
    groups.reverse();
    groups
}

/// A BERT-encoder reward model (all-MiniLM-L6-v2 and kin): `[CLS] prompt [SEP] answer [SEP]`
/// with segment ids, mean pooling and a linear score head. Dropout is off while training so runs
/// stay reproducible (candle's dropout draws from an unseedable CPU generator).
#[derive(Debug)]
pub struct BertReward {
    pub model: BertRewardModel,
    layout: SequenceLayout,
    /// [`BertRewardModel::detached_twin`], built on first use ([`RewardBackbone::score`]).
    scorer: OnceLock<BertRewardModel>,
}

impl BertReward {
    pub fn load(dir: &Path, tok: &Tokenizer, device: &Device) -> Result<Self> {
        Self::load_with_heads(dir, tok, &ExtraHeads::default(), 0, device)
    }

    /// [`BertReward::load`] with at least the extra heads in `heads`; heads the checkpoint lacks
    /// are drawn from `seed` (std 0.02, BERT's initializer range).
    pub fn load_with_heads(
        dir: &Path,
        tok: &Tokenizer,
        heads: &ExtraHeads,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let model = BertRewardModel::load_with_heads(dir, &heads.aspects, heads.step_head, device)
            .with_context(|| format!("loading the BERT reward model in {}", dir.display()))?;
        seeded_init_only(model.varmap(), model.fresh_heads(), seed, 0.02)?;
        let id = |t: &str| {
            tok.token_to_id(t).with_context(|| {
                format!(
                    "the tokenizer of {} has no {t} token\nhint: a BERT model needs its WordPiece tokenizer.json",
                    dir.display()
                )
            })
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        let pad_id = id("[PAD]").unwrap_or(model.config().pad_token_id);
        Ok(Self {
            model,
            layout: SequenceLayout {
                prefix: vec![cls],
                separator: vec![sep],
                suffix: vec![sep],
                token_types: true,
                pad_id,
            },
            scorer: OnceLock::new(),
        })
    }

    fn scorer(&self) -> candle_core::Result<&BertRewardModel> {
        if let Some(m) = self.scorer.get() {
            return Ok(m);
        }
        let twin = self
            .model
            .detached_twin()
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(self.scorer.get_or_init(|| twin))
    }
}

impl BertReward {
    /// Scores rows that all fit in `batch`'s width (one encoder pass) with `model` (the trained
    /// one or its detached twin).
    fn forward_padded(
        model: &BertRewardModel,
        batch: &TokenBatch,
    ) -> candle_core::Result<RewardForward> {
        let enc = EncodedBatch {
            input_ids: batch.input_ids.clone(),
            token_type_ids: batch.token_type_ids.clone(),
            attention_mask: batch.attention_mask.to_dtype(DType::F32)?,
        };
        let out = model.forward(&enc, false)?;
        let aspects = if out.aspects.is_empty() {
            None
        } else {
            let cols: Vec<Tensor> = out
                .aspects
                .values()
                .map(|t| t.unsqueeze(1))
                .collect::<candle_core::Result<_>>()?;
            Some(Tensor::cat(&cols, 1)?)
        };
        Ok(RewardForward {
            rewards: out.score,
            aspects,
            step_logits: out.step_logits,
        })
    }
}

impl RewardBackbone for BertReward {
    /// Rows of similar length go through the encoder together, each group padded only to its own
    /// longest row ([`length_groups`]), and the scores come back in the batch's row order. Padding
    /// changes nothing in a BERT's output (keys are masked, pooling is masked, positions count
    /// from the left), so this is the same maths as one pass over the whole batch; on HH-RLHF at
    /// max length 256 a 16-pair batch is ~45% padding when padded to its longest row.
    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        Self::forward_grouped(&self.model, batch)
    }
    fn score(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        Self::forward_grouped(self.scorer()?, batch)
    }
    fn varmap(&self) -> &VarMap {
        self.model.varmap()
    }
    fn layout(&self) -> &SequenceLayout {
        &self.layout
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)
    }
    fn kind(&self) -> &'static str {
        "bert"
    }
    fn aspect_names(&self) -> Vec<String> {
        // The model keeps its aspect heads in a name-ordered map: forward's columns are sorted.
        let mut names = self.model.head_config().aspects.clone();
        names.sort();
        names
    }
    fn has_step_head(&self) -> bool {
        self.model.head_config().step_head
    }
}

impl BertReward {
    fn forward_grouped(
        model: &BertRewardModel,
        batch: &TokenBatch,
    ) -> candle_core::Result<RewardForward> {
        let lengths: Vec<usize> = batch
            .attention_mask
            .to_dtype(DType::U32)?
            .sum(1)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|l| l as usize)
            .collect();
        let groups = length_groups(&lengths);
        if groups.len() <= 1 {
            return Self::forward_padded(model, batch);
        }
        let width = batch.input_ids.dim(1)?;
        let device = batch.input_ids.device();
        let mut parts = Vec::with_capacity(groups.len());
        for rows in &groups {
            let keep = rows.iter().map(|&r| lengths[r]).max().unwrap_or(1).max(1);
            let index = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), device)?;
            let pick = |t: &Tensor| t.index_select(&index, 0)?.narrow(1, 0, keep);
            let sub = TokenBatch {
                input_ids: pick(&batch.input_ids)?,
                attention_mask: pick(&batch.attention_mask)?,
                token_type_ids: pick(&batch.token_type_ids)?,
                tokens: 0,
            };
            let mut out = Self::forward_padded(model, &sub)?;
            // Step logits are per token: back to the batch's width (padding scores 0).
            out.step_logits = out
                .step_logits
                .map(|t| t.pad_with_zeros(1, 0, width - keep))
                .transpose()?;
            parts.push(out);
        }
        // Where each original row landed in the concatenation of the groups.
        let mut slot = vec![0u32; lengths.len()];
        for (k, &r) in groups.iter().flatten().enumerate() {
            slot[r] = k as u32;
        }
        let unsort = Tensor::new(slot, device)?;
        let join = |ts: Vec<Tensor>| Tensor::cat(&ts, 0)?.index_select(&unsort, 0);
        let rewards = join(parts.iter().map(|p| p.rewards.clone()).collect())?;
        let gather = |get: fn(&RewardForward) -> Option<Tensor>| -> candle_core::Result<_> {
            let ts: Option<Vec<Tensor>> = parts.iter().map(get).collect();
            ts.map(join).transpose()
        };
        Ok(RewardForward {
            rewards,
            aspects: gather(|p| p.aspects.clone())?,
            step_logits: gather(|p| p.step_logits.clone())?,
        })
    }
}

/// Either backbone, chosen from `config.json`'s `model_type`.
#[derive(Debug)]
// One value per run holds a whole model either way; boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
pub enum AnyReward {
    Llama(LlamaReward),
    Bert(BertReward),
}

impl AnyReward {
    fn inner(&self) -> &dyn RewardBackbone {
        match self {
            Self::Llama(m) => m,
            Self::Bert(m) => m,
        }
    }
}

impl RewardBackbone for AnyReward {
    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        self.inner().forward(batch)
    }
    fn score(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        self.inner().score(batch)
    }
    fn varmap(&self) -> &VarMap {
        self.inner().varmap()
    }
    fn layout(&self) -> &SequenceLayout {
        self.inner().layout()
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.inner().save_pretrained(dir)
    }
    fn kind(&self) -> &'static str {
        self.inner().kind()
    }
    fn aspect_names(&self) -> Vec<String> {
        self.inner().aspect_names()
    }
    fn has_step_head(&self) -> bool {
        self.inner().has_step_head()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bert::{BertConfig, RewardHeadConfig};
    use crate::train::batching::{Row, collate};

    #[test]
    fn length_groups_cover_every_row_once_and_split_only_when_it_pays() {
        // Same lengths: nothing to gain from splitting.
        assert_eq!(length_groups(&[100; 8]).len(), 1);
        // Short and long rows: the short ones go together, the groups cover each row once.
        let lengths = [250, 30, 240, 25, 256, 40, 35, 245];
        let groups = length_groups(&lengths);
        assert_eq!(groups.len(), 2, "{groups:?}");
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        assert!(groups[0].iter().all(|&r| lengths[r] <= 40), "{groups:?}");
        assert!(length_groups(&[]).is_empty());
    }

    fn tiny_reward(step_head: bool) -> BertReward {
        let cfg = BertConfig {
            vocab_size: 41,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            max_position_embeddings: 64,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..BertConfig::minilm_l6()
        };
        let head = RewardHeadConfig {
            aspects: vec!["accuracy".into()],
            step_head,
            ..RewardHeadConfig::default()
        };
        let model = BertRewardModel::new_seeded(&cfg, head, &Device::Cpu, 7).expect("model");
        BertReward {
            model,
            layout: SequenceLayout {
                prefix: vec![2],
                separator: vec![3],
                suffix: vec![3],
                token_types: true,
                pad_id: 0,
            },
            scorer: OnceLock::new(),
        }
    }

    #[test]
    fn grouped_forward_matches_one_padded_pass_in_values_and_gradients() {
        let reward = tiny_reward(true);
        // Two long rows and four short ones, so the forward splits them.
        let rows: Vec<Row> = [60usize, 5, 58, 4, 6, 3]
            .iter()
            .enumerate()
            .map(|(k, &len)| Row {
                ids: (0..len)
                    .map(|i| 4 + ((i * 7 + k * 3) % 37) as u32)
                    .collect(),
                types: (0..len).map(|i| u32::from(i >= len / 2)).collect(),
            })
            .collect();
        let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
        assert!(length_groups(&lengths).len() > 1);
        let refs: Vec<&Row> = rows.iter().collect();
        let batch = collate(&refs, 0, &Device::Cpu).expect("batch");

        let run = |grouped: bool| {
            let out = if grouped {
                reward.forward(&batch)
            } else {
                BertReward::forward_padded(&reward.model, &batch)
            }
            .expect("forward");
            // Step logits count only on real tokens (labels point at real positions).
            let real = batch.attention_mask.to_dtype(DType::F32).unwrap();
            let steps = (out.step_logits.expect("step head") * real).unwrap();
            let aspects = out.aspects.expect("aspect head");
            // Weights differ per row so a row mix-up changes the gradients.
            let w = Tensor::new(&[1.0f32, -2.0, 3.0, 0.5, -1.5, 2.5], &Device::Cpu).unwrap();
            let loss = ((out.rewards.clone() * &w).unwrap().sum_all().unwrap()
                + aspects.sum_all().unwrap()
                + steps.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().expect("backward");
            let data = reward.varmap().data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            let grad_values: Vec<Vec<f32>> = names
                .iter()
                .map(|n| {
                    grads
                        .get(data[*n].as_tensor())
                        .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
                        .unwrap_or_default()
                })
                .collect();
            let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            (
                values(&out.rewards),
                values(&aspects),
                values(&steps),
                grad_values,
            )
        };
        let (r1, a1, s1, g1) = run(false);
        let (r2, a2, s2, g2) = run(true);
        let close = |x: &[f32], y: &[f32], what: &str| {
            assert_eq!(x.len(), y.len(), "{what}");
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{what}[{i}]: {a} vs {b}"
                );
            }
        };
        close(&r1, &r2, "rewards");
        close(&a1, &a2, "aspects");
        close(&s1, &s2, "step logits");
        assert!(g1.iter().any(|g| !g.is_empty()));
        for (k, (x, y)) in g1.iter().zip(&g2).enumerate() {
            close(x, y, &format!("gradient {k}"));
        }
    }
}
