//! The bot's memory of the pull requests it opened, and what became of them.
//!
//! Merging a bot PR is the promotion (its registry diff moves `production`), so the registry on
//! the default branch records every accepted model. What the registry cannot record is a PR that
//! was closed without merging: its registry change never landed. That rejection is remembered
//! here, in the feedback store's loop state (which the workflow carries between runs with the
//! store), so that the next run can show it in the report and never proposes a model trained on
//! the same data and config again.
//!
//! A PR the bot closed itself because a newer run superseded it is not a rejection; the publisher
//! reports those numbers and they are recorded as superseded.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::feedback::Store;
use crate::forge::publish::ClosedPull;

const KEY: &str = "proposals";

/// What became of a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProposalState {
    /// The PR is open, under review.
    Open,
    /// Merged: its models are production on the default branch.
    Merged,
    /// Closed without merging by a person: the models were rejected.
    Rejected,
    /// Closed by the bot in favour of a newer run's PR.
    Superseded,
}

/// One pull request the bot opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub run_id: String,
    /// The registry ids the PR proposes for production.
    pub models: Vec<String>,
    /// Absent while the pull request exists only as a dry run (the train job of the workflow
    /// writes it; the publish job opens it): it is then recognised by its branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_number: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_url: Option<String>,
    pub branch: String,
    /// The feedback watermark and config the models were trained on: a new run on the same
    /// data and config would train the same model again.
    pub watermark: Option<DateTime<Utc>>,
    pub config_sha256: String,
    pub state: ProposalState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
}

/// Every proposal the bot remembers, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Proposals {
    pub list: Vec<Proposal>,
}

impl Proposals {
    pub fn load(store: &Store) -> anyhow::Result<Self> {
        Ok(store.loop_state(KEY)?.unwrap_or_default())
    }

    pub fn save(&self, store: &Store) -> anyhow::Result<()> {
        store.set_loop_state(KEY, self)
    }

    /// Records a PR the bot opened, updated or wrote as a dry run. Earlier open proposals of
    /// other runs are superseded: the publisher closes them in favour of this one (or, with
    /// `on_existing: update`, moves this run onto one of them, which then carries its models).
    pub fn record_opened(&mut self, proposal: Proposal, superseded: &[u64]) {
        for p in &mut self.list {
            let closed_for_it = p.pr_number.is_some_and(|n| superseded.contains(&n));
            if p.state == ProposalState::Open && (closed_for_it || p.run_id != proposal.run_id) {
                p.state = ProposalState::Superseded;
            }
        }
        let same = |p: &Proposal| {
            p.branch == proposal.branch
                || (p.pr_number.is_some() && p.pr_number == proposal.pr_number)
        };
        match self.list.iter_mut().find(|p| same(p)) {
            Some(existing) => {
                let number = existing.pr_number;
                let url = existing.pr_url.clone();
                *existing = proposal;
                existing.pr_number = existing.pr_number.or(number);
                existing.pr_url = existing.pr_url.clone().or(url);
            }
            None => self.list.push(proposal),
        }
    }

    /// Applies what the forge says about closed bot PRs; returns the proposals that this call
    /// found rejected (newly), for the log.
    pub fn reconcile(&mut self, closed: &[ClosedPull]) -> Vec<Proposal> {
        let mut newly = Vec::new();
        for pull in closed {
            let Some(p) = self.list.iter_mut().find(|p| {
                p.state == ProposalState::Open
                    && (p.pr_number == Some(pull.number) || p.branch == pull.branch)
            }) else {
                continue;
            };
            p.closed_at = pull.closed_at.clone();
            p.pr_number = Some(pull.number);
            p.pr_url = Some(pull.url.clone());
            if pull.merged {
                p.state = ProposalState::Merged;
            } else {
                p.state = ProposalState::Rejected;
                newly.push(p.clone());
            }
        }
        newly
    }

    pub fn rejected(&self) -> impl Iterator<Item = &Proposal> {
        self.list
            .iter()
            .filter(|p| p.state == ProposalState::Rejected)
    }

    /// A rejected proposal trained on exactly this data and config: training again would
    /// propose the same model.
    pub fn rejected_same(
        &self,
        watermark: Option<DateTime<Utc>>,
        config_sha256: &str,
    ) -> Option<&Proposal> {
        self.rejected()
            .filter(|p| p.watermark == watermark && p.config_sha256 == config_sha256)
            .last()
    }

    /// The open proposal, if any (the newest).
    pub fn open(&self) -> Option<&Proposal> {
        self.list
            .iter()
            .rev()
            .find(|p| p.state == ProposalState::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(n: u64, run: &str) -> Proposal {
        Proposal {
            run_id: run.into(),
            models: vec![format!("reward-{run}"), format!("policy-{run}")],
            pr_number: Some(n),
            pr_url: Some(format!("https://github.com/o/r/pull/{n}")),
            branch: format!("rlhf-bot/reward-policy-{run}"),
            watermark: DateTime::from_timestamp(1_700_000_000, 0),
            config_sha256: "c".repeat(64),
            state: ProposalState::Open,
            closed_at: None,
        }
    }

    fn closed(n: u64, merged: bool) -> ClosedPull {
        ClosedPull {
            number: n,
            url: String::new(),
            branch: format!("rlhf-bot/other-{n}"),
            merged,
            closed_at: Some("2026-12-01T00:00:00Z".into()),
        }
    }

    #[test]
    fn closed_unmerged_is_a_rejection_but_superseded_is_not() {
        let mut ps = Proposals::default();
        ps.record_opened(proposal(1, "a"), &[]);
        ps.record_opened(proposal(2, "b"), &[1]);
        assert_eq!(ps.list[0].state, ProposalState::Superseded);
        // The bot's own close of #1 shows up as closed unmerged: still not a rejection.
        let newly = ps.reconcile(&[closed(1, false), closed(2, false)]);
        assert_eq!(newly.len(), 1);
        assert_eq!(newly[0].pr_number, Some(2));
        assert_eq!(ps.list[0].state, ProposalState::Superseded);
        let wm = ps.list[1].watermark;
        assert!(ps.rejected_same(wm, &"c".repeat(64)).is_some());
        assert!(ps.rejected_same(wm, &"d".repeat(64)).is_none());
        // Reconciling again changes nothing.
        assert!(ps.reconcile(&[closed(2, false)]).is_empty());
    }

    #[test]
    fn a_dry_run_proposal_is_recognised_by_its_branch() {
        let mut ps = Proposals::default();
        let mut dry = proposal(0, "a");
        dry.pr_number = None;
        dry.pr_url = None;
        ps.record_opened(dry, &[]);
        let mut pull = closed(41, false);
        pull.branch = "rlhf-bot/reward-policy-a".into();
        let newly = ps.reconcile(&[pull]);
        assert_eq!(newly.len(), 1);
        assert_eq!(ps.list[0].pr_number, Some(41));
    }

    #[test]
    fn merged_is_recorded_as_merged() {
        let mut ps = Proposals::default();
        ps.record_opened(proposal(7, "a"), &[]);
        assert!(ps.open().is_some());
        assert!(ps.reconcile(&[closed(7, true)]).is_empty());
        assert_eq!(ps.list[0].state, ProposalState::Merged);
        assert!(ps.open().is_none());
    }
}
