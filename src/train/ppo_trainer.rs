//! The PPO loop for RLHF, following TRL's `PPOTrainer` and the N+ implementation details:
//! sample answers, score them, turn scores and the per-token KL into advantages, and take
//! several clipped PPO epochs over minibatches of the rollouts.
//!
//! One step: `rollouts_per_step` prompts (a seeded, epoch-wise permutation of the prompt set)
//! are answered by the policy with KV-cache sampling at `temperature`; the reward model scores
//! prompt + answer at its last token; answers without EOS get `missing_eos_penalty` added. The
//! rows are laid out with prompts LEFT-padded to a common length, so answer token `j` sits in
//! the same column of every row and the answer log-probs and values are plain column slices.
//! Old log-probs (temperature-scaled, as TRL scores them), reference log-probs and values are
//! computed without a graph; per-token k1 KL (`kl_coef`, fixed or adaptive), score placement,
//! GAE and advantage whitening come from `losses::ppo::rewards_and_advantages`; the clipped
//! policy and value losses from `losses::ppo::ppo_loss`.
//!
//! The value head is a linear layer over the policy's own final hidden states (a shared
//! backbone: no second model in memory), initialised from the reward model's score head when
//! the hidden sizes match, otherwise at zero. It lives in the policy's `VarMap` as
//! `value_head.*`, so it is checkpointed with the adapters but never saved into the policy.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::generate::{GenerationConfig, generate};
use crate::model::sampling::SamplingParams;
use crate::run::outputs::LogLine;
use crate::train::dpo_trainer::{TrainOutcome, checkpoint_root};
use crate::train::losses::kl_control::KlController;
use crate::train::losses::ppo::{
    PpoBatch, PpoLossConfig, RewardGaeConfig, apply_missing_eos_penalty, ppo_loss,
    rewards_and_advantages,
};
use crate::train::optim::AdamW;
use crate::train::policy_common::{
    Policy, PolicyTrainOptions, RunLog, VALUE_HEAD, check_kl, epoch_order, optimiser_step,
};
use crate::train::policy_eval::{RewardScorer, prompt_ids};

/// Checkpointed PPO state beyond weights and optimiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PpoExtra {
    kl_ctl: KlController,
}

/// Adds the value head to the policy's variables (once) and returns `(weight, bias)`.
fn value_head(policy: &Policy, rm: &RewardScorer) -> Result<(Tensor, Tensor)> {
    let h = policy.config.hidden_size;
    let dev = policy.model.lm_head_weight().device().clone();
    let wname = format!("{VALUE_HEAD}.weight");
    let bname = format!("{VALUE_HEAD}.bias");
    let mut data = policy
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    if !data.contains_key(&wname) {
        let w = match rm.score_weight() {
            Some(s) if s.dims() == [1, h] => s.to_device(&dev)?.to_dtype(DType::F32)?,
            _ => Tensor::zeros((1, h), DType::F32, &dev)?,
        };
        data.insert(wname.clone(), Var::from_tensor(&w)?);
        data.insert(
            bname.clone(),
            Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?,
        );
    }
    let w = data[&wname].as_tensor().clone();
    let b = data[&bname].as_tensor().clone();
    Ok((w, b))
}

/// Rollouts of one step in the left-padded layout.
struct Rollouts {
    ids: Tensor,
    mask: Tensor,
    /// Common (padded) prompt length: answer token `j` is column `p + j`.
    p: usize,
    /// Longest answer.
    t: usize,
    answers: Vec<Vec<u32>>,
    finished: Vec<bool>,
}

