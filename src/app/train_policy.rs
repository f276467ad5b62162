//! `train policy`: loads the base policy, the data and the reward model, runs the chosen
//! algorithm (DPO, KTO or PPO), evaluates the candidate against production on held-out prompts
//! and writes the run directory the report and registry stages read:
//! `policy/` (PEFT adapter under `policy/adapter/` with LoRA, else HF weights), `metrics.json`
//! ([`PolicyMetrics`]), `log.jsonl` (TRL metric names) and `checkpoints/` (resumable).
//!
//! Data is TRL-format JSONL, one example per line, read by `dataset::io::load_policy_jsonl`:
//! `{"prompt", "chosen", "rejected"}` pairs for DPO, `{"prompt", "completion", "label"}` thumbs
//! for KTO; PPO uses every line's `prompt`. The
//! held-out evaluation prompts are chosen by a hash of the prompt text (stable across runs and
//! machines) and every example with such a prompt is kept out of training.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dataset::{PolicyLine, load_policy_jsonl};
use crate::evals::ModelAnswer;
use crate::kernels::precision::set_precision;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::llama::load_frozen_causal_lm;
use crate::run::outputs::{PolicyAlgo, PolicyMetrics, TrainStats, write_metrics};
use crate::train::dpo_trainer::{PreferenceExample, TrainOutcome, train_dpo};
use crate::train::group_rl_trainer::train_group_rl;
use crate::train::kto_trainer::{PointwiseExample, train_kto};
use crate::train::policy_common::Policy;
pub use crate::train::policy_common::{LoraOptions, PolicyTrainOptions, PpoOptions};
use crate::train::policy_eval::{Answers, EvalSettings, RewardScorer, answer, evaluate};
use crate::train::policy_reward::PolicyReward;
use crate::train::ppo_trainer::train_ppo;

/// A `train policy` request (the CLI and the pipeline build it from settings).
#[derive(Debug, Clone)]
pub struct TrainPolicyRequest {
    /// HF causal-LM directory (config.json, model.safetensors, tokenizer.json).
    pub base_model: PathBuf,
    /// Reward model directory from `train reward` (PPO rewards and the evaluation).
    pub reward_model: PathBuf,
    /// The production policy to compare against (full HF directory); the base model when absent.
    pub production_model: Option<PathBuf>,
    /// TRL-format JSONL (see the module docs).
    pub data: PathBuf,
    /// Render each `prompt` as a user turn with the base model's chat template.
    pub apply_chat_template: bool,
    pub out: PathBuf,
    pub options: PolicyTrainOptions,
    /// The behaviour tests' conversations (`evals/*.yaml`), already rendered as prompts: the
    /// candidate and production answer each greedily after training.
    pub behaviour_prompts: Vec<String>,
}

/// Greedy answers of the candidate and of production to the behaviour tests, in their order.
#[derive(Debug, Clone)]
pub struct BehaviourAnswers {
    pub candidate: Vec<ModelAnswer>,
    pub production: Vec<ModelAnswer>,
}

/// What `train policy` reports back.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRunSummary {
    pub out_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub lora: bool,
    pub metrics: PolicyMetrics,
    pub train_examples: usize,
    pub eval_prompts: usize,
    #[serde(skip)]
    pub behaviour_answers: Option<BehaviourAnswers>,
}

/// The `k` prompts with the smallest SHA-256 of their text: a held-out set that does not move
/// when data is appended.
pub fn held_out_prompts(prompts: &BTreeSet<String>, k: usize) -> BTreeSet<String> {
    let mut v: Vec<([u8; 32], &String)> = prompts
        .iter()
        .map(|p| (Sha256::digest(p.as_bytes()).into(), p))
        .collect();
    v.sort();
    v.into_iter().take(k).map(|(_, p)| p.clone()).collect()
}

/// Runs the stage on a blocking thread (training is CPU-bound).
pub async fn train_policy(req: TrainPolicyRequest) -> Result<PolicyRunSummary> {
    tokio::task::spawn_blocking(move || train_policy_blocking(&req))
        .await
        .context("policy training thread panicked")?
}

