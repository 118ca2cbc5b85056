//! The training harness: drives any [`Recipe`] through its epochs and
//! steps, and owns everything around the step, once for every recipe.
//!
//! A recipe knows its batches and its step (forward, loss, backward,
//! update) and names the tensors a checkpoint must hold. The harness
//! counts epochs and steps from the start or a resumed [`Position`], stops
//! at `--max-steps`, shows the progress bar, reads the losses on the host
//! ([`losses`]), prints the tutorial's running-loss lines (text or `--json`
//! `loss` events), stops on the first non-finite loss or weights, saves
//! checkpoints (every epoch, every `--checkpoint-every` steps, at
//! `--max-steps`, on an interrupt) and handles SIGINT/SIGTERM
//! ([`interrupts`]). What a recipe needs beyond that (its own tables, say)
//! it adds as a [`Hook`], called around each step like a PyTorch Lightning
//! callback.
//!
//! In a distributed run the harness is also where the ranks meet around
//! the steps (`ranks`); the recipe's step is the same as in one process,
//! since its optimizer's backward all-reduces the gradients.

pub mod board;
pub mod interrupts;
pub mod losses;
pub mod profile;
mod ranks;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::ProgressBar;
use serde_json::json;
use tch::Tensor;

pub use self::interrupts::{install_signal_handlers, Interrupted, Interrupts, Saved, INTERRUPTS};
use self::losses::PendingLosses;
pub use self::losses::{read_losses_every, StepLosses};
use self::ranks::Ranks;
use crate::distributed::LossReduction;
use crate::train::checkpoint::{Position, Saver};
use crate::util::report::{path_json, step_bar, Diverged, Reporter};

/// What one training step hands back to the harness.
pub struct StepOutput {
    /// The step's loss, unread and where it was computed: a scalar, or one
    /// value per model for a recipe that trains several side by side (the
    /// first is the one the running loss and the progress bar show).
    pub loss: Tensor,
    /// Images in the step's mini-batch.
    pub images: u64,
}

/// One recipe's training, as the harness drives it.
pub trait Recipe {
    /// Mini-batches in one epoch.
    fn steps_per_epoch(&self) -> u64;
    /// Before the first step of each epoch (1-based), also when a resume
    /// starts mid-epoch.
    fn start_epoch(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// Forward, loss, backward and update on mini-batch `step` (1-based) of
    /// `epoch`.
    fn training_step(&mut self, epoch: u64, step: u64) -> Result<StepOutput>;
    /// Everything a checkpoint must hold to resume bit for bit (weights,
    /// buffers, optimizer state...), by name.
    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)>;
    /// Whether the weights are all finite.
    fn is_finite(&self) -> bool;
    /// How the step's loss combines its mini-batch: it says how a
    /// distributed run combines the ranks' gradients.
    fn loss_reduction(&self) -> LossReduction {
        LossReduction::Mean
    }
    /// The live tensors of the training state (weights, buffers, optimizer
    /// state) that every rank of a distributed run holds as rank 0 does:
    /// broadcast from it before the first step, before each checkpoint and
    /// after the last step (BatchNorm's statistics are each rank's own in
    /// between, as in DDP). A recipe that runs distributed lists them all.
    fn replicated(&self) -> Vec<Tensor> {
        vec![]
    }
}

/// Where the run is after a step, as the hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepEnd {
    pub epoch: u64,
    /// 1-based within `epoch`.
    pub step: u64,
    /// Steps since training began, those before a resume included.
    pub global_step: u64,
    /// The last step of `epoch`.
    pub epoch_end: bool,
    /// The last step this run trains (the end of its epochs, or `--max-steps`).
    pub last: bool,
}

/// What a recipe adds around its steps, beside what the harness does.
/// `R` is the recipe, which the hook may inspect after a step.
pub trait Hook<R: ?Sized> {
    /// Once, right before the first step: a clock for per-epoch figures
    /// starts here, after whatever the run did to get ready.
    fn on_start(&mut self) {}
    /// Whether this hook needs the losses up to `end` read (passed to
    /// [`Hook::on_losses`]) before its [`Hook::after_step`] for `end`.
    fn needs_losses(&self, _end: &StepEnd) -> bool {
        false
    }
    /// One step's losses, read on the host; every step's, in step order.
    fn on_losses(&mut self, _losses: &StepLosses, _reporter: &Reporter) -> Result<()> {
        Ok(())
    }
    /// After every step, before a checkpoint is saved.
    fn after_step(&mut self, _recipe: &R, _end: &StepEnd, _reporter: &Reporter) -> Result<()> {
        Ok(())
    }
}

