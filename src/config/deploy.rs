//! The `deploy:` section: which serving formats `rlhf-bot deploy` publishes per model kind, how
//! many versions stay in the artifact store, whom it tells (a signed webhook, a
//! `repository_dispatch`), and which Hugging Face Hub repository receives a model. Validated here
//! so that a format that cannot apply to a kind (a GGUF of a reward model) is a config error
//! before anything is exported or uploaded.

use super::Invalid;
use super::fields::{env_name, http_url, owner_repo};
use super::raw::{RawDeploy, RawDispatch, RawHub, RawWebhook};
use crate::deploy::ServingFormat;
use crate::model_kind::ModelKind;

pub use crate::deploy::settings::{
    DEFAULT_DISPATCH_EVENT, DEFAULT_DISPATCH_TOKEN_ENV, DEFAULT_HUB_ENDPOINT, DEFAULT_HUB_REVISION,
    DEFAULT_HUB_TOKEN_ENV, DEFAULT_KEEP, DEFAULT_WEBHOOK_SECRET_ENV, DeploySettings,
    DispatchSettings, HubSettings, WebhookSettings,
};

/// `github_api` is `publish.github.api_url` when set: a dispatch goes to the same GitHub.
pub fn validate_deploy(
    raw: RawDeploy,
    github_api: Option<&str>,
) -> Result<DeploySettings, Invalid> {
    let defaults = DeploySettings::default();
    let policy_formats = match raw.formats.policy {
        Some(names) => formats("deploy.formats.policy", ModelKind::Policy, names)?,
        None => defaults.policy_formats,
    };
    let reward_formats = match raw.formats.reward {
        Some(names) => formats("deploy.formats.reward", ModelKind::Reward, names)?,
        None => defaults.reward_formats,
    };
    let keep = raw.keep.map_or(DEFAULT_KEEP, |k| k.0.min(1000) as usize);
    Ok(DeploySettings {
        policy_formats,
        reward_formats,
        keep,
        webhook: raw.webhook.map(webhook).transpose()?,
        repository_dispatch: raw
            .repository_dispatch
            .map(|d| dispatch(d, github_api))
            .transpose()?,
        hub: raw.hub.map(hub).transpose()?,
    })
}

fn hub(h: RawHub) -> Result<HubSettings, Invalid> {
    owner_repo("deploy.hub.repo", &h.repo)?;
    let endpoint = h.endpoint.unwrap_or_else(|| DEFAULT_HUB_ENDPOINT.into());
    http_url("deploy.hub.endpoint", &endpoint, "deploy.hub.token_env")?;
    let revision = h.revision.unwrap_or_else(|| DEFAULT_HUB_REVISION.into());
    // A branch name as git allows it, kept to what needs no quoting beyond `/`.
    let revision_ok = !revision.is_empty()
        && !revision.contains("..")
        && !revision.starts_with('/')
        && !revision.ends_with('/')
        && revision
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !revision_ok {
        return Err(Invalid::new(
            "deploy.hub.revision",
            format!(
                "{revision:?} is not a usable branch name\nhint: letters, digits and -_./, e.g. {DEFAULT_HUB_REVISION}"
            ),
        ));
    }
    let kind = match h.kind.as_deref() {
        None | Some("policy") => ModelKind::Policy,
        Some("reward") => ModelKind::Reward,
        Some(other) => {
            return Err(Invalid::new(
                "deploy.hub.kind",
                format!("{other:?} is not a model kind\nhint: policy (the default) or reward"),
            ));
        }
    };
    let token_env = env_name(
        "deploy.hub.token_env",
        h.token_env.unwrap_or_else(|| DEFAULT_HUB_TOKEN_ENV.into()),
        DEFAULT_HUB_TOKEN_ENV,
    )?;
    Ok(HubSettings {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        repo: h.repo,
        revision,
        token_env,
        kind,
    })
}

fn formats(key: &str, kind: ModelKind, names: Vec<String>) -> Result<Vec<ServingFormat>, Invalid> {
    let mut out: Vec<ServingFormat> = Vec::with_capacity(names.len());
    for name in names {
        let format: ServingFormat = name.parse().map_err(|e: String| Invalid::new(key, e))?;
        if !format.applies_to(kind) {
            return Err(Invalid::new(
                key,
                format!(
                    "`{format}` does not apply to a {kind} model: a reward model is served only as `hf` (Hugging Face layout)\nhint: list `{format}` under deploy.formats.policy, and only `hf` (or nothing) under deploy.formats.reward"
                ),
            ));
        }
        if !out.contains(&format) {
            out.push(format);
        }
    }
    out.sort();
    Ok(out)
}

fn webhook(w: RawWebhook) -> Result<WebhookSettings, Invalid> {
    let url = http_url("deploy.webhook.url", &w.url, "deploy.webhook.secret_env")?;
    let secret_env = env_name(
        "deploy.webhook.secret_env",
        w.secret_env
            .unwrap_or_else(|| DEFAULT_WEBHOOK_SECRET_ENV.into()),
        DEFAULT_WEBHOOK_SECRET_ENV,
    )?;
    Ok(WebhookSettings {
        url,
        secret_env,
        max_attempts: w.max_attempts.map_or(5, |a| a.0.min(20) as u32),
        timeout_secs: w.timeout_secs.map_or(30, |t| t.0),
    })
}

fn dispatch(d: RawDispatch, github_api: Option<&str>) -> Result<DispatchSettings, Invalid> {
    let (owner, repo) = owner_repo("deploy.repository_dispatch.repo", &d.repo)?;
    let event_type = d
        .event_type
        .unwrap_or_else(|| DEFAULT_DISPATCH_EVENT.into());
    // GitHub limits event types to 100 characters; keep them to a plain alphabet.
    let event_ok = !event_type.is_empty()
        && event_type.len() <= 100
        && event_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if !event_ok {
        return Err(Invalid::new(
            "deploy.repository_dispatch.event_type",
            format!(
                "{event_type:?} is not a usable event type\nhint: 1-100 letters, digits and -_.:/, e.g. {DEFAULT_DISPATCH_EVENT}"
            ),
        ));
    }
    let token_env = env_name(
        "deploy.repository_dispatch.token_env",
        d.token_env
            .unwrap_or_else(|| DEFAULT_DISPATCH_TOKEN_ENV.into()),
        DEFAULT_DISPATCH_TOKEN_ENV,
    )?;
    let api_url = d
        .api_url
        .or_else(|| github_api.map(str::to_string))
        .unwrap_or_else(|| crate::forge::github::DEFAULT_API_URL.into());
    http_url(
        "deploy.repository_dispatch.api_url",
        &api_url,
        "deploy.repository_dispatch.token_env",
    )?;
    Ok(DispatchSettings {
        api_url: api_url.trim_end_matches('/').to_string(),
        owner: owner.to_string(),
        repo: repo.to_string(),
        event_type,
        token_env,
    })
}
