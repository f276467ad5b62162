//! The widget (`GET /widget.js`, embedded in the binary) and the demo page (`GET /demo`): the
//! bundled climate-economy conversations with a `<rlhf-feedback>` under every answer, so a
//! newcomer sees the product in a browser with one command (`rlhf-bot serve --demo`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::feedback::record::{Change, FeedbackRecord, WireRecord};

const WIDGET_JS: &str = include_str!("widget.js");
const SAMPLE_FEEDBACK: &str = include_str!("../../configs/sample-feedback.jsonl");
/// Answers the demo page shows.
const DEMO_ANSWERS: usize = 8;

pub async fn widget_js() -> Response {
    let mut r = WIDGET_JS.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}

/// Text safe inside an HTML element or a double-quoted attribute.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// One answer per message from the bundled sample, answers with reasoning steps first.
fn demo_answers() -> Vec<FeedbackRecord> {
    let mut by_message: BTreeMap<String, FeedbackRecord> = BTreeMap::new();
    for line in SAMPLE_FEEDBACK.lines() {
        let Ok(wire) = serde_json::from_str::<WireRecord>(line) else {
            continue; // the sample holds malformed lines on purpose (quarantine tests)
        };
        if let Ok(Change::Upsert(record)) = wire.validate() {
            by_message
                .entry(record.message_id.clone())
                .or_insert(*record);
        }
    }
    let mut answers: Vec<FeedbackRecord> = by_message.into_values().collect();
    answers.sort_by_key(|r| (r.response.steps.is_empty(), r.conversation_id.clone()));
    answers.truncate(DEMO_ANSWERS);
    answers
}

pub async fn demo_page(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let Some(key) = state.demo_widget_key.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the demo page is off; start the service with `rlhf-bot serve --demo`",
        ));
    };
    let mut body = String::new();
    for a in demo_answers() {
        let question = a.prompt.last().map_or("", |m| m.content.as_str());
        let steps = serde_json::to_string(&a.response.steps).unwrap_or_else(|_| "[]".into());
        body.push_str(&format!(
            r#"<article>
  <p class="q"><strong>User:</strong> {q}</p>
  <p class="a"><strong>Assistant</strong> <small>({version})</small>: {answer}</p>
  <rlhf-feedback key="{key}" conversation-id="{conv}" message-id="demo-{msg}" model-version="{version}"
    prompt="{q}" response="{answer}" steps="{steps}" aspects="accuracy,helpfulness"></rlhf-feedback>
</article>
"#,
            q = escape_html(question),
            answer = escape_html(&a.response.content),
            version = escape_html(&a.model_version),
            conv = escape_html(&a.conversation_id),
            msg = escape_html(&a.message_id),
            steps = escape_html(&steps),
            key = escape_html(key),
        ));
    }
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>rlhf-bot feedback demo</title>
<style>
  body {{ font-family: system-ui, sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }}
  article {{ border-bottom: 1px solid color-mix(in srgb, currentColor 25%, transparent); padding: 1em 0; }}
</style>
<script type="module" src="/widget.js"></script>
</head>
<body>
<h1>Feedback demo</h1>
<p>Answers from the bundled climate-economy sample. Give a thumb, rate an answer or one of its
aspects, judge a reasoning step, or add a comment: each choice is stored by this service, and
<code>rlhf-bot pull</code> reads it from <code>/v1/feedback</code>.</p>
{body}</body>
</html>
"#
    );
    let mut r = html.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Ok(r)
}
