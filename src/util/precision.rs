//! `--precision`: the number format the fast recipes' forward passes run
//! in, and libtorch's autocast that gives it, for the CPU as well as CUDA
//! (`csrc/autocast.cpp`; tch's own `autocast` knows CUDA's only).
//!
//! Under autocast, as under `torch.autocast`, convolutions and matrix
//! products run in the lower precision while the weights, BatchNorm, the
//! loss, the gradients the optimizers see and everything saved stay
//! float32.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// A forward pass's precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout.
    Fp32,
    /// bfloat16 autocast: native on CPUs with AVX512-BF16 or AMX, and on GPUs.
    Bf16,
    /// float16 autocast, on CUDA only.
    Fp16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// The fast recipes' default on `device`: float16 on CUDA (airbench's
    /// own), bfloat16 on a CPU that multiplies it natively, else float32
    /// (emulated bfloat16 is slower than float32).
    pub fn default_for(device: Device) -> Precision {
        if device.is_cuda() {
            Precision::Fp16
        } else if native_bf16().is_some() {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }

    /// What runs did before there was a choice, and what `evaluate` does:
    /// float16 on CUDA, float32 elsewhere.
    pub fn legacy(device: Device) -> Precision {
        if device.is_cuda() {
            Precision::Fp16
        } else {
            Precision::Fp32
        }
    }

    /// An error that says what to use instead, for a precision `device`
    /// cannot run.
    pub fn check(self, device: Device) -> Result<()> {
        if self == Precision::Fp16 && !device.is_cuda() {
            bail!(
                "--precision fp16 runs on CUDA only; on the CPU use bf16 (native here: {}) or fp32",
                match native_bf16() {
                    Some(unit) => format!("yes, {unit}"),
                    None => "no, emulated and slower than fp32".into(),
                }
            );
        }
        Ok(())
    }

    /// `f` under autocast in this precision on `device` (no autocast for
    /// fp32), like Python's `with torch.autocast(device.type, dtype):`.
    pub fn autocast<T>(self, device: Device, f: impl FnOnce() -> T) -> T {
        match self {
            Precision::Fp32 => f(),
            // tch's own, which runs CUDA's in its default float16.
            Precision::Fp16 if device.is_cuda() => tch::autocast(true, f),
            Precision::Fp16 | Precision::Bf16 => {
                let _region = Region::enter(device.is_cuda(), self == Precision::Bf16);
                f()
            }
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPU's native bfloat16 unit, if it has one: `AMX` or `AVX512-BF16`.
pub fn native_bf16() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 7, sub-leaf 0, EDX bit 22: AMX-BF16. (std's feature
        // detection for AMX is not stable.)
        let amx = std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 22) != 0;
        if amx {
            return Some("AMX");
        }
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            return Some("AVX512-BF16");
        }
    }
    None
}

extern "C" {
    // csrc/autocast.cpp
    fn tch_cifar_autocast_enter(
        cuda: bool,
        bf16: bool,
        was_enabled: *mut bool,
        was_dtype: *mut i32,
    );
    fn tch_cifar_autocast_exit(cuda: bool, was_enabled: bool, was_dtype: i32);
}

/// An autocast region, left when dropped (a panic included).
struct Region {
    cuda: bool,
    was_enabled: bool,
    was_dtype: i32,
}

impl Region {
    fn enter(cuda: bool, bf16: bool) -> Region {
        let (mut was_enabled, mut was_dtype) = (false, 0);
        // SAFETY: both pointers are to live locals; the call only writes them.
        unsafe { tch_cifar_autocast_enter(cuda, bf16, &mut was_enabled, &mut was_dtype) };
        Region {
            cuda,
            was_enabled,
            was_dtype,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: restores what enter read, on the same thread.
        unsafe { tch_cifar_autocast_exit(self.cuda, self.was_enabled, self.was_dtype) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn bf16_autocast_runs_convolutions_in_bfloat16_and_ends_with_its_region() {
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = || x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let inside = Precision::Bf16.autocast(Device::Cpu, conv);
        assert_eq!(inside.kind(), Kind::BFloat16);
        // Nested regions, and afterwards float32 again.
        let nested = Precision::Bf16.autocast(Device::Cpu, || {
            let _ = Precision::Bf16.autocast(Device::Cpu, conv);
            conv()
        });
        assert_eq!(nested.kind(), Kind::BFloat16);
        assert_eq!(conv().kind(), Kind::Float);
        assert_eq!(
            Precision::Fp32.autocast(Device::Cpu, conv).kind(),
            Kind::Float
        );
        // The same numbers as the convolution of the inputs rounded to bfloat16.
        let rounded = x.to_kind(Kind::BFloat16).conv2d(
            &w.to_kind(Kind::BFloat16),
            None::<Tensor>,
            [1, 1],
            [1, 1],
            [1, 1],
            1,
        );
        assert_eq!(inside, rounded);
    }

    #[test]
    fn fp16_is_refused_on_the_cpu_with_the_alternatives() {
        let err = Precision::Fp16.check(Device::Cpu).unwrap_err().to_string();
        assert!(
            err.starts_with("--precision fp16 runs on CUDA only"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        Precision::Bf16.check(Device::Cpu).unwrap();
        Precision::Fp32.check(Device::Cpu).unwrap();
        assert_eq!(Precision::legacy(Device::Cpu), Precision::Fp32);
        assert_eq!(Precision::default_for(Device::Cuda(0)), Precision::Fp16);
    }
}