/// The synchronous body of [`train_policy`].
pub fn train_policy_blocking(req: &TrainPolicyRequest) -> Result<PolicyRunSummary> {
    let opts = &req.options;
    opts.validate()?;
    let device = opts.device()?;
    // Set for this stage whatever it was: a reward stage earlier in this process (`run`) may
    // have switched the products to bf16 (`reward.precision`).
    let precision = opts
        .precision
        .resolve_on("policy.precision", device.is_cpu())?;
    set_precision(precision);
    let mut lines = load_policy_jsonl(&req.data)?;
    if req.apply_chat_template {
        let tpl = ChatTemplate::from_hf_dir(&req.base_model)
            .with_context(|| format!("chat template of {}", req.base_model.display()))?;
        for l in &mut lines {
            l.prompt = tpl.render(&[ChatMessage::user(l.prompt.clone())], true)?;
        }
    }
    let prompts: BTreeSet<String> = lines.iter().map(|l| l.prompt.clone()).collect();
    if prompts.len() < 2 {
        bail!(
            "{} has {} distinct prompt(s); training and evaluation need at least 2",
            req.data.display(),
            prompts.len()
        );
    }
    // Keep at least one prompt for training.
    let k = opts.eval_prompts.min(prompts.len() - 1);
    let held = held_out_prompts(&prompts, k);
    let train: Vec<&PolicyLine> = lines.iter().filter(|l| !held.contains(&l.prompt)).collect();
    let eval_prompts: Vec<String> = held.iter().cloned().collect();

    let mut policy = Policy::load_in(
        &req.base_model,
        opts.lora.as_ref(),
        opts.seed,
        &device,
        precision,
    )?;
    policy
        .model
        .model_mut()
        .set_gradient_checkpointing(opts.gradient_checkpointing);
    let rm = RewardScorer::load_in(&req.reward_model, &device, policy.frozen_dtype())?;
    // Resolved before training so an unknown aspect fails before any step runs.
    let reward = PolicyReward::new(&opts.reward, &rm)
        .with_context(|| format!("the reward model in {}", req.reward_model.display()))?;
    std::fs::create_dir_all(&req.out).with_context(|| format!("creating {}", req.out.display()))?;
    let (outcome, n_train): (TrainOutcome, usize) = match opts.algo {
        PolicyAlgo::Dpo => {
            let pairs: Vec<PreferenceExample> = train
                .iter()
                .filter_map(|l| {
                    Some(PreferenceExample {
                        prompt: l.prompt.clone(),
                        chosen: l.chosen.clone()?,
                        rejected: l.rejected.clone()?,
                        weight: l.weight,
                    })
                })
                .collect();
            (train_dpo(&mut policy, &pairs, opts, &req.out)?, pairs.len())
        }
        PolicyAlgo::Kto => {
            let ex: Vec<PointwiseExample> = train
                .iter()
                .filter_map(|l| {
                    Some(PointwiseExample {
                        prompt: l.prompt.clone(),
                        completion: l.completion.clone()?,
                        label: l.label?,
                        weight: l.weight,
                    })
                })
                .collect();
            (train_kto(&mut policy, &ex, opts, &req.out)?, ex.len())
        }
        PolicyAlgo::Ppo => {
            let ps = distinct_prompts(&train);
            (train_ppo(&mut policy, &rm, &ps, opts, &req.out)?, ps.len())
        }
        PolicyAlgo::Grpo | PolicyAlgo::Rloo => {
            let ps = distinct_prompts(&train);
            (
                train_group_rl(&mut policy, &rm, &ps, opts, &req.out)?,
                ps.len(),
            )
        }
    };
    let policy_dir = req.out.join("policy");
    policy.save(&policy_dir)?;

    let production = match &req.production_model {
        Some(dir) => load_frozen_causal_lm(dir, &device)?,
        None => policy.reference.clone(),
    };
    policy.set_training(false);
    let eval = evaluate(
        &policy.model,
        &production,
        &policy.reference,
        &policy.tokenizer,
        &rm,
        Some(&reward),
        &eval_prompts,
        &EvalSettings {
            max_new_tokens: opts.max_completion_len,
            max_prompt_len: opts.max_prompt_len,
            greedy: opts.eval_greedy,
            seed: opts.seed,
            batch_size: opts.batch_size.max(1),
            samples: 3,
        },
    )?;
    let behaviour_answers = if req.behaviour_prompts.is_empty() {
        None
    } else {
        let greedy = EvalSettings {
            max_new_tokens: opts.max_completion_len,
            max_prompt_len: opts.max_prompt_len,
            greedy: true,
            seed: opts.seed,
            batch_size: opts.batch_size.max(1),
            samples: 0,
        };
        let of = |a: Answers| -> Vec<ModelAnswer> {
            a.texts
                .into_iter()
                .zip(a.scores)
                .map(|(text, reward)| ModelAnswer {
                    text,
                    reward: f64::from(reward),
                })
                .collect()
        };
        let prompts = &req.behaviour_prompts;
        Some(BehaviourAnswers {
            candidate: of(answer(
                &policy.model,
                &policy.tokenizer,
                &rm,
                prompts,
                &greedy,
            )?),
            production: of(answer(
                &production,
                &policy.tokenizer,
                &rm,
                prompts,
                &greedy,
            )?),
        })
    };
    let secs = outcome.seconds.max(1e-9);
    let metrics = PolicyMetrics {
        algo: opts.algo,
        eval,
        train: TrainStats {
            steps: outcome.steps,
            seconds: outcome.seconds,
            examples_per_second: outcome.examples as f64 / secs,
            tokens_per_second: outcome.tokens as f64 / secs,
            epochs: outcome.epochs,
            precision: Some(precision.to_string()),
        },
        last_step: outcome
            .log
            .last()
            .map(|l| l.values.clone())
            .unwrap_or_default(),
    };
    write_metrics(&req.out, &metrics)?;
    Ok(PolicyRunSummary {
        out_dir: req.out.clone(),
        policy_dir,
        lora: opts.lora.is_some(),
        metrics,
        train_examples: n_train,
        eval_prompts: eval_prompts.len(),
        behaviour_answers,
    })
}

/// The training lines' prompts, each once, in a stable order (what the online algorithms sample
/// answers for).
fn distinct_prompts(lines: &[&PolicyLine]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.prompt.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}
