//! `Net`, the tutorial's LeNet-style classifier, layer for layer as in
//! PyTorch, with PyTorch's default initialization, and its weights on disk.
//!
//! ```python
//! class Net(nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         self.conv1 = nn.Conv2d(3, 6, 5)
//!         self.pool = nn.MaxPool2d(2, 2)
//!         self.conv2 = nn.Conv2d(6, 16, 5)
//!         self.fc1 = nn.Linear(16 * 5 * 5, 120)
//!         self.fc2 = nn.Linear(120, 84)
//!         self.fc3 = nn.Linear(84, 10)
//! ```
//!
//! `fc3` has one output per class: ten for CIFAR-10, as many as an image
//! tree has class folders. The class names are saved with the weights (the
//! safetensors header's `classes`, a `.pth`'s `_metadata`); weights saved
//! without them are CIFAR-10's when they have ten outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::util::rng::with_torch_rng;
use crate::weights::outputs::Format;
use crate::weights::{
    classes_json, read_weights, write_safetensors, CLASSES_KEY, OPTIMIZER_PREFIX,
};

/// `nn.Conv2d` with PyTorch's parameter names and initialization.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv2d {
    fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
        }
    }

    fn new(vs: nn::Path, in_channels: i64, out_channels: i64, kernel: i64) -> Self {
        let fan_in = in_channels * kernel * kernel;
        // Weight before bias: PyTorch's order, so one seed gives one init.
        let weight = vs.var(
            "weight",
            &[out_channels, in_channels, kernel, kernel],
            weight_init(fan_in),
        );
        let bias = vs.var("bias", &[out_channels], bias_init(fan_in));
        Self { weight, bias }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(&self.weight, Some(&self.bias), [1, 1], [0, 0], [1, 1], 1)
    }
}

/// `nn.Linear` with PyTorch's parameter names and initialization.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
        }
    }

    fn new(vs: nn::Path, in_features: i64, out_features: i64) -> Self {
        let weight = vs.var(
            "weight",
            &[out_features, in_features],
            weight_init(in_features),
        );
        let bias = vs.var("bias", &[out_features], bias_init(in_features));
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, Some(&self.bias))
    }
}

/// `kaiming_uniform_(w, a=sqrt(5))`, computed in f64 step by step as
/// `torch.nn.init` does, so the bound is bit-equal: 1/sqrt(fan_in) up to
/// rounding. (tch's own default is Kaiming with ReLU gain, which trains
/// differently.)
fn weight_init(fan_in: i64) -> nn::Init {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a.powi(2))).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// PyTorch's bias init: uniform in ±1/sqrt(fan_in).
fn bias_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// The tutorial's network. Its output is the logits: no softmax, since
/// `CrossEntropyLoss` applies log-softmax itself.
#[derive(Debug)]
pub struct Net {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

/// The `state_dict` keys and shapes of the tutorial's `Net` (ten classes),
/// in PyTorch's order; [`parameter_shapes`] gives them for any count.
pub const PARAMETERS: [(&str, &[i64]); 10] = [
    ("conv1.weight", &[6, 3, 5, 5]),
    ("conv1.bias", &[6]),
    ("conv2.weight", &[16, 6, 5, 5]),
    ("conv2.bias", &[16]),
    ("fc1.weight", &[120, 400]),
    ("fc1.bias", &[120]),
    ("fc2.weight", &[84, 120]),
    ("fc2.bias", &[84]),
    ("fc3.weight", &[10, 84]),
    ("fc3.bias", &[10]),
];

/// The `state_dict` keys and shapes of a `Net` with `num_classes` outputs.
pub fn parameter_shapes(num_classes: i64) -> Vec<(&'static str, Vec<i64>)> {
    PARAMETERS
        .iter()
        .map(|&(name, shape)| {
            let shape = match name {
                "fc3.weight" => vec![num_classes, 84],
                "fc3.bias" => vec![num_classes],
                _ => shape.to_vec(),
            };
            (name, shape)
        })
        .collect()
}

impl Net {
    /// Creates the layers under `vs` with `num_classes` outputs, initialized
    /// from torch's global RNG (seed it with `tch::manual_seed`).
    pub fn new(vs: &nn::Path, num_classes: i64) -> Net {
        Net {
            conv1: Conv2d::new(vs / "conv1", 3, 6, 5),
            conv2: Conv2d::new(vs / "conv2", 6, 16, 5),
            fc1: Linear::new(vs / "fc1", 16 * 5 * 5, 120),
            fc2: Linear::new(vs / "fc2", 120, 84),
            fc3: Linear::new(vs / "fc3", 84, num_classes),
        }
    }

