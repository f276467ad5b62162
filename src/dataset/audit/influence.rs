//! The per-user influence cap: no contributor may supply more than a configured share of the
//! training signal. The signal of a record is the weight the dataset builder gives it (kind
//! weight × source weight); a contributor's share is the sum of their records' weights over the
//! sum of everyone's. Contributors above the cap are scaled down, never dropped: their records
//! still count, with a factor < 1 the dataset builder multiplies into each record's weight.
//!
//! Scaling one contributor down shrinks the total and so raises everyone else's share; the
//! factors are therefore found by water-filling (the heaviest contributors are levelled to a
//! common weight `cap × total-after-capping`). With fewer than `1 / cap` contributors no set of
//! weights can keep everyone under the cap, so the effective cap becomes `1 / contributors`
//! (everyone above it levelled to an equal share): the summary says so.
//!
//! Records without a user id form one anonymous pool that is capped like one user: a flood that
//! leaves the id out must not escape the cap.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Who gave a record, as the cap sees it: a user id, or the anonymous pool (`None`). Only ever
/// held in memory; summaries carry counts, never the ids.
pub type Contributor = Option<String>;

/// Scale factors for the contributors above the cap (everyone else keeps weight 1).
#[derive(Debug, Clone, Default)]
pub struct UserFactors {
    factors: HashMap<Contributor, f64>,
    /// The cap requested in the config.
    pub cap: f64,
    /// The cap actually enforced: `max(cap, 1 / contributors)`.
    pub effective_cap: f64,
    pub contributors: u64,
    /// The largest contributor's share before capping.
    pub largest_share_before: f64,
}

impl UserFactors {
    /// The factor for `who`'s records: 1 for everyone under the cap.
    pub fn of(&self, who: &Contributor) -> f64 {
        self.factors.get(who).copied().unwrap_or(1.0)
    }

    /// How many contributors are scaled down.
    pub fn capped(&self) -> u64 {
        self.factors.len() as u64
    }

    pub fn is_capped(&self, who: &Contributor) -> bool {
        self.factors.contains_key(who)
    }
}

/// Computes the factors from each contributor's total weight. `cap` is in (0, 1]; a cap of 1
/// scales nobody.
pub fn cap_factors(totals: &HashMap<Contributor, f64>, cap: f64) -> UserFactors {
    let mut sorted: Vec<(&Contributor, f64)> = totals
        .iter()
        .filter(|(_, w)| **w > 0.0)
        .map(|(c, w)| (c, *w))
        .collect();
    // Heaviest first; ties broken by id only so the result never depends on hash order.
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let n = sorted.len();
    let total: f64 = sorted.iter().map(|(_, w)| w).sum();
    let mut out = UserFactors {
        cap,
        effective_cap: cap,
        contributors: n as u64,
        largest_share_before: sorted.first().map_or(0.0, |(_, w)| w / total),
        ..Default::default()
    };
    if n == 0 {
        return out;
    }
    let effective = cap.max(1.0 / n as f64);
    out.effective_cap = effective;
    // rest[k] = the summed weight of contributors k.. (the ones left uncapped when k are capped).
    let mut rest = vec![0.0; n + 1];
    for k in (0..n).rev() {
        rest[k] = rest[k + 1] + sorted[k].1;
    }
    for capped in 0..n {
        // With `capped` contributors levelled, the new total T satisfies
        // T = capped × effective × T + rest, so T = rest / (1 − capped × effective).
        let free = 1.0 - capped as f64 * effective;
        if free <= 0.0 {
            break;
        }
        let new_total = rest[capped] / free;
        let level = effective * new_total;
        // Relative tolerance: a contributor exactly at the cap needs no factor.
        if sorted[capped].1 <= level * (1.0 + 1e-12) {
            for (who, w) in &sorted[..capped] {
                out.factors.insert((*who).clone(), level / w);
            }
            return out;
        }
    }
    out
}

