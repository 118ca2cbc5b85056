//! The input-error matrix: each bad input makes the real binary exit
//! non-zero with one `error:` line on stderr that names the offending path
//! or value, with no panic or backtrace, and with nothing left behind in
//! the folder it ran in (no partial weights, dataset or download).

mod util;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use tch::{Device, Kind, Tensor};
use tch_cifar::nets::tutorial::Model;
use util::*;

/// A scratch folder with a small synthetic dataset in `data/`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        synthetic(&dir.path().join("data"), 50, 20, 4, None);
        Scratch { dir }
    }

    fn empty() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `tch-cifar ARGS` inside the folder, asserts a clean failure
    /// whose line holds every one of `needles`, and that the folder's
    /// contents did not change. Returns the exit status and the line.
    fn refused(&self, args: &[&str], needles: &[&str]) -> (Option<i32>, String) {
        let before = tree(self.dir.path());
        let out: Output = tch_cifar()
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        let line = fails_cleanly(&out, needles);
        assert_eq!(
            tree(self.dir.path()),
            before,
            "{args:?} left files behind; {line}"
        );
        (out.status.code(), line)
    }

    /// `train` on `data/` into `w.safetensors`, with `extra` flags; a data
    /// error must fail before training.
    fn train(&self, extra: &[&str], needles: &[&str]) -> String {
        let defaults = [
            ("--device", "cpu"),
            ("--data-dir", "data"),
            ("--out", "w.safetensors"),
            ("--epochs", "1"),
            ("--seed", "1"),
            // Never the network: a download attempt fails differently.
            (
                "--download-url",
                "http://127.0.0.1:9/cifar-10-binary.tar.gz",
            ),
        ];
        let mut args = vec!["train"];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let (code, line) = self.refused(&args, needles);
        assert_eq!(code, Some(1), "{line}");
        line
    }

    /// `evaluate --weights FILE`.
    fn evaluate(&self, weights: &str, needles: &[&str]) -> String {
        let (code, line) = self.refused(&evaluate_args("data", weights), needles);
        assert_eq!(code, Some(1), "{line}");
        line
    }

    /// Replaces `data/data_batch_3.bin` with `edit` applied to its bytes.
    fn edit_batch(&self, edit: impl FnOnce(&mut Vec<u8>)) {
        let path = self.path("data/data_batch_3.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
    }
}

/// A URL on this machine that refuses connections.
fn dead_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz")
}

// Missing data directory or batch file.

#[test]
fn missing_data_directory_names_it_and_the_url() {
    let s = Scratch::empty();
    let url = dead_url();
    let line = s.train(
        &["--data-dir", "no/such/data", "--download-url", &url],
        &["no/such/data", &url, "could not be downloaded"],
    );
    assert!(!s.path("no").exists(), "{line}");
}

/// A mistyped `--data-dir` reads as one that does not exist, not merely
/// as a failed download, and the error names the ways out without a
/// network; a folder that exists but is empty is not called missing.
#[test]
fn a_data_directory_that_does_not_exist_is_named_as_such() {
    let s = Scratch::empty();
    let url = dead_url();
    let ways_out = ["--data-dir DIR", "--archive FILE"];
    let line = s.train(
        &["--data-dir", "no/such/data", "--download-url", &url],
        &[
            &["data directory no/such/data does not exist"][..],
            &ways_out[..],
        ]
        .concat(),
    );
    assert!(line.contains(&url), "{line}");
    std::fs::create_dir(s.path("empty")).unwrap();
    let line = s.train(
        &["--data-dir", "empty", "--download-url", &url],
        &[&["CIFAR-10 is not in empty"][..], &ways_out[..]].concat(),
    );
    assert!(!line.contains("does not exist"), "{line}");
}

#[test]
fn missing_batch_file_is_named_and_nothing_is_downloaded() {
    let s = Scratch::new();
    std::fs::remove_file(s.path("data/data_batch_3.bin")).unwrap();
    s.train(&[], &["data/data_batch_3.bin is missing"]);
}

// Bad batch files.

