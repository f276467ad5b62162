//! GGUF for the model families (issue #20 §1, "loading HF layout and GGUF where llama.cpp
//! defines the family"). Each tiny family fixture goes out through our GGUF export (f32, so the
//! comparison is exact), is read by llama.cpp's own reader (`scripts/gguf-inspect.py`, PyPI
//! `gguf`) with the architecture, keys and tensors llama.cpp expects, and comes back through
//! our GGUF import with the logits of the HF-layout load. Where llama.cpp fixes by architecture
//! what a fixture sets otherwise (Gemma's query scale and sliding pattern, Mistral's window in
//! llama.cpp's `llama`), the export refuses the fixture by name, and the round trip runs on a
//! copy whose config says what llama.cpp does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rlhf_bot::model::export::CausalLm;
use rlhf_bot::model::export::llama_gguf::{self, GgufEncoding};
use rlhf_bot::model::gguf::GgufLlama;
use rlhf_bot::model::llama::LlamaForCausalLM;

use crate::common::max_abs_diff;
use crate::families::{expected, fixture, logits_gap};

/// One family's round trip.
struct Case {
    fixture: &'static str,
    /// How the copy's config.json departs from the fixture's (None: the fixture as it is).
    edit: Option<fn(&mut serde_json::Value)>,
    arch: &'static str,
    /// Metadata keys llama.cpp's reader must see, with the value when it matters.
    keys: &'static [(&'static str, Option<f64>)],
    /// Tensors that must be in the file (beyond the common ones).
    tensors: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        fixture: "llama3",
        edit: None,
        arch: "llama",
        keys: &[("llama.rope.freq_base", Some(10_000.0))],
        tensors: &["rope_freqs.weight", "blk.1.ffn_norm.weight"],
    },
    Case {
        fixture: "llama-linear",
        edit: None,
        arch: "llama",
        keys: &[("llama.rope.scaling.factor", Some(4.0))],
        tensors: &[],
    },
    Case {
        fixture: "qwen3",
        edit: None,
        arch: "qwen3",
        keys: &[("qwen3.rope.freq_base", Some(1_000_000.0))],
        tensors: &["blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"],
    },
    Case {
        // llama.cpp's qwen2 neither slides nor reads YaRN here: the copy has neither.
        fixture: "qwen2",
        edit: Some(|c| {
            c["use_sliding_window"] = false.into();
            c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
        }),
        arch: "qwen2",
        keys: &[("qwen2.rope.freq_base", Some(1_000_000.0))],
        tensors: &["blk.0.attn_q.bias", "blk.1.attn_v.bias"],
    },
    Case {
        // llama.cpp runs Mistral as `llama`, every layer with full attention.
        fixture: "mistral",
        edit: Some(|c| c["sliding_window"] = serde_json::Value::Null),
        arch: "llama",
        keys: &[("llama.attention.head_count_kv", Some(2.0))],
        tensors: &["output.weight"],
    },
    Case {
        // llama.cpp scales a Gemma 2's queries by head_dim^-½ (unless it has 46 layers).
        fixture: "gemma2",
        edit: Some(|c| c["query_pre_attn_scalar"] = 16.into()),
        arch: "gemma2",
        keys: &[
            ("gemma2.attn_logit_softcapping", Some(3.0)),
            ("gemma2.final_logit_softcapping", Some(5.0)),
            ("gemma2.attention.sliding_window", Some(8.0)),
        ],
        tensors: &[
            "blk.0.post_attention_norm.weight",
            "blk.0.ffn_norm.weight",
            "blk.0.post_ffw_norm.weight",
        ],
    },
    Case {
        // llama.cpp slides five layers in six: both of a 2-layer Gemma 3.
        fixture: "gemma3",
        edit: Some(|c| {
            c["layer_types"] = serde_json::json!(["sliding_attention", "sliding_attention"])
        }),
        arch: "gemma3",
        keys: &[
            ("gemma3.rope.freq_base", Some(1_000_000.0)),
            ("gemma3.rope.scaling.factor", Some(4.0)),
            ("gemma3.attention.sliding_window", Some(8.0)),
        ],
        tensors: &["blk.1.attn_q_norm.weight", "blk.1.post_ffw_norm.weight"],
    },
];

