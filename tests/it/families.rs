//! Every decoder family and RoPE scaling against transformers (issue #20, "The model families
//! teams use").
//!
//! The fixtures under `tests/fixtures/families/<name>/` are tiny random checkpoints made by
//! `scripts/make-tiny-families.py` with transformers 5 (eager attention, f32), each with
//! transformers' logits of a 40-token prompt (longer than the 32-position original context,
//! and than the sliding windows of 8) and its 16-token greedy continuation. Here each one must
//! load, reproduce those logits within 1e-4 and that continuation exactly, train (full and
//! LoRA), and serve as a reward backbone.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rlhf_bot::config::policy::LORA_TARGETS;
use rlhf_bot::model::generate::{GenerationConfig, generate};
use rlhf_bot::model::llama::{
    Architecture, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
    load_frozen_causal_lm, save_pretrained,
};
use rlhf_bot::model::lora::{self, LoraConfig, LoraInit};
use rlhf_bot::model::tokenizer::Tokenizer;
use rlhf_bot::train::optim::{AdamW, AdamWConfig};

use crate::common::max_abs_diff;

/// Every fixture the script makes: (directory, what it exercises).
const FIXTURES: &[(&str, &str)] = &[
    ("llama3", "Llama 3.x llama3 RoPE scaling"),
    ("llama-linear", "linear RoPE scaling"),
    ("llama-dynamic", "dynamic NTK RoPE scaling"),
    ("llama-yarn", "YaRN RoPE scaling"),
    ("llama-longrope", "LongRoPE scaling"),
    ("qwen2", "Qwen2.5: q/k/v biases, YaRN, sliding layers"),
    ("qwen3", "Qwen3: q/k norms, explicit head_dim"),
    ("mistral", "Mistral: untied head, sliding window"),
    (
        "gemma2",
        "Gemma 2: soft-capping, sandwich norms, GeGLU, alternating windows",
    ),
    (
        "gemma3",
        "Gemma 3: q/k norms, local RoPE base, scaled global RoPE",
    ),
];

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

pub(crate) struct Expected {
    pub(crate) prompt: Vec<u32>,
    continuation: Vec<u32>,
    logits: Tensor,
}

pub(crate) fn expected(name: &str) -> Expected {
    let dir = fixture(name);
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("expected.json is JSON");
    let ids = |key: &str| -> Vec<u32> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {key} is a list"))
            .iter()
            .map(|x| x.as_u64().expect("token id") as u32)
            .collect()
    };
    let mut tensors =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Expected {
        prompt: ids("prompt"),
        continuation: ids("continuation"),
        logits: tensors.remove("logits").expect("logits tensor"),
    }
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(vec![ids.to_vec()], &Device::Cpu).unwrap()
}

