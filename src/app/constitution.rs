//! `rlhf-bot constitution`: prompts from the store, answered by the policy the policy stage
//! would start from (the production model, else `policy.model`, else the default model from
//! scratch), critiqued and revised against the team's principles by the policy or the judge
//! (`constitution::revise`). All or nothing: the pairs are written once, atomically, after
//! every prompt succeeded (`constitution::pairs`); a failure leaves the previous pairs as they
//! were.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::generate::load_lm;
use super::judge::JudgeHandle;
use super::model_source::localize_opt;
use super::policy::{default_base_model, render_prompt as render, resolve_model_dir};
use crate::config::Settings;
use crate::constitution::pairs::{self, ConstitutionPairs};
use crate::constitution::{Critic, CriticKind, StoredPrompt, principles, revise};
use crate::feedback::Store;
use crate::feedback::record::ChatMessage;
use crate::model::generate::{GenerationConfig, generate_from_texts};
use crate::model_kind::ModelKind;
use crate::train::device::DeviceChoice;

/// The config section of the judge, named by its errors' hints.
const JUDGE_SECTION: &str = "constitution.judge";

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct ConstitutionSummary {
    pub prompts: usize,
    pub pairs: usize,
    /// Revisions identical to the answer: no pair.
    pub unchanged: usize,
    pub critic: &'static str,
    pub written: PathBuf,
}

impl std::fmt::Display for ConstitutionSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "constitution: {} prompts, {} pairs ({} revisions unchanged), critic {}; written to {}",
            self.prompts,
            self.pairs,
            self.unchanged,
            self.critic,
            self.written.display()
        )
    }
}

/// The distinct prompts of the store's conversations (the messages up to a user turn), in
/// conversation order, at most `limit`.
fn stored_prompts(store: &Store, limit: usize) -> Result<Vec<StoredPrompt>> {
    let mut by_prompt: BTreeMap<String, StoredPrompt> = BTreeMap::new();
    store.for_each_record(|r| {
        if r.prompt.last().is_some_and(|m| m.role == "user") {
            let key = serde_json::to_string(&r.prompt)?;
            let candidate = StoredPrompt {
                conversation_id: r.conversation_id,
                prompt: r.prompt,
            };
            // The smallest conversation id keeps each prompt, whatever order records come in.
            match by_prompt.get(&key) {
                Some(have) if have.conversation_id <= candidate.conversation_id => {}
                _ => {
                    by_prompt.insert(key, candidate);
                }
            }
        }
        Ok(())
    })?;
    let mut prompts: Vec<StoredPrompt> = by_prompt.into_values().collect();
    prompts.sort_by(|a, b| {
        (a.conversation_id.as_str(), a.prompt.len())
            .cmp(&(b.conversation_id.as_str(), b.prompt.len()))
    });
    prompts.truncate(limit);
    Ok(prompts)
}

pub async fn constitution_cmd(
    settings: &Settings,
    limit: Option<usize>,
    out: Option<PathBuf>,
) -> Result<ConstitutionSummary> {
    let cs = &settings.constitution;
    let principles = principles::load(&cs.principles)?;
    // The judge (and its key) is checked before the policy is loaded.
    let judge = match (cs.critic, &cs.judge) {
        (CriticKind::Judge, Some(j)) => Some(
            JudgeHandle::open(
                j,
                JUDGE_SECTION,
                &settings.store.dir.join("constitution-judge-model"),
            )
            .await?,
        ),
        (CriticKind::Judge, None) => bail!(
            "`constitution.critic: judge` needs a judge\nhint: set `constitution.judge.url` and `constitution.judge.model`"
        ),
        (CriticKind::Policy, _) => None,
    };
    let store = Store::open(&settings.store.dir)?;
    let prompts = stored_prompts(&store, limit.unwrap_or(cs.limit))?;
    if prompts.is_empty() {
        bail!(
            "the store {} holds no conversation that ends with a user turn\nhint: run `rlhf-bot pull` first",
            settings.store.dir.display()
        );
    }
    let policy_dir = policy_model(settings).await?;
    let device = DeviceChoice::default().open()?;
    let lm = load_lm(&policy_dir, &device)?;
    let (stop, pad) = lm.stop_and_pad();
    let cfg = GenerationConfig::greedy(cs.max_new_tokens, stop, pad);
    let template = lm.template.as_ref();
    let generate = |messages: &[ChatMessage]| -> Result<String> {
        let text = render(template, messages)?;
        let out = generate_from_texts(&lm.model, &lm.tokenizer, std::slice::from_ref(&text), &cfg)?;
        Ok(out.texts.into_iter().next().unwrap_or_default())
    };
    let revisions = {
        let mut answer = |m: &[ChatMessage]| generate(m);
        // The policy as critic answers each request as a one-turn conversation.
        let mut ask_policy = |request: &str| {
            generate(&[ChatMessage {
                role: "user".into(),
                content: request.to_string(),
            }])
        };
        let any_judge = judge.as_ref().map(|j| j.judge(JUDGE_SECTION));
        let mut critic = match &any_judge {
            Some(j) => Critic::Judge(j),
            None => Critic::Policy(&mut ask_policy),
        };
        revise(&prompts, &principles, cs.seed, &mut answer, &mut critic).await?
    };
    let result = ConstitutionPairs {
        principles: principles::fingerprints(&principles),
        critic: cs.critic.as_str().to_string(),
        pairs: revisions.pairs,
    };
    let written = match out {
        Some(file) => {
            let mut bytes = serde_json::to_vec_pretty(&result)?;
            bytes.push(b'\n');
            crate::atomic_file::write_atomically(&file, &bytes)?;
            file
        }
        None => {
            pairs::write(&settings.store.dir, &result)?;
            pairs::current_path(&settings.store.dir)
        }
    };
    Ok(ConstitutionSummary {
        prompts: prompts.len(),
        pairs: result.pairs.len(),
        unchanged: revisions.unchanged,
        critic: cs.critic.as_str(),
        written,
    })
}

/// The policy the policy stage would start from: production, else `policy.model`, else the
/// default model from scratch (under the store directory).
async fn policy_model(settings: &Settings) -> Result<PathBuf> {
    let ps = &settings.policy;
    let scratch = settings.store.dir.join("constitution-model");
    let explicit = localize_opt(ps.production_model.clone()).await?;
    let production = crate::app::baseline::resolve(
        settings,
        ModelKind::Policy,
        explicit.as_deref(),
        "the base model",
        |dir| resolve_model_dir(&dir, &scratch.join("production")),
    )?;
    if let Some(dir) = production.dir {
        return Ok(dir);
    }
    match localize_opt(ps.model.clone()).await? {
        Some(m) => resolve_model_dir(&m, &scratch.join("base")),
        None => default_base_model(&scratch.join("from-scratch"), settings.constitution.seed)
            .context("making the default policy model"),
    }
}
