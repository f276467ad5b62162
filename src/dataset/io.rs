//! The one way in for training data from files: every trainer and every test reads through here.
//!
//! - [`load_preference_jsonl`]: TRL preference JSONL (conversational or plain, explicit or
//!   implicit prompt; what `export` writes and `train reward --dataset` reads);
//! - [`hh_rlhf_pairs`]: Anthropic HH-RLHF `{chosen, rejected}` dialogues;
//! - [`load_policy_jsonl`]: the TRL lines `train policy` reads (DPO pairs, KTO thumbs, PPO
//!   prompts).
//!
//! Files may be plain or gzip-compressed (HH-RLHF ships as `.jsonl.gz`). A bad line is an error
//! naming the file, the line and what is wrong, never skipped: a silently dropped or mis-split
//! example changes what the model learns with no trace in the run.
//!
//! HH dialogues (and TRL's implicit-prompt form) are split by one rule, [`split_dialogues`]: the
//! prompt is the longest prefix the two dialogues share that ends with `"\n\nAssistant:"`; the
//! rests, trimmed, are the answers. A pair whose shared prefix has no assistant turn has no prompt
//! and is rejected (falling back to the bare common prefix would cut inside a turn).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::examples::PreferencePair;
use crate::feedback::record::ChatMessage;

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Renders messages as plain text in Anthropic's HH style, ending where the assistant speaks
/// next: `"\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant:"`. Roles other than user and
/// assistant are written capitalised (`\n\nSystem: …`). [`hh_rlhf_pairs`] parses this form back.
pub fn render_plain_prompt(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("\n\n");
        match m.role.as_str() {
            "user" => out.push_str("Human"),
            "assistant" => out.push_str("Assistant"),
            other => {
                let mut chars = other.chars();
                if let Some(first) = chars.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(chars.as_str());
                }
            }
        }
        out.push_str(": ");
        out.push_str(&m.content);
    }
    out.push_str(ASSISTANT);
    out
}

/// Parses an HH-style dialogue into messages; a trailing empty assistant turn (the slot the
/// answer goes in) is dropped. Text without any marker is one user message.
fn parse_dialogue(text: &str) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    let mut rest = text;
    let mut role: Option<&str> = None;
    loop {
        let next = [(HUMAN, "user"), (ASSISTANT, "assistant")]
            .into_iter()
            .filter_map(|(marker, r)| rest.find(marker).map(|at| (at, marker, r)))
            .min_by_key(|(at, _, _)| *at);
        let (content, after) = match next {
            Some((at, marker, r)) => (&rest[..at], Some((at + marker.len(), r))),
            None => (rest, None),
        };
        let content = content.trim();
        match role {
            Some(r) => messages.push(ChatMessage {
                role: r.to_string(),
                content: content.to_string(),
            }),
            None if !content.is_empty() => messages.push(ChatMessage {
                role: "user".to_string(),
                content: content.to_string(),
            }),
            None => {}
        }
        match after {
            Some((skip, r)) => {
                rest = &rest[skip..];
                role = Some(r);
            }
            None => break,
        }
    }
    if messages
        .last()
        .is_some_and(|m| m.role == "assistant" && m.content.is_empty())
    {
        messages.pop();
    }
    messages
}

/// A file that could not be loaded, with the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}\nhint: check the path (`--dataset FILE`, `--data FILE`)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}\nhint: {hint}")]
    Line {
        path: PathBuf,
        line: u64,
        problem: String,
        hint: &'static str,
    },
    #[error(
        "{path} holds no preference pairs\nhint: each line must be a JSON object with `chosen` and `rejected`"
    )]
    Empty { path: PathBuf },
}

const PREFERENCE_HINT: &str = "each line must be a JSON object with `chosen` and `rejected` \
     (strings or message lists), an optional `prompt` (string or message list) and an optional \
     numeric `margin`";

/// Opens a file, decompressing it when it starts with the gzip magic bytes.
pub fn open_lines(path: &Path) -> Result<Box<dyn BufRead>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let gz = file.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    })
}

/// Reads non-blank lines with their 1-based numbers, turning read errors into [`LoadError`].
fn for_each_line(
    path: &Path,
    mut visit: impl FnMut(u64, &str) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let reader = open_lines(path)?;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !line.trim().is_empty() {
            visit(i as u64 + 1, &line)?;
        }
    }
    Ok(())
}

