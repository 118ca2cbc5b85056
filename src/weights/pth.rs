//! PyTorch's `torch.save` file format, for `state_dict`s: reading the files
//! that `torch.save(net.state_dict(), PATH)` writes, and writing files that
//! `net.load_state_dict(torch.load(PATH, weights_only=True))` accepts.
//!
//! Since PyTorch 1.6 such a file is a zip archive (entries stored, not
//! compressed) whose entries all sit under one folder, `<prefix>/`:
//!
//! * `data.pkl`: a pickle (protocol 2) of an `OrderedDict` mapping each key
//!   to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
//!   requires_grad, backward_hooks)`, where `storage` is a persistent id
//!   `('storage', torch.FloatStorage, '<n>', 'cpu', numel)`;
//! * `data/<n>`: storage `<n>`'s elements, raw, in the byte order of
//!   `byteorder` (`little`);
//! * `version` (`3`), and in recent versions `.format_version`,
//!   `.storage_alignment` and `.data/serialization_id`.
//!
//! libtorch can read these (`torch::pickle_load`), but tch does not expose
//! it, so this module has its own small pickle machine. It understands the
//! opcodes and the few globals that such files use (the same globals that
//! `weights_only=True` allows) and refuses everything else with an error
//! naming the opcode or the global: it never runs code, and no file content
//! makes it panic or use memory far beyond the file's size (the pickle's
//! copies and nesting, and the tensors' sizes, are bounded by it). The
//! writer emits only globals `weights_only=True` accepts.
//!
//! The class names travel in the `OrderedDict`'s `_metadata` attribute,
//! which `torch.save(net.state_dict())` writes and `load_state_dict` reads:
//! `state_dict._metadata[""]["classes"]`, a list of strings, beside the
//! `version` PyTorch keeps there. `load_state_dict` ignores the extra entry.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::{Kind, Tensor};

/// A zip archive's first four bytes (a local file header).
pub const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// The folder name the writer puts the entries under (PyTorch uses the
/// file's stem; any name loads).
const ARCHIVE_PREFIX: &str = "archive";

/// Storage types by their name in `torch`, with the element kind and size.
const STORAGE_TYPES: [(&str, Kind, usize); 10] = [
    ("FloatStorage", Kind::Float, 4),
    ("DoubleStorage", Kind::Double, 8),
    ("HalfStorage", Kind::Half, 2),
    ("BFloat16Storage", Kind::BFloat16, 2),
    ("LongStorage", Kind::Int64, 8),
    ("IntStorage", Kind::Int, 4),
    ("ShortStorage", Kind::Int16, 2),
    ("CharStorage", Kind::Int8, 1),
    ("ByteStorage", Kind::Uint8, 1),
    ("BoolStorage", Kind::Bool, 1),
];

/// Whether `bytes` start like a zip archive (and so possibly a `.pth`).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(ZIP_MAGIC)
}

/// A `state_dict` in file order, and the class names its `_metadata` holds.
pub type WithClasses = (Vec<(String, Tensor)>, Option<Vec<String>>);

/// Reads the `state_dict` in the `torch.save` file at `path`, in file order.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(read_with_classes(path)?.0)
}

/// [`read`], and the class names in the file's `_metadata`, if any.
pub fn read_with_classes(path: &Path) -> Result<WithClasses> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    from_bytes_with_classes(&bytes)
        .with_context(|| format!("cannot read PyTorch weights from {}", path.display()))
}

/// The network's name in the `_metadata` of the `torch.save` file at
/// `path`, as [`write_named`] writes it; `None` when the file has none or
/// cannot be read (reading its weights then says what is wrong).
pub fn model_name(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let mut archive = Archive::new(&bytes).ok()?;
    let names: Vec<String> = archive.zip.file_names().map(String::from).collect();
    let pkl = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())?
        .clone();
    let pickle = archive.read(&pkl, 64 << 20).ok()?;
    let mut unpickler = Unpickler::new(&pickle);
    unpickler.run().ok()?;
    unpickler.model.take()
}

/// Parses a `torch.save` archive holding a `state_dict`.
pub fn from_bytes(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    Ok(from_bytes_with_classes(bytes)?.0)
}

/// [`from_bytes`], and the class names in the `_metadata`, if any.
pub fn from_bytes_with_classes(bytes: &[u8]) -> Result<WithClasses> {
    ensure!(
        cfg!(target_endian = "little"),
        "reading .pth files is only implemented on little-endian machines"
    );
    let mut archive = Archive::new(bytes)?;
    let names: Vec<String> = archive.zip.file_names().map(String::from).collect();
    let Some(pkl) = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .cloned()
    else {
        bail!("the archive has no data.pkl, so it is not a torch.save file");
    };
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    if names
        .iter()
        .any(|n| n.starts_with(&format!("{prefix}code/")) || n == &format!("{prefix}constants.pkl"))
    {
        bail!(
            "this is a TorchScript module (torch.jit.save or `tch-cifar export`), not a \
             state_dict; save the weights with torch.save(net.state_dict(), PATH) instead"
        );
    }
    // Older PyTorch wrote no byteorder entry; torch.load then assumes the
    // machine's order, little-endian here. One that is there must be read.
    let byteorder = format!("{prefix}byteorder");
    if names.contains(&byteorder) {
        let order = archive
            .read(&byteorder, 16)
            .context("cannot tell the storages' byte order")?;
        ensure!(
            order == b"little",
            "the storages are stored {:?}-endian; only little-endian files are supported",
            String::from_utf8_lossy(&order)
        );
    }
    let pickle = archive.read(&pkl, 64 << 20)?;
    let mut unpickler = Unpickler::new(&pickle);
    let root = unpickler
        .run()
        .with_context(|| format!("cannot unpickle {pkl}"))?;
    let classes = unpickler.classes.take();
    let Value::Dict(dict) = root else {
        bail!(
            "{pkl} holds {}, not a state_dict (a dict of tensors)",
            root.describe()
        );
    };
    let mut budget = tensor_budget(bytes.len() as u64);
    // Each storage loaded so far, with the reference that loaded it.
    let mut storages: HashMap<String, (StorageRef, Tensor)> = HashMap::new();
    let mut out = Vec::with_capacity(dict.entries.len());
    for (key, value) in dict.entries {
        let Value::Str(key) = key else {
            bail!(
                "the state_dict has a key that is {}, not a string",
                key.describe()
            );
        };
        let Value::Tensor(desc) = value else {
            bail!(
                "key `{key}` holds {}, not a tensor; is this a checkpoint dict \
                 rather than a state_dict?",
                value.describe()
            );
        };
        let storage = match storages.get(&desc.storage.key) {
            Some((first, t)) => {
                // The bounds check trusts this reference's element count
                // and type, so they must be the loaded storage's.
                ensure!(
                    *first == desc.storage,
                    "key `{key}`: storage {} is {} elements of {:?} here, but {} elements of \
                     {:?} where an earlier key refers to it",
                    first.key,
                    desc.storage.numel,
                    desc.storage.kind,
                    first.numel,
                    first.kind
                );
                t.shallow_clone()
            }
            None => {
                let s = &desc.storage;
                let name = format!("{prefix}data/{}", s.key);
                let expected = s
                    .numel
                    .checked_mul(s.elem_size as u64)
                    .ok_or_else(|| anyhow!("key `{key}`: storage {} is impossibly large", s.key))?;
                let data = archive
                    .read(&name, expected)
                    .with_context(|| format!("key `{key}`"))?;
                ensure!(
                    data.len() as u64 == expected,
                    "key `{key}`: {name} has {} bytes, but its storage holds {} elements of \
                     {} bytes",
                    data.len(),
                    s.numel,
                    s.elem_size
                );
                let t = Tensor::f_from_data_size(&data, &[s.numel as i64], s.kind)
                    .with_context(|| format!("key `{key}`: cannot build its storage"))?;
                storages.insert(s.key.clone(), (s.clone(), t.shallow_clone()));
                t
            }
        };
        let tensor = desc
            .materialize(&storage, &mut budget)
            .with_context(|| format!("key `{key}`"))?;
        out.push((key, tensor));
    }
    Ok((out, classes))
}

