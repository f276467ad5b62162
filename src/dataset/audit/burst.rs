//! Burst detection: many negative votes against one model version in a short window, either
//! from few users or from users first seen only recently, looks like an attack (or a bug in a
//! client) rather than users' honest opinion. Such a burst is flagged in the report and its
//! votes are held out of the quality trigger until a person clears it by listing its id in
//! `audit.cleared_bursts`.
//!
//! A negative vote is a thumb down on the whole answer or a 1–2 rating: the signals the quality
//! trigger tests. Votes are swept per model version in `created_at` order with a window of
//! `window_minutes`; a window qualifies when it holds at least `min_votes` negative votes from at
//! most `max_users` contributors ("few users"), or at least `min_votes` negative votes from
//! contributors first seen less than `new_user_days` before their vote ("new users").
//! Overlapping qualifying windows merge into one burst. A burst's id hashes its model version and
//! its first vote's time, so it stays the same from one run to the next and names no user.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::influence::Contributor;
use crate::feedback::record::{FeedbackRecord, Thumb, format_time};
use crate::feedback::store::VersionCounts;

/// `audit.burst`: what counts as a burst.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurstSettings {
    pub window_minutes: u64,
    pub min_votes: u64,
    pub max_users: u64,
    pub new_user_days: u64,
}

impl Default for BurstSettings {
    /// 20 negative votes within an hour from at most 2 users, or from users first seen in the
    /// last 2 days: far more than one person's honest session, and few enough that a real
    /// outage (many distinct, established users) is never mistaken for an attack.
    fn default() -> Self {
        Self {
            window_minutes: 60,
            min_votes: 20,
            max_users: 2,
            new_user_days: 2,
        }
    }
}

/// Why a burst was flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BurstReason {
    FewUsers,
    NewUsers,
}

impl BurstReason {
    pub fn describe(self) -> &'static str {
        match self {
            BurstReason::FewUsers => "few users",
            BurstReason::NewUsers => "new users",
        }
    }
}

/// A negative vote as the quality trigger counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Negative {
    ThumbDown,
    Rating(u8),
}

#[derive(Debug, Clone)]
struct Vote {
    /// The record's id, so other audits can leave held votes out too.
    id: String,
    created_at: DateTime<Utc>,
    who: Contributor,
    signal: Negative,
}

/// One flagged burst. Counts only: the users behind it are never named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Burst {
    /// Stable id a person lists in `audit.cleared_bursts` to release the burst's votes.
    pub id: String,
    pub model_version: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Negative votes held out (all votes of a few-users burst; the new users' votes otherwise).
    pub votes: u64,
    /// Distinct contributors behind the held votes.
    pub users: u64,
    pub reasons: Vec<BurstReason>,
    /// Listed in `audit.cleared_bursts`: its votes count again.
    pub cleared: bool,
    #[serde(skip)]
    held: Vec<(DateTime<Utc>, Negative)>,
    /// The held votes' record ids (in memory only).
    #[serde(skip)]
    held_ids: Vec<String>,
}

impl Burst {
    /// The record ids of the votes this burst holds out (none once cleared).
    pub fn held_ids(&self) -> &[String] {
        if self.cleared { &[] } else { &self.held_ids }
    }
}

/// Collects what burst detection needs from every record (one streaming pass).
#[derive(Debug, Default)]
pub struct BurstScan {
    first_seen: HashMap<Contributor, DateTime<Utc>>,
    votes: HashMap<String, Vec<Vote>>,
}

impl BurstScan {
    pub fn add(&mut self, record: &FeedbackRecord) {
        let who = record.user_id.clone();
        let seen = self
            .first_seen
            .entry(who.clone())
            .or_insert(record.created_at);
        *seen = (*seen).min(record.created_at);
        let signal = match (record.answer_thumb(), record.answer_rating()) {
            (Some(Thumb::Down), _) => Negative::ThumbDown,
            (_, Some(r)) if r <= 2 => Negative::Rating(r),
            _ => return,
        };
        self.votes
            .entry(record.model_version.clone())
            .or_default()
            .push(Vote {
                id: record.id.clone(),
                created_at: record.created_at,
                who,
                signal,
            });
    }

