//! Tests of the trainable BERT encoder, its reward model and the fused CPU kernels.
//!
//! The MiniLM test needs the real all-MiniLM-L6-v2 weights (scripts/fetch-models.sh); everything
//! else runs on tiny seeded models and the tiny tokenizer in tests/fixtures/bert/.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rlhf_bot::kernels;
use rlhf_bot::model::bert::{
    BertConfig, BertRewardModel, EncodedBatch, HiddenAct, Kernels, LoadedTokenizer,
    RewardHeadConfig,
};

use crate::common::max_abs_diff;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Where scripts/fetch-models.sh put the real models, if it has been run.
fn minilm_dir() -> Option<PathBuf> {
    let base = std::env::var_os("RLHF_MODELS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rlhf-bot/models"))
        })?;
    let dir = base.join("all-MiniLM-L6-v2");
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: all-MiniLM-L6-v2 not found under {}; run scripts/fetch-models.sh",
            base.display()
        );
        None
    }
}

pub(crate) fn tiny_config() -> BertConfig {
    let mut cfg = BertConfig::minilm_l6();
    cfg.vocab_size = 41; // the fixture tokenizer's vocabulary
    cfg.hidden_size = 16;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.intermediate_size = 32;
    cfg.max_position_embeddings = 24;
    cfg
}

fn tiny_batch(dev: &Device) -> EncodedBatch {
    let rows = vec![
        vec![2, 7, 8, 9, 10, 20, 3],
        vec![2, 12, 8, 14, 6, 13, 20, 3, 5, 3],
        vec![2, 32, 3],
    ];
    EncodedBatch::from_ids(&rows, 0, dev).expect("batch")
}

fn vec2(v: &serde_json::Value) -> Vec<Vec<f64>> {
    serde_json::from_value(v.clone()).expect("2-D number array")
}

