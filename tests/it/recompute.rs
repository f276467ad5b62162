//! Gradient checkpointing (`policy.gradient_checkpointing`, issue #20 §3): a recomputed decoder
//! layer gives the same gradients as a layer that kept its activations, for LoRA and for full
//! fine-tuning, on the tiny Llama policy and a family with q/k norms and sandwich norms; on the
//! fused CPU kernels and on the path a CUDA run takes (candle's ops and `kernels::device_fused`,
//! forced on the CPU with `kernels::with_gpu_path`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rlhf_bot::kernels;
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

/// Which kernels a model runs on: the fused CPU kernels, or the GPU path forced on the CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
enum KernelPath {
    FusedCpu,
    Gpu,
}

impl KernelPath {
    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            KernelPath::FusedCpu => f(),
            KernelPath::Gpu => kernels::with_gpu_path(f),
        }
    }
}

/// What one backward pass saw: the loss, the nodes its graph keeps, the elements they hold
/// outside the LM head's `[rows, vocab]` tensors (views counted as copies: a measure of the
/// decoder's kept activations, not a byte count; the tiny models' 49k vocabulary would drown
/// them), and the gradient of every trainable variable (sorted by name).
struct Pass {
    loss: f32,
    nodes: usize,
    decoder_elements: usize,
    grads: Vec<(String, Vec<f32>)>,
}

/// One forward and backward pass, with layers recomputed or not, on `path`'s kernels.
fn grads(model: &mut LlamaForCausalLM, varmap: &VarMap, recompute: bool, path: KernelPath) -> Pass {
    model.model_mut().set_gradient_checkpointing(recompute);
    let vocab = model.config().vocab_size;
    let (ids, mask, targets) = batch(vocab);
    path.run(|| {
        let loss = crate::families::masked_nll(model, &ids, Some(&mask), &targets);
        let graph = loss.sorted_nodes();
        let decoder_elements = graph
            .iter()
            .filter(|t| t.dims().last() != Some(&vocab))
            .map(|t| t.elem_count())
            .sum();
        let nodes = graph.len();
        let store = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut grads: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(name, var)| {
                let g = store.get(var.as_tensor()).unwrap_or_else(|| {
                    panic!("no gradient for {name} (recompute {recompute}, {path:?})")
                });
                (name.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        Pass {
            loss: loss.to_scalar().unwrap(),
            nodes,
            decoder_elements,
            grads,
        }
    })
}

/// Every gradient of `b` within `tol` (relative to the largest of that variable) of `a`'s.
fn assert_close_gradients(
    what: &str,
    a: &[(String, Vec<f32>)],
    b: &[(String, Vec<f32>)],
    tol: f32,
) {
    assert_eq!(a.len(), b.len());
    for ((name, a), (name_b, b)) in a.iter().zip(b) {
        assert_eq!(name, name_b);
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let gap = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            gap <= tol * scale,
            "{what}: {name} gradient differs by {gap} (largest {scale})"
        );
    }
}

/// Recomputed layers give the kept layers' loss and gradients on `path` (returned: the kept
/// pass), with a graph of less than half the nodes.
fn assert_same_gradients(
    what: &str,
    model: &mut LlamaForCausalLM,
    varmap: &VarMap,
    path: KernelPath,
) -> Pass {
    let what = format!("{what}, {path:?}");
    let kept = grads(model, varmap, false, path);
    let recomputed = grads(model, varmap, true, path);
    assert_eq!(kept.loss, recomputed.loss, "{what}: the loss changed");
    // Recomputed, a layer is one node of the graph instead of its dozens of intermediates.
    assert!(
        recomputed.nodes * 2 < kept.nodes,
        "{what}: the graph keeps {} nodes recomputed vs {} kept",
        recomputed.nodes,
        kept.nodes
    );
    assert_close_gradients(&what, &kept.grads, &recomputed.grads, 1e-5);
    kept
}

/// The frozen model in `dir` with LoRA on every target, every adapter tensor moved off its
/// initial value (B starts at zero, which would leave A's gradient zero).
fn with_lora(dir: &Path) -> (LlamaForCausalLM, VarMap) {
    let mut model = load_frozen_causal_lm(dir, &Device::Cpu).unwrap();
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
    for var in varmap.all_vars() {
        let bumped = (var.as_tensor() + 0.01).unwrap();
        var.set(&bumped).unwrap();
    }
    (model, varmap)
}

#[test]
fn recomputed_layers_give_the_gradients_of_kept_layers_with_lora() {
    for dir in [fixture("tiny-llama-policy"), fixture("families/gemma3")] {
        let (mut model, varmap) = with_lora(&dir);
        let what = format!("LoRA on {}", dir.display());
        let fused = assert_same_gradients(&what, &mut model, &varmap, KernelPath::FusedCpu);
        let gpu = assert_same_gradients(&what, &mut model, &varmap, KernelPath::Gpu);
        // The GPU path really ran (its composed attention alone is more nodes than the fused
        // op) and computes the fused kernels' gradients up to rounding.
        assert!(
            gpu.nodes > fused.nodes,
            "{what}: the GPU path kept {} nodes, the fused CPU path {}",
            gpu.nodes,
            fused.nodes
        );
        assert_close_gradients(
            &format!("{what}: GPU vs fused CPU path"),
            &fused.grads,
            &gpu.grads,
            1e-4,
        );
    }
}

/// What checkpointing is for: on the GPU path (where candle keeps every intermediate of the
/// composed ops), recomputed layers leave the graph a fraction of the activations to hold.
#[test]
fn recomputed_layers_keep_a_fraction_of_the_activations_on_the_gpu_path() {
    let (mut model, varmap) = with_lora(&fixture("tiny-llama-policy"));
    let kept = grads(&mut model, &varmap, false, KernelPath::Gpu);
    let recomputed = grads(&mut model, &varmap, true, KernelPath::Gpu);
    eprintln!(
        "decoder elements kept: {} kept, {} recomputed",
        kept.decoder_elements, recomputed.decoder_elements
    );
    assert!(
        recomputed.decoder_elements * 3 < kept.decoder_elements,
        "recomputed layers keep {} elements, kept layers {}",
        recomputed.decoder_elements,
        kept.decoder_elements
    );
}

#[test]
fn recomputed_layers_give_the_gradients_of_kept_layers_in_full_fine_tuning() {
    let pre = LlamaForCausalLM::load(&fixture("tiny-llama-policy"), &Device::Cpu).unwrap();
    let mut model = pre.model;
    for path in [KernelPath::FusedCpu, KernelPath::Gpu] {
        assert_same_gradients("full fine-tuning", &mut model, &pre.varmap, path);
    }
}