#[test]
fn empty_batch_file() {
    let s = Scratch::new();
    s.edit_batch(Vec::clear);
    s.train(&[], &["data/data_batch_3.bin", "is empty"]);
}

#[test]
fn truncated_batch_file() {
    let s = Scratch::new();
    s.edit_batch(|b| b.truncate(b.len() - 10));
    s.train(
        &[],
        &[
            "data/data_batch_3.bin",
            "has 30720 bytes",
            "not a whole number of 3073-byte records",
        ],
    );
}

#[test]
fn batch_file_not_a_multiple_of_the_record_size() {
    let s = Scratch::new();
    s.edit_batch(|b| b.extend_from_slice(b"extra"));
    s.train(
        &[],
        &[
            "data/data_batch_3.bin",
            "has 30735 bytes",
            "not a whole number of 3073-byte records",
        ],
    );
}

#[test]
fn label_byte_of_ten_or_more() {
    let s = Scratch::new();
    s.edit_batch(|b| b[3073] = 10);
    s.train(
        &[],
        &["data/data_batch_3.bin", "record 1", "label byte 10", "0-9"],
    );
}

// Bad archives: none may leave a half-unpacked dataset or a staging folder.

/// A scratch folder with `cifar-10-binary.tar.gz` and no unpacked data.
fn with_archive() -> Scratch {
    let s = Scratch::empty();
    synthetic(
        &s.path("src"),
        50,
        20,
        5,
        Some(&s.path("cifar-10-binary.tar.gz")),
    );
    std::fs::remove_dir_all(s.path("src")).unwrap();
    s
}

#[test]
fn corrupt_archive() {
    let s = with_archive();
    let bytes = std::fs::read(s.path("cifar-10-binary.tar.gz")).unwrap();
    let half = &bytes[..bytes.len() / 2];
    std::fs::write(s.path("corrupt.tar.gz"), half).unwrap();
    let md5 = md5_hex(half);
    s.train(
        &[
            "--data-dir",
            "fresh",
            "--archive",
            "corrupt.tar.gz",
            "--md5",
            &md5,
        ],
        &["corrupt.tar.gz", "corrupt or truncated"],
    );
}

#[test]
fn archive_failing_its_md5() {
    let s = with_archive();
    s.train(
        &["--data-dir", "fresh", "--archive", "cifar-10-binary.tar.gz"],
        &[
            "cifar-10-binary.tar.gz has md5",
            "expected c32a1d4ab5d03f1284b67883e8d87530",
        ],
    );
}

#[test]
fn archive_entry_escaping_the_target_directory() {
    let s = Scratch::empty();
    let evil = s.path("evil.tar.gz");
    // A tar whose entry name climbs out of the target folder.
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        std::fs::File::create(&evil).unwrap(),
        Default::default(),
    ));
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../escaped.bin\0\0");
    header.set_size(3);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, &b"abc"[..]).unwrap();
    builder.into_inner().unwrap().finish().unwrap();
    let md5 = md5_hex(&std::fs::read(&evil).unwrap());
    s.train(
        &[
            "--data-dir",
            "fresh",
            "--archive",
            "evil.tar.gz",
            "--md5",
            &md5,
        ],
        &[
            "evil.tar.gz",
            "../escaped.bin",
            "outside the data directory",
        ],
    );
    assert!(!s.path("escaped.bin").exists());
}

// Bad weights files, through `evaluate`.

fn write_weights(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut state = Model::new(Device::Cpu, Some(1)).state_dict();
    edit(&mut state);
    Tensor::write_safetensors(&state, path).unwrap();
}

#[test]
fn garbage_weights_file() {
    let s = Scratch::new();
    std::fs::write(s.path("w.safetensors"), b"not weights at all").unwrap();
    s.evaluate(
        "w.safetensors",
        &["w.safetensors", "neither a safetensors file nor a .pth"],
    );
}

#[test]
fn weights_file_with_a_missing_key() {
    let s = Scratch::new();
    write_weights(&s.path("w.safetensors"), |st| {
        st.retain(|(k, _)| k != "fc3.bias")
    });
    s.evaluate(
        "w.safetensors",
        &["w.safetensors", "missing key `fc3.bias`"],
    );
}

