//! Registry file format, validation and promotion; artifact store checksums.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use chrono::{TimeZone, Utc};
use rlhf_bot::artifacts::{ArtifactError, ArtifactRef, ArtifactStore, FileStore, MANIFEST};
use rlhf_bot::registry::{
    FeedbackSnapshot, ModelEntry, ModelKind, ModelStatus, PRODUCTION, Problem, Registry,
    RegistryError, created_by_from_env,
};

fn sha(c: char) -> String {
    c.to_string().repeat(64)
}

/// A valid entry with fixed, distinct values.
pub fn entry(id: &str, kind: ModelKind, day: u32, parent: Option<&str>) -> ModelEntry {
    ModelEntry {
        id: id.to_string(),
        kind,
        created_at: Utc.with_ymd_and_hms(2026, 11, day, 6, 30, 0).unwrap(),
        created_by: Some(format!(
            "https://github.com/acme/assistant/actions/runs/{day}00"
        )),
        base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        base_model_commit: None,
        parent: parent.map(String::from),
        algorithm: if kind == ModelKind::Reward {
            "reward".into()
        } else {
            "ppo".into()
        },
        config_sha256: sha('c'),
        feedback: FeedbackSnapshot {
            watermark: format!("2026-11-{day:02}T06:00:00Z"),
            counts: BTreeMap::from([
                ("pairs".to_string(), 120 + day as u64),
                ("steps".to_string(), 7),
            ]),
            examples_sha256: sha('e'),
        },
        artifact: ArtifactRef {
            uri: format!("file:///srv/models/{kind}/{id}/"),
            sha256: sha('a'),
            size_bytes: 1_048_576 + day as u64,
        },
        metrics: BTreeMap::from([
            ("eval_accuracy".to_string(), 0.625),
            ("eval_n".to_string(), 400.0),
        ]),
        status: ModelStatus::Candidate,
        aliases: vec![],
        cluster_job: None,
    }
}

fn sample_registry() -> Registry {
    let mut reg = Registry::default();
    reg.add_candidate(entry("rm-001", ModelKind::Reward, 1, None))
        .unwrap();
    reg.add_candidate(entry("pol-001", ModelKind::Policy, 2, None))
        .unwrap();
    reg.add_candidate(entry("rm-002", ModelKind::Reward, 20, Some("rm-001")))
        .unwrap();
    reg.promote("rm-001").unwrap();
    reg.promote("pol-001").unwrap();
    reg
}

#[test]
fn round_trip_is_byte_stable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("models/registry.yaml");
    let reg = sample_registry();
    reg.save(&file).unwrap();
    let first = fs::read_to_string(&file).unwrap();
    let loaded = Registry::load(&file).unwrap();
    assert_eq!(loaded, reg);
    loaded.save(&file).unwrap();
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        first,
        "load + save must not change a byte"
    );
    // Reward models first, then by creation time; map keys sorted.
    let order: Vec<&str> = loaded.models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(order, ["rm-001", "rm-002", "pol-001"]);
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("registry_yaml", first);
    });
}

#[test]
fn adding_a_model_only_adds_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.yaml");
    let mut reg = sample_registry();
    reg.save(&file).unwrap();
    let before = fs::read_to_string(&file).unwrap();
    reg.add_candidate(entry("rm-003", ModelKind::Reward, 25, Some("rm-002")))
        .unwrap();
    reg.save(&file).unwrap();
    let after = fs::read_to_string(&file).unwrap();
    let before_lines: Vec<&str> = before.lines().collect();
    let after_lines: Vec<&str> = after.lines().collect();
    // The new entry sorts after rm-002 and before the policies: the old lines stay, in order.
    let mut it = after_lines.iter();
    for line in &before_lines {
        assert!(
            it.any(|l| l == line),
            "line `{line}` was changed or reordered"
        );
    }
    assert!(after_lines.len() > before_lines.len());
}

#[test]
fn no_atomic_save_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.yaml");
    sample_registry().save(&file).unwrap();
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["registry.yaml"]);
}

fn load_text(text: &str) -> Result<Registry, RegistryError> {
    Registry::from_yaml(Path::new("models/registry.yaml"), text)
}

fn yaml_of(reg: &Registry) -> String {
    // Bypass `save`'s validation to produce a broken file on purpose.
    serde_norway::to_string(reg).unwrap()
}

