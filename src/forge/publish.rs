//! Opening (or updating) the pull request that carries a run's report and registry change.
//!
//! It uses the Git Data API (ref → blobs → tree → commit → ref) instead of a local clone, so the
//! bot needs no git checkout with push rights and never touches the runner's working tree. The
//! flow is idempotent: the same run published twice updates its branch and PR instead of opening
//! another, and it never rewrites history: if the branch head is not a commit the bot made (each
//! of its commits carries a `Rlhf-Bot-Run:` trailer), a human has worked there and the publisher
//! leaves the branch alone and says so. Open bot PRs from earlier runs are updated or closed as
//! superseded, so reviewers only ever see one candidate.

use std::collections::BTreeSet;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::actions::ActionsEnv;
use super::github::{
    GithubClient, GithubError, GithubTarget, Method, RetryPolicy, encode_segment, valid_branch_name,
};

/// The git trailer that marks the bot's own commits; a branch head without it is a human's.
pub const RUN_TRAILER: &str = "Rlhf-Bot-Run";

/// GitHub refuses pull request bodies longer than this many characters.
pub const PR_BODY_LIMIT: usize = 65_536;

/// What to do with open bot pull requests left by earlier runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExisting {
    /// Push this run onto the newest earlier bot PR's branch and refresh its title and body;
    /// any older bot PRs are closed as superseded by it.
    Update,
    /// Open a new PR and close the earlier ones with a comment linking it.
    #[default]
    Supersede,
}

/// One pull request to publish: everything the forge needs, nothing it has to decide.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishRequest {
    /// Identifies the run; written as the commit trailer `Rlhf-Bot-Run: <run_id>`.
    pub run_id: String,
    /// Head branch, e.g. `rlhf-bot/dpo-<run-id>`.
    pub branch: String,
    /// Head branches starting with this prefix are the bot's (e.g. `rlhf-bot/`); open PRs from
    /// such branches are earlier runs, handled per `on_existing`.
    pub branch_prefix: String,
    pub title: String,
    /// Markdown; cut to GitHub's 65,536-character limit with a note.
    pub body: String,
    /// Repository path (relative, `/`-separated) and content.
    #[serde(skip)]
    pub files: Vec<(String, Vec<u8>)>,
    pub labels: Vec<String>,
    /// Users (`octocat`) or teams (`org/team-slug`).
    pub reviewers: Vec<String>,
    pub draft: bool,
    pub on_existing: OnExisting,
}

/// What the publisher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishAction {
    /// Opened a new pull request.
    Created,
    /// Pushed a new commit onto an existing bot PR and refreshed its title and body.
    Updated,
    /// The branch head is not the bot's: nothing was pushed.
    SkippedHumanCommits,
}

/// The result of `publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOutcome {
    /// The PR, when there is one (a skipped branch may have none).
    pub pr_number: Option<u64>,
    pub pr_url: Option<String>,
    pub action: PublishAction,
    /// The branch that was (or would have been) written.
    pub branch: String,
    /// The commit the branch now points to, when the bot wrote one.
    pub commit_sha: Option<String>,
    /// Earlier bot PRs closed in favour of this one.
    pub superseded: Vec<u64>,
    /// Things that did not work but did not stop the PR (e.g. a reviewer who cannot review).
    pub warnings: Vec<String>,
}

/// A request that cannot be published as given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid publish request: {0}")]
pub struct RequestError(pub String);

