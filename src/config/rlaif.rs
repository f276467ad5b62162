//! The `rlaif:` section (docs/rlaif.md): whether AI feedback labels regenerations, the judge
//! (an endpoint in the `evals.judge` shape, or a local checkpoint), the weight of its pairs, the
//! agreement floor and the cost cap; validated into [`crate::rlaif::RlaifSettings`].

use serde::Deserialize;

use super::Invalid;
use super::evals::{RawJudge, validate_judge_source};
use super::values::{NonNegative, PositiveInt};
use crate::rlaif::RlaifSettings;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRlaif {
    pub enabled: Option<bool>,
    pub judge: Option<RawJudge>,
    pub weight: Option<NonNegative>,
    /// In [0, 1]; compared with the lower bound of the agreement's 95% interval.
    pub min_agreement: Option<f64>,
    pub allow_unvalidated: Option<bool>,
    pub max_pairs: Option<PositiveInt>,
}

pub fn validate_rlaif(raw: RawRlaif) -> Result<RlaifSettings, Invalid> {
    let d = RlaifSettings::default();
    let enabled = raw.enabled.unwrap_or(d.enabled);
    let judge = raw
        .judge
        .map(|j| validate_judge_source("rlaif.judge", j))
        .transpose()?;
    if enabled && judge.is_none() {
        return Err(Invalid::new(
            "rlaif.judge",
            "`rlaif.enabled: true` needs a judge\nhint: set `rlaif.judge.url` and `rlaif.judge.model` (an OpenAI-compatible API), or `rlaif.judge.checkpoint` (a local model)",
        ));
    }
    let min_agreement = raw.min_agreement.unwrap_or(d.min_agreement);
    if !(0.0..=1.0).contains(&min_agreement) {
        return Err(Invalid::new(
            "rlaif.min_agreement",
            format!(
                "must be in [0, 1], got {min_agreement}\nhint: 0.6 keeps AI labels only when the judge agrees with people on at least 60% of pairs, at 95% confidence"
            ),
        ));
    }
    Ok(RlaifSettings {
        enabled,
        judge,
        weight: raw.weight.map_or(d.weight, |w| w.0),
        min_agreement,
        allow_unvalidated: raw.allow_unvalidated.unwrap_or(d.allow_unvalidated),
        max_pairs: raw.max_pairs.map_or(d.max_pairs, |v| v.0 as usize),
    })
}
