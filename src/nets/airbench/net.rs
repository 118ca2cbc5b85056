//! `Airbench94`, the fast recipe's network, module for module as its
//! PyTorch definition in `scripts/airbench94.py`, with the same
//! `state_dict` keys:
//!
//! ```python
//! class Airbench94(nn.Module):
//!     def __init__(self, num_classes=10):
//!         self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)  # frozen weight
//!         self.layer1 = ConvGroup(24, 64)
//!         self.layer2 = ConvGroup(64, 256)
//!         self.layer3 = ConvGroup(256, 256)
//!         self.pool = nn.MaxPool2d(3)
//!         self.head = nn.Linear(256, num_classes, bias=False)
//! ```

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use super::{BN_EPS, BN_MOMENTUM, LOGIT_SCALE, WHITEN_WIDTH, WIDTHS};

/// The two recipes' networks: the same modules, keys and shapes. The record
/// recipe (airbench94_muon) scales the logits by 1/256 (one over the
/// head's width) instead of 1/9, starts the head's weights at unit standard
/// deviation and the whitening bias at PyTorch's default draw (not zero),
/// and keeps its whitening filters in eigh's ascending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Airbench94,
    Muon,
}

impl Variant {
    /// The factor on the head's output.
    pub fn logit_scale(self) -> f64 {
        match self {
            Variant::Airbench94 => LOGIT_SCALE,
            Variant::Muon => 1.0 / WIDTHS[2] as f64,
        }
    }

    /// Whether the whitening filters come largest eigenvalue first.
    pub fn whiten_largest_first(self) -> bool {
        self == Variant::Airbench94
    }
}

