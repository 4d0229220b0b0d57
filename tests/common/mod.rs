//! Shared helpers for the integration tests: fixtures, their PyTorch references, engines.
#![allow(dead_code)] // each test binary uses its own subset

pub mod synthetic;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nbl_onnx::engine::{self, Engine, EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::onnx::{DType, Tensor};
use safetensors::SafeTensors;
use serde_json::Value;

/// What a run of the binary wrote on stderr.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a bad-input failure: exit 2, no panic, nothing on stdout, and one message starting
/// `error:` containing `needle` after whatever the command announced (`engine: ...`, `note: ...`).
pub fn assert_bad_input(out: &std::process::Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let message: Vec<&str> =
        err.lines().skip_while(|l| l.starts_with("engine: ") || l.starts_with("note: ")).collect();
    assert!(message.first().is_some_and(|l| l.starts_with("error: ")), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
}

/// Plain English text for the CLI runs, enough for a few blocks of the fixtures' tokenizer.
pub fn write_corpus(dir: &Path) -> PathBuf {
    let sentences = [
        "The committee met on Tuesday to discuss the budget for the coming year.",
        "Rain is expected across the region for most of the weekend, with sunshine returning on Monday.",
        "She opened the old book and found a letter that had been hidden between its pages.",
        "Local farmers say the harvest was better than last year despite the dry summer.",
        "The new library will open to the public next month after two years of construction.",
    ];
    let docs: Vec<serde_json::Value> = (0..24)
        .map(
            |i| serde_json::json!({ "text": format!("{} {}", sentences[i % 5], sentences[(i * 3 + 1) % 5]) }),
        )
        .collect();
    let path = dir.join("corpus.json");
    std::fs::write(&path, serde_json::to_string(&docs).unwrap()).unwrap();
    path
}

/// `calibrate MODEL --data DATA` on ONNX Runtime into `out`, `samples` blocks of `seq_len`.
pub fn calibrate_args<'a>(
    model: &'a str,
    data: &'a str,
    seq_len: &'a str,
    samples: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    vec![
        "calibrate",
        model,
        "--data",
        data,
        "--seq-len",
        seq_len,
        "--samples",
        samples,
        "--engine",
        "ort",
        "-o",
        out,
    ]
}

/// Copies every file of fixture `name` into `dir`.
pub fn copy_fixture(name: &str, dir: &Path) {
    for entry in std::fs::read_dir(fixtures_dir().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
}

/// A fixture copied into a temporary directory with the test corpus and statistics calibrated on
/// `samples` blocks of `seq_len` tokens of it.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub stats: PathBuf,
    pub corpus: PathBuf,
}

pub fn calibrated_copy(fixture: &str, seq_len: &str, samples: &str) -> Workspace {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(fixture, dir.path());
    let corpus = write_corpus(dir.path());
    let model = dir.path().join("model.onnx");
    let stats = dir.path().join("stats.safetensors");
    let args = calibrate_args(
        model.to_str().unwrap(),
        corpus.to_str().unwrap(),
        seq_len,
        samples,
        stats.to_str().unwrap(),
    );
    let out = nbl(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    Workspace { dir, model, stats, corpus }
}

/// Runs the `nbl-onnx` binary.
pub fn nbl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nbl-onnx")).args(args).output().expect("the binary runs")
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every fixture directory, by name.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures/ exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 9, "expected the committed fixtures, found {names:?}");
    names
}

pub fn model_path(name: &str) -> PathBuf {
    fixtures_dir().join(name).join("model.onnx")
}

pub fn fixture_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join(name).join("fixture.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The tensors PyTorch saved for a fixture: `inputs.*`, `layers.N.x`, `layers.N.y`, `logits`.
pub fn reference(name: &str) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(fixtures_dir().join(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(key, view)| {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F64 => DType::F64,
                safetensors::Dtype::I64 => DType::I64,
                safetensors::Dtype::I32 => DType::I32,
                safetensors::Dtype::BOOL => DType::Bool,
                other => panic!("unexpected dtype {other:?} in {name}"),
            };
            (key, Tensor::from_le_bytes(dtype, view.shape(), view.data()).unwrap())
        })
        .collect()
}

/// The graph inputs the reference was computed with.
pub fn reference_inputs(reference: &BTreeMap<String, Tensor>) -> Vec<(String, Tensor)> {
    reference
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("inputs.").map(|n| (n.to_string(), t.clone())))
        .collect()
}

pub fn ort() -> Box<dyn Engine> {
    let options = EngineOptions { engine: EngineChoice::Ort, ep: ExecutionProvider::Cpu, threads: Some(1) };
    engine::open(&options).expect(
        "ONNX Runtime must be installed for the tests: run scripts/setup-ort.sh (or set ORT_DYLIB_PATH)",
    )
}

pub fn tract() -> Box<dyn Engine> {
    let options = EngineOptions { engine: EngineChoice::Tract, ep: ExecutionProvider::Cpu, threads: None };
    engine::open(&options).unwrap()
}

/// How closely a fixture's graph follows PyTorch, per activation: max |onnx - torch| <= tolerance ·
/// max(1, max |torch|). f32 graphs (and the int4 one, whose reference uses the dequantised weights)
/// agree to f32 rounding, or to the looser logits tolerance their fixture.json states (a builder
/// that computes an op differently); f16 graphs to f16 rounding accumulated over three layers.
pub fn tolerance(name: &str) -> f32 {
    let meta = fixture_json(name);
    if meta["dtype"] == "float16" {
        5e-3
    } else {
        meta["logits_tolerance"].as_f64().unwrap_or(1e-4).max(1e-4) as f32
    }
}

