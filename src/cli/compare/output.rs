//! What `compare-losses` writes besides its events: the accuracy table,
//! the CSV of every step, and the chart of losses and divergence.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::style::RGBColor;
use serde_json::{json, Value};
use tch::Kind;

use super::contenders::Role;
use super::probe::kind_name;
use super::side_by_side::History;
use crate::train::evaluation::Evaluation;
use crate::util::plot::{Line, LineChart};
use crate::util::report::Reporter;

/// A small difference in scientific notation, and an exact zero as "0".
pub fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.1e}")
    }
}

/// Prints `text` unless the output is JSON.
pub fn text_only(reporter: &Reporter, text: String) {
    if !reporter.is_json() {
        reporter.emit(|| text, Value::Null);
    }
}

/// JSON has no inf or NaN: those become strings.
pub fn finite_or_string(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

/// The test accuracies, overall and per class, one column per role.
pub fn accuracy_text(evals: &[Evaluation]) -> String {
    let mut out = format!("Test accuracy on {} images", evals[0].total());
    for r in Role::ALL {
        out.push_str(&format!("{:>9}", r.letter()));
    }
    let pct = |a: Option<f64>, digits: usize| a.map_or("n/a".into(), |a| format!("{a:.digits$} %"));
    out.push_str(&format!("\n  {:<24}", "all classes"));
    for e in evals {
        out.push_str(&format!("{:>9}", pct(Some(e.accuracy()), 2)));
    }
    let per: Vec<Vec<Option<f64>>> = evals.iter().map(|e| e.per_class()).collect();
    for (c, name) in evals[0].classes.iter().enumerate() {
        out.push_str(&format!("\n  {name:<24}"));
        for p in &per {
            out.push_str(&format!("{:>9}", pct(p[c], 1)));
        }
    }
    out
}

/// The CSV's header: one row per step and dtype; the divergence columns
/// are filled every [`super::side_by_side::DIVERGENCE_EVERY`] steps and
/// at the last, and empty otherwise.
pub const CSV_HEADER: &str =
    "dtype,step,epoch,loss_a,loss_a_rev,loss_b,loss_c,max_param_diff_ab,max_param_diff_a_rev";

/// "f32" or "f64", as the CSV and `--dtype` write it.
pub fn dtype_flag(kind: Kind) -> &'static str {
    match kind {
        Kind::Double => "f64",
        _ => "f32",
    }
}

/// Writes [`CSV_HEADER`] and a row per step of every run.
pub fn write_csv(path: &Path, runs: &[(Kind, &History)]) -> Result<()> {
    crate::util::files::write_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let mut write = || -> std::io::Result<()> {
            writeln!(w, "{CSV_HEADER}")?;
            for &(kind, history) in runs {
                // A float32 run's losses are float32 numbers: print them so.
                let num = |x: f64| match kind {
                    Kind::Double => x.to_string(),
                    _ => (x as f32).to_string(),
                };
                let mut divergence = history.divergence.iter().peekable();
                for (i, losses) in history.losses.iter().enumerate() {
                    let step = i as u64 + 1;
                    let epoch = i as u64 / history.steps_per_epoch + 1;
                    write!(w, "{},{step},{epoch}", dtype_flag(kind))?;
                    for l in losses {
                        write!(w, ",{}", num(*l))?;
                    }
                    match divergence.next_if(|d| d.step == step) {
                        // 1e-15 reads better as that than as 0.000000000000001.
                        Some(d) => writeln!(w, ",{:e},{:e}", d.ab, d.a_rev)?,
                        None => writeln!(w, ",,")?,
                    }
                }
            }
            w.flush()
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    })
}

/// The smoothing window of the chart: 200 steps, or fewer on short runs so
/// that the curves keep some shape.
pub fn smoothing_window(steps: usize) -> usize {
    200.min((steps / 10).max(1))
}

/// Trailing mean over `window` steps of the finite values, at every step.
fn smoothed(values: impl Iterator<Item = f64>, window: usize) -> Vec<(f64, f64)> {
    let values: Vec<f64> = values.collect();
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut out = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        if v.is_finite() {
            sum += v;
            count += 1;
        }
        if i >= window && values[i - window].is_finite() {
            sum -= values[i - window];
            count -= 1;
        }
        if i + 1 >= window && count > 0 {
            out.push(((i + 1) as f64, sum / count as f64));
        }
    }
    out
}

