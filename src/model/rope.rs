//! Rotary position embeddings and their context-extension scalings, as transformers'
//! `modeling_rope_utils.py` defines them: `default`, `linear`, `dynamic` (NTK), `yarn`,
//! `longrope` and `llama3`.
//!
//! A scaling changes two things only: the inverse frequencies (`inv_freq`, one per pair of
//! head dimensions) and a factor that multiplies both `cos` and `sin` (`attention_scaling`,
//! YaRN's and LongRoPE's `attention_factor`). Two of them depend on the length of the
//! sequence being run: `dynamic` grows its base once positions pass `max_position_embeddings`,
//! and `longrope` switches from its short to its long factors once they pass the original
//! context. transformers decides both from `max(position_ids) + 1` of each forward call, and
//! so does [`Rope::inv_freq_for`]: a decode step after a long prompt rotates its new key with
//! the frequencies of its own length while the cached keys keep theirs, exactly as there.
//!
//! transformers computes the frequencies in f32; this port computes them in f64 and rounds
//! the angles, which differs by well under the tests' 1e-4 on logits.

use std::borrow::Cow;
use std::f64::consts::PI;

use serde_json::{Map, Value};

use super::ops::rope_inv_freq as base_inv_freq;

/// The rope types this port computes, for error messages.
pub const SUPPORTED_ROPE_TYPES: &[&str] =
    &["default", "linear", "dynamic", "yarn", "longrope", "llama3"];

/// Why a rope configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RopeError {
    #[error(
        "RoPE type {0:?} is not supported\nhint: supported rope_type values are {SUPPORTED_ROPE_TYPES:?}"
    )]
    UnknownType(String),
    #[error(
        "rope_parameters.{field} is required for rope_type {rope_type:?}\nhint: copy it from the model's original config.json"
    )]
    Missing {
        rope_type: String,
        field: &'static str,
    },
    #[error("rope_parameters.{field} = {value} is invalid for rope_type {rope_type:?}: {why}")]
    Invalid {
        rope_type: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "partial_rotary_factor {0} is not supported\nhint: this port rotates the whole head (factor 1.0)"
    )]
    PartialRotary(f64),
}

/// What the rope computation needs from the model config besides the rope parameters.
#[derive(Debug, Clone, Copy)]
pub struct RopeDims {
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// The base when the parameters name none (family default, or the legacy top-level key).
    pub default_theta: f64,
    /// A top-level `original_max_position_embeddings` (Phi-3 style), which wins over the one in
    /// the parameters, as in transformers' `standardize_rope_params`.
    pub top_level_original_max: Option<usize>,
}

/// The length-dependent part of a scaling.
#[derive(Debug, Clone, PartialEq)]
enum Dynamic {
    /// Frequencies do not depend on the sequence length.
    Fixed,
    /// NTK: the base grows with `seq_len / max_position_embeddings`.
    Ntk {
        theta: f64,
        factor: f64,
        max_positions: usize,
    },
    /// LongRoPE: `long` frequencies past `original_max` positions, the fixed ones below.
    Long { long: Vec<f64>, original_max: usize },
}

/// One resolved rotary embedding: frequencies, the factor on cos/sin, and how the frequencies
/// follow the sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    rope_type: String,
    inv_freq: Vec<f64>,
    attention_scaling: f64,
    dynamic: Dynamic,
    head_dim: usize,
    /// The base the unscaled frequencies come from (`rope_theta`).
    theta: f64,
}

/// YaRN's `get_mscale`: `0.1·mscale·ln(scale) + 1` for scale > 1.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

struct Params<'a> {
    map: &'a Map<String, Value>,
    rope_type: &'a str,
}

impl Params<'_> {
    fn f64_opt(&self, field: &'static str) -> Result<Option<f64>, RopeError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| RopeError::Invalid {
                rope_type: self.rope_type.to_owned(),
                field,
                value: v.to_string(),
                why: "expected a number",
            }),
        }
    }

    fn f64_req(&self, field: &'static str) -> Result<f64, RopeError> {
        self.f64_opt(field)?.ok_or_else(|| RopeError::Missing {
            rope_type: self.rope_type.to_owned(),
            field,
        })
    }

    fn positive(&self, field: &'static str, v: f64) -> Result<f64, RopeError> {
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(RopeError::Invalid {
                rope_type: self.rope_type.to_owned(),
                field,
                value: v.to_string(),
                why: "must be a positive number",
            })
        }
    }

    fn factors(&self, field: &'static str, half: usize) -> Result<Vec<f64>, RopeError> {
        let invalid = |why| RopeError::Invalid {
            rope_type: self.rope_type.to_owned(),
            field,
            value: self
                .map
                .get(field)
                .map(Value::to_string)
                .unwrap_or_default(),
            why,
        };
        let list = match self.map.get(field) {
            None | Some(Value::Null) => {
                return Err(RopeError::Missing {
                    rope_type: self.rope_type.to_owned(),
                    field,
                });
            }
            Some(Value::Array(list)) => list,
            Some(_) => return Err(invalid("expected a list of numbers")),
        };
        let out: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
        match out {
            Some(v) if v.len() == half => Ok(v),
            Some(_) => Err(invalid("must hold head_dim / 2 numbers")),
            None => Err(invalid("expected a list of numbers")),
        }
    }
}

