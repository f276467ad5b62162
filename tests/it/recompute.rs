//! Gradient checkpointing (`policy.gradient_checkpointing`, issue #20 §3): a recomputed decoder
//! layer gives the same gradients as a layer that kept its activations, for LoRA and for full
//! fine-tuning, on the tiny Llama policy and a family with q/k norms and sandwich norms.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rlhf_bot::model::llama::{LlamaForCausalLM, load_frozen_causal_lm};
use rlhf_bot::model::lora::{self, LoraConfig, LoraInit};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Two rows of 24 tokens, the second padded by 5, every real token a target.
fn batch(vocab: usize) -> (Tensor, Tensor, Tensor) {
    let ids: Vec<Vec<u32>> = (0..2u32)
        .map(|r| {
            (0..24u32)
                .map(|i| (i * 5 + r * 11 + 1) % vocab as u32)
                .collect()
        })
        .collect();
    let mask: Vec<Vec<u32>> = vec![vec![1; 24], [vec![1; 19], vec![0; 5]].concat()];
    let dev = Device::Cpu;
    let mask = Tensor::new(mask, &dev).unwrap();
    (Tensor::new(ids, &dev).unwrap(), mask.clone(), mask)
}

/// Loss, the number of nodes its graph keeps, and the gradient of every trainable variable
/// (sorted by name), with layers recomputed or not.
fn grads(
    model: &mut LlamaForCausalLM,
    varmap: &VarMap,
    recompute: bool,
) -> (f32, usize, Vec<(String, Vec<f32>)>) {
    model.model_mut().set_gradient_checkpointing(recompute);
    let (ids, mask, targets) = batch(model.config().vocab_size);
    let loss = crate::families::masked_nll(model, &ids, Some(&mask), &targets);
    let nodes = loss.sorted_nodes().len();
    let store = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(name, var)| {
            let g = store
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name} (recompute {recompute})"));
            (name.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.to_scalar().unwrap(), nodes, out)
}

fn assert_same_gradients(what: &str, model: &mut LlamaForCausalLM, varmap: &VarMap) {
    let (loss_kept, nodes_kept, kept) = grads(model, varmap, false);
    let (loss_recomputed, nodes_recomputed, recomputed) = grads(model, varmap, true);
    assert_eq!(loss_kept, loss_recomputed, "{what}: the loss changed");
    // Recomputed, a layer is one node of the graph instead of its dozens of intermediates.
    assert!(
        nodes_recomputed * 2 < nodes_kept,
        "{what}: the graph keeps {nodes_recomputed} nodes recomputed vs {nodes_kept} kept"
    );
    assert_eq!(kept.len(), recomputed.len());
    for ((name, a), (_, b)) in kept.iter().zip(&recomputed) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let gap = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            gap <= 1e-5 * scale,
            "{what}: {name} gradient differs by {gap} (largest {scale})"
        );
    }
}

#[test]
fn recomputed_layers_give_the_gradients_of_kept_layers_with_lora() {
    for dir in [fixture("tiny-llama-policy"), fixture("families/gemma3")] {
        let mut model = load_frozen_causal_lm(&dir, &Device::Cpu).unwrap();
        let varmap = VarMap::new();
        let cfg = LoraConfig {
            dropout: 0.0,
            target_modules: rlhf_bot::config::policy::LORA_TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..LoraConfig::default()
        };
        lora::attach_lora(&mut model, &cfg, &varmap, LoraInit::Fresh { seed: 5 }).unwrap();
        // B starts at zero, which would leave A without a gradient: move it first.
        for var in varmap.all_vars() {
            let bumped = (var.as_tensor() + 0.01).unwrap();
            var.set(&bumped).unwrap();
        }
        assert_same_gradients(&format!("LoRA on {}", dir.display()), &mut model, &varmap);
    }
}

#[test]
fn recomputed_layers_give_the_gradients_of_kept_layers_in_full_fine_tuning() {
    let pre = LlamaForCausalLM::load(&fixture("tiny-llama-policy"), &Device::Cpu).unwrap();
    let mut model = pre.model;
    assert_same_gradients("full fine-tuning", &mut model, &pre.varmap);
}
