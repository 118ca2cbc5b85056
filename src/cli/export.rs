//! `tch-cifar export`: saved weights as a TorchScript module that Python
//! runs with `torch.jit.load("model.pt")(images)`, as an ONNX model
//! ([`crate::nets::onnx`]) for onnxruntime and the other ONNX runtimes,
//! and the weights converted between safetensors and PyTorch's `.pth`.
//!
//! The module is what `torch.jit.script(net)` makes of the tutorial's `Net`
//! in Python: the weights are its parameters, in submodules `conv1` …
//! `fc3` (so `state_dict()` has the tutorial's keys, and `parameters()`,
//! `.to(...)` and `.train()` work), and `forward` is TorchScript source that
//! does what [`crate::nets::tutorial::Net`]'s forward does, op for op. tch binds
//! TorchScript modules for loading only, so `csrc/script_module.cpp` builds
//! and saves it; the module is then loaded back with tch's `CModule` and
//! checked against the Rust model before it replaces the output file.
//!
//! airbench94's module is built the same way: its parameters and
//! BatchNorm's buffers (`running_mean`, `running_var`,
//! `num_batches_tracked`) in the submodules of `scripts/airbench94.py`'s
//! `Airbench94` (`whiten`, `layer1.conv1` …, `head`), the frozen ones
//! (`whiten.weight`, the BatchNorm scales) without gradients, and a
//! `forward` in evaluation mode: BatchNorm with its running statistics. It
//! takes what that `forward` takes, images normalized with CIFAR-10's mean
//! and std, and `tta(x)` adds the test-time augmentation of the reference's
//! `logits(net, x, tta=True)`.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::nn::Module;
use tch::{CModule, Device, Kind, Tensor};

use crate::nets::airbench::{Airbench94, BN_EPS, BN_MOMENTUM};
use crate::nets::classifier::{Airbench, Classifier};
use crate::nets::tutorial::Model;
use crate::nets::{Head, ModelKind};
use crate::util::rng::with_torch_rng;
use crate::weights::outputs::{self, Format};

/// Export saved weights as TorchScript, ONNX, `.pth` or safetensors.
#[derive(Debug, clap::Args)]
#[command(
    override_usage = "tch-cifar export [OPTIONS] --weights <FILE> <--torchscript <FILE>|--onnx <FILE>|\n       \
                            --pth <FILE>|--safetensors <FILE>>"
)]
#[command(group(
    clap::ArgGroup::new("outputs")
        .required(true)
        .multiple(true)
        .args(["torchscript", "onnx", "pth", "safetensors"])
))]
#[command(group(
    clap::ArgGroup::new("graphs")
        .multiple(true)
        .args(["torchscript", "onnx"])
))]
pub struct ExportArgs {
    /// Weights (Net or airbench94): safetensors, a checkpoint or a .pth state_dict.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Write a TorchScript module (.pt) that holds the weights.
    ///
    /// For `torch.jit.load` in Python or `CModule::load` in Rust. Its
    /// `state_dict()` has the PyTorch definition's keys, and it takes an
    /// `[N, 3, 32, 32]` f32 batch normalized as that definition's input:
    /// to [-1, 1] for Net, with CIFAR-10's mean and std for airbench94
    /// (in evaluation mode; its `tta(x)` method adds test-time augmentation).
    #[arg(
        long,
        value_name = "FILE",
        visible_alias = "out",
        help_heading = "Output"
    )]
    pub torchscript: Option<PathBuf>,
    /// Write an ONNX model (.onnx, opset 17) that holds the weights.
    ///
    /// For onnxruntime (also on phones and in browsers), TensorRT,
    /// OpenVINO and other ONNX runtimes. It takes one float32 input,
    /// `input`, `[N, 3, 32, 32]`, normalized as the TorchScript module's,
    /// and returns `logits` (or, with --head probabilities,
    /// `probabilities`); its metadata_props hold the class names in output
    /// order, the network and the input's mean and std.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub onnx: Option<PathBuf>,
    /// The graphs' output: logits or probabilities.
    ///
    /// Applies to --torchscript and --onnx.
    #[arg(
        long,
        value_enum,
        hide_possible_values = true,
        default_value_t = Head::Logits,
        requires = "graphs",
        help_heading = "Output"
    )]
    pub head: Head,
    /// Bake airbench's test-time augmentation into the ONNX graph.
    ///
    /// The output is then the average over the image and its mirror and,
    /// at half the weight, the two 1-pixel diagonal translations and their
    /// mirrors, as `evaluate` computes it. The tutorial's Net has none: it
    /// is refused for its weights.
    #[arg(long, requires = "onnx", help_heading = "Output")]
    pub tta: bool,
    /// Write the weights in torch.save format (.pth or .pt).
    ///
    /// For the tutorial's `net.load_state_dict(torch.load(PATH, weights_only=True))`.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub pth: Option<PathBuf>,
    /// Write the weights as safetensors (e.g. to convert a `.pth`).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub safetensors: Option<PathBuf>,
}

