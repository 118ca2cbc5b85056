//! Either network behind one interface, loaded from a weights file: the
//! tutorial's `Net` ([`Model`]) or airbench94 ([`Airbench`]). The file says
//! which: its safetensors metadata `model` ([`MODEL_KEY`]), or, for a file
//! without it (a `.pth`, or weights saved from PyTorch), its keys: airbench94
//! has `whiten.weight`, `Net` does not.
//!
//! `evaluate`, `predict` and `export` take weights through here; the class
//! names follow [`Model`]'s rule for both (the file's, else CIFAR-10's for
//! ten outputs, else numbers).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::nets::airbench::net::{self, state_dict_shapes, Airbench94};
use crate::nets::airbench::{Tta, Variant};
use crate::nets::tutorial::Model;
use crate::nets::ModelKind;
use crate::util::precision::Precision;
use crate::weights::outputs::Format;
use crate::weights::{classes_json, read_weights, CLASSES_KEY, MODEL_KEY, OPTIMIZER_PREFIX};

/// Weights loaded from a file, for either network.
#[derive(Debug)]
pub enum Classifier {
    Net(Model),
    Airbench94(Box<Airbench>),
}

/// An airbench94 network with its own variable store, and its class names.
#[derive(Debug)]
pub struct Airbench {
    pub vs: nn::VarStore,
    pub net: Airbench94,
    classes: Vec<String>,
    named: bool,
}

/// Test-time augmentation, for the commands that run a network on images.
#[derive(Debug, Clone, clap::Args)]
pub struct TtaArgs {
    /// Average over the mirror image and two 1-pixel shifts (airbench94; its default).
    ///
    /// airbench94's test-time augmentation: the logits are the mean over
    /// the image, its mirror and, at half the weight, the two 1-pixel
    /// diagonal translations and their mirrors. The tutorial's Net has
    /// none: --tta is refused for its weights.
    #[arg(long, overrides_with = "no_tta", help_heading = "Model")]
    pub tta: bool,
    /// Run airbench94 without test-time augmentation (as Net always runs).
    #[arg(long, overrides_with = "tta", help_heading = "Model")]
    pub no_tta: bool,
}

impl TtaArgs {
    /// Whether to augment with `classifier` from `weights`: by default for
    /// airbench94, never for `Net` (where `--tta` is an error).
    pub fn resolve(&self, classifier: &Classifier, weights: &Path) -> Result<bool> {
        match classifier.network() {
            ModelKind::Airbench94 | ModelKind::Airbench94Muon => Ok(!self.no_tta),
            ModelKind::Net if self.tta => bail!(
                "--tta applies to airbench94 weights; {} holds the tutorial's Net, which has \
                 no test-time augmentation",
                weights.display()
            ),
            ModelKind::Net => Ok(false),
        }
    }
}

/// The forward pass a command runs on images normalized to [−1, 1].
#[derive(Debug)]
pub enum Forward {
    /// Shares its tensors with the loaded network.
    Net(crate::nets::tutorial::Net),
    Airbench94(Box<Tta>),
}

impl Module for Forward {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Forward::Net(net) => net.forward(xs),
            Forward::Airbench94(tta) => tta.forward(xs),
        }
    }
}

