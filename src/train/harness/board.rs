//! `train --logdir`: a training run's TensorBoard events, written by a
//! [`Hook`] of the harness (the training curves) and, once training is
//! over, by [`Board::evaluation`] (the test set).
//!
//! | tag | step | value |
//! | --- | --- | --- |
//! | `train/loss` | each loss mark | the mean loss the `loss` (tutorial) or `epoch` (airbench94) line prints |
//! | `train/lr`, `train/lr_norm_biases` | each loss mark | the learning rate of the mark's step (airbench94's two groups) |
//! | `train/images_per_second` | each loss mark | images trained since the last mark, per second |
//! | `train/epoch_seconds` | each epoch's last step | seconds of the epoch's steps this process trained |
//! | `test/accuracy`, `test/accuracy_tta` | the last step | percent, without and with test-time augmentation |
//! | `test/class_accuracy/<class>` | the last step | percent, each class |
//! | `test/confusion` (image) | the last step | the confusion matrix `evaluate --confusion` draws |
//! | `hparams/text_summary` (text) | the first step | the run's settings |
//!
//! A loss mark is a `--log-every` step for the tutorial's Net, the end of
//! an epoch (or of the run) for airbench94: where the `--json` output has
//! its `loss` or `epoch` event, at the same global step.

use std::time::Instant;

use anyhow::Result;

use super::{Hook, StepEnd, StepLosses};
use crate::train::checkpoint::Position;
use crate::train::evaluation::Evaluation;
use crate::train::settings::Settings;
use crate::util::report::Reporter;
use crate::util::tensorboard::Events;

/// Where a run has its loss marks.
#[derive(Debug, Clone, Copy)]
pub enum Marks {
    /// Every N steps of an epoch, the mean over those N (the tutorial's).
    EveryN(u64),
    /// The end of each epoch and of the run, the mean over the epoch's
    /// steps this process trained (airbench94's epoch lines).
    Epochs,
}

/// The learning rates of a global step (1-based), by tag.
pub type LearningRates = Box<dyn Fn(u64) -> Vec<(&'static str, f64)>>;
/// The images in step N (1-based) of an epoch.
pub type ImagesInStep = Box<dyn Fn(u64) -> u64>;

/// The TensorBoard events of one `train` run.
pub struct Board {
    pub events: Events,
    marks: Marks,
    lrs: LearningRates,
    images_in_step: ImagesInStep,
    /// The epoch `sum` belongs to.
    epoch: u64,
    /// The first loss summed since the last mark, and how many.
    sum: f64,
    count: u64,
    /// The mean at the mark that `after_step` writes next.
    mark: Option<(u64, f64)>,
    mark_began: Instant,
    images_since_mark: u64,
    epoch_began: Instant,
}

impl Board {
    /// A board writing to `events` for a run that starts at `start` (whose
    /// running-loss sum it goes on from, like the harness).
    pub fn new(
        events: Events,
        start: Position,
        marks: Marks,
        lrs: LearningRates,
        images_in_step: ImagesInStep,
    ) -> Board {
        let now = Instant::now();
        Board {
            events,
            marks,
            lrs,
            images_in_step,
            epoch: start.epoch,
            sum: match marks {
                Marks::EveryN(_) => start.running_loss,
                Marks::Epochs => 0.0,
            },
            count: 0,
            mark: None,
            mark_began: now,
            images_since_mark: 0,
            epoch_began: now,
        }
    }

    /// The run's settings as a Markdown table, under `hparams`, at `step`.
    pub fn hparams(&mut self, step: u64, settings: &Settings) {
        let mut text = String::from("| setting | value |\n| --- | --- |\n");
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(settings) {
            for (key, value) in fields {
                let value = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                text.push_str(&format!("| {key} | {} |\n", value.replace('|', "\\|")));
            }
        }
        self.events.text("hparams", step, &text);
    }

    /// The test set's figures at `step`: `eval` is the one reported (with
    /// test-time augmentation where `plain` is given too), `confusion` its
    /// picture as PNG bytes.
    pub fn evaluation(
        &mut self,
        step: u64,
        eval: &Evaluation,
        plain: Option<&Evaluation>,
        confusion: &[u8],
    ) -> Result<()> {
        let mut values = vec![];
        match plain {
            Some(plain) => {
                values.push(("test/accuracy".to_string(), plain.accuracy()));
                values.push(("test/accuracy_tta".to_string(), eval.accuracy()));
            }
            None => values.push(("test/accuracy".to_string(), eval.accuracy())),
        }
        for (class, acc) in eval.classes.iter().zip(eval.per_class()) {
            if let Some(acc) = acc {
                values.push((format!("test/class_accuracy/{class}"), acc));
            }
        }
        let values: Vec<(&str, f64)> = values.iter().map(|(t, v)| (t.as_str(), *v)).collect();
        self.events.scalars(step, &values);
        self.events.png("test/confusion", step, confusion)?;
        self.events.flush();
        Ok(())
    }

    fn is_mark(&self, end: &StepEnd) -> bool {
        match self.marks {
            Marks::EveryN(n) => end.step.is_multiple_of(n),
            Marks::Epochs => end.epoch_end || end.last,
        }
    }
}

impl<R: ?Sized> Hook<R> for Board {
    /// The epoch and images/s clocks start with the steps, as the epoch
    /// lines' do: the data's preparation is no part of epoch 1.
    fn on_start(&mut self) {
        let now = Instant::now();
        (self.mark_began, self.epoch_began) = (now, now);
    }

    fn needs_losses(&self, end: &StepEnd) -> bool {
        self.events.is_on() && self.is_mark(end)
    }

    fn on_losses(&mut self, losses: &StepLosses, _reporter: &Reporter) -> Result<()> {
        if !self.events.is_on() {
            return Ok(());
        }
        // As the harness does: a running loss starts afresh with each epoch.
        if let Marks::EveryN(n) = self.marks {
            if losses.epoch != self.epoch {
                (self.epoch, self.sum) = (losses.epoch, 0.0);
            }
            self.sum += losses.values[0];
            if losses.step.is_multiple_of(n) {
                self.mark = Some((losses.global_step, self.sum / n as f64));
                self.sum = 0.0;
            }
        } else {
            self.sum += losses.values[0];
            self.count += 1;
        }
        Ok(())
    }

    fn after_step(&mut self, _recipe: &R, end: &StepEnd, _reporter: &Reporter) -> Result<()> {
        if !self.events.is_on() {
            return Ok(());
        }
        self.images_since_mark += (self.images_in_step)(end.step);
        let step = end.global_step;
        let mut values: Vec<(&str, f64)> = vec![];
        if self.is_mark(end) {
            let mean = match self.marks {
                Marks::EveryN(_) => self.mark.take().map(|(_, mean)| mean),
                Marks::Epochs => {
                    let mean = self.sum / self.count.max(1) as f64;
                    (self.sum, self.count) = (0.0, 0);
                    Some(mean)
                }
            };
            if let Some(mean) = mean {
                values.push(("train/loss", mean));
            }
            values.extend((self.lrs)(step));
            let seconds = self.mark_began.elapsed().as_secs_f64().max(1e-9);
            values.push((
                "train/images_per_second",
                self.images_since_mark as f64 / seconds,
            ));
            self.mark_began = Instant::now();
            self.images_since_mark = 0;
        }
        if end.epoch_end || end.last {
            values.push((
                "train/epoch_seconds",
                self.epoch_began.elapsed().as_secs_f64(),
            ));
            self.epoch_began = Instant::now();
        }
        self.events.scalars(step, &values);
        Ok(())
    }
}
