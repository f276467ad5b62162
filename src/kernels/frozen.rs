//! Products with a frozen weight, `x · Wᵀ`, as the LoRA base and the reference policy multiply:
//! the input may need a gradient, the weight never does, and the weight may be stored in bf16
//! (`policy.precision: bf16`) while the activations stay f32.
//!
//! Why not candle's matmul: its backward computes the gradient of both operands whatever they
//! are, so a frozen weight costs a full `xᵀ·dy` gemm per layer that is then thrown away, and a
//! bf16 weight cannot meet an f32 input at all. Two routes:
//! - CPU, f32 input, bf16 weight: [`Bf16WeightProduct`] runs the bf16 gemm on the stored bf16
//!   values (AVX512_BF16; on other CPUs the weight is widened to f32 on the fly, one matrix at
//!   a time), and its backward is the same op against `W` untransposed. Decode shapes (at most
//!   [`MAX_ROWS`] input rows, the forward product) stream the stored rows through
//!   [`super::bf16_matvec`] instead, as f32 weights go to [`super::matvec`].
//! - Everywhere else (CUDA, the f64 test path, small f32 shapes): [`super::matmul_t`] on a
//!   detached input (bf16 autocast on CUDA), then [`InputGradOnly`] hands back the product and
//!   gives the input its gradient `dy · W`, nothing for the weight.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, bail,
};
use half::slice::HalfFloatSliceExt;

use super::bf16_gemm;
use super::bf16_matvec::bf16_matmul_wt_slices;
use super::cpu::f32_slice;
use super::matvec::MAX_ROWS;
use super::precision::{Precision, precision};
use super::sgemm::sgemm_threads;

/// `x · Wᵀ` for `x` `[m, k]` and a frozen `w` `[n, k]` (f32 or bf16): a gradient reaches `x`
/// only. The result has `x`'s dtype.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let on_cpu = x.device().is_cpu() && w.device().is_cpu();
    if on_cpu && x.dtype() == DType::F32 && w.dtype() == DType::BF16 {
        return x.contiguous()?.apply_op1(Bf16WeightProduct {
            w: w.contiguous()?,
            transposed: true,
        });
    }
    // The very product an unfrozen layer computes (decode-shape kernel, autocast), so the
    // frozen route changes gradients only, never values.
    let y = super::matmul_t(&x.detach(), w)?;
    let compute = autocast_dtype(x, w);
    if !x.track_op() {
        return Ok(y);
    }
    y.apply_op2(
        x,
        InputGradOnly {
            w: w.detach(),
            compute,
        },
    )
}

/// The dtype a product of `x` and `w` runs in off the fused CPU kernels: bf16 when either
/// operand is stored in bf16 or the process runs in bf16 on an accelerator (autocast: f32
/// master weights, bf16 products), else the input's dtype.
pub(super) fn autocast_dtype(x: &Tensor, w: &Tensor) -> DType {
    let floats = [DType::F32, DType::BF16];
    let autocast = !x.device().is_cpu() && precision() == Precision::Bf16;
    if floats.contains(&x.dtype()) && (w.dtype() == DType::BF16 || autocast) {
        DType::BF16
    } else {
        x.dtype()
    }
}

/// `x · op(W)` on the CPU with `W` held in bf16: `op(W) = Wᵀ` when `transposed` (the forward
/// product), `W` otherwise (the input gradient `dy · W`).
struct Bf16WeightProduct {
    w: Tensor,
    transposed: bool,
}

impl CustomOp1 for Bf16WeightProduct {
    fn name(&self) -> &'static str {
        "frozen-bf16-product"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (m, k) = l.shape().dims2()?;
        let (rows, cols) = self.w.dims2()?;
        let (n, wk) = if self.transposed {
            (rows, cols)
        } else {
            (cols, rows)
        };
        if wk != k {
            bail!(
                "{}: input [{m}, {k}] does not match the weight [{rows}, {cols}]",
                self.name()
            );
        }
        // op(W) read as a k×n matrix from the row-major [rows, cols] weight.
        let strides = if self.transposed {
            (1, cols)
        } else {
            (cols, 1)
        };
        let (storage, layout) = self.w.storage_and_layout();
        let Storage::Cpu(CpuStorage::BF16(data)) = &*storage else {
            bail!("{}: the weight must be bf16 on the CPU", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{}: the weight must be contiguous", self.name());
        };
        let w = &data[start..end];
        if self.transposed && m <= MAX_ROWS {
            // Decode shapes: stream the stored rows instead of repacking the whole matrix for
            // a handful of input rows.
            let y = bf16_matmul_wt_slices(x, w.reinterpret_cast(), m, n, k);
            return Ok((CpuStorage::F32(y), Shape::from((m, n))));
        }
        let threads = rayon::current_num_threads();
        let mut y = vec![0f32; m * n];
        if bf16_gemm::supported() {
            let bits: &[u16] = w.reinterpret_cast();
            bf16_gemm::bf16_gemm_bf16_rhs_threads(
                (m, n, k),
                &mut y,
                (x, (k, 1)),
                (bits, strides),
                threads,
            );
        } else {
            // No bf16 dot product on this CPU: widen this one matrix for the f32 gemm.
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            sgemm_threads(
                (m, n, k),
                &mut y,
                (n, 1),
                false,
                x,
                (k, 1),
                &wide,
                strides,
                1.0,
                threads,
            );
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let input_grad = Bf16WeightProduct {
            w: self.w.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(dy.contiguous()?.apply_op1(input_grad)?))
    }
}

/// Passes a product computed without a graph through unchanged (`arg1`), and gives its input
/// (`arg2`) the gradient `dy · W` in `compute` precision. No gradient is computed for `W`.
struct InputGradOnly {
    w: Tensor,
    compute: DType,
}

/// The product's storage as it is: it was just made by a matmul, so it is contiguous from 0.
fn pass_through<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if l.contiguous_offsets() != Some((0, l.shape().elem_count())) {
        bail!("frozen product: expected a fresh contiguous product");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-input-grad-only"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s1, l1)
    }

