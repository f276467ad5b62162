//! The DPO-step speed work (issue #4): the fused RoPE and SwiGLU ops against the composed
//! candle ops they replace (values and gradients), the fused AdamW and gradient-norm pass
//! against the composed versions bit for bit, and the one-pass guard in `optimiser_step`.

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use rlhf_bot::kernels;
use rlhf_bot::model::ops;
use rlhf_bot::train::guard::GuardError;
use rlhf_bot::train::optim::{self, AdamW, AdamWConfig};
use rlhf_bot::train::policy_common::optimiser_step;

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Values and gradients (under a random upstream gradient) of `fused` and `plain` agree.
fn assert_same_op(
    inputs: &[Var],
    fused: impl Fn(&[Tensor]) -> Tensor,
    plain: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&xs), plain(&xs));
    assert_eq!(a.dims(), b.dims());
    for (x, y) in flat(&a).iter().zip(flat(&b)) {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "value {x} vs {y}");
    }
    let upstream = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
    let grads = |t: &Tensor| {
        (t * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (ga, gb) = (grads(&a), grads(&b));
    for v in inputs {
        let (x, y) = (
            ga.get(v.as_tensor()).expect("fused op gave no gradient"),
            gb.get(v.as_tensor()).unwrap(),
        );
        for (p, q) in flat(x).iter().zip(flat(y)) {
            assert!(
                (p - q).abs() <= tol * (1.0 + q.abs()),
                "gradient {p} vs {q}"
            );
        }
    }
}

#[test]
fn fused_rope_matches_the_composed_rotation() {
    let dev = Device::Cpu;
    let (b, h, t, d) = (2, 3, 5, 8);
    // Left-padded second row: its positions start later, as `positions_from_mask` gives them.
    let positions = vec![vec![0, 1, 2, 3, 4], vec![0, 0, 0, 1, 2]];
    let inv = ops::rope_inv_freq(d, 10_000.0);
    let (cos, sin) = ops::rope_tables(&positions, &inv, &dev).unwrap();
    // Through a transposed view, as the attention layer calls it.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h, d), &dev).unwrap()).unwrap();
    assert_same_op(
        std::slice::from_ref(&x),
        |xs| kernels::apply_rope(&xs[0].transpose(1, 2).unwrap(), &cos, &sin).unwrap(),
        |xs| kernels::reference::apply_rope(&xs[0].transpose(1, 2).unwrap(), &cos, &sin).unwrap(),
        1e-6,
    );
}

#[test]
fn fused_rope_refuses_tables_of_another_shape() {
    let dev = Device::Cpu;
    let inv = ops::rope_inv_freq(8, 10_000.0);
    let (cos, sin) = ops::rope_tables(&[vec![0, 1, 2]], &inv, &dev).unwrap();
    let x = Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &dev).unwrap();
    let err = kernels::apply_rope(&x, &cos, &sin).unwrap_err().to_string();
    assert!(err.contains("do not match"), "{err}");
}

#[test]
fn fused_silu_mul_matches_silu_times_up() {
    let dev = Device::Cpu;
    // More elements than one task block, and an odd count, so block edges are exercised.
    let shape = (3, 7, 1171);
    let g = Var::from_tensor(&Tensor::randn(0f32, 3.0, shape, &dev).unwrap()).unwrap();
    let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
    assert_same_op(
        &[g, u],
        |xs| kernels::silu_mul(&xs[0], &xs[1]).unwrap(),
        |xs| (xs[0].silu().unwrap() * &xs[1]).unwrap(),
        1e-5,
    );
}

fn bits(t: &Tensor) -> Vec<u32> {
    flat(t).iter().map(|x| x.to_bits()).collect()
}

fn adamw_cfg() -> AdamWConfig {
    AdamWConfig {
        lr: 0.01,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.05,
    }
}