/// PyTorch's default `Conv2d`/`Linear` weight init, `kaiming_uniform_(a=√5)`:
/// uniform in ±1/√fan_in.
fn pytorch_default(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A convolution without bias: `Conv` in the PyTorch definition, 3×3 with
/// "same" padding, started as a partial identity (`dirac_` on its first
/// `in_channels` filters) so that each group starts close to passing its
/// input through.
#[derive(Debug)]
pub struct Conv {
    pub weight: Tensor,
}

impl Conv {
    fn shallow_clone(&self) -> Conv {
        Conv {
            weight: self.weight.shallow_clone(),
        }
    }

    fn new(vs: nn::Path, channels_in: i64, channels_out: i64) -> Conv {
        let weight = vs.var(
            "weight",
            &[channels_out, channels_in, 3, 3],
            pytorch_default(channels_in * 9),
        );
        tch::no_grad(|| {
            let mut identity = weight.narrow(0, 0, channels_in.min(channels_out));
            let _ = identity.zero_();
            for i in 0..channels_in.min(channels_out) {
                let _ = identity.get(i).get(i).get(1).get(1).fill_(1.0);
            }
        });
        Conv { weight }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
    }
}

/// `nn.BatchNorm2d(eps=1e-12, momentum=0.4)` with its scale frozen at 1 and
/// a trainable bias. Its buffers are PyTorch's: `running_mean`,
/// `running_var` and `num_batches_tracked`.
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNorm {
    fn shallow_clone(&self) -> BatchNorm {
        BatchNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            running_mean: self.running_mean.shallow_clone(),
            running_var: self.running_var.shallow_clone(),
            num_batches_tracked: self.num_batches_tracked.shallow_clone(),
        }
    }

    fn new(vs: nn::Path, channels: i64) -> BatchNorm {
        BatchNorm {
            weight: vs.ones_no_train("weight", &[channels]),
            bias: vs.var("bias", &[channels], Init::Const(0.0)),
            running_mean: vs.zeros_no_train("running_mean", &[channels]),
            running_var: vs.ones_no_train("running_var", &[channels]),
            num_batches_tracked: vs.add("num_batches_tracked", Tensor::from(0i64), false),
        }
    }

    /// In training, normalizes with the batch's statistics and moves the
    /// running ones towards them; in evaluation, uses the running ones.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

/// conv3×3 → max-pool 2 → BatchNorm → GELU → conv3×3 → BatchNorm → GELU.
#[derive(Debug)]
pub struct ConvGroup {
    pub conv1: Conv,
    pub norm1: BatchNorm,
    pub conv2: Conv,
    pub norm2: BatchNorm,
}

impl ConvGroup {
    fn shallow_clone(&self) -> ConvGroup {
        ConvGroup {
            conv1: self.conv1.shallow_clone(),
            norm1: self.norm1.shallow_clone(),
            conv2: self.conv2.shallow_clone(),
            norm2: self.norm2.shallow_clone(),
        }
    }

    fn new(vs: nn::Path, channels_in: i64, channels_out: i64) -> ConvGroup {
        ConvGroup {
            conv1: Conv::new(&vs / "conv1", channels_in, channels_out),
            norm1: BatchNorm::new(&vs / "norm1", channels_out),
            conv2: Conv::new(&vs / "conv2", channels_out, channels_out),
            norm2: BatchNorm::new(&vs / "norm2", channels_out),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x = self.conv1.forward(x).max_pool2d_default(2); // [N, C, H/2, W/2]
        let x = self.norm1.forward(&x, train).gelu("none");
        let x = self.conv2.forward(&x); // same shape
        self.norm2.forward(&x, train).gelu("none")
    }
}

/// The network. Its output is the logits, scaled by its variant's factor
/// (1/9 for airbench94).
#[derive(Debug)]
pub struct Airbench94 {
    pub variant: Variant,
    /// The 2×2 patch-whitening convolution: its weight is set from the
    /// data ([`super::whiten`]) and frozen; its bias trains for a few epochs.
    pub whiten_weight: Tensor,
    pub whiten_bias: Tensor,
    pub layer1: ConvGroup,
    pub layer2: ConvGroup,
    pub layer3: ConvGroup,
    /// `head.weight`, `[classes, 256]`: a linear layer without bias.
    pub head: Tensor,
}

impl Airbench94 {
    pub fn new(vs: &nn::Path, num_classes: i64, variant: Variant) -> Airbench94 {
        let whiten = vs / "whiten";
        // Placeholders until the whitening filters are computed from data.
        let whiten_weight = whiten.zeros_no_train("weight", &[WHITEN_WIDTH, 3, 2, 2]);
        // airbench94 starts the bias at zero; airbench94_muon.py keeps
        // `reset_parameters()`'s default draw.
        let bias_init = match variant {
            Variant::Airbench94 => Init::Const(0.0),
            Variant::Muon => pytorch_default(3 * 2 * 2),
        };
        let whiten_bias = whiten.var("bias", &[WHITEN_WIDTH], bias_init);
        let [w1, w2, w3] = WIDTHS;
        let head = (vs / "head").var("weight", &[num_classes, w3], pytorch_default(w3));
        if variant == Variant::Muon {
            // `w *= 1 / w.std()`
            tch::no_grad(|| {
                let scale = head.std(true).reciprocal();
                let _ = head.shallow_clone().g_mul_(&scale);
            });
        }
        Airbench94 {
            variant,
            whiten_weight,
            whiten_bias,
            layer1: ConvGroup::new(vs / "layer1", WHITEN_WIDTH, w1),
            layer2: ConvGroup::new(vs / "layer2", w1, w2),
            layer3: ConvGroup::new(vs / "layer3", w2, w3),
            head,
        }
    }

    /// The logits of `x`, `[N, 3, 32, 32]` normalized with CIFAR-10's mean
    /// and std. `train` picks the batch's or the running BatchNorm statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x
            .conv2d(
                &self.whiten_weight,
                Some(&self.whiten_bias),
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )
            .gelu("none"); // [N, 24, 31, 31]
        let x = self.layer1.forward(&x, train); // [N, 64, 15, 15]
        let x = self.layer2.forward(&x, train); // [N, 256, 7, 7]
        let x = self.layer3.forward(&x, train); // [N, 256, 3, 3]
        let x = x.max_pool2d_default(3).flatten(1, -1); // [N, 256]
        x.linear(&self.head, None::<Tensor>) * self.variant.logit_scale() // [N, classes]
    }

    /// The same network, its tensors shared (not copied).
    pub fn shallow_clone(&self) -> Airbench94 {
        Airbench94 {
            variant: self.variant,
            whiten_weight: self.whiten_weight.shallow_clone(),
            whiten_bias: self.whiten_bias.shallow_clone(),
            layer1: self.layer1.shallow_clone(),
            layer2: self.layer2.shallow_clone(),
            layer3: self.layer3.shallow_clone(),
            head: self.head.shallow_clone(),
        }
    }

    /// The trainable parameters by key, in two groups: the BatchNorm
    /// biases (with their own learning rate), then the rest, the whitening
    /// bias first (it stops training after a few epochs).
    pub fn parameter_groups(&self) -> [Vec<(String, Tensor)>; 2] {
        let mut groups = [vec![], vec![]];
        for (key, t) in self.state_dict() {
            if let Some(g) = parameter_group(&key) {
                groups[g].push((key, t));
            }
        }
        groups
    }

    /// Every parameter and buffer by its `state_dict` key, in PyTorch's
    /// order; the tensors share storage with the network.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![
            (
                "whiten.weight".to_string(),
                self.whiten_weight.shallow_clone(),
            ),
            ("whiten.bias".to_string(), self.whiten_bias.shallow_clone()),
        ];
        for (i, group) in self.groups().iter().enumerate() {
            for (conv, norm, c, n) in [
                ("conv1", "norm1", &group.conv1, &group.norm1),
                ("conv2", "norm2", &group.conv2, &group.norm2),
            ] {
                let layer = format!("layer{}", i + 1);
                state.push((format!("{layer}.{conv}.weight"), c.weight.shallow_clone()));
                for (name, t) in [
                    ("weight", &n.weight),
                    ("bias", &n.bias),
                    ("running_mean", &n.running_mean),
                    ("running_var", &n.running_var),
                    ("num_batches_tracked", &n.num_batches_tracked),
                ] {
                    state.push((format!("{layer}.{norm}.{name}"), t.shallow_clone()));
                }
            }
        }
        state.push(("head.weight".to_string(), self.head.shallow_clone()));
        state
    }

    fn groups(&self) -> [&ConvGroup; 3] {
        [&self.layer1, &self.layer2, &self.layer3]
    }
}

