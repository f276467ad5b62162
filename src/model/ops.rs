//! Differentiable building blocks for the trainable models.
//!
//! candle's fused kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`, the `rope*` family,
//! `sdpa`) have no backward pass: gradients stop there silently (GUIDE §4). Everything here is
//! written either from primitive ops that candle can differentiate, or as a `CustomOp` that
//! carries its own `bwd`, so a model assembled from these pieces trains end to end. The tests in
//! `tests/it/llama.rs` check that every parameter receives a gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, DType, Device, Layout, Result, Shape, Tensor};

/// Mask value for disallowed attention logits.
///
/// A large finite negative instead of `-inf`: a query whose keys are all masked (a left-padding
/// row) then gets a uniform distribution instead of NaN, and the NaN cannot leak into gradients.
pub const MASK_VALUE: f32 = -1.0e30;

/// RMSNorm as transformers' `LlamaRMSNorm` computes it: `w * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// transformers' `rotate_half`: `cat(-x2, x1)` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Applies rotary position embeddings in the HF layout (`x * cos + rotate_half(x) * sin`).
///
/// `x` is `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[batch, 1, seq, head_dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

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
                    cos.push(angle.cos());
                    sin.push(angle.sin());
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
            for (j, &m) in row.iter().enumerate().take(offset + i + 1) {
                if m != 0 {
                    bias[base + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (batch, 1, q_len, k_len), device)
}

/// Tunes glibc malloc for training: large freed blocks stay in the process instead of going
/// back to the OS and being page-faulted in again on the next step (GUIDE §4: 3.5 s → 2.2 s per
/// step). Call once at start-up, before any tensor is allocated. A no-op on non-glibc targets.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tunables; it takes plain integers, touches no
        // memory we own, and glibc documents it as safe to call at any time (it takes the arena
        // lock itself). The return value only reports whether the parameter was accepted.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    }
}

/// Per-row log-probability of `targets` under `softmax(hidden · weightᵀ)`, without keeping the
/// `[rows, vocab]` logits alive.
///
/// `hidden` is `[rows, d]`, `weight` is the LM head `[vocab, d]`, `targets` has one id per row.
/// The forward pass walks `chunk` rows at a time, keeps only each row's log-sum-exp, and the
/// backward pass recomputes the chunk's logits to form `softmax - onehot`. Peak memory is
/// `chunk × vocab` floats instead of several `rows × vocab` buffers; this is the step that a
/// 49k vocabulary dominates.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    let (rows, _d) = hidden.dims2()?;
    if rows != targets.len() {
        candle_core::bail!("{rows} hidden rows for {} targets", targets.len());
    }
    let vocab = weight.dim(0)?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target id {bad} is outside the vocabulary of {vocab}");
    }
    let op = LmHeadLogprobs {
        targets: targets.to_vec(),
        chunk: chunk.max(1),
        device: hidden.device().clone(),
    };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

struct LmHeadLogprobs {
    targets: Vec<u32>,
    chunk: usize,
    device: Device,
}

impl LmHeadLogprobs {
    /// Runs `f(start, len, logits_chunk)` for each chunk of rows; logits are `[len, vocab]`.
    fn for_chunks(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        mut f: impl FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let rows = hidden.dim(0)?;
        let wt = weight.t()?;
        let mut start = 0;
        while start < rows {
            let len = self.chunk.min(rows - start);
            let logits = hidden.narrow(0, start, len)?.matmul(&wt)?;
            f(start, len, logits)?;
            start += len;
        }
        Ok(())
    }

    /// Log-sum-exp per row and the logit of the target, both `[len]`.
    fn lse_and_target(
        &self,
        logits: &Tensor,
        start: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let max = logits.max_keepdim(1)?;
        let lse = logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(1)?
            .log()?
            .add(&max)?
            .squeeze(1)?;
        let idx = Tensor::from_slice(&self.targets[start..start + len], (len, 1), &self.device)?;
        let picked = logits.gather(&idx, 1)?.squeeze(1)?;
        Ok((lse, picked))
    }
}

impl CustomOp2 for LmHeadLogprobs {
    fn name(&self) -> &'static str {
        "lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The inputs arrive as raw storage; wrapping them in tensors copies them once (the
        // weight is vocab·d floats, small next to the vocab·rows logits this op avoids).
        let hidden = storage_tensor(s1, l1)?;
        let weight = storage_tensor(s2, l2)?;
        let rows = hidden.dim(0)?;
        let mut out = Vec::with_capacity(rows);
        self.for_chunks(&hidden, &weight, |start, len, logits| {
            let (lse, picked) = self.lse_and_target(&logits, start, len)?;
            out.extend(picked.sub(&lse)?.to_vec1::<f32>()?);
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d logp_r / d logits_r = onehot(target_r) - softmax(logits_r).
        let hidden = hidden.detach();
        let weight = weight.detach();
        let grad_res = grad_res.detach();
        let mut grad_hidden = Vec::new();
        let mut grad_weight: Option<Tensor> = None;
        self.for_chunks(&hidden, &weight, |start, len, logits| {
            let (lse, _) = self.lse_and_target(&logits, start, len)?;
            let g = grad_res.narrow(0, start, len)?.unsqueeze(1)?;
            let probs = logits.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
            let idx =
                Tensor::from_slice(&self.targets[start..start + len], (len, 1), &self.device)?;
            let dlogits = probs.broadcast_mul(&g.neg()?)?.scatter_add(&idx, &g, 1)?;
            grad_hidden.push(dlogits.matmul(&weight)?);
            let gw = dlogits.t()?.matmul(&hidden.narrow(0, start, len)?)?;
            grad_weight = Some(match grad_weight.take() {
                None => gw,
                Some(acc) => (acc + gw)?,
            });
            Ok(())
        })?;
        let grad_hidden = Tensor::cat(&grad_hidden, 0)?;
        Ok((Some(grad_hidden), grad_weight))
    }
}

/// Copies a (possibly strided) f32 CPU storage into a fresh contiguous tensor.
fn storage_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let data = match storage {
        CpuStorage::F32(v) => v,
        other => candle_core::bail!("lm-head-logprobs expects f32, got {:?}", other.dtype()),
    };
    let shape = layout.shape().clone();
    match layout.contiguous_offsets() {
        Some((a, b)) => Tensor::from_slice(&data[a..b], shape, &Device::Cpu),
        None => candle_core::bail!("lm-head-logprobs expects contiguous inputs"),
    }
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
