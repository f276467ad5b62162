//! The judge: the one client of an OpenAI-compatible chat-completions endpoint. [`Judge::chat`]
//! sends a system and a user message and returns the reply text (the constitution's critiques
//! and revisions, docs/constitution.md); [`Judge::score`] builds on it to grade an answer against
//! a rubric from 0 to 10 (behaviour tests, docs/evals.md). The base URL comes from the config
//! (`evals.judge.url` or `constitution.judge.url`, e.g. `https://api.openai.com/v1` or a local
//! vLLM / llama.cpp server), the API key from the environment variable `api_key_env` names; the
//! key is a [`SecretString`] and is never printed. `temperature: 0`. Every failure (no answer
//! within the timeout, an HTTP error, a reply that is not a chat completion, a reply without a
//! usable score) is an error that names the endpoint and the config section to fix, never a
//! silent pass or fail.

use std::sync::LazyLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::feedback::record::ChatMessage;
use crate::sanitize::{error_body_excerpt, redact_url};
use crate::secret::SecretString;

/// `evals.judge`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeSettings {
    /// Base URL; requests go to `<url>/chat/completions`.
    pub url: url::Url,
    pub model: String,
    /// The variable holding the API key (`None`: send no `Authorization`, e.g. a local server).
    pub api_key_env: Option<String>,
    pub timeout_secs: u64,
}

/// Why the judge could not answer (or score). `section` is the config section the endpoint came
/// from (`evals.judge`, `constitution.judge`), so the hint names the keys to change.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error(
        "the judge at {url} did not answer within {secs} s\nhint: raise `{section}.timeout_secs`, or check that the endpoint is up"
    )]
    Timeout {
        url: String,
        secs: u64,
        section: &'static str,
    },
    #[error("the judge at {url} could not be reached: {detail}\nhint: check `{section}.url`")]
    Unreachable {
        url: String,
        detail: String,
        section: &'static str,
    },
    #[error(
        "the judge at {url} answered HTTP {status}: {body}\nhint: check `{section}.model` and the key in the variable `{section}.api_key_env` names"
    )]
    Status {
        url: String,
        status: u16,
        body: String,
        section: &'static str,
    },
    #[error(
        "the judge at {url} sent a reply that is not a chat completion ({problem}): {excerpt}\nhint: `{section}.url` must be an OpenAI-compatible API base (`.../v1`) whose /chat/completions answers with `choices[0].message.content`"
    )]
    BadReply {
        url: String,
        problem: String,
        excerpt: String,
        section: &'static str,
    },
    #[error(
        "the judge at {url} replied without a usable score ({problem}): {excerpt}\nhint: the reply must contain `Score: N` with N from 0 to 10; use a model that follows the instruction, or make the rubric say so"
    )]
    NoScore {
        url: String,
        problem: String,
        excerpt: String,
    },
    #[error(
        "the judge {judge} replied without a usable preference ({problem}): {excerpt}\nhint: the reply must end with `Preferred: A` or `Preferred: B`; set `{section}` to a model that follows the instruction"
    )]
    NoPreference {
        /// The endpoint's URL or the local checkpoint's path.
        judge: String,
        problem: String,
        excerpt: String,
        section: &'static str,
    },
    #[error(
        "the local judge {checkpoint} could not answer: {detail}\nhint: check `{section}.checkpoint` (a llama-family checkpoint directory, a .gguf file or hf://ORG/NAME)"
    )]
    Local {
        checkpoint: String,
        detail: String,
        section: &'static str,
    },
}

/// Where a judge runs, validated (`constitution.judge`, `rlaif.judge`): an OpenAI-compatible
/// endpoint, or a local llama-family checkpoint that answers greedily with our own generation
/// code.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeSource {
    Endpoint(JudgeSettings),
    Checkpoint(LocalJudgeSettings),
}

/// A local checkpoint as judge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalJudgeSettings {
    /// A checkpoint directory, a `.gguf` file, or `hf://ORG/NAME[@REVISION]`.
    pub checkpoint: String,
    /// The longest reply, in tokens.
    pub max_new_tokens: usize,
}

/// A local model that answers a system and a user message (`app` loads the model and renders
/// its chat template: model loading is not this module's job).
pub trait LocalChat {
    fn chat(&self, system: &str, user: &str) -> anyhow::Result<String>;
}

/// A judge whichever way it runs, so that callers (the constitution, RLAIF) do not care: the
/// endpoint client, or a local checkpoint's greedy generation.
pub enum AnyJudge<'a> {
    Endpoint(Judge),
    Local {
        /// The checkpoint as the config names it (safe to print: a path or `hf://` reference).
        checkpoint: String,
        section: &'static str,
        model: &'a dyn LocalChat,
    },
}

impl AnyJudge<'_> {
    /// Sends one system and one user message; returns the reply text.
    pub async fn chat(&self, system: &str, user: &str) -> Result<String, JudgeError> {
        match self {
            AnyJudge::Endpoint(judge) => judge.chat(system, user).await,
            AnyJudge::Local {
                checkpoint,
                section,
                model,
            } => model.chat(system, user).map_err(|e| JudgeError::Local {
                checkpoint: checkpoint.clone(),
                detail: format!("{e:#}"),
                section,
            }),
        }
    }

    /// The endpoint's URL or the checkpoint, safe to print.
    pub fn shown(&self) -> String {
        match self {
            AnyJudge::Endpoint(judge) => judge.shown_url(),
            AnyJudge::Local { checkpoint, .. } => format!("(local checkpoint) {checkpoint}"),
        }
    }

    /// The config section the judge came from.
    pub fn section(&self) -> &'static str {
        match self {
            AnyJudge::Endpoint(judge) => judge.section,
            AnyJudge::Local { section, .. } => section,
        }
    }
}

