//! Multiply-add counts against the fixtures' PyTorch models: every exporter's graph (decomposed or
//! fused attention, fused QKV, Conv1D as Gemm, int4 MatMulNBits, transposed, tied or f16 weights)
//! gives the count of the weight matrices the PyTorch model multiplies by.

mod common;

use common::*;
use nbl_onnx::cost::Cost;
use nbl_onnx::detect::find_layout;
use nbl_onnx::onnx::Model;

#[test]
fn every_fixture_counts_the_multiply_adds_of_its_pytorch_model() {
    for fixture in fixture_names() {
        let meta = fixture_json(&fixture);
        let get =
            |key: &str| meta[key].as_u64().unwrap_or_else(|| panic!("{fixture}: {key} in fixture.json"));
        // Every Linear (and Conv1D) weight of the PyTorch model, the LM head included; null for a
        // mixture of experts, whose experts run on a data-dependent share of the tokens.
        if meta["weight_macs_per_token"].is_null() {
            eprintln!("{fixture}: mixture of experts, no per-token count to compare");
            continue;
        }
        let expected = get("weight_macs_per_token");
        let (q_width, layers) = (get("attention_width"), get("num_layers"));

        let model = Model::load(model_path(&fixture)).unwrap();
        let cost = Cost::of(&model, find_layout(&model).ok().as_ref()).unwrap();
        assert_eq!(cost.weight_macs_per_token, expected, "{fixture}");
        assert_eq!(cost.attention_widths, vec![q_width; layers as usize], "{fixture}");

        // A prefill of 10 tokens attends to all 10 everywhere; decode steps 0..4 after it attend to
        // 11..14 positions, 12.5 on average.
        let scores = (2 * q_width * layers) as f64;
        assert_eq!(cost.prefill(10), 10.0 * (expected as f64 + scores * 10.0), "{fixture}");
        assert_eq!(cost.decode_step(10, 4), expected as f64 + scores * 12.5, "{fixture}");
    }
}

/// Bytes a decode step reads follow the stored format: the same Llama weights as the GenAI builder
/// writes them in f32, f16 and int4 read about 4, 2 and 0.5 bytes per weight (plus scales), and an
/// f32 graph reads at least 4 bytes per multiply-add weight.
#[test]
fn decode_bytes_follow_the_stored_format() {
    let bytes_per_weight = |fixture: &str| {
        let model = Model::load(model_path(fixture)).unwrap();
        let cost = Cost::of(&model, find_layout(&model).ok().as_ref()).unwrap();
        let ratio = cost.weight_bytes_per_step as f64 / cost.weight_macs_per_token as f64;
        eprintln!(
            "{fixture}: {} bytes per step, {ratio:.3} per multiply-add weight",
            cost.weight_bytes_per_step
        );
        ratio
    };
    let (f32, f16, int4) = (
        bytes_per_weight("llama-genai-fp32"),
        bytes_per_weight("llama-genai-fp16"),
        bytes_per_weight("llama-genai-int4"),
    );
    // Norm scales and rotary caches add a little to each.
    assert!((4.0..4.5).contains(&f32), "{f32}");
    assert!((2.0..2.5).contains(&f16), "{f16}");
    assert!((0.5..1.0).contains(&int4), "int4 with f32 scales per block of 32: {int4}");
    assert!(bytes_per_weight("llama-optimum-past") >= 4.0);
}
