//! `compare-losses`: the tutorial's `Net` trained three ways, side by side,
//! to show with numbers what `nn.CrossEntropyLoss` on logits is, and why a
//! softmax output layer scored with `nll_loss(log(p))` is the same
//! mathematics but not the same numerics.
//!
//! * **A**: `Net`'s logits, loss `cross_entropy_for_logits` (log-softmax
//!   and NLL in one call: the tutorial's `nn.CrossEntropyLoss`);
//! * **B**: a softmax as the last layer, so the output is a probability
//!   vector, and loss `nll_loss(log(p))`;
//! * **C**: a log-softmax as the last layer, and loss `nll_loss`.
//!
//! The three start from the same weights (one seed, checked bit for bit)
//! and see the same mini-batches in the same order, so every difference
//! between them comes from the arithmetic of their last layer and loss.
//!
//! When a model's loss or gradient is not finite (B's, once a probability
//! underflows to 0), that model skips the update for that step, its
//! weights and momentum untouched, and the step is counted and reported.
//! `train` stops on a non-finite loss instead; here the failure is the
//! thing being shown, and a NaN is never let into the weights.
//!
//! In tch, `cross_entropy_for_logits` is `log_softmax(-1).nll_loss()`,
//! which is also what libtorch's `cross_entropy_loss` (PyTorch's
//! `F.cross_entropy`) runs. A and C therefore execute the same kernels and
//! agree exactly; C is there to show that a normalized output layer is
//! fine as long as it is a log-softmax.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use plotters::style::RGBColor;
use serde_json::{json, Value};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::data::{self, DataArgs, Split};
use crate::device::device_name;
use crate::evaluate::{evaluate, predict_classes, Evaluation};
use crate::model::{Model, PARAMETERS};
use crate::optim::Sgd;
use crate::plot::{Line, LineChart};
use crate::report::{optional_path_json, step_bar, Reporter};
use crate::train::{epoch_batches, Recipe};

/// Train Net with cross-entropy on logits, with softmax + nll_loss(log p)
/// and with log-softmax + nll_loss, side by side, and compare them.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub recipe: Recipe,
    /// Passes over the training set.
    #[arg(long, default_value_t = crate::train::DEFAULT_EPOCHS, value_parser = clap::value_parser!(u64).range(1..=crate::train::MAX_EPOCHS))]
    pub epochs: u64,
    /// Write the loss of A, B and C at every mini-batch to this CSV file.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw the three loss curves on one chart, as a PNG file.
    #[arg(long, value_name = "FILE.png", value_parser = crate::plot::parse_png)]
    pub plot: Option<PathBuf>,
    /// Print one JSON object per line instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// What sits on top of `Net`'s logits: a closed choice of three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Nothing: the output is the logits (A).
    Logits,
    /// A softmax: the output is a probability vector (B).
    Softmax,
    /// A log-softmax: the output is log-probabilities (C).
    LogSoftmax,
}

/// Everything that differs between the heads.
struct HeadSpec {
    letter: &'static str,
    layer: &'static str,
    loss_name: &'static str,
    output: fn(&Tensor) -> Tensor,
    loss: fn(&Tensor, &Tensor) -> Tensor,
}

impl Head {
    pub const ALL: [Head; 3] = [Head::Logits, Head::Softmax, Head::LogSoftmax];

    // The one place where the heads are told apart.
    fn spec(self) -> HeadSpec {
        match self {
            Head::Logits => HeadSpec {
                letter: "A",
                layer: "logits",
                loss_name: "cross_entropy_for_logits",
                output: |z| z.shallow_clone(),
                loss: |z, y| z.cross_entropy_for_logits(y),
            },
            Head::Softmax => HeadSpec {
                letter: "B",
                layer: "softmax",
                loss_name: "nll_loss(log(p))",
                output: |z| z.softmax(-1, Kind::Float),
                loss: |p, y| p.log().nll_loss(y),
            },
            Head::LogSoftmax => HeadSpec {
                letter: "C",
                layer: "log_softmax",
                loss_name: "nll_loss",
                output: |z| z.log_softmax(-1, Kind::Float),
                loss: |l, y| l.nll_loss(y),
            },
        }
    }

    /// "A", "B" or "C".
    pub fn letter(self) -> &'static str {
        self.spec().letter
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

/// `Net` with a head on top: the network whose output a loss sees.
#[derive(Debug)]
pub struct WithHead {
    pub model: Model,
    pub head: Head,
}

impl Module for WithHead {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.head.output(&self.model.net.forward(xs))
    }
}

/// One of the three models, its optimizer and its skipped steps.
pub struct Contender {
    pub net: WithHead,
    opt: Sgd,
    /// Steps whose loss or gradient was not finite, so not applied.
    pub skipped: u64,
    /// The first of them (1-based, counted over all epochs).
    pub first_skipped: Option<u64>,
}

