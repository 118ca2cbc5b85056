//! The three answers of "CrossEntropyLoss on logits, or a softmax layer?"
//! in tch, on a small synthetic batch, in a second or so:
//!
//! ```sh
//! cargo run --release --example three_answers
//! ```
//!
//! 1. a network that ends in a linear layer, trained with cross-entropy on
//!    its logits;
//! 2. its class probabilities, `softmax(logits)`, and its class, the
//!    argmax of the logits (the same class: softmax keeps the order);
//! 3. a network that ends in a softmax, trained with `nll_loss(log(p))`:
//!    the same loss on the same weights, within float rounding, until a
//!    probability underflows to 0; the stable form is `log_softmax` and
//!    `nll_loss`.
//!
//! The lines between `// ANCHOR: NAME` and `// ANCHOR_END: NAME` are the
//! code blocks of README.md and docs/compare-losses.md, word for word
//! (`tests/three_answers.rs` holds them to it). The tests below check that
//! each answer holds.

use anyhow::Result;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The tutorial's `Net` in plain tch: two convolutions, three linear
/// layers, and no softmax at the end (`tch_cifar::nets::tutorial::Net`
/// also has PyTorch's initialization and `state_dict` keys).
#[derive(Debug)]
struct Net {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
    fc3: nn::Linear,
}

impl Net {
    fn new(vs: &nn::Path) -> Net {
        Net {
            conv1: nn::conv2d(vs / "conv1", 3, 6, 5, Default::default()),
            conv2: nn::conv2d(vs / "conv2", 6, 16, 5, Default::default()),
            fc1: nn::linear(vs / "fc1", 16 * 5 * 5, 120, Default::default()),
            fc2: nn::linear(vs / "fc2", 120, 84, Default::default()),
            fc3: nn::linear(vs / "fc3", 84, 10, Default::default()),
        }
    }
}

impl Module for Net {
    /// `[N, 3, 32, 32]` images to `[N, 10]` logits.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
            .relu()
            .apply(&self.fc3)
    }
}

/// Images in the batch.
const IMAGES: i64 = 64;
/// Training steps of answer 1, all on the one batch.
const STEPS: usize = 100;

/// `IMAGES` images of noise, each with a bright 8x6 block whose place and
/// channel depend on its class, like the tests' synthetic CIFAR-10.
fn batch() -> (Tensor, Tensor) {
    let images = Tensor::randn([IMAGES, 3, 32, 32], (Kind::Float, Device::Cpu)) * 0.2;
    let labels = Tensor::arange(IMAGES, (Kind::Int64, Device::Cpu)).remainder(10);
    for i in 0..IMAGES {
        let class = i % 10;
        let (top, left) = (4 + 16 * (class / 5), 1 + 6 * (class % 5));
        let _ = images
            .get(i)
            .get(class % 3)
            .narrow(0, top, 8)
            .narrow(1, left, 6)
            .fill_(1.0);
    }
    (images, labels)
}

/// Answer 1: one SGD step on the logits' cross-entropy; the loss.
fn train_step(net: &Net, opt: &mut nn::Optimizer, images: &Tensor, labels: &Tensor) -> f64 {
    // ANCHOR: train_on_logits
    let logits = net.forward(images); // [N, 10]: Net ends in a linear layer
    let loss = logits.cross_entropy_for_logits(labels); // log_softmax, then nll_loss
    opt.backward_step(&loss);
    // ANCHOR_END: train_on_logits
    loss.double_value(&[])
}

/// Answer 2: the class probabilities and the classes.
fn infer(net: &Net, images: &Tensor) -> (Tensor, Tensor) {
    // ANCHOR: inference
    let logits = tch::no_grad(|| net.forward(images));
    let probs = logits.softmax(-1, Kind::Float); // each row sums to 1
    let class = logits.argmax(-1, false); // softmax keeps the order: probs' argmax too
                                          // ANCHOR_END: inference
    (probs, class)
}

/// Answer 3: the loss of the same network ended by a softmax, scored with
/// `nll_loss(log(p))`.
fn softmax_loss(net: &Net, images: &Tensor, labels: &Tensor) -> f64 {
    // ANCHOR: softmax_layer
    let p = net.forward(images).softmax(-1, Kind::Float); // a softmax output layer
    let loss = p.log().nll_loss(labels); // answer 1's loss, until a p underflows to 0
                                         // ANCHOR_END: softmax_layer
    loss.double_value(&[])
}

/// Answer 3's stable form: the network ends in a log-softmax.
fn log_softmax_loss(net: &Net, images: &Tensor, labels: &Tensor) -> f64 {
    // ANCHOR: log_softmax_layer
    let log_p = net.forward(images).log_softmax(-1, Kind::Float); // ends in a log-softmax
    let loss = log_p.nll_loss(labels); // answer 1's loss to the bit, and never inf
                                       // ANCHOR_END: log_softmax_layer
    loss.double_value(&[])
}

/// What the three answers give on the batch.
struct Answers {
    /// Answer 1: the loss at the first step and at the last.
    first_loss: f64,
    last_loss: f64,
    /// Answer 2: the first image's probabilities, and how far any row's
    /// sum is from 1.
    probs: Vec<f32>,
    max_sum_error: f64,
    /// The first image's class, and on how many images the argmax of the
    /// probabilities is the argmax of the logits.
    class: i64,
    same_class: i64,
    /// Answer 3, on the trained weights: the logits' cross-entropy, the
    /// softmax layer's nll_loss(log(p)) and the log-softmax layer's nll_loss.
    loss_logits: f64,
    loss_softmax: f64,
    loss_log_softmax: f64,
    /// The same three on logits `[0, 120]` with label 0, whose
    /// probability underflows to 0 in float32.
    confident: [f64; 3],
}

