//! TensorBoard event files (`--logdir`): the layout `tensorboard --logdir
//! DIR` reads, written the way PyTorch's `torch.utils.tensorboard.SummaryWriter`
//! writes it.
//!
//! * A run is one folder, `DIR/<timestamp>-<model>-seed<S>` (or
//!   `DIR/<--run-name>`), holding `events.out.tfevents.<secs>.<host>.<pid>.<n>`
//!   files. Each file is a sequence of TFRecords: the length (u64, little
//!   endian), its masked CRC-32C, the data, the data's masked CRC-32C. The
//!   data is one `tensorflow.Event` protobuf; the first of a file holds
//!   `file_version: "brain.Event:2"`.
//! * The protobufs are the few messages of TensorFlow's `event.proto` and
//!   `summary.proto` that scalars, text and images need ([`proto`]),
//!   encoded by `prost` from hand-written structs (no `protoc`); the CRC is
//!   the `crc32c` crate's. The TFRecord framing is written here: it is four
//!   fields, and no maintained crate writes it without pulling in a
//!   TensorFlow or an async runtime.
//! * Every record is written to the file in one `write` as soon as it is
//!   made, with no buffer in this process: a live TensorBoard sees it at its
//!   next reload, and a crash or a Ctrl-C leaves only whole records behind
//!   (what the kernel has, it keeps). [`Events::flush`] asks the disk to
//!   keep it too; the writer calls it at least every [`FLUSH_EVERY`] and
//!   when dropped.
//! * A resumed run opens a new file in the same folder whose first event
//!   after the version is `SessionLog { status: START }` at the step it
//!   resumes from: TensorBoard then drops the events at or after that step
//!   that the interrupted run wrote after its checkpoint, as PyTorch's
//!   `SummaryWriter(purge_step=…)` has it do.
//!
//! [`Events::open`] is the one way to make a writer; its `writes` flag lets
//! all but one process of a distributed run hold a writer that writes
//! nothing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;

/// `--logdir` and `--run-name`, shared by `train` and `compare-losses`.
// These docs are --help text, shown as typed: `<model>` is no HTML tag.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogdirArgs {
    /// Write TensorBoard event files into a run folder in DIR.
    ///
    /// The run folder is DIR/<UTC time>-<model>-seed<S>, or DIR/NAME with
    /// --run-name; `tensorboard --logdir DIR` shows it beside other runs.
    /// A resumed run goes on writing into its own run folder.
    #[arg(long, value_name = "DIR", help_heading = "Output")]
    pub logdir: Option<PathBuf>,
    /// The run folder's name in --logdir [default: <UTC time>-<model>-seed<S>].
    #[arg(
        long,
        value_name = "NAME",
        requires = "logdir",
        help_heading = "Output"
    )]
    pub run_name: Option<String>,
}

impl LogdirArgs {
    /// The run folder: a new one under `--logdir` (named `--run-name`, else
    /// `<time>-<what>-seed<seed>`), or `resumed`'s (the folder a resumed
    /// run's checkpoint recorded) where no other is asked for. `None`
    /// without `--logdir` or a recorded folder.
    pub fn run_dir(
        &self,
        what: &str,
        seed: u64,
        resumed: Option<&Path>,
    ) -> Result<Option<PathBuf>> {
        let Some(logdir) = &self.logdir else {
            return Ok(resumed.map(Path::to_path_buf));
        };
        // On a resume, the name goes on unless another is given.
        let name = self.run_name.clone().or_else(|| {
            resumed
                .and_then(|r| r.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        });
        if let (Some(old), Some(name)) = (resumed, &name) {
            if logdir.join(name) == old {
                return Ok(Some(old.to_path_buf()));
            }
        }
        new_run_dir(logdir, name.as_deref(), what, seed).map(Some)
    }
}

/// The longest the writer goes without asking the disk to keep what it wrote.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// The messages of TensorFlow's `event.proto` and `summary.proto` that this
/// writer needs, field numbers as there.
pub mod proto {
    /// `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "What", tags = "3, 5, 7")]
        pub what: Option<What>,
    }

