//! `tch-cifar samples`: the tutorial's "show some training images" step. A
//! random mini-batch of training images, drawn as a labeled grid in a PNG,
//! with the labels also printed as the tutorial prints them.
//!
//! The pixels come straight from the batch files, or from an image tree's
//! decoded (and cached) pixels: they are what un-normalizing the training
//! tensors (`img / 2 + 0.5`, as the tutorial's `imshow` does) gives back.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::data::{self, DataArgs, Source, CLASSES, IMAGE_BYTES, RECORD_BYTES, TRAIN_FILES};
use crate::util::plot::{write_png, FONT};

/// Draw a grid of random training images with their labels.
#[derive(Debug, clap::Args)]
pub struct SamplesArgs {
    /// Where to write the PNG grid.
    #[arg(long, default_value = "samples.png", value_name = "FILE.png", value_parser = crate::util::plot::parse_png, help_heading = "Output")]
    pub out: PathBuf,
    /// How many images (the tutorial shows one mini-batch of 4).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true,
          value_parser = |s: &str| crate::cli::count(s, 1, 256).map(|n| n as u16), help_heading = "Data")]
    pub count: u16,
    /// Seed for picking the images; without one, each run picks others.
    ///
    /// The pick is the first images of the seeded shuffle `train` uses.
    #[arg(long, help_heading = "Data")]
    pub seed: Option<u64>,
    /// Images per row of the grid (torchvision's make_grid uses 8).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true,
          value_parser = |s: &str| crate::cli::count(s, 1, 64).map(|n| n as u16), help_heading = "Output")]
    pub columns: u16,
    /// Screen pixels per image pixel (the images are 32x32).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true,
          value_parser = |s: &str| crate::cli::count(s, 1, 16).map(|n| n as u32), help_heading = "Output")]
    pub scale: u32,
    #[command(flatten)]
    pub data: DataArgs,
}

/// One training image: its label and its 32x32 planar RGB bytes.
#[derive(Debug, Clone)]
pub struct Sample {
    pub label: usize,
    pub pixels: Vec<u8>,
}

/// Reads training records `indices` (counted across data_batch_1..5) from
/// the batch files in `dir`, without loading whole files.
pub fn read_records(dir: &Path, indices: &[i64]) -> Result<Vec<Sample>> {
    let files: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| dir.join(f)).collect();
    let mut counts = Vec::with_capacity(files.len());
    for f in &files {
        let len = std::fs::metadata(f)
            .with_context(|| format!("cannot read {}", f.display()))?
            .len();
        ensure!(
            len > 0 && len.is_multiple_of(RECORD_BYTES as u64),
            "{} has {len} bytes, not a whole number of {RECORD_BYTES}-byte records",
            f.display()
        );
        counts.push(len / RECORD_BYTES as u64);
    }
    indices
        .iter()
        .map(|&i| {
            let mut i = u64::try_from(i).context("negative record index")?;
            for (f, &n) in files.iter().zip(&counts) {
                if i < n {
                    return read_record(f, i);
                }
                i -= n;
            }
            bail!("record index past the end of the training set")
        })
        .collect()
}

fn read_record(path: &Path, index: u64) -> Result<Sample> {
    let mut record = vec![0u8; RECORD_BYTES];
    File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(index * RECORD_BYTES as u64))?;
            f.read_exact(&mut record)
        })
        .with_context(|| format!("cannot read record {index} of {}", path.display()))?;
    let label = record[0];
    ensure!(
        (label as usize) < CLASSES.len(),
        "{}: record {index} has label byte {label}, but CIFAR-10 labels are 0-9",
        path.display()
    );
    Ok(Sample {
        label: label as usize,
        pixels: record[1..].to_vec(),
    })
}

