//! A control for `compare-losses`: how far do two trainings drift apart
//! when they differ only in float rounding?
//!
//! ```sh
//! cargo run --release --example rounding_control -- DATA_DIR [SEED]
//! ```
//!
//! It trains model A (logits + `cross_entropy_for_logits`, the tutorial's
//! recipe, one thread) twice from the same weights on the same mini-batches;
//! the second copy gets the four images of every mini-batch in reverse
//! order. In exact arithmetic the two updates are equal (a mean does not
//! care about order); in float32 they round differently. The agreement of
//! their test predictions is the yardstick for A against B in
//! `compare-losses`.

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};
use tch_cifar::compare::{Contender, Head};
use tch_cifar::data;
use tch_cifar::device::{CpuConv, CpuSettings};
use tch_cifar::evaluate::predict_classes;
use tch_cifar::train::epoch_batches;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: rounding_control DATA_DIR [SEED]")?;
    let seed: u64 = match args.next() {
        Some(s) => s.parse().with_context(|| format!("seed `{s}`"))?,
        None => 1,
    };
    // compare-losses' settings for this recipe: one thread and the
    // convolution kernel that `--cpu-conv auto` picks; evaluation as there.
    let training = CpuSettings {
        threads: 1,
        conv: CpuConv::Auto.resolve(4, 1),
    }
    .apply();
    let dir = data::locate(dir.as_ref()).context("no CIFAR-10 batch files there")?;
    let train = data::load_train(&dir, Device::Cpu)?;
    let new = || Contender::new(Head::Logits, Device::Cpu, seed, 0.001, 0.9);
    let (mut a, mut reversed) = (new(), new());
    let (mut step, mut max_diff) = (0, 0.0f64);
    for epoch in 0..2 {
        for index in epoch_batches(seed, epoch, train.len(), 4, Device::Cpu) {
            step += 1;
            let (x, y) = train.select(&index);
            let (xr, yr) = train.select(&index.flip([0]));
            let (la, ga) = a.loss_and_gradient(&x, &y);
            let (lr, gr) = reversed.loss_and_gradient(&xr, &yr);
            a.update(step, la, &ga);
            reversed.update(step, lr, &gr);
            max_diff = max_diff.max((la - lr).abs());
            if step % 2000 == 0 {
                println!("step {step:5}: max |loss - loss_reversed| so far {max_diff:.1e}");
            }
        }
    }
    drop(train);
    drop(training);
    let test = data::load_test(&dir, Device::Cpu)?;
    let pa = predict_classes(&a.net, &test.images, 1000);
    let pr = predict_classes(&reversed.net, &test.images, 1000);
    let count = |t: Tensor| t.sum(Kind::Int64).int64_value(&[]);
    let n = test.len() as f64 / 100.0;
    println!(
        "accuracy: A {:.2} %, A on reversed mini-batches {:.2} %; same prediction on {:.2} % \
         of the {} test images",
        count(pa.eq_tensor(&test.labels)) as f64 / n,
        count(pr.eq_tensor(&test.labels)) as f64 / n,
        count(pa.eq_tensor(&pr)) as f64 / n,
        test.len()
    );
    Ok(())
}
