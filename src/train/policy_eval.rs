//! Evaluating a candidate policy against production before it may be promoted (the reward model
//! it is scored by is `train::reward_scorer`'s, re-exported here).
//!
//! On held-out prompts the candidate and the production policy each answer (greedy, or sampled
//! with a fixed seed); the reward model scores both answers; the candidate wins a prompt when
//! its score is higher (a tie counts half). The report carries the win rate with a 95% Wilson
//! interval (so a reviewer sees how much 16 prompts can say), the mean rewards, the mean KL of
//! the candidate's answers to the reference (the exact KL between the two models' next-token
//! distributions, summed over each answer's positions: never negative, greedy answers too),
//! mean answer lengths, and a few sample pairs; with `policy.reward` configured, each reward
//! component's mean for the initial policy's answers and the trained one's; with a step head on
//! the reward model, the mean step score of each policy's answers (`train::step_rewards` splits
//! them into steps).

use anyhow::{Context, Result, bail};
use candle_core::{D, Tensor};

use crate::model::generate::{GenerationConfig, generate};
use crate::model::llama::LlamaForCausalLM;
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::Tokenizer;
use crate::run::outputs::{PolicyEval, PolicySample, RewardComponentEval};
use crate::train::policy_reward::{PolicyReward, ScoredAnswers, answer_steps};
// The scorer has its own module (the reward composition reads it too); re-exported for callers.
use crate::train::reward_scorer::joined_rows;
pub use crate::train::reward_scorer::{ModelRewards, RewardScorer};

/// Answers of one policy to the evaluation prompts.
#[derive(Debug, Clone)]
pub struct Answers {
    /// The prompts' token ids (what the answers continue).
    pub prompt_ids: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    pub tokens: Vec<Vec<u32>>,
    /// Whether each answer ended with EOS.
    pub finished: Vec<bool>,
    pub scores: Vec<f32>,
}

impl Answers {
    /// The answers as a reward's input, with their `prompts`.
    fn scored<'a>(&'a self, prompts: &'a [&'a str]) -> ScoredAnswers<'a> {
        ScoredAnswers {
            prompts,
            prompt_ids: &self.prompt_ids,
            answer_ids: &self.tokens,
            answer_texts: &self.texts,
            finished: &self.finished,
        }
    }
}

/// How the policies answer during evaluation.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub max_new_tokens: usize,
    pub max_prompt_len: usize,
    pub greedy: bool,
    pub seed: u64,
    pub batch_size: usize,
    /// Sample pairs kept in the report.
    pub samples: usize,
}

/// Generates and scores answers of `model` to `prompts`.
pub fn answer(
    model: &LlamaForCausalLM,
    tokenizer: &Tokenizer,
    rm: &RewardScorer,
    prompts: &[String],
    s: &EvalSettings,
) -> Result<Answers> {
    let cfg = model.config();
    let eos = cfg.eos_token_ids();
    let pad = cfg
        .pad_token_id
        .or_else(|| eos.first().copied())
        .unwrap_or(0);
    let mut out = Answers {
        prompt_ids: vec![],
        texts: vec![],
        tokens: vec![],
        finished: vec![],
        scores: vec![],
    };
    for (c, chunk) in prompts.chunks(s.batch_size.max(1)).enumerate() {
        let ids = chunk
            .iter()
            .map(|p| prompt_ids(tokenizer, p, s.max_prompt_len, eos.first().copied()))
            .collect::<Result<Vec<_>>>()?;
        let gen_cfg = GenerationConfig {
            max_new_tokens: s.max_new_tokens,
            sampling: if s.greedy {
                SamplingParams::greedy()
            } else {
                SamplingParams::default()
            },
            seed: s.seed.wrapping_add(c as u64),
            stop_token_ids: eos.clone(),
            pad_token_id: pad,
            use_cache: true,
        };
        let g = generate(model, &ids, &gen_cfg)?;
        let texts = g.texts(tokenizer.inner(), true)?;
        let chunk_prompts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (full_ids, full_texts) = joined_rows(&chunk_prompts, &ids, &g.tokens, &texts);
        out.scores.extend(rm.score(&full_ids, &full_texts)?);
        out.texts.extend(texts);
        out.tokens.extend(g.tokens);
        out.finished.extend(g.finished);
        out.prompt_ids.extend(ids);
    }
    Ok(out)
}

