//! Frozen models held in bf16 (`policy.precision: bf16`, issue #20 §3): the decoder's
//! projections stored as bf16 and multiplied through the bf16 kernels, against the same model in
//! f32, on every family fixture and the tiny Llama policy. In-process: unlike `reward.precision`,
//! a bf16-held weight needs no process-wide switch.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rlhf_bot::model::generate::{GenerationConfig, generate};
use rlhf_bot::model::llama::{
    LlamaConfig, LlamaForCausalLM, load_frozen_causal_lm, load_frozen_causal_lm_in,
};
use rlhf_bot::model::lora::{self, HasAdaptableLinears, LoraConfig, LoraInit};
use rlhf_bot::train::optim::{AdamW, AdamWConfig};

use crate::common::max_abs_diff;

/// Every family fixture, and the tiny Llama the policy tests train.
fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("families"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs.push(root.join("tiny-llama-policy"));
    dirs
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// A 40-token prompt within every fixture's vocabulary (the family fixtures' own prompt length).
fn prompt(cfg: &LlamaConfig) -> Vec<u32> {
    (0..40u32)
        .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
        .collect()
}

fn logits(model: &LlamaForCausalLM, ids: &[u32]) -> Tensor {
    let row = Tensor::new(vec![ids.to_vec()], &Device::Cpu).unwrap();
    model.forward(&row, None).unwrap().squeeze(0).unwrap()
}

fn largest(t: &Tensor) -> f32 {
    max_abs_diff(t, &t.zeros_like().unwrap())
}

/// The f32 model's greedy choice at each step of `tokens` after `prompt` (teacher-forced), with
/// its margin over the choice of `other` at the same step (0 where they agree), and the largest
/// logit difference between the two models at that step.
fn choices(
    f32_model: &LlamaForCausalLM,
    other: &LlamaForCausalLM,
    prompt: &[u32],
    tokens: &[u32],
) -> Vec<(u32, u32, f32, f32)> {
    let mut ids = prompt.to_vec();
    ids.extend(tokens);
    let (a, b) = (logits(f32_model, &ids), logits(other, &ids));
    let argmax = |row: &[f32]| -> usize {
        (0..row.len())
            .max_by(|&i, &j| row[i].total_cmp(&row[j]))
            .unwrap()
    };
    (0..tokens.len())
        .map(|i| {
            let at = prompt.len() - 1 + i;
            let ra: Vec<f32> = a.get(at).unwrap().to_vec1().unwrap();
            let rb: Vec<f32> = b.get(at).unwrap().to_vec1().unwrap();
            let (pa, pb) = (argmax(&ra), argmax(&rb));
            let diff = ra
                .iter()
                .zip(&rb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            (pa as u32, pb as u32, ra[pa] - ra[pb], diff)
        })
        .collect()
}

/// Projections in bf16 change each product's inputs by at most 2⁻⁹ relative: the logits move
/// by under 1.5% of their largest magnitude (measured: 0.15–1%), and the 16-token greedy continuation is the f32 one
/// except where f32's own choice is a near-tie: bf16 may then take the runner-up, but only at a
/// step whose f32 margin is within the logit difference measured there (llama-longrope, whose
/// second token leads by 8e-4 in f32, is such a case).
#[test]
fn bf16_held_frozen_models_keep_the_greedy_continuation_of_f32() {
    let mut report = Vec::new();
    for dir in fixtures() {
        let name = name(&dir);
        let f32_model = load_frozen_causal_lm(&dir, &Device::Cpu).unwrap();
        let bf16_model = load_frozen_causal_lm_in(&dir, &Device::Cpu, DType::BF16).unwrap();
        let mut bf16_copy = bf16_model.clone();
        let held: Vec<DType> = bf16_copy
            .linears_mut()
            .iter()
            .map(|(_, l)| l.weight().dtype())
            .collect();
        assert!(
            !held.is_empty() && held.iter().all(|d| *d == DType::BF16),
            "{name}: projections not held in bf16: {held:?}"
        );
        assert_eq!(bf16_model.lm_head_weight().dtype(), DType::F32, "{name}");

        let cfg = f32_model.config().clone();
        let ids = prompt(&cfg);
        let (a, b) = (logits(&f32_model, &ids), logits(&bf16_model, &ids));
        let diff = max_abs_diff(&a, &b);
        let scale = largest(&a);
        assert!(
            diff <= 1.5e-2 * scale,
            "{name}: bf16 logits differ by {diff} (largest logit {scale})"
        );

        let greedy = GenerationConfig::greedy(16, cfg.eos_token_ids(), 0);
        let want = generate(&f32_model, std::slice::from_ref(&ids), &greedy).unwrap();
        let got = generate(&bf16_model, std::slice::from_ref(&ids), &greedy).unwrap();
        let (want, got) = (&want.tokens[0], &got.tokens[0]);
        let outcome = match want.iter().zip(got).position(|(x, y)| x != y) {
            None => {
                assert_eq!(got, want, "{name}: continuations of different lengths");
                "same 16-token continuation".to_string()
            }
            Some(step) => {
                let (pick, other, margin, step_diff) =
                    choices(&f32_model, &bf16_model, &ids, want)[step];
                assert!(
                    other == got[step] && margin <= step_diff,
                    "{name}: bf16 diverges at step {step} ({} vs f32's {pick}) where f32 leads \
                     by {margin}, more than the logit difference {step_diff} there",
                    got[step]
                );
                format!(
                    "diverges at step {step}: f32 leads by {margin:.1e}, bf16 moved logits by \
                     {step_diff:.1e} there"
                )
            }
        };
        report.push(format!(
            "{name}: max|logit diff| {diff:.2e} (max|logit| {scale:.2}); {outcome}"
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// The greedy choice after each prefix of `tokens`, recomputing the whole sequence every step:
/// a forward pass over 40+ positions, so every product of a bf16-held weight runs the bf16 gemm.
fn recomputed_greedy(model: &LlamaForCausalLM, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let last: Vec<f32> = logits(model, &ids)
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let pick = (0..last.len())
            .max_by(|&i, &j| last[i].total_cmp(&last[j]))
            .unwrap();
        ids.push(pick as u32);
    }
    ids.split_off(prompt.len())
}

/// Decoding a bf16-held model multiplies a few rows at a time (1 and 8 here, at most
/// `MAX_ROWS`), which streams the stored bf16 rows through the bf16 matrix-vector kernel;
/// recomputing the whole sequence runs the bf16 gemm. Both take the same bf16 operands and
/// differ only in f32 summation order, so on every fixture the greedy continuations are the
/// same, for one prompt and for a batch of eight (the kernel's 8-row tile). Dynamic NTK
/// scaling is left out: its frequencies follow the sequence length, so a cached decode and a
/// recomputation rotate the earlier keys differently whatever the weights' precision.
#[test]
fn decoding_bf16_held_weights_continues_as_the_bf16_gemm_does() {
    for dir in fixtures() {
        let name = name(&dir);
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        if config.contains("\"dynamic\"") {
            continue;
        }
        let model = load_frozen_causal_lm_in(&dir, &Device::Cpu, DType::BF16).unwrap();
        let cfg = model.config().clone();
        let vocab = cfg.vocab_size as u32;
        // Eight prompts of the first one's length (no padding), each its own sequence.
        let prompts: Vec<Vec<u32>> = (0..8u32)
            .map(|r| prompt(&cfg).iter().map(|&t| (t + 11 * r) % vocab).collect())
            .collect();
        let greedy = GenerationConfig::greedy(12, cfg.eos_token_ids(), 0);
        for batch in [&prompts[..1], &prompts[..]] {
            let decoded = generate(&model, batch, &greedy).unwrap();
            for (row, (p, got)) in batch.iter().zip(&decoded.tokens).enumerate() {
                let want = recomputed_greedy(&model, p, got.len());
                assert_eq!(
                    got,
                    &want,
                    "{name}, batch {}, row {row}: decoded vs recomputed",
                    batch.len()
                );
            }
        }
    }
}

/// LoRA A/B on a base held in bf16 are f32 variables, and training them gives the losses of
/// the f32 base within 2e-3 relative over three AdamW steps (the base's products round their
/// inputs to bf16: 2⁻⁹ relative each).
#[test]
fn a_lora_step_on_a_bf16_base_matches_the_f32_base() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-policy");
    let run = |dtype: DType| -> Vec<f32> {
        let mut model = load_frozen_causal_lm_in(&dir, &Device::Cpu, dtype).unwrap();
        let varmap = VarMap::new();
        let lora_cfg = LoraConfig {
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            ..LoraConfig::default()
        };
        lora::attach_lora(&mut model, &lora_cfg, &varmap, LoraInit::Fresh { seed: 3 }).unwrap();
        for var in varmap.all_vars() {
            assert_eq!(var.dtype(), DType::F32, "LoRA variables stay f32");
        }
        let ids = prompt(model.config());
        let ids = Tensor::new(vec![ids], &Device::Cpu).unwrap();
        let targets = ids.ones_like().unwrap();
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::from_varmap(&varmap, cfg).unwrap();
        (0..3)
            .map(|_| {
                let loss = crate::families::nll(&model, &ids, &targets);
                opt.backward_step(&loss).unwrap();
                loss.to_scalar::<f32>().unwrap()
            })
            .collect()
    };
    let (full, half) = (run(DType::F32), run(DType::BF16));
    eprintln!("LoRA losses, f32 base {full:?}, bf16 base {half:?}");
    assert!(full.last() < full.first(), "the f32 run learns: {full:?}");
    for (step, (a, b)) in full.iter().zip(&half).enumerate() {
        assert!(
            (a - b).abs() <= 2e-3 * a.abs(),
            "step {step}: loss {b} on the bf16 base vs {a} on the f32 base"
        );
    }
}

/// The reward model that scores rollouts, held in bf16, scores as the f32 one does within 1% of
/// the scores' spread, and ranks the answers the same way.
#[test]
fn a_bf16_held_reward_model_scores_as_the_f32_one() {
    use rlhf_bot::train::policy_eval::RewardScorer;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-rm");
    let f32_rm = RewardScorer::load(&dir, &Device::Cpu).unwrap();
    let bf16_rm = RewardScorer::load_in(&dir, &Device::Cpu, DType::BF16).unwrap();
    let rows: Vec<Vec<u32>> = (0..6u32)
        .map(|r| (0..20 + r).map(|i| (i * 13 + r * 7 + 5) % 250).collect())
        .collect();
    let texts = vec![String::new(); rows.len()];
    let (a, b) = (
        f32_rm.score(&rows, &texts).unwrap(),
        bf16_rm.score(&rows, &texts).unwrap(),
    );
    eprintln!("reward scores f32 {a:?}, bf16 {b:?}");
    assert_scores_agree(&a, &b);
}

/// bf16 scores `b` within 1% of the f32 scores' (`a`) spread, ranking the rows as `a` does;
/// returns the largest difference.
fn assert_scores_agree(a: &[f32], b: &[f32]) -> f32 {
    let spread =
        a.iter().copied().fold(f32::MIN, f32::max) - a.iter().copied().fold(f32::MAX, f32::min);
    let gap = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        gap <= 1e-2 * spread,
        "bf16 scores differ by {gap} (spread {spread})"
    );
    let order = |s: &[f32]| {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&i, &j| s[i].total_cmp(&s[j]));
        idx
    };
    assert_eq!(order(a), order(b), "the ranking changed");
    gap
}

/// A BERT reward model scoring rollouts under `policy.precision: bf16` holds its encoder's
/// linear weights in bf16: its scores move (bf16 rounding is visible) but stay within 1% of the
/// f32 scores' spread — each product's inputs are off by at most 2⁻⁹ relative, through two
/// post-norm layers — and rank the answers as f32 does. Such a model scores only: saving it is
/// refused with a message saying why.
#[test]
fn a_bf16_held_bert_reward_model_scores_as_the_f32_one() {
    use rlhf_bot::train::policy_eval::RewardScorer;
    let ws = crate::common::Workspace::new();
    let dir = ws.path().join("tiny-bert-rm");
    crate::precision::tiny_bert_reward_model(&dir);
    let f32_rm = RewardScorer::load(&dir, &Device::Cpu).unwrap();
    let bf16_rm = RewardScorer::load_in(&dir, &Device::Cpu, DType::BF16).unwrap();
    let texts: Vec<String> = [
        "the carbon tax is a good policy .",
        "i think the answer is wrong !",
        "a man is eating bread and food",
        "yes , this price is helpful",
        "no , that economy answer is bad",
        "the girl is carrying a baby ?",
        "climate policy or carbon price",
        "you eating this ? it is good",
    ]
    .map(String::from)
    .to_vec();
    let ids = vec![Vec::new(); texts.len()];
    let (a, b) = (
        f32_rm.score(&ids, &texts).unwrap(),
        bf16_rm.score(&ids, &texts).unwrap(),
    );
    eprintln!("BERT reward scores f32 {a:?}, bf16 {b:?}");
    let gap = assert_scores_agree(&a, &b);
    assert!(gap > 0.0, "the bf16 scorer gave the f32 scores bit for bit");

    let scorer =
        rlhf_bot::model::bert::BertRewardModel::load_frozen(&dir, &Device::Cpu, DType::BF16)
            .unwrap();
    let err = scorer
        .save(&ws.path().join("copy"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scoring only") && err.contains("hint"),
        "{err}"
    );
}
