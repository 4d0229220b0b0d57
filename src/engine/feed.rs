//! The inputs of one forward pass over a batch of token ids from position 0: ids, attention mask,
//! position ids and an empty KV cache, built from the model's declared inputs.

use anyhow::{Context, Result, bail};
use std::cell::OnceCell;

use ndarray::{Array2, ArrayD};

use crate::onnx::proto::ValueInfoProto;
use crate::onnx::{DType, Model, Tensor, attr_int, value_type};

/// Every graph input for a prefill of `ids` ([batch, sequence]) with nothing cached: the KV-cache
/// inputs get past length 0. Fails naming an input it does not know how to feed.
pub fn prefill_inputs(model: &Model, ids: &Array2<i64>) -> Result<Vec<(String, Tensor)>> {
    let (batch, seq) = ids.dim();
    let graph = model.graph();
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let head = OnceCell::new();
    let mut inputs = Vec::new();
    // Older IRs list initializers among the inputs too; they are not fed.
    for input in graph.input.iter().filter(|v| !initializers.contains(v.name())) {
        let name = input.name();
        let (dtype, dims) =
            value_type(input).with_context(|| format!("graph input {name:?} is not a tensor"))?;
        let positions = || Array2::from_shape_fn((batch, seq), |(_, s)| s as i64);
        let tensor = match name {
            "input_ids" => integer(dtype, ids.clone().into_dyn(), name)?,
            "attention_mask" => integer(dtype, Array2::<i64>::ones((batch, seq)).into_dyn(), name)?,
            "position_ids" => integer(dtype, positions().into_dyn(), name)?,
            "cache_position" => integer(dtype, ndarray::Array1::from_iter(0..seq as i64).into_dyn(), name)?,
            _ if dtype.is_float() && dims.len() == 4 => {
                empty_cache(input, dtype, &dims, batch, || *head.get_or_init(|| head_size(model)))?
            }
            _ => bail!(
                "{}: don't know how to feed graph input {name:?} ({dtype}, {} dims)",
                model.path.display(),
                dims.len()
            ),
        };
        inputs.push((name.to_string(), tensor));
    }
    Ok(inputs)
}

/// The inputs of one decode step: token `next` at position `past_len`, attending to the cache
/// `past` (the previous step's `present.*` renamed by [`present_as_past`]), which is moved, not
/// copied: at long contexts the cache is tens of megabytes per step.
pub fn decode_inputs(
    model: &Model,
    next: i64,
    mut past: Vec<(String, Tensor)>,
    past_len: usize,
) -> Result<Vec<(String, Tensor)>> {
    let mut inputs = prefill_inputs(model, &Array2::from_elem((1, 1), next))?;
    for (name, tensor) in &mut inputs {
        let dtype = tensor.dtype();
        match name.as_str() {
            "attention_mask" => {
                *tensor = integer(dtype, Array2::<i64>::ones((1, past_len + 1)).into_dyn(), name)?
            }
            "position_ids" | "cache_position" => {
                *tensor = integer(dtype, ndarray::Array::from_elem(tensor.shape(), past_len as i64), name)?
            }
            _ => {
                if let Some(i) = past.iter().position(|(n, _)| n == name) {
                    *tensor = past.swap_remove(i).1;
                }
            }
        }
    }
    Ok(inputs)
}

/// A run's `present.*` outputs named as the next step's `past_key_values.*` inputs (taking them
/// out of `outputs`).
pub fn present_as_past(names: &[String], outputs: Vec<Tensor>) -> Vec<(String, Tensor)> {
    names
        .iter()
        .zip(outputs)
        .filter_map(|(n, t)| n.strip_prefix("present").map(|rest| (format!("past_key_values{rest}"), t)))
        .collect()
}

fn integer(dtype: DType, values: ArrayD<i64>, name: &str) -> Result<Tensor> {
    Ok(match dtype {
        DType::I64 => Tensor::I64(values),
        DType::I32 => Tensor::I32(values.mapv(|v| v as i32)),
        DType::Bool => Tensor::Bool(values.mapv(|v| v != 0)),
        other => bail!("graph input {name:?} has type {other}; expected an integer type"),
    })
}

/// An empty past key or value: [batch, kv_heads, 0, head_dim]. Symbolic dims are read as: the
/// first one batch, the next the past length (0), and any other the head size of the model's
/// attention op (`hidden / num_heads`).
fn empty_cache(
    input: &ValueInfoProto,
    dtype: DType,
    dims: &[Option<i64>],
    batch: usize,
    head_size: impl Fn() -> Option<usize>,
) -> Result<Tensor> {
    let mut shape = Vec::with_capacity(dims.len());
    let mut symbolic_seen = 0;
    for (axis, dim) in dims.iter().enumerate() {
        let size = match dim {
            Some(d) if axis > 0 => *d as usize,
            _ => {
                symbolic_seen += 1;
                match (axis, symbolic_seen) {
                    (0, _) => batch,
                    (_, 2) => 0,
                    _ => head_size().with_context(|| {
                        format!("cannot tell the size of axis {axis} of KV-cache input {:?}", input.name())
                    })?,
                }
            }
        };
        shape.push(size);
    }
    Tensor::zeros(dtype, &shape)
}

/// The per-head size of a fused attention op: hidden size over its `num_heads` attribute.
fn head_size(model: &Model) -> Option<usize> {
    let graph = model.graph();
    let node = graph
        .node
        .iter()
        .find(|n| attr_int(n, "num_heads").is_some() && n.op_type().contains("Attention"))?;
    let heads = attr_int(node, "num_heads")? as usize;
    let hidden = crate::blocks::find_blocks(model).ok()?.hidden_size;
    (heads > 0 && hidden % heads == 0).then(|| hidden / heads)
}