#[test]
fn two_holders_of_production_in_one_kind_are_rejected() {
    let mut reg = sample_registry();
    let rm2 = reg.models.iter_mut().find(|m| m.id == "rm-002").unwrap();
    rm2.aliases.push(PRODUCTION.into());
    rm2.status = ModelStatus::Production;
    let err = load_text(&yaml_of(&reg)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            RegistryError::Invalid { problem: Problem::AliasConflict { first, second, .. }, .. }
                if first == "rm-001" && second == "rm-002"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("models/registry.yaml") && msg.contains("rm-001") && msg.contains("rm-002"),
        "{msg}"
    );
}

#[test]
fn the_same_alias_in_two_kinds_is_fine() {
    let reg = sample_registry();
    assert_eq!(reg.production(ModelKind::Reward).unwrap().id, "rm-001");
    assert_eq!(reg.production(ModelKind::Policy).unwrap().id, "pol-001");
    load_text(&yaml_of(&reg)).unwrap();
}

#[test]
fn custom_aliases_are_unique_per_kind_too() {
    let mut reg = sample_registry();
    for m in reg
        .models
        .iter_mut()
        .filter(|m| m.kind == ModelKind::Reward)
    {
        m.aliases.push("staging".into());
    }
    let err = load_text(&yaml_of(&reg)).unwrap_err();
    assert!(err.to_string().contains("`staging`"), "{err}");
}

#[test]
fn duplicate_ids_are_rejected_with_file_and_id() {
    let mut reg = sample_registry();
    let mut dup = entry("rm-002", ModelKind::Reward, 21, None);
    dup.created_by = None;
    reg.models.push(dup.clone());
    let err = load_text(&yaml_of(&reg)).unwrap_err();
    assert!(
        matches!(&err, RegistryError::Invalid { problem: Problem::DuplicateId { id }, .. } if id == "rm-002")
    );
    assert!(
        err.to_string()
            .starts_with("invalid model registry models/registry.yaml: model id `rm-002`"),
        "{err}"
    );
    // add_candidate refuses it as well.
    let mut reg = sample_registry();
    assert_eq!(
        reg.add_candidate(dup).unwrap_err(),
        Problem::DuplicateId {
            id: "rm-002".into()
        }
    );
}

#[test]
fn unknown_parent_and_bad_artifact_are_rejected() {
    let mut reg = sample_registry();
    reg.models
        .push(entry("rm-009", ModelKind::Reward, 22, Some("rm-404")));
    let err = load_text(&yaml_of(&reg)).unwrap_err();
    assert!(err.to_string().contains("parent `rm-404`"), "{err}");

    let mut reg = sample_registry();
    reg.models[0].artifact.sha256 = "abc".into();
    let err = load_text(&yaml_of(&reg)).unwrap_err();
    assert!(
        matches!(&err, RegistryError::Invalid { problem: Problem::MissingArtifact { id, .. }, .. } if id == "rm-001"),
        "{err}"
    );
}

#[test]
fn parse_errors_name_the_key() {
    let text = yaml_of(&sample_registry()).replacen("kind: reward", "kind: rewardd", 1);
    let err = load_text(&text).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("models[0].kind") && msg.contains("rewardd"),
        "{msg}"
    );
    let err = load_text("version: 1\nmodels: []\nextra: 1\n").unwrap_err();
    assert!(err.to_string().contains("extra"), "{err}");
    let err = load_text("version: 7\nmodels: []\n").unwrap_err();
    assert!(err.to_string().contains("version 7"), "{err}");
}

#[test]
fn promote_moves_the_alias_and_archives_the_old_holder() {
    let mut reg = sample_registry();
    let p = reg.promote("rm-002").unwrap();
    assert_eq!(p.archived.as_deref(), Some("rm-001"));
    assert_eq!(reg.production(ModelKind::Reward).unwrap().id, "rm-002");
    let old = reg.get("rm-001").unwrap();
    assert_eq!(old.status, ModelStatus::Archived);
    // The replaced model is marked `previous`, so a rollback (or a revert) can restore it.
    assert_eq!(old.aliases, vec!["previous".to_string()]);
    // The policy alias is untouched; promoting again is a no-op.
    assert_eq!(reg.production(ModelKind::Policy).unwrap().id, "pol-001");
    assert_eq!(reg.promote("rm-002").unwrap().archived, None);
    assert_eq!(
        reg.promote("nope").unwrap_err(),
        Problem::UnknownId { id: "nope".into() }
    );
}

