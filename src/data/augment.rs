//! The fast recipe's data augmentation, done batched on tensors on the
//! training device: each image mirrored at random once, all of them
//! mirrored together on every other epoch ("alternating flip"), and a
//! random translation of up to 2 pixels from a reflect-padded copy, drawn
//! anew each epoch.
//!
//! Every draw of an epoch comes from torch's generator seeded by the run's
//! seed and the epoch alone, so a resumed run augments as the uninterrupted
//! one did.

use tch::{Device, Kind, Tensor};

use crate::util::rng::with_torch_rng;

/// `images` with each image mirrored left-right where `mask` (`[N]` bool) is set.
pub fn flip_where(images: &Tensor, mask: &Tensor) -> Tensor {
    images
        .flip([-1])
        .where_self(&mask.view([-1, 1, 1, 1]), images)
}

/// [`flip_where`] in place: only the masked images are copied.
pub fn flip_where_(images: &mut Tensor, mask: &Tensor) {
    let index = mask.nonzero().squeeze_dim(1);
    let flipped = images.index_select(0, &index).flip([-1]);
    let _ = images.index_copy_(0, &index, &flipped);
}

/// Which of `n` images to mirror: each with probability 1/2 (torch's generator).
pub fn random_flip_mask(n: i64, device: Device) -> Tensor {
    Tensor::rand([n], (Kind::Float, device)).lt(0.5)
}

/// Whether epoch `epoch` (0-based) mirrors every image: the odd ones.
pub fn flips_all(epoch: u64) -> bool {
    epoch % 2 == 1
}

/// The `size`×`size` window of each padded image (`[N, C, size+2p, size+2p]`)
/// shifted by its `shifts` row (`[N, 2]` i64, (dy, dx) each in −p..=p) from
/// the centre: a translation by up to p pixels whose border is the padding's.
/// One copy per distinct shift, however many images share it.
pub fn translate(padded: &Tensor, shifts: &Tensor, size: i64) -> Tensor {
    let [n, c, h, _] = padded.size()[..] else {
        panic!("translate takes a batch of images, not {:?}", padded.size())
    };
    let pad = (h - size) / 2;
    let mut out = Tensor::empty([n, c, size, size], (padded.kind(), padded.device()));
    let (dy, dx) = (shifts.select(1, 0), shifts.select(1, 1));
    for sy in -pad..=pad {
        for sx in -pad..=pad {
            let index = (dy.eq(sy) * dx.eq(sx)).nonzero().squeeze_dim(1);
            if index.size()[0] == 0 {
                continue;
            }
            let window = padded
                .index_select(0, &index)
                .narrow(2, pad + sy, size)
                .narrow(3, pad + sx, size);
            let _ = out.index_copy_(0, &index, &window);
        }
    }
    out
}

/// Reflect-pads `images` by `pad` pixels on each side (`F.pad(x, (p,)*4, 'reflect')`).
pub fn reflect_pad(images: &Tensor, pad: i64) -> Tensor {
    images.reflection_pad2d([pad, pad, pad, pad])
}

/// One epoch's draws: a shift per image and the order of the images.
pub struct EpochDraws {
    pub shifts: Tensor,
    pub order: Tensor,
}

/// The draws of epoch `epoch` (0-based) for `n` images, from torch's
/// generator seeded by `(seed, epoch)`; on the CPU, then moved to `device`,
/// so that one seed gives one run whatever the device.
pub fn epoch_draws(seed: u64, epoch: u64, n: i64, pad: i64, device: Device) -> EpochDraws {
    let (shifts, order) = with_torch_rng(Some(epoch_seed(seed, epoch)), || {
        let shifts = Tensor::randint_low(-pad, pad + 1, [n, 2], (Kind::Int64, Device::Cpu));
        let order = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        (shifts, order)
    });
    EpochDraws {
        shifts: shifts.to_device(device),
        order: order.to_device(device),
    }
}

