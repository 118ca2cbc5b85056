//! Pictures: PNG charts and image grids drawn with plotters, with the
//! DejaVu Sans font embedded so that text renders on any machine, with or
//! without system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::element::DashedPathElement;
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

/// clap's parser for a flag naming a PNG to write: the encoder picks the
/// format from the extension, so any other name would fail after the work.
pub fn parse_png(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("png") => Ok(path),
        _ => Err(format!(
            "`{s}`: the picture is a PNG, so the name must end in .png"
        )),
    }
}

/// The surface [`write_png`] hands to its drawing function.
pub type Canvas<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws a `width`x`height` PNG with `draw` and writes it to `path`
/// atomically, like every output: an existing file is replaced only by a
/// complete picture.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    draw: impl FnOnce(&Canvas<'_>) -> Result<()>,
) -> Result<()> {
    crate::util::files::write_atomically(path, |tmp| {
        register_font();
        let root = BitMapBackend::new(tmp, (width, height)).into_drawing_area();
        draw(&root)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// One curve of a [`LineChart`].
#[derive(Debug, Clone)]
pub struct Line {
    /// The legend's text.
    pub label: String,
    /// `(x, y)` in data units; non-finite points are left out.
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Stroke width in pixels.
    pub width: u32,
    /// Dash and gap lengths in pixels, or `None` for a solid line. Curves
    /// that lie on top of each other stay visible with different widths
    /// and dashes.
    pub dash: Option<(u32, u32)>,
}

/// A chart of a few curves over a shared x axis, with a legend.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    /// A log-scale y axis, labeled in powers of ten; points with y <= 0
    /// are left out.
    pub log_y: bool,
}

/// Draws `rows` of charts, each row split evenly across the width and the
/// rows evenly down the height, as one PNG at `path` (written like
/// [`write_png`]).
pub fn save_grid(path: &Path, width: u32, height: u32, rows: &[Vec<&LineChart>]) -> Result<()> {
    write_png(path, width, height, |root| {
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot draw {}", path.display()))?;
        for (row, area) in rows.iter().zip(root.split_evenly((rows.len().max(1), 1))) {
            for (chart, cell) in row.iter().zip(area.split_evenly((1, row.len().max(1)))) {
                chart
                    .draw(&cell)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("cannot draw {}", path.display()))?;
            }
        }
        Ok(())
    })
}

impl LineChart {
    /// Draws the chart as a `width`x`height` PNG at `path`. The picture is
    /// rendered into a temporary file next to `path` and renamed onto it
    /// once complete, so a failure never leaves a torn PNG.
    pub fn save(&self, path: &Path, width: u32, height: u32) -> Result<()> {
        write_png(path, width, height, |root| {
            self.draw(root)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("cannot draw {}", path.display()))
        })
    }

    fn draw(&self, root: &Canvas<'_>) -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        // On a log axis the chart plots log10(y), labeled as powers of ten.
        let log_y = self.log_y;
        let finite = |l: &Line| {
            l.points
                .iter()
                .map(|&(x, y)| (x, if log_y { y.log10() } else { y }))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect::<Vec<_>>()
        };
        let lines: Vec<(&Line, Vec<(f64, f64)>)> =
            self.lines.iter().map(|l| (l, finite(l))).collect();
        let all = lines.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        // Some room so that no curve runs along the frame.
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let (x1, y0, y1) = (x1.max(x0 + 1e-9), y0 - pad, y1 + pad);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        // Whole numbers on a wide axis: "25000", not "25000.0".
        let x_format = move |x: &f64| {
            if x1 - x0 >= 10.0 {
                format!("{x:.0}")
            } else {
                format!("{x}")
            }
        };
        // A power of ten at each whole log10, nothing between.
        let y_format = |y: &f64| {
            if (y - y.round()).abs() < 1e-6 {
                format!("1e{}", y.round() as i64)
            } else {
                String::new()
            }
        };
        let mut mesh = chart.configure_mesh();
        if log_y {
            mesh.y_label_formatter(&y_format);
        }
        mesh.x_label_formatter(&x_format)
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (line, points) in lines {
            let style = line.color.stroke_width(line.width);
            let anno = match line.dash {
                // plotters joins wide segments with unbounded miters, which
                // spike at every sharp turn of a noisy curve: draw wide
                // lines as separate segments with round joins instead.
                None if line.width > 2 => {
                    let r = line.width / 2;
                    chart.draw_series(
                        points
                            .windows(2)
                            .map(|w| PathElement::new(vec![w[0], w[1]], style)),
                    )?;
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, r, style.filled())))?
                }
                None => chart.draw_series(LineSeries::new(points, style))?,
                Some((dash, gap)) => {
                    chart.draw_series(DashedLineSeries::new(points, dash, gap, style))?
                }
            };
            let dash = line.dash;
            anno.label(&line.label).legend(move |(x, y)| {
                let ends = vec![(x, y), (x + 28, y)];
                match dash {
                    None => PathElement::new(ends, style).into_dyn(),
                    Some((d, g)) => DashedPathElement::new(ends, d, g, style).into_dyn(),
                }
            });
        }
        chart
            .configure_series_labels()
            // A log axis spreads its curves apart: the middle is free.
            .position(if log_y {
                SeriesLabelPosition::MiddleRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_text_to_a_png_and_keeps_the_old_file_when_drawing_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        write_png(&path, 120, 40, |root| {
            root.fill(&WHITE)?;
            root.draw(&Text::new(
                "hello",
                (5, 5),
                (FONT, 20).into_font().color(&BLACK),
            ))?;
            Ok(())
        })
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let err = write_png(&path, 120, 40, |_| anyhow::bail!("no pen")).unwrap_err();
        assert_eq!(err.to_string(), "no pen");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn png_flags_want_a_png_name() {
        assert!(parse_png("a/b.png").is_ok());
        assert!(parse_png("B.PNG").is_ok());
        assert!(parse_png("b.jpg").unwrap_err().contains("b.jpg"));
        assert!(parse_png("png").is_err());
    }

    #[test]
    fn line_chart_writes_a_png_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let line = |label: &str, dash| Line {
            label: label.into(),
            points: (0..50).map(|i| (i as f64, (i as f64).sin())).collect(),
            color: BLUE,
            width: 2,
            dash,
        };
        let chart = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            lines: vec![line("solid", None), line("dashed", Some((6, 4)))],
            log_y: false,
        };
        chart.save(&path, 300, 200).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = chart
            .save(&dir.path().join("no/dir/c.png"), 300, 200)
            .unwrap_err();
        assert!(format!("{err:#}").contains("no/dir/c.png"), "{err:#}");
    }
}
