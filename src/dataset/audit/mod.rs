//! The feedback audit: before training, check that the feedback can be trusted, say what was
//! found, and act on it (docs/feedback-audit.md).
//!
//! - `influence`: the per-user influence cap. The dataset builder applies it (excess weight is
//!   scaled down, never dropped) and counts what it did in `DatasetStats::influence`.
//! - `burst`: many negative votes on one model version in a short window from few or new users.
//!   Flagged in the report; their votes are held out of the quality trigger (`check`) until a
//!   person lists the burst id in `audit.cleared_bursts`.
//! - `agreement`: how often raters of the same answer agree, the label flip rate that implies,
//!   and the DPO `label_smoothing` it suggests (applied when `audit.apply_label_smoothing`).
//!
//! Everything that leaves this module is counts, rates and burst ids: user ids are only ever
//! held in memory while scanning, never logged, reported or written.

pub mod agreement;
pub mod burst;
pub mod influence;

use std::collections::HashSet;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::feedback::Store;
use crate::feedback::record::FeedbackRecord;
pub use agreement::AgreementSummary;
pub use burst::{Burst, BurstReason, BurstSettings};
pub use influence::InfluenceSummary;

/// `audit:` in the config, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditSettings {
    /// Off: no cap, no burst hold-out, no Integrity section.
    pub enabled: bool,
    /// The influence cap (also copied into `DatasetOptions::max_user_share`, where it acts).
    pub max_user_share: f64,
    pub burst: BurstSettings,
    /// Burst ids a person has looked at: their votes count in the quality trigger again.
    pub cleared_bursts: Vec<String>,
    /// Train DPO with the suggested `label_smoothing` instead of `policy.label_smoothing`.
    pub apply_label_smoothing: bool,
    /// Label pairs needed before a smoothing is suggested (fewer give too wide an interval).
    pub min_agreement_pairs: u64,
}

/// 0.2: one person (or one compromised account) supplies at most a fifth of the signal, so the
/// other users together always outweigh them four to one; in a deployment with dozens of active
/// users nobody comes near a fifth by ordinary use (on the bundled sample of 61 users the
/// largest share is about 3%), so the cap only touches outliers. Below five contributors the cap
/// cannot hold and becomes "equal shares" (see `influence`).
pub const DEFAULT_MAX_USER_SHARE: f64 = 0.2;

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_user_share: DEFAULT_MAX_USER_SHARE,
            burst: BurstSettings::default(),
            cleared_bursts: Vec::new(),
            apply_label_smoothing: false,
            min_agreement_pairs: 20,
        }
    }
}

/// Bursts and agreement from one pass over the records.
#[derive(Debug, Default)]
pub struct Scan {
    bursts: burst::BurstScan,
    agreement: agreement::AgreementScan,
}

impl Scan {
    pub fn add(&mut self, record: &FeedbackRecord) {
        self.bursts.add(record);
        self.agreement.add(record);
    }

    /// Bursts first: their held votes are left out of the agreement.
    pub fn finish(self, settings: &AuditSettings) -> (Vec<Burst>, AgreementSummary) {
        let bursts = self
            .bursts
            .finish(&settings.burst, &settings.cleared_bursts);
        let held: HashSet<&str> = bursts
            .iter()
            .flat_map(|b| b.held_ids())
            .map(String::as_str)
            .collect();
        let agreement = self.agreement.finish(settings.min_agreement_pairs, &held);
        (bursts, agreement)
    }
}

/// Feeds every live record of the store to `scan`.
fn scan_with<S>(store: &Store, mut scan: S, add: impl Fn(&mut S, &FeedbackRecord)) -> Result<S> {
    store.for_each_record(|record| {
        add(&mut scan, &record);
        Ok(())
    })?;
    Ok(scan)
}

/// Scans every live record of the store for bursts and rater agreement.
pub fn scan_store(
    store: &Store,
    settings: &AuditSettings,
) -> Result<(Vec<Burst>, AgreementSummary)> {
    Ok(scan_with(store, Scan::default(), Scan::add)?.finish(settings))
}

/// Only the bursts (what `check` needs; keeps no per-answer labels in memory).
pub fn bursts_in_store(store: &Store, settings: &AuditSettings) -> Result<Vec<Burst>> {
    Ok(
        scan_with(store, burst::BurstScan::default(), burst::BurstScan::add)?
            .finish(&settings.burst, &settings.cleared_bursts),
    )
}

/// The report's Integrity section: what the audit found, in counts only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IntegritySummary {
    /// The influence cap as the dataset builder applied it (absent when the cap is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influence: Option<InfluenceSummary>,
    #[serde(default)]
    pub bursts: Vec<Burst>,
    pub agreement: AgreementSummary,
    /// The `label_smoothing` DPO trained with when the audit applied its suggestion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_label_smoothing: Option<f64>,
}

impl IntegritySummary {
    /// Bursts whose votes are still held out of the quality trigger.
    pub fn held_bursts(&self) -> impl Iterator<Item = &Burst> {
        self.bursts.iter().filter(|b| !b.cleared)
    }
}

/// Audits the store: builds the dataset as training does (for the influence cap's real numbers)
/// and scans for bursts and agreement.
pub fn integrity(
    store: &Store,
    dataset: &super::DatasetOptions,
    settings: &AuditSettings,
) -> Result<IntegritySummary> {
    let built = super::build_from_store(store, dataset)?;
    let (bursts, agreement) = scan_store(store, settings)?;
    let applied_label_smoothing = if settings.apply_label_smoothing {
        agreement.suggested_label_smoothing
    } else {
        None
    };
    Ok(IntegritySummary {
        influence: built.stats.influence,
        bursts,
        agreement,
        applied_label_smoothing,
    })
}
