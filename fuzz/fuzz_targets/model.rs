//! The ONNX loader, detection and the structure check on arbitrary bytes: errors are fine, panics
//! and aborts are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("/nonexistent/fuzz/model.onnx");
    if let Ok(model) = nbl_onnx::onnx::Model::from_bytes(bytes::Bytes::copy_from_slice(data), path) {
        let _ = nbl_onnx::check::structure(&model);
        if let Ok(layout) = nbl_onnx::detect::find_layout(&model) {
            let _ = nbl_onnx::onnx::Interface::of(&model, Some(layout.hidden_size));
            let _ = nbl_onnx::cost::Cost::of(&model, Some(&layout));
        }
    }
});
