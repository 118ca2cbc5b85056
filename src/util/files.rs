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
    match tempfile::tempfile_in(dir) {
        Ok(_) => Ok(()),
        Err(err) => {
            // The system's reason without tempfile's random file name.
            let err = err
                .raw_os_error()
                .map_or(err, std::io::Error::from_raw_os_error);
            let reason = unwritable_reason(dir, &err, file_system_type(dir).as_deref());
            Err(anyhow::Error::new(err).context(reason))
        }
    }
}

/// File systems through which the kernel shows its state: they exist as
/// folders, but take no new files (and refuse them with odd reasons, such
/// as `/proc`'s "No such file or directory").
const KERNEL_FILE_SYSTEMS: [&str; 14] = [
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "devpts",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
];

/// Why no file can be created in the existing folder `dir`, which failed
/// with `err`, on a file system of type `fs_type` (when known): a kernel
/// file system is named as such, since its error alone reads as nonsense.
fn unwritable_reason(dir: &Path, err: &std::io::Error, fs_type: Option<&str>) -> String {
    let dir = dir.display();
    match fs_type {
        Some(fs) if KERNEL_FILE_SYSTEMS.contains(&fs) => format!(
            "{dir} is on a {fs} file system, the kernel's view of its own state, which takes no \
             new files"
        ),
        _ if err.kind() == std::io::ErrorKind::NotFound => format!(
            "no file can be created in {dir}, though the folder exists (its file system takes \
             none)"
        ),
        _ => format!("{dir} is not writable"),
    }
}

/// The type of the file system `dir` is on ("ext4", "proc", …), from the
/// mount table: the mount point that holds it deepest. `None` off Linux or
/// when the table cannot be read.
fn file_system_type(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let table = std::fs::read_to_string("/proc/self/mounts").ok()?;
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let point = unescape_mount_field(fields.nth(1)?);
            let fs = fields.next()?;
            dir.starts_with(&point)
                .then(|| (Path::new(&point).components().count(), fs.to_string()))
        })
        // The last of equally deep mounts is the one on top.
        .max_by_key(|(depth, _)| *depth)
        .map(|(_, fs)| fs)
}

/// A mount table field with its octal escapes (`\040` for a space) undone.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

    #[test]
    fn the_reason_names_a_kernel_file_system() {
        let enoent = std::io::Error::from_raw_os_error(2);
        let proc = unwritable_reason(Path::new("/proc"), &enoent, Some("proc"));
        assert!(proc.starts_with("/proc is on a proc file system"), "{proc}");
        assert!(proc.contains("takes no new files"), "{proc}");
        let unknown = unwritable_reason(Path::new("/x"), &enoent, None);
        assert!(unknown.contains("though the folder exists"), "{unknown}");
        let denied = std::io::Error::from_raw_os_error(13);
        let plain = unwritable_reason(Path::new("/x"), &denied, Some("ext4"));
        assert_eq!(plain, "/x is not writable");
        assert_eq!(unescape_mount_field(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_field(r"/a\b"), r"/a\b");
    }

    /// Where the system has /proc, it is found to be one.
    #[test]
    #[cfg(target_os = "linux")]
    fn the_mount_table_tells_proc() {
        if Path::new("/proc/self/mounts").is_file() {
            assert_eq!(
                file_system_type(Path::new("/proc")).as_deref(),
                Some("proc")
            );
            assert_eq!(
                file_system_type(Path::new("/proc/self/fd")).as_deref(),
                Some("proc")
            );
        }
    }
}
