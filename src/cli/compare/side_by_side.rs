//! The side-by-side training: every contender on the same mini-batches
//! (A' on each one reversed), with the running losses and how far the
//! weights drift apart: one [`Recipe`] for the training harness, and its
//! table as a [`Hook`], which also writes the `--logdir` events.

use anyhow::{ensure, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::contenders::{finite_sum, max_abs_diff, pair_key, Contender, InitReport, Role};
use super::output::{finite_or_string, sci, text_only};
use crate::cli::train::RecipeArgs;
use crate::data::Split;
use crate::train::checkpoint::Position;
use crate::train::harness::{
    self, Hook, Plan, Recipe, StepEnd, StepLosses, StepOutput, INTERRUPTS,
};
use crate::train::recipes::tutorial::EpochBatches;
use crate::util::report::Reporter;
use crate::util::tensorboard::Events;

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
/// shared sequence of mini-batches, through the training harness (which
/// gives it `--max-steps` and SIGINT/SIGTERM), reporting step 0 and the
/// running losses (also as TensorBoard events into `board`: each
/// contender's running loss, and the A-B and A-A' parameter differences).
pub fn side_by_side(
    contenders: &mut [Contender],
    train: &Split,
    recipe: &RecipeArgs,
    max_steps: Option<u64>,
    seed: u64,
    board: &mut Events,
    reporter: &mut Reporter,
) -> Result<History> {
    ensure!(!train.is_empty(), "the training set is empty");
    assert!(
        contenders.iter().map(|c| c.role).eq(Role::ALL),
        "contenders in Role::ALL order"
    );
    let mut four = SideBySide {
        device: contenders[0].flat().device(),
        kind: contenders[0].flat().kind(),
        contenders,
        train,
        seed,
        batch_size: recipe.batch_size,
        batches: None,
        global_step: 0,
        init: None,
    };
    let steps_per_epoch = four.steps_per_epoch();
    let total = recipe.epochs * steps_per_epoch;
    let mut table = Table {
        board,
        log_every: recipe.log_every,
        epoch: 0,
        window: [RunningLoss::default(); 4],
        history: History {
            losses: Vec::with_capacity(total as usize),
            steps_per_epoch,
            init: None,
            max_loss_diff: [None; 4],
            divergence: Vec::with_capacity((total / DIVERGENCE_EVERY + 1) as usize),
            train_seconds: 0.0,
        },
    };
    let plan = Plan {
        start: Position::START,
        epochs: recipe.epochs,
        max_steps,
        log_every: recipe.log_every,
        loss_lines: false,
        // The table's lines come every --log-every steps too.
        note_no_loss_line: true,
        // The step reads its losses itself (a skipped update depends on them).
        read_losses_every: 1,
        interrupts: &INTERRUPTS,
        checkpoints: None,
        // A non-finite loss or gradient skips that contender's update instead.
        diverged_hint: None,
    };
    let stats = harness::run(&mut four, plan, &mut [&mut table], reporter)?;
    table.history.train_seconds = stats.train_seconds;
    Ok(table.history)
}

/// The four trainings as one recipe: each step trains every contender on
/// the same mini-batch (A' on it reversed).
struct SideBySide<'a> {
    contenders: &'a mut [Contender],
    train: &'a Split,
    device: Device,
    /// The contenders' dtype, which the images are cast to (a float32 to
    /// float64 cast is exact).
    kind: Kind,
    seed: u64,
    batch_size: u64,
    batches: Option<EpochBatches>,
    global_step: u64,
    /// The losses and gradients of the first step, until the table takes them.
    init: Option<InitReport>,
}

impl SideBySide<'_> {
    fn in_kind(&self, (images, labels): (Tensor, Tensor)) -> (Tensor, Tensor) {
        if images.kind() == self.kind {
            (images, labels)
        } else {
            (images.to_kind(self.kind), labels)
        }
    }
}

