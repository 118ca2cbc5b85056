//! Where a run starts when torchrun may start it again. A worker group that
//! torchrun restarts after a failure (`--max-restarts`, or a node lost
//! under `--nnodes MIN:MAX`) goes on from the newest checkpoint in its
//! `--checkpoint-dir`, as `--resume DIR` would; without one it starts over,
//! as a PyTorch script does. In any distributed run, every rank goes on
//! from the one file that rank 0 chose and handed the others through the
//! store.
//!
//! A restart goes on only from a folder that an earlier attempt of the same
//! launch took as its own: rank 0 records the folder in torchrun's agent
//! store once it has checked it, and that store outlives the worker groups.
//! So a first attempt that was refused a folder holding another run's
//! checkpoints never makes a restart pick that run up.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::args::CheckpointArgs;
use super::folders::same_dir;
use crate::distributed::{Launch, Rendezvous, World};
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::recipes::checkpoint_shapes;
use crate::util::report::{optional_path_json, Reporter};

/// The launch's key under which rank 0 records the checkpoint folder it took.
const CHECKPOINT_DIR: &str = "checkpoint-dir";

/// The key of rank 0's choice of checkpoint, for the other ranks.
const CHOICE: &str = "resume-from";

/// A start of the worker group after the first, by torchrun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// 1 for the first restart (`TORCHELASTIC_RESTART_COUNT`).
    pub count: u64,
    /// torchrun's `--max-restarts`, when it says.
    pub max: Option<u64>,
}

impl Restart {
    /// The restart this rank's worker group is, if it is one.
    fn of(launch: Option<&Launch>) -> Option<Restart> {
        launch.filter(|l| l.restart_count > 0).map(|l| Restart {
            count: l.restart_count,
            max: l.max_restarts,
        })
    }
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.max {
            Some(max) => write!(f, "restart {} of {max} by torchrun", self.count),
            None => write!(f, "restart {} by torchrun", self.count),
        }
    }
}

/// Where a run starts.
pub struct Start {
    /// The checkpoint it goes on from, read and checked.
    pub checkpoint: Option<Checkpoint>,
    /// The checkpoint folder holds this launch's own checkpoints (saved by
    /// an earlier attempt, or to be): rank 0 saves on into it.
    pub own_dir: bool,
    /// The restart this is, on rank 0, for the line that names it.
    pub restart: Option<Restart>,
}

/// Where this rank's run starts: from `--resume`, from its own checkpoints
/// when torchrun restarted it, or from the beginning. Rank 0 (or the only
/// process) decides and prints what it decided; the other ranks of a
/// distributed run take its choice through `rendezvous`.
pub fn choose(
    ck: &CheckpointArgs,
    launch: Option<&Launch>,
    rendezvous: Option<&Rendezvous>,
    json: bool,
) -> Result<Start> {
    let rank = launch.map_or(0, |l| l.rank);
    if rank == 0 {
        let decided = decide(ck, launch, rendezvous, json);
        if let Some(rendezvous) = rendezvous {
            let choice = match &decided {
                Ok(start) => json!({
                    "checkpoint": optional_path_json(start.checkpoint.as_ref().map(|c| c.path.as_path())),
                }),
                Err(err) => json!({"error": format!("{err:#}")}),
            };
            rendezvous.rank0_value(CHOICE, &choice.to_string())?;
        }
        return decided;
    }
    let rendezvous = rendezvous.expect("a rank other than 0 is in a distributed run");
    let choice = rendezvous.rank0_value(CHOICE, "")?;
    let choice: serde_json::Value =
        serde_json::from_str(&choice).context("rank 0's choice of checkpoint is not JSON")?;
    if let Some(err) = choice["error"].as_str() {
        bail!("rank 0 failed: {err}");
    }
    let checkpoint = match choice["checkpoint"].as_str() {
        None => None,
        Some(path) => Some(
            checkpoint::load(Path::new(path), checkpoint_shapes).with_context(|| {
                format!(
                    "rank {rank} cannot read {path}, the checkpoint rank 0 goes on from: every \
                     rank reads it (on several machines, its folder must be on a file system \
                     they share)"
                )
            })?,
        ),
    };
    Ok(Start {
        checkpoint,
        own_dir: false,
        restart: None,
    })
}

