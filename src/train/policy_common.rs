//! What the policy objectives (DPO, KTO, PPO, GRPO, RLOO) and the policy evaluation share: the options
//! with their TRL defaults (and how they map onto the training engine, [`PolicyTrainOptions::engine`]),
//! the trainable policy with its frozen reference, and tokenising (prompt, completion) pairs into
//! the padded batches the decoder scores. The loop itself (log, checkpoints, rails) is the
//! engine's (`train::engine`); its names are re-exported here for existing callers.
//!
//! With LoRA the reference policy is the *same* base weights without adapters: the base is
//! loaded once as plain tensors, cloned (candle tensors are reference-counted, so the clone
//! shares every weight buffer) and only the trainee gets adapters. Without LoRA the trainee's
//! weights change in place, so the reference is a second, frozen copy.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::kernels::precision::{Precision, PrecisionChoice};
use crate::model::llama::load_frozen_causal_lm_in;
use crate::model::llama::{Architecture, LlamaConfig, LlamaForCausalLM, save_pretrained};
use crate::model::lora::{LoraAdapters, LoraConfig, LoraInit, attach_lora};
use crate::model::tokenizer::Tokenizer;
use crate::run::outputs::PolicyAlgo;
use crate::train::losses::grpo::{GrpoLossConfig, LossType};
use crate::train::losses::grpo_terms::{SapoTemperatures, VespoParams};
// The engine and the guards own these; re-exported for the policy trainers' callers.
pub use crate::train::engine::order::epoch_order;
use crate::train::engine::{DataOrder, EngineConfig, Objective, RunControl, TrainOutcome};
pub use crate::train::engine::{RunLog, optimiser_step};
pub use crate::train::guard::{RailError, check_finite, check_kl};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::{Decay, Schedule};

/// PPO-specific options (TRL / N+ implementation details defaults, GUIDE §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoOptions {
    /// Prompts rolled out per PPO step (the batch).
    pub rollouts_per_step: usize,
    /// Optimisation passes over each batch of rollouts.
    pub ppo_epochs: usize,
    pub num_minibatches: usize,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    /// Per-token KL coefficient; the initial one when `adaptive_kl`.
    pub kl_coef: f64,
    pub adaptive_kl: bool,
    pub adaptive_kl_init: f64,
    pub adaptive_kl_target: f64,
    pub adaptive_kl_horizon: f64,
    /// Added to the score of a response that never produced EOS (TRL's `missing_eos_penalty`
    /// subtracts its positive value; here the signed value is added: -1 by default).
    pub missing_eos_penalty: f64,
    pub whiten_rewards: bool,
    /// Rollout sampling temperature (TRL's default is 0.7).
    pub temperature: f32,
}

impl Default for PpoOptions {
    fn default() -> Self {
        Self {
            rollouts_per_step: 8,
            ppo_epochs: 4,
            num_minibatches: 1,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            kl_coef: 0.05,
            adaptive_kl: false,
            adaptive_kl_init: 0.2,
            adaptive_kl_target: 6.0,
            adaptive_kl_horizon: 10000.0,
            missing_eos_penalty: -1.0,
            whiten_rewards: false,
            temperature: 0.7,
        }
    }
}

