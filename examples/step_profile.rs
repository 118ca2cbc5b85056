//! Where a training step's time goes, piece by piece, at a given thread
//! count and batch size: the measurements behind the choices in `optim.rs`
//! (one flat SGD update), `main.rs` (jemalloc), `train::Recipe::train_threads`
//! and `device::CpuConv::resolve`.
//!
//!     cargo run --release --example step_profile -- [THREADS] [BATCH_SIZE] [onednn|im2col]
//!
//! Random data of CIFAR-10's shape; each line is the mean of 3000 steps
//! after 200 warm-up steps.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::ValueEnum;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};
use tch_cifar::nets::tutorial::Model;
use tch_cifar::train::optim::Sgd;
use tch_cifar::util::device::{CpuConv, CpuSettings};

// The same allocator as the binary, so the figures match `train`'s.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn arg(n: usize, default: i64) -> Result<i64> {
    std::env::args().nth(n).map_or(Ok(default), |s| {
        s.parse()
            .with_context(|| format!("argument {n}: `{s}` is not a number"))
    })
}

fn main() -> Result<()> {
    let threads = arg(1, 1)? as i32;
    let bs = arg(2, 4)?;
    let conv = match std::env::args().nth(3) {
        None => CpuConv::Auto,
        Some(s) => CpuConv::from_str(&s, false).map_err(|e| anyhow::anyhow!("argument 3: {e}"))?,
    }
    .resolve(bs as u64, threads);
    let _settings = CpuSettings { threads, conv }.apply();
    let n_images = 50_000;
    let model = Model::new(Device::Cpu, Some(1));
    let mut sgd = Sgd::new(&model, 0.001, 0.9);
    let images = Tensor::randn([n_images, 3, 32, 32], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(10, [n_images], (Kind::Int64, Device::Cpu));
    let order = Tensor::randperm(n_images, (Kind::Int64, Device::Cpu));
    let batch = |i: i64| {
        let index = order.narrow(0, (i * bs) % (n_images - bs), bs);
        (
            images.index_select(0, &index),
            labels.index_select(0, &index),
        )
    };
    let steps = 3000;
    let time = |name: &str, f: &mut dyn FnMut(i64)| {
        (0..200).for_each(&mut *f);
        let start = Instant::now();
        (0..steps).for_each(&mut *f);
        let us = start.elapsed().as_secs_f64() * 1e6 / steps as f64;
        println!("{name:32} {us:8.1} us/step");
    };
    println!("threads {threads}, batch size {bs}, {conv} convolutions");
    time("select a mini-batch", &mut |i| drop(batch(i)));
    let (x, y) = batch(0);
    time("forward, no_grad", &mut |_| {
        drop(tch::no_grad(|| model.net.forward(&x)))
    });
    time("forward + loss", &mut |_| {
        drop(model.net.forward(&x).cross_entropy_for_logits(&y))
    });
    time("forward + loss + gradient", &mut |_| {
        drop(sgd.gradient(&model.net.forward(&x).cross_entropy_for_logits(&y)))
    });
    time("whole step (as in train)", &mut |i| {
        let (x, y) = batch(i);
        let loss = model.net.forward(&x).cross_entropy_for_logits(&y);
        sgd.step(&loss);
        let _ = loss.double_value(&[]);
    });
    Ok(())
}
