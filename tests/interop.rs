//! Round trips with PyTorch: TorchScript export, state_dicts in both
//! directions (`.pth` and safetensors), equal accuracy in both languages,
//! and `predict`, `samples`, `evaluate --confusion` on generated files. The
//! Python side is `scripts/interop.py`, run with the project's venv.

mod util;

use std::path::{Path, PathBuf};

use tch::nn::Module;
use tch::{Device, Kind, Tensor};
use tch_cifar::nets::classifier::Classifier;
use tch_cifar::nets::tutorial::Model;
use tch_cifar::util::rng::with_torch_rng;
use util::*;

/// Runs `scripts/interop.py ARGS` and returns its stdout.
fn py(args: &[&str]) -> String {
    script("interop.py", args)
}

/// Runs `scripts/NAME ARGS` with the venv's Python and returns its stdout.
fn script(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .arg(repo_path(&format!("scripts/{name}")))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}",
        stderr(&out)
    );
    stdout(&out)
}

/// Runs a Python snippet (with torch imported) and asserts success.
fn py_code(code: &str) {
    let out = std::process::Command::new(python())
        .args(["-c", &format!("import torch\n{code}")])
        .output()
        .expect("run python");
    assert!(out.status.success(), "{code}\n{}", stderr(&out));
}

fn write_input(path: &Path, x: &Tensor) {
    Tensor::write_safetensors(&[("input", x)], path).unwrap();
}

fn read_output(path: &Path) -> Tensor {
    let mut tensors = Tensor::read_safetensors(path).unwrap();
    assert_eq!(tensors.len(), 1);
    tensors.remove(0).1
}

/// interop.py's `logits` (`--weights`, a state_dict) or `run-script`
/// (`--model`, TorchScript) on the batch in `input`; its output goes to
/// `y.safetensors` beside it and is returned.
fn python_forward(command: &str, file: &Path, input: &Path) -> Tensor {
    let flag = match command {
        "logits" => "--weights",
        "run-script" => "--model",
        other => panic!("interop.py has no forward command `{other}`"),
    };
    let out = input.with_file_name("y.safetensors");
    py(&[
        command,
        flag,
        s(file),
        "--input",
        s(input),
        "--out",
        s(&out),
    ]);
    read_output(&out)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn rust_logits(weights: &Path, x: &Tensor) -> Tensor {
    let model = Model::load(weights, Device::Cpu).unwrap();
    tch::no_grad(|| model.net.forward(x))
}

/// A normalized-looking random batch.
fn batch(n: i64, seed: u64) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    with_torch_rng(Some(seed), || Tensor::rand([n, 3, 32, 32], opts)) * 2.0 - 1.0
}

#[test]
fn exported_torchscript_gives_rust_outputs_in_python_and_in_tch() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    Model::new(Device::Cpu, Some(21))
        .save(&p("w.safetensors"))
        .unwrap();
    ok(&run(&[
        "export",
        "--weights",
        s(&p("w.safetensors")),
        "--torchscript",
        s(&p("logits.pt")),
    ]));
    // `--out` is the old name of `--torchscript`.
    ok(&run(&[
        "export",
        "--weights",
        s(&p("w.safetensors")),
        "--out",
        s(&p("probs.pt")),
        "--head",
        "probabilities",
    ]));
    let x = batch(7, 1);
    write_input(&p("x.safetensors"), &x);
    let logits = rust_logits(&p("w.safetensors"), &x);
    let probs = logits.softmax(1, Kind::Float);

    for (module, want) in [("logits.pt", &logits), ("probs.pt", &probs)] {
        // The same ops on the same libtorch: the same bits.
        let python = python_forward("run-script", &p(module), &p("x.safetensors"));
        assert!(
            python.equal(want),
            "{module} in Python differs by {}",
            max_abs_diff(&python, want)
        );
        let tch_module = tch::CModule::load(p(module)).unwrap();
        let reloaded = tch_module.forward_ts(&[&x]).unwrap();
        assert!(
            reloaded.equal(want),
            "{module} via CModule::load differs by {}",
            max_abs_diff(&reloaded, want)
        );
        if module == "probs.pt" {
            let row_sums = python.sum_dim_intlist(1, false, Kind::Float);
            let off = (row_sums - 1.0).abs().max().double_value(&[]);
            assert!(off < 1e-5, "probabilities sum to 1 within {off}");
        }

        // The weights are the module's parameters, keyed like the
        // tutorial's Net: its state_dict loads into Net and gives the
        // logits bit for bit, and they convert to float64 and train.
        let y = p("net.safetensors");
        let info = py(&[
            "script-info",
            "--model",
            s(&p(module)),
            "--input",
            s(&p("x.safetensors")),
            "--out",
            s(&y),
        ]);
        let info: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
        let want_params: Vec<serde_json::Value> = tch_cifar::nets::tutorial::PARAMETERS
            .iter()
            .map(|(name, shape)| serde_json::json!([name, shape, true]))
            .collect();
        assert_eq!(
            info["parameters"],
            serde_json::json!(want_params),
            "{module}"
        );
        let keys: Vec<&str> = tch_cifar::nets::tutorial::PARAMETERS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(info["state_dict"], serde_json::json!(keys), "{module}");
        let net = read_output(&y);
        assert!(
            net.equal(&logits),
            "{module}: Net with its state_dict differs by {}",
            max_abs_diff(&net, &logits)
        );
        assert_eq!(info["float64_dtype"], "torch.float64", "{module}");
        let wide = info["float64_max_diff"].as_f64().unwrap();
        assert!(wide < 1e-5, "{module}: float64 differs by {wide}");
        assert_eq!(
            info["sgd_step_changed"],
            serde_json::json!(vec![true; 10]),
            "{module}"
        );
    }
}

