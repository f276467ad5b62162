//! Rotary position embeddings (HF layout, `x·cos + rotate_half(x)·sin`) as one op whose
//! backward is the inverse rotation. Reference twin: [`super::reference::apply_rope`].

use candle_core::{CpuStorage, D, Layout, Result, Shape, Tensor};

use super::cpu::{f32_slice, par_rows, with_f32};
use super::isa::multiversion;

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
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r0, block| {
            for (k, orow) in block.chunks_exact_mut(d).enumerate() {
                let r = r0 + k;
                // Row r is (batch, head, position): the tables are indexed by batch and position.
                let (bi, ti) = (r / (self.heads * self.seq), r % self.seq);
                let tab = (bi * self.seq + ti) * d;
                let xr = &x[r * d..(r + 1) * d];
                let angles = (&self.cos[tab..tab + d], &self.sin[tab..tab + d]);
                rotate_row(orow, xr, angles, sign);
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

multiversion! {
    /// One row: `o = x·cos + rotate_half(x)·sin` with `rotate_half(x) = (−x2, x1)` when `sign`
    /// is positive, else its transpose, the backward pass: `dy·cos + rotate_halfᵀ(dy·sin)`
    /// with `rotate_halfᵀ(z) = (z2, −z1)`.
    fn rotate_row(o: &mut [f32], x: &[f32], angles: (&[f32], &[f32]), sign: f32) {
        let (c, s) = angles;
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = o.split_at_mut(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = s.split_at(half);
        // Forward: o1 = x1·c1 − x2·s1, o2 = x2·c2 + x1·s2; backward: o1 = x1·c1 + x2·s2,
        // o2 = x2·c2 − x1·s1.
        let (t1, t2) = if sign > 0.0 { (s1, s2) } else { (s2, s1) };
        let flip = if sign > 0.0 { -1.0 } else { 1.0 };
        for j in 0..half {
            o1[j] = x1[j] * c1[j] + (flip * x2[j]) * t1[j];
            o2[j] = x2[j] * c2[j] + (-flip * x1[j]) * t2[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn rotation_and_its_transpose_agree_on_every_instruction_set_and_invert() {
        let d = 38;
        let x = values(d, 14, 2.0);
        let theta = values(d, 15, 3.0);
        let (c, s): (Vec<f32>, Vec<f32>) = theta.iter().map(|t| (t.cos(), t.sin())).unzip();
        // HF's tables repeat the half-width angles in both halves.
        let (c, s) = (
            [&c[..d / 2], &c[..d / 2]].concat(),
            [&s[..d / 2], &s[..d / 2]].concat(),
        );
        for sign in [1.0, -1.0] {
            every_isa_agrees("rope", 0.0, |isa| {
                let mut o = vec![0.0; d];
                rotate_row_on(isa, &mut o, &x, (&c, &s), sign);
                o
            });
        }
        let (mut there, mut back) = (vec![0.0; d], vec![0.0; d]);
        rotate_row(&mut there, &x, (&c, &s), 1.0);
        rotate_row(&mut back, &there, (&c, &s), -1.0);
        for (b, x) in back.iter().zip(&x) {
            assert!((b - x).abs() < 1e-5, "{b} vs {x}");
        }
    }
}
