//! Times loading an image tree the way `train` does (both splits, decoded
//! on every core or read from the cache, then normalized), and compares the
//! decoded pixels with Pillow's.
//!
//! ```sh
//! cargo run --release --example load_images -- DIR CACHE_DIR            # first load: decodes
//! cargo run --release --example load_images -- DIR CACHE_DIR            # again: from the cache
//! scripts/interop.py image-folder DIR/train --pixels pil.safetensors > /dev/null
//! cargo run --release --example load_images -- DIR CACHE_DIR pil.safetensors
//! ```
//!
//! The third form reports the largest and the mean absolute difference, in
//! 0-255 levels, between this crate's pixels of DIR/train and Pillow's
//! (`interop.py image-folder` writes them in `ImageFolder`'s order).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use tch_cifar::data::image_folder::{Options, Tree};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(
        (2..=3).contains(&args.len()),
        "usage: load_images DIR CACHE_DIR [PIL_PIXELS.safetensors]"
    );
    let options = Options {
        skip_bad_images: false,
        cache_dir: Some(PathBuf::from(&args[1])),
    };
    let tree = Tree::find(args[0].as_ref(), options).context("no image tree there")?;
    let start = Instant::now();
    for dir in tree.train.iter().chain(&tree.test) {
        tch_cifar::data::image_folder::scan(dir)?;
    }
    println!(
        "listing the files alone: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let (train, test) = tree.load_both()?;
    let decoded = start.elapsed().as_secs_f64();
    let train_split = train.to_split(Device::Cpu);
    let test_split = test.to_split(Device::Cpu);
    let total = start.elapsed().as_secs_f64();
    println!(
        "{} + {} images, {} classes: {decoded:.2} s to decode or read the cache, {total:.2} s \
         with normalizing ({} threads)",
        train_split.len(),
        test_split.len(),
        train.classes.len(),
        rayon::current_num_threads()
    );
    if let Some(pil) = args.get(2) {
        let theirs = Tensor::read_safetensors(pil)?
            .into_iter()
            .find(|(k, _)| k == "pixels")
            .context("no `pixels` tensor in that file")?
            .1
            .to_kind(Kind::Int16);
        let ours = Tensor::from_slice(&train.pixels)
            .view([train.len() as i64, 3, 32, 32])
            .to_kind(Kind::Int16);
        ensure!(ours.size() == theirs.size(), "different image counts");
        let diff = (ours - theirs).abs();
        let same = diff.eq(0).sum(Kind::Int64).int64_value(&[]);
        println!(
            "against Pillow: largest difference {} levels, mean {:.4} levels, {:.2} % of values \
             equal",
            diff.max().int64_value(&[]),
            diff.to_kind(Kind::Double)
                .mean(Kind::Double)
                .double_value(&[]),
            100.0 * same as f64 / diff.numel() as f64
        );
    }
    Ok(())
}
