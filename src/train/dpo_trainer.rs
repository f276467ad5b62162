//! DPO (TRL `DPOTrainer`) as an objective on the training engine: preference pairs → policy
//! updates, with the reference log-probs computed once up front and cached (the reference never
//! changes, so scoring it every step would double the forward cost for nothing).
//!
//! A micro-batch's chosen and rejected answers go through the policy in one forward pass, and
//! only completion tokens count in the sequence log-probs. Its loss is the mean of the pairs'
//! losses weighted by each pair's `weight` (TRL's plain mean when all are 1). Metrics use TRL's names; the engine
//! owns the data order, accumulation, clipping, checkpoints, resume and the KL ceiling (guarding
//! `objective/logratio_abs`, the mean |log π − log π_ref| per answer).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::train::engine::{self, Objective, StepReport};
pub use crate::train::engine::{TrainOutcome, checkpoint_root};
use crate::train::losses::dpo::{DpoConfig, DpoLossType, DpoMetrics, dpo_loss};
use crate::train::losses::stats::{example_weight, non_unit_weights, weighted_mean};
use crate::train::policy_common::{
    Policy, PolicyTrainOptions, Tokenised, batch_tensors, reference_logps, tokenise_pair,
};

/// One preference pair as TRL's DPO dataset holds it (`prompt`, `chosen`, `rejected`; the
/// prompt already rendered with the chat template).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceExample {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// The pair's weight in the batch mean when not 1 (the influence cap's share of its evidence,
    /// or a constitution pair's `constitution.weight`); 0 takes it out of the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
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
    let weights = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| Ok(example_weight("preference pair", i, p.weight)?))
        .collect::<Result<Vec<f64>>>()?;
    let eos = policy.eos_ids().first().copied();
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for (i, p) in pairs.iter().enumerate() {
        let tk = |c: &str| {
            let (max_p, max_c) = (opts.max_prompt_len, opts.max_completion_len);
            tokenise_pair(&policy.tokenizer, &p.prompt, c, eos, max_p, max_c)
                .with_context(|| format!("tokenising preference pair {i}"))
        };
        chosen.push(tk(&p.chosen)?);
        rejected.push(tk(&p.rejected)?);
    }
    // Reference log-probs, once (no adapters / the frozen copy; no graph).
    policy.set_training(false);
    let (pad, chunk) = (policy.pad_id(), opts.batch_size.max(1) * 2);
    let ref_chosen = reference_logps(
        &policy.reference,
        &chosen.iter().collect::<Vec<_>>(),
        pad,
        chunk,
    )?;
    let ref_rejected = reference_logps(
        &policy.reference,
        &rejected.iter().collect::<Vec<_>>(),
        pad,
        chunk,
    )?;
    let varmap = policy.varmap.clone();
    let mut objective = Dpo {
        policy,
        cfg,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        weights,
        step: StepLogps::default(),
    };
    objective.policy.set_training(true);
    let outcome = engine::run(&mut objective, &varmap, &opts.engine(pairs.len()), out);
    policy.set_training(false);
    outcome
}

/// Sequence log-probs of a step's answers under the policy (detached) and the reference.
#[derive(Debug, Default)]
struct StepLogps {
    policy_chosen: Vec<f32>,
    policy_rejected: Vec<f32>,
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
    tokens: u64,
}

/// The DPO objective over tokenised pairs and their cached reference log-probs.
struct Dpo<'a> {
    policy: &'a Policy,
    cfg: DpoConfig,
    chosen: Vec<Tokenised>,
    rejected: Vec<Tokenised>,
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
    /// Each pair's weight in its update's mean (1 for most).
    weights: Vec<f64>,
    step: StepLogps,
}

impl Objective for Dpo<'_> {
    const NAME: &'static str = "dpo";

    fn examples(&self) -> usize {
        self.chosen.len()
    }

    fn example_weight(&self, i: usize) -> f64 {
        self.weights[i]
    }

    fn micro_loss(&mut self, _step: u64, micro: &[usize]) -> Result<Tensor> {
        let dev = self.policy.model.lm_head_weight().device().clone();
        let rows: Vec<&Tokenised> = micro
            .iter()
            .map(|&i| &self.chosen[i])
            .chain(micro.iter().map(|&i| &self.rejected[i]))
            .collect();
        self.step.tokens += rows.iter().map(|r| r.ids.len() as u64).sum::<u64>();
        let (ids, att, tgt) = batch_tensors(&rows, self.policy.pad_id(), &dev)?;
        let mut logps = self
            .policy
            .model
            .token_logprobs(&ids, Some(&att), &tgt)?
            .sum(1)?;
        let b = micro.len();
        let mut rc: Vec<f32> = micro.iter().map(|&i| self.ref_chosen[i]).collect();
        let mut rr: Vec<f32> = micro.iter().map(|&i| self.ref_rejected[i]).collect();
        if self.cfg.loss_type == DpoLossType::Ipo {
            // TRL feeds IPO length-averaged log-probs.
            let lens: Vec<f32> = rows
                .iter()
                .map(|r| (r.ids.len() - r.prompt_len) as f32)
                .collect();
            for (x, len) in rc.iter_mut().chain(rr.iter_mut()).zip(&lens) {
                *x /= len;
            }
            logps = logps.div(&Tensor::from_vec(lens, 2 * b, &dev)?)?;
        }
        let pc = logps.narrow(0, 0, b)?;
        let pr = logps.narrow(0, b, b)?;
        let o = dpo_loss(
            &pc,
            &pr,
            &tensor(&rc, &dev)?,
            &tensor(&rr, &dev)?,
            &self.cfg,
        )?;
        self.step
            .policy_chosen
            .extend(pc.detach().to_vec1::<f32>()?);
        self.step
            .policy_rejected
            .extend(pr.detach().to_vec1::<f32>()?);
        self.step.ref_chosen.extend(rc);
        self.step.ref_rejected.extend(rr);
        let weights = non_unit_weights(micro.iter().map(|&i| self.weights[i]));
        Ok(weighted_mean(&o.per_example, weights.as_deref())?)
    }

    fn finish_step(&mut self, _step: u64) -> Result<StepReport> {
        let s = std::mem::take(&mut self.step);
        let dev = self.policy.model.lm_head_weight().device().clone();
        let (pc, pr) = (
            tensor(&s.policy_chosen, &dev)?,
            tensor(&s.policy_rejected, &dev)?,
        );
        let (rc, rr) = (tensor(&s.ref_chosen, &dev)?, tensor(&s.ref_rejected, &dev)?);
        let o = dpo_loss(&pc, &pr, &rc, &rr, &self.cfg)?;
        let metrics = DpoMetrics::compute(&o, &pc, &pr)?;
        // How far the policy has moved from the reference on the training answers: the mean
        // absolute per-sequence log-ratio (nats), what the KL ceiling guards for DPO.
        let pairs = s.policy_chosen.len();
        let drift = (s.policy_chosen.iter().zip(&s.ref_chosen))
            .chain(s.policy_rejected.iter().zip(&s.ref_rejected))
            .map(|(p, r)| f64::from((p - r).abs()))
            .sum::<f64>()
            / (2 * pairs) as f64;
        let mut report = StepReport {
            kl: Some(drift),
            tokens: s.tokens,
            ..StepReport::default()
        }
        .metric("objective/logratio_abs", drift);
        for (k, v) in metrics.named() {
            report = report.metric(k, v);
        }
        Ok(report)
    }
}

fn tensor(values: &[f32], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values.to_vec(), values.len(), dev)?)
}