/// Rank 0's choice: [`choose`].
fn decide(
    ck: &CheckpointArgs,
    launch: Option<&Launch>,
    rendezvous: Option<&Rendezvous>,
    json: bool,
) -> Result<Start> {
    let restart = Restart::of(launch);
    let dir = ck.checkpoint_dir.as_deref().or(ck.resume.as_deref());
    if restart.is_none() {
        let max = launch.and_then(|l| l.max_restarts).filter(|&m| m > 0);
        if let (Some(max), None) = (max, dir) {
            eprintln!(
                "warning: torchrun may restart this run (--max-restarts {max}), and without \
                 --checkpoint-dir each restart trains from the start: pass --checkpoint-dir DIR \
                 to go on from its newest checkpoint instead"
            );
        }
    }
    // Whether an earlier attempt of this launch took `dir` as its own.
    let own = match (restart, dir, rendezvous) {
        (Some(_), Some(dir), Some(rendezvous)) => rendezvous
            .run_value(CHECKPOINT_DIR)?
            .is_some_and(|taken| taken == folder_id(dir)),
        _ => false,
    };
    let holds_checkpoints =
        |dir: &Path| -> Result<bool> { Ok(dir.is_dir() && !checkpoint::list(dir)?.is_empty()) };
    let plan = plan(ck, restart, own, holds_checkpoints)?;
    let checkpoint = plan
        .folder
        .map(|folder| checkpoint::newest(folder, checkpoint_shapes))
        .transpose()?;
    if let Some(restart) = restart {
        if let Some(why) = &plan.starts_over {
            eprintln!("{restart}: {why}");
        }
        let reporter = Reporter::new(json);
        if reporter.is_json() {
            let path = checkpoint.as_ref().map(|c| c.path.as_path());
            reporter.emit(
                String::new,
                json!({"event": "restart", "restart": restart.count,
                       "max_restarts": restart.max, "checkpoint": optional_path_json(path)}),
            );
        }
    }
    Ok(Start {
        checkpoint,
        own_dir: own,
        restart,
    })
}

/// What rank 0 goes on from, before any file is read.
#[derive(Debug, PartialEq, Eq)]
struct Plan<'a> {
    /// The folder whose newest valid checkpoint the run goes on from.
    folder: Option<&'a Path>,
    /// Why a restart does not go on from a checkpoint, for its line.
    starts_over: Option<String>,
}

/// [`Plan`] for the checkpoint flags `ck` on a first start (`restart`
/// none) or a restart, `own` saying whether an earlier attempt took the
/// checkpoint folder as its own, and `holds_checkpoints` whether a folder
/// holds checkpoint files.
fn plan<'a>(
    ck: &'a CheckpointArgs,
    restart: Option<Restart>,
    own: bool,
    holds_checkpoints: impl Fn(&Path) -> Result<bool>,
) -> Result<Plan<'a>> {
    let resume = ck.resume.as_deref();
    let asked = Plan {
        folder: resume,
        starts_over: None,
    };
    if restart.is_none() {
        return Ok(asked);
    }
    let Some(dir) = ck.checkpoint_dir.as_deref().or(resume) else {
        return Ok(Plan {
            folder: None,
            starts_over: Some(
                "without --checkpoint-dir there is nothing to go on from, so training starts \
                 over"
                    .into(),
            ),
        });
    };
    if !own {
        // The failed attempt stopped before it checked the folder (another
        // run's checkpoints, say): this one starts as that one did.
        let why = format!(
            "the failed attempt had not taken {} as its checkpoint folder, so this one starts \
             as the first did",
            dir.display()
        );
        return Ok(Plan {
            starts_over: resume.is_none().then_some(why),
            ..asked
        });
    }
    if holds_checkpoints(dir)? {
        return Ok(Plan {
            folder: Some(dir),
            starts_over: None,
        });
    }
    // No checkpoint saved yet: the run resumed from, or the beginning.
    Ok(match resume.filter(|r| !same_dir(r, dir)) {
        Some(resume) => Plan {
            folder: Some(resume),
            starts_over: None,
        },
        None => Plan {
            folder: None,
            starts_over: Some(format!(
                "{} holds no checkpoint yet, so training starts over",
                dir.display()
            )),
        },
    })
}

