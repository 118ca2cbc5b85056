//! Training checkpoints: everything a run needs to continue bit for bit,
//! in one safetensors file per save.
//!
//! A checkpoint holds the weights under PyTorch's `state_dict` keys
//! (`conv1.weight` … `fc3.bias`, f32), the SGD momentum buffer as
//! `optimizer.momentum_buffer` (flat, in [`crate::nets::tutorial::PARAMETERS`] order,
//! as [`crate::train::optim::Sgd`] keeps it): whatever tensors the recipe names
//! ([`Saver::save`]). In the header's `__metadata__` four strings:
//! `format` (`tch-cifar-checkpoint`), `version` (2), `model` (`Net`) and
//! `run`, one JSON value ([`Meta`]): the run's [`Settings`], the device it
//! trained on, the size and md5 of its training set, and where training
//! stands (epoch, step within it, global step, running-loss sum). The data
//! order needs no state of its own: [`crate::data::epoch_order`] is a pure
//! function of the seed, the epoch and the number of images.
//!
//! Version 1 checkpoints (one metadata string per field, without the
//! settings added since) still load: [`Meta::unrecorded`] lists what they
//! lack, filled with the defaults.
//!
//! Files are named `checkpoint-e{epoch:04}-s{step:07}.safetensors` and are
//! written with [`files::write_atomically`] (temporary file, fsync, rename,
//! directory fsync), so a kill leaves either the previous file set or the new
//! one. Loading validates every field and tensor; [`newest`] skips a file that
//! fails and falls back to the next older one. Temporary files (names starting
//! with `.`) are never read, and are cleaned up by the next save.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::ValueEnum;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::nets::tutorial::parameter_shapes;
use crate::train::settings::{self, ModelKind, Settings};
use crate::util::device::{CpuConv, DeviceArg};
use crate::util::files;

/// The value of the `format` metadata field.
pub const FORMAT: &str = "tch-cifar-checkpoint";
/// The layout version this build writes.
pub const VERSION: u32 = 2;
/// The key of the SGD momentum buffer: optimizer state, which
/// [`crate::nets::tutorial::Model::load`] leaves out when it reads a checkpoint as weights.
pub const MOMENTUM_KEY: &str = "optimizer.momentum_buffer";
/// The metadata field that holds [`Meta`] as JSON.
const RUN_KEY: &str = "run";
const PREFIX: &str = "checkpoint-e";
const SUFFIX: &str = ".safetensors";

/// Where training stands after some steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// The epoch in progress, from 1.
    pub epoch: u64,
    /// Steps done in `epoch`, up to the steps per epoch.
    pub step: u64,
    /// Steps done since training began.
    pub global_step: u64,
    /// The loss summed since the last printed loss line, so that a resumed
    /// run prints the same lines as an uninterrupted one.
    pub running_loss: f64,
}

impl Position {
    /// Before the first step.
    pub const START: Position = Position {
        epoch: 1,
        step: 0,
        global_step: 0,
        running_loss: 0.0,
    };

    /// The same point, as the start of the next epoch when `step` ended one.
    pub fn normalized(self, steps_per_epoch: u64) -> Position {
        if self.step < steps_per_epoch {
            return self;
        }
        Position {
            epoch: self.epoch + 1,
            step: 0,
            global_step: self.global_step,
            running_loss: 0.0,
        }
    }
}

/// What a checkpoint records besides its tensors: the `run` metadata field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub settings: Settings,
    /// The device the saving run trained on (`cpu`, `cuda:0`).
    pub trained_on: String,
    /// Images in the training set: the data order depends on it.
    pub train_images: u64,
    /// The training set's [`crate::data::Split::md5`], where it has one.
    pub train_md5: Option<String>,
    pub position: Position,
    /// The flags whose settings the file did not record (a version 1
    /// checkpoint), so [`Meta::settings`] has their defaults.
    #[serde(skip)]
    pub unrecorded: Vec<&'static str>,
}

impl Meta {
    /// A run's metadata before its first step.
    pub fn new(
        settings: Settings,
        trained_on: String,
        train_images: u64,
        train_md5: Option<String>,
    ) -> Meta {
        Meta {
            settings,
            trained_on,
            train_images,
            train_md5,
            position: Position::START,
            unrecorded: vec![],
        }
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.settings.steps_per_epoch(self.train_images)
    }

