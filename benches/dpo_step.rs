//! DPO step time of a tiny Llama, as the issue defines it: the reference model's forward pass
//! (no graph), the policy's forward pass, DPO's sigmoid loss, backward and AdamW, over 8 chosen
//! + 8 rejected sequences of 256 tokens whose last 128 are the completion.
//!
//! The reference model is built from plain tensors (as the trainer's frozen reference is), so
//! its forward pass records no backward graph.
//!
//! The step is built from the same library pieces the DPO trainer uses
//! (`LlamaForCausalLM::sequence_logprobs` with its fused log-softmax + gather, `dpo_loss`,
//! `policy_common::optimiser_step` with the project's AdamW and gradient clipping). The trainer
//! itself computes reference log-probs once per dataset; here they are recomputed every step, so
//! the number is comparable with a framework that runs the reference each step.
//!
//! Model: 4 layers, hidden 256, intermediate 768, 4 heads / 2 KV heads, vocabulary 49152 (the
//! SmolLM2 size), tied embeddings, random init, f32, on the CPU, or on CUDA with `DEVICE=cuda`
//! (a `--features cuda` build; each step ends by reading the loss back, which synchronises).
//!
//! Run: `cargo bench --bench dpo_step` (env: `STEPS`, default 5; `DEVICE`, default cpu).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rlhf_bot::model::llama::{LlamaConfig, LlamaForCausalLM};
use rlhf_bot::train::losses::dpo::{DpoConfig, dpo_loss};
use rlhf_bot::train::optim::{AdamW, AdamWConfig};
use rlhf_bot::train::policy_common::optimiser_step;

const PAIRS: usize = 8;
const SEQ: usize = 256;
const COMPLETION: usize = 128;

fn config() -> LlamaConfig {
    let mut cfg = LlamaConfig::new(49_152, 256, 768, 4, 4, 2, true);
    cfg.pad_token_id = Some(2);
    cfg
}

/// Deterministic token ids spread over the vocabulary; rows 0..8 are "chosen", 8..16 "rejected"
/// (each pair shares its 128-token prompt, as real pairs do).
fn inputs(dev: &Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let mut s: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        3 + (s % 49_000) as u32
    };
    let prompts: Vec<Vec<u32>> = (0..PAIRS)
        .map(|_| (0..SEQ - COMPLETION).map(|_| next()).collect())
        .collect();
    let mut ids = Vec::with_capacity(2 * PAIRS * SEQ);
    for _side in 0..2 {
        for p in &prompts {
            ids.extend_from_slice(p);
            ids.extend((0..COMPLETION).map(|_| next()));
        }
    }
    let rows = 2 * PAIRS;
    let attention = Tensor::ones((rows, SEQ), candle_core::DType::U32, dev)?;
    let completion: Vec<u32> = (0..rows * SEQ)
        .map(|i| u32::from(i % SEQ >= SEQ - COMPLETION))
        .collect();
    Ok((
        Tensor::from_vec(ids, (rows, SEQ), dev)?,
        attention,
        Tensor::from_vec(completion, (rows, SEQ), dev)?,
    ))
}

fn main() -> anyhow::Result<()> {
    rlhf_bot::kernels::tune_allocator();
    // As the binary runs: subnormals flushed on every compute thread.
    let _ = rlhf_bot::kernels::init_compute_threads(None);
    let dev = rlhf_bot::train::device::DeviceChoice::open_from_env("DEVICE")?;
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // The reference is frozen, as the trainer's is (`load_frozen_causal_lm`, or the LoRA base):
    // plain tensors, not variables, so its forward pass records no graph for backward.
    let (_, reference_vars) = LlamaForCausalLM::random(&config(), &dev)?;
    let frozen: HashMap<String, Tensor> = reference_vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let reference = LlamaForCausalLM::new(
        &config(),
        VarBuilder::from_tensors(frozen, DType::F32, &dev),
    )?;
    let (policy, varmap) = LlamaForCausalLM::random(&config(), &dev)?;
    let mut opt = AdamW::from_varmap(
        &varmap,
        AdamWConfig {
            lr: 5e-6,
            ..AdamWConfig::default()
        },
    )?;
    let dpo = DpoConfig::default();
    let (ids, attention, completion) = inputs(&dev)?;
    println!(
        "DPO step, tiny Llama (4 layers, hidden 256, ffn 768, 4 heads / 2 KV, vocab 49152, tied): \
         {PAIRS} chosen + {PAIRS} rejected x {SEQ} tokens, last {COMPLETION} scored; threads {}",
        candle_core::utils::get_num_threads()
    );
    let mut step = |n: u64| -> anyhow::Result<f32> {
        let reference_logps = reference
            .sequence_logprobs(&ids, Some(&attention), &completion)?
            .detach();
        let logps = policy.sequence_logprobs(&ids, Some(&attention), &completion)?;
        let out = dpo_loss(
            &logps.narrow(0, 0, PAIRS)?,
            &logps.narrow(0, PAIRS, PAIRS)?,
            &reference_logps.narrow(0, 0, PAIRS)?,
            &reference_logps.narrow(0, PAIRS, PAIRS)?,
            &dpo,
        )?;
        optimiser_step(&mut opt, &out.loss, n, Some(1.0))?;
        Ok(out.loss.to_scalar::<f32>()?)
    };
    step(0)?; // warm-up: allocator pools and lazily built tables
    let mut times = Vec::with_capacity(steps);
    let mut loss = 0.0;
    for n in 1..=steps as u64 {
        let start = Instant::now();
        loss = step(n)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "dpo step   median {median:.3} s  (min {:.3}, max {:.3}; {steps} steps; {:.0} tokens/s; last loss {loss:.4})",
        times[0],
        times[times.len() - 1],
        (2 * PAIRS * SEQ) as f64 / median
    );
    Ok(())
}
