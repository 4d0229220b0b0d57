//! Multiply-add counts against the fixtures' configurations: every exporter's graph (decomposed or
//! fused attention, fused QKV, int4 MatMulNBits, transposed or f16 weights) gives the textbook
//! count of a Llama decoder.

mod common;

use common::*;
use nbl_onnx::blocks::find_blocks;
use nbl_onnx::cost::Cost;
use nbl_onnx::onnx::Model;

#[test]
fn every_fixture_counts_the_textbook_multiply_adds() {
    for fixture in fixture_names() {
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixtures_dir().join(&fixture).join("config.json")).unwrap(),
        )
        .unwrap();
        let get = |key: &str| config[key].as_u64().unwrap();
        let (d, d_ff, vocab, layers) =
            (get("hidden_size"), get("intermediate_size"), get("vocab_size"), get("num_hidden_layers"));
        let head = config["head_dim"].as_u64().unwrap_or(d / get("num_attention_heads"));
        let (q_width, kv_width) = (get("num_attention_heads") * head, get("num_key_value_heads") * head);
        // q, k, v and o projections; gate, up and down; the LM head.
        let per_layer = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * d_ff;
        let expected = layers * per_layer + d * vocab;

        let model = Model::load(model_path(&fixture)).unwrap();
        let cost = Cost::of(&model, find_blocks(&model).ok().as_ref()).unwrap();
        assert_eq!(cost.weight_macs_per_token, expected, "{fixture}");
        assert_eq!(cost.attention_widths, vec![q_width; layers as usize], "{fixture}");

        // A prefill of 10 tokens attends to all 10 everywhere; decode steps 0..4 after it attend to
        // 11..14 positions, 12.5 on average.
        let scores = (2 * q_width * layers) as f64;
        assert_eq!(cost.prefill(10), 10.0 * (expected as f64 + scores * 10.0), "{fixture}");
        assert_eq!(cost.decode_step(10, 4), expected as f64 + scores * 12.5, "{fixture}");
    }
}
