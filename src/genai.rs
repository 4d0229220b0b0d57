//! ONNX Runtime GenAI models: a `genai_config.json` beside the model names its KV-cache tensors by
//! layer number (`past_key_values.%d.key`) and says how many layers there are. After a rewrite has
//! dropped layers' caches, the remaining ones keep their names: onnxruntime-genai (0.18) takes the
//! KV layers the model declares, gaps included, and per-layer settings (`sliding_window.layers`)
//! keep meaning the layers they meant. Renumbering them would change the model's interface for
//! nothing and shift those settings onto other layers. The config is written beside the new model
//! with its file name, with the tokenizer files; any other model written to a directory of its own
//! gets the tokenizer and config files too, where `hub` says they go.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::atomic::{OutputSet, dir_of};
use crate::hub::{COMPANION_FILES, ONNX_FOLDER, RepoLayout, repository_root};
use crate::onnx::Model;

/// What goes beside a rewritten model in a directory of its own: the tokenizer and config files
/// a runtime loads (Optimum's `ORTModelForCausalLM` needs `config.json`, `check` and `eval` the
/// tokenizer), a GenAI model's updated config, and the model card.
pub struct Companion {
    /// Where the companion files go (the output's repository root in the onnx/ layout).
    pub dir: PathBuf,
    /// Where the input's companion files are.
    pub source_dir: PathBuf,
    genai_config: Option<(PathBuf, serde_json::Value)>,
    files: Vec<PathBuf>,
}

impl Companion {
    /// For `model` to be written at `output`: what to write beside it, or None when the output goes
    /// into the input's own directory (which is never written to: a GenAI output there gets a note).
    pub fn prepare(model: &Model, output: &Path) -> Result<Option<Companion>> {
        let in_dir = model.dir().to_path_buf();
        let out_dir = dir_of(output).to_path_buf();
        let genai_path = in_dir.join("genai_config.json");
        let genai = genai_path.is_file();
        if same_dir(&out_dir, &in_dir)? {
            if genai {
                eprintln!(
                    "note: {} is an ONNX Runtime GenAI model; its genai_config.json is left as it is. Write \
                     the rewritten model into its own directory (-o DIR/model.onnx) to get an updated config \
                     and the tokenizer files beside it",
                    model.path.display()
                );
            }
            return Ok(None);
        }
        let layout = RepoLayout::of(&in_dir);
        let source_dir = layout.companion_dir(&in_dir);
        // The output keeps the input's layout where its folder is named for it; flat otherwise.
        let out_named_onnx = out_dir.file_name().is_some_and(|n| n == ONNX_FOLDER);
        let dir = match (layout, out_dir.parent()) {
            (RepoLayout::OnnxFolder, Some(parent)) if out_named_onnx => repository_root(&out_dir, parent),
            _ => out_dir.clone(),
        };
        let genai_config = if genai {
            let text = std::fs::read_to_string(&genai_path)
                .with_context(|| format!("reading {}", genai_path.display()))?;
            let config: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", genai_path.display()))?;
            let filename = output.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx");
            Some((out_dir.join("genai_config.json"), config_for(model, &config, filename)?))
        } else {
            None
        };
        // Into the input's own companion folder (a variant beside it in the same repository),
        // the files are already there.
        let files = if same_dir(&dir, &source_dir)? {
            Vec::new()
        } else {
            COMPANION_FILES.iter().map(|f| source_dir.join(f)).filter(|p| p.is_file()).collect()
        };
        Ok(Some(Companion { dir, source_dir, genai_config, files }))
    }

    /// Whether the companion files go to a folder of the output's own (where the model card goes).
    pub fn writes_files(&self) -> bool {
        !self.files.is_empty() || !same_dir(&self.dir, &self.source_dir).unwrap_or(true)
    }

    /// Stages the config and copies of the files in `set`.
    pub fn stage(&self, set: &mut OutputSet) -> Result<()> {
        if let Some((path, config)) = &self.genai_config {
            set.stage_bytes(path, serde_json::to_string_pretty(config)?.as_bytes())?;
        }
        for file in &self.files {
            let name = file.file_name().context("a companion file has a name")?;
            set.stage_copy(file, &self.dir.join(name))?;
        }
        Ok(())
    }
}

/// Whether two directories are the same, the second existing (the first may not exist yet).
fn same_dir(a: &Path, b: &Path) -> Result<bool> {
    let b = std::fs::canonicalize(b).with_context(|| format!("cannot resolve {}", b.display()))?;
    Ok(std::fs::canonicalize(a).is_ok_and(|a| a == b))
}

/// The KV-cache naming patterns of a `genai_config.json` (`%d` = layer).
struct KvPatterns([String; 4]);

impl KvPatterns {
    fn from_config(config: &serde_json::Value) -> Option<KvPatterns> {
        let decoder = &config["model"]["decoder"];
        let get = |section: &str, key: &str| decoder[section][key].as_str().map(str::to_string);
        Some(KvPatterns([
            get("inputs", "past_key_names")?,
            get("inputs", "past_value_names")?,
            get("outputs", "present_key_names")?,
            get("outputs", "present_value_names")?,
        ]))
    }

    /// The layer number in `name` if it matches one of the patterns.
    fn layer_of(&self, name: &str) -> Option<usize> {
        self.0.iter().find_map(|p| {
            let (head, tail) = p.split_once("%d")?;
            name.strip_prefix(head)?.strip_suffix(tail)?.parse().ok()
        })
    }
}

/// The config for `model` saved as `filename`: the KV tensors the graph still declares must be named
/// as the config's patterns say, for layers the config counts.
pub fn config_for(model: &Model, config: &serde_json::Value, filename: &str) -> Result<serde_json::Value> {
    let patterns = KvPatterns::from_config(config)
        .context("genai_config.json has no model.decoder inputs/outputs KV name patterns")?;
    let layers = config["model"]["decoder"]["num_hidden_layers"]
        .as_u64()
        .context("genai_config.json has no model.decoder.num_hidden_layers")?;
    let graph = model.graph();
    for v in graph.input.iter().chain(&graph.output) {
        if let Some(layer) = patterns.layer_of(v.name()) {
            anyhow::ensure!(
                (layer as u64) < layers,
                "{} is KV layer {layer}, but genai_config.json counts {layers} layers",
                v.name()
            );
        }
    }
    let mut config = config.clone();
    config["model"]["decoder"]["filename"] = serde_json::json!(filename);
    Ok(config)
}
