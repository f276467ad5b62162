//! Trainable llama-family decoder with a causal-LM head and a sequence-classification (reward)
//! head: one decoder for Llama (SmolLM2, Llama 3.x), Mistral, Qwen2/2.5, Qwen3 and Gemma 2/3,
//! whose differences are switches read from `config.json` ([`super::family`]) and whose RoPE
//! scalings are resolved by [`super::rope`].
//!
//! candle-transformers ships a Llama, but its fused kernels have no backward pass (GUIDE §4), so
//! this one is assembled only from differentiable pieces in [`super::ops`]. Parameter names are
//! the Hugging Face tensor names (`model.layers.3.self_attn.q_proj.weight`, `score.weight`, …):
//! a [`VarMap`] built here reads and writes HF checkpoints without renaming, and a saved model
//! loads back into transformers unchanged.
//!
//! Padding follows transformers: position ids are `cumsum(attention_mask) - 1` (so left-padded
//! rows get the same positions as unpadded ones), padded keys are masked out, and the reward is
//! read at the last non-pad token of each row.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, Init, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::checkpoint_io::{self, LoadReport};
use super::family::{Family, FamilyError};
use super::lora::{AdaptableLinear, HasAdaptableLinears};
use super::ops;
use super::recompute;
use super::rope::{Rope, RopeDims, RopeError};
use crate::kernels;

/// Key in `config.json` under which this crate records its extra reward heads. transformers
/// keeps unknown config keys as plain attributes, so the file stays loadable there.
pub const EXTRA_HEADS_KEY: &str = "rlhf_bot_heads";

/// One token id or several (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_parameters` as transformers 5 writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Scaling fields (`factor`, `original_max_position_embeddings`, …; see [`Rope`]) or, for
    /// Gemma 3, one dictionary per layer type (`full_attention`, `sliding_attention`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Extra heads on the reward model beyond HF's `score` head.
///
/// Each is its own `Linear` under its own name, so `score.weight` stays exactly what
/// `LlamaForSequenceClassification` expects and transformers ignores the extras.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtraHeads {
    /// Named per-aspect rating heads (`aspect_heads.<name>.weight/bias`), read at the same token
    /// as the reward.
    #[serde(default)]
    pub aspects: Vec<String>,
    /// A per-token head (`step_head.weight/bias`) whose outputs the caller reads at the
    /// positions where reasoning steps end.
    #[serde(default)]
    pub step_head: bool,
}

/// A llama-family `config.json`. Unknown fields are kept in `extra` and written back on save.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4 writes the RoPE base here; transformers 5 under `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, u32>>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(
        rename = "rlhf_bot_heads",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub extra_heads: Option<ExtraHeads>,
    /// Every other field of the file (architectures, dtype, transformers_version, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_init_range() -> f64 {
    0.02
}

/// Why a config cannot be used by this port.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")]
    KvHeads { heads: usize, kv: usize },
    #[error("head_dim {0} must be even for rotary embeddings")]
    OddHeadDim(usize),
    #[error(
        "hidden activation {0:?} is not supported\nhint: supported activations are silu (swish) and gelu_pytorch_tanh (gelu_new)"
    )]
    Activation(String),
    #[error(transparent)]
    Rope(#[from] RopeError),
    #[error(transparent)]
    Family(#[from] FamilyError),
    #[error(
        "layer_types has {found} entries for {layers} layers, or a value other than \"full_attention\" / \"sliding_attention\"\nhint: list one of those two per layer"
    )]
    LayerTypes { found: usize, layers: usize },
    #[error(
        "use_bidirectional_attention is not supported\nhint: this port trains causal decoders only"
    )]
    Bidirectional,
    #[error("{field} must be positive, got 0")]
    Zero { field: &'static str },
}

/// The gated feed-forward's activation: `act(gate) ⊙ up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self, ConfigError> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            other => Err(ConfigError::Activation(other.to_owned())),
        }
    }
}

