//! Images in class folders, torchvision's `ImageFolder` layout: a split's
//! folder holds one folder per class, `<split>/<class>/…/<image>`, and the
//! classes are the folder names in sorted order, so that class indices are
//! `ImageFolder`'s.
//!
//! Like `ImageFolder`, the files are taken by extension (torchvision's
//! `IMG_EXTENSIONS`, in any case), nested folders inside a class count, and
//! symlinked folders are followed, in the order of
//! `sorted(os.walk(class_dir, followlinks=True))`. Unlike it, hidden files
//! and folders (names starting with `.`) are skipped, and a symlink that
//! leads back into its own ancestors is an error rather than an endless walk.
//!
//! Each image is decoded by [`super::decode`] (RGB, 32x32), on every core,
//! and the split's pixels are kept in the [`super::cache`], so that the next
//! run over the same files reads them back instead.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::decode::{self, PLANAR_BYTES};
use super::{cache, Split, TEST_SPLIT_NAMES, TRAIN_SPLIT_NAME};

/// torchvision's `IMG_EXTENSIONS`: the files a class folder's images are.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// Whether a file name ends in one of [`IMG_EXTENSIONS`], in any case.
pub fn is_image_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy().to_lowercase();
    IMG_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// How a tree is loaded.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Leave out image files that do not decode, instead of failing.
    pub skip_bad_images: bool,
    /// The cache folder; `None` decodes every time.
    pub cache_dir: Option<PathBuf>,
}

/// An image tree's splits: each a folder of class folders.
#[derive(Debug, Clone)]
pub struct Tree {
    pub train: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub options: Options,
    /// Named by `--train-dir`/`--test-dir`, not found in `--data-dir`.
    pub from_flags: bool,
}

impl Tree {
    /// The tree in `dir` (`dir/train/`, and `dir/test/` or `dir/val/`), if
    /// it has either split.
    pub fn find(dir: &Path, options: Options) -> Option<Tree> {
        let train = Some(dir.join(TRAIN_SPLIT_NAME)).filter(|d| d.is_dir());
        let test = TEST_SPLIT_NAMES
            .iter()
            .map(|name| dir.join(name))
            .find(|d| d.is_dir());
        (train.is_some() || test.is_some()).then_some(Tree {
            train,
            test,
            options,
            from_flags: false,
        })
    }

    pub fn describe(&self) -> String {
        let show = |d: &Option<PathBuf>| d.as_ref().map(|d| d.display().to_string());
        match (show(&self.train), show(&self.test)) {
            (Some(a), Some(b)) => format!("the images in {a} and {b}"),
            (Some(a), None) | (None, Some(a)) => format!("the images in {a}"),
            (None, None) => "no images".to_string(),
        }
    }

    fn train_dir(&self) -> Result<&Path> {
        match (&self.train, &self.test) {
            (Some(dir), _) => Ok(dir),
            (None, Some(test)) if self.from_flags => bail!(
                "--test-dir {} names only the test images, and this command also needs training \
                 images: give --train-dir DIR too (--data-dir is not read with --test-dir)",
                test.display()
            ),
            (None, Some(test)) => bail!(
                "there is no training split beside {}: expected {}/<class>/<image> (or \
                 --train-dir DIR)",
                test.display(),
                crate::util::files::parent_dir(test)
                    .join(TRAIN_SPLIT_NAME)
                    .display()
            ),
            (None, None) => bail!("no training images: give --train-dir DIR"),
        }
    }

    fn test_dir(&self) -> Result<&Path> {
        match (&self.test, &self.train) {
            (Some(dir), _) => Ok(dir),
            (None, Some(train)) if self.from_flags => bail!(
                "--train-dir {} names only the training images, and this command also needs test \
                 images: give --test-dir DIR too (--data-dir is not read with --train-dir)",
                train.display()
            ),
            (None, Some(train)) => {
                let base = crate::util::files::parent_dir(train);
                bail!(
                    "there is no test split beside {}: expected {}/<class>/<image> or \
                     {}/<class>/<image> (or --test-dir DIR)",
                    train.display(),
                    base.join(TEST_SPLIT_NAMES[0]).display(),
                    base.join(TEST_SPLIT_NAMES[1]).display()
                )
            }
            (None, None) => bail!("no test images: give --test-dir DIR"),
        }
    }