#[test]
fn minilm_reproduces_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("vectors/minilm_reference.json")).unwrap(),
    )
    .unwrap();
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let dev = Device::Cpu;
    let mut model = BertRewardModel::load(&dir, &[], &dev).expect("load MiniLM");
    let batch = model.encode(&texts, &dev).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        ids,
        "token ids differ from the reference"
    );
    let mask: Vec<Vec<f32>> = serde_json::from_value(reference["attention_mask"].clone()).unwrap();
    assert_eq!(batch.attention_mask.to_vec2::<f32>().unwrap(), mask);

    let want_tok0 = vec2(&reference["last_hidden_state_tok0_first8"]);
    let want_emb = vec2(&reference["embedding_first8"]);
    let want_cos = vec2(&reference["cosine"]);
    for kernels in [Kernels::Reference, Kernels::Fused] {
        model.encoder_mut().set_kernels(kernels);
        let hidden = model.encoder().forward(&batch, false).unwrap();
        let tok0 = hidden
            .narrow(1, 0, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .narrow(1, 0, 8)
            .unwrap();
        let emb = model.encoder().embed(&batch).unwrap();
        let cos = emb.matmul(&emb.t().unwrap()).unwrap();
        let checks = [
            (
                "last_hidden_state[:, 0, :8]",
                tok0.to_vec2::<f32>().unwrap(),
                &want_tok0,
            ),
            (
                "embedding[:, :8]",
                emb.narrow(1, 0, 8).unwrap().to_vec2::<f32>().unwrap(),
                &want_emb,
            ),
            ("cosine", cos.to_vec2::<f32>().unwrap(), &want_cos),
        ];
        for (what, got, want) in checks {
            for (gr, wr) in got.iter().zip(want.iter()) {
                for (g, w) in gr.iter().zip(wr) {
                    assert!(
                        (f64::from(*g) - w).abs() < 1e-4,
                        "{kernels:?} {what}: got {g}, want {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    for kernels in [Kernels::Reference, Kernels::Fused] {
        let head = RewardHeadConfig {
            aspects: vec!["accuracy".into()],
            ..Default::default()
        };
        let mut model = BertRewardModel::new_seeded(&tiny_config(), head, &dev, 7).unwrap();
        model.encoder_mut().set_kernels(kernels);
        let batch = tiny_batch(&dev);
        // Segment ids 1 on some tokens so the token-type table's second row is used too.
        let mut batch = batch;
        batch.token_type_ids = Tensor::from_vec(
            (0..30u32).map(|i| (i % 3 == 0) as u32).collect::<Vec<_>>(),
            (3, 10),
            &dev,
        )
        .unwrap();
        let out = model.forward(&batch, false).unwrap();
        // A loss that depends non-linearly on every output, so no gradient cancels by symmetry.
        let loss = (out.score.sqr().unwrap().sum_all().unwrap()
            + out.aspects["accuracy"].sin().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = model.named_vars();
        assert!(
            vars.len() > 30,
            "expected the whole encoder in the varmap, got {}",
            vars.len()
        );
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kernels:?}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{kernels:?}: gradient of {name} is {norm}"
            );
        }
    }
}

#[test]
fn fused_and_reference_encoders_agree_forward_and_backward() {
    let dev = Device::Cpu;
    let mut model =
        BertRewardModel::new_seeded(&tiny_config(), RewardHeadConfig::default(), &dev, 3).unwrap();
    let batch = tiny_batch(&dev);
    let mut results = Vec::new();
    // The third run is what a GPU runs: `Reference`, whose layer norm and softmax take candle's
    // fused kernels with `kernels::device_fused`'s backward there (forced here on the CPU).
    for (kernels, gpu_path) in [
        (Kernels::Reference, false),
        (Kernels::Fused, false),
        (Kernels::Reference, true),
    ] {
        model.encoder_mut().set_kernels(kernels);
        let run = || {
            let out = model.forward(&batch, false).unwrap();
            let grads = out.score.sum_all().unwrap().backward().unwrap();
            let g: HashMap<String, Tensor> = model
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            (out.score, g)
        };
        results.push(if gpu_path {
            rlhf_bot::kernels::with_gpu_path(run)
        } else {
            run()
        });
    }
    let (s_ref, g_ref) = &results[0];
    for (what, (s_other, g_other)) in [("fused", &results[1]), ("GPU path", &results[2])] {
        assert!(max_abs_diff(s_ref, s_other) < 1e-5, "{what}: scores differ");
        assert_same_gradients(what, g_ref, g_other);
    }
}

/// Every gradient in `other` within 1e-3 (relative to the largest of that tensor) of `reference`'s.
fn assert_same_gradients(
    what: &str,
    reference: &HashMap<String, Tensor>,
    other: &HashMap<String, Tensor>,
) {
    for (name, g) in reference {
        let scale = g
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let diff = max_abs_diff(g, &other[name]);
        assert!(
            diff / scale < 1e-3,
            "{what}: gradient of {name} differs: {diff} (scale {scale})"
        );
    }
}

#[test]
fn save_and_load_round_trip() {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let head = RewardHeadConfig {
        aspects: vec!["helpfulness".into()],
        ..Default::default()
    };
    let mut model = BertRewardModel::new_seeded(&tiny_config(), head, &dev, 11).unwrap();
    model.set_tokenizer(
        LoadedTokenizer::from_file(&fixtures().join("bert/tokenizer.json")).unwrap(),
    );
    model.save(tmp.path()).unwrap();
    let loaded = BertRewardModel::load(tmp.path(), &[], &dev).unwrap();
    assert_eq!(loaded.config(), model.config());
    assert_eq!(loaded.head_config(), model.head_config());
    let (a, b) = (model.named_vars(), loaded.named_vars());
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(
            max_abs_diff(va.as_tensor(), vb.as_tensor()),
            0.0,
            "{na} changed on round trip"
        );
    }
    assert_eq!(
        std::fs::read(tmp.path().join("tokenizer.json")).unwrap(),
        std::fs::read(fixtures().join("bert/tokenizer.json")).unwrap()
    );
    let batch = loaded
        .encode(&["The man is eating bread.", "yes"], &dev)
        .unwrap();
    let (sa, sb) = (
        model.forward(&batch, false).unwrap(),
        loaded.forward(&batch, false).unwrap(),
    );
    assert_eq!(max_abs_diff(&sa.score, &sb.score), 0.0);
    assert_eq!(
        max_abs_diff(&sa.aspects["helpfulness"], &sb.aspects["helpfulness"]),
        0.0
    );
}

#[test]
fn loads_bert_prefixed_checkpoints_and_initialises_missing_heads() {
    let dev = Device::Cpu;
    let src =
        BertRewardModel::new_seeded(&tiny_config(), RewardHeadConfig::default(), &dev, 5).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // An encoder-only checkpoint with BertForSequenceClassification's "bert." prefix.
    let tensors: HashMap<String, Tensor> = src
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("score."))
        .map(|(n, v)| (format!("bert.{n}"), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(src.config()).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("bert/tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let loaded = BertRewardModel::load(tmp.path(), &["accuracy".to_string()], &dev).unwrap();
    let batch = tiny_batch(&dev);
    let (a, b) = (
        src.encoder().forward(&batch, false).unwrap(),
        loaded.encoder().forward(&batch, false).unwrap(),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(loaded.head_config().aspects, vec!["accuracy".to_string()]);
    let out = loaded.forward(&batch, false).unwrap();
    assert_eq!(out.aspects["accuracy"].dims(), &[3]);

    // A missing encoder tensor is an error naming it.
    let mut partial = tensors.clone();
    partial.remove("bert.encoder.layer.1.output.dense.weight");
    candle_core::safetensors::save(&partial, tmp.path().join("model.safetensors")).unwrap();
    let err = BertRewardModel::load(tmp.path(), &[], &dev).unwrap_err();
    assert!(
        format!("{err:#}").contains("encoder.layer.1.output.dense.weight"),
        "{err:#}"
    );
}

#[test]
fn config_rejects_bad_shapes_and_keeps_unknown_keys() {
    let json = r#"{"vocab_size": 10, "hidden_size": 30, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 8, "max_position_embeddings": 8,
        "hidden_act": "gelu", "some_future_key": [1, 2]}"#;
    let cfg: BertConfig = serde_json::from_str(json).unwrap();
    assert_eq!(cfg.hidden_act, HiddenAct::Gelu);
    assert_eq!(cfg.extra["some_future_key"], serde_json::json!([1, 2]));
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("30") && err.contains("4"), "{err}");
    let back: serde_json::Value = serde_json::to_value(&cfg).unwrap();
    assert_eq!(back["some_future_key"], serde_json::json!([1, 2]));
}

// ---- fused kernels against their unfused reference compositions -------------------------------

/// Deterministic pseudo-random values in [-amp, amp).
fn values(n: usize, seed: u32, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

fn var(shape: &[usize], seed: u32, amp: f32) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&Tensor::from_vec(values(n, seed, amp), shape, &Device::Cpu).unwrap()).unwrap()
}

/// Runs `f` on `inputs` and returns the output and the gradient of `Σ out ⊙ w` for a fixed random
/// `w` (so every output element gets a distinct upstream gradient).
fn fwd_bwd(
    inputs: &[Var],
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let w = Tensor::from_vec(values(out.elem_count(), 99, 1.0), out.shape(), &Device::Cpu).unwrap();
    let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = inputs
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
        .collect();
    (out, gs)
}

fn assert_same(
    what: &str,
    inputs: &[Var],
    fused: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    tol: f32,
) {
    let (yf, gf) = fwd_bwd(inputs, fused);
    let (yr, gr) = fwd_bwd(inputs, reference);
    assert_eq!(yf.dims(), yr.dims(), "{what}: output shape");
    let d = max_abs_diff(&yf, &yr);
    assert!(d < tol, "{what}: forward differs by {d}");
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        let d = max_abs_diff(a, b);
        let scale = b
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            scale > 0.0,
            "{what}: reference gradient {i} is all zero, the test proves nothing"
        );
        assert!(
            d < tol * scale.max(1.0),
            "{what}: gradient of input {i} differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn fused_bias_add_matches_reference() {
    let inputs = [var(&[3, 70, 24], 1, 2.0), var(&[24], 2, 1.0)];
    assert_same(
        "bias_add",
        &inputs,
        &|t| kernels::bias_add(&t[0], &t[1]),
        &|t| kernels::reference::bias_add(&t[0], &t[1]),
        1e-6,
    );
}

#[test]
fn fused_linear_matches_reference() {
    let inputs = [
        var(&[2, 33, 24], 3, 1.0),
        var(&[40, 24], 4, 0.3),
        var(&[40], 5, 0.5),
    ];
    assert_same(
        "linear",
        &inputs,
        &|t| kernels::linear(&t[0], &t[1], &t[2]),
        &|t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2]),
        1e-5,
    );
}

