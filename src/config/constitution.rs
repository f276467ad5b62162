//! The `constitution:` section (docs/constitution.md): the principles file, who critiques
//! (`policy` or `judge`), the judge endpoint (the `evals.judge` shape), and the weight of the
//! pairs in the dataset; validated into [`crate::constitution::ConstitutionSettings`].

use serde::Deserialize;

use super::Invalid;
use super::evals::{RawJudge, validate_judge_source};
use super::values::{NonNegative, NonNegativeInt, PositiveInt};
use crate::constitution::{ConstitutionSettings, CriticKind};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConstitution {
    /// The principles file (default `principles.yaml`).
    pub principles: Option<String>,
    /// `policy` (default) or `judge`.
    pub critic: Option<String>,
    pub judge: Option<RawJudge>,
    pub weight: Option<NonNegative>,
    pub seed: Option<NonNegativeInt>,
    pub max_new_tokens: Option<PositiveInt>,
    pub limit: Option<PositiveInt>,
}

pub fn validate_constitution(raw: RawConstitution) -> Result<ConstitutionSettings, Invalid> {
    let d = ConstitutionSettings::default();
    let critic = match raw.critic.as_deref() {
        None | Some("policy") => CriticKind::Policy,
        Some("judge") => CriticKind::Judge,
        Some(other) => {
            return Err(Invalid::new(
                "constitution.critic",
                format!(
                    "unknown critic {other:?}\nhint: `policy` (the policy critiques and revises its own answers) or `judge` (the endpoint of `constitution.judge`)"
                ),
            ));
        }
    };
    let judge = raw
        .judge
        .map(|j| validate_judge_source("constitution.judge", j))
        .transpose()?;
    if critic == CriticKind::Judge && judge.is_none() {
        return Err(Invalid::new(
            "constitution.critic",
            "`judge` needs a judge endpoint\nhint: set `constitution.judge.url` and `constitution.judge.model` (an OpenAI-compatible API), or `constitution.judge.checkpoint` (a local model), or use `critic: policy`",
        ));
    }
    Ok(ConstitutionSettings {
        principles: raw
            .principles
            .map_or(d.principles, std::path::PathBuf::from),
        critic,
        judge,
        weight: raw.weight.map_or(d.weight, |w| w.0),
        seed: raw.seed.map_or(d.seed, |s| s.0),
        max_new_tokens: raw
            .max_new_tokens
            .map_or(d.max_new_tokens, |v| v.0 as usize),
        limit: raw.limit.map_or(d.limit, |v| v.0 as usize),
    })
}
