//! The tutorial's test step: overall and per-class accuracy of a network on
//! the test set (sharded over the ranks of a distributed run), the check
//! that saved weights' classes are the test set's, and the confusion matrix
//! as a picture.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::data::Split;
use crate::distributed::World;

/// Counts on one split: `confusion[truth][predicted]`, a row and a column
/// per class.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub classes: Vec<String>,
    pub confusion: Vec<Vec<i64>>,
}

impl Evaluation {
    pub fn total(&self) -> i64 {
        self.confusion.iter().flatten().sum()
    }

    pub fn correct(&self) -> i64 {
        (0..self.confusion.len())
            .map(|c| self.confusion[c][c])
            .sum()
    }

    /// Overall accuracy in percent.
    pub fn accuracy(&self) -> f64 {
        100.0 * self.correct() as f64 / self.total().max(1) as f64
    }

    /// Accuracy per true class in percent; `None` for a class with no images.
    pub fn per_class(&self) -> Vec<Option<f64>> {
        (0..self.confusion.len())
            .map(|c| {
                let total: i64 = self.confusion[c].iter().sum();
                (total > 0).then(|| 100.0 * self.confusion[c][c] as f64 / total as f64)
            })
            .collect()
    }

    /// The tutorial's lines: overall accuracy (floored to an integer, as
    /// `100 * correct // total` does), then one line per class.
    pub fn text(&self) -> String {
        let mut out = format!(
            "Accuracy of the network on the {} test images: {} %",
            self.total(),
            100 * self.correct() / self.total().max(1)
        );
        for (name, acc) in self.classes.iter().zip(self.per_class()) {
            let acc = acc.map_or("n/a (no test images)".to_string(), |a| format!("{a:.1} %"));
            out.push_str(&format!("\nAccuracy for class: {name:5} is {acc}"));
        }
        out
    }

    /// The fields every JSON summary carries.
    pub fn json_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let per_class: serde_json::Map<String, serde_json::Value> = self
            .classes
            .iter()
            .zip(self.per_class())
            .map(|(n, a)| (n.to_string(), json!(a)))
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("accuracy".into(), json!(self.accuracy()));
        m.insert("correct".into(), json!(self.correct()));
        m.insert("total".into(), json!(self.total()));
        m.insert("per_class_accuracy".into(), json!(per_class));
        m.insert("confusion".into(), json!(self.confusion));
        m
    }
}

/// Predicted classes for `images`, in batches, without building a graph.
pub fn predict_classes(net: &impl Module, images: &Tensor, batch_size: i64) -> Tensor {
    tch::no_grad(|| {
        let n = images.size()[0];
        let preds: Vec<Tensor> = (0..n)
            .step_by(batch_size as usize)
            .map(|start| {
                let len = batch_size.min(n - start);
                net.forward(&images.narrow(0, start, len)).argmax(1, false)
            })
            .collect();
        Tensor::cat(&preds, 0)
    })
}

/// Runs `net` over `split` and counts right and wrong answers per class
/// (`net` has one output per class of the split).
pub fn evaluate(net: &impl Module, split: &Split, batch_size: i64) -> Evaluation {
    let k = split.classes.len() as i64;
    let preds = predict_classes(net, &split.images, batch_size);
    confusion(split, &(&split.labels * k + preds))
}

/// The confusion matrix from `cells` (truth × classes + prediction, one per image).
fn confusion(split: &Split, cells: &Tensor) -> Evaluation {
    let k = split.classes.len() as i64;
    // One bincount over truth*k+pred fills the confusion matrix in one sync.
    let cells = cells.bincount::<Tensor>(None, k * k).to_device(Device::Cpu);
    let cells =
        Vec::<i64>::try_from(&cells.to_kind(Kind::Int64)).expect("bincount gives k*k counts");
    Evaluation {
        classes: split.classes.clone(),
        confusion: cells.chunks(k as usize).map(<[i64]>::to_vec).collect(),
    }
}

