//! Contract tests: the publisher's requests are checked against GitHub's own OpenAPI description
//! (npm `@octokit/openapi`) by a Stoplight Prism mock that this test starts, and the workflows
//! are checked by actionlint. Prism answers a request that breaks the contract (missing or
//! mistyped field, wrong method or path) with 422 and an `sl-violations` header.
//!
//! Prism keeps no state, so a small proxy between the publisher and Prism steers its answers
//! (asks Prism for a 404 on the branch look-up; marks listed PRs and commits as the bot's) and
//! records every exchange. The publisher's own requests are never changed.
//!
//! The tools come from `scripts/install-test-deps.sh` into `${RLHF_TEST_DEPS:-~/.cache/rlhf-bot/test-deps}`;
//! without them the tests print "skipped" and pass, unless `RLHF_REQUIRE_TEST_DEPS=1` or
//! `RLHF_REQUIRE_TEST_ASSETS` is set (CI, through scripts/test.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use rlhf_bot::forge::github::{GithubTarget, RecordingSleeper, RetryPolicy, SecretToken};
use rlhf_bot::forge::{OnExisting, PublishAction, PublishRequest, publish_with_retry};
use serde_json::Value;

use super::common::{deps_dir, have};
use super::prism::Prism;

const BRANCH: &str = "rlhf-bot/dpo-contract";

/// Which stateful GitHub the proxy makes Prism look like.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    /// The branch does not exist; an earlier bot PR (#1000) is open.
    FreshWithEarlierPr,
    /// The branch exists with a bot commit on top and its PR is open.
    ExistingBotBranch,
}

