//! ONNX models as data: the protobuf types, loading/saving with external data, typed tensors, the
//! graph index, the one way to edit a graph ([`Patch`]) and a decoder's input interface.

pub mod build;
pub mod graph;
pub mod interface;
pub mod merged;
pub mod model;
pub mod patch;
pub mod tensor;

#[allow(clippy::all, missing_docs)]
pub mod proto {
    //! Types generated from `proto/onnx.proto` (ONNX IR 14).
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use graph::{GraphIndex, Port, TensorId};
pub use interface::{Interface, present_as_past};
pub use model::Model;
pub use patch::{Patch, Patched};
pub use tensor::{DType, Tensor};

use proto::{NodeProto, ValueInfoProto, type_proto};

/// The element type and dims of a `ValueInfoProto` holding a tensor type. Dims are `None` where
/// symbolic or unknown.
pub fn value_type(value: &ValueInfoProto) -> Option<(DType, Vec<Option<i64>>)> {
    let Some(type_proto::Value::TensorType(t)) = value.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((DType::from_onnx(t.elem_type()), dims))
}

/// An integer attribute of a node.
pub fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name() == name).and_then(|a| a.i)
}
