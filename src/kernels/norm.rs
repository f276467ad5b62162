//! Normalisation ops with their backward: layer norm (BERT; the forward/backward slices are
//! shared with the whole-layer op) and RMSNorm (llama). Reference twins in [`super::reference`].

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{add_into, check_vector, f32_slice, last_dim, par_rows, rows_per_task, with_f32};
use super::isa::multiversion;
use super::math;

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
        .for_each(|(st, x)| row_stats_into(st, x, n, eps));
    stats
}

multiversion! {
    /// [`row_stats`] of the rows of one block.
    fn row_stats_into(st: &mut [f32], x: &[f32], n: usize, eps: f32) {
        let mut centred = vec![0f32; n];
        for (s, row) in st.chunks_exact_mut(2).zip(x.chunks_exact(n)) {
            let mean = math::lane_sum(row) / n as f32;
            for (c, v) in centred.iter_mut().zip(row) {
                *c = v - mean;
            }
            let var = math::lane_dot(&centred, &centred) / n as f32;
            s[0] = mean;
            s[1] = 1.0 / (var + eps).sqrt();
        }
    }
}

/// Layer norm of the `n`-wide rows of `x` into `out` (same length); returns the row statistics
/// that [`layer_norm_backward`] needs.
pub(crate) fn layer_norm_forward(
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
        .for_each(|((o, x), st)| normalize_rows(o, x, st, w, b));
    stats
}

multiversion! {
    /// `o = (x − mean)·rstd·w + b` for the rows of one block.
    fn normalize_rows(o: &mut [f32], x: &[f32], st: &[f32], w: &[f32], b: &[f32]) {
        let n = w.len();
        for ((orow, xrow), s) in o
            .chunks_exact_mut(n)
            .zip(x.chunks_exact(n))
            .zip(st.chunks_exact(2))
        {
            for (((o, x), w), b) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                *o = (x - s[0]) * s[1] * w + b;
            }
        }
    }
}

/// Backward of [`layer_norm_forward`]: writes the input gradient into `dx` and returns the weight
/// gradient followed by the bias gradient (`2·n` values).
pub(crate) fn layer_norm_backward(
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
        .map(|(((dx, x), g), st)| layer_norm_backward_rows(dx, x, g, st, w))
        .reduce(|| vec![0f32; 2 * n], add_into)
}

multiversion! {
    /// [`layer_norm_backward`] of the rows of one block; returns the block's weight and bias
    /// gradient sums.
    fn layer_norm_backward_rows(
        dx: &mut [f32],
        x: &[f32],
        g: &[f32],
        st: &[f32],
        w: &[f32],
    ) -> Vec<f32> {
        let n = w.len();
        // acc[..n] = Σ dy·x̂ (weight grad), acc[n..] = Σ dy (bias grad).
        let mut acc = vec![0f32; 2 * n];
        let mut xhat = vec![0f32; n];
        let mut dxhat = vec![0f32; n];
        for (((dxr, xr), gr), s) in dx
            .chunks_exact_mut(n)
            .zip(x.chunks_exact(n))
            .zip(g.chunks_exact(n))
            .zip(st.chunks_exact(2))
        {
            let (mean, rstd) = (s[0], s[1]);
            for ((((xh, dxh), x), g), w) in xhat.iter_mut().zip(&mut dxhat).zip(xr).zip(gr).zip(w) {
                *xh = (x - mean) * rstd;
                *dxh = g * w;
            }
            let a = math::lane_sum(&dxhat) / n as f32;
            let c = math::lane_dot(&dxhat, &xhat) / n as f32;
            let (aw, ab) = acc.split_at_mut(n);
            for (((((d, xh), dxh), g), aw), ab) in dxr
                .iter_mut()
                .zip(&xhat)
                .zip(&dxhat)
                .zip(gr)
                .zip(aw.iter_mut())
                .zip(ab.iter_mut())
            {
                *d = rstd * (dxh - a - xh * c);
                *aw += g * xh;
                *ab += g;
            }
        }
        acc
    }
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

pub struct RmsNormOp {
    pub eps: f32,
}

multiversion! {
    /// RMS norm of every row of `x` (rows as wide as `w`) into `out`.
    fn rms_normalize_rows(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let n = w.len();
        for (orow, row) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            let inv = inv_rms(row, eps);
            for ((o, &v), &g) in orow.iter_mut().zip(row).zip(w) {
                *o = v * inv * g;
            }
        }
    }
}

