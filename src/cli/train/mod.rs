//! `tch-cifar train`: the tutorial's training recipe, `Net` on logits with
//! cross-entropy, SGD with momentum on mini-batches reshuffled every epoch,
//! the running loss printed every 2000 mini-batches, then the test-set
//! accuracy.
//!
//! The step itself, as the tutorial writes it, is
//! [`tutorial::training_step`]; [`tutorial::Tutorial`] is the recipe around
//! it (its batches, its checkpoint tensors). The [`harness`](crate::train::harness) drives it and
//! keeps a long run safe: checkpoints (see [`crate::train::checkpoint`]) after
//! every epoch, every `--checkpoint-every` steps and at `--max-steps`, a
//! first SIGINT/SIGTERM that finishes the step, saves and exits with status
//! 130 ([`Interrupted`]), and a stop on the first non-finite loss that
//! leaves the saved files alone. `--resume` goes on from the newest valid
//! checkpoint with the run's own settings ([`resume`]).

mod args;
mod fast;
mod folders;
mod restart;
pub mod resume;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ArgMatches;
use serde_json::json;
use tch::nn::Module;
use tch::Device;

pub use self::args::{
    describe_device, CheckpointArgs, DistArgs, Given, RecipeArgs, TrainArgs, MAX_EPOCHS,
    MAX_THREADS,
};
use self::folders::{
    check_no_interrupted_run, interrupt_dir, prepare_checkpoint_dir, remove_checkpoints, same_dir,
};
use self::resume::{check_resume, evaluate_command, resume_command, resumed_settings};
use crate::data::{self, Split};
use crate::distributed::{self, Backend, Launch, Rendezvous, World};
use crate::nets::classifier::Classifier;
use crate::nets::tutorial::Model;
use crate::train::checkpoint::{Meta, Position, Saver};
use crate::train::evaluation::{evaluate_sharded, predict_classes};
use crate::train::harness::board::{Board, Marks};
use crate::train::harness::profile::Profiler;
use crate::train::harness::{install_signal_handlers, Checkpoints, Hook, Plan};
pub use crate::train::harness::{
    read_losses_every, Interrupted, Interrupts, Saved, TrainStats, INTERRUPTS,
};
use crate::train::optim::Sgd;
use crate::train::recipes::tutorial::{self, Tutorial};
pub use crate::train::settings::{
    diverged_hint, ModelKind, Settings, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS,
    DEFAULT_KEEP_CHECKPOINTS, DEFAULT_LOG_EVERY, DEFAULT_LR, DEFAULT_MOMENTUM,
};
use crate::util::device::device_name;
use crate::util::precision::Precision;
use crate::util::report::{optional_path_json, path_json, Reporter};

/// Where a run starts, and how it saves and stops.
pub struct Control<'a> {
    /// [`Position::START`], or the resumed checkpoint's.
    pub start: Position,
    pub saver: Saver,
    /// Save after every epoch, not only on an interrupt.
    pub every_epoch: bool,
    /// Also save every N global steps.
    pub every: Option<u64>,
    pub interrupts: &'a Interrupts,
    /// Read the losses on the host every N steps: [`read_losses_every`].
    pub read_losses_every: usize,
    /// `tch-cifar train --resume DIR …`, for the interrupt message.
    pub resume_command: String,
}

impl Control<'_> {
    /// The harness's plan for `epochs` from this run's start, saving as
    /// this run saves; no `--max-steps`, loss lines or divergence stop until
    /// the recipe sets them.
    pub fn plan(&mut self, epochs: u64) -> Plan<'_> {
        Plan {
            start: self.start,
            epochs,
            max_steps: None,
            log_every: u64::MAX,
            loss_lines: false,
            note_no_loss_line: false,
            read_losses_every: self.read_losses_every,
            interrupts: self.interrupts,
            checkpoints: Some(Checkpoints {
                saver: &mut self.saver,
                every_epoch: self.every_epoch,
                every: self.every,
                resume_command: &self.resume_command,
            }),
            diverged_hint: None,
        }
    }
}

