//! GRPO and RLOO (TRL 1.16 `GRPOTrainer` / `RLOOTrainer`) as objectives on the training engine:
//! no value head, the group of completions to one prompt is the baseline.
//!
//! One step: `prompts_per_step` prompts (the engine's `DataOrder::Stream`) each repeated
//! `num_generations` (G) times and answered by the policy in ONE KV-cached sampling batch at
//! `temperature` (PPO's `sample_rollouts`); every answer gets the components of the policy's
//! reward (`train::policy_reward`: the reward model's score and aspect heads, rule rewards),
//! each one reward function with its weight; advantages come from `losses::grpo::grpo_advantages` or
//! `losses::rloo::rloo_advantages` (rows `g·G .. (g+1)·G` are prompt `g`'s group). With
//! `policy.reward.step_weight` > 0, the advantages (GRPO's or RLOO's, one path) become per token:
//! the reward model's step head scores each step of each answer and `train::step_rewards` adds the
//! weighted score on that step's tokens. Reference log-probs are computed once, without a graph, only when β ≠ 0; the
//! sampling policy's log-probs only when an update can be off-policy (`num_iterations` > 1) or
//! RLOO's reward needs them for its KL. Then `num_iterations` optimiser updates over all the
//! step's completions, scored `batch_size` rows at a time, with `losses::grpo::grpo_loss` /
//! `losses::rloo::rloo_loss` (per-token entropies, a full-vocabulary pass, only when GRPO's
//! entropy bonus or top-entropy mask asks for them).
//!
//! The KL ceiling guards the mean per-completion KL to the reference (GRPO: summed k3 of the
//! first update's log-probs; RLOO: summed k1 of the sampling policy, the KL in its reward).
//! With β = 0 there is no reference pass and so nothing for the ceiling to guard.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};

use crate::model::generate::Generation;
use crate::run::outputs::PolicyAlgo;
use crate::train::engine::{Objective, PhaseClock, StepReport, TrainOutcome, Updates};
use crate::train::losses::grpo::{
    AdvantageConfig, GrpoBatch, GrpoLossConfig, grpo_advantages, grpo_loss,
};
use crate::train::losses::ppo::KlEstimator;
use crate::train::losses::rloo::{
    RlooAdvantageConfig, RlooBatch, rloo_advantages, rloo_loss, sequence_kl,
};
use crate::train::losses::stats::masked_sum_last;
use crate::train::policy_common::{
    GroupRlOptions, Policy, PolicyTrainOptions, check_sampling_inputs, run_sampling_objective,
};
use crate::train::policy_eval::{RewardScorer, prompt_ids};
use crate::train::policy_reward::{PolicyReward, ScoredAnswers, answer_steps};
use crate::train::ppo_trainer::{
    Rollouts, row_index, sample_rollouts, score_rollouts, score_rows, score_rows_with,
};
use crate::train::step_rewards::{AnswerSteps, step_advantages, step_metrics};

/// Trains `policy` with GRPO or RLOO (`opts.algo`) on `prompts`, rewarded by `rm`; metrics
/// stream to `out/log.jsonl`.
pub fn train_group_rl(
    policy: &mut Policy,
    rm: &RewardScorer,
    prompts: &[String],
    opts: &PolicyTrainOptions,
    out: &Path,
) -> Result<TrainOutcome> {
    check_sampling_inputs(opts, prompts)?;
    let policy: &Policy = policy;
    let n = prompts.len();
    let reward = PolicyReward::new(&opts.reward, rm)?;
    if opts.reward.step_weight != 0.0 {
        rm.require_step_head()?;
    }
    match opts.algo {
        PolicyAlgo::Grpo => {
            let mut grpo = GroupRl::<false>::new(policy, rm, reward, prompts, opts);
            run_sampling_objective(&mut grpo, policy, opts, n, out)
        }
        PolicyAlgo::Rloo => {
            let mut rloo = GroupRl::<true>::new(policy, rm, reward, prompts, opts);
            run_sampling_objective(&mut rloo, policy, opts, n, out)
        }
        other => bail!("train_group_rl runs grpo or rloo, not {}", other.as_str()),
    }
}