/// Records, for a restart of this launch, that rank 0 took `dir` as its
/// checkpoint folder ([`choose`] goes on from it then).
pub fn take_folder(world: &World, dir: &Path) -> Result<()> {
    world.set_run_value(CHECKPOINT_DIR, &folder_id(dir))
}

/// `dir` as every attempt names it: its canonical path once it exists.
fn folder_id(dir: &Path) -> String {
    let path: PathBuf = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::args::tests::parse;
    use super::*;

    const RESTART: Option<Restart> = Some(Restart {
        count: 1,
        max: Some(3),
    });

    /// The plan for `flags`, with `full` the folders that hold checkpoints.
    fn planned(
        flags: &[&str],
        restart: Option<Restart>,
        own: bool,
        full: &[&str],
    ) -> (Option<PathBuf>, Option<String>) {
        let (args, _) = parse(flags).unwrap();
        let holds = |dir: &Path| Ok(full.iter().any(|f| Path::new(f) == dir));
        let plan = plan(&args.checkpoints, restart, own, holds).unwrap();
        (plan.folder.map(Path::to_path_buf), plan.starts_over)
    }

    #[test]
    fn a_first_start_resumes_only_when_asked() {
        let (folder, why) = planned(&["--checkpoint-dir", "ck"], None, false, &["ck"]);
        assert_eq!((folder, why), (None, None));
        let (folder, _) = planned(&["--resume", "old"], None, false, &["old"]);
        assert_eq!(folder.as_deref(), Some(Path::new("old")));
    }

    #[test]
    fn a_restart_goes_on_from_its_own_folder() {
        let (folder, why) = planned(&["--checkpoint-dir", "ck"], RESTART, true, &["ck"]);
        assert_eq!((folder.as_deref(), why), (Some(Path::new("ck")), None));
        // From the folder resumed from, until the run has saved its own.
        let flags = ["--resume", "old", "--checkpoint-dir", "ck"];
        let (folder, _) = planned(&flags, RESTART, true, &["old"]);
        assert_eq!(folder.as_deref(), Some(Path::new("old")));
        let (folder, _) = planned(&flags, RESTART, true, &["old", "ck"]);
        assert_eq!(folder.as_deref(), Some(Path::new("ck")));
    }

    #[test]
    fn a_restart_without_checkpoints_starts_over_and_says_why() {
        let (folder, why) = planned(&["--checkpoint-dir", "ck"], RESTART, true, &[]);
        assert_eq!(folder, None);
        assert_eq!(
            why.as_deref(),
            Some("ck holds no checkpoint yet, so training starts over")
        );
        let (folder, why) = planned(&[], RESTART, false, &[]);
        assert_eq!(folder, None);
        assert!(why.unwrap().starts_with("without --checkpoint-dir"));
    }

    /// A folder the failed attempt never took (it was refused, say) is
    /// another run's: a restart does not pick it up.
    #[test]
    fn a_restart_never_picks_up_a_folder_it_did_not_take() {
        let (folder, why) = planned(&["--checkpoint-dir", "ck"], RESTART, false, &["ck"]);
        assert_eq!(folder, None);
        assert!(why.unwrap().contains("had not taken ck"));
    }

    #[test]
    fn a_restart_names_its_count() {
        assert_eq!(RESTART.unwrap().to_string(), "restart 1 of 3 by torchrun");
        let unbounded = Restart {
            count: 2,
            max: None,
        };
        assert_eq!(unbounded.to_string(), "restart 2 by torchrun");
    }
}
