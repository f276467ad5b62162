//! Everything a report is rendered from, as plain serialisable data, plus the release gates.
//!
//! The orchestration code fills a [`ReportContext`] from the run outputs, the registry and the
//! KPI computation; rendering is then a pure function of it, which is what makes the report
//! snapshot-testable. The context deliberately has no field for feedback comments or user ids:
//! KPIs arrive as aggregates ([`KpiRow`]), so no template, default or overridden, can leak them.
//!
//! Gate evaluation ([`evaluate_gates`]) lives here too, as a pure function, because the verdict is
//! part of what the report states and the decision to promote must not depend on rendering.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::registry::ModelEntry;
use crate::run::outputs::{Baseline, LogLine, PolicyMetrics, RewardMetrics};

/// A point estimate with its 95% interval, all on the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// User-facing KPIs of one deployed model version, computed from feedback (aggregates only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KpiRow {
    /// The model version the feedback was given on, as the feedback API reports it.
    pub model_version: String,
    /// Feedback records on this version.
    pub count: u64,
    /// Share of thumbs that were up, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive_rate: Option<Interval>,
    /// Mean 1–5 rating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_rating: Option<Interval>,
}

/// Release gates, from the config file. A candidate may be merged only when every gate that
/// applies passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// The candidate reward model's eval accuracy may trail production's (on the same split) by
    /// at most this many percentage points.
    #[serde(default = "default_rm_drop")]
    pub rm_accuracy_max_drop_points: f64,
    /// The lower end of the 95% interval of the candidate policy's win rate must exceed this.
    #[serde(default = "default_win_rate")]
    pub min_win_rate_lower_bound: f64,
    /// Largest allowed mean KL(candidate || reference) per response, in nats.
    #[serde(default = "default_kl_budget")]
    pub kl_budget: f64,
}

