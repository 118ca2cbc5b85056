//! The fast recipe's optimizer: Nesterov SGD in two parameter groups with a
//! piecewise-linear learning-rate schedule, and the lookahead EMA.
//!
//! The hyperparameters are airbench's "decoupled" ones (per 1024 images,
//! weight decay independent of the learning rate), turned into
//! `torch.optim.SGD`'s as the reference does:
//!
//! ```python
//! kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
//! lr = LR / kilostep_scale; wd = WEIGHT_DECAY * batch_size / kilostep_scale
//! groups = [dict(params=norm_biases, lr=lr * 64, weight_decay=wd / (lr * 64)),
//!           dict(params=others, lr=lr, weight_decay=wd / lr)]
//! SGD(groups, momentum=momentum, nesterov=True)
//! ```

use anyhow::{ensure, Result};
use tch::Tensor;

use super::{BATCH_SIZE, BIAS_SCALER, LR, MOMENTUM, WEIGHT_DECAY};

/// The learning-rate factor of step `step` (0-based) of `total`: 0.2 → 1
/// over the first 23 % of the steps, then 1 → 0.07 at the last
/// (`np.interp(step, [0, int(0.23·total), total], [0.2, 1, 0.07])`).
pub fn lr_factor(step: u64, total: u64) -> f64 {
    let warmup = (total as f64 * 0.23) as u64;
    if step < warmup {
        let frac = step as f64 / warmup as f64;
        0.2 * (1.0 - frac) + frac
    } else {
        let frac = (step - warmup) as f64 / (total - warmup) as f64;
        (1.0 - frac) + 0.07 * frac
    }
}

/// The learning rates of step `step` (0-based) of `total`: the norm
/// biases' group's, then the other parameters'.
pub fn learning_rates(step: u64, total: u64) -> [f64; 2] {
    let lr = group_lr();
    let factor = lr_factor(step, total);
    [lr * BIAS_SCALER * factor, lr * factor]
}

/// The other parameters' group's rate before the schedule's factor.
fn group_lr() -> f64 {
    LR / kilostep_scale()
}

/// The reference's `1024 * (1 + 1 / (1 - momentum))`.
fn kilostep_scale() -> f64 {
    1024.0 * (1.0 + 1.0 / (1.0 - MOMENTUM))
}

/// The lookahead's EMA decay after step `step` (1-based) of `total`:
/// `0.95**5 * (step / total)**3`, computed in f32 as the reference's tensor
/// is. Small early, so the weights run free at first.
pub fn ema_decay(step: u64, total: u64) -> f64 {
    let frac = step as f32 / total as f32;
    f64::from(0.95f32.powi(5) * frac * frac * frac)
}

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
    /// The recipe's two groups: the BatchNorm biases at 64× the learning
    /// rate, and the rest.
    pub fn new(norm_biases: Vec<Tensor>, others: Vec<Tensor>) -> NesterovSgd {
        let kilostep_scale = kilostep_scale();
        let lr = group_lr();
        let wd = WEIGHT_DECAY * BATCH_SIZE as f64 / kilostep_scale;
        let lr_biases = lr * BIAS_SCALER;
        NesterovSgd::with_groups(
            vec![
                (norm_biases, lr_biases, wd / lr_biases),
                (others, lr, wd / lr),
            ],
            MOMENTUM,
        )
    }

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
    fn schedule_corners() {
        // int(476 · 0.23) = 109 warm-up steps.
        let total = 476;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(lr_factor(0, total), 0.2));
        assert!(close(lr_factor(109, total), 1.0));
        assert!(close(lr_factor(total, total), 0.07));
        // Linear between the corners.
        assert!(close(lr_factor(50, total), 0.2 + 0.8 * 50.0 / 109.0));
        assert!(close(lr_factor(108, total), 0.2 + 0.8 * 108.0 / 109.0));
        assert!(close(lr_factor(300, total), 1.0 - 0.93 * 191.0 / 367.0));
    }

    #[test]
    fn ema_decay_ramps_cubically() {
        assert_eq!(ema_decay(0, 476), 0.0);
        assert!((ema_decay(476, 476) - 0.95f64.powi(5)).abs() < 1e-6);
        let half = ema_decay(238, 476);
        assert!((half - 0.95f64.powi(5) / 8.0).abs() < 1e-6);
    }

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
        let mut sgd = NesterovSgd::new(vec![], vec![x.shallow_clone(), frozen.shallow_clone()]);
        let group = &sgd.groups[1];
        let (lr, wd, mu) = (group.lr, group.weight_decay, MOMENTUM);
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
