//! The serving formats a deployment publishes, by the names scripts and configs use (the same
//! names as `export-model --to`), and which of them apply to which kind of model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model_kind::ModelKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ServingFormat {
    /// Merged weights in Hugging Face layout (a sequence-classification checkpoint or a
    /// sentence-transformers directory for a reward model).
    #[serde(rename = "hf")]
    Hf,
    /// The LoRA adapter as a PEFT directory.
    #[serde(rename = "peft")]
    Peft,
    #[serde(rename = "gguf-f16")]
    GgufF16,
    #[serde(rename = "gguf-q8_0")]
    GgufQ8_0,
    /// The LoRA adapter as llama.cpp's adapter GGUF.
    #[serde(rename = "gguf-lora")]
    GgufLora,
}

impl ServingFormat {
    pub const ALL: [ServingFormat; 5] = [
        Self::Hf,
        Self::Peft,
        Self::GgufF16,
        Self::GgufQ8_0,
        Self::GgufLora,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hf => "hf",
            Self::Peft => "peft",
            Self::GgufF16 => "gguf-f16",
            Self::GgufQ8_0 => "gguf-q8_0",
            Self::GgufLora => "gguf-lora",
        }
    }

    /// A reward model is served only in Hugging Face layout (`hf`); the policy formats (adapter,
    /// GGUF) have no meaning for it.
    pub fn applies_to(self, kind: ModelKind) -> bool {
        match kind {
            ModelKind::Policy => true,
            ModelKind::Reward => self == Self::Hf,
        }
    }
}

impl fmt::Display for ServingFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServingFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown serving format `{s}`\nhint: use one of hf, peft, gguf-f16, gguf-q8_0, gguf-lora"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reward_takes_only_hf() {
        for f in ServingFormat::ALL {
            assert_eq!(f.as_str().parse::<ServingFormat>().unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert!(f.applies_to(ModelKind::Policy));
            assert_eq!(f.applies_to(ModelKind::Reward), f == ServingFormat::Hf);
        }
        assert!(
            "gguf"
                .parse::<ServingFormat>()
                .unwrap_err()
                .contains("hint:")
        );
    }
}
