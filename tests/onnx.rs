//! `export --onnx` end to end: each network, trained briefly on synthetic
//! data, exported as ONNX and run by onnxruntime (`scripts/onnx-check.py`):
//! `onnx.checker`'s full check passes; the logits are the Rust network's
//! on 500 images, a batch of 1 and a batch of 37 at a time through one
//! file; `--head probabilities` sums to 1 with the same argmax; `--tta`
//! gives `evaluate`'s test-time augmented logits; the metadata names the
//! classes and the network; a `.pth` and a checkpoint of the same network
//! export too; and the test-set accuracy onnxruntime gives is `evaluate`'s.
//!
//! The `onnx` and `onnxruntime` packages are installed into the venv with
//! its pip when missing; where that fails, the tests say why and skip.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};
use tch_cifar::data::normalize::renormalize;
use tch_cifar::nets::classifier::Classifier;
use tch_cifar::util::rng::with_torch_rng;
use util::*;

/// The versions these tests were written against.
const PACKAGES: [&str; 2] = ["onnx==1.23.2", "onnxruntime==1.32.0"];

/// Largest absolute difference allowed between onnxruntime's and libtorch's outputs.
const TOLERANCE: f64 = 1e-4;

/// The venv's Python once it can import `onnx` and `onnxruntime`
/// (installed with its pip if missing), or why it cannot.
fn onnx_python() -> Result<PathBuf, String> {
    static READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let py = python();
            let imports = || {
                Command::new(&py)
                    .args(["-c", "import onnx, onnxruntime, safetensors.numpy"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            if imports() {
                return Ok(py);
            }
            let install = Command::new(&py)
                .args(["-m", "pip", "install", "--quiet"])
                .args(PACKAGES)
                .output()
                .map_err(|e| format!("cannot run {} -m pip: {e}", py.display()))?;
            if imports() {
                Ok(py)
            } else {
                Err(format!(
                    "onnx or onnxruntime is missing and `pip install {}` failed: {}",
                    PACKAGES.join(" "),
                    String::from_utf8_lossy(&install.stderr).trim()
                ))
            }
        })
        .clone()
}

/// The onnx-enabled Python, or `None` after printing why the test skips.
fn python_or_skip(test: &str) -> Option<PathBuf> {
    match onnx_python() {
        Ok(py) => Some(py),
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

/// `scripts/onnx-check.py ARGS`'s stdout.
fn check_script(py: &Path, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg(repo_path("scripts/onnx-check.py"))
        .args(args)
        .output()
        .expect("run onnx-check.py");
    assert!(
        out.status.success(),
        "onnx-check.py {args:?}: {}",
        stderr(&out)
    );
    stdout(&out)
}

/// What `onnx-check.py info` says of `model`, after `onnx.checker`'s full check.
fn info(py: &Path, model: &Path) -> Value {
    serde_json::from_str(&check_script(py, &["info", s(model)])).unwrap()
}

/// onnxruntime's output of `model` on `x`, `batch` images at a time.
fn onnxruntime(py: &Path, model: &Path, x: &Tensor, batch: usize) -> Tensor {
    let dir = model.parent().unwrap();
    let (input, output) = (dir.join("x.safetensors"), dir.join("y.safetensors"));
    Tensor::write_safetensors(&[("input", x)], &input).unwrap();
    let batch = batch.to_string();
    check_script(
        py,
        &[
            "run",
            s(model),
            "--input",
            s(&input),
            "--out",
            s(&output),
            "--batch-size",
            &batch,
        ],
    );
    let mut tensors = Tensor::read_safetensors(&output).unwrap();
    assert_eq!(tensors.len(), 1);
    tensors.remove(0).1
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// `export --weights WEIGHTS --onnx OUT EXTRA…`.
fn export(weights: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["export", "--weights", s(weights), "--onnx", s(out)];
    args.extend_from_slice(extra);
    let printed = ok(&run(&args));
    assert!(printed.contains("ONNX opset 17"), "{printed}");
}

/// `evaluate --json EXTRA…`'s count of right answers.
fn evaluate_correct(data: &Path, weights: &Path, extra: &[&str]) -> i64 {
    let mut args = evaluate_args(s(data), s(weights)).to_vec();
    args.push("--json");
    args.extend_from_slice(extra);
    let summary = events(&ok(&run(&args))).pop().unwrap();
    summary["correct"].as_i64().unwrap()
}

/// onnxruntime's count of right answers on `data`'s test batch.
fn onnxruntime_correct(py: &Path, model: &Path, data: &Path) -> i64 {
    let out = check_script(
        py,
        &[
            "accuracy",
            s(model),
            "--data-dir",
            s(data),
            "--batch-size",
            "37",
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["correct"].as_i64().unwrap()
}

/// The one checkpoint file in `dir`.
fn only_checkpoint(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

/// Trains `model` for one epoch on `train_images` synthetic images, exports
/// it and checks everything the module's doc lists.
fn exports_and_runs(test: &str, model: &str, train_images: usize) {
    let Some(py) = python_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let data = path("data");
    synthetic(&data, train_images, 100, 7, None);
    let weights = path("w.safetensors");
    ok(&run(&[
        "train",
        "--model",
        model,
        "--data-dir",
        s(&data),
        "--device",
        "cpu",
        "--seed",
        "3",
        "--epochs",
        "1",
        "--checkpoint-dir",
        s(&path("checkpoints")),
        "--out",
        s(&weights),
    ]));
    let classifier = Classifier::load(&weights, Device::Cpu).unwrap();
    let airbench = !classifier.network().is_net();
    assert_eq!(classifier.network().name(), model);

    // 500 images in [-1, 1], as the commands hold them; the graph takes
    // what the TorchScript module takes.
    let images = with_torch_rng(Some(1), || {
        Tensor::rand([500, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
    });
    let input = if airbench {
        renormalize(&images)
    } else {
        images.shallow_clone()
    };
    let logits = tch::no_grad(|| classifier.forward(false).forward(&images));

    let logits_onnx = path("logits.onnx");
    export(&weights, &logits_onnx, &[]);
    let about = info(&py, &logits_onnx);
    assert_eq!(about["producer_name"], "tch-cifar");
    assert_eq!(about["producer_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(about["opset"][""], 17);
    let meta = &about["metadata"];
    let classes: Vec<String> = serde_json::from_str(meta["classes"].as_str().unwrap()).unwrap();
    assert_eq!(classes, classifier.classes());
    assert_eq!(meta["network"], model);
    assert_eq!(meta["output"], "logits");
    assert_eq!(meta["tta"], "false");
    let (mean, std) = if airbench {
        ("[0.4914, 0.4822, 0.4465]", "[0.247, 0.2435, 0.2616]")
    } else {
        ("[0.5, 0.5, 0.5]", "[0.5, 0.5, 0.5]")
    };
    assert_eq!(
        (meta["input_mean"].as_str(), meta["input_std"].as_str()),
        (Some(mean), Some(std))
    );
    let doc = about["doc_string"].as_str().unwrap();
    let normalized = if airbench {
        "mean (0.4914, "
    } else {
        "[-1, 1]"
    };
    assert!(
        doc.contains("input") && doc.contains("[N, 3, 32, 32]") && doc.contains(normalized),
        "{doc}"
    );
    assert_eq!(
        about["inputs"],
        serde_json::json!([{"name": "input", "shape": ["N", 3, 32, 32]}])
    );
    assert_eq!(
        about["outputs"],
        serde_json::json!([{"name": "logits", "shape": ["N", classes.len()]}])
    );
    // Every weight, by its state_dict key (BatchNorm's step counter aside).
    let initializers: Vec<&str> = about["initializers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let state = match &classifier {
        Classifier::Net(m) => m.state_dict(),
        Classifier::Airbench94(a) => a.net.state_dict(),
    };
    for (key, _) in &state {
        assert_eq!(
            initializers.contains(&key.as_str()),
            !key.ends_with("num_batches_tracked"),
            "{key} in {initializers:?}"
        );
    }

    for batch in [1, 37] {
        let got = onnxruntime(&py, &logits_onnx, &input, batch);
        let diff = max_abs_diff(&got, &logits);
        eprintln!("{model}: logits, batch {batch}: within {diff}");
        assert!(diff <= TOLERANCE, "batch {batch}: differs by {diff}");
    }

    let probabilities_onnx = path("probabilities.onnx");
    export(&weights, &probabilities_onnx, &["--head", "probabilities"]);
    let about = info(&py, &probabilities_onnx);
    assert_eq!(about["outputs"][0]["name"], "probabilities");
    assert_eq!(about["metadata"]["output"], "probabilities");
    let p = onnxruntime(&py, &probabilities_onnx, &input, 37);
    let sums = p.sum_dim_intlist(1, false, Kind::Float);
    let off = (sums - 1.0).abs().max().double_value(&[]);
    assert!(off <= 1e-5, "the probabilities sum to 1 ± {off}");
    assert!(p.argmax(1, false).equal(&logits.argmax(1, false)));

    if airbench {
        let tta_onnx = path("tta.onnx");
        export(&weights, &tta_onnx, &["--tta"]);
        assert_eq!(info(&py, &tta_onnx)["metadata"]["tta"], "true");
        let want = tch::no_grad(|| classifier.forward(true).forward(&images));
        let views = max_abs_diff(&want, &logits);
        assert!(
            views > 100.0 * TOLERANCE,
            "the views change the logits by {views} only"
        );
        for batch in [1, 37] {
            let got = onnxruntime(&py, &tta_onnx, &input, batch);
            let diff = max_abs_diff(&got, &want);
            eprintln!("{model}: tta logits, batch {batch}: within {diff}");
            assert!(diff <= TOLERANCE, "tta, batch {batch}: differs by {diff}");
        }
        assert_eq!(
            onnxruntime_correct(&py, &tta_onnx, &data),
            evaluate_correct(&data, &weights, &["--tta"])
        );
        assert_eq!(
            onnxruntime_correct(&py, &logits_onnx, &data),
            evaluate_correct(&data, &weights, &["--no-tta"])
        );
    } else {
        assert_eq!(
            onnxruntime_correct(&py, &logits_onnx, &data),
            evaluate_correct(&data, &weights, &[])
        );
    }

    // The same weights as a .pth give the same file, byte for byte.
    let pth = path("w.pth");
    ok(&run(&[
        "export",
        "--weights",
        s(&weights),
        "--pth",
        s(&pth),
    ]));
    let from_pth = path("from_pth.onnx");
    export(&pth, &from_pth, &[]);
    assert!(std::fs::read(&from_pth).unwrap() == std::fs::read(&logits_onnx).unwrap());

    // A training checkpoint exports its network.
    let checkpoint = only_checkpoint(&path("checkpoints"));
    let from_checkpoint = path("checkpoint.onnx");
    export(&checkpoint, &from_checkpoint, &[]);
    let restored = Classifier::load(&checkpoint, Device::Cpu).unwrap();
    let want = tch::no_grad(|| restored.forward(false).forward(&images));
    let got = onnxruntime(&py, &from_checkpoint, &input, 37);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= TOLERANCE, "from the checkpoint: differs by {diff}");
}

#[test]
fn the_tutorials_net_runs_in_onnxruntime() {
    // 50 steps of 4.
    exports_and_runs("the_tutorials_net_runs_in_onnxruntime", "net", 200);
}

#[test]
fn airbench94_runs_in_onnxruntime() {
    // One step of 1024.
    exports_and_runs("airbench94_runs_in_onnxruntime", "airbench94", 1024);
}

#[test]
fn airbench94_muon_runs_in_onnxruntime() {
    // One step of 2000.
    exports_and_runs(
        "airbench94_muon_runs_in_onnxruntime",
        "airbench94-muon",
        2000,
    );
}