#[test]
fn status_and_alias_must_agree() {
    let mut reg = sample_registry();
    reg.models
        .iter_mut()
        .find(|m| m.id == "rm-002")
        .unwrap()
        .status = ModelStatus::Production;
    let err = load_text(&yaml_of(&reg)).unwrap_err();
    assert!(err.to_string().contains("rm-002"), "{err}");
}

#[test]
fn add_candidate_cannot_grant_production() {
    let mut reg = sample_registry();
    let mut e = entry("rm-003", ModelKind::Reward, 23, Some("rm-002"));
    e.status = ModelStatus::Production;
    e.aliases = vec![PRODUCTION.into()];
    reg.add_candidate(e).unwrap();
    let m = reg.get("rm-003").unwrap();
    assert_eq!(m.status, ModelStatus::Candidate);
    assert!(m.aliases.is_empty());
    assert_eq!(reg.production(ModelKind::Reward).unwrap().id, "rm-001");
}

#[test]
fn last_training_is_the_newest_of_its_kind() {
    let reg = sample_registry();
    let (id, at, snap) = reg.last_training(ModelKind::Reward).unwrap();
    assert_eq!(id, "rm-002");
    assert_eq!(at, Utc.with_ymd_and_hms(2026, 11, 20, 6, 30, 0).unwrap());
    assert_eq!(snap.watermark, "2026-11-20T06:00:00Z");
    assert_eq!(reg.last_training(ModelKind::Policy).unwrap().0, "pol-001");
    assert!(
        Registry::default()
            .last_training(ModelKind::Reward)
            .is_none()
    );
}

#[test]
fn missing_file_is_an_empty_registry_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("none.yaml");
    assert!(Registry::load_or_default(&file).unwrap().models.is_empty());
    let err = Registry::load(&file).unwrap_err();
    assert!(err.to_string().contains("none.yaml"), "{err}");
}

#[test]
fn created_by_comes_from_the_actions_environment() {
    let env = BTreeMap::from([
        ("GITHUB_SERVER_URL", "https://github.com"),
        ("GITHUB_REPOSITORY", "acme/assistant"),
        ("GITHUB_RUN_ID", "123"),
    ]);
    let get = |k: &str| env.get(k).map(|v| v.to_string());
    assert_eq!(
        created_by_from_env(get).as_deref(),
        Some("https://github.com/acme/assistant/actions/runs/123")
    );
    assert_eq!(created_by_from_env(|_| None), None);
}

// ---- artifact store ----

fn model_dir(root: &Path) -> std::path::PathBuf {
    let src = root.join("src-model");
    fs::create_dir_all(src.join("tokenizer")).unwrap();
    fs::write(src.join("config.json"), br#"{"hidden_size": 8}"#).unwrap();
    fs::write(src.join("model.safetensors"), vec![7u8; 4096]).unwrap();
    fs::write(src.join("tokenizer/tokenizer.json"), b"{}").unwrap();
    src
}

#[test]
fn artifact_store_round_trip_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::new(tmp.path().join("store")).unwrap();
    let src = model_dir(tmp.path());
    let art = store.put(ModelKind::Reward, "rm-001", &src).unwrap();
    let expected_dir = store.root().join("reward/rm-001");
    assert_eq!(art.uri, format!("file://{}/", expected_dir.display()));
    assert_eq!(art.size_bytes, 18 + 4096 + 2);
    let manifest = fs::read_to_string(expected_dir.join(MANIFEST)).unwrap();
    let paths: Vec<&str> = manifest
        .lines()
        .map(|l| l.split_once("  ").unwrap().1)
        .collect();
    assert_eq!(
        paths,
        [
            "config.json",
            "model.safetensors",
            "tokenizer/tokenizer.json"
        ]
    );
    assert_eq!(store.materialize(&art).unwrap(), expected_dir);
    // Storing the same content again is a no-op; different content under the same id is refused.
    assert_eq!(store.put(ModelKind::Reward, "rm-001", &src).unwrap(), art);
    fs::write(src.join("config.json"), b"{}").unwrap();
    assert!(matches!(
        store.put(ModelKind::Reward, "rm-001", &src),
        Err(ArtifactError::Conflict { .. })
    ));
    assert!(store.put(ModelKind::Reward, "../evil", &src).is_err());
}

