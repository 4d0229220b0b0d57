//! The command line on real fixtures and on bad input: exit code 2 and one clear message, never a
//! panic.

mod common;

use std::path::Path;

use common::*;
use nbl_onnx::onnx::DType;
use nbl_onnx::onnx::build::{node, tensor_value};
use nbl_onnx::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto, TensorProto, tensor_proto};
use prost::Message;

#[test]
fn inspect_prints_a_table_of_every_layer() {
    let model = model_path("llama-optimum-past");
    let out = nbl(&["inspect", model.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("3 attention blocks, hidden size 64, f32"), "{text}");
    for layer in 0..3 {
        assert!(text.contains(&format!("/model/layers.{layer}/self_attn/o_proj/MatMul_output_0")), "{text}");
    }
}

#[test]
fn inspect_json_follows_the_documented_schema() {
    let model = model_path("llama-genai-fp32");
    let out = nbl(&["inspect", model.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["hidden_size"], 64);
    assert_eq!(json["dtype"], "f32");
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(layer["layer"], i);
        assert_eq!(layer["kind"], "GroupQueryAttention");
        assert_eq!(layer["y"], format!("/model/layers.{i}/attn/o_proj/MatMul/output_0"));
        assert!(layer["nodes"].as_u64().unwrap() > 0);
        assert_eq!(
            layer["kv_inputs"],
            serde_json::json!([format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")])
        );
        assert_eq!(
            layer["kv_outputs"],
            serde_json::json!([format!("present.{i}.key"), format!("present.{i}.value")])
        );
    }
    assert_eq!(layers[0]["x"], "/model/embed_tokens/Gather/output_0");
    assert_eq!(layers[1]["x"], "/model/layers.1/input_layernorm/output_3");
}

#[test]
fn a_text_file_is_not_an_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    std::fs::write(&path, "this is not a model\n").unwrap();
    assert_bad_input(&nbl(&["inspect", path.to_str().unwrap()]), "notes.onnx");
}

#[test]
fn an_empty_file_is_not_an_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.onnx");
    std::fs::write(&path, "").unwrap();
    assert_bad_input(&nbl(&["inspect", path.to_str().unwrap()]), "is empty");
}

#[test]
fn a_truncated_model_is_rejected_wherever_it_is_cut() {
    let bytes = std::fs::read(model_path("llama-optimum-past")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for fraction in [0.001, 0.1, 0.5, 0.9, 0.999] {
        let cut = (bytes.len() as f64 * fraction) as usize;
        let path = dir.path().join(format!("cut-{cut}.onnx"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let out = nbl(&["inspect", path.to_str().unwrap()]);
        assert_bad_input(&out, &format!("cut-{cut}.onnx"));
    }
}

#[test]
fn a_missing_external_data_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(model_path("llama-optimum-extdata"), &path).unwrap();
    let out = nbl(&["inspect", path.to_str().unwrap()]);
    assert_bad_input(&out, "model.onnx_data");
}

#[test]
fn a_truncated_external_data_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(model_path("llama-optimum-extdata"), &path).unwrap();
    let data = std::fs::read(fixtures_dir().join("llama-optimum-extdata/model.onnx_data")).unwrap();
    std::fs::write(dir.path().join("model.onnx_data"), &data[..data.len() / 2]).unwrap();
    assert_bad_input(&nbl(&["inspect", path.to_str().unwrap()]), "truncated data file");
}

#[test]
fn a_directory_is_not_a_model_and_the_model_inside_is_suggested() {
    let dir = fixtures_dir().join("llama-optimum-past");
    let out = nbl(&["inspect", dir.to_str().unwrap()]);
    assert_bad_input(&out, "is a directory");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean"));
}

#[test]
fn a_missing_file_is_named() {
    assert_bad_input(&nbl(&["inspect", "/nonexistent/model.onnx"]), "/nonexistent/model.onnx");
}

fn weight(name: &str, dims: &[i64]) -> TensorProto {
    let count: i64 = dims.iter().product();
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(tensor_proto::DataType::Float as i32),
        raw_data: Some(vec![0u8; count as usize * 4].into()),
        ..Default::default()
    }
}

/// An embedding and two residual MLP blocks, but no attention: a well-formed model of the wrong kind.
fn mlp_only_model() -> ModelProto {
    let graph = GraphProto {
        name: Some("mlp-only".into()),
        node: vec![
            node("Gather", &["embed", "input_ids"], "h0"),
            node("MatMul", &["h0", "w_up0"], "up0"),
            node("Relu", &["up0"], "act0"),
            node("MatMul", &["act0", "w_down0"], "down0"),
            node("Add", &["h0", "down0"], "h1"),
            node("MatMul", &["h1", "w_up1"], "up1"),
            node("Relu", &["up1"], "act1"),
            node("MatMul", &["act1", "w_down1"], "down1"),
            node("Add", &["h1", "down1"], "h2"),
            node("MatMul", &["h2", "lm_head"], "logits"),
        ],
        initializer: vec![
            weight("embed", &[16, 8]),
            weight("w_up0", &[8, 32]),
            weight("w_down0", &[32, 8]),
            weight("w_up1", &[8, 32]),
            weight("w_down1", &[32, 8]),
            weight("lm_head", &[8, 16]),
        ],
        input: vec![tensor_value("input_ids", DType::I64, Some(2))],
        output: vec![tensor_value("logits", DType::F32, Some(3))],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("handmade".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(graph),
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, model: &ModelProto) -> String {
    let path = dir.join(name);
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_graph_without_attention_is_explained_branch_by_branch() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "mlp.onnx", &mlp_only_model());
    let out = nbl(&["inspect", &path]);
    assert_bad_input(&out, "no attention block found");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("branch 0: \"down0\" joins at node \"h1\""), "{stderr}");
    assert!(stderr.contains("branch 1: \"down1\""), "{stderr}");
    assert!(stderr.contains("no Softmax feeding a MatMul"), "{stderr}");
}

#[test]
fn a_graph_without_token_embedding_is_explained() {
    let mut model = mlp_only_model();
    let graph = model.graph.as_mut().unwrap();
    graph.node[0] = node("MatMul", &["features", "embed"], "h0");
    graph.input = vec![tensor_value("features", DType::F32, Some(2))];
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "no-embedding.onnx", &model);
    assert_bad_input(&nbl(&["inspect", &path]), "no token embedding found");
}

#[test]
fn an_external_data_location_outside_the_model_directory_is_refused() {
    let mut model = mlp_only_model();
    let t = &mut model.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.data_location = Some(tensor_proto::DataLocation::External as i32);
    t.external_data = vec![nbl_onnx::onnx::proto::StringStringEntryProto {
        key: Some("location".into()),
        value: Some("../../etc/passwd".into()),
    }];
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "escape.onnx", &model);
    assert_bad_input(&nbl(&["inspect", &path]), "must be a relative path inside the model's directory");
}

#[test]
fn a_graph_with_a_cycle_is_refused_naming_a_node() {
    let mut model = mlp_only_model();
    let graph = model.graph.as_mut().unwrap();
    graph.node[1].input[0] = "down0".into(); // up0 = MatMul(down0, w): down0 depends on up0
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "cycle.onnx", &model);
    assert_bad_input(&nbl(&["inspect", &path]), "cycle through node");
}

#[test]
fn unknown_arguments_are_bad_input() {
    let out = nbl(&["inspect", "--no-such-flag", "x.onnx"]);
    assert_eq!(out.status.code(), Some(2));
}
