//! The tutorial's training recipe: `Net` on logits with cross-entropy, SGD
//! with momentum on mini-batches reshuffled every epoch, the running loss
//! printed every 2000 mini-batches, then the test-set accuracy.
//!
//! Around it, what keeps a long run safe: checkpoints (see
//! [`crate::checkpoint`]) after every epoch, every `--checkpoint-every`
//! steps and at `--max-steps`, `--resume` from the newest valid one with the
//! run's own settings ([`resume`]), a first SIGINT/SIGTERM that finishes the
//! step, saves and exits with status 130 ([`Interrupted`]), and a stop on the
//! first non-finite loss that leaves the saved files alone.

mod args;
mod fast;
mod folders;
pub mod resume;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ArgMatches;
use serde_json::json;
use tch::nn::Module;
use tch::{Device, Tensor};

pub use self::args::{
    describe_device, CheckpointArgs, Given, Recipe, TrainArgs, MAX_EPOCHS, MAX_THREADS,
};
use self::folders::{
    check_no_interrupted_run, interrupt_dir, prepare_checkpoint_dir, remove_checkpoints, same_dir,
};
use self::resume::{check_and_restore, evaluate_command, resume_command, resumed_settings};
use crate::checkpoint::{self, Meta, Position, Saver};
use crate::data::{self, Split};
use crate::device::device_name;
use crate::evaluate::{evaluate, predict_classes};
use crate::model::Model;
use crate::optim::Sgd;
use crate::report::{optional_path_json, path_json, step_bar, Diverged, Reporter};
pub use crate::settings::{
    diverged_hint, Settings, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_LOG_EVERY, DEFAULT_LR, DEFAULT_MOMENTUM,
};

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainStats {
    /// Steps since the start of training, those before a resume included.
    pub steps: u64,
    /// Images trained on by this process.
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

/// What SIGINT and SIGTERM do, as two flags the signal handlers read or set.
pub struct Interrupts {
    /// Set by the first signal: the loop finishes its step, saves and stops.
    /// Once it is set, the next signal exits at once.
    pub stop: AtomicBool,
    /// While set (outside the training loop, where there is no step to
    /// finish and nothing to save), a signal exits with status 130 at once.
    pub exit_now: AtomicBool,
}

impl Interrupts {
    pub const fn new() -> Interrupts {
        Interrupts {
            stop: AtomicBool::new(false),
            exit_now: AtomicBool::new(true),
        }
    }
}

impl Default for Interrupts {
    fn default() -> Self {
        Self::new()
    }
}

static INTERRUPTS: Interrupts = Interrupts::new();
static FILE_SIZE_LIMIT_HIT: AtomicBool = AtomicBool::new(false);

/// Routes SIGINT and SIGTERM to [`INTERRUPTS`], and keeps SIGXFSZ from
/// killing the process.
fn install_signal_handlers() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
    use signal_hook::flag;
    for signal in [SIGINT, SIGTERM] {
        // Actions run in this order, so the exits see the flags as they were
        // before this signal set `stop`.
        flag::register_conditional_shutdown(signal, 130, &INTERRUPTS.stop)?;
        flag::register_conditional_shutdown(signal, 130, &INTERRUPTS.exit_now)?;
        flag::register(signal, &INTERRUPTS.stop)?;
    }
    // Past `ulimit -f` the kernel sends SIGXFSZ, whose default action kills
    // the process mid-write; handled, the write fails with EFBIG instead and
    // is reported like a full disk.
    flag::register(SIGXFSZ, &FILE_SIZE_LIMIT_HIT)?;
    Ok(())
}

/// The run stopped on SIGINT or SIGTERM, with what it had saved. `main`
/// prints it and exits with status 130.
#[derive(Debug)]
pub struct Interrupted {
    pub position: Position,
    pub saved: Saved,
}

