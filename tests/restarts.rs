//! torchrun's restarts through the real binary and the real
//! `.venv/bin/torchrun`, on loopback only: a worker killed under
//! `--max-restarts`, after which torchrun restarts the group and the run
//! resumes bit for bit; a node lost under `--nnodes 1:2`, after which the
//! other re-forms alone and goes on from the same checkpoint; and
//! `--max-restarts 0`, which ends the run as before. Without torchrun, its
//! environment alone shows what a restart says and refuses.
//!
//! Each torchrun runs in a process group of its own, and its workers in
//! theirs (torchrun starts them in new sessions); every one of them is
//! killed when its test ends, however it ends, and every wait is bounded.
//! The figures a fault costs (the time from the kill to the next training
//! step, the steps trained twice) are printed, not asserted.

mod util;

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tch::Tensor;
use util::*;

/// torchrun from the project's venv (the PyTorch wheel), if it is there.
fn torchrun() -> Option<PathBuf> {
    let path = repo_path(".venv/bin/torchrun");
    path.exists().then_some(path)
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tutorial's recipe on a scratch folder's `data/`, one loss line per
/// step, saving into `checkpoints` every `every` steps.
fn train_args(out: &str, checkpoints: &str, epochs: u64, every: u64) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--data-dir",
        "data",
        "--seed",
        "3",
        "--lr",
        "0.01",
        "--log-every",
        "1",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--out", out, "--checkpoint-dir", checkpoints].map(String::from));
    args.extend(["--epochs".into(), epochs.to_string()]);
    args.extend(["--checkpoint-every".into(), every.to_string()]);
    args
}

/// Every process's parent, from /proc.
fn parents() -> HashMap<i32, i32> {
    let mut parents = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // The fields after the command's closing parenthesis: state, ppid.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// Every living descendant of `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let parents = parents();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, &p)| p == parent)
                .map(|(&c, _)| c),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// The environment variable `name` of process `pid`.
fn env_of(pid: i32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|var| {
        let var = String::from_utf8_lossy(var);
        var.strip_prefix(&format!("{name}="))
            .map(|value| value.to_string())
    })
}