#[test]
fn artifact_checksum_mismatch_is_detected_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::new(tmp.path().join("store")).unwrap();
    let art = store
        .put(ModelKind::Policy, "pol-001", &model_dir(tmp.path()))
        .unwrap();
    let dir = store.materialize(&art).unwrap();
    store.verify(&art).unwrap();

    fs::write(dir.join("tokenizer/tokenizer.json"), b"{ }").unwrap();
    let err = store.verify(&art).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Mismatch { file, .. } if file == "tokenizer/tokenizer.json"),
        "{err}"
    );
    assert!(
        err.to_string().contains("`tokenizer/tokenizer.json`"),
        "{err}"
    );
    fs::write(dir.join("tokenizer/tokenizer.json"), b"{}").unwrap();

    fs::write(dir.join("stray.bin"), b"x").unwrap();
    assert!(
        matches!(store.verify(&art), Err(ArtifactError::Unlisted { file, .. }) if file == "stray.bin")
    );
    fs::remove_file(dir.join("stray.bin")).unwrap();

    fs::remove_file(dir.join("config.json")).unwrap();
    assert!(
        matches!(store.verify(&art), Err(ArtifactError::Missing { file, .. }) if file == "config.json")
    );
}

#[test]
fn a_rewritten_manifest_does_not_fool_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::new(tmp.path().join("store")).unwrap();
    let art = store
        .put(ModelKind::Reward, "rm-001", &model_dir(tmp.path()))
        .unwrap();
    let dir = store.materialize(&art).unwrap();
    // Tamper with a file and "fix" the manifest: the registry's digest still catches it.
    fs::write(dir.join("config.json"), b"{\"hidden_size\": 9}").unwrap();
    let entries = rlhf_bot::artifacts::hash_dir(&dir).unwrap();
    fs::write(
        dir.join(MANIFEST),
        rlhf_bot::artifacts::manifest_text(&entries),
    )
    .unwrap();
    let err = store.verify(&art).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Mismatch { file, .. } if file == MANIFEST),
        "{err}"
    );
}

#[test]
fn load_verified_names_the_model_with_a_bad_artifact() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::new(tmp.path().join("store")).unwrap();
    let art = store
        .put(ModelKind::Reward, "rm-001", &model_dir(tmp.path()))
        .unwrap();
    let mut e = entry("rm-001", ModelKind::Reward, 1, None);
    e.artifact = art.clone();
    let mut reg = Registry::default();
    reg.add_candidate(e).unwrap();
    let file = tmp.path().join("registry.yaml");
    reg.save(&file).unwrap();
    Registry::load_verified(&file, &store).unwrap();
    fs::write(
        store.path_of(&art.uri).unwrap().join("model.safetensors"),
        b"oops",
    )
    .unwrap();
    let err = Registry::load_verified(&file, &store).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rm-001")
            && msg.contains("model.safetensors")
            && msg.contains("registry.yaml"),
        "{msg}"
    );
}

/// Issue 14: what a `kill -9` left behind (a staging directory of a half-copied artifact, a
/// registry temp file) is removed by the next store or save, but never what a live process owns.
#[test]
fn leftovers_of_killed_runs_are_cleaned_up_but_live_ones_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::new(tmp.path().join("store")).unwrap();
    let kind_dir = store.root().join("reward");
    // pid_max on Linux is at most 2^22, so this pid never runs; pid 1 always does.
    let dead = kind_dir.join(".rm-000.partial-4294967295");
    let live = kind_dir.join(".rm-000.partial-1");
    for d in [&dead, &live] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("model.safetensors"), b"half").unwrap();
    }
    store
        .put(ModelKind::Reward, "rm-001", &model_dir(tmp.path()))
        .unwrap();
    if cfg!(target_os = "linux") {
        assert!(!dead.exists(), "the dead run's staging directory is left");
    }
    assert!(
        live.exists(),
        "a live process's staging directory was removed"
    );

    let reg_dir = tmp.path().join("models");
    fs::create_dir_all(&reg_dir).unwrap();
    let stale = reg_dir.join(".registry.yaml.tmp-4294967295");
    fs::write(&stale, "version: 1\n").unwrap();
    sample_registry()
        .save(&reg_dir.join("registry.yaml"))
        .unwrap();
    if cfg!(target_os = "linux") {
        assert!(!stale.exists());
    }
}
