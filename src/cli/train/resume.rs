//! Going on from a checkpoint: the resumed run adopts the checkpoint's
//! settings, takes the flags given that can change safely (with a note),
//! and refuses those that would change what it computes; then the checks
//! against the training set, and the commands printed to go on later.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use serde_json::json;
use tch::Device;

use super::args::{Given, TrainArgs};
use crate::distributed;
use crate::train::checkpoint::{Checkpoint, Meta, Position};
use crate::train::settings::{ModelKind, Settings};
use crate::util::device::{device_name, DeviceArg};
use crate::util::precision::Precision;
use crate::util::report::path_json;

/// The settings of a run resumed from `saved` (the checkpoint at `path`),
/// and notes for what differs from the checkpoint's. A given flag that
/// would change what the run computes is refused, every one named.
pub fn resumed_settings(
    args: &TrainArgs,
    given: &Given,
    saved: &Meta,
    path: &Path,
) -> Result<(Settings, Vec<String>)> {
    let r = &args.recipe;
    let old = &saved.settings;
    let recorded = |flag: &str| !saved.unrecorded.contains(&flag);
    // `--seed` is `Some` where it is given.
    let seed = r.seed.map_or(String::new(), |v| v.to_string());
    let math = [
        ("--seed", old.seed.to_string(), seed),
        (
            "--batch-size",
            old.batch_size.to_string(),
            r.batch_size.to_string(),
        ),
        ("--lr", old.lr.to_string(), r.lr.to_string()),
        (
            "--momentum",
            old.momentum.to_string(),
            r.momentum.to_string(),
        ),
        (
            "--log-every",
            old.log_every.to_string(),
            r.log_every.to_string(),
        ),
    ];
    // Net's is refused on its own (it trains in fp32 only); an older run's
    // is its device's, which a given one cannot be told from.
    let precision = args.precision.filter(|_| !old.model.is_net());
    let precision = precision.map(|now| {
        let was = old.precision.map_or("that of its device", Precision::name);
        ("--precision", was.to_string(), now.name().to_string())
    });
    let (mut theirs, mut ours) = (vec![], vec![]);
    for (flag, was, now) in math.into_iter().chain(precision) {
        if given.has(flag) && recorded(flag) && now != was {
            theirs.push(format!("{flag} {was}"));
            ours.push(format!("{flag} {now}"));
        }
    }
    ensure!(
        theirs.is_empty(),
        "cannot resume from {}: it was saved with {}, this run has {}; those change what the run \
         computes (leave them out to go on with the checkpoint's)",
        path.display(),
        theirs.join(", "),
        ours.join(", ")
    );

    let mut s = old.clone();
    // A version 1 checkpoint may predate --log-every's record: what is given holds.
    if given.has("--log-every") && !recorded("--log-every") {
        s.log_every = r.log_every;
    }
    let mut notes = Notes {
        lines: vec![],
        unrecorded: &saved.unrecorded,
    };
    if given.has("--epochs") {
        let at = saved.position;
        ensure!(
            r.epochs >= at.epoch,
            "cannot resume from {}: it is at epoch {}, step {}, past the end of --epochs {}; \
             pass --epochs {} or more",
            path.display(),
            at.epoch,
            at.step,
            r.epochs,
            at.epoch
        );
        notes.take("--epochs", &mut s.epochs, r.epochs, number);
    }
    if given.has("--max-steps") {
        let at = saved.position;
        if let Some(m) = args.max_steps.filter(|&m| m <= at.global_step) {
            bail!(
                "cannot resume from {}: it is at global step {}, and --max-steps {m} would stop it \
                 before it trains; pass --max-steps {} or more",
                path.display(),
                at.global_step,
                at.global_step + 1
            );
        }
        notes.take("--max-steps", &mut s.max_steps, args.max_steps, optional);
    } else if let Some(m) = s.max_steps.filter(|&m| saved.position.global_step >= m) {
        // The run stopped where it was set to: a resume is for going further.
        s.max_steps = None;
        notes.lines.push(format!(
            "note: the checkpoint's run stopped at its --max-steps {m}; this one trains on to \
             the end of epoch {} (give --max-steps to stop sooner)",
            s.epochs
        ));
    }
    let ck = &args.checkpoints;
    if given.has("--checkpoint-every") {
        notes.take(
            "--checkpoint-every",
            &mut s.checkpoint_every,
            ck.checkpoint_every,
            optional,
        );
    }
    if given.has("--keep-checkpoints") {
        notes.take(
            "--keep-checkpoints",
            &mut s.keep_checkpoints,
            ck.keep_checkpoints,
            number,
        );
    }
    // These change no number, or only the float rounding (see `check_resume`).
    if given.has("--data-dir") {
        notes.take(
            "--data-dir",
            &mut s.data_dir,
            args.data.data_dir.clone(),
            |p| Some(p.display().to_string()),
        );
    }
    // Image trees and their cache: where the same images are.
    let data = &args.data;
    let dirs = [
        ("--train-dir", &mut s.train_dir, &data.train_dir),
        ("--test-dir", &mut s.test_dir, &data.test_dir),
        ("--cache-dir", &mut s.cache_dir, &data.cache_dir),
    ];
    for (flag, field, now) in dirs {
        if given.has(flag) {
            notes.take(flag, field, now.clone(), |p| {
                p.as_ref().map(|p| p.display().to_string())
            });
        }
    }
    if given.has("--out") {
        notes.take("--out", &mut s.out, args.out.clone(), |p| {
            Some(p.display().to_string())
        });
    }
    if given.has("--device") {
        s.device = r.device;
    }
    if given.has("--threads") {
        s.threads = r.train_threads();
    }
    if given.has("--cpu-conv") {
        s.cpu_conv = r.cpu_conv.resolve(s.batch_size, s.threads);
    }
    let defaulted: Vec<String> = saved
        .unrecorded
        .iter()
        .filter(|flag| !given.has(flag))
        .filter_map(|&flag| {
            let value = match flag {
                "--data-dir" => s.data_dir.display().to_string(),
                "--out" => s.out.display().to_string(),
                "--log-every" => s.log_every.to_string(),
                "--keep-checkpoints" => s.keep_checkpoints.to_string(),
                // Off when not recorded: nothing to say.
                _ => return None,
            };
            Some(format!("{flag} {value}"))
        })
        .collect();
    if !defaulted.is_empty() {
        notes.lines.push(format!(
            "note: {} is a version 1 checkpoint, which does not record every setting; this run \
             has {}",
            path.display(),
            defaulted.join(", ")
        ));
    }
    Ok((s, notes.lines))
}

