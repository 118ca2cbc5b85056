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

/// The networks whose class agreement `compare-losses` reports.
const AGREEING: [Role; 3] = [Role::A, Role::AReversed, Role::B];

/// The largest share (in percent) of the test images that one network
/// puts in one class, and that class: a network that has not learned
/// answers one class, or a few, for every image.
fn top_class_share(e: &Evaluation) -> (f64, usize) {
    let columns = (0..e.classes.len()).map(|c| e.confusion.iter().map(|row| row[c]).sum::<i64>());
    let (class, most) = columns
        .enumerate()
        .max_by_key(|&(c, n)| (n, std::cmp::Reverse(c)))
        .unwrap_or((0, 0));
    (100.0 * most as f64 / e.total().max(1) as f64, class)
}

/// Whether A, A' and B (`evals` in [`Role::ALL`] order) have learned
/// anything: each scores at least 1.5 times chance and spreads its answers
/// over the classes (no class gets half the images). Until they have,
/// agreement between them is no evidence: networks that answer one class
/// for every image agree on every image.
pub fn learned(evals: &[Evaluation]) -> bool {
    AGREEING.iter().all(|r| {
        let e = &evals[r.index()];
        let chance = 100.0 / e.classes.len().max(1) as f64;
        e.accuracy() >= 1.5 * chance && top_class_share(e).0 < 50.0
    })
}

/// The warning that replaces a bare agreement figure when the networks
/// have not [`learned`]; `advice` says how to train longer.
pub fn not_learned_warning(evals: &[Evaluation], advice: &str) -> String {
    let accuracies: Vec<String> = AGREEING
        .iter()
        .map(|r| format!("{} {:.2} %", r.letter(), evals[r.index()].accuracy()))
        .collect();
    let chance = 100.0 / evals[0].classes.len().max(1) as f64;
    let (share, class, role) = AGREEING
        .iter()
        .map(|r| {
            let (share, class) = top_class_share(&evals[r.index()]);
            (share, class, r)
        })
        .fold(
            (f64::MIN, 0, &Role::A),
            |m, x| if x.0 > m.0 { x } else { m },
        );
    format!(
        "Warning: the networks have not learned yet (test accuracy {}, chance {chance:.0} %; {} \
         answers {} for {share:.1} % of the images), so their agreement means nothing yet: \
         networks that give every image one class agree on every image. {advice}",
        accuracies.join(", "),
        role.letter(),
        evals[0].classes[class],
    )
}

/// The sentence that says what the A-B differences are: A and B are one
/// function, so they differ by rounding (which A' measures alone), unless
/// B skipped updates on a non-finite loss.
pub fn same_function_sentence(b_skipped: u64) -> String {
    if b_skipped == 0 {
        "A and B compute the same function (log(softmax(z)) is log_softmax(z) in exact \
         arithmetic): every difference between them above is rounding, as A' shows."
            .into()
    } else {
        format!(
            "A and B compute the same function (log(softmax(z)) is log_softmax(z) in exact \
             arithmetic), but B skipped {b_skipped} update{} where a probability underflowed to \
             0 and log(0) is -inf: from there on their differences are that failure, not \
             rounding.",
            if b_skipped == 1 { "" } else { "s" }
        )
    }
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

    /// A confusion matrix of ten classes, 10 images each, that answers
    /// `answer(truth, image)`.
    fn evaluation(answer: impl Fn(usize, usize) -> usize) -> Evaluation {
        let classes: Vec<String> = crate::data::CLASSES.iter().map(|c| c.to_string()).collect();
        let mut confusion = vec![vec![0i64; 10]; 10];
        for (truth, row) in confusion.iter_mut().enumerate() {
            for image in 0..10 {
                row[answer(truth, image)] += 1;
            }
        }
        Evaluation { classes, confusion }
    }

    #[test]
    fn networks_that_answer_one_class_have_not_learned() {
        let cat = evaluation(|_, _| 3);
        let good = evaluation(|truth, image| if image < 6 { truth } else { (truth + 1) % 10 });
        assert_eq!(top_class_share(&cat), (100.0, 3));
        assert!(learned(&[
            good.clone(),
            good.clone(),
            good.clone(),
            good.clone()
        ]));
        // One of A, A', B untrained is enough; C is A and not looked at.
        assert!(!learned(&[
            good.clone(),
            good.clone(),
            cat.clone(),
            good.clone()
        ]));
        assert!(learned(&[
            good.clone(),
            good.clone(),
            good.clone(),
            cat.clone()
        ]));
        // Accurate enough, but half the images in one class.
        let lopsided = evaluation(|truth, image| if image < 5 { 0 } else { truth });
        assert!(lopsided.accuracy() > 15.0);
        assert!(!learned(&[
            lopsided.clone(),
            good.clone(),
            good.clone(),
            good.clone()
        ]));
        // Near chance, however spread.
        let guess = evaluation(|truth, image| {
            if image == 0 {
                truth
            } else {
                (truth + image) % 10
            }
        });
        assert!(!learned(&[
            guess.clone(),
            guess.clone(),
            guess.clone(),
            guess
        ]));

        let all_cat = [cat.clone(), cat.clone(), cat.clone(), cat];
        let text = not_learned_warning(&all_cat, "Train longer.");
        assert!(
            text.starts_with(
                "Warning: the networks have not learned yet (test accuracy A 10.00 %, A' 10.00 \
                 %, B 10.00 %, chance 10 %; A answers cat for 100.0 % of the images)"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("agree on every image. Train longer."),
            "{text}"
        );
    }

    #[test]
    fn the_same_function_sentence_says_when_b_failed() {
        assert!(same_function_sentence(0).ends_with("is rounding, as A' shows."));
        assert!(same_function_sentence(1).contains("B skipped 1 update where"));
        assert!(same_function_sentence(7).contains("B skipped 7 updates where"));
    }

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