    /// The training split, decoded (or read from the cache).
    pub fn load_train(&self) -> Result<Decoded> {
        load(&scan(self.train_dir()?)?, &self.options)
    }

    /// The test split, decoded (or read from the cache).
    pub fn load_test(&self) -> Result<Decoded> {
        load(&scan(self.test_dir()?)?, &self.options)
    }

    /// Both splits, after checking that their classes are the same. Neither
    /// is cached before both have loaded, so a bad training split leaves no
    /// cache of the test split behind.
    pub fn load_both(&self) -> Result<(Decoded, Decoded)> {
        let train = scan(self.train_dir()?)?;
        let test = scan(self.test_dir()?)?;
        check_same_classes(&train, &test)?;
        let (test, test_cache) = fetch(&test, &self.options)?;
        let (train, train_cache) = fetch(&train, &self.options)?;
        write_cache(test_cache, &test);
        write_cache(train_cache, &train);
        Ok((train, test))
    }
}

/// One image file of a split.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    /// The class index.
    pub label: usize,
    /// Size and modification time (ns since 1970), for the cache's key.
    pub len: u64,
    pub modified_ns: i128,
}

/// A split's classes and image files, in `ImageFolder`'s order.
#[derive(Debug, Clone)]
pub struct Listing {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub files: Vec<Entry>,
}

/// Lists the classes and image files of the split in `root`.
///
/// Errors name the folder: a missing or unreadable one, a split without
/// class folders or with only one, a class folder without images, and a
/// symlink that loops back to a folder it is in.
pub fn scan(root: &Path) -> Result<Listing> {
    let meta = std::fs::metadata(root)
        .with_context(|| format!("cannot read the image folder {}", root.display()))?;
    ensure!(
        meta.is_dir(),
        "{} is not a folder: expected a folder of class folders, {}/<class>/<image>",
        root.display(),
        root.display()
    );
    let mut classes = vec![];
    for (name, path) in read_dir_sorted(root)? {
        if is_hidden(&name) || !path.is_dir() {
            continue;
        }
        let Some(class) = name.to_str() else {
            bail!(
                "the class folder {} has a name that is not valid UTF-8",
                path.display()
            );
        };
        classes.push((class.to_string(), path));
    }
    ensure!(
        !classes.is_empty(),
        "{} holds no class folders: expected {}/<class>/<image>",
        root.display(),
        root.display()
    );
    ensure!(
        classes.len() >= 2,
        "{} has a single class folder, {}: a classifier needs two classes or more",
        root.display(),
        classes[0].0
    );
    let root_id = folder_id(root)?;
    let mut files = vec![];
    for (label, (_, dir)) in classes.iter().enumerate() {
        let mut found = vec![];
        let mut ancestors = vec![(root_id.clone(), root.to_path_buf())];
        walk(dir, &PathBuf::new(), &mut ancestors, &mut found)?;
        ensure!(
            !found.is_empty(),
            "the class folder {} holds no images (files ending in {})",
            dir.display(),
            IMG_EXTENSIONS.join(", ")
        );
        // sorted(os.walk(...)) orders by folder path, then by file name.
        found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        files.extend(found.into_iter().map(|f| Entry { label, ..f.2 }));
    }
    Ok(Listing {
        root: root.to_path_buf(),
        classes: classes.into_iter().map(|(c, _)| c).collect(),
        files,
    })
}

/// `dir`'s entries as (name, path), sorted by name.
fn read_dir_sorted(dir: &Path) -> Result<Vec<(std::ffi::OsString, PathBuf)>> {
    Ok(read_dir_typed(dir)?
        .into_iter()
        .map(|(name, path, _)| (name, path))
        .collect())
}

