//! The policy stage as users meet it (`train policy`, and `run` after the reward model): turns
//! the `policy:` settings plus flags into a [`TrainPolicyRequest`], finding what the flags leave
//! out — the base model (a directory, a `.gguf` converted once, or the tiny default built from
//! scratch), the reward model (the newest run's, else production's), the data (the store's
//! dataset, written as TRL JSONL into the run directory) and the production policy — and, after
//! training, folds the LoRA adapter into full weights when `lora.merge` asks for it.
//! Models reach this stage in several shapes; `app::model_dir` reduces each to a plain Hugging
//! Face directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::Serialize;

pub use crate::app::model_dir::{
    ModelDir, find_model_dir, has_weights, is_gguf, merged_weights, resolve_model_dir, write_merged,
};
use crate::app::model_source::localize_opt;
use crate::app::train_policy::{PolicyRunSummary, TrainPolicyRequest, train_policy};
use crate::cli::Algo;
use crate::config::Settings;
use crate::dataset::examples::Examples;
use crate::feedback::Store;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::model::llama::{Architecture, LlamaForCausalLM};
use crate::registry::{ModelKind, Registry};
use crate::run::outputs::PolicyAlgo;
use crate::train::device::DeviceChoice;
use crate::train::policy_common::PolicyTrainOptions;
use crate::train::reward_models::{DEFAULT_TOKENIZER_JSON, default_llama_config, seeded_init};

pub fn algo_of(a: Algo) -> PolicyAlgo {
    match a {
        Algo::Dpo => PolicyAlgo::Dpo,
        Algo::Kto => PolicyAlgo::Kto,
        Algo::Ppo => PolicyAlgo::Ppo,
        Algo::Grpo => PolicyAlgo::Grpo,
        Algo::Rloo => PolicyAlgo::Rloo,
    }
}

/// What the caller may set beyond the config (the `train policy` flags; `run` sets a few).
#[derive(Debug, Clone, Default)]
pub struct PolicyOverrides {
    pub algo: Option<PolicyAlgo>,
    pub model: Option<PathBuf>,
    pub reward_model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resume: bool,
    pub device: Option<DeviceChoice>,
    pub steps: Option<u64>,
    pub lr: Option<f64>,
    pub production_model: Option<PathBuf>,
    /// Train on a Ray cluster instead of here (`run` with `train.backend: ray`).
    pub cluster: Option<crate::app::ray_policy::ClusterPolicy>,
}

/// What the stage did, for stdout and the pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStageSummary {
    #[serde(flatten)]
    pub run: PolicyRunSummary,
    pub algo: PolicyAlgo,
    /// The base model's local path (a Hub model's cache snapshot), or `llama-from-scratch`, for
    /// the registry (`model_source::lineage` turns a snapshot back into `hf://…` and its commit).
    pub base_model: String,
    pub reward_model: PathBuf,
    pub data: PathBuf,
    pub production_model: Option<PathBuf>,
    pub merged_dir: Option<PathBuf>,
}

