//! Data-parallel training on libtorch's c10d (Gloo) through the real
//! binary, on loopback only: two ranks launched by torchrun and by a plain
//! launcher that sets torchrun's environment itself, against one process on
//! the same seed; one checkpoint for an interrupt on any rank and a
//! bit-identical resume; a rank that dies or hangs; bad environments;
//! airbench94 on two ranks, with rank 0 alone writing TensorBoard events.
//! Every process a test starts is ended, and every wait is bounded.

mod util;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tch::Tensor;
use util::*;

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch folder with 200 training and 40 test images in `data/`.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 200, 40, 8, None);
    dir
}

/// The tutorial's recipe on this file's data: batch 4, 50 steps per epoch.
fn train_args(out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--data-dir",
        "data",
        "--out",
        out,
        "--seed",
        "3",
        "--lr",
        "0.01",
        "--log-every",
        "10",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `tch-cifar ARGS` in `dir` as rank `rank` of `world` ranks whose store
/// is on 127.0.0.1:`port`, as torchrun would start it.
fn rank(dir: &Path, rank: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut cmd = tch_cifar();
    cmd.current_dir(dir)
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    cmd
}

/// Starts `world` ranks of `args` in `dir`, their output piped.
fn spawn_ranks(dir: &Path, world: usize, args: &[String], env: &[(&str, &str)]) -> Vec<Child> {
    let port = free_port();
    (0..world)
        .map(|r| {
            let mut cmd = rank(dir, r, world, port, args);
            cmd.envs(env.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().expect("start a rank")
        })
        .collect()
}

/// Waits for `child` at most `limit`, killing it past that; returns its
/// output and how long it took.
fn wait_bounded(child: Child, limit: Duration) -> (Output, Duration) {
    let began = Instant::now();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => (out.expect("wait for a rank"), began.elapsed()),
        Err(_) => {
            // SAFETY: a plain kill(2) of the child we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("a rank ran past {limit:?} and was killed");
        }
    }
}

/// Runs the ranks to their end (each within 3 minutes).
fn run_ranks(dir: &Path, world: usize, args: &[String], env: &[(&str, &str)]) -> Vec<Output> {
    spawn_ranks(dir, world, args, env)
        .into_iter()
        .map(|c| wait_bounded(c, Duration::from_secs(180)).0)
        .collect()
}

fn losses(events: &[Value]) -> Vec<f64> {
    of_kind(events, "loss")
        .iter()
        .map(|e| e["loss"].as_f64().unwrap())
        .collect()
}

/// The largest difference between two weights files' tensors.
fn max_difference(a: &Path, b: &Path) -> f64 {
    let a = Tensor::read_safetensors(a).unwrap();
    let b = Tensor::read_safetensors(b).unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| {
            let (_, u) = b.iter().find(|(n, _)| n == name).unwrap();
            (t - u).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Two ranks, at global batch 4, train what one process trains at batch 4:
/// the same losses (the global batch's) and weights up to float rounding,
/// and the same test accuracy; only rank 0 prints and writes.
fn check_against_one_process(dir: &Path, two: &[Output], two_out: &str) {
    let one = tch_cifar()
        .current_dir(dir)
        .args(train_args("one.safetensors", &[]))
        .output()
        .unwrap();
    let one = events(&ok(&one));
    let rank0 = events(&ok(&two[0]));
    assert_eq!(ok(&two[1]), "", "rank 1 printed");
    assert!(stderr(&two[1]).trim().is_empty(), "{}", stderr(&two[1]));
    let start = of_kind(&rank0, "start")[0];
    assert_eq!(start["world_size"], 2);
    assert_eq!(start["backend"], "gloo");
    let (a, b) = (losses(&one), losses(&rank0));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "losses {a:?} and {b:?}");
    }
    let diff = max_difference(&dir.join("one.safetensors"), &dir.join(two_out));
    assert!(diff < 1e-5, "weights differ by {diff}");
    let summary = |e: &[Value]| of_kind(e, "summary")[0]["accuracy"].as_f64().unwrap();
    assert_eq!(summary(&one), summary(&rank0));
    assert_eq!(of_kind(&rank0, "summary")[0]["world_size"], 2);
}

#[test]
fn every_rank_trains_rank_0s_recipe() {
    let dir = scratch();
    // Without --seed, each rank draws one, and rank 0's is the run's: the
    // run repeats exactly when both ranks are given it. (Against one
    // process the losses only agree up to the all-reduce's rounding, which
    // some seeds' training amplifies past any fixed tolerance.)
    let mut args = train_args("two.safetensors", &[]);
    let at = args.iter().position(|a| a == "--seed").unwrap();
    args.drain(at..at + 2);
    let drawn = events(&ok(&run_ranks(dir.path(), 2, &args, &[])[0]));
    let seed = of_kind(&drawn, "start")[0]["seed"].to_string();
    let mut seeded = args.clone();
    seeded.extend(["--seed".to_string(), seed.clone()]);
    let given = events(&ok(&run_ranks(dir.path(), 2, &seeded, &[])[0]));
    assert_eq!(of_kind(&given, "start")[0]["seed"].to_string(), seed);
    assert_eq!(losses(&drawn), losses(&given), "seed {seed}");
    // A rank started with another recipe is refused, and rank 0 names it.
    let port = free_port();
    let spawn = |r: usize, seed: &str| {
        let mut args = train_args("w.safetensors", &["--dist-timeout", "20"]);
        args[at + 1] = seed.to_string();
        rank(dir.path(), r, 2, port, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (rank0, rank1) = (spawn(0, "1"), spawn(1, "2"));
    let (out1, _) = wait_bounded(rank1, Duration::from_secs(60));
    let (out0, _) = wait_bounded(rank0, Duration::from_secs(60));
    fails_with(
        &out1,
        &["rank 1 was started with another recipe than rank 0's (--seed 2 here, 1 on rank 0)"],
    );
    fails_with(
        &out0,
        &["rank 1 failed: rank 1 was started with another recipe"],
    );
}

#[test]
fn two_ranks_of_a_plain_launch_train_what_one_process_trains() {
    let dir = scratch();
    let two = run_ranks(dir.path(), 2, &train_args("two.safetensors", &[]), &[]);
    check_against_one_process(dir.path(), &two, "two.safetensors");
}

/// torchrun from the project's venv (the PyTorch wheel), if it is there.
fn torchrun() -> Option<PathBuf> {
    let path = repo_path(".venv/bin/torchrun");
    path.exists().then_some(path)
}

#[test]
fn torchrun_launches_two_ranks_that_train_what_one_process_trains() {
    let Some(torchrun) = torchrun() else {
        eprintln!("skipped: no .venv/bin/torchrun (scripts/setup-libtorch installs it)");
        return;
    };
    let dir = scratch();
    let port = free_port().to_string();
    let endpoint = format!("127.0.0.1:{port}");
    let child = Command::new(torchrun)
        .current_dir(dir.path())
        .args([
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--rdzv-backend",
            "c10d",
        ])
        .args(["--rdzv-endpoint", &endpoint, "--no-python"])
        .arg(env!("CARGO_BIN_EXE_tch-cifar"))
        .args(train_args("two.safetensors", &[]))
        .env("OMP_NUM_THREADS", "1")
        .env("GLOO_SOCKET_IFNAME", "lo")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, _) = wait_bounded(child, Duration::from_secs(180));
    // torchrun gathers both ranks' output; rank 1 prints nothing.
    let fake_rank1 = Output {
        stdout: vec![],
        stderr: vec![],
        ..out.clone()
    };
    check_against_one_process(dir.path(), &[out, fake_rank1], "two.safetensors");
}

#[test]
fn an_interrupt_on_one_rank_stops_all_with_one_checkpoint_that_resumes_bit_for_bit() {
    let dir = scratch();
    let args = train_args(
        "full.safetensors",
        &["--epochs", "2", "--checkpoint-dir", "full"],
    );
    for out in run_ranks(dir.path(), 2, &args, &[]) {
        ok(&out);
    }
    let args = train_args(
        "cut.safetensors",
        &["--epochs", "2", "--checkpoint-dir", "cut"],
    );
    let mut ranks = ranks_under_way(dir.path(), &args);
    // Rank 1 alone gets the signal.
    // SAFETY: a plain kill(2) of a child we started.
    unsafe { libc::kill(ranks[1].id() as i32, libc::SIGINT) };
    let rank1 = ranks.pop().unwrap();
    let rank0 = ranks.pop().unwrap();
    let (out0, _) = wait_bounded(rank0, Duration::from_secs(60));
    let (out1, _) = wait_bounded(rank1, Duration::from_secs(60));
    assert_eq!(out0.status.code(), Some(130), "{}", stderr(&out0));
    assert_eq!(out1.status.code(), Some(130), "{}", stderr(&out1));
    assert!(stderr(&out1).trim().is_empty(), "{}", stderr(&out1));
    let said = stderr(&out0);
    assert!(
        said.contains("resume with: torchrun --standalone --nproc-per-node 2 --no-python tch-cifar train --resume cut"),
        "{said}"
    );
    let saved: Vec<_> = std::fs::read_dir(dir.path().join("cut")).unwrap().collect();
    assert_eq!(saved.len(), 1, "one checkpoint");
    let checkpoint = saved[0].as_ref().unwrap().path();
    std::fs::create_dir(dir.path().join("cut-copy")).unwrap();
    std::fs::copy(
        &checkpoint,
        dir.path()
            .join("cut-copy")
            .join(checkpoint.file_name().unwrap()),
    )
    .unwrap();
    // Resumed on two ranks, the run ends where the uninterrupted one did.
    let resume: Vec<String> = ["train", "--resume", "cut", "--json"]
        .map(String::from)
        .to_vec();
    for out in run_ranks(dir.path(), 2, &resume, &[]) {
        ok(&out);
    }
    let full = std::fs::read(dir.path().join("full.safetensors")).unwrap();
    let cut = std::fs::read(dir.path().join("cut.safetensors")).unwrap();
    assert!(full == cut, "the resumed run's weights differ");
    // On one process, the same checkpoint goes on with a note.
    let one = tch_cifar()
        .current_dir(dir.path())
        .args(["train", "--resume", "cut-copy", "--out", "one.safetensors"])
        .output()
        .unwrap();
    ok(&one);
    let note = stderr(&one);
    assert!(
        note.contains("was saved by a run of 2 rank(s), this one has 1"),
        "{note}"
    );
}

/// Starts two ranks of `args`, each step slowed, and returns them once rank
/// 0 has printed its first loss line (its later output is drained).
fn ranks_under_way(dir: &Path, args: &[String]) -> Vec<Child> {
    let slow = [("TCH_CIFAR_TEST_STEP_DELAY_MS", "50")];
    let mut ranks = spawn_ranks(dir, 2, args, &slow);
    let stdout = ranks[0].stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let began = Instant::now();
    loop {
        let line = lines.next().expect("rank 0 ended early").unwrap();
        if line.contains("\"loss\"") {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(60), "no loss line");
    }
    std::thread::spawn(move || lines.for_each(drop));
    ranks
}

/// Does `fault` to rank 1 of a run under way and returns rank 0's output
/// and its time to fail.
fn fault_rank1(dir: &Path, fault: i32) -> (Output, Duration) {
    let args = train_args("w.safetensors", &["--epochs", "20", "--dist-timeout", "8"]);
    let mut ranks = ranks_under_way(dir, &args);
    let pid = ranks[1].id() as i32;
    // SAFETY: a plain kill(2) of a child we started.
    unsafe { libc::kill(pid, fault) };
    let rank1 = ranks.pop().unwrap();
    let rank0 = ranks.pop().unwrap();
    let result = wait_bounded(rank0, Duration::from_secs(60));
    // SAFETY: as above; rank 1 is stopped or dead, and is ended either way.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = wait_bounded(rank1, Duration::from_secs(10));
    result
}

#[test]
fn a_rank_that_dies_ends_the_others_with_its_name() {
    let dir = scratch();
    let (out, took) = fault_rank1(dir.path(), libc::SIGKILL);
    let line = fails_with(&out, &["rank 0 of 2", "lost rank 1"]);
    assert!(took < Duration::from_secs(20), "took {took:?}: {line}");
    assert!(!dir.path().join("w.safetensors").exists());
}

#[test]
fn a_rank_that_hangs_ends_the_others_within_the_timeout() {
    let dir = scratch();
    let (out, took) = fault_rank1(dir.path(), libc::SIGSTOP);
    let line = fails_with(&out, &["rank 0 of 2", "lost rank 1", "--dist-timeout"]);
    // 8 s of --dist-timeout, then the heartbeats' check.
    assert!(took < Duration::from_secs(25), "took {took:?}: {line}");
    assert!(!dir.path().join("w.safetensors").exists());
}

#[test]
fn bad_environments_are_refused_with_one_line() {
    let dir = scratch();
    let args = train_args("w.safetensors", &[]);
    let env_run = |env: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = tch_cifar();
        cmd.current_dir(dir.path()).args(&args).args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        // --json: the last line is the error event, with the same message.
        let last = stdout(&out).lines().last().unwrap_or_default().to_string();
        let event: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(event["event"], "error", "{last}");
        out
    };
    let out = env_run(&[("WORLD_SIZE", "2"), ("RANK", "0")], &[]);
    fails_cleanly(&out, &["WORLD_SIZE=2 is set but MASTER_ADDR is not"]);
    let out = env_run(
        &[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ],
        &[],
    );
    fails_cleanly(&out, &["RANK=2 is not a rank of WORLD_SIZE=2"]);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let full = [
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", port.as_str()),
    ];
    let out = env_run(&full, &["--dist-timeout", "5"]);
    fails_cleanly(
        &out,
        &["cannot host the rendezvous store", "is the port in use"],
    );
    drop(taken);
    let out = env_run(&full, &["--dist-backend", "nccl"]);
    fails_cleanly(&out, &["--dist-backend nccl runs on GPUs"]);
    let out = env_run(&full, &["--batch-size", "5"]);
    fails_cleanly(
        &out,
        &["--batch-size 5 does not divide among WORLD_SIZE=2 ranks"],
    );
    let out = tch_cifar()
        .current_dir(dir.path())
        .args(["compare-losses", "--data-dir", "data", "--device", "cpu"])
        .envs(full)
        .output()
        .unwrap();
    fails_cleanly(&out, &["compare-losses", "does not run distributed"]);
    assert_eq!(
        tree(dir.path())
            .iter()
            .filter(|p| p.starts_with("w"))
            .count(),
        0
    );
}

#[test]
fn airbench94_trains_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    // Two global batches of 1024: each rank takes 512 of each.
    synthetic(&dir.path().join("data"), 2048, 100, 3, None);
    let args: Vec<String> = [
        "train",
        "--model",
        "airbench94",
        "--data-dir",
        "data",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--seed",
        "5",
        "--epochs",
        "1",
        "--json",
        "--out",
        "w.safetensors",
        "--logdir",
        "tb",
    ]
    .map(String::from)
    .to_vec();
    let outs = run_ranks(dir.path(), 2, &args, &[]);
    // Rank 0 alone writes TensorBoard events: one run folder, one file.
    let written: Vec<_> = tree(&dir.path().join("tb"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents"))
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let rank0 = events(&ok(&outs[0]));
    assert_eq!(ok(&outs[1]), "");
    let summary = of_kind(&rank0, "summary")[0];
    assert_eq!(summary["world_size"], 2);
    assert!(summary["tta_accuracy"].as_f64().is_some());
    let epoch = of_kind(&rank0, "epoch")[0];
    assert!(epoch["train_loss"].as_f64().unwrap().is_finite());
    assert!(dir.path().join("w.safetensors").exists());
}

/// The record recipe runs distributed through the harness alone: on two
/// ranks (two global batches of 2000, each rank taking 1000) it trains
/// nearly what one process does. Not exactly: as under DDP, each rank's
/// BatchNorm normalizes with its own 1000 images' statistics.
#[test]
fn airbench94_muon_on_two_ranks_trains_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 4000, 100, 3, None);
    let args = |out: &str| -> Vec<String> {
        [
            "train",
            "--model",
            "airbench94-muon",
            "--data-dir",
            "data",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--seed",
            "5",
            "--epochs",
            "1",
            // The tolerances below are float32's: in bf16 each rank's
            // half-batch BatchNorm statistics round further apart.
            "--precision",
            "fp32",
            "--json",
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    let outs = run_ranks(dir.path(), 2, &args("two.safetensors"), &[]);
    let two = events(&ok(&outs[0]));
    assert_eq!(of_kind(&two, "summary")[0]["world_size"], 2);
    let one = tch_cifar()
        .current_dir(dir.path())
        .args(args("one.safetensors"))
        .output()
        .unwrap();
    let one = events(&ok(&one));
    let loss =
        |events: &[serde_json::Value]| of_kind(events, "epoch")[0]["train_loss"].as_f64().unwrap();
    let (a, b) = (loss(&two), loss(&one));
    assert!(
        (a - b).abs() < 1e-3 * b.abs(),
        "2 ranks: loss {a}, 1 process: {b}"
    );
    let weights = |name: &str| -> std::collections::BTreeMap<String, Tensor> {
        let tensors = Tensor::read_safetensors(dir.path().join(name)).unwrap();
        tensors.into_iter().collect()
    };
    let (two, one) = (weights("two.safetensors"), weights("one.safetensors"));
    assert_eq!(
        two.keys().collect::<Vec<_>>(),
        one.keys().collect::<Vec<_>>()
    );
    for ((key, x), y) in two.iter().zip(one.values()) {
        if x.is_floating_point() {
            let diff = (x - y).abs().max().double_value(&[]);
            let scale = y.abs().max().double_value(&[]).max(1e-6);
            assert!(
                diff < 0.05 * scale,
                "{key}: 2 ranks differ from 1 process by {diff} (of {scale})"
            );
        }
    }
}
