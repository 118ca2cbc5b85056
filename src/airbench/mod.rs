//! The fast recipe: airbench94 (Keller Jordan's CIFAR-10 recipe that
//! reaches 94 % in under ten epochs), in the same parts as its PyTorch
//! reference, `scripts/airbench94.py`.
//!
//! * [`net`]: the network, `Airbench94`, keyed like the PyTorch module.
//! * [`whiten`]: its first layer's filters, from the data.
//! * [`augment`]: flips and translations, batched on the device.
//! * [`loader`]: the augmented training set, served in mini-batches.
//! * [`optim`]: Nesterov SGD, the schedule and the lookahead EMA.
//! * [`recipe`]: the training step and test-time augmentation.
//! * [`state`]: what both recipes' checkpoints share.
//!
//! The record recipe, airbench94-muon (`scripts/airbench94_muon.py`),
//! trains the same network ([`net::Variant::Muon`]) on the same data:
//!
//! * [`muon`]: the Muon optimizer and its Newton–Schulz iteration.
//! * [`muon_recipe`]: its schedule, optimizers and training step.

pub mod augment;
pub mod loader;
pub mod muon;
pub mod muon_recipe;
pub mod net;
pub mod optim;
pub mod recipe;
pub mod state;
pub mod whiten;

pub use self::muon_recipe::MuonRecipe;
pub use self::net::{Airbench94, Variant};
pub use self::recipe::{FastRecipe, Tta};

/// Passes over the training set (the schedule's length).
pub const EPOCHS: f64 = 9.9;
pub const BATCH_SIZE: i64 = 1024;
/// Learning rate per 1024 images, in airbench's decoupled form.
pub const LR: f64 = 11.5;
pub const MOMENTUM: f64 = 0.85;
/// Weight decay per 1024 images, decoupled from the learning rate.
pub const WEIGHT_DECAY: f64 = 0.0153;
/// The BatchNorm biases' learning rate, relative to the others'.
pub const BIAS_SCALER: f64 = 64.0;
pub const LABEL_SMOOTHING: f64 = 0.2;
/// Epochs during which the whitening layer's bias trains.
pub const WHITEN_BIAS_EPOCHS: u64 = 3;
pub const WIDTHS: [i64; 3] = [64, 256, 256];
/// The whitening layer's filters: 3 channels × 2×2 pixels, and their negatives.
pub const WHITEN_WIDTH: i64 = 2 * 3 * 2 * 2;
/// PyTorch's convention: the weight of the new batch's statistics.
pub const BN_MOMENTUM: f64 = 0.4;
pub const BN_EPS: f64 = 1e-12;
pub const LOGIT_SCALE: f64 = 1.0 / 9.0;
/// The largest random translation, in pixels.
pub const TRANSLATE: i64 = 2;
/// Steps between lookahead updates.
pub const LOOKAHEAD_EVERY: u64 = 5;
/// Training images whose patches give the whitening filters.
pub const WHITEN_IMAGES: i64 = 5000;
/// CIFAR-10's per-channel mean and standard deviation.
pub const CIFAR_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