/// How many bytes of tensors a file of `file_len` bytes may expand to.
/// Views that overlap in their storage (an `expand`ed bias has stride 0)
/// hold more elements than the file, but legitimately not many more;
/// without a cap, 368 bytes could ask for 8 GB over a 1-element storage.
fn tensor_budget(file_len: u64) -> u64 {
    file_len.saturating_mul(4).saturating_add(16 << 20)
}

/// A zip archive in memory, with what reading its entries safely needs to
/// know about the whole file.
struct Archive<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    bytes: &'a [u8],
    len: u64,
    /// Whether every entry's CRC is 0, as `torch.save` writes them after
    /// `torch.serialization.set_crc32_options(False)`. Such an archive's
    /// stored entries are read unchecked; one with any CRC is checked whole.
    without_crcs: bool,
}

impl<'a> Archive<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
            .context("not a zip archive (a .pth from torch.save is one)")?;
        // An entry that can't be opened counts as having a CRC, so that
        // doubt keeps the checks on.
        let without_crcs =
            (0..zip.len()).all(|i| zip.by_index_raw(i).is_ok_and(|f| f.crc32() == 0));
        Ok(Self {
            zip,
            bytes,
            len: bytes.len() as u64,
            without_crcs,
        })
    }

    /// Reads one entry, refusing entries over `limit` bytes.
    fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let entry = self
            .zip
            .by_name(name)
            .with_context(|| format!("the archive has no entry {name}"))?;
        ensure!(
            entry.size() <= limit,
            "entry {name} is {} bytes, more than the {limit} expected",
            entry.size()
        );
        // The directory's size is only a claim (a zip64 record can say 2^60
        // bytes); the entries are stored, not compressed, so none holds more
        // than the archive itself.
        ensure!(
            entry.size() <= self.len,
            "entry {name} claims {} bytes, more than the whole archive's {}",
            entry.size(),
            self.len
        );
        if self.without_crcs && entry.compression() == zip::CompressionMethod::Stored {
            // The zip crate would check the entry against CRC 0 and fail;
            // a stored entry's bytes are its content, so take them as is.
            ensure!(
                entry.compressed_size() == entry.size(),
                "entry {name} is stored in {} bytes but claims {}",
                entry.compressed_size(),
                entry.size()
            );
            let start = entry.data_start();
            return start
                .checked_add(entry.size())
                .and_then(|end| {
                    self.bytes
                        .get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
                })
                .map(<[u8]>::to_vec)
                .ok_or_else(|| anyhow!("entry {name} runs past the end of the archive"));
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .take(limit + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("cannot read entry {name}"))?;
        Ok(data)
    }
}

/// Writes `tensors` as a `torch.save` file of an `OrderedDict`, atomically,
/// with `classes` (if given) in its `_metadata`.
pub fn write(path: &Path, tensors: &[(String, Tensor)], classes: Option<&[String]>) -> Result<()> {
    write_named(path, tensors, classes, None)
}

/// [`write()`], with the network's name `model` (if given) in the
/// `_metadata` too, where [`model_name`] finds it.
pub fn write_named(
    path: &Path,
    tensors: &[(String, Tensor)],
    classes: Option<&[String]>,
    model: Option<&str>,
) -> Result<()> {
    let bytes = to_bytes_named(tensors, classes, model)?;
    crate::util::files::write_atomically(path, |tmp| {
        std::fs::write(tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// The bytes of a `torch.save` file holding `tensors` (f32 or i64, any shape) as
/// an `OrderedDict`, laid out like PyTorch's own: stored entries, storages
/// aligned to 64 bytes.
pub fn to_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    to_bytes_with_classes(tensors, None)
}

/// [`to_bytes`], with `classes` in the dict's `_metadata`.
pub fn to_bytes_with_classes(
    tensors: &[(String, Tensor)],
    classes: Option<&[String]>,
) -> Result<Vec<u8>> {
    to_bytes_named(tensors, classes, None)
}

/// [`to_bytes_with_classes`], with the network's name `model` in the
/// `_metadata` too.
fn to_bytes_named(
    tensors: &[(String, Tensor)],
    classes: Option<&[String]>,
    model: Option<&str>,
) -> Result<Vec<u8>> {
    let mut storages = Vec::with_capacity(tensors.len());
    let mut pickle = Pickler::new();
    pickle.begin_ordered_dict();
    for (i, (key, tensor)) in tensors.iter().enumerate() {
        // f32 weights, and i64 counters (BatchNorm's `num_batches_tracked`).
        let (storage, width) = match tensor.kind() {
            Kind::Float => ("FloatStorage", 4),
            Kind::Int64 => ("LongStorage", 8),
            kind => {
                bail!("key `{key}` holds {kind:?} values; only f32 and i64 tensors can be written")
            }
        };
        let flat = tensor
            .detach()
            .to_device(tch::Device::Cpu)
            .flatten(0, -1)
            .contiguous();
        let numel = flat.numel();
        // Native byte order: little-endian, as torch.save writes on these machines.
        let mut bytes = vec![0u8; width * numel];
        flat.f_copy_data_u8(&mut bytes, numel)
            .with_context(|| format!("key `{key}`: cannot read its values"))?;
        pickle.tensor_entry(key, storage, &i.to_string(), numel as u64, &tensor.size());
        storages.push(bytes);
    }
    pickle.end_ordered_dict();
    if classes.is_some() || model.is_some() {
        pickle.build_metadata(classes, model);
    }

    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut entry = |name: &str, data: &[u8]| -> Result<()> {
        let name = format!("{ARCHIVE_PREFIX}/{name}");
        zip.start_file_aligned(name.as_str(), options, 64)
            .and_then(|_| zip.write_all(data).map_err(Into::into))
            .with_context(|| format!("cannot add {name} to the archive"))
    };
    entry("data.pkl", &pickle.finish())?;
    entry(".format_version", b"1")?;
    entry(".storage_alignment", b"64")?;
    entry("byteorder", b"little")?;
    for (i, data) in storages.iter().enumerate() {
        entry(&format!("data/{i}"), data)?;
    }
    entry("version", b"3\n")?;
    let out = zip.finish().context("cannot finish the archive")?;
    Ok(out.into_inner())
}

// ---------------------------------------------------------------------------
// Unpickling

/// A storage a tensor points into: archive entry `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    key: String,
    kind: Kind,
    elem_size: usize,
    numel: u64,
}

/// What `_rebuild_tensor_v2` was asked to build.
#[derive(Debug, Clone, PartialEq)]
struct TensorDesc {
    storage: StorageRef,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorDesc {
    /// The tensor, as a contiguous copy of its view of `storage`, after
    /// checking that the view stays inside the storage and that the copy
    /// fits in `budget` bytes, which it then takes from.
    fn materialize(&self, storage: &Tensor, budget: &mut u64) -> Result<Tensor> {
        ensure!(
            self.size.len() == self.stride.len(),
            "size {:?} and stride {:?} differ in length",
            self.size,
            self.stride
        );
        ensure!(
            self.offset >= 0
                && self.size.iter().all(|&s| s >= 0)
                && self.stride.iter().all(|&s| s >= 0),
            "negative offset, size or stride (offset {}, size {:?}, stride {:?})",
            self.offset,
            self.size,
            self.stride
        );
        let numel = self
            .size
            .iter()
            .try_fold(1i64, |n, &s| n.checked_mul(s))
            .ok_or_else(|| anyhow!("size {:?} overflows", self.size))?;
        let bytes = (numel as u64).saturating_mul(self.storage.elem_size as u64);
        ensure!(
            bytes <= *budget,
            "size {:?} is {numel} elements ({bytes} bytes), more than the file's tensors may \
             take ({} bytes left)",
            self.size,
            *budget
        );
        if numel > 0 {
            let last = self
                .size
                .iter()
                .zip(&self.stride)
                .try_fold(self.offset, |acc, (&s, &st)| {
                    (s - 1).checked_mul(st).and_then(|d| acc.checked_add(d))
                })
                .ok_or_else(|| anyhow!("size {:?} stride {:?} overflow", self.size, self.stride))?;
            ensure!(
                (last as u64) < self.storage.numel,
                "size {:?}, stride {:?} and offset {} reach element {last}, past the end of \
                 its storage of {} elements",
                self.size,
                self.stride,
                self.offset,
                self.storage.numel
            );
        }
        let tensor = storage
            .f_as_strided(self.size.as_slice(), self.stride.as_slice(), self.offset)?
            .f_contiguous()?;
        *budget -= bytes;
        Ok(tensor)
    }
}

/// The few globals a `state_dict` pickle may name.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    /// An entry of [`STORAGE_TYPES`] (a reference keeps [`Value`] small).
    Storage(&'static (&'static str, Kind, usize)),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Result<Global> {
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch", storage) => STORAGE_TYPES
                .iter()
                .find(|(n, _, _)| *n == storage)
                .map(Global::Storage)
                .ok_or_else(|| anyhow!("unsupported global `torch.{storage}`")),
            // torch.save(net) pickles the module's class (`__main__.Net`)
            // and torch.nn's: the whole object, not its tensors.
            _ => bail!(
                "unsupported global `{module}.{name}`: a state_dict file only refers to \
                 collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage \
                 types. A file from torch.save(net) holds the whole pickled module; save \
                 net.state_dict() instead: torch.save(net.state_dict(), PATH)"
            ),
        }
    }
}

