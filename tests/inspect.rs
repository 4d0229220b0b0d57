//! `inspect` on real fixtures: the table people read and the JSON scripts read.

mod common;

use common::*;

#[test]
fn inspect_prints_a_table_of_every_layer() {
    let model = model_path("llama-optimum-past");
    let out = nbl(&["inspect", model.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("3 attention layers, hidden size 64, f32"), "{text}");
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
