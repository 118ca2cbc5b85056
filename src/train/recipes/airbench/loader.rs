//! The fast recipes' training data, as their loader (`CifarLoader` with
//! flips and translations) serves it: the images renormalized with
//! CIFAR-10's statistics, each mirrored at random once and reflect-padded,
//! then per epoch a translation per image, every other epoch all mirrored,
//! and a new order, cut into full mini-batches.

use tch::Tensor;

use super::{TRANSLATE, WHITEN_IMAGES};
use crate::data::augment::{self, EpochDraws};
use crate::data::normalize::renormalize_;
use crate::nets::airbench::net::{self, Airbench94};
use crate::nets::airbench::whiten;

/// The augmented training set and the current epoch's draws.
pub struct TrainData {
    /// The training images, each mirrored at random once, reflect-padded
    /// for the translations.
    padded: Tensor,
    labels: Tensor,
    seed: u64,
    batch_size: i64,
    /// The current epoch's shifts and order.
    draws: Option<EpochDraws>,
    channels_last: bool,
}

impl TrainData {
    /// Sets `net`'s whitening filters from the first training images, then
    /// prepares the augmented data; `images` are normalized to [−1, 1],
    /// as [`crate::data::Split`] holds them, and are renormalized in place
    /// and dropped once padded (a copy of the training set is hundreds of MB).
    pub fn new(
        net: &Airbench94,
        mut images: Tensor,
        labels: &Tensor,
        seed: u64,
        batch_size: i64,
        channels_last: bool,
    ) -> TrainData {
        renormalize_(&mut images);
        let n = images.size()[0];
        tch::no_grad(|| {
            let first = images.narrow(0, 0, n.min(WHITEN_IMAGES));
            let largest_first = net.variant.whiten_largest_first();
            net.whiten_weight
                .shallow_clone()
                .copy_(&whiten::filters(&first, 2, largest_first));
        });
        let flips = crate::util::rng::with_torch_rng(Some(seed), || {
            augment::random_flip_mask(n, images.device())
        });
        // Mirroring commutes with the (symmetric) padding, so the padded
        // copy is mirrored in place.
        let mut padded = augment::reflect_pad(&images, TRANSLATE);
        drop(images);
        augment::flip_where_(&mut padded, &flips);
        TrainData {
            padded,
            labels: labels.shallow_clone(),
            seed,
            batch_size,
            draws: None,
            channels_last,
        }
    }

    /// Full mini-batches per epoch (the last partial one is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.labels.size()[0] / self.batch_size) as u64
    }

    pub fn batch_size(&self) -> i64 {
        self.batch_size
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
    pub fn batch(&self, epoch: u64, step: u64) -> (Tensor, Tensor) {
        let draws = self.draws.as_ref().expect("start_epoch before a step");
        let index = draws
            .order
            .narrow(0, (step as i64 - 1) * self.batch_size, self.batch_size);
        // This rank's share of the global batch, in a distributed run.
        let index = crate::distributed::local_share(&index);
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
}
