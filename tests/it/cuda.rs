//! The paths a CUDA run takes, checked on the CPU: the fused CPU ops have no CUDA kernel, so off
//! the CPU the model code falls back to candle's own ops. These tests pin the fallbacks to the
//! fused results, so a GPU run computes the same numbers (up to float rounding).

use candle_core::{DType, Device, Tensor, Var};
use rlhf_bot::kernels;

/// Values and the gradients of `Σ wᵢ·logpᵢ` for `h` and `w` (non-uniform weights so that no
/// row's gradient can hide behind another's).
fn logprobs_and_grads(
    logp: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    h: &Var,
    w: &Var,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let out = logp(h.as_tensor(), w.as_tensor()).unwrap();
    let rows = out.dim(0).unwrap();
    let weights: Vec<f64> = (0..rows)
        .map(|i| 1.0 + i as f64 * 0.5 - 2.0 * (i % 2) as f64)
        .collect();
    let weights = Tensor::new(weights, out.device())
        .unwrap()
        .to_dtype(out.dtype())
        .unwrap();
    let grads = (&out * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (
        flat(&out),
        flat(grads.get(h.as_tensor()).expect("grad for h")),
        flat(grads.get(w.as_tensor()).expect("grad for w")),
    )
}

/// Every value of `t` as f32, in order.
fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < tol, "{what}[{i}]: {x} vs {y}");
    }
}

fn inputs(dtype: DType) -> (Var, Var, Vec<u32>) {
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (11, 5), &dev).unwrap();
    let h = Var::from_tensor(&h.to_dtype(dtype).unwrap()).unwrap();
    let w = Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap();
    (h, w, vec![0, 3, 10, 5, 5, 1, 7])
}

/// The chunked generic LM-head log-probs (the CUDA path) equal the fused CPU op, values and
/// gradients, with chunks that do not divide the rows.
#[test]
fn generic_lm_head_logprobs_match_the_fused_op() {
    let (h, w, targets) = inputs(DType::F32);
    let fused = logprobs_and_grads(|h, w| kernels::lm_head_logprobs(h, w, &targets, 3), &h, &w);
    for chunk in [1, 3, 4, 100] {
        let generic = logprobs_and_grads(
            |h, w| kernels::reference::lm_head_logprobs(h, w, &targets, chunk),
            &h,
            &w,
        );
        assert_close(&format!("logp, chunk {chunk}"), &generic.0, &fused.0, 1e-5);
        assert_close(&format!("dh, chunk {chunk}"), &generic.1, &fused.1, 1e-4);
        assert_close(&format!("dW, chunk {chunk}"), &generic.2, &fused.2, 1e-4);
    }
}

/// Inputs the fused op cannot take (here f64; on a GPU, any CUDA tensor) are routed to the
/// generic path by `lm_head_logprobs` itself instead of failing in the op.
#[test]
fn lm_head_logprobs_falls_back_off_the_fused_path() {
    let (h, w, targets) = inputs(DType::F32);
    let fused = logprobs_and_grads(|h, w| kernels::lm_head_logprobs(h, w, &targets, 3), &h, &w);
    let (h64, w64) = (
        Var::from_tensor(&h.to_dtype(DType::F64).unwrap()).unwrap(),
        Var::from_tensor(&w.to_dtype(DType::F64).unwrap()).unwrap(),
    );
    let out = kernels::lm_head_logprobs(h64.as_tensor(), w64.as_tensor(), &targets, 3).unwrap();
    assert_eq!(out.dtype(), DType::F64);
    let wide = logprobs_and_grads(
        |h, w| kernels::lm_head_logprobs(h, w, &targets, 3),
        &h64,
        &w64,
    );
    assert_close("logp f64", &wide.0, &fused.0, 1e-5);
    assert_close("dh f64", &wide.1, &fused.1, 1e-4);
    assert_close("dW f64", &wide.2, &fused.2, 1e-4);
}

/// A row-count mismatch is an error on the generic path too, not a panic or a silent truncation.
#[test]
fn generic_lm_head_logprobs_rejects_mismatched_targets() {
    let (h, w, _) = inputs(DType::F32);
    let err =
        kernels::reference::lm_head_logprobs(h.as_tensor(), w.as_tensor(), &[1, 2], 4).unwrap_err();
    assert!(
        err.to_string().contains("7 hidden rows for 2 targets"),
        "{err}"
    );
}

