//! Fused CPU kernels, each a candle custom op with its own backward pass, plus the allocator
//! tuning and optimiser that go with them. These exist for speed: candle's generic versions of the
//! same maths make a BERT training step several times slower than PyTorch on CPU (GUIDE §4).
//!
//! Every public function checks whether its inputs are f32 tensors on the CPU; if not, it runs the
//! unfused reference composition from [`reference`] instead, so callers never need two code paths.
//! Tests compare each fused op's forward and backward with its [`reference`] twin.

pub mod adamw;
pub mod alloc;
mod attention;
mod cached_attention;
mod causal_attention;
mod kernels;
mod layer;
mod linear;
pub(crate) mod math;
mod matvec;
pub(crate) mod sgemm;
pub mod threads;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, D, DType, Layout, Result, Storage, Tensor, bail};

pub use adamw::FusedAdamW;
pub use alloc::{collapse_into_huge_pages, tune_allocator};
pub use cached_attention::CachedAttention;
pub use threads::{flush_denormals_on_this_thread, init_compute_threads};

/// The contiguous f32 data a layout addresses.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: expected f32 data, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input is not contiguous (shape {:?})", l.dims()),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (copying only if it is strided).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(f32_slice(cpu, layout, "fused op")?),
        _ => bail!("fused op: tensor is not on the CPU"),
    }
}

/// Runs `work` on one of rayon's worker threads and returns its result.
///
/// The kernels here (and candle's matmul) split their work over rayon's pool. Called from a thread
/// outside the pool, every split is handed over through a lock and the caller is woken through a
/// condition variable when it ends, while the pool's idle workers spin: three threads on a 2-core
/// machine, hundreds of hand-overs per generated token. Called from a worker, a split is a `join`
/// whose other half the second worker steals. Measured here on the decode matrix products of
/// SmolLM2-135M: 6–10% less time per token. Already on a worker, `work` simply runs.
pub fn on_worker<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        work()
    } else {
        rayon::join(work, || ()).0
    }
}

fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `x · wᵀ` for a 2-D `x` `[m, k]` and a weight `w` `[n, k]`, as linear layers and the LM head
/// multiply.
///
/// With few rows (m ≤ [`matvec::MAX_ROWS`]: a decode step), f32 CPU tensors and a contiguous
/// weight, this runs the streaming kernel of [`matvec`], which reads each weight row once
/// instead of packing the whole matrix as the blocked gemm does; everything else (training
/// batches, other devices or dtypes, strided weights) is candle's matmul. Both record a
/// backward.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let small = x.rank() == 2
        && w.rank() == 2
        && x.dim(0)? <= matvec::MAX_ROWS
        && w.is_contiguous()
        && fusable(&[x, w]);
    if small {
        matvec::matmul_wt(x, w)
    } else {
        x.matmul(&w.t()?)
    }
}

/// `x + b` over the last dimension.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, b]) {
        return reference::bias_add(x, b);
    }
    x.contiguous()?
        .apply_op2(&b.contiguous()?, kernels::BiasAdd)
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
        .apply_op2(&b.contiguous()?, kernels::BiasGelu)
}

/// Layer norm over the last dimension: `(x − μ)/√(σ² + eps) · w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if !fusable(&[x, w, b]) {
        return reference::layer_norm(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        kernels::LayerNormOp::new(eps),
    )
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fusable(&[x]) {
        return reference::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(kernels::SoftmaxLastDim)
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

/// Whether every tensor is f32 on the CPU (the fused kernels' domain).
pub fn fusable_all(ts: &[&Tensor]) -> bool {
    fusable(ts)
}

/// The unfused compositions of candle ops that the fused kernels replace: the specification the
/// fused ops are tested against and the fallback off the CPU.
pub mod reference {
    use super::*;

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
