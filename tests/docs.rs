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

/// `completions SHELL` and `man` print what a shell and `man` read, naming every public command;
/// an unknown shell is bad input.
#[test]
fn completions_and_the_manual_page_name_every_command() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nbl-onnx"))
            .args(args)
            .output()
            .expect("the binary runs")
    };
    let commands = [
        "inspect",
        "calibrate",
        "merge-stats",
        "analyze",
        "rewrite",
        "check",
        "eval",
        "bench",
        "sweep",
        "card",
    ];
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        for command in commands {
            assert!(script.contains(command), "{shell}: {command} missing");
        }
    }
    assert!(String::from_utf8(run(&["completions", "bash"]).stdout).unwrap().contains("--moment-precision"));
    let man = String::from_utf8(run(&["man"]).stdout).unwrap();
    assert!(man.contains(".TH nbl-onnx 1"), "{}", &man[..200.min(man.len())]);
    for command in commands {
        assert!(man.contains(&command.replace('-', "\\-")), "man: {command} missing");
    }
    let bad = run(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value 'tcsh'"));
}