/// GRPO / RLOO options (`policy.grpo:`), TRL's names; both algorithms read the same section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupRlOptions {
    /// Prompts per step; each gets `num_generations` completions.
    pub prompts_per_step: usize,
    /// `G`: completions sampled per prompt (at least 2: the group is the baseline).
    pub num_generations: usize,
    /// Optimiser updates per generation batch (TRL `num_iterations`, μ).
    pub num_iterations: usize,
    /// KL coefficient; absent: TRL's default (GRPO 0.0, which skips the reference pass; RLOO 0.05).
    pub beta: Option<f64>,
    /// Lower clip bound `1 - epsilon`.
    pub epsilon: f64,
    /// Upper clip bound `1 + epsilon_high`; absent: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// GRPO loss: grpo, bnpo, dr_grpo, dapo (TRL's default), luspo, cispo, sapo, vespo.
    pub loss_type: crate::train::losses::grpo::LossType,
    /// GRPO: cap on the unclipped ratio (INTELLECT-2's two-sided clipping), clipped loss types.
    pub delta: Option<f64>,
    /// GRPO: multiply the k3 KL by the importance ratio (TRL 1.16's default: true).
    pub use_bias_correction_kl: bool,
    /// GRPO `sapo`: gate temperatures for positive / non-positive advantages.
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// GRPO `vespo`: gamma-weight exponent `k` and decay `lambda` per advantage sign.
    pub vespo_k_pos: f64,
    pub vespo_lambda_pos: f64,
    pub vespo_k_neg: f64,
    pub vespo_lambda_neg: f64,
    /// GRPO: entropy bonus coefficient (0 = off).
    pub entropy_coef: f64,
    /// GRPO: keep this top quantile of answer tokens by entropy in the policy term (1 = all).
    pub top_entropy_quantile: f64,
    /// GRPO: drop negative-advantage answers whose mean drift since sampling passes this.
    pub off_policy_mask_threshold: Option<f64>,
    /// GRPO: group, batch or none.
    pub scale_rewards: crate::train::losses::grpo::ScaleRewards,
    /// GRPO with several reward components (`policy.reward`): sum_then_normalize or
    /// normalize_then_sum.
    pub multi_objective_aggregation: crate::train::losses::grpo::Aggregation,
    /// GRPO: token or sequence (GSPO).
    pub importance_sampling_level: crate::train::losses::grpo::RatioLevel,
    /// Sampling temperature (TRL's default is 1.0); log-probs are scored at it too.
    pub temperature: f32,
    /// RLOO: z-score the advantages over the batch.
    pub normalize_advantages: bool,
    /// RLOO: clamp the reward to `[lo, hi]` before the KL term.
    pub reward_clip_range: Option<(f64, f64)>,
}

impl Default for GroupRlOptions {
    fn default() -> Self {
        let loss = GrpoLossConfig::default();
        Self {
            prompts_per_step: 2,
            num_generations: 4,
            num_iterations: 1,
            beta: None,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: loss.loss_type,
            delta: loss.delta,
            use_bias_correction_kl: loss.kl_bias_correction,
            sapo_temperature_pos: loss.sapo.pos,
            sapo_temperature_neg: loss.sapo.neg,
            vespo_k_pos: loss.vespo.k_pos,
            vespo_lambda_pos: loss.vespo.lambda_pos,
            vespo_k_neg: loss.vespo.k_neg,
            vespo_lambda_neg: loss.vespo.lambda_neg,
            entropy_coef: loss.entropy_coef,
            top_entropy_quantile: loss.top_entropy_quantile,
            off_policy_mask_threshold: loss.off_policy_mask_threshold,
            scale_rewards: crate::train::losses::grpo::ScaleRewards::Group,
            multi_objective_aggregation: crate::train::losses::grpo::Aggregation::SumThenNormalize,
            importance_sampling_level: crate::train::losses::grpo::RatioLevel::Token,
            temperature: 1.0,
            normalize_advantages: false,
            reward_clip_range: None,
        }
    }
}

impl GroupRlOptions {
    /// β for `algo`: the configured one, else TRL's default for that trainer.
    pub fn beta_for(&self, algo: PolicyAlgo) -> f64 {
        self.beta
            .unwrap_or(if algo == PolicyAlgo::Rloo { 0.05 } else { 0.0 })
    }

    /// GRPO's loss settings for `beta`; `num_items_in_batch` is the caller's (per micro-batch).
    pub fn grpo_loss_config(&self, beta: f64, max_completion_length: usize) -> GrpoLossConfig {
        GrpoLossConfig {
            loss_type: self.loss_type,
            beta,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            level: self.importance_sampling_level,
            kl_bias_correction: self.use_bias_correction_kl,
            delta: self.delta,
            max_completion_length,
            num_items_in_batch: 0.0,
            sapo: SapoTemperatures {
                pos: self.sapo_temperature_pos,
                neg: self.sapo_temperature_neg,
            },
            vespo: VespoParams {
                k_pos: self.vespo_k_pos,
                lambda_pos: self.vespo_lambda_pos,
                k_neg: self.vespo_k_neg,
                lambda_neg: self.vespo_lambda_neg,
            },
            entropy_coef: self.entropy_coef,
            top_entropy_quantile: self.top_entropy_quantile,
            off_policy_mask_threshold: self.off_policy_mask_threshold,
        }
    }

