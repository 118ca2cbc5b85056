//! The folders a run saves checkpoints into: `--checkpoint-dir`, the
//! folder resumed from, or `OUT.checkpoint/` for an interrupt, and the
//! checks that keep two runs from mixing their checkpoints there.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::train::checkpoint;
use crate::train::recipes::checkpoint_shapes;

/// Creates `dir` if needed and fails early when checkpoints cannot be
/// written there, or when it holds checkpoints of another run (any but the
/// folder being resumed from).
pub(super) fn prepare_checkpoint_dir(dir: &Path, resume: Option<&Path>) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("checkpoint directory {} is not a directory", dir.display());
    }
    checkpoint::create_dir(dir)?;
    crate::util::files::check_dir_writable(dir)
        .with_context(|| format!("cannot save checkpoints into {}", dir.display()))?;
    if resume.is_some_and(|r| same_dir(r, dir)) {
        return Ok(());
    }
    if let Some((_, file)) = checkpoint::list(dir)?.last() {
        bail!(
            "{} already holds checkpoints ({}): continue that run with --resume {}, or save \
             into an empty directory",
            dir.display(),
            file.file_name().unwrap_or_default().to_string_lossy(),
            dir.display()
        );
    }
    Ok(())
}

/// Deletes the checkpoint files in `dir`, then `dir` itself if that leaves
/// it empty.
pub(super) fn remove_checkpoints(dir: &Path) -> Result<()> {
    for (_, path) in checkpoint::list(dir)? {
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    // Fails, harmlessly, if anything else is in there.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Refuses to start a run whose interrupt folder holds a checkpoint an
/// unfinished run could go on from: the new run's interrupt would replace
/// it. A finished run's checkpoint there (one saved with `--checkpoint-dir`
/// naming that folder) does not count: there is nothing left to go on with.
pub(super) fn check_no_interrupted_run(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let newest_valid = checkpoint::list(dir)?
        .into_iter()
        .rev()
        .find_map(|(_, path)| {
            checkpoint::load(&path, checkpoint_shapes)
                .ok()
                .map(|c| (path, c.meta))
        });
    if let Some((file, meta)) = newest_valid {
        ensure!(
            meta.finished(),
            "{} holds the checkpoint of an interrupted run ({}): continue it with --resume {}, \
             or delete that folder to start a new run",
            dir.display(),
            file.file_name().unwrap_or_default().to_string_lossy(),
            dir.display()
        );
    }
    Ok(())
}

pub(super) fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Where an interrupt saves without `--checkpoint-dir`: `OUT.checkpoint/`.
pub(super) fn interrupt_dir(out: &Path) -> PathBuf {
    let mut dir = out.as_os_str().to_owned();
    dir.push(".checkpoint");
    PathBuf::from(dir)
}
