//! A decoder policy as a GGUF file for llama.cpp and Ollama, following llama.cpp's
//! `convert_hf_to_gguf.py` conventions, plus the Ollama `Modelfile` that goes beside it.
//! Families go out under the architecture llama.cpp runs them as (`model::gguf::GgufArch`):
//! Llama and Mistral as `llama`, Qwen2/Qwen3, Gemma 2/3 as their own; Llama 3's RoPE scaling
//! as the `rope_freqs` tensor, linear scaling as `rope.scaling.*`; Gemma's norm weights as
//! `1 + w`.
//!
//! Part of what a Gemma computes is fixed in llama.cpp by architecture rather than read from
//! the file (which layers slide, the local RoPE base, the query scale). Before writing, the
//! metadata is read back through the importer's model of llama.cpp
//! ([`crate::model::gguf::config_from_metadata`]) and compared with the model's own config, so
//! a model llama.cpp would run differently is refused by name instead of served wrong.
//!
//! What llama.cpp needs, and why each piece is here: its tensor names (`blk.N.attn_q.weight`, the
//! inverse of the import's table in `model::gguf`); Q and K rows permuted into its interleaved
//! RoPE layout ([`crate::model::gguf::permute_qk`], undone by the importer); the `llama.*`
//! hyper-parameters; the tokenizer as `tokenizer.ggml.*` (byte-level BPE as `gpt2`: tokens, types,
//! merges, the pre-tokenizer's name; SentencePiece-style BPE as `llama`: tokens, scores, types,
//! the space prefix, from `model::gguf_vocab`; then special ids and whether to add BOS) because
//! llama.cpp never reads `tokenizer.json`; and `tokenizer.chat_template`. 1-D tensors (norms, biases) stay f32;
//! matrices are f16, or Q8_0 where the row length is a whole number of 32-value blocks (F16
//! otherwise, as the converter falls back).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::Value;

use super::CausalLm;
use super::gguf_writer::{ALIGNMENT, GgmlType, GgufTensor, GgufWriter};
use crate::model::gguf::{
    GgufArch, LLAMA3_SPLIT, ROPE_FREQS_TENSOR, config_from_metadata, gguf_tensor_name_for,
    permute_qk,
};
use crate::model::gguf_vocab::{self, merge_pairs, token_type};
use crate::model::llama::LlamaConfig;

/// The GGUF encodings of the matrices: `--format gguf-f16|gguf-q8_0`, and f32 for exact round
/// trips (tests compare imported logits with the original's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufEncoding {
    F32,
    F16,
    Q8_0,
}

impl GgufEncoding {
    /// llama.cpp's `LlamaFileType` (`general.file_type`): ALL_F32 = 0, MOSTLY_F16 = 1,
    /// MOSTLY_Q8_0 = 7.
    fn file_type(self) -> u32 {
        match self {
            GgufEncoding::F32 => 0,
            GgufEncoding::F16 => 1,
            GgufEncoding::Q8_0 => 7,
        }
    }
}

/// gguf-py's `GGML_QUANT_VERSION`.
const QUANT_VERSION: u32 = 2;