impl ExportArgs {
    /// The outputs asked for, each with its format.
    fn outputs(&self) -> Vec<(Format, &Path)> {
        [
            (Format::TorchScript, &self.torchscript),
            (Format::Onnx, &self.onnx),
            (Format::Pth, &self.pth),
            (Format::Safetensors, &self.safetensors),
        ]
        .into_iter()
        .filter_map(|(format, path)| Some((format, path.as_deref()?)))
        .collect()
    }
}

/// `Net::forward` (see [`crate::nets::tutorial::Net`]) in TorchScript, with
/// `torch.*` builtins (`torch.nn.functional` does not resolve in a module
/// defined from source). Nothing in it fixes a size: the shapes are the
/// parameters'.
fn forward_source(head: Head) -> String {
    let out = match head {
        Head::Logits => "x",
        Head::Probabilities => "torch.softmax(x, 1)",
    };
    format!(
        "\
def forward(self, x: Tensor) -> Tensor:
    x = torch.max_pool2d(torch.relu(torch.conv2d(x, self.conv1.weight, self.conv1.bias)), [2, 2], [2, 2])
    x = torch.max_pool2d(torch.relu(torch.conv2d(x, self.conv2.weight, self.conv2.bias)), [2, 2], [2, 2])
    x = torch.flatten(x, 1)
    x = torch.relu(torch.linear(x, self.fc1.weight, self.fc1.bias))
    x = torch.relu(torch.linear(x, self.fc2.weight, self.fc2.bias))
    x = torch.linear(x, self.fc3.weight, self.fc3.bias)
    return {out}
"
    )
}

/// `Airbench94::forward_t(x, false)` (see [`crate::nets::airbench::net`]) in
/// TorchScript as `logits`, BatchNorm with its running statistics;
/// `forward` applies `head` to it, and `tta` to the test-time augmented
/// logits, weighted as the reference's `logits(net, x, tta=True)`.
fn airbench_source(head: Head, logit_scale: f64) -> String {
    let out = match head {
        Head::Logits => "x",
        Head::Probabilities => "torch.softmax(x, 1)",
    };
    let norm = |layer: usize, n: usize| {
        let m = format!("self.layer{layer}.norm{n}");
        format!(
            "torch.gelu(torch.batch_norm(x, {m}.weight, {m}.bias, {m}.running_mean, \
             {m}.running_var, False, {BN_MOMENTUM:?}, {BN_EPS:?}, True))"
        )
    };
    let mut logits = String::from(
        "def logits(self, x: Tensor) -> Tensor:
    x = torch.gelu(torch.conv2d(x, self.whiten.weight, self.whiten.bias))
",
    );
    for layer in 1..=3 {
        let conv = |n: usize| {
            format!("torch.conv2d(x, self.layer{layer}.conv{n}.weight, None, [1, 1], [1, 1])")
        };
        logits.push_str(&format!(
            "    x = torch.max_pool2d({}, [2, 2])
    x = {}
    x = {}
    x = {}
",
            conv(1),
            norm(layer, 1),
            conv(2),
            norm(layer, 2)
        ));
    }
    logits.push_str(&format!(
        "    x = torch.flatten(torch.max_pool2d(x, [3, 3]), 1)
    return torch.linear(x, self.head.weight) * {logit_scale:?}
"
    ));
    format!(
        "{logits}
def mirrored(self, x: Tensor) -> Tensor:
    return 0.5 * self.logits(x) + 0.5 * self.logits(torch.flip(x, [-1]))

def forward(self, x: Tensor) -> Tensor:
    x = self.logits(x)
    return {out}

def tta(self, x: Tensor) -> Tensor:
    size = x.size(3)
    padded = torch.reflection_pad2d(x, [1, 1, 1, 1])
    up_left = padded[:, :, 0:size, 0:size]
    down_right = padded[:, :, 2:size + 2, 2:size + 2]
    shifted = torch.stack([self.mirrored(up_left), self.mirrored(down_right)]).mean(0)
    x = 0.5 * self.mirrored(x) + 0.5 * shifted
    return {out}
"
    )
}

