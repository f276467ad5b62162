//! The model families the one decoder in [`super::llama`] runs, and what tells them apart.
//!
//! Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 are all pre-norm decoders with RoPE,
//! grouped KV heads and a gated feed-forward; they differ in switches, not in structure. This
//! module owns those switches as facts about each family (which `model_type` and class names
//! it has, its defaults for keys a config may omit, whether it has q/k norms, sandwich norms,
//! a scaled embedding, soft-capping, sliding layers), so the decoder reads a switch instead of
//! naming a family. A family that needs a different block would get its own file instead.

use std::fmt;

/// A supported decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
}

/// The `architectures` values this port loads (causal LM and reward/classifier heads).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "MistralForCausalLM",
    "MistralForSequenceClassification",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
    "Qwen3ForCausalLM",
    "Qwen3ForSequenceClassification",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma3ForCausalLM",
    "Gemma3TextForSequenceClassification",
];

/// The `model_type` values this port loads.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
];

/// Why a config names no family this port runs.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    #[error(
        "architecture {0:?} is not supported\nhint: supported architectures are {SUPPORTED_ARCHITECTURES:?}"
    )]
    Architecture(String),
    #[error(
        "model_type {0:?} is not supported\nhint: supported model types are {SUPPORTED_MODEL_TYPES:?}"
    )]
    ModelType(String),
    #[error(
        "model_type \"gemma3\" is the multimodal Gemma 3 (weights under language_model.*)\nhint: load a text-only Gemma 3 checkpoint (model_type \"gemma3_text\", Gemma3ForCausalLM)"
    )]
    Gemma3Multimodal,
}

impl Family {
    /// The family of a config: its `model_type`, else its first architecture, else Llama (the
    /// configs this crate wrote before families existed name neither).
    pub fn resolve(
        model_type: Option<&str>,
        architectures: &[String],
    ) -> Result<Self, FamilyError> {
        for arch in architectures {
            if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
                return Err(FamilyError::Architecture(arch.clone()));
            }
        }
        match model_type {
            Some(t) => Self::from_model_type(t),
            None => Ok(architectures
                .first()
                .and_then(|a| {
                    Self::ALL
                        .into_iter()
                        .find(|f| a.starts_with(f.class_prefix()))
                })
                .unwrap_or(Family::Llama)),
        }
    }

    const ALL: [Family; 6] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
    ];

    fn from_model_type(t: &str) -> Result<Self, FamilyError> {
        match t {
            "llama" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            "gemma2" => Ok(Family::Gemma2),
            "gemma3_text" => Ok(Family::Gemma3),
            "gemma3" => Err(FamilyError::Gemma3Multimodal),
            other => Err(FamilyError::ModelType(other.to_owned())),
        }
    }

    fn class_prefix(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
            Family::Qwen3 => "Qwen3",
            Family::Gemma2 => "Gemma2",
            Family::Gemma3 => "Gemma3",
        }
    }

    /// transformers' causal-LM class.
    pub fn causal_lm_class(self) -> String {
        format!("{}ForCausalLM", self.class_prefix())
    }

    /// transformers' sequence-classification class (Gemma 3's text model has its own name).
    pub fn classifier_class(self) -> String {
        match self {
            Family::Gemma3 => "Gemma3TextForSequenceClassification".into(),
            f => format!("{}ForSequenceClassification", f.class_prefix()),
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// RMSNorm scales by `1 + w` (weights stored as offsets from 1, initialised at 0).
    pub fn norm_unit_offset(self) -> bool {
        self.is_gemma()
    }

    /// Embeddings are multiplied by √hidden before the first layer.
    pub fn scales_embedding(self) -> bool {
        self.is_gemma()
    }

    /// Norms after attention and around the feed-forward (Gemma's "sandwich" layout).
    pub fn sandwich_norms(self) -> bool {
        self.is_gemma()
    }

    /// RMSNorm on each query and key head before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Gemma3)
    }

    /// Qwen2 always has q/k/v biases (its config has no `attention_bias` key) and no o_proj bias.
    pub fn always_qkv_bias(self) -> bool {
        self == Family::Qwen2
    }

    /// transformers applies `attn_logit_softcapping` in Gemma 2 only (Gemma 3 keeps the key
    /// but its attention ignores it).
    pub fn applies_attention_softcap(self) -> bool {
        self == Family::Gemma2
    }

    /// The class default of `head_dim` when the config omits it (None: hidden / heads).
    pub fn default_head_dim(self) -> Option<usize> {
        match self {
            Family::Gemma2 | Family::Gemma3 => Some(256),
            Family::Qwen3 => Some(128),
            _ => None,
        }
    }

    /// The class default of the feed-forward activation when the config names none.
    pub fn default_activation(self) -> &'static str {
        if self.is_gemma() {
            "gelu_pytorch_tanh"
        } else {
            "silu"
        }
    }

    /// The RoPE base when the config names none (Gemma 3: 1e6 global, 1e4 local).
    pub fn default_theta(self, sliding: bool) -> f64 {
        match (self, sliding) {
            (Family::Gemma3, false) => 1_000_000.0,
            _ => 10_000.0,
        }
    }

    /// Whether layer `i` is a sliding-window layer when the config has no `layer_types`.
    pub fn default_layer_is_sliding(
        self,
        i: usize,
        max_window_layers: usize,
        pattern: usize,
    ) -> bool {
        match self {
            Family::Llama => false,
            Family::Mistral => true,
            Family::Qwen2 | Family::Qwen3 => i >= max_window_layers,
            Family::Gemma2 => i.is_multiple_of(2),
            Family::Gemma3 => !(i + 1).is_multiple_of(pattern.max(1)),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.class_prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_resolve_from_model_type_or_architecture() {
        assert_eq!(Family::resolve(Some("qwen3"), &[]).unwrap(), Family::Qwen3);
        assert_eq!(
            Family::resolve(None, &["Gemma2ForCausalLM".into()]).unwrap(),
            Family::Gemma2
        );
        assert_eq!(Family::resolve(None, &[]).unwrap(), Family::Llama);
        let err = Family::resolve(Some("llama"), &["PhiForCausalLM".into()]).unwrap_err();
        assert!(err.to_string().contains("PhiForCausalLM"), "{err}");
        assert!(err.to_string().contains("Qwen3ForCausalLM"), "{err}");
        let err = Family::resolve(Some("phi3"), &[]).unwrap_err();
        assert!(err.to_string().contains("\"phi3\""), "{err}");
    }

    #[test]
    fn gemma_layer_patterns_follow_transformers() {
        let g2: Vec<bool> = (0..4)
            .map(|i| Family::Gemma2.default_layer_is_sliding(i, 0, 6))
            .collect();
        assert_eq!(g2, [true, false, true, false]);
        let g3: Vec<bool> = (0..6)
            .map(|i| Family::Gemma3.default_layer_is_sliding(i, 0, 6))
            .collect();
        assert_eq!(g3, [true, true, true, true, true, false]);
    }
}