impl Classifier {
    /// The network in `path` (a `state_dict` in safetensors or `.pth`, or
    /// a training checkpoint of `Net`), on `device`.
    pub fn load(path: &Path, device: Device) -> Result<Classifier> {
        // Weights files name the network in lower case, checkpoints by its
        // class (`Net`, `Airbench94`).
        let network = match metadata_model(path) {
            Some(name) => {
                let known = [
                    ModelKind::Net,
                    ModelKind::Airbench94,
                    ModelKind::Airbench94Muon,
                ];
                let found = known.into_iter().find(|m| {
                    name.eq_ignore_ascii_case(m.name()) || name.eq_ignore_ascii_case(m.class_name())
                });
                match found {
                    Some(m) => m,
                    None => bail!(
                        "{}: the metadata names the network `{name}`; known are net, airbench94 \
                         and airbench94-muon",
                        path.display()
                    ),
                }
            }
            None => {
                // A file from PyTorch does not name its network: airbench's
                // keys are taken as airbench94's (airbench94-muon's logits
                // are scaled by 1/256 instead of 1/9, which changes no
                // predicted class).
                let (tensors, classes) = read_weights(path)?;
                if tensors.contains_key("whiten.weight") {
                    let variant = crate::nets::airbench::Variant::Airbench94;
                    let airbench = Airbench::from_tensors(tensors, classes, path, device, variant)?;
                    return Ok(Classifier::Airbench94(Box::new(airbench)));
                }
                ModelKind::Net
            }
        };
        Ok(match network.airbench() {
            None => Classifier::Net(Model::load(path, device)?),
            Some(variant) => {
                Classifier::Airbench94(Box::new(Airbench::load(path, device, variant)?))
            }
        })
    }

    pub fn network(&self) -> ModelKind {
        match self {
            Classifier::Net(_) => ModelKind::Net,
            Classifier::Airbench94(a) => ModelKind::of_airbench(a.net.variant),
        }
    }

    /// The class names, one per output, in label order.
    pub fn classes(&self) -> &[String] {
        match self {
            Classifier::Net(m) => m.classes(),
            Classifier::Airbench94(a) => &a.classes,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.classes().len()
    }

    /// Whether the class names came with the weights.
    pub fn has_class_names(&self) -> bool {
        match self {
            Classifier::Net(m) => m.has_class_names(),
            Classifier::Airbench94(a) => a.named,
        }
    }

    /// Renames the classes (as many as before), for weights without names.
    pub fn set_classes(&mut self, classes: Vec<String>) {
        match self {
            Classifier::Net(m) => m.set_classes(classes),
            Classifier::Airbench94(a) => {
                assert_eq!(classes.len(), a.classes.len(), "one name per output");
                a.classes = classes;
                a.named = true;
            }
        }
    }

    /// The network on images normalized to [−1, 1]; `tta` (airbench94
    /// only) adds test-time augmentation.
    pub fn forward(&self, tta: bool) -> Forward {
        match self {
            Classifier::Net(m) => {
                assert!(!tta, "Net has no test-time augmentation");
                Forward::Net(m.net.shallow_clone())
            }
            Classifier::Airbench94(a) => Forward::Airbench94(Box::new(a.tta(tta))),
        }
    }

    /// [`Classifier::forward`] under `precision`'s autocast (airbench; Net
    /// has none and runs in float32).
    pub fn forward_in(&self, tta: bool, precision: Precision) -> Forward {
        match self.forward(tta) {
            Forward::Airbench94(mut t) => {
                t.precision = precision;
                Forward::Airbench94(t)
            }
            net => net,
        }
    }

    /// Whether every weight is finite.
    pub fn is_finite(&self) -> bool {
        match self {
            Classifier::Net(m) => m.is_finite(),
            Classifier::Airbench94(a) => a.is_finite(),
        }
    }

    /// Writes the weights as `format` (safetensors or `.pth`), keyed like
    /// the PyTorch definition, with the class names.
    pub fn save(&self, path: &Path, format: Format) -> Result<()> {
        match self {
            Classifier::Net(m) => m.save_as(path, format),
            Classifier::Airbench94(a) => save_airbench(&a.net, &a.classes, path, format),
        }
    }
}

impl Airbench {
    /// A network `train` has just trained, with its class names.
    pub fn trained(vs: nn::VarStore, net: Airbench94, classes: Vec<String>) -> Airbench {
        Airbench {
            vs,
            net,
            classes,
            named: true,
        }
    }

    /// The airbench network of `variant` in `path`, on `device`.
    pub fn load(path: &Path, device: Device, variant: Variant) -> Result<Airbench> {
        let (tensors, classes) = read_weights(path)?;
        Airbench::from_tensors(tensors, classes, path, device, variant)
    }

