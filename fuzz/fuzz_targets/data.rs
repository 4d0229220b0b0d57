//! The data reader (json, jsonl, txt, input_ids) and packing on arbitrary text: errors are fine,
//! panics are not. The first byte picks the format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbl_onnx::data::{TextEncoder, pack, parse_documents};

fuzz_target!(|data: &[u8]| {
    let Some((&format, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let name = ["data.json", "data.jsonl", "data.txt"][format as usize % 3];
    if let Ok(docs) = parse_documents(text, std::path::Path::new(name)) {
        let ids_only = TextEncoder { tokenizer: None, tokenizer_path: "tokenizer.json".into(), eos_id: 0 };
        let _ = pack(&[(name.to_string(), docs)], &ids_only, 1 + format as usize % 7, Some(4), Some(512));
    }
});
