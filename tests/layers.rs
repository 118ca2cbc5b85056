//! The source tree's layers, held against the code: every `crate::…` and
//! `super::…` path a file of `src/` names (in `use` lines and inline) must
//! lead to its own layer or to one it may import. The table below is the
//! architecture; changing it is changing the architecture (see
//! `docs/development.md`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, top to bottom: a name, the module paths it holds (the
/// longest prefix of a path decides), and the layers it may import besides
/// itself.
const LAYERS: &[(&str, &[&str], &[&str])] = &[
    (
        "commands",
        &["cli"],
        &[
            "recipes",
            "training",
            "optimizers",
            "networks",
            "weights",
            "data",
            "distributed",
            "ground floor",
        ],
    ),
    (
        "recipes",
        &["train::recipes"],
        &[
            "training",
            "optimizers",
            "networks",
            "weights",
            "data",
            "distributed",
            "ground floor",
        ],
    ),
    (
        "training",
        &["train"],
        &[
            "optimizers",
            "networks",
            "weights",
            "data",
            "distributed",
            "ground floor",
        ],
    ),
    (
        "optimizers",
        &["train::optim"],
        &["networks", "distributed", "ground floor"],
    ),
    ("networks", &["nets"], &["weights", "data", "ground floor"]),
    ("weights", &["weights"], &["data", "ground floor"]),
    ("data", &["data"], &["ground floor"]),
    ("distributed", &["distributed"], &["ground floor"]),
    ("ground floor", &["util"], &[]),
];

/// The layer holding module `path` (`a::b::c`), by the longest prefix in
/// [`LAYERS`]; `None` for the crate root.
fn layer_of(path: &str) -> Option<&'static str> {
    LAYERS
        .iter()
        .flat_map(|(name, prefixes, _)| prefixes.iter().map(move |p| (*name, *p)))
        .filter(|(_, p)| path == *p || path.starts_with(&format!("{p}::")))
        .max_by_key(|(_, p)| p.len())
        .map(|(name, _)| name)
}

fn may_import(from: &str, to: &str) -> bool {
    from == to
        || LAYERS
            .iter()
            .any(|(name, _, allowed)| *name == from && allowed.contains(&to))
}

/// The module path of a file under `src/` (`train/harness/mod.rs` →
/// `train::harness`); empty for `lib.rs` and `main.rs`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// The module paths a line names: `crate::a::b`, the items of
/// `crate::{a, b::c}`, and `super::` paths resolved from `module` (each
/// `super` drops one segment; inside a file's inline `mod tests` that lands
/// one level high, which keeps it within the file's layer or outside all).
fn paths_in(line: &str, module: &str) -> Vec<String> {
    let code = match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    };
    let mut found = vec![];
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start).map(|i| from + i) {
            let before = code[..i].chars().last();
            let after = &code[i..];
            from = i + start.len();
            // `crate::crate` and the like are not paths of this crate.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let (base, tail) = if start == "crate::" {
                (String::new(), &after["crate::".len()..])
            } else {
                let mut segments: Vec<&str> =
                    module.split("::").filter(|s| !s.is_empty()).collect();
                let mut tail = after;
                while let Some(t) = tail.strip_prefix("super::") {
                    segments.pop();
                    tail = t;
                }
                (segments.join("::"), tail)
            };
            for item in items(tail) {
                let full = if base.is_empty() {
                    item
                } else {
                    format!("{base}::{item}")
                };
                found.push(full);
            }
        }
    }
    found
}

/// The paths that start `tail`: one (`a::b::c`) or a brace group's items.
fn items(tail: &str) -> Vec<String> {
    let path: String = tail
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    let path = path.trim_end_matches(':').to_string();
    let after = &tail[path.len()..].trim_start_matches(':');
    if after.starts_with('{') {
        let mut depth = 0;
        let mut item = String::new();
        let mut out = vec![];
        for c in after.chars() {
            match c {
                '{' => {
                    depth += 1;
                    if depth == 1 {
                        continue;
                    }
                }
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(item.clone());
                        break;
                    }
                }
                ',' if depth == 1 => {
                    out.push(std::mem::take(&mut item));
                    continue;
                }
                _ => {}
            }
            item.push(c);
        }
        out.iter()
            .map(|i| i.trim())
            .filter(|i| !i.is_empty() && *i != "self")
            .flat_map(|i| items(i).into_iter())
            .map(|i| {
                if path.is_empty() {
                    i
                } else {
                    format!("{path}::{i}")
                }
            })
            .collect()
    } else if path.is_empty() {
        vec![]
    } else {
        vec![path]
    }
}

/// Every broken rule in one file's `text`, as `file:line: …`.
fn violations(rel: &Path, text: &str) -> Vec<String> {
    let module = module_of(rel);
    let Some(from) = layer_of(&module) else {
        return vec![];
    };
    let mut out = vec![];
    // A multi-line `use crate::{…};` is read as one line.
    let mut pending = String::new();
    let mut first_line = 0;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if pending.is_empty() {
            first_line = n + 1;
        }
        pending.push_str(line);
        pending.push(' ');
        let open = pending.matches('{').count();
        let close = pending.matches('}').count();
        let head = pending.trim_start();
        let is_use = ["use ", "pub use ", "pub(crate) use "]
            .iter()
            .any(|u| head.starts_with(u));
        if is_use && open > close {
            continue;
        }
        for path in paths_in(&pending, &module) {
            let Some(to) = layer_of(&path) else { continue };
            if !may_import(from, to) {
                out.push(format!(
                    "src/{}:{first_line}: `{path}`: the {from} layer may not import the {to} layer",
                    rel.display()
                ));
            }
        }
        pending.clear();
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    let mut broken = vec![];
    let mut unplaced = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let module = module_of(rel);
        if !module.is_empty() && layer_of(&module).is_none() {
            unplaced.insert(format!("src/{}", rel.display()));
        }
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        broken.extend(violations(rel, &text));
    }
    assert!(
        unplaced.is_empty(),
        "files in no layer of tests/layers.rs's table: {unplaced:?}"
    );
    assert!(
        broken.is_empty(),
        "imports that reach up a layer:\n{}",
        broken.join("\n")
    );
}

#[test]
fn an_upward_import_is_caught_with_its_file_line_and_rule() {
    let text = "//! Doc naming [`crate::cli`] is no import.\n\
                use crate::util::files;\n\
                use crate::{\n    util::report::Reporter,\n    train::checkpoint::Position,\n};\n\
                fn f() { crate::nets::ModelKind::Net; }\n";
    let found = violations(Path::new("data/cache.rs"), text);
    assert_eq!(
        found,
        [
            "src/data/cache.rs:3: `train::checkpoint::Position`: the data layer may not import the training layer",
            "src/data/cache.rs:7: `nets::ModelKind::Net`: the data layer may not import the networks layer",
        ]
    );
}

#[test]
fn super_paths_resolve_from_the_file() {
    assert_eq!(
        paths_in(
            "use super::super::checkpoint::Position;",
            "train::harness::ranks"
        ),
        ["train::checkpoint::Position"]
    );
    assert_eq!(
        paths_in("use super::losses::X;", "train::harness"),
        ["train::losses::X"]
    );
    assert_eq!(
        paths_in("use super::{a, b::{c, d}};", "data::cache"),
        ["data::a", "data::b::c", "data::b::d"]
    );
    // The recipes may reach the harness; the harness may not reach them.
    assert!(may_import("recipes", "training"));
    assert!(!may_import("training", "recipes"));
    assert_eq!(layer_of("train::recipes::tutorial"), Some("recipes"));
}
