//! What the dashboard shows, gathered into one serialisable value: the registry's versions with
//! lineage, status and their report's gates, training curves from the run logs, daily KPIs with
//! intervals, and what is deployed. Reading files happens here; KPIs and the deployment view
//! come in from the caller (the bot's store for the static site, the service's database live),
//! so this module does no network or database IO.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::deploy::LiveView;
use crate::feedback::store::VersionCounts;
use crate::kpi::{VersionKpis, version_kpis};
use crate::model_kind::ModelKind;
use crate::registry::{ModelEntry, ModelStatus, PREVIOUS, PRODUCTION, Registry};
use crate::run::outputs::{read_log, series};

/// Points kept per training curve: enough for the shape, small enough for a page.
const CURVE_POINTS: usize = 300;

/// Everything one dashboard page shows.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardData {
    pub generated_at: String,
    /// Served by `rlhf-bot serve` (true) or written as a static site (false).
    pub live: bool,
    /// Newest first.
    pub versions: Vec<VersionView>,
    pub kpis: Vec<DailyKpis>,
    /// Per version id: metric name → (step, value) points.
    pub curves: BTreeMap<String, BTreeMap<String, Vec<(f64, f64)>>>,
    pub deployed: BTreeMap<ModelKind, LiveView>,
    pub retrain: Retrain,
    /// What could not be read, in words (a missing store, an unreadable report).
    pub notes: Vec<String>,
}

/// One model version as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionView {
    pub id: String,
    pub kind: ModelKind,
    /// `production`, `previous`, `candidate` or `rejected` (see [`display_status`]).
    pub status: &'static str,
    pub created_at: String,
    pub created_by: Option<String>,
    pub base_model: String,
    pub parent: Option<String>,
    pub algorithm: String,
    pub metrics: BTreeMap<String, f64>,
    /// Training examples per kind in its dataset (lineage).
    pub examples: BTreeMap<String, u64>,
    pub examples_sha256: String,
    /// The run's promotion gates, from its report (`None`: no report found).
    pub gates: Option<Vec<GateView>>,
}

/// One promotion gate of a run's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateView {
    pub name: String,
    pub status: String,
    #[serde(default)]
    pub detail: String,
}

/// One model version's KPIs on one UTC day.
#[derive(Debug, Clone, Serialize)]
pub struct DailyKpis {
    pub day: String,
    #[serde(flatten)]
    pub kpis: VersionKpis,
}

impl DailyKpis {
    /// From per-day counts (`day_us`: the day's start, µs since the epoch), 95% intervals.
    pub fn of(day_us: i64, counts: &VersionCounts) -> Self {
        let day = DateTime::from_timestamp_micros(day_us)
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        Self {
            day,
            kpis: version_kpis(counts, 0.95),
        }
    }
}

/// How "Retrain now" works on this page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Retrain {
    /// The workflow's page on GitHub (its "Run workflow" button).
    pub workflow_url: Option<String>,
    /// The live service holds a dispatch token: the page shows a button that POSTs
    /// `/dashboard/retrain`.
    pub button: bool,
}

/// Where the files come from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub registry_file: &'a Path,
    /// `report.dir`: `<run>/metrics.json` per run.
    pub reports_dir: &'a Path,
    /// `store.dir`: `runs/<run>/<kind>/log.jsonl` per run.
    pub store_dir: &'a Path,
}

/// Reads the registry, the reports and the run logs; `kpis`, `deployed` and `retrain` are passed
/// through. A missing or broken file becomes a note, never an error: a dashboard that shows what
/// it can is more use than none. Only an unreadable registry fails (nothing to show without it).
pub fn gather(
    sources: Sources<'_>,
    kpis: Vec<DailyKpis>,
    deployed: BTreeMap<ModelKind, LiveView>,
    retrain: Retrain,
    live: bool,
    now: DateTime<Utc>,
) -> anyhow::Result<DashboardData> {
    let registry = Registry::load_or_default(sources.registry_file)?;
    let mut notes = Vec::new();
    let mut versions = Vec::new();
    let mut curves = BTreeMap::new();
    for entry in &registry.models {
        let run = run_of(entry);
        let gates = run.and_then(|run| read_gates(sources.reports_dir, run, &mut notes));
        if let Some(run) = run {
            let dir = crate::run::run_dir(sources.store_dir, run).join(entry.kind.as_str());
            if let Ok(log) = read_log(&dir) {
                curves.insert(entry.id.clone(), curve_set(&log));
            }
        }
        versions.push(VersionView {
            id: entry.id.clone(),
            kind: entry.kind,
            status: display_status(entry, &registry),
            created_at: entry.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            created_by: entry.created_by.clone(),
            base_model: entry.base_model.clone(),
            parent: entry.parent.clone(),
            algorithm: entry.algorithm.clone(),
            metrics: entry.metrics.clone(),
            examples: entry.feedback.counts.clone(),
            examples_sha256: entry.feedback.examples_sha256.clone(),
            gates,
        });
    }
    versions.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
    if registry.models.is_empty() {
        notes.push(format!(
            "the registry ({}) lists no model yet: the first run that trains opens a pull request that adds one",
            sources.registry_file.display()
        ));
    }
    Ok(DashboardData {
        generated_at: now.to_rfc3339_opts(SecondsFormat::Secs, true),
        live,
        versions,
        kpis,
        curves,
        deployed,
        retrain,
        notes,
    })
}

