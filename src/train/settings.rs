//! The settings of a training run, as one value: what `train` was asked
//! to do, resolved (the seed drawn, the CPU threads and kernel chosen).
//! Every checkpoint stores it (see [`crate::train::checkpoint`]), and
//! `train --resume` adopts it, so a run goes on as it started.
//!
//! The clap flags that produce it are `train`'s; this module knows nothing
//! of them, which keeps it below both `train` and `checkpoint`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::nets::ModelKind;
use crate::util::device::{CpuConv, CpuSettings, DeviceArg};
use crate::util::precision::Precision;

pub const DEFAULT_EPOCHS: u64 = 2;
pub const DEFAULT_BATCH_SIZE: u64 = 4;
pub const DEFAULT_LR: f64 = 0.001;
pub const DEFAULT_MOMENTUM: f64 = 0.9;
pub const DEFAULT_LOG_EVERY: u64 = 2000;
pub const DEFAULT_KEEP_CHECKPOINTS: u64 = 2;
pub const DEFAULT_DATA_DIR: &str = "data";
pub const DEFAULT_OUT: &str = "cifar_net.safetensors";

/// Everything a training run was set to do. Relative paths are relative to
/// the folder the run was started in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Seed of the initial weights and of every epoch's data order.
    pub seed: u64,
    /// Passes over the training set.
    pub epochs: u64,
    pub batch_size: u64,
    pub lr: f64,
    pub momentum: f64,
    /// Steps per loss line; a checkpoint's running-loss sum covers the
    /// steps since the last one.
    pub log_every: u64,
    /// Stop after this many steps in all.
    pub max_steps: Option<u64>,
    /// The device asked for: `auto`, `cpu` or `cuda:N`.
    #[serde(with = "as_text")]
    pub device: DeviceArg,
    /// libtorch's CPU threads while training; another count changes float
    /// sums in the last bits.
    pub threads: i32,
    /// The CPU convolution kernel, resolved (never `auto`); another one
    /// rounds differently.
    #[serde(with = "conv_name")]
    pub cpu_conv: CpuConv,
    /// Also save a checkpoint every N steps.
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept in the folder.
    pub keep_checkpoints: u64,
    /// Where the dataset is.
    #[serde(with = "path")]
    pub data_dir: PathBuf,
    /// `--train-dir`, `--test-dir`: image trees in place of `data_dir`'s.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_path"
    )]
    pub train_dir: Option<PathBuf>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_path"
    )]
    pub test_dir: Option<PathBuf>,
    /// `--cache-dir`: where decoded image trees are cached.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_path"
    )]
    pub cache_dir: Option<PathBuf>,
    /// Where the trained weights go.
    #[serde(with = "path")]
    pub out: PathBuf,
    /// The TensorBoard run folder (`--logdir`), which a resumed run goes on
    /// writing into.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_path"
    )]
    pub tensorboard: Option<PathBuf>,
    /// The dataset's class names, in label order.
    pub classes: Vec<String>,
    /// The network and recipe; runs saved before there was a choice are Net's.
    #[serde(default, skip_serializing_if = "ModelKind::is_net")]
    pub model: ModelKind,
    /// airbench94's length in (fractional) epochs: its schedule ends after
    /// ceil(steps per epoch × this) steps, within the `epochs` it iterates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_epochs: Option<f64>,
    /// A fast recipe's `--precision`, resolved; `None` for Net (float32)
    /// and for runs saved before there was a choice (see [`Settings::precision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// The ranks of a distributed run that train together; 1 for one process.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl Settings {
    /// The tutorial's recipe (`train` without flags) with `seed`, on one CPU
    /// thread with the kernel `--cpu-conv auto` picks there, for CIFAR-10.
    pub fn tutorial(seed: u64) -> Settings {
        Settings {
            seed,
            epochs: DEFAULT_EPOCHS,
            batch_size: DEFAULT_BATCH_SIZE,
            lr: DEFAULT_LR,
            momentum: DEFAULT_MOMENTUM,
            log_every: DEFAULT_LOG_EVERY,
            max_steps: None,
            device: DeviceArg::Cpu,
            threads: 1,
            cpu_conv: CpuConv::Auto.resolve(DEFAULT_BATCH_SIZE, 1),
            checkpoint_every: None,
            keep_checkpoints: DEFAULT_KEEP_CHECKPOINTS,
            data_dir: DEFAULT_DATA_DIR.into(),
            train_dir: None,
            test_dir: None,
            cache_dir: None,
            out: DEFAULT_OUT.into(),
            tensorboard: None,
            classes: crate::data::CLASSES.map(String::from).to_vec(),
            model: ModelKind::Net,
            schedule_epochs: None,
            precision: None,
            world_size: 1,
        }
    }

    pub fn steps_per_epoch(&self, train_images: u64) -> u64 {
        train_images.div_ceil(self.batch_size)
    }

    /// The steps the run trains in all: to the end of `epochs`, or to
    /// `max_steps` if that comes first.
    pub fn last_step(&self, train_images: u64) -> u64 {
        let end = self
            .epochs
            .saturating_mul(self.steps_per_epoch(train_images));
        self.max_steps.map_or(end, |m| m.min(end))
    }

    /// The forward passes' precision on `device`: the one resolved, or for
    /// Net and older runs [`Precision::legacy`]'s (Net has no autocast).
    pub fn precision(&self, device: tch::Device) -> Precision {
        match (self.model, self.precision) {
            (ModelKind::Net, _) => Precision::Fp32,
            (_, Some(p)) => p,
            (_, None) => Precision::legacy(device),
        }
    }

    /// libtorch's CPU settings while training.
    pub fn cpu_settings(&self) -> CpuSettings {
        CpuSettings {
            threads: self.threads,
            conv: self.cpu_conv,
        }
    }
}

