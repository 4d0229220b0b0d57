//! How the linear maps are stored in the rewritten model: the weight format a user asks for, and
//! what it resolves to for one model (a float type, `MatMulNBits` groups, or int8 per output).

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use crate::cost::output_projection;
use crate::detect::DecoderLayout;
use crate::fit::quantize::Quantizer;
use crate::invalid::{Setting, require};
use crate::onnx::proto::{GraphProto, NodeProto};
use crate::onnx::{DType, GraphIndex, Model, Port, TensorId, attr_int};

/// The format `W` is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightFormat {
    /// The format of the replaced attention's projections (MatMulNBits int4/int8 with their
    /// group size and accuracy level; int8 per output, dequantised by DequantizeLinear, for ONNX
    /// Runtime's quantisers' graphs; or a float type)
    Auto,
    F32,
    F16,
    Bf16,
    /// com.microsoft::MatMulNBits, 4 bits
    Int4,
    /// com.microsoft::MatMulNBits, 8 bits
    Int8,
}

/// How the maps are written, resolved for one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum MapStorage {
    /// A `MatMul` by `Wᵀ` in this element type.
    Float(#[serde(serialize_with = "dtype_name")] DType),
    /// A `MatMulNBits` of `W` quantised by `quantizer` in groups of `group_size` inputs per scale.
    /// The report spells it as `MatMulNBits` does: `Blocks` with a `block_size`.
    #[serde(rename = "Blocks")]
    Grouped {
        bits: u32,
        #[serde(rename = "block_size")]
        group_size: usize,
        accuracy_level: i64,
        quantizer: Quantizer,
    },
    /// A `MatMul` by int8 `Wᵀ` with one scale per output, dequantised by a standard
    /// `DequantizeLinear` (the form of ONNX Runtime's QDQ quantiser, which every runtime runs).
    PerChannelInt8 { quantizer: Quantizer },
}

impl MapStorage {
    /// The same storage with `W` rounded to nearest: the same bytes, for what a map's size decides
    /// (its cost), without the statistics GPTQ weighs by.
    pub fn rounded_to_nearest(self) -> MapStorage {
        match self {
            MapStorage::Float(_) => self,
            MapStorage::Grouped { bits, group_size, accuracy_level, .. } => {
                MapStorage::Grouped { bits, group_size, accuracy_level, quantizer: Quantizer::Rtn }
            }
            MapStorage::PerChannelInt8 { .. } => MapStorage::PerChannelInt8 { quantizer: Quantizer::Rtn },
        }
    }

    /// Whether fitting must keep each input's second moment `E[x xᵀ]`: GPTQ weighs the rounding
    /// errors by it.
    pub fn needs_second_moment(&self) -> bool {
        self.quantizer() == Some(Quantizer::Gptq)
    }

    /// How `W` is rounded, when it is.
    pub fn quantizer(&self) -> Option<Quantizer> {
        match *self {
            MapStorage::Float(_) => None,
            MapStorage::Grouped { quantizer, .. } | MapStorage::PerChannelInt8 { quantizer } => {
                Some(quantizer)
            }
        }
    }
}

fn dtype_name<S: serde::Serializer>(dtype: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(dtype)
}

impl MapStorage {
    /// Resolves `format` for `model`: `auto` follows the projection that makes the first layer's
    /// `Y` (a `MatMulNBits`' bits, group size and accuracy level; int8 per output for an int8
    /// product of ONNX Runtime's quantisers, in the standard operators those graphs use, so that
    /// every engine that ran the model still does; else the stream's float type).
    ///
    /// `group_size` overrides the group size of int4/int8 maps; it must divide the hidden size.
    pub fn resolve(
        format: WeightFormat,
        quantizer: Quantizer,
        group_size: Option<usize>,
        model: &Model,
        layout: &DecoderLayout,
    ) -> Result<MapStorage> {
        let stream = layout.dtype.context("cannot tell the stream's element type")?;
        let graph = model.graph();
        let index = GraphIndex::new(graph)?;
        let output_projection = layout
            .layers
            .first()
            .and_then(|l| output_projection(graph, &index, &l.y))
            .map(|n| &graph.node[n]);
        let projection = output_projection.filter(|n| n.op_type() == "MatMulNBits");
        let grouped = |bits: u32| MapStorage::Grouped {
            bits,
            group_size: group_size
                .or(projection.and_then(|n| attr_int(n, "block_size")).map(|b| b as usize))
                .unwrap_or(32),
            accuracy_level: projection.and_then(|n| attr_int(n, "accuracy_level")).unwrap_or(0),
            quantizer,
        };
        let storage = match format {
            WeightFormat::Auto => match projection {
                Some(n) => grouped(attr_int(n, "bits").unwrap_or(4) as u32),
                // A per-axis DequantizeLinear needs opset 13.
                None if output_projection.is_some_and(|n| int8_product(graph, &index, n))
                    && model.opset("").is_some_and(|v| v >= 13) =>
                {
                    MapStorage::PerChannelInt8 { quantizer }
                }
                None => MapStorage::Float(stream),
            },
            WeightFormat::F32 => MapStorage::Float(DType::F32),
            WeightFormat::F16 => MapStorage::Float(DType::F16),
            WeightFormat::Bf16 => MapStorage::Float(DType::BF16),
            WeightFormat::Int4 => grouped(4),
            WeightFormat::Int8 => grouped(8),
        };
        let d = layout.hidden_size;
        match storage {
            MapStorage::Grouped { bits, group_size, .. } => {
                require(group_size >= 16 && group_size.is_power_of_two(), Setting::GroupSize, || {
                    format!("{group_size}: MatMulNBits groups are a power of two of at least 16")
                })?;
                require(d.is_multiple_of(group_size), Setting::GroupSize, || {
                    format!(
                        "{group_size} does not divide the hidden size {d} of {}: {bits}-bit maps (MatMulNBits) \
                         quantise whole groups of inputs; choose a group size that divides {d}, or float maps",
                        model.path.display()
                    )
                })?;
            }
            MapStorage::Float(_) | MapStorage::PerChannelInt8 { .. } => {
                require(group_size.is_none(), Setting::GroupSize, || {
                    format!("applies to int4/int8 maps (MatMulNBits) only, not to {storage:?}")
                })?;
            }
        }
        Ok(storage)
    }
}

/// Whether `product` multiplies by int8 weights the way ONNX Runtime's quantisers write it:
/// `MatMulInteger`, `DynamicQuantizeMatMul` or `MatMulIntegerToFloat` (dynamic quantisation), or a
/// `MatMul` of a `DequantizeLinear`'d 8-bit initializer (QDQ).
fn int8_product(graph: &GraphProto, index: &GraphIndex, product: &NodeProto) -> bool {
    let eight_bit = |t: Option<TensorId>| {
        t.and_then(|t| index.initializer(t)).is_some_and(|i| {
            matches!(DType::from_onnx(graph.initializer[i].data_type()), DType::I8 | DType::U8)
        })
    };
    let weights = product.input.get(1).and_then(|w| index.id(w));
    match product.op_type() {
        "MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat" => eight_bit(weights),
        "MatMul" => weights.and_then(|w| index.producer(w)).is_some_and(|Port { node: dq, .. }| {
            graph.node[dq].op_type() == "DequantizeLinear" && eight_bit(index.input(dq, 0))
        }),
        _ => false,
    }
}
