//! The record recipe, airbench94-muon (`airbench94_muon.py`): airbench94's
//! network and data at batch 2000 for 8 epochs, its filters trained by
//! [`Muon`] and the rest by Nesterov SGD, both decaying linearly to zero;
//! no lookahead. Its PyTorch reference is `scripts/airbench94_muon.py`.

use std::collections::HashMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::loader::TrainData;
use super::state;
use super::summed_loss;
use crate::nets::airbench::net::{self, Airbench94};
use crate::train::optim::muon::Muon;
use crate::train::optim::nesterov::NesterovSgd;
use crate::util::precision::Precision;

pub const EPOCHS: f64 = 8.0;
pub const BATCH_SIZE: i64 = 2000;
/// The whitening bias's and the BatchNorm biases' learning rate.
pub const BIAS_LR: f64 = 0.053;
pub const HEAD_LR: f64 = 0.67;
/// `2e-6 * batch_size`, divided by each group's initial rate (PyTorch's
/// coupled form, so the decay falls with the rate).
pub const WEIGHT_DECAY: f64 = 2e-6 * BATCH_SIZE as f64;
pub const SGD_MOMENTUM: f64 = 0.85;
pub const MUON_LR: f64 = 0.24;
pub const MUON_MOMENTUM: f64 = 0.6;
pub const NEWTON_SCHULZ_STEPS: usize = 3;
/// Newton–Schulz's precision; docs/fast-recipe.md has the measurements
/// behind the choice.
pub const NEWTON_SCHULZ_KIND: Kind = Kind::BFloat16;
/// Epochs during which the whitening layer's bias trains.
pub const WHITEN_BIAS_EPOCHS: f64 = 3.0;

/// What optimizes the parameter at `state_dict` key `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    WhitenBias,
    NormBias,
    Head,
    Filter,
}

fn role(key: &str) -> Option<Role> {
    if key == "whiten.bias" {
        Some(Role::WhitenBias)
    } else if key.contains(".norm") && key.ends_with(".bias") {
        Some(Role::NormBias)
    } else if key == "head.weight" {
        Some(Role::Head)
    } else if key.ends_with("conv1.weight") || key.ends_with("conv2.weight") {
        Some(Role::Filter)
    } else {
        None
    }
}

/// The optimizers' order of the parameters: SGD's three groups (the
/// whitening bias, the BatchNorm biases, the head), then Muon's filters,
/// each in `state_dict` order.
const ORDER: [Role; 4] = [Role::WhitenBias, Role::NormBias, Role::Head, Role::Filter];

fn ordered<'a, T>(items: impl Iterator<Item = (&'a str, T)> + Clone) -> Vec<(&'a str, T)> {
    ORDER
        .iter()
        .flat_map(|&r| items.clone().filter(move |(k, _)| role(k) == Some(r)))
        .collect()
}

/// The checkpoint key of each momentum buffer, in the optimizers' order,
/// with the `state_dict` key it belongs to.
fn optimizer_keys<'a>(keys: &mut dyn Iterator<Item = &'a str>) -> Vec<(String, &'a str)> {
    let keys: Vec<&'a str> = keys.collect();
    let keys = keys.iter().copied();
    ordered(keys.map(|k| (k, ())))
        .into_iter()
        .map(|(k, ())| (format!("{}{k}", super::airbench94::MOMENTUM_PREFIX), k))
        .collect()
}

/// The keys and shapes of a checkpoint of airbench94-muon for `num_classes`.
pub fn checkpoint_shapes(num_classes: i64) -> Vec<(String, Vec<i64>)> {
    state::checkpoint_shapes(num_classes, optimizer_keys)
}

/// The learning-rate factor of step `step` (0-based) of `total`: a linear
/// decay from 1 to 0. Past `total` (the whitening bias's short schedule,
/// never applied there) it is negative.
pub fn decay(step: u64, total: u64) -> f64 {
    1.0 - step as f64 / total as f64
}

