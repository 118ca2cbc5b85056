//! One image file to the 32x32 RGB pixels `Net` takes, as torchvision
//! makes them: PIL's `Image.open(f).convert("RGB")` (what `ImageFolder`'s
//! loader does), then `Resize((32, 32))`, whose interpolation on a PIL
//! image is bilinear with antialiasing (the filter widens with the scale
//! factor when shrinking).
//!
//! Used by both the image-tree loader and `predict`, so a picture is
//! prepared the same way for training as for classifying.

use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use tch::{Device, Kind, Tensor};

/// Width and height of `Net`'s input.
pub const SIDE: u32 = 32;
/// Bytes of one image in planar (CHW) RGB: what a CIFAR-10 record holds.
pub const PLANAR_BYTES: usize = 3 * (SIDE * SIDE) as usize;
/// The most memory one decode may allocate: images whose pixels would need
/// more (about 170 megapixels of RGB) are refused from their header, before
/// any pixel is decoded, so a decompression bomb costs nothing.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Reads and decodes `path`; the format is told by the content (the
/// extension only when the content says nothing).
pub fn decode(path: &Path) -> Result<DynamicImage> {
    let mut reader = image::io::Reader::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let mut limits = image::io::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow!(
            "{} is too large to decode: its pixels need more than {} MiB (about 170 \
             megapixels); scale it down first",
            path.display(),
            MAX_DECODE_BYTES >> 20
        ),
        // The decoder's message already holds its cause: one line, not a chain.
        e => anyhow!("{} is not a readable image: {e}", path.display()),
    })?;
    ensure!(
        image.width() > 0 && image.height() > 0,
        "{} is an empty image ({}x{})",
        path.display(),
        image.width(),
        image.height()
    );
    Ok(image)
}

/// RGB as PIL's `convert("RGB")` gives it: gray copied into the three
/// channels, alpha dropped (not blended onto a background), palettes
/// expanded, and 16-bit samples cut to their high byte, as Pillow reads
/// 16-bit RGB PNGs. (Pillow clips 16-bit grayscale to 255 instead, which
/// turns most such images white; here they keep their shades.)
pub fn to_rgb8(image: &DynamicImage) -> RgbImage {
    let high = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma16(g) => RgbImage::from_fn(g.width(), g.height(), |x, y| {
            image::Rgb([high(g.get_pixel(x, y).0[0]); 3])
        }),
        DynamicImage::ImageLumaA16(g) => RgbImage::from_fn(g.width(), g.height(), |x, y| {
            image::Rgb([high(g.get_pixel(x, y).0[0]); 3])
        }),
        DynamicImage::ImageRgb16(c) => RgbImage::from_fn(c.width(), c.height(), |x, y| {
            image::Rgb(c.get_pixel(x, y).0.map(high))
        }),
        DynamicImage::ImageRgba16(c) => RgbImage::from_fn(c.width(), c.height(), |x, y| {
            let [r, g, b, _] = c.get_pixel(x, y).0;
            image::Rgb([high(r), high(g), high(b)])
        }),
        other => other.to_rgb8(),
    }
}

/// RGB, resized to 32x32 when it is another size (bilinear, antialiased:
/// the triangle filter, widened by the scale factor when shrinking, like
/// PIL's `BILINEAR` resampling that torchvision's `Resize` uses).
pub fn to_rgb32(image: &DynamicImage) -> RgbImage {
    let rgb = to_rgb8(image);
    if rgb.dimensions() == (SIDE, SIDE) {
        rgb
    } else {
        image::imageops::resize(&rgb, SIDE, SIDE, FilterType::Triangle)
    }
}

/// 32x32 RGB pixels as planar (CHW) bytes, written into `out`
/// ([`PLANAR_BYTES`] long): the layout of a CIFAR-10 record and of
/// `ToTensor()`'s output.
pub fn write_planar(rgb: &RgbImage, out: &mut [u8]) {
    assert_eq!(rgb.dimensions(), (SIDE, SIDE), "a 32x32 image");
    assert_eq!(out.len(), PLANAR_BYTES, "a planar 32x32 RGB buffer");
    let plane = (SIDE * SIDE) as usize;
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[c];
        }
    }
}

/// The file at `path` as planar 32x32 RGB bytes.
pub fn load_planar(path: &Path, out: &mut [u8]) -> Result<()> {
    write_planar(&to_rgb32(&decode(path)?), out);
    Ok(())
}

/// An image as the normalized `[3, 32, 32]` f32 tensor `Net` takes.
pub fn to_tensor(image: &DynamicImage) -> Tensor {
    let mut planar = vec![0u8; PLANAR_BYTES];
    write_planar(&to_rgb32(image), &mut planar);
    let pixels = Tensor::from_slice(&planar).view([3, SIDE as i64, SIDE as i64]);
    let mut out = Tensor::empty([3, SIDE as i64, SIDE as i64], (Kind::Float, Device::Cpu));
    super::normalize_into(&mut out, &pixels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_become_rgb_like_pil() {
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(2, 2, image::Luma([9])));
        assert_eq!(to_rgb8(&gray).get_pixel(1, 1).0, [9, 9, 9]);
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            2,
            2,
            image::Rgba([10, 20, 30, 0]),
        ));
        // Fully transparent, the colour stays: alpha is dropped, not blended.
        assert_eq!(to_rgb8(&rgba).get_pixel(0, 0).0, [10, 20, 30]);
        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Rgb([0x12ff, 0xab00, 0xffff]),
        ));
        assert_eq!(to_rgb8(&deep).get_pixel(0, 0).0, [0x12, 0xab, 0xff]);
        let gray16 = DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Luma([0x8000u16]),
        ));
        assert_eq!(to_rgb8(&gray16).get_pixel(0, 0).0, [0x80; 3]);
    }

    #[test]
    fn planar_layout_is_channel_first() {
        let mut rgb = RgbImage::new(SIDE, SIDE);
        rgb.put_pixel(1, 0, image::Rgb([1, 2, 3]));
        let mut out = vec![0u8; PLANAR_BYTES];
        write_planar(&rgb, &mut out);
        assert_eq!((out[1], out[1024 + 1], out[2048 + 1]), (1, 2, 3));
    }

    #[test]
    fn resizing_only_when_needed() {
        let exact = DynamicImage::ImageRgb8(RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        }));
        assert_eq!(to_rgb32(&exact), exact.to_rgb8());
        for (w, h) in [(1, 1), (7, 300), (64, 48)] {
            let flat = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, image::Rgb([200, 5, 9])));
            let small = to_rgb32(&flat);
            assert_eq!(small.dimensions(), (32, 32), "{w}x{h}");
            // A flat colour stays that colour whatever the filter.
            assert!(small.pixels().all(|p| p.0 == [200, 5, 9]), "{w}x{h}");
        }
        // Shrinking 64 -> 32 averages neighbours (antialiased), rather than
        // picking every second pixel.
        let stripes = DynamicImage::ImageLuma8(image::GrayImage::from_fn(64, 64, |x, _| {
            image::Luma([if x % 2 == 0 { 0 } else { 255 }])
        }));
        let v = to_rgb32(&stripes).get_pixel(10, 10).0[0];
        assert!((100..=155).contains(&v), "{v}");
    }
}
