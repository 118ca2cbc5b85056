//! The optimizers: the tutorial's SGD with momentum ([`sgd`]), airbench's
//! Nesterov SGD, schedule and lookahead ([`nesterov`]), and Muon ([`muon`]).
//! Each all-reduces its gradients in a distributed run.

pub mod muon;
pub mod nesterov;
pub mod sgd;

pub use self::sgd::Sgd;
