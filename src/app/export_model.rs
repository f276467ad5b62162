//! `rlhf-bot export-model`: finds the model a user names — a directory (`train policy` or `train
//! reward` output, an HF directory) or a registry id, whose artifact is verified against the
//! registry's checksums before anything is read — decides whether it is a policy or a reward
//! model, and hands it to `model::export` in the format asked for. Prints what was written
//! (`--format json`: `{"format", "kind", "out", "files", "base_model_id"}`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cli::{ExportDtype, ExportFormat, ExportModelArgs};
use crate::config::Settings;
use crate::model::export::llama_gguf::{self, GgufEncoding};
use crate::model::export::{CausalLm, WeightDtype, hf, lora_gguf, peft};
use crate::registry::{ModelKind, Registry};

/// What `export-model` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub format: String,
    pub kind: ModelKind,
    pub out: PathBuf,
    pub files: Vec<PathBuf>,
    /// The base id written into a PEFT adapter or a GGUF's `general.name`, when known.
    pub base_model_id: Option<String>,
}

/// `settings` is `None` when no config file exists: then only directories can be exported.
pub fn export_model_cmd(
    settings: Option<&Settings>,
    args: &ExportModelArgs,
) -> Result<ExportSummary> {
    let (dir, registered_kind) = locate(settings, &args.model)?;
    let kind = match registered_kind {
        Some(k) => k,
        None => kind_of(&dir)?,
    };
    export_located(settings, &dir, kind, args)
}

/// Exports the `kind` model in the local directory `dir` (already verified when it came from
/// the registry) as `args` say; `args.model` is not read. `deploy` calls this for each format.
pub fn export_located(
    settings: Option<&Settings>,
    dir: &Path,
    kind: ModelKind,
    args: &ExportModelArgs,
) -> Result<ExportSummary> {
    let dir = dir.to_path_buf();
    let base_model_id = args
        .base_model_id
        .clone()
        .or_else(|| settings.and_then(|s| s.policy.base_model_id.clone()));
    let format_name = clap::ValueEnum::to_possible_value(&args.to)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    let dtype = |default: WeightDtype| match args.dtype {
        None => default,
        Some(ExportDtype::Bf16) => WeightDtype::Bf16,
        Some(ExportDtype::F16) => WeightDtype::F16,
        Some(ExportDtype::F32) => WeightDtype::F32,
    };
    let (out, files, base_model_id) = match (kind, args.to) {
        (ModelKind::Reward, ExportFormat::Hf) => {
            let files = hf::write_reward_model(&dir, dtype(WeightDtype::Bf16), &args.out)?;
            (args.out.clone(), files, None)
        }
        (ModelKind::Reward, other) => bail!(
            "{} is a reward model; only `--format hf` applies to it, not {other:?}\nhint: export the policy for llama.cpp/Ollama, or use --format hf",
            dir.display()
        ),
        (ModelKind::Policy, ExportFormat::Peft) => {
            let adapter = find_adapter(&dir)?;
            let id = match base_model_id.or_else(|| public_base_of(&adapter)) {
                Some(id) => id,
                None => bail!(
                    "the adapter in {} names its base only by a local path\nhint: set policy.base_model_id in the config (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or pass --base-model-id",
                    adapter.display()
                ),
            };
            let files = peft::write_adapter(&adapter, &id, dtype(WeightDtype::F32), &args.out)?;
            (args.out.clone(), files, Some(id))
        }
        (ModelKind::Policy, ExportFormat::Hf) => {
            let lm = load_causal_lm(&dir)?;
            let files = hf::write_causal_lm(&lm, dtype(WeightDtype::Bf16), &args.out)?;
            (args.out.clone(), files, base_model_id)
        }
        (ModelKind::Policy, ExportFormat::GgufF16 | ExportFormat::GgufQ8_0) => {
            if args.dtype.is_some() {
                bail!(
                    "--dtype does not apply to {format_name}: the format fixes its encodings (norms f32, matrices {})\nhint: drop --dtype",
                    if args.to == ExportFormat::GgufF16 {
                        "f16"
                    } else {
                        "Q8_0"
                    }
                );
            }
            let encoding = if args.to == ExportFormat::GgufF16 {
                GgufEncoding::F16
            } else {
                GgufEncoding::Q8_0
            };
            let path = gguf_path(&args.out, "model.gguf");
            let lm = load_causal_lm(&dir)?;
            let name = base_model_id.clone().unwrap_or_else(|| model_name(&dir));
            let files = llama_gguf::write(&lm, encoding, &name, &path)?;
            (path, files, base_model_id)
        }
        (ModelKind::Policy, ExportFormat::GgufLora) => {
            if args.dtype.is_some() {
                bail!(
                    "--dtype does not apply to gguf-lora: the adapter's tensors stay f32\nhint: drop --dtype"
                );
            }
            let adapter = find_adapter(&dir)?;
            let found = crate::app::model_dir::find_model_dir(&dir)?;
            let base = crate::model::llama::LlamaConfig::from_dir(&found.weights)?;
            let path = gguf_path(&args.out, "adapter.gguf");
            let name = base_model_id.clone().unwrap_or_else(|| model_name(&dir));
            let files = lora_gguf::write(&adapter, &base, &name, &path)?;
            (path, files, base_model_id)
        }
    };
    tracing::info!(format = %format_name, out = %out.display(), "model exported");
    Ok(ExportSummary {
        format: format_name,
        kind,
        out,
        files,
        base_model_id,
    })
}

