//! CIFAR-10's per-channel statistics, and the renormalization the
//! airbench networks expect of images held in [−1, 1].

use tch::{Kind, Tensor};

/// CIFAR-10's per-channel mean and standard deviation.
pub const CIFAR_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];

/// Images normalized as the project's datasets are (`(x − 0.5) / 0.5`,
/// in [−1, 1]) renormalized with CIFAR-10's mean and std, as the recipe wants.
pub fn renormalize(images: &Tensor) -> Tensor {
    let mut out = images.copy();
    renormalize_(&mut out);
    out
}

/// [`renormalize`] in place: the training set is renormalized without a
/// second copy of it.
pub fn renormalize_(images: &mut Tensor) {
    let device = images.device();
    let mean = Tensor::from_slice(&CIFAR_MEAN)
        .to_kind(Kind::Float)
        .to_device(device);
    let std = Tensor::from_slice(&CIFAR_STD)
        .to_kind(Kind::Float)
        .to_device(device);
    tch::no_grad(|| {
        let _ = images
            .g_mul_scalar_(0.5)
            .g_add_scalar_(0.5)
            .g_sub_(&mean.view([1, 3, 1, 1]))
            .g_div_(&std.view([1, 3, 1, 1]));
    });
}
