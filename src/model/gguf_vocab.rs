//! The tokenizer vocabulary in GGUF (`tokenizer.ggml.*`): llama.cpp's token types, the BOS/EOS
//! post-processor and merge lists that both tokenizer kinds share, and SentencePiece vocabularies
//! (`tokenizer.ggml.model = "llama"`: Llama 2's, Mistral v0.1's, Gemma's) both ways — a Hugging
//! Face `tokenizer.json` rebuilt from the file's tokens, scores and token types (import, for
//! `model::gguf`, which reads the metadata and rebuilds byte-level BPE itself), and those three
//! arrays from an SPM-style `tokenizer.json` (export, for `model::export::llama_gguf`).
//!
//! Which HF model reproduces llama.cpp: its SPM tokenizer (`llm_tokenizer_spm`) starts from the
//! text's characters, repeatedly joins the adjacent pair whose concatenation is a token with the
//! highest score (leftmost on ties), and spells any symbol that is not a token as its UTF-8 bytes
//! (`<0xNN>` tokens). That is BPE whose merges are every split of every token into two tokens,
//! ranked by the joined token's score — what transformers' `generate_merges` derives for its
//! Llama and Gemma converters — with byte fallback. A Unigram model (Viterbi over piece scores)
//! would tokenize differently, so the import builds BPE, and the export refuses a Unigram
//! `tokenizer.json` rather than write a file llama.cpp would read as something else.
//!
//! Spaces: llama.cpp writes every space as `▁` and, when `tokenizer.ggml.add_space_prefix`
//! (default true: Llama, Mistral; Gemma's files say false), puts one `▁` before the text and
//! again after every special token. transformers' older Llama form does exactly that (a
//! `Prepend("▁")` normalizer, which runs on each stretch between added tokens); its newer
//! `Metaspace` pre-tokenizer does not double the `▁` before a leading space, unlike SentencePiece
//! and llama.cpp, so the import writes the older form.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub(crate) mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// A GGUF vocabulary as the file states it (`None`: the key is absent).
#[derive(Debug, Clone)]
pub(crate) struct GgufVocab<'a> {
    pub tokens: &'a [String],
    /// One llama.cpp token type per token (all normal when the file has none).
    pub types: Vec<i32>,
    pub scores: Option<Vec<f32>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

/// `tokenizer.json` for a SentencePiece vocabulary, with llama.cpp's defaults for what the file
/// leaves out (add BOS, no EOS, a space prefix; scores in id order).
pub(crate) fn spm_tokenizer_json(v: &GgufVocab) -> Value {
    let tokens = v.tokens;
    let add_space_prefix = v.add_space_prefix.unwrap_or(true);
    let by_id: Vec<f32>;
    let scores = match &v.scores {
        Some(s) => s.as_slice(),
        None => {
            by_id = (0..tokens.len()).map(|i| -(i as f32)).collect();
            &by_id
        }
    };
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A repeated text keeps its first id, as llama.cpp's text-to-token map does.
        vocab.entry(t.clone()).or_insert_with(|| json!(i));
    }
    let merges = merges_by_score(tokens, scores);
    // Unknown, control and user-defined tokens are matched in the raw text before the model
    // runs (llama.cpp's special-token partition); only user-defined ones are not "special".
    let added: Vec<Value> = tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .filter(|(_, (_, ty))| {
            matches!(
                **ty,
                token_type::UNKNOWN | token_type::CONTROL | token_type::USER_DEFINED
            )
        })
        .map(|(i, (t, ty))| {
            json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty != token_type::USER_DEFINED
            })
        })
        .collect();
    let named = |id: Option<u32>| id.and_then(|id| Some((id, tokens.get(id as usize)?.clone())));
    let unk = named(v.unk).map(|(_, t)| t);
    let post_processor = post_processor(
        named(v.bos).filter(|_| v.add_bos.unwrap_or(true)),
        named(v.eos).filter(|_| v.add_eos.unwrap_or(false)),
    );
    let space = "\u{2581}";
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": space},
            {"type": "Replace", "pattern": {"String": " "}, "content": space}
        ]})
    } else {
        json!({"type": "Replace", "pattern": {"String": " "}, "content": space})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": space}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    })
}

