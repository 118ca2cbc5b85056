//! The recipes: each one's training state and step, as the harness drives
//! them ([`crate::train::harness::Recipe`]).
//!
//! * [`tutorial`]: the tutorial's SGD on `Net`, batch 4.
//! * [`airbench`]: airbench94 and airbench94-muon.

pub mod airbench;
pub mod tutorial;

use crate::nets::ModelKind;

/// The keys and shapes of a checkpoint of `model`'s recipe for
/// `num_classes`, beside the network's: the fast recipes' optimizer state
/// ([`crate::train::checkpoint::Layout`]); `None` for the tutorial's,
/// which the checkpoint module knows.
pub fn checkpoint_shapes(model: ModelKind, num_classes: i64) -> Option<Vec<(String, Vec<i64>)>> {
    match model {
        ModelKind::Net => None,
        ModelKind::Airbench94 => Some(airbench::airbench94::checkpoint_shapes(num_classes)),
        ModelKind::Airbench94Muon => {
            Some(airbench::airbench94_muon::checkpoint_shapes(num_classes))
        }
    }
}
