//! Trainable BERT-family encoder (the all-MiniLM-L6-v2 layout) and the reward model built on it.
//!
//! candle-transformers ships a BERT, but its fused layer norm and softmax have no backward pass, so
//! gradients would silently stop inside the encoder (GUIDE §4). This module builds the same network
//! from ops that all have a backward, either candle's generic ops ([`Kernels::Reference`]; on a GPU
//! with candle's fused layer norm and softmax kernels, given a backward in
//! [`crate::kernels::device_fused`]) or the project's fused CPU kernels in [`crate::kernels`] ([`Kernels::Fused`], same maths, several
//! times fewer passes over memory). Tensor names equal the Hugging Face names
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, …) so a
//! checkpoint loads into a [`VarMap`] and saves back in a layout `transformers` reads.
//!
//! The reward model ([`BertRewardModel`]) pools the last hidden state (mean over real tokens, as
//! sentence-transformers does, or the `[CLS]` token) and puts a `hidden -> 1` score head on top, plus
//! optional named aspect heads (accuracy, helpfulness, …) trained from per-aspect ratings and an
//! optional per-token step head (`step_head.*`) read where reasoning steps end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::kernels;

/// Attention scores of padded keys get this bias; finite (unlike `f32::MIN` arithmetic) so that a
/// fully padded row gives a uniform softmax instead of NaN.
const MASK_BIAS: f32 = -1.0e9;

/// Key in `config.json` under which the reward head's own settings are stored; `transformers`
/// keeps unknown keys, so the file stays loadable there.
pub const REWARD_CONFIG_KEY: &str = "rlhf_bot_reward";

/// The sentence-transformers layout of a reward model (`export-model --to hf` writes it, see
/// `model::export::sentence_transformers`): the encoder at the root, the pooling settings in
/// `1_Pooling/`, and every pooled head as one `Dense` layer in `2_Dense/` whose output rows are
/// the score, then the aspect heads in name order. The per-token step head cannot sit after a
/// pooling layer, so it has a file of its own at the root.
pub mod st_layout {
    pub const MODULES: &str = "modules.json";
    pub const POOLING_DIR: &str = "1_Pooling";
    pub const DENSE_DIR: &str = "2_Dense";
    /// `weight` `[1, hidden]` and `bias` `[1]`: logits = last hidden state · weightᵀ + bias.
    pub const STEP_HEAD_FILE: &str = "step_head.safetensors";
}

/// Activation of the intermediate (feed-forward) layer, as named by HF `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiddenAct {
    /// `gelu`: the exact form `x·Φ(x)` with the error function (HF's `gelu`).
    #[serde(rename = "gelu")]
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn default_dropout() -> f32 {
    0.1
}

/// The subset of HF `BertConfig` (`config.json`) that shapes the network. Keys this struct does not
/// know are kept in `extra` and written back on save, so a round trip loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape (6 layers, d 384, 12 heads, ffn 1536, vocab 30522).
    pub fn minilm_l6() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
            position_embedding_type: Some("absolute".into()),
            extra: serde_json::Map::from_iter([
                (
                    "architectures".to_string(),
                    serde_json::json!(["BertModel"]),
                ),
                ("model_type".to_string(), serde_json::json!("bert")),
            ]),
        }
    }

    /// Reads and checks an HF `config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading BERT config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "parsing BERT config {}\nhint: expected a Hugging Face BertModel config.json",
                path.display()
            )
        })?;
        cfg.validate()
            .with_context(|| format!("checking BERT config {}", path.display()))?;
        Ok(cfg)
    }

    /// Rejects shapes the encoder cannot run, naming the bad value.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            ensure!(v > 0, "{name} must be positive, got 0");
        }
        if let Some(kind) = &self.position_embedding_type {
            ensure!(
                kind == "absolute",
                "position_embedding_type {kind:?} is not supported\nhint: only \"absolute\" \
                 position embeddings (BERT, MiniLM) are implemented"
            );
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            ensure!((0.0..1.0).contains(&p), "{name} {p} is outside [0, 1)");
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Which implementation of the non-matmul ops the encoder uses. Both have a backward pass and
/// compute the same function; the fused one is the fast path on CPU and the reference one is what
/// the fused kernels are tested against (and the path on other devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// candle's generic ops (`layer_norm_slow`, `softmax`, `gelu_erf`, broadcast adds).
    Reference,
    /// The project's fused CPU kernels with hand-written backward passes.
    Fused,
}