/// A step's completions and everything computed from them before the updates (all detached).
struct GroupBatch {
    rollouts: Rollouts,
    /// `[B, t]` f32: 1 on answer tokens (EOS included), 0 on padding.
    mask: Tensor,
    /// Sampling policy's per-token log-probs, when an update may be off-policy or RLOO needs them.
    old_lp: Option<Tensor>,
    ref_lp: Option<Tensor>,
    /// `[B]` f32, or `[B, t]` per token with step rewards.
    advantages: Tensor,
    /// Answer tokens of the whole generation batch (`dapo`'s denominator).
    answer_tokens: f64,
    /// Reward metrics from the advantage step.
    metrics: Vec<(String, f64)>,
    /// RLOO: the mean per-completion KL in its reward (what the ceiling guards).
    reward_kl: Option<f64>,
    tokens: u64,
}

/// What a step's micro-batches add up.
#[derive(Debug, Default)]
struct StepSums {
    /// Loss metrics of each micro-batch.
    micro_metrics: Vec<Vec<(String, f64)>>,
    /// GRPO: summed per-completion k3 KL and the completions it covers (first update only).
    seq_kl_sum: f64,
    seq_kl_rows: usize,
}

/// The GRPO (`RLOO = false`) or RLOO objective.
struct GroupRl<'a, const RLOO: bool> {
    policy: &'a Policy,
    rm: &'a RewardScorer,
    /// The reward's components: each one reward function of the advantages.
    reward: PolicyReward,
    prompts: &'a [String],
    opts: &'a PolicyTrainOptions,
    go: &'a GroupRlOptions,
    beta: f64,
    batch: Option<GroupBatch>,
    sums: StepSums,
}

/// 1 where answer `i` has a token at column `j`, 0 after it.
fn answer_mask(r: &Rollouts, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; r.answers.len() * r.t];
    for (i, a) in r.answers.iter().enumerate() {
        m[i * r.t..i * r.t + a.len()].fill(1.0);
    }
    Ok(Tensor::from_vec(m, (r.answers.len(), r.t), dev)?)
}

impl<'a, const RLOO: bool> GroupRl<'a, RLOO> {
    fn new(
        policy: &'a Policy,
        rm: &'a RewardScorer,
        reward: PolicyReward,
        prompts: &'a [String],
        opts: &'a PolicyTrainOptions,
    ) -> Self {
        Self {
            policy,
            rm,
            reward,
            prompts,
            opts,
            go: &opts.grpo,
            beta: opts.grpo.beta_for(opts.algo),
            batch: None,
            sums: StepSums::default(),
        }
    }

