//! Reward training on every kind of feedback (issue #3): the weighted total loss against a hand
//! computation, gradients reaching the head of each kind present, each loss part falling on mixed
//! data, evaluation of aspects / steps / thumbs, heads saved and reloaded, resume equivalence with
//! mixed data, and config errors for bad loss weights. Tiny models only (`tiny-llama-rm`, a
//! 16-wide BERT).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rlhf_bot::model::bert::{BertRewardModel, LoadedTokenizer, RewardHeadConfig};
use rlhf_bot::model::llama::ExtraHeads;
use rlhf_bot::train::batching::{
    EncodedPair, EncodedPoint, PairText, PointLabel, PointTarget, PointText, collate_mixed,
};
use rlhf_bot::train::losses::reward::{RatingLoss, RewardLossWeights};
use rlhf_bot::train::optim::{AdamW, AdamWConfig, named_vars};
use rlhf_bot::train::reward_models::{AnyReward, weights_snapshot};
use rlhf_bot::train::reward_run::{
    RewardTrainOptions, TextData, encode, load_backbone, load_backbone_with_heads,
    train_reward_mixed,
};
use rlhf_bot::train::reward_trainer::{
    self, RewardBackbone, TrainConfig, TrainData, batch_loss, evaluate_mixed,
};

use super::trainer::{cfg, tiny_rm_dir, toy_pairs};

const GOOD: &str = "Sure, happy to help: prices change, so people adapt.";
const CURT: &str = "No.";

fn heads() -> ExtraHeads {
    ExtraHeads {
        aspects: vec!["accuracy".into(), "helpfulness".into()],
        step_head: true,
    }
}

fn prompt(i: usize) -> String {
    format!("User: Tell me about carbon prices (question {i}).\nAssistant: ")
}

/// Steps whose correctness the text decides: "Prices rise" and "Demand falls" are right,
/// "Nothing changes" and "Taxes are magic" wrong (no closing period, so a step's last token
/// is a word of its own). `ends` are byte offsets, as the dataset builder writes them.
fn step_point(i: usize) -> PointText {
    let right = ["Prices rise", "Demand falls"][i % 2];
    let wrong = ["Nothing changes", "Taxes are magic"][(i / 2) % 2];
    let (steps, labels) = if i.is_multiple_of(3) {
        ([wrong, right], vec![Some(false), Some(true)])
    } else {
        ([right, wrong], vec![Some(true), Some(false)])
    };
    let answer = steps.join("; ");
    let ends = vec![steps[0].len(), answer.len()];
    PointText {
        prompt: prompt(i),
        answer,
        label: PointLabel::Steps { ends, labels },
    }
}

/// `n` examples of each single-answer kind; good answers get up-thumbs, high ratings and high
/// aspect ratings, curt ones the opposite. Every third aspect example rates only `accuracy`.
fn points(n: usize) -> Vec<PointText> {
    let mut out = Vec::new();
    for i in 0..n {
        let good = i.is_multiple_of(2);
        let answer = if good { GOOD } else { CURT }.to_string();
        out.push(PointText {
            prompt: prompt(i),
            answer: answer.clone(),
            label: PointLabel::Thumb(good),
        });
        out.push(PointText {
            prompt: prompt(i + 100),
            answer: answer.clone(),
            label: PointLabel::Rating(if good { 0.9 } else { 0.1 }),
        });
        out.push(step_point(i));
        let mut t = BTreeMap::from([("accuracy".to_string(), if good { 0.75 } else { 0.5 })]);
        if !i.is_multiple_of(3) {
            t.insert("helpfulness".into(), if good { 1.0 } else { 0.0 });
        }
        out.push(PointText {
            prompt: prompt(i + 200),
            answer,
            label: PointLabel::Aspects(t),
        });
    }
    out
}

fn mixed(pairs: &[PairText], n_points: usize) -> TextData {
    TextData {
        pairs: pairs.to_vec(),
        points: points(n_points),
    }
}

