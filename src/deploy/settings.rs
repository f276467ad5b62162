//! What `rlhf-bot deploy` runs on, as validated from the config's `deploy:` section
//! (`config::deploy` does the validating): the formats per kind, how many versions to keep, and
//! whom to tell. The types live with the deploy code so that it needs nothing from `config`.

use std::time::Duration;

use serde::Serialize;

use super::ServingFormat;
use crate::model_kind::ModelKind;

pub const DEFAULT_KEEP: usize = 3;
pub const DEFAULT_WEBHOOK_SECRET_ENV: &str = "RLHF_DEPLOY_WEBHOOK_SECRET";
pub const DEFAULT_DISPATCH_TOKEN_ENV: &str = "RLHF_DISPATCH_TOKEN";
pub const DEFAULT_DISPATCH_EVENT: &str = "rlhf-model-deployed";
pub const DEFAULT_HUB_TOKEN_ENV: &str = "HF_TOKEN";
pub const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";
pub const DEFAULT_HUB_REVISION: &str = "main";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploySettings {
    pub policy_formats: Vec<ServingFormat>,
    pub reward_formats: Vec<ServingFormat>,
    /// Versions kept per kind, the live one included (at least 1).
    pub keep: usize,
    pub webhook: Option<WebhookSettings>,
    pub repository_dispatch: Option<DispatchSettings>,
    pub hub: Option<HubSettings>,
}

impl Default for DeploySettings {
    fn default() -> Self {
        Self {
            policy_formats: vec![ServingFormat::Hf],
            reward_formats: vec![ServingFormat::Hf],
            keep: DEFAULT_KEEP,
            webhook: None,
            repository_dispatch: None,
            hub: None,
        }
    }
}

impl DeploySettings {
    /// The formats published for `kind` (empty: that kind is not deployed).
    pub fn formats(&self, kind: ModelKind) -> &[ServingFormat] {
        match kind {
            ModelKind::Policy => &self.policy_formats,
            ModelKind::Reward => &self.reward_formats,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookSettings {
    /// Printed (`config check`) with any query replaced by `***`: receivers often carry a token
    /// there.
    #[serde(serialize_with = "url_without_query")]
    pub url: url::Url,
    /// The variable's name; the secret is read when notifying and never printed.
    pub secret_env: String,
    pub max_attempts: u32,
    pub timeout_secs: u64,
}

impl WebhookSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

fn url_without_query<S: serde::Serializer>(url: &url::Url, s: S) -> Result<S::Ok, S::Error> {
    let mut shown = url.clone();
    if shown.query().is_some() {
        shown.set_query(Some("***"));
    }
    shown.set_fragment(None);
    s.serialize_str(shown.as_str())
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DispatchSettings {
    pub api_url: String,
    pub owner: String,
    pub repo: String,
    pub event_type: String,
    /// The variable's name; the token is read when notifying and never printed.
    pub token_env: String,
}

/// `deploy.hub`: where the production model of `kind` is committed on a Hugging Face Hub.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HubSettings {
    /// The Hub's base URL without a trailing `/` (`https://huggingface.co`).
    pub endpoint: String,
    /// `owner/name` of an existing model repository.
    pub repo: String,
    /// The branch committed to.
    pub revision: String,
    /// The variable's name; the token is read when pushing and never printed.
    pub token_env: String,
    pub kind: ModelKind,
}
