//! The stability probe: trained logits, scaled until a probability
//! underflows, through each head's loss, and the facts behind the
//! inference answer.

use serde_json::{json, Value};
use tch::nn::Module;
use tch::{Kind, Tensor};

use super::contenders::Head;
use super::output::{dtype_flag, finite_or_string};

/// The gradient of a probe case, summarized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradSummary {
    pub numel: i64,
    pub nan: i64,
    pub inf: i64,
    /// The largest |g| among the finite entries.
    pub max_abs: f64,
}

impl GradSummary {
    fn of(g: &Tensor) -> GradSummary {
        let nan = g.isnan().sum(Kind::Int64).int64_value(&[]);
        let inf = g.isinf().sum(Kind::Int64).int64_value(&[]);
        let finite = g.masked_select(&g.isfinite());
        let max_abs = if finite.numel() > 0 {
            finite.abs().max().double_value(&[])
        } else {
            0.0
        };
        GradSummary {
            numel: g.numel() as i64,
            nan,
            inf,
            max_abs,
        }
    }

    pub fn is_finite(&self) -> bool {
        self.nan == 0 && self.inf == 0
    }

    fn text(&self) -> String {
        match (self.nan, self.inf) {
            (0, 0) => format!("{:.3}", self.max_abs),
            (0, k) => format!("inf {k}/{}", self.numel),
            (k, 0) => format!("NaN {k}/{}", self.numel),
            (k, j) => format!("NaN/inf {}/{}", k + j, self.numel),
        }
    }

    fn json(&self) -> Value {
        json!({"finite": self.is_finite(), "nan": self.nan, "inf": self.inf,
               "numel": self.numel, "max_abs_finite": self.max_abs})
    }
}

/// One row of the stability probe: a batch of logits, and what each head's
/// loss and gradient (with respect to the logits) came to.
#[derive(Debug, Clone)]
pub struct ProbeCase {
    pub input: String,
    /// The logit scale, for the scaled rows.
    pub scale: Option<f64>,
    /// A, B, C in [`Head::ALL`] order.
    pub loss: [f64; 3],
    pub grad: [GradSummary; 3],
}

impl ProbeCase {
    fn new(input: String, scale: Option<f64>, logits: &Tensor, labels: &Tensor) -> ProbeCase {
        let results = Head::ALL.map(|head| {
            let z = logits.detach().copy().set_requires_grad(true);
            let loss = head.loss(&head.output(&z), labels);
            let grad = Tensor::run_backward(&[&loss], &[&z], false, false);
            (loss.double_value(&[]), GradSummary::of(&grad[0]))
        });
        ProbeCase {
            input,
            scale,
            loss: results.map(|r| r.0),
            grad: results.map(|r| r.1),
        }
    }

    /// Whether `head`'s loss and gradient are both finite.
    pub fn finite(&self, head: Head) -> bool {
        let i = Head::ALL
            .iter()
            .position(|&h| h == head)
            .expect("ALL lists every head");
        self.loss[i].is_finite() && self.grad[i].is_finite()
    }
}

/// The scales the probe multiplies the logits by: float32 breaks within
/// the first few, float64 a decade or two later.
pub const PROBE_SCALES: [f64; 5] = [1.0, 10.0, 100.0, 1000.0, 10000.0];

/// The logit gap of the hand-made rows, by dtype: the smallest gap whose
/// `exp(-gap)` underflows to 0. The smallest positive float32 is about
/// `exp(-103.3)`, the smallest positive float64 about `exp(-744.4)`.
pub fn probe_gap(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 746.0,
        _ => 104.0,
    }
}

/// "float32" or "float64", as the sentences say it.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// The probe's rows, in the dtype of the logits it was given.
#[derive(Debug, Clone)]
pub struct Probe {
    pub kind: Kind,
    pub cases: Vec<ProbeCase>,
}

