//! `device::CpuSettings`, the one piece of process-wide libtorch state that
//! training changes. This test has its own process (its own file), so no
//! other test sees the kernel or thread count change under it.

use tch::{Device, Kind, Tensor};
use tch_cifar::util::device::{default_threads, mkldnn_enabled, CpuConv, CpuSettings};
use tch_cifar::util::rng::with_torch_rng;

#[test]
fn settings_guard_switches_the_kernel_and_restores_the_defaults() {
    let (x, w) = with_torch_rng(None, || {
        (
            Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randn([6, 3, 5, 5], (Kind::Float, Device::Cpu)),
        )
    });
    let conv = || x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
    let threads = default_threads();
    assert!(mkldnn_enabled(), "libtorch's default is oneDNN");
    let onednn = conv();
    let guard = CpuSettings {
        threads: 1,
        conv: CpuConv::Im2col,
    }
    .apply();
    assert!(!mkldnn_enabled());
    assert_eq!(tch::get_num_threads(), 1);
    let im2col = conv();
    drop(guard);
    assert!(mkldnn_enabled());
    assert_eq!(tch::get_num_threads(), threads);
    // The same convolution by another kernel: equal up to rounding.
    let diff = (&onednn - &im2col).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "the kernels differ by {diff}");
}
