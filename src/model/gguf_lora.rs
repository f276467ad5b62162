//! llama.cpp's LoRA adapter GGUF (`llama-cli --lora FILE`, `llama_adapter_lora_init`): the
//! vocabulary of the format and its reader. The writer is `model::export::lora_gguf`.
//!
//! The file is what llama.cpp's `convert_lora_to_gguf.py` writes: `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, `general.architecture` of the base (llama.cpp
//! refuses an adapter whose architecture differs from the model's), and per adapted projection
//! two tensors named after the base tensor, `blk.N.attn_q.weight.lora_a` (PEFT's A, `[r, in]`)
//! and `.lora_b` (PEFT's B, `[out, r]`), in the architecture's tensor names (`model::gguf`'s
//! table, shared with the full-model export). llama.cpp's `llama` rotates Q/K in its interleaved
//! layout, so for it the export permutes the rows of Q/K's B the way the merged weight's rows are
//! permuted (A multiplies the input and keeps its order); the reader undoes it. The rank is
//! the tensors' inner dimension and the scale `alpha / r`, as in PEFT. Head counts are not in
//! the file: they come from the base the adapter applies to.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};

use crate::model::gguf::{GgufArch, get_str, hf_tensor_name_for, opt_f64, unpermute_qk};
use crate::model::llama::LlamaConfig;
use crate::model::lora::{LoraConfig, peft_name};

pub const KEY_GENERAL_TYPE: &str = "general.type";
pub const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub const KEY_LORA_ALPHA: &str = "adapter.lora.alpha";
/// Suffixes appended to the base tensor's name (`blk.0.attn_q.weight.lora_a`).
pub const SUFFIX_A: &str = ".lora_a";
pub const SUFFIX_B: &str = ".lora_b";

/// Reads a LoRA adapter GGUF back into PEFT form (config and `base_model.model.….lora_A.weight`
/// tensors, f32, HF row order) for the base described by `base`.
pub fn read(path: &Path, base: &LlamaConfig) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("parsing the GGUF header of {}", path.display()))?;
    let md = &content.metadata;
    let arch = GgufArch::of_family(base.family());
    for (key, want) in [
        (KEY_GENERAL_TYPE, "adapter"),
        (KEY_ADAPTER_TYPE, "lora"),
        ("general.architecture", arch.name()),
    ] {
        let found = get_str(md, key)?;
        if found != want {
            bail!(
                "{} has {key} = {found:?}, not {want:?}\nhint: pass a LoRA adapter GGUF made for this base (`export-model --to gguf-lora`), whose llama.cpp architecture is {:?}",
                path.display(),
                arch.name()
            );
        }
    }
    let alpha = opt_f64(md, KEY_LORA_ALPHA)?
        .with_context(|| format!("{} has no {KEY_LORA_ALPHA}", path.display()))?;
    let mut tensors = HashMap::new();
    let mut rank = None;
    let mut targets = std::collections::BTreeSet::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let (base_name, part) = if let Some(b) = name.strip_suffix(SUFFIX_A) {
            (b, "lora_A")
        } else if let Some(b) = name.strip_suffix(SUFFIX_B) {
            (b, "lora_B")
        } else {
            bail!(
                "{} holds tensor {name}, which is neither {SUFFIX_A} nor {SUFFIX_B}",
                path.display()
            );
        };
        let hf = hf_tensor_name_for(arch, base_name)?;
        let module = hf
            .strip_suffix(".weight")
            .with_context(|| format!("{name} adapts {hf}, not a weight"))?;
        let mut t = content
            .tensor(&mut reader, name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        if part == "lora_B" && arch.permutes_qk() {
            if base_name.ends_with(".attn_q.weight") {
                t = unpermute_qk(&t, base.num_attention_heads)?;
            } else if base_name.ends_with(".attn_k.weight") {
                t = unpermute_qk(&t, base.num_kv_heads())?;
            }
        }
        let r = if part == "lora_A" {
            t.dim(0)?
        } else {
            t.dim(1)?
        };
        if *rank.get_or_insert(r) != r {
            bail!("{} mixes LoRA ranks ({r} in {name})", path.display());
        }
        if let Some(last) = module.rsplit('.').next() {
            targets.insert(last.to_owned());
        }
        tensors.insert(peft_name(module, part), t);
    }
    let r = rank.with_context(|| format!("{} holds no LoRA tensors", path.display()))?;
    let cfg = LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        target_modules: targets.into_iter().collect(),
        base_model: match md.get("general.name") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        },
    };
    cfg.validate()?;
    Ok((cfg, tensors))
}
