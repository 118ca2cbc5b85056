//! What the commands write: the format of each output file, told by its
//! extension, and the rule that no output overwrites one of the command's
//! inputs or another of its outputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::data::{DataArgs, BATCHES_DIR, TEST_FILE, TRAIN_FILES};

/// The formats weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A `state_dict` as safetensors.
    Safetensors,
    /// A `state_dict` in `torch.save`'s format.
    Pth,
    /// A TorchScript module (`torch.jit.save`'s format).
    TorchScript,
    /// An ONNX model (`.onnx`).
    Onnx,
}

impl Format {
    /// The extensions that name this format. `.pt` is PyTorch's name for
    /// both `torch.save` files and TorchScript modules.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Format::Safetensors => &["safetensors"],
            Format::Pth => &["pth", "pt"],
            Format::TorchScript => &["pt"],
            Format::Onnx => &["onnx"],
        }
    }

    /// The format's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Pth => "torch.save (.pth)",
            Format::TorchScript => "TorchScript",
            Format::Onnx => "ONNX",
        }
    }

    /// `export`'s flag that writes this format.
    pub fn export_flag(self) -> &'static str {
        match self {
            Format::Safetensors => "--safetensors",
            Format::Pth => "--pth",
            Format::TorchScript => "--torchscript",
            Format::Onnx => "--onnx",
        }
    }

    const ALL: [Format; 4] = [
        Format::Safetensors,
        Format::Pth,
        Format::TorchScript,
        Format::Onnx,
    ];

    /// The formats `path`'s extension names (case aside); empty for a
    /// missing or unknown extension.
    pub fn named_by(path: &Path) -> Vec<Format> {
        let Some(ext) = path.extension().map(|e| e.to_string_lossy().to_lowercase()) else {
            return vec![];
        };
        Format::ALL
            .into_iter()
            .filter(|f| f.extensions().contains(&ext.as_str()))
            .collect()
    }
}

/// `.EXT` or `.A or .B`, for messages.
fn extension_list(formats: &[Format]) -> String {
    let mut exts: Vec<String> = vec![];
    for f in formats {
        for e in f.extensions() {
            let e = format!(".{e}");
            if !exts.contains(&e) {
                exts.push(e);
            }
        }
    }
    exts.join(" or ")
}

/// Checks that `path`'s extension allows `format`, which `flag` asked for:
/// an error when it names another format, a note (to print) when the
/// extension names none.
pub fn check_extension(flag: &str, format: Format, path: &Path) -> Result<Option<String>> {
    let named = Format::named_by(path);
    if named.is_empty() {
        return Ok(Some(format!(
            "{} has no extension that names a format ({}); writing it as {}, as {flag} says",
            path.display(),
            extension_list(&[format]),
            format.name()
        )));
    }
    if !named.contains(&format) {
        let others: Vec<String> = named
            .iter()
            .map(|f| format!("{} {}", f.export_flag(), path.display()))
            .collect();
        bail!(
            "{flag} writes {}, but the name {} says {}: name the file {} or write it with {}",
            format.name(),
            path.display(),
            named
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(" or "),
            extension_list(&[format]),
            others.join(" or ")
        );
    }
    Ok(None)
}

/// The format `train` writes its weights in: `torch.save`'s for `.pth` and
/// `.pt`, safetensors for `.safetensors` and for any other name, with a
/// note (to print) for the latter.
pub fn weights_format(path: &Path) -> (Format, Option<String>) {
    let named = Format::named_by(path);
    if named.contains(&Format::Pth) {
        (Format::Pth, None)
    } else if named.contains(&Format::Safetensors) {
        (Format::Safetensors, None)
    } else {
        (
            Format::Safetensors,
            Some(format!(
                "{} ends in neither .safetensors nor .pth/.pt; writing safetensors",
                path.display()
            )),
        )
    }
}

/// [`check_distinct`] for a command that reads the data flags' files and
/// `inputs`, and writes `outputs` (those given).
pub fn check_command_outputs(
    data: &DataArgs,
    inputs: &[(&str, &Path)],
    outputs: &[(&str, Option<&Path>)],
) -> Result<()> {
    let data_files = data_inputs(data);
    let mut all: Vec<(&str, &Path)> = inputs.to_vec();
    all.extend(
        data_files
            .iter()
            .map(|(flag, path)| (*flag, path.as_path())),
    );
    let outputs: Vec<(&str, &Path)> = outputs
        .iter()
        .filter_map(|(flag, path)| Some((*flag, (*path)?)))
        .collect();
    check_distinct(&all, &outputs)
}

