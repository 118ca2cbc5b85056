//! `tch-cifar evaluate`: the test-set accuracy of saved weights of either
//! network (after checking that the weights' classes are the test set's).
//! For the airbench networks it reports the accuracy with and without
//! test-time augmentation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::data::DataArgs;
use crate::nets::classifier::{Classifier, TtaArgs};
use crate::train::evaluation::{check_classes, draw_confusion, evaluate};
use crate::util::device::{device_name, DeviceArg};
use crate::util::report::{path_json, Reporter};

/// Evaluate saved weights on the test set (CIFAR-10's, or an image tree's).
#[derive(Debug, clap::Args)]
pub struct EvaluateArgs {
    /// Weights (Net or airbench94): safetensors, a checkpoint or a `.pth`.
    ///
    /// Keyed like PyTorch's `state_dict`: safetensors (from `train`), a
    /// training checkpoint, or a `.pth` from `torch.save(net.state_dict(), PATH)`.
    /// The file's metadata, else its keys, tell the network.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    #[command(flatten)]
    pub tta: TtaArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Also draw the confusion matrix (true by predicted class) into this PNG.
    #[arg(long, value_name = "FILE.png", value_parser = crate::util::plot::parse_png, help_heading = "Output")]
    pub confusion: Option<PathBuf>,
    /// Device to run on: auto, cpu, cuda or cuda:N.
    ///
    /// auto takes cuda:0 if a GPU is available, else the CPU.
    #[arg(
        long,
        default_value = "auto",
        value_name = "DEVICE",
        help_heading = "Performance"
    )]
    pub device: DeviceArg,
    /// Images per forward pass (any size gives the same result).
    #[arg(long, value_name = "N", default_value_t = 1000, allow_negative_numbers = true,
          value_parser = |s: &str| crate::cli::count(s, 1, i64::MAX as u64).map(|n| n as i64), help_heading = "Performance")]
    pub batch_size: i64,
    /// Print one JSON object per line instead of the tutorial's text.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
}

/// `tch-cifar evaluate`.
pub fn run(args: EvaluateArgs) -> Result<()> {
    let device = args.device.resolve()?;
    if let Some(png) = &args.confusion {
        crate::util::files::check_writable(png)?;
    }
    crate::weights::outputs::check_command_outputs(
        &args.data,
        &[("--weights", &args.weights)],
        &[("--confusion", args.confusion.as_deref())],
    )?;
    let mut model = Classifier::load(&args.weights, device)?;
    let tta = args.tta.resolve(&model, &args.weights)?;
    let source = args.data.prepare()?;
    let test = source.load_test(device)?;
    if !model.has_class_names() && model.num_classes() == test.classes.len() {
        // Nothing to check against (weights from PyTorch, or from before
        // names were saved): the test set's names it is.
        model.set_classes(test.classes.clone());
    }
    check_classes(
        &args.weights,
        model.classes(),
        &test.classes,
        &source.describe(),
    )?;
    let start = Instant::now();
    let eval = evaluate(&model.forward(tta), &test, args.batch_size);
    // airbench94 reports the other accuracy too.
    let other = match &model {
        Classifier::Net(_) => None,
        Classifier::Airbench94(_) => Some(evaluate(&model.forward(!tta), &test, args.batch_size)),
    };
    let eval_seconds = start.elapsed().as_secs_f64();
    let reporter = Reporter::new(args.json);
    let mut summary = eval.json_fields();
    summary.insert("event".into(), json!("summary"));
    if let Some(other) = &other {
        let (with, without) = if tta { (&eval, other) } else { (other, &eval) };
        summary.insert("model".into(), json!(model.network().name()));
        summary.insert("tta".into(), json!(tta));
        summary.insert("tta_accuracy".into(), json!(with.accuracy()));
        summary.insert("plain_accuracy".into(), json!(without.accuracy()));
    }
    summary.insert("weights".into(), path_json(&args.weights));
    summary.insert("device".into(), json!(device_name(device)));
    summary.insert("eval_seconds".into(), json!(eval_seconds));
    // The picture first: a reader that closes the pipe early (`| head`)
    // ends the process at the next print, and must not cost the file.
    if let Some(png) = &args.confusion {
        draw_confusion(png, &eval)?;
    }
    reporter.emit(
        || match &other {
            None => eval.text(),
            Some(other) => format!(
                "{}\n{}",
                eval.text(),
                tta_line(tta, eval.accuracy(), other.accuracy())
            ),
        },
        summary.into(),
    );
    Ok(())
}

/// airbench94's last line: both accuracies (the lines above are the one
/// asked for), as `train` prints them.
fn tta_line(tta: bool, asked: f64, other: f64) -> String {
    let (with, without) = if tta { (asked, other) } else { (other, asked) };
    format!("With test-time augmentation {with:.2} %, without {without:.2} %")
}
