//! Log-probabilities and entropies from full language-model logits: the reference that the
//! policy losses are tested with (TRL's vectors are given as logits) and the path for callers
//! that already hold logits. Production never materialises the logits: the policies compute
//! per-token log-probs from hidden states through the LM-head kernel
//! (`kernels::lm_head_logprobs`), and PPO passes `logits: None`.
//!
//! The vocabulary dominates memory and time here (49 152 entries for SmolLM2), so nothing in this
//! file materialises a full `log_softmax` copy of the logits. On the CPU, for f32/f64, a fused
//! candle `CustomOp2` computes `x[label] - logsumexp(x)` per row in one pass and keeps only one
//! number per row; its backward writes `g * (onehot - softmax)` straight into the gradient, again
//! in one pass, and both split rows over the cores. On other devices or dtypes the same formula is
//! assembled from generic candle ops over chunks of rows, so the transient `exp` copy stays
//! bounded by [`CHUNK_ELEMS`] elements (the autograd graph still keeps each chunk's intermediates
//! when the logits require a gradient; frozen models' logits carry no graph and are freed).
//!
//! Shift convention (HF / TRL): `logits[b, t]` predicts `input_ids[b, t + 1]`, and token `t + 1`
//! counts iff `completion_mask[b, t + 1] == 1`.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor,
    bail,
};

/// Largest number of logits one generic-path chunk touches at once (16 MiB of f32).
pub const CHUNK_ELEMS: usize = 1 << 22;