/// Adds a note when a flag given changes a setting of the checkpoint's.
/// The notes of a resume, and the flags its checkpoint does not record.
struct Notes<'a> {
    lines: Vec<String>,
    unrecorded: &'a [&'static str],
}

impl Notes<'_> {
    /// Takes `now`, a flag given on a resume, for `field`, with a note when
    /// it differs from the value the checkpoint recorded.
    fn take<T: PartialEq>(
        &mut self,
        flag: &str,
        field: &mut T,
        now: T,
        show: fn(&T) -> Option<String>,
    ) {
        if !self.unrecorded.contains(&flag) {
            changed(&mut self.lines, flag, show(field), show(&now));
        }
        *field = now;
    }
}

fn number(v: &u64) -> Option<String> {
    Some(v.to_string())
}

fn optional(v: &Option<u64>) -> Option<String> {
    v.map(|n| n.to_string())
}

fn changed(notes: &mut Vec<String>, flag: &str, was: Option<String>, now: Option<String>) {
    if was != now {
        let show = |v: Option<String>| v.map_or(format!("no {flag}"), |v| format!("{flag} {v}"));
        notes.push(format!(
            "note: resuming with {} (the checkpoint's run had {})",
            show(now),
            show(was)
        ));
    }
}

/// Checks the resumed checkpoint against this run's training set, notes
/// what will round differently, and returns where training continues (the
/// recipe restores the tensors).
/// `restart` names torchrun's restart on the line that says where the run
/// goes on.
pub fn check_resume(
    c: &Checkpoint,
    run: &Meta,
    start_event: &mut serde_json::Value,
    restart: Option<super::restart::Restart>,
) -> Result<Position> {
    if c.meta.train_images != run.train_images {
        bail!(
            "cannot resume from {}: it was trained on {} images, this training set has {}",
            c.path.display(),
            c.meta.train_images,
            run.train_images
        );
    }
    if let (Some(saved), Some(now)) = (&c.meta.train_md5, &run.train_md5) {
        ensure!(
            saved == now,
            "cannot resume from {}: it was trained on another training set (its batch files \
             have md5 {saved}, these have {now})",
            c.path.display()
        );
    }
    let (saved, now) = (&c.meta.settings.classes, &run.settings.classes);
    ensure!(
        saved == now,
        "cannot resume from {}: it was trained on the classes {}, this training set has {}",
        c.path.display(),
        saved.join(", "),
        now.join(", ")
    );
    // Settings that only change float rounding: the run goes on, with a note.
    let main = distributed::is_main();
    let rounding = |saved: String, now: String, fix: String| {
        if main {
            eprintln!(
                "note: {} was saved with {saved}, this run has {now}; the results will differ \
                 in the last bits from an uninterrupted run ({fix} avoids that)",
                c.path.display()
            );
        }
    };
    let (was, is) = (&c.meta.settings, &run.settings);
    // Every step still trains on the same global batch, split otherwise.
    if was.world_size != is.world_size && main {
        let batchnorm = match is.model {
            ModelKind::Net => "",
            _ => ", and BatchNorm's statistics come from other shares of each batch",
        };
        eprintln!(
            "note: {} was saved by a run of {} rank(s), this one has {}: each step trains on \
             the same global batch of {}, but the gradients are summed in another order{batchnorm}, \
             so the results will differ from an uninterrupted run (resume with {} ranks to \
             avoid that)",
            c.path.display(),
            was.world_size,
            is.world_size,
            is.batch_size,
            was.world_size
        );
    }
    if c.meta.trained_on != run.trained_on {
        rounding(
            format!("--device {}", c.meta.trained_on),
            format!("--device {}", run.trained_on),
            format!("--device {}", c.meta.trained_on),
        );
    } else if run.trained_on == "cpu" {
        // The CPU settings only matter where the CPU trains.
        if was.threads != is.threads {
            rounding(
                format!("--threads {}", was.threads),
                format!("--threads {}", is.threads),
                format!("--threads {}", was.threads),
            );
        }
        if was.cpu_conv != is.cpu_conv {
            rounding(
                format!("--cpu-conv {}", was.cpu_conv),
                is.cpu_conv.to_string(),
                format!("--cpu-conv {}", was.cpu_conv),
            );
        }
    }
    let at = c.meta.position;
    let until = match is.max_steps {
        Some(m) if m < is.epochs * run.steps_per_epoch() => {
            format!("global step {m} (--max-steps)")
        }
        _ => format!("the end of epoch {}", is.epochs),
    };
    if main {
        let restart = restart.map_or(String::new(), |r| format!("{r}: "));
        eprintln!(
            "{restart}resuming from {} at epoch {}, step {} (global step {}); training to {until}",
            c.path.display(),
            at.epoch,
            at.step,
            at.global_step,
        );
    }
    start_event["resumed_from"] = json!({
        "checkpoint": path_json(&c.path), "epoch": at.epoch, "step": at.step, "global_step": at.global_step,
    });
    Ok(at)
}

