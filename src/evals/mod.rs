//! Behaviour tests as merge gates (docs/evals.md): golden conversations in `evals/*.yaml` of the
//! team's repository, each with checks on the policy's answer: `contains`, `not_contains`,
//! `regex`, a reward-model score floor (`min_reward`) and a judge rubric scored by an
//! OpenAI-compatible chat endpoint (`judge`). The candidate and the production policy both
//! answer (greedily, with the policy stage's generation code); this module loads the cases,
//! checks the answers, and states the results: which eval passed where, and the regressions
//! (passed in production, fails in the candidate). A failing `required: true` eval fails the
//! report's `evals` gate, which makes the pull request a draft like every other gate.
//!
//! Loading and checking are pure; the judge's HTTP client is `judge`.

pub mod judge;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::feedback::record::ChatMessage;

/// File name of the results in a policy run directory (beside `metrics.json`).
pub const RESULTS_FILE: &str = "evals.json";

/// The smallest judge score (0–10) a judge check passes with when the file does not say.
pub const DEFAULT_MIN_JUDGE_SCORE: f64 = 7.0;

/// One eval as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    required: bool,
    conversation: Vec<ChatMessage>,
    checks: Vec<RawCheck>,
}

/// One check: exactly one of the check keys (`min_score` only beside `judge`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    contains: Option<String>,
    not_contains: Option<String>,
    regex: Option<String>,
    min_reward: Option<f64>,
    judge: Option<String>,
    min_score: Option<f64>,
}

/// A check on one answer.
#[derive(Debug, Clone)]
pub enum Check {
    Contains(String),
    NotContains(String),
    Regex(regex::Regex),
    /// The reward model's score of (conversation + answer) is at least this.
    MinReward(f64),
    /// A judge model scores the answer against `rubric` from 0 to 10; passes at `min_score`.
    Judge {
        rubric: String,
        min_score: f64,
    },
}

impl Check {
    /// The check's kind, as the file names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Contains(_) => "contains",
            Check::NotContains(_) => "not_contains",
            Check::Regex(_) => "regex",
            Check::MinReward(_) => "min_reward",
            Check::Judge { .. } => "judge",
        }
    }
}

/// A golden conversation and what its answer must satisfy.
#[derive(Debug, Clone)]
pub struct EvalCase {
    pub name: String,
    pub required: bool,
    /// Ends with the user's turn the policy answers.
    pub conversation: Vec<ChatMessage>,
    pub checks: Vec<Check>,
    /// The file it came from, for error messages.
    pub file: PathBuf,
}

impl EvalCase {
    pub fn needs_judge(&self) -> bool {
        self.checks.iter().any(|c| matches!(c, Check::Judge { .. }))
    }
}

/// Loads every `*.yaml` / `*.yml` file of `dir` (sorted by name); a missing directory holds no
/// evals. Any problem names the file, the eval and the check.
pub fn load_dir(dir: &Path) -> Result<Vec<EvalCase>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the evals directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        cases.extend(parse(&text, &file)?);
    }
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!(
            "two evals are named {:?}\nhint: every eval in the evals directory needs its own name",
            w[0]
        );
    }
    Ok(cases)
}

/// Parses one file: a YAML list of evals.
pub fn parse(text: &str, file: &Path) -> Result<Vec<EvalCase>> {
    let raw: Vec<RawCase> = serde_norway::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}\nhint: an evals file is a list of {{name, required, conversation, checks}}; see docs/evals.md",
            file.display()
        )
    })?;
    raw.into_iter().map(|r| validate(r, file)).collect()
}

