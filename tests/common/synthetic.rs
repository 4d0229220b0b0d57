//! A synthetic decoder whose weights live in a sparse external data file: as large as wanted, at no
//! disk cost until it is copied. Shared by the rewrite tests and the rewrite memory benchmark.
#![allow(dead_code)]

use std::path::Path;

use faer::Mat;
use nbl_onnx::calibrate::{fingerprint, layer_tensors};
use nbl_onnx::detect::find_layout;
use nbl_onnx::onnx::DType;
use nbl_onnx::onnx::Model;
use nbl_onnx::onnx::build::{node, tensor_value};
use nbl_onnx::onnx::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, tensor_proto,
};
use nbl_onnx::stats::{DataSummary, Moments, Stats};
use prost::Message;

/// The synthetic decoder's sizes.
#[derive(Clone, Copy)]
pub struct Shape {
    pub d: i64,
    pub layers: usize,
    pub vocab: i64,
    pub mlp: i64,
}

/// Builds the model (Gather embedding, Softmax attention and ReLU mlp per layer) with every weight in `model.onnx_data`, a sparse file of zeros.
pub fn synthetic_model(dir: &Path, shape: Shape) -> u64 {
    let Shape { d, layers, vocab, mlp } = shape;
    let mut nodes = vec![node("Gather", &["embed", "input_ids"], "h0")];
    let mut weights: Vec<(String, Vec<i64>)> = vec![("embed".into(), vec![vocab, d])];
    let mut stream = "h0".to_string();
    for l in 0..layers {
        let w = |n: &str| format!("layers.{l}.{n}");
        let t = |n: &str| format!("l{l}_{n}");
        for (name, dims) in [
            ("wq", [d, d]),
            ("wk", [d, d]),
            ("wv", [d, d]),
            ("wo", [d, d]),
            ("up", [d, mlp]),
            ("down", [mlp, d]),
        ] {
            weights.push((w(name), dims.to_vec()));
        }
        nodes.extend([
            node("MatMul", &[&stream, &w("wq")], &t("q")),
            node("MatMul", &[&stream, &w("wk")], &t("k")),
            node("MatMul", &[&stream, &w("wv")], &t("v")),
            node("Transpose", &[&t("k")], &t("kt")),
            node("MatMul", &[&t("q"), &t("kt")], &t("scores")),
            node("Softmax", &[&t("scores")], &t("probs")),
            node("MatMul", &[&t("probs"), &t("v")], &t("a")),
            node("MatMul", &[&t("a"), &w("wo")], &t("y")),
            node("Add", &[&stream, &t("y")], &t("h")),
            node("MatMul", &[&t("h"), &w("up")], &t("up")),
            node("Relu", &[&t("up")], &t("act")),
            node("MatMul", &[&t("act"), &w("down")], &t("down")),
            node("Add", &[&t("h"), &t("down")], &t("out")),
        ]);
        stream = t("out");
    }
    nodes.push(node("MatMul", &[&stream, "lm_head"], "logits"));
    weights.push(("lm_head".into(), vec![d, vocab]));
    let mut offset = 0u64;
    let initializer = weights
        .iter()
        .map(|(name, dims)| {
            let length = dims.iter().product::<i64>() as u64 * 4;
            let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
            let t = TensorProto {
                name: Some(name.clone()),
                dims: dims.clone(),
                data_type: Some(tensor_proto::DataType::Float as i32),
                data_location: Some(tensor_proto::DataLocation::External as i32),
                external_data: vec![
                    entry("location", "model.onnx_data".into()),
                    entry("offset", offset.to_string()),
                    entry("length", length.to_string()),
                ],
                ..Default::default()
            };
            offset += length.next_multiple_of(4096);
            t
        })
        .collect();
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(GraphProto {
            node: nodes,
            initializer,
            input: vec![tensor_value("input_ids", DType::I64, None)],
            output: vec![tensor_value("logits", DType::F32, None)],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(dir.join("model.onnx"), model.encode_to_vec()).unwrap();
    std::fs::File::create(dir.join("model.onnx_data")).unwrap().set_len(offset).unwrap();
    offset
}

/// Statistics for the synthetic model: y = 0.5 x + noise, in closed form.
pub fn synthetic_stats(model: &Model, path: &Path, shape: Shape) -> u64 {
    let Shape { d: width, layers, .. } = shape;
    let layout = find_layout(model).unwrap();
    let d = width as usize;
    let n = 100_000u64;
    let moments = (0..layers)
        .map(|l| {
            let mut m = Moments::new(d);
            m.count = n;
            let s = (n - 1) as f64 * (1.0 + l as f64 * 0.1);
            m.sxx = Mat::from_fn(d, d, |i, j| if i == j { s } else { 0.0 });
            m.syx = Mat::from_fn(d, d, |i, j| if i == j { 0.5 * s } else { 0.0 });
            m.syy = Mat::from_fn(d, d, |i, j| if i == j { 0.3 * s } else { 0.0 });
            m
        })
        .collect();
    let stats = Stats {
        fingerprint: fingerprint(model, &layout),
        hidden_size: d,
        layers: layer_tensors(&layout),
        moments,
        heldout: None,
        data: vec![DataSummary {
            files: vec![],
            seq_len: 0,
            sequences: 0,
            shard: [0, 1],
            engine: "synthetic".into(),
        }],
    };
    stats.save(path).unwrap();
    std::fs::metadata(path).unwrap().len()
}
