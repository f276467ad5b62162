//! The `policy:` section: validated into [`PolicySettings`], which maps onto the trainers'
//! [`PolicyTrainOptions`]. Two defaults depend on the algorithm (the learning rate and, for PPO,
//! the step count), and `--algo` may change the algorithm after the file was read, so those two
//! stay optional here and [`PolicySettings::options_for`] fills them for the algorithm that runs.

use std::path::PathBuf;

use serde::Serialize;

use super::Invalid;
use super::raw::{RawLora, RawPolicy, RawPpo};
use crate::run::outputs::PolicyAlgo;
use crate::train::device::DeviceChoice;
use crate::train::policy_common::{LoraOptions, PolicyTrainOptions, PpoOptions};

/// TRL's DPO/KTO learning rate.
pub const DEFAULT_PREFERENCE_LR: f64 = 1e-6;
/// TRL's PPO learning rate (the N+ implementation details).
pub const DEFAULT_PPO_LR: f64 = 3e-6;
/// PPO has no epochs over a fixed set; without `steps` it runs this many.
pub const DEFAULT_PPO_STEPS: u64 = 100;

/// The linear layers of a llama-family decoder that LoRA can adapt.
pub const LORA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySettings {
    /// `run` trains a policy after the reward model.
    pub enabled: bool,
    /// HF causal-LM directory or `.gguf` file; `None`: a tiny llama from scratch.
    pub model: Option<PathBuf>,
    /// The base model's public id for serving exports (`export-model`): PEFT's
    /// `base_model_name_or_path`, the GGUF's `general.name`.
    pub base_model_id: Option<String>,
    pub production_model: Option<PathBuf>,
    /// `None`: use the model's chat template when it has one.
    pub chat_template: Option<bool>,
    /// Write `policy/merged/` (adapter folded into full HF weights) after a LoRA run.
    pub merge: bool,
    pub device: DeviceChoice,
    /// `None`: the algorithm's default ([`DEFAULT_PREFERENCE_LR`], [`DEFAULT_PPO_LR`]).
    pub lr: Option<f64>,
    /// `None`: `epochs` for DPO/KTO, [`DEFAULT_PPO_STEPS`] for PPO.
    pub steps: Option<u64>,
    /// Everything else, with `algo` as configured.
    pub options: PolicyTrainOptions,
}

impl PolicySettings {
    /// The trainer options for `algo` (the configured one unless `--algo` overrides it).
    pub fn options_for(&self, algo: PolicyAlgo) -> PolicyTrainOptions {
        let mut o = self.options.clone();
        o.algo = algo;
        o.lr = self.lr.unwrap_or(match algo {
            PolicyAlgo::Ppo => DEFAULT_PPO_LR,
            PolicyAlgo::Dpo | PolicyAlgo::Kto | PolicyAlgo::Grpo | PolicyAlgo::Rloo => {
                DEFAULT_PREFERENCE_LR
            }
        });
        o.max_steps = match (self.steps, algo) {
            (Some(s), _) => Some(s),
            (None, a) if a.is_online() => Some(DEFAULT_PPO_STEPS),
            (None, _) => None,
        };
        o
    }
}

/// `key` must be a finite number inside `ok`; `what` completes "expected ...".
fn number(
    key: &str,
    value: Option<f64>,
    default: f64,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<f64, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && ok(v) => Ok(v),
        Some(v) => Err(Invalid::new(key, format!("expected {what}, got {v}"))),
    }
}

fn positive(key: &str, value: Option<f64>, default: f64) -> Result<f64, Invalid> {
    number(key, value, default, "a number > 0", |v| v > 0.0)
}

