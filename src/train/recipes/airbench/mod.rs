//! The fast recipes on airbench94's network, in the same parts as their
//! PyTorch references (`scripts/airbench94.py`, `scripts/airbench94_muon.py`):
//!
//! * [`loader`]: the augmented training set, served in mini-batches.
//! * [`airbench94`]: Nesterov SGD with the lookahead EMA, and its step.
//! * [`airbench94_muon`]: the record recipe, Muon for the filters, and its step.
//! * [`state`]: what both recipes' checkpoints share.

pub mod airbench94;
pub mod airbench94_muon;
pub mod loader;
pub mod state;

pub use self::airbench94::FastRecipe;
pub use self::airbench94_muon::MuonRecipe;

use tch::{Kind, Reduction, Tensor};

use crate::nets::airbench::net::Airbench94;
use crate::util::precision::Precision;

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
/// The largest random translation, in pixels.
pub const TRANSLATE: i64 = 2;
/// Steps between lookahead updates.
pub const LOOKAHEAD_EVERY: u64 = 5;
/// Training images whose patches give the whitening filters.
pub const WHITEN_IMAGES: i64 = 5000;

/// Both recipes' forward pass and loss, the network under `precision`'s
/// autocast and the loss in float32:
///
/// ```python
/// F.cross_entropy(model(inputs).float(), labels, label_smoothing=0.2, reduction="sum")
/// ```
pub fn summed_loss(
    net: &Airbench94,
    precision: Precision,
    inputs: &Tensor,
    labels: &Tensor,
) -> Tensor {
    let outputs = precision.autocast(inputs.device(), || net.forward_t(inputs, true));
    outputs.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        labels,
        None,
        Reduction::Sum,
        -100,
        LABEL_SMOOTHING,
    )
}
