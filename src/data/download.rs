//! Getting the dataset onto disk: downloading the official
//! `cifar-10-binary.tar.gz` (md5-checked) or taking a local copy, and
//! unpacking only the expected entries of it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};

use super::{self as data, BATCHES_DIR, TEST_FILE, TRAIN_FILES};

/// The official archive on the CIFAR-10 home page.
pub const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The official archive's md5, as the home page lists it.
pub const OFFICIAL_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
/// How long the server may stay silent (connecting, answering, or in the
/// middle of the archive) before the download is given up, rather than
/// hanging forever on a stalled connection.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// Entries the archive may hold besides the six batch files; anything else
/// inside `cifar-10-batches-bin/` is skipped.
const EXTRA_FILES: [&str; 2] = ["batches.meta.txt", "readme.html"];

/// Where the archive comes from when the batch files are missing.
#[derive(Debug, Clone)]
pub enum Source {
    Url(String),
    Archive(PathBuf),
}

/// Returns the folder holding the batch files under `data_dir`, first
/// fetching and unpacking the archive when they are missing.
///
/// A folder that holds some batch files but not all is an error naming the
/// missing ones, not a reason to download 170 MB again. When fetching
/// fails, the folders this call created are removed again.
pub fn ensure_dataset(data_dir: &Path, source: &Source, md5: &str) -> Result<PathBuf> {
    if let Some(dir) = data::locate(data_dir) {
        if let Source::Archive(archive) = source {
            eprintln!(
                "note: the batch files are already in {}, so --archive {} was not used",
                dir.display(),
                archive.display()
            );
        }
        return Ok(dir);
    }
    check_not_partial(data_dir)?;
    let created: Vec<PathBuf> = data_dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    ensure!(
        !data_dir.is_file(),
        "the data directory {} is a file: --data-dir takes the folder of batch files",
        data_dir.display()
    );
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let existed = !created.iter().any(|d| d == data_dir);
    let fetched = fetch(data_dir, source, md5, existed);
    if fetched.is_err() {
        // Deepest first; remove_dir only removes empty folders.
        for dir in &created {
            let _ = std::fs::remove_dir(dir);
        }
    }
    fetched
}

/// Unpacks the archive `source` names into `data_dir`, downloading it
/// first from a URL; `existed` says whether `data_dir` was there before
/// (a folder that was not is often a mistyped `--data-dir`).
fn fetch(data_dir: &Path, source: &Source, md5: &str, existed: bool) -> Result<PathBuf> {
    match source {
        Source::Archive(archive) => {
            tracing::info!("unpacking {}", archive.display());
            check_md5(archive, md5)?;
            extract(archive, data_dir)
        }
        Source::Url(url) => {
            let archive = data_dir.join(ARCHIVE_NAME);
            if !archive.is_file() || check_md5(&archive, md5).is_err() {
                download(url, &archive, md5).with_context(|| {
                    let dir = data_dir.display();
                    let what = if existed {
                        format!("CIFAR-10 is not in {dir} and could not be downloaded")
                    } else {
                        format!(
                            "the data directory {dir} does not exist, and CIFAR-10 could not be \
                             downloaded into it"
                        )
                    };
                    format!(
                        "{what} (--data-dir DIR takes a folder that holds the batches or your \
                         images, --archive FILE a cifar-10-binary.tar.gz you have)"
                    )
                })?;
            }
            extract(&archive, data_dir)
        }
    }
}