/// Values, and gradients for `x` and `w` (empty when `w` gets none), of `Σ r ⊙ f(x, w)` with
/// fixed uneven weights `r = sin(0.37·i)`, so every output element's gradient counts differently.
fn values_and_grads(
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    x: &Var,
    w: &Var,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let out = f(x.as_tensor(), w.as_tensor()).unwrap();
    let r = (Tensor::arange(0f32, out.elem_count() as f32, out.device()).unwrap() * 0.37)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(out.shape())
        .unwrap();
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    (
        flat(&out),
        flat(grads.get(x.as_tensor()).expect("grad for x")),
        grads.get(w.as_tensor()).map(flat).unwrap_or_default(),
    )
}

/// The GPU path of softmax and RMSNorm — candle-nn's fused forward kernels with the backward
/// composed in `kernels::device_fused` — gives the reference composition's values and
/// gradients. Checked on the CPU, where candle-nn has versions of both kernels.
#[test]
fn device_fused_softmax_and_rms_norm_match_the_reference() {
    use rlhf_bot::kernels::{device_fused, reference};
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 7), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 7, &dev).unwrap()).unwrap();
    let run =
        |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| values_and_grads(f, &x, &w);
    let fused = run(&|x, _| device_fused::softmax_last_dim(x));
    let composed = run(&|x, _| reference::softmax_last_dim(x));
    assert_close("softmax", &fused.0, &composed.0, 1e-6);
    assert_close("softmax dx", &fused.1, &composed.1, 1e-5);

    let fused = run(&|x, w| device_fused::rms_norm(x, w, 1e-6));
    let composed = run(&|x, w| reference::rms_norm(x, w, 1e-6));
    assert_close("rms_norm", &fused.0, &composed.0, 1e-5);
    assert_close("rms_norm dx", &fused.1, &composed.1, 1e-4);
    assert_eq!(fused.2.len(), 7, "the weight gets a gradient");
    assert_close("rms_norm dw", &fused.2, &composed.2, 1e-4);
}

/// The rest of the GPU path's fused kernels — RoPE (candle's `rope`, backward the inverse
/// rotation), SwiGLU's gating (candle's silu, composed backward) and BERT's layer norm —
/// give the reference compositions' values and gradients, on the CPU.
#[test]
fn device_fused_rope_silu_mul_and_layer_norm_match_the_reference() {
    use rlhf_bot::kernels::{device_fused, reference};
    use rlhf_bot::model::ops;
    let dev = Device::Cpu;
    let var = |t: Tensor| Var::from_tensor(&t).unwrap();

    // Two rows, the first left-padded (its positions repeat 0), four heads of width 8.
    let positions = vec![vec![0, 0, 0, 1, 2], vec![0, 1, 2, 3, 4]];
    let inv_freq = ops::rope_inv_freq(8, 10_000.0);
    let (cos, sin) = ops::rope_tables_scaled(&positions, &inv_freq, 1.25, &dev).unwrap();
    let x = var(Tensor::randn(0f32, 1.0, (2, 4, 5, 8), &dev).unwrap());
    let unused = var(Tensor::zeros(1, DType::F32, &dev).unwrap());
    let fused = values_and_grads(|x, _| device_fused::rope(x, &cos, &sin), &x, &unused);
    let composed = values_and_grads(|x, _| reference::apply_rope(x, &cos, &sin), &x, &unused);
    assert_close("rope", &fused.0, &composed.0, 1e-5);
    assert_close("rope dx", &fused.1, &composed.1, 1e-5);
    // Without a graph to record (generation), the fused output goes out as it is.
    let untracked = device_fused::rope(&x.as_tensor().detach(), &cos, &sin).unwrap();
    assert_close("rope untracked", &flat(&untracked), &fused.0, 1e-7);
    let tables = Tensor::zeros((2, 1, 4, 8), DType::F32, &dev).unwrap();
    let err = device_fused::rope(x.as_tensor(), &tables, &tables).unwrap_err();
    assert!(err.to_string().contains("do not match input"), "{err}");

    let gate = var(Tensor::randn(0f32, 3.0, (2, 3, 7), &dev).unwrap());
    let up = var(Tensor::randn(0f32, 1.0, (2, 3, 7), &dev).unwrap());
    let fused = values_and_grads(device_fused::silu_mul, &gate, &up);
    let composed = values_and_grads(reference::silu_mul, &gate, &up);
    assert_close("silu_mul", &fused.0, &composed.0, 1e-5);
    assert_close("silu_mul d_gate", &fused.1, &composed.1, 1e-5);
    assert_close("silu_mul d_up", &fused.2, &composed.2, 1e-5);
    let untracked =
        device_fused::silu_mul(&gate.as_tensor().detach(), &up.as_tensor().detach()).unwrap();
    assert_close("silu_mul untracked", &flat(&untracked), &fused.0, 1e-7);

    let x = var(Tensor::randn(0.5f32, 2.0, (2, 3, 7), &dev).unwrap());
    let w = var(Tensor::randn(1f32, 0.3, 7, &dev).unwrap());
    let b = var(Tensor::randn(0f32, 0.3, 7, &dev).unwrap());
    let (wt, bt) = (w.as_tensor(), b.as_tensor());
    let fused = values_and_grads(|x, w| device_fused::layer_norm(x, w, bt, 1e-5), &x, &w);
    let composed = values_and_grads(|x, w| reference::layer_norm(x, w, bt, 1e-5), &x, &w);
    assert_close("layer_norm", &fused.0, &composed.0, 1e-5);
    assert_close("layer_norm dx", &fused.1, &composed.1, 1e-4);
    assert_eq!(fused.2.len(), 7, "the weight gets a gradient");
    assert_close("layer_norm dw", &fused.2, &composed.2, 1e-4);
    let untracked =
        device_fused::layer_norm(&x.as_tensor().detach(), &wt.detach(), &bt.detach(), 1e-5)
            .unwrap();
    assert_close("layer_norm untracked", &flat(&untracked), &fused.0, 1e-7);
    let fused = values_and_grads(|x, b| device_fused::layer_norm(x, wt, b, 1e-5), &x, &b);
    let composed = values_and_grads(|x, b| reference::layer_norm(x, wt, b, 1e-5), &x, &b);
    assert_eq!(fused.2.len(), 7, "the bias gets a gradient");
    assert_close("layer_norm db", &fused.2, &composed.2, 1e-4);
}

