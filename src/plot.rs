//! Pictures: PNG charts and image grids drawn with plotters, with the
//! DejaVu Sans font embedded so that text renders on any machine, with or
//! without system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// The font family name charts use; registered on first use.
pub const FONT: &str = "sans-serif";

/// Makes [`FONT`] available to plotters (idempotent).
pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            let bytes = match style {
                FontStyle::Bold => dejavu::sans::bold(),
                _ => dejavu::sans::regular(),
            };
            // The bytes are a valid TTF shipped by the dejavu crate.
            if plotters::style::register_font(FONT, style, bytes).is_err() {
                panic!("embedded DejaVu font failed to load");
            }
        }
    });
}

/// A `width`x`height` PNG canvas at `path`; call `present()` on it when done
/// (through [`present`], which names the file in errors).
pub fn png_canvas(
    path: &Path,
    width: u32,
    height: u32,
) -> DrawingArea<BitMapBackend<'_>, plotters::coord::Shift> {
    register_font();
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root
}

/// Writes the canvas to its file.
pub fn present(
    root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
) -> Result<()> {
    root.present()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_text_to_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        let root = png_canvas(&path, 120, 40);
        root.fill(&WHITE).unwrap();
        root.draw(&Text::new(
            "hello",
            (5, 5),
            (FONT, 20).into_font().color(&BLACK),
        ))
        .unwrap();
        present(&root, &path).unwrap();
        drop(root);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