fn kill_group(pgid: i32) {
    // SAFETY: a plain kill(2) of a process group this test started.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// One line of output and when it came.
type Line = (Instant, String);

/// One JSON event and when it came.
type Event = (Instant, Value);

/// A torchrun under way: its stdout line by line as it comes, its stderr
/// gathered. Dropped, it is killed with every process it started.
struct Agent {
    child: Child,
    lines: Receiver<Line>,
    seen: Vec<Line>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `torchrun FLAGS --no-python tch-cifar ARGS` in `dir`, with
    /// `env` added, in a process group of its own.
    fn start(
        torchrun: &Path,
        dir: &Path,
        flags: &[&str],
        args: &[String],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut child = Command::new(torchrun)
            .current_dir(dir)
            .args(flags)
            .arg("--no-python")
            .arg(env!("CARGO_BIN_EXE_tch-cifar"))
            .args(args)
            .envs(env.iter().copied())
            .env("OMP_NUM_THREADS", "1")
            .env_remove("RUST_LOG")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start torchrun");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let gathered = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                let mut text = gathered.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Agent {
            child,
            lines,
            seen: vec![],
            stderr,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Reads stdout until a line satisfies `wanted`, for at most `limit`.
    fn wait_for_line(&mut self, limit: Duration, wanted: impl Fn(&str) -> bool) -> Line {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line.1) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no such line within {limit:?}; stderr: {}", self.stderr())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("torchrun's output ended; stderr: {}", self.stderr())
                }
            }
        }
    }

    /// Waits until `done` holds, for at most `limit`.
    fn wait_until(&mut self, limit: Duration, done: impl Fn() -> bool) {
        let began = Instant::now();
        while !done() {
            assert!(
                began.elapsed() < limit,
                "not within {limit:?}; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The worker of global rank `rank` in torchrun's first worker group.
    fn worker(&self, rank: usize) -> i32 {
        let rank = rank.to_string();
        descendants(self.pid())
            .into_iter()
            .find(|&pid| {
                env_of(pid, "RANK").as_deref() == Some(rank.as_str())
                    && env_of(pid, "TORCHELASTIC_RESTART_COUNT").as_deref() == Some("0")
            })
            .unwrap_or_else(|| panic!("no worker of rank {rank}; stderr: {}", self.stderr()))
    }

    /// Waits for torchrun to end (at most `limit`), then for its output;
    /// returns its status and every stdout line with when it came.
    fn finish(mut self, limit: Duration) -> (ExitStatus, Vec<Line>, String) {
        let began = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                began.elapsed() < limit,
                "torchrun ran past {limit:?}; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The workers hold the pipe too; torchrun has ended them, and
        // dropping ends any that is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
        let seen = std::mem::take(&mut self.seen);
        (status, seen, self.stderr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Workers first: each leads a session of its own, and once torchrun
        // is gone they would no longer be found as its children.
        for pid in descendants(self.pid()) {
            kill_group(pid);
        }
        kill_group(self.pid());
        let _ = self.child.wait();
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The JSON events among `lines`, each with when it came.
fn events_of(lines: &[Line]) -> Vec<Event> {
    lines
        .iter()
        .filter(|(_, l)| l.starts_with('{'))
        .map(|(at, l)| {
            (
                *at,
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")),
            )
        })
        .collect()
}

/// The loss events' values by global step, with `per_epoch` steps an epoch.
fn losses(events: &[Event], per_epoch: u64) -> BTreeMap<u64, f64> {
    events
        .iter()
        .filter(|(_, e)| e["event"] == "loss")
        .map(|(_, e)| {
            let (epoch, step) = (e["epoch"].as_u64().unwrap(), e["step"].as_u64().unwrap());
            ((epoch - 1) * per_epoch + step, e["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Whether `line` is the loss event of `epoch`'s `step`.
fn is_loss_of(line: &str, epoch: u64, step: u64) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|e| e["event"] == "loss" && e["epoch"] == epoch && e["step"] == step)
}

/// Whether `dir` holds a checkpoint file (saved whole: they are renamed
/// into place).
fn holds_checkpoint(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("checkpoint-") && name.ends_with(".safetensors")
        })
    })
}

/// Splits a restarted run's events at its `restart` event: the first
/// attempt's, the restart event, and the second attempt's.
fn attempts(events: &[Event]) -> (&[Event], &Value, &[Event]) {
    let at = events
        .iter()
        .position(|(_, e)| e["event"] == "restart")
        .expect("a restart event");
    (&events[..at], &events[at].1, &events[at + 1..])
}

/// The cost of a fault, as the test measured it: the seconds from the kill
/// to the second attempt's first training step, and the steps trained
/// twice (from its checkpoint to the first attempt's last step).
fn cost(killed: Instant, first: &[Event], second: &[Event], per_epoch: u64) -> (f64, u64, u64) {
    let start = second
        .iter()
        .find(|(_, e)| e["event"] == "start")
        .expect("a start event after the restart");
    let from = start.1["resumed_from"]["global_step"]
        .as_u64()
        .unwrap_or_else(|| panic!("the restart did not resume: {}", start.1));
    let next = second
        .iter()
        .find(|(_, e)| e["event"] == "loss")
        .expect("a step after the restart");
    let last = *losses(first, per_epoch).keys().last().unwrap();
    let seconds = next.0.duration_since(killed).as_secs_f64();
    (seconds, from, last.saturating_sub(from))
}

/// Shows torchrun's log of a restart that took unusually long, to tell
/// where the time went.
fn slow_restart(seconds: f64, said: &str) {
    if seconds > 20.0 {
        eprintln!("torchrun's log of that slow restart:\n{said}");
    }
}

fn accuracy<'a>(mut events: impl Iterator<Item = &'a Value>) -> f64 {
    let summary = events.find(|e| e["event"] == "summary");
    summary.expect("a summary event")["accuracy"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_worker_group_that_torchrun_restarts_resumes_bit_for_bit() {
    let Some(torchrun) = torchrun() else {
        eprintln!("skipped: no .venv/bin/torchrun (scripts/setup-libtorch installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 200 images at batch 4: 50 steps an epoch, 100 in all.
    synthetic(&dir.path().join("data"), 200, 40, 8, None);
    let per_epoch = 50;
    let launch = [
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
    ];
    let full = Agent::start(
        &torchrun,
        dir.path(),
        &launch,
        &train_args("full.safetensors", "full", 2, 10),
        &[],
    );
    let (status, full, said) = full.finish(Duration::from_secs(180));
    assert!(status.success(), "{said}");
    let full = events_of(&full);

    // Each step slowed, so that the kill lands between two checkpoints:
    // after step 15, halfway from the first (step 10) to the next.
    let slow = [("TCH_CIFAR_TEST_STEP_DELAY_MS", "50")];
    let args = train_args("cut.safetensors", "cut", 2, 10);
    let mut cut = Agent::start(&torchrun, dir.path(), &launch, &args, &slow);
    cut.wait_for_line(Duration::from_secs(120), |l| is_loss_of(l, 1, 15));
    assert!(holds_checkpoint(&dir.path().join("cut")));
    let worker = cut.worker(1);
    // SAFETY: a plain kill(2) of a worker this test started.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let killed = Instant::now();
    let (status, lines, said) = cut.finish(Duration::from_secs(180));
    assert!(status.success(), "{said}");
    let events = events_of(&lines);
    let (first, restart, second) = attempts(&events);
    assert_eq!(restart["restart"], 1, "{restart}");
    assert_eq!(restart["max_restarts"], 2, "{restart}");
    let checkpoint = restart["checkpoint"].as_str().expect("a checkpoint");
    assert!(
        checkpoint.starts_with("cut/checkpoint-e0001-s"),
        "{checkpoint}"
    );
    assert!(
        said.contains(&format!(
            "restart 1 of 2 by torchrun: resuming from {checkpoint}"
        )),
        "{said}"
    );
    // Every step after the checkpoint, and only those, with the loss of
    // the uninterrupted run's step, to the bit.
    let (seconds, from, twice) = cost(killed, first, second, per_epoch);
    let resumed = losses(second, per_epoch);
    let expected: Vec<u64> = (from + 1..=2 * per_epoch).collect();
    assert_eq!(resumed.keys().copied().collect::<Vec<_>>(), expected);
    let uninterrupted = losses(&full, per_epoch);
    for (step, loss) in resumed.iter().chain(&losses(first, per_epoch)) {
        assert_eq!(
            loss.to_bits(),
            uninterrupted[step].to_bits(),
            "step {step}: {loss} against {}",
            uninterrupted[step]
        );
    }
    let weights = |name: &str| -> BTreeMap<String, Tensor> {
        let path = dir.path().join(name);
        Tensor::read_safetensors(path)
            .unwrap()
            .into_iter()
            .collect()
    };
    let (a, b) = (weights("full.safetensors"), weights("cut.safetensors"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for ((key, x), y) in a.iter().zip(b.values()) {
        assert!(x.equal(y), "{key} differs from the uninterrupted run's");
    }
    eprintln!(
        "measured: a worker killed, torchrun --max-restarts: {seconds:.2} s from the kill to \
         the next step; resumed at global step {from}; {twice} step(s) trained twice"
    );
    slow_restart(seconds, &said);
}

#[test]
fn a_node_lost_leaves_the_other_to_go_on_alone() {
    let Some(torchrun) = torchrun() else {
        eprintln!("skipped: no .venv/bin/torchrun (scripts/setup-libtorch installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 400 images at batch 4: 100 steps an epoch, 300 in all.
    synthetic(&dir.path().join("data"), 400, 500, 8, None);
    let per_epoch = 100;
    let epochs = 3;

    // The uninterrupted run: two ranks, as torchrun sets them, without it.
    let port = free_port().to_string();
    let args = train_args("full.safetensors", "full", epochs, 25);
    let ranks: Vec<Child> = (0..2)
        .map(|rank| {
            tch_cifar()
                .current_dir(dir.path())
                .args(&args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .process_group(0)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let pids: Vec<i32> = ranks.iter().map(|r| r.id() as i32).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outs: Vec<_> = ranks.into_iter().map(|r| r.wait_with_output()).collect();
        let _ = tx.send(outs);
    });
    let outs = rx
        .recv_timeout(Duration::from_secs(180))
        .unwrap_or_else(|_| {
            pids.iter().for_each(|&pid| kill_group(pid));
            panic!("the uninterrupted run ran past 3 minutes")
        });
    let full_accuracy = accuracy(events(&ok(outs[0].as_ref().unwrap())).iter());

    // Two agents, one machine each, as far as torchrun knows: A hosts the
    // rendezvous store and has the lower address, so its worker is rank 0;
    // B is lost. B starts first and waits for A's store, so that it joins
    // before A's short last call for latecomers (which is also how long A
    // waits for others once alone) is over.
    let endpoint = format!("127.0.0.1:{}", free_port());
    let agent = |addr: &str, conf: &str| -> Vec<String> {
        [
            "--nnodes",
            "1:2",
            "--nproc-per-node",
            "1",
            "--max-restarts",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint.as_str(),
            "--local-addr",
            addr,
            "--rdzv-conf",
            conf,
        ]
        .map(String::from)
        .to_vec()
    };
    // B's heartbeats are missed for 3 s before A counts it lost.
    let heartbeats = "keep_alive_interval=1,keep_alive_max_attempt=3";
    let b_flags = agent("127.0.0.2", &format!("is_host=0,{heartbeats}"));
    let a_flags = agent(
        "127.0.0.1",
        &format!("is_host=1,last_call_timeout=5,{heartbeats}"),
    );
    let slow = ("TCH_CIFAR_TEST_STEP_DELAY_MS", "20");
    let args = train_args("lost.safetensors", "lost", epochs, 25);
    let b = Agent::start(
        &torchrun,
        dir.path(),
        &strs(&b_flags),
        &args,
        &[slow, ("LOGLEVEL", "INFO")],
    );
    {
        // Until B is about to reach for A's store.
        let began = Instant::now();
        while !b.stderr().contains("Starting elastic_operator") {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "agent B did not start: {}",
                b.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut a = Agent::start(&torchrun, dir.path(), &strs(&a_flags), &args, &[slow]);
    let (_, start) = a.wait_for_line(Duration::from_secs(120), |l| l.contains("\"start\""));
    let start: Value = serde_json::from_str(&start).unwrap();
    assert_eq!(start["world_size"], 2, "the agents did not meet: {start}");
    // After step 37, halfway from the first checkpoint (step 25) to the
    // next, node B goes: its worker and its agent.
    a.wait_for_line(Duration::from_secs(120), |l| is_loss_of(l, 1, 37));
    assert!(holds_checkpoint(&dir.path().join("lost")));
    let worker = b.worker(1);
    kill_group(worker);
    kill_group(b.pid());
    let killed = Instant::now();
    drop(b);
    let (status, lines, said) = a.finish(Duration::from_secs(240));
    assert!(status.success(), "{said}");
    let events = events_of(&lines);
    let (first, restart, second) = attempts(&events);
    assert_eq!(restart["restart"], 1, "{restart}");
    assert!(restart["checkpoint"].as_str().unwrap().starts_with("lost/"));
    let start = &second
        .iter()
        .find(|(_, e)| e["event"] == "start")
        .unwrap()
        .1;
    assert_eq!(start["world_size"], 1, "{start}");
    assert!(
        said.contains("was saved by a run of 2 rank(s), this one has 1"),
        "{said}"
    );
    let (seconds, from, twice) = cost(killed, first, second, per_epoch);
    let resumed = losses(second, per_epoch);
    let expected: Vec<u64> = (from + 1..=epochs * per_epoch).collect();
    assert_eq!(resumed.keys().copied().collect::<Vec<_>>(), expected);
    let lost_accuracy = accuracy(second.iter().map(|(_, e)| e));
    assert!(
        (lost_accuracy - full_accuracy).abs() <= 1.5,
        "{lost_accuracy} % after the node was lost, {full_accuracy} % without"
    );
    eprintln!(
        "measured: a node lost, torchrun --nnodes 1:2: {seconds:.2} s from the kill to the next \
         step; resumed at global step {from} on 1 rank; {twice} step(s) trained twice; accuracy \
         {lost_accuracy:.2} % against {full_accuracy:.2} % uninterrupted"
    );
    slow_restart(seconds, &said);
}

#[test]
fn without_restarts_a_lost_worker_ends_the_run_naming_it() {
    let Some(torchrun) = torchrun() else {
        eprintln!("skipped: no .venv/bin/torchrun (scripts/setup-libtorch installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 200, 40, 8, None);
    let launch = [
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
    ];
    let mut args = train_args("w.safetensors", "ck", 20, 10);
    args.extend(["--dist-timeout", "10"].map(String::from));
    let slow = [("TCH_CIFAR_TEST_STEP_DELAY_MS", "50")];
    let mut run = Agent::start(&torchrun, dir.path(), &launch, &args, &slow);
    run.wait_for_line(Duration::from_secs(120), |l| l.contains("\"loss\""));
    let (rank0, rank1) = (run.worker(0), run.worker(1));
    // SAFETY: a plain kill(2) of a worker this test started.
    unsafe { libc::kill(rank1, libc::SIGKILL) };
    let killed = Instant::now();
    run.wait_until(Duration::from_secs(60), || {
        !Path::new(&format!("/proc/{rank0}")).exists()
            || std::fs::read_to_string(format!("/proc/{rank0}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
    });
    let ended = killed.elapsed();
    let (status, lines, said) = run.finish(Duration::from_secs(60));
    assert!(!status.success(), "{said}");
    let line = said
        .lines()
        .find(|l| l.starts_with("error: rank 0 of 2"))
        .unwrap_or_else(|| panic!("no error from rank 0: {said}"));
    assert!(line.contains("lost rank 1"), "{line}");
    assert!(!said.contains("by torchrun"), "{said}");
    let events = events_of(&lines);
    assert!(!events.iter().any(|(_, e)| e["event"] == "restart"));
    assert!(!dir.path().join("w.safetensors").exists());
    assert!(
        ended < Duration::from_secs(10),
        "rank 0 ended {ended:?} after the kill"
    );
    eprintln!(
        "measured: --max-restarts 0: rank 0 ended {:.2} s after the kill",
        ended.as_secs_f64()
    );
}

/// torchrun's environment for the only rank of a run whose store it hosts.
fn one_rank(port: u16, restarts: &str) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", "0".into()),
        ("WORLD_SIZE", "1".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", restarts.into()),
        ("TORCHELASTIC_MAX_RESTARTS", "2".into()),
    ]
}

#[test]
fn a_restart_says_what_it_goes_on_from_and_never_takes_another_runs_folder() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(&dir.path().join("data"), 40, 20, 8, None);
    let run = |args: &[String], env: Vec<(&'static str, String)>| {
        tch_cifar()
            .current_dir(dir.path())
            .args(args)
            .envs(env)
            .output()
            .unwrap()
    };
    let args = train_args("w.safetensors", "ck", 1, 5);
    // The same without --checkpoint-dir and --checkpoint-every.
    let flag = |a: &String| a == "--checkpoint-dir" || a == "--checkpoint-every";
    let without_dir: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|&(i, a)| !(flag(a) || i > 0 && flag(&args[i - 1])))
        .map(|(_, a)| a.clone())
        .collect();
    // A first start that torchrun may restart, with nothing to resume from.
    let out = run(&without_dir, one_rank(free_port(), "0"));
    ok(&out);
    assert!(
        stderr(&out).contains(
            "warning: torchrun may restart this run (--max-restarts 2), and without \
             --checkpoint-dir each restart trains from the start"
        ),
        "{}",
        stderr(&out)
    );
    // Restarted, it starts over and says so.
    let out = run(&without_dir, one_rank(free_port(), "1"));
    let said = stderr(&out);
    let events = events(&ok(&out));
    assert!(
        said.contains(
            "restart 1 of 2 by torchrun: without --checkpoint-dir there is nothing to go on \
             from, so training starts over"
        ),
        "{said}"
    );
    let restart = of_kind(&events, "restart")[0];
    assert_eq!(restart["checkpoint"], Value::Null);
    assert!(of_kind(&events, "start")[0].get("resumed_from").is_none());
    // Another run's folder: a restart whose first attempt never took it (it
    // was refused) is refused too, rather than picking that run up.
    ok(&run(&args, vec![]));
    let out = run(&args, one_rank(free_port(), "1"));
    fails_with(&out, &["ck already holds checkpoints"]);
    assert!(
        stderr(&out).contains(
            "restart 1 of 2 by torchrun: the failed attempt had not taken ck as its checkpoint \
             folder"
        ),
        "{}",
        stderr(&out)
    );
}