    /// Rejects values the objectives cannot run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            Some((key, message)) => bail!("policy.grpo.{key}: {message}"),
            None => Ok(()),
        }
    }

    /// The first key (under `policy.grpo`) holding a value no objective can run with, and why.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        for (key, v, min) in [
            ("prompts_per_step", self.prompts_per_step, 1),
            ("num_generations", self.num_generations, 2),
            ("num_iterations", self.num_iterations, 1),
        ] {
            if v < min {
                let why = if key == "num_generations" {
                    " (the group of answers to one prompt is the baseline)"
                } else {
                    ""
                };
                return Some((key, format!("expected an integer >= {min}{why}, got {v}")));
            }
        }
        if let Some(b) = self.beta.filter(|b| !(b.is_finite() && *b >= 0.0)) {
            return Some(("beta", format!("expected a number >= 0, got {b}")));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon < 1.0) {
            return Some((
                "epsilon",
                format!(
                    "expected a number in (0, 1) (the ratio's lower bound is 1 - epsilon), got {}",
                    self.epsilon
                ),
            ));
        }
        if let Some(e) = self.epsilon_high.filter(|e| !(e.is_finite() && *e > 0.0)) {
            return Some(("epsilon_high", format!("expected a number > 0, got {e}")));
        }
        if let Some(problem) = self.loss_knob_problem() {
            return Some(problem);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Some((
                "temperature",
                format!("expected a number > 0, got {}", self.temperature),
            ));
        }
        if let Some((lo, hi)) = self.reward_clip_range
            && !(lo.is_finite() && hi.is_finite() && lo < hi)
        {
            return Some((
                "reward_clip_range",
                format!("expected [low, high] with low < high, got [{lo}, {hi}]"),
            ));
        }
        None
    }
}

impl GroupRlOptions {
    /// The first of GRPO's loss knobs (TRL's names) holding a value the loss cannot use.
    fn loss_knob_problem(&self) -> Option<(&'static str, String)> {
        if self.loss_type == LossType::Cispo {
            let cap = self.epsilon_high.unwrap_or(self.epsilon);
            if cap <= 1.0 {
                return Some((
                    "epsilon_high",
                    format!(
                        "loss_type cispo caps the ratio itself at epsilon_high, so it must be > 1, got {cap}\nhint: ScaleRL recommends epsilon_high: 5.0"
                    ),
                ));
            }
        }
        let positive = [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
            ("vespo_lambda_pos", self.vespo_lambda_pos),
            ("vespo_lambda_neg", self.vespo_lambda_neg),
        ];
        let non_negative = [
            ("vespo_k_pos", Some(self.vespo_k_pos)),
            ("vespo_k_neg", Some(self.vespo_k_neg)),
            ("off_policy_mask_threshold", self.off_policy_mask_threshold),
        ];
        if let Some((key, v)) = positive
            .into_iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
        {
            return Some((key, format!("expected a number > 0, got {v}")));
        }
        if let Some((key, Some(v))) = non_negative
            .into_iter()
            .find(|(_, v)| v.is_some_and(|v| !(v.is_finite() && v >= 0.0)))
        {
            return Some((key, format!("expected a number >= 0, got {v}")));
        }
        if let Some(d) = self.delta.filter(|d| !(d.is_finite() && *d > 1.0)) {
            return Some((
                "delta",
                format!(
                    "expected a number > 1 (it caps the importance ratio; TRL recommends more than 1 + epsilon), got {d}"
                ),
            ));
        }
        if !self.entropy_coef.is_finite() {
            return Some((
                "entropy_coef",
                format!("expected a finite number, got {}", self.entropy_coef),
            ));
        }
        let q = self.top_entropy_quantile;
        if !(q.is_finite() && (0.0..=1.0).contains(&q)) {
            return Some((
                "top_entropy_quantile",
                format!("expected a number in [0, 1] (1 keeps every token), got {q}"),
            ));
        }
        None
    }
}