fn llama_with_heads(tmp: &Path) -> (AnyReward, rlhf_bot::model::tokenizer::Tokenizer) {
    let dir = tiny_rm_dir(tmp);
    let (m, tok, _) = load_backbone_with_heads(Some(&dir), 1, &heads(), &Device::Cpu).unwrap();
    (m, tok)
}

/// A seeded 16-wide BERT reward model with both kinds of extra head, saved as a model directory
/// with the fixture's WordPiece tokenizer, then loaded as the trainer loads any `--model`.
fn bert_with_heads(tmp: &Path) -> (AnyReward, rlhf_bot::model::tokenizer::Tokenizer) {
    let mut cfg = rlhf_bot::model::bert::BertConfig::minilm_l6();
    cfg.vocab_size = 41;
    cfg.hidden_size = 16;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.intermediate_size = 32;
    cfg.max_position_embeddings = 24;
    let head = RewardHeadConfig {
        aspects: vec!["helpfulness".into(), "accuracy".into()],
        step_head: true,
        ..Default::default()
    };
    let tok_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert/tokenizer.json");
    let mut model = BertRewardModel::new_seeded(&cfg, head, &Device::Cpu, 5).unwrap();
    model.set_tokenizer(LoadedTokenizer::from_file(&tok_path).unwrap());
    let dir = tmp.join("bert-rm");
    model.save(&dir).unwrap();
    let (m, tok, _) = load_backbone(Some(&dir), 1, &Device::Cpu).unwrap();
    (m, tok)
}