/// Largest distance between `model`'s logits of the fixture's prompt and transformers'.
pub(crate) fn logits_gap(model: &LlamaForCausalLM, exp: &Expected) -> f32 {
    let logits = model
        .forward(&row(&exp.prompt), None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    max_abs_diff(&logits, &exp.logits)
}

#[test]
fn every_family_reproduces_transformers_logits_and_greedy_continuation() {
    reproduce_transformers_on_every_family();
}

/// The same on the path a CUDA run takes (candle's ops and `kernels::device_fused`: fused RoPE,
/// RMSNorm, softmax and SwiGLU gating, the KV-cache decode included), forced on the CPU.
#[test]
fn every_family_reproduces_transformers_on_the_gpu_path() {
    rlhf_bot::kernels::with_gpu_path(reproduce_transformers_on_every_family);
}

fn reproduce_transformers_on_every_family() {
    for (name, what) in FIXTURES {
        let exp = expected(name);
        let pre = LlamaForCausalLM::load(&fixture(name), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name} ({what}) does not load: {e:#}"));
        assert!(
            pre.report.initialised.is_empty(),
            "{name}: weights missing from the checkpoint: {:?}",
            pre.report.initialised
        );
        let diff = logits_gap(&pre.model, &exp);
        assert!(
            diff <= 1e-4,
            "{name} ({what}): logits differ from transformers by {diff}"
        );
        let eos = pre.config.eos_token_ids();
        let cfg = GenerationConfig::greedy(exp.continuation.len(), eos, 0);
        let out = generate(&pre.model, std::slice::from_ref(&exp.prompt), &cfg).unwrap();
        assert_eq!(
            out.tokens[0], exp.continuation,
            "{name} ({what}): greedy continuation differs from transformers'"
        );
    }
}

/// A batch from the fixture's prompt and continuation, every token a target.
fn batch(name: &str) -> (Tensor, Tensor) {
    let exp = expected(name);
    let mut ids = exp.prompt.clone();
    ids.extend(&exp.continuation);
    let ids = row(&ids);
    let targets = ids.ones_like().unwrap();
    (ids, targets)
}

pub(crate) fn nll(model: &LlamaForCausalLM, ids: &Tensor, targets: &Tensor) -> Tensor {
    masked_nll(model, ids, None, targets)
}

/// Mean negative log-likelihood of the `targets` tokens, rows masked by `mask`.
pub(crate) fn masked_nll(
    model: &LlamaForCausalLM,
    ids: &Tensor,
    mask: Option<&Tensor>,
    targets: &Tensor,
) -> Tensor {
    model
        .sequence_logprobs(ids, mask, targets)
        .unwrap()
        .neg()
        .unwrap()
        .mean_all()
        .unwrap()
}

/// Runs `steps` AdamW steps on one batch and returns the losses.
fn train(model: &LlamaForCausalLM, varmap: &VarMap, name: &str, steps: usize) -> Vec<f32> {
    let (ids, targets) = batch(name);
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::from_varmap(varmap, cfg).unwrap();
    (0..steps)
        .map(|_| {
            let loss = nll(model, &ids, &targets);
            opt.backward_step(&loss).unwrap();
            loss.to_scalar::<f32>().unwrap()
        })
        .collect()
}

fn assert_falls(name: &str, kind: &str, losses: &[f32]) {
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{name} {kind}: loss not finite: {losses:?}"
    );
    assert!(
        losses.last() < losses.first(),
        "{name} {kind}: loss did not fall: {losses:?}"
    );
}

#[test]
fn every_family_trains_fully_and_with_lora_on_its_own_module_names() {
    for (name, _) in FIXTURES {
        let pre = LlamaForCausalLM::load(&fixture(name), &Device::Cpu).unwrap();
        assert_falls(name, "full", &train(&pre.model, &pre.varmap, name, 4));

        let mut model = load_frozen_causal_lm(&fixture(name), &Device::Cpu).unwrap();
        let varmap = VarMap::new();
        let lcfg = LoraConfig {
            dropout: 0.0,
            target_modules: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
            ..LoraConfig::default()
        };
        let adapters =
            lora::attach_lora(&mut model, &lcfg, &varmap, LoraInit::Fresh { seed: 3 }).unwrap();
        assert_eq!(
            adapters.modules.len(),
            7 * 2,
            "{name}: every projection adapted"
        );
        adapters.set_training(true);
        assert_falls(name, "LoRA", &train(&model, &varmap, name, 4));
    }
}

#[test]
fn every_family_serves_as_a_reward_backbone() {
    for (name, _) in FIXTURES {
        let rm = LlamaForSequenceClassification::load(&fixture(name), Some(1), None, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name} does not load as a reward model: {e:#}"));
        assert_eq!(
            rm.report.initialised,
            vec!["score.weight".to_string()],
            "{name}"
        );
        let exp = expected(name);
        let chosen = row(&exp.prompt[..20]);
        let rejected = row(&exp.prompt[20..]);
        let mut opt = AdamW::from_varmap(
            &rm.varmap,
            AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let mut losses = Vec::new();
        for _ in 0..4 {
            let r = |ids: &Tensor| rm.model.forward(ids, None).unwrap().logits;
            let margin = (r(&chosen) - r(&rejected)).unwrap();
            // Pairwise (Bradley–Terry) loss: -log σ(r_chosen - r_rejected).
            let loss = candle_nn::ops::sigmoid(&margin)
                .unwrap()
                .log()
                .unwrap()
                .neg()
                .unwrap()
                .mean_all()
                .unwrap();
            opt.backward_step(&loss).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        assert_falls(name, "reward", &losses);
    }
}

#[test]
fn a_saved_family_model_names_its_class_and_reloads_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, class) in [
        ("gemma2", "Gemma2ForCausalLM"),
        ("qwen3", "Qwen3ForCausalLM"),
    ] {
        let pre = LlamaForCausalLM::load(&fixture(name), &Device::Cpu).unwrap();
        let out = tmp.path().join(name);
        save_pretrained(&out, &pre.config, &pre.varmap, Architecture::CausalLm).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], class);
        // Gemma's explicit nulls and per-layer keys survive the round trip.
        assert_eq!(cfg["layer_types"], {
            let orig: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(fixture(name).join("config.json")).unwrap(),
            )
            .unwrap();
            orig["layer_types"].clone()
        });
        let back = LlamaForCausalLM::load(&out, &Device::Cpu).unwrap();
        let ids = row(&expected(name).prompt);
        let diff = max_abs_diff(
            &pre.model.forward(&ids, None).unwrap(),
            &back.model.forward(&ids, None).unwrap(),
        );
        assert_eq!(diff, 0.0, "{name}: reloaded model differs");
    }
}