extern "C" {
    // csrc/script_module.cpp
    fn tch_cifar_save_script_module(
        class_name: *const c_char,
        names: *const *const c_char,
        tensors: *const *const torch_sys::C_tensor,
        roles: *const i32,
        count: usize,
        source: *const c_char,
        path: *const c_char,
    ) -> *mut c_char;
    fn tch_cifar_free_message(message: *mut c_char);
}

fn c_string(text: &str, what: &str) -> Result<CString> {
    CString::new(text).with_context(|| format!("{what} holds a NUL byte"))
}

/// What a tensor becomes in a TorchScript module (`TensorRole` in
/// `csrc/script_module.cpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Role {
    /// A parameter that trains.
    Parameter = 0,
    /// A parameter with `requires_grad=False`.
    Frozen = 1,
    /// A buffer (BatchNorm's running statistics).
    Buffer = 2,
}

/// Saves a TorchScript module of class `class_name` to `path`: `named`
/// (`"param"`, `"submodule.param"`, `"a.b.param"`) become its parameters
/// and buffers as their roles say, and `source` its methods.
fn save_script_module(
    class_name: &str,
    named: &[(String, Tensor, Role)],
    source: &str,
    path: &Path,
) -> Result<()> {
    let class_name = c_string(class_name, "the class name")?;
    let names = named
        .iter()
        .map(|(n, _, _)| c_string(n, "a parameter name"))
        .collect::<Result<Vec<_>>>()?;
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let tensor_ptrs: Vec<*const torch_sys::C_tensor> =
        named.iter().map(|(_, t, _)| t.as_ptr()).collect();
    let roles: Vec<i32> = named.iter().map(|(_, _, role)| *role as i32).collect();
    let source = c_string(source, "the module's source")?;
    #[cfg(unix)]
    let path_bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let path_bytes = path
        .to_str()
        .with_context(|| format!("{} is not valid Unicode", path.display()))?
        .as_bytes()
        .to_vec();
    let path_c =
        CString::new(path_bytes).with_context(|| format!("{} holds a NUL byte", path.display()))?;
    // SAFETY: every pointer is valid for the call (the CStrings, the three
    // arrays of `count` entries and the tensors they point to outlive it),
    // and the C++ side only reads them. It catches every C++ exception and
    // returns NULL or a malloc'ed message, freed here by its own function.
    let message = unsafe {
        let message = tch_cifar_save_script_module(
            class_name.as_ptr(),
            name_ptrs.as_ptr(),
            tensor_ptrs.as_ptr(),
            roles.as_ptr(),
            named.len(),
            source.as_ptr(),
            path_c.as_ptr(),
        );
        if message.is_null() {
            None
        } else {
            let text = CStr::from_ptr(message).to_string_lossy().into_owned();
            tch_cifar_free_message(message);
            Some(text)
        }
    };
    match message {
        None => Ok(()),
        Some(text) => bail!("cannot build the TorchScript module: {text}"),
    }
}

/// Writes `model` (on the CPU) as a TorchScript module returning `head`,
/// atomically. Before the file replaces `path`, it is loaded back with
/// tch's `CModule::load` and must compute what the Rust model computes.
pub fn write_torchscript(model: &Model, head: Head, path: &Path) -> Result<()> {
    ensure!(
        model.vs.device() == Device::Cpu,
        "export builds the TorchScript module from a model on the CPU"
    );
    let state: Vec<(String, Tensor, Role)> = model
        .state_dict()
        .into_iter()
        .map(|(name, t)| (name, t, Role::Parameter))
        .collect();
    write_checked("Net", &state, &forward_source(head), path, |module| {
        check_module(model, head, module)
    })
}