/// Prompt token ids, keeping the last `max_len` (never empty: generation needs a position).
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &str,
    max_len: usize,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    let mut p = tok.encode(prompt, false)?;
    if p.len() > max_len {
        p.drain(..p.len() - max_len);
    }
    if p.is_empty() {
        p.push(eos.unwrap_or(0));
    }
    Ok(p)
}

/// Answer positions whose full next-token distributions are compared at once (bounds the
/// `[positions, vocab]` logits of both models to a few tens of MB).
const KL_POSITIONS_PER_CHUNK: usize = 128;

/// KL(π‖π_ref) of each answer: the sum over its token positions of the exact KL between the two
/// next-token distributions, `Σ_v π(v|ctx) (log π(v|ctx) − log π_ref(v|ctx))`, given the answer
/// so far. Unlike `log π(y) − log π_ref(y)` of the emitted tokens, this is never negative and
/// stays honest when the answers were decoded greedily rather than sampled.
pub fn answer_kl(
    model: &LlamaForCausalLM,
    reference: &LlamaForCausalLM,
    tokenizer: &Tokenizer,
    prompts: &[String],
    answers: &[Vec<u32>],
    max_prompt_len: usize,
    batch_size: usize,
) -> Result<Vec<f64>> {
    let eos = model.config().eos_token_ids().first().copied();
    let pad = model.config().pad_token_id.or(eos).unwrap_or(0);
    let device = model.lm_head_weight().device().clone();
    let mut out = Vec::with_capacity(prompts.len());
    let items: Vec<(usize, &String)> = prompts.iter().enumerate().collect();
    for chunk in items.chunks(batch_size.max(1)) {
        let rows = chunk
            .iter()
            .map(|(i, p)| {
                let mut ids = prompt_ids(tokenizer, p, max_prompt_len, eos)?;
                let prompt_len = ids.len();
                ids.extend(&answers[*i]);
                Ok(crate::train::policy_common::Tokenised { ids, prompt_len })
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<_> = rows.iter().collect();
        let (ids, att, _) = crate::train::policy_common::batch_tensors(&refs, pad, &device)?;
        let width = ids.dim(1)?;
        // Flat positions whose next-token distribution produced an answer token, and the answer
        // (row of this chunk) each belongs to. Empty answers select nothing and get 0.
        let mut positions = Vec::new();
        let mut owner = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            for t in row.prompt_len..row.ids.len() {
                positions.push((r * width + t - 1) as u32);
                owner.push(r);
            }
        }
        let mut kl = vec![0f64; rows.len()];
        if !positions.is_empty() {
            let hidden = |m: &LlamaForCausalLM| -> Result<Tensor> {
                let h = m.model().forward(&ids, Some(&att))?;
                let d = h.dim(2)?;
                Ok(h.reshape((rows.len() * width, d))?)
            };
            let (h_model, h_ref) = (hidden(model)?, hidden(reference)?);
            for (idx, who) in positions
                .chunks(KL_POSITIONS_PER_CHUNK)
                .zip(owner.chunks(KL_POSITIONS_PER_CHUNK))
            {
                let idx = Tensor::new(idx, &device)?;
                let log_probs = |h: &Tensor, m: &LlamaForCausalLM| -> Result<Tensor> {
                    let logits = m.head_logits(&h.index_select(&idx, 0)?)?;
                    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
                };
                let lp = log_probs(&h_model, model)?;
                let lq = log_probs(&h_ref, reference)?;
                let per_position = (lp.exp()? * (&lp - &lq)?)?
                    .sum(D::Minus1)?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?;
                for (&r, v) in who.iter().zip(per_position) {
                    // Rounding can leave -1e-7 where the distributions agree.
                    kl[r] += v.max(0.0);
                }
            }
        }
        out.extend(kl);
    }
    Ok(out)
}

/// Each component of `reward` averaged over the held-out answers of the initial policy (the
/// reference: the base weights before training) and of the trained one.
fn component_evals(
    reward: &PolicyReward,
    rm: &RewardScorer,
    prompts: &[String],
    before: &Answers,
    after: &Answers,
) -> Result<Vec<RewardComponentEval>> {
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let means = |a: &Answers| -> Result<Vec<(String, f64)>> {
        Ok(reward.component_means(&reward.components(rm, &a.scored(&texts))?))
    };
    let (b, a) = (means(before)?, means(after)?);
    Ok(b.into_iter()
        .zip(a)
        .map(|((name, before), (_, after))| RewardComponentEval {
            weight: reward.weight_of(&name).unwrap_or(1.0),
            name,
            before,
            after,
        })
        .collect())
}

/// The whole evaluation: candidate vs production on `prompts`, scored by `rm`; with a
/// configured `reward`, also each of its components before (the reference's answers) and after
/// training (the candidate's).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    candidate: &LlamaForCausalLM,
    production: &LlamaForCausalLM,
    reference: &LlamaForCausalLM,
    tokenizer: &Tokenizer,
    rm: &RewardScorer,
    reward: Option<&PolicyReward>,
    prompts: &[String],
    s: &EvalSettings,
) -> Result<PolicyEval> {
    if prompts.is_empty() {
        bail!("no evaluation prompts\nhint: hold out some prompts (eval_prompts > 0)");
    }
    let cand = answer(candidate, tokenizer, rm, prompts, s)?;
    let prod = answer(production, tokenizer, rm, prompts, s)?;
    let reward_components = match reward.filter(|r| r.is_configured()) {
        Some(r) => {
            let initial = answer(reference, tokenizer, rm, prompts, s)?;
            component_evals(r, rm, prompts, &initial, &cand)?
        }
        None => Vec::new(),
    };
    let kls = answer_kl(
        candidate,
        reference,
        tokenizer,
        prompts,
        &cand.tokens,
        s.max_prompt_len,
        s.batch_size,
    )?;
    let (step_score, production_step_score) = if rm.require_step_head().is_ok() {
        (
            mean_step_probability(rm, tokenizer, prompts, &cand)?,
            mean_step_probability(rm, tokenizer, prompts, &prod)?,
        )
    } else {
        (None, None)
    };
    let n = prompts.len();
    let mut wins2 = 0u64; // twice the wins, so a tie adds 1
    for (c, p) in cand.scores.iter().zip(&prod.scores) {
        wins2 += if c > p {
            2
        } else if c == p {
            1
        } else {
            0
        };
    }
    let win_rate = wins2 as f64 / (2 * n) as f64;
    let ci = crate::stats::wilson(wins2.div_ceil(2), n as u64, 0.95).context("empty evaluation")?;
    let mean = |v: &[f32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
    let len = |t: &[Vec<u32>]| t.iter().map(Vec::len).sum::<usize>() as f64 / t.len() as f64;
    let samples = (0..n.min(s.samples))
        .map(|i| PolicySample {
            prompt: prompts[i].clone(),
            candidate: cand.texts[i].clone(),
            production: Some(prod.texts[i].clone()),
            candidate_reward: f64::from(cand.scores[i]),
            production_reward: Some(f64::from(prod.scores[i])),
        })
        .collect();
    Ok(PolicyEval {
        win_rate,
        win_rate_low: ci.low,
        win_rate_high: ci.high,
        n: n as u64,
        mean_reward: mean(&cand.scores),
        production_mean_reward: Some(mean(&prod.scores)),
        kl: kls.iter().sum::<f64>() / n as f64,
        response_length: len(&cand.tokens),
        production_response_length: Some(len(&prod.tokens)),
        samples,
        reward_components,
        step_score,
        production_step_score,
    })
}

/// The mean over every step of `answers` of the step head's probability that it is right;
/// `None` when no answer has a step.
fn mean_step_probability(
    rm: &RewardScorer,
    tokenizer: &Tokenizer,
    prompts: &[String],
    answers: &Answers,
) -> Result<Option<f64>> {
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let scored = answer_steps(rm, tokenizer, &answers.scored(&texts))?;
    let probs: Vec<f64> = scored
        .iter()
        .flat_map(|s| s.probabilities.iter().copied())
        .filter(|p| p.is_finite())
        .collect();
    Ok((!probs.is_empty()).then(|| probs.iter().sum::<f64>() / probs.len() as f64))
}
