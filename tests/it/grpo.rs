//! GRPO and RLOO against TRL's reference vectors (`tests/fixtures/vectors/grpo_*.json`,
//! `rloo_advantages_loss.json`): advantages and logged reward metrics, losses, their gradients
//! w.r.t. the per-token log-probs (candle autograd) and the clip / KL / entropy metrics. Losses run
//! in f64 (1e-6 relative) and f32 (1e-4); advantages are f64 host math. Then both objectives on
//! the engine with the tiny policy and reward model: TRL's metric names, option checks, the KL
//! ceiling (resume equivalence is in `engine::`).

use candle_core::{DType, Device, Var};
use rlhf_bot::run::outputs::PolicyAlgo;
use rlhf_bot::train::engine::TrainOutcome;
use rlhf_bot::train::group_rl_trainer::train_group_rl;
use rlhf_bot::train::losses::{group_rewards, grpo, grpo_terms, rloo, stats};
use rlhf_bot::train::policy_common::{GroupRlOptions, Policy, PolicyTrainOptions};
use rlhf_bot::train::policy_eval::RewardScorer;
use serde_json::Value;

use crate::losses::{DTYPES, close, close_t, close_vec, f, flat, t, var, vectors};
use crate::policytrain::{policy_dir, prompts, rm_dir};

/// Float32 mean metrics (clip ratios, frac_reward_zero_std) compare with 1e-6 absolute.
fn close_abs(what: &str, actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-6,
        "{what}: got {actual}, expected {expected}"
    );
}

fn is_f32_metric(name: &str) -> bool {
    name.starts_with("clip_ratio/") || name == "frac_reward_zero_std"
}

fn check_metrics(case: &str, got: &[(String, f64)], expected: &Value, dt: DType) {
    let expected = expected.as_object().expect("metrics object");
    let names: Vec<&String> = got.iter().map(|(k, _)| k).collect();
    for (name, want) in expected {
        let Some((_, value)) = got.iter().find(|(k, _)| k == name) else {
            panic!("{case}: metric {name} missing; got {names:?}");
        };
        if is_f32_metric(name) {
            close_abs(&format!("{case} {name}"), *value, f(want));
        } else {
            close(&format!("{case} {name}"), *value, f(want), dt);
        }
    }
    assert_eq!(got.len(), expected.len(), "{case}: metrics {names:?}");
}

/// The loss, its gradient w.r.t. the per-token log-probs and the metrics against a vector case.
fn check_loss_case(case: &str, out: &group_rewards::GroupLoss, lp: &Var, c: &Value, dt: DType) {
    close(
        &format!("{case} loss"),
        stats::scalar_f64(&out.loss).unwrap(),
        f(&c["loss"]),
        dt,
    );
    let g = out.loss.backward().unwrap();
    close_t(
        &format!("{case} grad"),
        g.get(lp.as_tensor()).unwrap(),
        &c["grad_per_token_logps"],
        dt,
    );
    check_metrics(case, &out.metrics, &c["metrics"], dt);
}

fn reward_table(v: &Value) -> Vec<Vec<Option<f64>>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(Value::as_f64)
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    flat(v).0
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|k| format!("r{k}")).collect()
}

#[test]
fn grpo_advantages_match_trl_for_every_scaling_aggregation_and_null_reward() {
    let d = vectors("grpo_advantages.json");
    let g = d["inputs"]["num_generations"].as_u64().unwrap() as usize;
    let cases = d["outputs"]["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for c in cases {
        let rewards =
            reward_table(&d["inputs"]["rewards_per_func"][c["rewards"].as_str().unwrap()]);
        let weights = floats(&c["reward_weights"]);
        let case = format!(
            "{} {} {}",
            c["rewards"], c["multi_objective_aggregation"], c["scale_rewards"]
        );
        let cfg = grpo::AdvantageConfig {
            num_generations: g,
            reward_weights: weights.clone(),
            scale_rewards: serde_json::from_value(c["scale_rewards"].clone()).unwrap(),
            aggregation: serde_json::from_value(c["multi_objective_aggregation"].clone()).unwrap(),
        };
        let out = grpo::grpo_advantages(&rewards, &names(weights.len()), &cfg).unwrap();
        close_vec(
            &format!("{case} advantages"),
            &out.advantages,
            &floats(&c["advantages"]),
            DType::F64,
        );
        close_vec(
            &format!("{case} std"),
            &out.std_rewards,
            &floats(&c["std_rewards"]),
            DType::F64,
        );
        match (&out.mean_grouped_rewards, c.get("mean_grouped_rewards")) {
            (Some(m), Some(want)) => {
                close_vec(&format!("{case} means"), m, &floats(want), DType::F64)
            }
            (None, None) => {}
            (got, want) => panic!("{case}: group means {got:?} vs {want:?}"),
        }
        check_metrics(&case, &out.metrics, &c["logged_metrics"], DType::F64);
    }
}

