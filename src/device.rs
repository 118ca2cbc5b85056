//! `--device auto|cpu|cuda|cuda:N`: parsing it and turning it into a
//! `tch::Device`, with an error (never a silent CPU fall-back) when the CUDA
//! device asked for is not there.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use tch::Device;

/// The device a command runs on, as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// `cuda:0` when CUDA is available, else the CPU (the tutorial's choice).
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// The device to use, or an error saying why the requested one is missing.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Auto => Ok(Device::cuda_if_available()),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !tch::Cuda::is_available() {
                    bail!(
                        "--device {self}: CUDA is not available here (no NVIDIA GPU or driver, \
                         or a CPU-only libtorch); use --device cpu"
                    );
                }
                let count = tch::Cuda::device_count() as usize;
                if n >= count {
                    bail!(
                        "--device {self}: no such CUDA device, this machine has {count} \
                         (cuda:0 to cuda:{})",
                        count - 1
                    );
                }
                Ok(Device::Cuda(n))
            }
        }
    }
}

/// libtorch's own default CPU thread count (one per core), as it was before
/// anything changed it; the first call must come before any
/// `tch::set_num_threads`.
pub fn default_threads() -> i32 {
    static DEFAULT: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(tch::get_num_threads)
}

/// The device's name as the summaries print it: `cpu`, `cuda:0`, ...
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Cpu => "cpu".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse(), Ok(DeviceArg::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(
                bad.parse::<DeviceArg>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for d in [DeviceArg::Auto, DeviceArg::Cpu, DeviceArg::Cuda(2)] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
    }

    #[test]
    fn cpu_resolves_and_missing_cuda_is_an_error() {
        assert_eq!(DeviceArg::Cpu.resolve().unwrap(), Device::Cpu);
        if !tch::Cuda::is_available() {
            let err = DeviceArg::Cuda(0).resolve().unwrap_err().to_string();
            assert!(err.contains("CUDA is not available"), "{err}");
        }
        let err = DeviceArg::Cuda(10_000).resolve().unwrap_err().to_string();
        assert!(err.contains("cuda:10000"), "{err}");
    }
}
