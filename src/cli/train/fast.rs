//! `tch-cifar train --model airbench94` and `--model airbench94-muon`: the
//! fast recipes ([`crate::nets::airbench`]) as the [harness](super::harness)
//! drives them, one line per epoch. The trained network is a [`crate::nets::classifier::Airbench`],
//! as `evaluate` loads it.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Tensor;

use super::args::Given;
use super::{Control, TrainStats, Watchers};
use crate::data::Split;
use crate::distributed::LossReduction;
use crate::nets::airbench::Variant;
use crate::nets::classifier::Airbench;
use crate::train::checkpoint::Checkpoint;
use crate::train::harness::{self, Hook, Plan, Recipe, StepEnd, StepLosses, StepOutput};
use crate::train::recipes::airbench::{FastRecipe, MuonRecipe};
use crate::train::settings::Settings;
use crate::util::report::Reporter;

/// The tutorial's flags that the fast recipe, with its own fixed
/// hyperparameters, does not take.
const TUTORIAL_ONLY: [&str; 5] = [
    "--batch-size",
    "--lr",
    "--momentum",
    "--log-every",
    "--cpu-conv",
];

/// Refuses the flags the fast recipe `name` has no use for; on a resume
/// (from a checkpoint of the settings `resumed`) also an `--epochs` other
/// than the checkpoint's, which would change its schedule.
pub fn check_flags(
    given: &Given,
    resumed: Option<&Settings>,
    epochs: u64,
    name: &str,
) -> Result<()> {
    for flag in TUTORIAL_ONLY {
        if given.has(flag) {
            bail!(
                "{flag} is a setting of the tutorial's recipe; --model {name} has its own \
                 fixed hyperparameters (drop the flag, or use --model net)"
            );
        }
    }
    // A restart by torchrun gives the same --epochs again.
    let changes = |s: &Settings| s.schedule_epochs != Some(epochs as f64);
    if given.has("--epochs") && resumed.is_some_and(changes) {
        bail!(
            "--epochs cannot change on a resume of {name}: its learning-rate schedule \
             spans the run's epochs (drop --epochs; --max-steps stops it earlier)"
        );
    }
    Ok(())
}

/// Always on: faster on this project's CPU, in training and evaluation
/// alike, as on GPUs.
const CHANNELS_LAST: bool = true;

/// A fast recipe's training state, as [`train`] drives it.
trait FastTraining: Recipe {
    fn total_steps(&self) -> u64;
    /// The checkpoint's tensors put back after `global_step` steps.
    fn restore(&mut self, tensors: &HashMap<String, Tensor>, global_step: u64) -> Result<()>;
}

/// A fast recipe (`settings.model`: airbench94 or airbench94-muon) trains
/// on `train` (which it drops once the augmented copy is made), from
/// `resumed` if given, through the harness. Returns the network, the
/// harness's figures and the seconds of each epoch this process trained
/// (in part or whole).
pub fn train(
    train: Split,
    settings: &Settings,
    resumed: Option<Checkpoint>,
    start_event: serde_json::Value,
    control: &mut Control,
    watchers: Watchers,
    reporter: &mut Reporter,
) -> Result<(Airbench, TrainStats, Vec<f64>)> {
    let variant = settings
        .model
        .airbench()
        .expect("the fast recipes train an airbench network");
    let name = settings.model.name();
    let batch = batch_size(variant);
    if (train.len() as i64) < batch {
        bail!(
            "the training set has {} images, fewer than one mini-batch of {batch} \
             ({name} drops the last partial batch)",
            train.len()
        );
    }
    let device = train.images.device();
    let classes = train.classes.clone();
    let (vs, net) =
        crate::nets::airbench::net::build(device, settings.seed, classes.len() as i64, variant);
    let epochs = settings
        .schedule_epochs
        .expect("a fast recipe's settings have its schedule's length");
    let Split { images, labels, .. } = train;
    let seed = settings.seed;
    let precision = settings.precision(device);
    let run = Run {
        settings,
        name,
        resumed,
        start_event,
        control,
        watchers,
        reporter,
    };
    let (stats, seconds) = match variant {
        Variant::Airbench94 => run.drive(FastRecipe::new(
            &net,
            images,
            &labels,
            seed,
            epochs,
            CHANNELS_LAST,
            precision,
        ))?,
        Variant::Muon => run.drive(MuonRecipe::new(
            &net,
            images,
            &labels,
            seed,
            epochs,
            CHANNELS_LAST,
            precision,
        ))?,
    };
    Ok((Airbench::trained(vs, net, classes), stats, seconds))
}

/// The global mini-batch of a fast recipe.
pub fn batch_size(variant: Variant) -> i64 {
    match variant {
        Variant::Airbench94 => crate::train::recipes::airbench::BATCH_SIZE,
        Variant::Muon => crate::train::recipes::airbench::airbench94_muon::BATCH_SIZE,
    }
}

