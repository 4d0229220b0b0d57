//! Every fixture, from every exporter: `find_layout` names the right X and Y for every layer, proven
//! by running the graph with them as extra outputs and comparing with the tensors PyTorch saved.

mod common;

use common::*;
use nbl_onnx::detect::{DecoderLayout, find_layout};
use nbl_onnx::engine::Engine;
use nbl_onnx::onnx::Model;

/// The GenAI builder marks MatMulNBits with `accuracy_level=4`, which lets ONNX Runtime quantise the
/// activations to int8 on this CPU; the reference is computed in f32, so compare the f32 product.
fn compute_matmulnbits_in_f32(model: &mut Model) {
    for node in &mut model.graph_mut().node {
        if node.op_type() == "MatMulNBits" {
            for attr in &mut node.attribute {
                if attr.name() == "accuracy_level" {
                    attr.i = Some(1);
                }
            }
        }
    }
}

fn expected_dtype(name: &str) -> &'static str {
    if fixture_json(name)["dtype"] == "float16" { "f16" } else { "f32" }
}

/// Runs `name` on `engine` with every layer's X and Y exposed; checks them against PyTorch and
/// returns the report lines.
fn check_xy(name: &str, engine: &dyn Engine, layout: &DecoderLayout) -> Vec<String> {
    let mut model = Model::load(model_path(name)).unwrap();
    compute_matmulnbits_in_f32(&mut model);
    let reference = reference(name);
    let extra: Vec<String> = layout.layers.iter().flat_map(|l| [l.x.clone(), l.y.clone()]).collect();
    let mut session = engine.load(&model, &extra).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let outputs = session.run(&reference_inputs(&reference)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let by_name = |n: &str| {
        let i = session.output_names().iter().position(|o| o == n).unwrap();
        &outputs[i]
    };
    let mut lines = Vec::new();
    for layer in &layout.layers {
        for (tensor, key) in [(&layer.x, "x"), (&layer.y, "y")] {
            let got = by_name(tensor);
            let want = &reference[&format!("layers.{}.{key}", layer.layer)];
            let (diff, scale) = max_abs_diff(got, want);
            let cos = cosine(got, want);
            assert!(
                if quantised_activations(name) {
                    cos >= QUANTISED_MIN_COSINE
                } else {
                    diff <= tolerance(name) * scale.max(1.0)
                },
                "{name} layer {} {key} ({tensor}): max abs diff {diff} (max |ref| {scale})",
                layer.layer
            );
            lines.push(format!(
                "{:<10} {name:<24} layer {} {key}: max abs diff {diff:.2e} (max |ref| {scale:.2}), cosine {cos:.6}",
                engine.describe().split(' ').next().unwrap(),
                layer.layer
            ));
        }
    }
    lines
}

#[test]
fn inspect_finds_every_layer_with_the_pytorch_x_and_y_on_onnx_runtime() {
    let engine = ort();
    let mut report = Vec::new();
    for name in fixture_names() {
        let model = Model::load(model_path(&name)).unwrap();
        let layout = find_layout(&model).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let meta = fixture_json(&name);
        assert_eq!(layout.layers.len() as u64, meta["num_layers"].as_u64().unwrap(), "{name}");
        assert_eq!(layout.hidden_size as u64, meta["hidden_size"].as_u64().unwrap(), "{name}");
        assert_eq!(layout.dtype.map(|d| d.to_string()).as_deref(), Some(expected_dtype(&name)), "{name}");
        let kind = meta["attention_kind"].as_str().unwrap();
        for layer in &layout.layers {
            assert_eq!(layer.kind.to_string(), kind, "{name} layer {}", layer.layer);
            let has_kv = meta["has_kv_cache"].as_bool().unwrap();
            let expected_kv = if has_kv { 2 } else { 0 };
            assert_eq!(
                layer.kv_inputs.len(),
                expected_kv,
                "{name} layer {}: {:?}",
                layer.layer,
                layer.kv_inputs
            );
            assert_eq!(
                layer.kv_outputs.len(),
                expected_kv,
                "{name} layer {}: {:?}",
                layer.layer,
                layer.kv_outputs
            );
            for kv in layer.kv_inputs.iter().chain(&layer.kv_outputs) {
                assert!(kv.contains(&format!(".{}.", layer.layer)), "{name}: layer {} has {kv}", layer.layer);
            }
            assert!(layer.nodes >= 3, "{name} layer {}: {} nodes", layer.layer, layer.nodes);
        }
        assert!(layout.warnings.is_empty(), "{name}: {:?}", layout.warnings);
        report.extend(check_xy(&name, engine.as_ref(), &layout));
    }
    eprintln!("{}", report.join("\n"));
}

/// Graphs of standard ai.onnx operators up to opset 22, which tract implements. Others (the GenAI
/// builder's com.microsoft operators, opset 23's Attention, RotaryEmbedding and RMSNormalization)
/// it may or may not run.
fn standard_ops_only(name: &str) -> bool {
    let meta = fixture_json(name);
    meta["non_standard_ops"].as_object().unwrap().is_empty() && meta["opset"].as_i64().unwrap() <= 22
}

/// Whether tract builds and runs the fixture's graph (what it cannot is typed `Unsupported`).
fn tract_runs(name: &str) -> bool {
    let model = Model::load(model_path(name)).unwrap();
    let result = tract().load(&model, &[]).and_then(|mut s| s.run(&reference_inputs(&reference(name))));
    match result {
        Ok(_) => true,
        Err(e) if tract_cannot_evaluate(name, &format!("{e:#}")) => {
            eprintln!("{name}: tract cannot evaluate it: {e:#}");
            false
        }
        Err(e) => {
            assert!(
                e.downcast_ref::<nbl_onnx::engine::Unsupported>().is_some(),
                "{name}: tract failed, not on an operator it lacks: {e:#}"
            );
            assert!(!standard_ops_only(name), "{name}: tract must run a standard graph: {e:#}");
            false
        }
    }
}

#[test]
fn tract_gives_the_same_x_and_y_where_its_op_set_allows() {
    let engine = tract();
    let mut report = Vec::new();
    for name in fixture_names().into_iter().filter(|n| tract_runs(n)) {
        let model = Model::load(model_path(&name)).unwrap();
        let layout = find_layout(&model).unwrap();
        report.extend(check_xy(&name, engine.as_ref(), &layout));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn tract_names_the_operator_it_cannot_run() {
    let engine = tract();
    // (The graphs tract builds but cannot evaluate are listed, with their error, in
    // `TRACT_CANNOT_EVALUATE`.)
    let cannot_evaluate = |n: &String| TRACT_CANNOT_EVALUATE.iter().any(|(f, _)| f == n);
    for name in fixture_names().into_iter().filter(|n| !tract_runs(n) && !cannot_evaluate(n)) {
        let model = Model::load(model_path(&name)).unwrap();
        let reference = reference(&name);
        let err = match engine.load(&model, &[]) {
            Err(e) => e,
            Ok(mut session) => match session.run(&reference_inputs(&reference)) {
                Err(e) => e,
                Ok(_) => unreachable!("{name}: tract_runs said it does not"),
            },
        };
        assert!(
            err.downcast_ref::<nbl_onnx::engine::Unsupported>().is_some(),
            "{name}: tract's refusal is typed as unsupported, not a failure: {err:#}"
        );
        let msg = format!("{err:#}");
        eprintln!("tract on {name}: {}", msg.lines().next().unwrap_or(""));
        assert!(
            [
                "GroupQueryAttention",
                "MultiHeadAttention",
                "SkipSimplifiedLayerNormalization",
                "MatMulNBits",
                "MatMulIntegerToFloat",
                "SimplifiedLayerNormalization",
                "RotaryEmbedding",
                "SDPA",
                "RMSNormalization"
            ]
            .iter()
            .any(|op| msg.contains(op)),
            "{name}: tract's error does not name the operator: {msg}"
        );
    }
}
