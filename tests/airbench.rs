//! End-to-end tests of `train --model airbench94` on small synthetic data:
//! its loss falls, its summary has both accuracies, a resumed run ends
//! bit-identical to an uninterrupted one with the same seed, and the
//! tutorial's flags are refused.

mod util;

use util::*;

#[test]
fn trains_resumes_bit_identically_and_reports_both_accuracies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 1024 training images: one step of 1024 per epoch.
    synthetic(&data, 1024, 100, 3, None);
    let data = s(&data);
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            "airbench94",
            "--data-dir",
            data,
            "--device",
            "cpu",
            "--seed",
            "5",
            "--epochs",
            "3",
            "--json",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        events(&ok(&run(&args)))
    };
    let whole = dir.path().join("whole.safetensors");
    let all = train(s(&whole), &[]);

    let epochs = of_kind(&all, "epoch");
    assert_eq!(epochs.len(), 3, "{all:?}");
    let losses: Vec<f64> = epochs
        .iter()
        .map(|e| e["train_loss"].as_f64().unwrap())
        .collect();
    assert!(losses[2] < losses[0], "the loss did not fall: {losses:?}");
    let summary = of_kind(&all, "summary")[0];
    assert_eq!(summary["model"], "airbench94");
    assert_eq!(summary["steps"], 3);
    let tta = summary["tta_accuracy"].as_f64().unwrap();
    let plain = summary["plain_accuracy"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&tta) && (0.0..=100.0).contains(&plain));
    // The reported accuracy is the test-time-augmented one.
    assert_eq!(summary["accuracy"].as_f64().unwrap(), tta);

    // Stopped after 2 steps with a checkpoint, then resumed to the end.
    let checkpoints = dir.path().join("checkpoints");
    let parts = dir.path().join("parts.safetensors");
    train(
        s(&parts),
        &["--max-steps", "2", "--checkpoint-dir", s(&checkpoints)],
    );
    let out = ok(&run(&[
        "train",
        "--resume",
        s(&checkpoints),
        "--max-steps",
        "3",
        "--json",
    ]));
    let resumed = events(&out);
    assert_eq!(of_kind(&resumed, "summary")[0]["steps"], 3);
    let bytes = |p: &std::path::Path| md5_hex(&std::fs::read(p).unwrap());
    assert_eq!(
        bytes(&whole),
        bytes(&parts),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

#[test]
fn the_tutorials_flags_are_refused() {
    for flag in [["--lr", "0.1"], ["--batch-size", "8"], ["--log-every", "5"]] {
        let out = run(&["train", "--model", "airbench94", flag[0], flag[1]]);
        fails_cleanly(
            &out,
            &[flag[0], "airbench94 has its own fixed hyperparameters"],
        );
    }
}