/// Off the fused CPU kernels (f64 here, any CUDA tensor on a GPU) a LoRA layer's frozen base is
/// multiplied without computing its gradient: candle's matmul backward computes `xᵀ·dy` for the
/// weight operand whether or not it is frozen (one full gemm per layer, thrown away), which
/// shows as a weight-shaped entry in the gradient store. The input and adapter gradients equal
/// candle's composition.
#[test]
fn the_fallback_path_computes_no_gradient_for_a_frozen_lora_base() {
    use candle_nn::{Linear, Module};
    use rlhf_bot::model::lora::LoraLinear;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let dev = Device::Cpu;
    let randn = |shape: (usize, usize)| {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (w, x) = (randn((6, 5)), Var::from_tensor(&randn((4, 5))).unwrap());
    let (a, b) = (
        Var::from_tensor(&randn((2, 5))).unwrap(),
        Var::from_tensor(&randn((6, 2))).unwrap(),
    );
    let layer = LoraLinear::new(
        &Linear::new(w.clone(), None),
        a.as_tensor().clone(),
        b.as_tensor().clone(),
        0.5,
        0.0,
        Arc::new(AtomicBool::new(false)),
    );
    let frozen = layer.base().weight().clone();
    // Gradients shaped like the weight or its transpose: [6, 5] or [5, 6] (x, A and B differ).
    let weight_shaped = |g: &candle_core::backprop::GradStore| {
        g.get_ids()
            .filter(|id| {
                let dims = g.get_id(**id).unwrap().dims().to_vec();
                dims == [6, 5] || dims == [5, 6]
            })
            .count()
    };
    let ours = (layer.forward(x.as_tensor()).unwrap().sqr().unwrap())
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        weight_shaped(&ours),
        0,
        "a gradient was computed for the frozen base weight"
    );

    // candle's own composition of the same layer: the frozen weight gets a gradient.
    let low = x
        .as_tensor()
        .matmul(&a.as_tensor().t().unwrap())
        .unwrap()
        .matmul(&b.as_tensor().t().unwrap())
        .unwrap();
    let y = (x.as_tensor().matmul(&frozen.t().unwrap()).unwrap() + (low * 0.5).unwrap()).unwrap();
    let composed = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(
        weight_shaped(&composed) > 0,
        "candle's matmul no longer computes a frozen weight's gradient: the workaround can go"
    );
    for (what, v) in [
        ("x", x.as_tensor()),
        ("A", a.as_tensor()),
        ("B", b.as_tensor()),
    ] {
        assert_close(
            &format!("d{what}"),
            &flat(ours.get(v).expect("gradient")),
            &flat(composed.get(v).expect("gradient")),
            1e-9,
        );
    }
}
