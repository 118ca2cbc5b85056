//! SIGINT and SIGTERM: a first signal lets the step finish, then the
//! harness saves and stops with [`Interrupted`]; a second one, or one
//! outside the training loop, exits at once with status 130.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use crate::train::checkpoint::Position;

/// What SIGINT and SIGTERM do, as two flags the signal handlers read or set.
pub struct Interrupts {
    /// Set by the first signal: the loop finishes its step, saves and stops.
    /// Once it is set, the next signal exits at once.
    pub stop: AtomicBool,
    /// While set (outside the training loop, where there is no step to
    /// finish and nothing to save), a signal exits with status 130 at once.
    pub exit_now: AtomicBool,
    /// Set in a distributed run: a second signal in the training loop
    /// does not exit at once, since the ranks must stop together (torchrun
    /// passes a terminal's Ctrl-C on to workers that had it already).
    pub patient: AtomicBool,
}

impl Interrupts {
    pub const fn new() -> Interrupts {
        Interrupts {
            stop: AtomicBool::new(false),
            exit_now: AtomicBool::new(true),
            patient: AtomicBool::new(false),
        }
    }
}

impl Default for Interrupts {
    fn default() -> Self {
        Self::new()
    }
}

/// The flags the process's signal handlers drive.
pub static INTERRUPTS: Interrupts = Interrupts::new();
static FILE_SIZE_LIMIT_HIT: AtomicBool = AtomicBool::new(false);

/// Routes SIGINT and SIGTERM to [`INTERRUPTS`], and keeps SIGXFSZ from
/// killing the process.
pub fn install_signal_handlers() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
    use signal_hook::{flag, low_level};
    for signal in [SIGINT, SIGTERM] {
        let action = || {
            let flags = &INTERRUPTS;
            let again = flags.stop.load(Ordering::SeqCst) && !flags.patient.load(Ordering::SeqCst);
            if again || flags.exit_now.load(Ordering::SeqCst) {
                low_level::exit(130);
            }
            flags.stop.store(true, Ordering::SeqCst);
        };
        // SAFETY: the action only loads and stores atomics and calls
        // `_exit`, which are async-signal-safe.
        unsafe { low_level::register(signal, action)? };
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
    /// A run that keeps no checkpoints (`compare-losses`).
    Nothing,
    /// A distributed run's rank other than 0: rank 0 saved, and says so.
    ByRank0,
}

impl Interrupted {
    /// Whether this process should print the interruption (rank 0 does for
    /// every rank).
    pub fn speaks(&self) -> bool {
        !matches!(self.saved, Saved::ByRank0)
    }
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
            Saved::Nothing => write!(
                f,
                "interrupted at epoch {epoch}, step {step}; nothing was saved"
            ),
            Saved::ByRank0 => write!(
                f,
                "interrupted at epoch {epoch}, step {step}; rank 0 saved the run"
            ),
        }
    }
}

impl std::error::Error for Interrupted {}
