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

/// The JSON events of a `--json` run's stdout, one per line.
pub fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The events of `kind` (`"loss"`, `"summary"`, …), in order.
pub fn of_kind<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// The `tch-cifar` binary under test.
///
/// One libtorch thread per process: cargo runs several tests at once, and
/// OpenMP threads that outnumber the cores spin-wait on each other.
///
/// The child also gets no log filter (`RUST_LOG` would add lines to the
/// stderr that tests read) and no proxy (the test servers are local).
pub fn tch_cifar() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tch-cifar"));
    cmd.env("OMP_NUM_THREADS", "1").env_remove("RUST_LOG");
    for proxy in ["ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY"] {
        cmd.env_remove(proxy).env_remove(proxy.to_lowercase());
    }
    cmd
}

/// `evaluate` on the CPU of the batches in `data` with `weights`.
pub fn evaluate_args<'a>(data: &'a str, weights: &'a str) -> [&'a str; 7] {
    [
        "evaluate",
        "--device",
        "cpu",
        "--data-dir",
        data,
        "--weights",
        weights,
    ]
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

/// Like [`fails_with`], and stricter: stderr is that one `error:` line and
/// nothing else, except clap's own `For more information, try '--help'.`
/// after a usage error.
pub fn fails_cleanly(out: &Output, needles: &[&str]) -> String {
    let line = fails_with(out, needles);
    let err = stderr(out);
    let others: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && *l != line)
        .filter(|l| *l != "For more information, try '--help'.")
        .collect();
    assert!(
        others.is_empty(),
        "more than the error line on stderr: {err}"
    );
    line
}

/// Every path under `dir`, relative to it: to check that a command left
/// nothing behind.
pub fn tree(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
    let mut paths = std::collections::BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            paths.insert(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    paths
}

/// The md5 of `bytes` in lowercase hex, as `--md5` takes it.
pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the binary finds CUDA device `n`. Asked of the binary, not of
/// libtorch in this process: whether CUDA works here depends on which test
/// touched libtorch first (`device::cuda_support`). `train` resolves the
/// device before it looks at the data, so with no data it fails on one or
/// the other.
pub fn cuda_device_exists(n: usize) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let device = format!("cuda:{n}");
    let out = run(&[
        "train",
        "--device",
        &device,
        "--data-dir",
        s(&dir.path().join("missing")),
        "--out",
        s(&dir.path().join("w.safetensors")),
    ]);
    assert!(!out.status.success());
    !stderr(&out).contains(&format!("--device {device}:"))
}
