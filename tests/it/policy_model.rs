//! Policy-model pieces: GGUF import, chat templates, sampling, generation, LoRA.
//!
//! Tests that need the real SmolLM2-135M-Instruct GGUF look for it under `$RLHF_MODELS_DIR`
//! (default `~/.cache/rlhf-bot/models/SmolLM2-135M-Instruct/*.gguf`, filled by
//! `fetch-models.sh ~/.cache/rlhf-bot/models`) and print "skipped: …" when it is absent.
//! Expected values for SmolLM2 come from `tests/fixtures/vectors/smollm2_reference.json`,
//! computed by transformers in f32 from the same GGUF (shared/reference/check_e2e.py family).

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rlhf_bot::model::chat_template::{ChatMessage, ChatTemplate, SpecialTokens};
use rlhf_bot::model::gguf::{self, GgufLlama};
use rlhf_bot::model::sampling::{Sampler, SamplingParams};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_policy_dir() -> PathBuf {
    fixtures().join("tiny-llama-policy")
}

fn smollm2_reference() -> serde_json::Value {
    let p = fixtures().join("vectors/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn smollm2_gguf() -> Option<PathBuf> {
    let found = gguf::find_gguf("SmolLM2-135M-Instruct");
    if found.is_none() {
        eprintln!(
            "skipped: SmolLM2-135M-Instruct GGUF not found under {:?} (run fetch-models.sh ~/.cache/rlhf-bot/models or set RLHF_MODELS_DIR)",
            gguf::models_dir()
        );
    }
    found
}

pub(crate) fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

// ---------------------------------------------------------------- GGUF

/// Writes the tiny HF policy as a llama.cpp-style GGUF (llama.cpp names, Q/K rows permuted as
/// convert_hf_to_gguf.py does, tokenizer as tokenizer.ggml.*), so the importer can be tested
/// without the 100 MB real model.
pub(crate) fn write_tiny_gguf(path: &Path) {
    write_hf_as_gguf(&tiny_policy_dir(), "llama", "smollm", path);
}

/// Writes the HF directory `dir` as llama.cpp's converter would for `arch` (llama, qwen2,
/// qwen3): its names, Q/K rows permuted for `llama` only, hyper-parameters under `arch.`, the
/// tokenizer as `tokenizer.ggml.*` with pre-tokenizer `pre`.
pub(crate) fn write_hf_as_gguf(dir: &Path, arch: &str, pre: &str, path: &Path) {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let n_head = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let n_kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;

    let mut q: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &tensors {
        let gname = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("self_attn.q_norm", "attn_q_norm")
            .replace("self_attn.k_norm", "attn_k_norm")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        let t = if arch == "llama" && name.contains("q_proj") {
            gguf::permute_qk(t, n_head).unwrap()
        } else if arch == "llama" && name.contains("k_proj") {
            gguf::permute_qk(t, n_kv).unwrap()
        } else {
            t.clone()
        };
        q.push((gname, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }

    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let special: std::collections::HashSet<u64> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let types: Vec<GValue> = (0..tokens.len() as u64)
        .map(|i| GValue::I32(if special.contains(&i) { 3 } else { 1 }))
        .collect();
    let merges: Vec<GValue> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            GValue::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    let u32v = |k: &str| GValue::U32(cfg[k].as_u64().unwrap() as u32);
    let theta = cfg["rope_parameters"]["rope_theta"]
        .as_f64()
        .unwrap_or(10000.0);
    let key = |k: &str| format!("{arch}.{k}");
    let mut md: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.into())),
        (key("block_count"), u32v("num_hidden_layers")),
        (key("context_length"), u32v("max_position_embeddings")),
        (key("embedding_length"), u32v("hidden_size")),
        (key("feed_forward_length"), u32v("intermediate_size")),
        (key("attention.head_count"), u32v("num_attention_heads")),
        (key("attention.head_count_kv"), u32v("num_key_value_heads")),
        (key("attention.key_length"), u32v("head_dim")),
        (key("rope.freq_base"), GValue::F32(theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GValue::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (key("vocab_size"), u32v("vocab_size")),
        (key("rope.dimension_count"), u32v("head_dim")),
        ("tokenizer.ggml.model".into(), GValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GValue::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            GValue::Array(tokens.into_iter().map(GValue::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), GValue::Array(types)),
        ("tokenizer.ggml.merges".into(), GValue::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), u32v("bos_token_id")),
        ("tokenizer.ggml.eos_token_id".into(), u32v("eos_token_id")),
        ("tokenizer.ggml.unknown_token_id".into(), GValue::U32(0)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            u32v("pad_token_id"),
        ),
        ("tokenizer.ggml.add_bos_token".into(), GValue::Bool(false)),
    ];
    if let Ok(template) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        md.push(("tokenizer.chat_template".into(), GValue::String(template)));
    }
    let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn gguf_import_restores_hf_names_qk_order_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&path);
    let m = GgufLlama::read(&path).unwrap();

    let orig =
        candle_core::safetensors::load(tiny_policy_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut got: Vec<&String> = m.tensors.keys().collect();
    got.sort();
    let mut want: Vec<&String> = orig.keys().collect();
    want.sort();
    assert_eq!(got, want, "tensor names after import");
    for (name, t) in &orig {
        let d = max_abs_diff(t, &m.tensors[name]);
        assert_eq!(d, 0.0, "{name} differs by {d} after import");
    }
    let c = &m.config;
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
        (16, 2, 1, 8)
    );
    assert_eq!(
        (c.num_hidden_layers, c.intermediate_size, c.vocab_size),
        (2, 32, 49152)
    );
    assert!(
        c.tie_word_embeddings,
        "no output.weight means tied embeddings"
    );
    assert_eq!(
        (c.bos_token_id, c.eos_token_id, c.pad_token_id),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(m.special_tokens.eos_token.as_deref(), Some("<|im_end|>"));
}

#[test]
fn qk_permutation_inverts() {
    let w = Tensor::arange(0f32, 48.0, &Device::Cpu)
        .unwrap()
        .reshape((12, 4))
        .unwrap();
    let p = gguf::permute_qk(&w, 3).unwrap();
    // Head 0 rows in HF order are [0 1 | 2 3] (halves); llama.cpp interleaves them: 0 2 1 3.
    let rows: Vec<f32> = p.get_on_dim(1, 0).unwrap().to_vec1().unwrap();
    assert_eq!(&rows[..4], &[0.0, 8.0, 4.0, 12.0]);
    let back = gguf::unpermute_qk(&p, 3).unwrap();
    assert_eq!(max_abs_diff(&w, &back), 0.0);
    assert!(
        gguf::unpermute_qk(&w, 5).is_err(),
        "12 rows do not split into 5 heads"
    );
}

#[test]
fn gguf_tensor_names_map_to_hf() {
    for (g, h) in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.12.attn_q.weight",
            "model.layers.12.self_attn.q_proj.weight",
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
        ),
        (
            "blk.3.ffn_down.weight",
            "model.layers.3.mlp.down_proj.weight",
        ),
        (
            "blk.3.ffn_norm.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ),
    ] {
        assert_eq!(gguf::hf_tensor_name(g).unwrap(), h);
    }
    assert!(gguf::hf_tensor_name("rope_freqs.weight").is_err());
    assert!(gguf::hf_tensor_name("blk.x.attn_q.weight").is_err());
}