/// Saves the module ([`save_script_module`]) to a temporary file, loads it
/// back with tch's `CModule::load` and runs `check` on it before it
/// replaces `path`.
fn write_checked(
    class_name: &str,
    state: &[(String, Tensor, Role)],
    source: &str,
    path: &Path,
    check: impl FnOnce(&CModule) -> Result<()>,
) -> Result<()> {
    crate::util::files::write_atomically(path, |tmp| {
        save_script_module(class_name, state, source, tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let module = CModule::load(tmp).with_context(|| {
            format!("cannot load the module just written to {}", path.display())
        })?;
        check(&module)
    })
}

/// Writes airbench94 (on the CPU) as a TorchScript module returning
/// `head`, atomically, after checking it against the Rust network.
pub fn write_airbench_torchscript(airbench: &Airbench, head: Head, path: &Path) -> Result<()> {
    ensure!(
        airbench.vs.device() == Device::Cpu,
        "export builds the TorchScript module from a network on the CPU"
    );
    let state: Vec<(String, Tensor, Role)> = airbench
        .net
        .state_dict()
        .into_iter()
        .map(|(name, t)| {
            let role = if name.ends_with(".running_mean")
                || name.ends_with(".running_var")
                || name.ends_with(".num_batches_tracked")
            {
                Role::Buffer
            } else if t.requires_grad() {
                Role::Parameter
            } else {
                // `whiten.weight` and the BatchNorm scales, frozen in the recipe.
                Role::Frozen
            };
            (name, t.detach().contiguous(), role)
        })
        .collect();
    let variant = airbench.net.variant;
    write_checked(
        ModelKind::of_airbench(variant).class_name(),
        &state,
        &airbench_source(head, variant.logit_scale()),
        path,
        |module| check_airbench_module(&airbench.net, head, module),
    )
}

/// `module`'s `forward` must give exactly the Rust network's outputs in
/// evaluation mode, and its `tta` those of [`crate::nets::airbench::Tta`] (up
/// to rounding: that one takes [-1, 1] images), on a random batch.
fn check_airbench_module(net: &Airbench94, head: Head, module: &CModule) -> Result<()> {
    let probe = with_torch_rng(None, || {
        Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu))
    });
    let want = tch::no_grad(|| apply_head(net.forward_t(&probe, false), head));
    let got = tch::no_grad(|| module.forward_ts(&[&probe]))
        .context("running the TorchScript module failed")?;
    compare(&got, &want, 0.0)?;
    // The probe as the [-1, 1] images that renormalize to it.
    let mean = Tensor::from_slice(&crate::data::normalize::CIFAR_MEAN).to_kind(Kind::Float);
    let std = Tensor::from_slice(&crate::data::normalize::CIFAR_STD).to_kind(Kind::Float);
    let images = ((&probe * std.view([1, 3, 1, 1]) + mean.view([1, 3, 1, 1])) - 0.5) / 0.5;
    let tta = crate::nets::airbench::Tta {
        net: net.shallow_clone(),
        tta: true,
        channels_last: false,
        precision: crate::util::precision::Precision::Fp32,
    };
    let want = tch::no_grad(|| apply_head(tta.forward(&images), head));
    let got = tch::no_grad(|| module.method_ts("tta", &[&probe]))
        .context("running the TorchScript module's tta failed")?;
    compare(&got, &want, 1e-4)
}

/// Errors unless `got` has `want`'s shape and differs from it by at most `tolerance`.
fn compare(got: &Tensor, want: &Tensor, tolerance: f64) -> Result<()> {
    ensure!(
        got.size() == want.size(),
        "the TorchScript module returns shape {:?}, the Rust model {:?}",
        got.size(),
        want.size()
    );
    let diff = (got - want).abs().max().double_value(&[]);
    ensure!(
        diff <= tolerance,
        "the TorchScript module differs from the Rust model by {diff}"
    );
    Ok(())
}

/// `module` must give exactly `model`'s outputs under `head`, on a random
/// batch of three images.
fn check_module(model: &Model, head: Head, module: &CModule) -> Result<()> {
    let probe = with_torch_rng(None, || {
        Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu))
    });
    let want = tch::no_grad(|| apply_head(model.net.forward(&probe), head));
    let got = tch::no_grad(|| module.forward_ts(&[&probe]))
        .context("running the TorchScript module failed")?;
    compare(&got, &want, 0.0)
}

fn apply_head(logits: Tensor, head: Head) -> Tensor {
    match head {
        Head::Logits => logits,
        Head::Probabilities => logits.softmax(1, Kind::Float),
    }
}