    /// The same network, its tensors shared (not copied).
    pub fn shallow_clone(&self) -> Net {
        Net {
            conv1: self.conv1.shallow_clone(),
            conv2: self.conv2.shallow_clone(),
            fc1: self.fc1.shallow_clone(),
            fc2: self.fc2.shallow_clone(),
            fc3: self.fc3.shallow_clone(),
        }
    }
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Tensor {
        // `self.pool` is MaxPool2d(2, 2); it has no weights, so it is a call.
        let pool = |x: Tensor| x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let x = pool(self.conv1.forward(xs).relu()); // [N, 3, 32, 32] -> [N, 6, 14, 14]
        let x = pool(self.conv2.forward(&x).relu()); // -> [N, 16, 5, 5]
        let x = x.flatten(1, -1); // -> [N, 400]
        let x = self.fc1.forward(&x).relu(); // -> [N, 120]
        let x = self.fc2.forward(&x).relu(); // -> [N, 84]
        self.fc3.forward(&x) // -> [N, classes] logits
    }
}

/// Makes `params` (in [`PARAMETERS`] order) views into `flat`.
fn share_storage(mut params: Vec<Tensor>, flat: &Tensor) {
    let mut offset = 0;
    for p in &mut params {
        let numel = p.numel() as i64;
        p.set_data(&flat.narrow(0, offset, numel).view(p.size().as_slice()));
        offset += numel;
    }
}

/// A `Net` with its own variable store on `device`.
///
/// All parameters are views into one contiguous tensor, `flat`, in
/// [`PARAMETERS`] order, so that optimizers can update them in a few
/// operations.
#[derive(Debug)]
pub struct Model {
    pub vs: nn::VarStore,
    pub net: Net,
    pub flat: Tensor,
    /// The class names, one per output, in label order.
    classes: Vec<String>,
    /// Whether the names came with the weights (or the data), rather than
    /// being guessed for a file that has none.
    named: bool,
}

impl Model {
    /// A freshly initialized `Net` for CIFAR-10's ten classes; `seed` fixes
    /// torch's RNG first.
    pub fn new(device: Device, seed: Option<u64>) -> Model {
        Model::with_classes(device, seed, crate::data::cifar::classes())
    }

    /// A freshly initialized `Net` with one output per class in `classes`.
    pub fn with_classes(device: Device, seed: Option<u64>, classes: Vec<String>) -> Model {
        let num_classes = classes.len() as i64;
        // The weights are drawn on the CPU, as `Net()` in Python draws them
        // before `.to(device)`: a CUDA generator would give other numbers
        // for the same seed.
        let (mut vs, net) = with_torch_rng(seed, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Net::new(&vs.root(), num_classes);
            (vs, net)
        });
        vs.set_device(device);
        let params = parameters(&vs);
        let flat =
            tch::no_grad(|| Tensor::cat(&params.iter().map(|p| p.view(-1)).collect::<Vec<_>>(), 0));
        share_storage(params, &flat);
        Model {
            vs,
            net,
            flat,
            classes,
            named: true,
        }
    }

    /// The class names, one per output, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Whether the class names came with the weights: false for a file
    /// without them (from before they were saved, or from PyTorch), whose
    /// names [`Model::load`] made up.
    pub fn has_class_names(&self) -> bool {
        self.named
    }

    /// Renames the classes (as many as before): for weights without names,
    /// the names of the data they are used on.
    pub fn set_classes(&mut self, classes: Vec<String>) {
        assert_eq!(classes.len(), self.classes.len(), "one name per output");
        self.classes = classes;
        self.named = true;
    }

