//! The YAML config: [`raw`] mirrors the file (every key the file may hold, unknown keys refused),
//! [`settings`] is what the rest of the program uses, and [`load`] goes from one to the other.
//! Every error names the file, line and column and the key path, e.g.
//! `configs/rlhf.yaml:12:5: thresholds.min_new_feedback: expected a positive integer, got -3`.
//! Secrets never live in the file: it names the environment variables that hold them.

pub mod audit;
pub mod constitution;
pub mod dashboard;
pub mod deploy;
pub mod evals;
pub mod fields;
pub mod locate;
pub mod models;
pub mod policy;
pub mod raw;
pub mod rlaif;
pub mod server;
pub mod settings;
pub mod train;
pub mod values;

use std::path::{Path, PathBuf};

pub use settings::Settings;

/// A config problem, positioned in the file when the position is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key_path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        if self.key_path.is_empty() || self.key_path == "." {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key_path, self.message)
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        key_path: String::new(),
        message: format!(
            "cannot read the config file: {e}\nhint: pass --config PATH (see configs/example.yaml)"
        ),
    })?;
    load_str(path, &text)
}

/// Parses and validates config text; `path` is only used in messages and for the config hash.
pub fn load_str(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let raw = parse_raw(path, text)?;
    settings::validate(raw, text).map_err(|e| {
        let (line, column) =
            locate::find(text, &e.key_path).map_or((None, None), |(l, c)| (Some(l), Some(c)));
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            key_path: e.key_path,
            message: e.message,
        }
    })
}

fn parse_raw(path: &Path, text: &str) -> Result<raw::RawConfig, ConfigError> {
    crate::nesting::check(text, crate::nesting::MAX_DEPTH).map_err(|deep| ConfigError {
        file: path.to_path_buf(),
        line: Some(deep.line),
        column: Some(1),
        key_path: String::new(),
        message: deep.to_string(),
    })?;
    let deserializer = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key_path = err.path().to_string();
        let inner = err.into_inner();
        let location = inner.location();
        let message = strip_path(&strip_location(&inner.to_string()), &key_path);
        // serde reports an unknown key at the mapping that holds it; point at the key itself.
        let (line, column) = match location {
            Some(l) => (Some(l.line()), Some(l.column())),
            None => locate::find(text, &key_path).map_or((None, None), |(l, c)| (Some(l), Some(c))),
        };
        let message = if message.starts_with("unknown field") {
            format!(
                "{message}\nhint: check the spelling; every key is documented in docs/config.md"
            )
        } else {
            message
        };
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            key_path,
            message,
        }
    })
}

/// serde_norway prefixes messages with the path it knows, which is ours or a prefix of it.
fn strip_path(message: &str, key_path: &str) -> String {
    match message.split_once(": ") {
        Some((head, rest)) if !head.contains(char::is_whitespace) && key_path.starts_with(head) => {
            rest.to_string()
        }
        _ => message.to_string(),
    }
}

/// serde_norway appends " at line L column C" to messages; we print the position up front.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message.to_string(),
    }
}

/// An error found after parsing, at a key path; [`load_str`] adds the position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key_path: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key_path: &str, message: impl Into<String>) -> Self {
        Self {
            key_path: key_path.to_string(),
            message: message.into(),
        }
    }
}
