//! The tutorial's training recipe: `Net` on logits with cross-entropy, SGD
//! with momentum on mini-batches reshuffled every epoch, the running loss
//! printed every 2000 mini-batches, then the test-set accuracy.
//!
//! Around it, what keeps a long run safe: checkpoints (see
//! [`crate::checkpoint`]) after every epoch and every `--checkpoint-every`
//! steps, `--resume` from the newest valid one, a first SIGINT/SIGTERM that
//! finishes the step, saves and exits with status 130 (a second one exits at
//! once), and a stop on the first non-finite loss that leaves the saved
//! files alone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tch::nn::Module;
use tch::{Device, Tensor};

use crate::checkpoint::{self, Checkpoint, Meta, Position, Saver};
use crate::data::{self, DataArgs, Split};
use crate::device::{default_threads, device_name, CpuConv, CpuSettings, DeviceArg};
use crate::evaluate::{evaluate, predict_classes};
use crate::model::Model;
use crate::optim::Sgd;
use crate::report::{optional_path_json, path_json, step_bar, Reporter};

pub const DEFAULT_EPOCHS: u64 = 2;
pub const DEFAULT_BATCH_SIZE: u64 = 4;
pub const DEFAULT_LR: f64 = 0.001;
pub const DEFAULT_MOMENTUM: f64 = 0.9;
pub const DEFAULT_LOG_EVERY: u64 = 2000;
pub const DEFAULT_KEEP_CHECKPOINTS: u64 = 2;
/// More would only wait on each other; libtorch hangs on absurd counts.
pub const MAX_THREADS: i64 = 1024;
/// Keeps epochs times steps per epoch far inside u64.
pub const MAX_EPOCHS: u64 = 1_000_000;

/// The training recipe; the defaults are the tutorial's.
#[derive(Debug, Clone, clap::Args)]
pub struct Recipe {
    /// Passes over the training set: `TrainArgs::epochs` sets it, since its
    /// default depends on `--resume`.
    #[arg(skip = DEFAULT_EPOCHS)]
    pub epochs: u64,
    /// Images per mini-batch.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
    pub batch_size: u64,
    /// SGD learning rate.
    #[arg(long, default_value_t = DEFAULT_LR, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = DEFAULT_MOMENTUM, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Seed for the initial weights and the data order. The same seed on the
    /// same data gives the same run on CPU; without one a random seed is
    /// drawn and reported.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: auto (cuda:0 if available, else cpu), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// CPU threads for libtorch's operators while training [default: 1 for
    /// batches of up to 16 images, whose operators are too small to share
    /// out; else one per core]. Evaluation always uses every core.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=MAX_THREADS))]
    pub threads: Option<i32>,
    /// Kernel for CPU convolutions while training. Evaluation always uses onednn.
    #[arg(long, value_enum, default_value_t = CpuConv::Auto, value_name = "KERNEL")]
    pub cpu_conv: CpuConv,
    /// Print the running loss every N mini-batches (the tutorial uses 2000).
    #[arg(long, default_value_t = DEFAULT_LOG_EVERY, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub log_every: u64,
    /// Stop after this many mini-batches in all: `TrainArgs::max_steps`.
    #[arg(skip)]
    pub max_steps: Option<u64>,
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if !(v.is_finite() && v >= 0.0) => {
            Err(format!("`{s}` is not a finite, non-negative number"))
        }
        // The weights are float32, where a larger value acts as infinity.
        Ok(v) if v > f32::MAX as f64 => Err(format!(
            "`{s}` is too large: the weights are float32, whose largest value is {:e}",
            f32::MAX
        )),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

impl Recipe {
    pub fn device(&self) -> Result<Device> {
        self.device.resolve()
    }

    /// libtorch's CPU settings while training with this recipe.
    pub fn cpu_settings(&self) -> CpuSettings {
        let threads = self.train_threads();
        CpuSettings {
            threads,
            conv: self.cpu_conv.resolve(self.batch_size, threads),
        }
    }

    /// `--threads`, or its default for this batch size. At batch size 4 an
    /// operator is a few microseconds of work, less than it costs to wake a
    /// second thread, and OpenMP threads that spin-wait for each other turn
    /// any other load on the machine into a many-fold slowdown.
    pub fn train_threads(&self) -> i32 {
        // Read the default before anything changes it.
        let every_core = default_threads();
        self.threads
            .unwrap_or(if self.batch_size <= 16 { 1 } else { every_core })
    }

