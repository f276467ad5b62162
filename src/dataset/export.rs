//! Datasets in and out, in the formats the TRL ecosystem uses, so our data can be inspected with
//! ordinary tools, trained on with TRL for comparison, and outside data (a TRL preference file,
//! Anthropic HH-RLHF) can train our reward model.
//!
//! Out ([`export`]): per split (`train`, `eval`) a JSONL file per kind: `preference` (TRL
//! preference, conversational by default), `kto` (TRL unpaired preference), `prm` (TRL stepwise
//! supervision, whose prompt is always plain text because TRL's PRM trainer tokenises it
//! directly), `aspects` (our own: per-aspect targets); and `stats.json` (statistics,
//! fingerprint, options, and every file's line count and sha256). Output is a pure function of
//! the dataset: no timestamps, sorted examples, so the same store gives byte-identical files.
//!
//! In: [`load_preference_jsonl`] (TRL preference, conversational or plain, explicit or implicit
//! prompt) and [`hh_rlhf_pairs`] (HH-RLHF `{chosen, rejected}` dialogues, gzip or plain).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Dataset;
use super::examples::{Examples, PreferencePair};
use crate::feedback::record::ChatMessage;

/// How exported files spell prompts and completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// `true` (default): TRL's conversational format, prompts as message lists and completions as
    /// one assistant message. `false`: TRL's standard format, the prompt rendered as plain text
    /// by [`render_plain_prompt`] and completions as strings starting with a space.
    pub conversational: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            conversational: true,
        }
    }
}

/// One written file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedFile {
    /// File name inside the export directory, e.g. `preference.train.jsonl`.
    pub name: String,
    pub lines: u64,
    pub sha256: String,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    pub dir: PathBuf,
    pub files: Vec<ExportedFile>,
    /// Examples a format could not express, by reason (`kto_no_label`: a pointwise example with
    /// tied thumbs and a neutral score; `prm_no_labelled_prefix`: a step example whose first
    /// step has no label, TRL needing a label on every step it sees).
    pub skipped: BTreeMap<String, u64>,
    pub fingerprint: String,
}

/// Writes the dataset as TRL JSONL files plus `stats.json` into `dir` (created if needed).
pub fn export(dataset: &Dataset, dir: &Path) -> Result<ExportSummary> {
    export_with(dataset, dir, &ExportOptions::default())
}

/// [`export`] with a choice of format.
pub fn export_with(
    dataset: &Dataset,
    dir: &Path,
    options: &ExportOptions,
) -> Result<ExportSummary> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the export directory {}", dir.display()))?;
    let mut files = Vec::new();
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    for (split, examples) in [("train", &dataset.train), ("eval", &dataset.eval)] {
        let lines = lines(examples, options, &mut skipped);
        for (kind, lines) in [
            ("preference", lines.preference),
            ("kto", lines.kto),
            ("prm", lines.prm),
            ("aspects", lines.aspects),
        ] {
            let name = format!("{kind}.{split}.jsonl");
            let mut text = Vec::new();
            for line in &lines {
                serde_json::to_writer(&mut text, line)?;
                text.push(b'\n');
            }
            write_atomically(&dir.join(&name), &text)?;
            files.push(ExportedFile {
                name,
                lines: lines.len() as u64,
                sha256: hex::encode(Sha256::digest(&text)),
            });
        }
    }
    let summary = ExportSummary {
        dir: dir.to_path_buf(),
        files,
        skipped,
        fingerprint: dataset.fingerprint.sha256.clone(),
    };
    #[derive(Serialize)]
    struct StatsFile<'a> {
        fingerprint: &'a super::Fingerprint,
        stats: &'a super::DatasetStats,
        options: &'a super::DatasetOptions,
        conversational: bool,
        files: &'a [ExportedFile],
        skipped: &'a BTreeMap<String, u64>,
    }
    let mut stats = serde_json::to_vec_pretty(&StatsFile {
        fingerprint: &dataset.fingerprint,
        stats: &dataset.stats,
        options: &dataset.options,
        conversational: options.conversational,
        files: &summary.files,
        skipped: &summary.skipped,
    })?;
    stats.push(b'\n');
    write_atomically(&dir.join("stats.json"), &stats)?;
    Ok(summary)
}

/// Writes beside the target and renames, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[derive(Default)]
struct Lines {
    preference: Vec<Value>,
    kto: Vec<Value>,
    prm: Vec<Value>,
    aspects: Vec<Value>,
}

