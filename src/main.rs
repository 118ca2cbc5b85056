//! The `tch-cifar` command line: parses arguments and hands each
//! subcommand to its `run` in the library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tch_cifar::cli::{compare, evaluate, export, predict, samples, train};
use tch_cifar::util::report;
use tracing_subscriber::EnvFilter;

// jemalloc, unprefixed: it replaces malloc for the whole process, libtorch
// included. At batch size 4 every step allocates and frees dozens of small
// tensors and oneDNN scratch buffers, and jemalloc makes a step about 10 %
// faster than glibc's malloc (measured with examples/step_profile.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`MALLOC_CONF` in the
/// environment still overrides them). By default it hands freed pages back
/// to the kernel within seconds, and those of blocks over 8 MiB at once, so
/// a large-batch step (airbench94's activations are hundreds of MB) pays
/// page faults on every tensor it allocates again: about 40 % of its time
/// on this project's 2-core CPU. Kept, the pages are reused, as PyTorch's
/// caching allocators do on GPUs; the resident memory stays at its peak.
#[export_name = "malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr());

/// A C string for jemalloc to read (`const char *malloc_conf`).
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points at a static, immutable string.
unsafe impl Sync for MallocConf {}

/// PyTorch's CIFAR-10 tutorial ("Training a Classifier") in Rust, with tch.
#[derive(Debug, Parser)]
#[command(name = "tch-cifar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train the tutorial's Net (or airbench94) on CIFAR-10, save it, report its accuracy.
    Train(train::TrainArgs),
    /// Report the test accuracy of saved weights, overall and per class.
    Evaluate(evaluate::EvaluateArgs),
    /// Train Net with logits + cross-entropy and softmax + nll_loss(log p), side by side.
    ///
    /// One loss, two names: tch's `cross_entropy_for_logits` (which `train`
    /// uses) and libtorch's `cross_entropy_loss` (PyTorch's
    /// `nn.CrossEntropyLoss`) are both `log_softmax` then `nll_loss`, the same
    /// kernels in float32. A and A' (each mini-batch reversed) call
    /// `cross_entropy_loss`, which also runs in float64 (`--dtype f64`);
    /// B ends in a softmax and calls `nll_loss(log(p))`; C ends in a
    /// log-softmax and calls `nll_loss`.
    CompareLosses(compare::CompareArgs),
    /// Write saved weights as a TorchScript module, an ONNX model, or .pth / safetensors.
    Export(export::ExportArgs),
    /// Classify image files: the most probable classes and their probabilities.
    Predict(predict::PredictArgs),
    /// Draw a labeled grid of random training images (the tutorial's "show some images").
    Samples(samples::SamplesArgs),
}

impl Command {
    /// Whether the command prints JSON lines (`--json`).
    fn json(&self) -> bool {
        match self {
            Command::Train(args) => args.json,
            Command::Evaluate(args) => args.json,
            Command::CompareLosses(args) => args.json,
            Command::Predict(args) => args.json,
            Command::Export(_) | Command::Samples(_) => false,
        }
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, stop quietly when the reader of stdout (`head`,
    // say) goes away, instead of panicking on the next line. Sockets are not
    // affected: Rust sends with MSG_NOSIGNAL.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    // `train` also gets its matches, which tell a typed flag from a default.
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            report::print_usage_error_event(&err, std::env::args_os());
            err.exit()
        }
    };
    let json = cli.command.json();
    let result = match cli.command {
        Command::Train(args) => train::run(args, matches.subcommand().expect("a subcommand").1),
        Command::Evaluate(args) => evaluate::run(args),
        Command::CompareLosses(args) => compare::run(args),
        Command::Export(args) => export::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Samples(args) => samples::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // An interrupt is not a failure: say where the run stopped, and exit
        // with 130 like a shell does for a process stopped by Ctrl-C.
        Err(err) => match err.downcast_ref::<train::Interrupted>() {
            Some(stopped) => {
                if stopped.speaks() {
                    eprintln!("{stopped}");
                }
                ExitCode::from(130)
            }
            None => {
                eprintln!("error: {err:#}");
                if json {
                    report::print_error_event(&err);
                }
                ExitCode::FAILURE
            }
        },
    }
}