impl Recipe for SideBySide<'_> {
    fn steps_per_epoch(&self) -> u64 {
        self.train.len().div_ceil(self.batch_size as usize) as u64
    }

    fn start_epoch(&mut self, epoch: u64) -> Result<()> {
        let n = self.train.len();
        self.batches = Some(EpochBatches::new(
            self.seed,
            epoch,
            n,
            self.batch_size,
            self.device,
        ));
        Ok(())
    }

    fn training_step(&mut self, _epoch: u64, step: u64) -> Result<StepOutput> {
        self.global_step += 1;
        let index = self.batches.as_ref().expect("start_epoch first").get(step);
        let batch = self.in_kind(self.train.select(&index));
        let reversed = self.in_kind(self.train.select(&index.flip([0])));
        let results: Vec<(Tensor, Tensor)> = self
            .contenders
            .iter()
            .map(|c| {
                let (images, labels) = if c.role.reversed() { &reversed } else { &batch };
                c.unread_loss_and_gradient(images, labels)
            })
            .collect();
        // Each update depends on its loss and gradient being finite: one
        // read on the host for the four losses and the four gradient sums.
        let mut checks: Vec<Tensor> = results.iter().map(|(l, _)| l.shallow_clone()).collect();
        checks.extend(results.iter().map(|(_, g)| finite_sum(g)));
        let read = Vec::<f64>::try_from(Tensor::stack(&checks, 0).to_kind(Kind::Double))?;
        let losses = [0, 1, 2, 3].map(|i| read[i]);
        if self.global_step == 1 {
            let grads = [0, 1, 2, 3].map(|i| &results[i].1);
            self.init = Some(InitReport::new(losses, grads));
        }
        let global = self.global_step;
        for (i, (c, (_, grad))) in self.contenders.iter_mut().zip(&results).enumerate() {
            c.update_checked(global, losses[i], grad, read[4 + i].is_finite());
        }
        Ok(StepOutput {
            // Already on the host.
            loss: Tensor::from_slice(&losses),
            images: index.size()[0] as u64,
        })
    }

    /// `compare-losses` keeps no checkpoints.
    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        vec![]
    }

    /// A non-finite update is skipped, so the weights stay finite.
    fn is_finite(&self) -> bool {
        true
    }
}

/// The side-by-side table: the first step's report, the running losses of
/// the four, how far they drift apart, and the skipped updates.
struct Table<'b> {
    board: &'b mut Events,
    log_every: u64,
    /// The epoch of `window`.
    epoch: u64,
    window: [RunningLoss; 4],
    history: History,
}

impl Hook<SideBySide<'_>> for Table<'_> {
    fn needs_losses(&self, end: &StepEnd) -> bool {
        end.step.is_multiple_of(self.log_every)
    }

    fn on_losses(&mut self, step: &StepLosses, _: &Reporter) -> Result<()> {
        let losses: [f64; 4] = step.values[..].try_into().expect("a loss per contender");
        if step.epoch != self.epoch {
            self.epoch = step.epoch;
            self.window = [RunningLoss::default(); 4];
        }
        for (w, &l) in self.window.iter_mut().zip(&losses) {
            w.add(l);
        }
        for r in Role::ALL {
            let (a, x) = (losses[0], losses[r.index()]);
            if a.is_finite() && x.is_finite() {
                let d = (a - x).abs();
                let max = &mut self.history.max_loss_diff[r.index()];
                if max.is_none_or(|(m, _)| d > m) {
                    *max = Some((d, step.global_step));
                }
            }
        }
        self.history.losses.push(losses);
        Ok(())
    }

    fn after_step(
        &mut self,
        four: &SideBySide<'_>,
        end: &StepEnd,
        reporter: &Reporter,
    ) -> Result<()> {
        let (epoch, step, global) = (end.epoch, end.step, end.global_step);
        if let Some(init) = four.init.as_ref().filter(|_| global == 1) {
            reporter.emit(|| init.text(), init.json());
            text_only(reporter, loss_header(self.log_every));
            self.history.init = Some(init.clone());
        }
        let losses = self.history.losses.last().expect("read before after_step");
        for c in four.contenders.iter() {
            if c.skipped == 1 && c.first_skipped == Some(global) {
                let letter = c.role.letter();
                let loss = losses[c.role.index()];
                reporter.emit(
                    || {
                        format!(
                            "  step {global}: {letter}'s loss is {loss} or its gradient is not \
                             finite; {letter} skips this update (and any later such step, counted)"
                        )
                    },
                    json!({"event": "non_finite", "model": letter, "step": global,
                           "epoch": epoch, "loss": finite_or_string(loss)}),
                );
            }
        }
        let history = &mut self.history;
        if global.is_multiple_of(DIVERGENCE_EVERY) || end.last {
            let d = Divergence::of(four.contenders, global);
            history.divergence.push(d);
            self.board.scalars(
                global,
                &[("param_diff/A-B", d.ab), ("param_diff/A-A'", d.a_rev)],
            );
        }
        if step.is_multiple_of(self.log_every) {
            let now = match history.divergence.last() {
                Some(d) if d.step == global => *d,
                _ => Divergence::of(four.contenders, global),
            };
            let max_diff = |r: Role| history.max_loss_diff(r).map(|(d, _)| d);
            let window = &self.window;
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
            let tags = ["loss/A", "loss/A'", "loss/B", "loss/C"];
            let means: Vec<(&str, f64)> = Role::ALL
                .iter()
                .filter_map(|r| Some((tags[r.index()], window[r.index()].mean()?)))
                .collect();
            self.board.scalars(global, &means);
            reporter.emit(
                || {
                    loss_line(
                        epoch,
                        step,
                        window,
                        [max_diff(Role::B), max_diff(Role::AReversed)],
                        now,
                    )
                },
                event,
            );
            self.window = [RunningLoss::default(); 4];
        }
        Ok(())
    }
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
