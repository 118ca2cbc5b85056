//! The whitening layer's filters: the 2×2 patches of a few thousand
//! training images, their covariance, and its eigendecomposition.
//!
//! Each filter is an eigenvector scaled by 1/√(eigenvalue + ε), largest
//! eigenvalue first, so that the convolution's outputs on those patches
//! have (nearly) identity covariance; the negatives follow, so that GELU
//! keeps both signs of each direction.

use tch::{Kind, Tensor};

/// Added to the eigenvalues before their square root: keeps the filters of
/// near-empty directions finite.
pub const EPS: f64 = 5e-4;

/// Every `kernel`×`kernel` patch of `images` (`[N, C, H, W]`) as a row,
/// `[N·(H−k+1)·(W−k+1), C·k·k]`, flattened in a convolution filter's order
/// (channel, row, column).
pub fn patches(images: &Tensor, kernel: i64) -> Tensor {
    let c = images.size()[1];
    images
        .unfold(2, kernel, 1)
        .unfold(3, kernel, 1) // [N, C, H', W', k, k]
        .permute([0, 2, 3, 1, 4, 5]) // [N, H', W', C, k, k]
        .reshape([-1, c * kernel * kernel])
}

/// The whitening filters for `images`: `[2·C·k·k, C, k, k]`, the scaled
/// eigenvectors (the largest eigenvalue's first, or in eigh's ascending
/// order) then their negatives, in the images' dtype.
pub fn filters(images: &Tensor, kernel: i64, largest_first: bool) -> Tensor {
    let c = images.size()[1];
    let patches = patches(images, kernel).to_kind(Kind::Double);
    let n = patches.size()[0] as f64;
    let covariance = patches.transpose(0, 1).matmul(&patches) / n;
    let (mut eigenvalues, eigenvectors) = covariance.linalg_eigh("U");
    // One eigenvector per row; eigh sorts ascending.
    let mut eigenvectors = eigenvectors.transpose(0, 1);
    if largest_first {
        eigenvalues = eigenvalues.flip([0]);
        eigenvectors = eigenvectors.flip([0]);
    }
    let scaled = eigenvectors / (eigenvalues + EPS).sqrt().unsqueeze(1);
    let scaled = scaled.view([-1, c, kernel, kernel]);
    Tensor::cat(&[&scaled, &(-&scaled)], 0).to_kind(images.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn patches_are_filter_ordered() {
        // One 2-channel 3x3 image: channel c holds 10c + 3·row + column.
        let image = Tensor::from_slice(&[0.0f32, 1., 2., 3., 4., 5., 6., 7., 8.]);
        let image = Tensor::stack(&[&image, &(&image + 10.0)], 0).view([1, 2, 3, 3]);
        let p = patches(&image, 2);
        assert_eq!(p.size(), [4, 8]);
        // The patch at row 1, column 0: channel 0 then channel 1, each row-major.
        let expected = Tensor::from_slice(&[3.0f32, 4., 6., 7., 13., 14., 16., 17.]);
        assert_eq!(p.get(2), expected);
    }

    /// The whitened patches of the images the filters came from have
    /// nearly the identity as covariance (ε takes a little off each
    /// eigenvalue's variance).
    #[test]
    fn filters_whiten() {
        // Correlated channels and neighbouring pixels: a smooth random field.
        let images = crate::util::rng::with_torch_rng(Some(3), || {
            let base = Tensor::randn([200, 1, 9, 9], (Kind::Float, Device::Cpu));
            let smooth = base.avg_pool2d([2, 2], [1, 1], [0, 0], false, true, None::<i64>);
            let noise = Tensor::randn([200, 3, 8, 8], (Kind::Float, Device::Cpu)) * 0.3;
            smooth.expand([200, 3, 8, 8], false) * 2.0 + noise
        });
        let w = filters(&images, 2, true);
        assert_eq!(w.size(), [24, 3, 2, 2]);
        let half = w.narrow(0, 0, 12).reshape([12, -1]).to_kind(Kind::Double);
        let p = patches(&images, 2).to_kind(Kind::Double);
        let whitened = p.matmul(&half.transpose(0, 1));
        let covariance = whitened.transpose(0, 1).matmul(&whitened) / p.size()[0] as f64;
        let identity = Tensor::eye(12, (Kind::Double, Device::Cpu));
        let off = (&covariance - &identity).abs().max().double_value(&[]);
        assert!(
            off < 0.05,
            "covariance is {off} from the identity:\n{covariance}"
        );
        // Before whitening the patches are far from white.
        let raw = p.transpose(0, 1).matmul(&p) / p.size()[0] as f64;
        assert!((&raw - &identity).abs().max().double_value(&[]) > 1.0);
        // The second half is the first's negative.
        assert_eq!(w.narrow(0, 12, 12), -w.narrow(0, 0, 12));
    }
}