#[test]
fn python_state_dicts_load_in_rust_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    py(&[
        "init",
        "--seed",
        "5",
        "--pth",
        s(&p("py.pth")),
        "--pth-no-crc",
        s(&p("py-no-crc.pth")),
        "--safetensors",
        s(&p("py.safetensors")),
    ]);
    let x = batch(5, 2);
    write_input(&p("x.safetensors"), &x);
    for weights in ["py.pth", "py.safetensors"] {
        let python = python_forward("logits", &p(weights), &p("x.safetensors"));
        let diff = max_abs_diff(&python, &rust_logits(&p(weights), &x));
        assert!(
            diff <= 1e-5,
            "{weights}: Rust differs from Python by {diff}"
        );
    }
    // The two files hold the same weights, and they are bit for bit those
    // of Rust's Net under the same seed.
    let a = Model::load(&p("py.pth"), Device::Cpu).unwrap().state_dict();
    let b = Model::load(&p("py.safetensors"), Device::Cpu)
        .unwrap()
        .state_dict();
    let rust = Model::new(Device::Cpu, Some(5)).state_dict();
    // Saved with set_crc32_options(False), whose CRCs are all 0.
    let no_crc = Model::load(&p("py-no-crc.pth"), Device::Cpu)
        .unwrap()
        .state_dict();
    for ((((k, ta), (_, tb)), (_, tr)), (_, tn)) in a.iter().zip(&b).zip(&rust).zip(&no_crc) {
        assert!(ta.equal(tb), "{k}");
        assert!(ta.equal(tn), "{k} differs when saved without CRCs");
        assert!(
            ta.equal(tr),
            "{k}: Python's seed-5 init differs from Rust's"
        );
    }
}

#[test]
fn rust_weights_load_in_pythons_net_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let model = Model::new(Device::Cpu, Some(9));
    model.save(&p("rust.safetensors")).unwrap();
    model.save_pth(&p("lib.pth")).unwrap();
    // The command-line route: safetensors -> .pth.
    ok(&run(&[
        "export",
        "--weights",
        s(&p("rust.safetensors")),
        "--pth",
        s(&p("cli.pth")),
    ]));
    let x = batch(4, 3);
    write_input(&p("x.safetensors"), &x);
    let want = tch::no_grad(|| model.net.forward(&x));
    // `logits` loads .pth files with the tutorial's
    // net.load_state_dict(torch.load(PATH, weights_only=True)).
    for weights in ["rust.safetensors", "lib.pth", "cli.pth"] {
        let python = python_forward("logits", &p(weights), &p("x.safetensors"));
        let diff = max_abs_diff(&python, &want);
        assert!(
            diff <= 1e-5,
            "{weights}: Python differs from Rust by {diff}"
        );
    }
    // And back: the .pth converts to safetensors with the same weights.
    ok(&run(&[
        "export",
        "--weights",
        s(&p("cli.pth")),
        "--safetensors",
        s(&p("back.safetensors")),
    ]));
    let back = Model::load(&p("back.safetensors"), Device::Cpu).unwrap();
    for ((k, a), (_, b)) in model.state_dict().iter().zip(&back.state_dict()) {
        assert!(a.equal(b), "{k} changed on the way through .pth");
    }
}

#[test]
fn seeded_init_is_bit_identical_to_pytorchs() {
    // python_state_dicts_load_in_rust_with_the_same_logits checks seed 5 too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("init.safetensors");
    py(&["init", "--seed", "1234", "--safetensors", s(&path)]);
    let python = Model::load(&path, Device::Cpu).unwrap().state_dict();
    let rust = Model::new(Device::Cpu, Some(1234)).state_dict();
    for ((k, a), (_, b)) in rust.iter().zip(&python) {
        assert!(
            a.equal(b),
            "{k} differs from torch.manual_seed(1234); Net()"
        );
    }
}

