//! Adapters from the concrete reward models to the loop's [`RewardBackbone`], plus the small
//! llama reward model trained from scratch when no `--model` is given. Both backbones can carry
//! extra heads ([`ExtraHeads`]: per-aspect heads `aspect_heads.<name>.*` and a per-token
//! `step_head.*`); loading adds the heads a run needs, initialised, when the checkpoint lacks them.
//!
//! The decoder reads its score at the last real token and wants no special tokens (TRL's reward
//! batches carry the plain text tokens); the default model's weights are drawn from a seeded
//! ChaCha8 stream because candle's CPU initialisers cannot be seeded, and "same seed, same
//! weights" must hold from the first step.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::batching::{SequenceLayout, TokenBatch};
use super::reward_trainer::{RewardBackbone, RewardForward};
use crate::model::bert::{BertRewardModel, EncodedBatch};
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
        }
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

impl RewardBackbone for LlamaReward {
    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        let out = self
            .model
            .forward(&batch.input_ids, Some(&batch.attention_mask))?;
        Ok(RewardForward {
            rewards: out.logits.flatten_all()?,
            aspects: out.aspects,
            step_logits: out.step_logits,
        })
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

/// A BERT-encoder reward model (all-MiniLM-L6-v2 and kin): `[CLS] prompt [SEP] answer [SEP]`
/// with segment ids, mean pooling and a linear score head. Dropout is off while training so runs
/// stay reproducible (candle's dropout draws from an unseedable CPU generator).
#[derive(Debug)]
pub struct BertReward {
    pub model: BertRewardModel,
    layout: SequenceLayout,
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
        })
    }
}

impl RewardBackbone for BertReward {
    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<RewardForward> {
        let enc = EncodedBatch {
            input_ids: batch.input_ids.clone(),
            token_type_ids: batch.token_type_ids.clone(),
            attention_mask: batch.attention_mask.to_dtype(DType::F32)?,
        };
        let out = self.model.forward(&enc, false)?;
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
