//! Every custom CPU kernel of the project, each a candle custom op with its own backward pass,
//! plus the process tuning that goes with them (allocator, subnormal flushing, compute threads)
//! and the optimiser's kernels. These exist for speed: candle's generic versions of the same
//! maths make a BERT training step several times slower than PyTorch on CPU (GUIDE §4).
//!
//! Layout: one file per op family (`activation`, `norm`, `softmax`, `rope`, `linear`, `attention`,
//! `causal_attention`, `cached_attention`, `layer`, `lm_head`, `matvec`, `adamw`), one set of CPU
//! helpers (`cpu`: borrowing f32 data, the one row splitter), one math file (`math`: exp, GELU,
//! the row softmax and log-sum-exp), the run-time choice of instruction set for the element-wise
//! loops (`isa`), recycled activation buffers (`scratch`), the bf16 gemm
//! (`bf16_gemm`) and the switch that sends the big products to it (`precision`), and the
//! streaming decode product of a weight held in bf16 (`bf16_matvec`, reached through `frozen`).
//! The kernels import nothing from `model` or `train`; models and trainers call the public
//! functions here.
//!
//! Every public function checks whether its inputs are f32 tensors on the CPU; if not, it runs the
//! unfused reference composition from [`reference`] instead, so callers never need two code paths.
//! The exceptions on a GPU: softmax, RMSNorm, layer norm, RoPE and SwiGLU's gating run candle's
//! fused GPU kernels forward with a backward composed in [`device_fused`].
//! Tests compare each fused op's forward and backward with its [`reference`] twin.

mod activation;
pub mod adamw;
pub mod alloc;
mod attention;
pub mod bf16_gemm;
mod bf16_matvec;
mod cached_attention;
mod causal_attention;
pub(crate) mod cpu;
pub mod device_fused;
mod frozen;
pub(crate) mod isa;
mod layer;
mod linear;
mod lm_head;
pub mod math;
mod matvec;
mod norm;
pub mod precision;
mod rope;
mod scratch;
pub(crate) mod sgemm;
mod softmax;
pub mod threads;

use std::sync::Mutex;

use candle_core::{D, DType, Result, Tensor, bail};

pub use alloc::{collapse_into_huge_pages, tune_allocator};
pub use cached_attention::CachedAttention;
pub use cpu::on_worker;
pub use frozen::frozen_matmul_t;
pub use lm_head::KEEP_PROBS_MAX;
pub use threads::{flush_denormals_on_this_thread, init_compute_threads};