/// The device a run trains on, as checkpoints name it.
pub fn trained_on(device: Device) -> String {
    device_name(device)
}

/// The command line that evaluates `settings.out` on this run's test set.
pub fn evaluate_command(settings: &Settings, json: bool) -> String {
    let mut cmd = format!(
        "tch-cifar evaluate --weights {} --data-dir {}",
        shell_quote(&settings.out.to_string_lossy()),
        shell_quote(&settings.data_dir.to_string_lossy())
    );
    if settings.device != DeviceArg::Auto {
        cmd.push_str(&format!(" --device {}", settings.device));
    }
    if json {
        cmd.push_str(" --json");
    }
    cmd
}

/// The command line that resumes this run from `dir`: the checkpoint holds
/// every setting, so only the output style is left to say.
pub fn resume_command(dir: &Path, json: bool) -> String {
    let mut cmd = format!(
        "tch-cifar train --resume {}",
        shell_quote(&dir.to_string_lossy())
    );
    if json {
        cmd.push_str(" --json");
    }
    match distributed::world() {
        None => cmd,
        // One machine's ranks: the launch that resumes them all.
        Some(w) if w.local_size == w.size => {
            format!(
                "torchrun --standalone --nproc-per-node {} --no-python {cmd}",
                w.size
            )
        }
        Some(w) => format!(
            "{cmd} (on every machine, under torchrun, as this run of {} ranks)",
            w.size
        ),
    }
}

