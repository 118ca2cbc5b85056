//! The datasets that `train`, `evaluate`, `samples` and `compare-losses`
//! read, loaded once into normalized tensors on the device, and the seeded
//! order in which the training set is visited each epoch.
//!
//! `--data-dir` holds one of two layouts, told apart by what is in it:
//!
//! * [`cifar`]: CIFAR-10's binary batches, fetched when the folder is
//!   missing or empty;
//! * [`image_folder`]: torchvision's `ImageFolder` layout, `train/<class>/…`
//!   and `test/<class>/…` (or `val/<class>/…`), with any number of classes,
//!   decoded in parallel by [`decode`] and kept in the [`cache`].

pub mod augment;
pub mod cache;
pub mod cifar;
pub mod decode;
pub mod download;
pub mod image_folder;
pub mod normalize;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use tch::{Device, Tensor};

pub use cifar::{
    load, load_split, load_test, load_train, locate, read_batch_file, Cifar10, BATCHES_DIR,
    CLASSES, IMAGE_BYTES, RECORD_BYTES, TEST_FILE, TRAIN_FILES,
};

/// One split on a device: `images` is `[N, 3, 32, 32]` f32 normalized to
/// [-1, 1], `labels` is `[N]` i64, each an index into `classes`.
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
    /// The md5 of the batch files' bytes, in order, when read from files (of
    /// the decoded pixels and labels for an image tree): what tells one
    /// training set from another with as many images.
    pub md5: Option<String>,
    /// The class names in label order: CIFAR-10's as the tutorial spells
    /// them, or an image tree's class folders.
    pub classes: Vec<String>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images and labels at `index` (an i64 tensor on the split's device).
    pub fn select(&self, index: &Tensor) -> (Tensor, Tensor) {
        (
            self.images.index_select(0, index),
            self.labels.index_select(0, index),
        )
    }
}

/// Where the dataset is, and where to get it from when it is missing.
// These docs are --help text, shown as typed: `<class>` is no HTML tag.
#[allow(rustdoc::invalid_html_tags, rustdoc::bare_urls)]
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Dataset: CIFAR-10's batches, or images in class folders.
    ///
    /// CIFAR-10's batches directly or in cifar-10-batches-bin/ (the archive
    /// is fetched into a missing or empty folder), or images in class
    /// folders, DIR/train/<class>/… and DIR/test/<class>/… (or
    /// DIR/val/<class>/…).
    #[arg(
        long,
        default_value = "data",
        value_name = "DIR",
        help_heading = "Data"
    )]
    pub data_dir: PathBuf,
    /// Training images in class folders, DIR/<class>/…, instead of --data-dir.
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub train_dir: Option<PathBuf>,
    /// Test images in class folders, DIR/<class>/…, instead of --data-dir.
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub test_dir: Option<PathBuf>,
    /// Skip image files that do not decode, instead of stopping at the first.
    ///
    /// The skipped files are counted and listed on stderr.
    #[arg(long, help_heading = "Data")]
    pub skip_bad_images: bool,
    /// Where decoded image folders are cached.
    ///
    /// [default: $TCH_CIFAR_CACHE_DIR, else $XDG_CACHE_HOME/tch-cifar, else
    /// ~/.cache/tch-cifar]
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub cache_dir: Option<PathBuf>,
    /// Decode image folders without reading or writing the cache.
    #[arg(long, help_heading = "Data")]
    pub no_cache: bool,
    /// Unpack this local cifar-10-binary.tar.gz instead of downloading it.
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    pub archive: Option<PathBuf>,
    /// Where to download cifar-10-binary.tar.gz from (a mirror, say).
    ///
    /// The official URL by default:
    /// https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz
    #[arg(long, default_value = download::OFFICIAL_URL, hide_default_value = true, value_name = "URL", help_heading = "Data")]
    pub download_url: String,
    /// The archive's expected md5 [default: the official archive's].
    ///
    /// c32a1d4ab5d03f1284b67883e8d87530 by default, the official archive's.
    #[arg(long, default_value = download::OFFICIAL_MD5, hide_default_value = true, value_name = "HEX", help_heading = "Data")]
    pub md5: String,
}

/// The names a test split's folder may have in an image tree, in the order
/// they are looked for.
pub const TEST_SPLIT_NAMES: [&str; 2] = ["test", "val"];
/// The name of an image tree's training split.
pub const TRAIN_SPLIT_NAME: &str = "train";

/// A dataset on disk, its layout known.
#[derive(Debug, Clone)]
pub enum Source {
    /// The folder holding CIFAR-10's six batch files.
    Batches(PathBuf),
    /// Images in class folders.
    Images(image_folder::Tree),
}