/// Builds the whole file in memory (tensors encoded); `name` becomes `general.name`.
pub fn build(lm: &CausalLm, encoding: GgufEncoding, name: &str) -> Result<GgufWriter> {
    let cfg = &lm.config;
    let family = cfg.family();
    let arch = GgufArch::of_family(family);
    if cfg.mlp_bias {
        bail!(
            "mlp_bias: true has no place in llama.cpp's {}\nhint: export `hf` instead",
            arch.name()
        );
    }
    if arch == GgufArch::Gemma2 && !cfg.tie_word_embeddings {
        bail!(
            "llama.cpp's gemma2 has no separate output head, and this Gemma 2 has untied embeddings\nhint: export `hf` instead"
        );
    }
    let mut w = GgufWriter::new();
    let s = |v: &str| Value::String(v.to_owned());
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{}.{k}", arch.name());
    w.set("general.architecture", s(arch.name()));
    w.set("general.type", s("model"));
    w.set("general.name", s(name));
    w.set("general.file_type", Value::U32(encoding.file_type()));
    w.set("general.quantization_version", Value::U32(QUANT_VERSION));
    w.set("general.alignment", u(ALIGNMENT));
    w.set(&key("vocab_size"), u(cfg.vocab_size));
    w.set(&key("context_length"), u(cfg.max_position_embeddings));
    w.set(&key("embedding_length"), u(cfg.hidden_size));
    w.set(&key("block_count"), u(cfg.num_hidden_layers));
    w.set(&key("feed_forward_length"), u(cfg.intermediate_size));
    w.set(&key("attention.head_count"), u(cfg.num_attention_heads));
    w.set(&key("attention.head_count_kv"), u(cfg.num_kv_heads()));
    w.set(&key("attention.key_length"), u(cfg.head_dim()));
    w.set(&key("attention.value_length"), u(cfg.head_dim()));
    w.set(&key("rope.dimension_count"), u(cfg.head_dim()));
    w.set(
        &key("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    );
    let rope_freqs = add_rope(&mut w, cfg, arch)?;
    if arch.is_gemma() {
        if let Some(cap) = cfg.attention_softcap() {
            w.set(&key("attn_logit_softcapping"), Value::F32(cap as f32));
        }
        if let Some(cap) = cfg.final_logit_softcap() {
            w.set(&key("final_logit_softcapping"), Value::F32(cap as f32));
        }
        if let Some(window) = cfg.sliding_window() {
            w.set(&key("attention.sliding_window"), u(window));
        }
    }
    check_llama_cpp_runs_it(&w, cfg, arch, rope_freqs.as_deref())?;
    add_tokenizer(&mut w, lm)?;
    add_tensors(&mut w, lm, arch, encoding, rope_freqs)?;
    Ok(w)
}

/// The RoPE metadata of the full-attention layers: the base, and the scaling as llama.cpp
/// takes it. Returns Llama 3's per-frequency divisors (the `rope_freqs` tensor) when it has one.
fn add_rope(w: &mut GgufWriter, cfg: &LlamaConfig, arch: GgufArch) -> Result<Option<Vec<f32>>> {
    let rope = cfg.rope(false)?;
    let key = |k: &str| format!("{}.{k}", arch.name());
    w.set(&key("rope.freq_base"), Value::F32(rope.theta() as f32));
    let base = crate::model::ops::rope_inv_freq(cfg.head_dim(), rope.theta());
    let scaled = rope.inv_freq_for(0);
    let divisors: Vec<f32> = base
        .iter()
        .zip(scaled.iter())
        .map(|(b, s)| (b / s) as f32)
        .collect();
    match rope.rope_type() {
        "default" => Ok(None),
        "linear" => {
            w.set(&key("rope.scaling.type"), Value::String("linear".into()));
            w.set(&key("rope.scaling.factor"), Value::F32(divisors[0]));
            Ok(None)
        }
        "llama3" if arch == GgufArch::Llama => Ok(Some(divisors)),
        other => bail!(
            "rope_type {other:?} has no export to llama.cpp's {} here\nhint: scalings exported to GGUF: linear, and llama3 for Llama; export `hf` and serve with transformers or vLLM",
            arch.name()
        ),
    }
}

/// Refuses a model that llama.cpp would run differently from this project: the metadata, read
/// back the way llama.cpp reads it, must give the same attention layout, scales, soft-caps,
/// activation and rotary frequencies.
fn check_llama_cpp_runs_it(
    w: &GgufWriter,
    ours: &LlamaConfig,
    arch: GgufArch,
    rope_freqs: Option<&[f32]>,
) -> Result<()> {
    let md: crate::model::gguf::Meta = w.metadata().iter().cloned().collect();
    let has_output = !ours.tie_word_embeddings;
    let theirs = config_from_metadata(&md, has_output, rope_freqs)?.to_hf_json();
    let theirs = LlamaConfig::from_json_str(&theirs.to_string())
        .context("reading back the GGUF metadata as llama.cpp would")?;
    let differs = |what: &str, here: String, there: String| {
        anyhow::anyhow!(
            "llama.cpp's {} would run this model differently: {what} is {here} here but {there} in llama.cpp (which fixes it by architecture, not from the file)\nhint: export `hf` and serve with transformers or vLLM",
            arch.name()
        )
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-30);
    let close_opt = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => close(a, b),
        (a, b) => a.is_none() && b.is_none(),
    };
    for i in 0..ours.num_hidden_layers {
        let (a, b) = (ours.layer_is_sliding(i), theirs.layer_is_sliding(i));
        if a != b {
            let kind = |s: bool| if s { "sliding" } else { "full" }.to_owned();
            return Err(differs(&format!("layer {i}'s attention"), kind(a), kind(b)));
        }
    }
    let any_sliding = (0..ours.num_hidden_layers).any(|i| ours.layer_is_sliding(i));
    if any_sliding && ours.sliding_window() != theirs.sliding_window() {
        let f = |w: Option<usize>| format!("{w:?}");
        return Err(differs(
            "the sliding window",
            f(ours.sliding_window()),
            f(theirs.sliding_window()),
        ));
    }
    if !close(ours.attention_scale(), theirs.attention_scale()) {
        let f = |s: f64| format!("{:.6} (query_pre_attn_scalar {:.1})", s, 1.0 / (s * s));
        return Err(differs(
            "the query scale",
            f(ours.attention_scale()),
            f(theirs.attention_scale()),
        ));
    }
    let caps = [
        (
            "attention soft-capping",
            ours.attention_softcap(),
            theirs.attention_softcap(),
        ),
        (
            "final logit soft-capping",
            ours.final_logit_softcap(),
            theirs.final_logit_softcap(),
        ),
    ];
    for (what, a, b) in caps {
        if !close_opt(a, b) {
            return Err(differs(what, format!("{a:?}"), format!("{b:?}")));
        }
    }
    if ours.activation() != theirs.activation() {
        let (a, b) = (ours.activation(), theirs.activation());
        return Err(differs(
            "the activation",
            format!("{a:?}"),
            format!("{b:?}"),
        ));
    }
    let kinds: &[bool] = if any_sliding {
        &[false, true]
    } else {
        &[false]
    };
    for &sliding in kinds {
        let (a, b) = (ours.rope(sliding)?, theirs.rope(sliding)?);
        let what = if sliding {
            "the sliding layers' RoPE"
        } else {
            "the RoPE"
        };
        let n = ours.max_position_embeddings;
        let same = close(a.attention_scaling(), b.attention_scaling())
            && a.inv_freq_for(n)
                .iter()
                .zip(b.inv_freq_for(n).iter())
                .all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs().max(y.abs()));
        if !same {
            let f =
                |r: &crate::model::rope::Rope| format!("{} with base {}", r.rope_type(), r.theta());
            return Err(differs(what, f(&a), f(&b)));
        }
    }
    Ok(())
}

