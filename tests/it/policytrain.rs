//! Policy optimisation loops (DPO, KTO, PPO), their safety rails, checkpoint/resume, and the
//! policy evaluation, all on the tiny random Llama in `tests/fixtures/tiny-llama-policy`
//! (2 layers, hidden 16, SmolLM2's 49k vocabulary) and the tiny reward model in
//! `tests/fixtures/tiny-llama-rm`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_bot::app::train_policy::{TrainPolicyRequest, train_policy};
use rlhf_bot::model::llama::load_frozen_causal_lm;
use rlhf_bot::run::outputs::{LogLine, PolicyAlgo, PolicyRunOutput};
use rlhf_bot::train::dpo_trainer::{PreferenceExample, train_dpo};
use rlhf_bot::train::kto_trainer::{PointwiseExample, kl_partner, train_kto};
use rlhf_bot::train::policy_common::{
    LoraOptions, Policy, PolicyTrainOptions, PpoOptions, RailError, Tokenised, epoch_order,
    sequence_logps, tokenise_pair,
};
use rlhf_bot::train::policy_eval::{EvalSettings, RewardScorer, evaluate};
use rlhf_bot::train::ppo_trainer::train_ppo;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub(crate) fn policy_dir() -> PathBuf {
    fixtures().join("tiny-llama-policy")
}

pub(crate) fn rm_dir() -> PathBuf {
    fixtures().join("tiny-llama-rm")
}

pub(crate) fn toy_pairs() -> Vec<PreferenceExample> {
    [
        (
            "What is a carbon tax?",
            "A price on emissions.",
            "Bananas are yellow.",
        ),
        (
            "Define GDP.",
            "Total output of an economy.",
            "I like trains.",
        ),
        ("What is inflation?", "Rising prices over time.", "Purple."),
        ("What is a tariff?", "A tax on imports.", "No idea, sorry."),
    ]
    .iter()
    .map(|(p, c, r)| PreferenceExample {
        prompt: format!("User: {p}\nAssistant:"),
        chosen: format!(" {c}"),
        rejected: format!(" {r}"),
        weight: None,
    })
    .collect()
}

pub(crate) fn dpo_opts(steps: u64) -> PolicyTrainOptions {
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
    // β = 0.1: a margin of 0.1 is a one-nat gap between the chosen and rejected log-ratios.
    assert!(margin[11] > 0.1, "margin did not grow: {margin:?}");
    assert!(
        margin.windows(2).filter(|w| w[1] > w[0]).count() >= 9,
        "{margin:?}"
    );
    assert_eq!(series(&out.log, "rewards/accuracies")[11], 1.0);
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert_eq!(series(&out.log, k).len(), 12, "{k} missing from the log");
    }
    // log.jsonl on disk carries the same lines.
    // (JSON round-trips may move a float by one ulp.)
    let on_disk = rlhf_bot::run::outputs::read_log(tmp.path()).unwrap();
    assert_eq!(on_disk.len(), out.log.len());
    for (a, b) in on_disk.iter().zip(&out.log) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.values.len(), b.values.len());
        for (k, v) in &a.values {
            assert!(
                (v - b.get(k).unwrap()).abs() <= 1e-12 * (1.0 + v.abs()),
                "{k}"
            );
        }
    }
}

