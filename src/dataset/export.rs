//! Datasets out, in the formats the TRL ecosystem uses, so our data can be inspected with
//! ordinary tools and trained on with TRL for comparison.
//!
//! Out ([`export`]): per split (`train`, `eval`) a JSONL file per kind: `preference` (TRL
//! preference, conversational by default), `kto` (TRL unpaired preference), `prm` (TRL stepwise
//! supervision, whose prompt is always plain text because TRL's PRM trainer tokenises it
//! directly), `aspects` (our own: per-aspect targets); and `stats.json` (statistics,
//! fingerprint, options, and every file's line count and sha256). Output is a pure function of
//! the dataset: no timestamps, sorted examples, so the same store gives byte-identical files.
//!
//! Reading such files back (and HH-RLHF) is `dataset::io`'s job.

use crate::atomic_file::write_atomically;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Dataset;
use super::examples::Examples;
use super::io::render_plain_prompt;
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
        let mut line = serde_json::json!({
            "prompt": prompt(&p.prompt),
            "chosen": completion(&p.chosen),
            "rejected": completion(&p.rejected),
            "margin": p.margin,
        });
        // Only pairs that did not come from human feedback say where they came from, and only
        // those and the pairs the influence cap down-weighted carry a weight, so a human-only
        // export without capping stays byte-identical; TRL ignores the extra columns.
        if let Value::Object(fields) = &mut line {
            if let Some(source) = &p.source {
                fields.insert("source".into(), Value::String(source.clone()));
            }
            if p.source.is_some() || p.weight.is_some() {
                fields.insert("weight".into(), serde_json::json!(p.weight.unwrap_or(1.0)));
            }
        }
        out.preference.push(line);
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