fn fusable(ts: &[&Tensor]) -> bool {
    !gpu_path_forced()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether every tensor is a float tensor on a GPU (candle-nn's fused kernels take f32, f16 and
/// bf16 there), or on the CPU inside [`with_gpu_path`] (candle-nn has CPU versions of them).
fn on_gpu(ts: &[&Tensor]) -> bool {
    let forced = gpu_path_forced();
    ts.iter().all(|t| {
        (forced || !t.device().is_cpu())
            && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
    })
}

thread_local! {
    /// Set inside [`with_gpu_path`]: this thread's kernel calls take the GPU path on the CPU.
    static GPU_PATH_FORCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn gpu_path_forced() -> bool {
    GPU_PATH_FORCED.with(std::cell::Cell::get)
}

/// Runs `f` with every kernel call made on this thread taking the path a CUDA run takes
/// (candle's ops and [`device_fused`], none of the fused CPU kernels), so tests can check that
/// path on the CPU with whole models, gradient checkpointing included. Per thread, so tests
/// running beside each other are not affected; the previous state comes back when `f` returns
/// or panics.
pub fn with_gpu_path<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GPU_PATH_FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(GPU_PATH_FORCED.with(|c| c.replace(true)));
    f()
}

/// Whether these tensors take the GPU path: candle's fused GPU kernels with a composed
/// backward ([`device_fused`]). For models that choose between kernel families themselves
/// (BERT's `Kernels::Reference` is what a GPU runs).
pub fn on_gpu_path(ts: &[&Tensor]) -> bool {
    on_gpu(ts)
}

/// `x · wᵀ` for a 2-D `x` `[m, k]` and a weight `w` `[n, k]`, as linear layers and the LM head
/// multiply.
///
/// With few rows (m ≤ [`matvec::MAX_ROWS`]: a decode step), f32 CPU tensors and a contiguous
/// weight, this runs the streaming kernel of [`matvec`], which reads each weight row once
/// instead of packing the whole matrix as the blocked gemm does; everything else (training
/// batches, other devices or dtypes, strided weights) is candle's matmul. Both record a
/// backward. Off the CPU, with `policy.precision: bf16`, the product runs in bf16 (autocast).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let small = x.rank() == 2
        && w.rank() == 2
        && x.dim(0)? <= matvec::MAX_ROWS
        && w.is_contiguous()
        && fusable(&[x, w]);
    if small {
        return matvec::matmul_wt(x, w);
    }
    let compute = frozen::autocast_dtype(x, w);
    if compute == x.dtype() && compute == w.dtype() {
        return x.matmul(&w.t()?);
    }
    // bf16 autocast off the CPU: both operands rounded for the product (their gradients flow
    // back through the casts to the f32 master weights), the result widened again.
    x.to_dtype(compute)?
        .matmul(&w.to_dtype(compute)?.t()?)?
        .to_dtype(x.dtype())
}

/// `x + b` over the last dimension.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, b]) {
        return reference::bias_add(x, b);
    }
    x.contiguous()?
        .apply_op2(&b.contiguous()?, activation::BiasAdd)
}

/// `x·Wᵀ + b` for `x` of any rank (`[.., in]`), with `w` `[out, in]` and `b` `[out]`, as one op
/// (bias folded into the gemm; backward writes dx, dW and db directly).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, w, b]) {
        return reference::linear(x, w, b);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        linear::LinearOp::new(false),
    )
}

/// `x·Wᵀ` (no bias) for `x` of any rank (`[.., in]`) and `w` `[out, in]`, as one op whose
/// backward writes `dW` in place and skips the gradient of an input outside the graph (a frozen
/// weight). CPU f32 only: callers check [`fusable_all`] and keep candle's matmul elsewhere.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, w]) {
        bail!("fused matmul runs on f32 CPU tensors only");
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, linear::MatmulWtOp)
}

/// `gelu_erf(x·Wᵀ + b)` as one op (HF's `gelu` feed-forward).
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, w, b]) {
        return reference::linear(x, w, b)?.gelu_erf();
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        linear::LinearOp::new(true),
    )
}

/// `gelu_erf(x + b)` over the last dimension (HF's `gelu`).
pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, b]) {
        return reference::bias_gelu(x, b);
    }
    x.contiguous()?
        .apply_op2(&b.contiguous()?, activation::BiasGelu)
}

/// Layer norm over the last dimension: `(x − μ)/√(σ² + eps) · w + b`; on a GPU, candle's
/// fused kernel with a composed backward ([`device_fused::layer_norm`]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if on_gpu(&[x, w, b]) {
        return device_fused::layer_norm(x, w, b, eps);
    }
    if !fusable(&[x, w, b]) {
        return reference::layer_norm(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        norm::LayerNormOp::new(eps),
    )
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if on_gpu(&[x]) {
        return device_fused::softmax_last_dim(x);
    }
    if !fusable(&[x]) {
        return reference::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(softmax::SoftmaxLastDim)
}

/// Multi-head attention core on `[b, t, heads·d]` projections:
/// `softmax(Q_h K_hᵀ · scale + mask_bias) V_h` per head, concatenated back to `[b, t, heads·d]`.
/// `mask_bias` is `[b, t]`, added to every query's scores for that key. Gradients flow to q, k
/// and v (the mask is a constant).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    if !fusable(&[q, k, v, mask_bias]) {
        return reference::attention(q, k, v, mask_bias, heads, scale);
    }
    let mask = mask_bias.detach().flatten_all()?.to_vec1::<f32>()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        attention::AttentionOp::new(heads, scale, mask),
    )
}

