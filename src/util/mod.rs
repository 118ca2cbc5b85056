//! The ground floor, below every other layer: files written atomically
//! ([`files`]), devices and CPU threads ([`device`]), torch's random
//! generator ([`rng`]), pictures ([`plot`]), progress and JSON lines
//! ([`report`]) and TensorBoard event files ([`tensorboard`]).

pub mod device;
pub mod files;
pub mod plot;
pub mod report;
pub mod rng;
pub mod tensorboard;
