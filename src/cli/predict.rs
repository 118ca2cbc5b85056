//! `tch-cifar predict`: classifies PNG and JPEG files with saved weights and
//! prints each class's probability.
//!
//! Both networks (the tutorial's `Net`, airbench94) end in a linear layer,
//! so their outputs are logits; the probabilities are their softmax (`CrossEntropyLoss` applies the same
//! log-softmax during training). An image of any size is converted to RGB,
//! resized to 32x32 with a bilinear, antialiased filter (like torchvision's
//! `Resize((32, 32))` on a PIL image) and normalized exactly as the training
//! data is (`ToTensor()` then `Normalize((0.5,)*3, (0.5,)*3)`): the same
//! code, [`crate::data::decode`], prepares the images of an image tree. The
//! class names are the weights'. airbench94 classifies with its test-time
//! augmentation unless `--no-tta` is given, as `evaluate` does.
//!
//! Every file gets its line (or JSON object) in the order given; one that
//! can't be read gets its reason instead, and the command then fails.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::data::decode;
use crate::nets::classifier::{Classifier, TtaArgs};
use crate::util::device::DeviceArg;

/// Classify image files with saved weights.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Weights (Net or airbench94): safetensors, a checkpoint or a `.pth`.
    ///
    /// Safetensors (from `train`), a training checkpoint, or a `.pth` from
    /// `torch.save(net.state_dict(), PATH)`.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    #[command(flatten)]
    pub tta: TtaArgs,
    /// Image files: PNG, JPEG, BMP, PNM, TIFF or WebP, of any size.
    ///
    /// Up to about 170 megapixels; each is scaled to 32x32 as the training
    /// images are.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// How many of the most probable classes to print per image [default: 3].
    ///
    /// At most the weights' number of classes: a larger N shows them all,
    /// with a note.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = |s: &str| crate::cli::count(s, 1, u16::MAX.into()).map(|n| n as u16), help_heading = "Output")]
    pub top_k: Option<u16>,
    /// Print one JSON object per image, with every probability and the logits.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// Device to run on: auto, cpu, cuda or cuda:N.
    ///
    /// auto takes cuda:0 if a GPU is available, else the CPU.
    #[arg(
        long,
        default_value = "auto",
        value_name = "DEVICE",
        help_heading = "Performance"
    )]
    pub device: DeviceArg,
}

/// Reads an image file (the format is told by its content) and turns it
/// into the normalized `[3, 32, 32]` f32 tensor `Net` expects.
pub fn load_image(path: &Path) -> Result<Tensor> {
    Ok(preprocess(&decode::decode(path)?))
}

/// RGB, resized to 32x32 if needed, then normalized like the training data.
pub fn preprocess(image: &image::DynamicImage) -> Tensor {
    decode::to_tensor(image)
}

/// One image's result.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
}

impl Prediction {
    /// Class indices from most to least probable.
    pub fn ranking(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.probabilities.len()).collect();
        order.sort_by(|&a, &b| self.probabilities[b].total_cmp(&self.probabilities[a]));
        order
    }

    /// The most probable class.
    pub fn class(&self) -> usize {
        self.ranking()[0]
    }
}

/// Runs `net` on a `[N, 3, 32, 32]` batch: logits and their softmax.
pub fn predict(net: &impl Module, images: &Tensor) -> Result<Vec<Prediction>> {
    let logits = tch::no_grad(|| net.forward(images)).to_device(Device::Cpu);
    let probs = logits.softmax(1, Kind::Float);
    let rows = |t: &Tensor| -> Result<Vec<Vec<f32>>> { Ok(Vec::<Vec<f32>>::try_from(t)?) };
    Ok(rows(&logits)?
        .into_iter()
        .zip(rows(&probs)?)
        .map(|(logits, probabilities)| Prediction {
            logits,
            probabilities,
        })
        .collect())
}

/// The text lines for one image: its class, then the top `k` classes.
pub fn text(path: &Path, p: &Prediction, k: usize, classes: &[String]) -> String {
    let mut out = format!("{}: {}", path.display(), classes[p.class()]);
    for c in p.ranking().into_iter().take(k) {
        out.push_str(&format!("\n  {:5} {:.4}", classes[c], p.probabilities[c]));
    }
    out
}

/// The JSON object for one image.
pub fn to_json(path: &Path, p: &Prediction, k: usize, classes: &[String]) -> serde_json::Value {
    let class = p.class();
    let top: Vec<serde_json::Value> = p
        .ranking()
        .into_iter()
        .take(k)
        .map(|c| json!({"class": classes[c], "label": c, "probability": p.probabilities[c]}))
        .collect();
    json!({
        "image": crate::util::report::path_json(path),
        "class": classes[class],
        "label": class,
        "top_k": top,
        "classes": classes,
        "probabilities": p.probabilities,
        "logits": p.logits,
    })
}

/// The text line for an image that could not be classified:
/// `FILE: not classified: REASON`, the file named once (the reason's own
/// mention of it, which the final `error:` line keeps, is left out).
pub fn error_text(path: &Path, err: &anyhow::Error) -> String {
    let name = path.display().to_string();
    let message = format!("{err:#}");
    let reason = match message.strip_prefix(&format!("{name} is ")) {
        // "photo.jpg is not a readable image: …" → "not a readable image: …"
        Some(rest) => rest.to_string(),
        // "cannot read image photo.jpg: …" → "cannot read image: …"
        None => message.replacen(&format!(" {name}"), "", 1),
    };
    format!("{name}: not classified: {reason}")
}

