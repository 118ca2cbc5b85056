//! airbench94's network (Keller Jordan's CIFAR-10 ConvNet that reaches
//! 94 % in under ten epochs), as its PyTorch reference builds it
//! (`scripts/airbench94.py`); airbench94-muon trains the same network.
//!
//! * [`net`]: the network, `Airbench94`, keyed like the PyTorch module.
//! * [`whiten`]: its first layer's filters, from the data.
//! * [`tta`]: its evaluation, with or without test-time augmentation.

pub mod net;
pub mod tta;
pub mod whiten;

pub use self::net::{Airbench94, Variant};
pub use self::tta::Tta;

pub const WIDTHS: [i64; 3] = [64, 256, 256];
/// The whitening layer's filters: 3 channels × 2×2 pixels, and their negatives.
pub const WHITEN_WIDTH: i64 = 2 * 3 * 2 * 2;
/// PyTorch's convention: the weight of the new batch's statistics.
pub const BN_MOMENTUM: f64 = 0.4;
pub const BN_EPS: f64 = 1e-12;
pub const LOGIT_SCALE: f64 = 1.0 / 9.0;
