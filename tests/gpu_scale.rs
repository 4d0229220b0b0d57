//! `scripts/gpu-check.sh --scale` end to end on the CPU, on a 2-layer slice of Llama-3-8B's shape:
//! the device script's own test. Ignored by default: it needs the GenAI builder's virtualenv the
//! first time (to make the shells, about 5 minutes) and about 2 GB of disk per precision. Run it
//! with `cargo test --test gpu_scale -- --ignored`.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "minutes of work and the GenAI builder: run with --ignored"]
fn the_8b_scale_check_runs_end_to_end_on_a_two_layer_slice() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("scale.json");
    let status = Command::new(repo.join("scripts/gpu-check.sh"))
        .arg("--scale")
        .current_dir(repo)
        .env("NBL", env!("CARGO_BIN_EXE_nbl-onnx"))
        .envs([
            ("EP", "cpu"),
            ("LAYERS", "2"),
            ("KS", "1"),
            ("PREFILL_LENS", "32 64"),
            ("DECODE_CONTEXT", "64"),
            ("GEN", "4"),
            ("RUNS", "1"),
            ("SAMPLES", "2"),
            ("SEQ_LEN", "64"),
        ])
        .env("GPU_JSON", &json)
        .env("WORK", dir.path().join("work"))
        .status()
        .unwrap();
    assert!(status.success());
    let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let models = result["models"].as_array().unwrap();
    let precisions: Vec<&str> = models.iter().map(|m| m["precision"].as_str().unwrap()).collect();
    assert_eq!(precisions, ["fp16", "int4"]);
    for m in models {
        let calibration = &m["calibration"];
        for products in ["f32", "f64"] {
            assert!(calibration[products]["tokens_per_s"].as_f64().unwrap() > 0.0, "{m}");
        }
        assert!(calibration["same_ranking"].is_boolean(), "{m}");
        let rewrite = &m["rewrites"][0];
        assert_eq!(rewrite["k"], 1);
        assert_eq!(rewrite["layers"].as_array().unwrap().len(), 1, "{m}");
        for key in ["prefill_speedup_32", "prefill_speedup_64", "decode_speedup"] {
            assert!(rewrite[key].as_f64().unwrap() > 0.0, "{key}: {m}");
        }
        // The 8B shape, not a toy: 2 layers × (K, V) × 8 KV heads × 128, in f16 (fp16) or f32 (the
        // int4 CPU export's activations); the rewrite keeps one layer's cache.
        let models = &m["bench"]["64"]["models"];
        let element = if m["precision"] == "fp16" { 2 } else { 4 };
        assert_eq!(models[0]["kv_bytes_per_token"], 2 * 2 * 8 * 128 * element, "{m}");
        assert_eq!(models[1]["kv_bytes_per_token"], 2 * 8 * 128 * element, "{m}");
    }
}
