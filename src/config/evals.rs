//! The `evals:` section (docs/evals.md): where the golden conversations live and the judge
//! endpoint, validated into [`crate::evals::EvalsSettings`].

use serde::Deserialize;

use super::Invalid;
use super::fields::{env_name, http_url};
use super::values::PositiveInt;
use crate::evals::EvalsSettings;
use crate::evals::judge::JudgeSettings;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvals {
    /// Directory of `*.yaml` eval files (default `evals`).
    pub dir: Option<String>,
    pub judge: Option<RawJudge>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJudge {
    /// Base URL of an OpenAI-compatible API (`…/v1`).
    pub url: String,
    pub model: String,
    /// The variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    pub timeout_secs: Option<PositiveInt>,
}

pub fn validate_evals(raw: RawEvals) -> Result<EvalsSettings, Invalid> {
    let d = EvalsSettings::default();
    Ok(EvalsSettings {
        dir: raw.dir.map_or(d.dir, std::path::PathBuf::from),
        judge: raw
            .judge
            .map(|j| validate_judge("evals.judge", j))
            .transpose()?,
    })
}

/// Validates a judge endpoint of the section `section` (`evals.judge`, `constitution.judge`):
/// both sections share this shape and these checks.
pub fn validate_judge(section: &str, j: RawJudge) -> Result<JudgeSettings, Invalid> {
    let key = |field: &str| format!("{section}.{field}");
    let url = http_url(&key("url"), &j.url, &key("api_key_env"))?;
    if j.model.trim().is_empty() {
        return Err(Invalid::new(
            &key("model"),
            "empty model name\nhint: the model the endpoint serves, e.g. gpt-4o-mini",
        ));
    }
    let api_key_env = j
        .api_key_env
        .map(|v| env_name(&key("api_key_env"), v, "JUDGE_API_KEY"))
        .transpose()?;
    Ok(JudgeSettings {
        url,
        model: j.model,
        api_key_env,
        timeout_secs: j.timeout_secs.map_or(60, |v| v.0),
    })
}
