//! tch-cifar: PyTorch's CIFAR-10 tutorial ("Training a Classifier") in Rust
//! with tch, as a library so that the binary and the tests share one code.
//!
//! * [`data`]: the datasets (CIFAR-10's binary batches, image folders), on
//!   disk and as tensors, and downloading CIFAR-10 ([`data::download`]).
//! * [`model`]: the tutorial's `Net` and its weights files; [`airbench`]: the
//!   fast recipe's network, augmentation and optimizer.
//! * [`classifier`]: either network, loaded from a weights file.
//! * [`train`] and [`evaluate`]: the recipe and the test-set accuracy.
//! * [`settings`] and [`checkpoint`]: a training run's settings, and saving and
//!   resuming it.
//! * [`distributed`]: data-parallel training on libtorch's c10d (torchrun, Gloo).
//! * [`compare`]: cross-entropy on logits against softmax + `nll_loss(log p)`.
//! * [`pth`], [`export`]: PyTorch's `torch.save` format and TorchScript export.
//! * [`predict`], [`samples`]: classifying image files, and a grid of training images.
//! * [`outputs`]: output files' formats, and the rule that none overwrites an input.
//! * [`tensorboard`]: TensorBoard event files for `--logdir`.

pub mod airbench;
pub mod checkpoint;
pub mod classifier;
pub mod compare;
pub mod data;
pub mod device;
pub mod distributed;
pub mod evaluate;
pub mod export;
pub mod fsutil;
pub mod model;
pub mod optim;
pub mod outputs;
pub mod plot;
pub mod predict;
pub mod pth;
pub mod report;
pub mod samples;
pub mod settings;
pub mod tensorboard;
pub mod train;