#[test]
fn weights_file_with_an_extra_key() {
    let s = Scratch::new();
    write_weights(&s.path("w.safetensors"), |st| {
        st.push((
            "fc4.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ))
    });
    s.evaluate(
        "w.safetensors",
        &["w.safetensors", "unexpected key `fc4.weight`"],
    );
}

#[test]
fn weights_file_with_a_wrong_shape() {
    let s = Scratch::new();
    write_weights(&s.path("w.safetensors"), |st| {
        st.retain(|(k, _)| k != "fc3.bias");
        st.push((
            "fc3.bias".into(),
            Tensor::zeros([11], (Kind::Float, Device::Cpu)),
        ));
    });
    s.evaluate(
        "w.safetensors",
        &["w.safetensors", "`fc3.bias` has shape [11]", "[10]"],
    );
}

// Output paths.

#[test]
fn output_in_a_directory_that_does_not_exist() {
    let s = Scratch::new();
    s.train(
        &["--out", "no/dir/w.safetensors"],
        &["no/dir/w.safetensors", "directory no/dir does not exist"],
    );
}

/// An output in /proc names the kernel's file system as the reason, not
/// the "No such file or directory" that creating a file there answers.
#[test]
fn output_on_a_kernel_file_system_names_it() {
    if !Path::new("/proc/self").exists() {
        eprintln!("skipped: no /proc here");
        return;
    }
    let s = Scratch::new();
    let line = s.train(
        &["--out", "/proc/x.safetensors"],
        &[
            "/proc/x.safetensors",
            "/proc is on a proc file system",
            "takes no new files",
        ],
    );
    assert!(!line.contains(".tmp"), "{line}");
}

#[test]
fn output_in_a_directory_that_cannot_be_written() {
    // Root ignores permission bits, so the parent is a regular file instead.
    let s = Scratch::new();
    std::fs::write(s.path("plain-file"), b"").unwrap();
    s.train(
        &["--out", "plain-file/w.safetensors"],
        &["plain-file/w.safetensors", "plain-file is not a directory"],
    );
}

/// A file where a folder is expected, or the other way round, says which
/// one the flag takes.
#[test]
fn a_file_for_a_folder_and_a_folder_for_a_file() {
    let s = Scratch::new();
    s.evaluate("data", &["data is a directory, not a weights file"]);
    s.train(
        &["--data-dir", "data/data_batch_1.bin"],
        &["data/data_batch_1.bin is a file: --data-dir takes the folder of batch files"],
    );
    std::fs::write(s.path("ck.safetensors"), b"").unwrap();
    s.train(
        &["--resume", "ck.safetensors"],
        &["ck.safetensors is a file: --resume takes the folder of checkpoints"],
    );
}

#[test]
fn output_that_is_a_directory() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("outdir")).unwrap();
    s.train(
        &["--out", "outdir"],
        &["cannot write outdir: that is a directory"],
    );
    s.train(
        &["--out", "new/"],
        &["cannot write new/: that is a directory"],
    );
}

/// `export` checks all its outputs before writing any of them.
#[test]
fn export_writes_nothing_when_one_output_cannot_be_written() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    s.refused(
        &[
            "export",
            "--weights",
            "w.safetensors",
            "--out",
            "m.pt",
            "--pth",
            "no/dir/w.pth",
        ],
        &[
            "cannot write no/dir/w.pth",
            "directory no/dir does not exist",
        ],
    );
}

#[test]
fn export_of_non_finite_weights() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |st| {
        let _ = st[0].1.get(0).fill_(f64::NAN);
    });
    s.refused(
        &["export", "--weights", "w.safetensors", "--out", "m.pt"],
        &["w.safetensors holds NaN or infinite weights"],
    );
}