    /// `Event.what`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(Summary),
        #[prost(message, tag = "7")]
        SessionLog(SessionLog),
    }

    /// `tensorflow.SessionLog`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        /// [`SessionLog::START`], …
        #[prost(int32, tag = "1")]
        pub status: i32,
        #[prost(string, tag = "2")]
        pub checkpoint_path: String,
        #[prost(string, tag = "3")]
        pub msg: String,
    }

    impl SessionLog {
        /// `SessionStatus.START`: a (re)start, which purges later steps.
        pub const START: i32 = 1;
    }

    /// `tensorflow.Summary`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    /// `tensorflow.Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
        #[prost(oneof = "Kind", tags = "2, 4, 8")]
        pub value: Option<Kind>,
    }

    /// `Summary.Value.value`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "4")]
        Image(Image),
        #[prost(message, tag = "8")]
        Tensor(TensorProto),
    }

    /// `tensorflow.Summary.Image`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(int32, tag = "1")]
        pub height: i32,
        #[prost(int32, tag = "2")]
        pub width: i32,
        /// 3 for RGB, 4 for RGBA.
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }

    /// `tensorflow.SummaryMetadata`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
    }

    /// `tensorflow.SummaryMetadata.PluginData`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    /// `tensorflow.TensorProto`, as a string tensor.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        /// [`TensorProto::DT_STRING`].
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShapeProto>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    impl TensorProto {
        pub const DT_STRING: i32 = 7;
    }

    /// `tensorflow.TensorShapeProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "2")]
        pub dim: Vec<Dim>,
    }

    /// `tensorflow.TensorShapeProto.Dim`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        #[prost(int64, tag = "1")]
        pub size: i64,
    }
}

/// TFRecord's masked CRC-32C: the CRC rotated right by 15 bits plus a
/// constant, so that a CRC over data holding CRCs stays strong.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The data of each TFRecord in `bytes`, checked; an error names the
/// record's offset. A torn last record (a crash mid-write) is an error too.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = vec![];
    let mut at = 0usize;
    while at < bytes.len() {
        ensure!(bytes.len() - at >= 12, "the record at byte {at} is torn");
        let len_bytes = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        ensure!(
            crc == masked_crc(len_bytes),
            "the record at byte {at} has a bad length CRC"
        );
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let start = at + 12;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e + 4 <= bytes.len())
            .with_context(|| format!("the record at byte {at} is torn"))?;
        let data = &bytes[start..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        ensure!(
            crc == masked_crc(data),
            "the record at byte {at} has a bad data CRC"
        );
        out.push(data);
        at = end + 4;
    }
    Ok(out)
}

/// A run folder's name: `<UTC timestamp>-<what>-seed<seed>`, e.g.
/// `20261203-083600-net-seed7`.
pub fn run_name(what: &str, seed: u64, now: SystemTime) -> String {
    format!("{}-{what}-seed{seed}", utc_stamp(now))
}

/// `YYYYmmdd-HHMMSS` in UTC.
fn utc_stamp(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Checks a `--run-name`: one folder name, not `.` or `..`.
pub fn check_run_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']),
        "--run-name `{name}` must be one folder name (no `/`, not `.` or `..`)"
    );
    Ok(())
}

/// Whether `dir` holds an events file.
pub fn has_events(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(EVENTS_PREFIX))
    })
}

const EVENTS_PREFIX: &str = "events.out.tfevents.";

/// The folder for a new run under `logdir`: `logdir/name` with `name`
/// given (which must not hold another run's events), else a fresh
/// [`run_name`] (with `-2`, `-3`… if that exists already).
pub fn new_run_dir(logdir: &Path, name: Option<&str>, what: &str, seed: u64) -> Result<PathBuf> {
    if let Some(name) = name {
        check_run_name(name)?;
        let dir = logdir.join(name);
        if has_events(&dir) {
            bail!(
                "{} already holds the events of another run; give another --run-name (a resumed \
                 run goes on in its own folder by itself)",
                dir.display()
            );
        }
        return Ok(dir);
    }
    let base = run_name(what, seed, SystemTime::now());
    let mut dir = logdir.join(&base);
    let mut n = 2;
    while dir.exists() {
        dir = logdir.join(format!("{base}-{n}"));
        n += 1;
    }
    Ok(dir)
}