/// How a run saves checkpoints.
pub struct Checkpoints<'a> {
    pub saver: &'a mut Saver,
    /// Save after every epoch (and at `--max-steps`), not only on an interrupt.
    pub every_epoch: bool,
    /// Also save every N global steps.
    pub every: Option<u64>,
    /// `tch-cifar train --resume DIR …`, for the interrupt message.
    pub resume_command: &'a str,
}

/// What the harness runs: how far, how it logs, saves and stops.
pub struct Plan<'a> {
    /// [`Position::START`], or the resumed checkpoint's.
    pub start: Position,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    /// Steps per running-loss line.
    pub log_every: u64,
    /// Print the tutorial's running-loss lines; a recipe with its own
    /// table prints that from a [`Hook`] instead.
    pub loss_lines: bool,
    /// Say so before the first step when the run is too short for any line
    /// at `log_every` (the tutorial's, or a hook's table): a run shorter
    /// than `--log-every` would otherwise print no loss at all, unexplained.
    pub note_no_loss_line: bool,
    /// Read the losses on the host every N steps: [`read_losses_every`].
    pub read_losses_every: usize,
    pub interrupts: &'a Interrupts,
    pub checkpoints: Option<Checkpoints<'a>>,
    /// Stop on the first non-finite loss or weights, with this advice in
    /// the message; `None` for a recipe that handles them itself.
    pub diverged_hint: Option<String>,
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainStats {
    /// Steps since the start of training, those before a resume included.
    pub steps: u64,
    /// Images trained on (by every rank, in a distributed run).
    pub images: u64,
    pub train_seconds: f64,
    /// `(epoch, step, mean loss)` at each `--log-every` mark, 1-based like the tutorial.
    pub running_losses: Vec<(u64, u64, f64)>,
    /// Where training ended, when a SIGINT or SIGTERM came during its last
    /// step or the saves after it: training is complete, but the caller
    /// should stop rather than go on.
    pub stopped_at_end: Option<Position>,
}

impl TrainStats {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.train_seconds.max(1e-9)
    }
}

