//! Both networks as ONNX graphs (opset [`OPSET`]), op for op what their
//! forward passes do in evaluation mode, for onnxruntime, TensorRT,
//! OpenVINO and the other ONNX runtimes.
//!
//! The graph takes what the TorchScript export takes (`cli/export.rs`):
//! one float32 input `input`, `[N, 3, 32, 32]` with a named batch
//! dimension, normalized to [−1, 1] for `Net` and with CIFAR-10's mean and
//! std for the airbench networks. The weights are initializers named by
//! their `state_dict` keys. BatchNorm is ONNX's `BatchNormalization` on the
//! running statistics (runtimes fold it into the convolution themselves
//! where they can), GELU is its exact `Erf` form (`Gelu` is an operator
//! only from opset 20), and airbench's logit scale is a `Mul` after the
//! head, as in the PyTorch module. With test-time augmentation the six
//! views of each image go through the network as one batch of 6·N.

use anyhow::{bail, Result};
use tch::Tensor;

use crate::data::normalize::{CIFAR_MEAN, CIFAR_STD};
use crate::nets::airbench::{Airbench94, BN_EPS};
use crate::nets::classifier::Classifier;
use crate::nets::{Head, ModelKind};
use crate::weights::onnx::{
    self, attr_float, attr_int, attr_ints, attr_string, proto, About, Dim, Graph, Io,
};

/// The ONNX opset of the graphs (ONNX 1.12, 2022): onnxruntime runs it
/// from 1.12 on (onnxruntime-web too), TensorRT from 8.6, and it has
/// every operator the graphs need (`Gelu`, from opset 20, is written out).
pub const OPSET: i64 = 17;

/// The graph input's name.
pub const INPUT: &str = "input";

/// The `metadata_props` keys of an exported model.
pub mod keys {
    /// The class names in output order, as a JSON list.
    pub const CLASSES: &str = "classes";
    /// `net`, `airbench94` or `airbench94-muon`.
    pub const NETWORK: &str = "network";
    /// The output's name: `logits` or `probabilities`.
    pub const OUTPUT: &str = "output";
    /// `true` when the graph averages the test-time augmented views.
    pub const TTA: &str = "tta";
    /// The per-channel mean and std the input is normalized with, as JSON
    /// lists: `input = (rgb / 255 - mean) / std`.
    pub const INPUT_MEAN: &str = "input_mean";
    pub const INPUT_STD: &str = "input_std";
}

/// `classifier` in evaluation mode as an ONNX model whose one output is
/// `head` of its logits, averaged over airbench's test-time augmentation
/// when `tta`.
pub fn model(classifier: &Classifier, head: Head, tta: bool) -> Result<proto::ModelProto> {
    let kind = classifier.network();
    let mut g = Graph::new();
    let input = g.input(INPUT);
    let (logits, mean, std) = match classifier {
        Classifier::Net(_) if tta => bail!("the tutorial's Net has no test-time augmentation"),
        Classifier::Net(model) => {
            let logits = net_logits(&mut g, &model.state_dict(), &input);
            (logits, [0.5; 3], [0.5; 3])
        }
        Classifier::Airbench94(a) => {
            let logits = if tta {
                airbench_tta_logits(&mut g, &a.net, &input)
            } else {
                airbench_logits(&mut g, &a.net, &input, "logits")
            };
            (logits, CIFAR_MEAN, CIFAR_STD)
        }
    };
    let output = match head {
        Head::Logits => logits,
        Head::Probabilities => g.node(
            "Softmax",
            Head::Probabilities.name(),
            &[&logits],
            vec![attr_int("axis", 1)],
        ),
    };
    let classes = classifier.classes();
    let input = Io {
        name: input,
        dims: vec![
            Dim::Named("N"),
            Dim::Fixed(3),
            Dim::Fixed(32),
            Dim::Fixed(32),
        ],
        doc: input_doc(kind, mean, std),
    };
    let output = Io {
        name: output,
        dims: vec![Dim::Named("N"), Dim::Fixed(classes.len() as i64)],
        doc: output_doc(head, tta),
    };
    let floats = |v: [f64; 3]| format!("[{}, {}, {}]", v[0], v[1], v[2]);
    let about = About {
        opset: OPSET,
        doc: format!(
            "tch-cifar's {} for {} classes. Input `{}`: {}. Output `{}`: {}, in the order of \
             metadata_props `classes`.",
            kind.name(),
            classes.len(),
            input.name,
            input.doc,
            output.name,
            output.doc
        ),
        metadata: vec![
            (keys::CLASSES.into(), crate::weights::classes_json(classes)),
            (keys::NETWORK.into(), kind.name().into()),
            (keys::OUTPUT.into(), head.name().into()),
            (keys::TTA.into(), tta.to_string()),
            (keys::INPUT_MEAN.into(), floats(mean)),
            (keys::INPUT_STD.into(), floats(std)),
        ],
    };
    Ok(onnx::model(
        g.finish(kind.class_name(), &input, &output),
        about,
    ))
}