#[test]
fn the_fixture_tokenizer_round_trips_text() {
    let tok = Tokenizer::from_file(&fixture("gemma2").join("tokenizer.json")).unwrap();
    let ids = tok
        .encode("Feedback becomes training data.", false)
        .unwrap();
    assert!(ids.iter().all(|&i| i < 320), "{ids:?}");
    assert_eq!(
        tok.inner().decode(&ids, false).unwrap(),
        "Feedback becomes training data."
    );
}

fn config_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name).join("config.json")).unwrap()
}

fn refusal(text: &str) -> String {
    format!(
        "{:#}",
        LlamaConfig::from_json_str(text).expect_err("config should be refused")
    )
}

#[test]
fn unsupported_architectures_model_types_and_rope_types_are_refused_by_name() {
    let llama = config_text("llama3");
    let msg = refusal(&llama.replace("LlamaForCausalLM", "PhiForCausalLM"));
    assert!(msg.contains("\"PhiForCausalLM\""), "{msg}");
    assert!(
        msg.contains("Gemma2ForCausalLM"),
        "lists the supported ones: {msg}"
    );

    let msg = refusal(&llama.replace("\"model_type\": \"llama\"", "\"model_type\": \"phi3\""));
    assert!(msg.contains("\"phi3\""), "{msg}");

    let msg = refusal(&llama.replace("\"rope_type\": \"llama3\"", "\"rope_type\": \"su\""));
    assert!(msg.contains("\"su\""), "{msg}");
    assert!(msg.contains("longrope"), "lists the supported ones: {msg}");

    let msg = refusal(&llama.replace("\"low_freq_factor\": 1.0,", ""));
    assert!(
        msg.contains("low_freq_factor") && msg.contains("llama3"),
        "{msg}"
    );

    let gemma3 = config_text("gemma3");
    let msg = refusal(&gemma3.replace("\"gemma3_text\"", "\"gemma3\""));
    assert!(msg.contains("gemma3_text"), "{msg}");

    let msg = refusal(&gemma3.replace("\"sliding_attention\",\n", "\"chunked_attention\",\n"));
    assert!(msg.contains("layer_types"), "{msg}");
}

