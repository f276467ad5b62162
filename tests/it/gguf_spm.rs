//! SentencePiece tokenizers in GGUF (issue #20 §1: GGUF for Llama 2 / Mistral v0.1 / Gemma
//! vocabularies). The fixtures in tests/fixtures/spm/ are made by scripts/make-spm-tokenizers.py:
//! a real SentencePiece model trained with the `sentencepiece` library, transformers' conversion
//! of it, a vocabulary-only GGUF written by llama.cpp's own writer (PyPI `gguf`), and the ids
//! llama.cpp's SPM tokenizer gives for tricky strings (SentencePiece's own encoding of each stretch
//! between special tokens). Two styles: Llama's (a `▁` before the text) and Gemma's (none).
//!
//! transformers agrees with those ids everywhere for the Gemma style; for the Llama style its
//! newer `Metaspace` form gives one `▁` fewer before a leading space and none after a special
//! token, where SentencePiece and llama.cpp give one (expected.json records both; the GGUF
//! import follows llama.cpp).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rlhf_bot::model::export::CausalLm;
use rlhf_bot::model::export::llama_gguf::{self, GgufEncoding};
use rlhf_bot::model::gguf::{GgufLlama, read_tokenizer_json};
use tokenizers::Tokenizer;

use crate::families::fixture;
use crate::policy_model::ids_of as ids;

const STYLES: &[&str] = &["llama", "gemma"];

fn spm_fixture(style: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/spm")
        .join(style)
}

