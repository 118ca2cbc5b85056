//! Data-parallel training on libtorch's own distributed engine, c10d, as
//! PyTorch's `DistributedDataParallel` and `DistributedSampler` do it:
//!
//! * [`init`] joins the run that [`Launch`] describes (torchrun's
//!   environment): a c10d `TCPStore` rendezvous and a process group
//!   (Gloo on the CPU). Like `torch.distributed.init_process_group`, it
//!   sets this process's one [`World`], which [`world`] returns. It is
//!   [`rendezvous`], which reaches the store (where rank 0's choices reach
//!   the others before the recipe is built), then [`Rendezvous::join`].
//!   Under torchrun the store is its agent's, which outlives a worker
//!   group: each attempt's keys go under a prefix of their own, and the
//!   launch's own keys ([`World::set_run_value`]) carry over to a restart.
//! * [`sync_gradients`], called by the optimizers after backward, sums
//!   every rank's gradients in buckets, one all-reduce per bucket, and
//!   averages them (or keeps the sum, for a summed loss). The step's loss
//!   and each rank's stop request travel in the last bucket, so every rank
//!   sees the global batch's loss and all stop at the same step.
//! * [`local_share`] is `DistributedSampler`'s strided share of one global
//!   mini-batch; [`World::broadcast`] copies rank 0's tensors to every rank.
//! * A heartbeat in the store names the rank that died or hangs when a
//!   collective fails, instead of leaving every other rank waiting.
//!
//! Without a [`World`] every function here does nothing: one process.

pub mod c10d;
pub mod launch;
mod nccl;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use self::c10d::{Group, Store};
pub use self::launch::Launch;

/// `--dist-backend`: the c10d process group that carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Gloo: CPU tensors over TCP (PyTorch's default for the CPU).
    Gloo,
    /// NCCL: CUDA tensors, GPU to GPU (PyTorch's default for CUDA).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// PyTorch's choice for a device: NCCL on CUDA, Gloo on the CPU.
    pub fn for_device(device: Device) -> Backend {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }
}

/// How a recipe's loss combines the images of its mini-batch, which says
/// how the ranks' gradients combine into the global batch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReduction {
    /// The mean over the batch (`CrossEntropyLoss()`): gradients and losses
    /// are averaged over the ranks, as DDP does.
    Mean,
    /// The sum over the batch (airbench94's `reduction="none"` + `.sum()`):
    /// they are summed, which is what a DDP user gets by scaling the loss
    /// by the world size.
    Sum,
}

/// `--dist-timeout`'s default: how long a collective or the rendezvous waits
/// for a rank before the run fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// DDP's default bucket size (`bucket_cap_mb=25`).
const BUCKET_BYTES: i64 = 25 << 20;

/// How often each rank tells the store it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// This process's place in a distributed run, and its connections.
pub struct World {
    pub rank: i64,
    pub size: i64,
    /// The ranks on this machine.
    pub local_size: i64,
    pub backend: Backend,
    /// Where this rank's tensors are, and so the collectives' buffers.
    pub device: Device,
    group: Group,
    /// Heartbeats, failure reports and the run's keys, on a connection of
    /// their own whose operations give up quickly (the main one waits
    /// `timeout`), without the attempt's prefix.
    monitor: Arc<Store>,
    /// The attempt's prefix of the heartbeat and failure keys.
    prefix: String,
    /// Holds the rendezvous (and, on rank 0 without torchrun, hosts it).
    store: Store,
    timeout: Duration,
    reduction: AtomicU8,
    /// This rank was asked to stop (SIGINT/SIGTERM), sent with the next step.
    stop_requested: AtomicBool,
    /// Some rank asked to stop in the last step: every rank stops after it.
    stop_agreed: AtomicBool,
    /// The first collective that failed inside a step, for the harness.
    failure: Mutex<Option<anyhow::Error>>,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The run this process is a rank of, once [`init`] has joined it.
pub fn world() -> Option<&'static World> {
    WORLD.get()
}

