//! Image trees in torchvision's `ImageFolder` layout, end to end: the image
//! modes and sizes that become 32x32 RGB, the files that are ignored, the
//! cache (a hit, stale after an edit, an added or a removed file, rebuilt
//! when corrupt), every bad input (a clean error naming the file or folder,
//! and nothing written), and a three-class tree that trains, evaluates,
//! predicts, draws samples and resumes from a checkpoint with its own
//! class names. The trees are made here, of small PNG and JPEG files.

mod util;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use tch_cifar::data::image_folder::{self, Options};
use util::*;

/// A flat 32x32 PNG of one colour at `path`, creating its folders.
fn png(path: &Path, colour: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(32, 32, image::Rgb(colour))
        .save(path)
        .unwrap();
}

/// A PNG file from its IHDR fields, palette and raw scanlines (each row
/// with its filter byte), written by hand for the modes the `image` crate
/// does not write (palettes).
fn raw_png(path: &Path, w: u32, h: u32, depth: u8, colour_type: u8, plte: &[u8], rows: &[u8]) {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc.sum().to_be_bytes());
        c
    };
    let mut header = w.to_be_bytes().to_vec();
    header.extend(h.to_be_bytes());
    header.extend([depth, colour_type, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &header));
    if !plte.is_empty() {
        png.extend(chunk(b"PLTE", plte));
    }
    let mut zlib = flate2::write::ZlibEncoder::new(vec![], flate2::Compression::fast());
    zlib.write_all(rows).unwrap();
    png.extend(chunk(b"IDAT", &zlib.finish().unwrap()));
    png.extend(chunk(b"IEND", b""));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, png).unwrap();
}

/// A PNG whose header says 20000x20000 (1.2 GB of RGB): a decompression bomb.
fn bomb(path: &Path) {
    raw_png(path, 20_000, 20_000, 8, 2, &[], &[0; 64]);
}

/// Pixel (x, y) of image `i` of `d`, as RGB.
fn pixel(d: &image_folder::Decoded, i: usize, x: usize, y: usize) -> [u8; 3] {
    let img = d.image(i);
    [0, 1, 2].map(|c| img[c * 1024 + y * 32 + x])
}

fn no_cache() -> Options {
    Options::default()
}

#[test]
fn modes_and_sizes_become_32x32_rgb_and_other_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Class `modes`: one image per mode, names sorted in this order.
    let m = root.join("modes");
    std::fs::create_dir_all(&m).unwrap();
    image::GrayImage::from_pixel(32, 32, image::Luma([77]))
        .save(m.join("a-gray.png"))
        .unwrap();
    image::RgbaImage::from_pixel(32, 32, image::Rgba([10, 20, 30, 0]))
        .save(m.join("b-rgba.png"))
        .unwrap();
    image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(32, 32, image::Luma([0xc8ff]))
        .save(m.join("c-gray16.png"))
        .unwrap();
    image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
        32,
        32,
        image::Rgb([0x1200, 0x34ff, 0xff00]),
    )
    .save(m.join("d-rgb16.png"))
    .unwrap();
    // Palette: index 1 is (200, 100, 50); every pixel uses it.
    let rows: Vec<u8> = (0..32)
        .flat_map(|_| [0u8].into_iter().chain([1u8; 32]))
        .collect();
    raw_png(
        &m.join("e-palette.png"),
        32,
        32,
        8,
        3,
        &[0, 0, 0, 200, 100, 50],
        &rows,
    );
    image::RgbImage::from_pixel(32, 32, image::Rgb([90, 60, 30]))
        .save(m.join("f-bitmap.BMP"))
        .unwrap();
    // Class `sizes`: resized to 32x32, a flat colour stays that colour.
    let s = root.join("sizes");
    std::fs::create_dir_all(&s).unwrap();
    for (name, w, h) in [
        ("big.png", 640, 480),
        ("tall.png", 7, 300),
        ("tiny.png", 1, 1),
    ] {
        image::RgbImage::from_pixel(w, h, image::Rgb([40, 140, 240]))
            .save(s.join(name))
            .unwrap();
    }
    let jpeg = s.join("photo.JPG");
    image::RgbImage::from_pixel(100, 60, image::Rgb([128, 128, 128]))
        .save_with_format(&jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    // Ignored: other extensions, hidden files and folders (macOS's `._`
    // files are not images at all).
    std::fs::write(s.join("notes.txt"), b"not an image").unwrap();
    std::fs::write(s.join("image.gif"), b"GIF89a").unwrap();
    std::fs::write(s.join("._photo.jpg"), b"resource fork").unwrap();
    std::fs::write(s.join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    png(&root.join(".thumbnails/x.png"), [1, 1, 1]);
    png(&s.join(".hidden/x.png"), [1, 1, 1]);
    std::fs::write(root.join("README.md"), b"a file beside the classes").unwrap();

    let listing = image_folder::scan(root).unwrap();
    assert_eq!(listing.classes, ["modes", "sizes"]);
    let names: Vec<String> = listing
        .files
        .iter()
        .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "a-gray.png",
            "b-rgba.png",
            "c-gray16.png",
            "d-rgb16.png",
            "e-palette.png",
            "f-bitmap.BMP",
            "big.png",
            "photo.JPG",
            "tall.png",
            "tiny.png"
        ]
    );
    let d = image_folder::load(&listing, &no_cache()).unwrap();
    assert_eq!(d.labels, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
    assert_eq!(pixel(&d, 0, 5, 5), [77; 3], "gray is copied into R, G, B");
    assert_eq!(pixel(&d, 1, 5, 5), [10, 20, 30], "alpha is dropped");
    assert_eq!(pixel(&d, 2, 5, 5), [0xc8; 3], "16-bit gray: its high byte");
    assert_eq!(
        pixel(&d, 3, 5, 5),
        [0x12, 0x34, 0xff],
        "16-bit RGB: high bytes"
    );
    assert_eq!(pixel(&d, 4, 5, 5), [200, 100, 50], "the palette's colour");
    assert_eq!(pixel(&d, 5, 5, 5), [90, 60, 30]);
    for i in [6, 8, 9] {
        assert_eq!(pixel(&d, i, 31, 31), [40, 140, 240], "image {i}");
    }
    let grey = pixel(&d, 7, 16, 16);
    assert!(grey.iter().all(|&v| v.abs_diff(128) <= 2), "{grey:?}");
}

