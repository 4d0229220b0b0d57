//! `bench` on a fixture: the documented JSON, positive timings, multiply-add predictions, KV-cache
//! bytes per token from the model's cache inputs (layers × 2 × kv_heads × head_dim × 4 bytes).

mod common;

use common::*;

#[test]
fn bench_reports_timings_memory_and_kv_bytes() {
    let model = model_path("llama-optimum-past");
    let genai = model_path("llama-genai-fp16-cuda");
    let out = nbl(&[
        "bench",
        model.to_str().unwrap(),
        genai.to_str().unwrap(),
        "--prompt-len",
        "16",
        "--gen",
        "4",
        "--runs",
        "2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ep"], "CPU");
    assert_eq!((json["prompt_len"].as_u64(), json["gen"].as_u64()), (Some(16), Some(4)));
    let models = json["models"].as_array().unwrap();
    for m in models {
        assert!(m["prefill_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["decode_tok_s"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["peak_mem_mb"].as_f64().unwrap() > 1.0, "{m}");
        // Both exports of the same configuration: the same multiply-adds, whatever the fusion.
        assert_eq!(m["predicted_prefill_speedup"].as_f64(), Some(1.0), "{m}");
        assert_eq!(m["predicted_decode_speedup"].as_f64(), Some(1.0), "{m}");
        assert!(m["prefill_gmacs"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert_eq!(models[0]["prefill_speedup"].as_f64(), Some(1.0));
    // 3 layers × (key + value) × 2 KV heads × head_dim 16 × bytes per element.
    assert_eq!(models[0]["kv_bytes_per_token"], 3 * 2 * 2 * 16 * 4);
    assert_eq!(models[1]["kv_bytes_per_token"], 3 * 2 * 2 * 16 * 2, "an f16 cache");
}

#[test]
fn a_model_without_kv_cache_cannot_be_timed_for_decoding() {
    let model = model_path("llama-optimum-nopast");
    let out = nbl(&["bench", model.to_str().unwrap(), "--prompt-len", "8", "--gen", "2", "--runs", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no KV cache"));
}
