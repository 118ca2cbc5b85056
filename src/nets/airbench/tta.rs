//! airbench's evaluation: the network on renormalized images, with or
//! without test-time augmentation.

use tch::nn::Module;
use tch::{Kind, Tensor};

use super::net::{self, Airbench94};
use crate::data::augment;
use crate::data::normalize::renormalize;

/// The network in evaluation mode (BatchNorm's running statistics) on
/// images normalized to [−1, 1], with or without test-time augmentation:
/// the mirror image and, at half the weight, the two 1-pixel diagonal
/// translations and their mirrors.
///
/// ```python
/// mirrored = lambda x: 0.5 * net(x) + 0.5 * net(x.flip(-1))
/// padded = F.pad(x, (1,) * 4, 'reflect')
/// shifted = [mirrored(padded[:, :, 0:32, 0:32]), mirrored(padded[:, :, 2:34, 2:34])]
/// logits = 0.5 * mirrored(x) + 0.5 * torch.stack(shifted).mean(0)
/// ```
#[derive(Debug)]
pub struct Tta {
    /// Shares its tensors with the trained network.
    pub net: Airbench94,
    pub tta: bool,
    pub channels_last: bool,
}

impl Module for Tta {
    fn forward(&self, images: &Tensor) -> Tensor {
        let x = renormalize(images);
        let run = |x: &Tensor| {
            let x = if self.channels_last {
                net::channels_last(x)
            } else {
                x.shallow_clone()
            };
            let autocast = x.device().is_cuda();
            tch::autocast(autocast, || self.net.forward_t(&x, false)).to_kind(Kind::Float)
        };
        if !self.tta {
            return run(&x);
        }
        let mirrored = |x: &Tensor| run(x) * 0.5 + run(&x.flip([-1])) * 0.5;
        let size = x.size()[3];
        let padded = augment::reflect_pad(&x, 1);
        let up_left = padded.narrow(2, 0, size).narrow(3, 0, size);
        let down_right = padded.narrow(2, 2, size).narrow(3, 2, size);
        let shifted = (mirrored(&up_left) + mirrored(&down_right)) * 0.5;
        mirrored(&x) * 0.5 + shifted * 0.5
    }
}
