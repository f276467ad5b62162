//! Policy optimisation loops (DPO, KTO, PPO), their safety rails, checkpoint/resume, and the
//! policy evaluation, all on the tiny random Llama in `tests/fixtures/tiny-llama-policy`
//! (2 layers, hidden 16, SmolLM2's 49k vocabulary) and the tiny reward model in
//! `tests/fixtures/tiny-llama-rm`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_bot::run_outputs::{LogLine, PolicyAlgo};
use rlhf_bot::train::dpo_trainer::{PreferenceExample, train_dpo};
use rlhf_bot::train::policy_common::{LoraOptions, Policy, PolicyTrainOptions, RailError};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn policy_dir() -> PathBuf {
    fixtures().join("tiny-llama-policy")
}

fn rm_dir() -> PathBuf {
    fixtures().join("tiny-llama-rm")
}

fn toy_pairs() -> Vec<PreferenceExample> {
    [
        ("What is a carbon tax?", "A price on emissions.", "Bananas are yellow."),
        ("Define GDP.", "Total output of an economy.", "I like trains."),
        ("What is inflation?", "Rising prices over time.", "Purple."),
        ("What is a tariff?", "A tax on imports.", "No idea, sorry."),
    ]
    .iter()
    .map(|(p, c, r)| PreferenceExample {
        prompt: format!("User: {p}\nAssistant:"),
        chosen: format!(" {c}"),
        rejected: format!(" {r}"),
    })
    .collect()
}

fn dpo_opts(steps: u64) -> PolicyTrainOptions {
    PolicyTrainOptions {
        algo: PolicyAlgo::Dpo,
        lr: 5e-2,
        max_steps: Some(steps),
        batch_size: 2,
        grad_accum: 2,
        max_prompt_len: 32,
        max_completion_len: 16,
        lora: Some(LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
        }),
        checkpoint_every: 1000,
        ..PolicyTrainOptions::default()
    }
}

fn series(log: &[LogLine], key: &str) -> Vec<f64> {
    log.iter().filter_map(|l| l.get(key)).collect()
}

#[test]
fn dpo_loss_falls_and_margin_grows_on_a_toy_set() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = dpo_opts(12);
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let out = train_dpo(&mut policy, &toy_pairs(), &opts, tmp.path()).unwrap();
    assert_eq!(out.steps, 12);
    let loss = series(&out.log, "loss");
    let margin = series(&out.log, "rewards/margins");
    assert_eq!(loss.len(), 12);
    // Step 1: the policy equals the reference, so the loss is exactly ln 2 and the margin 0.
    assert!((loss[0] - std::f64::consts::LN_2).abs() < 1e-4, "{loss:?}");
    assert!(margin[0].abs() < 1e-4, "{margin:?}");
    assert!(loss[11] < loss[0] - 0.05, "loss did not fall: {loss:?}");
    assert!(margin[11] > 0.2, "margin did not grow: {margin:?}");
    assert_eq!(series(&out.log, "rewards/accuracies")[11], 1.0);
    for k in ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"] {
        assert_eq!(series(&out.log, k).len(), 12, "{k} missing from the log");
    }
    // log.jsonl on disk carries the same lines.
    let on_disk = rlhf_bot::run_outputs::read_log(tmp.path()).unwrap();
    assert_eq!(on_disk, out.log);
}