#[test]
fn gguf_rebuilt_tokenizer_matches_hf_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&path);
    let m = GgufLlama::read(&path).unwrap();
    let ours = m.tokenizer().unwrap();
    let hf = tokenizers::Tokenizer::from_file(tiny_policy_dir().join("tokenizer.json")).unwrap();
    let texts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
        "Prices rose 12.5% in 2024 — naïve café, emoji 🤖, tabs\tand  double  spaces.\n\n",
        "fn main() { println!(\"{}\", x[3]); } // code's fine, isn't it?",
    ];
    for t in texts {
        let a = ours.encode(t, true).unwrap();
        let b = hf.encode(t, true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "encoding {t:?}");
        assert_eq!(
            ours.decode(a.get_ids(), false).unwrap(),
            t,
            "round trip {t:?}"
        );
    }
}

#[test]
fn gguf_converts_to_a_loadable_hf_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&path);
    let out = tmp.path().join("hf");
    let cfg = gguf::convert_gguf_to_hf_dir(&path, &out).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["num_key_value_heads"], 1);
    assert_eq!(written["tie_word_embeddings"], true);
    assert_eq!(cfg.rope_theta, 10000.0);
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!tensors.contains_key("lm_head.weight"));
    assert!(tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).is_ok());
    let tmpl = ChatTemplate::from_hf_dir(&out).unwrap();
    assert_eq!(
        tmpl.special_tokens().eos_token.as_deref(),
        Some("<|im_end|>")
    );
}