/// Trains `model` with `opt` on `train` with the tutorial's recipe and the
/// run's settings, through the [harness](crate::train::harness::run): from
/// `control.start` to the end of `settings.epochs` (or
/// `settings.max_steps`), saving checkpoints as `control` says.
pub fn train(
    model: &Model,
    opt: &mut Sgd,
    train: &Split,
    settings: &Settings,
    control: &mut Control,
    reporter: &mut Reporter,
) -> Result<TrainStats> {
    let watchers = Watchers {
        board: None,
        profiler: None,
    };
    train_watched(model, opt, train, settings, control, watchers, reporter)
}

/// What watches a run's steps beside the recipe's own lines: the
/// TensorBoard board and `--profile`'s profiler, each when there is one.
pub struct Watchers<'a> {
    pub board: Option<&'a mut Board>,
    pub profiler: Option<&'a mut Profiler>,
}

impl<'a> Watchers<'a> {
    /// The harness's hooks for them.
    fn into_hooks<R: ?Sized>(self) -> Vec<&'a mut dyn Hook<R>> {
        let mut hooks: Vec<&'a mut dyn Hook<R>> = vec![];
        if let Some(board) = self.board {
            hooks.push(board);
        }
        if let Some(profiler) = self.profiler {
            hooks.push(profiler);
        }
        hooks
    }
}

/// [`train`], watched by `watchers`.
fn train_watched(
    model: &Model,
    opt: &mut Sgd,
    train: &Split,
    settings: &Settings,
    control: &mut Control,
    watchers: Watchers,
    reporter: &mut Reporter,
) -> Result<TrainStats> {
    if train.is_empty() {
        bail!("the training set is empty");
    }
    let mut recipe = Tutorial::new(model, opt, train, settings.seed, settings.batch_size);
    let plan = Plan {
        max_steps: settings.max_steps,
        log_every: settings.log_every,
        loss_lines: true,
        note_no_loss_line: true,
        diverged_hint: Some(diverged_hint(settings.lr, settings.momentum)),
        ..control.plan(settings.epochs)
    };
    crate::train::harness::run(&mut recipe, plan, &mut watchers.into_hooks(), reporter)
}

/// `tch-cifar train`. `matches` are the subcommand's, which tell the flags
/// typed from the defaults. Launched by torchrun (or with its environment),
/// each process is one rank of a data-parallel run ([`crate::distributed`]).
pub fn run(args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    install_signal_handlers().context("cannot install the signal handlers")?;
    let result = train_run(args, matches);
    // The other ranks' errors then name this one and its reason.
    if let Err(err) = &result {
        if !err.is::<Interrupted>() {
            distributed::report_failure(err);
        }
    }
    result
}

/// Joins the distributed run that `launch` describes, whose store
/// `rendezvous` has reached, for `settings` on `device`: checks that the
/// backend suits the device and that the batch divides among the ranks,
/// then that every rank trains rank 0's recipe (taking its seed unless
/// `seed_given`). Returns the device this rank trains on (GPU `LOCAL_RANK`
/// on CUDA).
fn join(
    launch: &Launch,
    rendezvous: Rendezvous,
    dist: &DistArgs,
    settings: &mut Settings,
    device: Device,
    seed_given: bool,
) -> Result<(&'static World, Device)> {
    let backend = dist.dist_backend.unwrap_or(Backend::for_device(device));
    if backend == Backend::Nccl && !device.is_cuda() {
        bail!(
            "--dist-backend nccl runs on GPUs and this run trains on the CPU: use --device cuda, \
             or --dist-backend gloo for the CPU"
        );
    }
    let world_size = launch.world_size as u64;
    if !settings.batch_size.is_multiple_of(world_size) {
        bail!(
            "--batch-size {} does not divide among WORLD_SIZE={world_size} ranks: the batch \
             size is the global batch, of which each rank takes batch size / world size \
             images; pick a multiple of {world_size}",
            settings.batch_size
        );
    }
    let device = match device {
        Device::Cuda(_) => Device::Cuda(launch.local_rank as usize),
        other => other,
    };
    settings.world_size = world_size;
    let world = rendezvous.join(backend, device)?;
    agree_on_recipe(world, settings, seed_given)?;
    // The ranks stop together, so a second signal waits for them.
    INTERRUPTS
        .patient
        .store(true, std::sync::atomic::Ordering::SeqCst);
    Ok((world, device))
}

