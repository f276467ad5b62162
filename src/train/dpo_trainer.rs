//! The DPO loop (TRL `DPOTrainer`): preference pairs → policy updates, with the reference
//! log-probs computed once up front and cached (the reference never changes, so scoring it every
//! step would double the forward cost for nothing).
//!
//! Each step takes `batch_size × grad_accum` pairs in a seeded per-epoch order; chosen and
//! rejected answers of a micro-batch go through the policy in one forward pass, and only
//! completion tokens count in the sequence log-probs. Metrics go to `log.jsonl` under TRL's
//! names; a checkpoint (weights or adapters, AdamW state, data position, log) is written every
//! `checkpoint_every` steps and at the end, and a run started on the same output directory resumes
//! from it.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::run::outputs::LogLine;
use crate::train::losses::dpo::{DpoConfig, DpoLossType, DpoMetrics, dpo_loss};
use crate::train::optim::AdamW;
use crate::train::policy_common::{
    Policy, PolicyTrainOptions, RunLog, Tokenised, batch_tensors, check_kl, epoch_order,
    optimiser_step, reference_logps, tokenise_pair,
};

/// One preference pair as TRL's DPO dataset holds it (`prompt`, `chosen`, `rejected`; the
/// prompt already rendered with the chat template).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceExample {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// What a finished training loop reports (throughput and the log it wrote).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainOutcome {
    pub steps: u64,
    pub seconds: f64,
    /// Examples (pairs, thumbs, rollouts) processed in this process (not before a resume).
    pub examples: u64,
    pub tokens: u64,
    pub epochs: f64,
    pub log: Vec<LogLine>,
    /// Wall seconds per phase of the loop, summed over its steps, in the order the phases first
    /// ran (PPO records rollout, scoring, GAE and update phases; other loops leave it empty).
    pub phase_seconds: Vec<(String, f64)>,
}

impl TrainOutcome {
    /// Adds `seconds` to phase `name` (appending it the first time it is seen).
    pub fn add_phase(&mut self, name: &str, seconds: f64) {
        match self.phase_seconds.iter_mut().find(|(n, _)| n == name) {
            Some((_, s)) => *s += seconds,
            None => self.phase_seconds.push((name.to_string(), seconds)),
        }
    }
}

/// Directory of the checkpoints under a run's output directory.
pub fn checkpoint_root(out: &Path) -> std::path::PathBuf {
    out.join("checkpoints")
}

fn dpo_config(opts: &PolicyTrainOptions) -> DpoConfig {
    DpoConfig {
        beta: opts.beta,
        label_smoothing: opts.label_smoothing,
        loss_type: if opts.ipo {
            DpoLossType::Ipo
        } else {
            DpoLossType::Sigmoid
        },
    }
}

