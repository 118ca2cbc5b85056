//! `--logdir` end to end: the event files of short `train` (both models)
//! and `compare-losses` runs, read back with TensorBoard's own reader
//! (`scripts/read-events.py`, the `tensorboard` package's
//! `EventAccumulator`) and checked against the `--json` events of the same
//! run; a run killed after a checkpoint, resumed, stopped by Ctrl-C and
//! resumed again shows each step once;
//! and `tensorboard --logdir` serves the run over HTTP.
//!
//! The `tensorboard` package is installed into the venv with its pip when
//! missing; where that fails, the tests say why and skip.

mod util;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

/// The venv's Python once it can import `tensorboard` (installed with its
/// pip if missing), or why it cannot.
fn tensorboard_python() -> Result<PathBuf, String> {
    static READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let py = python();
            let imports = || {
                Command::new(&py)
                    .args(["-c", "import tensorboard"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            if imports() {
                return Ok(py);
            }
            let install = Command::new(&py)
                // The version these tests were written against.
                .args(["-m", "pip", "install", "--quiet", "tensorboard==2.21.0"])
                .output()
                .map_err(|e| format!("cannot run {} -m pip: {e}", py.display()))?;
            if imports() {
                Ok(py)
            } else {
                Err(format!(
                    "the tensorboard package is missing and `pip install tensorboard==2.21.0` failed: {}",
                    String::from_utf8_lossy(&install.stderr).trim()
                ))
            }
        })
        .clone()
}

/// The tensorboard-enabled Python, or `None` after printing why the test skips.
fn python_or_skip(test: &str) -> Option<PathBuf> {
    match tensorboard_python() {
        Ok(py) => Some(py),
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

/// What TensorBoard reads from `run_dir`.
struct Events {
    scalars: BTreeMap<String, Vec<(u64, f64)>>,
    texts: BTreeMap<String, Vec<(u64, String)>>,
    /// tag: (step, width, height, bytes)
    images: BTreeMap<String, Vec<(u64, u64, u64, u64)>>,
}

fn read_events(py: &Path, run_dir: &Path) -> Events {
    let out = Command::new(py)
        .arg(repo_path("scripts/read-events.py"))
        .arg(run_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "read-events.py: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let map = |key: &str| v[key].as_object().unwrap().clone();
    let rows = |x: &Value| x.as_array().unwrap().clone();
    Events {
        scalars: map("scalars")
            .into_iter()
            .map(|(tag, xs)| {
                let xs = rows(&xs)
                    .iter()
                    .map(|r| (r[0].as_u64().unwrap(), r[1].as_f64().unwrap()))
                    .collect();
                (tag, xs)
            })
            .collect(),
        texts: map("texts")
            .into_iter()
            .map(|(tag, xs)| {
                let xs = rows(&xs)
                    .iter()
                    .map(|r| (r[0].as_u64().unwrap(), r[1].as_str().unwrap().to_string()))
                    .collect();
                (tag, xs)
            })
            .collect(),
        images: map("images")
            .into_iter()
            .map(|(tag, xs)| {
                let xs = rows(&xs)
                    .iter()
                    .map(|r| {
                        let n = |i: usize| r[i].as_u64().unwrap();
                        (n(0), n(1), n(2), n(3))
                    })
                    .collect();
                (tag, xs)
            })
            .collect(),
    }
}

impl Events {
    fn steps(&self, tag: &str) -> Vec<u64> {
        self.scalar(tag).iter().map(|(s, _)| *s).collect()
    }

    fn scalar(&self, tag: &str) -> &[(u64, f64)] {
        self.scalars
            .get(tag)
            .unwrap_or_else(|| panic!("no {tag} in {:?}", self.scalars.keys()))
    }

    /// Every tag's steps strictly increase: nothing twice.
    fn assert_no_duplicates(&self) {
        for (tag, xs) in &self.scalars {
            assert!(
                xs.windows(2).all(|w| w[0].0 < w[1].0),
                "{tag} repeats or reorders steps: {xs:?}"
            );
        }
        for (tag, xs) in &self.texts {
            assert!(xs.windows(2).all(|w| w[0].0 < w[1].0), "{tag}: {xs:?}");
        }
    }
}

/// `a` as TensorBoard keeps it (a float32) is `b`.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// The only folder in `logdir`.
fn only_run(logdir: &Path) -> PathBuf {
    let runs: Vec<PathBuf> = std::fs::read_dir(logdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.into_iter().next().unwrap()
}

/// The test-set figures and the settings, checked against the summary.
fn check_end(read: &Events, summary: &Value, last: u64, accuracy_tag: &str) {
    assert_eq!(read.steps(accuracy_tag), [last]);
    assert!(close(
        read.scalar(accuracy_tag)[0].1,
        summary["accuracy"].as_f64().unwrap()
    ));
    let per_class = summary["per_class_accuracy"].as_object().unwrap();
    for (class, acc) in per_class {
        let tag = format!("test/class_accuracy/{class}");
        match acc.as_f64() {
            Some(acc) => assert!(close(read.scalar(&tag)[0].1, acc), "{tag}"),
            None => assert!(!read.scalars.contains_key(&tag), "{tag}"),
        }
    }
    let confusion = &read.images["test/confusion"];
    assert_eq!(confusion.len(), 1);
    let (step, width, height, bytes) = confusion[0];
    assert_eq!(step, last);
    assert!(
        width >= 560 && height > 100 && bytes > 1000,
        "{confusion:?}"
    );
    let hparams = &read.texts["hparams/text_summary"];
    let seed = format!("| seed | {} |", summary["seed"]);
    assert!(hparams[0].1.contains(&seed), "{hparams:?}");
}

#[test]
fn a_train_runs_events_are_its_json_events() {
    let Some(py) = python_or_skip("a_train_runs_events_are_its_json_events") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 50, 20, 2, None);
    let logdir = dir.path().join("logs");
    // 10 steps per epoch, a loss line every 3.
    let out = ok(&run(&[
        "train",
        "--device",
        "cpu",
        "--seed",
        "4",
        "--batch-size",
        "5",
        "--epochs",
        "2",
        "--log-every",
        "3",
        "--lr",
        "0.01",
        "--json",
        "--data-dir",
        s(&dir.path().join("data")),
        "--out",
        s(&dir.path().join("w.safetensors")),
        "--logdir",
        s(&logdir),
    ]));
    let events = events(&out);
    let run_dir = only_run(&logdir);
    let name = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with("-net-seed4"), "{name}");
    let read = read_events(&py, &run_dir);
    read.assert_no_duplicates();

    let want: Vec<(u64, f64)> = of_kind(&events, "loss")
        .iter()
        .map(|e| {
            let global = (e["epoch"].as_u64().unwrap() - 1) * 10 + e["step"].as_u64().unwrap();
            (global, e["loss"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(
        want.iter().map(|w| w.0).collect::<Vec<_>>(),
        [3, 6, 9, 13, 16, 19]
    );
    let got = read.scalar("train/loss");
    assert_eq!(got.len(), want.len(), "{got:?} {want:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!(g.0 == w.0 && close(g.1, w.1), "{got:?} {want:?}");
    }
    for tag in ["train/lr", "train/images_per_second"] {
        assert_eq!(read.steps(tag), [3, 6, 9, 13, 16, 19], "{tag}");
    }
    assert!(read.scalar("train/lr").iter().all(|x| close(x.1, 0.01)));
    assert!(read
        .scalar("train/images_per_second")
        .iter()
        .all(|x| x.1 > 0.0));
    assert_eq!(read.steps("train/epoch_seconds"), [10, 20]);
    let summary = of_kind(&events, "summary")[0];
    check_end(&read, summary, 20, "test/accuracy");
    assert_eq!(read.texts["hparams/text_summary"][0].0, 0);
}

#[test]
fn an_airbench94_runs_events_are_its_json_events() {
    let Some(py) = python_or_skip("an_airbench94_runs_events_are_its_json_events") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 1024 training images: one step of 1024 per epoch.
    synthetic(&dir.path().join("data"), 1024, 50, 3, None);
    let logdir = dir.path().join("logs");
    let out = ok(&run(&[
        "train",
        "--model",
        "airbench94",
        "--device",
        "cpu",
        "--seed",
        "5",
        "--epochs",
        "2",
        "--json",
        "--data-dir",
        s(&dir.path().join("data")),
        "--out",
        s(&dir.path().join("w.safetensors")),
        "--logdir",
        s(&logdir),
        "--run-name",
        "fast",
    ]));
    let events = events(&out);
    let read = read_events(&py, &logdir.join("fast"));
    read.assert_no_duplicates();
    let epochs = of_kind(&events, "epoch");
    let want: Vec<(u64, f64)> = epochs
        .iter()
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["train_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(want.len(), 2);
    let got = read.scalar("train/loss");
    assert_eq!(got.len(), 2, "{got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!(g.0 == w.0 && close(g.1, w.1), "{got:?} {want:?}");
    }
    let seconds = read.scalar("train/epoch_seconds");
    for (g, e) in seconds.iter().zip(&epochs) {
        // The hook's clock and the epoch line's start a moment apart.
        let s = e["seconds"].as_f64().unwrap();
        assert!(g.0 == e["step"].as_u64().unwrap() && (g.1 - s).abs() < 0.5 + 0.05 * s);
    }
    for tag in ["train/lr", "train/lr_norm_biases"] {
        assert_eq!(read.steps(tag), [1, 2], "{tag}");
    }
    let lr = read.scalar("train/lr");
    // The schedule falls to its end.
    assert!(lr[1].1 < lr[0].1, "{lr:?}");
    let summary = of_kind(&events, "summary")[0];
    check_end(&read, summary, 2, "test/accuracy_tta");
    assert!(close(
        read.scalar("test/accuracy")[0].1,
        summary["plain_accuracy"].as_f64().unwrap()
    ));
}

#[test]
fn compare_losses_events_are_its_json_events() {
    let Some(py) = python_or_skip("compare_losses_events_are_its_json_events") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 40, 20, 6, None);
    let logdir = dir.path().join("logs");
    // 10 steps per epoch, 205 in all: divergence at 100, 200 and the last.
    let out = ok(&run(&[
        "compare-losses",
        "--device",
        "cpu",
        "--seed",
        "2",
        "--epochs",
        "21",
        "--max-steps",
        "205",
        "--log-every",
        "5",
        "--lr",
        "0.01",
        "--json",
        "--data-dir",
        s(&dir.path().join("data")),
        "--logdir",
        s(&logdir),
        "--run-name",
        "cmp",
    ]));
    let events = events(&out);
    let read = read_events(&py, &logdir.join("cmp").join("f32"));
    read.assert_no_duplicates();
    let losses = of_kind(&events, "loss");
    for (key, tag) in [
        ("loss_a", "loss/A"),
        ("loss_a_rev", "loss/A'"),
        ("loss_b", "loss/B"),
        ("loss_c", "loss/C"),
    ] {
        let want: Vec<(u64, f64)> = losses
            .iter()
            .map(|e| {
                let global = (e["epoch"].as_u64().unwrap() - 1) * 10 + e["step"].as_u64().unwrap();
                (global, e[key].as_f64().unwrap())
            })
            .collect();
        let got = read.scalar(tag);
        assert_eq!(got.len(), want.len(), "{tag}");
        for (g, w) in got.iter().zip(&want) {
            assert!(g.0 == w.0 && close(g.1, w.1), "{tag}: {got:?} {want:?}");
        }
    }
    let summary = of_kind(&events, "summary")[0];
    let divergence = &summary["divergence"];
    let steps: Vec<u64> = divergence["step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(steps, [100, 200, 205]);
    for (key, tag) in [
        ("max_param_diff_ab", "param_diff/A-B"),
        ("max_param_diff_a_rev", "param_diff/A-A'"),
    ] {
        let got = read.scalar(tag);
        assert_eq!(read.steps(tag), steps, "{tag}");
        for (g, w) in got.iter().zip(divergence[key].as_array().unwrap()) {
            assert!(close(g.1, w.as_f64().unwrap()), "{tag}: {got:?} {w}");
        }
    }
    for model in ["A", "A_rev", "B", "C"] {
        let tag = format!("test/accuracy/{}", model.replace("_rev", "'"));
        let want = summary["models"][model]["accuracy"].as_f64().unwrap();
        assert_eq!(read.scalar(&tag), [(205, read.scalar(&tag)[0].1)]);
        assert!(close(read.scalar(&tag)[0].1, want), "{tag}");
    }
    let hparams = &read.texts["hparams/text_summary"];
    assert!(hparams[0].1.contains("| seed | 2 |"), "{hparams:?}");
}

/// A run killed (SIGKILL: no chance to tidy up) after it wrote events past
/// its last checkpoint, resumed and stopped by Ctrl-C, then resumed to the
/// end: TensorBoard reads every file and shows every step once, with the
/// uninterrupted run's values.
#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-hooks feature")]
fn a_killed_and_resumed_run_shows_each_step_once() {
    let Some(py) = python_or_skip("a_killed_and_resumed_run_shows_each_step_once") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 40, 20, 8, None);
    let args = |out: &str, logdir: &str, ck: &str| {
        let mut args: Vec<String> = [
            "train",
            "--device",
            "cpu",
            "--seed",
            "9",
            "--batch-size",
            "4",
            "--epochs",
            "3",
            "--log-every",
            "1",
            "--json",
            "--data-dir",
            "data",
            "--logdir",
            logdir,
            "--run-name",
            "r",
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec();
        args.extend(["--checkpoint-dir", ck, "--checkpoint-every", "4"].map(String::from));
        args
    };
    // The uninterrupted run, for the values.
    let whole = tch_cifar()
        .args(&args("whole.safetensors", "whole-logs", "ck-whole")[..])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let whole = events(&ok(&whole));
    let want: Vec<(u64, f64)> = of_kind(&whole, "loss")
        .iter()
        .map(|e| {
            let global = (e["epoch"].as_u64().unwrap() - 1) * 10 + e["step"].as_u64().unwrap();
            (global, e["loss"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(want.len(), 30);

    // Killed once step 7's line is out: steps 5 and 6 are written after
    // the checkpoint at step 4 (and perhaps the one at 8).
    let first = args("w.safetensors", "logs", "ck");
    stop_at(dir.path(), &first, 7, None);
    let before = read_events(&py, &dir.path().join("logs/r"));
    let written = before.steps("train/loss");
    assert!(written.len() >= 6, "{written:?}");

    // Resumed, then stopped with Ctrl-C (SIGINT: it saves a checkpoint and
    // exits with 130) at step 17.
    let resume: Vec<String> = ["train", "--resume", "ck", "--json"]
        .map(String::from)
        .to_vec();
    let interrupted = stop_at(dir.path(), &resume, 17, Some(libc::SIGINT));
    let from1 = interrupted[0]["resumed_from"]["global_step"]
        .as_u64()
        .unwrap();
    assert!(from1 < *written.last().unwrap(), "nothing stale to purge");
    let stopped = of_kind(&interrupted, "interrupted");
    assert_eq!(stopped.len(), 1, "{interrupted:?}");
    let middle = read_events(&py, &dir.path().join("logs/r"));
    middle.assert_no_duplicates();

    let last = tch_cifar()
        .args(&resume[..])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let last = events(&ok(&last));
    let from2 = last[0]["resumed_from"]["global_step"].as_u64().unwrap();
    assert_eq!(from2, stopped[0]["global_step"].as_u64().unwrap());
    let files = std::fs::read_dir(dir.path().join("logs/r"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(
        files, 3,
        "each resumed run writes a file of its own in the same folder"
    );

    let read = read_events(&py, &dir.path().join("logs/r"));
    read.assert_no_duplicates();
    let got = read.scalar("train/loss");
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!(g.0 == w.0 && close(g.1, w.1), "{got:?} {want:?}");
    }
    assert_eq!(read.steps("test/accuracy"), [30]);
    // The settings at the start, and again where each resume starts.
    let hparams: Vec<u64> = read.texts["hparams/text_summary"]
        .iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(hparams, [0, from1 + 1, from2 + 1]);
}

/// Runs `tch-cifar ARGS` in `dir` with slowed steps until its `--json`
/// loss line for global step `at` (10 steps per epoch), then sends
/// `signal` (and checks it exits with 130) or SIGKILL. Returns the events
/// it printed.
fn stop_at(dir: &Path, args: &[String], at: u64, signal: Option<i32>) -> Vec<Value> {
    let mut child = tch_cifar()
        .env("TCH_CIFAR_TEST_STEP_DELAY_MS", "150")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = vec![];
    loop {
        let line = lines.next().expect("the run ended early").unwrap();
        let event: Value = serde_json::from_str(&line).unwrap();
        let global =
            (event["epoch"].as_u64().unwrap_or(1) - 1) * 10 + event["step"].as_u64().unwrap_or(0);
        let done = event["event"] == "loss" && global == at;
        seen.push(event);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no step {at} within 2 minutes");
    }
    match signal {
        None => {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        Some(signal) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
            seen.extend(lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()));
            let status = child.wait().unwrap();
            assert_eq!(status.code(), Some(130), "{seen:?}");
        }
    }
    seen
}

/// A `tensorboard` server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on 127.0.0.1:`port`: the status line's code and the body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((code, body))
}

#[test]
fn tensorboard_serves_the_run() {
    let Some(py) = python_or_skip("tensorboard_serves_the_run") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 20, 10, 5, None);
    let logdir = dir.path().join("logs");
    ok(&run(&[
        "train",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--epochs",
        "1",
        "--log-every",
        "1",
        "--data-dir",
        s(&dir.path().join("data")),
        "--out",
        s(&dir.path().join("w.safetensors")),
        "--logdir",
        s(&logdir),
        "--run-name",
        "served",
    ]));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server(
        Command::new(&py)
            .args(["-m", "tensorboard.main", "--logdir"])
            .arg(&logdir)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--load_fast", "false", "--reload_interval", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let body = loop {
        if let Ok((200, body)) = http_get(port, "/data/plugin/scalars/tags") {
            if body.contains("train/loss") {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "tensorboard did not list the run's scalars within 90 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let tags: Value = serde_json::from_str(&body).unwrap();
    let run = &tags["served"];
    for tag in ["train/loss", "train/lr", "test/accuracy"] {
        assert!(run.get(tag).is_some(), "{tag} not in {body}");
    }
    let (code, runs) = http_get(port, "/data/runs").unwrap();
    assert_eq!(code, 200);
    assert!(runs.contains("served"), "{runs}");
    drop(server);
}
