//! The metric report: what a reviewer reads to decide, in two minutes, whether to merge a model.
//!
//! [`render`] turns a [`ReportContext`] into Markdown (the full `report.md`, and a PR body capped
//! at GitHub's 65,536-character limit), SVG training curves and a `metrics.json` summary. It is
//! pure: no clock, no network, no environment, so snapshot tests pin its output.
//!
//! Rendering goes through a *view*: every string a template can print is built here, with
//! untrusted text (prompts, model answers, feedback-API labels) already neutralised
//! ([`neutralize`]) and numbers already formatted. Templates only lay the view out, so a template,
//! even one a user overrides, cannot print raw model output by forgetting a filter. Templates are
//! embedded in the binary (`include_str!`), rendered with strict undefined handling so a typo in
//! an override fails loudly instead of printing nothing, and can be replaced file by file from an
//! override directory.
//!
//! `report.md`, `metrics.json` and the plots are committed to the team's repository, so by default
//! they carry no user text and no local path: sample answers (a user's prompt and the models'
//! answers to it) go only into the PR body, where a reviewer can still edit them out, unless
//! [`RenderOptions::samples_in_files`] opts in; absolute paths are rewritten by [`LocalPaths`].

mod ai_feedback;
mod constitution;
pub mod context;
mod evals;
mod integrity;
pub mod neutralize;
pub mod paths;
pub mod plots;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use chrono::SecondsFormat;
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

pub use context::{
    Deployment, GateConfig, GateResult, GateStatus, Interval, KpiRow, PolicySection, Rejection,
    ReportContext, RewardSection, Verdict, evals_gate, evaluate_gates, integrity_gate, verdict,
};
use neutralize::{code, fenced, inline, truncate_markdown};
pub use paths::LocalPaths;

use crate::registry::ModelEntry;
use crate::run::outputs::Baseline;

/// GitHub rejects a pull-request body longer than this.
pub const PR_BODY_LIMIT: usize = 65_536;

/// Longest untrusted text shown in one place (characters).
const PROMPT_CHARS: usize = 2_000;
const ANSWER_CHARS: usize = 1_500;
const PR_ANSWER_CHARS: usize = 500;
const LABEL_CHARS: usize = 80;

/// The templates shipped in the binary: (name, source). An override directory may replace any.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("report.md.j2", include_str!("templates/report.md.j2")),
    ("pr_body.md.j2", include_str!("templates/pr_body.md.j2")),
    ("summary.md.j2", include_str!("templates/summary.md.j2")),
];

/// The rendered report, ready to write or post.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The full report (`reports/<run-id>/report.md`).
    pub markdown: String,
    /// The pull-request description: summary, a few samples, a link to the full report; at most
    /// [`PR_BODY_LIMIT`] bytes.
    pub pr_body: String,
    /// (file name, SVG) pairs, written beside `report.md`, which links them.
    pub plots: Vec<(String, String)>,
    /// Machine-readable summary (`reports/<run-id>/metrics.json`): metrics, gates, verdict.
    pub metrics_json: String,
}

