//! Row-wise fused CPU kernels as candle custom ops, each with a hand-written backward pass:
//! bias add, bias add + GELU, layer norm and softmax over the last dimension.
//!
//! Each one replaces a chain of candle ops (and that chain's chain of backward nodes, each of which
//! allocates, zero-fills and accumulates a full-size gradient) by one pass over the data forward
//! and one backward, split across rayon's threads by blocks of rows.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail,
};
use rayon::prelude::*;

use super::math;
use super::{f32_slice, with_f32};

/// Rows per rayon task: enough work per task (~16K elements) to amortise scheduling.
pub(super) fn rows_per_task(n: usize) -> usize {
    (16_384 / n.max(1)).max(1)
}

/// Adds the per-task partial column sums.
fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    for (x, y) in a.iter_mut().zip(&b) {
        *x += y;
    }
    a
}

fn last_dim(layout: &Layout, op: &str) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => bail!(
            "{op}: input needs a non-empty last dimension, got shape {:?}",
            layout.dims()
        ),
    }
}

fn check_vector(layout: &Layout, n: usize, op: &str, what: &str) -> Result<()> {
    if layout.dims() != [n] {
        bail!(
            "{op}: {what} must have shape [{n}], got {:?}",
            layout.dims()
        );
    }
    Ok(())
}

/// Column sums of a row-major `[rows, n]` slice.
pub(super) fn col_sums(g: &[f32], n: usize) -> Vec<f32> {
    g.par_chunks(n * rows_per_task(n))
        .map(|c| {
            let mut acc = vec![0f32; n];
            for row in c.chunks_exact(n) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .reduce(|| vec![0f32; n], add_into)
}

/// `f(x + b)` for every element, `b` broadcast over the rows of `x`: the forward pass that
/// [`BiasAdd`] and [`BiasGelu`] share. Checks the shapes and returns the new storage.
fn bias_map(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let n = last_dim(l1, op)?;
    check_vector(l2, n, op, "bias")?;
    let x = f32_slice(s1, l1, op)?;
    let b = f32_slice(s2, l2, op)?;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * rows_per_task(n))
        .zip(x.par_chunks(n * rows_per_task(n)))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                for ((o, x), b) in orow.iter_mut().zip(xrow).zip(b) {
                    *o = f(x + b);
                }
            }
        });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// `x + b` with `b` broadcast over the rows of `x`; backward: `dx = dy`, `db = Σ_rows dy`.
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bias_map(self.name(), (s1, l1), (s2, l2), |v| v)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.dim(0)?;
        let db = with_f32(grad, |g| Ok(col_sums(g, n)))?;
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(db, n, b.device())?),
        ))
    }
}

/// `gelu_erf(x + b)`; backward recomputes `x + b` and returns `dx = dy·gelu'(x+b)`,
/// `db = Σ_rows dx` in the same pass.
pub struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bias_map(self.name(), (s1, l1), (s2, l2), |v| {
            math::gelu_with_grad(v).0
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.dim(0)?;
        let (dx, db) = with_f32(x, |x| {
            with_f32(b, |b| {
                with_f32(grad, |g| {
                    let mut dx = vec![0f32; x.len()];
                    let chunk = n * rows_per_task(n);
                    let db = dx
                        .par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk))
                        .zip(g.par_chunks(chunk))
                        .map(|((dx, x), g)| {
                            let mut acc = vec![0f32; n];
                            for ((dxr, xr), gr) in dx
                                .chunks_exact_mut(n)
                                .zip(x.chunks_exact(n))
                                .zip(g.chunks_exact(n))
                            {
                                for ((((d, x), g), b), a) in
                                    dxr.iter_mut().zip(xr).zip(gr).zip(b).zip(acc.iter_mut())
                                {
                                    let v = g * math::gelu_with_grad(x + b).1;
                                    *d = v;
                                    *a += v;
                                }
                            }
                            acc
                        })
                        .reduce(|| vec![0f32; n], add_into);
                    Ok((dx, db))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(db, n, b.device())?),
        ))
    }
}

/// Layer norm over the last dimension with affine `weight`/`bias`; keeps each row's mean and
/// 1/σ from the forward pass for the backward.
pub struct LayerNormOp {
    pub eps: f32,
    /// `[rows, 2]`: mean and reciprocal standard deviation of each row.
    stats: Mutex<Option<Vec<f32>>>,
}

impl LayerNormOp {
    pub fn new(eps: f32) -> Self {
        Self {
            eps,
            stats: Mutex::new(None),
        }
    }
}

/// Mean and reciprocal standard deviation of each `n`-wide row of `x`, as `[rows, 2]`.
fn row_stats(x: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let mut stats = vec![0f32; 2 * (x.len() / n)];
    let rows = rows_per_task(n);
    stats
        .par_chunks_mut(2 * rows)
        .zip(x.par_chunks(n * rows))
        .for_each(|(st, x)| {
            for (s, row) in st.chunks_exact_mut(2).zip(x.chunks_exact(n)) {
                let mean = row.iter().sum::<f32>() / n as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                s[0] = mean;
                s[1] = 1.0 / (var + eps).sqrt();
            }
        });
    stats
}

/// Layer norm of the `n`-wide rows of `x` into `out` (same length); returns the row statistics
/// that [`layer_norm_backward`] needs.
pub(super) fn layer_norm_forward(
    x: &[f32],
    (w, b): (&[f32], &[f32]),
    eps: f32,
    out: &mut [f32],
) -> Vec<f32> {
    let n = w.len();
    let stats = row_stats(x, n, eps);
    let rows = rows_per_task(n);
    out.par_chunks_mut(n * rows)
        .zip(x.par_chunks(n * rows))
        .zip(stats.par_chunks(2 * rows))
        .for_each(|((o, x), st)| {
            for ((orow, xrow), s) in o
                .chunks_exact_mut(n)
                .zip(x.chunks_exact(n))
                .zip(st.chunks_exact(2))
            {
                for (((o, x), w), b) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                    *o = (x - s[0]) * s[1] * w + b;
                }
            }
        });
    stats
}

