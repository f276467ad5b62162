//! Command-line definitions (clap). Only parsing lives here: `app` turns these into typed
//! requests, so the library never depends on how arguments are spelled.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "rlhf-bot",
    version,
    about = "Turns human feedback on a chat assistant into a better, reviewed model."
)]
pub struct Cli {
    /// The YAML config file.
    #[arg(
        long,
        global = true,
        default_value = "configs/rlhf.yaml",
        env = "RLHF_BOT_CONFIG"
    )]
    pub config: PathBuf,
    /// Output format on stdout (logs always go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pull new feedback from the configured source into the local store.
    Pull,
    /// Decide whether retraining is due, with every reason and its numbers.
    Check(CheckArgs),
    /// Run every stage: pull, check, and (when retraining is due) the later stages.
    Run(RunArgs),
    /// Train models.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Make AI preference pairs from the team's principles (docs/constitution.md): the policy's
    /// answers to stored prompts, critiqued and revised by the policy or the judge.
    Constitution {
        /// At most this many prompts (default `constitution.limit`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Write the pairs to this file for review instead of the store.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Label regenerations that people did not compare, with the judge in both orders
    /// (docs/rlaif.md): first checked against the pairs people did label.
    Rlaif {
        /// At most this many pairs judged (default `rlaif.max_pairs`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_pairs: Option<u64>,
        /// Write the result to this file for review instead of the store.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the dataset built from the store in TRL's JSONL formats (preference, KTO, PRM).
    Export {
        /// Output directory.
        #[arg(long, default_value = "out/dataset")]
        out: PathBuf,
    },
    /// Render the metric report of a run into `<report.dir>/<run-id>/`.
    Report(RunSelect),
    /// Open or update the run's pull request (or write it locally with --dry-run / publish.mode: local).
    Publish(PublishArgs),
    /// Make a registered model version the production one (what merging the bot's PR does); its
    /// artifact is verified first, and the model it replaces is marked `previous`.
    Promote {
        /// The registry id, e.g. reward-20261127-101500.
        id: String,
    },
    /// Give `production` of one kind back to the model marked `previous` (what reverting the
    /// merge of the bot's PR does).
    Rollback {
        /// Which model kind to roll back.
        kind: RegistryKind,
    },
    /// Inspect the model registry.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Inspect or validate the config.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the local feedback store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print a model's continuation of a prompt (a reviewer's quick look at a candidate).
    Generate(GenerateArgs),
    /// Write a trained model in a serving format: merged Hugging Face weights, a PEFT adapter,
    /// or GGUF for llama.cpp/Ollama (docs/serving.md).
    ExportModel(ExportModelArgs),
    /// Publish the registry's production models to the artifact store's `production/` prefix in
    /// the configured serving formats, switch the manifest, and notify serving (docs/serving.md).
    Deploy(DeployArgs),
    /// Run the feedback service: the feedback API (what `pull` reads, what a chat app writes),
    /// its database, health and metrics endpoints (docs/feedback-service.md).
    Serve(ServeArgs),
    /// Write the training dashboard as a static site (GitHub Pages): model versions, KPI
    /// trends, training curves, what is deployed (docs/dashboard.md). `serve` shows it live.
    Dashboard(DashboardArgs),
    /// Copy a directory to or from a bucket prefix with a SHA256SUMS manifest, checked on the
    /// way back (what a Ray training job runs to move its data; docs/ray.md). Credentials and
    /// endpoint come from the provider's environment variables, as for `registry.artifacts`.
    #[command(subcommand)]
    Bucket(BucketCommand),
}

#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// Download the files under URI (`s3://bucket/prefix`, `gs://…`, `az://…`) into DIR, which
    /// must not exist yet; every file is checked against the prefix's SHA256SUMS.
    Get { uri: String, dir: PathBuf },
    /// Upload the files under DIR to URI, the SHA256SUMS manifest last.
    Put { dir: PathBuf, uri: String },
}

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Directory to write `index.html` (and `data.json`) to; created if missing.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Which kinds `deploy` handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeployKind {
    All,
    Reward,
    Policy,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[arg(long, value_enum, default_value_t = DeployKind::All)]
    pub kind: DeployKind,
    /// Verify the artifacts and say what would be published; upload and notify nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// host:port to listen on, instead of `server.listen` (port 0: any free port).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Serve the demo page at /demo with a widget key for this service's own origin; a read
    /// token or write key whose variable is unset is generated and printed (local trials only).
    #[arg(long)]
    pub demo: bool,
}

/// A serving format (`export-model --format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Merged weights in Hugging Face layout (transformers, vLLM, TGI); reward models too.
    Hf,
    /// The LoRA adapter as a PEFT directory (vLLM --enable-lora --lora-modules).
    Peft,
    /// GGUF with f16 matrices (llama.cpp, Ollama).
    #[value(name = "gguf-f16")]
    GgufF16,
    /// GGUF with Q8_0 matrices (llama.cpp, Ollama).
    #[value(name = "gguf-q8_0")]
    GgufQ8_0,
    /// The LoRA adapter as llama.cpp's adapter GGUF (llama.cpp --lora over the base's GGUF).
    #[value(name = "gguf-lora")]
    GgufLora,
}

/// The precision of exported weights (`export-model --dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportDtype {
    Bf16,
    F16,
    F32,
}

