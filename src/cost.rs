//! Multiply-adds counted from the graph: every matrix product with a constant weight (attention
//! projections, MLP, LM head, the NBL maps) and, per attention block, the scores `QKᵀ` and the
//! weighted sum `PV` over the attended context. This is the speed-up a rewrite promises on paper;
//! what it leaves out (norms, softmax, rotary embeddings, masks, copies, per-node overhead) is what
//! a measured speed-up is compared against.

use anyhow::Result;
use serde::Serialize;

use crate::detect::DecoderLayout;
use crate::onnx::model::{external_location, tensor_shape};
use crate::onnx::proto::{GraphProto, TensorProto};
use crate::onnx::{DType, GraphIndex, Model, Port, TensorId, attr_int};

/// What a rewrite saves: the bytes a decode step reads, or a prefill's multiply-adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Optimize {
    /// bytes read per decode step: the weights and the KV cache at [`PREDICTED_CONTEXT`] positions
    Decode,
    /// multiply-adds of a prefill of [`PREDICTED_PROMPT`] tokens
    Prefill,
}

/// The prompt a prediction assumes: `bench`'s default.
pub const PREDICTED_PROMPT: usize = 512;

/// The context of a mean decode step after it: 512 prompt tokens and half of `bench`'s 128
/// generated.
pub const PREDICTED_CONTEXT: usize = 576;

impl Optimize {
    /// What a model with `cost` and `kv_bytes_per_token` of KV cache spends, in the units this
    /// optimises.
    pub fn spent(self, cost: &Cost, kv_bytes_per_token: u64) -> f64 {
        match self {
            Optimize::Decode => cost.decode_bytes(PREDICTED_CONTEXT as f64, kv_bytes_per_token),
            Optimize::Prefill => cost.prefill(PREDICTED_PROMPT),
        }
    }
}

/// A model's multiply-add count, per token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    /// Multiply-adds of every constant-weight product, per token.
    pub weight_macs_per_token: u64,
    /// Per attention block, the width of its attention (heads × head size): scores and weighted
    /// sum cost `2 · width` multiply-adds per token per attended position.
    pub attention_widths: Vec<u64>,
    /// Bytes of stored weights a decode step reads: every initializer in its stored format
    /// (scales and zero points included), but for tables only gathered from (embeddings, rotary
    /// caches), of which a step reads a row.
    pub weight_bytes_per_step: u64,
}

impl Cost {
    /// Counts `model`'s multiply-adds; `layout` is its decoder layout (`None` when it has no
    /// attention left, which then has no attention term).
    pub fn of(model: &Model, layout: Option<&DecoderLayout>) -> Result<Cost> {
        let graph = model.graph();
        let index = GraphIndex::new(graph)?;
        let mut weight_macs_per_token = 0;
        for (n, node) in graph.node.iter().enumerate() {
            weight_macs_per_token += match node.op_type() {
                // int8 products (ONNX Runtime's dynamic quantiser) multiply by a constant matrix too.
                "MatMul"
                | "Gemm"
                | "FusedMatMul"
                | "MatMulInteger"
                | "DynamicQuantizeMatMul"
                | "MatMulIntegerToFloat" => index
                    .input(n, 1)
                    .and_then(|w| constant_weight(graph, &index, w))
                    .map_or(0, |dims| dims.iter().product::<usize>() as u64),
                "MatMulNBits" => match (attr_int(node, "K"), attr_int(node, "N")) {
                    (Some(k), Some(n)) => (k * n) as u64,
                    _ => 0,
                },
                _ => 0,
            };
        }
        let attention_widths = layout.map_or_else(Vec::new, |layout| {
            layout
                .layers
                .iter()
                .map(|l| attention_width(graph, &index, &l.y).unwrap_or(layout.hidden_size) as u64)
                .collect()
        });
        let gathered_only = |t: &TensorProto| {
            index.id(t.name()).is_some_and(|id| {
                let readers = index.consumers(id);
                !readers.is_empty()
                    && readers.iter().all(|&Port { node: c, slot }| {
                        slot == 0 && matches!(graph.node[c].op_type(), "Gather" | "GatherBlockQuantized")
                    })
            })
        };
        let weight_bytes_per_step = Footprint::of(graph, |t| !gathered_only(t))?.bytes;
        Ok(Cost { weight_macs_per_token, attention_widths, weight_bytes_per_step })
    }

    /// Bytes one decode step reads at `context` cached positions, with `kv_bytes_per_token` of
    /// KV cache per position: the weights once, and the whole cache. Decode on a memory-bound
    /// device follows this rather than the multiply-adds.
    pub fn decode_bytes(&self, context: f64, kv_bytes_per_token: u64) -> f64 {
        self.weight_bytes_per_step as f64 + kv_bytes_per_token as f64 * context
    }

    /// Multiply-adds of a prefill of `prompt` tokens, each attending to the whole prompt (what an
    /// unfused graph computes before masking).
    pub fn prefill(&self, prompt: usize) -> f64 {
        prompt as f64 * self.per_token(prompt as f64)
    }

    /// Mean multiply-adds of one of `steps` decode steps after a `prompt`-token prefill: step `i`
    /// attends to `prompt + i + 1` positions.
    pub fn decode_step(&self, prompt: usize, steps: usize) -> f64 {
        self.per_token(prompt as f64 + (steps as f64 + 1.0) / 2.0)
    }

