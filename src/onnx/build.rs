//! Constructors for graph pieces: the nodes a rewrite adds, and the small graphs tests build.

use super::proto::{
    AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto,
    tensor_shape_proto, type_proto,
};
use super::{DType, Tensor};

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

/// A tensor declaration with a fixed shape.
pub fn fixed_tensor_value(name: &str, dtype: DType, shape: &[usize]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    let mut value = tensor_value(name, dtype, None);
    if let Some(type_proto::Value::TensorType(t)) = value.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        t.shape = Some(TensorShapeProto { dim });
    }
    value
}

/// An initializer holding `tensor`'s values.
pub fn initializer(name: &str, tensor: Tensor) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: tensor.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(tensor.dtype().onnx_code()),
        raw_data: Some(tensor.to_le_bytes().into()),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_proto::AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}
