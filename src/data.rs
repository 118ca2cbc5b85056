//! CIFAR-10 in its standard binary layout, loaded once into normalized
//! tensors on the training device, plus the seeded order in which the
//! training set is visited each epoch.
//!
//! A batch file is a run of 3073-byte records: one label byte (0-9) and
//! 3072 bytes of planar R, G, B pixels (32x32, row-major).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};
use tch::{Device, Kind, Tensor};

use crate::download;

/// Class names in label order, spelled as the PyTorch tutorial prints them.
pub const CLASSES: [&str; 10] = [
    "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
];
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";
/// The folder the official archive unpacks into.
pub const BATCHES_DIR: &str = "cifar-10-batches-bin";

/// One split on a device: `images` is `[N, 3, 32, 32]` f32 normalized to
/// [-1, 1], `labels` is `[N]` i64.
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
    /// The md5 of the batch files' bytes, in order, when read from files:
    /// what tells one training set from another with as many images.
    pub md5: Option<String>,
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
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Folder holding the CIFAR-10 binary batches, directly or in
    /// cifar-10-batches-bin/; the archive is fetched into it when they are missing.
    #[arg(long, default_value = "data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Unpack this local cifar-10-binary.tar.gz instead of downloading it.
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,
    /// Where to download cifar-10-binary.tar.gz from (a mirror, say).
    #[arg(long, default_value = download::OFFICIAL_URL, value_name = "URL")]
    pub download_url: String,
    /// The archive's expected md5 (the official one by default).
    #[arg(long, default_value = download::OFFICIAL_MD5, value_name = "HEX")]
    pub md5: String,
}

impl DataArgs {
    /// The folder with the batch files, fetched and unpacked if needed.
    pub fn prepare(&self) -> Result<PathBuf> {
        let source = match &self.archive {
            Some(path) => download::Source::Archive(path.clone()),
            None => download::Source::Url(self.download_url.clone()),
        };
        download::ensure_dataset(&self.data_dir, &source, &self.md5)
    }
}

pub struct Cifar10 {
    pub train: Split,
    pub test: Split,
}

/// The folder holding the six batch files: `dir` itself, or the
/// `cifar-10-batches-bin/` inside it (where the official archive unpacks).
pub fn locate(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join(BATCHES_DIR)]
        .into_iter()
        .find(|d| {
            TRAIN_FILES
                .iter()
                .chain([&TEST_FILE])
                .all(|f| d.join(f).is_file())
        })
}

/// Loads both splits from the folder that holds the batch files.
pub fn load(batches_dir: &Path, device: Device) -> Result<Cifar10> {
    Ok(Cifar10 {
        train: load_train(batches_dir, device)?,
        test: load_test(batches_dir, device)?,
    })
}

/// The 50,000 training images (`data_batch_1.bin` ... `data_batch_5.bin`).
pub fn load_train(batches_dir: &Path, device: Device) -> Result<Split> {
    let paths: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| batches_dir.join(f)).collect();
    load_split(&paths, device)
}

/// The 10,000 test images (`test_batch.bin`).
pub fn load_test(batches_dir: &Path, device: Device) -> Result<Split> {
    load_split(&[batches_dir.join(TEST_FILE)], device)
}

/// Reads and checks the given batch files and stacks them into one split.
///
/// The split's tensor is allocated once and each file is converted straight
/// into its slice of it, so the peak memory is the split plus one raw file.
pub fn load_split(paths: &[PathBuf], device: Device) -> Result<Split> {
    let counts = paths
        .iter()
        .map(|p| record_count(p))
        .collect::<Result<Vec<i64>>>()?;
    let total: i64 = counts.iter().sum();
    let images = Tensor::empty([total, 3, 32, 32], (Kind::Float, device));
    let mut labels = Vec::with_capacity(total as usize);
    let mut offset = 0;
    let mut md5 = Md5::new();
    for (path, n) in paths.iter().zip(counts) {
        let bytes = read_batch_file(path)?;
        md5.update(&bytes);
        ensure!(
            bytes.len() as i64 == n * RECORD_BYTES as i64,
            "{} changed size while being read",
            path.display()
        );
        labels.extend(bytes.chunks_exact(RECORD_BYTES).map(|r| r[0] as i64));
        // A thousand records at a time keeps the u8 copy small.
        for chunk in bytes.chunks(1000 * RECORD_BYTES) {
            let m = (chunk.len() / RECORD_BYTES) as i64;
            let records = Tensor::from_slice(chunk).view([m, RECORD_BYTES as i64]);
            let pixels = records
                .narrow(1, 1, IMAGE_BYTES as i64)
                .view([m, 3, 32, 32]);
            normalize_into(&mut images.narrow(0, offset, m), &pixels.to_device(device));
            offset += m;
        }
    }
    Ok(Split {
        images,
        labels: Tensor::from_slice(&labels).to_device(device),
        md5: Some(download::hex(&md5.finalize())),
    })
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

/// The number of records in a batch file, from its size alone.
fn record_count(path: &Path) -> Result<i64> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len() as usize;
    check_size(path, len)?;
    Ok((len / RECORD_BYTES) as i64)
}

