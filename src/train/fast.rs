//! `tch-cifar train --model airbench94`: the fast recipe, trained and
//! evaluated with and without test-time augmentation.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::args::{describe_device, Given, TrainArgs};
use crate::airbench::recipe::new_network;
use crate::airbench::{FastRecipe, Tta, BATCH_SIZE, EPOCHS};
use crate::device::{device_name, CpuConv, CpuSettings};
use crate::evaluate::evaluate;
use crate::model::{classes_json, CLASSES_KEY, MODEL_KEY};
use crate::outputs::Format;
use crate::report::{path_json, step_bar, Diverged, Reporter};

/// The tutorial's flags that the fast recipe, with its own fixed
/// hyperparameters, does not take.
const TUTORIAL_ONLY: [&str; 5] = ["batch_size", "lr", "momentum", "log_every", "cpu_conv"];

pub fn run(args: &TrainArgs, given: &Given) -> Result<()> {
    for flag in TUTORIAL_ONLY {
        if given.has(flag) {
            bail!(
                "--{} is a setting of the tutorial's recipe; --model airbench94 has its own \
                 fixed hyperparameters (drop the flag, or use --model net)",
                flag.replace('_', "-")
            );
        }
    }
    let ck = &args.checkpoints;
    if ck.resume.is_some() || ck.checkpoint_dir.is_some() || ck.checkpoint_every.is_some() {
        bail!("checkpoints and --resume are not available with --model airbench94 yet");
    }
    let r = &args.recipe;
    let seed = r.seed_or_random();
    let epochs = if given.has("epochs") {
        r.epochs as f64
    } else {
        EPOCHS
    };
    let device = r.device()?;
    let threads = r.threads.unwrap_or_else(crate::device::default_threads);
    let cpu = CpuSettings {
        threads,
        conv: CpuConv::Onednn,
    };
    let out = &args.out;
    crate::fsutil::check_writable(out)?;
    crate::outputs::check_command_outputs(&args.data, &[], &[("--out", Some(out.as_path()))])?;
    let (format, note) = crate::outputs::weights_format(out);
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    let training = cpu.apply();
    let mut reporter = Reporter::new(args.json);
    let source = args.data.prepare()?;
    let (train_set, test_split) = source.load_for_training(device)?;
    let classes = train_set.classes.clone();
    if (train_set.len() as i64) < BATCH_SIZE {
        bail!(
            "the training set has {} images, fewer than one mini-batch of {BATCH_SIZE}",
            train_set.len()
        );
    }
    eprintln!(
        "training airbench94 on {} with {} images, seed {seed} (--seed {seed} repeats this run)",
        describe_device(device, cpu),
        train_set.len()
    );
    // Faster on this CPU in training and evaluation alike, as on GPUs.
    let channels_last = true;
    let (_vs, net) = new_network(device, seed, classes.len() as i64);
    let began = Instant::now();
    let mut recipe = FastRecipe::new(
        &net,
        &train_set.images,
        &train_set.labels,
        seed,
        epochs,
        channels_last,
    );
    let images = train_set.len();
    drop(train_set);
    let steps_per_epoch = recipe.steps_per_epoch();
    let total = recipe.total_steps();
    let last = args.max_steps.map_or(total, |m| m.min(total));
    let whole_epochs = total.div_ceil(steps_per_epoch);
    if reporter.is_json() {
        reporter.emit(
            String::new,
            json!({"event": "start", "model": "airbench94", "epochs": epochs,
                   "batch_size": BATCH_SIZE, "steps": total, "seed": seed,
                   "device": device_name(device), "threads": threads, "train_images": images}),
        );
    }
    let bar = reporter.attach_bar(step_bar(last));
    let mut step = 0;
    let mut epoch_seconds = vec![];
    'epochs: for epoch in 1..=whole_epochs {
        let epoch_began = Instant::now();
        bar.set_prefix(format!("epoch {epoch}/{whole_epochs}"));
        recipe.start_epoch(epoch);
        let mut loss_sum = 0.0;
        let mut seen = 0;
        for i in 1..=steps_per_epoch {
            if step == last {
                break;
            }
            let (loss, n) = recipe.training_step(epoch, i);
            step += 1;
            let loss = loss.double_value(&[]) / n as f64;
            if !loss.is_finite() {
                return Err(Diverged(format!(
                    "the loss became {loss} at epoch {epoch}, step {i}: training diverged; \
                     the weights were not saved"
                ))
                .into());
            }
            loss_sum += loss;
            seen += 1;
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3}"));
        }
        let seconds = epoch_seconds_push(&mut epoch_seconds, epoch_began);
        let mean = loss_sum / seen.max(1) as f64;
        reporter.emit(
            || format!("epoch {epoch:2}  step {step:4}  train loss {mean:.4}  {seconds:.1} s"),
            json!({"event": "epoch", "epoch": epoch, "step": step, "train_loss": mean,
                   "seconds": seconds}),
        );
        if step == last {
            break 'epochs;
        }
    }
    let train_seconds = began.elapsed().as_secs_f64();
    reporter.finish_bar();
    if !recipe.is_finite() {
        bail!(Diverged(
            "the weights became non-finite: training diverged; they were not saved".into()
        ));
    }
    drop(recipe);
    drop(training);
    reporter.emit(
        || "Finished Training".into(),
        json!({"event": "finished_training", "steps": step, "train_seconds": train_seconds}),
    );
    save(&net, &classes, out, format)?;
    eprintln!("saved the weights to {}", out.display());

    let test = test_split.load(device)?;
    let eval_began = Instant::now();
    let plain = Tta {
        net: net.shallow_clone(),
        tta: false,
        channels_last,
    };
    let plain = evaluate(&plain, &test, 1000);
    let with_tta = Tta {
        net: net.shallow_clone(),
        tta: true,
        channels_last,
    };
    let with_tta = evaluate(&with_tta, &test, 1000);
    let eval_seconds = eval_began.elapsed().as_secs_f64();
    let mut summary = json!({"event": "summary", "model": "airbench94", "epochs": epochs,
        "steps": step, "seed": seed, "device": device_name(device), "threads": threads,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / step.max(1) as f64,
        "epoch_seconds": epoch_seconds, "eval_seconds": eval_seconds,
        "tta_accuracy": with_tta.accuracy(), "weights": path_json(out)});
    let fields = summary.as_object_mut().expect("json! object");
    fields.extend(plain.json_fields());
    reporter.emit(
        || {
            format!(
                "Accuracy of the network on the {} test images: {:.2} % with test-time \
                 augmentation, {:.2} % without\n{train_seconds:.1} s of training, \
                 {eval_seconds:.1} s of evaluation",
                plain.total(),
                with_tta.accuracy(),
                plain.accuracy()
            )
        },
        summary,
    );
    Ok(())
}

fn epoch_seconds_push(seconds: &mut Vec<f64>, began: Instant) -> f64 {
    let s = began.elapsed().as_secs_f64();
    seconds.push(s);
    s
}

/// Writes the network's `state_dict` (keyed like `scripts/airbench94.py`'s
/// `Airbench94`) with its class names and the network's name.
fn save(
    net: &crate::airbench::Airbench94,
    classes: &[String],
    out: &std::path::Path,
    format: Format,
) -> Result<()> {
    let state = net.state_dict();
    match format {
        Format::Safetensors => {
            let metadata = HashMap::from([
                (CLASSES_KEY.to_string(), classes_json(classes)),
                (MODEL_KEY.to_string(), "airbench94".to_string()),
            ]);
            crate::model::write_safetensors(out, &state, metadata)
        }
        Format::Pth => crate::pth::write(out, &state, Some(classes)),
        other => bail!(
            "{}: airbench94 weights cannot be written as {}",
            out.display(),
            other.name()
        ),
    }
    .with_context(|| format!("cannot save the weights to {}", out.display()))
}
