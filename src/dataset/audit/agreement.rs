//! Agreement between raters, and the label noise it implies.
//!
//! Each answer-level judgement becomes a binary label: thumb up / a 4–5 rating is "good",
//! thumb down / a 1–2 rating is "bad" (a 3 says neither and is left out). Two kinds of pairs of
//! labels on the same answer are compared: labels of two different raters (each rater's own
//! majority), and two labels of the same rater on the same answer ("duplicates": a person who
//! answered twice and changed their mind is noise too). Records without a user id count as
//! raters of their own.
//!
//! The noise model is the symmetric one DPO's `label_smoothing` (cDPO) assumes: every label is
//! flipped independently with probability ε. Two labels of the same answer then agree with
//! probability a = (1 − ε)² + ε² = 1 − 2ε(1 − ε), so ε = (1 − √(2a − 1)) / 2 (and 0.5, pure
//! noise, when a ≤ 0.5). The 95% interval of ε comes from the Wilson interval of a through the
//! same (decreasing) map. The suggested `label_smoothing` is the estimate itself.
//!
//! Votes of flagged, uncleared bursts are left out: a flood is not honest disagreement, and
//! counting it would let an attacker raise the smoothing DPO trains with.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::feedback::record::{FeedbackRecord, Thumb};
use crate::stats::{Interval, wilson};

/// DPO refuses a `label_smoothing` of 0.5 or more (the loss would no longer prefer anything).
pub const MAX_LABEL_SMOOTHING: f64 = 0.49;

/// One rater's labels on one answer: (record id, good?) in arrival order.
type RaterLabels = Vec<(String, bool)>;

/// Collects every rater's labels per answer (one streaming pass).
#[derive(Debug, Default)]
pub struct AgreementScan {
    /// (conversation, message) → rater → labels.
    labels: HashMap<(String, String), BTreeMap<String, RaterLabels>>,
}

impl AgreementScan {
    pub fn add(&mut self, record: &FeedbackRecord) {
        let label = match (record.answer_thumb(), record.answer_rating()) {
            (Some(t), _) => t == Thumb::Up,
            (_, Some(r)) if r >= 4 => true,
            (_, Some(r)) if r <= 2 => false,
            _ => return,
        };
        // Without a user id the record is a rater of its own (`#` cannot start a user id the
        // API gives, so the two never collide in meaning; they are never shown anyway).
        let rater = record
            .user_id
            .clone()
            .unwrap_or_else(|| format!("#{}", record.id));
        self.labels
            .entry((record.conversation_id.clone(), record.message_id.clone()))
            .or_default()
            .entry(rater)
            .or_default()
            .push((record.id.clone(), label));
    }

    /// The summary, leaving out the records in `held` (votes of uncleared bursts).
    pub fn finish(self, min_pairs: u64, held: &HashSet<&str>) -> AgreementSummary {
        let mut s = AgreementSummary {
            min_pairs,
            ..Default::default()
        };
        for raters in self.labels.values() {
            let (mut good, mut bad) = (0u64, 0u64);
            for labels in raters.values() {
                let kept: Vec<bool> = labels
                    .iter()
                    .filter(|(id, _)| !held.contains(id.as_str()))
                    .map(|(_, l)| *l)
                    .collect();
                s.held_out_labels += (labels.len() - kept.len()) as u64;
                if kept.is_empty() {
                    continue;
                }
                let up = kept.iter().filter(|l| **l).count() as u64;
                let down = kept.len() as u64 - up;
                let (pairs, agreeing) = pairs_of(up, down);
                s.duplicate_pairs += pairs;
                s.duplicate_pairs_agreeing += agreeing;
                // The rater's own majority speaks for them among raters; a tie says nothing.
                match up.cmp(&down) {
                    std::cmp::Ordering::Greater => good += 1,
                    std::cmp::Ordering::Less => bad += 1,
                    std::cmp::Ordering::Equal => {}
                }
            }
            if good + bad >= 2 {
                s.answers_multi_rated += 1;
                let (pairs, agreeing) = pairs_of(good, bad);
                s.rater_pairs += pairs;
                s.rater_pairs_agreeing += agreeing;
            }
        }
        let pairs = s.rater_pairs + s.duplicate_pairs;
        let agreeing = s.rater_pairs_agreeing + s.duplicate_pairs_agreeing;
        s.agreement = wilson(agreeing, pairs, 0.95);
        s.flip_rate = s.agreement.map(|a| Interval {
            estimate: flip_rate(a.estimate),
            low: flip_rate(a.high),
            high: flip_rate(a.low),
        });
        s.suggested_label_smoothing = s
            .flip_rate
            .filter(|_| pairs >= min_pairs)
            .map(|f| ((f.estimate * 1000.0).round() / 1000.0).min(MAX_LABEL_SMOOTHING));
        s
    }
}

/// Pairs among `up` good and `down` bad labels, and how many of them agree.
fn pairs_of(up: u64, down: u64) -> (u64, u64) {
    let choose2 = |n: u64| n * n.saturating_sub(1) / 2;
    (choose2(up + down), choose2(up) + choose2(down))
}

/// The flip probability ε whose agreement rate is `a` under symmetric independent noise.
pub fn flip_rate(a: f64) -> f64 {
    if a <= 0.5 {
        0.5
    } else {
        (1.0 - (2.0 * a - 1.0).min(1.0).sqrt()) / 2.0
    }
}

/// What the agreement audit found: counts and rates only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgreementSummary {
    /// Answers judged by two or more raters.
    pub answers_multi_rated: u64,
    /// Pairs of different raters' labels on the same answer, and how many agree.
    pub rater_pairs: u64,
    pub rater_pairs_agreeing: u64,
    /// Pairs of one rater's repeated labels on the same answer, and how many agree.
    pub duplicate_pairs: u64,
    pub duplicate_pairs_agreeing: u64,
    /// Share of all those pairs that agree (95% Wilson interval).
    pub agreement: Option<Interval>,
    /// The label flip rate it implies (95% interval).
    pub flip_rate: Option<Interval>,
    /// The DPO `label_smoothing` the estimate suggests; `None` below `min_pairs` pairs.
    pub suggested_label_smoothing: Option<f64>,
    /// Pairs needed before a smoothing is suggested (`audit.min_agreement_pairs`).
    pub min_pairs: u64,
    /// Labels left out because they belong to a flagged, uncleared burst.
    #[serde(default)]
    pub held_out_labels: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flip_rate_inverts_the_agreement_of_noisy_labels() {
        for eps in [0.0, 0.05, 0.1, 0.3] {
            let a: f64 = (1.0 - eps) * (1.0 - eps) + eps * eps;
            assert!((flip_rate(a) - eps).abs() < 1e-12, "ε={eps}");
        }
        assert_eq!(flip_rate(0.4), 0.5);
    }

    #[test]
    fn pairs_count_agreement_within_each_side() {
        // 3 good, 1 bad: 6 pairs, 3 agree.
        assert_eq!(pairs_of(3, 1), (6, 3));
        assert_eq!(pairs_of(1, 0), (0, 0));
    }
}