/// The sixteen parameters of one post-norm BERT encoder layer, each `[weight, bias]` with HF's
/// shapes (`[out, in]` weights).
#[derive(Debug, Clone, Copy)]
pub struct EncoderLayerParams<'a> {
    pub query: [&'a Tensor; 2],
    pub key: [&'a Tensor; 2],
    pub value: [&'a Tensor; 2],
    pub attn_out: [&'a Tensor; 2],
    pub attn_norm: [&'a Tensor; 2],
    pub intermediate: [&'a Tensor; 2],
    pub output: [&'a Tensor; 2],
    pub out_norm: [&'a Tensor; 2],
}

impl<'a> EncoderLayerParams<'a> {
    /// The tensors in the order of the fused op's flat parameter vector (Q/K/V weights first,
    /// then their biases, so the three projections form one matrix).
    fn in_order(&self) -> [&'a Tensor; layer::PARTS] {
        let [qw, qb] = self.query;
        let [kw, kb] = self.key;
        let [vw, vb] = self.value;
        let [ow, ob] = self.attn_out;
        let [n1w, n1b] = self.attn_norm;
        let [iw, ib] = self.intermediate;
        let [o2w, o2b] = self.output;
        let [n2w, n2b] = self.out_norm;
        [
            qw, kw, vw, qb, kb, vb, ow, ob, n1w, n1b, iw, ib, o2w, o2b, n2w, n2b,
        ]
    }
}

/// One post-norm BERT encoder layer with GELU (erf) and no dropout, on `x` `[b, t, h]`:
/// `x1 = LN(attn(x)·W_oᵀ + b_o + x)`, `y = LN(gelu(x1·W_iᵀ + b_i)·W_o2ᵀ + b_o2 + x1)`, with
/// `mask_bias` `[b, t]` added to every query's attention scores for that key. As one op: a
/// single backward node for the whole layer (see `layer.rs`).
pub fn encoder_layer(
    x: &Tensor,
    p: &EncoderLayerParams,
    mask_bias: &Tensor,
    heads: usize,
    eps: f32,
) -> Result<Tensor> {
    let parts = p.in_order();
    let mut all: Vec<&Tensor> = vec![x, mask_bias];
    all.extend(parts);
    if !fusable(&all) {
        return reference::encoder_layer(x, p, mask_bias, heads, eps);
    }
    let (_, _, h) = x.dims3()?;
    let ffn = p.intermediate[1].elem_count();
    for (t, want) in parts.iter().zip(layer::part_sizes(h, ffn)) {
        if t.elem_count() != want {
            bail!(
                "fused encoder layer: a parameter has shape {:?}, expected {want} entries for \
                 hidden {h} and feed-forward {ffn}",
                t.dims()
            );
        }
    }
    let flat = parts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let mask = mask_bias.detach().flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?
        .apply_op2(&packed, layer::EncoderLayerOp::new(heads, ffn, eps, mask))
}

/// The decoder's attention core with grouped KV heads: `softmax(Q_h K_{h/rep}ᵀ · scale + bias) V`
/// for `q` `[b, heads, tq, d]`, `k`/`v` `[b, kv_heads, tk, d]` and an additive `bias`
/// `[b, 1, tq, tk]` (causal and padding mask; a constant), returned as `[b, tq, heads·d]`.
/// CPU f32 only: callers keep their composed version for other devices (see `fusable_all`).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    if !fusable(&[q, k, v, bias]) {
        bail!("fused causal attention runs on f32 CPU tensors only");
    }
    let (b, _, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    if bias.dims() != [b, 1, tq, tk] {
        bail!(
            "fused causal attention: mask {:?} is not [{b}, 1, {tq}, {tk}]",
            bias.dims()
        );
    }
    let bias = bias.detach().flatten_all()?.to_vec1::<f32>()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        causal_attention::CausalAttentionOp::new(scale, bias),
    )
}

/// [`reference::apply_rope`] as one fused CPU op with a backward pass (the same values: every output is
/// `x·cos ± x'·sin` computed in the same order). The composed version is six graph nodes (two
/// narrows, a negation, a concatenation, two broadcast products and a sum), each a full pass over
/// the heads and each with its own backward; a rotation's backward is the inverse rotation, one
/// pass. `cos`/`sin` are constants (no gradient). On a GPU, candle's fused `rope` kernel with the
/// inverse rotation as backward ([`device_fused::rope`]); the reference for other dtypes.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if on_gpu(&[x]) {
        return device_fused::rope(x, cos, sin);
    }
    if !fusable(&[x, cos, sin]) {
        return reference::apply_rope(x, cos, sin);
    }
    let (_b, h, t, _d) = rope_dims(x, cos, sin)?;
    let table = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    x.contiguous()?.apply_op1(rope::RopeOp {
        cos: table(cos)?,
        sin: table(sin)?,
        heads: h,
        seq: t,
    })
}

/// `[batch, heads, seq, head_dim]` of a RoPE input, checked against its tables' shape
/// `[batch, 1, seq, head_dim]` (an even `head_dim`), as both RoPE kernels need them.
fn rope_dims(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (b, h, t, d) = x.dims4()?;
    if cos.dims() != [b, 1, t, d] || sin.dims() != [b, 1, t, d] || d % 2 != 0 {
        candle_core::bail!(
            "rope tables {:?} / {:?} do not match input {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        );
    }
    Ok((b, h, t, d))
}

/// Fails unless SwiGLU's `gate` and `up` have one shape, as both gating kernels need.
fn same_gating_shape(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "silu_mul: gate {:?} and up {:?} differ in shape",
            gate.shape(),
            up.shape()
        );
    }
    Ok(())
}

/// `silu(gate) ⊙ up` (SwiGLU's gating) as one fused CPU op with a backward pass; candle's
/// `silu` and product are two passes forward and about six backward over `[tokens, ffn]`.
/// Uses [`math::exp`] (relative error ~1e-7). On a GPU, [`device_fused::silu_mul`]; the
/// composed ops for other dtypes.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if on_gpu(&[gate, up]) {
        return device_fused::silu_mul(gate, up);
    }
    if !fusable(&[gate, up]) {
        return reference::silu_mul(gate, up);
    }
    same_gating_shape(gate, up)?;
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, activation::SiluMul)
}