/// The learning rates of step `step` (0-based): Muon's, the BatchNorm
/// biases', the head's and the whitening bias's (0 once it stops training).
pub fn learning_rates(step: u64, total: u64, whiten_bias_steps: u64) -> [(&'static str, f64); 4] {
    let factor = decay(step, total);
    let whiten = if step < whiten_bias_steps {
        BIAS_LR * decay(step, whiten_bias_steps)
    } else {
        0.0
    };
    [
        ("train/lr", MUON_LR * factor),
        ("train/lr_norm_biases", BIAS_LR * factor),
        ("train/lr_head", HEAD_LR * factor),
        ("train/lr_whiten_bias", whiten),
    ]
}

/// Steps in `epochs` of `steps_per_epoch`, and the whitening bias's.
pub fn schedule(steps_per_epoch: u64, epochs: f64) -> (u64, u64) {
    let steps = |e: f64| (steps_per_epoch as f64 * e).ceil() as u64;
    (steps(epochs), steps(WHITEN_BIAS_EPOCHS))
}

/// Everything the record recipe's training changes.
pub struct MuonRecipe<'a> {
    net: &'a Airbench94,
    data: TrainData,
    /// The whitening bias, the BatchNorm biases, the head.
    sgd: NesterovSgd,
    /// The six convolution filters.
    muon: Muon,
    /// Steps taken, those before a resume included.
    step: u64,
    total_steps: u64,
    whiten_bias_steps: u64,
    /// The forward pass's autocast (BatchNorm and the loss stay float32).
    precision: Precision,
}

