//! The four trainings `compare-losses` runs side by side, what tells them
//! apart, and how far their losses and gradients are from A's at step 0.

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tch::nn::Module;
use tch::{Device, Kind, Reduction, Tensor};

use super::output::sci;
use crate::nets::tutorial::{Model, PARAMETERS};
use crate::train::optim::Sgd;

/// What sits on top of `Net`'s logits: a closed choice of three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Nothing: the output is the logits (A, A').
    Logits,
    /// A softmax: the output is a probability vector (B).
    Softmax,
    /// A log-softmax: the output is log-probabilities (C).
    LogSoftmax,
}

/// Everything that differs between the heads.
struct HeadSpec {
    layer: &'static str,
    loss_name: &'static str,
    output: fn(&Tensor) -> Tensor,
    loss: fn(&Tensor, &Tensor) -> Tensor,
}

impl Head {
    pub const ALL: [Head; 3] = [Head::Logits, Head::Softmax, Head::LogSoftmax];

    // The one place where the heads are told apart. Each works in its
    // input's dtype, float32 or float64.
    fn spec(self) -> HeadSpec {
        match self {
            Head::Logits => HeadSpec {
                layer: "logits",
                loss_name: "cross_entropy_loss",
                output: |z| z.shallow_clone(),
                // libtorch's cross_entropy_loss, PyTorch's F.cross_entropy:
                // log_softmax in the input's dtype, then nll_loss. (tch's
                // cross_entropy_for_logits, which `train` uses, runs the same
                // kernels in float32 but always takes its log_softmax in
                // float32, which would round a float64 run to float32.)
                loss: |z, y| z.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0),
            },
            Head::Softmax => HeadSpec {
                layer: "softmax",
                loss_name: "nll_loss(log(p))",
                output: |z| z.softmax(-1, z.kind()),
                loss: |p, y| p.log().nll_loss(y),
            },
            Head::LogSoftmax => HeadSpec {
                layer: "log_softmax",
                loss_name: "nll_loss",
                output: |z| z.log_softmax(-1, z.kind()),
                loss: |l, y| l.nll_loss(y),
            },
        }
    }

    /// "A", "B" or "C": the training with this head and batches in order.
    pub fn letter(self) -> &'static str {
        Role::ALL
            .iter()
            .find(|r| r.head() == self && !r.reversed())
            .expect("every head has a role")
            .letter()
    }

    /// The last layer, as the tables print it.
    pub fn layer(self) -> &'static str {
        self.spec().layer
    }

    /// The loss, as the tables print it.
    pub fn loss_name(self) -> &'static str {
        self.spec().loss_name
    }

    /// The network's output given `Net`'s logits.
    pub fn output(self, logits: &Tensor) -> Tensor {
        (self.spec().output)(logits)
    }

    /// The mean loss of `output` (from [`Head::output`]) against `labels`.
    pub fn loss(self, output: &Tensor, labels: &Tensor) -> Tensor {
        (self.spec().loss)(output, labels)
    }
}

/// One of the four trainings: a head, and the order in which it sees the
/// images of each mini-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Logits and cross-entropy: the tutorial.
    A,
    /// A again, with each mini-batch reversed: the same mathematics, summed
    /// in another order. The rounding control.
    AReversed,
    /// Softmax and `nll_loss(log(p))`.
    B,
    /// Log-softmax and `nll_loss`.
    C,
}

impl Role {
    /// The trainings, in the order of every table and array.
    pub const ALL: [Role; 4] = [Role::A, Role::AReversed, Role::B, Role::C];

    // The one place where the roles are told apart.
    fn spec(self) -> (&'static str, &'static str, Head, bool) {
        match self {
            Role::A => ("A", "a", Head::Logits, false),
            Role::AReversed => ("A'", "a_rev", Head::Logits, true),
            Role::B => ("B", "b", Head::Softmax, false),
            Role::C => ("C", "c", Head::LogSoftmax, false),
        }
    }

    /// "A", "A'", "B" or "C", as the tables print it.
    pub fn letter(self) -> &'static str {
        self.spec().0
    }

    /// "a", "a_rev", "b" or "c": the suffix of its JSON and CSV fields.
    pub fn key(self) -> &'static str {
        self.spec().1
    }

    pub fn head(self) -> Head {
        self.spec().2
    }

    /// Whether it sees each mini-batch in reverse order.
    pub fn reversed(self) -> bool {
        self.spec().3
    }

    /// Its place in [`Role::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `Net` with a head on top: the network whose output a loss sees.