/// Every split of every token into two tokens, highest joined score first; ties go to the
/// longer left part, then token order — transformers' `generate_merges` with scores, so the
/// rebuilt tokenizer ranks merges as its converters do.
fn merges_by_score(tokens: &[String], scores: &[f32]) -> Vec<Value> {
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // (score, left chars, right chars, left, right), in token order.
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (t, score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = t.split_at(at);
                Some((*id.get(l)?, *id.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|(il, ir, _, _)| (*il, *ir));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (*score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // A stable sort, descending: equal keys keep token order, as Python's sorted(reverse=True).
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| b.1.cmp(&a.1))
            .then_with(|| b.2.cmp(&a.2))
    });
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect()
}

/// What the export writes for an SPM-style vocabulary: a score per token and whether llama.cpp
/// puts `▁` before the text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpmExport {
    pub scores: Vec<f32>,
    pub add_space_prefix: bool,
}

/// Whether `tokenizer.json` is SentencePiece-style: a BPE model with byte fallback whose spaces
/// become `▁` (a `Replace` normalizer or a `Metaspace` pre-tokenizer).
pub(crate) fn is_spm_style(tok: &Value) -> bool {
    let model = &tok["model"];
    model["type"] == "BPE"
        && model["byte_fallback"] == true
        && (replaces_spaces(&tok["normalizer"]) || is_metaspace(&tok["pre_tokenizer"]))
}

/// A Unigram `tokenizer.json` (SentencePiece's other model) has no GGUF form llama.cpp would
/// tokenize the same way: its SPM tokenizer joins pairs by score instead of Viterbi search.
pub(crate) fn refuse_unigram(tok: &Value) -> Result<()> {
    if tok["model"]["type"] == "Unigram" {
        bail!(
            "the tokenizer is a SentencePiece Unigram model, which llama.cpp's SPM tokenizer (tokenizer.ggml.model = \"llama\") would tokenize differently: it joins pairs by score instead of searching for the best segmentation\nhint: export `hf` instead"
        );
    }
    Ok(())
}

fn parts<'a>(v: &'a Value, list: &str) -> Vec<&'a Value> {
    match v[list].as_array() {
        Some(items) => items.iter().collect(),
        None => vec![v],
    }
}

fn replaces_spaces(normalizer: &Value) -> bool {
    parts(normalizer, "normalizers").iter().any(|n| {
        n["type"] == "Replace" && n["pattern"]["String"] == " " && n["content"] == "\u{2581}"
    })
}

fn is_metaspace(pre: &Value) -> bool {
    parts(pre, "pretokenizers")
        .iter()
        .any(|p| p["type"] == "Metaspace")
}

/// Whether the tokenizer puts `▁` before the text: a `Prepend("▁")` normalizer, or a
/// `Metaspace` that prepends (`prepend_scheme` other than `never`; older files say
/// `add_prefix_space`).
fn prepends_space(tok: &Value) -> bool {
    let prepend = parts(&tok["normalizer"], "normalizers")
        .iter()
        .any(|n| n["type"] == "Prepend" && n["prepend"] == "\u{2581}");
    let metaspace = parts(&tok["pre_tokenizer"], "pretokenizers")
        .iter()
        .any(|p| {
            p["type"] == "Metaspace"
                && match p["prepend_scheme"].as_str() {
                    Some(scheme) => scheme != "never",
                    None => p["add_prefix_space"] != false,
                }
        });
    prepend || metaspace
}