impl<'a> MuonRecipe<'a> {
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
    ) -> MuonRecipe<'a> {
        let data = TrainData::new(net, images, labels, seed, BATCH_SIZE, channels_last);
        let state = net.state_dict();
        if channels_last {
            let tensors: Vec<Tensor> = state.iter().map(|(_, t)| t.shallow_clone()).collect();
            net::to_channels_last(&tensors);
        }
        let params = ordered(state.iter().map(|(k, t)| (k.as_str(), t)));
        let of = |r: Role| -> Vec<Tensor> {
            params
                .iter()
                .filter(|(k, _)| role(k) == Some(r))
                .map(|(_, t)| t.shallow_clone())
                .collect()
        };
        let decay = |lr: f64| WEIGHT_DECAY / lr;
        let sgd = NesterovSgd::with_groups(
            vec![
                (of(Role::WhitenBias), BIAS_LR, decay(BIAS_LR)),
                (of(Role::NormBias), BIAS_LR, decay(BIAS_LR)),
                (of(Role::Head), HEAD_LR, decay(HEAD_LR)),
            ],
            SGD_MOMENTUM,
        );
        let muon = Muon::new(
            of(Role::Filter),
            MUON_LR,
            MUON_MOMENTUM,
            NEWTON_SCHULZ_STEPS,
            NEWTON_SCHULZ_KIND,
        );
        let (total_steps, whiten_bias_steps) = schedule(data.steps_per_epoch(), epochs);
        MuonRecipe {
            net,
            data,
            sgd,
            muon,
            step: 0,
            total_steps,
            whiten_bias_steps,
            precision,
        }
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.data.steps_per_epoch()
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    pub fn start_epoch(&mut self, epoch: u64) {
        self.data.start_epoch(epoch);
    }

    /// One step, as the reference's loop body:
    ///
    /// ```python
    /// outputs = model(inputs, whiten_bias_grad=(step < whiten_bias_train_steps))
    /// F.cross_entropy(outputs, labels, label_smoothing=0.2, reduction="sum").backward()
    /// # lr = initial_lr * (1 - step / whiten_bias_train_steps) for the whitening bias,
    /// # initial_lr * (1 - step / total_train_steps) for the others
    /// optimizer1.step(); optimizer2.step(); model.zero_grad(set_to_none=True)
    /// ```
    ///
    /// Returns the summed loss (not read) and the batch's size.
    pub fn training_step(&mut self, epoch: u64, step: u64) -> (Tensor, i64) {
        let (inputs, labels) = self.data.batch(epoch, step);
        let loss = summed_loss(self.net, self.precision, &inputs, &labels);
        let bias_trains = self.step < self.whiten_bias_steps;
        let (sgd_grads, muon_grads) = self.backward(&loss, bias_trains);
        let factor = decay(self.step, self.total_steps);
        let whiten_factor = decay(self.step, self.whiten_bias_steps);
        self.sgd
            .update(&sgd_grads, &[whiten_factor, factor, factor]);
        self.muon.update(&muon_grads, factor);
        self.step += 1;
        (loss, labels.size()[0])
    }

    /// The gradients of SGD's parameters (`None` for the whitening bias once
    /// it stops training) and of Muon's, from one backward pass (and, in a
    /// distributed run, one all-reduce).
    fn backward(&self, loss: &Tensor, bias_trains: bool) -> (Vec<Option<Tensor>>, Vec<Tensor>) {
        let sgd_params = self.sgd.params();
        // The whitening bias comes first.
        let skip = usize::from(!bias_trains);
        let muon_params = self.muon.params();
        let inputs: Vec<Tensor> = sgd_params[skip..]
            .iter()
            .chain(&muon_params)
            .map(Tensor::shallow_clone)
            .collect();
        let mut grads = Tensor::run_backward(&[loss], &inputs, false, false);
        crate::distributed::sync_gradients(loss, &grads);
        let muon_grads = grads.split_off(sgd_params.len() - skip);
        let sgd_grads = (0..skip).map(|_| None).chain(grads.into_iter().map(Some));
        (sgd_grads.collect(), muon_grads)
    }

    pub fn is_finite(&self) -> bool {
        state::is_finite(self.net)
    }

    /// The momentum buffers, in the optimizers' order.
    fn buffers(&self) -> Vec<Tensor> {
        self.sgd
            .buffers()
            .into_iter()
            .chain(self.muon.buffers())
            .collect()
    }

    /// The live training state: the `state_dict` and both optimizers'
    /// momentum buffers, which a distributed run keeps equal to rank 0's.
    pub fn replicated(&self) -> Vec<Tensor> {
        let state = self.net.state_dict().into_iter().map(|(_, t)| t);
        state.chain(self.buffers()).collect()
    }

    /// What a checkpoint holds to go on bit for bit: the `state_dict`
    /// (without `num_batches_tracked`) and every parameter's momentum buffer.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        state::checkpoint_tensors(self.net, optimizer_keys, self.buffers())
    }

    /// Restores [`MuonRecipe::checkpoint_tensors`] saved after `global_step`
    /// steps (their keys checked by [`checkpoint_shapes`]).
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, global_step: u64) -> Result<()> {
        state::restore(
            self.net,
            optimizer_keys,
            self.buffers(),
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
    fn the_optimizers_cover_every_trainable_parameter_once() {
        let state = net::state_dict_shapes(10);
        let keys = optimizer_keys(&mut state.iter().map(|(k, _)| k.as_str()));
        let owners: Vec<&str> = keys.iter().map(|(_, k)| *k).collect();
        assert_eq!(owners[0], "whiten.bias");
        assert_eq!(owners[7], "head.weight");
        assert_eq!(owners.len(), 1 + 6 + 1 + 6);
        assert!(owners[1..7].iter().all(|k| k.ends_with("bias")));
        assert!(owners[8..].iter().all(|k| k.contains(".conv")));
        // Neither the frozen whitening filters, the BatchNorm scales nor buffers.
        assert!(!owners
            .iter()
            .any(|k| *k == "whiten.weight" || k.ends_with("norm1.weight")));
    }

    #[test]
    fn the_schedule_decays_to_zero() {
        assert_eq!(schedule(25, EPOCHS), (200, 75));
        let [muon, biases, head, whiten] = learning_rates(0, 200, 75);
        assert_eq!(
            (muon.1, biases.1, head.1, whiten.1),
            (MUON_LR, BIAS_LR, HEAD_LR, BIAS_LR)
        );
        let [muon, _, _, whiten] = learning_rates(74, 200, 75);
        assert!((muon.1 - MUON_LR * 126.0 / 200.0).abs() < 1e-12);
        assert!((whiten.1 - BIAS_LR / 75.0).abs() < 1e-12);
        assert_eq!(learning_rates(75, 200, 75)[3].1, 0.0);
        assert!((learning_rates(199, 200, 75)[0].1 - MUON_LR / 200.0).abs() < 1e-12);
    }
}