/// `evaluate --json` on `weights`: (correct, total).
fn rust_accuracy(data: &Path, weights: &Path) -> (i64, i64) {
    let out = ok(&run(&[
        "evaluate",
        "--json",
        "--device",
        "cpu",
        "--weights",
        s(weights),
        "--data-dir",
        s(data),
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (v["correct"].as_i64().unwrap(), v["total"].as_i64().unwrap())
}

fn python_accuracy(data: &Path, flag: &str, file: &Path) -> (i64, i64) {
    let out = py(&["accuracy", "--json", "--data-dir", s(data), flag, s(file)]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (v["correct"].as_i64().unwrap(), v["total"].as_i64().unwrap())
}

#[test]
fn trained_models_score_the_same_in_python_and_rust() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    synthetic(&data, 400, 200, 11, None);

    // Python tutorial -> cifar_net.pth -> Rust evaluate.
    let log = script(
        "pytorch_tutorial.py",
        &[
            "--data-dir",
            s(&data),
            "--save",
            s(&p("cifar_net.pth")),
            "--seed",
            "1",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--lr",
            "0.01",
        ],
    );
    assert!(log.contains("Finished Training"), "{log}");
    let python = python_accuracy(&data, "--weights", &p("cifar_net.pth"));
    let rust = rust_accuracy(&data, &p("cifar_net.pth"));
    assert_eq!(
        rust, python,
        "cifar_net.pth: Rust vs Python (correct, total)"
    );
    assert_eq!(rust.1, 200);
    assert!(rust.0 > 40, "the Python model learned something: {rust:?}");

    // Rust train -> rust.pth (torch.save, as the name says) -> the
    // tutorial's torch.load(PATH, weights_only=True) in Python.
    ok(&run(&[
        "train",
        "--device",
        "cpu",
        "--data-dir",
        s(&data),
        "--out",
        s(&p("rust.pth")),
        "--seed",
        "2",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--log-every",
        "50",
    ]));
    let bytes = std::fs::read(p("rust.pth")).unwrap();
    assert_eq!(&bytes[..4], b"PK\x03\x04", "rust.pth is a torch.save zip");
    let rust = rust_accuracy(&data, &p("rust.pth"));
    let python = python_accuracy(&data, "--weights", &p("rust.pth"));
    assert_eq!(python, rust, "rust.pth: Python vs Rust (correct, total)");
    // -> export -> TorchScript in Python.
    ok(&run(&[
        "export",
        "--weights",
        s(&p("rust.pth")),
        "--torchscript",
        s(&p("model.pt")),
    ]));
    let python = python_accuracy(&data, "--script", &p("model.pt"));
    assert_eq!(
        python, rust,
        "exported model: Python vs Rust (correct, total)"
    );
    assert!(rust.0 > 40, "the Rust model learned something: {rust:?}");
}

/// Writes test images of several sizes and kinds; returns their paths.
fn make_images(dir: &Path) -> Vec<PathBuf> {
    let pattern = |w: u32, h: u32| {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(2)) as u8,
                (y * 255 / h.max(2)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    };
    let mut paths = Vec::new();
    let mut save = |name: &str, img: image::DynamicImage| {
        let path = dir.join(name);
        img.save(&path).unwrap();
        paths.push(path);
    };
    save("exact.png", image::DynamicImage::ImageRgb8(pattern(32, 32)));
    save("wide.jpg", image::DynamicImage::ImageRgb8(pattern(100, 60)));
    save(
        "tiny-gray.png",
        image::DynamicImage::ImageRgb8(pattern(7, 9)).grayscale(),
    );
    save(
        "alpha.png",
        image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(pattern(50, 50)).to_rgba8()),
    );
    // A JPEG with a misleading extension: the content decides.
    let big = dir.join("big.png.jpeg");
    image::DynamicImage::ImageRgb8(pattern(640, 480))
        .save_with_format(&big, image::ImageFormat::Jpeg)
        .unwrap();
    let renamed = dir.join("really-a-jpeg.png");
    std::fs::rename(&big, &renamed).unwrap();
    paths.push(renamed);
    paths
}

#[test]
fn predict_prints_probabilities_that_sum_to_one_and_match_python() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let weights = p("w.safetensors");
    Model::new(Device::Cpu, Some(4)).save(&weights).unwrap();
    let images = make_images(dir.path());
    let mut args = vec![
        "predict",
        "--json",
        "--device",
        "cpu",
        "--weights",
        s(&weights),
    ];
    args.extend(images.iter().map(|i| s(i)));
    let out = ok(&run(&args));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), images.len(), "{out}");

    // Python's preprocessing (PIL, torchvision) and Net on the same files.
    let x_path = p("x.safetensors");
    let mut pyargs = vec!["preprocess", "--out", s(&x_path)];
    pyargs.extend(images.iter().map(|i| s(i)));
    py(&pyargs);
    let py_logits = python_forward("logits", &weights, &x_path);
    // The inputs themselves, in units of one pixel level (1/255 of [0, 1],
    // so 2/255 after normalization).
    let py_inputs = Tensor::read_safetensors(&x_path).unwrap().remove(0).1;
    for (i, path) in images.iter().enumerate() {
        let rust = tch_cifar::cli::predict::load_image(path).unwrap();
        let levels = max_abs_diff(&rust, &py_inputs.get(i as i64)) * 255.0 / 2.0;
        // No resize: the same bytes. Resized: PIL rounds its bilinear
        // filter's result differently, by one level at most.
        let allowed = if path.ends_with("exact.png") {
            1e-3
        } else {
            1.01
        };
        assert!(
            levels <= allowed,
            "{path:?}: input differs from PIL's by {levels} levels"
        );
    }
    let python = py_logits.softmax(1, Kind::Float);
    let python: Vec<Vec<f32>> = Vec::try_from(&python).unwrap();

    for ((line, path), py_probs) in lines.iter().zip(&images).zip(&python) {
        assert_eq!(line["image"], s(path));
        let probs: Vec<f64> = line["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 10);
        let sum: f64 = probs.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "{path:?}: sum {sum}");
        let top = line["top_k"].as_array().unwrap();
        assert_eq!(top.len(), 3, "default --top-k is 3");
        assert_eq!(top[0]["class"], line["class"]);
        assert!(top[0]["probability"].as_f64() >= top[2]["probability"].as_f64());
        // A 32x32 image needs no resize: the same numbers as Python.
        let tolerance = if path.ends_with("exact.png") {
            1e-5
        } else {
            1e-3
        };
        let diff = probs
            .iter()
            .zip(py_probs)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        assert!(diff <= tolerance, "{path:?}: differs from Python by {diff}");
    }

    // The text form: the class, then --top-k lines.
    let out = ok(&run(&[
        "predict",
        "--device",
        "cpu",
        "--top-k",
        "5",
        "--weights",
        s(&weights),
        s(&images[0]),
    ]));
    let text: Vec<&str> = out.lines().collect();
    assert_eq!(text.len(), 6, "{out}");
    assert_eq!(
        text[0],
        format!("{}: {}", s(&images[0]), lines[0]["class"].as_str().unwrap())
    );
    assert!(
        text[1].starts_with(&format!("  {:5} 0.", lines[0]["class"].as_str().unwrap())),
        "{out}"
    );
}