    /// This model's `state_dict` keys and shapes.
    pub fn parameter_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        parameter_shapes(self.classes.len() as i64)
    }

    /// Casts the weights to `kind` (f64 for `compare-losses --dtype f64`);
    /// the parameters stay views into one flat tensor.
    pub fn set_kind(&mut self, kind: Kind) {
        let flat = tch::no_grad(|| self.flat.to_kind(kind));
        share_storage(self.parameters(), &flat);
        self.flat = flat;
    }

    /// The parameters (sharing storage with the model) in [`PARAMETERS`] order.
    pub fn parameters(&self) -> Vec<Tensor> {
        parameters(&self.vs)
    }

    /// A `Net` on `device` holding the weights in `path`: a `state_dict`
    /// file, or a training checkpoint (whose SGD momentum is left out). Its
    /// classes are the file's; a file without them is CIFAR-10's when `fc3`
    /// has ten outputs, else its classes are named by their index.
    pub fn load(path: &Path, device: Device) -> Result<Model> {
        let (mut tensors, classes) = read_weights(path)?;
        tensors.retain(|key, _| !key.starts_with(OPTIMIZER_PREFIX));
        let outputs = tensors
            .get("fc3.weight")
            .map(|w| w.size())
            .filter(|s| s.len() == 2 && s[0] >= 1)
            .map(|s| s[0] as usize);
        let named = classes.is_some();
        let classes = match (classes, outputs) {
            (Some(classes), Some(n)) if classes.len() != n => bail!(
                "{}: lists {} classes, but `fc3.weight` has {n} outputs",
                path.display(),
                classes.len()
            ),
            (Some(classes), _) => classes,
            (None, Some(n)) if n != crate::data::CLASSES.len() => {
                (0..n).map(|i| i.to_string()).collect()
            }
            (None, _) => crate::data::cifar::classes(),
        };
        let mut model = Model::with_classes(device, None, classes);
        model.named = named;
        model.set_state_dict(tensors, path)?;
        Ok(model)
    }

    /// The parameters keyed like PyTorch's `state_dict`, on the CPU.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        PARAMETERS
            .iter()
            .map(|(name, _)| {
                (
                    name.to_string(),
                    vars[*name].detach().to_device(Device::Cpu).copy(),
                )
            })
            .collect()
    }

    /// Copies `tensors` into the parameters after [`check_state_dict`].
    pub fn set_state_dict(
        &mut self,
        tensors: HashMap<String, Tensor>,
        origin: &Path,
    ) -> Result<()> {
        check_state_dict(&tensors, &self.parameter_shapes(), origin)?;
        let mut vars = self.vs.variables();
        for (name, _) in PARAMETERS {
            let var = vars
                .get_mut(name)
                .expect("PARAMETERS lists Net's variables");
            tch::no_grad(|| var.copy_(&tensors[name].to_kind(Kind::Float)));
        }
        Ok(())
    }

    /// Whether every weight is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        tch::no_grad(|| self.flat.isfinite().all().int64_value(&[])) != 0
    }

    /// Writes the weights as safetensors, with the class names in the
    /// header's metadata, atomically: a temporary file in the same folder,
    /// synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = HashMap::from([(CLASSES_KEY.to_string(), classes_json(&self.classes))]);
        write_safetensors(path, &self.state_dict(), metadata)
    }

    /// Writes the weights in `torch.save`'s format (an `OrderedDict`, like
    /// `torch.save(net.state_dict(), PATH)`, with the class names in its
    /// `_metadata`), atomically.
    pub fn save_pth(&self, path: &Path) -> Result<()> {
        crate::weights::pth::write(path, &self.state_dict(), Some(&self.classes))
    }

    /// Writes the `state_dict` to `path` as `format`, atomically.
    pub fn save_as(&self, path: &Path, format: Format) -> Result<()> {
        match format {
            Format::Safetensors => self.save(path),
            Format::Pth => self.save_pth(path),
            Format::TorchScript | Format::Onnx => bail!(
                "cannot write {}: weights alone are no {} model (use `tch-cifar export`)",
                path.display(),
                format.name()
            ),
        }
    }
}

