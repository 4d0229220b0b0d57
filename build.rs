//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto`, in pure Rust (no `protoc`).

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["onnx.proto"], ["proto"]).expect("proto/onnx.proto must compile");
    prost_build::Config::new().bytes(["."]).compile_fds(fds).expect("prost code generation for onnx.proto");
}
