//! The `dashboard:` section: where "Retrain now" points and who may see the live dashboard
//! (`rlhf-bot dashboard`, `GET /dashboard`; docs/dashboard.md).

use serde::Serialize;

use super::Invalid;
use super::fields::{env_name, http_url, owner_repo};
use super::raw::RawDashboard;

pub const DEFAULT_WORKFLOW: &str = "rlhf.yml";
pub const DEFAULT_KPI_DAYS: u32 = 90;

#[derive(Debug, Clone, Serialize)]
pub struct DashboardSettings {
    /// `owner/name` of the repository whose workflow "Retrain now" starts; `None`: taken from
    /// `publish.github.repo` or `$GITHUB_REPOSITORY` when the dashboard is built, else no link.
    pub repo: Option<(String, String)>,
    /// The workflow file under `.github/workflows/`.
    pub workflow: String,
    /// The branch the dispatched run checks out.
    pub branch: String,
    /// REST API root for the dispatch (`publish.github.api_url` when set).
    pub api_url: String,
    /// A variable holding a token allowed to dispatch workflows (`actions: write`). Only
    /// `serve` reads it; when it is set the live dashboard shows a button, otherwise a link.
    pub dispatch_token_env: Option<String>,
    /// The live dashboard without the read token (it shows model ids, metrics and KPIs, never
    /// feedback text). Off by default.
    pub public: bool,
    /// How many days of KPIs the dashboard shows.
    pub kpi_days: u32,
}

/// What `publish.github` says, when configured: the dashboard retrains the repository the bot
/// publishes to unless told otherwise. (Plain fields, so this section does not import
/// `settings`, which imports it.)
#[derive(Debug, Clone, Copy)]
pub struct PublishRepo<'a> {
    pub owner: &'a str,
    pub repo: &'a str,
    pub api_url: &'a str,
    pub base_branch: &'a str,
}

pub fn validate_dashboard(
    raw: RawDashboard,
    github: Option<PublishRepo<'_>>,
) -> Result<DashboardSettings, Invalid> {
    let repo = match raw.repo.as_deref() {
        Some(text) => {
            let (owner, name) = owner_repo("dashboard.repo", text)?;
            Some((owner.to_string(), name.to_string()))
        }
        None => github.map(|g| (g.owner.to_string(), g.repo.to_string())),
    };
    let workflow = raw.workflow.unwrap_or_else(|| DEFAULT_WORKFLOW.into());
    let workflow_ok = (workflow.ends_with(".yml") || workflow.ends_with(".yaml"))
        && workflow
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !workflow_ok {
        return Err(Invalid::new(
            "dashboard.workflow",
            format!(
                "{workflow:?} is not a workflow file name\nhint: the file name under .github/workflows/, e.g. `{DEFAULT_WORKFLOW}`"
            ),
        ));
    }
    let branch = raw
        .branch
        .or_else(|| github.map(|g| g.base_branch.to_string()))
        .unwrap_or_else(|| "main".into());
    if !crate::forge::github::valid_branch_name(&branch) {
        return Err(Invalid::new(
            "dashboard.branch",
            format!("{branch:?} is not a valid branch name\nhint: e.g. `main`"),
        ));
    }
    let api_url = raw
        .api_url
        .or_else(|| github.map(|g| g.api_url.to_string()))
        .unwrap_or_else(|| crate::forge::github::DEFAULT_API_URL.into());
    http_url(
        "dashboard.api_url",
        &api_url,
        "dashboard.dispatch_token_env",
    )?;
    let dispatch_token_env = raw
        .dispatch_token_env
        .map(|name| env_name("dashboard.dispatch_token_env", name, "RLHF_DISPATCH_TOKEN"))
        .transpose()?;
    let kpi_days = match raw.kpi_days {
        None => DEFAULT_KPI_DAYS,
        Some(v) if v.0 <= 3660 => v.0 as u32,
        Some(v) => {
            return Err(Invalid::new(
                "dashboard.kpi_days",
                format!(
                    "{} is more than ten years\nhint: e.g. {DEFAULT_KPI_DAYS}",
                    v.0
                ),
            ));
        }
    };
    Ok(DashboardSettings {
        repo,
        workflow,
        branch,
        api_url: api_url.trim_end_matches('/').to_string(),
        dispatch_token_env,
        public: raw.public.unwrap_or(false),
        kpi_days,
    })
}

impl DashboardSettings {
    /// The repository, from the config or else from `$GITHUB_REPOSITORY` (set in Actions).
    pub fn repository(&self, env: impl Fn(&str) -> Option<String>) -> Option<(String, String)> {
        self.repo.clone().or_else(|| {
            let text = env("GITHUB_REPOSITORY")?;
            let (owner, name) = owner_repo("GITHUB_REPOSITORY", &text).ok()?;
            Some((owner.to_string(), name.to_string()))
        })
    }

    /// The workflow's page, where GitHub's own "Run workflow" button is. The web host follows
    /// the API root: `api.github.com` → `github.com`, `HOST/api/v3` (Enterprise) → `HOST`.
    pub fn workflow_page(&self, owner: &str, repo: &str) -> String {
        let web = if self.api_url == crate::forge::github::DEFAULT_API_URL {
            "https://github.com".to_string()
        } else {
            self.api_url.trim_end_matches("/api/v3").to_string()
        };
        format!("{web}/{owner}/{repo}/actions/workflows/{}", self.workflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawDashboard {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_link_to_the_publish_repository() {
        let github = PublishRepo {
            api_url: "https://ghe.example.com/api/v3",
            owner: "acme",
            repo: "assistant",
            base_branch: "trunk",
        };
        let d = validate_dashboard(raw("{}"), Some(github)).unwrap();
        assert_eq!(d.branch, "trunk");
        assert!(!d.public);
        let (owner, repo) = d.repository(|_| None).unwrap();
        assert_eq!(
            d.workflow_page(&owner, &repo),
            "https://ghe.example.com/acme/assistant/actions/workflows/rlhf.yml"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = validate_dashboard(raw("workflow: ../x.yml"), None).unwrap_err();
        assert_eq!(e.key_path, "dashboard.workflow", "{e:?}");
        let e = validate_dashboard(raw("repo: justone"), None).unwrap_err();
        assert_eq!(e.key_path, "dashboard.repo", "{e:?}");
        let e = validate_dashboard(
            raw("dispatch_token_env: ghp_abcdefghijklmnopqrstuvwxyz"),
            None,
        )
        .unwrap_err();
        assert!(!e.message.contains("ghp_abc"), "{e:?}");
    }

    #[test]
    fn the_repository_falls_back_to_the_actions_environment() {
        let d = validate_dashboard(raw("{}"), None).unwrap();
        let env = |k: &str| (k == "GITHUB_REPOSITORY").then(|| "o/r".to_string());
        assert_eq!(d.repository(env), Some(("o".into(), "r".into())));
        assert_eq!(
            d.workflow_page("o", "r"),
            "https://github.com/o/r/actions/workflows/rlhf.yml"
        );
    }
}
