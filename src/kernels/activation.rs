//! Element-wise ops with their backward: bias add, bias add + GELU (BERT's FFN), and SwiGLU's
//! `silu(gate) ⊙ up` (llama's FFN). Reference twins in [`super::reference`].

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{add_into, bias_map, col_sums, f32_slice, rows_per_task, with_f32};
use super::isa::multiversion;
use super::math;

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

/// `silu(gate) ⊙ up` (SwiGLU's gating); uses [`math::exp`].
pub struct SiluMul;

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
        let g = f32_slice(s1, l1, "silu-mul")?;
        let u = f32_slice(s2, l2, "silu-mul")?;
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(SILU_BLOCK)
            .enumerate()
            .for_each(|(i, block)| {
                let span = i * SILU_BLOCK..i * SILU_BLOCK + block.len();
                silu_mul_into(block, &g[span.clone()], &u[span]);
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
        with_f32(&gate_c, |g| {
            with_f32(&up_c, |u| {
                with_f32(&dy, |dy| {
                    dg.par_chunks_mut(SILU_BLOCK)
                        .zip(du.par_chunks_mut(SILU_BLOCK))
                        .enumerate()
                        .for_each(|(i, (dgb, dub))| {
                            let span = i * SILU_BLOCK..i * SILU_BLOCK + dgb.len();
                            let inputs = [&g[span.clone()], &u[span.clone()], &dy[span]];
                            silu_mul_backward_into(dgb, dub, inputs);
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

multiversion! {
    /// `o = silu(g)·u`, element by element.
    fn silu_mul_into(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &x), &y) in o.iter_mut().zip(g).zip(u) {
            *o = x / (1.0 + math::exp(-x)) * y;
        }
    }
}

multiversion! {
    /// Gradients of [`silu_mul_into`] for the gate (`dg`) and up (`du`) inputs from the gate,
    /// up and output-gradient values `[g, u, dy]`.
    fn silu_mul_backward_into(dg: &mut [f32], du: &mut [f32], inputs: [&[f32]; 3]) {
        let [g, u, dy] = inputs;
        for ((((a, b), &x), &y), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let sig = 1.0 / (1.0 + math::exp(-x));
            *a = d * y * sig * (1.0 + x * (1.0 - sig));
            *b = d * x * sig;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn swiglu_gating_agrees_on_every_instruction_set() {
        let (g, u, dy) = (
            values(1037, 11, 8.0),
            values(1037, 12, 2.0),
            values(1037, 13, 1.0),
        );
        every_isa_agrees("silu·up", 1e-6, |isa| {
            let mut o = vec![0.0; g.len()];
            silu_mul_into_on(isa, &mut o, &g, &u);
            o
        });
        every_isa_agrees("silu·up backward", 1e-6, |isa| {
            let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
            silu_mul_backward_into_on(isa, &mut dg, &mut du, [&g, &u, &dy]);
            dg.extend(du);
            dg
        });
    }
}
