//! Constructors for graph pieces: the nodes a rewrite adds, and the small graphs tests build.

use super::DType;
use super::proto::{NodeProto, TensorShapeProto, TypeProto, ValueInfoProto, type_proto};

/// A single-output node named after its output.
pub fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        name: Some(output.to_string()),
        op_type: Some(op.to_string()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        ..Default::default()
    }
}

/// A tensor declaration (graph input or output): element type and, when `rank` is given, that
/// many dims of unknown size.
pub fn tensor_value(name: &str, dtype: DType, rank: Option<usize>) -> ValueInfoProto {
    let shape = rank.map(|r| TensorShapeProto { dim: vec![Default::default(); r] });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype.onnx_code()),
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