/// The stability probe: `logits` (and their `labels`) scaled by each of
/// [`PROBE_SCALES`], then the hand-made row `[0, gap]` (see [`probe_gap`]),
/// once with the confident class as the label and once with the other one.
pub fn probe(logits: &Tensor, labels: &Tensor) -> Probe {
    let kind = logits.kind();
    let gap = probe_gap(kind);
    let mut cases: Vec<ProbeCase> = PROBE_SCALES
        .iter()
        .map(|&s| ProbeCase::new(format!("logits x{s}"), Some(s), &(logits * s), labels))
        .collect();
    let row = Tensor::from_slice(&[0.0, gap])
        .to_kind(kind)
        .view([1, 2])
        .to_device(logits.device());
    for label in [1i64, 0] {
        let y = Tensor::from_slice(&[label]).to_device(logits.device());
        cases.push(ProbeCase::new(
            format!("[0, {gap}] label {label}"),
            None,
            &row,
            &y,
        ));
    }
    Probe { kind, cases }
}

impl Probe {
    /// The first scale at which B's loss or gradient is not finite.
    pub fn first_broken_scale(&self) -> Option<f64> {
        self.cases
            .iter()
            .find(|c| c.scale.is_some() && !c.finite(Head::Softmax))
            .and_then(|c| c.scale)
    }

    /// Whether A's and C's losses and gradients are finite on every row.
    pub fn fused_finite(&self) -> bool {
        self.cases
            .iter()
            .all(|c| c.finite(Head::Logits) && c.finite(Head::LogSoftmax))
    }

    /// The probe's finding in one sentence, from its numbers.
    pub fn finding(&self) -> String {
        let cases = &self.cases;
        let gap = probe_gap(self.kind);
        let dtype = kind_name(self.kind);
        let b = Head::Softmax;
        let a_and_c_finite = self.fused_finite();
        let scaled: Vec<&ProbeCase> = cases.iter().filter(|c| c.scale.is_some()).collect();
        let first_broken = scaled.iter().find(|c| !c.finite(b));
        let first_inf_loss = scaled.iter().find(|c| !c.loss[1].is_finite());
        let hand = cases
            .iter()
            .filter(|c| c.scale.is_none())
            .find(|c| !c.finite(b));
        let why = format!(
            "because a probability that underflows to 0 in {dtype} (as exp(-{gap}) does) \
         makes log(p) = -inf and its gradient 0/0"
        );
        let where_b = match (first_broken, hand) {
            (Some(c), _) => {
                let g = c.grad[1];
                let mut what = if g.is_finite() {
                    format!("loss {}", c.loss[1])
                } else {
                    let kinds = match (g.nan, g.inf) {
                        (n, 0) => format!("NaN in {n}"),
                        (0, i) => format!("inf in {i}"),
                        (n, i) => format!("NaN in {n} and inf in {i}"),
                    };
                    format!("{kinds} of {} gradient entries", g.numel)
                };
                if let Some(l) = first_inf_loss {
                    what.push_str(&format!(
                        ", loss {} from x{}",
                        l.loss[1],
                        l.scale.unwrap_or_default()
                    ));
                }
                format!(
                    "log(softmax) breaks once the logits are scaled by {} ({what}), {why}",
                    c.scale.unwrap_or_default()
                )
            }
            (None, Some(c)) => format!(
                "log(softmax) stays finite on these logits up to x{}, but breaks on the row {} \
             (loss {}), {why}",
                PROBE_SCALES[PROBE_SCALES.len() - 1],
                c.input,
                c.loss[1]
            ),
            (None, None) => "log(softmax) stayed finite on every input here".to_string(),
        };
        let fused = match (a_and_c_finite, scaled.last()) {
            (true, Some(c)) => format!(
            "while the fused cross-entropy and log_softmax + nll_loss stay finite on every input \
             (loss {:.1} at x{}, largest gradient entry {:.3})",
            c.loss[0],
            c.scale.unwrap_or_default(),
            c.grad[0].max_abs
        ),
            _ => "and even the fused form was not finite on every input".to_string(),
        };
        format!("{where_b}, {fused}.")
    }

