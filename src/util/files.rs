//! Writing output files so that a crash, a kill or a full disk never leaves
//! a torn file at the destination, and telling whether two paths are one file.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};

/// Calls `write` on a temporary path in `path`'s folder, syncs the result
/// and renames it onto `path`. On any error the temporary file is removed
/// and `path` keeps its previous content, if it had one.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The temporary name ends in the destination's extension, since some
    // writers (image encoders) pick the format from it.
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(&format!(".tmp{ext}"))
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "cannot write {}: cannot create a file in {}",
                path.display(),
                dir.display()
            )
        })?;
    let tmp_path = tmp.into_temp_path();
    write(&tmp_path)?;
    make_readable(&tmp_path)?;
    File::open(&tmp_path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp_path
        .persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // Make the rename itself durable.
    sync_dir(dir);
    Ok(())
}

/// Whether a file name is one of [`write_atomically`]'s temporary files
/// (`.NAME.RANDOM.tmp` or `.NAME.RANDOM.tmp.EXT`), left behind only by a kill.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(".tmp") || name.contains(".tmp."))
}

/// Fails early, before hours of training, when `path` cannot be written.
pub fn check_writable(path: &Path) -> Result<()> {
    // A trailing slash (or `.`, `..`) names a directory, whether or not it
    // exists yet; Path drops a trailing `.` from its components.
    let text = path.as_os_str().to_string_lossy();
    let names_a_dir =
        ["/", "/.", "/.."].iter().any(|end| text.ends_with(end)) || text == "." || text == "..";
    if path.is_dir() || names_a_dir {
        anyhow::bail!(
            "cannot write {}: that is a directory; give a file name",
            path.display()
        );
    }
    // Writes rename a new file onto the path, which would replace a device
    // or a pipe (/dev/null, say) with a plain file.
    if path.exists() && !path.is_file() {
        anyhow::bail!(
            "cannot write {}: it is not a regular file; give a file name",
            path.display()
        );
    }
    check_dir_writable(parent_dir(path)).with_context(|| format!("cannot write {}", path.display()))
}

/// Fails unless files can be created in the existing directory `dir`.
pub fn check_dir_writable(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    if !dir.is_dir() {
        anyhow::bail!("directory {} does not exist", dir.display());
    }
    tempfile::tempfile_in(dir).with_context(|| format!("{} is not writable", dir.display()))?;
    Ok(())
}

/// Gives a temporary file the usual 0644 of an output file before it is
/// renamed into place: `tempfile` creates it 0600, which the rename keeps.
fn make_readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
    }
    Ok(())
}

/// Best-effort fsync of a directory, so that entries just created or
/// renamed in it survive a power cut.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether `a` and `b` name one file. Existing files are compared by
/// device and inode, so a symlink or a hard link to a file is that file;
/// paths that do not exist yet by their canonical folder and name, so
/// `x.pt` and `./sub/../x.pt` are one file too.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => same_inode(&ma, &mb, a, b),
        (Err(_), Err(_)) => resolved(a) == resolved(b),
        // One exists and the other does not: two files.
        _ => false,
    }
}

#[cfg(unix)]
fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata, _: &Path, _: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[cfg(not(unix))]
fn same_inode(_: &std::fs::Metadata, _: &std::fs::Metadata, a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// `path` with its folder made canonical (the file itself need not exist).
fn resolved(path: &Path) -> std::path::PathBuf {
    match (parent_dir(path).canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// The folder `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomically(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );

        write_atomically(&path, |tmp| Ok(std::fs::write(tmp, b"new")?)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn unwritable_destinations_are_caught_early() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_writable(&dir.path().join("no/such/dir/w.safetensors")).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        check_writable(&dir.path().join("w.safetensors")).unwrap();
        for name in [".", "new/", "new/.", "new/.."] {
            let err = check_writable(&dir.path().join(name)).unwrap_err();
            assert!(err.to_string().contains("that is a directory"), "{err}");
        }
        let err = check_writable(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
