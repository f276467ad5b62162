//! The policy's LoRA adapter as llama.cpp's adapter GGUF (`--to gguf-lora`), for
//! `llama-cli -m base.gguf --lora adapter.gguf` and llama-cpp-python's `lora_path`, for every
//! family the full-model export writes (the base's llama.cpp architecture and tensor names come
//! from the same table, `model::gguf`). The format's names, shapes and the Q/K permutation of B
//! are described in `model::gguf_lora`, which reads it back.
//!
//! Tensors stay f32: an adapter is small (r × (in + out) per projection) and llama.cpp applies
//! f32 adapters to a base of any encoding.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::Value;

use super::gguf_writer::{ALIGNMENT, GgmlType, GgufTensor, GgufWriter};
use crate::model::gguf::{GgufArch, gguf_tensor_name_for, permute_qk};
use crate::model::gguf_lora::{
    KEY_ADAPTER_TYPE, KEY_GENERAL_TYPE, KEY_LORA_ALPHA, SUFFIX_A, SUFFIX_B,
};
use crate::model::llama::LlamaConfig;
use crate::model::lora::{adapted_modules, load_peft, peft_name};

/// Writes the PEFT adapter in `adapter_dir` (over a base shaped like `base`) as an adapter GGUF
/// at `path`; `name` becomes `general.name`.
pub fn write(
    adapter_dir: &Path,
    base: &LlamaConfig,
    name: &str,
    path: &Path,
) -> Result<Vec<PathBuf>> {
    let arch = GgufArch::of_family(base.family());
    let (cfg, tensors) = load_peft(adapter_dir)?;
    let mut modules = adapted_modules(&tensors);
    if modules.is_empty() {
        bail!("the adapter in {} adapts no module", adapter_dir.display());
    }
    // llama.cpp's order: blocks in layer order, then by tensor name.
    let layer_of = |m: &str| -> usize {
        m.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX)
    };
    modules.sort_by(|a, b| (layer_of(a), a).cmp(&(layer_of(b), b)));

    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.name().into()));
    w.set(KEY_GENERAL_TYPE, Value::String("adapter".into()));
    w.set("general.name", Value::String(name.to_owned()));
    w.set("general.alignment", Value::U32(ALIGNMENT as u32));
    w.set(KEY_ADAPTER_TYPE, Value::String("lora".into()));
    w.set(KEY_LORA_ALPHA, Value::F32(cfg.alpha as f32));
    for m in &modules {
        let base_name = gguf_tensor_name_for(arch, &format!("{m}.weight"))
            .filter(|g| g != "token_embd.weight")
            .with_context(|| {
                format!(
                    "the adapter on {m} has no llama.cpp LoRA equivalent\nhint: adapt the attention and MLP projections (policy.lora.target_modules)"
                )
            })?;
        let get = |part: &str| {
            let n = peft_name(m, part);
            tensors
                .get(&n)
                .with_context(|| format!("the adapter in {} has no {n}", adapter_dir.display()))
        };
        let a = get("lora_A")?;
        let mut b = get("lora_B")?.clone();
        // B's rows are the projection's output rows: they follow the merged weight's permutation
        // (llama.cpp's `llama` only).
        if arch.permutes_qk() && base_name.ends_with(".attn_q.weight") {
            b = permute_qk(&b, base.num_attention_heads)?;
        } else if arch.permutes_qk() && base_name.ends_with(".attn_k.weight") {
            b = permute_qk(&b, base.num_kv_heads())?;
        }
        w.add_tensor(GgufTensor::encode(
            format!("{base_name}{SUFFIX_A}"),
            a,
            GgmlType::F32,
        )?);
        w.add_tensor(GgufTensor::encode(
            format!("{base_name}{SUFFIX_B}"),
            &b,
            GgmlType::F32,
        )?);
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    w.write_file(path)?;
    Ok(vec![path.to_path_buf()])
}