#[derive(Debug, Default, Clone)]
pub struct RenderOptions {
    /// Directory whose `*.md.j2` files replace the embedded templates of the same name.
    pub template_dir: Option<PathBuf>,
    /// Also put the sample answers (prompts and answers) into `report.md` and `metrics.json`;
    /// the PR body has them either way (`report.samples_in_files`, off by default).
    pub samples_in_files: bool,
    /// How absolute paths (artifact URIs, model files, the reproduce command) are shown.
    pub local_paths: LocalPaths,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "report template `{name}` failed: {detail}\nhint: templates can use only the fields documented in docs/report.md; check the override directory"
    )]
    Template { name: String, detail: String },
    #[error("cannot read template override {}: {source}", path.display())]
    Override {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "run id `{0}` cannot name a report directory\nhint: use letters, digits, `-`, `_` and `.` only"
    )]
    BadRunId(String),
    #[error(transparent)]
    Plot(#[from] plots::PlotError),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialise metrics.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Renders with the embedded templates.
pub fn render(ctx: &ReportContext) -> Result<Rendered, ReportError> {
    render_with(ctx, &RenderOptions::default())
}

/// Renders with `opts` (template overrides).
pub fn render_with(ctx: &ReportContext, opts: &RenderOptions) -> Result<Rendered, ReportError> {
    check_run_id(&ctx.run_id)?;
    let plots = plots::training_plots(
        ctx.reward.as_ref().map(|r| r.log.as_slice()),
        ctx.policy.as_ref().map(|p| p.log.as_slice()),
    )?;
    let gates = ctx.gate_results();
    let view = build_view(ctx, &gates, &plots, opts);
    let env = environment(opts)?;
    let render_one = |name: &str| -> Result<String, ReportError> {
        let tmpl = env.get_template(name).map_err(|e| template_err(name, &e))?;
        tmpl.render(
            minijinja::context! { view => minijinja::Value::from(minijinja::value::Serde(&view)) },
        )
        .map_err(|e| template_err(name, &e))
    };
    let markdown = render_one("report.md.j2")?;
    let body = render_one("pr_body.md.j2")?;
    let notice = match &view.report_link {
        Some(link) => format!(
            "> ✂️ This description was cut to fit GitHub's limit. Read the full report: {link}\n"
        ),
        None => format!(
            "> ✂️ This description was cut to fit GitHub's limit. Read the full report in `{}`.\n",
            view.report_path
        ),
    };
    let pr_body = truncate_markdown(&body, PR_BODY_LIMIT, &notice);
    let policy_metrics = ctx.policy.as_ref().map(|p| {
        let mut metrics = p.metrics.clone();
        if !opts.samples_in_files {
            metrics.eval.samples.clear();
        }
        (p.candidate.id.as_str(), metrics)
    });
    let summary = MetricsSummary {
        run_id: &ctx.run_id,
        generated_at: view.generated_at.clone(),
        verdict: verdict(&gates),
        gates: &gates,
        reward: ctx.reward.as_ref().map(|r| ModelSummary {
            id: &r.candidate.id,
            metrics: &r.metrics,
        }),
        policy: policy_metrics
            .as_ref()
            .map(|(id, metrics)| ModelSummary { id, metrics }),
        kpis: &ctx.kpis,
        new_feedback: &ctx.new_feedback,
        integrity: ctx.integrity.as_ref(),
        evals: ctx.evals.as_ref(),
        ai_feedback: ai_feedback_shown(ctx, opts),
    };
    let metrics_json = serde_json::to_string_pretty(&summary)? + "\n";
    Ok(Rendered {
        markdown,
        pr_body,
        plots: plots.into_iter().map(|p| (p.file_name, p.svg)).collect(),
        metrics_json,
    })
}

/// Writes `report.md`, the plots and `metrics.json` to `<reports_root>/<run_id>/` and returns that
/// directory.
pub fn write_report(
    reports_root: &Path,
    run_id: &str,
    rendered: &Rendered,
) -> Result<PathBuf, ReportError> {
    check_run_id(run_id)?;
    let dir = reports_root.join(run_id);
    let write = |path: PathBuf, text: &str| {
        fs::write(&path, text).map_err(|source| ReportError::Write { path, source })
    };
    fs::create_dir_all(&dir).map_err(|source| ReportError::Write {
        path: dir.clone(),
        source,
    })?;
    write(dir.join("report.md"), &rendered.markdown)?;
    write(dir.join("metrics.json"), &rendered.metrics_json)?;
    for (name, svg) in &rendered.plots {
        write(dir.join(name), svg)?;
    }
    Ok(dir)
}

fn check_run_id(run_id: &str) -> Result<(), ReportError> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 100
        && !run_id.starts_with('.')
        && run_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ReportError::BadRunId(run_id.to_string()))
    }
}

fn template_err(name: &str, e: &minijinja::Error) -> ReportError {
    let mut detail = e.to_string();
    if let Some(line) = e.line() {
        detail.push_str(&format!(" (line {line})"));
    }
    ReportError::Template {
        name: name.to_string(),
        detail,
    }
}

fn environment(opts: &RenderOptions) -> Result<Environment<'static>, ReportError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .map_err(|e| template_err("(syntax)", &e))?;
    env.set_syntax(syntax);
    for (name, embedded) in TEMPLATES {
        let source = match &opts.template_dir {
            Some(dir) if dir.join(name).is_file() => {
                let path = dir.join(name);
                fs::read_to_string(&path)
                    .map_err(|source| ReportError::Override { path, source })?
            }
            _ => (*embedded).to_string(),
        };
        env.add_template_owned(*name, source)
            .map_err(|e| template_err(name, &e))?;
    }
    Ok(env)
}