#[test]
fn dpo_stop_and_resume_equals_one_run() {
    let pairs = toy_pairs();
    let one = tempfile::tempdir().unwrap();
    let mut p1 = Policy::load(&policy_dir(), dpo_opts(4).lora.as_ref(), 1, &Device::Cpu).unwrap();
    let full = train_dpo(&mut p1, &pairs, &dpo_opts(4), one.path()).unwrap();

    let two = tempfile::tempdir().unwrap();
    let mut p2 = Policy::load(&policy_dir(), dpo_opts(2).lora.as_ref(), 1, &Device::Cpu).unwrap();
    train_dpo(&mut p2, &pairs, &dpo_opts(2), two.path()).unwrap();
    drop(p2);
    // A new process: fresh adapters, then resumed from the step-2 checkpoint.
    let mut p3 = Policy::load(&policy_dir(), dpo_opts(4).lora.as_ref(), 99, &Device::Cpu).unwrap();
    let resumed = train_dpo(&mut p3, &pairs, &dpo_opts(4), two.path()).unwrap();

    assert_eq!(resumed.steps, 4);
    assert_eq!(resumed.log.len(), 4);
    for (a, b) in full.log.iter().zip(&resumed.log) {
        assert_eq!(a.step, b.step);
        for (k, v) in &a.values {
            let w = b.get(k).unwrap();
            assert!((v - w).abs() <= 1e-6 * (1.0 + v.abs()), "step {} {k}: {v} vs {w}", a.step);
        }
    }
    assert_vars_close(&p1, &p3);
}

fn assert_vars_close(a: &Policy, b: &Policy) {
    let da = a.varmap.data().lock().unwrap();
    let db = b.varmap.data().lock().unwrap();
    assert_eq!(da.len(), db.len());
    for (k, va) in da.iter() {
        let vb = db.get(k).unwrap();
        let diff = (va.as_tensor() - vb.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{k} differs by {diff}");
    }
}

#[test]
fn kl_ceiling_rail_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = PolicyTrainOptions {
        lr: 0.5,
        kl_ceiling: 0.01,
        ..dpo_opts(20)
    };
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let err = train_dpo(&mut policy, &toy_pairs(), &opts, tmp.path()).unwrap_err();
    let rail = err.downcast_ref::<RailError>().expect("a rail error");
    match rail {
        RailError::KlCeiling { step, kl, ceiling } => {
            assert!(*step < 20);
            assert!(kl > ceiling);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("hint:"));
}

#[test]
fn lora_training_changes_only_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = dpo_opts(3);
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let before: Vec<(String, Vec<f32>)> = policy_weights(&policy);
    {
        let vars = policy.varmap.data().lock().unwrap();
        assert!(vars.keys().all(|k| k.contains("lora_A") || k.contains("lora_B")));
        assert_eq!(vars.len(), 2 * 3 * policy.config.num_hidden_layers);
    }
    let b0 = lora_b_abs_sum(&policy);
    assert_eq!(b0, 0.0, "LoRA B starts at zero");
    train_dpo(&mut policy, &toy_pairs(), &opts, tmp.path()).unwrap();
    assert!(lora_b_abs_sum(&policy) > 0.0, "adapters did not move");
    // Base weights, read through the frozen reference (the same buffers), did not change.
    assert_eq!(before, policy_weights(&policy));
    // The saved policy is a PEFT adapter plus config and tokenizer.
    let saved = tmp.path().join("policy");
    policy.save(&saved).unwrap();
    assert!(saved.join("adapter/adapter_model.safetensors").exists());
    assert!(saved.join("adapter/adapter_config.json").exists());
    assert!(saved.join("tokenizer.json").exists());
}

fn policy_weights(p: &Policy) -> Vec<(String, Vec<f32>)> {
    let emb = p.reference.lm_head_weight().flatten_all().unwrap();
    let emb: Vec<f32> = emb.narrow(0, 0, 64).unwrap().to_vec1().unwrap();
    let base = candle_core::safetensors::load(policy_dir().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let file_emb: Vec<f32> = base["model.embed_tokens.weight"]
        .flatten_all()
        .unwrap()
        .narrow(0, 0, 64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(emb, file_emb);
    // The reference's logits on a fixed input stand for every base weight at once.
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 200, 3000]], &Device::Cpu).unwrap();
    let logits: Vec<f32> = p
        .reference
        .forward(&ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .narrow(0, 0, 256)
        .unwrap()
        .to_vec1()
        .unwrap();
    vec![("embed".into(), emb), ("ref_logits".into(), logits)]
}

fn lora_b_abs_sum(p: &Policy) -> f64 {
    let vars = p.varmap.data().lock().unwrap();
    vars.iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, v)| {
            v.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum()
}