impl Kernels {
    /// Fused on CPU, reference elsewhere (the fused kernels only have CPU implementations).
    pub fn default_for(device: &Device) -> Self {
        if device.is_cpu() {
            Kernels::Fused
        } else {
            Kernels::Reference
        }
    }
}

/// A dense layer `y = x·Wᵀ + b` over the last dimension, with HF's `weight`/`bias` names.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        )?;
        let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.))?;
        Ok(Self { weight, bias })
    }

    fn parts(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }

    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if self.is_held_narrower(x) {
            return kernels::bias_add(&self.frozen_product(x)?, &self.bias);
        }
        match kernels {
            Kernels::Reference => kernels::reference::linear(x, &self.weight, &self.bias),
            Kernels::Fused => kernels::linear(x, &self.weight, &self.bias),
        }
    }

    /// Whether the weight is stored in another dtype than the activations: bf16 in a scorer
    /// loaded with [`BertRewardModel::load_frozen`].
    fn is_held_narrower(&self, x: &Tensor) -> bool {
        self.weight.dtype() != x.dtype()
    }

    /// `x·Wᵀ` (no bias) through the frozen product, which multiplies a bf16-held weight as it
    /// is stored: the leading dimensions of `x` flattened into one matrix.
    fn frozen_product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let y = kernels::frozen_matmul_t(&x.reshape((rows, in_dim))?, &self.weight)?;
        dims.push(self.weight.dim(0)?);
        y.reshape(dims)
    }

    /// `act(x·Wᵀ + b)`, with the bias add and activation fused when possible.
    fn forward_act(
        &self,
        x: &Tensor,
        act: HiddenAct,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        if kernels == Kernels::Fused && act == HiddenAct::Gelu {
            if self.is_held_narrower(x) {
                return kernels::bias_gelu(&self.frozen_product(x)?, &self.bias);
            }
            return kernels::linear_gelu(x, &self.weight, &self.bias);
        }
        let h = self.forward(x, kernels)?;
        match act {
            HiddenAct::Gelu => h.gelu_erf(),
            HiddenAct::GeluTanh => h.gelu(),
            HiddenAct::Relu => h.relu(),
        }
    }
}

/// LayerNorm with HF's `weight`/`bias` names.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        match kernels {
            // A GPU runs candle's fused layer norm kernel (with the backward `kernels` composes).
            Kernels::Reference if kernels::on_gpu_path(&[x, &self.weight, &self.bias]) => {
                kernels::device_fused::layer_norm(x, &self.weight, &self.bias, self.eps as f32)
            }
            Kernels::Reference => {
                candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
            }
            Kernels::Fused => kernels::layer_norm(x, &self.weight, &self.bias, self.eps as f32),
        }
    }

    /// `LayerNorm(x + residual)`, the post-norm residual block of BERT.
    fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        self.forward(&(x + residual)?, kernels)
    }
}

