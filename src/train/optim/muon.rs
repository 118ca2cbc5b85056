//! Muon, the record recipe's optimizer for the convolution filters:
//! Nesterov momentum, then each filter's update replaced by its nearest
//! semi-orthogonal matrix (by a few Newton–Schulz steps), after the filter
//! is rescaled to a fixed norm.
//!
//! ```python
//! buf.mul_(momentum).add_(g); g = g.add(buf, alpha=momentum)
//! p.data.mul_(len(p.data)**0.5 / p.data.norm())
//! p.data.add_(newton_schulz(g.reshape(len(g), -1)).view(g.shape), alpha=-lr)
//! ```

use tch::{Kind, Tensor};

/// The quintic iteration's coefficients: the steepest slope at zero that
/// still maps (0, 1] into about [0.7, 1.2].
const COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);
/// Keeps a zero gradient's normalization finite.
const EPS: f64 = 1e-7;

/// `steps` quintic Newton–Schulz iterations from `g` (2-d) normalized to
/// spectral norm ≤ 1, in `kind`: about `U Vᵀ` of `g`'s SVD, its singular
/// values pushed towards 1. Works on the wide orientation (rows ≤ columns),
/// where `X Xᵀ` is the smaller product.
pub fn newton_schulz(g: &Tensor, steps: usize, kind: Kind) -> Tensor {
    let (a, b, c) = COEFFICIENTS;
    let x = g.to_kind(kind);
    let mut x = &x / (x.norm() + EPS);
    let tall = g.size()[0] > g.size()[1];
    if tall {
        x = x.tr();
    }
    for _ in 0..steps {
        let s = x.matmul(&x.tr()); // [rows, rows]
                                   // Python's `b * s + c * s @ s`: the scalar binds first.
        let t = &s * b + (&s * c).matmul(&s);
        x = &x * a + t.matmul(&x);
    }
    if tall {
        x = x.tr();
    }
    x
}

/// Muon over a list of 4-d filters, one momentum buffer each.
pub struct Muon {
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    lr: f64,
    momentum: f64,
    steps: usize,
    /// Newton–Schulz's precision.
    kind: Kind,
}

impl Muon {
    pub fn new(params: Vec<Tensor>, lr: f64, momentum: f64, steps: usize, kind: Kind) -> Muon {
        Muon {
            buffers: params.iter().map(|p| p.zeros_like()).collect(),
            params,
            lr,
            momentum,
            steps,
            kind,
        }
    }

    /// One update from `grads` (one per parameter) at `factor` times the
    /// learning rate.
    pub fn update(&mut self, grads: &[Tensor], factor: f64) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per filter");
        let lr = self.lr * factor;
        tch::no_grad(|| {
            for ((param, buffer), grad) in self.params.iter_mut().zip(&mut self.buffers).zip(grads)
            {
                let _ = buffer.g_mul_scalar_(self.momentum).g_add_(grad);
                let g = grad + &*buffer * self.momentum;
                let rows = param.size()[0];
                let _ = param.g_mul_(&(param.norm().reciprocal() * (rows as f64).sqrt()));
                let update = newton_schulz(&g.reshape([rows, -1]), self.steps, self.kind)
                    .view_as(&g)
                    .to_kind(param.kind());
                let _ = param.g_add_(&(update * -lr));
            }
        });
    }

    /// The filters it trains.
    pub fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }

    /// The momentum buffers, in the parameters' order: what a checkpoint saves.
    pub fn buffers(&self) -> Vec<Tensor> {
        self.buffers.iter().map(Tensor::shallow_clone).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Of a wide matrix: the square roots of `X Xᵀ`'s eigenvalues.
    fn singular_values(x: &Tensor) -> Vec<f64> {
        let x = x.to_kind(Kind::Double);
        let x = if x.size()[0] > x.size()[1] { x.tr() } else { x };
        let s = x.matmul(&x.tr()).linalg_eigvalsh("L").sqrt();
        Vec::try_from(&s).unwrap()
    }

    /// Five steps take every singular value of a badly conditioned matrix
    /// into the iteration's band around 1, in either orientation and
    /// precision, and keep the singular vectors: `X` stays aligned with `G`.
    #[test]
    fn newton_schulz_orthogonalizes() {
        let g = crate::util::rng::with_torch_rng(Some(4), || {
            let qr = |rows, cols| {
                let x = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
                Tensor::linalg_qr(&x, "reduced").0
            };
            let (u, v) = (qr(24, 24), qr(60, 24));
            let s = Tensor::logspace(-1.0, 1.0, 24, 10.0, (Kind::Float, Device::Cpu));
            (u * s.unsqueeze(0)).matmul(&v.tr()) // [24, 60], singular values 0.1..10
        });
        for kind in [Kind::Float, Kind::BFloat16] {
            for m in [g.shallow_clone(), g.tr()] {
                let x = newton_schulz(&m, 5, kind);
                assert_eq!(x.size(), m.size());
                assert_eq!(x.kind(), kind);
                for s in singular_values(&x) {
                    assert!((0.6..1.3).contains(&s), "{kind:?}: singular value {s}");
                }
                let alignment = (x.to_kind(Kind::Float) * &m)
                    .sum(Kind::Float)
                    .double_value(&[]);
                assert!(alignment > 0.0);
            }
        }
    }

    /// One step by hand: the momentum, the weight normalized to norm
    /// √rows, then the orthogonalized update at the scaled rate.
    #[test]
    fn an_update_normalizes_then_steps() {
        let (p, grad) = crate::util::rng::with_torch_rng(Some(9), || {
            let shape = [4, 2, 3, 3];
            let p = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 3.0;
            (p, Tensor::randn(shape, (Kind::Float, Device::Cpu)))
        });
        let before = p.copy();
        let mut muon = Muon::new(vec![p.shallow_clone()], 0.24, 0.6, 3, Kind::Float);
        muon.update(std::slice::from_ref(&grad), 0.5);
        // First step: buffer = g, Nesterov's g + 0.6·buffer = 1.6·g.
        assert_eq!(muon.buffers()[0], grad);
        let normalized = &before * (2.0 / before.norm().double_value(&[]));
        let step =
            newton_schulz(&(&grad * 1.6).reshape([4, -1]), 3, Kind::Float).view([4, 2, 3, 3]);
        let want = normalized - step * 0.12;
        let diff = (&p - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }
}
