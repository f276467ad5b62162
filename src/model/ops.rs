//! Differentiable building blocks for the trainable models.
//!
//! candle's fused kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`, the `rope*` family,
//! `sdpa`) have no backward pass: gradients stop there silently (GUIDE §4). Everything here is
//! written either from primitive ops that candle can differentiate, or as a `CustomOp` that
//! carries its own `bwd`, so a model assembled from these pieces trains end to end. The tests in
//! `tests/it/llama.rs` check that every parameter receives a gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, D, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused;
use super::fused::sgemm::sgemm_threads;

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

/// [`apply_rope`] as one fused CPU op with a backward pass (the same values: every output is
/// `x·cos ± x'·sin` computed in the same order). The composed version is six graph nodes (two
/// narrows, a negation, a concatenation, two broadcast products and a sum), each a full pass over
/// the heads and each with its own backward; a rotation's backward is the inverse rotation, one
/// pass. `cos`/`sin` are constants (no gradient). Falls back to [`apply_rope`] off the CPU.
pub fn apply_rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || !is_f32(x) || !is_f32(cos) || !is_f32(sin) {
        return apply_rope(x, cos, sin);
    }
    let (b, h, t, d) = x.dims4()?;
    if cos.dims() != [b, 1, t, d] || sin.dims() != [b, 1, t, d] || d % 2 != 0 {
        candle_core::bail!(
            "rope tables {:?} / {:?} do not match input {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        );
    }
    let table = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    x.contiguous()?.apply_op1(FusedRope {
        cos: table(cos)?,
        sin: table(sin)?,
        heads: h,
        seq: t,
    })
}

struct FusedRope {
    /// `[batch, seq, head_dim]` tables, shared by every head.
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
    seq: usize,
}

impl FusedRope {
    /// Rotates every `head_dim` row of `x` (`[b, heads, seq, d]`) by its position's angles;
    /// `sign` −1 rotates back (the backward pass).
    fn rotate(&self, x: &[f32], d: usize, sign: f32) -> Vec<f32> {
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r0, block| {
            for (k, orow) in block.chunks_exact_mut(d).enumerate() {
                let r = r0 + k;
                // Row r is (batch, head, position): the tables are indexed by batch and position.
                let (bi, ti) = (r / (self.heads * self.seq), r % self.seq);
                let tab = (bi * self.seq + ti) * d;
                let (c, s) = (&self.cos[tab..tab + d], &self.sin[tab..tab + d]);
                let xr = &x[r * d..(r + 1) * d];
                for j in 0..half {
                    let (x1, x2) = (xr[j], xr[j + half]);
                    if sign > 0.0 {
                        // x·cos + rotate_half(x)·sin, rotate_half(x) = (−x2, x1).
                        orow[j] = x1 * c[j] + (-x2) * s[j];
                        orow[j + half] = x2 * c[j + half] + x1 * s[j + half];
                    } else {
                        // The transpose: dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ(z) = (z2, −z1).
                        orow[j] = x1 * c[j] + x2 * s[j + half];
                        orow[j + half] = x2 * c[j + half] + -(x1 * s[j]);
                    }
                }
            }
        });
        out
    }
}