fn dropout(x: &Tensor, p: f32, train: bool) -> candle_core::Result<Tensor> {
    if train && p > 0.0 {
        candle_nn::ops::dropout(x, p)
    } else {
        Ok(x.clone())
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    layer_norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let init = Init::Randn {
            mean: 0.,
            stdev: 0.02,
        };
        let h = cfg.hidden_size;
        Ok(Self {
            word: vb.get_with_hints((cfg.vocab_size, h), "word_embeddings.weight", init)?,
            position: vb.get_with_hints(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
                init,
            )?,
            token_type: vb.get_with_hints(
                (cfg.type_vocab_size, h),
                "token_type_embeddings.weight",
                init,
            )?,
            layer_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        kernels: Kernels,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.word.dim(1)?;
        let words = self
            .word
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let types = self
            .token_type
            .index_select(&token_type_ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        // Positions are the same for every row: one [t, h] slice broadcast over the batch.
        let positions = self.position.narrow(0, 0, t)?;
        let x = (words + types)?.broadcast_add(&positions)?;
        dropout(&self.layer_norm.forward(&x, kernels)?, self.dropout, train)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
    heads: usize,
    act: HiddenAct,
    hidden_dropout: f32,
    attn_dropout: f32,
}

impl Layer {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let slf = att.pp("self");
        Ok(Self {
            query: Dense::new(h, h, slf.pp("query"))?,
            key: Dense::new(h, h, slf.pp("key"))?,
            value: Dense::new(h, h, slf.pp("value"))?,
            attn_out: Dense::new(h, h, att.pp("output").pp("dense"))?,
            attn_norm: LayerNorm::new(h, cfg.layer_norm_eps, att.pp("output").pp("LayerNorm"))?,
            intermediate: Dense::new(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: Dense::new(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            out_norm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
            hidden_dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// The layer's six linear layers (attention q/k/v/out, feed-forward in/out).
    fn linears_mut(&mut self) -> [&mut Dense; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    /// `mask_bias`: `[b, t]` additive bias per key (0 for real tokens, [`MASK_BIAS`] for padding).
    fn forward(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        kernels: Kernels,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let scale = 1.0 / (d as f64).sqrt();
        let attn_dropout = if train { self.attn_dropout } else { 0.0 };
        let hidden_dropout = if train { self.hidden_dropout } else { 0.0 };
        // The fused layer takes f32 weights only; a scorer's bf16-held ones go op by op.
        if kernels == Kernels::Fused
            && self.act == HiddenAct::Gelu
            && attn_dropout == 0.0
            && hidden_dropout == 0.0
            && !self.query.is_held_narrower(x)
        {
            // The whole layer as one op: one backward node instead of ~15 (see fused/layer.rs).
            let p = kernels::EncoderLayerParams {
                query: self.query.parts(),
                key: self.key.parts(),
                value: self.value.parts(),
                attn_out: self.attn_out.parts(),
                attn_norm: [&self.attn_norm.weight, &self.attn_norm.bias],
                intermediate: self.intermediate.parts(),
                output: self.output.parts(),
                out_norm: [&self.out_norm.weight, &self.out_norm.bias],
            };
            return kernels::encoder_layer(x, &p, mask_bias, self.heads, self.attn_norm.eps as f32);
        }
        let ctx = match kernels {
            Kernels::Fused if attn_dropout == 0.0 => {
                let q = self.query.forward(x, kernels)?;
                let k = self.key.forward(x, kernels)?;
                let v = self.value.forward(x, kernels)?;
                kernels::attention(&q, &k, &v, mask_bias, self.heads, scale as f32)?
            }
            _ => {
                let split = |t_: Tensor| -> candle_core::Result<Tensor> {
                    t_.reshape((b, t, self.heads, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let q = split(self.query.forward(x, kernels)?)?;
                let k = split(self.key.forward(x, kernels)?)?;
                let v = split(self.value.forward(x, kernels)?)?;
                let scores = (q.matmul(&k.t()?)? * scale)?
                    .broadcast_add(&mask_bias.reshape((b, 1, 1, t))?)?;
                let probs = match kernels {
                    Kernels::Fused => kernels::softmax_last_dim(&scores)?,
                    Kernels::Reference if kernels::on_gpu_path(&[&scores]) => {
                        kernels::device_fused::softmax_last_dim(&scores)?
                    }
                    Kernels::Reference => candle_nn::ops::softmax(&scores, D::Minus1)?,
                };
                let probs = dropout(&probs, attn_dropout, true)?;
                probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?
            }
        };
        let attn = dropout(
            &self.attn_out.forward(&ctx, kernels)?,
            self.hidden_dropout,
            train,
        )?;
        let x = self.attn_norm.forward_residual(&attn, x, kernels)?;
        let inter = self.intermediate.forward_act(&x, self.act, kernels)?;
        let out = dropout(
            &self.output.forward(&inter, kernels)?,
            self.hidden_dropout,
            train,
        )?;
        self.out_norm.forward_residual(&out, &x, kernels)
    }
}

/// A tokenized, padded batch ready for [`BertModel::forward`].
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// `[b, t]` u32 token ids (padding uses the tokenizer's pad id).
    pub input_ids: Tensor,
    /// `[b, t]` u32 segment ids.
    pub token_type_ids: Tensor,
    /// `[b, t]` f32, 1 for real tokens and 0 for padding.
    pub attention_mask: Tensor,
}

impl EncodedBatch {
    /// Builds a batch from per-row token ids, padding to the longest row with `pad_id`.
    pub fn from_ids(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> anyhow::Result<Self> {
        ensure!(!rows.is_empty(), "cannot encode an empty batch");
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        ensure!(t > 0, "every row of the batch is empty");
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad_id, t - row.len()));
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, t - row.len()));
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            token_type_ids: Tensor::zeros((b, t), DType::U32, device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        })
    }
}

/// How the `[b, t, h]` last hidden state becomes one vector per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over real (unmasked) tokens: sentence-transformers' pooling for all-MiniLM-L6-v2.
    #[default]
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
}

/// Pools `[b, t, h]` hidden states with a `[b, t]` f32 mask into `[b, h]`.
pub fn pool(
    hidden: &Tensor,
    attention_mask: &Tensor,
    pooling: Pooling,
) -> candle_core::Result<Tensor> {
    match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pooling::Mean => {
            let m = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            // sentence-transformers clamps the count at 1e-9 so an all-padding row gives zeros.
            let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
            summed.broadcast_div(&count)
        }
    }
}

/// L2-normalises rows (sentence-transformers' `Normalize` module).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// The encoder: embeddings and `num_hidden_layers` post-norm transformer layers.
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    cfg: BertConfig,
    kernels: Kernels,
}

impl BertModel {
    /// Builds the encoder; `vb` is rooted where HF puts `embeddings.*` and `encoder.*`.
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            cfg: cfg.clone(),
            kernels: Kernels::default_for(vb.device()),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Last hidden state `[b, t, h]`. `train` turns dropout on (configured probabilities).
    pub fn forward(&self, batch: &EncodedBatch, train: bool) -> candle_core::Result<Tensor> {
        let (_, t) = batch.input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence length {t} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let mask = batch.attention_mask.to_dtype(DType::F32)?;
        let mask_bias = ((1.0 - mask)? * f64::from(MASK_BIAS))?.contiguous()?;
        let mut x = self.embeddings.forward(
            &batch.input_ids,
            &batch.token_type_ids,
            self.kernels,
            train,
        )?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask_bias, self.kernels, train)?;
        }
        Ok(x)
    }

    /// Sentence embeddings as sentence-transformers computes them: mean pooling, L2 normalised.
    pub fn embed(&self, batch: &EncodedBatch) -> candle_core::Result<Tensor> {
        let hidden = self.forward(batch, false)?;
        l2_normalize(&pool(&hidden, &batch.attention_mask, Pooling::Mean)?)
    }
}

/// The reward head's settings, stored in `config.json` beside the encoder's.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardHeadConfig {
    #[serde(default)]
    pub pooling: Pooling,
    /// Names of extra per-aspect score heads (`aspect_heads.<name>.weight`).
    #[serde(default)]
    pub aspects: Vec<String>,
    /// A `hidden -> 1` head over every token (`step_head.weight/bias`), for process rewards.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub step_head: bool,
}

impl RewardHeadConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for a in &self.aspects {
            ensure!(
                !a.is_empty()
                    && a.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "aspect name {a:?} must be non-empty ASCII letters, digits, '_' or '-'\nhint: it \
                 becomes part of a tensor name"
            );
            ensure!(seen.insert(a.as_str()), "aspect {a:?} is listed twice");
        }
        Ok(())
    }
}