fn add_tensors(
    w: &mut GgufWriter,
    lm: &CausalLm,
    arch: GgufArch,
    encoding: GgufEncoding,
    rope_freqs: Option<Vec<f32>>,
) -> Result<()> {
    let cfg = &lm.config;
    let mut named: Vec<(String, &String)> = Vec::new();
    for hf in lm.tensors.keys() {
        if hf == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        let g = gguf_tensor_name_for(arch, hf).with_context(|| {
            format!(
                "tensor {hf} has no llama.cpp equivalent\nhint: only a plain causal LM (no value or reward heads) exports to GGUF"
            )
        })?;
        named.push((g, hf));
    }
    // llama.cpp's order: embeddings, blocks in layer order, final norm, output head.
    let rank = |g: &str| -> (usize, usize, String) {
        match g.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, rest)) => (1, l.parse().unwrap_or(0), rest.to_owned()),
            None if g.starts_with("token_embd") => (0, 0, g.to_owned()),
            None => (2, 0, g.to_owned()),
        }
    };
    named.sort_by_key(|(g, _)| rank(g));
    if let Some(divisors) = rope_freqs {
        let t = candle_core::Tensor::new(divisors, &candle_core::Device::Cpu)?;
        w.add_tensor(GgufTensor::encode(ROPE_FREQS_TENSOR, &t, GgmlType::F32)?);
    }
    for (g, hf) in named {
        let mut t = lm.tensors[hf].clone();
        if arch.permutes_qk() && g.contains(".attn_q.") {
            t = permute_qk(&t, cfg.num_attention_heads)
                .with_context(|| format!("permuting {hf}"))?;
        } else if arch.permutes_qk() && g.contains(".attn_k.") {
            t = permute_qk(&t, cfg.num_kv_heads()).with_context(|| format!("permuting {hf}"))?;
        }
        if hf.ends_with("norm.weight") && arch.norm_weight_shift() != 0.0 {
            t = (t + arch.norm_weight_shift())?;
        }
        let tensor = if t.rank() <= 1 {
            GgufTensor::encode(g, &t, GgmlType::F32)?
        } else {
            match encoding {
                GgufEncoding::F32 => GgufTensor::encode(g, &t, GgmlType::F32)?,
                GgufEncoding::F16 => GgufTensor::encode(g, &t, GgmlType::F16)?,
                GgufEncoding::Q8_0 => GgufTensor::q8_0_or_f16(g, &t)?,
            }
        };
        w.add_tensor(tensor);
    }
    Ok(())
}

