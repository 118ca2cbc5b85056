//! Shared helpers for the end-to-end tests: run the real binary, make
//! synthetic CIFAR-10 data with `scripts/make-synthetic-cifar.py`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The project's Python (the venv that holds libtorch), else `python3`.
pub fn python() -> PathBuf {
    option_env!("TCH_CIFAR_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Writes a synthetic dataset (and optionally its tar.gz) into `dir`.
pub fn synthetic(dir: &Path, train: usize, test: usize, seed: u64, archive: Option<&Path>) {
    let mut cmd = Command::new(python());
    cmd.arg(repo_path("scripts/make-synthetic-cifar.py"))
        .arg(dir)
        .args(["--train", &train.to_string(), "--test", &test.to_string()])
        .args(["--seed", &seed.to_string()]);
    if let Some(a) = archive {
        cmd.arg("--archive").arg(a);
    }
    let out = cmd.output().expect("run make-synthetic-cifar.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `tch-cifar` binary under test.
pub fn tch_cifar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tch-cifar"))
}

/// Runs `tch-cifar ARGS` and returns its output.
pub fn run(args: &[&str]) -> Output {
    tch_cifar().args(args).output().expect("run tch-cifar")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\nstdout: {}",
        stderr(out),
        stdout(out)
    );
    stdout(out)
}

/// Asserts a clean failure: non-zero exit, one `error:` line on stderr that
/// contains every one of `needles`, and no panic or backtrace.
pub fn fails_with(out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success\nstdout: {}",
        stdout(out)
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "panic: {err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "`{n}` not in: {line}");
    }
    line.to_string()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