#[test]
fn fused_linear_gelu_matches_reference() {
    let inputs = [
        var(&[3, 21, 24], 15, 2.0),
        var(&[56, 24], 16, 0.5),
        var(&[56], 17, 1.0),
    ];
    assert_same(
        "linear_gelu",
        &inputs,
        &|t| kernels::linear_gelu(&t[0], &t[1], &t[2]),
        &|t| kernels::reference::linear(&t[0], &t[1], &t[2])?.gelu_erf(),
        1e-5,
    );
}

#[test]
fn fused_bias_gelu_matches_reference() {
    let inputs = [var(&[5, 77, 40], 6, 4.0), var(&[40], 7, 1.0)];
    assert_same(
        "bias_gelu",
        &inputs,
        &|t| kernels::bias_gelu(&t[0], &t[1]),
        &|t| kernels::reference::bias_gelu(&t[0], &t[1]),
        1e-5,
    );
}

#[test]
fn fused_layer_norm_matches_reference() {
    let inputs = [
        var(&[4, 50, 48], 8, 3.0),
        var(&[48], 9, 1.5),
        var(&[48], 10, 1.0),
    ];
    assert_same(
        "layer_norm",
        &inputs,
        &|t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-12),
        &|t| kernels::reference::layer_norm(&t[0], &t[1], &t[2], 1e-12),
        1e-4,
    );
}