fn validate(raw: RawCase, file: &Path) -> Result<EvalCase> {
    let at = |what: String| format!("{}: eval {:?}: {what}", file.display(), raw.name);
    if raw.name.trim().is_empty() {
        bail!("{}: an eval has an empty `name`", file.display());
    }
    match raw.conversation.last() {
        Some(m) if m.role == "user" => {}
        _ => bail!(
            "{}\nhint: the conversation must end with a `user` turn for the policy to answer",
            at("the conversation does not end with a user turn".into())
        ),
    }
    if raw.checks.is_empty() {
        bail!("{}", at("has no checks".into()));
    }
    let mut checks = Vec::with_capacity(raw.checks.len());
    for (i, c) in raw.checks.iter().enumerate() {
        let n = i + 1;
        let set = [
            c.contains.is_some(),
            c.not_contains.is_some(),
            c.regex.is_some(),
            c.min_reward.is_some(),
            c.judge.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set != 1 {
            bail!(
                "{}\nhint: each check has exactly one of contains, not_contains, regex, min_reward, judge",
                at(format!("check {n} has {set} check keys"))
            );
        }
        if c.min_score.is_some() && c.judge.is_none() {
            bail!(
                "{}",
                at(format!("check {n}: `min_score` belongs to a `judge` check"))
            );
        }
        let check = if let Some(s) = &c.contains {
            Check::Contains(s.clone())
        } else if let Some(s) = &c.not_contains {
            Check::NotContains(s.clone())
        } else if let Some(s) = &c.regex {
            Check::Regex(regex::Regex::new(s).map_err(|e| {
                anyhow::anyhow!("{}", at(format!("check {n}: invalid regex {s:?}: {e}")))
            })?)
        } else if let Some(v) = c.min_reward {
            if !v.is_finite() {
                bail!(
                    "{}",
                    at(format!(
                        "check {n}: min_reward must be a finite number, got {v}"
                    ))
                );
            }
            Check::MinReward(v)
        } else {
            let min_score = c.min_score.unwrap_or(DEFAULT_MIN_JUDGE_SCORE);
            if !(0.0..=10.0).contains(&min_score) {
                bail!(
                    "{}",
                    at(format!(
                        "check {n}: min_score must be in [0, 10], got {min_score}"
                    ))
                );
            }
            Check::Judge {
                rubric: c.judge.clone().unwrap_or_default(),
                min_score,
            }
        };
        checks.push(check);
    }
    Ok(EvalCase {
        name: raw.name,
        required: raw.required,
        conversation: raw.conversation,
        checks,
        file: file.to_path_buf(),
    })
}

/// What one model answered to one eval, with what the checks need beyond the text.
#[derive(Debug, Clone)]
pub struct Answered {
    pub text: String,
    /// The reward model's score of the conversation + answer.
    pub reward: f64,
    /// One judge score (0–10) per judge check, in order; `None` when the judge was not asked.
    pub judge_scores: Vec<Option<f64>>,
}

/// One check's verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub kind: String,
    pub passed: bool,
    /// The numbers or the pattern: `reward 0.42 ≥ 0.00`, `contains "price"`.
    pub detail: String,
}

/// One model's result on one eval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub passed: bool,
    pub checks: Vec<CheckResult>,
}

/// One eval's results for the candidate and (when there is one) production.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub required: bool,
    pub candidate: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production: Option<Outcome>,
}

impl CaseResult {
    /// Passed in production, fails in the candidate.
    pub fn regressed(&self) -> bool {
        !self.candidate.passed && self.production.as_ref().is_some_and(|p| p.passed)
    }
}

/// Every eval's results: `evals.json` of a policy run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    pub cases: Vec<CaseResult>,
}

impl EvalResults {
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(RESULTS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!("{} is not an eval results file", path.display())
        })?))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(RESULTS_FILE);
        let text = serde_json::to_string_pretty(self)? + "\n";
        crate::atomic_file::write_atomically(&path, text.as_bytes())
    }

    pub fn required_failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases
            .iter()
            .filter(|c| c.required && !c.candidate.passed)
    }

    pub fn regressions(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| c.regressed())
    }
}