/// Errors, naming the missing files, when `data_dir` (or its
/// `cifar-10-batches-bin/`) holds some of the six batch files but not all.
fn check_not_partial(data_dir: &Path) -> Result<()> {
    for dir in [data_dir.to_path_buf(), data_dir.join(BATCHES_DIR)] {
        let (present, missing): (Vec<PathBuf>, Vec<PathBuf>) = TRAIN_FILES
            .iter()
            .chain([&TEST_FILE])
            .map(|f| dir.join(f))
            .partition(|p| p.is_file());
        if !present.is_empty() && !missing.is_empty() {
            let (verb, pronoun) = if missing.len() == 1 {
                ("is", "it")
            } else {
                ("are", "them")
            };
            let missing: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "{} {verb} missing, though {} holds other CIFAR-10 batch files: restore \
                 {pronoun}, or remove the folder to fetch the dataset again",
                missing.join(", "),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Downloads `url` to `dest`, checking its md5 on the way; `dest` appears
/// only once the whole file has arrived and matched.
pub fn download(url: &str, dest: &Path, md5: &str) -> Result<()> {
    // The proxy that HTTP(S)_PROXY / ALL_PROXY name, less NO_PROXY's hosts.
    download_within(url, dest, md5, SILENCE_LIMIT, ureq::Proxy::try_from_env())
}

/// [`download`], giving up after `silence` without a byte from the server,
/// through `proxy` if one is given.
fn download_within(
    url: &str,
    dest: &Path,
    md5: &str,
    silence: Duration,
    proxy: Option<ureq::Proxy>,
) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(proxy)
        .timeout_connect(Some(silence))
        .timeout_recv_response(Some(silence))
        .timeout_per_read(Some(silence))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .with_context(|| format!("cannot download {url}"))?;
    // Said only once the server answers, so that a failure is one line.
    eprintln!("downloading {url} into {}", dir.display());
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = crate::util::report::byte_bar(total, "downloading CIFAR-10");
    let mut body = response.into_body().into_reader();
    // Written like every output: a temporary file, renamed onto `dest` only
    // once the whole archive has arrived and its md5 matched.
    crate::util::files::write_atomically(dest, |tmp| {
        let mut file =
            File::create(tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body.read(&mut buf).with_context(|| {
                format!(
                    "download of {url} broke off (the server sends nothing for {} s at most)",
                    silence.as_secs_f64()
                )
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        let got = hex(&hasher.finalize());
        ensure!(
            got.eq_ignore_ascii_case(md5),
            "download of {url} has md5 {got}, expected {md5}: the file is corrupt or not the \
             CIFAR-10 binary archive"
        );
        Ok(())
    })
}

/// Errors unless the file's md5 is `expected`.
pub fn check_md5(path: &Path, expected: &str) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Md5::new();
    std::io::copy(&mut file, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let got = hex(&hasher.finalize());
    ensure!(
        got.eq_ignore_ascii_case(expected),
        "{} has md5 {got}, expected {expected}: the archive is corrupt or not the CIFAR-10 \
         binary archive (pass --md5 to accept another archive)",
        path.display()
    );
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unpacks the batch files of a `cifar-10-binary.tar.gz` into
/// `data_dir/cifar-10-batches-bin/` and returns that folder.
///
/// Only `cifar-10-batches-bin/<known file>` entries are written; an entry
/// whose path could leave `data_dir` fails the whole extraction. Files go to
/// a temporary folder first, so a failure leaves no half-unpacked dataset.
pub fn extract(archive: &Path, data_dir: &Path) -> Result<PathBuf> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".cifar-10-unpack")
        .tempdir_in(data_dir)
        .with_context(|| format!("cannot write in {}", data_dir.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = tar
        .entries()
        .with_context(|| format!("{} is not a readable tar.gz archive", archive.display()))?;
    for entry in entries {
        let mut entry =
            entry.with_context(|| format!("{} is corrupt or truncated", archive.display()))?;
        let path = entry
            .path()
            .with_context(|| format!("{}: unreadable entry name", archive.display()))?
            .into_owned();
        let Some(name) = expected_name(&path, archive)? else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            bail!(
                "{}: entry {} is not a regular file",
                archive.display(),
                path.display()
            );
        }
        let out = staging.path().join(name);
        let mut dest =
            File::create(&out).with_context(|| format!("cannot write {}", out.display()))?;
        std::io::copy(&mut entry, &mut dest).with_context(|| {
            format!(
                "{} is corrupt or truncated (in {})",
                archive.display(),
                path.display()
            )
        })?;
    }
    let missing: Vec<&str> = TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .copied()
        .filter(|f| !staging.path().join(f).is_file())
        .collect();
    ensure!(
        missing.is_empty(),
        "{} lacks {}: not the CIFAR-10 binary archive",
        archive.display(),
        missing
            .iter()
            .map(|m| format!("{BATCHES_DIR}/{m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let target = data_dir.join(BATCHES_DIR);
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("cannot replace {}", target.display()))?;
    }
    let staging = staging.keep();
    std::fs::rename(&staging, &target)
        .with_context(|| format!("cannot move unpacked files to {}", target.display()))?;
    Ok(target)
}

/// The file name to unpack an entry as, `None` to skip it, or an error when
/// its path would escape the target folder.
fn expected_name(path: &Path, archive: &Path) -> Result<Option<&'static str>> {
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        bail!(
            "{}: entry {} would be written outside the data directory; refusing to unpack",
            archive.display(),
            path.display()
        );
    }
    let mut parts = path.components().filter(|c| *c != Component::CurDir);
    let (Some(dir), Some(file), None) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    if dir.as_os_str() != BATCHES_DIR {
        return Ok(None);
    }
    Ok(TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .chain(EXTRA_FILES.iter())
        .copied()
        .find(|f| file.as_os_str() == *f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_entries_are_refused() {
        let a = Path::new("a.tgz");
        assert!(expected_name(Path::new("../etc/passwd"), a).is_err());
        assert!(expected_name(Path::new("/etc/passwd"), a).is_err());
        assert!(expected_name(Path::new("cifar-10-batches-bin/../../x"), a).is_err());
        assert_eq!(
            expected_name(Path::new("./cifar-10-batches-bin/test_batch.bin"), a).unwrap(),
            Some("test_batch.bin")
        );
        assert_eq!(
            expected_name(Path::new("cifar-10-batches-bin/other"), a).unwrap(),
            None
        );
        assert_eq!(
            expected_name(Path::new("elsewhere/test_batch.bin"), a).unwrap(),
            None
        );
    }

    /// A server that sends the headers and part of the body, then goes
    /// silent with the connection open, fails the download instead of
    /// hanging it, and leaves no file behind.
    #[test]
    fn a_stalled_download_gives_up() {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/{ARCHIVE_NAME}", listener.local_addr().unwrap());
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let mut stream = stream;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
                .unwrap();
            // Silent, with the connection open, until the test is over.
            let _ = wait.recv();
        });
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(ARCHIVE_NAME);
        // No proxy, whatever the environment says: the server is local.
        let err = download_within(&url, &dest, OFFICIAL_MD5, Duration::from_secs(2), None)
            .expect_err("a stalled download must fail");
        assert!(
            format!("{err:#}").contains("broke off (the server sends nothing for 2 s at most)"),
            "{err:#}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        done.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn md5_of_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        check_md5(&p, "900150983cd24fb0d6963f7d28e17f72").unwrap();
        let err = check_md5(&p, OFFICIAL_MD5).unwrap_err().to_string();
        assert!(err.contains("900150983cd24fb0d6963f7d28e17f72"), "{err}");
    }
}