fn input_doc(kind: ModelKind, mean: [f64; 3], std: [f64; 3]) -> String {
    let normalized = if kind.is_net() {
        "normalized to [-1, 1] as (x - 0.5) / 0.5 (the tutorial's Normalize((0.5, 0.5, 0.5), \
         (0.5, 0.5, 0.5)))"
            .to_string()
    } else {
        format!(
            "normalized per channel with CIFAR-10's mean ({}, {}, {}) and std ({}, {}, {})",
            mean[0], mean[1], mean[2], std[0], std[1], std[2]
        )
    };
    format!(
        "float32 [N, 3, 32, 32], a batch of 32x32 RGB images, channels first, scaled to [0, 1] \
         and {normalized}"
    )
}

fn output_doc(head: Head, tta: bool) -> String {
    let what = match head {
        Head::Logits => "float32 [N, classes], the logits",
        Head::Probabilities => "float32 [N, classes], the softmax of the logits (sums to 1)",
    };
    if tta {
        format!(
            "{what}, averaged over the image and its mirror and, at half the weight, the two \
             1-pixel diagonal translations and their mirrors"
        )
    } else {
        what.to_string()
    }
}

/// The tensor at `key` of `state` (a network's own keys: a missing one is a bug).
fn get<'a>(state: &'a [(String, Tensor)], key: &str) -> &'a Tensor {
    &state
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("the network has no {key}"))
        .1
}

/// The tutorial's `Net::forward`: its logits are the value `logits`.
fn net_logits(g: &mut Graph, state: &[(String, Tensor)], input: &str) -> String {
    let mut weight = |key: &str| g.weight(key, get(state, key));
    let params: Vec<[String; 2]> = ["conv1", "conv2", "fc1", "fc2", "fc3"]
        .iter()
        .map(|m| [weight(&format!("{m}.weight")), weight(&format!("{m}.bias"))])
        .collect();
    let mut x = input.to_string();
    for (i, [w, b]) in params[..2].iter().enumerate() {
        let n = i + 1;
        x = g.node(
            "Conv",
            &format!("conv{n}"),
            &[&x, w, b],
            vec![attr_ints("kernel_shape", &[5, 5])],
        );
        x = g.node("Relu", &format!("relu{n}"), &[&x], vec![]);
        x = max_pool(g, &format!("pool{n}"), &x, 2);
    }
    x = g.node("Flatten", "flatten", &[&x], vec![attr_int("axis", 1)]);
    for (i, [w, b]) in params[2..].iter().enumerate() {
        let name = if i == 2 {
            "logits".to_string()
        } else {
            format!("fc{}", i + 1)
        };
        x = linear(g, &name, &x, w, Some(b));
        if i < 2 {
            x = g.node("Relu", &format!("fc{}.relu", i + 1), &[&x], vec![]);
        }
    }
    x
}

/// `nn.MaxPool2d(size)`: the window's stride is its size, no padding.
fn max_pool(g: &mut Graph, name: &str, x: &str, size: i64) -> String {
    g.node(
        "MaxPool",
        name,
        &[x],
        vec![
            attr_ints("kernel_shape", &[size, size]),
            attr_ints("strides", &[size, size]),
        ],
    )
}

/// `F.linear(x, w, b)`: `x · wᵀ + b`.
fn linear(g: &mut Graph, name: &str, x: &str, w: &str, b: Option<&str>) -> String {
    let mut inputs = vec![x, w];
    inputs.extend(b);
    g.node("Gemm", name, &inputs, vec![attr_int("transB", 1)])
}

/// `F.gelu(x)`, exact: `x · ½(1 + erf(x/√2))`, written as `torch.onnx`
/// writes it so that onnxruntime fuses it into its own GELU kernel.
fn gelu(g: &mut Graph, name: &str, x: &str) -> String {
    let sqrt2 = g.scalar("gelu.sqrt2", std::f32::consts::SQRT_2);
    let one = g.scalar("gelu.one", 1.0);
    let half = g.scalar("gelu.half", 0.5);
    let y = g.node("Div", &format!("{name}.div"), &[x, &sqrt2], vec![]);
    let y = g.node("Erf", &format!("{name}.erf"), &[&y], vec![]);
    let y = g.node("Add", &format!("{name}.add"), &[&y, &one], vec![]);
    let y = g.node("Mul", &format!("{name}.mul"), &[x, &y], vec![]);
    g.node("Mul", name, &[&y, &half], vec![])
}