/// A dict's entries in insertion order (as `OrderedDict`, and `dict` since
/// Python 3.7, keep them), indexed by key so that inserting takes constant
/// time: a scan per insert took 21 s for 100k keys.
#[derive(Debug, Clone, Default)]
struct Dict {
    entries: Vec<(Value, Value)>,
    index: HashMap<DictKey, usize>,
}

impl PartialEq for Dict {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

/// A dict key as a hashable value: the key types a pickle can hold that
/// Python can hash (NaN aside, and `1`, `1.0` and `True` stay apart).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DictKey {
    None,
    Bool(bool),
    Int(i64),
    /// The bits, with -0.0 as 0.0 (they are equal).
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<DictKey>),
}

impl DictKey {
    fn of(v: &Value) -> Result<DictKey> {
        Ok(match v {
            Value::None => DictKey::None,
            Value::Bool(b) => DictKey::Bool(*b),
            Value::Int(i) => DictKey::Int(*i),
            Value::Float(f) => DictKey::Float(if *f == 0.0 { 0 } else { f.to_bits() }),
            Value::Str(s) => DictKey::Str(s.clone()),
            Value::Bytes(b) => DictKey::Bytes(b.clone()),
            Value::Tuple(items) => {
                DictKey::Tuple(items.iter().map(DictKey::of).collect::<Result<_>>()?)
            }
            other => bail!("a dict key is {}, which cannot be hashed", other.describe()),
        })
    }
}

/// A value on the pickle machine's stack.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Dict),
    Global(Global),
    // Boxed, like anything big, so that the many small values stay small.
    Storage(Box<StorageRef>),
    Tensor(Box<TensorDesc>),
}

impl Value {
    /// A short description for error messages.
    fn describe(&self) -> String {
        match self {
            Value::Mark => "a mark".into(),
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(t) => format!("a tuple of {}", t.len()),
            Value::List(l) => format!("a list of {}", l.len()),
            Value::Dict(d) => format!("a dict of {}", d.entries.len()),
            Value::Global(g) => format!("the global {g:?}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }

    /// Roughly the bytes this value takes, with all it holds.
    fn footprint(&self) -> u64 {
        let held = match self {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Tuple(items) | Value::List(items) => {
                return items
                    .iter()
                    .fold(Self::SIZE, |n, v| n.saturating_add(v.footprint()))
            }
            Value::Dict(dict) => {
                // Each key twice: in the entries and in the index.
                return dict.entries.iter().fold(Self::SIZE, |n, (k, v)| {
                    n.saturating_add(k.footprint().saturating_mul(2))
                        .saturating_add(v.footprint())
                });
            }
            Value::Storage(s) => std::mem::size_of::<StorageRef>() + s.key.len(),
            Value::Tensor(t) => {
                std::mem::size_of::<TensorDesc>()
                    + t.storage.key.len()
                    + 8 * (t.size.len() + t.stride.len())
            }
            _ => 0,
        };
        Self::SIZE.saturating_add(held as u64)
    }

    const SIZE: u64 = std::mem::size_of::<Value>() as u64;

    fn int(&self, what: &str) -> Result<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            other => bail!("{what} should be an int, got {}", other.describe()),
        }
    }

    fn ints(&self, what: &str) -> Result<Vec<i64>> {
        match self {
            Value::Tuple(items) | Value::List(items) => items.iter().map(|v| v.int(what)).collect(),
            other => bail!("{what} should be a tuple of ints, got {}", other.describe()),
        }
    }
}

/// A pickle machine for the protocol-2..5 opcodes a `state_dict` uses.
///
/// Memoized values are copies (not shared references); `torch.save` never
/// fetches a container from the memo after changing it, so this is exact
/// for the files it writes. The copies are charged to a budget that grows
/// with the pickle's length, so that no pickle makes it copy without end.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Values, each with its depth: 1, or one more than its deepest item.
    stack: Vec<(Value, u32)>,
    memo: HashMap<u32, (Value, u32)>,
    /// Bytes that copies (memo stores and fetches, DUP) may still take.
    copy_budget: u64,
    /// The class names from a BUILD's `_metadata[""]["classes"]`.
    classes: Option<Vec<String>>,
    /// The network's name from a BUILD's `_metadata[""]["model"]`.
    model: Option<String>,
}

/// Copies may take this many bytes per byte of pickle, plus
/// [`COPY_BYTES_BASE`]. `torch.save`'s pickles memoize every value and
/// fetch small ones (globals, short strings): 11 to 18 bytes per byte for
/// common state_dicts, 34 for 64-dimensional tensors. Without a cap,
/// copying a value into a tuple with itself again and again doubles it each
/// time, and a 457-byte pickle filled gigabytes in seconds.
const COPY_BYTES_PER_BYTE: u64 = 64;

/// See [`COPY_BYTES_PER_BYTE`].
const COPY_BYTES_BASE: u64 = 1 << 20;

/// The most values the stack and the memo may hold: far above what any
/// state_dict needs, low enough that a hostile file can't exhaust memory.
const MAX_VALUES: usize = 1 << 20;

/// How deep values may nest: far deeper than a state_dict's few levels, and
/// shallow enough that the recursive `Drop`, `Clone` and `PartialEq` of
/// [`Value`] can't overflow the stack (a 200 kB pickle of nested 1-tuples
/// did).
const MAX_DEPTH: u32 = 100;

/// A copy of a stack or memo entry, after taking its size from `budget`.
fn copy_within(budget: &mut u64, entry: &(Value, u32)) -> Result<(Value, u32)> {
    let bytes = entry.0.footprint();
    *budget = budget.checked_sub(bytes).ok_or_else(|| {
        anyhow!(
            "the pickle makes copies of more than {COPY_BYTES_PER_BYTE} bytes per byte of \
             itself (the last, of {}, {bytes} bytes)",
            entry.0.describe()
        )
    })?;
    Ok(entry.clone())
}

