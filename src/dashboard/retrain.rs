//! "Retrain now" on the live dashboard: a `workflow_dispatch` of the bot's workflow with
//! `force: true` (the template's input that skips the "is retraining due" decision), through the
//! one GitHub client. A dispatch starts a run, so it is never resent after an ambiguous failure:
//! the user sees the error and can press again, or use the workflow page.

use crate::config::dashboard::DashboardSettings;
use crate::forge::github::{GithubClient, GithubError, GithubTarget, RetryPolicy, SecretToken};

/// Sends `POST /repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches`.
pub async fn dispatch(
    settings: &DashboardSettings,
    owner: &str,
    repo: &str,
    token: SecretToken,
    policy: RetryPolicy,
) -> Result<(), GithubError> {
    let target = GithubTarget {
        api_url: settings.api_url.clone(),
        owner: owner.to_string(),
        repo: repo.to_string(),
        base_branch: settings.branch.clone(),
        token,
    };
    let client = GithubClient::new(&target, policy)?;
    let path = client.repo_path(&format!(
        "/actions/workflows/{}/dispatches",
        crate::forge::github::encode_segment(&settings.workflow)
    ));
    // Workflow inputs travel as strings, the way GitHub's own "Run workflow" form sends them.
    let body = serde_json::json!({
        "ref": settings.branch,
        "inputs": {"force": "true"},
    });
    client.send_create(&path, &body).await?;
    Ok(())
}