#[derive(Debug)]
pub struct WithHead {
    pub model: Model,
    pub head: Head,
}

impl Module for WithHead {
    /// Takes images in any float dtype: float32 test images meet a float64
    /// model cast (exactly) to its dtype.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = self.model.flat.kind();
        let logits = if xs.kind() == kind {
            self.model.net.forward(xs)
        } else {
            self.model.net.forward(&xs.to_kind(kind))
        };
        self.head.output(&logits)
    }
}

/// One of the trainings, its optimizer and its skipped steps.
pub struct Contender {
    pub role: Role,
    pub net: WithHead,
    opt: Sgd,
    /// Steps whose loss or gradient was not finite, so not applied.
    pub skipped: u64,
    /// The first of them (1-based, counted over all epochs).
    pub first_skipped: Option<u64>,
}

impl Contender {
    /// `Net` initialized from `seed` (in float32, as PyTorch's `Net()`),
    /// then cast to `kind`.
    pub fn new(role: Role, device: Device, kind: Kind, seed: u64, lr: f64, momentum: f64) -> Self {
        let mut model = Model::new(device, Some(seed));
        if kind != model.flat.kind() {
            model.set_kind(kind);
        }
        let opt = Sgd::new(&model, lr, momentum);
        Contender {
            role,
            net: WithHead {
                model,
                head: role.head(),
            },
            opt,
            skipped: 0,
            first_skipped: None,
        }
    }

    /// The loss on one mini-batch and its flat gradient; no update yet.
    pub fn loss_and_gradient(&self, images: &Tensor, labels: &Tensor) -> (f64, Tensor) {
        let (loss, grad) = self.unread_loss_and_gradient(images, labels);
        (loss.double_value(&[]), grad)
    }

    /// [`Contender::loss_and_gradient`] with the loss left unread, on the device.
    pub fn unread_loss_and_gradient(&self, images: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let loss = self.net.head.loss(&self.net.forward(images), labels);
        let grad = self.opt.gradient(&loss);
        (loss, grad)
    }

    /// Applies `grad` if it and `loss` are finite; otherwise leaves the
    /// weights and momentum as they are, counts the step and returns false.
    pub fn update(&mut self, step: u64, loss: f64, grad: &Tensor) -> bool {
        self.update_checked(step, loss, grad, all_finite(grad))
    }

    /// [`Contender::update`] with `grad`'s check already read
    /// (`finite_sum` is finite).
    pub fn update_checked(
        &mut self,
        step: u64,
        loss: f64,
        grad: &Tensor,
        grad_finite: bool,
    ) -> bool {
        if loss.is_finite() && grad_finite {
            self.opt.apply(grad);
            true
        } else {
            self.skipped += 1;
            self.first_skipped.get_or_insert(step);
            false
        }
    }

    /// The weights, flat in [`PARAMETERS`] order.
    pub fn flat(&self) -> &Tensor {
        &self.net.model.flat
    }

    /// The momentum buffer, flat like the parameters.
    pub fn momentum_buffer(&self) -> &Tensor {
        self.opt.momentum_buffer()
    }
}

/// Whether every entry of `t` is finite, from its sum: one NaN or inf
/// makes the sum non-finite. (A finite gradient whose sum overflows
/// would count as non-finite too; such a step is diverging anyway.) One
/// reduction instead of `isfinite().all()`'s two keeps the per-step cost
/// down at batch size 4, where every operation counts.
pub fn all_finite(t: &Tensor) -> bool {
    finite_sum(t).double_value(&[]).is_finite()
}

/// The sum whose finiteness [`all_finite`] reads, left on the device.
pub fn finite_sum(t: &Tensor) -> Tensor {
    t.sum(t.kind())
}