/// The values of stack entries, and the depth of the deepest (0 for none).
fn unzip_depths(items: Vec<(Value, u32)>) -> (Vec<Value>, u32) {
    let deepest = items.iter().map(|(_, d)| *d).max().unwrap_or(0);
    (items.into_iter().map(|(v, _)| v).collect(), deepest)
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            copy_budget: (data.len() as u64)
                .saturating_mul(COPY_BYTES_PER_BYTE)
                .saturating_add(COPY_BYTES_BASE),
            classes: None,
            model: None,
        }
    }

    /// A copy of the top value, its size taken from the copy budget.
    fn copy_top(&mut self) -> Result<(Value, u32)> {
        match self.stack.last() {
            Some((Value::Mark, _)) | None => {
                bail!("an opcode needs a value on the stack, found none")
            }
            Some(top) => copy_within(&mut self.copy_budget, top),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("the pickle ends early, at byte {}", self.data.len()))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A newline-terminated line (for GLOBAL).
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("the pickle ends inside a GLOBAL name"))?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).context("a GLOBAL name is not UTF-8")
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(bytes)
                .context("a string is not UTF-8")?
                .to_string(),
        ))
    }

    /// Pushes a value that holds no others (or none yet).
    fn push(&mut self, v: Value) -> Result<()> {
        self.push_at(v, 1)
    }

    /// Pushes a value `depth` deep.
    fn push_at(&mut self, v: Value, depth: u32) -> Result<()> {
        ensure!(
            self.stack.len() < MAX_VALUES,
            "the pickle stack grows past {MAX_VALUES} values"
        );
        ensure!(
            depth <= MAX_DEPTH,
            "the pickle nests values more than {MAX_DEPTH} deep"
        );
        self.stack.push((v, depth));
        Ok(())
    }

    /// Pushes a container of `items`, one level deeper than the deepest.
    fn push_container(
        &mut self,
        make: impl FnOnce(Vec<Value>) -> Result<Value>,
        items: Vec<(Value, u32)>,
    ) -> Result<()> {
        let (items, deepest) = unzip_depths(items);
        self.push_at(make(items)?, deepest + 1)
    }

    fn pop(&mut self) -> Result<Value> {
        Ok(self.pop_at()?.0)
    }

    /// Pops a value with its depth.
    fn pop_at(&mut self) -> Result<(Value, u32)> {
        match self.stack.pop() {
            Some((Value::Mark, _)) => bail!("an opcode found a mark where it expected a value"),
            Some(v) => Ok(v),
            None => bail!("an opcode pops from an empty stack"),
        }
    }

    fn top(&mut self) -> Result<&mut Value> {
        Ok(&mut self.top_at()?.0)
    }

    /// The top value with its depth.
    fn top_at(&mut self) -> Result<&mut (Value, u32)> {
        match self.stack.last_mut() {
            Some((Value::Mark, _)) | None => {
                bail!("an opcode needs a value on the stack, found none")
            }
            Some(v) => Ok(v),
        }
    }

    /// Adds `items` to the container on top with `add`, deepening it to
    /// hold them.
    fn add_to_top(
        &mut self,
        add: impl FnOnce(&mut Value, Vec<Value>) -> Result<()>,
        items: Vec<(Value, u32)>,
    ) -> Result<()> {
        let (items, deepest) = unzip_depths(items);
        let (top, depth) = self.top_at()?;
        *depth = (*depth).max(deepest + 1);
        ensure!(
            *depth <= MAX_DEPTH,
            "the pickle nests values more than {MAX_DEPTH} deep"
        );
        add(top, items)
    }

    /// Pops everything above the topmost mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<(Value, u32)>> {
        let at = self
            .stack
            .iter()
            .rposition(|(v, _)| matches!(v, Value::Mark))
            .ok_or_else(|| anyhow!("an opcode needs a mark, but there is none"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, id: u32) -> Result<()> {
        let v = self.copy_top()?;
        ensure!(
            self.memo.len() < MAX_VALUES || self.memo.contains_key(&id),
            "the pickle memo grows past {MAX_VALUES} values"
        );
        self.memo.insert(id, v);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<()> {
        let entry = self
            .memo
            .get(&id)
            .ok_or_else(|| anyhow!("the pickle refers to memo entry {id}, which was never set"))?;
        let (v, depth) = copy_within(&mut self.copy_budget, entry)?;
        self.push_at(v, depth)
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            self.step(op)
                .with_context(|| format!("at byte {at} (opcode {:?})", op as char))?;
            if op == b'.' {
                let v = self.pop()?;
                return Ok(v);
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                // PROTO
                let p = self.u8()?;
                ensure!(p <= 5, "pickle protocol {p} is newer than 5");
            }
            0x95 => {
                // FRAME: a length hint only
                self.u64()?;
            }
            b'.' => {} // STOP, handled by the caller
            b'(' => self.push(Value::Mark)?,
            b'0' => {
                // POP
                self.stack
                    .pop()
                    .ok_or_else(|| anyhow!("POP on an empty stack"))?;
            }
            b'1' => {
                // POP_MARK
                self.pop_mark()?;
            }
            b'2' => {
                // DUP
                let (v, depth) = self.copy_top()?;
                self.push_at(v, depth)?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()))?
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v.into()))?
            }
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v.into()))?
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes
                let n = self.u8()? as usize;
                let bytes = self.take(n)?;
                ensure!(n <= 8, "an integer of {n} bytes does not fit in 64 bits");
                let mut v: i64 = 0;
                for (i, &b) in bytes.iter().enumerate() {
                    v |= (b as i64) << (8 * i);
                }
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                self.push(Value::Int(v))?
            }
            b'G' => {
                let v = f64::from_bits(u64::from_be_bytes(
                    self.take(8)?.try_into().expect("8 bytes"),
                ));
                self.push(Value::Float(v))?
            }
            b'X' => {
                let n = self.u32()? as usize;
                let v = self.string(n)?;
                self.push(v)?
            }
            0x8c => {
                // SHORT_BINUNICODE
                let n = self.u8()? as usize;
                let v = self.string(n)?;
                self.push(v)?
            }
            0x8d => {
                // BINUNICODE8
                let n = usize::try_from(self.u64()?).context("string length")?;
                let v = self.string(n)?;
                self.push(v)?
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e => {
                // BINSTRING, SHORT_BINSTRING, BINBYTES, SHORT_BINBYTES, BINBYTES8
                let n = match op {
                    b'T' | b'B' => self.u32()? as usize,
                    b'U' | b'C' => self.u8()? as usize,
                    _ => usize::try_from(self.u64()?).context("bytes length")?,
                };
                let v = Value::Bytes(self.take(n)?.to_vec());
                self.push(v)?
            }
            b')' => self.push(Value::Tuple(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_container(|items| Ok(Value::Tuple(items)), items)?
            }
            0x85..=0x87 => {
                // TUPLE1, TUPLE2, TUPLE3
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop_at()?);
                }
                items.reverse();
                self.push_container(|items| Ok(Value::Tuple(items)), items)?
            }
            b']' => self.push(Value::List(Vec::new()))?,
            b'l' => {
                let items = self.pop_mark()?;
                self.push_container(|items| Ok(Value::List(items)), items)?
            }
            b'a' | b'e' => {
                // APPEND adds the top value, APPENDS all down to the mark.
                let (name, new) = if op == b'a' {
                    ("APPEND", vec![self.pop_at()?])
                } else {
                    ("APPENDS", self.pop_mark()?)
                };
                self.add_to_top(
                    |top, new| match top {
                        Value::List(items) => {
                            items.extend(new);
                            Ok(())
                        }
                        other => bail!("{name} to {}, not a list", other.describe()),
                    },
                    new,
                )?
            }
            b'}' => self.push(Value::Dict(Dict::default()))?,
            b'd' => {
                let items = self.pop_mark()?;
                self.push_container(
                    |items| {
                        let mut dict = Value::Dict(Dict::default());
                        dict_insert(&mut dict, pairs(items)?)?;
                        Ok(dict)
                    },
                    items,
                )?
            }
            b's' => {
                let value = self.pop_at()?;
                let key = self.pop_at()?;
                self.add_to_top(|top, kv| dict_insert(top, pairs(kv)?), vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.add_to_top(|top, kv| dict_insert(top, pairs(kv)?), items)?;
            }
            b'q' => {
                let id = self.u8()?.into();
                self.memo_put(id)?
            }
            b'r' => {
                let id = self.u32()?;
                self.memo_put(id)?
            }
            0x94 => {
                // MEMOIZE
                let id = u32::try_from(self.memo.len()).context("memo size")?;
                self.memo_put(id)?
            }
            b'h' => {
                let id = self.u8()?.into();
                self.memo_get(id)?
            }
            b'j' => {
                let id = self.u32()?;
                self.memo_get(id)?
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(Global::resolve(module, name)?))?
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    bail!("STACK_GLOBAL needs two strings");
                };
                self.push(Value::Global(Global::resolve(module, name)?))?
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = persistent_load(pid)?;
                self.push(Value::Storage(Box::new(storage)))?
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = reduce(callable, args)?;
                self.push(v)?
            }
            b'b' => {
                // BUILD: PyTorch sets `_metadata` on the OrderedDict; the
                // weights don't depend on it, but the class names are there.
                let state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) => {}
                    other => bail!("BUILD on {}, which takes no state", other.describe()),
                }
                if let Some(classes) = metadata_classes(&state)? {
                    self.classes = Some(classes);
                }
                if let Some(Value::Str(model)) = metadata_entry(&state, "model") {
                    self.model = Some(model);
                }
            }
            other => bail!(
                "unsupported pickle opcode 0x{other:02x}: this reader only knows what \
                 torch.save uses for a state_dict"
            ),
        }
        Ok(())
    }
}