/// `tokenizer.ggml.*` from `tokenizer.json` and the chat template: byte-level BPE as `gpt2`
/// (tokens, types, merges, the pre-tokenizer's name), SentencePiece-style BPE as `llama`
/// (tokens, scores, types, whether to prefix a space; `model::gguf_vocab`).
fn add_tokenizer(w: &mut GgufWriter, lm: &CausalLm) -> Result<()> {
    let tok = &lm.tokenizer_json;
    let model = &tok["model"];
    gguf_vocab::refuse_unigram(tok)?;
    let spm = gguf_vocab::is_spm_style(tok);
    if model["type"] != "BPE" {
        bail!(
            "the tokenizer is {}, not BPE\nhint: byte-level BPE (SmolLM2, Llama 3, Qwen) and SentencePiece-style BPE (Llama 2, Mistral, Gemma) tokenizers export to GGUF",
            model["type"]
        );
    }
    let unk = model["unk_token"]
        .as_str()
        .or(lm.special_tokens.unk_token.as_deref());
    let n = lm.config.vocab_size;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("token {text:?} has id {id}, beyond the model's vocab_size {n}")
        })?;
        *slot = Some((text.to_owned(), ty));
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .context("tokenizer.json has no model.vocab")?;
    for (text, id) in vocab {
        let id = id.as_u64().context("a vocabulary id is not a number")?;
        let ty = if spm {
            gguf_vocab::vocab_token_type(text, unk)
        } else {
            token_type::NORMAL
        };
        place(id, text, ty)?;
    }
    for t in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (t["id"].as_u64(), t["content"].as_str()) else {
            continue;
        };
        let ty = if spm && unk == Some(text) {
            token_type::UNKNOWN
        } else if t["special"] == true {
            token_type::CONTROL
        } else {
            token_type::USER_DEFINED
        };
        place(id, text, ty)?;
    }
    // Embedding rows with no token (a vocab padded for speed) get placeholders, as the converter
    // writes them.
    let (texts, types): (Vec<String>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (text, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED));
            (text, Value::I32(ty))
        })
        .unzip();
    if spm {
        let out = gguf_vocab::export_scores(tok, &texts)?;
        w.set("tokenizer.ggml.model", Value::String("llama".into()));
        w.set("tokenizer.ggml.pre", Value::String("default".into()));
        w.set(
            "tokenizer.ggml.scores",
            Value::Array(out.scores.into_iter().map(Value::F32).collect()),
        );
        w.set(
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(out.add_space_prefix),
        );
    } else {
        let pre = pre_tokenizer_name(&tok["pre_tokenizer"])?;
        let merges: Vec<Value> = merge_pairs(model)?
            .into_iter()
            .map(|(a, b)| Value::String(format!("{a} {b}")))
            .collect();
        w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
        w.set("tokenizer.ggml.pre", Value::String(pre.into()));
        w.set("tokenizer.ggml.merges", Value::Array(merges));
    }
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(texts.into_iter().map(Value::String).collect()),
    );
    w.set("tokenizer.ggml.token_type", Value::Array(types));
    let cfg = &lm.config;
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| id_in(tok, t));
    let sp = &lm.special_tokens;
    let ids = [
        (
            "bos",
            cfg.bos_token_id
                .as_ref()
                .and_then(|t| t.to_vec().first().copied())
                .or_else(|| id_of(&sp.bos_token)),
        ),
        (
            "eos",
            cfg.eos_token_ids()
                .first()
                .copied()
                .or_else(|| id_of(&sp.eos_token)),
        ),
        ("unknown", id_of(&sp.unk_token)),
        ("padding", cfg.pad_token_id.or_else(|| id_of(&sp.pad_token))),
    ];
    for (what, id) in ids {
        if let Some(id) = id {
            w.set(&format!("tokenizer.ggml.{what}_token_id"), Value::U32(id));
        }
    }
    // llama.cpp's default for BPE vocabularies is to add BOS; say what the tokenizer does.
    let flag = |key: &str| {
        lm.tokenizer_config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(|v| v.as_bool())
    };
    let add_bos = flag("add_bos_token").unwrap_or_else(|| post_processor_adds_bos(tok));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(add_bos));
    w.set(
        "tokenizer.ggml.add_eos_token",
        Value::Bool(flag("add_eos_token").unwrap_or(false)),
    );
    if let Some(t) = &lm.chat_template {
        w.set("tokenizer.chat_template", Value::String(t.clone()));
    }
    Ok(())
}

/// The id of token `text` in a parsed `tokenizer.json`.
fn id_in(tok: &serde_json::Value, text: &str) -> Option<u32> {
    let added = tok["added_tokens"].as_array().and_then(|a| {
        a.iter()
            .find(|t| t["content"] == text)
            .and_then(|t| t["id"].as_u64())
    });
    added
        .or_else(|| tok["model"]["vocab"][text].as_u64())
        .and_then(|i| u32::try_from(i).ok())
}