impl candle_core::CustomOp1 for FusedRope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = fused::f32_slice(storage, layout, "fused-rope")?;
        let d = layout.shape().dims().last().copied().unwrap_or(0);
        Ok((
            CpuStorage::F32(self.rotate(x, d, 1.0)),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dim(D::Minus1)?;
        let g = grad_res.detach().contiguous()?;
        let dx = with_flat(&g, |g| Ok(self.rotate(g, d, -1.0)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `silu(gate) ⊙ up` (SwiGLU's gating) as one fused CPU op with a backward pass; candle's
/// `silu` and product are two passes forward and about six backward over `[tokens, ffn]`.
/// Uses [`fast_exp`] (relative error ~1e-7). Falls back to the composed ops off the CPU.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() || !is_f32(gate) || !is_f32(up) {
        return gate.silu()? * up;
    }
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "silu_mul: gate {:?} and up {:?} differ in shape",
            gate.shape(),
            up.shape()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

/// Elements per thread task of the elementwise SwiGLU kernels.
const SILU_BLOCK: usize = 1 << 14;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = fused::f32_slice(s1, l1, "silu-mul")?;
        let u = fused::f32_slice(s2, l2, "silu-mul")?;
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(SILU_BLOCK)
            .enumerate()
            .for_each(|(i, block)| {
                let base = i * SILU_BLOCK;
                for (k, o) in block.iter_mut().enumerate() {
                    let (x, y) = (g[base + k], u[base + k]);
                    *o = x / (1.0 + fast_exp(-x)) * y;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // With σ = sigmoid(g): d/dg [g·σ·u] = u·σ·(1 + g·(1 − σ)),  d/du = g·σ.
        let dy = grad_res.detach().contiguous()?;
        let (gate_c, up_c) = (gate.detach().contiguous()?, up.detach().contiguous()?);
        let n = gate.elem_count();
        let mut dg = vec![0f32; n];
        let mut du = vec![0f32; n];
        with_flat(&gate_c, |g| {
            with_flat(&up_c, |u| {
                with_flat(&dy, |dy| {
                    dg.par_chunks_mut(SILU_BLOCK)
                        .zip(du.par_chunks_mut(SILU_BLOCK))
                        .enumerate()
                        .for_each(|(i, (dgb, dub))| {
                            let base = i * SILU_BLOCK;
                            for (k, (a, b)) in dgb.iter_mut().zip(dub.iter_mut()).enumerate() {
                                let (x, y, d) = (g[base + k], u[base + k], dy[base + k]);
                                let sig = 1.0 / (1.0 + fast_exp(-x));
                                *a = d * y * sig * (1.0 + x * (1.0 - sig));
                                *b = d * x * sig;
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
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

/// Softmax over the last dimension as one fused CPU op with a backward pass.
///
/// candle's generic `softmax` is five graph nodes (max, sub, exp, sum, div), each a full pass
/// and, in backward, several more; this is one pass forward (`fast_exp`, threaded over rows)
/// and one backward (`dx = y ⊙ (dy − Σ dy·y)`). Falls back to the generic op off-CPU.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(FusedSoftmax)
}

struct FusedSoftmax;

impl candle_core::CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = fused::f32_slice(storage, layout, "fused-softmax")?;
        let cols = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; data.len()];
        par_rows(&mut out, cols, |r0, block| {
            for (k, orow) in block.chunks_exact_mut(cols).enumerate() {
                let row = &data[(r0 + k) * cols..(r0 + k + 1) * cols];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for (o, &x) in orow.iter_mut().zip(row) {
                    *o = fast_exp(x - max);
                    sum += *o;
                }
                let inv = 1.0 / sum;
                orow.iter_mut()
                    .for_each(|o| *o = fused::math::flush_subnormal(*o * inv));
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let shape = res.shape().clone();
        let cols = res.dim(D::Minus1)?;
        let y = res.detach().reshape(((), cols))?;
        let dy = grad_res.detach().contiguous()?.reshape(((), cols))?;
        let out = with_rows(&y, |yd, _| {
            with_rows(&dy, |dyd, _| {
                let mut out = vec![0f32; yd.len()];
                par_rows(&mut out, cols, |r0, block| {
                    for (k, orow) in block.chunks_exact_mut(cols).enumerate() {
                        let span = (r0 + k) * cols..(r0 + k + 1) * cols;
                        let (yr, dr) = (&yd[span.clone()], &dyd[span]);
                        let dot: f32 = yr.iter().zip(dr).map(|(a, b)| a * b).sum();
                        for ((o, &a), &b) in orow.iter_mut().zip(yr).zip(dr) {
                            *o = a * (b - dot);
                        }
                    }
                });
                Ok(out)
            })
        })?;
        Ok(Some(Tensor::from_vec(out, shape, res.device())?))
    }
}

/// RMSNorm (`w * x / sqrt(mean(x²) + eps)`) as one fused CPU op with a backward pass;
/// [`rms_norm`] is the same math from primitive ops (and the fallback off-CPU).
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return rms_norm(x, weight, eps);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, FusedRmsNorm { eps: eps as f32 })
}

struct FusedRmsNorm {
    eps: f32,
}

impl FusedRmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = fused::f32_slice(s1, l1, "fused-rms-norm")?;
        let w = fused::f32_slice(s2, l2, "fused-rms-norm")?;
        let cols = w.len();
        if l1.shape().dims().last() != Some(&cols) {
            candle_core::bail!(
                "rms-norm weight {:?} does not match input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, cols, |r0, block| {
            for (k, orow) in block.chunks_exact_mut(cols).enumerate() {
                let row = &x[(r0 + k) * cols..(r0 + k + 1) * cols];
                let inv = self.inv_rms(row);
                for ((o, &v), &g) in orow.iter_mut().zip(row).zip(w) {
                    *o = v * inv * g;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // With n = x·inv and g = dy·w:  dx = inv·(g − n·mean(g·n)),  dw = Σ_rows dy·n.
        let shape = x.shape().clone();
        let cols = w.dim(0)?;
        let xf = x.detach().contiguous()?.reshape(((), cols))?;
        let dyf = grad_res.detach().contiguous()?.reshape(((), cols))?;
        let wv = w.detach().to_vec1::<f32>()?;
        let threads = rayon::current_num_threads().max(1);
        let (dx, dw) = with_rows(&xf, |xd, _| {
            with_rows(&dyf, |dyd, _| {
                let rows = xd.len() / cols;
                let mut dx = vec![0f32; xd.len()];
                let per = rows.div_ceil(threads).max(1);
                let partials: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let handles: Vec<_> = dx
                        .chunks_mut(per * cols)
                        .enumerate()
                        .map(|(i, block)| {
                            let wv = &wv;
                            s.spawn(move || {
                                let mut dw = vec![0f32; cols];
                                for (k, orow) in block.chunks_exact_mut(cols).enumerate() {
                                    let span = (i * per + k) * cols..(i * per + k + 1) * cols;
                                    let (xr, dr) = (&xd[span.clone()], &dyd[span]);
                                    let inv = self.inv_rms(xr);
                                    let mut dot = 0f32;
                                    for j in 0..cols {
                                        let n = xr[j] * inv;
                                        dot += dr[j] * wv[j] * n;
                                        dw[j] += dr[j] * n;
                                    }
                                    let mean = dot / cols as f32;
                                    for j in 0..cols {
                                        let n = xr[j] * inv;
                                        orow[j] = inv * (dr[j] * wv[j] - n * mean);
                                    }
                                }
                                dw
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_default())
                        .collect()
                });
                let mut dw = vec![0f32; cols];
                for p in partials {
                    for (a, b) in dw.iter_mut().zip(p) {
                        *a += b;
                    }
                }
                Ok((dx, dw))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, shape, dev)?),
            Some(Tensor::from_vec(dw, cols, dev)?),
        ))
    }
}

/// Per-row log-probability of `targets` under `softmax(hidden · weightᵀ)`, without ever
/// holding the `[rows, vocab]` logits as a graph tensor.
///
/// `hidden` is `[rows, d]`, `weight` is the LM head `[vocab, d]`, `targets` has one id per row.
/// The forward pass walks `chunk` rows at a time and keeps each row's log-sum-exp; when a
/// gradient will be taken it also keeps the softmax (up to [`KEEP_PROBS_MAX`] floats), so the
/// backward pass forms `softmax − onehot` without recomputing the logits; above that budget the
/// backward recomputes them chunk by chunk and peak memory stays at `chunk × vocab` floats. This
/// is the step that a 49k vocabulary dominates.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    lm_head_logprobs_with_budget(hidden, weight, targets, chunk, KEEP_PROBS_MAX)
}

/// [`lm_head_logprobs`] with the softmax kept for backward only when `rows × vocab` is at most
/// `keep_probs_max` floats (0: always recompute).
pub fn lm_head_logprobs_with_budget(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    chunk: usize,
    keep_probs_max: usize,
) -> Result<Tensor> {
    let (rows, _d) = hidden.dims2()?;
    if rows != targets.len() {
        candle_core::bail!("{rows} hidden rows for {} targets", targets.len());
    }
    let vocab = weight.dim(0)?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target id {bad} is outside the vocabulary of {vocab}");
    }
    if !hidden.device().is_cpu() || hidden.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        // The fused op only has a CPU kernel; elsewhere (CUDA) candle's own ops do the work.
        return lm_head_logprobs_generic(hidden, weight, targets, chunk);
    }
    let op = LmHeadLogprobs {
        targets: targets.to_vec(),
        chunk: chunk.max(1),
        device: hidden.device().clone(),
        lse: Mutex::new(None),
        keep_probs: (hidden.track_op() || weight.track_op())
            && rows.saturating_mul(vocab) <= keep_probs_max,
        probs: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// [`lm_head_logprobs`] from candle's differentiable ops (matmul, `log_softmax`, gather), `chunk`
/// rows at a time: the path off the CPU, where the fused op has no kernel. Autograd keeps each
/// chunk's `[chunk, vocab]` logits for backward, so it needs more memory than the fused op.
pub fn lm_head_logprobs_generic(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    if rows != targets.len() {
        candle_core::bail!("{rows} hidden rows for {} targets", targets.len());
    }
    if rows == 0 {
        return Tensor::zeros(0, hidden.dtype(), hidden.device());
    }
    let chunk = chunk.max(1);
    let wt = weight.t()?;
    let ids = Tensor::from_slice(targets, (rows, 1), hidden.device())?;
    let mut parts = Vec::with_capacity(rows.div_ceil(chunk));
    let mut start = 0;
    while start < rows {
        let len = chunk.min(rows - start);
        let logits = hidden.narrow(0, start, len)?.matmul(&wt)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        parts.push(logp.gather(&ids.narrow(0, start, len)?, 1)?.squeeze(1)?);
        start += len;
    }
    Tensor::cat(&parts, 0)
}

struct LmHeadLogprobs {
    targets: Vec<u32>,
    chunk: usize,
    device: Device,
    /// Each row's log-sum-exp, written by the forward pass so the backward pass needs only
    /// one sweep over the recomputed logits instead of three.
    lse: Mutex<Option<Vec<f32>>>,
    /// Whether the forward pass keeps each chunk's softmax for the backward pass (set when a
    /// gradient will be taken and the probabilities fit [`KEEP_PROBS_MAX`]): the backward then
    /// skips recomputing the logits, a third of the head's work.
    keep_probs: bool,
    probs: Mutex<Option<Vec<Vec<f32>>>>,
}

/// Largest `rows × vocab` softmax (in floats: 512 MiB) the fused LM-head op keeps from its
/// forward pass for the backward pass; above it the logits are recomputed chunk by chunk.
pub const KEEP_PROBS_MAX: usize = 1 << 27;

impl LmHeadLogprobs {
    /// `logits = hidden[start..start+len] · weightᵀ` into `buf` (`[len, vocab]`), on candle's
    /// threads. The weight is read through swapped strides, so neither input is copied.
    fn chunk_logits(
        &self,
        hidden: &[f32],
        weight: &[f32],
        (start, len): (usize, usize),
        (vocab, d): (usize, usize),
        buf: &mut Vec<f32>,
    ) {
        buf.resize(len * vocab, 0.0);
        sgemm_threads(
            (len, vocab, d),
            buf,
            (vocab, 1),
            false,
            &hidden[start * d..(start + len) * d],
            (d, 1),
            weight,
            (1, d),
            1.0,
            candle_core::utils::get_num_threads(),
        );
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
        let hidden = fused::f32_slice(s1, l1, "lm-head-logprobs")?;
        let weight = fused::f32_slice(s2, l2, "lm-head-logprobs")?;
        let (rows, d, vocab) = lm_head_dims(l1, l2)?;
        let mut out = vec![0f32; rows];
        let mut lse = vec![0f32; rows];
        let mut logits = Vec::new();
        let mut kept = Vec::new();
        let mut start = 0;
        while start < rows {
            let len = self.chunk.min(rows - start);
            self.chunk_logits(hidden, weight, (start, len), (vocab, d), &mut logits);
            let targets = &self.targets[start..start + len];
            let picked: Vec<f32> = (0..len)
                .map(|k| logits[k * vocab + targets[k] as usize])
                .collect();
            let lse_chunk = &mut lse[start..start + len];
            if self.keep_probs {
                // One exp pass: each row becomes its softmax, kept for the backward pass.
                logits
                    .par_chunks_mut(vocab)
                    .zip(lse_chunk.par_iter_mut())
                    .for_each(|(row, l)| *l = row_softmax_in_place(row));
                kept.push(std::mem::take(&mut logits));
            } else {
                let data = &logits;
                par_rows(lse_chunk, 1, |r0, block| {
                    for (k, o) in block.iter_mut().enumerate() {
                        *o = row_logsumexp(&data[(r0 + k) * vocab..(r0 + k + 1) * vocab]);
                    }
                });
            }
            for k in 0..len {
                out[start + k] = picked[k] - lse[start + k];
            }
            start += len;
        }
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        if self.keep_probs
            && let Ok(mut slot) = self.probs.lock()
        {
            *slot = Some(kept);
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d logp_r / d logits_r = onehot(target_r) − softmax(logits_r), scaled by the incoming
        // gradient of row r. The chunk's logits are recomputed rather than kept from forward
        // (rows × vocab floats would be the largest buffer of the step), turned into dlogits in
        // place, and both products write straight into the two gradients: dW accumulates over
        // chunks inside the gemm, so no [vocab, d] temporary is allocated per chunk.
        let (rows, d) = hidden.dims2()?;
        let vocab = weight.dim(0)?;
        let grad = grad_res.detach().to_vec1::<f32>()?;
        let saved = self.lse.lock().ok().and_then(|mut s| s.take());
        let mut kept = self
            .probs
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .filter(|k| k.len() == rows.div_ceil(self.chunk))
            .map(Vec::into_iter);
        let threads = candle_core::utils::get_num_threads();
        let hidden = hidden.detach().contiguous()?;
        let weight = weight.detach().contiguous()?;
        let (grad_hidden, grad_weight) = with_flat(&hidden, |h| {
            with_flat(&weight, |w| {
                let mut gh = vec![0f32; rows * d];
                let mut gw = vec![0f32; vocab * d];
                let mut logits = Vec::new();
                let mut start = 0;
                while start < rows {
                    let len = self.chunk.min(rows - start);
                    // The chunk's softmax, kept from forward, or its logits recomputed.
                    let probs = match kept.as_mut().and_then(Iterator::next) {
                        Some(p) => {
                            logits = p;
                            true
                        }
                        None => {
                            self.chunk_logits(h, w, (start, len), (vocab, d), &mut logits);
                            false
                        }
                    };
                    let targets = &self.targets[start..start + len];
                    let g = &grad[start..start + len];
                    let lse = saved.as_ref().map(|l| &l[start..start + len]);
                    par_rows(&mut logits, vocab, |r0, block| {
                        for (k, row) in block.chunks_exact_mut(vocab).enumerate() {
                            let r = r0 + k;
                            let scale = -g[r];
                            if probs {
                                row.iter_mut().for_each(|x| *x *= scale);
                            } else {
                                let l = match lse {
                                    Some(l) => l[r],
                                    None => row_logsumexp(row),
                                };
                                for x in row.iter_mut() {
                                    *x = scale * fast_exp(*x - l);
                                }
                            }
                            row[targets[r] as usize] += g[r];
                        }
                    });
                    // grad_hidden rows = dlogits · W.
                    sgemm_threads(
                        (len, d, vocab),
                        &mut gh[start * d..(start + len) * d],
                        (d, 1),
                        false,
                        &logits,
                        (vocab, 1),
                        w,
                        (d, 1),
                        1.0,
                        threads,
                    );
                    // grad_weight += dlogitsᵀ · hidden rows.
                    sgemm_threads(
                        (vocab, d, len),
                        &mut gw,
                        (d, 1),
                        start > 0,
                        &logits,
                        (1, vocab),
                        &h[start * d..(start + len) * d],
                        (d, 1),
                        1.0,
                        threads,
                    );
                    start += len;
                }
                Ok((gh, gw))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(grad_hidden, (rows, d), &self.device)?),
            Some(Tensor::from_vec(grad_weight, (vocab, d), &self.device)?),
        ))
    }
}

/// `(rows, d, vocab)` of the fused LM-head op's inputs, checked against each other.
fn lm_head_dims(hidden: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
    let (&[rows, d], &[vocab, dw]) = (hidden.dims(), weight.dims()) else {
        candle_core::bail!(
            "lm-head-logprobs expects [rows, d] hidden and [vocab, d] weight, got {:?} and {:?}",
            hidden.dims(),
            weight.dims()
        );
    };
    if d != dw {
        candle_core::bail!("lm-head-logprobs: hidden width {d} but weight width {dw}");
    }
    Ok((rows, d, vocab))
}

/// Calls `f` with the contiguous f32 data of a CPU tensor of any rank.
fn with_flat<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(fused::f32_slice(cpu, layout, "lm-head-logprobs")?),
        _ => candle_core::bail!("the fused LM-head op runs on CPU only"),
    }
}

/// Calls `f(data, cols)` with the contiguous f32 data of a 2-D CPU tensor.
fn with_rows<T>(t: &Tensor, f: impl FnOnce(&[f32], usize) -> Result<T>) -> Result<T> {
    let cols = t.dim(1)?;
    let (storage, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(&cpu.as_slice::<f32>()?[a..b], cols),
        _ => candle_core::bail!("the fused LM-head op runs on CPU only"),
    }
}

/// Splits `out` (rows of `width` values) into blocks of whole rows and runs
/// `f(first_row, block)` on each, in parallel on rayon's pool.
///
/// Outputs under [`PAR_MIN_FLOATS`] run on the calling thread: a decode step normalises and
/// soft-maxes a few hundred floats per call, sixty times per token, where waking another thread
/// costs more than the work. Larger ones are split into one block per rayon thread. (The thread
/// count comes from rayon, not `candle_core::utils::get_num_threads`, which re-reads
/// `/proc/cpuinfo` on every call unless `RAYON_NUM_THREADS` is set: ~80 µs here.)
fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    let threads = if out.len() < PAR_MIN_FLOATS {
        1
    } else {
        rayon::current_num_threads().clamp(1, rows.max(1))
    };
    let per = rows.div_ceil(threads).max(1);
    if threads == 1 {
        f(0, out);
        return;
    }
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(i, block)| f(i * per, block));
}

/// Smallest output (in floats) that [`par_rows`] splits over threads.
const PAR_MIN_FLOATS: usize = 1 << 14;

/// `log Σ exp(x)` of one row, with 8 independent accumulators so the loops vectorise.
fn row_logsumexp(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks.clone() {
        for i in 0..8 {
            m[i] = m[i].max(c[i]);
        }
    }
    let max = tail.iter().fold(
        m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        |a, &b| a.max(b),
    );
    let mut s = [0f32; 8];
    for c in chunks {
        for i in 0..8 {
            s[i] += fast_exp(c[i] - max);
        }
    }
    let sum: f32 = s.iter().sum::<f32>() + tail.iter().map(|&x| fast_exp(x - max)).sum::<f32>();
    max + sum.ln()
}

/// Replaces `row` by its softmax (`exp(x − lse)`, as the backward pass would recompute it) and
/// returns its log-sum-exp; one exp pass where [`row_logsumexp`] plus a softmax take two.
fn row_softmax_in_place(row: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in chunks.by_ref() {
        for i in 0..8 {
            m[i] = m[i].max(c[i]);
        }
    }
    let max = chunks.remainder().iter().fold(
        m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        |a, &b| a.max(b),
    );
    let mut s = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in chunks.by_ref() {
        for i in 0..8 {
            c[i] = fast_exp(c[i] - max);
            s[i] += c[i];
        }
    }
    let mut sum: f32 = s.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// `e^x` in f32 without a libm call, so loops over it vectorise (libm's `expf` is scalar; a
/// 49k-vocabulary softmax spends most of its time there): the fused kernels' implementation,
/// under the name this module's callers use.
pub use super::fused::math::exp as fast_exp;

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
