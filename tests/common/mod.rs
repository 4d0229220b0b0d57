//! Shared helpers for the integration tests: fixtures, their PyTorch references, engines.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nbl_onnx::engine::{self, Engine, EngineChoice, EngineOptions, ExecutionProvider};
use nbl_onnx::onnx::{DType, Tensor};
use safetensors::SafeTensors;
use serde_json::Value;

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

/// Largest |a - b| and the largest |b| (for a relative reading).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a = a.to_f32().unwrap();
    let b = b.to_f32().unwrap();
    assert_eq!(a.shape(), b.shape(), "shapes differ");
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
