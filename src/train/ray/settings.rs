//! What `train.backend` and `train.ray` validate into (`config::train` does the validating).
//! The types live here, with the stage, so `config` depends on `train` and not the reverse.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Where the training stage runs.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum TrainBackend {
    /// On this machine (the default).
    #[default]
    Local,
    /// As a job on an existing Ray cluster.
    Ray(Box<RaySettings>),
}

/// What runs inside the cluster job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntrypointKind {
    /// OpenRLHF: the reward model through its DeepSpeed entrypoint (`openrlhf.cli.train_rm`).
    Openrlhf,
    /// The TRL CLI (`trl reward`, which launches through accelerate).
    Trl,
    /// Our own binary (`rlhf-bot train reward`): CPU-sized jobs, and the tests.
    RlhfBot,
}

impl EntrypointKind {
    pub const NAMES: &'static str = "openrlhf, trl, rlhf-bot";

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "openrlhf" => Some(Self::Openrlhf),
            "trl" => Some(Self::Trl),
            "rlhf-bot" => Some(Self::RlhfBot),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openrlhf => "openrlhf",
            Self::Trl => "trl",
            Self::RlhfBot => "rlhf-bot",
        }
    }
}

/// `train.ray`: the cluster, the job, and how we wait for it.
#[derive(Debug, Clone, Serialize)]
pub struct RaySettings {
    /// The head's dashboard URL (where the Jobs API is served), e.g. `http://head:8265`.
    pub address: url::Url,
    /// The variable holding the cluster's token (`RAY_AUTH_MODE=token` heads); `None`: no
    /// `Authorization` header is sent.
    pub token_env: Option<String>,
    pub entrypoint: EntrypointKind,
    /// `runtime_env.pip`: the packages the job installs, pinned (`openrlhf==0.10.1`, …).
    pub pip: Vec<String>,
    /// `runtime_env.env_vars`: literal values given to the job (never secrets: anyone who can
    /// list the cluster's jobs reads them).
    pub env_vars: BTreeMap<String, String>,
    /// Names of variables copied from this process's environment into the job's (e.g. the
    /// object store's `AWS_ENDPOINT_URL`); same visibility warning as `env_vars`.
    pub forward_env: Vec<String>,
    /// The command that runs our binary on the cluster (`rlhf-bot` entrypoint).
    pub rlhf_bot_command: String,
    /// `entrypoint_num_gpus`: GPUs the entrypoint process reserves (0: CPU).
    pub num_gpus: f64,
    /// `entrypoint_num_cpus`.
    pub num_cpus: f64,
    /// OpenRLHF: GPUs per node DeepSpeed uses (`--num_gpus`).
    pub gpus_per_node: u32,
    /// Words appended to the training command (flags a pinned version wants, LoRA, ZeRO stage).
    pub extra_args: Vec<String>,
    /// First wait between status polls; doubles up to `poll_max`.
    pub poll_first: Duration,
    pub poll_max: Duration,
    /// Attempts for one API request (transport errors and 5xx are retried).
    pub max_attempts: u32,
    /// Timeout of one API request.
    pub request_timeout: Duration,
}

impl RaySettings {
    /// The settings for a head at `address` with every other key at its default.
    pub fn new(address: url::Url, entrypoint: EntrypointKind) -> Self {
        Self {
            address,
            token_env: None,
            entrypoint,
            pip: Vec::new(),
            env_vars: BTreeMap::new(),
            forward_env: Vec::new(),
            rlhf_bot_command: "rlhf-bot".into(),
            num_gpus: 0.0,
            num_cpus: 1.0,
            gpus_per_node: 1,
            extra_args: Vec::new(),
            poll_first: Duration::from_secs(1),
            poll_max: Duration::from_secs(30),
            max_attempts: 5,
            request_timeout: Duration::from_secs(30),
        }
    }
}
