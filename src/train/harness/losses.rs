//! Reading the steps' losses on the host, one step at a time on the CPU,
//! a few hundred steps in one copy on a GPU.

use anyhow::{Context, Result};
use tch::{Device, Tensor};

/// How many steps' losses the harness gathers before it reads them on the
/// host: 1 on the CPU, a few hundred on a GPU.
///
/// Reading a loss (PyTorch's `loss.item()`) makes the host wait until the
/// device has finished the step. On the CPU the step is already finished.
/// On a GPU the host would stop queueing work on every step and wait for the
/// device instead, so the losses stay in a buffer on the device and come back
/// in one copy. A non-finite loss still stops the run at the step it names,
/// a few hundred steps later at most and before anything is saved.
pub fn read_losses_every(device: Device) -> usize {
    match device {
        Device::Cpu => 1,
        _ => 256,
    }
}

/// One step's losses, read on the host.
pub struct StepLosses {
    pub epoch: u64,
    pub step: u64,
    pub global_step: u64,
    /// One value per loss the step returned (the tutorial's: one).
    pub values: Vec<f64>,
}

/// The losses of the steps not yet read on the host. Whatever the batching,
/// each loss reads as the same float, in step order.
pub struct PendingLosses {
    capacity: usize,
    /// One row per step, on the device, made at the first push in the
    /// losses' dtype and length; only when `capacity > 1`.
    buffer: Option<Tensor>,
    /// `(epoch, step, global step)` of each pending row.
    steps: Vec<(u64, u64, u64)>,
    /// The losses read at once (without a buffer), one `Vec` per step.
    read: Vec<Vec<f64>>,
}

impl PendingLosses {
    pub fn new(capacity: usize) -> PendingLosses {
        let capacity = capacity.max(1);
        PendingLosses {
            capacity,
            buffer: None,
            steps: Vec::with_capacity(capacity),
            read: Vec::with_capacity(capacity),
        }
    }

    pub fn push(&mut self, loss: &Tensor, epoch: u64, step: u64, global_step: u64) -> Result<()> {
        if self.capacity == 1 {
            let values = match (loss.dim(), loss.kind()) {
                (0, _) => Ok(vec![loss.double_value(&[])]),
                // Losses already read on the host (compare-losses').
                (1, tch::Kind::Double) => Vec::<f64>::try_from(loss),
                _ => Vec::<f64>::try_from(loss.reshape([-1]).to_kind(tch::Kind::Double)),
            }
            .context("cannot read the losses")?;
            self.read.push(values);
        } else {
            let row = loss.reshape([-1]);
            let buffer = self.buffer.get_or_insert_with(|| {
                Tensor::zeros(
                    [self.capacity as i64, row.size()[0]],
                    (row.kind(), row.device()),
                )
            });
            tch::no_grad(|| buffer.get(self.steps.len() as i64).copy_(&row));
        }
        self.steps.push((epoch, step, global_step));
        Ok(())
    }

    pub fn is_full(&self) -> bool {
        self.steps.len() >= self.capacity
    }

    /// Each pending step's losses, oldest first, emptying the queue (its
    /// vectors keep their room: this runs every step on the CPU).
    pub fn read(&mut self) -> Result<impl Iterator<Item = StepLosses> + '_> {
        if let Some(buffer) = &self.buffer {
            let pending = buffer.narrow(0, 0, self.steps.len() as i64);
            let rows: Vec<Vec<f64>> =
                Vec::try_from(pending.to_device(Device::Cpu).to_kind(tch::Kind::Double))
                    .context("cannot read the losses back from the device")?;
            self.read.extend(rows);
        }
        Ok(self.steps.drain(..).zip(self.read.drain(..)).map(
            |((epoch, step, global_step), values)| StepLosses {
                epoch,
                step,
                global_step,
                values,
            },
        ))
    }
}
