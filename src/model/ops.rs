//! Differentiable compositions for the trainable models (no custom ops: those, with their
//! backward passes, live in `crate::kernels`): RoPE tables, position ids and attention biases
//! (causal, and sliding-window) from padding masks, masked row sums.
//!
//! candle's fused kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`, the `rope*` family,
//! `sdpa`) have no backward pass: gradients stop there silently (GUIDE §4), so the models use
//! these compositions and `crate::kernels`' ops. The tests in `tests/it/llama.rs` check that
//! every parameter receives a gradient.

use candle_core::{D, DType, Device, Result, Tensor};

/// Mask value for disallowed attention logits.
///
/// A large finite negative instead of `-inf`: a query whose keys are all masked (a left-padding
/// row) then gets a uniform distribution instead of NaN, and the NaN cannot leak into gradients.
pub const MASK_VALUE: f32 = -1.0e30;

/// Inverse frequencies of the default RoPE (`1 / theta^(2i/d)`), computed in f64.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

/// `cos` and `sin` tables for the given position ids, shaped `[batch, 1, seq, head_dim]`.
///
/// Positions are per row (left padding shifts them), so the tables are built per batch row on
/// the host: they are constants, not parameters, and cost `batch·seq·head_dim` floats.
pub fn rope_tables(
    positions: &[Vec<u32>],
    inv_freq: &[f64],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    rope_tables_scaled(positions, inv_freq, 1.0, device)
}

/// [`rope_tables`] with both tables multiplied by `attention_scaling` (YaRN's and LongRoPE's
/// attention factor; transformers multiplies the f32 tables by it).
pub fn rope_tables_scaled(
    positions: &[Vec<u32>],
    inv_freq: &[f64],
    attention_scaling: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let scale = attention_scaling as f32;
    let batch = positions.len();
    let seq = positions.first().map_or(0, Vec::len);
    let half = inv_freq.len();
    let dim = 2 * half;
    let mut cos = Vec::with_capacity(batch * seq * dim);
    let mut sin = Vec::with_capacity(batch * seq * dim);
    for row in positions {
        if row.len() != seq {
            candle_core::bail!("position rows differ in length: {} vs {seq}", row.len());
        }
        for &p in row {
            // transformers concatenates the frequencies with themselves (`cat(freqs, freqs)`).
            for _ in 0..2 {
                for &f in inv_freq {
                    // HF computes the angle in f32; doing it in f64 and rounding differs by < 1 ulp.
                    let angle = (p as f64 * f) as f32;
                    cos.push(angle.cos() * scale);
                    sin.push(angle.sin() * scale);
                }
            }
        }
    }
    let cos = Tensor::from_vec(cos, (batch, 1, seq, dim), device)?;
    let sin = Tensor::from_vec(sin, (batch, 1, seq, dim), device)?;
    Ok((cos, sin))
}

/// Position ids from an attention mask: `cumsum(mask) - 1`, clamped at 0 (transformers'
/// convention for left padding). `offset` skips that many leading columns (a KV cache's past):
/// the returned rows cover columns `offset..` only.
pub fn positions_from_mask(mask: &[Vec<u32>], offset: usize) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let mut seen = 0u32;
            let all: Vec<u32> = row
                .iter()
                .map(|&m| {
                    seen += u32::from(m != 0);
                    seen.saturating_sub(1)
                })
                .collect();
            all[offset.min(all.len())..].to_vec()
        })
        .collect()
}

/// Additive attention mask `[batch, 1, q_len, k_len]`: 0 where query `i` may attend key `j`
/// (causal: `j <= offset + i`, and key `j` is not padding), [`MASK_VALUE`] elsewhere.
///
/// `mask` rows have `k_len = offset + q_len` entries (past plus current tokens).
pub fn attention_bias(mask: &[Vec<u32>], q_len: usize, device: &Device) -> Result<Tensor> {
    windowed_bias(mask, q_len, None, device)
}

/// [`attention_bias`] for a sliding-window layer: query column `c` also may not see keys at
/// columns `c - window` or earlier (transformers' `kv_idx > q_idx - sliding_window`, on mask
/// columns, so padding counts as it does there).
pub fn sliding_attention_bias(
    mask: &[Vec<u32>],
    q_len: usize,
    window: usize,
    device: &Device,
) -> Result<Tensor> {
    windowed_bias(mask, q_len, Some(window), device)
}

fn windowed_bias(
    mask: &[Vec<u32>],
    q_len: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let batch = mask.len();
    let k_len = mask.first().map_or(0, Vec::len);
    if k_len < q_len {
        candle_core::bail!("attention mask has {k_len} columns for {q_len} queries");
    }
    let offset = k_len - q_len;
    let mut bias = vec![MASK_VALUE; batch * q_len * k_len];
    for (b, row) in mask.iter().enumerate() {
        if row.len() != k_len {
            candle_core::bail!(
                "attention mask rows differ in length: {} vs {k_len}",
                row.len()
            );
        }
        for i in 0..q_len {
            let base = (b * q_len + i) * k_len;
            let first = window.map_or(0, |w| (offset + i + 1).saturating_sub(w));
            for (j, &m) in row.iter().enumerate().take(offset + i + 1).skip(first) {
                if m != 0 {
                    bias[base + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (batch, 1, q_len, k_len), device)
}

/// Sum of `values * mask` per row, for `[batch, len]` inputs; the mask is cast to the values'
/// dtype. Used to turn per-token log-probs into sequence log-probs.
pub fn masked_row_sum(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(values.dtype())?;
    (values * mask)?.sum(D::Minus1)
}

/// `true` when a tensor holds f32 values (the only dtype the trainable models use).
pub fn is_f32(t: &Tensor) -> bool {
    t.dtype() == DType::F32
}
