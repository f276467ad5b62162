//! `rlhf-bot dashboard --out DIR`: the dashboard as a static site for GitHub Pages, from the
//! registry, the reports, the run logs and the KPIs of the bot's own feedback store (what the
//! last `pull` stored). `index.html` is the whole site; `data.json` holds the same data for
//! scripts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use chrono::{Duration, Utc};
use serde::Serialize;

use crate::atomic_file::write_atomically;
use crate::cli::DashboardArgs;
use crate::config::Settings;
use crate::dashboard::{DailyKpis, Retrain, Sources, gather, page};

#[derive(Debug, Serialize)]
pub struct DashboardSummary {
    pub out: PathBuf,
    pub versions: usize,
    pub kpi_days: usize,
    pub notes: Vec<String>,
}

impl std::fmt::Display for DashboardSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dashboard written to {} ({} model versions, {} KPI rows)",
            self.out.join("index.html").display(),
            self.versions,
            self.kpi_days
        )?;
        for note in &self.notes {
            write!(f, "\nnote: {note}")?;
        }
        Ok(())
    }
}

pub async fn dashboard_cmd(settings: &Settings, args: &DashboardArgs) -> Result<DashboardSummary> {
    let now = Utc::now();
    let mut notes = Vec::new();
    let kpis = store_kpis(settings, now, &mut notes)?;
    let deployed = crate::app::deploy::live_best_effort(settings).await;
    let retrain = Retrain {
        workflow_url: settings
            .dashboard
            .repository(|k| std::env::var(k).ok())
            .map(|(owner, repo)| settings.dashboard.workflow_page(&owner, &repo)),
        // A static page holds no token: GitHub's own "Run workflow" button does the dispatch.
        button: false,
    };
    let sources = Sources {
        registry_file: &settings.registry.path,
        reports_dir: &settings.report.dir,
        store_dir: &settings.store.dir,
    };
    let mut data = gather(sources, kpis, deployed, retrain, false, now)?;
    data.notes.extend(notes);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_atomically(&args.out.join("index.html"), page::render(&data).as_bytes())?;
    let json = serde_json::to_vec_pretty(&data)?;
    write_atomically(&args.out.join("data.json"), &json)?;
    Ok(DashboardSummary {
        out: args.out.clone(),
        versions: data.versions.len(),
        kpi_days: data.kpis.len(),
        notes: data.notes,
    })
}

/// Daily KPIs from the store; a missing store (a Pages job without the bot's cache) is a note.
fn store_kpis(
    settings: &Settings,
    now: chrono::DateTime<Utc>,
    notes: &mut Vec<String>,
) -> Result<Vec<DailyKpis>> {
    if !crate::feedback::store::exists(&settings.store.dir) {
        notes.push(format!(
            "no feedback store in {}: KPIs need the bot's store (run `rlhf-bot pull` first, or restore its cache)",
            settings.store.dir.display()
        ));
        return Ok(Vec::new());
    }
    let store = crate::feedback::Store::open(&settings.store.dir)?;
    let from = now - Duration::days(i64::from(settings.dashboard.kpi_days));
    let rows = store.daily_version_counts(Some(from), Some(now))?;
    Ok(rows
        .iter()
        .map(|(day_us, counts)| DailyKpis::of(*day_us, counts))
        .collect())
}