/// The fused update with a folded-in clip coefficient equals scaling the gradients first and
/// running candle's own AdamW, bit for bit, over several steps and a tensor large enough to be
/// split across threads.
#[test]
fn scaled_adamw_step_equals_clipping_then_candle_adamw() {
    let dev = Device::Cpu;
    let init = Tensor::randn(0f32, 1.0, (300, 257), &dev).unwrap();
    let ours = Var::from_tensor(&init).unwrap();
    let theirs = Var::from_tensor(&init).unwrap();
    let cfg = adamw_cfg();
    let mut opt = AdamW::new(vec![("w".into(), ours.clone())], cfg).unwrap();
    let mut reference = candle_nn::AdamW::new(
        vec![theirs.clone()],
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    let target = Tensor::randn(0f32, 1.0, (300, 257), &dev).unwrap();
    let loss = |v: &Var| {
        v.as_tensor()
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    for step in 0..4 {
        let coef = [0.25, 0.5, 1e-3, 0.9][step];
        opt.step_scaled(&loss(&ours).backward().unwrap(), Some(coef))
            .unwrap();
        let mut g = loss(&theirs).backward().unwrap();
        let scaled = g
            .get(theirs.as_tensor())
            .unwrap()
            .affine(coef, 0.0)
            .unwrap();
        g.insert(theirs.as_tensor(), scaled);
        reference.step(&g).unwrap();
    }
    assert_eq!(bits(ours.as_tensor()), bits(theirs.as_tensor()));
    assert_ne!(bits(ours.as_tensor()), bits(&init));
}

#[test]
fn gradient_sum_of_squares_matches_f64_reference() {
    let g = Tensor::randn(0f32, 2.0, (513, 129), &Device::Cpu).unwrap();
    let want: f64 = flat(&g).iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let got = optim::grad_sq_sum(&g).unwrap();
    assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
    let mut bad = flat(&g);
    bad[40_000] = f32::NAN;
    let bad = Tensor::from_vec(bad, (513, 129), &Device::Cpu).unwrap();
    assert!(!optim::grad_sq_sum(&bad).unwrap().is_finite());
}

/// `optimiser_step` clips like `clip_grad_norm` + `step` did, returns the pre-clip norm, and
/// names the parameter whose gradient is not finite without touching any weight.
#[test]
fn optimiser_step_clips_in_the_update_and_guards_gradients() {
    let dev = Device::Cpu;
    let a0 = Tensor::new(&[3.0f32, 0.0], &dev).unwrap();
    let b0 = Tensor::new(&[[0.0f32], [4.0]], &dev).unwrap();
    let (a, b) = (
        Var::from_tensor(&a0).unwrap(),
        Var::from_tensor(&b0).unwrap(),
    );
    let (a2, b2) = (
        Var::from_tensor(&a0).unwrap(),
        Var::from_tensor(&b0).unwrap(),
    );
    let cfg = adamw_cfg();
    let mut opt = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
    let mut plain = AdamW::new(
        vec![("a".into(), a2.clone()), ("b".into(), b2.clone())],
        cfg,
    )
    .unwrap();
    // loss = 0.5·|a|² + 0.5·|b|²: gradient (a, b), global norm 5.
    let loss = |a: &Var, b: &Var| {
        let l = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        (l * 0.5).unwrap()
    };
    let norm = optimiser_step(&mut opt, &loss(&a, &b), 1, Some(1.0)).unwrap();
    assert!((norm - 5.0).abs() < 1e-6, "{norm}");
    let mut grads = loss(&a2, &b2).backward().unwrap();
    let params = [("a", &a2), ("b", &b2)];
    optim::clip_grad_norm(&mut grads, &params, 1.0).unwrap();
    plain.step(&grads).unwrap();
    assert_eq!(bits(a.as_tensor()), bits(a2.as_tensor()));
    assert_eq!(bits(b.as_tensor()), bits(b2.as_tensor()));

    let before = bits(a.as_tensor());
    let nan = (b.as_tensor().sum_all().unwrap() * f64::NAN).unwrap();
    let l = (loss(&a, &b) + nan).unwrap();
    // A NaN loss is refused first; a finite loss with a NaN gradient names the parameter.
    assert!(optimiser_step(&mut opt, &l, 2, Some(1.0)).is_err());
    let inf_grad = b.as_tensor().sqrt().unwrap().sum_all().unwrap(); // d/db sqrt(0) = inf
    let err = optimiser_step(&mut opt, &(loss(&a, &b) + inf_grad).unwrap(), 3, None).unwrap_err();
    assert_eq!(
        err.downcast_ref::<GuardError>(),
        Some(&GuardError::NonFiniteGradient {
            step: 3,
            param: "b".into()
        })
    );
    assert_eq!(
        bits(a.as_tensor()),
        before,
        "a refused step changed a weight"
    );
}

/// Both backward paths of the fused LM-head op (softmax kept from forward, and logits
/// recomputed when over budget) give the gradients of the plain `log_softmax(h·Wᵀ)` graph,
/// over several chunks with a ragged last one.
#[test]
fn fused_lm_head_matches_autograd_with_and_without_kept_softmax() {
    let dev = Device::Cpu;
    let (rows, d, vocab) = (37, 16, 301);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, d), &dev).unwrap()).unwrap();
    let targets: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 97 + 5) % vocab as u32)
        .collect();
    let idx = Tensor::new(targets.as_slice(), &dev)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    for budget in [0, usize::MAX] {
        assert_same_op(
            &[h.clone(), w.clone()],
            |xs| {
                kernels::lm_head_logprobs_with_budget(&xs[0], &xs[1], &targets, 8, budget).unwrap()
            },
            |xs| {
                let logits = xs[0].matmul(&xs[1].t().unwrap()).unwrap();
                candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)
                    .unwrap()
                    .gather(&idx, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
            1e-5,
        );
    }
}

/// The fused decoder attention (grouped KV heads, causal + padding mask) against the composed
/// candle ops: KV heads repeated, `softmax(Q Kᵀ·scale + bias) V`, heads merged into the last axis.
#[test]
fn fused_causal_attention_matches_the_composed_ops() {
    let dev = Device::Cpu;
    let (b, nh, nkv, t, d) = (2, 4, 2, 6, 8);
    // Row 1 is left-padded by two tokens.
    let mask = vec![vec![1u32; t], vec![0, 0, 1, 1, 1, 1]];
    let bias = ops::attention_bias(&mask, t, &dev).unwrap();
    let var = |h| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
    let (q, k, v) = (var(nh), var(nkv), var(nkv));
    let scale = 1.0 / (d as f32).sqrt();
    assert_same_op(
        &[q, k, v],
        |xs| rlhf_bot::kernels::causal_attention(&xs[0], &xs[1], &xs[2], &bias, scale).unwrap(),
        |xs| {
            let rep = |x: &Tensor| {
                let x = x
                    .unsqueeze(2)
                    .unwrap()
                    .repeat((1, 1, nh / nkv, 1, 1))
                    .unwrap();
                x.reshape((b, nh, t, d)).unwrap()
            };
            let scores = (xs[0].matmul(&rep(&xs[1]).t().unwrap()).unwrap() * f64::from(scale))
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
            probs
                .matmul(&rep(&xs[2]))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, nh * d))
                .unwrap()
        },
        1e-5,
    );
}
