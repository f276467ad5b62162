//! The judge a stage asks (`constitution`, `rlaif`), built from its config section: the
//! endpoint client (its key read from the environment), or a local llama-family checkpoint
//! (a directory, a `.gguf` file or `hf://`, made local by `model_source`) that answers greedily
//! with our own generation code. Either way the stage sees an [`AnyJudge`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::generate::{LoadedLm, load_lm};
use super::model_source::localize;
use super::policy::{render_prompt, resolve_model_dir};
use crate::evals::judge::{AnyJudge, Judge, JudgeSource, LocalChat};
use crate::feedback::record::ChatMessage;
use crate::model::generate::{GenerationConfig, generate_from_texts};
use crate::train::device::DeviceChoice;

/// A local checkpoint loaded to judge.
pub struct LocalJudgeModel {
    lm: LoadedLm,
    cfg: GenerationConfig,
}

impl LocalChat for LocalJudgeModel {
    fn chat(&self, system: &str, user: &str) -> Result<String> {
        let messages = [
            ChatMessage {
                role: "system".into(),
                content: system.to_string(),
            },
            ChatMessage {
                role: "user".into(),
                content: user.to_string(),
            },
        ];
        let text = render_prompt(self.lm.template.as_ref(), &messages)?;
        let out = generate_from_texts(
            &self.lm.model,
            &self.lm.tokenizer,
            std::slice::from_ref(&text),
            &self.cfg,
        )?;
        Ok(out.texts.into_iter().next().unwrap_or_default())
    }
}

/// What a judge section resolves to before it can be asked: the endpoint client, or the local
/// model (loaded once, asked many times).
pub enum JudgeHandle {
    Endpoint(Judge),
    Local {
        checkpoint: String,
        model: Box<LocalJudgeModel>,
    },
}

impl JudgeHandle {
    /// Builds the judge of `section` (`constitution.judge`, `rlaif.judge`); a GGUF checkpoint is
    /// converted under `scratch` first.
    pub async fn open(source: &JudgeSource, section: &'static str, scratch: &Path) -> Result<Self> {
        match source {
            JudgeSource::Endpoint(settings) => {
                Ok(Self::Endpoint(Judge::new(settings)?.in_section(section)))
            }
            JudgeSource::Checkpoint(local) => {
                let dir = local_dir(&local.checkpoint, scratch)
                    .await
                    .with_context(|| {
                        format!(
                            "loading the local judge {} (`{section}.checkpoint`)",
                            local.checkpoint
                        )
                    })?;
                let device = DeviceChoice::default().open()?;
                let lm = load_lm(&dir, &device).with_context(|| {
                    format!(
                        "loading the local judge {} (`{section}.checkpoint`)\nhint: a llama-family checkpoint directory, a .gguf file or hf://ORG/NAME",
                        local.checkpoint
                    )
                })?;
                let (stop, pad) = lm.stop_and_pad();
                let cfg = GenerationConfig::greedy(local.max_new_tokens, stop, pad);
                Ok(Self::Local {
                    checkpoint: local.checkpoint.clone(),
                    model: Box::new(LocalJudgeModel { lm, cfg }),
                })
            }
        }
    }

    /// The judge to ask, for the config section `section`.
    pub fn judge(&self, section: &'static str) -> AnyJudge<'_> {
        match self {
            JudgeHandle::Endpoint(judge) => AnyJudge::Endpoint(judge.clone()),
            JudgeHandle::Local { checkpoint, model } => AnyJudge::Local {
                checkpoint: checkpoint.clone(),
                section,
                model: model.as_ref(),
            },
        }
    }
}

/// The checkpoint as a local directory: `hf://` downloaded, `.gguf` converted under `scratch`.
async fn local_dir(checkpoint: &str, scratch: &Path) -> Result<PathBuf> {
    let path = localize(Path::new(checkpoint)).await?;
    resolve_model_dir(&path, scratch)
}
