//! The `train:` section: where the training stage runs (`backend: local`, the default, or
//! `ray`: a job on an existing Ray cluster, docs/ray.md) and, for Ray, the cluster, the job's
//! entrypoint and what its runtime environment pins. Validates into
//! [`crate::train::ray::TrainBackend`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::Invalid;
use super::fields::{env_name, http_url};
use crate::train::ray::{EntrypointKind, RaySettings, TrainBackend};

/// `train:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    /// `local` (default) or `ray`.
    pub backend: Option<String>,
    pub ray: Option<RawRay>,
}

/// `train.ray:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRay {
    /// The head's dashboard URL, e.g. `http://ray-head:8265`.
    pub address: Option<String>,
    pub token_env: Option<String>,
    /// `openrlhf`, `trl` or `rlhf-bot`.
    pub entrypoint: Option<String>,
    #[serde(default)]
    pub runtime_env: RawRuntimeEnv,
    #[serde(default)]
    pub forward_env: Vec<String>,
    pub rlhf_bot_command: Option<String>,
    pub num_gpus: Option<f64>,
    pub num_cpus: Option<f64>,
    pub gpus_per_node: Option<u32>,
    #[serde(default)]
    pub extra_args: Vec<String>,
    pub poll_first_secs: Option<f64>,
    pub poll_max_secs: Option<f64>,
    pub max_attempts: Option<u32>,
    pub request_timeout_secs: Option<f64>,
}

/// `train.ray.runtime_env:` (Ray's own keys, the ones we pass on).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntimeEnv {
    /// Missing: refused for `openrlhf`/`trl`; an explicit `[]`: the nodes' image already has the
    /// trainers installed (pinned there), so the job installs nothing.
    pub pip: Option<Vec<String>>,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
}

fn variable_name(key: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            key,
            format!("{name:?} is not an environment variable name (letters, digits and _)"),
        ))
    }
}

fn seconds(key: &str, value: Option<f64>, default: Duration) -> Result<Duration, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
        Some(v) => Err(Invalid::new(
            key,
            format!(
                "expected seconds in (0, 86400], got {v}\nhint: e.g. {}",
                default.as_secs_f64()
            ),
        )),
    }
}

fn resources(key: &str, value: Option<f64>, default: f64) -> Result<f64, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Some(v) => Err(Invalid::new(
            key,
            format!("expected a number >= 0, got {v}"),
        )),
    }
}

/// A pip requirement that names one version: `name==1.2.3`, or a URL / VCS reference pinned
/// with `@`.
fn pinned(requirement: &str) -> bool {
    requirement.contains("==") || requirement.contains(" @ ") || requirement.contains("@git+")
}

pub fn validate_train(raw: RawTrain) -> Result<TrainBackend, Invalid> {
    let ray = raw.ray.map(validate_ray).transpose()?;
    match raw.backend.as_deref().unwrap_or("local") {
        "local" => Ok(TrainBackend::Local),
        "ray" => ray.map(|r| TrainBackend::Ray(Box::new(r))).ok_or_else(|| {
            Invalid::new(
                "train.ray",
                "`train.backend: ray` needs a `train.ray` section\nhint: at least `address: http://HEAD:8265` and `entrypoint: openrlhf|trl|rlhf-bot` (docs/ray.md)",
            )
        }),
        other => Err(Invalid::new(
            "train.backend",
            format!("unknown backend {other:?}\nhint: `local` (default) or `ray`"),
        )),
    }
}