/// Scores that make llama.cpp's highest-score-first joining follow `tokenizer.json`'s merge
/// ranks: a token made by the merge of rank `r` scores `-r`; tokens no merge makes score below
/// all of them (llama.cpp only compares the scores of joined pairs). `tokens[i]` is the text of
/// id `i`. Refused, by name, when llama.cpp would join differently: a split of a token into two
/// tokens that the merges do not list (llama.cpp joins any such pair).
///
/// A token made by several merges gets the rank of its first. When its merges are adjacent in
/// rank (transformers' converters list them so for tokens of distinct scores) the orders agree;
/// when another token's merge sits between them (tokens of equal SentencePiece score, such as
/// Gemma's user-defined pieces), llama.cpp may join two such competing pairs in the other order.
pub(crate) fn export_scores(tok: &Value, tokens: &[String]) -> Result<SpmExport> {
    let model = &tok["model"];
    let merges = merge_pairs(model)?;
    let rank_of: HashMap<(&str, &str), usize> = merges
        .iter()
        .enumerate()
        .map(|(r, (a, b))| ((a.as_str(), b.as_str()), r))
        .collect();
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Per joined token: the rank of its first merge.
    let mut first_rank: HashMap<String, usize> = HashMap::new();
    for (r, (a, b)) in merges.iter().enumerate() {
        first_rank.entry(format!("{a}{b}")).or_insert(r);
    }
    let lowest = -(merges.len() as f32);
    let mut scores = Vec::with_capacity(tokens.len());
    for t in tokens {
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if id.contains_key(l) && id.contains_key(r) && !rank_of.contains_key(&(l, r)) {
                bail!(
                    "token {t:?} splits into tokens {l:?} + {r:?}, a pair tokenizer.json never merges but llama.cpp's SPM tokenizer would join\nhint: export `hf` instead"
                );
            }
        }
        let score = first_rank.get(t.as_str()).map_or(lowest, |r| -(*r as f32));
        scores.push(score);
    }
    Ok(SpmExport {
        scores,
        add_space_prefix: prepends_space(tok),
    })
}

/// The llama.cpp type of a token that is in the model's vocabulary (not an added token): byte
/// fallback tokens are BYTE, the unknown token UNKNOWN.
pub(crate) fn vocab_token_type(text: &str, unk: Option<&str>) -> i32 {
    let is_byte = text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && text[3..5].chars().all(|c| c.is_ascii_hexdigit());
    if is_byte {
        token_type::BYTE
    } else if unk == Some(text) {
        token_type::UNKNOWN
    } else {
        token_type::NORMAL
    }
}

/// The post-processor that puts `bos` (id, text) before and `eos` after every sequence, as
/// llama.cpp's `add_bos_token` / `add_eos_token` do.
pub(crate) fn post_processor(
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
) -> serde_json::Value {
    let special = |token: &Option<(u32, String)>, type_id: u32| {
        token
            .as_ref()
            .map(|(_, name)| serde_json::json!({"SpecialToken": {"id": name, "type_id": type_id}}))
    };
    let template = |seq: &str, type_id: u32| -> Vec<serde_json::Value> {
        let text = serde_json::json!({"Sequence": {"id": seq, "type_id": type_id}});
        special(&bos, type_id)
            .into_iter()
            .chain([text])
            .chain(special(&eos, type_id))
            .collect()
    };
    let single = template("A", 0);
    let pair: Vec<serde_json::Value> = single.iter().cloned().chain(template("B", 1)).collect();
    let special_tokens: serde_json::Map<String, serde_json::Value> = [&bos, &eos]
        .into_iter()
        .flatten()
        .map(|(id, name)| {
            (
                name.clone(),
                serde_json::json!({"id": name, "ids": [id], "tokens": [name]}),
            )
        })
        .collect();
    serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

/// The merges of a `tokenizer.json` BPE model as pairs (written either `"a b"` or `["a", "b"]`).
pub(crate) fn merge_pairs(model: &serde_json::Value) -> Result<Vec<(String, String)>> {
    model["merges"]
        .as_array()
        .context("tokenizer.json has no model.merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .with_context(|| format!("tokenizer.json merge {s:?} has no space")),
            serde_json::Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Ok((a.to_owned(), b.to_owned())),
                _ => bail!("tokenizer.json merge {m} is not two strings"),
            },
            other => bail!("tokenizer.json merge {other} is neither \"a b\" nor [a, b]"),
        })
        .collect()
}