/// The labels line the tutorial prints: `' '.join(f'{classes[l]:5s}' ...)`.
pub fn labels_line(samples: &[Sample], classes: &[String]) -> String {
    samples
        .iter()
        .map(|s| format!("{:5}", classes[s.label]))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Draws `samples` as a grid, `columns` per row, each image `scale` times
/// its size with its class name (from `classes`) under it.
pub fn draw_grid(
    path: &Path,
    samples: &[Sample],
    classes: &[String],
    columns: u32,
    scale: u32,
) -> Result<()> {
    let columns = columns.min(samples.len() as u32).max(1);
    let rows = (samples.len() as u32).div_ceil(columns);
    let side = 32 * scale;
    let pad = 8;
    let label_h = 22;
    let (cell_w, cell_h) = (side.max(60) + pad, side + label_h + pad);
    let width = columns * cell_w + pad;
    let height = rows * cell_h + pad;
    write_png(path, width, height, |root| {
        let err =
            |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("cannot draw {}: {e}", path.display());
        root.fill(&WHITE).map_err(err)?;
        let label_style = (FONT, 16)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (n, sample) in samples.iter().enumerate() {
            let (col, row) = (n as u32 % columns, n as u32 / columns);
            let x0 = (pad + col * cell_w + (cell_w - pad - side) / 2) as i32;
            let y0 = (pad + row * cell_h) as i32;
            for y in 0..32 {
                for x in 0..32 {
                    let at = |c: usize| sample.pixels[c * 1024 + y * 32 + x];
                    let colour = RGBColor(at(0), at(1), at(2));
                    let (px, py) = (
                        x0 + (x as u32 * scale) as i32,
                        y0 + (y as u32 * scale) as i32,
                    );
                    root.draw(&Rectangle::new(
                        [(px, py), (px + scale as i32, py + scale as i32)],
                        colour.filled(),
                    ))
                    .map_err(err)?;
                }
            }
            root.draw(&Text::new(
                classes[sample.label].as_str(),
                (x0 + side as i32 / 2, y0 + side as i32 + 3),
                label_style.clone(),
            ))
            .map_err(err)?;
        }
        Ok(())
    })
}

/// A seed from the clock when none is given.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// `tch-cifar samples`.
pub fn run(args: SamplesArgs) -> Result<()> {
    crate::util::files::check_writable(&args.out)?;
    crate::weights::outputs::check_command_outputs(
        &args.data,
        &[],
        &[("--out", Some(args.out.as_path()))],
    )?;
    let seed = args.seed.unwrap_or_else(random_seed);
    let (samples, classes) = match args.data.prepare()? {
        Source::Batches(dir) => (
            batch_samples(&dir, seed, args.count)?,
            data::cifar::classes(),
        ),
        Source::Images(tree) => {
            let train = tree.load_train()?;
            let order = data::epoch_order(seed, 0, train.len());
            let picked = &order[..(args.count as usize).min(order.len())];
            let samples = picked
                .iter()
                .map(|&i| Sample {
                    label: train.labels[i as usize] as usize,
                    pixels: train.image(i as usize).to_vec(),
                })
                .collect();
            (samples, train.classes)
        }
    };
    debug_assert!(samples.iter().all(|s| s.pixels.len() == IMAGE_BYTES));
    draw_grid(
        &args.out,
        &samples,
        &classes,
        args.columns.into(),
        args.scale,
    )?;
    println!("{}", labels_line(&samples, &classes));
    Ok(())
}

/// `count` training records from the batch files in `dir`, picked by the
/// first epoch's order under `seed`.
fn batch_samples(dir: &Path, seed: u64, count: u16) -> Result<Vec<Sample>> {
    let total: u64 = TRAIN_FILES
        .iter()
        .map(|f| {
            let p = dir.join(f);
            std::fs::metadata(&p)
                .map(|m| m.len() / RECORD_BYTES as u64)
                .with_context(|| format!("cannot read {}", p.display()))
        })
        .sum::<Result<u64>>()?;
    ensure!(total > 0, "the training set in {} is empty", dir.display());
    let order = data::epoch_order(seed, 0, total as usize);
    let picked = &order[..(count as usize).min(order.len())];
    read_records(dir, picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_padded_like_the_tutorial() {
        let s = |label| Sample {
            label,
            pixels: vec![0; IMAGE_BYTES],
        };
        assert_eq!(
            labels_line(&[s(3), s(8), s(0), s(1)], &data::cifar::classes()),
            "cat   ship  plane car  "
        );
    }

    #[test]
    fn draws_a_grid_of_the_right_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        let samples: Vec<Sample> = (0..5)
            .map(|i| Sample {
                label: i,
                pixels: vec![i as u8 * 50; IMAGE_BYTES],
            })
            .collect();
        draw_grid(&path, &samples, &data::cifar::classes(), 3, 2).unwrap();
        let (w, h) = image::image_dimensions(&path).unwrap();
        // 3 columns of max(64, 60) + 8, 2 rows of 64 + 22 + 8, plus the outer pad.
        assert_eq!((w, h), (3 * 72 + 8, 2 * 94 + 8));
    }
}