/// With the `test-hooks` feature only (the tests'), set to milliseconds:
/// each step then sleeps that long, so that a signal sent after the first
/// loss line lands before the run ends however slowly a loaded machine
/// wakes the test thread.
#[cfg(feature = "test-hooks")]
fn test_step_delay() -> Option<Duration> {
    let ms = std::env::var("TCH_CIFAR_TEST_STEP_DELAY_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

#[cfg(not(feature = "test-hooks"))]
fn test_step_delay() -> Option<Duration> {
    None
}

/// Steps between progress-bar messages (which need the running loss).
const SHOW_EVERY: u64 = 256;

/// Trains `recipe` from `plan.start` to the end of `plan.epochs` (or
/// `plan.max_steps`), calling `hooks` around each step and saving as
/// `plan.checkpoints` says. Stops with an error on the first non-finite
/// loss (under `plan.diverged_hint`), and with [`Interrupted`] after a
/// SIGINT or SIGTERM, unless that came in the last step: then training
/// ends and [`TrainStats::stopped_at_end`] says so.
pub fn run<R: Recipe + ?Sized>(
    recipe: &mut R,
    plan: Plan,
    hooks: &mut [&mut dyn Hook<R>],
    reporter: &mut Reporter,
) -> Result<TrainStats> {
    let steps_per_epoch = recipe.steps_per_epoch();
    let start = plan.start.normalized(steps_per_epoch);
    let stop_at = plan
        .max_steps
        .unwrap_or(u64::MAX)
        .min(plan.epochs * steps_per_epoch);
    if plan.note_no_loss_line {
        if let Some(note) = no_loss_line_note(start, stop_at, &plan, steps_per_epoch) {
            reporter.note(&note);
        }
    }
    let bar = reporter.attach_bar(step_bar(stop_at));
    bar.set_position(start.global_step);
    let mut run = Harness {
        stats: TrainStats {
            steps: start.global_step,
            images: 0,
            train_seconds: 0.0,
            running_losses: vec![],
            stopped_at_end: None,
        },
        pending: PendingLosses::new(plan.read_losses_every),
        running_loss: start.running_loss,
        last_mean: f64::NAN,
        plan,
        steps_per_epoch,
        stop_at,
        bar,
        began: Instant::now(),
        step_delay: test_step_delay(),
    };
    let interrupts = run.plan.interrupts;
    interrupts.exit_now.store(false, Ordering::SeqCst);
    let result =
        Ranks::start(recipe).and_then(|ranks| run.epochs(recipe, start, &ranks, hooks, reporter));
    interrupts.exit_now.store(true, Ordering::SeqCst);
    run.stats.train_seconds = run.began.elapsed().as_secs_f64();
    reporter.finish_bar();
    result.map(|()| run.stats)
}

/// The note for a run from `start` to global step `stop_at` that reaches
/// no multiple of `plan.log_every` within an epoch, and so prints no
/// running-loss line; `None` when it prints one, or trains no step.
fn no_loss_line_note(
    start: Position,
    stop_at: u64,
    plan: &Plan,
    steps_per_epoch: u64,
) -> Option<String> {
    let every = plan.log_every;
    let (mut global, mut longest) = (start.global_step, 0);
    for epoch in start.epoch..=plan.epochs {
        if global >= stop_at {
            break;
        }
        let done = if epoch == start.epoch { start.step } else { 0 };
        let last = steps_per_epoch.min(done + (stop_at - global));
        // A multiple of `every` in (done, last]: that step prints a line.
        if last / every > done / every {
            return None;
        }
        longest = longest.max(last - done);
        global += last - done;
    }
    if longest == 0 {
        return None;
    }
    // A resumed run keeps its checkpoint's --log-every.
    let advice = if start.global_step == 0 {
        format!("; --log-every {} prints them", (longest / 10).max(1))
    } else {
        String::new()
    };
    Some(format!(
        "this run prints no running-loss line: one comes every --log-every {every} mini-batches \
         of an epoch, and it trains at most {longest} in one{advice}"
    ))
}

/// A run in progress: the plan, the counts, and the losses on their way
/// to the host.
struct Harness<'a> {
    plan: Plan<'a>,
    steps_per_epoch: u64,
    /// The global step this run stops after.
    stop_at: u64,
    stats: TrainStats,
    pending: PendingLosses,
    /// The first loss summed since the last `--log-every` mark.
    running_loss: f64,
    /// The latest loss line's mean, for the progress bar right after it.
    last_mean: f64,
    bar: ProgressBar,
    began: Instant,
    step_delay: Option<Duration>,
}

impl Harness<'_> {
    /// The epochs and their steps from `start`, then the last checks.
    fn epochs<R: Recipe + ?Sized>(
        &mut self,
        recipe: &mut R,
        start: Position,
        ranks: &Ranks,
        hooks: &mut [&mut dyn Hook<R>],
        reporter: &Reporter,
    ) -> Result<()> {
        for hook in hooks.iter_mut() {
            hook.on_start();
        }
        let mut at = start;
        for epoch in start.epoch..=self.plan.epochs {
            // Before the step: a run resumed at its --max-steps trains none.
            if self.stats.steps >= self.stop_at {
                break;
            }
            self.bar
                .set_prefix(format!("epoch {epoch}/{}", self.plan.epochs));
            let done = if epoch == start.epoch { start.step } else { 0 };
            if epoch != start.epoch {
                self.running_loss = 0.0;
            }
            recipe.start_epoch(epoch)?;
            for step in done + 1..=self.steps_per_epoch {
                ranks.before_step(self.plan.interrupts);
                let out = recipe.training_step(epoch, step)?;
                ranks.after_step()?;
                let end = self.count(epoch, step, out.images * ranks.size());
                at = self.after_step(recipe, &out.loss, &end, ranks, hooks, reporter)?;
                if end.last {
                    break;
                }
            }
        }
        self.finish(recipe, at, ranks)
    }

    /// Counts a step done.
    fn count(&mut self, epoch: u64, step: u64, images: u64) -> StepEnd {
        self.stats.steps += 1;
        self.stats.images += images;
        self.bar.inc(1);
        if let Some(delay) = self.step_delay {
            std::thread::sleep(delay);
        }
        StepEnd {
            epoch,
            step,
            global_step: self.stats.steps,
            epoch_end: step == self.steps_per_epoch,
            last: self.stats.steps >= self.stop_at,
        }
    }

    /// Everything after a step, in order: its loss read (when something
    /// needs it), the progress bar, the hooks, a checkpoint, an interrupt.
    /// Returns where the run stands.
    fn after_step<R: Recipe + ?Sized>(
        &mut self,
        recipe: &R,
        loss: &Tensor,
        end: &StepEnd,
        ranks: &Ranks,
        hooks: &mut [&mut dyn Hook<R>],
        reporter: &Reporter,
    ) -> Result<Position> {
        let stop = ranks.stop(self.plan.interrupts);
        let save = self.plan.checkpoints.as_ref().is_some_and(|c| {
            c.every.is_some_and(|k| end.global_step.is_multiple_of(k))
                || (c.every_epoch && (end.last || end.epoch_end))
        });
        let show = end.step.is_multiple_of(SHOW_EVERY);
        self.pending
            .push(loss, end.epoch, end.step, end.global_step)?;
        // What follows needs the losses so far, so they are read first.
        if self.pending.is_full()
            || show
            || save
            || stop
            || end.last
            || end.epoch_end
            || end.step.is_multiple_of(self.plan.log_every)
            || hooks.iter().any(|h| h.needs_losses(end))
        {
            self.read_losses(hooks, reporter)?;
        }
        if show {
            self.show_progress(end.step);
        }
        let at = Position {
            epoch: end.epoch,
            step: end.step,
            global_step: end.global_step,
            running_loss: self.running_loss,
        };
        for hook in hooks.iter_mut() {
            hook.after_step(recipe, end, reporter)?;
        }
        if let Some(c) = self.plan.checkpoints.as_mut().filter(|_| save) {
            ranks.replicate(recipe, "broadcast of rank 0's state before a checkpoint")?;
            if ranks.saves() {
                c.saver.save(recipe.checkpoint_tensors(), at)?;
            }
        }
        // Stopped in the run's last step, training is complete: no
        // checkpoint to resume, the caller writes --out and stops.
        if stop && !end.last {
            return Err(interrupt(recipe, &mut self.plan, at, ranks, reporter));
        }
        Ok(at)
    }

    /// Reads the pending losses: the divergence check, the running loss
    /// and its lines, then the hooks, step by step.
    fn read_losses<R: ?Sized>(
        &mut self,
        hooks: &mut [&mut dyn Hook<R>],
        reporter: &Reporter,
    ) -> Result<()> {
        let plan = &self.plan;
        for losses in self.pending.read()? {
            let StepLosses { epoch, step, .. } = losses;
            if let Some(hint) = &plan.diverged_hint {
                if let Some(loss) = losses.values.iter().find(|l| !l.is_finite()) {
                    return Err(Diverged(format!(
                        "the loss became {loss} at epoch {epoch}, step {step}: training \
                         diverged. {hint}. {}",
                        not_saved(plan)
                    ))
                    .into());
                }
            }
            self.running_loss += losses.values[0];
            if step.is_multiple_of(plan.log_every) {
                let mean = self.running_loss / plan.log_every as f64;
                self.stats.running_losses.push((epoch, step, mean));
                if plan.loss_lines {
                    reporter.emit(
                        || format!("[{epoch}, {step:5}] loss: {mean:.3}"),
                        json!({"event": "loss", "epoch": epoch, "step": step, "loss": mean}),
                    );
                }
                self.running_loss = 0.0;
                self.last_mean = mean;
            }
            for hook in hooks.iter_mut() {
                hook.on_losses(&losses, reporter)?;
            }
        }
        Ok(())
    }

    /// The running loss and the speed on the progress bar.
    fn show_progress(&self, step: u64) {
        let rate = self.stats.images as f64 / self.began.elapsed().as_secs_f64();
        let loss = match step % self.plan.log_every {
            0 => self.last_mean,
            n => self.running_loss / n as f64,
        };
        self.bar
            .set_message(format!("loss {loss:.3} {rate:.0} img/s"));
    }

    /// After the last step: the weights' check, and a signal that came
    /// during it.
    fn finish<R: Recipe + ?Sized>(
        &mut self,
        recipe: &R,
        at: Position,
        ranks: &Ranks,
    ) -> Result<()> {
        // Every rank evaluates and rank 0 saves the same network: its own.
        ranks.replicate(recipe, "broadcast of rank 0's state after training")?;
        // A loss is computed before its step's update, so the last update
        // is checked here: --out must not get weights that diverged.
        if let Some(hint) = &self.plan.diverged_hint {
            if !recipe.is_finite() {
                return Err(Diverged(format!(
                    "the weights became non-finite in the last step (epoch {}, step {}): \
                     training diverged. {hint}. {}",
                    at.epoch,
                    at.step,
                    not_saved(&self.plan)
                ))
                .into());
            }
        }
        // Training is over: from here a signal exits at once. One that came
        // during the last step or the saves after it still stops the run,
        // once --out holds the weights.
        let interrupts = self.plan.interrupts;
        interrupts.exit_now.store(true, Ordering::SeqCst);
        if ranks.stop(interrupts) {
            self.stats.stopped_at_end = Some(at);
        }
        Ok(())
    }
}