fn layout(prompts: &[Vec<u32>], answers: &[Vec<u32>], pad: u32, dev: &Device) -> Result<Rollouts> {
    let p = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let t = answers.iter().map(Vec::len).max().unwrap_or(0);
    if t == 0 {
        bail!("every rollout answer is empty");
    }
    let b = prompts.len();
    let w = p + t;
    let mut ids = vec![pad; b * w];
    let mut mask = vec![0u32; b * w];
    for (i, (q, a)) in prompts.iter().zip(answers).enumerate() {
        let off = p - q.len();
        for (j, &x) in q.iter().enumerate() {
            ids[i * w + off + j] = x;
            mask[i * w + off + j] = 1;
        }
        for (j, &x) in a.iter().enumerate() {
            ids[i * w + p + j] = x;
            mask[i * w + p + j] = 1;
        }
    }
    Ok(Rollouts {
        ids: Tensor::from_vec(ids, (b, w), dev)?,
        mask: Tensor::from_vec(mask, (b, w), dev)?,
        p,
        t,
        answers: answers.to_vec(),
        finished: vec![],
    })
}

/// Answer-token log-probs `[B, t]` (temperature-scaled) and values `[B, t]` for `rows` of the
/// rollouts; the values are those of the positions that predict each answer token.
fn score_rows(
    model: &crate::model::llama::LlamaForCausalLM,
    head: Option<&(Tensor, Tensor)>,
    r: &Rollouts,
    rows: &Tensor,
    temperature: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    let ids = r.ids.index_select(rows, 0)?;
    let mask = r.mask.index_select(rows, 0)?;
    let (b, w) = ids.dims2()?;
    let hidden = model.model().forward(&ids, Some(&mask))?;
    // Only answer tokens are targets (the mask's answer part).
    let tgt = Tensor::cat(
        &[
            Tensor::zeros((b, r.p), DType::U32, ids.device())?,
            mask.narrow(1, r.p, r.t)?,
        ],
        1,
    )?;
    let scaled = if temperature > 0.0 && (temperature - 1.0).abs() > f32::EPSILON {
        (&hidden / f64::from(temperature))?
    } else {
        hidden.clone()
    };
    let lp = model
        .token_logprobs_from_hidden(&scaled, &ids, &tgt)?
        .reshape((b, w))?
        .narrow(1, r.p, r.t)?
        .contiguous()?;
    let values = match head {
        Some((wt, bias)) => {
            let d = hidden.dim(2)?;
            let v = hidden
                .narrow(1, r.p - 1, r.t)?
                .reshape((b * r.t, d))?
                .matmul(&wt.t()?)?
                .broadcast_add(bias)?
                .reshape((b, r.t))?;
            Some(v)
        }
        None => None,
    };
    Ok((lp, values))
}

