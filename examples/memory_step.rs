//! Peak memory of one policy training step, for the memory table in docs/models.md.
//!
//! Builds a decoder of a named shape with random weights (memory does not depend on the values),
//! runs one step, and prints the process's peak resident memory (`VmHWM`) after loading and
//! after the step. One configuration per process, since the peak is per process.
//!
//! - `dpo`: the reference's and the policy's log-probs of `batch` chosen + `batch` rejected rows
//!   of `len` tokens (the last half scored), DPO's loss, backward, AdamW.
//! - `grpo`: `batch` prompts of `len / 2` tokens, 4 sampled completions each of `len / 2` tokens
//!   (greedy, KV cache), then the policy's and the reference's log-probs of the 4·`batch` rows,
//!   a policy-gradient loss, backward, AdamW. The reward model's scoring is left out.
//!
//! Run: `cargo run --release --example memory_step -- SHAPE MODE PRECISION ALGO BATCH LEN
//! [recompute]`, SHAPE `135m|360m|1.7b` (SmolLM2's shapes), MODE `lora|full`, PRECISION
//! `f32|bf16` (`policy.precision`), ALGO `dpo|grpo`; `recompute` turns on
//! `policy.gradient_checkpointing`.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rlhf_bot::model::generate::{GenerationConfig, generate};
use rlhf_bot::model::llama::{LlamaConfig, LlamaForCausalLM, is_projection_weight};
use rlhf_bot::model::lora::{LoraConfig, LoraInit, attach_lora};
use rlhf_bot::train::losses::dpo::{DpoConfig, dpo_loss};
use rlhf_bot::train::optim::{AdamW, AdamWConfig};
use rlhf_bot::train::policy_common::optimiser_step;

/// SmolLM2's shapes (hidden, intermediate, layers, heads, KV heads), vocabulary 49152, tied.
fn shape(name: &str) -> anyhow::Result<LlamaConfig> {
    let (h, i, l, q, kv) = match name {
        "135m" => (576, 1536, 30, 9, 3),
        "360m" => (960, 2560, 32, 15, 5),
        "1.7b" => (2048, 8192, 24, 32, 32),
        other => anyhow::bail!("unknown shape {other:?}\nhint: 135m, 360m or 1.7b"),
    };
    let mut cfg = LlamaConfig::new(49_152, h, i, l, q, kv, true);
    cfg.pad_token_id = Some(2);
    Ok(cfg)
}

/// Random weights made as the builder asks for them, one tensor at a time, in the dtype asked
/// for: a bf16 model never exists in f32.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match h {
            Init::Const(v) => (Tensor::ones(s, DType::F32, dev)? * v)?,
            _ => Tensor::randn(0f32, 0.02, s, dev)?,
        };
        let dtype = if is_projection_weight(name) {
            dtype
        } else {
            DType::F32
        };
        t.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: random weights need a shape")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn frozen(cfg: &LlamaConfig, projections: DType) -> candle_core::Result<LlamaForCausalLM> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), projections, Device::Cpu);
    LlamaForCausalLM::new(cfg, vb)
}

/// `VmHWM` (peak resident set) of this process, in MiB.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A `[rows, len]` mask scoring the second half of each row (the completion).
fn second_halves(rows: usize, len: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<u32> = (0..rows * len)
        .map(|i| u32::from(i % len >= len / 2))
        .collect();
    Tensor::from_vec(mask, (rows, len), dev)
}

