//! `hf://ORG/NAME[@REVISION]` models (issue 20, "Models from the Hub"), through the real binary
//! against a loopback Hub that lays files out as huggingface.co does: the revision API
//! (`/api/models/ORG/NAME/revision/REV`: commit sha and file list), `/ORG/NAME/resolve/REV/FILE`
//! with `X-Repo-Commit`, `ETag` (git blob sha1) for regular files, and for LFS files a 302 to a
//! "CDN" path carrying `X-Linked-Etag` (sha256) and `X-Linked-Size`; the CDN honours `Range`.
//! It serves the tiny llama policy fixture (`tests/fixtures/tiny-llama-policy`) plus files a
//! model directory does not need (README, `pytorch_model.bin`), and logs every request.
//!
//! Shown: `generate --model hf://…` answers as the local fixture does; a body cut mid-way is
//! resumed with a `Range` request and verified (in the same run, and by the next run when the
//! storage stayed down); a second run downloads nothing (one API request; none for a commit
//! revision or with `HF_HUB_OFFLINE=1`); a gated model answers 401 without a token and works
//! with `HF_TOKEN` or the token file, the token never printed (and masked in Actions); 404s name
//! the repository, revision or file; a corrupted body fails its sha256 and leaves nothing in the
//! snapshot; a blob another process is downloading (its lock held) is waited for; an
//! unreachable endpoint is named with what to do; `train reward --model hf://…` trains and
//! `export-model --model hf://…` exports; `policy.model: hf://…` in a config trains, and the
//! registry pins the commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::common::{
    Workspace, bin, forced_run_json_with, free_port, repo, serve_on_thread, stderr, stdout,
};

const TOKEN: &str = "hf_gate_5e1c9a7b";
const COMMIT: &str = "7d1c0ffee5a1b2c3d4e5f60718293a4b5c6d7e8f";
const PUBLIC: &str = "tiny-org/tiny-llama";
const GATED: &str = "tiny-org/gated-llama";
const CORRUPT: &str = "tiny-org/corrupt-llama";

#[derive(Default)]
struct Hub {
    /// Repository id → (gated, files).
    repos: BTreeMap<String, (bool, BTreeMap<String, Vec<u8>>)>,
    /// Every request, as "METHOD path" plus " range=…" when one was asked.
    log: Vec<String>,
    /// LFS oids whose next N downloads are cut off half way (then served normally).
    cuts: HashMap<String, u32>,
    /// How many storage requests answer 503 (an outage) before it serves again.
    storage_down: u32,
    /// LFS oids always served with one byte flipped.
    corrupt: HashSet<String>,
    /// Files listed by the revision API that `resolve` answers 404 for.
    unserved: HashSet<String>,
}

type Shared = Arc<Mutex<Hub>>;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The git blob id the Hub sends as the ETag of a regular file.
fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".bin")
}

fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    let dir = repo().join("tests/fixtures/tiny-llama-policy");
    let mut files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    // What a real repository also holds, and a model directory does not need.
    files.insert("README.md".into(), b"# tiny llama\n".to_vec());
    files.insert("pytorch_model.bin".into(), vec![7u8; 4096]);
    files.insert(
        ".gitattributes".into(),
        b"*.safetensors filter=lfs\n".to_vec(),
    );
    files
}