/// Saves at `at` for an interrupt and returns the error that ends the run.
fn interrupt<R: Recipe + ?Sized>(
    recipe: &R,
    plan: &mut Plan,
    at: Position,
    ranks: &Ranks,
    reporter: &Reporter,
) -> anyhow::Error {
    if !ranks.saves() {
        // Rank 0 saves and says where.
        return Interrupted {
            position: at,
            saved: Saved::ByRank0,
        }
        .into();
    }
    let Some(c) = plan.checkpoints.as_mut() else {
        if reporter.is_json() {
            reporter.emit(
                String::new,
                json!({"event": "interrupted", "epoch": at.epoch, "step": at.step,
                       "global_step": at.global_step}),
            );
        }
        return Interrupted {
            position: at,
            saved: Saved::Nothing,
        }
        .into();
    };
    let checkpoint = match c.saver.save(recipe.checkpoint_tensors(), at) {
        Ok(path) => path,
        Err(err) => {
            return err.context(format!(
                "interrupted at epoch {}, step {}",
                at.epoch, at.step
            ))
        }
    };
    if reporter.is_json() {
        reporter.emit(
            String::new,
            json!({"event": "interrupted", "epoch": at.epoch, "step": at.step,
                   "global_step": at.global_step, "checkpoint": path_json(&checkpoint),
                   "resume": c.resume_command}),
        );
    }
    Interrupted {
        position: at,
        saved: Saved::Checkpoint {
            path: checkpoint,
            resume: c.resume_command.to_string(),
        },
    }
    .into()
}

