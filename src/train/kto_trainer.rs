//! The KTO loop (TRL `KTOTrainer`, `loss_type = "kto"`): learns from unpaired thumbs up/down,
//! which is most of the feedback users leave.
//!
//! Each micro-batch is scored twice by the policy: once on its own (prompt, completion) rows
//! (with a graph) and once on mismatched rows — prompt `i` with the completion of row `i + 1`,
//! as TRL builds its KL dataset — whose log-ratio to the reference, averaged and clamped at 0, is
//! the detached reference point `z₀`. Reference log-probs of the real rows are computed once and
//! cached; those of the mismatched rows depend on the batch and are computed per step (no
//! graph). Metrics use TRL's names; checkpoints and resume work as in the DPO loop.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::run::outputs::LogLine;
use crate::train::dpo_trainer::{TrainOutcome, checkpoint_root};
use crate::train::losses::kto::{KtoConfig, kto_loss};
use crate::train::optim::AdamW;
use crate::train::policy_common::{
    Policy, PolicyTrainOptions, RunLog, Tokenised, check_kl, epoch_order, optimiser_step,
    reference_logps, sequence_logps, tokenise_pair,
};

/// One thumbs-up (`label = true`) or thumbs-down answer, TRL's unpaired format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointwiseExample {
    pub prompt: String,
    pub completion: String,
    pub label: bool,
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
    let cfg = KtoConfig {
        beta: opts.beta,
        desirable_weight: opts.kto_desirable_weight,
        undesirable_weight: opts.kto_undesirable_weight,
    };
    let started = Instant::now();
    let eos = policy.eos_ids().first().copied();
    let pad = policy.pad_id();
    let tk = |prompt: &str, completion: &str| {
        tokenise_pair(
            &policy.tokenizer,
            prompt,
            completion,
            eos,
            opts.max_prompt_len,
            opts.max_completion_len,
        )
    };
    let rows = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            tk(&e.prompt, &e.completion).with_context(|| format!("tokenising example {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    policy.set_training(false);
    let refs = reference_logps(
        &policy.reference,
        &rows.iter().collect::<Vec<_>>(),
        pad,
        opts.batch_size,
    )?;

    let n = examples.len();
    let per_step = opts.batch_size * opts.grad_accum;
    let total = opts
        .max_steps
        .unwrap_or(opts.epochs * n.div_ceil(per_step) as u64);
    let root = checkpoint_root(out);
    let mut opt = AdamW::from_varmap(&policy.varmap, opts.adamw())?;
    let mut log = RunLog::start_or_resume(out, &root, opts.seed, &mut policy.varmap, &mut opt)?;
    let mut outcome = TrainOutcome::default();
    let dev = policy.model.lm_head_weight().device().clone();
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
        let (mut d_pol, mut u_pol, mut d_rew, mut u_rew, mut kls) =
            (vec![], vec![], vec![], vec![], vec![]);
        for micro in idx.chunks(opts.batch_size) {
            let m = micro.len();
            // The mismatched rows for the KL reference point, scored without a graph.
            let kl_rows = micro
                .iter()
                .enumerate()
                .map(|(j, &i)| {
                    let partner = micro[kl_partner(j, m)];
                    tk(&examples[i].prompt, &examples[partner].completion)
                })
                .collect::<Result<Vec<Tokenised>>>()?;
            let kl_refs: Vec<&Tokenised> = kl_rows.iter().collect();
            policy.set_training(false);
            let pol_kl = sequence_logps(&policy.model, &kl_refs, pad)?.detach();
            let ref_kl = sequence_logps(&policy.reference, &kl_refs, pad)?.detach();
            policy.set_training(true);

            let (des, und): (Vec<usize>, Vec<usize>) =
                micro.iter().partition(|&&i| examples[i].label);
            let ordered: Vec<&Tokenised> = des.iter().chain(&und).map(|&i| &rows[i]).collect();
            outcome.tokens += ordered.iter().map(|r| r.ids.len() as u64).sum::<u64>();
            let logps = sequence_logps(&policy.model, &ordered, pad)?;
            let pd = logps.narrow(0, 0, des.len())?;
            let pu = logps.narrow(0, des.len(), und.len())?;
            let rd: Vec<f32> = des.iter().map(|&i| refs[i]).collect();
            let ru: Vec<f32> = und.iter().map(|&i| refs[i]).collect();
            let rdt = Tensor::from_vec(rd, des.len(), &dev)?;
            let rut = Tensor::from_vec(ru, und.len(), &dev)?;
            let o = kto_loss(&pd, &rdt, &pu, &rut, &pol_kl, &ref_kl, &cfg)?;
            let weighted = o.loss.affine(m as f64 / idx.len() as f64, 0.0)?;
            total_loss = Some(match total_loss {
                Some(t) => (t + weighted)?,
                None => weighted,
            });
            d_pol.extend(pd.detach().to_vec1::<f32>()?);
            u_pol.extend(pu.detach().to_vec1::<f32>()?);
            d_rew.extend(o.chosen_rewards.to_vec1::<f32>()?);
            u_rew.extend(o.rejected_rewards.to_vec1::<f32>()?);
            kls.push(o.kl);
        }
        let loss = total_loss.context("empty step")?;
        let loss_value = crate::train::losses::stats::scalar_f64(&loss)?;
        let grad_norm = optimiser_step(&mut opt, &loss, step, opts.max_grad_norm)?;
        let mean = |v: &[f32]| {
            if v.is_empty() {
                None
            } else {
                Some(v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64)
            }
        };
        let kl = kls.iter().sum::<f64>() / kls.len() as f64;
        let mut line = LogLine::new(step)
            .with("loss", loss_value)
            .with("grad_norm", grad_norm)
            .with("learning_rate", opts.lr)
            .with("kl", kl);
        for (k, v) in [
            ("rewards/chosen", mean(&d_rew)),
            ("rewards/rejected", mean(&u_rew)),
            ("logps/chosen", mean(&d_pol)),
            ("logps/rejected", mean(&u_pol)),
        ] {
            if let Some(v) = v {
                line = line.with(k, v);
            }
        }
        if let (Some(c), Some(r)) = (mean(&d_rew), mean(&u_rew)) {
            line = line.with("rewards/margins", c - r);
        }
        log.state.step = step;
        log.state.data_position += idx.len() as u64;
        if log.state.data_position as usize >= n {
            log.state.epoch += 1;
            log.state.data_position = 0;
        }
        line = line.with(
            "epoch",
            log.state.epoch as f64 + log.state.data_position as f64 / n as f64,
        );
        log.push(line)?;
        outcome.examples += idx.len() as u64;
        tracing::info!(step, loss = loss_value, kl, "kto step");
        check_kl(step, kl, opts.kl_ceiling)?;
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
