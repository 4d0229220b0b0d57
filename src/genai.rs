//! ONNX Runtime GenAI models: a `genai_config.json` beside the model names its KV-cache tensors by
//! layer number (`past_key_values.%d.key`) and says how many layers there are. After a rewrite has
//! dropped layers' caches, the remaining ones keep their names: onnxruntime-genai (0.18) takes the
//! KV layers the model declares, gaps included, and per-layer settings (`sliding_window.layers`)
//! keep meaning the layers they meant. Renumbering them would change the model's interface for
//! nothing and shift those settings onto other layers. The config is written beside the new model
//! with its file name, with the tokenizer files; any other model written to a directory of its own
//! gets the tokenizer and config files too.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::atomic::dir_of;
use crate::onnx::Model;

/// Files a runtime loads from the model's directory besides the model itself.
const COMPANION_FILES: &[&str] = &[
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
];

/// What goes beside a rewritten model in a directory of its own: the tokenizer and config files
/// a runtime loads from the model's directory (Optimum's `ORTModelForCausalLM` needs `config.json`,
/// `check` and `eval` the tokenizer), and a GenAI model's updated config.
pub struct Companion {
    dir: PathBuf,
    genai_config: Option<serde_json::Value>,
    files: Vec<PathBuf>,
}

impl Companion {
    /// Stages the config and copies of the files in the output model's directory, in `set`.
    pub fn stage(&self, set: &mut crate::atomic::OutputSet) -> Result<()> {
        if let Some(config) = &self.genai_config {
            set.stage_bytes(
                &self.dir.join("genai_config.json"),
                serde_json::to_string_pretty(config)?.as_bytes(),
            )?;
        }
        for file in &self.files {
            let name = file.file_name().context("a companion file has a name")?;
            set.stage_copy(file, &self.dir.join(name))?;
        }
        Ok(())
    }
}

/// For `model` to be written at `output`: what to write beside it. The input's directory is never
/// written to: a GenAI output there gets a note instead.
pub fn prepare(model: &Model, output: &Path) -> Result<Option<Companion>> {
    let in_dir = model.dir().to_path_buf();
    let config_path = in_dir.join("genai_config.json");
    let genai = config_path.is_file();
    let out_dir = dir_of(output).to_path_buf();
    if std::fs::canonicalize(&out_dir)? == std::fs::canonicalize(&in_dir)? {
        if genai {
            eprintln!(
                "note: {} is an ONNX Runtime GenAI model; its genai_config.json is left as it is. Write the \
                 rewritten model into its own directory (-o DIR/model.onnx) to get an updated config and the \
                 tokenizer files beside it",
                model.path.display()
            );
        }
        return Ok(None);
    }
    let genai_config = if genai {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let filename = output.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx");
        Some(config_for(model, &config, filename)?)
    } else {
        None
    };
    let files: Vec<PathBuf> =
        COMPANION_FILES.iter().map(|f| in_dir.join(f)).filter(|p| p.is_file()).collect();
    Ok((genai_config.is_some() || !files.is_empty()).then_some(Companion {
        dir: out_dir,
        genai_config,
        files,
    }))
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
