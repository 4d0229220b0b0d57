//! The statistics reader on arbitrary bytes: errors are fine, panics and aborts are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(stats) = nbl_onnx::stats::Stats::from_bytes(data, path) {
        let _ = nbl_onnx::report::analyze(
            &stats,
            nbl_onnx::select::Criterion::Cca,
            &nbl_onnx::select::Selection::Count(1),
            nbl_onnx::nbl::DEFAULT_LAMBDA,
            false,
        );
    }
});