    /// Samples G completions per prompt, scores them and computes the advantages.
    fn generate_and_score(
        &self,
        step: u64,
        batch: &[usize],
        clock: &mut PhaseClock,
    ) -> Result<GroupBatch> {
        let (policy, opts, go) = (self.policy, self.opts, self.go);
        let dev = policy.model.lm_head_weight().device().clone();
        let eos = policy.eos_ids().first().copied();
        let g = go.num_generations;
        let prompts: Vec<&String> = batch
            .iter()
            .flat_map(|&i| std::iter::repeat_n(&self.prompts[i], g))
            .collect();
        let q = batch
            .iter()
            .map(|&i| {
                prompt_ids(
                    &policy.tokenizer,
                    &self.prompts[i],
                    opts.max_prompt_len,
                    eos,
                )
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flat_map(|ids| std::iter::repeat_n(ids, g))
            .collect::<Vec<_>>();
        let (sampled, r) = sample_rollouts(
            policy,
            &q,
            opts.max_completion_len,
            go.temperature,
            opts.seed,
            step,
        )?;
        clock.lap("rollout generation");
        let mask = answer_mask(&r, &dev)?;
        let rows = Tensor::arange(0u32, r.answers.len() as u32, &dev)?;
        let needs_old = go.num_iterations > 1 || (RLOO && self.beta != 0.0);
        let old_lp = if needs_old {
            let (lp, _) = score_rows(&policy.model, None, &r, &rows, go.temperature)?;
            clock.lap("policy logprobs");
            Some(lp.detach())
        } else {
            None
        };
        let ref_lp = if self.beta != 0.0 {
            let (lp, _) = score_rows(&policy.reference, None, &r, &rows, go.temperature)?;
            clock.lap("reference logprobs");
            Some(lp.detach())
        } else {
            None
        };
        let table = score_rollouts(&self.reward, self.rm, policy, &prompts, &q, &sampled)?;
        clock.lap("reward scoring");
        let names = self.reward.names();
        let reward_weights = self.reward.weights();
        let (advantages, metrics, reward_kl) = if RLOO {
            let kl = match (&old_lp, &ref_lp) {
                (Some(old), Some(reference)) => Some(sequence_kl(old, reference, &mask)?),
                _ => None,
            };
            let a = rloo_advantages(
                &table,
                &names,
                kl.as_ref(),
                &RlooAdvantageConfig {
                    num_generations: g,
                    reward_weights: reward_weights.clone(),
                    beta: self.beta,
                    normalize_advantages: go.normalize_advantages,
                    reward_clip_range: go.reward_clip_range,
                },
            )?;
            let rail = kl.map(|(per_seq, _)| per_seq.iter().sum::<f64>() / per_seq.len() as f64);
            (a.advantages, a.metrics, rail)
        } else {
            let a = grpo_advantages(
                &table,
                &names,
                &AdvantageConfig {
                    num_generations: g,
                    reward_weights,
                    scale_rewards: go.scale_rewards,
                    aggregation: go.multi_objective_aggregation,
                },
            )?;
            (a.advantages, a.metrics, None)
        };
        let step_weight = opts.reward.step_weight;
        let (advantages, metrics) = if step_weight != 0.0 {
            let steps = self.score_steps(&prompts, &q, &sampled)?;
            clock.lap("step scoring");
            let mut metrics = metrics;
            metrics.extend(step_metrics(&steps));
            let rows = step_advantages(&advantages, &steps, r.t, step_weight);
            let flat: Vec<f32> = rows.iter().flatten().map(|&a| a as f32).collect();
            (Tensor::from_vec(flat, (rows.len(), r.t), &dev)?, metrics)
        } else {
            // Off: one advantage per completion, exactly as before step rewards existed.
            let flat: Vec<f32> = advantages.iter().map(|&a| a as f32).collect();
            let n = flat.len();
            (Tensor::from_vec(flat, n, &dev)?, metrics)
        };
        let answer_tokens = r.answers.iter().map(Vec::len).sum::<usize>() as f64;
        clock.lap("advantages");
        Ok(GroupBatch {
            tokens: sampled.num_tokens() as u64,
            rollouts: r,
            mask,
            old_lp,
            ref_lp,
            advantages,
            answer_tokens,
            metrics,
            reward_kl,
        })
    }
}

impl<const RLOO: bool> GroupRl<'_, RLOO> {
    /// The step head's score of each step of each sampled answer, at the policy token that ends
    /// the step (`train::step_rewards`).
    fn score_steps(
        &self,
        prompts: &[&String],
        q: &[Vec<u32>],
        sampled: &Generation,
    ) -> Result<Vec<AnswerSteps>> {
        let tok = &self.policy.tokenizer;
        let texts = sampled.texts(tok.inner(), true)?;
        let prompts: Vec<&str> = prompts.iter().map(|p| p.as_str()).collect();
        let scored = answer_steps(
            self.rm,
            tok,
            &ScoredAnswers {
                prompts: &prompts,
                prompt_ids: q,
                answer_ids: &sampled.tokens,
                answer_texts: &texts,
                finished: &sampled.finished,
            },
        )?;
        Ok(scored
            .iter()
            .map(|s| AnswerSteps::from_probabilities(&s.last_tokens, &s.probabilities))
            .collect())
    }
}

impl<const RLOO: bool> Objective for GroupRl<'_, RLOO> {
    const NAME: &'static str = if RLOO { "rloo" } else { "grpo" };
    const PROGRESS_METRIC: Option<&'static str> = Some("reward");

    fn examples(&self) -> usize {
        self.prompts.len()
    }

    /// Generates and scores, then `num_iterations` updates over all the step's completions.
    fn plan(&mut self, step: u64, batch: &[usize], clock: &mut PhaseClock) -> Result<Updates> {
        let b = self.generate_and_score(step, batch, clock)?;
        let rows: Vec<usize> = (0..b.rollouts.answers.len()).collect();
        self.batch = Some(b);
        self.policy.set_training(true);
        Ok(vec![rows; self.go.num_iterations])
    }

