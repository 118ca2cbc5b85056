//! `train`'s command line: its flags under help headings, the recipe's
//! flags that `compare-losses` shares, and [`Given`], which of them the
//! user typed, as a resumed run must tell them from the defaults.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::ArgMatches;
use tch::Device;

use crate::cli::count;
use crate::data::DataArgs;
use crate::distributed::{Backend, DEFAULT_TIMEOUT};
use crate::train::settings::{
    ModelKind, Settings, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_LOG_EVERY, DEFAULT_LR, DEFAULT_MOMENTUM, DEFAULT_OUT,
};
use crate::util::device::{default_threads, device_name, CpuConv, CpuSettings, DeviceArg};
use crate::util::precision::Precision;

/// More would only wait on each other; libtorch hangs on absurd counts.
pub const MAX_THREADS: i64 = 1024;
/// Keeps epochs times steps per epoch far inside u64.
pub const MAX_EPOCHS: u64 = 1_000_000;

/// The training recipe's flags; the defaults are the tutorial's.
#[derive(Debug, Clone, clap::Args)]
pub struct RecipeArgs {
    /// Passes over the training set.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EPOCHS, allow_negative_numbers = true,
          value_parser = |s: &str| count(s, 1, MAX_EPOCHS))]
    pub epochs: u64,
    /// Images per mini-batch (all ranks together, under torchrun).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH_SIZE, allow_negative_numbers = true,
          value_parser = |s: &str| count(s, 1, i64::MAX as u64))]
    pub batch_size: u64,
    /// SGD learning rate.
    #[arg(long, default_value_t = DEFAULT_LR, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub lr: f64,
    /// SGD momentum, in [0, 1).
    #[arg(long, default_value_t = DEFAULT_MOMENTUM, value_parser = parse_momentum, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Seed of the weights and data order [default: drawn and reported].
    ///
    /// The same seed on the same data gives the same run on CPU.
    #[arg(long, allow_negative_numbers = true, value_parser = |s: &str| count(s, 0, u64::MAX))]
    pub seed: Option<u64>,
    /// Print the running loss every N mini-batches.
    ///
    /// Counted within each epoch, as the tutorial does: a run whose epochs
    /// are shorter than N prints none, and a note says so.
    #[arg(long, default_value_t = DEFAULT_LOG_EVERY, value_name = "N", allow_negative_numbers = true,
          value_parser = |s: &str| count(s, 1, u64::MAX))]
    pub log_every: u64,
    /// auto (cuda:0 if available, else cpu), cpu, cuda or cuda:N.
    #[arg(
        long,
        default_value = "auto",
        value_name = "DEVICE",
        help_heading = "Performance"
    )]
    pub device: DeviceArg,
    /// Training's CPU threads [default: 1 to batch size 16, else all cores].
    ///
    /// At small batches an operator is too small to share out. Evaluation
    /// always uses every core.
    #[arg(long, value_name = "N", help_heading = "Performance", allow_negative_numbers = true,
          value_parser = |s: &str| count(s, 1, MAX_THREADS as u64).map(|n| n as i32))]
    pub threads: Option<i32>,
    /// Convolution kernel on the CPU: auto, onednn or im2col.
    ///
    /// auto is im2col at batch sizes up to 4 on one thread, else onednn;
    /// onednn is libtorch's default; im2col is ATen's im2col + GEMM kernel,
    /// what PyTorch runs with `torch.backends.mkldnn.enabled = False`.
    /// Evaluation always uses onednn.
    #[arg(long, value_enum, default_value_t = CpuConv::Auto, value_name = "KERNEL", help_heading = "Performance",
          hide_possible_values = true)]
    pub cpu_conv: CpuConv,
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

/// SGD's momentum: at 1 or more the velocity never decays and training diverges.
fn parse_momentum(s: &str) -> Result<f64, String> {
    match parse_non_negative(s)? {
        v if v < 1.0 => Ok(v),
        _ => Err(format!(
            "`{s}` is not in [0, 1): SGD's momentum must stay below 1"
        )),
    }
}

impl RecipeArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
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

    /// `cpu (1 thread, im2col convolutions)`, or the CUDA device's name.
    pub fn describe_device(&self, device: Device) -> String {
        describe_device(device, self.cpu_settings())
    }
}