fn lines(
    examples: &Examples,
    options: &ExportOptions,
    skipped: &mut BTreeMap<String, u64>,
) -> Lines {
    // serde_json's map keeps keys sorted, so key order in a line is fixed too.
    let prompt = |messages: &[ChatMessage]| -> Value {
        if options.conversational {
            serde_json::to_value(messages).unwrap_or(Value::Null)
        } else {
            Value::String(render_plain_prompt(messages))
        }
    };
    let completion = |text: &str| -> Value {
        if options.conversational {
            serde_json::json!([{"role": "assistant", "content": text}])
        } else {
            Value::String(format!(" {text}"))
        }
    };
    let mut out = Lines::default();
    for p in &examples.pairs {
        out.preference.push(serde_json::json!({
            "prompt": prompt(&p.prompt),
            "chosen": completion(&p.chosen),
            "rejected": completion(&p.rejected),
            "margin": p.margin,
        }));
    }
    for e in &examples.pointwise {
        match e.kto_label() {
            Some(label) => out.kto.push(serde_json::json!({
                "prompt": prompt(&e.prompt),
                "completion": completion(&e.completion),
                "label": label,
            })),
            None => *skipped.entry("kto_no_label".into()).or_default() += 1,
        }
    }
    for e in &examples.steps {
        // TRL labels every step it is given: keep the steps up to the first unlabelled one.
        let known = e.labels.iter().take_while(|l| l.is_some()).count();
        if known == 0 {
            *skipped.entry("prm_no_labelled_prefix".into()).or_default() += 1;
            continue;
        }
        let labels: Vec<bool> = e.labels[..known].iter().flatten().copied().collect();
        out.prm.push(serde_json::json!({
            "prompt": render_plain_prompt(&e.prompt),
            "completions": &e.steps[..known],
            "labels": labels,
        }));
    }
    for e in &examples.aspects {
        out.aspects.push(serde_json::json!({
            "prompt": prompt(&e.prompt),
            "completion": completion(&e.completion),
            "targets": e.targets,
        }));
    }
    out
}

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
    #[error("cannot read {path}: {source}\nhint: check the path (`--dataset FILE`)")]
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
pub(crate) fn open_lines(path: &Path) -> Result<Box<dyn BufRead>, LoadError> {
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
    let mut pairs = Vec::new();
    for_each_line(path, |line, text| {
        let bad = |problem: String| LoadError::Line {
            path: path.to_path_buf(),
            line,
            problem,
            hint: PREFERENCE_HINT,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let row = value
            .as_object()
            .ok_or_else(|| bad(format!("expected a JSON object, got {}", kind_of(&value))))?;
        let field = |name: &str| row.get(name).filter(|v| !v.is_null());
        let chosen = field("chosen").ok_or_else(|| bad("`chosen` is missing".into()))?;
        let rejected = field("rejected").ok_or_else(|| bad("`rejected` is missing".into()))?;
        let margin = match field("margin") {
            None => 0.0,
            Some(m) => m
                .as_f64()
                .filter(|m| m.is_finite())
                .ok_or_else(|| bad(format!("`margin` must be a number, got {m}")))?
                as f32,
        };
        let (prompt, chosen, rejected) = match field("prompt") {
            Some(prompt) => (
                prompt_messages(prompt).map_err(&bad)?,
                completion_text(chosen, "chosen").map_err(&bad)?,
                completion_text(rejected, "rejected").map_err(&bad)?,
            ),
            None => implicit_prompt(chosen, rejected).map_err(&bad)?,
        };
        let conversation_id = match field("conversation_id") {
            Some(Value::String(id)) => id.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "`conversation_id` must be a string, got {other}"
                )));
            }
            None => format!("line-{line}"),
        };
        pairs.push(PreferencePair {
            prompt,
            chosen,
            rejected,
            margin,
            chosen_id: format!("line-{line}-chosen"),
            rejected_id: format!("line-{line}-rejected"),
            conversation_id,
        });
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
/// that prefix is the prompt, the rests are the answers.
fn split_dialogues(
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
    let mut pairs = Vec::new();
    for_each_line(path, |line, text| {
        let bad = |problem: String| LoadError::Line {
            path: path.to_path_buf(),
            line,
            problem,
            hint: "each line must be {\"chosen\": dialogue, \"rejected\": dialogue}, the two \
                   dialogues differing only in the last assistant turn",
        };
        #[derive(serde::Deserialize)]
        struct Row {
            chosen: String,
            rejected: String,
        }
        let row: Row = serde_json::from_str(text).map_err(|e| bad(format!("{e}")))?;
        let (prompt, chosen, rejected) =
            split_dialogues(&row.chosen, &row.rejected).map_err(&bad)?;
        pairs.push(PreferencePair {
            prompt,
            chosen,
            rejected,
            margin: 0.0,
            conversation_id: format!("hh-{line}"),
            chosen_id: format!("hh-{line}-chosen"),
            rejected_id: format!("hh-{line}-rejected"),
        });
        Ok(())
    })?;
    if pairs.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
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