/// BERT-vocabulary texts (the fixture tokenizer knows 41 words).
fn bert_text() -> TextData {
    let pair = |c: &str, r: &str| PairText {
        prompt: "the carbon tax ?".into(),
        chosen: c.into(),
        rejected: r.into(),
        margin: Some(0.5),
        weight: None,
    };
    let point = |a: &str, label| PointText {
        prompt: "the climate policy ?".into(),
        answer: a.into(),
        label,
    };
    TextData {
        pairs: vec![
            pair("a good helpful answer .", "no ."),
            pair("yes , the price .", "wrong !"),
        ],
        points: vec![
            point("good answer .", PointLabel::Thumb(true)),
            point("bad answer", PointLabel::Rating(0.25)),
            point(
                "the price . this is wrong .",
                PointLabel::Steps {
                    ends: vec![11, 27],
                    labels: vec![Some(true), Some(false)],
                },
            ),
            point(
                "a helpful answer",
                PointLabel::Aspects(BTreeMap::from([
                    ("accuracy".into(), 0.5),
                    ("helpfulness".into(), 0.75),
                ])),
            ),
        ],
    }
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn bce(x: f64, y: f64) -> f64 {
    softplus(x) - y * x
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn refs(data: &TrainData) -> (Vec<&EncodedPair>, Vec<&EncodedPoint>) {
    (data.pairs.iter().collect(), data.points.iter().collect())
}

#[test]
fn weighted_total_equals_the_hand_computed_sum() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = llama_with_heads(tmp.path());
    let mut pairs = toy_pairs(3);
    pairs[1].margin = Some(0.7);
    let data = encode(&model, &tok, &mixed(&pairs, 2), 64).unwrap();
    let (p, q) = refs(&data);
    let batch = collate_mixed(&p, &q, model.layout().pad_id, &Device::Cpu).unwrap();
    let out = model.forward(&batch).unwrap();
    let r: Vec<f64> = out.rewards.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let steps: Vec<Vec<f64>> = out
        .step_logits
        .as_ref()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let aspects: Vec<Vec<f64>> = out
        .aspects
        .as_ref()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();

    let b = p.len();
    let center = 0.01;
    let pairwise = (0..b)
        .map(|i| softplus(-(r[i] - r[b + i] - p[i].margin)))
        .sum::<f64>()
        / b as f64
        + center * (0..b).map(|i| (r[i] + r[b + i]).powi(2)).sum::<f64>() / b as f64;
    let (mut point_mse, mut point_bce, mut n_point) = (0.0, 0.0, 0.0);
    let (mut step_sum, mut n_steps) = (0.0, 0.0);
    let (mut asp_sum, mut n_asp) = (0.0, 0.0);
    for (j, pt) in q.iter().enumerate() {
        let row = 2 * b + j;
        match &pt.target {
            PointTarget::Thumb(y) => {
                point_mse += bce(r[row], f64::from(*y));
                point_bce += bce(r[row], f64::from(*y));
                n_point += 1.0;
            }
            PointTarget::Rating(y) => {
                point_mse += (sigmoid(r[row]) - f64::from(*y)).powi(2);
                point_bce += bce(r[row], f64::from(*y));
                n_point += 1.0;
            }
            PointTarget::Steps { positions, labels } => {
                for (pos, y) in positions.iter().zip(labels) {
                    step_sum += bce(steps[row][*pos], f64::from(*y));
                    n_steps += 1.0;
                }
            }
            PointTarget::Aspects(t) => {
                for (col, y) in t.iter().enumerate() {
                    if let Some(y) = y {
                        asp_sum += (aspects[row][col] - f64::from(*y)).powi(2);
                        n_asp += 1.0;
                    }
                }
            }
        }
    }
    assert!(n_point == 4.0 && n_steps == 4.0 && n_asp == 3.0);
    let weights = RewardLossWeights {
        pairwise: 1.0,
        pointwise: 0.5,
        steps: 2.0,
        aspects: 3.0,
    };
    for (rating_loss, pointwise) in [
        (RatingLoss::Mse, point_mse / n_point),
        (RatingLoss::Bce, point_bce / n_point),
    ] {
        let c = TrainConfig {
            loss_weights: weights,
            center_rewards_coefficient: Some(center),
            rating_loss,
            ..TrainConfig::default()
        };
        let bl = batch_loss(&out, &p, &q, &c).unwrap();
        let expect = [
            ("pairwise", pairwise),
            ("pointwise", pointwise),
            ("steps", step_sum / n_steps),
            ("aspects", asp_sum / n_asp),
        ];
        for ((name, part), (_, want)) in bl.parts.named().into_iter().zip(expect) {
            let got = scalar(part.unwrap());
            assert!((got - want).abs() < 1e-5, "{name}: {got} vs {want}");
        }
        let total =
            1.0 * pairwise + 0.5 * pointwise + 2.0 * (step_sum / n_steps) + 3.0 * (asp_sum / n_asp);
        let got = scalar(&bl.total);
        assert!((got - total).abs() < 1e-5, "total {got} vs {total}");
    }

    // A weight of 0 drops its part from the total; no examples of a kind, no part.
    let c = TrainConfig {
        loss_weights: RewardLossWeights {
            steps: 0.0,
            ..weights
        },
        center_rewards_coefficient: Some(center),
        ..TrainConfig::default()
    };
    let bl = batch_loss(&out, &p, &q, &c).unwrap();
    let want = pairwise + 0.5 * point_mse / n_point + 3.0 * asp_sum / n_asp;
    assert!((scalar(&bl.total) - want).abs() < 1e-5);
    let only_pairs = collate_mixed(&p, &[], model.layout().pad_id, &Device::Cpu).unwrap();
    let bl = batch_loss(&model.forward(&only_pairs).unwrap(), &p, &[], &c).unwrap();
    assert!(bl.parts.pointwise.is_none() && bl.parts.steps.is_none());
    assert!(bl.parts.aspects.is_none() && bl.pair_metrics.is_some());
}

/// Every variable whose gradient is missing or all zero after `loss.backward()`.
fn without_gradient(model: &AnyReward, loss: &Tensor) -> Vec<String> {
    let grads = loss.backward().unwrap();
    named_vars(model.varmap())
        .into_iter()
        .filter(|(_, v)| {
            grads
                .get(v.as_tensor())
                .is_none_or(|g| scalar(&g.abs().unwrap().sum_all().unwrap()) == 0.0)
        })
        .map(|(n, _)| n)
        .collect()
}

/// Gradient test for one backbone: each kind alone reaches its own head and no other head;
/// all kinds together reach every parameter.
fn each_head_learns_from_its_kind(model: &AnyReward, data: &TrainData) {
    let c = TrainConfig::default();
    let pad = model.layout().pad_id;
    let loss_of = |pairs: &[&EncodedPair], pts: &[&EncodedPoint]| {
        let batch = collate_mixed(pairs, pts, pad, &Device::Cpu).unwrap();
        batch_loss(&model.forward(&batch).unwrap(), pairs, pts, &c)
            .unwrap()
            .total
    };
    let of_kind = |want: fn(&PointTarget) -> bool| -> Vec<&EncodedPoint> {
        data.points.iter().filter(|p| want(&p.target)).collect()
    };
    let pairs: Vec<&EncodedPair> = data.pairs.iter().collect();
    let cases: Vec<(&str, Tensor, &[&str])> = vec![
        // Bradley–Terry sees only score differences: a score bias cancels and gets none.
        ("pairs", loss_of(&pairs, &[]), &["score.weight"][..]),
        (
            "pointwise",
            loss_of(
                &[],
                &of_kind(|t| matches!(t, PointTarget::Thumb(_) | PointTarget::Rating(_))),
            ),
            &["score."][..],
        ),
        (
            "steps",
            loss_of(&[], &of_kind(|t| matches!(t, PointTarget::Steps { .. }))),
            &["step_head."][..],
        ),
        (
            "aspects",
            loss_of(&[], &of_kind(|t| matches!(t, PointTarget::Aspects(_)))),
            &["aspect_heads.accuracy.", "aspect_heads.helpfulness."][..],
        ),
    ];
    let heads = ["score.", "step_head.", "aspect_heads."];
    for (kind, loss, own) in cases {
        let missing = without_gradient(model, &loss);
        for name in named_vars(model.varmap()).into_iter().map(|(n, _)| n) {
            let is_own = own.iter().any(|o| name.starts_with(o));
            let is_head = heads.iter().any(|h| name.starts_with(h));
            if is_own {
                assert!(!missing.contains(&name), "{kind}: {name} got no gradient");
            } else if is_head {
                assert!(missing.contains(&name), "{kind}: {name} got a gradient");
            }
        }
    }
    let all: Vec<&EncodedPoint> = data.points.iter().collect();
    let missing = without_gradient(model, &loss_of(&pairs, &all));
    assert!(
        missing.is_empty(),
        "no gradient with every kind present: {missing:?}"
    );
}

/// Runs `check` on the llama and the BERT reward model, each with both kinds of extra head and
/// a batch of every kind of example in its vocabulary.
fn on_both_backbones(check: fn(&AnyReward, &TrainData)) {
    let tmp = tempfile::tempdir().unwrap();
    let (llama, tok) = llama_with_heads(tmp.path());
    let data = encode(&llama, &tok, &mixed(&toy_pairs(2), 2), 64).unwrap();
    check(&llama, &data);

    let (bert, tok) = bert_with_heads(tmp.path());
    assert_eq!(bert.aspect_names(), ["accuracy", "helpfulness"]);
    assert!(bert.has_step_head());
    let data = encode(&bert, &tok, &bert_text(), 20).unwrap();
    check(&bert, &data);
}

#[test]
fn each_head_gets_a_gradient_when_its_kind_is_present() {
    on_both_backbones(each_head_learns_from_its_kind);
}

/// Issue 18 §2: evaluation scores through [`RewardBackbone::score`], a twin over detached views
/// of the weights. Its outputs equal the training forward's on the same batch (to 1e-5), carry
/// no autograd graph (nothing is kept for a backward pass), and follow the weights when the
/// optimiser changes them in place.
fn scoring_matches_the_training_forward_without_a_graph(model: &AnyReward, data: &TrainData) {
    let (pairs, points) = refs(data);
    let batch = collate_mixed(&pairs, &points, model.layout().pad_id, &Device::Cpu).unwrap();
    let compare = |when: &str| -> Vec<f32> {
        let train = model.forward(&batch).unwrap();
        let eval = model.score(&batch).unwrap();
        assert!(
            train.rewards.track_op(),
            "{when}: the training forward has no graph"
        );
        let outputs = [
            ("rewards", Some(train.rewards.clone()), Some(eval.rewards)),
            ("aspects", train.aspects, eval.aspects),
            ("step logits", train.step_logits, eval.step_logits),
        ];
        for (what, t, e) in outputs {
            let (t, e) = (t.expect(what), e.expect(what));
            assert!(!e.track_op(), "{when}: scoring recorded a graph for {what}");
            let diff = crate::common::max_abs_diff(&t, &e);
            assert!(diff <= 1e-5, "{when}: {what} differ by {diff}");
        }
        train.rewards.flatten_all().unwrap().to_vec1().unwrap()
    };
    let before = compare("before training");
    let mut opt = AdamW::from_varmap(
        model.varmap(),
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let c = TrainConfig::default();
    let loss = batch_loss(&model.forward(&batch).unwrap(), &pairs, &points, &c).unwrap();
    opt.backward_step(&loss.total).unwrap();
    let after = compare("after an optimiser step");
    assert_ne!(before, after, "the step changed no score");
}

#[test]
fn evaluation_scores_equal_the_training_forward_and_build_no_graph() {
    on_both_backbones(scoring_matches_the_training_forward_without_a_graph);
}

fn mixed_cfg() -> TrainConfig {
    TrainConfig {
        epochs: 6,
        batch_size: 6,
        eval_every: 0,
        log_every: 1,
        ..cfg()
    }
}

#[test]
fn training_on_mixed_data_lowers_every_part() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, tok) = llama_with_heads(tmp.path());
    let train = encode(&model, &tok, &mixed(&toy_pairs(8), 6), 64).unwrap();
    let eval = encode(&model, &tok, &mixed(&toy_pairs(12)[8..], 2), 64).unwrap();
    let out = reward_trainer::train_mixed(
        &model,
        &train,
        &eval,
        &mixed_cfg(),
        tmp.path(),
        false,
        &Device::Cpu,
    )
    .unwrap();
    // 8 pairs + 24 single answers = 32 examples, batches of 6: 6 steps an epoch.
    assert_eq!(out.steps, 36);
    for part in ["pairwise", "pointwise", "steps", "aspects"] {
        let key = format!("loss/{part}");
        let v: Vec<f64> = out.log.iter().filter_map(|l| l.get(&key)).collect();
        assert!(v.len() >= 15, "{key} logged only {} times", v.len());
        let first = v[..6].iter().sum::<f64>() / 6.0;
        let last = v[v.len() - 6..].iter().sum::<f64>() / 6.0;
        assert!(last < 0.7 * first, "{key} did not fall: {first} -> {last}");
    }
    let ev = out.eval.unwrap();
    assert_eq!(ev.n, 4);
    assert!(ev.accuracy >= 0.99, "{ev:?}");
    assert_eq!(ev.pointwise_accuracy, Some(1.0), "{ev:?}");
}

