//! The loopback judge every judge test talks to: a real HTTP server on 127.0.0.1 whose
//! `/v1/chat/completions` route is the test's handler, and the chat-completions reply shape.

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde_json::json;

use crate::feedback_server::serve_in_background;

/// Serves `route` at `/v1/chat/completions`; returns the API base (`http://…/v1`).
pub fn start(route: MethodRouter) -> String {
    let app = Router::new().route("/v1/chat/completions", route);
    format!("http://{}/v1", serve_in_background(app))
}

/// A chat completion whose first choice says `content`.
pub fn completion(content: &str) -> Response {
    axum::Json(json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "judge-test",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
    }))
    .into_response()
}