/// A key of `extra`: absent (`None`), JSON null (`Some(None)`), or a number.
fn extra_number(
    extra: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<Option<f64>> {
    extra.get(key).map(serde_json::Value::as_f64)
}

impl LlamaConfig {
    /// Parses and validates a `config.json` body.
    pub fn from_json_str(text: &str) -> anyhow::Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: LlamaConfig = serde_path_to_error::deserialize(de)
            .context("config.json does not describe a llama-family model")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// A fresh config (random-init models in tests and benches).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("dtype".into(), "float32".into());
        Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: Some(10_000.0),
            rope_parameters: Some(RopeParameters {
                rope_theta: Some(10_000.0),
                rope_type: Some("default".into()),
                extra: serde_json::Map::new(),
            }),
            rope_scaling: None,
            vocab_size,
            max_position_embeddings: 2048,
            tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: Some("silu".into()),
            model_type: Some("llama".into()),
            pad_token_id: None,
            bos_token_id: None,
            eos_token_id: None,
            num_labels: None,
            id2label: None,
            label2id: None,
            initializer_range: 0.02,
            extra_heads: None,
            extra,
        }
    }

    /// Checks the fields this port depends on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let family = self.checked_family()?;
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("num_key_value_heads", self.num_kv_heads()),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(ConfigError::KvHeads {
                heads: self.num_attention_heads,
                kv: self.num_kv_heads(),
            });
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(ConfigError::OddHeadDim(self.head_dim()));
        }
        self.checked_activation()?;
        if let Some(types) = self.layer_types() {
            let known = types
                .iter()
                .all(|t| t == "full_attention" || t == "sliding_attention");
            if types.len() != self.num_hidden_layers || !known {
                return Err(ConfigError::LayerTypes {
                    found: types.len(),
                    layers: self.num_hidden_layers,
                });
            }
        }
        if family.is_gemma()
            && self
                .extra
                .get("use_bidirectional_attention")
                .and_then(serde_json::Value::as_bool)
                == Some(true)
        {
            return Err(ConfigError::Bidirectional);
        }
        self.rope(false)?;
        self.rope(true)?;
        Ok(())
    }

    fn checked_family(&self) -> Result<Family, FamilyError> {
        let architectures: Vec<String> = self
            .extra
            .get("architectures")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Family::resolve(self.model_type.as_deref(), &architectures)
    }

    /// The decoder family (Llama when the config names none; [`Self::validate`] refuses
    /// unknown ones).
    pub fn family(&self) -> Family {
        self.checked_family().unwrap_or(Family::Llama)
    }

    fn checked_activation(&self) -> Result<Activation, ConfigError> {
        let family = self.family();
        // Gemma configs name it `hidden_activation`; the others `hidden_act`.
        let name = if family.is_gemma() {
            self.extra
                .get("hidden_activation")
                .and_then(serde_json::Value::as_str)
        } else {
            self.hidden_act.as_deref()
        };
        Activation::parse(name.unwrap_or(family.default_activation()))
    }

    /// The feed-forward activation (validated).
    pub fn activation(&self) -> Activation {
        self.checked_activation().unwrap_or(Activation::Silu)
    }

    fn layer_types(&self) -> Option<Vec<String>> {
        let list = self.extra.get("layer_types")?.as_array()?;
        Some(
            list.iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect(),
        )
    }

    /// The sliding-window width of the family's sliding layers, `None` when no layer slides
    /// (transformers' class defaults apply to keys the config omits).
    pub fn sliding_window(&self) -> Option<usize> {
        let window = || match self.extra.get("sliding_window") {
            None => Some(4096),
            Some(v) => v.as_u64().map(|w| w as usize),
        };
        match self.family() {
            Family::Llama => None,
            Family::Mistral | Family::Gemma2 | Family::Gemma3 => window(),
            Family::Qwen2 | Family::Qwen3 => {
                let on = self
                    .extra
                    .get("use_sliding_window")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                if on { window() } else { None }
            }
        }
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn layer_is_sliding(&self, i: usize) -> bool {
        if self.sliding_window().is_none() {
            return false;
        }
        let family = self.family();
        if family == Family::Mistral {
            // Mistral slides in every layer; its class ignores `layer_types`.
            return true;
        }
        if let Some(types) = self.layer_types() {
            return types.get(i).is_some_and(|t| t == "sliding_attention");
        }
        let count = |key: &str, default: usize| {
            self.extra
                .get(key)
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as usize)
        };
        family.default_layer_is_sliding(
            i,
            count("max_window_layers", 28),
            count("sliding_window_pattern", 6),
        )
    }

    /// Multiplier of `q·kᵀ`: `query_pre_attn_scalar^-½` (Gemma), else `head_dim^-½`.
    pub fn attention_scale(&self) -> f64 {
        let scalar = if self.family().is_gemma() {
            extra_number(&self.extra, "query_pre_attn_scalar")
                .flatten()
                .unwrap_or(256.0)
        } else {
            self.head_dim() as f64
        };
        1.0 / scalar.sqrt()
    }

    /// `tanh(s / cap) · cap` on attention logits (Gemma 2; its class default is 50).
    pub fn attention_softcap(&self) -> Option<f64> {
        if !self.family().applies_attention_softcap() {
            return None;
        }
        extra_number(&self.extra, "attn_logit_softcapping").unwrap_or(Some(50.0))
    }

    /// `tanh(logits / cap) · cap` on the LM head's logits (Gemma 2 default 30, Gemma 3 none).
    pub fn final_logit_softcap(&self) -> Option<f64> {
        let default = match self.family() {
            Family::Gemma2 => Some(30.0),
            Family::Gemma3 => None,
            _ => return None,
        };
        extra_number(&self.extra, "final_logit_softcapping").unwrap_or(default)
    }

    /// The rotary embedding of full-attention (`sliding == false`) or sliding layers; they
    /// differ only in Gemma 3 (its local base, and scaling on the global layers only).
    pub fn rope(&self, sliding: bool) -> Result<Rope, ConfigError> {
        let family = self.family();
        let layer_key = if sliding {
            "sliding_attention"
        } else {
            "full_attention"
        };
        let nested = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.extra.get(layer_key))
            .and_then(serde_json::Value::as_object);
        let mut default_theta = self.rope_theta.unwrap_or(family.default_theta(false));
        let params: serde_json::Map<String, serde_json::Value> = if let Some(nested) = nested {
            nested.clone()
        } else if family == Family::Gemma3 && sliding {
            // transformers-4 Gemma 3: the local layers are plain RoPE on a base of their own
            // (`rope_local_base_freq`, below); any scaling is for the global layers.
            serde_json::Map::new()
        } else if let Some(scaling) = self.rope_scaling.as_ref().and_then(|v| v.as_object()) {
            // transformers-4 configs: `rope_scaling` replaces `rope_parameters` entirely.
            scaling.clone()
        } else if let Some(p) = &self.rope_parameters {
            match serde_json::to_value(p) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            }
        } else {
            serde_json::Map::new()
        };
        if family == Family::Gemma3 && sliding {
            default_theta = extra_number(&self.extra, "rope_local_base_freq")
                .flatten()
                .unwrap_or(family.default_theta(true));
        }
        let dims = RopeDims {
            head_dim: self.head_dim(),
            max_position_embeddings: self.max_position_embeddings,
            default_theta,
            top_level_original_max: self
                .extra
                .get("original_max_position_embeddings")
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize),
        };
        Ok(Rope::from_params(&params, dims)?)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| {
            self.family()
                .default_head_dim()
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
        })
    }

    /// RoPE base: `rope_parameters.rope_theta`, else `rope_theta`, else 10000 (HF's default).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.family().always_qkv_bias()
    }

    fn o_bias(&self) -> bool {
        self.attention_bias && !self.family().always_qkv_bias()
    }

    /// Number of outputs of the `score` head: `num_labels`, else the size of `id2label`, else 2
    /// (transformers' `PretrainedConfig` default). Reward models set 1 via [`Self::set_num_labels`].
    pub fn num_labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(BTreeMap::len))
            .unwrap_or(2)
    }

    /// Sets the label count the way transformers serialises it (`id2label` / `label2id`).
    pub fn set_num_labels(&mut self, n: usize) {
        self.num_labels = None;
        self.id2label = Some(
            (0..n)
                .map(|i| (i.to_string(), format!("LABEL_{i}")))
                .collect(),
        );
        self.label2id = Some((0..n).map(|i| (format!("LABEL_{i}"), i as u32)).collect());
    }

    /// The end-of-sequence ids (possibly several).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Writes `dir/config.json` naming the given architecture.
    pub fn save(&self, dir: &Path, architecture: &str) -> anyhow::Result<()> {
        let mut cfg = self.clone();
        cfg.extra.insert(
            "architectures".into(),
            serde_json::Value::Array(vec![architecture.into()]),
        );
        let text = serde_json::to_string_pretty(&cfg).context("serialising config.json")?;
        let path = dir.join("config.json");
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// A weight initialised like transformers' `_init_weights` (normal, std `initializer_range`).
fn weight_init(cfg: &LlamaConfig) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: cfg.initializer_range,
    }
}

fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    cfg: &LlamaConfig,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    // The weight in the builder's dtype (bf16 for a frozen model held in bf16); everything
    // else a model holds — biases, norms, embeddings, heads — stays f32.
    let w = vb.get_with_hints((out_dim, in_dim), "weight", weight_init(cfg))?;
    let b = if bias {
        Some(vb.get_with_hints_dtype(out_dim, "bias", Init::Const(0.0), DType::F32)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// RMSNorm with its HF weight name (`<prefix>.weight`). Gemma stores the scale as an offset
/// from 1 (`x̂ · (1 + w)`, initialised at 0); the kernel then runs on `1 + w`.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    unit_offset: bool,
}

impl RmsNorm {
    fn new(size: usize, cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let unit_offset = cfg.family().norm_unit_offset();
        let init = Init::Const(if unit_offset { 0.0 } else { 1.0 });
        let weight = vb.get_with_hints_dtype(size, "weight", init, DType::F32)?;
        Ok(Self {
            weight,
            eps: cfg.rms_norm_eps,
            unit_offset,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.unit_offset {
            kernels::rms_norm(x, &(&self.weight + 1.0)?, self.eps)
        } else {
            kernels::rms_norm(x, &self.weight, self.eps)
        }
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: AdaptableLinear,
    up_proj: AdaptableLinear,
    down_proj: AdaptableLinear,
    activation: Activation,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(h, i, b, cfg, vb.pp("gate_proj"))?.into(),
            up_proj: linear(h, i, b, cfg, vb.pp("up_proj"))?.into(),
            down_proj: linear(i, h, b, cfg, vb.pp("down_proj"))?.into(),
            activation: cfg.activation(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let gated = match self.activation {
            Activation::Silu => kernels::silu_mul(&gate, &up)?,
            // No fused GeGLU kernel: candle's tanh-GELU (it has a backward) and a product.
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated)
    }
}

/// What every attention layer of one kind (full or sliding) shares in a forward pass: rotary
/// tables for the query positions and the additive mask.
///
/// With a KV cache, `bias` covers `past + current` keys and `cos`/`sin` only the current
/// queries; [`LlamaModel::forward_with_offset`] builds it that way.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    /// `[batch, 1, q_len, head_dim]`.
    pub cos: Tensor,
    /// `[batch, 1, q_len, head_dim]`.
    pub sin: Tensor,
    /// `[batch, 1, q_len, k_len]`, 0 or [`ops::MASK_VALUE`].
    pub bias: Tensor,
}

/// The contexts of one forward pass: full-attention layers read `full`, sliding-window layers
/// `sliding` (present only when the model has sliding layers).
#[derive(Debug, Clone)]
pub struct ForwardContext {
    pub full: AttentionContext,
    pub sliding: Option<AttentionContext>,
}

impl ForwardContext {
    fn for_layer(&self, sliding: bool) -> &AttentionContext {
        match (&self.sliding, sliding) {
            (Some(ctx), true) => ctx,
            _ => &self.full,
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: AdaptableLinear,
    k_proj: AdaptableLinear,
    v_proj: AdaptableLinear,
    o_proj: AdaptableLinear,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let (q_norm, k_norm) = if cfg.family().qk_norm() {
            (
                Some(RmsNorm::new(hd, cfg, vb.pp("q_norm"))?),
                Some(RmsNorm::new(hd, cfg, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: linear(h, nh * hd, cfg.qkv_bias(), cfg, vb.pp("q_proj"))?.into(),
            k_proj: linear(h, nkv * hd, cfg.qkv_bias(), cfg, vb.pp("k_proj"))?.into(),
            v_proj: linear(h, nkv * hd, cfg.qkv_bias(), cfg, vb.pp("v_proj"))?.into(),
            o_proj: linear(nh * hd, h, cfg.o_bias(), cfg, vb.pp("o_proj"))?.into(),
            q_norm,
            k_norm,
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
            scale: cfg.attention_scale(),
            softcap: cfg.attention_softcap(),
        })
    }

    /// Projects `x` to `(q, k, v)`, each `[batch, heads, seq, head_dim]`, RoPE applied to q, k.
    fn qkv(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let split =
            |y: Tensor, heads: usize, norm: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
                let y = y.reshape((b, t, heads, self.head_dim))?;
                let y = match norm {
                    Some(n) => n.forward(&y)?,
                    None => y,
                };
                y.transpose(1, 2)
            };
        let q = split(self.q_proj.forward(x)?, self.n_heads, self.q_norm.as_ref())?;
        let k = split(self.k_proj.forward(x)?, self.n_kv, self.k_norm.as_ref())?;
        let v = split(self.v_proj.forward(x)?, self.n_kv, None)?.contiguous()?;
        let q = kernels::apply_rope(&q, &ctx.cos, &ctx.sin)?;
        let k = kernels::apply_rope(&k, &ctx.cos, &ctx.sin)?;
        Ok((q, k, v))
    }

    /// Scaled dot-product attention with grouped KV heads, from candle's ops: the path off the
    /// CPU and the one for soft-capped logits (no fused kernel caps them).
    ///
    /// Query heads that share a KV head are stacked along the sequence axis
    /// (`[b, kv, rep·t, d]`), so K and V are used as they are instead of being repeated
    /// `rep` times; head `h` reads KV head `h / rep`, as transformers' `repeat_kv` does.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, _, tq, d) = q.dims4()?;
        let tk = k.dim(2)?;
        let rep = self.n_heads / self.n_kv;
        let q = (q * self.scale)?.reshape((b, self.n_kv, rep * tq, d))?;
        let mut scores = q.matmul(&k.t()?)?.reshape((b, self.n_heads, tq, tk))?;
        if let Some(cap) = self.softcap {
            // Gemma 2: tanh(s / cap) · cap before the mask is added, as transformers does.
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let probs = kernels::softmax_last_dim(&scores.broadcast_add(bias)?)?;
        let out = probs
            .reshape((b, self.n_kv, rep * tq, tk))?
            .matmul(v)?
            .reshape((b, self.n_heads, tq, d))?;
        out.transpose(1, 2)?.reshape((b, tq, self.n_heads * d))
    }

    /// With `kv` (generation), the new keys/values are appended to the layer's cache and
    /// the queries attend to past and new keys alike.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        kv: Option<&mut LayerKv>,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.qkv(x, ctx)?;
        let fused = self.softcap.is_none();
        if kv.is_none() && fused && kernels::fusable_all(&[&q, &k, &v, &ctx.bias]) {
            // Training and scoring (no cache): the fused op, one pass with its own backward.
            let out = kernels::causal_attention(&q, &k, &v, &ctx.bias, self.scale as f32)?;
            return self.o_proj.forward(&out);
        }
        let out = match kv {
            None => self.attend(&q, &k, &v, &ctx.bias)?,
            Some(slot) => {
                let buf = KvBuffer::append(slot, &k.contiguous()?, &v.contiguous()?)?;
                if fused && kernels::fusable_all(&[&q, &buf.k, &buf.v, &ctx.bias]) {
                    let op = kernels::CachedAttention {
                        heads: self.n_heads,
                        len: buf.len,
                        scale: self.scale as f32,
                        bias: ctx.bias.flatten_all()?.to_vec1::<f32>()?,
                    };
                    q.contiguous()?.apply_op3_no_bwd(&buf.k, &buf.v, &op)?
                } else {
                    let (k, v) = (buf.keys()?.contiguous()?, buf.values()?.contiguous()?);
                    self.attend(&q, &k, &v, &ctx.bias)?
                }
            }
        };
        self.o_proj.forward(&out)
    }
}

/// Gemma's extra norms around the feed-forward (its `post_attention_layernorm` then normalises
/// the attention output instead of the feed-forward input).
#[derive(Debug, Clone)]
struct SandwichNorms {
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    sandwich: Option<SandwichNorms>,
    /// Attends through the sliding window (and, in Gemma 3, with the local RoPE).
    sliding: bool,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, index: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let sandwich = if cfg.family().sandwich_norms() {
            Some(SandwichNorms {
                pre_feedforward_layernorm: RmsNorm::new(
                    h,
                    cfg,
                    vb.pp("pre_feedforward_layernorm"),
                )?,
                post_feedforward_layernorm: RmsNorm::new(
                    h,
                    cfg,
                    vb.pp("post_feedforward_layernorm"),
                )?,
            })
        } else {
            None
        };
        Ok(Self {
            input_layernorm: RmsNorm::new(h, cfg, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(h, cfg, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            sandwich,
            sliding: cfg.layer_is_sliding(index),
        })
    }

    /// The layer's trainable tensors (LoRA A/B, or every weight when fully trained), the ones
    /// a recomputed layer must hand gradients to.
    fn trainable(&self) -> Vec<Tensor> {
        let a = &self.self_attn;
        let m = &self.mlp;
        let linears = [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ];
        let mut norms = vec![&self.input_layernorm, &self.post_attention_layernorm];
        norms.extend(a.q_norm.iter().chain(&a.k_norm));
        if let Some(s) = &self.sandwich {
            norms.extend([&s.pre_feedforward_layernorm, &s.post_feedforward_layernorm]);
        }
        linears
            .into_iter()
            .flat_map(AdaptableLinear::tensors)
            .chain(norms.into_iter().map(|n| n.weight.clone()))
            .filter(Tensor::is_variable)
            .collect()
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardContext,
        kv: Option<&mut LayerKv>,
    ) -> candle_core::Result<Tensor> {
        let ctx = ctx.for_layer(self.sliding);
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, kv)?;
        match &self.sandwich {
            None => {
                let h = (x + attn)?;
                &h + self
                    .mlp
                    .forward(&self.post_attention_layernorm.forward(&h)?)?
            }
            Some(n) => {
                let h = (x + self.post_attention_layernorm.forward(&attn)?)?;
                let ff = self
                    .mlp
                    .forward(&n.pre_feedforward_layernorm.forward(&h)?)?;
                &h + n.post_feedforward_layernorm.forward(&ff)?
            }
        }
    }
}

/// Converts a `[batch, seq]` integer tensor (u8/u32/i64/f32…) to host rows.
fn mask_rows(mask: &Tensor) -> candle_core::Result<Vec<Vec<u32>>> {
    mask.to_dtype(DType::U32)?.to_vec2::<u32>()
}

/// The decoder body (`model.*` in HF checkpoints): embeddings, layers, final norm.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    embed_tokens: Embedding,
    /// √hidden for Gemma (rounded to f32 as transformers' buffer is), else none.
    embed_scale: Option<f64>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope_full: Rope,
    /// The sliding layers' rotary embedding and window, when any layer slides.
    sliding: Option<(Rope, usize)>,
    cfg: LlamaConfig,
    /// Gradient checkpointing: layers keep no activations and run again in backward.
    recompute_layers: bool,
}

impl LlamaModel {
    /// Builds the body under `vb` (which should be prefixed `model`).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let emb = vb.pp("embed_tokens").get_with_hints_dtype(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            weight_init(cfg),
            DType::F32,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rope = |sliding| cfg.rope(sliding).map_err(candle_core::Error::wrap);
        let sliding = match cfg.sliding_window() {
            Some(w) if layers.iter().any(|l| l.sliding) => Some((rope(true)?, w)),
            _ => None,
        };
        let embed_scale = cfg
            .family()
            .scales_embedding()
            .then(|| f64::from((cfg.hidden_size as f64).sqrt() as f32));
        Ok(Self {
            embed_tokens: Embedding::new(emb, cfg.hidden_size),
            embed_scale,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg, vb.pp("norm"))?,
            rope_full: rope(false)?,
            sliding,
            cfg: cfg.clone(),
            recompute_layers: false,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The token embedding matrix `[vocab, hidden]` (the LM head when tied).
    pub fn embed_weight(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    fn embed(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.embed_tokens.forward(input_ids)?;
        match self.embed_scale {
            Some(s) => x * s,
            None => Ok(x),
        }
    }

    /// Rotary tables and attention masks for `q_len` new tokens after `offset` cached ones.
    /// `mask` rows span `offset + q_len` columns.
    pub fn attention_context(
        &self,
        mask: &[Vec<u32>],
        offset: usize,
        device: &Device,
    ) -> candle_core::Result<ForwardContext> {
        let k_len = mask.first().map_or(0, Vec::len);
        if k_len < offset {
            candle_core::bail!("attention mask has {k_len} columns, fewer than offset {offset}");
        }
        let positions = ops::positions_from_mask(mask, offset);
        // Length-dependent scalings (dynamic, longrope) follow the largest position of this
        // call, as transformers' `dynamic_rope_update` does.
        let seq_len = positions
            .iter()
            .flatten()
            .max()
            .map_or(0, |&p| p as usize + 1);
        let tables = |rope: &Rope| {
            ops::rope_tables_scaled(
                &positions,
                &rope.inv_freq_for(seq_len),
                rope.attention_scaling(),
                device,
            )
        };
        let q_len = k_len - offset;
        let (cos, sin) = tables(&self.rope_full)?;
        let full = AttentionContext {
            cos,
            sin,
            bias: ops::attention_bias(mask, q_len, device)?,
        };
        let sliding = match &self.sliding {
            None => None,
            Some((rope, window)) => {
                let (cos, sin) = if rope == &self.rope_full {
                    (full.cos.clone(), full.sin.clone())
                } else {
                    tables(rope)?
                };
                Some(AttentionContext {
                    cos,
                    sin,
                    bias: ops::sliding_attention_bias(mask, q_len, *window, device)?,
                })
            }
        };
        Ok(ForwardContext { full, sliding })
    }

    /// Final hidden states `[batch, seq, hidden]` for `input_ids` `[batch, seq]`.
    /// `attention_mask` (same shape, 1 = token, 0 = padding) defaults to all ones.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_offset(input_ids, attention_mask, 0)
    }

    /// Like [`Self::forward`] for tokens that follow `offset` earlier ones. The attention mask
    /// then spans `offset + seq` columns. Without a KV cache only `offset == 0` has keys to
    /// attend to; cached generation goes through [`Self::forward_cached`].
    pub fn forward_with_offset(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        offset: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let mask = match attention_mask {
            Some(m) => {
                let rows = mask_rows(m)?;
                if rows.len() != b || rows.first().map_or(0, Vec::len) != offset + t {
                    candle_core::bail!(
                        "attention mask {:?} does not match input ids {:?} with offset {offset}",
                        m.shape(),
                        input_ids.shape()
                    );
                }
                rows
            }
            None => vec![vec![1u32; offset + t]; b],
        };
        if offset != 0 {
            candle_core::bail!(
                "position offset {offset} needs a KV cache\nhint: use LlamaModel::forward_cached"
            );
        }
        let ctx = self.attention_context(&mask, offset, input_ids.device())?;
        let mut x = self.embed(input_ids)?;
        for layer in &self.layers {
            x = if self.recompute_layers {
                let (layer_, ctx_) = (layer.clone(), ctx.clone());
                let block: recompute::Block = Arc::new(move |x| layer_.forward(x, &ctx_, None));
                recompute::checkpointed(block, &x, layer.trainable())?
            } else {
                layer.forward(&x, &ctx, None)?
            };
        }
        self.norm.forward(&x)
    }

    /// Turns gradient checkpointing on or off (`policy.gradient_checkpointing`): with it, a
    /// training forward keeps each layer's input only and recomputes the layer in backward.
    /// Off by default; generation (the KV-cache path) never recomputes.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.recompute_layers = on;
    }

    /// Hidden states `[batch, t, hidden]` for `input_ids` `[batch, t]` that follow the
    /// positions already in `cache` (one [`LayerKv`] per layer, all empty at the start), whose
    /// keys/values are extended in place. `mask` rows span past plus new columns.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut [LayerKv],
    ) -> candle_core::Result<Tensor> {
        if cache.len() != self.layers.len() {
            candle_core::bail!(
                "KV cache has {} layers, the model {}",
                cache.len(),
                self.layers.len()
            );
        }
        let offset = cache
            .first()
            .and_then(Option::as_ref)
            .map_or(0, KvBuffer::len);
        let (b, t) = input_ids.dims2()?;
        if mask.len() != b || mask.first().map_or(0, Vec::len) != offset + t {
            candle_core::bail!(
                "attention mask {}x{} does not match input ids {b}x{t} after {offset} cached",
                mask.len(),
                mask.first().map_or(0, Vec::len)
            );
        }
        let ctx = self.attention_context(mask, offset, input_ids.device())?;
        let mut x = self.embed(input_ids)?;
        for (layer, kv) in self.layers.iter().zip(cache.iter_mut()) {
            x = layer.forward(&x, &ctx, Some(kv))?;
        }
        self.norm.forward(&x)
    }

    /// Every projection that can carry a LoRA adapter, with its HF module path.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }
}

/// One layer's cached keys and values, `None` before the first forward pass.
pub type LayerKv = Option<KvBuffer>;

/// Keys and values of one layer in buffers with room to grow: `[batch, kv_heads, capacity,
/// head_dim]`, of which the first `len` positions are filled.
///
/// Appending writes the new positions in place, so a generation step copies only its own
/// keys/values instead of the whole cache (what `cat` of the old cache with the new column
/// did); the buffers double when full. Not `Clone`: a clone would share the buffers, and
/// appending to one would write into the other.
#[derive(Debug)]
pub struct KvBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions a new cache buffer holds beyond the prompt before it first has to grow.
const KV_HEADROOM: usize = 128;

impl KvBuffer {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cached keys `[batch, kv_heads, len, head_dim]` (a view into the buffer).
    pub fn keys(&self) -> candle_core::Result<Tensor> {
        self.k.narrow(2, 0, self.len)
    }

    /// The cached values `[batch, kv_heads, len, head_dim]` (a view into the buffer).
    pub fn values(&self) -> candle_core::Result<Tensor> {
        self.v.narrow(2, 0, self.len)
    }

    /// Appends contiguous `k`, `v` (`[batch, kv_heads, t, head_dim]`) to `slot`, creating or
    /// growing its buffers as needed, and returns the updated buffer.
    fn append<'a>(
        slot: &'a mut LayerKv,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<&'a KvBuffer> {
        let (b, h, t, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let cap = slot.as_ref().map_or(0, |s| s.k.dim(2).unwrap_or(0));
        if len + t > cap {
            let new_cap = (len + t + KV_HEADROOM).max(2 * cap);
            let grow = |old: Option<Tensor>| -> candle_core::Result<Tensor> {
                let buf = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = slot.take();
            let (ok, ov) = match old {
                Some(o) => (Some(o.k), Some(o.v)),
                None => (None, None),
            };
            *slot = Some(KvBuffer {
                k: grow(ok)?,
                v: grow(ov)?,
                len,
            });
        }
        let Some(buf) = slot.as_mut() else {
            candle_core::bail!("KV cache slot is empty after allocation");
        };
        buf.k.slice_set(k, 2, len)?;
        buf.v.slice_set(v, 2, len)?;
        buf.len = len + t;
        Ok(buf)
    }
}

/// `LlamaForCausalLM`: the body plus an LM head (`lm_head.weight`, or the embeddings when
/// `tie_word_embeddings`).
#[derive(Debug, Clone)]
pub struct LlamaForCausalLM {
    model: LlamaModel,
    lm_head: Tensor,
    /// Gemma's `final_logit_softcapping`: logits become `tanh(z / cap) · cap`.
    final_softcap: Option<f64>,
}

/// Rows of the LM head processed together by the fused log-prob op: 256 × 49152 floats is
/// 50 MB, big enough for full-speed matmuls, small enough to stay in the last-level cache's
/// neighbourhood instead of the multi-GB `[tokens, vocab]` buffers.
pub const LOGPROB_CHUNK: usize = 256;

impl LlamaForCausalLM {
    /// Builds the model under the root `vb` (HF names).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let model = LlamaModel::new(cfg, vb.pp("model"))?;
        let lm_head = if cfg.tie_word_embeddings {
            model.embed_weight().clone()
        } else {
            vb.pp("lm_head").get_with_hints_dtype(
                (cfg.vocab_size, cfg.hidden_size),
                "weight",
                weight_init(cfg),
                DType::F32,
            )?
        };
        Ok(Self {
            model,
            lm_head,
            final_softcap: cfg.final_logit_softcap(),
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Mutable body, for attaching LoRA adapters ([`LlamaModel::linears_mut`]).
    pub fn model_mut(&mut self) -> &mut LlamaModel {
        &mut self.model
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.model.cfg
    }

    /// The LM head weight `[vocab, hidden]`.
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Full logits `[batch, seq, vocab]`. For training on log-probs use
    /// [`Self::token_logprobs`], which never materialises this tensor.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let h = self.model.forward(input_ids, attention_mask)?;
        let (b, t, d) = h.dims3()?;
        self.head_logits(&h.reshape((b * t, d))?)?
            .reshape((b, t, ()))
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, hidden]`: the LM head, then the
    /// family's final soft-capping when it has one.
    pub fn head_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = kernels::matmul_t(&hidden.contiguous()?, &self.lm_head)?;
        match self.final_softcap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// Per-token log-probabilities `[batch, seq]`: entry `(i, t)` is
    /// `log p(input_ids[i, t] | input_ids[i, <t])` where `target_mask[i, t] == 1` and `t ≥ 1`,
    /// and 0 elsewhere. `target_mask` is TRL's `completion_mask` convention (it marks the
    /// predicted token, not the predicting position).
    ///
    /// Only the selected positions go through the LM head, through a fused
    /// log-softmax-and-gather op that keeps at most [`LOGPROB_CHUNK`] × vocab logits alive.
    pub fn token_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        target_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self.model.forward(input_ids, attention_mask)?;
        self.token_logprobs_from_hidden(&hidden, input_ids, target_mask)
            .map(|flat| flat.reshape((b, t)))?
    }

    /// The entropy `-Σ p·log p` of the next-token distribution `softmax(logits / temperature)`
    /// at every position of `hidden` (`[batch, seq, hidden]` → `[batch, seq]`), with its graph
    /// (GRPO's entropy bonus trains on it). Unlike [`Self::token_logprobs_from_hidden`] this
    /// materialises the positions' full logits, so callers ask for it only when a loss needs it.
    pub fn token_entropies_from_hidden(
        &self,
        hidden: &Tensor,
        temperature: f64,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let logits = (self.head_logits(&hidden.reshape((b * t, d))?)? / temperature)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        (logp.exp()? * &logp)?
            .sum(D::Minus1)?
            .neg()?
            .reshape((b, t))
    }

    /// [`Self::token_logprobs`] from precomputed final hidden states; returns `[batch·seq]`.
    pub fn token_logprobs_from_hidden(
        &self,
        hidden: &Tensor,
        input_ids: &Tensor,
        target_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.token_logprobs_from_hidden_at(hidden, input_ids, target_mask, 1.0)
    }

    /// [`Self::token_logprobs_from_hidden`] under `softmax(logits / temperature)` (how PPO
    /// scores its rollouts). The temperature divides the logits after any soft-capping.
    pub fn token_logprobs_from_hidden_at(
        &self,
        hidden: &Tensor,
        input_ids: &Tensor,
        target_mask: &Tensor,
        temperature: f64,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let sel = mask_rows(target_mask)?;
        if sel.len() != b || sel.iter().any(|r| r.len() != t) || ids.len() != b {
            candle_core::bail!(
                "target mask {:?} does not match input ids {:?}",
                target_mask.shape(),
                input_ids.shape()
            );
        }
        // Position (i, p) predicts token (i, p + 1).
        let mut src_rows = Vec::new();
        let mut dst_rows = Vec::new();
        let mut targets = Vec::new();
        for i in 0..b {
            for p in 1..t {
                if sel[i][p] != 0 {
                    src_rows.push((i * t + p - 1) as u32);
                    dst_rows.push((i * t + p) as u32);
                    targets.push(ids[i][p]);
                }
            }
        }
        let dev = hidden.device();
        let zeros = Tensor::zeros(b * t, DType::F32, dev)?;
        if targets.is_empty() {
            return Ok(zeros);
        }
        let src = Tensor::from_vec(src_rows, targets.len(), dev)?;
        let dst = Tensor::from_vec(dst_rows, targets.len(), dev)?;
        let picked = hidden.reshape((b * t, d))?.index_select(&src, 0)?;
        let logp = match self.final_softcap {
            None => {
                // Without capping, dividing the hidden states divides the logits (cheaper).
                let picked = if temperature == 1.0 {
                    picked
                } else {
                    (picked / temperature)?
                };
                kernels::lm_head_logprobs(&picked, &self.lm_head, &targets, LOGPROB_CHUNK)?
            }
            // The fused op has no soft-capping: candle's ops, chunk by chunk.
            Some(cap) => kernels::reference::lm_head_logprobs_capped(
                &picked,
                &self.lm_head,
                &targets,
                LOGPROB_CHUNK,
                Some(cap),
                temperature,
            )?,
        };
        zeros.index_add(&dst, &logp, 0)
    }

    /// Sum of [`Self::token_logprobs`] per row: the sequence log-probability of the tokens
    /// selected by `target_mask` (DPO's `logps`). Returns `[batch]`.
    pub fn sequence_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        target_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.token_logprobs(input_ids, attention_mask, target_mask)?
            .sum(D::Minus1)
    }
}

/// Outputs of [`LlamaForSequenceClassification::forward`].
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// `score` head at the pooled token: `[batch, num_labels]` (the reward when 1 label).
    pub logits: Tensor,
    /// Aspect heads at the pooled token: `[batch, n_aspects]`, in [`ExtraHeads::aspects`] order.
    pub aspects: Option<Tensor>,
    /// Step head at every token: `[batch, seq]`; read it at the positions where steps end.
    pub step_logits: Option<Tensor>,
    /// Index of the pooled (last non-pad) token of each row.
    pub pooled_index: Vec<usize>,
}

/// `LlamaForSequenceClassification`: the body plus a bias-free `score` head read at the last
/// non-pad token, and optional extra heads ([`ExtraHeads`]).
#[derive(Debug, Clone)]
pub struct LlamaForSequenceClassification {
    model: LlamaModel,
    score: Linear,
    aspect_heads: Vec<(String, Linear)>,
    step_head: Option<Linear>,
}

impl LlamaForSequenceClassification {
    /// Builds the model under the root `vb` with `cfg.num_labels()` outputs and the extra heads
    /// named in `cfg.extra_heads`.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let model = LlamaModel::new(cfg, vb.pp("model"))?;
        let h = cfg.hidden_size;
        // Heads stay f32 in a model whose projections are held in bf16.
        let vb = vb.set_dtype(DType::F32);
        let score = linear(h, cfg.num_labels(), false, cfg, vb.pp("score"))?;
        let heads = cfg.extra_heads.clone().unwrap_or_default();
        let aspect_heads = heads
            .aspects
            .iter()
            .map(|name| {
                linear(h, 1, true, cfg, vb.pp("aspect_heads").pp(name)).map(|l| (name.clone(), l))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let step_head = if heads.step_head {
            Some(linear(h, 1, true, cfg, vb.pp("step_head"))?)
        } else {
            None
        };
        Ok(Self {
            model,
            score,
            aspect_heads,
            step_head,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.model.cfg
    }

    /// Whether the model has a per-token step head.
    pub fn has_step_head(&self) -> bool {
        self.step_head.is_some()
    }

    /// Names of the aspect heads, in output column order.
    pub fn aspect_names(&self) -> Vec<&str> {
        self.aspect_heads.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Runs the model; the score and aspect heads read the last non-pad token of each row.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<ClassifierOutput> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self.model.forward(input_ids, attention_mask)?;
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mask = attention_mask.map(mask_rows).transpose()?;
        let pooled_index = pooled_positions(&ids, mask.as_deref(), self.model.cfg.pad_token_id);
        let flat_idx: Vec<u32> = pooled_index
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let d = hidden.dim(2)?;
        let idx = Tensor::from_vec(flat_idx, b, hidden.device())?;
        let pooled = hidden.reshape((b * t, d))?.index_select(&idx, 0)?;
        let logits = self.score.forward(&pooled)?;
        let aspects = if self.aspect_heads.is_empty() {
            None
        } else {
            let cols = self
                .aspect_heads
                .iter()
                .map(|(_, l)| l.forward(&pooled))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&cols, 1)?)
        };
        let step_logits = match &self.step_head {
            Some(l) => Some(l.forward(&hidden)?.squeeze(2)?),
            None => None,
        };
        Ok(ClassifierOutput {
            logits,
            aspects,
            step_logits,
            pooled_index,
        })
    }
}

/// The token each row's reward is read at.
///
/// With a pad id, transformers takes the rightmost token whose id is not the pad id (so when
/// pad = eos, a trailing eos is skipped, and an all-pad row reads position 0). Without one, the
/// last attended position (or the last column when there is no mask).
pub fn pooled_positions(
    ids: &[Vec<u32>],
    mask: Option<&[Vec<u32>]>,
    pad: Option<u32>,
) -> Vec<usize> {
    ids.iter()
        .enumerate()
        .map(|(i, row)| match pad {
            Some(pad) => row.iter().rposition(|&x| x != pad).unwrap_or(0),
            None => match mask.and_then(|m| m.get(i)) {
                Some(m) => m.iter().rposition(|&x| x != 0).unwrap_or(0),
                None => row.len().saturating_sub(1),
            },
        })
        .collect()
}

/// A model with its trainable weights and config, as loaded from (or saved to) a directory.
pub struct Pretrained<M> {
    pub model: M,
    pub varmap: VarMap,
    pub config: LlamaConfig,
    /// Which tensors came from the file and which were freshly initialised.
    pub report: LoadReport,
}

impl<M: std::fmt::Debug> std::fmt::Debug for Pretrained<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretrained")
            .field("model", &self.model)
            .field("config", &self.config)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// Heads that may be absent from a checkpoint: they are initialised instead (a reward model
/// started from a causal-LM checkpoint, new aspect heads). Everything else must be present.
fn optional_head(name: &str) -> bool {
    name.starts_with("score.")
        || name.starts_with("aspect_heads.")
        || name.starts_with("step_head.")
}

fn build_and_load<M>(
    dir: &Path,
    cfg: LlamaConfig,
    device: &Device,
    build: impl FnOnce(&LlamaConfig, VarBuilder) -> candle_core::Result<M>,
) -> anyhow::Result<Pretrained<M>> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = build(&cfg, vb).context("building the model")?;
    let tensors = checkpoint_io::read_dir_tensors(dir, device)?;
    let report = checkpoint_io::load_into_varmap(&varmap, &tensors, optional_head)
        .with_context(|| format!("loading weights from {}", dir.display()))?;
    tracing::debug!(dir = %dir.display(), loaded = report.loaded.len(), initialised = ?report.initialised, "loaded checkpoint");
    Ok(Pretrained {
        model,
        varmap,
        config: cfg,
        report,
    })
}

impl LlamaForCausalLM {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or a sharded index) as trainable
    /// f32 variables.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Pretrained<Self>> {
        let cfg = LlamaConfig::from_dir(dir)?;
        build_and_load(dir, cfg, device, Self::new)
    }

    /// A randomly initialised model (HF's init: normal(0, initializer_range), norms at 1).
    pub fn random(cfg: &LlamaConfig, device: &Device) -> anyhow::Result<(Self, VarMap)> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let model = Self::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((model, varmap))
    }
}

impl LlamaForSequenceClassification {
    /// Loads a reward model from `dir`. `num_labels` and `heads` override the config (use them
    /// to start a reward model from a causal-LM checkpoint: the heads are then initialised).
    pub fn load(
        dir: &Path,
        num_labels: Option<usize>,
        heads: Option<ExtraHeads>,
        device: &Device,
    ) -> anyhow::Result<Pretrained<Self>> {
        let mut cfg = LlamaConfig::from_dir(dir)?;
        if let Some(n) = num_labels {
            cfg.set_num_labels(n);
        }
        if heads.is_some() {
            cfg.extra_heads = heads;
        }
        build_and_load(dir, cfg, device, Self::new)
    }

    /// A randomly initialised model.
    pub fn random(cfg: &LlamaConfig, device: &Device) -> anyhow::Result<(Self, VarMap)> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let model = Self::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((model, varmap))
    }
}

/// Which HF class a saved directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    CausalLm,
    SequenceClassification,
}

impl Architecture {
    /// The transformers class name (`LlamaForCausalLM`, `Qwen2ForSequenceClassification`, …).
    pub fn class_name(self, cfg: &LlamaConfig) -> String {
        let family = cfg.family();
        match self {
            Architecture::CausalLm => family.causal_lm_class(),
            Architecture::SequenceClassification => family.classifier_class(),
        }
    }
}

/// Writes `dir/config.json` and `dir/model.safetensors` in the layout transformers'
/// `from_pretrained` reads. Tied LM heads are not written (the variable does not exist).
pub fn save_pretrained(
    dir: &Path,
    cfg: &LlamaConfig,
    varmap: &VarMap,
    arch: Architecture,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    cfg.save(dir, &arch.class_name(cfg))?;
    checkpoint_io::save_varmap(varmap, &dir.join("model.safetensors"))
}

impl HasAdaptableLinears for LlamaForCausalLM {
    fn linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear)> {
        self.model_mut().linears_mut()
    }
}

/// Loads an HF causal-LM directory with every weight a plain (non-variable) tensor: the frozen
/// base that adapters are attached to. Gradients cannot reach it, and no optimiser state is
/// spent on it.
pub fn load_frozen_causal_lm(
    dir: &Path,
    device: &candle_core::Device,
) -> anyhow::Result<LlamaForCausalLM> {
    load_frozen_causal_lm_in(dir, device, DType::F32)
}

/// [`load_frozen_causal_lm`] with the decoder's projections held in `projections` (bf16 halves
/// the bulk of a frozen model; see `policy.precision`). Embeddings, norms and the LM head stay
/// f32.
pub fn load_frozen_causal_lm_in(
    dir: &Path,
    device: &candle_core::Device,
    projections: DType,
) -> anyhow::Result<LlamaForCausalLM> {
    let cfg = LlamaConfig::from_dir(dir)?;
    let tensors = read_frozen_tensors(dir, device, projections)?;
    // A frozen base is what rollouts decode with: its weights are streamed once per token.
    kernels::collapse_into_huge_pages(tensors.values());
    let vb = candle_nn::VarBuilder::from_tensors(tensors, projections, device);
    LlamaForCausalLM::new(&cfg, vb)
        .with_context(|| format!("building the frozen base model from {}", dir.display()))
}

/// A reward model for scoring only (`policy.precision`): every weight a plain tensor, the
/// decoder's projections in `projections`, the heads f32; `num_labels` set to 1 as the scorer
/// reads it. Returns the model and its score head `[1, hidden]`.
pub fn load_frozen_reward_model(
    dir: &Path,
    device: &candle_core::Device,
    projections: DType,
) -> anyhow::Result<(LlamaForSequenceClassification, LlamaConfig, Option<Tensor>)> {
    let mut cfg = LlamaConfig::from_dir(dir)?;
    cfg.set_num_labels(1);
    let tensors = read_frozen_tensors(dir, device, projections)?;
    let score = tensors.get("score.weight").cloned();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, projections, device);
    let model = LlamaForSequenceClassification::new(&cfg, vb)
        .with_context(|| format!("building the frozen reward model from {}", dir.display()))?;
    Ok((model, cfg, score))
}

/// A checkpoint's tensors with the projections in `projections` and everything else in f32.
fn read_frozen_tensors(
    dir: &Path,
    device: &candle_core::Device,
    projections: DType,
) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
    checkpoint_io::read_dir_tensors_as(dir, device, |name| {
        if is_projection_weight(name) {
            projections
        } else {
            DType::F32
        }
    })
}

/// Whether `name` is the weight of a decoder projection (`model.layers.N.*_proj.weight`): what
/// LoRA adapts and a frozen model may hold in bf16.
pub fn is_projection_weight(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}