/// `tch-cifar export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let requested = args.outputs();
    // Every output is checked first, so that none is written if one can't be.
    for (_, path) in &requested {
        crate::util::files::check_writable(path)?;
    }
    let flagged: Vec<(&str, &Path)> = requested
        .iter()
        .map(|(format, path)| (format.export_flag(), *path))
        .collect();
    outputs::check_distinct(&[("--weights", &args.weights)], &flagged)?;
    let mut notes = vec![];
    for (format, path) in &requested {
        notes.extend(outputs::check_extension(
            format.export_flag(),
            *format,
            path,
        )?);
    }
    for note in notes {
        eprintln!("note: {note}");
    }
    let model = Classifier::load(&args.weights, Device::Cpu)?;
    ensure!(
        model.is_finite(),
        "{} holds NaN or infinite weights (from a run that diverged?), which would export a \
         model whose every output is NaN",
        args.weights.display()
    );
    if args.tta && model.network().is_net() {
        bail!(
            "--tta bakes airbench's test-time augmentation into the ONNX graph; {} holds the \
             tutorial's Net, which has none",
            args.weights.display()
        );
    }
    for (format, path) in requested {
        match format {
            Format::TorchScript => {
                match &model {
                    Classifier::Net(net) => write_torchscript(net, args.head, path)?,
                    Classifier::Airbench94(a) => write_airbench_torchscript(a, args.head, path)?,
                }
                println!(
                    "wrote {} (TorchScript, returns {})",
                    path.display(),
                    args.head.name()
                );
            }
            Format::Onnx => {
                let onnx = crate::nets::onnx::model(&model, args.head, args.tta)?;
                crate::weights::onnx::write(&onnx, path)?;
                let tta = if args.tta {
                    " with test-time augmentation"
                } else {
                    ""
                };
                println!(
                    "wrote {} (ONNX opset {}, returns {}{tta})",
                    path.display(),
                    crate::nets::onnx::OPSET,
                    args.head.name()
                );
            }
            Format::Pth | Format::Safetensors => {
                model.save(path, format)?;
                println!("wrote {} ({} state_dict)", path.display(), format.name());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_has_the_parameters_and_gives_the_models_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let model = Model::new(Device::Cpu, Some(11));
        let x = with_torch_rng(None, || {
            Tensor::randn([5, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let logits = tch::no_grad(|| model.net.forward(&x));
        for head in [Head::Logits, Head::Probabilities] {
            write_torchscript(&model, head, &path).unwrap();
            let loaded = CModule::load(&path).unwrap();
            let names: Vec<String> = loaded
                .named_parameters()
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let want: Vec<&str> = crate::nets::tutorial::PARAMETERS
                .iter()
                .map(|(n, _)| *n)
                .collect();
            assert_eq!(names, want);
            let y = tch::no_grad(|| loaded.forward_ts(&[&x])).unwrap();
            assert_eq!(y.size(), [5, 10]);
            let want = apply_head(logits.shallow_clone(), head);
            assert!(y.equal(&want), "{head:?} differs from the Rust model");
        }
    }

    #[test]
    fn airbench_module_has_its_parameters_and_gives_its_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("w.safetensors");
        let (_vs, net) = crate::nets::airbench::net::build(
            Device::Cpu,
            12,
            4,
            crate::nets::airbench::Variant::Airbench94,
        );
        // Filters instead of the zeros a new network has, so the input matters.
        tch::no_grad(|| {
            let filters = with_torch_rng(Some(3), || {
                Tensor::randn([24, 3, 2, 2], (Kind::Float, Device::Cpu))
            });
            net.whiten_weight.shallow_clone().copy_(&filters);
        });
        let classes: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        crate::nets::classifier::save_airbench(&net, &classes, &weights, Format::Safetensors)
            .unwrap();
        let Classifier::Airbench94(airbench) = Classifier::load(&weights, Device::Cpu).unwrap()
        else {
            panic!("airbench94 weights load as airbench94");
        };
        let path = dir.path().join("m.pt");
        write_airbench_torchscript(&airbench, Head::Logits, &path).unwrap();
        let loaded = CModule::load(&path).unwrap();
        let names: Vec<String> = loaded
            .named_parameters()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let want: Vec<String> = net
            .state_dict()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !n.contains("running_") && !n.ends_with("num_batches_tracked"))
            .collect();
        assert_eq!(names, want);
        let x = with_torch_rng(Some(2), || {
            Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let y = tch::no_grad(|| loaded.forward_ts(&[&x])).unwrap();
        assert_eq!(y.size(), [2, 4]);
        assert!(y.equal(&tch::no_grad(|| net.forward_t(&x, false))));
        let tta = tch::no_grad(|| loaded.method_ts("tta", &[&x])).unwrap();
        assert_eq!(tta.size(), [2, 4]);
        assert!(!tta.equal(&y), "tta averages other views");
    }

    #[test]
    fn a_bad_source_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let err = save_script_module(
            "Net",
            &[("fc.bias".into(), t, Role::Parameter)],
            "def forward(self, x: Tensor) -> Tensor:\n    return torch.nn.functional.relu(x)\n",
            &dir.path().join("m.pt"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("attribute lookup"), "{err}");
        assert!(!dir.path().join("m.pt").exists());
    }
}