/// A run's events writer: one events file in the run's folder. One that
/// does not write (`writes: false` in [`Events::open`], or no `--logdir`)
/// takes every call and does nothing.
pub struct Events {
    inner: Option<Open>,
}

struct Open {
    path: PathBuf,
    file: File,
    last_sync: Instant,
    /// Set after a failed write: training goes on, the events stop.
    failed: bool,
}

impl Events {
    /// A writer that writes nothing.
    pub fn off() -> Events {
        Events { inner: None }
    }

    /// The events writer of the run in `run_dir` (created with its parents
    /// if missing), or one that writes nothing where `writes` is false (all
    /// processes but one of a distributed run). `resume_step` is the first
    /// step a resumed run trains: its file starts with a `SessionLog START`
    /// there, which hides the events the interrupted run wrote from that step
    /// on.
    pub fn open(run_dir: &Path, resume_step: Option<u64>, writes: bool) -> Result<Events> {
        if !writes {
            return Ok(Events::off());
        }
        std::fs::create_dir_all(run_dir).with_context(|| {
            format!(
                "cannot create the --logdir run folder {}",
                run_dir.display()
            )
        })?;
        let path = run_dir.join(file_name(run_dir)?);
        let file = File::options()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut events = Events {
            inner: Some(Open {
                path,
                file,
                last_sync: Instant::now(),
                failed: false,
            }),
        };
        let version = proto::What::FileVersion("brain.Event:2".into());
        events.try_write(0, version)?;
        if let Some(step) = resume_step {
            let start = proto::What::SessionLog(proto::SessionLog {
                status: proto::SessionLog::START,
                ..Default::default()
            });
            events.try_write(step, start)?;
        }
        events.flush();
        Ok(events)
    }

    /// Whether this writer writes.
    pub fn is_on(&self) -> bool {
        self.inner.as_ref().is_some_and(|o| !o.failed)
    }