#[test]
fn eval_reports_aspect_mae_step_accuracy_and_heads_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_rm_dir(tmp.path());
    let out = tmp.path().join("run");
    let opts = RewardTrainOptions {
        model: Some(dir),
        out: out.clone(),
        aspects: vec!["accuracy".into(), "helpfulness".into()],
        train: TrainConfig {
            epochs: 2,
            ..mixed_cfg()
        },
        ..RewardTrainOptions::default()
    };
    let eval_text = mixed(&toy_pairs(12)[8..], 3);
    let s = train_reward_mixed(&opts, &mixed(&toy_pairs(8), 4), &eval_text).unwrap();
    assert!(s.completed);

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let e = &m["eval"];
    for k in [
        "accuracy",
        "loss",
        "n",
        "step_accuracy",
        "pointwise_accuracy",
    ] {
        assert!(e[k].is_number(), "eval.{k} missing in {m}");
    }
    assert_eq!(e["n"], 4);
    assert_eq!(e["step_n"], 6, "3 step examples x 2 steps");
    assert_eq!(e["pointwise_n"], 3, "the thumbs among the single answers");
    assert_eq!(e["aspects"]["accuracy"]["n"], 3);
    assert_eq!(e["aspects"]["helpfulness"]["n"], 2);
    assert_eq!(m["dataset"]["counts"]["train_points"], 16);
    let lines = rlhf_bot::run::outputs::read_log(&out).unwrap();
    let eval_line = lines
        .iter()
        .find(|l| l.get("eval_step_accuracy").is_some())
        .expect("an eval line with step accuracy");
    assert!(eval_line.get("eval_aspect_mae/accuracy").is_some());
    assert!(eval_line.get("eval_pointwise_accuracy").is_some());

    // The heads are saved under their documented names and come back on load.
    let names: Vec<String> =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    for n in [
        "score.weight",
        "step_head.weight",
        "step_head.bias",
        "aspect_heads.accuracy.weight",
        "aspect_heads.helpfulness.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not saved: {names:?}");
    }
    let (model, tok, _) = load_backbone(Some(&out), 0, &Device::Cpu).unwrap();
    assert_eq!(model.aspect_names(), ["accuracy", "helpfulness"]);
    assert!(model.has_step_head());
    let enc = encode(&model, &tok, &eval_text, 64).unwrap();
    let ev = evaluate_mixed(&model, &enc, 8, &Device::Cpu).unwrap();
    assert_eq!(ev.step_accuracy, s.metrics.eval.step_accuracy);
    assert_eq!(ev.pointwise_accuracy, s.metrics.eval.pointwise_accuracy);

    // MAE by hand from the reloaded model's aspect outputs.
    let (mut sum, mut n) = (0.0f64, 0u64);
    for p in &enc.points {
        if let PointTarget::Aspects(t) = &p.target {
            let batch = collate_mixed(&[], &[p], model.layout().pad_id, &Device::Cpu).unwrap();
            let a: Vec<Vec<f32>> = model
                .forward(&batch)
                .unwrap()
                .aspects
                .unwrap()
                .to_vec2()
                .unwrap();
            if let Some(y) = t[0] {
                sum += f64::from((a[0][0] - y).abs());
                n += 1;
            }
        }
    }
    let mae = sum / n as f64;
    let reported = s.metrics.eval.aspects["accuracy"].mae;
    assert!((mae - reported).abs() < 1e-5, "{mae} vs {reported}");
    assert_eq!(s.metrics.eval.aspect_errors["accuracy"], reported);
}