/// A tree of `per_class` flat PNGs per class in `DIR/train` and half as
/// many in `DIR/test`, each class its own colour (with a little noise).
fn make_tree(dir: &Path, classes: &[&str], per_class: usize) {
    for (c, class) in classes.iter().enumerate() {
        for (split, n) in [("train", per_class), ("test", per_class.div_ceil(2))] {
            for i in 0..n {
                let base = [(c * 110) as u8, 255 - (c * 110) as u8, (c * 60) as u8];
                let img = image::RgbImage::from_fn(32, 32, |x, y| {
                    let noise = ((x * 7 + y * 13 + i as u32 * 31) % 17) as u8;
                    image::Rgb(base.map(|v| v.saturating_add(noise)))
                });
                let path = dir.join(split).join(class).join(format!("{i:03}.png"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                img.save(path).unwrap();
            }
        }
    }
}

/// Sets `path`'s modification time to `seconds` after 2020.
fn set_mtime(path: &Path, seconds: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_577_836_800 + seconds);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn the_cache_is_used_then_invalidated_and_rebuilt_when_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    png(&root.join("a/1.png"), [10, 0, 0]);
    png(&root.join("a/2.png"), [20, 0, 0]);
    png(&root.join("b/1.png"), [30, 0, 0]);
    for f in ["a/1.png", "a/2.png", "b/1.png"] {
        set_mtime(&root.join(f), 100);
    }
    let cache_dir = dir.path().join("cache");
    let options = Options {
        skip_bad_images: false,
        cache_dir: Some(cache_dir.clone()),
    };
    let load = || image_folder::load(&image_folder::scan(&root).unwrap(), &options).unwrap();
    let first = load();
    let cache_files: Vec<PathBuf> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cache_files.len(), 1, "{cache_files:?}");
    assert!(
        cache_files[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("images-"),
        "{cache_files:?}"
    );

    // A hit: a file changed behind the key's back (same size, same time)
    // still reads as the cached pixels, so nothing was decoded.
    png(&root.join("a/1.png"), [11, 0, 0]);
    set_mtime(&root.join("a/1.png"), 100);
    assert_eq!(load(), first, "the cache must be read");

    // An edit (a new modification time) makes it stale.
    set_mtime(&root.join("a/1.png"), 200);
    let edited = load();
    assert_eq!(pixel(&edited, 0, 0, 0), [11, 0, 0]);

    // An added file, then a removed one.
    png(&root.join("b/2.png"), [40, 0, 0]);
    let added = load();
    assert_eq!(added.labels, [0, 0, 1, 1]);
    assert_eq!(pixel(&added, 3, 0, 0), [40, 0, 0]);
    std::fs::remove_file(root.join("a/2.png")).unwrap();
    let removed = load();
    assert_eq!(removed.labels, [0, 1, 1]);
    assert_eq!(pixel(&removed, 1, 0, 0), [30, 0, 0]);
    assert_eq!(load(), removed);

    // A corrupt cache is rebuilt, not trusted; then it is sound again.
    let file = &cache_files[0];
    let mut bytes = std::fs::read(file).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(file, &bytes).unwrap();
    let key = tch_cifar::data::cache::key(&image_folder::scan(&root).unwrap());
    assert!(tch_cifar::data::cache::read(file, &key).is_err());
    assert_eq!(load(), removed);
    assert_eq!(
        tch_cifar::data::cache::read(file, &key).unwrap(),
        Some(removed.clone())
    );
    std::fs::write(file, b"garbage").unwrap();
    assert_eq!(load(), removed);
}

/// A folder to run `tch-cifar` in, holding a good tree in `data/`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        make_tree(&dir.path().join("data"), &["cat", "dog", "eel"], 4);
        Scratch { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, args: &[&str]) -> Output {
        tch_cifar()
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// `train` on `data/` (cache in `cache/`) must fail with one error line
    /// holding every needle, leaving the folder as it was: no weights, no
    /// cache, no checkpoint.
    fn train_refused(&self, extra: &[&str], needles: &[&str]) -> String {
        let before = tree(self.dir.path());
        let mut args = vec![
            "train",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--cache-dir",
            "cache",
            "--out",
            "w.safetensors",
        ];
        if !extra.contains(&"--data-dir") {
            args.extend(["--data-dir", "data"]);
        }
        args.extend(extra);
        let out = self.run(&args);
        let line = fails_cleanly(&out, needles);
        assert_eq!(
            tree(self.dir.path()),
            before,
            "{extra:?} left files behind: {line}"
        );
        line
    }
}

#[test]
fn bad_images_are_named_and_skipped_only_when_asked() {
    let sc = Scratch::new();
    let bad = sc.path("data/train/dog/broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff not really a JPEG").unwrap();
    sc.train_refused(&[], &["data/train/dog/broken.jpg", "--skip-bad-images"]);
    // An empty file with an image extension is as bad.
    std::fs::write(sc.path("data/test/eel/empty.png"), b"").unwrap();
    sc.train_refused(&[], &["empty.png"]);
    std::fs::remove_file(sc.path("data/test/eel/empty.png")).unwrap();

    let out = sc.run(&[
        "train",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
        "--out",
        "w.safetensors",
        "--skip-bad-images",
    ]);
    ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains("skipped 1 image file") && err.contains("broken.jpg"),
        "{err}"
    );
    assert!(sc.path("w.safetensors").is_file());
    // From the cache, the skipped file is still reported, and without
    // --skip-bad-images still refused.
    let err = stderr(&sc.run(&[
        "samples",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
        "--out",
        "s.png",
        "--skip-bad-images",
    ]));
    assert!(err.contains("broken.jpg"), "{err}");
    let out = sc.run(&[
        "samples",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
        "--out",
        "t.png",
    ]);
    fails_cleanly(&out, &["broken.jpg"]);
    assert!(!sc.path("t.png").exists());
}

