//! The GitHub Actions runner environment: step outputs (`GITHUB_OUTPUT`), the job's step summary
//! (`GITHUB_STEP_SUMMARY`), secret masking and annotations. Outside Actions every function here is
//! a no-op, so callers never branch on where they run.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

/// GitHub caps the step summary of one step at 1 MiB; beyond that the upload fails the job.
pub const STEP_SUMMARY_LIMIT: usize = 1024 * 1024;

/// Where the runner wants outputs and the summary; `None` fields mean "not in Actions".
#[derive(Debug, Clone, Default)]
pub struct ActionsEnv {
    pub output_file: Option<PathBuf>,
    pub summary_file: Option<PathBuf>,
    pub in_actions: bool,
}

impl ActionsEnv {
    /// Reads the runner's variables from the process environment.
    pub fn from_env() -> Self {
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            output_file: path("GITHUB_OUTPUT"),
            summary_file: path("GITHUB_STEP_SUMMARY"),
            in_actions: std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true"),
        }
    }

    /// Sets a step output. Multi-line values use the heredoc form with a delimiter that cannot
    /// occur in the value, so a crafted value cannot inject further outputs.
    pub fn set_output(&self, key: &str, value: &str) -> Result<()> {
        let Some(path) = &self.output_file else {
            return Ok(());
        };
        let mut line = String::new();
        if value.contains('\n') || value.contains('\r') {
            let mut delimiter = String::from("RLHF_BOT_EOF");
            while value.contains(&delimiter) {
                delimiter.push('_');
            }
            line.push_str(&format!("{key}<<{delimiter}\n{value}\n{delimiter}\n"));
        } else {
            line.push_str(&format!("{key}={value}\n"));
        }
        append(path, &line).with_context(|| format!("writing step output `{key}`"))
    }

    /// Appends Markdown to the step summary, truncated so the summary stays under GitHub's cap.
    pub fn append_summary(&self, markdown: &str) -> Result<()> {
        let Some(path) = &self.summary_file else {
            return Ok(());
        };
        let used = std::fs::metadata(path)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let room = STEP_SUMMARY_LIMIT.saturating_sub(used + 64);
        let text = if markdown.len() > room {
            let mut cut = room;
            while !markdown.is_char_boundary(cut) {
                cut -= 1;
            }
            format!(
                "{}\n\n_(truncated: the step summary is limited to 1 MiB)_\n",
                &markdown[..cut]
            )
        } else {
            format!("{markdown}\n")
        };
        append(path, &text).context("writing the step summary")
    }

    /// Asks the runner to mask a secret in all later log lines. Printed only inside Actions: on a
    /// terminal the command would print the secret itself. Workflow commands go to stderr (the
    /// runner reads them from both streams) so that stdout stays data: a workflow step that does
    /// `rlhf-bot run --format json > run.json` gets JSON, and the mask still applies. The runner
    /// masks one line per command and unescapes `%XX` in the data, so each line of the secret is
    /// masked on its own and escaped. That untrusted data cannot switch masking off
    /// (`::stop-commands::`) is [`crate::sanitize`]'s part: no data reaches the start of a line.
    pub fn mask(&self, secret: &str) {
        if !self.in_actions {
            return;
        }
        for line in mask_lines(secret) {
            eprintln!("::add-mask::{}", escape_data(line));
        }
    }

    /// An error annotation on the run page, so the run's summary says why it failed without
    /// opening the log. Inside Actions only (on a terminal the error is already printed).
    pub fn error_annotation(&self, message: &str) {
        if self.in_actions {
            let message = crate::sanitize::terminal_block(message);
            eprintln!("::error title=rlhf-bot::{}", escape_data(&message));
        }
    }

    /// A warning annotation on the run page (a plain log line elsewhere).
    pub fn warning(&self, message: &str) {
        let message = crate::sanitize::terminal_block(message);
        if self.in_actions {
            eprintln!("::warning::{}", escape_data(&message));
        } else {
            tracing::warn!("{message}");
        }
    }
}

/// The non-blank lines of a secret, each of which the runner must mask.
fn mask_lines(secret: &str) -> impl Iterator<Item = &str> {
    secret.split(['\r', '\n']).filter(|l| !l.trim().is_empty())
}

/// Workflow-command data must escape `%`, CR and LF or the runner cuts the message.
fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn append(path: &PathBuf, text: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_a_secret_is_masked() {
        let lines: Vec<&str> = mask_lines("line-one\r\n\nline%two\n").collect();
        assert_eq!(lines, ["line-one", "line%two"]);
        assert_eq!(escape_data("line%two"), "line%25two");
    }
}
