//! What both fast recipes' checkpoints share: the network's `state_dict`
//! without BatchNorm's step counters (the step count restores them), then
//! the recipe's optimizer tensors, each keyed after the `state_dict` key it
//! belongs to.

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::Tensor;

use crate::nets::airbench::net::{self, Airbench94};

/// The optimizer tensors' checkpoint keys for a `state_dict` with these
/// keys, in order, each with the key it belongs to.
pub type OptimizerKeys = for<'a> fn(&mut dyn Iterator<Item = &'a str>) -> Vec<(String, &'a str)>;

pub fn is_counter(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// The keys and shapes of a checkpoint for `num_classes`.
pub fn checkpoint_shapes(num_classes: i64, keys: OptimizerKeys) -> Vec<(String, Vec<i64>)> {
    let state = net::state_dict_shapes(num_classes);
    let shape = |key: &str| state.iter().find(|(k, _)| k == key).map(|(_, s)| s.clone());
    let mut shapes: Vec<_> = state
        .iter()
        .filter(|(k, _)| !is_counter(k))
        .cloned()
        .collect();
    for (key, of) in keys(&mut state.iter().map(|(k, _)| k.as_str())) {
        shapes.push((key, shape(of).expect("a state_dict key")));
    }
    shapes
}

/// The checkpoint's tensors: `net`'s `state_dict` without the counters,
/// then `optimizer`, keyed by `keys`, contiguous.
pub fn checkpoint_tensors(
    net: &Airbench94,
    keys: OptimizerKeys,
    optimizer: Vec<Tensor>,
) -> Vec<(String, Tensor)> {
    let state = net.state_dict();
    let keys: Vec<String> = keys(&mut state.iter().map(|(k, _)| k.as_str()))
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let extra: Vec<(String, Tensor)> = keys.into_iter().zip(optimizer).collect();
    state
        .into_iter()
        .filter(|(k, _)| !is_counter(k))
        .chain(extra)
        .map(|(k, t)| (k, t.contiguous()))
        .collect()
}

/// Copies [`checkpoint_tensors`]' `tensors`, saved after `global_step`
/// steps, back into `net` and `optimizer`, and sets the counters.
pub fn restore(
    net: &Airbench94,
    keys: OptimizerKeys,
    optimizer: Vec<Tensor>,
    tensors: &HashMap<String, Tensor>,
    global_step: u64,
) -> Result<()> {
    let get = |key: &str| {
        tensors
            .get(key)
            .with_context(|| format!("the checkpoint has no `{key}`"))
    };
    let state = net.state_dict();
    let keys = keys(&mut state.iter().map(|(k, _)| k.as_str()));
    let saved = state
        .iter()
        .filter(|(k, _)| !is_counter(k))
        .map(|(k, t)| (k.as_str(), t.shallow_clone()))
        .chain(keys.iter().map(|(k, _)| k.as_str()).zip(optimizer));
    for (key, mut t) in saved {
        let value = get(key)?;
        tch::no_grad(|| t.copy_(value));
    }
    for (key, t) in &state {
        if is_counter(key) {
            let _ = tch::no_grad(|| t.shallow_clone().fill_(global_step as i64));
        }
    }
    Ok(())
}

/// Whether every tensor of `net`'s `state_dict` is finite.
pub fn is_finite(net: &Airbench94) -> bool {
    tch::no_grad(|| {
        net.state_dict()
            .iter()
            .all(|(_, t)| t.isfinite().all().int64_value(&[]) == 1)
    })
}
