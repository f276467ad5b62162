//! Dense layer `y = act(x·Wᵀ + b)` as one candle custom op with a hand-written backward.
//!
//! candle's composition (matmul with a transposed weight view, broadcast bias add) leaves three
//! backward nodes per layer; the transpose node's gradient is a strided view that candle then adds
//! element by element on one thread, and the broadcast's bias gradient is a slow reduction. Here
//! the bias is folded into the gemm (its rows seed the output), the weight gradient `dyᵀ·x` is
//! written straight in `[out, in]` layout, the bias gradient is a parallel column sum, and the
//! optional GELU is applied in the same op (its pre-activation is kept for the backward). Every
//! product runs in the process's precision ([`super::precision`]: f32, or bf16 inputs with f32
//! accumulation).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{col_sums, rows_per_task};
use super::cpu::{f32_slice, with_f32};
use super::isa::multiversion;
use super::math;
use super::precision::projection_gemm;
use super::scratch::overwritable;

pub struct LinearOp {
    gelu: bool,
    /// Pre-activation `x·Wᵀ + b`, kept when `gelu` is set.
    pre: Mutex<Option<Vec<f32>>>,
}

impl LinearOp {
    pub fn new(gelu: bool) -> Self {
        Self {
            gelu,
            pre: Mutex::new(None),
        }
    }
}

/// `gelu_erf` of every element of `z`, on rayon's threads.
pub(super) fn gelu(z: &[f32]) -> Vec<f32> {
    let mut act = overwritable(z.len());
    act.par_chunks_mut(1 << 14)
        .zip(z.par_chunks(1 << 14))
        .for_each(|(a, z)| gelu_into(a, z));
    act
}

multiversion! {
    /// `a = gelu(z)`, element by element.
    fn gelu_into(a: &mut [f32], z: &[f32]) {
        for (a, z) in a.iter_mut().zip(z) {
            *a = math::gelu_with_grad(*z).0;
        }
    }
}

multiversion! {
    /// `d = g · gelu'(d)`: pre-activations in, pre-activation gradients out.
    fn gelu_grad_in_place(d: &mut [f32], g: &[f32]) {
        for (d, g) in d.iter_mut().zip(g) {
            *d = g * math::gelu_with_grad(*d).1;
        }
    }
}

/// Turns the pre-activations `z` into the pre-activation gradient `g·gelu'(z)` in place.
pub(super) fn gelu_backward_in_place(z: &mut [f32], g: &[f32]) {
    z.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14))
        .for_each(|(d, g)| gelu_grad_in_place(d, g));
}

/// `x·Wᵀ + b` for `x` `[rows, k]`, `w` `[n, k]`, on rayon's threads.
pub(super) fn affine(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (rows, n, k): (usize, usize, usize),
) -> Vec<f32> {
    affine_plus(x, w, b, None, (rows, n, k))
}

/// `x·Wᵀ + b + residual` (`residual` `[rows, n]`, when given), on rayon's threads: the bias and
/// the residual seed the output rows in one pass and the gemm accumulates onto them, so a
/// residual branch costs no separate add.
pub(super) fn affine_plus(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    residual: Option<&[f32]>,
    (rows, n, k): (usize, usize, usize),
) -> Vec<f32> {
    let mut y = overwritable(rows * n);
    let per = n * rows_per_task(n);
    match residual {
        Some(r) => y
            .par_chunks_mut(per)
            .zip(r.par_chunks(per))
            .for_each(|(c, r)| {
                for (row, r) in c.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                    for ((y, r), b) in row.iter_mut().zip(r).zip(b) {
                        *y = r + b;
                    }
                }
            }),
        None => y.par_chunks_mut(per).for_each(|c| {
            for row in c.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }),
    }
    // Wᵀ is read through swapped strides: element (k_i, n_j) = w[n_j * k + k_i].
    projection_gemm(
        (rows, n, k),
        &mut y,
        (n, 1),
        true,
        x,
        (k, 1),
        w,
        (1, k),
        1.0,
        rayon::current_num_threads(),
    );
    y
}

/// Gradients of `x·Wᵀ + b` (`x` `[rows, k]`, `w` `[n, k]`) from the output gradient `dz`:
/// `dx = dz·W` into `dx` (added to what it holds when `accumulate`, which is how a residual
/// branch's gradient joins without a separate pass), `dW = dzᵀ·x` straight into `dw` in W's
/// `[n, k]` layout, and `db = Σ_rows dz` into `db`.
#[allow(clippy::too_many_arguments)]
pub(super) fn affine_backward(
    x: &[f32],
    w: &[f32],
    dz: &[f32],
    (rows, n, k): (usize, usize, usize),
    (dx, accumulate): (&mut [f32], bool),
    dw: &mut [f32],
    db: &mut [f32],
) {
    let threads = rayon::current_num_threads();
    projection_gemm(
        (rows, k, n),
        dx,
        (k, 1),
        accumulate,
        dz,
        (n, 1),
        w,
        (k, 1),
        1.0,
        threads,
    );
    projection_gemm(
        (n, k, rows),
        dw,
        (k, 1),
        false,
        dz,
        (1, n),
        x,
        (k, 1),
        1.0,
        threads,
    );
    db.copy_from_slice(&col_sums(dz, n));
}