/// Trains `policy` with PPO on `prompts`, rewarded by `rm`; metrics stream to `out/log.jsonl`.
pub fn train_ppo(
    policy: &mut Policy,
    rm: &RewardScorer,
    prompts: &[String],
    opts: &PolicyTrainOptions,
    out: &Path,
) -> Result<TrainOutcome> {
    opts.validate()?;
    if prompts.is_empty() {
        bail!("no prompts to roll out\nhint: the feedback store has no prompts yet");
    }
    let po = &opts.ppo;
    let total = opts.max_steps.context("ppo needs max_steps")?;
    let started = Instant::now();
    let dev = policy.model.lm_head_weight().device().clone();
    let eos = policy.eos_ids();
    let pad = policy.pad_id();
    let head = value_head(policy, rm)?;
    let root = checkpoint_root(out);
    let mut opt = AdamW::from_varmap(&policy.varmap, opts.adamw())?;
    let mut log = RunLog::start_or_resume(out, &root, opts.seed, &mut policy.varmap, &mut opt)?;
    let mut kl_ctl = match log.state.extra.get("ppo") {
        Some(v) => {
            serde_json::from_value::<PpoExtra>(v.clone())
                .context("PPO state in the checkpoint")?
                .kl_ctl
        }
        None if po.adaptive_kl => KlController::adaptive(
            po.adaptive_kl_init,
            po.adaptive_kl_target,
            po.adaptive_kl_horizon,
        ),
        None => KlController::fixed(po.kl_coef),
    };
    let loss_cfg = PpoLossConfig {
        cliprange: po.cliprange,
        cliprange_value: po.cliprange_value,
        vf_coef: po.vf_coef,
        ratio_threshold: None,
    };
    let n = prompts.len();
    let bsz = po.rollouts_per_step;
    let mb = bsz / po.num_minibatches;
    let mut outcome = TrainOutcome::default();
    // Phase timer: each call books the time since the previous one under `name`.
    let mut mark = Instant::now();
    let mut lap = |outcome: &mut TrainOutcome, name: &str| {
        outcome.add_phase(name, mark.elapsed().as_secs_f64());
        mark = Instant::now();
    };
    while log.state.step < total {
        let step = log.state.step + 1;
        // Prompts of this step: positions (step-1)·B .. step·B of the epoch-wise permutations.
        let batch_prompts: Vec<&String> = (0..bsz)
            .map(|k| {
                let g = (step - 1) as usize * bsz + k;
                let order = epoch_order(n, opts.seed, (g / n) as u64);
                &prompts[order[g % n]]
            })
            .collect();
        let q = batch_prompts
            .iter()
            .map(|p| {
                prompt_ids(
                    &policy.tokenizer,
                    p,
                    opts.max_prompt_len,
                    eos.first().copied(),
                )
            })
            .collect::<Result<Vec<_>>>()?;

        // 1. Rollouts (no dropout, no graph).
        policy.set_training(false);
        let gen_cfg = GenerationConfig {
            max_new_tokens: opts.max_completion_len,
            sampling: SamplingParams {
                temperature: po.temperature,
                top_k: None,
                top_p: None,
            },
            seed: opts.seed.wrapping_mul(1_000_003).wrapping_add(step),
            stop_token_ids: eos.clone(),
            pad_token_id: pad,
            use_cache: true,
        };
        let g = generate(&policy.model, &q, &gen_cfg)?;
        let mut r = layout(&q, &g.tokens, pad, &dev)?;
        r.finished = g.finished.clone();
        lap(&mut outcome, "rollout generation");
        let all = Tensor::arange(0u32, bsz as u32, &dev)?;
        let (old_lp, values) = score_rows(&policy.model, Some(&head), &r, &all, po.temperature)?;
        let (old_lp, values) = (
            old_lp.detach(),
            values.context("value head output")?.detach(),
        );
        lap(&mut outcome, "policy logprobs + values");
        let (ref_lp, _) = score_rows(&policy.reference, None, &r, &all, po.temperature)?;
        let ref_lp = ref_lp.detach();
        lap(&mut outcome, "reference logprobs");

        // 2. Scores at the last token, missing-EOS penalty.
        let texts = g.texts(policy.tokenizer.inner(), true)?;
        let full_texts: Vec<String> = batch_prompts
            .iter()
            .zip(&texts)
            .map(|(p, a)| format!("{p}{a}"))
            .collect();
        let full_ids: Vec<Vec<u32>> = q
            .iter()
            .zip(&g.tokens)
            .map(|(p, a)| p.iter().chain(a).copied().collect())
            .collect();
        let raw = rm.score(&full_ids, &full_texts)?;
        let raw_t = Tensor::from_vec(raw.clone(), bsz, &dev)?;
        let scores = apply_missing_eos_penalty(&raw_t, &r.finished, -po.missing_eos_penalty)?;
        lap(&mut outcome, "reward scoring");

        // 3. Rewards, GAE, whitening.
        let seq_lens: Vec<usize> = r.answers.iter().map(|a| a.len() - 1).collect();
        let gae = rewards_and_advantages(
            &old_lp,
            &ref_lp,
            &values,
            &scores,
            &seq_lens,
            &RewardGaeConfig {
                kl_coef: kl_ctl.value(),
                gamma: po.gamma,
                lam: po.lam,
                whiten_rewards: po.whiten_rewards,
                ..RewardGaeConfig::default()
            },
        )?;
        let resp_mask = gae
            .padding_mask
            .ones_like()?
            .sub(&gae.padding_mask)?
            .to_dtype(DType::F32)?;
        lap(&mut outcome, "rewards + GAE");

        // 4. PPO epochs over minibatches.
        policy.set_training(true);
        let mut stats = Vec::new();
        for e in 0..po.ppo_epochs {
            let perm = epoch_order(bsz, opts.seed ^ step.wrapping_mul(7919), e as u64);
            for chunk in perm.chunks(mb) {
                let rows: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
                let rows = Tensor::from_vec(rows, chunk.len(), &dev)?;
                let (lp, vpred) =
                    score_rows(&policy.model, Some(&head), &r, &rows, po.temperature)?;
                let vpred = vpred.context("value head output")?;
                let sel = |t: &Tensor| t.contiguous()?.index_select(&rows, 0);
                let pl = ppo_loss(
                    &PpoBatch {
                        old_logprobs: &sel(&old_lp)?,
                        logprobs: &lp,
                        values: &sel(&values)?,
                        vpreds: &vpred,
                        mask: &sel(&resp_mask)?,
                        advantages: &sel(&gae.advantages)?,
                        returns: &sel(&gae.returns)?,
                        logits: None,
                        value_mask: None,
                    },
                    &loss_cfg,
                )?;
                lap(&mut outcome, "ppo forward");
                optimiser_step(&mut opt, &pl.loss, step, opts.max_grad_norm)?;
                lap(&mut outcome, "ppo backward + AdamW");
                stats.push(pl.stats);
            }
        }
        policy.set_training(false);

        // 5. Metrics (TRL names).
        let rows_mean = |t: &Tensor| -> Result<f64> {
            let s = (t.to_dtype(DType::F64)? * resp_mask.to_dtype(DType::F64)?)?.sum(D::Minus1)?;
            Ok(s.mean_all()?.to_scalar::<f64>()?)
        };
        let kl = rows_mean(&gae.kl)?;
        let entropy = -rows_mean(&old_lp)?;
        let non_score = rows_mean(&gae.non_score_reward)?;
        let score_mean = scores
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        let avg = |f: &dyn Fn(&crate::train::losses::ppo::PpoStats) -> f64| {
            stats.iter().map(f).sum::<f64>() / stats.len() as f64
        };
        let line = LogLine::new(step)
            .with("objective/kl", kl)
            .with("objective/entropy", entropy)
            .with("objective/non_score_reward", non_score)
            .with("objective/rlhf_reward", score_mean + non_score)
            .with("objective/scores", score_mean)
            .with("objective/kl_coef", kl_ctl.value())
            .with("policy/approxkl_avg", avg(&|s| s.policy_approxkl))
            .with("policy/clipfrac_avg", avg(&|s| s.policy_clipfrac))
            .with("loss/policy_avg", avg(&|s| s.loss_policy))
            .with("loss/value_avg", avg(&|s| s.loss_value))
            .with("val/clipfrac_avg", avg(&|s| s.val_clipfrac))
            .with("val/ratio", avg(&|s| s.ratio_mean))
            .with(
                "val/num_eos_tokens",
                r.finished.iter().filter(|&&f| f).count() as f64,
            )
            .with(
                "response_length",
                r.answers.iter().map(Vec::len).sum::<usize>() as f64 / bsz as f64,
            )
            .with("learning_rate", opts.lr)
            .with("episode", (step as usize * bsz) as f64);
        log.state.step = step;
        log.state.data_position = (step as usize * bsz % n) as u64;
        log.state.epoch = (step as usize * bsz / n) as u64;
        log.push(line)?;
        outcome.examples += bsz as u64;
        outcome.tokens += g.num_tokens() as u64;
        tracing::info!(step, kl, score = score_mean, "ppo step");
        check_kl(step, kl, opts.kl_ceiling)?;
        kl_ctl.update(kl, bsz);
        if step % opts.checkpoint_every.max(1) == 0 || step == total {
            let mut extra = serde_json::Map::new();
            extra.insert(
                "ppo".into(),
                serde_json::to_value(PpoExtra {
                    kl_ctl: kl_ctl.clone(),
                })?,
            );
            log.checkpoint(&root, &policy.varmap, &opt, extra)?;
        }
        lap(&mut outcome, "metrics + checkpoint");
    }
    outcome.steps = log.state.step;
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.epochs = (log.state.step as usize * bsz) as f64 / n as f64;
    outcome.log = log.lines.clone();
    Ok(outcome)
}