/// The run a registry id came from: ids are `<kind>-<run id>` (see `proposals`).
fn run_of(entry: &ModelEntry) -> Option<&str> {
    entry
        .id
        .strip_prefix(entry.kind.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .filter(|run| !run.is_empty() && !run.contains(['/', '\\']) && *run != "..")
}

/// The status a reader cares about. The registry keeps `candidate` on a model that was passed
/// over (a newer one was promoted) and `archived` on one a rollback retired; both read as
/// `rejected` here, while the alias holders read as `production` and `previous`.
pub fn display_status(entry: &ModelEntry, registry: &Registry) -> &'static str {
    if entry.aliases.iter().any(|a| a == PRODUCTION) {
        return "production";
    }
    if entry.aliases.iter().any(|a| a == PREVIOUS) {
        return "previous";
    }
    let production_since = registry.production(entry.kind).map(|p| p.created_at);
    match entry.status {
        ModelStatus::Candidate if production_since.is_none_or(|t| entry.created_at > t) => {
            "candidate"
        }
        _ => "rejected",
    }
}

#[derive(Deserialize)]
struct ReportMetrics {
    #[serde(default)]
    gates: Vec<GateView>,
}

fn read_gates(reports_dir: &Path, run: &str, notes: &mut Vec<String>) -> Option<Vec<GateView>> {
    let file = reports_dir.join(run).join("metrics.json");
    let text = std::fs::read_to_string(&file).ok()?;
    match serde_json::from_str::<ReportMetrics>(&text) {
        Ok(m) => Some(m.gates),
        Err(e) => {
            notes.push(format!(
                "{} is not a report's metrics.json: {e}",
                file.display()
            ));
            None
        }
    }
}

/// Every metric of a log as a thinned curve.
fn curve_set(log: &[crate::run::outputs::LogLine]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut names: Vec<&String> = log.iter().flat_map(|l| l.values.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let points = crate::report::plots::thin(&series(log, name), CURVE_POINTS);
            (name.clone(), points)
        })
        .filter(|(_, points)| !points.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_with(yaml: &str) -> Registry {
        Registry::from_yaml(Path::new("registry.yaml"), yaml).unwrap()
    }

    /// r1 was production before r3 (now `previous`), r2 was passed over, r4 awaits review.
    fn registry_yaml() -> String {
        let entry = |n: u32, status: &str, aliases: &str| {
            format!(
                "- id: policy-r{n}\n  kind: policy\n  created_at: 2026-01-0{n}T00:00:00Z\n  base_model: base\n  algorithm: dpo\n  config_sha256: \"{c}\"\n  feedback: {{watermark: w, counts: {{pairs: 3}}, examples_sha256: \"{e}\"}}\n  artifact: {{uri: \"file:///a/policy/policy-r{n}/\", sha256: \"{s}\", size_bytes: 1}}\n  status: {status}\n{aliases}",
                c = "1".repeat(64),
                e = "2".repeat(64),
                s = "0".repeat(64),
            )
        };
        format!(
            "version: 1\nmodels:\n{}{}{}{}",
            entry(1, "archived", "  aliases: [previous]\n"),
            entry(2, "candidate", ""),
            entry(3, "production", "  aliases: [production]\n"),
            entry(4, "candidate", ""),
        )
    }

    #[test]
    fn statuses_read_as_a_reviewer_means_them() {
        let r = registry_with(&registry_yaml());
        let status = |id: &str| display_status(r.get(id).unwrap(), &r);
        assert_eq!(status("policy-r1"), "previous");
        assert_eq!(status("policy-r2"), "rejected", "passed over by r3");
        assert_eq!(status("policy-r3"), "production");
        assert_eq!(status("policy-r4"), "candidate");
    }

    #[test]
    fn gathers_gates_and_curves_by_run_and_notes_what_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let registry_file = dir.path().join("registry.yaml");
        std::fs::write(&registry_file, registry_yaml()).unwrap();
        let reports = dir.path().join("reports");
        std::fs::create_dir_all(reports.join("r3")).unwrap();
        std::fs::write(
            reports.join("r3/metrics.json"),
            r#"{"gates":[{"id":"kl","name":"KL","status":"pass","detail":"0.1 <= 10"}]}"#,
        )
        .unwrap();
        std::fs::create_dir_all(reports.join("r4")).unwrap();
        std::fs::write(reports.join("r4/metrics.json"), "{not json").unwrap();
        let log_dir = dir.path().join("store/runs/r3/policy");
        std::fs::create_dir_all(&log_dir).unwrap();
        std::fs::write(
            log_dir.join("log.jsonl"),
            "{\"step\":1,\"loss\":0.7}\n{\"step\":2,\"loss\":0.5,\"objective/kl\":0.01}\n",
        )
        .unwrap();
        let data = gather(
            Sources {
                registry_file: &registry_file,
                reports_dir: &reports,
                store_dir: &dir.path().join("store"),
            },
            Vec::new(),
            BTreeMap::new(),
            Retrain::default(),
            false,
            Utc::now(),
        )
        .unwrap();
        let ids: Vec<&str> = data.versions.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(ids, ["policy-r4", "policy-r3", "policy-r2", "policy-r1"]);
        let r3 = &data.versions[1];
        assert_eq!(r3.gates.as_ref().unwrap()[0].status, "pass");
        assert_eq!(r3.examples["pairs"], 3);
        assert!(data.versions[0].gates.is_none());
        assert!(
            data.notes.iter().any(|n| n.contains("r4")),
            "{:?}",
            data.notes
        );
        let curves = &data.curves["policy-r3"];
        assert_eq!(curves["loss"], vec![(1.0, 0.7), (2.0, 0.5)]);
        assert_eq!(curves["objective/kl"], vec![(2.0, 0.01)]);
    }
}