/// What an interrupted run saved to go on from.
#[derive(Debug)]
pub enum Saved {
    /// A checkpoint, and the command that continues the run from it.
    Checkpoint { path: PathBuf, resume: String },
    /// Stopped in its last step, the run had finished training: `--out`
    /// holds the weights, and the command evaluates them, which the run
    /// skipped.
    Weights { path: PathBuf, evaluate: String },
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Position { epoch, step, .. } = self.position;
        match &self.saved {
            Saved::Checkpoint { path, resume } => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let file = path.file_name().unwrap_or_default();
                write!(
                    f,
                    "interrupted at epoch {epoch}, step {step}; checkpoint in {} ({}); resume \
                     with: {resume}",
                    dir.display(),
                    file.to_string_lossy(),
                )
            }
            Saved::Weights { path, evaluate } => write!(
                f,
                "interrupted in the last step (epoch {epoch}, step {step}): training is \
                 complete and {} holds the weights, but the test set was not evaluated; \
                 evaluate with: {evaluate}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Interrupted {}

/// Where a run starts, and how it saves and stops.
pub struct Control<'a> {
    /// [`Position::START`], or the resumed checkpoint's.
    pub start: Position,
    pub saver: Saver,
    /// Save after every epoch, not only on an interrupt.
    pub every_epoch: bool,
    /// Also save every N global steps.
    pub every: Option<u64>,
    pub interrupts: &'a Interrupts,
    /// Read the losses on the host every N steps: [`read_losses_every`].
    pub read_losses_every: usize,
    /// `tch-cifar train --resume DIR …`, for the interrupt message.
    pub resume_command: String,
}

impl Control<'_> {
    /// Saves at `at` for an interrupt and returns the error that ends the run.
    fn interrupt(
        &mut self,
        model: &Model,
        opt: &Sgd,
        at: Position,
        reporter: &Reporter,
    ) -> anyhow::Error {
        let checkpoint = match self.saver.save(model, opt, at) {
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
                       "resume": self.resume_command}),
            );
        }
        Interrupted {
            position: at,
            saved: Saved::Checkpoint {
                path: checkpoint,
                resume: self.resume_command.clone(),
            },
        }
        .into()
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

/// How many steps' losses [`train`] gathers before it reads them on the
/// host: 1 on the CPU, a few hundred on a GPU.
///
/// Reading a loss (PyTorch's `loss.item()`) makes the host wait until the
/// device has finished the step. On the CPU the step is already finished.
/// On a GPU the host would stop queueing work on every step and wait for the
/// device instead, so the losses stay in a buffer on the device and come back
/// in one copy. A non-finite loss still stops the run at the step it names,
/// a few hundred steps later at most and before anything is saved.
pub fn read_losses_every(device: Device) -> usize {
    match device {
        Device::Cpu => 1,
        _ => 256,
    }
}

/// The losses of the steps not yet read on the host. Whatever the batching,
/// each loss reads as the same float, in step order.
struct PendingLosses {
    /// One slot per step, on the device; `None` reads each loss at once.
    buffer: Option<Tensor>,
    capacity: usize,
    /// `(epoch, step)` of each pending loss.
    steps: Vec<(u64, u64)>,
    /// The losses read at once (without a buffer).
    values: Vec<f64>,
}

impl PendingLosses {
    fn new(device: Device, capacity: usize) -> PendingLosses {
        let capacity = capacity.max(1);
        PendingLosses {
            buffer: (capacity > 1)
                .then(|| Tensor::zeros([capacity as i64], (tch::Kind::Float, device))),
            capacity,
            steps: Vec::with_capacity(capacity),
            values: Vec::with_capacity(capacity),
        }
    }

    fn push(&mut self, loss: &Tensor, epoch: u64, step: u64) {
        match &self.buffer {
            None => self.values.push(loss.double_value(&[])),
            Some(buffer) => tch::no_grad(|| {
                let mut slot = buffer.get(self.steps.len() as i64);
                slot.copy_(loss);
            }),
        }
        self.steps.push((epoch, step));
    }

    fn is_full(&self) -> bool {
        self.steps.len() >= self.capacity
    }

    /// `(epoch, step, loss)` of each pending step, oldest first, emptying
    /// the queue (its vectors keep their room: this runs every step on the CPU).
    fn read(&mut self) -> Result<impl Iterator<Item = (u64, u64, f64)> + '_> {
        if let Some(buffer) = &self.buffer {
            let pending = buffer.narrow(0, 0, self.steps.len() as i64);
            let read = Vec::<f32>::try_from(pending.to_device(Device::Cpu))
                .context("cannot read the losses back from the device")?;
            self.values.extend(read.into_iter().map(f64::from));
        }
        Ok(self
            .steps
            .drain(..)
            .zip(self.values.drain(..))
            .map(|((epoch, step), loss)| (epoch, step, loss)))
    }
}

/// The mini-batch index tensors of one epoch, in the seeded order.
pub fn epoch_batches(
    seed: u64,
    epoch: u64,
    n: usize,
    batch_size: u64,
    device: Device,
) -> impl Iterator<Item = Tensor> {
    let order = Tensor::from_slice(&data::epoch_order(seed, epoch as usize, n)).to_device(device);
    let batch = batch_size as i64;
    let n = n as i64;
    (0..n)
        .step_by(batch as usize)
        .map(move |start| order.narrow(0, start, batch.min(n - start)))
}