    fn micro_loss(&mut self, _step: u64, micro: &[usize]) -> Result<Tensor> {
        let b = self
            .batch
            .as_ref()
            .context("update before its completions were generated")?;
        let rows = row_index(micro, self.policy)?;
        let loss_cfg = self
            .go
            .grpo_loss_config(self.beta, self.opts.max_completion_len);
        let scored = score_rows_with(
            &self.policy.model,
            None,
            &b.rollouts,
            &rows,
            self.go.temperature,
            !RLOO && loss_cfg.needs_entropies(),
        )?;
        let lp = scored.logprobs;
        let sel = |t: &Tensor| t.contiguous()?.index_select(&rows, 0);
        let mask = sel(&b.mask)?;
        let adv = sel(&b.advantages)?;
        let old = b.old_lp.as_ref().map(sel).transpose()?;
        let out = if RLOO {
            let old_tokens = old.unwrap_or_else(|| lp.detach());
            let o = rloo_loss(
                &RlooBatch {
                    logprobs: &lp,
                    old_sequence_logps: &masked_sum_last(&old_tokens, &mask)?,
                    advantages: &adv,
                    mask: &mask,
                    entropies: None,
                },
                loss_cfg.epsilon_low,
                loss_cfg.epsilon_high,
            )?;
            (o.loss, o.metrics)
        } else {
            let reference = b.ref_lp.as_ref().map(sel).transpose()?;
            if let Some(reference) = &reference
                && self.sums.seq_kl_rows < b.rollouts.answers.len()
            {
                let k3 = KlEstimator::K3.estimate(&lp.detach(), reference)?;
                let per_seq = masked_sum_last(&k3, &mask)?.to_dtype(DType::F64)?;
                self.sums.seq_kl_sum += per_seq.sum_all()?.to_scalar::<f64>()?;
                self.sums.seq_kl_rows += micro.len();
            }
            let total_rows = b.rollouts.answers.len() as f64;
            // The engine weights this micro-batch's loss by its share of the rows; dapo, cispo
            // and vespo divide by the tokens of the whole generation batch, so scale to undo it.
            let num_items_in_batch = b.answer_tokens * micro.len() as f64 / total_rows;
            let o = grpo_loss(
                &GrpoBatch {
                    logprobs: &lp,
                    old_logprobs: old.as_ref(),
                    ref_logprobs: reference.as_ref(),
                    advantages: &adv,
                    mask: &mask,
                    entropies: scored.entropies.as_ref(),
                },
                &GrpoLossConfig {
                    num_items_in_batch,
                    ..loss_cfg
                },
            )?;
            (o.loss, o.metrics)
        };
        self.sums.micro_metrics.push(out.1);
        Ok(out.0)
    }

    /// TRL's metric names: the reward statistics of the generation batch, the loss metrics
    /// averaged over its micro-batches and `completions/*`.
    fn finish_step(&mut self, _step: u64) -> Result<StepReport> {
        self.policy.set_training(false);
        let b = self.batch.take().context("step without completions")?;
        let sums = std::mem::take(&mut self.sums);
        let lens: Vec<f64> = b.rollouts.answers.iter().map(|a| a.len() as f64).collect();
        let n = lens.len() as f64;
        let terminated: Vec<f64> = lens
            .iter()
            .zip(&b.rollouts.finished)
            .filter(|(_, f)| **f)
            .map(|(l, _)| *l)
            .collect();
        let rail = if RLOO {
            b.reward_kl
        } else {
            (sums.seq_kl_rows > 0).then(|| sums.seq_kl_sum / sums.seq_kl_rows as f64)
        };
        let mut report = StepReport {
            kl: rail,
            tokens: b.tokens,
            ..StepReport::default()
        };
        report.metrics.extend(b.metrics);
        let micros = sums.micro_metrics.len().max(1) as f64;
        if let Some(first) = sums.micro_metrics.first() {
            for (k, (name, _)) in first.iter().enumerate() {
                let mean = sums.micro_metrics.iter().map(|m| m[k].1).sum::<f64>() / micros;
                // RLOO's `kl` comes from its reward step; GRPO's from the loss.
                if !report.metrics.iter().any(|(m, _)| m == name) {
                    report.metrics.push((name.clone(), mean));
                }
            }
        }
        let fold = |init: f64, f: fn(f64, f64) -> f64| lens.iter().copied().fold(init, f);
        let mean_terminated = if terminated.is_empty() {
            0.0
        } else {
            terminated.iter().sum::<f64>() / terminated.len() as f64
        };
        report = report
            .metric("completions/mean_length", lens.iter().sum::<f64>() / n)
            .metric("completions/min_length", fold(f64::INFINITY, f64::min))
            .metric("completions/max_length", fold(0.0, f64::max))
            .metric(
                "completions/clipped_ratio",
                1.0 - terminated.len() as f64 / n,
            )
            .metric("completions/mean_terminated_length", mean_terminated);
        Ok(report)
    }
}
