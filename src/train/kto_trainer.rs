//! KTO (TRL `KTOTrainer`, `loss_type = "kto"`) as an objective on the training engine: learns from unpaired thumbs up/down,
//! which is most of the feedback users leave.
//!
//! Each micro-batch is scored twice by the policy: once on its own (prompt, completion) rows
//! (with a graph) and once on mismatched rows — prompt `i` with the completion of row `i + 1`,
//! as TRL builds its KL dataset — whose log-ratio to the reference, averaged and clamped at 0, is
//! the detached reference point `z₀`. Reference log-probs of the real rows are computed once and
//! cached; those of the mismatched rows depend on the batch and are computed per step (no
//! graph). The loss is the mean of the examples' losses weighted by each one's `weight` (the
//! influence cap's share; TRL's plain mean when all are 1). Metrics use TRL's names; the engine owns the data order, accumulation, clipping,
//! checkpoints, resume and the KL ceiling (guarding the batch KL estimate `kl`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::train::engine::{self, Objective, StepReport, TrainOutcome};
use crate::train::losses::kto::{KtoConfig, kto_loss};
use crate::train::losses::stats::{example_weight, non_unit_weights, weighted_mean};
use crate::train::policy_common::{
    Policy, PolicyTrainOptions, Tokenised, reference_logps, sequence_logps, tokenise_pair,
};

/// One thumbs-up (`label = true`) or thumbs-down answer, TRL's unpaired format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointwiseExample {
    pub prompt: String,
    pub completion: String,
    pub label: bool,
    /// The example's weight in the batch mean when not 1 (the influence cap's share of its
    /// evidence); 0 takes it out of the loss (it still lends its completion to the KL estimate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// Indices of the completion each row is paired with for the KL estimate (the next row's,
/// wrapping), as TRL's `_get_kl_dataset` shifts completions within a batch.
pub fn kl_partner(i: usize, n: usize) -> usize {
    (i + 1) % n
}

/// Trains `policy` on thumbs and returns the outcome; metrics stream to `out/log.jsonl`.
pub fn train_kto(
    policy: &mut Policy,
    examples: &[PointwiseExample],
    opts: &PolicyTrainOptions,
    out: &Path,
) -> Result<TrainOutcome> {
    opts.validate()?;
    if examples.is_empty() {
        bail!("no thumbs to train KTO on\nhint: collect thumbs up/down feedback first");
    }
    for (i, e) in examples.iter().enumerate() {
        example_weight("thumb", i, e.weight)?;
    }
    let mut objective = Kto {
        policy,
        examples,
        opts,
        cfg: KtoConfig {
            beta: opts.beta,
            desirable_weight: opts.kto_desirable_weight,
            undesirable_weight: opts.kto_undesirable_weight,
        },
        rows: Vec::new(),
        refs: Vec::new(),
        step: StepSums::default(),
    };
    objective.rows = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            objective
                .tokenise(&e.prompt, &e.completion)
                .with_context(|| format!("tokenising example {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    policy.set_training(false);
    let rows: Vec<&Tokenised> = objective.rows.iter().collect();
    objective.refs = reference_logps(&policy.reference, &rows, policy.pad_id(), opts.batch_size)?;
    engine::run(
        &mut objective,
        &policy.varmap,
        &opts.engine(examples.len()),
        out,
    )
}

/// What a step's micro-batches add up: policy log-probs and rewards of the desirable and
/// undesirable answers, and each micro-batch's KL estimate.
#[derive(Debug, Default)]
struct StepSums {
    desirable_logps: Vec<f32>,
    undesirable_logps: Vec<f32>,
    desirable_rewards: Vec<f32>,
    undesirable_rewards: Vec<f32>,
    kls: Vec<f64>,
    tokens: u64,
}

/// The KTO objective over tokenised thumbs and their cached reference log-probs.
struct Kto<'a> {
    policy: &'a Policy,
    examples: &'a [PointwiseExample],
    opts: &'a PolicyTrainOptions,
    cfg: KtoConfig,
    rows: Vec<Tokenised>,
    refs: Vec<f32>,
    step: StepSums,
}

impl Kto<'_> {
    fn tokenise(&self, prompt: &str, completion: &str) -> Result<Tokenised> {
        let eos = self.policy.eos_ids().first().copied();
        let (max_p, max_c) = (self.opts.max_prompt_len, self.opts.max_completion_len);
        tokenise_pair(
            &self.policy.tokenizer,
            prompt,
            completion,
            eos,
            max_p,
            max_c,
        )
    }
}