    fn per_token(&self, context: f64) -> f64 {
        let attention: u64 = self.attention_widths.iter().map(|w| 2 * w).sum();
        self.weight_macs_per_token as f64 + attention as f64 * context
    }
}

/// The shape of the initializer behind `tensor` (see [`GraphIndex::constant_source`]).
fn constant_weight(
    graph: &crate::onnx::proto::GraphProto,
    index: &GraphIndex,
    tensor: TensorId,
) -> Option<Vec<usize>> {
    tensor_shape(index.constant_source(graph, tensor)?).ok()
}

/// What a graph's initializers hold: weights, counted as the values the model computes with (a
/// `MatMulNBits` matrix as its `K×N`, packed `GatherBlockQuantized` tables as their values, scales
/// and zero points as none), and the bytes they take in storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    pub weights: u64,
    pub bytes: u64,
}

impl Footprint {
    /// The footprint of the initializers of `graph` that `keep` selects.
    pub fn of(graph: &GraphProto, keep: impl Fn(&TensorProto) -> bool) -> Result<Footprint> {
        let index = GraphIndex::new(graph)?;
        let mut total = Footprint::default();
        for t in graph.initializer.iter().filter(|t| keep(t)) {
            let elements =
                t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?)).unwrap_or(0);
            let size = DType::from_onnx(t.data_type()).size().unwrap_or(1) as u64;
            total.bytes += match external_location(t)? {
                Some(loc) => loc.length.unwrap_or(elements * size),
                None => t.raw_data.as_ref().map_or(elements * size, |r| r.len() as u64),
            };
            total.weights +=
                index.id(t.name()).map_or(elements, |id| weights_in(graph, &index, id, elements));
        }
        Ok(total)
    }
}

/// The values a stored tensor of `elements` elements holds, judged by what reads it.
fn weights_in(graph: &GraphProto, index: &GraphIndex, id: TensorId, elements: u64) -> u64 {
    let mut readers: Vec<Port> = index.consumers(id).to_vec();
    // A reshape of a packed matrix (the GenAI builder's tied int4 embedding) reads it as its readers do.
    for &Port { node, .. } in index.consumers(id) {
        if graph.node[node].op_type() == "Reshape"
            && let Some(out) = index.output(node, 0)
        {
            readers.extend(index.consumers(out));
        }
    }
    for &Port { node, slot } in &readers {
        let n = &graph.node[node];
        match (n.op_type(), slot) {
            ("MatMulNBits", 1) => {
                if let (Some(k), Some(n)) = (attr_int(n, "K"), attr_int(n, "N")) {
                    return (k * n).max(0) as u64;
                }
            }
            ("GatherBlockQuantized", 0) => {
                let bits = attr_int(n, "bits").unwrap_or(4).clamp(1, 8) as u64;
                return elements * (8 / bits);
            }
            _ => {}
        }
    }
    let quantisation_only = !readers.is_empty()
        && readers.iter().all(|&Port { node, slot }| {
            matches!(
                (graph.node[node].op_type(), slot),
                ("MatMulNBits", 2..=4)
                    | ("GatherBlockQuantized", 2..=3)
                    | ("DequantizeLinear", 1..=2)
                    | ("Reshape", _)
            )
        });
    if quantisation_only { 0 } else { elements }
}

/// The node of the projection that makes an attention block's output `y` (`o_proj`): a product by
/// a weight matrix, found back from `y` through a bias, a reshape back to [batch, sequence,
/// hidden], a Cast, an int8 product's scale, or a quantise/dequantise pair on the output.
pub fn output_projection(graph: &GraphProto, index: &GraphIndex, y: &str) -> Option<usize> {
    let mut tensor = index.id(y)?;
    for _ in 0..4 {
        let Port { node: producer, .. } = index.producer(tensor)?;
        match graph.node[producer].op_type() {
            "MatMul"
            | "Gemm"
            | "MatMulNBits"
            | "MatMulInteger"
            | "DynamicQuantizeMatMul"
            | "MatMulIntegerToFloat" => {
                return Some(producer);
            }
            // Look at what it is applied to.
            "Add" | "Reshape" | "Cast" | "Mul" | "QuantizeLinear" | "DequantizeLinear" => {
                tensor = (0..2)
                    .filter_map(|slot| index.input(producer, slot))
                    .find(|&t| !index.is_initializer(t))?
            }
            _ => return None,
        }
    }
    None
}

/// The input width of the projection that makes an attention block's output `y` (`o_proj`):
/// heads × head size, whatever the grouping of the keys and values.
fn attention_width(graph: &GraphProto, index: &GraphIndex, y: &str) -> Option<usize> {
    let producer = output_projection(graph, index, y)?;
    let node = &graph.node[producer];
    if node.op_type() == "MatMulNBits" {
        return attr_int(node, "K").map(|k| k as usize);
    }
    let dims = constant_weight(graph, index, index.input(producer, 1)?)?;
    let trans_b = node.op_type() == "Gemm" && attr_int(node, "transB") == Some(1);
    if trans_b { dims.last().copied() } else { dims.first().copied() }
}
