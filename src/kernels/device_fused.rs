//! Off the CPU (CUDA, Metal): candle-nn's fused forward kernels, given the backward pass they
//! lack. candle's `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` run as one GPU kernel
//! each, but record no gradient (GUIDE §4); the compositions in [`super::reference`] train, at
//! five to seven kernel launches and as many intermediate tensors forward, and more backward.
//! Here the fused kernel
//! computes the output, and a custom op hands that output on with a backward composed from
//! candle ops (which run on any device): the forward is the fused one, the backward is one
//! formula instead of autograd through the composition.
//!
//! The custom op's forward is a copy of the fused output (`y` is its last input, so its
//! backward can read it); a copy is one memory pass, against the composition's several.
//! SwiGLU's `silu(gate) ⊙ up` gets the same treatment so that its backward is one formula over
//! the inputs. GeLU (Gemma's tanh form, BERT's erf form) needs nothing here: candle's `gelu` and
//! `gelu_erf` are single GPU kernels that carry their own backward.
//! Everything here also runs on the CPU (candle-nn has CPU versions of these kernels), which is
//! how the tests check it against the reference, op by op and (`kernels::with_gpu_path`) in
//! whole models.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, D, Layout, MetalStorage, Result, Shape, Tensor,
};

/// Softmax over the last dimension: candle's fused kernel forward; backward
/// `dx = y ⊙ (g − Σ g⊙y)` over the row.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x)?;
    if untracked(&[&x]) {
        return Ok(y);
    }
    x.apply_op2(&y, SoftmaxBackward)
}

/// RMSNorm (`w ⊙ x / √(mean(x²) + eps)`): candle's fused kernel forward; backward composed
/// from `x`, `w` and the recomputed `1/rms` (one row reduction).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let y = candle_nn::ops::rms_norm(&x, &weight, eps as f32)?;
    if untracked(&[&x, &weight]) {
        return Ok(y);
    }
    x.apply_op3(&weight, &y, RmsNormBackward { eps })
}

/// Rotary position embeddings in transformers' layout (`x·cos + rotate_half(x)·sin`) for `x`
/// `[batch, heads, seq, head_dim]` and HF's tables `[batch, 1, seq, head_dim]`, whose two halves
/// are equal (`cat(freqs, freqs)`, as [`crate::model::ops::rope_tables`] builds them): candle's
/// fused `rope` kernel forward. A rotation's backward is the inverse rotation, so the backward
/// is the same kernel with `-sin`: one launch, where the composition's backward is six.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _heads, t, d) = super::rope_dims(x, cos, sin)?;
    // candle's kernel takes one half of each table, `[batch, seq, head_dim / 2]`.
    let half = |table: &Tensor| {
        table
            .reshape((b, t, d))?
            .narrow(D::Minus1, 0, d / 2)?
            .to_dtype(x.dtype())?
            .contiguous()
    };
    let (cos, sin) = (half(&cos.detach())?, half(&sin.detach())?);
    let x = x.contiguous()?;
    let y = candle_nn::rotary_emb::rope(&x, &cos, &sin)?;
    if untracked(&[&x]) {
        return Ok(y);
    }
    let minus_sin = sin.neg()?;
    x.apply_op2(&y, RopeBackward { cos, minus_sin })
}

/// `silu(gate) ⊙ up` (SwiGLU's gating): candle's silu kernel and a product forward, run on
/// detached inputs so autograd keeps nothing of them; backward composed from the inputs and a
/// fused sigmoid: `d_up = g·silu(gate)`, `d_gate = g·up·σ·(1 + gate − silu(gate))`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    super::same_gating_shape(gate, up)?;
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let y = (candle_nn::ops::silu(&gate.detach())? * up.detach())?;
    if untracked(&[&gate, &up]) {
        return Ok(y);
    }
    gate.apply_op3(&up, &y, SiluMulBackward)
}

/// Layer norm over the last dimension (`(x − μ)/√(σ² + eps) · w + b`, BERT's): candle's fused
/// kernel forward; backward composed from `x` and the recomputed row statistics. `w` and `b`
/// travel as one `[2·width]` tensor (the op has three inputs at most; `cat`'s backward splits
/// the gradient again), a copy the size of one row.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::layer_norm(&x, &weight.detach(), &bias.detach(), eps)?;
    if untracked(&[&x, weight, bias]) {
        return Ok(y);
    }
    let weight_and_bias = Tensor::cat(&[weight, bias], 0)?;
    x.apply_op3(&weight_and_bias, &y, LayerNormBackward { eps })
}

/// Whether no input records a graph (generation, scoring): the fused output then goes out as it
/// is, without the copy that carries a backward.
fn untracked(inputs: &[&Tensor]) -> bool {
    inputs.iter().all(|t| !t.track_op())
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

struct RopeBackward {
    cos: Tensor,
    minus_sin: Tensor,
}

impl CustomOp2 for RopeBackward {
    fn name(&self) -> &'static str {
        "rope-fused-fwd"
    }

    forward_copies_last_input!(_x);

    fn bwd(
        &self,
        _x: &Tensor,
        _y_in: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = candle_nn::rotary_emb::rope(&g.contiguous()?, &self.cos, &self.minus_sin)?;
        Ok((Some(dx), None))
    }
}

struct SiluMulBackward;

impl CustomOp3 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "silu-mul-fused-fwd"
    }

    forward_copies_last_input!(_gate, _up);

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y_in: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sigmoid = candle_nn::ops::sigmoid(gate)?;
        let silu = (gate * &sigmoid)?;
        let d_up = (g * &silu)?;
        // σ·(1 + x·(1 − σ)) = σ·(1 + x − silu): silu's derivative from values already here.
        let d_silu = ((gate - &silu)? + 1.0)?.mul(&sigmoid)?;
        let d_gate = ((g * up)? * d_silu)?;
        Ok((Some(d_gate), Some(d_up), None))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-fused-fwd"
    }

    forward_copies_last_input!(_x, _wb);

    /// With `r = 1/√(σ² + eps)` and `x̂ = (x − μ)·r`: `dw = Σ_rows g⊙x̂`, `db = Σ_rows g` and
    /// `dx = r·(g⊙w − mean(g⊙w) − x̂·mean(g⊙w⊙x̂))` over each row.
    fn bwd(
        &self,
        x: &Tensor,
        weight_and_bias: &Tensor,
        _y_in: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = x.dim(D::Minus1)?;
        let w = weight_and_bias.narrow(0, 0, width)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let x_hat = centred.broadcast_mul(&inv_std)?;
        let gw = g.broadcast_mul(&w)?;
        let proj = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?
            .sub(&x_hat.broadcast_mul(&proj)?)?
            .broadcast_mul(&inv_std)?;
        let rows = |t: Tensor| t.reshape(((), width))?.sum(0);
        let dw = rows((g * &x_hat)?)?;
        let db = rows(g.clone())?;
        Ok((Some(dx), Some(Tensor::cat(&[dw, db], 0)?), None))
    }
}