/// `out` itself when it names a `.gguf` file, else `out/<file_name>`.
fn gguf_path(out: &Path, file_name: &str) -> PathBuf {
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        out.to_path_buf()
    } else {
        out.join(file_name)
    }
}

/// A local path wins; otherwise `model` is a registry id whose artifact is verified and made
/// local (a bucket's copy is downloaded) before use.
fn locate(settings: Option<&Settings>, model: &str) -> Result<(PathBuf, Option<ModelKind>)> {
    let path = Path::new(model);
    if path.exists() {
        return Ok((path.to_path_buf(), None));
    }
    let Some(settings) = settings else {
        bail!(
            "{model} is not a directory, and without a config file there is no registry to look it up in\nhint: pass a model directory, or --config with the registry that holds {model}"
        );
    };
    let registry = Registry::load_or_default(&settings.registry.path)?;
    let Some(entry) = registry.get(model) else {
        bail!(
            "{model} is neither a directory nor a model in the registry {}\nhint: `rlhf-bot registry show` lists the registered ids",
            settings.registry.path.display()
        );
    };
    let store = settings.registry.open_artifacts()?;
    let dir = store
        .materialize(&entry.artifact)
        .with_context(|| format!("verifying the artifact of {model}"))?;
    Ok((dir, Some(entry.kind)))
}

/// A reward model says so in its config (a sequence-classification architecture, or this
/// project's BERT reward head); everything else is a policy.
fn kind_of(dir: &Path) -> Result<ModelKind> {
    let config = [dir.join("config.json"), dir.join("policy/config.json")]
        .into_iter()
        .find(|p| p.is_file());
    let Some(config) = config else {
        return Ok(ModelKind::Policy);
    };
    let v = crate::model::export::read_json(&config)?.unwrap_or_default();
    let classifier = v["architectures"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| {
            a.as_str()
                .is_some_and(|a| a.ends_with("ForSequenceClassification"))
        });
    Ok(if classifier || v.get("rlhf_bot_reward").is_some() {
        ModelKind::Reward
    } else {
        ModelKind::Policy
    })
}

/// The policy with any adapter folded in, from a directory `find_model_dir` understands.
fn load_causal_lm(dir: &Path) -> Result<CausalLm> {
    let found = crate::app::model_dir::find_model_dir(dir)?;
    let tensors = match &found.adapter {
        Some(adapter) => crate::app::model_dir::merged_weights(&found.weights, adapter)?,
        None => crate::model::checkpoint_io::read_dir_tensors(
            &found.weights,
            &candle_core::Device::Cpu,
        )?,
    };
    CausalLm::from_parts(&found.weights, tensors, &found.files)
}

/// The PEFT adapter of a policy: the directory itself, `adapter/` or `policy/adapter/`.
fn find_adapter(dir: &Path) -> Result<PathBuf> {
    [dir.to_path_buf(), dir.join("adapter"), dir.join("policy/adapter")]
        .into_iter()
        .find(|d| d.join(crate::model::lora::ADAPTER_CONFIG).is_file())
        .with_context(|| {
            format!(
                "{} holds no LoRA adapter (adapter_config.json)\nhint: the policy was trained with full weights (policy.lora.enabled: false); export it with --format hf",
                dir.display()
            )
        })
}

/// The adapter's recorded base when it already is a public id (not a local path).
fn public_base_of(adapter: &Path) -> Option<String> {
    let (cfg, _) = crate::model::lora::load_peft(adapter).ok()?;
    let base = cfg.base_model?;
    let local =
        Path::new(&base).is_absolute() || Path::new(&base).exists() || base.starts_with('.');
    (!local && base.split('/').count() == 2).then_some(base)
}

/// A name for `general.name` when no base id is configured: the model directory's name.
fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map_or_else(
            || "rlhf-bot-policy".into(),
            |n| n.to_string_lossy().into_owned(),
        )
}