#[test]
fn gguf_import_keeps_the_files_bos_and_eos_flags_in_tokenizer_config() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&plain);
    let cfg = GgufLlama::read(&plain).unwrap().tokenizer_config_json();
    assert_eq!(
        (&cfg["add_bos_token"], &cfg["add_eos_token"]),
        (&false.into(), &false.into())
    );

    // The same file with `tokenizer.ggml.add_eos_token = true`, as some conversions carry.
    let mut reader = std::fs::File::open(&plain).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut md: Vec<(String, GValue)> = content.metadata.clone().into_iter().collect();
    md.push(("tokenizer.ggml.add_eos_token".into(), GValue::Bool(true)));
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
            (name.clone(), t)
        })
        .collect();
    let with_eos = tmp.path().join("eos.gguf");
    let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&with_eos).unwrap(),
        &md_refs,
        &t_refs,
    )
    .unwrap();
    let cfg = GgufLlama::read(&with_eos).unwrap().tokenizer_config_json();
    assert_eq!(
        (&cfg["add_bos_token"], &cfg["add_eos_token"]),
        (&false.into(), &true.into())
    );
}

#[test]
fn gguf_refuses_other_architectures() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bert.gguf");
    let md = [("general.architecture", GValue::String("bert".into()))];
    let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &md_refs, &[]).unwrap();
    let err = GgufLlama::read(&path).unwrap_err();
    let e = err.downcast_ref::<gguf::GgufError>().expect("a GgufError");
    assert!(matches!(e, gguf::GgufError::UnsupportedArchitecture(a) if a == "bert"));
    assert!(format!("{err:#}").contains("hint:"));
}