#[derive(Serialize)]
struct ModelSummary<'a, M: Serialize> {
    id: &'a str,
    metrics: &'a M,
}

#[derive(Serialize)]
struct MetricsSummary<'a> {
    run_id: &'a str,
    generated_at: String,
    verdict: Verdict,
    gates: &'a [GateResult],
    #[serde(skip_serializing_if = "Option::is_none")]
    reward: Option<ModelSummary<'a, crate::run::outputs::RewardMetrics>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<ModelSummary<'a, crate::run::outputs::PolicyMetrics>>,
    kpis: &'a [KpiRow],
    new_feedback: &'a BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    integrity: Option<&'a crate::dataset::audit::IntegritySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evals: Option<&'a crate::evals::EvalResults>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ai_feedback: Option<crate::rlaif::pairs::AiFeedbackSummary>,
}

/// The AI feedback summary as committed files show it: a local judge checkpoint's path is
/// rewritten like every other local path.
fn ai_feedback_shown(
    ctx: &ReportContext,
    opts: &RenderOptions,
) -> Option<crate::rlaif::pairs::AiFeedbackSummary> {
    ctx.ai_feedback
        .as_ref()
        .map(|s| crate::rlaif::pairs::AiFeedbackSummary {
            judge: opts.local_paths.display_words(&s.judge),
            ..s.clone()
        })
}

// ---------------------------------------------------------------------------------------------
// The view: everything templates print, already safe Markdown.

#[derive(Debug, Serialize)]
struct View {
    run_id: String,
    generated_at: String,
    run_link: Option<String>,
    report_path: String,
    report_link: Option<String>,
    verdict: VerdictView,
    headline: String,
    first_run: bool,
    comparison: Vec<Row>,
    production_note: Option<String>,
    gates: Vec<GateView>,
    rejections: Vec<String>,
    deployed: Vec<String>,
    kpis: Vec<KpiView>,
    aspects: Vec<AspectRow>,
    training: Vec<TrainRow>,
    /// The policy objective's metrics at its last step (TRL's names).
    policy_last_step: Vec<MetricRow>,
    /// Each component of the policy's reward before and after training (`policy.reward`).
    reward_components: Vec<ComponentRow>,
    plots: Vec<PlotView>,
    samples: Vec<SampleView>,
    /// Why `report.md` shows no samples when the PR body has them.
    samples_note: Option<String>,
    pr_samples: Vec<SampleView>,
    samples_total: usize,
    lineage: Vec<LineageView>,
    reproduce: String,
    /// What the feedback audit found (absent when the audit is off).
    integrity: Option<integrity::IntegrityView>,
    /// The behaviour tests' results (absent when the run had no evals).
    evals: Option<evals::EvalsView>,
    /// The constitution diff (absent when no `rlhf-bot constitution` run exists).
    constitution: Option<constitution::ConstitutionView>,
    /// The last `rlhf-bot rlaif` run (absent when AI feedback is off or never ran).
    ai_feedback: Option<ai_feedback::AiFeedbackView>,
}

#[derive(Debug, Serialize)]
struct VerdictView {
    passed: bool,
    icon: &'static str,
    text: String,
}

#[derive(Debug, Serialize)]
struct Row {
    metric: String,
    candidate: String,
    production: String,
    delta: String,
}

#[derive(Debug, Serialize)]
struct GateView {
    icon: &'static str,
    name: String,
    detail: String,
}

#[derive(Debug, Serialize)]
struct KpiView {
    version: String,
    count: String,
    positive_rate: String,
    mean_rating: String,
}

#[derive(Debug, Serialize)]
struct AspectRow {
    aspect: String,
    candidate: String,
    production: String,
}

#[derive(Debug, Serialize)]
struct MetricRow {
    name: String,
    value: String,
}

#[derive(Debug, Serialize)]
struct ComponentRow {
    name: String,
    weight: String,
    before: String,
    after: String,
    delta: String,
}

