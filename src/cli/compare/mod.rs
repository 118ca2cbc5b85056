//! `compare-losses`: the tutorial's `Net` trained four ways, side by side,
//! to show with numbers what `nn.CrossEntropyLoss` on logits is, and why a
//! softmax output layer scored with `nll_loss(log(p))` is the same
//! mathematics but not the same numerics.
//!
//! * **A**: `Net`'s logits, loss libtorch's `cross_entropy_loss` (log-softmax
//!   and NLL in one call: the tutorial's `nn.CrossEntropyLoss`);
//! * **A'**: A again, with the images (and labels) of every mini-batch in
//!   reverse order: in exact arithmetic the same update, in floating point
//!   a different rounding. It is the yardstick: A and A' drift apart as far
//!   as rounding alone takes two trainings;
//! * **B**: a softmax as the last layer, so the output is a probability
//!   vector, and loss `nll_loss(log(p))`;
//! * **C**: a log-softmax as the last layer, and loss `nll_loss`.
//!
//! The four start from the same weights (one seed, checked bit for bit)
//! and see the same mini-batches in the same order, so every difference
//! between them comes from the arithmetic of their last layer and loss,
//! or for A', from the order of its sums. `--dtype f64` runs the same
//! comparison in float64 (the float32 initial weights, cast), where the
//! rounding is 2^29 times finer: there A, A' and B stay the same network.
//!
//! When a model's loss or gradient is not finite (B's, once a probability
//! underflows to 0), that model skips the update for that step, its
//! weights and momentum untouched, and the step is counted and reported.
//! `train` stops on a non-finite loss instead; here the failure is the
//! thing being shown, and a NaN is never let into the weights.
//!
//! libtorch's `cross_entropy_loss` (PyTorch's `F.cross_entropy`) is
//! `log_softmax` then `nll_loss`, and so is tch's `cross_entropy_for_logits`,
//! which `train` uses: in float32 the same kernels, bit for bit. A and C
//! therefore execute the same kernels and agree exactly; C is there to show
//! that a normalized output layer is fine as long as it is a log-softmax.

mod contenders;
mod output;
mod probe;
mod side_by_side;

pub use contenders::{contenders, max_abs_per_parameter, Contender, Head, InitReport, Role};
pub use output::{dtype_flag, write_csv, write_plot, CSV_HEADER};
pub use probe::{inference_check, probe, probe_gap, Probe, PROBE_SCALES};
pub use side_by_side::{side_by_side, Divergence, History, DIVERGENCE_EVERY};

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::cli::train::RecipeArgs;
use crate::data::{self, DataArgs, Split};
use crate::train::evaluation::{evaluate, predict_classes, Evaluation};
use crate::util::device::{device_name, CpuSettings};
use crate::util::report::{optional_path_json, Reporter};
use crate::util::tensorboard::Events;
use contenders::{largest, pair_key};
use output::{accuracy_text, learned, not_learned_warning, same_function_sentence, sci, text_only};
use probe::kind_name;

/// The floating-point type of a `compare-losses` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// float32, as the tutorial trains.
    F32,
    /// float64: data, weights, momentum and every operation.
    F64,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::F64 => Kind::Double,
        }
    }
}

/// Train Net with cross-entropy on logits (twice: A, and A' on reversed
/// mini-batches), with softmax + nll_loss(log p) and with log-softmax +
/// nll_loss, side by side, and compare them.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten, next_help_heading = "Recipe")]
    pub recipe: RecipeArgs,
    /// Float type of data, weights and math: f32, f64 or both.
    ///
    /// `f32,f64` runs the comparison once in each, one after the other.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "f32",
        help_heading = "Recipe",
        hide_possible_values = true
    )]
    pub dtype: Vec<Precision>,
    /// Stop each run after N mini-batches in all, then evaluate as usual.
    #[arg(long, value_name = "N", help_heading = "Recipe", allow_negative_numbers = true,
          value_parser = |s: &str| crate::cli::count(s, 1, u64::MAX))]
    pub max_steps: Option<u64>,
    /// CSV file for every step's losses and the parameter differences.
    ///
    /// The losses of every mini-batch, and every 100 steps the largest
    /// parameter differences.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub csv: Option<PathBuf>,
    /// PNG chart of the losses and (log scale) the parameter differences.
    #[arg(long, value_name = "FILE.png", value_parser = crate::util::plot::parse_png, help_heading = "Output")]
    pub plot: Option<PathBuf>,
    /// Print one JSON object per line instead of tables.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    #[command(flatten)]
    pub tensorboard: crate::util::tensorboard::LogdirArgs,
}

