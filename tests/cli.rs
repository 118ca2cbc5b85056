//! End-to-end tests of `train` and `evaluate`: the real binary on small
//! synthetic CIFAR-10 files, CPU only.

mod util;

use std::io::{Read, Write};
use std::net::TcpListener;

use util::*;

/// Trains on synthetic data; `extra` adds or overrides flags.
fn train(data: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let defaults = [
        ("--seed", "7"),
        ("--epochs", "3"),
        ("--lr", "0.01"),
        ("--log-every", "25"),
    ];
    let mut args = vec![
        "train",
        "--device",
        "cpu",
        "--data-dir",
        s(data),
        "--out",
        s(out),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn train_then_evaluate_prints_the_tutorial_lines_and_beats_chance() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 500, 200, 1, None);
    let weights = dir.path().join("net.safetensors");
    let out = train(&data, &weights, &[]);
    let text = ok(&out);
    // Where the weights went, on stderr: stdout is the tutorial's.
    assert!(
        stderr(&out).contains(&format!("saved the weights to {}\n", weights.display())),
        "{}",
        stderr(&out)
    );
    // 500 images / batch 4 = 125 steps per epoch: marks at 25, 50, ... 125.
    assert!(text.contains("[1,    25] loss: "), "{text}");
    assert!(text.contains("[3,   125] loss: "), "{text}");
    assert_eq!(text.matches("] loss: ").count(), 15, "{text}");
    assert!(text.contains("\nFinished Training\n"), "{text}");
    assert!(
        text.contains("GroundTruth:  ") && text.contains("Predicted:  "),
        "{text}"
    );
    let acc_line = text
        .lines()
        .find(|l| l.starts_with("Accuracy of the network on the 200 test images: "))
        .expect(&text);
    let acc: i64 = acc_line.rsplit(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        acc >= 50,
        "synthetic data should be learned well above 10 % chance: {acc_line}"
    );
    assert_eq!(text.matches("Accuracy for class: ").count(), 10, "{text}");
    assert!(text.contains("Accuracy for class: plane is "), "{text}");

    // Evaluating the saved weights repeats the same accuracy lines.
    let eval = ok(&run(&[
        "evaluate",
        "--device",
        "cpu",
        "--weights",
        s(&weights),
        "--data-dir",
        s(&data),
    ]));
    let train_tail: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Accuracy of"))
        .collect();
    assert_eq!(eval.lines().collect::<Vec<_>>(), train_tail);
}

#[test]
fn json_lines_end_with_a_complete_summary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 200, 100, 2, None);
    let weights = dir.path().join("net.safetensors");
    let text = ok(&train(&data, &weights, &["--json", "--epochs", "1"]));
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events[0]["event"], "start");
    assert_eq!(
        events.iter().filter(|e| e["event"] == "loss").count(),
        2,
        "{text}"
    );
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    for key in [
        "accuracy",
        "per_class_accuracy",
        "train_seconds",
        "images_per_second",
        "device",
        "epochs",
        "steps",
    ] {
        assert!(!summary[key].is_null(), "summary lacks {key}: {summary}");
    }
    assert_eq!(summary["device"], "cpu");
    assert_eq!(summary["weights"], s(&weights));
    assert_eq!(summary["steps"], 50);
    assert_eq!(summary["epochs"], 1);
    assert_eq!(summary["total"], 100);
    assert_eq!(summary["per_class_accuracy"].as_object().unwrap().len(), 10);
    let acc = summary["accuracy"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&acc));

    let eval = ok(&run(&[
        "evaluate",
        "--json",
        "--device",
        "cpu",
        "--weights",
        s(&weights),
        "--data-dir",
        s(&data),
    ]));
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(eval["accuracy"], summary["accuracy"]);
    assert_eq!(eval["per_class_accuracy"], summary["per_class_accuracy"]);
}

#[test]
fn same_seed_gives_identical_losses_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 200, 40, 3, None);
    let (a, b, c) = (
        dir.path().join("a.st"),
        dir.path().join("b.st"),
        dir.path().join("c.st"),
    );
    let losses = |t: &str| {
        t.lines()
            .filter(|l| l.contains("] loss: "))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let ta = ok(&train(&data, &a, &["--epochs", "2"]));
    let tb = ok(&train(&data, &b, &["--epochs", "2"]));
    let tc = ok(&train(&data, &c, &["--epochs", "2", "--seed", "8"]));
    assert_eq!(losses(&ta), losses(&tb));
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "weights differ under one seed"
    );
    assert_ne!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&c).unwrap(),
        "another seed, same weights?"
    );
    assert_ne!(losses(&ta), losses(&tc));
}