/// `dir`'s entries as (name, path, type), sorted by name; the type is the
/// entry's own (a symlink is a symlink), which most file systems give
/// without a `stat` per entry.
fn read_dir_typed(dir: &Path) -> Result<Vec<(std::ffi::OsString, PathBuf, std::fs::FileType)>> {
    let read = || -> std::io::Result<Vec<_>> {
        let mut out = vec![];
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            out.push((entry.file_name(), entry.path(), entry.file_type()?));
        }
        Ok(out)
    };
    let mut entries = read().with_context(|| format!("cannot read folder {}", dir.display()))?;
    entries.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
    Ok(entries)
}

/// A file's size and modification time (ns since 1970) for the cache's
/// key; a file that cannot be read (a broken symlink) gets (0, -1) and
/// keeps its place, to be named when it fails to decode.
fn stamp(path: &Path) -> (u64, i128) {
    std::fs::metadata(path)
        .map(|m| {
            let ns = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            (m.len(), ns)
        })
        .unwrap_or((0, -1))
}

/// What identifies a folder however it is reached: its canonical path.
fn folder_id(dir: &Path) -> Result<PathBuf> {
    dir.canonicalize()
        .with_context(|| format!("cannot read folder {}", dir.display()))
}

/// Collects the image files under `dir` (whose path relative to the class
/// folder is `rel`) as (folder bytes, name bytes, entry with label 0),
/// following symlinked folders unless one leads back to a folder in
/// `ancestors`.
fn walk(
    dir: &Path,
    rel: &Path,
    ancestors: &mut Vec<(PathBuf, PathBuf)>,
    found: &mut Vec<(Vec<u8>, Vec<u8>, Entry)>,
) -> Result<()> {
    let id = folder_id(dir)?;
    if let Some((_, ancestor)) = ancestors.iter().find(|(a, _)| *a == id) {
        bail!(
            "{} leads back to {}, a folder it is in (a symlink loop)",
            dir.display(),
            ancestor.display()
        );
    }
    ancestors.push((id, dir.to_path_buf()));
    for (name, path, kind) in read_dir_typed(dir)? {
        if is_hidden(&name) {
            continue;
        }
        let is_dir = kind.is_dir() || (kind.is_symlink() && path.is_dir());
        if is_dir {
            walk(&path, &rel.join(&name), ancestors, found)?;
        } else if is_image_name(&name) {
            let (len, modified_ns) = stamp(&path);
            found.push((
                rel.as_os_str().as_encoded_bytes().to_vec(),
                name.as_encoded_bytes().to_vec(),
                Entry {
                    path,
                    label: 0,
                    len,
                    modified_ns,
                },
            ));
        }
    }
    ancestors.pop();
    Ok(())
}

/// Errors, listing the differences, unless both splits have the same classes.
pub fn check_same_classes(train: &Listing, test: &Listing) -> Result<()> {
    if train.classes == test.classes {
        return Ok(());
    }
    let only = |a: &Listing, b: &Listing| -> String {
        let names: Vec<&str> = a
            .classes
            .iter()
            .filter(|c| !b.classes.contains(c))
            .map(String::as_str)
            .collect();
        match names.len() {
            0 => String::new(),
            _ => format!("only in {}: {}", a.root.display(), names.join(", ")),
        }
    };
    let differences: Vec<String> = [only(train, test), only(test, train)]
        .into_iter()
        .filter(|d| !d.is_empty())
        .collect();
    bail!(
        "the test split's classes differ from the training split's: {}",
        differences.join("; ")
    )
}

