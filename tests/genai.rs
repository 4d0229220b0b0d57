//! ONNX Runtime GenAI models after a rewrite run where their users run them: through
//! onnxruntime-genai (`scripts/genai_generate.py`), a model with layer 1 replaced by `h Wᵀ + b`
//! generates the tokens PyTorch generates with the same layer replaced by the same map
//! (`patched.generated` of the fixture), sliding-window layers and dropped KV layers included.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use nbl_onnx::detect::find_layout;
use nbl_onnx::fit::LinearMap;
use nbl_onnx::onnx::{Model, Tensor};
use nbl_onnx::rewrite::{KvCache, Replacement, RewriteOptions, UnitEdit, apply};
use nbl_onnx::unit::Unit;

/// The Python that has onnxruntime-genai: `NBL_GENAI_PYTHON`, else the virtualenv that
/// `scripts/setup-ort.sh --with-genai` (run by scripts/test.sh) installs it into.
fn genai_python() -> PathBuf {
    let path = std::env::var_os("NBL_GENAI_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(&std::env::var("HOME").unwrap()).join(".cache/nbl-onnx/onnxruntime/cpu/venv/bin/python")
    });
    assert!(path.is_file(), "{} not found: run scripts/setup-ort.sh --with-genai", path.display());
    path
}

/// Tokens onnxruntime-genai generates greedily from `dir`'s model after `prompt`.
fn generate(dir: &Path, prompt: &[i64], tokens: usize) -> Vec<i64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/genai_generate.py");
    let prompt: Vec<String> = prompt.iter().map(i64::to_string).collect();
    let out = Command::new(genai_python())
        .arg(script)
        .arg(dir)
        .args(["--prompt", &prompt.join(","), "--tokens", &tokens.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ids(t: &Tensor) -> Vec<i64> {
    t.to_f64().unwrap().iter().map(|&v| v as i64).collect()
}

/// onnxruntime-genai stops at EOS where PyTorch was told not to: compare up to there.
fn assert_same_tokens(fixture: &str, what: &str, got: &[i64], want: &[i64]) {
    eprintln!("{fixture} {what}: onnxruntime-genai {got:?}, PyTorch {want:?}");
    assert!(!got.is_empty() && got.len() <= want.len(), "{fixture} {what}: {got:?} vs {want:?}");
    assert_eq!(got, &want[..got.len()], "{fixture} {what}");
    if got.len() < want.len() {
        assert_eq!(got.last(), Some(&0), "{fixture} {what}: stopped before EOS");
    }
}

/// `model` saved at `out` with its GenAI config and tokenizer beside it, as a rewrite writes them.
fn save_with_companion(model: &Model, out: &Path) {
    let companion = nbl_onnx::genai::Companion::prepare(model, out).unwrap().unwrap();
    let mut set = nbl_onnx::atomic::OutputSet::new();
    model.stage(out, &mut set).unwrap();
    companion.stage(&mut set).unwrap();
    set.commit().unwrap();
}

#[test]
fn rewritten_genai_models_generate_what_the_patched_pytorch_model_generates() {
    let mut checked = 0;
    for fixture in fixture_names() {
        let meta = fixture_json(&fixture);
        // f32 activations (int4 weights included: their reference uses the dequantised weights).
        let f32_activations =
            meta["dtype"].as_str().is_some_and(|d| d == "float32" || d.ends_with("float32 activations"));
        if !fixtures_dir().join(&fixture).join("genai_config.json").is_file() || !f32_activations {
            continue;
        }
        let reference = reference(&fixture);
        let prompt: Vec<i64> = ids(&reference["inputs.input_ids"])
            [..meta["reference_input"]["sequence"].as_u64().unwrap() as usize]
            .to_vec();
        let want = ids(&reference["generated"]);

        // The model as exported, then with layer 1 replaced, each in a directory of its own.
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("original");
        std::fs::create_dir(&original).unwrap();
        copy_fixture(&fixture, &original);
        let mut model = Model::load(original.join("model.onnx")).unwrap();
        // The builder's int4 graphs let ONNX Runtime quantise activations (accuracy_level 4); the
        // reference computes in f32.
        for node in &mut model.graph_mut().node {
            for attr in node.attribute.iter_mut().filter(|a| a.name() == "accuracy_level") {
                attr.i = Some(1);
            }
        }
        let exact = dir.path().join("exact");
        std::fs::create_dir(&exact).unwrap();
        save_with_companion(&model, &exact.join("model.onnx"));
        assert_same_tokens(&fixture, "as exported", &generate(&exact, &prompt, want.len()), &want);

        let layout = find_layout(&model).unwrap();
        let layer = ids(&reference["patched.layer"])[0] as usize;
        let w = reference["patched.weight"].to_f64().unwrap();
        let w = faer::Mat::from_fn(w.shape()[0], w.shape()[1], |i, j| w[[i, j]]);
        let b: Vec<f64> = reference["patched.bias"].to_f64().unwrap().iter().copied().collect();
        let edit = UnitEdit {
            site: layout.unit_site(Unit::attention(layer)).unwrap(),
            map: Some(LinearMap { w, b, second_moment: None }),
        };
        apply(
            &mut model,
            &layout,
            vec![Ok(edit)],
            RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop),
            &[],
        )
        .unwrap();
        let patched = dir.path().join("patched");
        std::fs::create_dir(&patched).unwrap();
        save_with_companion(&model, &patched.join("model.onnx"));
        let want = ids(&reference["patched.generated"]);
        assert_same_tokens(&fixture, "layer 1 linearised", &generate(&patched, &prompt, want.len()), &want);
        checked += 1;
    }
    assert!(checked >= 2, "the GenAI fixtures in f32 were checked");
}