fn refused(status: StatusCode, message: &str) -> Response {
    (
        status,
        [("x-error-message", message.to_string())],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

fn decode(segment: &str) -> String {
    url::form_urlencoded::parse(format!("v={segment}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn handle(
    State(hub): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut h = hub.lock().unwrap();
    h.log.push(match &range {
        Some(r) => format!("{method} {path} range={r}"),
        None => format!("{method} {path}"),
    });
    if let Some(oid) = path.strip_prefix("/cdn/") {
        return cdn(&mut h, oid, range.as_deref());
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest.to_string()),
        None => (false, path.trim_start_matches('/').to_string()),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    let expected_verb = if api { "revision" } else { "resolve" };
    if parts.len() < 4 || parts[2] != expected_verb || (!api && parts.len() != 5) {
        return refused(StatusCode::NOT_FOUND, "no such route");
    }
    let repo_id = format!("{}/{}", parts[0], parts[1]);
    let Some((gated, files)) = h.repos.get(&repo_id).cloned() else {
        return refused(StatusCode::NOT_FOUND, "Repository not found");
    };
    let authorised = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if gated && !authorised {
        return refused(
            StatusCode::UNAUTHORIZED,
            &format!(
                "Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it."
            ),
        );
    }
    let revision = decode(parts[3]);
    if revision != "main" && revision != COMMIT {
        return refused(
            StatusCode::NOT_FOUND,
            &format!("Invalid rev id: {revision}"),
        );
    }
    if api {
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        return axum::Json(serde_json::json!({
            "id": repo_id, "sha": COMMIT, "private": false, "gated": gated, "siblings": siblings,
        }))
        .into_response();
    }
    let file = decode(parts[4]);
    let Some(content) = files.get(&file).filter(|_| !h.unserved.contains(&file)) else {
        return (
            StatusCode::NOT_FOUND,
            [("x-error-code", "EntryNotFound"), ("x-repo-commit", COMMIT)],
            "Entry not found",
        )
            .into_response();
    };
    if is_lfs(&file) {
        let oid = sha256_hex(content);
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("/cdn/{oid}"))
            .header("x-repo-commit", COMMIT)
            .header("x-linked-etag", format!("\"{oid}\""))
            .header("x-linked-size", content.len().to_string())
            .header(header::ETAG, "\"redirect-etag\"")
            .body(Body::empty())
            .unwrap();
    }
    let response = Response::builder()
        .header("x-repo-commit", COMMIT)
        .header(header::ETAG, format!("\"{}\"", git_blob_sha1(content)))
        .header(header::CONTENT_LENGTH, content.len().to_string());
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(content.clone())
    };
    response.body(body).unwrap()
}

/// The storage side of an LFS file: `Range: bytes=N-` answers 206.
fn cdn(h: &mut Hub, oid: &str, range: Option<&str>) -> Response {
    if h.storage_down > 0 && !h.cuts.values().any(|n| *n > 0) {
        h.storage_down -= 1;
        return refused(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
    }
    let Some(content) = h
        .repos
        .values()
        .flat_map(|(_, files)| files.values())
        .find(|c| sha256_hex(c) == oid)
        .cloned()
    else {
        return refused(StatusCode::NOT_FOUND, "no such object");
    };
    let mut content = content;
    if h.corrupt.contains(oid) {
        let middle = content.len() / 2;
        content[middle] ^= 0x55;
    }
    let start: usize = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let total = content.len();
    let part = content[start..].to_vec();
    let mut response = Response::builder()
        .header(header::CONTENT_LENGTH, part.len().to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    response = if range.is_some() {
        response.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1),
        )
    } else {
        response.status(StatusCode::OK)
    };
    if let Some(left) = h.cuts.get_mut(oid).filter(|n| **n > 0) {
        *left -= 1;
        // Headers promise the whole body; the connection dies after half of it.
        let half = Bytes::from(part[..part.len() / 2].to_vec());
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            vec![Ok(half), Err(std::io::Error::other("cut"))];
        return response
            .body(Body::from_stream(futures::stream::iter(chunks)))
            .unwrap();
    }
    response.body(Body::from(part)).unwrap()
}

/// Starts the Hub on a thread of its own with the three repositories; returns its URL and state.
fn start() -> (String, Shared) {
    let shared = Shared::default();
    {
        let mut h = shared.lock().unwrap();
        for (id, gated) in [(PUBLIC, false), (GATED, true), (CORRUPT, false)] {
            h.repos.insert(id.to_string(), (gated, fixture_files()));
        }
    }
    let url = serve_on_thread(Router::new().fallback(handle).with_state(shared.clone()));
    (url, shared)
}

fn weights_oid() -> String {
    sha256_hex(&fixture_files()["model.safetensors"])
}

/// The binary with the Hub environment pointing at `endpoint` and a cache in `ws`, and nothing
/// from the caller's own Hub setup.
fn hub_bin(ws: &Workspace, endpoint: &str) -> std::process::Command {
    let mut cmd = bin();
    cmd.env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home(ws))
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("XDG_CACHE_HOME");
    cmd
}

fn hf_home(ws: &Workspace) -> PathBuf {
    ws.path().join("hf-home")
}

fn repo_cache(ws: &Workspace, repo_id: &str) -> PathBuf {
    hf_home(ws)
        .join("hub")
        .join(format!("models--{}", repo_id.replace('/', "--")))
}

const GENERATE: &[&str] = &[
    "generate",
    "--prompt",
    "The capital of France is",
    "--max-new-tokens",
    "8",
    "--device",
    "cpu",
];

fn generate(cmd: &mut std::process::Command, model: &str) -> Output {
    cmd.args(GENERATE)
        .args(["--model", model])
        .output()
        .unwrap()
}

/// Asserts that the run failed and its stderr holds every needle; returns stderr.
fn failed(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    err
}

fn requests(hub: &Shared) -> Vec<String> {
    hub.lock().unwrap().log.clone()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

#[test]
fn generate_from_the_hub_resumes_a_cut_download_and_then_runs_from_the_cache() {
    let (url, hub) = start();
    let oid = weights_oid();
    hub.lock().unwrap().cuts.insert(oid.clone(), 1);
    let ws = Workspace::new();
    let local = generate(
        &mut bin(),
        &repo()
            .join("tests/fixtures/tiny-llama-policy")
            .display()
            .to_string(),
    );
    assert!(local.status.success(), "{}", stderr(&local));

    let model = format!("hf://{PUBLIC}");
    let first = generate(&mut hub_bin(&ws, &url), &model);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        stdout(&first),
        stdout(&local),
        "the Hub copy generates as the fixture"
    );

    // The weights came in two GETs: the first cut off, the second resuming where it stopped.
    let log = requests(&hub);
    let cdn: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with(&format!("GET /cdn/{oid}")))
        .collect();
    assert_eq!(cdn.len(), 2, "{log:#?}");
    let size = fixture_files()["model.safetensors"].len();
    assert!(!cdn[0].contains("range="), "{log:#?}");
    // The server sent half the body before the connection died; the retry asks for the rest.
    let resumed_at: usize = cdn[1]
        .split("range=bytes=")
        .nth(1)
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Range on the second download: {log:#?}"));
    assert!(
        resumed_at > 0 && resumed_at <= size / 2,
        "{resumed_at} of {size}"
    );
    for skipped in ["README.md", "pytorch_model.bin", ".gitattributes"] {
        assert!(
            !log.iter().any(|l| l.ends_with(&format!("/{skipped}"))),
            "{skipped} is not part of a model directory: {log:#?}"
        );
    }
    // The cache is laid out as huggingface_hub lays it out, the blob verified and whole.
    let cache = repo_cache(&ws, PUBLIC);
    assert_eq!(
        std::fs::read_to_string(cache.join("refs/main")).unwrap(),
        COMMIT
    );
    let snapshot = cache.join("snapshots").join(COMMIT);
    let link = std::fs::read_link(snapshot.join("model.safetensors")).unwrap();
    assert_eq!(link, Path::new("../../blobs").join(&oid));
    assert_eq!(
        std::fs::read(cache.join("blobs").join(&oid)).unwrap(),
        fixture_files()["model.safetensors"]
    );
    let config_blob = git_blob_sha1(&fixture_files()["config.json"]);
    assert!(cache.join("blobs").join(config_blob).is_file());
    assert!(
        !files_under(&cache.join("blobs"))
            .iter()
            .any(|f| f.ends_with(".incomplete")),
        "{:?}",
        files_under(&cache.join("blobs"))
    );

    // A branch is asked about (one API request) and nothing is downloaded again.
    let before = requests(&hub).len();
    let second = generate(&mut hub_bin(&ws, &url), &model);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&second), stdout(&local));
    assert_eq!(
        requests(&hub)[before..],
        [format!("GET /api/models/{PUBLIC}/revision/main")],
    );
    // A commit, and any cached revision offline, make no request at all.
    let before = requests(&hub).len();
    let pinned = generate(&mut hub_bin(&ws, &url), &format!("{model}@{COMMIT}"));
    assert!(pinned.status.success(), "{}", stderr(&pinned));
    let offline = generate(hub_bin(&ws, &url).env("HF_HUB_OFFLINE", "1"), &model);
    assert!(offline.status.success(), "{}", stderr(&offline));
    assert_eq!(stdout(&offline), stdout(&local));
    assert_eq!(
        requests(&hub).len(),
        before,
        "{:#?}",
        &requests(&hub)[before..]
    );
    // Offline, a revision never fetched is an error that says so.
    let missing = generate(
        hub_bin(&ws, &url).env("HF_HUB_OFFLINE", "1"),
        &format!("{model}@v2"),
    );
    failed(&missing, &["not in the local Hub cache", "HF_HUB_OFFLINE"]);
}

