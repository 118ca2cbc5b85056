//! Where and how libtorch runs the work: `--device auto|cpu|cuda|cuda:N`
//! turned into a `tch::Device`, with an error (never a silent CPU fall-back)
//! when the CUDA device asked for is not there; and the process-wide CPU
//! settings that training changes (thread count, `--cpu-conv`), set by a
//! guard that puts libtorch's defaults back for evaluation.

use std::ffi::CStr;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

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
    /// The device to use, or an error saying why the requested one is
    /// missing. For anything but `cpu` it first loads libtorch's CUDA half
    /// (see [`cuda_support`]), so it must come before any other libtorch call.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            // Without NVIDIA's driver there is no GPU to find, and loading
            // libtorch_cuda.so would only cost its memory.
            Self::Auto if !nvidia_driver_present() => Ok(Device::Cpu),
            Self::Auto => Ok(if cuda_support().is_ok() {
                Device::cuda_if_available()
            } else {
                Device::Cpu
            }),
            Self::Cuda(n) => {
                if let Err(why) = cuda_support() {
                    bail!(
                        "--device {self}: this libtorch cannot use CUDA ({why}); use --device cpu"
                    );
                }
                if !tch::Cuda::is_available() {
                    bail!(
                        "--device {self}: CUDA is not available here (no NVIDIA GPU or driver \
                         found); use --device cpu"
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

/// Loads `libtorch_cuda.so`, once, and says whether libtorch can now use
/// CUDA. The binary does not link it: on a CPU run it would only add about
/// 350 MB of resident memory. Its static initializers register libtorch's
/// CUDA hooks, and libtorch looks those up once and keeps the answer, so
/// this must run before anything else asks about CUDA (`tch::manual_seed`
/// does); [`DeviceArg::resolve`] comes first in every command.
pub fn cuda_support() -> Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            // Found like the other libtorch libraries: LD_LIBRARY_PATH, then
            // the binary's RUNPATH (build.rs). Never closed.
            if dlopen(c"libtorch_cuda.so", libc::RTLD_NOW | libc::RTLD_GLOBAL).is_null() {
                return Err(dlerror());
            }
            if !tch::utils::has_cudart() {
                return Err(
                    "libtorch_cuda.so was loaded after libtorch had looked for CUDA; \
                            this is a tch-cifar bug"
                        .into(),
                );
            }
            Ok(())
        })
        .clone()
}

/// Whether NVIDIA's driver library is installed (a cheap test, unlike
/// loading libtorch_cuda.so).
fn nvidia_driver_present() -> bool {
    !dlopen(c"libcuda.so.1", libc::RTLD_LAZY | libc::RTLD_LOCAL).is_null()
}

fn dlopen(name: &CStr, flags: libc::c_int) -> *mut libc::c_void {
    // SAFETY: `name` is NUL-terminated; the handle is only compared to null.
    unsafe { libc::dlopen(name.as_ptr(), flags) }
}

/// The reason for the last failed `dlopen`.
fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string that stays
    // valid until the next dl* call on this thread; it is copied at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "dlopen failed".into()
    } else {
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

/// libtorch's own default CPU thread count (one per core), as it was before
/// anything changed it; the first call must come before any
/// `tch::set_num_threads`.
pub fn default_threads() -> i32 {
    static DEFAULT: OnceLock<i32> = OnceLock::new();
    *DEFAULT.get_or_init(tch::get_num_threads)
}

/// `--cpu-conv`: the kernel behind CPU convolutions while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuConv {
    /// im2col at batch sizes up to 4 on one thread, else onednn.
    #[default]
    Auto,
    /// oneDNN, libtorch's default (`torch.backends.mkldnn.enabled = True`).
    Onednn,
    /// ATen's im2col + GEMM kernel, what PyTorch runs with
    /// `torch.backends.mkldnn.enabled = False`.
    Im2col,
}

impl CpuConv {
    /// The kernel `Auto` stands for. oneDNN spends more per call on setting a
    /// convolution up than a 4-image convolution costs, so there ATen's own
    /// kernel makes the whole training step about 10 % faster; from 8 images
    /// on, or with 2 threads, oneDNN wins (`examples/step_profile.rs`).
    pub fn resolve(self, batch_size: u64, threads: i32) -> CpuConv {
        match self {
            Self::Auto if batch_size <= 4 && threads == 1 => Self::Im2col,
            Self::Auto => Self::Onednn,
            chosen => chosen,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Onednn => "onednn",
            Self::Im2col => "im2col",
        }
    }
}

impl fmt::Display for CpuConv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

extern "C" {
    // csrc/aten_context.cpp
    fn tch_cifar_set_mkldnn_enabled(enabled: bool);
    fn tch_cifar_mkldnn_enabled() -> bool;
}

/// Whether libtorch sends CPU convolutions to oneDNN (`torch.backends.mkldnn.enabled`).
pub fn mkldnn_enabled() -> bool {
    // SAFETY: reads a flag of libtorch's global context; no arguments.
    unsafe { tch_cifar_mkldnn_enabled() }
}

fn set_mkldnn_enabled(enabled: bool) {
    // SAFETY: sets a flag of libtorch's global context, which libtorch reads
    // when it picks a convolution kernel; no pointers cross.
    unsafe { tch_cifar_set_mkldnn_enabled(enabled) }
}

/// libtorch's CPU settings for a training run, applied by [`CpuSettings::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSettings {
    pub threads: i32,
    /// Resolved: never `Auto`.
    pub conv: CpuConv,
}

/// Holds [`CpuSettings`] in force; dropping it restores libtorch's defaults
/// (one thread per core, oneDNN), which evaluation uses so that its logits
/// match PyTorch's bit for bit.
#[must_use = "the settings are undone when the guard is dropped"]
#[derive(Debug)]
pub struct CpuSettingsGuard(());

impl CpuSettings {
    pub fn apply(self) -> CpuSettingsGuard {
        // Read the default before changing it.
        default_threads();
        tch::set_num_threads(self.threads);
        set_mkldnn_enabled(self.conv != CpuConv::Im2col);
        CpuSettingsGuard(())
    }
}

impl Drop for CpuSettingsGuard {
    fn drop(&mut self) {
        tch::set_num_threads(default_threads());
        set_mkldnn_enabled(true);
    }
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

    // Whether CUDA works in this process depends on which test touched
    // libtorch first (see `cuda_support`), so the CUDA cases are checked
    // through the binary, in tests/errors.rs.
    #[test]
    fn cpu_resolves_and_a_missing_cuda_device_is_an_error() {
        assert_eq!(DeviceArg::Cpu.resolve().unwrap(), Device::Cpu);
        let err = DeviceArg::Cuda(10_000).resolve().unwrap_err().to_string();
        assert!(err.starts_with("--device cuda:10000: "), "{err}");
    }

    #[test]
    fn auto_conv_is_im2col_only_for_tiny_single_thread_batches() {
        assert_eq!(CpuConv::Auto.resolve(4, 1), CpuConv::Im2col);
        assert_eq!(CpuConv::Auto.resolve(1, 1), CpuConv::Im2col);
        assert_eq!(CpuConv::Auto.resolve(8, 1), CpuConv::Onednn);
        assert_eq!(CpuConv::Auto.resolve(4, 2), CpuConv::Onednn);
        assert_eq!(CpuConv::Onednn.resolve(4, 1), CpuConv::Onednn);
        assert_eq!(CpuConv::Im2col.resolve(512, 2), CpuConv::Im2col);
    }
}