/// A split's images, decoded to 32x32 RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub classes: Vec<String>,
    pub labels: Vec<i64>,
    /// [`PLANAR_BYTES`] per image, in planar (CHW) RGB.
    pub pixels: Vec<u8>,
    /// Of the classes, labels and pixels: see [`Split::md5`].
    pub md5: String,
    /// The image files that did not decode (with `--skip-bad-images`), and why.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Decoded {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The planar pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * PLANAR_BYTES..(i + 1) * PLANAR_BYTES]
    }

    /// The split on `device`, normalized like the binary batches.
    pub fn to_split(&self, device: Device) -> Split {
        Split {
            images: normalize(&self.pixels).to_device(device),
            labels: Tensor::from_slice(&self.labels).to_device(device),
            md5: Some(self.md5.clone()),
            classes: self.classes.clone(),
        }
    }
}

/// `[N, 3, 32, 32]` planar u8 pixels as normalized f32, on the CPU, by a
/// table of the 256 values that [`super::normalize_into`]'s operations give
/// (so the values are bit-equal to the binary batches'), filled on every core.
fn normalize(pixels: &[u8]) -> Tensor {
    let levels = Tensor::arange(256, (Kind::Uint8, Device::Cpu));
    let mut table = Tensor::empty([256], (Kind::Float, Device::Cpu));
    super::normalize_into(&mut table, &levels);
    let table = Vec::<f32>::try_from(&table).expect("256 floats");
    let n = (pixels.len() / PLANAR_BYTES) as i64;
    let out = Tensor::empty([n, 3, 32, 32], (Kind::Float, Device::Cpu));
    // SAFETY: `out` is a new contiguous f32 tensor on the CPU of exactly
    // `pixels.len()` elements, and nothing else refers to its memory while
    // the slice lives. Filling it in place spares a copy of the whole split.
    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, pixels.len()) };
    dst.par_chunks_mut(1 << 16)
        .zip(pixels.par_chunks(1 << 16))
        .for_each(|(dst, src)| {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = table[s as usize];
            }
        });
    out
}

/// The split in `listing`, from the cache when it holds these very files
/// (same paths, sizes and modification times), else decoded and cached.
pub fn load(listing: &Listing, options: &Options) -> Result<Decoded> {
    let (decoded, pending) = fetch(listing, options)?;
    write_cache(pending, &decoded);
    Ok(decoded)
}

/// A cache file to write, and its key.
type PendingCache = Option<(PathBuf, [u8; 16])>;

/// Writes `decoded` into the pending cache file, if any. The cache only
/// saves time, so a run goes on without it.
fn write_cache(pending: PendingCache, decoded: &Decoded) {
    if let Some((file, key)) = pending {
        if let Err(err) = cache::write(&file, &key, decoded) {
            eprintln!("warning: the decoded images were not cached: {err:#}");
        }
    }
}

/// [`load`], leaving the cache file to write (when the split was decoded)
/// to the caller.
fn fetch(listing: &Listing, options: &Options) -> Result<(Decoded, PendingCache)> {
    let key = cache::key(listing);
    let cache_file = options
        .cache_dir
        .as_deref()
        .map(|dir| cache::file_for(dir, &listing.root));
    let cached = cache_file.as_deref().and_then(|file| {
        cache::read(file, &key).unwrap_or_else(|err| {
            eprintln!("warning: {err:#}; decoding the images again");
            None
        })
    });
    let (decoded, pending) = match cached {
        Some(decoded) => {
            tracing::info!("read {} from the cache", listing.root.display());
            (decoded, None)
        }
        None => (
            decode_listing(listing, options.skip_bad_images)?,
            cache_file.map(|file| (file, key)),
        ),
    };
    if !decoded.skipped.is_empty() {
        if !options.skip_bad_images {
            // Known from when the cache was built with --skip-bad-images.
            bail!("{}", bad_images_message(&decoded.skipped));
        }
        eprintln!(
            "warning: skipped {} image file{} in {} that did not decode:",
            decoded.skipped.len(),
            if decoded.skipped.len() == 1 { "" } else { "s" },
            listing.root.display()
        );
        for (_, why) in &decoded.skipped {
            eprintln!("  {why}");
        }
    }
    ensure!(
        !decoded.is_empty(),
        "no image in {} could be decoded",
        listing.root.display()
    );
    Ok((decoded, pending))
}

