//! PPO for RLHF as an objective on the training engine, following TRL's `PPOTrainer` and the N+
//! implementation details: sample answers, score them, turn scores and the per-token KL into
//! advantages (all in [`Objective::plan`], before the step's updates), and take several clipped
//! PPO epochs over minibatches of the rollouts (one optimiser update per minibatch).
//!
//! One step: `rollouts_per_step` prompts (a seeded, epoch-wise permutation of the prompt set)
//! are answered by the policy with KV-cache sampling at `temperature`; the score is the weighted
//! sum of the policy's reward components (`train::policy_reward`; by default the reward model's
//! score of prompt + answer at its last token); answers without EOS get `missing_eos_penalty`
//! added. The rows are laid out with prompts LEFT-padded to a common length, so answer token `j`
//! sits in the same column of every row and the answer log-probs and values are plain column
//! slices.
//! Old log-probs (temperature-scaled, as TRL scores them), reference log-probs and values are
//! computed without a graph; per-token k1 KL (`kl_coef`, fixed or adaptive), score placement,
//! GAE and advantage whitening come from `losses::ppo::rewards_and_advantages`; the clipped
//! policy and value losses from `losses::ppo::ppo_loss`.
//!
//! The value head is a linear layer over the policy's own final hidden states (a shared
//! backbone: no second model in memory), initialised from the reward model's score head when
//! the hidden sizes match, otherwise at zero. It lives in the policy's `VarMap` as
//! `value_head.*`, so it is checkpointed with the adapters but never saved into the policy. The
//! KL controller is kept across a resume through [`Objective::save_state`].

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::generate::{Generation, GenerationConfig, generate};
use crate::model::sampling::SamplingParams;
use crate::train::engine::order::epoch_order;
use crate::train::engine::{Objective, PhaseClock, StepReport, TrainOutcome, Updates};
use crate::train::losses::kl_control::KlController;
use crate::train::losses::ppo::{
    PpoBatch, PpoLossConfig, PpoStats, RewardGaeConfig, apply_missing_eos_penalty, ppo_loss,
    rewards_and_advantages,
};
use crate::train::policy_common::{
    Policy, PolicyTrainOptions, VALUE_HEAD, check_sampling_inputs, run_sampling_objective,
};
use crate::train::policy_eval::{RewardScorer, prompt_ids};
use crate::train::policy_reward::{PolicyReward, ScoredAnswers};

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
pub(crate) struct Rollouts {
    pub(crate) ids: Tensor,
    pub(crate) mask: Tensor,
    /// Common (padded) prompt length: answer token `j` is column `p + j`.
    pub(crate) p: usize,
    /// Longest answer.
    pub(crate) t: usize,
    pub(crate) answers: Vec<Vec<u32>>,
    /// Whether each answer ended with EOS (else it hit the length limit).
    pub(crate) finished: Vec<bool>,
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

/// A micro-batch's rollout rows as an index tensor on the policy's device.
pub(crate) fn row_index(micro: &[usize], policy: &Policy) -> Result<Tensor> {
    let rows: Vec<u32> = micro.iter().map(|&i| i as u32).collect();
    let dev = policy.model.lm_head_weight().device();
    Ok(Tensor::from_vec(rows, micro.len(), dev)?)
}

/// Answer-token log-probs `[B, t]` (temperature-scaled) and values `[B, t]` for `rows` of the
/// rollouts; the values are those of the positions that predict each answer token.
pub(crate) fn score_rows(
    model: &crate::model::llama::LlamaForCausalLM,
    head: Option<&(Tensor, Tensor)>,
    r: &Rollouts,
    rows: &Tensor,
    temperature: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    let s = score_rows_with(model, head, r, rows, temperature, false)?;
    Ok((s.logprobs, s.values))
}

/// What [`score_rows_with`] computes for rows of the rollouts, all `[B, t]` over answer tokens.
pub(crate) struct ScoredRows {
    pub(crate) logprobs: Tensor,
    pub(crate) values: Option<Tensor>,
    /// Entropies of the (temperature-scaled) next-token distributions, when asked for.
    pub(crate) entropies: Option<Tensor>,
}

/// [`score_rows`], plus the answer positions' entropies when `entropies` (a full-vocabulary
/// pass over those positions, so only when a loss needs them).
pub(crate) fn score_rows_with(
    model: &crate::model::llama::LlamaForCausalLM,
    head: Option<&(Tensor, Tensor)>,
    r: &Rollouts,
    rows: &Tensor,
    temperature: f32,
    entropies: bool,
) -> Result<ScoredRows> {
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
    let temperature = if temperature > 0.0 {
        f64::from(temperature)
    } else {
        1.0
    };
    let logprobs = model
        .token_logprobs_from_hidden_at(&hidden, &ids, &tgt, temperature)?
        .reshape((b, w))?
        .narrow(1, r.p, r.t)?
        .contiguous()?;
    // Position p - 1 + j predicts answer token j.
    let entropies = if entropies {
        let at = hidden.narrow(1, r.p - 1, r.t)?.contiguous()?;
        Some(model.token_entropies_from_hidden(&at, temperature)?)
    } else {
        None
    };
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
    Ok(ScoredRows {
        logprobs,
        values,
        entropies,
    })
}

/// Samples one answer per prompt in `q` with the policy in a single KV-cached batch (seeded by
/// `seed` and `step`, stopping at EOS) and lays prompts and answers out for scoring.
pub(crate) fn sample_rollouts(
    policy: &Policy,
    q: &[Vec<u32>],
    max_new_tokens: usize,
    temperature: f32,
    seed: u64,
    step: u64,
) -> Result<(Generation, Rollouts)> {
    let dev = policy.model.lm_head_weight().device().clone();
    let (eos, pad) = (policy.eos_ids(), policy.pad_id());
    policy.set_training(false);
    let gen_cfg = GenerationConfig {
        max_new_tokens,
        sampling: SamplingParams {
            temperature,
            top_k: None,
            top_p: None,
        },
        seed: seed.wrapping_mul(1_000_003).wrapping_add(step),
        stop_token_ids: eos,
        pad_token_id: pad,
        use_cache: true,
    };
    let g = generate(&policy.model, q, &gen_cfg)?;
    let mut r = layout(q, &g.tokens, pad, &dev)?;
    r.finished = g.finished.clone();
    Ok((g, r))
}

/// The reward components of each sampled answer (`[rows][components]`, see
/// [`PolicyReward::components`]) to its prompt (`prompts` as text, `q` as the policy's ids).
pub(crate) fn score_rollouts(
    reward: &PolicyReward,
    rm: &RewardScorer,
    policy: &Policy,
    prompts: &[&String],
    q: &[Vec<u32>],
    g: &Generation,
) -> Result<Vec<Vec<Option<f64>>>> {
    let texts = g.texts(policy.tokenizer.inner(), true)?;
    let prompt_texts: Vec<&str> = prompts.iter().map(|p| p.as_str()).collect();
    reward.components(
        rm,
        &ScoredAnswers {
            prompts: &prompt_texts,
            prompt_ids: q,
            answer_ids: &g.tokens,
            answer_texts: &texts,
            finished: &g.finished,
        },
    )
}

/// Trains `policy` with PPO on `prompts`, rewarded by `rm`; metrics stream to `out/log.jsonl`.
pub fn train_ppo(
    policy: &mut Policy,
    rm: &RewardScorer,
    prompts: &[String],
    opts: &PolicyTrainOptions,
    out: &Path,
) -> Result<TrainOutcome> {
    check_sampling_inputs(opts, prompts)?;
    let po = &opts.ppo;
    // The value head joins the policy's variables before the engine builds the optimiser.
    let head = value_head(policy, rm)?;
    let kl_ctl = if po.adaptive_kl {
        KlController::adaptive(
            po.adaptive_kl_init,
            po.adaptive_kl_target,
            po.adaptive_kl_horizon,
        )
    } else {
        KlController::fixed(po.kl_coef)
    };
    let reward = PolicyReward::new(&opts.reward, rm)?;
    let mut objective = Ppo {
        policy,
        rm,
        reward,
        prompts,
        opts,
        head,
        kl_ctl,
        loss_cfg: PpoLossConfig {
            cliprange: po.cliprange,
            cliprange_value: po.cliprange_value,
            vf_coef: po.vf_coef,
            ratio_threshold: None,
        },
        batch: None,
        stats: Vec::new(),
    };
    run_sampling_objective(&mut objective, policy, opts, prompts.len(), out)
}

/// A step's rollouts and everything computed from them before the updates.
struct StepBatch {
    rollouts: Rollouts,
    old_lp: Tensor,
    values: Tensor,
    scores: Tensor,
    gae: crate::train::losses::ppo::RewardGae,
    resp_mask: Tensor,
    /// `rewards/<component>/mean` with `policy.reward` configured.
    reward_metrics: Vec<(String, f64)>,
    tokens: u64,
}

/// The PPO objective: prompts to roll out, the reward model that scores them, the value head
/// and the KL controller.
struct Ppo<'a> {
    policy: &'a Policy,
    rm: &'a RewardScorer,
    reward: PolicyReward,
    prompts: &'a [String],
    opts: &'a PolicyTrainOptions,
    head: (Tensor, Tensor),
    kl_ctl: KlController,
    loss_cfg: PpoLossConfig,
    batch: Option<StepBatch>,
    stats: Vec<PpoStats>,
}