#[test]
fn bad_images_and_bad_weights_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let weights = p("w.safetensors");
    Model::new(Device::Cpu, Some(4)).save(&weights).unwrap();
    let good = make_images(dir.path()).remove(0);
    let predict = |image: &Path| {
        run(&[
            "predict",
            "--device",
            "cpu",
            "--weights",
            s(&weights),
            s(&good),
            s(image),
        ])
    };
    fails_with(&predict(&p("missing.png")), &["missing.png"]);
    std::fs::write(p("notes.png"), "not an image, just text\n").unwrap();
    fails_with(
        &predict(&p("notes.png")),
        &["notes.png", "not a readable image"],
    );
    let png = std::fs::read(&good).unwrap();
    std::fs::write(p("cut.png"), &png[..png.len() / 2]).unwrap();
    fails_with(&predict(&p("cut.png")), &["cut.png"]);
    std::fs::write(p("empty.jpg"), b"").unwrap();
    fails_with(&predict(&p("empty.jpg")), &["empty.jpg"]);
    fails_with(&predict(dir.path()), &[s(dir.path())]);

    // Every file gets its line, a bad one its reason, and the run fails.
    let (notes, missing) = (p("notes.png"), p("missing.png"));
    let all = |json: &[&str]| {
        let mut args = vec!["predict", "--device", "cpu", "--weights", s(&weights)];
        args.extend_from_slice(json);
        args.extend([s(&good), s(&notes), s(&missing), s(&good)]);
        run(&args)
    };
    let out = all(&[]);
    fails_with(
        &out,
        &[
            "2 of 4 images could not be classified; the first: ",
            "notes.png",
        ],
    );
    let text = stdout(&out);
    let marked: Vec<&str> = text.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(marked.len(), 4, "{text}");
    assert!(marked[0].starts_with(&format!("{}: ", s(&good))), "{text}");
    assert!(
        marked[1].starts_with(&format!("{}: not classified: ", s(&p("notes.png")))),
        "{text}"
    );
    assert!(
        marked[2].contains("missing.png: not classified: cannot read image"),
        "{text}"
    );
    assert_eq!(marked[3], marked[0]);
    let out = all(&["--json"]);
    fails_with(&out, &["2 of 4 images"]);
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "four images and the error event");
    assert_eq!(lines[0]["image"], s(&good));
    assert!(lines[0]["class"].is_string());
    assert_eq!(lines[1]["image"], s(&p("notes.png")));
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("not a readable image"));
    assert!(lines[1].get("class").is_none());
    assert!(lines[2]["error"].is_string());
    assert_eq!(lines[3], lines[0]);
    assert_eq!(lines[4]["event"], "error");
    // The decoder's reason once, not twice.
    let reason = lines[1]["error"].as_str().unwrap();
    assert_eq!(
        reason.matches("Invalid PNG signature").count(),
        1,
        "{reason}"
    );

    // Weights made in Python with a key missing, an extra key, a wrong shape.
    let pth = |name: &str| p(name).to_str().unwrap().to_string();
    py_code(&format!(
        r#"
import sys
sys.path.insert(0, {scripts:?})
from interop import Net
from safetensors.torch import save_file
sd = Net().state_dict()
missing = dict(sd); del missing["fc2.bias"]
extra = dict(sd); extra["fc4.weight"] = torch.zeros(3)
shape = dict(sd); shape["conv1.weight"] = torch.zeros(6, 1, 5, 5)
ints = dict(sd); ints["fc3.bias"] = torch.arange(10)
torch.save(missing, {missing:?})
torch.save(extra, {extra:?})
torch.save(shape, {shape:?})
torch.save(ints, {ints:?})
save_file(shape, {shape_st:?})
torch.save({{"epoch": 3, "model_state_dict": sd}}, {checkpoint:?})
torch.save(sd, {legacy:?}, _use_new_zipfile_serialization=False)
torch.jit.save(torch.jit.script(Net()), {script:?})
"#,
        scripts = repo_path("scripts").to_str().unwrap(),
        missing = pth("missing.pth"),
        extra = pth("extra.pth"),
        shape = pth("shape.pth"),
        ints = pth("ints.pth"),
        shape_st = pth("shape.safetensors"),
        checkpoint = pth("checkpoint.pth"),
        legacy = pth("legacy.pth"),
        script = pth("script.pt"),
    ));
    let with_weights =
        |w: &str| run(&["predict", "--device", "cpu", "--weights", &pth(w), s(&good)]);
    fails_with(
        &with_weights("missing.pth"),
        &["missing.pth", "missing key `fc2.bias`"],
    );
    fails_with(
        &with_weights("extra.pth"),
        &["extra.pth", "unexpected key `fc4.weight`"],
    );
    fails_with(
        &with_weights("shape.pth"),
        &["shape.pth", "`conv1.weight` has shape [6, 1, 5, 5]"],
    );
    fails_with(
        &with_weights("shape.safetensors"),
        &["shape.safetensors", "`conv1.weight` has shape [6, 1, 5, 5]"],
    );
    fails_with(
        &with_weights("ints.pth"),
        &["ints.pth", "`fc3.bias`", "Int64"],
    );
    fails_with(
        &with_weights("checkpoint.pth"),
        &[
            "checkpoint.pth",
            "key `epoch` holds the int 3",
            "checkpoint",
        ],
    );
    fails_with(
        &with_weights("legacy.pth"),
        &["legacy.pth", "legacy format"],
    );
    fails_with(
        &with_weights("script.pt"),
        &["script.pt", "TorchScript module"],
    );
    // evaluate and export go through the same loader.
    let data = p("data");
    synthetic(&data, 10, 10, 1, None);
    fails_with(
        &run(&[
            "evaluate",
            "--device",
            "cpu",
            "--weights",
            &pth("missing.pth"),
            "--data-dir",
            s(&data),
        ]),
        &["missing key `fc2.bias`"],
    );
    fails_with(
        &run(&[
            "export",
            "--weights",
            &pth("extra.pth"),
            "--torchscript",
            &pth("m.pt"),
        ]),
        &["unexpected key `fc4.weight`"],
    );
    assert!(!p("m.pt").exists());
}

