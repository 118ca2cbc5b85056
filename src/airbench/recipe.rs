//! The fast recipe's training state and step, and its evaluation with
//! test-time augmentation.

use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

use super::augment::{self, EpochDraws};
use super::net::{self, Airbench94};
use super::optim::{ema_decay, lr_factor, Lookahead, NesterovSgd};
use super::{
    whiten, BATCH_SIZE, CIFAR_MEAN, CIFAR_STD, LABEL_SMOOTHING, LOOKAHEAD_EVERY, TRANSLATE,
    WHITEN_BIAS_EPOCHS, WHITEN_IMAGES,
};

/// Images normalized as the project's datasets are (`(x − 0.5) / 0.5`,
/// in [−1, 1]) renormalized with CIFAR-10's mean and std, as the recipe wants.
pub fn renormalize(images: &Tensor) -> Tensor {
    let device = images.device();
    let mean = Tensor::from_slice(&CIFAR_MEAN)
        .to_kind(Kind::Float)
        .to_device(device);
    let std = Tensor::from_slice(&CIFAR_STD)
        .to_kind(Kind::Float)
        .to_device(device);
    ((images * 0.5 + 0.5) - mean.view([1, 3, 1, 1])) / std.view([1, 3, 1, 1])
}

/// Steps in `epochs` (fractional) epochs of `steps_per_epoch`.
pub fn total_steps(steps_per_epoch: u64, epochs: f64) -> u64 {
    (steps_per_epoch as f64 * epochs).ceil() as u64
}

/// Everything training changes: the network, its optimizer, the lookahead,
/// the augmented data and where the schedule is.
pub struct FastRecipe<'a> {
    net: &'a Airbench94,
    opt: NesterovSgd,
    lookahead: Lookahead,
    /// The training images, each mirrored at random once, reflect-padded
    /// for the translations.
    padded: Tensor,
    labels: Tensor,
    seed: u64,
    /// The current epoch's shifts and order.
    draws: Option<EpochDraws>,
    /// Steps taken, those before a resume included.
    step: u64,
    total_steps: u64,
    channels_last: bool,
}

impl<'a> FastRecipe<'a> {
    /// Sets the whitening filters from the first training images, then
    /// prepares the augmented data; `images` are normalized to [−1, 1],
    /// as [`crate::data::Split`] holds them.
    pub fn new(
        net: &'a Airbench94,
        images: &Tensor,
        labels: &Tensor,
        seed: u64,
        epochs: f64,
        channels_last: bool,
    ) -> FastRecipe<'a> {
        let images = renormalize(images);
        let n = images.size()[0];
        tch::no_grad(|| {
            let first = images.narrow(0, 0, n.min(WHITEN_IMAGES));
            net.whiten_weight
                .shallow_clone()
                .copy_(&whiten::filters(&first, 2));
        });
        let flipped = crate::model::with_torch_rng(Some(seed), || augment::random_flip(&images));
        drop(images);
        let padded = augment::reflect_pad(&flipped, TRANSLATE);
        let steps_per_epoch = (n / BATCH_SIZE) as u64;
        let state: Vec<Tensor> = net.state_dict().into_iter().map(|(_, t)| t).collect();
        if channels_last {
            net::to_channels_last(&state);
        }
        FastRecipe {
            net,
            opt: NesterovSgd::new(net.norm_biases(), net.other_parameters()),
            // After the whitening filters are set, so the EMA starts from them.
            lookahead: Lookahead::new(state),
            padded,
            labels: labels.shallow_clone(),
            seed,
            draws: None,
            step: 0,
            total_steps: total_steps(steps_per_epoch, epochs),
            channels_last,
        }
    }

    /// Full mini-batches per epoch (the last partial one is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.labels.size()[0] / BATCH_SIZE) as u64
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Draws epoch `epoch`'s (1-based) translations and order.
    pub fn start_epoch(&mut self, epoch: u64) {
        let n = self.labels.size()[0];
        self.draws = Some(augment::epoch_draws(
            self.seed,
            epoch - 1,
            n,
            TRANSLATE,
            self.padded.device(),
        ));
    }

    /// Mini-batch `step` (1-based) of epoch `epoch`, augmented.
    fn batch(&self, epoch: u64, step: u64) -> (Tensor, Tensor) {
        let draws = self.draws.as_ref().expect("start_epoch before a step");
        let index = draws
            .order
            .narrow(0, (step as i64 - 1) * BATCH_SIZE, BATCH_SIZE);
        let size = self.padded.size()[3] - 2 * TRANSLATE;
        let shifts = draws.shifts.index_select(0, &index);
        let mut images = augment::translate(&self.padded.index_select(0, &index), &shifts, size);
        if augment::flips_all(epoch - 1) {
            images = images.flip([-1]);
        }
        if self.channels_last {
            images = net::channels_last(&images);
        }
        (images, self.labels.index_select(0, &index))
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
        let (inputs, labels) = self.batch(epoch, step);
        let outputs = self.net.forward_t(&inputs, true);
        let loss = outputs.cross_entropy_loss::<Tensor>(
            &labels,
            None,
            Reduction::Sum,
            -100,
            LABEL_SMOOTHING,
        );
        // The whitening bias is the first of the second group.
        let whiten_bias = self.net.norm_biases().len();
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
        let all = self
            .net
            .other_parameters()
            .into_iter()
            .chain(self.net.norm_biases());
        tch::no_grad(|| {
            all.into_iter()
                .all(|p| p.isfinite().all().int64_value(&[]) == 1)
        })
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
            self.net.forward_t(&x, false)
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

/// A network on `device` for `num_classes`, seeded.
pub fn new_network(device: Device, seed: u64, num_classes: i64) -> (nn::VarStore, Airbench94) {
    net::build(device, seed, num_classes)
}