/// `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_./:=+,@%".contains(&b);
    if !s.is_empty() && s.bytes().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::args::tests::parse;
    use super::*;
    use crate::train::checkpoint::Position;

    /// A checkpoint at global step 30 of 50 (10 per epoch) of a run set to
    /// stop at `max_steps`.
    fn saved(max_steps: Option<u64>) -> Meta {
        let settings = Settings {
            epochs: 5,
            lr: 0.01,
            max_steps,
            ..Settings::tutorial(3)
        };
        let position = Position {
            epoch: 3,
            step: 10,
            global_step: 30,
            running_loss: 0.0,
        };
        Meta {
            position,
            ..Meta::new(settings, "cpu".into(), 40, None)
        }
    }

    fn resumed(meta: &Meta, flags: &[&str]) -> Result<(Settings, Vec<String>)> {
        let (args, given) = parse(flags).unwrap();
        resumed_settings(&args, &given, meta, Path::new("c"))
    }

    #[test]
    fn a_resume_adopts_everything_and_names_every_conflict() {
        let meta = saved(None);
        let (settings, notes) = resumed(&meta, &[]).unwrap();
        assert_eq!(settings, meta.settings);
        assert!(notes.is_empty(), "{notes:?}");
        let err = resumed(&meta, &["--lr", "0.02", "--batch-size", "8", "--seed", "3"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "saved with --batch-size 4, --lr 0.01, this run has --batch-size 8, --lr 0.02;"
            ),
            "{err}"
        );
        let err = resumed(&meta, &["--epochs", "2"]).unwrap_err().to_string();
        assert!(err.contains("--epochs 3 or more"), "{err}");
    }

    #[test]
    fn a_spent_max_steps_is_dropped_and_a_pending_one_kept() {
        let (settings, notes) = resumed(&saved(Some(30)), &[]).unwrap();
        assert_eq!(settings.max_steps, None);
        assert!(
            notes[0].contains("stopped at its --max-steps 30"),
            "{notes:?}"
        );
        let (settings, notes) = resumed(&saved(Some(40)), &[]).unwrap();
        assert_eq!((settings.max_steps, notes.len()), (Some(40), 0));
        let (settings, notes) = resumed(&saved(Some(30)), &["--max-steps", "45"]).unwrap();
        assert_eq!(settings.max_steps, Some(45));
        assert_eq!(
            notes,
            ["note: resuming with --max-steps 45 (the checkpoint's run had --max-steps 30)"]
        );
    }

    #[test]
    fn a_max_steps_at_or_before_the_checkpoint_is_refused() {
        for m in ["30", "12"] {
            let err = resumed(&saved(None), &["--max-steps", m])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "at global step 30, and --max-steps {m} would stop it"
                )),
                "{err}"
            );
            assert!(err.contains("pass --max-steps 31 or more"), "{err}");
        }
        assert!(resumed(&saved(None), &["--max-steps", "31"]).is_ok());
    }

    #[test]
    fn a_new_out_or_data_dir_is_noted() {
        let (settings, notes) = resumed(
            &saved(None),
            &["--out", "other.safetensors", "--data-dir", "d2"],
        )
        .unwrap();
        assert_eq!(settings.out, Path::new("other.safetensors"));
        assert!(
            notes
                .iter()
                .any(|n| n.contains("resuming with --out other.safetensors")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("resuming with --data-dir d2")),
            "{notes:?}"
        );
    }

    /// A version 1 checkpoint from before --log-every was recorded: the
    /// flag is taken as given, since there is nothing to compare it with.
    #[test]
    fn an_unrecorded_setting_is_not_compared() {
        let mut meta = saved(None);
        meta.unrecorded = vec!["--log-every", "--out"];
        let (settings, notes) = resumed(&meta, &["--log-every", "10"]).unwrap();
        assert_eq!(settings.log_every, 10);
        assert_eq!(
            notes,
            [
                "note: c is a version 1 checkpoint, which does not record every setting; this run \
              has --out cifar_net.safetensors"
            ]
        );
    }
}
