//! `inspect` of a model with external data reads none of the weight bytes. Alone in its test binary
//! because it measures the whole process's I/O counters.

mod common;

use std::fs::OpenOptions;

use common::*;
use nbl_onnx::detect::find_layout;
use nbl_onnx::inspect::inspect;
use nbl_onnx::onnx::Model;

/// Bytes this process has read through read(2) and friends (`rchar` of /proc/self/io).
fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

#[test]
fn inspect_reads_no_weight_bytes() {
    // The Optimum fixture with its data file grown to 4 GiB (sparse: the tail is a hole), as large as
    // the weights of a 1B-parameter model.
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("model.onnx");
    let data_file = dir.path().join("model.onnx_data");
    std::fs::copy(fixtures_dir().join("llama-optimum-extdata/model.onnx"), &model_file).unwrap();
    std::fs::copy(fixtures_dir().join("llama-optimum-extdata/model.onnx_data"), &data_file).unwrap();
    let weights = std::fs::metadata(&data_file).unwrap().len();
    OpenOptions::new().write(true).open(&data_file).unwrap().set_len(4 << 30).unwrap();
    let model_size = std::fs::metadata(&model_file).unwrap().len();

    let before = bytes_read();
    let model = Model::load(&model_file).unwrap();
    let report = inspect(&model, find_layout(&model).unwrap());
    let read = bytes_read() - before;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();

    assert_eq!(report.layout.layers.len(), 3);
    // The .onnx file is memory-mapped (not counted in rchar); everything else read, e.g. nothing,
    // must stay far below the real weights (~0.9 MB here).
    eprintln!(
        "inspect read {read} bytes through read(2); model.onnx {model_size} bytes, real weights {weights} bytes, data file 4 GiB"
    );
    assert!(read < 64 * 1024, "inspect read {read} bytes");
    assert!(read < weights / 10);
    assert!(!maps.contains("model.onnx_data"), "the data file must not be mapped:\n{maps}");
}