/// `cpu (1 thread, im2col convolutions)`, or the CUDA device's name.
pub fn describe_device(device: Device, cpu: CpuSettings) -> String {
    if device != Device::Cpu {
        return device_name(device);
    }
    format!(
        "cpu ({} thread{}, {} convolutions)",
        cpu.threads,
        if cpu.threads == 1 { "" } else { "s" },
        cpu.conv
    )
}

/// Train the tutorial's Net (or a fast recipe) on CIFAR-10, save it, and report test accuracy.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten, next_help_heading = "Data")]
    pub data: DataArgs,
    /// Network and recipe: net, airbench94 or airbench94-muon.
    ///
    /// net is the tutorial's. airbench94 has its own fixed recipe (batch 1024, 9.9 epochs, Nesterov
    /// SGD with a schedule, test-time augmentation); airbench94-muon trains
    /// the same network faster (batch 2000, 8 epochs, Muon for the filters).
    /// Of the recipe's flags they take --epochs (whole epochs, for a shorter
    /// run), --seed and the performance flags.
    #[arg(long, value_enum, default_value_t = ModelKind::Net, help_heading = "Recipe",
          hide_possible_values = true)]
    pub model: ModelKind,
    #[command(flatten, next_help_heading = "Recipe")]
    pub recipe: RecipeArgs,
    /// Fast recipes' forward passes: fp32, bf16 or fp16 autocast.
    ///
    /// [default: bf16 on a CPU that multiplies bfloat16 natively (AVX512-BF16
    /// or AMX), else fp32; fp16 on CUDA.] Under bf16 or fp16 autocast the
    /// convolutions run in the lower precision, as under torch.autocast;
    /// the weights, BatchNorm, the loss, the optimizers' state and the
    /// checkpoints stay float32, and evaluation runs in the same precision.
    /// fp16 runs on CUDA only. The tutorial's Net trains in fp32 only.
    #[arg(
        long,
        value_enum,
        value_name = "KIND",
        help_heading = "Performance",
        hide_possible_values = true
    )]
    pub precision: Option<Precision>,
    /// Stop after N mini-batches in all, then save and evaluate as usual.
    #[arg(long, value_name = "N", help_heading = "Recipe", allow_negative_numbers = true,
          value_parser = |s: &str| count(s, 1, u64::MAX))]
    pub max_steps: Option<u64>,
    #[command(flatten, next_help_heading = "Checkpoints")]
    pub checkpoints: CheckpointArgs,
    /// File for the trained weights.
    ///
    /// Keyed like PyTorch's state_dict: in torch.save's format for a .pth or
    /// .pt name, else as safetensors.
    #[arg(long, default_value = DEFAULT_OUT, value_name = "FILE", help_heading = "Output")]
    pub out: PathBuf,
    /// Print one JSON object per line instead of the tutorial's text.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    #[command(flatten)]
    pub tensorboard: crate::util::tensorboard::LogdirArgs,
    /// Record one training step with libtorch's profiler into FILE.
    ///
    /// FILE is a Chrome trace (chrome://tracing, Perfetto, or
    /// scripts/profile-summary.py for the time by kind of work). The step is
    /// --profile-step's; training goes on as usual.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub profile: Option<PathBuf>,
    /// The step --profile records (1-based; the first ones warm up).
    #[arg(long, value_name = "N", default_value_t = 3, help_heading = "Output",
          requires = "profile", value_parser = |s: &str| count(s, 1, u64::MAX))]
    pub profile_step: u64,
    #[command(flatten, next_help_heading = "Distributed (under torchrun)")]
    pub distributed: DistArgs,
}

/// A distributed run's flags: they matter only where torchrun (or the
/// same environment) launches the processes.
#[derive(Debug, Clone, clap::Args)]
pub struct DistArgs {
    /// c10d backend: gloo or nccl [default: nccl on CUDA, else gloo].
    #[arg(long, value_enum, value_name = "BACKEND", hide_possible_values = true)]
    pub dist_backend: Option<Backend>,
    /// Seconds a rank waits for the others before it fails.
    ///
    /// A rank that dies or hangs makes every other one fail within this
    /// time, with an error that names it.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TIMEOUT.as_secs(),
          allow_negative_numbers = true, value_parser = |s: &str| count(s, 1, 86_400))]
    pub dist_timeout: u64,
}