    fn from_tensors(
        mut tensors: HashMap<String, Tensor>,
        classes: Option<Vec<String>>,
        path: &Path,
        device: Device,
        variant: Variant,
    ) -> Result<Airbench> {
        // A training checkpoint: its optimizer state is left out, and the
        // step counters it does not keep (they do not change evaluation)
        // start at zero.
        let checkpoint = tensors.keys().any(|k| k.starts_with(OPTIMIZER_PREFIX));
        tensors.retain(|key, _| !key.starts_with(OPTIMIZER_PREFIX));
        if checkpoint {
            for (key, _) in state_dict_shapes(1) {
                if key.ends_with("num_batches_tracked") {
                    tensors.entry(key).or_insert_with(|| Tensor::from(0i64));
                }
            }
        }
        let outputs = tensors
            .get("head.weight")
            .map(|w| w.size())
            .filter(|s| s.len() == 2 && s[0] >= 1)
            .map(|s| s[0] as usize);
        let Some(outputs) = outputs else {
            bail!(
                "{}: airbench94 weights need `head.weight` of shape [classes, 256]",
                path.display()
            );
        };
        let named = classes.is_some();
        let classes = match classes {
            Some(classes) if classes.len() != outputs => bail!(
                "{}: lists {} classes, but `head.weight` has {outputs} outputs",
                path.display(),
                classes.len()
            ),
            Some(classes) => classes,
            None if outputs == crate::data::CLASSES.len() => crate::data::cifar::classes(),
            None => (0..outputs).map(|i| i.to_string()).collect(),
        };
        check_state_dict(&tensors, outputs as i64, path)?;
        let (vs, net) = net::build(Device::Cpu, 0, outputs as i64, variant);
        tch::no_grad(|| {
            for (key, mut t) in net.state_dict() {
                t.copy_(&tensors[&key].to_kind(t.kind()));
            }
        });
        let mut airbench = Airbench {
            vs,
            net,
            classes,
            named,
        };
        airbench.vs.set_device(device);
        Ok(airbench)
    }