fn bad_images_message(bad: &[(PathBuf, String)]) -> String {
    let more = match bad.len() {
        1 => String::new(),
        n => format!(" (and {} more image files that do not decode)", n - 1),
    };
    format!(
        "{}{more}; --skip-bad-images leaves such files out",
        bad[0].1
    )
}

/// Decodes every file of `listing` on every core, showing a progress bar on
/// a terminal. A file that does not decode is an error naming it, or with
/// `skip_bad`, left out and listed in [`Decoded::skipped`].
pub fn decode_listing(listing: &Listing, skip_bad: bool) -> Result<Decoded> {
    let n = listing.files.len();
    let bar = crate::util::report::step_bar(n as u64);
    bar.set_prefix(format!("decoding {}", listing.root.display()));
    let mut pixels = vec![0u8; n * PLANAR_BYTES];
    let outcomes: Vec<Option<String>> = listing
        .files
        .par_iter()
        .zip(pixels.par_chunks_mut(PLANAR_BYTES))
        .map(|(entry, out)| {
            let outcome = decode::load_planar(&entry.path, out).err();
            bar.inc(1);
            outcome.map(|e| format!("{e:#}"))
        })
        .collect();
    bar.finish_and_clear();
    let bad: Vec<(PathBuf, String)> = listing
        .files
        .iter()
        .zip(&outcomes)
        .filter_map(|(entry, why)| why.clone().map(|w| (entry.path.clone(), w)))
        .collect();
    if !bad.is_empty() && !skip_bad {
        bail!("{}", bad_images_message(&bad));
    }
    let mut labels = Vec::with_capacity(n);
    let mut kept = 0;
    for (i, (entry, why)) in listing.files.iter().zip(&outcomes).enumerate() {
        if why.is_some() {
            continue;
        }
        if kept != i {
            pixels.copy_within(
                i * PLANAR_BYTES..(i + 1) * PLANAR_BYTES,
                kept * PLANAR_BYTES,
            );
        }
        labels.push(entry.label as i64);
        kept += 1;
    }
    pixels.truncate(kept * PLANAR_BYTES);
    let md5 = content_md5(&listing.classes, &labels, &pixels);
    Ok(Decoded {
        classes: listing.classes.clone(),
        labels,
        pixels,
        md5,
        skipped: bad,
    })
}