/// Scores produced by [`BertRewardModel::forward`].
#[derive(Debug, Clone)]
pub struct RewardOutput {
    /// `[b]` scalar reward per row.
    pub score: Tensor,
    /// `[b]` per named aspect head.
    pub aspects: BTreeMap<String, Tensor>,
    /// `[b, t]` step-head logits at every token, when the model has a step head.
    pub step_logits: Option<Tensor>,
}

/// Errors a caller of [`BertRewardModel::load`] may want to branch on.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "{dir} has no {file}\nhint: a model directory needs config.json, model.safetensors and \
         tokenizer.json (run scripts/fetch-models.sh for all-MiniLM-L6-v2)"
    )]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error("{file} has no tensor {name} (also tried with the \"bert.\" prefix)")]
    MissingTensor { file: PathBuf, name: String },
    #[error("tensor {name} in {file} has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        file: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// A BERT encoder with a scalar score head (and optional aspect heads); every weight is a
/// trainable [`Var`] in [`BertRewardModel::varmap`].
pub struct BertRewardModel {
    encoder: BertModel,
    score: Dense,
    aspect_heads: BTreeMap<String, Dense>,
    step_head: Option<Dense>,
    head: RewardHeadConfig,
    /// Head variables the loaded checkpoint lacked, left at their (unseeded) initial values.
    fresh_heads: Vec<String>,
    varmap: VarMap,
    tokenizer: Option<LoadedTokenizer>,
    /// Set by [`BertRewardModel::load_frozen`] when it held the encoder's linear weights in a
    /// narrower dtype: the model then scores only (its varmap is empty).
    scoring_only: bool,
}