#[derive(Debug, Args)]
pub struct ExportModelArgs {
    /// A model directory (`train policy` or `train reward` output, an HF directory), a Hub
    /// model (`hf://ORG/NAME[@REVISION]`), or a registry id (its artifact is verified against
    /// the registry's checksums first).
    #[arg(long)]
    pub model: String,
    /// The serving format. Named `--to` because `--format` is the global text|json switch.
    #[arg(long, value_enum)]
    pub to: ExportFormat,
    /// Output: a directory for `hf` and `peft`; a `.gguf` file (with a `Modelfile` beside it)
    /// or a directory to hold `model.gguf` for the GGUF formats (`adapter.gguf` for gguf-lora).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Weight precision for `hf` (default bf16) and `peft` (default f32, as trained).
    #[arg(long, value_enum)]
    pub dtype: Option<ExportDtype>,
    /// The base model's public id for `peft` (overrides policy.base_model_id).
    #[arg(long)]
    pub base_model_id: Option<String>,
}

/// The policy optimisation algorithm (`--algo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algo {
    Dpo,
    Kto,
    Ppo,
    /// Group-relative policy optimisation: G sampled answers per prompt are each other's baseline.
    Grpo,
    /// REINFORCE leave-one-out: each answer's baseline is the mean reward of the other G-1.
    Rloo,
}

/// `--device`: where training and generation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when this binary has the `cuda` feature and a device answers, else the CPU.
    Auto,
    Cpu,
    /// CUDA device 0; an error (not a fall-back) when unavailable.
    #[value(alias = "gpu")]
    Cuda,
}

impl DeviceArg {
    /// The library's spelling of the choice.
    pub fn choice(self) -> crate::train::device::DeviceChoice {
        use crate::train::device::DeviceChoice;
        match self {
            Self::Auto => DeviceChoice::Auto,
            Self::Cpu => DeviceChoice::Cpu,
            Self::Cuda => DeviceChoice::Cuda,
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Retrain regardless of the thresholds (workflow_dispatch's `force` input).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Retrain regardless of the thresholds.
    #[arg(long)]
    pub force: bool,
    /// Write the would-be pull request locally instead of calling GitHub.
    #[arg(long)]
    pub dry_run: bool,
    /// The policy algorithm (overrides policy.algo; the policy stage runs when policy.enabled).
    #[arg(long, value_enum)]
    pub algo: Option<Algo>,
    /// Where both models train (overrides reward.device and policy.device; default: auto).
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
}

#[derive(Debug, Args)]
pub struct RunSelect {
    /// The run id (a directory under `<store.dir>/runs/`); default: the newest run.
    #[arg(long)]
    pub run: Option<String>,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub select: RunSelect,
    /// Write the would-be pull request locally instead of calling GitHub.
    #[arg(long)]
    pub dry_run: bool,
}

/// A model kind in the registry (`rollback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegistryKind {
    Reward,
    Policy,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Production per kind, the candidates awaiting review, and every model with its status,
    /// aliases, parent and metrics (`--format json` has fixed keys for scripts).
    Show,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print the effective settings (secrets are never printed).
    Check,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Counts by kind and model version, the watermark, tombstones and quarantined inputs.
    Stats,
    /// The current records as JSONL in the API's record shape, sorted by id.
    Dump {
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The quarantined inputs with the reason each was refused, as JSONL.
    Quarantine,
}

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a reward model on the store's feedback (or on a TRL preference file).
    Reward(TrainRewardArgs),
    /// Fine-tune the policy with DPO, KTO or PPO and evaluate it against production.
    Policy(TrainPolicyArgs),
}

/// Where a training command writes, whether it continues, and on which device: the options
/// `train reward` and `train policy` share.
#[derive(Debug, Args)]
pub struct TrainRunArgs {
    /// Output directory; default `<store.dir>/runs/<run-id>/reward` (or `/policy`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Where to train (overrides reward.device / policy.device; default: auto).
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
}

#[derive(Debug, Args)]
pub struct TrainPolicyArgs {
    /// The algorithm; default: policy.algo from the config (dpo when absent).
    #[arg(long, value_enum)]
    pub algo: Option<Algo>,
    /// The base policy: a Hugging Face causal-LM directory, a `.gguf` file or a Hub model
    /// (`hf://ORG/NAME[@REVISION]`); default: policy.model, else a tiny llama from scratch.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The reward model directory (from `train reward`); default: the newest run's `reward/`,
    /// else the registry's production reward model.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// TRL JSONL data (preference pairs for DPO, {prompt, completion, label} for KTO, prompts
    /// for PPO); default: the store's dataset, exported into the run directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub run: TrainRunArgs,
    /// Optimiser steps (overrides policy.steps); at least 1.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Option<u64>,
    /// Learning rate (overrides policy.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// The production policy to compare against; default: policy.production_model, else the
    /// registry's production policy, else the base model.
    #[arg(long)]
    pub production_model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A Hugging Face causal-LM directory, a `.gguf` file, a `train policy` output, or a Hub
    /// model (`hf://ORG/NAME[@REVISION]`, downloaded into the HF cache).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run the model (default: auto).
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
}

#[derive(Debug, Args)]
pub struct TrainRewardArgs {
    /// A Hugging Face checkpoint (encoder or decoder, detected from config.json), local or on
    /// the Hub (`hf://ORG/NAME[@REVISION]`); default: reward.model from the config, else a small
    /// llama trained from scratch.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Preference pairs in TRL's JSONL format instead of the store.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// A fixed held-out set (TRL JSONL); default: a seeded split of the dataset.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: Option<u32>,
    #[arg(long, value_parser = positive)]
    pub max_length: Option<usize>,
    #[arg(long, value_parser = positive)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// Evaluate every N optimiser steps and after the last (0: only after the last);
    /// default: reward.eval_every, else 50.
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[command(flatten)]
    pub run: TrainRunArgs,
    /// The production reward model, scored on the same eval set for comparison.
    #[arg(long)]
    pub production_model: Option<PathBuf>,
}

/// A count that must be at least 1 (clap reports anything else as a usage error, exit 2).
fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}