fn default_rm_drop() -> f64 {
    1.0
}
fn default_win_rate() -> f64 {
    0.5
}
fn default_kl_budget() -> f64 {
    10.0
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            rm_accuracy_max_drop_points: default_rm_drop(),
            min_win_rate_lower_bound: default_win_rate(),
            kl_budget: default_kl_budget(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateStatus {
    Pass,
    Fail,
    /// Nothing to check (e.g. no production model to compare with yet, or the stage did not run).
    Skipped,
}

impl GateStatus {
    pub fn icon(self) -> &'static str {
        match self {
            GateStatus::Pass => "✅",
            GateStatus::Fail => "❌",
            GateStatus::Skipped => "➖",
        }
    }
}

/// One gate's outcome, with the numbers that decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// Stable machine name: `rm_accuracy`, `win_rate`, `kl`.
    pub id: String,
    /// What the gate demands, for people.
    pub name: String,
    pub status: GateStatus,
    /// The numbers: `63.1% ≥ 62.0% (production 63.0% − 1.0 pt)`.
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

/// The overall outcome: passed when no gate failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    pub checked: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// Absorbs the rounding of `a - b` in decimal thresholds (0.64 − 0.01 is not exactly 0.63), far
/// below any difference a report shows.
const EPS: f64 = 1e-9;

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Evaluates the gates for whatever this run trained. Pure: same inputs, same verdict. A metric
/// that is NaN fails its gate (every comparison is written so NaN is false).
pub fn evaluate_gates(
    cfg: &GateConfig,
    reward: Option<&RewardMetrics>,
    policy: Option<&PolicyMetrics>,
) -> Vec<GateResult> {
    let drop = cfg.rm_accuracy_max_drop_points;
    let mut out = Vec::with_capacity(3);
    let rm_name = format!("Reward-model accuracy ≥ production − {drop:.1} pt");
    out.push(match reward {
        None => skipped(
            "rm_accuracy",
            rm_name,
            "no reward model trained in this run",
        ),
        Some(m) => match &m.production_eval {
            None => skipped(
                "rm_accuracy",
                rm_name,
                "first reward model: no production model to compare with",
            ),
            Some(prod) => {
                let threshold = prod.accuracy - drop / 100.0;
                let ok = m.eval.accuracy >= threshold - EPS;
                GateResult {
                    id: "rm_accuracy".into(),
                    name: rm_name,
                    status: if ok {
                        GateStatus::Pass
                    } else {
                        GateStatus::Fail
                    },
                    detail: format!(
                        "{} {} {} (production {} − {drop:.1} pt)",
                        pct(m.eval.accuracy),
                        if ok { "≥" } else { "<" },
                        pct(threshold),
                        pct(prod.accuracy)
                    ),
                    value: Some(m.eval.accuracy),
                    threshold: Some(threshold),
                }
            }
        },
    });
    let min = cfg.min_win_rate_lower_bound;
    let win_name = format!("Win rate, lower 95% bound > {}", pct(min));
    out.push(match policy {
        None => skipped("win_rate", win_name, "no policy trained in this run"),
        Some(p) => {
            let e = &p.eval;
            let ok = e.win_rate_low > min;
            GateResult {
                id: "win_rate".into(),
                name: win_name,
                status: if ok {
                    GateStatus::Pass
                } else {
                    GateStatus::Fail
                },
                detail: format!(
                    "{} [{}, {}] over {} prompts; lower bound {} {}",
                    pct(e.win_rate),
                    pct(e.win_rate_low),
                    pct(e.win_rate_high),
                    e.n,
                    if ok { ">" } else { "≤" },
                    pct(min)
                ),
                value: Some(e.win_rate_low),
                threshold: Some(min),
            }
        }
    });
    let budget = cfg.kl_budget;
    let kl_name = format!("KL to reference ≤ {budget:.2} nats");
    out.push(match policy {
        None => skipped("kl", kl_name, "no policy trained in this run"),
        Some(p) => {
            let ok = p.eval.kl <= budget + EPS;
            GateResult {
                id: "kl".into(),
                name: kl_name,
                status: if ok {
                    GateStatus::Pass
                } else {
                    GateStatus::Fail
                },
                detail: format!(
                    "{:.3} {} {budget:.3} nats",
                    p.eval.kl,
                    if ok { "≤" } else { ">" }
                ),
                value: Some(p.eval.kl),
                threshold: Some(budget),
            }
        }
    });
    out
}

fn skipped(id: &str, name: String, why: &str) -> GateResult {
    GateResult {
        id: id.into(),
        name,
        status: GateStatus::Skipped,
        detail: why.into(),
        value: None,
        threshold: None,
    }
}

/// Summarises gate results.
pub fn verdict(results: &[GateResult]) -> Verdict {
    let count = |s| results.iter().filter(|r| r.status == s).count();
    let failed = count(GateStatus::Fail);
    Verdict {
        passed: failed == 0,
        checked: count(GateStatus::Pass) + failed,
        failed,
        skipped: count(GateStatus::Skipped),
    }
}

/// The reward model trained in this run, and the production model it is compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardSection {
    pub candidate: ModelEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production: Option<ModelEntry>,
    /// What the candidate was actually compared with, and why (absent for runs that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    pub metrics: RewardMetrics,
    /// The run's `log.jsonl`, for the training curves.
    #[serde(default)]
    pub log: Vec<LogLine>,
}

/// The policy trained in this run, and the production policy it is compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySection {
    pub candidate: ModelEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production: Option<ModelEntry>,
    /// What the candidate was actually compared with, and why (absent for runs that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    pub metrics: PolicyMetrics,
    #[serde(default)]
    pub log: Vec<LogLine>,
}

/// A pull request of an earlier run that was closed without merging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub pr_number: u64,
    pub pr_url: String,
    /// The registry ids it proposed.
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
}

/// What serves users now: the model `rlhf-bot deploy` last published for a kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// `reward` or `policy`.
    pub kind: String,
    pub id: String,
    pub deployed_at: String,
    /// `true`: the record says complete; `false`: incomplete (serving not told yet); `None`: no
    /// record.
    pub notified: Option<bool>,
}