#[test]
fn samples_draws_a_labeled_grid_and_prints_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    synthetic(&data, 60, 10, 5, None);
    let samples = |out: &Path, extra: &[&str]| {
        let mut args = vec!["samples", "--data-dir", s(&data), "--out", s(out)];
        args.extend_from_slice(extra);
        ok(&run(&args))
    };
    let a = samples(&p("a.png"), &["--count", "6", "--seed", "3"]);
    let b = samples(&p("b.png"), &["--count", "6", "--seed", "3"]);
    assert_eq!(a, b, "the same seed picks the same images");
    let names: Vec<&str> = a.trim_end().split(' ').filter(|w| !w.is_empty()).collect();
    assert_eq!(names.len(), 6, "{a:?}");
    // The labels are those of the records the seeded shuffle picks.
    let train = tch_cifar::data::load_train(&data, Device::Cpu).unwrap();
    let labels = Vec::<i64>::try_from(&train.labels).unwrap();
    let order = tch_cifar::data::epoch_order(3, 0, labels.len());
    let want: Vec<&str> = order[..6]
        .iter()
        .map(|&i| tch_cifar::data::CLASSES[labels[i as usize] as usize])
        .collect();
    assert_eq!(names, want);
    let (w, h) = image::image_dimensions(p("a.png")).unwrap();
    assert_eq!(
        (w, h),
        (6 * 136 + 8, 128 + 22 + 16),
        "6 images of 128 px in one row"
    );

    // The tutorial's default: 4 images.
    let c = samples(&p("c.png"), &[]);
    assert_eq!(
        c.trim_end().split(' ').filter(|w| !w.is_empty()).count(),
        4,
        "{c:?}"
    );
}

#[test]
fn evaluate_draws_the_confusion_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    synthetic(&data, 10, 50, 6, None);
    Model::new(Device::Cpu, Some(1))
        .save(&p("w.safetensors"))
        .unwrap();
    let out = ok(&run(&[
        "evaluate",
        "--device",
        "cpu",
        "--weights",
        s(&p("w.safetensors")),
        "--data-dir",
        s(&data),
        "--confusion",
        s(&p("confusion.png")),
    ]));
    assert!(
        out.starts_with("Accuracy of the network on the 50 test images"),
        "{out}"
    );
    let (w, h) = image::image_dimensions(p("confusion.png")).unwrap();
    assert!(w > 500 && h > 500, "{w}x{h}");
    fails_with(
        &run(&[
            "evaluate",
            "--device",
            "cpu",
            "--weights",
            s(&p("w.safetensors")),
            "--data-dir",
            s(&data),
            "--confusion",
            s(&p("no/such/dir/c.png")),
        ]),
        &["no/such/dir/c.png"],
    );
}

/// An image tree whose class names and nested folders sort in ways that
/// a byte-wise or case-blind sort would get wrong, with files that
/// `ImageFolder` ignores too.
fn make_tricky_tree(root: &Path) {
    let put = |rel: &str, colour: [u8; 3], size: (u32, u32)| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let img = image::RgbImage::from_fn(size.0, size.1, |x, y| {
            image::Rgb([
                colour[0].wrapping_add((x * 5) as u8),
                colour[1].wrapping_add((y * 3) as u8),
                colour[2],
            ])
        });
        if rel.ends_with(".jpg") {
            img.save_with_format(&path, image::ImageFormat::Jpeg)
                .unwrap();
        } else {
            img.save(&path).unwrap();
        }
    };
    for (i, class) in [
        "Zebra", "apple", "Ant", "b_c", "b-c", "b.c", "10", "9", "été",
    ]
    .iter()
    .enumerate()
    {
        let c = (i * 25) as u8;
        put(&format!("{class}/x.png"), [c, 0, 0], (32, 32));
        put(&format!("{class}/B.png"), [c, 9, 0], (32, 32));
    }
    put("apple/sub/1.png", [1, 2, 3], (32, 32));
    put("apple/sub-2/1.png", [4, 5, 6], (32, 32));
    put("apple/sub/deeper/1.png", [7, 8, 9], (32, 32));
    put("apple/big.PNG", [10, 20, 30], (100, 70));
    put("apple/photo.jpg", [100, 50, 0], (32, 32));
    put("apple/photo-big.jpg", [50, 100, 0], (64, 48));
    std::fs::write(root.join("apple/notes.txt"), b"not an image").unwrap();
    std::fs::write(root.join("Ant/image.gif"), b"GIF89a").unwrap();
}

#[test]
fn image_folder_classes_order_and_pixels_match_torchvision() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    make_tricky_tree(&root);
    let pixels = dir.path().join("pil.safetensors");
    let out = py(&["image-folder", s(&root), "--pixels", s(&pixels)]);
    let theirs: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let listing = tch_cifar::data::image_folder::scan(&root).unwrap();
    assert_eq!(theirs["classes"], serde_json::json!(listing.classes));
    for (i, class) in listing.classes.iter().enumerate() {
        assert_eq!(theirs["class_to_idx"][class], i, "{class}");
    }
    let ours: Vec<serde_json::Value> = listing
        .files
        .iter()
        .map(|e| {
            let rel = e.path.strip_prefix(&root).unwrap();
            serde_json::json!([rel.to_str().unwrap(), e.label])
        })
        .collect();
    assert_eq!(theirs["samples"], serde_json::json!(ours));

    // The pixels: the same bytes for PNGs of 32x32, within a level when
    // resized (PIL rounds its fixed-point filter differently), and close
    // for JPEGs (two decoders' IDCT and upsampling rounding).
    let decoded = tch_cifar::data::image_folder::load(&listing, &Default::default()).unwrap();
    let pil = Tensor::read_safetensors(&pixels).unwrap();
    let pil = &pil.iter().find(|(k, _)| k == "pixels").unwrap().1;
    for (i, entry) in listing.files.iter().enumerate() {
        let ours = Tensor::from_slice(decoded.image(i))
            .view([3, 32, 32])
            .to_kind(Kind::Int16);
        let diff = (ours - pil.get(i as i64).to_kind(Kind::Int16))
            .abs()
            .max()
            .int64_value(&[]);
        let name = entry.path.to_string_lossy();
        let allowed = if name.ends_with(".jpg") {
            8
        } else if name.ends_with("big.PNG") {
            1
        } else {
            0
        };
        assert!(diff <= allowed, "{name}: {diff} levels from Pillow's");
    }
}