/// Checkpointing and resuming.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointArgs {
    /// Save a checkpoint into DIR after every epoch and at --max-steps.
    ///
    /// DIR is created if missing, and must not hold another run's
    /// checkpoints. Without it, an interrupted run saves into
    /// FILE.checkpoint/ next to --out. Under torchrun, a worker group it
    /// starts again (--max-restarts) goes on from DIR's newest checkpoint.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Also save every N steps (needs --checkpoint-dir or --resume).
    ///
    /// Steps are counted from the start of training.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = |s: &str| count(s, 1, u64::MAX))]
    pub checkpoint_every: Option<u64>,
    /// Keep the N newest checkpoints.
    ///
    /// Older ones are deleted after each save.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP_CHECKPOINTS, allow_negative_numbers = true,
          value_parser = |s: &str| count(s, 1, u64::MAX))]
    pub keep_checkpoints: u64,
    /// Continue the run whose checkpoints are in DIR, with its settings.
    ///
    /// It goes on from the newest valid checkpoint in DIR and saves further
    /// checkpoints there (unless --checkpoint-dir says otherwise). Every
    /// setting comes from the checkpoint, the data folders (--data-dir,
    /// --train-dir, --test-dir, --cache-dir), --out and --logdir's run folder
    /// included. A flag given that would change what the run computes
    /// (--seed, --batch-size, --lr, --momentum, --log-every, --precision)
    /// is refused;
    /// --epochs (not below the checkpoint's epoch), --max-steps,
    /// --checkpoint-every, --keep-checkpoints, the data folders, --out,
    /// --device, --threads and --cpu-conv may be changed.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

impl TrainArgs {
    /// A new run's settings: the flags, with the seed drawn if none is
    /// given and the CPU threads and kernel resolved. The classes are the
    /// training set's, filled in once it is read. airbench94's recipe is
    /// its own, and [`given`](Given) tells whether `--epochs` shortens it.
    pub fn settings(&self, given: &Given) -> Settings {
        let r = &self.recipe;
        if let Some(variant) = self.model.airbench() {
            return self.fast_settings(given, variant);
        }
        let cpu = r.cpu_settings();
        Settings {
            seed: r.seed_or_random(),
            epochs: r.epochs,
            batch_size: r.batch_size,
            lr: r.lr,
            momentum: r.momentum,
            log_every: r.log_every,
            max_steps: self.max_steps,
            device: r.device,
            threads: cpu.threads,
            cpu_conv: cpu.conv,
            checkpoint_every: self.checkpoints.checkpoint_every,
            keep_checkpoints: self.checkpoints.keep_checkpoints,
            data_dir: self.data.data_dir.clone(),
            train_dir: self.data.train_dir.clone(),
            test_dir: self.data.test_dir.clone(),
            cache_dir: self.data.cache_dir.clone(),
            out: self.out.clone(),
            tensorboard: None,
            classes: Vec::new(),
            model: ModelKind::Net,
            schedule_epochs: None,
            precision: None,
            world_size: 1,
        }
    }

    fn fast_settings(&self, given: &Given, variant: crate::nets::airbench::Variant) -> Settings {
        use crate::nets::airbench::Variant;
        use crate::train::recipes::airbench::{self, airbench94_muon as muon_recipe};
        let r = &self.recipe;
        let (epochs, batch_size, lr, momentum) = match variant {
            Variant::Airbench94 => (
                airbench::EPOCHS,
                airbench::BATCH_SIZE,
                airbench::LR,
                airbench::MOMENTUM,
            ),
            // Muon's rate and momentum: the filters'.
            Variant::Muon => (
                muon_recipe::EPOCHS,
                muon_recipe::BATCH_SIZE,
                muon_recipe::MUON_LR,
                muon_recipe::MUON_MOMENTUM,
            ),
        };
        let schedule_epochs = if given.has("--epochs") {
            r.epochs as f64
        } else {
            epochs
        };
        Settings {
            seed: r.seed_or_random(),
            epochs: schedule_epochs.ceil() as u64,
            batch_size: batch_size as u64,
            lr,
            momentum,
            // No running-loss lines: one line per epoch instead.
            log_every: u64::MAX,
            max_steps: self.max_steps,
            device: r.device,
            threads: r.threads.unwrap_or_else(default_threads),
            cpu_conv: CpuConv::Onednn,
            checkpoint_every: self.checkpoints.checkpoint_every,
            keep_checkpoints: self.checkpoints.keep_checkpoints,
            data_dir: self.data.data_dir.clone(),
            train_dir: self.data.train_dir.clone(),
            test_dir: self.data.test_dir.clone(),
            cache_dir: self.data.cache_dir.clone(),
            out: self.out.clone(),
            tensorboard: None,
            classes: Vec::new(),
            model: self.model,
            schedule_epochs: Some(schedule_epochs),
            // Resolved once the device is known.
            precision: None,
            world_size: 1,
        }
    }
}