/// Runs the policy stage. `run_dir` is where defaults go (data export, converted models); the
/// output defaults to `run_dir/policy`.
pub async fn run_policy_stage(
    settings: &Settings,
    run_dir: &Path,
    o: PolicyOverrides,
) -> Result<PolicyStageSummary> {
    let ps = &settings.policy;
    let algo = o.algo.unwrap_or(ps.options.algo);
    let mut options = ps.options_for(algo);
    if let Some(s) = o.steps {
        if s == 0 {
            bail!("--steps must be at least 1, got 0");
        }
        options.max_steps = Some(s);
    }
    if let Some(lr) = o.lr {
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr must be a number > 0, got {lr}");
        }
        options.lr = lr;
    }
    if algo == PolicyAlgo::Dpo && o.data.is_none() {
        apply_audited_smoothing(settings, &mut options)?;
    }
    let device = o.device.unwrap_or(ps.device);
    // Opening the device first turns "no CUDA in this build" into an error with a hint, and
    // `auto` into the device the trainer is then told to use (the log says which and why).
    options.device = device.resolve()?.name().to_string();
    options
        .validate()
        .context("invalid policy settings\nhint: see the `policy` section of docs/config.md")?;

    let out = o.out.unwrap_or_else(|| run_dir.join("policy"));
    // Converted or generated models live beside the output, not in it: the output directory is
    // what the registry copies into the artifact store.
    let scratch = sibling(&out, "base");
    // `hf://` references become local snapshot directories here, before anything reads them.
    let reward_model = match localize_opt(o.reward_model).await? {
        Some(p) => {
            if !p.join("config.json").is_file() {
                bail!(
                    "reward model {} has no config.json\nhint: pass the output directory of `rlhf-bot train reward`",
                    p.display()
                );
            }
            p
        }
        None => find_reward_model(settings)?,
    };
    let (base_dir, base_name) = match localize_opt(o.model.or_else(|| ps.model.clone())).await? {
        Some(m) => (resolve_model_dir(&m, &scratch)?, m.display().to_string()),
        None => (
            default_base_model(&scratch, options.seed)?,
            "llama-from-scratch".to_string(),
        ),
    };
    let template = match ps.chat_template {
        Some(false) => None,
        Some(true) => Some(ChatTemplate::from_hf_dir(&base_dir).with_context(|| {
            format!(
                "policy.chat_template is true but {} has no chat template\nhint: set policy.chat_template: false, or use a chat model",
                base_dir.display()
            )
        })?),
        None => ChatTemplate::from_hf_dir(&base_dir).ok(),
    };
    // Behaviour tests (docs/evals.md): loaded before training, so a broken eval file fails fast.
    let eval_cases = crate::evals::load_checked(&settings.evals)?;
    let judge = match &settings.evals.judge {
        Some(j) if eval_cases.iter().any(crate::evals::EvalCase::needs_judge) => {
            Some(crate::evals::judge::Judge::new(j)?)
        }
        _ => None,
    };
    let behaviour_prompts = eval_cases
        .iter()
        .map(|c| render_prompt(template.as_ref(), &c.conversation))
        .collect::<Result<Vec<_>>>()?;
    let data = match o.data {
        Some(d) => {
            if !d.is_file() {
                bail!(
                    "policy data {} does not exist\nhint: pass a TRL JSONL file, or leave --data out to export the store's dataset",
                    d.display()
                );
            }
            d
        }
        None => export_policy_data(settings, &run_dir.join("data"), algo, template.as_ref())?,
    };
    let explicit = localize_opt(o.production_model.or_else(|| ps.production_model.clone())).await?;
    let scratch = sibling(&out, "production");
    let baseline = crate::app::baseline::resolve(
        settings,
        ModelKind::Policy,
        explicit.as_deref(),
        "the base model",
        |dir| resolve_model_dir(&dir, &scratch),
    )?;
    let production_model = baseline.dir.clone();
    tracing::info!(
        algo = algo.as_str(),
        base = %base_dir.display(),
        reward = %reward_model.display(),
        data = %data.display(),
        "training the policy"
    );
    let has_checkpoints = std::fs::read_dir(out.join("checkpoints"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    match (o.resume, has_checkpoints) {
        (false, true) => bail!(
            "{} already holds a policy run's checkpoints\nhint: pass --resume to continue it, or choose another --out",
            out.display()
        ),
        (true, false) => {
            tracing::warn!(out = %out.display(), "--resume: no checkpoint there yet; starting fresh")
        }
        _ => {}
    }
    let req = TrainPolicyRequest {
        base_model: base_dir.clone(),
        reward_model: reward_model.clone(),
        production_model: production_model.clone(),
        data: data.clone(),
        // Data this stage exported is already rendered with the template.
        apply_chat_template: false,
        out: out.clone(),
        options,
        behaviour_prompts,
    };
    let run = match &o.cluster {
        Some(cluster) => {
            crate::app::ray_policy::train_policy_on_ray(settings, cluster, &req).await?
        }
        None => train_policy(req).await?,
    };
    baseline.baseline.write(&out)?;
    if let Some(answers) = &run.behaviour_answers {
        let results = crate::evals::results(
            &eval_cases,
            &answers.candidate,
            Some(answers.production.as_slice()),
            judge.as_ref(),
        )
        .await?;
        results.write(&out)?;
        tracing::info!(
            evals = results.cases.len(),
            required_failures = results.required_failures().count(),
            regressions = results.regressions().count(),
            "behaviour tests done"
        );
    }
    let merged_dir = if ps.merge && run.lora {
        let dir = out.join("merged");
        write_merged(&base_dir, &run.policy_dir.join("adapter"), &dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(PolicyStageSummary {
        run,
        algo,
        base_model: base_name,
        reward_model,
        data,
        production_model,
        merged_dir,
    })
}

/// `dir` with `-suffix` appended to its last component (`runs/x/policy` → `runs/x/policy-base`).
/// With `audit.apply_label_smoothing`, DPO trains with the label flip rate the rater agreement
/// implies (`dataset::audit::agreement`) instead of `policy.label_smoothing`, when there are
/// enough label pairs to estimate it.
fn apply_audited_smoothing(settings: &Settings, options: &mut PolicyTrainOptions) -> Result<()> {
    let audit = &settings.audit;
    if !(audit.enabled && audit.apply_label_smoothing) {
        return Ok(());
    }
    let store = Store::open(&settings.store.dir)?;
    let (_, agreement) = crate::dataset::audit::scan_store(&store, audit)?;
    match agreement.suggested_label_smoothing {
        Some(smoothing) => {
            tracing::info!(
                label_smoothing = smoothing,
                pairs = agreement.rater_pairs + agreement.duplicate_pairs,
                "DPO label_smoothing set from rater agreement (audit.apply_label_smoothing)"
            );
            options.label_smoothing = smoothing;
        }
        None => tracing::info!(
            pairs = agreement.rater_pairs + agreement.duplicate_pairs,
            needed = audit.min_agreement_pairs,
            "too few label pairs to estimate label noise; policy.label_smoothing kept"
        ),
    }
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".into());
    dir.with_file_name(format!("{name}-{suffix}"))
}

/// The default base policy: a tiny llama (the reward default's shape, 2 layers, hidden 64) with
/// the embedded SmolLM2 tokenizer, its weights drawn from `seed`, written as an HF directory.
/// Nothing is downloaded; the same seed gives the same weights, so runs compare like for like.
pub fn default_base_model(dir: &Path, seed: u64) -> Result<PathBuf> {
    if has_weights(dir) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, DEFAULT_TOKENIZER_JSON)
        .with_context(|| format!("writing {}", tok_path.display()))?;
    let tok = crate::model::tokenizer::Tokenizer::from_file(&tok_path)?;
    let mut cfg = default_llama_config(&tok);
    let eos = tok.eos_id();
    cfg.eos_token_id = eos.map(crate::model::llama::TokenIds::One);
    if cfg.pad_token_id.is_none() {
        cfg.pad_token_id = eos;
    }
    let (_model, varmap) = LlamaForCausalLM::random(&cfg, &Device::Cpu)?;
    seeded_init(&varmap, seed, cfg.initializer_range)?;
    crate::model::llama::save_pretrained(dir, &cfg, &varmap, Architecture::CausalLm)?;
    Ok(dir.to_path_buf())
}

/// The newest run's reward model, else the registry's production reward model.
pub fn find_reward_model(settings: &Settings) -> Result<PathBuf> {
    let root = settings.store.dir.join("runs");
    let mut runs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("reward"))
        .filter(|p| p.join("config.json").is_file() && has_weights(p))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    runs.sort();
    if let Some((_, p)) = runs.pop() {
        return Ok(p);
    }
    let registry = Registry::load_or_default(&settings.registry.path)?;
    if let Some(entry) = registry.production(ModelKind::Reward) {
        // Through the store, so a bucket's model is downloaded, and any copy is verified.
        let store = settings.registry.open_artifacts()?;
        return Ok(store.materialize(&entry.artifact)?);
    }
    bail!(
        "no reward model: no run under {} has one and the registry {} has no production reward model\nhint: run `rlhf-bot train reward` first, or pass --reward-model DIR",
        root.display(),
        settings.registry.path.display()
    )
}

/// One exported line: prompt (rendered), plus the algorithm's fields.
#[derive(Serialize)]
struct PolicyLine<'a> {
    prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    chosen: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<bool>,
    /// The example's weight in the loss when not 1 (influence cap, constitution weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<f32>,
}

