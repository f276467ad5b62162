//! The report's "Behaviour tests" section: each eval's result for the candidate and production,
//! the checks that failed, and the regressions (passed in production, fails in the candidate).
//! Eval names and check details come from the team's eval files; they are escaped like any
//! other label.

use serde::Serialize;

use super::neutralize::{code, inline};
use crate::evals::{EvalResults, Outcome};

#[derive(Debug, Serialize)]
pub(super) struct EvalsView {
    rows: Vec<EvalRow>,
    summary: String,
    regressions: Vec<String>,
}

#[derive(Debug, Serialize)]
struct EvalRow {
    name: String,
    required: &'static str,
    candidate: String,
    production: String,
    failed_checks: String,
}

fn mark(o: &Outcome) -> String {
    if o.passed { "✅" } else { "❌" }.to_string()
}

pub(super) fn view(results: &EvalResults) -> EvalsView {
    let rows = results
        .cases
        .iter()
        .map(|c| EvalRow {
            name: code(&c.name),
            required: if c.required { "yes" } else { "no" },
            candidate: mark(&c.candidate),
            production: c.production.as_ref().map_or("—".into(), mark),
            failed_checks: {
                let failed: Vec<String> = c
                    .candidate
                    .checks
                    .iter()
                    .filter(|k| !k.passed)
                    .map(|k| inline(&format!("{}: {}", k.kind, k.detail), 160))
                    .collect();
                if failed.is_empty() {
                    "—".into()
                } else {
                    failed.join("; ")
                }
            },
        })
        .collect();
    let passed = results.cases.iter().filter(|c| c.candidate.passed).count();
    let regressions: Vec<String> = results.regressions().map(|c| code(&c.name)).collect();
    EvalsView {
        rows,
        summary: format!(
            "The candidate passes {passed} of {} evals; {} regression(s) against production.",
            results.cases.len(),
            regressions.len()
        ),
        regressions,
    }
}
