//! Rotary position embeddings (HF layout, `x·cos + rotate_half(x)·sin`) as one op whose
//! backward is the inverse rotation. Reference twin: [`super::reference::apply_rope`].

use candle_core::{CpuStorage, D, Layout, Result, Shape, Tensor};

use super::cpu::{f32_slice, par_rows, with_f32};

pub struct RopeOp {
    /// `[batch, seq, head_dim]` tables, shared by every head.
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    pub(super) heads: usize,
    pub(super) seq: usize,
}

impl RopeOp {
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

impl candle_core::CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "fused-rope")?;
        let d = layout.shape().dims().last().copied().unwrap_or(0);
        Ok((
            CpuStorage::F32(self.rotate(x, d, 1.0)),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dim(D::Minus1)?;
        let g = grad_res.detach().contiguous()?;
        let dx = with_f32(&g, |g| Ok(self.rotate(g, d, -1.0)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