impl PublishRequest {
    /// Checks the request before anything is sent, so a bad path fails with a clear message and
    /// not with a half-written branch.
    pub fn validate(&self) -> Result<(), RequestError> {
        let fail = |msg: String| Err(RequestError(msg));
        if self.run_id.trim().is_empty() || self.run_id.contains(['\n', '\r']) {
            return fail(format!(
                "run_id `{}` must be one non-empty line",
                self.run_id
            ));
        }
        if !valid_branch_name(&self.branch) {
            return fail(format!(
                "branch `{}` is not a valid git branch name\nhint: use letters, digits, `-`, `_`, `.` and `/`, e.g. rlhf-bot/dpo-{}",
                self.branch, self.run_id
            ));
        }
        if self.branch_prefix.is_empty() || !self.branch.starts_with(&self.branch_prefix) {
            return fail(format!(
                "branch `{}` does not start with the bot's prefix `{}`\nhint: the prefix is how the bot recognises its own pull requests",
                self.branch, self.branch_prefix
            ));
        }
        if self.title.trim().is_empty() || self.title.contains(['\n', '\r']) {
            return fail(format!("title `{}` must be one non-empty line", self.title));
        }
        if self.files.is_empty() {
            return fail("no files to commit\nhint: a pull request needs at least the registry or report file".into());
        }
        let mut seen = BTreeSet::new();
        for (path, _) in &self.files {
            check_repo_path(path).map_err(RequestError)?;
            if !seen.insert(path.as_str()) {
                return fail(format!("file `{path}` is listed twice"));
            }
        }
        for label in &self.labels {
            if label.trim().is_empty() || label.contains(',') {
                return fail(format!(
                    "label `{label}` must be non-empty and contain no comma"
                ));
            }
        }
        for reviewer in &self.reviewers {
            let parts: Vec<&str> = reviewer.split('/').collect();
            let ok = match parts.as_slice() {
                [user] => !user.is_empty(),
                [org, team] => !org.is_empty() && !team.is_empty(),
                _ => false,
            };
            if !ok || reviewer.chars().any(char::is_whitespace) {
                return fail(format!(
                    "reviewer `{reviewer}` is neither a user nor a team\nhint: write `octocat` for a user, `org/team-slug` for a team"
                ));
            }
        }
        Ok(())
    }

    /// The commit message: the title, then the trailer that marks the commit as the bot's.
    pub fn commit_message(&self) -> String {
        format!("{}\n\n{RUN_TRAILER}: {}\n", self.title, self.run_id)
    }

    /// The body as GitHub will accept it.
    pub fn pr_body(&self) -> String {
        truncate_body(&self.body)
    }
}

/// A repository path must be relative, `/`-separated and stay inside the repository.
pub(crate) fn check_repo_path(path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || path.split('/').next() == Some(".git")
        || path.chars().any(char::is_control);
    if bad {
        Err(format!(
            "file path `{path}` must be relative to the repository root, `/`-separated, without `.`, `..` or `.git`\nhint: e.g. `models/registry.yaml`"
        ))
    } else {
        Ok(())
    }
}

fn truncate_body(body: &str) -> String {
    if body.chars().count() <= PR_BODY_LIMIT {
        return body.to_owned();
    }
    let note = "\n\n_(truncated: GitHub limits a pull request body to 65,536 characters; the full report is in the committed files)_\n";
    let keep = PR_BODY_LIMIT - note.chars().count();
    let mut text: String = body.chars().take(keep).collect();
    text.push_str(note);
    text
}

/// True when the commit message carries the bot's trailer (on a line of its own).
pub fn is_bot_commit(message: &str) -> bool {
    message.lines().any(|line| {
        line.trim_start()
            .strip_prefix(RUN_TRAILER)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|id| !id.trim().is_empty())
    })
}

#[derive(Debug, Deserialize)]
struct GitRef {
    object: Sha,
}

#[derive(Debug, Deserialize)]
struct Sha {
    sha: String,
}

#[derive(Debug, Deserialize)]
struct GitCommit {
    sha: String,
    message: String,
    tree: Sha,
}

#[derive(Debug, Deserialize, Clone)]
struct Pull {
    number: u64,
    html_url: String,
    head: PullHead,
    /// Set on a merged PR; a closed PR without it was closed unmerged.
    #[serde(default)]
    merged_at: Option<String>,
    #[serde(default)]
    closed_at: Option<String>,
}

