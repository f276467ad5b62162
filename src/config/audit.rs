//! The `audit:` section (docs/feedback-audit.md): the per-user influence cap, burst detection
//! and the agreement-based label smoothing, validated into
//! [`crate::dataset::audit::AuditSettings`].

use serde::Deserialize;

use super::Invalid;
use super::values::PositiveInt;
use crate::dataset::audit::{AuditSettings, BurstSettings};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub enabled: Option<bool>,
    /// Largest share of the training signal one user may supply, in (0, 1].
    pub max_user_share: Option<f64>,
    #[serde(default)]
    pub burst: RawBurst,
    /// Burst ids (`burst-…`, from the report) a person has looked at and released.
    #[serde(default)]
    pub cleared_bursts: Vec<String>,
    pub apply_label_smoothing: Option<bool>,
    pub min_agreement_pairs: Option<PositiveInt>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBurst {
    pub window_minutes: Option<PositiveInt>,
    pub min_votes: Option<PositiveInt>,
    pub max_users: Option<PositiveInt>,
    /// A user first seen less than this many days before a vote is "new" (0: nobody is).
    pub new_user_days: Option<super::values::NonNegativeInt>,
}

pub fn validate_audit(raw: RawAudit) -> Result<AuditSettings, Invalid> {
    let d = AuditSettings::default();
    let max_user_share = match raw.max_user_share {
        None => d.max_user_share,
        Some(v) if v.is_finite() && v > 0.0 && v <= 1.0 => v,
        Some(v) => {
            return Err(Invalid::new(
                "audit.max_user_share",
                format!(
                    "expected a share in (0, 1], got {v}\nhint: 0.2 lets no user supply more than a fifth of the training signal; 1 turns the cap off"
                ),
            ));
        }
    };
    for id in &raw.cleared_bursts {
        let ok = id
            .strip_prefix("burst-")
            .is_some_and(|hex| hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(Invalid::new(
                "audit.cleared_bursts",
                format!(
                    "{:?} is not a burst id\nhint: copy the id (`burst-` and 12 hex digits) from the report's Integrity section",
                    crate::sanitize::truncate(id, 40)
                ),
            ));
        }
    }
    let b = BurstSettings::default();
    Ok(AuditSettings {
        enabled: raw.enabled.unwrap_or(d.enabled),
        max_user_share,
        burst: BurstSettings {
            window_minutes: raw.burst.window_minutes.map_or(b.window_minutes, |v| v.0),
            min_votes: raw.burst.min_votes.map_or(b.min_votes, |v| v.0),
            max_users: raw.burst.max_users.map_or(b.max_users, |v| v.0),
            new_user_days: raw.burst.new_user_days.map_or(b.new_user_days, |v| v.0),
        },
        cleared_bursts: raw.cleared_bursts,
        apply_label_smoothing: raw.apply_label_smoothing.unwrap_or(d.apply_label_smoothing),
        min_agreement_pairs: raw
            .min_agreement_pairs
            .map_or(d.min_agreement_pairs, |v| v.0),
    })
}