/// The end of a divergence message: nothing saved, and the checkpoint to go back to.
fn not_saved(plan: &Plan) -> String {
    let last: Option<&Path> = plan.checkpoints.as_ref().and_then(|c| c.saver.last());
    match last {
        Some(p) => format!(
            "The weights were not saved; the last good checkpoint is {}",
            p.display()
        ),
        None => "The weights were not saved".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three steps per epoch; its loss is `global step / 10`, its weights a
    /// step counter.
    struct Counting {
        epochs_started: Vec<u64>,
        steps: u64,
    }

    impl Recipe for Counting {
        fn steps_per_epoch(&self) -> u64 {
            3
        }
        fn start_epoch(&mut self, epoch: u64) -> Result<()> {
            self.epochs_started.push(epoch);
            Ok(())
        }
        fn training_step(&mut self, _epoch: u64, _step: u64) -> Result<StepOutput> {
            self.steps += 1;
            Ok(StepOutput {
                loss: Tensor::from(self.steps as f32 / 10.0),
                images: 2,
            })
        }
        fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
            vec![]
        }
        fn is_finite(&self) -> bool {
            true
        }
    }

    /// What a hook saw, in order.
    #[derive(Default)]
    struct Seen(Vec<String>);

    impl Hook<Counting> for Seen {
        fn on_losses(&mut self, l: &StepLosses, _: &Reporter) -> Result<()> {
            self.0
                .push(format!("loss {} {:.1}", l.global_step, l.values[0]));
            Ok(())
        }
        fn after_step(&mut self, r: &Counting, end: &StepEnd, _: &Reporter) -> Result<()> {
            self.0
                .push(format!("after {} {}", end.global_step, r.steps));
            Ok(())
        }
    }

    fn plan(start: Position, max_steps: Option<u64>, read_every: usize) -> Plan<'static> {
        static INTERRUPTS: Interrupts = Interrupts::new();
        Plan {
            start,
            epochs: 3,
            max_steps,
            log_every: 2,
            loss_lines: false,
            note_no_loss_line: false,
            read_losses_every: read_every,
            interrupts: &INTERRUPTS,
            checkpoints: None,
            diverged_hint: Some("hint".into()),
        }
    }

    #[test]
    fn a_resume_mid_epoch_starts_that_epoch_and_stops_at_max_steps() {
        let mut recipe = Counting {
            epochs_started: vec![],
            steps: 0,
        };
        let start = Position {
            epoch: 1,
            step: 2,
            global_step: 2,
            running_loss: 1.0,
        };
        let mut seen = Seen::default();
        let stats = run(
            &mut recipe,
            plan(start, Some(5), 1),
            &mut [&mut seen],
            &mut Reporter::new(true),
        )
        .unwrap();
        assert_eq!(recipe.epochs_started, [1, 2]);
        assert_eq!(stats.steps, 5);
        assert_eq!(stats.images, 6);
        // Step 3's loss closes no window; epoch 2 starts afresh.
        let mean = (f64::from(0.2f32) + f64::from(0.3f32)) / 2.0;
        assert_eq!(stats.running_losses, [(2, 2, mean)]);
        assert_eq!(
            seen.0,
            [
                "loss 3 0.1",
                "after 3 1",
                "loss 4 0.2",
                "after 4 2",
                "loss 5 0.3",
                "after 5 3"
            ]
        );

        // Read in batches, step 4's loss waits for step 5 (the last), which
        // changes when the hooks see it, not what they see.
        let mut recipe = Counting {
            epochs_started: vec![],
            steps: 0,
        };
        let mut seen = Seen::default();
        let batched = run(
            &mut recipe,
            plan(start, Some(5), 7),
            &mut [&mut seen],
            &mut Reporter::new(true),
        )
        .unwrap();
        assert_eq!(batched.running_losses, stats.running_losses);
        assert_eq!(
            seen.0,
            [
                "loss 3 0.1",
                "after 3 1",
                "after 4 2",
                "loss 4 0.2",
                "loss 5 0.3",
                "after 5 3"
            ]
        );
    }

    /// The note comes exactly when no step of the run is a multiple of
    /// `--log-every` within its epoch.
    #[test]
    fn a_run_too_short_for_a_loss_line_is_noted() {
        let note = |start: Position, stop_at: u64, log_every: u64| {
            let plan = Plan {
                log_every,
                ..plan(start, None, 1)
            };
            // Epochs of 3 steps, 3 epochs.
            no_loss_line_note(start, stop_at.min(9), &plan, 3)
        };
        let start = Position::START;
        // Every 2 steps: step 2 of epoch 1 prints.
        assert_eq!(note(start, 9, 2), None);
        assert_eq!(note(start, 2, 2), None);
        // One step: no line.
        let one = note(start, 1, 2).unwrap();
        assert!(one.contains("--log-every 2 mini-batches"), "{one}");
        assert!(
            one.contains("at most 1 in one; --log-every 1 prints them"),
            "{one}"
        );
        // Epochs of 3 steps never reach --log-every 4, however many.
        let short = note(start, 9, 4).unwrap();
        assert!(short.contains("at most 3 in one"), "{short}");
        // Resumed at step 1 of epoch 2 (global 4): step 2 of epoch 2 prints.
        let resumed = Position {
            epoch: 2,
            step: 1,
            global_step: 4,
            running_loss: 0.0,
        };
        assert_eq!(note(resumed, 9, 2), None);
        // Resumed at step 2, one step to go: no line, and no advice, since
        // a resume keeps its --log-every.
        let late = Position {
            step: 2,
            global_step: 5,
            ..resumed
        };
        let text = note(late, 6, 2).unwrap();
        assert!(text.ends_with("at most 1 in one"), "{text}");
        // Nothing left to train: nothing to say.
        assert_eq!(note(late, 5, 2), None);
    }

    #[test]
    fn a_non_finite_loss_stops_the_run_at_its_step() {
        struct Diverging;
        impl Recipe for Diverging {
            fn steps_per_epoch(&self) -> u64 {
                4
            }
            fn training_step(&mut self, _: u64, step: u64) -> Result<StepOutput> {
                let loss = if step == 3 { f32::INFINITY } else { 1.0 };
                Ok(StepOutput {
                    loss: Tensor::from(loss),
                    images: 1,
                })
            }
            fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
                vec![]
            }
            fn is_finite(&self) -> bool {
                true
            }
        }
        let err = run(
            &mut Diverging,
            plan(Position::START, None, 7),
            &mut [],
            &mut Reporter::new(true),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "the loss became inf at epoch 1, step 3: training diverged. hint. The weights were \
             not saved"
        );
    }
}