impl Pull {
    /// Whether the head is a branch starting with `prefix` in `owner/repo` itself: a fork's PR
    /// can use any branch name, and only our own repository's branches are the bot's.
    fn is_bot_branch_of(&self, owner: &str, repo: &str, prefix: &str) -> bool {
        let full = format!("{owner}/{repo}");
        self.head.branch.starts_with(prefix)
            && self
                .head
                .repo
                .as_ref()
                .is_some_and(|r| r.full_name.eq_ignore_ascii_case(&full))
    }
}

/// A closed pull request from one of the bot's branches: merged (the promotion happened) or
/// closed unmerged (a rejection, unless the bot itself closed it as superseded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedPull {
    pub number: u64,
    pub url: String,
    pub branch: String,
    pub merged: bool,
    pub closed_at: Option<String>,
}

/// The bot's most recently updated closed pull requests against the target's base branch (one
/// page of 100: the bot keeps at most one PR open, so older ones were reconciled long ago).
pub async fn closed_bot_pulls(
    target: &GithubTarget,
    branch_prefix: &str,
    policy: RetryPolicy,
) -> anyhow::Result<Vec<ClosedPull>> {
    let client = GithubClient::new(target, policy)?;
    let path = client.repo_path(&format!(
        "/pulls?state=closed&base={}&sort=updated&direction=desc&per_page=100",
        encode_segment(&target.base_branch)
    ));
    let pulls: Vec<Pull> = client.send(Method::Get, &path, None).await?.json()?;
    Ok(pulls
        .into_iter()
        .filter(|p| p.is_bot_branch_of(&target.owner, &target.repo, branch_prefix))
        .map(|p| ClosedPull {
            number: p.number,
            url: p.html_url,
            branch: p.head.branch,
            merged: p.merged_at.is_some(),
            closed_at: p.closed_at,
        })
        .collect())
}

#[derive(Debug, Deserialize, Clone)]
struct PullHead {
    #[serde(rename = "ref")]
    branch: String,
    repo: Option<PullRepo>,
}

#[derive(Debug, Deserialize, Clone)]
struct PullRepo {
    full_name: String,
}

/// Publishes `request` to `target` with the default retry policy (real clock).
pub async fn publish(
    target: &GithubTarget,
    request: &PublishRequest,
) -> anyhow::Result<PublishOutcome> {
    publish_with_retry(target, request, RetryPolicy::default()).await
}

/// `publish` with an explicit retry policy (tests inject a clock that does not sleep).
pub async fn publish_with_retry(
    target: &GithubTarget,
    request: &PublishRequest,
    policy: RetryPolicy,
) -> anyhow::Result<PublishOutcome> {
    use anyhow::Context as _;
    request.validate()?;
    ActionsEnv::from_env().mask(target.token.expose());
    let client = GithubClient::new(target, policy)?;
    Publisher {
        client: &client,
        base_branch: &target.base_branch,
        request,
    }
    .run()
    .await
    .with_context(|| {
        format!(
            "publishing branch `{}` to {}/{}",
            request.branch, target.owner, target.repo
        )
    })
}

struct Publisher<'a> {
    client: &'a GithubClient,
    base_branch: &'a str,
    request: &'a PublishRequest,
}