/// The run's precision on `device`: on a resume the checkpoint's, else
/// `asked` or the device's default ([`Precision::default_for`]). `None`
/// for Net, which trains in float32 only.
fn resolve_precision(
    asked: Option<Precision>,
    settings: &Settings,
    resumed: bool,
    device: Device,
) -> Result<Option<Precision>> {
    if settings.model.is_net() {
        if let Some(p) = asked.filter(|&p| p != Precision::Fp32) {
            bail!(
                "--precision {p} applies to the fast recipes (--model airbench94 or \
                 airbench94-muon); the tutorial's Net trains in fp32, as the tutorial does"
            );
        }
        return Ok(None);
    }
    let precision = match (resumed, asked) {
        (false, Some(p)) => p,
        (false, None) => Precision::default_for(device),
        (true, _) => settings.precision(device),
    };
    precision.check(device)?;
    Ok(Some(precision))
}

/// Every rank of a distributed run trains rank 0's recipe: a seed drawn here
/// (no `--seed`) is replaced by rank 0's, and any other difference in what
/// the ranks would compute is refused, naming it.
fn agree_on_recipe(world: &World, settings: &mut Settings, seed_given: bool) -> Result<()> {
    let recipe = |s: &Settings| {
        json!({
            "--seed": s.seed, "--epochs": s.epochs, "--batch-size": s.batch_size,
            "--lr": s.lr, "--momentum": s.momentum, "--log-every": s.log_every,
            "--max-steps": s.max_steps, "--model": s.model.name(),
            "airbench94's schedule": s.schedule_epochs,
            "--precision": s.precision.map(Precision::name),
        })
    };
    let rank0 = world.rank0_value("recipe", &recipe(settings).to_string())?;
    let rank0: serde_json::Value =
        serde_json::from_str(&rank0).context("rank 0's recipe is not JSON")?;
    if !seed_given {
        settings.seed = rank0["--seed"]
            .as_u64()
            .context("rank 0's recipe has no seed")?;
    }
    let mine = recipe(settings);
    let differs: Vec<String> = mine
        .as_object()
        .expect("json! object")
        .iter()
        .filter(|(k, v)| rank0.get(k.as_str()) != Some(*v))
        .map(|(k, v)| format!("{k} {v} here, {} on rank 0", rank0[k.as_str()]))
        .collect();
    if !differs.is_empty() {
        bail!(
            "rank {} was started with another recipe than rank 0's ({}): give every rank the \
             same command line",
            world.rank,
            differs.join(", ")
        );
    }
    Ok(())
}