#[test]
fn smollm2_gguf_tokenizer_and_config() {
    let Some(path) = smollm2_gguf() else { return };
    let m = GgufLlama::read(&path).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
    let reference = smollm2_reference();
    let enc = m
        .tokenizer()
        .unwrap()
        .encode(reference["text"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(enc.get_ids(), ids_of(&reference["input_ids"]).as_slice());
    let tmpl =
        ChatTemplate::new(m.chat_template.clone().unwrap(), m.special_tokens.clone()).unwrap();
    let text = tmpl
        .render(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(text.ends_with(reference["text"].as_str().unwrap()));
}

// ---------------------------------------------------------------- chat templates

fn tiny_template() -> ChatTemplate {
    ChatTemplate::new(
        std::fs::read_to_string(tiny_policy_dir().join("chat_template.jinja")).unwrap(),
        SpecialTokens {
            eos_token: Some("<|im_end|>".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn chat_template_adds_default_system_message() {
    let t = tiny_template();
    let out = t
        .render(
            &[ChatMessage::user("Hi"), ChatMessage::assistant("Hello!")],
            false,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
    let out = t
        .render(
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chat_template_from_hf_dir_reads_jinja_file_and_config() {
    let t = ChatTemplate::from_hf_dir(&tiny_policy_dir()).unwrap();
    assert_eq!(
        t.special_tokens().bos_token.as_deref(),
        Some("<|im_start|>")
    );
    assert_eq!(
        t.special_tokens().unk_token.as_deref(),
        Some("<|endoftext|>")
    );
    assert_eq!(
        t.render(&[ChatMessage::user("x")], true).unwrap(),
        tiny_template()
            .render(&[ChatMessage::user("x")], true)
            .unwrap()
    );
    // Template only inside tokenizer_config.json, special tokens as AddedToken objects.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_hf_dir(tmp.path()).unwrap();
    assert_eq!(
        t.render(
            &[ChatMessage::user("a"), ChatMessage::assistant("b")],
            false
        )
        .unwrap(),
        "<s>[user] a</s>[assistant] b</s>"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = ChatTemplate::from_hf_dir(empty.path()).unwrap_err();
    assert!(err.to_string().contains("hint:"), "{err}");
}

#[test]
fn chat_template_supports_hf_extensions() {
    // Llama-2-style template: raise_exception, python string methods, trim_blocks/lstrip_blocks.
    let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system here') }}{% endif %}\n\
               {% for m in messages %}\n    {% if m.content.startswith(' ') %}!{% endif %}{{ m['content'].strip().upper() }}|\n{% endfor %}";
    let t = ChatTemplate::new(src, SpecialTokens::default()).unwrap();
    assert_eq!(
        t.render(
            &[ChatMessage::user(" hi "), ChatMessage::assistant("yo")],
            false
        )
        .unwrap(),
        "!HI|\nYO|\n"
    );
    let err = t
        .render(&[ChatMessage::system("s"), ChatMessage::user("u")], false)
        .unwrap_err();
    assert!(err.to_string().contains("no system here"), "{err}");
    assert!(ChatTemplate::new("{% for %}", SpecialTokens::default()).is_err());
}

// ---------------------------------------------------------------- sampling

#[test]
fn sampler_is_seeded_and_respects_top_k() {
    let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(5),
        top_p: Some(0.9),
    };
    let run = |seed| {
        let mut s = Sampler::new(params, seed).unwrap();
        (0..200)
            .map(|_| s.sample(&logits).unwrap())
            .collect::<Vec<_>>()
    };
    let a = run(42);
    assert_eq!(a, run(42));
    let mut top5: Vec<u32> = (0..100).collect();
    top5.sort_by(|x, y| logits[*y as usize].total_cmp(&logits[*x as usize]));
    top5.truncate(5);
    assert!(
        a.iter().all(|t| top5.contains(t)),
        "only top-5 tokens drawn"
    );
    let mut g = Sampler::new(SamplingParams::greedy(), 0).unwrap();
    assert_eq!(g.sample(&logits).unwrap(), top5[0]);
}

// ---------------------------------------------------------------- generation

use rlhf_bot::model::generate::{self, CausalLm, GenerationConfig, KvCache};
use rlhf_bot::model::llama::LlamaForCausalLM;
use rlhf_bot::model::lora::{self, LoraConfig, LoraInit};

use crate::common::max_abs_diff;

fn tiny_policy() -> LlamaForCausalLM {
    rlhf_bot::model::llama::load_frozen_causal_lm(&tiny_policy_dir(), &Device::Cpu).unwrap()
}

/// Prompts of different lengths so the batch is left-padded.
fn tiny_prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 4093, 198, 1780, 314, 260, 3575],
        vec![1, 520, 9531],
        vec![1, 4093, 198, 2, 198],
    ]
}

#[test]
fn kv_cache_generation_equals_full_recomputation() {
    let model = tiny_policy();
    let mut cfg = GenerationConfig::greedy(10, vec![], 2);
    let cached = generate::generate(&model, &tiny_prompts(), &cfg).unwrap();
    cfg.use_cache = false;
    let full = generate::generate(&model, &tiny_prompts(), &cfg).unwrap();
    assert_eq!(cached.tokens, full.tokens);
    assert!(cached.tokens.iter().all(|t| t.len() == 10));
    for (a, b) in cached
        .logprobs
        .iter()
        .flatten()
        .zip(full.logprobs.iter().flatten())
    {
        assert!((a - b).abs() < 1e-4, "logprob {a} vs {b}");
    }
    // The cached step logits themselves, not only their argmax.
    let prompts = tiny_prompts();
    let mut mask: Vec<Vec<u32>> = Vec::new();
    let mut ids: Vec<Vec<u32>> = Vec::new();
    let width = prompts.iter().map(Vec::len).max().unwrap();
    for (p, g) in prompts.iter().zip(&cached.tokens) {
        let pad = width - p.len();
        ids.push([vec![2; pad], p.clone(), g[..3].to_vec()].concat());
        mask.push([vec![0; pad], vec![1; p.len() + 3]].concat());
    }
    let tensor = |rows: &[Vec<u32>]| Tensor::new(rows.to_vec(), &Device::Cpu).unwrap();
    let mut cache = KvCache::new(model.num_layers());
    let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..width + 2].to_vec()).collect();
    let head_mask: Vec<Vec<u32>> = mask.iter().map(|r| r[..width + 2].to_vec()).collect();
    model
        .last_logits_cached(&tensor(&head), &head_mask, &mut cache)
        .unwrap();
    assert_eq!(cache.seq_len(), width + 2);
    let last: Vec<Vec<u32>> = ids.iter().map(|r| r[width + 2..].to_vec()).collect();
    let step = model
        .last_logits_cached(&tensor(&last), &mask, &mut cache)
        .unwrap();
    let full = model.last_logits_full(&tensor(&ids), &mask).unwrap();
    assert!(max_abs_diff(&step, &full) < 1e-4);
}

#[test]
fn batched_left_padded_generation_equals_one_by_one() {
    let model = tiny_policy();
    let cfg = GenerationConfig::greedy(6, vec![], 2);
    let batch = generate::generate(&model, &tiny_prompts(), &cfg).unwrap();
    for (i, p) in tiny_prompts().into_iter().enumerate() {
        let one = generate::generate(&model, &[p], &cfg).unwrap();
        assert_eq!(one.tokens[0], batch.tokens[i], "row {i}");
        for (a, b) in one.logprobs[0].iter().zip(&batch.logprobs[i]) {
            assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
        }
    }
}

#[test]
fn sampled_generation_is_seeded() {
    let model = tiny_policy();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        sampling: SamplingParams::default(),
        seed: 7,
        stop_token_ids: vec![],
        pad_token_id: 2,
        use_cache: true,
    };
    let a = generate::generate(&model, &tiny_prompts(), &cfg).unwrap();
    let b = generate::generate(&model, &tiny_prompts(), &cfg).unwrap();
    assert_eq!(a, b);
    let c = generate::generate(
        &model,
        &tiny_prompts(),
        &GenerationConfig { seed: 8, ..cfg },
    )
    .unwrap();
    assert_ne!(a.tokens, c.tokens);
    // A random tiny model is near-uniform over 49k tokens: log-probs near -ln(49152).
    for lp in a.logprobs.iter().flatten() {
        assert!(*lp < 0.0 && *lp > -20.0, "{lp}");
    }
}

#[test]
fn generation_stops_at_stop_tokens() {
    let model = tiny_policy();
    let free = generate::generate(
        &model,
        &tiny_prompts(),
        &GenerationConfig::greedy(8, vec![], 2),
    )
    .unwrap();
    // Make row 0's third token a stop token: row 0 must end there, others go on unless they
    // produce it too.
    let stop = free.tokens[0][2];
    let cfg = GenerationConfig::greedy(8, vec![stop], 2);
    let out = generate::generate(&model, &tiny_prompts(), &cfg).unwrap();
    let first = free.tokens[0].iter().position(|t| *t == stop).unwrap();
    assert_eq!(out.tokens[0], free.tokens[0][..=first].to_vec());
    assert!(out.finished[0]);
    for (i, row) in free.tokens.iter().enumerate().skip(1) {
        match row.iter().position(|t| *t == stop) {
            Some(p) => assert_eq!(out.tokens[i], row[..=p].to_vec()),
            None => {
                assert_eq!(&out.tokens[i], row);
                assert!(!out.finished[i]);
            }
        }
    }
    assert!(generate::generate(&model, &[vec![]], &cfg).is_err());
}

#[test]
fn smollm2_matches_transformers_reference() {
    let Some(path) = smollm2_gguf() else { return };
    let m = GgufLlama::read(&path).unwrap();
    let model = m.causal_lm(&Device::Cpu).unwrap();
    let reference = smollm2_reference();
    let ids = ids_of(&reference["input_ids"]);
    let input = Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap();
    let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
    let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let want5 = reference["logits_first5_at_each_pos"].as_array().unwrap();
    let argmax = ids_of(&reference["argmax_at_each_pos"]);
    let mut worst = 0f32;
    for (pos, row) in logits.iter().enumerate() {
        for (j, w) in want5[pos].as_array().unwrap().iter().enumerate() {
            worst = worst.max((row[j] - w.as_f64().unwrap() as f32).abs());
        }
        let am = rlhf_bot::model::sampling::argmax(row).unwrap();
        assert_eq!(am, argmax[pos], "argmax at position {pos}");
    }
    assert!(worst < 2e-3, "largest logit difference {worst}");
    let lps = reference["logprob_of_next_token"].as_array().unwrap();
    for (pos, want) in lps.iter().enumerate() {
        let got = rlhf_bot::model::sampling::token_logprob(&logits[pos], ids[pos + 1]).unwrap();
        assert!(
            (got - want.as_f64().unwrap()).abs() < 2e-3,
            "logprob at {pos}: {got} vs {want}"
        );
    }

    let eos = m.config.eos_token_id.unwrap();
    let cfg = GenerationConfig::greedy(12, vec![eos], eos);
    let tok = m.tokenizer().unwrap();
    let prompt = reference["text"].as_str().unwrap().to_owned();
    let text_out = generate::generate_from_texts(&model, &tok, &[prompt], &cfg).unwrap();
    assert_eq!(
        text_out.texts,
        vec!["The capital of France is Paris.".to_owned()]
    );
    let out = text_out.generation;
    assert_eq!(out.prompt_lens, vec![ids.len()]);
    assert_eq!(out.tokens[0], ids_of(&reference["greedy_12_ids"]));
    assert!(out.finished[0]);
    assert_eq!(
        out.texts(&tok, false).unwrap()[0],
        reference["greedy_12_text"].as_str().unwrap()
    );
}

// ---------------------------------------------------------------- LoRA

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        base_model: Some("tiny-llama-policy".into()),
    }
}

fn lm_loss(model: &LlamaForCausalLM) -> Tensor {
    let ids = Tensor::new(vec![vec![1u32, 4093, 198, 1780, 314, 260]], &Device::Cpu).unwrap();
    let target = Tensor::new(vec![vec![0u32, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    model
        .sequence_logprobs(&ids, None, &target)
        .unwrap()
        .neg()
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn lora_starts_at_the_base_and_trains_only_adapters() {
    let base = tiny_policy();
    let mut model = base.clone();
    let varmap = candle_nn::VarMap::new();
    let adapters = lora::attach_lora(
        &mut model,
        &lora_cfg(),
        &varmap,
        LoraInit::Fresh { seed: 1 },
    )
    .unwrap();
    assert_eq!(adapters.modules.len(), 2 * 3);
    assert_eq!(
        varmap.all_vars().len(),
        2 * 3 * 2,
        "only A and B are variables"
    );
    // B = 0: the adapted model computes exactly the base function.
    let ids = Tensor::new(vec![vec![1u32, 4093, 198]], &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(
            &base.forward(&ids, None).unwrap(),
            &model.forward(&ids, None).unwrap()
        ),
        0.0
    );
    let loss = lm_loss(&model);
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with("lora_B.weight") {
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }
    // The base is frozen: none of its weights is a variable an optimiser could update, and
    // no gradient is accumulated for the (detached) adapted projections.
    let mut m2 = model.clone();
    for (path, lin) in lora::HasAdaptableLinears::linears_mut(&mut m2) {
        assert!(
            !lin.weight().is_variable(),
            "{path} base weight is a variable"
        );
        assert!(
            grads.get(lin.weight()).is_none(),
            "gradient reached base weight {path}"
        );
    }
    assert!(!model.lm_head_weight().is_variable());
    let bad = LoraConfig {
        target_modules: vec!["qq_proj".into()],
        ..lora_cfg()
    };
    let err = lora::attach_lora(
        &mut base.clone(),
        &bad,
        &candle_nn::VarMap::new(),
        LoraInit::Fresh { seed: 1 },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("qq_proj"));
}

#[test]
fn lora_saves_as_peft_loads_back_and_merges() {
    let mut model = tiny_policy();
    let varmap = candle_nn::VarMap::new();
    let adapters = lora::attach_lora(
        &mut model,
        &lora_cfg(),
        &varmap,
        LoraInit::Fresh { seed: 3 },
    )
    .unwrap();
    // Train one SGD step so B is non-zero and the adapter changes the function.
    let mut sgd = <candle_nn::SGD as candle_nn::Optimizer>::new(varmap.all_vars(), 0.5).unwrap();
    candle_nn::Optimizer::backward_step(&mut sgd, &lm_loss(&model)).unwrap();
    let ids = Tensor::new(vec![vec![1u32, 4093, 198, 1780]], &Device::Cpu).unwrap();
    let trained = model.forward(&ids, None).unwrap();
    let base_out = tiny_policy().forward(&ids, None).unwrap();
    assert!(
        max_abs_diff(&trained, &base_out) > 1e-6,
        "the step changed the model"
    );

    let tmp = tempfile::tempdir().unwrap();
    adapters.save_peft(tmp.path(), &varmap).unwrap();
    let names: Vec<(String, Vec<usize>)> =
        rlhf_bot::model::checkpoint_io::tensor_names(&tmp.path().join(lora::ADAPTER_WEIGHTS))
            .unwrap();
    assert!(names.iter().any(|(n, s)| n
        == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        && s == &vec![4, 16]));
    assert!(names.iter().any(|(n, s)| n
        == "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
        && s == &vec![16, 4]));
    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join(lora::ADAPTER_CONFIG)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["lora_alpha"], 8.0);

    let (cfg2, weights) = lora::load_peft(tmp.path()).unwrap();
    assert_eq!(cfg2, lora_cfg());
    let mut reloaded = tiny_policy();
    lora::attach_lora(
        &mut reloaded,
        &cfg2,
        &candle_nn::VarMap::new(),
        LoraInit::Weights(weights.clone()),
    )
    .unwrap();
    assert!(max_abs_diff(&reloaded.forward(&ids, None).unwrap(), &trained) < 1e-6);

    // Merging in the model and merging the state dict give the same function.
    let n = lora::merge_all(&mut reloaded).unwrap();
    assert_eq!(n, 6);
    assert!(max_abs_diff(&reloaded.forward(&ids, None).unwrap(), &trained) < 1e-5);
    let mut sd =
        candle_core::safetensors::load(tiny_policy_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let merged = lora::merge_into_state_dict(&mut sd, &cfg2, &weights).unwrap();
    assert_eq!(merged.len(), 6);
    let cfg_l = rlhf_bot::model::llama::LlamaConfig::from_dir(&tiny_policy_dir()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(sd, candle_core::DType::F32, &Device::Cpu);
    let merged_model = LlamaForCausalLM::new(&cfg_l, vb).unwrap();
    assert!(max_abs_diff(&merged_model.forward(&ids, None).unwrap(), &trained) < 1e-5);
}
