//! How commands talk to the user: the tutorial's plain lines on stdout, or
//! one JSON object per event (`--json`), and progress bars on stderr that
//! only show on a terminal.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// A path as a JSON string. serde_json refuses paths that are not UTF-8 (a
/// Linux file name may be any bytes); those bytes show as U+FFFD instead.
pub fn path_json(path: &Path) -> Value {
    Value::String(path.to_string_lossy().into_owned())
}

/// [`path_json`], or `null`.
pub fn optional_path_json(path: Option<&Path>) -> Value {
    path.map_or(Value::Null, path_json)
}

/// Prints each event either as text or as a JSON line.
pub struct Reporter {
    json: bool,
    bar: ProgressBar,
}

impl Reporter {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            bar: ProgressBar::hidden(),
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `text` (one or more lines) or `event`, keeping a live progress
    /// bar intact.
    pub fn emit(&self, text: impl FnOnce() -> String, event: Value) {
        self.bar.suspend(|| {
            if self.json {
                println!("{event}");
            } else {
                println!("{}", text());
            }
        });
    }

    /// Shows `bar` (made by [`step_bar`]) until [`Reporter::finish_bar`].
    pub fn attach_bar(&mut self, bar: ProgressBar) -> ProgressBar {
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
