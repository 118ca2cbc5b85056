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
        // torch.distributed's env:// rendezvous puts a worker's keys under
        // this prefix of the agent's store.
        let attempt = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        let store_prefix = if agent_store {
            format!("/worker/attempt_{attempt}")
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

    const TORCHRUN: [(&str, &str); 8] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "0"),
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
            }
        );
        assert!(got.is_loopback());
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