/// What every run of one invocation shares.
struct Setup<'a> {
    args: &'a CompareArgs,
    recipe: &'a RecipeArgs,
    device: Device,
    cpu: CpuSettings,
    seed: u64,
    /// The `--logdir` run folder, one subfolder per dtype.
    run_dir: Option<PathBuf>,
    train: Split,
    /// Loaded after the first training, then kept.
    test: Option<Split>,
    /// The test split until it is loaded.
    test_split: Option<data::TestSplit>,
}

/// `tch-cifar compare-losses`.
pub fn run(args: CompareArgs) -> Result<()> {
    if crate::distributed::Launch::from_env()?.is_some() {
        bail!(
            "compare-losses trains its four networks side by side in one process and does not \
             run distributed: run it without torchrun (with RANK and WORLD_SIZE unset)"
        );
    }
    crate::train::harness::install_signal_handlers()
        .context("cannot install the signal handlers")?;
    for (i, p) in args.dtype.iter().enumerate() {
        if args.dtype[..i].contains(p) {
            bail!(
                "--dtype lists {} twice; give each of f32, f64 at most once",
                dtype_flag(p.kind())
            );
        }
    }
    let recipe = &args.recipe;
    let device = recipe.device()?;
    for path in args.csv.iter().chain(&args.plot) {
        crate::util::files::check_writable(path)?;
    }
    crate::weights::outputs::check_command_outputs(
        &args.data,
        &[],
        &[
            ("--csv", args.csv.as_deref()),
            ("--plot", args.plot.as_deref()),
        ],
    )?;
    let source = args.data.prepare()?;
    // As in `train`: the test set is loaded after training, but checked now
    // so that bad test data fails before minutes of training.
    let (train, test_split) = source.load_for_training(device)?;
    ensure!(
        train.classes.len() == data::CLASSES.len(),
        "compare-losses trains the tutorial's ten-class Net, and the data ({}) has {} classes",
        source.describe(),
        train.classes.len()
    );
    let seed = recipe.seed_or_random();
    let run_dir = args.tensorboard.run_dir("compare-losses", seed, None)?;
    let mut reporter = Reporter::new(args.json);
    eprintln!(
        "comparing losses on {} with {} images, seed {seed} (--seed {seed} repeats this run)",
        recipe.describe_device(device),
        train.len()
    );
    let mut setup = Setup {
        args: &args,
        recipe,
        device,
        cpu: recipe.cpu_settings(),
        seed,
        run_dir,
        train,
        test: None,
        test_split: Some(test_split),
    };
    let mut runs: Vec<(Kind, History)> = Vec::new();
    for p in &args.dtype {
        let history = run_one(&mut setup, p.kind(), &runs, &mut reporter)?;
        runs.push((p.kind(), history));
    }
    Ok(())
}

