//! KPIs per model version from the store's counts: how many answers got feedback, the share of
//! thumbs up and the mean 1–5 rating, each with a confidence interval so a reader can tell a real
//! difference from noise. Pure functions of counts.

use serde::Serialize;

use crate::feedback::store::VersionCounts;
use crate::stats::{Interval, mean_interval, wilson};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionKpis {
    pub model_version: String,
    /// Feedback records of every kind on this version's answers.
    pub count: u64,
    pub thumbs: u64,
    /// Share of answer-level thumbs that are up (Wilson interval).
    pub positive_rate: Option<Interval>,
    pub ratings: u64,
    /// Mean answer rating on the 1–5 scale (normal interval, clamped to the scale).
    pub mean_rating: Option<Interval>,
}

pub fn version_kpis(counts: &VersionCounts, confidence: f64) -> VersionKpis {
    VersionKpis {
        model_version: counts.model_version.clone(),
        count: counts.records,
        thumbs: counts.thumbs,
        positive_rate: wilson(counts.thumbs_up, counts.thumbs, confidence),
        ratings: counts.ratings,
        mean_rating: mean_interval(
            counts.ratings,
            counts.rating_sum,
            counts.rating_sq_sum,
            confidence,
            1.0,
            5.0,
        ),
    }
}

pub fn all_kpis(counts: &[VersionCounts], confidence: f64) -> Vec<VersionKpis> {
    counts.iter().map(|c| version_kpis(c, confidence)).collect()
}