/// [`evaluate`] shared out over a distributed run's ranks: rank r runs the
/// batches r, r + world size, …, of the same batches one process runs, and
/// the ranks' confusion matrices are summed, so every rank gets the same
/// counts as one process on the same weights. Without `world`, [`evaluate`].
pub fn evaluate_sharded(
    net: &impl Module,
    split: &Split,
    batch_size: i64,
    world: Option<&World>,
) -> Result<Evaluation> {
    let Some(world) = world else {
        return Ok(evaluate(net, split, batch_size));
    };
    let k = split.classes.len() as i64;
    let n = split.len() as i64;
    let starts = (0..n).step_by(batch_size as usize);
    let mine: Vec<Tensor> = tch::no_grad(|| {
        starts
            .skip(world.rank as usize)
            .step_by(world.size as usize)
            .map(|start| {
                let len = batch_size.min(n - start);
                let preds = net
                    .forward(&split.images.narrow(0, start, len))
                    .argmax(1, false);
                split.labels.narrow(0, start, len) * k + preds
            })
            .collect()
    });
    let cells = match mine.is_empty() {
        true => Tensor::zeros([0], (Kind::Int64, split.labels.device())),
        false => Tensor::cat(&mine, 0),
    };
    let mut local = confusion(split, &cells);
    let counts: Vec<i64> = local.confusion.iter().flatten().copied().collect();
    let counts = Tensor::from_slice(&counts).to_device(world.device);
    world.all_reduce_sum(&counts, "evaluation's all-reduce")?;
    let counts = Vec::<i64>::try_from(&counts.to_device(Device::Cpu))
        .context("the summed confusion matrix")?;
    local.confusion = counts.chunks(k as usize).map(<[i64]>::to_vec).collect();
    Ok(local)
}

/// Errors, naming the differences, unless the weights' classes are the
/// test set's (same names, same order).
pub fn check_classes(
    weights: &Path,
    model: &[String],
    data: &[String],
    source: &str,
) -> Result<()> {
    if model == data {
        return Ok(());
    }
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|c| !b.contains(c)).cloned().collect()
    };
    let (theirs, ours) = (only(model, data), only(data, model));
    if theirs.is_empty() && ours.is_empty() && model.len() == data.len() {
        bail!(
            "{} was trained on the classes of {source} in another order ({} against {})",
            weights.display(),
            model.join(", "),
            data.join(", ")
        );
    }
    let mut differences = vec![];
    if !theirs.is_empty() {
        differences.push(format!("only in the weights: {}", theirs.join(", ")));
    }
    if !ours.is_empty() {
        differences.push(format!("only in the data: {}", ours.join(", ")));
    }
    bail!(
        "{} was trained on other classes than those of {source}: {}",
        weights.display(),
        differences.join("; ")
    )
}