/// The files the data flags read, as `(flag, path)` pairs for
/// [`check_distinct`]: the six batch files wherever they may lie, and the
/// archive.
pub fn data_inputs(data: &DataArgs) -> Vec<(&'static str, PathBuf)> {
    let mut inputs = vec![];
    for dir in [data.data_dir.clone(), data.data_dir.join(BATCHES_DIR)] {
        for file in TRAIN_FILES.iter().chain([&TEST_FILE]) {
            inputs.push(("--data-dir", dir.join(file)));
        }
    }
    if let Some(archive) = &data.archive {
        inputs.push(("--archive", archive.clone()));
    }
    inputs
}

/// Refuses an output that is one of the command's `inputs`, and two
/// outputs that are one file. Each entry is `(flag, path)`; files are
/// compared as [`crate::util::files::same_file`] does, so a link or another
/// spelling of a path counts as the same file.
pub fn check_distinct(inputs: &[(&str, &Path)], outputs: &[(&str, &Path)]) -> Result<()> {
    use crate::util::files::same_file;
    for (i, (flag, out)) in outputs.iter().enumerate() {
        if let Some((input_flag, input)) = inputs.iter().find(|(_, input)| same_file(out, input)) {
            bail!(
                "{flag} {} would overwrite {}, which this command reads ({input_flag}); give \
                 the output another name",
                out.display(),
                input.display()
            );
        }
        if let Some((other_flag, other)) = outputs[..i].iter().find(|(_, o)| same_file(out, o)) {
            bail!(
                "{other_flag} {} and {flag} {} are the same file; give each output its own name",
                other.display(),
                out.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_name_formats() {
        let named = |p: &str| Format::named_by(Path::new(p));
        assert_eq!(named("a/w.safetensors"), [Format::Safetensors]);
        assert_eq!(named("w.PTH"), [Format::Pth]);
        assert_eq!(named("m.pt"), [Format::Pth, Format::TorchScript]);
        assert_eq!(named("m.ONNX"), [Format::Onnx]);
        assert!(named("w.bin").is_empty());
        assert!(named("weights").is_empty());

        assert_eq!(weights_format(Path::new("w.pth")), (Format::Pth, None));
        assert_eq!(weights_format(Path::new("w.pt")), (Format::Pth, None));
        assert_eq!(
            weights_format(Path::new("w.safetensors")),
            (Format::Safetensors, None)
        );
        let (format, note) = weights_format(Path::new("w.bin"));
        assert_eq!(format, Format::Safetensors);
        assert!(note.unwrap().contains("w.bin"));
    }

    #[test]
    fn a_flag_that_disagrees_with_the_extension_is_refused() {
        let check = |flag, format, p: &str| check_extension(flag, format, Path::new(p));
        assert_eq!(
            check("--torchscript", Format::TorchScript, "m.pt").unwrap(),
            None
        );
        assert_eq!(check("--pth", Format::Pth, "m.pt").unwrap(), None);
        let err = check("--torchscript", Format::TorchScript, "m.safetensors")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--torchscript writes TorchScript, but the name m.safetensors says safetensors: \
             name the file .pt or write it with --safetensors m.safetensors"
        );
        let err = check("--safetensors", Format::Safetensors, "w.pth")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pth w.pth"), "{err}");
        let note = check("--pth", Format::Pth, "w.bin").unwrap().unwrap();
        assert!(note.contains("torch.save"), "{note}");
    }

    #[test]
    fn outputs_may_not_overwrite_inputs_or_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("in.safetensors"), b"x").unwrap();
        std::fs::create_dir(p("sub")).unwrap();
        let input = p("in.safetensors");
        let spelled = p("sub/../in.safetensors");
        let err = check_distinct(&[("--weights", &input)], &[("--pth", &spelled)]).unwrap_err();
        assert!(err
            .to_string()
            .contains("which this command reads (--weights)"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&input, p("link.pth")).unwrap();
            std::fs::hard_link(&input, p("hard.pth")).unwrap();
            for out in [p("link.pth"), p("hard.pth")] {
                assert!(check_distinct(&[("--weights", &input)], &[("--pth", &out)]).is_err());
            }
        }
        let (a, b) = (p("new.bin"), p("sub/../new.bin"));
        let err = check_distinct(&[], &[("--torchscript", &a), ("--pth", &b)]).unwrap_err();
        assert!(err.to_string().contains("are the same file"), "{err}");
        check_distinct(
            &[("--weights", &input)],
            &[("--torchscript", &a), ("--pth", &p("other.pth"))],
        )
        .unwrap();
    }
}
