//! Cross-origin access for the browser widget: only origins that a widget key lists get CORS
//! headers, and only for sending feedback. Reading never works from a browser.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::auth::WIDGET_KEY_HEADER;
use super::error::ApiError;

/// Adds the headers that let a page on `origin` read the answer.
pub fn allow(response: &mut Response, origin: &str) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// The browser's preflight before a widget's `POST /v1/feedback`.
pub async fn preflight(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !state.credentials.origin_known(origin) {
        return Err(ApiError::forbidden(format!(
            "origin {:?} is not allowed by any widget key\nhint: add it to `server.widget_keys[].origins`",
            crate::sanitize::terminal_line(origin)
        )));
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    allow(&mut response, origin);
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("content-type, {WIDGET_KEY_HEADER}")) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Ok(response)
}
