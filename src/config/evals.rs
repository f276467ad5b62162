//! The `evals:` section (docs/evals.md): where the golden conversations live and the judge
//! endpoint, validated into [`crate::evals::EvalsSettings`].

use serde::Deserialize;

use super::Invalid;
use super::fields::{env_name, http_url};
use super::values::PositiveInt;
use crate::evals::EvalsSettings;
use crate::evals::judge::{JudgeSettings, JudgeSource, LocalJudgeSettings};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvals {
    /// Directory of `*.yaml` eval files (default `evals`).
    pub dir: Option<String>,
    pub judge: Option<RawJudge>,
}

/// A judge: an OpenAI-compatible endpoint (`url`, `model`, ...) or, where the section allows it,
/// a local checkpoint (`checkpoint`, `max_new_tokens`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJudge {
    /// Base URL of an OpenAI-compatible API (`…/v1`).
    pub url: Option<String>,
    pub model: Option<String>,
    /// The variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    pub timeout_secs: Option<PositiveInt>,
    /// A local llama-family checkpoint: a directory, a `.gguf` file or `hf://ORG/NAME`.
    pub checkpoint: Option<String>,
    /// The longest reply of a local checkpoint, in tokens.
    pub max_new_tokens: Option<PositiveInt>,
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

/// Validates a judge endpoint of the section `section` (`evals.judge`, `constitution.judge`,
/// `rlaif.judge`): every section shares this shape and these checks.
pub fn validate_judge(section: &str, j: RawJudge) -> Result<JudgeSettings, Invalid> {
    let key = |field: &str| format!("{section}.{field}");
    if j.checkpoint.is_some() || j.max_new_tokens.is_some() {
        return Err(Invalid::new(
            &key("checkpoint"),
            "this judge must be an endpoint\nhint: give `url` and `model` of an OpenAI-compatible API; a local checkpoint judges for `constitution` and `rlaif`",
        ));
    }
    let Some(url) = j.url else {
        return Err(Invalid::new(
            &key("url"),
            "missing\nhint: the base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1",
        ));
    };
    let url = http_url(&key("url"), &url, &key("api_key_env"))?;
    let model = j.model.unwrap_or_default();
    if model.trim().is_empty() {
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
        model,
        api_key_env,
        timeout_secs: j.timeout_secs.map_or(60, |v| v.0),
    })
}

/// Validates a judge that may also be a local checkpoint (`constitution.judge`, `rlaif.judge`):
/// `checkpoint` or `url`, not both.
pub fn validate_judge_source(section: &str, j: RawJudge) -> Result<JudgeSource, Invalid> {
    let key = |field: &str| format!("{section}.{field}");
    let Some(checkpoint) = j.checkpoint.clone() else {
        return validate_judge(section, j).map(JudgeSource::Endpoint);
    };
    if j.url.is_some() || j.model.is_some() || j.api_key_env.is_some() || j.timeout_secs.is_some() {
        return Err(Invalid::new(
            &key("checkpoint"),
            "a judge is either a local checkpoint or an endpoint\nhint: keep `checkpoint` (and `max_new_tokens`), or `url`, `model`, `api_key_env` and `timeout_secs`, not both",
        ));
    }
    if checkpoint.trim().is_empty() {
        return Err(Invalid::new(
            &key("checkpoint"),
            "empty path\nhint: a llama-family checkpoint directory, a .gguf file, or hf://ORG/NAME",
        ));
    }
    Ok(JudgeSource::Checkpoint(LocalJudgeSettings {
        checkpoint,
        max_new_tokens: j.max_new_tokens.map_or(64, |v| v.0 as usize),
    }))
}
