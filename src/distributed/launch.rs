//! How a process learns that it is one rank of a distributed run: the
//! environment `torchrun` sets for each worker (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_*`), the same
//! variables PyTorch's `init_process_group("env://")` reads. A plain
//! launcher can set the first five itself.

use anyhow::{bail, ensure, Context, Result};

/// One rank's place in a distributed run, from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// 0-based, below `world_size`.
    pub rank: i64,
    pub world_size: i64,
    /// The rank among this machine's processes: it picks the GPU.
    pub local_rank: i64,
    /// This machine's ranks (`LOCAL_WORLD_SIZE`; all of them without it).
    pub local_world_size: i64,
    /// Where the rendezvous store listens.
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE`):
    /// every rank is its client, and its keys go under `store_prefix`.
    /// Otherwise rank 0 hosts it.
    pub agent_store: bool,
    pub store_prefix: String,
    /// How many times torchrun's agent has started this rank's worker group
    /// again after a failure (`TORCHELASTIC_RESTART_COUNT`): 0 on the first
    /// start, and without torchrun.
    pub restart_count: u64,
    /// The restarts torchrun allows (`--max-restarts`, which it passes as
    /// `TORCHELASTIC_MAX_RESTARTS`), when it says.
    pub max_restarts: Option<u64>,
}

impl Launch {
    /// The launch the environment describes: `None` when it names no
    /// distributed run (neither `RANK` nor `WORLD_SIZE` is set).
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Launch::from_env`] on any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let (rank, world) = match (var("RANK"), var("WORLD_SIZE")) {
            (None, None) => return Ok(None),
            (Some(rank), Some(world)) => (rank, world),
            (Some(_), None) => bail!(
                "RANK is set but WORLD_SIZE is not: launch with torchrun, or set WORLD_SIZE, \
                 RANK, MASTER_ADDR and MASTER_PORT on every rank"
            ),
            (None, Some(_)) => bail!(
                "WORLD_SIZE is set but RANK is not: launch with torchrun, or set WORLD_SIZE, \
                 RANK, MASTER_ADDR and MASTER_PORT on every rank"
            ),
        };
        let world_size: i64 = number("WORLD_SIZE", &world)?;
        ensure!(
            world_size >= 1,
            "WORLD_SIZE={world} is not a number of processes (1 or more)"
        );
        let rank: i64 = number("RANK", &rank)?;
        ensure!(
            (0..world_size).contains(&rank),
            "RANK={rank} is not a rank of WORLD_SIZE={world_size}: ranks go from 0 to {}",
            world_size - 1
        );
        let Some(master_addr) = var("MASTER_ADDR").filter(|a| !a.is_empty()) else {
            bail!(
                "WORLD_SIZE={world_size} is set but MASTER_ADDR is not: set MASTER_ADDR and \
                 MASTER_PORT to the address and port of rank 0's rendezvous store (torchrun \
                 sets them)"
            );
        };
        let Some(port) = var("MASTER_PORT") else {
            bail!(
                "WORLD_SIZE={world_size} is set but MASTER_PORT is not: set it to the port of \
                 rank 0's rendezvous store (torchrun sets it)"
            );
        };
        let master_port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .with_context(|| format!("MASTER_PORT={port} is not a port (1 to 65535)"))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v)?,
            None => rank,
        };
        ensure!(local_rank >= 0, "LOCAL_RANK={local_rank} is negative");
        let local_world_size = match var("LOCAL_WORLD_SIZE") {
            Some(v) => number("LOCAL_WORLD_SIZE", &v)?,
            None => world_size,
        };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        let count = |name: &str| -> Result<Option<u64>> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse()
                        .with_context(|| format!("{name}={v} is not a count (0 or more)"))
                })
                .transpose()
        };
        let restart_count = count("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
        let max_restarts = count("TORCHELASTIC_MAX_RESTARTS")?;
        // The agent's store outlives a worker group: each attempt's keys go
        // under a prefix of their own, so that a restarted group never reads
        // what the failed one left there.
        let store_prefix = if agent_store {
            format!("/worker/attempt_{restart_count}")
        } else {
            String::new()
        };
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            agent_store,
            store_prefix,
            restart_count,
            max_restarts,
        }))
    }

    /// Whether the store is on this machine's loopback interface: then
    /// Gloo's sockets bind there too, and the run never leaves the machine.
    pub fn is_loopback(&self) -> bool {
        let addr = self
            .master_addr
            .trim_start_matches('[')
            .trim_end_matches(']');
        addr == "localhost"
            || addr
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

fn number(name: &str, value: &str) -> Result<i64> {
    value
        .trim()
        .parse()
        .with_context(|| format!("{name}={value} is not a whole number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|name| vars.get(name).cloned())
    }

    const TORCHRUN: [(&str, &str); 9] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "0"),
        ("TORCHELASTIC_MAX_RESTARTS", "3"),
        ("LOCAL_WORLD_SIZE", "2"),
    ];

    #[test]
    fn no_variables_is_no_distributed_run() {
        assert_eq!(launch(&[("MASTER_ADDR", "127.0.0.1")]).unwrap(), None);
    }

    #[test]
    fn torchruns_environment_is_read() {
        let got = launch(&TORCHRUN).unwrap().unwrap();
        assert_eq!(
            got,
            Launch {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "127.0.0.1".into(),
                master_port: 29500,
                agent_store: true,
                store_prefix: "/worker/attempt_0".into(),
                restart_count: 0,
                max_restarts: Some(3),
            }
        );
        assert!(got.is_loopback());
    }

    #[test]
    fn a_restarted_worker_knows_its_attempt() {
        let mut vars = TORCHRUN.to_vec();
        vars.retain(|(k, _)| *k != "TORCHELASTIC_RESTART_COUNT");
        vars.push(("TORCHELASTIC_RESTART_COUNT", "2"));
        let got = launch(&vars).unwrap().unwrap();
        assert_eq!(got.restart_count, 2);
        assert_eq!(got.store_prefix, "/worker/attempt_2");
        // A plain launcher sets none of torchrun's elastic variables.
        let plain = launch(&TORCHRUN[..5]).unwrap().unwrap();
        assert_eq!((plain.restart_count, plain.max_restarts), (0, None));
        assert_eq!(plain.store_prefix, "");
        vars.push(("TORCHELASTIC_MAX_RESTARTS", "many"));
        let err = launch(&vars).unwrap_err().to_string();
        assert!(
            err.contains("TORCHELASTIC_MAX_RESTARTS=many is not a count"),
            "{err}"
        );
    }

    #[test]
    fn bad_environments_say_what_is_wrong() {
        let err = |vars: &[(&str, &str)]| launch(vars).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_ADDR is not"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        let rank = err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h")]);
        assert!(
            rank.contains("RANK=2 is not a rank of WORLD_SIZE=2"),
            "{rank}"
        );
        let port = err(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(port.contains("MASTER_PORT=70000 is not a port"), "{port}");
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("not a whole number"));
    }
}