/// RMSNorm (`w * x / sqrt(mean(x²) + eps)`) as one fused CPU op with a backward pass;
/// [`reference::rms_norm`] is the same math from primitive ops (the fallback for other dtypes
/// on the CPU); on a GPU, candle's fused kernel with a composed backward ([`device_fused`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if on_gpu(&[x, weight]) {
        return device_fused::rms_norm(x, weight, eps);
    }
    if !fusable(&[x, weight]) {
        return reference::rms_norm(x, weight, eps);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, norm::RmsNormOp { eps: eps as f32 })
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
    if !fusable(&[hidden, weight]) {
        // The fused op only has a CPU kernel; elsewhere (CUDA) candle's own ops do the work.
        return reference::lm_head_logprobs(hidden, weight, targets, chunk);
    }
    let op = lm_head::LmHeadLogprobs {
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

/// Whether every tensor is f32 on the CPU (the fused kernels' domain).
pub fn fusable_all(ts: &[&Tensor]) -> bool {
    fusable(ts)
}

/// The unfused compositions of candle ops that the fused kernels replace: the specification the
/// fused ops are tested against and the fallback off the CPU.
pub mod reference {
    use super::*;

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

    /// Rotary position embeddings in the HF layout (`x * cos + rotate_half(x) * sin`); `x` is
    /// `[batch, heads, seq, head_dim]`, `cos`/`sin` are `[batch, 1, seq, head_dim]`.
    pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
    }

    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// [`super::lm_head_logprobs`] from candle's differentiable ops (matmul, `log_softmax`, gather), `chunk`
    /// rows at a time: the path off the CPU, where the fused op has no kernel. Autograd keeps each
    /// chunk's `[chunk, vocab]` logits for backward, so it needs more memory than the fused op.
    pub fn lm_head_logprobs(
        hidden: &Tensor,
        weight: &Tensor,
        targets: &[u32],
        chunk: usize,
    ) -> Result<Tensor> {
        lm_head_logprobs_capped(hidden, weight, targets, chunk, None, 1.0)
    }

    /// [`lm_head_logprobs`] with the logits soft-capped first (`tanh(z / cap) · cap`, Gemma's
    /// final soft-capping) when `softcap` is set, then divided by `temperature`. The fused op
    /// has no soft-capping, so capped models take this composition on every device.
    pub fn lm_head_logprobs_capped(
        hidden: &Tensor,
        weight: &Tensor,
        targets: &[u32],
        chunk: usize,
        softcap: Option<f64>,
        temperature: f64,
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
            let mut logits = hidden.narrow(0, start, len)?.matmul(&wt)?;
            if let Some(cap) = softcap {
                logits = ((logits / cap)?.tanh()? * cap)?;
            }
            if temperature != 1.0 {
                logits = (logits / temperature)?;
            }
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            parts.push(logp.gather(&ids.narrow(0, start, len)?, 1)?.squeeze(1)?);
            start += len;
        }
        Tensor::cat(&parts, 0)
    }

    pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.broadcast_add(b)
    }

    /// `x·Wᵀ + b` as one 2-D matmul over all leading dimensions.
    pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some(&in_dim) = dims.last() else {
            bail!("linear: input must have at least one dimension");
        };
        let rows = x.elem_count() / in_dim.max(1);
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = w.dim(0)?;
        x.reshape((rows, in_dim))?
            .matmul(&w.t()?)?
            .broadcast_add(b)?
            .reshape(out_dims)
    }

    pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.broadcast_add(b)?.gelu_erf()
    }

    pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, w, b, eps)
    }

    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax(x, D::Minus1)
    }

    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask_bias: &Tensor,
        heads: usize,
        scale: f32,
    ) -> Result<Tensor> {
        let (b, t, hd) = q.dims3()?;
        let d = hd / heads;
        let split = |x: &Tensor| x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = (q.matmul(&k.t()?)? * f64::from(scale))?
            .broadcast_add(&mask_bias.reshape((b, 1, 1, t))?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hd))
    }

    pub fn encoder_layer(
        x: &Tensor,
        p: &EncoderLayerParams,
        mask_bias: &Tensor,
        heads: usize,
        eps: f32,
    ) -> Result<Tensor> {
        let lin = |x: &Tensor, [w, b]: [&Tensor; 2]| linear(x, w, b);
        let (_, _, h) = x.dims3()?;
        let scale = 1.0 / ((h / heads.max(1)) as f32).sqrt();
        let ctx = attention(
            &lin(x, p.query)?,
            &lin(x, p.key)?,
            &lin(x, p.value)?,
            mask_bias,
            heads,
            scale,
        )?;
        let [w, b] = p.attn_norm;
        let x1 = layer_norm(&(lin(&ctx, p.attn_out)? + x)?, w, b, eps)?;
        let inter = lin(&x1, p.intermediate)?.gelu_erf()?;
        let [w, b] = p.out_norm;
        layer_norm(&(lin(&inter, p.output)? + &x1)?, w, b, eps)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_worker_runs_the_work_inside_the_pool_and_returns_its_result() {
        // From the test thread (outside the pool) and from a worker (nested call) alike.
        let (inside, nested) = super::on_worker(|| {
            let inside = rayon::current_thread_index().is_some();
            (
                inside,
                super::on_worker(|| rayon::current_thread_index().is_some()),
            )
        });
        assert!(inside && nested);
        assert_eq!(super::on_worker(|| 6 * 7), 42);
    }
}
