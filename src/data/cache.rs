//! Decoded image trees on disk, so that a run over files that have not
//! changed reads their pixels back instead of decoding them again.
//!
//! One file per split folder, `DIR/images-<hash of the folder's path>.bin`,
//! in the folder [`default_dir`] names unless `--cache-dir` says otherwise.
//! It is keyed on the split's file list: every file's path, class, size and
//! modification time, so a changed, added or removed file (or class) makes
//! it stale, and the next load decodes again and replaces it. It is written
//! atomically, and checked whole (a CRC-32 of all its bytes) when read: a
//! torn or corrupt cache is rebuilt, never trusted.
//!
//! Layout (integers little-endian):
//! `MAGIC`, version u32, key `[16]`, images u64, classes u32, then each class
//! name (u32 length, UTF-8), skipped files u32, then each (u32 length, path
//! bytes, u32 length, reason), md5 hex `[32]`, labels (u32 each), pixels
//! ([`PLANAR_BYTES`] each), CRC-32 of everything before it, u32.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use md5::{Digest, Md5};

use super::decode::PLANAR_BYTES;
use super::image_folder::{Decoded, Listing};

/// The environment variable naming the cache folder.
pub const ENV: &str = "TCH_CIFAR_CACHE_DIR";
const MAGIC: &[u8; 16] = b"tch-cifar images";
/// Bumped whenever the layout or the decoding changes, so that pixels made
/// another way are never read back.
const VERSION: u32 = 1;

/// `$TCH_CIFAR_CACHE_DIR`, else `$XDG_CACHE_HOME/tch-cifar`, else
/// `~/.cache/tch-cifar`; `None` when none of them is set.
pub fn default_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    var(ENV).map(PathBuf::from).or_else(|| {
        var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("tch-cifar"))
    })
}

/// The cache file for the split folder `root`.
pub fn file_for(dir: &Path, root: &Path) -> PathBuf {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let hash = super::download::hex(&Md5::digest(root.as_os_str().as_encoded_bytes()));
    dir.join(format!("images-{}.bin", &hash[..16]))
}

/// What the cache of `listing` must have been made from.
pub fn key(listing: &Listing) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(VERSION.to_le_bytes());
    for class in &listing.classes {
        md5.update((class.len() as u64).to_le_bytes());
        md5.update(class.as_bytes());
    }
    for entry in &listing.files {
        let path = entry
            .path
            .strip_prefix(&listing.root)
            .unwrap_or(&entry.path);
        let path = path.as_os_str().as_encoded_bytes();
        md5.update((path.len() as u64).to_le_bytes());
        md5.update(path);
        md5.update((entry.label as u64).to_le_bytes());
        md5.update(entry.len.to_le_bytes());
        md5.update(entry.modified_ns.to_le_bytes());
    }
    md5.finalize().into()
}

/// The cached split in `path` if it was made with `key`; `Ok(None)` when
/// there is none or it is stale, an error when it is unreadable or corrupt.
pub fn read(path: &Path, key: &[u8; 16]) -> Result<Option<Decoded>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display())))
        }
    };
    let corrupt = |what: &str| anyhow!("the image cache {} is corrupt ({what})", path.display());
    if bytes.len() < 4 {
        return Err(corrupt("too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let mut crc32 = flate2::Crc::new();
    crc32.update(body);
    if crc32.sum().to_le_bytes() != crc {
        return Err(corrupt("its checksum does not match"));
    }
    let mut r = Reader { bytes: body, at: 0 };
    let parsed = (|| -> Option<Option<Decoded>> {
        if r.take(MAGIC.len())? != MAGIC || r.u32()? != VERSION {
            return Some(None);
        }
        if r.take(16)? != key {
            return Some(None);
        }
        let n = usize::try_from(r.u64()?).ok()?;
        let classes = (0..r.u32()?)
            .map(|_| r.string())
            .collect::<Option<Vec<String>>>()?;
        let skipped = (0..r.u32()?)
            .map(|_| {
                let path = PathBuf::from(r.string()?);
                Some((path, r.string()?))
            })
            .collect::<Option<Vec<_>>>()?;
        let md5 = std::str::from_utf8(r.take(32)?).ok()?.to_string();
        let labels = r
            .take(n.checked_mul(4)?)?
            .chunks_exact(4)
            .map(|b| i64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))))
            .collect::<Vec<i64>>();
        if labels.iter().any(|&l| l as usize >= classes.len()) {
            return None;
        }
        let pixels = r.take(n.checked_mul(PLANAR_BYTES)?)?.to_vec();
        (r.at == r.bytes.len()).then_some(Some(Decoded {
            classes,
            labels,
            pixels,
            md5,
            skipped,
        }))
    })();
    parsed.ok_or_else(|| corrupt("its contents do not add up"))
}

/// Writes `decoded` as the cache in `path` for `key`, atomically.
pub fn write(path: &Path, key: &[u8; 16], decoded: &Decoded) -> Result<()> {
    let dir = crate::util::files::parent_dir(path);
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    let mut out = Vec::with_capacity(decoded.pixels.len() + 4 * decoded.labels.len() + 4096);
    out.extend_from_slice(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend_from_slice(key);
    out.extend((decoded.labels.len() as u64).to_le_bytes());
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    out.extend((decoded.classes.len() as u32).to_le_bytes());
    for class in &decoded.classes {
        string(&mut out, class);
    }
    out.extend((decoded.skipped.len() as u32).to_le_bytes());
    for (file, why) in &decoded.skipped {
        string(&mut out, &file.to_string_lossy());
        string(&mut out, why);
    }
    ensure!(decoded.md5.len() == 32, "an md5 in hex has 32 digits");
    out.extend_from_slice(decoded.md5.as_bytes());
    for &label in &decoded.labels {
        out.extend(
            u32::try_from(label)
                .context("a label past u32")?
                .to_le_bytes(),
        );
    }
    out.extend_from_slice(&decoded.pixels);
    let mut crc32 = flate2::Crc::new();
    crc32.update(&out);
    out.extend(crc32.sum().to_le_bytes());
    crate::util::files::write_atomically(path, |tmp| {
        std::fs::write(tmp, &out).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Decoded {
        Decoded {
            classes: vec!["a".into(), "b".into()],
            labels: vec![1, 0, 1],
            pixels: (0..3 * PLANAR_BYTES).map(|i| (i % 251) as u8).collect(),
            md5: "0123456789abcdef0123456789abcdef".into(),
            skipped: vec![(
                PathBuf::from("x/bad.jpg"),
                "x/bad.jpg is not a readable image".into(),
            )],
        }
    }

    #[test]
    fn round_trips_and_refuses_other_keys_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/images.bin");
        let key = [7u8; 16];
        assert_eq!(read(&path, &key).unwrap(), None);
        write(&path, &key, &sample()).unwrap();
        assert_eq!(read(&path, &key).unwrap(), Some(sample()));
        assert_eq!(
            read(&path, &[8u8; 16]).unwrap(),
            None,
            "another key is stale"
        );
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(&path, &key).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read(&path, &key).is_err());
    }
}