#[test]
fn a_decompression_bomb_is_refused_unread() {
    let sc = Scratch::new();
    bomb(&sc.path("data/train/cat/huge.png"));
    sc.train_refused(&[], &["huge.png", "too large to decode"]);
}

#[test]
fn bad_trees_name_the_folder() {
    let sc = Scratch::new();
    // A class folder without images.
    std::fs::create_dir_all(sc.path("data/train/fox")).unwrap();
    std::fs::write(sc.path("data/train/fox/notes.txt"), b"").unwrap();
    sc.train_refused(&[], &["data/train/fox", "holds no images"]);
    std::fs::remove_dir_all(sc.path("data/train/fox")).unwrap();

    // Test classes that differ from the training classes.
    std::fs::rename(sc.path("data/test/eel"), sc.path("data/test/emu")).unwrap();
    sc.train_refused(
        &[],
        &["classes differ", "only in", "train: eel", "test: emu"],
    );
    std::fs::rename(sc.path("data/test/emu"), sc.path("data/test/eel")).unwrap();

    // A split with a single class.
    let one = sc.path("one");
    make_tree(&one, &["cat"], 2);
    sc.train_refused(&["--data-dir", "one"], &["single class folder, cat"]);

    // An empty tree.
    std::fs::create_dir_all(sc.path("empty/train")).unwrap();
    std::fs::create_dir_all(sc.path("empty/test")).unwrap();
    sc.train_refused(
        &["--data-dir", "empty"],
        &["empty/train", "holds no class folders"],
    );

    // No test split.
    make_tree(&sc.path("half"), &["cat", "dog"], 2);
    std::fs::remove_dir_all(sc.path("half/test")).unwrap();
    sc.train_refused(&["--data-dir", "half"], &["no test split", "half/test"]);

    // A folder of class folders given as the data folder: neither layout.
    sc.train_refused(
        &["--data-dir", "data/train"],
        &["is neither", "train/<class>/<image>"],
    );
}