#[test]
fn grpo_advantages_refuse_ragged_groups_and_mismatched_weights() {
    let row = |x: f64| vec![Some(x)];
    let cfg = grpo::AdvantageConfig {
        num_generations: 4,
        reward_weights: vec![1.0],
        scale_rewards: grpo::ScaleRewards::Group,
        aggregation: grpo::Aggregation::SumThenNormalize,
    };
    let five: Vec<_> = (0..5).map(|i| row(i as f64)).collect();
    let e = grpo::grpo_advantages(&five, &names(1), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 rewards") && e.contains("groups of 4"), "{e}");
    let two_funcs = grpo::AdvantageConfig {
        reward_weights: vec![1.0, 0.5],
        ..cfg.clone()
    };
    let four: Vec<_> = (0..4).map(|i| row(i as f64)).collect();
    let e = grpo::grpo_advantages(&four, &names(2), &two_funcs)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 0 has 1 rewards") && e.contains("2 reward weights"),
        "{e}"
    );
    let single = grpo::AdvantageConfig {
        num_generations: 1,
        ..cfg
    };
    let e = grpo::grpo_advantages(&four, &names(1), &single)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_generations is 1"), "{e}");
}

/// A case's loss settings: TRL's keys, absent ones at TRL's defaults.
fn loss_config(c: &Value, num_items: f64) -> grpo::GrpoLossConfig {
    let opt = |k: &str| c.get(k).and_then(Value::as_f64);
    let d = grpo::GrpoLossConfig::default();
    let loss_type = c["loss_type"].as_str().unwrap();
    grpo::GrpoLossConfig {
        loss_type: grpo::LossType::parse(loss_type)
            .unwrap_or_else(|| panic!("loss type {loss_type} not implemented")),
        beta: f(&c["beta"]),
        epsilon_low: f(&c["epsilon_low"]),
        epsilon_high: f(&c["epsilon_high"]),
        level: serde_json::from_value(c["importance_sampling_level"].clone()).unwrap(),
        kl_bias_correction: c["use_bias_correction_kl"].as_bool().unwrap(),
        delta: c["delta"].as_f64(),
        max_completion_length: c["max_completion_length"].as_u64().unwrap() as usize,
        num_items_in_batch: num_items,
        sapo: grpo_terms::SapoTemperatures {
            pos: opt("sapo_temperature_pos").unwrap_or(d.sapo.pos),
            neg: opt("sapo_temperature_neg").unwrap_or(d.sapo.neg),
        },
        vespo: grpo_terms::VespoParams {
            k_pos: opt("vespo_k_pos").unwrap_or(d.vespo.k_pos),
            lambda_pos: opt("vespo_lambda_pos").unwrap_or(d.vespo.lambda_pos),
            k_neg: opt("vespo_k_neg").unwrap_or(d.vespo.k_neg),
            lambda_neg: opt("vespo_lambda_neg").unwrap_or(d.vespo.lambda_neg),
        },
        entropy_coef: opt("entropy_coef").unwrap_or(0.0),
        top_entropy_quantile: opt("top_entropy_quantile").unwrap_or(1.0),
        off_policy_mask_threshold: opt("off_policy_mask_threshold"),
    }
}

/// The keys of a case that this test reads; any other key would be a TRL knob left untested.
const CASE_KEYS: [&str; 20] = [
    "loss_type",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "importance_sampling_level",
    "max_completion_length",
    "use_bias_correction_kl",
    "delta",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "entropy_coef",
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "loss",
    "grad_per_token_logps",
    "metrics",
];

/// The detached inputs of `grpo_loss.json`: old and reference log-probs, advantages, mask and
/// entropies.
fn loss_inputs(i: &Value, dt: DType) -> [candle_core::Tensor; 5] {
    [
        "old_per_token_logps",
        "ref_per_token_logps",
        "advantages",
        "completion_mask",
        "entropies",
    ]
    .map(|k| t(&i[k], dt))
}

