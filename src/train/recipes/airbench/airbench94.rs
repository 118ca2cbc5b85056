//! The fast recipe's training state and step, and its evaluation with
//! test-time augmentation.

use std::collections::HashMap;

use anyhow::Result;
use tch::Tensor;

use super::loader::TrainData;
use super::state::{self, is_counter};
use super::{
    summed_loss, BATCH_SIZE, BIAS_SCALER, LOOKAHEAD_EVERY, LR, MOMENTUM, WEIGHT_DECAY,
    WHITEN_BIAS_EPOCHS,
};
use crate::nets::airbench::net::{self, Airbench94};
use crate::train::optim::nesterov::{Lookahead, NesterovSgd};
use crate::util::precision::Precision;

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

/// The learning-rate factor of step `step` (0-based) of `total`: 0.2 → 1
/// over the first 23 % of the steps, then 1 → 0.07 at the last
/// (`np.interp(step, [0, int(0.23·total), total], [0.2, 1, 0.07])`).
pub fn lr_factor(step: u64, total: u64) -> f64 {
    let warmup = (total as f64 * 0.23) as u64;
    if step < warmup {
        let frac = step as f64 / warmup as f64;
        0.2 * (1.0 - frac) + frac
    } else {
        let frac = (step - warmup) as f64 / (total - warmup) as f64;
        (1.0 - frac) + 0.07 * frac
    }
}

/// The learning rates of step `step` (0-based) of `total`: the norm
/// biases' group's, then the other parameters'.
pub fn learning_rates(step: u64, total: u64) -> [f64; 2] {
    let lr = group_lr();
    let factor = lr_factor(step, total);
    [lr * BIAS_SCALER * factor, lr * factor]
}

/// The other parameters' group's rate before the schedule's factor.
fn group_lr() -> f64 {
    LR / kilostep_scale()
}

/// The reference's `1024 * (1 + 1 / (1 - momentum))`.
fn kilostep_scale() -> f64 {
    1024.0 * (1.0 + 1.0 / (1.0 - MOMENTUM))
}

/// The lookahead's EMA decay after step `step` (1-based) of `total`:
/// `0.95**5 * (step / total)**3`, computed in f32 as the reference's tensor
/// is. Small early, so the weights run free at first.
pub fn ema_decay(step: u64, total: u64) -> f64 {
    let frac = step as f32 / total as f32;
    f64::from(0.95f32.powi(5) * frac * frac * frac)
}

/// airbench's "decoupled" hyperparameters (per 1024 images, weight decay
/// independent of the learning rate) turned into `torch.optim.SGD`'s as the
/// reference does:
///
/// ```python
/// kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
/// lr = LR / kilostep_scale; wd = WEIGHT_DECAY * batch_size / kilostep_scale
/// groups = [dict(params=norm_biases, lr=lr * 64, weight_decay=wd / (lr * 64)),
///           dict(params=others, lr=lr, weight_decay=wd / lr)]
/// SGD(groups, momentum=momentum, nesterov=True)
/// ```
/// The recipe's optimizer, in two groups: the BatchNorm biases at 64× the learning
/// rate, and the rest.
pub fn optimizer(norm_biases: Vec<Tensor>, others: Vec<Tensor>) -> NesterovSgd {
    let kilostep_scale = kilostep_scale();
    let lr = group_lr();
    let wd = WEIGHT_DECAY * BATCH_SIZE as f64 / kilostep_scale;
    let lr_biases = lr * BIAS_SCALER;
    NesterovSgd::with_groups(
        vec![
            (norm_biases, lr_biases, wd / lr_biases),
            (others, lr, wd / lr),
        ],
        MOMENTUM,
    )
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
    /// The forward pass's autocast (BatchNorm and the loss stay float32).
    precision: Precision,
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
        precision: Precision,
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
            opt: optimizer(norm_biases, others),
            // After the whitening filters are set, so the EMA starts from them.
            lookahead: Lookahead::new(state),
            step: 0,
            precision,
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
        let loss = summed_loss(self.net, self.precision, &inputs, &labels);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_corners() {
        // int(476 · 0.23) = 109 warm-up steps.
        let total = 476;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(lr_factor(0, total), 0.2));
        assert!(close(lr_factor(109, total), 1.0));
        assert!(close(lr_factor(total, total), 0.07));
        // Linear between the corners.
        assert!(close(lr_factor(50, total), 0.2 + 0.8 * 50.0 / 109.0));
        assert!(close(lr_factor(108, total), 0.2 + 0.8 * 108.0 / 109.0));
        assert!(close(lr_factor(300, total), 1.0 - 0.93 * 191.0 / 367.0));
    }

    #[test]
    fn ema_decay_ramps_cubically() {
        assert_eq!(ema_decay(0, 476), 0.0);
        assert!((ema_decay(476, 476) - 0.95f64.powi(5)).abs() < 1e-6);
        let half = ema_decay(238, 476);
        assert!((half - 0.95f64.powi(5) / 8.0).abs() < 1e-6);
    }
}