#[derive(Debug, Clone)]
struct Exchange {
    method: String,
    uri: String,
    status: u16,
    request_violations: Vec<String>,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    scenario: Arc<Mutex<Scenario>>,
    log: Arc<Mutex<Vec<Exchange>>>,
    client: reqwest::Client,
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let scenario = *proxy.scenario.lock().expect("scenario");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let path = request.uri().path().to_owned();
    let mut headers = request.headers().clone();
    for hop in ["host", "content-length", "connection"] {
        headers.remove(hop);
    }
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .expect("request body");
    let branch_ref = format!("/git/ref/heads%2F{}", BRANCH.replace('/', "%2F"));
    if scenario == Scenario::FreshWithEarlierPr && method == "GET" && path.ends_with(&branch_ref) {
        headers.insert("prefer", "code=404".parse().expect("header"));
    }
    let upstream = proxy
        .client
        .request(method.clone(), format!("{}{uri}", proxy.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await
        .expect("prism answers");
    let status = upstream.status();
    let violations: Vec<String> = upstream
        .headers()
        .get("sl-violations")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str::<Vec<Value>>(v).ok())
        .unwrap_or_default()
        .into_iter()
        // GitHub's own examples break its schema in places (response violations); only the
        // requests are ours to get right.
        .filter(|v| v["location"][0] == "request")
        .map(|v| v.to_string())
        .collect();
    let content_type = upstream.headers().get("content-type").cloned();
    let mut bytes = upstream.bytes().await.expect("prism body").to_vec();
    if method == "GET" && status.is_success() {
        bytes = steer(scenario, &path, bytes);
    }
    proxy.log.lock().expect("log").push(Exchange {
        method: method.to_string(),
        uri,
        status: status.as_u16(),
        request_violations: violations,
    });
    let mut response = Response::builder().status(status);
    if let Some(ct) = content_type {
        response = response.header("content-type", ct);
    }
    response.body(Body::from(bytes)).expect("response")
}

/// Rewrites Prism's static examples so they describe the scenario's repository state.
fn steer(scenario: Scenario, path: &str, bytes: Vec<u8>) -> Vec<u8> {
    let Ok(mut json) = serde_json::from_slice::<Value>(&bytes) else {
        return bytes;
    };
    if path.ends_with("/pulls") {
        if let Some(first) = json.as_array_mut().and_then(|a| a.first_mut()) {
            let (number, branch) = match scenario {
                Scenario::FreshWithEarlierPr => (1000, "rlhf-bot/dpo-earlier"),
                Scenario::ExistingBotBranch => (1001, BRANCH),
            };
            first["number"] = number.into();
            first["html_url"] = format!("https://github.com/acme/assistant/pull/{number}").into();
            first["head"]["ref"] = branch.into();
            first["head"]["repo"]["full_name"] = "acme/assistant".into();
        }
    } else if path.contains("/git/commits/") && scenario == Scenario::ExistingBotBranch {
        json["message"] = "rlhf-bot: earlier run\n\nRlhf-Bot-Run: run0\n".into();
    }
    serde_json::to_vec(&json).unwrap_or_default()
}

fn request() -> PublishRequest {
    PublishRequest {
        run_id: "contract-1".into(),
        branch: BRANCH.into(),
        branch_prefix: "rlhf-bot/".into(),
        title: "rlhf-bot: DPO candidate contract-1".into(),
        body: "## Metric report\n\n| metric | value |\n|---|---|\n| win rate | 0.61 |\n".into(),
        files: vec![
            (
                "models/registry.yaml".into(),
                b"models:\n  - version: contract-1\n".to_vec(),
            ),
            (
                "reports/contract-1/reward.svg".into(),
                b"<svg xmlns='http://www.w3.org/2000/svg'/>".to_vec(),
            ),
        ],
        labels: vec!["rlhf-bot".into()],
        reviewers: vec!["octocat".into(), "acme/ml-review".into()],
        draft: true,
        on_existing: OnExisting::Supersede,
    }
}

/// A ready Prism over GitHub's description, or `None` (skipped) when the tools are missing.
pub(crate) fn github_prism() -> Option<Prism> {
    let deps = deps_dir();
    if !have(&deps.join("node_modules/.bin/prism"), "prism")
        || !have(
            &deps.join("node_modules/@octokit/openapi/generated/api.github.com.json"),
            "@octokit/openapi",
        )
    {
        return None;
    }
    let spec = deps.join("node_modules/@octokit/openapi/generated/api.github.com.json");
    Some(Prism::mock(&deps, &spec))
}

/// `deploy`'s `repository_dispatch` (issue 16): the request GitHub's description accepts; a
/// payload over GitHub's 10-property limit is refused, so the check is real.
#[tokio::test]
async fn repository_dispatch_honours_githubs_openapi_contract() {
    let Some(prism) = github_prism() else { return };
    let settings = rlhf_bot::config::deploy::DispatchSettings {
        api_url: format!("http://127.0.0.1:{}", prism.port),
        owner: "acme".into(),
        repo: "serving".into(),
        event_type: "rlhf-model-deployed".into(),
        token_env: "UNUSED".into(),
    };
    let token = SecretToken::new("dispatch-token").unwrap();
    let policy = RetryPolicy::default().with_sleeper(Arc::new(RecordingSleeper::default()));
    let payload = serde_json::json!({
        "kind": "policy", "id": "policy-1", "deployed_at": "2026-12-07T09:19:02Z",
        "manifest": "s3://b/production/policy/manifest.json", "artifact_sha256": "0",
        "formats": {"hf": "s3://b/production/policy/versions/policy-1/hf/"},
    });
    rlhf_bot::deploy::notify::send_dispatch(&settings, token.clone(), payload, policy.clone())
        .await
        .unwrap();
    let too_big: serde_json::Map<String, Value> =
        (0..11).map(|i| (format!("k{i}"), Value::from(i))).collect();
    let err = rlhf_bot::deploy::notify::send_dispatch(&settings, token, too_big.into(), policy)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("422"), "{err}");
    drop(prism);
}

