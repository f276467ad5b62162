//! One reward-model training step of a MiniLM-size BERT: forward, backward, AdamW (CPU by
//! default; `DEVICE=cuda` on a binary built with `--features cuda`).
//!
//! Shape (GUIDE §4's benchmark): 6 layers, d 384, ffn 1536, 12 heads, vocab 30522, batch 16 x 128
//! tokens, mean pooling + score head, Bradley–Terry loss on 8 chosen/rejected pairs, no dropout.
//! Prints each step's forward, backward and optimiser seconds, then the median seconds per step
//! after warm-up and tokens per second.
//!
//! Run: `cargo bench --bench bert_step`. Knobs (environment):
//!   BENCH_THREADS (2), BENCH_STEPS (6), BENCH_WARMUP (2), BENCH_BATCH (16), BENCH_SEQ (128),
//!   BENCH_KERNELS=fused|reference, BENCH_OPT=fused|candle, BENCH_MALLOC=tuned|default,
//!   BENCH_PRECISION=f32|bf16|auto (f32: the big CPU products' precision, as `reward.precision`),
//!   DEVICE=cpu|cuda (cpu). The fused kernels and optimiser are CPU-only, so on CUDA the
//!   defaults are `reference` and `candle`; step times there are taken after a device
//!   synchronise, since CUDA kernels launch asynchronously.

use std::time::Instant;

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_nn::{Optimizer, ParamsAdamW};
use rlhf_bot::kernels::precision::{PrecisionChoice, set_precision};
use rlhf_bot::kernels::{init_compute_threads, tune_allocator};
use rlhf_bot::model::bert::{BertConfig, BertRewardModel, EncodedBatch, Kernels, RewardHeadConfig};
use rlhf_bot::train::device::DeviceChoice;
use rlhf_bot::train::optim::{AdamW, AdamWConfig};

/// One optimiser update from the gradients of a backward pass.
type StepFn = dyn FnMut(&GradStore) -> candle_core::Result<()>;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// CPU seconds (user + system, all threads) this process has used, from /proc/self/stat; `None`
/// off Linux. On a shared machine this is steadier than wall time (assuming 100 ticks/s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() -> anyhow::Result<()> {
    // cargo bench passes "--bench"; nothing else is accepted.
    let malloc = env_or("BENCH_MALLOC", "tuned");
    let tuned = malloc == "tuned" && tune_allocator();
    let threads: usize = env_or("BENCH_THREADS", "2")
        .parse()
        .context("BENCH_THREADS")?;
    let steps: usize = env_or("BENCH_STEPS", "6").parse().context("BENCH_STEPS")?;
    let warmup: usize = env_or("BENCH_WARMUP", "2")
        .parse()
        .context("BENCH_WARMUP")?;
    let device: DeviceChoice = env_or("DEVICE", "cpu").parse()?;
    let dev = device.open()?;
    let (default_kernels, default_opt) = if dev.is_cpu() {
        ("fused", "fused")
    } else {
        ("reference", "candle")
    };
    let kernels = match env_or("BENCH_KERNELS", default_kernels).as_str() {
        "fused" => Kernels::Fused,
        "reference" => Kernels::Reference,
        other => anyhow::bail!("BENCH_KERNELS={other:?}\nhint: fused or reference"),
    };
    let opt_kind = env_or("BENCH_OPT", default_opt);
    let precision = env_or("BENCH_PRECISION", "f32")
        .parse::<PrecisionChoice>()?
        .resolve("BENCH_PRECISION")?;
    set_precision(precision);
    // As the binary runs: subnormals flushed on every compute thread.
    init_compute_threads(Some(threads)).context("configuring rayon's global pool")?;

    let mut cfg = BertConfig::minilm_l6();
    cfg.hidden_dropout_prob = 0.0;
    cfg.attention_probs_dropout_prob = 0.0;
    let mut model = BertRewardModel::new_seeded(&cfg, RewardHeadConfig::default(), &dev, 0)?;
    model.encoder_mut().set_kernels(kernels);
    let vars: Vec<_> = model.named_vars().into_iter().map(|(_, v)| v).collect();
    let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let params = ParamsAdamW {
        lr: 1e-5,
        ..Default::default()
    };
    let mut opt: Box<StepFn> = match opt_kind.as_str() {
        "fused" => {
            // The optimiser `train reward` runs (its kernels: `kernels::adamw`).
            let named = model.named_vars();
            let cfg = AdamWConfig {
                lr: params.lr,
                weight_decay: params.weight_decay,
                ..AdamWConfig::default()
            };
            let mut o = AdamW::new(named, cfg)?;
            Box::new(move |grads| o.step(grads))
        }
        "candle" => {
            let mut o = candle_nn::AdamW::new(vars, params)?;
            Box::new(move |grads| o.step(grads))
        }
        other => anyhow::bail!("BENCH_OPT={other:?}\nhint: fused or candle"),
    };

    let b: usize = env_or("BENCH_BATCH", "16").parse().context("BENCH_BATCH")?;
    let t: usize = env_or("BENCH_SEQ", "128").parse().context("BENCH_SEQ")?;
    let mut state = 12345u64;
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            (0..t)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % cfg.vocab_size as u64) as u32
                })
                .collect()
        })
        .collect();
    let batch = EncodedBatch::from_ids(&rows, 0, &dev)?;

    println!(
        "bert_step: {} layers, d {}, ffn {}, heads {}, vocab {}, {} params; batch {b} x {t}; \
         device {device}; threads {threads}; kernels {kernels:?}; precision {precision}; optimiser \
         {opt_kind}; allocator {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.vocab_size,
        n_params,
        if tuned { "tuned" } else { "glibc defaults" },
    );
    let mut times = Vec::new();
    let mut cpu_times = Vec::new();
    for i in 0..warmup + steps {
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let out = model.forward(&batch, false)?;
        let half = b / 2;
        let margin = (out.score.narrow(0, 0, half)? - out.score.narrow(0, half, half)?)?;
        // Bradley–Terry: -log σ(r_chosen − r_rejected), averaged over pairs.
        let loss = candle_nn::ops::sigmoid(&margin)?.log()?.neg()?.mean_all()?;
        // A no-op on the CPU; on CUDA it waits for the queued kernels so the time is real.
        dev.synchronize()?;
        let fwd = start.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        dev.synchronize()?;
        let bwd = start.elapsed().as_secs_f64() - fwd;
        opt(&grads)?;
        drop(grads);
        dev.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        let upd = secs - fwd - bwd;
        let cpu = match (cpu0, cpu_seconds()) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        };
        let loss = loss.to_scalar::<f32>()?;
        if i >= warmup {
            times.push(secs);
            cpu_times.push(cpu);
        }
        println!(
            "step {i}{}: {secs:.3} s (forward {fwd:.3}, backward {bwd:.3}, optimiser {upd:.3}), \
             cpu {cpu:.2} s, loss {loss:.4}",
            if i < warmup { " (warm-up)" } else { "" }
        );
    }
    cpu_times.sort_by(f64::total_cmp);
    println!(
        "median cpu {:.2} s/step (user + system, all threads)",
        cpu_times[cpu_times.len() / 2]
    );
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "median {median:.3} s/step, {:.0} tokens/s (min {:.3}, max {:.3}, {} steps)",
        (b * t) as f64 / median,
        times[0],
        times[times.len() - 1],
        times.len()
    );
    Ok(())
}