/// Trains `model` with `opt` on `train` with the run's settings, from
/// `control.start` to the end of `recipe.epochs` (or `recipe.max_steps`),
/// saving checkpoints as `control` says, and at `max_steps` when it saves
/// after every epoch. Stops with an error on the first non-finite loss, and
/// with [`Interrupted`] after a SIGINT or SIGTERM, unless that came in the
/// last step: then training ends and [`TrainStats::stopped_at_end`] says so.
pub fn train(
    model: &Model,
    opt: &mut Sgd,
    train: &Split,
    recipe: &Settings,
    control: &mut Control,
    reporter: &mut Reporter,
) -> Result<TrainStats> {
    let seed = recipe.seed;
    let device = model.vs.device();
    let n = train.len();
    if n == 0 {
        bail!("the training set is empty");
    }
    let steps_per_epoch = n.div_ceil(recipe.batch_size as usize) as u64;
    let start = control.start.normalized(steps_per_epoch);
    let last_step = recipe.epochs * steps_per_epoch;
    let bar = reporter.attach_bar(step_bar(
        recipe.max_steps.map_or(last_step, |m| m.min(last_step)),
    ));
    bar.set_position(start.global_step);
    let mut stats = TrainStats {
        steps: start.global_step,
        images: 0,
        train_seconds: 0.0,
        running_losses: vec![],
        stopped_at_end: None,
    };
    let began = Instant::now();
    let mut at = start;
    let mut losses = PendingLosses::new(device, control.read_losses_every);
    let reached_max_steps = |steps: u64| recipe.max_steps.is_some_and(|m| steps >= m);
    // The latest loss line's mean, for the progress bar right after it.
    let mut last_mean = f64::NAN;
    control.interrupts.exit_now.store(false, Ordering::SeqCst);
    let step_delay = test_step_delay();
    let mut epochs = || -> Result<()> {
        for epoch in start.epoch..=recipe.epochs {
            bar.set_prefix(format!("epoch {epoch}/{}", recipe.epochs));
            let (done, mut running_loss) = if epoch == start.epoch {
                (start.step, start.running_loss)
            } else {
                (0, 0.0)
            };
            let batches = epoch_batches(seed, epoch - 1, n, recipe.batch_size, device);
            for (i, index) in batches.enumerate().skip(done as usize) {
                // Before the step: a run resumed at its --max-steps trains none.
                if reached_max_steps(stats.steps) {
                    break;
                }
                let step = i as u64 + 1;
                let (images, labels) = train.select(&index);
                let loss = model.net.forward(&images).cross_entropy_for_logits(&labels);
                opt.step(&loss);
                losses.push(&loss, epoch, step);
                stats.steps += 1;
                stats.images += index.size()[0] as u64;
                bar.inc(1);
                if let Some(delay) = step_delay {
                    std::thread::sleep(delay);
                }
                let stop = control.interrupts.stop.load(Ordering::Relaxed);
                let last = reached_max_steps(stats.steps);
                let save = control.every.is_some_and(|k| stats.steps.is_multiple_of(k))
                    || (last && control.every_epoch);
                let show = step.is_multiple_of(256);
                // What follows needs the running loss, so the losses are read first.
                if !(losses.is_full()
                    || show
                    || save
                    || stop
                    || last
                    || step == steps_per_epoch
                    || step.is_multiple_of(recipe.log_every))
                {
                    continue;
                }
                for (epoch, step, loss) in losses.read()? {
                    if !loss.is_finite() {
                        return Err(Diverged(format!(
                            "the loss became {loss} at epoch {epoch}, step {step}: training \
                             diverged. {}. {}",
                            diverged_hint(recipe.lr, recipe.momentum),
                            not_saved(control.saver.last())
                        ))
                        .into());
                    }
                    running_loss += loss;
                    if step.is_multiple_of(recipe.log_every) {
                        let mean = running_loss / recipe.log_every as f64;
                        stats.running_losses.push((epoch, step, mean));
                        reporter.emit(
                            || format!("[{epoch}, {step:5}] loss: {mean:.3}"),
                            json!({"event": "loss", "epoch": epoch, "step": step, "loss": mean}),
                        );
                        running_loss = 0.0;
                        last_mean = mean;
                    }
                }
                if show {
                    let rate = stats.images as f64 / began.elapsed().as_secs_f64();
                    let since_log = step % recipe.log_every;
                    let loss = match since_log {
                        0 => last_mean,
                        n => running_loss / n as f64,
                    };
                    bar.set_message(format!("loss {loss:.3} {rate:.0} img/s"));
                }
                at = Position {
                    epoch,
                    step,
                    global_step: stats.steps,
                    running_loss,
                };
                if save {
                    control.saver.save(model, opt, at)?;
                }
                // Stopped in the run's last step, training is complete: no
                // checkpoint to resume, the caller writes --out and stops.
                let end = last || (epoch == recipe.epochs && step == steps_per_epoch);
                if stop && !end {
                    return Err(control.interrupt(model, opt, at, reporter));
                }
                if last {
                    break;
                }
            }
            let epoch_done = at.epoch == epoch && at.step == steps_per_epoch;
            if control.every_epoch && epoch_done {
                control.saver.save(model, opt, at)?;
            }
            if reached_max_steps(stats.steps) {
                break;
            }
        }
        // A loss is computed before its step's update, so the last update
        // is checked here: --out must not get weights that diverged.
        if !model.is_finite() {
            return Err(Diverged(format!(
                "the weights became non-finite in the last step (epoch {}, step {}): training \
                 diverged. {}. {}",
                at.epoch,
                at.step,
                diverged_hint(recipe.lr, recipe.momentum),
                not_saved(control.saver.last())
            ))
            .into());
        }
        // Training is over: from here a signal exits at once. One that came
        // during the last step or the saves after it still stops the run,
        // once --out holds the weights.
        control.interrupts.exit_now.store(true, Ordering::SeqCst);
        if control.interrupts.stop.load(Ordering::SeqCst) {
            stats.stopped_at_end = Some(at);
        }
        Ok(())
    };
    let result = epochs();
    control.interrupts.exit_now.store(true, Ordering::SeqCst);
    stats.train_seconds = began.elapsed().as_secs_f64();
    reporter.finish_bar();
    result.map(|()| stats)
}

