//! The fast recipe's training state and step, and its evaluation with
//! test-time augmentation.

use std::collections::HashMap;

use anyhow::Result;
use tch::nn::Module;
use tch::{Kind, Reduction, Tensor};

use super::augment;
use super::loader::TrainData;
use super::net::{self, Airbench94};
use super::optim::{ema_decay, lr_factor, Lookahead, NesterovSgd};
use super::state::{self, is_counter};
use super::{
    BATCH_SIZE, CIFAR_MEAN, CIFAR_STD, LABEL_SMOOTHING, LOOKAHEAD_EVERY, WHITEN_BIAS_EPOCHS,
};

/// The checkpoint keys of each parameter's momentum buffer (PyTorch's
/// `state_dict` key after it) and of the lookahead's EMA.
pub const MOMENTUM_PREFIX: &str = "optimizer.momentum_buffer.";
pub const EMA_PREFIX: &str = "optimizer.lookahead.";

/// The checkpoint keys beside the `state_dict`'s, for a network whose
/// `state_dict` has `keys` (in order): the momentum buffers' (in the
/// optimizer's order, group by group) and the EMA's (in the lookahead's).
/// Each names the `state_dict` key it belongs to.
fn optimizer_keys<'a>(keys: &mut dyn Iterator<Item = &'a str>) -> Vec<(String, &'a str)> {
    let keys: Vec<&'a str> = keys.collect();
    let keys = keys.iter().copied();
    let momentum = (0..2).flat_map(|g| {
        keys.clone()
            .filter(move |k| net::parameter_group(k) == Some(g))
            .map(|k| (format!("{MOMENTUM_PREFIX}{k}"), k))
    });
    let ema = keys
        .clone()
        .filter(|k| !is_counter(k))
        .map(|k| (format!("{EMA_PREFIX}{k}"), k));
    momentum.chain(ema).collect()
}

/// The keys and shapes of a checkpoint of airbench94 for `num_classes`.
pub fn checkpoint_shapes(num_classes: i64) -> Vec<(String, Vec<i64>)> {
    state::checkpoint_shapes(num_classes, optimizer_keys)
}

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

/// Steps in `epochs` (fractional) epochs of `steps_per_epoch`.
pub fn total_steps(steps_per_epoch: u64, epochs: f64) -> u64 {
    (steps_per_epoch as f64 * epochs).ceil() as u64
}

/// Everything training changes: the network, its optimizer, the lookahead,
/// the augmented data and where the schedule is.
pub struct FastRecipe<'a> {
    net: &'a Airbench94,
    data: TrainData,
    opt: NesterovSgd,
    /// The whitening bias's index among the optimizer's parameters.
    whiten_bias: usize,
    lookahead: Lookahead,
    /// Steps taken, those before a resume included.
    step: u64,
    total_steps: u64,
    /// Mixed precision (float16 autocast, BatchNorm and the loss in
    /// float32), on CUDA only.
    autocast: bool,
}

impl<'a> FastRecipe<'a> {
    /// Sets the whitening filters and prepares the augmented data (see
    /// [`TrainData::new`]) for a schedule of `epochs`.
    pub fn new(
        net: &'a Airbench94,
        images: Tensor,
        labels: &Tensor,
        seed: u64,
        epochs: f64,
        channels_last: bool,
    ) -> FastRecipe<'a> {
        let data = TrainData::new(net, images, labels, seed, BATCH_SIZE, channels_last);
        let state: Vec<Tensor> = net.state_dict().into_iter().map(|(_, t)| t).collect();
        if channels_last {
            net::to_channels_last(&state);
        }
        let [norm_biases, others] = net
            .parameter_groups()
            .map(|g| g.into_iter().map(|(_, t)| t).collect::<Vec<_>>());
        FastRecipe {
            net,
            total_steps: total_steps(data.steps_per_epoch(), epochs),
            data,
            // The whitening bias is the first of the second group.
            whiten_bias: norm_biases.len(),
            opt: NesterovSgd::new(norm_biases, others),
            // After the whitening filters are set, so the EMA starts from them.
            lookahead: Lookahead::new(state),
            step: 0,
            autocast: labels.device().is_cuda(),
        }
    }

    /// Full mini-batches per epoch (the last partial one is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        self.data.steps_per_epoch()
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Draws epoch `epoch`'s (1-based) translations and order.
    pub fn start_epoch(&mut self, epoch: u64) {
        self.data.start_epoch(epoch);
    }

    /// One step, as the reference's loop body:
    ///
    /// ```python
    /// outputs = model(inputs)
    /// loss = loss_fn(outputs, labels).sum()   # label smoothing 0.2
    /// optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step(); scheduler.step()
    /// if step % 5 == 0: lookahead.update(model, decay=ramp[step])
    /// if step == total: lookahead.update(model, decay=1.0)
    /// ```
    ///
    /// Returns the summed loss (not read) and the batch's size.
    pub fn training_step(&mut self, epoch: u64, step: u64) -> (Tensor, i64) {
        let (inputs, labels) = self.data.batch(epoch, step);
        let outputs = tch::autocast(self.autocast, || self.net.forward_t(&inputs, true));
        let loss = outputs.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &labels,
            None,
            Reduction::Sum,
            -100,
            LABEL_SMOOTHING,
        );
        let whiten_bias = self.whiten_bias;
        let bias_trains = epoch <= WHITEN_BIAS_EPOCHS;
        let factor = lr_factor(self.step, self.total_steps);
        self.opt
            .step(&loss, factor, |i| i != whiten_bias || bias_trains);
        self.step += 1;
        if self.step.is_multiple_of(LOOKAHEAD_EVERY) {
            self.lookahead
                .update(ema_decay(self.step, self.total_steps));
        }
        if self.step == self.total_steps {
            self.lookahead.update(1.0);
        }
        (loss, labels.size()[0])
    }

    pub fn is_finite(&self) -> bool {
        state::is_finite(self.net)
    }

    /// The live training state: the `state_dict`, the momentum buffers and
    /// the lookahead's EMA, which a distributed run keeps equal to rank 0's.
    pub fn replicated(&self) -> Vec<Tensor> {
        let state = self.net.state_dict().into_iter().map(|(_, t)| t);
        state.chain(self.optimizer_state()).collect()
    }

    /// The momentum buffers, then the lookahead's EMA: the checkpoint's order.
    fn optimizer_state(&self) -> Vec<Tensor> {
        let buffers = self.opt.buffers().into_iter();
        buffers.chain(self.lookahead.ema()).collect()
    }

    /// What a checkpoint holds to go on bit for bit: the `state_dict`
    /// (without `num_batches_tracked`, which counts the steps), each
    /// parameter's momentum buffer and the lookahead's EMA. The schedule's
    /// place is the step count, and every epoch's draws follow from the seed.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        state::checkpoint_tensors(self.net, optimizer_keys, self.optimizer_state())
    }

    /// Restores [`FastRecipe::checkpoint_tensors`] saved after `global_step`
    /// steps (their keys checked by [`checkpoint_shapes`]).
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, global_step: u64) -> Result<()> {
        state::restore(
            self.net,
            optimizer_keys,
            self.optimizer_state(),
            tensors,
            global_step,
        )?;
        self.step = global_step;
        Ok(())
    }
}

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