    /// The events file, when this writer writes.
    pub fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|o| o.path.as_path())
    }

    /// Scalars at `step`, one event, each value a float32 as TensorBoard keeps it.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        if values.is_empty() {
            return;
        }
        let value = values
            .iter()
            .map(|(tag, v)| proto::Value {
                tag: tag.to_string(),
                metadata: None,
                value: Some(proto::Kind::SimpleValue(*v as f32)),
            })
            .collect();
        self.write(step, proto::What::Summary(proto::Summary { value }));
    }

    /// Text (Markdown) at `step` under `tag/text_summary`, as PyTorch's
    /// `add_text(tag, text)` writes it: a string tensor for the text plugin.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) {
        let value = proto::Value {
            tag: format!("{tag}/text_summary"),
            metadata: Some(proto::SummaryMetadata {
                plugin_data: Some(proto::PluginData {
                    plugin_name: "text".into(),
                    content: vec![],
                }),
            }),
            value: Some(proto::Kind::Tensor(proto::TensorProto {
                dtype: proto::TensorProto::DT_STRING,
                tensor_shape: Some(proto::TensorShapeProto {
                    dim: vec![proto::Dim { size: 1 }],
                }),
                string_val: vec![text.as_bytes().to_vec()],
            })),
        };
        let summary = proto::Summary { value: vec![value] };
        self.write(step, proto::What::Summary(summary));
    }

    /// A PNG at `step` (its size read from its header).
    pub fn png(&mut self, tag: &str, step: u64, png: &[u8]) -> Result<()> {
        let (width, height) = png_size(png).context("not a PNG")?;
        let value = proto::Value {
            tag: tag.into(),
            metadata: None,
            value: Some(proto::Kind::Image(proto::Image {
                height,
                width,
                colorspace: if png.get(25) == Some(&6) { 4 } else { 3 },
                encoded_image_string: png.to_vec(),
            })),
        };
        let summary = proto::Summary { value: vec![value] };
        self.write(step, proto::What::Summary(summary));
        Ok(())
    }

    /// Asks the disk to keep what was written (the kernel has it already).
    pub fn flush(&mut self) {
        if let Some(open) = self.inner.as_mut().filter(|o| !o.failed) {
            // Only durability is at stake here, never a reader's view.
            let _ = open.file.sync_data();
            open.last_sync = Instant::now();
        }
    }

    /// Writes one event; a failure is reported once on stderr and ends
    /// this writer's events, not the run.
    fn write(&mut self, step: u64, what: proto::What) {
        if !self.is_on() {
            return;
        }
        if let Err(err) = self.try_write(step, what) {
            eprintln!("warning: {err:#}; no more TensorBoard events are written");
            if let Some(open) = self.inner.as_mut() {
                open.failed = true;
            }
            return;
        }
        if self
            .inner
            .as_ref()
            .is_some_and(|o| o.last_sync.elapsed() >= FLUSH_EVERY)
        {
            self.flush();
        }
    }

    fn try_write(&mut self, step: u64, what: proto::What) -> Result<()> {
        let Some(open) = self.inner.as_mut() else {
            return Ok(());
        };
        let event = proto::Event {
            wall_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(what),
        };
        // One write per record: a reader or a crash never sees half of one
        // that the kernel took.
        open.file
            .write_all(&record(&event.encode_to_vec()))
            .with_context(|| format!("cannot write {}", open.path.display()))
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A new events file's name in `dir`: `events.out.tfevents.<secs>.<host>.<pid>.<n>`,
/// its seconds past every file already there, so that TensorBoard, which
/// reads a run's files in name order, reads a resumed run's after the
/// interrupted one's.
fn file_name(dir: &Path) -> Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let latest = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(EVENTS_PREFIX)?
                .split('.')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max();
    let secs = latest.map_or(now, |l| now.max(l + 1));
    let host = hostname();
    Ok(format!(
        "{EVENTS_PREFIX}{secs:010}.{host}.{}.0",
        std::process::id()
    ))
}