/// The optimizer group of the tensor at `state_dict` key `key`: 0 for the
/// BatchNorm biases, 1 for the other trainable parameters, `None` for the
/// frozen weights and the buffers.
pub fn parameter_group(key: &str) -> Option<usize> {
    if key.contains(".norm") && key.ends_with(".bias") {
        Some(0)
    } else if key == "whiten.bias"
        || key.ends_with("conv1.weight")
        || key.ends_with("conv2.weight")
        || key == "head.weight"
    {
        Some(1)
    } else {
        None
    }
}

/// `state_dict` keys and shapes of `Airbench94(num_classes)`, in PyTorch's order.
pub fn state_dict_shapes(num_classes: i64) -> Vec<(String, Vec<i64>)> {
    let mut shapes = vec![
        ("whiten.weight".to_string(), vec![WHITEN_WIDTH, 3, 2, 2]),
        ("whiten.bias".to_string(), vec![WHITEN_WIDTH]),
    ];
    let mut channels_in = WHITEN_WIDTH;
    for (i, &width) in WIDTHS.iter().enumerate() {
        let layer = format!("layer{}", i + 1);
        for (conv, norm, cin) in [("conv1", "norm1", channels_in), ("conv2", "norm2", width)] {
            shapes.push((format!("{layer}.{conv}.weight"), vec![width, cin, 3, 3]));
            for buffer in ["weight", "bias", "running_mean", "running_var"] {
                shapes.push((format!("{layer}.{norm}.{buffer}"), vec![width]));
            }
            shapes.push((format!("{layer}.{norm}.num_batches_tracked"), vec![]));
        }
        channels_in = width;
    }
    shapes.push(("head.weight".to_string(), vec![num_classes, WIDTHS[2]]));
    shapes
}

/// Rewrites every 4-d tensor in `tensors` with channels-last strides
/// (PyTorch's `.to(memory_format=torch.channels_last)`): a permute to NHWC,
/// made contiguous, permuted back. Convolutions then run in that layout.
pub fn to_channels_last(tensors: &[Tensor]) {
    tch::no_grad(|| {
        for t in tensors {
            if t.dim() == 4 {
                let mut t = t.shallow_clone();
                t.set_data(&channels_last(&t));
            }
        }
    });
}

/// `x` with channels-last strides.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// A network for `num_classes` in its own variable store, drawn on the CPU
/// with torch's generator seeded by `seed`, then moved to `device`.
pub fn build(
    device: Device,
    seed: u64,
    num_classes: i64,
    variant: Variant,
) -> (nn::VarStore, Airbench94) {
    let (mut vs, net) = crate::util::rng::with_torch_rng(Some(seed), || {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Airbench94::new(&vs.root(), num_classes, variant);
        (vs, net)
    });
    vs.set_device(device);
    // BatchNorm's counter stays an integer, like PyTorch's.
    debug_assert_eq!(net.layer1.norm1.num_batches_tracked.kind(), Kind::Int64);
    (vs, net)
}