impl Contender {
    pub fn new(head: Head, device: Device, seed: u64, lr: f64, momentum: f64) -> Contender {
        let model = Model::new(device, Some(seed));
        let opt = Sgd::new(&model, lr, momentum);
        Contender {
            net: WithHead { model, head },
            opt,
            skipped: 0,
            first_skipped: None,
        }
    }

    /// The loss on one mini-batch and its flat gradient; no update yet.
    pub fn loss_and_gradient(&self, images: &Tensor, labels: &Tensor) -> (f64, Tensor) {
        let loss = self.net.head.loss(&self.net.forward(images), labels);
        let grad = self.opt.gradient(&loss);
        (loss.double_value(&[]), grad)
    }

    /// Applies `grad` if it and `loss` are finite; otherwise leaves the
    /// weights and momentum as they are, counts the step and returns false.
    pub fn update(&mut self, step: u64, loss: f64, grad: &Tensor) -> bool {
        if loss.is_finite() && all_finite(grad) {
            self.opt.apply(grad);
            true
        } else {
            self.skipped += 1;
            self.first_skipped.get_or_insert(step);
            false
        }
    }

    /// The momentum buffer, flat like the parameters.
    pub fn momentum_buffer(&self) -> &Tensor {
        self.opt.momentum_buffer()
    }
}

/// Whether every entry of `t` is finite, from its sum: one NaN or inf
/// makes the sum non-finite. (A finite gradient whose sum overflows f32
/// would count as non-finite too; such a step is diverging anyway.) One
/// reduction instead of `isfinite().all()`'s two keeps the per-step cost
/// down at batch size 4, where every operation counts.
fn all_finite(t: &Tensor) -> bool {
    t.sum(Kind::Float).double_value(&[]).is_finite()
}

/// A, B and C from one seed, checked to hold identical weights.
pub fn contenders(device: Device, seed: u64, lr: f64, momentum: f64) -> Result<Vec<Contender>> {
    let all: Vec<Contender> = Head::ALL
        .iter()
        .map(|&h| Contender::new(h, device, seed, lr, momentum))
        .collect();
    for c in &all[1..] {
        ensure!(
            c.net.model.flat.equal(&all[0].net.model.flat),
            "model {} does not start from A's weights under seed {seed}",
            c.net.head.letter()
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

/// A's, B's and C's loss and gradients on the first mini-batch, from the
/// shared initial weights.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// A, B, C.
    pub losses: [f64; 3],
    pub parameters: Vec<GradDiff>,
}

/// How far B's and C's gradients are from A's, for one parameter.
#[derive(Debug, Clone)]
pub struct GradDiff {
    pub name: &'static str,
    /// max |g_A|, for scale.
    pub max_a: f64,
    /// max |g_A - g_B|.
    pub ab: f64,
    /// max |g_A - g_C|.
    pub ac: f64,
}

impl InitReport {
    pub fn new(losses: [f64; 3], grads: [&Tensor; 3]) -> InitReport {
        let scale = max_abs_per_parameter(grads[0]);
        let ab = max_abs_per_parameter(&(grads[0] - grads[1]));
        let ac = max_abs_per_parameter(&(grads[0] - grads[2]));
        let parameters = scale
            .iter()
            .zip(ab)
            .zip(ac)
            .map(|((&(name, max_a), (_, ab)), (_, ac))| GradDiff {
                name,
                max_a,
                ab,
                ac,
            })
            .collect();
        InitReport { losses, parameters }
    }

    pub fn max_grad_diff_ab(&self) -> f64 {
        self.parameters.iter().map(|p| p.ab).fold(0.0, f64::max)
    }

    pub fn max_grad_diff_ac(&self) -> f64 {
        self.parameters.iter().map(|p| p.ac).fold(0.0, f64::max)
    }

    fn text(&self) -> String {
        let [a, b, c] = self.losses;
        let mut out = format!(
            "Step 0: the first mini-batch, from the shared initial weights\n\
             \x20 loss A {a:.6}   B {b:.6}   C {c:.6}   |A-B| {}   |A-C| {}\n\
             \x20 {:<14}{:>10}{:>14}{:>14}",
            sci((a - b).abs()),
            sci((a - c).abs()),
            "gradient of",
            "max|gA|",
            "max|gA-gB|",
            "max|gA-gC|"
        );
        for p in &self.parameters {
            out.push_str(&format!(
                "\n  {:<14}{:>10.2e}{:>14}{:>14}",
                p.name,
                p.max_a,
                sci(p.ab),
                sci(p.ac)
            ));
        }
        out
    }

    fn json(&self) -> Value {
        let per: serde_json::Map<String, Value> = self
            .parameters
            .iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    json!({"max_abs_a": p.max_a, "max_abs_diff_ab": p.ab, "max_abs_diff_ac": p.ac}),
                )
            })
            .collect();
        json!({
            "event": "init",
            "loss_a": self.losses[0], "loss_b": self.losses[1], "loss_c": self.losses[2],
            "loss_diff_ab": (self.losses[0] - self.losses[1]).abs(),
            "loss_diff_ac": (self.losses[0] - self.losses[2]).abs(),
            "max_grad_diff_ab": self.max_grad_diff_ab(),
            "max_grad_diff_ac": self.max_grad_diff_ac(),
            "gradients": per,
        })
    }
}

