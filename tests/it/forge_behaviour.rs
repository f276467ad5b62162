//! The publisher against a strict wiremock GitHub: every call it may make is mounted with an
//! exact count, and a catch-all that must never match makes any other call fail the test. Each
//! test is one scenario from the issue (created, updated, human commits, 422, 409, rate limits,
//! 5xx, missing token). The clock is a `RecordingSleeper`, so waits are asserted, not slept.

use std::sync::Arc;
use std::time::Duration;

use rlhf_bot::forge::github::{GithubTarget, RecordingSleeper, RetryPolicy, SecretToken};
use rlhf_bot::forge::{OnExisting, PublishAction, PublishRequest, publish_with_retry};
use serde_json::{Value, json};
use wiremock::matchers::{any, body_partial_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const REPO: &str = "/repos/acme/assistant";
const BRANCH: &str = "rlhf-bot/dpo-run1";
const BRANCH_REF: &str = "/repos/acme/assistant/git/ref/heads%2Frlhf-bot%2Fdpo-run1";
const BRANCH_REF_PATCH: &str = "/repos/acme/assistant/git/refs/heads%2Frlhf-bot%2Fdpo-run1";
const TOKEN: &str = "ghs_test_token_value";

fn target(server: &MockServer) -> GithubTarget {
    GithubTarget {
        api_url: server.uri(),
        owner: "acme".into(),
        repo: "assistant".into(),
        base_branch: "main".into(),
        token: SecretToken::new(TOKEN).expect("token"),
    }
}

fn request(labels: bool) -> PublishRequest {
    PublishRequest {
        run_id: "run1".into(),
        branch: BRANCH.into(),
        branch_prefix: "rlhf-bot/".into(),
        title: "rlhf-bot: DPO candidate run1".into(),
        body: "## Report\n\nwin rate 0.61".into(),
        files: vec![
            ("models/registry.yaml".into(), b"models: []\n".to_vec()),
            ("reports/run1/loss.svg".into(), vec![0, 159, 146, 150, 255]),
        ],
        labels: if labels {
            vec!["rlhf-bot".into(), "model-update".into()]
        } else {
            vec![]
        },
        reviewers: if labels {
            vec!["octocat".into(), "acme/ml-review".into()]
        } else {
            vec![]
        },
        draft: true,
        on_existing: OnExisting::Supersede,
    }
}

fn policy(sleeper: &RecordingSleeper) -> RetryPolicy {
    RetryPolicy::default().with_sleeper(Arc::new(sleeper.clone()))
}

fn pull(number: u64, branch: &str) -> Value {
    json!({
        "number": number,
        "html_url": format!("https://github.com/acme/assistant/pull/{number}"),
        "state": "open",
        "head": { "ref": branch, "sha": "0000", "repo": { "full_name": "acme/assistant" } }
    })
}

fn bot_commit(sha: &str, tree: &str) -> Value {
    json!({ "sha": sha, "message": "rlhf-bot: DPO candidate run0\n\nRlhf-Bot-Run: run0\n", "tree": { "sha": tree } })
}

async fn server() -> MockServer {
    let server = MockServer::start().await;
    // Strictness: anything not mounted below is a call the publisher must not make.
    Mock::given(any())
        .respond_with(ResponseTemplate::new(418))
        .with_priority(u8::MAX)
        .expect(0)
        .named("unexpected call")
        .mount(&server)
        .await;
    server
}

async fn mount(server: &MockServer, mock: Mock) {
    mock.mount(server).await;
}

fn get(p: &str) -> wiremock::MockBuilder {
    Mock::given(method("GET")).and(path(p.to_owned()))
}

fn post(p: &str) -> wiremock::MockBuilder {
    Mock::given(method("POST")).and(path(format!("{REPO}{p}")))
}

fn patch(p: &str) -> wiremock::MockBuilder {
    Mock::given(method("PATCH")).and(path(p.to_owned()))
}

fn ok(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(body)
}

fn created(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(body)
}

/// Open PRs against main: the list the publisher reads first.
async fn mount_open_pulls(server: &MockServer, pulls: Value) {
    let m = get(&format!("{REPO}/pulls"))
        .and(query_param("state", "open"))
        .and(query_param("base", "main"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ok(pulls))
        .expect(1)
        .named("list open pulls");
    mount(server, m).await;
}

/// Branch absent, base `main` at `base0` with tree `tree0`, then blobs, tree and commit.
async fn mount_fresh_branch_commit(server: &MockServer) {
    mount(
        server,
        get(BRANCH_REF)
            .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
            .up_to_n_times(1)
            .expect(1)
            .named("branch ref (absent)"),
    )
    .await;
    mount(
        server,
        get(&format!("{REPO}/git/ref/heads%2Fmain"))
            .respond_with(ok(json!({"object": {"sha": "base0"}})))
            .expect(1)
            .named("base ref"),
    )
    .await;
    mount(
        server,
        get(&format!("{REPO}/git/commits/base0"))
            .respond_with(ok(
                json!({"sha": "base0", "message": "merge", "tree": {"sha": "tree0"}}),
            ))
            .expect(1)
            .named("base commit"),
    )
    .await;
    mount_blobs_tree(server, "tree0").await;
    mount(
        server,
        post("/git/commits")
            .and(body_partial_json(json!({"tree": "newtree", "parents": ["base0"], "message": "rlhf-bot: DPO candidate run1\n\nRlhf-Bot-Run: run1\n"})))
            .respond_with(created(json!({"sha": "commit1"})))
            .expect(1)
            .named("commit on base"),
    )
    .await;
}

async fn mount_blobs_tree(server: &MockServer, base_tree: &str) {
    // The binary file must travel base64-encoded, byte-exact.
    mount(
        server,
        post("/git/blobs")
            .and(body_partial_json(
                json!({"content": "bW9kZWxzOiBbXQo=", "encoding": "base64"}),
            ))
            .respond_with(created(json!({"sha": "blob1"})))
            .expect(1)
            .named("blob registry"),
    )
    .await;
    mount(
        server,
        post("/git/blobs")
            .and(body_partial_json(
                json!({"content": "AJ+Slv8=", "encoding": "base64"}),
            ))
            .respond_with(created(json!({"sha": "blob2"})))
            .expect(1)
            .named("blob svg"),
    )
    .await;
    let tree = json!({
        "base_tree": base_tree,
        "tree": [
            {"path": "models/registry.yaml", "mode": "100644", "type": "blob", "sha": "blob1"},
            {"path": "reports/run1/loss.svg", "mode": "100644", "type": "blob", "sha": "blob2"}
        ]
    });
    mount(
        server,
        post("/git/trees")
            .and(body_partial_json(tree))
            .respond_with(created(json!({"sha": "newtree"})))
            .expect(1)
            .named("tree"),
    )
    .await;
}

async fn mount_labels_and_reviewers(server: &MockServer, number: u64) {
    mount(
        server,
        post(&format!("/issues/{number}/labels"))
            .and(body_partial_json(
                json!({"labels": ["rlhf-bot", "model-update"]}),
            ))
            .respond_with(ok(json!([])))
            .expect(1)
            .named("labels"),
    )
    .await;
    mount(
        server,
        post(&format!("/pulls/{number}/requested_reviewers"))
            .and(body_partial_json(
                json!({"reviewers": ["octocat"], "team_reviewers": ["ml-review"]}),
            ))
            .respond_with(created(pull(number, BRANCH)))
            .expect(1)
            .named("reviewers"),
    )
    .await;
}

async fn mount_create_pull(server: &MockServer, response: ResponseTemplate, times: u64) {
    let body = json!({"title": "rlhf-bot: DPO candidate run1", "head": BRANCH, "base": "main", "draft": true, "body": "## Report\n\nwin rate 0.61"});
    mount(
        server,
        post("/pulls")
            .and(body_partial_json(body))
            .respond_with(response)
            .expect(times)
            .named("create pull"),
    )
    .await;
}

#[tokio::test]
async fn first_run_creates_branch_and_pull_request() {
    let server = server().await;
    mount_open_pulls(&server, json!([])).await;
    mount_fresh_branch_commit(&server).await;
    mount(
        &server,
        post("/git/refs")
            .and(body_partial_json(
                json!({"ref": format!("refs/heads/{BRANCH}"), "sha": "commit1"}),
            ))
            .respond_with(created(json!({"ref": "x", "object": {"sha": "commit1"}})))
            .expect(1)
            .named("create ref"),
    )
    .await;
    mount_create_pull(&server, created(pull(7, BRANCH)), 1).await;
    mount_labels_and_reviewers(&server, 7).await;

    let sleeper = RecordingSleeper::default();
    let outcome = publish_with_retry(&target(&server), &request(true), policy(&sleeper))
        .await
        .expect("publish");
    assert_eq!(outcome.action, PublishAction::Created);
    assert_eq!(outcome.pr_number, Some(7));
    assert_eq!(
        outcome.pr_url.as_deref(),
        Some("https://github.com/acme/assistant/pull/7")
    );
    assert_eq!(outcome.commit_sha.as_deref(), Some("commit1"));
    assert!(
        outcome.superseded.is_empty() && outcome.warnings.is_empty(),
        "{outcome:?}"
    );
    assert!(sleeper.waits().is_empty());
}

#[tokio::test]
async fn same_run_again_updates_the_pull_request_instead_of_opening_another() {
    let server = server().await;
    mount_open_pulls(
        &server,
        json!([pull(7, BRANCH), pull(3, "feature/human-work")]),
    )
    .await;
    mount(
        &server,
        get(BRANCH_REF)
            .respond_with(ok(json!({"object": {"sha": "bot1"}})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        get(&format!("{REPO}/git/commits/bot1"))
            .respond_with(ok(bot_commit("bot1", "tree1")))
            .expect(1),
    )
    .await;
    mount_blobs_tree(&server, "tree1").await;
    mount(
        &server,
        post("/git/commits")
            .and(body_partial_json(
                json!({"parents": ["bot1"], "tree": "newtree"}),
            ))
            .respond_with(created(json!({"sha": "commit2"})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        patch(BRANCH_REF_PATCH)
            .and(body_partial_json(json!({"sha": "commit2", "force": false})))
            .respond_with(ok(json!({"object": {"sha": "commit2"}})))
            .expect(1)
            .named("fast-forward ref"),
    )
    .await;
    mount(&server, patch(&format!("{REPO}/pulls/7")).and(body_partial_json(json!({"title": "rlhf-bot: DPO candidate run1", "body": "## Report\n\nwin rate 0.61"}))).respond_with(ok(pull(7, BRANCH))).expect(1).named("update pull")).await;
    mount_labels_and_reviewers(&server, 7).await;

    let outcome = publish_with_retry(
        &target(&server),
        &request(true),
        policy(&RecordingSleeper::default()),
    )
    .await
    .expect("publish");
    assert_eq!(outcome.action, PublishAction::Updated);
    assert_eq!(outcome.pr_number, Some(7));
    assert_eq!(outcome.commit_sha.as_deref(), Some("commit2"));
    // A human's PR (not on a bot branch) is never touched.
    assert!(outcome.superseded.is_empty());
}

#[tokio::test]
async fn human_commit_on_the_branch_is_never_overwritten() {
    let server = server().await;
    mount_open_pulls(&server, json!([pull(7, BRANCH)])).await;
    mount(
        &server,
        get(BRANCH_REF)
            .respond_with(ok(json!({"object": {"sha": "human1"}})))
            .expect(1),
    )
    .await;
    let human = json!({"sha": "human1", "message": "Tweak the report wording\n\nCo-authored-by: Jane <jane@example.com>", "tree": {"sha": "t"}});
    mount(
        &server,
        get(&format!("{REPO}/git/commits/human1"))
            .respond_with(ok(human))
            .expect(1),
    )
    .await;

    let outcome = publish_with_retry(
        &target(&server),
        &request(true),
        policy(&RecordingSleeper::default()),
    )
    .await
    .expect("publish");
    assert_eq!(outcome.action, PublishAction::SkippedHumanCommits);
    assert_eq!(outcome.pr_number, Some(7));
    assert_eq!(outcome.commit_sha, None);
    assert!(outcome.warnings[0].contains("hint:"));
}

#[tokio::test]
async fn earlier_bot_pull_requests_are_superseded() {
    let server = server().await;
    mount_open_pulls(&server, json!([pull(5, "rlhf-bot/dpo-run0")])).await;
    mount_fresh_branch_commit(&server).await;
    mount(
        &server,
        post("/git/refs")
            .respond_with(created(json!({"object": {"sha": "commit1"}})))
            .expect(1),
    )
    .await;
    mount_create_pull(&server, created(pull(8, BRANCH)), 1).await;
    mount(&server, post("/issues/5/comments").and(body_partial_json(json!({"body": "Superseded by #8 (https://github.com/acme/assistant/pull/8) from run `run1`. Closing this pull request; its branch `rlhf-bot/dpo-run0` is kept."}))).respond_with(created(json!({"id": 1}))).expect(1).named("supersede comment")).await;
    mount(
        &server,
        patch(&format!("{REPO}/pulls/5"))
            .and(body_partial_json(json!({"state": "closed"})))
            .respond_with(ok(pull(5, "rlhf-bot/dpo-run0")))
            .expect(1)
            .named("close old"),
    )
    .await;

    let outcome = publish_with_retry(
        &target(&server),
        &request(false),
        policy(&RecordingSleeper::default()),
    )
    .await
    .expect("publish");
    assert_eq!(outcome.action, PublishAction::Created);
    assert_eq!(outcome.superseded, vec![5]);
}

#[tokio::test]
async fn update_mode_continues_the_earlier_bot_pull_request() {
    let server = server().await;
    mount_open_pulls(&server, json!([pull(5, "rlhf-bot/dpo-run0")])).await;
    let old_ref = "/repos/acme/assistant/git/ref/heads%2Frlhf-bot%2Fdpo-run0";
    mount(
        &server,
        get(old_ref)
            .respond_with(ok(json!({"object": {"sha": "bot0"}})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        get(&format!("{REPO}/git/commits/bot0"))
            .respond_with(ok(bot_commit("bot0", "tree0b")))
            .expect(1),
    )
    .await;
    mount_blobs_tree(&server, "tree0b").await;
    mount(
        &server,
        post("/git/commits")
            .and(body_partial_json(json!({"parents": ["bot0"]})))
            .respond_with(created(json!({"sha": "commit9"})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        patch("/repos/acme/assistant/git/refs/heads%2Frlhf-bot%2Fdpo-run0")
            .and(body_partial_json(json!({"sha": "commit9", "force": false})))
            .respond_with(ok(json!({})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        patch(&format!("{REPO}/pulls/5"))
            .and(body_partial_json(
                json!({"title": "rlhf-bot: DPO candidate run1"}),
            ))
            .respond_with(ok(pull(5, "rlhf-bot/dpo-run0")))
            .expect(1),
    )
    .await;

    let mut req = request(false);
    req.on_existing = OnExisting::Update;
    let outcome = publish_with_retry(&target(&server), &req, policy(&RecordingSleeper::default()))
        .await
        .expect("publish");
    assert_eq!(outcome.action, PublishAction::Updated);
    assert_eq!(outcome.pr_number, Some(5));
    assert_eq!(outcome.branch, "rlhf-bot/dpo-run0");
}

#[tokio::test]
async fn pull_request_already_exists_422_is_found_and_updated() {
    let server = server().await;
    // The list came back empty (e.g. the PR targets another base), but GitHub knows better.
    mount_open_pulls(&server, json!([])).await;
    mount_fresh_branch_commit(&server).await;
    mount(
        &server,
        post("/git/refs")
            .respond_with(created(json!({"object": {"sha": "commit1"}})))
            .expect(1),
    )
    .await;
    let exists = json!({
        "message": "Validation Failed",
        "errors": [{"resource": "PullRequest", "code": "custom", "message": "A pull request already exists for acme:rlhf-bot/dpo-run1."}],
        "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"
    });
    mount_create_pull(&server, ResponseTemplate::new(422).set_body_json(exists), 1).await;
    mount(
        &server,
        get(&format!("{REPO}/pulls"))
            .and(query_param("head", "acme:rlhf-bot/dpo-run1"))
            .and(query_param("state", "open"))
            .respond_with(ok(json!([pull(11, BRANCH)])))
            .expect(1)
            .named("find existing pull"),
    )
    .await;
    mount(
        &server,
        patch(&format!("{REPO}/pulls/11"))
            .respond_with(ok(pull(11, BRANCH)))
            .expect(1),
    )
    .await;

    let outcome = publish_with_retry(
        &target(&server),
        &request(false),
        policy(&RecordingSleeper::default()),
    )
    .await
    .expect("publish");
    assert_eq!(outcome.action, PublishAction::Updated);
    assert_eq!(outcome.pr_number, Some(11));
}

#[tokio::test]
async fn ref_conflict_409_continues_on_top_of_the_existing_bot_branch() {
    let server = server().await;
    mount_open_pulls(&server, json!([])).await;
    mount_fresh_branch_commit(&server).await;
    // The branch appears between the look-up and the creation (a concurrent run).
    mount(
        &server,
        post("/git/refs")
            .respond_with(
                ResponseTemplate::new(409)
                    .set_body_json(json!({"message": "Reference already exists"})),
            )
            .expect(1)
            .named("create ref (conflict)"),
    )
    .await;
    mount(
        &server,
        get(BRANCH_REF)
            .respond_with(ok(json!({"object": {"sha": "bot0"}})))
            .with_priority(10)
            .expect(1)
            .named("branch ref (now present)"),
    )
    .await;
    mount(
        &server,
        get(&format!("{REPO}/git/commits/bot0"))
            .respond_with(ok(bot_commit("bot0", "tree0b")))
            .expect(1),
    )
    .await;
    mount(
        &server,
        post("/git/commits")
            .and(body_partial_json(
                json!({"parents": ["bot0"], "tree": "newtree"}),
            ))
            .respond_with(created(json!({"sha": "commit1b"})))
            .expect(1)
            .named("commit on top"),
    )
    .await;
    mount(
        &server,
        patch(BRANCH_REF_PATCH)
            .and(body_partial_json(
                json!({"sha": "commit1b", "force": false}),
            ))
            .respond_with(ok(json!({})))
            .expect(1),
    )
    .await;
    mount_create_pull(&server, created(pull(7, BRANCH)), 1).await;

    let outcome = publish_with_retry(
        &target(&server),
        &request(false),
        policy(&RecordingSleeper::default()),
    )
    .await
    .expect("publish");
    assert_eq!(outcome.action, PublishAction::Created);
    assert_eq!(outcome.commit_sha.as_deref(), Some("commit1b"));
}

#[tokio::test]
async fn secondary_rate_limit_waits_retry_after_then_succeeds() {
    let server = server().await;
    mount_open_pulls(&server, json!([])).await;
    mount_fresh_branch_commit(&server).await;
    mount(
        &server,
        post("/git/refs")
            .respond_with(created(json!({"object": {"sha": "commit1"}})))
            .expect(1),
    )
    .await;
    let limited = ResponseTemplate::new(403)
        .insert_header("retry-after", "7")
        .set_body_json(json!({"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."}));
    // First attempt limited (higher priority, once), the retry succeeds.
    mount(
        &server,
        post("/pulls")
            .respond_with(limited)
            .up_to_n_times(1)
            .with_priority(1)
            .expect(1)
            .named("create pull (limited)"),
    )
    .await;
    mount_create_pull(&server, created(pull(7, BRANCH)), 1).await;

    let sleeper = RecordingSleeper::default();
    let outcome = publish_with_retry(&target(&server), &request(false), policy(&sleeper))
        .await
        .expect("publish");
    assert_eq!(outcome.action, PublishAction::Created);
    assert_eq!(sleeper.waits(), vec![Duration::from_secs(7)]);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let server = server().await;
    mount_open_pulls(&server, json!([])).await;
    mount(
        &server,
        get(BRANCH_REF)
            .respond_with(ResponseTemplate::new(404))
            .expect(1),
    )
    .await;
    mount(
        &server,
        get(&format!("{REPO}/git/ref/heads%2Fmain"))
            .respond_with(ResponseTemplate::new(502).set_body_string("bad gateway"))
            .up_to_n_times(2)
            .with_priority(1)
            .expect(2)
            .named("base ref 502"),
    )
    .await;
    mount(
        &server,
        get(&format!("{REPO}/git/ref/heads%2Fmain"))
            .respond_with(ok(json!({"object": {"sha": "base0"}})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        get(&format!("{REPO}/git/commits/base0"))
            .respond_with(ok(
                json!({"sha": "base0", "message": "m", "tree": {"sha": "tree0"}}),
            ))
            .expect(1),
    )
    .await;
    mount_blobs_tree(&server, "tree0").await;
    mount(
        &server,
        post("/git/commits")
            .respond_with(created(json!({"sha": "commit1"})))
            .expect(1),
    )
    .await;
    mount(
        &server,
        post("/git/refs")
            .respond_with(created(json!({"object": {"sha": "commit1"}})))
            .expect(1),
    )
    .await;
    mount_create_pull(&server, created(pull(7, BRANCH)), 1).await;

    let sleeper = RecordingSleeper::default();
    let outcome = publish_with_retry(&target(&server), &request(false), policy(&sleeper))
        .await
        .expect("publish");
    assert_eq!(outcome.action, PublishAction::Created);
    assert_eq!(
        sleeper.waits(),
        vec![Duration::from_secs(2), Duration::from_secs(4)]
    );
}

#[tokio::test]
async fn persistent_server_error_stops_after_bounded_attempts_and_keeps_the_body() {
    let server = server().await;
    mount(
        &server,
        get(&format!("{REPO}/pulls"))
            .respond_with(
                ResponseTemplate::new(503).set_body_json(json!({"message": "Service Unavailable"})),
            )
            .expect(3),
    )
    .await;
    let sleeper = RecordingSleeper::default();
    let mut policy = policy(&sleeper);
    policy.max_attempts = 3;
    let err = publish_with_retry(&target(&server), &request(false), policy)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("503") && text.contains("Service Unavailable") && text.contains("3 attempt"),
        "{text}"
    );
    assert_eq!(sleeper.waits().len(), 2);
}

#[tokio::test]
async fn permission_error_fails_at_once_with_a_hint() {
    let server = server().await;
    let denied = json!({"message": "Resource not accessible by integration"});
    mount(
        &server,
        get(&format!("{REPO}/pulls"))
            .respond_with(
                ResponseTemplate::new(403)
                    .insert_header("x-ratelimit-remaining", "4999")
                    .set_body_json(denied),
            )
            .expect(1),
    )
    .await;
    let sleeper = RecordingSleeper::default();
    let err = publish_with_retry(&target(&server), &request(false), policy(&sleeper))
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("Resource not accessible by integration") && text.contains("hint:"),
        "{text}"
    );
    assert!(!text.contains(TOKEN));
    assert!(sleeper.waits().is_empty());
}

#[tokio::test]
async fn absent_token_is_a_clear_error_before_any_call() {
    let server = server().await;
    let var = "RLHF_BOT_FORGE_TEST_TOKEN_THAT_IS_NEVER_SET";
    let err = SecretToken::from_env(var).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(var) && text.contains("hint:"), "{text}");
    assert!(
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn invalid_request_fails_before_any_call() {
    let server = server().await;
    let mut req = request(false);
    req.files.push(("../escape.txt".into(), b"x".to_vec()));
    let err = publish_with_retry(&target(&server), &req, policy(&RecordingSleeper::default()))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("../escape.txt"));
    assert!(
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

/// Issue 18 §4: GitHub acts on a create, but the answer never arrives (a timeout). The publisher
/// must look up what exists instead of sending the create again: one branch, one commit, one PR.
#[tokio::test]
async fn a_timeout_after_a_successful_create_makes_no_second_commit_or_pull_request() {
    let server = server().await;
    mount_open_pulls(&server, json!([])).await;
    mount_fresh_branch_commit(&server).await;
    let slow = Duration::from_secs(3);
    mount(
        &server,
        post("/git/refs")
            .respond_with(
                created(json!({"ref": "x", "object": {"sha": "commit1"}})).set_delay(slow),
            )
            .expect(1)
            .named("create ref (answer lost)"),
    )
    .await;
    // After the lost answer, the branch is there, at the bot's commit.
    mount(
        &server,
        get(BRANCH_REF)
            .respond_with(ok(json!({"object": {"sha": "commit1"}})))
            .expect(1)
            .named("branch ref (look-up after the timeout)"),
    )
    .await;
    mount_create_pull(&server, created(pull(7, BRANCH)).set_delay(slow), 1).await;
    mount(
        &server,
        get(&format!("{REPO}/pulls"))
            .and(query_param("state", "open"))
            .and(query_param("head", format!("acme:{BRANCH}").as_str()))
            .respond_with(ok(json!([pull(7, BRANCH)])))
            .expect(1)
            .named("find the PR after the timeout"),
    )
    .await;

    let sleeper = RecordingSleeper::default();
    let policy = RetryPolicy {
        timeout: Duration::from_millis(500),
        ..policy(&sleeper)
    };
    let outcome = publish_with_retry(&target(&server), &request(false), policy)
        .await
        .expect("publish");
    assert_eq!(outcome.pr_number, Some(7));
    assert_eq!(outcome.commit_sha.as_deref(), Some("commit1"));
    assert!(sleeper.waits().is_empty(), "{:?}", sleeper.waits());
}

/// A create answered with 5xx whose look-up shows nothing was made is sent again, once.
#[tokio::test]
async fn a_create_that_did_not_happen_is_sent_again_after_the_look_up() {
    let server = server().await;
    mount_open_pulls(&server, json!([])).await;
    mount_fresh_branch_commit(&server).await;
    mount(
        &server,
        post("/git/refs")
            .respond_with(ResponseTemplate::new(502))
            .up_to_n_times(1)
            .expect(1)
            .named("create ref (502)"),
    )
    .await;
    mount(
        &server,
        get(BRANCH_REF)
            .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
            .expect(1)
            .named("branch ref still absent"),
    )
    .await;
    mount(
        &server,
        post("/git/refs")
            .respond_with(created(json!({"ref": "x", "object": {"sha": "commit1"}})))
            .expect(1)
            .named("create ref again"),
    )
    .await;
    mount_create_pull(&server, created(pull(8, BRANCH)), 1).await;
    let sleeper = RecordingSleeper::default();
    let outcome = publish_with_retry(&target(&server), &request(false), policy(&sleeper))
        .await
        .expect("publish");
    assert_eq!(outcome.pr_number, Some(8));
    assert_eq!(sleeper.waits().len(), 1, "{:?}", sleeper.waits());
}