#[test]
fn a_gated_model_needs_a_token_which_is_never_shown() {
    let (url, hub) = start();
    let ws = Workspace::new();
    let model = format!("hf://{GATED}");
    let refused = generate(&mut hub_bin(&ws, &url), &model);
    failed(
        &refused,
        &[
            &format!("model {GATED} is gated or private"),
            "HTTP 401",
            "set HF_TOKEN",
        ],
    );
    assert!(!repo_cache(&ws, GATED).join("snapshots").exists());

    let allowed = generate(hub_bin(&ws, &url).env("HF_TOKEN", TOKEN).arg("-vv"), &model);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    for text in [stdout(&allowed), stderr(&allowed)] {
        assert!(!text.contains(TOKEN), "the token leaked: {text}");
    }
    assert!(
        requests(&hub)
            .iter()
            .any(|l| l.starts_with(&format!("GET /api/models/{GATED}/"))),
        "the gated repository was asked with the token"
    );

    // In GitHub Actions the token is masked as soon as a config is read.
    let o = hub_bin(&ws, &url)
        .env("GITHUB_ACTIONS", "true")
        .env("HF_TOKEN", TOKEN)
        .arg("--config")
        .arg(ws.sample_config())
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .lines()
            .any(|l| l == format!("::add-mask::{TOKEN}")),
        "{}",
        stderr(&o)
    );

    // A wrong token is refused and not echoed either.
    let wrong = "hf_wrong_22c4d0";
    let ws2 = Workspace::new();
    let o = generate(hub_bin(&ws2, &url).env("HF_TOKEN", wrong), &model);
    let err = failed(&o, &["refused the token"]);
    assert!(!err.contains(wrong), "{err}");

    // The token `hf auth login` saves in $HF_HOME/token works as HF_TOKEN does.
    let ws3 = Workspace::new();
    std::fs::create_dir_all(hf_home(&ws3)).unwrap();
    std::fs::write(hf_home(&ws3).join("token"), format!("{TOKEN}\n")).unwrap();
    let o = generate(&mut hub_bin(&ws3, &url), &model);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains(TOKEN) && !stdout(&o).contains(TOKEN));
}

