//! airbench's evaluation: the network on renormalized images, with or
//! without test-time augmentation.

use tch::nn::Module;
use tch::{Kind, Tensor};

use super::net::{self, Airbench94};
use crate::data::augment;
use crate::data::normalize::renormalize;
use crate::util::precision::Precision;

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
    /// The autocast it runs under (the training's, after training).
    pub precision: Precision,
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
            let logits = self
                .precision
                .autocast(x.device(), || self.net.forward_t(&x, false));
            logits.to_kind(Kind::Float)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::airbench::Variant;
    use tch::Device;

    /// The precision reaches the network: bfloat16's logits are float32
    /// tensors close to float32's, but not equal to them.
    #[test]
    fn runs_in_its_precision() {
        let (_vs, net) = net::build(Device::Cpu, 3, 10, Variant::Airbench94);
        // Random filters (the whitening ones and the head start at zero).
        for (_, t) in net.state_dict() {
            if t.dim() == 4 || t.dim() == 2 {
                let _ = tch::no_grad(|| t.shallow_clone().normal_(0.0, 0.2));
            }
        }
        let images = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2 - 1;
        let logits = |precision| {
            let tta = Tta {
                net: net.shallow_clone(),
                tta: true,
                channels_last: true,
                precision,
            };
            tch::no_grad(|| tta.forward(&images))
        };
        let (fp32, bf16) = (logits(Precision::Fp32), logits(Precision::Bf16));
        assert_eq!(bf16.kind(), Kind::Float);
        let diff = (&fp32 - &bf16).abs().max().double_value(&[]);
        let scale = fp32.abs().max().double_value(&[]);
        assert!(diff > 0.0 && diff < 0.05 * scale, "{diff} against {scale}");
    }
}
