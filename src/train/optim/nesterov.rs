//! airbench's optimizer: `torch.optim.SGD(nesterov=True)` with weight
//! decay in parameter groups, and the lookahead EMA. The recipes set the
//! groups' hyperparameters (see
//! [`crate::train::recipes::airbench::airbench94`]).

use anyhow::{ensure, Result};
use tch::Tensor;

/// One group of parameters with their learning rate and weight decay
/// (PyTorch's coupled form), and a momentum buffer each.
struct Group {
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    lr: f64,
    weight_decay: f64,
}

/// `torch.optim.SGD(nesterov=True)` with weight decay, per parameter `p`
/// with gradient `g`, buffer `b` (zero at first, which equals PyTorch's
/// `b = g` on the first step) and learning rate `lr · factor`:
///
/// ```text
/// g = g + wd·p;  b = μ·b + g;  g = g + μ·b;  p = p − lr·factor·g
/// ```
pub struct NesterovSgd {
    groups: Vec<Group>,
    momentum: f64,
}

impl NesterovSgd {
    /// `SGD([dict(params=…, lr=…, weight_decay=…), …], momentum, nesterov=True)`
    /// from `(params, lr, weight_decay)` per group.
    pub fn with_groups(groups: Vec<(Vec<Tensor>, f64, f64)>, momentum: f64) -> NesterovSgd {
        let groups = groups
            .into_iter()
            .map(|(params, lr, weight_decay)| Group {
                buffers: params.iter().map(|p| p.zeros_like()).collect(),
                params,
                lr,
                weight_decay,
            })
            .collect();
        NesterovSgd { groups, momentum }
    }

    /// Backward from `loss` to the parameters for which `trains` is true
    /// (in group order), then one update of those at `factor` times the
    /// learning rate. The others are left alone, decay included, as
    /// PyTorch skips a parameter whose `.grad` is `None`.
    pub fn step(&mut self, loss: &Tensor, factor: f64, trains: impl Fn(usize) -> bool) {
        let params = self.params();
        let chosen: Vec<usize> = (0..params.len()).filter(|&i| trains(i)).collect();
        let inputs: Vec<Tensor> = chosen.iter().map(|&i| params[i].shallow_clone()).collect();
        let grads = Tensor::run_backward(&[loss], &inputs, false, false);
        // DDP's all-reduce, in a distributed run: the global batch's gradients.
        crate::distributed::sync_gradients(loss, &grads);
        let mut all: Vec<Option<Tensor>> = (0..params.len()).map(|_| None).collect();
        for (i, g) in chosen.into_iter().zip(grads) {
            all[i] = Some(g);
        }
        self.update(&all, &vec![factor; self.groups.len()]);
    }

    /// One update of every parameter that has a gradient in `grads` (one
    /// entry per parameter, in group order), each group at `factors[g]`
    /// times its learning rate.
    pub fn update(&mut self, grads: &[Option<Tensor>], factors: &[f64]) {
        assert_eq!(factors.len(), self.groups.len(), "one factor per group");
        let momentum = self.momentum;
        let mut grads = grads.iter();
        tch::no_grad(|| {
            for (group, &factor) in self.groups.iter_mut().zip(factors) {
                for (param, buffer) in group.params.iter_mut().zip(&mut group.buffers) {
                    let Some(grad) = grads.next().expect("a gradient slot per parameter") else {
                        continue;
                    };
                    let grad = grad + &*param * group.weight_decay;
                    let _ = buffer.g_mul_scalar_(momentum).g_add_(&grad);
                    let update = grad + &*buffer * momentum;
                    let _ = param.g_add_(&(update * (-group.lr * factor)));
                }
            }
        });
    }

    /// The parameters, in group order.
    pub fn params(&self) -> Vec<Tensor> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(Tensor::shallow_clone))
            .collect()
    }

    /// The momentum buffers, in group order: what a checkpoint saves.
    pub fn buffers(&self) -> Vec<Tensor> {
        self.groups
            .iter()
            .flat_map(|g| g.buffers.iter().map(Tensor::shallow_clone))
            .collect()
    }

    /// Restores buffers saved from [`NesterovSgd::buffers`].
    pub fn set_buffers(&mut self, saved: &[Tensor]) -> Result<()> {
        let mine = self.buffers();
        ensure!(
            saved.len() == mine.len(),
            "{} momentum buffers, expected {}",
            saved.len(),
            mine.len()
        );
        for (i, (mut b, s)) in mine.into_iter().zip(saved).enumerate() {
            ensure!(
                b.size() == s.size(),
                "momentum buffer {i} has shape {:?}, expected {:?}",
                s.size(),
                b.size()
            );
            tch::no_grad(|| b.copy_(s));
        }
        Ok(())
    }
}

