//! The documentation keeps up with the code: `docs/design.md` names every module under `src/`, and
//! the README stays a front door.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, as a path relative to the crate root (`src/fit/mod.rs`).
fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.strip_prefix(root()).unwrap().to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn the_design_document_names_every_source_module() {
    let design = std::fs::read_to_string(root().join("docs/design.md")).expect("docs/design.md exists");
    let mut modules = Vec::new();
    rust_files(&root().join("src"), &mut modules);
    assert!(modules.len() > 20, "found only {modules:?}");
    let missing: Vec<&String> = modules.iter().filter(|m| !design.contains(&format!("`{m}`"))).collect();
    assert!(missing.is_empty(), "docs/design.md does not name these modules: {missing:?}");
}

#[test]
fn the_readme_is_a_front_door_of_at_most_200_lines() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 200, "README.md has {lines} lines; reference and results belong in docs/");
    assert!(readme.contains("scripts/test.sh"), "the README gives the test command");
    for link in ["docs/usage.md", "docs/design.md", "docs/results/"] {
        assert!(readme.contains(link), "the README links {link}");
    }
}