impl Ppo<'_> {
    /// Rolls out the step's prompts and computes old log-probs, values, reference log-probs,
    /// scores, rewards and advantages (no dropout, no graph).
    fn roll_out(&self, step: u64, batch: &[usize], clock: &mut PhaseClock) -> Result<StepBatch> {
        let (policy, opts, po) = (self.policy, self.opts, &self.opts.ppo);
        let dev = policy.model.lm_head_weight().device().clone();
        let eos = policy.eos_ids();
        let bsz = batch.len();
        let batch_prompts: Vec<&String> = batch.iter().map(|&i| &self.prompts[i]).collect();
        let q = batch_prompts
            .iter()
            .map(|p| {
                let eos = eos.first().copied();
                prompt_ids(&policy.tokenizer, p, opts.max_prompt_len, eos)
            })
            .collect::<Result<Vec<_>>>()?;

        // 1. Rollouts.
        let (g, r) = sample_rollouts(
            policy,
            &q,
            opts.max_completion_len,
            po.temperature,
            opts.seed,
            step,
        )?;
        clock.lap("rollout generation");
        let all = Tensor::arange(0u32, bsz as u32, &dev)?;
        let (old_lp, values) =
            score_rows(&policy.model, Some(&self.head), &r, &all, po.temperature)?;
        let (old_lp, values) = (
            old_lp.detach(),
            values.context("value head output")?.detach(),
        );
        clock.lap("policy logprobs + values");
        let (ref_lp, _) = score_rows(&policy.reference, None, &r, &all, po.temperature)?;
        let ref_lp = ref_lp.detach();
        clock.lap("reference logprobs");

        // 2. Scores at the last token, missing-EOS penalty.
        let table = score_rollouts(&self.reward, self.rm, policy, &batch_prompts, &q, &g)?;
        // PPO trains on the weighted sum; a row nothing could score gets 0 (no signal).
        let raw: Vec<f32> = table
            .iter()
            .map(|row| self.reward.weighted(row))
            .map(|r| if r.is_finite() { r as f32 } else { 0.0 })
            .collect();
        let reward_metrics = if self.reward.is_configured() {
            self.reward.mean_metrics(&table)
        } else {
            Vec::new()
        };
        let raw_t = Tensor::from_vec(raw, bsz, &dev)?;
        let scores = apply_missing_eos_penalty(&raw_t, &r.finished, -po.missing_eos_penalty)?;
        clock.lap("reward scoring");

        // 3. Rewards, GAE, whitening.
        let seq_lens: Vec<usize> = r.answers.iter().map(|a| a.len() - 1).collect();
        let gae = rewards_and_advantages(
            &old_lp,
            &ref_lp,
            &values,
            &scores,
            &seq_lens,
            &RewardGaeConfig {
                kl_coef: self.kl_ctl.value(),
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
        clock.lap("rewards + GAE");
        Ok(StepBatch {
            rollouts: r,
            old_lp,
            values,
            scores,
            gae,
            resp_mask,
            reward_metrics,
            tokens: g.num_tokens() as u64,
        })
    }
}

impl Objective for Ppo<'_> {
    const NAME: &'static str = "ppo";

    fn examples(&self) -> usize {
        self.prompts.len()
    }

    /// Rolls out, then `ppo_epochs` passes over the rollouts in `num_minibatches` seeded
    /// minibatches, one optimiser update each.
    fn plan(&mut self, step: u64, batch: &[usize], clock: &mut PhaseClock) -> Result<Updates> {
        self.batch = Some(self.roll_out(step, batch, clock)?);
        self.policy.set_training(true);
        let po = &self.opts.ppo;
        let mb = batch.len() / po.num_minibatches;
        let mut updates = Vec::new();
        for e in 0..po.ppo_epochs {
            let perm = epoch_order(
                batch.len(),
                self.opts.seed ^ step.wrapping_mul(7919),
                e as u64,
            );
            updates.extend(perm.chunks(mb).map(<[usize]>::to_vec));
        }
        Ok(updates)
    }

    fn micro_loss(&mut self, _step: u64, micro: &[usize]) -> Result<Tensor> {
        let b = self
            .batch
            .as_ref()
            .context("PPO update before its rollouts")?;
        let rows = row_index(micro, self.policy)?;
        let temperature = self.opts.ppo.temperature;
        let (lp, vpred) = score_rows(
            &self.policy.model,
            Some(&self.head),
            &b.rollouts,
            &rows,
            temperature,
        )?;
        let vpred = vpred.context("value head output")?;
        let sel = |t: &Tensor| t.contiguous()?.index_select(&rows, 0);
        let pl = ppo_loss(
            &PpoBatch {
                old_logprobs: &sel(&b.old_lp)?,
                logprobs: &lp,
                values: &sel(&b.values)?,
                vpreds: &vpred,
                mask: &sel(&b.resp_mask)?,
                advantages: &sel(&b.gae.advantages)?,
                returns: &sel(&b.gae.returns)?,
                logits: None,
                value_mask: None,
            },
            &self.loss_cfg,
        )?;
        self.stats.push(pl.stats);
        Ok(pl.loss)
    }

    /// TRL's PPO metrics; the KL controller moves after the step, as TRL's does.
    fn finish_step(&mut self, step: u64) -> Result<StepReport> {
        self.policy.set_training(false);
        let b = self.batch.take().context("PPO step without rollouts")?;
        let stats = std::mem::take(&mut self.stats);
        let r = &b.rollouts;
        let bsz = r.answers.len();
        let rows_mean = |t: &Tensor| -> Result<f64> {
            let s =
                (t.to_dtype(DType::F64)? * b.resp_mask.to_dtype(DType::F64)?)?.sum(D::Minus1)?;
            Ok(s.mean_all()?.to_scalar::<f64>()?)
        };
        let kl = rows_mean(&b.gae.kl)?;
        let entropy = -rows_mean(&b.old_lp)?;
        let non_score = rows_mean(&b.gae.non_score_reward)?;
        let score_mean = b
            .scores
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        let avg =
            |f: &dyn Fn(&PpoStats) -> f64| stats.iter().map(f).sum::<f64>() / stats.len() as f64;
        let mut report = StepReport {
            kl: Some(kl),
            tokens: b.tokens,
            ..StepReport::default()
        }
        .metric("objective/kl", kl)
        .metric("objective/entropy", entropy)
        .metric("objective/non_score_reward", non_score)
        .metric("objective/rlhf_reward", score_mean + non_score)
        .metric("objective/scores", score_mean)
        .metric("objective/kl_coef", self.kl_ctl.value())
        .metric("policy/approxkl_avg", avg(&|s| s.policy_approxkl))
        .metric("policy/clipfrac_avg", avg(&|s| s.policy_clipfrac))
        .metric("loss/policy_avg", avg(&|s| s.loss_policy))
        .metric("loss/value_avg", avg(&|s| s.loss_value))
        .metric("val/clipfrac_avg", avg(&|s| s.val_clipfrac))
        .metric("val/ratio", avg(&|s| s.ratio_mean))
        .metric(
            "val/num_eos_tokens",
            r.finished.iter().filter(|&&f| f).count() as f64,
        )
        .metric(
            "response_length",
            r.answers.iter().map(Vec::len).sum::<usize>() as f64 / bsz as f64,
        )
        .metric("episode", (step as usize * bsz) as f64);
        report.metrics.extend(b.reward_metrics);
        tracing::info!(step, kl, score = score_mean, "ppo step");
        self.kl_ctl.update(kl, bsz);
        Ok(report)
    }

    fn save_state(&self) -> Result<Option<serde_json::Value>> {
        let extra = PpoExtra {
            kl_ctl: self.kl_ctl.clone(),
        };
        Ok(Some(serde_json::to_value(extra)?))
    }

    fn restore_state(&mut self, state: serde_json::Value) -> Result<()> {
        self.kl_ctl = serde_json::from_value::<PpoExtra>(state)?.kl_ctl;
        Ok(())
    }
}
