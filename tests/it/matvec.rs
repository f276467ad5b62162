//! The decode-shaped product `x · Wᵀ` (few rows, streaming SIMD kernel) against candle's matmul,
//! forward and backward, and the preallocated KV cache against recomputation (issue #4).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use rlhf_bot::kernels::matmul_t;
use rlhf_bot::model::generate::{CausalLm, KvCache};

use crate::common::max_abs_diff;

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    // Deterministic values without a global RNG: a cheap hash of the index.
    let (r, c) = shape;
    let data: Vec<f32> = (0..r * c)
        .map(|i| {
            let h = (i as u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_mul(0xBF58_476D_1CE4_E5B9)
                .rotate_left(31);
            (h % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn reference(x: &Tensor, w: &Tensor) -> Tensor {
    x.matmul(&w.t().unwrap()).unwrap()
}

#[test]
fn small_m_product_equals_matmul() {
    // k = 37 is not a multiple of any SIMD width (4, 8, 16 lanes), so every dot product has a
    // scalar tail. Each weight row is dotted with tiles of 8, 4 and 1 input rows: m = 8 and 16
    // use only 8-row tiles, m = 4 one 4-row tile, m = 3 three single rows, m = 13 all three
    // kinds (8 + 4 + 1), m = 1 the unprefetched single-row path.
    for m in [1, 3, 4, 8, 13, 16] {
        let x = randn((m, 37), m as u64);
        let w = randn((51, 37), 100 + m as u64);
        let y = matmul_t(&x, &w).unwrap();
        assert_eq!(y.dims(), &[m, 51]);
        let d = max_abs_diff(&y, &reference(&x, &w));
        assert!(d < 1e-5, "m={m}: max abs diff {d}");
    }
}

#[test]
fn large_weight_is_split_across_threads_and_still_equal() {
    // 1001 x 300 weights exceed one task's share, so several tasks write disjoint blocks.
    for m in [1, 5] {
        let x = randn((m, 300), 7 + m as u64);
        let w = randn((1001, 300), 11);
        let d = max_abs_diff(&matmul_t(&x, &w).unwrap(), &reference(&x, &w));
        assert!(d < 1e-4, "m={m}: max abs diff {d}");
    }
}

#[test]
fn many_rows_and_strided_inputs_take_the_matmul_path_with_the_same_result() {
    let x = randn((17, 37), 3);
    let w = randn((51, 37), 4);
    let d = max_abs_diff(&matmul_t(&x, &w).unwrap(), &reference(&x, &w));
    assert!(d < 1e-5, "m=17: {d}");
    // A transposed (strided) x is made contiguous; a strided w goes to matmul.
    let xt = randn((37, 4), 5).t().unwrap();
    let wt = randn((37, 51), 6).t().unwrap();
    let d = max_abs_diff(&matmul_t(&xt, &wt).unwrap(), &reference(&xt, &wt));
    assert!(d < 1e-5, "strided: {d}");
}

#[test]
fn small_m_backward_equals_matmul_backward() {
    for m in [1, 3, 8, 16] {
        let x = Var::from_tensor(&randn((m, 37), 20 + m as u64)).unwrap();
        let w = Var::from_tensor(&randn((51, 37), 40 + m as u64)).unwrap();
        let g = randn((m, 51), 60 + m as u64);
        let loss_fused = (matmul_t(&x, &w).unwrap() * &g).unwrap().sum_all().unwrap();
        let loss_ref = (reference(&x, &w) * &g).unwrap().sum_all().unwrap();
        let gf = loss_fused.backward().unwrap();
        let gr = loss_ref.backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w)] {
            let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            let d = max_abs_diff(a, b);
            assert!(d < 1e-5, "m={m}: grad {name} differs by {d}");
        }
    }
}

#[test]
fn non_f32_inputs_fall_back_to_matmul() {
    let x = randn((2, 9), 1).to_dtype(DType::F64).unwrap();
    let w = randn((5, 9), 2).to_dtype(DType::F64).unwrap();
    let y = matmul_t(&x, &w).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let d = (y - reference(&x, &w))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12);
}

fn tiny_policy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-policy")
}

#[test]
fn kv_cache_that_grows_past_its_first_buffer_equals_recomputation() {
    // A 3-token prompt gets a first buffer of 3 + 128 positions; feeding 140 more tokens one
    // at a time makes the cache reallocate and copy itself once. The cached logits must still
    // equal a full recomputation, right after the growth and at the end.
    let model =
        rlhf_bot::model::llama::load_frozen_causal_lm(&tiny_policy_dir(), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..143u32).map(|i| 1 + (i * 7919) % 49_000).collect();
    let tensor = |rows: Vec<Vec<u32>>| Tensor::new(rows, &Device::Cpu).unwrap();
    let mut cache = KvCache::new(model.num_layers());
    model
        .last_logits_cached(&tensor(vec![ids[..3].to_vec()]), &[vec![1; 3]], &mut cache)
        .unwrap();
    for t in 3..ids.len() {
        let mask = vec![vec![1u32; t + 1]];
        let step = model
            .last_logits_cached(&tensor(vec![vec![ids[t]]]), &mask, &mut cache)
            .unwrap();
        assert_eq!(cache.seq_len(), t + 1);
        if t == 131 || t + 1 == ids.len() {
            let full = model
                .last_logits_full(&tensor(vec![ids[..=t].to_vec()]), &mask)
                .unwrap();
            let d = max_abs_diff(&step, &full);
            assert!(d < 1e-4, "after {} positions: max abs diff {d}", t + 1);
        }
    }
}