#[derive(Debug, Serialize)]
struct TrainRow {
    model: String,
    steps: String,
    seconds: String,
    examples_per_second: String,
    tokens_per_second: String,
    epochs: String,
}

#[derive(Debug, Serialize)]
struct PlotView {
    file: String,
    title: String,
}

#[derive(Debug, Serialize)]
struct SampleView {
    index: usize,
    prompt: String,
    candidate: String,
    production: String,
    candidate_reward: String,
    production_reward: String,
}

#[derive(Debug, Serialize)]
struct LineageView {
    role: &'static str,
    id: String,
    algorithm: String,
    created_at: String,
    created_by: Option<String>,
    base_model: String,
    parent: String,
    config_sha256: String,
    watermark: String,
    examples_sha256: String,
    counts: String,
    artifact_uri: String,
    artifact_sha256: String,
    artifact_size: String,
    /// The cluster job that trained it (`train.backend: ray`).
    cluster_job: Option<String>,
}

const DASH: &str = "—";

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn pt_delta(d: f64) -> String {
    format!("{:+.1} pt", d * 100.0)
}

fn num(x: f64, digits: usize) -> String {
    format!("{x:.digits$}")
}

fn signed(x: f64, digits: usize) -> String {
    format!("{x:+.digits$}")
}

/// 12345 -> "12,345".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A Markdown link to a URL we were given, or `None` when the URL could break out of the link
/// syntax (only plain http(s) URLs without spaces, brackets or angle brackets are linked).
fn link(text: &str, url: &str) -> Option<String> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && !url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "()<>[]\"'`".contains(c));
    ok.then(|| format!("[{}]({url})", inline(text, LABEL_CHARS)))
}

fn counts_text(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return DASH.to_string();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{} {}", inline(k, LABEL_CHARS), thousands(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn interval(i: &Interval, f: impl Fn(f64) -> String) -> String {
    format!("{} [{}, {}]", f(i.estimate), f(i.low), f(i.high))
}

