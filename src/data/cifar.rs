//! CIFAR-10 in its standard binary layout, loaded once into normalized
//! tensors on the training device.
//!
//! A batch file is a run of 3073-byte records: one label byte (0-9) and
//! 3072 bytes of planar R, G, B pixels (32x32, row-major).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};
use tch::{Device, Kind, Tensor};

use super::download;
use super::{normalize_into, Split};

/// Class names in label order, spelled as the PyTorch tutorial prints them.
pub const CLASSES: [&str; 10] = [
    "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
];
/// [`CLASSES`] as the owned list a [`Split`] carries.
pub fn classes() -> Vec<String> {
    CLASSES.map(String::from).to_vec()
}

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
        classes: classes(),
    })
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
}