/// Whether the post-processor puts a special token before the text (BOS).
fn post_processor_adds_bos(tok: &serde_json::Value) -> bool {
    let pp = &tok["post_processor"];
    let single = match pp["type"].as_str() {
        Some("TemplateProcessing") => &pp["single"],
        Some("Sequence") => {
            return pp["processors"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["type"] == "TemplateProcessing" && first_is_special(&p["single"]));
        }
        _ => return false,
    };
    first_is_special(single)
}

fn first_is_special(single: &serde_json::Value) -> bool {
    single
        .as_array()
        .and_then(|s| s.first())
        .is_some_and(|f| f.get("SpecialToken").is_some())
}

/// llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`), recognised from its HF form;
/// the converter identifies it by hashing a tokenisation, which needs Python, so the known
/// shapes are matched here instead and anything else is refused rather than guessed.
fn pre_tokenizer_name(pre: &serde_json::Value) -> Result<&'static str> {
    let byte_level = |p: &serde_json::Value, regex: bool| {
        p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        // llama.cpp's name is `gpt-2`; it refuses `gpt2` ("unknown pre-tokenizer type").
        return Ok("gpt-2");
    }
    if pre["type"] == "Sequence" {
        let parts: Vec<&serde_json::Value> = pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        if let [digits, bl] = parts.as_slice()
            && digits["type"] == "Digits"
            && digits["individual_digits"] == true
            && byte_level(bl, true)
        {
            return Ok("smollm");
        }
        if let [split, bl] = parts.as_slice()
            && split["type"] == "Split"
            && split["pattern"]["Regex"] == LLAMA3_SPLIT
            && byte_level(bl, false)
        {
            return Ok("llama-bpe");
        }
    }
    bail!(
        "the tokenizer's pre-tokenizer {pre} has no llama.cpp name known here\nhint: supported: GPT-2 byte-level (gpt-2), SmolLM (digits + byte-level), Llama 3 (llama-bpe)"
    )
}

/// The Ollama `Modelfile` for `gguf_file_name` (in the same directory): `FROM`, the prompt
/// template translated for ChatML models (Ollama's Go templates cannot run Jinja), the default
/// system message the Jinja template adds, and stop tokens.
pub fn modelfile(lm: &CausalLm, gguf_file_name: &str) -> Result<String> {
    let mut out = format!(
        "# Ollama: ollama create NAME -f Modelfile (written by rlhf-bot export-model)\nFROM ./{gguf_file_name}\n"
    );
    let mut stops = lm.eos_tokens();
    let chatml = lm
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>"));
    if chatml {
        let tpl = crate::model::chat_template::ChatTemplate::new(
            lm.chat_template.clone().unwrap_or_default(),
            lm.special_tokens.clone(),
        )?;
        let probe = tpl.render(
            &[crate::model::chat_template::ChatMessage::user("\u{1}")],
            false,
        )?;
        let system = probe
            .strip_prefix("<|im_start|>system\n")
            .and_then(|r| r.split_once("<|im_end|>"))
            .map(|(s, _)| s.to_owned());
        out.push_str(CHATML_TEMPLATE);
        if let Some(s) = system {
            out.push_str(&format!("SYSTEM \"\"\"{s}\"\"\"\n"));
        }
        for t in ["<|im_start|>", "<|im_end|>"] {
            if !stops.iter().any(|s| s == t) {
                stops.push(t.to_owned());
            }
        }
    } else {
        out.push_str(
            "# No TEMPLATE: the chat template is not ChatML, and Ollama's Go templates cannot run\n# Jinja. Ollama picks a template from the GGUF's tokenizer.chat_template when it recognises\n# it; otherwise add a TEMPLATE block here.\n",
        );
    }
    for s in stops {
        out.push_str(&format!("PARAMETER stop {}\n", serde_json::to_string(&s)?));
    }
    Ok(out)
}

/// ChatML as an Ollama (Go) template: the system turn, every message, then the assistant's
/// turn opened.
const CHATML_TEMPLATE: &str = r#"TEMPLATE """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{- end }}<|im_start|>assistant
"""
"#;

/// Writes the GGUF at `path` and the `Modelfile` beside it; returns both paths.
pub fn write(
    lm: &CausalLm,
    encoding: GgufEncoding,
    name: &str,
    path: &Path,
) -> Result<Vec<std::path::PathBuf>> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    build(lm, encoding, name)?.write_file(path)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the GGUF path has no file name")?;
    let mf = path.with_file_name("Modelfile");
    std::fs::write(&mf, modelfile(lm, &file_name)?)
        .with_context(|| format!("writing {}", mf.display()))?;
    Ok(vec![path.to_path_buf(), mf])
}
