//! SGD with momentum, PyTorch's update rule, over the model's flat
//! parameter buffer.
//!
//! `torch.optim.SGD` (dampening 0, no Nesterov, no weight decay) does, per
//! parameter `p` with gradient `g` and momentum buffer `b`:
//!
//! ```text
//! b = g                 (first step)
//! b = momentum * b + g  (later steps)
//! p = p - lr * b
//! ```
//!
//! Here every parameter is a view into one flat tensor ([`Model::flat`]),
//! so the whole update is a handful of operations on 62,006 floats instead
//! of several per parameter. At the tutorial's batch size of 4 the step is
//! bound by per-operation overhead, so this is what makes it fast. The
//! momentum buffer is a plain tensor that checkpoints can save and restore.

use anyhow::{ensure, Result};
use tch::Tensor;

use crate::distributed;
use crate::nets::tutorial::Model;

pub struct Sgd {
    params: Vec<Tensor>,
    flat: Tensor,
    momentum_buffer: Tensor,
    neg_lr: Tensor,
    momentum: f64,
}

impl Sgd {
    pub fn new(model: &Model, lr: f64, momentum: f64) -> Sgd {
        let flat = model.flat.shallow_clone();
        Sgd {
            params: model.parameters(),
            // Zero is exact for the first step: momentum * 0 + g == g.
            momentum_buffer: flat.zeros_like(),
            // In the parameters' dtype: f32 for training, f64 in a float64
            // `compare-losses` run.
            neg_lr: Tensor::from(-lr)
                .to_kind(flat.kind())
                .to_device(flat.device()),
            flat,
            momentum,
        }
    }

    /// The gradients of `loss` with respect to every parameter, as one flat
    /// tensor in [`crate::nets::tutorial::PARAMETERS`] order. Nothing accumulates in
    /// `.grad`, so there is nothing to zero between steps. In a distributed
    /// run they are the global batch's, averaged over the ranks in one
    /// all-reduce, as DDP's backward leaves them ([`distributed::sync_gradients`]).
    pub fn gradient(&self, loss: &Tensor) -> Tensor {
        let grads = Tensor::run_backward(&[loss], &self.params, false, false);
        let flat: Vec<Tensor> = grads.iter().map(|g| g.view(-1)).collect();
        let flat = Tensor::cat(&flat, 0);
        distributed::sync_gradients(loss, std::slice::from_ref(&flat));
        flat
    }

    /// One optimizer step on `loss`: backward, then the momentum update.
    pub fn step(&mut self, loss: &Tensor) {
        let grad = self.gradient(loss);
        self.apply(&grad);
    }

    /// The momentum update with a gradient from [`Sgd::gradient`], for
    /// callers that inspect the gradient before deciding to use it.
    pub fn apply(&mut self, grad: &Tensor) {
        tch::no_grad(|| {
            let _ = self.momentum_buffer.g_mul_scalar_(self.momentum);
            let _ = self.momentum_buffer.g_add_(grad);
            // p += b * (-lr), in one operation.
            let _ = self.flat.addcmul_(&self.momentum_buffer, &self.neg_lr);
        });
    }

    /// The momentum buffer, flat like the parameters.
    pub fn momentum_buffer(&self) -> &Tensor {
        &self.momentum_buffer
    }

    /// Restores a momentum buffer saved from [`Sgd::momentum_buffer`].
    pub fn set_momentum_buffer(&mut self, buffer: &Tensor) -> Result<()> {
        ensure!(
            buffer.size() == self.momentum_buffer.size(),
            "momentum buffer has shape {:?}, expected {:?}",
            buffer.size(),
            self.momentum_buffer.size()
        );
        tch::no_grad(|| self.momentum_buffer.copy_(buffer));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::{Device, Kind};

    fn batch() -> (Tensor, Tensor) {
        let x = crate::util::rng::with_torch_rng(Some(11), || {
            Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
        (x, y)
    }

    /// The same steps through libtorch's own C++ `torch::optim::SGD` (tch's
    /// `nn::Sgd`) give the same weights, up to float rounding.
    #[test]
    fn matches_libtorch_sgd() {
        let (x, y) = batch();
        let ours = Model::new(Device::Cpu, Some(1));
        let theirs = Model::new(Device::Cpu, Some(1));
        let mut sgd = Sgd::new(&ours, 0.01, 0.9);
        let mut reference = tch::nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(&theirs.vs, 0.01)
        .unwrap();
        for _ in 0..5 {
            sgd.step(&ours.net.forward(&x).cross_entropy_for_logits(&y));
            reference.backward_step(&theirs.net.forward(&x).cross_entropy_for_logits(&y));
        }
        let start = Model::new(Device::Cpu, Some(1));
        for (((name, a), (_, b)), (_, s)) in ours
            .state_dict()
            .iter()
            .zip(theirs.state_dict())
            .zip(start.state_dict())
        {
            let diff = (a - &b).abs().max().double_value(&[]);
            let moved = (a - &s).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: differs from libtorch's SGD by {diff}");
            assert!(moved > 1e-4, "{name}: did not move ({moved})");
        }
    }

    #[test]
    fn gradient_is_flat_and_complete() {
        let (x, y) = batch();
        let model = Model::new(Device::Cpu, Some(2));
        let sgd = Sgd::new(&model, 0.1, 0.0);
        let g = sgd.gradient(&model.net.forward(&x).cross_entropy_for_logits(&y));
        assert_eq!(g.size(), [62_006]);
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