const SYSTEM: &str = "You grade an assistant's answer against a rubric. Think briefly, then end \
your reply with one line `Score: N`, where N is a number from 0 (fails the rubric) to 10 \
(fully meets it).";

/// A client for one judge endpoint.
#[derive(Debug, Clone)]
pub struct Judge {
    endpoint: url::Url,
    model: String,
    key: Option<SecretString>,
    timeout: Duration,
    http: reqwest::Client,
    /// The config section the settings came from, for the hints of errors.
    section: &'static str,
}

impl Judge {
    /// Builds the client; reads the key from the environment (the error names the variable).
    pub fn new(settings: &JudgeSettings) -> anyhow::Result<Self> {
        let key = settings
            .api_key_env
            .as_deref()
            .map(|var| SecretString::from_env(var, "judge API"))
            .transpose()?;
        Self::with_key(settings, key)
    }

    /// Builds the client with the key given (tests, or callers that hold it already).
    pub fn with_key(settings: &JudgeSettings, key: Option<SecretString>) -> anyhow::Result<Self> {
        let mut base = settings.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let timeout = Duration::from_secs(settings.timeout_secs.max(1));
        Ok(Self {
            endpoint: base.join("chat/completions")?,
            model: settings.model.clone(),
            key,
            timeout,
            http: reqwest::Client::builder().timeout(timeout).build()?,
            section: "evals.judge",
        })
    }

    /// Names the config section the settings came from (default `evals.judge`): error hints
    /// name its keys.
    pub fn in_section(mut self, section: &'static str) -> Self {
        self.section = section;
        self
    }

    /// Where requests go, safe to print.
    pub fn shown_url(&self) -> String {
        redact_url(self.endpoint.as_str())
    }

    /// Scores `answer` to `conversation` against `rubric`, 0 to 10.
    pub async fn score(
        &self,
        rubric: &str,
        conversation: &[ChatMessage],
        answer: &str,
    ) -> Result<f64, JudgeError> {
        let mut transcript = String::new();
        for m in conversation {
            transcript.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        let content = self
            .chat(
                SYSTEM,
                &format!(
                    "Rubric:\n{rubric}\n\nConversation:\n{transcript}\nAnswer to grade:\n{answer}\n\nEnd with `Score: N` (0-10)."
                ),
            )
            .await?;
        let secrets: Vec<&str> = self.key.iter().map(SecretString::expose).collect();
        let no_score = |problem: &str| JudgeError::NoScore {
            url: self.shown_url(),
            problem: problem.to_string(),
            excerpt: error_body_excerpt(&content, &secrets),
        };
        let score = parse_score(&content).ok_or_else(|| no_score("no `Score: N` in the reply"))?;
        if !(0.0..=10.0).contains(&score) {
            return Err(no_score(&format!("score {score} is outside 0-10")));
        }
        Ok(score)
    }

    /// Sends one system and one user message; returns the text of the first choice.
    pub async fn chat(&self, system: &str, user: &str) -> Result<String, JudgeError> {
        let url = self.shown_url();
        let section = self.section;
        let body = json!({
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
        });
        let mut request = self.http.post(self.endpoint.clone()).json(&body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key.expose());
        }
        let secrets: Vec<&str> = self.key.iter().map(SecretString::expose).collect();
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                JudgeError::Timeout {
                    url: url.clone(),
                    secs: self.timeout.as_secs(),
                    section,
                }
            } else {
                JudgeError::Unreachable {
                    url: url.clone(),
                    detail: error_body_excerpt(&e.to_string(), &secrets),
                    section,
                }
            }
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let text = response.text().await.map_err(failed)?;
        if !status.is_success() {
            return Err(JudgeError::Status {
                url,
                status: status.as_u16(),
                body: error_body_excerpt(&text, &secrets),
                section,
            });
        }
        let bad_reply = |problem: &str| JudgeError::BadReply {
            url: url.clone(),
            problem: problem.to_string(),
            excerpt: error_body_excerpt(&text, &secrets),
            section,
        };
        let reply: Value =
            serde_json::from_str(&text).map_err(|_| bad_reply("the body is not JSON"))?;
        let content = reply
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_reply("no choices[0].message.content"))?;
        Ok(content.to_string())
    }
}

/// The last `Score: N` (or `score = N`, any case) in `reply`, or the reply itself when it is
/// only a number.
pub fn parse_score(reply: &str) -> Option<f64> {
    static SCORE: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?i)score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)").expect("a valid pattern")
    });
    SCORE
        .captures_iter(reply)
        .last()
        .and_then(|c| c[1].parse().ok())
        .or_else(|| reply.trim().parse().ok())
        .filter(|s: &f64| s.is_finite())
}

#[cfg(test)]
mod tests {
    use super::parse_score;

    #[test]
    fn scores_are_read_from_the_last_score_line() {
        assert_eq!(parse_score("Reasoning... Score: 8"), Some(8.0));
        assert_eq!(parse_score("score=3.5\nScore: **9**"), Some(9.0));
        assert_eq!(parse_score(" 7 "), Some(7.0));
        assert_eq!(parse_score("I like it"), None);
    }
}
