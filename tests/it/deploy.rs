//! `rlhf-bot deploy` against a real S3 server (moto, see `moto.rs`) and real HTTP receivers (axum
//! on loopback): the production prefix is switched only after the payload, an upload that fails
//! midway leaves the old manifest and a rerun completes it, a rollback republishes the kept
//! version, the webhook is signed as documented (and checked by Python's `hmac` too), a 5xx
//! receiver leads to retries, a clear failure, an `incomplete` record and a later successful
//! retry, and a checksum mismatch uploads nothing (issue 16, §2 and §3).
//!
//! Models are registered directly (a tiny LoRA policy and the tiny reward fixture, stored through
//! the bucket store and promoted in the registry) rather than trained, to keep each test to
//! seconds; the fault-injecting object store is the only stand-in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rlhf_bot::artifacts::{ArtifactStore, BucketStore, ObjectRoot};
use rlhf_bot::deploy::{DeployRequest, Notifiers, ProductionStore};
use rlhf_bot::registry::{FeedbackSnapshot, ModelEntry, ModelKind, ModelStatus, Registry};

use crate::common::{Workspace, bin, repo, stderr, stdout};
use crate::moto::{Moto, moto};

const SECRET: &str = "whsec-test-5b1e";
const BASE_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// A workspace whose artifact store is a fresh moto bucket, with a `deploy:` section.
struct World {
    ws: Workspace,
    cfg: PathBuf,
    bucket: String,
    moto: &'static Moto,
}

impl World {
    fn new(moto: &'static Moto, bucket: &str, deploy: &str) -> Self {
        let ws = Workspace::new();
        moto.create_bucket(bucket);
        let local_root = format!("artifacts: {}/artifacts", ws.store_dir().display());
        let text = ws
            .sample_config_text()
            .replace(&local_root, &format!("artifacts: s3://{bucket}/models"))
            .replace(
                "policy:\n  enabled: true",
                &format!("policy:\n  base_model_id: {BASE_ID}\n  enabled: true"),
            );
        assert!(text.contains("s3://") && text.contains(BASE_ID), "{text}");
        let cfg = ws.write_config(&format!("{text}deploy:\n{deploy}"));
        Self {
            ws,
            cfg,
            bucket: bucket.to_string(),
            moto,
        }
    }

    fn url(&self) -> url::Url {
        url::Url::parse(&format!("s3://{}/models", self.bucket)).unwrap()
    }

    fn options(&self) -> Vec<(String, String)> {
        self.moto
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()
    }

    fn artifacts(&self) -> BucketStore {
        BucketStore::with_options(&self.url(), self.options(), self.ws.path().join("cache"))
            .unwrap()
    }

    fn registry_path(&self) -> PathBuf {
        self.ws.store_dir().join("registry.yaml")
    }

    /// Stores a model directory as `id` and makes it production of its kind.
    fn promote(&self, kind: ModelKind, id: &str, dir: &Path) {
        register_production(&self.registry_path(), &self.artifacts(), kind, id, dir);
    }

    /// A distinct tiny LoRA policy as `id`.
    fn promote_policy(&self, id: &str) {
        self.promote(ModelKind::Policy, id, &policy_dir(self.ws.path(), id));
    }

