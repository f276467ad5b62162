//! `export-model --to hf` of the BERT reward model: the sentence-transformers layout (encoder at
//! the root, `1_Pooling`, a `2_Dense` whose rows are the score and the aspect heads, the step head
//! in its own file), written by the real binary and read back by the project's own loader, which
//! must score the same texts as the original (f32 to 1e-5, f16 to 1e-3). transformers and
//! sentence-transformers read it in scripts/check-reward-export.sh.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_bot::model::bert::{
    BertConfig, BertRewardModel, LoadedTokenizer, Pooling, RewardHeadConfig,
};

use crate::common::{Workspace, max_abs_diff, repo};
use crate::export_model::export;

const TEXTS: &[&str] = &[
    "the man is eating food",
    "a man is eating bread",
    "the food is bread",
    "a man",
];

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 41, // the fixture tokenizer's vocabulary
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 32,
        max_position_embeddings: 24,
        ..BertConfig::minilm_l6()
    }
}

/// A `train reward` output at `dir`: seeded encoder, heads scaled up so that scores spread well
/// beyond the tolerances (and a swapped Dense row would show).
fn reward_dir(dir: &Path, pooling: Pooling) -> PathBuf {
    let head = RewardHeadConfig {
        pooling,
        // Not in name order: the export must put the Dense rows in the model's (sorted) order.
        aspects: vec!["helpfulness".into(), "accuracy".into()],
        step_head: true,
    };
    let mut model = BertRewardModel::new_seeded(&tiny_config(), head, &Device::Cpu, 21).unwrap();
    for (name, var) in model.named_vars() {
        if !name.starts_with("encoder.") && !name.starts_with("embeddings.") {
            let scaled = (var.as_tensor() * 10.0).unwrap();
            var.set(&scaled).unwrap();
        }
    }
    model.set_tokenizer(
        LoadedTokenizer::from_file(&repo().join("tests/fixtures/bert/tokenizer.json")).unwrap(),
    );
    model.save(dir).unwrap();
    dir.to_path_buf()
}

/// Score, aspects (name order) and step logits of [`TEXTS`], stacked into one `[n, k]` tensor.
fn scores(dir: &Path) -> Tensor {
    let model = BertRewardModel::load(dir, &[], &Device::Cpu).unwrap();
    assert!(model.fresh_heads().is_empty(), "{:?}", model.fresh_heads());
    let batch = model.encode(TEXTS, &Device::Cpu).unwrap();
    let out = model.forward(&batch, false).unwrap();
    let mut cols = vec![out.score.unsqueeze(1).unwrap()];
    cols.extend(out.aspects.values().map(|t| t.unsqueeze(1).unwrap()));
    cols.push(out.step_logits.unwrap());
    Tensor::cat(&cols, 1).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn bert_reward_model_exports_in_the_sentence_transformers_layout_and_scores_the_same() {
    let ws = Workspace::new();
    let rm = reward_dir(&ws.path().join("rm"), Pooling::Mean);
    let original = scores(&rm);
    // Score and aspect columns (step logits at [CLS] hardly move between texts).
    let pooled = original.narrow(1, 0, 3).unwrap();
    let spread = pooled
        .max_keepdim(0)
        .unwrap()
        .sub(&pooled.min_keepdim(0).unwrap())
        .unwrap();
    let spread: f32 = spread.min_all().unwrap().to_scalar().unwrap();
    assert!(
        spread > 0.05,
        "the test model's scores barely differ ({spread})"
    );

    let out = ws.path().join("rm-f32");
    let s = export(&rm, "hf", &out, &["--dtype", "f32"]);
    assert_eq!(s["kind"], "reward");
    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "BertModel");
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(
        cfg["rlhf_bot_reward"]["aspects"],
        serde_json::json!(["accuracy", "helpfulness"])
    );
    let modules = json(&out.join("modules.json"));
    let types: Vec<&str> = modules
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "sentence_transformers.models.Transformer",
            "sentence_transformers.models.Pooling",
            "sentence_transformers.models.Dense"
        ]
    );
    let pooling = json(&out.join("1_Pooling/config.json"));
    assert_eq!(pooling["pooling_mode_mean_tokens"], true);
    assert_eq!(pooling["pooling_mode_cls_token"], false);
    let dense = json(&out.join("2_Dense/config.json"));
    assert_eq!(dense["out_features"], 3);
    assert_eq!(dense["in_features"], 16);
    assert_eq!(
        dense["activation_function"],
        "torch.nn.modules.linear.Identity"
    );
    let dense_w =
        candle_core::safetensors::load(out.join("2_Dense/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(dense_w["linear.weight"].dims(), &[3, 16]);
    assert_eq!(dense_w["linear.bias"].dims(), &[3]);
    // The encoder file holds no head: transformers' AutoModel loads it as a plain BertModel.
    let enc = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        enc.keys()
            .all(|k| k.starts_with("embeddings.") || k.starts_with("encoder."))
    );
    let tok_cfg = json(&out.join("tokenizer_config.json"));
    assert_eq!(tok_cfg["pad_token"], "[PAD]");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("SentenceTransformer(") && card.contains("| 2 | aspect `helpfulness` |"),
        "{card}"
    );
    assert!(out.join("step_head.safetensors").is_file());

    let d = max_abs_diff(&original, &scores(&out));
    assert!(d < 1e-5, "f32 export scores {d} away from the original");

    let half = ws.path().join("rm-f16");
    export(&rm, "hf", &half, &["--dtype", "f16"]);
    assert_eq!(json(&half.join("config.json"))["torch_dtype"], "float16");
    let d = max_abs_diff(&original, &scores(&half));
    println!(
        "f16 reward export: max abs score difference {d} (scores up to {})",
        original
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    );
    assert!(d < 1e-3, "f16 export scores {d} away from the original");

    // The default (bf16) is what a server runs; the export of the export is the same model.
    let bf16 = ws.path().join("rm-bf16");
    export(&rm, "hf", &bf16, &[]);
    let d = max_abs_diff(&original, &scores(&bf16));
    println!("bf16 reward export: max abs score difference {d}");
    assert!(d < 0.05, "bf16 export scores {d} away from the original");
    let again = ws.path().join("rm-again");
    export(&out, "hf", &again, &["--dtype", "f32"]);
    assert_eq!(max_abs_diff(&original, &scores(&again)), 0.0);
}

