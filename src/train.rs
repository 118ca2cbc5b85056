//! The tutorial's training recipe: `Net` on logits with cross-entropy, SGD
//! with momentum on mini-batches reshuffled every epoch, the running loss
//! printed every 2000 mini-batches, then the test-set accuracy.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;
use tch::nn::Module;
use tch::{Device, Tensor};

use crate::data::{self, DataArgs, Split, CLASSES};
use crate::device::{device_name, DeviceArg};
use crate::evaluate::{evaluate, predict_classes};
use crate::model::Model;
use crate::optim::Sgd;
use crate::report::{step_bar, Reporter};

/// The training recipe; the defaults are the tutorial's.
#[derive(Debug, Clone, clap::Args)]
pub struct Recipe {
    /// Passes over the training set.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Images per mini-batch.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.001, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Seed for the initial weights and the data order. The same seed on the
    /// same data gives the same run on CPU; without one a random seed is
    /// drawn and reported.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: auto (cuda:0 if available, else cpu), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// CPU threads for libtorch's operators (default: libtorch's own choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
    /// Print the running loss every N mini-batches (the tutorial uses 2000).
    #[arg(long, default_value_t = 2000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub log_every: u64,
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite, non-negative number")),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

impl Recipe {
    /// Resolves the device and applies `--threads`.
    pub fn device(&self) -> Result<Device> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        self.device.resolve()
    }

    /// The seed given, or a fresh one drawn from the clock and process id.
    pub fn seed_or_random(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.write_u32(std::process::id());
            // Keep it within i64 so torch's manual_seed takes it as is.
            h.finish() >> 1
        })
    }

    fn json(&self, device: Device, seed: u64) -> serde_json::Value {
        json!({
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "momentum": self.momentum, "seed": seed, "device": device_name(device),
        })
    }
}

/// Train the tutorial's Net on CIFAR-10, save it, and report test accuracy.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub recipe: Recipe,
    /// Where to save the trained weights (safetensors, keyed like PyTorch's state_dict).
    #[arg(long, default_value = "cifar_net.safetensors", value_name = "FILE")]
    pub out: PathBuf,
    /// Print one JSON object per line instead of the tutorial's text.
    #[arg(long)]
    pub json: bool,
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainStats {
    pub steps: u64,
    pub images: u64,
    pub train_seconds: f64,
    /// `(epoch, step, mean loss)` at each `--log-every` mark, 1-based like the tutorial.
    pub running_losses: Vec<(u64, u64, f64)>,
}

impl TrainStats {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.train_seconds.max(1e-9)
    }
}

/// The mini-batch index tensors of one epoch, in the seeded order.
pub fn epoch_batches(
    seed: u64,
    epoch: u64,
    n: usize,
    batch_size: u64,
    device: Device,
) -> impl Iterator<Item = Tensor> {
    let order = Tensor::from_slice(&data::epoch_order(seed, epoch as usize, n)).to_device(device);
    let batch = batch_size as i64;
    let n = n as i64;
    (0..n)
        .step_by(batch as usize)
        .map(move |start| order.narrow(0, start, batch.min(n - start)))
}

/// Trains `model` on `train` with the recipe; stops with an error on the
/// first non-finite loss.
pub fn train(
    model: &Model,
    train: &Split,
    recipe: &Recipe,
    seed: u64,
    reporter: &mut Reporter,
) -> Result<TrainStats> {
    let device = model.vs.device();
    let mut opt = Sgd::new(model, recipe.lr, recipe.momentum);
    let n = train.len();
    if n == 0 {
        bail!("the training set is empty");
    }
    let steps_per_epoch = n.div_ceil(recipe.batch_size as usize) as u64;
    let bar = reporter.attach_bar(step_bar(recipe.epochs * steps_per_epoch));
    let mut stats = TrainStats {
        steps: 0,
        images: 0,
        train_seconds: 0.0,
        running_losses: vec![],
    };
    let start = Instant::now();
    for epoch in 1..=recipe.epochs {
        bar.set_prefix(format!("epoch {epoch}/{}", recipe.epochs));
        let mut running_loss = 0.0;
        for (i, index) in epoch_batches(seed, epoch - 1, n, recipe.batch_size, device).enumerate() {
            let step = i as u64 + 1;
            let (images, labels) = train.select(&index);
            let loss = model.net.forward(&images).cross_entropy_for_logits(&labels);
            opt.step(&loss);
            let loss = loss.double_value(&[]);
            if !loss.is_finite() {
                bar.finish_and_clear();
                bail!(
                    "the loss became {loss} at epoch {epoch}, step {step}: training diverged. \
                     Try a lower learning rate (--lr {} now)",
                    recipe.lr
                );
            }
            running_loss += loss;
            stats.steps += 1;
            stats.images += index.size()[0] as u64;
            if step.is_multiple_of(recipe.log_every) {
                let mean = running_loss / recipe.log_every as f64;
                stats.running_losses.push((epoch, step, mean));
                reporter.emit(
                    || format!("[{epoch}, {step:5}] loss: {mean:.3}"),
                    json!({"event": "loss", "epoch": epoch, "step": step, "loss": mean}),
                );
                running_loss = 0.0;
            }
            bar.inc(1);
            if step.is_multiple_of(256) {
                let rate = stats.images as f64 / start.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {:.3} {rate:.0} img/s",
                    running_loss / (step % recipe.log_every).max(1) as f64
                ));
            }
        }
    }
    stats.train_seconds = start.elapsed().as_secs_f64();
    reporter.finish_bar();
    Ok(stats)
}