    /// Sweeps every version's votes; bursts come out sorted by version, then start.
    pub fn finish(self, settings: &BurstSettings, cleared: &[String]) -> Vec<Burst> {
        let mut versions: Vec<(String, Vec<Vote>)> = self.votes.into_iter().collect();
        versions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (version, mut votes) in versions {
            votes.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.who.cmp(&b.who)));
            out.extend(sweep(&version, &votes, &self.first_seen, settings, cleared));
        }
        out
    }
}

fn sweep(
    version: &str,
    votes: &[Vote],
    first_seen: &HashMap<Contributor, DateTime<Utc>>,
    s: &BurstSettings,
    cleared: &[String],
) -> Vec<Burst> {
    let window = Duration::minutes(s.window_minutes as i64);
    let new_span = Duration::days(s.new_user_days as i64);
    let is_new = |v: &Vote| {
        first_seen
            .get(&v.who)
            .is_some_and(|first| v.created_at - *first < new_span)
    };
    // Per vote: the reasons it was flagged for (empty: not held).
    let mut flags: Vec<Vec<BurstReason>> = vec![Vec::new(); votes.len()];
    // Qualifying windows as (first, last) vote indices, in order.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut in_window: HashMap<&Contributor, u64> = HashMap::new();
    let mut new_votes = 0u64;
    let mut end = 0;
    for start in 0..votes.len() {
        while end < votes.len() && votes[end].created_at - votes[start].created_at < window {
            *in_window.entry(&votes[end].who).or_default() += 1;
            new_votes += u64::from(is_new(&votes[end]));
            end += 1;
        }
        let count = (end - start) as u64;
        let few = count >= s.min_votes && in_window.len() as u64 <= s.max_users;
        let fresh = new_votes >= s.min_votes;
        if few || fresh {
            for (i, flag) in flags.iter_mut().enumerate().take(end).skip(start) {
                if few && !flag.contains(&BurstReason::FewUsers) {
                    flag.push(BurstReason::FewUsers);
                }
                if fresh && is_new(&votes[i]) && !flag.contains(&BurstReason::NewUsers) {
                    flag.push(BurstReason::NewUsers);
                }
            }
            match spans.last_mut() {
                Some(last) if start <= last.1 => last.1 = end - 1,
                _ => spans.push((start, end - 1)),
            }
        }
        // Slide: the vote at `start` leaves the window.
        let who = &votes[start].who;
        if let Some(n) = in_window.get_mut(who) {
            *n -= 1;
            if *n == 0 {
                in_window.remove(who);
            }
        }
        new_votes -= u64::from(is_new(&votes[start]));
    }
    spans
        .into_iter()
        .map(|(first, last)| {
            let mut reasons: Vec<BurstReason> = Vec::new();
            let mut users: HashMap<&Contributor, ()> = HashMap::new();
            let mut held = Vec::new();
            let mut held_ids = Vec::new();
            for i in first..=last {
                if flags[i].is_empty() {
                    continue;
                }
                for r in &flags[i] {
                    if !reasons.contains(r) {
                        reasons.push(*r);
                    }
                }
                users.insert(&votes[i].who, ());
                held.push((votes[i].created_at, votes[i].signal));
                held_ids.push(votes[i].id.clone());
            }
            reasons.sort();
            let start = votes[first].created_at;
            let id = burst_id(version, start);
            Burst {
                cleared: cleared.contains(&id),
                id,
                model_version: version.to_string(),
                start,
                end: votes[last].created_at,
                votes: held.len() as u64,
                users: users.len() as u64,
                reasons,
                held,
                held_ids,
            }
        })
        .collect()
}

fn burst_id(version: &str, start: DateTime<Utc>) -> String {
    let digest = Sha256::digest(format!("{version}\n{}", format_time(start)).as_bytes());
    format!("burst-{}", &hex::encode(digest)[..12])
}