fn train_run(args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    let launch = Launch::from_env()?;
    // Rank 0 speaks for a distributed run, before it has joined too.
    let speaks = launch.as_ref().is_none_or(|l| l.rank == 0);
    let given = Given::from_matches(matches);
    let ck = &args.checkpoints;
    if ck.checkpoint_every.is_some() && ck.checkpoint_dir.is_none() && ck.resume.is_none() {
        bail!("--checkpoint-every needs --checkpoint-dir DIR (or --resume DIR) to save into");
    }
    // A distributed run reaches its store first: rank 0's choice of the
    // checkpoint to go on from, which sets the recipe, travels through it.
    let timeout = std::time::Duration::from_secs(args.distributed.dist_timeout);
    let rendezvous = launch
        .as_ref()
        .map(|l| distributed::rendezvous(l, timeout))
        .transpose()?;
    let start = restart::choose(ck, launch.as_ref(), rendezvous.as_ref(), args.json)?;
    let (resumed, own_dir, restart) = (start.checkpoint, start.own_dir, start.restart);
    let mut settings = match &resumed {
        None => args.settings(&given),
        Some(c) => {
            let trained = c.meta.settings.model;
            if given.has("--model") && args.model != trained {
                bail!(
                    "cannot resume from {}: it trains --model {}, not {}",
                    c.path.display(),
                    trained.name(),
                    args.model.name()
                );
            }
            let (settings, notes) = resumed_settings(&args, &given, &c.meta, &c.path)?;
            if speaks {
                for note in notes {
                    eprintln!("{note}");
                }
            }
            settings
        }
    };
    if settings.model.airbench().is_some() {
        let resumed = resumed.as_ref().map(|c| &c.meta.settings);
        fast::check_flags(&given, resumed, args.recipe.epochs, settings.model.name())?;
    }
    let recorded = settings.tensorboard.clone();
    settings.tensorboard =
        args.tensorboard
            .run_dir(settings.model.name(), settings.seed, recorded.as_deref())?;
    if let (Some(old), Some(new)) = (&recorded, &settings.tensorboard) {
        if old != new && speaks {
            eprintln!(
                "note: the TensorBoard events go to {} (the checkpoint's run wrote them to {})",
                new.display(),
                old.display()
            );
        }
    }
    let json = args.json;
    let out = settings.out.clone();
    let device = settings.device.resolve()?;
    settings.precision = resolve_precision(args.precision, &settings, resumed.is_some(), device)?;
    let (world, device) = match (&launch, rendezvous) {
        (Some(launch), Some(rendezvous)) => {
            let seed_given = given.has("--seed") || resumed.is_some();
            let dist = &args.distributed;
            let (world, device) =
                join(launch, rendezvous, dist, &mut settings, device, seed_given)?;
            (Some(world), device)
        }
        _ => {
            if given.has("--dist-backend") || given.has("--dist-timeout") {
                eprintln!(
                    "note: --dist-backend and --dist-timeout only matter when torchrun launches \
                     the run (RANK and WORLD_SIZE are not set)"
                );
            }
            // A checkpoint of a distributed run goes on in one process.
            settings.world_size = 1;
            (None, device)
        }
    };
    let seed = settings.seed;
    // Rank 0 speaks and writes for the whole run.
    let main = world.is_none_or(|w| w.rank == 0);
    // Until the test set is evaluated.
    let training = settings.cpu_settings().apply();
    if main {
        crate::util::files::check_writable(&out)?;
        if let Some(profile) = &args.profile {
            crate::util::files::check_writable(profile)?;
        }
    }
    let data_args = data::DataArgs {
        data_dir: settings.data_dir.clone(),
        train_dir: settings.train_dir.clone(),
        test_dir: settings.test_dir.clone(),
        cache_dir: settings.cache_dir.clone(),
        ..args.data
    };
    crate::weights::outputs::check_command_outputs(
        &data_args,
        &[],
        &[
            ("--out", Some(out.as_path())),
            ("--profile", args.profile.as_deref()),
        ],
    )?;
    let (out_format, note) = crate::weights::outputs::weights_format(&out);
    if let Some(note) = note.filter(|_| main) {
        eprintln!("note: {note}");
    }
    // Checkpoints go to --checkpoint-dir, else to the folder resumed from.
    let checkpoint_dir = ck.checkpoint_dir.clone().or_else(|| ck.resume.clone());
    match &checkpoint_dir {
        Some(dir) if main => {
            // A restart saves on into the folder its first attempt took.
            let continues = if own_dir {
                Some(dir.as_path())
            } else {
                ck.resume.as_deref()
            };
            prepare_checkpoint_dir(dir, continues)?;
            if let Some(world) = world {
                restart::take_folder(world, dir)?;
            }
        }
        Some(_) => {}
        // An interrupt would save there and delete what is there already.
        None => check_no_interrupted_run(&interrupt_dir(&out))?,
    }

    let source = data_args.prepare()?;
    // The test set goes onto the device once training is over and the
    // training set is gone, which keeps the peak memory down; it is checked
    // now (an image tree's decoded), so bad test data fails before training
    // rather than after.
    let (train_set, test_split) = source.load_for_training(device)?;
    settings.classes = train_set.classes.clone();
    let meta = Meta::new(
        settings,
        device_name(device),
        train_set.len() as u64,
        train_set.md5.clone(),
    );
    let settings = &meta.settings;
    let mut reporter = Reporter::new(json).muted(!main);
    let (what, precision) = match settings.model {
        ModelKind::Net => (String::new(), String::new()),
        other => (
            format!("{} ", other.name()),
            format!(" in {}", settings.precision(device)),
        ),
    };
    let ranks = match world {
        Some(w) if w.size == 1 => format!("1 rank ({}) on ", w.backend.name()),
        Some(w) => format!("{} ranks ({}), each on ", w.size, w.backend.name()),
        None => String::new(),
    };
    if main {
        eprintln!(
            "training {what}on {ranks}{}{precision} with {} images, seed {seed} (--seed {seed} \
             repeats this run)",
            describe_device(device, settings.cpu_settings()),
            train_set.len()
        );
    }
    let mut start_event = settings_json(settings, device);
    start_event["event"] = json!("start");
    start_event["train_images"] = json!(train_set.len());

    let resumed_from = resumed
        .as_ref()
        .map(|c| (c.meta.position.global_step, c.path.clone()));
    let start = match &resumed {
        Some(c) => check_resume(c, &meta, &mut start_event, restart)?,
        None => Position::START,
    };
    let (dir, keep, every_epoch) = match checkpoint_dir {
        Some(dir) => (dir, settings.keep_checkpoints as usize, true),
        // Only an interrupt saves there, and only its newest checkpoint stays.
        None => (interrupt_dir(&out), 1, false),
    };
    // The checkpoint resumed from counts as saved, if it is in that folder.
    let last = resumed_from.filter(|(_, p)| p.parent().is_some_and(|d| same_dir(d, &dir)));
    let settings = settings.clone();
    let mut control = Control {
        start,
        every_epoch,
        every: settings.checkpoint_every,
        interrupts: &INTERRUPTS,
        read_losses_every: read_losses_every(device),
        resume_command: resume_command(&dir, json),
        saver: Saver::new(dir, keep, meta, last),
    };
    // A resumed run's events start after its checkpoint's step: TensorBoard
    // drops what the interrupted run wrote from there on.
    let first_step = start.global_step + u64::from(resumed.is_some());
    let events = match &settings.tensorboard {
        Some(dir) => {
            // Rank 0 writes a distributed run's events.
            crate::util::tensorboard::Events::open(
                dir,
                resumed.is_some().then_some(first_step),
                main,
            )?
        }
        None => crate::util::tensorboard::Events::off(),
    };
    let mut board = board_for(events, &settings, start, train_set.len() as u64);
    board.hparams(if resumed.is_some() { first_step } else { 0 }, &settings);
    let mut profiler = args
        .profile
        .clone()
        .filter(|_| main)
        .map(|path| {
            let first = start.global_step + 1;
            Profiler::new(args.profile_step, path, first, settings.max_steps)
        })
        .transpose()?;
    let (trained, mut stats, epoch_seconds) = match settings.model {
        ModelKind::Net => {
            let mut model = Model::with_classes(device, Some(seed), train_set.classes.clone());
            let mut opt = Sgd::new(&model, settings.lr, settings.momentum);
            if let Some(c) = resumed {
                tutorial::restore(c, &mut model, &mut opt)?;
            }
            // The start event has no line in the tutorial's text.
            if reporter.is_json() {
                reporter.emit(String::new, start_event);
            }
            let stats = train_watched(
                &model,
                &mut opt,
                &train_set,
                &settings,
                &mut control,
                Watchers {
                    board: Some(&mut board),
                    profiler: profiler.as_mut(),
                },
                &mut reporter,
            )?;
            drop(train_set);
            (Classifier::Net(model), stats, None)
        }
        ModelKind::Airbench94 | ModelKind::Airbench94Muon => {
            let (airbench, stats, epoch_seconds) = fast::train(
                train_set,
                &settings,
                resumed,
                start_event,
                &mut control,
                Watchers {
                    board: Some(&mut board),
                    profiler: profiler.as_mut(),
                },
                &mut reporter,
            )?;
            let trained = Classifier::Airbench94(Box::new(airbench));
            (trained, stats, Some(epoch_seconds))
        }
    };
    drop(training);
    reporter.emit(
        || "Finished Training".into(),
        json!({"event": "finished_training", "steps": stats.steps, "train_seconds": stats.train_seconds}),
    );
    if main {
        trained.save(&out, out_format)?;
        eprintln!("saved the weights to {}", out.display());
    }
    // Resumed from its own interrupt folder and now finished, the run has
    // no more use for that folder, which would only block the next run.
    let folder = interrupt_dir(&out);
    let finished_interrupt = ck.resume.as_deref().is_some_and(|r| same_dir(r, &folder))
        && !ck
            .checkpoint_dir
            .as_deref()
            .is_some_and(|d| same_dir(d, &folder));
    if finished_interrupt && main {
        remove_checkpoints(&folder)?;
        eprintln!(
            "note: removed the checkpoints in {}: the interrupted run is finished, and {} holds \
             its weights",
            folder.display(),
            out.display()
        );
    }
    if let Some(position) = stats.stopped_at_end.take() {
        if !main {
            let saved = Saved::ByRank0;
            return Err(Interrupted { position, saved }.into());
        }
        let evaluate = evaluate_command(&settings, json);
        if reporter.is_json() {
            reporter.emit(
                String::new,
                json!({"event": "interrupted", "epoch": position.epoch, "step": position.step,
                       "global_step": position.global_step, "weights": path_json(&out),
                       "evaluate": evaluate}),
            );
        }
        let saved = Saved::Weights {
            path: out,
            evaluate,
        };
        return Err(Interrupted { position, saved }.into());
    }

    let test = test_split.load(device)?;
    let eval_start = Instant::now();
    // airbench94 reports its test-time augmentation, and the plain figure beside it.
    let airbench = trained.network().airbench().is_some();
    // In the training's precision.
    let precision = settings.precision(device);
    let forward = trained.forward_in(airbench, precision);
    report_test(&reporter, &forward, &test)?;
    let eval = evaluate_sharded(&forward, &test, 1000, world)?;
    let plain = airbench
        .then(|| evaluate_sharded(&trained.forward_in(false, precision), &test, 1000, world))
        .transpose()?;
    let eval_seconds = eval_start.elapsed().as_secs_f64();
    if let Some(dir) = settings
        .tensorboard
        .as_ref()
        .filter(|_| board.events.is_on())
    {
        // The picture `evaluate --confusion` draws, kept beside the events.
        let png = dir.join("confusion.png");
        crate::train::evaluation::draw_confusion(&png, &eval)?;
        let bytes =
            std::fs::read(&png).with_context(|| format!("cannot read {}", png.display()))?;
        board.evaluation(stats.steps, &eval, plain.as_ref(), &bytes)?;
    }
    let mut summary = settings_json(&settings, device);
    summary["event"] = json!("summary");
    let fields = summary.as_object_mut().expect("json! object");
    fields.extend(eval.json_fields());
    if let (Some(plain), Some(epoch_seconds)) = (&plain, &epoch_seconds) {
        fields.insert("model".into(), json!(settings.model.name()));
        fields.insert("tta_accuracy".into(), json!(eval.accuracy()));
        fields.insert("plain_accuracy".into(), json!(plain.accuracy()));
        fields.insert("epoch_seconds".into(), json!(epoch_seconds));
        let trained_here = stats.steps - control.start.global_step;
        fields.insert(
            "seconds_per_step".into(),
            json!(stats.train_seconds / trained_here.max(1) as f64),
        );
    }
    fields.insert("steps".into(), json!(stats.steps));
    fields.insert("train_seconds".into(), json!(stats.train_seconds));
    fields.insert("images_per_second".into(), json!(stats.images_per_second()));
    fields.insert("eval_seconds".into(), json!(eval_seconds));
    fields.insert("weights".into(), path_json(&out));
    fields.insert(
        "checkpoint".into(),
        optional_path_json(control.saver.last().filter(|_| !finished_interrupt)),
    );
    let text = || match &plain {
        None => eval.text(),
        Some(plain) => format!(
            "{}\nWith test-time augmentation {:.2} %, without {:.2} %",
            eval.text(),
            eval.accuracy(),
            plain.accuracy()
        ),
    };
    reporter.emit(text, summary);
    Ok(())
}

