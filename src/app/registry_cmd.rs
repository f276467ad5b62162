//! `registry show`, `promote` and `rollback`: the registry as people and scripts read it, and the
//! two local edits that mirror what merging (or reverting) the bot's pull request does.
//!
//! The JSON of `registry show` has fixed keys that scripts rely on:
//! `{"production": {"reward": ID|null, "policy": ID|null}, "candidates": [ID…],
//! "models": [{"id", "kind", "status", "aliases", "parent", "created_at", "metrics"}…],
//! "deployed": {"reward": LIVE|null, "policy": LIVE|null}}`, where LIVE is what `deploy` last
//! switched the production prefix to: `{"id", "deployed_at", "formats", "status"}`.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Result;
use serde::Serialize;

use crate::cli::RegistryKind;
use crate::config::Settings;
use crate::deploy::LiveView;
use crate::deploy::manifest::RecordStatus;
use crate::feedback::record::format_time;
use crate::registry::{ModelEntry, ModelKind, ModelStatus, Registry};

/// `registry show`, in the shape of its JSON.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryView {
    pub production: ProductionView,
    pub candidates: Vec<String>,
    pub models: Vec<ModelView>,
    pub deployed: DeployedView,
}

/// What `deploy` published last, per kind (`None`: nothing deployed, or the store unreadable).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeployedView {
    pub reward: Option<LiveView>,
    pub policy: Option<LiveView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProductionView {
    pub reward: Option<String>,
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    pub id: String,
    pub kind: ModelKind,
    pub status: ModelStatus,
    pub aliases: Vec<String>,
    pub parent: Option<String>,
    pub created_at: String,
    pub metrics: BTreeMap<String, f64>,
}

impl RegistryView {
    pub fn of(registry: &Registry) -> Self {
        let id_of = |kind| registry.production(kind).map(|m| m.id.clone());
        Self {
            production: ProductionView {
                reward: id_of(ModelKind::Reward),
                policy: id_of(ModelKind::Policy),
            },
            candidates: registry.candidates().map(|m| m.id.clone()).collect(),
            models: registry.models.iter().map(ModelView::of).collect(),
            deployed: DeployedView::default(),
        }
    }
}

impl ModelView {
    fn of(m: &ModelEntry) -> Self {
        Self {
            id: m.id.clone(),
            kind: m.kind,
            status: m.status,
            aliases: m.aliases.clone(),
            parent: m.parent.clone(),
            created_at: format_time(m.created_at),
            metrics: m.metrics.clone(),
        }
    }
}

impl fmt::Display for RegistryView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let none = || "none".to_string();
        writeln!(
            f,
            "production: reward {}, policy {}",
            self.production.reward.clone().unwrap_or_else(none),
            self.production.policy.clone().unwrap_or_else(none)
        )?;
        if self.candidates.is_empty() {
            writeln!(f, "candidates: none")?;
        } else {
            writeln!(f, "candidates: {}", self.candidates.join(", "))?;
        }
        for (kind, live) in [
            ("reward", &self.deployed.reward),
            ("policy", &self.deployed.policy),
        ] {
            if let Some(live) = live {
                let formats: Vec<&str> = live.formats.iter().map(|f| f.as_str()).collect();
                let status = match live.status {
                    Some(RecordStatus::Complete) => "complete",
                    Some(RecordStatus::Incomplete) => "incomplete: serving not told yet",
                    None => "not recorded",
                };
                writeln!(
                    f,
                    "deployed {kind}: {} since {} ({}; {status})",
                    live.id,
                    live.deployed_at,
                    formats.join(", ")
                )?;
            }
        }
        for m in &self.models {
            let status = serde_json::to_value(m.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let aliases = if m.aliases.is_empty() {
                String::new()
            } else {
                format!(" [{}]", m.aliases.join(", "))
            };
            let parent = m
                .parent
                .as_ref()
                .map_or(String::new(), |p| format!(", parent {p}"));
            writeln!(
                f,
                "  {} {} {status}{aliases}, created {}{parent}",
                m.kind, m.id, m.created_at
            )?;
        }
        Ok(())
    }
}

/// `registry show`.
pub async fn show(settings: &Settings) -> Result<RegistryView> {
    let registry = Registry::load_or_default(&settings.registry.path)?;
    let mut view = RegistryView::of(&registry);
    let mut live = crate::app::deploy::live_best_effort(settings).await;
    view.deployed = DeployedView {
        reward: live.remove(&ModelKind::Reward),
        policy: live.remove(&ModelKind::Policy),
    };
    Ok(view)
}

/// What `promote` and `rollback` changed.
#[derive(Debug, Clone, Serialize)]
pub struct AliasChange {
    /// The model that now holds `production`.
    pub production: String,
    /// The model that held it before (now archived), if any.
    pub replaced: Option<String>,
    #[serde(skip)]
    verb: &'static str,
}

impl fmt::Display for AliasChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is now production", self.production)?;
        match &self.replaced {
            Some(old) => write!(f, " ({old} {})", self.verb),
            None => Ok(()),
        }
    }
}

/// `promote ID`: verifies the artifact, then moves the alias and saves the registry.
pub fn promote(settings: &Settings, id: &str) -> Result<AliasChange> {
    crate::app::baseline::verify_for_promotion(settings, id)?;
    let mut registry = Registry::load(&settings.registry.path)?;
    let promotion = registry.promote(id)?;
    registry.save(&settings.registry.path)?;
    Ok(AliasChange {
        production: promotion.promoted,
        replaced: promotion.archived,
        verb: "archived, marked previous",
    })
}

/// `rollback KIND`: production goes back to the model marked `previous`, verified first.
pub fn rollback(settings: &Settings, kind: RegistryKind) -> Result<AliasChange> {
    let kind = match kind {
        RegistryKind::Reward => ModelKind::Reward,
        RegistryKind::Policy => ModelKind::Policy,
    };
    let mut registry = Registry::load(&settings.registry.path)?;
    let mut trial = registry.clone();
    let change = trial.rollback(kind)?;
    crate::app::baseline::verify_for_promotion(settings, &change.restored)?;
    registry = trial;
    registry.save(&settings.registry.path)?;
    Ok(AliasChange {
        production: change.restored,
        replaced: change.retired,
        verb: "archived",
    })
}
