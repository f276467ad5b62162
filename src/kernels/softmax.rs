//! Softmax over the last dimension as one custom op (forward one pass per row, backward
//! `dx = y ⊙ (dy − Σ dy·y)`), used by both model families, and the row-wise softmax backward
//! that the attention kernels run inside their own loops. Reference twin:
//! [`super::reference::softmax_last_dim`].

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor};

use super::cpu::{f32_slice, par_rows, with_f32};
use super::isa::multiversion;
use super::math;

/// Softmax over the last dimension; backward from the saved output.
pub struct SoftmaxLastDim;

multiversion! {
    /// In-place softmax of every `n`-wide row of `rows`.
    pub(crate) fn softmax_rows(rows: &mut [f32], n: usize) {
        for row in rows.chunks_exact_mut(n) {
            math::softmax_row(row);
        }
    }
}

multiversion! {
    /// Attention's scores to probabilities in place: every `n`-wide row of `rows` gets its
    /// additive bias (row `r` reads `bias[r·bias_stride..][..n]`: stride 0 gives every row the
    /// same key mask, stride `n` one bias row per query), then its softmax.
    pub(crate) fn biased_softmax_rows(rows: &mut [f32], bias: &[f32], bias_stride: usize, n: usize) {
        for (r, row) in rows.chunks_exact_mut(n).enumerate() {
            let b = &bias[r * bias_stride..r * bias_stride + n];
            for (x, &b) in row.iter_mut().zip(b) {
                *x += b;
            }
            math::softmax_row(row);
        }
    }
}

multiversion! {
    /// Attention's softmax backward in place, row by row: `ds ← P ⊙ (ds − rowsum(ds ⊙ P)) ·
    /// scale` for `[rows, n]` probabilities `p` and upstream gradients `ds`.
    pub(crate) fn softmax_bwd_rows(ds: &mut [f32], p: &[f32], n: usize, scale: f32) {
        for (dr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            let dot = math::lane_dot(dr, pr);
            for (x, p) in dr.iter_mut().zip(pr) {
                *x = p * (*x - dot) * scale;
            }
        }
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = f32_slice(storage, layout, self.name())?.to_vec();
        let cols = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        par_rows(&mut out, cols, |_, block| softmax_rows(block, cols));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let shape = res.shape().clone();
        let cols = res.dim(D::Minus1)?;
        let y = res.detach().reshape(((), cols))?;
        let dy = grad_res.detach().contiguous()?.reshape(((), cols))?;
        let out = with_f32(&y, |yd| {
            with_f32(&dy, |dyd| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn the_row_softmaxes_agree_on_every_instruction_set() {
        // Odd widths, so the lane loops run their tails; a large negative bias among the keys.
        for n in [1, 37, 130] {
            let x = values(5 * n, 3, 6.0);
            let mut bias = values(5 * n, 4, 1.0);
            bias[n / 2] = -1.0e9;
            every_isa_agrees("softmax", 1e-6, |isa| {
                let mut r = x.clone();
                softmax_rows_on(isa, &mut r, n);
                r
            });
            for stride in [0, n] {
                every_isa_agrees("biased softmax", 1e-6, |isa| {
                    let mut r = x.clone();
                    biased_softmax_rows_on(isa, &mut r, &bias, stride, n);
                    r
                });
            }
            let mut p = x.clone();
            softmax_rows(&mut p, n);
            let g = values(5 * n, 5, 1.0);
            every_isa_agrees("softmax backward", 1e-5, |isa| {
                let mut d = g.clone();
                softmax_bwd_rows_on(isa, &mut d, &p, n, 0.125);
                d
            });
        }
    }
}