/// The TensorBoard board of a run of `settings` from `start` on
/// `train_images` images: loss marks, learning rates and batch sizes as
/// its recipe has them.
fn board_for(
    events: crate::util::tensorboard::Events,
    settings: &Settings,
    start: Position,
    train_images: u64,
) -> Board {
    match settings.model {
        ModelKind::Net => {
            let (lr, batch) = (settings.lr, settings.batch_size);
            Board::new(
                events,
                start,
                Marks::EveryN(settings.log_every),
                Box::new(move |_| vec![("train/lr", lr)]),
                Box::new(move |step| batch.min(train_images - (step - 1) * batch)),
            )
        }
        ModelKind::Airbench94 => {
            let batch = crate::train::recipes::airbench::BATCH_SIZE as u64;
            let schedule = settings
                .schedule_epochs
                .unwrap_or(crate::train::recipes::airbench::EPOCHS);
            let total = crate::train::recipes::airbench::airbench94::total_steps(
                train_images / batch,
                schedule,
            );
            Board::new(
                events,
                start,
                Marks::Epochs,
                Box::new(move |step| {
                    let [biases, others] =
                        crate::train::recipes::airbench::airbench94::learning_rates(
                            step - 1,
                            total,
                        );
                    vec![("train/lr", others), ("train/lr_norm_biases", biases)]
                }),
                // The last partial batch is dropped.
                Box::new(move |_| batch),
            )
        }
        ModelKind::Airbench94Muon => {
            use crate::train::recipes::airbench::airbench94_muon as muon_recipe;
            let batch = muon_recipe::BATCH_SIZE as u64;
            let schedule = settings.schedule_epochs.unwrap_or(muon_recipe::EPOCHS);
            let (total, whiten) = muon_recipe::schedule(train_images / batch, schedule);
            Board::new(
                events,
                start,
                Marks::Epochs,
                Box::new(move |step| muon_recipe::learning_rates(step - 1, total, whiten).to_vec()),
                Box::new(move |_| batch),
            )
        }
    }
}

