//! Hugging Face Hub layouts: where the files a model comes with are, and where a rewrite puts them.
//!
//! Optimum and the GenAI builder put the tokenizer and config files beside the model (*flat*).
//! onnx-community / transformers.js repositories put them in the repository root and the model
//! variants in `onnx/` (`model.onnx`, `model_fp16.onnx`, `model_q4.onnx`, ...): the *onnx/ layout*.
//! Both are read. A rewrite written to a directory of its own reproduces the input's layout, so that
//! the loaders that found the input's files find the output's in the same places: in the onnx/
//! layout when the output goes into a folder named `onnx`, flat otherwise. The model card
//! (`README.md`, see `card`) goes where the config goes: the repository root.
//!
//! The GenAI config is always flat (onnxruntime-genai reads `genai_config.json` beside the model);
//! `genai::Companion` writes the files.

use std::path::{Path, PathBuf};

use crate::atomic::dir_of;

/// The Hub's name for the folder of model variants.
pub const ONNX_FOLDER: &str = "onnx";

/// Files a runtime loads from the model's directory (or, in the onnx/ layout, the repository root)
/// besides the model itself.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "preprocessor_config.json",
];

/// Where a model's tokenizer and config files are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoLayout {
    /// Beside the model.
    Flat,
    /// In the parent of the model's `onnx/` folder.
    OnnxFolder,
}

impl RepoLayout {
    /// The layout of the model in `model_dir`: the onnx/ layout where the folder is named `onnx`,
    /// holds neither `tokenizer.json` nor `config.json`, and its parent holds one of them. Only that
    /// folder name is looked through, so that an unrelated tokenizer a level up is never taken.
    pub fn of(model_dir: &Path) -> RepoLayout {
        let has = |dir: &Path| ["tokenizer.json", "config.json"].iter().any(|f| dir.join(f).is_file());
        let named_onnx = std::fs::canonicalize(model_dir)
            .ok()
            .is_some_and(|d| d.file_name().is_some_and(|n| n == ONNX_FOLDER));
        match model_dir.parent() {
            Some(parent) if named_onnx && !has(model_dir) && has(&repository_root(model_dir, parent)) => {
                RepoLayout::OnnxFolder
            }
            _ => RepoLayout::Flat,
        }
    }

    /// The folder holding the companion files of a model in `model_dir`.
    pub fn companion_dir(self, model_dir: &Path) -> PathBuf {
        match (self, model_dir.parent()) {
            (RepoLayout::OnnxFolder, Some(parent)) => repository_root(model_dir, parent),
            _ => model_dir.to_path_buf(),
        }
    }
}

/// `parent` as a path that exists: `.` where the model directory is the bare `onnx`.
pub fn repository_root(model_dir: &Path, parent: &Path) -> PathBuf {
    if parent.as_os_str().is_empty() || model_dir == Path::new(ONNX_FOLDER) {
        PathBuf::from(".")
    } else {
        parent.to_path_buf()
    }
}

/// The companion file `name` of the model in `model_dir`: beside it, or at the repository root of
/// the onnx/ layout.
pub fn companion(model_dir: &Path, name: &str) -> PathBuf {
    RepoLayout::of(model_dir).companion_dir(model_dir).join(name)
}

/// Where `-o DIR/` (a directory) puts the rewrite of `model`: `DIR/onnx/<name>` for a model in the
/// onnx/ layout, `DIR/<name>` otherwise; the same file name as the input, in a repository of its own.
pub fn output_in(dir: &Path, model: &Path) -> PathBuf {
    let name = model.file_name().map_or_else(|| "model.onnx".into(), |n| n.to_os_string());
    match RepoLayout::of(dir_of(model)) {
        RepoLayout::OnnxFolder => dir.join(ONNX_FOLDER).join(name),
        RepoLayout::Flat => dir.join(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_onnx_folder_layout_is_found_only_by_its_name_and_files() {
        let repo = tempfile::tempdir().unwrap();
        let onnx = repo.path().join("onnx");
        let other = repo.path().join("models");
        std::fs::create_dir_all(&onnx).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(repo.path().join("tokenizer.json"), "{}").unwrap();
        assert_eq!(RepoLayout::of(&onnx), RepoLayout::OnnxFolder);
        assert_eq!(companion(&onnx, "tokenizer.json"), repo.path().join("tokenizer.json"));
        // Another folder name: never looked through.
        assert_eq!(RepoLayout::of(&other), RepoLayout::Flat);
        assert_eq!(companion(&other, "tokenizer.json"), other.join("tokenizer.json"));
        // Files beside the model win.
        std::fs::write(onnx.join("config.json"), "{}").unwrap();
        assert_eq!(RepoLayout::of(&onnx), RepoLayout::Flat);
        // A directory output keeps the layout and the file name.
        std::fs::remove_file(onnx.join("config.json")).unwrap();
        let out = output_in(Path::new("new"), &onnx.join("model_q4.onnx"));
        assert_eq!(out, Path::new("new/onnx/model_q4.onnx"));
        assert_eq!(output_in(Path::new("new"), &other.join("m.onnx")), Path::new("new/m.onnx"));
    }
}
