//! The precision of the big matrix products on the CPU, one setting per process: the linear
//! layers' forward, input-gradient and weight-gradient products (`linear`, the fused BERT layer
//! in `layer`, the decoder's `matmul_wt`). Attention's small per-head products and the LM head's
//! log-softmax inputs always stay in f32.
//!
//! `f32` (the default) multiplies in f32. `bf16` rounds each product's inputs to bf16 and
//! accumulates in f32 ([`super::bf16_gemm`]); weights, gradients and the optimiser stay f32.
//! Settings name a [`PrecisionChoice`]; [`PrecisionChoice::resolve`] checks it against the CPU
//! and [`set_precision`] switches the kernels once, before training starts.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::bf16_gemm;
use super::sgemm::sgemm_threads;

/// The precision the big products run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a config asks for: a precision, or `auto` (bf16 where the CPU has AVX512_BF16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    #[default]
    F32,
    Bf16,
    Auto,
}

/// A precision this CPU cannot run, or a name that is none.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error(
        "{key}: bf16 needs a CPU with AVX512_BF16 (the `avx512bf16` feature), which this machine \
         lacks\nhint: set {key} to f32, or to auto to use bf16 only where the CPU has it"
    )]
    Unsupported { key: &'static str },
    #[error("unknown precision {0:?}\nhint: f32, bf16 or auto")]
    Unknown(String),
}

impl PrecisionChoice {
    /// The precision to run on this CPU; `key` (`reward.precision`) names the setting in errors.
    pub fn resolve(self, key: &'static str) -> Result<Precision, PrecisionError> {
        match self {
            Self::F32 => Ok(Precision::F32),
            Self::Bf16 if bf16_gemm::supported() => Ok(Precision::Bf16),
            Self::Bf16 => Err(PrecisionError::Unsupported { key }),
            Self::Auto if bf16_gemm::supported() => Ok(Precision::Bf16),
            Self::Auto => Ok(Precision::F32),
        }
    }
}

impl PrecisionChoice {
    /// [`Self::resolve`] for a run on `cpu` or an accelerator: off the CPU, `bf16` runs as
    /// candle's bf16 dtype (every CUDA GPU candle supports computes it) and `auto` stays f32,
    /// since older GPUs (T4, compute capability 7.5) emulate bf16 slowly.
    pub fn resolve_on(self, key: &'static str, cpu: bool) -> Result<Precision, PrecisionError> {
        match (cpu, self) {
            (true, _) => self.resolve(key),
            (false, Self::Bf16) => Ok(Precision::Bf16),
            (false, Self::F32 | Self::Auto) => Ok(Precision::F32),
        }
    }
}

impl FromStr for PrecisionChoice {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "auto" => Ok(Self::Auto),
            _ => Err(PrecisionError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Auto => "auto",
        })
    }
}

/// Whether the big products run in bf16; only [`set_precision`] sets it, after checking the CPU.
static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Switches the big products of this process to `precision` (a resolved choice, so bf16 is
/// known to run here).
pub fn set_precision(precision: Precision) {
    BF16_PRODUCTS.store(precision == Precision::Bf16, Ordering::Relaxed);
}

/// The precision the big products run in now.
pub fn precision() -> Precision {
    if BF16_PRODUCTS.load(Ordering::Relaxed) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// [`sgemm_threads`] in the process's precision: the entry point of every big product.
#[allow(clippy::too_many_arguments)]
pub(super) fn projection_gemm(
    shape: (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    scale: f32,
    threads: usize,
) {
    let gemm = match precision() {
        Precision::F32 => sgemm_threads,
        Precision::Bf16 => bf16_gemm::bf16_gemm_threads,
    };
    gemm(
        shape,
        dst,
        dst_strides,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        scale,
        threads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve_against_the_cpu() {
        assert_eq!(
            "BF16".parse::<PrecisionChoice>().unwrap(),
            PrecisionChoice::Bf16
        );
        let err = "fp8".parse::<PrecisionChoice>().unwrap_err().to_string();
        assert!(err.contains("\"fp8\"") && err.contains("hint"), "{err}");
        assert_eq!(
            PrecisionChoice::F32.resolve("reward.precision").unwrap(),
            Precision::F32
        );
        let auto = PrecisionChoice::Auto.resolve("reward.precision").unwrap();
        let bf16 = PrecisionChoice::Bf16.resolve("reward.precision");
        if bf16_gemm::supported() {
            assert_eq!(auto, Precision::Bf16);
            assert_eq!(bf16.unwrap(), Precision::Bf16);
        } else {
            assert_eq!(auto, Precision::F32);
            let msg = bf16.unwrap_err().to_string();
            assert!(
                msg.contains("reward.precision") && msg.contains("avx512bf16"),
                "{msg}"
            );
        }
    }
}