impl DataArgs {
    /// The dataset's layout, found in `--data-dir` (or given by
    /// `--train-dir`/`--test-dir`); CIFAR-10 is fetched into a missing or
    /// empty folder first.
    pub fn prepare(&self) -> Result<Source> {
        let options = image_folder::Options {
            skip_bad_images: self.skip_bad_images,
            cache_dir: if self.no_cache {
                None
            } else {
                self.cache_dir.clone().or_else(cache::default_dir)
            },
        };
        if self.train_dir.is_some() || self.test_dir.is_some() {
            return Ok(Source::Images(image_folder::Tree {
                train: self.train_dir.clone(),
                test: self.test_dir.clone(),
                options,
                from_flags: true,
            }));
        }
        let dir = &self.data_dir;
        let batches = locate(dir).is_some();
        if !batches {
            if let Some(tree) = image_folder::Tree::find(dir, options) {
                return Ok(Source::Images(tree));
            }
        }
        if !batches && dir.is_dir() && has_subfolders(dir)? {
            bail!(
                "{} is neither CIFAR-10's binary batches ({} … {}, directly or in {}/) nor an \
                 image tree ({}/<class>/<image> and {}/<class>/<image>, or {}/<class>/<image>)",
                dir.display(),
                TRAIN_FILES[0],
                TEST_FILE,
                BATCHES_DIR,
                TRAIN_SPLIT_NAME,
                TEST_SPLIT_NAMES[0],
                TEST_SPLIT_NAMES[1],
            );
        }
        // Batch files already there are taken as they are (with a note when
        // --archive was given); otherwise CIFAR-10 is fetched.
        let source = match &self.archive {
            Some(path) => download::Source::Archive(path.clone()),
            None => download::Source::Url(self.download_url.clone()),
        };
        Ok(Source::Batches(download::ensure_dataset(
            dir, &source, &self.md5,
        )?))
    }
}

/// Whether `dir` holds a folder that is not hidden and not where the
/// CIFAR-10 archive unpacks: a sign that it was meant as an image tree,
/// which a download would only clutter.
fn has_subfolders(dir: &Path) -> Result<bool> {
    use anyhow::Context;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name != BATCHES_DIR && entry.path().is_dir() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The test split, checked before training and loaded onto the device
/// after it (when the training set is gone, which keeps the peak memory
/// down).
pub enum TestSplit {
    /// `test_batch.bin` in this folder, already read once and found sound.
    Batches(PathBuf),
    /// An image tree's test split, decoded.
    Images(image_folder::Decoded),
}

impl TestSplit {
    pub fn load(self, device: Device) -> Result<Split> {
        match self {
            TestSplit::Batches(dir) => load_test(&dir, device),
            TestSplit::Images(decoded) => Ok(decoded.to_split(device)),
        }
    }
}

impl Source {
    /// What the dataset is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Batches(dir) => format!("the CIFAR-10 batches in {}", dir.display()),
            Source::Images(tree) => tree.describe(),
        }
    }

    /// The training split on `device`.
    pub fn load_train(&self, device: Device) -> Result<Split> {
        match self {
            Source::Batches(dir) => load_train(dir, device),
            Source::Images(tree) => Ok(tree.load_train()?.to_split(device)),
        }
    }

    /// The test split on `device`.
    pub fn load_test(&self, device: Device) -> Result<Split> {
        match self {
            Source::Batches(dir) => load_test(dir, device),
            Source::Images(tree) => Ok(tree.load_test()?.to_split(device)),
        }
    }

    /// What `train` needs: the training split on `device`, and the test
    /// split checked (an image tree's decoded, its classes compared with the
    /// training split's), so that bad test data fails before training.
    pub fn load_for_training(&self, device: Device) -> Result<(Split, TestSplit)> {
        match self {
            Source::Batches(dir) => {
                read_batch_file(&dir.join(TEST_FILE))?;
                Ok((load_train(dir, device)?, TestSplit::Batches(dir.clone())))
            }
            Source::Images(tree) => {
                let (train, test) = tree.load_both()?;
                Ok((train.to_split(device), TestSplit::Images(test)))
            }
        }
    }
}

/// `ToTensor()` then `Normalize((0.5,)*3, (0.5,)*3)` of u8 pixels into the
/// f32 tensor `dst` of the same shape: the same f32 operations, in the same
/// order, as torchvision, so the values are bit-equal.
pub fn normalize_into(dst: &mut Tensor, pixels: &Tensor) {
    dst.copy_(pixels);
    let _ = dst.g_div_scalar_(255.0);
    let _ = dst.g_sub_scalar_(0.5);
    let _ = dst.g_div_scalar_(0.5);
}

/// The order in which epoch `epoch` visits `n` training images: a
/// Fisher-Yates shuffle driven by SplitMix64 seeded from `(seed, epoch)`.
///
/// Being a pure function of its arguments, it is the whole "data-order RNG
/// state": a resumed run gets the same orders from the seed and epoch alone.
pub fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<i64> {
    let mut state = seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        // Multiply-shift maps 64 random bits onto 0..=i without modulo bias
        // worth measuring at these sizes.
        let j = ((next() as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(7, 0, 1000);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(7, 0, 1000));
        assert_ne!(a, epoch_order(7, 1, 1000), "each epoch reshuffles");
        assert_ne!(a, epoch_order(8, 0, 1000), "the seed matters");
    }

    fn args(dir: &Path) -> DataArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            data: DataArgs,
        }
        Cli::parse_from(["x", "--data-dir", dir.to_str().unwrap(), "--no-cache"]).data
    }

    #[test]
    fn a_folder_of_neither_layout_says_what_it_expected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cats")).unwrap();
        let err = args(dir.path()).prepare().unwrap_err().to_string();
        assert!(
            err.contains("is neither CIFAR-10's binary batches")
                && err.contains("train/<class>/<image>"),
            "{err}"
        );
        // An image tree is found, with val/ as its test split.
        std::fs::create_dir_all(dir.path().join("train/a")).unwrap();
        std::fs::create_dir_all(dir.path().join("val/a")).unwrap();
        match args(dir.path()).prepare().unwrap() {
            Source::Images(tree) => {
                assert_eq!(tree.train, Some(dir.path().join("train")));
                assert_eq!(tree.test, Some(dir.path().join("val")));
            }
            Source::Batches(d) => panic!("found batches in {d:?}"),
        }
    }
}
