//! The report's Constitution section: which principles changed since the previous
//! `rlhf-bot constitution` run and, for a few prompts the change affects, the answer before and
//! after. Principle ids are code spans; prompts and answers are user and model text, neutralised
//! like the sample answers and shown in committed files only when `report.samples_in_files`
//! allows (the PR body shows them either way).

use serde::Serialize;

use super::neutralize::{code, fenced, inline};
use crate::constitution::pairs::ConstitutionDiff;
use crate::dataset::render_plain_prompt;

#[derive(Debug, Serialize)]
pub(super) struct ConstitutionView {
    changed: String,
    /// For `report.md`: empty unless `report.samples_in_files`.
    examples: Vec<ExampleView>,
    /// For the PR body.
    pr_examples: Vec<ExampleView>,
    note: Option<String>,
}

#[derive(Debug, Serialize)]
struct ExampleView {
    principle: String,
    prompt: String,
    before: String,
    after: String,
}

pub(super) fn view(
    d: &ConstitutionDiff,
    samples_in_files: bool,
    prompt_chars: usize,
    answer_chars: usize,
    pr_answer_chars: usize,
) -> ConstitutionView {
    let changed = if d.changed.is_empty() {
        "No principle changed since the previous constitution run.".to_string()
    } else {
        let list: Vec<String> = d
            .changed
            .iter()
            .map(|c| match c.rsplit_once(' ') {
                Some((id, what)) => format!("{} {what}", code(id)),
                None => code(c),
            })
            .collect();
        format!(
            "Principles since the previous constitution run: {}. {} prompt(s) affected.",
            list.join(", "),
            d.affected
        )
    };
    let examples = |answer_chars: usize| -> Vec<ExampleView> {
        d.examples
            .iter()
            .map(|e| ExampleView {
                principle: code(&e.principle),
                prompt: fenced(&render_plain_prompt(&e.prompt), prompt_chars, "text"),
                before: inline(&e.before, answer_chars),
                after: inline(&e.after, answer_chars),
            })
            .collect()
    };
    let pr_examples = examples(pr_answer_chars);
    let (examples, note) = if samples_in_files {
        (examples(answer_chars), None)
    } else {
        let note = (!pr_examples.is_empty()).then(|| {
            "Answers before and after are kept out of the committed files: prompts come from users. The pull-request description shows them (set `report.samples_in_files: true` to put them here too).".to_string()
        });
        (Vec::new(), note)
    };
    ConstitutionView {
        changed,
        examples,
        pr_examples,
        note,
    }
}