/// Below this many logits the fused kernels stay on one thread (spawning costs more).
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Per-token `log_softmax(logits)[label]`: `logits` is `[..., V]`, `labels` is `[...]` (any integer
/// dtype); the result has the labels' shape and the logits' dtype, and carries a gradient to the
/// logits. Labels must lie in `0..V` (replace TRL's `-100` padding with 0 and mask it out).
pub fn token_logprobs(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (rows, v, out_shape) = rows_and_vocab(logits, labels)?;
    let flat = logits.reshape((rows, v))?;
    let ids = labels.flatten_all()?.to_dtype(DType::U32)?;
    let out = if use_fused(&flat) {
        flat.apply_op2(&ids, LogSoftmaxGather)?
    } else {
        token_logprobs_generic_flat(&flat, &ids)?
    };
    out.reshape(out_shape)
}

/// The same as [`token_logprobs`] built only from generic candle ops (chunked over rows); used on
/// devices without the fused kernel and as the fused kernel's reference in tests.
pub fn token_logprobs_generic(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (rows, v, out_shape) = rows_and_vocab(logits, labels)?;
    let flat = logits.reshape((rows, v))?;
    let ids = labels.flatten_all()?.to_dtype(DType::U32)?;
    token_logprobs_generic_flat(&flat, &ids)?.reshape(out_shape)
}

fn token_logprobs_generic_flat(flat: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (rows, v) = flat.dims2()?;
    check_ids(ids, v)?;
    let step = (CHUNK_ELEMS / v.max(1)).max(1);
    let mut parts = Vec::with_capacity(rows.div_ceil(step));
    let mut start = 0;
    while start < rows {
        let len = step.min(rows - start);
        let chunk = flat.narrow(0, start, len)?;
        let idx = ids.narrow(0, start, len)?.unsqueeze(1)?;
        let picked = chunk.gather(&idx, 1)?.squeeze(1)?;
        parts.push((picked - chunk.log_sum_exp(1)?)?);
        start += len;
    }
    if parts.len() == 1 {
        Ok(parts.remove(0))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// Labels and mask shifted by one so that position `t` holds token `t + 1`; the last position gets
/// label 0 and mask 0. Both are `[B, T]`.
pub fn shift_labels(input_ids: &Tensor, completion_mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t) = input_ids.dims2()?;
    if completion_mask.dims() != [b, t] {
        bail!(
            "completion mask has shape {:?} but input ids have {:?}",
            completion_mask.dims(),
            input_ids.dims()
        );
    }
    if t == 0 {
        return Ok((input_ids.clone(), completion_mask.clone()));
    }
    let ids = input_ids.to_dtype(DType::U32)?;
    let pad_ids = Tensor::zeros((b, 1), DType::U32, ids.device())?;
    let labels = Tensor::cat(&[&ids.narrow(1, 1, t - 1)?, &pad_ids], 1)?;
    let pad_mask = Tensor::zeros((b, 1), completion_mask.dtype(), ids.device())?;
    let mask = Tensor::cat(&[&completion_mask.narrow(1, 1, t - 1)?, &pad_mask], 1)?;
    Ok((labels, mask))
}

/// Per-sequence sums of completion-token log-probs, `[B]`, from `logits [B, T, V]`,
/// `input_ids [B, T]` and `completion_mask [B, T]` (shifted by one; see the module doc).
pub fn sequence_logprobs(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<Tensor> {
    let (labels, mask) = shift_labels(input_ids, completion_mask)?;
    let tok = token_logprobs(logits, &labels)?;
    (tok * mask.to_dtype(logits.dtype())?)?.sum(D::Minus1)
}

/// Per-sequence *mean* completion-token log-prob (IPO's length normalisation); a sequence without
/// completion tokens gives NaN, which the caller should never feed.
pub fn sequence_logprobs_mean(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<Tensor> {
    let (_, mask) = shift_labels(input_ids, completion_mask)?;
    let sum = sequence_logprobs(logits, input_ids, completion_mask)?;
    sum.div(&mask.to_dtype(logits.dtype())?.sum(D::Minus1)?)
}

/// Per-position entropy of `softmax(logits)`, `[..., V] -> [...]`, detached (a metric, never a
/// loss term): `logsumexp(x) - sum(softmax(x) * x)`.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    let Some((&v, lead)) = dims.split_last() else {
        bail!("entropy_from_logits needs at least one dimension, got a scalar");
    };
    let rows: usize = lead.iter().product();
    let flat = logits.detach().reshape((rows, v))?;
    let out = if use_fused(&flat) {
        flat.apply_op1_no_bwd(&Entropy)?
    } else {
        let step = (CHUNK_ELEMS / v.max(1)).max(1);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows {
            let len = step.min(rows - start);
            let chunk = flat.narrow(0, start, len)?;
            let lse = chunk.log_sum_exp(1)?;
            let p = chunk.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
            parts.push((lse - (p * &chunk)?.sum(1)?)?);
            start += len;
        }
        Tensor::cat(&parts, 0)?
    };
    out.reshape(lead)
}

fn rows_and_vocab(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize, Vec<usize>)> {
    let dims = logits.dims();
    let Some((&v, lead)) = dims.split_last() else {
        bail!("logits must have a vocabulary dimension, got a scalar");
    };
    if lead != labels.dims() {
        bail!(
            "labels have shape {:?} but logits {:?} need {:?}",
            labels.dims(),
            dims,
            lead
        );
    }
    if v == 0 {
        bail!("logits have an empty vocabulary dimension");
    }
    Ok((lead.iter().product(), v, lead.to_vec()))
}

fn use_fused(flat: &Tensor) -> bool {
    matches!(flat.device(), Device::Cpu) && matches!(flat.dtype(), DType::F32 | DType::F64)
}

fn check_ids(ids: &Tensor, v: usize) -> Result<()> {
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let max = ids.max_all()?.to_scalar::<u32>()? as usize;
    if max >= v {
        bail!(
            "label {max} is outside the vocabulary of {v}\nhint: replace ignore-index labels (-100) with 0 and mask them out"
        );
    }
    Ok(())
}

// ---- fused CPU kernels -------------------------------------------------------------------------

/// The float types the fused kernels run in (accumulating in their own precision, as PyTorch does).
trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

fn row_lse<T: Float>(row: &[T]) -> T {
    let mut max = T::NEG_INF;
    for &x in row {
        if x > max {
            max = x;
        }
    }
    if max.partial_cmp(&T::NEG_INF) != Some(std::cmp::Ordering::Greater) {
        // All -inf (or NaN): propagate instead of producing a misleading finite value.
        return max;
    }
    let mut sum = T::ZERO;
    for &x in row {
        sum = sum + (x - max).exp();
    }
    max + sum.ln()
}

/// Runs `f(row_index, row, out_slot)` over rows, on all cores when the work is large enough.
fn for_rows<T: Float, O: Send, F>(x: &[T], v: usize, out: &mut [O], per_row_out: usize, f: F)
where
    F: Fn(usize, &[T], &mut [O]) + Sync,
{
    let rows = out.len() / per_row_out.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || x.len() < PARALLEL_MIN_ELEMS || rows < 2 {
        for (r, o) in out.chunks_mut(per_row_out).enumerate() {
            f(r, &x[r * v..(r + 1) * v], o);
        }
        return;
    }
    let rows_per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (c, o) in out.chunks_mut(rows_per * per_row_out).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, slot) in o.chunks_mut(per_row_out).enumerate() {
                    let r = c * rows_per + i;
                    f(r, &x[r * v..(r + 1) * v], slot);
                }
            });
        }
    });
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what} must be contiguous for the fused kernel"),
    }
}

