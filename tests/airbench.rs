//! End-to-end tests of `train --model airbench94` and `--model
//! airbench94-muon` on small synthetic data: the loss falls, the summary
//! has both accuracies, a resumed run ends bit-identical to an
//! uninterrupted one with the same seed (in float32 and in bfloat16
//! autocast), and the tutorial's flags and precisions a device cannot run
//! are refused.

mod util;

use util::*;

#[test]
fn trains_resumes_bit_identically_and_reports_both_accuracies() {
    // 1024 training images: one step of 1024 per epoch.
    trains_and_resumes("airbench94", 1024, 3, "fp32");
}

/// Four steps: the whitening bias trains for the first three (3 epochs).
#[test]
fn the_muon_recipe_trains_and_resumes_bit_identically() {
    trains_and_resumes("airbench94-muon", 2000, 4, "fp32");
}

/// In bfloat16 autocast (native on CPUs with AVX512-BF16 or AMX, emulated
/// elsewhere): the loss falls, the evaluation runs in bf16 too, and the
/// resume, which adopts the checkpoint's precision, is bit-identical.
#[test]
fn bf16_trains_evaluates_and_resumes_bit_identically() {
    trains_and_resumes("airbench94-muon", 2000, 4, "bf16");
    trains_and_resumes("airbench94", 1024, 3, "bf16");
}

/// `model` trains `epochs` one-step epochs on `images` images in
/// `precision`, then again stopped one step short with a checkpoint and
/// resumed (the precision from the checkpoint): the same weights.
fn trains_and_resumes(model: &str, images: usize, epochs: u64, precision: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, images, 100, 3, None);
    let data = s(&data);
    let epochs_text = epochs.to_string();
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model,
            "--data-dir",
            data,
            "--device",
            "cpu",
            "--seed",
            "5",
            "--epochs",
            &epochs_text,
            "--json",
            "--precision",
            precision,
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        events(&ok(&run(&args)))
    };
    let whole = dir.path().join("whole.safetensors");
    let all = train(s(&whole), &[]);

    let lines = of_kind(&all, "epoch");
    assert_eq!(lines.len() as u64, epochs, "{all:?}");
    let losses: Vec<f64> = lines
        .iter()
        .map(|e| e["train_loss"].as_f64().unwrap())
        .collect();
    assert!(
        losses[epochs as usize - 1] < losses[0],
        "the loss did not fall: {losses:?}"
    );
    let summary = of_kind(&all, "summary")[0];
    assert_eq!(summary["model"], model);
    assert_eq!(summary["precision"], precision);
    assert_eq!(summary["steps"], epochs);
    let tta = summary["tta_accuracy"].as_f64().unwrap();
    let plain = summary["plain_accuracy"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&tta) && (0.0..=100.0).contains(&plain));
    // The reported accuracy is the test-time-augmented one.
    assert_eq!(summary["accuracy"].as_f64().unwrap(), tta);

    // Stopped a step short with a checkpoint, then resumed to the end.
    let checkpoints = dir.path().join("checkpoints");
    let parts = dir.path().join("parts.safetensors");
    let short = (epochs - 1).to_string();
    train(
        s(&parts),
        &["--max-steps", &short, "--checkpoint-dir", s(&checkpoints)],
    );
    let out = ok(&run(&[
        "train",
        "--resume",
        s(&checkpoints),
        "--max-steps",
        &epochs_text,
        "--json",
    ]));
    let resumed = events(&out);
    assert_eq!(of_kind(&resumed, "start")[0]["precision"], precision);
    assert_eq!(of_kind(&resumed, "summary")[0]["steps"], epochs);
    // The evaluation ran in the training's precision: the same accuracies.
    for key in ["tta_accuracy", "plain_accuracy"] {
        assert_eq!(of_kind(&resumed, "summary")[0][key], summary[key], "{key}");
    }
    let bytes = |p: &std::path::Path| md5_hex(&std::fs::read(p).unwrap());
    assert_eq!(
        bytes(&whole),
        bytes(&parts),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

#[test]
fn the_tutorials_flags_are_refused() {
    for model in ["airbench94", "airbench94-muon"] {
        for flag in [["--lr", "0.1"], ["--batch-size", "8"], ["--log-every", "5"]] {
            let out = run(&["train", "--model", model, flag[0], flag[1]]);
            let message = format!("{model} has its own fixed hyperparameters");
            fails_cleanly(&out, &[flag[0], &message]);
        }
    }
}

#[test]
fn precisions_are_refused_where_they_cannot_run() {
    let out = run(&[
        "train",
        "--model",
        "airbench94",
        "--device",
        "cpu",
        "--precision",
        "fp16",
    ]);
    fails_cleanly(&out, &["--precision fp16 runs on CUDA only", "use bf16"]);
    let out = run(&["train", "--precision", "bf16"]);
    fails_cleanly(
        &out,
        &[
            "--precision bf16 applies to the fast recipes",
            "Net trains in fp32",
        ],
    );
}

#[test]
fn a_resume_refuses_another_precision() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 1024, 100, 3, None);
    let checkpoints = dir.path().join("checkpoints");
    let out = dir.path().join("w.safetensors");
    ok(&run(&[
        "train",
        "--model",
        "airbench94",
        "--data-dir",
        s(&data),
        "--device",
        "cpu",
        "--seed",
        "5",
        "--precision",
        "bf16",
        "--max-steps",
        "1",
        "--checkpoint-dir",
        s(&checkpoints),
        "--out",
        s(&out),
    ]));
    let again = run(&["train", "--resume", s(&checkpoints), "--precision", "fp32"]);
    fails_cleanly(
        &again,
        &["it was saved with --precision bf16, this run has --precision fp32"],
    );
}