#[tokio::test]
async fn publish_flow_honours_githubs_openapi_contract() {
    let Some(prism) = github_prism() else { return };

    let proxy = Proxy {
        upstream: format!("http://127.0.0.1:{}", prism.port),
        scenario: Arc::new(Mutex::new(Scenario::FreshWithEarlierPr)),
        log: Arc::new(Mutex::new(Vec::new())),
        client: reqwest::Client::new(),
    };
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let proxy_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let target = GithubTarget {
        api_url: proxy_url,
        owner: "acme".into(),
        repo: "assistant".into(),
        base_branch: "main".into(),
        token: SecretToken::new("ghs_contract_test").expect("token"),
    };
    let policy = || RetryPolicy::default().with_sleeper(Arc::new(RecordingSleeper::default()));

    // 1. Fresh branch: ref, blobs, tree, commit, new ref, PR, labels, reviewers, supersede #1000.
    let outcome = publish_with_retry(&target, &request(), policy()).await;
    let fresh: Vec<Exchange> = std::mem::take(&mut *proxy.log.lock().expect("log"));
    let outcome = outcome.unwrap_or_else(|e| panic!("{e:#}\nexchanges: {fresh:#?}"));
    assert_eq!(outcome.action, PublishAction::Created, "{fresh:#?}");
    assert_eq!(outcome.superseded, vec![1000]);
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    let ops: Vec<String> = fresh
        .iter()
        .map(|e| format!("{} {}", e.method, e.uri.split('?').next().unwrap_or("")))
        .collect();
    for expected in [
        "POST /repos/acme/assistant/git/blobs",
        "POST /repos/acme/assistant/git/trees",
        "POST /repos/acme/assistant/git/commits",
        "POST /repos/acme/assistant/git/refs",
        "POST /repos/acme/assistant/pulls",
        "POST /repos/acme/assistant/issues/1347/labels",
        "POST /repos/acme/assistant/pulls/1347/requested_reviewers",
        "POST /repos/acme/assistant/issues/1000/comments",
        "PATCH /repos/acme/assistant/pulls/1000",
    ] {
        assert!(
            ops.iter().any(|op| op == expected),
            "missing {expected} in {ops:#?}"
        );
    }

    // 2. Same branch again, now the bot's: fast-forward the ref and update the PR.
    *proxy.scenario.lock().expect("scenario") = Scenario::ExistingBotBranch;
    let outcome = publish_with_retry(&target, &request(), policy()).await;
    let again: Vec<Exchange> = std::mem::take(&mut *proxy.log.lock().expect("log"));
    let outcome = outcome.unwrap_or_else(|e| panic!("{e:#}\nexchanges: {again:#?}"));
    assert_eq!(outcome.action, PublishAction::Updated, "{again:#?}");
    assert_eq!(outcome.pr_number, Some(1001));
    let ops: Vec<String> = again
        .iter()
        .map(|e| format!("{} {}", e.method, e.uri))
        .collect();
    assert!(
        ops.iter().any(|op| op
            .starts_with("PATCH /repos/acme/assistant/git/refs/heads%2Frlhf-bot%2Fdpo-contract")),
        "{ops:#?}"
    );
    assert!(
        ops.iter()
            .any(|op| op == "PATCH /repos/acme/assistant/pulls/1001"),
        "{ops:#?}"
    );
    assert!(
        !ops.iter()
            .any(|op| op == "POST /repos/acme/assistant/pulls"),
        "{ops:#?}"
    );

    for exchange in fresh.iter().chain(&again) {
        assert!(
            exchange.request_violations.is_empty(),
            "contract violation: {exchange:#?}"
        );
        let steered_404 =
            exchange.status == 404 && exchange.uri.contains("/git/ref/heads%2Frlhf-bot");
        assert!(
            exchange.status < 400 || steered_404,
            "unexpected status: {exchange:#?}"
        );
    }
    drop(prism);
}

#[test]
fn workflows_pass_actionlint() {
    let actionlint = deps_dir().join("venv/bin/actionlint");
    if !have(&actionlint, "actionlint") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // This project's own workflows and the team workflow it ships as a template.
    let workflows: Vec<PathBuf> = [".github/workflows", "workflow-template"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).expect(dir))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    assert!(
        workflows.len() >= 4
            && [
                "workflow-template/rlhf.yml",
                "workflow-template/rlhf-ray.yml"
            ]
            .iter()
            .all(|t| workflows.iter().any(|p| p.ends_with(t))),
        "expected ci.yml, release.yml and workflow-template/rlhf.yml and rlhf-ray.yml, found {workflows:?}"
    );
    // actionlint runs ShellCheck on every `run:` script when it finds it on PATH; the test tools'
    // venv has it (scripts/install-test-deps.sh).
    let tools = deps_dir().join("venv/bin");
    let path = std::env::join_paths(std::iter::once(tools).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let output = Command::new(&actionlint)
        .arg("-no-color")
        .args(&workflows)
        .env("PATH", path)
        .current_dir(root)
        .output()
        .expect("running actionlint");
    assert!(
        output.status.success(),
        "actionlint found problems:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