/// `Airbench94::forward_t(x, false)`: the logits, scaled, as the value `out`.
fn airbench_logits(g: &mut Graph, net: &Airbench94, input: &str, out: &str) -> String {
    let state = net.state_dict();
    let mut weight = |key: &str| g.weight(key, get(&state, key));
    let whiten = [weight("whiten.weight"), weight("whiten.bias")];
    let mut layers = vec![];
    for layer in 1..=3 {
        let mut convs = vec![];
        for n in 1..=2 {
            let conv = weight(&format!("layer{layer}.conv{n}.weight"));
            let norm = ["weight", "bias", "running_mean", "running_var"]
                .map(|p| weight(&format!("layer{layer}.norm{n}.{p}")));
            convs.push((conv, norm));
        }
        layers.push(convs);
    }
    let head = weight("head.weight");
    let logit_scale = g.scalar("logit_scale", net.variant.logit_scale() as f32);

    let x = g.node(
        "Conv",
        "whiten",
        &[input, &whiten[0], &whiten[1]],
        vec![attr_ints("kernel_shape", &[2, 2])],
    );
    let mut x = gelu(g, "whiten.gelu", &x); // [N, 24, 31, 31]
    for (i, convs) in layers.iter().enumerate() {
        let layer = format!("layer{}", i + 1);
        for (j, (conv, norm)) in convs.iter().enumerate() {
            let n = j + 1;
            x = g.node(
                "Conv",
                &format!("{layer}.conv{n}"),
                &[&x, conv],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
            );
            if n == 1 {
                x = max_pool(g, &format!("{layer}.pool"), &x, 2);
            }
            let [scale, bias, mean, var] = norm;
            x = g.node(
                "BatchNormalization",
                &format!("{layer}.norm{n}"),
                &[&x, scale, bias, mean, var],
                vec![attr_float("epsilon", BN_EPS as f32)],
            );
            x = gelu(g, &format!("{layer}.gelu{n}"), &x);
        }
    } // [N, 256, 3, 3]
    let x = max_pool(g, "pool", &x, 3);
    let x = g.node("Flatten", "flatten", &[&x], vec![attr_int("axis", 1)]); // [N, 256]
    let x = linear(g, "head", &x, &head, None);
    g.node("Mul", out, &[&x, &logit_scale], vec![])
}