/// LoRA options as a user writes them; `None` in [`PolicyTrainOptions::lora`] trains all weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<String>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

impl LoraOptions {
    pub fn to_config(&self, base_model: Option<String>) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.targets.clone(),
            base_model,
        }
    }
}

/// Everything a policy run needs besides its data and directories.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyTrainOptions {
    pub algo: PolicyAlgo,
    /// DPO / KTO β.
    pub beta: f64,
    /// Conservative DPO ε.
    pub label_smoothing: f64,
    /// Use the IPO loss instead of the sigmoid DPO loss.
    pub ipo: bool,
    /// KTO λ_D and λ_U.
    pub kto_desirable_weight: f64,
    pub kto_undesirable_weight: f64,
    pub lr: f64,
    /// Optimiser steps; `None`: `epochs` passes over the data (DPO/KTO). PPO needs steps.
    pub max_steps: Option<u64>,
    pub epochs: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_prompt_len: usize,
    pub max_completion_len: usize,
    /// Global gradient-norm clip (TRL: 1.0).
    pub max_grad_norm: Option<f64>,
    pub lora: Option<LoraOptions>,
    /// Stop with an error when the KL to the reference (per sequence, nats) passes this.
    pub kl_ceiling: f64,
    pub ppo: PpoOptions,
    pub grpo: GroupRlOptions,
    /// The online objectives' reward: score, aspect weights and rules (`policy.reward`).
    pub reward: crate::train::policy_reward::RewardOptions,
    /// Held-out prompts answered by candidate and production in the evaluation.
    pub eval_prompts: usize,
    /// Greedy evaluation answers (else sampled with `seed`).
    pub eval_greedy: bool,
    pub checkpoint_every: u64,
    pub seed: u64,
    /// `cpu`, `cuda:N` (a build with the `cuda` feature) or `auto` (see [`crate::train::device`]).
    pub device: String,
    /// `policy.precision`: `bf16` holds the frozen weights (LoRA base, reference policy) in bf16
    /// and runs the big products in bf16; trainable weights and optimiser state stay f32.
    pub precision: PrecisionChoice,
    /// `policy.gradient_checkpointing`: decoder layers keep no activations and run again in
    /// backward (CPU; deterministic layers, so no LoRA dropout).
    pub gradient_checkpointing: bool,
}

impl Default for PolicyTrainOptions {
    fn default() -> Self {
        Self {
            algo: PolicyAlgo::Dpo,
            beta: 0.1,
            label_smoothing: 0.0,
            ipo: false,
            kto_desirable_weight: 1.0,
            kto_undesirable_weight: 1.0,
            lr: 1e-6,
            max_steps: None,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            max_prompt_len: 256,
            max_completion_len: 128,
            max_grad_norm: Some(1.0),
            lora: Some(LoraOptions::default()),
            kl_ceiling: 50.0,
            ppo: PpoOptions::default(),
            grpo: GroupRlOptions::default(),
            reward: crate::train::policy_reward::RewardOptions::default(),
            eval_prompts: 16,
            eval_greedy: true,
            checkpoint_every: 50,
            seed: 42,
            device: "cpu".into(),
            precision: PrecisionChoice::F32,
            gradient_checkpointing: false,
        }
    }
}