/// Applies `case`'s checks to one answer.
pub fn check(case: &EvalCase, answer: &Answered) -> Outcome {
    let mut judged = answer.judge_scores.iter();
    let checks: Vec<CheckResult> = case
        .checks
        .iter()
        .map(|c| {
            let (passed, detail) = match c {
                Check::Contains(s) => (answer.text.contains(s.as_str()), format!("contains {s:?}")),
                Check::NotContains(s) => (
                    !answer.text.contains(s.as_str()),
                    format!("does not contain {s:?}"),
                ),
                Check::Regex(re) => (
                    re.is_match(&answer.text),
                    format!("matches /{}/", re.as_str()),
                ),
                Check::MinReward(min) => (
                    answer.reward >= *min,
                    format!(
                        "reward {:.3} {} {min:.3}",
                        answer.reward,
                        if answer.reward >= *min { "≥" } else { "<" }
                    ),
                ),
                Check::Judge { min_score, .. } => match judged.next().copied().flatten() {
                    Some(score) => (
                        score >= *min_score,
                        format!(
                            "judge score {score:.1} {} {min_score:.1}",
                            if score >= *min_score { "≥" } else { "<" }
                        ),
                    ),
                    None => (false, "the judge gave no score".to_string()),
                },
            };
            CheckResult {
                kind: c.kind().to_string(),
                passed,
                detail,
            }
        })
        .collect();
    Outcome {
        passed: checks.iter().all(|c| c.passed),
        checks,
    }
}

/// `evals:` in the config, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalsSettings {
    /// The directory of `*.yaml` eval files (relative to the working directory: the team's
    /// repository in the workflow). A missing directory means no evals.
    pub dir: PathBuf,
    pub judge: Option<judge::JudgeSettings>,
}

impl Default for EvalsSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("evals"),
            judge: None,
        }
    }
}

/// Loads the configured evals and checks that a judge is configured where a check needs one:
/// what `config check` and the policy stage (before training) run, so a broken eval file fails
/// before any compute is spent.
pub fn load_checked(settings: &EvalsSettings) -> Result<Vec<EvalCase>> {
    let cases = load_dir(&settings.dir)?;
    if settings.judge.is_none()
        && let Some(case) = cases.iter().find(|c| c.needs_judge())
    {
        bail!(
            "eval {:?} ({}) has a judge check, but no judge is configured
hint: set `evals.judge.url` and `evals.judge.model` (docs/evals.md)",
            case.name,
            case.file.display()
        );
    }
    Ok(cases)
}

/// One model's greedy answer to one eval's conversation, with its reward-model score.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelAnswer {
    pub text: String,
    pub reward: f64,
}

/// Checks every case's answers (asking the judge where a check needs it) and states the
/// results; `candidate[i]` and `production[i]` answer `cases[i]`. Any judge failure is an error
/// naming the eval: a check that could not run is not reported as passed or failed.
pub async fn results(
    cases: &[EvalCase],
    candidate: &[ModelAnswer],
    production: Option<&[ModelAnswer]>,
    judge: Option<&judge::Judge>,
) -> Result<EvalResults> {
    if candidate.len() != cases.len() || production.is_some_and(|p| p.len() != cases.len()) {
        bail!("internal error: eval answers do not match the eval cases");
    }
    let mut out = EvalResults::default();
    for (i, case) in cases.iter().enumerate() {
        let cand = answered(case, &candidate[i], judge).await?;
        let prod = match production {
            Some(p) => Some(check(case, &answered(case, &p[i], judge).await?)),
            None => None,
        };
        out.cases.push(CaseResult {
            name: case.name.clone(),
            required: case.required,
            candidate: check(case, &cand),
            production: prod,
        });
    }
    Ok(out)
}

async fn answered(
    case: &EvalCase,
    answer: &ModelAnswer,
    judge: Option<&judge::Judge>,
) -> Result<Answered> {
    let mut judge_scores = Vec::new();
    for c in &case.checks {
        if let Check::Judge { rubric, .. } = c {
            let Some(judge) = judge else {
                bail!(
                    "eval {:?} ({}) has a judge check, but no judge is configured\nhint: set `evals.judge.url` and `evals.judge.model` (docs/evals.md)",
                    case.name,
                    case.file.display()
                );
            };
            let score = judge
                .score(rubric, &case.conversation, &answer.text)
                .await
                .with_context(|| format!("judging eval {:?}", case.name))?;
            judge_scores.push(Some(score));
        }
    }
    Ok(Answered {
        text: answer.text.clone(),
        reward: answer.reward,
        judge_scores,
    })
}
