//! Weights on disk, whatever the network: reading a `state_dict` from
//! safetensors or PyTorch's `torch.save` format, writing safetensors with
//! metadata, the metadata keys, [`pth`] (`torch.save`'s zip of pickles),
//! [`outputs`] (output files' formats, and the rule that no output
//! overwrites an input) and [`onnx`] (ONNX model files).

pub mod onnx;
pub mod outputs;
pub mod pth;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// The keys of a training checkpoint's optimizer state, kept beside the
/// weights: `nets::tutorial::Model::load` leaves them out.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// The safetensors metadata key holding the class names, as a JSON list.
pub const CLASSES_KEY: &str = "classes";

/// The safetensors metadata key naming the network (`airbench94`); weights
/// without it are the tutorial's `Net`.
pub const MODEL_KEY: &str = "model";

/// Writes `state` (f32, f64 or i64 tensors) as safetensors with
/// `metadata` in its header, atomically: a temporary file in the same
/// folder, synced, then renamed over `path`.
pub fn write_safetensors(
    path: &Path,
    state: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = state
        .iter()
        .map(|(name, t)| {
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let (dtype, width) = match t.kind() {
                Kind::Float => (safetensors::Dtype::F32, 4),
                Kind::Double => (safetensors::Dtype::F64, 8),
                Kind::Int64 => (safetensors::Dtype::I64, 8),
                kind => bail!("cannot write `{name}`: {kind:?} tensors are not supported"),
            };
            let numel = t.numel();
            let mut data = vec![0u8; width * numel];
            t.f_copy_data_u8(&mut data, numel)
                .with_context(|| format!("cannot read `{name}`"))?;
            Ok((name.as_str(), dtype, t.size(), data))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = bytes
        .iter()
        .map(|(name, dtype, shape, data)| {
            let shape = shape.iter().map(|&d| d as usize).collect();
            safetensors::tensor::TensorView::new(*dtype, shape, data)
                .map(|v| (*name, v))
                .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut file = safetensors::serialize(views, &Some(metadata))
        .map_err(|e| anyhow::anyhow!("cannot encode weights for {}: {e:?}", path.display()))?;
    sort_header(&mut file);
    crate::util::files::write_atomically(path, |tmp| {
        std::fs::write(tmp, &file)
            .with_context(|| format!("cannot write weights to {}", tmp.display()))
    })
}

/// Rewrites a safetensors file's JSON header with its keys sorted, so that
/// the same weights give the same bytes: the metadata is a `HashMap`,
/// whose order changes from one process to the next. The header keeps its
/// length (the same text, reordered), so the data offsets hold.
fn sort_header(file: &mut [u8]) {
    let len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let header = &file[8..8 + len];
    let text = std::str::from_utf8(header).expect("safetensors writes UTF-8 JSON");
    let trimmed = text.trim_end();
    // serde_json's maps are sorted by key.
    let value: serde_json::Value =
        serde_json::from_str(trimmed).expect("safetensors writes valid JSON");
    let sorted = serde_json::to_string(&value).expect("JSON serializes");
    assert_eq!(
        sorted.len(),
        trimmed.len(),
        "a reordered header keeps its length"
    );
    file[8..8 + sorted.len()].copy_from_slice(sorted.as_bytes());
}

/// Class names as the JSON list the safetensors metadata holds.
pub fn classes_json(classes: &[String]) -> String {
    serde_json::to_string(classes).expect("strings serialize")
}

/// The class names in safetensors metadata, if it has them.
pub fn classes_from_metadata(
    metadata: Option<&HashMap<String, String>>,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    let Some(text) = metadata.and_then(|m| m.get(CLASSES_KEY)) else {
        return Ok(None);
    };
    let classes: Vec<String> = serde_json::from_str(text).with_context(|| {
        format!(
            "{}: the metadata field `{CLASSES_KEY}` is not a JSON list of names",
            path.display()
        )
    })?;
    Ok(Some(classes))
}

/// Reads a weights file into named tensors. The format is told by the
/// content, not the name: a zip archive is PyTorch's `torch.save` format
/// (`.pth`, see [`crate::weights::pth`]), anything else must be safetensors.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(read_weights(path)?.0)
}

/// Named tensors, and the class names their file holds, if any.
pub type Weights = (HashMap<String, Tensor>, Option<Vec<String>>);

/// [`read_state_dict`], and the class names the file holds, if any.
pub fn read_weights(path: &Path) -> Result<Weights> {
    if path.is_dir() {
        bail!("{} is a directory, not a weights file", path.display());
    }
    if !path.is_file() {
        bail!("weights file {} does not exist", path.display());
    }
    match sniff(path)? {
        Format::Pth => {
            let (tensors, classes) = pth::read_with_classes(path)?;
            Ok((tensors.into_iter().collect(), classes))
        }
        Format::LegacyPth => bail!(
            "{} is in torch.save's legacy format (PyTorch < 1.6 or \
             _use_new_zipfile_serialization=False), which is not supported; re-save it with \
             torch.save(state_dict, PATH) in a current PyTorch",
            path.display()
        ),
        Format::Safetensors => {
            let unreadable = || {
                format!(
                    "cannot read weights from {} (neither a safetensors file nor a .pth \
                     from torch.save)",
                    path.display()
                )
            };
            let tensors = Tensor::read_safetensors(path).with_context(unreadable)?;
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .with_context(unreadable)?;
            let classes = classes_from_metadata(header.metadata().as_ref(), path)?;
            Ok((tensors.into_iter().collect(), classes))
        }
    }
}

/// A weights file's format, as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Pth,
    LegacyPth,
    Safetensors,
}

/// How the pre-1.6 `torch.save` layout starts: PROTO 2, then LONG1 of 10
/// bytes (its magic number). As a safetensors header length it would be
/// 177 MB, over safetensors' 100 MB limit, so the two can't be confused.
const LEGACY_MAGIC: [u8; 4] = [0x80, 0x02, 0x8a, 0x0a];

fn sniff(path: &Path) -> Result<Format> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(if pth::is_zip(&head) {
        Format::Pth
    } else if head == LEGACY_MAGIC {
        Format::LegacyPth
    } else {
        Format::Safetensors
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mixed dtypes and several metadata keys: read back equal, and the
    /// same tensors give the same bytes in every process.
    #[test]
    fn safetensors_files_read_back_and_have_sorted_headers() {
        let dir = tempfile::tempdir().unwrap();
        let state = vec![
            ("b.weight".to_string(), Tensor::from_slice(&[1.5f32, -2.0])),
            ("a.count".to_string(), Tensor::from(7i64)),
            ("c.bias".to_string(), Tensor::from_slice(&[0.25f64])),
        ];
        let metadata = HashMap::from([
            ("zeta".to_string(), "1".to_string()),
            ("alpha".to_string(), "2".to_string()),
            (CLASSES_KEY.to_string(), "[\"x\"]".to_string()),
        ]);
        let path = dir.path().join("w.safetensors");
        write_safetensors(&path, &state, metadata).unwrap();
        let back = read_state_dict(&path).unwrap();
        for (name, t) in &state {
            assert_eq!(&back[name], t, "{name}");
            assert_eq!(back[name].kind(), t.kind(), "{name}");
        }
        let bytes = std::fs::read(&path).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + len]).unwrap();
        let at = |key: &str| header.find(key).unwrap();
        assert!(at("\"alpha\"") < at("\"zeta\""), "{header}");
        assert!(at("\"a.count\"") < at("\"b.weight\"") && at("\"b.weight\"") < at("\"c.bias\""));
    }
}