/// A copy of the fixture in `dir`, its config.json edited.
fn edited_copy(name: &str, edit: fn(&mut serde_json::Value), dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

fn export(dir: &Path, path: &Path) -> anyhow::Result<()> {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let lm = CausalLm::from_parts(dir, tensors, dir)?;
    llama_gguf::build(&lm, GgufEncoding::F32, "tiny")?.write_file(path)
}

fn prompt_logits(model: &LlamaForCausalLM, prompt: &[u32]) -> Tensor {
    let ids = Tensor::new(vec![prompt.to_vec()], &Device::Cpu).unwrap();
    model.forward(&ids, None).unwrap().squeeze(0).unwrap()
}

#[test]
fn every_family_round_trips_through_our_gguf_export_llama_cpps_reader_and_our_import() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let name = case.fixture;
        let dir = match case.edit {
            None => fixture(name),
            Some(edit) => {
                let d = tmp.path().join(format!("{name}-hf"));
                edited_copy(name, edit, &d);
                d
            }
        };
        let path = tmp.path().join(format!("{name}.gguf"));
        export(&dir, &path).unwrap_or_else(|e| panic!("{name}: export failed: {e:#}"));

        if let Some(r) = crate::export_model::inspect(&path) {
            let md = &r["metadata"];
            assert_eq!(md["general.architecture"], case.arch, "{name}");
            assert_eq!(md["general.file_type"], 0, "{name}: ALL_F32");
            for (key, want) in case.keys {
                let got = &md[*key];
                assert!(!got.is_null(), "{name}: llama.cpp's reader sees no {key}");
                if let Some(want) = want {
                    let got = got.as_f64().unwrap();
                    assert!(
                        (got - want).abs() < 1e-6,
                        "{name}: {key} = {got}, not {want}"
                    );
                }
            }
            let names: Vec<&str> = r["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap())
                .collect();
            for t in [
                "token_embd.weight",
                "output_norm.weight",
                "blk.1.attn_q.weight",
            ]
            .iter()
            .chain(case.tensors)
            {
                assert!(names.contains(t), "{name}: no tensor {t} in {names:?}");
            }
        }

        let imported = GgufLlama::read(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let out = tmp.path().join(format!("{name}-from-gguf"));
        imported.save_hf_dir(&out).unwrap();
        let theirs = LlamaForCausalLM::load(&out, &Device::Cpu).unwrap();
        let ours = LlamaForCausalLM::load(&dir, &Device::Cpu).unwrap();
        let prompt = expected(name).prompt;
        let diff = max_abs_diff(
            &prompt_logits(&theirs.model, &prompt),
            &prompt_logits(&ours.model, &prompt),
        );
        assert!(
            diff <= 1e-4,
            "{name}: GGUF import's logits differ by {diff}"
        );
        if case.edit.is_none() {
            let diff = logits_gap(&theirs.model, &expected(name));
            assert!(diff <= 1e-4, "{name} from GGUF vs transformers: {diff}");
        }
    }
}

/// Llama 3's scaling reaches the GGUF as per-frequency divisors only; the import recovers the
/// llama3 parameters they came from.
#[test]
fn llama3_rope_scaling_comes_back_as_llama3_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("llama3.gguf");
    export(&fixture("llama3"), &path).unwrap();
    let cfg = GgufLlama::read(&path).unwrap().config.to_hf_json();
    let rope = &cfg["rope_parameters"];
    assert_eq!(rope["rope_type"], "llama3", "{rope}");
    assert_eq!(rope["factor"], 8.0, "{rope}");
    assert_eq!(rope["original_max_position_embeddings"], 32, "{rope}");
    assert_eq!(rope["high_freq_factor"], 4.0, "{rope}");
}

/// With several frequencies in Llama 3's blend, and parameters that are not the ones the fit
/// assumes (low_freq_factor 2): the import finds parameters with the same frequencies, so the
/// logits come back unchanged.
#[test]
fn llama3_scaling_with_a_wide_blend_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama3-blend");
    edited_copy(
        "llama3",
        |c| {
            c["rope_parameters"] = serde_json::json!({
                "rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 2.0,
                "high_freq_factor": 8.0, "original_max_position_embeddings": 64
            })
        },
        &dir,
    );
    let path = tmp.path().join("blend.gguf");
    export(&dir, &path).unwrap();
    let imported = GgufLlama::read(&path).unwrap();
    assert_eq!(imported.config.rope_parameters["rope_type"], "llama3");
    let out = tmp.path().join("back");
    imported.save_hf_dir(&out).unwrap();
    let prompt = expected("llama3").prompt;
    let ours = LlamaForCausalLM::load(&dir, &Device::Cpu).unwrap();
    let theirs = LlamaForCausalLM::load(&out, &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &prompt_logits(&theirs.model, &prompt),
        &prompt_logits(&ours.model, &prompt),
    );
    assert!(diff <= 1e-4, "logits differ by {diff}");
}

#[test]
fn models_llama_cpp_would_run_differently_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let refusal = |name: &str| {
        let e = export(&fixture(name), &tmp.path().join(format!("{name}.gguf")))
            .expect_err("export should refuse");
        format!("{e:#}")
    };
    let msg = refusal("gemma2");
    assert!(
        msg.contains("gemma2") && msg.contains("query scale") && msg.contains("24"),
        "{msg}"
    );
    let msg = refusal("gemma3");
    assert!(
        msg.contains("layer 1's attention") && msg.contains("sliding"),
        "{msg}"
    );
    let msg = refusal("mistral");
    assert!(
        msg.contains("llama") && msg.contains("layer 0's attention"),
        "{msg}"
    );
    let msg = refusal("llama-yarn");
    assert!(msg.contains("\"yarn\"") && msg.contains("hint:"), "{msg}");
    assert!(!tmp.path().join("gemma2.gguf").exists(), "nothing written");
}
