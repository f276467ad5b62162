//! `rlhf-bot deploy`: wires the config, the registry, the artifact store and the environment's
//! secrets into [`crate::deploy::deploy`], with `export-model`'s code as the exporter. Secrets
//! are read (and masked in Actions) before anything is uploaded, so a missing one fails first.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::app::export_model::export_located;
use crate::artifacts::ArtifactLocation;
use crate::cli::{DeployArgs, DeployKind, ExportFormat, ExportModelArgs};
use crate::config::Settings;
use crate::deploy::{
    DeployReport, DeployRequest, Exporter, LiveView, Notifiers, ProductionStore, ServingFormat,
};
use crate::forge::github::{RetryPolicy, SecretToken};
use crate::model_kind::ModelKind;
use crate::registry::Registry;
use crate::secret::SecretString;

/// Under `store.dir`: where formats are exported before they are uploaded.
pub const STAGING_DIR: &str = "deploy-staging";

/// `export-model`'s code, one format at a time.
#[derive(Debug)]
pub struct ExportModel<'a> {
    settings: &'a Settings,
}

impl<'a> ExportModel<'a> {
    pub fn new(settings: &'a Settings) -> Self {
        Self { settings }
    }
}

impl Exporter for ExportModel<'_> {
    fn export(
        &self,
        kind: ModelKind,
        format: ServingFormat,
        model_dir: &Path,
        out: &Path,
    ) -> Result<()> {
        let to = match format {
            ServingFormat::Hf => ExportFormat::Hf,
            ServingFormat::Peft => ExportFormat::Peft,
            ServingFormat::GgufF16 => ExportFormat::GgufF16,
            ServingFormat::GgufQ8_0 => ExportFormat::GgufQ8_0,
            ServingFormat::GgufLora => ExportFormat::GgufLora,
        };
        let args = ExportModelArgs {
            model: model_dir.display().to_string(),
            to,
            // A directory: GGUF formats write `model.gguf` and the `Modelfile` into it.
            out: out.to_path_buf(),
            dtype: None,
            base_model_id: None,
        };
        export_located(Some(self.settings), model_dir, kind, &args).map(|_| ())
    }
}

/// Reads the secrets the configured notifications need; in Actions, masks them first.
fn notifiers(settings: &Settings) -> Result<Notifiers> {
    let actions = crate::forge::actions::ActionsEnv::from_env();
    let mut out = Notifiers {
        backoff: Duration::from_millis(crate::app::pull::backoff_base_ms()),
        ..Default::default()
    };
    if let Some(webhook) = &settings.deploy.webhook {
        let secret = SecretString::from_env(&webhook.secret_env, "deploy webhook")?;
        if actions.in_actions {
            actions.mask(secret.expose());
        }
        out.webhook = Some((webhook.clone(), secret));
    }
    if let Some(dispatch) = &settings.deploy.repository_dispatch {
        let token = SecretToken::from_env(&dispatch.token_env)?;
        if actions.in_actions {
            actions.mask(token.expose());
        }
        let policy = RetryPolicy {
            server_error_backoff: out.backoff,
            ..RetryPolicy::default()
        };
        out.dispatch = Some((dispatch.clone(), token, policy));
    }
    if let Some(hub) = &settings.deploy.hub {
        let token = SecretString::from_env(&hub.token_env, "Hugging Face Hub")?;
        if actions.in_actions {
            actions.mask(token.expose());
        }
        out.hub = Some((hub.clone(), token));
    }
    Ok(out)
}

/// `rlhf-bot deploy`. An incomplete deployment (a notification failed) is an error after the
/// report was printed by `print`.
pub async fn deploy_cmd(
    settings: &Settings,
    args: &DeployArgs,
    print: impl FnOnce(&DeployReport) -> Result<()>,
) -> Result<()> {
    let kinds = match args.kind {
        DeployKind::All => vec![ModelKind::Reward, ModelKind::Policy],
        DeployKind::Reward => vec![ModelKind::Reward],
        DeployKind::Policy => vec![ModelKind::Policy],
    };
    let registry = Registry::load(&settings.registry.path)
        .context("`deploy` publishes what the registry names as production")?;
    let notifiers = if args.dry_run {
        Notifiers::default()
    } else {
        notifiers(settings)?
    };
    let artifacts = settings.registry.open_artifacts()?;
    let root = crate::artifacts::object_root(&settings.registry.artifacts)?;
    let production = ProductionStore::new(root);
    let request = DeployRequest {
        kinds,
        settings: &settings.deploy,
        dry_run: args.dry_run,
        now: crate::app::check::now()?,
        staging: settings.store.dir.join(STAGING_DIR),
    };
    let exporter = ExportModel { settings };
    let report = crate::deploy::deploy(
        &registry,
        &*artifacts,
        &production,
        &exporter,
        &notifiers,
        &request,
    )
    .await?;
    print(&report)?;
    let incomplete = report.incomplete();
    if let Some(first) = incomplete.first() {
        let ids: Vec<String> = incomplete
            .iter()
            .map(|k| format!("{} {}", k.kind, k.id.as_deref().unwrap_or("?")))
            .collect();
        bail!(
            "the deployment of {} is live but incomplete (recorded in {}): {}\nhint: the next `rlhf-bot deploy` sends the notification again",
            ids.join(", "),
            report.records,
            first.error.as_deref().unwrap_or("a notification failed")
        );
    }
    Ok(())
}

/// What `deploy` last published per kind, best effort: showing the registry or rendering a
/// report must not fail because the artifact store is unreachable (or, for a directory, does
/// not exist yet); a warning says why it is empty.
pub async fn live_best_effort(settings: &Settings) -> BTreeMap<ModelKind, LiveView> {
    if let ArtifactLocation::Dir(dir) = &settings.registry.artifacts
        && !dir.is_dir()
    {
        return BTreeMap::new();
    }
    let live = match crate::artifacts::object_root(&settings.registry.artifacts) {
        Ok(root) => crate::deploy::live(&ProductionStore::new(root)).await,
        Err(e) => Err(e.into()),
    };
    live.unwrap_or_else(|e| {
        tracing::warn!("cannot read what is deployed: {e:#}");
        BTreeMap::new()
    })
}

/// [`live_best_effort`] for synchronous callers (the report), on the binary's multi-threaded
/// runtime; elsewhere (no runtime, or a current-thread one that cannot block) it is empty.
pub fn live_blocking(settings: &Settings) -> BTreeMap<ModelKind, LiveView> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(live_best_effort(settings)))
        }
        _ => BTreeMap::new(),
    }
}