/// A, A', B and C from one seed in `kind`, checked to hold identical weights.
pub fn contenders(
    device: Device,
    kind: Kind,
    seed: u64,
    lr: f64,
    momentum: f64,
) -> Result<Vec<Contender>> {
    let all: Vec<Contender> = Role::ALL
        .iter()
        .map(|&r| Contender::new(r, device, kind, seed, lr, momentum))
        .collect();
    for c in &all[1..] {
        ensure!(
            c.flat().equal(all[0].flat()),
            "model {} does not start from A's weights under seed {seed}",
            c.role.letter()
        );
    }
    Ok(all)
}

/// The largest absolute value of `flat` within each parameter, in
/// [`PARAMETERS`] order.
pub fn max_abs_per_parameter(flat: &Tensor) -> Vec<(&'static str, f64)> {
    let mut offset = 0;
    PARAMETERS
        .iter()
        .map(|(name, shape)| {
            let n: i64 = shape.iter().product();
            let m = flat.narrow(0, offset, n).abs().max().double_value(&[]);
            offset += n;
            (*name, m)
        })
        .collect()
}

/// The largest |a - b| over all entries: one reduction and one read.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    tch::no_grad(|| (a - b).abs().max().double_value(&[]))
}

/// The largest of per-parameter values, or the first NaN: a NaN must not
/// read as 0.
pub fn largest(v: &[(&'static str, f64)]) -> (&'static str, f64) {
    v.iter().copied().fold(("", 0.0f64), |m, p| {
        if !m.1.is_nan() && (p.1.is_nan() || p.1 > m.1) {
            p
        } else {
            m
        }
    })
}

/// The losses and gradients of every training on the first mini-batch,
/// from the shared initial weights.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// In [`Role::ALL`] order.
    pub losses: [f64; 4],
    pub parameters: Vec<GradDiff>,
}

/// How far the others' gradients are from A's, for one parameter.
#[derive(Debug, Clone)]
pub struct GradDiff {
    pub name: &'static str,
    /// max |g_A|, for scale.
    pub max_a: f64,
    /// max |g_A - g_X| for X in [`Role::ALL`] order (A's own is 0).
    pub diff: [f64; 4],
}

/// The roles compared with A, in the order the tables show them.
const OTHERS: [Role; 3] = [Role::AReversed, Role::B, Role::C];

impl InitReport {
    pub fn new(losses: [f64; 4], grads: [&Tensor; 4]) -> InitReport {
        let scale = max_abs_per_parameter(grads[0]);
        let diffs: Vec<Vec<(&str, f64)>> = grads
            .iter()
            .map(|g| max_abs_per_parameter(&(grads[0] - *g)))
            .collect();
        let parameters = scale
            .iter()
            .enumerate()
            .map(|(i, &(name, max_a))| GradDiff {
                name,
                max_a,
                diff: [0, 1, 2, 3].map(|r| diffs[r][i].1),
            })
            .collect();
        InitReport { losses, parameters }
    }

    /// The largest gradient difference between A and `role`.
    pub fn max_grad_diff(&self, role: Role) -> f64 {
        self.parameters
            .iter()
            .map(|p| p.diff[role.index()])
            .fold(0.0, f64::max)
    }

    /// |loss_A - loss_role|.
    pub fn loss_diff(&self, role: Role) -> f64 {
        (self.losses[0] - self.losses[role.index()]).abs()
    }

    pub fn text(&self) -> String {
        let losses = Role::ALL.map(|r| format!("{} {:.6}", r.letter(), self.losses[r.index()]));
        let diffs = OTHERS.map(|r| format!("|A-{}| {}", r.letter(), sci(self.loss_diff(r))));
        let mut out = format!(
            "Step 0: the first mini-batch, from the shared initial weights \
             (A' sees its images in reverse order)\n  loss {}   {}",
            losses.join("   "),
            diffs.join("   ")
        );
        out.push_str(&format!("\n  {:<14}{:>10}", "gradient of", "max|gA|"));
        for r in OTHERS {
            out.push_str(&format!("{:>14}", format!("max|gA-g{}|", r.letter())));
        }
        for p in &self.parameters {
            out.push_str(&format!("\n  {:<14}{:>10.2e}", p.name, p.max_a));
            for r in OTHERS {
                out.push_str(&format!("{:>14}", sci(p.diff[r.index()])));
            }
        }
        out
    }

    /// The `init` event; the `pair` suffixes are `ab`, `a_rev` and `ac`.
    pub fn json(&self) -> Value {
        let pair = |r: Role| pair_key(r);
        let per: serde_json::Map<String, Value> = self
            .parameters
            .iter()
            .map(|p| {
                let mut m = serde_json::Map::new();
                m.insert("max_abs_a".into(), json!(p.max_a));
                for r in OTHERS {
                    m.insert(
                        format!("max_abs_diff_{}", pair(r)),
                        json!(p.diff[r.index()]),
                    );
                }
                (p.name.to_string(), Value::Object(m))
            })
            .collect();
        let mut event = json!({"event": "init", "gradients": per});
        for r in Role::ALL {
            event[format!("loss_{}", r.key())] = json!(self.losses[r.index()]);
        }
        for r in OTHERS {
            event[format!("loss_diff_{}", pair(r))] = json!(self.loss_diff(r));
            event[format!("max_grad_diff_{}", pair(r))] = json!(self.max_grad_diff(r));
        }
        event
    }
}

/// The JSON suffix of a comparison with A: `ab`, `ac`, or `a_rev`.
pub fn pair_key(role: Role) -> String {
    match role {
        Role::AReversed => "a_rev".into(),
        r => format!("a{}", r.key()),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Eight deterministic images and labels, without torch's global RNG
    /// (which other tests reseed concurrently).
    pub fn batch() -> (Tensor, Tensor) {
        let images = (Tensor::arange(8 * 3 * 32 * 32, (Kind::Float, Device::Cpu)) * 0.37)
            .sin()
            .view([8, 3, 32, 32]);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
        (images, labels)
    }

    fn init_report(kind: Kind) -> InitReport {
        let (x, y) = batch();
        let (x, y) = (x.to_kind(kind), y);
        let all = contenders(Device::Cpu, kind, 1, 0.001, 0.9).unwrap();
        let results: Vec<(f64, Tensor)> = all
            .iter()
            .map(|c| {
                if c.role.reversed() {
                    c.loss_and_gradient(&x.flip([0]), &y.flip([0]))
                } else {
                    c.loss_and_gradient(&x, &y)
                }
            })
            .collect();
        InitReport::new(
            [0, 1, 2, 3].map(|i| results[i].0),
            [0, 1, 2, 3].map(|i| &results[i].1),
        )
    }

    #[test]
    fn at_initialization_the_four_agree() {
        let init = init_report(Kind::Float);
        let [a, a_rev, b, c] = init.losses;
        assert!((a - 10f64.ln()).abs() < 0.1, "about ln 10 at init: {a}");
        // A and B: the same mathematics, rounded differently in float32:
        // an ulp of the loss (2.4e-7 near 2.3), gradients ~1e-8.
        assert!((a - b).abs() <= 1e-6, "loss A {a} vs B {b}");
        assert!(init.max_grad_diff(Role::B) <= 1e-5, "{:?}", init.parameters);
        // A' sums the same four terms in another order: the same rounding.
        assert!((a - a_rev).abs() <= 1e-6, "loss A {a} vs A' {a_rev}");
        assert!(init.max_grad_diff(Role::AReversed) <= 1e-5);
        // A and C run the same kernels: equal, not merely close.
        assert_eq!(a, c);
        assert_eq!(init.max_grad_diff(Role::C), 0.0, "{:?}", init.parameters);
        assert_eq!(init.parameters.len(), PARAMETERS.len());
        assert!(init.parameters.iter().all(|p| p.max_a > 0.0));
    }

    /// In float64 the step-0 differences shrink by the ratio of the two
    /// rounding units (2^29).
    #[test]
    fn in_float64_the_step0_differences_are_float64_rounding() {
        let init = init_report(Kind::Double);
        let [a, a_rev, b, _] = init.losses;
        assert!((a - b).abs() <= 1e-14, "loss A {a} vs B {b}");
        assert!((a - a_rev).abs() <= 1e-14, "loss A {a} vs A' {a_rev}");
        assert!(init.max_grad_diff(Role::B) <= 1e-14);
        assert!(init.max_grad_diff(Role::AReversed) <= 1e-14);
    }

    /// Every training starts from `torch.manual_seed(S); Net()`'s weights;
    /// in float64, those weights cast, bit for bit.
    #[test]
    fn every_role_starts_from_the_float32_init() {
        let reference = Model::new(Device::Cpu, Some(3));
        for kind in [Kind::Float, Kind::Double] {
            let all = contenders(Device::Cpu, kind, 3, 0.001, 0.9).unwrap();
            for c in &all {
                assert_eq!(c.flat().kind(), kind);
                assert!(
                    c.flat().equal(&reference.flat.to_kind(kind)),
                    "{:?}",
                    c.role
                );
                // The parameters are still views of the flat buffer.
                for p in c.net.model.parameters() {
                    assert_eq!(p.kind(), kind);
                }
            }
            // A' is A's weights, bit for bit, in the same dtype.
            assert!(all[Role::AReversed.index()].flat().equal(all[0].flat()));
        }
    }

    #[test]
    fn float64_updates_stay_in_float64_and_move_the_views() {
        let (x, y) = batch();
        let mut a = Contender::new(Role::A, Device::Cpu, Kind::Double, 2, 0.01, 0.9);
        let before = a.flat().copy();
        let (loss, grad) = a.loss_and_gradient(&x.to_kind(Kind::Double), &y);
        assert_eq!(grad.kind(), Kind::Double);
        assert!(a.update(1, loss, &grad));
        assert_eq!(a.momentum_buffer().kind(), Kind::Double);
        let moved = max_abs_diff(a.flat(), &before);
        assert!(moved > 0.0);
        // The layers read the flat buffer: the next loss sees the update.
        let (again, _) = a.loss_and_gradient(&x.to_kind(Kind::Double), &y);
        assert_ne!(again, loss);
    }

    #[test]
    fn heads_keep_the_argmax_and_normalize() {
        for kind in [Kind::Float, Kind::Double] {
            let z = Tensor::from_slice(&[1.0f32, 3.0, -2.0, 0.5, 0.0, 7.0])
                .view([2, 3])
                .to_kind(kind);
            let p = Head::Softmax.output(&z);
            assert_eq!(p.kind(), kind);
            assert_eq!(Head::LogSoftmax.output(&z).kind(), kind);
            let sums = Vec::<f64>::try_from(p.sum_dim_intlist(1, false, kind)).unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
            for h in Head::ALL {
                let classes = Vec::<i64>::try_from(h.output(&z).argmax(1, false)).unwrap();
                assert_eq!(classes, [1, 2], "{h:?}");
            }
            let logp = Head::LogSoftmax.output(&z);
            assert!(logp.exp().allclose(&p, 1e-6, 1e-7, false));
        }
    }

    #[test]
    fn roles_and_letters() {
        assert_eq!(Role::ALL.map(|r| r.letter()), ["A", "A'", "B", "C"]);
        assert_eq!(Head::ALL.map(|h| h.letter()), ["A", "B", "C"]);
        assert_eq!(Role::ALL.map(pair_key), ["aa", "a_rev", "ab", "ac"]);
        for (i, r) in Role::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn a_non_finite_gradient_skips_the_update() {
        let (x, y) = batch();
        let mut b = Contender::new(Role::B, Device::Cpu, Kind::Float, 2, 0.01, 0.9);
        // A huge bias makes class 0's probability 1 and the others 0.
        let mut vars = b.net.model.vs.variables();
        let bias = vars.get_mut("fc3.bias").unwrap();
        tch::no_grad(|| {
            bias.copy_(&Tensor::from_slice(&[
                500.0f32, 0., 0., 0., 0., 0., 0., 0., 0., 0.,
            ]))
        });
        let before = b.flat().copy();
        let (loss, grad) = b.loss_and_gradient(&x, &y);
        assert!(!loss.is_finite() || !all_finite(&grad));
        assert!(!b.update(3, loss, &grad));
        assert!(!b.update(4, loss, &grad));
        assert_eq!((b.skipped, b.first_skipped), (2, Some(3)));
        assert!(b.flat().equal(&before), "weights moved");
        assert!(all_finite(b.momentum_buffer()));
        assert_eq!(b.momentum_buffer().abs().max().double_value(&[]), 0.0);

        // A on the same weights is fine and does update.
        let mut a = Contender::new(Role::A, Device::Cpu, Kind::Float, 2, 0.01, 0.9);
        let (loss, grad) = a.loss_and_gradient(&x, &y);
        assert!(a.update(1, loss, &grad));
        assert_eq!(a.skipped, 0);
    }
}