/// `--onnx`'s refusals leave no file: a bad `--weights`, a folder that is
/// not there, `--tta` for the tutorial's Net (which has none), and the
/// ONNX-only flags without `--onnx`.
#[test]
fn export_onnx_refusals_leave_nothing_behind() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    std::fs::write(s.path("bad.safetensors"), b"not weights at all").unwrap();
    s.refused(
        &["export", "--weights", "bad.safetensors", "--onnx", "m.onnx"],
        &["bad.safetensors", "neither a safetensors file nor a .pth"],
    );
    s.refused(
        &[
            "export",
            "--weights",
            "w.safetensors",
            "--onnx",
            "no/dir/m.onnx",
        ],
        &[
            "cannot write no/dir/m.onnx",
            "directory no/dir does not exist",
        ],
    );
    s.refused(
        &[
            "export",
            "--weights",
            "w.safetensors",
            "--onnx",
            "m.onnx",
            "--tta",
            "--pth",
            "w.pth",
        ],
        &["--tta", "w.safetensors holds the tutorial's Net"],
    );
    // clap's own usage error, of several lines.
    for extra in [&["--tta"][..], &["--head", "probabilities"]] {
        let before = tree(s.dir.path());
        let out = tch_cifar()
            .args(["export", "--weights", "w.safetensors", "--pth", "w.pth"])
            .args(extra)
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        let line = fails_with(&out, &["required arguments were not provided"]);
        assert_eq!(out.status.code(), Some(2), "{line}");
        assert!(stderr(&out).contains("--onnx <FILE>"), "{}", stderr(&out));
        assert_eq!(tree(s.dir.path()), before);
    }
}

/// Each of export's flags writes one format; a file name whose extension
/// says another is refused, whatever the flag (`--out` is `--torchscript`).
#[test]
fn export_refuses_a_name_that_says_another_format() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    for (flag, file, says) in [
        ("--torchscript", "m.safetensors", "says safetensors"),
        ("--out", "m.safetensors", "says safetensors"),
        ("--torchscript", "m.pth", "says torch.save (.pth)"),
        ("--pth", "w2.safetensors", "says safetensors"),
        ("--safetensors", "w2.pth", "says torch.save (.pth)"),
        (
            "--safetensors",
            "w2.pt",
            "says torch.save (.pth) or TorchScript",
        ),
        ("--onnx", "m.pt", "says torch.save (.pth) or TorchScript"),
        ("--torchscript", "m.onnx", "says ONNX"),
    ] {
        let written = if flag == "--out" {
            "--torchscript"
        } else {
            flag
        };
        s.refused(
            &["export", "--weights", "w.safetensors", flag, file],
            &[
                &format!("{written} writes"),
                &format!("the name {file} {says}"),
            ],
        );
    }
}

/// A command never writes over a file it reads, however the path is
/// spelled or linked.
#[test]
fn no_command_overwrites_its_input() {
    let s = Scratch::new();
    write_weights(&s.path("w.safetensors"), |_| {});
    Model::new(Device::Cpu, Some(2))
        .save_pth(&s.path("w.pth"))
        .unwrap();
    std::os::unix::fs::symlink("w.pth", s.path("link.pth")).unwrap();
    std::fs::hard_link(s.path("w.pth"), s.path("hard.pth")).unwrap();
    let before = |p: &str| std::fs::read(s.path(p)).unwrap();
    let (st, pth) = (before("w.safetensors"), before("w.pth"));
    for (weights, flag, out) in [
        ("w.safetensors", "--safetensors", "w.safetensors"),
        ("w.safetensors", "--safetensors", "./data/../w.safetensors"),
        ("w.pth", "--pth", "w.pth"),
        ("link.pth", "--pth", "w.pth"),
        ("w.pth", "--pth", "hard.pth"),
        // The overwrite is refused first, whatever the extension says.
        ("w.safetensors", "--pth", "w.safetensors"),
    ] {
        s.refused(
            &["export", "--weights", weights, flag, out],
            &[
                &format!("{flag} {out} would overwrite"),
                "which this command reads (--weights)",
            ],
        );
    }
    // The data files are inputs of every command that reads them.
    s.train(
        &["--out", "data/data_batch_1.bin"],
        &[
            "--out data/data_batch_1.bin would overwrite",
            "(--data-dir)",
        ],
    );
    let (code, _) = s.refused(
        &[
            "compare-losses",
            "--device",
            "cpu",
            "--data-dir",
            "data",
            "--csv",
            "data/test_batch.bin",
        ],
        &["--csv data/test_batch.bin would overwrite"],
    );
    assert_eq!(code, Some(1));
    std::fs::copy(s.path("w.safetensors"), s.path("w.png")).unwrap();
    s.refused(
        &[
            "evaluate",
            "--device",
            "cpu",
            "--data-dir",
            "data",
            "--weights",
            "w.png",
            "--confusion",
            "w.png",
        ],
        &["--confusion w.png would overwrite"],
    );
    assert_eq!(before("w.safetensors"), st);
    assert_eq!(before("w.pth"), pth);
}