#[test]
fn family_switches_follow_the_config() {
    let load = |name: &str| LlamaConfig::from_dir(&fixture(name)).unwrap();
    let gemma2 = load("gemma2");
    assert_eq!(gemma2.attention_softcap(), Some(3.0));
    assert_eq!(gemma2.final_logit_softcap(), Some(5.0));
    assert!((gemma2.attention_scale() - 1.0 / 24f64.sqrt()).abs() < 1e-12);
    assert_eq!(
        (0..2)
            .map(|i| gemma2.layer_is_sliding(i))
            .collect::<Vec<_>>(),
        [true, false]
    );
    let gemma3 = load("gemma3");
    // Gemma 3 keeps the key but its attention does not cap.
    assert_eq!(gemma3.attention_softcap(), None);
    assert_eq!(gemma3.rope(true).unwrap().rope_type(), "default");
    assert_eq!(gemma3.rope(false).unwrap().rope_type(), "linear");
    let qwen2 = load("qwen2");
    assert_eq!(
        (0..2)
            .map(|i| qwen2.layer_is_sliding(i))
            .collect::<Vec<_>>(),
        [false, true]
    );
    let mistral = load("mistral");
    assert!(mistral.layer_is_sliding(0) && mistral.layer_is_sliding(1));
    assert_eq!(load("llama3").sliding_window(), None);
}

/// The binary as a user runs it: `train reward` on a Gemma 3 backbone, then `train policy`
/// (DPO + LoRA on the family's own module names) on a Gemma 2 policy scored by a Qwen3 reward
/// model. The fixtures share one tokenizer, so any of them can score any other's answers.
#[test]
fn the_binary_trains_family_reward_models_and_policies() {
    use crate::common::{Workspace, bin, stderr, stdout};
    let ws = Workspace::new();
    let cfg = ws.write_config(&format!(
        "feedback:\n  source: file\n  path: {}\nstore:\n  dir: {}\nregistry:\n  path: {}\n  artifacts: {}\n\
policy:\n  batch_size: 2\n  max_prompt_length: 24\n  max_completion_length: 6\n  eval_prompts: 2\n  lr: 0.01\n  seed: 3\n  \
lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj], merge: true}}\n",
        ws.path().join("none.jsonl").display(),
        ws.store_dir().display(),
        ws.path().join("registry.yaml").display(),
        ws.path().join("artifacts").display(),
    ));
    let rows = [
        ("What is a carbon tax?", "A price on emissions.", "Bananas."),
        ("Define GDP.", "Total output of an economy.", "Trains."),
        ("What is inflation?", "Rising prices over time.", "Purple."),
        ("What is a tariff?", "A tax on imports.", "No idea."),
    ];
    let data: String = rows
        .iter()
        .map(|(p, c, r)| {
            serde_json::json!({"prompt": format!("Q: {p}\nA:"), "chosen": format!(" {c}"), "rejected": format!(" {r}")})
                .to_string()
                + "\n"
        })
        .collect();
    let data_path = ws.path().join("pairs.jsonl");
    std::fs::write(&data_path, data).unwrap();

    let rm_out = ws.path().join("rm");
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["train", "reward", "--model"])
        .arg(fixture("gemma3"))
        .arg("--dataset")
        .arg(&data_path)
        .args(["--batch-size", "2", "--max-length", "32", "--out"])
        .arg(&rm_out)
        .output()
        .unwrap();
    assert!(o.status.success(), "train reward on gemma3: {}", stderr(&o));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rm_out.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        saved["architectures"][0],
        "Gemma3TextForSequenceClassification"
    );

    let out = ws.path().join("policy");
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args([
            "--format", "json", "train", "policy", "--algo", "dpo", "--steps", "2",
        ])
        .arg("--model")
        .arg(fixture("gemma2"))
        .arg("--reward-model")
        .arg(fixture("qwen3"))
        .arg("--data")
        .arg(&data_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "train policy on gemma2: {}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(summary["algo"], "dpo");
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(merged["architectures"][0], "Gemma2ForCausalLM");
    assert!(
        out.join("policy/adapter/adapter_model.safetensors")
            .is_file(),
        "a PEFT adapter"
    );
}