/// The flags typed on the command line, as opposed to those left at their
/// defaults.
#[derive(Debug, Clone, Default)]
pub struct Given(BTreeSet<String>);

impl Given {
    pub fn from_matches(matches: &ArgMatches) -> Given {
        Given(
            matches
                .ids()
                .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect(),
        )
    }

    /// Whether `flag` (`--batch-size`) was typed.
    pub fn has(&self, flag: &str) -> bool {
        // clap's id for a long flag is its field's name: `batch_size`.
        let id = flag.trim_start_matches('-').replace('-', "_");
        self.0.contains(&id)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    #[command(name = "train")]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    /// `train ARGS` parsed, with the flags given.
    pub fn parse(args: &[&str]) -> Result<(TrainArgs, Given), clap::Error> {
        let matches = Cli::command().try_get_matches_from(["train"].iter().chain(args))?;
        let cli = Cli::from_arg_matches(&matches)?;
        Ok((cli.args, Given::from_matches(&matches)))
    }

    fn refused(args: &[&str]) -> String {
        parse(args).unwrap_err().to_string()
    }

    #[test]
    fn given_flags_are_told_from_defaults() {
        let (args, given) = parse(&["--lr", "0.001", "--threads", "2", "--data-dir", "d"]).unwrap();
        assert_eq!(args.recipe.lr, DEFAULT_LR);
        for flag in ["--lr", "--threads", "--data-dir"] {
            assert!(given.has(flag), "{flag}: {given:?}");
        }
        let defaults = [
            "--epochs",
            "--batch-size",
            "--momentum",
            "--seed",
            "--out",
            "--json",
        ];
        for flag in defaults {
            assert!(!given.has(flag), "{flag}: {given:?}");
        }
    }

    #[test]
    fn counts_and_momentum_are_range_checked() {
        let err = refused(&["--epochs", "-1"]);
        assert!(err.contains("-1 must be from 1 to 1000000"), "{err}");
        let err = refused(&["--batch-size", "0"]);
        assert!(err.contains("0 must be at least 1"), "{err}");
        let err = refused(&["--batch-size", "9223372036854775808"]);
        assert!(err.contains("9223372036854775808 is too large"), "{err}");
        let err = refused(&["--epochs", "two"]);
        assert!(err.contains("`two`: invalid digit"), "{err}");
        let err = refused(&["--momentum", "1.5"]);
        assert!(err.contains("`1.5` is not in [0, 1)"), "{err}");
        let err = refused(&["--momentum", "1"]);
        assert!(err.contains("`1` is not in [0, 1)"), "{err}");
        let err = refused(&["--momentum", "-0.5"]);
        assert!(err.contains("not a finite, non-negative number"), "{err}");
        let (args, _) = parse(&["--momentum", "0", "--threads", "1024"]).unwrap();
        assert_eq!(
            (args.recipe.momentum, args.recipe.threads),
            (0.0, Some(1024))
        );
        let err = refused(&["--threads", "1025"]);
        assert!(err.contains("1025 must be from 1 to 1024"), "{err}");
    }

    #[test]
    fn short_help_is_grouped_and_its_lines_are_short() {
        let help = Cli::command().render_help().to_string();
        let headings: Vec<&str> = help.lines().filter(|l| l.ends_with(':')).collect();
        assert_eq!(
            headings,
            [
                "Options:",
                "Data:",
                "Recipe:",
                "Performance:",
                "Checkpoints:",
                "Output:",
                "Distributed (under torchrun):"
            ],
            "{help}"
        );
        // The data flags are data.rs's; every other line fits 100 columns.
        let recipe_on = help.find("Recipe:").unwrap();
        for line in help[recipe_on..].lines() {
            assert!(line.len() <= 100, "{} columns: {line}", line.len());
        }
    }
}
