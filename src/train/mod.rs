//! Training: the harness that runs a recipe's steps with its hooks
//! ([`harness`]), the recipes ([`recipes`]), the optimizers ([`optim`]),
//! a run's settings ([`settings`]), its checkpoints ([`checkpoint`]) and
//! the test-set accuracy ([`evaluation`]).

pub mod checkpoint;
pub mod evaluation;
pub mod harness;
pub mod optim;
pub mod recipes;
pub mod settings;
