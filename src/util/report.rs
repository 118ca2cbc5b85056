//! How commands talk to the user: the tutorial's plain lines on stdout, or
//! one JSON object per event (`--json`), the last one an `error` event when
//! the command fails, and progress bars on stderr that only show on a
//! terminal.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

/// A path as a JSON string. serde_json refuses paths that are not UTF-8 (a
/// Linux file name may be any bytes); those bytes show as U+FFFD instead.
pub fn path_json(path: &Path) -> Value {
    Value::String(path.to_string_lossy().into_owned())
}

/// [`path_json`], or `null`.
pub fn optional_path_json(path: Option<&Path>) -> Value {
    path.map_or(Value::Null, path_json)
}

/// What kind of failure ended a command: the `kind` of its JSON error event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The command line itself was refused (an unknown flag, a bad value).
    Usage,
    /// Training diverged: the loss or the weights became NaN or infinite.
    Diverged,
    /// Reading or writing a file (or the network) failed in the system.
    Io,
    /// Anything else: a bad input file, an impossible setting, …
    Failed,
}

impl ErrorKind {
    /// The kind of `err`, from the errors in its chain.
    pub fn of(err: &anyhow::Error) -> ErrorKind {
        if err.chain().any(|e| e.is::<Diverged>()) {
            ErrorKind::Diverged
        } else if err.chain().any(|e| e.is::<std::io::Error>()) {
            ErrorKind::Io
        } else {
            ErrorKind::Failed
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage",
            ErrorKind::Diverged => "diverged",
            ErrorKind::Io => "io",
            ErrorKind::Failed => "failed",
        }
    }
}

/// The error of a training run whose loss or weights stopped being finite;
/// its text is the whole message.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// The last JSON line of a command that failed under `--json`:
/// `{"event": "error", "kind": …, "message": …}`, the message as the
/// `error:` line on stderr gives it.
pub fn error_event(kind: ErrorKind, message: &str) -> Value {
    json!({"event": "error", "kind": kind.name(), "message": message})
}

/// Prints [`error_event`] for `err` on stdout.
pub fn print_error_event(err: &anyhow::Error) {
    println!("{}", error_event(ErrorKind::of(err), &format!("{err:#}")));
}

/// Prints [`error_event`] for a command line that clap refused, if `args`
/// (the command line) hold `--json`. Help and `--version` are no errors.
pub fn print_usage_error_event(
    err: &clap::Error,
    mut args: impl Iterator<Item = std::ffi::OsString>,
) {
    if err.use_stderr() && args.any(|a| a == "--json") {
        let text = err.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first);
        println!("{}", error_event(ErrorKind::Usage, message));
    }
}

/// Prints each event either as text or as a JSON line.
pub struct Reporter {
    json: bool,
    /// Prints nothing and shows no bar: a distributed run's ranks other
    /// than 0, which speaks for them all.
    muted: bool,
    bar: ProgressBar,
}

impl Reporter {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            muted: false,
            bar: ProgressBar::hidden(),
        }
    }

    /// This reporter, printing nothing when `muted`.
    pub fn muted(self, muted: bool) -> Self {
        Self { muted, ..self }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `text` (one or more lines) or `event`, keeping a live progress
    /// bar intact.
    pub fn emit(&self, text: impl FnOnce() -> String, event: Value) {
        if self.muted {
            return;
        }
        self.bar.suspend(|| {
            if self.json {
                println!("{event}");
            } else {
                println!("{}", text());
            }
        });
    }

    /// Prints `note: TEXT` on stderr (in text and JSON alike: a note is
    /// advice, not output), keeping a live progress bar intact.
    pub fn note(&self, text: &str) {
        if !self.muted {
            self.bar.suspend(|| eprintln!("note: {text}"));
        }
    }

    /// Shows `bar` (made by [`step_bar`]) until [`Reporter::finish_bar`].
    pub fn attach_bar(&mut self, bar: ProgressBar) -> ProgressBar {
        if self.muted {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        self.bar = bar.clone();
        bar
    }

    pub fn finish_bar(&mut self) {
        self.bar.finish_and_clear();
        self.bar = ProgressBar::hidden();
    }
}

/// A bar over `total` steps on stderr; invisible when stderr is no terminal.
pub fn step_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A byte-count bar for downloads (a spinner when the size is unknown).
pub fn byte_bar(total: Option<u64>, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr_with_hz(10));
    let template = if total.is_some() {
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})"
    } else {
        "{spinner} {prefix} {bytes} {bytes_per_sec}"
    };
    bar.set_style(ProgressStyle::with_template(template).expect("static template"));
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_events_carry_the_kind_and_the_whole_message() {
        let diverged = anyhow::Error::new(Diverged("the loss became NaN".into()));
        assert_eq!(
            error_event(ErrorKind::of(&diverged), &format!("{diverged:#}")),
            json!({"event": "error", "kind": "diverged", "message": "the loss became NaN"})
        );
        let io = anyhow::Error::new(std::io::Error::other("disk full")).context("cannot write w");
        assert_eq!(ErrorKind::of(&io), ErrorKind::Io);
        assert_eq!(format!("{io:#}"), "cannot write w: disk full");
        assert_eq!(
            ErrorKind::of(&anyhow::anyhow!("bad key")),
            ErrorKind::Failed
        );
    }
}