/// The JSON object for an image that could not be classified.
pub fn error_json(path: &Path, err: &anyhow::Error) -> serde_json::Value {
    json!({"image": crate::util::report::path_json(path), "error": format!("{err:#}")})
}

/// `--top-k`'s classes per image for weights of `classes` classes: the
/// default 3 quietly fits fewer classes; a larger N given is noted.
fn top_k(given: Option<u16>, classes: usize, weights: &Path) -> usize {
    match given {
        Some(k) if k as usize > classes => {
            eprintln!(
                "note: --top-k {k} is more than the {classes} classes of {}: each image shows \
                 all {classes}",
                weights.display()
            );
            classes
        }
        Some(k) => k as usize,
        None => classes.min(DEFAULT_TOP_K),
    }
}

/// `--top-k` when not given.
const DEFAULT_TOP_K: usize = 3;

/// `tch-cifar predict`.
pub fn run(args: PredictArgs) -> Result<()> {
    let device = args.device.resolve()?;
    let model = Classifier::load(&args.weights, device)?;
    let net = model.forward(args.tta.resolve(&model, &args.weights)?);
    let k = top_k(args.top_k, model.num_classes(), &args.weights);
    let mut failed: Vec<anyhow::Error> = vec![];
    // A thousand images per forward pass bounds the memory for long lists.
    for paths in args.images.chunks(1000) {
        let images: Vec<Result<Tensor>> = paths.iter().map(|p| load_image(p)).collect();
        let good: Vec<&Tensor> = images.iter().filter_map(|i| i.as_ref().ok()).collect();
        let mut predictions = if good.is_empty() {
            vec![]
        } else {
            predict(&net, &Tensor::stack(&good, 0).to_device(device))?
        }
        .into_iter();
        // Every file gets its line, in the order given; a bad one says why.
        for (path, image) in paths.iter().zip(images) {
            let line = match image {
                Ok(_) => {
                    let p = predictions
                        .next()
                        .expect("one prediction per readable image");
                    if args.json {
                        to_json(path, &p, k, model.classes()).to_string()
                    } else {
                        text(path, &p, k, model.classes())
                    }
                }
                Err(err) => {
                    let line = if args.json {
                        error_json(path, &err).to_string()
                    } else {
                        error_text(path, &err)
                    };
                    failed.push(err);
                    line
                }
            };
            println!("{line}");
        }
    }
    match failed.len() {
        0 => Ok(()),
        n => {
            let first = failed.swap_remove(0);
            let total = args.images.len();
            Err(first.context(if n == 1 {
                format!("1 of {total} images could not be classified")
            } else {
                format!("{n} of {total} images could not be classified; the first")
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG whose header says 20000x20000 (1.2 GB of pixels) is refused
    /// with a message that says so, not the decoder's "Memory limit exceeded".
    #[test]
    fn an_image_too_large_to_decode_says_so() {
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(kind);
            c.extend_from_slice(data);
            c.extend_from_slice(&crc.sum().to_be_bytes());
            c
        };
        let mut header = 20_000u32.to_be_bytes().repeat(2);
        header.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &header));
        // The start of the pixel data: the size is refused before the rest.
        let mut zlib = flate2::write::ZlibEncoder::new(vec![], flate2::Compression::fast());
        std::io::Write::write_all(&mut zlib, &[0; 64]).unwrap();
        png.extend(chunk(b"IDAT", &zlib.finish().unwrap()));
        png.extend(chunk(b"IEND", b""));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        std::fs::write(&path, png).unwrap();
        let err = format!("{:#}", load_image(&path).unwrap_err());
        assert!(
            err.ends_with(
                "huge.png is too large to decode: its pixels need more than 512 MiB \
                 (about 170 megapixels); scale it down first"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_32x32_image_is_normalized_like_the_training_data() {
        let mut img = image::RgbImage::new(32, 32);
        img.put_pixel(0, 0, image::Rgb([255, 0, 51]));
        let t = preprocess(&image::DynamicImage::ImageRgb8(img));
        assert_eq!(t.size(), [3, 32, 32]);
        assert_eq!(t.double_value(&[0, 0, 0]), 1.0);
        assert_eq!(t.double_value(&[1, 0, 0]), -1.0);
        assert!((t.double_value(&[2, 0, 0]) + 0.6).abs() < 1e-6);
        assert_eq!(t.double_value(&[0, 31, 31]), -1.0);
    }

    #[test]
    fn other_sizes_and_modes_become_3x32x32() {
        for (w, h) in [(1, 1), (7, 300), (64, 48)] {
            let gray = image::GrayAlphaImage::from_pixel(w, h, image::LumaA([128, 7]));
            let t = preprocess(&image::DynamicImage::ImageLumaA8(gray));
            assert_eq!(t.size(), [3, 32, 32], "{w}x{h}");
            let v = t.double_value(&[2, 5, 5]);
            assert!(
                (v - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6,
                "{w}x{h}: {v}"
            );
        }
    }

    #[test]
    fn ranking_and_text() {
        let p = Prediction {
            logits: vec![0.0; 10],
            probabilities: vec![0.05, 0.5, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.15, 0.0],
        };
        assert_eq!(&p.ranking()[..3], [1, 3, 8]);
        let classes = crate::data::cifar::classes();
        let t = text(Path::new("x.png"), &p, 2, &classes);
        assert_eq!(t, "x.png: car\n  car   0.5000\n  cat   0.3000");
        let j = to_json(Path::new("x.png"), &p, 3, &classes);
        assert_eq!(j["class"], "car");
        assert_eq!(j["top_k"].as_array().unwrap().len(), 3);
        assert_eq!(j["probabilities"].as_array().unwrap().len(), 10);
    }
}
