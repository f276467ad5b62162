//! Which device a training run uses. CPU always works; CUDA needs the crate's `cuda` feature
//! (candle built against nvcc, which only GPU runners have), so asking for it in a CPU-only build
//! is a clear error with a hint instead of a silent fall back to the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// `--device cpu|cuda`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}\nhint: use `cpu` or `cuda`")]
    Unknown(String),
    #[error(
        "this rlhf-bot was built without CUDA support\nhint: rebuild with `cargo build --release --features cuda` on a machine with nvcc, or pass `--device cpu`"
    )]
    CudaNotBuilt,
    #[error("cannot open CUDA device 0: {0}\nhint: check `nvidia-smi`, or pass `--device cpu`")]
    Cuda(String),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

impl DeviceChoice {
    /// Opens the device (CUDA device 0 for `cuda`).
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => open_cuda(),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device, DeviceError> {
    Device::new_cuda(0).map_err(|e| DeviceError::Cuda(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device, DeviceError> {
    Err(DeviceError::CudaNotBuilt)
}