impl Rope {
    /// Resolves one rope parameter dictionary (`rope_type`/`type`, `rope_theta`, `factor`, …).
    pub fn from_params(params: &Map<String, Value>, dims: RopeDims) -> Result<Self, RopeError> {
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let p = Params {
            map: params,
            rope_type: &rope_type,
        };
        if let Some(f) = p.f64_opt("partial_rotary_factor")?
            && f != 1.0
        {
            return Err(RopeError::PartialRotary(f));
        }
        let theta = p.positive(
            "rope_theta",
            p.f64_opt("rope_theta")?.unwrap_or(dims.default_theta),
        )?;
        let d = dims.head_dim;
        let half = d / 2;
        let original_max = || -> Result<usize, RopeError> {
            let v = match dims.top_level_original_max {
                Some(v) => v as f64,
                None => p
                    .f64_opt("original_max_position_embeddings")?
                    .unwrap_or(dims.max_position_embeddings as f64),
            };
            let v = p.positive("original_max_position_embeddings", v)?;
            Ok(v as usize)
        };
        let default = base_inv_freq(d, theta);
        let fixed = |inv_freq: Vec<f64>, attention_scaling: f64| Rope {
            rope_type: rope_type.clone(),
            inv_freq,
            attention_scaling,
            dynamic: Dynamic::Fixed,
            head_dim: d,
            theta,
        };
        let rope = match rope_type.as_str() {
            "default" => fixed(default, 1.0),
            "linear" => {
                let factor = p.positive("factor", p.f64_req("factor")?)?;
                fixed(default.iter().map(|f| f / factor).collect(), 1.0)
            }
            "dynamic" => {
                let factor = p.positive("factor", p.f64_req("factor")?)?;
                Rope {
                    dynamic: Dynamic::Ntk {
                        theta,
                        factor,
                        max_positions: dims.max_position_embeddings.max(1),
                    },
                    ..fixed(default, 1.0)
                }
            }
            "llama3" => {
                let factor = p.positive("factor", p.f64_req("factor")?)?;
                let low = p.positive("low_freq_factor", p.f64_req("low_freq_factor")?)?;
                let high = p.positive("high_freq_factor", p.f64_req("high_freq_factor")?)?;
                if high <= low {
                    return Err(RopeError::Invalid {
                        rope_type: rope_type.clone(),
                        field: "high_freq_factor",
                        value: high.to_string(),
                        why: "must be greater than low_freq_factor",
                    });
                }
                let old_context = original_max()? as f64;
                let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
                let inv_freq = default
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            // Between the two: interpolate, so the spectrum has no step.
                            let smooth = (old_context / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                fixed(inv_freq, 1.0)
            }
            "yarn" => Self::yarn(&p, theta, d, original_max()?, dims)?,
            "longrope" => {
                let original = original_max()?;
                let short = p.factors("short_factor", half)?;
                let long = p.factors("long_factor", half)?;
                let factor = p
                    .f64_opt("factor")?
                    .unwrap_or(dims.max_position_embeddings as f64 / original as f64);
                let attention_scaling = match p.f64_opt("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                let scaled = |ext: &[f64]| -> Vec<f64> {
                    default.iter().zip(ext).map(|(f, e)| f / e).collect()
                };
                Rope {
                    dynamic: Dynamic::Long {
                        long: scaled(&long),
                        original_max: original,
                    },
                    ..fixed(scaled(&short), attention_scaling)
                }
            }
            other => return Err(RopeError::UnknownType(other.to_owned())),
        };
        Ok(rope)
    }

    fn yarn(
        p: &Params,
        theta: f64,
        d: usize,
        original_max: usize,
        dims: RopeDims,
    ) -> Result<Self, RopeError> {
        let factor = match p.f64_opt("factor")? {
            Some(f) => f,
            None => dims.max_position_embeddings as f64 / original_max as f64,
        };
        let factor = p.positive("factor", factor)?;
        let attention_scaling = match p.f64_opt("attention_factor")? {
            Some(a) => a,
            None => {
                let mscale = p.f64_opt("mscale")?.filter(|m| *m != 0.0);
                let mscale_all = p.f64_opt("mscale_all_dim")?.filter(|m| *m != 0.0);
                match (mscale, mscale_all) {
                    (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                    _ => yarn_mscale(factor, 1.0),
                }
            }
        };
        // transformers treats 0 like "unset" here (`or 32`, `or 1`).
        let beta_fast = p
            .f64_opt("beta_fast")?
            .filter(|b| *b != 0.0)
            .unwrap_or(32.0);
        let beta_slow = p.f64_opt("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0);
        let truncate = p
            .map
            .get("truncate")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let dim = d as f64;
        // The dimension whose wavelength makes `rotations` turns over the original context.
        let correction_dim = |rotations: f64| {
            dim * (original_max as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
        if truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(dim - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = base_inv_freq(d, theta)
            .into_iter()
            .enumerate()
            .map(|(i, extrapolated)| {
                let interpolated = extrapolated / factor;
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                // High-frequency dimensions keep their frequency, low ones are interpolated.
                let keep = 1.0 - ramp;
                interpolated * (1.0 - keep) + extrapolated * keep
            })
            .collect();
        Ok(Rope {
            rope_type: p.rope_type.to_owned(),
            inv_freq,
            attention_scaling,
            dynamic: Dynamic::Fixed,
            head_dim: d,
            theta,
        })
    }

    /// The plain rotary embedding with base `theta` (random-init models, tests).
    pub fn default_with_theta(head_dim: usize, theta: f64) -> Self {
        Rope {
            rope_type: "default".into(),
            inv_freq: base_inv_freq(head_dim, theta),
            attention_scaling: 1.0,
            dynamic: Dynamic::Fixed,
            head_dim,
            theta,
        }
    }

    /// The `rope_type` this was resolved from.
    pub fn rope_type(&self) -> &str {
        &self.rope_type
    }

    /// The RoPE base (`rope_theta`) before any scaling.
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The factor on `cos` and `sin` (1 except for YaRN and LongRoPE).
    pub fn attention_scaling(&self) -> f64 {
        self.attention_scaling
    }

    /// Inverse frequencies for a forward call whose largest position is `seq_len - 1`.
    pub fn inv_freq_for(&self, seq_len: usize) -> Cow<'_, [f64]> {
        match &self.dynamic {
            Dynamic::Fixed => Cow::Borrowed(&self.inv_freq),
            Dynamic::Ntk {
                theta,
                factor,
                max_positions,
            } => {
                if seq_len <= *max_positions {
                    return Cow::Borrowed(&self.inv_freq);
                }
                let d = self.head_dim as f64;
                let ratio = factor * seq_len as f64 / *max_positions as f64 - (factor - 1.0);
                let base = theta * ratio.powf(d / (d - 2.0));
                Cow::Owned(base_inv_freq(self.head_dim, base))
            }
            Dynamic::Long { long, original_max } => {
                if seq_len > *original_max {
                    Cow::Borrowed(long)
                } else {
                    Cow::Borrowed(&self.inv_freq)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> RopeDims {
        RopeDims {
            head_dim: 16,
            max_position_embeddings: 64,
            default_theta: 10_000.0,
            top_level_original_max: None,
        }
    }

    fn rope(json: &str) -> Result<Rope, RopeError> {
        let v: Value = serde_json::from_str(json).unwrap();
        Rope::from_params(v.as_object().unwrap(), dims())
    }

    #[test]
    fn linear_divides_every_frequency_by_the_factor() {
        let base = rope(r#"{"rope_type":"default"}"#).unwrap();
        let lin = rope(r#"{"rope_type":"linear","factor":4.0}"#).unwrap();
        for (a, b) in base.inv_freq_for(1).iter().zip(lin.inv_freq_for(1).iter()) {
            assert!((a / 4.0 - b).abs() < 1e-15);
        }
    }

    #[test]
    fn dynamic_changes_nothing_inside_the_context_and_lowers_frequencies_beyond() {
        let r = rope(r#"{"rope_type":"dynamic","factor":2.0}"#).unwrap();
        let base = base_inv_freq(16, 10_000.0);
        assert_eq!(r.inv_freq_for(64).as_ref(), base.as_slice());
        let long = r.inv_freq_for(128);
        assert_eq!(long[0], 1.0);
        assert!(long[1..].iter().zip(&base[1..]).all(|(l, b)| l < b));
    }

    #[test]
    fn longrope_switches_to_long_factors_past_the_original_context() {
        let short = vec![1.0; 8];
        let long = vec![2.0; 8];
        let json = serde_json::json!({"rope_type":"longrope","short_factor":short,
            "long_factor":long,"original_max_position_embeddings":32});
        let r = Rope::from_params(json.as_object().unwrap(), dims()).unwrap();
        assert_eq!(r.inv_freq_for(32)[1], base_inv_freq(16, 10_000.0)[1]);
        assert_eq!(r.inv_freq_for(33)[1], base_inv_freq(16, 10_000.0)[1] / 2.0);
        // factor = 64 / 32 = 2: sqrt(1 + ln 2 / ln 32).
        assert!((r.attention_scaling() - (1.0 + 2f64.ln() / 32f64.ln()).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn missing_and_unknown_parameters_are_named() {
        let err = rope(r#"{"rope_type":"llama3","factor":8.0}"#).unwrap_err();
        assert!(err.to_string().contains("low_freq_factor"), "{err}");
        let err = rope(r#"{"rope_type":"su"}"#).unwrap_err();
        assert!(err.to_string().contains("\"su\""), "{err}");
        let err = rope(r#"{"rope_type":"longrope","short_factor":[1.0],"long_factor":[1.0]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("short_factor"), "{err}");
    }
}
