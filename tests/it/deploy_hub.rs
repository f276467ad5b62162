//! `deploy.hub`: the production policy committed to a Hugging Face Hub repository through the
//! Hub's HTTP commit API, against a loopback receiver that implements exactly the endpoints
//! `huggingface_hub`'s `create_commit` uses (preupload, the Git LFS batch API with its upload
//! and verify actions, and the NDJSON commit) and checks the token, the headers and every byte.
//! No network reaches the real Hub here; docs/serving.md says so.
//!
//! A wrong token: the Hub answers 401, `deploy` fails naming the token variable (and never the
//! token), the record is `incomplete`; the next run with the right token commits, and the
//! committed files are byte for byte the published ones (`hf` at the root, other formats in
//! folders), large files through LFS, uploaded without the token.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rlhf_bot::registry::ModelKind;
use sha2::{Digest, Sha256};

use crate::common::{Workspace, serve_on_thread, stderr, stdout};
use crate::deploy::{policy_dir, register_production};

const TOKEN: &str = "hf_test_rlhf_7f3a";
const WRONG: &str = "hf_wrong_0b1d";
const LFS: &str = "application/vnd.git-lfs+json";

#[derive(Debug, Default)]
struct Hub {
    base: String,
    /// LFS objects by sha256 oid.
    lfs: HashMap<String, Vec<u8>>,
    /// Commits: (revision, summary, path -> content).
    commits: Vec<(String, String, BTreeMap<String, Vec<u8>>)>,
    /// Requests refused, as "<step> <status>".
    refused: Vec<String>,
    lfs_puts: usize,
}

type Shared = Arc<Mutex<Hub>>;

fn authorised(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

/// The Hub's answer to a request without the right token, if it lacks it.
fn unauthorised(hub: &Shared, step: &str, headers: &HeaderMap) -> Option<Response> {
    (!authorised(headers))
        .then(|| refuse(hub, step, StatusCode::UNAUTHORIZED, "Invalid credentials"))
}

fn refuse(hub: &Shared, step: &str, status: StatusCode, why: &str) -> Response {
    hub.lock()
        .unwrap()
        .refused
        .push(format!("{step} {}", status.as_u16()));
    (status, why.to_string()).into_response()
}

/// The Hub decides LFS by file type (its `.gitattributes`): weights and GGUF go through LFS.
fn lfs_path(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".gguf")
}