#[test]
fn a_three_class_net_is_pythons_net_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let names: Vec<String> = ["ant", "bee", "cow"].map(String::from).to_vec();
    // The seeded init is torch.manual_seed(7); Net(3)'s, bit for bit.
    py(&[
        "init",
        "--seed",
        "7",
        "--num-classes",
        "3",
        "--safetensors",
        s(&p("py.safetensors")),
    ]);
    let python = Model::load(&p("py.safetensors"), Device::Cpu).unwrap();
    assert_eq!(
        python.classes(),
        ["0", "1", "2"],
        "no names in Python's file"
    );
    let model = Model::with_classes(Device::Cpu, Some(7), names.clone());
    for ((k, a), (_, b)) in model.state_dict().iter().zip(&python.state_dict()) {
        assert!(a.equal(b), "{k} differs from torch.manual_seed(7); Net(3)");
    }
    // Rust's weights run in Python's Net(3), as safetensors, as .pth (whose
    // `_metadata` carries the names) and as TorchScript.
    model.save(&p("w.safetensors")).unwrap();
    ok(&run(&[
        "export",
        "--weights",
        s(&p("w.safetensors")),
        "--pth",
        s(&p("w.pth")),
        "--out",
        s(&p("w.pt")),
    ]));
    let x = batch(4, 8);
    write_input(&p("x.safetensors"), &x);
    let want = tch::no_grad(|| model.net.forward(&x));
    assert_eq!(want.size(), [4, 3]);
    for (command, file) in [
        ("logits", "w.safetensors"),
        ("logits", "w.pth"),
        ("run-script", "w.pt"),
    ] {
        let python = python_forward(command, &p(file), &p("x.safetensors"));
        let diff = max_abs_diff(&python, &want);
        assert!(diff <= 1e-5, "{file}: Python differs from Rust by {diff}");
    }
    py_code(&format!(
        "sd = torch.load({:?}, weights_only=True)\nassert sd._metadata['']['classes'] == \
         ['ant', 'bee', 'cow'], sd._metadata",
        s(&p("w.pth"))
    ));
    assert_eq!(
        Model::load(&p("w.pth"), Device::Cpu).unwrap().classes(),
        names
    );
}

#[test]
fn a_tree_trained_in_rust_scores_the_same_in_python() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("tree");
    for split in ["train", "test"] {
        make_tricky_tree(&data.join(split));
    }
    ok(&run(&[
        "train",
        "--device",
        "cpu",
        "--no-cache",
        "--data-dir",
        s(&data),
        "--out",
        s(&p("w.safetensors")),
        "--seed",
        "4",
        "--epochs",
        "3",
        "--lr",
        "0.01",
    ]));
    ok(&run(&[
        "export",
        "--weights",
        s(&p("w.safetensors")),
        "--pth",
        s(&p("w.pth")),
    ]));
    let out = ok(&run(&[
        "evaluate",
        "--json",
        "--no-cache",
        "--device",
        "cpu",
        "--weights",
        s(&p("w.safetensors")),
        "--data-dir",
        s(&data),
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let rust = (v["correct"].as_i64().unwrap(), v["total"].as_i64().unwrap());
    let python = python_accuracy(&data, "--weights", &p("w.pth"));
    // The JPEGs and the resized PNG decode a level or so apart, which may
    // move a borderline image; on these few images the counts agree.
    assert_eq!(python, rust, "tree: Python vs Rust (correct, total)");
    assert_eq!(rust.1, 24);
}

// --------------------------------------------------------------- airbench94

/// One airbench94 training shared by the tests below (1 epoch on 2048
/// synthetic images, seed 7): the data, the weights as safetensors, and
/// `train`'s JSON summary.
struct TrainedAirbench {
    data: PathBuf,
    weights: PathBuf,
    summary: serde_json::Value,
}

fn trained_airbench() -> &'static TrainedAirbench {
    static TRAINED: std::sync::OnceLock<TrainedAirbench> = std::sync::OnceLock::new();
    TRAINED.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-airbench94");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        synthetic(&data, 2048, 500, 3, None);
        let weights = dir.join("w.safetensors");
        let out = ok(&run(&[
            "train",
            "--model",
            "airbench94",
            "--epochs",
            "1",
            "--seed",
            "7",
            "--device",
            "cpu",
            // `evaluate` runs in float32 on the CPU; so the training's own
            // evaluation matches it exactly.
            "--precision",
            "fp32",
            "--json",
            "--data-dir",
            s(&data),
            "--out",
            s(&weights),
        ]));
        let summary = last_json(&out);
        TrainedAirbench {
            data,
            weights,
            summary,
        }
    })
}

