//! The model registry: one YAML file in the team's repository listing every model version we
//! trained (reward models and policies), where its files are, what data and config made it, how
//! it scored, and which version holds the `production` alias.
//!
//! It is git-native on purpose: a promotion is a reviewed diff in a pull request, and merging the
//! PR is the act of promotion. So the file is written with a fixed layout (entries sorted by kind,
//! then creation time, then id; map keys sorted; a fixed header) so that adding one model changes
//! only the lines of that model, and loading then saving an unchanged file reproduces it byte for
//! byte. Everything is validated on load, with errors that name the file and the model id.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use crate::artifacts::{ArtifactError, ArtifactRef, ArtifactStore};
pub use crate::model_kind::ModelKind;

/// The layout version written into the file; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// The alias that marks the model serving users; exactly one holder per kind (or none yet).
pub const PRODUCTION: &str = "production";

/// The alias of the model a promotion replaced: [`Registry::rollback`] returns production to it.
pub const PREVIOUS: &str = "previous";

const HEADER: &str = "# Model registry written by rlhf-bot. Promote a model by merging the pull request that moves\n# its `production` alias; hand edits are validated on the next run.\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    /// Trained and evaluated, awaiting review.
    Candidate,
    /// Holds the `production` alias.
    Production,
    /// Replaced or rejected; kept for lineage.
    Archived,
}

/// The feedback a model was trained on: enough to count "new feedback since" and to prove two
/// runs saw the same examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackSnapshot {
    /// The feedback store's watermark (opaque cursor) when the dataset was built.
    pub watermark: String,
    /// Examples per kind (e.g. `pairs`, `pointwise`, `steps`).
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    /// sha256 of the exported training examples.
    pub examples_sha256: String,
}

/// One model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub id: String,
    pub kind: ModelKind,
    #[serde(with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Workflow run URL when trained in GitHub Actions (see [`created_by_from_env`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    pub base_model: String,
    /// The commit a Hub base model (`hf://ORG/NAME@REVISION`) resolved to when this version was
    /// trained: the revision pinned, so the base can be fetched again byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_commit: Option<String>,
    /// The model version this one was trained from (usually the production model of its kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// `reward`, `ppo`, `dpo`, `kto`, ...
    pub algorithm: String,
    pub config_sha256: String,
    pub feedback: FeedbackSnapshot,
    pub artifact: ArtifactRef,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub status: ModelStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The cluster job that trained this version (`train.backend: ray`); absent when it was
    /// trained on the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_job: Option<ClusterJob>,
}

/// A training job on a cluster, as the registry's lineage records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterJob {
    /// `ray`.
    pub backend: String,
    /// The Jobs API address (the head's dashboard URL).
    pub address: String,
    /// The job's submission id (the run id).
    pub submission_id: String,
    /// What the job ran: `openrlhf`, `trl` or `rlhf-bot`.
    pub entrypoint: String,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub version: u32,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            version: FORMAT_VERSION,
            models: Vec::new(),
        }
    }
}

/// A rule the registry's content breaks. Each names the model id involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error(
        "model id `{id}` appears more than once\nhint: model ids must be unique; rename or remove one entry"
    )]
    DuplicateId { id: String },
    #[error(
        "alias `{alias}` is held by two {kind} models, `{first}` and `{second}`\nhint: an alias names exactly one model per kind; remove it from one of them"
    )]
    AliasConflict {
        kind: ModelKind,
        alias: String,
        first: String,
        second: String,
    },
    #[error(
        "model `{id}` names parent `{parent}`, which is not in the registry\nhint: restore the parent entry or remove the `parent` field"
    )]
    UnknownParent { id: String, parent: String },
    #[error("model `{id}` has no usable artifact: {reason}")]
    MissingArtifact { id: String, reason: String },
    #[error(
        "model `{id}` has status `{status:?}` but {detail}\nhint: a model has status `production` exactly when it holds the `production` alias; use `promote` rather than editing by hand"
    )]
    StatusMismatch {
        id: String,
        status: ModelStatus,
        detail: &'static str,
    },
    #[error("model `{id}`: {reason}")]
    BadField { id: String, reason: String },
    #[error(
        "no model with id `{id}` in the registry\nhint: `rlhf-bot registry show` lists the ids"
    )]
    UnknownId { id: String },
    #[error(
        "no {kind} model is marked `previous`, so there is nothing to roll back to\nhint: `previous` is set when a promotion replaces a production model; use `rlhf-bot promote ID` to choose one by hand"
    )]
    NoPrevious { kind: ModelKind },
    #[error(
        "registry format version {found} is not supported (this rlhf-bot writes version {FORMAT_VERSION})\nhint: upgrade rlhf-bot"
    )]
    Version { found: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read model registry {}: {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("cannot write model registry {}: {source}", file.display())]
    Write { file: PathBuf, source: io::Error },
    #[error("cannot parse model registry {}: at `{path}`: {message}\nhint: compare the file with docs/report.md (registry format)", file.display())]
    Parse {
        file: PathBuf,
        path: String,
        message: String,
    },
    #[error("cannot parse model registry {}:{}: {deep}", file.display(), deep.line)]
    TooDeep {
        file: PathBuf,
        deep: crate::nesting::TooDeep,
    },
    #[error("cannot serialise the model registry: {0}")]
    Serialize(String),
    #[error("invalid model registry {}: {problem}", file.display())]
    Invalid { file: PathBuf, problem: Problem },
    #[error("model registry {}: artifact of model `{id}` failed verification: {source}", file.display())]
    Artifact {
        file: PathBuf,
        id: String,
        source: Box<ArtifactError>,
    },
    #[error(transparent)]
    Rejected(#[from] Problem),
}

/// What [`Registry::promote`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub promoted: String,
    /// The former production model, now archived (`None` on the first promotion).
    pub archived: Option<String>,
}