/// The held votes (uncleared bursts only) on `version` created in `[from, to)`, counted the way
/// the store counts a version's feedback, so they can be subtracted from the quality windows.
pub fn held_counts(
    bursts: &[Burst],
    version: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> VersionCounts {
    let mut c = VersionCounts {
        model_version: version.to_string(),
        ..Default::default()
    };
    let held = bursts
        .iter()
        .filter(|b| !b.cleared && b.model_version == version)
        .flat_map(|b| &b.held)
        .filter(|(at, _)| from.is_none_or(|f| *at >= f) && to.is_none_or(|t| *at < t));
    for (_, signal) in held {
        c.records += 1;
        match signal {
            Negative::ThumbDown => c.thumbs += 1,
            Negative::Rating(r) => {
                let r = f64::from(*r);
                c.ratings += 1;
                c.rating_sum += r;
                c.rating_sq_sum += r * r;
            }
        }
    }
    c
}

/// `counts` minus `held` (saturating: the held votes are a subset of what the store counted).
pub fn subtract(counts: &VersionCounts, held: &VersionCounts) -> VersionCounts {
    VersionCounts {
        model_version: counts.model_version.clone(),
        records: counts.records.saturating_sub(held.records),
        thumbs: counts.thumbs.saturating_sub(held.thumbs),
        thumbs_up: counts.thumbs_up.saturating_sub(held.thumbs_up),
        ratings: counts.ratings.saturating_sub(held.ratings),
        rating_sum: (counts.rating_sum - held.rating_sum).max(0.0),
        rating_sq_sum: (counts.rating_sq_sum - held.rating_sq_sum).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::record::{Response, Signal};

    fn vote(user: &str, version: &str, minute: i64, signal: Signal) -> FeedbackRecord {
        let at = DateTime::parse_from_rfc3339("2026-11-02T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
            + Duration::minutes(minute);
        FeedbackRecord {
            id: format!("{user}-{minute}-{version}"),
            signal,
            conversation_id: format!("c{minute}"),
            message_id: "m".into(),
            model_version: version.into(),
            prompt: Vec::new(),
            response: Response {
                content: "a".into(),
                steps: Vec::new(),
            },
            comment: None,
            source: None,
            user_id: Some(user.into()),
            created_at: at,
            updated_at: at,
        }
    }

    fn settings() -> BurstSettings {
        BurstSettings {
            window_minutes: 30,
            min_votes: 5,
            max_users: 1,
            new_user_days: 10_000,
        }
    }

    #[test]
    fn one_user_flooding_is_one_burst_and_spread_votes_are_none() {
        let mut scan = BurstScan::default();
        for m in 0..8 {
            scan.add(&vote("flood", "v2", m, Signal::Thumb(Thumb::Down)));
        }
        // Eight users, one vote each, an hour apart: nothing.
        for m in 0..8 {
            scan.add(&vote(
                &format!("u{m}"),
                "v2",
                600 + 60 * m,
                Signal::Rating(1),
            ));
        }
        let s = BurstSettings {
            new_user_days: 0,
            ..settings()
        };
        let bursts = scan.finish(&s, &[]);
        assert_eq!(bursts.len(), 1, "{bursts:#?}");
        assert_eq!((bursts[0].votes, bursts[0].users), (8, 1));
        assert_eq!(bursts[0].reasons, vec![BurstReason::FewUsers]);
        let held = held_counts(&bursts, "v2", None, None);
        assert_eq!((held.thumbs, held.ratings), (8, 0));
        assert_eq!(held_counts(&bursts, "v1", None, None).records, 0);
    }

    #[test]
    fn a_cleared_burst_holds_nothing_back() {
        let mut scan = BurstScan::default();
        for m in 0..6 {
            scan.add(&vote("flood", "v2", m, Signal::Rating(2)));
        }
        let id = scan.finish(&settings(), &[]).remove(0).id;
        let mut scan = BurstScan::default();
        for m in 0..6 {
            scan.add(&vote("flood", "v2", m, Signal::Rating(2)));
        }
        let bursts = scan.finish(&settings(), std::slice::from_ref(&id));
        assert!(bursts[0].cleared);
        assert_eq!(held_counts(&bursts, "v2", None, None).records, 0);
    }

    #[test]
    fn new_users_are_flagged_even_when_many() {
        let mut scan = BurstScan::default();
        // An established user seen weeks ago votes down too: not held.
        scan.add(&vote("old", "v2", -40_000, Signal::Thumb(Thumb::Up)));
        scan.add(&vote("old", "v2", 1, Signal::Thumb(Thumb::Down)));
        for m in 0..6 {
            scan.add(&vote(
                &format!("fresh{m}"),
                "v2",
                m,
                Signal::Thumb(Thumb::Down),
            ));
        }
        let s = BurstSettings {
            new_user_days: 2,
            ..settings()
        };
        let bursts = scan.finish(&s, &[]);
        assert_eq!(bursts.len(), 1);
        assert_eq!(bursts[0].reasons, vec![BurstReason::NewUsers]);
        assert_eq!((bursts[0].votes, bursts[0].users), (6, 6));
    }
}