/// Whether this process speaks for the run: rank 0, or the only process.
pub fn is_main() -> bool {
    world().is_none_or(|w| w.rank == 0)
}

/// `key` of the worker group whose keys go under `prefix` (the attempt's,
/// under torchrun).
fn attempt_key(prefix: &str, key: &str) -> String {
    match prefix {
        "" => key.to_string(),
        prefix => format!("{prefix}/{key}"),
    }
}

fn heartbeat_key(prefix: &str, rank: i64) -> String {
    attempt_key(prefix, &format!("tch-cifar/heartbeat/{rank}"))
}

fn failed_key(prefix: &str, rank: i64) -> String {
    attempt_key(prefix, &format!("tch-cifar/failed/{rank}"))
}

/// A key of the whole launch rather than of one worker group: under
/// torchrun it outlives the restarts, in the agent's store.
fn run_key(key: &str) -> String {
    format!("tch-cifar/run/{key}")
}

/// SIGPIPE blocked in this thread, and so in every thread started while it
/// is (threads inherit the mask): gloo writes to its sockets with `writev`
/// and handles `EPIPE`, counting on SIGPIPE being ignored, as Python ignores
/// it. Here `main` restores its default action, which would kill a rank
/// whose peer died mid-write instead of letting it report the lost rank.
struct SigpipeBlocked(libc::sigset_t);

impl SigpipeBlocked {
    fn new() -> SigpipeBlocked {
        // SAFETY: plain signal-mask calls on sets they initialize.
        unsafe {
            let mut old = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &sigpipe(), &mut old);
            SigpipeBlocked(old)
        }
    }
}