#[test]
fn resume_with_mixed_data_reaches_the_same_weights_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        epochs: 2,
        batch_size: 5,
        grad_accum: 2,
        eval_every: 2,
        log_every: 3,
        checkpoint_every: 2,
        ..cfg()
    };
    let train_text = mixed(&toy_pairs(6), 3);
    let eval_text = mixed(&toy_pairs(8)[6..], 1);
    let run = |out: &Path, c: &TrainConfig, resume: bool| {
        let (model, tok) = llama_with_heads(&out.join("model"));
        let train = encode(&model, &tok, &train_text, 64).unwrap();
        let eval = encode(&model, &tok, &eval_text, 64).unwrap();
        let o = reward_trainer::train_mixed(&model, &train, &eval, c, out, resume, &Device::Cpu)
            .unwrap();
        (o, weights_snapshot(model.varmap()).unwrap())
    };
    // 18 examples, 5 a micro-batch (the last one 3), 2 micro-batches a step: 2 steps an epoch.
    let (full, w_full) = run(&tmp.path().join("a"), &c, false);
    assert_eq!(full.steps, 4);
    let b = tmp.path().join("b");
    let (part, _) = run(
        &b,
        &TrainConfig {
            stop_after_steps: Some(3),
            ..c.clone()
        },
        false,
    );
    assert!(!part.completed && part.steps == 3);
    let (resumed, w_resumed) = run(&b, &c, true);
    assert_eq!(resumed.steps, 4);
    assert_eq!(resumed.log, full.log, "log differs after resume");
    assert_eq!(w_resumed, w_full, "weights differ after resume");
    assert!(
        full.log.iter().any(|l| l.get("loss/steps").is_some())
            && full
                .log
                .iter()
                .any(|l| l.get("eval_step_accuracy").is_some())
    );
}