    /// The network in evaluation mode on [−1, 1] images, channels-last as
    /// training evaluates it (the same numbers as `train` reports): its
    /// 4-d weights are rewritten with channels-last strides, in place.
    pub fn tta(&self, tta: bool) -> Tta {
        let net = self.net.shallow_clone();
        let state: Vec<Tensor> = net.state_dict().into_iter().map(|(_, t)| t).collect();
        net::to_channels_last(&state);
        let precision = Precision::legacy(self.vs.device());
        Tta {
            net,
            tta,
            channels_last: true,
            precision,
        }
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn is_finite(&self) -> bool {
        tch::no_grad(|| {
            self.net
                .state_dict()
                .iter()
                .all(|(_, t)| !t.is_floating_point() || t.isfinite().all().int64_value(&[]) == 1)
        })
    }
}

/// Checks that `tensors` are airbench94's `state_dict` for `num_classes`:
/// every key present, none extra, shapes equal, floats (integers for
/// `num_batches_tracked`). `origin` names the file in errors.
pub fn check_state_dict(
    tensors: &HashMap<String, Tensor>,
    num_classes: i64,
    origin: &Path,
) -> Result<()> {
    let origin = origin.display();
    let shapes = state_dict_shapes(num_classes);
    if let Some(key) = tensors
        .keys()
        .find(|k| !shapes.iter().any(|(s, _)| s == *k))
    {
        bail!("{origin}: unexpected key `{key}` for airbench94");
    }
    for (name, shape) in &shapes {
        let Some(t) = tensors.get(name) else {
            bail!("{origin}: missing key `{name}` for airbench94");
        };
        if &t.size() != shape {
            bail!(
                "{origin}: key `{name}` has shape {:?}, airbench94 expects {shape:?}",
                t.size()
            );
        }
        let counter = name.ends_with("num_batches_tracked");
        if counter == t.is_floating_point() || t.kind() == Kind::Bool {
            bail!(
                "{origin}: key `{name}` holds {:?} values, not {}",
                t.kind(),
                if counter { "integers" } else { "floats" }
            );
        }
    }
    Ok(())
}

/// Writes airbench94's `state_dict` (keyed like `scripts/airbench94.py`'s
/// `Airbench94`) with its class names; safetensors also name the network.
pub fn save_airbench(
    net: &Airbench94,
    classes: &[String],
    path: &Path,
    format: Format,
) -> Result<()> {
    let state: Vec<(String, Tensor)> = net
        .state_dict()
        .into_iter()
        .map(|(k, t)| (k, t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    match format {
        Format::Safetensors => {
            let metadata = HashMap::from([
                (CLASSES_KEY.to_string(), classes_json(classes)),
                (
                    MODEL_KEY.to_string(),
                    ModelKind::of_airbench(net.variant).name().to_string(),
                ),
            ]);
            crate::weights::write_safetensors(path, &state, metadata)
        }
        Format::Pth => {
            let model = ModelKind::of_airbench(net.variant).name();
            crate::weights::pth::write_named(path, &state, Some(classes), Some(model))
        }
        Format::TorchScript | Format::Onnx => bail!(
            "cannot write {}: weights alone are no {} model (use `tch-cifar export`)",
            path.display(),
            format.name()
        ),
    }
}

/// The `model` entry of a safetensors file's metadata or of a `.pth`'s
/// `_metadata`, if the file has one. Anything unreadable is `None`: reading
/// the weights then says what is wrong.
fn metadata_model(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    if crate::weights::pth::is_zip(&len[..4]) {
        return crate::weights::pth::model_name(path);
    }
    let len = u64::from_le_bytes(len);
    // safetensors' own limit on a header.
    if len > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(
        header
            .get("__metadata__")?
            .get(MODEL_KEY)?
            .as_str()?
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained_looking(seed: u64, classes: i64) -> Airbench94 {
        trained_looking_variant(seed, classes, Variant::Airbench94)
    }

    fn trained_looking_variant(seed: u64, classes: i64, variant: Variant) -> Airbench94 {
        let (_vs, net) = net::build(Device::Cpu, seed, classes, variant);
        tch::no_grad(|| {
            crate::util::rng::with_torch_rng(Some(seed), || {
                for (_, mut t) in net.state_dict() {
                    if t.is_floating_point() {
                        // Positive, so that running_var is a variance.
                        t.copy_(&(Tensor::rand_like(&t) + 0.5));
                    }
                }
            })
        });
        net
    }

    /// airbench94-muon's weights name their network in both formats, so its
    /// logits keep their scale.
    #[test]
    fn muon_weights_load_as_muon_from_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let net = trained_looking_variant(4, 10, Variant::Muon);
        let x = crate::util::rng::with_torch_rng(Some(1), || {
            Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let want = tch::no_grad(|| net.forward_t(&x, false));
        for (file, format) in [
            ("m.safetensors", Format::Safetensors),
            ("m.pth", Format::Pth),
        ] {
            let path = dir.path().join(file);
            save_airbench(&net, &crate::data::cifar::classes(), &path, format).unwrap();
            let loaded = Classifier::load(&path, Device::Cpu).unwrap();
            assert_eq!(loaded.network(), ModelKind::Airbench94Muon, "{file}");
            let Classifier::Airbench94(a) = &loaded else {
                unreachable!()
            };
            assert!(
                tch::no_grad(|| a.net.forward_t(&x, false)).equal(&want),
                "{file}"
            );
        }
    }

    #[test]
    fn airbench_weights_round_trip_in_both_formats_and_are_told_by_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let net = trained_looking(3, 10);
        let classes = crate::data::cifar::classes();
        let x = crate::util::rng::with_torch_rng(Some(1), || {
            Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let want = tch::no_grad(|| net.forward_t(&x, false));
        for (file, format) in [
            ("w.safetensors", Format::Safetensors),
            ("w.pth", Format::Pth),
        ] {
            let path = dir.path().join(file);
            save_airbench(&net, &classes, &path, format).unwrap();
            let loaded = Classifier::load(&path, Device::Cpu).unwrap();
            assert_eq!(loaded.network(), ModelKind::Airbench94, "{file}");
            assert!(loaded.has_class_names());
            let Classifier::Airbench94(a) = &loaded else {
                unreachable!()
            };
            let got = tch::no_grad(|| a.net.forward_t(&x, false));
            assert!(got.equal(&want), "{file}");
            let counter = &a.net.layer2.norm1.num_batches_tracked;
            assert_eq!(counter.kind(), Kind::Int64);
        }
        // No metadata: the keys tell, and ten outputs are CIFAR-10's.
        let bare = dir.path().join("bare.safetensors");
        Tensor::write_safetensors(&net.state_dict(), &bare).unwrap();
        let loaded = Classifier::load(&bare, Device::Cpu).unwrap();
        assert_eq!(loaded.network(), ModelKind::Airbench94);
        assert!(!loaded.has_class_names());
        assert_eq!(loaded.classes(), crate::data::CLASSES);
        // Checkpoints name the network by its class.
        let metadata = HashMap::from([(MODEL_KEY.to_string(), "Airbench94".to_string())]);
        crate::weights::write_safetensors(&bare, &net.state_dict(), metadata).unwrap();
        let loaded = Classifier::load(&bare, Device::Cpu).unwrap();
        assert_eq!(loaded.network(), ModelKind::Airbench94);
        // A Net file stays a Net.
        let tutorial = dir.path().join("net.safetensors");
        Model::new(Device::Cpu, Some(1)).save(&tutorial).unwrap();
        assert_eq!(
            Classifier::load(&tutorial, Device::Cpu).unwrap().network(),
            ModelKind::Net
        );
    }

    #[test]
    fn bad_airbench_files_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let net = trained_looking(4, 3);
        let path = dir.path().join("w.safetensors");
        let write = |state: &[(String, Tensor)]| {
            let metadata = HashMap::from([(MODEL_KEY.to_string(), "airbench94".to_string())]);
            crate::weights::write_safetensors(&path, state, metadata).unwrap();
            format!("{:#}", Classifier::load(&path, Device::Cpu).unwrap_err())
        };
        let mut state = net.state_dict();
        state.retain(|(k, _)| k != "layer2.norm2.running_var");
        let err = write(&state);
        assert!(
            err.contains("w.safetensors: missing key `layer2.norm2.running_var`"),
            "{err}"
        );
        state.push((
            "layer2.norm2.running_var".into(),
            Tensor::zeros([5], (Kind::Float, Device::Cpu)),
        ));
        let err = write(&state);
        assert!(
            err.contains("key `layer2.norm2.running_var` has shape [5]"),
            "{err}"
        );
        let mut state = net.state_dict();
        state.push((
            "extra.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ));
        assert!(write(&state).contains("unexpected key `extra.weight`"));
        let mut state = net.state_dict();
        for (k, t) in &mut state {
            if k == "layer1.norm1.num_batches_tracked" {
                *t = Tensor::from(1.0f32);
            }
        }
        let err = write(&state);
        assert!(
            err.contains("`layer1.norm1.num_batches_tracked` holds Float values, not integers"),
            "{err}"
        );
        let metadata = HashMap::from([(MODEL_KEY.to_string(), "resnet".to_string())]);
        crate::weights::write_safetensors(&path, &net.state_dict(), metadata).unwrap();
        let err = format!("{:#}", Classifier::load(&path, Device::Cpu).unwrap_err());
        assert!(err.contains("names the network `resnet`"), "{err}");
    }
}