/// Trains `policy` on `pairs` and returns the outcome; metrics stream to `out/log.jsonl`.
pub fn train_dpo(
    policy: &mut Policy,
    pairs: &[PreferenceExample],
    opts: &PolicyTrainOptions,
    out: &Path,
) -> Result<TrainOutcome> {
    opts.validate()?;
    let cfg = dpo_config(opts);
    cfg.validate().map_err(anyhow::Error::msg)?;
    if pairs.is_empty() {
        bail!(
            "no preference pairs to train DPO on\nhint: collect feedback with chosen/rejected answers, or use KTO for thumbs"
        );
    }
    let started = Instant::now();
    let eos = policy.eos_ids().first().copied();
    let pad = policy.pad_id();
    let mut chosen = Vec::with_capacity(pairs.len());
    let mut rejected = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let tk = |c: &str| {
            tokenise_pair(
                &policy.tokenizer,
                &p.prompt,
                c,
                eos,
                opts.max_prompt_len,
                opts.max_completion_len,
            )
            .with_context(|| format!("tokenising preference pair {i}"))
        };
        chosen.push(tk(&p.chosen)?);
        rejected.push(tk(&p.rejected)?);
    }
    // Reference log-probs, once (no adapters / the frozen copy; no graph).
    policy.set_training(false);
    let chunk = opts.batch_size.max(1) * 2;
    let ref_c = reference_logps(
        &policy.reference,
        &chosen.iter().collect::<Vec<_>>(),
        pad,
        chunk,
    )?;
    let ref_r = reference_logps(
        &policy.reference,
        &rejected.iter().collect::<Vec<_>>(),
        pad,
        chunk,
    )?;

    let n = pairs.len();
    let per_step = opts.batch_size * opts.grad_accum;
    let steps_per_epoch = n.div_ceil(per_step) as u64;
    let total = opts.max_steps.unwrap_or(opts.epochs * steps_per_epoch);
    let root = checkpoint_root(out);
    let mut opt = AdamW::from_varmap(&policy.varmap, opts.adamw())?;
    let mut log = RunLog::start_or_resume(out, &root, opts.seed, &mut policy.varmap, &mut opt)?;
    let mut outcome = TrainOutcome::default();
    let dev = policy.model.lm_head_weight().device().clone();
    policy.set_training(true);
    while log.state.step < total {
        let order = epoch_order(n, opts.seed, log.state.epoch);
        let start = log.state.data_position as usize;
        let idx: Vec<usize> = order[start.min(n)..(start + per_step).min(n)].to_vec();
        if idx.is_empty() {
            log.state.epoch += 1;
            log.state.data_position = 0;
            continue;
        }
        let step = log.state.step + 1;
        let mut total_loss: Option<Tensor> = None;
        let (mut pc_all, mut pr_all, mut rc_all, mut rr_all) = (vec![], vec![], vec![], vec![]);
        for micro in idx.chunks(opts.batch_size) {
            let rows: Vec<&Tokenised> = micro
                .iter()
                .map(|&i| &chosen[i])
                .chain(micro.iter().map(|&i| &rejected[i]))
                .collect();
            outcome.tokens += rows.iter().map(|r| r.ids.len() as u64).sum::<u64>();
            let (ids, att, tgt) = batch_tensors(&rows, pad, &dev)?;
            let tok = policy.model.token_logprobs(&ids, Some(&att), &tgt)?;
            let mut logps = tok.sum(1)?;
            let b = micro.len();
            let mut rc: Vec<f32> = micro.iter().map(|&i| ref_c[i]).collect();
            let mut rr: Vec<f32> = micro.iter().map(|&i| ref_r[i]).collect();
            if opts.ipo {
                // TRL feeds IPO length-averaged log-probs.
                let lens: Vec<f32> = rows
                    .iter()
                    .map(|r| (r.ids.len() - r.prompt_len) as f32)
                    .collect();
                for (j, x) in rc.iter_mut().enumerate() {
                    *x /= lens[j];
                }
                for (j, x) in rr.iter_mut().enumerate() {
                    *x /= lens[b + j];
                }
                logps = logps.div(&Tensor::from_vec(lens, 2 * b, &dev)?)?;
            }
            let pc = logps.narrow(0, 0, b)?;
            let pr = logps.narrow(0, b, b)?;
            let rct = Tensor::from_vec(rc.clone(), b, &dev)?;
            let rrt = Tensor::from_vec(rr.clone(), b, &dev)?;
            let o = dpo_loss(&pc, &pr, &rct, &rrt, &cfg)?;
            let weighted = o.loss.affine(b as f64 / idx.len() as f64, 0.0)?;
            total_loss = Some(match total_loss {
                Some(t) => (t + weighted)?,
                None => weighted,
            });
            pc_all.extend(pc.detach().to_vec1::<f32>()?);
            pr_all.extend(pr.detach().to_vec1::<f32>()?);
            rc_all.extend(rc);
            rr_all.extend(rr);
        }
        let loss = total_loss.context("empty step")?;
        let loss_value = crate::train::losses::stats::scalar_f64(&loss)?;
        let grad_norm = optimiser_step(&mut opt, &loss, step, opts.max_grad_norm)?;

        let m = idx.len();
        let t = |v: Vec<f32>| Tensor::from_vec(v, m, &dev);
        let (pc, pr) = (t(pc_all.clone())?, t(pr_all.clone())?);
        let o = dpo_loss(&pc, &pr, &t(rc_all.clone())?, &t(rr_all.clone())?, &cfg)?;
        let metrics = DpoMetrics::compute(&o, &pc, &pr)?;
        // How far the policy has moved from the reference on the training answers: the mean
        // absolute per-sequence log-ratio (nats), what the KL ceiling guards for DPO.
        let drift = pc_all
            .iter()
            .zip(&rc_all)
            .chain(pr_all.iter().zip(&rr_all))
            .map(|(p, r)| f64::from((p - r).abs()))
            .sum::<f64>()
            / (2 * m) as f64;
        let mut line = LogLine::new(step)
            .with("loss", loss_value)
            .with("grad_norm", grad_norm)
            .with("learning_rate", opts.lr)
            .with("objective/logratio_abs", drift);
        for (k, v) in metrics.named() {
            line = line.with(k, v);
        }
        log.state.step = step;
        log.state.data_position += m as u64;
        if log.state.data_position as usize >= n {
            log.state.epoch += 1;
            log.state.data_position = 0;
        }
        line = line.with(
            "epoch",
            log.state.epoch as f64 + log.state.data_position as f64 / n as f64,
        );
        log.push(line)?;
        outcome.examples += m as u64;
        tracing::info!(
            step,
            loss = loss_value,
            margin = metrics.rewards_margins,
            "dpo step"
        );
        check_kl(step, drift, opts.kl_ceiling)?;
        if step % opts.checkpoint_every.max(1) == 0 || step == total {
            log.checkpoint(&root, &policy.varmap, &opt, Default::default())?;
        }
    }
    policy.set_training(false);
    outcome.steps = log.state.step;
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.epochs = log.state.epoch as f64 + log.state.data_position as f64 / n as f64;
    outcome.log = log.lines.clone();
    Ok(outcome)
}
