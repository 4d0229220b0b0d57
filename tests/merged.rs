//! Optimum's legacy merged decoder (`decoder_model_merged.onnx`: the decoder without a KV cache and
//! the one with it, as the two branches of an `If` on `use_cache_branch`), made from the checkpoint
//! of `llama-optimum-past`, whose PyTorch references are therefore its own.

mod common;

use std::path::PathBuf;

use common::*;
use nbl_onnx::detect::find_layout;
use nbl_onnx::fit::LinearMap;
use nbl_onnx::generate::Decoder;
use nbl_onnx::onnx::Model;
use nbl_onnx::onnx::merged::{Branch, Merged};
use nbl_onnx::rewrite::{KvCache, Replacement, RewriteOptions, UnitEdit, apply};
use nbl_onnx::unit::Unit;

fn merged_path() -> PathBuf {
    fixtures_dir().join("merged/llama-optimum-merged/decoder_model_merged.onnx")
}

fn ids(t: &nbl_onnx::onnx::Tensor) -> Vec<i64> {
    t.to_f64().unwrap().iter().map(|&v| v as i64).collect()
}

/// Greedy generation on ONNX Runtime: the prompt through the branch without the cache, every
/// further token through the branch with it; the prompt's logits and the tokens.
fn generate(model: &Model, prompt: &[i64], steps: usize) -> (Vec<f32>, Vec<i64>) {
    let prompt = ndarray::Array2::from_shape_vec((1, prompt.len()), prompt.to_vec()).unwrap();
    let mut decoder = Decoder::load(model, None, ort().as_ref(), steps).unwrap();
    let (logits, tokens) = decoder.generate(&prompt, steps).unwrap();
    (logits.iter().copied().collect(), tokens)
}

/// Layer 1's attention replaced in both branches by PyTorch's seeded map: the prompt's logits are
/// `patched.logits` (the branch without the cache) and the greedy tokens are `patched.generated`
/// (every token after the first from the branch with the cache), and layer 1's KV cache is gone
/// from the interface. The merged model as exported generates PyTorch's own tokens.
#[test]
fn a_merged_decoder_rewritten_at_layer_1_generates_what_patched_pytorch_generates() {
    let reference = reference("llama-optimum-past");
    let meta = fixture_json("llama-optimum-past");
    let sequence = meta["reference_input"]["sequence"].as_u64().unwrap() as usize;
    let prompt = ids(&reference["inputs.input_ids"])[..sequence].to_vec();
    let original = Model::load(merged_path()).unwrap();

    let want = ids(&reference["generated"]);
    let (_, tokens) = generate(&original, &prompt, want.len());
    assert_eq!(tokens, want, "the merged decoder as exported");

    let merged = Merged::find(&original).expect("an If on use_cache_branch");
    let layer = ids(&reference["patched.layer"])[0] as usize;
    let w = reference["patched.weight"].to_f64().unwrap();
    let map = LinearMap {
        w: faer::Mat::from_fn(w.shape()[0], w.shape()[1], |i, j| w[[i, j]]),
        b: reference["patched.bias"].to_f64().unwrap().iter().copied().collect(),
        second_moment: None,
    };
    let mut branches = Vec::new();
    for branch in [Branch::Cached, Branch::Uncached] {
        let mut model = merged.branch(&original, branch).unwrap();
        let layout = find_layout(&model).unwrap();
        assert_eq!(layout.layers.len(), 3, "{branch:?}");
        let edit =
            UnitEdit { site: layout.unit_site(Unit::attention(layer)).unwrap(), map: Some(map.clone()) };
        let options = RewriteOptions::float(&layout, Replacement::Linear, KvCache::Drop);
        apply(&mut model, &layout, vec![Ok(edit)], options, &[]).unwrap();
        branches.push(model);
    }
    let rewritten = merged.join(&original, &branches[0], &branches[1]).unwrap();
    let inputs: Vec<&str> = rewritten.graph().input.iter().map(|v| v.name()).collect();
    assert!(!inputs.iter().any(|n| n.starts_with(&format!("past_key_values.{layer}."))), "{inputs:?}");
    assert!(inputs.contains(&"past_key_values.0.key") && inputs.contains(&"use_cache_branch"), "{inputs:?}");
    assert!(
        nbl_onnx::check::structure(&rewritten).is_empty(),
        "{:?}",
        nbl_onnx::check::structure(&rewritten)
    );

    let want = ids(&reference["patched.generated"]);
    let (logits, tokens) = generate(&rewritten, &prompt, want.len());
    eprintln!("merged decoder, layer {layer} linearised: {tokens:?}; patched PyTorch: {want:?}");
    assert_eq!(tokens, want);
    // The prompt's logits: the first sequence of the patched reference's batch.
    let patched = reference["patched.logits"].to_f32().unwrap();
    let first: Vec<f32> = patched.index_axis(ndarray::Axis(0), 0).iter().copied().collect();
    let diff = logits.iter().zip(&first).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff <= 1e-4 * first.iter().fold(1.0f32, |m, v| m.max(v.abs())), "prompt logits {diff}");
}

/// The commands on the merged file: inspect, calibrate and rewrite measure the branch without the
/// cache and say so; the rewrite passes `check --reference`, `eval` compares it with the original,
/// and `bench` times both, counting their costs on the branch with the cache.
#[test]
fn the_commands_read_a_merged_decoder_and_name_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("merged/llama-optimum-merged", dir.path());
    let model = dir.path().join("decoder_model_merged.onnx");
    let model = model.to_str().unwrap();
    let run = ok(nbl(&["inspect", model, "--run"]));
    assert!(stderr(&run).contains("is a merged decoder (If node \"optimum::if\" on \"use_cache_branch\")"));
    let stats = dir.path().join("stats.safetensors");
    ok(nbl(&["calibrate", model, "--samples", "4", "--seq-len", "32", "-o", stats.to_str().unwrap()]));
    let out = dir.path().join("out/decoder_model_merged.onnx");
    let rewrite = ok(nbl(&[
        "rewrite",
        model,
        "--stats",
        stats.to_str().unwrap(),
        "--layer-ids",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(stderr(&rewrite).contains("both branches alike"), "{}", stderr(&rewrite));
    let (code, report) = check(&out, &["--reference", model, "--decode-steps", "4"]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(decoded(&report, "onnxruntime").len(), 4, "{report}");
    // eval runs both as they are: the rewrite against the original, generation included.
    let out = out.to_str().unwrap();
    let args =
        ["eval", model, out, "--samples", "2", "--seq-len", "32", "--gen-prompts", "2", "--gen-tokens", "4"];
    let eval = ok(nbl(&[&args[..], &["--json"]].concat()));
    let scores: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let models = scores["models"].as_array().unwrap();
    assert!(models[0]["ppl"].as_f64().unwrap() > 1.0, "{scores}");
    assert!(models[1]["kl_vs_first"].as_f64().is_some_and(|kl| kl > 0.0), "{scores}");
    // bench times both, counting their costs on the branch with the cache.
    let bench = ok(nbl(&["bench", model, out, "--prompt-len", "8", "--gen", "2", "--runs", "1", "--json"]));
    let timing: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    let rewritten = &timing["models"][1];
    for key in ["predicted_prefill_speedup", "predicted_decode_speedup", "predicted_decode_speedup_bytes"] {
        let predicted = rewritten[key].as_f64().unwrap_or(f64::NAN);
        assert!(predicted > 1.0 && predicted.is_finite(), "{key}: {timing}");
    }
    assert_eq!(rewritten["kv_bytes_per_token"], 512, "{timing}");
}
