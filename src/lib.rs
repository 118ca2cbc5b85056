//! tch-cifar: PyTorch's CIFAR-10 tutorial ("Training a Classifier") in Rust
//! with tch, as a library so that the binary and the tests share one code.
//!
//! The modules are layers, listed here top to bottom; each imports only its
//! own layer and those below it (`tests/layers.rs` holds the rule,
//! `docs/development.md` draws it):
//!
//! * [`cli`]: the commands (`train`, `evaluate`, `compare-losses`,
//!   `export`, `predict`, `samples`): flags, checks, and what they print.
//! * [`train`]: the recipes ([`train::recipes`]) above the harness that runs
//!   their steps with hooks, the optimizers ([`train::optim`]), settings,
//!   checkpoints and the test-set evaluation.
//! * [`nets`]: the tutorial's `Net`, airbench94's network, the kind of
//!   network, and either one loaded from a weights file.
//! * [`weights`]: weights on disk: safetensors with metadata, PyTorch's
//!   `torch.save` format, and the rule that no output overwrites an input.
//! * [`data`]: CIFAR-10's binary batches and image folders as tensors, their
//!   download and cache, normalization and augmentation.
//! * [`distributed`]: data-parallel training on libtorch's c10d (torchrun,
//!   Gloo, NCCL).
//! * [`util`]: the ground floor: files, devices, torch's RNG, pictures,
//!   progress and JSON lines, TensorBoard event files.

pub mod cli;
pub mod data;
pub mod distributed;
pub mod nets;
pub mod train;
pub mod util;
pub mod weights;