impl PolicyTrainOptions {
    /// Rejects values no loop can run with, naming the field.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("policy option {name} must be a positive number, got {v}");
            }
            Ok(())
        };
        pos("beta", self.beta)?;
        pos("lr", self.lr)?;
        pos("kl_ceiling", self.kl_ceiling)?;
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("max_prompt_len", self.max_prompt_len),
            ("max_completion_len", self.max_completion_len),
            ("ppo.rollouts_per_step", self.ppo.rollouts_per_step),
            ("ppo.ppo_epochs", self.ppo.ppo_epochs),
            ("ppo.num_minibatches", self.ppo.num_minibatches),
        ] {
            if v == 0 {
                bail!("policy option {name} must be at least 1, got 0");
            }
        }
        if !self
            .ppo
            .rollouts_per_step
            .is_multiple_of(self.ppo.num_minibatches)
        {
            bail!(
                "ppo.rollouts_per_step ({}) is not a multiple of ppo.num_minibatches ({})\nhint: pick a divisor",
                self.ppo.rollouts_per_step,
                self.ppo.num_minibatches
            );
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            bail!("policy options need max_steps or epochs ≥ 1");
        }
        if self.reward.step_weight != 0.0 && !self.algo.takes_step_rewards() {
            bail!(
                "policy.reward.step_weight is {} but {} takes no step rewards (they enter the per-token advantage of the critic-free algorithms: grpo, rloo)\nhint: use --algo grpo or --algo rloo, or set policy.reward.step_weight to 0",
                self.reward.step_weight,
                self.algo.as_str()
            );
        }
        if self.algo.is_online() && self.max_steps.is_none() {
            bail!(
                "{} needs max_steps\nhint: set max_steps (an online algorithm has no epochs over a fixed set)",
                self.algo.as_str()
            );
        }
        if matches!(self.algo, PolicyAlgo::Grpo | PolicyAlgo::Rloo) {
            self.grpo.validate()?;
        }
        Ok(())
    }

    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(crate::train::device::DeviceChoice::Auto.open()?),
            d => {
                let n: usize = d
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .with_context(|| {
                        format!("unknown device {d:?}\nhint: use auto, cpu or cuda:0")
                    })?;
                Ok(Device::new_cuda(n)?)
            }
        }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        }
    }

    /// The engine settings of a policy run over `examples` examples: a constant learning rate,
    /// `batch_size × grad_accum` examples a step in `batch_size` micro-batches (PPO: the rollouts
    /// of a step, one minibatch per micro-batch), `max_steps` or `epochs` passes over the data.
    pub fn engine(&self, examples: usize) -> EngineConfig {
        let (examples_per_step, micro_batch, order) = match self.algo {
            PolicyAlgo::Ppo => (
                self.ppo.rollouts_per_step,
                self.ppo.rollouts_per_step / self.ppo.num_minibatches.max(1),
                DataOrder::Stream,
            ),
            // A step's prompts; the objective's updates index their completions, scored
            // `batch_size` at a time.
            PolicyAlgo::Grpo | PolicyAlgo::Rloo => (
                self.grpo.prompts_per_step,
                self.batch_size,
                DataOrder::Stream,
            ),
            PolicyAlgo::Dpo | PolicyAlgo::Kto => (
                self.batch_size * self.grad_accum,
                self.batch_size,
                DataOrder::Epochs,
            ),
        };
        let steps_per_epoch = examples.div_ceil(examples_per_step.max(1)) as u64;
        let total_steps = self.max_steps.unwrap_or(self.epochs * steps_per_epoch);
        EngineConfig {
            seed: self.seed,
            total_steps,
            examples_per_step,
            micro_batch: micro_batch.max(1),
            order,
            schedule: Schedule {
                peak_lr: self.lr,
                min_lr: 0.0,
                warmup_steps: 0,
                total_steps,
                decay: Decay::Constant,
            },
            adamw: self.adamw(),
            max_grad_norm: self.max_grad_norm,
            checkpoint_every: self.checkpoint_every,
            kl_ceiling: Some(self.kl_ceiling),
            control: RunControl::default(),
        }
    }
}

/// What every sampling objective (PPO, GRPO, RLOO) checks first: valid options (a step count
/// included) and at least one prompt.
pub fn check_sampling_inputs(opts: &PolicyTrainOptions, prompts: &[String]) -> Result<()> {
    opts.validate()?;
    if prompts.is_empty() {
        bail!(
            "no prompts to sample {} answers for\nhint: the feedback store has no prompts yet",
            opts.algo.as_str()
        );
    }
    Ok(())
}

