//! Calibration and evaluation text → token ids → packed blocks of `seq_len` tokens.
//!
//! Files: `.json` (an array of strings, or of objects with `text` or `input_ids`), `.jsonl` (one
//! such value per line), `.txt` (one document). Documents are tokenized without special tokens,
//! each followed by EOS, concatenated and cut into blocks; records with `input_ids` are taken as
//! already tokenized.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokenizers::Tokenizer;

/// One document: text to tokenize, or ids given as they are.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    Text(String),
    Ids(Vec<i64>),
}

/// Reads every document of a data file.
pub fn read_documents(path: &Path) -> Result<Vec<Document>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let docs = match ext {
        "txt" => vec![Document::Text(text)],
        "json" => {
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            let Value::Array(items) = value else {
                bail!(
                    "{}: expected a JSON array of strings or of objects with \"text\" or \"input_ids\"",
                    path.display()
                );
            };
            items
                .iter()
                .enumerate()
                .map(|(i, v)| document(v).with_context(|| format!("{}: record {i}", path.display())))
                .collect::<Result<_>>()?
        }
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
        let path = tokenizer.map(Path::to_path_buf).unwrap_or_else(|| model_dir.join("tokenizer.json"));
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
        Ok(TextEncoder { tokenizer_path: path, tokenizer, eos_id })
    }

    pub fn vocab_size(&self) -> Option<usize> {
        self.tokenizer.as_ref().map(|t| t.get_vocab_size(true))
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let tokenizer = self.tokenizer.as_ref().with_context(|| {
            format!(
                "no tokenizer for text documents: {} does not exist; pass --tokenizer PATH/tokenizer.json",
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
        let text = std::fs::read_to_string(model_dir.join(name)).ok()?;
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
         {dir}/tokenizer_config.json; pass --eos-id",
        dir = model_dir.display()
    )
}

/// Which text, tokenized how, cut into which blocks: what `calibrate`, `rewrite` and `eval` read.
#[derive(Clone, Debug)]
pub struct DataSpec {
    pub files: Vec<PathBuf>,
    /// `tokenizer.json` (default: beside the model).
    pub tokenizer: Option<PathBuf>,
    /// End-of-text id appended to each document (default: from the model's configs).
    pub eos_id: Option<i64>,
    pub seq_len: usize,
    /// Blocks to keep (default: all the data gives).
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
        pack(&self.files, &encoder, self.seq_len, self.samples, vocab)
    }
}

/// What the packed data holds, for reports.
#[derive(Clone, Debug)]
pub struct Packed {
    /// Blocks of exactly `seq_len` ids.
    pub blocks: Vec<Vec<i64>>,
    pub documents: usize,
    /// Tokens available before cutting to whole blocks and `samples`.
    pub tokens: usize,
}

/// Tokenizes every document of `files`, appends EOS to each, concatenates and cuts into blocks of
/// `seq_len`; keeps the first `samples` blocks. Ids must be below `vocab` (the model's embedding
/// rows) when it is known.
pub fn pack(
    files: &[PathBuf],
    encoder: &TextEncoder,
    seq_len: usize,
    samples: Option<usize>,
    vocab: Option<usize>,
) -> Result<Packed> {
    ensure!(seq_len > 0, "--seq-len must be at least 1");
    ensure!(!files.is_empty(), "no data files given (--data FILE)");
    let mut stream: Vec<i64> = Vec::new();
    let mut documents = 0;
    let wanted = samples.map(|s| s * seq_len);
    'files: for file in files {
        let docs = read_documents(file)?;
        ensure!(!docs.is_empty(), "{} holds no documents", file.display());
        for doc in docs {
            let ids = match doc {
                Document::Text(text) => {
                    encoder.encode(&text).with_context(|| format!("{}", file.display()))?
                }
                Document::Ids(ids) => ids,
            };
            if let Some(vocab) = vocab
                && let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab)
            {
                bail!("{}: token id {bad} is outside the model's vocabulary of {vocab}", file.display());
            }
            stream.extend(ids);
            stream.push(encoder.eos_id);
            documents += 1;
            if wanted.is_some_and(|w| stream.len() >= w) {
                break 'files;
            }
        }
    }
    let tokens = stream.len();
    ensure!(
        tokens >= seq_len,
        "the data gives {tokens} tokens ({documents} documents), fewer than one block of --seq-len {seq_len}"
    );
    let mut blocks: Vec<Vec<i64>> = stream.chunks_exact(seq_len).map(<[i64]>::to_vec).collect();
    if let Some(samples) = samples {
        blocks.truncate(samples);
    }
    Ok(Packed { blocks, documents, tokens })
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

    #[test]
    fn documents_are_followed_by_eos_and_cut_into_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "ids.json",
            r#"[{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6]}]"#,
        );
        let packed = pack(&[f], &ids_only(), 3, None, Some(10)).unwrap();
        assert_eq!(packed.blocks, vec![vec![1, 2, 3], vec![0, 4, 5], vec![0, 6, 0]]);
        assert_eq!((packed.documents, packed.tokens), (3, 9));
    }

    #[test]
    fn samples_limit_the_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "ids.jsonl", "{\"input_ids\": [1, 2, 3, 4, 5, 6, 7]}\n");
        let packed = pack(&[f], &ids_only(), 2, Some(2), None).unwrap();
        assert_eq!(packed.blocks, vec![vec![1, 2], vec![3, 4]]);
    }

    #[test]
    fn eos_comes_from_generation_config_then_tokenizer_config() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-optimum-past/tokenizer.json");
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = Some(fixture.as_path());
        let err = TextEncoder::new(dir.path(), tokenizer, None).err().unwrap().to_string();
        assert!(err.contains("pass --eos-id"), "{err}");
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
        let err = pack(&[short], &ids_only(), 8, None, None).unwrap_err().to_string();
        assert!(err.contains("fewer than one block of --seq-len 8"), "{err}");
        let empty = write(dir.path(), "empty.json", "[]");
        let err = pack(&[empty], &ids_only(), 8, None, None).unwrap_err().to_string();
        assert!(err.contains("empty.json holds no documents"), "{err}");
        let big = write(dir.path(), "big.json", r#"[{"input_ids": [1, 700]}]"#);
        let err = pack(&[big], &ids_only(), 1, None, Some(512)).unwrap_err().to_string();
        assert!(err.contains("token id 700 is outside the model's vocabulary of 512"), "{err}");
        let csv = write(dir.path(), "data.csv", "a,b");
        let err = read_documents(&csv).unwrap_err().to_string();
        assert!(err.contains("unsupported data file"), "{err}");
        let err = read_documents(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(err.contains("cannot read data file"), "{err}");
    }
}
