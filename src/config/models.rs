//! Where the real models live. `scripts/fetch-models.sh` unpacks all-MiniLM-L6-v2 and
//! SmolLM2-135M-Instruct into `$RLHF_MODELS_DIR` (default `~/.cache/rlhf-bot/models`), outside the
//! repository, so a config cannot name them by a fixed path. A model path in the config
//! (`reward.model`, `policy.model`, `policy.production_model`) may therefore start with
//! `$RLHF_MODELS_DIR/`, which is replaced by that directory; no other variable is expanded, so a
//! config can never pull a secret out of the environment into a path that gets printed.
//!
//! A model key may also name a Hugging Face Hub model, `hf://ORG/NAME[@REVISION]`: the reference
//! is checked here (so a typo fails at `config check`, naming the key) and kept as written; the
//! stage that reads the model downloads it (`app::model_source`, `crate::hub`).

use std::path::{Path, PathBuf};

use super::Invalid;
use crate::hub::HubModelRef;

/// The variable the fetch script, the tests and the configs share.
pub const MODELS_DIR_VAR: &str = "RLHF_MODELS_DIR";

/// The default of [`MODELS_DIR_VAR`] under `$HOME` (as in scripts/fetch-models.sh).
pub const DEFAULT_MODELS_SUBDIR: &str = ".cache/rlhf-bot/models";

const PREFIX: &str = "$RLHF_MODELS_DIR";

/// `$RLHF_MODELS_DIR`, else `$HOME/.cache/rlhf-bot/models`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os(MODELS_DIR_VAR) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(DEFAULT_MODELS_SUBDIR)
        }
    }
}

/// A config model path with a leading `$RLHF_MODELS_DIR` (alone or followed by `/`) replaced.
pub fn expand(value: &str) -> PathBuf {
    match value.strip_prefix(PREFIX) {
        Some("") => models_dir(),
        Some(rest) if rest.starts_with('/') => models_dir().join(rest.trim_start_matches('/')),
        _ => PathBuf::from(value),
    }
}

/// A config model value (`key` names it in errors): an `hf://` reference checked and kept as
/// written, or a local path through [`expand`].
pub fn model_path(key: &str, value: &str) -> Result<PathBuf, Invalid> {
    match HubModelRef::from_value(value) {
        Some(Err(why)) => Err(Invalid::new(
            key,
            format!("{why}\nhint: name a Hub model as hf://ORG/NAME or hf://ORG/NAME@REVISION"),
        )),
        Some(Ok(_)) => Ok(PathBuf::from(value)),
        None => Ok(expand(value)),
    }
}

/// The hint for a model path that does not exist: the fetch script when the path is in the
/// models directory (it is what fills it), else a plain pointer at the key.
pub fn missing_hint(path: &Path) -> String {
    if path.starts_with(models_dir()) {
        format!(
            "run scripts/fetch-models.sh first: it downloads the small real models into ${MODELS_DIR_VAR} ({})",
            models_dir().display()
        )
    } else {
        "point the key at a local Hugging Face model directory (or a .gguf file for the policy), or remove it to use a tiny model built from scratch".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_leading_models_dir_is_expanded() {
        let dir = models_dir();
        assert_eq!(expand("$RLHF_MODELS_DIR/a/b.gguf"), dir.join("a/b.gguf"));
        assert_eq!(expand("$RLHF_MODELS_DIR"), dir);
        assert_eq!(
            expand("models/$RLHF_MODELS_DIR"),
            PathBuf::from("models/$RLHF_MODELS_DIR")
        );
        assert_eq!(
            expand("$RLHF_MODELS_DIRX/a"),
            PathBuf::from("$RLHF_MODELS_DIRX/a")
        );
        assert_eq!(expand("$HOME/a"), PathBuf::from("$HOME/a"));
        assert!(missing_hint(&dir.join("x")).contains("scripts/fetch-models.sh"));
        assert!(!missing_hint(Path::new("/nowhere/x")).contains("fetch-models"));
    }

    #[test]
    fn hub_references_are_checked_and_kept() {
        assert_eq!(
            model_path(
                "policy.model",
                "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"
            )
            .unwrap(),
            PathBuf::from("hf://HuggingFaceTB/SmolLM2-135M-Instruct@main")
        );
        assert_eq!(
            model_path("reward.model", "$RLHF_MODELS_DIR/x").unwrap(),
            models_dir().join("x")
        );
        let err = model_path("reward.model", "hf://only-a-name").unwrap_err();
        assert_eq!(err.key_path, "reward.model");
        assert!(err.message.contains("hf://ORG/NAME"), "{}", err.message);
    }
}