#[test]
fn a_zero_weight_skips_its_kind_even_without_its_head() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_rm_dir(tmp.path());
    // No step head and no aspect heads: their kinds must be switched off to train.
    let (model, tok, _) = load_backbone(Some(&dir), 1, &Device::Cpu).unwrap();
    let mut text = mixed(&toy_pairs(4), 2);
    text.points
        .retain(|p| !matches!(p.label, PointLabel::Aspects(_)));
    let data = encode(&model, &tok, &text, 64).unwrap();
    let err = reward_trainer::train_mixed(
        &model,
        &data,
        &TrainData::default(),
        &mixed_cfg(),
        &tmp.path().join("a"),
        false,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("no step head"), "{err:#}");
    let c = TrainConfig {
        epochs: 1,
        loss_weights: RewardLossWeights {
            steps: 0.0,
            ..RewardLossWeights::default()
        },
        ..mixed_cfg()
    };
    let out = reward_trainer::train_mixed(
        &model,
        &data,
        &TrainData::default(),
        &c,
        &tmp.path().join("b"),
        false,
        &Device::Cpu,
    )
    .unwrap();
    // 4 pairs + 4 single answers (the 2 step examples are skipped), batches of 6: 2 steps.
    assert_eq!(out.steps, 2);
    assert!(out.log.iter().all(|l| l.get("loss/steps").is_none()));
}