impl std::fmt::Debug for BertRewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertRewardModel")
            .field("config", &self.encoder.cfg)
            .field("head", &self.head)
            .field("kernels", &self.encoder.kernels)
            .finish_non_exhaustive()
    }
}

/// A tokenizer together with the exact `tokenizer.json` text it came from (written back verbatim
/// on save, so the saved directory tokenizes identically).
#[derive(Clone)]
pub struct LoadedTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    json: String,
}

impl LoadedTokenizer {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        let mut tokenizer: tokenizers::Tokenizer = json.parse().map_err(|e| {
            anyhow::anyhow!(
                "parsing tokenizer {}: {e}\nhint: expected a Hugging Face tokenizer.json",
                path.display()
            )
        })?;
        // We pad each batch to its longest row ourselves; the file's fixed padding (128 for
        // MiniLM) would waste compute on short batches.
        tokenizer.with_padding(None);
        Ok(Self { tokenizer, json })
    }

    /// Tokenizes `texts` (with `[CLS]`/`[SEP]`), truncating each to `max_len` tokens.
    pub fn encode(
        &self,
        texts: &[&str],
        max_len: usize,
        device: &Device,
    ) -> anyhow::Result<EncodedBatch> {
        let pad_id = self.tokenizer.token_to_id("[PAD]").unwrap_or_default();
        let mut rows = Vec::with_capacity(texts.len());
        for text in texts {
            let enc = self
                .tokenizer
                .encode(*text, true)
                .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
            let mut ids = enc.get_ids().to_vec();
            if ids.len() > max_len {
                // Keep the final [SEP] so the truncated row still looks like a BERT input.
                let last = ids[ids.len() - 1];
                ids.truncate(max_len);
                if let Some(l) = ids.last_mut() {
                    *l = last;
                }
            }
            rows.push(ids);
        }
        EncodedBatch::from_ids(&rows, pad_id, device)
    }
}

/// Resolves the name a tensor has in a checkpoint: sentence-transformers files have no prefix,
/// `BertForSequenceClassification` files put the encoder under `bert.`.
fn find_tensor<'a>(
    tensors: &'a std::collections::HashMap<String, Tensor>,
    name: &str,
) -> Option<&'a Tensor> {
    tensors
        .get(name)
        .or_else(|| tensors.get(&format!("bert.{name}")))
}

impl BertRewardModel {
    /// A freshly initialised model (HF's init: N(0, 0.02) weights, zero biases, unit norms).
    pub fn new(cfg: &BertConfig, head: RewardHeadConfig, device: &Device) -> anyhow::Result<Self> {
        cfg.validate()?;
        head.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        Self::build(cfg, head, vb, varmap)
    }

    /// The same model over the weights `vb` gives (`varmap` is what [`Self::varmap`] returns).
    fn build(
        cfg: &BertConfig,
        head: RewardHeadConfig,
        vb: VarBuilder,
        varmap: VarMap,
    ) -> anyhow::Result<Self> {
        let encoder = BertModel::new(cfg, vb.clone())?;
        let score = Dense::new(cfg.hidden_size, 1, vb.pp("score"))?;
        let aspect_heads = head
            .aspects
            .iter()
            .map(|a| {
                Ok((
                    a.clone(),
                    Dense::new(cfg.hidden_size, 1, vb.pp("aspect_heads").pp(a))?,
                ))
            })
            .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
        let step_head = if head.step_head {
            Some(Dense::new(cfg.hidden_size, 1, vb.pp("step_head"))?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            score,
            aspect_heads,
            step_head,
            head,
            fresh_heads: Vec::new(),
            varmap,
            tokenizer: None,
            scoring_only: false,
        })
    }

