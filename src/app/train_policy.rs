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
use crate::kernels::precision::Precision;
use crate::kernels::precision::set_precision;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::llama::{LlamaForCausalLM, load_frozen_causal_lm, load_frozen_causal_lm_in};
use crate::model::tokenizer::Tokenizer;
use crate::run::outputs::{PolicyAlgo, PolicyEval, PolicyMetrics, TrainStats, write_metrics};
use crate::train::dpo_trainer::{PreferenceExample, TrainOutcome, train_dpo};
use crate::train::group_rl_trainer::train_group_rl;
use crate::train::kto_trainer::{PointwiseExample, train_kto};
pub use crate::train::policy_common::{LoraOptions, PolicyTrainOptions, PpoOptions};
use crate::train::policy_common::{Policy, frozen_dtype, policy_tokenizer};
use crate::train::policy_eval::{Answers, EvalSettings, RewardScorer, answer, evaluate};
use crate::train::policy_reward::PolicyReward;
use crate::train::ppo_trainer::train_ppo;
use candle_core::Device;

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

/// The device the stage runs on and the precision it holds frozen weights in, switched on for
/// this stage whatever it was: a reward stage earlier in this process (`run`) may have switched
/// the products to bf16 (`reward.precision`).
fn stage_device(opts: &PolicyTrainOptions) -> Result<(Device, Precision)> {
    opts.validate()?;
    let device = opts.device()?;
    let precision = opts
        .precision
        .resolve_on("policy.precision", device.is_cpu())?;
    set_precision(precision);
    Ok((device, precision))
}

/// The prompts held out of training for the evaluation: the `eval_prompts` smallest by hash,
/// leaving at least one to train on. The same lines give the same prompts wherever the policy
/// trains (here, or on a cluster from the export the stage uploaded).
pub fn eval_prompt_split(
    lines: &[PolicyLine],
    eval_prompts: usize,
    data: &std::path::Path,
) -> Result<BTreeSet<String>> {
    let prompts: BTreeSet<String> = lines.iter().map(|l| l.prompt.clone()).collect();
    if prompts.len() < 2 {
        bail!(
            "{} has {} distinct prompt(s); training and evaluation need at least 2",
            data.display(),
            prompts.len()
        );
    }
    Ok(held_out_prompts(
        &prompts,
        eval_prompts.min(prompts.len() - 1),
    ))
}

/// The synchronous body of [`train_policy`].
pub fn train_policy_blocking(req: &TrainPolicyRequest) -> Result<PolicyRunSummary> {
    let opts = &req.options;
    let (device, precision) = stage_device(opts)?;
    let mut lines = load_policy_jsonl(&req.data)?;
    if req.apply_chat_template {
        let tpl = ChatTemplate::from_hf_dir(&req.base_model)
            .with_context(|| format!("chat template of {}", req.base_model.display()))?;
        for l in &mut lines {
            l.prompt = tpl.render(&[ChatMessage::user(l.prompt.clone())], true)?;
        }
    }
    let held = eval_prompt_split(&lines, opts.eval_prompts, &req.data)?;
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

    policy.set_training(false);
    let judges = Judges {
        reference: &policy.reference,
        tokenizer: &policy.tokenizer,
        rm: &rm,
        reward: &reward,
    };
    let (eval, behaviour_answers) =
        evaluate_candidate(&policy.model, &judges, req, &eval_prompts, &device)?;
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

/// What a candidate policy is scored with, wherever it trained.
struct Judges<'a> {
    /// The base policy (the KL reference).
    reference: &'a LlamaForCausalLM,
    tokenizer: &'a Tokenizer,
    rm: &'a RewardScorer,
    reward: &'a PolicyReward,
}

/// The evaluation every trained policy gets: candidate against production (the base model when
/// the request names none) on the held-out prompts, and both models' greedy answers to the
/// behaviour tests.
fn evaluate_candidate(
    candidate: &LlamaForCausalLM,
    judges: &Judges,
    req: &TrainPolicyRequest,
    eval_prompts: &[String],
    device: &Device,
) -> Result<(PolicyEval, Option<BehaviourAnswers>)> {
    let opts = &req.options;
    let production = match &req.production_model {
        Some(dir) => load_frozen_causal_lm(dir, device)?,
        None => judges.reference.clone(),
    };
    let eval = evaluate(
        candidate,
        &production,
        judges.reference,
        judges.tokenizer,
        judges.rm,
        Some(judges.reward),
        eval_prompts,
        &EvalSettings {
            max_new_tokens: opts.max_completion_len,
            max_prompt_len: opts.max_prompt_len,
            greedy: opts.eval_greedy,
            seed: opts.seed,
            batch_size: opts.batch_size.max(1),
            samples: 3,
        },
    )?;
    if req.behaviour_prompts.is_empty() {
        return Ok((eval, None));
    }
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
    let answers = BehaviourAnswers {
        candidate: of(answer(
            candidate,
            judges.tokenizer,
            judges.rm,
            prompts,
            &greedy,
        )?),
        production: of(answer(
            &production,
            judges.tokenizer,
            judges.rm,
            prompts,
            &greedy,
        )?),
    };
    Ok((eval, Some(answers)))
}

/// A policy trained elsewhere (a Ray job), evaluated here exactly as a local run evaluates the
/// policy it trained: the same held-out prompts of `req.data`, the same reward, production and
/// behaviour tests. `candidate_dir` is an HF directory with full weights; `job` is what the job
/// reported of its own training (our binary writes it; other trainers do not).
pub fn evaluate_trained_policy(
    req: &TrainPolicyRequest,
    candidate_dir: &std::path::Path,
    lora: bool,
    job: Option<PolicyMetrics>,
) -> Result<PolicyRunSummary> {
    let opts = &req.options;
    let (device, precision) = stage_device(opts)?;
    let lines = load_policy_jsonl(&req.data)?;
    let held = eval_prompt_split(&lines, opts.eval_prompts, &req.data)?;
    let eval_prompts: Vec<String> = held.iter().cloned().collect();
    let frozen = frozen_dtype(precision);
    let reference = load_frozen_causal_lm_in(&req.base_model, &device, frozen)?;
    let candidate = load_frozen_causal_lm(candidate_dir, &device).with_context(|| {
        format!(
            "loading the policy the cluster trained ({})",
            candidate_dir.display()
        )
    })?;
    let tokenizer = policy_tokenizer(&req.base_model, reference.config())?;
    let rm = RewardScorer::load_in(&req.reward_model, &device, frozen)?;
    let reward = PolicyReward::new(&opts.reward, &rm)
        .with_context(|| format!("the reward model in {}", req.reward_model.display()))?;
    let judges = Judges {
        reference: &reference,
        tokenizer: &tokenizer,
        rm: &rm,
        reward: &reward,
    };
    let (eval, behaviour_answers) =
        evaluate_candidate(&candidate, &judges, req, &eval_prompts, &device)?;
    let (train, last_step) = job.map_or_else(Default::default, |m| (m.train, m.last_step));
    let metrics = PolicyMetrics {
        algo: opts.algo,
        eval,
        train,
        last_step,
    };
    write_metrics(&req.out, &metrics)?;
    Ok(PolicyRunSummary {
        out_dir: req.out.clone(),
        policy_dir: req.out.join("policy"),
        lora,
        metrics,
        train_examples: lines.iter().filter(|l| !held.contains(&l.prompt)).count(),
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
