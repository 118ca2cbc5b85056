//! Newton–Schulz in bfloat16 or float32 on the CPU: the measurements behind
//! `muon_recipe::NEWTON_SCHULZ_KIND` (docs/fast-recipe.md). For the six
//! filters of airbench94-muon (their gradients reshaped to rows × fan-in),
//! the time of one Muon update in each precision, and how far each
//! precision's result is from the float64 iteration's, with its singular
//! values' range.
//!
//!     cargo run --release --example newton_schulz -- [THREADS]
//!
//! Gradients are Gaussian; each time is the best of 20 updates after 5
//! warm-up ones.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};
use tch_cifar::train::optim::muon::{newton_schulz, Muon};
use tch_cifar::train::recipes::airbench::airbench94_muon::{
    MUON_LR, MUON_MOMENTUM, NEWTON_SCHULZ_STEPS,
};

/// airbench94-muon's filters: `[out, in, 3, 3]`.
const FILTERS: [[i64; 4]; 6] = [
    [64, 24, 3, 3],
    [64, 64, 3, 3],
    [256, 64, 3, 3],
    [256, 256, 3, 3],
    [256, 256, 3, 3],
    [256, 256, 3, 3],
];

fn main() -> Result<()> {
    let threads: i32 = std::env::args().nth(1).map_or(Ok(2), |s| {
        s.parse()
            .with_context(|| format!("THREADS: `{s}` is not a number"))
    })?;
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let grads: Vec<Tensor> = FILTERS.iter().map(|s| Tensor::randn(s, opts)).collect();
    println!("threads {threads}, {NEWTON_SCHULZ_STEPS} Newton–Schulz steps per filter");
    println!(
        "{:10} {:>14} {:>22} {:>18}",
        "precision", "update (ms)", "rel. error vs f64", "singular values"
    );
    for kind in [Kind::BFloat16, Kind::Float] {
        let params: Vec<Tensor> = FILTERS.iter().map(|s| Tensor::randn(s, opts)).collect();
        let mut muon = Muon::new(params, MUON_LR, MUON_MOMENTUM, NEWTON_SCHULZ_STEPS, kind);
        for _ in 0..5 {
            muon.update(&grads, 1.0);
        }
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            let start = Instant::now();
            muon.update(&grads, 1.0);
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
        }
        let (mut error, mut low, mut high) = (0.0f64, f64::INFINITY, 0.0f64);
        for g in &grads {
            let g = g.reshape([g.size()[0], -1]);
            let exact = newton_schulz(&g, NEWTON_SCHULZ_STEPS, Kind::Double);
            let x = newton_schulz(&g, NEWTON_SCHULZ_STEPS, kind).to_kind(Kind::Double);
            let e = (&x - &exact).norm().double_value(&[]) / exact.norm().double_value(&[]);
            error = error.max(e);
            // Wide: the singular values are the roots of X Xᵀ's eigenvalues.
            let s = x.matmul(&x.tr()).linalg_eigvalsh("L").sqrt();
            low = low.min(s.min().double_value(&[]));
            high = high.max(s.max().double_value(&[]));
        }
        println!(
            "{:10} {best:14.2} {error:22.4} {:>18}",
            format!("{kind:?}"),
            format!("{low:.2} .. {high:.2}")
        );
    }
    Ok(())
}