/// What [`Registry::rollback`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The model that holds `production` again.
    pub restored: String,
    /// The model that held it, now archived (`None` when no model held it).
    pub retired: Option<String>,
}

/// `created_by` value for a model trained now: the workflow run URL when the GitHub Actions
/// variables are present. `env` is a lookup (pass `|k| std::env::var(k).ok()`), so tests need not
/// mutate the process environment.
pub fn created_by_from_env(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let server = get("GITHUB_SERVER_URL")?;
    let repo = get("GITHUB_REPOSITORY")?;
    let run = get("GITHUB_RUN_ID")?;
    let mut url = format!("{}/{repo}/actions/runs/{run}", server.trim_end_matches('/'));
    if let Some(attempt) = get("GITHUB_RUN_ATTEMPT").filter(|a| a != "1") {
        url.push_str(&format!("/attempts/{attempt}"));
    }
    Some(url)
}

impl Registry {
    /// Reads and validates `file`. A missing file is an error; use [`Registry::load_or_default`]
    /// for the first run.
    pub fn load(file: &Path) -> Result<Self, RegistryError> {
        let text = fs::read_to_string(file).map_err(|source| RegistryError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Self::from_yaml(file, &text)
    }

    /// Like [`Registry::load`], but an absent file is an empty registry (no model trained yet).
    pub fn load_or_default(file: &Path) -> Result<Self, RegistryError> {
        match fs::metadata(file) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            _ => Self::load(file),
        }
    }