pub fn validate_policy(raw: RawPolicy) -> Result<PolicySettings, Invalid> {
    let d = PolicyTrainOptions::default();
    let device = match raw.device.as_deref() {
        None => DeviceChoice::default(),
        Some(s) => s
            .parse::<DeviceChoice>()
            .map_err(|e| Invalid::new("policy.device", e.to_string()))?,
    };
    let lr = raw
        .lr
        .map(|v| positive("policy.lr", Some(v), v))
        .transpose()?;
    let lora = validate_lora(&raw.lora)?;
    let gradient_checkpointing = raw.gradient_checkpointing.unwrap_or(false);
    if let Some(l) = lora
        .as_ref()
        .filter(|l| gradient_checkpointing && l.dropout > 0.0)
    {
        // A recomputed layer must repeat its first run exactly; a new dropout mask would not.
        return Err(Invalid::new(
            "policy.gradient_checkpointing",
            format!(
                "recomputing layers needs deterministic layers, but lora.dropout is {}
hint:                  set policy.lora.dropout: 0, or gradient_checkpointing: false",
                l.dropout
            ),
        ));
    }
    let ppo = validate_ppo(&raw.ppo)?;
    if let Some((key, message)) = raw.grpo.problem() {
        return Err(Invalid::new(&format!("policy.grpo.{key}"), message));
    }
    if let Some((key, message)) = raw.reward.problem() {
        return Err(Invalid::new(&format!("policy.reward.{key}"), message));
    }
    let options = PolicyTrainOptions {
        algo: raw.algo.unwrap_or(PolicyAlgo::Dpo),
        beta: positive("policy.beta", raw.beta, d.beta)?,
        label_smoothing: number(
            "policy.label_smoothing",
            raw.label_smoothing,
            d.label_smoothing,
            "a number in [0, 0.5)",
            |v| (0.0..0.5).contains(&v),
        )?,
        ipo: raw.ipo.unwrap_or(d.ipo),
        kto_desirable_weight: positive(
            "policy.kto_desirable_weight",
            raw.kto_desirable_weight,
            d.kto_desirable_weight,
        )?,
        kto_undesirable_weight: positive(
            "policy.kto_undesirable_weight",
            raw.kto_undesirable_weight,
            d.kto_undesirable_weight,
        )?,
        lr: lr.unwrap_or(d.lr),
        max_steps: raw.steps.map(|s| s.0),
        epochs: raw.epochs.map_or(d.epochs, |e| e.0),
        batch_size: raw.batch_size.map_or(d.batch_size, |v| v.0 as usize),
        grad_accum: raw.grad_accum.map_or(d.grad_accum, |v| v.0 as usize),
        max_prompt_len: raw
            .max_prompt_length
            .map_or(d.max_prompt_len, |v| v.0 as usize),
        max_completion_len: raw
            .max_completion_length
            .map_or(d.max_completion_len, |v| v.0 as usize),
        max_grad_norm: match raw.max_grad_norm {
            None => d.max_grad_norm,
            Some(v) => Some(positive("policy.max_grad_norm", Some(v), v)?),
        },
        lora,
        kl_ceiling: positive("policy.kl_ceiling", raw.kl_ceiling, d.kl_ceiling)?,
        ppo,
        grpo: raw.grpo,
        reward: raw.reward,
        eval_prompts: raw.eval_prompts.map_or(d.eval_prompts, |v| v.0 as usize),
        eval_greedy: raw.eval_greedy.unwrap_or(d.eval_greedy),
        checkpoint_every: raw.checkpoint_every.map_or(d.checkpoint_every, |v| v.0),
        seed: raw.seed.map_or(d.seed, |v| v.0),
        device: device_string(device),
        precision: match raw.precision.as_deref() {
            None => d.precision,
            Some(p) => p
                .parse()
                .map_err(|e| Invalid::new("policy.precision", format!("{e}")))?,
        },
        gradient_checkpointing,
    };
    let model = raw
        .model
        .as_deref()
        .map(|v| super::models::model_path("policy.model", v))
        .transpose()?;
    // A Hub base model's public id is its repository id: PEFT exports name it without help.
    let hub_id = model
        .as_deref()
        .and_then(crate::hub::HubModelRef::from_path)
        .and_then(Result::ok)
        .map(|m| m.repo);
    Ok(PolicySettings {
        enabled: raw.enabled.unwrap_or(false),
        model,
        base_model_id: match raw.base_model_id {
            Some(id) if id.trim().is_empty() || id.contains(char::is_whitespace) => {
                return Err(Invalid::new(
                    "policy.base_model_id",
                    format!(
                        "expected a model id such as HuggingFaceTB/SmolLM2-135M-Instruct, got {id:?}"
                    ),
                ));
            }
            other => other.or(hub_id),
        },
        production_model: raw
            .production_model
            .as_deref()
            .map(|v| super::models::model_path("policy.production_model", v))
            .transpose()?,
        chat_template: raw.chat_template,
        merge: raw.lora.merge.unwrap_or(false),
        device,
        lr,
        steps: raw.steps.map(|s| s.0),
        options,
    })
}

/// The device as [`PolicyTrainOptions::device`] spells it.
pub fn device_string(device: DeviceChoice) -> String {
    match device {
        DeviceChoice::Auto => "auto".into(),
        DeviceChoice::Cpu => "cpu".into(),
        DeviceChoice::Cuda => "cuda:0".into(),
    }
}