fn build_view(
    ctx: &ReportContext,
    gates: &[GateResult],
    plots: &[plots::Plot],
    opts: &RenderOptions,
) -> View {
    let v = verdict(gates);
    let reward = ctx.reward.as_ref();
    let policy = ctx.policy.as_ref();
    let report_path = format!("reports/{}/report.md", ctx.run_id);

    // Verdict line.
    let failed: Vec<&str> = gates
        .iter()
        .filter(|g| g.status == GateStatus::Fail)
        .map(|g| g.name.as_str())
        .collect();
    let na = if v.skipped > 0 {
        format!(", {} not applicable", v.skipped)
    } else {
        String::new()
    };
    let verdict_text = if !v.passed {
        format!(
            "{} of {} gates failed: {}. Do not merge.",
            v.failed,
            v.checked,
            failed.join("; ")
        )
    } else if v.checked == 0 {
        format!("No gate could be checked{na}. Review the numbers below before merging.")
    } else {
        format!(
            "All {} checked gates passed{na}. Ready for review.",
            v.checked
        )
    };

    // Headline: what was trained, on how much new feedback.
    let mut trained = Vec::new();
    if let Some(r) = reward {
        trained.push(format!("reward model {}", code(&r.candidate.id)));
    }
    if let Some(p) = policy {
        trained.push(format!(
            "policy {} ({})",
            code(&p.candidate.id),
            p.metrics.algo.as_str().to_uppercase()
        ));
    }
    let total: u64 = ctx.new_feedback.values().sum();
    let feedback = if ctx.new_feedback.is_empty() {
        "no new feedback recorded".to_string()
    } else {
        format!(
            "**{}** new feedback records ({})",
            thousands(total),
            counts_text(&ctx.new_feedback)
        )
    };
    let mut missing = Vec::new();
    // "No production yet" only when there is none; an unusable one is stated below instead.
    let no_production = |production: &Option<_>, baseline: &Option<Baseline>| {
        production.is_none()
            && baseline
                .as_ref()
                .is_none_or(|b| b.unusable_production.is_none())
    };
    if reward.is_some_and(|r| no_production(&r.production, &r.baseline)) {
        missing.push("reward model");
    }
    if policy.is_some_and(|p| no_production(&p.production, &p.baseline)) {
        missing.push("policy");
    }
    let first_run = !missing.is_empty();
    let headline = if trained.is_empty() {
        format!("Nothing was trained in this run; {feedback} since the last training.")
    } else {
        let mut h = format!(
            "Trained {} on {feedback} since the last training.",
            trained.join(" and ")
        );
        if first_run {
            h.push_str(&format!(
                " There is no production {} yet: this run proposes the first.",
                missing.join(" or ")
            ));
        }
        h
    };

    // Candidate vs production.
    let mut comparison = Vec::new();
    if let Some(r) = reward {
        let e = &r.metrics.eval;
        let prod = r.metrics.production_eval.as_ref();
        comparison.push(Row {
            metric: format!("Reward model eval accuracy (n = {})", thousands(e.n)),
            candidate: pct(e.accuracy),
            production: prod.map_or(DASH.into(), |p| pct(p.accuracy)),
            delta: prod.map_or(DASH.into(), |p| pt_delta(e.accuracy - p.accuracy)),
        });
        comparison.push(Row {
            metric: "Reward model mean margin".into(),
            candidate: num(e.mean_margin, 3),
            production: prod.map_or(DASH.into(), |p| num(p.mean_margin, 3)),
            delta: prod.map_or(DASH.into(), |p| signed(e.mean_margin - p.mean_margin, 3)),
        });
        if let Some(s) = e.step_accuracy {
            let ps = prod.and_then(|p| p.step_accuracy);
            comparison.push(Row {
                metric: "Reasoning-step accuracy".into(),
                candidate: pct(s),
                production: ps.map_or(DASH.into(), pct),
                delta: ps.map_or(DASH.into(), |p| pt_delta(s - p)),
            });
        }
    }
    if let Some(p) = policy {
        let e = &p.metrics.eval;
        let against = match (&p.baseline, &p.production) {
            (Some(b), _) => b.against.clone(),
            (None, Some(_)) => "production".to_string(),
            (None, None) => "base model".to_string(),
        };
        comparison.push(Row {
            metric: format!(
                "Policy win rate vs {against}, 95% CI (n = {})",
                thousands(e.n)
            ),
            candidate: format!(
                "{} [{}, {}]",
                pct(e.win_rate),
                pct(e.win_rate_low),
                pct(e.win_rate_high)
            ),
            production: "50.0%".into(),
            delta: pt_delta(e.win_rate - 0.5),
        });
        comparison.push(Row {
            metric: "Mean reward".into(),
            candidate: num(e.mean_reward, 3),
            production: e.production_mean_reward.map_or(DASH.into(), |x| num(x, 3)),
            delta: e
                .production_mean_reward
                .map_or(DASH.into(), |x| signed(e.mean_reward - x, 3)),
        });
        comparison.push(Row {
            metric: "KL to reference (nats)".into(),
            candidate: num(e.kl, 3),
            production: DASH.into(),
            delta: DASH.into(),
        });
        comparison.push(Row {
            metric: "Mean response length (tokens)".into(),
            candidate: num(e.response_length, 1),
            production: e
                .production_response_length
                .map_or(DASH.into(), |x| num(x, 1)),
            delta: e
                .production_response_length
                .map_or(DASH.into(), |x| signed(e.response_length - x, 1)),
        });
    }

    let mut prod_ids = Vec::new();
    let mut compared = Vec::new();
    let sections = [
        ("reward model", reward.map(|r| (&r.production, &r.baseline))),
        ("policy", policy.map(|p| (&p.production, &p.baseline))),
    ];
    for (what, section) in sections {
        let Some((production, baseline)) = section else {
            continue;
        };
        match baseline {
            Some(b) => compared.push(format!("the {what} with {} ({})", b.against, b.reason)),
            None => {
                if let Some(m) = production {
                    prod_ids.push(format!("{what} {}", code(&m.id)));
                }
            }
        }
    }
    let production_note = if !compared.is_empty() {
        Some(format!("Compared {}.", compared.join("; ")))
    } else {
        (!prod_ids.is_empty()).then(|| format!("Production: {}.", prod_ids.join(", ")))
    };

    let gates_view = gates
        .iter()
        .map(|g| GateView {
            icon: g.status.icon(),
            name: g.name.clone(),
            detail: g.detail.clone(),
        })
        .collect();

    let kpis = ctx
        .kpis
        .iter()
        .map(|k| KpiView {
            version: code(&k.model_version),
            count: thousands(k.count),
            positive_rate: k
                .positive_rate
                .as_ref()
                .map_or(DASH.into(), |i| interval(i, pct)),
            mean_rating: k
                .mean_rating
                .as_ref()
                .map_or(DASH.into(), |i| interval(i, |x| num(x, 2))),
        })
        .collect();

    let aspects = reward
        .map(|r| {
            let prod = r.metrics.production_eval.as_ref();
            r.metrics
                .eval
                .aspect_errors
                .iter()
                .map(|(k, v)| AspectRow {
                    aspect: inline(k, LABEL_CHARS),
                    candidate: pct(*v),
                    production: prod
                        .and_then(|p| p.aspect_errors.get(k))
                        .map_or(DASH.into(), |x| pct(*x)),
                })
                .collect()
        })
        .unwrap_or_default();

    let mut training = Vec::new();
    let train_row = |model: String, t: &crate::run::outputs::TrainStats| TrainRow {
        model,
        steps: thousands(t.steps),
        seconds: num(t.seconds, 1),
        examples_per_second: num(t.examples_per_second, 1),
        tokens_per_second: num(t.tokens_per_second, 0),
        epochs: num(t.epochs, 2),
    };
    if let Some(r) = reward {
        training.push(train_row(
            format!("reward {}", code(&r.candidate.id)),
            &r.metrics.train,
        ));
    }
    if let Some(p) = policy {
        training.push(train_row(
            format!("policy {}", code(&p.candidate.id)),
            &p.metrics.train,
        ));
    }
    let policy_last_step: Vec<MetricRow> = policy
        .map(|p| {
            p.metrics
                .last_step
                .iter()
                .map(|(name, v)| MetricRow {
                    name: code(name),
                    value: num(*v, 4),
                })
                .collect()
        })
        .unwrap_or_default();
    let reward_components: Vec<ComponentRow> = policy
        .map(|p| {
            p.metrics
                .eval
                .reward_components
                .iter()
                .map(|c| ComponentRow {
                    name: code(&c.name),
                    weight: num(c.weight, 3),
                    before: num(c.before, 4),
                    after: num(c.after, 4),
                    delta: num(c.after - c.before, 4),
                })
                .collect()
        })
        .unwrap_or_default();

    let sample_view = |max_answer: usize| -> Vec<SampleView> {
        policy
            .map(|p| {
                p.metrics
                    .eval
                    .samples
                    .iter()
                    .take(ctx.max_samples)
                    .enumerate()
                    .map(|(i, s)| SampleView {
                        index: i + 1,
                        prompt: fenced(&s.prompt, PROMPT_CHARS.min(max_answer * 2), "text"),
                        candidate: inline(&s.candidate, max_answer),
                        production: s
                            .production
                            .as_deref()
                            .map_or(DASH.into(), |t| inline(t, max_answer)),
                        candidate_reward: num(s.candidate_reward, 3),
                        production_reward: s.production_reward.map_or(DASH.into(), |x| num(x, 3)),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };

    let mut lineage = Vec::new();
    if let Some(r) = reward {
        lineage.push(lineage_view(
            "Reward model",
            &r.candidate,
            &opts.local_paths,
        ));
    }
    if let Some(p) = policy {
        lineage.push(lineage_view("Policy", &p.candidate, &opts.local_paths));
    }
    let pr_samples = sample_view(PR_ANSWER_CHARS);
    let (samples, samples_note) = if opts.samples_in_files {
        (sample_view(ANSWER_CHARS), None)
    } else {
        let note = (!pr_samples.is_empty()).then(|| {
            "Kept out of the committed files: prompts come from users. The pull-request description shows the samples (set `report.samples_in_files: true` to put them here too).".to_string()
        });
        (Vec::new(), note)
    };

    View {
        run_id: code(&ctx.run_id),
        generated_at: ctx.generated_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        run_link: ctx.run_url.as_deref().and_then(|u| link("workflow run", u)),
        report_link: ctx
            .report_url
            .as_deref()
            .and_then(|u| link(&report_path, u)),
        report_path,
        verdict: VerdictView {
            passed: v.passed,
            icon: if v.passed { "✅" } else { "❌" },
            text: verdict_text,
        },
        headline,
        first_run,
        comparison,
        production_note,
        gates: gates_view,
        deployed: ctx
            .deployed
            .iter()
            .map(|d| {
                let told = match d.notified {
                    Some(true) => "deployment complete",
                    Some(false) => "serving not told yet (the next `rlhf-bot deploy` retries)",
                    None => "no deployment record",
                };
                format!(
                    "{} {} since {}, {told}",
                    inline(&d.kind, 20),
                    code(&d.id),
                    inline(&d.deployed_at, 40)
                )
            })
            .collect(),
        rejections: ctx
            .rejections
            .iter()
            .map(|r| {
                let models: Vec<String> = r.models.iter().map(|m| code(m)).collect();
                let when = r
                    .closed_at
                    .as_deref()
                    .map_or(String::new(), |t| format!(", closed {}", inline(t, 40)));
                format!(
                    "#{} proposed {}{when}",
                    r.pr_number,
                    if models.is_empty() {
                        "models".to_string()
                    } else {
                        models.join(" and ")
                    }
                )
            })
            .collect(),
        kpis,
        aspects,
        training,
        policy_last_step,
        reward_components,
        plots: plots
            .iter()
            .map(|p| PlotView {
                file: p.file_name.clone(),
                title: p.title.clone(),
            })
            .collect(),
        samples,
        samples_note,
        pr_samples,
        samples_total: policy.map_or(0, |p| p.metrics.eval.samples.len()),
        lineage,
        reproduce: fenced(
            &opts.local_paths.display_words(&ctx.reproduce),
            PROMPT_CHARS,
            "sh",
        ),
        integrity: ctx.integrity.as_ref().map(integrity::view),
        evals: ctx.evals.as_ref().map(evals::view),
        constitution: ctx.constitution.as_ref().map(|d| {
            constitution::view(
                d,
                opts.samples_in_files,
                PROMPT_CHARS,
                ANSWER_CHARS,
                PR_ANSWER_CHARS,
            )
        }),
        ai_feedback: ai_feedback_shown(ctx, opts).as_ref().map(ai_feedback::view),
    }
}

/// [`code`] for a path [`LocalPaths`] rewrote: its placeholder's angle brackets are ours and inert
/// in a code span, so only the rest is checked.
fn path_code(shown: &str) -> String {
    let (placeholder, rest) = paths::split_placeholder(shown);
    match placeholder {
        Some(p) if rest.is_empty() => format!("`{p}`"),
        Some(p) => match code(rest).strip_prefix('`') {
            Some(span) => format!("`{p}{span}"),
            None => code(shown),
        },
        None => code(shown),
    }
}

fn lineage_view(role: &'static str, m: &ModelEntry, paths: &LocalPaths) -> LineageView {
    LineageView {
        role,
        id: code(&m.id),
        algorithm: code(&m.algorithm),
        created_at: m.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        created_by: m
            .created_by
            .as_deref()
            .map(|u| link("workflow run", u).unwrap_or_else(|| code(u))),
        base_model: match &m.base_model_commit {
            // A Hub base: the revision it was asked by and the commit that was trained on.
            Some(commit) => format!(
                "{} at commit {}",
                path_code(&paths.display(&m.base_model)),
                code(commit)
            ),
            None => path_code(&paths.display(&m.base_model)),
        },
        parent: m
            .parent
            .as_deref()
            .map_or_else(|| "none (first model)".to_string(), code),
        config_sha256: code(&m.config_sha256),
        watermark: code(&m.feedback.watermark),
        examples_sha256: code(&m.feedback.examples_sha256),
        counts: counts_text(&m.feedback.counts),
        artifact_uri: path_code(&paths.display(&m.artifact.uri)),
        artifact_sha256: code(&m.artifact.sha256),
        artifact_size: bytes(m.artifact.size_bytes),
        cluster_job: m.cluster_job.as_ref().map(|j| {
            format!(
                "{} job {} on {} (entrypoint {})",
                code(&j.backend),
                code(&j.submission_id),
                code(&j.address),
                code(&j.entrypoint)
            )
        }),
    }
}
