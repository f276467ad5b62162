//! The loopback judge every judge test talks to: a real HTTP server on 127.0.0.1 whose
//! `/v1/chat/completions` route records each request (its `Authorization` header and body)
//! and answers with the test's function; and the chat-completions reply shape.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::feedback_server::serve_in_background;

/// (Authorization header, request body) of every request the judge saw, in order.
pub type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// Serves a judge that answers each request body with `answer(reply, body)`; returns the API
/// base (`http://…/v1`) and what it saw.
pub fn start_judge<R, F, Fut>(reply: R, answer: F) -> (String, Seen)
where
    R: Clone + Send + Sync + 'static,
    F: Fn(R, Value) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let handler = move |headers: HeaderMap, body: axum::Json<Value>| {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        recorded.lock().unwrap().push((auth, body.0.clone()));
        answer(reply.clone(), body.0)
    };
    let app = Router::new().route("/v1/chat/completions", post(handler));
    (format!("http://{}/v1", serve_in_background(app)), seen)
}

/// The user message of a request body.
pub fn user_message(body: &Value) -> String {
    body["messages"][1]["content"]
        .as_str()
        .unwrap_or("")
        .to_string()
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