async fn preupload(
    State(hub): State<Shared>,
    UrlPath((_owner, _name, _rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = unauthorised(&hub, "preupload", &headers) {
        return refused;
    }
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let files: Vec<serde_json::Value> = req["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            let sample = B64.decode(f["sample"].as_str().unwrap()).unwrap();
            assert!(sample.len() <= 512 && f["size"].as_u64().unwrap() >= sample.len() as u64);
            let mode = if lfs_path(path) { "lfs" } else { "regular" };
            serde_json::json!({"path": path, "uploadMode": mode, "shouldIgnore": false})
        })
        .collect();
    axum::Json(serde_json::json!({"files": files, "commitOid": "0".repeat(40)})).into_response()
}

async fn batch(
    State(hub): State<Shared>,
    UrlPath((_owner, repo)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = unauthorised(&hub, "batch", &headers) {
        return refused;
    }
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    if header("accept") != LFS || header("content-type") != LFS || !repo.ends_with(".git") {
        return refuse(
            &hub,
            "batch",
            StatusCode::BAD_REQUEST,
            "not a git-lfs request",
        );
    }
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(req["operation"], "upload");
    assert_eq!(req["hash_algo"], "sha256");
    assert!(
        req["transfers"]
            .as_array()
            .unwrap()
            .contains(&"basic".into())
    );
    let h = hub.lock().unwrap();
    let objects: Vec<serde_json::Value> = req["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let oid = o["oid"].as_str().unwrap();
            if h.lfs.contains_key(oid) {
                serde_json::json!({"oid": oid, "size": o["size"]})
            } else {
                serde_json::json!({"oid": oid, "size": o["size"], "actions": {
                    "upload": {"href": format!("{}/storage/{oid}", h.base),
                               "header": {"x-upload-ticket": format!("t-{oid}")}},
                    "verify": {"href": format!("{}/verify", h.base)},
                }})
            }
        })
        .collect();
    axum::Json(serde_json::json!({"transfer": "basic", "objects": objects})).into_response()
}

async fn storage(
    State(hub): State<Shared>,
    UrlPath(oid): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // A presigned storage URL: the Hub token must not travel there.
    if headers.contains_key("authorization") {
        return refuse(
            &hub,
            "storage",
            StatusCode::BAD_REQUEST,
            "token sent to storage",
        );
    }
    let ticket = headers.get("x-upload-ticket").and_then(|v| v.to_str().ok());
    if ticket != Some(&format!("t-{oid}")) || hex::encode(Sha256::digest(&body)) != oid {
        return refuse(
            &hub,
            "storage",
            StatusCode::BAD_REQUEST,
            "bad ticket or content",
        );
    }
    let mut h = hub.lock().unwrap();
    h.lfs.insert(oid, body.to_vec());
    h.lfs_puts += 1;
    StatusCode::OK.into_response()
}

async fn verify(State(hub): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = unauthorised(&hub, "verify", &headers) {
        return refused;
    }
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let h = hub.lock().unwrap();
    let ok = h
        .lfs
        .get(req["oid"].as_str().unwrap())
        .is_some_and(|b| b.len() as u64 == req["size"].as_u64().unwrap());
    drop(h);
    if ok {
        StatusCode::OK.into_response()
    } else {
        refuse(&hub, "verify", StatusCode::NOT_FOUND, "object not stored")
    }
}

async fn commit(
    State(hub): State<Shared>,
    UrlPath((owner, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = unauthorised(&hub, "commit", &headers) {
        return refused;
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-ndjson") {
        return refuse(&hub, "commit", StatusCode::BAD_REQUEST, "expected NDJSON");
    }
    let lines: Vec<serde_json::Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["key"], "header", "the header comes first");
    let summary = lines[0]["value"]["summary"].as_str().unwrap().to_string();
    let mut files = BTreeMap::new();
    let mut h = hub.lock().unwrap();
    for line in &lines[1..] {
        let v = &line["value"];
        let path = v["path"].as_str().unwrap().to_string();
        let content = match line["key"].as_str().unwrap() {
            "file" => {
                assert_eq!(v["encoding"], "base64");
                B64.decode(v["content"].as_str().unwrap()).unwrap()
            }
            "lfsFile" => {
                assert_eq!(v["algo"], "sha256");
                match h.lfs.get(v["oid"].as_str().unwrap()) {
                    Some(b) if b.len() as u64 == v["size"].as_u64().unwrap() => b.clone(),
                    _ => {
                        drop(h);
                        return refuse(
                            &hub,
                            "commit",
                            StatusCode::BAD_REQUEST,
                            "missing LFS object",
                        );
                    }
                }
            }
            other => panic!("unexpected commit line {other}"),
        };
        files.insert(path, content);
    }
    h.commits.push((rev, summary, files));
    let oid = format!("{:040x}", h.commits.len());
    let url = format!("{}/{owner}/{name}/commit/{oid}", h.base);
    axum::Json(serde_json::json!({"commitUrl": url, "commitOid": oid, "success": true}))
        .into_response()
}

/// Starts the receiver on a thread of its own; returns its base URL and state.
fn start() -> (String, Shared) {
    let shared = Shared::default();
    let app = Router::new()
        .route(
            "/api/models/{owner}/{name}/preupload/{rev}",
            post(preupload),
        )
        .route("/api/models/{owner}/{name}/commit/{rev}", post(commit))
        .route("/{owner}/{repo}/info/lfs/objects/batch", post(batch))
        .route("/storage/{oid}", put(storage))
        .route("/verify", post(verify))
        // Model files exceed axum's 2 MiB default.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared.clone());
    let url = serve_on_thread(app);
    shared.lock().unwrap().base = url.clone();
    (url, shared)
}

#[test]
fn the_production_policy_is_committed_to_the_hub_with_lfs_for_large_files() {
    let (url, hub) = start();
    let ws = Workspace::new();
    let text = ws.sample_config_text();
    let cfg = ws.write_config(&format!(
        "{text}deploy:\n  formats: {{policy: [hf, gguf-lora], reward: []}}\n  hub:\n    repo: acme/climate-assistant\n    endpoint: {url}\n    revision: release/v1\n    token_env: TEST_HUB_TOKEN\n"
    ));
    let settings = rlhf_bot::config::load(&cfg).unwrap();
    let artifacts = settings.registry.open_artifacts().unwrap();
    let id = "policy-hub1";
    let dir = policy_dir(ws.path(), id);
    register_production(
        &settings.registry.path,
        &*artifacts,
        ModelKind::Policy,
        id,
        &dir,
    );
    let deploy = |token: &str| {
        crate::common::bin()
            .env("TEST_HUB_TOKEN", token)
            .env("RLHF_BACKOFF_MS", "1")
            .arg("--config")
            .arg(&cfg)
            .args(["--format", "json", "deploy"])
            .output()
            .unwrap()
    };

    // A token the Hub refuses: published to the production prefix, but the record is incomplete.
    let o = deploy(WRONG);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("acme/climate-assistant")
            && err.contains("401")
            && err.contains("deploy.hub.token_env"),
        "{err}"
    );
    assert!(
        !err.contains(WRONG) && !stdout(&o).contains(WRONG),
        "the token leaked"
    );
    assert_eq!(hub.lock().unwrap().refused, ["preupload 401"]);
    assert!(hub.lock().unwrap().commits.is_empty());
    let records = ws
        .store_dir()
        .join("artifacts/production/deployments.jsonl");
    let last = |path: &std::path::Path| -> serde_json::Value {
        let text = std::fs::read_to_string(path).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    assert_eq!(last(&records)["status"], "incomplete");

    // The right token: the next run commits (the model is already live: renotified).
    let o = deploy(TOKEN);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains(TOKEN), "the token leaked");
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let policy = out["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "policy")
        .unwrap();
    assert_eq!(policy["action"], "renotified", "{out}");
    assert_eq!(policy["notified"], serde_json::json!(["hf_hub"]));
    let record = last(&records);
    assert_eq!(record["status"], "complete");

    let h = hub.lock().unwrap();
    assert_eq!(h.commits.len(), 1);
    let (rev, summary, files) = &h.commits[0];
    assert_eq!(rev, "release/v1");
    assert!(summary.contains(id), "{summary}");
    // Byte for byte what the manifest lists: hf at the root, gguf-lora in its folder.
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            ws.store_dir()
                .join("artifacts/production/policy/manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut expected = BTreeMap::new();
    for (format, published) in manifest["formats"].as_object().unwrap() {
        for f in published["files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            let in_repo = if format == "hf" {
                path.to_string()
            } else {
                format!("{format}/{path}")
            };
            expected.insert(in_repo, f["sha256"].as_str().unwrap().to_string());
        }
    }
    let got: BTreeMap<String, String> = files
        .iter()
        .map(|(p, b)| (p.clone(), hex::encode(Sha256::digest(b))))
        .collect();
    assert_eq!(got, expected);
    assert!(got.contains_key("config.json") && got.contains_key("model.safetensors"));
    assert!(got.contains_key("gguf-lora/adapter.gguf"), "{got:?}");
    // The two large files went through LFS, once each; everything else inline.
    assert_eq!(h.lfs_puts, 2);
    assert_eq!(h.lfs.len(), 2);
    assert_eq!(h.refused, ["preupload 401"], "nothing else was refused");
    drop(h);

    // Pushing the same files again uploads no LFS object: the Hub reports them stored.
    let hub_settings = settings.deploy.hub.clone().unwrap();
    let token = rlhf_bot::secret::SecretString::new(TOKEN);
    let again: Vec<rlhf_bot::deploy::hub::HubFile> = files_of(&hub, 0);
    let client = rlhf_bot::deploy::hub::HubClient::new(
        &hub_settings,
        &token,
        std::time::Duration::from_millis(1),
    )
    .unwrap();
    let commit = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(client.push(&again, "again", ""))
        .unwrap();
    assert_eq!(commit.lfs_uploaded, 0);
    let h = hub.lock().unwrap();
    assert_eq!((h.lfs_puts, h.commits.len()), (2, 2));
    assert_eq!(h.commits[1].2, h.commits[0].2);
}

/// The files of commit `n` as a new push would send them.
fn files_of(hub: &Shared, n: usize) -> Vec<rlhf_bot::deploy::hub::HubFile> {
    hub.lock().unwrap().commits[n]
        .2
        .iter()
        .map(|(path, content)| rlhf_bot::deploy::hub::HubFile {
            path: path.clone(),
            sha256: hex::encode(Sha256::digest(content)),
            content: content.clone(),
        })
        .collect()
}

#[test]
fn hub_settings_are_validated_with_the_key_named() {
    let load = |hub: &str| {
        rlhf_bot::config::load_str(
            std::path::Path::new("rlhf.yaml"),
            &format!("feedback:\n  source: file\n  path: f\ndeploy:\n  hub: {hub}\n"),
        )
    };
    let s = load("{repo: acme/m}").unwrap();
    let hub = s.deploy.hub.unwrap();
    assert_eq!(
        (
            hub.endpoint.as_str(),
            hub.revision.as_str(),
            hub.token_env.as_str()
        ),
        ("https://huggingface.co", "main", "HF_TOKEN")
    );
    assert_eq!(hub.kind, ModelKind::Policy);
    for (hub, needles) in [
        ("{repo: acme}", &["deploy.hub.repo", "owner/name"][..]),
        ("{repo: acme/m, kind: value}", &["deploy.hub.kind", "hint:"]),
        (
            "{repo: acme/m, revision: 'a..b'}",
            &["deploy.hub.revision", "hint:"],
        ),
        (
            "{repo: acme/m, endpoint: 'ftp://hub'}",
            &["deploy.hub.endpoint", "http(s)"],
        ),
        (
            "{repo: acme/m, token_env: hf_abcdefghijklmnopqrstuvwxyz0123}",
            &["deploy.hub.token_env"],
        ),
    ] {
        let text = format!("{:#}", load(hub).unwrap_err());
        for n in needles {
            assert!(text.contains(n), "{hub}: {text}");
        }
    }
}