    /// The seed given, or a fresh one drawn from the clock and process id.
    pub fn seed_or_random(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.write_u32(std::process::id());
            // Keep it within i64 so torch's manual_seed takes it as is.
            h.finish() >> 1
        })
    }

    fn json(&self, device: Device, seed: u64) -> serde_json::Value {
        let cpu = self.cpu_settings();
        json!({
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "momentum": self.momentum, "seed": seed, "device": device_name(device),
            "threads": cpu.threads, "cpu_conv": cpu.conv.name(),
        })
    }

    /// What a checkpoint of a run with this recipe records, before the
    /// training set (its size and md5) and the position are known.
    pub fn checkpoint_meta(&self, seed: u64, device: Device) -> Meta {
        let cpu = self.cpu_settings();
        Meta {
            seed,
            batch_size: self.batch_size,
            lr: self.lr,
            momentum: self.momentum,
            epochs: self.epochs,
            log_every: Some(self.log_every),
            train_images: 0,
            train_md5: None,
            threads: cpu.threads as i64,
            cpu_conv: cpu.conv,
            device: device_name(device),
            position: Position::START,
        }
    }

    /// `cpu (1 thread, im2col convolutions)`, or the CUDA device's name.
    pub fn describe_device(&self, device: Device) -> String {
        if device != Device::Cpu {
            return device_name(device);
        }
        let cpu = self.cpu_settings();
        format!(
            "cpu ({} thread{}, {} convolutions)",
            cpu.threads,
            if cpu.threads == 1 { "" } else { "s" },
            cpu.conv
        )
    }
}

/// Train the tutorial's Net on CIFAR-10, save it, and report test accuracy.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Passes over the training set [default: 2; with --resume, the
    /// checkpoint's]. A resumed run may be given more epochs than it started with.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_EPOCHS))]
    pub epochs: Option<u64>,
    #[command(flatten)]
    pub recipe: Recipe,
    /// Where to save the trained weights (safetensors, keyed like PyTorch's state_dict).
    #[arg(long, default_value = "cifar_net.safetensors", value_name = "FILE")]
    pub out: PathBuf,
    /// Stop after N mini-batches in all, then save and evaluate as usual
    /// (for quick runs and benchmarks).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_steps: Option<u64>,
    /// Print one JSON object per line instead of the tutorial's text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
}

/// Checkpointing and resuming.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointArgs {
    /// Save a checkpoint into DIR after every epoch (DIR is created if
    /// missing, and must not hold another run's checkpoints). Without it, an
    /// interrupted run saves into FILE.checkpoint/ next to --out.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Also save a checkpoint every N steps, counted from the start of
    /// training. Needs --checkpoint-dir or --resume.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Keep the N newest checkpoints; older ones are deleted after each save.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP_CHECKPOINTS, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_checkpoints: u64,
    /// Continue from the newest valid checkpoint in DIR, saving further
    /// checkpoints there too (unless --checkpoint-dir says otherwise). The
    /// seed comes from the checkpoint (another --seed is refused);
    /// --batch-size, --lr, --momentum and --log-every must be the checkpoint's.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

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

/// Set (to milliseconds) only by tests: each step then sleeps that long, so
/// that a signal sent after the first loss line lands before the run ends
/// however slowly a loaded machine wakes the test thread.
const STEP_DELAY_ENV: &str = "TCH_CIFAR_TEST_STEP_DELAY_MS";