/// What to try after a divergence: SGD's momentum must stay below 1, and
/// within that, a smaller step.
pub fn diverged_hint(lr: f64, momentum: f64) -> String {
    if momentum >= 1.0 {
        format!("Try a momentum below 1 (--momentum {momentum} now)")
    } else {
        format!("Try a lower learning rate (--lr {lr} now)")
    }
}

/// A value as the text its flag takes (`cuda:0`, `im2col`).
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A path as a string, or on Unix as its bytes when it is not UTF-8.
mod path {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        match path.to_str() {
            Some(text) => Repr::Text(text.to_string()),
            #[cfg(unix)]
            None => Repr::Bytes(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec()),
            #[cfg(not(unix))]
            None => return Err(serde::ser::Error::custom("the path is not valid Unicode")),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(text) => Ok(PathBuf::from(text)),
            #[cfg(unix)]
            Repr::Bytes(bytes) => Ok(PathBuf::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&bytes),
            )),
            #[cfg(not(unix))]
            Repr::Bytes(_) => Err(serde::de::Error::custom(
                "a path in bytes is readable on Unix only",
            )),
        }
    }
}

/// An optional [`path`].
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct Wrapped(#[serde(with = "super::path")] PathBuf);

    pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match path {
            Some(p) => super::path::serialize(p, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

/// A `--cpu-conv` kernel by its name.
mod conv_name {
    use clap::ValueEnum;
    use serde::{de, Deserialize, Deserializer, Serializer};

    use crate::util::device::CpuConv;

    pub fn serialize<S: Serializer>(conv: &CpuConv, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(conv.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CpuConv, D::Error> {
        let name = String::deserialize(d)?;
        CpuConv::from_str(&name, false)
            .map_err(|_| de::Error::custom(format!("`{name}` is not a --cpu-conv kernel")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn example() -> Settings {
        Settings {
            seed: 3,
            epochs: 2,
            batch_size: 4,
            lr: 0.1 + 0.2,
            momentum: 0.9,
            log_every: 7,
            max_steps: Some(15),
            device: DeviceArg::Cuda(1),
            threads: 1,
            cpu_conv: CpuConv::Im2col,
            checkpoint_every: None,
            keep_checkpoints: 2,
            data_dir: "data".into(),
            train_dir: Some("trees/train".into()),
            test_dir: None,
            cache_dir: Some("cache".into()),
            out: "net.safetensors".into(),
            tensorboard: Some("logs/run".into()),
            classes: vec!["cat".into(), "dog".into()],
            model: ModelKind::Net,
            schedule_epochs: None,
            precision: None,
            world_size: 1,
        }
    }

    #[test]
    fn settings_round_trip_through_json_exactly() {
        let settings = example();
        let text = serde_json::to_string(&settings).unwrap();
        assert!(text.contains(r#""device":"cuda:1""#), "{text}");
        assert!(text.contains(r#""cpu_conv":"im2col""#), "{text}");
        assert_eq!(serde_json::from_str::<Settings>(&text).unwrap(), settings);
    }

    #[cfg(unix)]
    #[test]
    fn a_path_that_is_not_utf8_round_trips_as_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let mut settings = example();
        settings.out = PathBuf::from(std::ffi::OsStr::from_bytes(b"w\xff.safetensors"));
        let text = serde_json::to_string(&settings).unwrap();
        assert_eq!(serde_json::from_str::<Settings>(&text).unwrap(), settings);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let mut value = serde_json::to_value(example()).unwrap();
        value["cpu_conv"] = "fast".into();
        let err = serde_json::from_value::<Settings>(value.clone()).unwrap_err();
        assert!(err.to_string().contains("fast"), "{err}");
        value["cpu_conv"] = "onednn".into();
        value["colour"] = "red".into();
        let err = serde_json::from_value::<Settings>(value).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn divergence_hint_names_the_flag_to_change() {
        assert_eq!(
            diverged_hint(0.5, 0.9),
            "Try a lower learning rate (--lr 0.5 now)"
        );
        assert_eq!(
            diverged_hint(0.001, 1.5),
            "Try a momentum below 1 (--momentum 1.5 now)"
        );
    }
}