/// What the cap did, in counts only, for the report and the dataset statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InfluenceSummary {
    /// The configured `audit.max_user_share`.
    pub cap: f64,
    /// The cap enforced (higher than `cap` when there are fewer than `1 / cap` contributors).
    pub effective_cap: f64,
    /// Distinct contributors (users, plus one for the anonymous pool if any record has no id).
    pub contributors: u64,
    /// Contributors whose records were scaled down.
    pub capped_users: u64,
    /// Records of those contributors.
    pub records_down_weighted: u64,
    /// Records with no user id (the anonymous pool).
    pub anonymous_records: u64,
    /// The largest contributor's share of the signal before and after the cap, in [0, 1].
    pub largest_share_before: f64,
    pub largest_share_after: f64,
}

/// Sums the weights actually applied per contributor while the dataset is built, so the
/// summary states the share in the training weights, not a prediction of it.
#[derive(Debug, Default)]
pub struct AppliedWeights {
    sums: HashMap<Contributor, f64>,
    down_weighted: u64,
    anonymous: u64,
}

impl AppliedWeights {
    pub fn add(&mut self, who: &Contributor, weight: f64, factors: &UserFactors) {
        *self.sums.entry(who.clone()).or_default() += weight;
        if factors.is_capped(who) {
            self.down_weighted += 1;
        }
        if who.is_none() {
            self.anonymous += 1;
        }
    }

    pub fn summary(&self, factors: &UserFactors) -> InfluenceSummary {
        let total: f64 = self.sums.values().sum();
        let largest = self.sums.values().copied().fold(0.0, f64::max);
        InfluenceSummary {
            cap: factors.cap,
            effective_cap: factors.effective_cap,
            contributors: factors.contributors,
            capped_users: factors.capped(),
            records_down_weighted: self.down_weighted,
            anonymous_records: self.anonymous,
            largest_share_before: factors.largest_share_before,
            largest_share_after: if total > 0.0 { largest / total } else { 0.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(weights: &[f64]) -> HashMap<Contributor, f64> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| (Some(format!("u{i}")), *w))
            .collect()
    }

    fn shares_after(t: &HashMap<Contributor, f64>, f: &UserFactors) -> Vec<f64> {
        let scaled: Vec<f64> = t.iter().map(|(c, w)| w * f.of(c)).collect();
        let total: f64 = scaled.iter().sum();
        scaled.iter().map(|w| w / total).collect()
    }

    #[test]
    fn one_heavy_user_is_levelled_to_the_cap() {
        // 100 + nine users of 10: the heavy one holds 100/190 = 53%.
        let mut w = vec![100.0];
        w.extend([10.0; 9]);
        let t = totals(&w);
        let f = cap_factors(&t, 0.2);
        assert_eq!(f.capped(), 1);
        let shares = shares_after(&t, &f);
        let max = shares.iter().copied().fold(0.0, f64::max);
        assert!((max - 0.2).abs() < 1e-9, "largest share {max}");
        // The others keep weight 1: only the excess is removed.
        assert_eq!(f.of(&Some("u1".into())), 1.0);
    }

    #[test]
    fn levelling_one_user_can_push_the_next_over_the_cap() {
        // 50, 30 and eight of 2.5: capping 50 alone would put 30 above 25%.
        let mut w = vec![50.0, 30.0];
        w.extend([2.5; 8]);
        let t = totals(&w);
        let f = cap_factors(&t, 0.25);
        assert_eq!(f.capped(), 2);
        for s in shares_after(&t, &f) {
            assert!(s <= 0.25 + 1e-9, "share {s}");
        }
    }

    #[test]
    fn too_few_users_level_everyone_to_an_equal_share() {
        let t = totals(&[9.0, 3.0, 1.0]);
        let f = cap_factors(&t, 0.2);
        assert!((f.effective_cap - 1.0 / 3.0).abs() < 1e-12);
        for s in shares_after(&t, &f) {
            assert!((s - 1.0 / 3.0).abs() < 1e-9, "share {s}");
        }
    }

    #[test]
    fn nobody_over_the_cap_means_no_factors() {
        let t = totals(&[1.0; 10]);
        let f = cap_factors(&t, 0.2);
        assert_eq!(f.capped(), 0);
        assert_eq!(cap_factors(&HashMap::new(), 0.2).contributors, 0);
    }
}
