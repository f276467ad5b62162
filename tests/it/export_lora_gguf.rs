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

/// Issue #20 §1: an adapter of every family the full-model export writes goes out under the
/// base's llama.cpp architecture and tensor names (one table with the full export), read back by
/// llama.cpp's reader (names, shapes, alpha) and by ours (the same PEFT tensors).
#[test]
fn every_familys_adapter_gguf_carries_its_architecture_and_tensor_names() {
    use rand::SeedableRng;
    use rlhf_bot::model::lora::LoraConfig;
    let tmp = tempfile::tempdir().unwrap();
    let (r, alpha) = (4usize, 8.0);
    let projections = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    for (family, arch) in [
        ("llama3", "llama"),
        ("mistral", "llama"),
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3"),
    ] {
        let base = LlamaConfig::from_dir(&crate::families::fixture(family)).unwrap();
        let (h, i) = (base.hidden_size, base.intermediate_size);
        let (q, kv) = (
            base.num_attention_heads * base.head_dim(),
            base.num_kv_heads() * base.head_dim(),
        );
        // PEFT's shapes: A [r, in], B [out, r].
        let in_out = |m: &str| match m {
            "self_attn.q_proj" => (h, q),
            "self_attn.k_proj" | "self_attn.v_proj" => (h, kv),
            "self_attn.o_proj" => (q, h),
            "mlp.down_proj" => (i, h),
            _ => (h, i),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
        let mut peft = HashMap::new();
        for l in 0..base.num_hidden_layers {
            for (m, _) in projections {
                let (fan_in, out) = in_out(m);
                let module = format!("model.layers.{l}.{m}");
                for (part, shape) in [("lora_A", (r, fan_in)), ("lora_B", (out, r))] {
                    let t = crate::export_model::random(&mut rng, shape, 0.1);
                    peft.insert(rlhf_bot::model::lora::peft_name(&module, part), t);
                }
            }
        }
        let adapter_dir = tmp.path().join(format!("{family}-adapter"));
        std::fs::create_dir_all(&adapter_dir).unwrap();
        let cfg = LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            target_modules: projections
                .iter()
                .map(|(m, _)| m.rsplit('.').next().unwrap().to_owned())
                .collect(),
            base_model: None,
        };
        std::fs::write(
            adapter_dir.join("adapter_config.json"),
            cfg.to_peft_json().to_string(),
        )
        .unwrap();
        candle_core::safetensors::save(&peft, adapter_dir.join("adapter_model.safetensors"))
            .unwrap();
        let path = tmp.path().join(format!("{family}.gguf"));
        rlhf_bot::model::export::lora_gguf::write(&adapter_dir, &base, "tiny", &path)
            .unwrap_or_else(|e| panic!("{family}: {e:#}"));

        // The stored B of Q/K: llama.cpp's row order for `llama`, HF's for the others.
        let raw = raw_tensors(&path);
        let b =
            &peft[&rlhf_bot::model::lora::peft_name("model.layers.0.self_attn.q_proj", "lora_B")];
        let stored = &raw["blk.0.attn_q.weight.lora_b"];
        let want = if arch == "llama" {
            rlhf_bot::model::gguf::permute_qk(b, base.num_attention_heads).unwrap()
        } else {
            b.clone()
        };
        assert_eq!(
            max_abs_diff(stored, &want),
            0.0,
            "{family}: Q's lora_b rows"
        );

        let (lcfg, back) = rlhf_bot::model::gguf_lora::read(&path, &base)
            .unwrap_or_else(|e| panic!("{family}: {e:#}"));
        assert_eq!((lcfg.r, lcfg.alpha), (r, alpha), "{family}");
        assert_eq!(back.len(), peft.len(), "{family}");
        for (name, t) in &peft {
            assert_eq!(max_abs_diff(t, &back[name]), 0.0, "{family}: {name}");
        }

        let Some(rep) = inspect(&path) else { continue };
        let md = &rep["metadata"];
        assert_eq!(md["general.architecture"], arch, "{family}");
        assert_eq!(md["general.type"], "adapter", "{family}");
        assert_eq!(md["adapter.type"], "lora", "{family}");
        assert_eq!(md["adapter.lora.alpha"], alpha, "{family}");
        let shapes: HashMap<String, serde_json::Value> = rep["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap().to_owned(), t["shape"].clone()))
            .collect();
        assert_eq!(shapes.len(), 2 * 7 * base.num_hidden_layers, "{family}");
        for l in 0..base.num_hidden_layers {
            for (m, g) in projections {
                let (fan_in, out) = in_out(m);
                let name = format!("blk.{l}.{g}.weight");
                assert_eq!(
                    shapes[&format!("{name}.lora_a")],
                    serde_json::json!([r, fan_in]),
                    "{family}: {name}"
                );
                assert_eq!(
                    shapes[&format!("{name}.lora_b")],
                    serde_json::json!([out, r]),
                    "{family}: {name}"
                );
            }
        }
    }

    // An adapter made for one architecture is refused over a base of another.
    let qwen3 = LlamaConfig::from_dir(&crate::families::fixture("qwen3")).unwrap();
    let err = format!(
        "{:#}",
        rlhf_bot::model::gguf_lora::read(&tmp.path().join("llama3.gguf"), &qwen3).unwrap_err()
    );
    assert!(
        err.contains("\"llama\"") && err.contains("\"qwen3\"") && err.contains("hint:"),
        "{err}"
    );
}