/// One run's smoothed loss curves: A wide and pale under A' and B dashed
/// and C thin, so that all four show where they overlap.
fn loss_chart(kind: Kind, history: &History) -> LineChart {
    let window = smoothing_window(history.losses.len());
    // 600 points of a 200-step mean are plenty for a 1200-pixel-wide chart.
    let every = (history.losses.len() / 600).max(1);
    let styles = [
        (RGBColor(140, 180, 235), 7, None),
        (RGBColor(60, 160, 60), 2, Some((4, 6))),
        (RGBColor(215, 40, 40), 2, Some((10, 7))),
        (RGBColor(20, 20, 20), 1, None),
    ];
    let lines = Role::ALL
        .iter()
        .zip(styles)
        .map(|(role, (color, width, dash))| {
            let head = role.head();
            let points = smoothed(history.losses.iter().map(|l| l[role.index()]), window);
            let order = if role.reversed() {
                ", batch reversed"
            } else {
                ""
            };
            Line {
                label: format!(
                    "{}: {} + {}{order}",
                    role.letter(),
                    head.layer(),
                    head.loss_name()
                ),
                points: points.into_iter().step_by(every).collect(),
                color,
                width,
                dash,
            }
        })
        .collect();
    LineChart {
        title: format!(
            "{}: training loss, mean of {window} mini-batches",
            kind_name(kind)
        ),
        x_label: "mini-batch".into(),
        y_label: "loss".into(),
        lines,
        log_y: false,
    }
}

/// The divergence of every run on one log-scale chart: A-B solid, A-A'
/// dashed, one colour pair per dtype.
fn divergence_chart(runs: &[(Kind, &History)]) -> LineChart {
    let mut lines = Vec::new();
    for &(kind, history) in runs {
        let (ab, a_rev) = match kind {
            Kind::Double => (RGBColor(30, 90, 200), RGBColor(90, 190, 220)),
            _ => (RGBColor(200, 30, 30), RGBColor(240, 150, 30)),
        };
        let series = |f: fn(&super::side_by_side::Divergence) -> f64| {
            history
                .divergence
                .iter()
                .map(|d| (d.step as f64, f(d)))
                .collect::<Vec<_>>()
        };
        let name = kind_name(kind);
        lines.push(Line {
            label: format!("{name}: A vs B"),
            points: series(|d| d.ab),
            color: ab,
            width: 3,
            dash: None,
        });
        lines.push(Line {
            label: format!("{name}: A vs A' (batch reversed)"),
            points: series(|d| d.a_rev),
            color: a_rev,
            width: 2,
            dash: Some((10, 6)),
        });
    }
    LineChart {
        title: "Largest |weight_A - weight_X| over all parameters (log scale)".into(),
        x_label: "mini-batch".into(),
        y_label: "largest parameter difference".into(),
        lines,
        log_y: true,
    }
}

/// The chart: each run's loss curves side by side, and below them the
/// divergence of all runs on a log scale.
pub fn write_plot(path: &Path, runs: &[(Kind, &History)]) -> Result<()> {
    let losses: Vec<LineChart> = runs.iter().map(|&(k, h)| loss_chart(k, h)).collect();
    let divergence = divergence_chart(runs);
    let rows: Vec<Vec<&LineChart>> = vec![losses.iter().collect(), vec![&divergence]];
    crate::util::plot::save_grid(path, 1200, 1100, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_skips_non_finite_values() {
        let v = [1.0, 3.0, f64::NAN, 5.0, f64::INFINITY, 7.0];
        let s = smoothed(v.into_iter(), 2);
        assert_eq!(
            s,
            [(2.0, 2.0), (3.0, 3.0), (4.0, 5.0), (5.0, 5.0), (6.0, 7.0)]
        );
        assert_eq!(smoothing_window(25_000), 200);
        assert_eq!(smoothing_window(125), 12);
        assert_eq!(smoothing_window(3), 1);
    }
}