#[cfg(unix)]
#[test]
fn symlinked_folders_are_followed_and_loops_are_errors() {
    let sc = Scratch::new();
    // A class folder elsewhere, linked in: followed.
    make_tree(&sc.path("more"), &["cat", "dog", "eel"], 2);
    std::os::unix::fs::symlink(sc.path("more/train/cat"), sc.path("data/train/cat/linked"))
        .unwrap();
    let listing = image_folder::scan(&sc.path("data/train")).unwrap();
    assert_eq!(listing.files.iter().filter(|e| e.label == 0).count(), 6);
    // A link back up the tree: a loop, refused.
    std::os::unix::fs::symlink(sc.path("data/train"), sc.path("data/train/dog/up")).unwrap();
    sc.train_refused(&[], &["data/train/dog/up", "a symlink loop"]);
}

#[cfg(unix)]
#[test]
fn an_unreadable_folder_is_an_error() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let sc = Scratch::new();
    let weights = sc.path("w.safetensors");
    tch_cifar::nets::tutorial::Model::with_classes(
        tch::Device::Cpu,
        Some(1),
        vec!["cat".into(), "dog".into(), "eel".into()],
    )
    .save(&weights)
    .unwrap();
    let locked = sc.path("data/test/dog");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads any folder, so as root the command runs as `nobody`, who
    // can reach the scratch folder but not into the locked one.
    std::fs::set_permissions(sc.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = tch_cifar();
    cmd.args([
        "evaluate",
        "--device",
        "cpu",
        "--no-cache",
        "--weights",
        s(&weights),
        "--data-dir",
        s(&sc.path("data")),
    ]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    fails_cleanly(&out, &["cannot read folder", "data/test/dog"]);
}

#[test]
fn a_three_class_tree_trains_evaluates_predicts_and_resumes_with_its_names() {
    let sc = Scratch::new();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--device",
            "cpu",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "0.01",
            "--log-every",
            "3",
            "--data-dir",
            "data",
            "--cache-dir",
            "cache",
        ];
        args.extend(extra);
        ok(&sc.run(&args))
    };
    let out = train(&["--epochs", "2", "--out", "w.safetensors"]);
    assert!(out.contains("Finished Training"), "{out}");
    assert!(
        out.contains("Accuracy of the network on the 6 test images:"),
        "{out}"
    );
    for class in ["cat  ", "dog  ", "eel  "] {
        assert!(
            out.contains(&format!("Accuracy for class: {class} is")),
            "{out}"
        );
    }
    let truth = out
        .lines()
        .find(|l| l.starts_with("GroundTruth:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(truth, "GroundTruth:  cat   cat   dog   dog  ");

    // evaluate prints the same lines, and the JSON names the classes.
    let eval = ok(&sc.run(&[
        "evaluate",
        "--device",
        "cpu",
        "--weights",
        "w.safetensors",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
        "--confusion",
        "c.png",
    ]));
    let tail: String = out
        .lines()
        .skip_while(|l| !l.starts_with("Accuracy of"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(eval.trim_end(), tail);
    assert!(sc.path("c.png").is_file());
    let json = ok(&sc.run(&[
        "evaluate",
        "--json",
        "--device",
        "cpu",
        "--weights",
        "w.safetensors",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
    ]));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let per_class = v["per_class_accuracy"].as_object().unwrap();
    assert_eq!(per_class.keys().collect::<Vec<_>>(), ["cat", "dog", "eel"]);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 3);

    // predict names one of the tree's classes, and ranks all three.
    let image = sc.path("data/test/eel/000.png");
    let pred = ok(&sc.run(&[
        "predict",
        "--device",
        "cpu",
        "--top-k",
        "9",
        "--weights",
        "w.safetensors",
        s(&image),
    ]));
    let lines: Vec<&str> = pred.lines().collect();
    assert_eq!(lines.len(), 4, "{pred}");
    let class = lines[0].rsplit(": ").next().unwrap();
    assert!(["cat", "dog", "eel"].contains(&class), "{pred}");

    // samples labels its grid with the tree's names.
    let labels = ok(&sc.run(&[
        "samples",
        "--seed",
        "1",
        "--count",
        "5",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
        "--out",
        "s.png",
    ]));
    let words: Vec<&str> = labels.split_whitespace().collect();
    assert_eq!(words.len(), 5, "{labels}");
    assert!(
        words.iter().all(|w| ["cat", "dog", "eel"].contains(w)),
        "{labels}"
    );

    // Weights of another class list are refused on this tree, naming both.
    let ten = sc.path("ten.safetensors");
    tch_cifar::nets::tutorial::Model::new(tch::Device::Cpu, Some(1))
        .save(&ten)
        .unwrap();
    let out = sc.run(&[
        "evaluate",
        "--device",
        "cpu",
        "--weights",
        s(&ten),
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
    ]);
    fails_cleanly(
        &out,
        &[
            "ten.safetensors",
            "only in the weights: plane, car, bird, deer",
            "only in the data: eel",
        ],
    );

    // A checkpoint of a three-class run saves and resumes bit for bit.
    let whole = train(&["--epochs", "2", "--out", "a.safetensors"]);
    train(&[
        "--epochs",
        "1",
        "--checkpoint-dir",
        "ck",
        "--out",
        "b.safetensors",
    ]);
    let resumed = train(&["--resume", "ck", "--epochs", "2", "--out", "b.safetensors"]);
    let losses = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("[2,"))
            .map(String::from)
            .collect()
    };
    assert!(!losses(&whole).is_empty(), "{whole}");
    assert_eq!(losses(&resumed), losses(&whole));
    assert_eq!(
        std::fs::read(sc.path("a.safetensors")).unwrap(),
        std::fs::read(sc.path("b.safetensors")).unwrap()
    );
}