/// `1 / √(mean(row²) + eps)`.
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = math::lane_dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

multiversion! {
    /// RMS norm backward of one block of rows: `dx` from the inputs `x` and output gradients
    /// `dy`, and the block's weight-gradient sums added into `dw`. With n = x·inv and
    /// g = dy·w:  dx = inv·(g − n·mean(g·n)),  dw = Σ_rows dy·n.
    fn rms_norm_backward_rows(dx: &mut [f32], x: &[f32], dy: &[f32], w: &[f32], eps: f32, dw: &mut [f32]) {
        let cols = w.len();
        for ((orow, xr), dr) in dx.chunks_exact_mut(cols).zip(x.chunks_exact(cols)).zip(dy.chunks_exact(cols)) {
            let inv = inv_rms(xr, eps);
            let mut dot = 0f32;
            for j in 0..cols {
                let n = xr[j] * inv;
                dot += dr[j] * w[j] * n;
                dw[j] += dr[j] * n;
            }
            let mean = dot / cols as f32;
            for j in 0..cols {
                let n = xr[j] * inv;
                orow[j] = inv * (dr[j] * w[j] - n * mean);
            }
        }
    }
}

impl CustomOp2 for RmsNormOp {
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
        let x = f32_slice(s1, l1, "fused-rms-norm")?;
        let w = f32_slice(s2, l2, "fused-rms-norm")?;
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
            let rows = &x[r0 * cols..r0 * cols + block.len()];
            rms_normalize_rows(block, rows, w, self.eps);
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
        let (dx, dw) = with_f32(&xf, |xd| {
            with_f32(&dyf, |dyd| {
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
                                let span = i * per * cols..i * per * cols + block.len();
                                let (x, dy) = (&xd[span.clone()], &dyd[span]);
                                rms_norm_backward_rows(block, x, dy, wv, self.eps, &mut dw);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::Isa;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn layer_norm_blocks_agree_on_every_instruction_set() {
        let (rows, n) = (5, 37);
        // An offset mean, as real activations have.
        let x: Vec<f32> = values(rows * n, 6, 3.0).iter().map(|v| v + 2.0).collect();
        let (w, b) = (values(n, 7, 1.0), values(n, 8, 1.0));
        let g = values(rows * n, 9, 1.0);
        let stats = |isa| {
            let mut st = vec![0.0; 2 * rows];
            row_stats_into_on(isa, &mut st, &x, n, 1e-12);
            st
        };
        every_isa_agrees("layer norm statistics", 1e-5, stats);
        let st = stats(Isa::Baseline);
        every_isa_agrees("layer norm", 1e-5, |isa| {
            let mut o = vec![0.0; rows * n];
            normalize_rows_on(isa, &mut o, &x, &st, &w, &b);
            o
        });
        every_isa_agrees("layer norm backward", 1e-5, |isa| {
            let mut dx = vec![0.0; rows * n];
            let mut out = layer_norm_backward_rows_on(isa, &mut dx, &x, &g, &st, &w);
            out.extend(dx);
            out
        });
    }

    #[test]
    fn rms_norm_blocks_agree_on_every_instruction_set() {
        let (rows, n) = (5, 37);
        let (x, w, dy) = (
            values(rows * n, 18, 3.0),
            values(n, 19, 1.0),
            values(rows * n, 20, 1.0),
        );
        every_isa_agrees("rms norm", 1e-5, |isa| {
            let mut o = vec![0.0; rows * n];
            rms_normalize_rows_on(isa, &mut o, &x, &w, 1e-6);
            o
        });
        every_isa_agrees("rms norm backward", 1e-5, |isa| {
            let (mut dx, mut dw) = (vec![0.0; rows * n], vec![0.0; n]);
            rms_norm_backward_rows_on(isa, &mut dx, &x, &dy, &w, 1e-6, &mut dw);
            dx.extend(dw);
            dx
        });
    }
}