#[test]
fn grpo_loss_gradients_and_metrics_match_trl_for_every_case() {
    let d = vectors("grpo_loss.json");
    let i = &d["inputs"];
    let num_items = f(&i["num_items_in_batch"]);
    let mut checked = std::collections::BTreeSet::new();
    let mut knobs = std::collections::BTreeSet::new();
    let cases = d["outputs"]["cases"].as_array().unwrap();
    for c in cases {
        for key in c.as_object().unwrap().keys() {
            assert!(CASE_KEYS.contains(&key.as_str()), "case key {key} not read");
        }
        let cfg = loss_config(c, num_items);
        let case = format!("{cfg:?}");
        for dt in DTYPES {
            let lp = var(&i["per_token_logps"], dt);
            let [old, reference, adv, mask, ent] = loss_inputs(i, dt);
            let batch = grpo::GrpoBatch {
                logprobs: lp.as_tensor(),
                old_logprobs: Some(&old),
                ref_logprobs: Some(&reference),
                advantages: &adv,
                mask: &mask,
                entropies: Some(&ent),
            };
            let out = grpo::grpo_loss(&batch, &cfg).unwrap();
            check_loss_case(&case, &out, &lp, c, dt);
        }
        checked.insert(c["loss_type"].as_str().unwrap().to_string());
        for knob in [
            "entropy_coef",
            "top_entropy_quantile",
            "off_policy_mask_threshold",
        ] {
            if c.get(knob).is_some() {
                knobs.insert(knob);
            }
        }
    }
    // Every loss type at β 0 and 0.04, plus GSPO, no bias correction, delta, dr_grpo's own max
    // length, symmetric clipping, the entropy bonus and both masks: none skipped.
    assert_eq!(cases.len(), 25, "cases in the vector file");
    assert_eq!(
        checked.iter().map(String::as_str).collect::<Vec<_>>(),
        [
            "bnpo", "cispo", "dapo", "dr_grpo", "grpo", "luspo", "sapo", "vespo"
        ]
    );
    assert_eq!(knobs.len(), 3, "{knobs:?}");
}

#[test]
fn grpo_loss_ignores_padding_values_and_needs_a_reference_for_beta() {
    let d = vectors("grpo_loss.json");
    let i = &d["inputs"];
    let c = &d["outputs"]["cases"][1]; // grpo, β = 0.04
    let cfg = loss_config(c, f(&i["num_items_in_batch"]));
    let dt = DType::F64;
    let mask = t(&i["completion_mask"], dt);
    // Garbage at padding must not change the loss.
    let junk = ((mask.ones_like().unwrap() - &mask).unwrap() * 37.0).unwrap();
    let lp = (t(&i["per_token_logps"], dt) + &junk).unwrap();
    let old = (t(&i["old_per_token_logps"], dt) - &junk).unwrap();
    let reference = (t(&i["ref_per_token_logps"], dt) + &junk).unwrap();
    let adv = t(&i["advantages"], dt);
    let batch = grpo::GrpoBatch {
        logprobs: &lp,
        old_logprobs: Some(&old),
        ref_logprobs: Some(&reference),
        advantages: &adv,
        mask: &mask,
        entropies: None,
    };
    let out = grpo::grpo_loss(&batch, &cfg).unwrap();
    close(
        "padded loss",
        stats::scalar_f64(&out.loss).unwrap(),
        f(&c["loss"]),
        dt,
    );
    let no_ref = grpo::GrpoBatch {
        ref_logprobs: None,
        ..batch
    };
    let e = grpo::grpo_loss(&no_ref, &cfg).unwrap_err().to_string();
    assert!(e.contains("beta is 0.04") && e.contains("reference"), "{e}");
}

#[test]
fn rloo_advantages_match_trl_with_kl_normalisation_and_reward_clipping() {
    let d = vectors("rloo_advantages_loss.json");
    let i = &d["inputs"];
    let rewards = reward_table(&i["rewards_per_func"]);
    let dt = DType::F64;
    let (old, reference, mask) = (
        t(&i["old_per_token_logps"], dt),
        t(&i["ref_per_token_logps"], dt),
        t(&i["completion_mask"], dt),
    );
    let kl = rloo::sequence_kl(&old, &reference, &mask).unwrap();
    let cases = d["outputs"]["advantage_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let case = format!("{c:.60}");
        let clip = c["reward_clip_range"]
            .as_array()
            .map(|r| (f(&r[0]), f(&r[1])));
        let cfg = rloo::RlooAdvantageConfig {
            num_generations: i["num_generations"].as_u64().unwrap() as usize,
            reward_weights: floats(&i["reward_weights"]),
            beta: f(&c["beta"]),
            normalize_advantages: c["normalize_advantages"].as_bool().unwrap(),
            reward_clip_range: clip,
        };
        let out = rloo::rloo_advantages(&rewards, &names(2), Some(&kl), &cfg).unwrap();
        if let Some(seq) = c.get("seq_kl") {
            close_vec(&format!("{case} seq kl"), &kl.0, &floats(seq), dt);
        }
        close_vec(
            &format!("{case} rewards"),
            &out.rewards,
            &floats(&c["rewards_after_kl"]),
            dt,
        );
        close_vec(
            &format!("{case} baselines"),
            &out.baselines,
            &floats(&c["baselines"]),
            dt,
        );
        close_vec(
            &format!("{case} advantages"),
            &out.advantages,
            &floats(&c["advantages"]),
            dt,
        );
        check_metrics(&case, &out.metrics, &c["logged_metrics"], dt);
    }
}