/// Backward of [`layer_norm_forward`]: writes the input gradient into `dx` and returns the weight
/// gradient followed by the bias gradient (`2·n` values).
pub(super) fn layer_norm_backward(
    x: &[f32],
    stats: &[f32],
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    let n = w.len();
    let rows = rows_per_task(n);
    dx.par_chunks_mut(n * rows)
        .zip(x.par_chunks(n * rows))
        .zip(g.par_chunks(n * rows))
        .zip(stats.par_chunks(2 * rows))
        .map(|(((dx, x), g), st)| {
            // acc[..n] = Σ dy·x̂ (weight grad), acc[n..] = Σ dy (bias grad).
            let mut acc = vec![0f32; 2 * n];
            let mut xhat = vec![0f32; n];
            for (((dxr, xr), gr), s) in dx
                .chunks_exact_mut(n)
                .zip(x.chunks_exact(n))
                .zip(g.chunks_exact(n))
                .zip(st.chunks_exact(2))
            {
                let (mean, rstd) = (s[0], s[1]);
                let mut sum_dxhat = 0f32;
                let mut sum_dxhat_xhat = 0f32;
                for (((xh, x), g), w) in xhat.iter_mut().zip(xr).zip(gr).zip(w) {
                    *xh = (x - mean) * rstd;
                    let dxh = g * w;
                    sum_dxhat += dxh;
                    sum_dxhat_xhat += dxh * *xh;
                }
                let a = sum_dxhat / n as f32;
                let c = sum_dxhat_xhat / n as f32;
                let (aw, ab) = acc.split_at_mut(n);
                for (((((d, xh), g), w), aw), ab) in dxr
                    .iter_mut()
                    .zip(&xhat)
                    .zip(gr)
                    .zip(w)
                    .zip(aw.iter_mut())
                    .zip(ab.iter_mut())
                {
                    *d = rstd * (g * w - a - xh * c);
                    *aw += g * xh;
                    *ab += g;
                }
            }
            acc
        })
        .reduce(|| vec![0f32; 2 * n], add_into)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let n = last_dim(l1, self.name())?;
        check_vector(l2, n, self.name(), "weight")?;
        check_vector(l3, n, self.name(), "bias")?;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let mut out = vec![0f32; x.len()];
        let stats = layer_norm_forward(x, (w, b), self.eps, &mut out);
        if let Ok(mut slot) = self.stats.lock() {
            *slot = Some(stats);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let saved = self.stats.lock().ok().and_then(|mut s| s.take());
        let (dx, dwb) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(grad, |g| {
                    let stats = match saved {
                        Some(s) if s.len() == 2 * (x.len() / n) => s,
                        _ => row_stats(x, n, self.eps),
                    };
                    let mut dx = vec![0f32; x.len()];
                    let dwb = layer_norm_backward(x, &stats, w, g, &mut dx);
                    Ok((dx, dwb))
                })
            })
        })?;
        let dw = Tensor::from_slice(&dwb[..n], n, w.device())?;
        let db = Tensor::from_slice(&dwb[n..], n, w.device())?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(dw),
            Some(db),
        ))
    }
}

/// Attention's softmax backward in place, row by row: `ds ← P ⊙ (ds − rowsum(ds ⊙ P)) · scale`
/// for `[rows, n]` probabilities `p` and upstream gradients `ds`.
pub(super) fn softmax_bwd_rows(ds: &mut [f32], p: &[f32], n: usize, scale: f32) {
    for (dr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
        let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
        for (x, p) in dr.iter_mut().zip(pr) {
            *x = p * (*x - dot) * scale;
        }
    }
}

/// Softmax over the last dimension; backward `dx = y·(dy − Σ dy·y)` from the saved output.
pub struct SoftmaxLastDim;

/// In-place softmax of one row.
#[inline]
pub(super) fn softmax_row(row: &mut [f32]) {
    let inv = 1.0 / exp_minus_max(row);
    for v in row.iter_mut() {
        *v = math::flush_subnormal(*v * inv);
    }
}

/// Replaces each value `v` of `row` by `e^(v − max(row))` and returns their sum: a softmax
/// without the division, for callers that fold `1/sum` into a later product.
///
/// The maximum and the sum are kept in eight interleaved lanes so that both loops vectorise
/// (a single running `f32` would be one serial chain of dependent adds).
#[inline]
pub(super) fn exp_minus_max(row: &mut [f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in row.iter_mut() {
        *v = math::exp(*v - max);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>()
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l, self.name())?;
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        out.par_chunks_mut(n * rows_per_task(n)).for_each(|c| {
            for row in c.chunks_exact_mut(n) {
                softmax_row(row);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(candle_core::D::Minus1)?;
        let dx = with_f32(res, |y| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                let chunk = n * rows_per_task(n);
                dx.par_chunks_mut(chunk)
                    .zip(y.par_chunks(chunk))
                    .zip(g.par_chunks(chunk))
                    .for_each(|((d, y), g)| {
                        for ((dr, yr), gr) in d
                            .chunks_exact_mut(n)
                            .zip(y.chunks_exact(n))
                            .zip(g.chunks_exact(n))
                        {
                            let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
                            for ((d, y), g) in dr.iter_mut().zip(yr).zip(gr) {
                                *d = y * (g - dot);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