/// The fixtures would prove nothing if the feature they stand for did not change the output:
/// with the feature switched off in the config, the logits must move away from transformers'.
#[test]
fn each_fixture_exercises_the_feature_it_stands_for() {
    let plain_rope = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    let mut switch_off: Vec<(&str, &str, serde_json::Value)> = [
        "llama3",
        "llama-linear",
        "llama-dynamic",
        "llama-yarn",
        "llama-longrope",
    ]
    .map(|name| (name, "rope_parameters", plain_rope.clone()))
    .to_vec();
    switch_off.extend([
        ("qwen2", "use_sliding_window", serde_json::json!(false)),
        ("mistral", "sliding_window", serde_json::Value::Null),
        ("gemma2", "attn_logit_softcapping", serde_json::Value::Null),
        ("gemma2", "final_logit_softcapping", serde_json::Value::Null),
        ("gemma2", "query_pre_attn_scalar", serde_json::json!(16)),
        ("gemma3", "sliding_window", serde_json::Value::Null),
    ]);
    for (name, key, value) in &switch_off {
        let mut cfg: serde_json::Value = serde_json::from_str(&config_text(name)).unwrap();
        cfg[*key] = value.clone();
        let cfg = LlamaConfig::from_json_str(&cfg.to_string()).unwrap();
        let tensors =
            rlhf_bot::model::checkpoint_io::read_dir_tensors(&fixture(name), &Device::Cpu).unwrap();
        let vb =
            candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
        let model = LlamaForCausalLM::new(&cfg, vb).unwrap();
        let diff = logits_gap(&model, &expected(name));
        assert!(
            diff > 1e-3,
            "{name}: setting {key} = {value} leaves the logits within {diff} of transformers'"
        );
    }
}

/// A Qwen3 GGUF (as llama.cpp's converter writes one: `qwen3.*` keys, no Q/K permutation,
/// `attn_q_norm`/`attn_k_norm`, the `qwen2` pre-tokenizer) imports as the HF model: same
/// logits as transformers', same tokens for plain text. Architectures llama.cpp defines but
/// this importer does not rebuild are refused by name.
#[test]
fn a_qwen3_gguf_imports_as_its_hf_model() {
    use rlhf_bot::model::gguf::GgufLlama;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen3.gguf");
    crate::policy_model::write_hf_as_gguf(&fixture("qwen3"), "qwen3", "qwen2", &path);
    let m = GgufLlama::read(&path).unwrap();
    assert_eq!(m.config.model_type, "qwen3");
    let out = tmp.path().join("hf");
    m.save_hf_dir(&out).unwrap();
    let pre = LlamaForCausalLM::load(&out, &Device::Cpu).unwrap();
    assert_eq!(pre.config.family(), rlhf_bot::model::family::Family::Qwen3);
    let diff = logits_gap(&pre.model, &expected("qwen3"));
    assert!(diff <= 1e-4, "qwen3 from GGUF: logits differ by {diff}");
    let text = "Feedback becomes training data for the policy.";
    let ours = Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let theirs = Tokenizer::from_file(&fixture("qwen3").join("tokenizer.json")).unwrap();
    assert_eq!(
        ours.encode(text, false).unwrap(),
        theirs.encode(text, false).unwrap()
    );

    // Gemma 2 and 3 import now (tests/it/families_gguf.rs); Gemma 1 does not.
    let gemma = tmp.path().join("gemma.gguf");
    crate::policy_model::write_hf_as_gguf(&fixture("gemma2"), "gemma", "default", &gemma);
    let err = format!("{:#}", GgufLlama::read(&gemma).unwrap_err());
    assert!(err.contains("\"gemma\"") && err.contains("qwen3"), "{err}");
}