    /// Like [`BertRewardModel::new`] but every weight is drawn from a seeded generator, so tests
    /// and benchmarks are reproducible (candle's own `Init` uses an unseeded RNG).
    pub fn new_seeded(
        cfg: &BertConfig,
        head: RewardHeadConfig,
        device: &Device,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let model = Self::new(cfg, head, device)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = model
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            if name.ends_with(".weight") && !name.contains("LayerNorm") {
                let n = var.elem_count();
                let values: Vec<f32> = (0..n).map(|_| 0.02 * normal_sample(&mut rng)).collect();
                var.set(&Tensor::from_vec(values, var.shape(), device)?)?;
            }
        }
        drop(data);
        Ok(model)
    }

    /// Loads an HF directory (`config.json`, `model.safetensors`, `tokenizer.json`). Encoder
    /// tensors must all be present (with or without a `bert.` prefix); score and aspect heads that
    /// the file lacks are freshly initialised, so a plain sentence encoder becomes a reward model.
    /// `aspects` adds aspect heads beyond those recorded in the config.
    pub fn load(dir: &Path, aspects: &[String], device: &Device) -> anyhow::Result<Self> {
        Self::load_with_heads(dir, aspects, false, device)
    }

    /// [`BertRewardModel::load`], also adding a step head when `step_head` is set (a head the
    /// file lacks is freshly initialised; one recorded in the config is always loaded).
    pub fn load_with_heads(
        dir: &Path,
        aspects: &[String],
        step_head: bool,
        device: &Device,
    ) -> anyhow::Result<Self> {
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !dir.join(file).is_file() {
                return Err(LoadError::MissingFile {
                    dir: dir.to_path_buf(),
                    file,
                }
                .into());
            }
        }
        let mut cfg = BertConfig::from_file(&dir.join("config.json"))?;
        let recorded = match cfg.extra.remove(REWARD_CONFIG_KEY) {
            Some(v) => Some(
                serde_json::from_value::<RewardHeadConfig>(v).with_context(|| {
                    format!(
                        "parsing \"{REWARD_CONFIG_KEY}\" in {}",
                        dir.join("config.json").display()
                    )
                })?,
            ),
            None => None,
        };
        let mut head = recorded.clone().unwrap_or_default();
        for a in aspects {
            if !head.aspects.contains(a) {
                head.aspects.push(a.clone());
            }
        }
        head.step_head |= step_head;
        let mut model = Self::new(&cfg, head, device)?;
        let weights_path = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights_path, device)
            .with_context(|| format!("reading weights {}", weights_path.display()))?;
        // Only this project's export puts our heads in a Dense layer; another sentence
        // encoder's `2_Dense/` (a projection) is not a score head.
        if let Some(recorded) = &recorded {
            tensors.extend(sentence_transformers_heads(dir, recorded, device)?);
        }
        let mut fresh = Vec::new();
        {
            let data = model
                .varmap
                .data()
                .lock()
                .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
            for (name, var) in data.iter() {
                let is_head = name.starts_with("score.")
                    || name.starts_with("aspect_heads.")
                    || name.starts_with("step_head.");
                let Some(t) = find_tensor(&tensors, name) else {
                    if is_head {
                        fresh.push(name.clone());
                        continue;
                    }
                    return Err(LoadError::MissingTensor {
                        file: weights_path.clone(),
                        name: name.clone(),
                    }
                    .into());
                };
                if t.dims() != var.dims() {
                    return Err(LoadError::ShapeMismatch {
                        file: weights_path.clone(),
                        name: name.clone(),
                        found: t.dims().to_vec(),
                        expected: var.dims().to_vec(),
                    }
                    .into());
                }
                var.set(&t.to_dtype(DType::F32)?)
                    .with_context(|| format!("setting {name}"))?;
            }
        }
        fresh.sort();
        model.fresh_heads = fresh;
        model.tokenizer = Some(LoadedTokenizer::from_file(&dir.join("tokenizer.json"))?);
        Ok(model)
    }

    /// [`BertRewardModel::load`] for scoring only, as the online objectives' frozen reward
    /// model: with `projections` bf16 (`policy.precision: bf16`) the encoder layers' linear
    /// weights — nearly all of a BERT's weights past the embeddings — are held in bf16 and
    /// multiplied through the frozen bf16 product; embeddings, norms, biases and heads stay f32.
    /// The f32 copies are dropped (the file is read in f32 first, so loading peaks at the f32
    /// size plus the bf16 one), and the model can no longer be saved or trained. `F32` is
    /// [`BertRewardModel::load`].
    pub fn load_frozen(dir: &Path, device: &Device, projections: DType) -> anyhow::Result<Self> {
        let mut model = Self::load(dir, &[], device)?;
        if projections == DType::F32 {
            return Ok(model);
        }
        for layer in &mut model.encoder.layers {
            for dense in layer.linears_mut() {
                dense.weight = dense.weight.detach().to_dtype(projections)?;
            }
        }
        // The varmap held the only other references to the f32 weights.
        model.varmap = VarMap::new();
        model.scoring_only = true;
        Ok(model)
    }

    /// A twin of this model over detached views of its weights (the same storage, no copy):
    /// training updates the weights in place, so the twin scores with the current values, and
    /// no op on it records an autograd graph. For evaluation and scoring.
    pub fn detached_twin(&self) -> anyhow::Result<Self> {
        self.refuse_if_scoring_only("a detached twin")?;
        let vb = crate::model::checkpoint_io::detached_view(&self.varmap);
        let mut twin = Self::build(self.config(), self.head.clone(), vb, self.varmap.clone())?;
        twin.encoder.set_kernels(self.encoder.kernels());
        Ok(twin)
    }

    /// Head variables (`score.*`, `aspect_heads.*`, `step_head.*`) that the checkpoint did not
    /// hold, so [`BertRewardModel::load`] initialised them; a trainer re-draws them from its seed.
    pub fn fresh_heads(&self) -> &[String] {
        &self.fresh_heads
    }

    /// Writes `config.json` (with the head settings), `model.safetensors` (HF names, no prefix)
    /// and, when the model was loaded with one, `tokenizer.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        self.refuse_if_scoring_only("saving")?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating model directory {}", dir.display()))?;
        let mut cfg = self.encoder.cfg.clone();
        cfg.extra.insert(
            REWARD_CONFIG_KEY.to_string(),
            serde_json::to_value(&self.head)?,
        );
        cfg.extra
            .entry("architectures")
            .or_insert_with(|| serde_json::json!(["BertModel"]));
        cfg.extra
            .entry("model_type")
            .or_insert_with(|| serde_json::json!("bert"));
        let text = serde_json::to_string_pretty(&cfg)?;
        crate::atomic_file::write_atomically(&dir.join("config.json"), text.as_bytes())?;
        let tmp = dir.join("model.safetensors.part");
        self.varmap
            .save(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("model.safetensors"))
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        if let Some(tok) = &self.tokenizer {
            crate::atomic_file::write_atomically(&dir.join("tokenizer.json"), tok.json.as_bytes())?;
        }
        Ok(())
    }

    /// An error for `what` on a model loaded by [`BertRewardModel::load_frozen`] in bf16.
    fn refuse_if_scoring_only(&self, what: &str) -> anyhow::Result<()> {
        if self.scoring_only {
            bail!(
                "{what} needs the reward model's f32 weights, but this one was loaded for scoring \
                 only (linear weights held in bf16)\nhint: load it with BertRewardModel::load"
            );
        }
        Ok(())
    }

    pub fn encoder(&self) -> &BertModel {
        &self.encoder
    }

    pub fn encoder_mut(&mut self) -> &mut BertModel {
        &mut self.encoder
    }

    pub fn config(&self) -> &BertConfig {
        &self.encoder.cfg
    }

    pub fn head_config(&self) -> &RewardHeadConfig {
        &self.head
    }

    /// The trainable weights (encoder and heads), keyed by HF name.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// All trainable variables, sorted by name (a stable order for optimisers and tests).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = match self.varmap.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn tokenizer(&self) -> Option<&LoadedTokenizer> {
        self.tokenizer.as_ref()
    }

    pub fn set_tokenizer(&mut self, tokenizer: LoadedTokenizer) {
        self.tokenizer = Some(tokenizer);
    }

    /// Tokenizes texts with the model's tokenizer (truncated to the position table).
    pub fn encode(&self, texts: &[&str], device: &Device) -> anyhow::Result<EncodedBatch> {
        let Some(tok) = &self.tokenizer else {
            bail!(
                "this reward model has no tokenizer\nhint: load it from a directory with tokenizer.json"
            );
        };
        tok.encode(texts, self.encoder.cfg.max_position_embeddings, device)
    }

    /// Pooled `[b, h]` representation (before the heads).
    pub fn pooled(&self, batch: &EncodedBatch, train: bool) -> candle_core::Result<Tensor> {
        let hidden = self.encoder.forward(batch, train)?;
        pool(&hidden, &batch.attention_mask, self.head.pooling)
    }

    /// Scores a batch: `[b]` reward plus `[b]` per aspect head, and `[b, t]` step logits.
    pub fn forward(&self, batch: &EncodedBatch, train: bool) -> candle_core::Result<RewardOutput> {
        let hidden = self.encoder.forward(batch, train)?;
        let pooled = pool(&hidden, &batch.attention_mask, self.head.pooling)?;
        let score = self
            .score
            .forward(&pooled, Kernels::Reference)?
            .squeeze(1)?;
        let aspects = self
            .aspect_heads
            .iter()
            .map(|(name, head)| {
                Ok((
                    name.clone(),
                    head.forward(&pooled, Kernels::Reference)?.squeeze(1)?,
                ))
            })
            .collect::<candle_core::Result<BTreeMap<_, _>>>()?;
        let step_logits = match &self.step_head {
            Some(h) => Some(h.forward(&hidden, Kernels::Reference)?.squeeze(2)?),
            None => None,
        };
        Ok(RewardOutput {
            score,
            aspects,
            step_logits,
        })
    }
}

