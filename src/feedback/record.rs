//! Feedback records as the feedback API sends them, and their validated form.
//!
//! The wire shape ([`WireRecord`]) accepts anything that is JSON-shaped like a record, so a bad
//! record can be quarantined with a precise reason instead of failing the whole page.
//! [`WireRecord::validate`] turns it into a [`Change`]: either a typed [`FeedbackRecord`] (which
//! cannot hold an out-of-range rating, an unknown kind or a step index outside the response) or a
//! tombstone. [`FeedbackRecord::to_wire`] writes the API shape back for `store dump` and exports.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// A thumb on a whole answer or on one reasoning step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Thumb {
    Up,
    Down,
}

/// Who gave the feedback; weights and filters can depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackSource {
    EndUser,
    Annotator,
    LlmJudge,
}

/// What a record says about the answer: one variant per `kind` of the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Thumb(Thumb),
    Rating(u8),
    Aspect { aspect: String, rating: u8 },
    Step { step_index: usize, thumb: Thumb },
}

impl Signal {
    /// The API's `kind` string.
    pub fn kind(&self) -> &'static str {
        match self {
            Signal::Thumb(_) => "thumb",
            Signal::Rating(_) => "rating",
            Signal::Aspect { .. } => "aspect",
            Signal::Step { .. } => "step",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
}

/// One validated piece of feedback on one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRecord {
    pub id: String,
    pub signal: Signal,
    pub conversation_id: String,
    pub message_id: String,
    pub model_version: String,
    pub prompt: Vec<ChatMessage>,
    pub response: Response,
    pub comment: Option<String>,
    pub source: Option<FeedbackSource>,
    pub user_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What one line of the feed does to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Upsert(Box<FeedbackRecord>),
    Delete {
        id: String,
        updated_at: DateTime<Utc>,
    },
}

impl Change {
    pub fn id(&self) -> &str {
        match self {
            Change::Upsert(r) => &r.id,
            Change::Delete { id, .. } => id,
        }
    }
    pub fn updated_at(&self) -> DateTime<Utc> {
        match self {
            Change::Upsert(r) => r.updated_at,
            Change::Delete { updated_at, .. } => *updated_at,
        }
    }
}

/// The record exactly as the API sends it; every field optional so validation can say which one
/// is missing. Unknown fields are ignored: the API may add fields without breaking old bots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumb: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_index: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
}

/// Why a record was quarantined; the text is stored beside the raw record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn required<'a>(value: &'a Option<String>, field: &str) -> Result<&'a str, Invalid> {
    match value.as_deref() {
        Some(v) if !v.trim().is_empty() => Ok(v),
        Some(_) => Err(Invalid(format!("`{field}` is empty"))),
        None => Err(Invalid(format!("`{field}` is missing"))),
    }
}

fn timestamp(value: &Option<String>, field: &str) -> Result<DateTime<Utc>, Invalid> {
    let text = required(value, field)?;
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Invalid(format!(
                "`{field}` is not an RFC 3339 timestamp ({text:?}): {e}"
            ))
        })
}

fn thumb(value: &Option<String>) -> Result<Thumb, Invalid> {
    match required(value, "thumb")? {
        "up" => Ok(Thumb::Up),
        "down" => Ok(Thumb::Down),
        other => Err(Invalid(format!(
            "`thumb` must be \"up\" or \"down\", got {other:?}"
        ))),
    }
}

fn rating(value: Option<i64>) -> Result<u8, Invalid> {
    match value {
        Some(r @ 1..=5) => Ok(r as u8),
        Some(r) => Err(Invalid(format!(
            "`rating` must be an integer from 1 to 5, got {r}"
        ))),
        None => Err(Invalid("`rating` is missing".into())),
    }
}

/// Field size limits, the same for a record pulled from an API (quarantined past them) and one
/// posted to `rlhf-bot serve` (refused with 400). They are far above real chat turns and keep
/// one record from filling a page, a store or a report.
pub mod limits {
    /// ids, versions, aspect names, roles, timestamps.
    pub const MAX_NAME_BYTES: usize = 256;
    /// The whole conversation before the answer, all messages together.
    pub const MAX_PROMPT_BYTES: usize = 512 * 1024;
    pub const MAX_PROMPT_MESSAGES: usize = 512;
    /// The answer and its steps, all together.
    pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
    pub const MAX_STEPS: usize = 256;
    pub const MAX_COMMENT_BYTES: usize = 16 * 1024;
}

fn within(bytes: usize, limit: usize, field: &str) -> Result<(), Invalid> {
    if bytes > limit {
        return Err(Invalid(format!(
            "`{field}` is {bytes} bytes; the limit is {limit}"
        )));
    }
    Ok(())
}

impl WireRecord {
    /// Refuses fields past [`limits`], naming the field.
    fn check_sizes(&self) -> Result<(), Invalid> {
        use limits::*;
        let names = [
            ("id", &self.id),
            ("kind", &self.kind),
            ("thumb", &self.thumb),
            ("aspect", &self.aspect),
            ("conversation_id", &self.conversation_id),
            ("message_id", &self.message_id),
            ("model_version", &self.model_version),
            ("source", &self.source),
            ("user_id", &self.user_id),
            ("created_at", &self.created_at),
            ("updated_at", &self.updated_at),
        ];
        for (field, value) in names {
            within(value.as_ref().map_or(0, String::len), MAX_NAME_BYTES, field)?;
            if value.as_ref().is_some_and(|v| v.contains('\0')) {
                // PostgreSQL's text cannot hold it, and no identifier needs it.
                return Err(Invalid(format!("`{field}` contains a NUL character")));
            }
        }
        within(
            self.comment.as_ref().map_or(0, String::len),
            MAX_COMMENT_BYTES,
            "comment",
        )?;
        if let Some(prompt) = &self.prompt {
            if prompt.len() > MAX_PROMPT_MESSAGES {
                return Err(Invalid(format!(
                    "`prompt` has {} messages; the limit is {MAX_PROMPT_MESSAGES}",
                    prompt.len()
                )));
            }
            for (i, m) in prompt.iter().enumerate() {
                within(m.role.len(), MAX_NAME_BYTES, &format!("prompt[{i}].role"))?;
            }
            let total = prompt.iter().map(|m| m.content.len()).sum();
            within(total, MAX_PROMPT_BYTES, "prompt")?;
        }
        if let Some(response) = &self.response {
            if response.steps.len() > MAX_STEPS {
                return Err(Invalid(format!(
                    "`response.steps` has {} steps; the limit is {MAX_STEPS}",
                    response.steps.len()
                )));
            }
            let total =
                response.content.len() + response.steps.iter().map(String::len).sum::<usize>();
            within(total, MAX_RESPONSE_BYTES, "response")?;
        }
        Ok(())
    }