/// A pair of weight 0 is out of DPO's loss: one step on [A, B with weight 0] moves the adapters
/// exactly as one step on [A] alone, and not as one step on [A, B]; a negative weight is refused
/// before any step, naming the pair and the value.
#[test]
fn a_pair_of_weight_zero_trains_dpo_as_if_it_were_absent() {
    let pairs = toy_pairs();
    let run = |pairs: &[PreferenceExample]| {
        let tmp = tempfile::tempdir().unwrap();
        let o = PolicyTrainOptions {
            batch_size: pairs.len(),
            grad_accum: 1,
            ..dpo_opts(1)
        };
        let mut p = Policy::load(&policy_dir(), o.lora.as_ref(), 1, &Device::Cpu).unwrap();
        train_dpo(&mut p, pairs, &o, tmp.path()).map(|_| p)
    };
    let mut zero = pairs[..2].to_vec();
    zero[1].weight = Some(0.0);
    let alone = run(&pairs[..1]).unwrap();
    assert_vars_close(&run(&zero).unwrap(), &alone);
    let both = run(&pairs[..2]).unwrap();
    let (da, db) = (
        alone.varmap.data().lock().unwrap(),
        both.varmap.data().lock().unwrap(),
    );
    let moved = da
        .iter()
        .map(|(k, v)| crate::common::max_abs_diff(v.as_tensor(), db[k].as_tensor()))
        .fold(0.0f64, |a, b| a.max(b as f64));
    assert!(
        moved > 1e-4,
        "pair B with weight 1 changed nothing ({moved})"
    );
    zero[1].weight = Some(-1.0);
    let e = format!("{:#}", run(&zero).err().unwrap());
    assert!(e.contains("preference pair 1 has weight -1"), "{e}");
}

/// A weight scales a pair within the whole optimiser update, not within its micro-batch: a
/// half-weight pair scored alone (micro-batches of 1, gradient accumulation over 2) moves the
/// weights exactly as it does in one micro-batch of 2.
#[test]
fn dpo_weights_hold_across_micro_batches() {
    let mut pairs = toy_pairs()[..2].to_vec();
    pairs[1].weight = Some(0.5);
    // `batch_size` is the micro-batch; a step takes `batch_size × grad_accum` pairs.
    let run = |pairs: &[PreferenceExample], micro_batch: usize| {
        let tmp = tempfile::tempdir().unwrap();
        let o = PolicyTrainOptions {
            batch_size: micro_batch,
            grad_accum: 2 / micro_batch,
            ..dpo_opts(1)
        };
        let mut p = Policy::load(&policy_dir(), o.lora.as_ref(), 1, &Device::Cpu).unwrap();
        train_dpo(&mut p, pairs, &o, tmp.path()).unwrap();
        p
    };
    let (whole, accumulated) = (run(&pairs, 2), run(&pairs, 1));
    assert_vars_close(&whole, &accumulated);
    // And the weight mattered: the same two pairs at full weight train differently.
    pairs[1].weight = None;
    let unweighted = run(&pairs, 1);
    let (da, db) = (
        accumulated.varmap.data().lock().unwrap(),
        unweighted.varmap.data().lock().unwrap(),
    );
    let moved = da
        .iter()
        .map(|(k, v)| crate::common::max_abs_diff(v.as_tensor(), db[k].as_tensor()))
        .fold(0.0f64, |a, b| a.max(b as f64));
    assert!(moved > 1e-5, "a weight of 0.5 changed nothing ({moved})");
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
    assert_logs_close(&full.log, &resumed.log, 1e-6);
    assert_vars_close(&p1, &p3);
}

/// Every value of every line of `a` is in the same line of `b`, equal within `rel` (relative).
pub(crate) fn assert_logs_close(a: &[LogLine], b: &[LogLine], rel: f64) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.values.len(), b.values.len(), "step {}", a.step);
        for (k, v) in &a.values {
            let w = b.get(k).unwrap();
            assert!(
                (v - w).abs() <= rel * (1.0 + v.abs()),
                "step {} {k}: {v} vs {w}",
                a.step
            );
        }
    }
}