fn validate_ray(raw: RawRay) -> Result<RaySettings, Invalid> {
    let address = raw.address.ok_or_else(|| {
        Invalid::new(
            "train.ray.address",
            "missing\nhint: the head's dashboard URL, where the Jobs API is served, e.g. `http://ray-head:8265`",
        )
    })?;
    let address = http_url("train.ray.address", &address, "train.ray.token_env")?;
    let entrypoint = match raw.entrypoint.as_deref() {
        None => {
            return Err(Invalid::new(
                "train.ray.entrypoint",
                format!(
                    "missing\nhint: one of {}: what the cluster job runs (docs/ray.md)",
                    EntrypointKind::NAMES
                ),
            ));
        }
        Some(text) => EntrypointKind::parse(text).ok_or_else(|| {
            Invalid::new(
                "train.ray.entrypoint",
                format!(
                    "unknown entrypoint {text:?}\nhint: one of {}",
                    EntrypointKind::NAMES
                ),
            )
        })?,
    };
    let mut ray = RaySettings::new(address, entrypoint);
    ray.token_env = raw
        .token_env
        .map(|n| env_name("train.ray.token_env", n, "RAY_AUTH_TOKEN"))
        .transpose()?;
    if entrypoint != EntrypointKind::RlhfBot && raw.runtime_env.pip.is_none() {
        return Err(Invalid::new(
            "train.ray.runtime_env.pip",
            format!(
                "the `{}` entrypoint needs its packages pinned here\nhint: e.g. {}, or `pip: []` when the nodes' image already has them (docs/ray.md)",
                entrypoint.as_str(),
                match entrypoint {
                    EntrypointKind::Openrlhf => "[\"openrlhf==0.10.1\", \"awscli==1.42.70\"]",
                    _ => "[\"trl==1.16.0\", \"awscli==1.42.70\"]",
                }
            ),
        ));
    }
    let pip = raw.runtime_env.pip.unwrap_or_default();
    for requirement in &pip {
        if !pinned(requirement) {
            return Err(Invalid::new(
                "train.ray.runtime_env.pip",
                format!(
                    "{requirement:?} is not pinned to one version\nhint: write `NAME==VERSION` so a new release cannot change the job silently"
                ),
            ));
        }
    }
    for name in raw.runtime_env.env_vars.keys() {
        variable_name("train.ray.runtime_env.env_vars", name)?;
    }
    for name in &raw.forward_env {
        variable_name("train.ray.forward_env", name)?;
    }
    if let Some(token_env) = &ray.token_env
        && raw.forward_env.contains(token_env)
    {
        return Err(Invalid::new(
            "train.ray.forward_env",
            format!(
                "{token_env} is the cluster token's variable; forwarding it would show the token to anyone who can list the cluster's jobs\nhint: remove it from forward_env"
            ),
        ));
    }
    ray.pip = pip;
    ray.env_vars = raw.runtime_env.env_vars;
    ray.forward_env = raw.forward_env;
    if let Some(command) = raw.rlhf_bot_command {
        if command.trim().is_empty() {
            return Err(Invalid::new(
                "train.ray.rlhf_bot_command",
                "empty\nhint: the path of rlhf-bot on the cluster's nodes, e.g. `/opt/rlhf-bot/bin/rlhf-bot`",
            ));
        }
        ray.rlhf_bot_command = command;
    }
    ray.num_gpus = resources("train.ray.num_gpus", raw.num_gpus, ray.num_gpus)?;
    ray.num_cpus = resources("train.ray.num_cpus", raw.num_cpus, ray.num_cpus)?;
    if let Some(g) = raw.gpus_per_node {
        if g == 0 {
            return Err(Invalid::new(
                "train.ray.gpus_per_node",
                "expected at least 1\nhint: the GPUs DeepSpeed uses on each node",
            ));
        }
        ray.gpus_per_node = g;
    }
    ray.extra_args = raw.extra_args;
    ray.poll_first = seconds(
        "train.ray.poll_first_secs",
        raw.poll_first_secs,
        ray.poll_first,
    )?;
    ray.poll_max = seconds("train.ray.poll_max_secs", raw.poll_max_secs, ray.poll_max)?;
    if ray.poll_max < ray.poll_first {
        return Err(Invalid::new(
            "train.ray.poll_max_secs",
            format!(
                "{} is below poll_first_secs ({})",
                ray.poll_max.as_secs_f64(),
                ray.poll_first.as_secs_f64()
            ),
        ));
    }
    ray.request_timeout = seconds(
        "train.ray.request_timeout_secs",
        raw.request_timeout_secs,
        ray.request_timeout,
    )?;
    if let Some(n) = raw.max_attempts {
        if n == 0 || n > 20 {
            return Err(Invalid::new(
                "train.ray.max_attempts",
                format!("expected 1 to 20, got {n}"),
            ));
        }
        ray.max_attempts = n;
    }
    Ok(ray)
}