fn dims(lx: &Layout, lw: &Layout, lb: &Layout) -> Result<(usize, usize, usize)> {
    let &[n, k] = lw.dims() else {
        bail!(
            "fused linear: weight must be [out, in], got {:?}",
            lw.dims()
        );
    };
    if lx.dims().last() != Some(&k) {
        bail!(
            "fused linear: input {:?} does not end in the weight's in-dimension {k}",
            lx.dims()
        );
    }
    if lb.dims() != [n] {
        bail!("fused linear: bias must be [{n}], got {:?}", lb.dims());
    }
    Ok((lx.shape().elem_count() / k.max(1), n, k))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        if self.gelu {
            "fused-linear-gelu"
        } else {
            "fused-linear"
        }
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
        let (rows, n, k) = dims(l1, l2, l3)?;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let mut out_dims = l1.dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = n;
        let y = affine(x, w, b, (rows, n, k));
        if !self.gelu {
            return Ok((CpuStorage::F32(y), out_dims.into()));
        }
        let act = gelu(&y);
        if let Ok(mut slot) = self.pre.lock() {
            *slot = Some(y);
        }
        Ok((CpuStorage::F32(act), out_dims.into()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, n, k) = dims(x.layout(), w.layout(), b.layout())?;
        let threads = rayon::current_num_threads();
        let saved = if self.gelu {
            self.pre.lock().ok().and_then(|mut p| p.take())
        } else {
            None
        };
        let (dx, dw, db) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(grad, |g| {
                    // Upstream gradient with respect to the pre-activation.
                    let dz_owned;
                    let dz: &[f32] = if self.gelu {
                        let z = match saved {
                            Some(z) if z.len() == rows * n => z,
                            _ => with_f32(b, |b| Ok(affine(x, w, b, (rows, n, k))))?,
                        };
                        let mut d = z;
                        gelu_backward_in_place(&mut d, g);
                        dz_owned = d;
                        &dz_owned
                    } else {
                        g
                    };
                    let dx = grad_input(dz, w, (rows, n, k), threads);
                    let dw = grad_weight(dz, x, (rows, n, k), threads);
                    Ok((dx, dw, col_sums(dz, n)))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, n, b.device())?),
        ))
    }
}

/// `dx = dz · W` for `dz` `[rows, n]` and `W` `[n, k]`.
fn grad_input(
    dz: &[f32],
    w: &[f32],
    (rows, n, k): (usize, usize, usize),
    threads: usize,
) -> Vec<f32> {
    let mut dx = vec![0f32; rows * k];
    projection_gemm(
        (rows, k, n),
        &mut dx,
        (k, 1),
        false,
        dz,
        (n, 1),
        w,
        (k, 1),
        1.0,
        threads,
    );
    dx
}

/// `dW = dzᵀ · x`, written directly in W's `[n, k]` layout.
fn grad_weight(
    dz: &[f32],
    x: &[f32],
    (rows, n, k): (usize, usize, usize),
    threads: usize,
) -> Vec<f32> {
    let mut dw = vec![0f32; n * k];
    projection_gemm(
        (n, k, rows),
        &mut dw,
        (k, 1),
        false,
        dz,
        (1, n),
        x,
        (k, 1),
        1.0,
        threads,
    );
    dw
}

/// `y = x·Wᵀ` without a bias, for the decoder's projections (training and scoring shapes).
///
/// candle's matmul backward always forms both gradients, and for `x.matmul(&w.t())` the weight
/// gradient comes back transposed and is accumulated element by element into a zero-filled
/// tensor. Here `dW = dyᵀ·x` is written once in `[out, in]` layout, and each gradient is only
/// computed when its input is part of the graph: a frozen weight (a LoRA base, the reference
/// model) costs no `dW` product at all, which is a third of a frozen layer's backward.
pub struct MatmulWtOp;

fn matmul_wt_dims(lx: &Layout, lw: &Layout) -> Result<(usize, usize, usize)> {
    let &[n, k] = lw.dims() else {
        bail!(
            "fused matmul: weight must be [out, in], got {:?}",
            lw.dims()
        );
    };
    if lx.dims().last() != Some(&k) {
        bail!(
            "fused matmul: input {:?} does not end in the weight's in-dimension {k}",
            lx.dims()
        );
    }
    Ok((lx.shape().elem_count() / k.max(1), n, k))
}

impl candle_core::CustomOp2 for MatmulWtOp {
    fn name(&self) -> &'static str {
        "fused-matmul-wt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n, k) = matmul_wt_dims(l1, l2)?;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let mut y = vec![0f32; rows * n];
        projection_gemm(
            (rows, n, k),
            &mut y,
            (n, 1),
            false,
            x,
            (k, 1),
            w,
            (1, k),
            1.0,
            rayon::current_num_threads(),
        );
        let mut out_dims = l1.dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = n;
        Ok((CpuStorage::F32(y), out_dims.into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, n, k) = matmul_wt_dims(x.layout(), w.layout())?;
        let threads = rayon::current_num_threads();
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (dx, dw) = with_f32(x, |xs| {
            with_f32(w, |ws| {
                with_f32(grad, |g| {
                    let dx = want_dx.then(|| grad_input(g, ws, (rows, n, k), threads));
                    let dw = want_dw.then(|| grad_weight(g, xs, (rows, n, k), threads));
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            dx.map(|d| Tensor::from_vec(d, x.shape(), x.device()))
                .transpose()?,
            dw.map(|d| Tensor::from_vec(d, w.shape(), w.device()))
                .transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn gelu_and_its_gradient_agree_on_every_instruction_set() {
        // An odd length, so every version runs its scalar tail too.
        let z = values(1037, 1, 8.0);
        let g = values(1037, 2, 1.0);
        every_isa_agrees("gelu", 1e-6, |isa| {
            let mut a = vec![0.0; z.len()];
            gelu_into_on(isa, &mut a, &z);
            a
        });
        every_isa_agrees("gelu gradient", 1e-6, |isa| {
            let mut d = z.clone();
            gelu_grad_in_place_on(isa, &mut d, &g);
            d
        });
    }
}
