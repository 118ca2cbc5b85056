//! The side-by-side training: every contender on the same mini-batches
//! (A' on each one reversed), with the running losses and how far the
//! weights drift apart.

use std::time::Instant;

use anyhow::{ensure, Result};
use serde_json::json;
use tch::Tensor;

use super::contenders::{max_abs_diff, pair_key, Contender, InitReport, Role};
use super::output::{finite_or_string, sci, text_only};
use crate::data::Split;
use crate::report::{step_bar, Reporter};
use crate::train::tutorial::EpochBatches;
use crate::train::RecipeArgs;

/// How often, in steps, the weights' divergence is recorded.
pub const DIVERGENCE_EVERY: u64 = 100;

/// The largest parameter difference between A and B, and between A and A',
/// after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Divergence {
    /// 1-based, counted over all epochs.
    pub step: u64,
    /// max |θ_A - θ_B| over all 62,006 parameters.
    pub ab: f64,
    /// max |θ_A - θ_A'|.
    pub a_rev: f64,
}

impl Divergence {
    fn of(contenders: &[Contender], step: u64) -> Divergence {
        let a = contenders[Role::A.index()].flat();
        let diff = |r: Role| max_abs_diff(a, contenders[r.index()].flat());
        Divergence {
            step,
            ab: diff(Role::B),
            a_rev: diff(Role::AReversed),
        }
    }
}

/// The per-step record of a side-by-side run.
#[derive(Debug, Clone)]
pub struct History {
    /// The loss of every contender at every step, in [`Role::ALL`] order.
    pub losses: Vec<[f64; 4]>,
    pub steps_per_epoch: u64,
    pub init: Option<InitReport>,
    /// Per role, the largest |loss_A - loss_X| over the steps where both
    /// are finite, and the step (1-based) where it happened.
    pub max_loss_diff: [Option<(f64, u64)>; 4],
    /// Every [`DIVERGENCE_EVERY`] steps, and after the last.
    pub divergence: Vec<Divergence>,
    pub train_seconds: f64,
}

impl History {
    /// The largest |loss_A - loss_role| and its step.
    pub fn max_loss_diff(&self, role: Role) -> Option<(f64, u64)> {
        self.max_loss_diff[role.index()]
    }
}

/// Trains the contenders (in [`Role::ALL`] order) on `train` with one
/// shared sequence of mini-batches, reporting step 0 and the running
/// losses.
pub fn side_by_side(
    contenders: &mut [Contender],
    train: &Split,
    recipe: &RecipeArgs,
    seed: u64,
    reporter: &mut Reporter,
) -> Result<History> {
    ensure!(!train.is_empty(), "the training set is empty");
    assert!(
        contenders.iter().map(|c| c.role).eq(Role::ALL),
        "contenders in Role::ALL order"
    );
    let device = contenders[0].flat().device();
    // The images in the contenders' dtype (a float32 to float64 cast is exact).
    let kind = contenders[0].flat().kind();
    let in_kind = |(images, labels): (Tensor, Tensor)| {
        if images.kind() == kind {
            (images, labels)
        } else {
            (images.to_kind(kind), labels)
        }
    };
    let n = train.len();
    let steps_per_epoch = n.div_ceil(recipe.batch_size as usize) as u64;
    let total = recipe.epochs * steps_per_epoch;
    let mut history = History {
        losses: Vec::with_capacity(total as usize),
        steps_per_epoch,
        init: None,
        max_loss_diff: [None; 4],
        divergence: Vec::with_capacity((total / DIVERGENCE_EVERY + 1) as usize),
        train_seconds: 0.0,
    };
    let bar = reporter.attach_bar(step_bar(total));
    let start = Instant::now();
    for epoch in 1..=recipe.epochs {
        bar.set_prefix(format!("epoch {epoch}/{}", recipe.epochs));
        let mut window = [RunningLoss::default(); 4];
        let batches = EpochBatches::new(seed, epoch, n, recipe.batch_size, device);
        for step in 1..=steps_per_epoch {
            let index = batches.get(step);
            let global = history.losses.len() as u64 + 1;
            let batch = in_kind(train.select(&index));
            let reversed = in_kind(train.select(&index.flip([0])));
            let results: Vec<(f64, Tensor)> = contenders
                .iter()
                .map(|c| {
                    let (images, labels) = if c.role.reversed() { &reversed } else { &batch };
                    c.loss_and_gradient(images, labels)
                })
                .collect();
            let losses = [0, 1, 2, 3].map(|i| results[i].0);
            if global == 1 {
                let init = InitReport::new(losses, [0, 1, 2, 3].map(|i| &results[i].1));
                reporter.emit(|| init.text(), init.json());
                text_only(reporter, loss_header(recipe.log_every));
                history.init = Some(init);
            }
            for (c, (loss, grad)) in contenders.iter_mut().zip(&results) {
                if !c.update(global, *loss, grad) && c.skipped == 1 {
                    let letter = c.role.letter();
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
            for r in Role::ALL {
                let (a, x) = (losses[0], losses[r.index()]);
                if a.is_finite() && x.is_finite() {
                    let d = (a - x).abs();
                    let max = &mut history.max_loss_diff[r.index()];
                    if max.is_none_or(|(m, _)| d > m) {
                        *max = Some((d, global));
                    }
                }
            }
            history.losses.push(losses);
            if global.is_multiple_of(DIVERGENCE_EVERY) || global == total {
                history.divergence.push(Divergence::of(contenders, global));
            }
            if step.is_multiple_of(recipe.log_every) {
                let now = match history.divergence.last() {
                    Some(d) if d.step == global => *d,
                    _ => Divergence::of(contenders, global),
                };
                let max_diff = |r: Role| history.max_loss_diff(r).map(|(d, _)| d);
                let mut event = json!({"event": "loss", "epoch": epoch, "step": step,
                                       "max_param_diff_ab": now.ab,
                                       "max_param_diff_a_rev": now.a_rev});
                for r in Role::ALL {
                    event[format!("loss_{}", r.key())] = json!(window[r.index()].mean());
                    event[format!("non_finite_{}", r.key())] = json!(window[r.index()].non_finite);
                }
                for r in [Role::B, Role::AReversed] {
                    event[format!("max_loss_diff_{}_so_far", pair_key(r))] = json!(max_diff(r));
                }
                reporter.emit(
                    || {
                        loss_line(
                            epoch,
                            step,
                            &window,
                            [max_diff(Role::B), max_diff(Role::AReversed)],
                            now,
                        )
                    },
                    event,
                );
                window = [RunningLoss::default(); 4];
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
        "\nRunning loss, mean over {every} mini-batches; the largest |loss_A - loss_X| so far; \
         the largest |weight_A - weight_X| now\n  {:<14}{:>8}{:>8}{:>8}{:>8}{:>11}{:>11}{:>12}{:>13}",
        "[epoch, step]", "A", "A'", "B", "C", "loss A-B", "loss A-A'", "weight A-B", "weight A-A'"
    )
}

fn loss_line(
    epoch: u64,
    step: u64,
    window: &[RunningLoss; 4],
    max_diff: [Option<f64>; 2],
    now: Divergence,
) -> String {
    let d = |x: Option<f64>| x.map_or("-".into(), sci);
    format!(
        "  {:<14}{:>8}{:>8}{:>8}{:>8}{:>11}{:>11}{:>12}{:>13}",
        format!("[{epoch}, {step:5}]"),
        window[0].text(),
        window[1].text(),
        window[2].text(),
        window[3].text(),
        d(max_diff[0]),
        d(max_diff[1]),
        sci(now.ab),
        sci(now.a_rev)
    )
}