/// Two outputs of one command may not be one file.
#[test]
fn two_outputs_may_not_be_one_file() {
    let s = Scratch::new();
    write_weights(&s.path("w.safetensors"), |_| {});
    s.refused(
        &[
            "export",
            "--weights",
            "w.safetensors",
            "--torchscript",
            "same.pt",
            "--pth",
            "same.pt",
        ],
        &["--torchscript same.pt and --pth same.pt are the same file"],
    );
    // Names without a format's extension are refused the same way.
    s.refused(
        &[
            "export",
            "--weights",
            "w.safetensors",
            "--out",
            "same.bin",
            "--pth",
            "./data/../same.bin",
        ],
        &["--torchscript same.bin and --pth ./data/../same.bin are the same file"],
    );
    s.refused(
        &[
            "compare-losses",
            "--device",
            "cpu",
            "--data-dir",
            "data",
            "--csv",
            "x.png",
            "--plot",
            "x.png",
        ],
        &["--csv x.png and --plot x.png are the same file"],
    );
}

/// A name without a known extension is written in the flag's format (or,
/// for `train --out`, as safetensors), with a note.
#[test]
fn an_unknown_extension_keeps_the_default_with_a_note() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    let out = tch_cifar()
        .args(["export", "--weights", "w.safetensors", "--pth", "w.bin"])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        "note: w.bin has no extension that names a format (.pth or .pt); writing it as \
         torch.save (.pth), as --pth says"
    );
    let bytes = std::fs::read(s.path("w.bin")).unwrap();
    assert_eq!(&bytes[..4], b"PK\x03\x04", "a torch.save zip");
    Model::load(&s.path("w.bin"), Device::Cpu).unwrap();
}

// --json failures end with an error event on stdout.

/// Runs `tch-cifar ARGS` in `dir`, expects a failure, and returns the
/// error event, which must be stdout's last line, and stderr's error line.
fn json_failure(dir: &Path, args: &[&str], kind: &str) -> (serde_json::Value, String) {
    let out = tch_cifar().args(args).current_dir(dir).output().unwrap();
    let line = fails_with(&out, &[]);
    let stdout = stdout(&out);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no stdout"));
    let event: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(event["event"], "error", "{last}");
    assert_eq!(event["kind"], kind, "{last}");
    // The same message as on stderr.
    assert_eq!(
        format!("error: {}", event["message"].as_str().unwrap()),
        line
    );
    for l in stdout.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("every stdout line is JSON");
    }
    (event, line)
}

#[test]
fn json_failures_end_with_an_error_event() {
    let s = Scratch::new();
    let dir = s.dir.path();
    // A divergence: the start event, then the error.
    let (event, _) = json_failure(
        dir,
        &[
            "train",
            "--json",
            "--device",
            "cpu",
            "--data-dir",
            "data",
            "--epochs",
            "1",
            "--seed",
            "1",
            "--lr",
            "5",
        ],
        "diverged",
    );
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("training diverged"),
        "{event}"
    );
    assert!(!s.path("cifar_net.safetensors").exists());
    // A bad weights file.
    std::fs::write(s.path("bad.safetensors"), b"not weights at all").unwrap();
    let (event, _) = json_failure(
        dir,
        &[
            "evaluate",
            "--json",
            "--device",
            "cpu",
            "--data-dir",
            "data",
            "--weights",
            "bad.safetensors",
        ],
        "failed",
    );
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("bad.safetensors"),
        "{event}"
    );
    // A command line clap refuses.
    let (event, _) = json_failure(
        dir,
        &["evaluate", "--json", "--batch-size", "0", "--weights", "w"],
        "usage",
    );
    assert!(
        event["message"].as_str().unwrap().contains("--batch-size"),
        "{event}"
    );
}

