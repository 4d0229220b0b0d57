//! Calibration and evaluation text → token ids → packed sequences of `seq_len` tokens.
//!
//! Files: `.json` (an array of strings, or of objects with `text` or `input_ids`), `.jsonl` (one
//! such value per line), `.txt` (one document). Without files, the built-in C4 sample is read
//! (`data/c4_demo.json.gz`, ODC-BY 1.0): documents 0–199 to calibrate, 200–299 to evaluate.
//!
//! Packing, in data order: a record of exactly `seq_len` `input_ids` is a block as it is (data that
//! was tokenized and packed on purpose is used as given). Everything else joins one stream that is
//! cut into sequences of `seq_len`, the remainder dropped: text documents are tokenized without
//! special tokens and followed by EOS; `input_ids` records of other lengths are appended as they
//! are, with no EOS added.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::invalid::{Setting, require};

/// One document: text to tokenize, or ids given as they are.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    Text(String),
    Ids(Vec<i64>),
}

/// The built-in C4 sample, gzipped JSON (see `data/README.md`).
const BUILT_IN: &[u8] = include_bytes!("../data/c4_demo.json.gz");

/// Which part of the built-in C4 sample to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Documents 0–199.
    Calibration,
    /// Documents 200–299, held out from calibration.
    Evaluation,
}

impl Split {
    /// What the data is, for messages and reports.
    pub fn describe(self) -> &'static str {
        match self {
            Split::Calibration => "built-in C4 sample, documents 0-199 (ODC-BY 1.0)",
            Split::Evaluation => "built-in C4 sample, documents 200-299 (ODC-BY 1.0)",
        }
    }
}

/// The documents of the built-in C4 sample in `split`.
pub fn built_in(split: Split) -> Result<Vec<Document>> {
    use std::io::Read;
    let mut json = String::new();
    flate2::read::GzDecoder::new(BUILT_IN)
        .read_to_string(&mut json)
        .context("the built-in C4 sample is corrupt")?;
    let docs = parse_json(&json, "the built-in C4 sample")?;
    ensure!(docs.len() == 300, "the built-in C4 sample holds {} documents, not 300", docs.len());
    let range = match split {
        Split::Calibration => 0..200,
        Split::Evaluation => 200..300,
    };
    Ok(docs[range].to_vec())
}

fn parse_json(text: &str, what: &str) -> Result<Vec<Document>> {
    let value: Value = serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))?;
    let Value::Array(items) = value else {
        bail!("{what}: expected a JSON array of strings or of objects with \"text\" or \"input_ids\"");
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| document(v).with_context(|| format!("{what}: record {i}")))
        .collect()
}

/// Every document of each file, with the file's name, for [`pack`].
pub fn read_sources(files: &[PathBuf]) -> Result<Vec<(String, Vec<Document>)>> {
    files
        .iter()
        .map(|f| {
            let docs = read_documents(f)?;
            ensure!(!docs.is_empty(), "{} holds no documents", f.display());
            Ok((f.display().to_string(), docs))
        })
        .collect()
}

/// Reads every document of a data file.
pub fn read_documents(path: &Path) -> Result<Vec<Document>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    parse_documents(&text, path)
}

/// The documents of a data file's text; `path`'s extension says its format.
pub fn parse_documents(text: &str, path: &Path) -> Result<Vec<Document>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let docs = match ext {
        "txt" => vec![Document::Text(text.to_string())],
        "json" => parse_json(text, &path.display().to_string())?,
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
                document(&v).with_context(|| format!("{}: line {}", path.display(), i + 1))
            })
            .collect::<Result<_>>()?,
        _ => bail!("{}: unsupported data file (expected .json, .jsonl or .txt)", path.display()),
    };
    Ok(docs)
}

fn document(v: &Value) -> Result<Document> {
    match v {
        Value::String(s) => Ok(Document::Text(s.clone())),
        Value::Object(o) => {
            if let Some(ids) = o.get("input_ids") {
                let ids = ids.as_array().context("\"input_ids\" must be an array of integers")?;
                let ids = ids
                    .iter()
                    .map(|i| {
                        i.as_i64()
                            .filter(|&i| i >= 0)
                            .context("\"input_ids\" must hold non-negative integers")
                    })
                    .collect::<Result<_>>()?;
                Ok(Document::Ids(ids))
            } else if let Some(text) = o.get("text") {
                Ok(Document::Text(text.as_str().context("\"text\" must be a string")?.to_string()))
            } else {
                bail!("an object needs \"text\" or \"input_ids\"")
            }
        }
        _ => bail!("expected a string or an object with \"text\" or \"input_ids\""),
    }
}