    pub fn text(&self, what: &str) -> String {
        let cases = &self.cases;
        let mut out = format!(
        "Stability probe: {what}.\n\
         Each cell: the loss, and the largest |gradient| over the logits or how many of its entries \
         are NaN/inf.\n\
         \x20 {:<20}{:>11}{:>13}{:>11}{:>13}{:>13}{:>16}",
        "input", "A loss", "A grad", "C loss", "C grad", "B loss", "B grad"
    );
        for c in cases {
            // Columns in A, C, B order: the two stable forms, then log(softmax).
            let cell = |i: usize| (loss_cell(c.loss[i]), c.grad[i].text());
            let (al, ag) = cell(0);
            let (cl, cg) = cell(2);
            let (bl, bg) = cell(1);
            out.push_str(&format!(
                "\n  {:<20}{al:>11}{ag:>13}{cl:>11}{cg:>13}{bl:>13}{bg:>16}",
                c.input
            ));
        }
        out.push_str(&format!("\n  {}", self.finding()));
        out
    }

    pub fn json(&self, what: &str) -> Value {
        let rows: Vec<Value> = self
            .cases
            .iter()
            .map(|c| {
                let mut row = json!({"input": c.input, "scale": c.scale});
                for (i, h) in Head::ALL.iter().enumerate() {
                    let l = h.letter().to_lowercase();
                    row[format!("loss_{l}")] = finite_or_string(c.loss[i]);
                    row[format!("grad_{l}")] = c.grad[i].json();
                }
                row
            })
            .collect();
        json!({"event": "probe", "dtype": dtype_flag(self.kind), "batch": what, "cases": rows,
               "first_broken_scale_b": self.first_broken_scale(), "finding": self.finding()})
    }
}

/// A probe loss in at most 10 characters, so that the columns stay apart.
fn loss_cell(loss: f64) -> String {
    if loss.is_finite() && loss.abs() >= 1e6 {
        format!("{loss:.3e}")
    } else {
        format!("{loss:.3}")
    }
}

/// The facts behind the inference answer: on `images`, how often
/// `argmax(logits)` equals `argmax(softmax(logits))`, and how far the
/// softmax rows' sums are from 1.
pub fn inference_check(net: &impl Module, images: &Tensor) -> (i64, i64, f64) {
    tch::no_grad(|| {
        let n = images.size()[0];
        let (mut same, mut max_err) = (0, 0.0f64);
        for start in (0..n).step_by(1000) {
            let logits = net.forward(&images.narrow(0, start, 1000.min(n - start)));
            let p = logits.softmax(-1, logits.kind());
            same += logits
                .argmax(1, false)
                .eq_tensor(&p.argmax(1, false))
                .sum(Kind::Int64)
                .int64_value(&[]);
            let err = (p.sum_dim_intlist(1, false, p.kind()) - 1.0)
                .abs()
                .max()
                .double_value(&[]);
            // f64::max would drop a NaN, the very sign of a diverged model.
            max_err = if max_err.is_nan() || err.is_nan() {
                f64::NAN
            } else {
                max_err.max(err)
            };
        }
        (same, n, max_err)
    })
}

#[cfg(test)]
mod tests {
    use super::super::contenders::tests::batch;
    use super::*;
    use crate::nets::tutorial::Model;
    use tch::Device;

    #[test]
    fn probe_cells_stay_within_their_columns() {
        let g = |nan, inf| GradSummary {
            numel: 160,
            nan,
            inf,
            max_abs: 0.0625,
        };
        assert_eq!(g(0, 0).text(), "0.062");
        assert_eq!(g(0, 3).text(), "inf 3/160");
        assert_eq!(g(2, 0).text(), "NaN 2/160");
        assert_eq!(g(2, 18).text(), "NaN/inf 20/160");
        assert_eq!(loss_cell(628.9349), "628.935");
        assert_eq!(loss_cell(1.234e20), "1.234e20");
        assert_eq!(loss_cell(f64::INFINITY), "inf");
    }

