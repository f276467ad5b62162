//! The two kernels of a decode step in isolation, on SmolLM2-135M's shapes with random values:
//! one pass of the small-m product over every weight matrix (30 layers of q/k/v/o and
//! gate/up/down, plus the 49152-row LM head), and the cached attention of 30 layers.
//! The pass runs twice per round, alternated: the weights in f32 (`kernels::matmul_t`, the
//! streaming f32 kernel) and the same weights held in bf16 (`kernels::frozen_matmul_t`, the
//! streaming bf16 kernel that `policy.precision: bf16` decodes with), and each round prints
//! the ratio of their medians. (A bf16-held model keeps its LM head f32; here every matrix is
//! bf16, to compare the kernels alone.)
//!
//! `cargo bench --bench generate` gives tokens/s; this bench separates the weight streaming
//! (bound by memory bandwidth) from the rest, so a kernel change can be judged without the
//! noise of a whole generation. Every layer gets its own tensors, as in the model, so nothing
//! is served from cache that would not be in a real step.
//!
//! Run: `cargo bench --bench decode_kernels` (env: `ROWS`, input rows = batch size, default
//! `1,8`; `PASSES` per round, default 20; `ROUNDS` of f32 then bf16, default 3; `KEYS`, cached
//! positions, default 72).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rlhf_bot::kernels;

const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const KV_WIDTH: usize = 192;
const LAYERS: usize = 30;
const VOCAB: usize = 49152;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
/// Cache capacity per layer, as generation allocates it for a 40-token prompt.
const CACHE_CAPACITY: usize = 168;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// Milliseconds of each of `passes` runs of `work` on a rayon worker, sorted.
fn time_passes(passes: usize, work: impl Fn() -> Result<()> + Sync) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(passes);
    for _ in 0..passes {
        let t = Instant::now();
        kernels::on_worker(&work)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn report(what: &str, times: &[f64], bytes: usize) {
    let (min, median) = (times[0], times[times.len() / 2]);
    println!(
        "{what}: median {median:.2} ms (min {min:.2}); {:.1} GB/s at the median",
        bytes as f64 / median / 1e6
    );
}

fn main() -> Result<()> {
    kernels::tune_allocator();
    let _ = kernels::init_compute_threads(None);
    let dev = Device::Cpu;
    let passes = env_list("PASSES", "20")
        .first()
        .copied()
        .unwrap_or(20)
        .max(1);
    let mut weights = Vec::new();
    for _ in 0..LAYERS {
        for (n, k) in [
            (HIDDEN, HIDDEN),
            (KV_WIDTH, HIDDEN),
            (KV_WIDTH, HIDDEN),
            (HIDDEN, HIDDEN),
            (INTERMEDIATE, HIDDEN),
            (INTERMEDIATE, HIDDEN),
            (HIDDEN, INTERMEDIATE),
        ] {
            weights.push(Tensor::randn(0f32, 0.02, (n, k), &dev)?);
        }
    }
    weights.push(Tensor::randn(0f32, 0.02, (VOCAB, HIDDEN), &dev)?);
    // As a loaded model's weights are (see `GgufLlama::causal_lm`).
    kernels::collapse_into_huge_pages(weights.iter());
    let weight_bytes: usize = weights.iter().map(|w| w.elem_count() * 4).sum();

    let weights_bf16: Vec<Tensor> = weights
        .iter()
        .map(|w| w.to_dtype(DType::BF16))
        .collect::<candle_core::Result<_>>()?;
    kernels::collapse_into_huge_pages(weights_bf16.iter());
    let rounds = env_list("ROUNDS", "3").first().copied().unwrap_or(3).max(1);
    type Product = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let sides: [(&str, &[Tensor], Product, usize); 2] = [
        ("f32 ", &weights, kernels::matmul_t, weight_bytes),
        (
            "bf16",
            &weights_bf16,
            kernels::frozen_matmul_t,
            weight_bytes / 2,
        ),
    ];
    for m in env_list("ROWS", "1,8") {
        let by_width = |k: usize| Tensor::randn(0f32, 1.0, (m, k), &dev);
        let (xh, xi) = (by_width(HIDDEN)?, by_width(INTERMEDIATE)?);
        for round in 1..=rounds {
            let mut medians = Vec::new();
            for (name, side, product, bytes) in sides {
                let times = time_passes(passes, || {
                    for w in side {
                        let x = if w.dim(1)? == HIDDEN { &xh } else { &xi };
                        product(x, w)?;
                    }
                    Ok(())
                })?;
                report(
                    &format!(
                        "round {round}, {name} matvec pass over {bytes} B of weights, {m} input rows"
                    ),
                    &times,
                    bytes,
                );
                medians.push(times[times.len() / 2]);
            }
            println!(
                "round {round}, {m} input rows: bf16 pass takes {:.2}x the f32 pass's time ({:.2}x as fast)",
                medians[1] / medians[0],
                medians[0] / medians[1]
            );
        }
    }

    let keys = env_list("KEYS", "72").first().copied().unwrap_or(72);
    let batch = 8;
    let cache = |_| Tensor::randn(0f32, 1.0, (batch, KV_HEADS, CACHE_CAPACITY, HEAD_DIM), &dev);
    let layers: Vec<(Tensor, Tensor)> = (0..LAYERS)
        .map(|l| Ok((cache(l)?, cache(l)?)))
        .collect::<Result<_>>()?;
    let q = Tensor::randn(0f32, 1.0, (batch, HEADS, 1, HEAD_DIM), &dev)?;
    let times = time_passes(passes, || {
        for (k, v) in &layers {
            let op = kernels::CachedAttention {
                heads: HEADS,
                len: keys,
                scale: (HEAD_DIM as f32).sqrt().recip(),
                bias: vec![0f32; batch * keys],
            };
            q.apply_op3_no_bwd(k, v, &op)?;
        }
        Ok(())
    })?;
    let cache_bytes = LAYERS * 2 * batch * KV_HEADS * keys * HEAD_DIM * 4;
    report(
        &format!("cached attention, {LAYERS} layers, batch {batch}, {keys} keys"),
        &times,
        cache_bytes,
    );
    Ok(())
}