#[test]
fn binary_has_an_rpath_leaves_libtorch_cuda_unlinked_and_runs_without_ld_library_path() {
    let out = std::process::Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_tch-cifar")])
        .output()
        .expect("readelf");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("RPATH") || dynamic.contains("RUNPATH"),
        "{dynamic}"
    );
    // Loaded only when a command asks for CUDA (device::cuda_support).
    assert!(!dynamic.contains("[libtorch_cuda.so]"), "{dynamic}");
    let out = tch_cifar()
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn archive_is_unpacked() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    synthetic(&dir.path().join("src"), 100, 20, 5, Some(&archive));
    let md5 = md5_hex(&std::fs::read(&archive).unwrap());
    let data = dir.path().join("data");
    let w = dir.path().join("w.st");

    // The failures (md5, corrupt, escaping entries) are in tests/errors.rs.
    let text = ok(&train(
        &data,
        &w,
        &["--archive", s(&archive), "--md5", &md5, "--epochs", "1"],
    ));
    assert!(text.contains("Finished Training"));
    assert!(data.join("cifar-10-batches-bin/test_batch.bin").is_file());
    // Once unpacked, the archive is not needed, and a second --archive says so.
    let again = train(&data, &w, &["--archive", s(&archive), "--epochs", "1"]);
    ok(&again);
    assert!(
        stderr(&again).contains("so --archive") && stderr(&again).contains("was not used"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn downloads_from_a_local_server_and_checks_md5() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.tar.gz");
    synthetic(&dir.path().join("src"), 100, 20, 6, Some(&archive));
    let bytes = std::fs::read(&archive).unwrap();
    let md5 = md5_hex(&bytes);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/cifar-10-binary.tar.gz",
        listener.local_addr().unwrap()
    );
    // Serves the archive to exactly two requests, then stops.
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 4096];
            let _ = conn.read(&mut req).unwrap();
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            )
            .unwrap();
            conn.write_all(&bytes).unwrap();
        }
    });
    let w = dir.path().join("w.st");
    let bad = dir.path().join("bad");
    fails_with(
        &train(&bad, &w, &["--download-url", &url]),
        &["md5", "expected c32a1d4ab5d03f1284b67883e8d87530"],
    );
    assert!(
        !bad.join("cifar-10-binary.tar.gz").exists(),
        "a failed download must not be kept"
    );
    let data = dir.path().join("data");
    let text = ok(&train(
        &data,
        &w,
        &["--download-url", &url, "--md5", &md5, "--epochs", "1"],
    ));
    assert!(text.contains("Finished Training"));
    assert!(data.join("cifar-10-binary.tar.gz").is_file());
    server.join().unwrap();
}

#[test]
fn max_steps_cuts_the_run_short_and_still_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 200, 40, 8, None);
    let weights = dir.path().join("net.safetensors");
    let text = ok(&train(&data, &weights, &["--json", "--max-steps", "7"]));
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["steps"], 7);
    assert_eq!(summary["total"], 40);
    assert!(weights.is_file());
}

/// A run shorter than `--log-every` prints no loss line; a note on stderr
/// says why, naming the flag, and a run that prints one has no such note.
#[test]
fn a_run_shorter_than_log_every_says_why_no_loss_line_comes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 200, 40, 8, None);
    let weights = dir.path().join("net.safetensors");
    let short = ["--epochs", "1", "--max-steps", "20", "--log-every", "2000"];
    let out = train(&data, &weights, &short);
    let text = ok(&out);
    assert!(!text.contains("] loss: "), "{text}");
    let err = stderr(&out);
    let notes: Vec<&str> = err.lines().filter(|l| l.contains("--log-every")).collect();
    assert_eq!(
        notes,
        [
            "note: this run prints no running-loss line: one comes every --log-every 2000 \
          mini-batches of an epoch, and it trains at most 20 in one; --log-every 2 prints them"
        ],
        "{err}"
    );

    let out = train(
        &data,
        &weights,
        &["--epochs", "1", "--max-steps", "20", "--log-every", "2"],
    );
    assert!(ok(&out).contains("[1,    20] loss: "));
    assert!(!stderr(&out).contains("--log-every"), "{}", stderr(&out));
}