impl Objective for Kto<'_> {
    const NAME: &'static str = "kto";

    fn examples(&self) -> usize {
        self.examples.len()
    }

    fn example_weight(&self, i: usize) -> f64 {
        self.examples[i].weight.unwrap_or(1.0)
    }

    fn micro_loss(&mut self, _step: u64, micro: &[usize]) -> Result<Tensor> {
        let (policy, pad) = (self.policy, self.policy.pad_id());
        let dev = policy.model.lm_head_weight().device().clone();
        let m = micro.len();
        // The mismatched rows for the KL reference point, scored without a graph.
        let kl_rows = micro
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let partner = micro[kl_partner(j, m)];
                self.tokenise(&self.examples[i].prompt, &self.examples[partner].completion)
            })
            .collect::<Result<Vec<Tokenised>>>()?;
        let kl_refs: Vec<&Tokenised> = kl_rows.iter().collect();
        policy.set_training(false);
        let pol_kl = sequence_logps(&policy.model, &kl_refs, pad)?.detach();
        let ref_kl = sequence_logps(&policy.reference, &kl_refs, pad)?.detach();
        policy.set_training(true);

        let (des, und): (Vec<usize>, Vec<usize>) =
            micro.iter().partition(|&&i| self.examples[i].label);
        let ordered: Vec<&Tokenised> = des.iter().chain(&und).map(|&i| &self.rows[i]).collect();
        self.step.tokens += ordered.iter().map(|r| r.ids.len() as u64).sum::<u64>();
        let logps = sequence_logps(&policy.model, &ordered, pad)?;
        let pd = logps.narrow(0, 0, des.len())?;
        let pu = logps.narrow(0, des.len(), und.len())?;
        let refs = |idx: &[usize]| -> Result<Tensor> {
            let v: Vec<f32> = idx.iter().map(|&i| self.refs[i]).collect();
            Ok(Tensor::from_vec(v, idx.len(), &dev)?)
        };
        let o = kto_loss(
            &pd,
            &refs(&des)?,
            &pu,
            &refs(&und)?,
            &pol_kl,
            &ref_kl,
            &self.cfg,
        )?;
        // Weights in the loss's order: desirable first.
        let weights = non_unit_weights(des.iter().chain(&und).map(|&i| self.example_weight(i)));
        let loss = weighted_mean(&o.per_example, weights.as_deref())?;
        let s = &mut self.step;
        s.desirable_logps.extend(pd.detach().to_vec1::<f32>()?);
        s.undesirable_logps.extend(pu.detach().to_vec1::<f32>()?);
        s.desirable_rewards
            .extend(o.chosen_rewards.to_vec1::<f32>()?);
        s.undesirable_rewards
            .extend(o.rejected_rewards.to_vec1::<f32>()?);
        s.kls.push(o.kl);
        Ok(loss)
    }

    fn finish_step(&mut self, _step: u64) -> Result<StepReport> {
        let s = std::mem::take(&mut self.step);
        let mean = |v: &[f32]| {
            (!v.is_empty()).then(|| v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64)
        };
        let kl = s.kls.iter().sum::<f64>() / s.kls.len() as f64;
        let mut report = StepReport {
            kl: Some(kl),
            tokens: s.tokens,
            ..StepReport::default()
        }
        .metric("kl", kl);
        for (k, v) in [
            ("rewards/chosen", mean(&s.desirable_rewards)),
            ("rewards/rejected", mean(&s.undesirable_rewards)),
            ("logps/chosen", mean(&s.desirable_logps)),
            ("logps/rejected", mean(&s.undesirable_logps)),
        ] {
            if let Some(v) = v {
                report = report.metric(k, v);
            }
        }
        if let (Some(c), Some(r)) = (mean(&s.desirable_rewards), mean(&s.undesirable_rewards)) {
            report = report.metric("rewards/margins", c - r);
        }
        Ok(report)
    }
}
