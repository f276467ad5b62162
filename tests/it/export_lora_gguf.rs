//! `export-model --to gguf-lora`: the tiny LoRA policy run's adapter as llama.cpp's adapter GGUF.
//! Read back three ways: llama.cpp's own reader (PyPI `gguf`) finds the adapter metadata and
//! tensor names/shapes llama.cpp's `llama_adapter_lora_init` checks; the raw tensors satisfy
//! llama.cpp's arithmetic (merged GGUF weight = base GGUF weight + alpha/r · lora_b · lora_a, Q/K
//! rows in llama.cpp's permuted order); and the project's reader applies it over the base GGUF
//! for the same greedy continuation as the merged export.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use rlhf_bot::model::gguf::GgufLlama;
use rlhf_bot::model::llama::LlamaConfig;
use rlhf_bot::model::lora::merge_into_state_dict;

use crate::common::{Workspace, max_abs_diff, stderr};
use crate::export_model::{export, export_output, gguf_greedy, greedy, inspect, policy_run_in};

/// Every tensor of a GGUF as stored (dequantised to f32, no renaming or un-permuting).
fn raw_tensors(path: &Path) -> HashMap<String, Tensor> {
    let mut r = BufReader::new(std::fs::File::open(path).unwrap());
    let content = gguf_file::Content::read(&mut r).unwrap();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let t = content.tensor(&mut r, &n, &Device::Cpu).unwrap();
            let t = t
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (n, t)
        })
        .collect()
}

#[test]
fn gguf_lora_follows_llama_cpp_and_applies_over_the_base_like_the_merged_export() {
    let ws = Workspace::new();
    let run = policy_run_in(ws.path());
    let base_dir = ws.path().join("base");
    let base_gguf = ws.path().join("base.gguf");
    export(&base_dir, "gguf-f16", &base_gguf, &[]);
    let merged_gguf = ws.path().join("merged.gguf");
    export(&run, "gguf-f16", &merged_gguf, &[]);
    let out = ws.path().join("lora");
    let s = export(&run, "gguf-lora", &out, &["--base-model-id", "tiny/base"]);
    let adapter = out.join("adapter.gguf");
    assert_eq!(s["out"], adapter.display().to_string());
    assert_eq!(s["format"], "gguf-lora");

    // llama.cpp's arithmetic on the stored tensors: W_merged = W_base + (alpha / r) · B · A for
    // every adapted projection, in llama.cpp's (permuted) Q/K row order.
    let (base, merged, lora) = (
        raw_tensors(&base_gguf),
        raw_tensors(&merged_gguf),
        raw_tensors(&adapter),
    );
    assert_eq!(lora.len(), 2 * 2 * 3, "{:?}", lora.keys());
    for l in 0..2 {
        for m in ["attn_q", "attn_k", "attn_v"] {
            let w = format!("blk.{l}.{m}.weight");
            let (a, b) = (&lora[&format!("{w}.lora_a")], &lora[&format!("{w}.lora_b")]);
            assert_eq!(a.dims()[0], 4, "{w}: lora_a is [r, in]");
            assert_eq!(b.dims()[1], 4, "{w}: lora_b is [out, r]");
            let delta = (b.matmul(a).unwrap() * 2.0).unwrap();
            let expected = (&base[&w] + delta).unwrap();
            let d = max_abs_diff(&expected, &merged[&w]);
            // Both GGUFs hold f16 matrices: half an f16 step of the largest weights.
            assert!(
                d < 2e-3,
                "{w}: base + lora differs from the merged weight by {d}"
            );
        }
    }

    // The project's reader: un-permuted PEFT tensors that, merged over the base GGUF, answer as
    // the merged GGUF does.
    let cfg = LlamaConfig::from_dir(&base_dir).unwrap();
    let (lcfg, tensors) = rlhf_bot::model::gguf_lora::read(&adapter, &cfg).unwrap();
    assert_eq!((lcfg.r, lcfg.alpha), (4, 8.0));
    assert_eq!(lcfg.target_modules, ["k_proj", "q_proj", "v_proj"]);
    assert_eq!(lcfg.base_model.as_deref(), Some("tiny/base"));
    let (_, peft) = rlhf_bot::model::lora::load_peft(&run.join("policy/adapter")).unwrap();
    for (name, t) in &peft {
        assert_eq!(max_abs_diff(t, &tensors[name]), 0.0, "{name}");
    }
    let mut g = GgufLlama::read(&base_gguf).unwrap();
    let base_answers = gguf_greedy(&base_gguf);
    let mut weights: HashMap<String, Tensor> = std::mem::take(&mut g.tensors).into_iter().collect();
    let adapted = merge_into_state_dict(&mut weights, &lcfg, &tensors).unwrap();
    assert_eq!(adapted.len(), 6);
    g.tensors = weights.into_iter().collect();
    let tpl = rlhf_bot::model::chat_template::ChatTemplate::new(
        g.chat_template.clone().unwrap(),
        g.special_tokens.clone(),
    )
    .unwrap();
    let with_adapter = greedy(
        &g.causal_lm(&Device::Cpu).unwrap(),
        &g.tokenizer().unwrap(),
        Some(&tpl),
    );
    assert_eq!(with_adapter, gguf_greedy(&merged_gguf));
    assert_ne!(with_adapter, base_answers, "the adapter changed nothing");

    // llama.cpp's reader sees what llama_adapter_lora_init checks.
    let Some(r) = inspect(&adapter) else { return };
    let md = &r["metadata"];
    assert_eq!(md["general.type"], "adapter");
    assert_eq!(md["adapter.type"], "lora");
    assert_eq!(md["adapter.lora.alpha"], 8.0);
    assert_eq!(md["general.architecture"], "llama");
    let tensor = |name: &str| {
        r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {}", r["tensors"]))
            .clone()
    };
    let a = tensor("blk.1.attn_q.weight.lora_a");
    assert_eq!(a["shape"], serde_json::json!([4, 64]));
    assert_eq!(a["type"], "F32");
    assert_eq!(
        tensor("blk.1.attn_q.weight.lora_b")["shape"],
        serde_json::json!([64, 4])
    );
    assert_eq!(
        tensor("blk.0.attn_k.weight.lora_b")["shape"],
        serde_json::json!([32, 4])
    );
}

#[test]
fn gguf_lora_refuses_full_weight_policies_and_dtype() {
    let ws = Workspace::new();
    let run = policy_run_in(ws.path());
    let fail = |model: &Path, extra: &[&str]| {
        let o = export_output(model, "gguf-lora", &ws.path().join("x.gguf"), extra);
        assert!(!o.status.success());
        stderr(&o)
    };
    let err = fail(&ws.path().join("base"), &[]);
    assert!(
        err.contains("no LoRA adapter") && err.contains("hint:"),
        "{err}"
    );
    let err = fail(&run, &["--dtype", "f16"]);
    assert!(err.contains("--dtype") && err.contains("hint:"), "{err}");
}