/// A conversation as the policy sees it: rendered with the chat template when there is one, else
/// in the plain HH style (`Human: … Assistant:`).
pub(crate) fn render_prompt(
    template: Option<&ChatTemplate>,
    msgs: &[crate::feedback::record::ChatMessage],
) -> Result<String> {
    match template {
        Some(t) => {
            let m: Vec<ChatMessage> = msgs
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect();
            Ok(t.render(&m, true)?)
        }
        None => Ok(crate::dataset::render_plain_prompt(msgs)),
    }
}

/// Builds the store's dataset, exports it as TRL JSONL into `dir` (the record of what the run
/// saw) and writes `dir/policy.<algo>.jsonl`, the file the trainer reads: preference pairs for
/// DPO, labelled answers for KTO, distinct prompts for PPO, over both splits (the stage holds
/// out its own evaluation prompts). Prompts are rendered with the chat template when there is
/// one (whole conversations, as the model saw them), else in the plain HH style.
pub fn export_policy_data(
    settings: &Settings,
    dir: &Path,
    algo: PolicyAlgo,
    template: Option<&ChatTemplate>,
) -> Result<PathBuf> {
    let store = Store::open(&settings.store.dir)?;
    let dataset = crate::dataset::build_from_store(&store, &settings.dataset)?;
    crate::dataset::export_with(
        &dataset,
        dir,
        &crate::dataset::ExportOptions {
            conversational: false,
        },
    )?;
    let render = |msgs: &[crate::feedback::record::ChatMessage]| render_prompt(template, msgs);
    // Plain prompts end in "Assistant:", so the answer starts with a space (TRL's standard form).
    let answer = |text: &str| -> String {
        if template.is_some() {
            text.to_string()
        } else {
            format!(" {text}")
        }
    };
    let splits: [&Examples; 2] = [&dataset.train, &dataset.eval];
    let mut lines: Vec<String> = Vec::new();
    match algo {
        PolicyAlgo::Dpo => {
            for p in splits.iter().flat_map(|s| &s.pairs) {
                let (c, r) = (answer(&p.chosen), answer(&p.rejected));
                lines.push(serde_json::to_string(&PolicyLine {
                    prompt: render(&p.prompt)?,
                    chosen: Some(&c),
                    rejected: Some(&r),
                    completion: None,
                    label: None,
                    weight: p.weight,
                })?);
            }
        }
        PolicyAlgo::Kto => {
            for e in splits.iter().flat_map(|s| &s.pointwise) {
                let Some(label) = e.kto_label() else { continue };
                let c = answer(&e.completion);
                lines.push(serde_json::to_string(&PolicyLine {
                    prompt: render(&e.prompt)?,
                    chosen: None,
                    rejected: None,
                    completion: Some(&c),
                    label: Some(label),
                    weight: e.influence,
                })?);
            }
        }
        PolicyAlgo::Ppo | PolicyAlgo::Grpo | PolicyAlgo::Rloo => {
            let mut prompts = BTreeSet::new();
            for s in splits {
                for p in &s.pairs {
                    prompts.insert(render(&p.prompt)?);
                }
                for e in &s.pointwise {
                    prompts.insert(render(&e.prompt)?);
                }
            }
            for prompt in prompts {
                lines.push(serde_json::to_string(&PolicyLine {
                    prompt,
                    chosen: None,
                    rejected: None,
                    completion: None,
                    label: None,
                    weight: None,
                })?);
            }
        }
    }
    if lines.is_empty() {
        let what = match algo {
            PolicyAlgo::Dpo => "preference pairs (answers to one prompt with different feedback)",
            PolicyAlgo::Kto => "answers with a thumb or a rating",
            PolicyAlgo::Ppo | PolicyAlgo::Grpo | PolicyAlgo::Rloo => "prompts",
        };
        bail!(
            "the store yields no {what} for {}\nhint: pull more feedback, or pick another --algo (kto learns from single thumbs)",
            algo.as_str()
        );
    }
    let path = dir.join(format!("policy.{}.jsonl", algo.as_str()));
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `train policy` from the CLI: a new run directory unless `--out` says otherwise.
pub async fn train_policy_cmd(
    settings: &Settings,
    args: crate::cli::TrainPolicyArgs,
) -> Result<PolicyStageSummary> {
    let device = args.run.device.map(crate::cli::DeviceArg::choice);
    let run_dir = match &args.run.out {
        // Exports and conversions go beside an explicit output directory.
        Some(out) => out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        None => crate::run::run_dir(&settings.store.dir, &crate::run::new_run_id()),
    };
    run_policy_stage(
        settings,
        &run_dir,
        PolicyOverrides {
            algo: args.algo.map(algo_of),
            model: args.model,
            reward_model: args.reward_model,
            data: args.data,
            out: args.run.out,
            resume: args.run.resume,
            device,
            steps: args.steps,
            lr: args.lr,
            production_model: args.production_model,
            cluster: None,
        },
    )
    .await
}
