//! The tutorial's recipe as the [harness](crate::train::harness) drives it: `Net`
//! on logits with cross-entropy, SGD with momentum, on mini-batches
//! reshuffled every epoch.

use anyhow::{ensure, Context, Result};
use tch::nn::Module;
use tch::{Device, Tensor};

use crate::data::{self, Split};
use crate::distributed;
use crate::nets::tutorial::{Model, Net};
use crate::train::checkpoint::{Checkpoint, MOMENTUM_KEY};
use crate::train::harness::{Recipe, StepOutput};
use crate::train::optim::Sgd;

/// One step of the tutorial's training loop, which in Python reads:
///
/// ```python
/// optimizer.zero_grad()
/// outputs = net(inputs)
/// loss = criterion(outputs, labels)
/// loss.backward()
/// optimizer.step()
/// ```
///
/// [`Sgd`] accumulates no `.grad`, so there is nothing to zero. Returns the
/// loss, unread (`loss.item()` waits for the device).
pub fn training_step(net: &Net, optimizer: &mut Sgd, inputs: &Tensor, labels: &Tensor) -> Tensor {
    let outputs = net.forward(inputs);
    let loss = outputs.cross_entropy_for_logits(labels);
    let gradient = optimizer.gradient(&loss); // loss.backward()
    optimizer.apply(&gradient); // optimizer.step()
    loss
}

/// The mini-batch index tensors of one epoch, in the seeded order
/// ([`data::epoch_order`]); the last batch holds the rest.
pub struct EpochBatches {
    order: Tensor,
    batch_size: i64,
}

impl EpochBatches {
    /// Epoch `epoch` (1-based) of `n` images in batches of `batch_size`.
    pub fn new(seed: u64, epoch: u64, n: usize, batch_size: u64, device: Device) -> EpochBatches {
        let order = data::epoch_order(seed, epoch as usize - 1, n);
        EpochBatches {
            order: Tensor::from_slice(&order).to_device(device),
            batch_size: batch_size as i64,
        }
    }

    /// The indices of mini-batch `step` (1-based); in a distributed run,
    /// this rank's share of them ([`distributed::local_share`]).
    pub fn get(&self, step: u64) -> Tensor {
        let n = self.order.size()[0];
        let start = (step as i64 - 1) * self.batch_size;
        distributed::local_share(&self.order.narrow(0, start, self.batch_size.min(n - start)))
    }
}

/// The tutorial's training of `model` with `optimizer` on `train`.
pub struct Tutorial<'a> {
    model: &'a Model,
    optimizer: &'a mut Sgd,
    train: &'a Split,
    seed: u64,
    batch_size: u64,
    /// The current epoch's, from [`Recipe::start_epoch`].
    batches: Option<EpochBatches>,
}

impl<'a> Tutorial<'a> {
    pub fn new(
        model: &'a Model,
        optimizer: &'a mut Sgd,
        train: &'a Split,
        seed: u64,
        batch_size: u64,
    ) -> Tutorial<'a> {
        Tutorial {
            model,
            optimizer,
            train,
            seed,
            batch_size,
            batches: None,
        }
    }
}

impl Recipe for Tutorial<'_> {
    fn steps_per_epoch(&self) -> u64 {
        self.train.len().div_ceil(self.batch_size as usize) as u64
    }

    fn start_epoch(&mut self, epoch: u64) -> Result<()> {
        let device = self.model.vs.device();
        let batches =
            EpochBatches::new(self.seed, epoch, self.train.len(), self.batch_size, device);
        self.batches = Some(batches);
        Ok(())
    }

    fn training_step(&mut self, _epoch: u64, step: u64) -> Result<StepOutput> {
        let batches = self.batches.as_ref().expect("start_epoch before the steps");
        let index = batches.get(step);
        let (inputs, labels) = self.train.select(&index);
        let loss = training_step(&self.model.net, self.optimizer, &inputs, &labels);
        Ok(StepOutput {
            loss,
            images: index.size()[0] as u64,
        })
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        checkpoint_tensors(self.model, self.optimizer)
    }

    fn is_finite(&self) -> bool {
        self.model.is_finite()
    }

    fn replicated(&self) -> Vec<Tensor> {
        vec![
            self.model.flat.shallow_clone(),
            self.optimizer.momentum_buffer().shallow_clone(),
        ]
    }
}

/// A tutorial checkpoint's tensors: the `state_dict`, and the momentum
/// buffer as [`MOMENTUM_KEY`].
pub fn checkpoint_tensors(model: &Model, optimizer: &Sgd) -> Vec<(String, Tensor)> {
    let mut tensors = model.state_dict();
    tensors.push((
        MOMENTUM_KEY.to_string(),
        optimizer.momentum_buffer().shallow_clone(),
    ));
    tensors
}

/// Copies a checkpoint's weights into `model` and its momentum buffer into
/// `optimizer`.
pub fn restore(checkpoint: Checkpoint, model: &mut Model, optimizer: &mut Sgd) -> Result<()> {
    let path = checkpoint.path.clone();
    ensure!(
        checkpoint.num_classes == model.num_classes(),
        "cannot resume from {}: its Net has {} outputs (classes), this data has {} classes",
        path.display(),
        checkpoint.num_classes,
        model.num_classes()
    );
    let mut tensors = checkpoint.into_tensors();
    let momentum = tensors
        .remove(MOMENTUM_KEY)
        .with_context(|| format!("{}: missing key `{MOMENTUM_KEY}`", path.display()))?;
    model.set_state_dict(tensors, &path)?;
    optimizer
        .set_momentum_buffer(&momentum)
        .with_context(|| format!("{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::checkpoint::{Meta, Position, Saver};
    use crate::train::settings::Settings;
    use tch::Kind;

    #[test]
    fn a_saved_checkpoint_restores_the_weights_and_the_momentum() {
        let model = Model::new(Device::Cpu, Some(9));
        let mut opt = Sgd::new(&model, 0.01, 0.9);
        let inputs = crate::util::rng::with_torch_rng(Some(1), || {
            Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let labels = Tensor::from_slice(&[1i64, 2, 3, 4]);
        for _ in 0..2 {
            let _loss = training_step(&model.net, &mut opt, &inputs, &labels);
        }
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::new(Settings::tutorial(1), "cpu".into(), 4, None);
        let at = Position {
            epoch: 1,
            step: 1,
            global_step: 1,
            running_loss: 0.0,
        };
        let mut saver = Saver::new(dir.path().to_path_buf(), 1, meta, None);
        let path = saver.save(checkpoint_tensors(&model, &opt), at).unwrap();
        let mut copy = Model::new(Device::Cpu, Some(1));
        let mut copy_opt = Sgd::new(&copy, 0.01, 0.9);
        let checkpoint =
            crate::train::checkpoint::load(&path, crate::train::recipes::checkpoint_shapes)
                .unwrap();
        restore(checkpoint, &mut copy, &mut copy_opt).unwrap();
        assert!(copy.flat.equal(&model.flat));
        assert!(copy_opt.momentum_buffer().equal(opt.momentum_buffer()));
    }
}