#[test]
fn fused_softmax_matches_reference() {
    let inputs = [var(&[6, 20, 33], 11, 6.0)];
    assert_same(
        "softmax",
        &inputs,
        &|t| kernels::softmax_last_dim(&t[0]),
        &|t| kernels::reference::softmax_last_dim(&t[0]),
        1e-6,
    );
}

#[test]
fn fused_attention_matches_reference_with_padding() {
    let (b, t, heads, d) = (3, 13, 4, 8);
    let inputs = [
        var(&[b, t, heads * d], 12, 1.0),
        var(&[b, t, heads * d], 13, 1.0),
        var(&[b, t, heads * d], 14, 1.0),
    ];
    // Row 0 full, row 1 padded after 9 tokens, row 2 after 4.
    let lens = [13usize, 9, 4];
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..t).map(move |i| if i < l { 0.0 } else { -1e9 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let m1 = mask.clone();
    assert_same(
        "attention",
        &inputs,
        &move |x| kernels::attention(&x[0], &x[1], &x[2], &m1, heads, scale),
        &move |x| kernels::reference::attention(&x[0], &x[1], &x[2], &mask, heads, scale),
        1e-5,
    );
}

/// The whole-layer op against the same layer composed from the reference ops: output, input
/// gradient and all sixteen parameter gradients, with padded rows in the batch.
#[test]
fn fused_encoder_layer_matches_reference_with_padding() {
    let (b, t, heads, d, f) = (3usize, 11usize, 4usize, 6usize, 40usize);
    let h = heads * d;
    let mut inputs = vec![var(&[b, t, h], 30, 1.0)];
    for (i, shape) in [
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h],
        vec![h],
        vec![f, h],
        vec![f],
        vec![h, f],
        vec![h],
        vec![h],
        vec![h],
    ]
    .iter()
    .enumerate()
    {
        // Norm weights near 1 like a trained model; everything else small and random.
        let v = var(shape, 31 + i as u32, 0.3);
        if i == 8 || i == 14 {
            let ones = (v.as_tensor() + 1.0).unwrap();
            inputs.push(Var::from_tensor(&ones).unwrap());
        } else {
            inputs.push(v);
        }
    }
    let lens = [11usize, 7, 3];
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..t).map(move |i| if i < l { 0.0 } else { -1e9 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    let params = |p: &[Tensor]| -> Vec<[Tensor; 2]> {
        p.chunks_exact(2)
            .map(|c| [c[0].clone(), c[1].clone()])
            .collect()
    };
    let run = |x: &[Tensor], fused_op: bool| -> candle_core::Result<Tensor> {
        let p = params(&x[1..]);
        let pair = |i: usize| [&p[i][0], &p[i][1]];
        let lp = kernels::EncoderLayerParams {
            query: pair(0),
            key: pair(1),
            value: pair(2),
            attn_out: pair(3),
            attn_norm: pair(4),
            intermediate: pair(5),
            output: pair(6),
            out_norm: pair(7),
        };
        if fused_op {
            kernels::encoder_layer(&x[0], &lp, &mask, heads, 1e-12)
        } else {
            kernels::reference::encoder_layer(&x[0], &lp, &mask, heads, 1e-12)
        }
    };
    assert_same(
        "encoder layer",
        &inputs,
        &|x| run(x, true),
        &|x| run(x, false),
        2e-4,
    );
}

#[test]
fn fused_adamw_matches_candle_adamw() {
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let a = [var(&[70_000], 20, 1.0), var(&[3, 5], 21, 1.0)];
    let b: Vec<Var> = a
        .iter()
        .map(|v| Var::from_tensor(v.as_tensor()).unwrap())
        .collect();
    // The optimiser production runs (its kernels: `kernels::adamw`).
    let named = a
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("p{i}"), v.clone()));
    let cfg = rlhf_bot::train::optim::AdamWConfig {
        lr: params.lr,
        weight_decay: params.weight_decay,
        ..Default::default()
    };
    let mut fused_opt = rlhf_bot::train::optim::AdamW::new(named.collect(), cfg).unwrap();
    let mut candle_opt = candle_nn::AdamW::new(b.clone(), params).unwrap();
    for step in 0..3u32 {
        let loss = |vs: &[Var]| -> Tensor {
            let target =
                Tensor::from_vec(values(70_000, 30 + step, 1.0), 70_000, &Device::Cpu).unwrap();
            ((vs[0].as_tensor() - target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                + vs[1].as_tensor().sin().unwrap().sum_all().unwrap())
            .unwrap()
        };
        fused_opt.backward_step(&loss(&a)).unwrap();
        candle_opt.backward_step(&loss(&b)).unwrap();
    }
    for (x, y) in a.iter().zip(&b) {
        let d = max_abs_diff(x.as_tensor(), y.as_tensor());
        assert!(d < 1e-6, "parameters differ by {d} after 3 steps");
    }
    // The update really moved the parameters (not a no-op on both sides).
    let start = values(70_000, 20, 1.0);
    let now = a[0].as_tensor().to_vec1::<f32>().unwrap();
    assert!(start.iter().zip(&now).any(|(s, n)| (s - n).abs() > 1e-3));
}