/// The end of a divergence message: nothing saved, and the checkpoint to go back to.
fn not_saved(last_checkpoint: Option<&Path>) -> String {
    match last_checkpoint {
        Some(p) => format!(
            "The weights were not saved; the last good checkpoint is {}",
            p.display()
        ),
        None => "The weights were not saved".to_string(),
    }
}

/// `tch-cifar train`. `matches` are the subcommand's, which tell the flags
/// typed from the defaults.
pub fn run(args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    install_signal_handlers().context("cannot install the signal handlers")?;
    let given = Given::from_matches(matches);
    if args.model == crate::settings::ModelKind::Airbench94 {
        return fast::run(&args, &given);
    }
    let ck = &args.checkpoints;
    if ck.checkpoint_every.is_some() && ck.checkpoint_dir.is_none() && ck.resume.is_none() {
        bail!("--checkpoint-every needs --checkpoint-dir DIR (or --resume DIR) to save into");
    }
    let resumed = ck.resume.as_deref().map(checkpoint::newest).transpose()?;
    let mut settings = match &resumed {
        None => args.settings(),
        Some(c) => {
            let (settings, notes) = resumed_settings(&args, &given, &c.meta, &c.path)?;
            for note in notes {
                eprintln!("{note}");
            }
            settings
        }
    };
    let seed = settings.seed;
    let json = args.json;
    let out = settings.out.clone();
    let device = settings.device.resolve()?;
    // Until the test set is evaluated.
    let training = settings.cpu_settings().apply();
    crate::fsutil::check_writable(&out)?;
    let data_args = data::DataArgs {
        data_dir: settings.data_dir.clone(),
        ..args.data
    };
    crate::outputs::check_command_outputs(&data_args, &[], &[("--out", Some(out.as_path()))])?;
    let (out_format, note) = crate::outputs::weights_format(&out);
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    // Checkpoints go to --checkpoint-dir, else to the folder resumed from.
    let checkpoint_dir = ck.checkpoint_dir.clone().or_else(|| ck.resume.clone());
    match &checkpoint_dir {
        Some(dir) => prepare_checkpoint_dir(dir, ck.resume.as_deref())?,
        // An interrupt would save there and delete what is there already.
        None => check_no_interrupted_run(&interrupt_dir(&out))?,
    }

    let source = data_args.prepare()?;
    // The test set goes onto the device once training is over and the
    // training set is gone, which keeps the peak memory down; it is checked
    // now (an image tree's decoded), so bad test data fails before training
    // rather than after.
    let (train_set, test_split) = source.load_for_training(device)?;
    settings.classes = train_set.classes.clone();
    let meta = Meta::new(
        settings,
        device_name(device),
        train_set.len() as u64,
        train_set.md5.clone(),
    );
    let settings = &meta.settings;
    let mut reporter = Reporter::new(json);
    eprintln!(
        "training on {} with {} images, seed {seed} (--seed {seed} repeats this run)",
        describe_device(device, settings.cpu_settings()),
        train_set.len()
    );
    let mut start_event = settings_json(settings, device);
    start_event["event"] = json!("start");
    start_event["train_images"] = json!(train_set.len());

    let mut model = Model::with_classes(device, Some(seed), train_set.classes.clone());
    let mut opt = Sgd::new(&model, settings.lr, settings.momentum);
    let resumed_from = resumed
        .as_ref()
        .map(|c| (c.meta.position.global_step, c.path.clone()));
    let start = match resumed {
        Some(c) => check_and_restore(c, &meta, &mut model, &mut opt, &mut start_event)?,
        None => Position::START,
    };
    // The start event has no line in the tutorial's text.
    if reporter.is_json() {
        reporter.emit(String::new, start_event);
    }

    let (dir, keep, every_epoch) = match checkpoint_dir {
        Some(dir) => (dir, settings.keep_checkpoints as usize, true),
        // Only an interrupt saves there, and only its newest checkpoint stays.
        None => (interrupt_dir(&out), 1, false),
    };
    // The checkpoint resumed from counts as saved, if it is in that folder.
    let last = resumed_from.filter(|(_, p)| p.parent().is_some_and(|d| same_dir(d, &dir)));
    let settings = settings.clone();
    let mut control = Control {
        start,
        every_epoch,
        every: settings.checkpoint_every,
        interrupts: &INTERRUPTS,
        read_losses_every: read_losses_every(device),
        resume_command: resume_command(&dir, json),
        saver: Saver::new(dir, keep, meta, last),
    };
    let mut stats = train(
        &model,
        &mut opt,
        &train_set,
        &settings,
        &mut control,
        &mut reporter,
    )?;
    drop(train_set);
    drop(training);
    reporter.emit(
        || "Finished Training".into(),
        json!({"event": "finished_training", "steps": stats.steps, "train_seconds": stats.train_seconds}),
    );
    crate::outputs::write_weights(&model, &out, out_format)?;
    eprintln!("saved the weights to {}", out.display());
    // Resumed from its own interrupt folder and now finished, the run has
    // no more use for that folder, which would only block the next run.
    let folder = interrupt_dir(&out);
    let finished_interrupt = ck.resume.as_deref().is_some_and(|r| same_dir(r, &folder))
        && !ck
            .checkpoint_dir
            .as_deref()
            .is_some_and(|d| same_dir(d, &folder));
    if finished_interrupt {
        remove_checkpoints(&folder)?;
        eprintln!(
            "note: removed the checkpoints in {}: the interrupted run is finished, and {} holds \
             its weights",
            folder.display(),
            out.display()
        );
    }
    if let Some(position) = stats.stopped_at_end.take() {
        let evaluate = evaluate_command(&settings, json);
        if reporter.is_json() {
            reporter.emit(
                String::new,
                json!({"event": "interrupted", "epoch": position.epoch, "step": position.step,
                       "global_step": position.global_step, "weights": path_json(&out),
                       "evaluate": evaluate}),
            );
        }
        let saved = Saved::Weights {
            path: out,
            evaluate,
        };
        return Err(Interrupted { position, saved }.into());
    }

    let test = test_split.load(device)?;
    report_test(&reporter, &model, &test)?;
    let eval_start = Instant::now();
    let eval = evaluate(&model.net, &test, 1000);
    let eval_seconds = eval_start.elapsed().as_secs_f64();
    let mut summary = settings_json(&settings, device);
    summary["event"] = json!("summary");
    let fields = summary.as_object_mut().expect("json! object");
    fields.extend(eval.json_fields());
    fields.insert("steps".into(), json!(stats.steps));
    fields.insert("train_seconds".into(), json!(stats.train_seconds));
    fields.insert("images_per_second".into(), json!(stats.images_per_second()));
    fields.insert("eval_seconds".into(), json!(eval_seconds));
    fields.insert("weights".into(), path_json(&out));
    fields.insert(
        "checkpoint".into(),
        optional_path_json(control.saver.last().filter(|_| !finished_interrupt)),
    );
    reporter.emit(|| eval.text(), summary);
    Ok(())
}