fn ids_vec(s: &CpuStorage, l: &Layout, v: usize) -> Result<Vec<usize>> {
    let ids: Vec<usize> = match s {
        CpuStorage::U32(d) => contiguous(d, l, "labels")?
            .iter()
            .map(|&i| i as usize)
            .collect(),
        _ => bail!(
            "fused log-softmax-gather expects u32 labels, got {:?}",
            s.dtype()
        ),
    };
    if let Some(&bad) = ids.iter().find(|&&i| i >= v) {
        bail!(
            "label {bad} is outside the vocabulary of {v}\nhint: replace ignore-index labels (-100) with 0 and mask them out"
        );
    }
    Ok(ids)
}

fn gather_fwd<T: Float>(x: &[T], ids: &[usize], v: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; ids.len()];
    for_rows(x, v, &mut out, 1, |r, row, o| {
        o[0] = row[ids[r]] - row_lse(row)
    });
    out
}

fn gather_bwd<T: Float>(x: &[T], ids: &[usize], g: &[T], v: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    for_rows(x, v, &mut out, v, |r, row, o| {
        let lse = row_lse(row);
        let gr = g[r];
        for (ov, &xv) in o.iter_mut().zip(row) {
            *ov = T::ZERO - gr * (xv - lse).exp();
        }
        o[ids[r]] = o[ids[r]] + gr;
    });
    out
}

fn entropy_rows<T: Float>(x: &[T], v: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len() / v];
    for_rows(x, v, &mut out, 1, |_, row, o| {
        let lse = row_lse(row);
        let mut px = T::ZERO;
        for &xv in row {
            px = px + (xv - lse).exp() * xv;
        }
        o[0] = lse - px;
    });
    out
}

/// `[N, V]` logits and `[N]` u32 labels -> `[N]` log-probs.
struct LogSoftmaxGather;

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "log-softmax-gather"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let ids = ids_vec(s2, l2, v)?;
        if ids.len() != n {
            bail!(
                "log-softmax-gather: {n} rows of logits but {} labels",
                ids.len()
            );
        }
        let out = match s1 {
            CpuStorage::F32(d) => {
                CpuStorage::F32(gather_fwd(contiguous(d, l1, "logits")?, &ids, v))
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(gather_fwd(contiguous(d, l1, "logits")?, &ids, v))
            }
            other => bail!(
                "log-softmax-gather supports f32/f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(ids, &grad_res.contiguous()?, &LogSoftmaxGatherGrad)?;
        Ok((Some(g), None))
    }
}

/// Backward of [`LogSoftmaxGather`]: `(logits, labels, grad_out) -> grad_logits`.
struct LogSoftmaxGatherGrad;

impl CustomOp3 for LogSoftmaxGatherGrad {
    fn name(&self) -> &'static str {
        "log-softmax-gather-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let ids = ids_vec(s2, l2, v)?;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(gather_bwd(
                contiguous(x, l1, "logits")?,
                &ids,
                contiguous(g, l3, "gradient")?,
                v,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(gather_bwd(
                contiguous(x, l1, "logits")?,
                &ids,
                contiguous(g, l3, "gradient")?,
                v,
            )),
            (a, b) => bail!(
                "log-softmax-gather-grad: unsupported dtypes {:?}/{:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `[N, V]` logits -> `[N]` entropies (forward only; entropy is a metric).
struct Entropy;

impl CustomOp1 for Entropy {
    fn name(&self) -> &'static str {
        "entropy-from-logits"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let out = match s {
            CpuStorage::F32(d) => CpuStorage::F32(entropy_rows(contiguous(d, l, "logits")?, v)),
            CpuStorage::F64(d) => CpuStorage::F64(entropy_rows(contiguous(d, l, "logits")?, v)),
            other => bail!("entropy kernel supports f32/f64, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from(n)))
    }
}