/// Draws `eval`'s confusion matrix: one row per true class, one column per
/// predicted class, each cell its count, shaded by its share of the row.
pub fn draw_confusion(path: &Path, eval: &Evaluation) -> Result<()> {
    use crate::util::plot::{write_png, FONT};
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    // Ten classes get the tutorial-sized 58-pixel cells; more get smaller
    // ones, with smaller text, down to 16 pixels.
    let n = eval.classes.len() as i32;
    let cell = (580 / n.max(1)).clamp(16, 58);
    let font = |size: i32| (size * cell / 58).max(9);
    let side = n * cell;
    let (left, top) = (120, 70);
    // Wide enough for the title however few the classes.
    let (width, height) = ((left + side + 20).max(560), top + side + 70);
    write_png(path, width as u32, height as u32, |root| {
        let err =
            |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("cannot draw {}: {e}", path.display());
        root.fill(&WHITE).map_err(err)?;
        let centred = |size: i32, colour: &RGBColor| {
            (FONT, size)
                .into_font()
                .color(colour)
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        root.draw(&Text::new(
            format!(
                "Confusion matrix: {} test images, accuracy {:.2} %",
                eval.total(),
                eval.accuracy()
            ),
            (width / 2, 22),
            centred(20, &BLACK),
        ))
        .map_err(err)?;
        root.draw(&Text::new(
            "predicted class",
            (left + side / 2, top + side + 50),
            centred(18, &BLACK),
        ))
        .map_err(err)?;
        root.draw(&Text::new(
            "true class",
            (18, top + side / 2),
            centred(18, &BLACK).transform(FontTransform::Rotate270),
        ))
        .map_err(err)?;
        let base = RGBColor(31, 119, 180);
        for (t, row) in eval.confusion.iter().enumerate() {
            let row_total = row.iter().sum::<i64>().max(1) as f64;
            let y = top + t as i32 * cell;
            root.draw(&Text::new(
                eval.classes[t].as_str(),
                (left - 8, y + cell / 2),
                (FONT, font(16).max(12))
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(err)?;
            for (p, &count) in row.iter().enumerate() {
                let x = left + p as i32 * cell;
                let share = count as f64 / row_total;
                let mix = |c: u8| (255.0 - share * (255.0 - c as f64)).round() as u8;
                let fill = RGBColor(mix(base.0), mix(base.1), mix(base.2));
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))
                .map_err(err)?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    count.to_string(),
                    (x + cell / 2, y + cell / 2),
                    centred(font(15), &ink),
                ))
                .map_err(err)?;
            }
        }
        for (p, name) in eval.classes.iter().enumerate() {
            root.draw(&Text::new(
                name.as_str(),
                (left + p as i32 * cell + cell / 2, top + side + 16),
                centred(font(16).max(10), &BLACK),
            ))
            .map_err(err)?;
        }
        let grid = RGBColor(200, 200, 200);
        for i in 0..=n {
            let d = i * cell;
            root.draw(&PathElement::new(
                vec![(left, top + d), (left + side, top + d)],
                grid,
            ))
            .map_err(err)?;
            root.draw(&PathElement::new(
                vec![(left + d, top), (left + d, top + side)],
                grid,
            ))
            .map_err(err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_text_follow_the_tutorial() {
        let mut confusion = vec![vec![0; 10]; 10];
        confusion[0][0] = 2; // plane: 2 of 3 right
        confusion[0][1] = 1;
        confusion[3][3] = 1; // cat: 1 of 1
        let e = Evaluation {
            classes: crate::data::cifar::classes(),
            confusion,
        };
        assert_eq!((e.correct(), e.total()), (3, 4));
        assert_eq!(e.accuracy(), 75.0);
        let text = e.text();
        assert!(
            text.starts_with("Accuracy of the network on the 4 test images: 75 %"),
            "{text}"
        );
        assert!(
            text.contains("\nAccuracy for class: plane is 66.7 %"),
            "{text}"
        );
        assert!(
            text.contains("\nAccuracy for class: car   is n/a (no test images)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nAccuracy for class: cat   is 100.0 %"),
            "{text}"
        );
    }

    #[test]
    fn evaluate_counts_a_known_net() {
        // A "net" that always answers class 2.
        #[derive(Debug)]
        struct Always2;
        impl Module for Always2 {
            fn forward(&self, xs: &Tensor) -> Tensor {
                let n = xs.size()[0];
                Tensor::zeros([n, 10], (Kind::Float, xs.device())).index_fill(
                    1,
                    &Tensor::from(2i64),
                    1.0,
                )
            }
        }
        let split = Split {
            images: Tensor::zeros([5, 3, 32, 32], (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[2i64, 2, 1, 0, 2]),
            md5: None,
            classes: crate::data::cifar::classes(),
        };
        let e = evaluate(&Always2, &split, 2);
        assert_eq!(e.correct(), 3);
        assert_eq!(e.confusion[1][2], 1);
        assert_eq!(e.per_class()[2], Some(100.0));
        assert_eq!(e.per_class()[0], Some(0.0));
    }

    #[test]
    fn class_lists_must_match() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let w = Path::new("w.safetensors");
        check_classes(w, &names(&["a", "b"]), &names(&["a", "b"]), "d").unwrap();
        let err = check_classes(w, &names(&["a", "b"]), &names(&["a", "c"]), "d")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only in the weights: b; only in the data: c"),
            "{err}"
        );
        let err = check_classes(w, &names(&["a", "b"]), &names(&["b", "a"]), "d")
            .unwrap_err()
            .to_string();
        assert!(err.contains("in another order"), "{err}");
    }
}
