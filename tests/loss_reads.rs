//! `train::train` reading its losses in batches, as it does on a GPU, on the
//! CPU. It runs in a process of its own (its own file) with one test,
//! because libtorch's CPU settings are process-wide and runs compared bit for
//! bit must not see them change.

use tch::{Device, Kind, Tensor};
use tch_cifar::cli::train::{train, Control, Interrupts, TrainStats};
use tch_cifar::data::Split;
use tch_cifar::nets::tutorial::Model;
use tch_cifar::train::checkpoint::{Meta, Position, Saver};
use tch_cifar::train::optim::Sgd;
use tch_cifar::train::settings::Settings;
use tch_cifar::util::report::Reporter;
use tch_cifar::util::rng::with_torch_rng;

struct Run {
    /// The error's text has the checkpoint folder replaced by `DIR`.
    result: Result<TrainStats, String>,
    weights: Tensor,
    checkpoints: Vec<String>,
}

/// Trains 2 epochs of 10 steps on 40 random images from seed 3, reading the
/// losses every `read_every` steps, logging every 3 steps and saving a
/// checkpoint every 4 and after each epoch.
fn run(read_every: usize, lr: f64) -> Run {
    let (images, labels) = with_torch_rng(Some(5), || {
        (
            Tensor::randn([40, 3, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randint(10, [40], (Kind::Int64, Device::Cpu)),
        )
    });
    let train_set = Split {
        images,
        labels,
        md5: None,
        classes: tch_cifar::data::cifar::classes(),
    };
    let recipe = Settings {
        seed: 3,
        epochs: 2,
        lr,
        log_every: 3,
        ..Settings::tutorial(3)
    };
    let cpu = recipe.cpu_settings();
    let meta = Meta::new(recipe.clone(), "cpu".into(), 40, None);
    let dir = tempfile::tempdir().unwrap();
    let interrupts = Interrupts::new();
    let mut control = Control {
        start: Position::START,
        saver: Saver::new(dir.path().to_path_buf(), 100, meta, None),
        every_epoch: true,
        every: Some(4),
        interrupts: &interrupts,
        read_losses_every: read_every,
        resume_command: String::new(),
    };
    let _training = cpu.apply();
    let model = Model::new(Device::Cpu, Some(3));
    let mut opt = Sgd::new(&model, lr, 0.9);
    let result = train(
        &model,
        &mut opt,
        &train_set,
        &recipe,
        &mut control,
        &mut Reporter::new(true),
    );
    let mut checkpoints: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    checkpoints.sort();
    let folder = dir.path().to_string_lossy().into_owned();
    Run {
        result: result.map_err(|e| format!("{e:#}").replace(&folder, "DIR")),
        weights: model.flat.copy(),
        checkpoints,
    }
}

#[test]
fn losses_read_in_batches_change_nothing() {
    let each = run(1, 0.01);
    let a = each.result.as_ref().unwrap();
    assert_eq!(a.steps, 20);
    assert_eq!(a.running_losses.len(), 6, "{:?}", a.running_losses);
    // Steps 4, 8, 10 (epoch 1's end), 12, 16 and 20.
    assert_eq!(each.checkpoints.len(), 6, "{:?}", each.checkpoints);
    // The marks (log lines every 3 steps, saves every 4, epoch ends) force
    // reads at most 3 steps apart: a buffer of 7 never fills, one of 2 fills
    // between marks (steps 1-2 of each epoch, say), so both ways are run.
    for read_every in [2, 7] {
        let batched = run(read_every, 0.01);
        let b = batched.result.unwrap();
        assert_eq!(
            a.running_losses, b.running_losses,
            "read every {read_every}"
        );
        assert!(
            each.weights.equal(&batched.weights),
            "read every {read_every}"
        );
        assert_eq!(
            each.checkpoints, batched.checkpoints,
            "read every {read_every}"
        );
    }

    // A diverging run stops at its first non-finite loss, named the same
    // way, with the same checkpoints behind it, however the losses are read.
    // At lr 300 that is step 5, just after the first checkpoint.
    let each = run(1, 300.0);
    let batched = run(7, 300.0);
    let (a, b) = (each.result.unwrap_err(), batched.result.unwrap_err());
    assert!(a.contains("training diverged"), "{a}");
    assert!(a.contains("the last good checkpoint is DIR/"), "{a}");
    assert_eq!(a, b);
    assert_eq!(each.checkpoints, batched.checkpoints);
}
