//! Hugging Face chat templates rendered with minijinja.
//!
//! A chat model only answers well when its prompt is laid out exactly as in its training, and
//! that layout ships with the model as a Jinja template (`chat_template.jinja`, or the
//! `chat_template` key of `tokenizer_config.json`). Rendering it here, rather than hard-coding
//! ChatML, keeps any HF-format policy usable. The environment mimics the one `transformers`
//! builds (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`,
//! Python string/dict methods through minijinja-contrib's pycompat) so that templates written
//! for Python render the same text.

use std::path::Path;

use minijinja::value::Value;
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

const TEMPLATE_NAME: &str = "chat_template";

/// Why a chat template could not be found, compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error(
        "no chat template in {dir}: neither chat_template.jinja nor a `chat_template` key in tokenizer_config.json\nhint: copy the template of the base model into the directory"
    )]
    Missing { dir: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("the chat template does not compile: {0:#}")]
    Syntax(JinjaError),
    #[error("rendering the chat template failed: {0:#}")]
    Render(JinjaError),
}

/// One turn of a conversation, as `transformers` passes it to a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The special-token strings a template may refer to (`bos_token`, `eos_token`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special: SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source` (Jinja) in an environment configured like `transformers`'.
    pub fn new(
        source: impl Into<String>,
        special: SpecialTokens,
    ) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(ChatTemplateError::Syntax)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
            source,
            special,
        })
    }

    /// Loads the template of an HF model directory: `chat_template.jinja` if present (the
    /// transformers ≥ 4.43 layout), else `tokenizer_config.json`'s `chat_template` (a string, or
    /// a list of named templates of which `default` is taken). Special tokens come from
    /// `tokenizer_config.json` when it exists.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ChatTemplateError> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.exists() {
            let text = read(&cfg_path)?;
            Some(
                serde_json::from_str(&text).map_err(|source| ChatTemplateError::Json {
                    path: cfg_path.display().to_string(),
                    source,
                })?,
            )
        } else {
            None
        };
        let special = cfg
            .as_ref()
            .map(special_tokens_from_config)
            .unwrap_or_default();
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            read(&jinja_path)?
        } else {
            cfg.as_ref()
                .and_then(|c| template_from_config(c.get("chat_template")?))
                .ok_or_else(|| ChatTemplateError::Missing {
                    dir: dir.display().to_string(),
                })?
        };
        Self::new(source, special)
    }

    /// The Jinja source, for writing it back next to a saved model.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders a conversation. With `add_generation_prompt` the text ends where the assistant's
    /// answer should start.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.render_json(
            &serde_json::Value::Array(msgs),
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// Renders messages given as JSON (so messages may carry extra keys such as `tool_calls`),
    /// with `extra` passed as further template variables (`tools`, `documents`, …).
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let mut vars: Vec<(String, Value)> = extra
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect();
        vars.push(("messages".into(), json_to_value(messages)));
        vars.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let s = &self.special;
        for (name, tok) in [
            ("bos_token", &s.bos_token),
            ("eos_token", &s.eos_token),
            ("pad_token", &s.pad_token),
            ("unk_token", &s.unk_token),
        ] {
            // Absent tokens stay undefined, as in transformers, so `{% if bos_token %}` works.
            if let Some(t) = tok {
                vars.push((name.into(), Value::from(t.as_str())));
            }
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Render)?;
        tmpl.render(Value::from_pairs(vars))
            .map_err(ChatTemplateError::Render)
    }
}

fn read(path: &Path) -> Result<String, ChatTemplateError> {
    std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// `tokenizer_config.json` stores a special token either as a string or as a serialised
/// `AddedToken` object with a `content` field.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Special-token strings from a parsed `tokenizer_config.json`.
pub fn special_tokens_from_config(cfg: &serde_json::Value) -> SpecialTokens {
    let get = |k: &str| cfg.get(k).and_then(token_string);
    SpecialTokens {
        bos_token: get("bos_token"),
        eos_token: get("eos_token"),
        pad_token: get("pad_token"),
        unk_token: get("unk_token"),
    }
}

fn template_from_config(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        // Older multi-template form: [{"name": "default", "template": "…"}, {"name": "tool_use", …}]
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => a.iter().map(json_to_value).collect(),
        serde_json::Value::Object(o) => {
            Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

/// HF templates call `raise_exception('…')` to reject conversations they cannot lay out.
fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: some templates (Llama 3) stamp today's date into the system prompt.
fn strftime_now(fmt: String) -> Result<String, JinjaError> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&fmt)).map_err(|_| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format string {fmt:?}"),
        )
    })?;
    Ok(out)
}
