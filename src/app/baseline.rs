//! What a run's candidates are evaluated against, and why.
//!
//! The candidate policy is compared with the production policy, and the candidate reward model is
//! scored beside the production reward model. Production comes from the registry, so it is only
//! used after its artifact passes the checksums the registry recorded: a model that was modified
//! after registration is never evaluated as if it were production. When production cannot be
//! used, the comparison falls back (policy: the base model; reward: no comparison) and the
//! [`Baseline`] written next to the run says exactly that, so the report and the gates can make
//! the pull request a draft with a failing integrity gate instead of claiming "vs production".

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::artifacts::ArtifactError;
use crate::config::Settings;
use crate::registry::{ModelKind, Registry};
use crate::run::outputs::{Baseline, UnusableProduction};

/// A baseline decided: the local directory to evaluate against (`None`: the base model for a
/// policy, no comparison for a reward model) and the statement for the report.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub dir: Option<PathBuf>,
    pub baseline: Baseline,
}

/// Decides the baseline for `kind`. `explicit` is a directory the user named (a flag or the
/// config's `production_model`) and wins; otherwise the registry's production model is verified
/// and made local, then `prepare` turns it into what the evaluator loads (e.g. a merged HF
/// directory for a policy adapter). `fallback` names what is used without production ("the base
/// model").
pub fn resolve(
    settings: &Settings,
    kind: ModelKind,
    explicit: Option<&Path>,
    fallback: &str,
    prepare: impl FnOnce(PathBuf) -> Result<PathBuf>,
) -> Result<Resolved> {
    if let Some(path) = explicit {
        return Ok(Resolved {
            dir: Some(prepare(path.to_path_buf())?),
            baseline: Baseline {
                production_id: None,
                unusable_production: None,
                against: format!("the {kind} model named by `production_model`"),
                reason:
                    "chosen explicitly (`--production-model` or the config's `production_model`)"
                        .into(),
            },
        });
    }
    let registry = Registry::load_or_default(&settings.registry.path)?;
    let Some(entry) = registry.production(kind) else {
        return Ok(Resolved {
            dir: None,
            baseline: Baseline {
                production_id: None,
                unusable_production: None,
                against: fallback.to_string(),
                reason: format!("the registry has no production {kind} model yet"),
            },
        });
    };
    let verified = settings
        .registry
        .open_artifacts()
        .map_err(|e| e.summary())
        .and_then(|store| store.materialize(&entry.artifact).map_err(|e| e.summary()));
    let usable = verified.and_then(|dir| {
        prepare(dir).map_err(|e| {
            tracing::debug!("production {kind} {} did not load: {e:#}", entry.id);
            "it did not load as a model".to_string()
        })
    });
    match usable {
        Ok(dir) => Ok(Resolved {
            dir: Some(dir),
            baseline: Baseline {
                production_id: Some(entry.id.clone()),
                unusable_production: None,
                against: format!("production `{}`", entry.id),
                reason: "the registry's production model, verified against its checksums".into(),
            },
        }),
        Err(reason) => {
            tracing::error!(
                id = %entry.id,
                "production {kind} model cannot be used ({reason}); comparing with {fallback} instead, and the report's integrity gate fails"
            );
            Ok(Resolved {
                dir: None,
                baseline: Baseline {
                    production_id: None,
                    against: fallback.to_string(),
                    reason: format!("production `{}` could not be used: {reason}", entry.id),
                    unusable_production: Some(UnusableProduction {
                        id: entry.id.clone(),
                        reason,
                    }),
                },
            })
        }
    }
}

/// Checks a registry entry's artifact before `promote` moves an alias onto it.
pub fn verify_for_promotion(settings: &Settings, id: &str) -> Result<()> {
    let registry = Registry::load(&settings.registry.path)?;
    let entry = registry.get(id).ok_or_else(|| {
        anyhow::anyhow!(
            "no model with id `{id}` in the registry {}\nhint: `rlhf-bot registry show` lists the ids",
            settings.registry.path.display()
        )
    })?;
    let store = settings.registry.open_artifacts()?;
    store
        .verify(&entry.artifact)
        .map_err(|e: ArtifactError| anyhow::anyhow!("refusing to promote `{id}`: {e}"))
}