fn main() -> anyhow::Result<()> {
    rlhf_bot::kernels::tune_allocator();
    let _ = rlhf_bot::kernels::init_compute_threads(None);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape_name, mode, precision, algo, batch, len] = &args[..6] else {
        anyhow::bail!("usage: memory_step SHAPE MODE PRECISION ALGO BATCH LEN [recompute]");
    };
    let recompute = args.get(6).is_some_and(|a| a == "recompute");
    let cfg = shape(shape_name)?;
    let (batch, len): (usize, usize) = (batch.parse()?, len.parse()?);
    let projections = match precision.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => anyhow::bail!("precision {other:?}: f32 or bf16"),
    };
    let varmap = VarMap::new();
    let (mut policy, reference) = match mode.as_str() {
        "lora" => {
            let mut base = frozen(&cfg, projections)?;
            let reference = base.clone();
            let lora = LoraConfig {
                dropout: 0.0,
                target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                    .iter()
                    .chain(&["gate_proj", "up_proj", "down_proj"])
                    .map(|s| s.to_string())
                    .collect(),
                r: 16,
                ..LoraConfig::default()
            };
            attach_lora(&mut base, &lora, &varmap, LoraInit::Fresh { seed: 1 })?;
            (base, reference)
        }
        "full" => {
            let policy = LlamaForCausalLM::new(
                &cfg,
                VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            )?;
            (policy, frozen(&cfg, projections)?)
        }
        other => anyhow::bail!("mode {other:?}: lora or full"),
    };
    policy.model_mut().set_gradient_checkpointing(recompute);
    let loaded = peak_mib();
    let mut opt = AdamW::from_varmap(&varmap, AdamWConfig::default())?;
    let dev = Device::Cpu;
    let token = |i: usize| 3 + ((i * 7919) % 49_000) as u32;
    let loss = match algo.as_str() {
        "dpo" => {
            let rows = 2 * batch;
            let ids: Vec<u32> = (0..rows * len).map(token).collect();
            let ids = Tensor::from_vec(ids, (rows, len), &dev)?;
            let scored = second_halves(rows, len, &dev)?;
            let reference_logps = reference.sequence_logprobs(&ids, None, &scored)?.detach();
            let logps = policy.sequence_logprobs(&ids, None, &scored)?;
            let out = dpo_loss(
                &logps.narrow(0, 0, batch)?,
                &logps.narrow(0, batch, batch)?,
                &reference_logps.narrow(0, 0, batch)?,
                &reference_logps.narrow(0, batch, batch)?,
                &DpoConfig::default(),
            )?;
            out.loss
        }
        "grpo" => {
            let group = 4;
            let prompts: Vec<Vec<u32>> = (0..batch * group)
                .map(|r| (0..len / 2).map(|i| token(r / group * len + i)).collect())
                .collect();
            // No end-of-sequence token, so every completion runs to its full length.
            let greedy = GenerationConfig::greedy(len - len / 2, vec![], 0);
            let completions = generate(&policy, &prompts, &greedy)?.tokens;
            let rows: Vec<u32> = prompts
                .iter()
                .zip(&completions)
                .flat_map(|(p, c)| p.iter().chain(c).copied().collect::<Vec<_>>())
                .collect();
            let n = batch * group;
            let width = rows.len() / n;
            let ids = Tensor::from_vec(rows, (n, width), &dev)?;
            let scored = second_halves(n, width, &dev)?;
            let reference_logps = reference.sequence_logprobs(&ids, None, &scored)?.detach();
            let logps = policy.sequence_logprobs(&ids, None, &scored)?;
            let advantages: Vec<f32> = (0..n).map(|i| i as f32 / n as f32 - 0.5).collect();
            let advantages = Tensor::from_vec(advantages, n, &dev)?;
            let kl = (&logps - &reference_logps)?;
            ((logps * advantages)?.neg()? + (kl * 0.04)?)?.mean_all()?
        }
        other => anyhow::bail!("algo {other:?}: dpo or grpo"),
    };
    optimiser_step(&mut opt, &loss, 1, Some(1.0))?;
    println!(
        "shape {shape_name} mode {mode} precision {precision} algo {algo} batch {batch} len {len} \
         recompute {recompute}: peak after load {loaded:.0} MiB, peak after step {:.0} MiB \
         (loss {:.4})",
        peak_mib(),
        loss.to_scalar::<f32>()?
    );
    Ok(())
}