    /// Validates one record from the feed into a store change.
    pub fn validate(self) -> Result<Change, Invalid> {
        self.check_sizes()?;
        let id = required(&self.id, "id")?.to_string();
        let updated_at = timestamp(&self.updated_at, "updated_at")?;
        if self.deleted == Some(true) {
            return Ok(Change::Delete { id, updated_at });
        }
        let response = self
            .response
            .clone()
            .ok_or_else(|| Invalid("`response` is missing".into()))?;
        let signal = match required(&self.kind, "kind")? {
            "thumb" => Signal::Thumb(thumb(&self.thumb)?),
            "rating" => Signal::Rating(rating(self.rating)?),
            "aspect" => Signal::Aspect {
                aspect: required(&self.aspect, "aspect")?.to_string(),
                rating: rating(self.rating)?,
            },
            "step" => {
                let index = self
                    .step_index
                    .ok_or_else(|| Invalid("`step_index` is missing".into()))?;
                let steps = response.steps.len();
                if index < 0 || index as usize >= steps {
                    return Err(Invalid(format!(
                        "`step_index` {index} is outside the response's {steps} steps"
                    )));
                }
                Signal::Step {
                    step_index: index as usize,
                    thumb: thumb(&self.thumb)?,
                }
            }
            other => {
                return Err(Invalid(format!(
                    "unknown `kind` {other:?} (expected thumb, rating, aspect or step)"
                )));
            }
        };
        let source = match self.source.as_deref() {
            None => None,
            Some("end_user") => Some(FeedbackSource::EndUser),
            Some("annotator") => Some(FeedbackSource::Annotator),
            Some("llm_judge") => Some(FeedbackSource::LlmJudge),
            Some(other) => {
                return Err(Invalid(format!(
                    "unknown `source` {other:?} (expected end_user, annotator or llm_judge)"
                )));
            }
        };
        let prompt = self.prompt.clone().unwrap_or_default();
        if prompt.is_empty() {
            return Err(Invalid("`prompt` is missing or empty".into()));
        }
        Ok(Change::Upsert(Box::new(FeedbackRecord {
            id,
            signal,
            conversation_id: required(&self.conversation_id, "conversation_id")?.to_string(),
            message_id: required(&self.message_id, "message_id")?.to_string(),
            model_version: required(&self.model_version, "model_version")?.to_string(),
            prompt,
            response,
            comment: self.comment,
            source,
            user_id: self.user_id,
            created_at: timestamp(&self.created_at, "created_at")?,
            updated_at,
        })))
    }
}

/// RFC 3339 in UTC with a `Z`, the one timestamp format the project writes.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl FeedbackRecord {
    /// The API's record shape, for `store dump` and exports.
    pub fn to_wire(&self) -> WireRecord {
        let (thumb, rating, aspect, step_index) = match &self.signal {
            Signal::Thumb(t) => (Some(*t), None, None, None),
            Signal::Rating(r) => (None, Some(*r as i64), None, None),
            Signal::Aspect { aspect, rating } => {
                (None, Some(*rating as i64), Some(aspect.clone()), None)
            }
            Signal::Step { step_index, thumb } => {
                (Some(*thumb), None, None, Some(*step_index as i64))
            }
        };
        let thumb_text = thumb.map(|t| match t {
            Thumb::Up => "up".to_string(),
            Thumb::Down => "down".to_string(),
        });
        let source = self.source.map(|s| {
            match s {
                FeedbackSource::EndUser => "end_user",
                FeedbackSource::Annotator => "annotator",
                FeedbackSource::LlmJudge => "llm_judge",
            }
            .to_string()
        });
        WireRecord {
            id: Some(self.id.clone()),
            kind: Some(self.signal.kind().to_string()),
            thumb: thumb_text,
            rating,
            aspect,
            step_index,
            conversation_id: Some(self.conversation_id.clone()),
            message_id: Some(self.message_id.clone()),
            model_version: Some(self.model_version.clone()),
            prompt: Some(self.prompt.clone()),
            response: Some(self.response.clone()),
            comment: self.comment.clone(),
            source,
            user_id: self.user_id.clone(),
            created_at: Some(format_time(self.created_at)),
            updated_at: Some(format_time(self.updated_at)),
            deleted: None,
        }
    }

    /// The thumb on the whole answer, if this record is one (step thumbs are not).
    pub fn answer_thumb(&self) -> Option<Thumb> {
        match self.signal {
            Signal::Thumb(t) => Some(t),
            _ => None,
        }
    }

    /// The 1–5 rating of the whole answer, if this record is one (aspect ratings are not).
    pub fn answer_rating(&self) -> Option<u8> {
        match self.signal {
            Signal::Rating(r) => Some(r),
            _ => None,
        }
    }
}