/// airbench's test-time augmentation ([`crate::nets::airbench::Tta`]) of
/// the normalized `input`, as the value `logits`: the image, the two
/// diagonal 1-pixel translations of its reflection-padded copy, and the
/// three mirrored, through the network as one batch, then weighted as
/// `Tta` weighs them.
fn airbench_tta_logits(g: &mut Graph, net: &Airbench94, input: &str) -> String {
    let size = 32;
    let starts = g.ints("tta.flip.starts", &[-1]);
    let ends = g.ints("tta.flip.ends", &[i64::MIN]);
    let axes = g.ints("tta.flip.axes", &[3]);
    let steps = g.ints("tta.flip.steps", &[-1]);
    let pads = g.ints("tta.pads", &[0, 0, 1, 1, 0, 0, 1, 1]);
    let crop_axes = g.ints("tta.crop.axes", &[2, 3]);
    let up_left = [
        g.ints("tta.up_left.starts", &[0, 0]),
        g.ints("tta.up_left.ends", &[size, size]),
    ];
    let down_right = [
        g.ints("tta.down_right.starts", &[2, 2]),
        g.ints("tta.down_right.ends", &[size + 2, size + 2]),
    ];
    let flip = |g: &mut Graph, name: &str, x: &str| {
        g.node("Slice", name, &[x, &starts, &ends, &axes, &steps], vec![])
    };

    let padded = g.node(
        "Pad",
        "tta.padded",
        &[input, &pads],
        vec![attr_string("mode", "reflect")],
    );
    let mut views = vec![input.to_string(), flip(g, "tta.mirror", input)];
    for (name, [s, e]) in [("tta.up_left", &up_left), ("tta.down_right", &down_right)] {
        let crop = g.node("Slice", name, &[&padded, s, e, &crop_axes], vec![]);
        let mirror = flip(g, &format!("{name}.mirror"), &crop);
        views.extend([crop, mirror]);
    }
    let views_ref: Vec<&str> = views.iter().map(|s| s.as_str()).collect();
    let batch = g.node("Concat", "tta.views", &views_ref, vec![attr_int("axis", 0)]);
    let all = airbench_logits(g, net, &batch, "tta.logits"); // [6·N, classes]
    let names = [
        "tta.logits.image",
        "tta.logits.mirror",
        "tta.logits.up_left",
        "tta.logits.up_left_mirror",
        "tta.logits.down_right",
        "tta.logits.down_right_mirror",
    ];
    g.node_outputs(
        "Split",
        "tta.split",
        &[&all],
        &names,
        vec![attr_int("axis", 0)],
    );

    let half = g.scalar("tta.half", 0.5);
    // `run(x) * 0.5 + run(&x.flip([-1])) * 0.5`
    let mirrored = |g: &mut Graph, name: &str, a: &str, b: &str| {
        let a = g.node("Mul", &format!("{name}.a"), &[a, &half], vec![]);
        let b = g.node("Mul", &format!("{name}.b"), &[b, &half], vec![]);
        g.node("Add", name, &[&a, &b], vec![])
    };
    let image = mirrored(g, "tta.mirrored.image", names[0], names[1]);
    let up_left = mirrored(g, "tta.mirrored.up_left", names[2], names[3]);
    let down_right = mirrored(g, "tta.mirrored.down_right", names[4], names[5]);
    // `(mirrored(up_left) + mirrored(down_right)) * 0.5`
    let shifted = g.node("Add", "tta.shifted.sum", &[&up_left, &down_right], vec![]);
    let shifted = g.node("Mul", "tta.shifted", &[&shifted, &half], vec![]);
    // `mirrored(x) * 0.5 + shifted * 0.5`
    let image = g.node("Mul", "tta.image.half", &[&image, &half], vec![]);
    let shifted = g.node("Mul", "tta.shifted.half", &[&shifted, &half], vec![]);
    g.node("Add", "logits", &[&image, &shifted], vec![])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::tutorial::Model;
    use tch::Device;

    fn names(values: &[proto::TensorProto]) -> Vec<String> {
        values.iter().filter_map(|t| t.name.clone()).collect()
    }

    #[test]
    fn nets_graph_holds_its_state_dict_and_ends_in_the_head() {
        let net = Classifier::Net(Model::new(Device::Cpu, Some(1)));
        for head in [Head::Logits, Head::Probabilities] {
            let m = model(&net, head, false).unwrap();
            let graph = m.graph.unwrap();
            let want: Vec<String> = crate::nets::tutorial::PARAMETERS
                .iter()
                .map(|(k, _)| k.to_string())
                .collect();
            assert_eq!(names(&graph.initializer), want);
            let last = graph.node.last().unwrap();
            assert_eq!(last.output, [head.name()]);
            assert_eq!(graph.output[0].name.as_deref(), Some(head.name()));
            let output = m
                .metadata_props
                .iter()
                .find(|p| p.key.as_deref() == Some("output"));
            assert_eq!(output.unwrap().value.as_deref(), Some(head.name()));
        }
        let err = model(&net, Head::Logits, true).unwrap_err();
        assert!(
            err.to_string().contains("no test-time augmentation"),
            "{err}"
        );
    }

    #[test]
    fn airbenchs_tta_runs_the_network_once_on_six_views() {
        let (vs, net) = crate::nets::airbench::net::build(
            Device::Cpu,
            1,
            10,
            crate::nets::airbench::Variant::Muon,
        );
        let classes = crate::data::cifar::classes();
        let airbench = crate::nets::classifier::Airbench::trained(vs, net, classes);
        let classifier = Classifier::Airbench94(Box::new(airbench));
        let plain = model(&classifier, Head::Logits, false)
            .unwrap()
            .graph
            .unwrap();
        let tta = model(&classifier, Head::Logits, true)
            .unwrap()
            .graph
            .unwrap();
        let count = |g: &proto::GraphProto, op: &str| {
            g.node
                .iter()
                .filter(|n| n.op_type.as_deref() == Some(op))
                .count()
        };
        // The whitening and six convolutions, once in either graph.
        assert_eq!(count(&plain, "Conv"), 7);
        assert_eq!(count(&tta, "Conv"), 7);
        let concat = tta
            .node
            .iter()
            .find(|n| n.op_type.as_deref() == Some("Concat"));
        assert_eq!(concat.unwrap().input.len(), 6);
        assert_eq!(count(&tta, "Split"), 1);
        // The weights are the same initializers, without the step counters.
        let weights: Vec<String> = classifier_keys(&classifier);
        for g in [&plain, &tta] {
            let names = names(&g.initializer);
            for key in &weights {
                assert!(names.contains(key), "{key}");
            }
        }
    }

    fn classifier_keys(c: &Classifier) -> Vec<String> {
        let Classifier::Airbench94(a) = c else {
            unreachable!()
        };
        a.net
            .state_dict()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !k.ends_with("num_batches_tracked"))
            .collect()
    }
}