/// The per-step record of a side-by-side run.
#[derive(Debug, Clone)]
pub struct History {
    /// Loss of A, B, C at every step, in order.
    pub losses: Vec<[f32; 3]>,
    pub steps_per_epoch: u64,
    pub init: Option<InitReport>,
    /// The largest |loss_A - loss_B| over the steps where both are finite,
    /// and the step (1-based) where it happened; `None` if there was none.
    pub max_loss_diff_ab: Option<(f64, u64)>,
    pub train_seconds: f64,
}

/// Trains the contenders on `train` with one shared sequence of
/// mini-batches, reporting step 0 and the running losses.
pub fn side_by_side(
    contenders: &mut [Contender],
    train: &Split,
    recipe: &Recipe,
    seed: u64,
    reporter: &mut Reporter,
) -> Result<History> {
    ensure!(!train.is_empty(), "the training set is empty");
    let device = contenders[0].net.model.vs.device();
    let n = train.len();
    let steps_per_epoch = n.div_ceil(recipe.batch_size as usize) as u64;
    let mut history = History {
        losses: Vec::with_capacity((recipe.epochs * steps_per_epoch) as usize),
        steps_per_epoch,
        init: None,
        max_loss_diff_ab: None,
        train_seconds: 0.0,
    };
    let bar = reporter.attach_bar(step_bar(recipe.epochs * steps_per_epoch));
    let start = Instant::now();
    for epoch in 1..=recipe.epochs {
        bar.set_prefix(format!("epoch {epoch}/{}", recipe.epochs));
        let mut window = [RunningLoss::default(); 3];
        for (i, index) in epoch_batches(seed, epoch - 1, n, recipe.batch_size, device).enumerate() {
            let step = i as u64 + 1;
            let global = history.losses.len() as u64 + 1;
            let (images, labels) = train.select(&index);
            let results: Vec<(f64, Tensor)> = contenders
                .iter()
                .map(|c| c.loss_and_gradient(&images, &labels))
                .collect();
            let losses = [results[0].0, results[1].0, results[2].0];
            if global == 1 {
                let init = InitReport::new(losses, [&results[0].1, &results[1].1, &results[2].1]);
                reporter.emit(|| init.text(), init.json());
                text_only(reporter, loss_header(recipe.log_every));
                history.init = Some(init);
            }
            for (c, (loss, grad)) in contenders.iter_mut().zip(&results) {
                if !c.update(global, *loss, grad) && c.skipped == 1 {
                    let letter = c.net.head.letter();
                    reporter.emit(
                        || {
                            format!(
                                "  step {global}: {letter}'s loss is {loss} or its gradient is not \
                                 finite; {letter} skips this update (and any later such step, counted)"
                            )
                        },
                        json!({"event": "non_finite", "model": letter, "step": global,
                               "epoch": epoch, "loss": finite_or_string(*loss)}),
                    );
                }
            }
            for (w, &l) in window.iter_mut().zip(&losses) {
                w.add(l);
            }
            if losses[0].is_finite() && losses[1].is_finite() {
                let d = (losses[0] - losses[1]).abs();
                if history.max_loss_diff_ab.is_none_or(|(max, _)| d > max) {
                    history.max_loss_diff_ab = Some((d, global));
                }
            }
            history.losses.push(losses.map(|l| l as f32));
            if step.is_multiple_of(recipe.log_every) {
                let max_diff = history.max_loss_diff_ab.map(|(d, _)| d);
                let means = window.map(|w| w.mean());
                reporter.emit(
                    || loss_line(epoch, step, &window, max_diff),
                    json!({"event": "loss", "epoch": epoch, "step": step,
                           "loss_a": means[0], "loss_b": means[1], "loss_c": means[2],
                           "non_finite_a": window[0].non_finite, "non_finite_b": window[1].non_finite,
                           "non_finite_c": window[2].non_finite,
                           "max_loss_diff_ab_so_far": max_diff}),
                );
                window = [RunningLoss::default(); 3];
            }
            bar.inc(1);
        }
    }
    history.train_seconds = start.elapsed().as_secs_f64();
    reporter.finish_bar();
    Ok(history)
}

/// The tutorial's running loss, over the finite losses of the window; the
/// others are counted apart so that one inf does not hide the rest.
#[derive(Debug, Clone, Copy, Default)]
struct RunningLoss {
    sum: f64,
    finite: u64,
    non_finite: u64,
}