/// Whether a fixture quantises its activations (ONNX Runtime's dynamic and static quantisers): its
/// tensors then differ from PyTorch's float32 ones by that rounding, and are compared by direction.
pub fn quantised_activations(name: &str) -> bool {
    fixture_json(name)["dtype"].as_str().is_some_and(|d| d.contains("activations quantised"))
}

/// The least cosine similarity accepted between a dynamically quantised fixture's tensors and
/// PyTorch's (measured: the logits of `llama-optimum-dynamic-int8` differ by up to 0.8).
pub const QUANTISED_MIN_COSINE: f64 = 0.99;

/// Largest |a - b| and the largest |b| (for a relative reading). The shapes must be equal, or hold
/// the same rows grouped differently: a stream flattened to `[batch·sequence, d]` (OPT's MLP half)
/// against PyTorch's `[batch, sequence, d]`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a = a.to_f32().unwrap();
    let b = b.to_f32().unwrap();
    let same_rows = a.shape().last() == b.shape().last() && a.len() == b.len();
    assert!(a.shape() == b.shape() || same_rows, "shapes differ: {:?} and {:?}", a.shape(), b.shape());
    let diff = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    (diff, scale)
}

/// Cosine similarity of two tensors taken as flat vectors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_f64().unwrap();
    let b = b.to_f64().unwrap();
    let dot: f64 = a.iter().zip(b.iter()).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A small seeded generator of standard normal samples (SplitMix64 + Box–Muller), so numerical
/// tests are reproducible without a dependency.
pub struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    pub fn new(seed: u64) -> Gaussian {
        Gaussian { state: seed, spare: None }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// A `rows×cols` matrix of samples, row-major.
    pub fn matrix(&mut self, rows: usize, cols: usize) -> Vec<f64> {
        (0..rows * cols).map(|_| self.sample()).collect()
    }
}

/// Asserts that the command succeeded, showing its stderr otherwise.
pub fn ok(out: std::process::Output) -> std::process::Output {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    out
}

/// A copy of a fixture in a temporary directory, with statistics from 256 tokens of text.
pub fn workspace(fixture: &str) -> Workspace {
    calibrated_copy(fixture, "32", "8")
}

/// `rewrite` of the workspace's model from its statistics, with `extra` arguments; the output path.
pub fn rewrite(ws: &Workspace, extra: &[&str]) -> PathBuf {
    let mut args = vec!["rewrite", ws.model.to_str().unwrap(), "--stats", ws.stats.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(nbl(&args));
    ws.dir.path().join("model.nbl.onnx")
}

/// The data the workspace was calibrated on, as `rewrite`, `calibrate` and `eval` take it.
pub fn data_args(ws: &Workspace) -> [&str; 8] {
    ["--data", ws.corpus.to_str().unwrap(), "--seq-len", "32", "--samples", "8", "--engine", "ort"]
}

/// As [`rewrite`], into `out` in the workspace, with the calibration data given (for the steps
/// that run the model); the output and the report.
pub fn rewrite_to(ws: &Workspace, out: &str, extra: &[&str]) -> (PathBuf, Value) {
    let out = ws.dir.path().join(out);
    let mut args = vec!["rewrite", ws.model.to_str().unwrap(), "--stats", ws.stats.to_str().unwrap()];
    args.extend_from_slice(&data_args(ws));
    args.extend_from_slice(&["-o", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    ok(nbl(&args));
    let report = std::fs::read(out.with_extension("").with_extension("nbl.json")).unwrap();
    (out, serde_json::from_slice(&report).unwrap())
}

/// `check MODEL --json` with `extra` arguments: the exit code and the report.
pub fn check(model: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["check", model.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = nbl(&args);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), json)
}

pub fn engine_run<'r>(report: &'r serde_json::Value, engine: &str) -> &'r serde_json::Value {
    report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["engine"].as_str().unwrap().starts_with(engine))
        .unwrap()
}

pub fn decoded(report: &serde_json::Value, engine: &str) -> Vec<i64> {
    let run = engine_run(report, engine);
    run["decoded"].as_array().map(|d| d.iter().map(|v| v.as_i64().unwrap()).collect()).unwrap_or_default()
}

/// `ok`, or the first word of what went wrong (`unsupported:`, `failed:`).
pub fn status<'r>(report: &'r serde_json::Value, engine: &str) -> &'r str {
    engine_run(report, engine)["status"].as_str().unwrap()
}

/// Fixtures tract builds but cannot evaluate, with the start of its error: limits of tract, not of
/// the graphs (ONNX Runtime runs them and matches PyTorch). BLOOM's ALiBi slopes are a `CumSum` over
/// the attention mask, which tract cannot evaluate on a symbolic sequence length.
pub const TRACT_CANNOT_EVALUATE: &[(&str, &str)] = &[("bloom-optimum-past", "CumSum: TDim is not a number")];

/// Whether `error` is tract's known failure on fixture `name`.
pub fn tract_cannot_evaluate(name: &str, error: &str) -> bool {
    TRACT_CANNOT_EVALUATE.iter().any(|(fixture, message)| *fixture == name && error.contains(message))
}
