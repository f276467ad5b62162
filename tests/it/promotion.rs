//! Merging is the promotion: the bot's PR moves `production` in its registry diff, `registry show`
//! prints fixed keys, `promote` verifies the artifact before it moves an alias, `rollback` gives
//! production back to the model marked `previous`, and a production model that fails its checksum
//! is never presented as "production" in the report (issue 14 finding 1, issue 15 §1).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rlhf_bot::registry::{ModelKind, Registry};

use crate::common::{Workspace, run, stderr, stdout};

fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let o = run(config, &all);
    assert!(
        o.status.success(),
        "{args:?} failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `registry show --format json`, with its fixed keys checked.
fn show(config: &Path) -> serde_json::Value {
    let v = json(config, &["registry", "show"]);
    assert_eq!(
        keys(&v),
        set(&["production", "candidates", "models", "deployed"]),
        "{v}"
    );
    assert_eq!(keys(&v["production"]), set(&["reward", "policy"]), "{v}");
    for m in v["models"].as_array().unwrap() {
        assert_eq!(
            keys(m),
            set(&[
                "id",
                "kind",
                "status",
                "aliases",
                "parent",
                "created_at",
                "metrics"
            ]),
            "{m}"
        );
    }
    v
}

/// One `run --force` on the test config (tiny models); returns its `run` summary.
fn forced_run(config: &Path, now: &str) -> serde_json::Value {
    crate::common::forced_run_json(config, now)["run"].clone()
}

/// The registry file the run's would-be PR carries.
fn proposed_registry(run: &serde_json::Value) -> Registry {
    let dir = PathBuf::from(run["publish"]["local_dir"].as_str().expect("local PR dir"));
    let file = walk(&dir.join("files"))
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "registry.yaml"))
        .expect("the PR carries the registry");
    Registry::load(&file).unwrap()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Appends one byte to the largest file of a stored model (its weights).
pub(crate) fn tamper(ws: &Workspace, kind: &str, id: &str) {
    let dir = ws.store_dir().join("artifacts").join(kind).join(id);
    let weights = walk(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap_or_else(|| panic!("no weights under {}", dir.display()));
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.push(0);
    std::fs::write(&weights, bytes).unwrap();
}

#[test]
fn the_pr_proposes_production_and_promote_and_rollback_mirror_merge_and_revert() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();

    // Day 1: the run registers candidates locally; its PR's registry makes them production.
    let first = forced_run(&cfg, "2026-11-27T12:00:00Z");
    let (r1, p1) = (
        first["registered"].as_str().unwrap().to_string(),
        first["registered_policy"].as_str().unwrap().to_string(),
    );
    let v = show(&cfg);
    assert_eq!(v["production"]["reward"], serde_json::Value::Null, "{v}");
    let candidates: BTreeSet<String> = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(candidates, set(&[&r1, &p1]));
    let proposed = proposed_registry(&first);
    assert_eq!(proposed.production(ModelKind::Reward).unwrap().id, r1);
    assert_eq!(proposed.production(ModelKind::Policy).unwrap().id, p1);
    // Issue 18 §3: the policy's lineage names the data it trained on.
    let lineage = &proposed.get(&p1).unwrap().feedback;
    assert_eq!(lineage.examples_sha256.len(), 64, "{lineage:?}");
    assert!(lineage.counts["examples"] > 0, "{lineage:?}");

    // `promote` does locally what merging does.
    json(&cfg, &["promote", &r1]);
    json(&cfg, &["promote", &p1]);
    let v = show(&cfg);
    assert_eq!(v["production"]["reward"], r1.as_str(), "{v}");
    assert_eq!(v["production"]["policy"], p1.as_str(), "{v}");
    assert!(v["candidates"].as_array().unwrap().is_empty(), "{v}");

    // Day 2: the next PR replaces production and keeps the old entry marked `previous`.
    let second = forced_run(&cfg, "2026-11-28T12:00:00Z");
    let r2 = second["registered"].as_str().unwrap().to_string();
    let proposed = proposed_registry(&second);
    assert_eq!(proposed.production(ModelKind::Reward).unwrap().id, r2);
    let old = proposed.get(&r1).unwrap();
    assert_eq!(old.aliases, vec!["previous".to_string()]);
    assert_eq!(
        proposed.get(&r2).unwrap().parent.as_deref(),
        Some(r1.as_str())
    );

    // A candidate whose files changed after registration is never promoted.
    tamper(&ws, "reward", &r2);
    let o = run(&cfg, &["promote", &r2]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("refusing to promote") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert_eq!(show(&cfg)["production"]["reward"], r1.as_str());

    // Rollback returns production to `previous` (after a promotion that replaced it).
    let p2 = second["registered_policy"].as_str().unwrap().to_string();
    json(&cfg, &["promote", &p2]);
    let back = json(&cfg, &["rollback", "policy"]);
    assert_eq!(back["production"], p1.as_str(), "{back}");
    assert_eq!(back["replaced"], p2.as_str(), "{back}");
    let v = show(&cfg);
    assert_eq!(v["production"]["policy"], p1.as_str(), "{v}");
    // Nothing left to roll back to: a clear error.
    let o = run(&cfg, &["rollback", "reward"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("marked `previous`"), "{}", stderr(&o));
}

#[test]
fn a_production_policy_that_fails_its_checksum_is_reported_as_unusable() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();
    let first = forced_run(&cfg, "2026-11-27T12:00:00Z");
    let p1 = first["registered_policy"].as_str().unwrap().to_string();
    json(&cfg, &["promote", &p1]);
    tamper(&ws, "policy", &p1);

    let second = forced_run(&cfg, "2026-11-28T12:00:00Z");
    assert_eq!(second["draft"], true, "{second}");
    let report = std::fs::read_to_string(second["report"].as_str().unwrap()).unwrap();
    assert!(
        !report.contains("win rate vs production"),
        "the report claims a comparison with production:\n{report}"
    );
    assert!(
        report.contains("Policy win rate vs the base model"),
        "{report}"
    );
    assert!(
        report.contains(&format!("production `{p1}` could not be used"))
            && report.contains("checksum mismatch"),
        "{report}"
    );
    assert!(
        report.contains("❌ | Production models pass their checksums"),
        "{report}"
    );
    // The headline does not pretend there is no production policy.
    assert!(
        !report.contains("There is no production policy"),
        "{report}"
    );
}