    /// The tiny llama reward model fixture as `id`.
    fn promote_reward(&self, id: &str) {
        let dir = self.ws.path().join("models").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let fixtures = repo().join("tests/fixtures");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures.join("tiny-llama-rm").join(f), dir.join(f)).unwrap();
        }
        std::fs::copy(
            fixtures.join("tiny-llama-policy/tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        self.promote(ModelKind::Reward, id, &dir);
    }

    /// `rlhf-bot --format json deploy ARGS` with the bucket's credentials and `env`.
    fn deploy(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = bin();
        for (k, v) in self.moto.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.arg("--config")
            .arg(&self.cfg)
            .args(["--format", "json", "deploy"])
            .args(args)
            .output()
            .unwrap()
    }

    fn deploy_ok(&self, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
        let o = self.deploy(args, env);
        assert!(o.status.success(), "deploy failed:\n{}", stderr(&o));
        assert!(
            !stderr(&o).contains(SECRET),
            "the secret leaked into the log"
        );
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
    }

    fn key(&self, rel: &str) -> String {
        format!("models/production/{rel}")
    }

    fn json(&self, rel: &str) -> Option<serde_json::Value> {
        self.moto
            .get(&self.bucket, &self.key(rel))
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    fn manifest(&self, kind: &str) -> serde_json::Value {
        self.json(&format!("{kind}/manifest.json"))
            .unwrap_or_else(|| panic!("no {kind} manifest"))
    }

    fn records(&self) -> Vec<serde_json::Value> {
        let bytes = self
            .moto
            .get(&self.bucket, &self.key("deployments.jsonl"))
            .unwrap_or_default();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn versions(&self, kind: &str) -> Vec<String> {
        let prefix = self.key(&format!("{kind}/versions/"));
        let mut ids: Vec<String> = self
            .moto
            .keys(&self.bucket, &prefix)
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.split('/').next().map(String::from))
            .collect();
        ids.dedup();
        ids
    }

    /// Every file the manifest lists is in the bucket with the listed sha256 and size.
    fn check_manifest_files(&self, kind: &str) {
        let manifest = self.manifest(kind);
        let base = format!("s3://{}/", self.bucket);
        for (format, published) in manifest["formats"].as_object().unwrap() {
            let dir = published["uri"]
                .as_str()
                .unwrap()
                .strip_prefix(&base)
                .unwrap();
            for file in published["files"].as_array().unwrap() {
                let key = format!("{dir}{}", file["path"].as_str().unwrap());
                let bytes = self
                    .moto
                    .get(&self.bucket, &key)
                    .unwrap_or_else(|| panic!("{format}: {key} is listed but not stored"));
                assert_eq!(bytes.len() as u64, file["size_bytes"].as_u64().unwrap());
                assert_eq!(
                    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
                    file["sha256"].as_str().unwrap(),
                    "{key}"
                );
            }
        }
    }
}

/// Stores a model directory as `id` in `store`, registers it and makes it production of its kind.
pub(crate) fn register_production(
    registry_path: &Path,
    store: &dyn ArtifactStore,
    kind: ModelKind,
    id: &str,
    dir: &Path,
) {
    let artifact = store.put(kind, id, dir).unwrap();
    let mut registry = Registry::load_or_default(registry_path).unwrap();
    let n = registry.models.len() as i64;
    registry
        .add_candidate(ModelEntry {
            id: id.to_string(),
            kind,
            created_at: Utc.timestamp_opt(1_800_000_000 + n * 60, 0).unwrap(),
            created_by: None,
            base_model: "llama-from-scratch".into(),
            base_model_commit: None,
            parent: None,
            algorithm: if kind == ModelKind::Reward {
                "reward"
            } else {
                "dpo"
            }
            .into(),
            config_sha256: "0".repeat(64),
            feedback: FeedbackSnapshot {
                watermark: "w".into(),
                counts: BTreeMap::new(),
                examples_sha256: "0".repeat(64),
            },
            artifact,
            metrics: BTreeMap::new(),
            status: ModelStatus::Candidate,
            aliases: Vec::new(),
            cluster_job: None,
        })
        .unwrap();
    registry.promote(id).unwrap();
    registry.save(registry_path).unwrap();
}

/// A distinct tiny LoRA policy run (the export tests' fixture plus a marker file) under `root`.
pub(crate) fn policy_dir(root: &Path, id: &str) -> PathBuf {
    let run = crate::export_model::policy_run_in(&root.join("models").join(id));
    std::fs::write(run.join("policy/version.txt"), id).unwrap();
    run
}

/// Passes everything through to a real store, logging each put, and fails the put numbered
/// `fail_at` (1-based; `None`: never) — the one stand-in in these tests.
#[derive(Debug)]
struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    fail_at: Option<usize>,
    puts: Mutex<Vec<String>>,
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    fn log_put(&self, location: &ObjectPath) -> object_store::Result<()> {
        let mut puts = self.puts.lock().unwrap();
        puts.push(location.to_string());
        if Some(puts.len()) == self.fail_at {
            return Err(object_store::Error::Generic {
                store: "FaultyStore",
                source: "injected failure: the connection dropped".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.log_put(location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.log_put(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// One library-level deploy of every kind through `FaultyStore`; returns the result and the
/// puts it made, in order.
fn deploy_through_faulty_store(
    w: &World,
    fail_at: Option<usize>,
) -> (anyhow::Result<rlhf_bot::deploy::DeployReport>, Vec<String>) {
    let settings = rlhf_bot::config::load(&w.cfg).unwrap();
    let registry = Registry::load(&w.registry_path()).unwrap();
    let root = ObjectRoot::bucket(&w.url(), w.options()).unwrap();
    let faulty = Arc::new(FaultyStore {
        inner: Arc::clone(&root.store),
        fail_at,
        puts: Mutex::new(Vec::new()),
    });
    let production = ProductionStore::new(ObjectRoot {
        store: faulty.clone(),
        ..root
    });
    let request = DeployRequest {
        kinds: vec![ModelKind::Reward, ModelKind::Policy],
        settings: &settings.deploy,
        dry_run: false,
        now: Utc::now(),
        staging: w.ws.path().join("staging"),
    };
    let exporter = rlhf_bot::app::deploy::ExportModel::new(&settings);
    let artifacts = w.artifacts();
    let result = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(rlhf_bot::deploy::deploy(
            &registry,
            &artifacts,
            &production,
            &exporter,
            &Notifiers::default(),
            &request,
        ));
    let puts = faulty.puts.lock().unwrap().clone();
    (result, puts)
}

#[test]
fn the_manifest_is_switched_after_the_payload_and_a_failed_upload_leaves_the_old_one() {
    let Some(moto) = moto() else { return };
    let w = World::new(
        moto,
        "dp-atomic",
        "  formats: {policy: [peft, gguf-f16], reward: [hf]}\n",
    );
    w.promote_reward("reward-a1");
    w.promote_policy("policy-a1");
    let (result, puts) = deploy_through_faulty_store(&w, None);
    let report = result.unwrap();
    assert!(report.incomplete().is_empty(), "{report}");
    for kind in ["reward", "policy"] {
        let at = |suffix: &str| {
            puts.iter()
                .position(|p| p.ends_with(suffix))
                .unwrap_or_else(|| panic!("no put of {suffix} in {puts:?}"))
        };
        let manifest = at(&format!("production/{kind}/manifest.json"));
        let release = at(&format!(
            "production/{kind}/versions/{kind}-a1/release.json"
        ));
        let payload: Vec<usize> = puts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.contains(&format!("production/{kind}/versions/")))
            .map(|(i, _)| i)
            .collect();
        assert!(payload.len() >= 2, "{puts:?}");
        assert_eq!(
            *payload.iter().max().unwrap(),
            release,
            "release.json after the files"
        );
        assert!(
            manifest > release,
            "the manifest is switched last: {puts:?}"
        );
        w.check_manifest_files(kind);
    }
    let m = w.manifest("policy");
    assert_eq!(m["id"], "policy-a1");
    let formats: Vec<&String> = m["formats"].as_object().unwrap().keys().collect();
    assert_eq!(formats, ["gguf-f16", "peft"]);
    let peft = m["formats"]["peft"]["files"].as_array().unwrap();
    assert!(
        peft.iter().any(|f| f["path"] == "adapter_config.json"),
        "{m}"
    );
    let records = w.records();
    assert_eq!(records.len(), 2);
    assert!(
        records.iter().all(|r| r["status"] == "complete"),
        "{records:?}"
    );

    // A new production policy whose upload fails at its third put: the old manifest stays.
    w.promote_policy("policy-a2");
    let (result, puts) = deploy_through_faulty_store(&w, Some(3));
    let err = format!("{:#}", result.unwrap_err());
    assert!(
        err.contains("policy-a2")
            && err.contains("previous manifest is still live")
            && err.contains("injected failure")
            && err.contains("hint:"),
        "{err}"
    );
    assert_eq!(puts.len(), 3, "nothing after the failure: {puts:?}");
    assert_eq!(w.manifest("policy")["id"], "policy-a1");
    assert!(w.json("policy/versions/policy-a2/release.json").is_none());
    assert_eq!(
        w.records().len(),
        2,
        "no record for a deployment that did not happen"
    );
    w.check_manifest_files("policy");

    // The rerun completes it, and leaves the reward model alone.
    let (result, puts) = deploy_through_faulty_store(&w, None);
    let report = result.unwrap();
    assert_eq!(w.manifest("policy")["id"], "policy-a2");
    w.check_manifest_files("policy");
    assert!(
        puts.iter().all(|p| !p.contains("production/reward/")),
        "{puts:?}"
    );
    let kinds: Vec<String> = report
        .kinds
        .iter()
        .map(|k| format!("{} {:?}", k.kind, k.action))
        .collect();
    assert_eq!(kinds, ["reward Unchanged", "policy Published"], "{report}");
    let last = w.records().pop().unwrap();
    assert_eq!(
        (last["id"].as_str(), last["status"].as_str()),
        (Some("policy-a2"), Some("complete"))
    );
}

#[test]
fn rollback_republishes_the_kept_version_and_old_versions_are_pruned() {
    let Some(moto) = moto() else { return };
    let w = World::new(
        moto,
        "dp-rollback",
        "  formats: {policy: [peft], reward: []}\n  keep: 2\n",
    );
    for id in ["policy-r1", "policy-r2", "policy-r3"] {
        w.promote_policy(id);
        let out = w.deploy_ok(&[], &[]);
        let kinds = out["kinds"].as_array().unwrap();
        assert_eq!(kinds[0]["kind"], "reward");
        assert_eq!(kinds[0]["action"], "skipped", "{out}");
        assert_eq!(kinds[1]["action"], "published", "{out}");
        assert_eq!(w.manifest("policy")["id"], id);
    }
    assert_eq!(w.versions("policy"), ["policy-r2", "policy-r3"], "keep: 2");
    let pruned = w.records();
    assert_eq!(pruned.len(), 3);

    // Reverting the merge moves production back to policy-r2; deploy switches to the kept copy.
    let o = bin()
        .arg("--config")
        .arg(&w.cfg)
        .args(["rollback", "policy"])
        .envs(w.moto.env())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = w.deploy_ok(&[], &[]);
    assert_eq!(out["kinds"][1]["action"], "republished", "{out}");
    assert_eq!(out["kinds"][1]["id"], "policy-r2");
    let m = w.manifest("policy");
    assert_eq!(m["id"], "policy-r2");
    w.check_manifest_files("policy");
    assert_eq!(w.versions("policy"), ["policy-r2", "policy-r3"]);
    // Nothing to do on a second run.
    let again = w.deploy_ok(&[], &[]);
    assert_eq!(again["kinds"][1]["action"], "unchanged", "{again}");
    assert_eq!(w.records().len(), 4);
}

#[test]
fn a_checksum_mismatch_stops_the_deploy_before_anything_is_uploaded() {
    let Some(moto) = moto() else { return };
    let w = World::new(
        moto,
        "dp-mismatch",
        "  formats: {policy: [peft], reward: [hf]}\n",
    );
    w.promote_reward("reward-m1");
    w.promote_policy("policy-m1");
    // Another client rewrites the policy's adapter in the bucket.
    let key = "/dp-mismatch/models/policy/policy-m1/policy/adapter/adapter_config.json";
    let (status, _) = moto.request("PUT", key, b"{}");
    assert_eq!(status, 200);
    let o = w.deploy(&[], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("policy-m1")
            && err.contains("checksum mismatch")
            && err.contains("nothing was uploaded"),
        "{err}"
    );
    assert!(
        moto.keys("dp-mismatch", "models/production").is_empty(),
        "nothing under production/, not even the intact reward model"
    );
}

/// A webhook receiver and a GitHub `repository_dispatch` endpoint on loopback.
mod receiver {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use hmac::{Hmac, Mac};

    #[derive(Debug, Clone)]
    pub struct Delivery {
        pub body: Vec<u8>,
        pub signature_ok: bool,
        pub idempotency_key: String,
        pub status: u16,
    }

    #[derive(Debug, Default)]
    pub struct Inner {
        /// Answer 503 to this many more webhook deliveries.
        pub failures_left: u32,
        pub deliveries: Vec<Delivery>,
        pub dispatches: Vec<(String, serde_json::Value)>,
    }

    pub type Shared = Arc<Mutex<Inner>>;

    async fn hook(
        State(s): State<(Shared, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(s.1.as_bytes()).unwrap();
        mac.update(&body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let signature_ok = header("x-rlhf-bot-signature") == expected
            && header("content-type") == "application/json";
        let mut inner = s.0.lock().unwrap();
        let status = if !signature_ok {
            401
        } else if inner.failures_left > 0 {
            inner.failures_left -= 1;
            503
        } else {
            200
        };
        inner.deliveries.push(Delivery {
            body: body.to_vec(),
            signature_ok,
            idempotency_key: header("idempotency-key"),
            status,
        });
        StatusCode::from_u16(status).unwrap()
    }

    async fn dispatch(
        State(s): State<(Shared, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let value = serde_json::from_slice(&body).unwrap_or_default();
        s.0.lock().unwrap().dispatches.push((auth, value));
        StatusCode::NO_CONTENT
    }

    /// Starts the server on a thread of its own; returns its base URL and state.
    pub fn start(secret: &str) -> (String, Shared) {
        let shared = Shared::default();
        let state = (shared.clone(), secret.to_string());
        let app = Router::new()
            .route("/hook", post(hook))
            .route("/repos/acme/serving/dispatches", post(dispatch))
            .with_state(state);
        let url = crate::common::serve_on_thread(app);
        (url, shared)
    }
}

/// The documented Python check (docs/serving.md) accepts the body and signature we sent.
fn python_accepts(body: &[u8], signature: &str) -> Option<bool> {
    let python = crate::common::deps_dir().join("venv/bin/python");
    if !python.exists() {
        eprintln!("skipped the Python signature check: no test venv");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), body).unwrap();
    let script = "import hashlib, hmac, os, sys\n\
        body = open(sys.argv[1], 'rb').read()\n\
        expected = 'sha256=' + hmac.new(os.environ['SECRET'].encode(), body, hashlib.sha256).hexdigest()\n\
        sys.exit(0 if hmac.compare_digest(expected, sys.argv[2]) else 1)\n";
    let status = std::process::Command::new(python)
        .args(["-c", script])
        .arg(dir.path().join("body"))
        .arg(signature)
        .env("SECRET", SECRET)
        .status()
        .unwrap();
    Some(status.success())
}

#[test]
fn serving_is_notified_by_a_signed_webhook_and_a_repository_dispatch() {
    let Some(moto) = moto() else { return };
    let (url, shared) = receiver::start(SECRET);
    let w = World::new(
        moto,
        "dp-notify",
        &format!(
            "  formats: {{policy: [peft], reward: []}}\n  webhook:\n    url: {url}/hook\n    secret_env: TEST_DEPLOY_SECRET\n  repository_dispatch:\n    repo: acme/serving\n    api_url: {url}\n    token_env: TEST_DISPATCH_TOKEN\n"
        ),
    );
    w.promote_policy("policy-n1");
    let env = [
        ("TEST_DEPLOY_SECRET", SECRET),
        ("TEST_DISPATCH_TOKEN", "dispatch-token-77"),
    ];
    let out = w.deploy_ok(&[], &env);
    assert_eq!(out["kinds"][1]["status"], "complete", "{out}");
    let inner = shared.lock().unwrap();
    assert_eq!(inner.deliveries.len(), 1);
    let d = &inner.deliveries[0];
    assert!(d.signature_ok, "the receiver's HMAC check failed");
    let payload: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    let manifest = w.manifest("policy");
    assert_eq!(payload["id"], "policy-n1");
    assert_eq!(payload["kind"], "policy");
    assert_eq!(
        payload["formats"], manifest["formats"],
        "URIs and sha256s as in the manifest"
    );
    assert_eq!(
        d.idempotency_key,
        format!("policy-n1@{}", manifest["deployed_at"].as_str().unwrap())
    );
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    hmac::Mac::update(&mut mac, &d.body);
    let sig = format!(
        "sha256={}",
        hex::encode(hmac::Mac::finalize(mac).into_bytes())
    );
    if let Some(ok) = python_accepts(&d.body, &sig) {
        assert!(ok, "Python's hmac disagrees with the signature");
        assert_eq!(python_accepts(b"{\"id\": \"forged\"}", &sig), Some(false));
    }
    assert_eq!(inner.dispatches.len(), 1);
    let (auth, body) = &inner.dispatches[0];
    assert!(auth.ends_with("dispatch-token-77"), "{auth}");
    assert_eq!(body["event_type"], "rlhf-model-deployed");
    assert_eq!(body["client_payload"]["id"], "policy-n1");
    assert_eq!(
        body["client_payload"]["formats"]["peft"],
        manifest["formats"]["peft"]["uri"]
    );
    let record = w.records().pop().unwrap();
    assert_eq!(
        record["notified"],
        serde_json::json!(["webhook", "repository_dispatch"])
    );

    // A missing secret fails before anything happens.
    drop(inner);
    w.promote_policy("policy-n2");
    let o = w.deploy(&[], &[("TEST_DISPATCH_TOKEN", "x")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("TEST_DEPLOY_SECRET"), "{}", stderr(&o));
    assert_eq!(w.manifest("policy")["id"], "policy-n1");
}

#[test]
fn a_failing_webhook_is_retried_recorded_incomplete_and_sent_again_by_the_next_run() {
    let Some(moto) = moto() else { return };
    let (url, shared) = receiver::start(SECRET);
    let w = World::new(
        moto,
        "dp-webhook-5xx",
        &format!(
            "  formats: {{policy: [peft], reward: []}}\n  webhook:\n    url: {url}/hook\n    secret_env: TEST_DEPLOY_SECRET\n    max_attempts: 3\n"
        ),
    );
    w.promote_policy("policy-w1");
    shared.lock().unwrap().failures_left = 3;
    let env = [("TEST_DEPLOY_SECRET", SECRET)];
    let o = w.deploy(&[], &env);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("503")
            && err.contains("after 3 attempt(s)")
            && err.contains("incomplete")
            && err.contains("policy-w1")
            && err.contains("hint:"),
        "{err}"
    );
    assert!(!err.contains(SECRET));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(out["kinds"][1]["status"], "incomplete", "{out}");
    assert_eq!(shared.lock().unwrap().deliveries.len(), 3, "three attempts");
    // The model is live (the manifest switched); the record says the notification is owed.
    assert_eq!(w.manifest("policy")["id"], "policy-w1");
    let record = w.records().pop().unwrap();
    assert_eq!(record["status"], "incomplete");
    assert!(
        record["error"].as_str().unwrap().contains("503"),
        "{record}"
    );
    // `registry show` summarises what is live and that serving was not told yet.
    let show = |format: &str| {
        let o = bin()
            .arg("--config")
            .arg(&w.cfg)
            .args(["--format", format, "registry", "show"])
            .envs(w.moto.env())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let shown: serde_json::Value = serde_json::from_str(&show("json")).unwrap();
    assert_eq!(shown["deployed"]["policy"]["id"], "policy-w1", "{shown}");
    assert_eq!(shown["deployed"]["policy"]["status"], "incomplete");
    assert_eq!(
        shown["deployed"]["policy"]["formats"],
        serde_json::json!(["peft"])
    );
    assert!(shown["deployed"]["reward"].is_null());
    assert!(
        show("text").contains("deployed policy: policy-w1 since"),
        "{}",
        show("text")
    );

    // The receiver recovers: the next run sends the same deployment again, and completes.
    let out = w.deploy_ok(&[], &env);
    assert_eq!(out["kinds"][1]["action"], "renotified", "{out}");
    assert_eq!(out["kinds"][1]["status"], "complete", "{out}");
    let inner = shared.lock().unwrap();
    let keys: Vec<&str> = inner
        .deliveries
        .iter()
        .map(|d| d.idempotency_key.as_str())
        .collect();
    assert_eq!(keys.len(), 4);
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one idempotency key: {keys:?}"
    );
    assert_eq!(inner.deliveries[3].status, 200);
    assert_eq!(w.records().pop().unwrap()["status"], "complete");
    assert!(
        show("text").contains("(peft; complete)"),
        "{}",
        show("text")
    );
    drop(inner);
    let again = w.deploy_ok(&[], &env);
    assert_eq!(again["kinds"][1]["action"], "unchanged", "{again}");
    assert_eq!(
        shared.lock().unwrap().deliveries.len(),
        4,
        "nothing sent twice"
    );
}

#[test]
fn deploy_config_refuses_formats_that_do_not_apply_and_bad_hub_settings() {
    let load = |deploy: &str| {
        rlhf_bot::config::load_str(
            Path::new("rlhf.yaml"),
            &format!("feedback:\n  source: file\n  path: f\ndeploy:\n{deploy}"),
        )
    };
    let s = load("  formats: {policy: [gguf-q8_0, peft, peft]}\n").unwrap();
    use rlhf_bot::deploy::ServingFormat;
    assert_eq!(
        s.deploy.policy_formats,
        [ServingFormat::Peft, ServingFormat::GgufQ8_0]
    );
    assert_eq!(s.deploy.reward_formats, [ServingFormat::Hf]);
    assert_eq!(s.deploy.keep, 3);
    // `config check` shows a webhook URL without the token a query may carry.
    let s = load("  webhook: {url: 'https://hooks.example.com/a?token=s3cr3t'}\n").unwrap();
    let shown = serde_json::to_string(&s.deploy).unwrap();
    assert!(
        shown.contains("https://hooks.example.com/a?***") && !shown.contains("s3cr3t"),
        "{shown}"
    );
    for (deploy, needles) in [
        (
            "  formats: {reward: [gguf-f16]}\n",
            &[
                "deploy.formats.reward",
                "`gguf-f16` does not apply to a reward model",
                "hint:",
            ][..],
        ),
        (
            "  formats: {policy: [onnx]}\n",
            &["deploy.formats.policy", "onnx", "hint:"],
        ),
        ("  hub: {repo: acme}\n", &["deploy.hub.repo", "owner/name"]),
        (
            "  webhook: {url: 'ftp://x'}\n",
            &["deploy.webhook.url", "http(s)"],
        ),
        (
            "  repository_dispatch: {repo: acme}\n",
            &["deploy.repository_dispatch.repo", "owner/name"],
        ),
    ] {
        let text = format!("{:#}", load(deploy).unwrap_err());
        for n in needles {
            assert!(text.contains(n), "{deploy}: {text}");
        }
    }
}

/// The same publish, prune and rollback with the default artifact store, a local directory
/// (object_store's file system: puts are renames, deletes remove emptied directories).
#[test]
fn a_directory_store_is_published_pruned_and_rolled_back_alike() {
    let ws = Workspace::new();
    let text = ws.sample_config_text().replace(
        "policy:\n  enabled: true",
        &format!("policy:\n  base_model_id: {BASE_ID}\n  enabled: true"),
    );
    let cfg = ws.write_config(&format!(
        "{text}deploy:\n  formats: {{policy: [peft], reward: []}}\n  keep: 2\n"
    ));
    let settings = rlhf_bot::config::load(&cfg).unwrap();
    let artifacts = settings.registry.open_artifacts().unwrap();
    let production = ws.store_dir().join("artifacts/production");
    let run = |args: &[&str]| {
        let o = crate::common::run(&cfg, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let live = || -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(production.join("policy/manifest.json")).unwrap(),
        )
        .unwrap()
    };
    for id in ["policy-d1", "policy-d2", "policy-d3"] {
        let dir = policy_dir(ws.path(), id);
        register_production(
            &settings.registry.path,
            &*artifacts,
            ModelKind::Policy,
            id,
            &dir,
        );
        let out: serde_json::Value =
            serde_json::from_str(&run(&["--format", "json", "deploy"])).unwrap();
        assert_eq!(out["kinds"][1]["action"], "published", "{out}");
        assert_eq!(live()["id"], id);
    }
    let mut versions: Vec<String> = std::fs::read_dir(production.join("policy/versions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        ["policy-d2", "policy-d3"],
        "keep: 2, no empty directory left"
    );
    let uri = live()["formats"]["peft"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        uri.starts_with("file:///") && uri.ends_with("/production/policy/versions/policy-d3/peft/"),
        "{uri}"
    );
    run(&["rollback", "policy"]);
    let out: serde_json::Value =
        serde_json::from_str(&run(&["--format", "json", "deploy"])).unwrap();
    assert_eq!(out["kinds"][1]["action"], "republished", "{out}");
    assert_eq!(live()["id"], "policy-d2");
    let records = std::fs::read_to_string(production.join("deployments.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 4);
}
