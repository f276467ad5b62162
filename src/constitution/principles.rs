//! `principles.yaml`: the team's constitution, kept in its repository. A YAML list of
//! `{id, critique, revision}`; the two prompts are templates in which `{prompt}` (the user's
//! last turn), `{answer}` (the answer under review) and, in the revision, `{critique}` are
//! replaced. Validation errors name the file, the principle and the field. Each principle has a
//! fingerprint (sha256 of its prompts) so a change to one principle is seen as that change.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One principle, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principle {
    pub id: String,
    /// Asks for a critique of `{answer}` to `{prompt}` against the principle.
    pub critique: String,
    /// Asks for the answer rewritten to meet the principle, given `{critique}`.
    pub revision: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrinciple {
    id: Option<String>,
    critique: Option<String>,
    revision: Option<String>,
}

impl Principle {
    /// sha256 of the id and both prompts: what "this principle changed" means.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.id, &self.critique, &self.revision] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    pub fn critique_request(&self, prompt: &str, answer: &str) -> String {
        fill(&self.critique, prompt, answer, "")
    }

    pub fn revision_request(&self, prompt: &str, answer: &str, critique: &str) -> String {
        fill(&self.revision, prompt, answer, critique)
    }
}

/// Replaces the placeholders in one pass, so text inside the prompt or answer that looks like a
/// placeholder is left as it is.
fn fill(template: &str, prompt: &str, answer: &str, critique: &str) -> String {
    let mut out = String::with_capacity(template.len() + prompt.len() + answer.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let (value, len) = [
            ("{prompt}", prompt),
            ("{answer}", answer),
            ("{critique}", critique),
        ]
        .iter()
        .find(|(name, _)| tail.starts_with(name))
        .map_or(("{", 1), |(name, value)| (*value, name.len()));
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Every principle's fingerprint by id: what the store remembers and `check` compares.
pub fn fingerprints(principles: &[Principle]) -> BTreeMap<String, String> {
    principles
        .iter()
        .map(|p| (p.id.clone(), p.fingerprint()))
        .collect()
}

/// Reads and validates `file`.
pub fn load(file: &Path) -> Result<Vec<Principle>> {
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "reading the principles file {}\nhint: set `constitution.principles` to the YAML list of principles in your repository (docs/constitution.md)",
            file.display()
        )
    })?;
    parse(&text, file)
}

/// Parses one principles file: a YAML list of `{id, critique, revision}`.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Principle>> {
    let raw: Vec<RawPrinciple> = serde_norway::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}\nhint: a principles file is a list of {{id, critique, revision}}; see docs/constitution.md",
            file.display()
        )
    })?;
    if raw.is_empty() {
        bail!(
            "{}: no principles\nhint: list at least one {{id, critique, revision}}",
            file.display()
        );
    }
    let mut out: Vec<Principle> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let which = match &r.id {
            Some(id) => format!("principle {} ({id:?})", i + 1),
            None => format!("principle {}", i + 1),
        };
        let field = |name: &str, value: Option<String>, hint: &str| -> Result<String> {
            match value {
                Some(v) if !v.trim().is_empty() => Ok(v),
                Some(_) => bail!(
                    "{}: {which}: field `{name}` is empty\nhint: {hint}",
                    file.display()
                ),
                None => bail!(
                    "{}: {which}: field `{name}` is missing\nhint: {hint}",
                    file.display()
                ),
            }
        };
        let id = field("id", r.id.clone(), "a short name such as `no-jargon`")?;
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "{}: {which}: field `id` {id:?} has characters other than letters, digits, `-` and `_`\nhint: ids appear in reports and pull requests; keep them short names",
                file.display()
            );
        }
        if out.iter().any(|p| p.id == id) {
            bail!(
                "{}: {which}: field `id` {id:?} is used twice\nhint: every principle needs its own id",
                file.display()
            );
        }
        let critique = field(
            "critique",
            r.critique,
            "a prompt asking what in `{answer}` breaks the principle",
        )?;
        if !critique.contains("{answer}") {
            bail!(
                "{}: {which}: field `critique` never mentions `{{answer}}`\nhint: the critique prompt must show the answer it critiques: include `{{answer}}` (and `{{prompt}}` for the question)",
                file.display()
            );
        }
        let revision = field(
            "revision",
            r.revision,
            "a prompt asking for `{answer}` rewritten given `{critique}`",
        )?;
        if !revision.contains("{answer}") {
            bail!(
                "{}: {which}: field `revision` never mentions `{{answer}}`\nhint: the revision prompt must show the answer to rewrite: include `{{answer}}` (and `{{critique}}`)",
                file.display()
            );
        }
        out.push(Principle {
            id,
            critique,
            revision,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "principles.yaml";

    fn err(text: &str) -> String {
        format!("{:#}", parse(text, Path::new(FILE)).unwrap_err())
    }

    #[test]
    fn placeholders_are_filled_once_and_unknown_braces_are_kept() {
        let p = Principle {
            id: "plain".into(),
            critique: "Q: {prompt} A: {answer} {other}".into(),
            revision: "{answer} / {critique}".into(),
        };
        assert_eq!(
            p.critique_request("why {answer}?", "because"),
            "Q: why {answer}? A: because {other}"
        );
        assert_eq!(p.revision_request("q", "a", "too long"), "a / too long");
    }

    #[test]
    fn errors_name_the_file_the_principle_and_the_field() {
        let e = err("- id: plain\n  critique: 'Critique {answer}'\n");
        assert!(
            e.contains(FILE)
                && e.contains("principle 1 (\"plain\")")
                && e.contains("`revision` is missing"),
            "{e}"
        );
        let e = err("- id: plain\n  critique: 'no placeholder'\n  revision: '{answer}'\n");
        assert!(e.contains("`critique` never mentions `{answer}`"), "{e}");
        let e = err(
            "- {id: a, critique: '{answer}', revision: '{answer}'}\n- {id: a, critique: '{answer}', revision: '{answer}'}\n",
        );
        assert!(
            e.contains("principle 2 (\"a\")") && e.contains("used twice"),
            "{e}"
        );
        let e = err("- {id: a, critique: '{answer}', revision: '{answer}', extra: 1}\n");
        assert!(e.contains(FILE) && e.contains("extra"), "{e}");
        assert!(err("[]").contains("no principles"));
    }

    #[test]
    fn a_changed_prompt_changes_the_fingerprint() {
        let ok = "- {id: a, critique: '{answer}', revision: 'Fix {answer}'}\n";
        let a = parse(ok, Path::new(FILE)).unwrap();
        let b = parse(&ok.replace("Fix", "Mend"), Path::new(FILE)).unwrap();
        assert_ne!(a[0].fingerprint(), b[0].fingerprint());
        assert_eq!(a[0].fingerprint(), a[0].clone().fingerprint());
    }
}
