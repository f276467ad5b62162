//! `hf://ORG/NAME[@REVISION]`: a model on the Hugging Face Hub, as a config key or a `--model`
//! flag names it. The repository id follows the Hub's rules (two parts of letters, digits, `-`,
//! `_`, `.`; no `--` or `..`, which the Hub reserves), so a reference that parses is also safe as
//! a cache folder name and a URL path. The revision is a branch, a tag or a commit sha (default
//! `main`); it becomes one URL path segment (percent-encoded) and a file under `refs/`, so `..`,
//! backslashes and blanks are refused.

use std::fmt;
use std::path::Path;

/// The prefix that marks a Hub model where a path is expected.
pub const SCHEME: &str = "hf://";

/// The revision when none is given (the Hub's default branch name).
pub const DEFAULT_REVISION: &str = "main";

/// A model on the Hub at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModelRef {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, a tag or a 40-hex commit sha.
    pub revision: String,
}

impl HubModelRef {
    /// `None` when `value` does not start with `hf://` (a local path); otherwise the parsed
    /// reference or why it is malformed.
    pub fn from_value(value: &str) -> Option<Result<Self, String>> {
        let rest = value.strip_prefix(SCHEME)?;
        Some(Self::parse_rest(rest).map_err(|why| {
            format!(
                "expected hf://ORG/NAME[@REVISION] (e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct@main), got {value:?}: {why}"
            )
        }))
    }

    /// As [`from_value`](Self::from_value), for a path given on the command line or in settings.
    pub fn from_path(path: &Path) -> Option<Result<Self, String>> {
        Self::from_value(path.to_str()?)
    }

    fn parse_rest(rest: &str) -> Result<Self, String> {
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (rest, DEFAULT_REVISION),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 {
            return Err("the repository id must be ORG/NAME (exactly one `/`)".into());
        }
        for part in &parts {
            check_id_part(part)?;
        }
        check_revision(revision)?;
        Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// Whether the revision is a full commit sha, which never moves (a cached snapshot of it
    /// needs no request at all).
    pub fn is_commit(&self) -> bool {
        is_commit_sha(&self.revision)
    }
}

impl fmt::Display for HubModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}@{}", self.repo, self.revision)
    }
}

/// A full git commit sha as the Hub writes it (40 lowercase hex digits).
pub fn is_commit_sha(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_id_part(part: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err("ORG and NAME must not be empty".into());
    }
    if part.len() > 96 {
        return Err(format!("`{part}` is longer than the Hub's 96 characters"));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "`{part}` holds {c:?}; the Hub allows letters, digits, `-`, `_` and `.`"
        ));
    }
    if part.contains("--") || part.contains("..") {
        return Err(format!(
            "`{part}` holds `--` or `..`, which the Hub forbids"
        ));
    }
    if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
        return Err(format!(
            "`{part}` starts or ends with `-` or `.`, which the Hub forbids"
        ));
    }
    Ok(())
}

fn check_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after `@` is empty".into());
    }
    if revision
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(format!(
            "the revision {revision:?} holds a blank, a control character or `\\`"
        ));
    }
    if revision.starts_with('/') || revision.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(format!(
            "the revision {revision:?} has an empty or `..` path part"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_and_revision() {
        let m = HubModelRef::from_value("hf://HuggingFaceTB/SmolLM2-135M-Instruct")
            .unwrap()
            .unwrap();
        assert_eq!(m.repo, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(m.revision, "main");
        assert!(!m.is_commit());
        assert_eq!(
            m.to_string(),
            "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"
        );
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let m = HubModelRef::from_value(&format!("hf://a/b@{sha}"))
            .unwrap()
            .unwrap();
        assert!(m.is_commit());
        let m = HubModelRef::from_value("hf://a/b@refs/pr/1")
            .unwrap()
            .unwrap();
        assert_eq!(m.revision, "refs/pr/1");
    }

    #[test]
    fn local_paths_are_not_hub_references() {
        assert!(HubModelRef::from_value("/models/x").is_none());
        assert!(HubModelRef::from_value("$RLHF_MODELS_DIR/x").is_none());
        assert!(HubModelRef::from_path(Path::new("hf://a/b")).is_some());
    }

    #[test]
    fn malformed_references_say_what_is_wrong() {
        for (value, needle) in [
            ("hf://just-a-name", "exactly one `/`"),
            ("hf://a/b/c", "exactly one `/`"),
            ("hf:///b", "must not be empty"),
            ("hf://a/b c", "holds ' '"),
            ("hf://a/b--c", "`--`"),
            ("hf://a/.b", "starts or ends"),
            ("hf://a/b@", "empty"),
            ("hf://a/b@../../etc", "`..`"),
            ("hf://a/b@x y", "blank"),
        ] {
            let err = HubModelRef::from_value(value).unwrap().unwrap_err();
            assert!(err.contains(needle), "{value}: {err}");
            assert!(err.contains("hf://ORG/NAME[@REVISION]"), "{err}");
        }
    }
}