    /// Whether the run had trained all it was set to.
    pub fn finished(&self) -> bool {
        self.position.global_step >= self.settings.last_step(self.train_images)
    }

    fn to_map(&self) -> HashMap<String, String> {
        // serde_json writes an f64 with the fewest digits that parse back to
        // the same bits, and reads it back exactly (its `float_roundtrip`),
        // so lr, momentum and the running loss survive bit for bit.
        let run = serde_json::to_string(self).expect("checkpoint metadata serializes");
        [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("model", self.settings.model.class_name().to_string()),
            (RUN_KEY, run),
            // Where `Model::load` finds a weights file's class names, so
            // that `evaluate` and `predict` name a checkpoint's classes too.
            (
                crate::weights::CLASSES_KEY,
                crate::weights::classes_json(&self.settings.classes),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn from_map(map: &HashMap<String, String>, path: &Path) -> Result<Meta> {
        let origin = path.display();
        let format = text(map, "format", path)?;
        ensure!(
            format == FORMAT,
            "{origin}: not a tch-cifar checkpoint (format `{format}`)"
        );
        let version: u32 = field(map, "version", path)?;
        let model = text(map, "model", path)?;
        ensure!(
            [
                ModelKind::Net,
                ModelKind::Airbench94,
                ModelKind::Airbench94Muon
            ]
            .iter()
            .any(|m| m.class_name() == model),
            "{origin}: holds a `{model}` model, tch-cifar trains Net, Airbench94 and \
             Airbench94Muon"
        );
        let meta = match version {
            1 => Meta::from_v1(map, path)?,
            VERSION => serde_json::from_str(text(map, RUN_KEY, path)?).with_context(|| {
                format!("{origin}: the checkpoint field `{RUN_KEY}` is invalid")
            })?,
            _ => bail!(
                "{origin}: checkpoint format version {version}, this tch-cifar reads versions 1 \
                 to {VERSION}"
            ),
        };
        ensure!(
            meta.settings.model.class_name() == model,
            "{origin}: the metadata says `{model}` but its run trains {}",
            meta.settings.model.class_name()
        );
        meta.validate(path)?;
        Ok(meta)
    }

    /// A version 1 checkpoint's fields: one string each, without the
    /// settings that version 2 added.
    fn from_v1(map: &HashMap<String, String>, path: &Path) -> Result<Meta> {
        let origin = path.display();
        let device = text(map, "device", path)?.to_string();
        let log_every: Option<u64> = map
            .contains_key("log_every")
            .then(|| field(map, "log_every", path))
            .transpose()?;
        let mut unrecorded = vec![
            "--data-dir",
            "--out",
            "--max-steps",
            "--checkpoint-every",
            "--keep-checkpoints",
        ];
        if log_every.is_none() {
            unrecorded.push("--log-every");
        }
        let settings = Settings {
            seed: field(map, "seed", path)?,
            epochs: field(map, "epochs", path)?,
            batch_size: field(map, "batch_size", path)?,
            lr: field(map, "lr", path)?,
            momentum: field(map, "momentum", path)?,
            log_every: log_every.unwrap_or(settings::DEFAULT_LOG_EVERY),
            max_steps: None,
            // It recorded the device trained on, which is the one asked for
            // unless that was `auto`.
            device: device.parse().unwrap_or(DeviceArg::Auto),
            threads: field(map, "threads", path)?,
            // Checkpoints from before --cpu-conv existed were trained with oneDNN.
            cpu_conv: match map.get("cpu_conv") {
                None => CpuConv::Onednn,
                Some(name) => CpuConv::from_str(name, false).map_err(|_| {
                    anyhow!("{origin}: the checkpoint field `cpu_conv` is `{name}`")
                })?,
            },
            checkpoint_every: None,
            keep_checkpoints: settings::DEFAULT_KEEP_CHECKPOINTS,
            data_dir: settings::DEFAULT_DATA_DIR.into(),
            train_dir: None,
            test_dir: None,
            cache_dir: None,
            out: settings::DEFAULT_OUT.into(),
            tensorboard: None,
            classes: crate::data::CLASSES.map(String::from).to_vec(),
            model: ModelKind::Net,
            schedule_epochs: None,
            precision: None,
            world_size: 1,
        };
        Ok(Meta {
            settings,
            trained_on: device,
            train_images: field(map, "train_images", path)?,
            train_md5: map.get("train_md5").cloned(),
            position: Position {
                epoch: field(map, "epoch", path)?,
                step: field(map, "step", path)?,
                global_step: field(map, "global_step", path)?,
                running_loss: field(map, "running_loss", path)?,
            },
            unrecorded,
        })
    }

    /// What serde cannot check: ranges, and a position the recipe can reach.
    fn validate(&self, path: &Path) -> Result<()> {
        let origin = path.display();
        let s = &self.settings;
        for (key, v) in [
            ("lr", s.lr),
            ("momentum", s.momentum),
            ("running_loss", self.position.running_loss),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "{origin}: the checkpoint field `{key}` is {v}"
            );
        }
        ensure!(
            s.batch_size > 0 && self.train_images > 0 && s.epochs > 0,
            "{origin}: the checkpoint has batch_size {}, train_images {}, epochs {}",
            s.batch_size,
            self.train_images,
            s.epochs
        );
        for (key, v) in [
            ("log_every", s.log_every),
            ("keep_checkpoints", s.keep_checkpoints),
            ("threads", s.threads.max(0) as u64),
            ("max_steps", s.max_steps.unwrap_or(1)),
            ("checkpoint_every", s.checkpoint_every.unwrap_or(1)),
        ] {
            ensure!(v > 0, "{origin}: the checkpoint field `{key}` is 0 or less");
        }
        ensure!(
            s.cpu_conv != CpuConv::Auto,
            "{origin}: the checkpoint field `cpu_conv` is `auto`, not onednn or im2col"
        );
        ensure!(
            !s.classes.is_empty(),
            "{origin}: the checkpoint lists no classes"
        );
        let p = self.position;
        let per_epoch = self.steps_per_epoch();
        ensure!(
            p.epoch >= 1
                && p.step <= per_epoch
                && Some(p.global_step)
                    == (p.epoch - 1)
                        .checked_mul(per_epoch)
                        .and_then(|s| s.checked_add(p.step)),
            "{origin}: inconsistent position (epoch {}, step {}, global step {}, {per_epoch} steps per epoch)",
            p.epoch,
            p.step,
            p.global_step
        );
        Ok(())
    }
}

/// The metadata field `key`, naming the file and field if it is missing.
fn text<'a>(map: &'a HashMap<String, String>, key: &str, path: &Path) -> Result<&'a str> {
    map.get(key)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("{}: the checkpoint metadata lacks `{key}`", path.display()))
}

