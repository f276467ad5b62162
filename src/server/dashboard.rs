//! The live dashboard in `rlhf-bot serve`: `GET /dashboard` renders the same page as
//! `rlhf-bot dashboard --out`, with KPIs straight from the service's database, and
//! `POST /dashboard/retrain` dispatches the bot's workflow when the service holds a token.
//!
//! The page is for the team, not the public: unless `dashboard.public` is set it needs the read
//! token, as a bearer token or as the password of HTTP Basic auth (so a browser can open it:
//! it asks for the password). "Retrain now" always needs the token, and only from the
//! service's own origin, so another site cannot make a logged-in browser start a run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{Duration, Utc};
use futures::future::BoxFuture;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::config::dashboard::DashboardSettings;
use crate::dashboard::{DailyKpis, Retrain, Sources, gather, page};
use crate::deploy::LiveView;
use crate::forge::github::{RetryPolicy, SecretToken};
use crate::model_kind::ModelKind;

/// What is deployed, read on each page view (the artifact store may be a bucket).
pub type DeployedReader =
    Arc<dyn Fn() -> BoxFuture<'static, BTreeMap<ModelKind, LiveView>> + Send + Sync>;

/// Where the live dashboard reads from, and how it retrains.
pub struct DashboardSource {
    pub registry_file: PathBuf,
    pub reports_dir: PathBuf,
    pub store_dir: PathBuf,
    pub settings: DashboardSettings,
    /// `owner/name` of the workflow's repository, when known.
    pub repository: Option<(String, String)>,
    /// Read from `dashboard.dispatch_token_env` at start-up; `None`: a link instead of a button.
    pub dispatch_token: Option<SecretToken>,
    pub deployed: DeployedReader,
}

impl DashboardSource {
    fn retrain(&self) -> Retrain {
        Retrain {
            workflow_url: self
                .repository
                .as_ref()
                .map(|(owner, repo)| self.settings.workflow_page(owner, repo)),
            button: self.dispatch_token.is_some() && self.repository.is_some(),
        }
    }
}

fn source(state: &AppState) -> Result<&DashboardSource, ApiError> {
    state.dashboard.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this service has no dashboard (it was built without a config)",
        )
    })
}

/// The read token from `Authorization: Bearer …` or from Basic auth's password.
fn is_reader(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let token = if let Some(t) = value.strip_prefix("Bearer ") {
        t.trim().to_string()
    } else if let Some(b) = value.strip_prefix("Basic ") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
            return false;
        };
        let text = String::from_utf8_lossy(&decoded);
        match text.split_once(':') {
            Some((_, password)) => password.to_string(),
            None => return false,
        }
    } else {
        return false;
    };
    matches!(state.credentials.bearer(&token), Some(Caller::Reader))
}

fn ask_for_token() -> Response {
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the dashboard needs the read token (`server.read_token_env`): as the password of the browser's sign-in prompt, or as a bearer token",
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"rlhf-bot dashboard\", charset=\"UTF-8\""),
    );
    r
}

pub async fn dashboard_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let source = match source(&state) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if !source.settings.public && !is_reader(&state, &headers) {
        return ask_for_token();
    }
    let to = Utc::now();
    let from = to - Duration::days(i64::from(source.settings.kpi_days));
    let kpis = match state
        .db
        .kpi_counts(None, from.timestamp_micros(), to.timestamp_micros())
        .await
    {
        Ok(buckets) => buckets
            .iter()
            .map(|b| DailyKpis::of(b.bucket_us, &b.counts))
            .collect(),
        Err(e) => return state.db_failed(&e).into_response(),
    };
    let deployed = (source.deployed)().await;
    let sources = Sources {
        registry_file: &source.registry_file,
        reports_dir: &source.reports_dir,
        store_dir: &source.store_dir,
    };
    let data = match gather(sources, kpis, deployed, source.retrain(), true, to) {
        Ok(d) => d,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "registry_unreadable",
                format!("{e:#}"),
            )
            .into_response();
        }
    };
    let mut r = (StatusCode::OK, page::render(&data)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page's own inline script and style only; no framing by other sites.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub async fn retrain(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let source = match source(&state) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if !is_reader(&state, &headers) {
        return ask_for_token();
    }
    if !same_origin(&headers) {
        return ApiError::forbidden(
            "\"Retrain now\" is only accepted from the dashboard page of this service (Origin differs from Host)",
        )
        .into_response();
    }
    let (Some(token), Some((owner, repo))) = (&source.dispatch_token, &source.repository) else {
        return ApiError::new(
            StatusCode::CONFLICT,
            "no_dispatch_token",
            "this service cannot start the workflow: set `dashboard.dispatch_token_env` (a token with actions: write) and `dashboard.repo`, or use the workflow page link",
        )
        .into_response();
    };
    let policy = RetryPolicy::default();
    match crate::dashboard::retrain::dispatch(&source.settings, owner, repo, token.clone(), policy)
        .await
    {
        Ok(()) => {
            tracing::info!(workflow = %source.settings.workflow, "retraining dispatched from the dashboard");
            let body = serde_json::json!({
                "dispatched": true,
                "workflow_url": source.settings.workflow_page(owner, repo),
            });
            (
                StatusCode::ACCEPTED,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Err(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "dispatch_failed",
            format!("GitHub refused the workflow dispatch: {e}"),
        )
        .into_response(),
    }
}

/// A browser's POST carries `Origin`; it must name the host the request went to.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (origin, host) {
        // Not a browser (curl, a script with the token): nothing to forge.
        (None, _) => true,
        (Some(origin), Some(host)) => url::Url::parse(origin).is_ok_and(|u| {
            let authority = match u.port() {
                Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
                None => u.host_str().unwrap_or_default().to_string(),
            };
            authority.eq_ignore_ascii_case(host)
        }),
        (Some(_), None) => false,
    }
}