/// Checks that `tensors` are Net's `state_dict` with the parameter `shapes`
/// ([`parameter_shapes`]): every key present, none extra, shapes equal,
/// floats. `origin` names the source in errors.
pub fn check_state_dict(
    tensors: &HashMap<String, Tensor>,
    shapes: &[(&'static str, Vec<i64>)],
    origin: &Path,
) -> Result<()> {
    let origin = origin.display();
    let extra = tensors
        .keys()
        .find(|k| !PARAMETERS.iter().any(|(p, _)| p == k));
    if let Some(key) = extra {
        bail!(
            "{origin}: unexpected key `{key}` (Net's keys are {})",
            PARAMETERS.map(|(k, _)| k).join(", ")
        );
    }
    for (name, shape) in shapes {
        let Some(src) = tensors.get(*name) else {
            bail!("{origin}: missing key `{name}`");
        };
        if &src.size() != shape {
            bail!(
                "{origin}: key `{name}` has shape {:?}, Net expects {shape:?}",
                src.size()
            );
        }
        if !src.is_floating_point() {
            bail!(
                "{origin}: key `{name}` holds {:?} values, not floats",
                src.kind()
            );
        }
    }
    Ok(())
}

fn parameters(vs: &nn::VarStore) -> Vec<Tensor> {
    let vars = vs.variables();
    PARAMETERS
        .iter()
        .map(|(name, _)| vars[*name].shallow_clone())
        .collect()
}

/// Parameter names and shapes, as a `BTreeMap` for comparisons in tests.
pub fn shapes(vs: &nn::VarStore) -> BTreeMap<String, Vec<i64>> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.size()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_shape_is_batch_by_ten() {
        let model = Model::new(Device::Cpu, Some(1));
        let out = model
            .net
            .forward(&Tensor::zeros([7, 3, 32, 32], (Kind::Float, Device::Cpu)));
        assert_eq!(out.size(), [7, 10]);
    }

    #[test]
    fn parameter_names_and_shapes_match_pytorch() {
        let model = Model::new(Device::Cpu, Some(1));
        let expected: BTreeMap<String, Vec<i64>> = PARAMETERS
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect();
        assert_eq!(shapes(&model.vs), expected);
        let total: i64 = PARAMETERS
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        assert_eq!(total, 62_006, "the tutorial's Net has 62,006 parameters");
    }

    #[test]
    fn init_is_uniform_within_one_over_sqrt_fan_in() {
        let model = Model::new(Device::Cpu, Some(3));
        let vars = model.vs.variables();
        for (name, fan_in) in [
            ("conv1", 75.0),
            ("conv2", 150.0),
            ("fc1", 400.0),
            ("fc2", 120.0),
            ("fc3", 84.0),
        ] {
            let bound = 1.0 / f64::sqrt(fan_in);
            for p in ["weight", "bias"] {
                let t = &vars[&format!("{name}.{p}")];
                let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
                assert!(
                    lo >= -bound - 1e-7 && hi <= bound + 1e-7,
                    "{name}.{p} in [{lo}, {hi}]"
                );
                // Spread out over the range, not a constant or a narrow normal.
                assert!(
                    hi - lo > bound,
                    "{name}.{p} spans only [{lo}, {hi}], bound {bound}"
                );
            }
            // Uniform on ±b has std b/sqrt(3); tch's Kaiming/ReLU default would be sqrt(2)x wider.
            let std = vars[&format!("{name}.weight")].std(true).double_value(&[]);
            let want = bound / 3f64.sqrt();
            assert!(
                (std - want).abs() < 0.15 * want,
                "{name}.weight std {std}, want {want}"
            );
        }
        // Conv biases are not zero (tch's default would make them zero).
        assert!(vars["conv1.bias"].abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn parameters_are_views_of_the_flat_buffer() {
        let model = Model::new(Device::Cpu, Some(4));
        assert_eq!(model.flat.size(), [62_006]);
        let _ = tch::no_grad(|| model.flat.shallow_clone().fill_(0.25));
        for (name, t) in model.vs.variables() {
            assert!(t.requires_grad(), "{name} must stay trainable");
            assert_eq!(
                t.min().double_value(&[]),
                0.25,
                "{name} does not alias flat"
            );
        }
    }

    #[test]
    fn same_seed_same_weights() {
        let a = Model::new(Device::Cpu, Some(42)).state_dict();
        let b = Model::new(Device::Cpu, Some(42)).state_dict();
        let c = Model::new(Device::Cpu, Some(43)).state_dict();
        for ((ka, ta), (_, tb)) in a.iter().zip(&b) {
            assert!(ta.equal(tb), "{ka} differs under one seed");
        }
        assert!(!a[0].1.equal(&c[0].1));
    }

    #[test]
    fn save_then_load_round_trips_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let model = Model::new(Device::Cpu, Some(5));
        model.save(&path).unwrap();
        let loaded = Model::load(&path, Device::Cpu).unwrap();
        for ((k, a), (_, b)) in model.state_dict().iter().zip(&loaded.state_dict()) {
            assert!(a.equal(b), "{k} changed on the round trip");
        }

        let mut state: Vec<(String, Tensor)> = model.state_dict();
        state.retain(|(k, _)| k != "fc3.bias");
        let missing = dir.path().join("missing.safetensors");
        Tensor::write_safetensors(&state, &missing).unwrap();
        let err = Model::load(&missing, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("missing key `fc3.bias`"), "{err}");

        state.push((
            "fc3.bias".into(),
            Tensor::zeros([11], (Kind::Float, Device::Cpu)),
        ));
        let shape = dir.path().join("shape.safetensors");
        Tensor::write_safetensors(&state, &shape).unwrap();
        let err = Model::load(&shape, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("`fc3.bias` has shape [11]"), "{err}");

        state.pop();
        state.push((
            "fc3.bias".into(),
            Tensor::zeros([10], (Kind::Float, Device::Cpu)),
        ));
        state.push((
            "fc4.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ));
        let extra = dir.path().join("extra.safetensors");
        Tensor::write_safetensors(&state, &extra).unwrap();
        let err = Model::load(&extra, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("unexpected key `fc4.weight`"), "{err}");

        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not weights at all").unwrap();
        let err = format!("{:#}", Model::load(&garbage, Device::Cpu).unwrap_err());
        assert!(err.contains("garbage.safetensors"), "{err}");
    }

    #[test]
    fn class_names_travel_with_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = ["cat", "dog", "émeu"].map(String::from).to_vec();
        let model = Model::with_classes(Device::Cpu, Some(6), names.clone());
        let out = model
            .net
            .forward(&Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)));
        assert_eq!(out.size(), [2, 3]);
        assert_eq!(model.flat.size(), [62_006 - 7 * 85]);
        for file in ["w.safetensors", "w.pth"] {
            let path = dir.path().join(file);
            if file.ends_with(".pth") {
                model.save_pth(&path).unwrap();
            } else {
                model.save(&path).unwrap();
            }
            let loaded = Model::load(&path, Device::Cpu).unwrap();
            assert_eq!(loaded.classes(), names, "{file}");
            assert!(loaded.flat.equal(&model.flat), "{file}");
        }
        // Weights without a class list: CIFAR-10's names for ten outputs,
        // numbers for any other count.
        let bare = dir.path().join("bare.safetensors");
        Tensor::write_safetensors(&model.state_dict(), &bare).unwrap();
        assert_eq!(
            Model::load(&bare, Device::Cpu).unwrap().classes(),
            ["0", "1", "2"]
        );
        let ten = Model::new(Device::Cpu, Some(1));
        Tensor::write_safetensors(&ten.state_dict(), &bare).unwrap();
        assert_eq!(
            Model::load(&bare, Device::Cpu).unwrap().classes(),
            crate::data::CLASSES
        );
        // Seeded like Net(3) in Python: the first layers' draws are the
        // ten-class Net's, in the same order.
        let a = Model::with_classes(Device::Cpu, Some(6), names).state_dict();
        let b = Model::new(Device::Cpu, Some(6)).state_dict();
        assert!(a[0].1.equal(&b[0].1));
    }
}