    /// Loads, then verifies every entry's artifact checksums through `store` (slow: it hashes
    /// every file).
    pub fn load_verified(file: &Path, store: &dyn ArtifactStore) -> Result<Self, RegistryError> {
        let registry = Self::load(file)?;
        for model in &registry.models {
            store
                .verify(&model.artifact)
                .map_err(|source| RegistryError::Artifact {
                    file: file.to_path_buf(),
                    id: model.id.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(registry)
    }

    /// Parses and validates YAML text; `file` is used only in error messages.
    pub fn from_yaml(file: &Path, text: &str) -> Result<Self, RegistryError> {
        use crate::nesting;
        nesting::check(text, nesting::MAX_DEPTH).map_err(|deep| RegistryError::TooDeep {
            file: file.to_path_buf(),
            deep,
        })?;
        let de = serde_norway::Deserializer::from_str(text);
        let registry: Registry =
            serde_path_to_error::deserialize(de).map_err(|e| RegistryError::Parse {
                file: file.to_path_buf(),
                path: e.path().to_string(),
                message: e.into_inner().to_string(),
            })?;
        registry
            .validate()
            .map_err(|problem| RegistryError::Invalid {
                file: file.to_path_buf(),
                problem,
            })?;
        Ok(registry)
    }

    /// The canonical text of this registry: sorted, with the fixed header.
    pub fn to_yaml(&self) -> Result<String, RegistryError> {
        let mut canonical = self.clone();
        canonical.normalize();
        let body = serde_norway::to_string(&canonical)
            .map_err(|e| RegistryError::Serialize(e.to_string()))?;
        Ok(format!("{HEADER}{body}"))
    }

    /// Validates and writes the canonical text atomically (temporary file in the same directory,
    /// fsync, rename), so a crash never leaves a truncated registry in the repository.
    pub fn save(&self, file: &Path) -> Result<(), RegistryError> {
        self.validate().map_err(|problem| RegistryError::Invalid {
            file: file.to_path_buf(),
            problem,
        })?;
        let text = self.to_yaml()?;
        let write_err = |source| RegistryError::Write {
            file: file.to_path_buf(),
            source,
        };
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(write_err)?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::artifacts::remove_dead_leftovers(&dir, ".tmp-");
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, file)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write_err)
    }

    /// Sorts entries and aliases into the canonical order.
    pub fn normalize(&mut self) {
        for m in &mut self.models {
            m.aliases.sort();
            m.aliases.dedup();
        }
        self.models
            .sort_by(|a, b| (a.kind, a.created_at, &a.id).cmp(&(b.kind, b.created_at, &b.id)));
    }

    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), Problem> {
        if self.version != FORMAT_VERSION {
            return Err(Problem::Version {
                found: self.version,
            });
        }
        let mut ids = BTreeSet::new();
        for m in &self.models {
            if !ids.insert(m.id.as_str()) {
                return Err(Problem::DuplicateId { id: m.id.clone() });
            }
        }
        let mut holders: BTreeMap<(ModelKind, &str), &str> = BTreeMap::new();
        for m in &self.models {
            check_entry(m)?;
            if let Some(parent) = &m.parent
                && !ids.contains(parent.as_str())
            {
                return Err(Problem::UnknownParent {
                    id: m.id.clone(),
                    parent: parent.clone(),
                });
            }
            for alias in &m.aliases {
                if let Some(first) = holders.insert((m.kind, alias.as_str()), m.id.as_str()) {
                    if first == m.id {
                        continue; // the same alias listed twice on one entry; normalize dedups it
                    }
                    return Err(Problem::AliasConflict {
                        kind: m.kind,
                        alias: alias.clone(),
                        first: first.to_string(),
                        second: m.id.clone(),
                    });
                }
            }
            let holds = m.aliases.iter().any(|a| a == PRODUCTION);
            match (m.status, holds) {
                (ModelStatus::Production, false) => {
                    return Err(Problem::StatusMismatch {
                        id: m.id.clone(),
                        status: m.status,
                        detail: "it does not hold the `production` alias",
                    });
                }
                (ModelStatus::Candidate | ModelStatus::Archived, true) => {
                    return Err(Problem::StatusMismatch {
                        id: m.id.clone(),
                        status: m.status,
                        detail: "it holds the `production` alias",
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.id == id)
    }

    /// Adds a freshly trained model as a candidate (its status and aliases are reset: only
    /// [`Registry::promote`] grants `production`). The entry must be valid and its id new.
    pub fn add_candidate(&mut self, mut entry: ModelEntry) -> Result<(), Problem> {
        entry.status = ModelStatus::Candidate;
        // The file keeps whole seconds; truncating here keeps memory and file in the same order.
        entry.created_at = entry.created_at.trunc_subsecs(0);
        entry.aliases.retain(|a| a != PRODUCTION);
        if self.get(&entry.id).is_some() {
            return Err(Problem::DuplicateId { id: entry.id });
        }
        check_entry(&entry)?;
        if let Some(parent) = &entry.parent
            && self.get(parent).is_none()
        {
            return Err(Problem::UnknownParent {
                id: entry.id.clone(),
                parent: parent.clone(),
            });
        }
        self.models.push(entry);
        self.normalize();
        self.validate()
    }

    /// Moves the `production` alias of the model's kind to `id`. The former holder is archived
    /// and takes the `previous` alias (from whoever held it), so [`Registry::rollback`] — or
    /// reverting the merge that made this change — brings it back. Promoting the current holder
    /// again changes nothing.
    pub fn promote(&mut self, id: &str) -> Result<Promotion, Problem> {
        let kind = self
            .get(id)
            .ok_or_else(|| Problem::UnknownId { id: id.to_string() })?
            .kind;
        if self.production(kind).is_some_and(|m| m.id == id) {
            return Ok(Promotion {
                promoted: id.to_string(),
                archived: None,
            });
        }
        let mut archived = None;
        for m in self.models.iter_mut().filter(|m| m.kind == kind) {
            m.aliases.retain(|a| a != PREVIOUS);
            if m.id == id {
                m.aliases.push(PRODUCTION.to_string());
                m.status = ModelStatus::Production;
            } else if m.aliases.iter().any(|a| a == PRODUCTION) {
                m.aliases.retain(|a| a != PRODUCTION);
                m.aliases.push(PREVIOUS.to_string());
                m.status = ModelStatus::Archived;
                archived = Some(m.id.clone());
            }
        }
        self.normalize();
        self.validate()?;
        Ok(Promotion {
            promoted: id.to_string(),
            archived,
        })
    }

    /// Returns the `production` alias of `kind` to the model holding `previous`; the model that
    /// held production is archived. Fails when no model of that kind is marked `previous`.
    pub fn rollback(&mut self, kind: ModelKind) -> Result<Rollback, Problem> {
        let previous = self
            .models
            .iter()
            .find(|m| m.kind == kind && m.aliases.iter().any(|a| a == PREVIOUS))
            .map(|m| m.id.clone())
            .ok_or(Problem::NoPrevious { kind })?;
        let mut retired = None;
        for m in self.models.iter_mut().filter(|m| m.kind == kind) {
            if m.id == previous {
                m.aliases.retain(|a| a != PREVIOUS);
                m.aliases.push(PRODUCTION.to_string());
                m.status = ModelStatus::Production;
            } else if m.aliases.iter().any(|a| a == PRODUCTION) {
                m.aliases.retain(|a| a != PRODUCTION);
                m.status = ModelStatus::Archived;
                retired = Some(m.id.clone());
            }
        }
        self.normalize();
        self.validate()?;
        Ok(Rollback {
            restored: previous,
            retired,
        })
    }

    /// The models still awaiting review (status `candidate`), oldest first.
    pub fn candidates(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models
            .iter()
            .filter(|m| m.status == ModelStatus::Candidate)
    }

    /// The model of `kind` holding the `production` alias, if any.
    pub fn production(&self, kind: ModelKind) -> Option<&ModelEntry> {
        self.models
            .iter()
            .find(|m| m.kind == kind && m.aliases.iter().any(|a| a == PRODUCTION))
    }

    /// The most recently trained model of `kind` (any status): its id, when, and on what data.
    /// The decision stage counts feedback newer than this snapshot's watermark.
    pub fn last_training(
        &self,
        kind: ModelKind,
    ) -> Option<(&str, DateTime<Utc>, &FeedbackSnapshot)> {
        self.models
            .iter()
            .filter(|m| m.kind == kind)
            .max_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)))
            .map(|m| (m.id.as_str(), m.created_at, &m.feedback))
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Field-level rules for one entry.
fn check_entry(m: &ModelEntry) -> Result<(), Problem> {
    let bad = |reason: String| Problem::BadField {
        id: m.id.clone(),
        reason,
    };
    let id_ok = !m.id.is_empty()
        && !m.id.starts_with('.')
        && m.id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if !id_ok {
        return Err(bad("the id may hold only ASCII letters, digits and `-_.+` and may not be empty or start with `.`".into()));
    }
    if m.artifact.uri.trim().is_empty() {
        return Err(Problem::MissingArtifact {
            id: m.id.clone(),
            reason: "`artifact.uri` is empty".into(),
        });
    }
    if !is_sha256(&m.artifact.sha256) {
        return Err(Problem::MissingArtifact {
            id: m.id.clone(),
            reason: format!(
                "`artifact.sha256` is `{}`, not 64 lower-case hex digits",
                m.artifact.sha256
            ),
        });
    }
    if !is_sha256(&m.config_sha256) {
        return Err(bad(format!(
            "`config_sha256` is `{}`, not 64 lower-case hex digits",
            m.config_sha256
        )));
    }
    if m.parent.as_deref() == Some(m.id.as_str()) {
        return Err(bad("a model cannot be its own parent".into()));
    }
    if let Some((name, value)) = m.metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(bad(format!(
            "metric `{name}` is {value}; metrics must be finite numbers"
        )));
    }
    if let Some(alias) = m.aliases.iter().find(|a| a.trim().is_empty()) {
        return Err(bad(format!("alias `{alias}` is empty")));
    }
    Ok(())
}

/// Timestamps are written as RFC 3339 UTC with whole seconds (`2026-11-27T09:56:04Z`): stable and
/// readable in diffs. Sub-second input is accepted and truncated.
mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc).trunc_subsecs(0))
            .map_err(|e| {
                serde::de::Error::custom(format!("`{s}` is not an RFC 3339 timestamp ({e})"))
            })
    }
}