impl Publisher<'_> {
    async fn run(&self) -> Result<PublishOutcome, GithubError> {
        let req = self.request;
        let open = self.open_bot_pulls().await?;
        let mut own = open.iter().find(|p| p.head.branch == req.branch).cloned();
        let mut earlier: Vec<Pull> = open
            .into_iter()
            .filter(|p| p.head.branch != req.branch)
            .collect();
        // Newest first, so `Update` continues the most recent candidate.
        earlier.sort_by_key(|p| std::cmp::Reverse(p.number));
        let mut branch = req.branch.clone();
        if own.is_none() && req.on_existing == OnExisting::Update && !earlier.is_empty() {
            let newest = earlier.remove(0);
            branch = newest.head.branch.clone();
            own = Some(newest);
        }

        let head = self.branch_head(&branch).await?;
        let (parent, base_tree) = match &head {
            Some(head_sha) => {
                let commit = self.commit(head_sha).await?;
                if !is_bot_commit(&commit.message) {
                    tracing::warn!(
                        "branch `{branch}` has a commit the bot did not make ({}); leaving it alone",
                        commit.sha
                    );
                    return Ok(skipped(branch, own));
                }
                (commit.sha, commit.tree.sha)
            }
            None => {
                let base_sha = self.branch_head(self.base_branch).await?.ok_or_else(|| {
                    GithubError::Config(format!(
                        "base branch `{}` does not exist in {}/{}\nhint: set the base branch to an existing branch (e.g. main)",
                        self.base_branch,
                        self.client.owner(),
                        self.client.repo()
                    ))
                })?;
                let commit = self.commit(&base_sha).await?;
                (commit.sha, commit.tree.sha)
            }
        };

        let tree = self.create_tree(&base_tree).await?;
        let mut commit_sha = self.create_commit(&tree, &parent).await?;
        if head.is_some() {
            self.move_branch(&branch, &commit_sha).await?;
        } else {
            match self.create_branch(&branch, &commit_sha).await {
                Ok(()) => {}
                Err(e) if e.is_already_exists() => {
                    // Someone created the branch between our look-up and now (a concurrent run).
                    // Continue on top of it if it is the bot's, else leave it.
                    let Some(now) = self.branch_head(&branch).await? else {
                        return Err(e);
                    };
                    let existing = self.commit(&now).await?;
                    if !is_bot_commit(&existing.message) {
                        return Ok(skipped(branch, own));
                    }
                    commit_sha = self.create_commit(&tree, &existing.sha).await?;
                    self.move_branch(&branch, &commit_sha).await?;
                }
                Err(e) => return Err(e),
            }
        }

        let (pull, action) = match own {
            Some(pull) => {
                self.update_pull(pull.number).await?;
                (pull, PublishAction::Updated)
            }
            None => match self.create_pull(&branch).await {
                Ok(pull) => (pull, PublishAction::Created),
                Err(e) if e.is_already_exists() => {
                    let pull = self.find_pull_for(&branch).await?.ok_or(e)?;
                    self.update_pull(pull.number).await?;
                    (pull, PublishAction::Updated)
                }
                Err(e) => return Err(e),
            },
        };

        let mut warnings = Vec::new();
        if !req.labels.is_empty()
            && let Err(e) = self.add_labels(pull.number).await
        {
            warnings.push(format!("could not add labels: {e}"));
        }
        if !req.reviewers.is_empty()
            && let Err(e) = self.request_reviewers(pull.number).await
        {
            warnings.push(format!("could not request reviewers: {e}"));
        }
        let mut superseded = Vec::new();
        for old in earlier.iter().filter(|p| p.number != pull.number) {
            self.supersede(old, &pull).await?;
            superseded.push(old.number);
        }
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        Ok(PublishOutcome {
            pr_number: Some(pull.number),
            pr_url: Some(pull.html_url),
            action,
            branch,
            commit_sha: Some(commit_sha),
            superseded,
            warnings,
        })
    }

    fn is_same_repo(&self, pull: &Pull) -> bool {
        pull.is_bot_branch_of(self.client.owner(), self.client.repo(), "")
    }

    /// Open PRs against the base branch whose head is one of the bot's branches.
    async fn open_bot_pulls(&self) -> Result<Vec<Pull>, GithubError> {
        let mut found = Vec::new();
        // 10 pages of 100 is far beyond any repository where the bot keeps one PR open.
        for page in 1..=10u32 {
            let path = self.client.repo_path(&format!(
                "/pulls?state=open&base={}&per_page=100&page={page}",
                encode_segment(self.base_branch)
            ));
            let pulls: Vec<Pull> = self.client.send(Method::Get, &path, None).await?.json()?;
            let count = pulls.len();
            found.extend(pulls.into_iter().filter(|p| {
                p.head.branch.starts_with(&self.request.branch_prefix) && self.is_same_repo(p)
            }));
            if count < 100 {
                break;
            }
        }
        Ok(found)
    }

    /// The open PR whose head is `branch` (after GitHub said one already exists).
    async fn find_pull_for(&self, branch: &str) -> Result<Option<Pull>, GithubError> {
        let head = format!("{}:{branch}", self.client.owner());
        let path = self
            .client
            .repo_path(&format!("/pulls?state=open&head={}", encode_segment(&head)));
        let pulls: Vec<Pull> = self.client.send(Method::Get, &path, None).await?.json()?;
        Ok(pulls.into_iter().find(|p| p.head.branch == branch))
    }

    /// The commit a branch points to, or `None` when the branch does not exist.
    async fn branch_head(&self, branch: &str) -> Result<Option<String>, GithubError> {
        let path = self.client.repo_path(&format!(
            "/git/ref/{}",
            encode_segment(&format!("heads/{branch}"))
        ));
        match self.client.send(Method::Get, &path, None).await {
            Ok(response) => Ok(Some(response.json::<GitRef>()?.object.sha)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn commit(&self, sha: &str) -> Result<GitCommit, GithubError> {
        let path = self
            .client
            .repo_path(&format!("/git/commits/{}", encode_segment(sha)));
        self.client.send(Method::Get, &path, None).await?.json()
    }

    /// Blobs for every file, then one tree on top of `base_tree`.
    async fn create_tree(&self, base_tree: &str) -> Result<String, GithubError> {
        let mut entries = Vec::with_capacity(self.request.files.len());
        for (path, bytes) in &self.request.files {
            // base64 keeps binary files (plots, safetensors) byte-exact.
            let content = base64::engine::general_purpose::STANDARD.encode(bytes);
            let body = json!({ "content": content, "encoding": "base64" });
            let blob: Sha = self
                .client
                .send(
                    Method::Post,
                    &self.client.repo_path("/git/blobs"),
                    Some(&body),
                )
                .await?
                .json()?;
            entries
                .push(json!({ "path": path, "mode": "100644", "type": "blob", "sha": blob.sha }));
        }
        let body = json!({ "base_tree": base_tree, "tree": entries });
        let tree: Sha = self
            .client
            .send(
                Method::Post,
                &self.client.repo_path("/git/trees"),
                Some(&body),
            )
            .await?
            .json()?;
        Ok(tree.sha)
    }

    async fn create_commit(&self, tree: &str, parent: &str) -> Result<String, GithubError> {
        let body =
            json!({ "message": self.request.commit_message(), "tree": tree, "parents": [parent] });
        let commit: Sha = self
            .client
            .send(
                Method::Post,
                &self.client.repo_path("/git/commits"),
                Some(&body),
            )
            .await?
            .json()?;
        Ok(commit.sha)
    }

    /// Creates the branch at `sha`. After an answer that leaves it open whether GitHub acted
    /// (timeout, 5xx), the branch is looked up: pointing at `sha` means it was created; absent
    /// means it was not, and the create is sent again.
    async fn create_branch(&self, branch: &str, sha: &str) -> Result<(), GithubError> {
        let body = json!({ "ref": format!("refs/heads/{branch}"), "sha": sha });
        let path = self.client.repo_path("/git/refs");
        let mut tries = 0;
        loop {
            tries += 1;
            match self.client.send_create(&path, &body).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_ambiguous() => match self.branch_head(branch).await? {
                    Some(head) if head == sha => {
                        tracing::info!("creating `{branch}` looked failed ({e}), but it exists");
                        return Ok(());
                    }
                    // Someone else's branch now: the caller's "already exists" path handles it.
                    Some(_) => return Err(already_exists(e)),
                    None if tries < self.retry_limit() => self.pause(tries, &e).await,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// How often a create whose outcome was unclear is looked up and sent again.
    fn retry_limit(&self) -> u32 {
        self.client.policy().max_attempts.max(1)
    }

    /// Waits before sending a create again, as the retry policy would.
    async fn pause(&self, tries: u32, error: &GithubError) {
        let wait = self.client.policy().backoff(tries);
        tracing::warn!(
            "GitHub: {error}; it did not happen, sending again in {}s",
            wait.as_secs_f64()
        );
        self.client.policy().sleeper.sleep(wait).await;
    }

    /// Fast-forwards the branch; never forces, so a push that raced us fails instead of erasing it.
    async fn move_branch(&self, branch: &str, sha: &str) -> Result<(), GithubError> {
        let path = self.client.repo_path(&format!(
            "/git/refs/{}",
            encode_segment(&format!("heads/{branch}"))
        ));
        let body = json!({ "sha": sha, "force": false });
        self.client.send(Method::Patch, &path, Some(&body)).await?;
        Ok(())
    }

    /// Opens the pull request. After an unclear answer the open PR of `branch` is looked up
    /// before anything is sent again, so a timeout never opens a second PR.
    async fn create_pull(&self, branch: &str) -> Result<Pull, GithubError> {
        let body = json!({
            "title": self.request.title,
            "head": branch,
            "base": self.base_branch,
            "body": self.request.pr_body(),
            "draft": self.request.draft,
            "maintainer_can_modify": false,
        });
        let path = self.client.repo_path("/pulls");
        let mut tries = 0;
        loop {
            tries += 1;
            match self.client.send_create(&path, &body).await {
                Ok(response) => return response.json(),
                Err(e) if e.is_ambiguous() => match self.find_pull_for(branch).await? {
                    Some(pull) => {
                        tracing::info!(
                            "opening the PR looked failed ({e}), but #{} exists",
                            pull.number
                        );
                        return Ok(pull);
                    }
                    None if tries < self.retry_limit() => self.pause(tries, &e).await,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    async fn update_pull(&self, number: u64) -> Result<(), GithubError> {
        let body = json!({ "title": self.request.title, "body": self.request.pr_body() });
        self.client
            .send(
                Method::Patch,
                &self.client.repo_path(&format!("/pulls/{number}")),
                Some(&body),
            )
            .await?;
        Ok(())
    }

    async fn add_labels(&self, number: u64) -> Result<(), GithubError> {
        let body = json!({ "labels": self.request.labels });
        let path = self.client.repo_path(&format!("/issues/{number}/labels"));
        self.client.send(Method::Post, &path, Some(&body)).await?;
        Ok(())
    }

    async fn request_reviewers(&self, number: u64) -> Result<(), GithubError> {
        let (teams, users): (Vec<&String>, Vec<&String>) =
            self.request.reviewers.iter().partition(|r| r.contains('/'));
        let team_slugs: Vec<&str> = teams.iter().filter_map(|t| t.split('/').nth(1)).collect();
        let body = json!({ "reviewers": users, "team_reviewers": team_slugs });
        let path = self
            .client
            .repo_path(&format!("/pulls/{number}/requested_reviewers"));
        self.client.send(Method::Post, &path, Some(&body)).await?;
        Ok(())
    }

    /// Closes an earlier bot PR with a comment pointing at its successor.
    async fn supersede(&self, old: &Pull, new: &Pull) -> Result<(), GithubError> {
        let comment = json!({
            "body": format!(
                "Superseded by #{} ({}) from run `{}`. Closing this pull request; its branch `{}` is kept.",
                new.number, new.html_url, self.request.run_id, old.head.branch
            )
        });
        let path = self
            .client
            .repo_path(&format!("/issues/{}/comments", old.number));
        if let Err(e) = self.client.send_create(&path, &comment).await {
            // A comment is worth one look, not a duplicate: if it is not there, say so and go on
            // closing (the successor's link is also in the new PR's own history).
            if !e.is_ambiguous() {
                return Err(e);
            }
            tracing::warn!(
                "could not confirm the superseded comment on #{}: {e}",
                old.number
            );
        }
        let close = json!({ "state": "closed" });
        let path = self.client.repo_path(&format!("/pulls/{}", old.number));
        self.client.send(Method::Patch, &path, Some(&close)).await?;
        tracing::info!("closed #{} as superseded by #{}", old.number, new.number);
        Ok(())
    }
}

/// An ambiguous create whose target turned out to exist with other content: reported like
/// GitHub's own "already exists" so the caller's handling of a concurrent run applies.
fn already_exists(e: GithubError) -> GithubError {
    match e {
        GithubError::Status {
            method,
            path,
            attempts,
            ..
        }
        | GithubError::Transport {
            method,
            path,
            attempts,
            ..
        } => GithubError::Status {
            method,
            path,
            status: 422,
            body: r#"{"message":"Reference already exists"}"#.into(),
            attempts,
        },
        other => other,
    }
}

fn skipped(branch: String, own: Option<Pull>) -> PublishOutcome {
    PublishOutcome {
        pr_number: own.as_ref().map(|p| p.number),
        pr_url: own.map(|p| p.html_url),
        action: PublishAction::SkippedHumanCommits,
        branch: branch.clone(),
        commit_sha: None,
        superseded: Vec::new(),
        warnings: vec![format!(
            "branch `{branch}` has commits the bot did not make; nothing was pushed\nhint: merge or close that pull request, or delete the branch, then run again"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> PublishRequest {
        PublishRequest {
            run_id: "2026-11-27T0517-abc".into(),
            branch: "rlhf-bot/dpo-2026-11-27T0517-abc".into(),
            branch_prefix: "rlhf-bot/".into(),
            title: "rlhf-bot: DPO candidate".into(),
            body: "report".into(),
            files: vec![("models/registry.yaml".into(), b"a: 1\n".to_vec())],
            labels: vec!["rlhf-bot".into()],
            reviewers: vec!["octocat".into(), "acme/ml-review".into()],
            draft: false,
            on_existing: OnExisting::Supersede,
        }
    }

    #[test]
    fn valid_request_passes() {
        request().validate().unwrap();
    }

    #[test]
    fn bad_paths_are_refused() {
        for path in [
            "/etc/passwd",
            "../x",
            "a//b",
            ".git/config",
            "a/./b",
            "a\\b",
            "",
        ] {
            let mut r = request();
            r.files = vec![(path.into(), vec![])];
            assert!(r.validate().is_err(), "{path}");
        }
    }

    #[test]
    fn branch_outside_prefix_is_refused() {
        let mut r = request();
        r.branch = "main".into();
        assert!(r.validate().unwrap_err().0.contains("prefix"));
    }

    #[test]
    fn bad_reviewer_is_refused() {
        let mut r = request();
        r.reviewers = vec!["a/b/c".into()];
        assert!(r.validate().is_err());
    }

    #[test]
    fn trailer_marks_bot_commits() {
        let r = request();
        assert!(is_bot_commit(&r.commit_message()));
        assert!(!is_bot_commit(
            "Fix typo in report\n\nSigned-off-by: Jane <j@x>"
        ));
        assert!(!is_bot_commit(
            "mention Rlhf-Bot-Run: inline is not a trailer line"
        ));
        assert!(!is_bot_commit("Rlhf-Bot-Run:\n"));
    }

    #[test]
    fn long_bodies_are_cut_to_githubs_limit() {
        let body = "é".repeat(PR_BODY_LIMIT + 10);
        let cut = truncate_body(&body);
        assert_eq!(cut.chars().count(), PR_BODY_LIMIT);
        assert!(cut.contains("truncated"));
        assert_eq!(truncate_body("short"), "short");
    }
}