/// The settings in the `start` and `summary` events; a distributed run's
/// also name its world size and backend.
fn settings_json(s: &Settings, device: Device) -> serde_json::Value {
    let mut fields = json!({
        "epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr,
        "momentum": s.momentum, "seed": s.seed, "device": device_name(device),
        "threads": s.threads, "cpu_conv": s.cpu_conv.name(),
        "precision": s.precision(device).name(),
    });
    if let Some(world) = distributed::world() {
        fields["world_size"] = json!(world.size);
        fields["backend"] = json!(world.backend.name());
        fields["rank"] = json!(world.rank);
    }
    fields
}

/// The tutorial's peek at the first four test images before the full
/// evaluation: their true classes and the network's guesses.
fn report_test(reporter: &Reporter, net: &impl Module, test: &Split) -> Result<()> {
    let shown = test.len().min(4) as i64;
    let truth: Vec<i64> = Vec::try_from(&test.labels.narrow(0, 0, shown).to_device(Device::Cpu))?;
    let preds = predict_classes(net, &test.images.narrow(0, 0, shown), shown);
    let preds: Vec<i64> = Vec::try_from(&preds.to_device(Device::Cpu))?;
    let names = |v: &[i64]| {
        v.iter()
            .map(|&c| test.classes[c as usize].as_str())
            .collect::<Vec<_>>()
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// The tutorial's recipe on the CPU, logging every step, with `images`
    /// training images.
    fn meta(lr: f64, epochs: u64, images: u64) -> Meta {
        let settings = Settings {
            lr,
            epochs,
            log_every: 1,
            ..Settings::tutorial(1)
        };
        Meta::new(settings, "cpu".into(), images, None)
    }

    #[test]
    fn only_an_unfinished_run_blocks_its_interrupt_folder() {
        // 40 images: 10 steps per epoch, 20 in all.
        let meta = meta(0.01, 2, 40);
        let dir = tempfile::tempdir().unwrap();
        check_no_interrupted_run(dir.path()).unwrap();
        let model = Model::new(Device::Cpu, Some(1));
        let opt = Sgd::new(&model, 0.01, 0.9);
        let mut saver = Saver::new(dir.path().to_path_buf(), 1, meta, None);
        let at = |epoch, step, global_step| Position {
            epoch,
            step,
            global_step,
            running_loss: 0.0,
        };
        let tensors = || tutorial::checkpoint_tensors(&model, &opt);
        saver.save(tensors(), at(1, 5, 5)).unwrap();
        let err = check_no_interrupted_run(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds the checkpoint of an interrupted run (checkpoint-e0001-s0000005"),
            "{err}"
        );
        // A finished run's checkpoint: a new run may start.
        saver.save(tensors(), at(2, 10, 20)).unwrap();
        check_no_interrupted_run(dir.path()).unwrap();
    }

    /// An update that overflows on the last step leaves finite losses behind
    /// it; the run must still fail rather than write non-finite weights.
    #[test]
    fn weights_that_overflow_on_the_last_step_are_an_error() {
        // Huge pixels give huge but finite logits and gradients; a huge rate
        // then overflows the first update.
        let train_set = Split {
            images: Tensor::full([4, 3, 32, 32], 1e15, (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[0i64, 1, 2, 3]),
            md5: None,
            classes: data::cifar::classes(),
        };
        let meta = meta(1e30, 1, 4);
        let recipe = meta.settings.clone();
        let dir = tempfile::tempdir().unwrap();
        let interrupts = Interrupts::new();
        let mut control = Control {
            start: Position::START,
            saver: Saver::new(dir.path().to_path_buf(), 2, meta, None),
            every_epoch: false,
            every: None,
            interrupts: &interrupts,
            read_losses_every: 1,
            resume_command: String::new(),
        };
        let model = Model::new(Device::Cpu, Some(1));
        let mut opt = Sgd::new(&model, recipe.lr, recipe.momentum);
        let mut reporter = Reporter::new(true);
        let err = train(
            &model,
            &mut opt,
            &train_set,
            &recipe,
            &mut control,
            &mut reporter,
        )
        .expect_err("training must fail");
        let message = err.to_string();
        assert!(
            message.starts_with("the weights became non-finite in the last step (epoch 1, step 1)"),
            "{message}"
        );
        assert!(!model.is_finite());
    }
}