/// Runs an objective that samples with the policy (PPO, GRPO, RLOO) on the engine over
/// `examples` prompts, and leaves the policy in evaluation mode however the run ends.
pub fn run_sampling_objective<O: Objective>(
    objective: &mut O,
    policy: &Policy,
    opts: &PolicyTrainOptions,
    examples: usize,
    out: &Path,
) -> Result<TrainOutcome> {
    let outcome = crate::train::engine::run(objective, &policy.varmap, &opts.engine(examples), out);
    policy.set_training(false);
    outcome
}

/// The dtype `precision` holds frozen projections in.
pub fn frozen_dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// The tokenizer of the policy in `dir`, with the padding and end ids its `config` names.
pub fn policy_tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path).with_context(|| {
        format!(
            "policy tokenizer {}\nhint: the policy directory needs tokenizer.json",
            tok_path.display()
        )
    })?;
    let eos = config.eos_token_ids().first().copied();
    Ok(tokenizer.with_special_ids(config.pad_token_id.or(eos), eos))
}

/// The model being trained, its frozen reference and what the optimiser sees.
pub struct Policy {
    pub model: LlamaForCausalLM,
    pub reference: LlamaForCausalLM,
    /// Trainable variables only (LoRA A/B, or every weight), plus any heads a trainer adds.
    pub varmap: VarMap,
    pub lora: Option<LoraAdapters>,
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    pub base_dir: PathBuf,
    /// What `policy.precision` holds the frozen projections in.
    frozen: DType,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("base_dir", &self.base_dir)
            .field("lora", &self.lora)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Loads the HF causal LM in `dir` (with `tokenizer.json`) and prepares it for training,
    /// every weight in f32.
    pub fn load(
        dir: &Path,
        lora: Option<&LoraOptions>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::load_in(dir, lora, seed, device, Precision::F32)
    }

    /// [`Self::load`] with the frozen weights in `precision`: with bf16, the LoRA base (shared
    /// with the reference) or the whole reference policy holds its projections in bf16; the
    /// trainable weights stay f32 either way.
    pub fn load_in(
        dir: &Path,
        lora: Option<&LoraOptions>,
        seed: u64,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let frozen = frozen_dtype(precision);
        let config = LlamaConfig::from_dir(dir)?;
        let tokenizer = policy_tokenizer(dir, &config)?;
        let varmap = VarMap::new();
        let (model, reference, adapters) = match lora {
            Some(l) => {
                let base = load_frozen_causal_lm_in(dir, device, frozen)?;
                // Shares the weight buffers with `base`: the reference costs no memory.
                let reference = base.clone();
                let mut model = base;
                let cfg = l.to_config(Some(dir.display().to_string()));
                let adapters = attach_lora(&mut model, &cfg, &varmap, LoraInit::Fresh { seed })?;
                (model, reference, Some(adapters))
            }
            None => {
                let p = LlamaForCausalLM::load(dir, device)?;
                let reference = load_frozen_causal_lm_in(dir, device, frozen)?;
                let data = p
                    .varmap
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?;
                let mut mine = varmap
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?;
                for (k, v) in data.iter() {
                    mine.insert(k.clone(), v.clone());
                }
                drop(mine);
                drop(data);
                (p.model, reference, None)
            }
        };
        Ok(Self {
            model,
            reference,
            varmap,
            lora: adapters,
            config,
            tokenizer,
            base_dir: dir.to_path_buf(),
            frozen,
        })
    }

    /// The dtype the frozen models' projections are held in (the reference, the LoRA base, the
    /// reward model that scores rollouts).
    pub fn frozen_dtype(&self) -> DType {
        self.frozen
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.config.eos_token_ids()
    }

    pub fn pad_id(&self) -> u32 {
        self.config
            .pad_token_id
            .or_else(|| self.eos_ids().first().copied())
            .unwrap_or(0)
    }

    /// Switches LoRA dropout (training on, generation/scoring off).
    pub fn set_training(&self, on: bool) {
        if let Some(l) = &self.lora {
            l.set_training(on);
        }
    }