fn config_error(reward: &str) -> rlhf_bot::config::ConfigError {
    let text = format!("feedback:\n  source: file\n  path: feedback.jsonl\nreward:\n{reward}");
    rlhf_bot::config::load_str(&PathBuf::from("rlhf.yaml"), &text).unwrap_err()
}

#[test]
fn bad_loss_weights_are_config_errors_naming_the_key() {
    let e = config_error("  loss_weights:\n    pointwise: -1\n");
    assert_eq!(e.key_path, "reward.loss_weights.pointwise");
    assert!(
        e.to_string().contains("-1") && e.to_string().contains("hint:"),
        "{e}"
    );
    assert_eq!(e.line, Some(6), "{e}");
    let e = config_error("  loss_weights:\n    steps: .nan\n");
    assert_eq!(e.key_path, "reward.loss_weights.steps");
    assert!(e.to_string().contains("NaN"), "{e}");
    let e = config_error(
        "  loss_weights:\n    pairwise: 0\n    pointwise: 0\n    steps: 0\n    aspects: 0\n",
    );
    assert_eq!(e.key_path, "reward.loss_weights");
    assert!(e.to_string().contains("every weight is 0"), "{e}");
    let e = config_error("  loss_weights:\n    thumbs: 1\n");
    assert!(e.to_string().contains("thumbs"), "{e}");
    let e = config_error("  center_rewards_coefficient: -0.5\n");
    assert_eq!(e.key_path, "reward.center_rewards_coefficient");

    let ok = rlhf_bot::config::load_str(
        &PathBuf::from("rlhf.yaml"),
        "feedback:\n  source: file\n  path: f.jsonl\n  aspects: [accuracy]\nreward:\n  loss_weights:\n    steps: 0\n    aspects: 2.5\n  rating_loss: bce\n  center_rewards_coefficient: 0.01\n  eval_every: 0\n",
    )
    .unwrap();
    let t = &ok.reward.train;
    assert_eq!(
        t.loss_weights,
        RewardLossWeights {
            pairwise: 1.0,
            pointwise: 1.0,
            steps: 0.0,
            aspects: 2.5
        }
    );
    assert_eq!(t.rating_loss, RatingLoss::Bce);
    assert_eq!(t.center_rewards_coefficient, Some(0.01));
    assert_eq!(t.eval_every, 0);
    assert_eq!(ok.reward.aspects, ["accuracy"]);
}
