//! Constitution as code (docs/constitution.md): the team's principles (`principles`), the pairs
//! a `rlhf-bot constitution` run makes from them and where they live (`pairs`), and the run
//! itself ([`revise`]): for each prompt, the policy's answer is critiqued against a sampled
//! principle and revised, by the policy itself or by the OpenAI-compatible judge
//! (`evals::judge`, the one judge client) or a local checkpoint. The revision becomes `chosen`, the original
//! `rejected`. Loading models and generating is `app::constitution`'s job; this module sees
//! the policy only as a function from a user message to a reply.

pub mod pairs;
pub mod principles;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::evals::judge::{AnyJudge, JudgeSource};
use crate::feedback::Store;
use crate::feedback::record::ChatMessage;
use pairs::AiPair;
use principles::Principle;

/// Who writes critiques and revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CriticKind {
    /// The policy answers its own critique and revision requests.
    Policy,
    /// The judge of `constitution.judge`: an OpenAI-compatible endpoint or a local checkpoint.
    Judge,
}

impl CriticKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CriticKind::Policy => "policy",
            CriticKind::Judge => "judge",
        }
    }
}

/// `constitution:` in the config, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConstitutionSettings {
    /// The principles file, relative to the working directory (the team's repository).
    pub principles: PathBuf,
    pub critic: CriticKind,
    /// Required when `critic` is `judge`.
    pub judge: Option<JudgeSource>,
    /// The weight of constitution pairs in the dataset, separate from human feedback (0 leaves
    /// them out).
    pub weight: f64,
    /// Seeds which principle each prompt gets.
    pub seed: u64,
    /// The longest answer, critique or revision the policy writes, in tokens.
    pub max_new_tokens: usize,
    /// Prompts per run when `--limit` is not given.
    pub limit: usize,
}

impl Default for ConstitutionSettings {
    fn default() -> Self {
        Self {
            principles: PathBuf::from("principles.yaml"),
            critic: CriticKind::Policy,
            judge: None,
            weight: 1.0,
            seed: 0,
            max_new_tokens: 128,
            limit: 64,
        }
    }
}

/// The system message the judge gets with each critique or revision request.
const JUDGE_SYSTEM: &str = "You review an assistant's answer against one of its team's \
principles. Do exactly what the request asks and reply with only that text: a critique when asked \
for a critique, the rewritten answer when asked for a revision.";

/// Writes critiques and revisions: the policy (a function from a user message to its reply) or
/// the judge.
pub enum Critic<'a> {
    Policy(&'a mut dyn FnMut(&str) -> Result<String>),
    Judge(&'a AnyJudge<'a>),
}

impl Critic<'_> {
    async fn ask(&mut self, request: &str) -> Result<String> {
        let reply = match self {
            Critic::Policy(generate) => generate(request)?,
            Critic::Judge(judge) => judge.chat(JUDGE_SYSTEM, request).await?,
        };
        Ok(reply.trim().to_string())
    }

    /// [`Self::ask`] for the principle's `what` (`critique`, `revision`) on the prompt `at`
    /// describes; an empty reply is an error.
    async fn ask_for(&mut self, what: &str, request: &str, at: &str) -> Result<String> {
        let reply = self
            .ask(request)
            .await
            .with_context(|| format!("asking for the {what} of the answer to {at}"))?;
        if reply.is_empty() {
            bail!(
                "the critic returned an empty {what} for {at}\nhint: check that the critic model follows instructions; the request is the principle's `{what}` prompt"
            );
        }
        Ok(reply)
    }
}

/// One prompt to revise: the conversation up to the user's last turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPrompt {
    pub conversation_id: String,
    pub prompt: Vec<ChatMessage>,
}

/// What [`revise`] made.
#[derive(Debug, Default)]
pub struct Revisions {
    pub pairs: Vec<AiPair>,
    /// Prompts whose revision came back identical to the answer (no preference to learn).
    pub unchanged: usize,
}

/// Critiques and revises the policy's answer to each prompt against a principle sampled with
/// `seed`. `answer` is the policy's answer to a prompt. Any failure stops the run with an error
/// naming the prompt's position and principle; the caller writes nothing then.
pub async fn revise(
    prompts: &[StoredPrompt],
    principles: &[Principle],
    seed: u64,
    answer: &mut dyn FnMut(&[ChatMessage]) -> Result<String>,
    critic: &mut Critic<'_>,
) -> Result<Revisions> {
    if principles.is_empty() {
        bail!("internal error: no principles to revise with");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Revisions::default();
    for (i, p) in prompts.iter().enumerate() {
        let principle = &principles[rng.random_range(0..principles.len())];
        let at = || {
            format!(
                "prompt {} of {} (principle {:?})",
                i + 1,
                prompts.len(),
                principle.id
            )
        };
        let question = p.prompt.last().map_or("", |m| m.content.as_str());
        let original = answer(&p.prompt)
            .with_context(|| format!("answering {}", at()))?
            .trim()
            .to_string();
        let critique = critic
            .ask_for(
                "critique",
                &principle.critique_request(question, &original),
                &at(),
            )
            .await?;
        let revised = critic
            .ask_for(
                "revision",
                &principle.revision_request(question, &original, &critique),
                &at(),
            )
            .await?;
        if revised == original {
            out.unchanged += 1;
            continue;
        }
        out.pairs.push(AiPair {
            conversation_id: p.conversation_id.clone(),
            prompt: p.prompt.clone(),
            chosen: revised,
            rejected: original,
            principle: principle.id.clone(),
        });
    }
    Ok(out)
}

/// The store's loop-state key of the principles' fingerprints at the last training.
const TRAINED_PRINCIPLES: &str = "trained_principles";

/// The principles file's fingerprints, or `None` when the team keeps no principles file.
fn current_fingerprints(
    settings: &ConstitutionSettings,
) -> Result<Option<BTreeMap<String, String>>> {
    if !settings.principles.is_file() {
        return Ok(None);
    }
    Ok(Some(principles::fingerprints(&principles::load(
        &settings.principles,
    )?)))
}

/// Records the principles a training used (called when a training is recorded), so the next
/// `check` sees an edit of the file as the `principles` trigger.
pub fn record_principles(store: &Store, settings: &ConstitutionSettings) -> Result<()> {
    match current_fingerprints(settings)? {
        Some(current) => store.set_loop_state(TRAINED_PRINCIPLES, &current),
        None => Ok(()),
    }
}

/// What changed in the principles since the last training: `None` when there is no principles
/// file or no training recorded them, else one entry per principle changed, added or removed.
pub fn principle_changes(
    store: &Store,
    settings: &ConstitutionSettings,
) -> Result<Option<Vec<String>>> {
    let Some(current) = current_fingerprints(settings)? else {
        return Ok(None);
    };
    let Some(trained) = store.loop_state::<BTreeMap<String, String>>(TRAINED_PRINCIPLES)? else {
        return Ok(None);
    };
    Ok(Some(diff(&trained, &current)))
}

/// `before` → `after` as `"<id> changed"`, `"<id> added"`, `"<id> removed"`, by id.
pub fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, sha) in after {
        match before.get(id) {
            Some(old) if old == sha => {}
            Some(_) => out.push(format!("{id} changed")),
            None => out.push(format!("{id} added")),
        }
    }
    out.extend(
        before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .map(|id| format!("{id} removed")),
    );
    out
}