    /// Writes the trained policy to `out`: a PEFT adapter directory (`out/adapter`) with LoRA,
    /// else HF weights; the config, tokenizer files and chat template are copied so `out` loads
    /// on its own.
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        match &self.lora {
            Some(l) => {
                // Only the adapter variables (a PPO value head stays out of the adapter).
                l.save_peft(&out.join("adapter"), &self.varmap)?;
                self.config
                    .save(out, &Architecture::CausalLm.class_name(&self.config))?;
            }
            None => {
                let vm = VarMap::new();
                {
                    let src = self
                        .varmap
                        .data()
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?;
                    let mut dst = vm.data().lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                    for (k, v) in src.iter().filter(|(k, _)| !k.starts_with(VALUE_HEAD)) {
                        dst.insert(k.clone(), v.clone());
                    }
                }
                save_pretrained(out, &self.config, &vm, Architecture::CausalLm)?;
            }
        }
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "generation_config.json",
        ] {
            let src = self.base_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, out.join(f))
                    .with_context(|| format!("copying {} to {}", src.display(), out.display()))?;
            }
        }
        Ok(())
    }
}

/// Variable-name prefix of the PPO value head (kept out of saved policies).
pub const VALUE_HEAD: &str = "value_head";

/// One prompt + completion, tokenised: `ids = prompt ++ completion`, the completion ending in
/// EOS unless it was cut at `max_completion_len`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenised {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

/// Tokenises `prompt` (kept to its last `max_prompt_len` tokens, as TRL truncates prompts from
/// the left) and `completion` (+ EOS, cut to `max_completion_len`).
pub fn tokenise_pair(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    eos: Option<u32>,
    max_prompt_len: usize,
    max_completion_len: usize,
) -> Result<Tokenised> {
    let mut p = tok.encode(prompt, false)?;
    if p.len() > max_prompt_len {
        p.drain(..p.len() - max_prompt_len);
    }
    if p.is_empty() {
        // The first completion token needs a position to be predicted from.
        p.push(eos.unwrap_or(0));
    }
    let mut c = tok.encode(completion, false)?;
    if let Some(e) = eos {
        c.push(e);
    }
    c.truncate(max_completion_len);
    if c.is_empty() {
        bail!("completion {completion:?} has no tokens\nhint: drop empty answers from the dataset");
    }
    let prompt_len = p.len();
    p.extend(c);
    Ok(Tokenised { ids: p, prompt_len })
}

/// Right-padded `(input_ids, attention_mask, completion_mask)` `[B, T]` for rows of tokens.
pub fn batch_tensors(
    rows: &[&Tokenised],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = vec![pad; b * t];
    let mut att = vec![0u32; b * t];
    let mut tgt = vec![0u32; b * t];
    for (i, r) in rows.iter().enumerate() {
        for (j, &x) in r.ids.iter().enumerate() {
            ids[i * t + j] = x;
            att[i * t + j] = 1;
            tgt[i * t + j] = u32::from(j >= r.prompt_len);
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, t), device)?,
        Tensor::from_vec(att, (b, t), device)?,
        Tensor::from_vec(tgt, (b, t), device)?,
    ))
}

/// Sequence log-probs `[B]` of the completion tokens of `rows` under `model`.
pub fn sequence_logps(model: &LlamaForCausalLM, rows: &[&Tokenised], pad: u32) -> Result<Tensor> {
    let dev = model.lm_head_weight().device();
    let (ids, att, tgt) = batch_tensors(rows, pad, dev)?;
    Ok(model.sequence_logprobs(&ids, Some(&att), &tgt)?)
}

/// [`sequence_logps`] under the frozen reference, detached, in chunks of `chunk` rows.
pub fn reference_logps(
    reference: &LlamaForCausalLM,
    rows: &[&Tokenised],
    pad: u32,
    chunk: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len());
    for c in rows.chunks(chunk.max(1)) {
        out.extend(
            sequence_logps(reference, c, pad)?
                .detach()
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// Mean of a 1-d tensor as f64.
pub fn mean_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// Per-row sums of `[B, T]` as f64.
pub fn row_sums(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.sum(D::Minus1)?.to_vec1::<f64>()?)
}