fn validate_lora(raw: &RawLora) -> Result<Option<LoraOptions>, Invalid> {
    let d = LoraOptions::default();
    if raw.enabled == Some(false) {
        if raw.merge == Some(true) {
            return Err(Invalid::new(
                "policy.lora.merge",
                "there is no adapter to merge when `lora.enabled: false` (full weights are written anyway)\nhint: remove `merge` or enable LoRA",
            ));
        }
        return Ok(None);
    }
    let targets = match &raw.target_modules {
        None => d.targets,
        Some(t) if t.is_empty() => {
            return Err(Invalid::new(
                "policy.lora.target_modules",
                format!(
                    "expected at least one module name\nhint: pick from {}",
                    LORA_TARGETS.join(", ")
                ),
            ));
        }
        Some(t) => {
            if let Some(bad) = t.iter().find(|m| !LORA_TARGETS.contains(&m.as_str())) {
                return Err(Invalid::new(
                    "policy.lora.target_modules",
                    format!(
                        "{bad:?} is not a linear layer of a llama-family decoder\nhint: pick from {}",
                        LORA_TARGETS.join(", ")
                    ),
                ));
            }
            t.clone()
        }
    };
    Ok(Some(LoraOptions {
        r: raw.r.map_or(d.r, |v| v.0 as usize),
        alpha: positive("policy.lora.alpha", raw.alpha, d.alpha)?,
        dropout: number(
            "policy.lora.dropout",
            raw.dropout,
            f64::from(d.dropout),
            "a number in [0, 1)",
            |v| (0.0..1.0).contains(&v),
        )? as f32,
        targets,
    }))
}

fn validate_ppo(raw: &RawPpo) -> Result<PpoOptions, Invalid> {
    let d = PpoOptions::default();
    let unit = |key: &str, v: Option<f64>, default: f64, open_low: bool| {
        number(
            key,
            v,
            default,
            if open_low {
                "a number in (0, 1]"
            } else {
                "a number in [0, 1]"
            },
            |x| x <= 1.0 && if open_low { x > 0.0 } else { x >= 0.0 },
        )
    };
    let o = PpoOptions {
        rollouts_per_step: raw
            .rollouts_per_step
            .map_or(d.rollouts_per_step, |v| v.0 as usize),
        ppo_epochs: raw.ppo_epochs.map_or(d.ppo_epochs, |v| v.0 as usize),
        num_minibatches: raw
            .num_minibatches
            .map_or(d.num_minibatches, |v| v.0 as usize),
        cliprange: positive("policy.ppo.cliprange", raw.cliprange, d.cliprange)?,
        cliprange_value: positive(
            "policy.ppo.cliprange_value",
            raw.cliprange_value,
            d.cliprange_value,
        )?,
        vf_coef: number(
            "policy.ppo.vf_coef",
            raw.vf_coef,
            d.vf_coef,
            "a number >= 0",
            |v| v >= 0.0,
        )?,
        gamma: unit("policy.ppo.gamma", raw.gamma, d.gamma, true)?,
        lam: unit("policy.ppo.lam", raw.lam, d.lam, false)?,
        kl_coef: number(
            "policy.ppo.kl_coef",
            raw.kl_coef,
            d.kl_coef,
            "a number >= 0",
            |v| v >= 0.0,
        )?,
        adaptive_kl: raw.adaptive_kl.unwrap_or(d.adaptive_kl),
        adaptive_kl_init: positive(
            "policy.ppo.adaptive_kl_init",
            raw.adaptive_kl_init,
            d.adaptive_kl_init,
        )?,
        adaptive_kl_target: positive(
            "policy.ppo.adaptive_kl_target",
            raw.adaptive_kl_target,
            d.adaptive_kl_target,
        )?,
        adaptive_kl_horizon: positive(
            "policy.ppo.adaptive_kl_horizon",
            raw.adaptive_kl_horizon,
            d.adaptive_kl_horizon,
        )?,
        missing_eos_penalty: number(
            "policy.ppo.missing_eos_penalty",
            raw.missing_eos_penalty,
            d.missing_eos_penalty,
            "a finite number",
            |_| true,
        )?,
        whiten_rewards: raw.whiten_rewards.unwrap_or(d.whiten_rewards),
        temperature: positive(
            "policy.ppo.temperature",
            raw.temperature,
            f64::from(d.temperature),
        )? as f32,
    };
    if !o.rollouts_per_step.is_multiple_of(o.num_minibatches) {
        return Err(Invalid::new(
            "policy.ppo.num_minibatches",
            format!(
                "rollouts_per_step ({}) is not a multiple of num_minibatches ({})\nhint: pick a divisor of rollouts_per_step",
                o.rollouts_per_step, o.num_minibatches
            ),
        ));
    }
    Ok(o)
}