/// `state["_metadata"][""][key]`, when a BUILD's state has it.
fn metadata_entry(state: &Value, key: &str) -> Option<Value> {
    let get = |v: &Value, key: &str| -> Option<Value> {
        let Value::Dict(d) = v else { return None };
        d.entries
            .iter()
            .find(|(k, _)| *k == Value::Str(key.to_string()))
            .map(|(_, v)| v.clone())
    };
    get(state, "_metadata")
        .and_then(|m| get(&m, ""))
        .and_then(|m| get(&m, key))
}

/// `state["_metadata"][""]["classes"]`, when a BUILD's state has it; an
/// error when it is there but not a list of strings.
fn metadata_classes(state: &Value) -> Result<Option<Vec<String>>> {
    let Some(classes) = metadata_entry(state, "classes") else {
        return Ok(None);
    };
    let Value::List(items) = classes else {
        bail!(
            "_metadata's classes is {}, not a list of strings",
            classes.describe()
        );
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::Str(s) => Ok(s),
            other => bail!("a class name in _metadata is {}", other.describe()),
        })
        .collect::<Result<Vec<String>>>()
        .map(Some)
}

/// Key/value pairs from a flat run `[k0, v0, k1, v1, ...]`.
fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    ensure!(
        items.len().is_multiple_of(2),
        "a dict needs keys and values in pairs, got {} items",
        items.len()
    );
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// Inserts into a dict; a key seen before keeps its place and takes the new
/// value, as in Python.
fn dict_insert(dict: &mut Value, items: Vec<(Value, Value)>) -> Result<()> {
    let Value::Dict(dict) = dict else {
        bail!("SETITEM(S) on {}, not a dict", dict.describe());
    };
    for (k, v) in items {
        match dict.index.entry(DictKey::of(&k)?) {
            Entry::Occupied(at) => dict.entries[*at.get()].1 = v,
            Entry::Vacant(at) => {
                at.insert(dict.entries.len());
                dict.entries.push((k, v));
            }
        }
    }
    Ok(())
}

/// `torch.load`'s persistent_load: `('storage', StorageType, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<StorageRef> {
    let Value::Tuple(items) = pid else {
        bail!("a persistent id should be a tuple, got {}", pid.describe());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage((_, kind, elem_size))), Value::Str(key), Value::Str(_location), numel]
            if tag == "storage" =>
        {
            ensure!(
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "storage key {key:?} is not a plain name"
            );
            let numel = numel.int("a storage's element count")?;
            ensure!(numel >= 0, "storage {key} has {numel} elements");
            Ok(StorageRef {
                key: key.clone(),
                kind: *kind,
                elem_size: *elem_size,
                numel: numel as u64,
            })
        }
        _ => bail!(
            "unsupported persistent id {:?}: expected ('storage', torch.<Type>Storage, key, \
             location, numel)",
            items.iter().map(Value::describe).collect::<Vec<_>>()
        ),
    }
}

/// Applies one of the allowed callables (REDUCE).
fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else {
        bail!(
            "REDUCE arguments should be a tuple, got {}",
            args.describe()
        );
    };
    let Value::Global(global) = callable else {
        bail!(
            "REDUCE calls {}, which is not callable",
            callable.describe()
        );
    };
    match global {
        Global::OrderedDict => {
            ensure!(
                args.is_empty(),
                "OrderedDict(...) with {} arguments is not supported",
                args.len()
            );
            Ok(Value::Dict(Dict::default()))
        }
        Global::RebuildTensorV2 => match args.as_slice() {
            [Value::Storage(storage), offset, size, stride, _requires_grad, _hooks, ..] => {
                Ok(Value::Tensor(Box::new(TensorDesc {
                    storage: storage.as_ref().clone(),
                    offset: offset.int("a tensor's storage offset")?,
                    size: size.ints("a tensor's size")?,
                    stride: stride.ints("a tensor's stride")?,
                })))
            }
            _ => bail!(
                "_rebuild_tensor_v2 expects (storage, offset, size, stride, requires_grad, \
                 hooks), got {} arguments",
                args.len()
            ),
        },
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => bail!("_rebuild_parameter expects a tensor first"),
        },
        Global::Storage((name, _, _)) => bail!("torch.{name} cannot be called here"),
    }
}

// ---------------------------------------------------------------------------
// Pickling