/// Parses the metadata field `key`, naming the file and field on failure.
fn field<T: FromStr>(map: &HashMap<String, String>, key: &str, path: &Path) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text = text(map, key, path)?;
    text.parse().map_err(|e| {
        anyhow!(
            "{}: the checkpoint field `{key}` is `{text}`: {e}",
            path.display()
        )
    })
}

/// A checkpoint read and checked, not yet applied to a model.
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: Meta,
    /// The outputs of the checkpoint's network: one per class.
    pub num_classes: usize,
    /// Every tensor in the file, by name: the weights and the optimizer state.
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// The tensors by name, for the recipe to restore.
    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}

/// The file name of the checkpoint at `position`.
pub fn file_name(position: &Position) -> String {
    format!(
        "{PREFIX}{:04}-s{:07}{SUFFIX}",
        position.epoch, position.step
    )
}

/// `(epoch, step)` from a checkpoint file name; `None` for other files.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let (epoch, step) = rest.split_once("-s")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(epoch) || !digits(step) {
        return None;
    }
    Some((epoch.parse().ok()?, step.parse().ok()?))
}

/// The checkpoint files in `dir`, oldest first, by the position in their names.
pub fn list(dir: &Path) -> Result<Vec<((u64, u64), PathBuf)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read checkpoint directory {}", dir.display()))?;
    let mut files = vec![];
    for entry in entries {
        let entry =
            entry.with_context(|| format!("cannot read checkpoint directory {}", dir.display()))?;
        if let Some(pos) = entry.file_name().to_str().and_then(parse_name) {
            files.push((pos, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// The keys and shapes of a fast recipe's checkpoint for a number of
/// classes (`None` for the tutorial's, which this module checks itself):
/// handed in by the caller that knows the recipes
/// ([`crate::train::recipes::checkpoint_shapes`]).
pub type Layout = fn(ModelKind, i64) -> Option<Vec<(String, Vec<i64>)>>;

/// Reads and checks one checkpoint file, a fast recipe's against `layout`.
pub fn load(path: &Path, layout: Layout) -> Result<Checkpoint> {
    let origin = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {origin}"))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{origin}: not a complete safetensors file ({e:?})"))?;
    let map = header
        .metadata()
        .as_ref()
        .ok_or_else(|| anyhow!("{origin}: not a tch-cifar checkpoint (no metadata)"))?;
    let meta = Meta::from_map(map, path)?;
    // One output per class of the run's data.
    let num_classes = meta.settings.classes.len() as i64;
    let expected_shapes = parameter_shapes(num_classes);
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{origin}: not a complete safetensors file ({e:?})"))?;
    let mut weights = HashMap::new();
    for (name, view) in file.tensors() {
        ensure!(
            view.dtype() == Dtype::F32,
            "{origin}: `{name}` holds {:?} values, not F32",
            view.dtype()
        );
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)
            .with_context(|| format!("{origin}: cannot read `{name}`"))?;
        ensure!(
            tensor.isfinite().all().int64_value(&[]) != 0,
            "{origin}: `{name}` holds non-finite values"
        );
        weights.insert(name, tensor);
    }
    if let Some(expected) = layout(meta.settings.model, num_classes) {
        check_keys(&weights, &expected, path)?;
        return Ok(Checkpoint {
            path: path.to_path_buf(),
            meta,
            num_classes: num_classes as usize,
            tensors: weights,
        });
    }
    let momentum_buffer = weights
        .remove(MOMENTUM_KEY)
        .ok_or_else(|| anyhow!("{origin}: missing key `{MOMENTUM_KEY}`"))?;
    let momentum_shape = momentum_buffer.size();
    let numel: i64 = expected_shapes
        .iter()
        .map(|(_, s)| s.iter().product::<i64>())
        .sum();
    ensure!(
        momentum_shape == [numel],
        "{origin}: `{MOMENTUM_KEY}` has shape {momentum_shape:?}, expected [{numel}]",
    );
    // Checked now, so that a bad file is skipped before any model is touched.
    crate::nets::tutorial::check_state_dict(&weights, &expected_shapes, path)?;
    weights.insert(MOMENTUM_KEY.to_string(), momentum_buffer);
    Ok(Checkpoint {
        path: path.to_path_buf(),
        meta,
        num_classes: num_classes as usize,
        tensors: weights,
    })
}

/// Checks that `tensors` are exactly the `expected` keys with their shapes.
fn check_keys(
    tensors: &HashMap<String, Tensor>,
    expected: &[(String, Vec<i64>)],
    path: &Path,
) -> Result<()> {
    let origin = path.display();
    if let Some(key) = tensors
        .keys()
        .find(|k| !expected.iter().any(|(e, _)| e == *k))
    {
        bail!("{origin}: unexpected key `{key}`");
    }
    for (key, shape) in expected {
        let tensor = tensors
            .get(key)
            .ok_or_else(|| anyhow!("{origin}: missing key `{key}`"))?;
        ensure!(
            &tensor.size() == shape,
            "{origin}: key `{key}` has shape {:?}, expected {shape:?}",
            tensor.size()
        );
    }
    Ok(())
}

/// The newest checkpoint in `dir` that loads and checks out. Newer files
/// that fail (torn, garbage, another format) are skipped with a warning.
pub fn newest(dir: &Path, layout: Layout) -> Result<Checkpoint> {
    ensure!(
        !dir.is_file(),
        "{} is a file: --resume takes the folder of checkpoints ({}), and goes on from the \
         newest valid one in it",
        dir.display(),
        crate::util::files::parent_dir(dir).display()
    );
    ensure!(
        dir.is_dir(),
        "checkpoint directory {} does not exist",
        dir.display()
    );
    let files = list(dir)?;
    let mut skipped: Vec<anyhow::Error> = vec![];
    for (_, path) in files.iter().rev() {
        match load(path, layout) {
            Ok(checkpoint) => {
                for err in skipped {
                    eprintln!("warning: skipped a bad checkpoint: {err:#}");
                }
                return Ok(checkpoint);
            }
            Err(err) => skipped.push(err),
        }
    }
    match skipped.first() {
        None => bail!("no checkpoint in {}", dir.display()),
        Some(err) => bail!(
            "no valid checkpoint in {}: all {} fail to load; the newest: {err:#}",
            dir.display(),
            skipped.len()
        ),
    }
}

/// Writes checkpoints into one folder and keeps the newest few.
pub struct Saver {
    dir: PathBuf,
    keep: usize,
    meta: Meta,
    last: Option<(u64, PathBuf)>,
}

impl Saver {
    /// Saves into `dir` (created on the first save) with `meta`'s recipe,
    /// keeping the `keep` newest files. `last` is a checkpoint already there
    /// at its global step (the one resumed from), so that it isn't rewritten.
    pub fn new(dir: PathBuf, keep: usize, meta: Meta, last: Option<(u64, PathBuf)>) -> Saver {
        Saver {
            dir,
            keep: keep.max(1),
            meta,
            last,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest checkpoint saved (or resumed from) in this run.
    pub fn last(&self) -> Option<&Path> {
        self.last.as_ref().map(|(_, p)| p.as_path())
    }

    /// Saves `tensors` (a recipe's, by name: weights, buffers, optimizer
    /// state) as the state at `position` unless that is already saved, then
    /// drops older checkpoints beyond `keep`, files from positions past this
    /// one (a future abandoned by resuming from an older file), and
    /// temporary files of interrupted saves. Refuses tensors that are not
    /// finite.
    pub fn save(&mut self, tensors: Vec<(String, Tensor)>, position: Position) -> Result<PathBuf> {
        if let Some((step, path)) = &self.last {
            if *step == position.global_step {
                return Ok(path.clone());
            }
        }
        let began = std::time::Instant::now();
        let path = self.dir.join(file_name(&position));
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, t)| {
                let dims = t.size().iter().map(|&d| d as usize).collect();
                Ok((
                    name.clone(),
                    dims,
                    f32_bytes(t).with_context(|| format!("`{name}`"))?,
                ))
            })
            .collect::<Result<_>>()?;
        if let Some((name, _)) = tensors.iter().find(|(_, t)| !is_finite(t)) {
            let what = if name.starts_with(crate::weights::OPTIMIZER_PREFIX) {
                format!("the optimizer state `{name}`")
            } else {
                "the weights".to_string()
            };
            return Err(crate::util::report::Diverged(format!(
                "{what} became non-finite at epoch {}, step {}: training diverged. {}. No \
                 checkpoint written{}",
                position.epoch,
                position.step,
                settings::diverged_hint(self.meta.settings.lr, self.meta.settings.momentum),
                match self.last() {
                    Some(p) => format!("; the last good one is {}", p.display()),
                    None => String::new(),
                }
            ))
            .into());
        }
        let views = bytes
            .iter()
            .map(|(name, dims, data)| {
                TensorView::new(Dtype::F32, dims.clone(), data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| anyhow!("{name}: {e:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = Meta {
            position,
            ..self.meta.clone()
        };
        let bytes = safetensors::serialize(views, &Some(meta.to_map()))
            .map_err(|e| anyhow!("cannot encode checkpoint {}: {e:?}", path.display()))?;
        let encoded = began.elapsed();
        create_dir(&self.dir)?;
        let saved = files::write_atomically(&path, |tmp| {
            write_checkpoint_bytes(tmp, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))
        });
        if let Err(err) = saved {
            return Err(err.context(match self.last() {
                Some(p) => format!(
                    "checkpoint not saved; the previous one, {}, is intact",
                    p.display()
                ),
                None => "checkpoint not saved".to_string(),
            }));
        }
        self.last = Some((position.global_step, path.clone()));
        self.prune((position.epoch, position.step));
        tracing::debug!(
            "saved {} ({} bytes): {:?} to encode, {:?} in all",
            path.display(),
            bytes.len(),
            encoded,
            began.elapsed()
        );
        Ok(path)
    }

    fn prune(&self, newest: (u64, u64)) {
        // Best effort: a file that cannot be removed costs disk space only.
        let Ok(files) = list(&self.dir) else { return };
        let kept = files.iter().filter(|(pos, _)| *pos <= newest).count();
        for (i, (pos, path)) in files.iter().enumerate() {
            if *pos > newest || i + self.keep < kept {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&format!(".{PREFIX}")) && files::is_temp_name(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Creates `dir` (and its parents) if missing, durably: a new folder's
/// entry in its parent is synced too, or a power cut could lose the folder
/// with the checkpoints that were synced inside it.
pub fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    files::sync_dir(files::parent_dir(dir));
    Ok(())
}

/// Whether every entry of `t` is finite.
fn is_finite(t: &Tensor) -> bool {
    tch::no_grad(|| t.isfinite().all().int64_value(&[])) != 0
}

/// An f32 tensor's bytes, copied to the CPU, in row-major order. The copy is in native
/// byte order, which is safetensors' little-endian on every platform
/// libtorch ships for.
fn f32_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let cpu = tensor.detach().to_device(Device::Cpu).contiguous();
    ensure!(
        cpu.kind() == Kind::Float,
        "expected f32, got {:?}",
        cpu.kind()
    );
    let numel = cpu.numel();
    let mut bytes = vec![0u8; 4 * numel];
    cpu.f_copy_data_u8(&mut bytes, numel)?;
    Ok(bytes)
}

fn write_checkpoint_bytes(tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = test_stall_ms() {
        return stalled_write(tmp, bytes, ms);
    }
    std::fs::write(tmp, bytes)
}

/// With the `test-hooks` feature only (the tests'), set to milliseconds:
/// each save then writes half its bytes, pauses, and writes the rest, so
/// that a test can SIGKILL the process in the middle of a write every time
/// instead of by luck.
#[cfg(feature = "test-hooks")]
fn test_stall_ms() -> Option<u64> {
    std::env::var("TCH_CIFAR_TEST_STALL_CHECKPOINT_WRITE_MS")
        .ok()?
        .parse()
        .ok()
}

#[cfg(feature = "test-hooks")]
fn stalled_write(tmp: &Path, bytes: &[u8], ms: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(tmp)?;
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    file.write_all(head)?;
    file.flush()?;
    std::thread::sleep(std::time::Duration::from_millis(ms));
    file.write_all(tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::tutorial::Model;

    /// These tests save the tutorial's checkpoints only.
    fn checkpoint_shapes(_: ModelKind, _: i64) -> Option<Vec<(String, Vec<i64>)>> {
        None
    }
    use crate::train::optim::Sgd;
    use tch::nn::Module;

    fn meta(position: Position) -> Meta {
        let settings = Settings {
            lr: 0.01,
            log_every: 7,
            max_steps: Some(19),
            ..Settings::tutorial(3)
        };
        let md5 = Some("0123456789abcdef0123456789abcdef".into());
        Meta {
            position,
            ..Meta::new(settings, "cpu".into(), 40, md5)
        }
    }

    fn at(epoch: u64, step: u64) -> Position {
        Position {
            epoch,
            step,
            global_step: (epoch - 1) * 10 + step,
            running_loss: 0.1 + 0.2,
        }
    }

    /// A model and optimizer after a few steps, so the momentum is not zero.
    fn trained() -> (Model, Sgd) {
        let model = Model::new(Device::Cpu, Some(9));
        let mut opt = Sgd::new(&model, 0.01, 0.9);
        let x = crate::util::rng::with_torch_rng(Some(1), || {
            Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let y = Tensor::from_slice(&[1i64, 2, 3, 4]);
        for _ in 0..2 {
            opt.step(&model.net.forward(&x).cross_entropy_for_logits(&y));
        }
        (model, opt)
    }

    /// What the tutorial's recipe saves: the `state_dict` and the momentum.
    fn tensors(model: &Model, opt: &Sgd) -> Vec<(String, Tensor)> {
        let mut tensors = model.state_dict();
        tensors.push((MOMENTUM_KEY.into(), opt.momentum_buffer().shallow_clone()));
        tensors
    }

    #[test]
    fn save_and_load_round_trip_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let (model, opt) = trained();
        let mut saver = Saver::new(dir.path().join("ck"), 2, meta(at(1, 3)), None);
        let path = saver.save(tensors(&model, &opt), at(1, 3)).unwrap();
        assert_eq!(
            path.file_name().unwrap(),
            "checkpoint-e0001-s0000003.safetensors"
        );
        let loaded = load(&path, checkpoint_shapes).unwrap();
        assert_eq!(
            loaded.meta,
            meta(at(1, 3)),
            "running loss 0.1+0.2 must be exact"
        );
        let read = loaded.into_tensors();
        let saved = tensors(&model, &opt);
        assert_eq!(read.len(), saved.len());
        for (name, tensor) in &saved {
            assert!(read[name].equal(tensor), "{name}");
        }
        assert!(
            opt.momentum_buffer()
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
        // The weights load like any weights file once the optimizer key is dropped.
        let tensors = Tensor::read_safetensors(&path).unwrap();
        assert_eq!(tensors.len(), 11);
    }

    #[test]
    fn newest_valid_skips_torn_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let (model, opt) = trained();
        let mut saver = Saver::new(dir.path().to_path_buf(), 5, meta(at(1, 0)), None);
        saver.save(tensors(&model, &opt), at(1, 5)).unwrap();
        let good = saver.save(tensors(&model, &opt), at(1, 10)).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        // A torn newer file, a garbage one, and a temp file of a killed save.
        std::fs::write(
            dir.path().join(file_name(&at(2, 1))),
            &bytes[..bytes.len() / 2],
        )
        .unwrap();
        std::fs::write(dir.path().join(file_name(&at(2, 2))), b"garbage").unwrap();
        std::fs::write(
            dir.path()
                .join(".checkpoint-e0003-s0000001.safetensors.x.tmp"),
            &bytes,
        )
        .unwrap();
        let found = newest(dir.path(), checkpoint_shapes).unwrap();
        assert_eq!(found.path, good);
        assert_eq!(found.meta.position, at(1, 10));

        std::fs::remove_file(&good).unwrap();
        std::fs::remove_file(dir.path().join(file_name(&at(1, 5)))).unwrap();
        let err = format!("{:#}", newest(dir.path(), checkpoint_shapes).err().unwrap());
        assert!(
            err.contains("no valid checkpoint") && err.contains("all 2 fail"),
            "{err}"
        );
    }

    #[test]
    fn saves_keep_the_newest_and_drop_temp_files_and_abandoned_futures() {
        let dir = tempfile::tempdir().unwrap();
        let (model, opt) = trained();
        let mut saver = Saver::new(dir.path().to_path_buf(), 2, meta(at(1, 0)), None);
        for step in [2, 4, 6] {
            saver.save(tensors(&model, &opt), at(1, step)).unwrap();
        }
        std::fs::write(dir.path().join(file_name(&at(2, 9))), b"stale").unwrap();
        std::fs::write(
            dir.path().join(".checkpoint-e1-s1.safetensors.ab.tmp"),
            b"x",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        saver.save(tensors(&model, &opt), at(1, 8)).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "checkpoint-e0001-s0000006.safetensors",
                "checkpoint-e0001-s0000008.safetensors",
                "notes.txt"
            ]
        );
    }

    /// A copy of the checkpoint at `path` with its metadata map edited by `edit`.
    fn edited(path: &Path, edit: impl FnOnce(&mut HashMap<String, String>)) -> PathBuf {
        let bytes = std::fs::read(path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut map = header.metadata().clone().unwrap();
        edit(&mut map);
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let out = path.with_file_name("edited.safetensors");
        let encoded = safetensors::serialize(file.tensors(), &Some(map)).unwrap();
        std::fs::write(&out, encoded).unwrap();
        out
    }

    fn saved_once(dir: &Path) -> PathBuf {
        let (model, opt) = trained();
        let mut saver = Saver::new(dir.to_path_buf(), 2, meta(at(1, 0)), None);
        saver.save(tensors(&model, &opt), at(1, 1)).unwrap()
    }

    #[test]
    fn bad_metadata_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved_once(dir.path());
        let refused = |edit: &dyn Fn(&mut HashMap<String, String>)| {
            format!(
                "{:#}",
                load(&edited(&path, edit), checkpoint_shapes)
                    .err()
                    .expect("must be refused")
            )
        };
        let run = |edit: fn(&mut serde_json::Value)| {
            move |map: &mut HashMap<String, String>| {
                let mut run: serde_json::Value = serde_json::from_str(&map[RUN_KEY]).unwrap();
                edit(&mut run);
                map.insert(RUN_KEY.into(), run.to_string());
            }
        };
        let err = refused(&|m| {
            m.remove(RUN_KEY);
        });
        assert!(
            err.contains("edited.safetensors") && err.contains("lacks `run`"),
            "{err}"
        );
        let err = refused(&run(|r| r["settings"]["seed"] = "abc".into()));
        assert!(
            err.contains("field `run` is invalid") && err.contains("abc"),
            "{err}"
        );
        let err = refused(&run(|r| {
            r["settings"].as_object_mut().unwrap().remove("lr");
        }));
        assert!(err.contains("missing field `lr`"), "{err}");
        let err = refused(&|m| {
            m.insert("model".into(), "ResNet".into());
        });
        assert!(err.contains("`ResNet`"), "{err}");
        let err = refused(&|m| {
            m.insert("version".into(), "3".into());
        });
        assert!(
            err.contains("version 3, this tch-cifar reads versions 1 to 2"),
            "{err}"
        );
        let err = refused(&run(|r| r["position"]["global_step"] = 7.into()));
        assert!(err.contains("inconsistent position"), "{err}");
        let err = refused(&run(|r| r["settings"]["cpu_conv"] = "auto".into()));
        assert!(err.contains("field `cpu_conv` is `auto`"), "{err}");
        let err = refused(&run(|r| r["settings"]["threads"] = 0.into()));
        assert!(err.contains("field `threads` is 0"), "{err}");
        let err = refused(&run(|r| r["settings"]["lr"] = (-1.0).into()));
        assert!(err.contains("field `lr` is -1"), "{err}");
    }

    /// A version 1 checkpoint, its metadata one string per field as the
    /// previous layout wrote it (`tests/fixtures/checkpoint-v1-metadata.json`
    /// holds one written by that code).
    fn v1_map(m: &Meta) -> HashMap<String, String> {
        let s = &m.settings;
        let p = &m.position;
        [
            ("format", FORMAT.to_string()),
            ("version", "1".to_string()),
            ("model", "Net".to_string()),
            ("parameters", "{}".to_string()),
            ("seed", s.seed.to_string()),
            ("batch_size", s.batch_size.to_string()),
            ("lr", s.lr.to_string()),
            ("momentum", s.momentum.to_string()),
            ("epochs", s.epochs.to_string()),
            ("train_images", m.train_images.to_string()),
            ("threads", s.threads.to_string()),
            ("cpu_conv", s.cpu_conv.name().to_string()),
            ("device", m.trained_on.clone()),
            ("epoch", p.epoch.to_string()),
            ("step", p.step.to_string()),
            ("global_step", p.global_step.to_string()),
            ("running_loss", p.running_loss.to_string()),
            (
                "data_order",
                "data::epoch_order(seed, epoch - 1, train_images)".to_string(),
            ),
            ("train_md5", m.train_md5.clone().unwrap()),
            ("log_every", s.log_every.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn version_1_checkpoints_load_with_the_defaults_for_what_they_lack() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved_once(dir.path());
        let mut want = meta(at(1, 1));
        let v1 = edited(&path, |m| *m = v1_map(&want));
        let loaded = load(&v1, checkpoint_shapes).unwrap();
        // Not recorded: no --max-steps then, and the defaults of the rest.
        want.settings.max_steps = None;
        want.unrecorded = vec![
            "--data-dir",
            "--out",
            "--max-steps",
            "--checkpoint-every",
            "--keep-checkpoints",
        ];
        assert_eq!(loaded.meta, want);
        // From before --log-every and --cpu-conv were recorded.
        let older = edited(&path, |m| {
            *m = v1_map(&want);
            m.remove("log_every");
            m.remove("cpu_conv");
        });
        let loaded = load(&older, checkpoint_shapes).unwrap();
        assert_eq!(loaded.meta.settings.cpu_conv, CpuConv::Onednn);
        assert_eq!(loaded.meta.settings.log_every, settings::DEFAULT_LOG_EVERY);
        assert!(loaded.meta.unrecorded.contains(&"--log-every"));
        let err = format!(
            "{:#}",
            load(
                &edited(&path, |m| {
                    *m = v1_map(&want);
                    m.insert("seed".into(), "abc".into());
                }),
                checkpoint_shapes
            )
            .err()
            .unwrap()
        );
        assert!(err.contains("field `seed` is `abc`"), "{err}");
    }

    #[test]
    fn the_momentum_key_is_optimizer_state_to_weights_loading() {
        assert!(MOMENTUM_KEY.starts_with(crate::weights::OPTIMIZER_PREFIX));
    }

    #[test]
    fn non_finite_weights_are_never_saved() {
        let dir = tempfile::tempdir().unwrap();
        let (model, opt) = trained();
        let mut saver = Saver::new(dir.path().to_path_buf(), 2, meta(at(1, 0)), None);
        let good = saver.save(tensors(&model, &opt), at(1, 1)).unwrap();
        let _ = tch::no_grad(|| model.flat.narrow(0, 5, 1).fill_(f64::NAN));
        let err = saver
            .save(tensors(&model, &opt), at(1, 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epoch 1, step 2") && err.contains("--lr 0.01"),
            "{err}"
        );
        assert!(err.contains(&good.display().to_string()), "{err}");
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }
}