fn answers() -> Result<Answers> {
    // One thread: a batch this small is not worth sharing, and OpenMP
    // threads that wait for a busy core would cost seconds.
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let (images, labels) = batch();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root());
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.001)?;

    let first_loss = train_step(&net, &mut opt, &images, &labels);
    let mut last_loss = first_loss;
    for _ in 1..STEPS {
        last_loss = train_step(&net, &mut opt, &images, &labels);
    }

    let (probs, class) = infer(&net, &images);
    let max_sum_error = (probs.sum_dim_intlist(-1, false, Kind::Double) - 1.0)
        .abs()
        .max()
        .double_value(&[]);
    let same_class = probs
        .argmax(-1, false)
        .eq_tensor(&class)
        .sum(Kind::Int64)
        .int64_value(&[]);

    let (loss_logits, loss_softmax, loss_log_softmax) = tch::no_grad(|| {
        let logits = net.forward(&images).cross_entropy_for_logits(&labels);
        (
            logits.double_value(&[]),
            softmax_loss(&net, &images, &labels),
            log_softmax_loss(&net, &images, &labels),
        )
    });

    // A confident network's wrong answer: logits [0, 120], label 0. Its
    // probability, exp(-120), is below float32's smallest, so it is 0.
    let confident = Tensor::from_slice(&[0.0f32, 120.0]).view([1, 2]);
    let label = Tensor::from_slice(&[0i64]);
    let confident = [
        confident.cross_entropy_for_logits(&label),
        confident.softmax(-1, Kind::Float).log().nll_loss(&label),
        confident.log_softmax(-1, Kind::Float).nll_loss(&label),
    ]
    .map(|l| l.double_value(&[]));

    Ok(Answers {
        first_loss,
        last_loss,
        probs: Vec::<f32>::try_from(probs.get(0))?,
        max_sum_error,
        class: class.int64_value(&[0]),
        same_class,
        loss_logits,
        loss_softmax,
        loss_log_softmax,
        confident,
    })
}

fn main() -> Result<()> {
    let a = answers()?;
    println!("{IMAGES} synthetic 32x32 images of 10 classes, the tutorial's Net (plain tch)");
    println!(
        "1. Net ends in a linear layer, trained with cross_entropy_for_logits on its logits: \
         loss {:.4} at step 1, {:.4} at step {STEPS}",
        a.first_loss, a.last_loss
    );
    let row: Vec<String> = a.probs.iter().map(|p| format!("{p:.3}")).collect();
    let sum: f64 = a.probs.iter().map(|&p| f64::from(p)).sum();
    println!(
        "2. softmax(logits) of image 0: [{}], sum {sum:.6}, argmax {} (every row sums to 1 \
         within {:.0e});\n   argmax(softmax(logits)) = argmax(logits) on {} of {IMAGES} images",
        row.join(", "),
        a.class,
        a.max_sum_error,
        a.same_class
    );
    println!(
        "3. the same weights ended by a softmax, nll_loss(log(p)): {:.7} against the logits' \
         cross-entropy {:.7} (|difference| {:.1e}, float rounding);\n   ended by a log-softmax, \
         nll_loss: {:.7} ({})",
        a.loss_softmax,
        a.loss_logits,
        (a.loss_softmax - a.loss_logits).abs(),
        a.loss_log_softmax,
        if a.loss_log_softmax == a.loss_logits {
            "the same bits"
        } else {
            "not the same bits"
        }
    );
    println!(
        "   on logits [0, 120] with label 0: cross-entropy {}, nll_loss(log(softmax)) {}, \
         nll_loss(log_softmax) {}",
        a.confident[0], a.confident[1], a.confident[2]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_answers_hold() {
        let a = answers().unwrap();
        // 1. Training on the logits learns the batch.
        assert!(
            a.last_loss < a.first_loss / 2.0,
            "{} → {}",
            a.first_loss,
            a.last_loss
        );
        // 2. Probabilities that sum to 1, and the logits' argmax.
        assert_eq!(a.probs.len(), 10);
        assert!(a.max_sum_error < 1e-5, "{}", a.max_sum_error);
        assert_eq!(a.same_class, IMAGES);
        let top = (0..10).max_by(|&i, &j| a.probs[i].total_cmp(&a.probs[j]));
        assert_eq!(top, Some(a.class as usize));
        // 3. The softmax layer's loss is the logits' within float32
        // rounding; the log-softmax layer's is the same kernels, bit for bit.
        let tolerance = 1e-5 * a.loss_logits.max(1.0);
        assert!((a.loss_softmax - a.loss_logits).abs() <= tolerance);
        assert_eq!(a.loss_log_softmax, a.loss_logits);
        // Once a probability underflows to 0, log(softmax) gives inf where
        // the fused form gives the loss, 120.
        let [fused, log_of_softmax, log_softmax] = a.confident;
        assert_eq!([fused, log_softmax], [120.0, 120.0]);
        assert_eq!(log_of_softmax, f64::INFINITY);
    }
}
