//! Training-step time of a tiny Llama: forward + backward + candle_nn AdamW, on the CPU by
//! default or on CUDA with `DEVICE=cuda` (a binary built with `--features cuda`).
//!
//! Two cases: a reward model (score head, Bradley-Terry loss over 8 pairs) and a causal LM
//! scoring the log-probs of the last 128 tokens of each row (the DPO/PPO policy step). The LM
//! case is dominated by the 49152-entry vocabulary; `fused` is the path the trainers use
//! (chunked log-softmax + gather with its own backward), `naive` materialises the logits of the
//! 128 scored positions and runs candle's generic log_softmax, for comparison.
//!
//! Run: `cargo bench --bench llama_step` (env: `STEPS`, default 3; `CASES`, default
//! `reward,lm-fused,lm-naive`; `DEVICE`, `cpu` or `cuda`, default `cpu`). Each step ends with a
//! `to_scalar` of the loss, which waits for the device, so CUDA times are not launch times.

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rlhf_bot::model::llama::{LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification};
use rlhf_bot::train::device::DeviceChoice;

const BATCH: usize = 16;
const SEQ: usize = 256;
const SCORED: usize = 128;

fn config() -> LlamaConfig {
    let mut cfg = LlamaConfig::new(49_152, 256, 768, 4, 4, 2, true);
    cfg.pad_token_id = Some(2);
    cfg
}

fn batch(dev: &Device) -> candle_core::Result<Tensor> {
    // Deterministic ids spread over the vocabulary (no padding: every row is full length).
    let mut s: u64 = 0x2545_f491_4f6c_dd1d;
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            3 + (s % 49_000) as u32
        })
        .collect();
    Tensor::from_vec(ids, (BATCH, SEQ), dev)
}

fn optimizer(varmap: &VarMap) -> candle_core::Result<AdamW> {
    AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-4,
            ..ParamsAdamW::default()
        },
    )
}

/// `-log σ(x)` computed as `log(1 + e^{-x})`, differentiable.
fn neg_log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.log()
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux; clock
/// ticks assumed to be 100 Hz, the kernel's USER_HZ). On a busy shared machine wall time
/// mostly measures the neighbours; CPU time per step stays comparable between runs.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

fn time_steps(
    name: &str,
    steps: usize,
    mut step: impl FnMut() -> candle_core::Result<f32>,
) -> candle_core::Result<()> {
    let loss = step()?; // warm-up: allocator pools, lazily built tables
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let mut last = loss;
    for _ in 0..steps {
        last = step()?;
    }
    let per = start.elapsed().as_secs_f64() / steps as f64;
    let cpu = (cpu_seconds() - cpu0) / steps as f64;
    println!(
        "{name:<10} {per:>8.3} s/step  {:>6.2} steps/s  {:>8.0} tokens/s  {cpu:>7.3} cpu-s/step  (loss {last:.4}, {steps} steps, batch {BATCH}x{SEQ})",
        1.0 / per,
        (BATCH * SEQ) as f64 / per
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    rlhf_bot::kernels::tune_allocator();
    // As the binary runs: subnormals flushed on every compute thread.
    let _ = rlhf_bot::kernels::init_compute_threads(None);
    let device: DeviceChoice = std::env::var("DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .map_err(candle_core::Error::wrap)?;
    let dev = device.open().map_err(candle_core::Error::wrap)?;
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let cases = std::env::var("CASES").unwrap_or_else(|_| "reward,lm-fused,lm-naive".into());
    let ids = batch(&dev)?;
    let mut target = vec![vec![0u32; SEQ]; BATCH];
    for row in &mut target {
        row[SEQ - SCORED..].fill(1);
    }
    let target = rlhf_bot::model::tokenizer::rows_to_tensor(&target, &dev)?;
    println!(
        "tiny Llama: 4 layers, hidden 256, ffn 768, 4 heads / 2 KV, vocab 49152, tied; device {device}; threads {}",
        candle_core::utils::get_num_threads()
    );

    for case in cases.split(',') {
        match case {
            "reward" => {
                let mut cfg = config();
                cfg.set_num_labels(1);
                let (model, varmap) = LlamaForSequenceClassification::random(&cfg, &dev)
                    .map_err(candle_core::Error::wrap)?;
                let mut opt = optimizer(&varmap)?;
                time_steps("reward", steps, || {
                    let r = model.forward(&ids, None)?.logits.squeeze(1)?;
                    let half = BATCH / 2;
                    let margin = (r.narrow(0, 0, half)? - r.narrow(0, half, half)?)?;
                    let loss = neg_log_sigmoid(&margin)?.mean_all()?;
                    opt.backward_step(&loss)?;
                    loss.to_scalar::<f32>()
                })?;
            }
            "lm-fused" => {
                let (model, varmap) =
                    LlamaForCausalLM::random(&config(), &dev).map_err(candle_core::Error::wrap)?;
                let mut opt = optimizer(&varmap)?;
                time_steps("lm-fused", steps, || {
                    let lp = model.sequence_logprobs(&ids, None, &target)?;
                    let loss = (lp.mean_all()?.neg()? / SCORED as f64)?;
                    opt.backward_step(&loss)?;
                    loss.to_scalar::<f32>()
                })?;
            }
            "lm-naive" => {
                let (model, varmap) =
                    LlamaForCausalLM::random(&config(), &dev).map_err(candle_core::Error::wrap)?;
                let mut opt = optimizer(&varmap)?;
                let targets = ids
                    .narrow(1, SEQ - SCORED, SCORED)?
                    .contiguous()?
                    .unsqueeze(2)?;
                time_steps("lm-naive", steps, || {
                    let h = model.model().forward(&ids, None)?;
                    // Positions SEQ-SCORED-1 .. SEQ-2 predict the scored tokens.
                    let h = h.narrow(1, SEQ - SCORED - 1, SCORED)?.contiguous()?;
                    let logits = h
                        .reshape((BATCH * SCORED, ()))?
                        .matmul(&model.lm_head_weight().t()?)?
                        .reshape((BATCH, SCORED, ()))?;
                    let ls = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                    let lp = ls.gather(&targets, 2)?.squeeze(2)?.sum(1)?;
                    let loss = (lp.mean_all()?.neg()? / SCORED as f64)?;
                    opt.backward_step(&loss)?;
                    loss.to_dtype(DType::F32)?.to_scalar::<f32>()
                })?;
            }
            other => eprintln!("unknown case {other:?} (known: reward, lm-fused, lm-naive)"),
        }
    }
    Ok(())
}
