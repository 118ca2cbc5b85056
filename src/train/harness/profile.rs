//! `train --profile FILE`: one training step recorded by libtorch's own
//! profiler (`csrc/profiler.cpp`), as a hook around the steps. The file is
//! the Chrome trace torch.profiler writes; `scripts/profile-summary.py`
//! sums it by kind of work (convolutions, BatchNorm, GELU, pooling, the
//! optimizer, the data), for tch-cifar and the PyTorch references alike.

use std::ffi::{c_char, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::json;

use super::{Hook, StepEnd};
use crate::util::report::Reporter;

extern "C" {
    fn tch_cifar_profiler_start() -> *mut c_char;
    fn tch_cifar_profiler_stop(path: *const c_char) -> *mut c_char;
    fn tch_cifar_profiler_discard() -> *mut c_char;
    fn tch_cifar_free_message(message: *mut c_char);
}

/// The error in a message from `csrc/`, freed; `Ok` for none.
fn checked(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: csrc/ returns a NUL-terminated malloc'ed string, freed once here.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { tch_cifar_free_message(message) };
    Err(anyhow!(text))
}

/// Records global step `step` (1-based) into `path`.
pub struct Profiler {
    step: u64,
    path: PathBuf,
    /// The first step this process trains (after a resume's checkpoint).
    first: u64,
    recording: bool,
}

impl Profiler {
    /// A profiler of step `step` of a run whose first step is `first` and
    /// which stops at `--max-steps` `last`, if given; a step outside them is
    /// refused, naming both.
    pub fn new(step: u64, path: PathBuf, first: u64, last: Option<u64>) -> Result<Profiler> {
        ensure!(
            step >= first && last.is_none_or(|last| step <= last),
            "--profile-step {step} is not a step of this run, which trains from step {first}{}",
            last.map_or(String::new(), |last| format!(" to {last}"))
        );
        Ok(Profiler {
            step,
            path,
            first,
            recording: false,
        })
    }

    fn start(&mut self) {
        // SAFETY: no arguments; the message it returns is checked and freed.
        match checked(unsafe { tch_cifar_profiler_start() }) {
            Ok(()) => self.recording = true,
            // A profile is a diagnostic: training goes on without it.
            Err(e) => eprintln!("note: the profiler did not start ({e:#}); no profile is written"),
        }
    }

    /// Stops recording and saves the trace. Kineto only logs a file it
    /// cannot open, so the file's presence is checked.
    fn stop(&mut self) -> Result<()> {
        self.recording = false;
        let _ = std::fs::remove_file(&self.path);
        let path = CString::new(self.path.as_os_str().as_bytes())
            .with_context(|| format!("{} holds a NUL byte", self.path.display()))?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        checked(unsafe { tch_cifar_profiler_stop(path.as_ptr()) })?;
        ensure!(self.path.is_file(), "the profiler wrote no file");
        Ok(())
    }
}

/// A run that ended before the step stops the recording, saving nothing.
impl Drop for Profiler {
    fn drop(&mut self) {
        if self.recording {
            // SAFETY: no arguments; the message it returns is checked and freed.
            let _ = checked(unsafe { tch_cifar_profiler_discard() });
            eprintln!(
                "note: the run ended before step {}: no profile is written",
                self.step
            );
        }
    }
}

impl<R: ?Sized> Hook<R> for Profiler {
    fn on_start(&mut self) {
        if self.step == self.first {
            self.start();
        }
    }

    fn after_step(&mut self, _recipe: &R, end: &StepEnd, reporter: &Reporter) -> Result<()> {
        if end.global_step == self.step && self.recording {
            let (step, path) = (self.step, self.path.display().to_string());
            match self.stop() {
                Ok(()) => reporter.emit(
                    || format!("wrote the profile of step {step} to {path}"),
                    json!({"event": "profile", "step": step, "trace": path}),
                ),
                // A diagnostic again: the run goes on.
                Err(e) => eprintln!("note: cannot write the profile to {path}: {e:#}"),
            }
        } else if end.global_step + 1 == self.step {
            self.start();
        }
        Ok(())
    }
}