/// The head tensors of a sentence-transformers export ([`st_layout`]) under this model's names
/// (`score.*`, `aspect_heads.<name>.*`, `step_head.*`); empty when `dir` has no `2_Dense/`.
fn sentence_transformers_heads(
    dir: &Path,
    head: &RewardHeadConfig,
    device: &Device,
) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
    let mut out = std::collections::HashMap::new();
    let dense_path = dir.join(st_layout::DENSE_DIR).join("model.safetensors");
    if dense_path.is_file() {
        let dense = candle_core::safetensors::load(&dense_path, device)
            .with_context(|| format!("reading weights {}", dense_path.display()))?;
        let get = |name: &str| {
            dense
                .get(name)
                .with_context(|| format!("{} has no tensor {name}", dense_path.display()))
        };
        let (weight, bias) = (get("linear.weight")?, get("linear.bias")?);
        // Rows follow the model's own head order: the score, then aspects sorted by name.
        let mut aspects = head.aspects.clone();
        aspects.sort();
        let rows = weight.dim(0)?;
        ensure!(
            rows == 1 + aspects.len() && bias.dims() == [rows],
            "{} has {rows} output rows (bias {:?}); the config's heads need {} (the score, then \
             aspects {aspects:?})\nhint: the Dense layer and config.json's \"{REWARD_CONFIG_KEY}\" \
             must come from the same export",
            dense_path.display(),
            bias.dims(),
            1 + aspects.len()
        );
        let names = std::iter::once("score".to_string())
            .chain(aspects.iter().map(|a| format!("aspect_heads.{a}")));
        for (row, name) in names.enumerate() {
            out.insert(format!("{name}.weight"), weight.narrow(0, row, 1)?);
            out.insert(format!("{name}.bias"), bias.narrow(0, row, 1)?);
        }
    }
    let step_path = dir.join(st_layout::STEP_HEAD_FILE);
    if step_path.is_file() {
        let step = candle_core::safetensors::load(&step_path, device)
            .with_context(|| format!("reading weights {}", step_path.display()))?;
        for part in ["weight", "bias"] {
            let t = step
                .get(part)
                .with_context(|| format!("{} has no tensor {part}", step_path.display()))?;
            out.insert(format!("step_head.{part}"), t.clone());
        }
    }
    Ok(out)
}

/// A standard normal sample (Box–Muller; `rand` 0.9 has no normal distribution without
/// `rand_distr`, and this is only used for reproducible initialisation).
fn normal_sample(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
