//! `tch-cifar train --model airbench94`: the fast recipe
//! ([`crate::airbench`]) as the [harness](super::harness) drives it, one
//! line per epoch. The trained network is a [`crate::classifier::Airbench`],
//! as `evaluate` loads it.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Tensor;

use super::args::Given;
use super::harness::{self, Hook, Plan, Recipe, StepEnd, StepLosses, StepOutput};
use super::{Control, TrainStats};
use crate::airbench::{FastRecipe, BATCH_SIZE};
use crate::checkpoint::Checkpoint;
use crate::classifier::Airbench;
use crate::data::Split;
use crate::distributed::LossReduction;
use crate::report::Reporter;
use crate::settings::Settings;

/// The tutorial's flags that the fast recipe, with its own fixed
/// hyperparameters, does not take.
const TUTORIAL_ONLY: [&str; 5] = [
    "--batch-size",
    "--lr",
    "--momentum",
    "--log-every",
    "--cpu-conv",
];

/// Refuses the flags airbench94 has no use for; on a resume also
/// `--epochs`, which would change its schedule.
pub fn check_flags(given: &Given, resuming: bool) -> Result<()> {
    for flag in TUTORIAL_ONLY {
        if given.has(flag) {
            bail!(
                "{flag} is a setting of the tutorial's recipe; --model airbench94 has its own \
                 fixed hyperparameters (drop the flag, or use --model net)"
            );
        }
    }
    if resuming && given.has("--epochs") {
        bail!(
            "--epochs cannot change on a resume of airbench94: its learning-rate schedule \
             spans the run's epochs (drop --epochs; --max-steps stops it earlier)"
        );
    }
    Ok(())
}

/// Always on: faster on this project's CPU, in training and evaluation
/// alike, as on GPUs.
const CHANNELS_LAST: bool = true;

/// airbench94 trains on `train` (which it drops once the augmented copy
/// is made), from `resumed` if given, through the harness. Returns the
/// network, the harness's figures and the seconds of each epoch this
/// process trained (in part or whole).
pub fn train(
    train: Split,
    settings: &Settings,
    resumed: Option<Checkpoint>,
    start_event: serde_json::Value,
    control: &mut Control,
    board: &mut super::board::Board,
    reporter: &mut Reporter,
) -> Result<(Airbench, TrainStats, Vec<f64>)> {
    if (train.len() as i64) < BATCH_SIZE {
        bail!(
            "the training set has {} images, fewer than one mini-batch of {BATCH_SIZE} \
             (airbench94 drops the last partial batch)",
            train.len()
        );
    }
    let device = train.images.device();
    let classes = train.classes.clone();
    let (vs, net) = crate::airbench::net::build(device, settings.seed, classes.len() as i64);
    let epochs = settings
        .schedule_epochs
        .expect("airbench94's settings have its schedule's length");
    let Split { images, labels, .. } = train;
    let mut recipe = FastRecipe::new(&net, images, &labels, settings.seed, epochs, CHANNELS_LAST);
    if let Some(c) = resumed {
        let step = c.meta.position.global_step;
        let path = c.path.clone();
        recipe
            .restore(&c.into_tensors(), step)
            .with_context(|| format!("cannot resume from {}", path.display()))?;
    }
    if reporter.is_json() {
        reporter.emit(String::new, start_event);
    }
    let total = recipe.total_steps();
    // One line per epoch (a hook) instead of running-loss lines.
    let plan = Plan {
        max_steps: Some(settings.max_steps.map_or(total, |m| m.min(total))),
        diverged_hint: Some(
            "airbench94's hyperparameters are fixed: check the training data".to_string(),
        ),
        ..control.plan(settings.epochs)
    };
    let mut lines = EpochLines::new(recipe.steps_per_epoch());
    let stats = harness::run(&mut recipe, plan, &mut [&mut lines, board], reporter)?;
    drop(recipe);
    Ok((Airbench::trained(vs, net, classes), stats, lines.seconds))
}

impl Recipe for FastRecipe<'_> {
    fn steps_per_epoch(&self) -> u64 {
        FastRecipe::steps_per_epoch(self)
    }

    fn start_epoch(&mut self, epoch: u64) -> Result<()> {
        FastRecipe::start_epoch(self, epoch);
        Ok(())
    }

    fn training_step(&mut self, epoch: u64, step: u64) -> Result<StepOutput> {
        let (loss, images) = FastRecipe::training_step(self, epoch, step);
        Ok(StepOutput {
            // The recipe sums over the batch (the global batch, in a
            // distributed run); the lines show the mean.
            loss: loss.detach() / BATCH_SIZE as f64,
            images: images as u64,
        })
    }

    fn loss_reduction(&self) -> LossReduction {
        LossReduction::Sum
    }

    fn replicated(&self) -> Vec<Tensor> {
        FastRecipe::replicated(self)
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        FastRecipe::checkpoint_tensors(self)
    }

    fn is_finite(&self) -> bool {
        FastRecipe::is_finite(self)
    }
}

/// One line per epoch: its mean training loss and its seconds.
struct EpochLines {
    steps_per_epoch: u64,
    sum: f64,
    count: u64,
    began: Instant,
    /// Each finished epoch's seconds.
    seconds: Vec<f64>,
}

impl EpochLines {
    fn new(steps_per_epoch: u64) -> EpochLines {
        EpochLines {
            steps_per_epoch,
            sum: 0.0,
            count: 0,
            began: Instant::now(),
            seconds: vec![],
        }
    }
}

impl<R: ?Sized> Hook<R> for EpochLines {
    fn needs_losses(&self, end: &StepEnd) -> bool {
        end.epoch_end || end.last
    }

    fn on_losses(&mut self, losses: &StepLosses, _reporter: &Reporter) -> Result<()> {
        self.sum += losses.values[0];
        self.count += 1;
        Ok(())
    }

    fn on_start(&mut self) {
        self.began = Instant::now();
    }

    fn after_step(&mut self, _recipe: &R, end: &StepEnd, reporter: &Reporter) -> Result<()> {
        if !(end.epoch_end || end.last) {
            return Ok(());
        }
        let StepEnd {
            epoch, global_step, ..
        } = *end;
        let mean = self.sum / self.count.max(1) as f64;
        let seconds = self.began.elapsed().as_secs_f64();
        reporter.emit(
            || {
                format!(
                    "epoch {epoch:2}  step {global_step:4}  train loss {mean:.4}  {seconds:.1} s"
                )
            },
            json!({"event": "epoch", "epoch": epoch, "step": global_step, "train_loss": mean,
                   "seconds": seconds, "steps_in_epoch": self.count.min(self.steps_per_epoch)}),
        );
        self.seconds.push(seconds);
        (self.sum, self.count, self.began) = (0.0, 0, Instant::now());
        Ok(())
    }
}