/// The tokenizer and end-of-text id used to turn documents into ids.
pub struct TextEncoder {
    pub tokenizer: Option<Tokenizer>,
    /// Where the tokenizer was (or would have been) read from.
    pub tokenizer_path: PathBuf,
    pub eos_id: i64,
}

impl TextEncoder {
    /// Loads `tokenizer` (default: `tokenizer.json` beside the model) and finds EOS: `eos_id`, else
    /// `generation_config.json`'s `eos_token_id`, else `tokenizer_config.json`'s `eos_token`.
    /// A missing default tokenizer is an error only once a text document needs it (pre-tokenized
    /// data needs none); a missing `--tokenizer` is an error at once.
    pub fn new(model_dir: &Path, tokenizer: Option<&Path>, eos_id: Option<i64>) -> Result<TextEncoder> {
        let path = tokenizer
            .map(Path::to_path_buf)
            .unwrap_or_else(|| crate::hub::companion(model_dir, "tokenizer.json"));
        let tokenizer = if tokenizer.is_some() || path.is_file() {
            ensure!(path.is_file(), "tokenizer {} does not exist", path.display());
            Some(
                Tokenizer::from_file(&path)
                    .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?,
            )
        } else {
            None
        };
        let eos_id = match eos_id {
            Some(id) => id,
            None => find_eos(model_dir, tokenizer.as_ref())?,
        };
        require(eos_id >= 0, Setting::EosId, || {
            format!("{eos_id} is negative: an end-of-text id must name a vocabulary entry")
        })?;
        if let Some(t) = &tokenizer {
            let vocab = t.get_vocab_size(true);
            ensure!(
                (eos_id as usize) < vocab,
                "the end-of-text id {eos_id} is not in the vocabulary of {} ({vocab} tokens)",
                path.display()
            );
        }
        Ok(TextEncoder { tokenizer_path: path, tokenizer, eos_id })
    }

    pub fn vocab_size(&self) -> Option<usize> {
        self.tokenizer.as_ref().map(|t| t.get_vocab_size(true))
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let tokenizer = self.tokenizer.as_ref().with_context(|| {
            format!(
                "no tokenizer for text documents: {} does not exist; name a tokenizer.json",
                self.tokenizer_path.display()
            )
        })?;
        let encoding =
            tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&i| i64::from(i)).collect())
    }
}