/// Loads a TRL preference JSONL file (gzip allowed): `prompt` (string or messages, or absent
/// for TRL's implicit-prompt form, where the shared start of `chosen` and `rejected` is the
/// prompt), `chosen` and `rejected` (strings or messages ending with the assistant's answer),
/// optional `margin` (default 0) and optional `conversation_id` (default `line-N`, which keeps
/// lines apart when splitting).
pub fn load_preference_jsonl(path: &Path) -> Result<Vec<PreferencePair>, LoadError> {
    read_pairs(path, PREFERENCE_HINT, |line, text| {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let row = value
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, got {}", kind_of(&value)))?;
        let field = |name: &str| row.get(name).filter(|v| !v.is_null());
        let chosen = field("chosen").ok_or("`chosen` is missing")?;
        let rejected = field("rejected").ok_or("`rejected` is missing")?;
        let margin = match field("margin") {
            None => 0.0,
            Some(m) => m
                .as_f64()
                .filter(|m| m.is_finite())
                .ok_or_else(|| format!("`margin` must be a number, got {m}"))?
                as f32,
        };
        let (prompt, chosen, rejected) = match field("prompt") {
            Some(prompt) => (
                prompt_messages(prompt)?,
                completion_text(chosen, "chosen")?,
                completion_text(rejected, "rejected")?,
            ),
            None => implicit_prompt(chosen, rejected)?,
        };
        let conversation_id = match field("conversation_id") {
            Some(Value::String(id)) => id.clone(),
            Some(other) => return Err(format!("`conversation_id` must be a string, got {other}")),
            None => format!("line-{line}"),
        };
        Ok(PreferencePair {
            prompt,
            chosen,
            rejected,
            margin,
            chosen_id: format!("line-{line}-chosen"),
            rejected_id: format!("line-{line}-rejected"),
            source: None,
            weight: None,
            conversation_id,
        })
    })
}

/// Reads one pair per non-blank line of `path` with `parse` (which says what is wrong with a bad
/// line); a bad line is an error naming the file, the line and `hint`, and a file without pairs
/// is [`LoadError::Empty`].
fn read_pairs(
    path: &Path,
    hint: &'static str,
    mut parse: impl FnMut(u64, &str) -> Result<PreferencePair, String>,
) -> Result<Vec<PreferencePair>, LoadError> {
    let mut pairs = Vec::new();
    for_each_line(path, |line, text| {
        let pair = parse(line, text).map_err(|problem| LoadError::Line {
            path: path.to_path_buf(),
            line,
            problem,
            hint,
        })?;
        pairs.push(pair);
        Ok(())
    })?;
    if pairs.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn messages(value: &Value, name: &str) -> Result<Vec<ChatMessage>, String> {
    serde_json::from_value::<Vec<ChatMessage>>(value.clone()).map_err(|e| {
        format!("`{name}` must be a string or a list of {{\"role\", \"content\"}} messages: {e}")
    })
}

fn prompt_messages(value: &Value) -> Result<Vec<ChatMessage>, String> {
    match value {
        Value::String(text) => Ok(parse_dialogue(text)),
        other => messages(other, "prompt"),
    }
}

fn completion_text(value: &Value, name: &str) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.trim().to_string()),
        other => {
            let list = messages(other, name)?;
            match list.as_slice() {
                [one] if one.role == "assistant" => Ok(one.content.clone()),
                _ => Err(format!(
                    "`{name}` must hold exactly one assistant message when `prompt` is given, got {} message(s)",
                    list.len()
                )),
            }
        }
    }
}

/// TRL's implicit-prompt form: the prompt is what `chosen` and `rejected` share.
fn implicit_prompt(
    chosen: &Value,
    rejected: &Value,
) -> Result<(Vec<ChatMessage>, String, String), String> {
    match (chosen, rejected) {
        (Value::String(c), Value::String(r)) => split_dialogues(c, r),
        (Value::Array(_), Value::Array(_)) => {
            let c = messages(chosen, "chosen")?;
            let r = messages(rejected, "rejected")?;
            let (Some((c_last, c_prompt)), Some((r_last, r_prompt))) =
                (c.split_last(), r.split_last())
            else {
                return Err("`chosen` and `rejected` must not be empty".into());
            };
            if c_prompt != r_prompt {
                return Err(
                    "without `prompt`, `chosen` and `rejected` must share every message but the last"
                        .into(),
                );
            }
            if c_last.role != "assistant" || r_last.role != "assistant" {
                return Err(
                    "the last message of `chosen` and `rejected` must be the assistant's".into(),
                );
            }
            Ok((
                c_prompt.to_vec(),
                c_last.content.clone(),
                r_last.content.clone(),
            ))
        }
        _ => Err("`chosen` and `rejected` must both be strings or both be message lists".into()),
    }
}

