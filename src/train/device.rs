//! Which device a training run uses. `auto` (the default) takes CUDA device 0 when this binary
//! was built with the crate's `cuda` feature and a device answers, and the CPU otherwise; it logs
//! which one it took and why, so a run on a GPU runner that silently trained on the CPU is visible
//! in the log. `cuda` asked for explicitly never falls back: in a CPU-only build (candle built
//! without nvcc, which only GPU runners have) or without a device it is an error with a hint.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// `--device auto|cpu|cuda`, `reward.device`, `policy.device`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}\nhint: use `auto`, `cpu` or `cuda`")]
    Unknown(String),
    #[error(
        "this rlhf-bot was built without CUDA support\nhint: rebuild with `cargo build --release --features cuda` on a machine with nvcc, or pass `--device cpu` (or `auto`)"
    )]
    CudaNotBuilt,
    #[error(
        "cannot open CUDA device 0: {0}\nhint: check `nvidia-smi`, or pass `--device cpu` (or `auto`)"
    )]
    Cuda(String),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The device a choice came to, and why, for the log.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub device: Device,
    pub reason: String,
}

impl Resolved {
    /// `cpu` or `cuda:0`, as [`crate::train::policy_common::PolicyTrainOptions::device`] spells it.
    pub fn name(&self) -> &'static str {
        if self.device.is_cuda() {
            "cuda:0"
        } else {
            "cpu"
        }
    }
}

impl DeviceChoice {
    /// The device named by environment variable `var` (`cpu`, `cuda`, `auto`; unset: the CPU),
    /// opened: how the benchmarks pick theirs (`DEVICE=cuda`).
    pub fn open_from_env(var: &str) -> Result<Device, DeviceError> {
        match std::env::var(var) {
            Ok(name) => name.parse::<Self>()?.open(),
            Err(_) => Self::Cpu.open(),
        }
    }

    /// Opens the device (CUDA device 0 for `cuda`) and logs which one and why.
    pub fn open(self) -> Result<Device, DeviceError> {
        Ok(self.resolve()?.device)
    }

    /// [`Self::open`], keeping the reason.
    pub fn resolve(self) -> Result<Resolved, DeviceError> {
        let resolved = match self {
            Self::Cpu => Resolved {
                device: Device::Cpu,
                reason: "asked for the CPU".into(),
            },
            Self::Cuda => Resolved {
                device: open_cuda()?,
                reason: "asked for CUDA".into(),
            },
            Self::Auto => auto(open_cuda(), gpu_visible()),
        };
        tracing::info!(device = %resolved.name(), choice = %self, reason = %resolved.reason, "device");
        Ok(resolved)
    }
}

/// `auto`: CUDA when it opened, else the CPU with the reason it did not.
fn auto(cuda: Result<Device, DeviceError>, gpu_visible: bool) -> Resolved {
    match cuda {
        Ok(device) => Resolved {
            device,
            reason: "auto: CUDA device 0 answered and this binary has the cuda feature".into(),
        },
        Err(DeviceError::CudaNotBuilt) if gpu_visible => Resolved {
            device: Device::Cpu,
            reason: "auto: an NVIDIA GPU is visible but this binary was built without the cuda feature (rebuild with `--features cuda` to use it)".into(),
        },
        Err(DeviceError::CudaNotBuilt) => Resolved {
            device: Device::Cpu,
            reason: "auto: this binary was built without the cuda feature".into(),
        },
        Err(e) => Resolved {
            device: Device::Cpu,
            reason: format!(
                "auto: no usable CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            ),
        },
    }
}

/// Whether the NVIDIA driver shows a GPU (only used to explain a CPU fallback).
fn gpu_visible() -> bool {
    std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut d| d.next().is_some())
        || std::path::Path::new("/dev/nvidia0").exists()
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device, DeviceError> {
    Device::new_cuda(0).map_err(|e| DeviceError::Cuda(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device, DeviceError> {
    Err(DeviceError::CudaNotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_the_cpu_and_says_why() {
        let r = auto(Err(DeviceError::CudaNotBuilt), false);
        assert!(r.device.is_cpu() && r.reason.contains("without the cuda feature"));
        let r = auto(Err(DeviceError::CudaNotBuilt), true);
        assert!(
            r.device.is_cpu() && r.reason.contains("GPU is visible"),
            "{}",
            r.reason
        );
        let r = auto(Err(DeviceError::Cuda("no device".into())), true);
        assert!(
            r.device.is_cpu() && r.reason.contains("no device"),
            "{}",
            r.reason
        );
        let r = auto(Ok(Device::Cpu), true);
        assert!(r.reason.contains("CUDA device 0 answered"), "{}", r.reason);
        assert_eq!(DeviceChoice::default(), DeviceChoice::Auto);
        assert_eq!("AUTO".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
    }
}