/// The md5 of a split's class names, labels and pixels.
pub fn content_md5(classes: &[String], labels: &[i64], pixels: &[u8]) -> String {
    let mut md5 = Md5::new();
    for class in classes {
        md5.update(class.as_bytes());
        md5.update(b"\n");
    }
    for label in labels {
        md5.update(label.to_le_bytes());
    }
    md5.update(pixels);
    super::download::hex(&md5.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_split_flag_alone_asks_for_the_other() {
        let options = || Options {
            skip_bad_images: false,
            cache_dir: None,
        };
        let only = |train: Option<&str>, test: Option<&str>| Tree {
            train: train.map(PathBuf::from),
            test: test.map(PathBuf::from),
            options: options(),
            from_flags: true,
        };
        let err = only(Some("imgs/train"), None).test_dir().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--train-dir imgs/train names only the training images"),
            "{err}"
        );
        assert!(err.to_string().contains("give --test-dir DIR too"), "{err}");
        let err = only(None, Some("imgs/test")).train_dir().unwrap_err();
        assert!(
            err.to_string().contains("give --train-dir DIR too"),
            "{err}"
        );
        // Found in --data-dir, a missing split is named where it was looked for.
        let found = Tree {
            from_flags: false,
            ..only(Some("imgs/train"), None)
        };
        let err = found.test_dir().unwrap_err().to_string();
        assert!(
            err.starts_with("there is no test split beside imgs/train"),
            "{err}"
        );
    }

    fn png(path: &Path, colour: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(32, 32, image::Rgb(colour))
            .save(path)
            .unwrap();
    }

    #[test]
    fn extensions_are_torchvisions_in_any_case() {
        for name in [
            "a.jpg", "b.JPEG", "c.Png", "d.ppm", "e.bmp", "f.pgm", "g.TIF", "h.tiff", "i.webp",
        ] {
            assert!(is_image_name(OsStr::new(name)), "{name}");
        }
        for name in ["a.gif", "notes.txt", "jpg", "a.jpg.bak", "a.svg"] {
            assert!(!is_image_name(OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn classes_sort_by_code_point_and_nested_files_follow_os_walk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for class in ["b", "B", "a_x", "a-x", "a"] {
            png(&root.join(class).join("1.png"), [1, 2, 3]);
        }
        png(&root.join("a/sub/0.png"), [0; 3]);
        png(&root.join("a/sub-2/0.png"), [0; 3]);
        png(&root.join("a/sub/deeper/0.png"), [0; 3]);
        png(&root.join("a/0.png"), [0; 3]);
        std::fs::write(root.join("a/notes.txt"), b"not an image").unwrap();
        png(&root.join("a/.hidden.png"), [0; 3]);
        png(&root.join(".cache/1.png"), [0; 3]);
        let listing = scan(root).unwrap();
        assert_eq!(listing.classes, ["B", "a", "a-x", "a_x", "b"]);
        let a: Vec<String> = listing
            .files
            .iter()
            .filter(|e| e.label == 1)
            .map(|e| {
                e.path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        // By folder as a string: "a/sub" < "a/sub-2" < "a/sub/deeper", since '-' < '/'.
        assert_eq!(
            a,
            [
                "a/0.png",
                "a/1.png",
                "a/sub/0.png",
                "a/sub-2/0.png",
                "a/sub/deeper/0.png"
            ]
        );
    }

    #[test]
    fn bad_layouts_name_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        std::fs::create_dir(&root).unwrap();
        let err = scan(&root).unwrap_err().to_string();
        assert!(err.contains("holds no class folders"), "{err}");
        png(&root.join("cat/1.png"), [0; 3]);
        let err = scan(&root).unwrap_err().to_string();
        assert!(err.contains("single class folder, cat"), "{err}");
        std::fs::create_dir(root.join("dog")).unwrap();
        std::fs::write(root.join("dog/readme.txt"), b"").unwrap();
        let err = scan(&root).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "class folder {} holds no images",
                root.join("dog").display()
            )),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_folders_are_followed_and_loops_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        png(&dir.path().join("elsewhere/x.png"), [0; 3]);
        png(&root.join("cat/1.png"), [0; 3]);
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), root.join("dog")).unwrap();
        let listing = scan(&root).unwrap();
        assert_eq!(listing.classes, ["cat", "dog"]);
        assert_eq!(listing.files.len(), 2);
        std::os::unix::fs::symlink(&root, root.join("cat/again")).unwrap();
        let err = scan(&root).unwrap_err().to_string();
        assert!(err.contains("a symlink loop"), "{err}");
    }

    #[test]
    fn bad_images_are_named_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        png(&root.join("a/1.png"), [10, 20, 30]);
        png(&root.join("b/2.png"), [40, 50, 60]);
        std::fs::write(root.join("b/broken.jpg"), b"not a jpeg").unwrap();
        let listing = scan(root).unwrap();
        let err = decode_listing(&listing, false).unwrap_err().to_string();
        assert!(
            err.contains("broken.jpg") && err.contains("--skip-bad-images"),
            "{err}"
        );
        let d = decode_listing(&listing, true).unwrap();
        assert_eq!(d.labels, [0, 1]);
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(d.image(1)[0], 40);
        assert_eq!(d.image(1)[2048], 60);
        let split = d.to_split(Device::Cpu);
        let v = split.images.double_value(&[0, 0, 0, 0]);
        assert_eq!(v as f32, ((10.0f32 / 255.0) - 0.5) / 0.5);
    }
}