fn expected(style: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(spm_fixture(style).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer_of(json: &serde_json::Value) -> Tokenizer {
    serde_json::to_string(json).unwrap().parse().unwrap()
}

/// Every case of `style`'s expected.json, encoded and decoded by `tok` as llama.cpp would.
fn assert_tokenizes_like_llama_cpp(tok: &Tokenizer, style: &str, what: &str) {
    let exp = expected(style);
    let cases = exp["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "{style}: {} cases", cases.len());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&case["ids"]), "{what} ({style}) on {text:?}");
        if case["transformers_agrees"] == true {
            assert_eq!(
                got,
                ids(&case["transformers"]),
                "{what} ({style}) on {text:?}"
            );
        }
        let with_bos = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(
            with_bos,
            ids(&case["with_bos"]),
            "{what} ({style}) on {text:?}"
        );
        let decoded = tok.decode(&got, false).unwrap();
        assert_eq!(decoded, case["decoded"], "{what} ({style}) decodes {got:?}");
    }
}

#[test]
fn a_sentencepiece_vocabulary_written_by_llama_cpps_writer_tokenizes_as_llama_cpp_does() {
    for style in STYLES {
        let json = read_tokenizer_json(&spm_fixture(style).join("vocab.gguf")).unwrap();
        assert_eq!(json["model"]["byte_fallback"], true, "{style}");
        let tok = tokenizer_of(&json);
        assert_eq!(tok.get_vocab_size(true), 1000, "{style}");
        assert_tokenizes_like_llama_cpp(&tok, style, "our import of llama.cpp's GGUF");
    }
    // The fixtures do exercise the difference between the styles and the byte fallback.
    let llama = expected("llama");
    let leading = &llama["cases"][1];
    assert_eq!(leading["text"], " leading space");
    assert_eq!(leading["transformers_agrees"], false, "{leading}");
    let emoji = expected("gemma")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str().unwrap().contains('🤗'))
        .cloned()
        .unwrap();
    // 🤗 is F0 9F A4 97: four byte tokens, <0xNN> at id NN + 6 (after the specials and the turn
    // markers).
    let bytes: Vec<u32> = [0xF0u32, 0x9F, 0xA4, 0x97].iter().map(|b| b + 6).collect();
    assert!(
        ids(&emoji["ids"]).windows(4).any(|w| w == bytes.as_slice()),
        "{emoji}"
    );
}

/// A tiny model of `family` (a families fixture) with `style`'s SentencePiece tokenizer: vocab
/// 1000, the embedding (and output head) resized, special ids from the tokenizer.
fn model_with_spm_tokenizer(family: &str, style: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(family).join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["vocab_size"] = 1000.into();
    let (bos, eos, pad) = if style == "llama" {
        (1, 2, serde_json::Value::Null)
    } else {
        (2, 1, 0.into())
    };
    cfg["bos_token_id"] = bos.into();
    cfg["eos_token_id"] = eos.into();
    cfg["pad_token_id"] = pad;
    // What llama.cpp fixes by architecture (as in families_gguf.rs).
    match family {
        "mistral" => cfg["sliding_window"] = serde_json::Value::Null,
        "gemma2" => cfg["query_pre_attn_scalar"] = 16.into(),
        _ => {}
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(spm_fixture(style).join(f), dir.join(f)).unwrap();
    }
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture(family).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        if let Some(t) = tensors.get_mut(name) {
            let hidden = t.dim(1).unwrap();
            *t = Tensor::randn(0f32, 0.1, (1000, hidden), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

#[test]
fn spm_tokenizers_export_as_llama_cpps_llama_vocabulary_and_import_back_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, style, arch) in [("mistral", "llama", "llama"), ("gemma2", "gemma", "gemma2")] {
        let dir = tmp.path().join(family);
        model_with_spm_tokenizer(family, style, &dir);
        let tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let lm = CausalLm::from_parts(&dir, tensors, &dir).unwrap();
        let path = tmp.path().join(format!("{family}.gguf"));
        llama_gguf::build(&lm, GgufEncoding::F32, "spm")
            .unwrap_or_else(|e| panic!("{family}: export failed: {e:#}"))
            .write_file(&path)
            .unwrap();

        // llama.cpp's reader sees a SentencePiece vocabulary of the model's size.
        if let Some(r) = crate::export_model::inspect(&path) {
            let md = &r["metadata"];
            assert_eq!(md["general.architecture"], arch, "{family}");
            assert_eq!(md["tokenizer.ggml.model"], "llama", "{family}");
            assert_eq!(
                md["tokenizer.ggml.add_space_prefix"],
                style == "llama",
                "{family}"
            );
            assert_eq!(md["tokenizer.ggml.bos_token_id"], bos_of(style), "{family}");
            let arrays = &r["arrays"];
            for key in [
                "tokenizer.ggml.tokens",
                "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type",
            ] {
                assert_eq!(arrays[key]["len"], 1000, "{family}: {key}");
            }
            assert!(arrays["tokenizer.ggml.merges"].is_null(), "{family}");
            // The specials, then the byte tokens (llama.cpp's BYTE = 6).
            let types = &arrays["tokenizer.ggml.token_type"]["head"];
            let want = if style == "llama" {
                serde_json::json!([2, 3, 3, 6, 6, 6, 6, 6])
            } else {
                serde_json::json!([3, 3, 3, 2, 3, 3, 6, 6])
            };
            assert_eq!(types, &want, "{family}");
        }

        // llama.cpp itself, when the bench venv has llama-cpp-python, tokenizes with our file
        // exactly as it does with the vocabulary its own writer made.
        let cases = expected(style)["cases"].as_array().unwrap().clone();
        if let Some(found) = llama_cpp_tokenize(&path, &cases, tmp.path()) {
            for (got, case) in found.iter().zip(&cases) {
                assert_eq!(got["ids"], case["ids"], "llama.cpp on our {family} GGUF");
                assert_eq!(
                    got["with_bos"], case["with_bos"],
                    "llama.cpp on our {family} GGUF"
                );
            }
        }

        let imported = GgufLlama::read(&path).unwrap_or_else(|e| panic!("{family}: {e:#}"));
        assert!(imported.add_bos_token, "{family}");
        let tok = imported.tokenizer().unwrap();
        assert_tokenizes_like_llama_cpp(&tok, style, "our export, then our import");
    }
}

/// llama.cpp's ids (without and with BOS) for the cases' texts, from `scripts/llamacpp-tokenize.py`
/// in the bench venv (`$RLHF_BENCH_VENV`); `None` when that venv has no llama-cpp-python (it is
/// not a test dependency: building llama.cpp takes ~10 minutes).
fn llama_cpp_tokenize(
    gguf: &Path,
    cases: &[serde_json::Value],
    scratch: &Path,
) -> Option<Vec<serde_json::Value>> {
    let venv = std::env::var_os("RLHF_BENCH_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/rlhf-bot/bench-venv"))
        })?;
    let python = venv.join("bin/python");
    let has_llama_cpp = std::process::Command::new(&python)
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_llama_cpp {
        eprintln!(
            "skipped the llama.cpp check: no llama-cpp-python in {}",
            venv.display()
        );
        return None;
    }
    let texts: Vec<&serde_json::Value> = cases.iter().map(|c| &c["text"]).collect();
    let strings = scratch.join("strings.json");
    std::fs::write(&strings, serde_json::to_string(&texts).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/llamacpp-tokenize.py");
    let o = std::process::Command::new(&python)
        .arg(script)
        .arg(gguf)
        .arg(&strings)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

fn bos_of(style: &str) -> u32 {
    if style == "llama" { 1 } else { 2 }
}

/// The export of `dir` (a model directory) after `edit` changed its tokenizer.json: the error.
fn export_error(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut tok);
    std::fs::write(&path, tok.to_string()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let lm = CausalLm::from_parts(dir, tensors, dir).unwrap();
    let err = llama_gguf::build(&lm, GgufEncoding::F32, "x").expect_err("export should refuse");
    format!("{err:#}")
}

#[test]
fn tokenizers_llama_cpp_would_read_differently_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mistral");
    model_with_spm_tokenizer("mistral", "llama", &dir);

    // A merge left out: llama.cpp would still join that pair, since both halves are tokens.
    let err = export_error(&dir, |tok| {
        let merges = tok["model"]["merges"].as_array_mut().unwrap();
        merges.remove(0);
    });
    assert!(
        err.contains("never merges") && err.contains("hint:"),
        "{err}"
    );

    // SentencePiece's Unigram model: llama.cpp's SPM tokenizer does not search segmentations.
    let err = export_error(&dir, |tok| {
        let vocab: Vec<serde_json::Value> = (0..1000)
            .map(|i| serde_json::json!([format!("t{i}"), -(i as f64)]))
            .collect();
        tok["model"] = serde_json::json!({"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": false});
        tok["added_tokens"] = serde_json::json!([]);
    });
    assert!(
        err.contains("Unigram") && err.contains("llama.cpp") && err.contains("hint:"),
        "{err}"
    );
}
