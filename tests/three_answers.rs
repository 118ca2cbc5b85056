//! The Rust code of README.md and docs/compare-losses.md is the code of
//! `examples/three_answers.rs`, which runs (and whose own tests check each
//! answer): every `rust` block of those pages is one of the example's
//! marked regions, `// ANCHOR: NAME` to `// ANCHOR_END: NAME`, word for
//! word.

mod util;

use std::collections::BTreeMap;

use util::repo_path;

/// The example's regions by name, each dedented as a page shows it.
fn regions(source: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for (n, line) in source.lines().enumerate() {
        let marker = line.trim_start();
        if let Some(name) = marker.strip_prefix("// ANCHOR: ") {
            assert!(open.is_none(), "line {}: a region inside a region", n + 1);
            open = Some((name.trim().to_string(), vec![]));
        } else if let Some(name) = marker.strip_prefix("// ANCHOR_END: ") {
            let (open_name, lines) = open
                .take()
                .unwrap_or_else(|| panic!("line {}: ANCHOR_END without ANCHOR", n + 1));
            assert_eq!(name.trim(), open_name, "line {}", n + 1);
            let indent = lines
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .min()
                .unwrap_or(0);
            let text: Vec<&str> = lines
                .iter()
                .map(|l| l.get(indent..).unwrap_or(""))
                .collect();
            let previous = found.insert(open_name.clone(), text.join("\n"));
            assert!(previous.is_none(), "region {open_name} twice");
        } else if let Some((_, lines)) = open.as_mut() {
            lines.push(line);
        }
    }
    assert!(open.is_none(), "a region is never closed");
    found
}

/// The `rust` code blocks of a Markdown page, without their fences.
fn rust_blocks(page: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut open: Option<Vec<&str>> = None;
    for line in page.lines() {
        match open.as_mut() {
            None if line.trim_start().starts_with("```rust") => open = Some(vec![]),
            Some(lines) if line.trim_start().starts_with("```") => {
                blocks.push(lines.join("\n"));
                open = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    assert!(open.is_none(), "a code block is never closed");
    blocks
}

/// Checks that every `rust` block of `page` is a region of the example,
/// and returns the names of those it shows.
fn check_page(page: &str, regions: &BTreeMap<String, String>) -> Vec<String> {
    let text = std::fs::read_to_string(repo_path(page)).unwrap();
    rust_blocks(&text)
        .iter()
        .map(|block| {
            regions
                .iter()
                .find(|(_, code)| *code == block)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| {
                    panic!(
                        "this rust block of {page} is none of examples/three_answers.rs's \
                         regions (copy the region, or change both):\n{block}\n\nregions:\n{}",
                        regions
                            .iter()
                            .map(|(n, c)| format!("[{n}]\n{c}"))
                            .collect::<Vec<_>>()
                            .join("\n\n")
                    )
                })
        })
        .collect()
}

#[test]
fn the_pages_show_the_examples_code() {
    let source = std::fs::read_to_string(repo_path("examples/three_answers.rs")).unwrap();
    let regions = regions(&source);
    let answers = ["train_on_logits", "inference", "softmax_layer"];
    for name in answers.iter().chain(&["log_softmax_layer"]) {
        assert!(regions.contains_key(*name), "no region {name}");
    }
    // The README: the three answers, in order.
    assert_eq!(check_page("README.md", &regions), answers);
    // The doc: all of them, the stable form too.
    let mut shown = check_page("docs/compare-losses.md", &regions);
    shown.sort();
    shown.dedup();
    assert_eq!(shown, regions.keys().cloned().collect::<Vec<_>>());
}

#[test]
fn regions_and_blocks_are_read_as_written() {
    let source =
        "fn f() {\n    // ANCHOR: a\n    let x = 1;\n\n        y();\n    // ANCHOR_END: a\n}\n";
    let found = regions(source);
    assert_eq!(found["a"], "let x = 1;\n\n    y();");
    let page = "text\n\n```rust\nlet x = 1;\n```\n\n```text\nno\n```\n";
    assert_eq!(rust_blocks(page), ["let x = 1;"]);
}