fn test_step_delay() -> Option<Duration> {
    let ms = std::env::var(STEP_DELAY_ENV).ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
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

/// Trains `model` with `opt` on `train` with the recipe, from
/// `control.start` to the end of `recipe.epochs`, saving checkpoints as
/// `control` says. Stops with an error on the first non-finite loss, and
/// with [`Interrupted`] after a SIGINT or SIGTERM, unless that came in the
/// last step: then training ends and [`TrainStats::stopped_at_end`] says so.
pub fn train(
    model: &Model,
    opt: &mut Sgd,
    train: &Split,
    recipe: &Recipe,
    seed: u64,
    control: &mut Control,
    reporter: &mut Reporter,
) -> Result<TrainStats> {
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
                let save = control.every.is_some_and(|k| stats.steps.is_multiple_of(k));
                let last = reached_max_steps(stats.steps);
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
                        bail!(
                            "the loss became {loss} at epoch {epoch}, step {step}: training \
                             diverged. {}. {}",
                            diverged_hint(recipe.lr, recipe.momentum),
                            not_saved(control.saver.last())
                        );
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
            bail!(
                "the weights became non-finite in the last step (epoch {}, step {}): training \
                 diverged. {}. {}",
                at.epoch,
                at.step,
                diverged_hint(recipe.lr, recipe.momentum),
                not_saved(control.saver.last())
            );
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

/// What to try after a divergence: SGD's momentum must stay below 1, and
/// within that, a smaller step.
pub fn diverged_hint(lr: f64, momentum: f64) -> String {
    if momentum >= 1.0 {
        format!("Try a momentum below 1 (--momentum {momentum} now)")
    } else {
        format!("Try a lower learning rate (--lr {lr} now)")
    }
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

/// `tch-cifar train`.
pub fn run(args: TrainArgs) -> Result<()> {
    install_signal_handlers().context("cannot install the signal handlers")?;
    let TrainArgs {
        data: data_args,
        epochs,
        mut recipe,
        out,
        max_steps,
        json,
        checkpoints: ck,
    } = args;
    recipe.max_steps = max_steps;
    let device = recipe.device()?;
    let cpu = recipe.cpu_settings();
    // Until the test set is evaluated.
    let training = cpu.apply();
    crate::fsutil::check_writable(&out)?;
    if ck.checkpoint_every.is_some() && ck.checkpoint_dir.is_none() && ck.resume.is_none() {
        bail!("--checkpoint-every needs --checkpoint-dir DIR (or --resume DIR) to save into");
    }
    let resumed = ck.resume.as_deref().map(checkpoint::newest).transpose()?;
    // Checkpoints go to --checkpoint-dir, else to the folder resumed from.
    let checkpoint_dir = ck.checkpoint_dir.clone().or_else(|| ck.resume.clone());
    match &checkpoint_dir {
        Some(dir) => prepare_checkpoint_dir(dir, ck.resume.as_deref())?,
        // An interrupt would save there and delete what is there already.
        None => check_no_interrupted_run(&interrupt_dir(&out))?,
    }
    let seed = match (&resumed, recipe.seed) {
        (Some(c), None) => c.meta.seed,
        _ => recipe.seed_or_random(),
    };
    recipe.epochs = epochs
        .or(resumed.as_ref().map(|c| c.meta.epochs))
        .unwrap_or(DEFAULT_EPOCHS);
    let mut meta = recipe.checkpoint_meta(seed, device);
    if let Some(c) = &resumed {
        c.meta.check_resumable(&meta, &c.path)?;
    }

    let source = data_args.prepare()?;
    // The test set goes onto the device once training is over and the
    // training set is gone, which keeps the peak memory down; it is checked
    // now (an image tree's decoded), so bad test data fails before training
    // rather than after.
    let (train_set, test_split) = source.load_for_training(device)?;
    meta.train_images = train_set.len() as u64;
    meta.train_md5 = train_set.md5.clone();
    let mut reporter = Reporter::new(json);
    eprintln!(
        "training on {} with {} images, seed {seed} (--seed {seed} repeats this run)",
        recipe.describe_device(device),
        train_set.len()
    );
    let mut start_event = recipe.json(device, seed);
    start_event["event"] = json!("start");
    start_event["train_images"] = json!(train_set.len());

    let mut model = Model::with_classes(device, Some(seed), train_set.classes.clone());
    let mut opt = Sgd::new(&model, recipe.lr, recipe.momentum);
    let resumed_from = resumed
        .as_ref()
        .map(|c| (c.meta.position.global_step, c.path.clone()));
    let start = match resumed {
        Some(c) => resume(c, &meta, max_steps, &mut model, &mut opt, &mut start_event)?,
        None => Position::START,
    };
    // The start event has no line in the tutorial's text.
    if reporter.is_json() {
        reporter.emit(String::new, start_event);
    }

    let (dir, keep, every_epoch) = match checkpoint_dir {
        Some(dir) => (dir, ck.keep_checkpoints as usize, true),
        // Only an interrupt saves there, and only its newest checkpoint stays.
        None => (interrupt_dir(&out), 1, false),
    };
    // The checkpoint resumed from counts as saved, if it is in that folder.
    let last = resumed_from.filter(|(_, p)| p.parent().is_some_and(|d| same_dir(d, &dir)));
    let mut control = Control {
        start,
        every_epoch,
        every: ck.checkpoint_every,
        interrupts: &INTERRUPTS,
        read_losses_every: read_losses_every(device),
        resume_command: resume_command(&dir, &data_args, &recipe, &out, json, &ck),
        saver: Saver::new(dir, keep, meta, last),
    };
    let mut stats = train(
        &model,
        &mut opt,
        &train_set,
        &recipe,
        seed,
        &mut control,
        &mut reporter,
    )?;
    drop(train_set);
    drop(training);
    reporter.emit(
        || "Finished Training".into(),
        json!({"event": "finished_training", "steps": stats.steps, "train_seconds": stats.train_seconds}),
    );
    model.save(&out)?;
    tracing::info!("weights saved to {}", out.display());
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
        let evaluate = evaluate_command(&data_args, &recipe, &out, json);
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
    let mut summary = recipe.json(device, seed);
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

/// Checks the resumed checkpoint against this run's data, restores it into
/// `model` and `opt`, and returns where training continues.
fn resume(
    c: Checkpoint,
    run: &Meta,
    max_steps: Option<u64>,
    model: &mut Model,
    opt: &mut Sgd,
    start_event: &mut serde_json::Value,
) -> Result<Position> {
    if c.meta.train_images != run.train_images {
        bail!(
            "cannot resume from {}: it was trained on {} images, this training set has {}",
            c.path.display(),
            c.meta.train_images,
            run.train_images
        );
    }
    if let (Some(saved), Some(now)) = (&c.meta.train_md5, &run.train_md5) {
        ensure!(
            saved == now,
            "cannot resume from {}: it was trained on another training set (its batch files \
             have md5 {saved}, these have {now})",
            c.path.display()
        );
    }
    // Settings that only change float rounding: the run goes on, with a note.
    let rounding = |saved: String, now: String, fix: String| {
        eprintln!(
            "note: {} was saved with {saved}, this run has {now}; the results will differ in \
             the last bits from an uninterrupted run ({fix} avoids that)",
            c.path.display()
        );
    };
    if c.meta.device != run.device {
        rounding(
            format!("--device {}", c.meta.device),
            format!("--device {}", run.device),
            format!("--device {}", c.meta.device),
        );
    } else if run.device == "cpu" {
        // The CPU settings only matter where the CPU trains.
        if c.meta.threads != run.threads {
            rounding(
                format!("{} CPU threads", c.meta.threads),
                run.threads.to_string(),
                format!("--threads {}", c.meta.threads),
            );
        }
        if c.meta.cpu_conv != run.cpu_conv {
            rounding(
                format!("--cpu-conv {}", c.meta.cpu_conv),
                run.cpu_conv.to_string(),
                format!("--cpu-conv {}", c.meta.cpu_conv),
            );
        }
    }
    let at = c.meta.position;
    let until = match max_steps {
        Some(m) if m < run.epochs * run.steps_per_epoch() => {
            format!("global step {m} (--max-steps)")
        }
        _ => format!("the end of epoch {}", run.epochs),
    };
    eprintln!(
        "resuming from {} at epoch {}, step {} (global step {}); training to {until}",
        c.path.display(),
        at.epoch,
        at.step,
        at.global_step,
    );
    start_event["resumed_from"] = json!({
        "checkpoint": path_json(&c.path), "epoch": at.epoch, "step": at.step, "global_step": at.global_step,
    });
    c.apply(model, opt)?;
    Ok(at)
}

/// Creates `dir` if needed and fails early when checkpoints cannot be
/// written there, or when it holds checkpoints of another run (any but the
/// folder being resumed from).
fn prepare_checkpoint_dir(dir: &Path, resume: Option<&Path>) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("checkpoint directory {} is not a directory", dir.display());
    }
    checkpoint::create_dir(dir)?;
    crate::fsutil::check_dir_writable(dir)
        .with_context(|| format!("cannot save checkpoints into {}", dir.display()))?;
    if resume.is_some_and(|r| same_dir(r, dir)) {
        return Ok(());
    }
    if let Some((_, file)) = checkpoint::list(dir)?.last() {
        bail!(
            "{} already holds checkpoints ({}): continue that run with --resume {}, or save \
             into an empty directory",
            dir.display(),
            file.file_name().unwrap_or_default().to_string_lossy(),
            dir.display()
        );
    }
    Ok(())
}

/// Deletes the checkpoint files in `dir`, then `dir` itself if that leaves
/// it empty.
fn remove_checkpoints(dir: &Path) -> Result<()> {
    for (_, path) in checkpoint::list(dir)? {
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    // Fails, harmlessly, if anything else is in there.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Refuses to start a run whose interrupt folder holds a checkpoint an
/// unfinished run could go on from: the new run's interrupt would replace
/// it. A finished run's checkpoint there (one saved with `--checkpoint-dir`
/// naming that folder) does not count: there is nothing left to go on with.
fn check_no_interrupted_run(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let newest_valid = checkpoint::list(dir)?
        .into_iter()
        .rev()
        .find_map(|(_, path)| checkpoint::load(&path).ok().map(|c| (path, c.meta)));
    if let Some((file, meta)) = newest_valid {
        let finished = meta.position.global_step >= meta.epochs * meta.steps_per_epoch();
        ensure!(
            finished,
            "{} holds the checkpoint of an interrupted run ({}): continue it with --resume {}, \
             or delete that folder to start a new run",
            dir.display(),
            file.file_name().unwrap_or_default().to_string_lossy(),
            dir.display()
        );
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Where an interrupt saves without `--checkpoint-dir`: `OUT.checkpoint/`.
fn interrupt_dir(out: &Path) -> PathBuf {
    let mut dir = out.as_os_str().to_owned();
    dir.push(".checkpoint");
    PathBuf::from(dir)
}

/// The command line that evaluates `out` on this run's test set.
fn evaluate_command(data: &DataArgs, recipe: &Recipe, out: &Path, json: bool) -> String {
    let mut cmd = format!(
        "tch-cifar evaluate --weights {} --data-dir {}",
        shell_quote(&out.to_string_lossy()),
        shell_quote(&data.data_dir.to_string_lossy())
    );
    if recipe.device != DeviceArg::Auto {
        cmd.push_str(&format!(" --device {}", recipe.device));
    }
    if json {
        cmd.push_str(" --json");
    }
    cmd
}

/// The command line that resumes this run from `dir`: the flags that the
/// checkpoint does not restore by itself, when they differ from the defaults.
fn resume_command(
    dir: &Path,
    data: &DataArgs,
    recipe: &Recipe,
    out: &Path,
    json: bool,
    ck: &CheckpointArgs,
) -> String {
    let mut cmd = format!(
        "tch-cifar train --resume {}",
        shell_quote(&dir.to_string_lossy())
    );
    let mut flag = |name: &str, value: &str| {
        cmd.push_str(&format!(" {name} {}", shell_quote(value)));
    };
    flag("--data-dir", &data.data_dir.to_string_lossy());
    flag("--out", &out.to_string_lossy());
    if recipe.batch_size != DEFAULT_BATCH_SIZE {
        flag("--batch-size", &recipe.batch_size.to_string());
    }
    if recipe.lr != DEFAULT_LR {
        flag("--lr", &recipe.lr.to_string());
    }
    if recipe.momentum != DEFAULT_MOMENTUM {
        flag("--momentum", &recipe.momentum.to_string());
    }
    if recipe.device != DeviceArg::Auto {
        flag("--device", &recipe.device.to_string());
    }
    if let Some(n) = recipe.threads {
        flag("--threads", &n.to_string());
    }
    if recipe.cpu_conv != CpuConv::Auto {
        flag("--cpu-conv", recipe.cpu_conv.name());
    }
    if recipe.log_every != DEFAULT_LOG_EVERY {
        flag("--log-every", &recipe.log_every.to_string());
    }
    // The checkpoint does not keep it, and it counts steps from the start.
    if let Some(n) = recipe.max_steps {
        flag("--max-steps", &n.to_string());
    }
    if let Some(n) = ck.checkpoint_every {
        flag("--checkpoint-every", &n.to_string());
    }
    if ck.keep_checkpoints != DEFAULT_KEEP_CHECKPOINTS {
        flag("--keep-checkpoints", &ck.keep_checkpoints.to_string());
    }
    if json {
        cmd.push_str(" --json");
    }
    cmd
}

/// `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_./:=+,@%".contains(&b);
    if !s.is_empty() && s.bytes().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
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

    #[test]
    fn divergence_hint_names_the_flag_to_change() {
        assert_eq!(
            diverged_hint(0.5, 0.9),
            "Try a lower learning rate (--lr 0.5 now)"
        );
        assert_eq!(
            diverged_hint(0.001, 1.5),
            "Try a momentum below 1 (--momentum 1.5 now)"
        );
    }

    /// The tutorial's recipe at batch size 4 on the CPU, logging every step.
    fn recipe(lr: f64, epochs: u64) -> Recipe {
        Recipe {
            epochs,
            batch_size: 4,
            lr,
            momentum: 0.9,
            seed: Some(1),
            device: DeviceArg::Cpu,
            threads: None,
            cpu_conv: CpuConv::Auto,
            log_every: 1,
            max_steps: None,
        }
    }

    #[test]
    fn only_an_unfinished_run_blocks_its_interrupt_folder() {
        // 40 images: 10 steps per epoch, 20 in all.
        let meta = Meta {
            train_images: 40,
            ..recipe(0.01, 2).checkpoint_meta(1, Device::Cpu)
        };
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
        let recipe = recipe(1e30, 1);
        let meta = Meta {
            train_images: 4,
            ..recipe.checkpoint_meta(1, Device::Cpu)
        };
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
            1,
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