fn last_json(out: &str) -> serde_json::Value {
    let line = out.lines().last().expect("a JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// `evaluate --json` of airbench94 weights with `flag` (`--tta`, `--no-tta`
/// or none), without its timing.
fn airbench_evaluate(weights: &Path, flag: Option<&str>) -> serde_json::Value {
    let t = trained_airbench();
    let mut args = evaluate_args(s(&t.data), s(weights)).to_vec();
    args.push("--json");
    args.extend(flag);
    let mut summary = last_json(&ok(&run(&args)));
    summary.as_object_mut().unwrap().remove("eval_seconds");
    summary
}

fn python_airbench_correct(weights: &Path, tta: bool) -> i64 {
    let t = trained_airbench();
    let mut args = vec![
        "airbench-accuracy",
        "--data-dir",
        s(&t.data),
        "--weights",
        s(weights),
    ];
    if tta {
        args.push("--tta");
    }
    let result: serde_json::Value = serde_json::from_str(py(&args).trim()).unwrap();
    assert_eq!(result["total"], 500);
    result["correct"].as_i64().unwrap()
}

#[test]
fn airbench94_state_dict_is_the_python_definitions() {
    for classes in [10, 3] {
        let python: serde_json::Value = serde_json::from_str(
            py(&["airbench-keys", "--num-classes", &classes.to_string()]).trim(),
        )
        .unwrap();
        let (_vs, net) = tch_cifar::nets::airbench::net::build(
            Device::Cpu,
            1,
            classes,
            tch_cifar::nets::airbench::Variant::Airbench94,
        );
        let rust: Vec<serde_json::Value> = net
            .state_dict()
            .iter()
            .map(|(k, t)| {
                let dtype = match t.kind() {
                    Kind::Float => "torch.float32",
                    Kind::Int64 => "torch.int64",
                    other => panic!("{k} is {other:?}"),
                };
                serde_json::json!([k, t.size(), dtype])
            })
            .collect();
        assert_eq!(serde_json::Value::from(rust), python, "{classes} classes");
        let shapes: Vec<serde_json::Value> =
            tch_cifar::nets::airbench::net::state_dict_shapes(classes)
                .into_iter()
                .map(|(k, shape)| serde_json::json!([k, shape]))
                .collect();
        let python_shapes: Vec<serde_json::Value> = python
            .as_array()
            .unwrap()
            .iter()
            .map(|e| serde_json::json!([e[0], e[1]]))
            .collect();
        assert_eq!(shapes, python_shapes, "{classes} classes");
    }
}

#[test]
fn airbench94_weights_score_the_same_in_python_and_rust_with_and_without_tta() {
    let t = trained_airbench();
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("w.pth");
    let copy = dir.path().join("w.safetensors");
    ok(&run(&[
        "export",
        "--weights",
        s(&t.weights),
        "--pth",
        s(&pth),
        "--safetensors",
        s(&copy),
    ]));
    let default = airbench_evaluate(&t.weights, None);
    let tta = airbench_evaluate(&t.weights, Some("--tta"));
    let plain = airbench_evaluate(&t.weights, Some("--no-tta"));
    // TTA is the default; each run is deterministic.
    assert_eq!(default, tta);
    assert_eq!(plain, airbench_evaluate(&t.weights, Some("--no-tta")));
    assert_eq!(
        (tta["model"].clone(), tta["tta"].clone()),
        ("airbench94".into(), true.into())
    );
    assert_eq!(plain["tta"], false);
    // Both carry both accuracies; `accuracy` is the one asked for.
    for summary in [&tta, &plain] {
        assert_eq!(summary["tta_accuracy"], tta["accuracy"]);
        assert_eq!(summary["plain_accuracy"], plain["accuracy"]);
    }
    // The augmentation changes the answers.
    assert_ne!(tta["confusion"], plain["confusion"]);
    // `train` evaluated the same way (its summary's `accuracy` was the
    // plain one before it had `plain_accuracy`).
    assert_eq!(t.summary["tta_accuracy"], tta["accuracy"]);
    let train_plain = t
        .summary
        .get("plain_accuracy")
        .unwrap_or(&t.summary["accuracy"]);
    assert_eq!(train_plain, &plain["accuracy"]);

    // The .pth export holds the same weights, for Rust and for PyTorch.
    assert_eq!(
        airbench_evaluate(&pth, Some("--tta"))["correct"],
        tta["correct"]
    );
    for (weights, augment) in [
        (&t.weights, true),
        (&t.weights, false),
        (&pth, true),
        (&pth, false),
        (&copy, false),
    ] {
        let summary = if augment { &tta } else { &plain };
        assert_eq!(
            python_airbench_correct(weights, augment),
            summary["correct"].as_i64().unwrap(),
            "{weights:?}, tta {augment}"
        );
    }
}

#[test]
fn airbench94_torchscript_and_state_dict_give_rusts_logits_in_python() {
    let t = trained_airbench();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    ok(&run(&[
        "export",
        "--weights",
        s(&t.weights),
        "--torchscript",
        s(&p("m.pt")),
    ]));
    let Classifier::Airbench94(airbench) = Classifier::load(&t.weights, Device::Cpu).unwrap()
    else {
        panic!("airbench94 weights load as airbench94")
    };
    // The module takes the PyTorch definition's input: mean/std-normalized.
    let x = batch(6, 2) * 2.0;
    write_input(&p("x.safetensors"), &x);
    let want = tch::no_grad(|| airbench.net.forward_t(&x, false));
    let python = python_forward("run-script", &p("m.pt"), &p("x.safetensors"));
    let diff = max_abs_diff(&python, &want);
    assert!(diff < 1e-4, "the module in Python differs by {diff}");
    let tch_module = tch::CModule::load(p("m.pt")).unwrap();
    let reloaded = tch::no_grad(|| tch_module.forward_ts(&[&x])).unwrap();
    assert!(
        reloaded.equal(&want),
        "the module via CModule::load differs"
    );

    // Its tta method against Rust's TTA on the [-1, 1] images that
    // renormalize to x, and the reference's logits(net, x, tta) on both.
    let images = batch(6, 3);
    let (images_file, y_file) = (p("images.safetensors"), p("y.safetensors"));
    write_input(&images_file, &images);
    for augment in [false, true] {
        let rust = tch::no_grad(|| airbench.tta(augment).forward(&images));
        let mut args = vec![
            "airbench-logits",
            "--weights",
            s(&t.weights),
            "--input",
            s(&images_file),
            "--out",
            s(&y_file),
        ];
        if augment {
            args.push("--tta");
        }
        py(&args);
        let python = read_output(&y_file);
        let diff = max_abs_diff(&python, &rust);
        assert!(
            diff < 1e-4,
            "tta {augment}: the reference differs by {diff}"
        );
    }
    let renormalized = tch_cifar::data::normalize::renormalize(&images);
    write_input(&p("r.safetensors"), &renormalized);
    let out = p("y.safetensors");
    py(&[
        "run-script",
        "--model",
        s(&p("m.pt")),
        "--method",
        "tta",
        "--input",
        s(&p("r.safetensors")),
        "--out",
        s(&out),
    ]);
    let rust = tch::no_grad(|| airbench.tta(true).forward(&images));
    let diff = max_abs_diff(&read_output(&out), &rust);
    assert!(diff < 1e-4, "the module's tta differs by {diff}");

    // Its entries are the definition's: parameters (frozen ones without
    // gradients) and BatchNorm's buffers, and they load into Airbench94.
    let info: serde_json::Value =
        serde_json::from_str(py(&["airbench-script", "--model", s(&p("m.pt"))]).trim()).unwrap();
    assert_eq!(info["parameters"], info["reference_parameters"]);
    assert_eq!(info["buffers"], info["reference_buffers"]);
    let keys: Vec<serde_json::Value> = tch_cifar::nets::airbench::net::state_dict_shapes(10)
        .into_iter()
        .map(|(k, _)| k.into())
        .collect();
    let got: Vec<serde_json::Value> = info["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].clone())
        .collect();
    assert_eq!(got, keys);
}

#[test]
fn predict_with_airbench94_uses_tta_unless_told_and_net_refuses_tta() {
    let t = trained_airbench();
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path());
    let predict = |flag: Option<&str>| -> Vec<serde_json::Value> {
        let mut args = vec![
            "predict",
            "--json",
            "--device",
            "cpu",
            "--weights",
            s(&t.weights),
        ];
        args.extend(flag);
        args.extend(images.iter().map(|i| s(i)));
        ok(&run(&args))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (default, plain) = (predict(None), predict(Some("--no-tta")));
    assert_eq!(default, predict(Some("--tta")));
    assert_eq!(default.len(), images.len());
    for (a, b) in default.iter().zip(&plain) {
        let sum: f64 = a["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        assert_ne!(a["logits"], b["logits"], "{}", a["image"]);
    }
    // The same as Rust's TTA module on the same images.
    let Classifier::Airbench94(airbench) = Classifier::load(&t.weights, Device::Cpu).unwrap()
    else {
        panic!("airbench94 weights load as airbench94")
    };
    let batch: Vec<Tensor> = images
        .iter()
        .map(|i| tch_cifar::cli::predict::load_image(i).unwrap())
        .collect();
    let logits = tch::no_grad(|| airbench.tta(true).forward(&Tensor::stack(&batch, 0)));
    let first: Vec<f64> = default[0]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want = Vec::<f64>::try_from(logits.get(0).to_kind(Kind::Double)).unwrap();
    for (a, b) in first.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{first:?} against {want:?}");
    }

    // The tutorial's Net has no TTA: --tta is refused, --no-tta is its way.
    let net = dir.path().join("net.safetensors");
    Model::new(Device::Cpu, Some(1)).save(&net).unwrap();
    let image = s(&images[0]);
    let args = ["predict", "--device", "cpu", "--weights", s(&net), image];
    let without = ok(&run(&args));
    let mut no_tta = args.to_vec();
    no_tta.push("--no-tta");
    assert_eq!(ok(&run(&no_tta)), without);
    let mut tta = args.to_vec();
    tta.push("--tta");
    fails_with(
        &run(&tta),
        &["--tta applies to airbench94 weights", "net.safetensors"],
    );
    let mut eval = evaluate_args(s(&t.data), s(&net)).to_vec();
    eval.push("--tta");
    fails_with(&run(&eval), &["--tta applies to airbench94 weights"]);
}

// ---------------------------------------------------------- airbench94-muon

/// airbench94-muon's weights (1 epoch on 2000 synthetic images) name their
/// network, and the PyTorch reference's network (logits scaled by 1/256)
/// holding them gives Rust's logits, with and without TTA, from the
/// safetensors and from the `.pth` export; the TorchScript export gives
/// them too, and Python scores the test set as `evaluate` does.
#[test]
fn airbench94_muon_weights_give_rusts_logits_in_python_and_torchscript() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    synthetic(&data, 2000, 500, 3, None);
    let weights = p("w.safetensors");
    ok(&run(&[
        "train",
        "--model",
        "airbench94-muon",
        "--epochs",
        "1",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--data-dir",
        s(&data),
        "--out",
        s(&weights),
    ]));
    let (pth, script) = (p("w.pth"), p("m.pt"));
    ok(&run(&[
        "export",
        "--weights",
        s(&weights),
        "--pth",
        s(&pth),
        "--torchscript",
        s(&script),
    ]));
    let Classifier::Airbench94(airbench) = Classifier::load(&weights, Device::Cpu).unwrap() else {
        panic!("airbench94-muon weights load as an airbench network")
    };
    assert_eq!(
        airbench.net.variant,
        tch_cifar::nets::airbench::Variant::Muon
    );
    let from_pth = Classifier::load(&pth, Device::Cpu).unwrap();
    assert_eq!(from_pth.network().name(), "airbench94-muon");

    let images = batch(6, 3);
    let (images_file, y_file) = (p("images.safetensors"), p("y.safetensors"));
    write_input(&images_file, &images);
    for (file, augment) in [(&weights, false), (&weights, true), (&pth, true)] {
        let rust = tch::no_grad(|| airbench.tta(augment).forward(&images));
        let mut args = vec![
            "airbench-logits",
            "--muon",
            "--weights",
            s(file),
            "--input",
            s(&images_file),
            "--out",
            s(&y_file),
        ];
        if augment {
            args.push("--tta");
        }
        py(&args);
        let diff = max_abs_diff(&read_output(&y_file), &rust);
        assert!(
            diff < 1e-4,
            "{file:?}, tta {augment}: Python differs by {diff}"
        );
    }

    let x = batch(6, 2) * 2.0;
    write_input(&p("x.safetensors"), &x);
    let want = tch::no_grad(|| airbench.net.forward_t(&x, false));
    let python = python_forward("run-script", &script, &p("x.safetensors"));
    let diff = max_abs_diff(&python, &want);
    assert!(
        diff < 1e-4,
        "the TorchScript module in Python differs by {diff}"
    );

    let mut args = evaluate_args(s(&data), s(&weights)).to_vec();
    args.push("--json");
    let line = ok(&run(&args)).lines().last().unwrap().to_string();
    let summary: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(summary["model"], "airbench94-muon");
    let python: serde_json::Value = serde_json::from_str(
        py(&[
            "airbench-accuracy",
            "--muon",
            "--tta",
            "--data-dir",
            s(&data),
            "--weights",
            s(&pth),
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(python["correct"], summary["correct"]);
}