/// Everything one report is rendered from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportContext {
    /// Names the output directory `reports/<run_id>/`; letters, digits and `-_.` only.
    pub run_id: String,
    /// Stated in the report; pass a fixed value in tests.
    pub generated_at: DateTime<Utc>,
    /// `owner/name` of the repository the PR is opened in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The workflow run that produced this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_url: Option<String>,
    /// Absolute URL of the full report file on the PR branch; the PR body links to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_url: Option<String>,
    /// New feedback since the last training, per kind (`thumbs`, `ratings`, `aspects`, `steps`).
    #[serde(default)]
    pub new_feedback: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySection>,
    #[serde(default)]
    pub kpis: Vec<KpiRow>,
    pub gates: GateConfig,
    /// The shell command that reproduces this run (e.g. `rlhf-bot run --config … --at <watermark>`).
    pub reproduce: String,
    /// Earlier bot pull requests that a person closed without merging (their models were
    /// rejected); listed so reviewers see what was already turned down.
    #[serde(default)]
    pub rejections: Vec<Rejection>,
    /// What `deploy` published last, per kind (empty when nothing was deployed).
    #[serde(default)]
    pub deployed: Vec<Deployment>,
    /// How many policy samples to show side by side.
    #[serde(default = "default_samples")]
    pub max_samples: usize,
    /// What the feedback audit found (counts only; absent when `audit.enabled` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<crate::dataset::audit::IntegritySummary>,
    /// The behaviour tests' results (`evals/*.yaml`), when the run had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evals: Option<crate::evals::EvalResults>,
    /// What the last `rlhf-bot constitution` run changed (absent when there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constitution: Option<crate::constitution::pairs::ConstitutionDiff>,
    /// What the last `rlhf-bot rlaif` run decided (absent when `rlaif.enabled` is false or it
    /// never ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai_feedback: Option<crate::rlaif::pairs::AiFeedbackSummary>,
}

fn default_samples() -> usize {
    3
}

impl ReportContext {
    /// The gate results for this context.
    pub fn gate_results(&self) -> Vec<GateResult> {
        let mut gates = evaluate_gates(
            &self.gates,
            self.reward.as_ref().map(|r| &r.metrics),
            self.policy.as_ref().map(|p| &p.metrics),
        );
        let baselines = [
            self.reward.as_ref().and_then(|r| r.baseline.as_ref()),
            self.policy.as_ref().and_then(|p| p.baseline.as_ref()),
        ];
        gates.extend(integrity_gate(baselines.into_iter().flatten()));
        gates.extend(self.evals.as_ref().and_then(evals_gate));
        gates
    }
}

/// The behaviour-test gate: fails when a `required: true` eval fails for the candidate. Absent
/// when no eval is required.
pub fn evals_gate(results: &crate::evals::EvalResults) -> Option<GateResult> {
    let required = results.cases.iter().filter(|c| c.required).count();
    if required == 0 {
        return None;
    }
    let failed: Vec<String> = results
        .required_failures()
        .map(|c| crate::report::neutralize::code(&c.name))
        .collect();
    Some(GateResult {
        id: "evals".into(),
        name: "Required behaviour tests pass".into(),
        status: if failed.is_empty() {
            GateStatus::Pass
        } else {
            GateStatus::Fail
        },
        detail: if failed.is_empty() {
            format!("{required} of {required} required evals pass")
        } else {
            format!(
                "{} of {required} required evals fail: {}",
                failed.len(),
                failed.join(", ")
            )
        },
        value: Some((required - failed.len()) as f64),
        threshold: Some(required as f64),
    })
}

/// The production-integrity gate: fails when a production model exists but could not be used
/// (its artifact no longer matches the registry, or it does not load), because then the
/// candidate was not compared with what users get. Absent when no production model was involved.
pub fn integrity_gate<'a>(baselines: impl Iterator<Item = &'a Baseline>) -> Option<GateResult> {
    let mut used = Vec::new();
    let mut broken = Vec::new();
    for b in baselines {
        if let Some(u) = &b.unusable_production {
            broken.push(format!("`{}`: {}", u.id, u.reason));
        } else if let Some(id) = &b.production_id {
            used.push(format!("`{id}`"));
        }
    }
    if used.is_empty() && broken.is_empty() {
        return None;
    }
    let name = "Production models pass their checksums".to_string();
    Some(if broken.is_empty() {
        GateResult {
            id: "production_integrity".into(),
            name,
            status: GateStatus::Pass,
            detail: format!("verified {}", used.join(", ")),
            value: None,
            threshold: None,
        }
    } else {
        GateResult {
            id: "production_integrity".into(),
            name,
            status: GateStatus::Fail,
            detail: format!(
                "unusable: {}; the candidate was not compared with production",
                broken.join("; ")
            ),
            value: None,
            threshold: None,
        }
    })
}