pub(crate) fn assert_vars_close(a: &Policy, b: &Policy) {
    let da = a.varmap.data().lock().unwrap();
    let db = b.varmap.data().lock().unwrap();
    assert_eq!(da.len(), db.len());
    for (k, va) in da.iter() {
        let vb = db.get(k).unwrap();
        let diff = crate::common::max_abs_diff(va.as_tensor(), vb.as_tensor());
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
        assert!(
            vars.keys()
                .all(|k| k.contains("lora_A") || k.contains("lora_B"))
        );
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

// ---------------------------------------------------------------- KTO

pub(crate) fn thumbs() -> Vec<PointwiseExample> {
    toy_pairs()
        .into_iter()
        .enumerate()
        .map(|(i, p)| PointwiseExample {
            prompt: p.prompt,
            completion: if i % 2 == 0 { p.chosen } else { p.rejected },
            label: i % 2 == 0,
            weight: None,
        })
        .collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn kto_runs_and_its_first_loss_matches_the_formula() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = thumbs();
    let opts = PolicyTrainOptions {
        algo: PolicyAlgo::Kto,
        beta: 0.5,
        kto_desirable_weight: 1.0,
        kto_undesirable_weight: 1.5,
        batch_size: ex.len(),
        grad_accum: 1,
        ..dpo_opts(3)
    };
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    // A reference that differs from the policy, so that ρ and the KL point are not zero.
    policy.reference =
        load_frozen_causal_lm(&fixtures().join("tiny-llama-ref"), &Device::Cpu).unwrap();

    // Expected step-1 loss from TRL's formula, computed here from sequence log-probs.
    let eos = policy.eos_ids().first().copied();
    let pad = policy.pad_id();
    let tk = |p: &str, c: &str| tokenise_pair(&policy.tokenizer, p, c, eos, 32, 16).unwrap();
    let lp = |m: &rlhf_bot::model::llama::LlamaForCausalLM, rows: &[Tokenised]| -> Vec<f64> {
        let refs: Vec<&Tokenised> = rows.iter().collect();
        sequence_logps(m, &refs, pad)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let order = epoch_order(ex.len(), opts.seed, 0);
    let n = ex.len();
    let kl_rows: Vec<Tokenised> = (0..n)
        .map(|j| {
            tk(
                &ex[order[j]].prompt,
                &ex[order[kl_partner(j, n)]].completion,
            )
        })
        .collect();
    let (pk, rk) = (lp(&policy.model, &kl_rows), lp(&policy.reference, &kl_rows));
    let kl = ((0..n).map(|j| pk[j] - rk[j]).sum::<f64>() / n as f64).max(0.0);
    let rows: Vec<Tokenised> = ex.iter().map(|e| tk(&e.prompt, &e.completion)).collect();
    let (pp, rr) = (lp(&policy.model, &rows), lp(&policy.reference, &rows));
    let expected = (0..n)
        .map(|i| {
            let rho = pp[i] - rr[i];
            let (w_d, w_u, beta) = (
                opts.kto_desirable_weight,
                opts.kto_undesirable_weight,
                opts.beta,
            );
            if ex[i].label {
                w_d * (1.0 - sigmoid(beta * (rho - kl)))
            } else {
                w_u * (1.0 - sigmoid(beta * (kl - rho)))
            }
        })
        .sum::<f64>()
        / n as f64;

    let out = train_kto(&mut policy, &ex, &opts, tmp.path()).unwrap();
    assert_eq!(out.steps, 3);
    let first = &out.log[0];
    assert!(
        (first.get("loss").unwrap() - expected).abs() < 1e-5,
        "{} vs {expected}",
        first.get("loss").unwrap()
    );
    assert!((first.get("kl").unwrap() - kl).abs() < 1e-5);
    for l in &out.log {
        for k in [
            "loss",
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
        ] {
            assert!(l.get(k).unwrap().is_finite(), "{k} at step {}", l.step);
        }
    }
}

// ---------------------------------------------------------------- PPO

pub(crate) fn ppo_opts(steps: u64) -> PolicyTrainOptions {
    PolicyTrainOptions {
        algo: PolicyAlgo::Ppo,
        lr: 1e-2,
        max_steps: Some(steps),
        max_prompt_len: 32,
        max_completion_len: 6,
        ppo: PpoOptions {
            rollouts_per_step: 4,
            ppo_epochs: 2,
            num_minibatches: 2,
            temperature: 1.0,
            ..PpoOptions::default()
        },
        ..dpo_opts(steps)
    }
}

pub(crate) fn prompts() -> Vec<String> {
    toy_pairs()
        .into_iter()
        .map(|p| p.prompt)
        .chain(["User: Hi\nAssistant:".to_string()])
        .collect()
}

pub(crate) const PPO_KEYS: [&str; 9] = [
    "objective/kl",
    "objective/entropy",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
];

#[test]
fn ppo_runs_two_steps_with_finite_trl_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ppo_opts(2);
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let rm = RewardScorer::load(&rm_dir(), &Device::Cpu).unwrap();
    let out = train_ppo(&mut policy, &rm, &prompts(), &opts, tmp.path()).unwrap();
    assert_eq!(out.steps, 2);
    assert_eq!(out.log.len(), 2);
    for l in &out.log {
        for k in PPO_KEYS {
            let v = l
                .get(k)
                .unwrap_or_else(|| panic!("{k} missing at step {}", l.step));
            assert!(v.is_finite(), "{k} = {v} at step {}", l.step);
        }
        // The policy's first update happens inside step 1, after the rollouts: KL starts at 0.
        assert!(l.get("objective/entropy").unwrap() > 0.0);
    }
    assert!(out.log[0].get("objective/kl").unwrap().abs() < 1e-4);
    // The value head is trained but never saved into the policy.
    assert!(
        policy
            .varmap
            .data()
            .lock()
            .unwrap()
            .contains_key("value_head.weight")
    );
    policy.save(&tmp.path().join("policy")).unwrap();
    let saved = candle_core::safetensors::load(
        tmp.path().join("policy/adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(saved.keys().all(|k| k.contains("lora_")));
}

#[test]
fn ppo_stop_and_resume_equals_one_run() {
    let rm = RewardScorer::load(&rm_dir(), &Device::Cpu).unwrap();
    let one = tempfile::tempdir().unwrap();
    let mut p1 = Policy::load(&policy_dir(), ppo_opts(3).lora.as_ref(), 1, &Device::Cpu).unwrap();
    let full = train_ppo(&mut p1, &rm, &prompts(), &ppo_opts(3), one.path()).unwrap();

    let two = tempfile::tempdir().unwrap();
    let mut p2 = Policy::load(&policy_dir(), ppo_opts(1).lora.as_ref(), 1, &Device::Cpu).unwrap();
    train_ppo(&mut p2, &rm, &prompts(), &ppo_opts(1), two.path()).unwrap();
    drop(p2);
    let mut p3 = Policy::load(&policy_dir(), ppo_opts(3).lora.as_ref(), 7, &Device::Cpu).unwrap();
    let resumed = train_ppo(&mut p3, &rm, &prompts(), &ppo_opts(3), two.path()).unwrap();
    assert_eq!(resumed.log.len(), 3);
    assert_logs_close(&full.log, &resumed.log, 1e-5);
    assert_vars_close(&p1, &p3);
}

/// `policy.reward` under PPO: the score PPO trains on is the weighted sum of the components
/// (here 2 × the reward model's score plus two rules), each logged as `rewards/<name>/mean`.
#[test]
fn ppo_trains_on_the_weighted_sum_of_the_reward_components() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = ppo_opts(1);
    // Only the rule penalises a missing EOS here, so the sum is exactly the components'.
    opts.ppo.missing_eos_penalty = 0.0;
    opts.reward = serde_norway::from_str(
        "weights: {score: 2.0}\nrules:\n  format_regex: {pattern: '[a-z]', reward: 0.5}\n  missing_eos: -1.0\n",
    )
    .unwrap();
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let rm = RewardScorer::load(&rm_dir(), &Device::Cpu).unwrap();
    let out = train_ppo(&mut policy, &rm, &prompts(), &opts, tmp.path()).unwrap();
    let l = &out.log[0];
    let mean = |name: &str| {
        l.get(&format!("rewards/{name}/mean"))
            .unwrap_or_else(|| panic!("rewards/{name}/mean missing: {l:?}"))
    };
    let expected = 2.0 * mean("reward_model") + mean("format_regex") + mean("missing_eos");
    let scores = l.get("objective/scores").unwrap();
    assert!(
        (scores - expected).abs() < 1e-5,
        "objective/scores {scores} vs weighted components {expected}"
    );
    assert!((-1.0..=0.0).contains(&mean("missing_eos")), "{l:?}");
}

// ---------------------------------------------------------------- evaluation + stage

#[test]
fn evaluation_of_the_base_against_itself_is_a_tie_with_zero_kl() {
    let policy = Policy::load(&policy_dir(), None, 1, &Device::Cpu).unwrap();
    let rm = RewardScorer::load(&rm_dir(), &Device::Cpu).unwrap();
    let s = EvalSettings {
        max_new_tokens: 5,
        max_prompt_len: 32,
        greedy: true,
        seed: 0,
        batch_size: 2,
        samples: 2,
    };
    let e = evaluate(
        &policy.model,
        &policy.reference,
        &policy.reference,
        &policy.tokenizer,
        &rm,
        None,
        &prompts(),
        &s,
    )
    .unwrap();
    assert_eq!(e.n, 5);
    assert_eq!(e.win_rate, 0.5, "identical greedy answers tie");
    assert!(e.win_rate_low < 0.5 && e.win_rate_high > 0.5);
    assert!(e.kl.abs() < 1e-4);
    assert_eq!(Some(e.mean_reward), e.production_mean_reward);
    assert_eq!(e.samples.len(), 2);
    assert!(e.response_length >= 1.0 && e.response_length <= 5.0);
}

#[test]
fn train_policy_stage_writes_metrics_log_and_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    let mut text = String::new();
    for p in toy_pairs() {
        text.push_str(&serde_json::to_string(&serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})).unwrap());
        text.push('\n');
    }
    std::fs::write(&data, text).unwrap();
    let out = tmp.path().join("run");
    let req = TrainPolicyRequest {
        base_model: policy_dir(),
        reward_model: rm_dir(),
        production_model: None,
        data,
        apply_chat_template: false,
        out: out.clone(),
        options: PolicyTrainOptions {
            eval_prompts: 1,
            max_completion_len: 4,
            ..dpo_opts(2)
        },
        behaviour_prompts: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(train_policy(req)).unwrap();
    assert_eq!(s.eval_prompts, 1);
    assert_eq!(s.train_examples, 3);
    let run = PolicyRunOutput::load(&out).unwrap();
    assert_eq!(run.metrics.algo, PolicyAlgo::Dpo);
    assert_eq!(run.metrics.train.steps, 2);
    assert_eq!(run.metrics.eval.n, 1);
    assert_eq!(run.log.len(), 2);
    assert!(out.join("policy/adapter/adapter_config.json").exists());
}

#[test]
fn answer_kl_is_the_exact_kl_of_the_next_token_distributions() {
    use candle_core::D;
    use rlhf_bot::train::policy_eval::answer_kl;
    let dev = Device::Cpu;
    let policy = Policy::load(&policy_dir(), None, 1, &dev).unwrap();
    let other = load_frozen_causal_lm(&fixtures().join("tiny-llama-ref"), &dev).unwrap();
    let prompts = vec![
        "Hello there".to_string(),
        "Why is the sky blue?".to_string(),
    ];
    let answers = vec![vec![11u32, 12, 13], vec![]];
    let kl = |m| {
        answer_kl(
            &policy.model,
            m,
            &policy.tokenizer,
            &prompts,
            &answers,
            32,
            2,
        )
        .unwrap()
    };

    let same = kl(&policy.model);
    assert!(same.iter().all(|&v| v.abs() < 1e-6), "{same:?}");

    // By hand: full softmax of both models at each position that predicts an answer token.
    let ids: Vec<u32> = policy
        .tokenizer
        .encode(&prompts[0], false)
        .unwrap()
        .into_iter()
        .chain(answers[0].iter().copied())
        .collect();
    let p_len = ids.len() - answers[0].len();
    let input = candle_core::Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let log_probs = |m: &rlhf_bot::model::llama::LlamaForCausalLM| {
        candle_nn::ops::log_softmax(&m.forward(&input, None).unwrap(), D::Minus1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
    };
    let (lp, lq) = (log_probs(&policy.model), log_probs(&other));
    let expected: f64 = (p_len - 1..ids.len() - 1)
        .map(|t| {
            lp[t]
                .iter()
                .zip(&lq[t])
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum();
    let got = kl(&other);
    assert!(
        expected > 1e-4,
        "the fixtures differ, so the KL is positive"
    );
    assert!(
        (got[0] - expected).abs() < 1e-4 * expected.max(1.0),
        "{got:?} vs {expected}"
    );
    assert_eq!(got[1], 0.0, "an empty answer has no KL");
}