/// The seed of epoch `epoch`'s draws: SplitMix64 of the pair, so that
/// neighbouring seeds and epochs give unrelated streams.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut z = seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // torch's manual_seed takes an i64.
    (z ^ (z >> 31)) >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Image i is filled with 100·i plus its pixel's 10·row + column, so
    /// every value names its image and position.
    fn labelled(n: i64, size: i64) -> Tensor {
        let base = Tensor::arange(size, (Kind::Float, Device::Cpu));
        let grid = base.view([size, 1]) * 10.0 + base.view([1, size]);
        let images = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1, 1, 1]) * 100.0;
        images
            + grid
                .view([1, 1, size, size])
                .expand([n, 2, size, size], false)
    }

    #[test]
    fn flips_mirror_only_the_masked_images() {
        let images = labelled(3, 4);
        let mask = Tensor::from_slice(&[true, false, true]);
        let out = flip_where(&images, &mask);
        assert_eq!(out.get(0), images.get(0).flip([-1]));
        assert_eq!(out.get(1), images.get(1));
        assert_eq!(out.get(2), images.get(2).flip([-1]));
        // A flip moves columns only: row 1 of image 0 reads 13, 12, 11, 10.
        let row: Vec<f32> = Vec::try_from(out.get(0).get(0).get(1)).unwrap();
        assert_eq!(row, [13.0, 12.0, 11.0, 10.0]);
    }

    #[test]
    fn flipping_in_place_and_after_padding_equals_flipping_first() {
        let images = labelled(6, 5);
        let mask = Tensor::from_slice(&[true, false, false, true, true, false]);
        let mut padded = reflect_pad(&images, 2);
        flip_where_(&mut padded, &mask);
        assert_eq!(padded, reflect_pad(&flip_where(&images, &mask), 2));
    }

    #[test]
    fn random_flip_mirrors_about_half() {
        let images = labelled(2000, 2);
        let mask = with_torch_rng(Some(5), || random_flip_mask(2000, Device::Cpu));
        let out = flip_where(&images, &mask);
        let flipped = out.ne_tensor(&images).flatten(1, -1).any_dim(1, false);
        let count = flipped.sum(Kind::Int64).int64_value(&[]);
        assert!((900..1100).contains(&count), "{count} of 2000 flipped");
    }

    #[test]
    fn every_other_epoch_flips_all() {
        let flips: Vec<bool> = (0..6).map(flips_all).collect();
        assert_eq!(flips, [false, true, false, true, false, true]);
    }

    #[test]
    fn translations_shift_within_the_padding_and_reflect_at_the_borders() {
        let size = 6;
        let images = labelled(5, size);
        let padded = reflect_pad(&images, 2);
        assert_eq!(padded.size(), [5, 2, 10, 10]);
        // Reflection: the padding mirrors the image without repeating the edge.
        let top: Vec<f32> = Vec::try_from(padded.get(0).get(0).get(0).narrow(0, 2, 6)).unwrap();
        assert_eq!(top, [20.0, 21., 22., 23., 24., 25.]);
        let shifts = Tensor::from_slice(&[0i64, 0, -2, 0, 0, 2, 2, -2, 1, 1]).view([5, 2]);
        let out = translate(&padded, &shifts, size);
        assert_eq!(out.size(), [5, 2, size, size]);
        // No shift: the image itself.
        assert_eq!(out.get(0), images.get(0));
        // Image 1 moved down 2 rows (its window starts 2 rows above): rows
        // 2.. are its rows 0..4, rows 0 and 1 are reflected rows 2 and 1.
        let column: Vec<f32> = Vec::try_from(out.get(1).get(0).select(1, 0)).unwrap();
        assert_eq!(column, [120.0, 110., 100., 110., 120., 130.]);
        // Image 2 shifted 2 columns the other way: row 0 is columns 2..5
        // then the reflected 4 and 3.
        let row: Vec<f32> = Vec::try_from(out.get(2).get(0).get(0)).unwrap();
        assert_eq!(row, [202.0, 203., 204., 205., 204., 203.]);
        // Every output pixel is one of its own image's values, within ±2.
        for i in 0..5 {
            let own = out.get(i) - 100.0 * i as f64;
            assert!(own.ge(0.0).all().int64_value(&[]) == 1);
            assert!(own.lt(56.0).all().int64_value(&[]) == 1);
        }
        let (dy, dx) = (2, -2);
        let expected = padded
            .get(3)
            .narrow(1, 2 + dy, size)
            .narrow(2, 2 + dx, size);
        assert_eq!(out.get(3), expected);
    }

    #[test]
    fn epoch_draws_are_seeded_per_epoch_and_in_range() {
        let a = epoch_draws(7, 3, 1000, 2, Device::Cpu);
        let b = epoch_draws(7, 3, 1000, 2, Device::Cpu);
        let c = epoch_draws(7, 4, 1000, 2, Device::Cpu);
        assert_eq!(a.shifts, b.shifts);
        assert_eq!(a.order, b.order);
        assert_ne!(a.order, c.order);
        assert_eq!(a.shifts.min().int64_value(&[]), -2);
        assert_eq!(a.shifts.max().int64_value(&[]), 2);
        let sorted = a.order.sort(0, false).0;
        assert_eq!(sorted, Tensor::arange(1000, (Kind::Int64, Device::Cpu)));
    }
}