impl RunningLoss {
    fn add(&mut self, loss: f64) {
        if loss.is_finite() {
            self.sum += loss;
            self.finite += 1;
        } else {
            self.non_finite += 1;
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.finite > 0).then(|| self.sum / self.finite as f64)
    }

    fn text(&self) -> String {
        let mean = self.mean().map_or("-".into(), |m| format!("{m:.3}"));
        if self.non_finite > 0 {
            format!("{mean} ({} not finite)", self.non_finite)
        } else {
            mean
        }
    }
}

fn loss_header(every: u64) -> String {
    format!(
        "\nRunning loss, mean over {every} mini-batches\n  {:<14}{:>8}{:>8}{:>8}   max|lossA-lossB| so far",
        "[epoch, step]", "A", "B", "C"
    )
}

fn loss_line(epoch: u64, step: u64, window: &[RunningLoss; 3], max_diff: Option<f64>) -> String {
    format!(
        "  {:<14}{:>8}{:>8}{:>8}   {}",
        format!("[{epoch}, {step:5}]"),
        window[0].text(),
        window[1].text(),
        window[2].text(),
        max_diff.map_or("-".into(), sci)
    )
}

/// A small difference in scientific notation, and an exact zero as "0".
fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.1e}")
    }
}

/// Prints `text` unless the output is JSON.
fn text_only(reporter: &Reporter, text: String) {
    if !reporter.is_json() {
        reporter.emit(|| text, Value::Null);
    }
}