/// `--profile` writes a Chrome trace of the step asked for, with the
/// step's operators, and says so in an event; training goes on to the end.
#[test]
fn profile_writes_one_steps_trace() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 200, 40, 8, None);
    let weights = dir.path().join("net.safetensors");
    let trace = dir.path().join("step.json");
    let extra = [
        "--json",
        "--max-steps",
        "6",
        "--profile",
        s(&trace),
        "--profile-step",
        "4",
    ];
    let text = ok(&train(&data, &weights, &extra));
    let events = events(&text);
    let profile = of_kind(&events, "profile");
    assert_eq!(profile.len(), 1, "{text}");
    assert_eq!(profile[0]["step"], 4);
    assert_eq!(of_kind(&events, "summary")[0]["steps"], 6);
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let names: Vec<&str> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    // One step of batch 4: one forward convolution per conv layer, and backward.
    let convs = names.iter().filter(|n| **n == "aten::conv2d").count();
    assert_eq!(convs, 2, "{names:?}");
    assert!(
        names.iter().any(|n| n.contains("ConvolutionBackward")),
        "{names:?}"
    );
}

#[test]
fn a_closed_stdout_pipe_ends_the_run_quietly() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 100, 20, 9, None);
    let weights = dir.path().join("w.safetensors");
    ok(&train(&data, &weights, &["--epochs", "1"]));
    // Like `tch-cifar evaluate ... | head -1`: the reader leaves at once.
    let png = dir.path().join("confusion.png");
    let mut child = tch_cifar()
        .args([
            "evaluate",
            "--device",
            "cpu",
            "--weights",
            s(&weights),
            "--data-dir",
            s(&data),
            "--confusion",
            s(&png),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    // The file outputs come before the printed ones.
    assert!(png.is_file(), "the confusion matrix was not drawn");
}

/// A Linux file name may be any bytes. JSON strings must be UTF-8, so such
/// a name is reported with U+FFFD in place of the bad byte, not a panic.
#[test]
fn paths_that_are_not_utf8_are_reported_lossily() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 40, 20, 2, None);
    let out = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"net\xff.safetensors"));
    let text = ok(&tch_cifar()
        .args(["train", "--json", "--device", "cpu", "--epochs", "1"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let weights = summary["weights"].as_str().unwrap();
    assert!(weights.ends_with("net\u{FFFD}.safetensors"), "{weights}");
    assert!(out.is_file());
}

/// A negative count gets a range error (not "unexpected argument"), and SGD's
/// momentum must be below 1.
#[test]
fn epochs_and_momentum_are_range_checked() {
    let refused = |flag: &str, value: &str, needle: &str| {
        let out = run(&["train", flag, value]);
        fails_with(
            &out,
            &[&format!("invalid value '{value}' for '{flag} "), needle],
        );
    };
    refused("--epochs", "-1", "-1 must be from 1 to 1000000");
    refused("--batch-size", "-4", "-4 must be at least 1");
    refused("--momentum", "1.5", "`1.5` is not in [0, 1)");
    refused("--momentum", "1", "`1` is not in [0, 1)");
}

/// `-h` fits a 100-column terminal: the top level's and every subcommand's
/// (read from the top level's list, so a new one is checked too).
#[test]
fn short_help_lines_fit_100_columns_in_every_subcommand() {
    let top = ok(&run(&["-h"]));
    let subcommands: Vec<String> = top
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|name| name != "help")
        .collect();
    assert!(subcommands.len() >= 6, "{top}");
    let mut long = vec![];
    for sub in std::iter::once(None).chain(subcommands.iter().map(Some)) {
        let args: Vec<&str> = sub.map(|s| s.as_str()).into_iter().chain(["-h"]).collect();
        let help = ok(&run(&args));
        for line in help.lines() {
            let columns = line.chars().count();
            if columns > 100 {
                long.push(format!("{args:?} ({columns}): {line}"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "lines over 100 columns:\n{}",
        long.join("\n")
    );
}
