//! The feedback service, `rlhf-bot serve`: the feedback API a chat application writes to and
//! `rlhf-bot pull` reads from, over one database, plus health, readiness and metrics endpoints.
//! docs/feedback-service.md is the operator's guide; docs/feedback-api.yaml the contract.
//!
//! - [`api`]: the handlers (read side, write side, KPIs);
//! - [`db`]: the storage interface and its SQLite and PostgreSQL implementations (one writer,
//!   group commit);
//! - [`auth`]: read token, write key and widget keys, compared as digests;
//! - [`cors`], [`rate_limit`]: what the public widget key is allowed;
//! - [`metrics`], [`error`]: `/metrics` and the JSON error shape;
//! - [`demo`]: the embedded widget (`/widget.js`) and the demo page (`/demo`);
//! - [`dashboard`]: the live training dashboard (`/dashboard`, "Retrain now").

pub mod api;
pub mod auth;
pub mod cors;
pub mod dashboard;
pub mod db;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod rate_limit;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use crate::config::server::ServerSettings;
use auth::Credentials;
use db::FeedbackDb;
use error::ApiError;
use metrics::Metrics;
use rate_limit::RateLimiter;

/// What every handler shares.
pub struct AppState {
    pub settings: ServerSettings,
    pub credentials: Credentials,
    pub db: Arc<dyn FeedbackDb>,
    pub metrics: Metrics,
    pub rate_limit: RateLimiter,
    /// The widget key the demo page embeds (`serve --demo`); `None`: `/demo` is off.
    pub demo_widget_key: Option<String>,
    /// What `/dashboard` reads; `None`: no dashboard.
    pub dashboard: Option<dashboard::DashboardSource>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("listen", &self.settings.listen)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Counts a database failure and turns it into the answer a client gets.
    pub fn db_failed(&self, e: &anyhow::Error) -> ApiError {
        self.metrics.db_error();
        ApiError::internal(e)
    }
}

/// Every route of the service.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.settings.max_body_bytes;
    Router::new()
        .route(
            "/v1/feedback",
            get(api::list_feedback)
                .post(api::post_feedback)
                .options(cors::preflight),
        )
        .route("/v1/feedback/{id}", delete(api::delete_feedback))
        .route("/v1/users/{user_id}/feedback", delete(api::erase_user))
        .route("/v1/kpis", get(api::kpis))
        .route("/widget.js", get(demo::widget_js))
        .route("/demo", get(demo::demo_page))
        .route("/dashboard", get(dashboard::dashboard_page))
        .route("/dashboard/retrain", post(dashboard::retrain))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .observe(&route, response.status().as_u16(), started.elapsed());
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/feedback-api.yaml",
    )
}

async fn healthz() -> Response {
    ([("content-type", "application/json")], r#"{"status":"ok"}"#).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    state.db.ping().await.map_err(|e| state.db_failed(&e))?;
    Ok(healthz().await)
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Builds the state from settings and the environment (credentials), opening the database.
/// `demo_widget_key`: a key the demo page may use from the service's own origin.
pub async fn build_state(
    settings: ServerSettings,
    env: &dyn Fn(&str) -> Option<String>,
    demo_widget_key: Option<String>,
    dashboard: Option<dashboard::DashboardSource>,
) -> Result<Arc<AppState>> {
    let mut credentials = Credentials::from_env(&settings, env)?;
    if let Some(key) = &demo_widget_key {
        credentials.add_widget(key, vec![auth::SAME_ORIGIN.to_string()]);
    }
    let db = db::open(&settings.database, env).await?;
    Ok(Arc::new(AppState {
        rate_limit: RateLimiter::new(settings.widget_requests_per_minute),
        settings,
        credentials,
        db,
        metrics: Metrics::default(),
        demo_widget_key,
        dashboard,
    }))
}

/// Serves until `shutdown` resolves, then finishes the requests in flight. `on_listening` gets
/// the bound address (the port is chosen by the OS when the config says `:0`).
pub async fn serve(
    state: Arc<AppState>,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listen = state.settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("cannot listen on {listen}\nhint: another process may hold the port; change `server.listen` or pass --listen")
        })?;
    on_listening(listener.local_addr()?);
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving the feedback API")
}