/// One comparison in `kind`, start to summary. `earlier` are the runs in
/// other dtypes before it, which the CSV and the chart show beside it.
fn run_one(
    s: &mut Setup<'_>,
    kind: Kind,
    earlier: &[(Kind, History)],
    reporter: &mut Reporter,
) -> Result<History> {
    let started = Instant::now();
    let (args, recipe, device, seed) = (s.args, s.recipe, s.device, s.seed);
    let steps_per_epoch = s.train.len().div_ceil(recipe.batch_size as usize) as u64;
    let all_steps = recipe.epochs * steps_per_epoch;
    let steps = args.max_steps.map_or(all_steps, |m| m.min(all_steps));
    let setup = json!({
        "dtype": dtype_flag(kind),
        "device": device_name(device), "seed": seed, "epochs": recipe.epochs,
        "batch_size": recipe.batch_size, "lr": recipe.lr, "momentum": recipe.momentum,
        "train_images": s.train.len(), "steps": steps,
        "threads": s.cpu.threads, "cpu_conv": s.cpu.conv.name(),
    });
    let mut start = setup.clone();
    start["event"] = json!("start");
    start["models"] = json!(Role::ALL
        .iter()
        .map(|r| (
            model_key(*r),
            json!({"layer": r.head().layer(), "loss": r.head().loss_name(),
                                        "reversed_batches": r.reversed()})
        ))
        .collect::<Map<_, _>>());
    reporter.emit(
        || {
            // A blank line between one run's last line and the next's first.
            let mut out = format!(
                "{}Net trained four ways in {}, from the same initial weights, on the same \
                 mini-batches:",
                if earlier.is_empty() { "" } else { "\n" },
                kind_name(kind)
            );
            for r in Role::ALL {
                let last = format!("{} layer", r.head().layer());
                let order = if r.reversed() {
                    ", each mini-batch in reverse order"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "\n  {:<3} {last:<20}-> {}{order}",
                    r.letter(),
                    r.head().loss_name()
                ));
            }
            out.push_str(&format!(
                "\n{}, {} training images, seed {seed}, {} epoch{} of {steps_per_epoch} \
                 mini-batches of {}, lr {}, momentum {}{}\n",
                device_name(device),
                s.train.len(),
                recipe.epochs,
                if recipe.epochs == 1 { "" } else { "s" },
                recipe.batch_size,
                recipe.lr,
                recipe.momentum,
                if steps < all_steps {
                    format!(", stopping after {steps} steps (--max-steps)")
                } else {
                    String::new()
                }
            ));
            out
        },
        start,
    );

    // The training's CPU settings, until the test set is evaluated.
    let training = s.cpu.apply();
    let mut four = contenders(device, kind, seed, recipe.lr, recipe.momentum)?;
    let mut board = match &s.run_dir {
        Some(dir) => Events::open(&dir.join(dtype_flag(kind)), None, true)?,
        None => Events::off(),
    };
    board.text("hparams", 0, &hparams_text(&setup));
    let history = side_by_side(
        &mut four,
        &s.train,
        recipe,
        args.max_steps,
        seed,
        &mut board,
        reporter,
    )?;
    drop(training);

    if let Some(split) = s.test_split.take() {
        s.test = Some(split.load(device)?);
    }
    let test = s.test.as_ref().expect("loaded above");
    let evals: Vec<Evaluation> = four.iter().map(|c| evaluate(&c.net, test, 1000)).collect();
    let preds: Vec<Tensor> = four
        .iter()
        .map(|c| predict_classes(&c.net, &test.images, 1000))
        .collect();
    let total = test.len() as i64;
    let agree = |r: Role| {
        preds[0]
            .eq_tensor(&preds[r.index()])
            .sum(Kind::Int64)
            .int64_value(&[])
    };
    let pct = |n: i64| 100.0 * n as f64 / total.max(1) as f64;
    let (agree_ab, agree_a_rev) = (agree(Role::B), agree(Role::AReversed));
    let a = four[0].flat();
    let param_diff = |r: Role| max_abs_per_parameter(&(a - four[r.index()].flat()));
    let (per_ab, per_a_rev) = (param_diff(Role::B), param_diff(Role::AReversed));
    let (ab_name, ab_max) = largest(&per_ab);
    let (a_rev_name, a_rev_max) = largest(&per_a_rev);
    let (_, ac_max) = largest(&param_diff(Role::C));
    let param_scale = a.abs().max().double_value(&[]);
    let loss_diff_text = |r: Role| match history.max_loss_diff(r) {
        Some((d, step)) => format!("{} (step {step})", sci(d)),
        None => "none (no step where both were finite)".into(),
    };
    let dtype = kind_name(kind);
    // Untrained networks agree on every image: say so beside the figures.
    let learned = learned(&evals);
    let warning = if learned {
        String::new()
    } else {
        let advice = if steps < all_steps {
            format!("Train longer: --max-steps stopped this run after {steps} steps.")
        } else {
            "Train longer: more --epochs, or check --lr.".to_string()
        };
        format!("\n{}", not_learned_warning(&evals, &advice))
    };
    let same_function = same_function_sentence(four[Role::B.index()].skipped);
    let mut test_event = json!({"event": "test", "dtype": dtype_flag(kind), "total": total,
        "agree_ab": agree_ab, "agreement_ab_percent": pct(agree_ab),
        "agree_a_rev": agree_a_rev, "agreement_a_rev_percent": pct(agree_a_rev),
        "learned": learned});
    for (r, e) in Role::ALL.iter().zip(&evals) {
        test_event[format!("accuracy_{}", r.key())] = json!(e.accuracy());
    }
    let accuracies: Vec<(String, f64)> = Role::ALL
        .iter()
        .zip(&evals)
        .map(|(r, e)| (format!("test/accuracy/{}", r.letter()), e.accuracy()))
        .collect();
    let accuracies: Vec<(&str, f64)> = accuracies.iter().map(|(t, a)| (t.as_str(), *a)).collect();
    board.scalars(history.losses.len() as u64, &accuracies);
    board.flush();
    reporter.emit(
        || {
            format!(
                "\n{}\n\n\
                 A and B predict the same class on {agree_ab} of {total} test images \
                 ({:.2} %); A and A' on {agree_a_rev} ({:.2} %).{warning}\n\
                 Largest |loss_A - loss_B| on one mini-batch: {}; |loss_A - loss_A'|: {}.\n\
                 Largest parameter difference after {} steps: |A-B| {} (in {ab_name}), \
                 |A-A'| {} (in {a_rev_name}), |A-C| {}; the largest weight is {param_scale:.2}.\n\
                 Updates skipped on a non-finite loss or gradient: {}.\n\
                 A' differs from A only in the order in which its sums are rounded: A against A' \
                 is what {dtype} rounding alone does, the yardstick for A against B.\n\
                 {same_function}",
                accuracy_text(&evals),
                pct(agree_ab),
                pct(agree_a_rev),
                loss_diff_text(Role::B),
                loss_diff_text(Role::AReversed),
                history.losses.len(),
                sci(ab_max),
                sci(a_rev_max),
                sci(ac_max),
                four.iter()
                    .map(|c| format!("{} {}", c.role.letter(), c.skipped))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        },
        test_event,
    );

    // The probe: a fixed batch (the first 16 test images) through the
    // trained A, so the logits have the size a trained network gives them,
    // and some images are misclassified, as in any batch.
    let shown = test.len().min(16) as i64;
    let logits = tch::no_grad(|| {
        four[0]
            .net
            .model
            .net
            .forward(&test.images.narrow(0, 0, shown).to_kind(kind))
    });
    let probe = probe(&logits, &test.labels.narrow(0, 0, shown));
    let what = format!(
        "the logits of the first {shown} test images (trained A, {dtype}), scaled, and a \
         hand-made row"
    );
    reporter.emit(|| format!("\n{}", probe.text(&what)), probe.json(&what));

    let (same, n, sum_err) = inference_check(&four[0].net, &test.images);
    let inference = inference_answer(same, n, sum_err);
    text_only(reporter, format!("\n{inference}"));

    let mut all: Vec<(Kind, &History)> = earlier.iter().map(|(k, h)| (*k, h)).collect();
    all.push((kind, &history));
    if let Some(path) = &args.csv {
        write_csv(path, &all)?;
    }
    if let Some(path) = &args.plot {
        write_plot(path, &all)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut summary = setup;
    summary["event"] = json!("summary");
    let models: Map<String, Value> = four
        .iter()
        .zip(&evals)
        .map(|(c, e)| {
            let mut m = e.json_fields();
            m.insert("layer".into(), json!(c.role.head().layer()));
            m.insert("loss".into(), json!(c.role.head().loss_name()));
            m.insert("reversed_batches".into(), json!(c.role.reversed()));
            m.insert("skipped_steps".into(), json!(c.skipped));
            m.insert("first_skipped_step".into(), json!(c.first_skipped));
            (model_key(c.role), Value::Object(m))
        })
        .collect();
    let per_parameter = |v: &[(&str, f64)]| {
        json!(v
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<Map<_, _>>())
    };
    let fields = summary.as_object_mut().expect("json! object");
    fields.insert("models".into(), Value::Object(models));
    fields.insert("test_images".into(), json!(total));
    for (r, agreed) in [(Role::B, agree_ab), (Role::AReversed, agree_a_rev)] {
        let pair = pair_key(r);
        fields.insert(format!("agree_{pair}"), json!(agreed));
        fields.insert(format!("agreement_{pair}_percent"), json!(pct(agreed)));
        fields.insert(
            format!("accuracy_gap_{pair}"),
            json!((evals[0].accuracy() - evals[r.index()].accuracy()).abs()),
        );
        let (loss_diff, loss_diff_step) = history.max_loss_diff(r).unzip();
        fields.insert(format!("max_loss_diff_{pair}"), json!(loss_diff));
        fields.insert(format!("max_loss_diff_{pair}_step"), json!(loss_diff_step));
    }
    fields.insert("learned".into(), json!(learned));
    fields.insert("max_param_diff_ab".into(), json!(ab_max));
    fields.insert("max_param_diff_a_rev".into(), json!(a_rev_max));
    fields.insert("max_param_diff_ac".into(), json!(ac_max));
    fields.insert("max_abs_weight_a".into(), json!(param_scale));
    fields.insert("param_diff_ab".into(), per_parameter(&per_ab));
    fields.insert("param_diff_a_rev".into(), per_parameter(&per_a_rev));
    fields.insert(
        "divergence".into(),
        json!({"every": DIVERGENCE_EVERY,
               "step": history.divergence.iter().map(|d| d.step).collect::<Vec<_>>(),
               "max_param_diff_ab": history.divergence.iter().map(|d| d.ab).collect::<Vec<_>>(),
               "max_param_diff_a_rev":
                   history.divergence.iter().map(|d| d.a_rev).collect::<Vec<_>>()}),
    );
    if let Some(init) = &history.init {
        fields.insert("init".into(), init.json());
    }
    fields.insert("probe_finding".into(), json!(probe.finding()));
    fields.insert(
        "probe_first_broken_scale_b".into(),
        json!(probe.first_broken_scale()),
    );
    fields.insert(
        "inference".into(),
        json!({"argmax_logits_equals_argmax_softmax": same, "images": n,
               "max_softmax_sum_error": sum_err, "answer": inference}),
    );
    fields.insert("train_seconds".into(), json!(history.train_seconds));
    fields.insert("seconds".into(), json!(seconds));
    fields.insert("csv".into(), optional_path_json(args.csv.as_deref()));
    fields.insert("plot".into(), optional_path_json(args.plot.as_deref()));
    reporter.emit(
        || {
            let mut out = format!(
                "\nFinished the {dtype} run in {seconds:.1} s ({:.1} s of training).",
                history.train_seconds
            );
            for (flag, path) in [("CSV", &args.csv), ("Chart", &args.plot)] {
                if let Some(p) = path {
                    out.push_str(&format!("\n{flag}: {}", p.display()));
                }
            }
            out
        },
        summary,
    );
    Ok(history)
}

/// A run's settings (its `start` event's) as a Markdown table.
fn hparams_text(setup: &Value) -> String {
    let mut text = String::from("| setting | value |\n| --- | --- |\n");
    if let Some(fields) = setup.as_object() {
        for (key, value) in fields {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.push_str(&format!("| {key} | {value} |\n"));
        }
    }
    text
}

/// The key of a model in the JSON `models` objects: "A", "A_rev", "B", "C".
fn model_key(role: Role) -> String {
    role.letter().replace('\'', "_rev")
}

/// The inference answer, from [`inference_check`]'s facts.
fn inference_answer(same: i64, n: i64, sum_err: f64) -> String {
    if sum_err.is_finite() {
        format!(
            "At inference, the class is the argmax of the logits (softmax keeps their order: \
             argmax(softmax(logits)) picked the same class on {same} of {n} test images), and \
             the class probabilities are softmax(logits) (here each row sums to 1 within \
             {sum_err:.0e})."
        )
    } else {
        format!(
            "At inference, the class is the argmax of the logits and the class probabilities \
             are softmax(logits), but this run cannot show it: A's logits overflow on some test \
             images (its training diverged; try a lower --lr), so their softmax is NaN there \
             (argmax(softmax(logits)) and argmax(logits) agreed on {same} of {n} test images)."
        )
    }
}