/// Splits two HH-style dialogues at the longest common prefix that ends with `"\n\nAssistant:"`:
/// that prefix is the prompt, the rests are the answers. The prefix is searched in what the two
/// share, not at each dialogue's own last assistant turn: an answer may itself contain
/// `"\n\nAssistant:"` (HH has such rows, where the model went on talking).
pub fn split_dialogues(
    chosen: &str,
    rejected: &str,
) -> Result<(Vec<ChatMessage>, String, String), String> {
    let common = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
    let Some(start) = chosen[..common].rfind(ASSISTANT) else {
        return Err(format!(
            "`chosen` and `rejected` share no prefix ending with {ASSISTANT:?}: the prompt cannot be found"
        ));
    };
    let end = start + ASSISTANT.len();
    if chosen == rejected {
        return Err("`chosen` and `rejected` are the same text".into());
    }
    Ok((
        parse_dialogue(&chosen[..end]),
        chosen[end..].trim().to_string(),
        rejected[end..].trim().to_string(),
    ))
}

/// Loads Anthropic HH-RLHF rows (`{"chosen": dialogue, "rejected": dialogue}`, gzip or plain):
/// the prompt is the longest shared prefix ending with `"\n\nAssistant:"`, parsed into messages
/// (its plain text is [`render_plain_prompt`] of them); chosen and rejected are the two last
/// answers. Margins are 0 (HH has none); `conversation_id` is `hh-N` for line N.
pub fn hh_rlhf_pairs(path: &Path) -> Result<Vec<PreferencePair>, LoadError> {
    #[derive(serde::Deserialize)]
    struct Row {
        chosen: String,
        rejected: String,
    }
    let hint = "each line must be {\"chosen\": dialogue, \"rejected\": dialogue}, the two \
                dialogues differing only in the last assistant turn";
    read_pairs(path, hint, |line, text| {
        let row: Row = serde_json::from_str(text).map_err(|e| format!("{e}"))?;
        let (prompt, chosen, rejected) = split_dialogues(&row.chosen, &row.rejected)?;
        Ok(PreferencePair {
            prompt,
            chosen,
            rejected,
            margin: 0.0,
            conversation_id: format!("hh-{line}"),
            chosen_id: format!("hh-{line}-chosen"),
            rejected_id: format!("hh-{line}-rejected"),
            source: None,
            weight: None,
        })
    })
}

/// One line of `train policy` data, the union of TRL's formats: `prompt` with `chosen` and
/// `rejected` (DPO), with `completion` and `label` (KTO), or alone (PPO rolls out from it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PolicyLine {
    pub prompt: String,
    #[serde(default)]
    pub chosen: Option<String>,
    #[serde(default)]
    pub rejected: Option<String>,
    #[serde(default)]
    pub completion: Option<String>,
    #[serde(default)]
    pub label: Option<bool>,
    /// The example's weight in the loss (absent: 1).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// Loads `train policy` data (gzip allowed); which lines an algorithm uses is the caller's
/// choice (DPO the pairs, KTO the thumbs, PPO every prompt).
pub fn load_policy_jsonl(path: &Path) -> Result<Vec<PolicyLine>, LoadError> {
    let mut lines = Vec::new();
    for_each_line(path, |line, text| {
        let row = serde_json::from_str(text).map_err(|e| LoadError::Line {
            path: path.to_path_buf(),
            line,
            problem: format!("not a TRL example: {e}"),
            hint: "each line needs \"prompt\" plus chosen/rejected (DPO) or completion/label (KTO)",
        })?;
        lines.push(row);
        Ok(())
    })?;
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn dialogues_round_trip_through_plain_text() {
        let messages = vec![
            msg("user", "hi"),
            msg("assistant", "hello"),
            msg("user", "what is CO₂?"),
        ];
        let text = render_plain_prompt(&messages);
        assert_eq!(
            text,
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is CO₂?\n\nAssistant:"
        );
        assert_eq!(parse_dialogue(&text), messages);
        assert_eq!(parse_dialogue("just text"), vec![msg("user", "just text")]);
    }

    #[test]
    fn dialogues_split_at_the_last_shared_assistant_turn() {
        let (prompt, c, r) = split_dialogues(
            "\n\nHuman: q\n\nAssistant: I think yes",
            "\n\nHuman: q\n\nAssistant: I think no",
        )
        .unwrap();
        assert_eq!(prompt, vec![msg("user", "q")]);
        assert_eq!((c.as_str(), r.as_str()), ("I think yes", "I think no"));
        assert!(split_dialogues("\n\nHuman: a", "\n\nHuman: b").is_err());
        assert!(
            split_dialogues(
                "\n\nHuman: q\n\nAssistant: x",
                "\n\nHuman: q\n\nAssistant: x"
            )
            .is_err()
        );
    }
}
