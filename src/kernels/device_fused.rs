//! Off the CPU (CUDA, Metal): candle-nn's fused forward kernels, given the backward pass they
//! lack. candle's `softmax_last_dim` and `rms_norm` run as one GPU kernel each, but record no
//! gradient (GUIDE §4); the compositions in [`super::reference`] train, at five to seven kernel
//! launches and as many intermediate tensors forward, and more backward. Here the fused kernel
//! computes the output, and a custom op hands that output on with a backward composed from
//! candle ops (which run on any device): the forward is the fused one, the backward is one
//! formula instead of autograd through the composition.
//!
//! The custom op's forward is a copy of the fused output (`y` is its last input, so its
//! backward can read it); a copy is one memory pass, against the composition's several.
//! Everything here also runs on the CPU (candle-nn has CPU versions of both kernels), which is
//! how the tests check it against the reference.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, D, Layout, MetalStorage, Result, Shape, Tensor,
};

/// Softmax over the last dimension: candle's fused kernel forward; backward
/// `dx = y ⊙ (g − Σ g⊙y)` over the row.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x)?;
    x.apply_op2(&y, SoftmaxBackward)
}

/// RMSNorm (`w ⊙ x / √(mean(x²) + eps)`): candle's fused kernel forward; backward composed
/// from `x`, `w` and the recomputed `1/rms` (one row reduction).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let y = candle_nn::ops::rms_norm(&x, &weight, eps as f32)?;
    x.apply_op3(&weight, &y, RmsNormBackward { eps })
}

/// A copy of the fused output `y` (the op's last input), on whatever device it lives.
fn copy_of<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("fused output is not a contiguous tensor from offset 0");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// The forward passes (CPU, CUDA, Metal) of an op whose output is a copy of its last input,
/// the fused kernel's result; the identifiers name the inputs before it, which are unused.
macro_rules! forward_copies_last_input {
    ($($unused:ident),*) => {
        fn cpu_fwd(
            &self,
            $($unused: &CpuStorage, _: &Layout,)*
            y: &CpuStorage,
            l: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            copy_of(y, l)
        }

        fn cuda_fwd(
            &self,
            $($unused: &CudaStorage, _: &Layout,)*
            y: &CudaStorage,
            l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            copy_of(y, l)
        }

        fn metal_fwd(
            &self,
            $($unused: &MetalStorage, _: &Layout,)*
            y: &MetalStorage,
            l: &Layout,
        ) -> Result<(MetalStorage, Shape)> {
            copy_of(y, l)
        }
    };
}

struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-fused-fwd"
    }

    forward_copies_last_input!(_x);

    fn bwd(
        &self,
        _x: &Tensor,
        _y_in: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let row_dot = (g * y)?.sum_keepdim(D::Minus1)?;
        let dx = (y * g.broadcast_sub(&row_dot)?)?;
        Ok((Some(dx), None))
    }
}

struct RmsNormBackward {
    eps: f64,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-fused-fwd"
    }

    forward_copies_last_input!(_x, _w);

    /// With `r = 1/√(mean(x²) + eps)` and `x̂ = x·r`: `dw = Σ_rows g⊙x̂` and
    /// `dx = r·(g⊙w − x̂·mean(g⊙w⊙x̂))` over each row.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y_in: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let x_hat = x.broadcast_mul(&inv_rms)?;
        let gw = g.broadcast_mul(w)?;
        let proj = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = (gw - x_hat.broadcast_mul(&proj)?)?.broadcast_mul(&inv_rms)?;
        let width = w.dim(0)?;
        let dw = (g * &x_hat)?.reshape(((), width))?.sum(0)?;
        Ok((Some(dx), Some(dw), None))
    }
}