#[test]
fn picture_outputs_must_be_png() {
    let s = Scratch::new();
    let (code, _) = s.refused(
        &["samples", "--data-dir", "data", "--out", "grid.jpg"],
        &[
            "grid.jpg",
            "the picture is a PNG, so the name must end in .png",
        ],
    );
    assert_eq!(code, Some(2));
}

// Flags.

/// Values past these bounds used to panic (a batch size beyond i64), hang
/// (100,000 threads) or overflow the step count (epochs near 2^64).
#[test]
fn absurd_sizes_are_refused() {
    bad_flag("--batch-size", "9223372036854775808", "is too large");
    bad_flag("--threads", "100000", "must be from 1 to 1024");
    bad_flag(
        "--epochs",
        "18446744073709551615",
        "must be from 1 to 1000000",
    );
}

/// A range error says the range as a person writes it ("at least 1"),
/// never a type's raw limits (`1..=9223372036854775807`), in every
/// subcommand.
#[test]
fn range_errors_say_the_range_in_words() {
    let cases: [&[&str]; 6] = [
        &["train", "--batch-size", "0"],
        &["train", "--log-every", "0"],
        &[
            "evaluate",
            "--weights",
            "w.safetensors",
            "--batch-size",
            "0",
        ],
        &[
            "predict",
            "--weights",
            "w.safetensors",
            "--top-k",
            "0",
            "a.png",
        ],
        &["compare-losses", "--max-steps", "0"],
        &["samples", "--count", "0"],
    ];
    for args in cases {
        let line = fails_with(&run(args), &["'0'"]);
        assert!(!line.contains("..="), "{args:?}: {line}");
        assert!(
            line.contains("must be at least 1") || line.contains("must be from 1 to "),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn cuda_device_that_does_not_exist() {
    if cuda_device_exists(7) {
        return;
    }
    let s = Scratch::new();
    s.train(&["--device", "cuda:7"], &["--device cuda:7"]);
    s.evaluate_on_device("cuda:7");
    if !cuda_device_exists(0) {
        // No GPU at all: plain `cuda` is refused too, never a silent CPU run.
        // Where libtorch has CUDA support, the message says the GPU is what
        // is missing: libtorch_cuda.so was found, loaded and hooked in.
        // The libtorch of the build: .cargo/config.toml's, unless the
        // environment set LIBTORCH to another.
        let libtorch =
            option_env!("LIBTORCH").map_or_else(|| repo_path(".libtorch"), PathBuf::from);
        let why = if libtorch.join("lib/libtorch_cuda.so").exists() {
            "CUDA is not available here (no NVIDIA GPU or driver found)"
        } else {
            "this libtorch cannot use CUDA"
        };
        s.train(&["--device", "cuda"], &["--device cuda:0: ", why]);
    }
}

impl Scratch {
    fn evaluate_on_device(&self, device: &str) {
        let weights = self.path("w.safetensors");
        Model::new(Device::Cpu, Some(1)).save(&weights).unwrap();
        let (code, _) = self.refused(
            &[
                "evaluate",
                "--device",
                device,
                "--data-dir",
                "data",
                "--weights",
                "w.safetensors",
            ],
            &[&format!("--device {device}")],
        );
        assert_eq!(code, Some(1));
    }
}

/// A flag value clap refuses: usage error, status 2, naming flag and value.
fn bad_flag(flag: &str, value: &str, reason: &str) {
    let s = Scratch::new();
    let (code, line) = s.refused(
        &["train", "--data-dir", "data", flag, value],
        &[flag, &format!("'{value}'"), reason],
    );
    assert_eq!(code, Some(2), "{line}");
}

#[test]
fn batch_size_zero() {
    bad_flag("--batch-size", "0", "must be at least 1");
}

#[test]
fn epochs_zero() {
    bad_flag("--epochs", "0", "must be from 1 to 1000000");
}

#[test]
fn negative_learning_rate() {
    bad_flag("--lr", "-1", "not a finite, non-negative number");
}

#[test]
fn non_finite_learning_rate() {
    bad_flag("--lr", "nan", "not a finite, non-negative number");
    bad_flag("--lr", "inf", "not a finite, non-negative number");
}

/// Past float32's range, the rate would turn the first update into infinity.
#[test]
fn learning_rate_beyond_float32() {
    bad_flag("--lr", "1e39", "too large: the weights are float32");
    bad_flag("--momentum", "4e38", "too large: the weights are float32");
}

/// The line of a file that cannot be classified names it once: at its
/// start, not again in the reason.
#[test]
fn predict_names_a_bad_file_once_in_its_line() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    std::fs::write(s.path("photo.jpg"), b"\xff\xd8\xff\xe0 not really a JPEG").unwrap();
    let args = ["predict", "--device", "cpu", "--weights", "w.safetensors"];
    for file in ["photo.jpg", "missing.png"] {
        let out = tch_cifar()
            .args(args)
            .arg(file)
            .current_dir(s.path(""))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let text = stdout(&out);
        let line = text.lines().next().unwrap_or_default();
        assert!(
            line.starts_with(&format!("{file}: not classified: ")),
            "{line}"
        );
        assert_eq!(line.matches(file).count(), 1, "{line}");
    }
}

/// `torch.save(net)` pickles the whole module, class and all; the error
/// says to save `net.state_dict()` instead.
#[test]
fn a_pickled_module_gets_the_state_dict_hint() {
    let s = Scratch::empty();
    let script = "import sys, torch, torch.nn as nn\n\
                  class Net(nn.Module):\n\
                  \x20   def __init__(self):\n\
                  \x20       super().__init__()\n\
                  \x20       self.fc = nn.Linear(4, 2)\n\
                  torch.save(Net(), sys.argv[1])";
    let made = std::process::Command::new(python())
        .args(["-c", script])
        .arg(s.path("net.pth"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    s.refused(
        &[
            "predict",
            "--device",
            "cpu",
            "--weights",
            "net.pth",
            "a.png",
        ],
        &["net.pth", "torch.save(net)", "net.state_dict()"],
    );
}

/// `--top-k` above the weights' classes shows them all, and says so.
#[test]
fn predict_notes_a_top_k_above_the_classes() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    // A 2x2 binary PPM, which predict reads like any image.
    let mut ppm = b"P6\n2 2\n255\n".to_vec();
    ppm.extend((0..12u8).map(|i| i * 20));
    std::fs::write(s.path("tiny.ppm"), ppm).unwrap();
    let predict = |top_k: &[&str]| {
        let out = tch_cifar()
            .args(["predict", "--device", "cpu", "--weights", "w.safetensors"])
            .args(top_k)
            .arg("tiny.ppm")
            .current_dir(s.path(""))
            .output()
            .unwrap();
        (ok(&out), stderr(&out))
    };
    let (text, err) = predict(&["--top-k", "11"]);
    assert_eq!(text.lines().count(), 1 + 10, "{text}");
    assert!(
        err.contains("note: --top-k 11 is more than the 10 classes of w.safetensors"),
        "{err}"
    );
    // Within the classes, and by default, no note.
    for top_k in [&["--top-k", "10"][..], &[]] {
        let (text, err) = predict(top_k);
        assert!(!err.contains("note:"), "{top_k:?}: {err}");
        assert_eq!(
            text.lines().count(),
            1 + top_k.get(1).map_or(3, |k| k.parse().unwrap())
        );
    }
}

#[test]
fn predict_an_image_that_cannot_be_decoded() {
    let s = Scratch::empty();
    write_weights(&s.path("w.safetensors"), |_| {});
    std::fs::write(s.path("photo.jpg"), b"\xff\xd8\xff\xe0 not really a JPEG").unwrap();
    s.refused(
        &[
            "predict",
            "--device",
            "cpu",
            "--weights",
            "w.safetensors",
            "photo.jpg",
        ],
        &["photo.jpg"],
    );
}