/// The settings in the `start` and `summary` events.
fn settings_json(s: &Settings, device: Device) -> serde_json::Value {
    json!({
        "epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr,
        "momentum": s.momentum, "seed": s.seed, "device": device_name(device),
        "threads": s.threads, "cpu_conv": s.cpu_conv.name(),
    })
}

/// The tutorial's peek at the first four test images before the full
/// evaluation: their true classes and the network's guesses.
fn report_test(reporter: &Reporter, model: &Model, test: &Split) -> Result<()> {
    let shown = test.len().min(4) as i64;
    let truth: Vec<i64> = Vec::try_from(&test.labels.narrow(0, 0, shown).to_device(Device::Cpu))?;
    let preds = predict_classes(&model.net, &test.images.narrow(0, 0, shown), shown);
    let preds: Vec<i64> = Vec::try_from(&preds.to_device(Device::Cpu))?;
    let names = |v: &[i64]| {
        v.iter()
            .map(|&c| test.classes[c as usize].as_str())
            .collect::<Vec<_>>()
    };
    let padded = |v: &[i64]| {
        names(v)
            .iter()
            .map(|n| format!("{n:5}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    reporter.emit(
        || format!("GroundTruth:  {}\nPredicted:  {}", padded(&truth), padded(&preds)),
        json!({"event": "sample_predictions", "ground_truth": names(&truth), "predicted": names(&preds)}),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The tutorial's recipe on the CPU, logging every step, with `images`
    /// training images.
    fn meta(lr: f64, epochs: u64, images: u64) -> Meta {
        let settings = Settings {
            lr,
            epochs,
            log_every: 1,
            ..Settings::tutorial(1)
        };
        Meta::new(settings, "cpu".into(), images, None)
    }

    #[test]
    fn only_an_unfinished_run_blocks_its_interrupt_folder() {
        // 40 images: 10 steps per epoch, 20 in all.
        let meta = meta(0.01, 2, 40);
        let dir = tempfile::tempdir().unwrap();
        check_no_interrupted_run(dir.path()).unwrap();
        let model = Model::new(Device::Cpu, Some(1));
        let opt = Sgd::new(&model, 0.01, 0.9);
        let mut saver = Saver::new(dir.path().to_path_buf(), 1, meta, None);
        let at = |epoch, step, global_step| Position {
            epoch,
            step,
            global_step,
            running_loss: 0.0,
        };
        saver.save(&model, &opt, at(1, 5, 5)).unwrap();
        let err = check_no_interrupted_run(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds the checkpoint of an interrupted run (checkpoint-e0001-s0000005"),
            "{err}"
        );
        // A finished run's checkpoint: a new run may start.
        saver.save(&model, &opt, at(2, 10, 20)).unwrap();
        check_no_interrupted_run(dir.path()).unwrap();
    }

    /// An update that overflows on the last step leaves finite losses behind
    /// it; the run must still fail rather than write non-finite weights.
    #[test]
    fn weights_that_overflow_on_the_last_step_are_an_error() {
        // Huge pixels give huge but finite logits and gradients; a huge rate
        // then overflows the first update.
        let train_set = Split {
            images: Tensor::full([4, 3, 32, 32], 1e15, (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[0i64, 1, 2, 3]),
            md5: None,
            classes: data::cifar::classes(),
        };
        let meta = meta(1e30, 1, 4);
        let recipe = meta.settings.clone();
        let dir = tempfile::tempdir().unwrap();
        let interrupts = Interrupts::new();
        let mut control = Control {
            start: Position::START,
            saver: Saver::new(dir.path().to_path_buf(), 2, meta, None),
            every_epoch: false,
            every: None,
            interrupts: &interrupts,
            read_losses_every: 1,
            resume_command: String::new(),
        };
        let model = Model::new(Device::Cpu, Some(1));
        let mut opt = Sgd::new(&model, recipe.lr, recipe.momentum);
        let mut reporter = Reporter::new(true);
        let err = train(
            &model,
            &mut opt,
            &train_set,
            &recipe,
            &mut control,
            &mut reporter,
        )
        .expect_err("training must fail");
        let message = err.to_string();
        assert!(
            message.starts_with("the weights became non-finite in the last step (epoch 1, step 1)"),
            "{message}"
        );
        assert!(!model.is_finite());
    }
}