    // The only CUDA-specific code of the frozen path: hand the product's buffer back.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(s1, l1)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = dy
            .to_dtype(self.compute)?
            .matmul(&self.w.to_dtype(self.compute)?)?
            .to_dtype(x.dtype())?;
        Ok((None, Some(dx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `t` rounded to bf16 and back: what the bf16 kernels see of an f32 operand.
    fn rounded(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
        let gap = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        gap.max(0).unwrap().to_scalar().unwrap()
    }

    /// The bf16-held product and its input gradient equal f32 products of the bf16-rounded
    /// operands (what the bf16 gemm computes, up to f32 summation order), and the weight gets
    /// no gradient. Odd sizes exercise the pair padding and partial panels.
    #[test]
    fn a_bf16_held_weight_multiplies_as_its_rounded_f32_twin() {
        let dev = Device::Cpu;
        let (m, n, k) = (37, 53, 29);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();

        let y = frozen_matmul_t(x.as_tensor(), &w16).unwrap();
        let want = rounded(x.as_tensor())
            .matmul(&rounded(&w).t().unwrap())
            .unwrap();
        assert!(max_gap(&y, &want) < 1e-4, "forward: {}", max_gap(&y, &want));

        let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).expect("input gradient");
        let want_dx = rounded(&dy).matmul(&rounded(&w)).unwrap();
        assert!(
            max_gap(dx, &want_dx) < 1e-4,
            "dx: {}",
            max_gap(dx, &want_dx)
        );
        assert!(
            grads.get(&w16).is_none(),
            "the frozen weight got a gradient"
        );
    }

    /// Decode shapes (m ≤ MAX_ROWS) take the streaming bf16 kernel, longer inputs the bf16
    /// gemm: the same products up to f32 summation order, and the input gradient still flows.
    #[test]
    fn decode_shapes_of_a_bf16_held_weight_give_the_gemm_products() {
        let dev = Device::Cpu;
        let (n, k) = (67, 45);
        let w16 = Tensor::randn(0f32, 1.0, (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (MAX_ROWS + 9, k), &dev).unwrap();
        let through_gemm = frozen_matmul_t(&x, &w16).unwrap();
        for m in [1, 3, MAX_ROWS] {
            let rows = Var::from_tensor(&x.narrow(0, 0, m).unwrap()).unwrap();
            let streamed = frozen_matmul_t(rows.as_tensor(), &w16).unwrap();
            let want = through_gemm.narrow(0, 0, m).unwrap();
            let gap = max_gap(&streamed, &want);
            assert!(gap < 1e-4, "m={m}: {gap}");
            let grads = streamed.sum_all().unwrap().backward().unwrap();
            let dx = grads.get(rows.as_tensor()).expect("input gradient");
            let want_dx = Tensor::ones((m, n), DType::F32, &dev)
                .unwrap()
                .matmul(&rounded(&w16.to_dtype(DType::F32).unwrap()))
                .unwrap();
            assert!(max_gap(dx, &want_dx) < 1e-3, "m={m}: dx");
        }
    }

    /// The generic route (f64 here, CUDA on a GPU) gives the input the gradient of candle's
    /// plain product.
    #[test]
    fn the_generic_route_gives_the_input_candles_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (5, 7), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let ours = frozen_matmul_t(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gap = |a: &Tensor, b: &Tensor| {
            max_gap(
                &a.to_dtype(DType::F32).unwrap(),
                &b.to_dtype(DType::F32).unwrap(),
            )
        };
        assert!(gap(&ours, &plain) < 1e-6);
        let (d1, d2) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(gap(d1, d2) < 1e-6);
    }
}