/// EOS from the files a Hugging Face export puts beside the model.
fn find_eos(model_dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<i64> {
    let read = |name: &str| -> Option<Value> {
        let text = std::fs::read_to_string(crate::hub::companion(model_dir, name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    if let Some(config) = read("generation_config.json") {
        match &config["eos_token_id"] {
            Value::Number(n) if let Some(id) = n.as_i64() => return Ok(id),
            Value::Array(ids) if !ids.is_empty() => {
                if let Some(id) = ids[0].as_i64() {
                    return Ok(id);
                }
            }
            _ => {}
        }
    }
    if let (Some(config), Some(tokenizer)) = (read("tokenizer_config.json"), tokenizer) {
        let token = match &config["eos_token"] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        if let Some(id) = token.and_then(|t| tokenizer.token_to_id(&t)) {
            return Ok(i64::from(id));
        }
    }
    bail!(
        "cannot tell the end-of-text token: no eos_token_id in {dir}/generation_config.json nor eos_token in \
         {dir}/tokenizer_config.json; give the end-of-text id",
        dir = crate::hub::RepoLayout::of(model_dir).companion_dir(model_dir).display()
    )
}

/// Tokens per sequence when none is asked for and the model's context is longer.
pub const DEFAULT_SEQ_LEN: usize = 2048;

/// The data a command was asked to read, before it is fitted to a model: the sequence length and
/// the tokenizer default to the model's.
#[derive(Clone, Debug, Default)]
pub struct DataRequest {
    /// Data files; none: the built-in C4 sample.
    pub files: Vec<PathBuf>,
    /// `tokenizer.json` (default: beside the model).
    pub tokenizer: Option<PathBuf>,
    /// End-of-text id appended to each document (default: from the model's configs).
    pub eos_id: Option<i64>,
    /// Tokens per sequence (default: [`DEFAULT_SEQ_LEN`], or the model's context where shorter).
    pub seq_len: Option<usize>,
    /// Sequences to keep (default: the command's).
    pub samples: Option<usize>,
}

impl DataRequest {
    /// The data to read for the model in `model_dir`; without files, the built-in sample's
    /// `built_in` split. Sequences longer than the model's context are refused.
    pub fn resolve(
        &self,
        model_dir: &Path,
        default_samples: Option<usize>,
        built_in: Split,
    ) -> Result<DataSpec> {
        let context = context_length(model_dir).map(|(n, _)| n);
        let seq_len =
            self.seq_len.unwrap_or_else(|| context.map_or(DEFAULT_SEQ_LEN, |c| c.min(DEFAULT_SEQ_LEN)));
        check_context(model_dir, seq_len, &format!("a sequence length of {seq_len}"))?;
        if self.files.is_empty() {
            eprintln!("data: {} (give data files for your own)", built_in.describe());
        }
        Ok(DataSpec {
            files: self.files.clone(),
            built_in,
            tokenizer: self.tokenizer.clone(),
            eos_id: self.eos_id,
            seq_len,
            samples: self.samples.or(default_samples),
        })
    }
}

/// Which text, tokenized how, cut into which sequences: what `calibrate`, `rewrite` and `eval` read.
#[derive(Clone, Debug)]
pub struct DataSpec {
    /// Data files; none: the built-in C4 sample's `built_in` split.
    pub files: Vec<PathBuf>,
    pub built_in: Split,
    /// `tokenizer.json` (default: beside the model).
    pub tokenizer: Option<PathBuf>,
    /// End-of-text id appended to each document (default: from the model's configs).
    pub eos_id: Option<i64>,
    pub seq_len: usize,
    /// Sequences to keep (default: all the data gives).
    pub samples: Option<usize>,
}

impl DataSpec {
    /// Tokenizes and packs the data for `model_dir`'s model, whose embedding table has `vocab`
    /// rows when known; a tokenizer with more tokens than that belongs to another model.
    pub fn pack(&self, model_dir: &Path, vocab: Option<usize>) -> Result<Packed> {
        let encoder = TextEncoder::new(model_dir, self.tokenizer.as_deref(), self.eos_id)?;
        if let (Some(tokens), Some(rows)) = (encoder.vocab_size(), vocab) {
            ensure!(
                tokens <= rows,
                "tokenizer {} has {tokens} tokens, more than the model's embedding table ({rows} rows): \
                 it belongs to another model",
                encoder.tokenizer_path.display()
            );
        }
        let sources = if self.files.is_empty() {
            vec![(self.built_in.describe().to_string(), built_in(self.built_in)?)]
        } else {
            read_sources(&self.files)?
        };
        pack(&sources, &encoder, self.seq_len, self.samples, vocab)
    }

    /// What the data is, for messages and reports: the files, or the built-in sample.
    pub fn describe(&self) -> Vec<String> {
        if self.files.is_empty() {
            vec![self.built_in.describe().to_string()]
        } else {
            self.files.iter().map(|p| p.display().to_string()).collect()
        }
    }
}

/// The longest sequence the model beside `model_dir` is made for, where its configs say:
/// `genai_config.json`'s `context_length`, else `config.json`'s `max_position_embeddings` (or
/// GPT-2's `n_positions`). Longer sequences run off the end of fixed rotary caches and position
/// tables, or out of what the model was trained on.
pub fn context_length(model_dir: &Path) -> Option<(usize, String)> {
    let read =
        |path: PathBuf| -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok() };
    if let Some(n) =
        read(model_dir.join("genai_config.json")).and_then(|c| c["model"]["context_length"].as_u64())
    {
        return Some((n as usize, "genai_config.json context_length".into()));
    }
    let config = read(crate::hub::companion(model_dir, "config.json"))?;
    ["max_position_embeddings", "n_positions"]
        .iter()
        .find_map(|key| config[*key].as_u64().map(|n| (n as usize, format!("config.json {key}"))))
}

/// Fails when `tokens` (what `what` asks for) exceed the context of the model in `model_dir`.
pub fn check_context(model_dir: &Path, tokens: usize, what: &str) -> Result<()> {
    if let Some((context, source)) = context_length(model_dir) {
        ensure!(
            tokens <= context,
            "{what} makes sequences of {tokens} tokens, longer than the model's context of {context} ({source})"
        );
    }
    Ok(())
}

/// What the packed data holds, for reports.
#[derive(Clone, Debug)]
pub struct Packed {
    /// Sequences of exactly `seq_len` ids.
    pub sequences: Vec<Vec<i64>>,
    pub documents: usize,
    /// Tokens available before cutting to whole sequences and `samples`.
    pub tokens: usize,
}

/// Packs the documents of `sources` (a name for messages, and its documents) into sequences of
/// `seq_len` by the rule in the module documentation; keeps the first `samples` sequences. Ids must be
/// below `vocab` (the model's embedding rows) when it is known.
pub fn pack(
    sources: &[(String, Vec<Document>)],
    encoder: &TextEncoder,
    seq_len: usize,
    samples: Option<usize>,
    vocab: Option<usize>,
) -> Result<Packed> {
    ensure!(seq_len > 0, "a sequence must hold at least 1 token");
    ensure!(!sources.is_empty(), "no data files given");
    if let Some(vocab) = vocab {
        ensure!(
            (encoder.eos_id as usize) < vocab,
            "the end-of-text id {} is outside the model's vocabulary of {vocab}",
            encoder.eos_id
        );
    }
    let mut sequences: Vec<Vec<i64>> = Vec::new();
    let mut stream: Vec<i64> = Vec::new();
    let (mut documents, mut tokens) = (0, 0);
    let full = |sequences: &Vec<Vec<i64>>| samples.is_some_and(|s| sequences.len() >= s);
    'sources: for (name, docs) in sources {
        for doc in docs {
            let (ids, verbatim) = match doc {
                Document::Text(text) => {
                    let mut ids = encoder.encode(text).with_context(|| name.clone())?;
                    ids.push(encoder.eos_id);
                    (ids, false)
                }
                Document::Ids(ids) => (ids.clone(), ids.len() == seq_len),
            };
            if let Some(vocab) = vocab
                && let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab)
            {
                bail!("{name}: token id {bad} is outside the model's vocabulary of {vocab}");
            }
            documents += 1;
            tokens += ids.len();
            if verbatim {
                sequences.push(ids);
            } else {
                stream.extend(ids);
                while stream.len() >= seq_len && !full(&sequences) {
                    sequences.push(stream.drain(..seq_len).collect());
                }
            }
            if full(&sequences) {
                break 'sources;
            }
        }
    }
    require(!sequences.is_empty(), Setting::SequenceLength, || {
        format!(
            "the data gives {tokens} tokens ({documents} documents), fewer than one sequence of {seq_len}"
        )
    })?;
    if let Some(samples) = samples {
        sequences.truncate(samples);
    }
    Ok(Packed { sequences, documents, tokens })
}

/// A fixed prompt of `len` ids below `vocab` (a deterministic mix, not a repeated token), for runs
/// that need tokens but no text.
pub fn sample_prompt(len: usize, vocab: usize) -> ndarray::Array2<i64> {
    let vocab = vocab.max(2) as u64;
    ndarray::Array2::from_shape_fn((1, len), |(_, t)| ((t as u64 * 7919 + 13) % vocab) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn ids_only() -> TextEncoder {
        TextEncoder { tokenizer: None, tokenizer_path: PathBuf::from("tokenizer.json"), eos_id: 0 }
    }

    #[test]
    fn json_jsonl_and_txt_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let json = write(dir.path(), "a.json", r#"["one", {"text": "two"}, {"input_ids": [5, 6]}]"#);
        let jsonl = write(dir.path(), "b.jsonl", "{\"text\": \"x\"}\n\n\"y\"\n");
        let txt = write(dir.path(), "c.txt", "whole file");
        assert_eq!(
            read_documents(&json).unwrap(),
            vec![Document::Text("one".into()), Document::Text("two".into()), Document::Ids(vec![5, 6])]
        );
        assert_eq!(
            read_documents(&jsonl).unwrap(),
            vec![Document::Text("x".into()), Document::Text("y".into())]
        );
        assert_eq!(read_documents(&txt).unwrap(), vec![Document::Text("whole file".into())]);
    }

    fn packed(dir: &Path, json: &str, seq_len: usize, samples: Option<usize>) -> Packed {
        let f = write(dir, "ids.json", json);
        pack(&read_sources(&[f]).unwrap(), &ids_only(), seq_len, samples, Some(10)).unwrap()
    }

    #[test]
    fn id_records_of_one_block_are_taken_as_they_are_and_others_joined_without_eos() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"[{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8]}, {"input_ids": [9]}]"#;
        let packed = packed(dir.path(), json, 3, None);
        assert_eq!(packed.sequences, vec![vec![1, 2, 3], vec![6, 7, 8], vec![4, 5, 9]]);
        assert_eq!((packed.documents, packed.tokens), (4, 9));
    }

    #[test]
    fn text_documents_are_followed_by_eos() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-optimum-past");
        let encoder = TextEncoder::new(&dir, None, Some(0)).unwrap();
        let text = "The river runs past the old mill.";
        let ids = encoder.encode(text).unwrap();
        let docs = vec![Document::Text(text.into()), Document::Text(text.into())];
        let packed = pack(&[("text".into(), docs)], &encoder, ids.len() + 1, None, None).unwrap();
        let mut block = ids.clone();
        block.push(0);
        assert_eq!(packed.sequences, vec![block.clone(), block]);
    }

    #[test]
    fn samples_limit_the_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let packed = packed(dir.path(), r#"[{"input_ids": [1, 2, 3, 4, 5, 6, 7]}]"#, 2, Some(2));
        assert_eq!(packed.sequences, vec![vec![1, 2], vec![3, 4]]);
    }

    #[test]
    fn the_built_in_sample_splits_into_calibration_and_held_out_documents() {
        let (calibration, evaluation) =
            (built_in(Split::Calibration).unwrap(), built_in(Split::Evaluation).unwrap());
        assert_eq!((calibration.len(), evaluation.len()), (200, 100));
        assert!(calibration.iter().all(|d| !evaluation.contains(d)), "no held-out document is calibrated on");
        let Document::Text(first) = &calibration[0] else { panic!("text documents") };
        assert!(first.len() > 100, "{first}");
    }

    #[test]
    fn eos_comes_from_generation_config_then_tokenizer_config() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-optimum-past/tokenizer.json");
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = Some(fixture.as_path());
        let err = TextEncoder::new(dir.path(), tokenizer, None).err().unwrap().to_string();
        assert!(err.contains("give the end-of-text id"), "{err}");
        write(dir.path(), "tokenizer_config.json", r#"{"eos_token": {"content": "<|pad|>"}}"#);
        assert_eq!(TextEncoder::new(dir.path(), tokenizer, None).unwrap().eos_id, 1);
        write(dir.path(), "generation_config.json", r#"{"eos_token_id": [0, 1]}"#);
        assert_eq!(TextEncoder::new(dir.path(), tokenizer, None).unwrap().eos_id, 0);
        assert_eq!(TextEncoder::new(dir.path(), tokenizer, Some(7)).unwrap().eos_id, 7);
    }

    #[test]
    fn bad_data_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let short = write(dir.path(), "short.json", r#"[{"input_ids": [1]}]"#);
        let err = pack(&read_sources(&[short]).unwrap(), &ids_only(), 8, None, None).unwrap_err().to_string();
        assert!(err.contains("fewer than one sequence of 8"), "{err}");
        let empty = write(dir.path(), "empty.json", "[]");
        let err = read_sources(&[empty]).unwrap_err().to_string();
        assert!(err.contains("empty.json holds no documents"), "{err}");
        let big = write(dir.path(), "big.json", r#"[{"input_ids": [1, 700]}]"#);
        let err =
            pack(&read_sources(&[big]).unwrap(), &ids_only(), 1, None, Some(512)).unwrap_err().to_string();
        assert!(err.contains("token id 700 is outside the model's vocabulary of 512"), "{err}");
        let csv = write(dir.path(), "data.csv", "a,b");
        let err = read_documents(&csv).unwrap_err().to_string();
        assert!(err.contains("unsupported data file"), "{err}");
        let err = read_documents(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(err.contains("cannot read data file"), "{err}");
    }
}