#[test]
fn rloo_loss_gradients_and_metrics_match_trl() {
    let d = vectors("rloo_advantages_loss.json");
    let i = &d["inputs"];
    let cases = d["outputs"]["loss_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let (lo, hi) = (f(&c["epsilon_low"]), f(&c["epsilon_high"]));
        for dt in DTYPES {
            let lp = var(&i["per_token_logps"], dt);
            let (old, adv, mask, ent) = (
                t(&i["old_logps"], dt),
                t(&c["advantages"], dt),
                t(&i["completion_mask"], dt),
                t(&i["entropies"], dt),
            );
            // The sampling policy's sequence log-probs are the masked sums of its token log-probs.
            let old_tokens = t(&i["old_per_token_logps"], dt);
            close_t(
                "old logps",
                &stats::masked_sum_last(&old_tokens, &mask).unwrap(),
                &i["old_logps"],
                dt,
            );
            let batch = rloo::RlooBatch {
                logprobs: lp.as_tensor(),
                old_sequence_logps: &old,
                advantages: &adv,
                mask: &mask,
                entropies: Some(&ent),
            };
            let out = rloo::rloo_loss(&batch, lo, hi).unwrap();
            check_loss_case(&format!("rloo eps {lo}/{hi}"), &out, &lp, c, dt);
        }
    }
}

// ---------------------------------------------------------------- the objectives on the engine

/// GRPO (β 0.04, so the reference pass and the KL ceiling are exercised) or RLOO (TRL's β 0.05)
/// on the tiny policy: 2 prompts × 4 completions per step, micro-batches of 2 rows, two updates
/// per generation batch (so the second is off-policy and clipping can bite).
pub(crate) fn group_opts(algo: PolicyAlgo, steps: u64) -> PolicyTrainOptions {
    PolicyTrainOptions {
        algo,
        lr: 1e-2,
        grpo: GroupRlOptions {
            prompts_per_step: 2,
            num_generations: 4,
            num_iterations: 2,
            beta: (algo == PolicyAlgo::Grpo).then_some(0.04),
            loss_type: grpo::LossType::Dapo,
            ..GroupRlOptions::default()
        },
        ..crate::policytrain::ppo_opts(steps)
    }
}

/// Runs `algo` on the tiny policy and reward model.
pub(crate) fn train_group(
    algo: PolicyAlgo,
    policy: &mut Policy,
    opts: &PolicyTrainOptions,
    out: &std::path::Path,
) -> anyhow::Result<TrainOutcome> {
    assert_eq!(opts.algo, algo);
    let rm = RewardScorer::load(&rm_dir(), &Device::Cpu).unwrap();
    train_group_rl(policy, &rm, &prompts(), opts, out)
}

/// TRL's names that every GRPO / RLOO step logs.
const GROUP_KEYS: [&str; 12] = [
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "rewards/reward_model/mean",
    "rewards/reward_model/std",
    "kl",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/max_length",
    "completions/clipped_ratio",
];