/// `--resume` adopts `--train-dir`, `--test-dir` and `--cache-dir` from the
/// checkpoint like every other setting: the resumed run reads the same
/// trees through the same cache without being told again.
#[test]
fn a_resume_adopts_the_train_test_and_cache_dirs() {
    let dir = tempfile::tempdir().unwrap();
    make_tree(&dir.path().join("imgs"), &["cat", "dog"], 4);
    let run = |args: &[&str]| {
        tch_cifar()
            .args(args)
            .current_dir(dir.path())
            // Where the cache would go without --cache-dir.
            .env("TCH_CIFAR_CACHE_DIR", "elsewhere")
            .output()
            .unwrap()
    };
    let first = run(&[
        "train",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--max-steps",
        "3",
        "--train-dir",
        "imgs/train",
        "--test-dir",
        "imgs/test",
        "--cache-dir",
        "cache",
        "--checkpoint-dir",
        "ck",
        "--out",
        "w.safetensors",
    ]);
    ok(&first);
    assert!(dir.path().join("cache").is_dir());
    // No data/ here: a resume that forgot the trees would look for
    // CIFAR-10 there, and try to download it.
    let resumed = run(&[
        "train",
        "--resume",
        "ck",
        "--max-steps",
        "5",
        "--download-url",
        "http://127.0.0.1:9/cifar-10-binary.tar.gz",
    ]);
    let out = ok(&resumed);
    assert!(out.contains("Accuracy for class: dog"), "{out}");
    assert!(!dir.path().join("data").exists());
    assert!(!dir.path().join("elsewhere").exists());
}
