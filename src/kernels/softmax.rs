//! Softmax over the last dimension as one custom op (forward one pass per row, backward
//! `dx = y ⊙ (dy − Σ dy·y)`), used by both model families, and the row-wise softmax backward
//! that the attention kernels run inside their own loops. Reference twin:
//! [`super::reference::softmax_last_dim`].

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor};

use super::cpu::{f32_slice, par_rows, with_f32};
use super::math;

/// Softmax over the last dimension; backward from the saved output.
pub struct SoftmaxLastDim;

/// Attention's softmax backward in place, row by row: `ds ← P ⊙ (ds − rowsum(ds ⊙ P)) · scale`
/// for `[rows, n]` probabilities `p` and upstream gradients `ds`.
pub(crate) fn softmax_bwd_rows(ds: &mut [f32], p: &[f32], n: usize, scale: f32) {
    for (dr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
        let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
        for (x, p) in dr.iter_mut().zip(pr) {
            *x = p * (*x - dot) * scale;
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
        par_rows(&mut out, cols, |_, block| {
            for row in block.chunks_exact_mut(cols) {
                math::softmax_row(row);
            }
        });
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