#[test]
fn grpo_and_rloo_run_with_finite_trl_metrics_and_move_the_policy() {
    for algo in [PolicyAlgo::Grpo, PolicyAlgo::Rloo] {
        let tmp = tempfile::tempdir().unwrap();
        let opts = group_opts(algo, 2);
        let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
        let before = weights_of(&policy);
        let out = train_group(algo, &mut policy, &opts, tmp.path()).unwrap();
        assert_eq!(out.log.len(), 2, "{algo:?}");
        for line in &out.log {
            for key in GROUP_KEYS {
                let v = line.get(key);
                assert!(v.is_some_and(f64::is_finite), "{algo:?}: {key} = {v:?}");
            }
            let len = line.get("completions/mean_length").unwrap();
            assert!((1.0..=6.0).contains(&len), "{algo:?}: mean length {len}");
        }
        // The written log carries the same names.
        let text = std::fs::read_to_string(tmp.path().join("log.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert!(first["reward_std"].as_f64().is_some(), "{algo:?}: {first}");
        // The LoRA weights moved (a zero advantage everywhere would leave them).
        let after = weights_of(&policy);
        let moved = before.iter().zip(&after).any(|(a, b)| a != b);
        assert!(moved, "{algo:?}: no weight changed");
    }
}

fn weights_of(p: &Policy) -> Vec<Vec<f32>> {
    let data = p.varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            data[*n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn grpo_options_that_cannot_run_are_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = group_opts(PolicyAlgo::Grpo, 1);
    opts.grpo.num_generations = 1;
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let e = format!(
        "{:#}",
        train_group(PolicyAlgo::Grpo, &mut policy, &opts, tmp.path()).unwrap_err()
    );
    assert!(
        e.contains("policy.grpo.num_generations: expected an integer >= 2") && e.contains("got 1"),
        "{e}"
    );
    opts.grpo.num_generations = 4;
    opts.grpo.epsilon = 1.5;
    let e = format!(
        "{:#}",
        train_group(PolicyAlgo::Grpo, &mut policy, &opts, tmp.path()).unwrap_err()
    );
    assert!(
        e.contains("policy.grpo.epsilon: expected a number in (0, 1)") && e.contains("got 1.5"),
        "{e}"
    );
}

#[test]
fn a_kl_ceiling_below_the_drift_stops_grpo_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = PolicyTrainOptions {
        kl_ceiling: 1e-12,
        lr: 0.5,
        ..group_opts(PolicyAlgo::Grpo, 4)
    };
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let e = format!(
        "{:#}",
        train_group(PolicyAlgo::Grpo, &mut policy, &opts, tmp.path()).unwrap_err()
    );
    assert!(
        e.contains("KL to the reference") && e.contains("above the ceiling"),
        "{e}"
    );
}

/// The loss types beyond the clipped surrogate and the entropy knobs on the engine: the
/// entropies come from the policy with their graph (the bonus trains on them), and TRL's
/// metrics for each type are logged.
#[test]
fn grpo_runs_cispo_sapo_and_vespo_with_the_entropy_bonus_and_both_masks() {
    for (loss_type, metric) in [
        (grpo::LossType::Cispo, "cispo_clip_ratio"),
        (grpo::LossType::Sapo, "entropy"),
        (grpo::LossType::Vespo, "vespo/phi_seq_mean"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = group_opts(PolicyAlgo::Grpo, 1);
        opts.grpo.loss_type = loss_type;
        opts.grpo.epsilon_high = Some(if loss_type == grpo::LossType::Cispo {
            5.0
        } else {
            0.28
        });
        opts.grpo.entropy_coef = 0.01;
        opts.grpo.top_entropy_quantile = 0.5;
        opts.grpo.off_policy_mask_threshold = Some(0.1);
        let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
        let before = weights_of(&policy);
        let out = train_group(PolicyAlgo::Grpo, &mut policy, &opts, tmp.path()).unwrap();
        let line = &out.log[0];
        for key in [metric, "entropy", "policy_loss", "entropy_coef", "reward"] {
            let v = line.get(key);
            assert!(
                v.is_some_and(f64::is_finite),
                "{loss_type:?}: {key} = {v:?}"
            );
        }
        assert_eq!(line.get("entropy_coef"), Some(0.01));
        let entropy = line.get("entropy").unwrap();
        assert!(entropy > 0.0, "{loss_type:?}: entropy {entropy}");
        assert!(
            weights_of(&policy) != before,
            "{loss_type:?}: no weight changed"
        );
    }
}

/// `policy.reward` against the reward model's heads: an aspect it lacks is refused before any
/// step, naming the key and the aspects it has.
#[test]
fn a_reward_weight_on_an_unknown_aspect_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = group_opts(PolicyAlgo::Grpo, 1);
    opts.reward.weights.insert("tone".into(), 0.5);
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let e = format!(
        "{:#}",
        train_group(PolicyAlgo::Grpo, &mut policy, &opts, tmp.path()).unwrap_err()
    );
    assert!(
        e.contains("policy.reward.weights.tone")
            && e.contains("its aspects: none")
            && e.contains("hint:"),
        "{e}"
    );
    assert!(!tmp.path().join("log.jsonl").exists(), "no step ran");
}

// ---------------------------------------------------------------- dense step rewards

/// A `[B]` advantage is the per-token `[B, T]` one broadcast over its row: every loss type and
/// knob of the TRL vectors gives the same loss and metrics either way, bit for bit, and the same
/// gradient up to summation order.
#[test]
fn per_completion_advantages_equal_the_per_token_ones_broadcast() {
    let d = vectors("grpo_loss.json");
    let (i, dt) = (&d["inputs"], DType::F64);
    let num_items = f(&i["num_items_in_batch"]);
    for c in d["outputs"]["cases"].as_array().unwrap() {
        let cfg = loss_config(c, num_items);
        let [old, reference, adv, mask, ent] = loss_inputs(i, dt);
        let dims = mask.dims2().unwrap();
        let wide = adv.unsqueeze(1).unwrap().broadcast_as(dims).unwrap();
        let wide = wide.contiguous().unwrap();
        let run = |adv: &candle_core::Tensor| {
            let lp = var(&i["per_token_logps"], dt);
            let batch = grpo::GrpoBatch {
                logprobs: lp.as_tensor(),
                old_logprobs: Some(&old),
                ref_logprobs: Some(&reference),
                advantages: adv,
                mask: &mask,
                entropies: Some(&ent),
            };
            let out = grpo::grpo_loss(&batch, &cfg).unwrap();
            let grad = out.loss.backward().unwrap();
            let g: Vec<f64> = grad
                .get(lp.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (stats::scalar_f64(&out.loss).unwrap(), g, out.metrics)
        };
        let (narrow_out, wide_out) = (run(&adv), run(&wide));
        assert_eq!(
            narrow_out.0.to_bits(),
            wide_out.0.to_bits(),
            "{cfg:?}: loss"
        );
        // Backward sums a sequence-level ratio's gradient over a broadcast `[B, 1]` in another
        // order than over `[B, T]`: equal up to rounding, not bit for bit.
        for (a, b) in narrow_out.1.iter().zip(&wide_out.1) {
            assert!((a - b).abs() <= 1e-14, "{cfg:?}: gradient {a} vs {b}");
        }
        assert_eq!(narrow_out.2, wide_out.2, "{cfg:?}: metrics");
    }
    // A shape that is neither is refused, naming both.
    let mask = t(&i["completion_mask"], dt);
    let lp = t(&i["per_token_logps"], dt);
    let bad = candle_core::Tensor::zeros((1, 3), dt, &Device::Cpu).unwrap();
    let batch = grpo::GrpoBatch {
        logprobs: &lp,
        old_logprobs: None,
        ref_logprobs: None,
        advantages: &bad,
        mask: &mask,
        entropies: None,
    };
    let cfg = grpo::GrpoLossConfig {
        num_items_in_batch: 10.0,
        ..grpo::GrpoLossConfig::default()
    };
    let e = grpo::grpo_loss(&batch, &cfg).unwrap_err().to_string();
    assert!(e.contains("[1, 3]") && e.contains("expected"), "{e}");
}

/// RLOO with per-token advantages (step rewards): rows that hold one value give TRL's loss, value
/// and gradient, at every clip setting of the vectors (the clip metrics count tokens instead of
/// answers, so they are not compared); a row whose tokens differ pushes each token by its own
/// advantage, `-w·A_t/B` where the ratio is not clipped.
#[test]
fn rloo_per_token_advantages_reduce_to_trl_and_credit_each_token() {
    let d = vectors("rloo_advantages_loss.json");
    let (i, dt) = (&d["inputs"], DType::F64);
    let run = |adv: &candle_core::Tensor, lo: f64, hi: f64| {
        let lp = var(&i["per_token_logps"], dt);
        let (old, mask) = (t(&i["old_logps"], dt), t(&i["completion_mask"], dt));
        let batch = rloo::RlooBatch {
            logprobs: lp.as_tensor(),
            old_sequence_logps: &old,
            advantages: adv,
            mask: &mask,
            entropies: None,
        };
        let out = rloo::rloo_loss(&batch, lo, hi).unwrap();
        let grad = out.loss.backward().unwrap();
        let g: Vec<Vec<f64>> = grad.get(lp.as_tensor()).unwrap().to_vec2().unwrap();
        (stats::scalar_f64(&out.loss).unwrap(), g)
    };
    let mask: Vec<Vec<f64>> = t(&i["completion_mask"], dt).to_vec2().unwrap();
    let (b, width) = (mask.len(), mask[0].len());
    for c in d["outputs"]["loss_cases"].as_array().unwrap() {
        let (lo, hi) = (f(&c["epsilon_low"]), f(&c["epsilon_high"]));
        let adv = t(&c["advantages"], dt);
        let wide = adv
            .unsqueeze(1)
            .unwrap()
            .broadcast_as((b, width))
            .unwrap()
            .contiguous()
            .unwrap();
        let (narrow, per_token) = (run(&adv, lo, hi), run(&wide, lo, hi));
        close_abs(&format!("eps {lo}/{hi}: loss"), per_token.0, narrow.0);
        for (r, (x, y)) in narrow.1.iter().zip(&per_token.1).enumerate() {
            for (j, (x, y)) in x.iter().zip(y).enumerate() {
                close_abs(&format!("eps {lo}/{hi}: grad [{r}, {j}]"), *y, *x);
            }
        }
    }
    // On-policy (ratio 1, never clipped): d loss / d lp[r][j] = -A[r][j]·m[r][j] / B.
    let lp0: Vec<Vec<f64>> = t(&i["per_token_logps"], dt).to_vec2().unwrap();
    let old_seq: Vec<f64> = lp0
        .iter()
        .zip(&mask)
        .map(|(l, m)| l.iter().zip(m).map(|(l, m)| l * m).sum())
        .collect();
    let per_token: Vec<Vec<f64>> = (0..b)
        .map(|r| {
            (0..width)
                .map(|j| (r as f64 - 1.5) * (j as f64 + 1.0) / 4.0)
                .collect()
        })
        .collect();
    let adv = candle_core::Tensor::new(per_token.clone(), &Device::Cpu).unwrap();
    let lp = var(&i["per_token_logps"], dt);
    let (old, m) = (
        candle_core::Tensor::new(old_seq, &Device::Cpu).unwrap(),
        t(&i["completion_mask"], dt),
    );
    let out = rloo::rloo_loss(
        &rloo::RlooBatch {
            logprobs: lp.as_tensor(),
            old_sequence_logps: &old,
            advantages: &adv,
            mask: &m,
            entropies: None,
        },
        0.2,
        0.2,
    )
    .unwrap();
    let g: Vec<Vec<f64>> = out
        .loss
        .backward()
        .unwrap()
        .get(lp.as_tensor())
        .unwrap()
        .to_vec2()
        .unwrap();
    for r in 0..b {
        for j in 0..width {
            let want = -per_token[r][j] * mask[r][j] / b as f64;
            close_abs(&format!("on-policy grad [{r}, {j}]"), g[r][j], want);
        }
    }
    // The value reads as the sequence loss at each answer's mean advantage.
    let mean_adv: Vec<f64> = per_token
        .iter()
        .zip(&mask)
        .map(|(a, m)| {
            a.iter().zip(m).map(|(a, m)| a * m).sum::<f64>() / m.iter().sum::<f64>().max(1.0)
        })
        .collect();
    let want = -mean_adv.iter().sum::<f64>() / b as f64;
    close_abs(
        "on-policy loss",
        stats::scalar_f64(&out.loss).unwrap(),
        want,
    );
    // A shape that is neither is refused, naming both.
    let bad = candle_core::Tensor::zeros((1, 3), dt, &Device::Cpu).unwrap();
    let e = rloo::rloo_loss(
        &rloo::RlooBatch {
            logprobs: lp.as_tensor(),
            old_sequence_logps: &old,
            advantages: &bad,
            mask: &m,
            entropies: None,
        },
        0.2,
        0.2,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("[1, 3]") && e.contains("expected"), "{e}");
}

/// The tiny reward model with a (seeded, untrained) step head added, saved in `dir`; with
/// `own_tokenizer` it also gets the policy's tokenizer.json, so steps are placed in its own
/// tokenization rather than at the policy's ids.
fn rm_with_step_head(dir: &std::path::Path, own_tokenizer: bool) {
    use rlhf_bot::model::llama::ExtraHeads;
    use rlhf_bot::model::tokenizer::Tokenizer;
    use rlhf_bot::train::reward_models::LlamaReward;
    use rlhf_bot::train::reward_trainer::RewardBackbone;
    let tok_path = policy_dir().join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let heads = ExtraHeads {
        aspects: vec![],
        step_head: true,
    };
    let rm = LlamaReward::load_with_heads(&rm_dir(), &tok, &heads, 7, &Device::Cpu).unwrap();
    rm.save_pretrained(dir).unwrap();
    if own_tokenizer {
        std::fs::copy(&tok_path, dir.join("tokenizer.json")).unwrap();
    }
}

fn train_with_rm(
    rm: &std::path::Path,
    opts: &PolicyTrainOptions,
    out: &std::path::Path,
) -> anyhow::Result<(TrainOutcome, Vec<Vec<f32>>)> {
    let mut policy = Policy::load(&policy_dir(), opts.lora.as_ref(), 1, &Device::Cpu).unwrap();
    let rm = RewardScorer::load(rm, &Device::Cpu).unwrap();
    let out = train_group_rl(&mut policy, &rm, &prompts(), opts, out)?;
    Ok((out, weights_of(&policy)))
}

/// `policy.reward.step_weight` 0 leaves GRPO exactly as it was, even with a step head on the
/// reward model; above 0 the step head's scores reach the advantages (the weights end
/// elsewhere) and the step metrics are logged, with either tokenizer placement.
#[test]
fn step_rewards_are_off_at_zero_and_move_grpo_above_it() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = group_opts(PolicyAlgo::Grpo, 1);
    let plain = train_with_rm(&rm_dir(), &opts, &tmp.path().join("plain")).unwrap();
    let with_head = tmp.path().join("rm-steps");
    rm_with_step_head(&with_head, false);
    let off = train_with_rm(&with_head, &opts, &tmp.path().join("off")).unwrap();
    assert_eq!(off.1, plain.1, "step_weight 0 changed the trained weights");
    assert_eq!(
        off.0.log[0].get("loss"),
        plain.0.log[0].get("loss"),
        "step_weight 0 changed the loss"
    );
    assert!(off.0.log[0].get("rewards/steps/mean").is_none());
    let mut on_opts = opts.clone();
    on_opts.reward.step_weight = 2.0;
    for own_tokenizer in [false, true] {
        let dir = tmp.path().join(format!("rm-{own_tokenizer}"));
        rm_with_step_head(&dir, own_tokenizer);
        let on = train_with_rm(
            &dir,
            &on_opts,
            &tmp.path().join(format!("on-{own_tokenizer}")),
        )
        .unwrap();
        let line = &on.0.log[0];
        let mean = line.get("rewards/steps/mean").unwrap();
        assert!(mean.is_finite() && mean.abs() < 1.0, "steps mean {mean}");
        let multi = line.get("steps/multi_step_frac").unwrap();
        assert!((0.0..=1.0).contains(&multi), "multi-step share {multi}");
        // Same samples, same group advantages: only the step scores can move the weights.
        assert!(
            on.1 != plain.1,
            "own tokenizer {own_tokenizer}: step rewards changed nothing"
        );
    }
    // Without a step head step rewards are refused naming the key.
    let e = format!(
        "{:#}",
        train_with_rm(&rm_dir(), &on_opts, &tmp.path().join("no-head")).unwrap_err()
    );
    assert!(
        e.contains("policy.reward.step_weight") && e.contains("no step head"),
        "{e}"
    );
}

/// RLOO takes step rewards through the same per-token advantage: 0 leaves it exactly as it was
/// with a step head on the reward model, above 0 the step scores move the weights and are logged.
/// PPO, DPO and KTO refuse them, naming the key and the algorithms that take them.
#[test]
fn step_rewards_move_rloo_and_are_refused_by_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = group_opts(PolicyAlgo::Rloo, 1);
    let plain = train_with_rm(&rm_dir(), &opts, &tmp.path().join("plain")).unwrap();
    let with_head = tmp.path().join("rm-steps");
    rm_with_step_head(&with_head, false);
    let off = train_with_rm(&with_head, &opts, &tmp.path().join("off")).unwrap();
    assert_eq!(
        off.1, plain.1,
        "step_weight 0 changed RLOO's trained weights"
    );
    assert!(off.0.log[0].get("rewards/steps/mean").is_none());
    let mut on_opts = opts.clone();
    on_opts.reward.step_weight = 2.0;
    let on = train_with_rm(&with_head, &on_opts, &tmp.path().join("on")).unwrap();
    let line = &on.0.log[0];
    let mean = line.get("rewards/steps/mean").unwrap();
    assert!(mean.is_finite() && mean.abs() < 1.0, "steps mean {mean}");
    assert!(line.get("loss").unwrap().is_finite());
    // Same samples and group advantages (same seed): only the step scores can move the weights.
    assert!(on.1 != plain.1, "step rewards changed nothing in RLOO");
    for algo in [PolicyAlgo::Ppo, PolicyAlgo::Dpo, PolicyAlgo::Kto] {
        let mut o = PolicyTrainOptions {
            algo,
            max_steps: Some(1),
            ..PolicyTrainOptions::default()
        };
        o.reward.step_weight = 0.5;
        let e = format!("{:#}", o.validate().unwrap_err());
        assert!(
            e.contains("policy.reward.step_weight is 0.5")
                && e.contains(&format!("but {} takes no step rewards", algo.as_str()))
                && e.contains("grpo, rloo")
                && e.contains("hint:"),
            "{e}"
        );
    }
}