/// `tch-cifar train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let device = args.recipe.device()?;
    crate::fsutil::check_writable(&args.out)?;
    let batches = args.data.prepare()?;
    // The test set is loaded once training is over and the training set is
    // gone, which keeps the peak memory down; its file is checked now, so a
    // bad one fails before training rather than after.
    data::read_batch_file(&batches.join(data::TEST_FILE))?;
    let train_set = data::load_train(&batches, device)?;
    let seed = args.recipe.seed_or_random();
    let mut reporter = Reporter::new(args.json);
    eprintln!(
        "training on {} with {} images, seed {seed} (--seed {seed} repeats this run)",
        device_name(device),
        train_set.len()
    );
    let mut start = args.recipe.json(device, seed);
    start["event"] = json!("start");
    start["train_images"] = json!(train_set.len());
    reporter.emit(String::new, start);

    let model = Model::new(device, Some(seed));
    let stats = train(&model, &train_set, &args.recipe, seed, &mut reporter)?;
    drop(train_set);
    reporter.emit(
        || "Finished Training".into(),
        json!({"event": "finished_training", "steps": stats.steps, "train_seconds": stats.train_seconds}),
    );
    model.save(&args.out)?;
    tracing::info!("weights saved to {}", args.out.display());

    let test = data::load_test(&batches, device)?;
    report_test(&reporter, &model, &test)?;
    let eval_start = Instant::now();
    let eval = evaluate(&model.net, &test, 1000);
    let eval_seconds = eval_start.elapsed().as_secs_f64();
    let mut summary = args.recipe.json(device, seed);
    summary["event"] = json!("summary");
    let fields = summary.as_object_mut().expect("json! object");
    fields.extend(eval.json_fields());
    fields.insert("steps".into(), json!(stats.steps));
    fields.insert("train_seconds".into(), json!(stats.train_seconds));
    fields.insert("images_per_second".into(), json!(stats.images_per_second()));
    fields.insert("eval_seconds".into(), json!(eval_seconds));
    fields.insert("weights".into(), json!(args.out));
    reporter.emit(|| eval.text(), summary);
    Ok(())
}

/// The tutorial's peek at the first four test images before the full
/// evaluation: their true classes and the network's guesses.
fn report_test(reporter: &Reporter, model: &Model, test: &Split) -> Result<()> {
    let shown = test.len().min(4) as i64;
    let truth: Vec<i64> = Vec::try_from(&test.labels.narrow(0, 0, shown).to_device(Device::Cpu))?;
    let preds = predict_classes(&model.net, &test.images.narrow(0, 0, shown), shown);
    let preds: Vec<i64> = Vec::try_from(&preds.to_device(Device::Cpu))?;
    let names = |v: &[i64]| v.iter().map(|&c| CLASSES[c as usize]).collect::<Vec<_>>();
    let padded = |v: &[i64]| {
        names(v)
            .iter()
            .map(|n| format!("{n:5}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    reporter.emit(
        || format!("GroundTruth:  {}\nPredicted:  {}", padded(&truth), padded(&preds)),
        json!({"event": "sample_predictions", "ground_truth": names(&truth), "predicted": names(&preds)}),
    );
    Ok(())
}