/// The machine's name, as TensorFlow puts it in events file names
/// (letters, digits, `-` and `_` only).
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let clean: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(png: &[u8]) -> Option<(i32, i32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |at: usize| i32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    Some((be(16), be(20)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes every event of the file at `path`.
    fn events(path: &Path) -> Vec<proto::Event> {
        let bytes = std::fs::read(path).unwrap();
        read_records(&bytes)
            .unwrap()
            .into_iter()
            .map(|d| proto::Event::decode(d).unwrap())
            .collect()
    }

    #[test]
    fn the_masked_crc_is_tensorflows() {
        // crc32c("123456789") is 0xe3069283 (RFC 3720's check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        // TensorFlow's record of an empty string: length 0, masked CRC of
        // eight zero bytes, no data, masked CRC of nothing.
        let r = record(b"");
        assert_eq!(r.len(), 16);
        assert_eq!(&r[12..], &masked_crc(b"").to_le_bytes());
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn records_round_trip_and_a_torn_or_corrupt_one_is_found() {
        let mut bytes = record(b"first");
        bytes.extend(record(&[7u8; 300]));
        assert_eq!(
            read_records(&bytes).unwrap(),
            [&b"first"[..], &[7u8; 300][..]]
        );
        let err = read_records(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.to_string().contains("torn"), "{err}");
        let mut bad = bytes.clone();
        bad[14] ^= 1;
        let err = read_records(&bad).unwrap_err();
        assert!(err.to_string().contains("bad data CRC"), "{err}");
    }

    #[test]
    fn run_names_are_utc_stamps() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_286_960);
        assert_eq!(run_name("net", 7, t), "20261203-083600-net-seed7");
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_stamp(t), "20000229-000000");
    }

    #[test]
    fn run_names_must_be_one_folder() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_run_name(bad).is_err(), "{bad}");
        }
        check_run_name("seed-1 lr 0.01").unwrap();
    }

    #[test]
    fn a_writer_writes_the_version_then_its_events_and_a_resume_starts_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("logs/run");
        {
            let mut w = Events::open(&run, None, true).unwrap();
            w.scalars(3, &[("train/loss", 0.5), ("train/lr", 0.001)]);
            w.text("hparams", 0, "| a | b |");
            let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
            png.extend(640u32.to_be_bytes());
            png.extend(480u32.to_be_bytes());
            png.extend([8, 2, 0, 0, 0]);
            w.png("test/confusion", 3, &png).unwrap();
            assert!(w.png("x", 3, b"GIF89a").is_err());
        }
        let files: Vec<PathBuf> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let first = events(&files[0]);
        assert_eq!(
            first[0].what,
            Some(proto::What::FileVersion("brain.Event:2".into()))
        );
        let Some(proto::What::Summary(s)) = &first[1].what else {
            panic!("{first:?}")
        };
        assert_eq!(first[1].step, 3);
        assert_eq!(s.value[1].tag, "train/lr");
        assert_eq!(s.value[1].value, Some(proto::Kind::SimpleValue(0.001)));
        let Some(proto::What::Summary(s)) = &first[2].what else {
            panic!("{first:?}")
        };
        assert_eq!(s.value[0].tag, "hparams/text_summary");
        let Some(proto::What::Summary(s)) = &first[3].what else {
            panic!("{first:?}")
        };
        let Some(proto::Kind::Image(image)) = &s.value[0].value else {
            panic!("{s:?}")
        };
        assert_eq!((image.width, image.height, image.colorspace), (640, 480, 3));

        // The resumed run's file sorts after the first, and starts there.
        let w = Events::open(&run, Some(2), true).unwrap();
        let second = w.path().unwrap().to_path_buf();
        drop(w);
        assert!(second > files[0], "{second:?} {files:?}");
        let resumed = events(&second);
        assert_eq!(resumed.len(), 2);
        assert_eq!(resumed[1].step, 2);
        let Some(proto::What::SessionLog(log)) = &resumed[1].what else {
            panic!("{resumed:?}")
        };
        assert_eq!(log.status, proto::SessionLog::START);

        // A process that does not write makes nothing.
        let quiet = dir.path().join("quiet");
        let mut off = Events::open(&quiet, None, false).unwrap();
        off.scalars(1, &[("x", 1.0)]);
        assert!(!off.is_on() && !quiet.exists());
    }

    #[test]
    fn a_resume_keeps_its_run_folder_unless_another_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, other) = (dir.path().join("logs"), dir.path().join("other"));
        let old = logs.join("x");
        let args = |logdir: Option<&Path>, name: Option<&str>| LogdirArgs {
            logdir: logdir.map(Path::to_path_buf),
            run_name: name.map(String::from),
        };
        let dir_of = |a: LogdirArgs| a.run_dir("net", 1, Some(&old)).unwrap();
        assert_eq!(dir_of(args(None, None)), Some(old.clone()));
        assert_eq!(dir_of(args(Some(&logs), None)), Some(old.clone()));
        assert_eq!(dir_of(args(Some(&logs), Some("x"))), Some(old.clone()));
        assert_eq!(dir_of(args(Some(&logs), Some("y"))), Some(logs.join("y")));
        assert_eq!(dir_of(args(Some(&other), None)), Some(other.join("x")));
        assert_eq!(args(None, None).run_dir("net", 1, None).unwrap(), None);
    }

    #[test]
    fn a_given_run_name_must_not_hold_another_run() {
        let dir = tempfile::tempdir().unwrap();
        let run = new_run_dir(dir.path(), Some("mine"), "net", 1).unwrap();
        drop(Events::open(&run, None, true).unwrap());
        let err = new_run_dir(dir.path(), Some("mine"), "net", 1).unwrap_err();
        assert!(err.to_string().contains("mine already holds"), "{err}");
        let a = new_run_dir(dir.path(), None, "net", 1).unwrap();
        std::fs::create_dir(&a).unwrap();
        let b = new_run_dir(dir.path(), None, "net", 1).unwrap();
        assert_ne!(a, b);
    }
}