#[test]
fn a_missing_repository_revision_or_file_is_a_404_naming_it() {
    let (url, hub) = start();
    let ws = Workspace::new();
    let o = generate(&mut hub_bin(&ws, &url), "hf://tiny-org/no-such-model");
    failed(
        &o,
        &[
            "model tiny-org/no-such-model at revision main was not found",
            "HTTP 404",
            "hint:",
        ],
    );
    let o = generate(&mut hub_bin(&ws, &url), &format!("hf://{PUBLIC}@v9"));
    failed(
        &o,
        &[&format!("model {PUBLIC} at revision v9 was not found")],
    );
    // A file the listing names but the resolve endpoint does not serve.
    hub.lock().unwrap().unserved.insert("tokenizer.json".into());
    let o = generate(&mut hub_bin(&ws, &url), &format!("hf://{PUBLIC}"));
    failed(
        &o,
        &[&format!(
            "file tokenizer.json of {PUBLIC} at commit {COMMIT} was not found"
        )],
    );
    // Malformed references fail before any request.
    let before = requests(&hub).len();
    let o = generate(&mut hub_bin(&ws, &url), "hf://only-a-name");
    failed(&o, &["hf://ORG/NAME"]);
    assert_eq!(requests(&hub).len(), before);
}

#[test]
fn a_corrupted_body_fails_verification_and_leaves_nothing_in_the_snapshot() {
    let (url, hub) = start();
    let oid = weights_oid();
    // The corrupt repository's weights are the same bytes as the public one's: corrupt the oid
    // only for that test's server.
    hub.lock().unwrap().corrupt.insert(oid.clone());
    let ws = Workspace::new();
    let o = generate(&mut hub_bin(&ws, &url), &format!("hf://{CORRUPT}"));
    failed(
        &o,
        &[
            "model.safetensors",
            "failed verification",
            &format!("expected sha256 {oid}"),
        ],
    );
    let cache = repo_cache(&ws, CORRUPT);
    assert!(
        !cache
            .join("snapshots")
            .join(COMMIT)
            .join("model.safetensors")
            .exists()
    );
    assert_eq!(
        files_under(&cache.join("blobs"))
            .iter()
            .filter(|f| f.starts_with(&oid))
            .count(),
        0,
        "neither the blob nor its partial download stays: {:?}",
        files_under(&cache.join("blobs"))
    );
    // Once the server is fixed, the next run downloads afresh and succeeds.
    hub.lock().unwrap().corrupt.clear();
    let o = generate(&mut hub_bin(&ws, &url), &format!("hf://{CORRUPT}"));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn an_unreachable_endpoint_is_named_with_what_to_do() {
    let ws = Workspace::new();
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let o = generate(&mut hub_bin(&ws, &endpoint), &format!("hf://{PUBLIC}"));
    failed(
        &o,
        &[
            &format!("could not reach the Hugging Face Hub at {endpoint}"),
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE=1",
        ],
    );
}

#[test]
fn a_config_policy_model_from_the_hub_trains_and_the_registry_pins_its_commit() {
    let (url, hub) = start();
    let ws = Workspace::new();
    let text = ws.sample_config_text().replace(
        "policy:\n",
        &format!("policy:\n  model: hf://{PUBLIC}\n  chat_template: false\n"),
    );
    let cfg = ws.write_config(&text);
    let check = hub_bin(&ws, &url)
        .arg("--config")
        .arg(&cfg)
        .args(["--format", "json", "config", "check"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    let settings: serde_json::Value = serde_json::from_str(&stdout(&check)).unwrap();
    let policy = &settings["settings"]["policy"];
    assert_eq!(policy["model"], format!("hf://{PUBLIC}"), "kept as written");
    assert_eq!(
        policy["base_model_id"], PUBLIC,
        "the public id PEFT exports name defaults to the repository"
    );
    assert!(requests(&hub).is_empty(), "config check downloads nothing");
    let json = forced_run_json_with(hub_bin(&ws, &url), &cfg, "2026-11-27T12:00:00Z");
    let report = std::fs::read_to_string(json["run"]["report"].as_str().unwrap()).unwrap();
    // (`@` is defused against GitHub mentions, so only the parts around it are matched.)
    assert!(
        report.contains(&format!("base model hf://{PUBLIC}@"))
            && report.contains(&format!("main at commit `{COMMIT}`")),
        "the reviewer sees the pinned base: {report}"
    );
    let registry = std::fs::read_to_string(ws.store_dir().join("registry.yaml")).unwrap();
    assert!(
        registry.contains(&format!("base_model: hf://{PUBLIC}@main"))
            && registry.contains(&format!("base_model_commit: {COMMIT}")),
        "{registry}"
    );

    // A malformed reference in the config is refused by `config check`, naming the key.
    let bad = ws.write_config(&text.replace(&format!("hf://{PUBLIC}"), "hf://no-org"));
    let o = hub_bin(&ws, &url)
        .arg("--config")
        .arg(&bad)
        .args(["config", "check"])
        .output()
        .unwrap();
    failed(&o, &["policy.model", "hf://ORG/NAME"]);
}

#[test]
fn train_reward_takes_a_hub_backbone_on_the_command_line() {
    let (url, hub) = start();
    let ws = Workspace::new();
    let pairs: String = [
        ("What is a carbon tax?", "A price on emissions.", "Bananas."),
        ("Define GDP.", "Total output of an economy.", "Trains."),
        ("What is inflation?", "Rising prices over time.", "Purple."),
        ("What is a tariff?", "A tax on imports.", "No idea."),
    ]
    .iter()
    .map(|(p, c, r)| {
        serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string() + "\n"
    })
    .collect();
    let data = ws.path().join("pairs.jsonl");
    std::fs::write(&data, pairs).unwrap();
    let out = ws.path().join("reward");
    let o = hub_bin(&ws, &url)
        .arg("--config")
        .arg(ws.sample_config())
        .args(["--format", "json", "train", "reward", "--model"])
        .arg(format!("hf://{PUBLIC}@{COMMIT}"))
        .arg("--dataset")
        .arg(&data)
        .args([
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--max-length",
            "32",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.join("config.json").is_file(),
        "a reward model was written"
    );
    assert!(
        requests(&hub)
            .iter()
            .any(|l| l == &format!("GET /api/models/{PUBLIC}/revision/{COMMIT}")),
        "{:#?}",
        requests(&hub)
    );
}

#[test]
fn a_download_that_gave_up_is_resumed_by_the_next_run() {
    let (url, hub) = start();
    let oid = weights_oid();
    // Cut half way, then an outage longer than one run's attempts: the first run gives up.
    {
        let mut h = hub.lock().unwrap();
        h.cuts.insert(oid.clone(), 1);
        h.storage_down = 1000;
    }
    let ws = Workspace::new();
    let model = format!("hf://{PUBLIC}");
    let o = generate(&mut hub_bin(&ws, &url), &model);
    failed(
        &o,
        &[
            "model.safetensors",
            "stopped after",
            "HTTP 503",
            "the download resumes where it stopped",
        ],
    );
    let partial = repo_cache(&ws, PUBLIC)
        .join("blobs")
        .join(format!("{oid}.incomplete"));
    let kept = std::fs::metadata(&partial).unwrap().len();
    let size = fixture_files()["model.safetensors"].len() as u64;
    assert!(kept > 0 && kept < size, "{kept} of {size} bytes kept");
    assert!(
        !repo_cache(&ws, PUBLIC)
            .join("snapshots")
            .join(COMMIT)
            .join("model.safetensors")
            .exists()
    );

    hub.lock().unwrap().storage_down = 0;
    let before = requests(&hub).len();
    let o = generate(&mut hub_bin(&ws, &url), &model);
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = format!("GET /cdn/{oid} range=bytes={kept}-");
    assert!(
        requests(&hub)[before..].contains(&resumed),
        "{resumed} not in {:#?}",
        &requests(&hub)[before..]
    );
    assert!(!partial.exists());
    assert_eq!(
        std::fs::read(repo_cache(&ws, PUBLIC).join("blobs").join(&oid)).unwrap(),
        fixture_files()["model.safetensors"]
    );
}

#[test]
fn a_blob_another_process_is_downloading_is_waited_for() {
    let (url, hub) = start();
    let oid = weights_oid();
    let ws = Workspace::new();
    // The lock huggingface_hub would hold while downloading the weights.
    let lock_path = repo_cache(&ws, PUBLIC)
        .parent()
        .unwrap()
        .join(".locks")
        .join(format!("models--{}", PUBLIC.replace('/', "--")))
        .join(format!("{oid}.lock"));
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.lock().unwrap();
    let child = hub_bin(&ws, &url)
        .arg("-v")
        .args(GENERATE)
        .args(["--model", &format!("hf://{PUBLIC}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let asked = format!("HEAD /{PUBLIC}/resolve/{COMMIT}/model.safetensors");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !requests(&hub).contains(&asked) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            requests(&hub)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        !requests(&hub)
            .iter()
            .any(|l| l.starts_with(&format!("GET /cdn/{oid}"))),
        "nothing is downloaded while another process holds the blob's lock"
    );
    lock.unlock().unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another process is downloading file model.safetensors"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn export_model_reads_a_hub_model() {
    let (url, _hub) = start();
    let ws = Workspace::new();
    let out = ws.path().join("exported");
    let o = hub_bin(&ws, &url)
        .args([
            "export-model",
            "--model",
            &format!("hf://{PUBLIC}"),
            "--to",
            "hf",
        ])
        .args(["--dtype", "f32", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let fixture: serde_json::Value =
        serde_json::from_slice(&fixture_files()["config.json"]).unwrap();
    assert_eq!(config["hidden_size"], fixture["hidden_size"]);
}