    /// A NaN in one 1000-image chunk of the inference check stays NaN when
    /// a later chunk is finite.
    #[test]
    fn a_nan_softmax_in_any_chunk_is_reported() {
        #[derive(Debug)]
        struct NanOnPositive;
        impl Module for NanOnPositive {
            fn forward(&self, xs: &Tensor) -> Tensor {
                let n = xs.size()[0];
                let positive = xs.flatten(1, -1).select(1, 0).gt(0.0).unsqueeze(1);
                Tensor::zeros([n, 10], (Kind::Float, xs.device())).masked_fill(&positive, f64::NAN)
            }
        }
        let images = Tensor::cat(
            &[
                Tensor::ones([1000, 3, 32, 32], (Kind::Float, Device::Cpu)),
                Tensor::zeros([500, 3, 32, 32], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let (_, n, sum_err) = inference_check(&NanOnPositive, &images);
        assert_eq!(n, 1500);
        assert!(sum_err.is_nan(), "{sum_err}");
    }

    /// The probe on an untrained Net's logits, in `kind`.
    fn probe_in(kind: Kind) -> Probe {
        let (x, y) = batch();
        let model = Model::new(Device::Cpu, Some(1));
        let logits = tch::no_grad(|| model.net.forward(&x.narrow(0, 0, 4)));
        probe(&logits.to_kind(kind), &y.narrow(0, 0, 4))
    }

    #[test]
    fn probe_breaks_log_softmax_only() {
        for kind in [Kind::Float, Kind::Double] {
            let p = probe_in(kind);
            let cases = &p.cases;
            let gap = probe_gap(kind);
            assert_eq!(cases.len(), PROBE_SCALES.len() + 2);
            assert!(p.fused_finite(), "A or C not finite in {kind:?}: {cases:?}");
            // At scale 1 the three agree; at the extreme scale B breaks.
            let first = &cases[0];
            assert!(first.finite(Head::Softmax));
            assert!((first.loss[0] - first.loss[1]).abs() < 1e-6, "{first:?}");
            let extreme = &cases[PROBE_SCALES.len() - 1];
            assert_eq!(extreme.scale, Some(10000.0));
            assert!(!extreme.finite(Head::Softmax), "{kind:?}: {extreme:?}");
            // [0, gap] with the confident class as label: loss 0 for all,
            // but B's gradient is 0/0 at the underflowed probability.
            let right = &cases[PROBE_SCALES.len()];
            assert_eq!(right.input, format!("[0, {gap}] label 1"));
            assert_eq!(right.loss, [0.0, 0.0, 0.0], "{right:?}");
            assert!(right.grad[1].nan > 0, "{right:?}");
            // With the other label, B's loss is -log(0) = inf; A's the gap.
            let wrong = &cases[PROBE_SCALES.len() + 1];
            assert_eq!(wrong.loss[0], gap);
            assert_eq!(wrong.loss[1], f64::INFINITY);
            assert_eq!(wrong.grad[0].max_abs, 1.0);
            let finding = p.finding();
            assert!(
                finding.starts_with("log(softmax) breaks once the logits are scaled by"),
                "{finding}"
            );
            assert!(
                finding.contains(&format!("in {} (as exp(-{gap}) does)", kind_name(kind))),
                "{finding}"
            );
            assert!(finding.contains("stay finite on every input"), "{finding}");
        }
    }

    /// float64's exp underflows some 7 times further out than float32's,
    /// so the same logits break B at a larger scale.
    #[test]
    fn float64_breaks_later() {
        let f32 = probe_in(Kind::Float).first_broken_scale().unwrap();
        let f64 = probe_in(Kind::Double).first_broken_scale().unwrap();
        assert!(f64 > f32, "float32 breaks at x{f32}, float64 at x{f64}");
        // One gap row: finite in float64, broken in float32.
        let row = Tensor::from_slice(&[0.0f64, 200.0]).view([1, 2]);
        let y = Tensor::from_slice(&[0i64]);
        let in64 = ProbeCase::new("".into(), None, &row, &y);
        let in32 = ProbeCase::new("".into(), None, &row.to_kind(Kind::Float), &y);
        assert!(in64.finite(Head::Softmax), "{in64:?}");
        assert!(!in32.finite(Head::Softmax), "{in32:?}");
    }
}
