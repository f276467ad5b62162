//! Local paths in committed files. A report is committed to the team's repository, so it must not
//! carry the absolute paths of the machine that rendered it: they name users' home directories
//! and temporary directories, and mean nothing to a reviewer. [`LocalPaths`] rewrites an absolute
//! path (or a `file://` URI) under a known root as the root's placeholder plus the rest
//! (`<artifacts>/reward/reward-…/`, `<models>/SmolLM2-…​.gguf`), under the working directory (the
//! repository root) as a relative path, and anywhere else as `<local>/` plus its last component.
//! Other values (bucket URLs, model names, relative paths) pass through unchanged.

use std::path::{Component, Path, PathBuf};

/// Placeholder for an absolute path under no known root.
pub const UNKNOWN_ROOT: &str = "<local>";

/// The placeholders the pipeline gives its roots, and [`UNKNOWN_ROOT`].
pub const PLACEHOLDERS: &[&str] = &["<artifacts>", "<store>", "<models>", UNKNOWN_ROOT];

/// A shown path split into its leading placeholder (one of [`PLACEHOLDERS`]) and the rest.
pub fn split_placeholder(shown: &str) -> (Option<&'static str>, &str) {
    PLACEHOLDERS
        .iter()
        .find_map(|p| shown.strip_prefix(p).map(|rest| (Some(*p), rest)))
        .unwrap_or((None, shown))
}

/// Known local directories and how committed files name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalPaths {
    /// (absolute directory, placeholder); an empty placeholder means "relative to it".
    roots: Vec<(PathBuf, String)>,
}

impl LocalPaths {
    /// Paths under `dir` become `placeholder/rest` (`""`: just `rest`, for the repository root).
    /// A relative `dir` is ignored: only absolute paths need rewriting.
    pub fn with_root(mut self, dir: impl Into<PathBuf>, placeholder: &str) -> Self {
        let dir = normalize(&dir.into());
        if dir.is_absolute() && dir.parent().is_some() {
            self.roots.push((dir, placeholder.to_string()));
            // The longest (most specific) root wins.
            self.roots
                .sort_by_key(|(d, _)| std::cmp::Reverse(d.components().count()));
        }
        self
    }

    /// `value` as a committed file may show it.
    pub fn display(&self, value: &str) -> String {
        let path = match value.strip_prefix("file://") {
            Some(rest) => rest,
            None if is_absolute(value) => value,
            None => return value.to_string(),
        };
        let trailing = if path.ends_with('/') && path.len() > 1 {
            "/"
        } else {
            ""
        };
        let path = normalize(Path::new(path));
        for (root, placeholder) in &self.roots {
            if let Ok(rest) = path.strip_prefix(root) {
                let rest = slash(rest);
                return match (placeholder.is_empty(), rest.is_empty()) {
                    (true, true) => format!(".{trailing}"),
                    (true, false) => format!("{rest}{trailing}"),
                    (false, true) => format!("{placeholder}{trailing}"),
                    (false, false) => format!("{placeholder}/{rest}{trailing}"),
                };
            }
        }
        match path.file_name() {
            Some(name) => format!("{UNKNOWN_ROOT}/{}{trailing}", name.to_string_lossy()),
            None => UNKNOWN_ROOT.to_string(),
        }
    }

    /// [`Self::display`] applied to every whitespace-separated word of a command line.
    pub fn display_words(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut word = String::new();
        for c in text.chars() {
            if c.is_whitespace() {
                out.push_str(&self.display(&word));
                word.clear();
                out.push(c);
            } else {
                word.push(c);
            }
        }
        out.push_str(&self.display(&word));
        out
    }
}

fn is_absolute(value: &str) -> bool {
    let b = value.as_bytes();
    // `/unix`, `\\server\share`, `C:\` or `C:/`.
    value.starts_with('/')
        || value.starts_with("\\\\")
        || (b.len() >= 3
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && (b[2] == b'\\' || b[2] == b'/'))
}

/// Drops `.` and resolves `..` lexically, so `/repo/./x/../y` compares as `/repo/y`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn slash(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> LocalPaths {
        LocalPaths::default()
            .with_root("/home/ann/repo", "")
            .with_root("/home/ann/repo/.rlhf/artifacts", "<artifacts>")
            .with_root("/home/ann/.cache/rlhf-bot/models", "<models>")
            .with_root("relative/ignored", "<x>")
    }

    #[test]
    fn absolute_paths_become_placeholders_or_relative() {
        let p = paths();
        assert_eq!(
            p.display("file:///home/ann/repo/.rlhf/artifacts/reward/r-1/"),
            "<artifacts>/reward/r-1/"
        );
        assert_eq!(
            p.display("/home/ann/.cache/rlhf-bot/models/S/s.gguf"),
            "<models>/S/s.gguf"
        );
        assert_eq!(p.display("/home/ann/repo/configs/x.yaml"), "configs/x.yaml");
        assert_eq!(p.display("/home/ann/repo/./a/../b"), "b");
        assert_eq!(p.display("/tmp/.tmpXyZ/store/runs/1/"), "<local>/1/");
        assert!(p.display("C:\\Users\\ann\\m.gguf").starts_with("<local>/"));
        for kept in [
            "s3://b/p/",
            "HuggingFaceTB/SmolLM2",
            "configs/x.yaml",
            "llama-from-scratch",
        ] {
            assert_eq!(p.display(kept), kept);
        }
        assert_eq!(
            p.display_words("rlhf-bot --config /tmp/t/rlhf.yaml run  --force"),
            "rlhf-bot --config <local>/rlhf.yaml run  --force"
        );
    }
}
