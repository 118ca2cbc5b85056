//! `tch-cifar export`: the Rust `Net`, traced into a TorchScript module that
//! Python runs with `torch.jit.load("model.pt")(images)`, and the weights
//! converted between safetensors and PyTorch's `.pth`.
//!
//! The module is traced (tch's `CModule::create_by_tracing`) from the very
//! `Net::forward` that `train` and `evaluate` use, on the CPU. Tracing keeps
//! the weights as constants of the graph, so the module takes any batch
//! size but has no `parameters()`: use `--pth` or `--safetensors` for
//! weights you want to load into Python's `Net` or train further.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use tch::nn::Module;
use tch::{CModule, Device, Kind, Tensor};

use crate::model::{with_torch_rng, Model};

/// What the exported module returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Head {
    /// `Net`'s output as is: one logit per class for each image.
    #[default]
    Logits,
    /// The softmax of the logits: each class's probability, summing to 1.
    Probabilities,
}

/// Export saved weights as TorchScript, `.pth` or safetensors.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("outputs")
        .required(true)
        .multiple(true)
        .args(["out", "pth", "safetensors"])
))]
pub struct ExportArgs {
    /// Weights to export: safetensors (from `train`) or a `.pth` from
    /// `torch.save(net.state_dict(), PATH)`.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Write a TorchScript module here, for `torch.jit.load` in Python or
    /// `CModule::load` in Rust. It takes a normalized `[N, 3, 32, 32]` f32
    /// batch on the CPU.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// What the TorchScript module returns (with --out).
    #[arg(long, value_enum, default_value_t = Head::Logits, requires = "out")]
    pub head: Head,
    /// Write the weights in `torch.save` format, for the tutorial's
    /// `net.load_state_dict(torch.load(PATH, weights_only=True))`.
    #[arg(long, value_name = "FILE")]
    pub pth: Option<PathBuf>,
    /// Write the weights as safetensors (e.g. to convert a `.pth`).
    #[arg(long, value_name = "FILE")]
    pub safetensors: Option<PathBuf>,
}

/// Traces `model` (on the CPU, weights frozen) into a TorchScript module
/// whose `forward` maps `[N, 3, 32, 32]` images to `[N, classes]` outputs.
pub fn trace(model: &mut Model, head: Head) -> Result<CModule> {
    ensure!(
        model.vs.device() == Device::Cpu,
        "export traces a model on the CPU"
    );
    // Tracing records weights as graph constants, which must not require grad.
    model.vs.freeze();
    let net = &model.net;
    let mut forward = |inputs: &[Tensor]| {
        let logits = net.forward(&inputs[0]);
        vec![match head {
            Head::Logits => logits,
            Head::Probabilities => logits.softmax(1, Kind::Float),
        }]
    };
    let example = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let module = CModule::create_by_tracing("Net", "forward", &[example], &mut forward)
        .context("tracing the Net failed")?;
    // The traced graph must compute what the Rust model computes, at
    // another batch size than the one traced.
    let probe = with_torch_rng(None, || {
        Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu))
    });
    let want = tch::no_grad(|| forward(std::slice::from_ref(&probe)).remove(0));
    let got = module
        .forward_ts(&[&probe])
        .context("running the traced module failed")?;
    let diff = (got - want).abs().max().double_value(&[]);
    ensure!(
        diff <= 1e-6,
        "the traced module differs from the Rust model by {diff}"
    );
    Ok(module)
}

/// `tch-cifar export`.
pub fn run(args: ExportArgs) -> Result<()> {
    // Every output is checked first, so that none is written if one can't be.
    for path in [&args.out, &args.pth, &args.safetensors]
        .into_iter()
        .flatten()
    {
        crate::fsutil::check_writable(path)?;
    }
    let mut model = Model::load(&args.weights, Device::Cpu)?;
    ensure!(
        model.is_finite(),
        "{} holds NaN or infinite weights (from a run that diverged?), which would export a \
         model whose every output is NaN",
        args.weights.display()
    );
    if let Some(out) = &args.out {
        let module = trace(&mut model, args.head)?;
        crate::fsutil::write_atomically(out, |tmp| {
            module
                .save(tmp)
                .with_context(|| format!("cannot write {}", out.display()))
        })?;
        println!(
            "wrote {} (TorchScript, returns {})",
            out.display(),
            match args.head {
                Head::Logits => "logits",
                Head::Probabilities => "probabilities",
            }
        );
    }
    if let Some(pth) = &args.pth {
        model.save_pth(pth)?;
        println!("wrote {} (torch.save state_dict)", pth.display());
    }
    if let Some(st) = &args.safetensors {
        model.save(st)?;
        println!("wrote {} (safetensors state_dict)", st.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traced_module_matches_the_model_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let mut model = Model::new(Device::Cpu, Some(11));
        let x = with_torch_rng(None, || {
            Tensor::randn([5, 3, 32, 32], (Kind::Float, Device::Cpu))
        });
        let logits = tch::no_grad(|| model.net.forward(&x));
        for head in [Head::Logits, Head::Probabilities] {
            trace(&mut model, head).unwrap().save(&path).unwrap();
            let loaded = CModule::load(&path).unwrap();
            let y = loaded.forward_ts(&[&x]).unwrap();
            let want = match head {
                Head::Logits => logits.shallow_clone(),
                Head::Probabilities => logits.softmax(1, Kind::Float),
            };
            assert_eq!(y.size(), [5, 10]);
            let diff = (&y - want).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "{head:?}: {diff}");
        }
    }
}