#[test]
fn cls_pooled_reward_model_exports_cls_pooling() {
    let ws = Workspace::new();
    let rm = reward_dir(&ws.path().join("rm"), Pooling::Cls);
    let out = ws.path().join("rm-st");
    export(&rm, "hf", &out, &["--dtype", "f32"]);
    let pooling = json(&out.join("1_Pooling/config.json"));
    assert_eq!(pooling["pooling_mode_cls_token"], true);
    assert_eq!(pooling["pooling_mode_mean_tokens"], false);
    let d = max_abs_diff(&scores(&rm), &scores(&out));
    assert!(d < 1e-5, "f32 export scores {d} away from the original");
}

#[test]
fn a_plain_sentence_encoder_is_refused_with_a_hint() {
    let ws = Workspace::new();
    let rm = reward_dir(&ws.path().join("rm"), Pooling::Mean);
    // Drop the heads: what is left is an encoder without a trained score.
    let path = rm.join("model.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("score."))
            .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let o = crate::export_model::export_output(&rm, "hf", &ws.path().join("out"), &[]);
    assert!(!o.status.success());
    let err = crate::common::stderr(&o);
    assert!(
        err.contains("score.weight") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn only_our_own_dense_layer_is_read_as_heads_and_a_mismatch_is_named() {
    let ws = Workspace::new();
    let rm = reward_dir(&ws.path().join("rm"), Pooling::Mean);
    let out = ws.path().join("st");
    export(&rm, "hf", &out, &["--dtype", "f32"]);
    let cfg_path = out.join("config.json");
    let cfg = json(&cfg_path);

    // Config and Dense disagree on the heads: an error naming both, not a silent misreading.
    let mut fewer = cfg.clone();
    fewer["rlhf_bot_reward"]["aspects"] = serde_json::json!(["accuracy"]);
    std::fs::write(&cfg_path, fewer.to_string()).unwrap();
    let err = format!(
        "{:#}",
        BertRewardModel::load(&out, &[], &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("2_Dense") && err.contains("3 output rows") && err.contains("hint:"),
        "{err}"
    );

    // Another sentence encoder's Dense (no rlhf_bot_reward): a projection, not our heads.
    let mut foreign = cfg;
    foreign.as_object_mut().unwrap().remove("rlhf_bot_reward");
    std::fs::write(&cfg_path, foreign.to_string()).unwrap();
    let model = BertRewardModel::load(&out, &[], &Device::Cpu).unwrap();
    assert_eq!(model.fresh_heads(), ["score.bias", "score.weight"]);
}