impl Drop for SigpipeBlocked {
    fn drop(&mut self) {
        let set = sigpipe();
        let none = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as above. A SIGPIPE this thread raised meanwhile is taken
        // off first, so that unblocking it does not kill the process.
        unsafe {
            libc::sigtimedwait(&set, std::ptr::null_mut(), &none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// The signal set of SIGPIPE alone.
fn sigpipe() -> libc::sigset_t {
    // SAFETY: initializes the set before adding to it.
    unsafe {
        let mut set = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

/// Joins the run `launch` describes on `backend` for tensors on `device`,
/// waiting up to `timeout` for every rank, and makes it this process's
/// [`World`]: [`rendezvous`], then [`Rendezvous::join`].
pub fn init(
    launch: &Launch,
    backend: Backend,
    device: Device,
    timeout: Duration,
) -> Result<&'static World> {
    rendezvous(launch, timeout)?.join(backend, device)
}

/// A rank that has reached the run's store but not yet formed its process
/// group: what the ranks must agree on before they can build their recipe
/// (which checkpoint to go on from) travels through the store.
pub struct Rendezvous {
    launch: Launch,
    store: Store,
    monitor: Arc<Store>,
    timeout: Duration,
}

/// Reaches the store of the run `launch` describes (hosting it on rank 0
/// without torchrun), waiting up to `timeout`, and starts this rank's
/// heartbeat there.
pub fn rendezvous(launch: &Launch, timeout: Duration) -> Result<Rendezvous> {
    // The threads c10d starts from here on never die of SIGPIPE.
    let _sigpipe = SigpipeBlocked::new();
    let Launch {
        rank, world_size, ..
    } = *launch;
    // As in PyTorch, TORCH_CPP_LOG_LEVEL brings libtorch's own lines back.
    if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
        c10d::quiet_cpp_logs();
    }
    let host = launch.master_addr.as_str();
    let port = launch.master_port;
    let is_server = rank == 0 && !launch.agent_store;
    let where_ = format!("{host}:{port}");
    let store = Store::connect(
        host,
        port,
        world_size,
        is_server,
        timeout,
        &launch.store_prefix,
    )
    .map_err(|err| {
        if is_server {
            err.context(format!(
                "rank 0 cannot host the rendezvous store on {where_} (MASTER_ADDR:MASTER_PORT): \
                 is the port in use? Pick a free MASTER_PORT"
            ))
        } else {
            err.context(format!(
                "rank {rank} cannot reach the rendezvous store on {where_} \
                 (MASTER_ADDR:MASTER_PORT) within {} s",
                timeout.as_secs()
            ))
        }
    })?;
    // Without the attempt's prefix: its keys name it themselves, and the
    // run's own keys outlive a restart of the worker group.
    let monitor = Store::connect(host, port, world_size, false, Duration::from_secs(5), "")
        .with_context(|| format!("rank {rank} cannot open a second connection to {where_}"))?;
    let monitor = Arc::new(monitor);
    let prefix = launch.store_prefix.clone();
    monitor.set(
        &heartbeat_key(&prefix, rank),
        now_ms().to_string().as_bytes(),
    )?;
    spawn_heartbeat(Arc::clone(&monitor), heartbeat_key(&prefix, rank));
    let _ = REPORTS.set((Arc::clone(&monitor), failed_key(&prefix, rank)));
    Ok(Rendezvous {
        launch: launch.clone(),
        store,
        monitor,
        timeout,
    })
}

impl Rendezvous {
    pub fn rank(&self) -> i64 {
        self.launch.rank
    }

    /// Rank 0's `mine`, on every rank ([`World::rank0_value`]).
    pub fn rank0_value(&self, key: &str, mine: &str) -> Result<String> {
        rank0_value(&self.store, self.launch.rank, key, mine)
    }

    /// The value of the run's `key` ([`World::set_run_value`]), if an
    /// earlier worker group of this launch set it.
    pub fn run_value(&self, key: &str) -> Result<Option<String>> {
        let value = self.monitor.try_get(&run_key(key))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Forms the process group on `backend` for tensors on `device`, and
    /// makes it this process's [`World`].
    pub fn join(self, backend: Backend, device: Device) -> Result<&'static World> {
        // The threads gloo starts never die of SIGPIPE.
        let _sigpipe = SigpipeBlocked::new();
        let Rendezvous {
            launch,
            store,
            monitor,
            timeout,
        } = self;
        let Launch {
            rank, world_size, ..
        } = launch;
        // On loopback, Gloo's sockets stay there too; elsewhere they bind as
        // torch.distributed binds them (GLOO_SOCKET_IFNAME, else the host name).
        let bind = launch.is_loopback().then_some("127.0.0.1");
        let interfaces = std::env::var("GLOO_SOCKET_IFNAME")
            .ok()
            .filter(|names| !names.is_empty());
        let group = match backend {
            Backend::Gloo => Group::gloo(
                &store,
                rank,
                world_size,
                timeout,
                bind,
                interfaces.as_deref(),
            ),
            Backend::Nccl => nccl::group(&store, rank, world_size, timeout),
        };
        let group = group.with_context(|| {
            format!(
                "rank {rank} of {world_size}: the {} process group did not form within {} s \
                 (are all {world_size} ranks started?)",
                backend.name(),
                timeout.as_secs()
            )
        })?;
        let world = World {
            rank,
            size: world_size,
            local_size: launch.local_world_size,
            backend,
            device,
            group,
            monitor,
            prefix: launch.store_prefix,
            store,
            timeout,
            reduction: AtomicU8::new(0),
            stop_requested: AtomicBool::new(false),
            stop_agreed: AtomicBool::new(false),
            failure: Mutex::new(None),
        };
        if WORLD.set(world).is_err() {
            bail!("this process has joined a distributed run already");
        }
        Ok(WORLD.get().expect("set above"))
    }
}

/// Rank 0's `mine` under `key`, through `store`: rank 0 publishes it, the
/// others wait for it (up to the store's timeout, `--dist-timeout`).
fn rank0_value(store: &Store, rank: i64, key: &str, mine: &str) -> Result<String> {
    let key = format!("tch-cifar/rank0/{key}");
    if rank == 0 {
        store.set(&key, mine.as_bytes())?;
        return Ok(mine.to_string());
    }
    let bytes = store
        .get(&key)
        .with_context(|| format!("rank {rank} did not get rank 0's {key}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Where this rank tells the others why it fails: the monitor's
/// connection and this rank's key there, once it has reached the store.
static REPORTS: OnceLock<(Arc<Store>, String)> = OnceLock::new();

/// Tells the other ranks why this one is about to fail, so that their
/// errors name it and its reason rather than a lost connection. Does
/// nothing before the store is reached, or without a distributed run.
pub fn report_failure(err: &anyhow::Error) {
    if let Some((monitor, key)) = REPORTS.get() {
        let message = format!("{err:#}");
        let _ = monitor.set(key, message.as_bytes());
    }
}

/// Tells the store this rank is alive under `key`, every
/// [`HEARTBEAT_EVERY`], until the process ends.
fn spawn_heartbeat(store: Arc<Store>, key: String) {
    std::thread::spawn(move || loop {
        std::thread::sleep(HEARTBEAT_EVERY);
        if store.set(&key, now_ms().to_string().as_bytes()).is_err() {
            return;
        }
    });
}

/// Milliseconds since the Unix epoch: a heartbeat's value.
fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl World {
    /// Sets how [`sync_gradients`] combines the ranks' gradients.
    pub fn set_reduction(&self, reduction: LossReduction) {
        let code = match reduction {
            LossReduction::Mean => 0,
            LossReduction::Sum => 1,
        };
        self.reduction.store(code, Ordering::Relaxed);
    }

    fn reduction(&self) -> LossReduction {
        match self.reduction.load(Ordering::Relaxed) {
            0 => LossReduction::Mean,
            _ => LossReduction::Sum,
        }
    }

    /// Asks every rank to stop after the next step (this rank had a signal).
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }

    /// Whether some rank asked to stop in the step just done.
    pub fn stop_agreed(&self) -> bool {
        self.stop_agreed.load(Ordering::SeqCst)
    }

    /// The error of a collective that failed inside the last step.
    pub fn take_failure(&self) -> Option<anyhow::Error> {
        self.failure.lock().expect("not poisoned").take()
    }

    /// Sums `tensor` over the ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &Tensor, what: &str) -> Result<()> {
        self.group
            .all_reduce_sum(tensor)
            .map_err(|err| self.lost(what, err))
    }

    /// Copies rank 0's `tensors` into every rank's, in place: one
    /// broadcast for each dtype, whatever their number, shapes and layouts.
    pub fn broadcast(&self, tensors: &[Tensor], what: &str) -> Result<()> {
        let mut kinds: Vec<Kind> = vec![];
        for t in tensors {
            if !kinds.contains(&t.kind()) {
                kinds.push(t.kind());
            }
        }
        for kind in kinds {
            let of_kind: Vec<&Tensor> = tensors.iter().filter(|t| t.kind() == kind).collect();
            let flat = Tensor::cat(
                &of_kind.iter().map(|t| t.reshape(-1)).collect::<Vec<_>>(),
                0,
            );
            self.group
                .broadcast(&flat, 0)
                .map_err(|err| self.lost(what, err))?;
            unflatten_into(&flat, &of_kind);
        }
        Ok(())
    }

    /// Rank 0's `mine`, on every rank: rank 0 publishes its value under
    /// `key` in the store, the others wait for it (up to `--dist-timeout`).
    pub fn rank0_value(&self, key: &str, mine: &str) -> Result<String> {
        rank0_value(&self.store, self.rank, key, mine)
    }

    /// Sets the run's `key` to `value`: under torchrun, a worker group it
    /// starts again after a failure reads it ([`Rendezvous::run_value`]).
    pub fn set_run_value(&self, key: &str, value: &str) -> Result<()> {
        self.monitor.set(&run_key(key), value.as_bytes())
    }

    /// The error for a collective `what` that failed with `err`: which rank
    /// was lost, from the failure reports and the heartbeats in the store.
    fn lost(&self, what: &str, err: anyhow::Error) -> anyhow::Error {
        let others: Vec<i64> = (0..self.size).filter(|&r| r != self.rank).collect();
        let me = format!("rank {} of {}", self.rank, self.size);
        // Each other rank's last heartbeat, as milliseconds before now.
        let ages = || -> Result<Vec<(i64, Option<u128>)>> {
            let now = now_ms();
            others
                .iter()
                .map(|&r| {
                    let beat = self.monitor.try_get(&heartbeat_key(&self.prefix, r))?;
                    let at = beat.and_then(|b| String::from_utf8_lossy(&b).parse::<u128>().ok());
                    Ok((r, at.map(|at| now.saturating_sub(at))))
                })
                .collect()
        };
        let late = HEARTBEAT_EVERY.as_millis() * 5 / 2;
        let diagnosis = (|| -> Result<String> {
            for &r in &others {
                if let Some(reason) = self.monitor.try_get(&failed_key(&self.prefix, r))? {
                    return Ok(format!(
                        "rank {r} failed: {}",
                        String::from_utf8_lossy(&reason)
                    ));
                }
            }
            let mut silent: Vec<(i64, Option<u128>)> = ages()?
                .into_iter()
                .filter(|(_, age)| age.is_none_or(|a| a > late))
                .collect();
            if silent.is_empty() {
                // A rank that died a moment ago beat recently: watch a while.
                std::thread::sleep(HEARTBEAT_EVERY * 5 / 2);
                silent = ages()?
                    .into_iter()
                    .filter(|(_, age)| age.is_none_or(|a| a > late))
                    .collect();
            }
            let name = |(r, age): &(i64, Option<u128>)| match age {
                Some(ms) => format!("rank {r} (last heartbeat {:.1} s ago)", *ms as f64 / 1e3),
                None => format!("rank {r} (no heartbeat)"),
            };
            Ok(match silent.as_slice() {
                [] => "every rank's heartbeat goes on: a rank may be in another collective"
                    .to_string(),
                [one] => format!("lost {}: it died or hangs", name(one)),
                many => format!(
                    "lost {}: they died or hang",
                    many.iter().map(name).collect::<Vec<_>>().join(", ")
                ),
            })
        })();
        let diagnosis = diagnosis.unwrap_or_else(|_| {
            "lost rank 0, which hosts the rendezvous store: the store stopped answering".to_string()
        });
        anyhow!(
            "{me}: {diagnosis}; the {what} failed (a rank waits up to {} s, --dist-timeout), so \
             every rank stops: {err:#}",
            self.timeout.as_secs()
        )
    }
}

/// Copies `flat`'s consecutive pieces into `tensors` (in place, any layout).
fn unflatten_into(flat: &Tensor, tensors: &[&Tensor]) {
    let mut at = 0;
    tch::no_grad(|| {
        for t in tensors {
            let n = t.numel() as i64;
            let piece = flat.narrow(0, at, n).view(t.size().as_slice());
            t.shallow_clone().copy_(&piece);
            at += n;
        }
    });
}

/// In a distributed run, replaces `grads` (of `loss`, this rank's share of
/// the global mini-batch) by the global batch's: every rank's summed, in
/// buckets of at most 25 MiB, one all-reduce each, then averaged over the
/// ranks for a mean loss. `loss` becomes the global batch's loss too. The
/// step's stop requests travel in the last bucket (see [`World::stop_agreed`]).
/// A failed all-reduce is kept for the harness ([`World::take_failure`]),
/// which ends the run after this step; the gradients are then this rank's.
pub fn sync_gradients(loss: &Tensor, grads: &[Tensor]) {
    let Some(world) = world() else {
        return;
    };
    if let Err(err) = world.sync(loss, grads) {
        let mut failure = world.failure.lock().expect("not poisoned");
        failure.get_or_insert(err);
    }
}

impl World {
    fn sync(&self, loss: &Tensor, grads: &[Tensor]) -> Result<()> {
        let Some(last) = grads.last() else {
            return Ok(());
        };
        let kind = last.kind();
        let device = last.device();
        let stop = self.stop_requested.load(Ordering::SeqCst);
        let extras = Tensor::cat(
            &[
                loss.detach().reshape(-1).to_kind(kind),
                Tensor::from(f64::from(u8::from(stop)))
                    .to_kind(kind)
                    .to_device(device)
                    .reshape(-1),
            ],
            0,
        );
        let scale = match self.reduction() {
            LossReduction::Mean => 1.0 / self.size as f64,
            LossReduction::Sum => 1.0,
        };
        let buckets = buckets(grads);
        let count = buckets.len();
        for (i, bucket) in buckets.into_iter().enumerate() {
            let mut pieces: Vec<Tensor> = bucket.iter().map(|g| g.reshape(-1)).collect();
            if i + 1 == count {
                pieces.push(extras.shallow_clone());
            }
            let flat = Tensor::cat(&pieces, 0);
            self.all_reduce_sum(&flat, "gradient all-reduce")?;
            let flat = tch::no_grad(|| flat.g_mul_scalar(scale));
            unflatten_into(&flat, &bucket);
            if i + 1 == count {
                let n = flat.size()[0];
                let global = flat.narrow(0, n - 2, 1).view(loss.size().as_slice());
                tch::no_grad(|| loss.shallow_clone().copy_(&global));
                // Any rank's request, summed and scaled, is above zero.
                let stops = flat.narrow(0, n - 1, 1).double_value(&[0]);
                if stops > 0.0 {
                    self.stop_agreed.store(true, Ordering::SeqCst);
                }
            }
        }
        Ok(())
    }
}

/// `grads` in consecutive groups of at most [`BUCKET_BYTES`] (a tensor
/// larger than that is a bucket alone).
fn buckets(grads: &[Tensor]) -> Vec<Vec<&Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = vec![];
    let mut bytes = 0;
    for g in grads {
        let size = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
        match out.last_mut() {
            Some(bucket) if bytes + size <= BUCKET_BYTES => bucket.push(g),
            _ => {
                out.push(vec![g]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    out
}

/// This rank's share of one global mini-batch `index`, as
/// `DistributedSampler` takes it: every `world size`-th image from its
/// rank's. A batch that does not divide evenly is padded with its first
/// images, as `DistributedSampler` pads an epoch, so every rank gets the same
/// count. Without a [`World`], the whole batch.
pub fn local_share(index: &Tensor) -> Tensor {
    let Some(world) = world() else {
        return index.shallow_clone();
    };
    let n = index.size()[0];
    let size = world.size;
    let padded = (n as u64).div_ceil(size as u64) as i64 * size;
    let index = if padded == n {
        index.shallow_clone()
    } else {
        let extra = (0..padded - n).map(|i| i % n).collect::<Vec<i64>>();
        let extra = Tensor::from_slice(&extra).to_device(index.device());
        Tensor::cat(&[index.shallow_clone(), index.index_select(0, &extra)], 0)
    };
    index.slice(0, world.rank, padded, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_at_most_25_mib() {
        let small = Tensor::zeros([1000], (Kind::Float, Device::Cpu));
        let big = Tensor::zeros([7 << 20], (Kind::Float, Device::Cpu));
        let grads = [small.shallow_clone(), big.shallow_clone(), big, small];
        let sizes: Vec<usize> = buckets(&grads).iter().map(Vec::len).collect();
        // 4 KB + 28 MiB is over; 28 MiB alone is a bucket; then 28 MiB + 4 KB.
        assert_eq!(sizes, [1, 1, 1, 1]);
        let grads: Vec<Tensor> = (0..3)
            .map(|_| Tensor::zeros([1 << 20], (Kind::Float, Device::Cpu)))
            .collect();
        assert_eq!(buckets(&grads).len(), 1);
    }

    #[test]
    fn unflatten_fills_tensors_of_any_layout() {
        let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).tr();
        let flat = Tensor::arange(10, (Kind::Float, Device::Cpu));
        unflatten_into(&flat, &[&a, &b]);
        assert_eq!(
            Vec::<f32>::try_from(a.reshape(-1)).unwrap(),
            [0., 1., 2., 3., 4., 5.]
        );
        assert_eq!(
            Vec::<f32>::try_from(b.reshape(-1)).unwrap(),
            [6., 7., 8., 9.]
        );
    }
}