/// What [`train`] hands the harness besides the recipe.
struct Run<'s, 'c> {
    settings: &'s Settings,
    name: &'static str,
    resumed: Option<Checkpoint>,
    start_event: serde_json::Value,
    control: &'s mut Control<'c>,
    watchers: Watchers<'s>,
    reporter: &'s mut Reporter,
}

impl Run<'_, '_> {
    fn drive<R: FastTraining>(self, mut recipe: R) -> Result<(TrainStats, Vec<f64>)> {
        if let Some(c) = self.resumed {
            let step = c.meta.position.global_step;
            let path = c.path.clone();
            recipe
                .restore(&c.into_tensors(), step)
                .with_context(|| format!("cannot resume from {}", path.display()))?;
        }
        if self.reporter.is_json() {
            self.reporter.emit(String::new, self.start_event);
        }
        let total = recipe.total_steps();
        // One line per epoch (a hook) instead of running-loss lines.
        let plan = Plan {
            max_steps: Some(self.settings.max_steps.map_or(total, |m| m.min(total))),
            diverged_hint: Some(format!(
                "{}'s hyperparameters are fixed: check the training data",
                self.name
            )),
            ..self.control.plan(self.settings.epochs)
        };
        let mut lines = EpochLines::new(recipe.steps_per_epoch());
        let mut hooks: Vec<&mut dyn Hook<R>> = vec![&mut lines];
        hooks.extend(self.watchers.into_hooks());
        let stats = harness::run(&mut recipe, plan, &mut hooks, self.reporter)?;
        drop(hooks);
        Ok((stats, lines.seconds))
    }
}

impl FastTraining for FastRecipe<'_> {
    fn total_steps(&self) -> u64 {
        FastRecipe::total_steps(self)
    }

    fn restore(&mut self, tensors: &HashMap<String, Tensor>, global_step: u64) -> Result<()> {
        FastRecipe::restore(self, tensors, global_step)
    }
}

impl FastTraining for MuonRecipe<'_> {
    fn total_steps(&self) -> u64 {
        MuonRecipe::total_steps(self)
    }

    fn restore(&mut self, tensors: &HashMap<String, Tensor>, global_step: u64) -> Result<()> {
        MuonRecipe::restore(self, tensors, global_step)
    }
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
        Ok(mean_loss(
            loss,
            images,
            crate::train::recipes::airbench::BATCH_SIZE,
        ))
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

impl Recipe for MuonRecipe<'_> {
    fn steps_per_epoch(&self) -> u64 {
        MuonRecipe::steps_per_epoch(self)
    }

    fn start_epoch(&mut self, epoch: u64) -> Result<()> {
        MuonRecipe::start_epoch(self, epoch);
        Ok(())
    }

    fn training_step(&mut self, epoch: u64, step: u64) -> Result<StepOutput> {
        let (loss, images) = MuonRecipe::training_step(self, epoch, step);
        Ok(mean_loss(
            loss,
            images,
            crate::train::recipes::airbench::airbench94_muon::BATCH_SIZE,
        ))
    }

    fn loss_reduction(&self) -> LossReduction {
        LossReduction::Sum
    }

    fn replicated(&self) -> Vec<Tensor> {
        MuonRecipe::replicated(self)
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        MuonRecipe::checkpoint_tensors(self)
    }

    fn is_finite(&self) -> bool {
        MuonRecipe::is_finite(self)
    }
}

/// The step's output from a loss summed over this rank's `images`: the
/// recipes sum over the batch (the global batch, in a distributed run),
/// the lines show the mean over the global `batch`.
fn mean_loss(loss: Tensor, images: i64, batch: i64) -> StepOutput {
    StepOutput {
        loss: loss.detach() / batch as f64,
        images: images as u64,
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

#[cfg(test)]
mod tests {
    use super::super::args::tests::parse;
    use super::*;

    /// A restart by torchrun repeats the command line, --epochs included:
    /// the checkpoint's own count is taken, any other refused.
    #[test]
    fn a_resume_takes_its_own_epochs_and_refuses_others() {
        let (args, given) = parse(&["--model", "airbench94", "--epochs", "3"]).unwrap();
        let saved = args.settings(&given);
        check_flags(&given, Some(&saved), 3, "airbench94").unwrap();
        let (_, other) = parse(&["--model", "airbench94", "--epochs", "4"]).unwrap();
        let err = check_flags(&other, Some(&saved), 4, "airbench94").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--epochs cannot change on a resume of airbench94"),
            "{err}"
        );
        check_flags(&other, None, 4, "airbench94").unwrap();
    }
}
