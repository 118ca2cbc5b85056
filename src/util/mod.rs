//! The ground floor, below every other layer: files written atomically
//! ([`files`]), devices and CPU threads ([`device`]), torch's random
//! generator ([`rng`]), autocast's precision ([`precision`]), pictures
//! ([`plot`]), progress and JSON lines
//! ([`report`]) and TensorBoard event files ([`tensorboard`]).

pub mod device;
pub mod files;
pub mod plot;
pub mod precision;
pub mod report;
pub mod rng;
pub mod tensorboard;