/// JSON has no inf or NaN: those become strings.
fn finite_or_string(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

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

/// The scales the probe multiplies the logits by.
pub const PROBE_SCALES: [f64; 4] = [1.0, 10.0, 100.0, 1000.0];

/// The logit gap of the hand-made rows: float32's `exp(-104)` underflows
/// to 0 (the smallest positive float32 is about `exp(-103.3)`).
pub const PROBE_GAP: f64 = 104.0;

/// The stability probe: `logits` (and their `labels`) scaled by each of
/// [`PROBE_SCALES`], then the hand-made row `[0, 104]`, once with the
/// confident class as the label and once with the other one.
pub fn probe(logits: &Tensor, labels: &Tensor) -> Vec<ProbeCase> {
    let mut cases: Vec<ProbeCase> = PROBE_SCALES
        .iter()
        .map(|&s| ProbeCase::new(format!("logits x{s}"), Some(s), &(logits * s), labels))
        .collect();
    let row = Tensor::from_slice(&[0.0f32, PROBE_GAP as f32])
        .view([1, 2])
        .to_device(logits.device());
    for label in [1i64, 0] {
        let y = Tensor::from_slice(&[label]).to_device(logits.device());
        cases.push(ProbeCase::new(
            format!("[0, {PROBE_GAP}] label {label}"),
            None,
            &row,
            &y,
        ));
    }
    cases
}

/// The probe's finding in one sentence, from its numbers.
pub fn probe_finding(cases: &[ProbeCase]) -> String {
    let b = Head::Softmax;
    let a_and_c_finite = cases
        .iter()
        .all(|c| c.finite(Head::Logits) && c.finite(Head::LogSoftmax));
    let scaled: Vec<&ProbeCase> = cases.iter().filter(|c| c.scale.is_some()).collect();
    let first_broken = scaled.iter().find(|c| !c.finite(b));
    let first_inf_loss = scaled.iter().find(|c| !c.loss[1].is_finite());
    let hand = cases
        .iter()
        .filter(|c| c.scale.is_none())
        .find(|c| !c.finite(b));
    let why = format!(
        "because a probability that underflows to 0 in float32 (as exp(-{PROBE_GAP}) does) \
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

fn probe_text(cases: &[ProbeCase], what: &str) -> String {
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
    out.push_str(&format!("\n  {}", probe_finding(cases)));
    out
}

/// A probe loss in at most 10 characters, so that the columns stay apart.
fn loss_cell(loss: f64) -> String {
    if loss.is_finite() && loss.abs() >= 1e6 {
        format!("{loss:.3e}")
    } else {
        format!("{loss:.3}")
    }
}

fn probe_json(cases: &[ProbeCase], what: &str) -> Value {
    let rows: Vec<Value> = cases
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
    json!({"event": "probe", "batch": what, "cases": rows, "finding": probe_finding(cases)})
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
            let p = logits.softmax(-1, Kind::Float);
            same += logits
                .argmax(1, false)
                .eq_tensor(&p.argmax(1, false))
                .sum(Kind::Int64)
                .int64_value(&[]);
            let err = (p.sum_dim_intlist(1, false, Kind::Float) - 1.0)
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

fn accuracy_text(evals: &[Evaluation]) -> String {
    let mut out = format!(
        "Test accuracy on {} images{:>9}{:>9}{:>9}",
        evals[0].total(),
        "A",
        "B",
        "C"
    );
    let pct = |a: Option<f64>, digits: usize| a.map_or("n/a".into(), |a| format!("{a:.digits$} %"));
    out.push_str(&format!(
        "\n  {:<24}{:>9}{:>9}{:>9}",
        "all classes",
        pct(Some(evals[0].accuracy()), 2),
        pct(Some(evals[1].accuracy()), 2),
        pct(Some(evals[2].accuracy()), 2)
    ));
    let per: Vec<Vec<Option<f64>>> = evals.iter().map(|e| e.per_class()).collect();
    for (c, name) in evals[0].classes.iter().enumerate() {
        out.push_str(&format!(
            "\n  {:<24}{:>9}{:>9}{:>9}",
            name,
            pct(per[0][c], 1),
            pct(per[1][c], 1),
            pct(per[2][c], 1)
        ));
    }
    out
}

/// Writes `step,epoch,loss_a,loss_b,loss_c`, one row per mini-batch.
pub fn write_csv(path: &Path, history: &History) -> Result<()> {
    crate::fsutil::write_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let mut write = || -> std::io::Result<()> {
            writeln!(w, "step,epoch,loss_a,loss_b,loss_c")?;
            for (i, [a, b, c]) in history.losses.iter().enumerate() {
                let epoch = i as u64 / history.steps_per_epoch + 1;
                writeln!(w, "{},{epoch},{a},{b},{c}", i + 1)?;
            }
            w.flush()
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    })
}

/// The smoothing window of the chart: 200 steps, or fewer on short runs so
/// that the curves keep some shape.
pub fn smoothing_window(steps: usize) -> usize {
    200.min((steps / 10).max(1))
}

/// Trailing mean over `window` steps of the finite values, at every step.
fn smoothed(values: impl Iterator<Item = f32>, window: usize) -> Vec<(f64, f64)> {
    let values: Vec<f32> = values.collect();
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut out = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        if v.is_finite() {
            sum += v as f64;
            count += 1;
        }
        if i >= window && values[i - window].is_finite() {
            sum -= values[i - window] as f64;
            count -= 1;
        }
        if i + 1 >= window && count > 0 {
            out.push(((i + 1) as f64, sum / count as f64));
        }
    }
    out
}

/// Draws the three smoothed loss curves, A wide and pale under B dashed
/// and C thin, so that all three show where they overlap.
pub fn write_plot(path: &Path, history: &History) -> Result<()> {
    let window = smoothing_window(history.losses.len());
    // 600 points of a 200-step mean are plenty for a 1200-pixel-wide chart.
    let every = (history.losses.len() / 600).max(1);
    let styles = [
        (RGBColor(140, 180, 235), 7, None),
        (RGBColor(215, 40, 40), 2, Some((10, 7))),
        (RGBColor(20, 20, 20), 1, None),
    ];
    let lines = Head::ALL
        .iter()
        .zip(styles)
        .enumerate()
        .map(|(i, (head, (color, width, dash)))| {
            let points = smoothed(history.losses.iter().map(|l| l[i]), window);
            Line {
                label: format!("{}: {} + {}", head.letter(), head.layer(), head.loss_name()),
                points: points.into_iter().step_by(every).collect(),
                color,
                width,
                dash,
            }
        })
        .collect();
    let chart = LineChart {
        title: format!("Training loss of A, B and C (mean over the last {window} mini-batches)"),
        x_label: "mini-batch".into(),
        y_label: "loss".into(),
        lines,
    };
    chart.save(path, 1200, 600)
}

/// `tch-cifar compare-losses`.
pub fn run(args: CompareArgs) -> Result<()> {
    let started = Instant::now();
    let recipe = &Recipe {
        epochs: args.epochs,
        ..args.recipe.clone()
    };
    let device = recipe.device()?;
    let cpu = recipe.cpu_settings();
    // Until the test set is evaluated.
    let training = cpu.apply();
    for path in args.csv.iter().chain(&args.plot) {
        crate::fsutil::check_writable(path)?;
    }
    let source = args.data.prepare()?;
    // As in `train`: the test set is loaded after training, but checked now
    // so that bad test data fails before minutes of training.
    let (train_set, test_split) = source.load_for_training(device)?;
    ensure!(
        train_set.classes.len() == data::CLASSES.len(),
        "compare-losses trains the tutorial's ten-class Net, and {} has {} classes",
        source.describe(),
        train_set.classes.len()
    );
    let seed = recipe.seed_or_random();
    let mut reporter = Reporter::new(args.json);
    eprintln!(
        "comparing losses on {} with {} images, seed {seed} (--seed {seed} repeats this run)",
        recipe.describe_device(device),
        train_set.len()
    );
    let steps_per_epoch = train_set.len().div_ceil(recipe.batch_size as usize) as u64;
    let setup = json!({
        "device": device_name(device), "seed": seed, "epochs": recipe.epochs,
        "batch_size": recipe.batch_size, "lr": recipe.lr, "momentum": recipe.momentum,
        "train_images": train_set.len(), "steps": recipe.epochs * steps_per_epoch,
        "threads": cpu.threads, "cpu_conv": cpu.conv.name(),
    });
    let mut start = setup.clone();
    start["event"] = json!("start");
    start["models"] = json!(Head::ALL
        .iter()
        .map(|h| (
            h.letter().to_string(),
            json!({"layer": h.layer(), "loss": h.loss_name()})
        ))
        .collect::<serde_json::Map<_, _>>());
    reporter.emit(
        || {
            let mut out = "Net trained three ways, from the same initial weights, on the same \
                           mini-batches:"
                .to_string();
            for h in Head::ALL {
                let last = format!("{} layer", h.layer());
                out.push_str(&format!(
                    "\n  {}  {last:<20}-> {}",
                    h.letter(),
                    h.loss_name()
                ));
            }
            out.push_str(&format!(
                "\n{}, {} training images, seed {seed}, {} epoch{} of {steps_per_epoch} \
                 mini-batches of {}, lr {}, momentum {}\n",
                device_name(device),
                train_set.len(),
                recipe.epochs,
                if recipe.epochs == 1 { "" } else { "s" },
                recipe.batch_size,
                recipe.lr,
                recipe.momentum
            ));
            out
        },
        start,
    );

    let mut trio = contenders(device, seed, recipe.lr, recipe.momentum)?;
    let history = side_by_side(&mut trio, &train_set, recipe, seed, &mut reporter)?;
    drop(training);
    drop(train_set);

    let test = test_split.load(device)?;
    let evals: Vec<Evaluation> = trio.iter().map(|c| evaluate(&c.net, &test, 1000)).collect();
    let preds: Vec<Tensor> = trio[..2]
        .iter()
        .map(|c| predict_classes(&c.net, &test.images, 1000))
        .collect();
    let agree = preds[0]
        .eq_tensor(&preds[1])
        .sum(Kind::Int64)
        .int64_value(&[]);
    let total = test.len() as i64;
    let agree_pct = 100.0 * agree as f64 / total.max(1) as f64;
    let flat = |i: usize| &trio[i].net.model.flat;
    let param_ab = max_abs_per_parameter(&(flat(0) - flat(1)));
    let param_ac = max_abs_per_parameter(&(flat(0) - flat(2)));
    let param_scale = flat(0).abs().max().double_value(&[]);
    // The largest difference, or the first NaN: a NaN must not read as 0.
    let max_of = |v: &[(&'static str, f64)]| {
        v.iter().copied().fold(("", 0.0f64), |m, p| {
            if !m.1.is_nan() && (p.1.is_nan() || p.1 > m.1) {
                p
            } else {
                m
            }
        })
    };
    let (ab_name, ab_max) = max_of(&param_ab);
    let (_, ac_max) = max_of(&param_ac);
    let skipped: Vec<u64> = trio.iter().map(|c| c.skipped).collect();
    let loss_diff_text = match history.max_loss_diff_ab {
        Some((d, step)) => format!("{} (step {step})", sci(d)),
        None => "none (no step where both were finite)".into(),
    };
    reporter.emit(
        || {
            format!(
                "\n{}\n\nA and B predict the same class on {agree} of {total} test images \
                 ({agree_pct:.2} %).\n\
                 Largest |loss_A - loss_B| on one mini-batch: {loss_diff_text}.\n\
                 Largest parameter difference after {} steps: |A-B| {} (in {ab_name}; \
                 the largest weight is {param_scale:.2}), |A-C| {}.\n\
                 Updates skipped on a non-finite loss or gradient: A {}, B {}, C {}.",
                accuracy_text(&evals),
                history.losses.len(),
                sci(ab_max),
                sci(ac_max),
                skipped[0],
                skipped[1],
                skipped[2]
            )
        },
        json!({"event": "test", "agree_ab": agree, "total": total, "agreement_ab_percent": agree_pct,
               "accuracy_a": evals[0].accuracy(), "accuracy_b": evals[1].accuracy(),
               "accuracy_c": evals[2].accuracy()}),
    );

    // The probe: a fixed batch (the first 16 test images) through the
    // trained A, so the logits have the size a trained network gives them,
    // and some images are misclassified, as in any batch.
    let shown = test.len().min(16) as i64;
    let logits = tch::no_grad(|| {
        trio[0]
            .net
            .model
            .net
            .forward(&test.images.narrow(0, 0, shown))
    });
    let cases = probe(&logits, &test.labels.narrow(0, 0, shown));
    let what = format!(
        "the logits of the first {shown} test images (trained A), scaled, and a hand-made row"
    );
    reporter.emit(
        || format!("\n{}", probe_text(&cases, &what)),
        probe_json(&cases, &what),
    );

    let (same, n, sum_err) = inference_check(&trio[0].net, &test.images);
    let inference = if sum_err.is_finite() {
        format!(
            "At inference, the class is the argmax of the logits (softmax keeps their order: \
             argmax(softmax(logits)) picked the same class on {same} of {n} test images), and \
             the class probabilities are softmax(logits) (here each row sums to 1 within \
             {sum_err:.0e})."
        )
    } else {
        format!(
            "At inference, the class is the argmax of the logits and the class probabilities \
             are softmax(logits), but this run cannot show it: A's logits overflow on some test \
             images (its training diverged; try a lower --lr), so their softmax is NaN there \
             (argmax(softmax(logits)) and argmax(logits) agreed on {same} of {n} test images)."
        )
    };
    text_only(&reporter, format!("\n{inference}"));

    if let Some(path) = &args.csv {
        write_csv(path, &history)?;
    }
    if let Some(path) = &args.plot {
        write_plot(path, &history)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut summary = setup;
    summary["event"] = json!("summary");
    let models: serde_json::Map<String, Value> = trio
        .iter()
        .zip(&evals)
        .map(|(c, e)| {
            let h = c.net.head;
            let mut m = e.json_fields();
            m.insert("layer".into(), json!(h.layer()));
            m.insert("loss".into(), json!(h.loss_name()));
            m.insert("skipped_steps".into(), json!(c.skipped));
            m.insert("first_skipped_step".into(), json!(c.first_skipped));
            (h.letter().to_string(), Value::Object(m))
        })
        .collect();
    let fields = summary.as_object_mut().expect("json! object");
    fields.insert("models".into(), Value::Object(models));
    fields.insert("agree_ab".into(), json!(agree));
    fields.insert("test_images".into(), json!(total));
    fields.insert("agreement_ab_percent".into(), json!(agree_pct));
    fields.insert(
        "accuracy_gap_ab".into(),
        json!((evals[0].accuracy() - evals[1].accuracy()).abs()),
    );
    let (loss_diff, loss_diff_step) = history.max_loss_diff_ab.unzip();
    fields.insert("max_loss_diff_ab".into(), json!(loss_diff));
    fields.insert("max_loss_diff_ab_step".into(), json!(loss_diff_step));
    fields.insert("max_param_diff_ab".into(), json!(ab_max));
    fields.insert("max_param_diff_ac".into(), json!(ac_max));
    fields.insert(
        "param_diff_ab".into(),
        json!(param_ab
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()),
    );
    if let Some(init) = &history.init {
        fields.insert("init".into(), init.json());
    }
    fields.insert("probe_finding".into(), json!(probe_finding(&cases)));
    fields.insert(
        "inference".into(),
        json!({"argmax_logits_equals_argmax_softmax": same, "images": n,
               "max_softmax_sum_error": sum_err, "answer": inference}),
    );
    fields.insert("train_seconds".into(), json!(history.train_seconds));
    fields.insert("seconds".into(), json!(seconds));
    fields.insert("csv".into(), optional_path_json(args.csv.as_deref()));
    fields.insert("plot".into(), optional_path_json(args.plot.as_deref()));
    reporter.emit(
        || {
            let mut out = format!(
                "\nFinished in {seconds:.1} s ({:.1} s of training).",
                history.train_seconds
            );
            for (flag, path) in [("CSV", &args.csv), ("Chart", &args.plot)] {
                if let Some(p) = path {
                    out.push_str(&format!("\n{flag}: {}", p.display()));
                }
            }
            out
        },
        summary,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Eight deterministic images and labels, without torch's global RNG
    /// (which other tests reseed concurrently).
    fn batch() -> (Tensor, Tensor) {
        let images = (Tensor::arange(8 * 3 * 32 * 32, (Kind::Float, Device::Cpu)) * 0.37)
            .sin()
            .view([8, 3, 32, 32]);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
        (images, labels)
    }

    #[test]
    fn at_initialization_a_b_and_c_agree() {
        let (x, y) = batch();
        let trio = contenders(Device::Cpu, 1, 0.001, 0.9).unwrap();
        let results: Vec<(f64, Tensor)> =
            trio.iter().map(|c| c.loss_and_gradient(&x, &y)).collect();
        let init = InitReport::new(
            [results[0].0, results[1].0, results[2].0],
            [&results[0].1, &results[1].1, &results[2].1],
        );
        let [a, b, c] = init.losses;
        assert!((a - 10f64.ln()).abs() < 0.1, "about ln 10 at init: {a}");
        // The bounds: A and B, the same math rounded differently.
        assert!((a - b).abs() <= 1e-6, "loss A {a} vs B {b}");
        assert!(init.max_grad_diff_ab() <= 1e-5, "{:?}", init.parameters);
        // A and C run the same kernels: equal, not merely close.
        assert_eq!(a, c);
        assert_eq!(init.max_grad_diff_ac(), 0.0, "{:?}", init.parameters);
        assert_eq!(init.parameters.len(), PARAMETERS.len());
        assert!(init.parameters.iter().all(|p| p.max_a > 0.0));
    }

    #[test]
    fn heads_keep_the_argmax_and_normalize() {
        let z = Tensor::from_slice(&[1.0f32, 3.0, -2.0, 0.5, 0.0, 7.0]).view([2, 3]);
        let p = Head::Softmax.output(&z);
        let sums = Vec::<f64>::try_from(p.sum_dim_intlist(1, false, Kind::Float)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        for h in Head::ALL {
            let classes = Vec::<i64>::try_from(h.output(&z).argmax(1, false)).unwrap();
            assert_eq!(classes, [1, 2], "{h:?}");
        }
        let logp = Head::LogSoftmax.output(&z);
        assert!(logp.exp().allclose(&p, 1e-6, 1e-7, false));
    }

    #[test]
    fn probe_breaks_log_softmax_only() {
        let (x, y) = batch();
        let model = Model::new(Device::Cpu, Some(1));
        let logits = tch::no_grad(|| model.net.forward(&x.narrow(0, 0, 4)));
        let cases = probe(&logits, &y.narrow(0, 0, 4));
        assert_eq!(cases.len(), PROBE_SCALES.len() + 2);
        for c in &cases {
            assert!(c.finite(Head::Logits), "A not finite on {c:?}");
            assert!(c.finite(Head::LogSoftmax), "C not finite on {c:?}");
        }
        // At scale 1 the three agree; at the extreme scale B breaks.
        let first = &cases[0];
        assert!(first.finite(Head::Softmax));
        assert!((first.loss[0] - first.loss[1]).abs() < 1e-6, "{first:?}");
        let extreme = &cases[PROBE_SCALES.len() - 1];
        assert_eq!(extreme.scale, Some(1000.0));
        assert!(!extreme.finite(Head::Softmax), "{extreme:?}");
        // [0, 104] with the confident class as label: loss 0 for all, but
        // B's gradient is 0/0 at the underflowed probability.
        let right = &cases[PROBE_SCALES.len()];
        assert_eq!(right.loss, [0.0, 0.0, 0.0], "{right:?}");
        assert!(right.grad[1].nan > 0, "{right:?}");
        // With the other label, B's loss is -log(0) = inf; A's is the gap.
        let wrong = &cases[PROBE_SCALES.len() + 1];
        assert_eq!(wrong.loss[0], PROBE_GAP);
        assert_eq!(wrong.loss[1], f64::INFINITY);
        assert_eq!(wrong.grad[0].max_abs, 1.0);
        let finding = probe_finding(&cases);
        assert!(
            finding.starts_with("log(softmax) breaks once the logits are scaled by"),
            "{finding}"
        );
        assert!(finding.contains("stay finite on every input"), "{finding}");
    }

    #[test]
    fn a_non_finite_gradient_skips_the_update() {
        let (x, y) = batch();
        let mut b = Contender::new(Head::Softmax, Device::Cpu, 2, 0.01, 0.9);
        // A huge bias makes class 0's probability 1 and the others 0.
        let mut vars = b.net.model.vs.variables();
        let bias = vars.get_mut("fc3.bias").unwrap();
        tch::no_grad(|| {
            bias.copy_(&Tensor::from_slice(&[
                500.0f32, 0., 0., 0., 0., 0., 0., 0., 0., 0.,
            ]))
        });
        let before = b.net.model.flat.copy();
        let (loss, grad) = b.loss_and_gradient(&x, &y);
        assert!(!loss.is_finite() || !all_finite(&grad));
        assert!(!b.update(3, loss, &grad));
        assert!(!b.update(4, loss, &grad));
        assert_eq!((b.skipped, b.first_skipped), (2, Some(3)));
        assert!(b.net.model.flat.equal(&before), "weights moved");
        assert!(all_finite(b.momentum_buffer()));
        assert_eq!(b.momentum_buffer().abs().max().double_value(&[]), 0.0);

        // A on the same weights is fine and does update.
        let mut a = Contender::new(Head::Logits, Device::Cpu, 2, 0.01, 0.9);
        let (loss, grad) = a.loss_and_gradient(&x, &y);
        assert!(a.update(1, loss, &grad));
        assert_eq!(a.skipped, 0);
    }

    #[test]
    fn smoothing_skips_non_finite_values() {
        let v = [1.0f32, 3.0, f32::NAN, 5.0, f32::INFINITY, 7.0];
        let s = smoothed(v.into_iter(), 2);
        assert_eq!(
            s,
            [(2.0, 2.0), (3.0, 3.0), (4.0, 5.0), (5.0, 5.0), (6.0, 7.0)]
        );
        assert_eq!(smoothing_window(25_000), 200);
        assert_eq!(smoothing_window(125), 12);
        assert_eq!(smoothing_window(3), 1);
    }
}