/// Writes the pickle `torch.save` writes for an `OrderedDict` of tensors,
/// with protocol 2 and only `weights_only`-safe globals.
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn new() -> Self {
        Self {
            out: vec![0x80, 2], // PROTO 2
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend([b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend((v as i32).to_le_bytes());
        } else {
            self.out.extend([0x8a, 8]); // LONG1 of 8 bytes
            self.out.extend(v.to_le_bytes());
        }
    }

    fn int_tuple(&mut self, values: &[i64]) {
        self.out.push(b'(');
        for &v in values {
            self.int(v);
        }
        self.out.push(b't');
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([b')', b'R']); // OrderedDict()
    }

    fn begin_ordered_dict(&mut self) {
        self.empty_ordered_dict();
        self.out.push(b'('); // MARK for SETITEMS
    }

    /// `key: _rebuild_tensor_v2(storage, 0, size, contiguous stride, False, OrderedDict())`.
    fn tensor_entry(
        &mut self,
        key: &str,
        storage: &str,
        storage_key: &str,
        numel: u64,
        size: &[i64],
    ) {
        let mut stride = vec![1i64; size.len()];
        for i in (0..size.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * size[i + 1].max(1);
        }
        self.strided_tensor_entry(key, storage, storage_key, numel, size, &stride);
    }

    /// `key: _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`.
    fn strided_tensor_entry(
        &mut self,
        key: &str,
        storage: &str,
        storage_key: &str,
        numel: u64,
        size: &[i64],
        stride: &[i64],
    ) {
        self.str(key);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // The persistent id.
        self.out.push(b'(');
        self.str("storage");
        self.global("torch", storage);
        self.str(storage_key);
        self.str("cpu");
        self.int(numel as i64);
        self.out.extend([b't', b'Q']);
        self.int(0);
        self.int_tuple(size);
        self.int_tuple(stride);
        self.out.push(0x89); // requires_grad=False
        self.empty_ordered_dict(); // backward_hooks
        self.out.extend([b't', b'R']);
    }

    fn end_ordered_dict(&mut self) {
        self.out.push(b'u'); // SETITEMS
    }

    /// BUILD on the dict just written with the state
    /// `{"_metadata": OrderedDict({"": {"version": 1, "classes": [...],
    /// "model": "..."}})}`, each of the two only when given.
    fn build_metadata(&mut self, classes: Option<&[String]>, model: Option<&str>) {
        self.out.extend([b'}', b'(']); // {  MARK
        self.str("_metadata");
        self.begin_ordered_dict();
        self.str("");
        self.out.extend([b'}', b'(']);
        self.str("version");
        self.int(1);
        if let Some(classes) = classes {
            self.str("classes");
            self.out.extend([b']', b'(']); // []  MARK
            for class in classes {
                self.str(class);
            }
            self.out.push(b'e'); // APPENDS
        }
        if let Some(model) = model {
            self.str("model");
            self.str(model);
        }
        self.out.push(b'u'); // SETITEMS of the inner dict
        self.end_ordered_dict();
        self.out.push(b'u'); // SETITEMS of the state
        self.out.push(b'b'); // BUILD
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::with_torch_rng;
    use tch::Device;

    fn sample() -> Vec<(String, Tensor)> {
        let opts = (Kind::Float, Device::Cpu);
        let randn = |shape: &[i64]| with_torch_rng(None, || Tensor::randn(shape, opts));
        vec![
            ("a.weight".into(), randn(&[3, 2, 5])),
            ("a.bias".into(), randn(&[70_000])),
            ("scalar".into(), Tensor::from(1.5f32)),
            ("empty".into(), Tensor::zeros([0, 4], opts)),
        ]
    }

    #[test]
    fn write_then_read_round_trips_in_order() {
        let state = sample();
        let bytes = to_bytes(&state).unwrap();
        assert!(is_zip(&bytes));
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(back.len(), state.len());
        for ((ka, a), (kb, b)) in state.iter().zip(&back) {
            assert_eq!(ka, kb);
            assert_eq!(a.size(), b.size(), "{ka}");
            assert!(a.equal(b), "{ka} changed");
        }
    }

    #[test]
    fn i64_counters_round_trip_as_long_storages() {
        let state = vec![
            (
                "norm.running_mean".into(),
                Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            ),
            ("norm.num_batches_tracked".into(), Tensor::from(3i64)),
            ("big".into(), Tensor::from_slice(&[i64::MIN, -1, 1 << 40])),
        ];
        let bytes = to_bytes(&state).unwrap();
        let pickle = pickle_of(&bytes);
        assert!(pickle.windows(11).any(|w| w == b"LongStorage"));
        let back = from_bytes(&bytes).unwrap();
        for ((ka, a), (kb, b)) in state.iter().zip(&back) {
            assert_eq!(ka, kb);
            assert_eq!((a.kind(), a.size()), (b.kind(), b.size()), "{ka}");
            assert!(a.equal(b), "{ka} changed");
        }
    }

    /// `data.pkl` of a `to_bytes` archive.
    fn pickle_of(bytes: &[u8]) -> Vec<u8> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let mut pkl = Vec::new();
        zip.by_name("archive/data.pkl")
            .unwrap()
            .read_to_end(&mut pkl)
            .unwrap();
        pkl
    }

    /// An archive like `to_bytes`'s with `pkl` as its data.pkl.
    fn with_pickle(bytes: &[u8], pkl: &[u8]) -> Vec<u8> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).unwrap();
            let name = f.name().to_string();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            out.start_file(name.as_str(), zip::write::FileOptions::default())
                .unwrap();
            out.write_all(if name.ends_with("data.pkl") {
                pkl
            } else {
                &data
            })
            .unwrap();
        }
        out.finish().unwrap().into_inner()
    }

    /// An f32 tensor entry: key, storage key, storage elements, size, stride.
    type Entry<'a> = (&'a str, &'a str, u64, &'a [i64], &'a [i64]);

    /// A state_dict pickle of `tensors`, as torch.save writes them.
    fn state_pickle(tensors: &[Entry]) -> Vec<u8> {
        let mut pickle = Pickler::new();
        pickle.begin_ordered_dict();
        for &(key, storage, numel, size, stride) in tensors {
            pickle.strided_tensor_entry(key, "FloatStorage", storage, numel, size, stride);
        }
        pickle.end_ordered_dict();
        pickle.finish()
    }

    /// The CRC-32 zip uses.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        crc.sum()
    }

    /// A zip archive of stored `(name, data, claimed size)` entries, written
    /// by hand so that the directory can lie: a claimed size other than the
    /// data's length goes in a zip64 record. Without `crcs`, every CRC is 0,
    /// as after `torch.serialization.set_crc32_options(False)`.
    fn raw_zip(entries: &[(&str, &[u8], u64)], crcs: bool) -> Vec<u8> {
        let (mut out, mut dir) = (Vec::new(), Vec::new());
        for &(name, data, claimed) in entries {
            let crc = if crcs { crc32(data) } else { 0 };
            let (len, name_len) = (data.len() as u32, name.len() as u16);
            let offset = out.len() as u32;
            out.extend(0x0403_4b50u32.to_le_bytes());
            out.extend([45, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
            out.extend(crc.to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(name_len.to_le_bytes());
            out.extend(0u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(data);
            let zip64 = claimed != data.len() as u64;
            dir.extend(0x0201_4b50u32.to_le_bytes());
            dir.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // versions, flags, method, time, date
            dir.extend(crc.to_le_bytes());
            dir.extend(len.to_le_bytes());
            dir.extend((if zip64 { u32::MAX } else { len }).to_le_bytes());
            dir.extend(name_len.to_le_bytes());
            dir.extend((if zip64 { 12u16 } else { 0 }).to_le_bytes());
            dir.extend([0; 10]); // comment length, disk, internal and external attributes
            dir.extend(offset.to_le_bytes());
            dir.extend(name.as_bytes());
            if zip64 {
                dir.extend(1u16.to_le_bytes());
                dir.extend(8u16.to_le_bytes());
                dir.extend(claimed.to_le_bytes());
            }
        }
        let (count, dir_len, dir_at) = (entries.len() as u16, dir.len() as u32, out.len() as u32);
        out.extend(dir);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0; 4]); // disk numbers
        out.extend(count.to_le_bytes());
        out.extend(count.to_le_bytes());
        out.extend(dir_len.to_le_bytes());
        out.extend(dir_at.to_le_bytes());
        out.extend([0; 2]); // comment length
        out
    }

    #[test]
    fn the_hand_written_zips_load() {
        let pkl = state_pickle(&[("w", "0", 2, &[2], &[1])]);
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = raw_zip(
            &[
                ("a/data.pkl", &pkl, pkl.len() as u64),
                ("a/data/0", &data, data.len() as u64),
            ],
            true,
        );
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(Vec::<f32>::try_from(&back[0].1).unwrap(), [1.5, -2.0]);
    }

    #[test]
    fn archives_saved_without_crcs_load_but_a_missing_crc_among_others_is_an_error() {
        let pkl = state_pickle(&[("w", "0", 2, &[2], &[1])]);
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let entries = [
            ("a/data.pkl", &pkl[..], pkl.len() as u64),
            ("a/byteorder", b"little", 6),
            ("a/data/0", &data, data.len() as u64),
        ];
        // torch.serialization.set_crc32_options(False): every CRC is 0.
        let back = from_bytes(&raw_zip(&entries, false)).unwrap();
        assert_eq!(Vec::<f32>::try_from(&back[0].1).unwrap(), [1.5, -2.0]);
        // With CRCs, corrupting the data is caught, and so is zeroing the
        // CRC of the corrupted entry while the others keep theirs.
        let mut bad = raw_zip(&entries, true);
        let at = bad.windows(8).position(|w| w == &data[..]).unwrap();
        bad[at] ^= 1;
        let err = format!("{:#}", from_bytes(&bad).unwrap_err());
        assert!(
            err.contains("key `w`: cannot read entry a/data/0: Invalid checksum"),
            "{err}"
        );
        let crc = crc32(&data).to_le_bytes();
        while let Some(at) = bad.windows(4).position(|w| w == crc) {
            bad[at..at + 4].fill(0);
        }
        let err = format!("{:#}", from_bytes(&bad).unwrap_err());
        assert!(err.contains("Invalid checksum"), "{err}");
    }

    #[test]
    fn entry_sizes_past_the_archive_are_refused_before_allocating() {
        // A zip64 record claims 2^60 bytes for a 24-byte entry, and the
        // pickle a storage just as large; reserving that much would abort.
        let pkl = state_pickle(&[("w", "0", 1 << 58, &[6], &[1])]);
        let bytes = raw_zip(
            &[
                ("a/data.pkl", &pkl, pkl.len() as u64),
                ("a/data/0", &[0; 24], 1 << 60),
            ],
            true,
        );
        let err = format!("{:#}", from_bytes(&bytes).unwrap_err());
        assert!(
            err.contains("key `w`: entry a/data/0 claims 1152921504606846976 bytes, more than"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_byteorder_is_an_error() {
        let pkl = state_pickle(&[]);
        let zip = |order: &[u8]| {
            raw_zip(
                &[
                    ("a/data.pkl", &pkl, pkl.len() as u64),
                    ("a/byteorder", order, order.len() as u64),
                ],
                true,
            )
        };
        assert!(from_bytes(&zip(b"little")).unwrap().is_empty());
        let err = format!("{:#}", from_bytes(&zip(&[b'x'; 17])).unwrap_err());
        assert!(
            err.contains("cannot tell the storages' byte order: entry a/byteorder is 17 bytes"),
            "{err}"
        );
        let err = format!("{:#}", from_bytes(&zip(b"big")).unwrap_err());
        assert!(err.contains("\"big\"-endian"), "{err}");
    }

    #[test]
    fn a_storage_referred_to_twice_must_keep_its_size() {
        let data = [0u8; 16];
        let zip = |numel| {
            let pkl = state_pickle(&[
                ("a", "0", 4, &[4], &[1]),
                ("b", "0", numel, &[numel as i64], &[1]),
            ]);
            raw_zip(
                &[
                    ("a/data.pkl", &pkl, pkl.len() as u64),
                    ("a/data/0", &data, data.len() as u64),
                ],
                true,
            )
        };
        let back = from_bytes(&zip(4)).unwrap();
        assert_eq!(back[1].1.size(), [4]);
        // A second reference claiming a million elements must not take its
        // own word for it (libtorch would throw reading past the storage).
        let err = format!("{:#}", from_bytes(&zip(1_000_000)).unwrap_err());
        assert!(
            err.contains("key `b`: storage 0 is 1000000 elements of Float here, but 4 elements"),
            "{err}"
        );
    }

    #[test]
    fn expanded_views_may_not_grow_far_past_the_file() {
        let data = 0.5f32.to_le_bytes();
        let zip = |size: &[i64], stride: &[i64]| {
            let pkl = state_pickle(&[("w", "0", 1, size, stride)]);
            raw_zip(
                &[
                    ("a/data.pkl", &pkl, pkl.len() as u64),
                    ("a/data/0", &data, data.len() as u64),
                ],
                true,
            )
        };
        // torch.tensor([0.5]).expand(10), as torch.save writes it.
        let back = from_bytes(&zip(&[10], &[0])).unwrap();
        assert_eq!(Vec::<f32>::try_from(&back[0].1).unwrap(), [0.5; 10]);
        // 2^31 elements (8 GB) over that one element: refused before copying.
        let err = format!(
            "{:#}",
            from_bytes(&zip(&[1 << 15, 1 << 16], &[0, 0])).unwrap_err()
        );
        assert!(
            err.contains(
                "key `w`: size [32768, 65536] is 2147483648 elements (8589934592 bytes), \
                 more than the file's tensors may take"
            ),
            "{err}"
        );
        // The budget is for all tensors together, not each.
        let pkl = state_pickle(&[
            ("a", "0", 1, &[3 << 20], &[0]),
            ("b", "0", 1, &[3 << 20], &[0]),
        ]);
        let two = raw_zip(
            &[
                ("a/data.pkl", &pkl, pkl.len() as u64),
                ("a/data/0", &data, data.len() as u64),
            ],
            true,
        );
        let err = format!("{:#}", from_bytes(&two).unwrap_err());
        assert!(err.contains("key `b`: size [3145728]"), "{err}");
    }

    #[test]
    fn tensors_saved_from_cuda_load_on_the_cpu() {
        let state = vec![(
            "w".to_string(),
            with_torch_rng(None, || Tensor::randn([2, 3], (Kind::Float, Device::Cpu))),
        )];
        let bytes = to_bytes(&state).unwrap();
        let pkl = pickle_of(&bytes);
        let cpu = b"X\x03\x00\x00\x00cpu";
        let at = pkl.windows(cpu.len()).position(|w| w == cpu).unwrap();
        let mut cuda = pkl[..at].to_vec();
        cuda.extend(b"X\x06\x00\x00\x00cuda:0");
        cuda.extend(&pkl[at + cpu.len()..]);
        let back = from_bytes(&with_pickle(&bytes, &cuda)).unwrap();
        assert!(back[0].1.equal(&state[0].1));
        assert_eq!(back[0].1.device(), Device::Cpu);
    }

    #[test]
    fn storages_are_aligned_to_64_bytes() {
        let bytes = to_bytes(&sample()).unwrap();
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        for i in 0..zip.len() {
            let f = zip.by_index(i).unwrap();
            if f.name().contains("/data/") {
                assert_eq!(f.data_start() % 64, 0, "{}", f.name());
            }
        }
    }

    #[test]
    fn non_float_tensors_are_refused_when_writing() {
        let err = to_bytes(&[("n".into(), Tensor::from_slice(&[1i32, 2]))]).unwrap_err();
        assert!(err.to_string().contains("key `n`"), "{err}");
    }

    #[test]
    fn views_into_shared_storages_are_rebuilt() {
        // A transposed view: size [2, 3], stride [1, 2], offset 1 into 7 elements.
        let storage = Tensor::arange(7, (Kind::Float, Device::Cpu));
        let desc = TensorDesc {
            storage: StorageRef {
                key: "0".into(),
                kind: Kind::Float,
                elem_size: 4,
                numel: 7,
            },
            offset: 1,
            size: vec![2, 3],
            stride: vec![1, 2],
        };
        let mut budget = 1 << 20;
        let t = desc.materialize(&storage, &mut budget).unwrap();
        assert_eq!(budget, (1 << 20) - 6 * 4);
        assert_eq!(
            Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap(),
            [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
        );
        let past_end = TensorDesc {
            offset: 2,
            ..desc.clone()
        };
        let err = past_end
            .materialize(&storage, &mut budget)
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the end"), "{err}");
        let negative = TensorDesc {
            stride: vec![-1, 2],
            ..desc
        };
        assert!(negative.materialize(&storage, &mut budget).is_err());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let opts = (Kind::Float, Device::Cpu);
        let small = with_torch_rng(None, || {
            [
                ("w".to_string(), Tensor::randn([4, 3], opts)),
                ("b".to_string(), Tensor::randn([4], opts)),
            ]
        });
        let bytes = to_bytes(&small).unwrap();
        let pkl = pickle_of(&bytes);
        for cut in 0..pkl.len() {
            assert!(Unpickler::new(&pkl[..cut]).run().is_err(), "cut at {cut}");
        }
        // Flip each byte to a few values: errors or a (different) value, never a panic.
        for i in 0..pkl.len() {
            for x in [0x00, 0x28, 0x74, 0x80, 0xff] {
                let mut p = pkl.clone();
                p[i] = x;
                let _ = Unpickler::new(&p).run();
            }
        }
        for cut in 0..bytes.len() {
            assert!(from_bytes(&bytes[..cut]).is_err(), "archive cut at {cut}");
        }
    }

    #[test]
    fn corrupting_any_byte_of_an_archive_never_panics() {
        let opts = (Kind::Float, Device::Cpu);
        let small = with_torch_rng(None, || {
            [
                ("w".to_string(), Tensor::randn([4, 3], opts)),
                ("b".to_string(), Tensor::randn([4], opts)),
            ]
        });
        let bytes = to_bytes(&small).unwrap();
        for i in 0..bytes.len() {
            for x in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] = x;
                let outcome = std::panic::catch_unwind(|| from_bytes(&b).is_ok());
                assert!(outcome.is_ok(), "panic with byte {i} set to {x:#x}");
            }
        }
    }

    #[test]
    fn code_running_pickles_are_refused_by_name() {
        // pickle.dumps(os.system, 2) style: GLOBAL 'posix system'.
        let evil = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.";
        let err = format!("{:#}", Unpickler::new(evil).run().unwrap_err());
        assert!(err.contains("`posix.system`"), "{err}");
        let err = format!("{:#}", Unpickler::new(b"\x80\x02\xff.").run().unwrap_err());
        assert!(err.contains("0xff"), "{err}");
    }

    #[test]
    fn checkpoints_and_non_dicts_say_what_they_hold() {
        let mut pickle = Pickler::new();
        pickle.out.push(b'}');
        pickle.out.push(b'(');
        pickle.str("epoch");
        pickle.int(3);
        pickle.out.push(b'u');
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file("x/data.pkl", zip::write::FileOptions::default())
            .unwrap();
        zip.write_all(&pickle.finish()).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        let err = format!("{:#}", from_bytes(&bytes).unwrap_err());
        assert!(err.contains("key `epoch` holds the int 3"), "{err}");
    }

    #[test]
    fn deeply_nested_values_are_refused_before_they_overflow_the_stack() {
        // 0, then TUPLE1 200k times: ((((0,),),),...), whose recursive drop
        // overflowed the stack.
        let mut deep = b"\x80\x02K\x00".to_vec();
        deep.extend([0x85; 200_000]);
        deep.push(b'.');
        let err = format!("{:#}", Unpickler::new(&deep).run().unwrap_err());
        assert!(
            err.contains("at byte 103 (opcode '\\u{85}'): the pickle nests values more than 100"),
            "{err}"
        );
        // The same through each other way to nest: `open` 200 times, then
        // `inner`, then `close` 200 times.
        for (open, inner, close) in [
            (&b"("[..], &b"K\x00"[..], &b"l"[..]), // [[[0]]]
            (b"(K\x00", b"K\x00", b"d"),           // {0: {0: {0: 0}}}
            (b"]", b"]", b"a"),                    // append to the list below
            (b"](", b"]", b"e"),                   // extend it
            (b"}K\x00", b"}", b"s"),               // set item in the dict below
            (b"}(K\x00", b"}", b"u"),              // set items
        ] {
            let mut p = b"\x80\x02".to_vec();
            p.extend(open.repeat(200));
            p.extend(inner);
            p.extend(close.repeat(200));
            p.push(b'.');
            let err = format!("{:#}", Unpickler::new(&p).run().unwrap_err());
            assert!(
                err.contains("nests values more than 100 deep"),
                "{close:?}: {err}"
            );
        }
        // A memo fetch or a DUP keeps the depth: a value 100 deep, then
        // (copy,) or (value, copy).
        for copy in [&b"q\x00\x30h\x00\x85"[..], b"\x32\x86"] {
            let mut p = b"\x80\x02K\x00".to_vec();
            p.extend([0x85; 99]);
            let ok = [&p[..], b"."].concat();
            assert!(Unpickler::new(&ok).run().is_ok());
            p.extend(copy);
            p.push(b'.');
            let err = format!("{:#}", Unpickler::new(&p).run().unwrap_err());
            assert!(
                err.contains("nests values more than 100 deep"),
                "{copy:?}: {err}"
            );
        }
    }

    #[test]
    fn pickles_that_copy_values_into_themselves_run_out_of_budget() {
        // x = 0, then 60 times x = (x, x) through the memo, or through DUP:
        // 2^60 copies of 0 unless copies are bounded.
        for step in [&b"q\x00\x30h\x00h\x00\x86"[..], b"\x32\x86"] {
            let mut p = b"\x80\x02K\x00".to_vec();
            p.extend(step.repeat(60));
            p.push(b'.');
            let err = format!("{:#}", Unpickler::new(&p).run().unwrap_err());
            assert!(
                err.contains("the pickle makes copies of more than 64 bytes per byte of itself"),
                "{step:?}: {err}"
            );
        }
        // The budget is for all copies together: a 1 kB string fetched
        // 2,000 times is 2 MB of copies from an 8 kB pickle.
        let mut p = b"\x80\x02(X\x00\x04\x00\x00".to_vec();
        p.extend([b'a'; 1024]);
        p.extend(b"q\x00");
        p.extend(b"h\x00".repeat(2_000));
        p.extend(b"t.");
        let err = format!("{:#}", Unpickler::new(&p).run().unwrap_err());
        assert!(err.contains("(the last, of the string \"aaaa"), "{err}");
        // Far fewer fetches are fine.
        let ok = [&p[..1034], &b"h\x00".repeat(100), b"t."].concat();
        assert!(matches!(Unpickler::new(&ok).run(), Ok(Value::Tuple(t)) if t.len() == 101));
    }

    #[test]
    fn dicts_keep_the_first_place_and_the_last_value_of_each_key() {
        // {'a': 1, 'b': 2} then d['a'] = 3, d.update({'c': 4, 'b': 5}).
        let p = b"\x80\x02(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02d\
                  X\x01\x00\x00\x00aK\x03s\
                  (X\x01\x00\x00\x00cK\x04X\x01\x00\x00\x00bK\x05u.";
        let Value::Dict(dict) = Unpickler::new(p).run().unwrap() else {
            panic!("not a dict");
        };
        let got: Vec<_> = dict
            .entries
            .iter()
            .map(|(k, v)| (k.describe(), v.int("v").unwrap()))
            .collect();
        let want = [("a", 3), ("b", 5), ("c", 4)].map(|(k, v)| (format!("the string {k:?}"), v));
        assert_eq!(got, want);
        // Keys Python can't hash are refused.
        let err = format!(
            "{:#}",
            Unpickler::new(b"\x80\x02}]K\x00s.").run().unwrap_err()
        );
        assert!(
            err.contains("a dict key is a list of 0, which cannot be hashed"),
            "{err}"
        );
    }

    #[test]
    fn a_dict_of_many_keys_is_built_in_linear_time() {
        // 200k keys: a scan per insert would make this 2 * 10^10 compares.
        let n = 200_000;
        let mut p = b"\x80\x02}(".to_vec();
        for i in 0..n {
            let key = format!("k{i:07}");
            p.push(0x8c); // SHORT_BINUNICODE
            p.push(key.len() as u8);
            p.extend(key.as_bytes());
            p.push(b'N');
        }
        p.extend(b"u.");
        let Value::Dict(dict) = Unpickler::new(&p).run().unwrap() else {
            panic!("not a dict");
        };
        assert_eq!(dict.entries.len(), n);
        assert_eq!(dict.entries[n - 1].0, Value::Str(format!("k{:07}", n - 1)));
    }

    #[test]
    fn ints_of_every_width_round_trip_through_the_unpickler() {
        for v in [
            0i64,
            255,
            256,
            65535,
            65536,
            -1,
            i32::MIN as i64,
            1 << 40,
            i64::MIN,
        ] {
            let mut p = Pickler::new();
            p.int(v);
            assert_eq!(Unpickler::new(&p.finish()).run().unwrap(), Value::Int(v));
        }
    }
}
