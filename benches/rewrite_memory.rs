//! Peak memory of `nbl-onnx rewrite` on a model far larger than its statistics: a synthetic
//! decoder (d = 1024, 8 layers, vocabulary 262144, MLP 16384) whose ~3.4 GB of weights live in an
//! external data file, rewritten with 2 layers linearised. The output's weights are streamed from
//! the input's data file, so the peak should stay near the statistics' size, not the weights'.
//! Writes `bench/rewrite-memory.json` (`NBL_BENCH_OUT` overrides). Needs GNU time (/usr/bin/time).

use std::path::Path;
use std::process::Command;

use nbl_onnx::onnx::Model;

#[path = "../tests/common/synthetic.rs"]
mod synthetic;

use synthetic::{Shape, synthetic_model, synthetic_stats};

const SHAPE: Shape = Shape { d: 1024, layers: 8, vocab: 262_144, mlp: 16_384 };

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let weights = synthetic_model(dir.path(), SHAPE);
    let model = Model::load(dir.path().join("model.onnx")).unwrap();
    let stats_path = dir.path().join("stats.safetensors");
    let stats_bytes = synthetic_stats(&model, &stats_path, SHAPE);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let time_file = dir.path().join("time");
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%M %e", "-o", time_file.to_str().unwrap(), env!("CARGO_BIN_EXE_nbl-onnx"), "rewrite"])
        .arg(dir.path().join("model.onnx"))
        .args(["--stats", stats_path.to_str().unwrap(), "--layers", "2", "-o"])
        .arg(out_dir.join("model.onnx"))
        .status()
        .expect("GNU time runs");
    assert!(status.success());
    let timing = std::fs::read_to_string(&time_file).unwrap();
    let mut parts = timing.split_whitespace();
    let rss_mb = parts.next().unwrap().parse::<u64>().unwrap() / 1024;
    let seconds: f64 = parts.next().unwrap().parse().unwrap();
    let written = std::fs::metadata(out_dir.join("model.onnx_data")).unwrap().len();
    println!(
        "rewrite of a {:.2} GB model ({:.0} MB statistics): peak RSS {rss_mb} MB, {seconds:.1} s, wrote {:.2} GB of weights",
        weights as f64 / 1e9,
        stats_bytes as f64 / 1e6,
        written as f64 / 1e9
    );
    let out = std::env::var("NBL_BENCH_OUT").unwrap_or_else(|_| "bench/rewrite-memory.json".into());
    if let Some(parent) = Path::new(&out).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let json = serde_json::json!({
        "weights_bytes": weights, "stats_bytes": stats_bytes, "output_weights_bytes": written,
        "peak_rss_mb": rss_mb, "seconds": seconds, "layers": SHAPE.layers, "hidden_size": SHAPE.d, "linearised": 2,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("wrote {out}");
}