/// An EMA copy of the weights that the weights are pulled back to every few
/// steps (airbench's `LookaheadState`): `ema = lerp(ema, now, 1 − decay);
/// now = ema`, over every float tensor of the state dict, BatchNorm's
/// running statistics included.
pub struct Lookahead {
    /// `(live tensor, its EMA)`.
    pairs: Vec<(Tensor, Tensor)>,
}

impl Lookahead {
    /// Starts the EMA at the current values of `state`.
    pub fn new(state: Vec<Tensor>) -> Lookahead {
        let pairs = state
            .into_iter()
            .filter(|t| t.is_floating_point())
            .map(|t| {
                let ema = tch::no_grad(|| t.detach().copy());
                (t, ema)
            })
            .collect();
        Lookahead { pairs }
    }

    pub fn update(&mut self, decay: f64) {
        tch::no_grad(|| {
            for (now, ema) in &mut self.pairs {
                let _ = ema.lerp_(&*now, 1.0 - decay);
                now.copy_(ema);
            }
        });
    }

    /// The EMA tensors, in the order of the state given to [`Lookahead::new`].
    pub fn ema(&self) -> Vec<Tensor> {
        self.pairs.iter().map(|(_, e)| e.shallow_clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn lookahead_pulls_the_weights_to_the_ema() {
        let w = Tensor::from_slice(&[0.0f32, 10.0]);
        let count = Tensor::from(3i64);
        let mut la = Lookahead::new(vec![w.shallow_clone(), count.shallow_clone()]);
        // Integer state is left out.
        assert_eq!(la.ema().len(), 1);
        tch::no_grad(|| {
            w.shallow_clone()
                .copy_(&Tensor::from_slice(&[4.0f32, 20.0]))
        });
        la.update(0.75);
        // ema = 0.75·old + 0.25·new, and the weights take it.
        assert_eq!(la.ema()[0], Tensor::from_slice(&[1.0f32, 12.5]));
        assert_eq!(w, Tensor::from_slice(&[1.0f32, 12.5]));
        // Decay 1 keeps the EMA and puts it back into the weights.
        tch::no_grad(|| w.shallow_clone().copy_(&Tensor::from_slice(&[9.0f32, 9.0])));
        la.update(1.0);
        assert_eq!(w, Tensor::from_slice(&[1.0f32, 12.5]));
    }

    /// Two steps against the update rule written out by hand, and a frozen
    /// parameter that neither moves nor decays.
    #[test]
    fn nesterov_with_weight_decay() {
        let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
        let frozen = Tensor::from_slice(&[5.0f64]).set_requires_grad(true);
        let (lr, wd, mu) = (0.01, 0.3, 0.85);
        let mut sgd = NesterovSgd::with_groups(
            vec![
                (vec![], 0.64, 0.0),
                (vec![x.shallow_clone(), frozen.shallow_clone()], lr, wd),
            ],
            mu,
        );
        let (mut p, mut b) = ([1.0f64, 2.0], [0.0f64, 0.0]);
        for factor in [0.2, 0.5] {
            // loss = sum(x²)·3: gradient 6x.
            let loss = (&x * &x).sum(Kind::Double) * 3.0 + frozen.sum(Kind::Double);
            sgd.step(&loss, factor, |i| i == 0);
            for i in 0..2 {
                let g = 6.0 * p[i] + wd * p[i];
                b[i] = mu * b[i] + g;
                p[i] -= lr * factor * (g + mu * b[i]);
            }
            let got: Vec<f64> = Vec::try_from(&x).unwrap();
            for i in 0..2 {
                assert!((got[i] - p[i]).abs() < 1e-12, "{got:?} vs {p:?}");
            }
        }
        assert_eq!(frozen.double_value(&[0]), 5.0);
        assert_eq!(sgd.buffers()[1].double_value(&[0]), 0.0);
    }
}