fn check_size(path: &Path, len: usize) -> Result<()> {
    ensure!(len > 0, "{} is empty", path.display());
    ensure!(
        len.is_multiple_of(RECORD_BYTES),
        "{} has {len} bytes, not a whole number of {RECORD_BYTES}-byte records \
         (truncated, or not a CIFAR-10 binary batch)",
        path.display()
    );
    Ok(())
}

/// A whole batch file, checked: not empty, made of whole records, labels 0-9.
pub fn read_batch_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    check_size(path, bytes.len())?;
    if let Some((i, label)) = bytes
        .chunks_exact(RECORD_BYTES)
        .map(|r| r[0])
        .enumerate()
        .find(|&(_, l)| l >= 10)
    {
        bail!(
            "{}: record {i} has label byte {label}, but CIFAR-10 labels are 0-9",
            path.display()
        );
    }
    Ok(bytes)
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

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn record(label: u8, pixel: u8) -> Vec<u8> {
        let mut r = vec![pixel; RECORD_BYTES];
        r[0] = label;
        r
    }

    #[test]
    fn normalizes_like_to_tensor_then_normalize() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(3, 0);
        bytes.extend(record(9, 255));
        let mut third = record(0, 0);
        third[1] = 51; // first red pixel: 51/255 = 0.2 -> (0.2-0.5)/0.5 = -0.6
        bytes.extend(third);
        let path = write(dir.path(), "b.bin", &bytes);
        let split = load_split(&[path], Device::Cpu).unwrap();
        assert_eq!(split.images.size(), [3, 3, 32, 32]);
        assert_eq!(Vec::<i64>::try_from(&split.labels).unwrap(), [3, 9, 0]);
        assert_eq!(split.images.get(0).min().double_value(&[]), -1.0);
        assert_eq!(split.images.get(1).max().double_value(&[]), 1.0);
        let v = split.images.double_value(&[2, 0, 0, 0]);
        assert!((v + 0.6).abs() < 1e-6, "{v}");
    }

    #[test]
    fn planar_layout_maps_to_channels() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record(1, 0);
        r[1 + 1024..1 + 2048].fill(255); // green plane
        let path = write(dir.path(), "b.bin", &r);
        let split = load_split(&[path], Device::Cpu).unwrap();
        let means: Vec<f64> = (0..3)
            .map(|c| {
                split
                    .images
                    .get(0)
                    .get(c)
                    .mean(Kind::Float)
                    .double_value(&[])
            })
            .collect();
        assert_eq!(means, [-1.0, 1.0, -1.0]);
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.bin");
        let err = format!("{:#}", read_batch_file(&missing).unwrap_err());
        assert!(err.contains("nope.bin"), "{err}");

        let empty = write(dir.path(), "empty.bin", b"");
        let err = read_batch_file(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.bin") && err.contains("is empty"),
            "{err}"
        );

        let mut cut = record(1, 7);
        cut.extend(&record(2, 7)[..100]);
        let cut = write(dir.path(), "cut.bin", &cut);
        let err = read_batch_file(&cut).unwrap_err().to_string();
        assert!(
            err.contains("cut.bin") && err.contains("3173 bytes"),
            "{err}"
        );

        let mut bad = record(1, 7);
        bad.extend(record(10, 7));
        let bad = write(dir.path(), "label.bin", &bad);
        let err = read_batch_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains("label.bin") && err.contains("record 1") && err.contains("10"),
            "{err}"
        );
    }

    #[test]
    fn locate_finds_flat_and_nested_layouts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(locate(dir.path()), None);
        let nested = dir.path().join(BATCHES_DIR);
        std::fs::create_dir(&nested).unwrap();
        for f in TRAIN_FILES.iter().chain([&TEST_FILE]) {
            write(&nested, f, &record(0, 0));
        }
        assert_eq!(locate(dir.path()), Some(nested.clone()));
        assert_eq!(locate(&nested), Some(nested));
    }

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
}
